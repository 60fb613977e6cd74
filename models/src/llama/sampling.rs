//! Token selection for generation: greedy (temperature 0), or sampling with temperature,
//! top-k and top-p (in that order, as transformers' logits warpers apply them), from a seeded
//! generator so a run is repeatable; and a batched generation loop over the KV cache.

use super::attention::KvCache;
use super::lora::LoraAdapter;
use super::model::LlamaModel;
use super::LlamaError;
use ftrt_runtime::rng::SplitMix64;

/// Sampling settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingParams {
    /// 0 = greedy.
    pub temperature: f32,
    /// Nucleus mass kept (1 = off).
    pub top_p: f32,
    /// Most likely tokens kept (0 = off).
    pub top_k: usize,
    /// Seed of the generator.
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            seed: 0,
        }
    }
}

/// Picks tokens from logits.
#[derive(Debug, Clone)]
pub struct Sampler {
    pub params: SamplingParams,
    rng: SplitMix64,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        Self {
            params,
            rng: SplitMix64::new(params.seed ^ 0x9E37_79B9_7F4A_7C15),
        }
    }

    /// A fresh 64-bit seed from this sampler's stream (for samplers that run elsewhere, such
    /// as the GPU's Gumbel-max draw).
    pub fn draw_seed(&mut self) -> u64 {
        self.rng.next_u64()
    }

    /// A uniform in [0, 1).
    fn uniform(&mut self) -> f64 {
        self.rng.unit_f64()
    }

    /// The next token from one row of logits.
    pub fn pick(&mut self, logits: &[f32]) -> u32 {
        let p = self.params;
        if p.temperature <= 0.0 {
            return argmax(logits) as u32;
        }
        let mut idx: Vec<usize> = (0..logits.len()).collect();
        idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
        if p.top_k > 0 && p.top_k < idx.len() {
            idx.truncate(p.top_k);
        }
        let t = p.temperature as f64;
        let m = logits[idx[0]] as f64 / t;
        let mut probs: Vec<f64> = idx
            .iter()
            .map(|&i| (logits[i] as f64 / t - m).exp())
            .collect();
        let z: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|x| *x /= z);
        if p.top_p < 1.0 {
            let mut acc = 0.0;
            let mut keep = probs.len();
            for (i, &q) in probs.iter().enumerate() {
                acc += q;
                if acc >= p.top_p as f64 {
                    keep = i + 1;
                    break;
                }
            }
            probs.truncate(keep);
            idx.truncate(keep);
            let z: f64 = probs.iter().sum();
            probs.iter_mut().for_each(|x| *x /= z);
        }
        let u = self.uniform();
        let mut acc = 0.0;
        for (i, &q) in probs.iter().enumerate() {
            acc += q;
            if u < acc {
                return idx[i] as u32;
            }
        }
        idx[probs.len() - 1] as u32
    }
}

/// Index of the largest value (the first one on ties, as torch.argmax).
pub fn argmax(x: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best
}

/// Batched generation, one step at a time: the model side of [`generate_with`]. Slots name
/// KV-cache rows (one per sequence); each call returns the next token of every listed slot.
pub trait NextTokens {
    /// Feeds whole prompts into empty slots and picks each one's first new token.
    fn prefill(
        &mut self,
        slots: &[usize],
        prompts: &[Vec<u32>],
        sampler: &mut Sampler,
    ) -> Result<Vec<u32>, String>;
    /// Feeds one token per slot and picks each one's next token.
    fn decode(
        &mut self,
        slots: &[usize],
        tokens: &[u32],
        sampler: &mut Sampler,
    ) -> Result<Vec<u32>, String>;
}

/// Generates up to `max_new` tokens for every prompt (all decoded together, one token per
/// unfinished sequence per step); a sequence stops after emitting a token of `eos`. Returns
/// the new tokens of each prompt (eos included when emitted).
pub fn generate_with(
    model: &mut impl NextTokens,
    prompts: &[Vec<u32>],
    max_new: usize,
    eos: &[u32],
    params: SamplingParams,
) -> Result<Vec<Vec<u32>>, String> {
    let mut out = vec![Vec::new(); prompts.len()];
    if prompts.is_empty() || max_new == 0 {
        return Ok(out);
    }
    let mut sampler = Sampler::new(params);
    let mut active: Vec<usize> = (0..prompts.len()).collect();
    let mut picked = model.prefill(&active, prompts, &mut sampler)?;
    loop {
        let mut next = Vec::with_capacity(active.len());
        let mut still = Vec::with_capacity(active.len());
        for (&sl, &t) in active.iter().zip(&picked) {
            out[sl].push(t);
            if !eos.contains(&t) && out[sl].len() < max_new {
                still.push(sl);
                next.push(t);
            }
        }
        if still.is_empty() {
            return Ok(out);
        }
        active = still;
        picked = model.decode(&active, &next, &mut sampler)?;
    }
}

/// The CPU model with its KV cache and adapter, as [`NextTokens`].
struct CpuSteps<'m> {
    model: &'m LlamaModel,
    cache: KvCache,
    lora: Option<&'m LoraAdapter>,
}

impl CpuSteps<'_> {
    fn pick(&self, logits: &[f32], sampler: &mut Sampler) -> Vec<u32> {
        logits
            .chunks(self.model.dims.vocab)
            .map(|row| sampler.pick(row))
            .collect()
    }
}

impl NextTokens for CpuSteps<'_> {
    fn prefill(
        &mut self,
        slots: &[usize],
        prompts: &[Vec<u32>],
        sampler: &mut Sampler,
    ) -> Result<Vec<u32>, String> {
        let logits = self
            .model
            .prefill(&mut self.cache, slots, prompts, self.lora)
            .map_err(|e| e.to_string())?;
        Ok(self.pick(&logits, sampler))
    }
    fn decode(
        &mut self,
        slots: &[usize],
        tokens: &[u32],
        sampler: &mut Sampler,
    ) -> Result<Vec<u32>, String> {
        let logits = self
            .model
            .decode(&mut self.cache, slots, tokens, self.lora)
            .map_err(|e| e.to_string())?;
        Ok(self.pick(&logits, sampler))
    }
}

impl LlamaModel {
    /// [`generate_with`] on the CPU, with an optional adapter.
    pub fn generate(
        &self,
        prompts: &[Vec<u32>],
        max_new: usize,
        eos: &[u32],
        params: SamplingParams,
        lora: Option<&LoraAdapter>,
    ) -> Result<Vec<Vec<u32>>, LlamaError> {
        let mut steps = CpuSteps {
            model: self,
            cache: self.new_cache(prompts.len()),
            lora,
        };
        generate_with(&mut steps, prompts, max_new, eos, params).map_err(LlamaError::Input)
    }
}
