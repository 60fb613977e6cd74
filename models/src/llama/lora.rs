//! LoRA as PEFT defines it, on the seven projections: y = x W^T + b + s * (x A^T) B^T with
//! A (r, in), B (out, r), s = alpha / r (alpha / sqrt(r) with rslora). The weights live in one
//! flat store; gradients use the same layout ([`LoraAdapter::zeros_like`]).

use std::ops::Range;
use std::path::Path;

use serde_json::Value;

use super::weights::{Dims, Proj};
use super::LlamaError;
use crate::safetensors_io::SafetensorsFiles;

/// Where one projection's A and B live in [`LoraAdapter::data`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoraSlot {
    /// A (r, in)
    pub a: Range<usize>,
    /// B (out, r)
    pub b: Range<usize>,
}

/// LoRA weights of every adapted projection (or their gradients, same layout).
#[derive(Debug, Clone)]
pub struct LoraAdapter {
    /// Rank r.
    pub r: usize,
    /// s: alpha / r, or alpha / sqrt(r) with rslora.
    pub scale: f32,
    /// All A and B values.
    pub data: Vec<f32>,
    /// [layer][Proj::index]: the projection's A and B, if adapted.
    pub slots: Vec<[Option<LoraSlot>; 7]>,
}

impl LoraAdapter {
    /// Zero-initialised adapters of rank `r` on `targets` in every layer.
    pub fn zeros(dims: &Dims, r: usize, alpha: f32, rslora: bool, targets: &[Proj]) -> Self {
        let mut data = Vec::new();
        let mut slots = Vec::with_capacity(dims.layers);
        for _ in 0..dims.layers {
            let mut row: [Option<LoraSlot>; 7] = Default::default();
            for &p in targets {
                let (out, inn) = p.shape(dims);
                let a = data.len()..data.len() + r * inn;
                data.resize(a.end, 0.0);
                let b = data.len()..data.len() + out * r;
                data.resize(b.end, 0.0);
                row[p.index()] = Some(LoraSlot { a, b });
            }
            slots.push(row);
        }
        let scale = if rslora {
            alpha / (r as f32).sqrt()
        } else {
            alpha / r as f32
        };
        Self {
            r,
            scale,
            data,
            slots,
        }
    }

    /// The same layout, all zeros (a gradient buffer).
    pub fn zeros_like(&self) -> Self {
        Self {
            r: self.r,
            scale: self.scale,
            data: vec![0.0; self.data.len()],
            slots: self.slots.clone(),
        }
    }

    /// The slot of `proj` in `layer`, if adapted.
    pub fn slot(&self, layer: usize, proj: Proj) -> Option<&LoraSlot> {
        self.slots.get(layer).and_then(|s| s[proj.index()].as_ref())
    }

    /// A (r, in) of `proj` in `layer`.
    pub fn a(&self, layer: usize, proj: Proj) -> Option<&[f32]> {
        self.slot(layer, proj).map(|s| &self.data[s.a.clone()])
    }

    /// B (out, r) of `proj` in `layer`.
    pub fn b(&self, layer: usize, proj: Proj) -> Option<&[f32]> {
        self.slot(layer, proj).map(|s| &self.data[s.b.clone()])
    }

    /// PEFT's parameter name of A or B (`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`).
    pub fn peft_name(layer: usize, proj: Proj, which_b: bool) -> String {
        format!(
            "base_model.model.{}.lora_{}.weight",
            proj.hf_prefix(layer),
            if which_b { "B" } else { "A" }
        )
    }

    /// Loads a PEFT adapter folder (adapter_config.json + adapter_model.safetensors) for a
    /// model of `dims`. Only plain LoRA (no DoRA, no bias training) is supported.
    pub fn load_peft(dir: &Path, dims: &Dims) -> Result<Self, LlamaError> {
        let cfg_path = dir.join("adapter_config.json");
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| {
            LlamaError::Adapter(format!("{}: cannot read: {e}", cfg_path.display()))
        })?;
        let cfg: Value = serde_json::from_str(&text).map_err(|e| {
            LlamaError::Adapter(format!("{}: invalid JSON: {e}", cfg_path.display()))
        })?;
        let bad = |why: &str| LlamaError::Adapter(format!("{}: {why}", cfg_path.display()));
        if cfg
            .get("peft_type")
            .and_then(Value::as_str)
            .is_some_and(|t| t != "LORA")
        {
            return Err(bad("peft_type is not LORA"));
        }
        if cfg.get("use_dora").and_then(Value::as_bool) == Some(true) {
            return Err(bad("DoRA adapters are not supported"));
        }
        let r = cfg
            .get("r")
            .and_then(Value::as_u64)
            .ok_or_else(|| bad("missing \"r\""))? as usize;
        let alpha = cfg
            .get("lora_alpha")
            .and_then(Value::as_f64)
            .ok_or_else(|| bad("missing \"lora_alpha\""))?;
        let rslora = cfg
            .get("use_rslora")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        if r == 0 {
            return Err(bad("r must be positive"));
        }
        let files = SafetensorsFiles::open(&dir.join("adapter_model.safetensors"))?;
        let mut targets = Vec::new();
        for p in Proj::ALL {
            if files.meta(&Self::peft_name(0, p, false)).is_some() {
                targets.push(p);
            }
        }
        if targets.is_empty() {
            return Err(LlamaError::Adapter(format!(
                "{}: no LoRA weights for any of q/k/v/o/gate/up/down_proj of layer 0",
                dir.display()
            )));
        }
        let mut ad = Self::zeros(dims, r, alpha as f32, rslora, &targets);
        for l in 0..dims.layers {
            for &p in &targets {
                let (out, inn) = p.shape(dims);
                let slot = ad.slots[l][p.index()].clone().expect("allocated");
                for (which_b, range, shape) in [(false, slot.a, [r, inn]), (true, slot.b, [out, r])]
                {
                    let name = Self::peft_name(l, p, which_b);
                    let meta = files.meta(&name).ok_or_else(|| {
                        LlamaError::Adapter(format!("{}: missing \"{name}\"", dir.display()))
                    })?;
                    if meta.shape != shape {
                        return Err(LlamaError::Adapter(format!(
                            "{}: \"{name}\" has shape {:?}, expected {shape:?}",
                            dir.display(),
                            meta.shape
                        )));
                    }
                    let v = files.to_f32(&name)?;
                    ad.data[range].copy_from_slice(&v);
                }
            }
        }
        Ok(ad)
    }
}
