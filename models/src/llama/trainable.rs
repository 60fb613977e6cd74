//! The CPU Llama model as a [`LoraModel`] for the trainer: the trainer's flat
//! [`LoraWeights`] mapped onto the model's [`LoraAdapter`] slots, packed batches onto
//! [`Batch`]es with next-token targets.

use std::ops::Range;

use super::{Batch, LlamaModel, LoraAdapter, Proj, SamplingParams};
use crate::data::{PackedBatch, IGNORE_INDEX};
use crate::lora::{linear_targets, LoraTarget, LoraWeights};
use crate::train::LoraModel;

/// A [`LlamaModel`] trained through LoRA on the CPU.
pub struct LlamaTrainable {
    model: LlamaModel,
}

impl LlamaTrainable {
    pub fn new(model: LlamaModel) -> Self {
        Self { model }
    }

    fn adapter_of(&self, lora: &LoraWeights) -> Result<LoraAdapter, String> {
        adapter_of(&self.model.dims, lora)
    }
}

fn proj_of(module: &str) -> Result<Proj, String> {
    Proj::ALL
        .into_iter()
        .find(|p| p.module() == module)
        .ok_or_else(|| format!("unknown module {module}"))
}

/// The model-layout adapter holding the same values as the trainer's `lora` (rank, scale and
/// targets from it; the same targets in every layer).
pub fn adapter_of(dims: &crate::llama::Dims, lora: &LoraWeights) -> Result<LoraAdapter, String> {
    let cfg = &lora.config;
    let mut projs: Vec<Proj> = Vec::new();
    for t in &lora.tensors {
        let p = proj_of(&t.target.module)?;
        if !projs.contains(&p) {
            projs.push(p);
        }
    }
    projs.sort_by_key(|p| p.index());
    let mut ad = LoraAdapter::zeros(dims, cfg.r, cfg.lora_alpha as f32, cfg.use_rslora, &projs);
    let pairs = tensor_pairs(lora, &ad)?;
    if pairs.len() != 2 * dims.layers * projs.len() {
        return Err("the model needs the same LoRA targets in every layer".into());
    }
    for (src, dst) in pairs {
        ad.data[dst].copy_from_slice(&lora.data[src]);
    }
    Ok(ad)
}

/// The model's batch and next-token targets of a packed batch: labels follow Hugging Face
/// (aligned with the inputs, -100 ignored; each sequence's first label is -100), so the target
/// of position i is the label of i + 1.
pub fn batch_of(b: &PackedBatch) -> (Batch, Vec<i32>) {
    let mut targets: Vec<i32> = b.labels.iter().skip(1).copied().collect();
    targets.push(IGNORE_INDEX);
    let batch = Batch {
        tokens: b.input_ids.clone(),
        cu_seqlens: b.cu_seqlens.clone(),
        positions: b.position_ids.clone(),
    };
    (batch, targets)
}

/// Adds `n` times the model-layout gradients `g` (of a mean over `n` tokens) into the trainer's
/// `grads`, which want the gradient of the sum.
pub fn add_scaled_grads(grads: &mut LoraWeights, g: &LoraAdapter, n: f32) -> Result<(), String> {
    zip_tensors(grads, g, |dst, src| *dst += src * n)
}

/// Copies the model-layout adapter `ad` into `lora` (the trainer's layout), tensor by tensor.
pub fn copy_adapter_into(lora: &mut LoraWeights, ad: &LoraAdapter) -> Result<(), String> {
    zip_tensors(lora, ad, |dst, src| *dst = src)
}

/// `f(dst, src)` over every value of every A and B of `lora`, `src` being the same value of
/// `ad` (the two layouts order their tensors differently).
fn zip_tensors(
    lora: &mut LoraWeights,
    ad: &LoraAdapter,
    f: impl Fn(&mut f32, f32),
) -> Result<(), String> {
    for (dst, src) in tensor_pairs(lora, ad)? {
        for (d, &v) in lora.data[dst].iter_mut().zip(&ad.data[src]) {
            f(d, v);
        }
    }
    Ok(())
}

/// (range in `lora.data`, range in `ad.data`) of one A or B.
type TensorPair = (Range<usize>, Range<usize>);

/// Where each A and B of `lora` (the trainer's layout) lives in `ad` (the model's), A then B
/// per tensor.
fn tensor_pairs(lora: &LoraWeights, ad: &LoraAdapter) -> Result<Vec<TensorPair>, String> {
    let mut pairs = Vec::with_capacity(2 * lora.tensors.len());
    for t in &lora.tensors {
        let (layer, module) = (t.target.layer, &t.target.module);
        let slot = ad
            .slot(layer, proj_of(module)?)
            .ok_or_else(|| format!("layer {layer} {module} is not adapted in every layer"))?;
        if slot.a.len() != t.a.len() || slot.b.len() != t.b.len() {
            return Err(format!(
                "layer {layer} {module}: LoRA shapes differ from the model's"
            ));
        }
        pairs.push((t.a.clone(), slot.a.clone()));
        pairs.push((t.b.clone(), slot.b.clone()));
    }
    Ok(pairs)
}

impl LoraModel for LlamaTrainable {
    fn lora_shapes(&self) -> Vec<LoraTarget> {
        linear_targets(&self.model.config)
    }

    fn loss_and_grads(
        &mut self,
        batch: &PackedBatch,
        lora: &LoraWeights,
        grads: &mut LoraWeights,
    ) -> Result<f32, String> {
        let (b, targets) = batch_of(batch);
        let counted = targets.iter().filter(|t| **t != IGNORE_INDEX).count();
        if counted == 0 {
            return Ok(0.0);
        }
        let adapter = self.adapter_of(lora)?;
        let (mean, g) = self
            .model
            .loss_and_lora_grads(&b, &targets, &adapter)
            .map_err(|e| e.to_string())?;
        // The model differentiates the mean over counted tokens; the trainer wants the sum.
        let n = counted as f32;
        add_scaled_grads(grads, &g, n)?;
        Ok(mean * n)
    }

    fn loss(&mut self, batch: &PackedBatch, lora: &LoraWeights) -> Result<f32, String> {
        let (b, targets) = batch_of(batch);
        let counted = targets.iter().filter(|t| **t != IGNORE_INDEX).count();
        if counted == 0 {
            return Ok(0.0);
        }
        let adapter = self.adapter_of(lora)?;
        let mean = self
            .model
            .loss(&b, &targets, Some(&adapter))
            .map_err(|e| e.to_string())?;
        Ok(mean * counted as f32)
    }

    fn generate(
        &mut self,
        prompts: &[Vec<u32>],
        lora: &LoraWeights,
        max_new: usize,
        eos: &[u32],
    ) -> Result<Vec<Vec<u32>>, String> {
        let adapter = self.adapter_of(lora)?;
        let greedy = SamplingParams {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            seed: 0,
        };
        self.model
            .generate(prompts, max_new, eos, greedy, Some(&adapter))
            .map_err(|e| e.to_string())
    }
}
