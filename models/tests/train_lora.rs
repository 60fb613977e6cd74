//! LoRA against PEFT: adapters written by PEFT load with the same tensors; adapters written
//! here have PEFT's adapter_config.json (golden) and load in PEFT itself (through the Python at
//! `FTRT_PYTHON` or /opt/ftrtpy/bin/python when it has torch, transformers and peft; skipped
//! with a message otherwise: CI installs nothing heavy). Fixtures:
//! `fixtures/lora/gen_lora_fixtures.py`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use ftrt_models::config::ModelConfig;
use ftrt_models::lora::{
    adapter_config_json, linear_targets, select_targets, LoraConfig, LoraTarget, LoraWeights,
};
use serde::Deserialize;
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/lora")
}

fn targets() -> Vec<LoraTarget> {
    let cfg = ModelConfig::from_file(&fixtures().join("config.json")).unwrap();
    linear_targets(&cfg)
}

#[derive(Deserialize)]
struct Expected {
    a_shape: Vec<usize>,
    b_shape: Vec<usize>,
    a: Vec<f64>,
    b: Vec<f64>,
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn check_against_peft(name: &str, r: usize, scale: f32, modules: usize) {
    let dir = fixtures().join(name);
    let w = LoraWeights::load_peft(&dir, &targets()).unwrap();
    let expected: BTreeMap<String, Expected> =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    assert_eq!(w.tensors.len(), modules);
    assert_eq!(expected.len(), modules);
    assert_eq!(w.config.r, r);
    assert_eq!(w.scale(), scale);
    for t in &w.tensors {
        let e = &expected[&t.target.path];
        assert_eq!(e.a_shape, vec![r, t.target.in_features]);
        assert_eq!(e.b_shape, vec![t.target.out_features, r]);
        let a: Vec<f32> = e.a.iter().map(|&x| x as f32).collect();
        let b: Vec<f32> = e.b.iter().map(|&x| x as f32).collect();
        assert_eq!(&w.data[t.a.clone()], &a[..], "{} A", t.target.path);
        assert_eq!(&w.data[t.b.clone()], &b[..], "{} B", t.target.path);
    }
}

#[test]
fn peft_adapters_load_with_their_tensors() {
    check_against_peft("qv", 4, 2.0, 4);
    // rslora: 4 / sqrt(2).
    check_against_peft("all_linear", 2, (4.0 / 2f64.sqrt()) as f32, 14);
}

#[test]
fn adapter_config_matches_peft_golden() {
    let golden = read_json(&fixtures().join("qv/adapter_config.json"));
    let cfg = LoraConfig {
        r: 4,
        lora_alpha: 8.0,
        ..LoraConfig::default()
    };
    let ours = adapter_config_json(
        &cfg,
        &["v_proj".into(), "q_proj".into(), "q_proj".into()],
        Some("tiny-random-llama"),
    );
    assert_eq!(ours, golden);

    // all-linear with rslora and dropout: every key equal; PEFT writes the expanded module
    // paths in set order, we write the module names: both select the same modules.
    let golden = read_json(&fixtures().join("all_linear/adapter_config.json"));
    let cfg = LoraConfig {
        r: 2,
        lora_alpha: 4.0,
        target_modules: vec!["all-linear".into()],
        lora_dropout: 0.05,
        use_rslora: true,
        ..LoraConfig::default()
    };
    let w = LoraWeights::init(&cfg, &targets(), 0).unwrap();
    let modules: Vec<String> = w.tensors.iter().map(|t| t.target.module.clone()).collect();
    let mut ours = adapter_config_json(&cfg, &modules, Some("tiny-random-llama"));
    let mut golden_obj = golden.as_object().unwrap().clone();
    let peft_targets: Vec<String> =
        serde_json::from_value(golden_obj.remove("target_modules").unwrap()).unwrap();
    let our_targets: Vec<String> = serde_json::from_value(
        ours.as_object_mut()
            .unwrap()
            .remove("target_modules")
            .unwrap(),
    )
    .unwrap();
    assert_eq!(Value::Object(golden_obj), ours);
    let sel = |names: Vec<String>| {
        select_targets(
            &LoraConfig {
                target_modules: names,
                ..cfg.clone()
            },
            &targets(),
        )
        .unwrap()
    };
    assert_eq!(sel(peft_targets), sel(our_targets.clone()));
    assert_eq!(our_targets.len(), 7);
}

#[test]
fn init_is_peft_kaiming_uniform_and_zero_b() {
    let cfg = LoraConfig {
        r: 8,
        target_modules: vec!["all-linear".into()],
        ..LoraConfig::default()
    };
    let w = LoraWeights::init(&cfg, &targets(), 123).unwrap();
    assert_eq!(
        w,
        LoraWeights::init(&cfg, &targets(), 123).unwrap(),
        "seeded"
    );
    assert_ne!(
        w.data,
        LoraWeights::init(&cfg, &targets(), 124).unwrap().data
    );
    let (mut n, mut sum, mut sq) = (0usize, 0f64, 0f64);
    for t in &w.tensors {
        let bound = 1.0 / (t.target.in_features as f32).sqrt();
        let a = &w.data[t.a.clone()];
        assert!(a.iter().all(|x| x.abs() <= bound), "{}", t.target.path);
        assert!(w.data[t.b.clone()].iter().all(|&x| x == 0.0));
        for &x in a {
            let u = (x / bound) as f64; // U(-1, 1): mean 0, variance 1/3
            n += 1;
            sum += u;
            sq += u * u;
        }
    }
    let mean = sum / n as f64;
    let var = sq / n as f64 - mean * mean;
    assert!(mean.abs() < 0.05, "mean {mean} over {n}");
    assert!((var - 1.0 / 3.0).abs() < 0.03, "variance {var}");
}

#[test]
fn save_then_load_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let w = LoraWeights::load_peft(&fixtures().join("all_linear"), &targets()).unwrap();
    w.save_peft(dir.path(), Some("tiny-random-llama")).unwrap();
    let back = LoraWeights::load_peft(dir.path(), &targets()).unwrap();
    assert_eq!(back.data, w.data);
    assert_eq!(back.tensors, w.tensors);
    assert_eq!(back.scale(), w.scale());
}

#[test]
fn bad_adapters_and_targets_are_errors() {
    let err = LoraWeights::zeros(
        &LoraConfig {
            target_modules: vec!["q_proj".into(), "c_attn".into()],
            ..LoraConfig::default()
        },
        &targets(),
    )
    .unwrap_err();
    assert!(
        err.contains("\"c_attn\"")
            && err.contains("q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj"),
        "{err}"
    );
    // An adapter of another model shape: the shapes are checked.
    let mut other = ModelConfig::from_file(&fixtures().join("config.json")).unwrap();
    other.hidden_size = 32;
    let err = LoraWeights::load_peft(&fixtures().join("qv"), &linear_targets(&other)).unwrap_err();
    assert!(err.contains("shape"), "{err}");
    let err = LoraWeights::load_peft(Path::new("/nonexistent-adapter"), &targets()).unwrap_err();
    assert!(err.contains("cannot read"), "{err}");
    assert!(LoraConfig {
        bias: "all".into(),
        ..LoraConfig::default()
    }
    .validate()
    .is_err());
    assert!(LoraConfig {
        r: 0,
        ..LoraConfig::default()
    }
    .validate()
    .is_err());
}

/// The Python that has torch, transformers and peft, if any.
fn peft_python() -> Option<String> {
    let python =
        std::env::var("FTRT_PYTHON").unwrap_or_else(|_| "/opt/ftrtpy/bin/python".to_owned());
    let ok = Command::new(&python)
        .args(["-c", "import torch, transformers, peft"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    ok.then_some(python)
}

const PEFT_LOAD: &str = r#"
import json, sys, warnings
warnings.filterwarnings("ignore")
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from peft import PeftModel
cfg = LlamaConfig.from_pretrained(sys.argv[1])
model = PeftModel.from_pretrained(LlamaForCausalLM(cfg), sys.argv[2])
out = {}
for name, m in model.named_modules():
    if hasattr(m, "lora_A") and "default" in m.lora_A:
        out[name.removeprefix("base_model.model.")] = {
            "scaling": m.scaling["default"],
            "a": m.lora_A["default"].weight.flatten().tolist(),
            "b": m.lora_B["default"].weight.flatten().tolist(),
        }
print("JSON" + json.dumps(out))
"#;

#[test]
fn peft_loads_our_adapter() {
    let Some(python) = peft_python() else {
        eprintln!("skipped: no Python with torch, transformers and peft (set FTRT_PYTHON)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let cfg = LoraConfig {
        r: 4,
        lora_alpha: 16.0,
        target_modules: vec!["q_proj".into(), "down_proj".into(), "k_proj".into()],
        use_rslora: true,
        ..LoraConfig::default()
    };
    let mut w = LoraWeights::init(&cfg, &targets(), 9).unwrap();
    for (i, x) in w.data.iter_mut().enumerate() {
        if *x == 0.0 {
            *x = (i % 13) as f32 * 0.01 - 0.06;
        }
    }
    w.save_peft(dir.path(), None).unwrap();
    let out = Command::new(python)
        .arg("-c")
        .arg(PEFT_LOAD)
        .arg(fixtures())
        .arg(dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "PEFT failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json = stdout
        .lines()
        .find_map(|l| l.strip_prefix("JSON"))
        .expect("PEFT's output");
    let got: BTreeMap<String, Value> = serde_json::from_str(json).unwrap();
    assert_eq!(got.len(), w.tensors.len());
    for t in &w.tensors {
        let g = &got[&t.target.path];
        assert!(
            (g["scaling"].as_f64().unwrap() - 8.0).abs() < 1e-6,
            "rslora scale 16/sqrt(4)"
        );
        let a: Vec<f32> = serde_json::from_value(g["a"].clone()).unwrap();
        let b: Vec<f32> = serde_json::from_value(g["b"].clone()).unwrap();
        assert_eq!(&a[..], &w.data[t.a.clone()]);
        assert_eq!(&b[..], &w.data[t.b.clone()]);
    }
}
