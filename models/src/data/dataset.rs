//! Loading a dataset file into tokenized examples; shuffling and held-out splits.

use std::path::Path;

use super::reader::read_rows;
use crate::train::rng::SplitMix64;

/// A permutation of `0..len` that depends only on `seed`.
fn permutation(len: usize, seed: u64) -> Vec<usize> {
    SplitMix64::new(seed).permutation(len)
}
use super::{DataError, DatasetFormat, Example, PromptRenderer, Record};

/// Seed of the permutation that picks held-out rows, so a split never depends on file order.
const SPLIT_SEED: u64 = 0x5EED_5EED;

/// Options for [`load_dataset`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataOptions {
    /// Sequences longer than this are cut to it (keeping the start) and counted.
    pub max_seq_length: usize,
    /// Render instruction data through the chat template when the model has one.
    pub use_chat_template: bool,
}

impl Default for DataOptions {
    /// 2048 tokens, chat template on (TRL's SFTConfig defaults 1024; SmolLM2 handles 8192).
    fn default() -> Self {
        Self {
            max_seq_length: 2048,
            use_chat_template: true,
        }
    }
}

/// What loading found, to report to the user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DatasetStats {
    /// The form the rows were read as.
    pub format: DatasetFormat,
    /// Rows in the file.
    pub rows: usize,
    /// Examples cut to `max_seq_length`.
    pub truncated: usize,
    /// Rows dropped because no token carried a loss (e.g. a conversation without an
    /// assistant turn, or a completion lost to truncation).
    pub without_loss: usize,
}

/// Tokenized examples with the records they came from, in the same order.
#[derive(Debug, Clone)]
pub struct Dataset {
    records: Vec<Record>,
    examples: Vec<Example>,
    stats: DatasetStats,
}

/// How much of a dataset to hold out for evaluation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Holdout {
    /// This fraction of the examples, rounded to the nearest count.
    Fraction(f64),
    /// Exactly this many examples.
    Count(usize),
}

/// Reads the rows of `path` as `format` (detected from the first row's keys when `None`).
pub fn read_records(
    path: &Path,
    format: Option<DatasetFormat>,
) -> Result<(DatasetFormat, Vec<(usize, Record)>), DataError> {
    let rows = read_rows(path)?;
    let format = match format {
        Some(format) => format,
        None => {
            let first = &rows[0];
            DatasetFormat::detect(first.fields.keys().map(String::as_str)).ok_or_else(|| {
                DataError::UnknownFormat {
                    path: path.to_owned(),
                    line: first.line,
                    seen: first.fields.keys().cloned().collect(),
                }
            })?
        }
    };
    let records = rows
        .iter()
        .map(|row| {
            Record::parse(&row.fields, format)
                .map(|record| (row.line, record))
                .map_err(|reason| DataError::Malformed {
                    path: path.to_owned(),
                    line: row.line,
                    reason,
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok((format, records))
}

/// Loads and tokenizes the dataset at `path`.
pub fn load_dataset(
    path: &Path,
    format: Option<DatasetFormat>,
    tok: &PromptRenderer,
    opts: &DataOptions,
) -> Result<Dataset, DataError> {
    let (format, rows) = read_records(path, format)?;
    let mut stats = DatasetStats {
        format,
        rows: rows.len(),
        truncated: 0,
        without_loss: 0,
    };
    let mut records = Vec::with_capacity(rows.len());
    let mut examples = Vec::with_capacity(rows.len());
    for (line, record) in rows {
        let mut example = tok
            .tokenize(&record, opts.use_chat_template)
            .map_err(|reason| DataError::Render {
                path: path.to_owned(),
                line,
                reason,
            })?;
        if example.input_ids.len() > opts.max_seq_length {
            example.input_ids.truncate(opts.max_seq_length);
            example.labels.truncate(opts.max_seq_length);
            stats.truncated += 1;
        }
        if example.num_loss_tokens() == 0 {
            stats.without_loss += 1;
            continue;
        }
        records.push(record);
        examples.push(example);
    }
    if examples.is_empty() {
        return Err(DataError::Empty {
            path: path.to_owned(),
        });
    }
    Ok(Dataset {
        records,
        examples,
        stats,
    })
}

impl Dataset {
    /// The tokenized examples.
    pub fn examples(&self) -> &[Example] {
        &self.examples
    }

    /// The records, parallel to [`Dataset::examples`].
    pub fn records(&self) -> &[Record] {
        &self.records
    }

    /// Number of examples.
    pub fn len(&self) -> usize {
        self.examples.len()
    }

    /// Whether there are no examples.
    pub fn is_empty(&self) -> bool {
        self.examples.is_empty()
    }

    /// What loading found.
    pub fn stats(&self) -> &DatasetStats {
        &self.stats
    }

    /// The examples in an order that depends only on `seed`.
    pub fn shuffled(&self, seed: u64) -> Dataset {
        self.select(&permutation(self.len(), seed))
    }

    /// Splits into (train, held-out). The held-out rows are chosen by a fixed-seed permutation
    /// (the same for every call) and both parts keep the original order. The held-out count is
    /// capped so that training keeps at least one example.
    pub fn split(&self, holdout: Holdout) -> (Dataset, Dataset) {
        let wanted = match holdout {
            Holdout::Fraction(fraction) => {
                (self.len() as f64 * fraction.clamp(0.0, 1.0)).round() as usize
            }
            Holdout::Count(count) => count,
        };
        let count = wanted.min(self.len().saturating_sub(1));
        let mut held = vec![false; self.len()];
        for &index in permutation(self.len(), SPLIT_SEED).iter().take(count) {
            held[index] = true;
        }
        let train: Vec<usize> = (0..self.len()).filter(|&i| !held[i]).collect();
        let eval: Vec<usize> = (0..self.len()).filter(|&i| held[i]).collect();
        (self.select(&train), self.select(&eval))
    }

    fn select(&self, indices: &[usize]) -> Dataset {
        Dataset {
            records: indices.iter().map(|&i| self.records[i].clone()).collect(),
            examples: indices.iter().map(|&i| self.examples[i].clone()).collect(),
            stats: self.stats,
        }
    }
}
