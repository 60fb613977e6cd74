//! `ftrt selftest --model`: the GPU model against the CPU model in `Rounding::BF16` and the
//! PEFT goldens on the tiny fixtures (loss and every LoRA gradient), the loss of one real
//! packed batch of SmolLM2-135M (GGUF) GPU vs CPU, and 20 AdamW steps on the GPU. The 4-bit
//! mode (QLoRA) on the Llama fixture: its dequantized NF4 weights bit for bit against the CPU
//! NF4 round trip (bitsandbytes' algorithm), then loss and LoRA gradients against the CPU bf16
//! model whose projection weights are replaced by that round trip.
//!
//! Errors are relative to the reference's largest magnitude (max |got - ref| / max |ref|, per
//! tensor; the worst tensor is reported). Nothing here panics: every failure is a row.

use std::path::PathBuf;

use ftrt_runtime::Gpu;

use super::plan::{GateUp, Offload};
use super::{init_adapter, GpuLlama, KeepBf16};
use crate::checkpoint::WeightSource;
use crate::config::ModelConfig;
use crate::llama::{Batch, LlamaModel, LoraAdapter, Proj, Rounding};
use crate::safetensors_io::SafetensorsFiles;
use ftrt_ops::selftest::rel_err;

/// GPU bf16 vs CPU bf16 / vs PEFT f32 tolerances (relative to max |ref|). End-to-end LoRA
/// gradients through bf16 layers: the CPU bf16 reference is itself 3-4e-2 from PEFT's f32
/// gradients on the fixtures, so two bf16 computations that round in different orders differ
/// by that much too (measured on an H200: 2.6-2.8e-2); single ops are held to 1e-2. Against
/// PEFT the GPU may also be as far as twice the CPU bf16 reference's own distance (on Qwen3
/// the q/k/v LoRA stacks' rounding order moved one layer-0 gradient from 3.3e-2 to 5.1e-2 of
/// PEFT's, CPU bf16 vs PEFT being 3.0e-2 there).
pub const TOL_CPU: f64 = 5e-2;
pub const TOL_PEFT: f64 = 5e-2;
pub const TOL_LOSS: f64 = 1e-2;

/// One result row: (name, error, detail); detail ends in "FAILED" when the check failed.
pub type Row = (String, f64, String);

pub(super) fn row(rows: &mut Vec<Row>, name: String, err: f64, tol: f64, detail: String) {
    let ok = err <= tol;
    rows.push((
        name,
        err,
        format!(
            "{detail} (tol {tol:.0e}){}",
            if ok { "" } else { "  FAILED" }
        ),
    ));
}

fn fixture_dir(arch: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/llama")
        .join(arch)
}

/// Runs every model check; returns the rows (failed checks say FAILED in their detail) or an
/// error when nothing could run. The caller decides pass/fail from the rows.
pub fn selftest_model(gpu: &Gpu) -> Result<Vec<Row>, String> {
    let mut rows = Vec::new();
    for arch in ["llama", "qwen2", "qwen3"] {
        if let Err(e) = check_fixture(gpu, arch, &mut rows) {
            rows.push((
                format!("model {arch}: fixture check"),
                f64::INFINITY,
                format!("error: {e}  FAILED"),
            ));
        }
        let graph = load_fixture(arch)
            .and_then(|f| super::graph_check::check_forward_graph(gpu, &f.cpu, arch, &mut rows));
        if let Err(e) = graph {
            rows.push((
                format!("model {arch}: forward graph check"),
                f64::INFINITY,
                format!("error: {e}  FAILED"),
            ));
        }
    }
    // a head dim with flash kernels: the graph's whole-prompt prefill through flash attention
    let d64 = super::random_init::random_llama(64, 11, Rounding::BF16);
    if let Err(e) = super::graph_check::check_forward_graph(gpu, &d64, "llama d64", &mut rows) {
        rows.push((
            "model llama d64: forward graph check".into(),
            f64::INFINITY,
            format!("error: {e}  FAILED"),
        ));
    }
    for arch in ["llama", "qwen3"] {
        if let Err(e) = check_offload_deep(gpu, arch, &mut rows) {
            rows.push((
                format!("model {arch}: checkpoint offload check"),
                f64::INFINITY,
                format!("error: {e}  FAILED"),
            ));
        }
    }
    let dynamic = KeepBf16::parse("layers.0.mlp.down_proj,layers.1.self_attn.q_proj");
    for keep in [KeepBf16::default(), dynamic] {
        if let Err(e) = check_fixture_4bit(gpu, "llama", &keep, &mut rows) {
            rows.push((
                format!("model llama 4-bit {:?}: fixture check", keep.0),
                f64::INFINITY,
                format!("error: {e}  FAILED"),
            ));
        }
    }
    if let Err(e) = check_bnb_checkpoint(gpu, &mut rows) {
        rows.push((
            "model llama bnb-4bit save".into(),
            f64::INFINITY,
            format!("error: {e}  FAILED"),
        ));
    }
    match crate::gguf::smollm2_gguf_path() {
        Err(e) => rows.push((
            "model smollm2-135m".into(),
            0.0,
            format!(
                "skipped: not cached here and not fetchable ({})",
                first_line(&e.to_string())
            ),
        )),
        Ok(path) => {
            if let Err(e) = check_smollm2(gpu, &path, &mut rows) {
                rows.push((
                    "model smollm2-135m".into(),
                    f64::INFINITY,
                    format!("error: {e}  FAILED"),
                ));
            }
        }
    }
    Ok(rows)
}

/// Whether every row passed.
pub fn all_passed(rows: &[Row]) -> bool {
    rows.iter().all(|r| !r.2.ends_with("FAILED"))
}

/// A fixture: the CPU bf16 model, its training batch and targets, the PEFT adapter, the goldens.
struct Fixture {
    cpu: LlamaModel,
    batch: Batch,
    targets: Vec<i32>,
    ad: LoraAdapter,
    /// The adapter rounded to bf16 (what the GPU GEMMs read), for the CPU reference.
    ad_bf: LoraAdapter,
    golden: SafetensorsFiles,
}

fn load_fixture(arch: &str) -> Result<Fixture, String> {
    let d = fixture_dir(arch);
    let config = ModelConfig::from_file(&d.join("config.json")).map_err(|e| e.to_string())?;
    let weights = WeightSource::Safetensors(SafetensorsFiles::open(&d).map_err(|e| e.to_string())?);
    let cpu = LlamaModel::new(&config, &weights, Rounding::BF16).map_err(|e| e.to_string())?;
    let golden =
        SafetensorsFiles::open(&d.join("golden.safetensors")).map_err(|e| e.to_string())?;
    let get = |k: &str| golden.to_f32(k).map_err(|e| format!("golden {k}: {e}"));
    let ids: Vec<u32> = get("train.ids")?.into_iter().map(|v| v as u32).collect();
    let cu: Vec<i32> = get("train.cu_seqlens")?
        .into_iter()
        .map(|v| v as i32)
        .collect();
    let targets: Vec<i32> = get("train.targets")?
        .into_iter()
        .map(|v| v as i32)
        .collect();
    let seqs: Vec<Vec<u32>> = cu
        .windows(2)
        .map(|w| {
            ids.get(w[0] as usize..w[1] as usize)
                .map(|s| s.to_vec())
                .ok_or("bad cu_seqlens")
        })
        .collect::<Result<_, _>>()?;
    let batch = Batch::packed(&seqs);
    let ad = LoraAdapter::load_peft(&d.join("adapter"), &cpu.dims).map_err(|e| e.to_string())?;
    // Adapter values as bf16 (what the GPU GEMMs read), for the CPU bf16 reference too.
    let mut ad_bf = ad.clone();
    ad_bf
        .data
        .iter_mut()
        .for_each(|v| *v = half::bf16::from_f32(*v).to_f32());
    Ok(Fixture {
        cpu,
        batch,
        targets,
        ad,
        ad_bf,
        golden,
    })
}

/// Every projection weight of `m` but those `keep` names replaced by its NF4 round trip
/// (bitsandbytes' quantize_4bit with double quantization, then dequantize_4bit to bf16) from its
/// bf16 value: what the GPU's 4-bit mode computes with.
pub fn nf4_round_trip(m: &mut LlamaModel, keep: &KeepBf16) {
    use ftrt_ops::quant_prelude::{dequantize_nf4_cpu, quantize_nf4_cpu};
    let bf = |v: f32| half::bf16::from_f32(v).to_f32();
    for l in 0..m.dims.layers {
        for p in Proj::ALL.into_iter().filter(|&p| !keep.keeps(l, p)) {
            let r = m.weights.layers[l].proj[p.index()].clone();
            let x: Vec<f32> = m.weights.data[r.clone()].iter().map(|&v| bf(v)).collect();
            let q = quantize_nf4_cpu(&x, 64);
            let y = dequantize_nf4_cpu(&q, x.len());
            for (dst, v) in m.weights.data[r].iter_mut().zip(y) {
                *dst = bf(v);
            }
        }
    }
}

/// The 4-bit mode on a fixture (see the module doc), with the projections `keep` names left in
/// bf16 (dynamic 4-bit); AdamW steps when nothing is kept.
/// Elements of the GPU model's projection weights (dequantized in 4-bit mode) whose bits differ
/// from `want`'s (rounded to bf16), and the total.
fn weights_differing(g: &GpuLlama, want: &LlamaModel) -> Result<(usize, usize), String> {
    let (mut bad, mut total) = (0usize, 0usize);
    for l in 0..want.dims.layers {
        for p in Proj::ALL {
            let got = g.download_proj_weight(l, p)?;
            let w = &want.weights.data[want.weights.layers[l].proj[p.index()].clone()];
            total += w.len();
            bad += got
                .iter()
                .zip(w)
                .filter(|(a, b)| a.to_bits() != half::bf16::from_f32(**b).to_f32().to_bits())
                .count()
                + got.len().abs_diff(w.len());
        }
    }
    Ok((bad, total))
}

/// A bitsandbytes 4-bit save (the fixture transformers + bitsandbytes wrote) in the GPU 4-bit
/// mode: every projection's stored NF4 parts go up as they are, and the GPU dequantizes them
/// bit for bit to the CPU model's weights (the bnb reader's dequantization, itself bit-exact
/// with bitsandbytes').
fn check_bnb_checkpoint(gpu: &Gpu, rows: &mut Vec<Row>) -> Result<(), String> {
    let dir = fixture_dir("bnb4bit");
    let config = ModelConfig::from_file(&dir.join("config.json")).map_err(|e| e.to_string())?;
    let source =
        WeightSource::Safetensors(SafetensorsFiles::open(&dir).map_err(|e| e.to_string())?);
    let cpu = LlamaModel::new(&config, &source, Rounding::BF16).map_err(|e| e.to_string())?;
    let keep = KeepBf16::default();
    let g = GpuLlama::from_model_4bit(gpu, &cpu, 64, 16, &keep, Some(&source))?;
    let want = cpu.dims.layers * Proj::ALL.len();
    let stored = g.nf4_as_stored();
    let (bad, total) = weights_differing(&g, &cpu)?;
    row(
        rows,
        "model llama bnb-4bit save: NF4 parts uploaded as stored, GPU vs CPU dequant (bit-exact)"
            .into(),
        if stored == want {
            bad as f64 / total.max(1) as f64
        } else {
            f64::INFINITY
        },
        0.0,
        format!("{stored} of {want} projections as stored; {bad} of {total} elements differ"),
    );
    Ok(())
}

fn check_fixture_4bit(
    gpu: &Gpu,
    arch: &str,
    keep: &KeepBf16,
    rows: &mut Vec<Row>,
) -> Result<(), String> {
    let Fixture {
        cpu,
        batch,
        targets,
        ad,
        ad_bf,
        ..
    } = load_fixture(arch)?;
    let arch = &if keep.0.is_empty() {
        arch.to_owned()
    } else {
        format!("{arch} ({} kept bf16)", keep.0.join(", "))
    };
    let mut cpu4 = cpu.clone();
    nf4_round_trip(&mut cpu4, keep);
    let mut g = GpuLlama::from_model_4bit(gpu, &cpu, batch.len(), ad.r, keep, None)?;
    if !g.is_4bit() {
        return Err("from_model_4bit built a bf16 model".into());
    }
    let (bad, total) = weights_differing(&g, &cpu4)?;
    row(
        rows,
        format!("model {arch} 4-bit: NF4 weights GPU vs CPU round trip (bit-exact)"),
        bad as f64 / total.max(1) as f64,
        0.0,
        format!("{bad} of {total} elements differ"),
    );
    let (cpu_loss, cpu_grads) = cpu4
        .loss_and_lora_grads(&batch, &targets, &ad_bf)
        .map_err(|e| e.to_string())?;
    let bf16_loss = cpu
        .loss(&batch, &targets, Some(&ad_bf))
        .map_err(|e| e.to_string())?;
    g.set_lora(&ad)?;
    // one step's loss and LoRA gradients against the CPU's on the same NF4 weights
    let against_cpu = |g: &mut GpuLlama, what: &str, rows: &mut Vec<Row>| {
        g.zero_grads()?;
        let gpu_loss = g.loss_and_grads(&batch, &targets)?;
        let grads = g.download_grads()?;
        let le = ((gpu_loss as f64) - cpu_loss as f64).abs() / (cpu_loss as f64).abs().max(1e-30);
        row(
            rows,
            format!("model {arch} 4-bit{what}: loss GPU vs CPU bf16 on NF4 weights"),
            le,
            TOL_LOSS,
            format!("gpu {gpu_loss:.5} cpu {cpu_loss:.5} (bf16 weights: {bf16_loss:.5})"),
        );
        let (mut worst, mut at, mut checked) = (0f64, String::new(), 0);
        for (l, p, which_b) in factors(cpu.dims.layers) {
            let (got, cref) = factor_pair(&grads, &cpu_grads, (l, p, which_b))?;
            let e = rel_err(&got, &cref);
            if e > worst || at.is_empty() {
                worst = e.max(worst);
                let ab = if which_b { "B" } else { "A" };
                at = format!("{l}.{}.lora_{ab}", p.module());
            }
            checked += 1;
        }
        row(
            rows,
            format!(
                "model {arch} 4-bit{what}: {checked} LoRA grads GPU vs CPU bf16 on NF4 weights"
            ),
            worst,
            TOL_CPU,
            format!("worst {at}"),
        );
        Ok::<_, String>(())
    };
    against_cpu(&mut g, "", rows)?;
    let (batch_b, targets_b) = same_shape_batch(&batch, &targets, cpu.dims.vocab);
    let steps = [(&batch, &targets[..]), (&batch_b, &targets_b[..])];
    graph_row(&mut g, steps, &format!("{arch} 4-bit"), rows)?;
    // the MLP in three tiles: up's and down's weights in slots of their own, each weight
    // dequantized once a pass (`GpuLlama::proj_weight`), eager and replayed as a graph
    g.set_mlp_tile_rows(batch.len().div_ceil(3));
    against_cpu(&mut g, ", MLP in three tiles", rows)?;
    let what = format!("{arch} 4-bit, MLP in three tiles: planned activation bytes");
    planned_bytes_row(&g, what, rows)?;
    graph_row(
        &mut g,
        steps,
        &format!("{arch} 4-bit, MLP in three tiles"),
        rows,
    )?;
    if !keep.0.is_empty() {
        return Ok(());
    }
    let mut trained = GpuLlama::from_model_4bit(gpu, &cpu, batch.len(), 16, keep, None)?;
    train_steps(
        &mut trained,
        &cpu.dims,
        &batch,
        &targets,
        &format!("model {arch} 4-bit"),
        rows,
    )
}

/// Loss of `g` on the batch and the largest relative difference of (loss, LoRA gradients)
/// from `want`.
fn loss_grads_err(
    g: &mut GpuLlama,
    batch: &Batch,
    targets: &[i32],
    want: (f32, &LoraAdapter),
) -> Result<(f32, f64), String> {
    g.zero_grads()?;
    let loss = g.loss_and_grads(batch, targets)?;
    let grads = g.download_grads()?;
    let e = rel_err(&grads.data, &want.1.data)
        .max(((loss - want.0) as f64).abs() / (want.0 as f64).abs().max(1e-30));
    Ok((loss, e))
}

/// Two rows: loss and LoRA gradients of `g` keeping `kept` layers (the others' checkpoints as
/// `offload` says) against `want` (loss, gradients) of keeping every layer, tolerance 1e-3;
/// the planner's activation bytes against the allocation.
#[allow(clippy::too_many_arguments)]
fn recompute_row(
    g: &mut GpuLlama,
    batch: &Batch,
    targets: &[i32],
    kept: usize,
    offload: Offload,
    want: (f32, &LoraAdapter),
    name: &str,
    rows: &mut Vec<Row>,
) -> Result<(), String> {
    let layers = g.dims.layers;
    g.set_kept_layers(kept);
    g.set_offload(offload);
    let (loss, e) = loss_grads_err(g, batch, targets, want)?;
    let how = match offload {
        Offload::Off => String::new(),
        Offload::Checkpoints {
            qkv,
            gate_up,
            resident_qkv,
            resid_travel,
            outputs_travel,
            sparse_skips,
            sparse_outputs_travel,
            ..
        } => format!(
            ", checkpoints{} offloaded{}{}{}{}{},",
            if qkv { " with q/k/v" } else { "" },
            match resid_travel {
                usize::MAX => String::new(),
                k => format!(" (at most {k} residuals through the host, the rest on the GPU)"),
            },
            match outputs_travel {
                usize::MAX => String::new(),
                k => format!(" (at most {k} layers' attention outputs through the host)"),
            },
            match sparse_outputs_travel {
                0 => String::new(),
                usize::MAX => format!(" (all with {sparse_skips} input residuals not stored)"),
                k => format!(" (at most {k} with {sparse_skips} input residuals not stored)"),
            },
            match gate_up {
                GateUp::Layers(0) => String::new(),
                GateUp::Layers(k) => format!(", gate/up of {k} layers through the host"),
                GateUp::Auto => ", gate/up as planned".into(),
            },
            match (qkv, resident_qkv) {
                (false, k @ 1..) => format!(", q/k/v of {k} layers kept on the GPU"),
                _ => String::new(),
            }
        ),
    };
    let recomputed = layers - kept;
    let what =
        format!("{name}: planned activation bytes, {recomputed} of {layers} recomputed{how}");
    planned_bytes_row(g, what, rows)?;
    row(
        rows,
        format!("model {name}: recompute {recomputed} of {layers} layers{how} == keep all"),
        e,
        1e-3,
        format!("loss {loss:.6}"),
    );
    Ok(())
}

/// A batch of the same shape as `batch` (so the same CUDA graph key) with other tokens and
/// targets (ids below `vocab`; ignored targets stay ignored).
fn same_shape_batch(batch: &Batch, targets: &[i32], vocab: usize) -> (Batch, Vec<i32>) {
    let other = |t: u32| (t * 53 + 7) % vocab as u32;
    let mut b = batch.clone();
    b.tokens.iter_mut().for_each(|t| *t = other(*t));
    let t = targets
        .iter()
        .map(|&t| if t < 0 { t } else { other(t as u32) as i32 })
        .collect();
    (b, t)
}

/// Every LoRA factor of `layers` layers as (layer, projection, B (else A)): layers, then
/// projections, then A before B.
fn factors(layers: usize) -> impl Iterator<Item = (usize, Proj, bool)> {
    (0..layers).flat_map(|l| {
        Proj::ALL
            .into_iter()
            .flat_map(move |p| [(l, p, false), (l, p, true)])
    })
}

/// That factor's values in `a` (its B when `b`, else its A), if `a` adapts that projection.
fn factor(a: &LoraAdapter, l: usize, p: Proj, b: bool) -> Option<Vec<f32>> {
    if b { a.b(l, p) } else { a.a(l, p) }.map(|s| s.to_vec())
}

/// That factor in `got` and in `want`; an error naming it when either lacks it.
fn factor_pair(
    got: &LoraAdapter,
    want: &LoraAdapter,
    (l, p, b): (usize, Proj, bool),
) -> Result<(Vec<f32>, Vec<f32>), String> {
    match (factor(got, l, p, b), factor(want, l, p, b)) {
        (Some(x), Some(y)) => Ok((x, y)),
        _ => Err(format!("gradient of layer {l} {} missing", p.module())),
    }
}

/// The planner's activation bytes against what was allocated for `g`'s configuration (after
/// a step), as row "model {what} == allocated".
fn planned_bytes_row(g: &GpuLlama, what: String, rows: &mut Vec<Row>) -> Result<(), String> {
    let (held, planned) = g.activation_bytes();
    let held = held.ok_or("activations not allocated after a step")?;
    row(
        rows,
        format!("model {what} == allocated"),
        (planned as f64 - held as f64).abs() / held as f64,
        // tiny fixtures: every buffer takes at least 256 bytes, which the plan does not count
        0.1,
        format!("planned {planned}, allocated {held}"),
    );
    Ok(())
}

/// The training step as a CUDA graph against the same step run eagerly, on `g` as configured:
/// two batches of one shape (so one graph key) with different tokens, each run eagerly, then
/// with graphs on A (eager: the key's first sighting), B (captured), A and B (replayed). Each
/// step's loss and LoRA gradients must equal the eager ones bit for bit (a graph that baked in
/// the first batch's data, or lost a copy stream's ordering, fails here), and three of the four
/// steps must have run as graphs.
fn graph_row(
    g: &mut GpuLlama,
    steps: [(&Batch, &[i32]); 2],
    name: &str,
    rows: &mut Vec<Row>,
) -> Result<(), String> {
    let run = |g: &mut GpuLlama, (batch, targets): (&Batch, &[i32])| {
        g.zero_grads()?;
        let loss = g.loss_and_grads(batch, targets)?;
        Ok::<_, String>((loss, g.download_grads()?.data))
    };
    g.set_cuda_graphs(false);
    let eager = [run(g, steps[0])?, run(g, steps[1])?];
    g.set_cuda_graphs(true);
    let before = g.graph_steps();
    let mut err = 0f64;
    for i in [0, 1, 0, 1] {
        let (loss, grads) = run(g, steps[i])?;
        let (want_loss, want) = &eager[i];
        err = err
            .max(rel_err(&grads, want))
            .max((loss - want_loss).abs() as f64);
    }
    let graphs = g.graph_steps() - before;
    row(
        rows,
        format!("model {name}: training step as a CUDA graph (captured, replayed) == eager"),
        if graphs == 3 { err } else { f64::INFINITY },
        0.0,
        format!("{graphs} of 4 steps ran as graphs (want 3), bit for bit"),
    );
    Ok(())
}

/// Layers of [`check_offload_deep`]'s model: more than the device ring holds.
const OFFLOAD_LAYERS: usize = super::plan::RESID_RING + 3;

/// Checkpoint offload through host memory: the fixtures' two layers fit the device rings, so
/// this runs the `arch` fixture's shape with [`OFFLOAD_LAYERS`] random layers (the first
/// `OFFLOAD_LAYERS - RESID_RING` layers' residuals and attention checkpoints travel), with and
/// without q, k, v in the checkpoints (Qwen3: with what its q/k norms read), then with three
/// and with every layer's gate/up outputs through the host (one slot: all but the highest
/// travel), then with the q, k, v of three and of every layer kept on the GPU (the latter with
/// two layers' gate/up through the host), two steps each (the second reuses the rings and the
/// events), each against keeping every layer; three again with the MLP in tiles of 24 rows (the
/// batch's 64 in three), against keeping every layer with the same tiles (tiles change the
/// GEMMs' row counts, so their rounding); then as if host memory were short (at most one and
/// no residual through the host: the layers above the ring keep theirs on the GPU); as if the
/// attention checkpoints did not fit the host (the attention outputs of the lowest two layers
/// through it, the others recomputed; then every layer's with one residual through the host);
/// with sparse residuals (layers 1 and 3 store none; the backward re-runs layers 0 and 2);
/// then with the attention outputs of two layers, and of every layer below the top, kept on
/// the GPU.
fn check_offload_deep(gpu: &Gpu, arch: &str, rows: &mut Vec<Row>) -> Result<(), String> {
    let mut config = ModelConfig::from_file(&fixture_dir(arch).join("config.json"))
        .map_err(|e| e.to_string())?;
    config.num_hidden_layers = OFFLOAD_LAYERS;
    let seqs: Vec<Vec<u32>> = [40u64, 24]
        .iter()
        .map(|&len| (0..len).map(|i| ((i * 37 + len) % 128) as u32).collect())
        .collect();
    let batch = Batch::packed(&seqs);
    let mut targets: Vec<i32> = Vec::with_capacity(batch.len());
    for s in &seqs {
        targets.extend(s.iter().skip(1).map(|&t| t as i32));
        targets.push(-100);
    }
    let (batch_b, targets_b) = same_shape_batch(&batch, &targets, 128);
    let graph_steps = [(&batch, &targets[..]), (&batch_b, &targets_b[..])];
    // rank 8: the MLP's LoRA terms go through its activation (`mlp_activation`)
    let mut g = GpuLlama::random(gpu, &config, batch.len(), 8, 11)?;
    g.set_lora(&init_adapter(&g.dims, 8, 16.0, &Proj::ALL, 5, 0.05))?;
    // keeping every layer, with the MLP in one tile or in tiles of `rows`
    let mut keep_all = |rows| -> Result<(f32, LoraAdapter), String> {
        g.set_kept_layers(OFFLOAD_LAYERS);
        g.set_offload(Offload::Off);
        g.set_mlp_tile_rows(rows);
        g.zero_grads()?;
        let loss = g.loss_and_grads(&batch, &targets)?;
        Ok((loss, g.download_grads()?))
    };
    let one_tile = keep_all(super::plan::MLP_TILE_ROWS)?;
    let tiles = keep_all(24)?;
    graph_row(
        &mut g,
        graph_steps,
        &format!("{arch} x{OFFLOAD_LAYERS}, every layer kept, MLP tiles of 24"),
        rows,
    )?;
    const ALL: usize = usize::MAX;
    let runs = [
        (false, 0, 0, None, ALL, ALL),
        (false, 0, 0, None, ALL, ALL),
        (true, 0, 0, None, ALL, ALL),
        (true, 0, 0, None, ALL, ALL),
        (true, 3, 0, None, ALL, ALL),
        (true, 3, 0, None, ALL, ALL),
        (false, OFFLOAD_LAYERS, 0, None, ALL, ALL),
        (false, 0, 3, None, ALL, ALL),
        (false, 0, 3, None, ALL, ALL),
        (false, 2, OFFLOAD_LAYERS, None, ALL, ALL),
        (true, 3, 0, Some(24), ALL, ALL),
        (false, OFFLOAD_LAYERS, 0, Some(24), ALL, ALL),
        (false, 0, 3, Some(24), ALL, ALL),
        // host memory short: the lowest residual travels, the ring's three stay in their
        // slots, the two above in buffers of their own (no attention checkpoint travels)
        (true, 0, 0, None, 1, 0),
        (true, 0, 0, None, 1, 0),
        // none travels: the ring's three, two above
        (false, 0, 0, Some(24), 0, 0),
        // the attention checkpoints do not fit, the outputs of the lowest two layers travel
        // (the three above recompute theirs into the outputs' slot), twice; then every
        // layer's outputs with one residual through the host
        (false, 0, 0, None, ALL, 2),
        (false, 0, 0, None, ALL, 2),
        (true, 0, 0, Some(24), 1, ALL),
    ];
    for (qkv, gate_up, resident_qkv, tile, resid_travel, outputs_travel) in runs {
        let (name, want) = match tile {
            Some(t) => (
                format!("{arch} x{OFFLOAD_LAYERS}, MLP tiles of {t}"),
                &tiles,
            ),
            None => (format!("{arch} x{OFFLOAD_LAYERS}"), &one_tile),
        };
        g.set_mlp_tile_rows(tile.unwrap_or(super::plan::MLP_TILE_ROWS));
        let gate_up = GateUp::Layers(gate_up);
        recompute_row(
            &mut g,
            &batch,
            &targets,
            0,
            Offload::Checkpoints {
                qkv,
                gate_up,
                resident_qkv,
                resid_travel,
                outputs_travel,
                sparse_skips: 0,
                sparse_outputs_travel: 0,
                sparse_min_gain: usize::MAX,
                resident_spares_skip: true,
            },
            (want.0, &want.1),
            &name,
            rows,
        )?;
        let full = resid_travel == ALL && outputs_travel == ALL;
        let want = if full {
            0
        } else {
            outputs_travel.min(OFFLOAD_LAYERS - 1)
        };
        let travelled = g.outputs_offloaded().len();
        if travelled != want {
            return Err(format!(
                "{name}: the attention outputs of {travelled} layers travelled, not {want}"
            ));
        }
    }
    // Sparse residuals: the attention checkpoints do not fit, and storing fewer input residuals
    // lets more outputs travel, so layers 1 and 3 (or, skipping one, layer 1) store none and
    // the backward re-runs layers 0 and 2: (resid_travel, outputs_travel, sparse_skips,
    // sparse_outputs_travel, MLP tile, resident outputs), the travelling outputs expected, and
    // whether a resident output spares a skip.
    // With one output travelling the re-run of layer 2 recomputes its attention; with no
    // residual through the host the ring holds three stored ones and the top layer keeps its
    // own; with two resident outputs (layers 3 and 4) the three below travel; with one
    // resident output (layer 4) whose host row holds a residual, layer 3 stores its residual
    // again and the four below travel.
    let sparse_runs = [
        (ALL, 0, 2, 1, None, 0, 1, false),
        (ALL, 0, 2, 1, None, 0, 1, false),
        (ALL, 1, 2, ALL, Some(24), 0, 5, false),
        (0, 0, 2, ALL, None, 0, 5, false),
        (ALL, 0, 2, ALL, None, 2, 3, false),
        (ALL, 0, 1, 1, None, 0, 1, false),
        (ALL, 1, 1, ALL, Some(24), 0, 5, false),
        (ALL, 2, 2, ALL, None, 1, 4, true),
    ];
    for (resid_travel, outputs_travel, skips, sparse, tile, resident, want_travel, spares) in
        sparse_runs
    {
        let (name, want) = match tile {
            Some(t) => (
                format!("{arch} x{OFFLOAD_LAYERS}, MLP tiles of {t}, sparse residuals"),
                &tiles,
            ),
            None => (
                format!("{arch} x{OFFLOAD_LAYERS}, sparse residuals"),
                &one_tile,
            ),
        };
        g.set_mlp_tile_rows(tile.unwrap_or(super::plan::MLP_TILE_ROWS));
        g.set_resident_attention(resident);
        let offload = Offload::Checkpoints {
            qkv: false,
            gate_up: GateUp::Layers(0),
            resident_qkv: 0,
            resid_travel,
            outputs_travel,
            sparse_skips: skips,
            sparse_outputs_travel: sparse,
            sparse_min_gain: 1,
            resident_spares_skip: spares,
        };
        let want = (want.0, &want.1);
        recompute_row(&mut g, &batch, &targets, 0, offload, want, &name, rows)?;
        let (skipped, travelled) = (g.skipped_residuals(), g.outputs_offloaded().len());
        let want_skipped = &[1, 3][..skips - usize::from(spares) * resident];
        if skipped != want_skipped || travelled != want_travel {
            return Err(format!(
                "{name}: layers {skipped:?} stored no residual (want {want_skipped:?}), {travelled} layers' attention outputs travelled (want {want_travel})"
            ));
        }
    }
    g.set_resident_attention(0);
    // Attention outputs kept on the GPU: of two layers with the residuals through the host
    // (then no attention checkpoint travels, the outputs of the three below do), of every layer
    // below the top without offload.
    g.set_mlp_tile_rows(super::plan::MLP_TILE_ROWS);
    let lean = Offload::unbounded(true, GateUp::Layers(0), 0);
    let runs = [
        (lean, 2, 3),
        (lean, 2, 3),
        (Offload::Off, OFFLOAD_LAYERS, 0),
    ];
    for (offload, k, travelling) in runs {
        g.set_resident_attention(k);
        let name = format!("{arch} x{OFFLOAD_LAYERS}, attention outputs of {k} layers kept");
        let want = (one_tile.0, &one_tile.1);
        recompute_row(&mut g, &batch, &targets, 0, offload, want, &name, rows)?;
        let kept = g.resident_attention_layers().len();
        let travelled = g.outputs_offloaded().len();
        if (kept, travelled) != (k.min(OFFLOAD_LAYERS - 1), travelling) {
            return Err(format!(
                "{name}: {kept} layers kept their attention outputs, {travelled} sent them through the host"
            ));
        }
    }
    g.set_resident_attention(0);
    // CUDA graphs of steps whose checkpoints travel on the copy streams: every layer
    // recomputed, the input residuals and the checkpoints with q/k/v through the host; then
    // sparse residuals (layers 1 and 3 store none) with one layer's attention outputs through
    // the host, in MLP tiles of 24. (Steps whose gate/up outputs travel run eagerly:
    // `GpuLlama::graph_pays`.)
    g.set_kept_layers(0);
    g.set_offload(Offload::unbounded(true, GateUp::Layers(0), 0));
    let name = format!("{arch} x{OFFLOAD_LAYERS}, checkpoints with q/k/v offloaded");
    graph_row(&mut g, graph_steps, &name, rows)?;
    g.set_mlp_tile_rows(24);
    g.set_offload(Offload::Checkpoints {
        qkv: false,
        gate_up: GateUp::Layers(0),
        resident_qkv: 0,
        resid_travel: ALL,
        outputs_travel: 1,
        sparse_skips: 2,
        sparse_outputs_travel: ALL,
        sparse_min_gain: 1,
        resident_spares_skip: false,
    });
    let name = format!("{arch} x{OFFLOAD_LAYERS}, MLP tiles of 24, sparse residuals offloaded");
    graph_row(&mut g, graph_steps, &name, rows)?;
    g.set_mlp_tile_rows(super::plan::MLP_TILE_ROWS);
    Ok(())
}

fn check_fixture(gpu: &Gpu, arch: &str, rows: &mut Vec<Row>) -> Result<(), String> {
    let Fixture {
        cpu,
        batch,
        targets,
        ad,
        ad_bf,
        golden,
    } = load_fixture(arch)?;
    let get = |k: &str| golden.to_f32(k).map_err(|e| format!("golden {k}: {e}"));
    let want_loss = *get("train.loss")?
        .first()
        .ok_or("golden train.loss is empty")? as f64;

    let (cpu_loss, cpu_grads) = cpu
        .loss_and_lora_grads(&batch, &targets, &ad_bf)
        .map_err(|e| e.to_string())?;
    let mut g = GpuLlama::from_model(gpu, &cpu, batch.len(), ad.r)?;
    g.set_lora(&ad)?;
    g.zero_grads()?;
    let gpu_loss = g.loss_and_grads(&batch, &targets)?;
    let grads = g.download_grads()?;
    let fwd_only = g.loss(&batch, &targets)?;
    // Gradient checkpointing: recomputing every layer, then all but the last, then every layer
    // with its input residual offloaded, must give the gradients of keeping everything (the
    // same kernels on the same inputs).
    let offloads = [
        (0, Offload::Off),
        (cpu.dims.layers - 1, Offload::Off),
        (0, Offload::unbounded(false, GateUp::Layers(0), 0)),
        (0, Offload::unbounded(false, GateUp::Layers(0), 1)),
        (0, Offload::unbounded(true, GateUp::Layers(0), 0)),
        (0, Offload::unbounded(true, GateUp::Layers(2), 0)),
    ];
    for (kept, offload) in offloads {
        recompute_row(
            &mut g,
            &batch,
            &targets,
            kept,
            offload,
            (gpu_loss, &grads),
            arch,
            rows,
        )?;
    }
    g.set_kept_layers(cpu.dims.layers);
    g.set_offload(Offload::Off);
    // The MLP in row tiles of 5 (the batch in several tiles and a remainder): every layer
    // recomputed (its MLP recomputed tile by tile in the backward) and every layer kept, against
    // one tile. Different GEMM row counts may round differently: bf16 tolerance.
    let layers = cpu.dims.layers;
    for kept in [0, layers] {
        g.set_mlp_tile_rows(5);
        g.set_kept_layers(kept);
        let (loss, e) = loss_grads_err(&mut g, &batch, &targets, (gpu_loss, &grads))?;
        row(
            rows,
            format!(
                "model {arch}: MLP in tiles of 5 rows, {} of {layers} layers recomputed, vs one tile",
                layers - kept
            ),
            e,
            1e-2,
            format!("loss {loss:.6}, {} tokens", batch.len()),
        );
    }
    g.set_mlp_tile_rows(super::plan::MLP_TILE_ROWS);
    g.set_kept_layers(layers);
    // An untied embedding table moved to host memory: the same loss and gradients (the gather
    // reads the same values over PCIe); the generation rows below then run with it there.
    if !cpu.config.tie_word_embeddings {
        let before = g.held_bytes();
        g.set_embeddings_in_host_memory()?;
        let freed = before.saturating_sub(g.held_bytes());
        let (loss, e) = loss_grads_err(&mut g, &batch, &targets, (gpu_loss, &grads))?;
        row(
            rows,
            format!("model {arch}: embeddings in host memory == on the GPU"),
            e,
            1e-3,
            format!("loss {loss:.6}, {freed} bytes freed on the GPU"),
        );
    }

    let le = ((gpu_loss as f64) - cpu_loss as f64).abs() / (cpu_loss as f64).abs().max(1e-30);
    row(
        rows,
        format!("model {arch}: loss GPU vs CPU bf16"),
        le,
        TOL_LOSS,
        format!("gpu {gpu_loss:.5} cpu {cpu_loss:.5}"),
    );
    let lp = ((gpu_loss as f64) - want_loss).abs() / want_loss.abs().max(1e-30);
    row(
        rows,
        format!("model {arch}: loss GPU vs PEFT f32"),
        lp,
        TOL_LOSS,
        format!("gpu {gpu_loss:.5} peft {want_loss:.5}"),
    );
    let lf = ((fwd_only - gpu_loss) as f64).abs() / (gpu_loss as f64).abs().max(1e-30);
    row(
        rows,
        format!("model {arch}: loss() == loss_and_grads()"),
        lf,
        1e-6,
        format!("{fwd_only:.6}"),
    );

    let (mut worst_cpu, mut worst_peft, mut worst_ref) = (0f64, 0f64, 0f64);
    let (mut where_cpu, mut where_peft) = (String::new(), String::new());
    let mut checked = 0;
    for (l, p, which_b) in factors(cpu.dims.layers) {
        let (got, cref) = factor_pair(&grads, &cpu_grads, (l, p, which_b))?;
        let key = format!("grad.{}", LoraAdapter::peft_name(l, p, which_b));
        let peft = get(&key)?;
        let name = format!(
            "{l}.{}",
            key.trim_start_matches("grad.base_model.model.model.")
        );
        let e1 = rel_err(&got, &cref);
        let e2 = rel_err(&got, &peft);
        let e3 = rel_err(&cref, &peft);
        if e1 > worst_cpu || where_cpu.is_empty() {
            worst_cpu = e1.max(worst_cpu);
            where_cpu = name.clone();
        }
        if e2 > worst_peft || where_peft.is_empty() {
            worst_peft = e2.max(worst_peft);
            where_peft = name;
        }
        worst_ref = worst_ref.max(e3);
        checked += 1;
    }
    row(
        rows,
        format!("model {arch}: {checked} LoRA grads GPU vs CPU bf16"),
        worst_cpu,
        TOL_CPU,
        format!("worst {where_cpu}"),
    );
    row(
        rows,
        format!("model {arch}: {checked} LoRA grads GPU vs PEFT f32"),
        worst_peft,
        TOL_PEFT.max(2.0 * worst_ref),
        format!("worst {where_peft}; CPU bf16 vs PEFT {worst_ref:.2e}"),
    );
    let partial = [Proj::K, Proj::V, Proj::Up];
    for (r, only) in [(ad.r, &partial[..]), (8, &partial[..]), (8, &Proj::ALL[..])] {
        check_targets(gpu, &cpu, &batch, &targets, (r, only), arch, rows)?;
    }
    check_generation(
        &mut g,
        &cpu,
        Some(&ad_bf),
        &batch,
        &format!("model {arch}"),
        rows,
    )?;
    if arch == "llama" {
        let mut trained = GpuLlama::from_model(gpu, &cpu, batch.len(), 16)?;
        train_steps(
            &mut trained,
            &cpu.dims,
            &batch,
            &targets,
            "model llama",
            rows,
        )?;
    }
    Ok(())
}

/// LoRA of rank `r` on the projections `only` (k, v and up: stacks of two and one member, the
/// q/k/v stack not starting at its group's first projection, see `lora_gemm`). GPU loss and
/// per-tensor gradients against the CPU bf16 model on a fresh random adapter (A and B
/// nonzero), keeping every layer and recomputing every layer, with the LoRA terms of gate, up
/// and down in the MLP's activation (`mlp_activation`; where r is a multiple of 8) and by the
/// rank-r GEMMs; with all seven adapted, greedy generation through the activation's kernels
/// too.
#[allow(clippy::too_many_arguments)]
fn check_targets(
    gpu: &Gpu,
    cpu: &LlamaModel,
    batch: &Batch,
    targets: &[i32],
    (r, only): (usize, &[Proj]),
    arch: &str,
    rows: &mut Vec<Row>,
) -> Result<(), String> {
    let seed = ftrt_runtime::rng::fresh_seed();
    let mut ad = init_adapter(&cpu.dims, r, 2.0 * r as f32, only, seed, 0.05);
    ad.data
        .iter_mut()
        .for_each(|v| *v = half::bf16::from_f32(*v).to_f32());
    let (cpu_loss, cpu_grads) = cpu
        .loss_and_lora_grads(batch, targets, &ad)
        .map_err(|e| e.to_string())?;
    let layers = cpu.dims.layers;
    let mut g = GpuLlama::from_model(gpu, cpu, batch.len(), r)?;
    g.set_lora(&ad)?;
    let named: Vec<&str> = only.iter().map(|p| p.module()).collect();
    for (kept, in_activation) in [(layers, true), (0, true), (layers, false), (0, false)] {
        g.set_kept_layers(kept);
        g.set_lora_in_activation(in_activation);
        if in_activation && !g.lora_in_activation(0) {
            continue; // a rank the kernels do not take: the GEMM rows cover it
        }
        g.zero_grads()?;
        let loss = g.loss_and_grads(batch, targets)?;
        let grads = g.download_grads()?;
        let mut worst = ((loss - cpu_loss) as f64).abs() / (cpu_loss as f64).abs().max(1e-30);
        let mut checked = 0;
        for (l, p, which_b) in factors(layers) {
            let adapted = only.contains(&p);
            match (
                factor(&grads, l, p, which_b),
                factor(&cpu_grads, l, p, which_b),
            ) {
                (Some(got), Some(want)) if adapted => {
                    worst = worst.max(rel_err(&got, &want));
                    checked += 1;
                }
                (None, None) if !adapted => {}
                _ => return Err(format!("layer {l} {}: wrong adapter layout", p.module())),
            }
        }
        let mlp_terms = if in_activation {
            "in the activation"
        } else {
            "by GEMMs"
        };
        row(
            rows,
            format!(
                "model {arch}: LoRA r {r} on {}, {} of {layers} recomputed, MLP terms {mlp_terms}: loss + {checked} grads GPU vs CPU bf16",
                named.join("/"),
                layers - kept
            ),
            worst,
            TOL_CPU,
            format!("loss gpu {loss:.5} cpu {cpu_loss:.5}; seed {seed}"),
        );
    }
    // Decoding with the adapter unmerged: with every projection adapted, the MLP's terms go
    // through the activation's kernels in the prefill and every decode step.
    g.set_lora_in_activation(true);
    if only.len() == Proj::ALL.len() && g.lora_in_activation(0) {
        let name = format!("model {arch}: LoRA r {r} on all, MLP terms in the activation");
        check_generation(&mut g, cpu, Some(&ad), batch, &name, rows)?;
    }
    Ok(())
}

/// Greedy generation on the GPU (KV cache, prefill + decode steps, next token picked on the
/// GPU) from the first tokens of each sequence of `batch`, checked against the CPU model's
/// logits over prompt + generated tokens (teacher forcing): every GPU token must be the CPU's
/// top-1 or within bf16 noise of it (its logit's gap to the CPU maximum, over the row's range).
fn check_generation(
    g: &mut GpuLlama,
    cpu: &LlamaModel,
    lora: Option<&crate::llama::LoraAdapter>,
    batch: &Batch,
    name: &str,
    rows: &mut Vec<Row>,
) -> Result<(), String> {
    use crate::llama::sampling::{generate_with, SamplingParams};
    let new = 6;
    let prompts: Vec<Vec<u32>> = batch.cu_seqlens[..batch.num_seqs()]
        .iter()
        .zip(&batch.cu_seqlens[1..])
        .map(|(&a, &b)| {
            let len = ((b - a) as usize)
                .min(g.max_tokens().saturating_sub(new))
                .max(1);
            batch.tokens[a as usize..a as usize + len].to_vec()
        })
        .collect();
    let capacity = prompts.iter().map(Vec::len).max().unwrap_or(1) + new;
    let cache = g.new_kv_cache(prompts.len(), capacity)?;
    let mut steps = super::GpuSteps { model: g, cache };
    let out = generate_with(&mut steps, &prompts, new, &[], SamplingParams::default())?;
    let (mut worst, mut top1, mut total) = (0f64, 0, 0);
    for (p, gen) in prompts.iter().zip(&out) {
        let seq: Vec<u32> = p.iter().chain(gen).copied().collect();
        let logits = cpu
            .forward(&Batch::packed(&[seq]), lora)
            .map_err(|e| e.to_string())?;
        let v = cpu.dims.vocab;
        for (i, &t) in gen.iter().enumerate() {
            let row = &logits[(p.len() - 1 + i) * v..][..v];
            let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let min = row.iter().cloned().fold(f32::INFINITY, f32::min);
            let gap = (max - row[t as usize]) as f64 / ((max - min) as f64).max(1e-30);
            worst = worst.max(gap);
            top1 += usize::from(row[t as usize] == max);
            total += 1;
        }
    }
    row(
        rows,
        format!("{name}: GPU greedy decode (KV cache) vs CPU logits"),
        worst,
        2e-2,
        format!("{top1}/{total} tokens are the CPU's top-1; worst gap to it shown"),
    );
    Ok(())
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or("")
}

fn check_smollm2(gpu: &Gpu, path: &std::path::Path, rows: &mut Vec<Row>) -> Result<(), String> {
    use crate::data::{load_dataset, pack, DataOptions, PromptRenderer};
    let loaded = crate::open_model(path).map_err(|e| e.to_string())?;
    let renderer = PromptRenderer::of_model(&loaded)?;
    let data = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../data/train.jsonl");
    let ds =
        load_dataset(&data, None, &renderer, &DataOptions::default()).map_err(|e| e.to_string())?;
    let budget = 1024;
    let batches = pack(ds.examples(), budget);
    let pb = batches
        .first()
        .ok_or("the bundled dataset packed into no batch")?;
    let (batch, targets) = crate::llama::trainable::batch_of(pb);
    let cpu = LlamaModel::from_loaded(&loaded, Rounding::BF16).map_err(|e| e.to_string())?;
    let cpu_loss = cpu
        .loss(&batch, &targets, None)
        .map_err(|e| e.to_string())?;
    let mut g = GpuLlama::from_model(gpu, &cpu, budget, 16)?;
    let gpu_loss = g.loss(&batch, &targets)?;
    let e = ((gpu_loss - cpu_loss) as f64).abs() / (cpu_loss as f64).abs().max(1e-30);
    row(
        rows,
        format!(
            "model smollm2-135m: loss of a packed batch ({} tokens, {} seqs) GPU vs CPU bf16",
            batch.len(),
            batch.num_seqs()
        ),
        e,
        TOL_LOSS,
        format!("gpu {gpu_loss:.4} cpu {cpu_loss:.4}"),
    );

    train_steps(
        &mut g,
        &cpu.dims,
        &batch,
        &targets,
        "model smollm2-135m",
        rows,
    )
}

/// 20 AdamW steps on the GPU on one batch from a fresh PEFT-initialised adapter (r 16 on all
/// seven projections): the loss must fall by 10% and the gradients stay finite.
fn train_steps(
    g: &mut GpuLlama,
    dims: &crate::llama::Dims,
    batch: &Batch,
    targets: &[i32],
    label: &str,
    rows: &mut Vec<Row>,
) -> Result<(), String> {
    let ad = init_adapter(dims, 16, 32.0, &Proj::ALL, 7, 0.0);
    g.set_lora(&ad)?;
    let mut losses = Vec::new();
    let t1 = std::time::Instant::now();
    for _ in 0..20 {
        g.zero_grads()?;
        losses.push(g.loss_and_grads(batch, targets)?);
        g.adamw_step(1e-3, 0.0, 0.9, 0.999, 1e-8)?;
    }
    let after = g.loss(batch, targets)?;
    let ms = t1.elapsed().as_secs_f64() * 1e3 / 20.0;
    let first = losses[0];
    let fell = after.is_finite() && after < 0.9 * first;
    let curve: Vec<String> = losses
        .iter()
        .step_by(4)
        .map(|l| format!("{l:.3}"))
        .collect();
    rows.push((
        format!("{label}: 20 GPU AdamW steps (lr 1e-3, r 16, all 7)"),
        (after / first) as f64,
        format!(
            "loss {first:.4} -> {after:.4} [{}] {ms:.1} ms/step{}",
            curve.join(" "),
            if fell {
                ""
            } else {
                "  FAILED (loss did not fall by 10%)"
            }
        ),
    ));
    let gr = g.download_grads()?;
    let norm: f64 = gr
        .data
        .iter()
        .map(|v| (*v as f64) * (*v as f64))
        .sum::<f64>()
        .sqrt();
    let ok = norm.is_finite() && norm > 0.0;
    rows.push((
        format!("{label}: LoRA gradient norm after training"),
        norm,
        format!("{norm:.3e}{}", if ok { "" } else { "  FAILED" }),
    ));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ftrt_ops::dsl::Rounding as OpRounding;
    use ftrt_ops::{nf4, quant_prelude};

    /// The 4-bit mode's pipeline as the GPU runs it (the ops' CPU twins, which the kernel
    /// selftest holds the launchers to bit for bit): quantize, host mean of the absmax, double
    /// quantization, dequantization to bf16, equals the reference the 4-bit selftest row uses.
    #[test]
    fn gpu_nf4_pipeline_matches_the_round_trip_reference() {
        let f = load_fixture("llama").unwrap();
        let mut want = f.cpu.clone();
        nf4_round_trip(&mut want, &KeepBf16::default());
        let code2 = quant_prelude::dynamic_map_signed();
        let code = quant_prelude::nf4_code();
        let mut changed = 0;
        for l in 0..f.cpu.dims.layers {
            for p in Proj::ALL {
                let r = f.cpu.weights.layers[l].proj[p.index()].clone();
                let x: Vec<f32> = f.cpu.weights.data[r.clone()]
                    .iter()
                    .map(|&v| half::bf16::from_f32(v).to_f32())
                    .collect();
                let n = x.len();
                assert_eq!(n % 64, 0);
                let (na, nb) = (n / 64, (n / 64).div_ceil(256));
                let (mut packed, mut absmax) = (vec![0u8; n / 2], vec![0f32; na]);
                nf4::nf4_quantize::forward_cpu::<f32>(
                    &nf4::nf4_quantize::Dims { N: n },
                    &x,
                    &mut packed,
                    &mut absmax,
                    OpRounding::BF16,
                );
                let offset = quant_prelude::absmax_mean(&absmax);
                let (mut q, mut am2) = (vec![0u8; na], vec![0f32; nb]);
                nf4::absmax_quantize::forward_cpu::<f32>(
                    &nf4::absmax_quantize::Dims { NA: na },
                    offset,
                    &absmax,
                    &code2,
                    &mut q,
                    &mut am2,
                    OpRounding::BF16,
                );
                let mut w = vec![0f32; n];
                nf4::nf4_dequantize::forward_cpu::<f32>(
                    &nf4::nf4_dequantize::Dims { N: n },
                    offset,
                    &packed,
                    &q,
                    &am2,
                    &code2,
                    &code,
                    &mut w,
                    OpRounding::BF16,
                );
                let reference = &want.weights.data[r];
                for (a, b) in w.iter().zip(reference) {
                    assert_eq!(a.to_bits(), b.to_bits(), "layer {l} {}", p.module());
                }
                changed += w.iter().zip(&x).filter(|(a, b)| a != b).count();
            }
        }
        assert!(changed > 0, "the round trip changed nothing");
    }
}
