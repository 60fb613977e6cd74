// NF4 dequantization with double-quantized absmax into bf16, the op `nf4::nf4_dequantize`
// (ops/src/nf4.rs: its math and CPU reference) with more work a thread:
//
//   w[i] = T(nf4[q_i] * (code2[absmax_q[i / 64]] * absmax2[i / 16384] + offset))
//
// The op's generated kernel gives each thread one chunk of 8 elements: a 4-byte load, a chain
// of two dependent loads for the block's absmax (absmax_q, then code2 at it), and, per block
// of 256 threads, the code table's load and a barrier before any of it. Here a thread takes
// NF4_CHUNKS chunks a block's width apart (each sub-step coalesced over the block), issues
// every chunk's independent loads before the dependent ones, and the table and barrier serve
// NF4_CHUNKS times the elements. Bit-exact with the op: the same f32 products (mul.ftz) and one
// rounding to bf16 each. CUDA C for NVRTC (sm_80+) and hipcc (gfx90a).

#if defined(__HIP_PLATFORM_AMD__) || defined(__HIPCC__)
#include <hip/hip_runtime.h>
// two floats -> bf16x2 (lo in the low half), each rounded to nearest even, NaN kept quiet
__device__ __forceinline__ unsigned nf4_bits(float f) {
    unsigned u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (u >> 16) | 0x40u;
    u += 0x7fffu + ((u >> 16) & 1u);
    return u >> 16;
}
__device__ __forceinline__ unsigned nf4_pack2(float lo, float hi) { return nf4_bits(lo) | (nf4_bits(hi) << 16); }
#else
#include <cuda_bf16.h>
// two floats -> bf16x2 (lo in the low half), one cvt.rn.bf16x2.f32
__device__ __forceinline__ unsigned nf4_pack2(float lo, float hi) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *(const unsigned*)&v;
}
#endif
#include "quant_prelude.cuh"

constexpr int NF4_THREADS = 256;
constexpr int NF4_CHUNKS = 4; // chunks of 8 elements a thread

// packed (N / 2) u8 (element 2i in the high nibble), absmax_q (N / 64) u8, absmax2
// (N / 16384, rounded up) f32, code2 (256) f32, nf4 (16) f32; w (N) bf16, N a multiple of 64.
// Grid ceil(N / 8 / (NF4_THREADS NF4_CHUNKS)), block NF4_THREADS.
extern "C" __global__ void __launch_bounds__(NF4_THREADS) nf4_dequantize_wide(
    long long n, float offset, const unsigned char* __restrict__ packed,
    const unsigned char* __restrict__ absmax_q, const float* __restrict__ absmax2,
    const float* __restrict__ code2, const float* __restrict__ nf4, unsigned short* __restrict__ w) {
    __shared__ float table[16];
    if (threadIdx.x < 16) table[threadIdx.x] = nf4[threadIdx.x];
    const long long chunks = n / 8;
    const long long first = (long long)blockIdx.x * NF4_THREADS * NF4_CHUNKS + threadIdx.x;
    unsigned bytes[NF4_CHUNKS];
    unsigned char q[NF4_CHUNKS];
    float am2[NF4_CHUNKS];
#pragma unroll
    for (int c = 0; c < NF4_CHUNKS; ++c) {
        const long long k = first + c * NF4_THREADS, b = k / 8;
        if (k < chunks) {
            bytes[c] = *(const unsigned*)(packed + 4 * k);
            q[c] = absmax_q[b];
            am2[c] = absmax2[b / 256];
        }
    }
    float am[NF4_CHUNKS];
#pragma unroll
    for (int c = 0; c < NF4_CHUNKS; ++c)
        if (first + c * NF4_THREADS < chunks) am[c] = ftrt_nf4_nested_absmax(code2, q[c], am2[c], offset);
    __syncthreads();
#pragma unroll
    for (int c = 0; c < NF4_CHUNKS; ++c) {
        const long long k = first + c * NF4_THREADS;
        if (k >= chunks) break;
        unsigned out[4];
#pragma unroll
        for (int p = 0; p < 4; ++p) {
            const unsigned byte = (bytes[c] >> (8 * p)) & 255u;
            out[p] = nf4_pack2(ftrt_mul_ftz(table[byte >> 4], am[c]), ftrt_mul_ftz(table[byte & 15u], am[c]));
        }
        *(uint4*)(w + 8 * k) = make_uint4(out[0], out[1], out[2], out[3]);
    }
}
