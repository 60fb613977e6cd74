//! Row-parallel loops for the CPU references. An output of equal rows (token-major, say
//! (N, H, D)) is cut into blocks of whole rows, and scoped threads take the blocks in turn
//! (thread t the blocks t, t + T, t + 2T, ...), so that work growing along the rows (causal
//! attention: a query row sees more keys the later it is) is shared evenly. Each row is
//! computed by the same code as in a serial loop, so the results are bit-identical to it
//! whatever the thread count.

use std::ops::Range;

/// `FTRT_CPU_THREADS`: how many threads the CPU references use (default: the machine's
/// available parallelism; `1` runs every loop on the calling thread). Read at the first loop.
pub const CPU_THREADS_ENV: &str = "FTRT_CPU_THREADS";

/// Blocks a thread takes in turn: enough for a row-growing load to even out.
const BLOCKS_PER_THREAD: usize = 8;

/// Threads the CPU references use ([`CPU_THREADS_ENV`]), read once a process.
fn cpu_threads() -> usize {
    static THREADS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *THREADS.get_or_init(|| {
        std::env::var(CPU_THREADS_ENV)
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .filter(|&t| t > 0)
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
    })
}

/// A block of rows and its slice of each output.
type RowBlock<'a, T, const K: usize> = (Range<usize>, [&'a mut [T]; K]);

/// Runs `work(rows, parts)` over all of `0..rows`, where `parts[k]` is the slice of `outs[k]`
/// that holds those rows (`outs[k]` holds `rows` rows of `outs[k].len() / rows` values each).
/// Blocks of at least `min_block` rows go to up to [`cpu_threads`] threads; with one thread, or
/// too few rows for two blocks, `work` runs once on the calling thread.
pub fn for_row_blocks<T: Send, const K: usize>(
    outs: [&mut [T]; K],
    rows: usize,
    min_block: usize,
    work: impl Fn(Range<usize>, [&mut [T]; K]) + Sync,
) {
    for_row_blocks_on(cpu_threads(), outs, rows, min_block, work)
}

/// [`for_row_blocks`] on up to `threads` threads.
fn for_row_blocks_on<T: Send, const K: usize>(
    threads: usize,
    outs: [&mut [T]; K],
    rows: usize,
    min_block: usize,
    work: impl Fn(Range<usize>, [&mut [T]; K]) + Sync,
) {
    if rows == 0 {
        return;
    }
    let widths = outs.each_ref().map(|o| {
        assert_eq!(
            o.len() % rows,
            0,
            "an output of {rows} rows has {} values",
            o.len()
        );
        o.len() / rows
    });
    let threads = threads.min(rows / min_block.max(1)).max(1);
    if threads == 1 {
        work(0..rows, outs);
        return;
    }
    let block = rows.div_ceil(threads * BLOCKS_PER_THREAD).max(min_block);
    let mut shares: Vec<Vec<RowBlock<T, K>>> = (0..threads).map(|_| Vec::new()).collect();
    let mut rest = outs;
    for (b, first) in (0..rows).step_by(block).enumerate() {
        let take = block.min(rows - first);
        let part = std::array::from_fn(|k| {
            let (head, tail) = std::mem::take(&mut rest[k]).split_at_mut(take * widths[k]);
            rest[k] = tail;
            head
        });
        shares[b % threads].push((first..first + take, part));
    }
    let work = &work;
    std::thread::scope(|s| {
        let mut shares = shares.into_iter();
        let own = shares.next().expect("at least two threads");
        for share in shares {
            s.spawn(move || share.into_iter().for_each(|(r, p)| work(r, p)));
        }
        own.into_iter().for_each(|(r, p)| work(r, p));
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::{fresh_seed, SplitMix64};

    /// Every row is visited once, with its own slices, whatever the thread count, row count and
    /// block size.
    #[test]
    fn every_row_once_with_its_own_slices() {
        let seed = fresh_seed();
        let mut rng = SplitMix64::new(seed);
        for _ in 0..40 {
            let threads = 1 + rng.below(6);
            let rows = 1 + rng.below(300);
            let (wa, wb) = (1 + rng.below(5), 1 + rng.below(3));
            let min_block = 1 + rng.below(40);
            let mut a = vec![0usize; rows * wa];
            let mut b = vec![0usize; rows * wb];
            for_row_blocks_on(
                threads,
                [&mut a, &mut b],
                rows,
                min_block,
                |range, [pa, pb]| {
                    assert_eq!(pa.len(), range.len() * wa);
                    assert_eq!(pb.len(), range.len() * wb);
                    for (i, row) in range.clone().enumerate() {
                        pa[i * wa..][..wa].iter_mut().for_each(|x| *x += row + 1);
                        pb[i * wb..][..wb]
                            .iter_mut()
                            .for_each(|x| *x += 2 * row + 1);
                    }
                },
            );
            for row in 0..rows {
                assert!(
                    a[row * wa..][..wa].iter().all(|&x| x == row + 1),
                    "row {row}, seed {seed}"
                );
                assert!(
                    b[row * wb..][..wb].iter().all(|&x| x == 2 * row + 1),
                    "row {row}, seed {seed}"
                );
            }
        }
    }
}
