//! The weights of a model with a LoRA adapter merged in, as PEFT's `merge_and_unload` forms
//! them: for every adapted Linear, W (out, in) += s B (out, r) A (r, in), s = alpha / r (alpha /
//! sqrt(r) with rslora). Summed in f32 over the stored values (PEFT adds the product in the
//! weight's dtype, rounding once more), then rounded once when written.

use std::collections::HashMap;

use crate::bnb4bit;
use crate::checkpoint::LoadedModel;
use crate::lora::{LoraTensor, LoraWeights};
use ftrt_runtime::cpu_rows::for_row_blocks;

/// A model's weights under Hugging Face names, each read as f32 with its adapter's product
/// added (the others as stored).
pub struct MergedWeights<'a> {
    model: &'a LoadedModel,
    lora: Option<&'a LoraWeights>,
    /// `<module path>.weight` -> its adapter tensors.
    adapted: HashMap<String, &'a LoraTensor>,
}

impl<'a> MergedWeights<'a> {
    pub fn new(model: &'a LoadedModel, lora: Option<&'a LoraWeights>) -> Self {
        let adapted = lora
            .map(|l| {
                l.tensors
                    .iter()
                    .map(|t| (format!("{}.weight", t.target.path), t))
                    .collect()
            })
            .unwrap_or_default();
        Self {
            model,
            lora,
            adapted,
        }
    }

    /// The model being exported.
    pub fn model(&self) -> &LoadedModel {
        self.model
    }

    /// Every weight name, sorted (a 4-bit checkpoint's
    /// quantization state is part of its weight, not a name of its own).
    pub fn names(&self) -> Vec<String> {
        self.model
            .weights
            .names()
            .into_iter()
            .filter(|n| !bnb4bit::is_quant_state(n))
            .map(str::to_owned)
            .collect()
    }

    /// Row-major shape of weight `name`.
    pub fn shape(&self, name: &str) -> Result<Vec<usize>, String> {
        self.model
            .weights
            .info(name)
            .map(|i| i.shape)
            .ok_or_else(|| format!("{}: no weight named {name:?}", self.model.path.display()))
    }

    /// How many weights the adapter changes.
    pub fn adapted(&self) -> usize {
        self.adapted.len()
    }

    /// Weight `name` as f32, with s B A added when the adapter has that module.
    pub fn get(&self, name: &str) -> Result<Vec<f32>, String> {
        let mut w = self.model.weights.to_f32(name).map_err(|e| e.to_string())?;
        if let (Some(t), Some(lora)) = (self.adapted.get(name), self.lora) {
            let (out, inn, r) = (t.target.out_features, t.target.in_features, lora.config.r);
            if w.len() != out * inn {
                return Err(format!(
                    "{name}: {} values, but the adapter expects ({out}, {inn})",
                    w.len()
                ));
            }
            add_low_rank(
                &mut w,
                &lora.data[t.b.clone()],
                &lora.data[t.a.clone()],
                r,
                lora.scale(),
            );
        }
        Ok(w)
    }
}

/// w (out, in) += s b (out, r) a (r, in): each row's product summed over k = 0..r in order
/// (row-wise, so the inner loop runs along contiguous rows of a), then scaled and added once.
/// Blocks of rows run on the CPU threads ([`for_row_blocks`]); the result does not depend on
/// their number.
fn add_low_rank(w: &mut [f32], b: &[f32], a: &[f32], r: usize, s: f32) {
    let (out, inn) = (b.len() / r.max(1), a.len() / r.max(1));
    for_row_blocks([w], out, 64, |rows, [w]| {
        let mut acc = vec![0f32; inn];
        for (row, b_row) in w
            .chunks_exact_mut(inn)
            .zip(b[rows.start * r..rows.end * r].chunks_exact(r))
        {
            acc.fill(0.0);
            for (&bk, a_row) in b_row.iter().zip(a.chunks_exact(inn)) {
                for (c, &av) in acc.iter_mut().zip(a_row) {
                    *c += bk * av;
                }
            }
            for (x, c) in row.iter_mut().zip(&acc) {
                *x += s * c;
            }
        }
    });
}
