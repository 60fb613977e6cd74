//! `ftrt generate --graph`: generation through the model's forward graph
//! ([`ftrt_models::llama::graph`]) on the runtime's CPU executor (f32) or, with a GPU, its CUDA
//! executor (bf16, the prefill and decoding steps captured once and replayed), with
//! `ftrt generate`'s sampler.
use ftrt_models::llama::graph::{capture_phases, ForwardGraph, GraphSteps};
use ftrt_runtime::{plan, CpuExecutor, CudaExecutor, DType, Gpu, PlanOptions};
use half::bf16;

use crate::generate::{timing_line, Generation};

/// Prompt tokens per prefill step at most (longer prompts take several steps).
const MAX_PREFILL_ROWS: usize = 4096;

/// The new tokens of each prompt and the timing line.
pub fn generate(gpu: Option<&Gpu>, job: &Generation) -> Result<(Vec<Vec<u32>>, String), String> {
    let s = |e: ftrt_runtime::RuntimeError| e.to_string();
    let (model, adapter, ids) = (job.model, job.adapter, job.ids);
    let capacity = job.capacity();
    let prompt_tokens: usize = ids.iter().map(Vec::len).sum();
    let rows = prompt_tokens.clamp(1, MAX_PREFILL_ROWS);
    let dtype = if gpu.is_some() {
        DType::BF16
    } else {
        DType::F32
    };
    let fg =
        ForwardGraph::new(model, rows, ids.len(), capacity, dtype).map_err(|e| e.to_string())?;
    let p = plan(&fg.graph, &PlanOptions::default()).map_err(s)?;
    // (new tokens, seconds generating, the device): the executor's arena and weights first
    let (out, secs, device) = match gpu {
        None => {
            let mut ex = CpuExecutor::new(&fg.graph, &p);
            fg.for_each_weight(model, adapter, |t, v| ex.write(t, v))
                .map_err(s)?;
            let (out, secs) = job.sample(&mut GraphSteps::new(&fg, ex))?;
            (out, secs, "CPU f32, forward graph".to_string())
        }
        Some(gpu) => {
            let mut ex = CudaExecutor::new(gpu, &fg.graph, &p).map_err(s)?;
            fg.for_each_weight(model, adapter, |t, v| {
                let w: Vec<bf16> = v.iter().map(|x| bf16::from_f32(*x)).collect();
                ex.write(t, &w)
            })
            .map_err(s)?;
            capture_phases(&fg, &mut ex)?;
            let (out, secs) = job.sample(&mut GraphSteps::new(&fg, ex))?;
            let device = format!(
                "GPU {} bf16, forward graph replayed as a CUDA graph",
                gpu.info().name
            );
            (out, secs, device)
        }
    };
    let timing = timing_line(&out, secs, &device);
    Ok((out, timing))
}
