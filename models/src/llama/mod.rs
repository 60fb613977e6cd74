//! The Llama family (Llama 3.x, Mistral, Qwen2/2.5, Qwen3) on the CPU, composed from the ops'
//! CPU references and the runtime's CPU GEMM: prefill of a packed batch, decoding with a KV
//! cache, the chunked cross-entropy loss, and the LoRA backward.
//!
//! Layout, llm.c style:
//! - [`weights::WeightStore`]: every weight in one flat f32 allocation, ranges per tensor;
//! - [`LlamaModel`]: config + weights + RoPE frequencies; `forward` (logits), `loss`,
//!   `prefill` / `decode` with a [`KvCache`], `loss_and_lora_grads`;
//! - [`Activations`]: what the backward reads, each field commented with its shape;
//! - [`lora::LoraAdapter`]: PEFT LoRA weights (and gradients in the same layout).
//!
//! Numerics: f32 storage. `Rounding::F32` is an f32 model (Hugging Face parity in f32);
//! `Rounding::BF16` rounds weights on load and every op's outputs to bf16, as a bf16 model
//! computes (GEMMs accumulate in f32 and round their output).
//!
//! Attention: inference (prefill/decode) uses [`attention::attend_cached`] over the KV cache
//! (it also implements Mistral's sliding window); the training path uses the ops' causal
//! varlen GQA reference (`ftrt_ops::attention`), whose backward the LoRA gradients go through.

pub mod activations;
pub mod attention;
pub mod backward;
pub mod chat;
pub mod gpu;
pub mod graph;
pub mod lora;
pub mod model;
pub mod sampling;
pub mod trainable;
pub mod weights;

pub use activations::{Activations, LayerActivations};
pub use attention::KvCache;
pub use chat::{
    chat_template_of, decode_text, encode_prompt, parse_prompts_jsonl, render_prompt, Prompt,
};
pub use lora::{LoraAdapter, LoraSlot, LoraStack};
pub use model::{Batch, LlamaModel};
pub use sampling::{generate_with, NextTokens, Sampler, SamplingParams};
pub use trainable::LlamaTrainable;
pub use weights::{Dims, LayerWeights, Proj, WeightStore};

pub use ftrt_ops::dsl::Rounding;

/// Why a model could not be built or run.
#[derive(Debug, thiserror::Error)]
pub enum LlamaError {
    /// Reading the checkpoint failed.
    #[error(transparent)]
    Load(#[from] crate::errors::Error),
    /// A weight is missing or has the wrong shape.
    #[error("{0}")]
    Weights(String),
    /// The LoRA adapter does not fit the model or cannot be read.
    #[error("{0}")]
    Adapter(String),
    /// Bad input: a token id out of range, inconsistent sequence lengths, ...
    #[error("{0}")]
    Input(String),
    /// Something this CPU path does not support (said with the reason).
    #[error("{0}")]
    Unsupported(String),
}
