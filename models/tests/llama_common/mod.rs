//! Fixtures of the Llama-family tests (fixtures/llama/gen_llama_fixtures.py): the tiny random
//! models, their transformers goldens, the prompts, and the relative error.

#![allow(dead_code)]

use std::path::PathBuf;

use ftrt_models::checkpoint::WeightSource;
use ftrt_models::llama::{LlamaModel, Rounding};
use ftrt_models::safetensors_io::SafetensorsFiles;
use ftrt_models::ModelConfig;

pub const ARCHS: [&str; 4] = ["llama", "mistral", "qwen2", "qwen3"];
pub const TOL: f64 = 2e-5;

pub fn dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/llama")
        .join(name)
}

pub fn model(name: &str, rt: Rounding) -> LlamaModel {
    let d = dir(name);
    let config = ModelConfig::from_file(&d.join("config.json")).unwrap();
    let weights = WeightSource::Safetensors(SafetensorsFiles::open(&d).unwrap());
    LlamaModel::new(&config, &weights, rt).unwrap()
}

pub struct Golden(pub SafetensorsFiles);

impl Golden {
    pub fn open(name: &str) -> Self {
        Golden(SafetensorsFiles::open(&dir(name).join("golden.safetensors")).unwrap())
    }
    pub fn f(&self, key: &str) -> Vec<f32> {
        self.0.to_f32(key).unwrap()
    }
    pub fn ints(&self, key: &str) -> Vec<i32> {
        self.f(key).into_iter().map(|v| v as i32).collect()
    }
    pub fn has(&self, key: &str) -> bool {
        self.0.meta(key).is_some()
    }
}

/// The prompts of the generator (PROMPTS there).
pub fn prompts() -> Vec<Vec<u32>> {
    vec![
        vec![1, 17, 33, 5, 99, 64, 2, 120, 45],
        vec![7, 3, 88, 12, 127],
        vec![42],
    ]
}

/// max |a - b| / max |b|.
pub fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let num = a
        .iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - *y as f64).abs())
        .fold(0.0, f64::max);
    let den = b.iter().map(|y| (*y as f64).abs()).fold(0.0, f64::max);
    num / den.max(1e-30)
}

impl Golden {
    /// transformers' greedy continuation of each prompt (`tokens.{i}`) and the logits of each
    /// of its decoding steps (`decode_logits.{i}`, steps x V).
    pub fn decode_goldens(&self, prompts: usize) -> (Vec<Vec<i32>>, Vec<Vec<f32>>) {
        let toks = (0..prompts)
            .map(|i| self.ints(&format!("tokens.{i}")))
            .collect();
        let dec = (0..prompts)
            .map(|i| self.f(&format!("decode_logits.{i}")))
            .collect();
        (toks, dec)
    }
}
