//! Token selection for generation: greedy (temperature 0), or sampling with temperature,
//! top-k and top-p (in that order, as transformers' logits warpers apply them), from a seeded
//! generator so a run is repeatable; and a batched generation loop over the KV cache.

use super::lora::LoraAdapter;
use super::model::LlamaModel;
use super::LlamaError;

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
    state: u64,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        Self {
            params,
            state: params.seed ^ 0x9E37_79B9_7F4A_7C15,
        }
    }

    /// splitmix64 step: a uniform in [0, 1).
    fn uniform(&mut self) -> f64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
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

impl LlamaModel {
    /// Generates up to `max_new` tokens after each prompt (all prompts decode together, one
    /// token per unfinished sequence per step); a sequence stops after emitting a token of
    /// `eos`. Returns the new tokens of each prompt (eos included when emitted).
    pub fn generate(
        &self,
        prompts: &[Vec<u32>],
        max_new: usize,
        eos: &[u32],
        params: SamplingParams,
        lora: Option<&LoraAdapter>,
    ) -> Result<Vec<Vec<u32>>, LlamaError> {
        let s = prompts.len();
        let mut out = vec![Vec::new(); s];
        if s == 0 || max_new == 0 {
            return Ok(out);
        }
        let mut sampler = Sampler::new(params);
        let mut cache = self.new_cache(s);
        let slots: Vec<usize> = (0..s).collect();
        let v = self.dims.vocab;
        let mut logits = self.prefill(&mut cache, &slots, prompts, lora)?;
        let mut active: Vec<usize> = slots.clone();
        loop {
            let mut next = Vec::with_capacity(active.len());
            let mut still = Vec::with_capacity(active.len());
            for (row, &sl) in active.iter().enumerate() {
                let t = sampler.pick(&logits[row * v..(row + 1) * v]);
                out[sl].push(t);
                if !eos.contains(&t) && out[sl].len() < max_new {
                    still.push(sl);
                    next.push(t);
                }
            }
            if still.is_empty() {
                break;
            }
            active = still;
            logits = self.decode(&mut cache, &active, &next, lora)?;
        }
        Ok(out)
    }
}
