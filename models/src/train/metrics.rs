//! Metrics as JSON Lines (`metrics.jsonl` in the output folder): one object per logged training
//! step `{"step", "epoch", "loss", "lr", "grad_norm", "tokens_per_s", "elapsed_s"}` and one per
//! evaluation `{"step", "eval_loss", "eval_tokens"}`.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

/// One logged training step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepLog {
    /// Optimizer step (1-based).
    pub step: usize,
    /// Fraction of epochs done.
    pub epoch: f64,
    /// Mean token loss of the step.
    pub loss: f32,
    /// Learning rate the step used.
    pub lr: f64,
    /// Gradient norm before clipping.
    pub grad_norm: f32,
    /// Training tokens per second over the step.
    pub tokens_per_s: f64,
    /// Seconds since the run (or the resumed run) started.
    pub elapsed_s: f64,
}

impl StepLog {
    /// The JSON object of this line.
    pub fn to_json(&self) -> Value {
        json!({
            "step": self.step,
            "epoch": self.epoch,
            "loss": self.loss,
            "lr": self.lr,
            "grad_norm": self.grad_norm,
            "tokens_per_s": self.tokens_per_s,
            "elapsed_s": self.elapsed_s,
        })
    }
}

/// An append-only JSONL file.
#[derive(Debug)]
pub struct MetricsFile {
    path: PathBuf,
    file: File,
}

impl MetricsFile {
    /// Opens `path` for a run that starts after `resume_step` optimizer steps: the lines of
    /// later steps (written after that checkpoint by a run that then died) are dropped, the
    /// rest kept; a fresh run (`resume_step = 0`) starts an empty file.
    pub fn open(path: &Path, resume_step: usize) -> Result<Self, String> {
        let kept: Vec<String> = if resume_step > 0 && path.exists() {
            read_lines(path)?
                .into_iter()
                .filter(|(v, _)| {
                    v.get("step").and_then(Value::as_u64).unwrap_or(0) as usize <= resume_step
                })
                .map(|(_, line)| line)
                .collect()
        } else {
            Vec::new()
        };
        let mut text = kept.join("\n");
        if !text.is_empty() {
            text.push('\n');
        }
        super::atomic::write_atomic(path, text.as_bytes())?;
        let file = OpenOptions::new()
            .append(true)
            .open(path)
            .map_err(|e| format!("{}: cannot open: {e}", path.display()))?;
        Ok(Self {
            path: path.to_owned(),
            file,
        })
    }

    /// Appends one object as a line.
    pub fn write(&mut self, value: &Value) -> Result<(), String> {
        writeln!(self.file, "{value}")
            .map_err(|e| format!("{}: cannot write: {e}", self.path.display()))
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Every line of a metrics file, parsed, with its text.
pub fn read_lines(path: &Path) -> Result<Vec<(Value, String)>, String> {
    let f = File::open(path).map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
    let mut out = Vec::new();
    for line in BufReader::new(f).lines() {
        let line = line.map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
        if let Ok(v) = serde_json::from_str::<Value>(&line) {
            out.push((v, line));
        }
    }
    Ok(out)
}

/// The (step, value) points of `key` in a metrics file (`"loss"` or `"eval_loss"`).
pub fn series(path: &Path, key: &str) -> Result<Vec<(usize, f64)>, String> {
    Ok(read_lines(path)?
        .into_iter()
        .filter_map(|(v, _)| Some((v.get("step")?.as_u64()? as usize, v.get(key)?.as_f64()?)))
        .collect())
}
