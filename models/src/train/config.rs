//! The training loop's settings (a resolved subset of TRL's SFTConfig / transformers'
//! TrainingArguments), and how many optimizer steps a run takes.

use std::path::PathBuf;

use super::optim::{AdamHyper, OptimKind};
use super::schedule::SchedulerKind;

/// Settings of one training run, all resolved (no "auto" left).
#[derive(Debug, Clone, PartialEq)]
pub struct TrainConfig {
    /// Peak learning rate.
    pub learning_rate: f64,
    /// Schedule shape.
    pub lr_scheduler_type: SchedulerKind,
    /// Warmup optimizer steps.
    pub warmup_steps: usize,
    /// Optimizer.
    pub optim: OptimKind,
    /// AdamW's weight decay, betas and epsilon.
    pub adam: AdamHyper,
    /// Micro-batches per optimizer step.
    pub gradient_accumulation_steps: usize,
    /// Optimizer steps of the whole run (see [`total_steps`]).
    pub max_steps: usize,
    /// Global gradient-norm clipping threshold; 0 = off.
    pub max_grad_norm: f32,
    /// Seed of the LoRA init, the data order and dropout.
    pub seed: u64,
    /// Log (JSONL + console) every this many steps; 0 = every step.
    pub logging_steps: usize,
    /// Held-out loss every this many steps (and at the end); 0 = only at the end.
    pub eval_steps: usize,
    /// Checkpoint every this many steps (and at the end); 0 = only at the end.
    pub save_steps: usize,
    /// Where metrics, checkpoints, the loss curve and the adapter go.
    pub output_dir: PathBuf,
    /// Show a progress bar (hidden anyway when stderr is not a terminal).
    pub progress_bar: bool,
    /// Written into adapter_config.json's `base_model_name_or_path`.
    pub base_model_name_or_path: Option<String>,
}

impl Default for TrainConfig {
    /// transformers' defaults where they exist; 2e-4 as the LoRA learning rate (QLoRA's and
    /// Unsloth's usual value; TRL's full fine-tuning default 2e-5 is too small for adapters).
    fn default() -> Self {
        Self {
            learning_rate: 2e-4,
            lr_scheduler_type: SchedulerKind::Linear,
            warmup_steps: 0,
            optim: OptimKind::AdamW,
            adam: AdamHyper::default(),
            gradient_accumulation_steps: 1,
            max_steps: 1,
            max_grad_norm: 1.0,
            seed: 42,
            logging_steps: 1,
            eval_steps: 0,
            save_steps: 0,
            output_dir: PathBuf::from("ftrt-output"),
            progress_bar: true,
            base_model_name_or_path: None,
        }
    }
}

impl TrainConfig {
    /// Checks values that would make the run meaningless.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.learning_rate.is_finite() && self.learning_rate >= 0.0) {
            return Err(format!(
                "learning_rate {} must be a non-negative number",
                self.learning_rate
            ));
        }
        if self.gradient_accumulation_steps == 0 {
            return Err("gradient_accumulation_steps must be at least 1".to_owned());
        }
        if self.max_steps == 0 {
            return Err("the run has no optimizer step (max_steps = 0)".to_owned());
        }
        if !(self.max_grad_norm.is_finite() && self.max_grad_norm >= 0.0) {
            return Err(format!("max_grad_norm {} must be >= 0", self.max_grad_norm));
        }
        let a = self.adam;
        if !(0.0..1.0).contains(&a.beta1) || !(0.0..1.0).contains(&a.beta2) {
            return Err(format!(
                "adam betas ({}, {}) must be in [0, 1)",
                a.beta1, a.beta2
            ));
        }
        if !(a.weight_decay.is_finite() && a.weight_decay >= 0.0) {
            return Err(format!("weight_decay {} must be >= 0", a.weight_decay));
        }
        Ok(())
    }
}

/// Optimizer steps of a run over `micro_batches` micro-batches per epoch: `max_steps` when
/// positive, else `ceil(num_train_epochs * max(1, micro_batches / gradient_accumulation_steps))`
/// (transformers' `num_update_steps_per_epoch` rounds down).
pub fn total_steps(
    micro_batches: usize,
    gradient_accumulation_steps: usize,
    max_steps: usize,
    num_train_epochs: f64,
) -> usize {
    if max_steps > 0 {
        return max_steps;
    }
    let per_epoch = (micro_batches / gradient_accumulation_steps.max(1)).max(1);
    (num_train_epochs * per_epoch as f64).ceil().max(0.0) as usize
}
