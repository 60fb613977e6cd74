//! The one error type of this crate: every failure names the file it concerns and the reason.
//!
//! Loading never panics on bad input; it returns an [`Error`] whose `Display` reads
//! `"<path>: <reason>"`, so a command line tool can print it as is and exit non-zero.

use std::path::{Path, PathBuf};

/// What went wrong, coarsely, for callers and tests that branch on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The file could not be opened, read, mapped or written.
    Io,
    /// The file ends before the data that its header promises.
    Truncated,
    /// The contents contradict the format: bad magic, bad JSON, offsets that do not add up.
    Malformed,
    /// A required field, file or tensor is absent.
    Missing,
    /// Well-formed input that uses something this crate does not support.
    Unsupported,
    /// The `tokenizers` crate rejected a tokenizer.
    Tokenizer,
    /// Downloading or verifying a test asset failed.
    Fetch,
}

/// A loading failure: the path it concerns, its kind and a human-readable reason.
#[derive(Debug, thiserror::Error)]
#[error("{}: {reason}", path.display())]
pub struct Error {
    /// The file or folder being read when the failure happened.
    pub path: PathBuf,
    /// The class of failure.
    pub kind: ErrorKind,
    /// What exactly is wrong, naming the field, tensor or offset concerned.
    pub reason: String,
}

impl Error {
    /// An error of `kind` about `path`.
    pub fn new(path: &Path, kind: ErrorKind, reason: impl Into<String>) -> Self {
        Self {
            path: path.to_path_buf(),
            kind,
            reason: reason.into(),
        }
    }

    /// An I/O failure while doing `what` (e.g. "cannot open") on `path`; a file that does not
    /// exist is [`ErrorKind::Missing`].
    pub fn io(path: &Path, what: &str, err: &std::io::Error) -> Self {
        let kind = if err.kind() == std::io::ErrorKind::NotFound {
            ErrorKind::Missing
        } else {
            ErrorKind::Io
        };
        Self::new(path, kind, format!("{what}: {err}"))
    }
}

/// Result with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
