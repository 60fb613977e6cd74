//! The random starting point of benchmark models ([`GpuLlama::random`]) and its host copy.
//!
//! One block of [`BLOCK`] normal(0, 0.02) values (bf16) from a seed is tiled over the device
//! weight buffer, and every norm weight is 1. In 4-bit mode the device buffer holds everything
//! but the quantized projections, and every quantized projection is the block's first out * in
//! values tiled (then NF4-quantized on the GPU). [`host_weights`] rebuilds the same bf16 values
//! on the host under the Hugging Face layout, so that a benchmark's exact starting point can be
//! written as a checkpoint a baseline starts from (`ftrt bench --save-init`); quantizing its
//! projections with bitsandbytes gives the GPU's NF4 bytes (the kernels are bit-exact with it).
//!
//! [`GpuLlama::random`]: super::GpuLlama::random

use super::plan::{compact_without_proj, layout_len, norm_ranges, weight_layout, KeepBf16};
use crate::config::ModelConfig;
use crate::llama::WeightStore;
use ftrt_runtime::rng::SplitMix64;
use half::bf16;

/// Values in the tiled block.
pub const BLOCK: usize = 1 << 22;

/// The block: [`BLOCK`] normal(0, 0.02) values rounded to bf16.
pub fn random_block(seed: u64) -> Vec<bf16> {
    SplitMix64::new(seed | 1)
        .normals_f32(BLOCK, 0.02)
        .into_iter()
        .map(bf16::from_f32)
        .collect()
}

/// The model's weights as [`GpuLlama::random`] (`four_bit: None`) or
/// [`GpuLlama::random_4bit`] (the projections before quantization) starts them: the full
/// layout of [`weight_layout`] (its `data` left empty) and the bf16 values.
///
/// [`GpuLlama::random`]: super::GpuLlama::random
/// [`GpuLlama::random_4bit`]: super::GpuLlama::random_4bit
pub fn host_weights(
    config: &ModelConfig,
    seed: u64,
    four_bit: Option<&KeepBf16>,
) -> (WeightStore, Vec<bf16>) {
    let full = weight_layout(config);
    let len = layout_len(&full);
    let block = random_block(seed);
    let tile = |at: usize| block[at % BLOCK];
    let mut v = vec![bf16::ZERO; len];
    match four_bit {
        None => {
            for (i, x) in v.iter_mut().enumerate() {
                *x = tile(i);
            }
        }
        Some(keep) => {
            // Device buffer ranges tiled from the device offset; quantized projections from 0.
            for (h, d) in compact_without_proj(&full, keep).1 {
                for (j, x) in v[h].iter_mut().enumerate() {
                    *x = tile(d.start + j);
                }
            }
            for (l, lw) in full.layers.iter().enumerate() {
                for p in crate::llama::Proj::ALL {
                    if !keep.keeps(l, p) {
                        for (j, x) in v[lw.proj[p.index()].clone()].iter_mut().enumerate() {
                            *x = tile(j);
                        }
                    }
                }
            }
        }
    }
    for r in norm_ranges(&full) {
        v[r].fill(bf16::ONE);
    }
    (full, v)
}

/// A small random Llama (2 layers, 4 query and 2 key/value heads of `head_dim`, vocabulary
/// 128, the weights of [`host_weights`] under `seed`) on the host, rounding as `rt`: the shape
/// the forward graph's flash-attention prefill needs (head dims 64 and 128), which the tiny
/// transformers fixtures (head dim 16) do not have.
pub fn random_llama(
    head_dim: usize,
    seed: u64,
    rt: crate::llama::Rounding,
) -> crate::llama::LlamaModel {
    let hidden = 4 * head_dim;
    let json = format!(
        r#"{{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": {hidden},
            "intermediate_size": {}, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "head_dim": {head_dim}, "vocab_size": 128,
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": false,
            "max_position_embeddings": 512, "hidden_act": "silu"}}"#,
        2 * hidden
    );
    let config = ModelConfig::from_json_str(&json, std::path::Path::new("random_llama"))
        .expect("a valid built-in config");
    let (mut store, values) = host_weights(&config, seed, None);
    store.data = values.iter().map(|x| x.to_f32()).collect();
    crate::llama::LlamaModel::from_store(&config, store, rt)
}
