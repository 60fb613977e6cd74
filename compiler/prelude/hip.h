// ftrt kernel prelude (HIP): the CUDA prelude's names over ROCm's types. Reductions use
// 32-lane segments of the wavefront so row kernels behave as on NVIDIA GPUs.
#include <hip/hip_runtime.h>
#include <hip/hip_bfloat16.h>
typedef hip_bfloat16 ftrt_t;

__device__ __forceinline__ float ftrt_ld(ftrt_t v) { return (float)v; }
__device__ __forceinline__ float ftrt_ld(float v) { return v; }
__device__ __forceinline__ int ftrt_ld(int v) { return v; }
__device__ __forceinline__ int ftrt_ld(unsigned char v) { return (int)v; }
__device__ __forceinline__ ftrt_t ftrt_to_t(float v) { return ftrt_t(v); }
__device__ __forceinline__ float ftrt_round_bf16(float v) { return (float)ftrt_t(v); }
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
// One exp per element while the running max holds (the common case).
__device__ __forceinline__ void ftrt_lse_push(float& m, float& s, float x) {
    if (x > m) { s = s * __expf(m - x) + 1.f; m = x; } else if (x != -INFINITY) { s += __expf(x - m); }
}
// 2^x (v_exp_f32 with its range handling).
__device__ __forceinline__ float ftrt_exp2_approx(float x) { return exp2f(x); }
template <int VEC> __device__ __forceinline__ void ftrt_load_vec(float* dst, const ftrt_t* src) {
#pragma unroll
    for (int i = 0; i < VEC; ++i) dst[i] = (float)src[i];
}
template <int VEC> __device__ __forceinline__ void ftrt_load_vec(float* dst, const float* src) {
#pragma unroll
    for (int i = 0; i < VEC; ++i) dst[i] = src[i];
}
template <int VEC> __device__ __forceinline__ void ftrt_store_vec(ftrt_t* dst, const float* src) {
#pragma unroll
    for (int i = 0; i < VEC; ++i) dst[i] = ftrt_t(src[i]);
}
template <int VEC> __device__ __forceinline__ void ftrt_store_vec(float* dst, const float* src) {
#pragma unroll
    for (int i = 0; i < VEC; ++i) dst[i] = src[i];
}

#define FTRT_SHFL_XOR(v, o) __shfl_xor((v), (o), 32)
#define FTRT_SHFL0(v) __shfl((v), 0, 32)
