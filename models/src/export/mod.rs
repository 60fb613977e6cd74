//! Export of a model with a PEFT LoRA adapter merged into its weights (PEFT's
//! `merge_and_unload`, Unsloth's `save_pretrained_merged` / `save_pretrained_gguf`):
//!
//! - [`merge`]: W' = W + s B A for every adapted Linear, in f32, rounded once when written;
//! - [`hf_folder`]: a Hugging Face folder (safetensors shards, config, tokenizer files), for
//!   transformers, vLLM or another fine-tune;
//! - [`gguf_file`]: a GGUF file for llama.cpp / Ollama, its metadata copied from a GGUF base or
//!   built from a Hugging Face folder ([`gguf_meta`]).

pub mod gguf_file;
pub mod gguf_meta;
pub mod hf_folder;
pub mod merge;

use std::fmt;

pub use gguf_file::write_gguf_file;
pub use hf_folder::{write_hf_folder, MAX_SHARD_BYTES};
pub use merge::MergedWeights;

use crate::gguf::types::GgmlType;

/// Where the merged model goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportFormat {
    /// A Hugging Face folder.
    Safetensors,
    /// One GGUF file.
    Gguf,
}

/// The type the merged matrices are written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportDtype {
    F32,
    F16,
    BF16,
    /// llama.cpp's 8-bit blocks (GGUF only).
    Q8_0,
}

impl ExportDtype {
    /// Every dtype with its command-line name.
    pub const ALL: [(ExportDtype, &'static str); 4] = [
        (Self::F32, "f32"),
        (Self::F16, "f16"),
        (Self::BF16, "bf16"),
        (Self::Q8_0, "q8_0"),
    ];

    /// The dtype called `name` (`f32`, `f16`, `bf16`, `q8_0`).
    pub fn parse(name: &str) -> Result<Self, String> {
        Self::ALL
            .iter()
            .find(|(_, n)| n.eq_ignore_ascii_case(name))
            .map(|(d, _)| *d)
            .ok_or_else(|| format!("unknown dtype {name:?}: f32, f16, bf16 or q8_0"))
    }

    /// The safetensors dtype name; Q8_0 has none (a GGUF type), which is an error saying so.
    pub fn safetensors_name(self) -> Result<&'static str, String> {
        match self {
            Self::F32 => Ok("F32"),
            Self::F16 => Ok("F16"),
            Self::BF16 => Ok("BF16"),
            Self::Q8_0 => Err(format!(
                "{self} is a GGUF type; safetensors are written as f32, f16 or bf16"
            )),
        }
    }

    /// config.json's `torch_dtype`.
    fn torch_name(self) -> &'static str {
        match self {
            Self::F32 => "float32",
            Self::F16 => "float16",
            Self::BF16 | Self::Q8_0 => "bfloat16",
        }
    }

    /// The ggml type of a GGUF matrix.
    pub fn ggml_type(self) -> GgmlType {
        match self {
            Self::F32 => GgmlType::F32,
            Self::F16 => GgmlType::F16,
            Self::BF16 => GgmlType::BF16,
            Self::Q8_0 => GgmlType::Q8_0,
        }
    }

    /// llama.cpp's `general.file_type` (`enum llama_ftype`): ALL_F32 0, MOSTLY_F16 1,
    /// MOSTLY_Q8_0 7, MOSTLY_BF16 32.
    fn llama_file_type(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Q8_0 => 7,
            Self::BF16 => 32,
        }
    }
}

impl fmt::Display for ExportDtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = Self::ALL
            .iter()
            .find(|(d, _)| d == self)
            .map_or("?", |x| x.1);
        f.write_str(name)
    }
}
