//! A `tokenizers::Tokenizer` built from GGUF tokenizer metadata.
//!
//! Supports `tokenizer.ggml.model == "gpt2"` (byte-level BPE): `tokenizer.ggml.tokens` (id =
//! index), `tokenizer.ggml.merges` ("left right" strings, by rank), `tokenizer.ggml.token_type`
//! (3 = control -> special added token, 4 = user-defined -> added token), the bos/eos ids and
//! `tokenizer.ggml.add_bos_token`. The pre-tokenizer follows `tokenizer.ggml.pre`, written as
//! the Hugging Face `tokenizer.json` of that model family writes it. The chat template comes
//! from `tokenizer.chat_template`.

use serde_json::{json, Map, Value};
use tokenizers::Tokenizer;

use super::reader::GgufFile;
use super::value::MetaValue;
use crate::errors::{Error, ErrorKind, Result};
use crate::tokenizer::TokenizerConfig;

/// Llama 3's split regex (llama.cpp pre "llama-bpe"/"llama3").
const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's split regex (digits one at a time).
const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// `tokenizer.ggml.pre` values that [`tokenizer_from_gguf`] maps to a pre-tokenizer.
pub const SUPPORTED_PRE: [&str; 6] = [
    "gpt-2",
    "smollm",
    "llama3",
    "llama-v3",
    "llama-bpe",
    "qwen2",
];

/// ggml token type of control tokens (`<|im_start|>`, `<|begin_of_text|>`...).
const TOKEN_TYPE_CONTROL: i64 = 3;
/// ggml token type of user-defined tokens.
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// Builds the tokenizer and the tokenizer settings (chat template, bos/eos strings) of `file`.
pub fn tokenizer_from_gguf(file: &GgufFile) -> Result<(Tokenizer, TokenizerConfig)> {
    let err = |kind, reason: String| Error::new(file.path(), kind, reason);
    let model = str_key(file, "tokenizer.ggml.model")?;
    if model != "gpt2" {
        return Err(err(
            ErrorKind::Unsupported,
            format!("tokenizer.ggml.model \"{model}\" is not supported; supported: gpt2 (byte-level BPE)"),
        ));
    }
    let pre = file
        .get("tokenizer.ggml.pre")
        .and_then(MetaValue::as_str)
        .unwrap_or("gpt-2");
    let tokens = string_array(file, "tokenizer.ggml.tokens")?;
    let merges = string_array(file, "tokenizer.ggml.merges")?;
    let types = match file
        .get("tokenizer.ggml.token_type")
        .and_then(MetaValue::as_array)
    {
        Some(t) => t.iter().map(|v| v.as_i64().unwrap_or(1)).collect(),
        None => vec![1; tokens.len()],
    };
    // (id, text) of the token whose id is stored under `key`.
    let token_at = |key: &str| -> Result<Option<(u32, String)>> {
        match file.get(key).map(MetaValue::as_u64) {
            None => Ok(None),
            Some(Some(id)) if (id as usize) < tokens.len() => {
                Ok(Some((id as u32, tokens[id as usize].to_string())))
            }
            Some(_) => Err(err(
                ErrorKind::Malformed,
                format!("{key} is not a token id in the vocabulary"),
            )),
        }
    };
    let bos = token_at("tokenizer.ggml.bos_token_id")?;
    let eos = token_at("tokenizer.ggml.eos_token_id")?;
    let add_bos = file
        .get("tokenizer.ggml.add_bos_token")
        .and_then(MetaValue::as_bool)
        .unwrap_or(false);

    let (normalizer, pre_tokenizer, ignore_merges) = pre_tokenizer(pre).ok_or_else(|| {
        err(
            ErrorKind::Unsupported,
            format!(
                "tokenizer.ggml.pre \"{pre}\" is not supported; supported: {}",
                SUPPORTED_PRE.join(", ")
            ),
        )
    })?;
    let vocab: Map<String, Value> = tokens
        .iter()
        .enumerate()
        .map(|(id, t)| (t.to_string(), json!(id)))
        .collect();
    let merges = merges
        .iter()
        .map(|m| match m.split_once(' ') {
            Some((a, b)) => Ok(json!([a, b])),
            None => Err(err(
                ErrorKind::Malformed,
                format!("merge \"{m}\" is not two tokens separated by a space"),
            )),
        })
        .collect::<Result<Vec<Value>>>()?;
    let added_tokens: Vec<Value> = tokens
        .iter()
        .zip(&types)
        .enumerate()
        .filter(|(_, (_, &ty))| ty == TOKEN_TYPE_CONTROL || ty == TOKEN_TYPE_USER_DEFINED)
        .map(|(id, (content, &ty))| {
            json!({"id": id, "content": content, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": ty == TOKEN_TYPE_CONTROL})
        })
        .collect();
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false});
    let post_processor = match (&bos, add_bos) {
        (Some((bos_id, bos)), true) => {
            let special = json!({"SpecialToken": {"id": bos, "type_id": 0}});
            json!({"type": "Sequence", "processors": [byte_level, {
                "type": "TemplateProcessing",
                "single": [special, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [special, {"Sequence": {"id": "A", "type_id": 0}},
                         {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {bos.as_str(): {"id": bos, "ids": [bos_id], "tokens": [bos]}}
            }]})
        }
        _ => byte_level.clone(),
    };
    let spec = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added_tokens,
        "normalizer": normalizer,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": post_processor,
        "decoder": byte_level,
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
            "ignore_merges": ignore_merges, "vocab": vocab, "merges": merges
        }
    });
    let tokenizer: Tokenizer = spec.to_string().parse().map_err(|e| {
        err(
            ErrorKind::Tokenizer,
            format!("cannot build tokenizer from metadata: {e}"),
        )
    })?;
    let config = TokenizerConfig {
        chat_template: file
            .get("tokenizer.chat_template")
            .and_then(MetaValue::as_str)
            .map(str::to_string),
        bos_token: bos.map(|(_, t)| t),
        eos_token: eos.map(|(_, t)| t),
        add_bos_token: Some(add_bos),
    };
    Ok((tokenizer, config))
}

/// (normalizer, pre-tokenizer, ignore_merges) of a llama.cpp pre-tokenizer name, as the
/// Hugging Face tokenizer of that family writes them.
pub(crate) fn pre_tokenizer(pre: &str) -> Option<(Value, Value, bool)> {
    let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
    let split = |regex: &str| json!({"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false});
    Some(match pre {
        "gpt-2" => (Value::Null, byte_level(true), false),
        "smollm" => (
            Value::Null,
            json!({"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": true}, byte_level(true)]}),
            false,
        ),
        "llama3" | "llama-v3" | "llama-bpe" => (
            Value::Null,
            json!({"type": "Sequence", "pretokenizers": [split(LLAMA3_REGEX), byte_level(false)]}),
            true,
        ),
        "qwen2" => (
            json!({"type": "NFC"}),
            json!({"type": "Sequence", "pretokenizers": [split(QWEN2_REGEX), byte_level(false)]}),
            false,
        ),
        _ => return None,
    })
}

fn str_key<'a>(file: &'a GgufFile, key: &str) -> Result<&'a str> {
    file.get(key).and_then(MetaValue::as_str).ok_or_else(|| {
        Error::new(
            file.path(),
            ErrorKind::Missing,
            format!("missing string metadata \"{key}\""),
        )
    })
}

fn string_array<'a>(file: &'a GgufFile, key: &str) -> Result<Vec<&'a str>> {
    let items = file.get(key).and_then(MetaValue::as_array).ok_or_else(|| {
        Error::new(
            file.path(),
            ErrorKind::Missing,
            format!("missing array metadata \"{key}\""),
        )
    })?;
    items
        .iter()
        .map(|v| {
            v.as_str().ok_or_else(|| {
                Error::new(
                    file.path(),
                    ErrorKind::Malformed,
                    format!("metadata \"{key}\" holds a non-string"),
                )
            })
        })
        .collect()
}
