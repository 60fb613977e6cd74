//! Memory planner: liveness intervals over the schedule -> byte offsets in one arena, with
//! the peak and a breakdown by lifetime class known before anything is allocated. Given a
//! VRAM budget it decides, per saved tensor, keep / offload to pinned host memory / recompute.
//!
//! Time is the node index. A tensor occupies arena bytes over one or two *segments*
//! (inclusive node ranges): one when kept, two when offloaded or recomputed (before and after
//! its longest idle gap). Offloaded tensors get a device-side region per segment and a
//! region of the pinned host pool, shared with offloaded tensors whose host lifetimes do not
//! overlap ([`placement::place_host`]). When the copies leave the device and come back is
//! decided by bytes and bandwidth against the estimated compute time of the nodes in between
//! ([`CostModel`], [`timing`]), or by fixed node counts without a cost model.
//!
//! Fragmentation bound (see the property tests): over 1500 random graphs (random DAGs and
//! synthetic training steps) the greedy placement's arena stayed within
//! [`FRAGMENTATION_BOUND`] x the largest live set (sum of aligned sizes live at one node);
//! the worst seen was 1.22x. This is measured, not proven: dynamic storage
//! allocation is NP-hard and greedy-by-size has no constant worst-case ratio; the only hard
//! guarantees are `live peak <= arena <= sum of all aligned segment sizes`.

mod budget;
mod liveness;
pub mod placement;
mod report;
pub mod timing;

pub use placement::align_up;
pub use report::fmt_bytes;
pub use timing::CostModel;

use crate::error::RuntimeError;
use crate::graph::{Graph, Lifetime, TensorId};
use std::ops::Range;

/// Arena offsets are multiples of this (cuBLASLt and vector loads want >= 16; the driver
/// aligns allocations to 256).
pub const ARENA_ALIGNMENT: usize = 256;

/// Measured bound on arena / live peak for the greedy placement (property-tested).
pub const FRAGMENTATION_BOUND: f64 = 1.5;

/// Knobs of the planner.
#[derive(Debug, Clone)]
pub struct PlanOptions {
    /// Device memory the arena may use; `None` keeps every saved tensor.
    pub vram_budget: Option<usize>,
    /// Times copies by bytes and bandwidth against estimated node times (default: the
    /// H200's). `None`: by the node counts below.
    pub cost: Option<CostModel>,
    /// Without a cost model: nodes between issuing a prefetch and the consumer that waits.
    pub prefetch_lead: usize,
    /// Without a cost model: nodes after the producer during which the device copy of an
    /// offloaded tensor stays reserved, so the device-to-host copy normally finishes before
    /// the memory is reused.
    pub d2h_slack: usize,
}

impl Default for PlanOptions {
    fn default() -> Self {
        Self {
            vram_budget: None,
            cost: Some(CostModel::H200),
            prefetch_lead: 2,
            d2h_slack: 2,
        }
    }
}

impl PlanOptions {
    /// Copies timed by fixed node counts (no cost model): `d2h_slack` 2, `prefetch_lead` 2.
    pub fn by_node_count() -> Self {
        Self {
            cost: None,
            ..Self::default()
        }
    }

    /// The same options with a VRAM budget.
    pub fn with_budget(mut self, bytes: usize) -> Self {
        self.vram_budget = Some(bytes);
        self
    }
}

/// One stretch of time during which a tensor occupies `[offset, offset + bytes)` of the arena.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub tensor: TensorId,
    /// First node index (inclusive).
    pub start: usize,
    /// Last node index (inclusive).
    pub end: usize,
    /// Reserved bytes (the tensor's size rounded up to [`ARENA_ALIGNMENT`]).
    pub bytes: usize,
    pub offset: usize,
}

/// What the planner decided for a saved tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SavedChoice {
    Keep,
    Offload,
    Recompute,
}

/// A decision and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub tensor: TensorId,
    pub choice: SavedChoice,
    pub reason: String,
}

/// Copies for one offloaded tensor, as node indices of the schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OffloadSpec {
    pub tensor: TensorId,
    /// Bytes copied each way (unaligned tensor size).
    pub bytes: usize,
    /// Offset in the pinned host pool (shared over time, see [`placement::place_host`]).
    pub host_offset: usize,
    /// The device-to-host copy is issued right after this node (the last write before the gap).
    pub d2h_after: usize,
    /// The compute stream waits for the device-to-host copy before this node, the first one
    /// at which the device memory may be reused.
    pub device_free_from: usize,
    /// The host-to-device prefetch is issued before this node (start of the second segment).
    pub prefetch_before: usize,
    /// The first node after the gap that uses the tensor: it waits for the prefetch.
    pub first_consumer: usize,
}

/// A recomputed tensor: its producer node is run again right before node `before`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecomputeSpec {
    pub tensor: TensorId,
    pub producer: usize,
    pub before: usize,
}

/// Memory of one lifetime class.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClassUsage {
    pub lifetime: Lifetime,
    pub tensors: usize,
    /// Sum of the class's tensor sizes (aligned), as if all were live at once.
    pub total_bytes: usize,
    /// Bytes of this class live at the peak node.
    pub at_peak_bytes: usize,
}

/// The memory plan of one step.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// Arena size: the device memory the step needs.
    pub arena_bytes: usize,
    /// Largest sum of aligned sizes live at one node (a lower bound on any arena).
    pub live_peak_bytes: usize,
    /// The node where the live peak is reached.
    pub peak_node: usize,
    pub num_nodes: usize,
    /// Sorted by tensor, then start.
    pub segments: Vec<Segment>,
    /// One per saved tensor, in tensor order.
    pub decisions: Vec<Decision>,
    pub offloads: Vec<OffloadSpec>,
    pub recomputes: Vec<RecomputeSpec>,
    /// Size of the pinned host pool for offloaded tensors (regions reused over time).
    pub host_bytes: usize,
    /// Bytes copied to the host (and back) per step: the pool without reuse, unaligned.
    pub offloaded_bytes: usize,
    /// Copies were timed by bytes and bandwidth (hidden behind compute by the estimate);
    /// false: by node counts (no cost model, or the budget needed copies that stall).
    pub copies_by_bandwidth: bool,
    pub classes: Vec<ClassUsage>,
    pub budget: Option<usize>,
    /// Tensor names and shapes for the report (index = tensor id).
    pub tensor_labels: Vec<String>,
    seg_index: Vec<Range<usize>>,
}

impl Plan {
    /// Arena offset of `t` while node `node` runs (or is being prepared, for prefetches and
    /// recomputes scheduled before it); `None` if `t` is not on the device then.
    pub fn offset_at(&self, t: TensorId, node: usize) -> Option<usize> {
        self.segments[self.seg_index.get(t.0)?.clone()]
            .iter()
            .find(|s| s.start <= node && node <= s.end)
            .map(|s| s.offset)
    }

    /// The segments of `t`, in time order.
    pub fn segments_of(&self, t: TensorId) -> &[Segment] {
        &self.segments[self.seg_index[t.0].clone()]
    }
}

/// Plans `graph`: liveness, budget decisions, placement. With a cost model, a budget that
/// cannot be met with every copy hidden behind compute (the copies of the saved tensors
/// would not leave the device early enough) is planned again with copies timed by node
/// counts: the step then fits, but its compute stream waits for copies
/// ([`Plan::copies_by_bandwidth`] is false; [`crate::offload::estimate`] says how long).
pub fn plan(graph: &Graph, opts: &PlanOptions) -> Result<Plan, RuntimeError> {
    graph.validate()?;
    match budget::plan_with_budget(graph, opts) {
        Err(RuntimeError::DoesNotFit(msg)) if opts.cost.is_some() => {
            let by_nodes = PlanOptions {
                cost: None,
                ..opts.clone()
            };
            budget::plan_with_budget(graph, &by_nodes).map_err(|e| match e {
                RuntimeError::DoesNotFit(m) => RuntimeError::DoesNotFit(m),
                _ => RuntimeError::DoesNotFit(msg),
            })
        }
        other => other,
    }
}

#[cfg(test)]
mod tests;
