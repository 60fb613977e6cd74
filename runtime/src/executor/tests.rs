//! CPU executor tests: planned runs (with and without offloads and recomputes) against an
//! unplanned interpreter that gives every tensor its own buffer.

use super::CpuExecutor;
use crate::dtype::DType;
use crate::error::RuntimeError;
use crate::gemm::GemmDesc;
use crate::graph::{CpuArgs, Graph, GraphBuilder, Lifetime, Node, NodeKind, TensorId};
use crate::planner::{plan, PlanOptions};
use crate::rng::SplitMix64;
use crate::synthetic::training_graph;

/// Runs `g` with one private buffer per tensor (kernel nodes only); returns all buffers.
fn interpret(g: &Graph, init: &[(TensorId, Vec<f32>)]) -> Vec<Vec<u8>> {
    let mut bufs: Vec<Vec<u8>> = g.tensors.iter().map(|t| vec![0u8; t.bytes()]).collect();
    for (t, v) in init {
        bufs[t.0] = bytemuck::cast_slice(v).to_vec();
    }
    for node in &g.nodes {
        let NodeKind::Kernel { cpu: Some(k), .. } = &node.kind else {
            panic!("interpreter runs CPU kernels only");
        };
        let ins: Vec<Vec<u8>> = node.inputs().iter().map(|t| bufs[t.0].clone()).collect();
        let mut outs: Vec<Vec<u8>> = node
            .writes
            .iter()
            .map(|t| std::mem::take(&mut bufs[t.0]))
            .collect();
        k.run(&mut CpuArgs {
            inputs: ins.iter().map(Vec::as_slice).collect(),
            outputs: outs.iter_mut().map(Vec::as_mut_slice).collect(),
        })
        .unwrap();
        for (t, o) in node.writes.iter().zip(outs) {
            bufs[t.0] = o;
        }
    }
    bufs
}

/// Random initial values for the whole-step tensors.
fn inputs(g: &Graph, seed: u64) -> Vec<(TensorId, Vec<f32>)> {
    let mut rng = SplitMix64::new(seed);
    (0..g.tensors.len())
        .map(TensorId)
        .filter(|&t| g.whole_step(t))
        .map(|t| {
            (
                t,
                (0..g.tensor(t).elems())
                    .map(|_| rng.symmetric_f32())
                    .collect(),
            )
        })
        .collect()
}

#[test]
fn planned_runs_match_the_unplanned_interpreter_with_offload_and_recompute() {
    let (mut offloaded, mut recomputed) = (0, 0);
    for seed in 0..100 {
        let g = training_graph(seed, 2 + seed as usize % 6, 1 << 13);
        let init = inputs(&g, seed);
        let want = interpret(&g, &init);
        let full = plan(&g, &PlanOptions::default()).unwrap();
        let modes = [PlanOptions::default(), PlanOptions::by_node_count()];
        for (frac, mode) in [1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7]
            .into_iter()
            .flat_map(|f| modes.iter().map(move |m| (f, m)))
        {
            let opts = mode
                .clone()
                .with_budget((full.arena_bytes as f64 * frac) as usize);
            let Ok(p) = plan(&g, &opts) else { continue };
            offloaded += p.offloads.len();
            recomputed += p.recomputes.len();
            let mut ex = CpuExecutor::new(&g, &p);
            for (t, v) in &init {
                ex.write(*t, v).unwrap();
            }
            ex.run_step().unwrap();
            for t in (0..g.tensors.len())
                .map(TensorId)
                .filter(|&t| g.whole_step(t))
            {
                assert_eq!(
                    ex.tensor(t).unwrap(),
                    want[t.0].as_slice(),
                    "seed {seed} frac {frac} tensor {}",
                    g.tensor(t).name
                );
            }
        }
    }
    eprintln!("offloaded {offloaded}, recomputed {recomputed}");
    assert!(
        offloaded > 10 && recomputed > 10,
        "offloaded {offloaded}, recomputed {recomputed}"
    );
}

#[test]
fn gemm_copy_and_host_callback_nodes() {
    let mut b = GraphBuilder::new();
    let x = b.tensor("x", &[3, 5], DType::F32, Lifetime::Weight);
    let w = b.tensor("w", &[4, 5], DType::F32, Lifetime::Weight);
    let bias = b.tensor("bias", &[4], DType::F32, Lifetime::Weight);
    let y = b.tensor("y", &[3, 4], DType::F32, Lifetime::Activation);
    let y2 = b.tensor("y2", &[3, 4], DType::F32, Lifetime::Activation);
    let out = b.tensor("out", &[3, 4], DType::F32, Lifetime::Weight);
    let desc = GemmDesc::new(3, 4, 5).transposed(false, true);
    b.node(Node::gemm("y = x w^T + bias", desc, x, w, y, Some(bias)));
    b.node(Node::copy("y2 = y", y, y2));
    b.node(Node::host(
        "out = 2 y2",
        &[y2],
        &[out],
        |a: &mut CpuArgs<'_>| {
            let (i, mut o) = a.split::<f32>();
            for (d, s) in o[0].iter_mut().zip(i[0]) {
                *d = 2.0 * s;
            }
            Ok(())
        },
    ));
    let g = b.build().unwrap();
    let p = plan(&g, &PlanOptions::default()).unwrap();
    let mut ex = CpuExecutor::new(&g, &p);
    let xs: Vec<f32> = (0..15).map(|i| i as f32).collect();
    let ws: Vec<f32> = (0..20).map(|i| (i % 3) as f32 - 1.0).collect();
    ex.write(x, &xs).unwrap();
    ex.write(w, &ws).unwrap();
    ex.write(bias, &[0.5f32, 1.0, 1.5, 2.0]).unwrap();
    ex.run_step().unwrap();
    let got = ex.read::<f32>(out).unwrap();
    for i in 0..3 {
        for j in 0..4 {
            let dot: f32 = (0..5).map(|k| xs[i * 5 + k] * ws[j * 5 + k]).sum();
            assert_eq!(got[i * 4 + j], 2.0 * (dot + 0.5 * (j + 1) as f32));
        }
    }
    assert!(ex.write(x, &[0f32; 3]).is_err());
}

#[test]
fn missing_cpu_kernel_is_an_error() {
    let mut b = GraphBuilder::new();
    let x = b.tensor("x", &[4], DType::F32, Lifetime::Weight);
    let y = b.tensor("y", &[4], DType::F32, Lifetime::Activation);
    b.node(Node::kernel("gpu_only", &[x], &[y]));
    let g = b.build().unwrap();
    let p = plan(&g, &PlanOptions::default()).unwrap();
    let err = CpuExecutor::new(&g, &p).run_step().unwrap_err();
    assert!(
        matches!(err, RuntimeError::Unsupported(ref m) if m.contains("gpu_only")),
        "{err}"
    );
}

/// The offload bar's graph at toy size in f32 on the CPU backend, copies timed by a cost model
/// scaled to it: the offloaded step (pool shared by the micro-batches) gives the same bytes
/// as the kept one.
#[test]
fn offload_graph_offloaded_equals_kept_on_cpu() {
    use crate::planner::CostModel;
    use crate::synthetic::{offload_bar_plans, offload_graph, OffloadGraphShape};
    let shape = OffloadGraphShape {
        layers: 6,
        micro_batches: 2,
        gemms_per_layer: 4,
        tokens: 64,
        hidden: 32,
        dtype: DType::F32,
    };
    let (g, io) = offload_graph(&shape);
    // GEMMs of 2*64*32*32 FLOP take 131 us; an 8 KiB copy takes ~2.5 of them.
    let cost = CostModel {
        gemm_flops_per_s: 1e9,
        d2h_bytes_per_s: 25e6,
        h2d_bytes_per_s: 25e6,
        ..CostModel::H200
    };
    let opts = PlanOptions {
        cost: Some(cost),
        ..PlanOptions::default()
    };
    let (kept, off) = offload_bar_plans(&g, &shape, 4, &opts).unwrap();
    assert!(off.offloads.len() >= 8, "{off}");
    assert!(off.host_bytes < off.offloaded_bytes, "{off}");
    let est = crate::offload::estimate(&g, &off, &cost);
    assert!(est.stall_s < 1e-9, "{est:?}");
    let mut rng = SplitMix64::new(5);
    let init: Vec<(TensorId, Vec<f32>)> = io
        .inputs
        .iter()
        .map(|&t| {
            let scale = if g.tensor(t).shape[0] == shape.hidden {
                0.3
            } else {
                1.0
            };
            (
                t,
                (0..g.tensor(t).elems())
                    .map(|_| rng.symmetric_f32() * scale)
                    .collect(),
            )
        })
        .collect();
    let run = |p| {
        let mut ex = CpuExecutor::new(&g, p);
        for (t, v) in &init {
            ex.write(*t, v).unwrap();
        }
        ex.run_step().unwrap();
        io.outputs
            .iter()
            .map(|&t| ex.tensor(t).unwrap().to_vec())
            .collect::<Vec<_>>()
    };
    let (a, b) = (run(&kept), run(&off));
    assert_eq!(a, b);
    assert!(a.iter().flatten().any(|&x| x != 0));
}

#[test]
fn cpu_gemm_takes_bf16_operands_as_the_gpu_does() {
    // c (f32) = a (bf16) b^T (bf16) + bias (bf16); d (bf16) = the same rounded to bf16
    let (m, n, k) = (5, 7, 9);
    let mut rng = SplitMix64::new(3);
    let mut vals = |len: usize| -> Vec<half::bf16> {
        (0..len)
            .map(|_| half::bf16::from_f32(rng.symmetric_f32()))
            .collect()
    };
    let (av, bv, biasv) = (vals(m * k), vals(n * k), vals(n));
    let mut b = GraphBuilder::new();
    let a = b.tensor("a", &[m, k], DType::BF16, Lifetime::Weight);
    let w = b.tensor("w", &[n, k], DType::BF16, Lifetime::Weight);
    let bias = b.tensor("bias", &[n], DType::BF16, Lifetime::Weight);
    let c = b.tensor("c", &[m, n], DType::F32, Lifetime::Weight);
    let d = b.tensor("d", &[m, n], DType::BF16, Lifetime::Weight);
    let desc = GemmDesc::new(m, n, k).transposed(false, true);
    b.node(Node::gemm("c", desc, a, w, c, Some(bias)));
    b.node(Node::gemm("d", desc, a, w, d, Some(bias)));
    let g = b.build().unwrap();
    let p = plan(&g, &PlanOptions::default()).unwrap();
    let mut ex = CpuExecutor::new(&g, &p);
    ex.write(a, &av).unwrap();
    ex.write(w, &bv).unwrap();
    ex.write(bias, &biasv).unwrap();
    ex.run_step().unwrap();
    let got_c: Vec<f32> = ex.read(c).unwrap();
    let got_d: Vec<half::bf16> = ex.read(d).unwrap();
    for i in 0..m {
        for j in 0..n {
            let want: f64 = biasv[j].to_f64()
                + (0..k)
                    .map(|l| av[i * k + l].to_f64() * bv[j * k + l].to_f64())
                    .sum::<f64>();
            let got = got_c[i * n + j] as f64;
            assert!((got - want).abs() < 1e-5, "c[{i}][{j}] {got} vs {want}");
            assert_eq!(got_d[i * n + j], half::bf16::from_f32(got_c[i * n + j]));
        }
    }
}

#[test]
fn phases_run_apart_and_share_activation_memory() {
    // phase A: outa = 2 (x wa^T); phase B: outb = 2 (x wb^T): whole-step inputs and outputs,
    // each phase's activation live only inside it
    let seed = crate::rng::fresh_seed();
    let mut rng = SplitMix64::new(seed);
    let mut b = GraphBuilder::new();
    let (m, n, k) = (8, 64, 16);
    let x = b.tensor("x", &[m, k], DType::F32, Lifetime::Weight);
    let phase = |b: &mut GraphBuilder, name: &str| {
        let w = b.tensor(format!("w{name}"), &[n, k], DType::F32, Lifetime::Weight);
        let act = b.tensor(
            format!("act{name}"),
            &[m, n],
            DType::F32,
            Lifetime::Activation,
        );
        let out = b.tensor(format!("out{name}"), &[m, n], DType::F32, Lifetime::Weight);
        let first = b.node_count();
        b.node(Node::gemm(
            name,
            GemmDesc::new(m, n, k).transposed(false, true),
            x,
            w,
            act,
            None,
        ));
        b.node(
            Node::kernel("double", &[act], &[out]).with_cpu(|a: &mut CpuArgs<'_>| {
                let (i, mut o) = a.split::<f32>();
                o[0].iter_mut().zip(i[0]).for_each(|(d, s)| *d = 2.0 * s);
                Ok(())
            }),
        );
        (w, act, out, first..b.node_count())
    };
    let (wa, acta, outa, nodes_a) = phase(&mut b, "a");
    let (wb, actb, outb, nodes_b) = phase(&mut b, "b");
    let g = b.build().unwrap();
    let p = plan(&g, &PlanOptions::default()).unwrap();
    assert_eq!(
        p.offset_at(acta, nodes_a.start),
        p.offset_at(actb, nodes_b.start),
        "the phases' activations share bytes"
    );
    let mut ex = CpuExecutor::new(&g, &p);
    let mut rand = |len: usize| -> Vec<f32> { (0..len).map(|_| rng.symmetric_f32()).collect() };
    let (xs, was, wbs) = (rand(m * k), rand(n * k), rand(n * k));
    for (t, v) in [(x, &xs), (wa, &was), (wb, &wbs)] {
        ex.write(t, v).unwrap();
    }
    let want = |w: &[f32]| -> Vec<f32> {
        (0..m * n)
            .map(|e| {
                2.0 * (0..k)
                    .map(|j| xs[e / n * k + j] * w[e % n * k + j])
                    .sum::<f32>()
            })
            .collect()
    };
    let close = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(x, y)| (x - y).abs() <= 1e-5);
    ex.run_nodes(nodes_b.clone()).unwrap();
    assert!(
        close(&ex.read::<f32>(outb).unwrap(), &want(&wbs)),
        "seed {seed}"
    );
    assert!(
        ex.read::<f32>(outa).unwrap().iter().all(|&v| v == 0.0),
        "phase A not run"
    );
    ex.run_nodes(nodes_a).unwrap();
    assert!(
        close(&ex.read::<f32>(outa).unwrap(), &want(&was)),
        "seed {seed}"
    );
    assert!(
        close(&ex.read::<f32>(outb).unwrap(), &want(&wbs)),
        "B's output kept"
    );
    assert!(ex.run_nodes(3..9).is_err(), "past the last node");

    // a plan with offloads runs whole steps only
    let g = training_graph(3, 6, 1 << 13);
    let full = plan(&g, &PlanOptions::default()).unwrap();
    let p = (70..100)
        .rev()
        .filter_map(|pct| {
            plan(
                &g,
                &PlanOptions::default().with_budget(full.arena_bytes * pct / 100),
            )
            .ok()
        })
        .find(|p| !p.offloads.is_empty() || !p.recomputes.is_empty())
        .expect("a budget that offloads or recomputes");
    let mut ex = CpuExecutor::new(&g, &p);
    assert!(ex.run_nodes(0..1).is_err());
    assert!(ex.run_nodes(0..p.num_nodes).is_ok());
}
