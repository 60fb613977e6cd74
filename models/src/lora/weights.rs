//! Every LoRA A and B of a model in one flat f32 buffer, with a range per tensor.
//!
//! Layout: for each adapted module, in the order of the model's [`LoraTarget`] list (layer by
//! layer, q/k/v/o/gate/up/down within a layer): A (r, in) row-major, then B (out, r)
//! row-major. Gradients, AdamW moments and checkpoints use exactly this layout, so the optimizer
//! works on `data` as one vector. The CPU Llama path's `LoraAdapter` lays out its store the same
//! way when its targets are listed in `Proj::ALL` order, so converting is a copy of `data`.

use std::ops::Range;

use super::init::kaiming_uniform;
use super::select::select_targets;
use super::{LoraConfig, LoraTarget};
use crate::train::rng::SplitMix64;

/// Where one adapted module's A and B live in [`LoraWeights::data`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoraTensor {
    /// The module.
    pub target: LoraTarget,
    /// A (r, in_features).
    pub a: Range<usize>,
    /// B (out_features, r).
    pub b: Range<usize>,
}

/// LoRA weights (or their gradients, same layout) of every adapted module.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraWeights {
    /// The adapter's hyperparameters.
    pub config: LoraConfig,
    /// One entry per adapted module.
    pub tensors: Vec<LoraTensor>,
    /// All A and B values.
    pub data: Vec<f32>,
}

impl LoraWeights {
    /// Zero A and B for the modules of `available` that `config` selects.
    pub fn zeros(config: &LoraConfig, available: &[LoraTarget]) -> Result<Self, String> {
        let targets = select_targets(config, available)?;
        Ok(Self::zeros_for(config, targets))
    }

    /// Zero A and B for exactly `targets` (already selected).
    pub fn zeros_for(config: &LoraConfig, targets: Vec<LoraTarget>) -> Self {
        let r = config.r;
        let mut tensors = Vec::with_capacity(targets.len());
        let mut len = 0;
        for target in targets {
            let a = len..len + r * target.in_features;
            let b = a.end..a.end + target.out_features * r;
            len = b.end;
            tensors.push(LoraTensor { target, a, b });
        }
        Self {
            config: config.clone(),
            tensors,
            data: vec![0.0; len],
        }
    }

    /// PEFT's initialisation from `seed`: every A ~ U(-1/sqrt(in), 1/sqrt(in)), every B = 0.
    pub fn init(config: &LoraConfig, available: &[LoraTarget], seed: u64) -> Result<Self, String> {
        let mut w = Self::zeros(config, available)?;
        let mut rng = SplitMix64::derived(seed, 0x10_4A);
        for t in &w.tensors {
            kaiming_uniform(&mut w.data[t.a.clone()], t.target.in_features, &mut rng);
        }
        Ok(w)
    }

    /// The same layout filled with zeros (a gradient buffer).
    pub fn zeros_like(&self) -> Self {
        Self {
            config: self.config.clone(),
            tensors: self.tensors.clone(),
            data: vec![0.0; self.data.len()],
        }
    }

    /// Whether `other` has the same rank, modules and shapes.
    pub fn same_layout(&self, other: &LoraWeights) -> bool {
        self.config.r == other.config.r && self.tensors == other.tensors
    }

    /// Number of trainable values.
    pub fn len(&self) -> usize {
        self.data.len()
    }

    /// Whether no module is adapted.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// The factor on the LoRA branch (alpha / r, or alpha / sqrt(r)).
    pub fn scale(&self) -> f32 {
        self.config.scale()
    }

    /// The entry of `module` in `layer`, if adapted.
    pub fn find(&self, layer: usize, module: &str) -> Option<&LoraTensor> {
        self.tensors
            .iter()
            .find(|t| t.target.layer == layer && t.target.module == module)
    }

    /// A (r, in) of `module` in `layer`.
    pub fn a(&self, layer: usize, module: &str) -> Option<&[f32]> {
        self.find(layer, module).map(|t| &self.data[t.a.clone()])
    }

    /// B (out, r) of `module` in `layer`.
    pub fn b(&self, layer: usize, module: &str) -> Option<&[f32]> {
        self.find(layer, module).map(|t| &self.data[t.b.clone()])
    }

    /// Every tensor as (range, element count), A and B separately, in buffer order (what the
    /// optimizer and the gradient norm iterate over, like PyTorch's parameter list).
    pub fn param_ranges(&self) -> Vec<Range<usize>> {
        self.tensors
            .iter()
            .flat_map(|t| [t.a.clone(), t.b.clone()])
            .collect()
    }
}
