//! [`GpuLlama`] as a [`LoraModel`] for the trainer: the optimizer stays on the host (the
//! trainer's AdamW over its f32 [`LoraWeights`]); each micro-batch uploads the adapter (f32
//! master + bf16 copy), runs forward + backward on the GPU and downloads the f32 gradients.
//! Generation runs on the CPU model kept beside it (no GPU decode path yet).
use super::{GpuLlama, GpuResult};
use crate::data::{PackedBatch, IGNORE_INDEX};
use crate::llama::{Batch, LlamaModel, LlamaTrainable, LoraAdapter, Proj};
use crate::lora::{linear_targets, LoraTarget, LoraWeights};
use crate::train::LoraModel;
use ftrt_runtime::Gpu;

/// The GPU model for training, with the CPU model for generation.
pub struct GpuTrainable {
    gpu_model: GpuLlama<'static>,
    cpu: LlamaTrainable,
    targets: Vec<LoraTarget>,
}

impl GpuTrainable {
    /// Uploads `model` to `gpu` with buffers for micro-batches of up to `max_tokens` tokens and
    /// LoRA rank up to `max_rank`; with `load_in_4bit`, the projection weights as NF4 (QLoRA,
    /// [`GpuLlama::from_model_4bit`]).
    pub fn new(
        gpu: &'static Gpu,
        model: LlamaModel,
        max_tokens: usize,
        max_rank: usize,
        load_in_4bit: bool,
    ) -> GpuResult<Self> {
        let gpu_model = if load_in_4bit {
            GpuLlama::from_model_4bit(gpu, &model, max_tokens, max_rank)?
        } else {
            GpuLlama::from_model(gpu, &model, max_tokens, max_rank)?
        };
        let targets = linear_targets(&model.config);
        Ok(Self {
            gpu_model,
            cpu: LlamaTrainable::new(model),
            targets,
        })
    }

    fn adapter_of(&self, lora: &LoraWeights) -> Result<LoraAdapter, String> {
        adapter_of(&self.gpu_model.dims, lora)
    }
}

fn proj_of(module: &str) -> Result<Proj, String> {
    Proj::ALL
        .into_iter()
        .find(|p| p.module() == module)
        .ok_or_else(|| format!("unknown module {module}"))
}

/// The model-layout adapter holding the same values as the trainer's `lora`.
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
    let mut seen = 0;
    for t in &lora.tensors {
        let slot = ad
            .slot(t.target.layer, proj_of(&t.target.module)?)
            .cloned()
            .ok_or_else(|| {
                format!(
                    "layer {} {} is not adapted in every layer",
                    t.target.layer, t.target.module
                )
            })?;
        if slot.a.len() != t.a.len() || slot.b.len() != t.b.len() {
            return Err(format!(
                "layer {} {}: LoRA shapes differ from the model's",
                t.target.layer, t.target.module
            ));
        }
        ad.data[slot.a].copy_from_slice(&lora.data[t.a.clone()]);
        ad.data[slot.b].copy_from_slice(&lora.data[t.b.clone()]);
        seen += 1;
    }
    if seen != dims.layers * projs.len() {
        return Err("the GPU model needs the same LoRA targets in every layer".into());
    }
    Ok(ad)
}

/// The model's batch and next-token targets of a packed batch (labels shifted by one).
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

impl LoraModel for GpuTrainable {
    fn lora_shapes(&self) -> Vec<LoraTarget> {
        self.targets.clone()
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
        self.gpu_model.set_lora(&adapter)?;
        self.gpu_model.zero_grads()?;
        let mean = self.gpu_model.loss_and_grads(&b, &targets)?;
        let g = self.gpu_model.download_grads()?;
        // The model differentiates the mean over counted tokens; the trainer wants the sum.
        let n = counted as f32;
        for t in &grads.tensors {
            let slot = g
                .slot(t.target.layer, proj_of(&t.target.module)?)
                .cloned()
                .ok_or("gradient slot missing")?;
            for (dst, src) in grads.data[t.a.clone()].iter_mut().zip(&g.data[slot.a]) {
                *dst += src * n;
            }
            for (dst, src) in grads.data[t.b.clone()].iter_mut().zip(&g.data[slot.b]) {
                *dst += src * n;
            }
        }
        Ok(mean * n)
    }

    fn loss(&mut self, batch: &PackedBatch, lora: &LoraWeights) -> Result<f32, String> {
        let (b, targets) = batch_of(batch);
        let counted = targets.iter().filter(|t| **t != IGNORE_INDEX).count();
        if counted == 0 {
            return Ok(0.0);
        }
        let adapter = self.adapter_of(lora)?;
        self.gpu_model.set_lora(&adapter)?;
        let mean = self.gpu_model.loss(&b, &targets)?;
        Ok(mean * counted as f32)
    }

    fn generate(
        &mut self,
        prompt: &[u32],
        lora: &LoraWeights,
        max_new: usize,
        eos: &[u32],
    ) -> Result<Vec<u32>, String> {
        self.cpu.generate(prompt, lora, max_new, eos)
    }
}
