// ftrt kernel prelude (CUDA): element types, conversions, 16-byte vector access and row
// reductions used by every generated kernel. Arithmetic is f32; `ftrt_t` is the op's float
// type (bf16).
#include <cuda_bf16.h>
typedef __nv_bfloat16 ftrt_t;
#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)
#endif

__device__ __forceinline__ float ftrt_ld(ftrt_t v) { return __bfloat162float(v); }
__device__ __forceinline__ float ftrt_ld(float v) { return v; }
__device__ __forceinline__ int ftrt_ld(int v) { return v; }
__device__ __forceinline__ int ftrt_ld(unsigned char v) { return (int)v; }
__device__ __forceinline__ ftrt_t ftrt_to_t(float v) { return __float2bfloat16(v); }
__device__ __forceinline__ float ftrt_round_bf16(float v) { return __bfloat162float(__float2bfloat16(v)); }
__device__ __forceinline__ float ftrt_round_t(float v) { return ftrt_round_bf16(v); }
__device__ __forceinline__ float ftrt_sigmoid(float v) { return 1.f / (1.f + expf(-v)); }
template <typename A, typename B> __device__ __forceinline__ auto ftrt_max_i(A a, B b) -> decltype(a + b) { return a > b ? a : b; }
template <typename A, typename B> __device__ __forceinline__ auto ftrt_min_i(A a, B b) -> decltype(a + b) { return a < b ? a : b; }
template <typename A> __device__ __forceinline__ A ftrt_abs_i(A a) { return a < 0 ? -a : a; }
__device__ __forceinline__ float ftrt_logaddexp(float a, float b) {
    const float m = fmaxf(a, b);
    if (m == -INFINITY) return -INFINITY;
    return m + logf(expf(a - m) + expf(b - m));
}
// Online logsumexp: running max `m` and sum `s` of exp(x - m).
// One exp per element while the running max holds (the common case).
__device__ __forceinline__ void ftrt_lse_push(float& m, float& s, float x) {
    if (x > m) { s = s * __expf(m - x) + 1.f; m = x; } else if (x != -INFINITY) { s += __expf(x - m); }
}
// 2^x by the hardware approximation: what __expf(x) computes from x * log2(e).
__device__ __forceinline__ float ftrt_exp2_approx(float x) {
    float r;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
    return r;
}

// 16-byte vector access: VEC elements to/from f32 registers, 8 bf16 per 16 bytes.
template <int VEC> __device__ __forceinline__ void ftrt_load_vec(float* dst, const ftrt_t* src) {
    if (VEC % 8 == 0) {
#pragma unroll
        for (int v = 0; v < VEC; v += 8) {
            const uint4 raw = *reinterpret_cast<const uint4*>(src + v);
            const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
            for (int i = 0; i < 4; ++i) { const float2 f = __bfloat1622float2(h[i]); dst[v + 2 * i] = f.x; dst[v + 2 * i + 1] = f.y; }
        }
    } else {
#pragma unroll
        for (int i = 0; i < VEC; ++i) dst[i] = __bfloat162float(src[i]);
    }
}
template <int VEC> __device__ __forceinline__ void ftrt_load_vec(float* dst, const float* src) {
    if (VEC % 4 == 0) {
#pragma unroll
        for (int i = 0; i < VEC; i += 4) {
            const float4 f = *reinterpret_cast<const float4*>(src + i);
            dst[i] = f.x; dst[i + 1] = f.y; dst[i + 2] = f.z; dst[i + 3] = f.w;
        }
    } else {
#pragma unroll
        for (int i = 0; i < VEC; ++i) dst[i] = src[i];
    }
}
template <int VEC> __device__ __forceinline__ void ftrt_store_vec(ftrt_t* dst, const float* src) {
    if (VEC % 8 == 0) {
#pragma unroll
        for (int v = 0; v < VEC; v += 8) {
            uint4 raw;
            __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&raw);
#pragma unroll
            for (int i = 0; i < 4; ++i) h[i] = __floats2bfloat162_rn(src[v + 2 * i], src[v + 2 * i + 1]);
            *reinterpret_cast<uint4*>(dst + v) = raw;
        }
    } else {
#pragma unroll
        for (int i = 0; i < VEC; ++i) dst[i] = __float2bfloat16(src[i]);
    }
}
template <int VEC> __device__ __forceinline__ void ftrt_store_vec(float* dst, const float* src) {
    if (VEC % 4 == 0) {
#pragma unroll
        for (int i = 0; i < VEC; i += 4) *reinterpret_cast<float4*>(dst + i) = make_float4(src[i], src[i + 1], src[i + 2], src[i + 3]);
    } else {
#pragma unroll
        for (int i = 0; i < VEC; ++i) dst[i] = src[i];
    }
}

#define FTRT_SHFL_XOR(v, o) __shfl_xor_sync(0xffffffffu, (v), (o))
#define FTRT_SHFL0(v) __shfl_sync(0xffffffffu, (v), 0)
