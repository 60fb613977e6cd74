//! Supervised fine-tuning data: JSON/JSONL datasets in alpaca, messages, prompt/completion and
//! plain text forms, tokenized with loss only on completion tokens, shuffled from a seed, split
//! for evaluation, and packed padding-free into fixed token budgets.
//!
//! Label convention: `labels` is aligned with `input_ids` (Hugging Face's convention: the loss
//! shifts by one), and `-100` marks a position that carries no loss.

pub mod accuracy;
mod dataset;
mod error;
mod format;
mod pack;
mod reader;
mod record;
mod renderer;
mod spans;

pub use dataset::{load_dataset, read_records, DataOptions, Dataset, DatasetStats, Holdout};
pub use error::DataError;
pub use format::DatasetFormat;
pub use pack::{pack, pack_with_report, PackedBatch, Packing};
pub use record::Record;
pub use renderer::PromptRenderer;

/// Label of a position that carries no loss (PyTorch's cross-entropy `ignore_index`).
pub const IGNORE_INDEX: i32 = -100;

/// One tokenized training sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    /// Token ids of the whole sequence.
    pub input_ids: Vec<u32>,
    /// Per position: the token id where the loss applies, [`IGNORE_INDEX`] elsewhere.
    pub labels: Vec<i32>,
}

impl Example {
    /// Number of positions whose label is not [`IGNORE_INDEX`].
    pub fn num_loss_tokens(&self) -> usize {
        self.labels.iter().filter(|&&l| l != IGNORE_INDEX).count()
    }
}
