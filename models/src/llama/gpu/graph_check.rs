//! `ftrt selftest --model` rows for the forward graph ([`crate::llama::graph`]): one bf16 graph
//! per fixture run by the runtime's CPU executor and by its CUDA executor (captured once,
//! replayed every step as a CUDA graph): a packed prefill of three prompts, then four greedy
//! decoding steps through the graph's KV cache, logits compared step by step.

use ftrt_runtime::{plan, CpuExecutor, CudaExecutor, DType, Gpu, PlanOptions, RuntimeError};
use half::bf16;

use super::selftest::{row, Row};
use crate::llama::graph::{ForwardGraph, StepRow};
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
    // capture runs one eager step first: padding rows only (they touch the spare slot)
    write_inputs(&fg, &[], |t, v| dev.write(t, v))?;
    dev.capture().map_err(s)?;

    let mut step = |rows_in: &[StepRow]| -> Result<StepOut, String> {
        write_inputs(&fg, rows_in, |t, v| host.write(t, v))?;
        write_inputs(&fg, rows_in, |t, v| dev.write(t, v))?;
        host.run_step().map_err(s)?;
        dev.replay().map_err(s)?;
        gpu.synchronize().map_err(s)?;
        let used = rows_in.len() * cpu.dims.vocab;
        let want: Vec<f32> = host.read(fg.logits).map_err(s)?;
        let got: Vec<f32> = dev.read(fg.logits).map_err(s)?;
        let next: Vec<i32> = dev.read(fg.next).map_err(s)?;
        Ok((got[..used].to_vec(), want[..used].to_vec(), next))
    };
    let v = cpu.dims.vocab;
    // prefill: all prompts in one step; then one row per sequence
    let mut prefill = Vec::new();
    let mut last = Vec::new();
    for (slot, pr) in PROMPTS.iter().enumerate() {
        for (pos, &token) in pr.iter().enumerate() {
            prefill.push(StepRow { token, slot, pos });
        }
        last.push(prefill.len() - 1);
    }
    let (got, want, _) = step(&prefill)?;
    let (mut worst, mut agree, mut total) = (rel_err(&got, &want), 0, 0);
    let mut next: Vec<u32> = last
        .iter()
        .map(|&r| argmax(&want[r * v..(r + 1) * v]) as u32)
        .collect();
    let mut lens: Vec<usize> = PROMPTS.iter().map(|p| p.len()).collect();
    for _ in 0..DECODE_STEPS {
        let rows_in: Vec<StepRow> = (0..slots)
            .map(|i| StepRow {
                token: next[i],
                slot: i,
                pos: lens[i],
            })
            .collect();
        let (got, want, picked) = step(&rows_in)?;
        worst = worst.max(rel_err(&got, &want));
        for i in 0..slots {
            let w = &want[i * v..(i + 1) * v];
            total += 1;
            agree += usize::from(picked[i] as usize == argmax(w));
            next[i] = argmax(w) as u32;
            lens[i] += 1;
        }
    }
    row(
        rows,
        format!("model {name}: forward graph, CUDA executor (graph replay) vs CPU executor"),
        worst,
        TOL,
        format!(
            "one bf16 graph: packed prefill of {} tokens + {DECODE_STEPS} decode steps; the GPU graph's greedy tokens are the CPU's top-1 {agree}/{total}",
            prefill.len()
        ),
    );
    Ok(())
}

/// A step's GPU logits, CPU logits (its rows only) and the GPU graph's greedy tokens.
type StepOut = (Vec<f32>, Vec<f32>, Vec<i32>);

/// Writes a step's padded inputs through `write`.
fn write_inputs(
    fg: &ForwardGraph,
    rows: &[StepRow],
    mut write: impl FnMut(ftrt_runtime::graph::TensorId, &[i32]) -> Result<(), RuntimeError>,
) -> Result<(), String> {
    let (ids, pos, slot, len) = fg.step_inputs(rows).map_err(|e| e.to_string())?;
    for (t, v) in [(fg.ids, ids), (fg.pos, pos), (fg.slot, slot), (fg.len, len)] {
        write(t, &v).map_err(|e| e.to_string())?;
    }
    Ok(())
}
