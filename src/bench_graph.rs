//! `ftrt bench --decode --graph`: generation through the model's forward graph
//! ([`ftrt_models::llama::graph`]) on the runtime's CUDA executor, its prefill and decoding
//! phases each captured once and replayed as CUDA graphs, timed as `ftrt bench --decode`
//! (grpo_baseline.py's `gen`): `--batch` prompts of `--seq` random tokens packed into prefill
//! steps, then `--new-tokens` sampled at `--temperature` on the device. The same random
//! weights as `ftrt bench --decode`.
use ftrt_models::llama::gpu::random_init::host_weights;
use ftrt_models::llama::graph::{
    capture_phases, sampling_words, write_step, ForwardGraph, GraphSteps, StepRow,
};
use ftrt_models::llama::{generate_with, LlamaModel, Rounding, SamplingParams};
use ftrt_runtime::{plan, CudaExecutor, DType, Gpu, PlanOptions, RuntimeError};
use half::bf16;

use crate::bench::{
    preset_config, print_gen, print_profile, profile_json, random_prompts, time_generate,
    BenchArgs, MODEL_SEED,
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
    fg.for_each_weight(&model, None, |t, v| {
        ex.write(t, &par_map(v, |x| bf16::from_f32(*x)))
    })
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
    let profile = if a.profile {
        profile_phases(&gpu, &fg, &mut steps.ex, &prompts)?
    } else {
        serde_json::Value::Null
    };
    let path = format!("forward graph, prefill steps of {rows} rows, CUDA graphs replayed");
    print_gen(a, &gpu, &path, &timing, profile);
    Ok(())
}

/// GPU time per node kind of one prefill step (the prompts' first rows) and of 8 decoding
/// steps at the middle of the generated length, run eagerly over the cache the timed
/// generation left (its keys are valid up to the last position).
fn profile_phases(
    gpu: &Gpu,
    fg: &ForwardGraph,
    ex: &mut CudaExecutor<'_>,
    prompts: &[Vec<u32>],
) -> Result<serde_json::Value, String> {
    let s = |e: RuntimeError| e.to_string();
    let p = prompts[0].len();
    let prefill: Vec<StepRow> = prompts
        .iter()
        .enumerate()
        .flat_map(|(slot, pr)| {
            pr.iter()
                .enumerate()
                .map(move |(pos, &token)| StepRow { token, slot, pos })
        })
        .take(fg.prefill.rows)
        .collect();
    let last: Vec<usize> = (1..=prompts.len())
        .map(|i| (i * p).min(prefill.len()) - 1)
        .take(fg.prefill.logit_rows)
        .collect();
    let words = sampling_words(1.0, 7);
    // whole prompts: the phase generation used (flash attention where the head dim has it)
    let phase = fg.prefill_fresh.as_ref().unwrap_or(&fg.prefill);
    write_step(fg, ex, phase, &prefill, &last, words)?;
    let title = format!("GPU time of one prefill step of {} rows:", prefill.len());
    let pre = print_profile(gpu, &title, || {
        ex.run_eager_nodes(phase.nodes.clone()).map(drop).map_err(s)
    })?;
    let pos = (p + fg.capacity) / 2;
    let rows: Vec<StepRow> = (0..fg.slots)
        .map(|slot| StepRow {
            token: 3,
            slot,
            pos,
        })
        .collect();
    let all: Vec<usize> = (0..rows.len()).collect();
    write_step(fg, ex, &fg.decode, &rows, &all, words)?;
    let title = format!(
        "GPU time of 8 decoding steps of {} rows at position {pos}:",
        rows.len()
    );
    let dec = print_profile(gpu, &title, || {
        (0..8).try_for_each(|_| {
            ex.run_eager_nodes(fg.decode.nodes.clone())
                .map(drop)
                .map_err(s)
        })
    })?;
    Ok(serde_json::json!({"prefill": profile_json(&pre), "decode_8_steps": profile_json(&dec)}))
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
