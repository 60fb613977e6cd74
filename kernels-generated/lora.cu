// LoRA's low-rank products: raw kernels (see ops/src/lora.rs for the math, the layouts and the
// CPU reference).
//
// lora_expand_{nt,nn}: y (M, N) bf16 = alpha x (M, K) w, beta 0, K a multiple of 16 up to 64
// (the rank times a stack's members), f32 accumulation. nt: w is (N, K) row-major (y = x B^T,
// the forward's B products); nn: w is (K, N) row-major (y = dxa A, the backward's dx). Such a
// product is bound by the write of y: 4096 x 14336 bf16 is 117 MB for 1.9 GFLOP. One block of
// 256 threads per 128 x 128 tile of y: x's and w's tiles ([row][k], [n][k]) into shared memory,
// each warp's 64 x 32 of y from K / 16 steps of mma.sync m16n8k16 (bf16 in, f32 accumulate),
// then the tile back through shared memory so that every row leaves in 16-byte stores.
//
// CUDA C for NVRTC (sm_80+) and hipcc (gfx90a); the mma is CUDA only (HIP: the same tiles,
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

constexpr int LR_TILE = 128;       // rows of y, and columns, per block
constexpr int LR_THREADS = 256;    // 8 warps: 2 along the rows x 4 along the columns
constexpr int LR_KMAX = 64;
constexpr int LR_KPAD = 8;         // [row][k] tiles' row stride is K + 8 elements: the fragment
                                   // loads of a warp (8 rows x 4 words) hit 32 different banks
constexpr int LR_OUT_LD = LR_TILE + 8;
constexpr int LR_SMEM_ELEMS = 2 * LR_TILE * (LR_KMAX + LR_KPAD);
static_assert(LR_TILE * LR_OUT_LD <= LR_SMEM_ELEMS, "the y tile reuses the operand tiles");

// Words (pairs of bf16) each thread loads per operand tile: at most 128 x 64 / 2 / 256.
constexpr int LR_WORDS = LR_TILE * LR_KMAX / 2 / LR_THREADS;

// xs[r][k] = x[r0 + r][k] (zero past `rows`), ks = K + 8; rows of K bf16 as 32-bit words. All
// of a thread's loads are issued before its first shared store (one L2 latency per tile, not
// one per word).
__device__ __forceinline__ void lr_load_rows(const lr_bf16* __restrict__ x, int ld, int rows,
                                             int r0, int k, int ks, lr_bf16* xs) {
    const int words = k / 2, total = LR_TILE * words;
    unsigned int v[LR_WORDS];
#pragma unroll
    for (int j = 0; j < LR_WORDS; ++j) {
        const int i = threadIdx.x + j * LR_THREADS, r = i / words, w = i % words;
        v[j] = 0;
        if (i < total && r0 + r < rows)
            v[j] = *reinterpret_cast<const unsigned int*>(x + (long long)(r0 + r) * ld + 2 * w);
    }
#pragma unroll
    for (int j = 0; j < LR_WORDS; ++j) {
        const int i = threadIdx.x + j * LR_THREADS, r = i / words, w = i % words;
        if (i < total) *reinterpret_cast<unsigned int*>(xs + r * ks + 2 * w) = v[j];
    }
}

// ws[n][k] = w[k][n0 + n] (zero past `cols`) for w (K, N) row-major: the nn operand transposed
// (loads first, as in lr_load_rows).
__device__ __forceinline__ void lr_load_cols(const lr_bf16* __restrict__ w, int ld, int cols,
                                             int n0, int k, int ks, lr_bf16* ws) {
    constexpr int PAIRS = LR_TILE / 2;  // words per row of the tile
    const int total = k * PAIRS;
    unsigned int v[LR_WORDS];
#pragma unroll
    for (int j = 0; j < LR_WORDS; ++j) {
        const int i = threadIdx.x + j * LR_THREADS, kk = i / PAIRS, n = 2 * (i % PAIRS);
        v[j] = 0;
        if (i < total && n0 + n < cols)
            v[j] = *reinterpret_cast<const unsigned int*>(w + (long long)kk * ld + n0 + n);
    }
#pragma unroll
    for (int j = 0; j < LR_WORDS; ++j) {
        const int i = threadIdx.x + j * LR_THREADS, kk = i / PAIRS, n = 2 * (i % PAIRS);
        if (i < total) {
            ws[n * ks + kk] = (lr_bf16)(v[j] & 0xffffu);
            ws[(n + 1) * ks + kk] = (lr_bf16)(v[j] >> 16);
        }
    }
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

// ys[r][c] (row stride LR_OUT_LD) = alpha (xs ws^T)[r][c] for the block's 128 x 128 tile.
__device__ __forceinline__ void lr_tile_product(const lr_bf16* xs, const lr_bf16* ws, int k,
                                                int ks, float alpha, lr_bf16* ys) {
#if LR_MMA
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int g = lane / 4, t = lane % 4;
    const int wr = (warp / 4) * 64, wc = (warp % 4) * 32;  // the warp's 64 x 32 of the tile
    float acc[4][4][4] = {};
    const unsigned int* x32 = reinterpret_cast<const unsigned int*>(xs);
    const unsigned int* w32 = reinterpret_cast<const unsigned int*>(ws);
    const int ks2 = ks / 2;
    for (int kk = 0; kk < k / 2; kk += 8) {  // 16 k per step, in 32-bit words
        unsigned int b[4][2];
        for (int j = 0; j < 4; ++j) {
            const unsigned int* col = w32 + (wc + 8 * j + g) * ks2 + kk + t;
            b[j][0] = col[0];
            b[j][1] = col[4];
        }
        for (int i = 0; i < 4; ++i) {
            const unsigned int* r = x32 + (wr + 16 * i + g) * ks2 + kk + t;
            const unsigned int a[4] = {r[0], r[8 * ks2], r[4], r[8 * ks2 + 4]};
            for (int j = 0; j < 4; ++j) lr_mma(acc[i][j], a, b[j][0], b[j][1]);
        }
    }
    __syncthreads();  // the operand tiles become the y tile
    for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 4; ++j)
            for (int h = 0; h < 2; ++h) {
                const int r = wr + 16 * i + g + 8 * h, c = wc + 8 * j + 2 * t;
                const unsigned int lo = lr_to_bf16(alpha * acc[i][j][2 * h]);
                const unsigned int hi = lr_to_bf16(alpha * acc[i][j][2 * h + 1]);
                *reinterpret_cast<unsigned int*>(ys + r * LR_OUT_LD + c) = lo | (hi << 16);
            }
#else
    float acc[LR_TILE * LR_TILE / LR_THREADS];
    for (int e = 0; e < LR_TILE * LR_TILE / LR_THREADS; ++e) {
        const int o = threadIdx.x + e * LR_THREADS, r = o / LR_TILE, c = o % LR_TILE;
        float s = 0.0f;
        for (int kk = 0; kk < k; ++kk) s += lr_f32(xs[r * ks + kk]) * lr_f32(ws[c * ks + kk]);
        acc[e] = s;
    }
    __syncthreads();
    for (int e = 0; e < LR_TILE * LR_TILE / LR_THREADS; ++e) {
        const int o = threadIdx.x + e * LR_THREADS;
        ys[(o / LR_TILE) * LR_OUT_LD + o % LR_TILE] = lr_to_bf16(alpha * acc[e]);
    }
#endif
    __syncthreads();
}

// y[m0 + r][n0 + c] = ys[r][c] in 16-byte stores (N and ldc multiples of 8, y 16-byte aligned).
__device__ __forceinline__ void lr_store(const lr_bf16* ys, lr_bf16* __restrict__ y, int ldc,
                                         int rows, int cols, int m0, int n0) {
    constexpr int CHUNKS = LR_TILE / 8;  // 16-byte chunks per tile row
    for (int i = threadIdx.x; i < LR_TILE * CHUNKS; i += LR_THREADS) {
        const int r = i / CHUNKS, c = 8 * (i % CHUNKS);
        if (m0 + r >= rows || n0 + c >= cols) continue;
        const uint4 v = *reinterpret_cast<const uint4*>(ys + r * LR_OUT_LD + c);
        *reinterpret_cast<uint4*>(y + (long long)(m0 + r) * ldc + n0 + c) = v;
    }
}

#define LR_EXPAND(NAME, LOAD_W)                                                                  \
    extern "C" __global__ void __launch_bounds__(LR_THREADS) NAME(                               \
        const lr_bf16* __restrict__ x, int lda, const lr_bf16* __restrict__ w, int ldb,          \
        lr_bf16* __restrict__ y, int ldc, int m, int n, int k, float alpha) {                    \
        __shared__ __align__(16) lr_bf16 smem[LR_SMEM_ELEMS];                                    \
        const int ks = k + LR_KPAD;                                                              \
        const int m0 = blockIdx.y * LR_TILE, n0 = blockIdx.x * LR_TILE;                          \
        lr_bf16 *xs = smem, *ws = smem + LR_TILE * ks;                                           \
        lr_load_rows(x, lda, m, m0, k, ks, xs);                                                  \
        LOAD_W;                                                                                  \
        __syncthreads();                                                                         \
        lr_tile_product(xs, ws, k, ks, alpha, smem);                                             \
        lr_store(smem, y, ldc, m, n, m0, n0);                                                    \
    }

// w (N, K): its rows are y's columns.
LR_EXPAND(lora_expand_nt, lr_load_rows(w, ldb, n, n0, k, ks, ws))
// w (K, N): transposed on the way in.
LR_EXPAND(lora_expand_nn, lr_load_cols(w, ldb, n, n0, k, ks, ws))
