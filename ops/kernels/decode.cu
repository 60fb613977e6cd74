// Decoding with a KV cache: raw kernels (see ops/src/decode.rs for the layouts, the math and
// the CPU references).
//
// kv_store:          K, V rows of this step -> cache[slot][pos]. One block per (row, kv head),
//                    one thread per head-dim element.
// decode_attention:  one query row per sequence against its cached keys 0..len. One block per
//                    (sequence, kv head, 8 of its query heads), 128 threads, keys in chunks of
//                    128 with an online softmax across chunks (see the kernel's comment).
// sample_rows:       the next token per row of (rows, V) f32 logits: greedy (the largest value,
//                    the lowest index among equals, as the CPU `argmax`) or a Gumbel-max draw at
//                    a temperature. One block of 256 threads per row.
//
// Portable CUDA C (no inline PTX): NVRTC for sm_80+, hipcc for gfx90a.

#if defined(__HIP_PLATFORM_AMD__) || defined(__HIPCC__)
#include <hip/hip_runtime.h>
#define DEC_NEG_INF (-__builtin_huge_valf())
#define DEC_SHFL_XOR(v, m) __shfl_xor((v), (m))
#else
#define DEC_NEG_INF (__int_as_float(0xff800000))
#define DEC_SHFL_XOR(v, m) __shfl_xor_sync(0xffffffffu, (v), (m))
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

constexpr int DEC_MAX_G = 8;  // query heads per block (a kv head's group, split by 8s)
constexpr int DEC_WARPS = DEC_THREADS / 32;

// q (S, Hq, D); kc, vc (slots, T, Hkv, D); slot, len (S) i32; out (S, Hq, D).
// out[s, h] = sum_{t < len[s]} softmax_t(scale * q[s, h] . k[t]) v[t], k/v of kv head
// h / (Hq / Hkv) in cache slot slot[s]. Block (s, kv head, z) takes the group's query heads
// z*8 .. z*8+7 (G of them), so each K and V row is read once per block:
//   scores   thread t: key t0 + t of the chunk, G dot products from one K row (q in smem);
//   softmax  warp w: heads w, w + 4, ...: chunk max, running max/sum, p into smem;
//   P.V      warp w: keys t0 + w, t0 + w + 4, ...; lane: dims lane, lane + 32, ... of every
//            head (coalesced V rows), G x D/32 accumulators rescaled per chunk;
//   end      the 4 warps' partial sums merged in smem, divided by the running sum.
extern "C" __global__ void __launch_bounds__(DEC_THREADS, 1) decode_attention(
    const dec_bf16* __restrict__ q, const dec_bf16* __restrict__ kc,
    const dec_bf16* __restrict__ vc, const int* __restrict__ slot, const int* __restrict__ len,
    int hq, int hkv, int d, int t_max, float scale, dec_bf16* __restrict__ out) {
    __shared__ float qs[DEC_MAX_G][DEC_MAX_D];
    __shared__ float ps[DEC_MAX_G][DEC_THREADS];
    __shared__ float m_run[DEC_MAX_G], l_run[DEC_MAX_G], rescale[DEC_MAX_G];
    __shared__ float part[DEC_WARPS][DEC_MAX_G][DEC_MAX_D];
    const int s = blockIdx.x, kvh = blockIdx.y, tid = threadIdx.x;
    const int warp = tid / 32, lane = tid % 32;
    const int group = hq / hkv;
    const int h0 = kvh * group + blockIdx.z * DEC_MAX_G;
    const int g_n = min(DEC_MAX_G, group - (int)blockIdx.z * DEC_MAX_G);
    const int n = len[s];
    const int row = hkv * d; // per-slot offsets fit in 32 bits (T * Hkv * D < 2^31)
    const dec_bf16* kbase = kc + ((long long)slot[s] * t_max * hkv + kvh) * d;
    const dec_bf16* vbase = vc + ((long long)slot[s] * t_max * hkv + kvh) * d;
    for (int i = tid; i < g_n * d; i += DEC_THREADS)
        qs[i / d][i % d] = dec_to_f32(q[((long long)s * hq + h0 + i / d) * d + i % d]) * scale;
    if (tid < DEC_MAX_G) {
        m_run[tid] = DEC_NEG_INF;
        l_run[tid] = 0.f;
    }
    float acc[DEC_MAX_G][DEC_MAX_D / 32];
#pragma unroll
    for (int g = 0; g < DEC_MAX_G; ++g)
#pragma unroll
        for (int j = 0; j < DEC_MAX_D / 32; ++j) acc[g][j] = 0.f;
    __syncthreads();
    for (int t0 = 0; t0 < n; t0 += DEC_THREADS) {
        const int chunk = min(DEC_THREADS, n - t0);
        // Scores: one K row per thread, G dot products.
        if (tid < chunk) {
            const dec_bf16* kr = kbase + (t0 + tid) * row;
            float dot[DEC_MAX_G];
#pragma unroll
            for (int g = 0; g < DEC_MAX_G; ++g) dot[g] = 0.f;
            for (int c = 0; c < d; c += 2) {
                const unsigned int w = *reinterpret_cast<const unsigned int*>(kr + c);
                const float k0 = __uint_as_float(w << 16), k1 = __uint_as_float(w & 0xffff0000u);
#pragma unroll
                for (int g = 0; g < DEC_MAX_G; ++g)
                    if (g < g_n) dot[g] += qs[g][c] * k0 + qs[g][c + 1] * k1;
            }
#pragma unroll
            for (int g = 0; g < DEC_MAX_G; ++g)
                if (g < g_n) ps[g][tid] = dot[g];
        }
        __syncthreads();
        // Softmax statistics: warp w owns heads w, w + 4, ...
        for (int g = warp; g < g_n; g += DEC_WARPS) {
            float mx = DEC_NEG_INF;
            for (int j = lane; j < chunk; j += 32) mx = fmaxf(mx, ps[g][j]);
            for (int m = 16; m > 0; m >>= 1) mx = fmaxf(mx, DEC_SHFL_XOR(mx, m));
            const float m_new = fmaxf(m_run[g], mx);
            float sum = 0.f;
            for (int j = lane; j < chunk; j += 32) {
                const float p = __expf(ps[g][j] - m_new);
                ps[g][j] = p;
                sum += p;
            }
            for (int m = 16; m > 0; m >>= 1) sum += DEC_SHFL_XOR(sum, m);
            if (lane == 0) {
                const float r = __expf(m_run[g] - m_new); // 0 on the first chunk
                rescale[g] = r;
                l_run[g] = l_run[g] * r + sum;
                m_run[g] = m_new;
            }
        }
        __syncthreads();
        // P.V: warp w takes keys w, w + 4, ... of the chunk; lane the dims lane + 32 j.
#pragma unroll
        for (int g = 0; g < DEC_MAX_G; ++g) {
            const float r = g < g_n ? rescale[g] : 0.f;
#pragma unroll
            for (int j = 0; j < DEC_MAX_D / 32; ++j) acc[g][j] *= r;
        }
        for (int t = warp; t < chunk; t += DEC_WARPS) {
            const dec_bf16* vr = vbase + (t0 + t) * row;
            float v[DEC_MAX_D / 32];
#pragma unroll
            for (int j = 0; j < DEC_MAX_D / 32; ++j)
                v[j] = (lane + 32 * j < d) ? dec_to_f32(vr[lane + 32 * j]) : 0.f;
#pragma unroll
            for (int g = 0; g < DEC_MAX_G; ++g) {
                const float p = g < g_n ? ps[g][t] : 0.f;
#pragma unroll
                for (int j = 0; j < DEC_MAX_D / 32; ++j) acc[g][j] += p * v[j];
            }
        }
        __syncthreads();
    }
    // Merge the warps' partial sums.
#pragma unroll
    for (int g = 0; g < DEC_MAX_G; ++g)
#pragma unroll
        for (int j = 0; j < DEC_MAX_D / 32; ++j)
            if (g < g_n && lane + 32 * j < d) part[warp][g][lane + 32 * j] = acc[g][j];
    __syncthreads();
    for (int i = tid; i < g_n * d; i += DEC_THREADS) {
        const int g = i / d, e = i % d;
        float o = 0.f;
        for (int w = 0; w < DEC_WARPS; ++w) o += part[w][g][e];
        out[((long long)s * hq + h0 + g) * d + e] = dec_to_bf16(__fdividef(o, l_run[g])); // l >= 1
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

// logits (rows, V) f32 -> idx (rows) i32. inv_temp = 0: the first index of the row's largest
// logit (greedy). inv_temp > 0: argmax of x * inv_temp + g with g = -log(-log(u)) Gumbel noise,
// u = dec_uniform(seed, row * V + c): an exact draw from softmax(x / T) (Gumbel-max).
extern "C" __global__ void __launch_bounds__(256) sample_rows(
    const float* __restrict__ logits, long long v, float inv_temp,
    unsigned long long seed, int* __restrict__ idx) {
    __shared__ float best_v[256];
    __shared__ long long best_i[256];
    const long long row = blockIdx.x;
    const float* x = logits + row * v;
    float bv = DEC_NEG_INF;
    long long bi = v; // past the end: loses to any real index
    for (long long c = threadIdx.x; c < v; c += 256) {
        float val = x[c];
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
