// Memory-bound work next to a power-limited GEMM: serial against concurrent.
//
// At the H200's 700 W limit a step's GEMMs run at the clock the power leaves (session 11), and
// its memory-bound kernels (the rank-16 LoRA products, SwiGLU, norms, cross-entropy: ~58 of
// the 1B lean step's 232 ms, session 13) run between them at HBM speed, drawing less power.
// The question: does a memory-bound kernel on a second stream, next to a GEMM held to fewer
// SMs (cuBLASLt's SM_COUNT_TARGET), finish the same work in less time than running them one
// after the other? If so, the step's memory-bound kernels could hide under its GEMMs.
//
// Work per iteration: one bf16 GEMM of the 1B's gate/up shape (Y (16384, 8192) = X (16384,
// 2048) W^T, f32 accumulation; 550 GFLOP) and one SwiGLU-like pass (out = silu(g) u over 2^27
// bf16 elements: 768 MiB of traffic). Phases, each ITERS iterations after a warm-up so the
// power limit holds (mean power and SM clock from NVML, polled every 20 ms):
//   gemm alone, mem alone, serial (one stream, gemm then mem), and concurrent for k = 8, 16, 32:
//   the GEMM on stream 1 with SM_COUNT_TARGET = SMs - k, the memory kernel on stream 2 with
//   k x 8 blocks of 256 threads, joined at the end.
// Build and run on the GPU machine:
//   nvcc -O3 -arch=sm_90 benches/overlap_probe.cu -lcublasLt -ldl -o /tmp/olp && /tmp/olp [ITERS]
// (It also builds on a machine without the toolkit from pip's wheels: nvidia-cuda-nvcc,
// -runtime, -crt, nvidia-nvvm, nvidia-cuda-cccl and nvidia-cublas, with -I and -L at their
// nvidia/cu13 include and lib folders.)
#include "probe_common.cuh"

// out = silu(g) u, 8 bf16 a thread per step, grid-stride
__global__ void swiglu_like(const uint4* g, const uint4* u, uint4* out, size_t n8) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n8; i += (size_t)gridDim.x * blockDim.x) {
        uint4 a = g[i], b = u[i], o;
        const __nv_bfloat162* pa = (const __nv_bfloat162*)&a;
        const __nv_bfloat162* pb = (const __nv_bfloat162*)&b;
        __nv_bfloat162* po = (__nv_bfloat162*)&o;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            float2 x = __bfloat1622float2(pa[j]), y = __bfloat1622float2(pb[j]);
            x.x = x.x / (1.f + __expf(-x.x)) * y.x;
            x.y = x.y / (1.f + __expf(-x.y)) * y.y;
            po[j] = __float22bfloat162_rn(x);
        }
        out[i] = o;
    }
}

struct Gemm {
    cublasLtHandle_t lt;
    cublasLtMatmulDesc_t op;
    cublasLtMatrixLayout_t a, b, c;
    cublasLtMatmulAlgo_t algo;
    void* ws;
    size_t ws_bytes = 64u << 20;
    // Y (n, m) row-major = X (n, k) W^T, W (m, k) row-major: column-major Y^T = W X^T
    Gemm(cublasLtHandle_t h, int m, int n, int k, int sms) : lt(h) {
        LT(cublasLtMatmulDescCreate(&op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
        cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
        LT(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof ta));
        LT(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof tb));
        if (sms > 0) LT(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_SM_COUNT_TARGET, &sms, sizeof sms));
        LT(cublasLtMatrixLayoutCreate(&a, CUDA_R_16BF, k, m, k));
        LT(cublasLtMatrixLayoutCreate(&b, CUDA_R_16BF, k, n, k));
        LT(cublasLtMatrixLayoutCreate(&c, CUDA_R_16BF, m, n, m));
        CK(cudaMalloc(&ws, ws_bytes));
        cublasLtMatmulPreference_t pref;
        LT(cublasLtMatmulPreferenceCreate(&pref));
        LT(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws_bytes,
                                                sizeof ws_bytes));
        cublasLtMatmulHeuristicResult_t res;
        int found = 0;
        LT(cublasLtMatmulAlgoGetHeuristic(lt, op, a, b, c, c, pref, 1, &res, &found));
        if (!found) {
            printf("no cuBLASLt algorithm\n");
            exit(1);
        }
        algo = res.algo;
    }
    void run(const void* w, const void* x, void* y, cudaStream_t s) {
        const float one = 1.f, zero = 0.f;
        LT(cublasLtMatmul(lt, op, &one, w, a, x, b, &zero, y, c, y, c, &algo, ws, ws_bytes, s));
    }
};

int main(int argc, char** argv) {
    const int iters = argc > 1 ? atoi(argv[1]) : 3000;
    const int M = 8192, N = 16384, K = 2048; // out, tokens, in
    const size_t NE = (size_t)1 << 27;       // elements per SwiGLU operand
    int sms = 0;
    CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
    Nvml nv;
    if (!nv.init()) printf("(NVML not available: no power or clock columns)\n");

    __nv_bfloat16 *w, *x, *y, *g, *u, *o;
    CK(cudaMalloc(&w, (size_t)M * K * 2));
    CK(cudaMalloc(&x, (size_t)N * K * 2));
    CK(cudaMalloc(&y, (size_t)N * M * 2));
    CK(cudaMalloc(&g, NE * 2));
    CK(cudaMalloc(&u, NE * 2));
    CK(cudaMalloc(&o, NE * 2));
    fill<<<1024, 256>>>(w, (size_t)M * K, 1); // random operands: zeros draw less power (session 10)
    fill<<<1024, 256>>>(x, (size_t)N * K, 2);
    fill<<<1024, 256>>>(g, NE, 3);
    fill<<<1024, 256>>>(u, NE, 4);
    CK(cudaDeviceSynchronize());

    cublasLtHandle_t lt;
    LT(cublasLtCreate(&lt));
    cudaStream_t s1, s2;
    CK(cudaStreamCreateWithFlags(&s1, cudaStreamNonBlocking));
    CK(cudaStreamCreateWithFlags(&s2, cudaStreamNonBlocking));
    Gemm full(lt, M, N, K, 0);
    auto mem = [&](cudaStream_t s, int blocks) {
        swiglu_like<<<blocks, 256, 0, s>>>((const uint4*)g, (const uint4*)u, (uint4*)o, NE / 8);
    };
    const int mem_blocks = sms * 8;

    printf("%d SMs; GEMM %d x %d x %d bf16 (%.0f GFLOP); memory pass %zu MiB\n", sms, N, M, K,
           2.0 * M * N * K * 1e-9, 3 * NE * 2 >> 20);
    // warm-up: reach the power limit's steady clock
    for (int i = 0; i < iters; ++i) full.run(w, x, y, s1);
    CK(cudaDeviceSynchronize());

    sampled(nv, "gemm alone", iters, [&] { for (int i = 0; i < iters; ++i) full.run(w, x, y, s1); });
    sampled(nv, "mem alone", iters, [&] { for (int i = 0; i < iters; ++i) mem(s1, mem_blocks); });
    sampled(nv, "serial (gemm, mem)", iters, [&] {
        for (int i = 0; i < iters; ++i) {
            full.run(w, x, y, s1);
            mem(s1, mem_blocks);
        }
    });
    for (int k : {8, 16, 32}) {
        Gemm part(lt, M, N, K, sms - k);
        char name[64];
        snprintf(name, sizeof name, "gemm alone on %d SMs", sms - k);
        sampled(nv, name, iters, [&] { for (int i = 0; i < iters; ++i) part.run(w, x, y, s1); });
        snprintf(name, sizeof name, "concurrent, mem on %d SMs' blocks", k);
        sampled(nv, name, iters, [&] {
            for (int i = 0; i < iters; ++i) {
                part.run(w, x, y, s1);
                mem(s2, k * 8);
            }
        });
        snprintf(name, sizeof name, "concurrent, gemm on all, mem %d", k);
        sampled(nv, name, iters, [&] {
            for (int i = 0; i < iters; ++i) {
                full.run(w, x, y, s1);
                mem(s2, k * 8);
            }
        });
    }
    return 0;
}
