// Decoding with a KV cache: raw kernels (see ops/src/decode.rs for the layouts, the math and
// the CPU references).
//
// kv_store:          K, V rows of this step -> cache[slot][pos]. One block per (row, kv head),
//                    one thread per head-dim element.
// decode_attention:  one query row per sequence against its cached keys 0..len. One block per
//                    (sequence, query head), 128 threads: keys in chunks of 128 (one key per
//                    thread: a dot product over D from a 16-byte-vectorised row), an online
//                    softmax across chunks, and the weighted sum of V rows with thread t owning
//                    dim t % D of key subset t / D (coalesced V reads), merged in shared memory.
// sample_rows:       the next token per row of (rows, V) bf16 logits: greedy (the largest value,
//                    the lowest index among equals, as the CPU `argmax`) or a Gumbel-max draw at
//                    a temperature. One block of 256 threads per row.
//
// Portable CUDA C (no inline PTX): NVRTC for sm_80+, hipcc for gfx90a.

#if defined(__HIP_PLATFORM_AMD__) || defined(__HIPCC__)
#include <hip/hip_runtime.h>
#define DEC_NEG_INF (-__builtin_huge_valf())
#define DEC_SHFL_XOR(v, m) __shfl_xor((v), (m))
#define DEC_WARP 64
#else
#define DEC_NEG_INF (__int_as_float(0xff800000))
#define DEC_SHFL_XOR(v, m) __shfl_xor_sync(0xffffffffu, (v), (m))
#define DEC_WARP 32
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

// q[0] * lo(w) + q[1] * hi(w): two bf16 packed in one 32-bit word (low half first).
__device__ __forceinline__ float dec_dot2(const float* q, unsigned int w) {
    return q[0] * __uint_as_float(w << 16) + q[1] * __uint_as_float(w & 0xffff0000u);
}

constexpr int DEC_THREADS = 128;
constexpr int DEC_MAX_D = 128;

// k_new, v_new (rows, Hkv, D); slot, pos (rows) i32; kc, vc (slots, T, Hkv, D).
extern "C" __global__ void __launch_bounds__(DEC_MAX_D) kv_store(
    const dec_bf16* __restrict__ k_new, const dec_bf16* __restrict__ v_new,
    const int* __restrict__ slot, const int* __restrict__ pos,
    int hkv, int d, int t_max, dec_bf16* __restrict__ kc, dec_bf16* __restrict__ vc) {
    const int row = blockIdx.x, h = blockIdx.y, e = threadIdx.x;
    if (e >= d) return;
    const long long src = ((long long)row * hkv + h) * d + e;
    const long long dst = (((long long)slot[row] * t_max + pos[row]) * hkv + h) * d + e;
    kc[dst] = k_new[src];
    vc[dst] = v_new[src];
}

__device__ __forceinline__ float dec_block_max(float v, float* red) {
    for (int m = DEC_WARP / 2; m > 0; m >>= 1) v = fmaxf(v, DEC_SHFL_XOR(v, m));
    const int warp = threadIdx.x / DEC_WARP, lane = threadIdx.x % DEC_WARP;
    __syncthreads();
    if (lane == 0) red[warp] = v;
    __syncthreads();
    float r = red[0];
    for (int w = 1; w < DEC_THREADS / DEC_WARP; ++w) r = fmaxf(r, red[w]);
    return r;
}

__device__ __forceinline__ float dec_block_sum(float v, float* red) {
    for (int m = DEC_WARP / 2; m > 0; m >>= 1) v += DEC_SHFL_XOR(v, m);
    const int warp = threadIdx.x / DEC_WARP, lane = threadIdx.x % DEC_WARP;
    __syncthreads();
    if (lane == 0) red[warp] = v;
    __syncthreads();
    float r = 0.f;
    for (int w = 0; w < DEC_THREADS / DEC_WARP; ++w) r += red[w];
    return r;
}

// q (S, Hq, D); kc, vc (slots, T, Hkv, D); slot, len (S) i32; out (S, Hq, D).
// out[s, h] = sum_{t < len[s]} softmax_t(scale * q[s, h] . k[t]) v[t], k/v of kv head
// h / (Hq / Hkv) in cache slot slot[s].
extern "C" __global__ void __launch_bounds__(DEC_THREADS, 1) decode_attention(
    const dec_bf16* __restrict__ q, const dec_bf16* __restrict__ kc,
    const dec_bf16* __restrict__ vc, const int* __restrict__ slot, const int* __restrict__ len,
    int hq, int hkv, int d, int t_max, float scale, dec_bf16* __restrict__ out) {
    __shared__ float qs[DEC_MAX_D];
    __shared__ float ps[DEC_THREADS];
    __shared__ float acc_s[DEC_THREADS];
    __shared__ float red[DEC_THREADS / 32];
    const int s = blockIdx.x, h = blockIdx.y, tid = threadIdx.x;
    const int kvh = h / (hq / hkv);
    const int n = len[s];
    const int head_stride = hkv * d; // per-slot offsets fit in 32 bits (T * Hkv * D < 2^31)
    const dec_bf16* kbase = kc + ((long long)slot[s] * t_max * hkv + kvh) * d;
    const dec_bf16* vbase = vc + ((long long)slot[s] * t_max * hkv + kvh) * d;
    const dec_bf16* qrow = q + ((long long)s * hq + h) * d;
    for (int e = tid; e < d; e += DEC_THREADS) qs[e] = dec_to_f32(qrow[e]) * scale;
    __syncthreads();
    // Output ownership: dim e = tid % d of the keys t = t0 + g, g = tid / d (groups of d).
    const int groups = DEC_THREADS / d;
    const int e = tid % d, g = tid / d;
    float m = DEC_NEG_INF, l = 0.f, acc = 0.f;
    for (int t0 = 0; t0 < n; t0 += DEC_THREADS) {
        // Scores of this chunk: thread tid owns key t0 + tid.
        const int t = t0 + tid;
        float x = DEC_NEG_INF;
        if (t < n) {
            const dec_bf16* kr = kbase + t * head_stride;
            float dot = 0.f;
            if ((d & 7) == 0) {
                for (int c = 0; c < d; c += 8) {
                    const uint4 raw = *reinterpret_cast<const uint4*>(kr + c);
                    dot += dec_dot2(qs + c, raw.x) + dec_dot2(qs + c + 2, raw.y) +
                           dec_dot2(qs + c + 4, raw.z) + dec_dot2(qs + c + 6, raw.w);
                }
            } else {
                for (int c = 0; c < d; ++c) dot += qs[c] * dec_to_f32(kr[c]);
            }
            x = dot;
        }
        const float m_new = fmaxf(m, dec_block_max(x, red));
        const float p = (t < n) ? __expf(x - m_new) : 0.f;
        const float rescale = __expf(m - m_new); // m = -inf on the first chunk: 0
        l = l * rescale + dec_block_sum(p, red);
        ps[tid] = p;
        __syncthreads();
        acc *= rescale;
        if (g < groups) {
            const int chunk = min(DEC_THREADS, n - t0);
            for (int j = g; j < chunk; j += groups)
                acc += ps[j] * dec_to_f32(vbase[(t0 + j) * head_stride + e]);
        }
        m = m_new;
        __syncthreads();
    }
    acc_s[tid] = (g < groups) ? acc : 0.f;
    __syncthreads();
    if (tid < d) {
        float o = 0.f;
        for (int j = 0; j < groups; ++j) o += acc_s[j * d + tid];
        out[((long long)s * hq + h) * d + tid] = dec_to_bf16(__fdividef(o, l)); // l >= 1
    }
}

// Counter-based uniform in (0, 1) from (seed, n): splitmix64's finaliser, top 24 bits.
__device__ __forceinline__ float dec_uniform(unsigned long long seed, unsigned long long n) {
    unsigned long long z = seed + (n + 1) * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    return ((float)(z >> 40) + 0.5f) * (1.0f / 16777216.0f);
}

// logits (rows, V) bf16 -> idx (rows) i32. inv_temp = 0: the first index of the row's largest
// logit (greedy). inv_temp > 0: argmax of x * inv_temp + g with g = -log(-log(u)) Gumbel noise,
// u = dec_uniform(seed, row * V + c): an exact draw from softmax(x / T) (Gumbel-max).
extern "C" __global__ void __launch_bounds__(256) sample_rows(
    const dec_bf16* __restrict__ logits, long long v, float inv_temp,
    unsigned long long seed, int* __restrict__ idx) {
    __shared__ float best_v[256];
    __shared__ long long best_i[256];
    const long long row = blockIdx.x;
    const dec_bf16* x = logits + row * v;
    float bv = DEC_NEG_INF;
    long long bi = v; // past the end: loses to any real index
    for (long long c = threadIdx.x; c < v; c += 256) {
        float val = dec_to_f32(x[c]);
        if (inv_temp > 0.f) val = val * inv_temp - logf(-logf(dec_uniform(seed, row * v + c)));
        if (val > bv || (bi == v && !(val < bv))) { // first in this thread's order
            bv = val;
            bi = c;
        }
    }
    best_v[threadIdx.x] = bv;
    best_i[threadIdx.x] = bi;
    __syncthreads();
    for (int half = 128; half > 0; half >>= 1) {
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
