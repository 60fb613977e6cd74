//! Copy timing by bytes and bandwidth: for a set of offloaded tensors, when each
//! device-to-host copy is done (so the compute stream may reuse the device memory without
//! waiting) and when each prefetch must be issued (so it lands before its consumer), from the
//! estimated compute time of the nodes in between ([`CostModel`]) and the two copy streams'
//! first-in-first-out order.
//!
//! Node times are estimates of an unstalled compute stream: `start[n]` is the sum of the
//! durations of the nodes before `n` (recomputes included). Copies are planned at the copy
//! bandwidths divided by `copy_margin`; the executor's events keep the step correct whatever
//! the real timings are, the estimates only decide how much memory the copies keep reserved.

use super::liveness::Use;
use super::{OffloadSpec, PlanOptions};
use crate::graph::{Graph, NodeKind, TensorId};

/// Estimated speeds of the device, for scheduling copies against compute. Node times are
/// rooflines: `node_overhead_s + max(flops / flop rate, bytes touched / mem_bytes_per_s)`.
/// Compute is deliberately estimated on the fast side and copies on the slow side, so that a
/// copy planned to fit in the compute between two nodes also fits on the real device.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CostModel {
    /// Dense bf16 GEMM rate (FLOP/s).
    pub gemm_flops_per_s: f64,
    /// Rate of non-GEMM kernels that declare FLOPs ([`crate::graph::Node::flops`]).
    pub kernel_flops_per_s: f64,
    /// Device memory bandwidth seen by memory-bound kernels (B/s).
    pub mem_bytes_per_s: f64,
    /// Fixed time per node (launch gap inside a CUDA graph).
    pub node_overhead_s: f64,
    /// Host callbacks: fixed time (they synchronise the device).
    pub host_callback_s: f64,
    /// Device-to-host bandwidth of one copy stream into pinned memory (B/s).
    pub d2h_bytes_per_s: f64,
    /// Host-to-device bandwidth (B/s).
    pub h2d_bytes_per_s: f64,
    /// Copies are planned as if this many times slower than the bandwidths above (both
    /// directions at once share ~100 GB/s on the H200, and a concurrent GEMM costs some).
    pub copy_margin: f64,
}

impl CostModel {
    /// H200 SXM: 55 GB/s each way measured through pinned memory (~100 GB/s both at once),
    /// cuBLASLt bf16 GEMMs at up to ~790 TFLOP/s, HBM3e at ~4 TB/s achieved, the sm90
    /// attention kernels (the kernels that declare FLOPs) at 517-571 TFLOP/s on a 32k sequence.
    pub const H200: CostModel = CostModel {
        gemm_flops_per_s: 800e12,
        kernel_flops_per_s: 550e12,
        mem_bytes_per_s: 4.0e12,
        node_overhead_s: 2e-6,
        host_callback_s: 100e-6,
        d2h_bytes_per_s: 55e9,
        h2d_bytes_per_s: 55e9,
        copy_margin: 1.1,
    };

    /// Estimated seconds of node `n` of `g`.
    pub fn node_seconds(&self, g: &Graph, n: usize) -> f64 {
        let nd = &g.nodes[n];
        let mut bytes = 0usize;
        for t in nd.inputs().iter().chain(&nd.writes) {
            bytes += g.tensor(*t).bytes();
        }
        let mem = bytes as f64 / self.mem_bytes_per_s;
        let compute = match &nd.kind {
            NodeKind::Gemm { desc, .. } => desc.flops() / self.gemm_flops_per_s,
            NodeKind::HostCallback(_) => return self.host_callback_s,
            _ => nd.flops.unwrap_or(0.0) / self.kernel_flops_per_s,
        };
        self.node_overhead_s + compute.max(mem)
    }

    /// Planned seconds of a device-to-host copy of `bytes` (margin included).
    pub fn d2h_seconds(&self, bytes: usize) -> f64 {
        bytes as f64 / self.d2h_bytes_per_s * self.copy_margin
    }

    /// Planned seconds of a host-to-device copy of `bytes` (margin included).
    pub fn h2d_seconds(&self, bytes: usize) -> f64 {
        bytes as f64 / self.h2d_bytes_per_s * self.copy_margin
    }
}

/// Estimated start time of every node, plus the end of the step at index `nodes`:
/// `start[n + 1] = start[n] + recomputes before n + node n`.
pub fn node_starts(g: &Graph, cost: &CostModel, recompute_before: &[Vec<usize>]) -> Vec<f64> {
    let durations: Vec<f64> = (0..g.nodes.len())
        .map(|n| cost.node_seconds(g, n))
        .collect();
    node_starts_from(&durations, recompute_before)
}

/// [`node_starts`] from precomputed node durations.
pub fn node_starts_from(durations: &[f64], recompute_before: &[Vec<usize>]) -> Vec<f64> {
    let mut starts = Vec::with_capacity(durations.len() + 1);
    let mut t = 0.0;
    for (n, d) in durations.iter().enumerate() {
        for &p in recompute_before.get(n).map_or(&[][..], |v| v.as_slice()) {
            t += durations[p];
        }
        starts.push(t);
        t += d;
    }
    starts.push(t);
    starts
}

/// One offloaded tensor's uses around its gap, the input of [`offload_specs`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GapUses {
    pub tensor: TensorId,
    pub bytes: usize,
    /// Last write before the gap (the device-to-host copy follows it).
    pub last_write: usize,
    /// Last use before the gap.
    pub last_use: usize,
    /// First use after the gap.
    pub first_consumer: usize,
}

impl GapUses {
    /// The gap `(j, j + 1)` of `uses` (indices into `uses`), if a write precedes it.
    pub fn new(t: TensorId, bytes: usize, uses: &[Use], gap: (usize, usize)) -> Option<Self> {
        Some(Self {
            tensor: t,
            bytes,
            last_write: uses[..=gap.0].iter().rev().find(|x| x.write)?.node,
            last_use: uses[gap.0].node,
            first_consumer: uses[gap.1].node,
        })
    }
}

/// Copy nodes for every offloaded tensor, jointly (the copies of one direction share a
/// stream and run in issue order). `None` for a tensor whose copy cannot free the device
/// for even one node. `starts` comes from [`node_starts`] (only used with a cost model).
pub fn offload_specs(
    gaps: &[GapUses],
    opts: &PlanOptions,
    starts: &[f64],
) -> Vec<Option<OffloadSpec>> {
    match &opts.cost {
        None => gaps
            .iter()
            .map(|u| {
                let device_free_from = u.last_use.max(u.last_write + opts.d2h_slack) + 1;
                let prefetch_before =
                    device_free_from.max(u.first_consumer.saturating_sub(opts.prefetch_lead));
                spec(u, device_free_from, prefetch_before)
            })
            .collect(),
        Some(cost) => by_bandwidth(gaps, cost, starts),
    }
}

fn spec(u: &GapUses, device_free_from: usize, prefetch_before: usize) -> Option<OffloadSpec> {
    (device_free_from < prefetch_before && prefetch_before <= u.first_consumer).then_some(
        OffloadSpec {
            tensor: u.tensor,
            bytes: u.bytes,
            host_offset: 0,
            d2h_after: u.last_write,
            device_free_from,
            prefetch_before,
            first_consumer: u.first_consumer,
        },
    )
}

/// The schedule by bytes and bandwidth:
/// - device to host, in issue order (producer, then tensor): a copy starts when its producer
///   ends and the stream is free, and the device memory is released at the first node that
///   starts after the copy's planned end (never before the last use before the gap);
/// - host to device, backwards from the last consumer: each copy must end before its
///   consumer starts and before the next copy on the stream starts; it is issued before the
///   last node that starts no later than that, but not before the device memory was
///   released (then the consumer may wait: the estimate in [`crate::offload::estimate`]
///   says how long).
fn by_bandwidth(gaps: &[GapUses], cost: &CostModel, starts: &[f64]) -> Vec<Option<OffloadSpec>> {
    let nodes = starts.len() - 1;
    // First node n >= lo with starts[n] >= t (nodes if none).
    let first_after = |lo: usize, t: f64| lo + starts[lo..nodes].partition_point(|&s| s < t);
    let mut free_from = vec![usize::MAX; gaps.len()];
    let mut order: Vec<usize> = (0..gaps.len()).collect();
    order.sort_by_key(|&i| (gaps[i].last_write, gaps[i].tensor));
    let mut stream_free = 0.0f64;
    for &i in &order {
        let u = &gaps[i];
        let start = starts[u.last_write + 1].max(stream_free);
        let end = start + cost.d2h_seconds(u.bytes);
        stream_free = end;
        free_from[i] = first_after(u.last_use + 1, end);
    }
    let mut prefetch = vec![usize::MAX; gaps.len()];
    order.sort_by_key(|&i| (std::cmp::Reverse(gaps[i].first_consumer), gaps[i].tensor));
    let mut next_start = f64::INFINITY;
    for &i in &order {
        let u = &gaps[i];
        let lo = free_from[i].saturating_add(1);
        if lo > u.first_consumer {
            continue;
        }
        let latest_start = starts[u.first_consumer].min(next_start) - cost.h2d_seconds(u.bytes);
        // Last node n in [lo, first_consumer] with starts[n] <= latest_start.
        let n = starts[lo..=u.first_consumer].partition_point(|&s| s <= latest_start);
        let issue = if n == 0 { lo } else { lo + n - 1 };
        prefetch[i] = issue;
        next_start = latest_start;
    }
    gaps.iter()
        .enumerate()
        .map(|(i, u)| {
            if prefetch[i] == usize::MAX {
                None
            } else {
                spec(u, free_from[i], prefetch[i])
            }
        })
        .collect()
}
