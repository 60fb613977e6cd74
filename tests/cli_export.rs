//! `ftrt export` end to end on a tiny random model: a run that writes a Hugging Face folder,
//! and bad input that ends with a clear message and exit status 1, never a panic. The merged
//! values are checked in `models/tests/export.rs` and against PEFT by
//! `benches/export_parity.py`.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::{fails_with, tiny_model, write, write_tiny_weights};
use ftrt_models::lora::{linear_targets, LoraConfig, LoraWeights};
use ftrt_models::open_model;

fn export(args: &[&str], dir: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ftrt"))
        .arg("export")
        .args(args)
        .arg("--no-progress")
        .current_dir(dir)
        .output()
        .expect("run ftrt")
}

/// A tiny model of width `hidden` with every weight and a PEFT adapter (r 4 on all linear
/// modules) for it: `h<hidden>/model` and `h<hidden>/adapter` under `root`.
fn model_and_adapter(root: &Path, hidden: usize) {
    let dir = root.join(format!("h{hidden}"));
    std::fs::create_dir_all(&dir).unwrap();
    let m = tiny_model(&dir, hidden, 2);
    write_tiny_weights(&m, hidden, 2, ftrt_runtime::rng::fresh_seed());
    let model = open_model(&m).unwrap();
    let config = LoraConfig {
        r: 4,
        target_modules: vec!["all-linear".into()],
        ..LoraConfig::default()
    };
    let mut lora = LoraWeights::zeros(&config, &linear_targets(&model.config)).unwrap();
    lora.data
        .iter_mut()
        .enumerate()
        .for_each(|(i, x)| *x = (i % 7) as f32 * 0.01);
    let base = m.to_str().unwrap().to_owned();
    lora.save_peft(&dir.join("adapter"), Some(&base)).unwrap();
}

/// The adapter's base_model_name_or_path finds the model; the folder loads back with the
/// weights' dtype in its config, the tokenizer copied, and no temporary file left.
#[test]
fn merges_into_a_folder_that_loads_back() {
    let dir = tempfile::tempdir().unwrap();
    model_and_adapter(dir.path(), 32);
    let out = export(&["--adapter", "h32/adapter"], dir.path());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("Hugging Face folder, bf16"), "{stdout}");
    let merged = dir.path().join("h32/adapter/merged");
    let loaded = open_model(&merged).unwrap();
    assert_eq!(loaded.config.torch_dtype.as_deref(), Some("bfloat16"));
    assert_eq!(
        std::fs::read(merged.join("tokenizer.json")).unwrap(),
        std::fs::read(dir.path().join("h32/model/tokenizer.json")).unwrap()
    );
    let names: Vec<String> = std::fs::read_dir(&merged)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().all(|n| !n.ends_with(".tmp")), "{names:?}");
}

#[test]
fn bad_input_is_refused_with_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    model_and_adapter(d, 32);
    model_and_adapter(d, 48);

    let out = export(&["--adapter", "nowhere"], d);
    fails_with(&out, &["nowhere", "adapter_config.json", "--no-adapter"]);

    // an adapter trained for another shape of the model
    let out = export(&["--adapter", "h48/adapter", "--model", "h32/model"], d);
    let err = fails_with(&out, &["adapter_model.safetensors", "shape"]);
    assert!(err.contains("expected"), "{err}");

    let out = export(&["--adapter", "h32/adapter", "--dtype", "q4"], d);
    fails_with(&out, &["q4", "f32, f16, bf16 or q8_0"]);

    let out = export(
        &[
            "--adapter",
            "h32/adapter",
            "--dtype",
            "q8_0",
            "--format",
            "safetensors",
        ],
        d,
    );
    fails_with(&out, &["q8_0", "GGUF"]);

    let out = export(&["--adapter", "h32/adapter", "--format", "gguf"], d);
    fails_with(&out, &["tokenizer.json", "not BPE", "byte-level BPE"]);

    write(d, "h32/adapter/adapter_config.json", "{\"r\": 4,");
    let out = export(&["--adapter", "h32/adapter"], d);
    fails_with(&out, &["adapter_config.json", "JSON"]);

    let out = export(&["--adapter", "h48/adapter", "--model", "missing.gguf"], d);
    fails_with(&out, &["missing.gguf"]);
}
