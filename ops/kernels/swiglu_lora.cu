// SwiGLU of LoRA-adapted gate and up projections, with the rank-r terms applied here instead of
// by rank-r GEMMs over the (N, I) outputs (see ops/src/swiglu_lora.rs for the math, the
// rounding and the CPU references).
//
// swiglu_lora_forward:   h = T(T(silu(g)) u) of g = T(g0 + T(s xa_g . Bg[i])), u likewise
// swiglu_lora_backward:  dg, du (and h when `h` is not null) of the same g and u, from
//                        dh = T(dh0 + T(dxa . A[:, i]))
//
// CUDA (sm_80+): a warp owns 32 columns and walks 16-row tiles. The rank-r terms of a tile are
// four mma.sync.m16n8k16 (A: the x rows, B: the factor's columns, loaded once), staged as bf16
// in shared memory (the accumulator fragment's layout is not the rows'); then each lane reads
// them back and finishes 8-column rows with 16-byte loads and stores of the (N, I) tensors,
// whose loads it issued before the products, adding, multiplying and rounding bf16 pairs with
// one fma.rn.bf16x2 each (f32 only for the sigmoids and dg's last factors). A block is 4 warps
// side by side (128 columns) over 64 rows; 8 blocks an SM in the forward (64 registers), 6 in
// the backward (80): occupancy, not the loads' order, hides these kernels' memory latency.
// HIP (gfx90a): one thread an element, the same math on the CUDA cores.
// r is 8 or 16 (CUDA: one m16n8k16 step); x rows (stride, first column) and factors 4-byte
// aligned.

#if defined(__HIP_PLATFORM_AMD__) || defined(__HIPCC__)
#include <hip/hip_runtime.h>
#define SL_HIP 1
#else
#include <cuda_bf16.h>
#endif

typedef unsigned short sl_bf16;

// One rank-r product: x (rows, ldx) bf16, row n's rank k at x[n ldx + k] (x already offset to
// its first column); the factor's column i, rank k at w[i wc + k wk] (B (I, r): wc = r,
// wk = 1; A (r, I): wc = 1, wk = I). x null: no product (the term is zero).
struct SlProduct {
    const sl_bf16* x;
    long long ldx;
    const sl_bf16* w;
    long long wc, wk;
};

__device__ __forceinline__ float sl_lo(unsigned w) { return __uint_as_float(w << 16); }
__device__ __forceinline__ float sl_hi(unsigned w) { return __uint_as_float(w & 0xffff0000u); }

#ifdef SL_HIP
// Round to nearest even, NaN kept quiet (as __float2bfloat16_rn).
__device__ __forceinline__ unsigned sl_bits(float f) {
    unsigned u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (u >> 16) | 0x40u;
    u += 0x7fffu + ((u >> 16) & 1u);
    return u >> 16;
}
__device__ __forceinline__ float sl_round(float f) { return __uint_as_float(sl_bits(f) << 16); }
__device__ __forceinline__ float sl_sigmoid(float v) { return 1.f / (1.f + expf(-v)); }

// g or u with its rank-r term: T(base + T(s term)).
__device__ __forceinline__ float sl_adapted(float base, float term, float s) {
    return sl_round(base + sl_round(s * term));
}

// h, and in the backward dg and du, of one element (the math of ops::activation::swiglu).
__device__ __forceinline__ float sl_h(float g, float u) { return sl_round(g * sl_sigmoid(g)) * u; }
__device__ __forceinline__ void sl_grads(float g, float u, float dh, float& dg, float& du, float& h) {
    const float sg = sl_sigmoid(g), silu = sl_round(g * sg);
    dg = sl_round(dh * u) * sg * (1.f + g * (1.f - sg));
    du = dh * silu;
    h = silu * u;
}
#else
// two floats -> bf16x2, lo in the low half
__device__ __forceinline__ unsigned sl_pack2(float lo, float hi) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *(const unsigned*)&v;
}
// the fast exp and reciprocal (a few f32 ulps from 1 / (1 + expf(-v)), far below bf16's)
__device__ __forceinline__ float sl_sigmoid(float v) { return __fdividef(1.f, 1.f + __expf(-v)); }
#endif

#ifndef SL_HIP

constexpr int SL_WARPS = 4;           // a block's warps, side by side
constexpr int SL_NT = 4;              // n-tiles of 8 columns a warp: 32 columns
constexpr int SL_BLOCK_COLS = SL_WARPS * SL_NT * 8;
constexpr int SL_TILES = 4;           // 16-row tiles a block walks
constexpr int SL_BLOCK_ROWS = 16 * SL_TILES;
constexpr int SL_LD = 8 * SL_NT + 8;  // row stride (bf16) of a warp's staged terms: 80 bytes,
                                      // so the fragment stores hit 32 distinct banks
constexpr int SL_VECS = 2;            // 16-byte vectors a lane of a tensor's 16 x 32 tile

__device__ __forceinline__ unsigned sl_ld32(const sl_bf16* p) { return *(const unsigned*)p; }

// ranks k, k + 1 of the factor's column `col`, as a bf16 pair (k in the low half)
__device__ __forceinline__ unsigned sl_factor_pair(const SlProduct& p, int col, int k) {
    if (p.wk == 1) return sl_ld32(p.w + col * p.wc + k);
    const unsigned lo = p.w[col * p.wc + k * p.wk], hi = p.w[col * p.wc + (k + 1) * p.wk];
    return lo | (hi << 16);
}

// The B fragments of the factor for the warp's 32 columns from col0 (ranks 0..r, r <= 16):
// lane = 4 g + t holds ranks 2 t, + 1 and 2 t + 8, + 9 of column col0 + 8 j + g.
__device__ __forceinline__ void sl_factor_frags(const SlProduct& p, int r, int col0, int I,
                                                uint2 (&f)[SL_NT]) {
    const int l = threadIdx.x & 31, g = l >> 2, t = l & 3;
#pragma unroll
    for (int j = 0; j < SL_NT; ++j) {
        const int col = col0 + 8 * j + g;
        const bool in = p.x != nullptr && col < I;
        f[j] = make_uint2(in ? sl_factor_pair(p, col, 2 * t) : 0u,
                          in && r > 8 ? sl_factor_pair(p, col, 8 + 2 * t) : 0u);
    }
}

// T(scale sum_k x[row][k] w[col][k]) for the warp's 16-row tile from row0 and its 32 columns,
// into `tile` (16 rows of SL_LD bf16): four mma.sync.m16n8k16 (A: the x rows, B: the factor's
// fragments `f`), each lane storing its accumulator fragment (rows g and g + 8, columns 8 j +
// 2 t, + 1; lane = 4 g + t) as bf16 pairs.
__device__ __forceinline__ void sl_stage_terms(const SlProduct& p, int r, const uint2 (&f)[SL_NT],
                                               float scale, int row0, int n, sl_bf16* tile) {
    const int l = threadIdx.x & 31, g = l >> 2, t = l & 3;
    const int ra = row0 + g, rb = ra + 8;
    const bool upper = r > 8; // ranks 8 .. 15
    const sl_bf16* xa = p.x + ra * p.ldx + 2 * t;
    const sl_bf16* xb = p.x + rb * p.ldx + 2 * t;
    const unsigned a0 = ra < n ? sl_ld32(xa) : 0u, a1 = rb < n ? sl_ld32(xb) : 0u;
    const unsigned a2 = ra < n && upper ? sl_ld32(xa + 8) : 0u;
    const unsigned a3 = rb < n && upper ? sl_ld32(xb + 8) : 0u;
#pragma unroll
    for (int j = 0; j < SL_NT; ++j) {
        const uint2 b = f[j];
        float acc[4] = {0.f, 0.f, 0.f, 0.f};
        asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
            "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
            : "+f"(acc[0]), "+f"(acc[1]), "+f"(acc[2]), "+f"(acc[3])
            : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b.x), "r"(b.y));
        unsigned* at = (unsigned*)(tile + g * SL_LD + 8 * j + 2 * t);
        at[0] = sl_pack2(scale * acc[0], scale * acc[1]);
        at[4 * SL_LD] = sl_pack2(scale * acc[2], scale * acc[3]); // row g + 8
    }
}

// The warp's 16 x 32 tile as 16-byte vectors: lane l takes rows l / 4 + 8 q (q < 2), columns
// 8 (l % 4) .. + 7.
struct SlTile {
    int row0, col, n, I;
    __device__ __forceinline__ SlTile(int row0_, int col0, int n_, int I_)
        : row0(row0_), col(col0 + 8 * (threadIdx.x & 3)), n(n_), I(I_) {}
    __device__ __forceinline__ int row(int q) const { return ((threadIdx.x & 31) >> 2) + 8 * q; }
    __device__ __forceinline__ bool ok(int q) const { return row0 + row(q) < n && col < I; }
    __device__ __forceinline__ long long at(int q) const { return (long long)(row0 + row(q)) * I + col; }
    __device__ __forceinline__ void load(const sl_bf16* x, uint4 (&v)[SL_VECS]) const {
#pragma unroll
        for (int q = 0; q < SL_VECS; ++q)
            if (ok(q)) v[q] = *(const uint4*)(x + at(q));
    }
    // the staged terms of the thread's vector q (zeros without a product)
    __device__ __forceinline__ uint4 term(const sl_bf16* tile, bool has, int q) const {
        return has ? *(const uint4*)(tile + row(q) * SL_LD + 8 * (threadIdx.x & 3))
                   : make_uint4(0u, 0u, 0u, 0u);
    }
    __device__ __forceinline__ void store(sl_bf16* x, int q, const uint4 v) const {
        if (ok(q)) *(uint4*)(x + at(q)) = v;
    }
};

// Packed bf16 pairs (lo in the low half), each lane rounded once to nearest even as fma.rn
// rounds: T(a + b) (a 1 + b) and T(a b) (a b + -0), equal to the f32 sum or product of the two
// bf16 values rounded to bf16 (the product is exact in f32; the sum is, or its f32 rounding
// is far below a bf16 ulp).
__device__ __forceinline__ unsigned sl_add2(unsigned a, unsigned b) {
    unsigned d;
    asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(0x3f803f80u), "r"(b));
    return d;
}
__device__ __forceinline__ unsigned sl_mul2(unsigned a, unsigned b) {
    unsigned d;
    asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(0x80008000u));
    return d;
}
__device__ __forceinline__ uint4 sl_add8(const uint4 a, const uint4 b) {
    return make_uint4(sl_add2(a.x, b.x), sl_add2(a.y, b.y), sl_add2(a.z, b.z), sl_add2(a.w, b.w));
}

// T(silu(g)) of a pair of g, and the pair's sigmoids
__device__ __forceinline__ unsigned sl_silu2(unsigned g, float& sa, float& sb) {
    const float ga = sl_lo(g), gb = sl_hi(g);
    sa = sl_sigmoid(ga);
    sb = sl_sigmoid(gb);
    return sl_pack2(ga * sa, gb * sb);
}

// h = T(T(silu(g)) u) of 8 packed g and u
__device__ __forceinline__ uint4 sl_h8(const uint4 g, const uint4 u) {
    const unsigned gw[4] = {g.x, g.y, g.z, g.w}, uw[4] = {u.x, u.y, u.z, u.w};
    unsigned h[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        float sa, sb;
        h[i] = sl_mul2(sl_silu2(gw[i], sa, sb), uw[i]);
    }
    return make_uint4(h[0], h[1], h[2], h[3]);
}

// dg, du and h of 8 packed g, u and dh (sl_grads's math, the bf16 products packed)
__device__ __forceinline__ void sl_grads8(const uint4 g, const uint4 u, const uint4 dh, uint4& dg,
                                          uint4& du, uint4& h) {
    const unsigned gw[4] = {g.x, g.y, g.z, g.w}, uw[4] = {u.x, u.y, u.z, u.w};
    const unsigned dw[4] = {dh.x, dh.y, dh.z, dh.w};
    unsigned dgw[4], duw[4], hw[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        float sa, sb;
        const unsigned silu = sl_silu2(gw[i], sa, sb), dhu = sl_mul2(dw[i], uw[i]);
        const float ga = sl_lo(gw[i]), gb = sl_hi(gw[i]);
        dgw[i] = sl_pack2(sl_lo(dhu) * sa * (1.f + ga * (1.f - sa)),
                          sl_hi(dhu) * sb * (1.f + gb * (1.f - sb)));
        duw[i] = sl_mul2(dw[i], silu);
        hw[i] = sl_mul2(silu, uw[i]);
    }
    dg = make_uint4(dgw[0], dgw[1], dgw[2], dgw[3]);
    du = make_uint4(duw[0], duw[1], duw[2], duw[3]);
    h = make_uint4(hw[0], hw[1], hw[2], hw[3]);
}

// The walk both kernels share: the block's 64 rows of its warp's 32 columns, 16 rows at a
// time. Product k's factor fragments are loaded once; per tile, each of the NP (n, I) tensors
// `base[k]` is loaded (2 vectors a lane), product k's terms T(scale[k] x . w) are staged in
// `terms[k]` (zeros without a product), and `finish(tile, q, v)` gets each vector q of the sums
// T(base + term) as packed bf16.
template <int NP, class Finish>
__device__ __forceinline__ void sl_walk(const sl_bf16* const (&base)[NP], const SlProduct (&p)[NP],
                                        const float (&scale)[NP], int r, int n, int I,
                                        sl_bf16 (&terms)[NP][16 * SL_LD], Finish finish) {
    const int col0 = blockIdx.x * SL_BLOCK_COLS + (threadIdx.x >> 5) * 8 * SL_NT;
    uint2 frags[NP][SL_NT];
#pragma unroll
    for (int k = 0; k < NP; ++k) sl_factor_frags(p[k], r, col0, I, frags[k]);
#pragma unroll 1
    for (int it = 0; it < SL_TILES; ++it) {
        const int row0 = blockIdx.y * SL_BLOCK_ROWS + 16 * it;
        if (row0 >= n) break;
        const SlTile tile(row0, col0, n, I);
        uint4 v[NP][SL_VECS];
#pragma unroll
        for (int k = 0; k < NP; ++k) tile.load(base[k], v[k]);
#pragma unroll
        for (int k = 0; k < NP; ++k)
            if (p[k].x) sl_stage_terms(p[k], r, frags[k], scale[k], row0, n, terms[k]);
        __syncwarp();
#pragma unroll
        for (int q = 0; q < SL_VECS; ++q) {
            uint4 sum[NP];
#pragma unroll
            for (int k = 0; k < NP; ++k) sum[k] = sl_add8(v[k][q], tile.term(terms[k], p[k].x != nullptr, q));
            finish(tile, q, sum);
        }
        __syncwarp(); // the next tile's terms overwrite the stage
    }
}

// g0, u0, h (n, I) bf16; gate's and up's rank-r products (x: xa from gate's / up's first
// column, w: Bg / Bu (I, r)). Grid (ceil(I / 128), ceil(n / 64)), block 128.
extern "C" __global__ void __launch_bounds__(32 * SL_WARPS, 8) swiglu_lora_forward(
    const sl_bf16* __restrict__ g0, const sl_bf16* __restrict__ u0, SlProduct pg, SlProduct pu,
    int r, float s, int n, int I, sl_bf16* __restrict__ h) {
    __shared__ __align__(16) sl_bf16 staged[SL_WARPS][2][16 * SL_LD];
    const sl_bf16* const base[2] = {g0, u0};
    const SlProduct p[2] = {pg, pu};
    const float scale[2] = {s, s};
    sl_walk(base, p, scale, r, n, I, staged[threadIdx.x >> 5],
            [&](const SlTile& tile, int q, const uint4 (&gu)[2]) { tile.store(h, q, sl_h8(gu[0], gu[1])); });
}

// As swiglu_lora_forward, backward: dh0 (n, I) and down's rank-r product (x: dxa (n, r), w: A
// (r, I)) give dh; out dg, du and, when h is not null, the forward's h.
extern "C" __global__ void __launch_bounds__(32 * SL_WARPS, 6) swiglu_lora_backward(
    const sl_bf16* __restrict__ g0, const sl_bf16* __restrict__ u0, SlProduct pg, SlProduct pu,
    const sl_bf16* __restrict__ dh0, SlProduct pd, int r, float s, int n, int I,
    sl_bf16* __restrict__ dg, sl_bf16* __restrict__ du, sl_bf16* __restrict__ h) {
    __shared__ __align__(16) sl_bf16 staged[SL_WARPS][3][16 * SL_LD];
    const sl_bf16* const base[3] = {g0, u0, dh0};
    const SlProduct p[3] = {pg, pu, pd};
    const float scale[3] = {s, s, 1.f};
    sl_walk(base, p, scale, r, n, I, staged[threadIdx.x >> 5],
            [&](const SlTile& tile, int q, const uint4 (&gud)[3]) {
                uint4 dgq, duq, hq;
                sl_grads8(gud[0], gud[1], gud[2], dgq, duq, hq);
                tile.store(dg, q, dgq);
                tile.store(du, q, duq);
                if (h != nullptr) tile.store(h, q, hq);
            });
}

#else // SL_HIP: one thread an element, grid (ceil(n I / 256)), block 256

__device__ float sl_term(const SlProduct& p, int r, long long row, long long col) {
    if (p.x == nullptr) return 0.f;
    float acc = 0.f;
    for (int k = 0; k < r; ++k)
        acc = fmaf(sl_lo(p.x[row * p.ldx + k]), sl_lo(p.w[col * p.wc + k * p.wk]), acc);
    return acc;
}

extern "C" __global__ void __launch_bounds__(256) swiglu_lora_forward(
    const sl_bf16* __restrict__ g0, const sl_bf16* __restrict__ u0, SlProduct pg, SlProduct pu,
    int r, float s, int n, int I, sl_bf16* __restrict__ h) {
    const long long e = (long long)blockIdx.x * 256 + threadIdx.x;
    if (e >= (long long)n * I) return;
    const long long row = e / I, col = e % I;
    const float g = sl_adapted(sl_lo(g0[e]), sl_term(pg, r, row, col), s);
    const float u = sl_adapted(sl_lo(u0[e]), sl_term(pu, r, row, col), s);
    h[e] = (sl_bf16)sl_bits(sl_h(g, u));
}

extern "C" __global__ void __launch_bounds__(256) swiglu_lora_backward(
    const sl_bf16* __restrict__ g0, const sl_bf16* __restrict__ u0, SlProduct pg, SlProduct pu,
    const sl_bf16* __restrict__ dh0, SlProduct pd, int r, float s, int n, int I,
    sl_bf16* __restrict__ dg, sl_bf16* __restrict__ du, sl_bf16* __restrict__ h) {
    const long long e = (long long)blockIdx.x * 256 + threadIdx.x;
    if (e >= (long long)n * I) return;
    const long long row = e / I, col = e % I;
    const float g = sl_adapted(sl_lo(g0[e]), sl_term(pg, r, row, col), s);
    const float u = sl_adapted(sl_lo(u0[e]), sl_term(pu, r, row, col), s);
    const float dh = sl_adapted(sl_lo(dh0[e]), sl_term(pd, r, row, col), 1.f);
    float dgv, duv, hv;
    sl_grads(g, u, dh, dgv, duv, hv);
    dg[e] = (sl_bf16)sl_bits(dgv);
    du[e] = (sl_bf16)sl_bits(duv);
    if (h != nullptr) h[e] = (sl_bf16)sl_bits(hv);
}

#endif
