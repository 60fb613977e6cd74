//! CPU tests of the references: the fused op equals a plain f64 matmul of the rank-r terms
//! added to the frozen outputs, then `activation::swiglu` (checked against transformers in
//! `activation::tests`). (The GPU kernels are checked against these references by `ftrt
//! selftest --kernels`.)

use super::*;
use ftrt_runtime::rng::{fresh_seed, SplitMix64};

/// Values of N(0, std^2) rounded to bf16.
fn randn(rng: &mut SplitMix64, n: usize, std: f32) -> Vec<f32> {
    let v = rng.normals_f32(n, std);
    v.into_iter().map(round).collect()
}

/// One case: n rows of width i, rank r; xa (n, 3 r): gate's columns first, then up's, then r
/// columns neither reads; down's dxa (n, r) and A (r, i).
struct Case {
    d: Dims,
    g0: Vec<f32>,
    u0: Vec<f32>,
    dh0: Vec<f32>,
    xa: Vec<f32>,
    bg: Vec<f32>,
    bu: Vec<f32>,
    dxa: Vec<f32>,
    a: Vec<f32>,
}

impl Case {
    fn new(rng: &mut SplitMix64, n: usize, i: usize, r: usize) -> Self {
        Case {
            d: Dims { n, i, r, s: 2.0 },
            g0: randn(rng, n * i, 2.0),
            u0: randn(rng, n * i, 1.0),
            dh0: randn(rng, n * i, 1.0),
            xa: randn(rng, n * 3 * r, 1.0),
            bg: randn(rng, i * r, 0.3),
            bu: randn(rng, i * r, 0.3),
            dxa: randn(rng, n * r, 1.0),
            a: randn(rng, r * i, 0.3),
        }
    }
    fn gate(&self) -> Option<CpuLowRank<'_>> {
        let ld = 3 * self.d.r;
        Some(CpuLowRank {
            x: &self.xa,
            ld,
            col: 0,
            factor: &self.bg,
            kind: Factor::B,
        })
    }
    fn up(&self) -> Option<CpuLowRank<'_>> {
        let (ld, col) = (3 * self.d.r, self.d.r);
        Some(CpuLowRank {
            x: &self.xa,
            ld,
            col,
            factor: &self.bu,
            kind: Factor::B,
        })
    }
    fn down(&self) -> Option<CpuLowRank<'_>> {
        let ld = self.d.r;
        Some(CpuLowRank {
            x: &self.dxa,
            ld,
            col: 0,
            factor: &self.a,
            kind: Factor::A,
        })
    }
    /// base + T(scale x w) by a plain f64 matmul: x (n, ld) from `col`, w(i, k) by `w`.
    fn plus_term(
        &self,
        base: &[f32],
        (x, ld, col): (&[f32], usize, usize),
        w: impl Fn(usize, usize) -> f32,
        scale: f64,
    ) -> Vec<f32> {
        let d = &self.d;
        (0..d.n * d.i)
            .map(|e| {
                let (n, i) = (e / d.i, e % d.i);
                let t: f64 = (0..d.r)
                    .map(|k| x[n * ld + col + k] as f64 * w(i, k) as f64)
                    .sum();
                round(base[e] + round((scale * t) as f32))
            })
            .collect()
    }
}

/// Largest |got - want| relative to the largest |want|.
fn rel_err(got: &[f32], want: &[f32]) -> f64 {
    let scale = want
        .iter()
        .fold(0f64, |m, v| m.max(v.abs() as f64))
        .max(1e-30);
    got.iter()
        .zip(want)
        .fold(0f64, |m, (g, w)| m.max((g - w).abs() as f64))
        / scale
}

/// bf16 tolerance: the f32 and f64 sums may round a term to neighbouring bf16 values.
const TOL: f64 = 1e-2;

#[test]
fn forward_is_swiglu_of_the_adapted_projections() {
    let mut rng = SplitMix64::new(fresh_seed());
    for &(n, i, r) in &[(5usize, 24usize, 8usize), (3, 40, 16), (7, 16, 24)] {
        let c = Case::new(&mut rng, n, i, r);
        let mut h = vec![0f32; n * i];
        forward_cpu(&c.d, &c.g0, &c.u0, c.gate(), c.up(), &mut h);
        let s = c.d.s as f64;
        let g = c.plus_term(&c.g0, (&c.xa, 3 * r, 0), |col, k| c.bg[col * r + k], s);
        let u = c.plus_term(&c.u0, (&c.xa, 3 * r, r), |col, k| c.bu[col * r + k], s);
        let mut want = vec![0f32; n * i];
        swiglu::forward_cpu::<f32>(
            &swiglu::Dims { N: n * i },
            &g,
            &u,
            &mut want,
            Rounding::BF16,
        );
        let err = rel_err(&h, &want);
        assert!(err < TOL, "n {n} i {i} r {r}: {err}");
    }
}

#[test]
fn backward_is_swiglus_backward_of_the_adapted_projections() {
    let mut rng = SplitMix64::new(fresh_seed());
    for &(n, i, r) in &[(5usize, 24usize, 8usize), (4, 32, 16)] {
        let c = Case::new(&mut rng, n, i, r);
        let len = n * i;
        let (mut dg, mut du, mut h) = (vec![0f32; len], vec![0f32; len], vec![0f32; len]);
        let (down, gate, up) = (c.down(), c.gate(), c.up());
        backward_cpu(
            &c.d,
            &c.g0,
            &c.u0,
            gate,
            up,
            &c.dh0,
            down,
            &mut dg,
            &mut du,
            Some(&mut h),
        );
        let s = c.d.s as f64;
        let g = c.plus_term(&c.g0, (&c.xa, 3 * r, 0), |col, k| c.bg[col * r + k], s);
        let u = c.plus_term(&c.u0, (&c.xa, 3 * r, r), |col, k| c.bu[col * r + k], s);
        let dh = c.plus_term(&c.dh0, (&c.dxa, r, 0), |col, k| c.a[k * i + col], 1.0);
        let sd = swiglu::Dims { N: len };
        let (mut want_dg, mut want_du, mut want_h) =
            (vec![0f32; len], vec![0f32; len], vec![0f32; len]);
        swiglu::backward_cpu::<f32>(&sd, &g, &u, &dh, &mut want_dg, &mut want_du, Rounding::BF16);
        swiglu::forward_cpu::<f32>(&sd, &g, &u, &mut want_h, Rounding::BF16);
        for (name, got, want) in [
            ("dg", &dg, &want_dg),
            ("du", &du, &want_du),
            ("h", &h, &want_h),
        ] {
            let err = rel_err(got, want);
            assert!(err < TOL, "{name}, n {n} i {i} r {r}: {err}");
        }
    }
}

#[test]
fn without_products_it_is_plain_swiglu_bit_for_bit() {
    let mut rng = SplitMix64::new(fresh_seed());
    let c = Case::new(&mut rng, 6, 24, 8);
    let len = 6 * 24;
    let sd = swiglu::Dims { N: len };
    let mut h = vec![0f32; len];
    forward_cpu(&c.d, &c.g0, &c.u0, None, None, &mut h);
    let mut want = vec![0f32; len];
    swiglu::forward_cpu::<f32>(&sd, &c.g0, &c.u0, &mut want, Rounding::BF16);
    assert_eq!(h, want);
    let (mut dg, mut du) = (vec![0f32; len], vec![0f32; len]);
    backward_cpu(
        &c.d, &c.g0, &c.u0, None, None, &c.dh0, None, &mut dg, &mut du, None,
    );
    let (mut want_dg, mut want_du) = (vec![0f32; len], vec![0f32; len]);
    swiglu::backward_cpu::<f32>(
        &sd,
        &c.g0,
        &c.u0,
        &c.dh0,
        &mut want_dg,
        &mut want_du,
        Rounding::BF16,
    );
    assert_eq!((dg, du), (want_dg, want_du));
}

#[test]
fn a_factor_stored_as_a_gives_what_its_transpose_stored_as_b_gives() {
    let mut rng = SplitMix64::new(fresh_seed());
    let c = Case::new(&mut rng, 4, 16, 8);
    let (n, i, r) = (4, 16, 8);
    // B (i, r) = A^T
    let b: Vec<f32> = (0..i * r).map(|e| c.a[(e % r) * i + e / r]).collect();
    let as_b = Some(CpuLowRank {
        x: &c.dxa,
        ld: r,
        col: 0,
        factor: &b,
        kind: Factor::B,
    });
    let (mut dg_a, mut du_a, mut dg_b, mut du_b) = (
        vec![0f32; n * i],
        vec![0f32; n * i],
        vec![0f32; n * i],
        vec![0f32; n * i],
    );
    backward_cpu(
        &c.d,
        &c.g0,
        &c.u0,
        None,
        None,
        &c.dh0,
        c.down(),
        &mut dg_a,
        &mut du_a,
        None,
    );
    backward_cpu(
        &c.d, &c.g0, &c.u0, None, None, &c.dh0, as_b, &mut dg_b, &mut du_b, None,
    );
    assert_eq!((&dg_a, &du_a), (&dg_b, &du_b));
    // and the down term is not zero: it moves dg
    let (mut dg0, mut du0) = (vec![0f32; n * i], vec![0f32; n * i]);
    backward_cpu(
        &c.d, &c.g0, &c.u0, None, None, &c.dh0, None, &mut dg0, &mut du0, None,
    );
    assert_ne!(dg0, dg_b);
}

#[test]
fn the_kernels_take_ranks_8_and_16_with_even_rows_only() {
    let d = |r| Dims {
        n: 4096,
        i: 8192,
        r,
        s: 2.0,
    };
    assert!(supported(&d(16), &[(32, 16), (16, 0)]));
    assert!(supported(&d(8), &[(16, 8)]));
    for r in [0, 4, 24, 32, 64] {
        assert!(!supported(&d(r), &[(2 * r, 0)]), "r {r}");
    }
    assert!(!supported(&d(16), &[(33, 0)]), "odd row stride");
    assert!(!supported(&d(16), &[(32, 15)]), "odd first column");
    let odd_width = Dims { i: 8196, ..d(16) };
    assert!(!supported(&odd_width, &[(32, 0)]), "I not a multiple of 8");
}
