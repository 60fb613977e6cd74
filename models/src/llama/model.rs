//! The decoder forward: embedding; per layer input RMSNorm, q/k/v projections (with Qwen2's
//! biases and Qwen3's per-head q/k norms), RoPE at per-token positions, causal attention within each
//! sequence, o_proj + residual fused with the post-attention RMSNorm, SwiGLU MLP, residual
//! fused with the next norm; final norm; LM head for selected rows only, or the chunked
//! cross-entropy that never holds a full (tokens x vocabulary) matrix.

use ftrt_ops::dsl::{Prec, Real, Rounding};
use ftrt_ops::{activation, attention as ops_attn, cross_entropy, embedding, norm, rope};
use ftrt_runtime::gemm::cpu::gemm;
use ftrt_runtime::GemmDesc;

use super::activations::{Activations, LayerActivations};
use super::attention::{attend_cached, CachedAttnDims, KvCache};
use super::lora::LoraAdapter;
use super::weights::{Dims, Proj, WeightStore};
use super::LlamaError;
use crate::checkpoint::{LoadedModel, WeightSource};
use crate::config::{ModelConfig, RopeScaling};

/// A packed batch: sequences back to back, positions restarting at 0 in each.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// (N) token ids.
    pub tokens: Vec<u32>,
    /// (S + 1) prefix sums of the sequence lengths, cu[0] = 0, cu[S] = N.
    pub cu_seqlens: Vec<i32>,
    /// (N) position of each token in its sequence.
    pub positions: Vec<i32>,
}

impl Batch {
    /// Packs `seqs` (each non-empty) into one batch.
    pub fn packed(seqs: &[Vec<u32>]) -> Self {
        let mut b = Batch {
            tokens: Vec::new(),
            cu_seqlens: vec![0],
            positions: Vec::new(),
        };
        for s in seqs {
            b.tokens.extend_from_slice(s);
            b.positions.extend(0..s.len() as i32);
            b.cu_seqlens.push(b.tokens.len() as i32);
        }
        b
    }

    /// Number of tokens N.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// Whether the batch holds no token.
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Number of sequences S.
    pub fn num_seqs(&self) -> usize {
        self.cu_seqlens.len().saturating_sub(1)
    }

    /// Row of the last token of every sequence.
    pub fn last_rows(&self) -> Vec<usize> {
        self.cu_seqlens[1..]
            .iter()
            .map(|&e| e as usize - 1)
            .collect()
    }

    fn check(&self, vocab: usize) -> Result<(), LlamaError> {
        let n = self.tokens.len();
        let cu = &self.cu_seqlens;
        if cu.first() != Some(&0)
            || *cu.last().unwrap_or(&-1) as usize != n
            || cu.windows(2).any(|w| w[1] <= w[0])
        {
            return Err(LlamaError::Input(format!(
                "cu_seqlens {cu:?} must start at 0, increase strictly and end at {n}"
            )));
        }
        if self.positions.len() != n {
            return Err(LlamaError::Input(format!(
                "{} positions for {n} tokens",
                self.positions.len()
            )));
        }
        if let Some(&t) = self.tokens.iter().find(|&&t| t as usize >= vocab) {
            return Err(LlamaError::Input(format!(
                "token id {t} is outside the vocabulary of {vocab}"
            )));
        }
        Ok(())
    }
}

/// How a forward pass attends.
enum Attn<'a> {
    /// Append to a KV cache and attend against it; token n is in `slots[n]`.
    Cache {
        cache: &'a mut KvCache,
        slots: &'a [usize],
    },
    /// The ops' varlen reference over a packed batch (the training path: saves lse).
    Packed { cu_seqlens: &'a [i32] },
}

/// A Llama-family decoder on the CPU.
#[derive(Debug, Clone)]
pub struct LlamaModel {
    /// The checkpoint's config.
    pub config: ModelConfig,
    /// Sizes derived from it.
    pub dims: Dims,
    /// Every weight.
    pub weights: WeightStore,
    /// F32 model or bf16 model semantics.
    pub rt: Rounding,
    /// (D / 2) RoPE inverse frequencies, scaling applied.
    pub inv_freq: Vec<f32>,
    /// Vocabulary columns per cross-entropy chunk (the loss never holds more logits per row).
    pub vocab_chunk: usize,
}

/// (n, out) = x (n, in) · w^T (w: (out, in)) + bias, rounded to the model dtype.
pub(crate) fn linear(
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    n: usize,
    inn: usize,
    out: usize,
    rt: Rounding,
) -> Vec<f32> {
    let mut y = vec![0.0f32; n * out];
    if n == 0 {
        return y;
    }
    if n <= GEMV_MAX_ROWS {
        // Decoding: a few rows. Dot products over W's contiguous rows read W once, where the
        // packed GEMM would first copy all of W into panels.
        assert!(
            x.len() >= n * inn && w.len() >= out * inn,
            "linear: shapes are consistent"
        );
        for (o, wr) in w.chunks_exact(inn).take(out).enumerate() {
            let b = bias.map_or(0.0, |b| b[o]);
            for r in 0..n {
                y[r * out + o] = dot8(&x[r * inn..(r + 1) * inn], wr) + b;
            }
        }
    } else {
        let d = GemmDesc::new(n, out, inn).transposed(false, true);
        gemm::<f32>(&d, x, w, &mut y, bias).expect("linear: shapes are consistent");
    }
    round_all(&mut y, rt);
    y
}

/// Rows up to which [`linear`] uses dot products instead of the packed GEMM.
const GEMV_MAX_ROWS: usize = 4;

/// Dot product with eight independent accumulators (vectorizes; f32 sums like a GEMM's).
fn dot8(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

pub(crate) fn round_all(x: &mut [f32], rt: Rounding) {
    if !matches!(rt.t, Prec::F32 | Prec::Exact) {
        x.iter_mut().for_each(|v| *v = v.round_to(rt.t));
    }
}

impl LlamaModel {
    /// Builds the model from a config and its weights.
    pub fn new(
        config: &ModelConfig,
        source: &WeightSource,
        rt: Rounding,
    ) -> Result<Self, LlamaError> {
        if config.hidden_size == 0
            || !config.head_dim.is_multiple_of(2)
            || config.num_key_value_heads == 0
        {
            return Err(LlamaError::Unsupported(format!(
                "unsupported shape: hidden {} head_dim {} kv heads {}",
                config.hidden_size, config.head_dim, config.num_key_value_heads
            )));
        }
        let weights = WeightStore::load(config, source, rt)?;
        Ok(Self::from_store(config, weights, rt))
    }

    /// The model of `config` over weights already in a store (random benchmark weights).
    pub fn from_store(config: &ModelConfig, weights: WeightStore, rt: Rounding) -> Self {
        Self {
            config: config.clone(),
            dims: Dims::of(config),
            weights,
            rt,
            inv_freq: inv_freq_of(config),
            vocab_chunk: 8192,
        }
    }

    /// Builds the model of an opened checkpoint.
    pub fn from_loaded(m: &LoadedModel, rt: Rounding) -> Result<Self, LlamaError> {
        Self::new(&m.config, &m.weights, rt)
    }

    /// An empty KV cache with `slots` sequence slots.
    pub fn new_cache(&self, slots: usize) -> KvCache {
        KvCache::new(self.dims.layers, slots, self.dims.kv_dim())
    }

    /// Logits (N, V) of every token of a packed batch (tests and small batches; the loss path
    /// never builds this).
    pub fn forward(
        &self,
        batch: &Batch,
        lora: Option<&LoraAdapter>,
    ) -> Result<Vec<f32>, LlamaError> {
        let rows: Vec<usize> = (0..batch.len()).collect();
        self.forward_rows(batch, &rows, lora)
    }

    /// Logits (rows.len(), V) of the selected rows of a packed batch.
    pub fn forward_rows(
        &self,
        batch: &Batch,
        rows: &[usize],
        lora: Option<&LoraAdapter>,
    ) -> Result<Vec<f32>, LlamaError> {
        let hidden = self.hidden_uncached(batch, lora)?;
        self.logits_of(&hidden, rows)
    }

    /// Mean cross-entropy over the tokens whose target is not -100 (`targets` (N): the next
    /// token of each position, already shifted), through the chunked cross-entropy op.
    pub fn loss(
        &self,
        batch: &Batch,
        targets: &[i32],
        lora: Option<&LoraAdapter>,
    ) -> Result<f32, LlamaError> {
        let hidden = self.hidden_uncached(batch, lora)?;
        let (loss, _, _) = self.chunked_ce(&hidden, targets, false)?;
        Ok(loss)
    }

    /// Prefill: runs `prompts[i]` (continuing whatever `slots[i]` already holds) and returns the
    /// logits (S, V) of each prompt's last token.
    pub fn prefill(
        &self,
        cache: &mut KvCache,
        slots: &[usize],
        prompts: &[Vec<u32>],
        lora: Option<&LoraAdapter>,
    ) -> Result<Vec<f32>, LlamaError> {
        if slots.len() != prompts.len() {
            return Err(LlamaError::Input(format!(
                "{} slots for {} prompts",
                slots.len(),
                prompts.len()
            )));
        }
        let mut tokens = Vec::new();
        let mut positions = Vec::new();
        let mut token_slots = Vec::new();
        let mut last = Vec::new();
        for (&s, p) in slots.iter().zip(prompts) {
            if s >= cache.slots() || p.is_empty() {
                return Err(LlamaError::Input(format!(
                    "slot {s} (of {}) with {} tokens",
                    cache.slots(),
                    p.len()
                )));
            }
            let start = cache.len(s);
            for (i, &t) in p.iter().enumerate() {
                tokens.push(t);
                positions.push((start + i) as i32);
                token_slots.push(s);
            }
            last.push(tokens.len() - 1);
        }
        let mut dedup = slots.to_vec();
        dedup.sort_unstable();
        dedup.dedup();
        if dedup.len() != slots.len() {
            return Err(LlamaError::Input(
                "a slot appears twice in one prefill".into(),
            ));
        }
        self.check_tokens(&tokens)?;
        let hidden = self.trunk(
            &tokens,
            &positions,
            Attn::Cache {
                cache,
                slots: &token_slots,
            },
            lora,
            None,
        )?;
        self.logits_of(&hidden, &last)
    }

    /// One decoding step: token `tokens[i]` is appended to `slots[i]`; returns logits (S, V).
    pub fn decode(
        &self,
        cache: &mut KvCache,
        slots: &[usize],
        tokens: &[u32],
        lora: Option<&LoraAdapter>,
    ) -> Result<Vec<f32>, LlamaError> {
        let prompts: Vec<Vec<u32>> = tokens.iter().map(|&t| vec![t]).collect();
        self.prefill(cache, slots, &prompts, lora)
    }

    /// Forward with the activation record the LoRA backward needs (the ops' attention).
    pub fn forward_record(
        &self,
        batch: &Batch,
        lora: Option<&LoraAdapter>,
    ) -> Result<Activations, LlamaError> {
        batch.check(self.dims.vocab)?;
        if let Some(w) = self.config.sliding_window {
            let longest = batch
                .cu_seqlens
                .windows(2)
                .map(|p| (p[1] - p[0]) as usize)
                .max()
                .unwrap_or(0);
            if longest > w {
                return Err(LlamaError::Unsupported(format!(
                    "training attention has no sliding window: a sequence of {longest} tokens exceeds the window of {w}"
                )));
            }
        }
        let mut acts = Activations {
            n_tokens: batch.len(),
            cu_seqlens: batch.cu_seqlens.clone(),
            positions: batch.positions.clone(),
            ..Default::default()
        };
        let hidden = self.trunk(
            &batch.tokens,
            &batch.positions,
            Attn::Packed {
                cu_seqlens: &batch.cu_seqlens,
            },
            lora,
            Some(&mut acts),
        )?;
        acts.ln_f = hidden;
        Ok(acts)
    }

    /// Logits (rows.len(), V) from final-norm outputs (N, C).
    pub fn logits_of(&self, hidden: &[f32], rows: &[usize]) -> Result<Vec<f32>, LlamaError> {
        let c = self.dims.hidden;
        let x = gather_rows(hidden, c, rows)?;
        Ok(linear(
            &x,
            self.weights.head(),
            None,
            rows.len(),
            c,
            self.dims.vocab,
            self.rt,
        ))
    }

    fn check_tokens(&self, tokens: &[u32]) -> Result<(), LlamaError> {
        match tokens.iter().find(|&&t| t as usize >= self.dims.vocab) {
            Some(t) => Err(LlamaError::Input(format!(
                "token id {t} is outside the vocabulary of {}",
                self.dims.vocab
            ))),
            None => Ok(()),
        }
    }

    /// Final-norm outputs (N, C) of a packed batch through a temporary KV cache.
    fn hidden_uncached(
        &self,
        batch: &Batch,
        lora: Option<&LoraAdapter>,
    ) -> Result<Vec<f32>, LlamaError> {
        batch.check(self.dims.vocab)?;
        let s = batch.num_seqs();
        let mut cache = self.new_cache(s);
        let mut slots = Vec::with_capacity(batch.len());
        for (i, w) in batch.cu_seqlens.windows(2).enumerate() {
            slots.extend(std::iter::repeat_n(i, (w[1] - w[0]) as usize));
            let p = &batch.positions[w[0] as usize..w[1] as usize];
            if p.iter().enumerate().any(|(j, &x)| x as usize != j) {
                return Err(LlamaError::Input(format!(
                    "positions of sequence {i} must be 0, 1, 2, ..."
                )));
            }
        }
        self.trunk(
            &batch.tokens,
            &batch.positions,
            Attn::Cache {
                cache: &mut cache,
                slots: &slots,
            },
            lora,
            None,
        )
    }

    /// cos/sin rows (N, D) for `positions`, rounded to the model dtype (HF: f32 angles
    /// position * inv_freq, then `.to(dtype)`).
    pub fn rope_rows(&self, positions: &[i32]) -> (Vec<f32>, Vec<f32>) {
        let half = self.inv_freq.len();
        let d = half * 2;
        let mut cos = Vec::with_capacity(positions.len() * d);
        let mut sin = Vec::with_capacity(positions.len() * d);
        for &p in positions {
            for i in 0..d {
                let a = p as f32 * self.inv_freq[i % half];
                cos.push(a.cos().round_to(self.rt.t));
                sin.push(a.sin().round_to(self.rt.t));
            }
        }
        (cos, sin)
    }

    /// A projection of layer `l` with its bias and LoRA branch: returns (y, x A^T).
    pub(crate) fn project(
        &self,
        l: usize,
        p: Proj,
        x: &[f32],
        n: usize,
        lora: Option<&LoraAdapter>,
    ) -> (Vec<f32>, Vec<f32>) {
        let lw = &self.weights.layers[l];
        let (out, inn) = p.shape(&self.dims);
        let bias = lw.bias[p.index()].as_ref().map(|r| self.weights.get(r));
        let mut y = linear(
            x,
            self.weights.get(&lw.proj[p.index()]),
            bias,
            n,
            inn,
            out,
            self.rt,
        );
        let mut xa = Vec::new();
        if let Some(ad) = lora {
            if let (Some(a), Some(b)) = (ad.a(l, p), ad.b(l, p)) {
                let r = ad.r;
                xa = linear(x, a, None, n, inn, r, self.rt);
                // PEFT: result + lora_B(lora_A(x)) * scaling
                let mut lo = linear(&xa, b, None, n, r, out, self.rt);
                for (yv, lv) in y.iter_mut().zip(&mut lo) {
                    *lv = (*lv * ad.scale).round_to(self.rt.t);
                    *yv = (*yv + *lv).round_to(self.rt.t);
                }
            }
        }
        (y, xa)
    }

    /// Embedding through the final norm: returns the final-norm outputs (N, C).
    fn trunk(
        &self,
        tokens: &[u32],
        positions: &[i32],
        mut attn: Attn<'_>,
        lora: Option<&LoraAdapter>,
        mut rec: Option<&mut Activations>,
    ) -> Result<Vec<f32>, LlamaError> {
        let dm = self.dims;
        let (n, c, hq, hkv, hd, inter) = (
            tokens.len(),
            dm.hidden,
            dm.heads,
            dm.kv_heads,
            dm.head_dim,
            dm.intermediate,
        );
        let rt = self.rt;
        let eps = self.config.rms_norm_eps as f32;
        let w = &self.weights;
        let ids: Vec<i32> = tokens.iter().map(|&t| t as i32).collect();

        // Embedding, then the first input norm.
        let mut resid = vec![0.0f32; n * c];
        embedding::embedding::forward_cpu(
            &embedding::embedding::Dims {
                N: n,
                V: dm.vocab,
                C: c,
            },
            &ids,
            w.get(&w.embed),
            &mut resid,
            rt,
        );
        let mut normed = vec![0.0f32; n * c];
        let mut rstd = vec![0.0f32; n];
        let nd = norm::rms_norm::Dims { R: n, C: c };
        let and = norm::add_rms_norm::Dims { R: n, C: c };
        norm::rms_norm::forward_cpu(
            &nd,
            eps,
            &resid,
            w.get(&w.layers[0].input_norm),
            &mut normed,
            &mut rstd,
            rt,
        );

        // RoPE rows: token n reads row n of these tables.
        let (cos, sin) = self.rope_rows(positions);
        let local_pos: Vec<i32> = (0..n as i32).collect();
        if let Some(r) = rec.as_deref_mut() {
            r.cos = cos.clone();
            r.sin = sin.clone();
        }

        for l in 0..dm.layers {
            let lw = &w.layers[l];
            let mut la = LayerActivations::default();
            // q, k, v projections.
            let (mut q, xa_q) = self.project(l, Proj::Q, &normed, n, lora);
            let (mut k, xa_k) = self.project(l, Proj::K, &normed, n, lora);
            let (v, xa_v) = self.project(l, Proj::V, &normed, n, lora);
            // Qwen3: RMSNorm over each head of q and k, before RoPE.
            if let (Some(qn), Some(kn)) = (&lw.q_norm, &lw.k_norm) {
                let q_pre = q;
                let k_pre = k;
                q = vec![0.0; q_pre.len()];
                k = vec![0.0; k_pre.len()];
                let mut q_rstd = vec![0.0f32; n * hq];
                let mut k_rstd = vec![0.0f32; n * hkv];
                norm::rms_norm::forward_cpu(
                    &norm::rms_norm::Dims { R: n * hq, C: hd },
                    eps,
                    &q_pre,
                    w.get(qn),
                    &mut q,
                    &mut q_rstd,
                    rt,
                );
                norm::rms_norm::forward_cpu(
                    &norm::rms_norm::Dims { R: n * hkv, C: hd },
                    eps,
                    &k_pre,
                    w.get(kn),
                    &mut k,
                    &mut k_rstd,
                    rt,
                );
                if rec.is_some() {
                    la.q_pre = q_pre;
                    la.k_pre = k_pre;
                    la.q_rstd = q_rstd;
                    la.k_rstd = k_rstd;
                }
            }
            // RoPE in place.
            rope::rope::forward_cpu(
                &rope::rope::Dims {
                    N: n,
                    H: hq,
                    D: hd,
                    P: n,
                },
                &mut q,
                &local_pos,
                &cos,
                &sin,
                rt,
            );
            rope::rope::forward_cpu(
                &rope::rope::Dims {
                    N: n,
                    H: hkv,
                    D: hd,
                    P: n,
                },
                &mut k,
                &local_pos,
                &cos,
                &sin,
                rt,
            );
            // Causal attention within each sequence.
            let mut att = vec![0.0f32; n * hq * hd];
            match &mut attn {
                Attn::Cache { cache, slots } => {
                    let dims = CachedAttnDims {
                        heads: hq,
                        kv_heads: hkv,
                        head_dim: hd,
                        window: self.config.sliding_window,
                    };
                    attend_cached(cache, l, dims, slots, positions, &q, &k, &v, &mut att, rt);
                }
                Attn::Packed { cu_seqlens } => {
                    let ad = ops_attn::AttentionDims::new(n, cu_seqlens.len() - 1, hq, hkv, hd);
                    let mut lse = vec![0.0f32; ad.lse_len()];
                    ops_attn::attention_forward_cpu::<f32>(
                        &ad, cu_seqlens, &q, &k, &v, &mut att, &mut lse,
                    );
                    round_all(&mut att, rt);
                    la.lse = lse;
                }
            }
            // o_proj, residual add fused with the post-attention norm.
            let (o, xa_o) = self.project(l, Proj::O, &att, n, lora);
            let mut resid_mid = vec![0.0f32; n * c];
            let mut ln2 = vec![0.0f32; n * c];
            let mut rstd2 = vec![0.0f32; n];
            norm::add_rms_norm::forward_cpu(
                &and,
                eps,
                &o,
                &resid,
                w.get(&lw.post_norm),
                &mut ln2,
                &mut resid_mid,
                &mut rstd2,
                rt,
            );
            // SwiGLU MLP.
            let (gate, xa_g) = self.project(l, Proj::Gate, &ln2, n, lora);
            let (up, xa_u) = self.project(l, Proj::Up, &ln2, n, lora);
            let mut act = vec![0.0f32; n * inter];
            activation::swiglu::forward_cpu(
                &activation::swiglu::Dims { N: n * inter },
                &gate,
                &up,
                &mut act,
                rt,
            );
            let (down, xa_d) = self.project(l, Proj::Down, &act, n, lora);
            // Residual add fused with the next layer's input norm (or the final norm).
            let next_w = if l + 1 < dm.layers {
                &w.layers[l + 1].input_norm
            } else {
                &w.final_norm
            };
            let mut resid_next = vec![0.0f32; n * c];
            let mut normed_next = vec![0.0f32; n * c];
            let mut rstd_next = vec![0.0f32; n];
            norm::add_rms_norm::forward_cpu(
                &and,
                eps,
                &down,
                &resid_mid,
                w.get(next_w),
                &mut normed_next,
                &mut resid_next,
                &mut rstd_next,
                rt,
            );

            if let Some(r) = rec.as_deref_mut() {
                la.resid_in = std::mem::take(&mut resid);
                la.ln1 = std::mem::take(&mut normed);
                la.rstd1 = std::mem::take(&mut rstd);
                la.q = q;
                la.k = k;
                la.v = v;
                la.att = att;
                la.resid_mid = resid_mid;
                la.ln2 = ln2;
                la.rstd2 = rstd2;
                la.gate = gate;
                la.up = up;
                la.act = act;
                la.lora_xa = [xa_q, xa_k, xa_v, xa_o, xa_g, xa_u, xa_d];
                r.layers.push(la);
            }
            resid = resid_next;
            normed = normed_next;
            rstd = rstd_next;
        }
        if let Some(r) = rec {
            r.resid_final = resid;
            r.rstd_f = rstd;
        }
        Ok(normed)
    }

    /// The chunked cross-entropy over the rows with a target: returns (mean loss, counted
    /// rows, and, when `grad`, d(loss)/d(final-norm output) (N, C)).
    pub(crate) fn chunked_ce(
        &self,
        hidden: &[f32],
        targets: &[i32],
        grad: bool,
    ) -> Result<(f32, usize, Vec<f32>), LlamaError> {
        let (c, vocab) = (self.dims.hidden, self.dims.vocab);
        let n = hidden.len() / c;
        if targets.len() != n {
            return Err(LlamaError::Input(format!(
                "{} targets for {n} tokens",
                targets.len()
            )));
        }
        if let Some(&t) = targets
            .iter()
            .find(|&&t| t != -100 && (t < 0 || t as usize >= vocab))
        {
            return Err(LlamaError::Input(format!(
                "target {t} is outside the vocabulary of {vocab} (and not -100)"
            )));
        }
        let rows: Vec<usize> = (0..n).filter(|&i| targets[i] != -100).collect();
        let m = rows.len();
        let mut dhidden = if grad {
            vec![0.0f32; n * c]
        } else {
            Vec::new()
        };
        if m == 0 {
            return Ok((0.0, 0, dhidden));
        }
        let x = gather_rows(hidden, c, &rows)?;
        let tg: Vec<i32> = rows.iter().map(|&i| targets[i]).collect();
        let head = self.weights.head();
        let chunk = self.vocab_chunk.max(1);
        let mut lse = vec![f32::NEG_INFINITY; m];
        let mut picked = vec![0.0f32; m];
        let mut v0 = 0;
        while v0 < vocab {
            let vc = chunk.min(vocab - v0);
            let logits = linear(&x, &head[v0 * c..(v0 + vc) * c], None, m, c, vc, self.rt);
            let d = cross_entropy::cross_entropy::Dims { R: m, V: vc };
            cross_entropy::cross_entropy::forward_cpu(
                &d,
                v0 as i32,
                0.0,
                &logits,
                &tg,
                &mut lse,
                &mut picked,
                self.rt,
            );
            v0 += vc;
        }
        let mut per_row = vec![0.0f32; m];
        cross_entropy::cross_entropy_loss::forward_cpu(
            &cross_entropy::cross_entropy_loss::Dims { R: m },
            &lse,
            &picked,
            &tg,
            &mut per_row,
            self.rt,
        );
        let loss = per_row.iter().map(|&v| v as f64).sum::<f64>() / m as f64;
        if grad {
            // d loss / d lse = 1/m, d loss / d picked = -1/m; recompute each chunk's logits.
            let dlse = vec![1.0 / m as f32; m];
            let dpicked = vec![-1.0 / m as f32; m];
            let mut dx = vec![0.0f32; m * c];
            let mut v0 = 0;
            while v0 < vocab {
                let vc = chunk.min(vocab - v0);
                let hchunk = &head[v0 * c..(v0 + vc) * c];
                let logits = linear(&x, hchunk, None, m, c, vc, self.rt);
                let mut dlogits = vec![0.0f32; m * vc];
                let d = cross_entropy::cross_entropy::Dims { R: m, V: vc };
                cross_entropy::cross_entropy::backward_cpu(
                    &d,
                    v0 as i32,
                    0.0,
                    &logits,
                    &tg,
                    &lse,
                    &dlse,
                    &dpicked,
                    &mut dlogits,
                    self.rt,
                );
                round_all(&mut dlogits, self.rt);
                // dx += dlogits (m, vc) · head_chunk (vc, c)
                let g = GemmDesc::new(m, c, vc).scaled(1.0, 1.0);
                gemm::<f32>(&g, &dlogits, hchunk, &mut dx, None).expect("shapes are consistent");
                v0 += vc;
            }
            round_all(&mut dx, self.rt);
            for (j, &i) in rows.iter().enumerate() {
                dhidden[i * c..(i + 1) * c].copy_from_slice(&dx[j * c..(j + 1) * c]);
            }
        }
        Ok((loss as f32, m, dhidden))
    }
}

/// Rows `rows` of a (N, c) matrix, as a (rows.len(), c) matrix.
fn gather_rows(x: &[f32], c: usize, rows: &[usize]) -> Result<Vec<f32>, LlamaError> {
    let n = x.len() / c.max(1);
    let mut out = Vec::with_capacity(rows.len() * c);
    for &r in rows {
        if r >= n {
            return Err(LlamaError::Input(format!(
                "row {r} is outside the batch of {n} tokens"
            )));
        }
        out.extend_from_slice(&x[r * c..(r + 1) * c]);
    }
    Ok(out)
}

/// RoPE inverse frequencies of `config` (default, llama3 scaling, or GGUF's frequency factors).
pub fn inv_freq_of(config: &ModelConfig) -> Vec<f32> {
    let theta = config.rope_theta as f32;
    let d = config.head_dim;
    match &config.rope_scaling {
        None => rope::inv_freq(d, theta, rope::RopeScaling::Default),
        Some(RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        }) => rope::inv_freq(
            d,
            theta,
            rope::RopeScaling::Llama3 {
                factor: *factor as f32,
                low_freq_factor: *low_freq_factor as f32,
                high_freq_factor: *high_freq_factor as f32,
                original_max_position: *original_max_position_embeddings as f32,
            },
        ),
        Some(RopeScaling::FreqFactors(f)) => rope::inv_freq(d, theta, rope::RopeScaling::Default)
            .into_iter()
            .zip(f.iter().chain(std::iter::repeat(&1.0)))
            .map(|(x, &ff)| x / ff)
            .collect(),
    }
}
