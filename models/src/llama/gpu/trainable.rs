//! [`GpuLlama`] as a [`LoraModel`] for the trainer: the optimizer stays on the host (the
//! trainer's AdamW over its f32 [`LoraWeights`]); each micro-batch uploads the adapter (f32
//! master + bf16 copy), runs forward + backward on the GPU and downloads the f32 gradients.
//! Generation runs on the GPU too (KV cache, all prompts decoded together: [`super::decode`]).
use super::{GpuLlama, GpuResult, GpuSteps, KeepBf16};
use crate::checkpoint::WeightSource;
use crate::data::{PackedBatch, IGNORE_INDEX};
use crate::llama::trainable::{adapter_of, add_scaled_grads, batch_of};
use crate::llama::{generate_with, LlamaModel, LoraAdapter, SamplingParams};
use crate::lora::{linear_targets, LoraTarget, LoraWeights};
use crate::train::LoraModel;
use ftrt_runtime::Gpu;

/// How the GPU model trades memory for recomputation (`ftrt train --gradient-checkpointing`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Checkpointing {
    /// Keep as many layers' activations as fit the GPU memory that is free once the weights
    /// and the adapter are placed (less a 1 GiB margin); recompute the others.
    Auto,
    /// Recompute every layer and offload their checkpoints to pinned host memory.
    Lean,
    /// Keep every activation (no recompute).
    KeepAll,
}

/// The GPU model for training and generation.
pub struct GpuTrainable {
    gpu_model: GpuLlama<'static>,
    targets: Vec<LoraTarget>,
    checkpointing: Checkpointing,
    /// Whether the memory plan was made (at the first batch, once the adapter is placed).
    planned: bool,
}

/// How [`GpuTrainable::new`] places the model on the GPU.
#[derive(Debug, Clone)]
pub struct GpuPlacement<'a> {
    /// Tokens per micro-batch and the largest LoRA rank the buffers are sized for.
    pub max_tokens: usize,
    pub max_rank: usize,
    /// The longest sequence in a micro-batch (the checkpoint offload's plan weighs attention by
    /// it, [`GpuLlama::set_max_seq_len`]).
    pub max_seq_len: usize,
    /// QLoRA: NF4 projection weights except those named to stay bf16.
    pub load_in_4bit: Option<&'a KeepBf16>,
    /// The keep / recompute / offload choice, made at the first batch.
    pub checkpointing: Checkpointing,
    /// The input embedding table in pinned host memory.
    pub offload_embeddings: bool,
}

impl GpuTrainable {
    /// Uploads `model` to `gpu` as `place` says: with `load_in_4bit`, the projection weights
    /// as NF4 ([`GpuLlama::from_model_4bit`]: `source`, the model's checkpoint, stores them
    /// when it is a bitsandbytes 4-bit save); with `offload_embeddings`, the input embedding
    /// table in pinned host memory.
    pub fn new(
        gpu: &'static Gpu,
        model: LlamaModel,
        source: Option<&WeightSource>,
        place: &GpuPlacement,
    ) -> GpuResult<Self> {
        let (n, r) = (place.max_tokens, place.max_rank);
        let mut gpu_model = match place.load_in_4bit {
            Some(keep) => GpuLlama::from_model_4bit(gpu, &model, n, r, keep, source)?,
            None => GpuLlama::from_model(gpu, &model, n, r)?,
        };
        gpu_model.set_max_seq_len(place.max_seq_len);
        if place.offload_embeddings {
            gpu_model
                .set_embeddings_in_host_memory()
                .map_err(|e| format!("--offload-embeddings: {e}"))?;
        }
        let targets = linear_targets(&model.config);
        Ok(Self {
            gpu_model,
            targets,
            checkpointing: place.checkpointing,
            planned: false,
        })
    }

    fn adapter_of(&self, lora: &LoraWeights) -> Result<LoraAdapter, String> {
        adapter_of(&self.gpu_model.dims, lora)
    }

    /// Applies [`Checkpointing`] once the adapter's state is on the GPU (the activations are
    /// allocated at the next batch) and says what it chose.
    fn plan_memory(&mut self) -> GpuResult<()> {
        const MARGIN: usize = 1 << 30;
        let m = &mut self.gpu_model;
        let layers = m.dims.layers;
        let lean = |m: &mut GpuLlama| {
            m.set_kept_layers(0);
            m.set_offload_residuals(true);
        };
        match self.checkpointing {
            Checkpointing::KeepAll => m.set_kept_layers(layers),
            Checkpointing::Lean => lean(m),
            Checkpointing::Auto => {
                let (free, _) = m
                    .gpu()
                    .context()
                    .mem_get_info()
                    .map_err(|e| format!("reading free GPU memory: {e}"))?;
                let budget = (m.held_bytes() + free).saturating_sub(MARGIN);
                match m.kept_layers_for_budget(budget) {
                    Some(k) => m.set_kept_layers(k),
                    None => lean(m),
                }
                m.set_resident_attention(m.resident_attention_for_budget(budget));
            }
        }
        eprintln!(
            "GPU memory plan: activations of {} of {layers} layers kept, {} recomputed{}{}",
            m.kept_layers(),
            layers - m.kept_layers(),
            if m.offload_residuals() {
                ", their checkpoints offloaded to host memory"
            } else {
                ""
            },
            match m.resident_attention() {
                0 => String::new(),
                k => format!(", the attention outputs of {k} of them kept on the GPU"),
            }
        );
        self.planned = true;
        Ok(())
    }
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
        if !self.planned {
            self.plan_memory()?;
        }
        self.gpu_model.zero_grads()?;
        let mean = self.gpu_model.loss_and_grads(&b, &targets)?;
        let g = self.gpu_model.download_grads()?;
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
        self.gpu_model.set_lora(&adapter)?;
        let mean = self.gpu_model.loss(&b, &targets)?;
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
        self.gpu_model.set_lora(&adapter)?;
        let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
        let capacity = (longest + max_new).min(self.gpu_model.max_tokens());
        let cache = self.gpu_model.new_kv_cache(prompts.len(), capacity)?;
        let mut steps = GpuSteps {
            model: &mut self.gpu_model,
            cache,
        };
        // A prompt that leaves no room in the cache stops early instead of failing the run.
        let room = capacity.saturating_sub(longest).max(1).min(max_new);
        generate_with(&mut steps, prompts, room, eos, SamplingParams::default())
    }
}
