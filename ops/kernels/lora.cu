// LoRA's low-rank products: raw kernels (see ops/src/lora.rs for the math, the layouts and the
// CPU reference).
//
// lora_expand_{nt,nn}: y (M, N) bf16 = alpha x (M, K) w, beta 0, K a multiple of 16 up to 64
// (the rank times a stack's members), f32 accumulation. nt: w is (N, K) row-major (y = x B^T,
// the forward's B products); nn: w is (K, N) row-major (y = dxa A, the backward's dx). Such a
// product is bound by the write of y (4096 x 14336 bf16 is 117 MB for 1.9 GFLOP) and its
// operands are small enough to stay in L2, so every warp works alone: it loads its fragments
// of x and w straight from global memory, multiplies a 16 x 64 piece of y with K / 16 steps
// of eight mma.sync m16n8k16 (bf16 in, f32 accumulate) and stores it from its registers. No
// shared memory and no block barrier: many small warps per SM keep the writes flowing while
// others wait on their loads.
//
// CUDA C for NVRTC (sm_80+) and hipcc (gfx90a); the mma is CUDA only (HIP: the same fragments
// multiplied on the vector units).

#if defined(__HIP_PLATFORM_AMD__) || defined(__HIPCC__)
#include <hip/hip_runtime.h>
#define LR_MMA 0
#else
#define LR_MMA 1
#endif

typedef unsigned short lr_bf16;

__device__ __forceinline__ float lr_f32(lr_bf16 h) {
    return __uint_as_float(((unsigned int)h) << 16);
}

// Round to nearest even, NaN kept quiet (as __float2bfloat16_rn).
__device__ __forceinline__ lr_bf16 lr_to_bf16(float f) {
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (lr_bf16)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (lr_bf16)(u >> 16);
}

constexpr int LR_ROWS = 16;   // rows of y per warp: one m16 tile
constexpr int LR_COLS = 64;   // columns of y per warp: eight n8 tiles
constexpr int LR_WARPS = 4;   // warps per block, stacked along the rows

__device__ __forceinline__ unsigned int lr_pair(const lr_bf16* p) {
    return *reinterpret_cast<const unsigned int*>(p);
}

#if LR_MMA
__device__ __forceinline__ void lr_mma(float (&c)[4], const unsigned int (&a)[4], unsigned int b0,
                                       unsigned int b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
#endif

// w's element (k, column) of the product: w[k][c] when w is (K, N), else w[c][k].
template <bool KN>
__device__ __forceinline__ lr_bf16 lr_w(const lr_bf16* w, int ldb, int kk, int c) {
    return KN ? w[(long long)kk * ldb + c] : w[(long long)c * ldb + kk];
}

// The warp's 16 x 64 piece of y at (r0, c0), in mma's accumulator layout: lane (g, t) = (lane
// / 4, lane % 4) holds, for n tile j, (row g, columns 8 j + 2 t, + 1) in acc[j][0..1] and row
// g + 8 in acc[j][2..3]. Rows past m and columns past n are zero.
template <bool KN>
__device__ __forceinline__ void lr_piece(const lr_bf16* __restrict__ x, int lda,
                                         const lr_bf16* __restrict__ w, int ldb, int m, int n,
                                         int k, int r0, int c0, float (&acc)[8][4]) {
    const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const bool lo = r0 + g < m, hi = r0 + g + 8 < m;
#if LR_MMA
    for (int kk = 0; kk < k; kk += 16) {
        const lr_bf16* xr = x + (long long)(r0 + g) * lda + kk + 2 * t;
        const unsigned int a[4] = {lo ? lr_pair(xr) : 0u, hi ? lr_pair(xr + 8LL * lda) : 0u,
                                   lo ? lr_pair(xr + 8) : 0u,
                                   hi ? lr_pair(xr + 8LL * lda + 8) : 0u};
        unsigned int b[8][2];
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            const int c = c0 + 8 * j + g;
            b[j][0] = b[j][1] = 0u;
            if (c >= n) continue;
            if (KN) {
                const int k0 = kk + 2 * t;
                b[j][0] = lr_w<KN>(w, ldb, k0, c) | ((unsigned int)lr_w<KN>(w, ldb, k0 + 1, c) << 16);
                b[j][1] = lr_w<KN>(w, ldb, k0 + 8, c) |
                          ((unsigned int)lr_w<KN>(w, ldb, k0 + 9, c) << 16);
            } else {
                const lr_bf16* wr = w + (long long)c * ldb + kk + 2 * t;
                b[j][0] = lr_pair(wr);
                b[j][1] = lr_pair(wr + 8);
            }
        }
#pragma unroll
        for (int j = 0; j < 8; ++j) lr_mma(acc[j], a, b[j][0], b[j][1]);
    }
#else
    for (int j = 0; j < 8; ++j)
        for (int e = 0; e < 4; ++e) {
            const int r = r0 + g + 8 * (e / 2), c = c0 + 8 * j + 2 * t + e % 2;
            if (r >= m || c >= n) continue;
            float s = 0.0f;
            for (int kk = 0; kk < k; ++kk)
                s += lr_f32(x[(long long)r * lda + kk]) * lr_f32(lr_w<KN>(w, ldb, kk, c));
            acc[j][e] = s;
        }
#endif
    (void)lo;
    (void)hi;
}

template <bool KN>
__device__ __forceinline__ void lr_expand(const lr_bf16* __restrict__ x, int lda,
                                          const lr_bf16* __restrict__ w, int ldb,
                                          lr_bf16* __restrict__ y, int ldc, int m, int n, int k,
                                          float alpha) {
    const int r0 = (blockIdx.y * LR_WARPS + threadIdx.x / 32) * LR_ROWS;
    const int c0 = blockIdx.x * LR_COLS;
    if (r0 >= m) return;
    float acc[8][4] = {};
    lr_piece<KN>(x, lda, w, ldb, m, n, k, r0, c0, acc);
    const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
        const int c = c0 + 8 * j + 2 * t;
        if (c >= n) continue;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int r = r0 + g + 8 * h;
            if (r >= m) continue;
            const unsigned int lo = lr_to_bf16(alpha * acc[j][2 * h]);
            const unsigned int hi = lr_to_bf16(alpha * acc[j][2 * h + 1]);
            *reinterpret_cast<unsigned int*>(y + (long long)r * ldc + c) = lo | (hi << 16);
        }
    }
}

// w (N, K): its rows are y's columns.
extern "C" __global__ void __launch_bounds__(32 * LR_WARPS) lora_expand_nt(
    const lr_bf16* __restrict__ x, int lda, const lr_bf16* __restrict__ w, int ldb,
    lr_bf16* __restrict__ y, int ldc, int m, int n, int k, float alpha) {
    lr_expand<false>(x, lda, w, ldb, y, ldc, m, n, k, alpha);
}

// w (K, N).
extern "C" __global__ void __launch_bounds__(32 * LR_WARPS) lora_expand_nn(
    const lr_bf16* __restrict__ x, int lda, const lr_bf16* __restrict__ w, int ldb,
    lr_bf16* __restrict__ y, int ldc, int m, int n, int k, float alpha) {
    lr_expand<true>(x, lda, w, ldb, y, ldc, m, n, k, alpha);
}
