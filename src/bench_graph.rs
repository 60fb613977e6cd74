//! `ftrt bench --decode --graph`: greedy generation through the model's forward graph
//! ([`ftrt_models::llama::graph`]) on the runtime's CUDA executor, each step replayed as one
//! captured CUDA graph: `--batch` prompts of `--seq` random tokens fed one position per step,
//! then `--new-tokens` decoding steps. The same random weights as `ftrt bench --decode`.
use ftrt_models::llama::gpu::random_init::host_weights;
use ftrt_models::llama::graph::{ForwardGraph, StepRow};
use ftrt_models::llama::{LlamaModel, Rounding};
use ftrt_runtime::graph::TensorId;
use ftrt_runtime::{plan, CudaExecutor, DType, Gpu, PlanOptions, RuntimeError};
use half::bf16;

use crate::bench::{preset_config, random_prompts, BenchArgs, GIB, MODEL_SEED};

pub fn run_decode_graph(a: &BenchArgs) -> Result<(), String> {
    let (b, p, n) = (a.batch, a.seq, a.new_tokens);
    if b == 0 || p == 0 || n < 2 {
        return Err("--decode needs --batch >= 1, --seq >= 1 and --new-tokens >= 2".into());
    }
    if a.temperature != 0.0 {
        return Err("--graph decodes greedily: pass --temperature 0".into());
    }
    let s = |e: RuntimeError| e.to_string();
    let t_setup = std::time::Instant::now();
    let config = preset_config(&a.preset)?;
    let gpu = Gpu::open(a.device).map_err(|e| format!("{e}\nftrt bench needs an NVIDIA GPU."))?;
    let (free0, _) = gpu.context().mem_get_info().map_err(|e| e.to_string())?;
    let (mut store, values) = host_weights(&config, MODEL_SEED, None);
    store.data = values.iter().map(|x| x.to_f32()).collect();
    drop(values);
    let model = LlamaModel::from_store(&config, store, Rounding::BF16);
    let fg = ForwardGraph::new(&model, b, b, p + n, DType::BF16).map_err(|e| e.to_string())?;
    let pl = plan(&fg.graph, &PlanOptions::default()).map_err(s)?;
    let mut ex = CudaExecutor::new(&gpu, &fg.graph, &pl).map_err(s)?;
    fg.for_each_weight(&model, None, |t, v| {
        let w: Vec<bf16> = v.iter().map(|x| bf16::from_f32(*x)).collect();
        ex.write(t, &w)
    })
    .map_err(s)?;
    drop(model);
    let write = |ex: &CudaExecutor, rows: &[StepRow]| -> Result<(), String> {
        let (ids, pos, slot, len) = fg.step_inputs(rows).map_err(|e| e.to_string())?;
        let inputs: [(TensorId, Vec<i32>); 4] =
            [(fg.ids, ids), (fg.pos, pos), (fg.slot, slot), (fg.len, len)];
        for (t, v) in inputs {
            ex.write(t, &v).map_err(s)?;
        }
        Ok(())
    };
    write(&ex, &[])?;
    ex.capture().map_err(s)?;
    let setup_s = t_setup.elapsed().as_secs_f64();
    let (free1, _) = gpu.context().mem_get_info().map_err(|e| e.to_string())?;

    let prompts = random_prompts(b, p, config.vocab_size);
    // one step: rows, replay, the greedy tokens
    let step = |rows: &[StepRow]| -> Result<Vec<i32>, String> {
        write(&ex, rows)?;
        ex.replay().map_err(s)?;
        ex.read(fg.next).map_err(s)
    };
    let t0 = std::time::Instant::now();
    let mut next = Vec::new();
    for pos in 0..p {
        let rows: Vec<StepRow> = prompts
            .iter()
            .enumerate()
            .map(|(slot, pr)| StepRow {
                token: pr[pos],
                slot,
                pos,
            })
            .collect();
        next = step(&rows)?;
    }
    let prefill_s = t0.elapsed().as_secs_f64();
    let t1 = std::time::Instant::now();
    for k in 0..n - 1 {
        let rows: Vec<StepRow> = (0..b)
            .map(|i| StepRow {
                token: next[i] as u32,
                slot: i,
                pos: p + k,
            })
            .collect();
        next = step(&rows)?;
    }
    let decode_s = t1.elapsed().as_secs_f64();
    let tok_s = (b * (n - 1)) as f64 / decode_s;
    println!(
        "ftrt bench --decode --graph {} batch {b} prompt {p} new {n} on {}: decode {tok_s:.0} tok/s, {:.2} ms per token step (one captured CUDA graph per step, greedy), prompt fed one position per step in {:.1} s, setup {setup_s:.1} s, GPU memory {:.2} GiB",
        a.preset,
        gpu.info().name,
        1e3 * decode_s / (n - 1) as f64,
        prefill_s,
        free0.saturating_sub(free1) as f64 / GIB
    );
    let json = serde_json::json!({
        "bench": "ftrt_decode_graph", "model": a.preset, "batch": b, "prompt": p, "new_tokens": n,
        "decode_tok_s": (tok_s * 10.0).round() / 10.0, "ms_per_step": 1e3 * decode_s / (n - 1) as f64,
        "setup_s": setup_s, "gpu": gpu.info().name,
    });
    println!("{json}");
    Ok(())
}
