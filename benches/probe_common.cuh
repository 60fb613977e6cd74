// Helpers shared by the GPU probes (overlap_probe.cu, gemm_algo_probe.cu, graph_copy_probe.cu,
// lora_gemm_probe.cu): error checks, NVML power and SM clock through dlopen, random bf16 operands,
// cuBLASLt's heuristic candidates and their configurations.
#pragma once
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cublasLt.h>
#include <cuda_bf16.h>
#include <dlfcn.h>
#include <initializer_list>
#include <thread>
#include <vector>

#define CK(x)                                                                                  \
    do {                                                                                       \
        cudaError_t ck_err_ = (x);                                                             \
        if (ck_err_ != cudaSuccess) {                                                          \
            printf("%s: %s\n", #x, cudaGetErrorString(ck_err_));                               \
            exit(1);                                                                           \
        }                                                                                      \
    } while (0)
#define LT(x)                                                                                  \
    do {                                                                                       \
        cublasStatus_t lt_status_ = (x);                                                       \
        if (lt_status_ != CUBLAS_STATUS_SUCCESS) {                                             \
            printf("%s: status %d\n", #x, (int)lt_status_);                                    \
            exit(1);                                                                           \
        }                                                                                      \
    } while (0)

// NVML through dlopen (the driver's library; no header or link flags needed)
struct Nvml {
    void* dev = nullptr;
    int (*power)(void*, unsigned*) = nullptr;          // nvmlDeviceGetPowerUsage, mW
    int (*clock)(void*, int, unsigned*) = nullptr;     // nvmlDeviceGetClockInfo, MHz
    bool init() {
        void* h = dlopen("libnvidia-ml.so.1", RTLD_NOW);
        if (!h) return false;
        auto ini = (int (*)())dlsym(h, "nvmlInit_v2");
        auto get = (int (*)(unsigned, void**))dlsym(h, "nvmlDeviceGetHandleByIndex_v2");
        power = (int (*)(void*, unsigned*))dlsym(h, "nvmlDeviceGetPowerUsage");
        clock = (int (*)(void*, int, unsigned*))dlsym(h, "nvmlDeviceGetClockInfo");
        return ini && get && power && clock && ini() == 0 && get(0, &dev) == 0;
    }
};

// what `iters` iterations of `run` took: ms an iteration, mean power (W) and SM clock (MHz),
// polled every 20 ms from `settle_ms` on (NVML's power reading averages about the last second,
// so a phase shorter than that reports part of what ran before it)
struct Sample {
    double ms, watts, mhz;
};
template <class F> Sample sample(Nvml& nv, int iters, F run, int settle_ms = 0) {
    std::atomic<bool> done{false};
    double watts = 0, mhz = 0;
    int n = 0;
    std::thread poll([&] {
        const auto start = std::chrono::steady_clock::now();
        while (!done) {
            unsigned mw = 0, c = 0;
            const bool settled = std::chrono::steady_clock::now() - start >= std::chrono::milliseconds(settle_ms);
            if (settled && nv.dev && nv.power(nv.dev, &mw) == 0 && nv.clock(nv.dev, 1, &c) == 0) {
                watts += mw * 1e-3;
                mhz += c;
                ++n;
            }
            std::this_thread::sleep_for(std::chrono::milliseconds(20));
        }
    });
    auto t0 = std::chrono::steady_clock::now();
    run();
    CK(cudaDeviceSynchronize());
    double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    done = true;
    poll.join();
    return {ms / iters, n ? watts / n : 0.0, n ? mhz / n : 0.0};
}

// sample() printed as one line under `name`
template <class F> void sampled(Nvml& nv, const char* name, int iters, F run) {
    Sample r = sample(nv, iters, run);
    printf("%-34s %9.3f ms / iteration  %6.1f W  %6.0f MHz\n", name, r.ms, r.watts, r.mhz);
}

__global__ void fill(__nv_bfloat16* p, size_t n, unsigned seed) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        unsigned h = (unsigned)i * 2654435761u ^ seed;
        h ^= h >> 15;
        h *= 2246822519u;
        h ^= h >> 13;
        p[i] = __float2bfloat16(((h & 0xffff) / 65536.f - 0.5f) * 0.5f);
    }
}

// the heuristic's first `most` algorithms for D = C = op(A) op(B) (cuBLASLt's operand order)
// with up to `ws_bytes` of workspace
inline std::vector<cublasLtMatmulHeuristicResult_t> heuristic(cublasLtHandle_t lt, cublasLtMatmulDesc_t op,
                                                              cublasLtMatrixLayout_t a, cublasLtMatrixLayout_t b,
                                                              cublasLtMatrixLayout_t c, size_t ws_bytes, int most) {
    cublasLtMatmulPreference_t pref;
    LT(cublasLtMatmulPreferenceCreate(&pref));
    LT(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws_bytes, sizeof ws_bytes));
    std::vector<cublasLtMatmulHeuristicResult_t> res(most);
    int found = 0;
    LT(cublasLtMatmulAlgoGetHeuristic(lt, op, a, b, c, c, pref, most, res.data(), &found));
    res.resize(found);
    cublasLtMatmulPreferenceDestroy(pref);
    return res;
}

// one integer attribute of an algorithm's configuration (tile id, stages id, split-K count, ...)
inline int algo_config(const cublasLtMatmulAlgo_t& algo, cublasLtMatmulAlgoConfigAttributes_t attr) {
    int v = -1;
    size_t written = 0;
    cublasLtMatmulAlgoConfigGetAttribute(&algo, attr, &v, sizeof v, &written);
    return v;
}
