//! The one seeded PRNG of the project (splitmix64): random test inputs and graphs, the
//! selftests, random benchmark weights, LoRA init, data order, dropout and sampling. Seeded per
//! use from a run's seed and a counter ([`SplitMix64::derived`]), so a resumed training run
//! draws exactly what an uninterrupted one would without saving more than a seed.

/// splitmix64 (Steele, Lea, Flood 2014): 64-bit state, passes BigCrush, one add + mix per draw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SplitMix64 {
    state: u64,
}

/// A seed drawn from the clock (nanoseconds since the epoch), for inputs drawn fresh each run;
/// print it with the result so a failure can be replayed.
pub fn fresh_seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(7, |d| d.as_nanos() as u64)
}

/// The state increment (2^64 / golden ratio).
const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

impl SplitMix64 {
    /// A generator whose whole future depends only on `seed`.
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }
    /// A generator for one purpose (`stream`, e.g. "epoch 3 shuffle") derived from `seed`.
    pub fn derived(seed: u64, stream: u64) -> Self {
        let mut mix = Self::new(seed ^ stream.wrapping_mul(0xD1B5_4A32_D192_ED03));
        Self::new(mix.next_u64())
    }
    /// The draw number `n` (from 0) of the generator seeded with `seed`, without stepping
    /// through the others: a counter-based hash (the GPU sampler draws this way per element).
    pub fn nth(seed: u64, n: u64) -> u64 {
        Self::new(seed.wrapping_add(n.wrapping_mul(GAMMA))).next_u64()
    }
    /// The current state (what a checkpoint saves).
    pub fn state(&self) -> u64 {
        self.state
    }
    /// Uniform u64.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(GAMMA);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, n), `n` > 0, by rejection so no value is favoured.
    pub fn below(&mut self, n: usize) -> usize {
        let bound = n as u64;
        let zone = u64::MAX - u64::MAX % bound;
        loop {
            let value = self.next_u64();
            if value < zone {
                return (value % bound) as usize;
            }
        }
    }
    /// Uniform in [0, 1) with 24 random bits (every value exactly representable in f32).
    pub fn next_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 * (1.0 / (1u64 << 24) as f32)
    }
    /// A Fisher-Yates permutation of `0..len`.
    pub fn permutation(&mut self, len: usize) -> Vec<usize> {
        let mut order: Vec<usize> = (0..len).collect();
        for i in (1..len).rev() {
            order.swap(i, self.below(i + 1));
        }
        order
    }
    /// `n` draws from N(0, std^2) (Box-Muller on pairs of [`Self::next_f32`]).
    pub fn normals_f32(&mut self, n: usize, std: f32) -> Vec<f32> {
        let mut v = Vec::with_capacity(n + 1);
        while v.len() < n {
            let u1 = self.next_f32().max(1e-7);
            let u2 = self.next_f32();
            let r = (-2.0 * u1.ln()).sqrt() * std;
            let t = 2.0 * std::f32::consts::PI * u2;
            v.push(r * t.cos());
            v.push(r * t.sin());
        }
        v.truncate(n);
        v
    }
    /// Uniform in [lo, hi] inclusive.
    pub fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + self.below(hi - lo + 1)
    }
    /// Uniform f64 in [0, 1) from the top 53 bits.
    pub fn unit_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
    /// Uniform f32 in [-1, 1).
    pub fn symmetric_f32(&mut self) -> f32 {
        (self.unit_f64() * 2.0 - 1.0) as f32
    }
    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        self.unit_f64() < p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_values_streams_and_permutations() {
        // Vigna's splitmix64.c, seed 1234567.
        let mut rng = SplitMix64::new(1_234_567);
        assert_eq!(rng.next_u64(), 6_457_827_717_110_365_317);
        assert_eq!(rng.next_u64(), 3_203_168_211_198_807_973);
        let mut again = SplitMix64::new(1_234_567);
        let third = {
            again.next_u64();
            again.next_u64();
            again.next_u64()
        };
        assert_eq!(SplitMix64::nth(1_234_567, 2), third);
        for _ in 0..1000 {
            let x = rng.next_f32();
            assert!((0.0..1.0).contains(&x));
        }
        let mut p = SplitMix64::derived(7, 3).permutation(50);
        assert_eq!(p, SplitMix64::derived(7, 3).permutation(50));
        assert_ne!(p, SplitMix64::derived(7, 4).permutation(50));
        p.sort_unstable();
        assert_eq!(p, (0..50).collect::<Vec<_>>());
        let z = SplitMix64::new(9).normals_f32(20_000, 2.0);
        let mean = z.iter().sum::<f32>() / z.len() as f32;
        let var = z.iter().map(|x| (x - mean) * (x - mean)).sum::<f32>() / z.len() as f32;
        assert!(mean.abs() < 0.05 && (var - 4.0).abs() < 0.2, "{mean} {var}");
    }

    #[test]
    fn deterministic_and_spread() {
        let mut a = SplitMix64::new(7);
        let mut b = SplitMix64::new(7);
        let xs: Vec<u64> = (0..100).map(|_| a.next_u64()).collect();
        assert!(xs.iter().all(|&x| x == b.next_u64()));
        let mean = (0..10_000).map(|_| a.unit_f64()).sum::<f64>() / 10_000.0;
        assert!((mean - 0.5).abs() < 0.02, "{mean}");
        assert!((0..1000).all(|_| a.range(3, 5) >= 3 && a.range(3, 5) <= 5));
    }
}
