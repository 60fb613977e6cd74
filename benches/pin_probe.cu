// How fast can a process pin host memory for activation offload? Times, for SIZE GiB:
//   alloc       one cuMemHostAlloc (what PinnedHostBuffer does)
//   alloc xT    T threads, each cuMemHostAlloc of SIZE / T at once
//   mmap+reg    anonymous mmap, first touch by one thread, one cuMemHostRegister
//   mmap+T+reg  the same, pages first touched by T threads in parallel
//   thp+T+reg   the same with MADV_HUGEPAGE (transparent 2 MiB pages)
// and a copy of 4 GiB to the device from each, so a faster pin that copies slower shows.
// Build and run on the GPU machine: nvcc -O2 -o /tmp/pin_probe benches/pin_probe.cu -lcuda -lpthread
//   /tmp/pin_probe [SIZE_GIB] [THREADS]
#include <cuda.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

#define CHECK(x) do { CUresult r = (x); if (r != CUDA_SUCCESS) { const char *s; cuGetErrorString(r, &s); \
    fprintf(stderr, "%s: %s\n", #x, s); exit(1); } } while (0)

static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + 1e-9 * t.tv_nsec; }

static CUcontext ctx;
struct job { char *p; size_t bytes; void *out; };

static void *alloc_part(void *a) {
    struct job *j = (struct job *)a;
    CHECK(cuCtxSetCurrent(ctx));
    CHECK(cuMemHostAlloc(&j->out, j->bytes, 0));
    return NULL;
}
static void *touch_part(void *a) {
    struct job *j = (struct job *)a;
    for (size_t o = 0; o < j->bytes; o += 4096) j->p[o] = 0;
    return NULL;
}

static void copy_rate(const char *what, void *host, CUdeviceptr dev, size_t bytes) {
    double t = now();
    CHECK(cuMemcpyHtoD(dev, host, bytes));
    double h2d = bytes / (now() - t) / 1e9;
    t = now();
    CHECK(cuMemcpyDtoH(host, dev, bytes));
    printf("  %-12s copies: %.1f GB/s to the device, %.1f GB/s back\n", what, h2d, bytes / (now() - t) / 1e9);
}

static void run_threads(void *(*f)(void *), struct job *jobs, int n) {
    pthread_t th[256];
    for (int i = 0; i < n; i++) pthread_create(&th[i], NULL, f, &jobs[i]);
    for (int i = 0; i < n; i++) pthread_join(th[i], NULL);
}

static void mapped(const char *what, size_t bytes, int threads, int huge, CUdeviceptr dev, size_t cb) {
    double t = now();
    char *p = (char *)mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) { perror("mmap"); exit(1); }
    if (huge) madvise(p, bytes, MADV_HUGEPAGE);
    struct job jobs[256];
    for (int i = 0; i < threads; i++) {
        size_t a = bytes / threads * i, b = i + 1 == threads ? bytes : bytes / threads * (i + 1);
        jobs[i] = (struct job){p + a, b - a, NULL};
    }
    run_threads(touch_part, jobs, threads);
    double touched = now() - t;
    CHECK(cuMemHostRegister(p, bytes, CU_MEMHOSTREGISTER_PORTABLE));
    double total = now() - t;
    printf("%-12s %6.2f s (touch %.2f, register %.2f): %.1f GiB/s\n", what, total, touched, total - touched,
           bytes / total / (1 << 30));
    copy_rate(what, p, dev, cb);
    t = now();
    CHECK(cuMemHostUnregister(p));
    munmap(p, bytes);
    printf("  %-12s freed in %.2f s\n", what, now() - t);
}

int main(int argc, char **argv) {
    size_t gib = argc > 1 ? atol(argv[1]) : 16;
    int threads = argc > 2 ? atoi(argv[2]) : 8;
    size_t bytes = gib << 30, cb = (size_t)4 << 30;
    CHECK(cuInit(0));
    CUdevice d;
    CHECK(cuDeviceGet(&d, 0));
    CHECK(cuCtxCreate(&ctx, NULL, 0, d));
    CUdeviceptr dev;
    CHECK(cuMemAlloc(&dev, cb));
    printf("%zu GiB, %d threads\n", gib, threads);

    double t = now();
    void *h;
    CHECK(cuMemHostAlloc(&h, bytes, 0));
    t = now() - t;
    printf("%-12s %6.2f s: %.1f GiB/s\n", "alloc", t, gib / t);
    copy_rate("alloc", h, dev, cb);
    t = now();
    CHECK(cuMemFreeHost(h));
    printf("  %-12s freed in %.2f s\n", "alloc", now() - t);

    struct job jobs[256];
    for (int i = 0; i < threads; i++) jobs[i] = (struct job){NULL, bytes / threads, NULL};
    t = now();
    run_threads(alloc_part, jobs, threads);
    t = now() - t;
    printf("%-12s %6.2f s: %.1f GiB/s\n", "alloc xT", t, gib / t);
    for (int i = 0; i < threads; i++) CHECK(cuMemFreeHost(jobs[i].out));

    mapped("mmap+reg", bytes, 1, 0, dev, cb);
    mapped("mmap+T+reg", bytes, threads, 0, dev, cb);
    mapped("thp+T+reg", bytes, threads, 1, dev, cb);
    return 0;
}
