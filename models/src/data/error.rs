//! Errors of dataset loading: each names the file, and the line where one is to blame.

use std::path::PathBuf;

use crate::chat_template::ChatTemplateError;

/// Why a dataset could not be loaded. Loading never panics on bad input.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// The file could not be read.
    #[error("{}: cannot read the dataset: {reason}", path.display())]
    Io {
        /// The dataset file.
        path: PathBuf,
        /// The operating system's reason.
        reason: String,
    },
    /// A row is not valid JSON, not an object, or lacks a field its format needs.
    #[error("{}:{line}: {reason}", path.display())]
    Malformed {
        /// The dataset file.
        path: PathBuf,
        /// 1-based line of the row (of its opening brace in a JSON array).
        line: usize,
        /// What is wrong with it.
        reason: String,
    },
    /// The file holds no rows.
    #[error("{}: the dataset is empty", path.display())]
    Empty {
        /// The dataset file.
        path: PathBuf,
    },
    /// The first row's keys match no supported format.
    #[error(
        "{}:{line}: unknown dataset format: the row has keys [{}]; supported: {}",
        path.display(), seen.join(", "), crate::data::DatasetFormat::SUPPORTED
    )]
    UnknownFormat {
        /// The dataset file.
        path: PathBuf,
        /// Line of the row whose keys were examined.
        line: usize,
        /// The keys it has.
        seen: Vec<String>,
    },
    /// A row could not be rendered or tokenized.
    #[error("{}:{line}: {reason}", path.display())]
    Render {
        /// The dataset file.
        path: PathBuf,
        /// Line of the row.
        line: usize,
        /// The template's or tokenizer's reason.
        reason: String,
    },
    /// The tokenizer or its config could not be loaded.
    #[error("{}: {reason}", path.display())]
    Tokenizer {
        /// The tokenizer file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// The chat template could not be loaded.
    #[error(transparent)]
    Template(#[from] ChatTemplateError),
    /// An unknown `--dataset-format` name.
    #[error(
        "unknown dataset format {name:?}; supported: {}",
        crate::data::DatasetFormat::SUPPORTED
    )]
    FormatName {
        /// The name given.
        name: String,
    },
}
