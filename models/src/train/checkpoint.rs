//! Training checkpoints: one safetensors file (`checkpoint.safetensors` in the output folder)
//! holding the LoRA weights (`lora`), the optimizer's moments (`opt.<i>.m`/`.v`, or the 8-bit
//! `opt.<i>.qm`/`.qv`/`.am`/`.av`) and, in the metadata key `ftrt_state`, the progress: optimizer
//! step, micro-batches consumed (the data position), the seed and RNG state, and fingerprints of
//! the adapter layout and of the training data so a resume against something else is refused.
//!
//! Written atomically ([`super::atomic`]): a run killed while saving leaves the previous
//! checkpoint intact.

use std::collections::HashMap;
use std::path::Path;

use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use serde::{Deserialize, Serialize};

use super::atomic::{stage, Staged};
use super::optim::{Moments, Optimizer};

/// File name of the checkpoint in the output folder.
pub const CHECKPOINT_FILE: &str = "checkpoint.safetensors";
/// Metadata key of [`Progress`].
const STATE_KEY: &str = "ftrt_state";
/// Version of this layout.
const FORMAT: u32 = 1;

/// Where a run stands, besides its tensors.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    /// Layout version.
    pub format: u32,
    /// Optimizer steps completed.
    pub step: usize,
    /// Micro-batches consumed from the data stream (the data position).
    pub micro_batches: u64,
    /// The run's seed.
    pub seed: u64,
    /// State of the run's generator at the checkpoint.
    pub rng_state: u64,
    /// Fingerprint of the packed training batches.
    pub data_fingerprint: u64,
    /// Fingerprint of the adapter layout (rank, modules, shapes).
    pub layout_fingerprint: u64,
    /// Optimizer name (`adamw_torch` / `adamw_8bit`).
    pub optim: String,
}

/// A checkpoint read back.
#[derive(Debug, Clone, PartialEq)]
pub struct Checkpoint {
    /// Progress.
    pub progress: Progress,
    /// The flat LoRA buffer.
    pub lora: Vec<f32>,
    /// Optimizer tensors by name (`opt.<i>.<field>`), as raw little-endian bytes.
    tensors: HashMap<String, Vec<u8>>,
}

/// FNV-1a over 64 bits, for fingerprints.
#[derive(Debug, Clone, Copy)]
pub struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Self(0xCBF2_9CE4_8422_2325)
    }
}

impl Fnv {
    /// Mixes in bytes.
    pub fn bytes(&mut self, b: &[u8]) -> &mut Self {
        for &x in b {
            self.0 = (self.0 ^ x as u64).wrapping_mul(0x100_0000_01B3);
        }
        self
    }

    /// Mixes in a number.
    pub fn u64(&mut self, x: u64) -> &mut Self {
        self.bytes(&x.to_le_bytes())
    }

    /// The hash.
    pub fn finish(&self) -> u64 {
        self.0
    }
}

/// The bytes of a checkpoint file.
pub fn checkpoint_bytes(
    progress: &Progress,
    lora: &[f32],
    opt: &Optimizer,
) -> Result<Vec<u8>, String> {
    let mut owned: Vec<(String, Dtype, Vec<usize>, &[u8])> = vec![(
        "lora".to_owned(),
        Dtype::F32,
        vec![lora.len()],
        bytemuck::cast_slice(lora),
    )];
    for (i, st) in opt.state.iter().enumerate() {
        match &st.moments {
            Moments::F32 { m, v } => {
                for (f, x) in [("m", m), ("v", v)] {
                    owned.push((
                        format!("opt.{i}.{f}"),
                        Dtype::F32,
                        vec![x.len()],
                        bytemuck::cast_slice(x),
                    ));
                }
            }
            Moments::Q8 { qm, qv, am, av } => {
                for (f, x) in [("qm", qm), ("qv", qv)] {
                    owned.push((format!("opt.{i}.{f}"), Dtype::U8, vec![x.len()], x));
                }
                for (f, x) in [("am", am), ("av", av)] {
                    owned.push((
                        format!("opt.{i}.{f}"),
                        Dtype::F32,
                        vec![x.len()],
                        bytemuck::cast_slice(x),
                    ));
                }
            }
        }
    }
    let views = owned
        .into_iter()
        .map(|(name, dtype, shape, data)| {
            TensorView::new(dtype, shape, data)
                .map(|v| (name.clone(), v))
                .map_err(|e| format!("checkpoint tensor {name}: {e}"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let state = serde_json::to_string(progress).map_err(|e| e.to_string())?;
    let meta = HashMap::from([(STATE_KEY.to_owned(), state)]);
    safetensors::serialize(views, Some(meta)).map_err(|e| format!("checkpoint: {e}"))
}

/// Writes the checkpoint's temporary file (synced) without renaming it over `path` yet.
pub fn stage_checkpoint(
    path: &Path,
    progress: &Progress,
    lora: &[f32],
    opt: &Optimizer,
) -> Result<Staged, String> {
    stage(path, &checkpoint_bytes(progress, lora, opt)?)
}

/// Saves a checkpoint atomically.
pub fn save_checkpoint(
    path: &Path,
    progress: &Progress,
    lora: &[f32],
    opt: &Optimizer,
) -> Result<(), String> {
    stage_checkpoint(path, progress, lora, opt)?.commit()
}

/// Reads a checkpoint file.
pub fn load_checkpoint(path: &Path) -> Result<Checkpoint, String> {
    let bytes = std::fs::read(path)
        .map_err(|e| format!("{}: cannot read the checkpoint: {e}", path.display()))?;
    let bad = |why: String| format!("{}: not a valid checkpoint: {why}", path.display());
    let (_, meta) = SafeTensors::read_metadata(&bytes).map_err(|e| bad(e.to_string()))?;
    let state = meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get(STATE_KEY))
        .ok_or_else(|| bad(format!("no {STATE_KEY} metadata")))?;
    let progress: Progress = serde_json::from_str(state).map_err(|e| bad(e.to_string()))?;
    if progress.format != FORMAT {
        return Err(bad(format!(
            "layout version {} (this build reads {FORMAT})",
            progress.format
        )));
    }
    let st = SafeTensors::deserialize(&bytes).map_err(|e| bad(e.to_string()))?;
    let mut tensors = HashMap::new();
    for (name, view) in st.tensors() {
        tensors.insert(name, view.data().to_vec());
    }
    let lora = f32s(
        &tensors
            .remove("lora")
            .ok_or_else(|| bad("no lora tensor".to_owned()))?,
    );
    Ok(Checkpoint {
        progress,
        lora,
        tensors,
    })
}

/// Little-endian f32 values of raw bytes.
fn f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

impl Checkpoint {
    /// Copies the saved moments into `opt` (built for the same layout and optimizer) and sets
    /// its step count.
    pub fn restore_optimizer(&self, opt: &mut Optimizer) -> Result<(), String> {
        let get = |name: String, len: usize| -> Result<&Vec<u8>, String> {
            let b = self.tensors.get(&name).ok_or_else(|| {
                format!(
                    "the checkpoint has no {name}: it was written by another optimizer or layout"
                )
            })?;
            if b.len() != len {
                return Err(format!(
                    "checkpoint tensor {name} has {} bytes, expected {len}",
                    b.len()
                ));
            }
            Ok(b)
        };
        for (i, st) in opt.state.iter_mut().enumerate() {
            match &mut st.moments {
                Moments::F32 { m, v } => {
                    *m = f32s(get(format!("opt.{i}.m"), 4 * m.len())?);
                    *v = f32s(get(format!("opt.{i}.v"), 4 * v.len())?);
                }
                Moments::Q8 { qm, qv, am, av } => {
                    *qm = get(format!("opt.{i}.qm"), qm.len())?.clone();
                    *qv = get(format!("opt.{i}.qv"), qv.len())?.clone();
                    *am = f32s(get(format!("opt.{i}.am"), 4 * am.len())?);
                    *av = f32s(get(format!("opt.{i}.av"), 4 * av.len())?);
                }
            }
        }
        opt.steps = self.progress.step as u64;
        Ok(())
    }
}
