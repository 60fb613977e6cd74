//! `ftrt export`: a base model with a PEFT LoRA adapter merged into its weights (PEFT's
//! `merge_and_unload`; Unsloth's `save_pretrained_merged` / `save_pretrained_gguf`), saved as
//! a Hugging Face folder (safetensors, for transformers or vLLM) or as a GGUF file (for
//! llama.cpp or Ollama). Runs on the CPU, one tensor at a time.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde_json::Value;

use ftrt_models::checkpoint::WeightSource;
use ftrt_models::export::{
    write_gguf_file, write_hf_folder, ExportDtype, ExportFormat, MergedWeights, MAX_SHARD_BYTES,
};
use ftrt_models::lora::{linear_targets, LoraWeights, ADAPTER_CONFIG_FILE};
use ftrt_models::open_model;
use ftrt_models::train::progress::count_bar;

/// Arguments of `ftrt export`.
#[derive(clap::Args, Debug, Clone)]
pub struct ExportArgs {
    /// The PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors), as
    /// `ftrt train` writes it.
    #[arg(long, default_value = "ftrt-output", conflicts_with = "no_adapter")]
    pub adapter: PathBuf,
    /// Convert the base model without merging any adapter (e.g. a GGUF to a Hugging Face
    /// folder, or to Q8_0).
    #[arg(long)]
    pub no_adapter: bool,
    /// The base model: a Hugging Face folder or a .gguf file [default: the adapter's
    /// `base_model_name_or_path` when it is a local path, else SmolLM2-135M-Instruct as `ftrt
    /// train` uses it].
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// `safetensors` (a Hugging Face folder) or `gguf` (one file for llama.cpp; from a folder,
    /// its tokenizer must be byte-level BPE: Llama 3, Qwen2/3, SmolLM, GPT-2) [default: gguf for
    /// a GGUF base, safetensors for a folder].
    #[arg(long, value_parser = ["safetensors", "gguf"])]
    pub format: Option<String>,
    /// Type of the written matrices: f32, f16, bf16, or q8_0 (GGUF only; vectors stay f32)
    /// [default: bf16 for safetensors, q8_0 for GGUF, as Unsloth's defaults].
    #[arg(long)]
    pub dtype: Option<String>,
    /// Where to write: a folder for safetensors, a file for GGUF [default: merged/ or
    /// merged.<dtype>.gguf inside the adapter folder; with --no-adapter, <model>-<dtype>/ or
    /// <model>.<dtype>.gguf in the current folder].
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    pub no_progress: bool,
}

pub fn run(args: &ExportArgs) -> Result<(), String> {
    let t0 = Instant::now();
    let adapter_dir = (!args.no_adapter).then_some(args.adapter.as_path());
    if let Some(dir) = adapter_dir {
        if !dir.join(ADAPTER_CONFIG_FILE).is_file() {
            return Err(format!(
                "{}: no {ADAPTER_CONFIG_FILE} here; pass the folder `ftrt train` saved the \
                 adapter in (--adapter DIR), or --no-adapter to convert the base model alone",
                dir.display()
            ));
        }
    }
    let model_path = match (&args.model, adapter_dir) {
        (Some(p), _) => p.clone(),
        (None, Some(dir)) => match base_of_adapter(dir)? {
            Some(p) => p,
            None => default_model()?,
        },
        (None, None) => default_model()?,
    };
    let model = open_model(&model_path).map_err(|e| e.to_string())?;
    let format = match args.format.as_deref() {
        Some("gguf") => ExportFormat::Gguf,
        Some(_) => ExportFormat::Safetensors,
        None => match model.weights {
            WeightSource::Gguf(_) => ExportFormat::Gguf,
            WeightSource::Safetensors(_) => ExportFormat::Safetensors,
        },
    };
    let dtype = match (&args.dtype, format) {
        (Some(d), _) => ExportDtype::parse(d)?,
        (None, ExportFormat::Gguf) => ExportDtype::Q8_0,
        (None, ExportFormat::Safetensors) => ExportDtype::BF16,
    };
    if format == ExportFormat::Safetensors {
        dtype.safetensors_name()?; // refused before loading anything
    }
    let lora = match adapter_dir {
        Some(dir) => Some(LoraWeights::load_peft(dir, &linear_targets(&model.config))?),
        None => None,
    };
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| default_out(adapter_dir, &model_path, format, dtype));
    let merged = MergedWeights::new(&model, lora.as_ref());
    let names = merged.names();
    match &lora {
        Some(l) => eprintln!(
            "{}: merging {} LoRA weights (r {}, alpha {}, scale {}) from {} into {} tensors",
            model_path.display(),
            merged.adapted(),
            l.config.r,
            l.config.lora_alpha,
            l.scale(),
            args.adapter.display(),
            names.len()
        ),
        None => eprintln!(
            "{}: converting {} tensors (no adapter)",
            model_path.display(),
            names.len()
        ),
    }
    // a GGUF also holds the rope factors of a scaled rope (`rope_freqs.weight`)
    let rope_factors = format == ExportFormat::Gguf && model.config.rope_scaling.is_some();
    let tensors = names.len() + usize::from(rope_factors);
    let bar = count_bar(tensors, "tensors", !args.no_progress);
    let mut on_tensor = |name: &str| {
        bar.set_message(name.to_owned());
        bar.inc(1);
    };
    match format {
        ExportFormat::Safetensors => {
            write_hf_folder(&merged, dtype, &out, MAX_SHARD_BYTES, &mut on_tensor)?
        }
        ExportFormat::Gguf => write_gguf_file(&merged, dtype, &out, &mut on_tensor)?,
    }
    bar.finish_and_clear();
    let bytes = disk_bytes(&out);
    println!(
        "wrote {} ({} {dtype}, {:.1} MB) in {:.1} s",
        out.display(),
        match format {
            ExportFormat::Safetensors => "Hugging Face folder,",
            ExportFormat::Gguf => "GGUF,",
        },
        bytes as f64 / 1e6,
        t0.elapsed().as_secs_f64()
    );
    println!(
        "try it: ftrt generate --model {} --prompt \"...\"{}",
        out.display(),
        match format {
            ExportFormat::Gguf => format!("   (or llama.cpp: llama-cli -m {})", out.display()),
            ExportFormat::Safetensors => String::new(),
        }
    );
    Ok(())
}

/// The adapter's `base_model_name_or_path` when it names a local model; an error when it names
/// something else (a Hub id), `None` when it is absent.
fn base_of_adapter(dir: &Path) -> Result<Option<PathBuf>, String> {
    let path = dir.join(ADAPTER_CONFIG_FILE);
    let text = std::fs::read_to_string(&path)
        .map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
    let config: Value = serde_json::from_str(&text)
        .map_err(|e| format!("{}: invalid JSON: {e}", path.display()))?;
    match config
        .get("base_model_name_or_path")
        .and_then(Value::as_str)
    {
        None => Ok(None),
        Some(base) if Path::new(base).exists() => Ok(Some(PathBuf::from(base))),
        Some(base) => Err(format!(
            "{}: the base model {base:?} is not a local folder or file; pass it with --model",
            path.display()
        )),
    }
}

fn default_model() -> Result<PathBuf, String> {
    ftrt_models::gguf::smollm2_gguf_path().map_err(|e| e.to_string())
}

/// merged/ or merged.<dtype>.gguf in the adapter folder; without an adapter, <model
/// name>-<dtype>/ or <model name>.<dtype>.gguf in the current folder.
fn default_out(
    adapter: Option<&Path>,
    model: &Path,
    format: ExportFormat,
    dtype: ExportDtype,
) -> PathBuf {
    let (dir, stem) = match adapter {
        Some(dir) => (dir.to_path_buf(), "merged".to_owned()),
        None => (
            PathBuf::from("."),
            model
                .file_stem()
                .map_or("model".into(), |s| s.to_string_lossy().into_owned()),
        ),
    };
    match (format, adapter) {
        (ExportFormat::Gguf, _) => dir.join(format!("{stem}.{dtype}.gguf")),
        (ExportFormat::Safetensors, Some(_)) => dir.join(stem),
        (ExportFormat::Safetensors, None) => dir.join(format!("{stem}-{dtype}")),
    }
}

/// Bytes of a file, or of the files directly in a folder.
fn disk_bytes(path: &Path) -> u64 {
    if path.is_file() {
        return path.metadata().map_or(0, |m| m.len());
    }
    std::fs::read_dir(path).map_or(0, |entries| {
        entries
            .filter_map(|e| e.ok()?.metadata().ok())
            .map(|m| m.len())
            .sum()
    })
}
