//! tokenizer.json loading against llama.cpp's golden token ids, and GGUF-built tokenizers
//! (from the same vocabularies) against the tokenizer.json ones.

mod loading_common;

use std::path::PathBuf;

use ftrt_models::gguf::{tokenizer_from_gguf, GgufFile};
use ftrt_models::tokenizer::{load_tokenizer, TokenizerConfig};
use loading_common::{assets, vocab_vectors, write_gguf, Kv};
use serde_json::Value;
use tokenizers::Tokenizer;

fn tokenizer_dir(name: &str) -> PathBuf {
    assets().join("tokenizers").join(name)
}

fn encode(tok: &Tokenizer, text: &str) -> Vec<u32> {
    tok.encode(text, false).unwrap().get_ids().to_vec()
}

fn assert_vectors(tok: &Tokenizer, vectors: &str) {
    let cases = vocab_vectors(vectors);
    assert!(cases.len() > 40, "{vectors}: only {} cases", cases.len());
    for (text, ids) in &cases {
        assert_eq!(&encode(tok, text), ids, "{vectors}: {text:?}");
    }
}

#[test]
fn tokenizer_json_matches_llama_cpp_vectors() {
    for (dir, vectors) in [
        ("llama3", "llama-bpe"),
        ("qwen3", "qwen2"),
        ("gpt2", "gpt-2"),
    ] {
        let tok = load_tokenizer(&tokenizer_dir(dir).join("tokenizer.json")).unwrap();
        assert_vectors(&tok, vectors);
    }
}

#[test]
fn hello_world_ids() {
    for (dir, ids) in [
        ("smollm2", [19556, 905]),
        ("llama3", [9906, 1917]),
        ("gpt2", [15496, 995]),
    ] {
        let tok = load_tokenizer(&tokenizer_dir(dir).join("tokenizer.json")).unwrap();
        assert_eq!(encode(&tok, "Hello world"), ids, "{dir}");
    }
}

#[test]
fn tokenizer_configs() {
    let smol = TokenizerConfig::from_file(&tokenizer_dir("smollm2").join("tokenizer_config.json"))
        .unwrap();
    assert_eq!(smol.eos_token.as_deref(), Some("<|im_end|>"));
    assert!(smol.chat_template.unwrap().contains("<|im_start|>"));
    let qwen =
        TokenizerConfig::from_file(&tokenizer_dir("qwen3").join("tokenizer_config.json")).unwrap();
    assert_eq!((qwen.bos_token, qwen.add_bos_token), (None, Some(false)));
    assert!(qwen.chat_template.unwrap().contains("<think>"));
    let llama =
        TokenizerConfig::from_file(&tokenizer_dir("llama3").join("tokenizer_config.json")).unwrap();
    assert_eq!(llama.bos_token.as_deref(), Some("<|begin_of_text|>"));
    let missing = load_tokenizer(&tokenizer_dir("nope").join("tokenizer.json")).unwrap_err();
    assert!(missing.to_string().contains("nope"));
}

/// Writes the vocabulary of a tokenizer.json as GGUF tokenizer metadata with pre-tokenizer
/// `pre`, the way llama.cpp's converter does (ids by index, special added tokens as control).
fn gguf_from_tokenizer_json(dir: &str, pre: &str, bos: Option<u32>, path: &std::path::Path) {
    let json: Value = serde_json::from_str(
        &std::fs::read_to_string(tokenizer_dir(dir).join("tokenizer.json")).unwrap(),
    )
    .unwrap();
    let mut tokens: Vec<(u64, String, i32)> = json["model"]["vocab"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(t, id)| (id.as_u64().unwrap(), t.clone(), 1))
        .collect();
    for added in json["added_tokens"].as_array().unwrap() {
        let id = added["id"].as_u64().unwrap();
        let ty = if added["special"].as_bool().unwrap() {
            3
        } else {
            4
        };
        match tokens.iter_mut().find(|t| t.0 == id) {
            Some(t) => t.2 = ty,
            None => tokens.push((id, added["content"].as_str().unwrap().to_string(), ty)),
        }
    }
    tokens.sort();
    assert!(
        tokens.iter().enumerate().all(|(i, t)| t.0 == i as u64),
        "{dir}: ids not dense"
    );
    let merges: Vec<String> = json["model"]["merges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| match m {
            Value::String(s) => s.clone(),
            Value::Array(p) => format!("{} {}", p[0].as_str().unwrap(), p[1].as_str().unwrap()),
            _ => panic!("bad merge"),
        })
        .collect();
    let mut kvs = vec![
        ("general.architecture", Kv::Str("llama".into())),
        ("tokenizer.ggml.model", Kv::Str("gpt2".into())),
        ("tokenizer.ggml.pre", Kv::Str(pre.into())),
        (
            "tokenizer.ggml.tokens",
            Kv::StrArray(tokens.iter().map(|t| t.1.clone()).collect()),
        ),
        (
            "tokenizer.ggml.token_type",
            Kv::I32Array(tokens.iter().map(|t| t.2).collect()),
        ),
        ("tokenizer.ggml.merges", Kv::StrArray(merges)),
        (
            "tokenizer.ggml.eos_token_id",
            Kv::U32(tokens.iter().position(|t| t.2 == 3).unwrap() as u32),
        ),
        ("tokenizer.chat_template", Kv::Str("{{ messages }}".into())),
    ];
    if let Some(bos) = bos {
        kvs.push(("tokenizer.ggml.bos_token_id", Kv::U32(bos)));
        kvs.push(("tokenizer.ggml.add_bos_token", Kv::Bool(true)));
    }
    write_gguf(path, &kvs, &[]);
}

#[test]
fn gguf_built_tokenizers_match_vectors_and_tokenizer_json() {
    let tmp = tempfile::tempdir().unwrap();
    for (dir, pre, vectors, bos) in [
        ("llama3", "llama-bpe", "llama-bpe", Some(128000)),
        ("qwen3", "qwen2", "qwen2", None),
        ("gpt2", "gpt-2", "gpt-2", None),
    ] {
        let path = tmp.path().join(format!("{dir}.gguf"));
        gguf_from_tokenizer_json(dir, pre, bos, &path);
        let (tok, config) = tokenizer_from_gguf(&GgufFile::open(&path).unwrap()).unwrap();
        assert_eq!(config.chat_template.as_deref(), Some("{{ messages }}"));
        assert_vectors(&tok, vectors);
        let reference = load_tokenizer(&tokenizer_dir(dir).join("tokenizer.json")).unwrap();
        let text = "<|im_start|>user\nHello world, 12345 déjà vu!<|im_end|>\n  \t<|begin_of_text|>";
        assert_eq!(encode(&tok, text), encode(&reference, text), "{dir}");
        assert_eq!(
            tok.get_vocab_size(true),
            reference.get_vocab_size(true),
            "{dir}"
        );
        // add_bos_token: encoding with special tokens prepends bos.
        let with_special = tok.encode("Hello world", true).unwrap().get_ids().to_vec();
        let expected: Vec<u32> = bos.into_iter().chain(encode(&tok, "Hello world")).collect();
        assert_eq!(with_special, expected, "{dir}");
        assert_eq!(config.add_bos_token, Some(bos.is_some()));
    }
}

#[test]
fn unsupported_gguf_tokenizers_are_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("spm.gguf");
    write_gguf(
        &path,
        &[("tokenizer.ggml.model", Kv::Str("llama".into()))],
        &[],
    );
    let err = tokenizer_from_gguf(&GgufFile::open(&path).unwrap())
        .err()
        .unwrap();
    assert!(
        err.reason.contains("\"llama\"") && err.reason.contains("gpt2"),
        "{err}"
    );
    let path = tmp.path().join("pre.gguf");
    write_gguf(
        &path,
        &[
            ("tokenizer.ggml.model", Kv::Str("gpt2".into())),
            ("tokenizer.ggml.pre", Kv::Str("tekken".into())),
            ("tokenizer.ggml.tokens", Kv::StrArray(vec!["a".into()])),
            ("tokenizer.ggml.merges", Kv::StrArray(vec![])),
        ],
        &[],
    );
    let err = tokenizer_from_gguf(&GgufFile::open(&path).unwrap())
        .err()
        .unwrap();
    assert!(
        err.reason.contains("tekken") && err.reason.contains("smollm"),
        "{err}"
    );
}
