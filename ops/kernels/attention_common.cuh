// What attention.cu and attention_sm90.cu share (build.rs pastes this file in place of its
// #include, so each generated kernel file stands alone): the packed-sequence lookups and, on
// CUDA, the PTX helpers. The includer defines ATTN_DEV.
//
// cu_seqlens (S + 1 prefix sums, cu[0] = 0) cuts the token axis into segments; tokens at or
// after cu[S] (padding up to N) form one more trailing segment, number S.
#ifndef FTRT_ATTENTION_COMMON
#define FTRT_ATTENTION_COMMON
namespace attn_segments {

// segment of token i: the largest s with cu[s] <= i
ATTN_DEV int seg_of(const int* cu, int S, int i) {
    int lo = 0, hi = S + 1;
    while (hi - lo > 1) {
        const int mid = (lo + hi) >> 1;
        if (cu[mid] <= i) lo = mid;
        else hi = mid;
    }
    return lo;
}
// first token of i's segment
ATTN_DEV int seg_start(const int* cu, int S, int i) { return cu[seg_of(cu, S, i)]; }
// one past the last token of i's segment
ATTN_DEV int seg_end(const int* cu, int S, int N, int i) {
    const int s = seg_of(cu, S, i);
    return s < S ? cu[s + 1] : N;
}
ATTN_DEV int imin(int a, int b) { return a < b ? a : b; }

} // namespace attn_segments

#if !defined(FTRT_ATTN_PORTABLE) && !defined(FTRT_ATTN_CPU_SIM)
namespace attn_ptx {
// a generic pointer into shared memory as the 32-bit shared address PTX takes
ATTN_DEV unsigned smem_u32(const void* p) {
    unsigned r;
    asm("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(r) : "l"(p));
    return r;
}
ATTN_DEV float fast_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}
ATTN_DEV float shfl_xor(float v, int m) { return __shfl_xor_sync(0xffffffffu, v, m, 32); }
// two floats -> bf16x2 in one 32-bit register, lo in the low half (MMA fragment order)
ATTN_DEV unsigned pack_bf16(float lo, float hi) {
    unsigned r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}
} // namespace attn_ptx
#endif
#endif
