//! Where the GPU time of a stretch of work goes, by node kind (`ftrt bench --profile`).
//!
//! While a profile is open, every kernel lookup ([`crate::Gpu::function`], which each launcher
//! calls right before its launch) and every labelled GEMM or copy records a CUDA event on the
//! compute stream. The GPU time between one mark and the next is charged to the first mark's
//! label, so a label's total is the time from its launches starting to the next launch starting:
//! its kernels plus any idle gap after them (a stream wait, or the host being late). Recording
//! costs about a microsecond of host time per launch, so a profiled step is a little slower
//! than an unprofiled one; the totals say where the time goes, not the step's speed.

use crate::error::RuntimeError;
use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaEvent, CudaStream};
use std::collections::HashMap;

/// Events recorded on the compute stream, each with the label of the work launched after it.
#[derive(Default)]
pub struct ProfileLog {
    marks: Vec<(String, CudaEvent)>,
}

/// One label's share of a profile.
#[derive(Clone, Debug, PartialEq)]
pub struct ProfileRow {
    pub label: String,
    /// Marks (launches) carrying the label.
    pub calls: usize,
    /// GPU milliseconds charged to it.
    pub ms: f64,
}

impl ProfileLog {
    /// Records an event on `stream`: work launched from now until the next mark is `label`'s.
    pub fn mark(&mut self, stream: &CudaStream, label: &str) -> Result<(), RuntimeError> {
        let ev = stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
        self.marks.push((label.to_string(), ev));
        Ok(())
    }

    /// Closes the log with a last event, waits for it, and sums the time per label (largest
    /// first).
    pub fn finish(mut self, stream: &CudaStream) -> Result<Vec<ProfileRow>, RuntimeError> {
        self.mark(stream, "")?;
        stream.synchronize()?;
        let mut ms = Vec::with_capacity(self.marks.len());
        for w in self.marks.windows(2) {
            ms.push(w[0].1.elapsed_ms(&w[1].1)? as f64);
        }
        let labels = self.marks.iter().map(|(l, _)| l.as_str());
        Ok(sum_by_label(labels.zip(ms)))
    }
}

/// Sums (label, ms) spans per label; rows sorted by time, largest first.
pub fn sum_by_label<'a>(spans: impl IntoIterator<Item = (&'a str, f64)>) -> Vec<ProfileRow> {
    let mut by: HashMap<&str, (usize, f64)> = HashMap::new();
    for (label, ms) in spans {
        let e = by.entry(label).or_default();
        e.0 += 1;
        e.1 += ms;
    }
    let mut rows: Vec<ProfileRow> = by
        .into_iter()
        .map(|(label, (calls, ms))| ProfileRow {
            label: label.to_string(),
            calls,
            ms,
        })
        .collect();
    rows.sort_by(|a, b| b.ms.total_cmp(&a.ms).then(a.label.cmp(&b.label)));
    rows
}

/// The rows as an aligned table: label, calls, total ms, ms per call, share of the total.
pub fn format_table(rows: &[ProfileRow]) -> String {
    let total: f64 = rows.iter().map(|r| r.ms).sum();
    let w = rows.iter().map(|r| r.label.len()).max().unwrap_or(4).max(4);
    let mut s = format!(
        "{:<w$}  {:>6}  {:>10}  {:>9}  {:>6}\n",
        "kind", "calls", "total ms", "us/call", "share"
    );
    for r in rows {
        s += &format!(
            "{:<w$}  {:>6}  {:>10.3}  {:>9.1}  {:>5.1}%\n",
            r.label,
            r.calls,
            r.ms,
            1e3 * r.ms / r.calls.max(1) as f64,
            100.0 * r.ms / total.max(1e-12)
        );
    }
    s + &format!("{:<w$}  {:>6}  {:>10.3}\n", "total", "", total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_sum_per_label_largest_first() {
        let rows = sum_by_label([("a", 1.0), ("b", 5.0), ("a", 2.5), ("c", 0.5)]);
        let got: Vec<(&str, usize, f64)> = rows
            .iter()
            .map(|r| (r.label.as_str(), r.calls, r.ms))
            .collect();
        assert_eq!(got, vec![("b", 1, 5.0), ("a", 2, 3.5), ("c", 1, 0.5)]);
        let t = format_table(&rows);
        assert!(
            t.lines().count() == 5 && t.contains("total") && t.contains("55.6%"),
            "{t}"
        );
    }
}
