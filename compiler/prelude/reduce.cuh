// Row reductions shared by the CUDA and HIP preludes. A row is TPR threads: one 32-lane
// segment (TPR == 32) or a whole block of TPR/32 segments. Every thread gets the result;
// partials combine in a fixed order, so results are the same bits on every run.
template <int TPR> __device__ __forceinline__ float ftrt_row_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += FTRT_SHFL_XOR(v, o);
    v = FTRT_SHFL0(v);  // lanes summed in different orders: take lane 0's bits everywhere
    if (TPR > 32) {
        __shared__ float part[TPR / 32];
        __syncthreads();
        if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = v;
        __syncthreads();
        v = 0.f;
#pragma unroll
        for (int i = 0; i < TPR / 32; ++i) v += part[i];
    }
    return v;
}
template <int TPR> __device__ __forceinline__ float ftrt_row_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, FTRT_SHFL_XOR(v, o));
    if (TPR > 32) {
        __shared__ float part[TPR / 32];
        __syncthreads();
        if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = v;
        __syncthreads();
        v = -INFINITY;
#pragma unroll
        for (int i = 0; i < TPR / 32; ++i) v = fmaxf(v, part[i]);
    }
    return v;
}
template <int TPR> __device__ __forceinline__ float ftrt_row_min(float v) {
    return -ftrt_row_max<TPR>(-v);
}
#define FTRT_LOG2E 1.4426950408889634f
// Online logsumexp of VEC values at once: m rises to their max (s rescaled by exp(m - m') once,
// when it does), then s += exp(x_k - m) for each, as 2^(x_k log2 e - m log2 e). While m is
// -inf every x so far is -inf and adds 0, not exp(-inf + inf) = NaN.
template <int VEC> __device__ __forceinline__ void ftrt_lse_push_vec(float& m, float& s, const float* x) {
    float mx = x[0];
#pragma unroll
    for (int k = 1; k < VEC; ++k) mx = fmaxf(mx, x[k]);
    if (mx > m) { s *= ftrt_exp2_approx((m - mx) * FTRT_LOG2E); m = mx; }
    const float ml = m == -INFINITY ? 0.f : m * FTRT_LOG2E;
    float e[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) e[k] = ftrt_exp2_approx(fmaf(x[k], FTRT_LOG2E, -ml));
    // Pairwise sum: a short dependency chain.
#pragma unroll
    for (int w = 1; w < VEC; w *= 2)
#pragma unroll
        for (int k = 0; k + w < VEC; k += 2 * w) e[k] += e[k + w];
    s += e[0];
}
// logsumexp of a row from per-thread online (max, sum) pairs: M = the row's max, then
// S = sum of s * exp(m - M) (one exp per thread, fixed order), result M + log S.
template <int TPR> __device__ __forceinline__ float ftrt_row_lse(float m, float s) {
    float mw = m;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) mw = fmaxf(mw, FTRT_SHFL_XOR(mw, o));
    float sw = mw == -INFINITY ? 0.f : s * ftrt_exp2_approx((m - mw) * FTRT_LOG2E);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) sw += FTRT_SHFL_XOR(sw, o);
    sw = FTRT_SHFL0(sw);  // lanes summed in different orders: take lane 0's bits everywhere
    if (TPR > 32) {
        __shared__ float pm[TPR / 32], ps[TPR / 32];
        __syncthreads();
        if ((threadIdx.x & 31) == 0) { pm[threadIdx.x >> 5] = mw; ps[threadIdx.x >> 5] = sw; }
        __syncthreads();
        mw = -INFINITY;
#pragma unroll
        for (int i = 0; i < TPR / 32; ++i) mw = fmaxf(mw, pm[i]);
        sw = 0.f;
        if (mw != -INFINITY) {
#pragma unroll
            for (int i = 0; i < TPR / 32; ++i) sw += ps[i] * ftrt_exp2_approx((pm[i] - mw) * FTRT_LOG2E);
        }
    }
    return mw == -INFINITY ? -INFINITY : mw + logf(sw);
}

// N consecutive bytes from src as ints, in 16-, 4- or 2-byte loads (src aligned to the load).
template <int N> __device__ __forceinline__ void ftrt_load_u8(int* dst, const unsigned char* src) {
    if (N % 16 == 0) {
#pragma unroll
        for (int v = 0; v < N; v += 16) {
            const uint4 q = *reinterpret_cast<const uint4*>(src + v);
            const unsigned w[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
            for (int i = 0; i < 16; ++i) dst[v + i] = (int)((w[i / 4] >> (8 * (i % 4))) & 255u);
        }
    } else if (N % 4 == 0) {
#pragma unroll
        for (int v = 0; v < N; v += 4) {
            const unsigned w = *reinterpret_cast<const unsigned*>(src + v);
#pragma unroll
            for (int i = 0; i < 4; ++i) dst[v + i] = (int)((w >> (8 * i)) & 255u);
        }
    } else if (N == 2) {
        const unsigned w = *reinterpret_cast<const unsigned short*>(src);
        dst[0] = (int)(w & 255u);
        dst[1] = (int)(w >> 8);
    } else {
#pragma unroll
        for (int i = 0; i < N; ++i) dst[i] = (int)src[i];
    }
}
