//! LoRA as PEFT defines it, on the seven projections: y = x W^T + b + s * (x A^T) B^T with
//! A (r, in), B (out, r), s = alpha / r (alpha / sqrt(r) with rslora). The weights live in one
//! flat store; gradients use the same layout ([`LoraAdapter::zeros_like`]). Each layer's A's
//! come first, back to back in [`Proj::ALL`] order, then its B's: the A's of the projections
//! that read one input form one matrix ([`LoraAdapter::stack`]).

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

/// The adapted projections of one input group ([`Proj::INPUT_GROUPS`]) in one layer. Their
/// A's are adjacent in the flat store: one (m r, in) matrix whose rows [i r, (i + 1) r) are
/// member i's A, so x [A_1; ...; A_m]^T (n, m r) is one GEMM and member i owns its columns
/// [i r, (i + 1) r).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoraStack {
    /// The adapted members, in [`Proj::ALL`] order.
    pub members: Vec<Proj>,
    /// The stacked A (m r, in) in the flat store.
    pub a: Range<usize>,
}

impl LoraStack {
    /// Member `p`'s block of the stack (its rows of A, its columns of x A^T), if a member.
    pub fn position(&self, p: Proj) -> Option<usize> {
        self.members.iter().position(|&m| m == p)
    }
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
        let targets: Vec<Proj> = Proj::ALL
            .into_iter()
            .filter(|p| targets.contains(p))
            .collect();
        for _ in 0..dims.layers {
            let mut take = |len: usize| {
                let at = data.len()..data.len() + len;
                data.resize(at.end, 0.0);
                at
            };
            let a: Vec<Range<usize>> = targets.iter().map(|p| take(r * p.shape(dims).1)).collect();
            let mut row: [Option<LoraSlot>; 7] = Default::default();
            for (&p, a) in targets.iter().zip(a) {
                let b = take(p.shape(dims).0 * r);
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

    /// The stack of input group `group` ([`Proj::INPUT_GROUPS`]) in `layer`: None when none of
    /// it is adapted, an error when the members' A's are not adjacent (a layout not built by
    /// [`Self::zeros`]).
    pub fn stack(&self, layer: usize, group: usize) -> Result<Option<LoraStack>, String> {
        let members: Vec<Proj> = Proj::INPUT_GROUPS[group]
            .iter()
            .copied()
            .filter(|&p| self.slot(layer, p).is_some())
            .collect();
        let Some(first) = members.first() else {
            return Ok(None);
        };
        let mut a = self.slot(layer, *first).expect("a member").a.clone();
        for w in members.windows(2) {
            let next = &self.slot(layer, w[1]).expect("a member").a;
            if next.start != a.end {
                return Err(format!(
                    "LoRA layout: layer {layer}'s {} A does not follow its {} A",
                    w[1].module(),
                    w[0].module()
                ));
            }
            a.end = next.end;
        }
        Ok(Some(LoraStack { members, a }))
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

#[cfg(test)]
mod tests {
    use super::*;
    use ftrt_runtime::rng::SplitMix64;

    fn dims() -> Dims {
        Dims {
            hidden: 24,
            intermediate: 40,
            heads: 4,
            kv_heads: 2,
            head_dim: 6,
            layers: 3,
            vocab: 50,
        }
    }

    /// Random target sets: every slot sized by its shape, slots disjoint and covering the
    /// store, and each group's adapted A's one contiguous stack in `Proj::ALL` order.
    #[test]
    fn stacks_cover_exactly_the_adapted_members() {
        let d = dims();
        let mut rng = SplitMix64::new(ftrt_runtime::rng::fresh_seed());
        for _ in 0..50 {
            let mut targets: Vec<Proj> = Proj::ALL
                .into_iter()
                .filter(|_| rng.next_f32() < 0.5)
                .collect();
            targets.reverse();
            let r = 1 + (rng.next_f32() * 8.0) as usize;
            let ad = LoraAdapter::zeros(&d, r, 16.0, false, &targets);
            let mut covered = vec![0u8; ad.data.len()];
            for l in 0..d.layers {
                for (g, group) in Proj::INPUT_GROUPS.iter().enumerate() {
                    let want: Vec<Proj> = group
                        .iter()
                        .copied()
                        .filter(|p| targets.contains(p))
                        .collect();
                    let st = ad.stack(l, g).expect("adjacent");
                    let Some(st) = st else {
                        assert!(want.is_empty());
                        continue;
                    };
                    assert_eq!(st.members, want);
                    let inn = group[0].shape(&d).1;
                    assert_eq!(st.a.len(), want.len() * r * inn);
                    for (i, &p) in want.iter().enumerate() {
                        let s = ad.slot(l, p).unwrap();
                        assert_eq!(s.a.start, st.a.start + i * r * inn);
                        assert_eq!(st.position(p), Some(i));
                    }
                }
                for p in &targets {
                    let s = ad.slot(l, *p).unwrap();
                    let (out, inn) = p.shape(&d);
                    assert_eq!((s.a.len(), s.b.len()), (r * inn, out * r));
                    for i in s.a.clone().chain(s.b.clone()) {
                        covered[i] += 1;
                    }
                }
            }
            assert!(covered.iter().all(|&c| c == 1));
        }
    }

    #[test]
    fn a_stack_with_a_gap_is_refused() {
        let d = dims();
        let mut ad = LoraAdapter::zeros(&d, 2, 4.0, false, &[Proj::Q, Proj::K]);
        let k = ad.slots[1][Proj::K.index()].as_mut().unwrap();
        k.a = k.a.start + 1..k.a.end + 1;
        let err = ad.stack(1, 0).unwrap_err();
        assert!(
            err.contains("layer 1's k_proj A does not follow its q_proj A"),
            "{err}"
        );
        assert!(ad.stack(0, 0).unwrap().is_some());
    }
}
