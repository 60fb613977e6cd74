//! Arena placement: byte offsets for time intervals so that intervals live at the same time
//! never share bytes.
//!
//! Greedy by size with best fit (as in Pisarchyk & Lee, "Efficient Memory Management for Deep
//! Neural Net Inference", 2020): segments in order of decreasing size; each goes into the
//! smallest gap, among the segments already placed that overlap it in time, that holds it, or
//! on top of them. Ties break on start, end and tensor id, so plans are deterministic.
//! Cost: O(n^2 log n) for n segments.

use super::Segment;

/// Rounds `bytes` up to a multiple of `align` (a power of two).
pub fn align_up(bytes: usize, align: usize) -> usize {
    bytes.div_ceil(align) * align
}

/// Assigns `offset` to every segment (sizes already aligned); returns the arena size.
pub fn place(segments: &mut [Segment]) -> usize {
    let mut order: Vec<usize> = (0..segments.len()).collect();
    order.sort_by(|&a, &b| {
        let (x, y) = (&segments[a], &segments[b]);
        y.bytes
            .cmp(&x.bytes)
            .then(x.start.cmp(&y.start))
            .then(y.end.cmp(&x.end))
            .then(x.tensor.cmp(&y.tensor))
    });
    let mut placed: Vec<usize> = Vec::with_capacity(segments.len());
    let mut arena = 0;
    let mut overlapping: Vec<(usize, usize)> = Vec::new();
    for &i in &order {
        let (start, end, size) = (segments[i].start, segments[i].end, segments[i].bytes);
        overlapping.clear();
        overlapping.extend(
            placed
                .iter()
                .map(|&j| &segments[j])
                .filter(|s| s.start <= end && start <= s.end && s.bytes > 0)
                .map(|s| (s.offset, s.offset + s.bytes)),
        );
        overlapping.sort_unstable();
        let mut best: Option<(usize, usize)> = None; // (gap size, offset)
        let mut top = 0;
        for &(lo, hi) in &overlapping {
            if lo >= top {
                let gap = lo - top;
                if gap >= size && best.is_none_or(|(g, _)| gap < g) {
                    best = Some((gap, top));
                }
            }
            top = top.max(hi);
        }
        let offset = best.map_or(top, |(_, off)| off);
        segments[i].offset = offset;
        arena = arena.max(offset + size);
        placed.push(i);
    }
    arena
}

/// Sum of segment sizes live at each node index `0..nodes`.
pub fn live_profile(segments: &[Segment], nodes: usize) -> Vec<usize> {
    let mut diff = vec![0i128; nodes + 1];
    for s in segments {
        diff[s.start] += s.bytes as i128;
        diff[s.end + 1] -= s.bytes as i128;
    }
    let mut live = Vec::with_capacity(nodes);
    let mut acc = 0i128;
    for d in &diff[..nodes] {
        acc += d;
        live.push(acc as usize);
    }
    live
}

/// Places the offloaded tensors in the pinned host pool; returns the pool size. A tensor
/// occupies its host region from its device-to-host copy (issued after node `d2h_after`) until
/// its prefetch has landed (the compute stream waits for it before node `first_consumer`), i.e.
/// over nodes `[d2h_after, first_consumer - 1]`: a tensor whose copy out is issued at or after
/// another's first consumer may reuse that one's bytes, because its copy waits for an event
/// recorded after the compute stream has waited for the other's prefetch.
pub fn place_host(offloads: &mut [super::OffloadSpec]) -> usize {
    let mut segs: Vec<Segment> = offloads
        .iter()
        .map(|o| Segment {
            tensor: o.tensor,
            start: o.d2h_after,
            end: o.first_consumer - 1,
            bytes: align_up(o.bytes, super::ARENA_ALIGNMENT),
            offset: 0,
        })
        .collect();
    let pool = place(&mut segs);
    for (o, s) in offloads.iter_mut().zip(&segs) {
        o.host_offset = s.offset;
    }
    pool
}
