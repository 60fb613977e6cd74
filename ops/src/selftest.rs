//! `ftrt selftest --kernels`: every kernel on the GPU against its CPU reference, on fresh random
//! inputs at real sizes, with its time and achieved bandwidth against the measured copy rate.
use crate::dsl::gradcheck::Rng;
use crate::dsl::Rounding;
use crate::{
    activation, adamw, cross_entropy, decode, embedding, nf4, norm, quant_prelude, rope,
    swiglu_lora,
};
use ftrt_runtime::selftest::SelftestRow;
use ftrt_runtime::{DevPtr, DeviceBuffer, Gpu, RuntimeError};
use half::bf16;
use std::time::Instant;

/// bf16 tolerance, relative to the reference's largest magnitude (as Liger's tests use).
pub const TOLERANCE: f64 = 1e-2;

/// Device buffers of one check, freed together.
struct Bufs<'g> {
    gpu: &'g Gpu,
    held: Vec<DeviceBuffer>,
}

impl<'g> Bufs<'g> {
    fn new(gpu: &'g Gpu) -> Self {
        Bufs {
            gpu,
            held: Vec::new(),
        }
    }
    fn put<T: bytemuck::Pod>(&mut self, v: &[T]) -> Result<DevPtr<T>, RuntimeError> {
        let b = self.gpu.alloc(std::mem::size_of_val(v).max(16))?;
        let p = b.ptr::<T>();
        self.gpu.upload(p, v)?;
        self.held.push(b);
        Ok(p)
    }
    fn bf16(&mut self, v: &[f32]) -> Result<DevPtr<bf16>, RuntimeError> {
        self.put(&v.iter().map(|x| bf16::from_f32(*x)).collect::<Vec<_>>())
    }
    fn get<T: bytemuck::Pod + Default>(
        &self,
        p: DevPtr<T>,
        n: usize,
    ) -> Result<Vec<T>, RuntimeError> {
        let mut v = vec![T::default(); n];
        self.gpu.download(p, &mut v)?;
        Ok(v)
    }
    fn get_bf16(&self, p: DevPtr<bf16>, n: usize) -> Result<Vec<f32>, RuntimeError> {
        Ok(self
            .get(p, n)?
            .into_iter()
            .map(|x: bf16| x.to_f32())
            .collect())
    }
}

/// Values drawn from N(0, scale^2), rounded to bf16 (the kernels' input type).
fn randn(rng: &mut Rng, n: usize, scale: f64) -> Vec<f32> {
    (0..n)
        .map(|_| bf16::from_f64(rng.normal() * scale).to_f32())
        .collect()
}

/// max |got - want| / max |want|; NaN anywhere, or a length mismatch, gives infinity.
pub fn rel_err(got: &[f32], want: &[f32]) -> f64 {
    if got.len() != want.len() {
        return f64::INFINITY;
    }
    let scale = want
        .iter()
        .fold(0f64, |m, v| m.max(v.abs() as f64))
        .max(1e-30);
    let mut worst = 0f64;
    for (g, w) in got.iter().zip(want) {
        let e = (*g as f64 - *w as f64).abs();
        if !e.is_finite() {
            return f64::INFINITY;
        }
        worst = worst.max(e);
    }
    worst / scale
}

/// Median time of `reps` launches (after two warm-ups), in microseconds.
fn time(
    gpu: &Gpu,
    mut launch: impl FnMut() -> Result<(), RuntimeError>,
) -> Result<f64, RuntimeError> {
    for _ in 0..2 {
        launch()?;
    }
    gpu.synchronize()?;
    let mut samples = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        for _ in 0..10 {
            launch()?;
        }
        gpu.synchronize()?;
        samples.push(t.elapsed().as_secs_f64() * 1e6 / 10.0);
    }
    samples.sort_by(f64::total_cmp);
    Ok(samples[2])
}

/// Device-to-device copy bandwidth (bytes read + written per second) over 1 GiB.
pub fn copy_bandwidth(gpu: &Gpu) -> Result<f64, RuntimeError> {
    let n = 1 << 30;
    let (a, b) = (gpu.alloc(n)?, gpu.alloc(n)?);
    gpu.memset_zero(a.ptr(), n)?;
    let us = time(gpu, || gpu.copy_d2d(b.ptr(), a.ptr(), n))?;
    Ok(2.0 * n as f64 / (us * 1e-6))
}

struct Report {
    rows: Vec<SelftestRow>,
    copy_bps: f64,
    failures: Vec<String>,
}

impl Report {
    /// Records one kernel: error against the reference (must be <= tol), time, bytes moved.
    fn add(&mut self, name: &str, err: f64, tol: f64, us: f64, bytes: f64) {
        let bps = bytes / (us * 1e-6);
        if err.is_nan() || err > tol {
            self.failures
                .push(format!("{name}: max rel err {err:.3e} > {tol:.0e}"));
        }
        self.rows.push(SelftestRow {
            name: name.into(),
            max_rel_err: err,
            time_us: us,
            detail: format!(
                "{:>7.0} GB/s {:>5.1}% of copy{}",
                bps / 1e9,
                100.0 * bps / self.copy_bps,
                if err <= tol { "" } else { "  FAILED" }
            ),
        });
    }
}

/// Runs every kernel check; returns the table rows, or an error listing the failures.
pub fn selftest_kernels(gpu: &Gpu) -> Result<Vec<SelftestRow>, RuntimeError> {
    let mut rng = Rng::fresh("selftest");
    let copy_bps = copy_bandwidth(gpu)?;
    let mut rep = Report {
        rows: Vec::new(),
        copy_bps,
        failures: Vec::new(),
    };
    rep.rows.push(SelftestRow {
        name: "copy d2d 1 GiB".into(),
        max_rel_err: 0.0,
        time_us: 0.0,
        detail: format!(
            "{:.0} GB/s (the bandwidth ceiling below; seed {})",
            copy_bps / 1e9,
            rng.seed
        ),
    });
    check_norms(gpu, &mut rng, &mut rep)?;
    check_rope(gpu, &mut rng, &mut rep)?;
    check_activations(gpu, &mut rng, &mut rep)?;
    check_swiglu_lora(gpu, &mut rng, &mut rep)?;
    check_embedding(gpu, &mut rng, &mut rep)?;
    check_cross_entropy(gpu, &mut rng, &mut rep)?;
    check_nf4(gpu, &mut rng, &mut rep)?;
    check_adamw(gpu, &mut rng, &mut rep)?;
    check_decode(gpu, &mut rng, &mut rep)?;
    if rep.failures.is_empty() {
        Ok(rep.rows)
    } else {
        eprintln!("{}", ftrt_runtime::selftest::format_rows(&rep.rows));
        Err(RuntimeError::InvalidArgument(format!(
            "kernel selftest failed: {}",
            rep.failures.join("; ")
        )))
    }
}

const R: usize = 8192;
const C: usize = 4096;

fn check_norms(gpu: &Gpu, rng: &mut Rng, rep: &mut Report) -> Result<(), RuntimeError> {
    let mut b = Bufs::new(gpu);
    let x = randn(rng, R * C, 1.0);
    let res = randn(rng, R * C, 1.0);
    let w = randn(rng, C, 0.5);
    let dy = randn(rng, R * C, 1.0);
    let eps = 1e-5;
    let (xd, resd, wd, dyd) = (b.bf16(&x)?, b.bf16(&res)?, b.bf16(&w)?, b.bf16(&dy)?);
    let yd = b.bf16(&vec![0.0; R * C])?;
    let hd = b.bf16(&vec![0.0; R * C])?;
    let dxd = b.bf16(&vec![0.0; R * C])?;
    let dresd = b.bf16(&vec![0.0; R * C])?;
    let rstdd = b.put(&vec![0f32; R])?;
    let mat = (R * C * 2) as f64;

    // rms_norm forward and backward dx
    let d = norm::rms_norm::Dims { R, C };
    let (mut y, mut rstd) = (vec![0f32; R * C], vec![0f32; R]);
    norm::rms_norm::forward_cpu::<f32>(&d, eps, &x, &w, &mut y, &mut rstd, Rounding::BF16);
    norm::rms_norm::forward(gpu, &d, eps, xd, wd, yd, rstdd)?;
    let err = rel_err(&b.get_bf16(yd, R * C)?, &y).max(rel_err(&b.get(rstdd, R)?, &rstd));
    let us = time(gpu, || {
        norm::rms_norm::forward(gpu, &d, eps, xd, wd, yd, rstdd)
    })?;
    rep.add("rms_norm forward 8192x4096", err, TOLERANCE, us, 2.0 * mat);
    let mut dx = vec![0f32; R * C];
    norm::rms_norm::backward_dx_cpu::<f32>(&d, &x, &w, &rstd, &dy, &mut dx, Rounding::BF16);
    norm::rms_norm::backward_dx(gpu, &d, xd, wd, rstdd, dyd, dxd)?;
    let err = rel_err(&b.get_bf16(dxd, R * C)?, &dx);
    let us = time(gpu, || {
        norm::rms_norm::backward_dx(gpu, &d, xd, wd, rstdd, dyd, dxd)
    })?;
    rep.add(
        "rms_norm backward dx 8192x4096",
        err,
        TOLERANCE,
        us,
        3.0 * mat,
    );

    // fused residual add + rms_norm
    let d = norm::add_rms_norm::Dims { R, C };
    let mut h = vec![0f32; R * C];
    norm::add_rms_norm::forward_cpu::<f32>(
        &d,
        eps,
        &x,
        &res,
        &w,
        &mut y,
        &mut h,
        &mut rstd,
        Rounding::BF16,
    );
    norm::add_rms_norm::forward(gpu, &d, eps, xd, resd, wd, yd, hd, rstdd)?;
    let err = rel_err(&b.get_bf16(yd, R * C)?, &y).max(rel_err(&b.get_bf16(hd, R * C)?, &h));
    let us = time(gpu, || {
        norm::add_rms_norm::forward(gpu, &d, eps, xd, resd, wd, yd, hd, rstdd)
    })?;
    rep.add(
        "add_rms_norm forward 8192x4096",
        err,
        TOLERANCE,
        us,
        4.0 * mat,
    );
    let (mut dx, mut dres) = (vec![0f32; R * C], vec![0f32; R * C]);
    // dh: reuse res as the upstream gradient of h
    norm::add_rms_norm::backward_cpu::<f32>(
        &d,
        &w,
        &h,
        &rstd,
        &dy,
        &res,
        &mut dx,
        &mut dres,
        Rounding::BF16,
    );
    norm::add_rms_norm::backward(gpu, &d, wd, hd, rstdd, dyd, resd, dxd, dresd)?;
    let err =
        rel_err(&b.get_bf16(dxd, R * C)?, &dx).max(rel_err(&b.get_bf16(dresd, R * C)?, &dres));
    let us = time(gpu, || {
        norm::add_rms_norm::backward(gpu, &d, wd, hd, rstdd, dyd, resd, dxd, dresd)
    })?;
    rep.add(
        "add_rms_norm backward 8192x4096",
        err,
        TOLERANCE,
        us,
        5.0 * mat,
    );
    Ok(())
}

fn check_rope(gpu: &Gpu, rng: &mut Rng, rep: &mut Report) -> Result<(), RuntimeError> {
    let mut b = Bufs::new(gpu);
    let (n, h, dh, p) = (8192usize, 32usize, 128usize, 4096usize);
    let inv = rope::inv_freq(
        dh,
        500000.0,
        rope::RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position: 8192.0,
        },
    );
    let (cos, sin) = rope::cos_sin_tables(p, &inv);
    let r = |v: Vec<f32>| {
        v.into_iter()
            .map(|x| bf16::from_f32(x).to_f32())
            .collect::<Vec<_>>()
    };
    let (cos, sin) = (r(cos), r(sin));
    // Packed sequences: positions restart at 0 every 1000 tokens.
    let pos: Vec<i32> = (0..n).map(|i| (i % 1000) as i32).collect();
    let x = randn(rng, n * h * dh, 1.0);
    let (cd, sd, posd) = (b.bf16(&cos)?, b.bf16(&sin)?, b.put(&pos)?);
    let xd = b.bf16(&x)?;
    let d = rope::rope::Dims {
        N: n,
        H: h,
        D: dh,
        P: p,
    };
    let mut y = x.clone();
    rope::rope::forward_cpu::<f32>(&d, &mut y, &pos, &cos, &sin, Rounding::BF16);
    rope::rope::forward(gpu, &d, xd, posd, cd, sd)?;
    let err = rel_err(&b.get_bf16(xd, n * h * dh)?, &y);
    let us = time(gpu, || rope::rope::forward(gpu, &d, xd, posd, cd, sd))?;
    rep.add(
        "rope forward q 8192x32x128",
        err,
        TOLERANCE,
        us,
        2.0 * (n * h * dh * 2) as f64,
    );
    let g = randn(rng, n * h * dh, 1.0);
    let gd = b.bf16(&g)?;
    let mut dg = g.clone();
    rope::rope::backward_cpu::<f32>(&d, &pos, &cos, &sin, &mut dg, Rounding::BF16);
    rope::rope::backward(gpu, &d, posd, cd, sd, gd)?;
    let err = rel_err(&b.get_bf16(gd, n * h * dh)?, &dg);
    let us = time(gpu, || rope::rope::backward(gpu, &d, posd, cd, sd, gd))?;
    rep.add(
        "rope backward 8192x32x128",
        err,
        TOLERANCE,
        us,
        2.0 * (n * h * dh * 2) as f64,
    );
    Ok(())
}

fn check_activations(gpu: &Gpu, rng: &mut Rng, rep: &mut Report) -> Result<(), RuntimeError> {
    let mut b = Bufs::new(gpu);
    let n = R * C;
    let (g, u, dh) = (randn(rng, n, 2.0), randn(rng, n, 1.0), randn(rng, n, 1.0));
    let (gd, ud, dhd) = (b.bf16(&g)?, b.bf16(&u)?, b.bf16(&dh)?);
    let (hd, dgd, dud) = (
        b.bf16(&vec![0.0; n])?,
        b.bf16(&vec![0.0; n])?,
        b.bf16(&vec![0.0; n])?,
    );
    let e = (n * 2) as f64;
    macro_rules! glu {
        ($op:ident, $label:expr) => {{
            let d = activation::$op::Dims { N: n };
            let mut h = vec![0f32; n];
            activation::$op::forward_cpu::<f32>(&d, &g, &u, &mut h, Rounding::BF16);
            activation::$op::forward(gpu, &d, gd, ud, hd)?;
            let err = rel_err(&b.get_bf16(hd, n)?, &h);
            let us = time(gpu, || activation::$op::forward(gpu, &d, gd, ud, hd))?;
            rep.add(
                concat!($label, " forward 8192x4096"),
                err,
                TOLERANCE,
                us,
                3.0 * e,
            );
            let (mut dg, mut du) = (vec![0f32; n], vec![0f32; n]);
            activation::$op::backward_cpu::<f32>(&d, &g, &u, &dh, &mut dg, &mut du, Rounding::BF16);
            activation::$op::backward(gpu, &d, gd, ud, dhd, dgd, dud)?;
            let err = rel_err(&b.get_bf16(dgd, n)?, &dg).max(rel_err(&b.get_bf16(dud, n)?, &du));
            let us = time(gpu, || {
                activation::$op::backward(gpu, &d, gd, ud, dhd, dgd, dud)
            })?;
            rep.add(
                concat!($label, " backward 8192x4096"),
                err,
                TOLERANCE,
                us,
                5.0 * e,
            );
        }};
    }
    glu!(swiglu, "swiglu");
    glu!(geglu_tanh, "geglu_tanh");
    glu!(geglu_erf, "geglu_erf");
    // SwiGLU's backward with the forward's output (reads 3, writes 3)
    let d = activation::swiglu_backward_act::Dims { N: n };
    let (mut h, mut dg, mut du) = (vec![0f32; n], vec![0f32; n], vec![0f32; n]);
    activation::swiglu_backward_act::forward_cpu::<f32>(
        &d,
        &g,
        &u,
        &dh,
        &mut h,
        &mut dg,
        &mut du,
        Rounding::BF16,
    );
    let launch = || activation::swiglu_backward_act::forward(gpu, &d, gd, ud, dhd, hd, dgd, dud);
    launch()?;
    let mut err = 0f64;
    for (dev, want) in [(hd, &h), (dgd, &dg), (dud, &du)] {
        err = err.max(rel_err(&b.get_bf16(dev, n)?, want));
    }
    let us = time(gpu, launch)?;
    rep.add("swiglu_backward_act 8192x4096", err, TOLERANCE, us, 6.0 * e);
    Ok(())
}

/// SwiGLU with LoRA's rank-16 terms (gate, up; down's in the backward) at the 1B's MLP tile
/// width: the forward, and the backward with the forward's h, against the CPU references.
fn check_swiglu_lora(gpu: &Gpu, rng: &mut Rng, rep: &mut Report) -> Result<(), RuntimeError> {
    use swiglu_lora::{CpuLowRank, Factor, LowRank};
    let mut b = Bufs::new(gpu);
    let d = swiglu_lora::Dims {
        n: 2048,
        i: 8192,
        r: 16,
        s: 2.0,
    };
    let (len, r) = (d.n * d.i, d.r);
    let (g0, u0, dh0) = (
        randn(rng, len, 2.0),
        randn(rng, len, 1.0),
        randn(rng, len, 1.0),
    );
    let (xa, dxa) = (randn(rng, d.n * 2 * r, 1.0), randn(rng, d.n * r, 1.0));
    let (bg, bu, a) = (
        randn(rng, d.i * r, 0.1),
        randn(rng, d.i * r, 0.1),
        randn(rng, r * d.i, 0.1),
    );
    let (g0d, u0d, dh0d) = (b.bf16(&g0)?, b.bf16(&u0)?, b.bf16(&dh0)?);
    let (xad, dxad) = (b.bf16(&xa)?, b.bf16(&dxa)?);
    let (bgd, bud, ad) = (b.bf16(&bg)?, b.bf16(&bu)?, b.bf16(&a)?);
    let zeros = vec![0.0; len];
    let (hd, dgd, dud) = (b.bf16(&zeros)?, b.bf16(&zeros)?, b.bf16(&zeros)?);
    let dev = |x: DevPtr<bf16>, ld, factor, kind| {
        Some(LowRank {
            x,
            ld,
            factor,
            kind,
        })
    };
    let (gate, up) = (
        dev(xad, 2 * r, bgd, Factor::B),
        dev(xad.offset(r), 2 * r, bud, Factor::B),
    );
    let down = dev(dxad, r, ad, Factor::A);
    let cpu = |x, ld, col, factor, kind| {
        Some(CpuLowRank {
            x,
            ld,
            col,
            factor,
            kind,
        })
    };
    let (cgate, cup) = (
        cpu(&xa, 2 * r, 0, &bg, Factor::B),
        cpu(&xa, 2 * r, r, &bu, Factor::B),
    );
    let cdown = cpu(&dxa, r, 0, &a, Factor::A);
    let mut h = vec![0f32; len];
    swiglu_lora::forward_cpu(&d, &g0, &u0, cgate, cup, &mut h);
    let forward = || swiglu_lora::forward(gpu, &d, g0d, u0d, gate, up, hd);
    forward()?;
    let err = rel_err(&b.get_bf16(hd, len)?, &h);
    let us = time(gpu, forward)?;
    rep.add(
        "swiglu_lora forward 2048x8192 r16",
        err,
        TOLERANCE,
        us,
        6.0 * len as f64,
    );
    let (mut dg, mut du) = (vec![0f32; len], vec![0f32; len]);
    let (dg_, du_, h_) = (&mut dg, &mut du, Some(&mut h[..]));
    swiglu_lora::backward_cpu(&d, &g0, &u0, cgate, cup, &dh0, cdown, dg_, du_, h_);
    b.gpu.memset_zero(hd.cast(), len * 2)?;
    let backward = || {
        let (h, down) = (Some(hd), down);
        swiglu_lora::backward(gpu, &d, g0d, u0d, gate, up, dh0d, down, dgd, dud, h)
    };
    backward()?;
    let mut err = 0f64;
    for (dev, want) in [(hd, &h), (dgd, &dg), (dud, &du)] {
        err = err.max(rel_err(&b.get_bf16(dev, len)?, want));
    }
    let us = time(gpu, backward)?;
    rep.add(
        "swiglu_lora backward 2048x8192 r16",
        err,
        TOLERANCE,
        us,
        12.0 * len as f64,
    );
    Ok(())
}

fn check_embedding(gpu: &Gpu, rng: &mut Rng, rep: &mut Report) -> Result<(), RuntimeError> {
    let mut b = Bufs::new(gpu);
    let (n, v) = (R, 32000usize);
    let ids: Vec<i32> = (0..n).map(|_| rng.int_in(0, v as i64) as i32).collect();
    let w = randn(rng, v * C, 1.0);
    let (idd, wd) = (b.put(&ids)?, b.bf16(&w)?);
    let yd = b.bf16(&vec![0.0; n * C])?;
    let d = embedding::embedding::Dims { N: n, V: v, C };
    let mut y = vec![0f32; n * C];
    embedding::embedding::forward_cpu::<f32>(&d, &ids, &w, &mut y, Rounding::BF16);
    embedding::embedding::forward(gpu, &d, idd, wd, yd)?;
    let err = rel_err(&b.get_bf16(yd, n * C)?, &y);
    let us = time(gpu, || embedding::embedding::forward(gpu, &d, idd, wd, yd))?;
    rep.add(
        "embedding forward 8192x4096 (V 32000)",
        err,
        TOLERANCE,
        us,
        2.0 * (n * C * 2) as f64,
    );
    // Backward: deterministic per-row scan, checked at a small vocabulary.
    let (n, v, c) = (1024usize, 256usize, 1024usize);
    let ids: Vec<i32> = (0..n).map(|_| rng.int_in(0, v as i64) as i32).collect();
    let dy = randn(rng, n * c, 1.0);
    let (idd, dyd) = (b.put(&ids)?, b.bf16(&dy)?);
    let dwd = b.bf16(&vec![0.0; v * c])?;
    let d = embedding::embedding::Dims { N: n, V: v, C: c };
    let mut dw = vec![0f32; v * c];
    embedding::embedding::backward_cpu::<f32>(&d, &ids, &dy, &mut dw, Rounding::BF16);
    embedding::embedding::backward(gpu, &d, idd, dyd, dwd)?;
    let first = b.get_bf16(dwd, v * c)?;
    embedding::embedding::backward(gpu, &d, idd, dyd, dwd)?;
    let same = first == b.get_bf16(dwd, v * c)?;
    let err = if same {
        rel_err(&first, &dw)
    } else {
        f64::INFINITY
    };
    let us = time(gpu, || {
        embedding::embedding::backward(gpu, &d, idd, dyd, dwd)
    })?;
    rep.add(
        "embedding backward 1024 tok, V 256 (same bits twice)",
        err,
        TOLERANCE,
        us,
        (v * c * 2 + n * c * 2) as f64,
    );
    Ok(())
}

/// One cross-entropy check's inputs (logits (rows, v) ~ N(0, 3) in bf16, targets with every
/// 7th ignored, the trainer's dlse = 1 / count and dpicked = -1 / count) and the CPU's lse and
/// picked (from -inf and 0) and dlogits.
struct CeCase {
    logits: Vec<f32>,
    target: Vec<i32>,
    dl: Vec<f32>,
    dp: Vec<f32>,
    lse: Vec<f32>,
    picked: Vec<f32>,
    dlogits: Vec<f32>,
}

fn ce_case(rng: &mut Rng, rows: usize, v: usize, cap: f32) -> CeCase {
    let logits = randn(rng, rows * v, 3.0);
    let target: Vec<i32> = (0..rows)
        .map(|i| {
            if i % 7 == 3 {
                -100
            } else {
                rng.int_in(0, v as i64) as i32
            }
        })
        .collect();
    let count = target.iter().filter(|t| **t != -100).count() as f32;
    let dl: Vec<f32> = target
        .iter()
        .map(|t| if *t == -100 { 0.0 } else { 1.0 / count })
        .collect();
    let dp: Vec<f32> = dl.iter().map(|x| -x).collect();
    let d = cross_entropy::cross_entropy::Dims { R: rows, V: v };
    let (mut lse, mut picked) = (vec![f32::NEG_INFINITY; rows], vec![0f32; rows]);
    cross_entropy::cross_entropy::forward_cpu::<f32>(
        &d,
        0,
        cap,
        &logits,
        &target,
        &mut lse,
        &mut picked,
        Rounding::BF16,
    );
    let mut dlogits = vec![0f32; rows * v];
    cross_entropy::cross_entropy::backward_cpu::<f32>(
        &d,
        0,
        cap,
        &logits,
        &target,
        &lse,
        &dl,
        &dp,
        &mut dlogits,
        Rounding::BF16,
    );
    CeCase {
        logits,
        target,
        dl,
        dp,
        lse,
        picked,
        dlogits,
    }
}

fn check_cross_entropy(gpu: &Gpu, rng: &mut Rng, rep: &mut Report) -> Result<(), RuntimeError> {
    for (rows, v, cap) in [
        (R, C, 0.0f32),
        (256usize, 128256usize, 0.0),
        (256, 128256, 30.0),
    ] {
        let mut b = Bufs::new(gpu);
        let k = ce_case(rng, rows, v, cap);
        let (ld, td) = (b.bf16(&k.logits)?, b.put(&k.target)?);
        let (lsed, pd) = (
            b.put(&vec![f32::NEG_INFINITY; rows])?,
            b.put(&vec![0f32; rows])?,
        );
        let d = cross_entropy::cross_entropy::Dims { R: rows, V: v };
        cross_entropy::cross_entropy::forward(gpu, &d, 0, cap, ld, td, lsed, pd)?;
        let err = rel_err(&b.get(lsed, rows)?, &k.lse).max(rel_err(&b.get(pd, rows)?, &k.picked));
        let label = format!(
            "cross_entropy forward {rows}x{v}{}",
            if cap > 0.0 { " softcap 30" } else { "" }
        );
        // Re-running folds into lse again; time it on a scratch copy of the state.
        let us = time(gpu, || {
            cross_entropy::cross_entropy::forward(gpu, &d, 0, cap, ld, td, lsed, pd)
        })?;
        rep.add(&label, err, TOLERANCE, us, (rows * v * 2) as f64);
        // Backward in place over the logits (dlogits aliases logits).
        let (dld, dpd) = (b.put(&k.dl)?, b.put(&k.dp)?);
        let lsed = b.put(&k.lse)?;
        cross_entropy::cross_entropy::backward(gpu, &d, 0, cap, ld, td, lsed, dld, dpd, ld)?;
        let err = rel_err(&b.get_bf16(ld, rows * v)?, &k.dlogits);
        let scratch = b.bf16(&k.logits)?;
        let us = time(gpu, || {
            cross_entropy::cross_entropy::backward(
                gpu, &d, 0, cap, scratch, td, lsed, dld, dpd, scratch,
            )
        })?;
        rep.add(
            &label.replace("forward", "backward (in place)"),
            err,
            TOLERANCE,
            us,
            (2 * rows * v * 2) as f64,
        );
    }
    // Forward and backward in one pass (Hopper): Llama 3's vocabulary, SmolLM2's (3 blocks a
    // row) and Qwen2.5's (32,768 columns a block, 5 blocks a row)
    for (rows, v) in [(256usize, 128256usize), (512, 49152), (256, 151936)] {
        if !cross_entropy::fused_supported(gpu, v) {
            continue;
        }
        let mut b = Bufs::new(gpu);
        let k = ce_case(rng, rows, v, 0.0);
        let (ld, td, dld, dpd) = (
            b.bf16(&k.logits)?,
            b.put(&k.target)?,
            b.put(&k.dl)?,
            b.put(&k.dp)?,
        );
        let (lsed, pd) = (b.put(&vec![0f32; rows])?, b.put(&vec![0f32; rows])?);
        cross_entropy::forward_backward(gpu, rows, v, ld, td, dld, dpd, lsed, pd)?;
        let err = rel_err(&b.get(lsed, rows)?, &k.lse)
            .max(rel_err(&b.get(pd, rows)?, &k.picked))
            .max(rel_err(&b.get_bf16(ld, rows * v)?, &k.dlogits));
        let us = time(gpu, || {
            cross_entropy::forward_backward(gpu, rows, v, ld, td, dld, dpd, lsed, pd)
        })?;
        rep.add(
            &format!("cross_entropy forward+backward (one pass) {rows}x{v}"),
            err,
            TOLERANCE,
            us,
            (2 * rows * v * 2) as f64,
        );
    }
    Ok(())
}

fn check_nf4(gpu: &Gpu, rng: &mut Rng, rep: &mut Report) -> Result<(), RuntimeError> {
    let mut b = Bufs::new(gpu);
    let n = R * C;
    let x = randn(rng, n, 0.02);
    let xd = b.bf16(&x)?;
    let (pd, ad) = (b.put(&vec![0u8; n / 2])?, b.put(&vec![0f32; n / 64])?);
    let d = nf4::nf4_quantize::Dims { N: n };
    let (mut packed, mut absmax) = (vec![0u8; n / 2], vec![0f32; n / 64]);
    nf4::nf4_quantize::forward_cpu::<f32>(&d, &x, &mut packed, &mut absmax, Rounding::BF16);
    nf4::nf4_quantize::forward(gpu, &d, xd, pd, ad)?;
    let exact = b.get(pd, n / 2)? == packed && b.get(ad, n / 64)? == absmax;
    let us = time(gpu, || nf4::nf4_quantize::forward(gpu, &d, xd, pd, ad))?;
    rep.add(
        "nf4 quantize 8192x4096 (bit-exact)",
        if exact { 0.0 } else { 1.0 },
        0.0,
        us,
        (n * 2 + n / 2 + n / 16) as f64,
    );

    let offset = quant_prelude::absmax_mean(&absmax);
    let code2 = quant_prelude::dynamic_map_signed();
    let na = n / 64;
    let da = nf4::absmax_quantize::Dims { NA: na };
    let (mut q, mut am2) = (vec![0u8; na], vec![0f32; na.div_ceil(256)]);
    nf4::absmax_quantize::forward_cpu::<f32>(
        &da,
        offset,
        &absmax,
        &code2,
        &mut q,
        &mut am2,
        Rounding::BF16,
    );
    let (code2d, qd, am2d) = (
        b.put(&code2)?,
        b.put(&vec![0u8; na])?,
        b.put(&vec![0f32; na.div_ceil(256)])?,
    );
    nf4::absmax_quantize::forward(gpu, &da, offset, ad, code2d, qd, am2d)?;
    let exact = b.get(qd, na)? == q && b.get(am2d, na.div_ceil(256))? == am2;
    let us = time(gpu, || {
        nf4::absmax_quantize::forward(gpu, &da, offset, ad, code2d, qd, am2d)
    })?;
    rep.add(
        "nf4 absmax double-quant (bit-exact)",
        if exact { 0.0 } else { 1.0 },
        0.0,
        us,
        (na * 5 + na / 64) as f64,
    );

    let nf4c = quant_prelude::nf4_code();
    let nfd = b.put(&nf4c)?;
    let dd = nf4::nf4_dequantize::Dims { N: n };
    let mut w = vec![0f32; n];
    nf4::nf4_dequantize::forward_cpu::<f32>(
        &dd,
        offset,
        &packed,
        &q,
        &am2,
        &code2,
        &nf4c,
        &mut w,
        Rounding::BF16,
    );
    // the op's generated kernel, and the model's path (ops/kernels/nf4_dequant.cu)
    let op = |wd| nf4::nf4_dequantize::forward(gpu, &dd, offset, pd, qd, am2d, code2d, nfd, wd);
    let wide = |wd| nf4::dequantize_bf16(gpu, n, offset, pd, qd, am2d, code2d, nfd, wd);
    type Launch<'a> = &'a dyn Fn(DevPtr<bf16>) -> Result<(), RuntimeError>;
    let kernels: [(&str, Launch); 2] = [
        ("nf4 dequantize 8192x4096 (bit-exact)", &op),
        (
            "nf4 dequantize, 4 chunks a thread, 8192x4096 (bit-exact)",
            &wide,
        ),
    ];
    for (name, launch) in kernels {
        let wd = b.bf16(&vec![0.0; n])?;
        launch(wd)?;
        let got = b.get_bf16(wd, n)?;
        let exact = got.iter().zip(&w).all(|(a, b)| a.to_bits() == b.to_bits());
        let us = time(gpu, || launch(wd))?;
        rep.add(
            name,
            if exact { 0.0 } else { 1.0 },
            0.0,
            us,
            (n / 2 + n / 64 + n * 2) as f64,
        );
    }
    Ok(())
}

fn check_adamw(gpu: &Gpu, rng: &mut Rng, rep: &mut Report) -> Result<(), RuntimeError> {
    let mut b = Bufs::new(gpu);
    let n = 16 << 20;
    let p: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
    let g: Vec<f32> = (0..n).map(|_| (rng.normal() * 0.01) as f32).collect();
    let m: Vec<f32> = (0..n).map(|_| (rng.normal() * 0.01) as f32).collect();
    let v: Vec<f32> = (0..n)
        .map(|_| (rng.normal() * 0.001).powi(2) as f32)
        .collect();
    let (pd, gd, md, vd) = (b.put(&p)?, b.put(&g)?, b.put(&m)?, b.put(&v)?);
    let d = adamw::adamw::Dims { N: n };
    let (lr, wdk, b1, b2, eps) = (1e-3f32, 0.01f32, 0.9f32, 0.999f32, 1e-8f32);
    let (ss, bc2) = (lr / (1.0 - b1.powi(3)), (1.0 - b2.powi(3)).sqrt());
    let (mut pc, mut mc, mut vc) = (p.clone(), m.clone(), v.clone());
    adamw::adamw::forward_cpu::<f32>(
        &d,
        lr,
        wdk,
        b1,
        b2,
        eps,
        ss,
        bc2,
        &mut pc,
        &g,
        &mut mc,
        &mut vc,
        Rounding::F32,
    );
    adamw::adamw::forward(gpu, &d, lr, wdk, b1, b2, eps, ss, bc2, pd, gd, md, vd)?;
    let err = rel_err(&b.get(pd, n)?, &pc)
        .max(rel_err(&b.get(md, n)?, &mc))
        .max(rel_err(&b.get(vd, n)?, &vc));
    let us = time(gpu, || {
        adamw::adamw::forward(gpu, &d, lr, wdk, b1, b2, eps, ss, bc2, pd, gd, md, vd)
    })?;
    rep.add("adamw f32 16M params", err, 1e-5, us, (n * 28) as f64);

    let code_m = quant_prelude::dynamic_map_signed();
    let code_v = quant_prelude::dynamic_map_unsigned();
    let nb = n.div_ceil(256);
    let (cmd, cvd) = (b.put(&code_m)?, b.put(&code_v)?);
    let (qmd, qvd) = (b.put(&vec![0u8; n])?, b.put(&vec![0u8; n])?);
    let (amd, avd) = (b.put(&vec![0f32; nb])?, b.put(&vec![0f32; nb])?);
    let p8d = b.put(&p)?;
    let d8 = adamw::adamw_8bit::Dims { N: n };
    let (mut p8, mut qm, mut qv, mut am, mut av) = (
        p.clone(),
        vec![0u8; n],
        vec![0u8; n],
        vec![0f32; nb],
        vec![0f32; nb],
    );
    let (eps2, step, decay) = (bc2 * eps, -ss * bc2, 1.0 - lr * wdk);
    adamw::adamw_8bit::forward_cpu::<f32>(
        &d8,
        b1,
        b2,
        eps2,
        step,
        decay,
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
    adamw::adamw_8bit::forward(
        gpu, &d8, b1, b2, eps2, step, decay, p8d, gd, qmd, qvd, amd, avd, cmd, cvd,
    )?;
    let err = rel_err(&b.get(p8d, n)?, &p8).max(rel_err(&b.get(amd, nb)?, &am));
    let us = time(gpu, || {
        adamw::adamw_8bit::forward(
            gpu, &d8, b1, b2, eps2, step, decay, p8d, gd, qmd, qvd, amd, avd, cmd, cvd,
        )
    })?;
    rep.add(
        "adamw 8-bit blockwise 16M params",
        err,
        1e-5,
        us,
        (n * 12 + nb * 16) as f64,
    );
    Ok(())
}

/// Decode attention of `s` random query rows over a filled cache (host copies `kc`, `vc` of
/// the device's `kcd`, `vcd`) against the f64 CPU reference; GB/s over the keys and values read.
#[allow(clippy::too_many_arguments)]
fn check_decode_attention(
    gpu: &Gpu,
    rng: &mut Rng,
    rep: &mut Report,
    cd: &decode::CacheDims,
    s: usize,
    kc: &[f32],
    vc: &[f32],
    kcd: DevPtr<bf16>,
    vcd: DevPtr<bf16>,
    slots: &[i32],
    lens: &[i32],
) -> Result<(), RuntimeError> {
    let mut b = Bufs::new(gpu);
    let plan = decode::SplitPlan::new(cd, s);
    let scratch = b.put(&vec![0f32; plan.scratch_len(cd, s)])?;
    let (sd, ld) = (b.put(slots)?, b.put(lens)?);
    let q = randn(rng, s * cd.heads * cd.head_dim, 1.0);
    let qd = b.bf16(&q)?;
    let od = b.bf16(&vec![0.0; q.len()])?;
    let mut want = vec![0f32; q.len()];
    decode::decode_attention_cpu(cd, &q, kc, vc, slots, lens, &mut want);
    let run = || decode::decode_attention(gpu, cd, &plan, s, qd, kcd, vcd, sd, ld, scratch, od);
    run()?;
    let err = rel_err(&b.get_bf16(od, q.len())?, &want);
    let us = time(gpu, run)?;
    let row = cd.kv_heads * cd.head_dim;
    let kv_bytes: f64 = lens
        .iter()
        .map(|&l| (2 * l as usize * row * 2) as f64)
        .sum();
    let name = format!(
        "decode attention batch {s}, {}/{} heads d{}, len <= {} ({} splits of {})",
        cd.heads, cd.kv_heads, cd.head_dim, cd.capacity, plan.splits, plan.keys_per_split
    );
    rep.add(&name, err, TOLERANCE, us, kv_bytes);
    Ok(())
}

/// KV-cache store, decode attention and greedy argmax at a batch-64 decode step of an 8B
/// shape (32/8 heads of 128, cache of 1024 tokens per slot, random fill lengths).
fn check_decode(gpu: &Gpu, rng: &mut Rng, rep: &mut Report) -> Result<(), RuntimeError> {
    let mut b = Bufs::new(gpu);
    let (s, t) = (64usize, 1024usize);
    let cd = decode::CacheDims::new(32, 8, 128, t);
    let row = cd.kv_heads * cd.head_dim;
    let cache = randn(rng, s * t * row, 1.0);
    let (kcd, vcd) = (b.bf16(&cache)?, b.bf16(&randn(rng, s * t * row, 1.0))?);
    let mut kc = b.get_bf16(kcd, s * t * row)?;
    let mut vc = b.get_bf16(vcd, s * t * row)?;
    // This step's keys and values go to position len - 1 of a shuffled slot per sequence.
    let slots: Vec<i32> = (0..s).map(|i| ((i * 37) % s) as i32).collect();
    let lens: Vec<i32> = (0..s)
        .map(|_| 1 + (rng.uniform(0.0, 1.0) * (t as f64 - 1.0)) as i32)
        .collect();
    let pos: Vec<i32> = lens.iter().map(|l| l - 1).collect();
    let (k_new, v_new) = (randn(rng, s * row, 1.0), randn(rng, s * row, 1.0));
    let (knd, vnd) = (b.bf16(&k_new)?, b.bf16(&v_new)?);
    let (sd, pd) = (b.put(&slots)?, b.put(&pos)?);
    decode::kv_store(gpu, &cd, s, knd, vnd, sd, pd, kcd, vcd)?;
    decode::kv_store_cpu(&cd, &k_new, &v_new, &slots, &pos, &mut kc, &mut vc);
    let stored = rel_err(&b.get_bf16(kcd, s * t * row)?, &kc)
        .max(rel_err(&b.get_bf16(vcd, s * t * row)?, &vc));
    let us = time(gpu, || {
        decode::kv_store(gpu, &cd, s, knd, vnd, sd, pd, kcd, vcd)
    })?;
    rep.add(
        "kv_store 64 rows into a 64x1024 cache (exact)",
        stored,
        0.0,
        us,
        (4 * s * row * 2) as f64,
    );

    // a fused q/k/v projection's rows (8B: 32 + 8 + 8 heads of 128) split into q, k, v, with
    // RoPE at the rows' positions and without (against the split and ops::rope's CPU reference)
    let qd = decode::QkvDims {
        heads: cd.heads,
        kv_heads: cd.kv_heads,
        head_dim: cd.head_dim,
        positions: t,
    };
    let widths = qd.widths();
    let w: usize = widths.iter().sum();
    let xd = b.bf16(&randn(rng, s * w, 1.0))?;
    let x = b.get_bf16(xd, s * w)?;
    let angles: Vec<f32> = (0..t * cd.head_dim).map(|i| i as f32 * 0.37).collect();
    let (cosd, sind) = (
        b.bf16(&angles.iter().map(|a| a.cos()).collect::<Vec<_>>())?,
        b.bf16(&angles.iter().map(|a| a.sin()).collect::<Vec<_>>())?,
    );
    let (cosv, sinv) = (
        b.get_bf16(cosd, t * cd.head_dim)?,
        b.get_bf16(sind, t * cd.head_dim)?,
    );
    let outs = [
        b.bf16(&vec![0.0; s * w])?,
        b.bf16(&vec![0.0; s * w])?,
        b.bf16(&vec![0.0; s * w])?,
    ];
    for (rope, what) in [(true, "with RoPE"), (false, "without RoPE")] {
        let dev_rope = rope.then_some((pd, cosd, sind));
        decode::split_qkv(gpu, &qd, s, xd, dev_rope, outs)?;
        let cpu_rope = rope.then_some((&pos[..], &cosv[..], &sinv[..]));
        let want = decode::split_qkv_cpu(&qd, &x, cpu_rope, Rounding::BF16);
        let mut err = 0.0f64;
        for i in 0..3 {
            err = err.max(rel_err(&b.get_bf16(outs[i], s * widths[i])?, &want[i]));
        }
        let us = time(gpu, || decode::split_qkv(gpu, &qd, s, xd, dev_rope, outs))?;
        rep.add(
            &format!("split_qkv 64 rows of 32+8+8 heads of 128 {what} (exact)"),
            err,
            0.0,
            us,
            (2 * s * w * 2) as f64,
        );
    }

    check_decode_attention(gpu, rng, rep, &cd, s, &kc, &vc, kcd, vcd, &slots, &lens)?;
    for (heads, kv_heads, head_dim, seqs) in [(32, 8, 64, 1), (16, 1, 128, 2), (28, 4, 80, 3)] {
        let cd = decode::CacheDims::new(heads, kv_heads, head_dim, t);
        let n = seqs * t * kv_heads * head_dim;
        let (kc, vc) = (randn(rng, n, 1.0), randn(rng, n, 1.0));
        let (kcd, vcd) = (b.bf16(&kc)?, b.bf16(&vc)?);
        let (kc, vc) = (b.get_bf16(kcd, n)?, b.get_bf16(vcd, n)?);
        let slots: Vec<i32> = (0..seqs as i32).rev().collect();
        let lens: Vec<i32> = (0..seqs)
            .map(|_| 1 + (rng.uniform(0.0, 1.0) * (t as f64 - 1.0)) as i32)
            .collect();
        check_decode_attention(gpu, rng, rep, &cd, seqs, &kc, &vc, kcd, vcd, &slots, &lens)?;
    }

    let v = 128256usize;
    let logits = randn(rng, s * v, 3.0);
    let lgd = b.put(&logits)?;
    let idxd = b.put(&vec![0i32; s])?;
    let seed = 1234;
    // T = 0.7's (inv_temp, seed) from device memory, as a captured graph reads them
    let params = b.put(&[(1.0f32 / 0.7).to_bits() as u64, seed])?;
    for (inv_temp, sampling, what) in [
        (
            0.0f32,
            decode::Sampling::Given {
                inv_temp: 0.0,
                seed,
            },
            "greedy",
        ),
        (
            1.0,
            decode::Sampling::Given {
                inv_temp: 1.0,
                seed,
            },
            "T=1 Gumbel-max",
        ),
        (
            1.0 / 0.7,
            decode::Sampling::InMemory(params),
            "T=0.7 from memory",
        ),
    ] {
        decode::sample_rows(gpu, s, v, sampling, lgd, idxd)?;
        let got = b.get(idxd, s)?;
        let want = decode::sample_rows_cpu(&logits, v, inv_temp, seed);
        // A draw may differ where two noisy keys tie within logf's 1-ulp difference: allow one.
        let wrong = got.iter().zip(&want).filter(|(a, b)| a != b).count();
        let us = time(gpu, || decode::sample_rows(gpu, s, v, sampling, lgd, idxd))?;
        rep.add(
            &format!("sample 64 x 128256 {what} (rows differing)"),
            wrong as f64,
            if inv_temp > 0.0 { 1.0 } else { 0.0 },
            us,
            (s * v * 4) as f64,
        );
    }
    Ok(())
}
