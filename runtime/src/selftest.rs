//! `ftrt selftest --runtime`: checks of this crate on a real GPU. GEMM against the CPU GEMM at
//! several shapes and every transpose, bf16 8192^3 throughput, the 32-bit fill and the memset,
//! synthetic graphs with offloaded and recomputed tensors GPU vs CPU (the offload round trip),
//! and CUDA graph replay vs eager launches (same results; host time per replay and per eager
//! node).

use crate::device::Gpu;
use crate::error::RuntimeError;
use crate::executor::{CpuExecutor, CudaExecutor};
use crate::gemm::cpu::gemm;
use crate::gemm::cublaslt::{CublasLt, GemmWorkspace, DEFAULT_WORKSPACE_BYTES};
use crate::gemm::GemmDesc;
use crate::graph::{Graph, TensorId};
use crate::offload::estimate;
use crate::planner::{fmt_bytes, CostModel};
use crate::planner::{plan, Plan, PlanOptions};
use crate::rng::SplitMix64;
use crate::synthetic::{offload_bar_plans, offload_graph, training_graph, OffloadGraphShape};
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
    rows.push(fill_check(gpu)?);
    for seed in offloading_seeds(4, 6, 1 << 20) {
        rows.push(graph_gpu_vs_cpu(gpu, seed)?);
    }
    rows.push(replay_vs_eager(gpu)?);
    rows.extend(offload_bar(
        gpu,
        &OffloadGraphShape::SELFTEST,
        OFFLOAD_BAR_FORCE,
    )?);
    Ok(rows)
}

/// Saved activations per micro-batch the offload bar's budget removes from the kept plan
/// (12 of 16: the planner then offloads 24 of the 32 saved tensors of the step).
pub const OFFLOAD_BAR_FORCE: usize = 12;

/// The bar: offloaded step time / kept step time, both captured CUDA graphs.
pub const OFFLOAD_BAR_RATIO: f64 = 1.05;

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

/// [`Gpu::fill_u32`] and [`Gpu::memset_zero`] against the words they should leave in a buffer
/// of fresh random words: a random word over a random prefix, zeros over a random stretch after
/// it, the rest as uploaded.
fn fill_check(gpu: &Gpu) -> Result<SelftestRow, RuntimeError> {
    let seed = crate::rng::fresh_seed();
    let mut rng = SplitMix64::new(seed);
    let n = (1 << 20) + rng.range(1, 4096);
    let words: Vec<u32> = (0..n).map(|_| rng.next_u64() as u32).collect();
    let (filled, zeroed) = (rng.range(1, n / 2), rng.range(1, n / 2));
    let value = rng.next_u64() as u32;
    let buf = gpu.alloc(n * 4)?;
    let p = buf.ptr::<u32>();
    let t = Instant::now();
    gpu.upload(p, &words)?;
    gpu.fill_u32(p.cast(), value, filled)?;
    gpu.memset_zero(p.offset(filled).cast(), zeroed * 4)?;
    let mut got = vec![0u32; n];
    gpu.download(p, &mut got)?;
    let mut want = words;
    want[..filled].fill(value);
    want[filled..filled + zeroed].fill(0);
    let wrong = got.iter().zip(&want).filter(|(g, w)| g != w).count();
    fail_if(
        SelftestRow {
            name: "fill_u32 + memset_zero".into(),
            max_rel_err: wrong as f64,
            time_us: t.elapsed().as_secs_f64() * 1e6,
            detail: format!(
                "{n} words: {filled} set to {value:#010x}, {zeroed} zeroed, the rest kept; \
                 {wrong} wrong (seed {seed})"
            ),
        },
        0.0,
    )
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

/// Among budgets from 95% down to 20% of the full arena, timed by node counts (so that tiny
/// synthetic nodes still leave room for copies) or by bandwidth, the plan that offloads the
/// most tensors (then recomputes the most, then the smallest arena).
fn tight_plan(g: &Graph) -> Result<Plan, RuntimeError> {
    let full = plan(g, &PlanOptions::by_node_count())?;
    let mut best = full.clone();
    let key = |p: &Plan| {
        (
            p.offloads.len(),
            p.recomputes.len(),
            std::cmp::Reverse(p.arena_bytes),
        )
    };
    for mode in [PlanOptions::by_node_count(), PlanOptions::default()] {
        for pct in (20..=95).rev().step_by(5) {
            let budget = full.arena_bytes / 100 * pct;
            if let Ok(p) = plan(g, &mode.clone().with_budget(budget)) {
                if key(&p) > key(&best) {
                    best = p;
                }
            }
        }
    }
    Ok(best)
}

/// The first `count` seeds from 0 whose synthetic graph (`layers`, `max_elems`) has a tight
/// plan that offloads (some graphs' peaks have no saved tensor idle at them).
fn offloading_seeds(count: usize, layers: usize, max_elems: usize) -> Vec<u64> {
    (0..200u64)
        .filter(|&s| {
            tight_plan(&training_graph(s, layers, max_elems)).is_ok_and(|p| !p.offloads.is_empty())
        })
        .take(count)
        .collect()
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
    let seed = *offloading_seeds(1, 32, 1 << 14)
        .first()
        .ok_or_else(|| RuntimeError::Unsupported("no 32-layer synthetic graph offloads".into()))?;
    let g = training_graph(seed, 32, 1 << 14);
    let p = tight_plan(&g)?;
    let init = whole_step_inputs(&g, seed);
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

/// Host data for the offload graph: weights uniform in `±sqrt(3 / hidden)` (activations keep
/// their scale through the GEMMs), token activations uniform in `±1`; 8 distinct weight
/// matrices reused round-robin to keep generation short.
fn offload_inputs(
    g: &Graph,
    shape: &OffloadGraphShape,
    inputs: &[TensorId],
) -> Vec<(TensorId, std::sync::Arc<Vec<bf16>>)> {
    let mut rng = SplitMix64::new(0x00ff_10ad);
    let scale = (3.0 / shape.hidden as f32).sqrt();
    let mut gen = |n: usize, scale: f32| {
        std::sync::Arc::new(
            (0..n)
                .map(|_| bf16::from_f32(rng.symmetric_f32() * scale))
                .collect::<Vec<bf16>>(),
        )
    };
    let hh = shape.hidden * shape.hidden;
    let weights: Vec<_> = (0..8).map(|_| gen(hh, scale)).collect();
    let mut out = Vec::new();
    let mut k = 0;
    for &t in inputs {
        let n = g.tensor(t).elems();
        let data = if n == hh {
            k += 1;
            weights[(k - 1) % weights.len()].clone()
        } else {
            gen(n, 1.0)
        };
        out.push((t, data));
    }
    out
}

/// Every output of the offload graph as raw bytes.
fn read_outputs(ex: &CudaExecutor<'_>, outputs: &[TensorId]) -> Result<Vec<Vec<u8>>, RuntimeError> {
    outputs.iter().map(|&t| ex.read::<u8>(t)).collect()
}

/// Bytes that differ between two sets of outputs.
fn differing_bytes(a: &[Vec<u8>], b: &[Vec<u8>]) -> usize {
    a.iter()
        .zip(b)
        .map(|(x, y)| x.iter().zip(y).filter(|(p, q)| p != q).count() + x.len().abs_diff(y.len()))
        .sum()
}

/// Largest magnitude in the outputs (bf16 or f32 per tensor), NaN if any is not finite.
fn outputs_scale(g: &Graph, outputs: &[TensorId], data: &[Vec<u8>]) -> f64 {
    let mut m = 0f64;
    for (&t, bytes) in outputs.iter().zip(data) {
        let vals: Vec<f32> = match g.tensor(t).dtype {
            crate::dtype::DType::BF16 => bytes
                .chunks_exact(2)
                .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            _ => bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        };
        for v in vals {
            if !v.is_finite() {
                return f64::NAN;
            }
            m = m.max(v.abs() as f64);
        }
    }
    m
}

/// Mean step time (ms) of `reps` replays, timed with events on the compute stream.
fn replay_ms(gpu: &Gpu, ex: &CudaExecutor<'_>, reps: usize) -> Result<f64, RuntimeError> {
    let flags = Some(CUevent_flags::CU_EVENT_DEFAULT);
    let (start, end) = (
        gpu.context().new_event(flags)?,
        gpu.context().new_event(flags)?,
    );
    start.record(gpu.stream())?;
    for _ in 0..reps {
        ex.replay()?;
    }
    end.record(gpu.stream())?;
    Ok(start.elapsed_ms(&end)? as f64 / reps as f64)
}

/// The offload bar: the same bf16 GEMM step (see [`offload_graph`]) planned with everything
/// kept and under a budget that offloads most saved activations to pinned host memory, both
/// captured as CUDA graphs (the copy streams join the capture through events) and replayed.
/// Reports both step times and their ratio (bar: <= [`OFFLOAD_BAR_RATIO`]; a miss is reported,
/// not an error), bytes offloaded, the pinned pool with and without reuse, and the planner's
/// estimate. Errors if the offloaded step's outputs (eager and replayed) differ in any byte
/// from the kept step's, or are not finite.
pub fn offload_bar(
    gpu: &Gpu,
    shape: &OffloadGraphShape,
    force: usize,
) -> Result<Vec<SelftestRow>, RuntimeError> {
    let t0 = Instant::now();
    let (g, io) = offload_graph(shape);
    let (kept, off) = offload_bar_plans(&g, shape, force, &PlanOptions::default())?;
    if off.offloads.is_empty() {
        return Err(RuntimeError::Unsupported(
            "offload bar: the budget offloaded nothing".into(),
        ));
    }
    let init = offload_inputs(&g, shape, &io.inputs);
    let mut ek = CudaExecutor::new(gpu, &g, &kept)?;
    let mut eo = CudaExecutor::new(gpu, &g, &off)?;
    for ex in [&ek, &eo] {
        for (t, v) in &init {
            ex.write(*t, v.as_slice())?;
        }
    }
    drop(init);
    // capture() runs one eager step first: its results are in the arena when it returns.
    ek.capture()?;
    let kept_eager = read_outputs(&ek, &io.outputs)?;
    eo.capture()?;
    let off_eager = read_outputs(&eo, &io.outputs)?;
    ek.replay()?;
    eo.replay()?;
    gpu.synchronize()?;
    let kept_replay = read_outputs(&ek, &io.outputs)?;
    let off_replay = read_outputs(&eo, &io.outputs)?;
    let diff_eager = differing_bytes(&kept_eager, &off_eager);
    let diff_replay = differing_bytes(&kept_replay, &off_replay);
    let diff_kept = differing_bytes(&kept_eager, &kept_replay);
    let scale = outputs_scale(&g, &io.outputs, &kept_replay);
    let compared: usize = kept_replay.iter().map(Vec::len).sum();
    let (mut kept_ms, mut off_ms) = (f64::INFINITY, f64::INFINITY);
    let reps = 10;
    for _ in 0..3 {
        kept_ms = kept_ms.min(replay_ms(gpu, &ek, reps)?);
        off_ms = off_ms.min(replay_ms(gpu, &eo, reps)?);
    }
    let ratio = off_ms / kept_ms;
    let cost = CostModel::H200;
    let (est_k, est_o) = (estimate(&g, &kept, &cost), estimate(&g, &off, &cost));
    let host_unshared: usize = off
        .offloads
        .iter()
        .map(|o| crate::planner::align_up(o.bytes, crate::planner::ARENA_ALIGNMENT))
        .sum();
    let gemms = g
        .nodes
        .iter()
        .filter(|n| matches!(n.kind, crate::graph::NodeKind::Gemm { .. }))
        .count();
    let tflops = g
        .nodes
        .iter()
        .filter_map(|n| match &n.kind {
            crate::graph::NodeKind::Gemm { desc, .. } => Some(desc.flops()),
            _ => None,
        })
        .sum::<f64>()
        / (kept_ms * 1e-3)
        / 1e12;
    let kept_row = SelftestRow {
        name: "offload bar: kept step (CUDA graph)".into(),
        max_rel_err: 0.0,
        time_us: kept_ms * 1e3,
        detail: format!(
            "{} layers x {} micro-batches, {gemms} bf16 GEMMs {}x{}x{} ({tflops:.0} TFLOP/s), \
             arena {}, all {} saved kept; estimated {:.1} ms",
            shape.layers,
            shape.micro_batches,
            shape.tokens,
            shape.hidden,
            shape.hidden,
            fmt_bytes(kept.arena_bytes),
            io.saved.len(),
            est_k.step_s * 1e3
        ),
    };
    let off_row = SelftestRow {
        name: "offload bar: offloaded step (CUDA graph)".into(),
        max_rel_err: 0.0,
        time_us: off_ms * 1e3,
        detail: format!(
            "ratio {ratio:.4} vs kept ({}: <= {OFFLOAD_BAR_RATIO}); {} of {} saved offloaded, {} each way \
             per step ({:.1} GB/s each way averaged over the step); arena {} (budget {}) vs {} kept; \
             pinned pool {} ({} without reuse); estimated {:.1} ms, {:.2} ms stall, copy streams busy \
             {:.1}/{:.1} ms",
            if ratio <= OFFLOAD_BAR_RATIO { "bar met" } else { "BAR MISSED" },
            off.offloads.len(),
            io.saved.len(),
            fmt_bytes(off.offloaded_bytes),
            off.offloaded_bytes as f64 / (off_ms * 1e-3) / 1e9,
            fmt_bytes(off.arena_bytes),
            fmt_bytes(off.budget.unwrap_or(0)),
            fmt_bytes(kept.arena_bytes),
            fmt_bytes(off.host_bytes),
            fmt_bytes(host_unshared),
            est_o.step_s * 1e3,
            est_o.stall_s * 1e3,
            est_o.d2h_busy_s * 1e3,
            est_o.h2d_busy_s * 1e3
        ),
    };
    let check = SelftestRow {
        name: "offload bar: outputs offloaded vs kept".into(),
        max_rel_err: if scale.is_finite() && scale > 0.0 {
            (diff_eager + diff_replay + diff_kept) as f64
        } else {
            f64::NAN
        },
        time_us: t0.elapsed().as_secs_f64() * 1e6,
        detail: format!(
            "{compared} output bytes ({} tensors, max |x| {scale:.3e}): differing bytes offloaded vs kept \
             {diff_eager} eager, {diff_replay} replayed; kept eager vs replayed {diff_kept} (must all be 0)",
            io.outputs.len()
        ),
    };
    Ok(vec![kept_row, off_row, fail_if(check, 0.0)?])
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
    fn selftest_graphs_offload() {
        let seeds = offloading_seeds(4, 6, 1 << 20);
        eprintln!("offloading seeds {seeds:?}");
        assert_eq!(seeds.len(), 4);
        let replay = offloading_seeds(1, 32, 1 << 14);
        eprintln!("replay seed {replay:?}");
        assert_eq!(replay.len(), 1);
    }

    #[test]
    fn selftest_without_gpu_is_a_clear_error() {
        if let Err(e) = Gpu::open(0) {
            assert!(!e.to_string().contains('\n'));
        }
    }
}
