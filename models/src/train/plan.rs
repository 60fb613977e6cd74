//! How much memory a LoRA run on the CPU backend needs, from the config alone (before any
//! weight is read), and whether this machine has it.
//!
//! The CPU path holds every base weight in f32 (GGUF and bf16 checkpoints are expanded on
//! load), the LoRA weights, their gradients and optimizer state, and the activations that the
//! backward reads for one micro-batch of `token_budget` tokens (per layer: residuals, norm
//! outputs, q/k/v, attention output, gate/up/act, LoRA intermediates), plus transient buffers
//! of a few (tokens x max(hidden, intermediate)) matrices and one cross-entropy chunk.

use std::fmt;

use super::optim::{OptimKind, BLOCK, MIN_8BIT_SIZE};
use crate::config::ModelConfig;
use crate::lora::LoraTarget;

/// Vocabulary columns of one cross-entropy chunk on the CPU path.
const CE_CHUNK: usize = 8192;

/// The memory of a run, in bytes, by kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryPlan {
    /// Base weights in f32.
    pub weights: u64,
    /// LoRA weights and their gradients.
    pub lora: u64,
    /// Optimizer moments.
    pub optimizer: u64,
    /// Saved activations of one micro-batch.
    pub activations: u64,
    /// Transient buffers of the forward/backward and the loss.
    pub scratch: u64,
}

impl MemoryPlan {
    /// The estimate for a model of `config` training rank-`r` adapters on `targets` with
    /// micro-batches of `token_budget` tokens. Nothing is allocated.
    pub fn estimate(
        config: &ModelConfig,
        targets: &[LoraTarget],
        r: usize,
        token_budget: usize,
        optim: OptimKind,
    ) -> Self {
        let c = config.hidden_size as u64;
        let q = (config.num_attention_heads * config.head_dim) as u64;
        let kv = (config.num_key_value_heads * config.head_dim) as u64;
        let i = config.intermediate_size as u64;
        let v = config.vocab_size as u64;
        let layers = config.num_hidden_layers as u64;
        let per_layer = c * q * 2 + c * kv * 2 + 3 * c * i + 2 * c;
        let head = if config.tie_word_embeddings { 0 } else { v * c };
        let weights = 4 * (v * c + head + c + layers * per_layer);
        let sizes: Vec<u64> = targets
            .iter()
            .flat_map(|t| [(r * t.in_features) as u64, (t.out_features * r) as u64])
            .collect();
        let n: u64 = sizes.iter().sum();
        let optimizer: u64 = sizes
            .iter()
            .map(|&len| {
                if optim == OptimKind::AdamW8bit && len >= MIN_8BIT_SIZE as u64 {
                    2 * len + 8 * len.div_ceil(BLOCK as u64)
                } else {
                    8 * len
                }
            })
            .sum();
        let t = token_budget as u64;
        let r = r as u64;
        let heads = config.num_attention_heads as u64;
        let per_token_layer = 4 * c + 2 * q + 2 * kv + 3 * i + heads + 2 + 7 * r;
        let activations = 4 * t * (layers * per_token_layer + 3 * c + 2 * q);
        let scratch = 4 * t * (6 * c.max(i) + (CE_CHUNK as u64).min(v));
        Self {
            weights,
            lora: 8 * n,
            optimizer,
            activations,
            scratch,
        }
    }

    /// Everything together.
    pub fn total(&self) -> u64 {
        self.weights + self.lora + self.optimizer + self.activations + self.scratch
    }

    /// Err with the breakdown when the total exceeds `available` bytes.
    pub fn check_fits(&self, available: u64) -> Result<(), String> {
        if self.total() <= available {
            Ok(())
        } else {
            Err(format!(
                "this run does not fit: it needs about {} but {} is available\n{self}\nreduce \
                 --max-seq-length or --per-device-train-batch-size, or use a smaller model",
                gib(self.total()),
                gib(available)
            ))
        }
    }
}

pub use ftrt_runtime::offload::gib;

impl fmt::Display for MemoryPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "  base weights (f32)   {:>12}", gib(self.weights))?;
        writeln!(f, "  LoRA weights + grads {:>12}", gib(self.lora))?;
        writeln!(f, "  optimizer state      {:>12}", gib(self.optimizer))?;
        writeln!(f, "  saved activations    {:>12}", gib(self.activations))?;
        writeln!(f, "  scratch              {:>12}", gib(self.scratch))?;
        write!(f, "  total                {:>12}", gib(self.total()))
    }
}
