// Decoding with a KV cache: raw kernels (see ops/src/decode.rs for the layouts, the math and
// the CPU references).
//
// split_qkv:         a fused q/k/v projection's rows split into q, k and v heads, with RoPE.
// kv_store:          K, V rows of this step -> cache[slot][pos]. One block per (row, kv head),
//                    one thread per head-dim element.
// decode_attention:  one query row per sequence against its cached keys 0..len, split over
//                    the keys ("flash-decoding"): per-split online-softmax partials on tensor
//                    cores (decode_attention_split_mma_d{64,128}: a kv head's whole group of
//                    query heads per block; CUDA only) or CUDA cores (_p{4,8,16}: 4 query heads
//                    per block, any head dim), then decode_attention_combine merges the splits.
// sample_rows:       the next token per row of (rows, V) f32 logits: greedy (the largest value,
//                    the lowest index among equals, as the CPU `argmax`) or a Gumbel-max draw at
//                    a temperature (given, or read from device memory: sample_rows_from).
//                    One block of 1024 threads per row.
//
// CUDA C for NVRTC (sm_80+) and hipcc (gfx90a); the tensor-core kernel (inline PTX) is CUDA only.

#if defined(__HIP_PLATFORM_AMD__) || defined(__HIPCC__)
#include <hip/hip_runtime.h>
#define DEC_NEG_INF (-__builtin_huge_valf())
#define DEC_SHFL_XOR(v, m) __shfl_xor((v), (m))
#else
#define DEC_NEG_INF (__int_as_float(0xff800000))
#define DEC_SHFL_XOR(v, m) __shfl_xor_sync(0xffffffffu, (v), (m))
#endif

typedef unsigned short dec_bf16;

__device__ __forceinline__ float dec_to_f32(dec_bf16 h) {
    return __uint_as_float(((unsigned int)h) << 16);
}

// Round to nearest even, NaN kept quiet (as __float2bfloat16_rn).
__device__ __forceinline__ dec_bf16 dec_to_bf16(float f) {
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (dec_bf16)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (dec_bf16)(u >> 16);
}

constexpr int DEC_THREADS = 128;
constexpr int DEC_MAX_D = 128;

// k_new, v_new (rows, Hkv, D); slot, pos (rows) i32; kc, vc (slots, Hkv, T, D).
extern "C" __global__ void __launch_bounds__(DEC_MAX_D) kv_store(
    const dec_bf16* __restrict__ k_new, const dec_bf16* __restrict__ v_new,
    const int* __restrict__ slot, const int* __restrict__ pos,
    int hkv, int d, int t_max, dec_bf16* __restrict__ kc, dec_bf16* __restrict__ vc) {
    const int row = blockIdx.x, h = blockIdx.y, e = threadIdx.x;
    if (e >= d) return;
    const long long src = ((long long)row * hkv + h) * d + e;
    const long long dst = (((long long)slot[row] * hkv + h) * t_max + pos[row]) * d + e;
    kc[dst] = k_new[src];
    vc[dst] = v_new[src];
}

// qkv (rows, (hq + 2 hkv) d) -> q (rows, hq, d), k (rows, hkv, d), v (rows, hkv, d): a fused
// projection's heads split apart, RoPE applied to q's and k's heads on the way when `rope` is
// set (cos, sin (P, d) rows picked by pos[row]; HF rotate_half, rounded as ops::rope's T(x1 cos)
// - T(x2 sin)), or not (q/k norms come first: Qwen3). One block per (row, head), one thread
// per pair (c, c + d/2).
extern "C" __global__ void __launch_bounds__(DEC_MAX_D / 2) split_qkv(
    const dec_bf16* __restrict__ qkv, const int* __restrict__ pos,
    const dec_bf16* __restrict__ cos, const dec_bf16* __restrict__ sin, int hq, int hkv, int d,
    int rope, dec_bf16* __restrict__ q, dec_bf16* __restrict__ k, dec_bf16* __restrict__ v) {
    const long long row = blockIdx.x;
    const int h = blockIdx.y, c = threadIdx.x, half = d / 2;
    if (c >= half) return;
    const dec_bf16* x = qkv + (row * (hq + 2 * hkv) + h) * d;
    dec_bf16* out = h < hq ? q + (row * hq + h) * d
                  : h < hq + hkv ? k + (row * hkv + h - hq) * d
                  : v + (row * hkv + h - hq - hkv) * d;
    dec_bf16 y1 = x[c], y2 = x[c + half];
    if (rope && h < hq + hkv) {
        const long long p = pos[row];
        const float x1 = dec_to_f32(y1), x2 = dec_to_f32(y2);
        const float c1 = dec_to_f32(cos[p * d + c]), c2 = dec_to_f32(cos[p * d + c + half]);
        const float s1 = dec_to_f32(sin[p * d + c]), s2 = dec_to_f32(sin[p * d + c + half]);
        y1 = dec_to_bf16(dec_to_f32(dec_to_bf16(x1 * c1)) - dec_to_f32(dec_to_bf16(x2 * s1)));
        y2 = dec_to_bf16(dec_to_f32(dec_to_bf16(x2 * c2)) + dec_to_f32(dec_to_bf16(x1 * s2)));
    }
    out[c] = y1;
    out[c + half] = y2;
}

constexpr int DEC_HEADS = 4;  // query heads per block (a kv head's group, split by 4s)
constexpr int DEC_LANES = 8;  // lanes sharing one key row (DPL dims each)
constexpr int DEC_WARPS = DEC_THREADS / 32;

// x[0..DPL) = row[d0 .. d0 + DPL) as f32, zero past d; 16-byte loads when the row allows.
template <int DPL>
__device__ __forceinline__ void dec_load(const dec_bf16* __restrict__ row, int d0, int d,
                                         float (&x)[DPL]) {
    if (DPL % 8 == 0 && d % 8 == 0 && d0 + DPL <= d) {
#pragma unroll
        for (int j = 0; j < DPL; j += 8) {
            const uint4 w = *reinterpret_cast<const uint4*>(row + d0 + j);
            const unsigned int u[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                x[j + 2 * i] = __uint_as_float(u[i] << 16);
                x[j + 2 * i + 1] = __uint_as_float(u[i] & 0xffff0000u);
            }
        }
    } else {
#pragma unroll
        for (int j = 0; j < DPL; ++j) x[j] = d0 + j < d ? dec_to_f32(row[d0 + j]) : 0.f;
    }
}

// Weights of two online-softmax states (max m, m_o) merged at their joint max; 0 for an empty
// state (m = -inf).
__device__ __forceinline__ void dec_merge_weights(float m, float m_o, float& mn, float& a,
                                                  float& b) {
    mn = fmaxf(m, m_o);
    a = m == DEC_NEG_INF ? 0.f : __expf(m - mn);
    b = m_o == DEC_NEG_INF ? 0.f : __expf(m_o - mn);
}

// Split-K ("flash-decoding") attention of one query row per sequence over its cache, part 1.
// q (S, Hq, D); kc, vc (slots, Hkv, T, D); slot, len (S) i32. Block (s, kv head x head quad,
// z) takes keys [z * ch, min(len[s], (z + 1) * ch)) for up to 4 query heads of the kv head's
// group, so each K and V row is read once per block. 128 threads = 16 key groups of 8 lanes;
// lane `sub` of a group holds dims sub * DPL .. + DPL of q, K, V and the output. Key group kg
// takes keys z * ch + kg, + 16, ...: dot products reduced over its 8 lanes by shuffles, an
// online softmax per head (running max m, sum l, unnormalized acc). The 4 groups of a warp
// merge by shuffles, the 4 warps through shared memory, and the block writes its partial
// (m, l) (S, Hq, Z) f32 and acc (S, Hq, Z, D) f32 for `decode_attention_combine`.
template <int DPL>
__device__ __forceinline__ void dec_split(
    const dec_bf16* __restrict__ q, const dec_bf16* __restrict__ kc,
    const dec_bf16* __restrict__ vc, const int* __restrict__ slot, const int* __restrict__ len,
    int hq, int hkv, int d, int t_max, int ch, float scale, float* __restrict__ pm,
    float* __restrict__ pl, float* __restrict__ pacc) {
    __shared__ float m_s[DEC_WARPS][DEC_HEADS], l_s[DEC_WARPS][DEC_HEADS];
    __shared__ float acc_s[DEC_WARPS][DEC_HEADS][DEC_MAX_D];
    const int s = blockIdx.x, z = blockIdx.z, nz = gridDim.z;
    const int group = hq / hkv, quads = (group + DEC_HEADS - 1) / DEC_HEADS;
    const int kvh = blockIdx.y / quads, quad = blockIdx.y % quads;
    const int h0 = kvh * group + quad * DEC_HEADS, g_n = min(DEC_HEADS, group - quad * DEC_HEADS);
    const int t_begin = z * ch, t_end = min(len[s], t_begin + ch);
    if (t_begin >= t_end) return; // past this sequence's keys: the combine skips split z
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int d0 = (lane % DEC_LANES) * DPL;
    float qr[DEC_HEADS][DPL], m[DEC_HEADS], l[DEC_HEADS], acc[DEC_HEADS][DPL];
#pragma unroll
    for (int g = 0; g < DEC_HEADS; ++g) {
        if (g < g_n) dec_load<DPL>(q + ((long long)s * hq + h0 + g) * d, d0, d, qr[g]);
#pragma unroll
        for (int j = 0; j < DPL; ++j) {
            qr[g][j] = g < g_n ? qr[g][j] * scale : 0.f;
            acc[g][j] = 0.f;
        }
        m[g] = DEC_NEG_INF;
        l[g] = 0.f;
    }
    const int row = d; // a (slot, kv head)'s keys are contiguous rows of D
    const long long base = ((long long)slot[s] * hkv + kvh) * t_max * d;
    // Warp-uniform loop (the shuffles need every lane): lane's key t, valid while < t_end.
    for (int t0 = t_begin + warp * 4; t0 < t_end; t0 += 4 * DEC_WARPS) {
        const int t = t0 + lane / DEC_LANES;
        const bool valid = t < t_end;
        float k[DPL], v[DPL];
        if (valid) {
            dec_load<DPL>(kc + base + (long long)t * row, d0, d, k);
            dec_load<DPL>(vc + base + (long long)t * row, d0, d, v);
        }
#pragma unroll
        for (int g = 0; g < DEC_HEADS; ++g) {
            float dot = 0.f;
#pragma unroll
            for (int j = 0; j < DPL; ++j) dot += valid ? qr[g][j] * k[j] : 0.f;
#pragma unroll
            for (int o = 1; o < DEC_LANES; o <<= 1) dot += DEC_SHFL_XOR(dot, o);
            if (valid) {
                const float mn = fmaxf(m[g], dot);
                const float c = __expf(m[g] - mn); // 0 while m = -inf (mn is finite)
                const float p = __expf(dot - mn);
                l[g] = l[g] * c + p;
#pragma unroll
                for (int j = 0; j < DPL; ++j) acc[g][j] = acc[g][j] * c + p * v[j];
                m[g] = mn;
            }
        }
    }
    // Merge the warp's 4 key groups (lanes 8 and 16 apart).
#pragma unroll
    for (int o = DEC_LANES; o < 32; o <<= 1) {
#pragma unroll
        for (int g = 0; g < DEC_HEADS; ++g) {
            float mn, a, b;
            dec_merge_weights(m[g], DEC_SHFL_XOR(m[g], o), mn, a, b);
            l[g] = l[g] * a + DEC_SHFL_XOR(l[g], o) * b;
#pragma unroll
            for (int j = 0; j < DPL; ++j) acc[g][j] = acc[g][j] * a + DEC_SHFL_XOR(acc[g][j], o) * b;
            m[g] = mn;
        }
    }
    if (lane < DEC_LANES) {
#pragma unroll
        for (int g = 0; g < DEC_HEADS; ++g) {
#pragma unroll
            for (int j = 0; j < DPL; ++j)
                if (d0 + j < DEC_MAX_D) acc_s[warp][g][d0 + j] = acc[g][j];
            if (lane == 0) {
                m_s[warp][g] = m[g];
                l_s[warp][g] = l[g];
            }
        }
    }
    __syncthreads();
    // Merge the 4 warps: thread i -> (head i / d, dim i % d) of this split's partial.
    for (int i = tid; i < g_n * d; i += DEC_THREADS) {
        const int g = i / d, e = i % d;
        float mx = DEC_NEG_INF;
#pragma unroll
        for (int w = 0; w < DEC_WARPS; ++w) mx = fmaxf(mx, m_s[w][g]);
        float sum = 0.f, o = 0.f;
#pragma unroll
        for (int w = 0; w < DEC_WARPS; ++w) {
            const float f = m_s[w][g] == DEC_NEG_INF ? 0.f : __expf(m_s[w][g] - mx);
            sum += l_s[w][g] * f;
            o += acc_s[w][g][e] * f;
        }
        const long long at = ((long long)s * hq + h0 + g) * nz + z;
        pacc[at * d + e] = o;
        if (e == 0) {
            pm[at] = mx;
            pl[at] = sum;
        }
    }
}

// dec_split for head dims up to 32, 64 and 128 (8 lanes x 4, 8 or 16 dims).
#define DEC_SPLIT_KERNEL(DPL)                                                                  \
    extern "C" __global__ void __launch_bounds__(DEC_THREADS) decode_attention_split_p##DPL(  \
        const dec_bf16* __restrict__ q, const dec_bf16* __restrict__ kc,                      \
        const dec_bf16* __restrict__ vc, const int* __restrict__ slot,                        \
        const int* __restrict__ len, int hq, int hkv, int d, int t_max, int ch, float scale,  \
        float* __restrict__ pm, float* __restrict__ pl, float* __restrict__ pacc) {           \
        dec_split<DPL>(q, kc, vc, slot, len, hq, hkv, d, t_max, ch, scale, pm, pl, pacc);     \
    }
DEC_SPLIT_KERNEL(4)
DEC_SPLIT_KERNEL(8)
DEC_SPLIT_KERNEL(16)

#if !defined(__HIP_PLATFORM_AMD__) && !defined(__HIPCC__)
// ---- Tensor-core split kernel (CUDA, sm_80+): head dims 64 and 128, up to 16 query heads per
// kv head. Same partials as dec_split, from mma.sync m16n8k16 (bf16 in, f32 accumulate):
//   S (16 heads x 8 keys) = Q (16 x D) K^T   per key tile; rows >= the group's heads are zero;
//   O (16 heads x D)     += P (16 x 16 keys) V, P = the two key tiles' scores after the online
//                           softmax, rounded to bf16 (FlashAttention-2's register reuse: the
//                           accumulator layout of S is the A-operand layout of P).
// Lane (g = lane / 4, t = lane % 4). Dims are permuted inside each product so that every lane
// reads whole 16-byte pieces of K and V rows (a dot product and a sum over keys do not depend
// on the order of their terms): in the k-steps 2p, 2p+1 of Q K^T, lane t holds dims
// 32p + 8t .. + 8 (one uint4 of its key's row, and of Q's rows g and g + 8); in P V, output
// n-tile i, column n holds dim (D / 8) * n + i, so lane g reads dims (D / 8) g .. + D / 8 of
// keys 2t, 2t + 1, 2t + 8, 2t + 9 of the 16-key step.
__device__ __forceinline__ void dec_mma(float (&c)[4], unsigned int a0, unsigned int a1,
                                        unsigned int a2, unsigned int a3, unsigned int b0,
                                        unsigned int b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ unsigned int dec_pack_bf16(float lo, float hi) {
    return (unsigned int)dec_to_bf16(lo) | ((unsigned int)dec_to_bf16(hi) << 16);
}

__device__ __forceinline__ uint4 dec_ld16(const dec_bf16* p, bool valid) {
    return valid ? *reinterpret_cast<const uint4*>(p) : make_uint4(0u, 0u, 0u, 0u);
}

constexpr float DEC_LOG2E = 1.4426950408889634f;

// One 16-key step's K and V pieces of a lane (see dec_split_mma for which).
template <int D>
struct DecKv {
    uint4 k[2][D / 32];  // keys kb + 8j + g, dims 32p + 8t .. + 8
    uint4 v[4][D / 64];  // keys kb + {2t, 2t + 1, 2t + 8, 2t + 9}, dims (D / 8) g .. + D / 8
};

template <int D>
__device__ __forceinline__ void dec_load_kv(DecKv<D>& kv, const dec_bf16* __restrict__ kb0,
                                            const dec_bf16* __restrict__ vb0, int row_stride,
                                            int kb, int t_end, int g, int t) {
#pragma unroll
    for (int j = 0; j < 2; ++j) {
        const int key = kb + 8 * j + g;
#pragma unroll
        for (int p = 0; p < D / 32; ++p)
            kv.k[j][p] = dec_ld16(kb0 + (long long)key * row_stride + 32 * p + 8 * t, key < t_end);
    }
#pragma unroll
    for (int r = 0; r < 4; ++r) {
        const int key = kb + 2 * t + (r & 1) + 8 * (r >> 1);
#pragma unroll
        for (int u = 0; u < D / 64; ++u)
            kv.v[r][u] = dec_ld16(vb0 + (long long)key * row_stride + (D / 8) * g + 8 * u, key < t_end);
    }
}

// One 16-key step: scores on tensor cores, the online softmax (log2 units, keys past t_end
// masked), the output accumulators rescaled and P V added. qf: the Q fragments (shared
// memory, [p][lane][word]: two 16-byte reads per k-step pair).
template <int D>
__device__ __forceinline__ void dec_mma_step(const DecKv<D>& kv, const unsigned int (*qf)[32][8],
                                             int kb, int t_end, float sl2, int lane,
                                             float (&m)[2], float (&l)[2], float (&o)[D / 8][4]) {
    constexpr int KP = D / 32, NT = D / 8;
    const int t = lane % 4;
    float sc[2][4];
#pragma unroll
    for (int j = 0; j < 2; ++j) {
        sc[j][0] = sc[j][1] = sc[j][2] = sc[j][3] = 0.f;
#pragma unroll
        for (int p = 0; p < KP; ++p) {
            const uint4 a = *reinterpret_cast<const uint4*>(&qf[p][lane][0]);
            const uint4 b = *reinterpret_cast<const uint4*>(&qf[p][lane][4]);
            dec_mma(sc[j], a.x, a.y, a.z, a.w, kv.k[j][p].x, kv.k[j][p].y);
            dec_mma(sc[j], b.x, b.y, b.z, b.w, kv.k[j][p].z, kv.k[j][p].w);
        }
    }
    float corr[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        float mx = DEC_NEG_INF;
#pragma unroll
        for (int j = 0; j < 2; ++j)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                float& x = sc[j][2 * r + e];
                x = kb + 8 * j + 2 * t + e < t_end ? x * sl2 : DEC_NEG_INF;
                mx = fmaxf(mx, x);
            }
        mx = fmaxf(mx, DEC_SHFL_XOR(mx, 1));
        mx = fmaxf(mx, DEC_SHFL_XOR(mx, 2));
        const float mn = fmaxf(m[r], mx);  // finite: key kb is valid
        corr[r] = exp2f(m[r] - mn);
        float sum = 0.f;
#pragma unroll
        for (int j = 0; j < 2; ++j)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                float& x = sc[j][2 * r + e];
                x = exp2f(x - mn);
                sum += x;
            }
        l[r] = l[r] * corr[r] + sum;
        m[r] = mn;
    }
    const unsigned int pa0 = dec_pack_bf16(sc[0][0], sc[0][1]);
    const unsigned int pa1 = dec_pack_bf16(sc[0][2], sc[0][3]);
    const unsigned int pa2 = dec_pack_bf16(sc[1][0], sc[1][1]);
    const unsigned int pa3 = dec_pack_bf16(sc[1][2], sc[1][3]);
#pragma unroll
    for (int i = 0; i < NT; ++i) {
        o[i][0] *= corr[0];
        o[i][1] *= corr[0];
        o[i][2] *= corr[1];
        o[i][3] *= corr[1];
        // dim NT g + i of keys 2t, 2t + 1 (b0) and 2t + 8, 2t + 9 (b1).
        const int u = i / 8, w = (i % 8) / 2;
        const unsigned int sel = (i & 1) ? 0x7632u : 0x5410u;
        const unsigned int* v0 = reinterpret_cast<const unsigned int*>(&kv.v[0][u]);
        const unsigned int* v1 = reinterpret_cast<const unsigned int*>(&kv.v[1][u]);
        const unsigned int* v2 = reinterpret_cast<const unsigned int*>(&kv.v[2][u]);
        const unsigned int* v3 = reinterpret_cast<const unsigned int*>(&kv.v[3][u]);
        dec_mma(o[i], pa0, pa1, pa2, pa3, __byte_perm(v0[w], v1[w], sel),
                __byte_perm(v2[w], v3[w], sel));
    }
}

template <int D>
__device__ __forceinline__ void dec_split_mma(
    const dec_bf16* __restrict__ q, const dec_bf16* __restrict__ kc,
    const dec_bf16* __restrict__ vc, const int* __restrict__ slot, const int* __restrict__ len,
    int hq, int hkv, int t_max, int ch, float scale, float* __restrict__ pm,
    float* __restrict__ pl, float* __restrict__ pacc) {
    constexpr int KP = D / 32, NT = D / 8;
    // Q fragments [p][lane][word]: words 0-3 the A operand of k-step 2p (a0..a3), 4-7 of 2p + 1.
    __shared__ __align__(16) unsigned int qf[KP][32][8];
    __shared__ float m_s[DEC_WARPS][16], l_s[DEC_WARPS][16];
    // Each warp's output rows in fragment order (n-tile i, column n at 8i + n: dim NT n + i),
    // rows padded to D + 8 words: the lanes' 8-byte stores hit distinct banks.
    __shared__ __align__(16) float o_s[DEC_WARPS][16][D + 8];
    const int s = blockIdx.x, kvh = blockIdx.y, z = blockIdx.z, nz = gridDim.z;
    const int group = hq / hkv, h0 = kvh * group;
    const int t_begin = z * ch, t_end = min(len[s], t_begin + ch);
    if (t_begin >= t_end) return;
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
    if (warp == 0) {
        // Rows g and g + 8 (zero past the group), dims 32p + 8t .. + 8.
#pragma unroll
        for (int p = 0; p < KP; ++p) {
            uint4 w[2];
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                const int row = g + 8 * r;
                w[r] = dec_ld16(q + ((long long)s * hq + h0 + row) * D + 32 * p + 8 * t, row < group);
            }
            const unsigned int f[8] = {w[0].x, w[1].x, w[0].y, w[1].y, w[0].z, w[1].z, w[0].w, w[1].w};
#pragma unroll
            for (int i = 0; i < 8; ++i) qf[p][lane][i] = f[i];
        }
    }
    __syncthreads();
    const float sl2 = scale * DEC_LOG2E;
    float m[2] = {DEC_NEG_INF, DEC_NEG_INF}, l[2] = {0.f, 0.f};  // rows g, g + 8 (log2 units)
    float o[NT][4];
#pragma unroll
    for (int i = 0; i < NT; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
    const int row_stride = D;  // a (slot, kv head)'s keys are contiguous rows of D
    const dec_bf16* kb0 = kc + ((long long)slot[s] * hkv + kvh) * t_max * D;
    const dec_bf16* vb0 = vc + ((long long)slot[s] * hkv + kvh) * t_max * D;
    // Each warp takes 16-key steps kb, kb + 64, ...; a step's K and V loads are all issued
    // before its first product.
    for (int kb = t_begin + 16 * warp; kb < t_end; kb += 16 * DEC_WARPS) {
        DecKv<D> kv;
        dec_load_kv<D>(kv, kb0, vb0, row_stride, kb, t_end, g, t);
        dec_mma_step<D>(kv, qf, kb, t_end, sl2, lane, m, l, o);
    }
    // The row sums over the quad; the warp's partial into shared memory.
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        l[r] += DEC_SHFL_XOR(l[r], 1);
        l[r] += DEC_SHFL_XOR(l[r], 2);
    }
    if (t == 0) {
        m_s[warp][g] = m[0];
        m_s[warp][g + 8] = m[1];
        l_s[warp][g] = l[0];
        l_s[warp][g + 8] = l[1];
    }
#pragma unroll
    for (int i = 0; i < NT; ++i) {
        *reinterpret_cast<float2*>(&o_s[warp][g][8 * i + 2 * t]) = make_float2(o[i][0], o[i][1]);
        *reinterpret_cast<float2*>(&o_s[warp][g + 8][8 * i + 2 * t]) = make_float2(o[i][2], o[i][3]);
    }
    __syncthreads();
    for (int i = tid; i < group * D; i += DEC_THREADS) {
        const int row = i / D, e = i % D, frag = 8 * (e % NT) + e / NT;
        float mx = DEC_NEG_INF;
#pragma unroll
        for (int w = 0; w < DEC_WARPS; ++w) mx = fmaxf(mx, m_s[w][row]);
        float sum = 0.f, acc = 0.f;
#pragma unroll
        for (int w = 0; w < DEC_WARPS; ++w) {
            const float f = m_s[w][row] == DEC_NEG_INF ? 0.f : exp2f(m_s[w][row] - mx);
            sum += l_s[w][row] * f;
            acc += o_s[w][row][frag] * f;
        }
        const long long at = ((long long)s * hq + h0 + row) * nz + z;
        pacc[at * D + e] = acc;
        if (e == 0) {
            pm[at] = mx / DEC_LOG2E;  // natural-log units, as dec_split's
            pl[at] = sum;
        }
    }
}

#define DEC_SPLIT_MMA_KERNEL(D)                                                                 \
    extern "C" __global__ void __launch_bounds__(DEC_THREADS, 1) decode_attention_split_mma_d##D( \
        const dec_bf16* __restrict__ q, const dec_bf16* __restrict__ kc,                       \
        const dec_bf16* __restrict__ vc, const int* __restrict__ slot,                         \
        const int* __restrict__ len, int hq, int hkv, int t_max, int ch, float scale,          \
        float* __restrict__ pm, float* __restrict__ pl, float* __restrict__ pacc) {            \
        dec_split_mma<D>(q, kc, vc, slot, len, hq, hkv, t_max, ch, scale, pm, pl, pacc);       \
    }
DEC_SPLIT_MMA_KERNEL(64)
DEC_SPLIT_MMA_KERNEL(128)
#endif

// Part 2: out (S, Hq, D) bf16 = the splits z < ceil(len[s] / ch) merged at their joint max:
// sum_z acc_z e^(m_z - M) / sum_z l_z e^(m_z - M). Block (s, h), one thread per dim.
extern "C" __global__ void __launch_bounds__(DEC_MAX_D) decode_attention_combine(
    const float* __restrict__ pm, const float* __restrict__ pl, const float* __restrict__ pacc,
    const int* __restrict__ len, int hq, int d, int ch, int nz, dec_bf16* __restrict__ out) {
    const int s = blockIdx.x, e = threadIdx.x;
    const long long r = (long long)s * hq + blockIdx.y;
    const int used = (len[s] + ch - 1) / ch;
    float mx = DEC_NEG_INF;
    for (int z = 0; z < used; ++z) mx = fmaxf(mx, pm[r * nz + z]);
    float sum = 0.f, o = 0.f;
    for (int z = 0; z < used; ++z) {
        const float f = __expf(pm[r * nz + z] - mx); // every used split holds >= 1 key
        sum += pl[r * nz + z] * f;
        if (e < d) o += pacc[(r * nz + z) * d + e] * f;
    }
    if (e < d) out[r * d + e] = dec_to_bf16(__fdividef(o, sum)); // sum >= 1
}

// Counter-based uniform in (0, 1) from (seed, n): splitmix64's finaliser, top 24 bits.
__device__ __forceinline__ float dec_uniform(unsigned long long seed, unsigned long long n) {
    unsigned long long z = seed + (n + 1) * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    return ((float)(z >> 40) + 0.5f) * (1.0f / 16777216.0f);
}

// logits (rows, V) f32 -> idx (rows) i32. inv_temp = 0: the first index of the row's largest
// logit (greedy). inv_temp > 0: argmax of x * inv_temp + g with g = -log(-log(u)) Gumbel noise,
// u = dec_uniform(seed, row * V + c): an exact draw from softmax(x / T) (Gumbel-max).
// One block of SAMPLE_THREADS per row (a batch of 64 rows fills half the SMs, so each block
// takes as many threads as it may: the Gumbel keys' two logs per element are the work).
#define SAMPLE_THREADS 1024
__device__ __forceinline__ void sample_row(
    const float* __restrict__ logits, long long v, float inv_temp,
    unsigned long long seed, int* __restrict__ idx) {
    __shared__ float best_v[SAMPLE_THREADS];
    __shared__ long long best_i[SAMPLE_THREADS];
    const long long row = blockIdx.x;
    const float* x = logits + row * v;
    float bv = DEC_NEG_INF;
    long long bi = v; // past the end: loses to any real index
    for (long long c = threadIdx.x; c < v; c += SAMPLE_THREADS) {
        float val = x[c];
        if (inv_temp > 0.f) val = val * inv_temp - logf(-logf(dec_uniform(seed, row * v + c)));
        if (val > bv || (bi == v && !(val < bv))) { // first in this thread's order
            bv = val;
            bi = c;
        }
    }
    best_v[threadIdx.x] = bv;
    best_i[threadIdx.x] = bi;
    __syncthreads();
    for (int half = SAMPLE_THREADS / 2; half > 0; half >>= 1) {
        if (threadIdx.x < half) {
            const float ov = best_v[threadIdx.x + half];
            const long long oi = best_i[threadIdx.x + half];
            const float mv = best_v[threadIdx.x];
            const long long mi = best_i[threadIdx.x];
            if (ov > mv || (ov == mv && oi < mi) || mi == v) {
                best_v[threadIdx.x] = ov;
                best_i[threadIdx.x] = oi;
            }
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) idx[row] = (int)best_i[0];
}

extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS) sample_rows(
    const float* __restrict__ logits, long long v, float inv_temp,
    unsigned long long seed, int* __restrict__ idx) {
    sample_row(logits, v, inv_temp, seed, idx);
}

// The same with (inv_temp, seed) read from device memory, params (2) u64 = [the f32 bits of
// inv_temp, seed]: a captured CUDA graph replays it with what the host wrote before each step.
extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS) sample_rows_from(
    const float* __restrict__ logits, long long v,
    const unsigned long long* __restrict__ params, int* __restrict__ idx) {
    sample_row(logits, v, __uint_as_float((unsigned int)params[0]), params[1], idx);
}
