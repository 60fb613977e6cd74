//! The order micro-batches are drawn in: epoch after epoch, each a permutation of the packed
//! batches drawn from the seed and the epoch number. The position in this endless stream (how
//! many micro-batches were consumed) is all a checkpoint needs to resume the data exactly.

use super::rng::SplitMix64;

/// Stream tag of the epoch shuffles, mixed with the epoch number.
const SHUFFLE_STREAM: u64 = 0x5348_5546_0000_0000;

/// An endless, seeded, epoch-shuffled order over `len` batches.
#[derive(Debug, Clone)]
pub struct BatchStream {
    len: usize,
    seed: u64,
    epoch: Option<u64>,
    order: Vec<usize>,
}

impl BatchStream {
    /// The stream over `len > 0` batches.
    pub fn new(len: usize, seed: u64) -> Self {
        Self {
            len,
            seed,
            epoch: None,
            order: Vec::new(),
        }
    }

    /// The batch index at stream position `k` (0-based).
    pub fn at(&mut self, k: u64) -> usize {
        let n = self.len as u64;
        let epoch = k / n;
        if self.epoch != Some(epoch) {
            self.order =
                SplitMix64::derived(self.seed, SHUFFLE_STREAM | epoch).permutation(self.len);
            self.epoch = Some(epoch);
        }
        self.order[(k % n) as usize]
    }

    /// Epochs done at stream position `k` (fractional).
    pub fn epoch_at(&self, k: u64) -> f64 {
        k as f64 / self.len as f64
    }
}

#[cfg(test)]
mod tests {
    use super::BatchStream;

    #[test]
    fn every_epoch_visits_every_batch_once_in_a_new_order() {
        let mut s = BatchStream::new(7, 3);
        let e0: Vec<usize> = (0..7).map(|k| s.at(k)).collect();
        let e1: Vec<usize> = (7..14).map(|k| s.at(k)).collect();
        let (mut a, mut b) = (e0.clone(), e1.clone());
        a.sort_unstable();
        b.sort_unstable();
        assert_eq!(a, (0..7).collect::<Vec<_>>());
        assert_eq!(b, a);
        assert_ne!(e0, e1);
        // Random access gives the same answers as sequential reading.
        assert_eq!(BatchStream::new(7, 3).at(9), e1[2]);
    }
}
