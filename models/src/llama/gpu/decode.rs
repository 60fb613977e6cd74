//! Generation on the GPU: a KV cache, prefill and one-token decode steps through the same
//! layer forward as training ([`Pass::Prefill`], [`Pass::Decode`]), and the next token picked
//! on the GPU (greedy, or a Gumbel-max draw at a temperature: `ftrt_ops::decode::sample_rows`)
//! or, with top-k / top-p, on the host from downloaded logits.
//!
//! Per step: the batch (prompt tokens, or one token per sequence) is loaded like a training
//! batch (ids, positions, cu_seqlens); every layer stores its keys and values (after RoPE) at
//! (slot, position) in the cache; prefill attends over the batch itself with the varlen kernel,
//! decode over each sequence's cache with `decode_attention`; the final norm's rows that
//! predict a next token go through the head GEMM into f32 logits (one row per cache slot).

use super::step_graph::{StepGraphs, StepKey};
use super::{Ctx, GpuLlama, GpuResult, Held, Pass};
use crate::llama::model::Batch;
use crate::llama::sampling::{NextTokens, Sampler};
use ftrt_ops::decode::{self, CacheDims};
use ftrt_ops::embedding;
use ftrt_runtime::{DevPtr, GemmDesc, Gpu};
use half::bf16;
use std::cell::RefCell;

/// Keys and values of every layer for `slots` sequences of up to `capacity` tokens.
pub struct GpuKvCache {
    /// Per layer: (slots, Hkv, T, D) bf16 keys and values.
    k: Vec<DevPtr<bf16>>,
    v: Vec<DevPtr<bf16>>,
    dims: CacheDims,
    /// Tokens stored in each slot.
    lens: Vec<usize>,
    /// (max_tokens) i32: each batch row's slot (`kv_store` puts it at the row's position, the
    /// loaded batch's own); in decode, row s is sequence s, so this is also each sequence's slot.
    row_slot: DevPtr<i32>,
    /// (slots) i32: each decoded sequence's attention length; the rows of the final norm output
    /// that predict (prefill: each prompt's last); the picked tokens.
    seq_len: DevPtr<i32>,
    last_rows: DevPtr<i32>,
    picked: DevPtr<i32>,
    /// (slots, V) f32: logits of the rows that pick a token (f32 from the head GEMM: two
    /// candidates closer than a bf16 step stay ordered).
    logits: DevPtr<f32>,
    /// How decode attention splits the keys, and its f32 scratch (sized for every slot).
    splits: decode::SplitPlan,
    split_scratch: DevPtr<f32>,
    /// (5 slots + 1) i32: one decode step's inputs, uploaded in one copy and spread by
    /// device-to-device copies inside the step: ids, positions, cu_seqlens, slots, lengths.
    step_inputs: DevPtr<i32>,
    /// The decode step as CUDA graphs, one per batch size ([`StepGraphs`]); a cell, so that a
    /// graph is captured or replayed while the step reads the cache.
    step_graphs: RefCell<StepGraphs<StepKey>>,
    _held: Held,
}

impl GpuKvCache {
    /// Tokens stored in `slot`.
    pub fn len(&self, slot: usize) -> usize {
        self.lens[slot]
    }

    /// Number of slots.
    pub fn slots(&self) -> usize {
        self.lens.len()
    }

    /// Empties every slot, keeping the buffers and the captured decode step for the next
    /// generation of the same shape.
    pub fn clear(&mut self) {
        self.lens.fill(0);
    }

    /// Stores `rows` keys and values (rows, Hkv, D) of layer `l` at the rows' slots and at
    /// positions `pos` (rows) i32.
    pub(super) fn store(
        &self,
        gpu: &Gpu,
        l: usize,
        rows: usize,
        pos: DevPtr<i32>,
        k: DevPtr<bf16>,
        v: DevPtr<bf16>,
    ) -> GpuResult<()> {
        decode::kv_store(
            gpu,
            &self.dims,
            rows,
            k,
            v,
            self.row_slot,
            pos,
            self.k[l],
            self.v[l],
        )
        .ctx("storing keys and values")
    }

    /// out (seqs, Hq, D) = attention of q (seqs, Hq, D) over each sequence's cached layer `l`.
    pub(super) fn attend(
        &self,
        gpu: &Gpu,
        l: usize,
        seqs: usize,
        q: DevPtr<bf16>,
        out: DevPtr<bf16>,
    ) -> GpuResult<()> {
        decode::decode_attention(
            gpu,
            &self.dims,
            &self.splits,
            seqs,
            q,
            self.k[l],
            self.v[l],
            self.row_slot,
            self.seq_len,
            self.split_scratch,
            out,
        )
        .ctx("decode attention")
    }
}

impl GpuLlama<'_> {
    /// A KV cache for `slots` sequences of up to `capacity` tokens each (prompt + generated);
    /// `capacity` is at most the token budget, which sizes the RoPE tables.
    pub fn new_kv_cache(&self, slots: usize, capacity: usize) -> GpuResult<GpuKvCache> {
        let d = self.dims;
        if capacity == 0 || capacity > self.max_tokens {
            return Err(format!(
                "a KV cache of {capacity} tokens per sequence: the model was built for at most \
                 {} positions (its token budget)",
                self.max_tokens
            ));
        }
        let dims = CacheDims::new(d.heads, d.kv_heads, d.head_dim, capacity);
        let mut h = Held {
            bufs: Vec::new(),
            bytes: 0,
        };
        let per_layer = slots * capacity * d.kv_heads * d.head_dim;
        let mut k = Vec::with_capacity(d.layers);
        let mut v = Vec::with_capacity(d.layers);
        for _ in 0..d.layers {
            k.push(h.alloc(self.gpu, per_layer)?);
            v.push(h.alloc(self.gpu, per_layer)?);
        }
        let splits = decode::SplitPlan::new(&dims, slots);
        Ok(GpuKvCache {
            k,
            v,
            dims,
            lens: vec![0; slots],
            row_slot: h.alloc(self.gpu, self.max_tokens)?,
            seq_len: h.alloc(self.gpu, slots)?,
            last_rows: h.alloc(self.gpu, slots)?,
            picked: h.alloc(self.gpu, slots)?,
            logits: h.alloc(self.gpu, slots * d.vocab)?,
            split_scratch: h.alloc(self.gpu, splits.scratch_len(&dims, slots))?,
            step_inputs: h.alloc(self.gpu, 5 * slots + 1)?,
            splits,
            step_graphs: RefCell::new(StepGraphs::new(8)),
            _held: h,
        })
    }

    /// Feeds `prompts` into the empty cache slots `slots` (packed, as many prompts per forward
    /// as the token budget holds) and picks each one's first new token.
    pub fn prefill(
        &mut self,
        cache: &mut GpuKvCache,
        slots: &[usize],
        prompts: &[Vec<u32>],
        sampler: &mut Sampler,
    ) -> GpuResult<Vec<u32>> {
        if slots.len() != prompts.len() {
            return Err("prefill: one slot per prompt".into());
        }
        for (&sl, p) in slots.iter().zip(prompts) {
            if sl >= cache.slots() || cache.lens[sl] != 0 {
                return Err(format!(
                    "prefill: slot {sl} is not an empty slot of the cache"
                ));
            }
            if p.is_empty() || p.len() > cache.dims.capacity {
                return Err(format!(
                    "prefill: a prompt of {} tokens (1..={} fit a cache slot)",
                    p.len(),
                    cache.dims.capacity
                ));
            }
        }
        let mut picked = Vec::with_capacity(prompts.len());
        let mut i = 0;
        while i < prompts.len() {
            // As many whole prompts as the token budget holds.
            let mut j = i;
            let mut tokens = 0;
            while j < prompts.len() && tokens + prompts[j].len() <= self.max_tokens {
                tokens += prompts[j].len();
                j += 1;
            }
            let batch = Batch::packed(&prompts[i..j]);
            let row_slot: Vec<i32> = slots[i..j]
                .iter()
                .zip(&prompts[i..j])
                .flat_map(|(&sl, p)| std::iter::repeat_n(sl as i32, p.len()))
                .collect();
            let last: Vec<i32> = batch.cu_seqlens[1..].iter().map(|&c| c - 1).collect();
            self.load_batch(&batch, None)?;
            self.gpu
                .upload(cache.row_slot, &row_slot)
                .ctx("uploading slots")?;
            self.gpu
                .upload(cache.last_rows, &last)
                .ctx("uploading row indices")?;
            self.forward_pass(Pass::Prefill(cache))?;
            picked.extend(self.pick_next(cache, Some(j - i), sampler)?);
            for (&sl, p) in slots[i..j].iter().zip(&prompts[i..j]) {
                cache.lens[sl] = p.len();
            }
            i = j;
        }
        Ok(picked)
    }

    /// Feeds one token per listed slot (each slot already holds its prompt) and picks each
    /// one's next token.
    pub fn decode(
        &mut self,
        cache: &mut GpuKvCache,
        slots: &[usize],
        tokens: &[u32],
        sampler: &mut Sampler,
    ) -> GpuResult<Vec<u32>> {
        let s = slots.len();
        if tokens.len() != s || s > self.max_tokens {
            return Err("decode: one token per slot, at most the token budget".into());
        }
        let mut pos = Vec::with_capacity(s);
        for &sl in slots {
            let len = *cache
                .lens
                .get(sl)
                .ok_or_else(|| format!("decode: no cache slot {sl}"))?;
            if len == 0 || len >= cache.dims.capacity {
                return Err(format!(
                    "decode: slot {sl} holds {len} tokens (needs a prompt, and room: capacity {})",
                    cache.dims.capacity
                ));
            }
            pos.push(len as i32);
        }
        let batch = Batch {
            tokens: tokens.to_vec(),
            positions: pos.clone(),
            cu_seqlens: (0..=s as i32).collect(),
        };
        self.prepare_batch(&batch, None)?;
        // ids, positions, cu_seqlens, slots, lengths: one upload (spread inside the step).
        let mut inputs = Vec::with_capacity(5 * s + 1);
        inputs.extend(tokens.iter().map(|&t| t as i32));
        inputs.extend(&pos);
        inputs.extend(&batch.cu_seqlens);
        inputs.extend(slots.iter().map(|&x| x as i32));
        inputs.extend(pos.iter().map(|p| p + 1));
        self.gpu
            .upload(cache.step_inputs, &inputs)
            .ctx("uploading the decode step's inputs")?;
        self.decode_forward(cache)?;
        let picked = self.pick_next(cache, None, sampler)?;
        for &sl in slots {
            cache.lens[sl] += 1;
        }
        Ok(picked)
    }

    /// Copies the decode step's inputs (uploaded together into `cache.step_inputs`) to where
    /// the layers read them: the batch's ids, positions and cu_seqlens, the rows' slots and the
    /// sequences' lengths.
    fn spread_step_inputs(&self, cache: &GpuKvCache, s: usize) -> GpuResult<()> {
        let a = self.acts.as_ref().ok_or("activations not allocated")?;
        let src = cache.step_inputs;
        for (dst, at, n) in [
            (a.ids, 0, s),
            (a.pos, s, s),
            (a.cu, 2 * s, s + 1),
            (cache.row_slot, 3 * s + 1, s),
            (cache.seq_len, 4 * s + 1, s),
        ] {
            self.gpu
                .copy_d2d(dst.cast(), src.offset(at).cast(), 4 * n)
                .ctx("spreading the decode step's inputs")?;
        }
        Ok(())
    }

    /// The decode step on the GPU: its inputs spread ([`Self::spread_step_inputs`]) and the
    /// layers' forward of the loaded decode batch, as a CUDA graph where possible: replayed
    /// when the batch size and the model's buffers match the capture, captured at the second
    /// step of a new key (the first, eager, loads every module and GEMM plan), eager with
    /// checkpoint offload (copy streams), while a profile is open or with graphs switched off
    /// ([`GpuLlama::set_cuda_graphs`], which also drops the graphs this cache captured before).
    fn decode_forward(&self, cache: &GpuKvCache) -> GpuResult<()> {
        let a = self.acts.as_ref().ok_or("activations not allocated")?;
        let (rows, _) = self.last.ok_or("no batch loaded")?;
        let step = |cache: &GpuKvCache| {
            self.spread_step_inputs(cache, rows)?;
            self.forward_pass(Pass::Decode(cache))
        };
        let offload = a.resid_offload.is_some() || a.attn_offload.is_some();
        if !self.cuda_graphs {
            // switched off after this cache captured: its graphs would only hold memory
            cache.step_graphs.borrow_mut().clear();
        }
        if offload || !self.cuda_graphs || self.gpu.profiling() {
            return step(cache);
        }
        let key = self.step_key()?;
        let ran = cache
            .step_graphs
            .borrow_mut()
            .run(self.gpu, key, "decode step", || step(cache));
        ran.map(drop)
    }

    /// Logits of the rows that predict a next token (prefill: `gathered` prompts' last rows
    /// named by `cache.last_rows`; decode: every row), in f32 through the head, and the next
    /// token of each: on the GPU unless the sampler needs top-k / top-p.
    fn pick_next(
        &self,
        cache: &GpuKvCache,
        gathered: Option<usize>,
        sampler: &mut Sampler,
    ) -> GpuResult<Vec<u32>> {
        let (n, _) = self.last.ok_or("no batch loaded")?;
        let a = self.acts.as_ref().ok_or("activations not allocated")?;
        let (c, v) = (self.dims.hidden, self.dims.vocab);
        let ln_f = a.ln[self.dims.layers];
        let (rows, x) = match gathered {
            Some(s) => {
                // The prompts' last rows of the final norm output, gathered into tmp_c.
                embedding::embedding::forward(
                    self.gpu,
                    &embedding::embedding::Dims { N: s, V: n, C: c },
                    cache.last_rows,
                    ln_f,
                    a.tmp_c,
                )
                .ctx("gathering last rows")?;
                (s, a.tmp_c)
            }
            None => (n, ln_f),
        };
        let p = sampler.params;
        let on_device = p.top_k == 0 && p.top_p >= 1.0;
        let inv_temp = if p.temperature > 0.0 {
            1.0 / p.temperature
        } else {
            0.0
        };
        // rows <= slots: one GEMM, f32 logits (rows, V) = x (rows, C) · head^T.
        let head = GemmDesc::new(rows, v, c).transposed(false, true);
        self.gemm_f32_as(self.gemm_label(&head), &head, x, self.head(), cache.logits)?;
        let out = if on_device {
            let seed = sampler.draw_seed();
            decode::sample_rows(
                self.gpu,
                rows,
                v,
                decode::Sampling::Given { inv_temp, seed },
                cache.logits,
                cache.picked,
            )
            .ctx("sampling")?;
            let mut ids = vec![0i32; rows];
            self.gpu
                .download(cache.picked, &mut ids)
                .ctx("downloading tokens")?;
            ids.into_iter().map(|t| t as u32).collect()
        } else {
            let mut logits = vec![0f32; rows * v];
            self.gpu
                .download(cache.logits, &mut logits)
                .ctx("downloading logits")?;
            logits.chunks(v).map(|r| sampler.pick(r)).collect()
        };
        Ok(out)
    }
}

/// A GPU model with its cache, as [`NextTokens`] for [`crate::llama::generate_with`].
pub struct GpuSteps<'a, 'g> {
    pub model: &'a mut GpuLlama<'g>,
    pub cache: GpuKvCache,
}

impl NextTokens for GpuSteps<'_, '_> {
    fn prefill(
        &mut self,
        slots: &[usize],
        prompts: &[Vec<u32>],
        sampler: &mut Sampler,
    ) -> Result<Vec<u32>, String> {
        self.model.prefill(&mut self.cache, slots, prompts, sampler)
    }
    fn decode(
        &mut self,
        slots: &[usize],
        tokens: &[u32],
        sampler: &mut Sampler,
    ) -> Result<Vec<u32>, String> {
        self.model.decode(&mut self.cache, slots, tokens, sampler)
    }
}
