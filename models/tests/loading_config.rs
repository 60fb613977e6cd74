//! config.json parsing: every supported architecture, rope scaling, eos forms and the errors.

mod loading_common;

use std::path::Path;

use ftrt_models::{Architecture, ErrorKind, ModelConfig, RopeScaling};

fn parse(json: &str) -> Result<ModelConfig, ftrt_models::Error> {
    ModelConfig::from_json_str(json, Path::new("/models/x/config.json"))
}

const LLAMA31: &str = r#"{
  "architectures": ["LlamaForCausalLM"], "model_type": "llama",
  "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
  "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
  "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "max_position_embeddings": 131072,
  "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 8192, "rope_type": "llama3"},
  "tie_word_embeddings": false, "attention_bias": false, "mlp_bias": false,
  "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "torch_dtype": "bfloat16"
}"#;

#[test]
fn smollm2_config_from_assets() {
    let path = loading_common::assets().join("tokenizers/smollm2/config.json");
    let c = ModelConfig::from_file(&path).unwrap();
    assert_eq!(c.arch, Architecture::Llama);
    assert_eq!(
        (c.hidden_size, c.intermediate_size, c.num_hidden_layers),
        (576, 1536, 30)
    );
    assert_eq!(
        (c.num_attention_heads, c.num_key_value_heads, c.head_dim),
        (9, 3, 64)
    );
    assert_eq!((c.vocab_size, c.max_position_embeddings), (49152, 8192));
    assert_eq!((c.rms_norm_eps, c.rope_theta), (1e-5, 100000.0));
    assert!(c.tie_word_embeddings && c.rope_scaling.is_none());
    assert_eq!(
        (c.bos_token_id, c.eos_token_ids.clone()),
        (Some(1), vec![2])
    );
    assert_eq!(c.torch_dtype.as_deref(), Some("bfloat16"));
    assert!(!c.qkv_bias && !c.o_proj_bias && !c.mlp_bias && !c.qk_norm);
}

#[test]
fn llama3_rope_scaling_and_eos_list() {
    let c = parse(LLAMA31).unwrap();
    assert_eq!(c.head_dim, 128);
    assert_eq!(c.eos_token_ids, vec![128001, 128008, 128009]);
    assert_eq!(
        c.rope_scaling,
        Some(RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192
        })
    );
}

#[test]
fn mistral_sliding_window() {
    let c = parse(
        r#"{"architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": 4096,
        "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 8, "vocab_size": 32000, "sliding_window": 4096,
        "rope_theta": 10000.0, "rms_norm_eps": 1e-05, "bos_token_id": 1, "eos_token_id": 2}"#,
    )
    .unwrap();
    assert_eq!(c.arch, Architecture::Mistral);
    assert_eq!(c.sliding_window, Some(4096));
    assert_eq!(c.max_position_embeddings, 131072);
    let v3 = parse(
        r#"{"model_type": "mistral", "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 100, "sliding_window": null}"#,
    )
    .unwrap();
    assert_eq!(v3.sliding_window, None);
    assert_eq!(v3.num_key_value_heads, 4);
}

#[test]
fn qwen2_has_qkv_bias() {
    let c = parse(
        r#"{"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 896,
        "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
        "num_key_value_heads": 2, "vocab_size": 151936, "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-06, "tie_word_embeddings": true, "use_sliding_window": false,
        "sliding_window": 32768, "max_window_layers": 21, "bos_token_id": 151643,
        "eos_token_id": 151645, "torch_dtype": "bfloat16"}"#,
    )
    .unwrap();
    assert_eq!(c.arch, Architecture::Qwen2);
    assert!(c.qkv_bias && !c.o_proj_bias && !c.qk_norm);
    assert_eq!((c.head_dim, c.sliding_window), (64, None));
}

#[test]
fn qwen3_needs_explicit_head_dim_and_has_qk_norm() {
    let json = r#"{"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 1024,
        "intermediate_size": 3072, "num_hidden_layers": 28, "num_attention_heads": 16,
        "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936,
        "rope_theta": 1000000, "rms_norm_eps": 1e-06, "tie_word_embeddings": true,
        "attention_bias": false, "eos_token_id": 151645}"#;
    let c = parse(json).unwrap();
    assert_eq!(c.arch, Architecture::Qwen3);
    assert!(c.qk_norm && !c.qkv_bias);
    assert_eq!(c.head_dim, 128);
    assert_eq!(c.rope_theta, 1e6);
    let err = parse(&json.replace(r#""head_dim": 128,"#, "")).unwrap_err();
    assert_eq!(err.kind, ErrorKind::Missing);
    assert!(err.to_string().contains("head_dim"), "{err}");
}

#[test]
fn missing_field_names_path_and_field() {
    let err = parse(&LLAMA31.replace(r#""hidden_size": 4096,"#, "")).unwrap_err();
    assert_eq!(err.kind, ErrorKind::Missing);
    let msg = err.to_string();
    assert!(msg.starts_with("/models/x/config.json: "), "{msg}");
    assert!(msg.contains("\"hidden_size\""), "{msg}");

    let err = parse(&LLAMA31.replace(r#""high_freq_factor": 4.0,"#, "")).unwrap_err();
    assert!(
        err.to_string().contains("rope_scaling.high_freq_factor"),
        "{err}"
    );
}

#[test]
fn unknown_architecture_lists_supported() {
    let err = parse(&LLAMA31.replace(r#""model_type": "llama""#, r#""model_type": "gemma3""#))
        .unwrap_err();
    assert_eq!(err.kind, ErrorKind::Unsupported);
    let msg = err.to_string();
    for name in [
        "gemma3",
        "llama",
        "mistral",
        "qwen2",
        "qwen3",
        "LlamaForCausalLM",
    ] {
        assert!(msg.contains(name), "{msg}");
    }
}

#[test]
fn bad_input_is_an_error_not_a_panic() {
    for (json, kind) in [
        ("{", ErrorKind::Malformed),
        ("[]", ErrorKind::Malformed),
        (
            r#"{"model_type": "llama", "hidden_size": "big"}"#,
            ErrorKind::Malformed,
        ),
        (r#"{"hidden_size": 1}"#, ErrorKind::Missing),
    ] {
        assert_eq!(parse(json).unwrap_err().kind, kind, "{json}");
    }
    let bad_rope = LLAMA31.replace(r#""rope_type": "llama3""#, r#""rope_type": "yarn""#);
    assert_eq!(parse(&bad_rope).unwrap_err().kind, ErrorKind::Unsupported);
    let missing = ModelConfig::from_file(Path::new("/nonexistent/config.json")).unwrap_err();
    assert_eq!(missing.kind, ErrorKind::Missing);
    assert!(missing.to_string().contains("/nonexistent/config.json"));
}
