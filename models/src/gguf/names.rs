//! GGUF tensor names (llama.cpp's) to Hugging Face names.
//!
//! | GGUF                     | Hugging Face                                   |
//! |--------------------------|------------------------------------------------|
//! | `token_embd`             | `model.embed_tokens`                           |
//! | `output_norm`            | `model.norm`                                   |
//! | `output`                 | `lm_head`                                      |
//! | `blk.N.attn_norm`        | `model.layers.N.input_layernorm`               |
//! | `blk.N.attn_q`/`_k`/`_v` | `model.layers.N.self_attn.q_proj`/`k_proj`/`v_proj` |
//! | `blk.N.attn_output`      | `model.layers.N.self_attn.o_proj`              |
//! | `blk.N.attn_q_norm`/`_k_norm` | `model.layers.N.self_attn.q_norm`/`k_norm` |
//! | `blk.N.ffn_norm`         | `model.layers.N.post_attention_layernorm`      |
//! | `blk.N.ffn_gate`/`_up`/`_down` | `model.layers.N.mlp.gate_proj`/`up_proj`/`down_proj` |
//!
//! each with its `.weight` or `.bias` suffix kept.

/// Per-layer GGUF module names and their Hugging Face counterparts under `model.layers.N.`.
const LAYER_MODULES: [(&str, &str); 11] = [
    ("attn_norm", "input_layernorm"),
    ("attn_q", "self_attn.q_proj"),
    ("attn_k", "self_attn.k_proj"),
    ("attn_v", "self_attn.v_proj"),
    ("attn_output", "self_attn.o_proj"),
    ("attn_q_norm", "self_attn.q_norm"),
    ("attn_k_norm", "self_attn.k_norm"),
    ("ffn_norm", "post_attention_layernorm"),
    ("ffn_gate", "mlp.gate_proj"),
    ("ffn_up", "mlp.up_proj"),
    ("ffn_down", "mlp.down_proj"),
];

/// GGUF name of the rotary frequency factors (folded into the config, not a weight).
pub const ROPE_FREQS: &str = "rope_freqs.weight";

/// The Hugging Face name of GGUF tensor `name`, or `None` if the name is not a known one.
pub fn hf_name(name: &str) -> Option<String> {
    let (module, suffix) = name.rsplit_once('.')?;
    if suffix != "weight" && suffix != "bias" {
        return None;
    }
    let hf_module = match module {
        "token_embd" => "model.embed_tokens".to_string(),
        "output_norm" => "model.norm".to_string(),
        "output" => "lm_head".to_string(),
        _ => {
            let rest = module.strip_prefix("blk.")?;
            let (layer, gguf_module) = rest.split_once('.')?;
            let layer: usize = layer.parse().ok()?;
            let (_, hf) = LAYER_MODULES.iter().find(|(g, _)| *g == gguf_module)?;
            format!("model.layers.{layer}.{hf}")
        }
    };
    Some(format!("{hf_module}.{suffix}"))
}

/// Whether `hf` is a q_proj or k_proj tensor (whose rows llama.cpp permutes).
pub fn permuted_projection(hf: &str) -> Option<QkProjection> {
    if hf.contains(".self_attn.q_proj.") {
        Some(QkProjection::Q)
    } else if hf.contains(".self_attn.k_proj.") {
        Some(QkProjection::K)
    } else {
        None
    }
}

/// Which of the two RoPE'd projections a tensor belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QkProjection {
    /// q_proj: permuted per query head.
    Q,
    /// k_proj: permuted per key/value head.
    K,
}
