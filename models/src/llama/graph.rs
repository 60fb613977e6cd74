//! The forward of a Llama-family model as one graph of the runtime's graph API
//! ([`ftrt_runtime::graph`]), composed only of ops (the ops crate's kernels, each with its CPU
//! reference and its GPU launcher, and GEMM nodes), that both executors run: the
//! [`ftrt_runtime::CpuExecutor`] on the host and the [`ftrt_runtime::CudaExecutor`] on the GPU
//! (eager, or captured once and replayed as a CUDA graph).
//!
//! One graph serves prefill and decoding. A step takes up to `rows` tokens, each with a cache
//! slot and a position: every layer stores the rows' keys and values into its KV cache first,
//! then each row attends to its slot's keys 0..=position (`decode_attention`: causal within a
//! prompt chunk, the whole history when decoding). A prompt of L tokens is one step of L rows
//! (several prompts pack into one step); a decoding step is one row per sequence. Unused rows
//! are padding: token 0 at position 0 of a spare slot, their logits ignored.
//!
//! Tensors (T = the element type, f32 or bf16; every step's inputs and the caches are
//! whole-step tensors, so the caches persist from step to step in the executor's arena):
//! - inputs (N) i32: `ids`, `pos`, `slot`, `len` (= pos + 1);
//! - weights (T): the checkpoint's (projections with a LoRA adapter merged: W + s B A), RoPE
//!   cos / sin (P, D) for positions 0..P;
//! - per layer the caches `kc`, `vc` (slots + 1, Hkv, P, D) T, the last slot for padding;
//! - activations (N, ...) T; logits (N, V) f32 and the greedy next tokens (N) i32.
//!
//! On the CPU, bf16 tensors are widened to f32 for each op and its outputs rounded back (the
//! GPU's f32 arithmetic between bf16 stores); an f32 graph computes in f32 throughout.

use std::borrow::Cow;
use std::ops::Range;

use ftrt_ops::decode::{self, CacheDims, SplitPlan};
use ftrt_ops::dsl::{Prec, Real, Rounding};
use ftrt_ops::{activation, embedding, norm, rope};
use ftrt_runtime::gemm::cpu::gemm;
use ftrt_runtime::graph::{CpuArgs, GpuArgs, Graph, GraphBuilder, Lifetime, Node, TensorId};
use ftrt_runtime::{DType, GemmDesc, Gpu, RuntimeError};
use half::bf16;

use super::lora::LoraAdapter;
use super::model::LlamaModel;
use super::weights::Proj;
use super::LlamaError;

/// The forward graph of one model at one shape, and the tensors a caller writes and reads.
pub struct ForwardGraph {
    pub graph: Graph,
    /// Element type of weights, caches and activations (f32 or bf16; the GPU runs bf16).
    pub dtype: DType,
    /// N: rows per step; S: cache slots (one more is allocated for padding rows); P: tokens
    /// per slot (positions 0..P).
    pub rows: usize,
    pub slots: usize,
    pub capacity: usize,
    /// V: logits per row.
    pub vocab: usize,
    /// (N) i32 step inputs: token ids, positions, cache slots, attended lengths.
    pub ids: TensorId,
    pub pos: TensorId,
    pub slot: TensorId,
    pub len: TensorId,
    /// (N, V) f32, and each row's greedy next token (N) i32 (the first index of its largest
    /// logit, picked on the device: a decoding step downloads N tokens, not N x V logits).
    pub logits: TensorId,
    pub next: TensorId,
    /// (slots + 1, Hkv, P, D) per layer.
    pub kc: Vec<TensorId>,
    pub vc: Vec<TensorId>,
    /// Every weight tensor and where its values come from.
    weights: Vec<(TensorId, WeightOf)>,
}

/// Where a weight tensor's values come from.
#[derive(Clone)]
enum WeightOf {
    /// A range of the model's weight store.
    Store(Range<usize>),
    /// Projection `p` of layer `l` (the adapter merged, if any).
    Proj(usize, Proj),
    /// RoPE cos or sin (P, D) for positions 0..P.
    Cos,
    Sin,
}

/// The graph under construction and its weight list.
struct Build {
    b: GraphBuilder,
    weights: Vec<(TensorId, WeightOf)>,
    dtype: DType,
    /// Rows per step.
    n: usize,
}

impl Build {
    /// A weight tensor and where its values come from.
    fn weight(&mut self, name: &str, shape: &[usize], of: WeightOf) -> TensorId {
        let t = self.b.tensor(name, shape, self.dtype, Lifetime::Weight);
        self.weights.push((t, of));
        t
    }
    /// An activation (N, width) of the graph's dtype.
    fn act(&mut self, name: &str, width: usize) -> TensorId {
        self.b
            .tensor(name, &[self.n, width], self.dtype, Lifetime::Activation)
    }
    /// (rows) f32 reciprocal RMS of a norm.
    fn rstd(&mut self, name: &str, rows: usize) -> TensorId {
        self.b
            .tensor(name, &[rows], DType::F32, Lifetime::Activation)
    }
}

/// The rows of one step: token, cache slot and position of each (at most [`ForwardGraph::rows`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepRow {
    pub token: u32,
    pub slot: usize,
    pub pos: usize,
}

/// (ids, pos, slot, len) of a step, padded to the graph's rows.
pub type StepInputs = (Vec<i32>, Vec<i32>, Vec<i32>, Vec<i32>);

impl ForwardGraph {
    /// Builds the graph of `model` for steps of up to `rows` tokens over `slots` sequences of
    /// up to `capacity` tokens each, in `dtype` (F32 or BF16).
    pub fn new(
        model: &LlamaModel,
        rows: usize,
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
        if rows == 0 || slots == 0 || capacity == 0 {
            return bad(format!(
                "the forward graph needs rows, slots and capacity (got {rows}, {slots}, {capacity})"
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
        let (c, hq, hkv, hd, inter, v) = (
            d.hidden,
            d.heads,
            d.kv_heads,
            d.head_dim,
            d.intermediate,
            d.vocab,
        );
        if hd > decode::MAX_HEAD_DIM {
            return bad(format!(
                "head dim {hd}: the cache kernels take at most {}",
                decode::MAX_HEAD_DIM
            ));
        }
        let n = rows;
        let eps = model.config.rms_norm_eps as f32;
        let rt = match dtype {
            DType::BF16 => Rounding::BF16,
            _ => Rounding::F32,
        };
        let cd = CacheDims {
            heads: hq,
            kv_heads: hkv,
            head_dim: hd,
            capacity,
            scale: 1.0 / (hd as f32).sqrt(),
        };
        let split = SplitPlan::new(&cd, n);
        let ws = &model.weights;
        let mut g = Build {
            b: GraphBuilder::new(),
            weights: Vec::new(),
            dtype,
            n,
        };
        let input =
            |g: &mut Build, name: &str| g.b.tensor(name, &[n], DType::I32, Lifetime::Weight);
        let (ids, pos, slot, len) = (
            input(&mut g, "input_ids"),
            input(&mut g, "positions"),
            input(&mut g, "cache_slots"),
            input(&mut g, "attended_lengths"),
        );
        let embed = g.weight("embed_tokens", &[v, c], WeightOf::Store(ws.embed.clone()));
        let cos = g.weight("rope_cos", &[capacity, hd], WeightOf::Cos);
        let sin = g.weight("rope_sin", &[capacity, hd], WeightOf::Sin);
        let scratch = g.b.tensor(
            "decode_attention_scratch",
            &[split.scratch_len(&cd, n)],
            DType::F32,
            Lifetime::Scratch,
        );

        let mut resid = g.act("embedding", c);
        g.b.node(embedding_node(n, v, c, rt, ids, embed, resid));
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
        let (mut kc, mut vc) = (Vec::new(), Vec::new());
        for l in 0..d.layers {
            let lw = &ws.layers[l];
            let p = |s: &str| format!("layers.{l}.{s}");
            let project = |g: &mut Build, pr: Proj, x: TensorId| {
                let (out, inn) = pr.shape(&d);
                let name = pr.hf_prefix(l);
                let w = g.weight(
                    &format!("{name}.weight"),
                    &[out, inn],
                    WeightOf::Proj(l, pr),
                );
                let bias = lw.bias[pr.index()]
                    .as_ref()
                    .map(|r| g.weight(&format!("{name}.bias"), &[out], WeightOf::Store(r.clone())));
                let y = g.act(&name, out);
                let desc = GemmDesc::new(n, out, inn).transposed(false, true);
                g.b.node(Node::gemm(name, desc, x, w, y, bias));
                y
            };
            let mut q = project(&mut g, Proj::Q, ln);
            let mut k = project(&mut g, Proj::K, ln);
            let vv = project(&mut g, Proj::V, ln);
            if let (Some(qn), Some(kn)) = (&lw.q_norm, &lw.k_norm) {
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
            }
            for (x, heads, name) in [(q, hq, "rope_q"), (k, hkv, "rope_k")] {
                g.b.node(rope_node(
                    &p(name),
                    n,
                    heads,
                    hd,
                    capacity,
                    rt,
                    x,
                    pos,
                    cos,
                    sin,
                ));
            }
            let cache_shape = [slots + 1, hkv, capacity, hd];
            kc.push(g.b.tensor(p("key_cache"), &cache_shape, dtype, Lifetime::Weight));
            vc.push(g.b.tensor(p("value_cache"), &cache_shape, dtype, Lifetime::Weight));
            g.b.node(kv_store_node(
                &p("kv_store"),
                cd,
                n,
                rt,
                k,
                vv,
                slot,
                pos,
                kc[l],
                vc[l],
            ));
            let att = g.act(&p("attention"), hq * hd);
            g.b.node(attention_node(
                &p("attention"),
                cd,
                split,
                n,
                rt,
                q,
                kc[l],
                vc[l],
                slot,
                len,
                scratch,
                att,
            ));
            let o = project(&mut g, Proj::O, att);
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
            let gate = project(&mut g, Proj::Gate, ln2);
            let up = project(&mut g, Proj::Up, ln2);
            let h = g.act(&p("swiglu"), inter);
            g.b.node(swiglu_node(&p("swiglu"), n * inter, rt, gate, up, h));
            let down = project(&mut g, Proj::Down, h);
            let (next_w, next_name) = if l + 1 < d.layers {
                (
                    ws.layers[l + 1].input_norm.clone(),
                    format!("layers.{}.input_layernorm", l + 1),
                )
            } else {
                (ws.final_norm.clone(), "norm".to_string())
            };
            let nw = g.weight(&next_name, &[c], WeightOf::Store(next_w));
            let (ln_next, resid_next) =
                (g.act(&format!("{next_name}.out"), c), g.act(&p("out"), c));
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
        let head = match &ws.lm_head {
            Some(r) => g.weight("lm_head", &[v, c], WeightOf::Store(r.clone())),
            None => embed,
        };
        let logits =
            g.b.tensor("logits", &[n, v], DType::F32, Lifetime::Activation);
        let desc = GemmDesc::new(n, v, c).transposed(false, true);
        g.b.node(Node::gemm("lm_head", desc, ln, head, logits, None));
        let next =
            g.b.tensor("next_tokens", &[n], DType::I32, Lifetime::Activation);
        g.b.node(greedy_node(n, v, logits, next));
        let Build { b, weights, .. } = g;
        Ok(Self {
            graph: b
                .build()
                .map_err(|e| LlamaError::Unsupported(e.to_string()))?,
            dtype,
            rows,
            slots,
            capacity,
            vocab: v,
            ids,
            pos,
            slot,
            len,
            logits,
            next,
            kc,
            vc,
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
        for (t, of) in &self.weights {
            match of {
                WeightOf::Store(r) => write(*t, model.weights.get(r))?,
                WeightOf::Proj(l, p) => {
                    let w = model.weights.get(&model.weights.layers[*l].proj[p.index()]);
                    match lora.and_then(|ad| Some((ad, ad.a(*l, *p)?, ad.b(*l, *p)?))) {
                        Some((ad, a, bm)) => {
                            write(*t, &merged(w, a, bm, ad.r, ad.scale, model.rt))?
                        }
                        None => write(*t, w)?,
                    }
                }
                WeightOf::Cos => write(*t, &cos)?,
                WeightOf::Sin => write(*t, &sin)?,
            }
        }
        Ok(())
    }

    /// The step inputs (ids, pos, slot, len) of `rows`, padded to the graph's rows with token 0
    /// at position 0 of the padding slot.
    pub fn step_inputs(&self, rows: &[StepRow]) -> Result<StepInputs, LlamaError> {
        if rows.len() > self.rows {
            return Err(LlamaError::Input(format!(
                "{} rows in a step of the forward graph built for {}",
                rows.len(),
                self.rows
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
            .chain(std::iter::repeat_n(&pad, self.rows - rows.len()));
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

/// W + s B A for W (out, in), A (r, in), B (out, r), rounded to the model's dtype.
fn merged(w: &[f32], a: &[f32], bm: &[f32], r: usize, s: f32, rt: Rounding) -> Vec<f32> {
    let inn = a.len() / r.max(1);
    let mut out = w.to_vec();
    let desc = GemmDesc::new(w.len() / inn.max(1), inn, r).scaled(s, 1.0);
    gemm::<f32>(&desc, bm, a, &mut out, None).expect("adapter shapes match the weight");
    out.iter_mut().for_each(|x| *x = x.round_to(rt.t));
    out
}

// ------------------------------------------------------------------ node builders
// Each op node carries its CPU reference (on f32 views) and its GPU launcher (bf16 tensors).

/// Input `i` of a CPU kernel as f32 values (bf16 widened; f32 borrowed, not copied: the
/// embedding table is an input of every step).
fn floats<'a>(args: &'a CpuArgs<'_>, i: usize, rt: Rounding) -> Cow<'a, [f32]> {
    match rt.t {
        Prec::Bf16 => Cow::Owned(widen(args.inputs[i])),
        _ => Cow::Borrowed(bytemuck::cast_slice::<u8, f32>(args.inputs[i])),
    }
}

/// Output `i`'s current values as f32 (for in-place ops).
fn current(args: &CpuArgs<'_>, i: usize, rt: Rounding) -> Vec<f32> {
    match rt.t {
        Prec::Bf16 => widen(args.outputs[i]),
        _ => bytemuck::cast_slice::<u8, f32>(args.outputs[i]).to_vec(),
    }
}

/// bf16 bytes as f32 values.
fn widen(bytes: &[u8]) -> Vec<f32> {
    bytemuck::cast_slice::<u8, bf16>(bytes)
        .iter()
        .map(|v| v.to_f32())
        .collect()
}

/// Stores f32 values into output `i` of the graph's element type (bf16: nearest even).
fn store(args: &mut CpuArgs<'_>, i: usize, rt: Rounding, v: &[f32]) {
    match rt.t {
        Prec::Bf16 => {
            for (d, x) in args.output::<bf16>(i).iter_mut().zip(v) {
                *d = bf16::from_f32(*x);
            }
        }
        _ => args.output::<f32>(i).copy_from_slice(v),
    }
}

/// A kernel node with its CPU reference and GPU launcher.
fn kernel(
    name: &str,
    reads: &[TensorId],
    writes: &[TensorId],
    cpu: impl Fn(&mut CpuArgs<'_>) -> Result<(), RuntimeError> + Send + Sync + 'static,
    gpu: impl Fn(&Gpu, &GpuArgs) -> Result<(), RuntimeError> + Send + Sync + 'static,
) -> Node {
    Node::kernel(name, reads, writes)
        .with_cpu(cpu)
        .with_gpu(gpu)
}

/// out (N, C) = table[ids].
fn embedding_node(
    n: usize,
    v: usize,
    c: usize,
    rt: Rounding,
    ids: TensorId,
    table: TensorId,
    out: TensorId,
) -> Node {
    let d = embedding::embedding::Dims { N: n, V: v, C: c };
    kernel(
        "embedding",
        &[ids, table],
        &[out],
        move |a| {
            let mut y = vec![0f32; n * c];
            embedding::embedding::forward_cpu(&d, a.input::<i32>(0), &floats(a, 1, rt), &mut y, rt);
            store(a, 0, rt, &y);
            Ok(())
        },
        move |gpu, a| embedding::embedding::forward(gpu, &d, a.input(0), a.input(1), a.output(0)),
    )
}

/// y (R, C), rstd (R) = rms_norm(x) w.
#[allow(clippy::too_many_arguments)]
fn rms_norm_node(
    name: &str,
    r: usize,
    c: usize,
    eps: f32,
    rt: Rounding,
    x: TensorId,
    w: TensorId,
    y: TensorId,
    rstd: TensorId,
) -> Node {
    let d = norm::rms_norm::Dims { R: r, C: c };
    kernel(
        name,
        &[x, w],
        &[y, rstd],
        move |a| {
            let (mut yv, mut rs) = (vec![0f32; r * c], vec![0f32; r]);
            norm::rms_norm::forward_cpu(
                &d,
                eps,
                &floats(a, 0, rt),
                &floats(a, 1, rt),
                &mut yv,
                &mut rs,
                rt,
            );
            store(a, 0, rt, &yv);
            a.output::<f32>(1).copy_from_slice(&rs);
            Ok(())
        },
        move |gpu, a| {
            norm::rms_norm::forward(
                gpu,
                &d,
                eps,
                a.input(0),
                a.input(1),
                a.output(0),
                a.output(1),
            )
        },
    )
}

/// h = x + res; y = rms_norm(h) w (and rstd).
#[allow(clippy::too_many_arguments)]
fn add_rms_norm_node(
    name: &str,
    r: usize,
    c: usize,
    eps: f32,
    rt: Rounding,
    x: TensorId,
    res: TensorId,
    w: TensorId,
    y: TensorId,
    h: TensorId,
    rstd: TensorId,
) -> Node {
    let d = norm::add_rms_norm::Dims { R: r, C: c };
    kernel(
        name,
        &[x, res, w],
        &[y, h, rstd],
        move |a| {
            let (mut yv, mut hv, mut rs) = (vec![0f32; r * c], vec![0f32; r * c], vec![0f32; r]);
            let (xv, rv, wv) = (floats(a, 0, rt), floats(a, 1, rt), floats(a, 2, rt));
            norm::add_rms_norm::forward_cpu(&d, eps, &xv, &rv, &wv, &mut yv, &mut hv, &mut rs, rt);
            store(a, 0, rt, &yv);
            store(a, 1, rt, &hv);
            a.output::<f32>(2).copy_from_slice(&rs);
            Ok(())
        },
        move |gpu, a| {
            norm::add_rms_norm::forward(
                gpu,
                &d,
                eps,
                a.input(0),
                a.input(1),
                a.input(2),
                a.output(0),
                a.output(1),
                a.output(2),
            )
        },
    )
}

/// RoPE in place on x (N, H, D) at positions `pos` from cos / sin (P, D).
#[allow(clippy::too_many_arguments)]
fn rope_node(
    name: &str,
    n: usize,
    h: usize,
    hd: usize,
    p: usize,
    rt: Rounding,
    x: TensorId,
    pos: TensorId,
    cos: TensorId,
    sin: TensorId,
) -> Node {
    let d = rope::rope::Dims {
        N: n,
        H: h,
        D: hd,
        P: p,
    };
    kernel(
        name,
        &[pos, cos, sin],
        &[x],
        move |a| {
            let mut xv = current(a, 0, rt);
            rope::rope::forward_cpu(
                &d,
                &mut xv,
                a.input::<i32>(0),
                &floats(a, 1, rt),
                &floats(a, 2, rt),
                rt,
            );
            store(a, 0, rt, &xv);
            Ok(())
        },
        move |gpu, a| rope::rope::forward(gpu, &d, a.output(0), a.input(0), a.input(1), a.input(2)),
    )
}

/// kc[slot, :, pos] = k, vc[slot, :, pos] = v for every row (in place on the caches).
#[allow(clippy::too_many_arguments)]
fn kv_store_node(
    name: &str,
    cd: CacheDims,
    n: usize,
    rt: Rounding,
    k: TensorId,
    v: TensorId,
    slot: TensorId,
    pos: TensorId,
    kc: TensorId,
    vc: TensorId,
) -> Node {
    kernel(
        name,
        &[k, v, slot, pos],
        &[kc, vc],
        move |a| {
            // the op's CPU reference: on the f32 caches in place; bf16 caches widened first
            if rt.t == Prec::Bf16 {
                let (mut kc, mut vc) = (current(a, 0, rt), current(a, 1, rt));
                let (k, v) = (floats(a, 0, rt), floats(a, 1, rt));
                decode::kv_store_cpu(&cd, &k, &v, a.input(2), a.input(3), &mut kc, &mut vc);
                store(a, 0, rt, &kc);
                store(a, 1, rt, &vc);
            } else {
                let CpuArgs { inputs, outputs } = a;
                let f = |i: usize| bytemuck::cast_slice::<u8, f32>(inputs[i]);
                let i32s = |i: usize| bytemuck::cast_slice::<u8, i32>(inputs[i]);
                let [kc, vc] = &mut outputs[..] else {
                    return Err(RuntimeError::Graph("kv_store writes two caches".into()));
                };
                let (kc, vc) = (bytemuck::cast_slice_mut(kc), bytemuck::cast_slice_mut(vc));
                decode::kv_store_cpu::<f32>(&cd, f(0), f(1), i32s(2), i32s(3), kc, vc);
            }
            Ok(())
        },
        move |gpu, a| {
            decode::kv_store(
                gpu,
                &cd,
                n,
                a.input(0),
                a.input(1),
                a.input(2),
                a.input(3),
                a.output(0),
                a.output(1),
            )
        },
    )
}

/// out (N, Hq, D): each row's attention over its slot's first `len` cached keys.
#[allow(clippy::too_many_arguments)]
fn attention_node(
    name: &str,
    cd: CacheDims,
    split: SplitPlan,
    n: usize,
    rt: Rounding,
    q: TensorId,
    kc: TensorId,
    vc: TensorId,
    slot: TensorId,
    len: TensorId,
    scratch: TensorId,
    out: TensorId,
) -> Node {
    kernel(
        name,
        &[q, kc, vc, slot, len],
        &[scratch, out],
        move |a| {
            let mut o = vec![0f32; n * cd.heads * cd.head_dim];
            let (qv, kv, vv) = (floats(a, 0, rt), floats(a, 1, rt), floats(a, 2, rt));
            decode::decode_attention_cpu::<f32>(
                &cd,
                &qv,
                &kv,
                &vv,
                a.input::<i32>(3),
                a.input::<i32>(4),
                &mut o,
            );
            store(a, 1, rt, &o);
            Ok(())
        },
        move |gpu, a| {
            decode::decode_attention(
                gpu,
                &cd,
                &split,
                n,
                a.input(0),
                a.input(1),
                a.input(2),
                a.input(3),
                a.input(4),
                a.output(0),
                a.output(1),
            )
        },
    )
}

/// act = silu(gate) * up over `len` elements.
fn swiglu_node(
    name: &str,
    len: usize,
    rt: Rounding,
    gate: TensorId,
    up: TensorId,
    act: TensorId,
) -> Node {
    let d = activation::swiglu::Dims { N: len };
    kernel(
        name,
        &[gate, up],
        &[act],
        move |a| {
            let mut y = vec![0f32; len];
            activation::swiglu::forward_cpu(&d, &floats(a, 0, rt), &floats(a, 1, rt), &mut y, rt);
            store(a, 0, rt, &y);
            Ok(())
        },
        move |gpu, a| activation::swiglu::forward(gpu, &d, a.input(0), a.input(1), a.output(0)),
    )
}

/// next (N) i32 = the first index of each row's largest logit (N, V) f32.
fn greedy_node(n: usize, v: usize, logits: TensorId, next: TensorId) -> Node {
    kernel(
        "greedy",
        &[logits],
        &[next],
        move |a| {
            let picked = decode::sample_rows_cpu(a.input::<f32>(0), v, 0.0, 0);
            a.output::<i32>(0).copy_from_slice(&picked);
            Ok(())
        },
        move |gpu, a| decode::sample_rows(gpu, n, v, 0.0, 0, a.input(0), a.output(0)),
    )
}

// ------------------------------------------------------------------ generation

/// What a step of the forward graph needs from an executor: write the (N) i32 inputs, run the
/// step, read the logits or the greedy tokens. Implemented by the runtime's CPU and CUDA
/// executors.
pub trait StepExecutor {
    fn write_inputs(&mut self, t: TensorId, v: &[i32]) -> Result<(), RuntimeError>;
    fn run(&mut self) -> Result<(), RuntimeError>;
    fn read_logits(&mut self, t: TensorId) -> Result<Vec<f32>, RuntimeError>;
    fn read_tokens(&mut self, t: TensorId) -> Result<Vec<i32>, RuntimeError>;
}

impl StepExecutor for ftrt_runtime::CpuExecutor<'_> {
    fn write_inputs(&mut self, t: TensorId, v: &[i32]) -> Result<(), RuntimeError> {
        self.write(t, v)
    }
    fn run(&mut self) -> Result<(), RuntimeError> {
        self.run_step()
    }
    fn read_logits(&mut self, t: TensorId) -> Result<Vec<f32>, RuntimeError> {
        self.read(t)
    }
    fn read_tokens(&mut self, t: TensorId) -> Result<Vec<i32>, RuntimeError> {
        self.read(t)
    }
}

/// On the GPU a step is the captured CUDA graph's replay ([`ftrt_runtime::CudaExecutor::capture`]
/// first, with [`GraphSteps::capture_inputs`] written).
impl StepExecutor for ftrt_runtime::CudaExecutor<'_> {
    fn write_inputs(&mut self, t: TensorId, v: &[i32]) -> Result<(), RuntimeError> {
        self.write(t, v)
    }
    fn run(&mut self) -> Result<(), RuntimeError> {
        self.replay().map(drop)
    }
    fn read_logits(&mut self, t: TensorId) -> Result<Vec<f32>, RuntimeError> {
        self.read(t)
    }
    fn read_tokens(&mut self, t: TensorId) -> Result<Vec<i32>, RuntimeError> {
        self.read(t)
    }
}

/// Generation through the forward graph: prompts fed `rows` tokens per step (packed across
/// prompts), then one row per unfinished sequence per step; tokens picked from the logits by
/// the caller's sampler ([`crate::llama::generate_with`]).
pub struct GraphSteps<'g, E: StepExecutor> {
    pub fg: &'g ForwardGraph,
    pub ex: E,
    /// Tokens in each slot's cache.
    lens: Vec<usize>,
}

impl<'g, E: StepExecutor> GraphSteps<'g, E> {
    /// Steps of `fg` on `ex` (its weights written), every slot empty.
    pub fn new(fg: &'g ForwardGraph, ex: E) -> Self {
        Self {
            lens: vec![0; fg.slots],
            fg,
            ex,
        }
    }

    /// Writes the inputs of a step of padding rows only (they touch the spare slot): what a
    /// CUDA executor's capture may run once before recording.
    pub fn capture_inputs(&mut self) -> Result<(), String> {
        self.write(&[])
    }

    fn write(&mut self, rows: &[StepRow]) -> Result<(), String> {
        let (ids, pos, slot, len) = self.fg.step_inputs(rows).map_err(|e| e.to_string())?;
        for (t, v) in [
            (self.fg.ids, ids),
            (self.fg.pos, pos),
            (self.fg.slot, slot),
            (self.fg.len, len),
        ] {
            self.ex.write_inputs(t, &v).map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// Runs `rows` in steps of the graph's rows; returns, for the rows `wanted` (indices into
    /// `rows`) in order, the `width` values per row that `read` takes from the step holding it
    /// (logits: V f32 per row; the device's greedy tokens: one i32).
    fn run_rows<T: Copy + Default>(
        &mut self,
        rows: &[StepRow],
        wanted: &[usize],
        width: usize,
        read: impl Fn(&mut E) -> Result<Vec<T>, RuntimeError>,
    ) -> Result<Vec<T>, String> {
        let mut out = vec![T::default(); wanted.len() * width];
        for (c, chunk) in rows.chunks(self.fg.rows).enumerate() {
            self.write(chunk)?;
            self.ex.run().map_err(|e| e.to_string())?;
            let step_rows = c * self.fg.rows..c * self.fg.rows + chunk.len();
            if !wanted.iter().any(|w| step_rows.contains(w)) {
                continue;
            }
            let values = read(&mut self.ex).map_err(|e| e.to_string())?;
            for (j, &w) in wanted.iter().enumerate() {
                if step_rows.contains(&w) {
                    let r = w - step_rows.start;
                    out[j * width..(j + 1) * width]
                        .copy_from_slice(&values[r * width..(r + 1) * width]);
                }
            }
        }
        Ok(out)
    }

    /// Appends `tokens[i]` (several per slot for a prompt) to `slots[i]`; the logits of each
    /// slot's last new token, and the sampler's picks.
    fn feed(
        &mut self,
        slots: &[usize],
        tokens: &[&[u32]],
        sampler: &mut crate::llama::Sampler,
    ) -> Result<Vec<u32>, String> {
        let mut rows = Vec::new();
        let mut last = Vec::new();
        for (&slot, toks) in slots.iter().zip(tokens) {
            let start = *self
                .lens
                .get(slot)
                .ok_or_else(|| format!("no slot {slot}"))?;
            if toks.is_empty() || start + toks.len() > self.fg.capacity {
                return Err(format!(
                    "slot {slot}: {} tokens after {start} do not fit the graph's {} positions",
                    toks.len(),
                    self.fg.capacity
                ));
            }
            for (i, &token) in toks.iter().enumerate() {
                rows.push(StepRow {
                    token,
                    slot,
                    pos: start + i,
                });
            }
            self.lens[slot] = start + toks.len();
            last.push(rows.len() - 1);
        }
        if sampler.params.temperature <= 0.0 {
            // greedy: the graph's own pick (the first index of the largest logit, as the
            // sampler's), N tokens downloaded instead of N x V logits
            let next = self.fg.next;
            let picked = self.run_rows(&rows, &last, 1, |ex| ex.read_tokens(next))?;
            return Ok(picked.into_iter().map(|t| t as u32).collect());
        }
        let logits_t = self.fg.logits;
        let logits = self.run_rows(&rows, &last, self.fg.vocab, |ex| ex.read_logits(logits_t))?;
        Ok(logits
            .chunks(self.fg.vocab)
            .map(|row| sampler.pick(row))
            .collect())
    }
}

impl<E: StepExecutor> crate::llama::NextTokens for GraphSteps<'_, E> {
    fn prefill(
        &mut self,
        slots: &[usize],
        prompts: &[Vec<u32>],
        sampler: &mut crate::llama::Sampler,
    ) -> Result<Vec<u32>, String> {
        for &s in slots {
            if let Some(l) = self.lens.get_mut(s) {
                *l = 0;
            }
        }
        let toks: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
        self.feed(slots, &toks, sampler)
    }
    fn decode(
        &mut self,
        slots: &[usize],
        tokens: &[u32],
        sampler: &mut crate::llama::Sampler,
    ) -> Result<Vec<u32>, String> {
        let toks: Vec<&[u32]> = tokens.iter().map(std::slice::from_ref).collect();
        self.feed(slots, &toks, sampler)
    }
}
