//! Helpers shared by the loading tests: a minimal GGUF writer, reference quantizers and the
//! paths of the shared test assets.
#![allow(dead_code)] // each test binary uses a different subset

use std::path::{Path, PathBuf};

use half::f16;

/// `../shared/assets` seen from the workspace root (the `models/` crate's parent).
pub fn assets() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/assets")
}

/// A metadata value to write.
pub enum Kv {
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    StrArray(Vec<String>),
    I32Array(Vec<i32>),
}

/// A tensor to write: GGUF name, ggml dims (innermost first), type id and raw bytes.
pub struct RawTensor {
    pub name: String,
    pub dims: Vec<u64>,
    pub type_id: u32,
    pub data: Vec<u8>,
}

/// Serializes a GGUF v3 file with 32-byte alignment.
pub fn write_gguf(path: &Path, kvs: &[(&str, Kv)], tensors: &[RawTensor]) {
    let mut out = Vec::new();
    out.extend_from_slice(b"GGUF");
    out.extend_from_slice(&3u32.to_le_bytes());
    out.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    out.extend_from_slice(&(kvs.len() as u64).to_le_bytes());
    let put_str = |out: &mut Vec<u8>, s: &str| {
        out.extend_from_slice(&(s.len() as u64).to_le_bytes());
        out.extend_from_slice(s.as_bytes());
    };
    for (key, value) in kvs {
        put_str(&mut out, key);
        match value {
            Kv::U32(v) => {
                out.extend_from_slice(&4u32.to_le_bytes());
                out.extend_from_slice(&v.to_le_bytes());
            }
            Kv::I32(v) => {
                out.extend_from_slice(&5u32.to_le_bytes());
                out.extend_from_slice(&v.to_le_bytes());
            }
            Kv::F32(v) => {
                out.extend_from_slice(&6u32.to_le_bytes());
                out.extend_from_slice(&v.to_le_bytes());
            }
            Kv::Bool(v) => {
                out.extend_from_slice(&7u32.to_le_bytes());
                out.push(u8::from(*v));
            }
            Kv::Str(s) => {
                out.extend_from_slice(&8u32.to_le_bytes());
                put_str(&mut out, s);
            }
            Kv::StrArray(items) => {
                out.extend_from_slice(&9u32.to_le_bytes());
                out.extend_from_slice(&8u32.to_le_bytes());
                out.extend_from_slice(&(items.len() as u64).to_le_bytes());
                for s in items {
                    put_str(&mut out, s);
                }
            }
            Kv::I32Array(items) => {
                out.extend_from_slice(&9u32.to_le_bytes());
                out.extend_from_slice(&5u32.to_le_bytes());
                out.extend_from_slice(&(items.len() as u64).to_le_bytes());
                for v in items {
                    out.extend_from_slice(&v.to_le_bytes());
                }
            }
        }
    }
    let align = |n: usize| n.div_ceil(32) * 32;
    let mut offset = 0usize;
    for t in tensors {
        put_str(&mut out, &t.name);
        out.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
        for d in &t.dims {
            out.extend_from_slice(&d.to_le_bytes());
        }
        out.extend_from_slice(&t.type_id.to_le_bytes());
        out.extend_from_slice(&(offset as u64).to_le_bytes());
        offset = align(offset + t.data.len());
    }
    out.resize(align(out.len()), 0);
    for t in tensors {
        out.extend_from_slice(&t.data);
        out.resize(align(out.len()), 0);
    }
    std::fs::write(path, out).unwrap();
}

/// F32 tensor bytes.
pub fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// Deterministic pseudo-random normal-ish values (sum of uniforms), for test data.
pub fn test_values(n: usize, seed: u64) -> Vec<f32> {
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut uniform = move || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((state >> 40) as f32) / ((1u64 << 24) as f32)
    };
    (0..n)
        .map(|_| (0..4).map(|_| uniform()).sum::<f32>() - 2.0)
        .collect()
}

/// Reference Q8_0 quantizer (ggml's `quantize_row_q8_0_ref`): per 32 values,
/// `d = amax / 127`, `q = round(x / d)`.
pub fn quantize_q8_0(x: &[f32]) -> Vec<u8> {
    let mut out = Vec::new();
    for block in x.chunks_exact(32) {
        let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
        out.extend(block.iter().map(|v| (v * id).round() as i8 as u8));
    }
    out
}

/// Reference Q4_0 quantizer (ggml's `quantize_row_q4_0_ref`): `d = max / -8` where `max` is
/// the value of largest magnitude, `q = min(15, trunc(x / d + 8.5))`.
pub fn quantize_q4_0(x: &[f32]) -> Vec<u8> {
    let mut out = Vec::new();
    for block in x.chunks_exact(32) {
        let max = block
            .iter()
            .fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
        let d = max / -8.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
        let q = |v: f32| ((v * id + 8.5) as u8).min(15);
        out.extend((0..16).map(|j| q(block[j]) | (q(block[j + 16]) << 4)));
    }
    out
}

/// Reference Q4_1 quantizer (ggml's `quantize_row_q4_1_ref`): `d = (max - min) / 15`,
/// `m = min`, `q = min(15, trunc((x - min) / d + 0.5))`.
pub fn quantize_q4_1(x: &[f32]) -> Vec<u8> {
    let mut out = Vec::new();
    for block in x.chunks_exact(32) {
        let min = block.iter().copied().fold(f32::INFINITY, f32::min);
        let max = block.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let d = (max - min) / 15.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
        out.extend_from_slice(&f16::from_f32(min).to_le_bytes());
        let q = |v: f32| (((v - min) * id + 0.5) as u8).min(15);
        out.extend((0..16).map(|j| q(block[j]) | (q(block[j + 16]) << 4)));
    }
    out
}

/// llama.cpp's convert permutation of Q/K rows (the forward direction):
/// `w.reshape(n_head, 2, rows / n_head / 2, cols).swapaxes(1, 2).reshape(rows, cols)`.
pub fn permute_rows(w: &[f32], rows: usize, cols: usize, n_head: usize) -> Vec<f32> {
    let half = rows / n_head / 2;
    let mut out = Vec::with_capacity(w.len());
    for h in 0..n_head {
        for i in 0..half {
            for a in 0..2 {
                let src = (h * 2 * half + a * half + i) * cols;
                out.extend_from_slice(&w[src..src + cols]);
            }
        }
    }
    out
}

/// Reads llama.cpp's tokenizer vectors `<name>.inp` / `<name>.out`: (text, ids) pairs.
pub fn vocab_vectors(name: &str) -> Vec<(String, Vec<u32>)> {
    let dir = assets().join("tokenizers/vectors");
    let inp = std::fs::read_to_string(dir.join(format!("ggml-vocab-{name}.gguf.inp"))).unwrap();
    let out = std::fs::read_to_string(dir.join(format!("ggml-vocab-{name}.gguf.out"))).unwrap();
    let texts: Vec<&str> = inp.split("\n__ggml_vocab_test__\n").collect();
    let lines: Vec<&str> = out.split('\n').collect();
    // Both files end with a separator / newline: the last piece is empty.
    assert_eq!(
        texts.len(),
        lines.len(),
        "{name}: text and id line counts differ"
    );
    texts[..texts.len() - 1]
        .iter()
        .zip(&lines[..lines.len() - 1])
        .map(|(t, l)| {
            let ids = l.split_whitespace().map(|x| x.parse().unwrap()).collect();
            (t.to_string(), ids)
        })
        .collect()
}
