//! Which linear modules a model has, and which of them a [`LoraConfig`] adapts.

use super::{LoraConfig, LoraTarget, ALL_LINEAR};
use crate::config::ModelConfig;

/// The linear modules of a Llama-family decoder layer, in the order of the flat buffers.
pub const LINEAR_MODULES: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// Every linear module of a Llama-family model (Llama, Mistral, Qwen2/3) that LoRA can adapt,
/// layer by layer in [`LINEAR_MODULES`] order. The output head is not one of them (PEFT's
/// `all-linear` leaves it out too).
pub fn linear_targets(config: &ModelConfig) -> Vec<LoraTarget> {
    let c = config.hidden_size;
    let q = config.num_attention_heads * config.head_dim;
    let kv = config.num_key_value_heads * config.head_dim;
    let i = config.intermediate_size;
    let mut out = Vec::with_capacity(config.num_hidden_layers * LINEAR_MODULES.len());
    for layer in 0..config.num_hidden_layers {
        for module in LINEAR_MODULES {
            let (block, out_features, in_features) = match module {
                "q_proj" => ("self_attn", q, c),
                "k_proj" | "v_proj" => ("self_attn", kv, c),
                "o_proj" => ("self_attn", c, q),
                "gate_proj" | "up_proj" => ("mlp", i, c),
                _ => ("mlp", c, i),
            };
            out.push(LoraTarget {
                layer,
                module: module.to_owned(),
                path: format!("model.layers.{layer}.{block}.{module}"),
                in_features,
                out_features,
            });
        }
    }
    out
}

/// Whether the module at `path` matches the `target_modules` entry `key`, by PEFT's rule for a
/// list: the full path equals it, or ends with `.key`.
fn matches(path: &str, key: &str) -> bool {
    path == key
        || path
            .strip_suffix(key)
            .is_some_and(|head| head.ends_with('.'))
}

/// The modules of `available` that `config.target_modules` selects, in `available`'s order.
/// An entry that matches no module is an error naming the model's linear modules (PEFT only
/// errors when nothing matches at all; a typo in one entry of several is caught here too).
pub fn select_targets(
    config: &LoraConfig,
    available: &[LoraTarget],
) -> Result<Vec<LoraTarget>, String> {
    config.validate()?;
    let names = module_names(available);
    let keys: Vec<&str> = config
        .target_modules
        .iter()
        .map(|k| k.trim())
        .filter(|k| !k.is_empty())
        .collect();
    if keys.contains(&ALL_LINEAR) {
        if keys.len() > 1 {
            return Err(format!(
                "target_modules: \"{ALL_LINEAR}\" cannot be combined with other names ({})",
                keys.join(", ")
            ));
        }
        if available.is_empty() {
            return Err("the model has no linear modules to adapt".to_owned());
        }
        return Ok(available.to_vec());
    }
    for key in &keys {
        if !available.iter().any(|t| matches(&t.path, key)) {
            return Err(format!(
                "target module {key:?} does not exist in this model; its linear modules are: {} \
                 (or \"{ALL_LINEAR}\")",
                names.join(", ")
            ));
        }
    }
    if keys.is_empty() {
        return Err("target_modules is empty".to_owned());
    }
    Ok(available
        .iter()
        .filter(|t| keys.iter().any(|k| matches(&t.path, k)))
        .cloned()
        .collect())
}

/// Distinct module names of `targets`, in first-seen order.
fn module_names(targets: &[LoraTarget]) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for t in targets {
        if !names.contains(&t.module) {
            names.push(t.module.clone());
        }
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model() -> Vec<LoraTarget> {
        let mut out = Vec::new();
        for layer in 0..2 {
            for (module, block) in [("q_proj", "self_attn"), ("down_proj", "mlp")] {
                out.push(LoraTarget {
                    layer,
                    module: module.to_owned(),
                    path: format!("model.layers.{layer}.{block}.{module}"),
                    in_features: 4,
                    out_features: 3,
                });
            }
        }
        out
    }

    fn cfg(targets: &[&str]) -> LoraConfig {
        LoraConfig {
            target_modules: targets.iter().map(|s| s.to_string()).collect(),
            ..LoraConfig::default()
        }
    }

    #[test]
    fn names_and_suffixes_select_modules() {
        let got = select_targets(&cfg(&["down_proj"]), &model()).unwrap();
        assert_eq!(got.len(), 2);
        assert!(got.iter().all(|t| t.module == "down_proj"));
        let got = select_targets(&cfg(&["layers.1.self_attn.q_proj"]), &model()).unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].layer, 1);
        assert_eq!(
            select_targets(&cfg(&["all-linear"]), &model())
                .unwrap()
                .len(),
            4
        );
    }

    #[test]
    fn unknown_module_lists_the_models_modules() {
        let err = select_targets(&cfg(&["q_proj", "qproj"]), &model()).unwrap_err();
        assert!(err.contains("\"qproj\""), "{err}");
        assert!(err.contains("q_proj, down_proj"), "{err}");
        // A suffix must end at a dot: "proj" is not "q_proj".
        assert!(select_targets(&cfg(&["proj"]), &model()).is_err());
    }
}
