//! Helpers shared by the CLI tests: a clean-failure check and a tiny Hugging Face model.
#![allow(dead_code)] // each test binary uses its own subset

use std::path::{Path, PathBuf};
use std::process::Output;

use ftrt_runtime::rng::SplitMix64;
use safetensors::tensor::TensorView;
use safetensors::Dtype;

/// Asserts a clean failure whose stderr contains every one of `needles`.
pub fn fails_with(out: &Output, needles: &[&str]) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        out.status.code(),
        Some(1),
        "expected a clean failure, got {:?}: {err}",
        out.status
    );
    assert!(!err.contains("panicked"), "{err}");
    for n in needles {
        assert!(err.contains(n), "stderr lacks {n:?}: {err}");
    }
    err
}

pub fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// A tiny Hugging Face folder (config, a word-level tokenizer, one tensor): enough to open the
/// model and check targets, memory and data, without weights worth loading.
pub fn tiny_model(dir: &Path, hidden: usize, layers: usize) -> PathBuf {
    let m = dir.join("model");
    std::fs::create_dir_all(&m).unwrap();
    let config = format!(
        r#"{{"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": {hidden},
        "intermediate_size": {}, "num_hidden_layers": {layers}, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 32, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "max_position_embeddings": 64, "tie_word_embeddings": true, "bos_token_id": 1, "eos_token_id": 2}}"#,
        hidden * 3 / 2
    );
    write(&m, "config.json", &config);
    let words = [
        "<unk>",
        "<s>",
        "</s>",
        "Calculate",
        "1",
        "2",
        "3",
        "+",
        ".",
        "###",
        "Instruction:",
        "Response:",
    ];
    let vocab: Vec<String> = words
        .iter()
        .enumerate()
        .map(|(i, w)| format!("\"{w}\": {i}"))
        .collect();
    let tokenizer = format!(
        r#"{{"version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {{"type": "Whitespace"}}, "post_processor": null,
        "decoder": null, "model": {{"type": "WordLevel", "vocab": {{{}}}, "unk_token": "<unk>"}}}}"#,
        vocab.join(", ")
    );
    write(&m, "tokenizer.json", &tokenizer);
    let header = br#"{"model.norm.weight":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#;
    let mut st = (header.len() as u64).to_le_bytes().to_vec();
    st.extend_from_slice(header);
    st.extend_from_slice(&1f32.to_le_bytes());
    std::fs::write(m.join("model.safetensors"), st).unwrap();
    m
}

/// Every weight of [`tiny_model`]'s `hidden`/`layers` shape (4 heads, 2 kv heads, tied
/// embeddings, vocab 32) as random f32 values: a model that loads and runs.
pub fn write_tiny_weights(m: &Path, hidden: usize, layers: usize, seed: u64) {
    let (head_dim, ffn) = (hidden / 4, hidden * 3 / 2);
    let mut shapes = vec![
        ("model.embed_tokens.weight".to_owned(), vec![32, hidden]),
        ("model.norm.weight".to_owned(), vec![hidden]),
    ];
    for l in 0..layers {
        let p = format!("model.layers.{l}");
        for (name, shape) in [
            ("input_layernorm", vec![hidden]),
            ("post_attention_layernorm", vec![hidden]),
            ("self_attn.q_proj", vec![hidden, hidden]),
            ("self_attn.k_proj", vec![2 * head_dim, hidden]),
            ("self_attn.v_proj", vec![2 * head_dim, hidden]),
            ("self_attn.o_proj", vec![hidden, hidden]),
            ("mlp.gate_proj", vec![ffn, hidden]),
            ("mlp.up_proj", vec![ffn, hidden]),
            ("mlp.down_proj", vec![hidden, ffn]),
        ] {
            shapes.push((format!("{p}.{name}.weight"), shape));
        }
    }
    let mut rng = SplitMix64::new(seed);
    let values: Vec<Vec<f32>> = shapes
        .iter()
        .map(|(_, s)| rng.normals_f32(s.iter().product(), 0.1))
        .collect();
    let views: Vec<(String, TensorView)> = shapes
        .iter()
        .zip(&values)
        .map(|((n, s), v)| {
            let view = TensorView::new(Dtype::F32, s.clone(), bytemuck::cast_slice(v)).unwrap();
            (n.clone(), view)
        })
        .collect();
    safetensors::serialize_to_file(views, None, &m.join("model.safetensors")).unwrap();
}
