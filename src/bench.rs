//! `ftrt bench`: LoRA training throughput of the GPU Llama model on random-initialised weights
//! with the shapes of `hf_baseline.py`'s presets (LoRA r=16 on all seven projections), timed
//! with CUDA events after warm-up; prints tokens/s, ms/step, GPU memory (planned and measured
//! from the driver: free memory before building the model minus free memory after the steps;
//! nothing is allocated inside the loop), MFU and HFU with hf_baseline.py's FLOP formula, and
//! one JSON line starting with `{"bench": "ftrt"`. `--mode qlora` stores the projection weights
//! as NF4 with double-quantized absmax (bitsandbytes' layout) and dequantizes each into a bf16
//! scratch before its GEMMs; the dequantization is not counted in MFU/HFU.
//!
//! `--keep-layers` chooses per-layer gradient checkpointing: `all` keeps every activation (the
//! throughput mode, HFU = MFU), `0` recomputes every layer in the backward (the lean mode),
//! `auto` keeps as many layers as fit a memory budget. HFU counts each recomputed layer as one
//! layer forward, as hf_baseline.py counts its gradient-checkpointing recompute.
//! `--offload-residuals` moves the recomputed layers' checkpoints (input residual; attention
//! output, its log-sum-exp and the post-attention residual) to pinned host memory between
//! forward and backward (rings of device buffers instead of one per layer): the backward then
//! recomputes only q, k, v and the MLP. Where the host cannot hold those checkpoints (long
//! sequences) only the attention outputs travel, of as many layers as it holds next to the
//! residuals, and when some layers would still recompute their attention as few layers as the
//! host needs (at most every other one) store no input residual, rebuilt by re-running the
//! layer below (the 8B at one 262k sequence on the H200 host: 4 such layers, 26 residuals and
//! 31 outputs through the host, 1,967 tok/s on one card in session 28). With `auto` and a
//! budget, the memory left keeps attention outputs on the GPU instead, each one letting a
//! skipped layer store its residual again in the host row it leaves (the 8B at 262k within 36
//! GiB: 4 kept, 27 through the host, every residual stored: 2,008 tok/s in 35.4 GiB side by
//! side with Unsloth's 1,507 in session 29, 1,941-1,976 on slower cards in session 28).
//! `FTRT_RESIDENT_ATTENTION_LAYERS=k` sets k. HFU counts
//! no attention forward for the layers whose outputs travel or stay, and one layer forward for
//! each re-run (without attention where the re-run layer's outputs are kept).
use clap::Args;
use ftrt_models::llama::gpu::{
    attention_forward_flops, flop_estimate, init_adapter, GpuLlama, GpuSteps, KeepBf16,
    RESIDENT_ATTENTION_LAYERS_ENV, RESIDENT_QKV_LAYERS_ENV,
};
use ftrt_models::llama::{generate_with, Batch, Proj, SamplingParams};
use ftrt_models::ModelConfig;
use ftrt_ops::attention::{AttentionDims, AttentionKernels};
use ftrt_runtime::cudarc::driver::sys::CUevent_flags;
use ftrt_runtime::Gpu;
use std::path::Path;

#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// Model shape: llama-3.2-1b | llama-3.1-8b | qwen2.5-7b (as hf_baseline.py).
    #[arg(long, default_value = "llama-3.2-1b")]
    pub preset: String,
    /// lora (bf16 base weights) | qlora (NF4 projection weights, dequantized before each GEMM).
    #[arg(long, default_value = "lora")]
    pub mode: String,
    /// Sequences per step.
    #[arg(long, default_value_t = 2)]
    pub batch: usize,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 2048)]
    pub seq: usize,
    /// Timed optimizer steps.
    #[arg(long, default_value_t = 10)]
    pub steps: usize,
    /// Untimed steps first (0: the first step is timed too, for sequences whose step takes minutes;
    /// the activations, and with offload the pinned host memory, are allocated before it either way).
    /// The second step of a shape is captured as a CUDA graph the later ones replay.
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
    /// LoRA rank and alpha.
    #[arg(long, default_value_t = 16)]
    pub lora_r: usize,
    #[arg(long, default_value_t = 16.0)]
    pub lora_alpha: f32,
    /// Learning rate of the GPU AdamW.
    #[arg(long, default_value_t = 1e-4)]
    pub lr: f32,
    /// Denominator of MFU/HFU in TFLOP/s (hf_baseline.py's default).
    #[arg(long, default_value_t = 989.4)]
    pub peak_tflops: f64,
    /// Layers whose activations are kept; the others keep only their input residual and are
    /// recomputed in the backward (gradient checkpointing). `all`: no recompute (the
    /// throughput mode); `0`: recompute every layer (the lean mode); `auto`: as many as fit
    /// --vram-budget-gib, and with --offload-residuals what whole layers leave of it keeps the
    /// q, k, v of recomputed layers whose checkpoints travel without them (as the 1B's do) on
    /// the GPU, so their backward recomputes no projection of the attention half
    /// (`FTRT_RESIDENT_QKV_LAYERS=k` sets how many); on long sequences it keeps the attention
    /// outputs that spare the most recompute on the GPU (`FTRT_RESIDENT_ATTENTION_LAYERS=k`
    /// sets how many).
    #[arg(long, default_value = "all")]
    pub keep_layers: String,
    /// GPU memory the model may hold, in GiB, for `--keep-layers auto` (default: the free
    /// memory less 1 GiB).
    #[arg(long)]
    pub vram_budget_gib: Option<f64>,
    /// Offload the recomputed layers' checkpoints (input residual; attention output, log-sum-exp,
    /// post-attention residual and the LoRA x A^T; q, k, v too where the layer's forward covers
    /// their copies, as for the 8B) to pinned host memory (copied out in the forward, prefetched
    /// in the backward, overlapped with compute): the backward then recomputes the norms and the
    /// MLP's gate and up (and q, k, v where they stayed), not the attention. With one MLP tile a
    /// layer's gate/up outputs also stay on the GPU (with NF4 weights, a few more travel to the
    /// host; `FTRT_GATE_UP_LAYERS=k` sets how many); counted by `auto`.
    #[arg(long, default_value_t = false)]
    pub offload_residuals: bool,
    /// Keep the (untied) input embedding table in pinned host memory; the gather reads the
    /// batch's rows over PCIe (1 GiB less GPU memory for Llama-3.1-8B).
    #[arg(long, default_value_t = false)]
    pub offload_embeddings: bool,
    /// With --mode qlora: projections kept in bf16 (dynamic 4-bit), comma-separated substrings
    /// of their module paths, e.g. `layers.0.mlp.down_proj` [default: none].
    #[arg(long, default_value = "")]
    pub llm_int8_skip_modules: String,
    /// Measure generation instead of training (grpo_baseline.py's `gen`): --batch prompts of
    /// --seq random tokens, --new-tokens sampled at --temperature with EOS suppressed.
    #[arg(long)]
    pub decode: bool,
    /// Longest sequence search (hf_baseline.py's): batch 1 at --search-start tokens, doubled up
    /// to --search-max, --search-steps timed steps each, until a point does not fit
    #[arg(long, conflicts_with = "decode")]
    pub max_seq_search: bool,
    /// First sequence length of --max-seq-search
    #[arg(long, default_value_t = 16384)]
    pub search_start: usize,
    /// Longest sequence --max-seq-search tries
    #[arg(long, default_value_t = 262144)]
    pub search_max: usize,
    /// Timed steps per --max-seq-search point (after one warm-up step)
    #[arg(long, default_value_t = 1)]
    pub search_steps: usize,
    /// With --decode: generate through the model's forward graph on the runtime's CUDA executor
    /// (the graph the CPU executor also runs): prompts packed into prefill steps, then one
    /// decoding step per token, each phase one captured CUDA graph replayed
    #[arg(long, requires = "decode")]
    pub graph: bool,
    /// Tokens generated per prompt with --decode.
    #[arg(long, default_value_t = 512)]
    pub new_tokens: usize,
    /// Sampling temperature with --decode (0: greedy; the baseline samples at 1).
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f32,
    /// After the timed steps, profile one more step (with --decode: 8 decode steps after a
    /// prefill) and print its GPU time by node kind (kernel, GEMM class, copy), largest first.
    #[arg(long)]
    pub profile: bool,
    /// Instead of running, write the benchmark's starting point (weights, adapter, batch,
    /// optimizer settings) into this folder for `benches/hf_loss_parity.py`; needs no GPU.
    #[arg(long)]
    pub save_init: Option<std::path::PathBuf>,
    /// GPU ordinal.
    #[arg(long, default_value_t = 0)]
    pub device: usize,
}

/// Seeds of the random weights, the LoRA initialisation and the batch (`--save-init` writes
/// the same).
pub const MODEL_SEED: u64 = 1234;
pub const ADAPTER_SEED: u64 = 42;
pub const BATCH_SEED: u64 = 7;

/// Runs `work` inside a GPU profile and prints the per-kind table under `title`.
pub fn print_profile(
    gpu: &Gpu,
    title: &str,
    work: impl FnOnce() -> Result<(), String>,
) -> Result<Vec<ftrt_runtime::ProfileRow>, String> {
    gpu.synchronize().map_err(|e| e.to_string())?;
    gpu.profile_begin();
    let done = work();
    let rows = gpu.profile_end().map_err(|e| e.to_string())?;
    done?;
    println!("{title}\n{}", ftrt_runtime::format_table(&rows));
    Ok(rows)
}

/// The profile rows as JSON ([label, calls, ms] each).
pub fn profile_json(rows: &[ftrt_runtime::ProfileRow]) -> serde_json::Value {
    rows.iter()
        .map(|r| serde_json::json!([r.label, r.calls, (r.ms * 1e3).round() / 1e3]))
        .collect()
}

/// The preset's config.json (hf_baseline.py's PRESETS).
pub fn preset_json(name: &str) -> Result<String, String> {
    let (arch, model_type, c, i, l, h, kv, v, tie, theta, eps) = match name {
        "llama-3.2-1b" => (
            "LlamaForCausalLM",
            "llama",
            2048,
            8192,
            16,
            32,
            8,
            128256,
            true,
            500000.0,
            1e-5,
        ),
        "llama-3.1-8b" => (
            "LlamaForCausalLM",
            "llama",
            4096,
            14336,
            32,
            32,
            8,
            128256,
            false,
            500000.0,
            1e-5,
        ),
        "qwen2.5-7b" => (
            "Qwen2ForCausalLM",
            "qwen2",
            3584,
            18944,
            28,
            28,
            4,
            152064,
            false,
            1000000.0,
            1e-6,
        ),
        other => {
            return Err(format!(
                "unknown preset {other:?}: llama-3.2-1b, llama-3.1-8b or qwen2.5-7b"
            ))
        }
    };
    Ok(format!(
        r#"{{"architectures": ["{arch}"], "model_type": "{model_type}", "hidden_size": {c}, "intermediate_size": {i},
"num_hidden_layers": {l}, "num_attention_heads": {h}, "num_key_value_heads": {kv}, "vocab_size": {v},
"tie_word_embeddings": {tie}, "rope_theta": {theta:.1}, "rms_norm_eps": {eps:e}, "max_position_embeddings": 131072,
"hidden_act": "silu", "torch_dtype": "bfloat16"}}"#
    ))
}

/// B sequences of S uniform random tokens; targets = next token within each sequence
/// (labels = input_ids, shifted as transformers does), -100 at each sequence's end.
pub fn random_batch(batch: usize, seq: usize, vocab: usize, seed: u64) -> (Batch, Vec<i32>) {
    let mut rng = ftrt_runtime::rng::SplitMix64::new(seed);
    let seqs: Vec<Vec<u32>> = (0..batch)
        .map(|_| {
            (0..seq)
                .map(|_| (rng.next_u64() % vocab as u64) as u32)
                .collect()
        })
        .collect();
    let b = Batch::packed(&seqs);
    let mut t = Vec::with_capacity(b.len());
    for s in &seqs {
        t.extend(s.iter().skip(1).map(|&x| x as i32));
        t.push(-100);
    }
    (b, t)
}

pub const GIB: f64 = (1u64 << 30) as f64;

/// The decode benchmarks' `b` prompts of `p` random tokens (ids 4.., clear of special tokens).
pub fn random_prompts(b: usize, p: usize, vocab: usize) -> Vec<Vec<u32>> {
    let mut rng = ftrt_runtime::rng::SplitMix64::new(BATCH_SEED);
    let v = vocab as u64;
    (0..b)
        .map(|_| {
            (0..p)
                .map(|_| (4 + rng.next_u64() % (v - 4)) as u32)
                .collect()
        })
        .collect()
}

/// The config of a preset.
pub fn preset_config(name: &str) -> Result<ModelConfig, String> {
    ModelConfig::from_json_str(&preset_json(name)?, Path::new(name)).map_err(|e| e.to_string())
}

pub fn run(a: &BenchArgs) -> Result<(), String> {
    if let Some(dir) = &a.save_init {
        if a.decode {
            return Err(
                "--save-init writes a training benchmark's start; not with --decode".into(),
            );
        }
        return crate::bench_init::save_init(a, dir);
    }
    if a.decode && a.graph {
        return crate::bench_graph::run_decode_graph(a);
    }
    if a.decode {
        return run_decode(a);
    }
    if a.max_seq_search {
        return max_seq_search(a);
    }
    run_training(a)
}

/// `--max-seq-search`: batch 1 at seq = --search-start, doubled up to --search-max, each point
/// a fresh model planned for its length (hf_baseline.py's search), until one does not fit.
fn max_seq_search(a: &BenchArgs) -> Result<(), String> {
    let mut seq = a.search_start.max(2);
    while seq <= a.search_max {
        let point = BenchArgs {
            batch: 1,
            seq,
            steps: a.search_steps.max(1),
            warmup: 1,
            max_seq_search: false,
            ..a.clone()
        };
        if let Err(e) = run_training(&point) {
            let oom = ["OUT_OF_MEMORY", "out of memory", "needs more than"]
                .iter()
                .any(|s| e.contains(s));
            let json = serde_json::json!({
                "bench": "ftrt", "model": a.preset, "mode": a.mode, "batch": 1, "seq": seq,
                "status": if oom { "oom" } else { "error" }, "error": e,
            });
            println!("{json}");
            return if oom { Ok(()) } else { Err(e) };
        }
        seq *= 2;
    }
    Ok(())
}

/// One training configuration: its row and JSON line.
fn run_training(a: &BenchArgs) -> Result<(), String> {
    let four_bit = match a.mode.as_str() {
        "lora" => false,
        "qlora" => true,
        other => return Err(format!("--mode {other}: lora or qlora")),
    };
    if a.batch == 0 || a.seq < 2 || a.steps == 0 || a.lora_r == 0 {
        return Err("--batch >= 1, --seq >= 2, --steps >= 1 and --lora-r >= 1 are required".into());
    }
    let t_setup = std::time::Instant::now();
    let config = preset_config(&a.preset)?;
    let gpu = Gpu::open(a.device).map_err(|e| format!("{e}\nftrt bench needs an NVIDIA GPU."))?;
    let (free0, total) = gpu.context().mem_get_info().map_err(|e| e.to_string())?;
    let n = a.batch * a.seq;
    let mut model = if four_bit {
        GpuLlama::random_4bit(
            &gpu,
            &config,
            n,
            a.lora_r,
            MODEL_SEED,
            &KeepBf16::parse(&a.llm_int8_skip_modules),
        )?
    } else {
        GpuLlama::random(&gpu, &config, n, a.lora_r, MODEL_SEED)?
    };
    let ad = init_adapter(
        &model.dims,
        a.lora_r,
        a.lora_alpha,
        &Proj::ALL,
        ADAPTER_SEED,
        0.0,
    );
    if a.offload_embeddings {
        model.set_embeddings_in_host_memory()?;
    }
    model.set_lora(&ad)?;
    model.set_max_seq_len(a.seq);
    model.set_offload_residuals(a.offload_residuals);
    let layers = model.dims.layers;
    let mut auto_budget = None;
    let kept = match a.keep_layers.as_str() {
        "all" => layers,
        "auto" => {
            let budget = a
                .vram_budget_gib
                .map_or(free0.saturating_sub(1 << 30), |g| (g * GIB) as usize);
            auto_budget = Some(budget);
            model.kept_layers_for_budget(budget).ok_or_else(|| {
                format!(
                    "--keep-layers auto: even recomputing every layer needs more than {:.2} GiB",
                    budget as f64 / GIB
                )
            })?
        }
        k => k.parse().map_err(|_| {
            format!("--keep-layers {k:?}: a number of layers (0..={layers}), all or auto")
        })?,
    };
    model.set_kept_layers(kept);
    if let Some(budget) = auto_budget.filter(|_| std::env::var(RESIDENT_QKV_LAYERS_ENV).is_err()) {
        model.set_resident_qkv(model.resident_qkv_for_budget(budget));
    }
    if let Ok(k) = std::env::var(RESIDENT_ATTENTION_LAYERS_ENV) {
        let k = k.parse().map_err(|_| {
            format!("{RESIDENT_ATTENTION_LAYERS_ENV}={k:?}: a number of recomputed layers")
        })?;
        model.set_resident_attention(k);
    } else if let Some(budget) = auto_budget {
        model.set_resident_attention(model.resident_attention_for_budget(budget));
    }
    let recomputed = layers - model.kept_layers();
    let (batch, targets) = random_batch(a.batch, a.seq, model.dims.vocab, BATCH_SEED);
    let mut losses = Vec::with_capacity(a.warmup.max(1) + a.steps);
    let step = |m: &mut GpuLlama| -> Result<f32, String> {
        m.zero_grads()?;
        let loss = m.loss_and_grads(&batch, &targets)?;
        m.adamw_step(a.lr, 0.0, 0.9, 0.999, 1e-8)?;
        Ok(loss)
    };
    // The buffers (and with offload the pinned host rows: ~60 GiB at 262k tokens) before any
    // step, so that --warmup 0 times a step, not the allocation.
    let t_alloc = std::time::Instant::now();
    model.allocate_activations()?;
    let alloc_s = t_alloc.elapsed().as_secs_f64();
    let t_warm = std::time::Instant::now();
    // --warmup 0 times the first step too (a long sequence's step can take minutes)
    let mut loss = f32::NAN;
    if a.warmup > 0 {
        loss = step(&mut model)?;
        losses.push(loss);
    }
    let setup_s = t_setup.elapsed().as_secs_f64();
    for _ in 1..a.warmup {
        loss = step(&mut model)?;
        losses.push(loss);
    }
    let warmup_s = t_warm.elapsed().as_secs_f64();
    gpu.synchronize().map_err(|e| e.to_string())?;
    let ev = |g: &Gpu| {
        g.stream()
            .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(|e| e.to_string())
    };
    let start = ev(&gpu)?;
    let first_timed = loss;
    let graph_steps_before = model.graph_steps();
    for _ in 0..a.steps {
        loss = step(&mut model)?;
        losses.push(loss);
    }
    let end = ev(&gpu)?;
    let graph_steps = model.graph_steps() - graph_steps_before;
    let first_timed = if a.warmup == 0 {
        losses[0]
    } else {
        first_timed
    };
    let ms_total = start.elapsed_ms(&end).map_err(|e| e.to_string())? as f64;
    let (free1, _) = gpu.context().mem_get_info().map_err(|e| e.to_string())?;
    let ms = ms_total / a.steps as f64;
    let tok_s = n as f64 / (ms * 1e-3);
    let (n_mat, n_lora, model_fpt, _) = flop_estimate(&model.dims, a.seq, a.lora_r, false);
    let (_, _, _, ckpt_fpt) = flop_estimate(&model.dims, a.seq, a.lora_r, true);
    // Recomputed layers count one layer forward each, as hf_baseline.py counts its recompute.
    // Resident and travelling attention outputs spare their layers' attention forward in the
    // recompute. A layer that stores no input residual re-runs the layer below: one layer
    // forward, its attention included only where that layer's outputs are not kept.
    let resident_attention = model.resident_attention_layers();
    let outputs_offloaded = model.outputs_offloaded();
    let skipped = model.skipped_residuals();
    let attn_fwd_fpt = attention_forward_flops(&model.dims, a.seq);
    let spared = resident_attention.len() + outputs_offloaded.len();
    let kept_output = |l: &usize| resident_attention.contains(l) || outputs_offloaded.contains(l);
    let reruns_attending = skipped.iter().filter(|&&l| !kept_output(&(l - 1))).count();
    let layer_fwd_fpt = (ckpt_fpt - model_fpt) / layers as f64;
    let hw_fpt = model_fpt + layer_fwd_fpt * recomputed as f64 - spared as f64 * attn_fwd_fpt
        + skipped.len() as f64 * (layer_fwd_fpt - attn_fwd_fpt)
        + reruns_attending as f64 * attn_fwd_fpt;
    let peak = a.peak_tflops * 1e12;
    let mfu = model_fpt * tok_s / peak;
    let hfu = hw_fpt * tok_s / peak;
    let measured = free0.saturating_sub(free1) as f64 / GIB;
    let profile = if a.profile {
        let title = format!("GPU time of one profiled step (unprofiled: {ms:.2} ms):");
        profile_json(&print_profile(&gpu, &title, || step(&mut model).map(drop))?)
    } else {
        serde_json::Value::Null
    };
    let planned = model.held_bytes() as f64 / GIB;
    let name = gpu.info().name.clone();
    let d = &model.dims;
    let attention = AttentionKernels::for_call(
        &gpu,
        &AttentionDims::new(n, a.batch, d.heads, d.kv_heads, d.head_dim),
    )
    .map_err(|e| e.to_string())?
    .name();
    let qkv = model.checkpoints_carry_qkv();
    let gate_up = model.gate_up_offloaded();
    let resident_qkv = model.resident_qkv_layers();
    let mut carried = Vec::new();
    if qkv {
        carried.push("with q, k, v".to_string());
    }
    if !gate_up.is_empty() {
        carried.push(format!("gate/up of {} layers", gate_up.len()));
    }
    if !resident_qkv.is_empty() {
        carried.push(format!(
            "q, k, v of {} layers kept on the GPU",
            resident_qkv.len()
        ));
    }
    if !skipped.is_empty() {
        carried.push(format!(
            "sparse residuals: {} layers re-run the layer below",
            skipped.len()
        ));
    }
    if !outputs_offloaded.is_empty() {
        carried.push(format!(
            "attention outputs of {} layers through the host",
            outputs_offloaded.len()
        ));
    }
    if !resident_attention.is_empty() {
        carried.push(format!(
            "attention outputs of {} layers kept on the GPU",
            resident_attention.len()
        ));
    }
    let checkpoints = match carried.is_empty() {
        true => "checkpoints".to_string(),
        false => format!("checkpoints ({})", carried.join("; ")),
    };
    println!(
        "ftrt bench {} {} r={} batch {}x{} on {name} (attention {attention}): {:.0} tok/s, {:.2} ms/step, GPU memory {:.2} GiB measured ({:.2} GiB held by the model; {:.1} GiB total), MFU {:.1}%, HFU {:.1}% ({recomputed} of {layers} layers recomputed{}), loss {:.4} -> {:.4}; setup {setup_s:.1} s (allocations {alloc_s:.1} s); {graph_steps} of {} timed steps as CUDA graphs",
        a.preset, a.mode, a.lora_r, a.batch, a.seq, tok_s, ms, measured, planned, total as f64 / GIB, 100.0 * mfu, 100.0 * hfu,
        match (a.offload_residuals, a.offload_embeddings) {
            (true, true) => format!(", {checkpoints} and embeddings offloaded"),
            (true, false) => format!(", {checkpoints} offloaded"),
            (false, true) => ", embeddings offloaded".to_string(),
            (false, false) => String::new(),
        },
        first_timed, loss, a.steps
    );
    let json = serde_json::json!({
        "bench": "ftrt", "model": a.preset, "mode": a.mode, "optim": "adamw", "lora_r": a.lora_r,
        "kept_bf16": a.llm_int8_skip_modules, "grad_ckpt": recomputed > 0, "recomputed_layers": recomputed,
        "offload_residuals": a.offload_residuals, "checkpoint_qkv": qkv, "gate_up_layers": gate_up, "resident_qkv_layers": resident_qkv, "resident_attention_layers": resident_attention, "outputs_offloaded": outputs_offloaded, "skipped_residuals": skipped, "offload_embeddings": a.offload_embeddings, "gpu": name, "attention": attention,
        "gemm_autotune": std::env::var(ftrt_runtime::gemm::cublaslt::AUTOTUNE_ENV).is_ok_and(|v| v == "1"),
        "cuda_graph_steps": graph_steps,
        "setup_s": (setup_s * 10.0).round() / 10.0, "alloc_s": (alloc_s * 10.0).round() / 10.0,
        "batch": a.batch, "seq": a.seq, "steps": a.steps, "warmup": a.warmup, "status": "ok",
        "tokens_per_s": (tok_s * 10.0).round() / 10.0, "ms_per_step": (ms * 100.0).round() / 100.0,
        "warmup_s": (warmup_s * 100.0).round() / 100.0,
        "peak_gib": (measured * 1000.0).round() / 1000.0, "planned_gib": (planned * 1000.0).round() / 1000.0,
        "mfu": (mfu * 1e4).round() / 1e4, "hfu": (hfu * 1e4).round() / 1e4,
        "model_tflops": (model_fpt * tok_s / 1e11).round() / 10.0, "loss": loss,
        "n_params_matmul": n_mat, "n_lora": n_lora, "profile": profile,
        "losses": losses,
    });
    println!("{json}");
    Ok(())
}

/// `ftrt bench --decode`: generation throughput on random weights, timed as
/// grpo_baseline.py's `gen` does (a short untimed warm-up generate, then a 1-token generate for
/// the prefill time, then the full one): generated tok/s = B * N / full time (prefill
/// included), decode tok/s = B * (N - 1) / (full - prefill), ms per token step.
fn run_decode(a: &BenchArgs) -> Result<(), String> {
    let (b, p, n) = (a.batch, a.seq, a.new_tokens);
    if b == 0 || p == 0 || n < 2 {
        return Err("--decode needs --batch >= 1, --seq >= 1 and --new-tokens >= 2".into());
    }
    let t_setup = std::time::Instant::now();
    let config = preset_config(&a.preset)?;
    let gpu = Gpu::open(a.device).map_err(|e| format!("{e}\nftrt bench needs an NVIDIA GPU."))?;
    let (free0, _) = gpu.context().mem_get_info().map_err(|e| e.to_string())?;
    // The token budget holds every position (RoPE tables) and sizes the prefill chunks.
    let budget = (p + n).max(4096);
    let mut model = GpuLlama::random(&gpu, &config, budget, 1, 1234)?;
    model.set_kept_layers(0);
    let setup_s = t_setup.elapsed().as_secs_f64();
    let prompts = random_prompts(b, p, model.dims.vocab);
    let params = SamplingParams {
        temperature: a.temperature,
        top_p: 1.0,
        top_k: 0,
        seed: 0,
    };
    // One KV cache for every generate call, cleared in between (HF's cache memory comes back
    // from PyTorch's caching allocator the same way); its captured decode step is reused.
    let mut cache = Some(model.new_kv_cache(b, p + n)?);
    let timing = time_generate(&gpu, free0, setup_s, n, |new| {
        let mut steps = GpuSteps {
            model: &mut model,
            cache: cache.take().ok_or("the KV cache was lost")?,
        };
        steps.cache.clear();
        let out = generate_with(&mut steps, &prompts, new, &[], params);
        cache = Some(steps.cache);
        out
    })?;
    let profile = if a.profile {
        let steps = 8.min(n - 1);
        let mut cache = model.new_kv_cache(b, p + steps + 1)?;
        let slots: Vec<usize> = (0..b).collect();
        let mut sampler = ftrt_models::llama::Sampler::new(params);
        let mut next = model.prefill(&mut cache, &slots, &prompts, &mut sampler)?;
        let title =
            format!("GPU time of {steps} decode steps at batch {b} (after a {p}-token prefill):");
        profile_json(&print_profile(&gpu, &title, || {
            for _ in 0..steps {
                next = model.decode(&mut cache, &slots, &next, &mut sampler)?;
            }
            Ok(())
        })?)
    } else {
        serde_json::Value::Null
    };
    print_gen(a, &gpu, "GPU model", &timing, profile);
    Ok(())
}

/// Times `generate(new)` (the new tokens of each prompt) as grpo_baseline.py's `gen` does: a
/// 16-token warm-up, a 1-token generate (the prefill), then `n` tokens; GPU memory is the
/// driver's free memory `free0` before setup minus after the full generate.
pub fn time_generate(
    gpu: &Gpu,
    free0: usize,
    setup_s: f64,
    n: usize,
    mut generate: impl FnMut(usize) -> Result<Vec<Vec<u32>>, String>,
) -> Result<GenTiming, String> {
    let mut timed = |new: usize| -> Result<(f64, usize), String> {
        gpu.synchronize().map_err(|e| e.to_string())?;
        let t = std::time::Instant::now();
        let out = generate(new)?;
        gpu.synchronize().map_err(|e| e.to_string())?;
        Ok((
            t.elapsed().as_secs_f64(),
            out.iter().map(Vec::len).min().unwrap_or(0),
        ))
    };
    timed(16)?;
    let (prefill_s, _) = timed(1)?;
    let (full_s, generated) = timed(n)?;
    let (free1, _) = gpu.context().mem_get_info().map_err(|e| e.to_string())?;
    Ok(GenTiming {
        setup_s,
        prefill_s,
        full_s,
        generated,
        gpu_bytes: free0.saturating_sub(free1),
    })
}

/// What a generation benchmark measured (grpo_baseline.py's `gen` timings).
pub struct GenTiming {
    pub setup_s: f64,
    /// A 1-token generate (the prefill), the full one, and the tokens it made per prompt.
    pub prefill_s: f64,
    pub full_s: f64,
    pub generated: usize,
    /// GPU memory taken (driver's free memory before setup minus after the full generate).
    pub gpu_bytes: usize,
}

/// Prints a generation benchmark's line and JSON (`"bench": "ftrt_gen"`): generated tok/s =
/// B * N / full time (prefill included), decode tok/s = B * (N - 1) / (full - prefill).
pub fn print_gen(a: &BenchArgs, gpu: &Gpu, path: &str, t: &GenTiming, profile: serde_json::Value) {
    let (b, p, n) = (a.batch, a.seq, a.new_tokens);
    let generated = t.generated;
    let gen_tok_s = (b * generated) as f64 / t.full_s;
    let decode_tok_s =
        (b * generated.saturating_sub(1)) as f64 / (t.full_s - t.prefill_s).max(1e-9);
    let ms_step = 1e3 * (t.full_s - t.prefill_s) / (generated.saturating_sub(1)).max(1) as f64;
    let name = gpu.info().name.clone();
    let gib = t.gpu_bytes as f64 / GIB;
    println!(
        "ftrt bench --decode {} batch {b} prompt {p} new {generated} on {name} ({path}): {gen_tok_s:.0} generated tok/s, decode {decode_tok_s:.0} tok/s, {ms_step:.2} ms per token step, prefill {:.1} ms, GPU memory {gib:.2} GiB",
        a.preset,
        1e3 * t.prefill_s,
    );
    let json = serde_json::json!({
        "bench": "ftrt_gen", "path": path, "model": a.preset, "gpu": name, "batch": b,
        "prompt_len": p, "new_tokens": n, "generated": generated, "temperature": a.temperature,
        "status": if generated == n { "ok" } else { "short" },
        "setup_s": (t.setup_s * 10.0).round() / 10.0, "gen_s": (t.full_s * 1e3).round() / 1e3,
        "prefill_s": (t.prefill_s * 1e4).round() / 1e4,
        "gen_tok_s": (gen_tok_s * 10.0).round() / 10.0,
        "decode_tok_s": (decode_tok_s * 10.0).round() / 10.0,
        "ms_per_token_step": (ms_step * 100.0).round() / 100.0,
        "peak_gib": (gib * 1000.0).round() / 1000.0,
        "profile": profile,
    });
    println!("{json}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_parse_with_hf_shapes() {
        for p in ["llama-3.2-1b", "llama-3.1-8b", "qwen2.5-7b"] {
            let c = ModelConfig::from_json_str(&preset_json(p).unwrap(), Path::new(p)).unwrap();
            assert_eq!(c.head_dim, c.hidden_size / c.num_attention_heads, "{p}");
            assert_eq!(c.qkv_bias, p.starts_with("qwen"), "{p}");
        }
        assert!(preset_json("gpt-2").is_err());
        let (b, t) = random_batch(2, 4, 100, 1);
        assert_eq!(b.cu_seqlens, vec![0, 4, 8]);
        assert_eq!(t.len(), 8);
        assert_eq!(t[3], -100);
        assert_eq!(t[0], b.tokens[1] as i32);
        assert_eq!(b.positions, vec![0, 1, 2, 3, 0, 1, 2, 3]);
    }
}
