//! AdamW against hand-computed steps, and 8-bit AdamW tracking f32 AdamW.
use super::*;
use crate::dsl::gradcheck::Rng;
use crate::dsl::Rounding;

/// One torch AdamW step by hand: p=1, g=0.5, m=v=0, lr=0.1, wd=0.01, t=1:
/// p *= 1 - 0.001 -> 0.999;  m = 0.05;  v = 0.00025;  step_size = 0.1 / 0.1 = 1;
/// denom = sqrt(0.00025) / sqrt(0.001) + 1e-8 = 0.5 + 1e-8;  p = 0.999 - 0.05 / (0.5 + 1e-8).
#[test]
fn adamw_one_step_by_hand() {
    let (mut p, g, mut m, mut v) = (vec![1.0f64], vec![0.5f64], vec![0.0f64], vec![0.0f64]);
    let (b1, b2) = (0.9f32, 0.999f32);
    let step_size = 0.1 / (1.0 - b1);
    let bc2_sqrt = (1.0 - b2).sqrt();
    adamw::forward_cpu::<f64>(
        &adamw::Dims { N: 1 },
        0.1,
        0.01,
        b1,
        b2,
        1e-8,
        step_size,
        bc2_sqrt,
        &mut p,
        &g,
        &mut m,
        &mut v,
        Rounding::EXACT,
    );
    // The betas are f32: 1 - 0.9f32 and 1 - 0.999f32 are not exactly 0.1 and 0.001.
    let (c1, c2) = (1.0 - b1 as f64, 1.0 - b2 as f64);
    assert!((m[0] - c1 * 0.5).abs() < 1e-12, "m = {}", m[0]);
    assert!((v[0] - c2 * 0.25).abs() < 1e-12, "v = {}", v[0]);
    let want = 0.999 - 0.1 / c1 * m[0] / (v[0].sqrt() / c2.sqrt() + 1e-8);
    assert!(
        (want - (0.999 - 0.05 / (0.5 + 1e-8))).abs() < 1e-6,
        "hand value"
    );
    assert!((p[0] - want).abs() < 1e-6, "p = {} want {want}", p[0]);
}

/// Ten steps of 8-bit AdamW on random gradients stay close to f32 AdamW: the quantized
/// states carry the same update to within the dynamic maps' resolution.
#[test]
fn adamw_8bit_tracks_f32_adamw() {
    let mut rng = Rng::fresh("adamw_8bit");
    let n = 256 * 3 + 77;
    let code_m = crate::quant_prelude::dynamic_map_signed();
    let code_v = crate::quant_prelude::dynamic_map_unsigned();
    let p0: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
    let (mut p, mut p8) = (p0.clone(), p0.clone());
    let (mut m, mut v) = (vec![0f32; n], vec![0f32; n]);
    let (mut qm, mut qv) = (vec![0u8; n], vec![0u8; n]);
    let nb = n.div_ceil(256);
    let (mut am, mut av) = (vec![0f32; nb], vec![0f32; nb]);
    let (lr, wd, b1, b2, eps) = (1e-2f32, 0.01f32, 0.9f32, 0.999f32, 1e-8f32);
    for t in 1..=10 {
        let g: Vec<f32> = (0..n).map(|_| (rng.normal() * 0.1) as f32).collect();
        let bc1 = 1.0 - b1.powi(t);
        let bc2_sqrt = (1.0 - b2.powi(t)).sqrt();
        adamw::forward_cpu::<f32>(
            &adamw::Dims { N: n },
            lr,
            wd,
            b1,
            b2,
            eps,
            lr / bc1,
            bc2_sqrt,
            &mut p,
            &g,
            &mut m,
            &mut v,
            Rounding::F32,
        );
        adamw_8bit::forward_cpu::<f32>(
            &adamw_8bit::Dims { N: n },
            b1,
            b2,
            bc2_sqrt * eps,
            -lr * bc2_sqrt / bc1,
            1.0 - lr * wd,
            &mut p8,
            &g,
            &mut qm,
            &mut qv,
            &mut am,
            &mut av,
            &code_m,
            &code_v,
            Rounding::F32,
        );
    }
    let moved: f32 = p.iter().zip(&p0).map(|(a, b)| (a - b).abs()).sum::<f32>() / n as f32;
    let diff: f32 = p.iter().zip(&p8).map(|(a, b)| (a - b).abs()).sum::<f32>() / n as f32;
    assert!(
        moved > 0.02,
        "AdamW moved the parameters by {moved} on average"
    );
    assert!(
        diff < 0.05 * moved,
        "8-bit AdamW differs by {diff} on average against a move of {moved} (seed {})",
        rng.seed
    );
}
