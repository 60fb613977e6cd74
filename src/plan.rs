//! `ftrt plan`: the memory plan of one LoRA / QLoRA training step of a Llama-shaped model,
//! printed before anything is allocated (no GPU needed): peak, breakdown by lifetime class,
//! keep / offload / recompute decisions with their reasons, and whether it fits the budget.
//!
//! The step graph is built with the runtime's [`GraphBuilder`] with the tensors a real Llama
//! decoder step has (see [`llama_step`]); its kernels are not attached (planning only needs
//! shapes, dtypes, lifetimes and the schedule).

use ftrt_models::llama::gpu::plan::MLP_TILE_ROWS;
use ftrt_runtime::gemm::cublaslt::DEFAULT_WORKSPACE_BYTES;
use ftrt_runtime::offload::estimate;
use ftrt_runtime::planner::{fmt_bytes, plan, CostModel, PlanOptions};
use ftrt_runtime::{DType, GemmDesc, Graph, GraphBuilder, Lifetime, Node, RuntimeError, TensorId};

/// Model shapes of `/work/shared/bench/hf_baseline.py` (and SmolLM2-135M, the test model).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Preset {
    #[value(name = "llama-3.1-8b")]
    Llama31_8b,
    #[value(name = "llama-3.2-1b")]
    Llama32_1b,
    #[value(name = "qwen2.5-7b")]
    Qwen25_7b,
    #[value(name = "smollm2-135m")]
    Smollm2_135m,
}

/// LoRA on a bf16 base, or QLoRA on an NF4 base.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    Lora,
    Qlora,
}

/// `ftrt plan` flags. A preset gives the model shape; any shape flag overrides it; without a
/// preset, --hidden, --intermediate, --layers, --heads and --vocab are required.
#[derive(Debug, Clone, clap::Args)]
pub struct PlanArgs {
    /// Model shape preset.
    #[arg(long, value_enum)]
    pub preset: Option<Preset>,
    /// Hidden size.
    #[arg(long)]
    pub hidden: Option<usize>,
    /// MLP intermediate size.
    #[arg(long)]
    pub intermediate: Option<usize>,
    /// Decoder layers.
    #[arg(long)]
    pub layers: Option<usize>,
    /// Attention heads.
    #[arg(long)]
    pub heads: Option<usize>,
    /// Key/value heads (default: --heads).
    #[arg(long)]
    pub kv_heads: Option<usize>,
    /// Vocabulary size.
    #[arg(long)]
    pub vocab: Option<usize>,
    /// lm_head shares the embedding matrix (presets set this themselves).
    #[arg(long)]
    pub tied: bool,
    /// Sequence length (tokens per sequence).
    #[arg(long, default_value_t = 2048)]
    pub seq: usize,
    /// Sequences per micro-batch.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// LoRA rank (adapters on q, k, v, o, gate, up, down).
    #[arg(long, default_value_t = 16)]
    pub lora_r: usize,
    /// lora (bf16 base) or qlora (NF4 base).
    #[arg(long, value_enum, default_value_t = Mode::Lora)]
    pub mode: Mode,
    /// Print every saved tensor's keep/offload/recompute decision and its reason.
    #[arg(long)]
    pub verbose: bool,
    /// VRAM budget in GiB; without it every saved tensor is kept and the peak is reported.
    #[arg(long)]
    pub vram_budget_gib: Option<f64>,
    /// Pinned host memory the offloaded tensors may take, in GiB; a plan needing more is
    /// refused with what it needs [default: no bound]
    #[arg(long)]
    pub host_budget_gib: Option<f64>,
    /// Whole-layer gradient checkpointing, as `ftrt bench --keep-layers 0` runs it: save only
    /// every K-th layer's input, and re-run in the backward each layer's forward from the
    /// nearest saved input (K = 1: one layer forward per layer; K: up to K). Without it the
    /// planner decides tensor by tensor.
    #[arg(long, value_name = "K")]
    pub checkpoint_layers: Option<usize>,
}

/// A Llama-shaped model and one micro-batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelShape {
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub vocab: usize,
    pub tied: bool,
    pub seq: usize,
    pub batch: usize,
    pub lora_r: usize,
    pub mode: Mode,
    /// Save only every K-th layer's input and recompute the rest (see `--checkpoint-layers`).
    pub checkpoint: Option<usize>,
}

impl Preset {
    /// (hidden, intermediate, layers, heads, kv_heads, vocab, tied), as in hf_baseline.py.
    pub fn dims(self) -> (usize, usize, usize, usize, usize, usize, bool) {
        match self {
            Self::Llama31_8b => (4096, 14336, 32, 32, 8, 128256, false),
            Self::Llama32_1b => (2048, 8192, 16, 32, 8, 128256, true),
            Self::Qwen25_7b => (3584, 18944, 28, 28, 4, 152064, false),
            Self::Smollm2_135m => (576, 1536, 30, 9, 3, 49152, true),
        }
    }
}

impl PlanArgs {
    /// The model shape from the preset and the flags.
    #[allow(unknown_lints, clippy::manual_is_multiple_of)] // is_multiple_of needs Rust 1.87
    pub fn shape(&self) -> Result<ModelShape, String> {
        let p = self.preset.map(Preset::dims);
        let pick = |flag: Option<usize>, preset: Option<usize>, name: &str| {
            flag.or(preset)
                .ok_or_else(|| format!("--{name} is required without --preset"))
        };
        let heads = pick(self.heads, p.map(|p| p.3), "heads")?;
        let s = ModelShape {
            hidden: pick(self.hidden, p.map(|p| p.0), "hidden")?,
            intermediate: pick(self.intermediate, p.map(|p| p.1), "intermediate")?,
            layers: pick(self.layers, p.map(|p| p.2), "layers")?,
            heads,
            kv_heads: self.kv_heads.or(p.map(|p| p.4)).unwrap_or(heads),
            vocab: pick(self.vocab, p.map(|p| p.5), "vocab")?,
            tied: self.tied || p.is_some_and(|p| p.6),
            seq: self.seq,
            batch: self.batch,
            lora_r: self.lora_r,
            mode: self.mode,
            checkpoint: self.checkpoint_layers,
        };
        let nonzero = [
            s.hidden,
            s.intermediate,
            s.layers,
            s.heads,
            s.kv_heads,
            s.vocab,
            s.seq,
            s.batch,
            s.lora_r,
            s.checkpoint.unwrap_or(1),
        ];
        if nonzero.contains(&0) {
            return Err("every size must be at least 1".into());
        }
        if s.hidden % s.heads != 0 || s.heads % s.kv_heads != 0 {
            return Err(format!(
                "--hidden {} must be a multiple of --heads {}, and --heads of --kv-heads {}",
                s.hidden, s.heads, s.kv_heads
            ));
        }
        Ok(s)
    }
}

/// Prints the plan of one training step of the model; errors (the runtime's "does not fit",
/// naming the largest tensors and what would fit) when the step cannot fit the budget even
/// with every movable saved tensor off the device.
pub fn run(args: &PlanArgs) -> Result<(), String> {
    let shape = args.shape()?;
    let g = llama_step(&shape).map_err(|e| e.to_string())?;
    let params: usize = g
        .tensors
        .iter()
        .filter(|t| t.lifetime == Lifetime::Weight && t.dtype != DType::I32)
        .map(|t| t.elems())
        .sum();
    println!(
        "model: hidden {}, intermediate {}, {} layers, {} heads / {} kv heads, vocab {}{}; {} tokens \
         ({} x {}), LoRA r {} on q,k,v,o,gate,up,down, {} base",
        shape.hidden,
        shape.intermediate,
        shape.layers,
        shape.heads,
        shape.kv_heads,
        shape.vocab,
        if shape.tied { " (tied)" } else { "" },
        shape.batch * shape.seq,
        shape.batch,
        shape.seq,
        shape.lora_r,
        match shape.mode {
            Mode::Lora => "bf16",
            Mode::Qlora => "NF4",
        }
    );
    println!(
        "graph: {} nodes, {} tensors, {} stored weight elements",
        g.nodes.len(),
        g.tensors.len(),
        params
    );
    let mut opts = PlanOptions::default();
    if let Some(gib) = args.vram_budget_gib {
        if !(gib > 0.0 && gib.is_finite()) {
            return Err(format!("--vram-budget-gib must be positive, got {gib}"));
        }
        opts = opts.with_budget((gib * (1u64 << 30) as f64) as usize);
    }
    let p = plan(&g, &opts).map_err(|e| match e {
        RuntimeError::DoesNotFit(_) => format!("{e}"),
        other => other.to_string(),
    })?;
    if args.verbose {
        print!("{p:#}");
    } else {
        print!("{p}");
    }
    if let Some(gib) = args.host_budget_gib {
        let host = (gib * (1u64 << 30) as f64) as usize;
        if p.host_bytes > host {
            return Err(format!(
                "does not fit the host: the plan offloads {} to pinned host memory, the host \
                 budget is {}{}",
                fmt_bytes(p.host_bytes),
                fmt_bytes(host),
                if args.checkpoint_layers.is_some() {
                    " (a larger --checkpoint-layers saves fewer layer inputs)"
                } else {
                    " (--checkpoint-layers K saves only every K-th layer's input and recomputes the rest)"
                }
            ));
        }
    }
    let cost = CostModel::H200;
    let est = estimate(&g, &p, &cost);
    println!(
        "estimated step on an H200 (roofline, copies at 55 GB/s each way): {:.1} ms compute, {:.2} ms \
         waiting for copies; fits: {}",
        est.compute_s * 1e3,
        est.stall_s * 1e3,
        match p.budget {
            Some(b) => format!("yes ({} of {})", fmt_bytes(p.arena_bytes), fmt_bytes(b)),
            None => format!("needs {} (no budget given)", fmt_bytes(p.arena_bytes)),
        }
    );
    Ok(())
}

/// One linear layer `y = x · W^T + s · (x · A^T) · B^T` of a decoder layer, with its LoRA.
#[derive(Clone)]
struct Linear {
    name: String,
    d_in: usize,
    d_out: usize,
    /// bf16 `[d_out, d_in]` (LoRA) or NF4 `[packed, absmax, absmax2]` (QLoRA).
    base: Vec<TensorId>,
    a: TensorId,
    b: TensorId,
    grad_a: TensorId,
    grad_b: TensorId,
}

/// Builds the step graph of `s`. Tensor sizes follow a Llama decoder (T = batch x seq tokens,
/// d = hidden, i = intermediate, hd = d / heads, q = heads x hd, kv = kv_heads x hd):
///
/// - Weights (frozen): token embedding `[vocab, d]` bf16, final norm `[d]`, lm_head
///   `[vocab, d]` bf16 unless tied; per layer two RMSNorm weights `[d]` and q `[q, d]`,
///   k, v `[kv, d]`, o `[d, q]`, gate, up `[i, d]`, down `[d, i]`: bf16 for LoRA; for QLoRA
///   NF4 like bitsandbytes: packed u8 `[n / 2]` (0.5 byte/param), absmax u8 `[n / 64]`
///   (double-quantized, 64-element blocks) and f32 second-level absmax `[n / 16384]`. RoPE
///   cos/sin `[seq, hd]` f32; token ids and labels `[T]` i32.
/// - LoRA on all seven projections: A `[r, d_in]`, B `[d_out, r]` bf16 (weights), their
///   gradients f32 (gradient), and AdamW's f32 master copy, exp_avg and exp_avg_sq
///   (optimizer state, 12 bytes/param).
/// - Saved for the backward, per layer: the layer input `x` `[T, d]`, both norms' outputs
///   `[T, d]` and rstd `[T]` f32, LoRA down-projections `x · A^T` `[T, r]` of every
///   projection, q, k (after RoPE) and v, the attention output `[T, q]` and its log-sum-exp
///   `[heads, T]` f32, the post-attention residual `[T, d]`, gate and up `[T, i]`, and
///   silu(gate) * up `[T, i]` (recomputable: one elementwise kernel from gate and up). The
///   final norm's output and rstd. Past `MLP_TILE_ROWS` tokens the MLP runs in row tiles as
///   the GPU model runs it: one forward node and one backward node per layer stand for the
///   tile loops, gate, up, act and their gradients are `[tile, i]` scratch (recomputed per
///   tile in the backward) and only the x A^T rows are saved.
/// - Activations: projection outputs before RoPE / residual adds. Gradients: `[T, d]`,
///   `[T, q]`, `[T, kv]`, `[T, i]` streams of the backward. Scratch: dequantized NF4 weights
///   `[d_out, d_in]` bf16 (QLoRA, one per GEMM), attention-backward `delta` `[heads, T]` f32,
///   the chunked loss's logits `[min(T, 1024), vocab]` f32, the 32 MiB GEMM workspace.
///
/// The loss is a fused lm_head + cross-entropy over 1024-token chunks that writes the hidden
/// gradient directly (no `[T, vocab]` logits); the base is frozen, so only input gradients
/// flow through it and LoRA gets weight gradients.
///
/// With `s.checkpoint = Some(K)` (whole-layer gradient checkpointing): only layer 0's input,
/// every K-th layer's output and the last layer's are saved; every other per-layer tensor
/// lives through the forward only, and the backward of layer l first re-runs the forward of
/// the layers from its segment's saved input up to l (their nodes and tensors named
/// `(recompute for layer l)` and `(recompute)`), so the planner sees both the smaller saved
/// set and the recompute's time and working memory.
pub fn llama_step(s: &ModelShape) -> Result<Graph, RuntimeError> {
    let t = s.batch * s.seq;
    let (d, i, r) = (s.hidden, s.intermediate, s.lora_r);
    let hd = d / s.heads;
    let (qd, kvd) = (s.heads * hd, s.kv_heads * hd);
    let mut b = GraphBuilder::new();
    b.gemm_workspace(DEFAULT_WORKSPACE_BYTES);
    let bf16 = DType::BF16;
    let ids = b.tensor("input_ids", &[t], DType::I32, Lifetime::Weight);
    let labels = b.tensor("labels", &[t], DType::I32, Lifetime::Weight);
    let embed = b.tensor("embed_tokens", &[s.vocab, d], bf16, Lifetime::Weight);
    let final_norm = b.tensor("norm", &[d], bf16, Lifetime::Weight);
    let head = if s.tied {
        embed
    } else {
        b.tensor("lm_head", &[s.vocab, d], bf16, Lifetime::Weight)
    };
    let rope = b.tensor(
        "rope_cos_sin",
        &[2, s.seq, hd],
        DType::F32,
        Lifetime::Weight,
    );

    let mut opt_nodes: Vec<Node> = Vec::new();
    let mut linear = |b: &mut GraphBuilder, name: String, d_in: usize, d_out: usize| {
        let n = d_out * d_in;
        let base = match s.mode {
            Mode::Lora => vec![b.tensor(
                format!("{name}.weight"),
                &[d_out, d_in],
                bf16,
                Lifetime::Weight,
            )],
            Mode::Qlora => vec![
                b.tensor(
                    format!("{name}.nf4"),
                    &[n.div_ceil(2)],
                    DType::U8,
                    Lifetime::Weight,
                ),
                b.tensor(
                    format!("{name}.absmax"),
                    &[n.div_ceil(64)],
                    DType::U8,
                    Lifetime::Weight,
                ),
                b.tensor(
                    format!("{name}.absmax2"),
                    &[n.div_ceil(64 * 256)],
                    DType::F32,
                    Lifetime::Weight,
                ),
            ],
        };
        let a = b.tensor(format!("{name}.lora_A"), &[r, d_in], bf16, Lifetime::Weight);
        let bb = b.tensor(
            format!("{name}.lora_B"),
            &[d_out, r],
            bf16,
            Lifetime::Weight,
        );
        let grad_a = b.tensor(
            format!("{name}.lora_A.grad"),
            &[r, d_in],
            DType::F32,
            Lifetime::Gradient,
        );
        let grad_b = b.tensor(
            format!("{name}.lora_B.grad"),
            &[d_out, r],
            DType::F32,
            Lifetime::Gradient,
        );
        for (p, g, shape) in [(a, grad_a, [r, d_in]), (bb, grad_b, [d_out, r])] {
            let pname = format!("{name}.lora_{}", if p == a { "A" } else { "B" });
            let st: Vec<TensorId> = ["master", "exp_avg", "exp_avg_sq"]
                .iter()
                .map(|k| {
                    b.tensor(
                        format!("{pname}.{k}"),
                        &shape,
                        DType::F32,
                        Lifetime::OptimizerState,
                    )
                })
                .collect();
            opt_nodes.push(
                Node::kernel(
                    format!("adamw {pname}"),
                    &[g, st[0], st[1], st[2]],
                    &[st[0], st[1], st[2], p],
                )
                .with_flops(10.0 * (shape[0] * shape[1]) as f64),
            );
        }
        Linear {
            name,
            d_in,
            d_out,
            base,
            a,
            b: bb,
            grad_a,
            grad_b,
        }
    };

    // The base weight as a bf16 [d_out, d_in] operand (dequantized into scratch for QLoRA).
    let weight = |b: &mut GraphBuilder, l: &Linear, tag: &str| -> TensorId {
        match s.mode {
            Mode::Lora => l.base[0],
            Mode::Qlora => {
                let w = b.tensor(
                    format!("{}.dequant.{tag}", l.name),
                    &[l.d_out, l.d_in],
                    bf16,
                    Lifetime::Scratch,
                );
                b.node(Node::kernel(
                    format!("{} dequant ({tag})", l.name),
                    &l.base,
                    &[w],
                ));
                w
            }
        }
    };
    // Forward: y [T, d_out] (of `lifetime`) and the LoRA down-projection [T, r] (of `keep`:
    // Saved, or Activation in a checkpointed step).
    let forward = |b: &mut GraphBuilder, l: &Linear, x: TensorId, lifetime: Lifetime, keep| {
        let w = weight(b, l, "fwd");
        let y = b.tensor(format!("{}.out", l.name), &[t, l.d_out], bf16, lifetime);
        let tn = |m, n, k| GemmDesc::new(m, n, k).transposed(false, true);
        b.node(Node::gemm(
            format!("{} base", l.name),
            tn(t, l.d_out, l.d_in),
            x,
            w,
            y,
            None,
        ));
        let la = b.tensor(format!("{}.lora_xA", l.name), &[t, r], bf16, keep);
        b.node(Node::gemm(
            format!("{} lora A", l.name),
            tn(t, r, l.d_in),
            x,
            l.a,
            la,
            None,
        ));
        let up = tn(t, l.d_out, r).scaled(1.0, 1.0);
        b.node(Node::gemm(
            format!("{} lora B", l.name),
            up,
            la,
            l.b,
            y,
            None,
        ));
        (y, la)
    };
    // Backward: LoRA weight gradients and dx (+)= dy · W + (dy · B) · A.
    let backward = |b: &mut GraphBuilder,
                    l: &Linear,
                    dy: TensorId,
                    x: TensorId,
                    la: TensorId,
                    dx: TensorId,
                    acc: bool| {
        let nm = &l.name;
        let tn = |m, n, k| GemmDesc::new(m, n, k).transposed(true, false);
        b.node(Node::gemm(
            format!("{nm} grad B"),
            tn(l.d_out, r, t),
            dy,
            la,
            l.grad_b,
            None,
        ));
        let dla = b.tensor(format!("{nm}.d_lora_xA"), &[t, r], bf16, Lifetime::Scratch);
        b.node(Node::gemm(
            format!("{nm} d xA"),
            GemmDesc::new(t, r, l.d_out),
            dy,
            l.b,
            dla,
            None,
        ));
        b.node(Node::gemm(
            format!("{nm} grad A"),
            tn(r, l.d_in, t),
            dla,
            x,
            l.grad_a,
            None,
        ));
        let w = weight(b, l, "bwd");
        let beta = if acc { 1.0 } else { 0.0 };
        b.node(Node::gemm(
            format!("{nm} dx"),
            GemmDesc::new(t, l.d_in, l.d_out).scaled(1.0, beta),
            dy,
            w,
            dx,
            None,
        ));
        b.node(Node::gemm(
            format!("{nm} dx lora"),
            GemmDesc::new(t, l.d_in, r).scaled(1.0, 1.0),
            dla,
            l.a,
            dx,
            None,
        ));
    };
    let norm_w = |b: &mut GraphBuilder, name: String| b.tensor(name, &[d], bf16, Lifetime::Weight);
    let attn_flops = 2.0 * s.batch as f64 * (s.seq * s.seq) as f64 * (s.heads * hd) as f64;
    // The MLP in row tiles of MLP_TILE_ROWS once the batch is longer than one (as the GPU model
    // runs it): gate, up, act and their gradients exist one tile at a time, recomputed per
    // tile in the backward; its nodes stand for the whole tile loop (FLOPs of every tile).
    let tm = t.min(MLP_TILE_ROWS);
    let tiles = t.div_ceil(tm);
    // Forward: three base GEMMs and three LoRA pairs; backward: three dx GEMMs, LoRA gradients
    // (twice the forward's LoRA work), and the recompute of gate and up (two thirds of both).
    let (mlp_base, mlp_lora) = (6.0 * (t * d * i) as f64, 6.0 * (t * r * (d + i)) as f64);
    let mlp_flops = mlp_base + mlp_lora;
    let mlp_bwd_flops = mlp_base * 5.0 / 3.0 + mlp_lora * 8.0 / 3.0;
    let mlp_tile_scratch = |b: &mut GraphBuilder, p: &str, names: &[&str]| -> Vec<TensorId> {
        let mut v: Vec<TensorId> = names
            .iter()
            .map(|n| {
                b.tensor(
                    format!("{p}.mlp.{n}.tile"),
                    &[tm, i],
                    bf16,
                    Lifetime::Scratch,
                )
            })
            .collect();
        if s.mode == Mode::Qlora {
            v.push(b.tensor(format!("{p}.mlp.dequant"), &[i, d], bf16, Lifetime::Scratch));
        }
        v
    };
    // The MLP projections' base weights and LoRA A, B after `first`.
    let mlp_reads = |first: &[TensorId], lin: &[Linear; 7]| -> Vec<TensorId> {
        let mut v = first.to_vec();
        for l in &lin[4..] {
            v.extend(&l.base);
            v.extend([l.a, l.b]);
        }
        v
    };

    /// What a layer's backward reads from its forward (all but x of lifetime `keep`).
    struct Layer {
        x: TensorId,
        hn: TensorId,
        rstd: TensorId,
        q: TensorId,
        k: TensorId,
        v: TensorId,
        o: TensorId,
        lse: TensorId,
        x_mid: TensorId,
        h2: TensorId,
        rstd2: TensorId,
        /// gate, up, silu(gate) * up; `None` when the MLP runs in row tiles.
        mlp: Option<[TensorId; 3]>,
        la: [TensorId; 7],
    }
    // One decoder layer's forward from x (names prefixed `p`): its Layer, whose tensors have
    // lifetime `keep` (Saved when the backward reads the forward's; Activation when a
    // checkpointed step recomputes them), and its output of lifetime `next`.
    let layer_forward = |b: &mut GraphBuilder,
                         p: &str,
                         x: TensorId,
                         lin: &[Linear; 7],
                         (w_an, w_fn): (TensorId, TensorId),
                         keep: Lifetime,
                         next: Lifetime| {
        let saved =
            |b: &mut GraphBuilder, n: String, shape: &[usize], dt| b.tensor(n, shape, dt, keep);
        let hn = saved(b, format!("{p}.attn_norm.out"), &[t, d], bf16);
        let rstd = saved(b, format!("{p}.attn_norm.rstd"), &[t], DType::F32);
        b.node(Node::kernel(
            format!("{p} attn rmsnorm"),
            &[x, w_an],
            &[hn, rstd],
        ));
        let (qp, la_q) = forward(b, &lin[0], hn, Lifetime::Activation, keep);
        let (kp, la_k) = forward(b, &lin[1], hn, Lifetime::Activation, keep);
        let (v, la_v) = forward(b, &lin[2], hn, keep, keep);
        let q = saved(b, format!("{p}.q_rope"), &[t, qd], bf16);
        let k = saved(b, format!("{p}.k_rope"), &[t, kvd], bf16);
        b.node(Node::kernel(format!("{p} rope"), &[qp, kp, rope], &[q, k]));
        let o = saved(b, format!("{p}.attn.out"), &[t, qd], bf16);
        let lse = saved(b, format!("{p}.attn.lse"), &[s.heads, t], DType::F32);
        b.node(
            Node::kernel(format!("{p} attention"), &[q, k, v], &[o, lse]).with_flops(attn_flops),
        );
        let (ao, la_o) = forward(b, &lin[3], o, Lifetime::Activation, keep);
        let x_mid = saved(b, format!("{p}.attn_residual"), &[t, d], bf16);
        b.node(Node::kernel(format!("{p} residual 1"), &[x, ao], &[x_mid]));
        let h2 = saved(b, format!("{p}.mlp_norm.out"), &[t, d], bf16);
        let rstd2 = saved(b, format!("{p}.mlp_norm.rstd"), &[t], DType::F32);
        b.node(Node::kernel(
            format!("{p} mlp rmsnorm"),
            &[x_mid, w_fn],
            &[h2, rstd2],
        ));
        let (mlp, mo, [la_g, la_u, la_d]) = if tiles > 1 {
            // Row tiles: only the x A^T rows are saved; gate, up and act live one tile at a
            // time (and are recomputed tile by tile in the backward).
            let la = [4, 5, 6].map(|j| saved(b, format!("{}.lora_xA", lin[j].name), &[t, r], bf16));
            let mo = b.tensor(format!("{p}.mlp.out"), &[t, d], bf16, Lifetime::Activation);
            let mut writes = vec![mo];
            writes.extend(la);
            writes.extend(mlp_tile_scratch(b, p, &["gate", "up", "act"]));
            b.node(
                Node::kernel(
                    format!("{p} mlp ({tiles} tiles of {tm} rows)"),
                    &mlp_reads(&[h2], lin),
                    &writes,
                )
                .with_flops(mlp_flops),
            );
            (None, mo, la)
        } else {
            let (gate, la_g) = forward(b, &lin[4], h2, keep, keep);
            let (up, la_u) = forward(b, &lin[5], h2, keep, keep);
            let act = saved(b, format!("{p}.mlp.act"), &[t, i], bf16);
            if keep == Lifetime::Saved {
                b.mark_recomputable(act);
            }
            b.node(Node::kernel(format!("{p} swiglu"), &[gate, up], &[act]));
            let (mo, la_d) = forward(b, &lin[6], act, Lifetime::Activation, keep);
            (Some([gate, up, act]), mo, [la_g, la_u, la_d])
        };
        let x_next = b.tensor(format!("{p}.output"), &[t, d], bf16, next);
        b.node(Node::kernel(
            format!("{p} residual 2"),
            &[x_mid, mo],
            &[x_next],
        ));
        let layer = Layer {
            x,
            hn,
            rstd,
            q,
            k,
            v,
            o,
            lse,
            x_mid,
            h2,
            rstd2,
            mlp,
            la: [la_q, la_k, la_v, la_o, la_g, la_u, la_d],
        };
        (layer, x_next)
    };
    // Checkpointed (every K-th layer's input saved): the layers' tensors live only through the
    // forward, and the backward re-runs them.
    let keep = match s.checkpoint {
        Some(_) => Lifetime::Activation,
        None => Lifetime::Saved,
    };
    let mut x = b.tensor("layers.0.input", &[t, d], bf16, Lifetime::Saved);
    b.node(Node::kernel("embedding", &[ids, embed], &[x]));
    let mut lins = Vec::new();
    let mut norms = Vec::new();
    let mut inputs = Vec::new(); // each layer's input
    let mut layers = Vec::new();
    for li in 0..s.layers {
        let p = format!("layers.{li}");
        norms.push((
            norm_w(&mut b, format!("{p}.input_layernorm")),
            norm_w(&mut b, format!("{p}.post_attention_layernorm")),
        ));
        lins.push(
            [
                ("self_attn.q_proj", d, qd),
                ("self_attn.k_proj", d, kvd),
                ("self_attn.v_proj", d, kvd),
                ("self_attn.o_proj", qd, d),
                ("mlp.gate_proj", d, i),
                ("mlp.up_proj", d, i),
                ("mlp.down_proj", i, d),
            ]
            .map(|(n, din, dout)| linear(&mut b, format!("{p}.{n}"), din, dout)),
        );
        // The next layer's input is saved when the backward reads it: always without
        // checkpoints; with them at segment starts and for the final norm's backward.
        let boundary = match s.checkpoint {
            Some(k) => (li + 1) % k == 0 || li + 1 == s.layers,
            None => true,
        };
        let next = if boundary {
            Lifetime::Saved
        } else {
            Lifetime::Activation
        };
        inputs.push(x);
        let (layer, x_next) = layer_forward(&mut b, &p, x, &lins[li], norms[li], keep, next);
        layers.push(layer);
        x = x_next;
    }
    // Head: final norm, then the chunked fused lm_head + cross-entropy.
    let hf = b.tensor("norm.out", &[t, d], bf16, Lifetime::Saved);
    let rstdf = b.tensor("norm.rstd", &[t], DType::F32, Lifetime::Saved);
    b.node(Node::kernel(
        "final rmsnorm",
        &[x, final_norm],
        &[hf, rstdf],
    ));
    let chunk = t.min(1024);
    let dhf = b.tensor("norm.out.grad", &[t, d], bf16, Lifetime::Gradient);
    let loss = b.tensor("loss", &[1], DType::F32, Lifetime::Activation);
    for c in 0..t.div_ceil(chunk) {
        let logits = b.tensor(
            format!("logits.chunk{c}"),
            &[chunk, s.vocab],
            DType::F32,
            Lifetime::Scratch,
        );
        let mut reads = vec![hf, head, labels];
        if c > 0 {
            reads.extend([dhf, loss]);
        }
        let rows = chunk.min(t - c * chunk);
        b.node(
            Node::kernel(
                format!("lm_head + cross-entropy chunk {c}"),
                &reads,
                &[logits, dhf, loss],
            )
            .with_flops(4.0 * (rows * s.vocab * d) as f64),
        );
    }
    let mut dx = b.tensor(
        format!("layers.{}.input.grad", s.layers),
        &[t, d],
        bf16,
        Lifetime::Gradient,
    );
    b.node(Node::kernel(
        "final rmsnorm backward",
        &[x, rstdf, final_norm, dhf],
        &[dx],
    ));
    for li in (0..s.layers).rev() {
        let p = format!("layers.{li}");
        // Checkpointed: re-run the forward from the segment's saved input up to this layer
        // (the layers before it only for their outputs), then this layer's backward.
        let recomputed;
        let l = match s.checkpoint {
            None => &layers[li],
            Some(k) => {
                let renamed = |j: usize, why: &str| {
                    lins[j].clone().map(|mut l| {
                        l.name = format!("{} ({why})", l.name);
                        l
                    })
                };
                let c = li / k * k;
                let mut xr = inputs[c];
                for (j, &norm) in norms.iter().enumerate().take(li).skip(c) {
                    let why = format!("recompute for layer {li}");
                    let lin = renamed(j, &why);
                    let pj = format!("layers.{j} ({why})");
                    let act = Lifetime::Activation;
                    xr = layer_forward(&mut b, &pj, xr, &lin, norm, act, act).1;
                }
                let lin = renamed(li, "recompute");
                let pr = format!("{p} (recompute)");
                let act = Lifetime::Activation;
                recomputed = layer_forward(&mut b, &pr, xr, &lin, norms[li], act, act).0;
                &recomputed
            }
        };
        let lin = &lins[li];
        let (w_an, w_fn) = norms[li];
        let grad = |b: &mut GraphBuilder, n: &str, shape: &[usize]| {
            b.tensor(format!("{p}.{n}.grad"), shape, bf16, Lifetime::Gradient)
        };
        let d_h2 = grad(&mut b, "mlp_norm.out", &[t, d]);
        match l.mlp {
            Some([gate, up, act]) => {
                let d_act = grad(&mut b, "mlp.act", &[t, i]);
                backward(&mut b, &lin[6], dx, act, l.la[6], d_act, false);
                let d_gate = grad(&mut b, "mlp.gate", &[t, i]);
                let d_up = grad(&mut b, "mlp.up", &[t, i]);
                b.node(Node::kernel(
                    format!("{p} swiglu backward"),
                    &[gate, up, d_act],
                    &[d_gate, d_up],
                ));
                backward(&mut b, &lin[4], d_gate, l.h2, l.la[4], d_h2, false);
                backward(&mut b, &lin[5], d_up, l.h2, l.la[5], d_h2, true);
            }
            None => {
                // Per tile: gate, up, act recomputed, then down, swiglu, gate and up backward.
                let mut writes = vec![d_h2];
                for lp in &lin[4..] {
                    writes.extend([lp.grad_a, lp.grad_b]);
                }
                let names = ["gate", "up", "act", "act.grad", "gate.grad", "up.grad"];
                writes.extend(mlp_tile_scratch(&mut b, &p, &names));
                writes.push(b.tensor(
                    format!("{p}.mlp.d_lora_xA"),
                    &[tm, r],
                    bf16,
                    Lifetime::Scratch,
                ));
                let reads = mlp_reads(&[l.h2, dx, l.la[4], l.la[5], l.la[6]], lin);
                b.node(
                    Node::kernel(
                        format!("{p} mlp backward ({tiles} tiles, recomputing each)"),
                        &reads,
                        &writes,
                    )
                    .with_flops(mlp_bwd_flops),
                );
            }
        }
        let dx_mid = grad(&mut b, "attn_residual", &[t, d]);
        b.node(Node::kernel(
            format!("{p} mlp rmsnorm backward"),
            &[l.x_mid, l.rstd2, w_fn, d_h2, dx],
            &[dx_mid],
        ));
        let d_o = grad(&mut b, "attn.out", &[t, qd]);
        backward(&mut b, &lin[3], dx_mid, l.o, l.la[3], d_o, false);
        let dq = grad(&mut b, "q", &[t, qd]);
        let dk = grad(&mut b, "k", &[t, kvd]);
        let dv = grad(&mut b, "v", &[t, kvd]);
        let delta = b.tensor(
            format!("{p}.attn.delta"),
            &[s.heads, t],
            DType::F32,
            Lifetime::Scratch,
        );
        b.node(
            Node::kernel(
                format!("{p} attention backward"),
                &[l.q, l.k, l.v, l.o, l.lse, d_o],
                &[dq, dk, dv, delta],
            )
            .with_flops(2.5 * attn_flops),
        );
        b.node(Node::kernel(
            format!("{p} rope backward"),
            &[dq, dk, rope],
            &[dq, dk],
        ));
        let d_hn = grad(&mut b, "attn_norm.out", &[t, d]);
        backward(&mut b, &lin[0], dq, l.hn, l.la[0], d_hn, false);
        backward(&mut b, &lin[1], dk, l.hn, l.la[1], d_hn, true);
        backward(&mut b, &lin[2], dv, l.hn, l.la[2], d_hn, true);
        let dx_prev = grad(&mut b, "input", &[t, d]);
        b.node(Node::kernel(
            format!("{p} attn rmsnorm backward"),
            &[l.x, l.rstd, w_an, d_hn, dx_mid],
            &[dx_prev],
        ));
        dx = dx_prev;
    }
    for n in opt_nodes {
        b.node(n);
    }
    b.build()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(preset: Preset, mode: Mode, budget: Option<f64>) -> PlanArgs {
        PlanArgs {
            preset: Some(preset),
            hidden: None,
            intermediate: None,
            layers: None,
            heads: None,
            kv_heads: None,
            vocab: None,
            tied: false,
            seq: 2048,
            batch: 1,
            lora_r: 16,
            mode,
            verbose: false,
            vram_budget_gib: budget,
            host_budget_gib: None,
            checkpoint_layers: None,
        }
    }

    #[test]
    fn presets_build_and_plan() {
        for preset in [Preset::Smollm2_135m, Preset::Llama32_1b] {
            for mode in [Mode::Lora, Mode::Qlora] {
                let s = args(preset, mode, None).shape().unwrap();
                let g = llama_step(&s).unwrap();
                let p = plan(&g, &PlanOptions::default()).unwrap();
                assert!(p.arena_bytes > 0);
            }
        }
    }

    #[test]
    fn weight_bytes_follow_the_shape() {
        let s = args(Preset::Llama32_1b, Mode::Lora, None).shape().unwrap();
        let g = llama_step(&s).unwrap();
        let bytes = |lt| -> usize {
            g.tensors
                .iter()
                .filter(|t| t.lifetime == lt)
                .map(|t| t.bytes())
                .sum()
        };
        // Llama-3.2-1B: 1.236e9 parameters (tied), bf16.
        let w = bytes(Lifetime::Weight) as f64;
        assert!((w / 2.0 - 1.236e9).abs() / 1.236e9 < 0.02, "{w}");
        let q = llama_step(&args(Preset::Llama32_1b, Mode::Qlora, None).shape().unwrap()).unwrap();
        let wq: usize = q
            .tensors
            .iter()
            .filter(|t| t.lifetime == Lifetime::Weight)
            .map(|t| t.bytes())
            .sum();
        assert!((wq as f64) < w * 0.5);
    }

    #[test]
    fn long_batches_run_the_mlp_in_row_tiles() {
        let mut a = args(Preset::Smollm2_135m, Mode::Qlora, None);
        let short = llama_step(&a.shape().unwrap()).unwrap();
        a.seq = 4 * MLP_TILE_ROWS + 5;
        let long = llama_step(&a.shape().unwrap()).unwrap();
        let has = |g: &Graph, s: &str| g.nodes.iter().any(|n| n.name.contains(s));
        assert!(!has(&short, "tiles") && has(&short, "swiglu backward"));
        assert!(has(&long, "layers.0 mlp (5 tiles of 4096 rows)"));
        assert!(has(
            &long,
            "layers.0 mlp backward (5 tiles, recomputing each)"
        ));
        // No (T, I) tensor exists: the MLP's intermediates are one tile's.
        let i = a.shape().unwrap().intermediate;
        let t = a.seq;
        assert!(long.tensors.iter().all(|x| x.shape != [t, i]));
        assert!(long
            .tensors
            .iter()
            .any(|x| x.shape == [MLP_TILE_ROWS, i] && x.lifetime == Lifetime::Scratch));
        assert!(plan(&long, &PlanOptions::default()).unwrap().arena_bytes > 0);
    }

    #[test]
    fn a_host_budget_bounds_the_offloads() {
        let mut a = args(Preset::Llama31_8b, Mode::Qlora, Some(40.0));
        a.seq = 65536;
        assert!(run(&a).is_ok());
        a.host_budget_gib = Some(1.0);
        let err = run(&a).unwrap_err();
        assert!(err.contains("does not fit the host"), "{err}");
    }

    #[test]
    fn checkpointed_steps_save_only_segment_inputs() {
        let mut a = args(Preset::Smollm2_135m, Mode::Lora, None);
        let saved = |g: &Graph| {
            g.tensors
                .iter()
                .filter(|t| t.lifetime == Lifetime::Saved)
                .count()
        };
        let full = llama_step(&a.shape().unwrap()).unwrap();
        let full_plan = plan(&full, &PlanOptions::default()).unwrap();
        let layers = a.shape().unwrap().layers; // 30
        for k in [1, 3, 7] {
            a.checkpoint_layers = Some(k);
            let g = llama_step(&a.shape().unwrap()).unwrap();
            // layer 0's input, every K-th layer's output and the last one's, the final norm's
            // output and rstd
            let outputs = (0..layers)
                .filter(|li| (li + 1) % k == 0 || li + 1 == layers)
                .count();
            assert_eq!(saved(&g), 1 + outputs + 2, "K = {k}");
            // the backward re-runs layer l's forward and the l % K layers before it in its segment
            let reruns = |l: usize| {
                g.nodes
                    .iter()
                    .filter(|n| {
                        n.name.starts_with(&format!("layers.{l} ("))
                            && n.name.ends_with("attention")
                    })
                    .count()
            };
            for l in [0, layers - 1] {
                let later_in_segment = (l + 1..layers).take_while(|j| j / k == l / k).count();
                assert_eq!(reruns(l), 1 + later_in_segment, "K = {k}, layer {l}");
            }
            let p = plan(&g, &PlanOptions::default()).unwrap();
            assert!(p.arena_bytes < full_plan.arena_bytes, "K = {k}");
            let cost = CostModel::H200;
            assert!(
                estimate(&g, &p, &cost).compute_s > estimate(&full, &full_plan, &cost).compute_s
            );
        }
    }

    #[test]
    fn a_million_token_step_fits_an_h200_with_checkpoints() {
        let mut a = args(Preset::Llama31_8b, Mode::Qlora, Some(141.0));
        a.seq = 1 << 20;
        a.host_budget_gib = Some(0.0);
        let err = run(&a).unwrap_err();
        assert!(err.contains("--checkpoint-layers"), "{err}");
        a.checkpoint_layers = Some(8);
        assert!(run(&a).is_ok());
    }

    #[test]
    fn tight_budget_offloads_and_impossible_budget_fails() {
        let a = args(Preset::Smollm2_135m, Mode::Lora, None);
        let g = llama_step(&a.shape().unwrap()).unwrap();
        let full = plan(&g, &PlanOptions::default()).unwrap();
        let tight = plan(
            &g,
            &PlanOptions::default().with_budget(full.arena_bytes * 3 / 4),
        )
        .unwrap();
        assert!(!tight.offloads.is_empty() || !tight.recomputes.is_empty());
        let err = run(&args(Preset::Llama31_8b, Mode::Lora, Some(4.0))).unwrap_err();
        assert!(
            err.contains("does not fit") && err.contains("largest tensors"),
            "{err}"
        );
    }
}
