//! The datasets of a run: the bundled arithmetic set (embedded in the binary) or the user's
//! files, checked row by row before the model is opened, then tokenized and packed.

use std::path::{Path, PathBuf};

use ftrt_models::data::{
    load_dataset, pack, pack_with_report, read_records, DataOptions, Dataset, Holdout, PackedBatch,
    PromptRenderer,
};

use super::settings::Settings;

/// The bundled training set (`data/train.jsonl`).
const BUNDLED_TRAIN: &str = include_str!("../../data/train.jsonl");
/// The bundled held-out set (`data/eval.jsonl`).
const BUNDLED_EVAL: &str = include_str!("../../data/eval.jsonl");

/// Fraction held out of a user dataset given without `--eval-dataset`.
const HOLDOUT_FRACTION: f64 = 0.05;

/// Training and held-out files, after the bundled ones were written out.
pub struct DataFiles {
    /// Training rows.
    pub train: PathBuf,
    /// Held-out rows, when a separate file provides them.
    pub eval: Option<PathBuf>,
}

/// The dataset files of `s`; the bundled set is written into `<output_dir>/bundled-data/` (so
/// the run records what it trained on). Every row is parsed now, so a malformed line or an
/// empty file is reported before any model is loaded.
pub fn locate_and_check(s: &Settings) -> Result<DataFiles, String> {
    let files = match &s.dataset {
        Some(train) => DataFiles {
            train: train.clone(),
            eval: s.eval_dataset.clone(),
        },
        None => {
            let dir = s.output_dir.join("bundled-data");
            std::fs::create_dir_all(&dir)
                .map_err(|e| format!("{}: cannot create: {e}", dir.display()))?;
            let (train, eval) = (dir.join("train.jsonl"), dir.join("eval.jsonl"));
            for (p, text) in [(&train, BUNDLED_TRAIN), (&eval, BUNDLED_EVAL)] {
                std::fs::write(p, text)
                    .map_err(|e| format!("{}: cannot write: {e}", p.display()))?;
            }
            DataFiles {
                train,
                eval: Some(s.eval_dataset.clone().unwrap_or(eval)),
            }
        }
    };
    for p in std::iter::once(&files.train).chain(files.eval.as_ref()) {
        read_records(p, s.dataset_format).map_err(|e| e.to_string())?;
    }
    Ok(files)
}

/// Tokenized (train, held-out) sets.
pub fn tokenize(
    files: &DataFiles,
    s: &Settings,
    renderer: &PromptRenderer,
) -> Result<(Dataset, Dataset), String> {
    let opts = DataOptions {
        max_seq_length: s.max_seq_length,
        use_chat_template: true,
    };
    let load = |p: &Path| -> Result<Dataset, String> {
        let d = load_dataset(p, s.dataset_format, renderer, &opts).map_err(|e| e.to_string())?;
        let st = d.stats();
        if st.truncated > 0 {
            eprintln!(
                "{}: {} of {} sequences were longer than --max-seq-length {} and were truncated",
                p.display(),
                st.truncated,
                st.rows,
                s.max_seq_length
            );
        }
        if st.without_loss > 0 {
            eprintln!(
                "{}: {} rows without any completion token were skipped",
                p.display(),
                st.without_loss
            );
        }
        Ok(d)
    };
    let train = load(&files.train)?;
    match &files.eval {
        Some(e) => Ok((train, load(e)?)),
        None => Ok(train.split(Holdout::Fraction(HOLDOUT_FRACTION))),
    }
}

/// Micro-batches of `s.token_budget()` tokens: packed (several sequences per batch, first fit
/// over the seed-shuffled examples) or `per_device_train_batch_size` sequences each.
pub fn batches(d: &Dataset, s: &Settings, shuffle: bool) -> Vec<PackedBatch> {
    let data = if shuffle {
        d.shuffled(s.seed)
    } else {
        d.clone()
    };
    let ex = data.examples();
    if s.packing {
        let p = pack_with_report(ex, s.token_budget());
        if p.truncated > 0 {
            eprintln!(
                "{} sequences longer than the micro-batch budget were truncated",
                p.truncated
            );
        }
        p.batches
    } else {
        ex.chunks(s.batch_size)
            .flat_map(|group| {
                let total: usize = group.iter().map(|e| e.input_ids.len()).sum();
                pack(group, total.max(1))
            })
            .collect()
    }
}
