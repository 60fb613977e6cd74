//! [`ModelConfig`] from GGUF metadata (`general.architecture` and its `{arch}.*` keys).
//!
//! | GGUF key                                  | config field               |
//! |-------------------------------------------|----------------------------|
//! | `{arch}.embedding_length`                 | `hidden_size`              |
//! | `{arch}.feed_forward_length`              | `intermediate_size`        |
//! | `{arch}.block_count`                      | `num_hidden_layers`        |
//! | `{arch}.attention.head_count`             | `num_attention_heads`      |
//! | `{arch}.attention.head_count_kv`          | `num_key_value_heads`      |
//! | `{arch}.attention.key_length`, else `{arch}.rope.dimension_count` | `head_dim` |
//! | `{arch}.vocab_size`, else the token count | `vocab_size`               |
//! | `{arch}.attention.layer_norm_rms_epsilon` | `rms_norm_eps`             |
//! | `{arch}.rope.freq_base`                   | `rope_theta`               |
//! | `{arch}.context_length`                   | `max_position_embeddings`  |
//! | tensor `rope_freqs.weight`                | `rope_scaling` (factors)   |
//! | no tensor `output.weight`                 | `tie_word_embeddings`      |
//! | `tokenizer.ggml.bos_token_id`, `eos_token_id`, `eot_token_id` | bos / eos ids |

use super::names::ROPE_FREQS;
use super::reader::GgufFile;
use super::value::MetaValue;
use crate::config::{Architecture, ModelConfig, RopeScaling};
use crate::errors::{Error, ErrorKind, Result};

/// GGUF `general.architecture` values this crate loads, with their architecture.
const GGUF_ARCHS: [(&str, Architecture); 3] = [
    ("llama", Architecture::Llama),
    ("qwen2", Architecture::Qwen2),
    ("qwen3", Architecture::Qwen3),
];

/// The value of `general.architecture` (e.g. "llama"), checked to be supported.
pub fn gguf_arch(file: &GgufFile) -> Result<(&str, Architecture)> {
    let name = file
        .get("general.architecture")
        .and_then(MetaValue::as_str)
        .ok_or_else(|| missing(file, "general.architecture"))?;
    GGUF_ARCHS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|&(n, arch)| (n, arch))
        .ok_or_else(|| {
            let names: Vec<&str> = GGUF_ARCHS.iter().map(|(n, _)| *n).collect();
            Error::new(
                file.path(),
                ErrorKind::Unsupported,
                format!(
                    "unsupported architecture \"{name}\"; supported GGUF architectures: {}",
                    names.join(", ")
                ),
            )
        })
}

/// Builds the model configuration of `file` from its metadata and tensor list.
pub fn config_from_gguf(file: &GgufFile) -> Result<ModelConfig> {
    let (name, arch) = gguf_arch(file)?;
    let key = |k: &str| format!("{name}.{k}");
    let req = |k: &str| req_usize(file, &key(k));
    let hidden_size = req("embedding_length")?;
    let num_attention_heads = req("attention.head_count")?;
    if num_attention_heads == 0 {
        return Err(Error::new(
            file.path(),
            ErrorKind::Malformed,
            "attention.head_count is 0",
        ));
    }
    let num_key_value_heads =
        opt_usize(file, &key("attention.head_count_kv"))?.unwrap_or(num_attention_heads);
    let head_dim = match opt_usize(file, &key("attention.key_length"))? {
        Some(d) => d,
        None => opt_usize(file, &key("rope.dimension_count"))?
            .unwrap_or(hidden_size / num_attention_heads),
    };
    let vocab_size = match opt_usize(file, &key("vocab_size"))? {
        Some(v) => v,
        None => file
            .get("tokenizer.ggml.tokens")
            .and_then(MetaValue::as_array)
            .map(<[MetaValue]>::len)
            .ok_or_else(|| missing(file, &key("vocab_size")))?,
    };
    let rope_scaling = match file.tensor(ROPE_FREQS) {
        Some(_) => Some(RopeScaling::FreqFactors(file.dequantize(ROPE_FREQS)?)),
        None => match file
            .get(&key("rope.scaling.type"))
            .and_then(MetaValue::as_str)
        {
            None | Some("none") => None,
            Some(other) => {
                return Err(Error::new(
                    file.path(),
                    ErrorKind::Unsupported,
                    format!("rope scaling type \"{other}\" is not supported"),
                ))
            }
        },
    };
    let has = |t: &str| file.tensor(t).is_some();
    let mut eos_token_ids = Vec::new();
    for k in ["tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"] {
        if let Some(id) = opt_token_id(file, k)? {
            if !eos_token_ids.contains(&id) {
                eos_token_ids.push(id);
            }
        }
    }
    Ok(ModelConfig {
        arch,
        hidden_size,
        intermediate_size: req("feed_forward_length")?,
        num_hidden_layers: req("block_count")?,
        num_attention_heads,
        num_key_value_heads,
        head_dim,
        vocab_size,
        rms_norm_eps: opt_f64(file, &key("attention.layer_norm_rms_epsilon"))?.unwrap_or(1e-6),
        rope_theta: opt_f64(file, &key("rope.freq_base"))?.unwrap_or(10_000.0),
        rope_scaling,
        tie_word_embeddings: !has("output.weight"),
        max_position_embeddings: req("context_length")?,
        qkv_bias: has("blk.0.attn_q.bias"),
        o_proj_bias: has("blk.0.attn_output.bias"),
        mlp_bias: has("blk.0.ffn_up.bias"),
        qk_norm: has("blk.0.attn_q_norm.weight"),
        sliding_window: None,
        bos_token_id: opt_token_id(file, "tokenizer.ggml.bos_token_id")?,
        eos_token_ids,
        torch_dtype: None,
    })
}

fn missing(file: &GgufFile, key: &str) -> Error {
    Error::new(
        file.path(),
        ErrorKind::Missing,
        format!("missing metadata key \"{key}\""),
    )
}

fn bad(file: &GgufFile, key: &str, why: &str) -> Error {
    Error::new(
        file.path(),
        ErrorKind::Malformed,
        format!("metadata \"{key}\" {why}"),
    )
}

fn req_usize(file: &GgufFile, key: &str) -> Result<usize> {
    opt_usize(file, key)?.ok_or_else(|| missing(file, key))
}

fn opt_usize(file: &GgufFile, key: &str) -> Result<Option<usize>> {
    file.get(key)
        .map(|v| {
            v.as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .ok_or_else(|| bad(file, key, "must be a non-negative integer"))
        })
        .transpose()
}

fn opt_token_id(file: &GgufFile, key: &str) -> Result<Option<u32>> {
    file.get(key)
        .map(|v| {
            v.as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| bad(file, key, "must be a token id"))
        })
        .transpose()
}

fn opt_f64(file: &GgufFile, key: &str) -> Result<Option<f64>> {
    file.get(key)
        .map(|v| v.as_f64().ok_or_else(|| bad(file, key, "must be a float")))
        .transpose()
}
