// Can cuBLASLt run LoRA's rank-r GEMMs nearer the copy rate? The 1B lean step spends ~24 ms in
// them (session 22: `FTRT_PROFILE_GEMM_SHAPES=1`), ~10.7 ms in the four that read a (rows, I)
// tensor at ~58% of a copy. Per shape, as ftrt runs it (row-major C (M, N) = op(A) op(B),
// random bf16 operands, f32 accumulation, C bf16 or an f32 gradient with beta 1):
//   - every candidate of the heuristic (up to 32), timed;
//   - the heuristic's first algorithm and the fastest candidate again with each split-K count
//     and reduction scheme cublasLtMatmulAlgoCheck accepts (split-K is deterministic: a fixed
//     split and a fixed reduction order).
// Prints the byte floor (the operands read and C written once, at 4.25 TB/s), then per variant
// us a call (median of 7 bursts of 20 calls) and its config (algo id, tile, stages, split-K,
// reduction scheme, swizzle, custom option).
// Build and run on the GPU machine:
//   nvcc -O3 -arch=sm_90 benches/lora_gemm_probe.cu -lcublasLt -ldl -o /tmp/lgp && /tmp/lgp
#include "probe_common.cuh"

#include <algorithm>
#include <vector>

struct Shape {
    const char* name;
    int m, n, k;
    bool ta, tb; // row-major op(A) = A^T when ta (A stored (K, M)); op(B) = B^T when tb (B (N, K))
    bool f32_out;
    float beta;
};

// Row-major C (M, N) = op(A) op(B) handed to column-major cuBLASLt as C^T = op(B)^T op(A)^T.
struct Problem {
    cublasLtHandle_t lt;
    cublasLtMatmulDesc_t op;
    cublasLtMatrixLayout_t la, lb, lc;
    void *a, *b, *c, *ws;
    size_t ws_bytes = 32u << 20;
    Shape s;
    Problem(cublasLtHandle_t h, const Shape& sh) : lt(h), s(sh) {
        const cudaDataType ct = s.f32_out ? CUDA_R_32F : CUDA_R_16BF;
        LT(cublasLtMatmulDescCreate(&op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
        cublasOperation_t first = s.tb ? CUBLAS_OP_T : CUBLAS_OP_N, second = s.ta ? CUBLAS_OP_T : CUBLAS_OP_N;
        LT(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSA, &first, sizeof first));
        LT(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSB, &second, sizeof second));
        // B row-major: (K, N) ld N -> column-major (N, K); transposed (N, K) ld K -> (K, N)
        if (s.tb) LT(cublasLtMatrixLayoutCreate(&la, CUDA_R_16BF, s.k, s.n, s.k));
        else LT(cublasLtMatrixLayoutCreate(&la, CUDA_R_16BF, s.n, s.k, s.n));
        // A row-major: (M, K) ld K -> column-major (K, M); transposed (K, M) ld M -> (M, K)
        if (s.ta) LT(cublasLtMatrixLayoutCreate(&lb, CUDA_R_16BF, s.m, s.k, s.m));
        else LT(cublasLtMatrixLayoutCreate(&lb, CUDA_R_16BF, s.k, s.m, s.k));
        LT(cublasLtMatrixLayoutCreate(&lc, ct, s.n, s.m, s.n));
        CK(cudaMalloc(&a, (size_t)s.m * s.k * 2));
        CK(cudaMalloc(&b, (size_t)s.k * s.n * 2));
        CK(cudaMalloc(&c, (size_t)s.m * s.n * (s.f32_out ? 4 : 2)));
        CK(cudaMalloc(&ws, ws_bytes));
        fill<<<1024, 256>>>((__nv_bfloat16*)a, (size_t)s.m * s.k, 1);
        fill<<<1024, 256>>>((__nv_bfloat16*)b, (size_t)s.k * s.n, 2);
        CK(cudaMemset(c, 0, (size_t)s.m * s.n * (s.f32_out ? 4 : 2)));
        CK(cudaDeviceSynchronize());
    }
    ~Problem() {
        cudaFree(a);
        cudaFree(b);
        cudaFree(c);
        cudaFree(ws);
    }
    double bytes() const {
        return 2.0 * s.m * s.k + 2.0 * s.k * s.n + (double)s.m * s.n * (s.f32_out ? 4 : 2) * (s.beta != 0 ? 2 : 1);
    }
    std::vector<cublasLtMatmulHeuristicResult_t> candidates(int most) {
        return heuristic(lt, op, la, lb, lc, ws_bytes, most);
    }
    bool accepts(const cublasLtMatmulAlgo_t& algo) {
        cublasLtMatmulHeuristicResult_t r;
        return cublasLtMatmulAlgoCheck(lt, op, la, lb, lc, lc, &algo, &r) == CUBLAS_STATUS_SUCCESS &&
               r.workspaceSize <= ws_bytes;
    }
    void run(const cublasLtMatmulAlgo_t& algo) {
        const float one = 1.f;
        LT(cublasLtMatmul(lt, op, &one, b, la, a, lb, &s.beta, c, lc, c, lc, &algo, ws, ws_bytes, 0));
    }
    // us a call: median of 7 bursts of 20 calls after 3 warm ones
    double time(const cublasLtMatmulAlgo_t& algo, cudaEvent_t e0, cudaEvent_t e1) {
        for (int j = 0; j < 3; ++j) run(algo);
        std::vector<float> t;
        for (int rep = 0; rep < 7; ++rep) {
            CK(cudaEventRecord(e0));
            for (int j = 0; j < 20; ++j) run(algo);
            CK(cudaEventRecord(e1));
            CK(cudaEventSynchronize(e1));
            float ms = 0;
            CK(cudaEventElapsedTime(&ms, e0, e1));
            t.push_back(ms * 1e3f / 20);
        }
        std::sort(t.begin(), t.end());
        return t[3];
    }
};

void print_row(const char* label, double us, double floor_us, const cublasLtMatmulAlgo_t& algo) {
    printf("  %-22s %8.1f us %5.0f%% of floor  algo %3d tile %3d stages %3d splitK %3d red %2d swz %d custom %d\n",
           label, us, 100 * floor_us / us, algo_config(algo, CUBLASLT_ALGO_CONFIG_ID), algo_config(algo, CUBLASLT_ALGO_CONFIG_TILE_ID),
           algo_config(algo, CUBLASLT_ALGO_CONFIG_STAGES_ID), algo_config(algo, CUBLASLT_ALGO_CONFIG_SPLITK_NUM),
           algo_config(algo, CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME), algo_config(algo, CUBLASLT_ALGO_CONFIG_CTA_SWIZZLING),
           algo_config(algo, CUBLASLT_ALGO_CONFIG_CUSTOM_OPTION));
}

int main() {
    // the 1B lean step's rank-r GEMMs (8 x 2048, 4,096-row MLP tiles), largest total first
    const Shape shapes[] = {
        {"dxa = dy B (gate/up)", 4096, 16, 8192, false, false, false, 0.f},
        {"dB += dy^T xa (gate/up)", 8192, 16, 4096, true, false, true, 1.f},
        {"dA += dxa^T act (down)", 16, 8192, 4096, true, false, true, 1.f},
        {"xa = act A^T (down)", 4096, 16, 8192, false, true, false, 0.f},
        {"y = xa B^T (q/o)", 16384, 2048, 16, false, true, false, 0.f},
        {"dB += dy^T xa (down)", 2048, 16, 4096, true, false, true, 1.f},
        {"dA += dxa^T x (gate/up)", 32, 2048, 4096, true, false, true, 1.f},
        {"dB += dy^T xa (q/o)", 2048, 16, 16384, true, false, true, 1.f},
        {"dx = dxa A (gate/up)", 4096, 2048, 32, false, false, false, 0.f},
        {"xa = x A^T (q/k/v)", 16384, 48, 2048, false, true, false, 0.f},
    };
    cublasLtHandle_t lt;
    LT(cublasLtCreate(&lt));
    cudaEvent_t e0, e1;
    CK(cudaEventCreate(&e0));
    CK(cudaEventCreate(&e1));
    const int32_t splits[] = {1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64};
    const int32_t schemes[] = {CUBLASLT_REDUCTION_SCHEME_NONE, CUBLASLT_REDUCTION_SCHEME_INPLACE,
                               CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE, CUBLASLT_REDUCTION_SCHEME_OUTPUT_TYPE};
    for (const Shape& s : shapes) {
        Problem p(lt, s);
        const double floor_us = p.bytes() / 4.25e12 * 1e6;
        auto cands = p.candidates(32);
        printf("\n%s: %dx%dx%d %c%c %s beta %.0f, floor %.1f us, %zu candidates\n", s.name, s.m, s.n, s.k,
               s.ta ? 'T' : 'N', s.tb ? 'T' : 'N', s.f32_out ? "f32" : "bf16", s.beta, floor_us, cands.size());
        if (cands.empty()) continue;
        std::vector<std::pair<double, size_t>> timed;
        for (size_t i = 0; i < cands.size(); ++i) timed.push_back({p.time(cands[i].algo, e0, e1), i});
        print_row("heuristic's first", timed[0].first, floor_us, cands[0].algo);
        std::sort(timed.begin(), timed.end());
        for (size_t j = 0; j < std::min<size_t>(4, timed.size()); ++j) {
            char label[32];
            snprintf(label, sizeof label, "candidate %zu", timed[j].second);
            print_row(label, timed[j].first, floor_us, cands[timed[j].second].algo);
        }
        // split-K variants of the first and the fastest candidate: the best three of each
        for (size_t base : {(size_t)0, timed[0].second}) {
            std::vector<std::pair<double, cublasLtMatmulAlgo_t>> variants;
            for (int32_t k : splits)
                for (int32_t red : schemes) {
                    cublasLtMatmulAlgo_t algo = cands[base].algo;
                    cublasLtMatmulAlgoConfigSetAttribute(&algo, CUBLASLT_ALGO_CONFIG_SPLITK_NUM, &k, sizeof k);
                    cublasLtMatmulAlgoConfigSetAttribute(&algo, CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME, &red,
                                                         sizeof red);
                    if (p.accepts(algo)) variants.push_back({p.time(algo, e0, e1), algo});
                }
            std::sort(variants.begin(), variants.end(),
                      [](const auto& x, const auto& y) { return x.first < y.first; });
            printf("  split-K of candidate %zu: %zu accepted\n", base, variants.size());
            for (size_t j = 0; j < std::min<size_t>(3, variants.size()); ++j)
                print_row("  variant", variants[j].first, floor_us, variants[j].second);
            if (base == timed[0].second) break;
        }
    }
    return 0;
}
