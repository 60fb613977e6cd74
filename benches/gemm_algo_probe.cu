// Does a less efficient GEMM lose less at the power limit? cuBLASLt's candidate algorithms for
// the lean steps' largest shapes, each timed in a burst (after an idle second, near the boost
// clock) and sustained (at the 700 W limit), with NVML's power and SM clock.
//
// Why: fusing work into a GEMM (SwiGLU or cross-entropy in the epilogue, NF4 dequantization in
// the prologue, the LoRA K-extension) needs a GEMM kernel of our own, which would likely be
// slower than cuBLAS at boost clocks. The lean steps run at the power limit (session 11), where
// a kernel's time is its energy over ~690 W. If the candidates' sustained rates sit closer
// together than their burst rates, energy per FLOP (not issue efficiency) sets the sustained
// rate, and a slower kernel of our own would give away less than its burst time suggests.
//
// Per shape (Y (n, m) = X (n, k) W^T, bf16 in and out, f32 accumulation, random operands: zeros
// draw less power, session 10), up to ALGOS of the heuristic's candidates, in its order:
//   burst: 20 calls timed by events after 1 s idle and 3 warm calls;
//   sustained: 400 warm calls (waited for), then calls for about SECONDS at the burst rate,
//   NVML polled every 20 ms after the first second.
// Then the first candidate planned for 100 and 66 of the SMs: a kernel made slower on purpose.
// Prints each candidate's tile and stages ids, TFLOP/s in both, W, MHz and mJ per TFLOP.
// Build and run on the GPU machine:
//   nvcc -O3 -arch=sm_90 benches/gemm_algo_probe.cu -lcublasLt -ldl -o /tmp/gap && /tmp/gap [SECONDS] [ALGOS]
#include "probe_common.cuh"

#include <vector>

struct Shape {
    const char* name;
    int n, m, k; // tokens, out, in
};

// Y^T (m, n) column-major = W (m, k) row-major as A^T, times X^T (k, n)
struct Problem {
    cublasLtHandle_t lt;
    cublasLtMatmulDesc_t op;
    cublasLtMatrixLayout_t a, b, c;
    void* ws;
    size_t ws_bytes = 64u << 20;
    // sms > 0: planned for that many SMs (SM_COUNT_TARGET)
    Problem(cublasLtHandle_t h, const Shape& s, int sms = 0) : lt(h) {
        LT(cublasLtMatmulDescCreate(&op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
        if (sms > 0) LT(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_SM_COUNT_TARGET, &sms, sizeof sms));
        cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
        LT(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof ta));
        LT(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof tb));
        LT(cublasLtMatrixLayoutCreate(&a, CUDA_R_16BF, s.k, s.m, s.k));
        LT(cublasLtMatrixLayoutCreate(&b, CUDA_R_16BF, s.k, s.n, s.k));
        LT(cublasLtMatrixLayoutCreate(&c, CUDA_R_16BF, s.m, s.n, s.m));
        CK(cudaMalloc(&ws, ws_bytes));
    }
    ~Problem() { cudaFree(ws); }
    std::vector<cublasLtMatmulHeuristicResult_t> candidates(int most) { return heuristic(lt, op, a, b, c, ws_bytes, most); }
    void run(const cublasLtMatmulAlgo_t& algo, const void* w, const void* x, void* y) {
        const float one = 1.f, zero = 0.f;
        LT(cublasLtMatmul(lt, op, &one, w, a, x, b, &zero, y, c, y, c, &algo, ws, ws_bytes, 0));
    }
};

int main(int argc, char** argv) {
    const double seconds = argc > 1 ? atof(argv[1]) : 4.0;
    const int most = argc > 2 ? atoi(argv[2]) : 12;
    const Shape shapes[] = {
        {"1B gate/up", 16384, 8192, 2048},
        {"8B gate/up", 4096, 14336, 4096},
        {"8B down", 4096, 4096, 14336},
    };
    Nvml nv;
    if (!nv.init()) printf("(NVML not available: no power or clock columns)\n");
    cublasLtHandle_t lt;
    LT(cublasLtCreate(&lt));
    cudaEvent_t e0, e1;
    CK(cudaEventCreate(&e0));
    CK(cudaEventCreate(&e1));

    for (const Shape& s : shapes) {
        const double flop = 2.0 * s.n * s.m * s.k;
        __nv_bfloat16 *w, *x, *y;
        CK(cudaMalloc(&w, (size_t)s.m * s.k * 2));
        CK(cudaMalloc(&x, (size_t)s.n * s.k * 2));
        CK(cudaMalloc(&y, (size_t)s.n * s.m * 2));
        fill<<<1024, 256>>>(w, (size_t)s.m * s.k, 1);
        fill<<<1024, 256>>>(x, (size_t)s.n * s.k, 2);
        CK(cudaDeviceSynchronize());
        Problem p(lt, s);
        auto cands = p.candidates(most);
        printf("\n%s: %d x %d x %d (%.0f GFLOP), %zu candidates\n", s.name, s.n, s.m, s.k, flop * 1e-9,
               cands.size());
        printf("%10s %5s %6s %9s %10s %7s %6s %10s\n", "algo", "tile", "stages", "burst TF", "sustain TF",
               "W", "MHz", "mJ/TFLOP");
        auto measure = [&](Problem& prob, const cublasLtMatmulAlgo_t& algo, const char* label) {
            std::this_thread::sleep_for(std::chrono::seconds(1));
            for (int j = 0; j < 3; ++j) prob.run(algo, w, x, y);
            CK(cudaEventRecord(e0));
            for (int j = 0; j < 20; ++j) prob.run(algo, w, x, y);
            CK(cudaEventRecord(e1));
            CK(cudaEventSynchronize(e1));
            float burst_ms = 0;
            CK(cudaEventElapsedTime(&burst_ms, e0, e1));
            for (int j = 0; j < 400; ++j) prob.run(algo, w, x, y);
            CK(cudaDeviceSynchronize());
            const int iters = (int)(seconds * 1e3 / (burst_ms / 20));
            Sample r = sample(nv, iters, [&] { for (int j = 0; j < iters; ++j) prob.run(algo, w, x, y); }, 1000);
            const double burst_tf = flop / (burst_ms / 20 * 1e-3) * 1e-12;
            const double sustained_tf = flop / (r.ms * 1e-3) * 1e-12;
            printf("%10s %5d %6d %9.1f %10.1f %7.1f %6.0f %10.3f\n", label,
                   algo_config(algo, CUBLASLT_ALGO_CONFIG_TILE_ID), algo_config(algo, CUBLASLT_ALGO_CONFIG_STAGES_ID),
                   burst_tf, sustained_tf, r.watts, r.mhz, r.watts * r.ms / (flop * 1e-12));
        };
        for (size_t i = 0; i < cands.size(); ++i) {
            char label[16];
            snprintf(label, sizeof label, "%zu", i);
            measure(p, cands[i].algo, label);
        }
        for (int sms : {100, 66}) {
            Problem fewer(lt, s, sms);
            auto first = fewer.candidates(1);
            char label[16];
            snprintf(label, sizeof label, "0 @%d SMs", sms);
            if (!first.empty()) measure(fewer, first[0].algo, label);
        }
        CK(cudaFree(w));
        CK(cudaFree(x));
        CK(cudaFree(y));
    }
    return 0;
}
