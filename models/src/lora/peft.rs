//! PEFT's adapter folder: `adapter_model.safetensors` (tensors
//! `base_model.model.<module path>.lora_A.weight` / `.lora_B.weight`, f32, metadata
//! `{"format": "pt"}`) and `adapter_config.json` (every key `LoraConfig.to_dict()` writes, sorted,
//! as PEFT's `save_pretrained` does).

use std::collections::HashMap;
use std::path::Path;

use safetensors::tensor::TensorView;
use safetensors::Dtype;
use serde_json::{json, Map, Value};

use super::{LoraConfig, LoraTarget, LoraWeights, ALL_LINEAR};
use crate::safetensors_io::SafetensorsFiles;
use crate::train::atomic::write_atomic;

/// File name of the adapter's weights.
pub const ADAPTER_WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// File name of the adapter's config.
pub const ADAPTER_CONFIG_FILE: &str = "adapter_config.json";
/// The PEFT release whose `adapter_config.json` keys we write (checked against a golden file
/// written by that release).
pub const PEFT_FORMAT_VERSION: &str = "0.21.2";

/// PEFT's tensor name of A (or B) of the module at `path`.
pub fn peft_tensor_name(path: &str, b: bool) -> String {
    format!(
        "base_model.model.{path}.lora_{}.weight",
        if b { "B" } else { "A" }
    )
}

/// A JSON number as PEFT writes it: an integer when the value is whole (`lora_alpha=16`).
fn number(x: f64) -> Value {
    if x.fract() == 0.0 && x.abs() < 1e15 {
        json!(x as i64)
    } else {
        json!(x)
    }
}

/// The `adapter_config.json` PEFT writes for `config` adapting the modules named `modules`.
/// `target_modules` lists the distinct module names, sorted (PEFT stores a set, and expands
/// `all-linear` to the names it found).
pub fn adapter_config_json(
    config: &LoraConfig,
    modules: &[String],
    base_model_name_or_path: Option<&str>,
) -> Value {
    let mut names: Vec<&str> = modules.iter().map(String::as_str).collect();
    names.sort_unstable();
    names.dedup();
    json!({
        "alora_invocation_tokens": null,
        "alpha_pattern": {},
        "arrow_config": null,
        "auto_mapping": null,
        "base_model_name_or_path": base_model_name_or_path,
        "bias": config.bias,
        "corda_config": null,
        "ensure_weight_tying": false,
        "eva_config": null,
        "exclude_modules": null,
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "kasa_config": null,
        "layer_replication": null,
        "layers_pattern": null,
        "layers_to_transform": null,
        "loftq_config": {},
        "lora_alpha": number(config.lora_alpha),
        "lora_bias": false,
        "lora_dropout": config.lora_dropout,
        "lora_ga_config": null,
        "megatron_config": null,
        "megatron_core": "megatron.core",
        "modules_to_save": null,
        "monteclora_config": null,
        "peft_type": "LORA",
        "peft_version": PEFT_FORMAT_VERSION,
        "qalora_group_size": 16,
        "r": config.r,
        "rank_pattern": {},
        "revision": null,
        "target_modules": names,
        "target_parameters": null,
        "task_type": "CAUSAL_LM",
        "trainable_token_indices": null,
        "use_bdlora": null,
        "use_dora": false,
        "use_qalora": false,
        "use_rslora": config.use_rslora,
        "velora_config": null
    })
}

impl LoraWeights {
    /// The safetensors bytes of `adapter_model.safetensors`.
    pub fn peft_safetensors_bytes(&self) -> Result<Vec<u8>, String> {
        let bytes: &[u8] = bytemuck::cast_slice(&self.data);
        let mut views = Vec::with_capacity(self.tensors.len() * 2);
        for t in &self.tensors {
            let r = self.config.r;
            for (is_b, range, shape) in [
                (false, &t.a, vec![r, t.target.in_features]),
                (true, &t.b, vec![t.target.out_features, r]),
            ] {
                let view =
                    TensorView::new(Dtype::F32, shape, &bytes[range.start * 4..range.end * 4])
                        .map_err(|e| format!("adapter tensor {}: {e}", t.target.path))?;
                views.push((peft_tensor_name(&t.target.path, is_b), view));
            }
        }
        let meta = HashMap::from([("format".to_owned(), "pt".to_owned())]);
        safetensors::serialize(views, Some(meta)).map_err(|e| format!("adapter weights: {e}"))
    }

    /// Writes PEFT's adapter folder into `dir` (created if needed); each file is written
    /// atomically.
    pub fn save_peft(
        &self,
        dir: &Path,
        base_model_name_or_path: Option<&str>,
    ) -> Result<(), String> {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("{}: cannot create: {e}", dir.display()))?;
        let modules: Vec<String> = self
            .tensors
            .iter()
            .map(|t| t.target.module.clone())
            .collect();
        let config = adapter_config_json(&self.config, &modules, base_model_name_or_path);
        let text = serde_json::to_string_pretty(&config).map_err(|e| e.to_string())? + "\n";
        write_atomic(
            &dir.join(ADAPTER_WEIGHTS_FILE),
            &self.peft_safetensors_bytes()?,
        )?;
        write_atomic(&dir.join(ADAPTER_CONFIG_FILE), text.as_bytes())
    }

    /// Reads a PEFT LoRA adapter folder for a model whose linear modules are `available`. The
    /// adapted modules are those with tensors in the file; every tensor must belong to one, with
    /// the shape the model implies.
    pub fn load_peft(dir: &Path, available: &[LoraTarget]) -> Result<Self, String> {
        let cfg_path = dir.join(ADAPTER_CONFIG_FILE);
        let config = read_adapter_config(&cfg_path)?;
        let file = dir.join(ADAPTER_WEIGHTS_FILE);
        let files = SafetensorsFiles::open(&file).map_err(|e| e.to_string())?;
        let targets: Vec<LoraTarget> = available
            .iter()
            .filter(|t| files.meta(&peft_tensor_name(&t.path, false)).is_some())
            .cloned()
            .collect();
        if targets.is_empty() {
            return Err(format!(
                "{}: no LoRA tensor matches a linear module of this model",
                file.display()
            ));
        }
        let mut w = LoraWeights::zeros_for(&config, targets);
        let mut used = 0;
        for t in w.tensors.clone() {
            let r = config.r;
            for (is_b, range, shape) in [
                (false, t.a, [r, t.target.in_features]),
                (true, t.b, [t.target.out_features, r]),
            ] {
                let name = peft_tensor_name(&t.target.path, is_b);
                let meta = files
                    .meta(&name)
                    .ok_or_else(|| format!("{}: missing {name:?}", file.display()))?;
                if meta.shape != shape {
                    return Err(format!(
                        "{}: {name:?} has shape {:?}, expected {shape:?} (r = {r})",
                        file.display(),
                        meta.shape
                    ));
                }
                let values = files.to_f32(&name).map_err(|e| e.to_string())?;
                w.data[range].copy_from_slice(&values);
                used += 1;
            }
        }
        let total = files.names().count();
        if used != total {
            let extra: Vec<&str> = files
                .names()
                .filter(|n| {
                    !w.tensors.iter().any(|t| {
                        *n == peft_tensor_name(&t.target.path, false)
                            || *n == peft_tensor_name(&t.target.path, true)
                    })
                })
                .take(5)
                .collect();
            return Err(format!(
                "{}: {} tensor(s) belong to no LoRA module of this model, e.g. {}",
                file.display(),
                total - used,
                extra.join(", ")
            ));
        }
        Ok(w)
    }
}

/// Parses `adapter_config.json` into a [`LoraConfig`], refusing what plain LoRA cannot run.
fn read_adapter_config(path: &Path) -> Result<LoraConfig, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
    let v: Map<String, Value> = serde_json::from_str(&text)
        .map_err(|e| format!("{}: invalid JSON: {e}", path.display()))?;
    let bad = |why: String| format!("{}: {why}", path.display());
    if let Some(t) = v.get("peft_type").and_then(Value::as_str) {
        if t != "LORA" {
            return Err(bad(format!("peft_type is {t:?}, not \"LORA\"")));
        }
    }
    for key in ["use_dora", "use_qalora", "lora_bias", "fan_in_fan_out"] {
        if v.get(key).and_then(Value::as_bool) == Some(true) {
            return Err(bad(format!("{key} = true is not supported")));
        }
    }
    for key in ["rank_pattern", "alpha_pattern"] {
        if v.get(key)
            .and_then(Value::as_object)
            .is_some_and(|m| !m.is_empty())
        {
            return Err(bad(format!("a non-empty {key} is not supported")));
        }
    }
    let r = v
        .get("r")
        .and_then(Value::as_u64)
        .ok_or_else(|| bad("missing or invalid \"r\"".to_owned()))? as usize;
    let lora_alpha = v
        .get("lora_alpha")
        .and_then(Value::as_f64)
        .ok_or_else(|| bad("missing or invalid \"lora_alpha\"".to_owned()))?;
    let target_modules = match v.get("target_modules") {
        Some(Value::Array(items)) => items
            .iter()
            .map(|i| i.as_str().map(str::to_owned))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| bad("target_modules must hold strings".to_owned()))?,
        // A string is a regular expression in PEFT; kept as given (the tensors decide).
        Some(Value::String(s)) => vec![s.clone()],
        _ => vec![ALL_LINEAR.to_owned()],
    };
    let config = LoraConfig {
        r,
        lora_alpha,
        target_modules,
        lora_dropout: v.get("lora_dropout").and_then(Value::as_f64).unwrap_or(0.0),
        use_rslora: v
            .get("use_rslora")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        bias: v
            .get("bias")
            .and_then(Value::as_str)
            .unwrap_or("none")
            .to_owned(),
    };
    config.validate().map_err(bad)?;
    Ok(config)
}
