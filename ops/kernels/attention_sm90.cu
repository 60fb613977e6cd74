// Causal self-attention for Hopper (sm_90a): the FlashAttention-2 algorithm of attention.cu,
// with the tile products on warpgroup MMAs (wgmma.mma_async) instead of per-warp mma.sync.
//
// Same contract as attention.cu (see there): q, out, dout, dq (N, Hq, D) bf16; k, v, dk, dv
// (N, Hkv, D) bf16; lse, dvec (Hq, N) f32; cu_seqlens (S + 1) i32; causal within segments,
// tokens from cu[S] to N one trailing segment; query head h reads kv head h / (Hq / Hkv).
//
// A warpgroup (4 warps, 128 threads) multiplies a 64-row tile: thread (warp w, lane l) holds
// rows 16 w + l / 4 and that + 8 of the accumulator, columns 8 j + 2 (l % 4) + {0, 1}: the
// mma.m16n8k16 fragment of attention.cu repeated over n, so the softmax and masking code is
// that file's. A operands come from shared memory (Q K^T, dO V^T, K Q^T, V dO^T) or from
// registers (P and dS, packed to bf16 straight from the accumulator: P V, P^T dO, dS^T Q, dS K).
//
// Shared-memory operand tiles are in wgmma's 128-byte-swizzled layout: a (R, D) tile is D / 64
// column halves of R rows of 128 bytes, 16-byte chunk c of row r at chunk c ^ (r % 8) (see
// make_desc). It is the canonical layout for both K-major operands (rows = M or N, columns =
// K) and MN-major B operands (rows = K, columns = N), so one layout serves every product.
// Tiles arrive by TMA: one thread issues a whole tile (cp.async.bulk.tensor over a
// four-dimensional view of the tensor with 128-byte rows and the hardware's 128-byte swizzle,
// see TmaMap) and an mbarrier per buffer tells the block it has landed. Rows past N read as
// zeros; N must be a multiple of 8. Outputs are staged in shared memory in the unswizzled
// core-matrix order of tile_off, then stored with 16-byte writes.
//
// Kernels (two warpgroups share every tile they load, which halves the L2 traffic against one
// warpgroup per block: 873 against 983 us for the backward at the 8B shape):
//   attention_fwd_sm90_d{64,128}       384 threads: a producer warpgroup loads, two consumer
//                                      warpgroups own 64 query rows each of a 128-row tile;
//                                      key tiles of 128, K and V double-buffered (fwd_impl).
//                                      Grid (Hq, ceil(N / 128)).
//   attention_bwd_dkdv_sm90_d{64,128}  384 threads: a producer warpgroup loads, two consumer
//                                      warpgroups own 64 keys each of a 128-key tile of one kv
//                                      head; the block loops over the group's query heads and
//                                      the 64-query tiles that see it (Q, dO, lse, dvec in three
//                                      buffers); dk, dv accumulate in registers (dkdv_impl).
//                                      Grid (Hkv, ceil(N / 128)).
//   attention_bwd_dkdvdq_sm90_d128     dkdv that also adds each key tile's part of dq, in key
//                                      order (deterministic): one launch per kv head, grid
//                                      (1, ceil(N / 128)); for long sequences, where the dq
//                                      kernel's recomputed products cost the most.
//   attention_bwd_dq_sm90_d{64,128}    384 threads: a producer warpgroup loads, two consumer
//                                      warpgroups own 64 queries each of a 128-query tile and
//                                      loop over 64-key tiles (K in four buffers, V in three;
//                                      dq_impl). Grid (Hq, ceil(N / 128)).
// dvec comes from attention.cu's attention_bwd_dot kernel. Heads vary fastest and the heaviest
// tiles go first, as in attention.cu. Same math, same accumulation order: dk and dv match
// attention.cu's bit for bit, out and dq to a bf16 rounding.

typedef unsigned short bf16_t;

#define WG_DEV __device__ __forceinline__
#ifndef ATTN_DEV
#define ATTN_DEV __device__ __forceinline__
#endif
#include "attention_common.cuh"

namespace attn90 {

constexpr float LOG2E = 1.4426950408889634f;
constexpr float LN2 = 0.6931471805599453f;
#define WG_NEG_INF (__int_as_float(0xff800000))
#define WG_POS_INF (__int_as_float(0x7f800000))

using attn_ptx::fast_exp2;
using attn_ptx::pack_bf16;
using attn_ptx::shfl_xor;
using attn_ptx::smem_u32;
using attn_segments::imin;
using attn_segments::seg_end;
using attn_segments::seg_start;

// ---------------------------------------------------------------- copies

// A TMA descriptor (CUtensorMap, 128 opaque bytes) passed as a __grid_constant__ parameter.
// The host describes a (N, H, D) tensor as four dimensions, innermost first: (64 elements,
// N rows, D / 64 column halves, H heads), 128-byte swizzle, so that a box of (64, ROWS, D / 64,
// 1) lands in shared memory in the swizzled order below (tile_sw), 128-byte rows: a TMA moves
// 37 bytes per clock per SM in such boxes against 11.5 in boxes of 16-byte rows (measured on
// the H200: 9.1 against 2.8 TB/s over all SMs).
struct alignas(64) TmaMap {
    unsigned long long opaque[16];
};
WG_DEV void mbar_init(unsigned long long* bar) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(smem_u32(bar)));
}
WG_DEV void mbar_init_n(unsigned long long* bar, unsigned count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_u32(bar)), "r"(count));
}
// A producer/consumer pipeline's barriers, set up by thread 0: `nfull` "landed" barriers (one
// arrival: the producer's expect_tx, completed by the copies' bytes), then `nfree` "free"
// barriers (eight arrivals: one per consumer warp). Usable after the caller's block barrier.
WG_DEV void mbar_init_pipeline(unsigned long long* bar, int nfull, int nfree) {
    if (threadIdx.x != 0) return;
    for (int i = 0; i < nfull; ++i) mbar_init(bar + i);
    for (int i = 0; i < nfree; ++i) mbar_init_n(bar + nfull + i, 8);
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
}
// arms `bar` for `bytes` bytes of TMA writes (one thread)
WG_DEV void mbar_expect(unsigned long long* bar, unsigned bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_u32(bar)), "r"(bytes)
                 : "memory");
}
// waits until `bar` completes the phase of the given parity
WG_DEV void mbar_wait(unsigned long long* bar, int parity) {
    asm volatile("{ .reg .pred p;\n"
                 "WG_MBAR_WAIT_%=: mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n"
                 "@!p bra WG_MBAR_WAIT_%=; }\n" ::"r"(smem_u32(bar)),
                 "r"(parity)
                 : "memory");
}
// the map's box at rows row0.. of head `head` (a whole tile) into `dst` (1024-byte aligned);
// rows past the tensor read as zeros. Completes `bar`'s transaction count.
WG_DEV void tma_rows(bf16_t* dst, const TmaMap* map, int row0, int head, unsigned long long* bar) {
    asm volatile("cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %2, %4}], [%5];"
                 ::"r"(smem_u32(dst)), "l"(map), "r"(0), "r"(row0), "r"(head), "r"(smem_u32(bar))
                 : "memory");
}

// `bytes` (a multiple of 16; both addresses 16-byte aligned) from global `src` to shared `dst`
// by the bulk-copy engine; completes `bar`'s transaction count
WG_DEV void bulk_copy(void* dst, const void* src, unsigned bytes, unsigned long long* bar) {
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                 ::"r"(smem_u32(dst)), "l"(src), "r"(bytes), "r"(smem_u32(bar))
                 : "memory");
}

// element offset of (r, c) in a core-matrix tiled (rows, D) tile
template <int D> WG_DEV int tile_off(int r, int c) {
    return ((r >> 3) * (D / 8) + (c >> 3)) * 64 + (r & 7) * 8 + (c & 7);
}
// a tiled (ROWS, D) tile to global rows row0.. (< N only; g: the head's first element, rows
// `stride` apart), by THREADS threads numbered tid = 0.. . Thread i moves the 16-byte chunk at
// byte 16 i: (row (i / D) 8 + i % 8, column chunk (i / 8) % (D / 8)), so the shared-memory
// reads are conflict-free.
template <int D, int ROWS, int THREADS>
WG_DEV void store_tile(bf16_t* g, const bf16_t* s, int row0, int N, long long stride, int tid) {
    for (int i = tid; i < ROWS * D / 8; i += THREADS) {
        const int r = (i / D) * 8 + (i & 7), c = (i >> 3) & (D / 8 - 1);
        const int tok = row0 + r;
        if (tok < N) *(uint4*)(g + (long long)tok * stride + c * 8) = *(const uint4*)(s + i * 8);
    }
}
// one accumulator fragment pair (row, cols col, col + 1) into a tiled tile as bf16
template <int D> WG_DEV void stage_pair(bf16_t* s, int row, int col, float lo, float hi) {
    *(unsigned*)(s + tile_off<D>(row, col)) = pack_bf16(lo, hi);
}

// The block's dynamic shared memory, which the 128-byte swizzle needs 1024-byte aligned (it is:
// the kernels have no static shared memory; a trap says so if that ever changes)
WG_DEV unsigned char* swizzle_smem() {
    extern __shared__ __align__(1024) unsigned char attn90_smem[];
    if (smem_u32(attn90_smem) & 1023u) __trap();
    return attn90_smem;
}

// ---------------------------------------------------------------- warpgroup MMA

// Operand tiles as TMA leaves them (tile_sw): a (R, D) tile is D / 64 column halves of
// (R, 64), each row 128 bytes, whose 16-byte chunk c sits at chunk c ^ (row % 8) (the 128-byte
// swizzle; 8 rows make a 1024-byte atom, tiles start on 1024 bytes). This is wgmma's "128B"
// canonical layout for K-major operands (rows = M or N, columns = K) and MN-major B operands
// (rows = K, columns = N).
// Shared-memory matrix descriptor, 128-byte swizzle: start address, LBO and SBO in 16-byte
// units, layout type 1 (bits 62-63)
WG_DEV unsigned long long make_desc(const bf16_t* p, unsigned lbo, unsigned sbo) {
    return (unsigned long long)((smem_u32(p) & 0x3ffffu) >> 4) | ((unsigned long long)(lbo >> 4) << 16) |
           ((unsigned long long)(sbo >> 4) << 32) | (1ull << 62);
}
// The operand `elems` bf16 elements past the one `desc` describes: its start address field (bits
// 0-13, 16-byte units) cannot carry, as shared addresses stay below 2^18. With kk unrolled, a
// product's descriptors are then one tile descriptor plus constants, a uniform add each, not a
// cvta, mask and shift each (~18 instructions between products; the consumers' warpgroup index
// is broadcast from lane 0 so that the compiler keeps tile addresses in uniform registers).
WG_DEV unsigned long long desc_at(unsigned long long desc, int elems) {
    return (desc & ~0xffffffffull) | (unsigned)((unsigned)desc + (unsigned)(elems >> 3));
}
// v, which is the same in every lane, read from lane 0: the compiler then knows it is uniform
WG_DEV int warp_uniform(int v) { return __shfl_sync(0xffffffffu, v, 0); }
// K-major operand: rows r0..r0 + 63 (M) or all rows (N) of an R-row tile, columns 16 kk..16 kk + 15
// (32 bytes into a row of column half kk / 4). SBO: the next 8 rows (1024 bytes on); LBO unused.
template <int D, int R> WG_DEV unsigned long long desc_k(const bf16_t* tile, int r0, int kk) {
    return desc_at(make_desc(tile + r0 * 64, 16, 1024), (kk >> 2) * R * 64 + (kk & 3) * 16);
}
// MN-major B operand: rows 16 kk..16 kk + 15 (K) of an R-row tile, all D columns (N). LBO: the
// next 64 columns (the next column half, R rows of 128 bytes on); SBO: the next 8 rows along K.
template <int D, int R> WG_DEV unsigned long long desc_mn(const bf16_t* tile, int kk) {
    return desc_at(make_desc(tile, R * 128, 1024), 16 * kk * 64);
}
// before the first wgmma of a batch whose accumulators other instructions wrote
WG_DEV void wg_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
WG_DEV void wg_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
// waits until at most N of this warpgroup's committed batches are still running
template <int N = 0> WG_DEV void wg_wait() { asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory"); }
// after wg_wait: the asm that issued a product returned before the hardware finished it, so the
// compiler must neither read its accumulators nor reuse its A-fragment registers before the wait
template <int N> WG_DEV void wg_hold(float (&d)[N]) {
#pragma unroll
    for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
}
template <int N> WG_DEV void wg_hold(unsigned (&a)[N][4]) {
#pragma unroll
    for (int i = 0; i < N; ++i) asm volatile("" : "+r"(a[i][0]), "+r"(a[i][1]), "+r"(a[i][2]), "+r"(a[i][3])::"memory");
}

// The products, as one m64nNk16 instruction each (N = 64 or 128; N / 2 accumulators per
// thread). Inline asm takes no loops: the accumulator lists are spelled out below, 8 at a time.
#define WG_F8(i) "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), \
                 "+f"(d[i + 5]), "+f"(d[i + 6]), "+f"(d[i + 7])
// the accumulators' operand numbers as PTX brace lists
#define WG_ACC32 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "  \
                 "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}"
#define WG_ACC64 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "  \
                 "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, " \
                 "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
                 "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}"
#define WG_OUT32 WG_F8(0), WG_F8(8), WG_F8(16), WG_F8(24)
#define WG_OUT64 WG_OUT32, WG_F8(32), WG_F8(40), WG_F8(48), WG_F8(56)
// wgmma_ss: d (64 x N, f32) = (accumulate ? d : 0) + SIGN_A A (64 x 16) B (16 x N), SIGN_A
// = 1 or -1, A K-major in shared memory, B too (MN_B = 0) or MN-major (MN_B = 1). wgmma_rs:
// d += A (64 x 16, bf16 fragments in registers) B (16 x N), B MN-major in shared memory.
// ACC: the accumulators' count (N / 2), as the operand numbers after them.
#define WG_PRODUCTS(N, ACC, A0, A1, A2, A3, A4, A5)                                                    \
    template <int MN_B = 0, int SIGN_A = 1>                                                            \
    WG_DEV void wgmma_ss(float (&d)[ACC], unsigned long long da, unsigned long long db, int accumulate) { \
        asm volatile("{ .reg .pred p; setp.ne.b32 p, %" #A2 ", 0;\n"                                       \
                     "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32.bf16.bf16 " WG_ACC##ACC          \
                     ", %" #A0 ", %" #A1 ", p, %" #A4 ", 1, 0, %" #A3 "; }\n"                            \
                     : WG_OUT##ACC                                                                     \
                     : "l"(da), "l"(db), "r"(accumulate), "n"(MN_B), "n"(SIGN_A));                     \
    }                                                                                                  \
    WG_DEV void wgmma_rs(float (&d)[ACC], const unsigned (&a)[4], unsigned long long db) {              \
        asm volatile("{ .reg .pred p; setp.ne.b32 p, %" #A5 ", 0;\n"                                       \
                     "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32.bf16.bf16 " WG_ACC##ACC          \
                     ", {%" #A0 ", %" #A1 ", %" #A2 ", %" #A3 "}, %" #A4 ", p, 1, 1, 1; }\n"               \
                     : WG_OUT##ACC                                                                     \
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(1));                   \
    }
WG_PRODUCTS(64, 32, 32, 33, 34, 35, 36, 37)
WG_PRODUCTS(128, 64, 64, 65, 66, 67, 68, 69)

// ---------------------------------------------------------------- forward

// Row state of the online softmax for a thread's two rows (A = l / 4, B = that + 8).
struct SoftmaxRows {
    float mA, mB; // running max of scale * log2(e) * x
    float lA, lB; // running sum of exp2(that - max), this thread's columns only
};

// -inf into the scores of a 64 x BN accumulator tile (keys j0 ..; the thread's rows rA and rA + 8,
// whose segments start at stA and stB) that its row may not see: a later key or an earlier
// segment's. The forward's softmax and the dq backward's ds then give them 0.
template <int BN>
WG_DEV void mask_rows(float (&s)[BN / 2], int j0, int rA, int stA, int stB, int t) {
#pragma unroll
    for (int nt = 0; nt < BN / 8; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int j = j0 + nt * 8 + 2 * t + (e & 1);
            const int i = e < 2 ? rA : rA + 8, st = e < 2 ? stA : stB;
            if (j > i || j < st) s[4 * nt + e] = WG_NEG_INF;
        }
    }
}

// Masks tile j0's scores s (64 x BN accumulator), folds them into the running max and sum and
// leaves exp2(s scale log2(e) - max) in s; returns the factors (aA, aB) the output rows must be
// rescaled by.
template <int BN>
WG_DEV float2 softmax_tile(float (&s)[BN / 2], SoftmaxRows& r, bool masked, int j0, int rA, int stA,
                           int stB, int t, float sl2) {
    if (masked) mask_rows<BN>(s, j0, rA, stA, stB, t);
    // the max of the raw scores, scaled after (scale > 0): one multiply per row
    float mxA = WG_NEG_INF, mxB = WG_NEG_INF;
#pragma unroll
    for (int nt = 0; nt < BN / 8; ++nt) {
        mxA = fmaxf(mxA, fmaxf(s[4 * nt], s[4 * nt + 1]));
        mxB = fmaxf(mxB, fmaxf(s[4 * nt + 2], s[4 * nt + 3]));
    }
    mxA = fmaxf(mxA, shfl_xor(mxA, 1));
    mxA = fmaxf(mxA, shfl_xor(mxA, 2));
    mxB = fmaxf(mxB, shfl_xor(mxB, 1));
    mxB = fmaxf(mxB, shfl_xor(mxB, 2));
    mxA = fmaxf(r.mA, mxA * sl2);
    mxB = fmaxf(r.mB, mxB * sl2);
    const float uA = mxA == WG_NEG_INF ? 0.f : mxA, uB = mxB == WG_NEG_INF ? 0.f : mxB;
    const float aA = fast_exp2(r.mA - uA), aB = fast_exp2(r.mB - uB);
    r.mA = mxA;
    r.mB = mxB;
    float psA = 0.f, psB = 0.f;
#pragma unroll
    for (int nt = 0; nt < BN / 8; ++nt) {
        s[4 * nt] = fast_exp2(fmaf(s[4 * nt], sl2, -uA));
        s[4 * nt + 1] = fast_exp2(fmaf(s[4 * nt + 1], sl2, -uA));
        s[4 * nt + 2] = fast_exp2(fmaf(s[4 * nt + 2], sl2, -uB));
        s[4 * nt + 3] = fast_exp2(fmaf(s[4 * nt + 3], sl2, -uB));
        psA += s[4 * nt] + s[4 * nt + 1];
        psB += s[4 * nt + 2] + s[4 * nt + 3];
    }
    r.lA = r.lA * aA + psA;
    r.lB = r.lB * aB + psB;
    return make_float2(aA, aB);
}

// A fragments (k = 16 kk..16 kk + 15) of a 64 x N accumulator, in bf16
template <int N> WG_DEV void pack_frags(unsigned (&a)[N / 16][4], const float (&s)[N / 2]) {
#pragma unroll
    for (int kk = 0; kk < N / 16; ++kk)
#pragma unroll
        for (int r = 0; r < 4; ++r) a[kk][r] = pack_bf16(s[8 * kk + 2 * r], s[8 * kk + 2 * r + 1]);
}

WG_DEV void mbar_arrive(unsigned long long* bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem_u32(bar)) : "memory");
}
// named barriers 1..15 among `n` threads (a multiple of 32): sync waits for n arrivals in all,
// its own included; arrive adds this warp's without waiting
WG_DEV void named_sync(int id, int n) { asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(n) : "memory"); }
WG_DEV void named_arrive(int id, int n) { asm volatile("bar.arrive %0, %1;" ::"r"(id), "r"(n) : "memory"); }
// the registers per thread of the calling warpgroup, given back to or taken from the block's pool
// (the launch's 168 a thread, 65,536 / 384 rounded down to a multiple of 8, x 384 = 64,512). The
// warpgroups' counts must fit it (24 x 128 + 240 x 256 exactly), or an inc waits forever.
template <int R> WG_DEV void regs_down() { asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" ::"n"(R)); }
template <int R> WG_DEV void regs_up() { asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" ::"n"(R)); }

// The key/value stream a producer thread issues for the forward and dQ: key tiles it = 0 ..
// ntiles - 1 of BK rows from kbeg, K_it into buffer it % KB and V_it into buffer it % VB, each
// load first waiting until every consumer warp freed its buffer's previous tile.
template <int D, int BK, int KB, int VB>
WG_DEV void produce_kv(const TmaMap* tk, const TmaMap* tv, int hk, int kbeg, int ntiles,
                       bf16_t* sK, bf16_t* sV, unsigned long long* kfull, unsigned long long* kfree,
                       unsigned long long* vfull, unsigned long long* vfree) {
    for (int it = 0; it < ntiles; ++it) {
        const int bk = it % KB, bv = it % VB, j0 = kbeg + it * BK;
        if (it >= KB) mbar_wait(kfree + bk, (it / KB - 1) & 1);
        mbar_expect(kfull + bk, BK * D * 2);
        tma_rows(sK + bk * BK * D, tk, j0, hk, kfull + bk);
        if (it >= VB) mbar_wait(vfree + bv, (it / VB - 1) & 1);
        mbar_expect(vfull + bv, BK * D * 2);
        tma_rows(sV + bv * BK * D, tv, j0, hk, vfull + bv);
    }
}

// The forward, FlashAttention-3's schedule (384 threads). Warpgroup 0 is the producer: its
// thread 0 issues every TMA load (Q, then K_it and V_it into FWD_STAGES buffers each, as the
// consumers free them: "free" mbarriers, one arrival per consumer warp), at 40 registers.
// Warpgroups 1 and 2 (232 registers) each own 64 query rows of the 128-row tile (thread rows
// rA, rB = q0 + 64 c + 16 w + l / 4 (+ 8)) and never wait for each other, only for their tiles.
// Step `it` issues s = Q K_it^T (SS), then o += P_{it-1} V_{it-1} (RS, P packed from the previous
// step's s), and runs tile it's masking and online softmax while the second product is still
// on the tensor cores (intra-warpgroup overlap); the first step has no P V, a last one only
// P V. Ping-pong: a consumer issues a step's products only on its turn (named barrier 1 + c),
// then hands the turn to the other, so one's softmax runs while the other's products occupy
// the tensor cores. Against two warpgroups in lockstep (a block barrier per step, the loads
// issued by one of them, query heads in cluster pairs multicasting K and V), measured on the
// H200: 190 against 252 us per 8B call, 16.6 against 20.9 ms per 8B 32k call, 498 against
// 514 us per 1B call (d64, two such blocks per SM).
constexpr int FWD_STAGES = 2;

template <int D>
WG_DEV void fwd_impl(const int* __restrict__ cu, int S, int N, int Hq, int Hkv, float scale,
                     bf16_t* __restrict__ out, float* __restrict__ lse, const TmaMap* tq,
                     const TmaMap* tk, const TmaMap* tv) {
    constexpr int BM = 128, BN = 128, NO = D / 8, ST = FWD_STAGES;
    unsigned char* attn90_smem = swizzle_smem();
    bf16_t* sQ = (bf16_t*)attn90_smem; // (BM, D), later the output tile
    bf16_t* sK = sQ + BM * D;          // ST x (BN, D): K_it in buffer it % ST
    bf16_t* sV = sK + ST * BN * D;     // ST x (BN, D): V_it in buffer it % ST
    unsigned long long* qfull = (unsigned long long*)(sV + ST * BN * D); // Q landed
    unsigned long long* kfull = qfull + 1;   // ST: K_it landed (phase it / ST)
    unsigned long long* vfull = kfull + ST;  // ST: V_it landed
    unsigned long long* kfree = vfull + ST;  // ST: every consumer warp is done with K_it
    unsigned long long* vfree = kfree + ST;  // ST: ... with V_it
    const int tid = (int)threadIdx.x, wg = tid >> 7;
    const int q0 = (int)(gridDim.y - 1 - blockIdx.y) * BM; // longest rows first, all heads
    const int h = (int)blockIdx.x, hk = h / (Hq / Hkv);
    const int kend = imin(q0 + BM, N);
    const int kbeg = seg_start(cu, S, q0) & ~7; // key tiles start on a row group (TMA boxes)
    const int last_start = seg_start(cu, S, kend - 1);
    const int ntiles = (kend - kbeg + BN - 1) / BN;

    mbar_init_pipeline(qfull, 1 + 2 * ST, 2 * ST);
    __syncthreads(); // the last block-wide barrier: the producer's other threads leave below

    if (wg == 0) {
        regs_down<40>();
        if (tid != 0) return;
        mbar_expect(qfull, BM * D * 2);
        tma_rows(sQ, tq, q0, h, qfull);
        produce_kv<D, BN, ST, ST>(tk, tv, hk, kbeg, ntiles, sK, sV, kfull, kfree, vfull, vfree);
        return;
    }

    regs_up<232>();
    const int cw = warp_uniform(wg - 1), warp = (tid >> 5) & 3; // cw: uniform
    const int l = tid & 31, g = l >> 2, t = l & 3;
    const float sl2 = scale * LOG2E;
    const int rA = q0 + 64 * cw + 16 * warp + g, rB = rA + 8;
    const int stA = seg_start(cu, S, imin(rA, N - 1)), stB = seg_start(cu, S, imin(rB, N - 1));
    auto masked = [&](int it) { const int j0 = kbeg + it * BN; return !(j0 + BN - 1 <= q0 && j0 >= last_start); };
    auto my_turn = [&]() { named_sync(1 + cw, 256); };
    auto their_turn = [&]() { named_arrive(2 - cw, 256); };
    auto issue_s = [&](float (&s)[BN / 2], int it) {
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk)
            wgmma_ss(s, desc_k<D, BM>(sQ, 64 * cw, kk), desc_k<D, BN>(sK + (it % ST) * BN * D, 0, kk), kk);
        wg_commit();
    };
    auto issue_pv = [&](float (&o)[D / 2], unsigned (&pk)[BN / 16][4], int it) {
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) wgmma_rs(o, pk[kk], desc_mn<D, BN>(sV + (it % ST) * BN * D, kk));
        wg_commit();
    };
    auto release = [&](unsigned long long* free_bars, int it) {
        if (l == 0) mbar_arrive(free_bars + it % ST);
    };

    float o[D / 2], s[BN / 2];
    unsigned pk[BN / 16][4]; // P_{it-1} in bf16: the A fragments of P V
#pragma unroll
    for (int i = 0; i < D / 2; ++i) o[i] = 0.f;
    SoftmaxRows rows = {WG_NEG_INF, WG_NEG_INF, 0.f, 0.f};

    if (cw == 1) their_turn(); // consumer 0 goes first
    mbar_wait(qfull, 0);
    mbar_wait(kfull, 0);
    my_turn();
    wg_hold(s);
    wg_fence();
    issue_s(s, 0);
    their_turn();
    wg_wait<0>();
    wg_hold(s);
    release(kfree, 0);
    softmax_tile<BN>(s, rows, masked(0), kbeg, rA, stA, stB, t, sl2); // o is zero: no rescale
    pack_frags<BN>(pk, s);
    for (int it = 1; it < ntiles; ++it) {
        mbar_wait(kfull + it % ST, (it / ST) & 1);
        mbar_wait(vfull + (it - 1) % ST, ((it - 1) / ST) & 1);
        my_turn();
        wg_hold(s);
        wg_hold(o);
        wg_hold(pk);
        wg_fence();
        issue_s(s, it);
        issue_pv(o, pk, it - 1);
        their_turn();
        wg_wait<1>(); // s is ready; P V may still run
        wg_hold(s);
        release(kfree, it);
        const float2 a = softmax_tile<BN>(s, rows, masked(it), kbeg + it * BN, rA, stA, stB, t, sl2);
        wg_wait<0>(); // P_{it-1} V_{it-1} is in o: rescale it; P_it may take pk's registers
        wg_hold(o);
        wg_hold(pk);
        release(vfree, it - 1);
#pragma unroll
        for (int dn = 0; dn < NO; ++dn) {
            o[4 * dn] *= a.x;
            o[4 * dn + 1] *= a.x;
            o[4 * dn + 2] *= a.y;
            o[4 * dn + 3] *= a.y;
        }
        pack_frags<BN>(pk, s);
    }
    mbar_wait(vfull + (ntiles - 1) % ST, ((ntiles - 1) / ST) & 1);
    my_turn();
    wg_hold(o);
    wg_hold(pk);
    wg_fence();
    issue_pv(o, pk, ntiles - 1);
    if (cw == 0) their_turn(); // consumer 1's last turn; no turn is left over for consumer 0
    wg_wait<0>();
    wg_hold(o);

    // each consumer stages its own 64 rows of the output over sQ (once both are done reading
    // it) and stores them
    named_sync(3, 256);
    float sA = rows.lA, sB = rows.lB;
    sA += shfl_xor(sA, 1);
    sA += shfl_xor(sA, 2);
    sB += shfl_xor(sB, 1);
    sB += shfl_xor(sB, 2);
    const float iA = sA > 0.f ? 1.f / sA : 0.f, iB = sB > 0.f ? 1.f / sB : 0.f;
    const int row = 64 * cw + 16 * warp + g;
#pragma unroll
    for (int dn = 0; dn < NO; ++dn) {
        stage_pair<D>(sQ, row, dn * 8 + 2 * t, o[4 * dn] * iA, o[4 * dn + 1] * iA);
        stage_pair<D>(sQ, row + 8, dn * 8 + 2 * t, o[4 * dn + 2] * iB, o[4 * dn + 3] * iB);
    }
    if (t == 0) {
        if (rA < N) lse[(long long)h * N + rA] = (rows.mA + log2f(sA)) * LN2;
        if (rB < N) lse[(long long)h * N + rB] = (rows.mB + log2f(sB)) * LN2;
    }
    named_sync(4 + cw, 128);
    store_tile<D, 64, 128>(out + (long long)h * D, sQ + 64 * cw * D, q0 + 64 * cw, N, (long long)Hq * D,
                           tid & 127);
}

// FUSED dkdv (see dkdv_impl): the counter wait and the bulk reduce of the dq accumulator.
WG_DEV unsigned ld_acquire(const unsigned* p) {
    unsigned v;
    asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
}
// four 8 x 8 bf16 matrices from the warp's fragments (lane l holds row l / 4, columns 2 (l % 4)
// and + 1 of matrix i in a[i]) stored transposed: lane 8 i + j gives the address of stored row j
// of matrix i (16 bytes: column j of the fragment's matrix)
WG_DEV void stmatrix_x4_trans(bf16_t* row, const unsigned (&a)[4]) {
    asm volatile("stmatrix.sync.aligned.m8n8.x4.trans.shared.b16 [%0], {%1, %2, %3, %4};" ::"r"(smem_u32(row)),
                 "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3])
                 : "memory");
}
// global f32 dst[i] += shared src[i] for `bytes` bytes (a multiple of 16) by the bulk-copy
// engine, in this thread's bulk group
WG_DEV void bulk_reduce_add(float* dst, const float* src, unsigned bytes) {
    asm volatile("cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;\n"
                 "cp.async.bulk.commit_group;" ::"l"(dst), "r"(smem_u32(src)), "r"(bytes)
                 : "memory");
}

// ---------------------------------------------------------------- backward: dk, dv (and dq)

// Warpgroup 0 is the producer (its thread 0 loads K and V once, then every query tile into
// BWD_STAGES buffers as the consumers free them, at 24 registers); warpgroups 1 and 2 (240
// registers) own keys j0 + 64 c .. + 63 of kv head hk (thread rows kA, kB = j0 + 64 c + 16 w +
// l / 4 (+ 8)) and share every query tile, each at its own pace. Per (query head, 64-query
// tile): s^T = K Q^T and dp^T = V dO^T (SS), then p^T = exp(s^T scale - lse), ds^T = p^T (dp^T -
// dvec), dv += P^T dO and dk += dS^T Q (RS). Against two warpgroups stepping together on block
// barriers with the loads issued between steps, measured on the H200: see benches/RESULTS.md.
// Query tiles (Q, dO, lse, dvec) in BWD_STAGES buffers: they load two steps ahead of their use.
//
// FUSED (D = 128; one launch per kv head hk): the block also forms its keys' part of dq,
// dq_tile (64 x D) += dS (64 x 128) K (128 x D), so no dq kernel recomputes s and dp (5 products
// a tile instead of 7). Each consumer stores its 64 keys' dS transposed (stmatrix) into its
// column half of the step's sdS (queries x keys, K-major A layout; two buffers by step parity,
// so no barrier guards their reuse), issues dv's product, meets the other consumer on one
// barrier (both halves in), issues the tile's dq columns 64 c .. + 63 over all 128 keys (SS,
// B = K MN-major), then dk's product, and stores the dq part in fragment order (float4 stores,
// see attention_dq_from_acc_d128) into sStage while dk's product runs. Off the consumers' path,
// threads 32 and 64 (the producer warpgroup's second and third warps, one per stage buffer)
// add each staged part into the f32 accumulator `dqacc` (a bulk reduce of the whole 64-row
// tile) in key order, so dq is deterministic: tile (head, i0) keeps a counter in `sem`; key
// tile j waits until it equals its rank j - floor(seg_start(i0) / 128), and counts it on once
// its add is done. Two adders keep two adds in flight (one adder waited out each add's write
// before starting the next: 1.2-1.8% of the 8B step at 32k-262k tokens). Query tiles go from
// the last down, heads innermost, so neighbouring key tiles reach a query tile together.
// dqacc and sem start zeroed; a convert kernel writes dq = scale * dqacc in bf16 after the
// launch.
constexpr int BWD_STAGES = 3;

template <int D, bool FUSED>
WG_DEV void dkdv_impl(const float* __restrict__ lse, const float* __restrict__ dvec,
                      const int* __restrict__ cu, int S, int N, int Hq, int Hkv, float scale,
                      int hk, bf16_t* __restrict__ dk, bf16_t* __restrict__ dv,
                      float* __restrict__ dqacc, unsigned* __restrict__ sem,
                      const TmaMap* tq, const TmaMap* tk, const TmaMap* tv, const TmaMap* to) {
    // FUSED: two query-tile stages, so that two staged dq parts fit
    constexpr int BK = 128, BQ = 64, NQ = BQ / 8, NO = D / 8, ST = FUSED ? 2 : BWD_STAGES, SB = 2;
    unsigned char* attn90_smem = swizzle_smem();
    bf16_t* sK = (bf16_t*)attn90_smem;  // (BK, D), later dk
    bf16_t* sV = sK + BK * D;    // (BK, D), later dv
    bf16_t* sQ = sV + BK * D;    // ST x (BQ, D)
    bf16_t* sO = sQ + ST * BQ * D; // ST x (BQ, D): dout
    bf16_t* sdS = sO + ST * BQ * D; // FUSED: 2 x (BQ, BK) dS, queries x keys, step it in it % 2
    float* sStage = (float*)(sdS + (FUSED ? 2 * BQ * BK : 0)); // FUSED: SB x (BQ, D) f32 dq parts
    float* sL = sStage + (FUSED ? SB * BQ * D : 0); // ST x BQ: lse
    float* sD = sL + ST * BQ;               // ST x BQ: dvec
    unsigned long long* kvfull = (unsigned long long*)(sD + ST * BQ); // K and V landed
    unsigned long long* qfull = kvfull + 1; // ST: query tile it landed (phase it / ST)
    unsigned long long* qfree = qfull + ST; // ST: every consumer warp is done with it
    unsigned long long* stage_full = qfree + ST; // FUSED, SB: every consumer warp staged part it
    unsigned long long* stage_free = stage_full + SB; // FUSED, SB: part it was read out
    const int tid = (int)threadIdx.x, wg = tid >> 7;
    const int j0 = (int)blockIdx.y * BK; // all kv heads of a key tile, then the next tile
    const int G = Hq / Hkv;
    const long long kstr = (long long)Hkv * D;
    const int jlast = imin(j0 + BK, N) - 1;
    const int qend = seg_end(cu, S, N, jlast); // queries past this cannot see any key of the tile
    const int nq = (qend - j0 + BQ - 1) / BQ; // query tiles per head
    const int ntiles = G * nq;
    // query tile `it`: its head and first row (FUSED: last tile first, heads innermost)
    auto tile_of = [&](int it, int& h, int& i0) {
        if (FUSED) {
            h = hk * G + it % G;
            i0 = j0 + (nq - 1 - it / G) * BQ;
        } else {
            h = hk * G + it / nq;
            i0 = j0 + (it % nq) * BQ;
        }
    };
    // from query tile it's (h, i0) to tile it + 1's, without tile_of's divisions by G or nq
    auto next_tile = [&](int& h, int& i0) {
        if (FUSED) {
            if (++h == (hk + 1) * G) h = hk * G, i0 -= BQ;
        } else {
            i0 += BQ;
            if (i0 == j0 + nq * BQ) i0 = j0, ++h;
        }
    };

    for (int r = tid; r < ST * BQ; r += 384) sL[r] = sD[r] = 0.f;
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory"); // zeros before the copies
    if (FUSED && tid == 0) {
        for (int i = 0; i < SB; ++i) {
            mbar_init_n(stage_full + i, 8);
            mbar_init(stage_free + i);
        }
    }
    mbar_init_pipeline(kvfull, 1 + ST, ST);
    __syncthreads(); // the last block-wide barrier: the producer's other threads leave below

    if (wg == 0) {
        regs_down<24>();
        if (FUSED && (tid == 32 || tid == 64)) {
            // the ordered adds of the staged dq parts (see above): threads 32 and 64 (warps 1
            // and 2) each own one stage buffer, so two adds are in flight, each counted on as
            // soon as it lands
            static_assert(SB == 2, "one adder thread (32, 64) per stage buffer");
            for (int it = tid / 32 - 1; it < ntiles; it += SB) {
                int h, i0;
                tile_of(it, h, i0);
                const int hl = h - hk * G;
                const int rank = j0 / BK - seg_start(cu, S, i0) / BK;
                unsigned* counter = sem + (long long)hl * ((N + BQ - 1) / BQ) + i0 / BQ;
                const int sb = it % SB;
                mbar_wait(stage_full + sb, (it / SB) & 1);
                // a short sleep between polls: the blocks at one query tile poll one counter
                // (measured 0.27% shorter 64k steps than a tight spin)
                if (rank > 0)
                    while (ld_acquire(counter) != (unsigned)rank) __nanosleep(32);
                asm volatile("fence.proxy.async.global;" ::: "memory");
                const long long np = (long long)(N + BQ - 1) / BQ * BQ; // rows per head, padded
                bulk_reduce_add(dqacc + (hl * np + i0) * D, sStage + sb * BQ * D, BQ * D * 4);
                asm volatile("cp.async.bulk.wait_group.read 0;" ::: "memory");
                mbar_arrive(stage_free + sb);
                asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
                asm volatile("fence.proxy.async.global;" ::: "memory");
                asm volatile("red.release.gpu.global.add.u32 [%0], 1;" ::"l"(counter) : "memory");
            }
            return;
        }
        if (tid != 0) return;
        mbar_expect(kvfull, 2 * BK * D * 2);
        tma_rows(sK, tk, j0, hk, kvfull);
        tma_rows(sV, tv, j0, hk, kvfull);
        // query tile `it` into buffer it % ST: Q and dO by TMA (rows past N read as zeros),
        // the lse and dvec of the rows below N by bulk copies (the rest keep finite stale
        // values, which the mask multiplies by zero)
        for (int it = 0; it < ntiles; ++it) {
            int h, i0;
            tile_of(it, h, i0);
            const int b = it % ST;
            const unsigned rows = (unsigned)imin(BQ, N - i0); // a multiple of 8: N is
            if (it >= ST) mbar_wait(qfree + b, (it / ST - 1) & 1);
            mbar_expect(qfull + b, 2 * BQ * D * 2 + 2 * rows * 4);
            tma_rows(sQ + b * BQ * D, tq, i0, h, qfull + b);
            tma_rows(sO + b * BQ * D, to, i0, h, qfull + b);
            bulk_copy(sL + b * BQ, lse + (long long)h * N + i0, rows * 4, qfull + b);
            bulk_copy(sD + b * BQ, dvec + (long long)h * N + i0, rows * 4, qfull + b);
        }
        return;
    }

    regs_up<240>();
    const int cw = warp_uniform(wg - 1), warp = (tid >> 5) & 3; // cw: uniform
    const int l = tid & 31, g = l >> 2, t = l & 3;
    const float sl2 = scale * LOG2E;
    const int first_end = seg_end(cu, S, N, j0);
    const int kA = j0 + 64 * cw + 16 * warp + g, kB = kA + 8;
    const int eA = kA < N ? seg_end(cu, S, N, kA) : 0, eB = kB < N ? seg_end(cu, S, N, kB) : 0;

    float ak[D / 2], av[D / 2];
#pragma unroll
    for (int i = 0; i < D / 2; ++i) ak[i] = av[i] = 0.f;
    mbar_wait(kvfull, 0);

    int h, i0; // the consumers' query tile
    tile_of(0, h, i0);
    for (int it = 0; it < ntiles; ++it, next_tile(h, i0)) {
        const int b = it % ST;
        const bf16_t* qt = sQ + b * BQ * D;
        const bf16_t* ot = sO + b * BQ * D;
        const float* lt = sL + b * BQ;
        const float* dt = sD + b * BQ;
        mbar_wait(qfull + b, (it / ST) & 1);

        // dp^T starts at dvec (query c's in column c) and takes V's products negated, so it
        // holds dvec - dp^T: ds^T = p^T (dp^T - dvec) is then one multiply, by -p
        float s[BQ / 2], dp[BQ / 2];
#pragma unroll
        for (int nt = 0; nt < NQ; ++nt) {
#pragma unroll
            for (int e = 0; e < 4; ++e) dp[4 * nt + e] = dt[nt * 8 + 2 * t + (e & 1)];
        }
        wg_hold(dp); // each in its own register before the products (else ptxas waits, C7517)
        wg_fence();
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
            wgmma_ss(s, desc_k<D, BK>(sK, 64 * cw, kk), desc_k<D, BQ>(qt, 0, kk), kk);
            wgmma_ss<0, -1>(dp, desc_k<D, BK>(sV, 64 * cw, kk), desc_k<D, BQ>(ot, 0, kk), 1);
        }
        wg_commit();
        wg_wait();
        wg_hold(s);
        wg_hold(dp);

        // scores that query i may not see of key j: -inf, so p = 0 (and ds = 0: dvec - dp is
        // finite); tiles all visible skip the test
        if (!(i0 >= j0 + BK - 1 && i0 + BQ <= first_end && j0 + BK <= N)) {
#pragma unroll
            for (int nt = 0; nt < NQ; ++nt) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int i = i0 + nt * 8 + 2 * t + (e & 1);
                    const int j = e < 2 ? kA : kB, end = e < 2 ? eA : eB;
                    if (i < j || i >= end) s[4 * nt + e] = WG_NEG_INF;
                }
            }
        }
#pragma unroll
        for (int nt = 0; nt < NQ; ++nt) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int c = nt * 8 + 2 * t + (e & 1);
                const float p = fast_exp2(fmaf(s[4 * nt + e], sl2, -lt[c] * LOG2E));
                s[4 * nt + e] = p;
                dp[4 * nt + e] *= -p;
            }
        }
        unsigned pa[BQ / 16][4], da[BQ / 16][4]; // P^T and dS^T in bf16: A fragments, k = queries
#pragma unroll
        for (int kq = 0; kq < BQ / 16; ++kq) {
#pragma unroll
            for (int r = 0; r < 4; ++r) {
                pa[kq][r] = pack_bf16(s[8 * kq + 2 * r], s[8 * kq + 2 * r + 1]);
                da[kq][r] = pack_bf16(dp[8 * kq + 2 * r], dp[8 * kq + 2 * r + 1]);
            }
        }
        if (FUSED) {
            // this consumer's keys' dS (its accumulators hold dS^T: keys x queries) into column
            // half cw of this step's sdS, transposed by stmatrix: 8 x 8 blocks (query block
            // 2 kq + i / 2, key rows 16 warp + 8 (i % 2) ..) from the A fragments da[kq][i],
            // each stored row 8 keys (16 bytes) of one query, 128-byte swizzled
            bf16_t* ds = sdS + (it & 1) * BQ * BK + cw * BQ * 64;
            const int i = l >> 3, row = l & 7; // lane l: row l % 8 of matrix l / 8
#pragma unroll
            for (int kq = 0; kq < BQ / 16; ++kq) {
                const int q = 8 * (2 * kq + (i >> 1)) + row, chunk = 2 * warp + (i & 1);
                stmatrix_x4_trans(ds + q * 64 + ((chunk ^ (q & 7)) << 3), da[kq]);
            }
            asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
        }
        float aq[FUSED ? D / 4 : 1]; // FUSED: dq columns 64 cw .. + 63 of the tile
        wg_fence();
        if constexpr (FUSED) {
            // dv's product, then (once both consumers' dS halves are in) dq's over all 128 keys
            // with dv's in one group, dk's in a second: dq is staged while dk's product runs
            const bf16_t* ds = sdS + (it & 1) * BQ * BK;
#pragma unroll
            for (int kq = 0; kq < BQ / 16; ++kq) wgmma_rs(av, pa[kq], desc_mn<D, BQ>(ot, kq));
            named_sync(2, 256);
#pragma unroll
            for (int kk = 0; kk < BK / 16; ++kk)
                wgmma_ss<1>(aq, desc_k<BK, BQ>(ds, 0, kk), desc_mn<D, BK>(sK + cw * BK * 64, kk), kk);
            wg_commit();
#pragma unroll
            for (int kq = 0; kq < BQ / 16; ++kq) wgmma_rs(ak, da[kq], desc_mn<D, BQ>(qt, kq));
            wg_commit();
            wg_wait<1>();
            wg_hold(aq);
            // the part in fragment order (float4 k of thread x at (k 128 + x) 4 of the
            // consumer's half), once its adder (thread 32 or 64) read out the one SB steps back
            const int sb = it % SB;
            if (it >= SB) mbar_wait(stage_free + sb, (it / SB - 1) & 1);
            float4* part = (float4*)(sStage + sb * BQ * D + cw * BQ * 64) + (tid & 127);
#pragma unroll
            for (int k = 0; k < D / 16; ++k)
                part[k * 128] = make_float4(aq[4 * k], aq[4 * k + 1], aq[4 * k + 2], aq[4 * k + 3]);
            asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
            __syncwarp();
            if (l == 0) mbar_arrive(stage_full + sb);
        } else {
#pragma unroll
            for (int kq = 0; kq < BQ / 16; ++kq) {
                wgmma_rs(av, pa[kq], desc_mn<D, BQ>(ot, kq));
                wgmma_rs(ak, da[kq], desc_mn<D, BQ>(qt, kq));
            }
            wg_commit();
        }
        wg_wait();
        wg_hold(av);
        wg_hold(ak);
        wg_hold(pa);
        wg_hold(da);
        if (l == 0) mbar_arrive(qfree + b);
    }
    // stage dk (times scale) and dv over the K and V tiles (once both consumers are done
    // reading them), then store them
    named_sync(1, 256);
#pragma unroll
    for (int dn = 0; dn < NO; ++dn) {
        const int row = 64 * cw + 16 * warp + g, col = dn * 8 + 2 * t;
        stage_pair<D>(sK, row, col, ak[4 * dn] * scale, ak[4 * dn + 1] * scale);
        stage_pair<D>(sK, row + 8, col, ak[4 * dn + 2] * scale, ak[4 * dn + 3] * scale);
        stage_pair<D>(sV, row, col, av[4 * dn], av[4 * dn + 1]);
        stage_pair<D>(sV, row + 8, col, av[4 * dn + 2], av[4 * dn + 3]);
    }
    named_sync(1, 256);
    store_tile<D, BK, 256>(dk + (long long)hk * D, sK, j0, N, kstr, tid - 128);
    store_tile<D, BK, 256>(dv + (long long)hk * D, sV, j0, N, kstr, tid - 128);
}

// ---------------------------------------------------------------- backward: dq

// Warpgroup 0 is the producer (its thread 0 loads Q and dO once, then K_it and V_it into four
// and three buffers as the consumers free them, at 40 registers); warpgroups 1 and 2 (232
// registers) own queries q0 + 64 c .. + 63 of head h (thread rows rA, rB = q0 + 64 c + 16 w +
// l / 4 (+ 8)) and share every key tile, each at its own pace. Step `it` issues s = Q K_it^T
// and dp = dO V_it^T (SS), then dq += dS_{it-1} K_{it-1} (RS), and forms ds_it = p (dp - dvec)
// while that last product runs; V_it is free once s and dp are, K_{it-1} once dq's product is.
template <int D>
WG_DEV void dq_impl(const float* __restrict__ lse, const float* __restrict__ dvec,
                    const int* __restrict__ cu, int S, int N, int Hq, int Hkv, float scale,
                    bf16_t* __restrict__ dq, const TmaMap* tq, const TmaMap* tk, const TmaMap* tv,
                    const TmaMap* to) {
    constexpr int BQ = 128, BK = 64, NO = D / 8;
    constexpr int KB = BWD_STAGES + 1, VB = BWD_STAGES; // K_{it-1} is read during step it
    unsigned char* attn90_smem = swizzle_smem();
    bf16_t* sQ = (bf16_t*)attn90_smem; // (BQ, D), later dq
    bf16_t* sO = sQ + BQ * D;          // (BQ, D): dout
    bf16_t* sK = sO + BQ * D;          // KB x (BK, D): K_it in buffer it % KB
    bf16_t* sV = sK + KB * BK * D;     // VB x (BK, D): V_it in buffer it % VB
    unsigned long long* qfull = (unsigned long long*)(sV + VB * BK * D); // Q and dO landed
    unsigned long long* kfull = qfull + 1;  // KB: K_it landed (phase it / KB)
    unsigned long long* vfull = kfull + KB; // VB: V_it landed (phase it / VB)
    unsigned long long* kfree = vfull + VB; // KB: every consumer warp is done with K_it
    unsigned long long* vfree = kfree + KB; // VB: ... with V_it
    const int tid = (int)threadIdx.x, wg = tid >> 7;
    const int q0 = (int)(gridDim.y - 1 - blockIdx.y) * BQ; // longest rows first, all heads
    const int h = (int)blockIdx.x, hk = h / (Hq / Hkv);
    const int kend = imin(q0 + BQ, N);
    const int kbeg = seg_start(cu, S, q0) & ~7; // key tiles start on a row group (TMA boxes)
    const int last_start = seg_start(cu, S, kend - 1);
    const int ntiles = (kend - kbeg + BK - 1) / BK;

    mbar_init_pipeline(qfull, 1 + KB + VB, KB + VB);
    __syncthreads(); // the last block-wide barrier: the producer's other threads leave below

    if (wg == 0) {
        regs_down<40>();
        if (tid != 0) return;
        mbar_expect(qfull, 2 * BQ * D * 2);
        tma_rows(sQ, tq, q0, h, qfull);
        tma_rows(sO, to, q0, h, qfull);
        produce_kv<D, BK, KB, VB>(tk, tv, hk, kbeg, ntiles, sK, sV, kfull, kfree, vfull, vfree);
        return;
    }

    regs_up<232>();
    const int cw = warp_uniform(wg - 1), warp = (tid >> 5) & 3; // cw: uniform
    const int l = tid & 31, g = l >> 2, t = l & 3;
    const float sl2 = scale * LOG2E;
    const int rA = q0 + 64 * cw + 16 * warp + g, rB = rA + 8;
    const int stA = seg_start(cu, S, imin(rA, N - 1)), stB = seg_start(cu, S, imin(rB, N - 1));
    const float LA = rA < N ? lse[(long long)h * N + rA] * LOG2E : WG_POS_INF;
    const float LB = rB < N ? lse[(long long)h * N + rB] * LOG2E : WG_POS_INF;
    const float DA = rA < N ? dvec[(long long)h * N + rA] : 0.f;
    const float DB = rB < N ? dvec[(long long)h * N + rB] : 0.f;
    auto kbuf = [&](int it) { return sK + (it % KB) * BK * D; };
    auto vbuf = [&](int it) { return sV + (it % VB) * BK * D; };
    auto wait_tiles = [&](int it) {
        mbar_wait(kfull + it % KB, (it / KB) & 1);
        mbar_wait(vfull + it % VB, (it / VB) & 1);
    };
    auto release = [&](unsigned long long* free_bars, int b) {
        if (l == 0) mbar_arrive(free_bars + b);
    };
    auto issue_s_dp = [&](float (&s)[BK / 2], float (&dp)[BK / 2], int it) {
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
            wgmma_ss(s, desc_k<D, BQ>(sQ, 64 * cw, kk), desc_k<D, BK>(kbuf(it), 0, kk), kk);
            wgmma_ss(dp, desc_k<D, BQ>(sO, 64 * cw, kk), desc_k<D, BK>(vbuf(it), 0, kk), kk);
        }
        wg_commit();
    };
    auto issue_dq = [&](float (&a)[D / 2], unsigned (&da)[BK / 16][4], int it) {
#pragma unroll
        for (int kk = 0; kk < BK / 16; ++kk) wgmma_rs(a, da[kk], desc_mn<D, BK>(kbuf(it), kk));
        wg_commit();
    };
    // dp <- ds = p (dp - dvec), p = exp(s scale - lse) where visible (else s = -inf, p = 0),
    // for key tile it; tiles all visible skip the test
    auto form_ds = [&](float (&s)[BK / 2], float (&dp)[BK / 2], int it) {
        const int j0 = kbeg + it * BK;
        if (!(j0 + BK - 1 <= q0 && j0 >= last_start)) mask_rows<BK>(s, j0, rA, stA, stB, t);
#pragma unroll
        for (int nt = 0; nt < BK / 8; ++nt) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const float p = fast_exp2(fmaf(s[4 * nt + e], sl2, -(e < 2 ? LA : LB)));
                dp[4 * nt + e] = p * (dp[4 * nt + e] - (e < 2 ? DA : DB));
            }
        }
    };

    float a[D / 2], s[BK / 2], dp[BK / 2];
    unsigned da[BK / 16][4]; // dS_{it-1} in bf16: A fragments, k = keys
#pragma unroll
    for (int i = 0; i < D / 2; ++i) a[i] = 0.f;

    mbar_wait(qfull, 0);
    wait_tiles(0);
    wg_hold(s);
    wg_hold(dp);
    wg_fence();
    issue_s_dp(s, dp, 0);
    wg_wait<0>();
    wg_hold(s);
    wg_hold(dp);
    release(vfree, 0);
    form_ds(s, dp, 0);
    pack_frags<BK>(da, dp);
    for (int it = 1; it < ntiles; ++it) {
        wait_tiles(it);
        wg_hold(s);
        wg_hold(dp);
        wg_hold(a);
        wg_hold(da);
        wg_fence();
        issue_s_dp(s, dp, it);
        issue_dq(a, da, it - 1);
        wg_wait<1>(); // s, dp are ready; dq += dS K may still run
        wg_hold(s);
        wg_hold(dp);
        release(vfree, it % VB);
        form_ds(s, dp, it);
        wg_wait<0>();
        wg_hold(a);
        wg_hold(da);
        release(kfree, (it - 1) % KB);
        pack_frags<BK>(da, dp);
    }
    wg_hold(a);
    wg_hold(da);
    wg_fence();
    issue_dq(a, da, ntiles - 1);
    wg_wait<0>();
    wg_hold(a);
    // each consumer stages its own rows of dq over sQ once both are done reading it
    named_sync(1, 256);
#pragma unroll
    for (int dn = 0; dn < NO; ++dn) {
        const int row = 64 * cw + 16 * warp + g, col = dn * 8 + 2 * t;
        stage_pair<D>(sQ, row, col, a[4 * dn] * scale, a[4 * dn + 1] * scale);
        stage_pair<D>(sQ, row + 8, col, a[4 * dn + 2] * scale, a[4 * dn + 3] * scale);
    }
    named_sync(1, 256);
    store_tile<D, BQ, 256>(dq + (long long)h * D, sQ, q0, N, (long long)Hq * D, tid - 128);
}

} // namespace attn90

// ---------------------------------------------------------------- entry points
// Dynamic shared memory (bytes), as the launcher computes it (64: the mbarriers):
//   fwd  (128 + 4 * 128) * D * 2 + 128
//   dkdv (2 * 128 + 6 * 64) * D * 2 + 6 * 64 * 4 + 64    dq (2 * 128 + 7 * 64) * D * 2 + 128
//   dkdvdq (two query stages) (2 * 128 + 4 * 64) * D * 2 + 2 * 64 * 128 * 2 (sdS) + 2 * 64 * D * 4
//          (sStage) + 4 * 64 * 4 + 128 (the mbarriers)
// The TMA maps describe q, dout (Hq heads) and k, v (Hkv heads) with boxes of the kernel's
// tile rows: fwd 128 for all; dkdv 128 for k, v and 64 for q, dout; dq 128 for q, dout and 64
// for k, v.

// The forward (its consumers' 232 registers hold a 64 x 128 score tile and a 64 x D output).
#define ATTN90_FWD(D)                                                                                      \
    extern "C" __global__ void __launch_bounds__(384, 1) attention_fwd_sm90_d##D(                          \
        const int* cu, int num_seqs, int n_tokens, int hq, int hkv, float scale, bf16_t* out, float* lse,    \
        const __grid_constant__ attn90::TmaMap tq, const __grid_constant__ attn90::TmaMap tk,             \
        const __grid_constant__ attn90::TmaMap tv) {                                                       \
        attn90::fwd_impl<D>(cu, num_seqs, n_tokens, hq, hkv, scale, out, lse, &tq, &tk, &tv);            \
    }

#define ATTN90_ENTRIES(D)                                                                                    \
    ATTN90_FWD(D)                                                                                            \
    extern "C" __global__ void __launch_bounds__(384, 1) attention_bwd_dq_sm90_d##D(                         \
        const float* lse, const float* dvec, const int* cu, int num_seqs, int n_tokens, int hq, int hkv,      \
        float scale, bf16_t* dq, const __grid_constant__ attn90::TmaMap tq,                                  \
        const __grid_constant__ attn90::TmaMap tk, const __grid_constant__ attn90::TmaMap tv,               \
        const __grid_constant__ attn90::TmaMap to) {                                                         \
        attn90::dq_impl<D>(lse, dvec, cu, num_seqs, n_tokens, hq, hkv, scale, dq, &tq, &tk, &tv, &to);      \
    }                                                                                                        \
    extern "C" __global__ void __launch_bounds__(384, 1) attention_bwd_dkdv_sm90_d##D(                       \
        const float* lse, const float* dvec, const int* cu, int num_seqs, int n_tokens, int hq, int hkv,      \
        float scale, bf16_t* dk, bf16_t* dv, const __grid_constant__ attn90::TmaMap tq,                      \
        const __grid_constant__ attn90::TmaMap tk, const __grid_constant__ attn90::TmaMap tv,               \
        const __grid_constant__ attn90::TmaMap to) {                                                         \
        attn90::dkdv_impl<D, false>(lse, dvec, cu, num_seqs, n_tokens, hq, hkv, scale, (int)blockIdx.x, dk,  \
                                    dv, nullptr, nullptr, &tq, &tk, &tv, &to);                              \
    }

ATTN90_ENTRIES(64)
ATTN90_ENTRIES(128)

// dk, dv and dq's f32 accumulator in one pass (D = 128): kv head hk's key tiles, grid
// (1, ceil(N / 128)); dqacc (Hq / Hkv, N rounded up to 64, D) f32 in fragment order (see attention_dq_from_acc_d128) and sem (Hq / Hkv, ceil(N / 64)) u32, both
// zeroed, serve this launch's query heads (see dkdv_impl).
extern "C" __global__ void __launch_bounds__(384, 1) attention_bwd_dkdvdq_sm90_d128(
    const float* lse, const float* dvec, const int* cu, int num_seqs, int n_tokens, int hq, int hkv,
    float scale, int hk, bf16_t* dk, bf16_t* dv, float* dqacc, unsigned* sem,
    const __grid_constant__ attn90::TmaMap tq, const __grid_constant__ attn90::TmaMap tk,
    const __grid_constant__ attn90::TmaMap tv, const __grid_constant__ attn90::TmaMap to) {
    attn90::dkdv_impl<128, true>(lse, dvec, cu, num_seqs, n_tokens, hq, hkv, scale, hk, dk, dv, dqacc, sem,
                                 &tq, &tk, &tv, &to);
}

// dq (N, Hq, 128) bf16 of query heads h0 .. h0 + G - 1 = scale * acc, acc (G, N rounded up to
// 64, 128) f32 in the fused pass's fragment order: a 64-row tile's element (r, c) sits at
// (c / 64) 4096 + (((c % 64) / 8) 128 + x) 4 + 2 ((r / 8) % 2) + c % 2 with thread
// x = 32 (r / 16) + 4 (r % 8) + (c % 8) / 2 of the consumer warpgroup that formed it. A thread
// per 4 elements of a row.
extern "C" __global__ void attention_dq_from_acc_d128(const float* acc, bf16_t* dq, int n_tokens, int hq,
                                                      int h0, int g, float scale) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; // 4-column group index
    if (i >= (long long)g * n_tokens * 32) return;
    const long long row = i >> 5; // hl * N + n
    const int n = (int)(row % n_tokens), hl = (int)(row / n_tokens);
    const long long np = (long long)(n_tokens + 63) / 64 * 64;
    const float* tile = acc + (hl * np + (n & ~63)) * 128;
    const int r = n & 63, c = 4 * (int)(i & 31), cc = c & 63;
    const int x = 32 * (r >> 4) + 4 * (r & 7) + ((cc & 7) >> 1);
    const float* p = tile + (c >> 6) * 4096 + ((cc >> 3) * 128 + x) * 4 + 2 * ((r >> 3) & 1);
    const float2 lo = *(const float2*)p, hi = *(const float2*)(p + 4);
    uint2 o;
    o.x = attn_ptx::pack_bf16(lo.x * scale, lo.y * scale);
    o.y = attn_ptx::pack_bf16(hi.x * scale, hi.y * scale);
    *(uint2*)(dq + ((long long)n * hq + h0 + hl) * 128 + c) = o;
}
