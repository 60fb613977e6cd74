//! `ftrt train` on bad input: every case ends with a clear message and exit status 1, never a
//! panic (status 101), and before any weight is loaded.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::{fails_with, tiny_model, write};

fn ftrt(args: &[&str], dir: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ftrt"))
        .arg("train")
        .args(args)
        .args([
            "--output-dir",
            dir.join("out").to_str().unwrap(),
            "--no-progress",
        ])
        .current_dir(dir)
        .output()
        .expect("run ftrt")
}

const GOOD_ROWS: &str = "{\"question\": \"Calculate 1 + 2.\", \"answer\": \"3\"}\n\
{\"question\": \"Calculate 2 + 1.\", \"answer\": \"3\"}\n";

#[test]
fn malformed_jsonl_line_is_named() {
    let d = tempfile::tempdir().unwrap();
    let data = write(
        d.path(),
        "bad.jsonl",
        &format!("{GOOD_ROWS}{{\"question\": \"Calculate 1 + 1.\"\n"),
    );
    let out = ftrt(&["--dataset", data.to_str().unwrap()], d.path());
    fails_with(&out, &["bad.jsonl:3"]);
}

#[test]
fn empty_dataset_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let data = write(d.path(), "empty.jsonl", "\n");
    fails_with(
        &ftrt(&["--dataset", data.to_str().unwrap()], d.path()),
        &["empty"],
    );
}

#[test]
fn unreadable_and_invalid_config_files() {
    let d = tempfile::tempdir().unwrap();
    fails_with(
        &ftrt(&["--config", "missing.toml"], d.path()),
        &["missing.toml", "cannot read the config file"],
    );
    write(d.path(), "typo.toml", "learning_rat = 1e-4\n");
    fails_with(
        &ftrt(&["--config", "typo.toml"], d.path()),
        &["typo.toml", "learning_rat"],
    );
    write(d.path(), "bad.toml", "lora_r = \"sixteen\"\n");
    fails_with(&ftrt(&["--config", "bad.toml"], d.path()), &["bad.toml"]);
}

#[test]
fn bad_flag_values_are_refused_early() {
    let d = tempfile::tempdir().unwrap();
    fails_with(
        &ftrt(&["--load-in-4bit"], d.path()),
        &["--load-in-4bit", "GPU"],
    );
    fails_with(&ftrt(&["--optim", "sgd"], d.path()), &["sgd", "adamw_8bit"]);
    fails_with(
        &ftrt(&["--lr-scheduler-type", "exp"], d.path()),
        &["exp", "cosine"],
    );
    fails_with(&ftrt(&["--lora-r", "0"], d.path()), &["lora-r"]);
    fails_with(
        &ftrt(&["--dataset-format", "csv"], d.path()),
        &["csv", "alpaca"],
    );
}

#[test]
fn unknown_target_module_lists_the_models_modules() {
    let d = tempfile::tempdir().unwrap();
    let model = tiny_model(d.path(), 16, 2);
    let data = write(d.path(), "d.jsonl", GOOD_ROWS);
    let out = ftrt(
        &[
            "--model",
            model.to_str().unwrap(),
            "--dataset",
            data.to_str().unwrap(),
            "--target-modules",
            "q_proj,c_attn",
        ],
        d.path(),
    );
    fails_with(
        &out,
        &[
            "\"c_attn\"",
            "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj",
        ],
    );
}

#[test]
fn a_run_that_cannot_fit_is_refused_before_loading() {
    let d = tempfile::tempdir().unwrap();
    // hidden 1M x 400 layers: petabytes of f32 weights.
    let model = tiny_model(d.path(), 1 << 20, 400);
    let data = write(d.path(), "d.jsonl", GOOD_ROWS);
    let out = ftrt(
        &[
            "--model",
            model.to_str().unwrap(),
            "--dataset",
            data.to_str().unwrap(),
        ],
        d.path(),
    );
    fails_with(&out, &["does not fit", "base weights"]);
}

#[test]
fn long_sequences_are_truncated_with_a_count() {
    let d = tempfile::tempdir().unwrap();
    let model = tiny_model(d.path(), 16, 2);
    let long = format!(
        "{{\"question\": \"Calculate 1 + 2.\", \"answer\": \"{}\"}}\n",
        "3 ".repeat(60)
    );
    let data = write(d.path(), "d.jsonl", &format!("{GOOD_ROWS}{long}"));
    let out = ftrt(
        &[
            "--model",
            model.to_str().unwrap(),
            "--dataset",
            data.to_str().unwrap(),
            "--max-seq-length",
            "45",
            "--max-steps",
            "1",
            "--eval-samples",
            "0",
        ],
        d.path(),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("1 of 3 sequences were longer than --max-seq-length 45"),
        "{err}"
    );
    assert_ne!(out.status.code(), Some(101), "panicked: {err}");
}
