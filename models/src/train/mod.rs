//! Supervised LoRA fine-tuning, independent of how the model computes: a [`LoraModel`] gives
//! losses and LoRA gradients of packed batches; this module owns the rest of a run.
//!
//! - [`model`]: the [`LoraModel`] trait a backend implements;
//! - [`optim`]: AdamW (f32 moments) and 8-bit AdamW over the flat LoRA buffer, gradient-norm
//!   clipping;
//! - [`schedule`]: transformers' linear / cosine / constant schedules with warmup;
//! - [`trainer`]: the loop (gradient accumulation, evaluation, checkpoints, resume);
//! - [`checkpoint`] and [`atomic`]: crash-safe checkpoints;
//! - [`metrics`], [`svg`], [`progress`]: JSONL metrics, the loss-curve picture, the console;
//! - [`plan`]: the CPU backend's memory estimate, checked before loading weights;
//! - [`rng`], [`stream`]: the seeded generator and the epoch-shuffled batch order.

pub mod atomic;
pub mod checkpoint;
pub mod config;
pub mod metrics;
pub mod model;
pub mod optim;
pub mod plan;
pub mod progress;
pub mod rng;
pub mod schedule;
pub mod stream;
pub mod svg;
pub mod trainer;

pub use config::{total_steps, TrainConfig};
pub use model::LoraModel;
pub use optim::{AdamHyper, OptimKind, Optimizer};
pub use plan::MemoryPlan;
pub use schedule::{warmup_from_ratio, LrSchedule, SchedulerKind};
pub use trainer::{TrainSummary, Trainer};
