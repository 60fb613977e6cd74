//! GGUF tensor names (llama.cpp's) to Hugging Face names and back.
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

/// Whole-model modules: (GGUF, Hugging Face).
const MODEL_MODULES: [(&str, &str); 3] = [
    ("token_embd", "model.embed_tokens"),
    ("output_norm", "model.norm"),
    ("output", "lm_head"),
];
/// Prefixes of a layer's modules: (GGUF, Hugging Face), each followed by `N.`.
const LAYER_PREFIX: (&str, &str) = ("blk.", "model.layers.");

/// The Hugging Face name of GGUF tensor `name`, or `None` if the name is not a known one.
pub fn hf_name(name: &str) -> Option<String> {
    rename(name, true)
}

/// The GGUF name of Hugging Face tensor `hf` (the inverse of [`hf_name`]), or `None` if the
/// name is not a known one.
pub fn gguf_name(hf: &str) -> Option<String> {
    rename(hf, false)
}

/// `name` (a `.weight` or `.bias`) from GGUF's names to Hugging Face's (`to_hf`) or back.
fn rename(name: &str, to_hf: bool) -> Option<String> {
    let (module, suffix) = name.rsplit_once('.')?;
    if suffix != "weight" && suffix != "bias" {
        return None;
    }
    // (from, to) of a pair as this direction reads it
    let dir = |(g, h): (&'static str, &'static str)| if to_hf { (g, h) } else { (h, g) };
    let renamed = match MODEL_MODULES
        .iter()
        .map(|&p| dir(p))
        .find(|(f, _)| *f == module)
    {
        Some((_, to)) => to.to_string(),
        None => {
            let (from_prefix, to_prefix) = dir(LAYER_PREFIX);
            let (layer, layer_module) = module.strip_prefix(from_prefix)?.split_once('.')?;
            let layer: usize = layer.parse().ok()?;
            let (_, to) = LAYER_MODULES
                .iter()
                .map(|&p| dir(p))
                .find(|(f, _)| *f == layer_module)?;
            format!("{to_prefix}{layer}.{to}")
        }
    };
    Some(format!("{renamed}.{suffix}"))
}

/// Where llama.cpp's converter puts GGUF tensor `name` in a file: rope factors, the embedding,
/// each block's tensors in [`LAYER_MODULES`] order, the final norm, the head (a sort key).
pub fn file_order(name: &str) -> (usize, usize, usize) {
    let module = name.rsplit_once('.').map_or(name, |(m, _)| m);
    match module {
        "rope_freqs" => (0, 0, 0),
        "token_embd" => (1, 0, 0),
        "output_norm" => (3, 0, 0),
        "output" => (4, 0, 0),
        _ => {
            let rest = module.strip_prefix("blk.").unwrap_or(module);
            let (layer, m) = rest.split_once('.').unwrap_or((rest, ""));
            let at = LAYER_MODULES.iter().position(|(g, _)| *g == m);
            (
                2,
                layer.parse().unwrap_or(usize::MAX),
                at.unwrap_or(usize::MAX),
            )
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gguf_names_invert_hf_names() {
        let mut names = vec![
            "token_embd.weight".to_owned(),
            "output_norm.weight".to_owned(),
            "output.weight".to_owned(),
        ];
        for (g, _) in LAYER_MODULES {
            names.push(format!("blk.17.{g}.weight"));
            names.push(format!("blk.3.{g}.bias"));
        }
        for g in &names {
            let hf = hf_name(g).unwrap();
            assert_eq!(gguf_name(&hf).as_deref(), Some(g.as_str()), "{hf}");
        }
        assert_eq!(gguf_name("model.layers.0.mlp.gate_proj.scales"), None);
        assert_eq!(gguf_name("model.layers.x.mlp.gate_proj.weight"), None);
        let mut sorted = names.clone();
        sorted.sort_by_key(|n| file_order(n));
        assert_eq!(sorted[0], "token_embd.weight");
        assert_eq!(sorted[1], "blk.3.attn_norm.bias");
        assert_eq!(sorted[sorted.len() - 1], "output.weight");
    }
}
