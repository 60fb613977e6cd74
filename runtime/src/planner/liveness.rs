//! Uses of every tensor over the schedule, and how a saved tensor's uses split around its
//! longest idle gap (the stretch an offload or a recompute frees).

use crate::graph::{Graph, NodeKind, TensorId};

/// One use of a tensor: the node index and whether the node writes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Use {
    pub node: usize,
    pub write: bool,
}

/// Per tensor, its uses in schedule order (a node that reads and writes counts as one write).
pub fn uses(graph: &Graph) -> Vec<Vec<Use>> {
    let mut out = vec![Vec::new(); graph.tensors.len()];
    for (i, node) in graph.nodes.iter().enumerate() {
        for &t in &node.reads {
            if !node.writes.contains(&t)
                && out[t.0].last()
                    != Some(&Use {
                        node: i,
                        write: false,
                    })
            {
                out[t.0].push(Use {
                    node: i,
                    write: false,
                });
            }
        }
        for &t in &node.writes {
            out[t.0].push(Use {
                node: i,
                write: true,
            });
        }
    }
    out
}

/// The live interval `[start, end]` (node indices, inclusive) of every tensor when kept on
/// the device: whole step for persistent tensors, first to last use otherwise, `None` if unused.
pub fn base_interval(graph: &Graph, t: TensorId, uses: &[Use]) -> Option<(usize, usize)> {
    if graph.whole_step(t) {
        return Some((0, graph.nodes.len().saturating_sub(1)));
    }
    Some((uses.first()?.node, uses.last()?.node))
}

/// The longest idle gap between two consecutive uses: `(before, after)` indices into `uses`,
/// `after = before + 1`. `None` with fewer than two uses. Ties pick the earliest gap.
pub fn longest_gap(uses: &[Use]) -> Option<(usize, usize)> {
    (0..uses.len().saturating_sub(1))
        .max_by_key(|&j| (uses[j + 1].node - uses[j].node, std::cmp::Reverse(j)))
        .map(|j| (j, j + 1))
}

/// Why `t` cannot be recomputed, or its producer node index if it can: `t` is written by
/// exactly one kernel node, before the gap, and that node writes nothing else.
pub fn recompute_producer(
    graph: &Graph,
    t: TensorId,
    uses: &[Use],
    gap_after: usize,
) -> Result<usize, String> {
    if !graph.tensor(t).recomputable {
        return Err("not marked recomputable".into());
    }
    let writers: Vec<usize> = uses.iter().filter(|u| u.write).map(|u| u.node).collect();
    let p = writers[0];
    if writers[1..].iter().any(|&w| w < uses[gap_after].node) {
        return Err("written by more than one node before its backward use".into());
    }
    let node = &graph.nodes[p];
    if !matches!(node.kind, NodeKind::Kernel { .. }) {
        return Err(format!("producer '{}' is not a kernel", node.name));
    }
    if node.writes.len() != 1 {
        return Err(format!(
            "producer '{}' also writes other tensors",
            node.name
        ));
    }
    Ok(p)
}
