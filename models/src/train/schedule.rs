//! Learning-rate schedules of `transformers.optimization`, as multipliers of the base rate.
//!
//! - linear (`get_linear_schedule_with_warmup`): `t / max(1, w)` for `t < w`, then
//!   `max(0, (T - t) / max(1, T - w))`;
//! - cosine (`get_cosine_schedule_with_warmup`, num_cycles = 0.5): warmup as above, then
//!   `max(0, 0.5 (1 + cos(pi * 2 * 0.5 * p)))` with `p = (t - w) / max(1, T - w)`;
//! - constant (`get_constant_schedule`): 1; constant_with_warmup: warmup, then 1.
//!
//! `t` is the number of optimizer steps already taken: the Trainer calls `scheduler.step()`
//! after `optimizer.step()`, so step 1 updates with `lr * f(0)` (zero under warmup).

use std::str::FromStr;

/// Which schedule (`--lr-scheduler-type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SchedulerKind {
    /// Linear warmup, then linear decay to zero at the last step.
    Linear,
    /// Linear warmup, then half a cosine down to zero.
    Cosine,
    /// No schedule.
    Constant,
    /// Linear warmup, then constant.
    ConstantWithWarmup,
}

impl FromStr for SchedulerKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "linear" => Ok(Self::Linear),
            "cosine" => Ok(Self::Cosine),
            "constant" => Ok(Self::Constant),
            "constant_with_warmup" => Ok(Self::ConstantWithWarmup),
            other => Err(format!(
                "unknown lr scheduler type {other:?}; supported: linear, cosine, constant, \
                 constant_with_warmup"
            )),
        }
    }
}

/// A schedule over a run of `total_steps` optimizer steps.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LrSchedule {
    /// The shape.
    pub kind: SchedulerKind,
    /// The peak learning rate.
    pub base_lr: f64,
    /// Warmup steps.
    pub warmup_steps: usize,
    /// Optimizer steps in the whole run.
    pub total_steps: usize,
}

impl LrSchedule {
    /// The multiplier after `t` completed steps (transformers' `lr_lambda(t)`).
    pub fn factor(&self, t: usize) -> f64 {
        let (t, w, total) = (t as f64, self.warmup_steps as f64, self.total_steps as f64);
        let warm = |t: f64| t / w.max(1.0);
        match self.kind {
            SchedulerKind::Constant => 1.0,
            SchedulerKind::ConstantWithWarmup if t < w => warm(t),
            SchedulerKind::ConstantWithWarmup => 1.0,
            _ if t < w => warm(t),
            SchedulerKind::Linear => ((total - t) / (total - w).max(1.0)).max(0.0),
            SchedulerKind::Cosine => {
                let progress = (t - w) / (total - w).max(1.0);
                let num_cycles = 0.5;
                (0.5 * (1.0 + (std::f64::consts::PI * num_cycles * 2.0 * progress).cos())).max(0.0)
            }
        }
    }

    /// The learning rate of optimizer step `step` (1-based): `base_lr * factor(step - 1)`.
    pub fn lr_for_step(&self, step: usize) -> f64 {
        self.base_lr * self.factor(step.saturating_sub(1))
    }
}

/// Warmup steps of a ratio, as transformers' `get_warmup_steps`: `ceil(total * ratio)`.
pub fn warmup_from_ratio(total_steps: usize, ratio: f64) -> usize {
    (total_steps as f64 * ratio).ceil() as usize
}
