//! `ftrt selftest --model` rows for the forward graph ([`crate::llama::graph`]): one bf16 graph
//! per fixture run by the runtime's CPU executor and by its CUDA executor (each phase captured
//! once, replayed every step as a CUDA graph): a prefill step packing three prompts (the
//! logits of their last rows), then four greedy decoding steps through the graph's KV cache,
//! logits compared step by step.

use ftrt_runtime::{plan, CpuExecutor, CudaExecutor, DType, Gpu, PlanOptions, RuntimeError};
use half::bf16;

use super::selftest::{row, Row};
use crate::llama::graph::{
    capture_phases, sampling_words, write_step, ForwardGraph, Phase, StepRow,
};
use crate::llama::sampling::argmax;
use crate::llama::LlamaModel;
use ftrt_ops::selftest::rel_err;

/// Prompts of the check (the fixtures' vocabulary is 128).
const PROMPTS: [&[u32]; 3] = [
    &[1, 17, 33, 5, 99, 64, 2, 120, 45],
    &[7, 3, 88, 12, 127],
    &[42],
];
const DECODE_STEPS: usize = 4;
/// bf16 end to end, two executors rounding in different orders (the GPU's GEMMs accumulate
/// in another order than the CPU's): the single-op tolerance of the model selftest.
const TOL: f64 = 2e-2;

/// The row of `cpu` (a bf16 model of a fixture) named `name`.
pub(super) fn check_forward_graph(
    gpu: &Gpu,
    cpu: &LlamaModel,
    name: &str,
    rows: &mut Vec<Row>,
) -> Result<(), String> {
    let s = |e: RuntimeError| e.to_string();
    let slots = PROMPTS.len();
    let fg = ForwardGraph::new(cpu, 16, slots, 32, DType::BF16).map_err(|e| e.to_string())?;
    let p = plan(&fg.graph, &PlanOptions::default()).map_err(s)?;
    let mut host = CpuExecutor::new(&fg.graph, &p);
    let mut dev = CudaExecutor::new(gpu, &fg.graph, &p).map_err(s)?;
    fg.for_each_weight(cpu, None, |t, v| {
        let b: Vec<bf16> = v.iter().map(|x| bf16::from_f32(*x)).collect();
        host.write(t, &b)?;
        dev.write(t, &b)
    })
    .map_err(s)?;
    capture_phases(&fg, &mut dev)?;

    let v = cpu.dims.vocab;
    // one step of `phase` on both executors: GPU logits, CPU logits and the GPU's picks
    let mut step =
        |phase: &Phase, rows_in: &[StepRow], picks: &[usize]| -> Result<StepOut, String> {
            let words = sampling_words(0.0, 0);
            write_step(&fg, &mut host, phase, rows_in, picks, words)?;
            write_step(&fg, &mut dev, phase, rows_in, picks, words)?;
            host.run_nodes(phase.nodes.clone()).map_err(s)?;
            dev.replay_nodes(phase.nodes.clone()).map_err(s)?;
            gpu.synchronize().map_err(s)?;
            let used = picks.len() * v;
            let want: Vec<f32> = host.read(phase.logits).map_err(s)?;
            let got: Vec<f32> = dev.read(phase.logits).map_err(s)?;
            let next: Vec<i32> = dev.read(phase.next).map_err(s)?;
            Ok((got[..used].to_vec(), want[..used].to_vec(), next))
        };
    // prefill: all prompts in one step, the logits of their last rows; then one row per sequence
    let mut prefill = Vec::new();
    let mut last = Vec::new();
    for (slot, pr) in PROMPTS.iter().enumerate() {
        for (pos, &token) in pr.iter().enumerate() {
            prefill.push(StepRow { token, slot, pos });
        }
        last.push(prefill.len() - 1);
    }
    // whole prompts: the flash-attention prefill where the head dim has it
    let (phase, how) = match &fg.prefill_fresh {
        Some(fresh) => (fresh, "flash attention within the step"),
        None => (&fg.prefill, "cache attention"),
    };
    // each step: the GPU's picks against the CPU's top-1, which feeds the next step
    let (mut worst, mut agree, mut total) = (0f64, 0, 0);
    let mut out = step(phase, &prefill, &last)?;
    let mut lens: Vec<usize> = PROMPTS.iter().map(|p| p.len()).collect();
    let all: Vec<usize> = (0..slots).collect();
    for k in 0..=DECODE_STEPS {
        let (got, want, picked) = out;
        worst = worst.max(rel_err(&got, &want));
        let next = top1(&want, v);
        total += slots;
        agree += (0..slots).filter(|&i| picked[i] as u32 == next[i]).count();
        if k == DECODE_STEPS {
            break;
        }
        let rows_in: Vec<StepRow> = (0..slots)
            .map(|i| StepRow {
                token: next[i],
                slot: i,
                pos: lens[i],
            })
            .collect();
        lens.iter_mut().for_each(|l| *l += 1);
        out = step(&fg.decode, &rows_in, &all)?;
    }
    row(
        rows,
        format!("model {name}: forward graph, CUDA executor (graph replay) vs CPU executor"),
        worst,
        TOL,
        format!(
            "one bf16 graph: a prefill step packing {} tokens ({how}), {DECODE_STEPS} decode steps; the GPU graph's greedy tokens are the CPU's top-1 {agree}/{total}",
            prefill.len()
        ),
    );
    Ok(())
}

/// A step's GPU logits, CPU logits (its logit rows only) and the GPU graph's picks.
type StepOut = (Vec<f32>, Vec<f32>, Vec<i32>);

/// The top-1 token of each row of (rows, v) logits.
fn top1(logits: &[f32], v: usize) -> Vec<u32> {
    logits.chunks(v).map(|r| argmax(r) as u32).collect()
}
