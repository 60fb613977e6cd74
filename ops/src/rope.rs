//! Rotary position embedding (Hugging Face's rotate_half layout), in place on Q or K, with
//! per-token position ids so packed sequences restart at 0; and the cos/sin tables for the
//! default and "llama3" frequency schedules.
use crate::kernels::ROPE as KERNELS;
use ftrt_macros::op;

op! {
    /// RoPE in place on x (N tokens, H heads, D head dim), HF rotate_half layout:
    /// x1 = x[..D/2], x2 = x[D/2..];  y1 = T(x1 * cos1) - T(x2 * sin1),  y2 = T(x2 * cos2) + T(x1 * sin2)
    /// with cos/sin rows picked by the token's position id (tables (P, D) in T, as HF casts them).
    /// Call once for Q (H = query heads) and once for K (H = key/value heads).
    /// Backward (in place on the gradient), with autograd's roundings in T:
    /// dx1 = T(g1 * cos1) + T(g2 * sin2),  dx2 = T(g2 * cos2) - T(g1 * sin1).
    rope(mut x: [N, H, D] T, pos: [N] i32, cos: [P, D] T, sin: [P, D] T) {
        forward for n in N, h in H, c in D / 2 {
            let p = pos[n];
            let x1 = x[n, h, c];
            let x2 = x[n, h, c + D / 2];
            x[n, h, c] = T(x1 * cos[p, c]) - T(x2 * sin[p, c]);
            x[n, h, c + D / 2] = T(x2 * cos[p, c + D / 2]) + T(x1 * sin[p, c + D / 2]);
        }
        backward (dx) -> (dx) for n in N, h in H, c in D / 2 {
            let p = pos[n];
            let g1 = dx[n, h, c];
            let g2 = dx[n, h, c + D / 2];
            dx[n, h, c] = T(g1 * cos[p, c]) + T(g2 * sin[p, c + D / 2]);
            dx[n, h, c + D / 2] = T(g2 * cos[p, c + D / 2]) - T(g1 * sin[p, c]);
        }
        check { D in [2, 4, 8, 16], P in 1..12, pos in 0..P }
    }
}

/// Frequency schedule of the rotary embedding (`rope_scaling` in config.json).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RopeScaling {
    Default,
    /// Llama 3.1's: long wavelengths slowed by `factor`, short ones kept, a smooth blend between.
    Llama3 {
        factor: f32,
        low_freq_factor: f32,
        high_freq_factor: f32,
        original_max_position: f32,
    },
}

/// Inverse frequencies (D/2) f32, computed as transformers does in f32:
/// inv_freq[i] = 1 / theta^(2i / D), then the llama3 adjustment.
pub fn inv_freq(head_dim: usize, theta: f32, scaling: RopeScaling) -> Vec<f32> {
    let base: Vec<f32> = (0..head_dim / 2)
        .map(|i| 1.0 / theta.powf((2 * i) as f32 / head_dim as f32))
        .collect();
    match scaling {
        RopeScaling::Default => base,
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position,
        } => {
            let low_wavelen = original_max_position / low_freq_factor;
            let high_wavelen = original_max_position / high_freq_factor;
            base.into_iter()
                .map(|f| {
                    let wavelen = 2.0 * std::f32::consts::PI / f;
                    if wavelen > low_wavelen {
                        f / factor
                    } else if wavelen < high_wavelen {
                        f
                    } else {
                        let smooth = (original_max_position / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .collect()
        }
    }
}

/// cos and sin tables (P, D) f32 for positions 0..P: angle = pos * inv_freq[i mod D/2]
/// (HF concatenates the frequencies twice). Callers round them to the model's dtype.
pub fn cos_sin_tables(positions: usize, inv_freq: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let d = inv_freq.len() * 2;
    let mut cos = Vec::with_capacity(positions * d);
    let mut sin = Vec::with_capacity(positions * d);
    for p in 0..positions {
        for i in 0..d {
            let a = p as f32 * inv_freq[i % (d / 2)];
            cos.push(a.cos());
            sin.push(a.sin());
        }
    }
    (cos, sin)
}

#[cfg(test)]
mod tests;
