//! The forward of a Llama-family model as one graph of the runtime's graph API
//! ([`ftrt_runtime::graph`]), composed only of ops (the ops crate's kernels, each with its CPU
//! reference and its GPU launcher, and GEMM nodes), that both executors run: the
//! [`ftrt_runtime::CpuExecutor`] on the host and the [`ftrt_runtime::CudaExecutor`] on the GPU
//! (eager, or each phase captured once and replayed as a CUDA graph).
//!
//! The graph holds two phases, two step shapes over the same weights and KV caches (the
//! planner lets their activations share memory), each run on its own
//! ([`ftrt_runtime::CpuExecutor::run_nodes`], [`ftrt_runtime::CudaExecutor::capture_nodes`]):
//! - `prefill`: up to `prefill_rows` prompt tokens (several prompts packed), the logits of
//!   up to S picked rows (each prompt's last);
//! - `decode`: one row per cache slot (S rows), the logits of every row.
//!
//! A step's rows each carry a token, a cache slot and a position: every layer stores the
//! rows' keys and values into its KV cache first, then each row attends to its slot's keys
//! 0..=position (`decode_attention`: causal within a prompt chunk, the whole history when
//! decoding). Unused rows are padding: token 0 at position 0 of a spare slot, ignored.
//! The next token of each logit row is picked on the device (greedy, or a Gumbel-max draw at
//! a temperature), so a step downloads L tokens, not L x V logits.
//!
//! Tensors (T = the element type, f32 or bf16; step inputs and caches are whole-step tensors,
//! so the caches persist from step to step in the executor's arena):
//! - per phase, inputs (N) i32 `ids`, `pos`, `slot`, `len` (= pos + 1), prefill's `picks`
//!   (S) i32; `sampling` (16) u8 (shared);
//! - weights (T): the checkpoint's (projections with a LoRA adapter merged: W + s B A), RoPE
//!   cos / sin (P, D) for positions 0..P;
//! - per layer the caches `kc`, `vc` (S + 1, Hkv, P, D) T, the last slot for padding;
//! - per phase, activations (N, ...) T, logits (L, V) f32 and the next tokens (L) i32.
//!
//! On the CPU, bf16 tensors are widened to f32 for each op and its outputs rounded back (the
//! GPU's f32 arithmetic between bf16 stores); an f32 graph computes in f32 throughout.

mod nodes;
mod steps;

pub use steps::{capture_phases, write_step, GraphSteps, StepExecutor};

use std::borrow::Cow;
use std::collections::HashMap;
use std::ops::Range;

use ftrt_ops::attention::{self, AttentionDims};
use ftrt_ops::decode::{self, CacheDims, QkvDims, SplitPlan};
use ftrt_ops::dsl::{Real, Rounding};
use ftrt_runtime::gemm::cpu::gemm;
use ftrt_runtime::graph::{Graph, GraphBuilder, Lifetime, Node, TensorId};
use ftrt_runtime::{DType, GemmDesc, RuntimeError};

use super::lora::LoraAdapter;
use super::model::LlamaModel;
use super::weights::Proj;
use super::LlamaError;
use nodes::*;

/// The forward graph of one model at one shape, and the tensors a caller writes and reads.
pub struct ForwardGraph {
    pub graph: Graph,
    /// Element type of weights, caches and activations (f32 or bf16; the GPU runs bf16).
    pub dtype: DType,
    /// S: cache slots (one more is allocated for padding rows); P: tokens per slot
    /// (positions 0..P).
    pub slots: usize,
    pub capacity: usize,
    /// V: logits per row.
    pub vocab: usize,
    /// Prompt chunks: up to `prefill.rows` tokens, the logits of up to S picked rows.
    pub prefill: Phase,
    /// The same for chunks of whole prompts (each from position 0), attending within the step
    /// by flash attention instead of reloading keys from the cache row by row; built where the
    /// head dim has flash kernels (64, 128).
    pub prefill_fresh: Option<Phase>,
    /// Decoding: one row per slot (S rows), the logits of each.
    pub decode: Phase,
    /// (16) u8: [the f32 bits of 1 / T (0: greedy), the seed] as two little-endian u64, read
    /// by both phases' device-side pick (see [`sampling_words`]).
    pub sampling: TensorId,
    /// (S + 1, Hkv, P, D) per layer.
    pub kc: Vec<TensorId>,
    pub vc: Vec<TensorId>,
    /// Every weight tensor and where its values come from.
    weights: Vec<(TensorId, WeightOf)>,
}

/// One step shape of the graph: its nodes, the inputs a caller writes and the outputs it reads.
#[derive(Debug, Clone)]
pub struct Phase {
    /// N: rows per step.
    pub rows: usize,
    /// L: rows whose logits the step computes (N when `picks` is None).
    pub logit_rows: usize,
    /// The phase's nodes, run (or captured and replayed) on their own.
    pub nodes: Range<usize>,
    /// (N) i32: token ids, positions, cache slots, attended lengths.
    pub ids: TensorId,
    pub pos: TensorId,
    pub slot: TensorId,
    pub len: TensorId,
    /// (L) i32: the rows whose logits are computed, in order (prefill).
    pub picks: Option<TensorId>,
    /// (S + 1) i32 prefix sums of the step's prompt segments, each starting at position 0,
    /// when the phase attends with flash attention within the step (`prefill_fresh`).
    pub cu_seqlens: Option<TensorId>,
    /// (L, V) f32 logits and each one's next token (L) i32, picked on the device.
    pub logits: TensorId,
    pub next: TensorId,
}

/// The two u64 words of [`ForwardGraph::sampling`]: 1 / T (0: greedy) and the seed.
pub fn sampling_words(inv_temp: f32, seed: u64) -> [u64; 2] {
    [inv_temp.to_bits() as u64, seed]
}

/// Where a weight tensor's values come from.
#[derive(Clone)]
enum WeightOf {
    /// A range of the model's weight store.
    Store(Range<usize>),
    /// Projection `p` of layer `l` (the adapter merged, if any).
    Proj(usize, Proj),
    /// Layer `l`'s q, k and v projections stacked, [Wq; Wk; Wv] (Hq D + 2 Hkv D, C), and
    /// their biases (zeros where a projection has none).
    Qkv(usize),
    QkvBias(usize),
    /// RoPE cos or sin (P, D) for positions 0..P.
    Cos,
    Sin,
}

/// The graph under construction: its weights (each declared once, by name, and shared by
/// both phases) and the phase being built.
struct Build {
    b: GraphBuilder,
    weights: Vec<(TensorId, WeightOf)>,
    by_name: HashMap<String, TensorId>,
    dtype: DType,
    /// Rows per step of the phase being built, and its name (prefixing its activations).
    n: usize,
    phase: &'static str,
}

impl Build {
    /// The weight tensor `name` (declared on first use) and where its values come from.
    fn weight(&mut self, name: &str, shape: &[usize], of: WeightOf) -> TensorId {
        if let Some(&t) = self.by_name.get(name) {
            return t;
        }
        let t = self.b.tensor(name, shape, self.dtype, Lifetime::Weight);
        self.weights.push((t, of));
        self.by_name.insert(name.to_string(), t);
        t
    }
    /// An activation (N, width) of the graph's dtype.
    fn act(&mut self, name: &str, width: usize) -> TensorId {
        let name = format!("{}.{name}", self.phase);
        self.b
            .tensor(name, &[self.n, width], self.dtype, Lifetime::Activation)
    }
    /// (rows) f32 reciprocal RMS of a norm.
    fn rstd(&mut self, name: &str, rows: usize) -> TensorId {
        let name = format!("{}.{name}", self.phase);
        self.b
            .tensor(name, &[rows], DType::F32, Lifetime::Activation)
    }
    /// A whole-step tensor of this phase (a step input).
    fn input(&mut self, name: &str, len: usize, dtype: DType) -> TensorId {
        let name = format!("{}.{name}", self.phase);
        self.b.tensor(name, &[len], dtype, Lifetime::Weight)
    }
}

/// The rows of one step: token, cache slot and position of each (at most the phase's rows).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepRow {
    pub token: u32,
    pub slot: usize,
    pub pos: usize,
}

/// (ids, pos, slot, len) of a step, padded to the phase's rows.
pub type StepInputs = (Vec<i32>, Vec<i32>, Vec<i32>, Vec<i32>);

/// What every phase shares: the model's shapes, the caches and the sampling parameters.
struct Shared<'m> {
    model: &'m LlamaModel,
    cd: CacheDims,
    rt: Rounding,
    cos: TensorId,
    sin: TensorId,
    embed: TensorId,
    sampling: TensorId,
    kc: Vec<TensorId>,
    vc: Vec<TensorId>,
}

impl ForwardGraph {
    /// Builds the graph of `model` for prompt steps of up to `prefill_rows` tokens and decoding
    /// steps of one token per slot, over `slots` sequences of up to `capacity` tokens each, in
    /// `dtype` (F32 or BF16).
    pub fn new(
        model: &LlamaModel,
        prefill_rows: usize,
        slots: usize,
        capacity: usize,
        dtype: DType,
    ) -> Result<Self, LlamaError> {
        let bad = |m: String| Err(LlamaError::Unsupported(m));
        if !matches!(dtype, DType::F32 | DType::BF16) {
            return bad(format!(
                "the forward graph runs in f32 or bf16, not {dtype}"
            ));
        }
        if prefill_rows == 0 || slots == 0 || capacity == 0 {
            return bad(format!(
                "the forward graph needs prefill rows, slots and capacity (got {prefill_rows}, {slots}, {capacity})"
            ));
        }
        if let Some(w) = model.config.sliding_window {
            if capacity > w {
                return bad(format!(
                    "the forward graph's cache attention has no sliding window: capacity {capacity} exceeds the window of {w}"
                ));
            }
        }
        let d = model.dims;
        if d.head_dim > decode::MAX_HEAD_DIM {
            return bad(format!(
                "head dim {}: the cache kernels take at most {}",
                d.head_dim,
                decode::MAX_HEAD_DIM
            ));
        }
        let cd = CacheDims::new(d.heads, d.kv_heads, d.head_dim, capacity);
        let ws = &model.weights;
        let mut g = Build {
            b: GraphBuilder::new(),
            weights: Vec::new(),
            by_name: HashMap::new(),
            dtype,
            n: 0,
            phase: "",
        };
        let embed = g.weight(
            "embed_tokens",
            &[d.vocab, d.hidden],
            WeightOf::Store(ws.embed.clone()),
        );
        let cos = g.weight("rope_cos", &[capacity, d.head_dim], WeightOf::Cos);
        let sin = g.weight("rope_sin", &[capacity, d.head_dim], WeightOf::Sin);
        let sampling = g.b.tensor("sampling", &[16], DType::U8, Lifetime::Weight);
        let cache_shape = [slots + 1, d.kv_heads, capacity, d.head_dim];
        let cache = |g: &mut Build, l: usize, what: &str| {
            g.b.tensor(
                format!("layers.{l}.{what}"),
                &cache_shape,
                dtype,
                Lifetime::Weight,
            )
        };
        let kc = (0..d.layers)
            .map(|l| cache(&mut g, l, "key_cache"))
            .collect();
        let vc = (0..d.layers)
            .map(|l| cache(&mut g, l, "value_cache"))
            .collect();
        let sh = Shared {
            model,
            cd,
            rt: match dtype {
                DType::BF16 => Rounding::BF16,
                _ => Rounding::F32,
            },
            cos,
            sin,
            embed,
            sampling,
            kc,
            vc,
        };
        let prefill = build_phase(
            &mut g,
            &sh,
            "prefill",
            prefill_rows,
            Some(slots),
            Attention::Cache,
        );
        let prefill_fresh = attention::HEAD_DIMS.contains(&d.head_dim).then(|| {
            let flash = Attention::Flash { segments: slots };
            build_phase(
                &mut g,
                &sh,
                "prefill_fresh",
                prefill_rows,
                Some(slots),
                flash,
            )
        });
        let decode = build_phase(&mut g, &sh, "decode", slots, None, Attention::Cache);
        let Build { b, weights, .. } = g;
        Ok(Self {
            graph: b
                .build()
                .map_err(|e| LlamaError::Unsupported(e.to_string()))?,
            dtype,
            slots,
            capacity,
            vocab: d.vocab,
            prefill,
            prefill_fresh,
            decode,
            sampling,
            kc: sh.kc,
            vc: sh.vc,
            weights,
        })
    }

    /// Calls `write(tensor, values)` for every weight tensor with its f32 values (the adapter
    /// merged into the projections it adapts: W + s B A); the caller stores them in the
    /// graph's dtype. Caches start as whatever the executor holds: only rows a step stored
    /// are ever read.
    pub fn for_each_weight(
        &self,
        model: &LlamaModel,
        lora: Option<&LoraAdapter>,
        mut write: impl FnMut(TensorId, &[f32]) -> Result<(), RuntimeError>,
    ) -> Result<(), RuntimeError> {
        let positions: Vec<i32> = (0..self.capacity as i32).collect();
        let (cos, sin) = model.rope_rows(&positions);
        // projection p of layer l, the adapter merged if it adapts it
        let proj = |l: usize, p: Proj| -> Cow<'_, [f32]> {
            let w = model.weights.get(&model.weights.layers[l].proj[p.index()]);
            match lora.and_then(|ad| Some((ad, ad.a(l, p)?, ad.b(l, p)?))) {
                Some((ad, a, bm)) => Cow::Owned(merged(w, a, bm, ad.r, ad.scale, model.rt)),
                None => Cow::Borrowed(w),
            }
        };
        const QKV: [Proj; 3] = [Proj::Q, Proj::K, Proj::V];
        for (t, of) in &self.weights {
            match of {
                WeightOf::Store(r) => write(*t, model.weights.get(r))?,
                WeightOf::Proj(l, p) => write(*t, &proj(*l, *p))?,
                WeightOf::Qkv(l) => write(*t, &QKV.map(|p| proj(*l, p)).concat())?,
                WeightOf::QkvBias(l) => {
                    let bias = QKV.map(|p| match &model.weights.layers[*l].bias[p.index()] {
                        Some(r) => model.weights.get(r).to_vec(),
                        None => vec![0.0; p.shape(&model.dims).0],
                    });
                    write(*t, &bias.concat())?
                }
                WeightOf::Cos => write(*t, &cos)?,
                WeightOf::Sin => write(*t, &sin)?,
            }
        }
        Ok(())
    }

    /// Every phase, in graph order.
    pub fn phases(&self) -> impl Iterator<Item = &Phase> {
        [
            Some(&self.prefill),
            self.prefill_fresh.as_ref(),
            Some(&self.decode),
        ]
        .into_iter()
        .flatten()
    }

    /// The step inputs (ids, pos, slot, len) of `rows` for `phase`, padded to its rows with
    /// token 0 at position 0 of the padding slot.
    pub fn step_inputs(&self, phase: &Phase, rows: &[StepRow]) -> Result<StepInputs, LlamaError> {
        if rows.len() > phase.rows {
            return Err(LlamaError::Input(format!(
                "{} rows in a step of a phase built for {}",
                rows.len(),
                phase.rows
            )));
        }
        if let Some(r) = rows
            .iter()
            .find(|r| r.slot >= self.slots || r.pos >= self.capacity)
        {
            return Err(LlamaError::Input(format!(
                "row {r:?} is outside the cache ({} slots of {} tokens)",
                self.slots, self.capacity
            )));
        }
        let pad = StepRow {
            token: 0,
            slot: self.slots,
            pos: 0,
        };
        let all = rows
            .iter()
            .chain(std::iter::repeat_n(&pad, phase.rows - rows.len()));
        let (mut ids, mut pos, mut slot, mut len) = (vec![], vec![], vec![], vec![]);
        for r in all {
            ids.push(r.token as i32);
            pos.push(r.pos as i32);
            slot.push(r.slot as i32);
            len.push(r.pos as i32 + 1);
        }
        Ok((ids, pos, slot, len))
    }
}

/// y (N, out) = x (N, inn) W^T (+ b) for the weight `{name}.weight` (and `{name}.bias`): a GEMM
/// node named by its kind, the last part of `name`, not its layer (a profile sums the layers'
/// GEMMs of one kind).
fn linear(
    g: &mut Build,
    name: &str,
    x: TensorId,
    (out, inn): (usize, usize),
    weight: WeightOf,
    bias: Option<WeightOf>,
) -> TensorId {
    let w = g.weight(&format!("{name}.weight"), &[out, inn], weight);
    let bias = bias.map(|b| g.weight(&format!("{name}.bias"), &[out], b));
    let y = g.act(name, out);
    let desc = GemmDesc::new(g.n, out, inn).transposed(false, true);
    let kind = name.rsplit('.').next().unwrap_or(name);
    g.b.node(Node::gemm(
        format!("{} GEMM {kind}", g.phase),
        desc,
        x,
        w,
        y,
        bias,
    ));
    y
}

/// Appends one phase: `n` rows per step through every layer, then the logits of all `n` rows
/// (`logit_rows` None) or of `logit_rows` rows picked by an input, and their next tokens.
fn build_phase(
    g: &mut Build,
    sh: &Shared<'_>,
    phase: &'static str,
    n: usize,
    logit_rows: Option<usize>,
    attention: Attention,
) -> Phase {
    let model = sh.model;
    let d = model.dims;
    let ws = &model.weights;
    let (c, hq, hkv, hd, inter, v) = (
        d.hidden,
        d.heads,
        d.kv_heads,
        d.head_dim,
        d.intermediate,
        d.vocab,
    );
    let (eps, rt, cd) = (model.config.rms_norm_eps as f32, sh.rt, sh.cd);
    (g.n, g.phase) = (n, phase);
    let first = g.b.node_count();
    let (ids, pos, slot, len) = (
        g.input("input_ids", n, DType::I32),
        g.input("positions", n, DType::I32),
        g.input("cache_slots", n, DType::I32),
        g.input("attended_lengths", n, DType::I32),
    );
    // the cache attention's split partials, or the flash attention's segments and lse
    let planned = match attention {
        Attention::Cache => {
            let split = SplitPlan::new(&cd, n);
            let scratch = g.b.tensor(
                format!("{phase}.decode_attention_scratch"),
                &[split.scratch_len(&cd, n)],
                DType::F32,
                Lifetime::Scratch,
            );
            PlannedAttention::Cache { split, scratch }
        }
        Attention::Flash { segments } => {
            let dims = AttentionDims::new(n, segments, hq, hkv, hd);
            let cu = g.input("cu_seqlens", segments + 1, DType::I32);
            let lse = g.b.tensor(
                format!("{phase}.lse"),
                &[hq * n],
                DType::F32,
                Lifetime::Scratch,
            );
            PlannedAttention::Flash { dims, cu, lse }
        }
    };

    let mut resid = g.act("embedding", c);
    g.b.node(embedding_node(
        "embedding",
        n,
        v,
        c,
        rt,
        ids,
        sh.embed,
        resid,
    ));
    let mut ln = g.act("layers.0.input_norm.out", c);
    let w0 = g.weight(
        "layers.0.input_layernorm",
        &[c],
        WeightOf::Store(ws.layers[0].input_norm.clone()),
    );
    let r0 = g.rstd("layers.0.input_norm.rstd", n);
    g.b.node(rms_norm_node(
        "layers.0.input_norm",
        n,
        c,
        eps,
        rt,
        resid,
        w0,
        ln,
        r0,
    ));
    for l in 0..d.layers {
        let lw = &ws.layers[l];
        let p = |s: &str| format!("layers.{l}.{s}");
        let project = |g: &mut Build, pr: Proj, x: TensorId| {
            let bias = lw.bias[pr.index()].clone().map(WeightOf::Store);
            linear(
                g,
                &pr.hf_prefix(l),
                x,
                pr.shape(&d),
                WeightOf::Proj(l, pr),
                bias,
            )
        };
        // q, k, v from one GEMM on [Wq; Wk; Wv] (decoding reads the three weights in one
        // pass instead of three narrow ones), split back into three tensors
        let qd = QkvDims {
            heads: hq,
            kv_heads: hkv,
            head_dim: hd,
            positions: cd.capacity,
        };
        let widths = qd.widths();
        let fused: usize = widths.iter().sum();
        let any_bias = [Proj::Q, Proj::K, Proj::V]
            .iter()
            .any(|pr| lw.bias[pr.index()].is_some());
        let bias = any_bias.then_some(WeightOf::QkvBias(l));
        let qkv = linear(
            g,
            &p("self_attn.qkv_proj"),
            ln,
            (fused, c),
            WeightOf::Qkv(l),
            bias,
        );
        let mut q = g.act(&p("q_proj"), widths[0]);
        let mut k = g.act(&p("k_proj"), widths[1]);
        let vv = g.act(&p("v_proj"), widths[2]);
        let rope = (pos, sh.cos, sh.sin);
        match (&lw.q_norm, &lw.k_norm) {
            // Qwen3: split, q/k norms, then RoPE
            (Some(qn), Some(kn)) => {
                g.b.node(split_qkv_node(
                    &p("split_qkv"),
                    n,
                    qd,
                    rt,
                    qkv,
                    None,
                    [q, k, vv],
                ));
                for (x, heads, norm_w, name) in
                    [(&mut q, hq, qn, "q_norm"), (&mut k, hkv, kn, "k_norm")]
                {
                    let w = g.weight(
                        &p(&format!("self_attn.{name}")),
                        &[hd],
                        WeightOf::Store(norm_w.clone()),
                    );
                    let y = g.act(&p(name), heads * hd);
                    let r = g.rstd(&p(&format!("{name}.rstd")), n * heads);
                    g.b.node(rms_norm_node(&p(name), n * heads, hd, eps, rt, *x, w, y, r));
                    *x = y;
                }
                for (x, heads, name) in [(q, hq, "rope_q"), (k, hkv, "rope_k")] {
                    let (pos, cos, sin) = rope;
                    g.b.node(rope_node(
                        &p(name),
                        n,
                        heads,
                        hd,
                        cd.capacity,
                        rt,
                        x,
                        pos,
                        cos,
                        sin,
                    ));
                }
            }
            // RoPE on the way out of the split
            _ => {
                let node =
                    split_qkv_node(&p("split_qkv_rope"), n, qd, rt, qkv, Some(rope), [q, k, vv]);
                g.b.node(node);
            }
        }
        let (kc, vc) = (sh.kc[l], sh.vc[l]);
        g.b.node(kv_store_node(
            &p("kv_store"),
            cd,
            n,
            rt,
            k,
            vv,
            slot,
            pos,
            kc,
            vc,
        ));
        let att = g.act(&p("attention"), hq * hd);
        match planned {
            PlannedAttention::Cache { split, scratch } => g.b.node(attention_node(
                &p("attention"),
                cd,
                split,
                n,
                rt,
                q,
                kc,
                vc,
                slot,
                len,
                scratch,
                att,
            )),
            PlannedAttention::Flash { dims, cu, lse } => g.b.node(flash_attention_node(
                &p("flash_attention"),
                dims,
                rt,
                [q, k, vv, cu],
                att,
                lse,
            )),
        };
        let o = project(g, Proj::O, att);
        let (ln2, mid) = (g.act(&p("post_norm.out"), c), g.act(&p("resid_mid"), c));
        let pw = g.weight(
            &p("post_attention_layernorm"),
            &[c],
            WeightOf::Store(lw.post_norm.clone()),
        );
        let r2 = g.rstd(&p("post_norm.rstd"), n);
        g.b.node(add_rms_norm_node(
            &p("post_norm"),
            n,
            c,
            eps,
            rt,
            o,
            resid,
            pw,
            ln2,
            mid,
            r2,
        ));
        let gate = project(g, Proj::Gate, ln2);
        let up = project(g, Proj::Up, ln2);
        let h = g.act(&p("swiglu"), inter);
        g.b.node(swiglu_node(&p("swiglu"), n * inter, rt, gate, up, h));
        let down = project(g, Proj::Down, h);
        let (next_w, next_name) = if l + 1 < d.layers {
            (
                ws.layers[l + 1].input_norm.clone(),
                format!("layers.{}.input_layernorm", l + 1),
            )
        } else {
            (ws.final_norm.clone(), "norm".to_string())
        };
        let nw = g.weight(&next_name, &[c], WeightOf::Store(next_w));
        let (ln_next, resid_next) = (g.act(&format!("{next_name}.out"), c), g.act(&p("out"), c));
        let r3 = g.rstd(&format!("{next_name}.rstd"), n);
        g.b.node(add_rms_norm_node(
            &p("residual_and_next_norm"),
            n,
            c,
            eps,
            rt,
            down,
            mid,
            nw,
            ln_next,
            resid_next,
            r3,
        ));
        ln = ln_next;
        resid = resid_next;
    }
    // prefill: only the picked rows (each prompt's last) go through the head
    let (l_rows, picks) = match logit_rows {
        Some(lr) => {
            let picks = g.input("logit_rows", lr, DType::I32);
            let x = g.b.tensor(
                format!("{phase}.picked_rows"),
                &[lr, c],
                g.dtype,
                Lifetime::Activation,
            );
            g.b.node(embedding_node("pick_rows", lr, n, c, rt, picks, ln, x));
            ln = x;
            (lr, Some(picks))
        }
        None => (n, None),
    };
    let head = match &ws.lm_head {
        Some(r) => g.weight("lm_head", &[v, c], WeightOf::Store(r.clone())),
        None => sh.embed,
    };
    let logits = g.b.tensor(
        format!("{phase}.logits"),
        &[l_rows, v],
        DType::F32,
        Lifetime::Activation,
    );
    let desc = GemmDesc::new(l_rows, v, c).transposed(false, true);
    g.b.node(Node::gemm(
        format!("{phase} GEMM lm_head"),
        desc,
        ln,
        head,
        logits,
        None,
    ));
    let next = g.b.tensor(
        format!("{phase}.next_tokens"),
        &[l_rows],
        DType::I32,
        Lifetime::Activation,
    );
    g.b.node(sample_node(l_rows, v, logits, sh.sampling, next));
    Phase {
        rows: n,
        logit_rows: l_rows,
        nodes: first..g.b.node_count(),
        ids,
        pos,
        slot,
        len,
        picks,
        cu_seqlens: match planned {
            PlannedAttention::Flash { cu, .. } => Some(cu),
            PlannedAttention::Cache { .. } => None,
        },
        logits,
        next,
    }
}

/// How a phase's rows attend.
#[derive(Clone, Copy)]
enum Attention {
    /// Over the cache: each row its slot's keys 0..=pos (any rows).
    Cache,
    /// Flash attention within the step: rows in up to `segments` runs of one slot each, every
    /// run starting at position 0 (whole prompts).
    Flash { segments: usize },
}

/// A phase's attention with its tensors.
#[derive(Clone, Copy)]
enum PlannedAttention {
    Cache {
        split: SplitPlan,
        scratch: TensorId,
    },
    Flash {
        dims: AttentionDims,
        cu: TensorId,
        lse: TensorId,
    },
}

/// W + s B A for W (out, in), A (r, in), B (out, r), rounded to the model's dtype.
fn merged(w: &[f32], a: &[f32], bm: &[f32], r: usize, s: f32, rt: Rounding) -> Vec<f32> {
    let inn = a.len() / r.max(1);
    let mut out = w.to_vec();
    let desc = GemmDesc::new(w.len() / inn.max(1), inn, r).scaled(s, 1.0);
    gemm::<f32>(&desc, bm, a, &mut out, None).expect("adapter shapes match the weight");
    out.iter_mut().for_each(|x| *x = x.round_to(rt.t));
    out
}
