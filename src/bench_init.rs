//! `ftrt bench --save-init DIR`: the benchmark's exact starting point as files a Python
//! baseline can start from (`benches/hf_loss_parity.py`), so that the losses of the two can be
//! compared step by step on the same weights, adapter and data. Needs no GPU.
//!
//! DIR gets `config.json` (the preset), `model.safetensors` (bf16, Hugging Face names: the
//! values `GpuLlama::random` puts on the GPU, projections before any NF4 quantization),
//! `adapter/` (PEFT: the bench's LoRA initialisation), `batch.safetensors` (`input_ids`
//! (B, S) i64: the labels are the same ids, shifted by the model as transformers does) and
//! `run.json` (mode, optimizer settings and the number of steps the bench takes).

use crate::bench::{preset_json, random_batch, BenchArgs, ADAPTER_SEED, BATCH_SEED, MODEL_SEED};
use ftrt_models::llama::gpu::random_init::host_weights;
use ftrt_models::llama::gpu::{init_adapter, KeepBf16};
use ftrt_models::llama::trainable::copy_adapter_into;
use ftrt_models::llama::{Dims, Proj};
use ftrt_models::lora::{linear_targets, LoraConfig, LoraWeights};
use ftrt_models::ModelConfig;
use safetensors::tensor::{Dtype, TensorView};
use std::collections::HashMap;
use std::path::Path;

/// Writes the starting point of `a`'s benchmark into `dir` (created if needed).
pub fn save_init(a: &BenchArgs, dir: &Path) -> Result<(), String> {
    let json = preset_json(&a.preset)?;
    let config =
        ModelConfig::from_json_str(&json, Path::new(&a.preset)).map_err(|e| e.to_string())?;
    write_init(&config, &json, a, dir)?;
    println!(
        "wrote the starting point of ftrt bench {} {} {}x{} to {}",
        a.preset,
        a.mode,
        a.batch,
        a.seq,
        dir.display()
    );
    Ok(())
}

/// [`save_init`] for the model `config` (its config.json text `json`).
fn write_init(config: &ModelConfig, json: &str, a: &BenchArgs, dir: &Path) -> Result<(), String> {
    let four_bit = match a.mode.as_str() {
        "lora" => None,
        "qlora" => Some(KeepBf16::parse(&a.llm_int8_skip_modules)),
        other => return Err(format!("--mode {other}: lora or qlora")),
    };
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: cannot create: {e}", dir.display()))?;
    let write = |name: &str, bytes: &[u8]| {
        std::fs::write(dir.join(name), bytes)
            .map_err(|e| format!("{}: {e}", dir.join(name).display()))
    };
    write("config.json", json.as_bytes())?;
    let pt = || Some(HashMap::from([("format".to_owned(), "pt".to_owned())]));

    let (layout, values) = host_weights(config, MODEL_SEED, four_bit.as_ref());
    let bytes: &[u8] = bytemuck::cast_slice(&values);
    let tensors = layout.hf_tensors(config);
    let views = tensors
        .iter()
        .map(|(name, r, shape)| {
            let v = TensorView::new(Dtype::BF16, shape.clone(), &bytes[2 * r.start..2 * r.end])
                .map_err(|e| format!("{name}: {e}"))?;
            Ok((name.as_str(), v))
        })
        .collect::<Result<Vec<_>, String>>()?;
    safetensors::serialize_to_file(views, pt(), &dir.join("model.safetensors"))
        .map_err(|e| format!("{}: {e}", dir.join("model.safetensors").display()))?;

    let dims = Dims::of(config);
    let ad = init_adapter(&dims, a.lora_r, a.lora_alpha, &Proj::ALL, ADAPTER_SEED, 0.0);
    let lora_config = LoraConfig {
        r: a.lora_r,
        lora_alpha: a.lora_alpha as f64,
        target_modules: Proj::ALL.iter().map(|p| p.module().to_owned()).collect(),
        ..LoraConfig::default()
    };
    let mut lora = LoraWeights::zeros(&lora_config, &linear_targets(config))?;
    copy_adapter_into(&mut lora, &ad)?;
    lora.save_peft(&dir.join("adapter"), None)?;

    let (batch, _) = random_batch(a.batch, a.seq, dims.vocab, BATCH_SEED);
    let ids: Vec<i64> = batch.tokens.iter().map(|&t| t as i64).collect();
    let ids_view = TensorView::new(Dtype::I64, vec![a.batch, a.seq], bytemuck::cast_slice(&ids))
        .map_err(|e| e.to_string())?;
    safetensors::serialize_to_file(
        [("input_ids", ids_view)],
        pt(),
        &dir.join("batch.safetensors"),
    )
    .map_err(|e| format!("{}: {e}", dir.join("batch.safetensors").display()))?;

    let run = serde_json::json!({
        "preset": a.preset, "mode": a.mode, "llm_int8_skip_modules": a.llm_int8_skip_modules,
        "lora_r": a.lora_r, "lora_alpha": a.lora_alpha, "lr": a.lr, "betas": [0.9, 0.999],
        "eps": 1e-8, "weight_decay": 0.0, "steps": a.warmup.max(1) + a.steps,
    });
    write("run.json", format!("{run:#}\n").as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use ftrt_models::checkpoint::WeightSource;
    use ftrt_models::llama::gpu::random_init::random_block;
    use ftrt_models::llama::{LlamaModel, LoraAdapter, Rounding};
    use ftrt_models::safetensors_io::SafetensorsFiles;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        bench: BenchArgs,
    }

    /// The written starting point loads through the checkpoint reader under the names and
    /// shapes it expects, holding exactly the values the GPU model starts from: the tiled
    /// block (4-bit: each quantized projection the block's prefix), norms 1, the bench's
    /// adapter and batch.
    #[test]
    fn the_written_start_loads_back_as_the_bench_starts() {
        let json = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("models/tests/fixtures/llama/llama/config.json"),
        )
        .unwrap();
        let config = ModelConfig::from_json_str(&json, Path::new("config.json")).unwrap();
        let block = random_block(MODEL_SEED);
        for mode in ["lora", "qlora"] {
            let a = Cli::parse_from(["bench", "--mode", mode, "--batch", "2", "--seq", "9"]).bench;
            let dir = tempfile::tempdir().unwrap();
            write_init(&config, &json, &a, dir.path()).unwrap();
            let source = WeightSource::Safetensors(SafetensorsFiles::open(dir.path()).unwrap());
            let m = LlamaModel::new(&config, &source, Rounding::F32).unwrap();
            let (layout, values) = host_weights(
                &config,
                MODEL_SEED,
                (mode == "qlora").then(KeepBf16::default).as_ref(),
            );
            assert_eq!(m.weights.data.len(), values.len());
            assert!(m
                .weights
                .data
                .iter()
                .zip(&values)
                .all(|(x, y)| *x == y.to_f32()));
            let w = &m.weights;
            assert!(w.get(&w.final_norm).iter().all(|&x| x == 1.0));
            let q1 = w.get(&w.layers[1].proj[Proj::Q.index()]);
            let tiled_from = if mode == "qlora" {
                0
            } else {
                layout.layers[1].proj[0].start
            };
            assert!(q1
                .iter()
                .enumerate()
                .all(|(j, &x)| x == block[tiled_from + j].to_f32()));
            let dims = Dims::of(&config);
            let ad = LoraAdapter::load_peft(&dir.path().join("adapter"), &dims).unwrap();
            let want = init_adapter(&dims, a.lora_r, a.lora_alpha, &Proj::ALL, ADAPTER_SEED, 0.0);
            assert_eq!(ad.data, want.data);
            let ids = SafetensorsFiles::open(&dir.path().join("batch.safetensors")).unwrap();
            let (batch, _) = random_batch(2, 9, dims.vocab, BATCH_SEED);
            let got: Vec<u32> = ids
                .to_f32("input_ids")
                .unwrap()
                .iter()
                .map(|&x| x as u32)
                .collect();
            assert_eq!(got, batch.tokens);
        }
    }
}
