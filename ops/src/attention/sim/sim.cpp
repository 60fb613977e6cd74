// CPU emulator for ops/kernels/attention.cu (dev tool; x86-64 Linux, g++ -std=c++17 -O2).
//
// Compiles the kernel source as C++ with FTRT_ATTN_CPU_SIM, i.e. its portable path: every
// ldmatrix and mma.m16n8k16 is reproduced from warp shuffles with the exact register fragments
// the PTX ISA defines, so the emulator executes the real tiling, masking, online softmax,
// pipelining and index arithmetic of the CUDA kernels. Each CUDA thread of a block is a fiber:
// __syncthreads is a block barrier, each shuffle a warp barrier, and the scheduler runs one warp
// as far as it can before the next (ATTN_SIM_ORDER=reverse: last warp first), so a missing
// __syncthreads lets a warp overwrite shared memory another warp has not read yet; divergent
// barriers abort. cp.async copies are deferred until the matching cp.async.wait_group, so a read
// that is not properly waited for sees stale shared memory (ATTN_SIM_CP=eager: they land at
// issue instead, which exposes copies into a buffer other warps still read). Shared memory
// starts as NaNs.
//
// Entry points (C ABI, pointers are host memory in the kernels' layouts):
//   attn_sim_fwd(D, q, k, v, cu, S, N, Hq, Hkv, scale, out, lse)
//   attn_sim_bwd(D, q, k, v, out, dout, lse, cu, S, N, Hq, Hkv, scale, dq, dk, dv, dvec)
// Run: cd ops/src/attention/sim && cargo test --release   (src/sim_tests.rs; set the two
// environment variables above to vary the schedule and the cp.async model).

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <vector>

#define FTRT_ATTN_CPU_SIM 1

struct attn_dim3 {
    unsigned x, y, z;
};

namespace sim {
struct Copy {
    void* dst;
    const void* src;
    bool valid;
};
struct Fiber {
    void* sp = nullptr;
    std::vector<char> stack;
    attn_dim3 tid{0, 0, 0};
    int state = 0; // 0 runnable, 1 at __syncthreads, 2 done, 3 at a shuffle
    unsigned parity = 0;
    std::vector<Copy> open;
    std::vector<std::vector<Copy>> groups;
};
static std::vector<Fiber> fibers;
static int cur = 0;
static void* sched_sp = nullptr;
static std::vector<unsigned> slots[2];
static std::vector<unsigned char> smem;
static std::function<void()> body;
static attn_dim3 block_idx, grid_dim;
// ATTN_SIM_CP=eager: cp.async copies land at issue (exposes write-after-read races on a
// buffer other warps still read); default (deferred): at the wait (exposes reads before it)
static bool cp_eager = false;
// ATTN_SIM_ORDER=reverse: warps run last to first between barriers
static bool reverse = false;
} // namespace sim

extern "C" void attn_sim_switch(void** save_sp, void* new_sp);
asm(R"(
.text
.globl attn_sim_switch
.type attn_sim_switch,@function
attn_sim_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
)");

static inline void attn_sim_yield() { attn_sim_switch(&sim::fibers[sim::cur].sp, sim::sched_sp); }
// __syncthreads (block barrier)
static inline void attn_sim_barrier() {
    sim::fibers[sim::cur].state = 1;
    attn_sim_yield();
}
// the rendezvous of one shuffle (warp barrier)
static inline void attn_sim_warp_barrier() {
    sim::fibers[sim::cur].state = 3;
    attn_sim_yield();
}
static inline unsigned attn_sim_shfl(unsigned v, int src) {
    sim::Fiber& f = sim::fibers[sim::cur];
    std::vector<unsigned>& s = sim::slots[f.parity];
    f.parity ^= 1u;
    s[sim::cur] = v;
    attn_sim_warp_barrier();
    return s[(sim::cur & ~31) + (src & 31)];
}
static inline unsigned attn_sim_f2u(float f) {
    unsigned u;
    std::memcpy(&u, &f, 4);
    return u;
}
static inline float attn_sim_u2f(unsigned u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
static inline float attn_sim_shfl_xor(float v, int m) {
    return attn_sim_u2f(attn_sim_shfl(attn_sim_f2u(v), (sim::cur & 31) ^ m));
}
static inline void attn_sim_cp_async16(void* dst, const void* src, bool valid) {
    if (sim::cp_eager) {
        if (valid) std::memcpy(dst, src, 16);
        else std::memset(dst, 0, 16);
        return;
    }
    sim::fibers[sim::cur].open.push_back({dst, src, valid});
}
static inline void attn_sim_cp_commit() {
    sim::Fiber& f = sim::fibers[sim::cur];
    f.groups.push_back(std::move(f.open));
    f.open.clear();
}
static inline void attn_sim_cp_wait(int n) {
    sim::Fiber& f = sim::fibers[sim::cur];
    while ((int)f.groups.size() > n) {
        for (const sim::Copy& c : f.groups.front()) {
            if (c.valid) std::memcpy(c.dst, c.src, 16);
            else std::memset(c.dst, 0, 16);
        }
        f.groups.erase(f.groups.begin());
    }
}

#define threadIdx (sim::fibers[sim::cur].tid)
#define blockIdx (sim::block_idx)
#define gridDim (sim::grid_dim)
#define ATTN_DEV static inline
#define ATTN_KERNEL(name) extern "C" void name
#define ATTN_KERNEL_MIN_BLOCKS(name, blocks) extern "C" void name
#define ATTN_DYN_SMEM(name) unsigned char* name = sim::smem.data()
#define ATTN_SYNC() attn_sim_barrier()
#define ATTN_NEG_INF (-INFINITY)
#define ATTN_POS_INF (INFINITY)
#define __restrict__ __restrict

#include "../../../kernels/attention.cu"

#undef threadIdx
#undef blockIdx
#undef gridDim

namespace sim {
static void trampoline() {
    body();
    fibers[cur].state = 2;
    attn_sim_yield();
    std::abort(); // never resumed
}

// run `kernel` over the grid, one block at a time, 128 fibers per block
static void launch(unsigned gx, unsigned gy, size_t smem_bytes, std::function<void()> kernel) {
    const int nt = 128;
    const size_t stack_bytes = 256 * 1024;
    fibers.resize(nt);
    slots[0].assign(nt, 0);
    slots[1].assign(nt, 0);
    body = std::move(kernel);
    const char* mode = std::getenv("ATTN_SIM_CP");
    cp_eager = mode && std::strcmp(mode, "eager") == 0;
    const char* order = std::getenv("ATTN_SIM_ORDER");
    reverse = order && std::strcmp(order, "reverse") == 0;
    grid_dim = {gx, gy, 1};
    for (unsigned by = 0; by < gy; ++by) {
        for (unsigned bx = 0; bx < gx; ++bx) {
            block_idx = {bx, by, 0};
            smem.assign(smem_bytes + 16, 0xff); // NaN bf16 / f32 garbage
            for (int i = 0; i < nt; ++i) {
                Fiber& f = fibers[i];
                if (f.stack.size() != stack_bytes) f.stack.assign(stack_bytes, 0);
                uintptr_t top = ((uintptr_t)(f.stack.data() + stack_bytes)) & ~(uintptr_t)15;
                void** slot = (void**)(top - 16);
                *slot = (void*)&trampoline;
                void** sp = slot - 6;
                for (int r = 0; r < 6; ++r) sp[r] = nullptr;
                f.sp = sp;
                f.tid = {(unsigned)i, 0, 0};
                f.state = 0;
                f.parity = 0;
                f.open.clear();
                f.groups.clear();
            }
            for (;;) {
                // one warp at a time, each as far as it can go (its shuffles release as soon as
                // its 32 lanes arrive), so a warp runs ahead of the others up to the next
                // __syncthreads, as far as real hardware may let it
                for (int wi = 0; wi < nt / 32; ++wi) {
                    const int w = reverse ? nt / 32 - 1 - wi : wi;
                    for (;;) {
                        for (int i = 32 * w; i < 32 * w + 32; ++i) {
                            if (fibers[i].state != 0) continue;
                            cur = i;
                            attn_sim_switch(&sched_sp, fibers[i].sp);
                        }
                        int at_warp = 0;
                        for (int i = 32 * w; i < 32 * w + 32; ++i) at_warp += fibers[i].state == 3;
                        if (at_warp == 0) break;
                        if (at_warp != 32) {
                            std::fprintf(stderr, "attn sim: block (%u,%u) warp %d: divergent shuffle\n", bx, by, w);
                            std::abort();
                        }
                        for (int i = 32 * w; i < 32 * w + 32; ++i) fibers[i].state = 0;
                    }
                }
                int at_bar = 0, done = 0;
                for (int i = 0; i < nt; ++i) {
                    at_bar += fibers[i].state == 1;
                    done += fibers[i].state == 2;
                }
                if (done == nt) break;
                if (done != 0) {
                    std::fprintf(stderr, "attn sim: block (%u,%u): %d threads exited while %d wait at __syncthreads\n", bx, by, done, at_bar);
                    std::abort();
                }
                for (int i = 0; i < nt; ++i) fibers[i].state = 0;
            }
            for (int i = 0; i < nt; ++i) {
                if (!fibers[i].open.empty() || !fibers[i].groups.empty()) {
                    std::fprintf(stderr, "attn sim: block (%u,%u): thread %d exits with cp.async copies not waited for\n", bx, by, i);
                    std::abort();
                }
            }
        }
    }
}
static unsigned cdiv(long long a, long long b) { return (unsigned)((a + b - 1) / b); }
} // namespace sim

extern "C" void attn_sim_fwd(int D, const bf16_t* q, const bf16_t* k, const bf16_t* v, const int* cu, int S, int N,
                             int Hq, int Hkv, float scale, bf16_t* out, float* lse) {
    const size_t smem = 4 * 64 * (size_t)(D + 8) * 2;
    sim::launch(Hq, sim::cdiv(N, 128), smem, [&] {
        if (D == 64) attention_fwd_d64(q, k, v, cu, S, N, Hq, Hkv, scale, out, lse);
        else attention_fwd_d128(q, k, v, cu, S, N, Hq, Hkv, scale, out, lse);
    });
}

extern "C" void attn_sim_bwd(int D, const bf16_t* q, const bf16_t* k, const bf16_t* v, const bf16_t* out,
                             const bf16_t* dout, const float* lse, const int* cu, int S, int N, int Hq, int Hkv,
                             float scale, bf16_t* dq, bf16_t* dk, bf16_t* dv, float* dvec) {
    sim::launch(sim::cdiv((long long)N * Hq, attn::NT / (D / 8) * attn::DOT_ROWS), 1, 0, [&] {
        if (D == 64) attention_bwd_dot_d64(out, dout, N, Hq, dvec);
        else attention_bwd_dot_d128(out, dout, N, Hq, dvec);
    });
    const int bmb = D >= 128 ? 32 : 64;
    const size_t smem_kv = (size_t)(128 + 2 * bmb) * (D + 8) * 2 + 2 * bmb * 4;
    sim::launch(Hkv, sim::cdiv(N, 64), smem_kv, [&] {
        if (D == 64) attention_bwd_dkdv_d64(q, k, v, dout, lse, dvec, cu, S, N, Hq, Hkv, scale, dk, dv);
        else attention_bwd_dkdv_d128(q, k, v, dout, lse, dvec, cu, S, N, Hq, Hkv, scale, dk, dv);
    });
    const size_t smem_q = 4 * 64 * (size_t)(D + 8) * 2;
    sim::launch(Hq, sim::cdiv(N, 64), smem_q, [&] {
        if (D == 64) attention_bwd_dq_d64(q, k, v, dout, lse, dvec, cu, S, N, Hq, Hkv, scale, dq);
        else attention_bwd_dq_d128(q, k, v, dout, lse, dvec, cu, S, N, Hq, Hkv, scale, dq);
    });
}
