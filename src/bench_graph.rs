//! `ftrt bench --decode --graph`: generation through the model's forward graph
//! ([`ftrt_models::llama::graph`]) on the runtime's CUDA executor, its prefill and decoding
//! phases each captured once and replayed as CUDA graphs, timed as `ftrt bench --decode`
//! (grpo_baseline.py's `gen`): `--batch` prompts of `--seq` random tokens packed into prefill
//! steps, then `--new-tokens` sampled at `--temperature` on the device. The same random
//! weights as `ftrt bench --decode`.
use ftrt_models::llama::gpu::random_init::host_weights;
use ftrt_models::llama::graph::{capture_phases, ForwardGraph, GraphSteps};
use ftrt_models::llama::{generate_with, LlamaModel, Rounding, SamplingParams};
use ftrt_runtime::{plan, CudaExecutor, DType, Gpu, PlanOptions, RuntimeError};
use half::bf16;

use crate::bench::{
    preset_config, print_gen, random_prompts, time_generate, BenchArgs, MODEL_SEED,
};

/// Prompt tokens per prefill step at most.
const MAX_PREFILL_ROWS: usize = 16384;

pub fn run_decode_graph(a: &BenchArgs) -> Result<(), String> {
    let (b, p, n) = (a.batch, a.seq, a.new_tokens);
    if b == 0 || p == 0 || n < 2 {
        return Err("--decode needs --batch >= 1, --seq >= 1 and --new-tokens >= 2".into());
    }
    let s = |e: RuntimeError| e.to_string();
    let t_setup = std::time::Instant::now();
    let config = preset_config(&a.preset)?;
    let gpu = Gpu::open(a.device).map_err(|e| format!("{e}\nftrt bench needs an NVIDIA GPU."))?;
    let (free0, _) = gpu.context().mem_get_info().map_err(|e| e.to_string())?;
    let (mut store, values) = host_weights(&config, MODEL_SEED, None);
    store.data = par_map(&values, |x| x.to_f32());
    drop(values);
    let model = LlamaModel::from_store(&config, store, Rounding::BF16);
    let rows = (b * p).min(MAX_PREFILL_ROWS);
    let fg = ForwardGraph::new(&model, rows, b, p + n, DType::BF16).map_err(|e| e.to_string())?;
    let pl = plan(&fg.graph, &PlanOptions::default()).map_err(s)?;
    let mut ex = CudaExecutor::new(&gpu, &fg.graph, &pl).map_err(s)?;
    fg.for_each_weight(&model, None, |t, v| ex.write(t, &par_map(v, |x| bf16::from_f32(*x))))
    .map_err(s)?;
    drop(model);
    capture_phases(&fg, &mut ex)?;
    let setup_s = t_setup.elapsed().as_secs_f64();

    let prompts = random_prompts(b, p, config.vocab_size);
    let params = SamplingParams {
        temperature: a.temperature,
        top_p: 1.0,
        top_k: 0,
        seed: 0,
    };
    let mut steps = GraphSteps::new(&fg, ex);
    let timing = time_generate(&gpu, free0, setup_s, n, |new| {
        generate_with(&mut steps, &prompts, new, &[], params)
    })?;
    let path = format!("forward graph, prefill steps of {rows} rows, CUDA graphs replayed");
    print_gen(a, &gpu, &path, &timing, serde_json::Value::Null);
    Ok(())
}

/// `f` over `src` on every core (the 8B model's 8e9 weights are converted twice in setup).
fn par_map<A: Sync, B: Send + Copy + Default>(src: &[A], f: impl Fn(&A) -> B + Sync) -> Vec<B> {
    let mut out = vec![B::default(); src.len()];
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let chunk = src.len().div_ceil(threads).max(1 << 16);
    std::thread::scope(|sc| {
        for (o, i) in out.chunks_mut(chunk).zip(src.chunks(chunk)) {
            let f = &f;
            sc.spawn(move || o.iter_mut().zip(i).for_each(|(d, x)| *d = f(x)));
        }
    });
    out
}
