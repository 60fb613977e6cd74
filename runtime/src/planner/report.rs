//! The human-readable plan report (`ftrt plan`).

use super::{Plan, SavedChoice};
use std::fmt;

/// Saved-tensor decisions the plain table lists one by one; longer plans list them under `{:#}`.
const LISTED_DECISIONS: usize = 40;

/// `1.50 GiB`, `12.0 MiB`, `512 B`.
pub fn fmt_bytes(b: usize) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if b < 1024 {
        return format!("{b} B");
    }
    let mut v = b as f64 / 1024.0;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.2} {}", UNITS[u])
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let frag = if self.live_peak_bytes == 0 {
            0.0
        } else {
            100.0 * (self.arena_bytes as f64 / self.live_peak_bytes as f64 - 1.0)
        };
        writeln!(
            f,
            "memory plan: {} nodes, {} tensors",
            self.num_nodes,
            self.tensor_labels.len()
        )?;
        writeln!(f, "  device arena (peak): {}", fmt_bytes(self.arena_bytes))?;
        writeln!(
            f,
            "  live peak:           {} at node {} ({frag:.1}% placement overhead)",
            fmt_bytes(self.live_peak_bytes),
            self.peak_node
        )?;
        if let Some(b) = self.budget {
            writeln!(f, "  VRAM budget:         {}", fmt_bytes(b))?;
        }
        writeln!(
            f,
            "  pinned host pool:    {} ({} offloaded per step, each way; regions reused over time)",
            fmt_bytes(self.host_bytes),
            fmt_bytes(self.offloaded_bytes)
        )?;
        if !self.offloads.is_empty() {
            writeln!(
                f,
                "  copies timed:        {}",
                if self.copies_by_bandwidth {
                    "by bytes and bandwidth against estimated node times (hidden behind compute)"
                } else {
                    "by node counts (with copies hidden behind compute the budget is not met: \
                     the compute stream will wait for some copies)"
                }
            )?;
        }
        if let Some(b) = self.budget {
            writeln!(
                f,
                "  fits the budget:     {} ({} of {})",
                if self.arena_bytes <= b { "yes" } else { "no" },
                fmt_bytes(self.arena_bytes),
                fmt_bytes(b)
            )?;
        }
        writeln!(
            f,
            "  {:<16} {:>8} {:>12} {:>12}",
            "class", "tensors", "total", "at peak"
        )?;
        for c in &self.classes {
            writeln!(
                f,
                "  {:<16} {:>8} {:>12} {:>12}",
                c.lifetime.to_string(),
                c.tensors,
                fmt_bytes(c.total_bytes),
                fmt_bytes(c.at_peak_bytes)
            )?;
        }
        let count = |c: SavedChoice| self.decisions.iter().filter(|d| d.choice == c).count();
        writeln!(
            f,
            "  saved tensors: {} kept, {} offloaded, {} recomputed",
            count(SavedChoice::Keep),
            count(SavedChoice::Offload),
            count(SavedChoice::Recompute)
        )?;
        // Every tensor's decision and reason with `{:#}`; otherwise only short lists.
        if !f.alternate() && self.decisions.len() > LISTED_DECISIONS {
            return writeln!(
                f,
                "    (per-tensor decisions and reasons not listed: {} tensors)",
                self.decisions.len()
            );
        }
        for d in &self.decisions {
            let choice = match d.choice {
                SavedChoice::Keep => "keep",
                SavedChoice::Offload => "offload",
                SavedChoice::Recompute => "recompute",
            };
            writeln!(
                f,
                "    {choice:<9} {}: {}",
                self.tensor_labels[d.tensor.0], d.reason
            )?;
        }
        Ok(())
    }
}
