//! open_model on a Hugging Face folder, and its errors.

mod loading_common;

use std::collections::HashMap;
use std::path::Path;

use ftrt_models::safetensors_io::Dtype;
use ftrt_models::{open_model, ErrorKind, StorageType};
use half::bf16;
use loading_common::assets;
use safetensors::tensor::TensorView;

/// A folder with SmolLM2's config and tokenizer files and a two-tensor bf16 checkpoint.
fn hf_folder(dir: &Path) {
    for f in [
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        std::fs::copy(assets().join("tokenizers/smollm2").join(f), dir.join(f)).unwrap();
    }
    let norm: Vec<u8> = (0..576)
        .flat_map(|i| bf16::from_f32(1.0 + i as f32 / 1024.0).to_le_bytes())
        .collect();
    let emb: Vec<u8> = (0..4 * 576)
        .flat_map(|i| (i as f32 * 0.5).to_le_bytes())
        .collect();
    let views: HashMap<String, TensorView> = [
        (
            "model.norm.weight".to_string(),
            TensorView::new(Dtype::BF16, vec![576], &norm).unwrap(),
        ),
        (
            "model.embed_tokens.weight".to_string(),
            TensorView::new(Dtype::F32, vec![4, 576], &emb).unwrap(),
        ),
    ]
    .into_iter()
    .collect();
    safetensors::serialize_to_file(&views, None, &dir.join("model.safetensors")).unwrap();
}

#[test]
fn hf_folder_loads() {
    let dir = tempfile::tempdir().unwrap();
    hf_folder(dir.path());
    let m = open_model(dir.path()).unwrap();
    assert_eq!(m.config.hidden_size, 576);
    assert_eq!(m.eos_token_ids, [2]);
    assert_eq!(m.tokenizer_config.eos_token.as_deref(), Some("<|im_end|>"));
    assert!(m
        .tokenizer_config
        .chat_template
        .as_deref()
        .unwrap()
        .contains("<|im_start|>"));
    assert_eq!(
        m.tokenizer.encode("Hello world", false).unwrap().get_ids(),
        [19556, 905]
    );
    assert_eq!(
        m.weights.names(),
        ["model.embed_tokens.weight", "model.norm.weight"]
    );
    let info = m.weights.info("model.norm.weight").unwrap();
    assert_eq!(
        (info.shape, info.storage),
        (vec![576], StorageType::Safetensors(Dtype::BF16))
    );
    assert_eq!(m.weights.to_f32("model.norm.weight").unwrap()[512], 1.5);
    assert_eq!(
        m.weights.to_bf16("model.embed_tokens.weight").unwrap()[3].to_f32(),
        1.5
    );
}

#[test]
fn bad_checkpoints_are_errors_naming_the_path() {
    let dir = tempfile::tempdir().unwrap();
    hf_folder(dir.path());
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    let err = open_model(dir.path()).err().unwrap();
    assert_eq!(err.kind, ErrorKind::Missing);
    assert!(err.to_string().contains("model.safetensors"), "{err}");

    std::fs::remove_file(dir.path().join("config.json")).unwrap();
    let err = open_model(dir.path()).err().unwrap();
    assert_eq!(err.kind, ErrorKind::Missing);
    assert!(err.to_string().contains("config.json"), "{err}");

    let err = open_model(&dir.path().join("missing.gguf")).err().unwrap();
    assert_eq!(err.kind, ErrorKind::Missing);
    let err = open_model(&dir.path().join("nothing")).err().unwrap();
    assert_eq!(err.kind, ErrorKind::Missing);
    let err = open_model(&dir.path().join("tokenizer.json"))
        .err()
        .unwrap();
    assert_eq!(err.kind, ErrorKind::Unsupported);
}
