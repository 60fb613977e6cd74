//! The training loop: micro-batches drawn from a seeded epoch-shuffled stream, gradients summed
//! over `gradient_accumulation_steps` micro-batches and divided by their total number of loss
//! tokens, the global gradient norm clipped, one optimizer step at the scheduled learning rate;
//! metrics, evaluation and atomic checkpoints on their step intervals; at the end the adapter in
//! PEFT's format and the loss curve.
//!
//! Repeatability: everything random derives from the seed and the stream position, and every
//! sum runs in a fixed order, so the same inputs give the same losses bit for bit, including
//! across a checkpoint and `resume`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde_json::json;

use super::checkpoint::{
    load_checkpoint, save_checkpoint, stage_checkpoint, Fnv, Progress as CkptProgress,
    CHECKPOINT_FILE,
};
use super::config::TrainConfig;
use super::metrics::{series, MetricsFile, StepLog};
use super::model::LoraModel;
use super::optim::{clip_grad_norm, Optimizer};
use super::progress::Progress;
use super::rng::SplitMix64;
use super::schedule::LrSchedule;
use super::stream::BatchStream;
use super::svg::loss_curve_svg;
use crate::data::PackedBatch;
use crate::lora::LoraWeights;

/// File names in the output folder.
pub const METRICS_FILE: &str = "metrics.jsonl";
/// The loss curve picture.
pub const LOSS_CURVE_FILE: &str = "loss_curve.svg";

/// Stream tag of the dropout seeds.
const DROPOUT_STREAM: u64 = 0xD80F;

/// What a finished run reports.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainSummary {
    /// Optimizer steps completed (in total, including before a resume).
    pub steps: usize,
    /// (step, mean token loss) of every step this process ran.
    pub losses: Vec<(usize, f32)>,
    /// (step, held-out loss) of every evaluation this process ran.
    pub eval_losses: Vec<(usize, f32)>,
    /// Where the adapter was saved.
    pub adapter_dir: PathBuf,
}

/// A training run in progress.
pub struct Trainer<'a> {
    model: &'a mut dyn LoraModel,
    /// The adapter being trained.
    pub lora: LoraWeights,
    grads: LoraWeights,
    opt: Optimizer,
    schedule: LrSchedule,
    cfg: TrainConfig,
    train: &'a [PackedBatch],
    eval: &'a [PackedBatch],
    stream: BatchStream,
    step: usize,
    micro: u64,
    rng: SplitMix64,
    data_fingerprint: u64,
    metrics: MetricsFile,
    progress: Progress,
    losses: Vec<(usize, f32)>,
    eval_losses: Vec<(usize, f32)>,
    started: Instant,
}

/// Fingerprint of the packed batches (tokens, labels, boundaries).
pub fn data_fingerprint(batches: &[PackedBatch]) -> u64 {
    let mut h = Fnv::default();
    h.u64(batches.len() as u64);
    for b in batches {
        h.bytes(bytemuck::cast_slice(&b.input_ids));
        h.bytes(bytemuck::cast_slice(&b.labels));
        h.bytes(bytemuck::cast_slice(&b.cu_seqlens));
    }
    h.finish()
}

/// Fingerprint of an adapter's layout (rank and every module's path and shape).
pub fn layout_fingerprint(lora: &LoraWeights) -> u64 {
    let mut h = Fnv::default();
    h.u64(lora.config.r as u64);
    for t in &lora.tensors {
        h.bytes(t.target.path.as_bytes());
        h.u64(t.target.in_features as u64)
            .u64(t.target.out_features as u64);
    }
    h.finish()
}

/// The checkpoint a `resume` path names: a checkpoint file, or an output folder holding one.
pub fn checkpoint_path(resume: &Path) -> PathBuf {
    if resume.is_dir() {
        resume.join(CHECKPOINT_FILE)
    } else {
        resume.to_owned()
    }
}

impl<'a> Trainer<'a> {
    /// Sets up a run of `cfg.max_steps` steps training `lora` on `train`, evaluating on `eval`
    /// (may be empty). With `resume`, continues from that checkpoint (a file, or an output
    /// folder holding `checkpoint.safetensors`).
    pub fn new(
        model: &'a mut dyn LoraModel,
        lora: LoraWeights,
        train: &'a [PackedBatch],
        eval: &'a [PackedBatch],
        cfg: &TrainConfig,
        resume: Option<&Path>,
    ) -> Result<Self, String> {
        cfg.validate()?;
        if train.is_empty() {
            return Err("no training batch: the training set is empty".to_owned());
        }
        if lora.is_empty() {
            return Err("the adapter has no trainable weight".to_owned());
        }
        let available = model.lora_shapes();
        if let Some(t) = lora.tensors.iter().find(|t| !available.contains(&t.target)) {
            return Err(format!(
                "the adapter's module {} ({} -> {}) is not a linear module of this model",
                t.target.path, t.target.in_features, t.target.out_features
            ));
        }
        std::fs::create_dir_all(&cfg.output_dir).map_err(|e| {
            format!(
                "{}: cannot create the output folder: {e}",
                cfg.output_dir.display()
            )
        })?;
        let ranges = lora.param_ranges();
        let mut opt = Optimizer::new(cfg.optim, cfg.adam, &ranges);
        let data_fp = data_fingerprint(train);
        let mut lora = lora;
        let (mut step, mut micro, mut rng) = (0, 0, SplitMix64::derived(cfg.seed, DROPOUT_STREAM));
        if let Some(path) = resume {
            let path = checkpoint_path(path);
            if !path.is_file() {
                return Err(format!("{}: no checkpoint to resume from", path.display()));
            }
            let ck = load_checkpoint(&path)?;
            let p = &ck.progress;
            if p.layout_fingerprint != layout_fingerprint(&lora) || ck.lora.len() != lora.len() {
                return Err(format!(
                    "{}: the checkpoint's adapter (rank, modules or shapes) differs from this run's",
                    path.display()
                ));
            }
            if p.data_fingerprint != data_fp {
                return Err(format!(
                    "{}: the training data (or its packing: dataset, max_seq_length, batch size) \
                     differs from the checkpointed run's",
                    path.display()
                ));
            }
            if p.optim != cfg.optim.name() {
                return Err(format!(
                    "{}: the checkpoint was written with --optim {}, this run uses {}",
                    path.display(),
                    p.optim,
                    cfg.optim.name()
                ));
            }
            if p.step > cfg.max_steps {
                return Err(format!(
                    "{}: the checkpoint is at step {}, past this run's {} steps",
                    path.display(),
                    p.step,
                    cfg.max_steps
                ));
            }
            ck.restore_optimizer(&mut opt)?;
            lora.data.copy_from_slice(&ck.lora);
            step = p.step;
            micro = p.micro_batches;
            rng = SplitMix64::new(p.rng_state);
        }
        let metrics = MetricsFile::open(&cfg.output_dir.join(METRICS_FILE), step)?;
        let grads = lora.zeros_like();
        Ok(Self {
            model,
            grads,
            opt,
            schedule: LrSchedule {
                kind: cfg.lr_scheduler_type,
                base_lr: cfg.learning_rate,
                warmup_steps: cfg.warmup_steps,
                total_steps: cfg.max_steps,
            },
            train,
            eval,
            stream: BatchStream::new(train.len(), cfg.seed),
            step,
            micro,
            rng,
            data_fingerprint: data_fp,
            metrics,
            progress: Progress::new(cfg.max_steps, step, cfg.progress_bar),
            losses: Vec::new(),
            eval_losses: Vec::new(),
            started: Instant::now(),
            cfg: cfg.clone(),
            lora,
        })
    }

    /// Optimizer steps completed.
    pub fn step_count(&self) -> usize {
        self.step
    }

    /// The optimizer (its state, for tests and reports).
    pub fn optimizer(&self) -> &Optimizer {
        &self.opt
    }

    /// One optimizer step: `gradient_accumulation_steps` micro-batches forward and backward,
    /// then clipping and the update. Returns what it logs.
    pub fn train_step(&mut self) -> Result<StepLog, String> {
        let t0 = Instant::now();
        self.grads.data.iter_mut().for_each(|g| *g = 0.0);
        let (mut loss_sum, mut loss_tokens, mut tokens) = (0.0f64, 0usize, 0usize);
        let dropout = self.lora.config.lora_dropout as f32;
        for _ in 0..self.cfg.gradient_accumulation_steps {
            let batch = &self.train[self.stream.at(self.micro)];
            self.micro += 1;
            self.model.set_dropout(dropout, self.rng.next_u64())?;
            let l = self
                .model
                .loss_and_grads(batch, &self.lora, &mut self.grads)?;
            loss_sum += l as f64;
            loss_tokens += batch.num_loss_tokens;
            tokens += batch.input_ids.len();
        }
        let step = self.step + 1;
        let denom = loss_tokens.max(1) as f32;
        self.grads.data.iter_mut().for_each(|g| *g /= denom);
        let loss = (loss_sum / loss_tokens.max(1) as f64) as f32;
        if !loss.is_finite() {
            return Err(format!(
                "the training loss is {loss} at step {step}; stopping (try a lower learning rate)"
            ));
        }
        let grad_norm = clip_grad_norm(
            &mut self.grads.data,
            &self.lora.param_ranges(),
            self.cfg.max_grad_norm,
        );
        let lr = self.schedule.lr_for_step(step);
        self.opt
            .step(&mut self.lora.data, &self.grads.data, lr as f32);
        self.step = step;
        let secs = t0.elapsed().as_secs_f64().max(1e-9);
        let log = StepLog {
            step,
            epoch: self.stream.epoch_at(self.micro),
            loss,
            lr,
            grad_norm,
            tokens_per_s: tokens as f64 / secs,
            elapsed_s: self.started.elapsed().as_secs_f64(),
        };
        self.losses.push((step, loss));
        Ok(log)
    }

    /// Mean token loss over the held-out batches (None when there are none).
    pub fn evaluate(&mut self) -> Result<Option<f32>, String> {
        if self.eval.is_empty() {
            return Ok(None);
        }
        self.model.set_dropout(0.0, 0)?;
        let (mut sum, mut n) = (0.0f64, 0usize);
        for b in self.eval {
            sum += self.model.loss(b, &self.lora)? as f64;
            n += b.num_loss_tokens;
        }
        Ok(Some((sum / n.max(1) as f64) as f32))
    }

    fn checkpoint_progress(&self) -> CkptProgress {
        CkptProgress {
            format: 1,
            step: self.step,
            micro_batches: self.micro,
            seed: self.cfg.seed,
            rng_state: self.rng.state(),
            data_fingerprint: self.data_fingerprint,
            layout_fingerprint: layout_fingerprint(&self.lora),
            optim: self.cfg.optim.name().to_owned(),
        }
    }

    /// Path of this run's checkpoint.
    pub fn checkpoint_file(&self) -> PathBuf {
        self.cfg.output_dir.join(CHECKPOINT_FILE)
    }

    /// Writes the checkpoint atomically.
    pub fn save_checkpoint(&self) -> Result<(), String> {
        save_checkpoint(
            &self.checkpoint_file(),
            &self.checkpoint_progress(),
            &self.lora.data,
            &self.opt,
        )
    }

    /// Writes the checkpoint's temporary file but does not rename it into place: what a run
    /// killed in the middle of saving leaves behind (for tests of crash safety).
    pub fn save_checkpoint_interrupted(&self) -> Result<(), String> {
        let staged = stage_checkpoint(
            &self.checkpoint_file(),
            &self.checkpoint_progress(),
            &self.lora.data,
            &self.opt,
        )?;
        drop(staged);
        Ok(())
    }

    /// Runs steps (logging, evaluating and checkpointing on their intervals) until `until`
    /// steps are done or the run's last step.
    pub fn run_until(&mut self, until: usize) -> Result<(), String> {
        let quiet = !self.cfg.progress_bar;
        while self.step < until.min(self.cfg.max_steps) {
            let log = self.train_step()?;
            let s = log.step;
            let last = s == self.cfg.max_steps;
            self.progress.update(&log);
            if self.cfg.logging_steps == 0 || s % self.cfg.logging_steps == 0 || last || s == 1 {
                self.metrics.write(&log.to_json())?;
                self.progress.println(
                    &format!(
                        "step {s}/{}: loss {:.4}  lr {:.3e}  grad_norm {:.3}  {:.0} tok/s",
                        self.cfg.max_steps, log.loss, log.lr, log.grad_norm, log.tokens_per_s
                    ),
                    quiet,
                );
            }
            if (self.cfg.eval_steps > 0 && s % self.cfg.eval_steps == 0) || last {
                if let Some(e) = self.evaluate()? {
                    let tokens: usize = self.eval.iter().map(|b| b.num_loss_tokens).sum();
                    self.metrics
                        .write(&json!({"step": s, "eval_loss": e, "eval_tokens": tokens}))?;
                    self.eval_losses.push((s, e));
                    self.progress
                        .println(&format!("step {s}: eval_loss {e:.4}"), quiet);
                }
            }
            if (self.cfg.save_steps > 0 && s % self.cfg.save_steps == 0) || last {
                self.save_checkpoint()?;
            }
        }
        Ok(())
    }

    /// Runs to the last step, then saves the adapter (PEFT format) in the output folder and
    /// draws the loss curve of the whole run (earlier segments included after a resume).
    pub fn run(mut self) -> Result<TrainSummary, String> {
        self.run_until(self.cfg.max_steps)?;
        self.progress.finish();
        let dir = self.cfg.output_dir.clone();
        self.lora
            .save_peft(&dir, self.cfg.base_model_name_or_path.as_deref())?;
        let metrics = self.metrics.path().to_owned();
        let svg = loss_curve_svg(
            "ftrt train: loss",
            &series(&metrics, "loss")?,
            &series(&metrics, "eval_loss")?,
        );
        super::atomic::write_atomic(&dir.join(LOSS_CURVE_FILE), svg.as_bytes())?;
        Ok(TrainSummary {
            steps: self.step,
            losses: self.losses,
            eval_losses: self.eval_losses,
            adapter_dir: dir,
        })
    }
}
