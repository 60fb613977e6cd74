//! Property tests of the planner on random graphs (seeded, many seeds).

use super::*;
use crate::dtype::DType;
use crate::graph::{Graph, GraphBuilder, Node};
use crate::rng::SplitMix64;
use crate::synthetic::training_graph;

/// A random DAG: nodes read 0-3 tensors written earlier (or weights) and write 1-2 new ones
/// of random classes and log-uniform sizes (1 B to 4 MiB), sometimes read-modify-write.
fn random_dag(seed: u64) -> Graph {
    let mut rng = SplitMix64::new(seed);
    let mut b = GraphBuilder::new();
    let size = |rng: &mut SplitMix64| ((22.0 * rng.unit_f64()).exp2() as usize).max(1);
    let mut live: Vec<TensorId> = (0..rng.range(0, 4))
        .map(|i| {
            b.tensor(
                format!("w{i}"),
                &[size(&mut rng)],
                DType::U8,
                Lifetime::Weight,
            )
        })
        .collect();
    let nodes = rng.range(1, 60);
    for i in 0..nodes {
        let mut reads = Vec::new();
        for _ in 0..rng.range(0, 3.min(live.len())) {
            let t = live[rng.below(live.len())];
            if !reads.contains(&t) {
                reads.push(t);
            }
        }
        let mut writes = Vec::new();
        if !reads.is_empty() && rng.chance(0.15) {
            writes.push(reads[0]);
        }
        for j in 0..rng.range(1, 2) {
            let class = Lifetime::ALL[rng.below(Lifetime::ALL.len())];
            let t = b.tensor(format!("t{i}.{j}"), &[size(&mut rng)], DType::U8, class);
            if class == Lifetime::Saved && rng.chance(0.5) {
                b.mark_recomputable(t);
            }
            writes.push(t);
            live.push(t);
        }
        b.node(Node::kernel(format!("n{i}"), &reads, &writes));
        // Let some tensors die.
        if live.len() > 8 && rng.chance(0.5) {
            live.remove(rng.below(live.len()));
        }
    }
    b.build().unwrap()
}

fn random_graph(seed: u64) -> Graph {
    if seed & 1 == 0 {
        random_dag(seed)
    } else {
        training_graph(seed, 1 + (seed as usize / 2) % 8, 1 << 18)
    }
}

/// Checks the invariants of `p` for `g`; returns arena / live peak.
fn check_plan(g: &Graph, p: &Plan) -> f64 {
    for s in &p.segments {
        assert_eq!(s.offset % ARENA_ALIGNMENT, 0);
        assert!(s.bytes >= g.tensor(s.tensor).bytes());
        assert!(s.offset + s.bytes <= p.arena_bytes);
    }
    for (i, a) in p.segments.iter().enumerate() {
        for b in &p.segments[i + 1..] {
            let time = a.start <= b.end && b.start <= a.end;
            let space = a.offset < b.offset + b.bytes && b.offset < a.offset + a.bytes;
            assert!(
                !(time && space && a.bytes > 0 && b.bytes > 0),
                "overlap: {a:?} {b:?}"
            );
        }
    }
    // Every use finds the tensor on the device.
    for (i, node) in g.nodes.iter().enumerate() {
        for &t in node.reads.iter().chain(&node.writes) {
            assert!(
                p.offset_at(t, i).is_some(),
                "{} not on device at node {i}",
                g.tensor(t).name
            );
        }
    }
    for r in &p.recomputes {
        assert!(p.offset_at(r.tensor, r.before).is_some());
        for t in g.nodes[r.producer].inputs() {
            assert!(
                p.offset_at(t, r.before).is_some(),
                "recompute input missing"
            );
        }
    }
    let live = placement::live_profile(&p.segments, g.nodes.len());
    let max_live = live.iter().copied().max().unwrap_or(0);
    assert_eq!(max_live, p.live_peak_bytes);
    assert!(p.arena_bytes >= max_live);
    if let Some(b) = p.budget {
        assert!(p.arena_bytes <= b);
    }
    if max_live == 0 {
        1.0
    } else {
        p.arena_bytes as f64 / max_live as f64
    }
}

#[test]
fn random_graphs_never_overlap_and_stay_within_the_fragmentation_bound() {
    let mut worst = (1.0, 0);
    for seed in 0..1500 {
        let g = random_graph(seed);
        let p = plan(&g, &PlanOptions::default()).unwrap();
        let ratio = check_plan(&g, &p);
        if ratio > worst.0 {
            worst = (ratio, seed);
        }
        assert!(
            ratio <= FRAGMENTATION_BOUND,
            "seed {seed}: arena/live = {ratio:.3}\n{p}"
        );
    }
    eprintln!("worst arena / live peak: {:.3} (seed {})", worst.0, worst.1);
}

#[test]
fn plans_are_deterministic() {
    for seed in 0..60 {
        let g = random_graph(seed);
        let opts = PlanOptions::default();
        assert_eq!(plan(&g, &opts).unwrap(), plan(&g, &opts).unwrap());
        let budget = PlanOptions {
            vram_budget: Some(plan(&g, &opts).unwrap().arena_bytes * 3 / 4),
            ..opts
        };
        assert_eq!(
            format!("{:?}", plan(&g, &budget)),
            format!("{:?}", plan(&g, &budget))
        );
    }
}

/// Live peak if every saved tensor occupied the device only at the nodes that use it: no
/// budget below this can be met by moving saved tensors.
fn ideal_live_peak(g: &Graph, full: &Plan) -> usize {
    let u = liveness::uses(g);
    let mut live = vec![0usize; g.nodes.len()];
    for s in &full.segments {
        let saved = g.tensor(s.tensor).lifetime == Lifetime::Saved;
        for (t, l) in live.iter_mut().enumerate().take(s.end + 1).skip(s.start) {
            if !saved || u[s.tensor.0].iter().any(|x| x.node == t) {
                *l += s.bytes;
            }
        }
    }
    live.into_iter().max().unwrap_or(0)
}

#[test]
fn budgets_offload_or_recompute_or_fail_clearly() {
    let (mut fitted, mut moved, mut failed) = (0, 0, 0);
    for seed in 0..300 {
        let g = random_graph(seed);
        let full = plan(&g, &PlanOptions::default()).unwrap();
        let ideal = ideal_live_peak(&g, &full);
        // Budgets between the ideal and the full plan, and one below the ideal.
        let budgets =
            [0.9, 0.6, 0.3].map(|f| ideal + ((full.arena_bytes - ideal) as f64 * f) as usize);
        let modes = [PlanOptions::default(), PlanOptions::by_node_count()];
        for (budget, mode) in budgets
            .into_iter()
            .chain([ideal.saturating_sub(1)])
            .flat_map(|b| modes.iter().map(move |m| (b, m)))
        {
            let opts = mode.clone().with_budget(budget);
            match plan(&g, &opts) {
                Ok(p) => {
                    fitted += 1;
                    check_plan(&g, &p);
                    moved += p.offloads.len() + p.recomputes.len();
                    for o in &p.offloads {
                        assert!(o.d2h_after < o.device_free_from);
                        assert!(o.device_free_from < o.prefetch_before);
                        assert!(o.prefetch_before <= o.first_consumer);
                        assert_eq!(p.segments_of(o.tensor).len(), 2);
                    }
                    assert!(p.decisions.iter().all(|d| !d.reason.is_empty()));
                }
                Err(RuntimeError::DoesNotFit(msg)) => {
                    failed += 1;
                    assert!(msg.contains("largest tensors live at the peak"), "{msg}");
                }
                Err(e) => panic!("seed {seed}: {e}"),
            }
        }
    }
    eprintln!("fitted {fitted}, moved {moved} tensors off the device, failed {failed}");
    assert!(
        fitted > 500 && moved > 300 && failed >= 300,
        "fitted {fitted}, moved {moved}, failed {failed}"
    );
}

#[test]
fn report_names_classes_and_decisions() {
    let g = training_graph(3, 4, 1 << 16);
    let full = plan(&g, &PlanOptions::default()).unwrap();
    let p = plan(
        &g,
        &PlanOptions {
            vram_budget: Some(full.arena_bytes * 2 / 3),
            ..PlanOptions::default()
        },
    );
    let text = match p {
        Ok(p) => p.to_string(),
        Err(e) => e.to_string(),
    };
    assert!(
        text.contains("saved") || text.contains("does not fit"),
        "{text}"
    );
    let text = full.to_string();
    for class in [
        "weight",
        "activation",
        "saved",
        "gradient",
        "optimizer state",
        "scratch",
    ] {
        assert!(text.contains(class), "{text}");
    }
}

#[test]
fn cannot_fit_names_the_largest_tensors() {
    let mut b = GraphBuilder::new();
    let w = b.tensor("big_weight", &[1 << 20], DType::U8, Lifetime::Weight);
    let x = b.tensor("x", &[1 << 10], DType::U8, Lifetime::Activation);
    b.node(Node::kernel("k", &[w], &[x]));
    let g = b.build().unwrap();
    let err = plan(
        &g,
        &PlanOptions {
            vram_budget: Some(1 << 19),
            ..PlanOptions::default()
        },
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("big_weight") && err.contains("alone take"),
        "{err}"
    );
}

#[test]
fn offload_splits_a_saved_tensor_around_its_gap() {
    let mut b = GraphBuilder::new();
    let w = b.tensor("w", &[256], DType::U8, Lifetime::Weight);
    let s = b.tensor("s", &[1 << 20], DType::U8, Lifetime::Saved);
    b.node(Node::kernel("produce", &[w], &[s]));
    let mut prev = w;
    for i in 0..10 {
        let size = if (2..=6).contains(&i) {
            1 << 20
        } else {
            1 << 10
        };
        let a = b.tensor(format!("a{i}"), &[size], DType::U8, Lifetime::Activation);
        b.node(Node::kernel(format!("mid{i}"), &[prev], &[a]));
        prev = a;
    }
    let out = b.tensor("out", &[256], DType::U8, Lifetime::Activation);
    b.node(Node::kernel("consume", &[s, prev], &[out]));
    let g = b.build().unwrap();
    let full = plan(&g, &PlanOptions::by_node_count()).unwrap();
    assert_eq!(full.live_peak_bytes, 256 + (3 << 20));
    let p = plan(
        &g,
        &PlanOptions::by_node_count().with_budget(full.arena_bytes - 1),
    )
    .unwrap();
    let o = p.offloads[0];
    assert_eq!(
        (
            o.d2h_after,
            o.device_free_from,
            o.prefetch_before,
            o.first_consumer
        ),
        (0, 3, 9, 11)
    );
    assert_eq!(p.host_bytes, 1 << 20);
    assert!(p.offset_at(s, 5).is_none() && p.offset_at(s, 11).is_some());
}

/// A cost model with round numbers: kernels declare FLOPs at 1 TFLOP/s (100 us per 1e8),
/// memory is free, copies move 1 MiB in 250 us, no margin.
fn round_cost() -> CostModel {
    CostModel {
        gemm_flops_per_s: 1e12,
        kernel_flops_per_s: 1e12,
        mem_bytes_per_s: f64::INFINITY,
        node_overhead_s: 0.0,
        host_callback_s: 0.0,
        d2h_bytes_per_s: (1 << 20) as f64 / 250e-6,
        h2d_bytes_per_s: (1 << 20) as f64 / 250e-6,
        copy_margin: 1.0,
    }
}

#[test]
fn copies_are_timed_by_bytes_and_bandwidth() {
    use timing::{offload_specs, GapUses};
    // Nodes of 100 us each: node n starts at 100n us.
    let starts: Vec<f64> = (0..=14).map(|n| n as f64 * 100e-6).collect();
    let opts = PlanOptions {
        cost: Some(round_cost()),
        ..PlanOptions::default()
    };
    let mib = 1 << 20;
    let gap = |t, w, c| GapUses {
        tensor: TensorId(t),
        bytes: mib,
        last_write: w,
        last_use: w,
        first_consumer: c,
    };
    // One tensor: out 100..350 us -> free from node 4 (400 us); in must start by
    // 1100 - 250 = 850 us -> issued before node 8 (800 us).
    let one = offload_specs(&[gap(0, 0, 11)], &opts, &starts);
    let o = one[0].unwrap();
    assert_eq!(
        (
            o.d2h_after,
            o.device_free_from,
            o.prefetch_before,
            o.first_consumer
        ),
        (0, 4, 8, 11)
    );
    // Two back to back share each stream first-in first-out: the second copy out waits for
    // the first (350..600 us -> free from node 6); the second prefetch (consumer at 1200 us)
    // starts by 950 us (node 9), so the first must end by then: start by 700 us (node 7).
    let two = offload_specs(&[gap(0, 0, 11), gap(1, 1, 12)], &opts, &starts);
    let (a, b) = (two[0].unwrap(), two[1].unwrap());
    assert_eq!((a.device_free_from, a.prefetch_before), (4, 7));
    assert_eq!((b.device_free_from, b.prefetch_before), (6, 9));
    // Twice the bytes: 500 us each way. Out 100..600 us: free from node 6; in should start
    // by 600 us (node 6), but the tensor must leave the device for at least one node, so it
    // is issued before node 7 (the consumer will wait ~100 us: see `estimate`).
    let big = GapUses {
        bytes: 2 * mib,
        ..gap(0, 0, 11)
    };
    let o = offload_specs(&[big], &opts, &starts)[0].unwrap();
    assert_eq!((o.device_free_from, o.prefetch_before), (6, 7));
    // A gap shorter than the copy out frees nothing: refused.
    assert!(offload_specs(&[gap(0, 0, 4)], &opts, &starts)[0].is_none());
    // Without a cost model: fixed node counts.
    let o = offload_specs(&[gap(0, 0, 11)], &PlanOptions::by_node_count(), &starts)[0].unwrap();
    assert_eq!((o.device_free_from, o.prefetch_before), (3, 9));
}

#[test]
fn planner_uses_node_times_for_the_copies() {
    let mut b = GraphBuilder::new();
    let w = b.tensor("w", &[256], DType::U8, Lifetime::Weight);
    let s = b.tensor("s", &[1 << 20], DType::U8, Lifetime::Saved);
    b.node(Node::kernel("produce", &[w], &[s]).with_flops(1e8));
    let mut prev = w;
    for i in 0..10 {
        let size = if (2..=6).contains(&i) {
            1 << 20
        } else {
            1 << 10
        };
        let a = b.tensor(format!("a{i}"), &[size], DType::U8, Lifetime::Activation);
        b.node(Node::kernel(format!("mid{i}"), &[prev], &[a]).with_flops(1e8));
        prev = a;
    }
    let out = b.tensor("out", &[256], DType::U8, Lifetime::Activation);
    b.node(Node::kernel("consume", &[s, prev], &[out]).with_flops(1e8));
    let g = b.build().unwrap();
    let opts = PlanOptions {
        cost: Some(round_cost()),
        ..PlanOptions::default()
    };
    let full = plan(&g, &opts).unwrap();
    let p = plan(&g, &opts.clone().with_budget(full.arena_bytes - 1)).unwrap();
    let o = p.offloads[0];
    // Same as the hand computation above: 100 us nodes, 250 us copies.
    assert_eq!(
        (
            o.d2h_after,
            o.device_free_from,
            o.prefetch_before,
            o.first_consumer
        ),
        (0, 4, 8, 11)
    );
    assert!(
        p.decisions[0].reason.contains("planned at 250 us out"),
        "{}",
        p.decisions[0].reason
    );
    let est = crate::offload::estimate(&g, &p, &round_cost());
    assert!(est.stall_s.abs() < 1e-12, "{est:?}");
    // Node counts (free from node 3, prefetch before node 9) make the compute stream wait
    // 50 us for the copy out (ends at 350 us, node 3 starts at 300 us) and 50 us for the
    // prefetch (starts at 950 us after that stall, ends at 1200 us, consumer at 1150 us).
    let q = plan(
        &g,
        &PlanOptions::by_node_count().with_budget(full.arena_bytes - 1),
    )
    .unwrap();
    let est = crate::offload::estimate(&g, &q, &round_cost());
    assert!((est.stall_s - 100e-6).abs() < 1e-9, "{est:?}");
}

/// Random host lifetimes: regions of time-overlapping tensors never share bytes, the pool
/// is at least the largest set alive at once and at most the sum of all regions.
#[test]
fn host_pool_reuses_regions_without_overlap() {
    let mut reused = 0;
    for seed in 0..500 {
        let mut rng = SplitMix64::new(seed);
        let nodes = rng.range(2, 200);
        let mut specs: Vec<OffloadSpec> = (0..rng.range(1, 40))
            .map(|i| {
                let d2h_after = rng.below(nodes - 1);
                let first_consumer = rng.range(d2h_after + 1, nodes);
                OffloadSpec {
                    tensor: TensorId(i),
                    bytes: rng.range(1, 1 << 20),
                    host_offset: usize::MAX,
                    d2h_after,
                    device_free_from: d2h_after + 1,
                    prefetch_before: first_consumer,
                    first_consumer,
                }
            })
            .collect();
        let pool = placement::place_host(&mut specs);
        let size = |o: &OffloadSpec| align_up(o.bytes, ARENA_ALIGNMENT);
        for (i, a) in specs.iter().enumerate() {
            assert_eq!(a.host_offset % ARENA_ALIGNMENT, 0);
            assert!(a.host_offset + a.bytes <= pool);
            for b in &specs[i + 1..] {
                // Host lifetime: [d2h_after, first_consumer).
                let time = a.d2h_after < b.first_consumer && b.d2h_after < a.first_consumer;
                let space = a.host_offset < b.host_offset + size(b)
                    && b.host_offset < a.host_offset + size(a);
                assert!(!(time && space), "seed {seed}: {a:?} {b:?}");
            }
        }
        let max_live = (0..nodes)
            .map(|n| {
                specs
                    .iter()
                    .filter(|o| o.d2h_after <= n && n < o.first_consumer)
                    .map(size)
                    .sum::<usize>()
            })
            .max()
            .unwrap();
        let total: usize = specs.iter().map(size).sum();
        assert!(max_live <= pool && pool <= total, "seed {seed}");
        if pool < total {
            reused += 1;
        }
    }
    assert!(reused > 200, "{reused}");
}

/// Planned offloads in a graph of micro-batches: the second micro-batch reuses the first
/// one's host regions, and the plan's pool is smaller than the bytes offloaded.
#[test]
fn micro_batches_share_the_pinned_pool() {
    use crate::synthetic::{offload_bar_plans, offload_graph, OffloadGraphShape};
    let shape = OffloadGraphShape::SELFTEST;
    let (g, io) = offload_graph(&shape);
    let (kept, off) = offload_bar_plans(&g, &shape, 12, &PlanOptions::default()).unwrap();
    check_plan(&g, &kept);
    check_plan(&g, &off);
    assert_eq!(off.offloads.len(), 24, "{off}");
    assert_eq!(io.saved.len(), 32);
    assert_eq!(off.offloaded_bytes, 24 << 26);
    assert_eq!(off.host_bytes, 12 << 26);
    // Estimated: the copies hide entirely behind the GEMMs; fixed node counts would stall.
    let c = CostModel::H200;
    let est = crate::offload::estimate(&g, &off, &c);
    assert!(est.stall_s < 1e-9 && est.step_s > 0.1, "{est:?}");
    let (_, by_nodes) = offload_bar_plans(&g, &shape, 12, &PlanOptions::by_node_count()).unwrap();
    let est_nodes = crate::offload::estimate(&g, &by_nodes, &c);
    assert!(est_nodes.stall_s > 1e-3, "{est_nodes:?}");
}
