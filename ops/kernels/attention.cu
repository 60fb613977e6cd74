// Causal self-attention, flash-style (FlashAttention-2 algorithm), hand-written raw op.
//
// Layouts (row-major, N = tokens of one packed micro-batch):
//   q, out, dout, dq : (N, Hq,  D) bf16        k, v, dk, dv : (N, Hkv, D) bf16
//   lse, dvec        : (Hq, N)     f32         cu_seqlens   : (S + 1) i32 prefix sums, cu[0] = 0
// Query head h reads kv head h / (Hq / Hkv) (grouped-query attention).
// Token i of the segment [cu[s], cu[s+1]) attends to keys j with cu[s] <= j <= i; tokens at or
// after cu[S] (padding up to N) form one more trailing segment, so every row has at least its
// diagonal and nothing is ever NaN. Attention never crosses segments.
//
// Math (x = scale * q.k, per query row i):
//   forward   lse_i = log sum_j exp(x_ij),  p_ij = exp(x_ij - lse_i),  out_i = sum_j p_ij v_j
//   backward  dvec_i = sum_d dout_id out_id
//             dp_ij = dout_i . v_j,  ds_ij = p_ij (dp_ij - dvec_i)
//             dq_i = scale sum_j ds_ij k_j,  dk_j = scale sum_i ds_ij q_i,  dv_j = sum_i p_ij dout_i
//   (dk, dv of a kv head sum over the Hq/Hkv query heads of its group.)
//
// Kernels (all 128 threads = 4 warps; tiles of 64 rows; f32 accumulation on tensor cores):
//   attention_fwd_d{64,128}       grid (Hq, ceil(N/128)): one block per head and 128-query tile
//                                 (32 rows per warp: each K/V fragment feeds two MMAs), online
//                                 softmax over key tiles (64 keys; 32 at D = 128), writes out
//                                 and lse; the Q tile stays in shared memory.
//   attention_bwd_dot_d{64,128}   grid ceil(N*Hq/(NT/(D/8) DOT_ROWS)): dvec = rowsum(dout * out),
//                                 a row by D/8 lanes in 16-byte chunks.
//   attention_bwd_dkdv_d{64,128}  grid (Hkv, ceil(N/64)): one block owns a 64-key tile of one kv
//                                 head and loops over the query heads of its group and over the
//                                 query tiles that can see it; dk, dv accumulate in registers
//                                 and are written once: deterministic, no atomics.
//   attention_bwd_dq_d{64,128}    grid (Hq, ceil(N/64)): one block owns a 64-query tile and loops
//                                 over key tiles, recomputing p and dp (2 of its 3 MMAs repeat
//                                 dkdv's work: ~40% more backward FLOPs than a dq-atomics design,
//                                 bought for bit-reproducible dq without an f32 scratch).
// Heads vary fastest in every grid, and tiles go longest-work first (the last query tiles, the
// first key tiles), so a step's heaviest blocks start in the first wave instead of the last
// head's (ncu: dK/dV's SMs sat idle a third of the time with the tile index fastest).
// Tiles are cut from the packed token axis, not per sequence: a tile may straddle a sequence
// boundary, and the per-element mask (j <= i and j >= seq_start(i)) keeps segments apart. Key
// tiles wholly above the diagonal are never visited; tiles wholly inside the causal region skip
// the mask.
//
// Portability: the CUDA path uses PTX ldmatrix / mma.sync.m16n8k16 bf16 / cp.async (compute_80).
// With FTRT_ATTN_PORTABLE (set automatically for HIP) the same tiled algorithm runs on warp
// shuffles that reproduce exactly the register fragments those PTX instructions define, and
// plain loads instead of cp.async. FTRT_ATTN_CPU_SIM compiles this file as C++ for a CPU
// emulator (ops/src/attention/sim/) that runs the portable path thread by thread.

#if defined(FTRT_ATTN_CPU_SIM)
// the emulator's header defines the ATTN_* platform layer before including this file
#elif defined(__HIP_PLATFORM_AMD__) || defined(__HIPCC__)
#include <hip/hip_runtime.h>
#ifndef FTRT_ATTN_PORTABLE
#define FTRT_ATTN_PORTABLE 1
#endif
#define ATTN_DEV __device__ __forceinline__
#define ATTN_KERNEL(name) extern "C" __global__ void __launch_bounds__(128) name
#define ATTN_KERNEL_MIN_BLOCKS(name, blocks) ATTN_KERNEL(name) // occupancy hint tuned for sm_90 only
#define ATTN_DYN_SMEM(name) extern __shared__ __attribute__((aligned(16))) unsigned char name[]
#define ATTN_SYNC() __syncthreads()
#define ATTN_NEG_INF (-__builtin_huge_valf())
#define ATTN_POS_INF (__builtin_huge_valf())
#else
#define ATTN_DEV __device__ __forceinline__
#define ATTN_KERNEL(name) extern "C" __global__ void __launch_bounds__(128) name
#define ATTN_KERNEL_MIN_BLOCKS(name, blocks) extern "C" __global__ void __launch_bounds__(128, blocks) name
#define ATTN_DYN_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#define ATTN_SYNC() __syncthreads()
#define ATTN_NEG_INF (__int_as_float(0xff800000))
#define ATTN_POS_INF (__int_as_float(0x7f800000))
#endif

#include "attention_common.cuh"

typedef unsigned short bf16_t;
struct alignas(16) attn_u32x4 {
    unsigned int x, y, z, w;
};

namespace attn {

constexpr int NT = 128; // threads per block (4 warps)
constexpr int BM = 64;  // query rows per block (16 per warp) in fwd and dq
constexpr int BN = 64;  // keys per tile (16 per warp in dkdv)
// shared-memory row pitch is D + PAD elements: +8 (16 bytes) makes the 8 row addresses of every
// ldmatrix hit distinct banks; HIP drops it so dq at D = 128 fits gfx90a's 64 KiB of LDS
#if defined(__HIP_PLATFORM_AMD__) || defined(__HIPCC__)
constexpr int PAD = 0;
#else
constexpr int PAD = 8;
#endif
constexpr float LOG2E = 1.4426950408889634f;
constexpr float LN2 = 0.6931471805599453f;

// ---------------------------------------------------------------- platform layer

#if defined(FTRT_ATTN_CPU_SIM)
ATTN_DEV unsigned f2u(float f) { return attn_sim_f2u(f); }
ATTN_DEV float u2f(unsigned u) { return attn_sim_u2f(u); }
ATTN_DEV float fast_exp2(float x) { return exp2f(x); }
ATTN_DEV unsigned shfl(unsigned v, int src) { return attn_sim_shfl(v, src); }
ATTN_DEV float shfl_xor(float v, int m) { return attn_sim_shfl_xor(v, m); }
#elif defined(__HIP_PLATFORM_AMD__) || defined(__HIPCC__)
ATTN_DEV unsigned f2u(float f) { return __float_as_uint(f); }
ATTN_DEV float u2f(unsigned u) { return __uint_as_float(u); }
ATTN_DEV float fast_exp2(float x) { return exp2f(x); }
ATTN_DEV unsigned shfl(unsigned v, int src) { return __shfl(v, src, 32); }
ATTN_DEV float shfl_xor(float v, int m) { return __shfl_xor(v, m, 32); }
#else
ATTN_DEV unsigned f2u(float f) { return __float_as_uint(f); }
ATTN_DEV float u2f(unsigned u) { return __uint_as_float(u); }
using attn_ptx::fast_exp2;
ATTN_DEV unsigned shfl(unsigned v, int src) { return __shfl_sync(0xffffffffu, v, src, 32); }
using attn_ptx::shfl_xor;
using attn_ptx::smem_u32;
#endif

ATTN_DEV float bf2f(bf16_t b) { return u2f(((unsigned)b) << 16); }
ATTN_DEV bf16_t f2bf(float f) { // round to nearest even
    unsigned u = f2u(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16_t)0x7fc0;
    u += 0x7fffu + ((u >> 16) & 1u);
    return (bf16_t)(u >> 16);
}
// two floats -> bf16x2 in one 32-bit register, lo in the low half (MMA fragment order)
#if defined(FTRT_ATTN_PORTABLE) || defined(FTRT_ATTN_CPU_SIM)
ATTN_DEV unsigned pack_bf16(float lo, float hi) { return (unsigned)f2bf(lo) | ((unsigned)f2bf(hi) << 16); }
#else
using attn_ptx::pack_bf16;
#endif
ATTN_DEV int lane_id() { return (int)(threadIdx.x & 31); }

// ldmatrix.x4: lanes 8m..8m+7 give the row addresses of 8x8 matrix m; register m of lane l
// then holds matrix m's row l/4, columns 2(l%4), 2(l%4)+1 (.trans: column l/4, rows 2(l%4),
// 2(l%4)+1).
#if defined(FTRT_ATTN_PORTABLE) || defined(FTRT_ATTN_CPU_SIM)
ATTN_DEV const bf16_t* shfl_ptr(const bf16_t* p, int src) {
    unsigned long long a = (unsigned long long)p;
    unsigned lo = shfl((unsigned)a, src), hi = shfl((unsigned)(a >> 32), src);
    return (const bf16_t*)(((unsigned long long)hi << 32) | lo);
}
ATTN_DEV void ldsm_x4(unsigned r[4], const bf16_t* p) {
    const int l = lane_id();
#pragma unroll
    for (int m = 0; m < 4; ++m) {
        const bf16_t* row = shfl_ptr(p, m * 8 + (l >> 2));
        r[m] = (unsigned)row[2 * (l & 3)] | ((unsigned)row[2 * (l & 3) + 1] << 16);
    }
}
ATTN_DEV void ldsm_x4_t(unsigned r[4], const bf16_t* p) {
    const int l = lane_id();
#pragma unroll
    for (int m = 0; m < 4; ++m) {
        const bf16_t* r0 = shfl_ptr(p, m * 8 + 2 * (l & 3));
        const bf16_t* r1 = shfl_ptr(p, m * 8 + 2 * (l & 3) + 1);
        r[m] = (unsigned)r0[l >> 2] | ((unsigned)r1[l >> 2] << 16);
    }
}
// D(16x8,f32) += A(16x16,bf16) B(16x8,bf16) with the mma.m16n8k16 fragments:
//   a0 A[g][2t..], a1 A[g+8][2t..], a2 A[g][2t+8..], a3 A[g+8][2t+8..]
//   b0 B[2t..][g], b1 B[2t+8..][g];  c0,c1 D[g][2t..], c2,c3 D[g+8][2t..]   (g = l/4, t = l%4)
ATTN_DEV void mma16816(float c[4], const unsigned a[4], unsigned b0, unsigned b1) {
    const int l = lane_id(), g = l >> 2, t = l & 3;
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
        unsigned ar[4], bc0[2], bc1[2];
#pragma unroll
        for (int i = 0; i < 4; ++i) ar[i] = shfl(a[i], g * 4 + kk);
        bc0[0] = shfl(b0, 8 * t + kk);
        bc0[1] = shfl(b1, 8 * t + kk);
        bc1[0] = shfl(b0, 8 * t + 4 + kk);
        bc1[1] = shfl(b1, 8 * t + 4 + kk);
        // ar[0]: A[g][2kk], A[g][2kk+1]; ar[2]: A[g][2kk+8], ...; ar[1], ar[3]: row g+8
        // bc0[0]: B[2kk][2t], B[2kk+1][2t]; bc0[1]: B[2kk+8][2t], ...; bc1: column 2t+1
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const int sh = 16 * half;
            const float b_n0_lo = bf2f((bf16_t)(bc0[0] >> sh)), b_n0_hi = bf2f((bf16_t)(bc0[1] >> sh));
            const float b_n1_lo = bf2f((bf16_t)(bc1[0] >> sh)), b_n1_hi = bf2f((bf16_t)(bc1[1] >> sh));
            const float a_g_lo = bf2f((bf16_t)(ar[0] >> sh)), a_g_hi = bf2f((bf16_t)(ar[2] >> sh));
            const float a_g8_lo = bf2f((bf16_t)(ar[1] >> sh)), a_g8_hi = bf2f((bf16_t)(ar[3] >> sh));
            c[0] += a_g_lo * b_n0_lo + a_g_hi * b_n0_hi;
            c[1] += a_g_lo * b_n1_lo + a_g_hi * b_n1_hi;
            c[2] += a_g8_lo * b_n0_lo + a_g8_hi * b_n0_hi;
            c[3] += a_g8_lo * b_n1_lo + a_g8_hi * b_n1_hi;
        }
    }
}
#else
ATTN_DEV void ldsm_x4(unsigned r[4], const bf16_t* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_u32(p)));
}
ATTN_DEV void ldsm_x4_t(unsigned r[4], const bf16_t* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_u32(p)));
}
ATTN_DEV void mma16816(float c[4], const unsigned a[4], unsigned b0, unsigned b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
                 "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
#endif

// 16-byte global -> shared copy; zero-fills when !valid (src must still be a mapped address).
#if defined(FTRT_ATTN_CPU_SIM)
ATTN_DEV void cp_async16(void* dst, const void* src, bool valid) { attn_sim_cp_async16(dst, src, valid); }
ATTN_DEV void cp_commit() { attn_sim_cp_commit(); }
template <int N> ATTN_DEV void cp_wait() { attn_sim_cp_wait(N); }
#elif defined(FTRT_ATTN_PORTABLE)
ATTN_DEV void cp_async16(void* dst, const void* src, bool valid) {
    attn_u32x4 z = {0u, 0u, 0u, 0u};
    *(attn_u32x4*)dst = valid ? *(const attn_u32x4*)src : z;
}
ATTN_DEV void cp_commit() {}
template <int N> ATTN_DEV void cp_wait() {}
#else
ATTN_DEV void cp_async16(void* dst, const void* src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(smem_u32(dst)), "l"(src),
                 "r"(valid ? 16 : 0));
}
ATTN_DEV void cp_commit() { asm volatile("cp.async.commit_group;"); }
template <int N> ATTN_DEV void cp_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(N)); }
#endif

// ---------------------------------------------------------------- helpers

using attn_segments::imin;
using attn_segments::seg_end;
using attn_segments::seg_of;
using attn_segments::seg_start;

// ROWS token rows starting at row0 of one head (g points at that head's first element; rows are
// `stride` elements apart) into shared memory with row pitch D + PAD; rows >= N become zeros.
template <int D, int ROWS>
ATTN_DEV void load_rows(bf16_t* s, const bf16_t* g, int row0, int N, long long stride) {
    constexpr int CPR = D / 8; // 16-byte chunks per row
    constexpr int LD = D + PAD;
    for (int c = (int)threadIdx.x; c < ROWS * CPR; c += NT) {
        const int r = c / CPR, cc = c % CPR;
        const int tok = row0 + r;
        const bool ok = tok < N;
        cp_async16(s + r * LD + cc * 8, g + (ok ? (long long)tok * stride : 0ll) + cc * 8, ok);
    }
}
// ROWS rows from shared memory (pitch D + PAD) to global rows row0.. (< N only)
template <int D, int ROWS>
ATTN_DEV void store_rows(bf16_t* g, const bf16_t* s, int row0, int N, long long stride) {
    constexpr int CPR = D / 8;
    constexpr int LD = D + PAD;
    for (int c = (int)threadIdx.x; c < ROWS * CPR; c += NT) {
        const int r = c / CPR, cc = c % CPR;
        const int tok = row0 + r;
        if (tok < N) *(attn_u32x4*)(g + (long long)tok * stride + cc * 8) = *(const attn_u32x4*)(s + r * LD + cc * 8);
    }
}

// A fragment (16 rows from row0, 16 columns from col0) of a row-major smem tile
ATTN_DEV void frag_a(unsigned r[4], const bf16_t* s, int ld, int row0, int col0) {
    const int l = lane_id();
    ldsm_x4(r, s + (row0 + (l & 15)) * ld + col0 + (l >> 4) * 8);
}
// B fragments of two n8 tiles for B = T^T where T (rows n, columns k) is a row-major smem tile:
// rows n0..n0+15, columns k0..k0+15. r[0], r[1] -> n-tile n0; r[2], r[3] -> n-tile n0 + 8.
ATTN_DEV void frag_bt(unsigned r[4], const bf16_t* s, int ld, int n0, int k0) {
    const int l = lane_id();
    ldsm_x4(r, s + (n0 + (l & 7) + (l >> 4) * 8) * ld + k0 + ((l >> 3) & 1) * 8);
}
// B fragments of two n8 tiles for B = T where T (rows k, columns n) is a row-major smem tile:
// rows k0..k0+15, columns n0..n0+15. r[0], r[1] -> n-tile n0; r[2], r[3] -> n-tile n0 + 8.
ATTN_DEV void frag_b(unsigned r[4], const bf16_t* s, int ld, int k0, int n0) {
    const int l = lane_id();
    ldsm_x4_t(r, s + (k0 + (l & 7) + ((l >> 3) & 1) * 8) * ld + n0 + (l >> 4) * 8);
}

// ---------------------------------------------------------------- forward

// A block owns BMF = 64 * MT query rows: warp w holds rows mt * 64 + 16 w .. + 15 for each of
// its MT m-tiles, so every K / V fragment read from shared memory feeds MT MMAs (FA2's 128-row
// tile at MT = 2); key tiles of BNF rows. Per thread: rows q0 + 64 mt + 16 w + g and that
// + 8. Registers are tight at D = 128 (o alone is 128 f32): row segment starts are looked up
// only on the tiles that mask, and P is packed to bf16 as soon as its softmax is done.
template <int D, int MT, int BNF>
ATTN_DEV void fwd_impl(const bf16_t* __restrict__ q, const bf16_t* __restrict__ k,
                       const bf16_t* __restrict__ v, const int* __restrict__ cu, int S, int N,
                       int Hq, int Hkv, float scale, bf16_t* __restrict__ out,
                       float* __restrict__ lse) {
    constexpr int LD = D + PAD, KD = D / 16, NTD = D / 8, NTS = BNF / 8, BMF = 64 * MT;
    ATTN_DYN_SMEM(smem);
    bf16_t* sQ = (bf16_t*)smem;
    bf16_t* sK = sQ + BMF * LD;
    bf16_t* sV = sK + BNF * LD;
    const int warp = (int)(threadIdx.x >> 5), l = lane_id(), g = l >> 2, t = l & 3;
    const int q0 = (int)(gridDim.y - 1 - blockIdx.y) * BMF; // longest rows first, all heads
    const int h = (int)blockIdx.x, hk = h / (Hq / Hkv);
    const float sl2 = scale * LOG2E;
    const long long qstr = (long long)Hq * D, kstr = (long long)Hkv * D;
    const bf16_t* qh = q + (long long)h * D;
    const bf16_t* kh = k + (long long)hk * D;
    const bf16_t* vh = v + (long long)hk * D;

    const int r0 = q0 + warp * 16 + g; // this thread's first query row
    const int kend = imin(q0 + BMF, N);
    const int kbeg = seg_start(cu, S, q0);
    const int last_start = seg_start(cu, S, kend - 1);
    const int ntiles = (kend - kbeg + BNF - 1) / BNF;

    load_rows<D, BMF>(sQ, qh, q0, N, qstr);
    load_rows<D, BNF>(sK, kh, kbeg, N, kstr);
    cp_commit();

    float o[MT][NTD][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int i = 0; i < NTD; ++i) o[mt][i][0] = o[mt][i][1] = o[mt][i][2] = o[mt][i][3] = 0.f;
    // running max (of scale * log2(e) * x) and sum of rows A and B of each m-tile
    float mA[MT], mB[MT], lA[MT], lB[MT];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) mA[mt] = mB[mt] = ATTN_NEG_INF, lA[mt] = lB[mt] = 0.f;

    for (int it = 0; it < ntiles; ++it) {
        const int j0 = kbeg + it * BNF;
        load_rows<D, BNF>(sV, vh, j0, N, kstr);
        cp_commit();
        cp_wait<1>(); // K tile `it` (and, first, the Q tile) has landed
        ATTN_SYNC();
        float s[MT][NTS][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int i = 0; i < NTS; ++i) s[mt][i][0] = s[mt][i][1] = s[mt][i][2] = s[mt][i][3] = 0.f;
#pragma unroll
        for (int kd = 0; kd < KD; ++kd) {
            unsigned qf[MT][4]; // from shared memory each tile: registers stay for the accumulators
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) frag_a(qf[mt], sQ, LD, mt * 64 + warp * 16, kd * 16);
#pragma unroll
            for (int np = 0; np < NTS / 2; ++np) {
                unsigned b[4];
                frag_bt(b, sK, LD, np * 16, kd * 16);
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    mma16816(s[mt][2 * np], qf[mt], b[0], b[1]);
                    mma16816(s[mt][2 * np + 1], qf[mt], b[2], b[3]);
                }
            }
        }
        ATTN_SYNC(); // everyone is done with sK: prefetch the next K tile under the softmax
        if (it + 1 < ntiles) load_rows<D, BNF>(sK, kh, j0 + BNF, N, kstr);
        cp_commit();

        const bool inside = j0 + BNF - 1 <= q0 && j0 >= last_start; // no element masked
        unsigned pk[MT][BNF / 16][4]; // P in bf16, the A fragments of the P V MMAs
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
            if (!inside) {
                const int rA = r0 + mt * 64, rB = rA + 8;
                const int stA = seg_start(cu, S, imin(rA, N - 1)), stB = seg_start(cu, S, imin(rB, N - 1));
#pragma unroll
                for (int nt = 0; nt < NTS; ++nt) {
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        const int j = j0 + nt * 8 + 2 * t + (e & 1);
                        const int i = e < 2 ? rA : rB, st = e < 2 ? stA : stB;
                        if (j > i || j < st) s[mt][nt][e] = ATTN_NEG_INF;
                    }
                }
            }
            // the max of the raw scores, scaled after (scale > 0): one multiply per row
            float mxA = ATTN_NEG_INF, mxB = ATTN_NEG_INF;
#pragma unroll
            for (int nt = 0; nt < NTS; ++nt) {
                mxA = fmaxf(mxA, fmaxf(s[mt][nt][0], s[mt][nt][1]));
                mxB = fmaxf(mxB, fmaxf(s[mt][nt][2], s[mt][nt][3]));
            }
            mxA = fmaxf(mxA, shfl_xor(mxA, 1));
            mxA = fmaxf(mxA, shfl_xor(mxA, 2));
            mxB = fmaxf(mxB, shfl_xor(mxB, 1));
            mxB = fmaxf(mxB, shfl_xor(mxB, 2));
            mxA = fmaxf(mA[mt], mxA * sl2);
            mxB = fmaxf(mB[mt], mxB * sl2);
            const float uA = mxA == ATTN_NEG_INF ? 0.f : mxA, uB = mxB == ATTN_NEG_INF ? 0.f : mxB;
            const float aA = fast_exp2(mA[mt] - uA), aB = fast_exp2(mB[mt] - uB);
            mA[mt] = mxA;
            mB[mt] = mxB;
            float psA = 0.f, psB = 0.f;
#pragma unroll
            for (int nt = 0; nt < NTS; ++nt) {
                s[mt][nt][0] = fast_exp2(fmaf(s[mt][nt][0], sl2, -uA));
                s[mt][nt][1] = fast_exp2(fmaf(s[mt][nt][1], sl2, -uA));
                s[mt][nt][2] = fast_exp2(fmaf(s[mt][nt][2], sl2, -uB));
                s[mt][nt][3] = fast_exp2(fmaf(s[mt][nt][3], sl2, -uB));
                psA += s[mt][nt][0] + s[mt][nt][1];
                psB += s[mt][nt][2] + s[mt][nt][3];
            }
            lA[mt] = lA[mt] * aA + psA;
            lB[mt] = lB[mt] * aB + psB;
#pragma unroll
            for (int dn = 0; dn < NTD; ++dn) {
                o[mt][dn][0] *= aA;
                o[mt][dn][1] *= aA;
                o[mt][dn][2] *= aB;
                o[mt][dn][3] *= aB;
            }
#pragma unroll
            for (int kk = 0; kk < BNF / 16; ++kk) {
                pk[mt][kk][0] = pack_bf16(s[mt][2 * kk][0], s[mt][2 * kk][1]);
                pk[mt][kk][1] = pack_bf16(s[mt][2 * kk][2], s[mt][2 * kk][3]);
                pk[mt][kk][2] = pack_bf16(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
                pk[mt][kk][3] = pack_bf16(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
            }
        }
        cp_wait<1>(); // V tile `it` has landed (the K prefetch may still fly)
        ATTN_SYNC();
#pragma unroll
        for (int kk = 0; kk < BNF / 16; ++kk) {
#pragma unroll
            for (int dp = 0; dp < D / 16; ++dp) {
                unsigned b[4];
                frag_b(b, sV, LD, kk * 16, dp * 16);
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    mma16816(o[mt][2 * dp], pk[mt][kk], b[0], b[1]);
                    mma16816(o[mt][2 * dp + 1], pk[mt][kk], b[2], b[3]);
                }
            }
        }
        ATTN_SYNC(); // everyone is done with sV before the next V tile
    }
    cp_wait<0>();

    // stage the output tile in sQ (each warp writes only the rows it read) and write lse
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
        float sA = lA[mt], sB = lB[mt];
        sA += shfl_xor(sA, 1);
        sA += shfl_xor(sA, 2);
        sB += shfl_xor(sB, 1);
        sB += shfl_xor(sB, 2);
        const float iA = sA > 0.f ? 1.f / sA : 0.f, iB = sB > 0.f ? 1.f / sB : 0.f;
        const int row = mt * 64 + warp * 16 + g;
#pragma unroll
        for (int dn = 0; dn < NTD; ++dn) {
            const int col = dn * 8 + 2 * t;
            *(unsigned*)(sQ + row * LD + col) = pack_bf16(o[mt][dn][0] * iA, o[mt][dn][1] * iA);
            *(unsigned*)(sQ + (row + 8) * LD + col) = pack_bf16(o[mt][dn][2] * iB, o[mt][dn][3] * iB);
        }
        const int rA = r0 + mt * 64, rB = rA + 8;
        if (t == 0) {
            if (rA < N) lse[(long long)h * N + rA] = (mA[mt] + log2f(sA)) * LN2;
            if (rB < N) lse[(long long)h * N + rB] = (mB[mt] + log2f(sB)) * LN2;
        }
    }
    ATTN_SYNC();
    store_rows<D, BMF>(out + (long long)h * D, sQ, q0, N, qstr);
}

// ---------------------------------------------------------------- backward: dvec

// Rows a lane group takes in dot_impl, its loads issued before any product.
constexpr int DOT_ROWS = 4;

// dvec[h N + i] = sum_d dout[i, h, d] out[i, h, d]. A row is D / 8 lanes, each one 16-byte chunk
// of out and dout, summed by shuffles within the group; row r = h N + i (tokens fastest, so a
// warp's dvec stores are contiguous). Block b's group g takes rows b NT/(D/8) DOT_ROWS + g +
// k NT/(D/8), k < DOT_ROWS.
template <int D>
ATTN_DEV void dot_impl(const bf16_t* __restrict__ out, const bf16_t* __restrict__ dout, int N,
                       int Hq, float* __restrict__ dvec) {
    constexpr int G = D / 8;        // lanes a row
    constexpr int GROUPS = NT / G;  // rows a block covers in one of its DOT_ROWS steps
    const int c = (int)threadIdx.x % G;
    const long long rows = (long long)N * Hq;
    const long long first = (long long)blockIdx.x * GROUPS * DOT_ROWS + (int)threadIdx.x / G;
    attn_u32x4 o[DOT_ROWS], d[DOT_ROWS];
#pragma unroll
    for (int k = 0; k < DOT_ROWS; ++k) {
        const long long r = first + (long long)k * GROUPS;
        if (r < rows) {
            const long long at = ((r % N) * Hq + r / N) * D + c * 8;
            o[k] = *(const attn_u32x4*)(out + at);
            d[k] = *(const attn_u32x4*)(dout + at);
        }
    }
#pragma unroll
    for (int k = 0; k < DOT_ROWS; ++k) {
        const long long r = first + (long long)k * GROUPS;
        float acc = 0.f;
        if (r < rows) {
            const unsigned ow[4] = {o[k].x, o[k].y, o[k].z, o[k].w}, dw[4] = {d[k].x, d[k].y, d[k].z, d[k].w};
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                acc += u2f(ow[j] << 16) * u2f(dw[j] << 16);
                acc += u2f(ow[j] & 0xffff0000u) * u2f(dw[j] & 0xffff0000u);
            }
        }
#pragma unroll
        for (int m = G / 2; m >= 1; m >>= 1) acc += shfl_xor(acc, m);
        if (r < rows && c == 0) dvec[r] = acc;
    }
}

// ---------------------------------------------------------------- backward: dk, dv

template <int D, int BMB>
ATTN_DEV void dkdv_impl(const bf16_t* __restrict__ q, const bf16_t* __restrict__ k,
                        const bf16_t* __restrict__ v, const bf16_t* __restrict__ dout,
                        const float* __restrict__ lse, const float* __restrict__ dvec,
                        const int* __restrict__ cu, int S, int N, int Hq, int Hkv, float scale,
                        bf16_t* __restrict__ dk, bf16_t* __restrict__ dv) {
    constexpr int LD = D + PAD, KD = D / 16, NTD = D / 8, NQ = BMB / 8;
    ATTN_DYN_SMEM(smem);
    bf16_t* sK = (bf16_t*)smem;
    bf16_t* sV = sK + BN * LD;
    bf16_t* sQ = sV + BN * LD;
    bf16_t* sO = sQ + BMB * LD; // dout tile
    float* sL = (float*)(sO + BMB * LD); // lse * log2(e) of the query tile
    float* sD = sL + BMB;                // dvec of the query tile
    const int warp = (int)(threadIdx.x >> 5), l = lane_id(), g = l >> 2, t = l & 3;
    const int j0 = (int)blockIdx.y * BN; // all kv heads of a key tile, then the next tile
    const int hk = (int)blockIdx.x, G = Hq / Hkv;
    const float sl2 = scale * LOG2E;
    const long long qstr = (long long)Hq * D, kstr = (long long)Hkv * D;

    const int jlast = imin(j0 + BN, N) - 1;
    const int qend = seg_end(cu, S, N, jlast); // queries past this cannot see any key of the tile
    const int first_end = seg_end(cu, S, N, j0);
    const int kA = j0 + warp * 16 + g, kB = kA + 8; // this thread's two key rows
    const int eA = kA < N ? seg_end(cu, S, N, kA) : 0, eB = kB < N ? seg_end(cu, S, N, kB) : 0;

    load_rows<D, BN>(sK, k + (long long)hk * D, j0, N, kstr);
    load_rows<D, BN>(sV, v + (long long)hk * D, j0, N, kstr);
    cp_commit();

    float ak[NTD][4], av[NTD][4];
#pragma unroll
    for (int i = 0; i < NTD; ++i) {
        ak[i][0] = ak[i][1] = ak[i][2] = ak[i][3] = 0.f;
        av[i][0] = av[i][1] = av[i][2] = av[i][3] = 0.f;
    }

    for (int hh = 0; hh < G; ++hh) {
        const int h = hk * G + hh;
        for (int i0 = j0; i0 < qend; i0 += BMB) {
            load_rows<D, BMB>(sQ, q + (long long)h * D, i0, N, qstr);
            load_rows<D, BMB>(sO, dout + (long long)h * D, i0, N, qstr);
            cp_commit();
            for (int r = (int)threadIdx.x; r < BMB; r += NT) {
                const int tok = i0 + r;
                sL[r] = tok < N ? lse[(long long)h * N + tok] * LOG2E : ATTN_POS_INF;
                sD[r] = tok < N ? dvec[(long long)h * N + tok] : 0.f;
            }
            cp_wait<0>();
            ATTN_SYNC();

            // S^T = K Q^T and dP^T = V dO^T for this warp's 16 keys x BMB queries
            float s[NQ][4], dp[NQ][4];
#pragma unroll
            for (int i = 0; i < NQ; ++i) {
                s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
                dp[i][0] = dp[i][1] = dp[i][2] = dp[i][3] = 0.f;
            }
#pragma unroll
            for (int kd = 0; kd < KD; ++kd) {
                unsigned ka[4], va[4];
                frag_a(ka, sK, LD, warp * 16, kd * 16);
                frag_a(va, sV, LD, warp * 16, kd * 16);
#pragma unroll
                for (int np = 0; np < NQ / 2; ++np) {
                    unsigned b[4];
                    frag_bt(b, sQ, LD, np * 16, kd * 16);
                    mma16816(s[2 * np], ka, b[0], b[1]);
                    mma16816(s[2 * np + 1], ka, b[2], b[3]);
                    frag_bt(b, sO, LD, np * 16, kd * 16);
                    mma16816(dp[2 * np], va, b[0], b[1]);
                    mma16816(dp[2 * np + 1], va, b[2], b[3]);
                }
            }
            // P^T and dS^T = P^T (dP^T - dvec)
            const bool full = i0 >= j0 + BN - 1 && i0 + BMB <= first_end && j0 + BN <= N;
#pragma unroll
            for (int nt = 0; nt < NQ; ++nt) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int c = nt * 8 + 2 * t + (e & 1), i = i0 + c;
                    const int j = e < 2 ? kA : kB, end = e < 2 ? eA : eB;
                    const bool vis = full || (i >= j && i < end);
                    const float p = vis ? fast_exp2(fmaf(s[nt][e], sl2, -sL[c])) : 0.f;
                    s[nt][e] = p;
                    dp[nt][e] = p * (dp[nt][e] - sD[c]);
                }
            }
            // dV += P^T dO, dK += dS^T Q  (A from registers, k = the BMB queries)
#pragma unroll
            for (int kq = 0; kq < BMB / 16; ++kq) {
                unsigned pa[4] = {pack_bf16(s[2 * kq][0], s[2 * kq][1]), pack_bf16(s[2 * kq][2], s[2 * kq][3]),
                                  pack_bf16(s[2 * kq + 1][0], s[2 * kq + 1][1]),
                                  pack_bf16(s[2 * kq + 1][2], s[2 * kq + 1][3])};
                unsigned da[4] = {pack_bf16(dp[2 * kq][0], dp[2 * kq][1]), pack_bf16(dp[2 * kq][2], dp[2 * kq][3]),
                                  pack_bf16(dp[2 * kq + 1][0], dp[2 * kq + 1][1]),
                                  pack_bf16(dp[2 * kq + 1][2], dp[2 * kq + 1][3])};
#pragma unroll
                for (int dn = 0; dn < D / 16; ++dn) {
                    unsigned b[4];
                    frag_b(b, sO, LD, kq * 16, dn * 16);
                    mma16816(av[2 * dn], pa, b[0], b[1]);
                    mma16816(av[2 * dn + 1], pa, b[2], b[3]);
                    frag_b(b, sQ, LD, kq * 16, dn * 16);
                    mma16816(ak[2 * dn], da, b[0], b[1]);
                    mma16816(ak[2 * dn + 1], da, b[2], b[3]);
                }
            }
            ATTN_SYNC(); // before the next query tile overwrites sQ, sO, sL, sD
        }
    }
    cp_wait<0>();
    ATTN_SYNC();
    // stage: each warp overwrites only its own 16 rows of sK (dk) and sV (dv)
#pragma unroll
    for (int dn = 0; dn < NTD; ++dn) {
        const int col = dn * 8 + 2 * t;
        const int r0 = (warp * 16 + g) * LD + col, r1 = r0 + 8 * LD;
        *(unsigned*)(sK + r0) = pack_bf16(ak[dn][0] * scale, ak[dn][1] * scale);
        *(unsigned*)(sK + r1) = pack_bf16(ak[dn][2] * scale, ak[dn][3] * scale);
        *(unsigned*)(sV + r0) = pack_bf16(av[dn][0], av[dn][1]);
        *(unsigned*)(sV + r1) = pack_bf16(av[dn][2], av[dn][3]);
    }
    ATTN_SYNC();
    store_rows<D, BN>(dk + (long long)hk * D, sK, j0, N, kstr);
    store_rows<D, BN>(dv + (long long)hk * D, sV, j0, N, kstr);
}

// ---------------------------------------------------------------- backward: dq

template <int D>
ATTN_DEV void dq_impl(const bf16_t* __restrict__ q, const bf16_t* __restrict__ k,
                      const bf16_t* __restrict__ v, const bf16_t* __restrict__ dout,
                      const float* __restrict__ lse, const float* __restrict__ dvec,
                      const int* __restrict__ cu, int S, int N, int Hq, int Hkv, float scale,
                      bf16_t* __restrict__ dq) {
    constexpr int LD = D + PAD, KD = D / 16, NTD = D / 8, NTS = BN / 8;
    ATTN_DYN_SMEM(smem);
    bf16_t* sQ = (bf16_t*)smem;
    bf16_t* sO = sQ + BM * LD;
    bf16_t* sK = sO + BM * LD;
    bf16_t* sV = sK + BN * LD;
    const int warp = (int)(threadIdx.x >> 5), l = lane_id(), g = l >> 2, t = l & 3;
    const int q0 = (int)(gridDim.y - 1 - blockIdx.y) * BM; // longest rows first, all heads
    const int h = (int)blockIdx.x, hk = h / (Hq / Hkv);
    const float sl2 = scale * LOG2E;
    const long long qstr = (long long)Hq * D, kstr = (long long)Hkv * D;
    const bf16_t* kh = k + (long long)hk * D;
    const bf16_t* vh = v + (long long)hk * D;

    const int rA = q0 + warp * 16 + g, rB = rA + 8;
    const int stA = seg_start(cu, S, imin(rA, N - 1)), stB = seg_start(cu, S, imin(rB, N - 1));
    const float LA = rA < N ? lse[(long long)h * N + rA] * LOG2E : ATTN_POS_INF;
    const float LB = rB < N ? lse[(long long)h * N + rB] * LOG2E : ATTN_POS_INF;
    const float DA = rA < N ? dvec[(long long)h * N + rA] : 0.f;
    const float DB = rB < N ? dvec[(long long)h * N + rB] : 0.f;
    const int kend = imin(q0 + BM, N);
    const int kbeg = seg_start(cu, S, q0);
    const int last_start = seg_start(cu, S, kend - 1);
    const int ntiles = (kend - kbeg + BN - 1) / BN;

    load_rows<D, BM>(sQ, q + (long long)h * D, q0, N, qstr);
    load_rows<D, BM>(sO, dout + (long long)h * D, q0, N, qstr);
    cp_commit();

    float a[NTD][4];
#pragma unroll
    for (int i = 0; i < NTD; ++i) a[i][0] = a[i][1] = a[i][2] = a[i][3] = 0.f;

    for (int it = 0; it < ntiles; ++it) {
        const int j0 = kbeg + it * BN;
        load_rows<D, BN>(sK, kh, j0, N, kstr);
        load_rows<D, BN>(sV, vh, j0, N, kstr);
        cp_commit();
        cp_wait<0>();
        ATTN_SYNC();
        float s[NTS][4], dp[NTS][4];
#pragma unroll
        for (int i = 0; i < NTS; ++i) {
            s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
            dp[i][0] = dp[i][1] = dp[i][2] = dp[i][3] = 0.f;
        }
#pragma unroll
        for (int kd = 0; kd < KD; ++kd) {
            unsigned qa[4], oa[4];
            frag_a(qa, sQ, LD, warp * 16, kd * 16);
            frag_a(oa, sO, LD, warp * 16, kd * 16);
#pragma unroll
            for (int np = 0; np < NTS / 2; ++np) {
                unsigned b[4];
                frag_bt(b, sK, LD, np * 16, kd * 16);
                mma16816(s[2 * np], qa, b[0], b[1]);
                mma16816(s[2 * np + 1], qa, b[2], b[3]);
                frag_bt(b, sV, LD, np * 16, kd * 16);
                mma16816(dp[2 * np], oa, b[0], b[1]);
                mma16816(dp[2 * np + 1], oa, b[2], b[3]);
            }
        }
        const bool full = j0 + BN - 1 <= q0 && j0 >= last_start;
#pragma unroll
        for (int nt = 0; nt < NTS; ++nt) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int j = j0 + nt * 8 + 2 * t + (e & 1);
                const int i = e < 2 ? rA : rB, st = e < 2 ? stA : stB;
                const bool vis = full || (j <= i && j >= st);
                const float p = vis ? fast_exp2(fmaf(s[nt][e], sl2, -(e < 2 ? LA : LB))) : 0.f;
                dp[nt][e] = p * (dp[nt][e] - (e < 2 ? DA : DB));
            }
        }
        // dQ += dS K  (A = dS from registers, k = the 64 keys; B = the K tile, rows = keys)
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) {
            unsigned da[4] = {pack_bf16(dp[2 * kk][0], dp[2 * kk][1]), pack_bf16(dp[2 * kk][2], dp[2 * kk][3]),
                              pack_bf16(dp[2 * kk + 1][0], dp[2 * kk + 1][1]),
                              pack_bf16(dp[2 * kk + 1][2], dp[2 * kk + 1][3])};
#pragma unroll
            for (int dn = 0; dn < D / 16; ++dn) {
                unsigned b[4];
                frag_b(b, sK, LD, kk * 16, dn * 16);
                mma16816(a[2 * dn], da, b[0], b[1]);
                mma16816(a[2 * dn + 1], da, b[2], b[3]);
            }
        }
        ATTN_SYNC(); // before the next K, V tiles land
    }
    cp_wait<0>();
    ATTN_SYNC();
#pragma unroll
    for (int dn = 0; dn < NTD; ++dn) {
        const int col = dn * 8 + 2 * t;
        *(unsigned*)(sQ + (warp * 16 + g) * LD + col) = pack_bf16(a[dn][0] * scale, a[dn][1] * scale);
        *(unsigned*)(sQ + (warp * 16 + g + 8) * LD + col) = pack_bf16(a[dn][2] * scale, a[dn][3] * scale);
    }
    ATTN_SYNC();
    store_rows<D, BM>(dq + (long long)h * D, sQ, q0, N, qstr);
}

// the forward's tiles: m-tiles of 16 rows per warp (a block owns 64 * MT query rows) and keys
// per tile; 32 keys at D = 128 keep o (128 f32 per thread) and s within 255 registers
template <int D> struct FwdTiles {
    static constexpr int MT = 2;
    static constexpr int BN = D >= 128 ? 32 : 64;
};
// query rows per dkdv block: 32 at D = 128 keeps dk, dv, s, dp within registers
template <int D> struct DkdvRows { static constexpr int value = D >= 128 ? 32 : 64; };

} // namespace attn

// ---------------------------------------------------------------- entry points
// Dynamic shared memory (bytes), as the launcher computes it (LD = D + PAD: D + 8 on CUDA, D on HIP):
//   fwd  (128 + 2 BN) * LD * 2    dot  0       BN (keys per tile) = 64 at D = 64, 32 at D = 128
//   dq   4 * 64 * LD * 2          dkdv (128 + 2 * BMB) * LD * 2 + 2 * BMB * 4,  BMB = 64 (D=64), 32 (D=128)

#define ATTN_ENTRIES(D)                                                                                     \
    ATTN_KERNEL_MIN_BLOCKS(attention_fwd_d##D, 2)(const bf16_t* q, const bf16_t* k, const bf16_t* v, const int* cu,        \
                                    int num_seqs, int n_tokens, int hq, int hkv, float scale, bf16_t* out,   \
                                    float* lse) {                                                            \
        attn::fwd_impl<D, attn::FwdTiles<D>::MT, attn::FwdTiles<D>::BN>(q, k, v, cu, num_seqs, n_tokens, hq, hkv, scale, out, lse);                        \
    }                                                                                                        \
    ATTN_KERNEL(attention_bwd_dot_d##D)(const bf16_t* out, const bf16_t* dout, int n_tokens, int hq,         \
                                        float* dvec) {                                                       \
        attn::dot_impl<D>(out, dout, n_tokens, hq, dvec);                                                    \
    }                                                                                                        \
    ATTN_KERNEL(attention_bwd_dkdv_d##D)(const bf16_t* q, const bf16_t* k, const bf16_t* v,                  \
                                         const bf16_t* dout, const float* lse, const float* dvec,            \
                                         const int* cu, int num_seqs, int n_tokens, int hq, int hkv,         \
                                         float scale, bf16_t* dk, bf16_t* dv) {                              \
        attn::dkdv_impl<D, attn::DkdvRows<D>::value>(q, k, v, dout, lse, dvec, cu, num_seqs, n_tokens, hq,  \
                                                     hkv, scale, dk, dv);                                    \
    }                                                                                                        \
    ATTN_KERNEL(attention_bwd_dq_d##D)(const bf16_t* q, const bf16_t* k, const bf16_t* v,                    \
                                       const bf16_t* dout, const float* lse, const float* dvec,              \
                                       const int* cu, int num_seqs, int n_tokens, int hq, int hkv,           \
                                       float scale, bf16_t* dq) {                                            \
        attn::dq_impl<D>(q, k, v, dout, lse, dvec, cu, num_seqs, n_tokens, hq, hkv, scale, dq);             \
    }

ATTN_ENTRIES(64)
ATTN_ENTRIES(128)
