//! The optimizers, over the flat LoRA buffer, through the ops' CPU references:
//!
//! - `adamw_torch`: torch.optim.AdamW with f32 moments (`ftrt_ops::adamw::adamw`);
//! - `adamw_8bit`: bitsandbytes' AdamW8bit: moments quantized blockwise (blocks of 256, dynamic
//!   maps) for tensors of at least 4096 values (bnb's `min_8bit_size`); smaller tensors keep f32
//!   moments, as bitsandbytes does.
//!
//! Each A and each B is one parameter tensor, as in PyTorch's parameter list.

use std::ops::Range;
use std::str::FromStr;

use ftrt_ops::adamw::{adamw, adamw_8bit};
use ftrt_ops::dsl::Rounding;
use ftrt_ops::quant_prelude::{dynamic_map_signed, dynamic_map_unsigned};

/// bitsandbytes' `min_8bit_size`: smaller tensors keep 32-bit optimizer state.
pub const MIN_8BIT_SIZE: usize = 4096;
/// bitsandbytes' block size for 8-bit optimizer state.
pub const BLOCK: usize = 256;

/// Which optimizer (`--optim`, named as in transformers' `OptimizerNames`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OptimKind {
    /// `adamw_torch`: AdamW with f32 moments.
    AdamW,
    /// `adamw_8bit` / `adamw_bnb_8bit`: AdamW with 8-bit blockwise moments.
    AdamW8bit,
}

impl OptimKind {
    /// The name as transformers spells it.
    pub fn name(self) -> &'static str {
        match self {
            Self::AdamW => "adamw_torch",
            Self::AdamW8bit => "adamw_8bit",
        }
    }
}

impl FromStr for OptimKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "adamw_torch" | "adamw" | "adamw_torch_fused" => Ok(Self::AdamW),
            "adamw_8bit" | "adamw_bnb_8bit" | "paged_adamw_8bit" => Ok(Self::AdamW8bit),
            other => Err(format!(
                "unknown optimizer {other:?}; supported: adamw_torch, adamw_8bit"
            )),
        }
    }
}

/// AdamW's hyperparameters (transformers' TrainingArguments defaults).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamHyper {
    /// Decoupled weight decay.
    pub weight_decay: f32,
    /// beta1 (0.9).
    pub beta1: f32,
    /// beta2 (0.999).
    pub beta2: f32,
    /// epsilon (1e-8).
    pub eps: f32,
}

impl Default for AdamHyper {
    fn default() -> Self {
        Self {
            weight_decay: 0.0,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        }
    }
}

/// The moments of one parameter tensor.
#[derive(Debug, Clone, PartialEq)]
pub enum Moments {
    /// f32 first and second moments.
    F32 {
        /// First moment.
        m: Vec<f32>,
        /// Second moment.
        v: Vec<f32>,
    },
    /// 8-bit blockwise moments: codes and one absmax per block of 256.
    Q8 {
        /// First-moment codes (signed dynamic map).
        qm: Vec<u8>,
        /// Second-moment codes (unsigned dynamic map).
        qv: Vec<u8>,
        /// First-moment absmax per block.
        am: Vec<f32>,
        /// Second-moment max per block.
        av: Vec<f32>,
    },
}

/// Optimizer state of one parameter tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorState {
    /// The tensor's values in the flat buffer.
    pub range: Range<usize>,
    /// Its moments.
    pub moments: Moments,
}

/// An optimizer over a flat parameter buffer.
#[derive(Debug, Clone, PartialEq)]
pub struct Optimizer {
    /// Which update rule.
    pub kind: OptimKind,
    /// Its hyperparameters.
    pub hyper: AdamHyper,
    /// Optimizer steps taken (AdamW's t).
    pub steps: u64,
    /// Per tensor state.
    pub state: Vec<TensorState>,
    code_m: [f32; 256],
    code_v: [f32; 256],
}

impl Optimizer {
    /// Fresh state for the tensors `ranges` of the flat buffer.
    pub fn new(kind: OptimKind, hyper: AdamHyper, ranges: &[Range<usize>]) -> Self {
        let state = ranges
            .iter()
            .map(|r| {
                let n = r.len();
                let moments = if kind == OptimKind::AdamW8bit && n >= MIN_8BIT_SIZE {
                    let nb = n.div_ceil(BLOCK);
                    Moments::Q8 {
                        qm: vec![0; n],
                        qv: vec![0; n],
                        am: vec![0.0; nb],
                        av: vec![0.0; nb],
                    }
                } else {
                    Moments::F32 {
                        m: vec![0.0; n],
                        v: vec![0.0; n],
                    }
                };
                TensorState {
                    range: r.clone(),
                    moments,
                }
            })
            .collect();
        Self {
            kind,
            hyper,
            steps: 0,
            state,
            code_m: dynamic_map_signed(),
            code_v: dynamic_map_unsigned(),
        }
    }

    /// One update of `params` with `grads` (same layout) at learning rate `lr`.
    pub fn step(&mut self, params: &mut [f32], grads: &[f32], lr: f32) {
        self.steps += 1;
        let h = self.hyper;
        let t = self.steps as i32;
        let bc1 = 1.0 - h.beta1.powi(t);
        let bc2_sqrt = (1.0 - h.beta2.powi(t)).sqrt();
        for st in &mut self.state {
            let r = st.range.clone();
            let (p, g) = (&mut params[r.clone()], &grads[r]);
            match &mut st.moments {
                Moments::F32 { m, v } => adamw::forward_cpu::<f32>(
                    &adamw::Dims { N: p.len() },
                    lr,
                    h.weight_decay,
                    h.beta1,
                    h.beta2,
                    h.eps,
                    lr / bc1,
                    bc2_sqrt,
                    p,
                    g,
                    m,
                    v,
                    Rounding::F32,
                ),
                Moments::Q8 { qm, qv, am, av } => adamw_8bit::forward_cpu::<f32>(
                    &adamw_8bit::Dims { N: p.len() },
                    h.beta1,
                    h.beta2,
                    bc2_sqrt * h.eps,
                    -lr * bc2_sqrt / bc1,
                    1.0 - lr * h.weight_decay,
                    p,
                    g,
                    qm,
                    qv,
                    am,
                    av,
                    &self.code_m,
                    &self.code_v,
                    Rounding::F32,
                ),
            }
        }
    }

    /// Bytes of optimizer state.
    pub fn state_bytes(&self) -> usize {
        self.state
            .iter()
            .map(|s| match &s.moments {
                Moments::F32 { m, v } => 4 * (m.len() + v.len()),
                Moments::Q8 { qm, qv, am, av } => qm.len() + qv.len() + 4 * (am.len() + av.len()),
            })
            .sum()
    }
}

/// The global L2 norm of `grads` over `ranges` (torch's `clip_grad_norm_` with norm_type 2:
/// the norm of the per-tensor norms), accumulated in f64.
pub fn grad_norm(grads: &[f32], ranges: &[Range<usize>]) -> f32 {
    let total: f64 = ranges
        .iter()
        .map(|r| {
            let n2: f64 = grads[r.clone()]
                .iter()
                .map(|&g| (g as f64) * (g as f64))
                .sum();
            n2
        })
        .sum();
    total.sqrt() as f32
}

/// torch's `clip_grad_norm_`: scales `grads` by `min(1, max_norm / (norm + 1e-6))` when
/// `max_norm > 0`. Returns the norm before clipping (what transformers logs as grad_norm).
pub fn clip_grad_norm(grads: &mut [f32], ranges: &[Range<usize>], max_norm: f32) -> f32 {
    let norm = grad_norm(grads, ranges);
    if max_norm > 0.0 {
        let coef = max_norm / (norm + 1e-6);
        if coef < 1.0 {
            grads.iter_mut().for_each(|g| *g *= coef);
        }
    }
    norm
}
