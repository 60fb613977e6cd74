//! Executors of a planned graph: [`CpuExecutor`] (host arena, CPU kernels, CPU GEMM) and
//! [`CudaExecutor`] (device arena, eager launches or one captured CUDA graph replayed).
//! Both run, for every node `n` in order: the offload actions scheduled before `n`, the
//! recomputes scheduled before `n`, node `n`, then the offload actions after `n`.
//!
//! A graph may hold several phases, contiguous ranges of nodes run on their own (e.g. an
//! inference graph's prefill and decode steps, which share the weights and the KV cache while
//! the planner lets their activations share memory); a partial run is allowed for plans
//! without offloads and recomputes, whose copies and recomputes pair across the whole step.

pub mod cpu;
pub mod cuda;

pub use cpu::CpuExecutor;
pub use cuda::CudaExecutor;

use std::ops::Range;

use crate::error::RuntimeError;
use crate::graph::{Graph, TensorId};
use crate::planner::Plan;

/// Checks that `nodes` may run on its own in `plan`: within the step, and either the whole
/// step or a plan without offloads and recomputes.
fn check_phase(plan: &Plan, nodes: &Range<usize>) -> Result<(), RuntimeError> {
    if nodes.start > nodes.end || nodes.end > plan.num_nodes {
        return Err(RuntimeError::InvalidArgument(format!(
            "nodes {nodes:?} are outside the graph's {} nodes",
            plan.num_nodes
        )));
    }
    let whole = nodes.start == 0 && nodes.end == plan.num_nodes;
    let copies_pair_across = !plan.offloads.is_empty() || !plan.recomputes.is_empty();
    if !whole && copies_pair_across {
        return Err(RuntimeError::Unsupported(format!(
            "nodes {nodes:?} cannot run apart from the rest of a step with offloads or recomputes"
        )));
    }
    Ok(())
}

/// Byte range of one argument in the arena.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ArgRange {
    offset: usize,
    bytes: usize,
}

/// Arena ranges of node `node`'s inputs and outputs when it runs at time `time` (its own
/// index, or a later one when it is a recompute).
fn arg_ranges(g: &Graph, p: &Plan, node: usize, time: usize) -> (Vec<ArgRange>, Vec<ArgRange>) {
    let range = |t: TensorId| ArgRange {
        offset: p
            .offset_at(t, time)
            .expect("planner places every tensor a node uses"),
        bytes: g.tensor(t).bytes(),
    };
    let n = &g.nodes[node];
    (
        n.inputs().into_iter().map(range).collect(),
        n.writes.iter().copied().map(range).collect(),
    )
}

/// Per node index, the producer nodes to re-run right before it.
fn recomputes_before(p: &Plan) -> Vec<Vec<usize>> {
    let mut out = vec![Vec::new(); p.num_nodes];
    for r in &p.recomputes {
        out[r.before].push(r.producer);
    }
    out
}

/// The arena offset of `t` at the end of the step (its last segment).
fn final_offset(p: &Plan, t: TensorId) -> Option<usize> {
    p.segments_of(t).last().map(|s| s.offset)
}

#[cfg(test)]
mod tests;
