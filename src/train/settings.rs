//! `ftrt train`'s settings: command-line flags over an optional TOML file (same keys, snake_case)
//! over defaults, resolved and checked before anything heavy is loaded.

use std::path::{Path, PathBuf};

use ftrt_models::data::DatasetFormat;
use ftrt_models::llama::gpu::{Checkpointing, KeepBf16};
use ftrt_models::lora::LoraConfig;
use ftrt_models::train::{AdamHyper, OptimKind, SchedulerKind};
use serde::Deserialize;

use super::TrainArgs;

/// `target_modules` in TOML: `"q_proj,v_proj"` or `["q_proj", "v_proj"]`.
#[derive(Deserialize)]
#[serde(untagged)]
enum Names {
    One(String),
    Many(Vec<String>),
}

/// Reads `target_modules` from TOML as a comma-separated string.
pub fn names_as_csv<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Ok(Option::<Names>::deserialize(d)?.map(|n| match n {
        Names::One(s) => s,
        Names::Many(v) => v.join(","),
    }))
}

/// `gradient_checkpointing` in TOML: `true` / `false` (TRL's bool) or `"auto"`.
#[derive(Deserialize)]
#[serde(untagged)]
enum BoolOrWord {
    Bool(bool),
    Word(String),
}

/// Reads `gradient_checkpointing` from TOML as the flag's word.
pub fn bool_as_word<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Ok(Option::<BoolOrWord>::deserialize(d)?.map(|v| match v {
        BoolOrWord::Bool(b) => b.to_string(),
        BoolOrWord::Word(w) => w,
    }))
}

/// Flags win over the file: every field left unset on the command line takes the file's value.
macro_rules! overlay {
    ($flags:expr, $file:expr, $($f:ident),*) => {
        TrainArgs { config: $flags.config.clone(), $($f: $flags.$f.clone().or($file.$f),)* }
    };
}

/// The flags overlaid on `--config FILE` when given.
pub fn merge(flags: &TrainArgs) -> Result<TrainArgs, String> {
    let Some(path) = &flags.config else {
        return Ok(flags.clone());
    };
    let file = read_config_file(path)?;
    Ok(overlay!(
        flags,
        file,
        model,
        dataset,
        eval_dataset,
        dataset_format,
        learning_rate,
        lr_scheduler_type,
        warmup_steps,
        warmup_ratio,
        weight_decay,
        per_device_train_batch_size,
        gradient_accumulation_steps,
        max_steps,
        num_train_epochs,
        max_seq_length,
        packing,
        lora_r,
        lora_alpha,
        lora_dropout,
        use_rslora,
        target_modules,
        load_in_4bit,
        llm_int8_skip_modules,
        gradient_checkpointing,
        offload_embeddings,
        optim,
        max_grad_norm,
        seed,
        logging_steps,
        eval_steps,
        save_steps,
        output_dir,
        resume,
        eval_samples,
        no_progress
    ))
}

/// Parses a TOML config file; unknown keys are errors (a typo must not be silently ignored).
pub fn read_config_file(path: &Path) -> Result<TrainArgs, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("{}: cannot read the config file: {e}", path.display()))?;
    let mut args: TrainArgs =
        toml::from_str(&text).map_err(|e| format!("{}: invalid config: {e}", path.display()))?;
    // Relative paths in the file are relative to the file.
    let base = path.parent().unwrap_or(Path::new(""));
    for p in [
        &mut args.model,
        &mut args.dataset,
        &mut args.eval_dataset,
        &mut args.output_dir,
    ] {
        if let Some(v) = p.as_mut().filter(|v| v.is_relative()) {
            *v = base.join(&*v);
        }
    }
    Ok(args)
}

/// Everything `ftrt train` runs with, resolved.
#[derive(Debug, Clone)]
pub struct Settings {
    /// `--model`, or None for the default SmolLM2-135M-Instruct GGUF.
    pub model: Option<PathBuf>,
    /// `--dataset`, or None for the bundled arithmetic set.
    pub dataset: Option<PathBuf>,
    /// `--eval-dataset`.
    pub eval_dataset: Option<PathBuf>,
    /// `--dataset-format`, None = detect.
    pub dataset_format: Option<DatasetFormat>,
    /// The adapter.
    pub lora: LoraConfig,
    /// Peak learning rate.
    pub learning_rate: f64,
    /// Schedule.
    pub scheduler: SchedulerKind,
    /// Warmup: steps, or a ratio of the total.
    pub warmup_steps: Option<usize>,
    /// Warmup ratio (used when warmup_steps is not given).
    pub warmup_ratio: f64,
    /// Optimizer and its hyperparameters.
    pub optim: OptimKind,
    /// AdamW's decay, betas, eps.
    pub adam: AdamHyper,
    /// Sequences per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// Optimizer steps (0 = from epochs).
    pub max_steps: usize,
    /// Epochs (when max_steps is 0).
    pub epochs: f64,
    /// Longest sequence.
    pub max_seq_length: usize,
    /// Padding-free packing of several sequences per micro-batch.
    pub packing: bool,
    /// Gradient clipping.
    pub max_grad_norm: f32,
    /// Seed.
    pub seed: u64,
    /// Intervals.
    pub logging_steps: usize,
    /// Evaluation interval (0 = at the end only).
    pub eval_steps: usize,
    /// Checkpoint interval (0 = at the end only).
    pub save_steps: usize,
    /// Output folder.
    pub output_dir: PathBuf,
    /// Checkpoint to resume from.
    pub resume: Option<PathBuf>,
    /// Held-out questions answered before and after training.
    pub eval_samples: usize,
    /// Show the progress bar.
    pub progress: bool,
    /// QLoRA: NF4 projection weights on the GPU model.
    pub load_in_4bit: bool,
    /// The GPU model's keep / recompute / offload choice.
    pub checkpointing: Checkpointing,
    /// Projections the 4-bit mode keeps in bf16.
    pub keep_bf16: KeepBf16,
    /// The GPU model's input embedding table in pinned host memory.
    pub offload_embeddings: bool,
}

impl Settings {
    /// Tokens per micro-batch: `per_device_train_batch_size * max_seq_length`.
    pub fn token_budget(&self) -> usize {
        self.batch_size * self.max_seq_length
    }
}

fn positive(name: &str, v: usize) -> Result<usize, String> {
    if v == 0 {
        Err(format!("--{name} must be at least 1"))
    } else {
        Ok(v)
    }
}

/// The refusal of `--load-in-4bit` without a GPU.
pub const CPU_4BIT: &str = "--load-in-4bit (QLoRA on NF4 weights) needs the GPU training path \
    (FTRT_DEVICE=gpu, or auto on a machine with a GPU); the CPU backend trains LoRA on f32 \
    weights: drop --load-in-4bit";

/// Resolves merged arguments against the defaults and checks them (no file is read).
pub fn resolve(a: &TrainArgs) -> Result<Settings, String> {
    let load_in_4bit = a.load_in_4bit.unwrap_or(false);
    if load_in_4bit && std::env::var("FTRT_DEVICE").is_ok_and(|d| d == "cpu") {
        return Err(CPU_4BIT.to_owned());
    }
    let lora = LoraConfig {
        r: positive("lora-r", a.lora_r.unwrap_or(16))?,
        lora_alpha: a.lora_alpha.unwrap_or(32.0),
        target_modules: a
            .target_modules
            .as_deref()
            .unwrap_or("all-linear")
            .split(',')
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .collect(),
        lora_dropout: a.lora_dropout.unwrap_or(0.0),
        use_rslora: a.use_rslora.unwrap_or(false),
        bias: "none".to_owned(),
    };
    lora.validate()?;
    let dataset_format = a
        .dataset_format
        .as_deref()
        .map(|f| f.parse::<DatasetFormat>().map_err(|e| e.to_string()))
        .transpose()?;
    let warmup_ratio = a.warmup_ratio.unwrap_or(0.0);
    if !(0.0..=1.0).contains(&warmup_ratio) {
        return Err(format!("--warmup-ratio {warmup_ratio} must be in [0, 1]"));
    }
    let epochs = a.num_train_epochs.unwrap_or(1.0);
    if !(epochs.is_finite() && epochs > 0.0) {
        return Err(format!("--num-train-epochs {epochs} must be positive"));
    }
    let output_dir = a
        .output_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from("ftrt-output"));
    let resume = match a.resume.as_deref() {
        None | Some("false") => None,
        Some("true") | Some("") => Some(output_dir.clone()),
        Some(path) => Some(PathBuf::from(path)),
    };
    let s = Settings {
        model: a.model.clone(),
        dataset: a.dataset.clone(),
        eval_dataset: a.eval_dataset.clone(),
        dataset_format,
        lora,
        learning_rate: a.learning_rate.unwrap_or(2e-4),
        scheduler: a.lr_scheduler_type.as_deref().unwrap_or("linear").parse()?,
        warmup_steps: a.warmup_steps,
        warmup_ratio,
        optim: a.optim.as_deref().unwrap_or("adamw_torch").parse()?,
        adam: AdamHyper {
            weight_decay: a.weight_decay.unwrap_or(0.0) as f32,
            ..AdamHyper::default()
        },
        batch_size: positive(
            "per-device-train-batch-size",
            a.per_device_train_batch_size.unwrap_or(4),
        )?,
        grad_accum: positive(
            "gradient-accumulation-steps",
            a.gradient_accumulation_steps.unwrap_or(1),
        )?,
        max_steps: a.max_steps.unwrap_or(0),
        epochs,
        max_seq_length: positive("max-seq-length", a.max_seq_length.unwrap_or(256))?,
        packing: a.packing.unwrap_or(true),
        max_grad_norm: a.max_grad_norm.unwrap_or(1.0) as f32,
        seed: a.seed.unwrap_or(42),
        logging_steps: a.logging_steps.unwrap_or(1),
        eval_steps: a.eval_steps.unwrap_or(0),
        save_steps: a.save_steps.unwrap_or(0),
        output_dir,
        resume,
        eval_samples: a.eval_samples.unwrap_or(10),
        progress: !a.no_progress.unwrap_or(false),
        load_in_4bit,
        keep_bf16: KeepBf16::parse(a.llm_int8_skip_modules.as_deref().unwrap_or("")),
        offload_embeddings: a.offload_embeddings.unwrap_or(false),
        checkpointing: match a.gradient_checkpointing.as_deref().unwrap_or("auto") {
            "auto" => Checkpointing::Auto,
            "true" => Checkpointing::Lean,
            "false" => Checkpointing::KeepAll,
            other => {
                return Err(format!(
                    "--gradient-checkpointing {other:?}: auto, true or false"
                ))
            }
        },
    };
    if !(s.learning_rate.is_finite() && s.learning_rate >= 0.0) {
        return Err(format!("--learning-rate {} must be >= 0", s.learning_rate));
    }
    if !(s.max_grad_norm.is_finite() && s.max_grad_norm >= 0.0) {
        return Err(format!("--max-grad-norm {} must be >= 0", s.max_grad_norm));
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checkpointing_of(toml_text: &str) -> Result<Checkpointing, String> {
        let args: TrainArgs = toml::from_str(toml_text).map_err(|e| e.to_string())?;
        resolve(&args).map(|s| s.checkpointing)
    }

    #[test]
    fn gradient_checkpointing_takes_trl_bools_and_auto() {
        assert_eq!(checkpointing_of(""), Ok(Checkpointing::Auto));
        assert_eq!(
            checkpointing_of("gradient_checkpointing = true"),
            Ok(Checkpointing::Lean)
        );
        assert_eq!(
            checkpointing_of("gradient_checkpointing = false"),
            Ok(Checkpointing::KeepAll)
        );
        assert_eq!(
            checkpointing_of("gradient_checkpointing = \"auto\""),
            Ok(Checkpointing::Auto)
        );
        let err = checkpointing_of("gradient_checkpointing = \"sometimes\"").unwrap_err();
        assert!(err.contains("auto, true or false"), "{err}");
    }

    #[test]
    fn skip_modules_take_a_list_or_a_string() {
        let keep = |text: &str| {
            let args: TrainArgs = toml::from_str(text).unwrap();
            resolve(&args).unwrap().keep_bf16.0
        };
        assert!(keep("").is_empty());
        assert_eq!(
            keep("llm_int8_skip_modules = [\"layers.0.mlp.down_proj\", \"layers.1.\"]"),
            ["layers.0.mlp.down_proj", "layers.1."]
        );
        assert_eq!(keep("llm_int8_skip_modules = \"a, b\""), ["a", "b"]);
    }

    #[test]
    fn offload_embeddings_from_the_file_or_the_flag() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            train: TrainArgs,
        }
        let of_toml = |text: &str| {
            let args: TrainArgs = toml::from_str(text).unwrap();
            resolve(&args).unwrap().offload_embeddings
        };
        assert!(!of_toml(""));
        assert!(of_toml("offload_embeddings = true"));
        let of_flags = |flags: &[&str]| {
            let cli = Cli::parse_from(std::iter::once("train").chain(flags.iter().copied()));
            resolve(&merge(&cli.train).unwrap())
                .unwrap()
                .offload_embeddings
        };
        assert!(of_flags(&["--offload-embeddings"]));
        assert!(!of_flags(&["--offload-embeddings", "false"]));
        assert!(!of_flags(&[]));
    }
}
