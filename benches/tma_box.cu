// TMA load throughput by box shape: 32 KB tiles (128 rows x 128 bf16) of an L2-resident
// (N, H, 128) tensor into shared memory, every SM loading back to back (4 buffers in flight):
//   A: a 5-D box whose innermost extent is 8 elements (16-byte rows; the core-matrix order the
//      sm90 attention kernels loaded until session 8)
//   B: a 4-D box of 64-element (128-byte) rows with the 128-byte swizzle (what they load now)
//   C: the same 4-D box, no swizzle
// On a GPU machine: nvcc -O2 -arch=sm_90a -o tma_box benches/tma_box.cu -lcuda && ./tma_box
// H200 (2026-11-29): A 2.83 TB/s over all SMs (11.5 bytes per clock per SM), B and C 9.1 TB/s
// (37.4): TMA's cost goes by the box's rows, so 16-byte rows cap it at a third.
#include <cstdio>
#include <cuda.h>
#include <cuda_runtime.h>
#define CK(x) do { auto e = (x); if (e) { printf("error %d at %d\n", (int)e, __LINE__); return 1; } } while (0)
struct Map { CUtensorMap m; };
__device__ unsigned su(const void* p) { return (unsigned)__cvta_generic_to_shared(p); }
template <int RANK>
__global__ void __launch_bounds__(128, 1) load_loop(const __grid_constant__ Map map, int iters, int nrow_tiles, int heads, long long* out) {
    extern __shared__ __align__(1024) unsigned char smem[];
    unsigned long long* bar = (unsigned long long*)(smem + 4 * 32768);
    if (threadIdx.x != 0) return;
    for (int i = 0; i < 4; ++i) asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(su(bar + i)));
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    long long t0 = clock64();
    for (int i = 0; i < iters; ++i) {
        const int b = i & 3;
        if (i >= 4) {
            const int par = ((i >> 2) - 1) & 1;
            asm volatile("{ .reg .pred p; W%=: mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1; @!p bra W%=; }" ::"r"(su(bar + b)), "r"(par) : "memory");
        }
        asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(su(bar + b)), "r"(32768) : "memory");
        const int tile = (blockIdx.x * 7 + i) % nrow_tiles, head = (blockIdx.x + i) % heads;
        if (RANK == 5)
            asm volatile("cp.async.bulk.tensor.5d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %2, %2, %3, %4}], [%5];"
                         ::"r"(su(smem + b * 32768)), "l"(&map), "r"(0), "r"(tile * 16), "r"(head), "r"(su(bar + b)) : "memory");
        else
            asm volatile("cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %2, %4}], [%5];"
                         ::"r"(su(smem + b * 32768)), "l"(&map), "r"(0), "r"(tile * 128), "r"(head), "r"(su(bar + b)) : "memory");
    }
    for (int i = iters; i < iters + 4; ++i) {
        const int b = i & 3, par = ((i >> 2) - 1) & 1;
        asm volatile("{ .reg .pred p; W%=: mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1; @!p bra W%=; }" ::"r"(su(bar + b)), "r"(par) : "memory");
    }
    out[blockIdx.x] = clock64() - t0;
}
int main() {
    const int N = 16384, H = 8, D = 128;  // 32 MB: L2-resident
    void* x; CK(cudaMalloc(&x, (size_t)N * H * D * 2)); CK(cudaMemset(x, 0, (size_t)N * H * D * 2));
    long long* out; CK(cudaMalloc(&out, 132 * 8));
    CK(cuInit(0));
    const unsigned long long rb = H * D * 2;
    Map m5, m4s, m4;
    {
        cuuint64_t dims[5] = {8, 8, D / 8, N / 8, H}; cuuint64_t str[4] = {rb, 16, 8 * rb, D * 2};
        cuuint32_t box[5] = {8, 8, D / 8, 16, 1}, unit[5] = {1, 1, 1, 1, 1};
        CK(cuTensorMapEncodeTiled(&m5.m, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 5, x, dims, str, box, unit, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_NONE, CU_TENSOR_MAP_L2_PROMOTION_L2_128B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE));
    }
    for (int sw = 0; sw < 2; ++sw) {
        cuuint64_t dims[4] = {64, N, 2, H}; cuuint64_t str[3] = {rb, 128, D * 2};
        cuuint32_t box[4] = {64, 128, 2, 1}, unit[4] = {1, 1, 1, 1};
        CK(cuTensorMapEncodeTiled(sw ? &m4s.m : &m4.m, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 4, x, dims, str, box, unit, CU_TENSOR_MAP_INTERLEAVE_NONE, sw ? CU_TENSOR_MAP_SWIZZLE_128B : CU_TENSOR_MAP_SWIZZLE_NONE, CU_TENSOR_MAP_L2_PROMOTION_L2_128B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE));
    }
    const int smem = 4 * 32768 + 64, iters = 2000;
    CK(cudaFuncSetAttribute(load_loop<5>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    CK(cudaFuncSetAttribute(load_loop<4>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    const char* names[3] = {"A 5-D box, 16-byte rows      ", "B 4-D box, 128-byte rows, SW128", "C 4-D box, 128-byte rows      "};
    for (int rep = 0; rep < 2; ++rep)
    for (int v = 0; v < 3; ++v) {
        cudaEvent_t e0, e1; cudaEventCreate(&e0); cudaEventCreate(&e1);
        cudaEventRecord(e0);
        if (v == 0) load_loop<5><<<132, 128, smem>>>(m5, iters, N / 128, H, out);
        else load_loop<4><<<132, 128, smem>>>(v == 1 ? m4s : m4, iters, N / 128, H, out);
        cudaEventRecord(e1);
        CK(cudaEventSynchronize(e1));
        CK(cudaGetLastError());
        float ms; cudaEventElapsedTime(&ms, e0, e1);
        long long cyc[132]; CK(cudaMemcpy(cyc, out, sizeof cyc, cudaMemcpyDeviceToHost));
        double avg = 0; for (int i = 0; i < 132; ++i) avg += cyc[i] / 132.0;
        const double bytes = 132.0 * iters * 32768;
        printf("%s: %.3f ms, %.2f TB/s over all SMs, %.1f bytes/clock per SM\n", names[v], ms, bytes / ms / 1e9, iters * 32768.0 / avg);
    }
    return 0;
}
