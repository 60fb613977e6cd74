//! GGUF metadata for a Hugging Face model, as llama.cpp's `convert_hf_to_gguf.py` writes it:
//! the `{arch}.*` hyperparameters, llama3 rope scaling as `rope_freqs.weight` factors, and a
//! byte-level BPE tokenizer (`tokenizer.ggml.model` "gpt2") from `tokenizer.json`, with the
//! pre-tokenizer named by what its `pre_tokenizer` does (the names the GGUF reader maps back).

use std::path::Path;

use serde_json::Value;

use crate::checkpoint::LoadedModel;
use crate::config::{Architecture, ModelConfig};
use crate::gguf::tokenizer::{pre_tokenizer, SUPPORTED_PRE};
use crate::gguf::value::MetaValue;
use crate::gguf::writer::Metadata;
use crate::llama::model::inv_freq_of;

/// ggml token types (llama.cpp's `enum llama_token_type`).
const NORMAL: i32 = 1;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const UNUSED: i32 = 5;

/// llama.cpp's architecture name of `arch` (Mistral's layers are Llama's).
pub fn gguf_arch_name(arch: Architecture) -> &'static str {
    match arch {
        Architecture::Llama | Architecture::Mistral => "llama",
        Architecture::Qwen2 => "qwen2",
        Architecture::Qwen3 => "qwen3",
    }
}

/// The model and tokenizer metadata of the Hugging Face model `model` (without
/// `general.file_type`), and the rope factors of llama3 scaling (`rope_freqs.weight`, head_dim
/// / 2 values: base inverse frequency over scaled), if it has that scaling.
pub fn hf_gguf_metadata(model: &LoadedModel) -> Result<(Metadata, Option<Vec<f32>>), String> {
    let c = &model.config;
    let arch = gguf_arch_name(c.arch);
    let name = model
        .path
        .file_name()
        .map_or("model".into(), |n| n.to_string_lossy().into_owned());
    let u = |v: usize| MetaValue::U32(v as u32);
    let mut meta: Metadata = vec![
        (
            "general.architecture".into(),
            MetaValue::String(arch.into()),
        ),
        ("general.name".into(), MetaValue::String(name)),
    ];
    let mut put = |key: &str, v: MetaValue| meta.push((format!("{arch}.{key}"), v));
    put("context_length", u(c.max_position_embeddings));
    put("embedding_length", u(c.hidden_size));
    put("block_count", u(c.num_hidden_layers));
    put("feed_forward_length", u(c.intermediate_size));
    put("attention.head_count", u(c.num_attention_heads));
    put("attention.head_count_kv", u(c.num_key_value_heads));
    put("attention.key_length", u(c.head_dim));
    put("attention.value_length", u(c.head_dim));
    put("rope.dimension_count", u(c.head_dim));
    put("rope.freq_base", MetaValue::F32(c.rope_theta as f32));
    put(
        "attention.layer_norm_rms_epsilon",
        MetaValue::F32(c.rms_norm_eps as f32),
    );
    put("vocab_size", u(c.vocab_size));
    let rope_factors = match c.rope_scaling {
        None => None,
        Some(_) => {
            let plain = ModelConfig {
                rope_scaling: None,
                ..c.clone()
            };
            let factors = inv_freq_of(&plain)
                .iter()
                .zip(inv_freq_of(c))
                .map(|(base, scaled)| base / scaled)
                .collect();
            Some(factors)
        }
    };
    meta.extend(tokenizer_metadata(&model.path, model)?);
    Ok((meta, rope_factors))
}

/// `tokenizer.ggml.*` and `tokenizer.chat_template` from the folder's `tokenizer.json`: every
/// id's token (ids the vocabulary lacks up to the config's vocab_size as `[PAD<id>]`, unused),
/// added tokens as control (special) or user-defined ones, the merges as "left right" strings.
fn tokenizer_metadata(dir: &Path, model: &LoadedModel) -> Result<Metadata, String> {
    let path = dir.join("tokenizer.json");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let tj: Value = serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let fail = |why: String| {
        format!("{}: {why}; GGUF export supports byte-level BPE tokenizers (Llama 3, Qwen2/3, SmolLM, GPT-2)", path.display())
    };
    let m = &tj["model"];
    if m["type"].as_str() != Some("BPE") {
        return Err(fail(format!("tokenizer model {} is not BPE", m["type"])));
    }
    let pre = detect_pre(&tj["pre_tokenizer"]).ok_or_else(|| {
        fail(format!(
            "its pre_tokenizer matches none of llama.cpp's {}",
            SUPPORTED_PRE.join(", ")
        ))
    })?;
    let vocab = m["vocab"]
        .as_object()
        .ok_or_else(|| fail("no vocab".into()))?;
    let added = tj["added_tokens"].as_array().cloned().unwrap_or_default();
    let mut entries: Vec<(usize, String, i32)> = Vec::new();
    for (token, id) in vocab {
        let id = id
            .as_u64()
            .ok_or_else(|| fail(format!("token {token:?} has no id")))?;
        entries.push((id as usize, token.clone(), NORMAL));
    }
    for a in &added {
        let (Some(id), Some(content)) = (a["id"].as_u64(), a["content"].as_str()) else {
            return Err(fail("an added token without id or content".into()));
        };
        let ty = if a["special"].as_bool() == Some(true) {
            CONTROL
        } else {
            USER_DEFINED
        };
        entries.push((id as usize, content.to_owned(), ty));
    }
    let n = entries
        .iter()
        .map(|e| e.0 + 1)
        .max()
        .unwrap_or(0)
        .max(model.config.vocab_size);
    let mut tokens: Vec<String> = (0..n).map(|i| format!("[PAD{i}]")).collect();
    let mut types = vec![UNUSED; n];
    for (id, token, ty) in entries {
        tokens[id] = token;
        types[id] = ty;
    }
    let merges = m["merges"]
        .as_array()
        .ok_or_else(|| fail("no merges".into()))?
        .iter()
        .map(|v| match v {
            Value::String(s) => Ok(s.clone()),
            Value::Array(p) if p.len() == 2 => Ok(format!(
                "{} {}",
                p[0].as_str().unwrap_or_default(),
                p[1].as_str().unwrap_or_default()
            )),
            other => Err(fail(format!("merge {other} is not a pair"))),
        })
        .collect::<Result<Vec<String>, String>>()?;
    let id_of = |t: &str| tokens.iter().position(|x| x == t);
    let tc = &model.tokenizer_config;
    let bos = tc
        .bos_token
        .as_deref()
        .and_then(id_of)
        .or(model.config.bos_token_id.map(|b| b as usize));
    let eos = tc.eos_token.as_deref().and_then(id_of).or(model
        .config
        .eos_token_ids
        .first()
        .map(|&e| e as usize));
    // stated by tokenizer_config.json, or by a post-processor that adds bos; else left to
    // llama.cpp's default for the pre-tokenizer (true for Llama 3's)
    let add_bos = tc.add_bos_token.or_else(|| {
        bos.filter(|&b| template_starts_with(&tj["post_processor"], &tokens[b]))
            .map(|_| true)
    });

    let strings = |v: Vec<String>| MetaValue::Array(v.into_iter().map(MetaValue::String).collect());
    let mut meta = vec![
        (
            "tokenizer.ggml.model".into(),
            MetaValue::String("gpt2".into()),
        ),
        ("tokenizer.ggml.pre".into(), MetaValue::String(pre.into())),
        ("tokenizer.ggml.tokens".into(), strings(tokens)),
        (
            "tokenizer.ggml.token_type".into(),
            MetaValue::Array(types.into_iter().map(MetaValue::I32).collect()),
        ),
        ("tokenizer.ggml.merges".into(), strings(merges)),
    ];
    if let Some(add) = add_bos {
        meta.push(("tokenizer.ggml.add_bos_token".into(), MetaValue::Bool(add)));
    }
    for (key, id) in [("bos", bos), ("eos", eos)] {
        if let Some(id) = id {
            meta.push((
                format!("tokenizer.ggml.{key}_token_id"),
                MetaValue::U32(id as u32),
            ));
        }
    }
    if let Some(t) = &tc.chat_template {
        meta.push((
            "tokenizer.chat_template".into(),
            MetaValue::String(t.clone()),
        ));
    }
    Ok(meta)
}

/// The llama.cpp pre-tokenizer name whose Hugging Face `pre_tokenizer` ([`pre_tokenizer`])
/// splits text the way `hf` does: the same regex splits, digit splitting and byte-level regex
/// use, in the same order (the fields that do not change the split are not compared).
fn detect_pre(hf: &Value) -> Option<&'static str> {
    let want = pre_signature(hf);
    ["llama-bpe", "qwen2", "smollm", "gpt-2"]
        .into_iter()
        .find(|name| pre_tokenizer(name).is_some_and(|(_, p, _)| pre_signature(&p) == want))
}

/// What a pre-tokenizer does, step by step: `split <regex>`, `digits <individual>`, `bytelevel
/// <use_regex>`.
fn pre_signature(v: &Value) -> Vec<String> {
    match v["type"].as_str() {
        Some("Sequence") => v["pretokenizers"]
            .as_array()
            .map(|items| items.iter().flat_map(pre_signature).collect())
            .unwrap_or_default(),
        Some("Split") => vec![format!("split {}", v["pattern"]["Regex"])],
        Some("Digits") => vec![format!("digits {}", v["individual_digits"])],
        Some("ByteLevel") => vec![format!(
            "bytelevel {}",
            v["use_regex"].as_bool().unwrap_or(true)
        )],
        other => vec![format!("{other:?}")],
    }
}

/// Whether a post-processor's single-sequence template starts with the special token `bos`
/// (how Llama 3's tokenizer.json adds its bos).
fn template_starts_with(post: &Value, bos: &str) -> bool {
    match post["type"].as_str() {
        Some("Sequence") => post["processors"]
            .as_array()
            .is_some_and(|ps| ps.iter().any(|p| template_starts_with(p, bos))),
        Some("TemplateProcessing") => post["single"][0]["SpecialToken"]["id"].as_str() == Some(bos),
        _ => false,
    }
}
