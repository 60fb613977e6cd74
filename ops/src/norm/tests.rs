//! RMSNorm (Llama and Gemma) against Hugging Face (`ops/fixtures/hf_rmsnorm_*`, made by
//! `gen_hf_fixtures.py`), hand-computed rows, and edge shapes against a scalar model of
//! transformers' code written out in the test.
use super::*;
use crate::dsl::fixtures::{assert_bf16, assert_close_f32, bf16_round, Bf16Stats, Fixture};
use crate::dsl::gradcheck::Rng;
use crate::dsl::Rounding;

/// eps of the fixture cases c0, c1, c2 (also in the files' `cases` metadata).
const EPS: [f32; 3] = [1e-5, 1e-6, 1e-5];

#[derive(Clone, Copy, PartialEq)]
enum Variant {
    Llama,
    Gemma,
}

struct Out {
    y: Vec<f32>,
    dx: Vec<f32>,
    /// Llama only (Gemma has no dw pass: its weight is frozen under LoRA).
    dw: Option<Vec<f32>>,
}

/// Forward, backward dx (and dw for Llama) of the op on one (R, C) case.
#[allow(clippy::too_many_arguments)]
fn run(
    v: Variant,
    r: usize,
    c: usize,
    eps: f32,
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    rt: Rounding,
) -> Out {
    let mut y = vec![0f32; r * c];
    let mut rstd = vec![0f32; r];
    let mut dx = vec![0f32; r * c];
    match v {
        Variant::Llama => {
            let d = rms_norm::Dims { R: r, C: c };
            rms_norm::forward_cpu::<f32>(&d, eps, x, w, &mut y, &mut rstd, rt);
            rms_norm::backward_dx_cpu::<f32>(&d, x, w, &rstd, dy, &mut dx, rt);
            let mut dw = vec![0f32; c];
            rms_norm::backward_dw_cpu::<f32>(&d, x, &rstd, dy, &mut dw, rt);
            Out {
                y,
                dx,
                dw: Some(dw),
            }
        }
        Variant::Gemma => {
            let d = rms_norm_gemma::Dims { R: r, C: c };
            rms_norm_gemma::forward_cpu::<f32>(&d, eps, x, w, &mut y, &mut rstd, rt);
            rms_norm_gemma::backward_dx_cpu::<f32>(&d, x, w, &rstd, dy, &mut dx, rt);
            Out { y, dx, dw: None }
        }
    }
}

fn file(v: Variant, dtype: &str) -> Fixture {
    let f = Fixture::load(&format!(
        "hf_rmsnorm_{}_{dtype}.safetensors",
        if v == Variant::Llama {
            "llama"
        } else {
            "gemma"
        }
    ));
    let cases = f.meta("cases");
    for e in ["\"eps\": 1e-05", "\"eps\": 1e-06"] {
        assert!(cases.contains(e), "{}: cases {cases} lack {e}", f.name);
    }
    f
}

/// f32: every output within 1e-5 of the reference's scale.
fn parity_f32(v: Variant) {
    let f = file(v, "f32");
    for (i, eps) in EPS.iter().enumerate() {
        let p = format!("c{i}.");
        let shape = f.shape(&format!("{p}x"));
        let (r, c) = (shape[0], shape[1]);
        let (x, w, dy) = (
            f.f32s(&format!("{p}x")),
            f.f32s(&format!("{p}w")),
            f.f32s(&format!("{p}dy")),
        );
        let out = run(v, r, c, *eps, &x, &w, &dy, Rounding::F32);
        assert_close_f32(
            &format!("{} {p}y", f.name),
            &out.y,
            &f.f32s(&format!("{p}y")),
            1e-5,
        );
        assert_close_f32(
            &format!("{} {p}dx", f.name),
            &out.dx,
            &f.f32s(&format!("{p}dx")),
            1e-5,
        );
        if let Some(dw) = out.dw {
            assert_close_f32(
                &format!("{} {p}dw", f.name),
                &dw,
                &f.f32s(&format!("{p}dw")),
                1e-5,
            );
        }
    }
}

/// bf16: the op in `Rounding::BF16` on the same bf16 inputs; returns (y, dx, dw) statistics.
fn parity_bf16(v: Variant) -> [Bf16Stats; 3] {
    let f = file(v, "bf16");
    let mut all = [Bf16Stats::default(); 3];
    for (i, eps) in EPS.iter().enumerate() {
        let p = format!("c{i}.");
        let shape = f.shape(&format!("{p}x"));
        let (r, c) = (shape[0], shape[1]);
        let (x, w, dy) = (
            f.f32s(&format!("{p}x")),
            f.f32s(&format!("{p}w")),
            f.f32s(&format!("{p}dy")),
        );
        let out = run(v, r, c, *eps, &x, &w, &dy, Rounding::BF16);
        all[0].add(assert_bf16(
            &format!("{} {p}y", f.name),
            &out.y,
            &f.f32s(&format!("{p}y")),
            0.99,
            1.0,
        ));
        all[1].add(assert_bf16(
            &format!("{} {p}dx", f.name),
            &out.dx,
            &f.f32s(&format!("{p}dx")),
            0.95,
            1.0,
        ));
        if let Some(dw) = out.dw {
            all[2].add(assert_bf16(
                &format!("{} {p}dw", f.name),
                &dw,
                &f.f32s(&format!("{p}dw")),
                0.95,
                1.0,
            ));
        }
    }
    eprintln!("{} all cases: y {} | dx {}", f.name, all[0], all[1]);
    if v == Variant::Llama {
        eprintln!("{} all cases: dw {}", f.name, all[2]);
    }
    all
}

#[test]
fn llama_matches_hf_f32() {
    parity_f32(Variant::Llama);
}

#[test]
fn gemma_matches_hf_f32() {
    parity_f32(Variant::Gemma);
}

#[test]
fn llama_matches_hf_bf16() {
    parity_bf16(Variant::Llama);
}

#[test]
fn gemma_matches_hf_bf16() {
    parity_bf16(Variant::Gemma);
}

/// One row of four by hand, eps = 0, exact arithmetic:
/// x = [1, 2, 2, 4]: mean(x^2) = (1 + 4 + 4 + 16) / 4 = 25/4, rstd = 2/5, xhat = [0.4, 0.8, 0.8, 1.6].
/// Llama, w = [1, 0.5, -1, 2]: y = w * xhat = [0.4, 0.4, -0.8, 3.2].
/// Gemma, w = [0, -0.5, 1, 0]: y = xhat * (1 + w) = [0.4, 0.4, 1.6, 1.6].
/// Backward, dy = [1, 0, 0, 0]: Llama g = dy * w = [1, 0, 0, 0], mean(g * xhat) = 0.4 / 4 = 0.1,
/// dx = rstd * (g - xhat * 0.1) = 0.4 * [0.96, -0.08, -0.08, -0.16] = [0.384, -0.032, -0.032, -0.064];
/// dw = dy * xhat = [0.4, 0, 0, 0]. Gemma g = dy * (1 + w) = [1, 0, 0, 0]: the same dx.
#[test]
fn one_row_by_hand() {
    let x = [1.0, 2.0, 2.0, 4.0];
    let dy = [1.0, 0.0, 0.0, 0.0];
    let d = rms_norm::Dims { R: 1, C: 4 };
    let (mut y, mut rstd, mut dx, mut dw) = ([0f64; 4], [0f64; 1], [0f64; 4], [0f64; 4]);
    let w = [1.0, 0.5, -1.0, 2.0];
    rms_norm::forward_cpu::<f64>(&d, 0.0, &x, &w, &mut y, &mut rstd, Rounding::EXACT);
    rms_norm::backward_dx_cpu::<f64>(&d, &x, &w, &rstd, &dy, &mut dx, Rounding::EXACT);
    rms_norm::backward_dw_cpu::<f64>(&d, &x, &rstd, &dy, &mut dw, Rounding::EXACT);
    let close = |a: &[f64], b: &[f64]| a.iter().zip(b).all(|(a, b)| (a - b).abs() < 1e-12);
    assert!((rstd[0] - 0.4).abs() < 1e-12, "rstd {rstd:?}");
    assert!(close(&y, &[0.4, 0.4, -0.8, 3.2]), "llama y {y:?}");
    assert!(
        close(&dx, &[0.384, -0.032, -0.032, -0.064]),
        "llama dx {dx:?}"
    );
    assert!(close(&dw, &[0.4, 0.0, 0.0, 0.0]), "llama dw {dw:?}");

    let d = rms_norm_gemma::Dims { R: 1, C: 4 };
    let w = [0.0, -0.5, 1.0, 0.0];
    rms_norm_gemma::forward_cpu::<f64>(&d, 0.0, &x, &w, &mut y, &mut rstd, Rounding::EXACT);
    rms_norm_gemma::backward_dx_cpu::<f64>(&d, &x, &w, &rstd, &dy, &mut dx, Rounding::EXACT);
    assert!(close(&y, &[0.4, 0.4, 1.6, 1.6]), "gemma y {y:?}");
    assert!(
        close(&dx, &[0.384, -0.032, -0.032, -0.064]),
        "gemma dx {dx:?}"
    );
}

/// transformers' code as a scalar model in f32 with bf16 tensors (bf16 rounding after every
/// torch op whose result is bf16): Llama y = bf16(w * bf16(x * rstd)), Gemma y = bf16(x * rstd * (1 + w)).
fn hf_forward_model(v: Variant, r: usize, c: usize, eps: f32, x: &[f32], w: &[f32]) -> Vec<f32> {
    let b = |v: f32| half::bf16::from_f32(v).to_f32();
    let mut y = vec![0f32; r * c];
    for i in 0..r {
        let row = &x[i * c..(i + 1) * c];
        let ms = row.iter().map(|v| v * v).sum::<f32>() / c as f32;
        let rs = 1.0 / (ms + eps).sqrt();
        for j in 0..c {
            y[i * c + j] = match v {
                Variant::Llama => b(w[j] * b(row[j] * rs)),
                Variant::Gemma => b(row[j] * rs * (1.0 + w[j])),
            };
        }
    }
    y
}

/// Odd sizes and a single row, bf16: the op against the scalar model above (C = 7, 1 x 1,
/// 1 x 4097 spanning several GPU vector widths, 3 x 33), and the fused add + rms_norm, forward
/// and backward, against rms_norm of bf16(x + res).
#[test]
fn edge_shapes_bf16() {
    let mut rng = Rng::fresh("rms_norm_edges");
    for (r, c) in [(1, 7), (5, 7), (1, 1), (1, 4097), (3, 33)] {
        let x = bf16_round(
            &(0..r * c)
                .map(|_| (rng.normal() * 2.0) as f32)
                .collect::<Vec<_>>(),
        );
        let w = bf16_round(
            &(0..c)
                .map(|_| (1.0 + 0.1 * rng.normal()) as f32)
                .collect::<Vec<_>>(),
        );
        let dy = bf16_round(&(0..r * c).map(|_| rng.normal() as f32).collect::<Vec<_>>());
        for v in [Variant::Llama, Variant::Gemma] {
            let out = run(v, r, c, 1e-6, &x, &w, &dy, Rounding::BF16);
            let want = hf_forward_model(v, r, c, 1e-6, &x, &w);
            // The op sums x^2 in a different order than the model: allow one ulp, rarely.
            assert_bf16(
                &format!("{r}x{c} y (seed {})", rng.seed),
                &out.y,
                &want,
                0.97,
                1.0,
            );
            let exact = run(v, r, c, 1e-6, &x, &w, &dy, Rounding::F32);
            let (err, scale) = crate::dsl::fixtures::max_err(&out.dx, &exact.dx);
            // dx = rstd (w dy - xhat mean(xhat w dy)) cancels (at C = 1 to ~0): bf16 rounds the
            // terms, so the bound is 2 ulp of the larger of dx and its terms |w dy| rstd
            let terms = (0..r * c)
                .map(|i| {
                    let row = &x[i / c * c..(i / c + 1) * c];
                    let ms = row.iter().map(|a| a * a).sum::<f32>() / c as f32;
                    (w[i % c] * dy[i]).abs() / (ms + 1e-6).sqrt()
                })
                .fold(0f32, f32::max);
            assert!(
                err <= 2.0 * crate::dsl::fixtures::bf16_ulp(scale.max(terms)),
                "{r}x{c} dx: {err} vs scale {scale}, terms {terms}"
            );
        }
        // add_rms_norm = rms_norm(bf16(x + res)), and h is the rounded sum.
        let res = bf16_round(&(0..r * c).map(|_| rng.normal() as f32).collect::<Vec<_>>());
        let hsum = bf16_round(&x.iter().zip(&res).map(|(a, b)| a + b).collect::<Vec<_>>());
        let d = add_rms_norm::Dims { R: r, C: c };
        let (mut y, mut h, mut rstd) = (vec![0f32; r * c], vec![0f32; r * c], vec![0f32; r]);
        add_rms_norm::forward_cpu::<f32>(
            &d,
            1e-6,
            &x,
            &res,
            &w,
            &mut y,
            &mut h,
            &mut rstd,
            Rounding::BF16,
        );
        let plain = run(Variant::Llama, r, c, 1e-6, &hsum, &w, &dy, Rounding::BF16);
        assert_eq!(h, hsum, "{r}x{c}: h");
        assert_eq!(y, plain.y, "{r}x{c}: y");
        // Backward: the norm's dx (rounded to bf16, as autograd leaves it) joins the residual's
        // gradient dh in one bf16 add: dx = dres = T(dh + T(norm dx)).
        let dh = bf16_round(&(0..r * c).map(|_| rng.normal() as f32).collect::<Vec<_>>());
        let (mut dx, mut dres) = (vec![0f32; r * c], vec![0f32; r * c]);
        add_rms_norm::backward_cpu::<f32>(
            &d,
            &w,
            &h,
            &rstd,
            &dy,
            &dh,
            &mut dx,
            &mut dres,
            Rounding::BF16,
        );
        let want = bf16_round(
            &dh.iter()
                .zip(&plain.dx)
                .map(|(a, b)| a + b)
                .collect::<Vec<_>>(),
        );
        assert_eq!(dx, want, "{r}x{c}: dx");
        assert_eq!(dres, want, "{r}x{c}: dres");
    }
}
