//! `ftrt selftest --runtime`: checks of this crate on a real GPU. GEMM against the CPU GEMM at
//! several shapes and every transpose, bf16 8192^3 throughput, synthetic graphs with offloaded
//! and recomputed tensors GPU vs CPU (the offload round trip), and CUDA graph replay vs eager
//! launches (same results; host time per replay and per eager node).

use crate::device::Gpu;
use crate::error::RuntimeError;
use crate::executor::{CpuExecutor, CudaExecutor};
use crate::gemm::cpu::gemm;
use crate::gemm::cublaslt::{CublasLt, GemmWorkspace, DEFAULT_WORKSPACE_BYTES};
use crate::gemm::GemmDesc;
use crate::graph::{Graph, TensorId};
use crate::planner::{plan, Plan, PlanOptions};
use crate::rng::SplitMix64;
use crate::synthetic::training_graph;
use cudarc::driver::sys::CUevent_flags;
use half::bf16;
use std::time::Instant;

/// One line of the selftest report.
#[derive(Debug, Clone)]
pub struct SelftestRow {
    pub name: String,
    /// max |gpu - reference| / max |reference| (0 for rows that only measure).
    pub max_rel_err: f64,
    /// Wall time of the check, or the measured quantity's time, in microseconds.
    pub time_us: f64,
    pub detail: String,
}

/// bf16 GEMM tolerance (relative to the output's largest magnitude), as in Liger's tests.
pub const GEMM_TOLERANCE: f64 = 1e-2;
/// Tolerance of f32 synthetic graphs GPU vs CPU.
pub const GRAPH_TOLERANCE: f64 = 1e-5;

/// Runs every runtime check on `gpu`. A check that fails its tolerance is an error.
pub fn selftest_runtime(gpu: &Gpu) -> Result<Vec<SelftestRow>, RuntimeError> {
    let mut rows = vec![SelftestRow {
        name: "device".into(),
        max_rel_err: 0.0,
        time_us: 0.0,
        detail: gpu.info().to_string(),
    }];
    let blas = CublasLt::new(gpu)?;
    let ws_buf = gpu.alloc(DEFAULT_WORKSPACE_BYTES)?;
    let ws = GemmWorkspace {
        ptr: ws_buf.ptr(),
        bytes: ws_buf.bytes(),
    };
    let mut rng = SplitMix64::new(0x5e1f_7e57);
    for &(m, n, k, batch) in &[
        (64, 64, 64, 1),
        (127, 65, 33, 1),
        (512, 768, 256, 1),
        (1000, 300, 129, 3),
    ] {
        for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
            let bias = rng.chance(0.5);
            let beta = if rng.chance(0.5) { 1.0 } else { 0.0 };
            let desc = GemmDesc::new(m, n, k)
                .transposed(ta, tb)
                .batched(batch)
                .scaled(1.0, beta);
            rows.push(gemm_check(gpu, &blas, ws, &desc, bias, &mut rng)?);
        }
    }
    rows.push(gemm_throughput(gpu, &blas, ws, 8192)?);
    for seed in 0..4 {
        rows.push(graph_gpu_vs_cpu(gpu, seed)?);
    }
    rows.push(replay_vs_eager(gpu)?);
    Ok(rows)
}

fn rel_err(got: &[f32], want: &[f32]) -> f64 {
    let scale = want
        .iter()
        .fold(0f64, |m, &x| m.max(x.abs() as f64))
        .max(1e-30);
    let err = got
        .iter()
        .zip(want)
        .fold(0f64, |m, (&g, &w)| m.max((g as f64 - w as f64).abs()));
    err / scale
}

fn fail_if(row: SelftestRow, tol: f64) -> Result<SelftestRow, RuntimeError> {
    if row.max_rel_err.is_finite() && row.max_rel_err <= tol {
        Ok(row)
    } else {
        Err(RuntimeError::Unsupported(format!(
            "selftest '{}' failed: relative error {:.3e} > {tol:.0e} ({})",
            row.name, row.max_rel_err, row.detail
        )))
    }
}

/// cuBLASLt bf16 GEMM (bf16 output) against the f32 CPU GEMM on the same bf16 inputs.
fn gemm_check(
    gpu: &Gpu,
    blas: &CublasLt,
    ws: GemmWorkspace,
    d: &GemmDesc,
    with_bias: bool,
    rng: &mut SplitMix64,
) -> Result<SelftestRow, RuntimeError> {
    let (la, lb, lc) = d.required_lens();
    let mut rand = |n: usize| -> Vec<bf16> {
        (0..n)
            .map(|_| bf16::from_f32(rng.symmetric_f32()))
            .collect()
    };
    let (a, b, c0, bias) = (rand(la), rand(lb), rand(lc), rand(d.n));
    let f = |v: &[bf16]| v.iter().map(|x| x.to_f32()).collect::<Vec<f32>>();
    let mut want = f(&c0);
    gemm(
        d,
        &f(&a),
        &f(&b),
        &mut want,
        with_bias.then(|| f(&bias)).as_deref(),
    )?;

    let bufs = [la, lb, lc, d.n].map(|n| gpu.alloc(2 * n));
    let [da, db, dc, dbias] = bufs;
    let (da, db, dc, dbias) = (da?, db?, dc?, dbias?);
    gpu.upload(da.ptr(), &a)?;
    gpu.upload(db.ptr(), &b)?;
    gpu.upload(dc.ptr(), &c0)?;
    gpu.upload(dbias.ptr(), &bias)?;
    let t0 = Instant::now();
    blas.gemm_bf16(
        d,
        da.ptr(),
        db.ptr(),
        dc.ptr(),
        with_bias.then(|| dbias.ptr()),
        ws,
    )?;
    gpu.synchronize()?;
    let time_us = t0.elapsed().as_secs_f64() * 1e6;
    let mut got = vec![bf16::ZERO; lc];
    gpu.download(dc.ptr(), &mut got)?;
    let row = SelftestRow {
        name: format!(
            "gemm {}x{}x{} batch {} {}{}{}{}",
            d.m,
            d.n,
            d.k,
            d.batch,
            if d.transa { "T" } else { "N" },
            if d.transb { "T" } else { "N" },
            if with_bias { " +bias" } else { "" },
            if d.beta != 0.0 { " beta=1" } else { "" }
        ),
        max_rel_err: rel_err(&f(&got), &want),
        time_us,
        detail: "bf16 in/out, f32 accumulate, vs CPU f32 GEMM on the same inputs (first call: includes the heuristic)".into(),
    };
    fail_if(row, GEMM_TOLERANCE)
}

/// TFLOP/s of an `s x s x s` bf16 GEMM through the wrapper, timed with events.
fn gemm_throughput(
    gpu: &Gpu,
    blas: &CublasLt,
    ws: GemmWorkspace,
    s: usize,
) -> Result<SelftestRow, RuntimeError> {
    let d = GemmDesc::new(s, s, s);
    let mut rng = SplitMix64::new(1);
    let host: Vec<bf16> = (0..s * s)
        .map(|_| bf16::from_f32(rng.symmetric_f32()))
        .collect();
    let (a, b, c) = (
        gpu.alloc(2 * s * s)?,
        gpu.alloc(2 * s * s)?,
        gpu.alloc(2 * s * s)?,
    );
    gpu.upload(a.ptr(), &host)?;
    gpu.upload(b.ptr(), &host)?;
    let run = || blas.gemm_bf16(&d, a.ptr(), b.ptr(), c.ptr::<bf16>(), None, ws);
    for _ in 0..5 {
        run()?;
    }
    let start = gpu
        .context()
        .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
    let end = gpu
        .context()
        .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
    let iters = 30;
    start.record(gpu.stream())?;
    let t0 = Instant::now();
    for _ in 0..iters {
        run()?;
    }
    let host_us = t0.elapsed().as_secs_f64() * 1e6 / iters as f64;
    end.record(gpu.stream())?;
    let ms = start.elapsed_ms(&end)? as f64;
    let tflops = d.flops() * iters as f64 / (ms * 1e-3) / 1e12;
    Ok(SelftestRow {
        name: format!("gemm {s}^3 bf16 throughput"),
        max_rel_err: 0.0,
        time_us: ms * 1e3 / iters as f64,
        detail: format!(
            "{tflops:.1} TFLOP/s; host time per call {host_us:.2} us; {} cached plans",
            blas.cached_plans()
        ),
    })
}

/// Random values for every whole-step tensor of `g`.
fn whole_step_inputs(g: &Graph, seed: u64) -> Vec<(TensorId, Vec<f32>)> {
    let mut rng = SplitMix64::new(seed);
    (0..g.tensors.len())
        .map(TensorId)
        .filter(|&t| g.whole_step(t))
        .map(|t| {
            (
                t,
                (0..g.tensor(t).elems())
                    .map(|_| rng.symmetric_f32())
                    .collect(),
            )
        })
        .collect()
}

/// The tightest of a few budgets that still plans, preferring plans that offload.
fn tight_plan(g: &Graph) -> Result<Plan, RuntimeError> {
    let full = plan(g, &PlanOptions::default())?;
    let mut best = full.clone();
    for frac in [0.95, 0.9, 0.85, 0.8, 0.75, 0.7] {
        let opts = PlanOptions {
            vram_budget: Some((full.arena_bytes as f64 * frac) as usize),
            ..PlanOptions::default()
        };
        if let Ok(p) = plan(g, &opts) {
            if !p.offloads.is_empty() || best.offloads.is_empty() {
                best = p;
            }
        }
    }
    Ok(best)
}

/// A synthetic graph under a tight budget (offloads, recomputes) GPU vs CPU.
fn graph_gpu_vs_cpu(gpu: &Gpu, seed: u64) -> Result<SelftestRow, RuntimeError> {
    let g = training_graph(seed, 6, 1 << 20);
    let p = tight_plan(&g)?;
    let init = whole_step_inputs(&g, seed);
    let mut cpu = CpuExecutor::new(&g, &p);
    let ex = CudaExecutor::new(gpu, &g, &p)?;
    for (t, v) in &init {
        cpu.write(*t, v)?;
        ex.write(*t, v)?;
    }
    cpu.run_step()?;
    let t0 = Instant::now();
    ex.run_eager()?;
    gpu.synchronize()?;
    let time_us = t0.elapsed().as_secs_f64() * 1e6;
    let mut err: f64 = 0.0;
    for (t, _) in &init {
        err = err.max(rel_err(&ex.read::<f32>(*t)?, &cpu.read::<f32>(*t)?));
    }
    let row = SelftestRow {
        name: format!("graph {seed}: offload round trip, GPU vs CPU"),
        max_rel_err: err,
        time_us,
        detail: format!(
            "{} nodes, arena {} B, {} offloaded ({} B pinned), {} recomputed",
            g.nodes.len(),
            p.arena_bytes,
            p.offloads.len(),
            p.host_bytes,
            p.recomputes.len()
        ),
    };
    fail_if(row, GRAPH_TOLERANCE)
}

/// Captured replay vs eager launches of a many-node graph: same results, host overheads.
fn replay_vs_eager(gpu: &Gpu) -> Result<SelftestRow, RuntimeError> {
    let g = training_graph(99, 32, 1 << 14);
    let p = tight_plan(&g)?;
    let init = whole_step_inputs(&g, 99);
    let mut ex = CudaExecutor::new(gpu, &g, &p)?;
    let load = |ex: &CudaExecutor<'_>| init.iter().try_for_each(|(t, v)| ex.write(*t, v));
    load(&ex)?;
    let eager_host = ex.run_eager()?;
    gpu.synchronize()?;
    let eager: Vec<Vec<f32>> = init
        .iter()
        .map(|(t, _)| ex.read::<f32>(*t))
        .collect::<Result<_, _>>()?;
    ex.capture()?;
    load(&ex)?;
    ex.replay()?;
    gpu.synchronize()?;
    let mut err: f64 = 0.0;
    for ((t, _), want) in init.iter().zip(&eager) {
        err = err.max(rel_err(&ex.read::<f32>(*t)?, want));
    }
    let reps = 50;
    let mut replay_host = 0.0;
    for _ in 0..reps {
        replay_host += ex.replay()?.as_secs_f64();
    }
    gpu.synchronize()?;
    let mut eager_total = eager_host.as_secs_f64();
    for _ in 0..9 {
        eager_total += ex.run_eager()?.as_secs_f64();
    }
    gpu.synchronize()?;
    let per_replay_us = replay_host * 1e6 / reps as f64;
    let per_node_us = eager_total * 1e6 / (10 * g.nodes.len()) as f64;
    let row = SelftestRow {
        name: "graph replay vs eager".into(),
        max_rel_err: err,
        time_us: per_replay_us,
        detail: format!(
            "{} nodes, {} offloaded, {} recomputed; host per replay {per_replay_us:.1} us, eager host per node \
             {per_node_us:.2} us ({:.0} us per eager step)",
            g.nodes.len(),
            p.offloads.len(),
            p.recomputes.len(),
            eager_total * 1e6 / 10.0
        ),
    };
    fail_if(row, 0.0)
}

/// Prints rows as an aligned table.
pub fn format_rows(rows: &[SelftestRow]) -> String {
    let mut out = format!(
        "{:<48} {:>12} {:>12}  detail\n",
        "check", "max rel err", "time us"
    );
    for r in rows {
        out += &format!(
            "{:<48} {:>12.2e} {:>12.1}  {}\n",
            r.name, r.max_rel_err, r.time_us, r.detail
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rel_err_and_table() {
        assert_eq!(rel_err(&[1.0, 2.0], &[1.0, 2.0]), 0.0);
        assert!((rel_err(&[1.0, 2.1], &[1.0, 2.0]) - 0.05).abs() < 1e-6);
        let t = format_rows(&[SelftestRow {
            name: "x".into(),
            max_rel_err: 0.0,
            time_us: 1.0,
            detail: "d".into(),
        }]);
        assert!(t.contains("max rel err") && t.lines().count() == 2);
    }

    #[test]
    fn selftest_without_gpu_is_a_clear_error() {
        if let Err(e) = Gpu::open(0) {
            assert!(!e.to_string().contains('\n'));
        }
    }
}
