//! `ftrt train`: LoRA supervised fine-tuning from the command line, flags named like TRL's
//! SFTConfig and PEFT's LoraConfig, optionally from a TOML file with the same keys.
//!
//! Order of work, cheapest checks first: settings (flags over `--config` over defaults), the
//! dataset rows (a malformed line or an empty file fails here), the model's config and
//! tokenizer (no weights yet), the LoRA targets against the model's linear modules, the memory
//! estimate against this machine, tokenization and packing, and only then the weights
//! ([`build_model`]), held-out answers, training, held-out answers again.

mod data;
mod samples;
mod settings;

use std::path::PathBuf;

use clap::Args;
use ftrt_models::data::PromptRenderer;
use ftrt_models::llama::{LlamaModel, LlamaTrainable, Rounding};
use ftrt_models::lora::{linear_targets, select_targets, LoraWeights};
use ftrt_models::train::plan::gib;
use ftrt_models::train::{
    total_steps, warmup_from_ratio, LoraModel, MemoryPlan, TrainConfig, Trainer,
};
use ftrt_models::LoadedModel;
use serde::Deserialize;

/// Arguments of `ftrt train` (every one also a snake_case key of the `--config` TOML file;
/// flags override the file).
#[derive(Args, Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainArgs {
    /// TOML file with any of these settings (snake_case keys); flags override it.
    #[arg(long)]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Hugging Face model folder or .gguf file [default: SmolLM2-135M-Instruct, fetched once].
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Training data, JSON or JSONL [default: the bundled arithmetic set].
    #[arg(long)]
    pub dataset: Option<PathBuf>,
    /// Held-out data [default: the bundled eval set, or 5% of --dataset].
    #[arg(long)]
    pub eval_dataset: Option<PathBuf>,
    /// alpaca | messages | prompt-completion | text [default: detected from the first row].
    #[arg(long)]
    pub dataset_format: Option<String>,
    /// Peak learning rate [default: 2e-4].
    #[arg(long)]
    pub learning_rate: Option<f64>,
    /// linear | cosine | constant | constant_with_warmup [default: linear].
    #[arg(long)]
    pub lr_scheduler_type: Option<String>,
    /// Warmup optimizer steps (wins over --warmup-ratio).
    #[arg(long)]
    pub warmup_steps: Option<usize>,
    /// Warmup as a fraction of the optimizer steps [default: 0].
    #[arg(long)]
    pub warmup_ratio: Option<f64>,
    /// AdamW's decoupled weight decay [default: 0].
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// Sequences per micro-batch; with packing the micro-batch holds this times
    /// --max-seq-length tokens [default: 4].
    #[arg(long)]
    pub per_device_train_batch_size: Option<usize>,
    /// Micro-batches per optimizer step [default: 1].
    #[arg(long)]
    pub gradient_accumulation_steps: Option<usize>,
    /// Optimizer steps; overrides --num-train-epochs.
    #[arg(long)]
    pub max_steps: Option<usize>,
    /// Epochs over the training data [default: 1].
    #[arg(long)]
    pub num_train_epochs: Option<f64>,
    /// Longer sequences are truncated (and counted) [default: 256].
    #[arg(long)]
    pub max_seq_length: Option<usize>,
    /// Padding-free packing of several sequences per micro-batch [default: true].
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub packing: Option<bool>,
    /// LoRA rank [default: 16].
    #[arg(long)]
    pub lora_r: Option<usize>,
    /// LoRA alpha [default: 32].
    #[arg(long)]
    pub lora_alpha: Option<f64>,
    /// LoRA dropout [default: 0].
    #[arg(long)]
    pub lora_dropout: Option<f64>,
    /// Rank-stabilised LoRA (scale alpha / sqrt(r)).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub use_rslora: Option<bool>,
    /// Comma-separated module names, or all-linear [default: all-linear].
    #[arg(long)]
    #[serde(default, deserialize_with = "settings::names_as_csv")]
    pub target_modules: Option<String>,
    /// QLoRA on NF4 weights (needs the GPU path; refused on the CPU backend).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub load_in_4bit: Option<bool>,
    /// With --load-in-4bit: projections kept in bf16 ("dynamic 4-bit"), comma-separated
    /// substrings of their module paths as transformers' BitsAndBytesConfig matches them, e.g.
    /// `layers.0.mlp.down_proj,layers.31.` [default: none; embeddings, norms and lm_head are
    /// bf16 anyway].
    #[arg(long)]
    #[serde(default, deserialize_with = "settings::names_as_csv")]
    pub llm_int8_skip_modules: Option<String>,
    /// GPU memory plan: auto (keep as many layers' activations as fit the free GPU memory,
    /// recompute the others in the backward), true (recompute every layer and offload their
    /// checkpoints to host memory: the least GPU memory), false (keep everything: the
    /// fastest) [default: auto]. The CPU backend keeps everything.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    #[serde(default, deserialize_with = "settings::bool_as_word")]
    pub gradient_checkpointing: Option<String>,
    /// GPU: keep the input embedding table in pinned host memory (the batch's rows are read
    /// over PCIe), freeing vocab x hidden bf16 of GPU memory; models with untied embeddings
    /// only [default: false].
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub offload_embeddings: Option<bool>,
    /// adamw_torch | adamw_8bit [default: adamw_torch].
    #[arg(long)]
    pub optim: Option<String>,
    /// Global gradient-norm clipping; 0 turns it off [default: 1.0].
    #[arg(long)]
    pub max_grad_norm: Option<f64>,
    /// Seed of the LoRA init, the data order and dropout [default: 42].
    #[arg(long)]
    pub seed: Option<u64>,
    /// Log every N steps [default: 1].
    #[arg(long)]
    pub logging_steps: Option<usize>,
    /// Held-out loss every N steps, and at the end [default: end only].
    #[arg(long)]
    pub eval_steps: Option<usize>,
    /// Checkpoint every N steps, and at the end [default: end only].
    #[arg(long)]
    pub save_steps: Option<usize>,
    /// Where the adapter, checkpoint, metrics.jsonl and loss_curve.svg go [default: ftrt-output].
    #[arg(long)]
    pub output_dir: Option<PathBuf>,
    /// Continue from the checkpoint in --output-dir, or from the checkpoint file or folder given.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub resume: Option<String>,
    /// Held-out questions answered before and after training [default: 10].
    #[arg(long)]
    pub eval_samples: Option<usize>,
    /// No progress bar.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub no_progress: Option<bool>,
}

/// The integration point of the model backend: builds a trainable model from an opened
/// checkpoint. Device from `FTRT_DEVICE` = `cpu` | `gpu` | `auto` (default: the GPU when
/// `Gpu::open(0)` succeeds, else the CPU). The GPU model holds buffers for micro-batches of
/// `token_budget` tokens and LoRA rank `max_rank`; the optimizer stays on the host.
/// `--load-in-4bit` (QLoRA) needs the GPU: refused on the CPU backend.
fn open_device(load_in_4bit: bool) -> Result<Option<ftrt_runtime::Gpu>, String> {
    let gpu = crate::device::requested_gpu()?;
    if load_in_4bit && gpu.is_none() {
        return Err(format!("{} (no GPU here)", settings::CPU_4BIT));
    }
    Ok(gpu)
}

fn build_model(
    loaded: &LoadedModel,
    gpu: Option<ftrt_runtime::Gpu>,
    s: &settings::Settings,
) -> Result<Box<dyn LoraModel>, String> {
    let load_in_4bit = s.load_in_4bit;
    let model = LlamaModel::from_loaded(loaded, Rounding::F32).map_err(|e| e.to_string())?;
    match gpu {
        Some(gpu) => {
            eprintln!(
                "device: GPU {}{}",
                gpu.info().name,
                if load_in_4bit {
                    " (QLoRA: NF4 projection weights)"
                } else {
                    ""
                }
            );
            // One GPU per process, alive until exit.
            let gpu: &'static ftrt_runtime::Gpu = Box::leak(Box::new(gpu));
            let unmatched = s.keep_bf16.unmatched(model.dims.layers);
            if !unmatched.is_empty() {
                return Err(format!(
                    "--llm-int8-skip-modules: {} match no projection (module paths look like \
                     model.layers.0.mlp.down_proj)",
                    unmatched.join(", ")
                ));
            }
            let place = ftrt_models::llama::gpu::GpuPlacement {
                max_tokens: s.token_budget(),
                max_rank: s.lora.r,
                max_seq_len: s.max_seq_length,
                load_in_4bit: load_in_4bit.then_some(&s.keep_bf16),
                checkpointing: s.checkpointing,
                offload_embeddings: s.offload_embeddings,
            };
            let m = ftrt_models::llama::gpu::GpuTrainable::new(
                gpu,
                model,
                Some(&loaded.weights),
                &place,
            )?;
            Ok(Box::new(m))
        }
        None => {
            eprintln!("device: CPU");
            Ok(Box::new(LlamaTrainable::new(model)))
        }
    }
}

/// Runs `ftrt train`.
pub fn run(args: &TrainArgs) -> Result<(), String> {
    let merged = settings::merge(args)?;
    let mut s = settings::resolve(&merged)?;
    let gpu = open_device(s.load_in_4bit)?;
    let files = data::locate_and_check(&s)?;
    let model_path = match &s.model {
        Some(p) => p.clone(),
        None => ftrt_models::gguf::smollm2_gguf_path().map_err(|e| e.to_string())?,
    };
    let loaded = ftrt_models::open_model(&model_path).map_err(|e| e.to_string())?;
    if loaded.weights.has_bnb_4bit() {
        // A bitsandbytes 4-bit save trains as QLoRA on the GPU unless asked otherwise.
        let qlora = gpu.is_some() && merged.load_in_4bit != Some(false);
        s.load_in_4bit |= qlora;
        eprintln!(
            "{}: bitsandbytes 4-bit weights, dequantized on load{}",
            model_path.display(),
            if qlora {
                "; training QLoRA on NF4 weights (--load-in-4bit false: on bf16)"
            } else {
                ""
            }
        );
    }
    let available = linear_targets(&loaded.config);
    let targets = select_targets(&s.lora, &available)?;
    let plan = MemoryPlan::estimate(
        &loaded.config,
        &targets,
        s.lora.r,
        s.token_budget(),
        s.optim,
    );
    match ftrt_runtime::offload::available_host_memory() {
        Some(avail) => plan.check_fits(avail)?,
        None => eprintln!(
            "cannot read this machine's free memory; the run needs about {}",
            gib(plan.total())
        ),
    }
    let lora = LoraWeights::init(&s.lora, &available, s.seed)?;
    let renderer = PromptRenderer::of_model(&loaded)?;
    let (train_set, eval_set) = data::tokenize(&files, &s, &renderer)?;
    let train = data::batches(&train_set, &s, true);
    let eval = data::batches(&eval_set, &s, false);
    let steps = total_steps(train.len(), s.grad_accum, s.max_steps, s.epochs);
    let warmup = s
        .warmup_steps
        .unwrap_or_else(|| warmup_from_ratio(steps, s.warmup_ratio));
    eprintln!(
        "{}: {} LoRA weights on {} modules (r {}, alpha {}); {} training examples in {} micro-batches \
         of up to {} tokens, {} held out; {steps} steps; memory about {}",
        model_path.display(),
        lora.len(),
        lora.tensors.len(),
        s.lora.r,
        s.lora.lora_alpha,
        train_set.len(),
        train.len(),
        s.token_budget(),
        eval_set.len(),
        gib(plan.total())
    );
    let mut model = build_model(&loaded, gpu, &s)?;
    let eos = loaded.eos_token_ids.clone();
    if s.eval_samples > 0 && s.resume.is_none() {
        samples::answer_and_score(
            "before training",
            model.as_mut(),
            &lora,
            &eval_set,
            &renderer,
            &eos,
            s.eval_samples,
        )?;
    }
    let cfg = TrainConfig {
        learning_rate: s.learning_rate,
        lr_scheduler_type: s.scheduler,
        warmup_steps: warmup,
        optim: s.optim,
        adam: s.adam,
        gradient_accumulation_steps: s.grad_accum,
        max_steps: steps,
        max_grad_norm: s.max_grad_norm,
        seed: s.seed,
        logging_steps: s.logging_steps,
        eval_steps: s.eval_steps,
        save_steps: s.save_steps,
        output_dir: s.output_dir.clone(),
        progress_bar: s.progress,
        base_model_name_or_path: Some(model_path.display().to_string()),
    };
    let trainer = Trainer::new(
        model.as_mut(),
        lora,
        &train,
        &eval,
        &cfg,
        s.resume.as_deref(),
    )?;
    let summary = trainer.run()?;
    let trained = LoraWeights::load_peft(&summary.adapter_dir, &linear_targets(&loaded.config))?;
    if s.eval_samples > 0 {
        samples::answer_and_score(
            "after training",
            model.as_mut(),
            &trained,
            &eval_set,
            &renderer,
            &eos,
            s.eval_samples,
        )?;
    }
    println!(
        "adapter saved in {} (adapter_model.safetensors + adapter_config.json); metrics.jsonl and \
         loss_curve.svg beside it",
        summary.adapter_dir.display()
    );
    println!(
        "merged into the model for llama.cpp or transformers: ftrt export --adapter {}",
        summary.adapter_dir.display()
    );
    Ok(())
}
