//! A merged model as a Hugging Face folder, as `save_pretrained` writes one: safetensors shards
//! of at most 5 GB (`model.safetensors`, or `model-0000i-of-0000n.safetensors` with
//! `model.safetensors.index.json`), `config.json` with the written dtype, and the tokenizer
//! files. From a Hugging Face source the tokenizer files are copied and its config is kept
//! (its 4-bit `quantization_config` dropped: the weights are dense now); from a GGUF source
//! they are rebuilt from the GGUF metadata.

use std::io::Write;
use std::path::Path;

use serde_json::{json, Map, Value};

use super::merge::MergedWeights;
use super::ExportDtype;
use crate::checkpoint::WeightSource;
use crate::config::{Architecture, ModelConfig, RopeScaling};
use crate::gguf::writer::encode;
use crate::train::atomic::{stage_with, write_atomic};

/// Hugging Face's default `max_shard_size`: 5 GB.
pub const MAX_SHARD_BYTES: usize = 5_000_000_000;
/// Files of a Hugging Face folder that describe the tokenizer and generation, copied as they are.
const COPIED_FILES: [&str; 6] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
    "tokenizer.model",
];

/// Writes the merged weights of `merged` in `dtype` (F32, F16 or BF16) and the config and
/// tokenizer files into the folder `out` (created if needed). `on_tensor` is called after each
/// tensor is written, with its name.
pub fn write_hf_folder(
    merged: &MergedWeights,
    dtype: ExportDtype,
    out: &Path,
    max_shard_bytes: usize,
    on_tensor: &mut dyn FnMut(&str),
) -> Result<(), String> {
    let st_dtype = dtype.safetensors_name()?;
    std::fs::create_dir_all(out).map_err(|e| format!("{}: cannot create: {e}", out.display()))?;
    let mut tensors = Vec::new();
    for name in merged.names() {
        let shape = merged.shape(&name)?;
        let bytes = shape.iter().product::<usize>() * dtype.ggml_type().type_size();
        tensors.push((name, shape, bytes));
    }
    let shards = split_shards(&tensors, max_shard_bytes);
    let n = shards.len();
    let file_name = |i: usize| {
        if n == 1 {
            "model.safetensors".to_owned()
        } else {
            format!("model-{:05}-of-{n:05}.safetensors", i + 1)
        }
    };
    let mut weight_map = Map::new();
    for (i, shard) in shards.iter().enumerate() {
        let part = &tensors[shard.clone()];
        write_shard(
            merged,
            dtype,
            st_dtype,
            part,
            &out.join(file_name(i)),
            on_tensor,
        )?;
        for (name, _, _) in part {
            weight_map.insert(name.clone(), json!(file_name(i)));
        }
    }
    if n > 1 {
        let total: usize = tensors.iter().map(|t| t.2).sum();
        let index = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        write_json(&out.join("model.safetensors.index.json"), &index)?;
    }
    let model = merged.model();
    match &model.weights {
        WeightSource::Safetensors(_) => {
            let src = &model.path;
            let text = std::fs::read_to_string(src.join("config.json"))
                .map_err(|e| format!("{}: {e}", src.join("config.json").display()))?;
            let mut config: Value = serde_json::from_str(&text)
                .map_err(|e| format!("{}: {e}", src.join("config.json").display()))?;
            set_dtype(&mut config, dtype);
            write_json(&out.join("config.json"), &config)?;
            for f in COPIED_FILES {
                if src.join(f).is_file() {
                    let bytes = std::fs::read(src.join(f))
                        .map_err(|e| format!("{}: {e}", src.join(f).display()))?;
                    write_atomic(&out.join(f), &bytes)?;
                }
            }
        }
        WeightSource::Gguf(_) => {
            let mut config = hf_config_json(&model.config)?;
            set_dtype(&mut config, dtype);
            write_json(&out.join("config.json"), &config)?;
            let tokenizer = model
                .tokenizer
                .to_string(true)
                .map_err(|e| format!("tokenizer: {e}"))?;
            write_atomic(&out.join("tokenizer.json"), tokenizer.as_bytes())?;
            let tc = &model.tokenizer_config;
            let mut t = json!({
                "tokenizer_class": "PreTrainedTokenizerFast",
                "clean_up_tokenization_spaces": false,
                "model_max_length": model.config.max_position_embeddings,
            });
            for (key, value) in [
                ("bos_token", tc.bos_token.as_ref().map(|s| json!(s))),
                ("eos_token", tc.eos_token.as_ref().map(|s| json!(s))),
                ("add_bos_token", tc.add_bos_token.map(|b| json!(b))),
                ("chat_template", tc.chat_template.as_ref().map(|s| json!(s))),
            ] {
                if let Some(v) = value {
                    t[key] = v;
                }
            }
            write_json(&out.join("tokenizer_config.json"), &t)?;
            let generation = json!({
                "bos_token_id": model.config.bos_token_id,
                "eos_token_id": eos_json(&model.eos_token_ids),
            });
            write_json(&out.join("generation_config.json"), &generation)?;
        }
    }
    Ok(())
}

/// Consecutive ranges of `tensors` (name, shape, bytes) of at most `max_bytes` each (a larger
/// tensor alone in its own), as `save_pretrained`'s sharding fills shards in order.
fn split_shards(
    tensors: &[(String, Vec<usize>, usize)],
    max_bytes: usize,
) -> Vec<std::ops::Range<usize>> {
    let mut shards = Vec::new();
    let (mut start, mut size) = (0, 0);
    for (i, t) in tensors.iter().enumerate() {
        if i > start && size + t.2 > max_bytes {
            shards.push(start..i);
            (start, size) = (i, 0);
        }
        size += t.2;
    }
    shards.push(start..tensors.len());
    shards
}

/// One safetensors file, streamed: the 8-byte header length, the JSON header (names, dtype,
/// shapes, data offsets, `{"format": "pt"}` metadata) padded with spaces to 8 bytes, then each
/// tensor's little-endian values in header order.
fn write_shard(
    merged: &MergedWeights,
    dtype: ExportDtype,
    st_dtype: &str,
    tensors: &[(String, Vec<usize>, usize)],
    path: &Path,
    on_tensor: &mut dyn FnMut(&str),
) -> Result<(), String> {
    let mut header = Map::new();
    header.insert("__metadata__".into(), json!({"format": "pt"}));
    let mut offset = 0;
    for (name, shape, bytes) in tensors {
        header.insert(
            name.clone(),
            json!({"dtype": st_dtype, "shape": shape, "data_offsets": [offset, offset + bytes]}),
        );
        offset += bytes;
    }
    let mut text = serde_json::to_string(&Value::Object(header)).map_err(|e| e.to_string())?;
    text.extend(std::iter::repeat_n(
        ' ',
        text.len().next_multiple_of(8) - text.len(),
    ));
    let staged = stage_with(path, |w| {
        w.write_all(&(text.len() as u64).to_le_bytes())?;
        w.write_all(text.as_bytes())?;
        for (name, _, _) in tensors {
            let values = merged.get(name).map_err(std::io::Error::other)?;
            w.write_all(&encode(dtype.ggml_type(), &values).map_err(std::io::Error::other)?)?;
            on_tensor(name);
        }
        Ok(())
    })?;
    staged.commit()
}

/// Sets `torch_dtype` (and `dtype`, the key newer transformers write, when present) and drops a
/// `quantization_config`: the merged weights are dense.
fn set_dtype(config: &mut Value, dtype: ExportDtype) {
    if let Some(obj) = config.as_object_mut() {
        let name = dtype.torch_name();
        obj.insert("torch_dtype".into(), json!(name));
        if obj.contains_key("dtype") {
            obj.insert("dtype".into(), json!(name));
        }
        obj.remove("quantization_config");
    }
}

fn eos_json(ids: &[u32]) -> Value {
    match ids {
        [one] => json!(one),
        many => json!(many),
    }
}

/// The `config.json` transformers would write for `c` (a model read from GGUF metadata).
pub fn hf_config_json(c: &ModelConfig) -> Result<Value, String> {
    let (_, model_type, class) = Architecture::SUPPORTED
        .iter()
        .find(|(a, _, _)| *a == c.arch)
        .copied()
        .ok_or("unsupported architecture")?;
    let mut v = json!({
        "architectures": [class],
        "model_type": model_type,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads,
        "head_dim": c.head_dim,
        "vocab_size": c.vocab_size,
        "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta,
        "max_position_embeddings": c.max_position_embeddings,
        "tie_word_embeddings": c.tie_word_embeddings,
        "hidden_act": "silu",
        "bos_token_id": c.bos_token_id,
        "eos_token_id": eos_json(&c.eos_token_ids),
        "use_cache": true,
    });
    match c.arch {
        Architecture::Llama => {
            v["attention_bias"] = json!(c.qkv_bias || c.o_proj_bias);
            v["mlp_bias"] = json!(c.mlp_bias);
        }
        Architecture::Qwen3 => v["attention_bias"] = json!(c.qkv_bias),
        Architecture::Mistral | Architecture::Qwen2 => {}
    }
    if let Some(w) = c.sliding_window {
        v["sliding_window"] = json!(w);
    }
    match &c.rope_scaling {
        None => {}
        Some(RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        }) => {
            v["rope_scaling"] = json!({
                "rope_type": "llama3",
                "factor": factor,
                "low_freq_factor": low_freq_factor,
                "high_freq_factor": high_freq_factor,
                "original_max_position_embeddings": original_max_position_embeddings,
            })
        }
        Some(RopeScaling::FreqFactors(_)) => {
            return Err(
                "the GGUF's rope scaling (rope_freqs.weight) has no config.json form \
                        here; export it as GGUF (--format gguf) instead"
                    .to_owned(),
            )
        }
    }
    Ok(v)
}

fn write_json(path: &Path, value: &Value) -> Result<(), String> {
    let text = serde_json::to_string_pretty(value).map_err(|e| e.to_string())? + "\n";
    write_atomic(path, text.as_bytes())
}
