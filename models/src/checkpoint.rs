//! Opening a checkpoint: a Hugging Face folder or a GGUF file, as one [`LoadedModel`].

use std::path::{Path, PathBuf};

use half::bf16;
use serde_json::Value;
use tokenizers::Tokenizer;

use crate::bnb4bit;
use crate::config::ModelConfig;
use crate::errors::{Error, ErrorKind, Result};
use crate::gguf::{config_from_gguf, tokenizer_from_gguf, GgmlType, GgufFile, GgufWeights};
use crate::safetensors_io::{Dtype, SafetensorsFiles};
use crate::tokenizer::{load_tokenizer, TokenizerConfig};

/// How a weight is stored on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StorageType {
    /// A safetensors dtype.
    Safetensors(Dtype),
    /// A ggml type (quantized or not), dequantized on read.
    Gguf(GgmlType),
    /// bitsandbytes NF4 (`load_in_4bit` checkpoints), dequantized on read.
    Bnb4bit,
}

/// Shape and storage of one weight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WeightInfo {
    /// Row-major Hugging Face shape (a Linear weight is `[out_features, in_features]`).
    pub shape: Vec<usize>,
    /// Storage type on disk.
    pub storage: StorageType,
}

/// The weights of a checkpoint under Hugging Face names, read on demand.
pub enum WeightSource {
    /// Memory-mapped safetensors shards.
    Safetensors(SafetensorsFiles),
    /// A GGUF file (dequantized, Q/K un-permuted on read).
    Gguf(GgufWeights),
}

impl WeightSource {
    /// All weight names, sorted.
    pub fn names(&self) -> Vec<&str> {
        match self {
            Self::Safetensors(st) => st.names().collect(),
            Self::Gguf(g) => g.names().collect(),
        }
    }

    /// Whether the checkpoint holds bitsandbytes 4-bit weights (a `load_in_4bit` save).
    pub fn has_bnb_4bit(&self) -> bool {
        match self {
            Self::Safetensors(st) => st.names().any(bnb4bit::is_quant_state),
            Self::Gguf(_) => false,
        }
    }

    /// The stored NF4 parts of `name` when it is a double-quantized bitsandbytes 4-bit weight
    /// (the GPU 4-bit mode uploads them as they are); `None` for any other weight.
    pub fn nf4_parts(&self, name: &str) -> Result<Option<bnb4bit::Nf4Parts>> {
        match self {
            Self::Safetensors(st) if bnb4bit::is_4bit(st, name) => bnb4bit::nf4_parts(st, name),
            _ => Ok(None),
        }
    }

    /// Shape and storage type of `name`, if present.
    pub fn info(&self, name: &str) -> Option<WeightInfo> {
        match self {
            Self::Safetensors(st) if bnb4bit::is_4bit(st, name) => Some(WeightInfo {
                // A quant state that does not parse shows as an empty shape here; reading the
                // weight reports why.
                shape: bnb4bit::shape(st, name).unwrap_or_default(),
                storage: StorageType::Bnb4bit,
            }),
            Self::Safetensors(st) => st.meta(name).map(|m| WeightInfo {
                shape: m.shape.clone(),
                storage: StorageType::Safetensors(m.dtype),
            }),
            Self::Gguf(g) => g.info(name).map(|t| WeightInfo {
                shape: t.shape(),
                storage: StorageType::Gguf(t.ggml_type),
            }),
        }
    }

    /// `name` as f32, row-major over its shape.
    pub fn to_f32(&self, name: &str) -> Result<Vec<f32>> {
        match self {
            Self::Safetensors(st) if bnb4bit::is_4bit(st, name) => bnb4bit::dequantize(st, name),
            Self::Safetensors(st) => st.to_f32(name),
            Self::Gguf(g) => g.to_f32(name),
        }
    }

    /// `name` as bf16 (exact for bf16 safetensors, round-to-nearest-even otherwise).
    pub fn to_bf16(&self, name: &str) -> Result<Vec<bf16>> {
        match self {
            Self::Safetensors(st) if bnb4bit::is_4bit(st, name) => {
                Ok(bnb4bit::dequantize(st, name)?
                    .into_iter()
                    .map(bf16::from_f32)
                    .collect())
            }
            Self::Safetensors(st) => st.to_bf16(name),
            Self::Gguf(g) => Ok(g.to_f32(name)?.into_iter().map(bf16::from_f32).collect()),
        }
    }
}

/// Everything needed to build and run a model from a checkpoint.
pub struct LoadedModel {
    /// The folder or file that was opened.
    pub path: PathBuf,
    /// Architecture and shapes.
    pub config: ModelConfig,
    /// The weights.
    pub weights: WeightSource,
    /// The tokenizer.
    pub tokenizer: Tokenizer,
    /// Chat template and bos/eos token strings.
    pub tokenizer_config: TokenizerConfig,
    /// Token ids that end generation: the config's eos ids, generation_config.json's, and the
    /// tokenizer's eos token, deduplicated in that order.
    pub eos_token_ids: Vec<u32>,
}

/// Opens a Hugging Face folder (config.json, safetensors, tokenizer.json and optionally
/// tokenizer_config.json / generation_config.json) or a `.gguf` file.
pub fn open_model(path: &Path) -> Result<LoadedModel> {
    if path.is_dir() {
        open_hf_folder(path)
    } else if path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
    {
        open_gguf(path)
    } else if path.exists() {
        Err(Error::new(
            path,
            ErrorKind::Unsupported,
            "expected a Hugging Face model folder or a .gguf file",
        ))
    } else {
        Err(Error::new(
            path,
            ErrorKind::Missing,
            "no such file or folder",
        ))
    }
}

fn open_hf_folder(dir: &Path) -> Result<LoadedModel> {
    let config = ModelConfig::from_file(&dir.join("config.json"))?;
    let weights = WeightSource::Safetensors(SafetensorsFiles::open(dir)?);
    let tokenizer = load_tokenizer(&dir.join("tokenizer.json"))?;
    let tc_path = dir.join("tokenizer_config.json");
    let tokenizer_config = if tc_path.is_file() {
        TokenizerConfig::from_file(&tc_path)?
    } else {
        TokenizerConfig::default()
    };
    let mut eos = config.eos_token_ids.clone();
    let gc_path = dir.join("generation_config.json");
    if gc_path.is_file() {
        eos.extend(generation_eos_ids(&gc_path)?);
    }
    Ok(finish(
        dir,
        config,
        weights,
        tokenizer,
        tokenizer_config,
        eos,
    ))
}

fn open_gguf(path: &Path) -> Result<LoadedModel> {
    let file = GgufFile::open(path)?;
    let config = config_from_gguf(&file)?;
    let (tokenizer, tokenizer_config) = tokenizer_from_gguf(&file)?;
    let eos = config.eos_token_ids.clone();
    let weights = WeightSource::Gguf(GgufWeights::new(file, &config)?);
    Ok(finish(
        path,
        config,
        weights,
        tokenizer,
        tokenizer_config,
        eos,
    ))
}

fn finish(
    path: &Path,
    config: ModelConfig,
    weights: WeightSource,
    tokenizer: Tokenizer,
    tokenizer_config: TokenizerConfig,
    mut eos: Vec<u32>,
) -> LoadedModel {
    if let Some(id) = tokenizer_config
        .eos_token
        .as_deref()
        .and_then(|t| tokenizer.token_to_id(t))
    {
        eos.push(id);
    }
    let mut eos_token_ids = Vec::new();
    for id in eos {
        if !eos_token_ids.contains(&id) {
            eos_token_ids.push(id);
        }
    }
    LoadedModel {
        path: path.to_path_buf(),
        config,
        weights,
        tokenizer,
        tokenizer_config,
        eos_token_ids,
    }
}

/// `eos_token_id` of a generation_config.json: absent, one id or a list.
fn generation_eos_ids(path: &Path) -> Result<Vec<u32>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::io(path, "cannot read generation config", &e))?;
    let value: Value = serde_json::from_str(&text)
        .map_err(|e| Error::new(path, ErrorKind::Malformed, format!("invalid JSON: {e}")))?;
    let ids: Vec<&Value> = match value.get("eos_token_id") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(items)) => items.iter().collect(),
        Some(v) => vec![v],
    };
    ids.into_iter()
        .map(|v| {
            v.as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| {
                    Error::new(
                        path,
                        ErrorKind::Malformed,
                        "field \"eos_token_id\" must hold token ids",
                    )
                })
        })
        .collect()
}
