//! Budget decisions: while the step does not fit, move the largest saved tensor that is live
//! at the peak node (and idle there) off the device: recompute it when the graph allows and
//! its producer can be re-run, else offload it to pinned host memory. The copies of all
//! offloaded tensors are timed jointly ([`super::timing`]) after every decision.

use super::liveness::{base_interval, longest_gap, recompute_producer, uses, Use};
use super::placement::{align_up, live_profile, place, place_host};
use super::report::fmt_bytes;
use super::timing::{node_starts_from, offload_specs, GapUses};
use super::{
    ClassUsage, Decision, OffloadSpec, Plan, PlanOptions, RecomputeSpec, SavedChoice, Segment,
    ARENA_ALIGNMENT,
};
use crate::error::RuntimeError;
use crate::graph::{Graph, Lifetime, TensorId};

#[derive(Debug, Clone, PartialEq)]
enum State {
    Keep,
    Offload {
        gap: (usize, usize),
        /// Why it was chosen (completed with the final copy nodes in `finish`).
        context: String,
    },
    Recompute {
        spec: RecomputeSpec,
        gap: (usize, usize),
        reason: String,
    },
}

struct Planner<'g> {
    graph: &'g Graph,
    opts: &'g PlanOptions,
    uses: Vec<Vec<Use>>,
    states: Vec<State>,
    /// Per tensor, the current copy nodes of offloaded tensors (jointly timed).
    specs: Vec<Option<OffloadSpec>>,
    /// Estimated node durations (with a cost model).
    durations: Vec<f64>,
}

/// Plans with decisions for `opts.vram_budget`.
pub fn plan_with_budget(graph: &Graph, opts: &PlanOptions) -> Result<Plan, RuntimeError> {
    let mut p = Planner {
        graph,
        opts,
        uses: uses(graph),
        states: vec![State::Keep; graph.tensors.len()],
        specs: vec![None; graph.tensors.len()],
        durations: match &opts.cost {
            Some(c) => (0..graph.nodes.len())
                .map(|n| c.node_seconds(graph, n))
                .collect(),
            None => Vec::new(),
        },
    };
    loop {
        let mut segs = p.segments();
        let profile = live_profile(&segs, graph.nodes.len());
        let (peak_node, live_peak) = argmax(&profile);
        let arena = match opts.vram_budget {
            Some(b) if live_peak > b => None,
            _ => Some(place(&mut segs)),
        };
        let fits = match (arena, opts.vram_budget) {
            (Some(a), Some(b)) => a <= b,
            (Some(_), None) => true,
            (None, _) => false,
        };
        if fits {
            return Ok(p.finish(segs, arena.unwrap_or(0), peak_node, live_peak));
        }
        let budget = opts.vram_budget.unwrap_or(usize::MAX);
        let need = arena.unwrap_or(live_peak);
        if !p.move_one_off(peak_node, need - budget) {
            return Err(p.does_not_fit(&segs, peak_node, need, arena.is_some(), budget));
        }
    }
}

fn argmax(profile: &[usize]) -> (usize, usize) {
    profile.iter().enumerate().fold(
        (0, 0),
        |best, (i, &v)| if v > best.1 { (i, v) } else { best },
    )
}

impl Planner<'_> {
    fn bytes(&self, t: TensorId) -> usize {
        align_up(self.graph.tensor(t).bytes(), ARENA_ALIGNMENT)
    }

    /// Segments (unplaced) for the current states.
    fn segments(&self) -> Vec<Segment> {
        let n = self.graph.tensors.len();
        // Inputs of recomputed producers must live until the recompute.
        let mut extend_to = vec![0usize; n];
        for s in &self.states {
            if let State::Recompute { spec, .. } = s {
                for t in self.graph.nodes[spec.producer].inputs() {
                    extend_to[t.0] = extend_to[t.0].max(spec.before);
                }
            }
        }
        let mut segs = Vec::new();
        for (i, &extend) in extend_to.iter().enumerate() {
            let t = TensorId(i);
            let Some((start, end)) = base_interval(self.graph, t, &self.uses[i]) else {
                continue;
            };
            let end = end.max(extend);
            let bytes = self.bytes(t);
            let seg = |start, end| Segment {
                tensor: t,
                start,
                end,
                bytes,
                offset: 0,
            };
            match &self.states[i] {
                State::Keep => segs.push(seg(start, end)),
                State::Offload { .. } => {
                    let spec = self.specs[i].expect("offloaded tensors have copy nodes");
                    segs.push(seg(start, spec.device_free_from - 1));
                    segs.push(seg(spec.prefetch_before, end));
                }
                State::Recompute { gap, .. } => {
                    segs.push(seg(start, self.uses[i][gap.0].node));
                    segs.push(seg(self.uses[i][gap.1].node, end));
                }
            }
        }
        segs
    }

    /// Per node, the producers recomputed before it under the current states.
    fn recompute_before(&self) -> Vec<Vec<usize>> {
        let mut out = vec![Vec::new(); self.graph.nodes.len()];
        for s in &self.states {
            if let State::Recompute { spec, .. } = s {
                out[spec.before].push(spec.producer);
            }
        }
        out
    }

    /// The gap uses of every offloaded tensor, plus `extra` (a candidate) if given.
    fn gap_uses(&self, extra: Option<TensorId>) -> Vec<GapUses> {
        let mut out = Vec::new();
        for (i, s) in self.states.iter().enumerate() {
            let gap = match s {
                State::Offload { gap, .. } => *gap,
                _ if extra == Some(TensorId(i)) => match longest_gap(&self.uses[i]) {
                    Some(g) => g,
                    None => continue,
                },
                _ => continue,
            };
            let t = TensorId(i);
            if let Some(u) = GapUses::new(t, self.graph.tensor(t).bytes(), &self.uses[i], gap) {
                out.push(u);
            }
        }
        out
    }

    /// Joint copy nodes of the offloaded tensors plus `extra`; `None` if any offloaded
    /// tensor (or the candidate) could not free the device for even one node.
    fn joint_specs(&self, extra: Option<TensorId>) -> Option<Vec<Option<OffloadSpec>>> {
        let gaps = self.gap_uses(extra);
        let starts = match self.opts.cost {
            Some(_) => node_starts_from(&self.durations, &self.recompute_before()),
            None => Vec::new(),
        };
        let specs = offload_specs(&gaps, self.opts, &starts);
        let mut out = vec![None; self.graph.tensors.len()];
        for (u, s) in gaps.iter().zip(specs) {
            out[u.tensor.0] = Some(s?);
        }
        if let Some(t) = extra {
            out[t.0]?;
        }
        Some(out)
    }

    /// The recompute of `t`, or why it is not possible.
    fn recompute_spec(&self, t: TensorId) -> Result<(RecomputeSpec, (usize, usize)), String> {
        let u = &self.uses[t.0];
        let (j, k) = longest_gap(u).ok_or("used only once")?;
        let producer = recompute_producer(self.graph, t, u, k)?;
        let before = u[k].node;
        if before - u[j].node < 2 {
            return Err("its idle gap is too short".into());
        }
        for input in self.graph.nodes[producer].inputs() {
            if self.graph.whole_step(input) {
                continue;
            }
            if self.states[input.0] != State::Keep {
                return Err(format!(
                    "its input '{}' is itself off the device",
                    self.graph.tensor(input).name
                ));
            }
            if self.uses[input.0]
                .iter()
                .any(|x| x.write && x.node > producer && x.node < before)
            {
                return Err(format!(
                    "its input '{}' is overwritten before the recompute",
                    self.graph.tensor(input).name
                ));
            }
        }
        Ok((
            RecomputeSpec {
                tensor: t,
                producer,
                before,
            },
            (j, k),
        ))
    }

    /// Moves the largest saved tensor idle at `peak` off the device; false if there is none.
    /// Candidates are tried by decreasing size (then tensor id); the first that can leave the
    /// device across the peak wins.
    fn move_one_off(&mut self, peak: usize, over: usize) -> bool {
        let mut pinned = vec![false; self.graph.tensors.len()];
        for s in &self.states {
            if let State::Recompute { spec, .. } = s {
                for t in self.graph.nodes[spec.producer].inputs() {
                    pinned[t.0] = true;
                }
            }
        }
        let mut candidates: Vec<TensorId> = (0..self.graph.tensors.len())
            .map(TensorId)
            .filter(|&t| {
                self.graph.tensor(t).lifetime == Lifetime::Saved
                    && self.states[t.0] == State::Keep
                    && !pinned[t.0]
            })
            .collect();
        candidates.sort_by_key(|&t| (std::cmp::Reverse(self.bytes(t)), t));
        let peak_name = &self.graph.nodes[peak].name;
        for t in candidates {
            let i = t.0;
            // Only a tensor idle across the peak can free it.
            match longest_gap(&self.uses[i]) {
                Some((j, k)) if self.uses[i][j].node < peak && peak < self.uses[i][k].node => {}
                _ => continue,
            }
            let recompute = self.recompute_spec(t);
            if let Ok((spec, gap)) = &recompute {
                if self.uses[i][gap.0].node < peak && peak < spec.before {
                    self.states[i] = State::Recompute {
                        reason: format!(
                            "recomputed: idle at the peak (node {peak} '{peak_name}', {} over budget) and marked \
                             recomputable; re-running '{}' before node {} costs no PCIe traffic or host memory",
                            fmt_bytes(over),
                            self.graph.nodes[spec.producer].name,
                            spec.before
                        ),
                        spec: *spec,
                        gap: *gap,
                    };
                    if let Some(specs) = self.joint_specs(None) {
                        self.specs = specs;
                        return true;
                    }
                    // Recomputing shifts node times so that an offload no longer works.
                    self.states[i] = State::Keep;
                }
            }
            let Some(specs) = self.joint_specs(Some(t)) else {
                continue;
            };
            let spec = specs[i].expect("joint_specs checks the candidate");
            if !(spec.device_free_from <= peak && peak < spec.prefetch_before) {
                continue;
            }
            let why_not = match (&recompute, self.graph.tensor(t).recomputable) {
                (Err(e), true) => format!("; marked recomputable but {e}"),
                (Ok(_), _) => "; recomputing it would not free the peak node".into(),
                _ => String::new(),
            };
            self.states[i] = State::Offload {
                gap: longest_gap(&self.uses[i]).expect("an offload spec implies a gap"),
                context: format!(
                    "across the peak (node {peak} '{peak_name}', {} over budget){why_not}",
                    fmt_bytes(over)
                ),
            };
            self.specs = specs;
            return true;
        }
        false
    }

    fn does_not_fit(
        &self,
        segs: &[Segment],
        peak: usize,
        need: usize,
        placed: bool,
        budget: usize,
    ) -> RuntimeError {
        let mut live: Vec<&Segment> = segs
            .iter()
            .filter(|s| s.start <= peak && peak <= s.end)
            .collect();
        live.sort_by(|a, b| b.bytes.cmp(&a.bytes).then(a.tensor.cmp(&b.tensor)));
        let largest: Vec<String> = live
            .iter()
            .take(5)
            .map(|s| {
                let t = self.graph.tensor(s.tensor);
                format!(
                    "{} {} ({})",
                    label(self.graph, s.tensor),
                    fmt_bytes(s.bytes),
                    t.lifetime
                )
            })
            .collect();
        let whole: usize = segs
            .iter()
            .filter(|s| self.graph.whole_step(s.tensor))
            .map(|s| s.bytes)
            .sum();
        let would_fit = if whole >= budget {
            format!(
                "weights, optimizer state and workspace alone take {}",
                fmt_bytes(whole)
            )
        } else {
            format!(
                "weights, optimizer state and workspace take {}; the rest would have to shrink to {:.0}% \
                 (e.g. a smaller token budget per micro-batch), or the budget grow to {}",
                fmt_bytes(whole),
                100.0 * (budget - whole) as f64 / (need - whole) as f64,
                fmt_bytes(need)
            )
        };
        RuntimeError::DoesNotFit(format!(
            "the step needs {}{} with every movable saved tensor off the device, the VRAM budget is {}; \
             largest tensors live at the peak (node {peak} '{}'): {}; {would_fit}",
            if placed { "" } else { "at least " },
            fmt_bytes(need),
            fmt_bytes(budget),
            self.graph.nodes.get(peak).map_or("", |n| n.name.as_str()),
            largest.join(", ")
        ))
    }

    fn finish(
        self,
        mut segs: Vec<Segment>,
        arena: usize,
        peak_node: usize,
        live_peak: usize,
    ) -> Plan {
        let g = self.graph;
        segs.sort_by_key(|s| (s.tensor, s.start));
        let mut seg_index = vec![0..0; g.tensors.len()];
        let mut i = 0;
        while i < segs.len() {
            let t = segs[i].tensor.0;
            let j = i + segs[i..].iter().take_while(|s| s.tensor.0 == t).count();
            seg_index[t] = i..j;
            i = j;
        }
        let (mut offloads, mut recomputes, mut decisions) = (Vec::new(), Vec::new(), Vec::new());
        for (i, state) in self.states.iter().enumerate() {
            let t = TensorId(i);
            if g.tensor(t).lifetime != Lifetime::Saved {
                continue;
            }
            let (choice, reason) = match state {
                State::Keep => (
                    SavedChoice::Keep,
                    match self.opts.vram_budget {
                        None => "kept: no VRAM budget given".to_string(),
                        Some(_) => "kept: the step fits the budget without moving it".to_string(),
                    },
                ),
                State::Offload { context, .. } => {
                    let spec = self.specs[i].expect("offloaded tensors have copy nodes");
                    offloads.push(spec);
                    let timing = match &self.opts.cost {
                        Some(c) => format!(
                            "; copies of {} planned at {:.0} us out, {:.0} us in",
                            fmt_bytes(spec.bytes),
                            c.d2h_seconds(spec.bytes) * 1e6,
                            c.h2d_seconds(spec.bytes) * 1e6
                        ),
                        None => String::new(),
                    };
                    (
                        SavedChoice::Offload,
                        format!(
                            "offloaded: copied out after node {}, off the device from node {} to {}, \
                             prefetched before node {} for node {} {context}{timing}",
                            spec.d2h_after,
                            spec.device_free_from,
                            spec.prefetch_before - 1,
                            spec.prefetch_before,
                            spec.first_consumer
                        ),
                    )
                }
                State::Recompute { spec, reason, .. } => {
                    recomputes.push(*spec);
                    (SavedChoice::Recompute, reason.clone())
                }
            };
            decisions.push(Decision {
                tensor: t,
                choice,
                reason,
            });
        }
        recomputes.sort_by_key(|r| (r.before, r.tensor));
        let host_bytes = place_host(&mut offloads);
        let offloaded_bytes = offloads.iter().map(|o| o.bytes).sum();
        let classes = Lifetime::ALL
            .iter()
            .map(|&lt| {
                let ids: Vec<usize> = (0..g.tensors.len())
                    .filter(|&i| g.tensors[i].lifetime == lt)
                    .collect();
                ClassUsage {
                    lifetime: lt,
                    tensors: ids.len(),
                    total_bytes: ids.iter().map(|&i| self.bytes(TensorId(i))).sum(),
                    at_peak_bytes: segs
                        .iter()
                        .filter(|s| {
                            g.tensor(s.tensor).lifetime == lt
                                && s.start <= peak_node
                                && peak_node <= s.end
                        })
                        .map(|s| s.bytes)
                        .sum(),
                }
            })
            .collect();
        Plan {
            arena_bytes: arena,
            live_peak_bytes: live_peak,
            peak_node,
            num_nodes: g.nodes.len(),
            segments: segs,
            decisions,
            offloads,
            recomputes,
            host_bytes,
            offloaded_bytes,
            copies_by_bandwidth: self.opts.cost.is_some(),
            classes,
            budget: self.opts.vram_budget,
            tensor_labels: (0..g.tensors.len())
                .map(|i| label(g, TensorId(i)))
                .collect(),
            seg_index,
        }
    }
}

/// `name [d0, d1] dtype`.
fn label(g: &Graph, t: TensorId) -> String {
    let x = g.tensor(t);
    format!("'{}' {:?} {}", x.name, x.shape, x.dtype)
}
