//! PEFT's default initialisation (`init_lora_weights=True`): `nn.init.kaiming_uniform_(A,
//! a=math.sqrt(5))` and `nn.init.zeros_(B)`.
//!
//! kaiming_uniform with a = sqrt(5): gain = sqrt(2 / (1 + a^2)) = sqrt(1/3), std = gain /
//! sqrt(fan_in), bound = sqrt(3) * std = 1 / sqrt(fan_in), with fan_in = in_features (A is
//! (r, in)). So every A value is U(-1/sqrt(in), 1/sqrt(in)). The draws come from our own seeded
//! generator, so they match PEFT's distribution, not torch's exact numbers.

use crate::train::rng::SplitMix64;

/// Bound of PEFT's A initialisation for a module with `in_features` inputs: 1 / sqrt(in).
pub fn kaiming_uniform_bound(in_features: usize) -> f32 {
    (1.0 / (in_features as f64).sqrt()) as f32
}

/// Fills `a` with U(-bound, bound), bound = 1/sqrt(in_features).
pub fn kaiming_uniform(a: &mut [f32], in_features: usize, rng: &mut SplitMix64) {
    let bound = kaiming_uniform_bound(in_features);
    for x in a.iter_mut() {
        *x = bound * (2.0 * rng.next_f32() - 1.0);
    }
}
