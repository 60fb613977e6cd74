// Packed-sequence lookups shared by attention.cu and attention_sm90.cu (build.rs pastes this
// file in place of its #include, so each generated kernel file stands alone). The includer
// defines ATTN_DEV.
//
// cu_seqlens (S + 1 prefix sums, cu[0] = 0) cuts the token axis into segments; tokens at or
// after cu[S] (padding up to N) form one more trailing segment, number S.
#ifndef FTRT_ATTENTION_SEGMENTS
#define FTRT_ATTENTION_SEGMENTS
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
#endif
