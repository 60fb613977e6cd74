//! The offload schedule: order of actions, and a happens-before check (vector clocks over the
//! compute and two copy streams) that no two accesses to overlapping memory race.

use super::*;
use crate::graph::Graph;
use crate::planner::{plan, PlanOptions};
use crate::synthetic::training_graph;

/// Plans of synthetic graphs under budgets that force offloads.
fn offloading_plans() -> Vec<(Graph, Plan)> {
    let mut out = Vec::new();
    for seed in 0..200 {
        let g = training_graph(seed, 2 + seed as usize % 6, 1 << 16);
        let full = plan(&g, &PlanOptions::default()).unwrap();
        let modes = [PlanOptions::default(), PlanOptions::by_node_count()];
        for (frac, mode) in [0.95, 0.85, 0.75]
            .into_iter()
            .flat_map(|f| modes.iter().map(move |m| (f, m)))
        {
            let opts = mode
                .clone()
                .with_budget((full.arena_bytes as f64 * frac) as usize);
            if let Ok(p) = plan(&g, &opts) {
                if !p.offloads.is_empty() {
                    out.push((g.clone(), p));
                }
            }
        }
    }
    // The offload bar's graph at toy size, copies timed by a cost model scaled to it
    // (micro-batches share host regions, so the host side of the race check matters).
    for (layers, gl) in [(3, 3), (6, 4), (8, 5)] {
        let shape = crate::synthetic::OffloadGraphShape {
            layers,
            micro_batches: 2,
            gemms_per_layer: gl,
            tokens: 64,
            hidden: 32,
            dtype: crate::dtype::DType::F32,
        };
        let (g, _) = crate::synthetic::offload_graph(&shape);
        let opts = PlanOptions {
            cost: Some(crate::planner::CostModel {
                gemm_flops_per_s: 1e9,
                d2h_bytes_per_s: 25e6,
                h2d_bytes_per_s: 25e6,
                ..crate::planner::CostModel::H200
            }),
            ..PlanOptions::default()
        };
        for force in 1..layers {
            let (_, p) = crate::synthetic::offload_bar_plans(&g, &shape, force, &opts).unwrap();
            assert!(!p.offloads.is_empty());
            out.push((g.clone(), p));
        }
    }
    out
}

#[derive(Debug, Clone, Copy)]
struct Access {
    stream: usize,
    clock: [u64; 3],
    lo: usize,
    hi: usize,
    write: bool,
}

/// Host pool offsets are shifted into a separate address range.
const HOST: usize = 1 << 60;

/// Simulates the schedule in issue order and returns every memory access with its clock.
fn accesses(g: &Graph, p: &Plan, s: &OffloadSchedule) -> Vec<Access> {
    let mut clocks = [[0u64; 3]; 3];
    let mut events: Vec<Option<[u64; 3]>> = vec![None; s.num_events];
    let mut out = Vec::new();
    let tick = |clocks: &mut [[u64; 3]; 3], st: usize| {
        clocks[st][st] += 1;
        clocks[st]
    };
    let stream_of = |c: CopyStream| match c {
        CopyStream::DeviceToHost => 1,
        CopyStream::HostToDevice => 2,
    };
    let mut run_actions = |acts: &[Action], clocks: &mut [[u64; 3]; 3], out: &mut Vec<Access>| {
        for a in acts {
            match *a {
                Action::RecordCompute(e) => events[e.0] = Some(clocks[0]),
                Action::RecordCopy(c, e) => events[e.0] = Some(clocks[stream_of(c)]),
                Action::ComputeWaits(e) | Action::CopyWaits(_, e) => {
                    let st = if let Action::CopyWaits(c, _) = a {
                        stream_of(*c)
                    } else {
                        0
                    };
                    let ev = events[e.0].expect("waited event was recorded earlier");
                    for i in 0..3 {
                        clocks[st][i] = clocks[st][i].max(ev[i]);
                    }
                }
                Action::CopyToHost {
                    device,
                    host,
                    bytes,
                    ..
                } => {
                    let clock = tick(clocks, 1);
                    out.push(Access {
                        stream: 1,
                        clock,
                        lo: device,
                        hi: device + bytes,
                        write: false,
                    });
                    out.push(Access {
                        stream: 1,
                        clock,
                        lo: HOST + host,
                        hi: HOST + host + bytes,
                        write: true,
                    });
                }
                Action::CopyToDevice {
                    device,
                    host,
                    bytes,
                    ..
                } => {
                    let clock = tick(clocks, 2);
                    out.push(Access {
                        stream: 2,
                        clock,
                        lo: device,
                        hi: device + bytes,
                        write: true,
                    });
                    out.push(Access {
                        stream: 2,
                        clock,
                        lo: HOST + host,
                        hi: HOST + host + bytes,
                        write: false,
                    });
                }
            }
        }
    };
    let compute = |node: usize, n: usize, clocks: &mut [[u64; 3]; 3], out: &mut Vec<Access>| {
        let clock = tick(clocks, 0);
        let nd = &g.nodes[node];
        for (t, write) in nd
            .inputs()
            .into_iter()
            .map(|t| (t, false))
            .chain(nd.writes.iter().map(|&t| (t, true)))
        {
            let off = p.offset_at(t, n).expect("tensor on device when used");
            out.push(Access {
                stream: 0,
                clock,
                lo: off,
                hi: off + g.tensor(t).bytes(),
                write,
            });
        }
    };
    for n in 0..p.num_nodes {
        run_actions(&s.before[n], &mut clocks, &mut out);
        for r in p.recomputes.iter().filter(|r| r.before == n) {
            compute(r.producer, n, &mut clocks, &mut out);
        }
        compute(n, n, &mut clocks, &mut out);
        run_actions(&s.after[n], &mut clocks, &mut out);
    }
    out
}

fn happens_before(a: &Access, b: &Access) -> bool {
    a.clock[a.stream] <= b.clock[a.stream]
}

#[test]
fn no_access_races_with_a_copy() {
    let plans = offloading_plans();
    assert!(plans.len() > 20, "only {} plans offload", plans.len());
    let mut checked = 0;
    for (g, p) in &plans {
        let s = schedule(p);
        let acc = accesses(g, p, &s);
        for (i, a) in acc.iter().enumerate() {
            for b in &acc[i + 1..] {
                let overlap = a.lo < b.hi && b.lo < a.hi;
                if overlap && (a.write || b.write) && a.stream != b.stream {
                    checked += 1;
                    assert!(
                        happens_before(a, b) || happens_before(b, a),
                        "race: {a:?} vs {b:?}"
                    );
                }
            }
        }
    }
    assert!(checked > 100, "{checked}");
}

#[test]
fn copies_follow_the_producer_and_precede_the_consumer() {
    for (_, p) in offloading_plans() {
        let s = schedule(&p);
        assert_eq!(s.num_events, 4 * p.offloads.len());
        for (k, o) in p.offloads.iter().enumerate() {
            let after = &s.after[o.d2h_after];
            let pos = after
                .iter()
                .position(|a| *a == Action::RecordCompute(EventId(4 * k)))
                .unwrap();
            assert_eq!(
                after[pos + 1],
                Action::CopyWaits(CopyStream::DeviceToHost, EventId(4 * k))
            );
            assert!(
                matches!(after[pos + 2], Action::CopyToHost { tensor, .. } if tensor == o.tensor)
            );
            assert!(
                s.before[o.device_free_from].contains(&Action::ComputeWaits(EventId(4 * k + 1)))
            );
            assert!(s.before[o.prefetch_before]
                .iter()
                .any(|a| matches!(a, Action::CopyToDevice { tensor, .. } if *tensor == o.tensor)));
            let waits = &s.before[o.first_consumer];
            let w = waits
                .iter()
                .position(|a| *a == Action::ComputeWaits(EventId(4 * k + 3)))
                .unwrap();
            // The consumer's wait comes after every prefetch issued at the same node.
            assert!(waits[w..]
                .iter()
                .all(|a| !matches!(a, Action::CopyToDevice { .. })));
        }
    }
}
