// Cross-entropy's forward and backward over one chunk of logits that spans the whole vocabulary,
// in one pass: the op `cross_entropy::cross_entropy` (ops/src/cross_entropy.rs: its math and
// CPU reference) without a softcap, from lse = -inf and picked = 0, then its backward in place.
//
//   lse[r] = log sum_c exp(z[r, c]),  picked[r] = z[r, t_r] (0 when t_r is outside [0, V)),
//   z[r, c] <- T(dlse[r] exp(z[r, c] - lse[r]) + [c == t_r] dpicked[r])
//
// The op's two kernels read the (R, V) logits twice and write them once; here each row is read
// once, into shared memory, and written once. A row is a cluster of C = ceil(V / S) blocks of
// 256 threads, each holding S columns (S = 16384: 32 KB, six blocks an SM; S = 32768 past
// 131,072 columns): one bulk copy (the TMA engine) brings a block's slice in, its threads fold
// (max, sum of exp(x - max)) pairs over it, the cluster's blocks read each other's pair through
// distributed shared memory and fold them in rank order (the same bits in every block), and
// each thread writes its gradients with 16-byte stores. The max runs on bf16 pairs, the sums
// use ex2.approx like the op's forward, and the gradient dlse exp(z - lse) is one ex2.approx
// with dlse folded into the exponent (the op's backward: __expf, then a product), dpicked added
// in the target's chunk only: ~17 instructions a bf16 pair over the three passes instead of
// ~29 (ncu put the plain version at 60% of the SMs' issue throughput). Hopper (sm_90a) only.

#include <cuda_bf16.h>

constexpr int CE_THREADS = 256;
constexpr float CE_LOG2E = 1.4426950408889634f;
#define CE_NEG_INF (__int_as_float(0xff800000))

__device__ __forceinline__ float ce_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

// (m, s) with s = sum of exp(x - m) over some x, folded with (m2, s2) into the larger max.
__device__ __forceinline__ void ce_fold(float& m, float& s, float m2, float s2) {
    const float mx = fmaxf(m, m2);
    s = mx == CE_NEG_INF ? 0.f : s * ce_exp2((m - mx) * CE_LOG2E) + s2 * ce_exp2((m2 - mx) * CE_LOG2E);
    m = mx;
}

__device__ __forceinline__ unsigned ce_cluster_rank() {
    unsigned r;
    asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
    return r;
}
__device__ __forceinline__ unsigned ce_cluster_size() {
    unsigned n;
    asm volatile("mov.u32 %0, %%cluster_nctarank;" : "=r"(n));
    return n;
}

// The pair block `rank` of this cluster left at `local` (the same offset in its shared memory).
__device__ __forceinline__ float2 ce_remote_pair(const float2* local, unsigned rank) {
    unsigned addr, remote;
    asm("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(addr) : "l"(local));
    asm("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(addr), "r"(rank));
    float2 v;
    asm volatile("ld.shared::cluster.v2.f32 {%0, %1}, [%2];" : "=f"(v.x), "=f"(v.y) : "r"(remote) : "memory");
    return v;
}

__device__ __forceinline__ float ce_lo(unsigned w) { return __uint_as_float(w << 16); }
__device__ __forceinline__ float ce_hi(unsigned w) { return __uint_as_float(w & 0xffff0000u); }

__device__ __forceinline__ unsigned ce_smem_u32(const void* p) {
    unsigned r;
    asm("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(r) : "l"(p));
    return r;
}

// f(j, w) for each of this thread's 16-byte chunks j < chunks of a block's slice, w its four
// bf16 pairs (lo in the low half)
template <int S, class F>
__device__ __forceinline__ void ce_chunks(const uint4* slice, int chunks, F f) {
#pragma unroll
    for (int k = 0; k < S / 8 / CE_THREADS; ++k) {
        const int j = (int)threadIdx.x + k * CE_THREADS;
        if (j < chunks) {
            const uint4 x = slice[j];
            const unsigned w[4] = {x.x, x.y, x.z, x.w};
            f(j, w);
        }
    }
}

// logits (R, V) bf16, V a multiple of 8, 16-byte aligned; target, dlse, dpicked, lse, picked
// (R). Grid R C blocks of CE_THREADS in clusters of C along x, C S >= V; 2 S bytes of dynamic
// shared memory.
template <int S>
__device__ __forceinline__ void ce_fused(int V, unsigned short* __restrict__ logits, const int* __restrict__ target,
                                         const float* __restrict__ dlse, const float* __restrict__ dpicked,
                                         float* __restrict__ lse, float* __restrict__ picked) {
    extern __shared__ __align__(128) unsigned char ce_dyn[];
    const uint4* slice = (const uint4*)ce_dyn; // this block's columns, 8 a chunk
    __shared__ __align__(8) unsigned long long landed;
    __shared__ float2 warp_pairs[CE_THREADS / 32];
    __shared__ float2 block_pair;
    const unsigned rank = ce_cluster_rank(), blocks = ce_cluster_size();
    const long long r = blockIdx.x / blocks;
    const int tid = threadIdx.x, c_first = (int)rank * S, chunks = min(S, V - c_first) / 8;
    unsigned short* row = logits + r * V + c_first;

    if (tid == 0) {
        asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(ce_smem_u32(&landed)));
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    __syncthreads();
    if (tid == 0) {
        const unsigned bytes = chunks * 16;
        asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(ce_smem_u32(&landed)),
                     "r"(bytes)
                     : "memory");
        asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                     ::"r"(ce_smem_u32(slice)), "l"(row), "r"(bytes), "r"(ce_smem_u32(&landed))
                     : "memory");
    }
    // the target's logit, read before the cluster's first barrier (no block writes before it)
    const int t = target[r];
    float zt = 0.f;
    if (rank == 0 && tid == 0 && t >= 0 && t < V) zt = __uint_as_float((unsigned)logits[r * V + t] << 16);
    const float dl = dlse[r], dp = dpicked[r];
    asm volatile("{ .reg .pred p;\n"
                 "CE_WAIT_%=: mbarrier.try_wait.parity.shared::cta.b64 p, [%0], 0;\n"
                 "@!p bra CE_WAIT_%=; }\n" ::"r"(ce_smem_u32(&landed))
                 : "memory");

    // the max on bf16 pairs (exact: a max rounds nothing), unpacked once
    __nv_bfloat162 m2 = __halves2bfloat162(__ushort_as_bfloat16(0xff80), __ushort_as_bfloat16(0xff80));
    ce_chunks<S>(slice, chunks, [&](int, const unsigned* w) {
#pragma unroll
        for (int i = 0; i < 4; ++i) m2 = __hmax2(m2, *(const __nv_bfloat162*)&w[i]);
    });
    float m = fmaxf(__low2float(m2), __high2float(m2)), s = 0.f;
    if (m != CE_NEG_INF) {
        const float ml = m * CE_LOG2E;
        ce_chunks<S>(slice, chunks, [&](int, const unsigned* w) {
#pragma unroll
            for (int i = 0; i < 4; ++i)
                s += ce_exp2(fmaf(ce_lo(w[i]), CE_LOG2E, -ml)) + ce_exp2(fmaf(ce_hi(w[i]), CE_LOG2E, -ml));
        });
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float m2 = __shfl_xor_sync(0xffffffffu, m, o), s2 = __shfl_xor_sync(0xffffffffu, s, o);
        ce_fold(m, s, m2, s2);
    }
    if ((tid & 31) == 0) warp_pairs[tid >> 5] = make_float2(m, s); // lane 0's fold
    __syncthreads();
    if (tid == 0) {
        float bm = CE_NEG_INF, bs = 0.f;
#pragma unroll
        for (int i = 0; i < CE_THREADS / 32; ++i) ce_fold(bm, bs, warp_pairs[i].x, warp_pairs[i].y);
        block_pair = make_float2(bm, bs);
    }
    asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;" ::: "memory");
    float rm = CE_NEG_INF, rs = 0.f;
    for (unsigned b = 0; b < blocks; ++b) {
        const float2 p = ce_remote_pair(&block_pair, b);
        ce_fold(rm, rs, p.x, p.y);
    }
    // done reading the other blocks' pairs; they may exit once all have (the wait at the end)
    asm volatile("barrier.cluster.arrive.release.aligned;" ::: "memory");
    const float row_lse = rm == CE_NEG_INF ? CE_NEG_INF : rm + logf(rs);

    // dlse exp(z - lse) as one ex2 of z log2 e - (lse log2 e - log2 |dlse|) (dlse = 0: 2^-inf = 0),
    // its sign put back on the bf16 pair; the target's chunk alone adds dpicked
    const float shift = row_lse * CE_LOG2E - log2f(fabsf(dl));
    const unsigned sign = dl < 0.f ? 0x80008000u : 0u;
    ce_chunks<S>(slice, chunks, [&](int j, const unsigned* w) {
        const int c0 = c_first + 8 * j;
        unsigned g[4];
        if ((unsigned)(t - c0) >= 8u) {
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const float lo = ce_exp2(fmaf(ce_lo(w[i]), CE_LOG2E, -shift));
                const float hi = ce_exp2(fmaf(ce_hi(w[i]), CE_LOG2E, -shift));
                const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
                g[i] = *(const unsigned*)&v ^ sign;
            }
        } else {
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const int c = c0 + 2 * i;
                const float e_lo = ce_exp2(fmaf(ce_lo(w[i]), CE_LOG2E, -shift));
                const float e_hi = ce_exp2(fmaf(ce_hi(w[i]), CE_LOG2E, -shift));
                const float lo = (sign ? -e_lo : e_lo) + (c == t ? dp : 0.f);
                const float hi = (sign ? -e_hi : e_hi) + (c + 1 == t ? dp : 0.f);
                const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
                g[i] = *(const unsigned*)&v;
            }
        }
        *(uint4*)(row + 8 * j) = make_uint4(g[0], g[1], g[2], g[3]);
    });
    if (rank == 0 && tid == 0) {
        lse[r] = row_lse;
        picked[r] = 0.f + zt;
    }
    asm volatile("barrier.cluster.wait.acquire.aligned;" ::: "memory");
}

#define CE_FUSED(S, BLOCKS)                                                                             \
    extern "C" __global__ void __launch_bounds__(CE_THREADS, BLOCKS) cross_entropy_fused_s##S(         \
        int V, unsigned short* logits, const int* target, const float* dlse, const float* dpicked,      \
        float* lse, float* picked) {                                                                    \
        ce_fused<S>(V, logits, target, dlse, dpicked, lse, picked);                                     \
    }

CE_FUSED(16384, 6)
CE_FUSED(32768, 3)
