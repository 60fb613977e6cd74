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
// ---- quant_prelude.cuh ----
// quant_prelude.cuh: bitsandbytes-compatible quantization device functions.
//
// Mirrors ops/src/quant_prelude.rs (the CPU reference) function for function; both follow the
// arithmetic of bitsandbytes' CUDA kernels (dQuantizeNF4, dQuantize<0>, kQuantizeBlockwise,
// kDequantizeBlockwise), built with --use_fast_math (subnormals flushed to zero). The algorithm
// and its caveats are in ops/fixtures/BNB_NOTES.md.
//
// Plain C, no headers: compiles with NVRTC (compute_80) and hipcc. Kernels that include it
// may be built with or without -ftz; the ftz behaviour is emulated explicitly.
//
// Reciprocal: bitsandbytes' `1.0f / absmax` compiles to rcp.approx.ftz.f32. By default this
// header uses the correctly rounded reciprocal (bit-identical to the Rust reference); define
// FTRT_BNB_RCP_APPROX to use rcp.approx.ftz.f32 exactly as bitsandbytes' binary does (CUDA only).
#ifndef FTRT_QUANT_PRELUDE_CUH
#define FTRT_QUANT_PRELUDE_CUH

#define FTRT_F32_MIN_NORMAL 1.17549435e-38f

// Flush a subnormal to a zero of the same sign.
__device__ __forceinline__ float ftrt_ftz(float x) {
    return (x != 0.0f && fabsf(x) < FTRT_F32_MIN_NORMAL) ? copysignf(0.0f, x) : x;
}

// mul.ftz.f32: subnormal inputs and a subnormal result flushed to signed zero (on NVIDIA the
// instruction itself, as bitsandbytes' fast-math build emits it).
__device__ __forceinline__ float ftrt_mul_ftz(float a, float b) {
#if defined(__HIPCC__)
    return ftrt_ftz(ftrt_ftz(a) * ftrt_ftz(b));
#else
    float r;
    asm("mul.rn.ftz.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
    return r;
#endif
}

// 1.0f / absmax as bitsandbytes computes it (see header comment).
__device__ __forceinline__ float ftrt_bnb_recip(float a) {
#if defined(FTRT_BNB_RCP_APPROX) && !defined(__HIPCC__)
    float r;
    asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(a));
    return r;
#elif defined(__HIPCC__)
    return ftrt_ftz(1.0f / ftrt_ftz(a));
#else
    return ftrt_ftz(__frcp_rn(ftrt_ftz(a)));
#endif
}

// NF4 4-bit index of x (x already multiplied by the reciprocal of the block absmax):
// bitsandbytes' dQuantizeNF4 decision tree, strict '>' (a value on a threshold goes down;
// NaN gives 0). The thresholds are the f32 midpoints of adjacent NF4 code values.
__device__ __forceinline__ int ftrt_nf4_index(float x) {
    if (x > 0.03979014977812767f)
        if (x > 0.3893125355243683f)
            if (x > 0.6427869200706482f)
                if (x > 0.8614784181118011f) return 15;
                else return 14;
            else if (x > 0.5016634166240692f) return 13;
            else return 12;
        else if (x > 0.2035212516784668f)
            if (x > 0.2920137718319893f) return 11;
            else return 10;
        else if (x > 0.1202552504837513f) return 9;
        else return 8;
    else if (x > -0.33967943489551544f)
        if (x > -0.13791173323988914f)
            if (x > -0.045525018125772476f) return 7;
            else return 6;
        else if (x > -0.23460740596055984f) return 5;
        else return 4;
    else if (x > -0.6106329262256622f)
        if (x > -0.4599952697753906f) return 3;
        else return 2;
    else if (x > -0.8480964004993439f) return 1;
    else return 0;
}

// NF4 code value of a 4-bit index (bitsandbytes' get_4bit_type("nf4") / dDequantizeNF4).
__device__ __forceinline__ float ftrt_nf4_value(int i) {
    if (i & 8)
        if (i & 4)
            if (i & 2)
                if (i & 1) return 1.0f;
                else return 0.7229568362236023f;
            else if (i & 1) return 0.5626170039176941f;
            else return 0.44070982933044434f;
        else if (i & 2)
            if (i & 1) return 0.33791524171829224f;
            else return 0.24611230194568634f;
        else if (i & 1) return 0.16093020141124725f;
        else return 0.07958029955625534f;
    else if (i & 4)
        if (i & 2)
            if (i & 1) return 0.0f;
            else return -0.09105003625154495f;
        else if (i & 1) return -0.18477343022823334f;
        else return -0.28444138169288635f;
    else if (i & 2)
        if (i & 1) return -0.39491748809814453f;
        else return -0.5250730514526367f;
    else if (i & 1) return -0.6961928009986877f;
    else return -1.0f;
}

// bitsandbytes' dQuantize<0>: nearest entry of a sorted 256-entry code by a 7-step binary
// search from pivot 127, then a midpoint test against the neighbour on x's side
// ((a + b) * 0.5f in f32); a midpoint tie goes to the even index; NaN gives 0.
__device__ __forceinline__ int ftrt_dynamic_index(const float* code, float x) {
    int pivot = 127;
    int upper_pivot = 255;
    int lower_pivot = 0;
    float lower = -1.0f;
    float upper = 1.0f;
    float val = code[pivot];
    for (int i = 64; i > 0; i >>= 1) {
        if (x > val) {
            lower_pivot = pivot;
            lower = val;
            pivot += i;
        } else {
            upper_pivot = pivot;
            upper = val;
            pivot -= i;
        }
        val = code[pivot];
    }
    if (upper_pivot == 255) upper = code[upper_pivot];
    if (lower_pivot == 0) lower = code[lower_pivot];
    if (x > val) {
        float midpoint = ftrt_mul_ftz(ftrt_ftz(upper + val), 0.5f);
        return (x > midpoint) ? upper_pivot : pivot;
    } else {
        float midpoint = ftrt_mul_ftz(ftrt_ftz(lower + val), 0.5f);
        return (x < midpoint) ? lower_pivot : pivot;
    }
}

// One NF4 byte: elements (x0, x1) of a block with reciprocal absmax r; x0 in the high nibble.
__device__ __forceinline__ unsigned char ftrt_nf4_pack2(float x0, float x1, float r) {
    return (unsigned char)((ftrt_nf4_index(ftrt_mul_ftz(x0, r)) << 4) | ftrt_nf4_index(ftrt_mul_ftz(x1, r)));
}

// Dequantized value of nibble q in a block with (f32) absmax: code[q] * absmax, in f32.
// bitsandbytes stores it in the output dtype (bf16: round to nearest even).
__device__ __forceinline__ float ftrt_nf4_dequant(int q, float absmax) {
    return ftrt_mul_ftz(ftrt_nf4_value(q), absmax);
}

// The block absmax as the double-quantized state gives it: code2[q] * absmax2 + offset.
__device__ __forceinline__ float ftrt_nf4_nested_absmax(const float* code2, unsigned char q, float absmax2, float offset) {
    return ftrt_mul_ftz(code2[q], absmax2) + offset;
}

#endif  // FTRT_QUANT_PRELUDE_CUH
// ---- end of quant_prelude.cuh ----

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
