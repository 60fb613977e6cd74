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
// logsumexp of a row from per-thread online (max, sum) pairs.
template <int TPR> __device__ __forceinline__ float ftrt_row_lse(float m, float s) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) ftrt_lse_merge(m, s, FTRT_SHFL_XOR(m, o), FTRT_SHFL_XOR(s, o));
    m = FTRT_SHFL0(m);
    s = FTRT_SHFL0(s);
    if (TPR > 32) {
        __shared__ float pm[TPR / 32], ps[TPR / 32];
        __syncthreads();
        if ((threadIdx.x & 31) == 0) { pm[threadIdx.x >> 5] = m; ps[threadIdx.x >> 5] = s; }
        __syncthreads();
        m = -INFINITY; s = 0.f;
#pragma unroll
        for (int i = 0; i < TPR / 32; ++i) ftrt_lse_merge(m, s, pm[i], ps[i]);
    }
    return m == -INFINITY ? -INFINITY : m + logf(s);
}
