//! bitsandbytes 4-bit checkpoints (`load_in_4bit`, NF4 with double quantization) load as they
//! are: every weight dequantizes to what bitsandbytes' `dequantize_4bit` returns, bit for bit,
//! and the model's logits equal an f32 transformers model holding those weights. Fixture:
//! `fixtures/llama/gen_bnb4bit_fixture.py` (transformers + bitsandbytes).

use std::collections::HashMap;
use std::path::PathBuf;

use ftrt_models::checkpoint::{StorageType, WeightSource};
use ftrt_models::llama::{Batch, LlamaModel, Rounding};
use ftrt_models::safetensors_io::SafetensorsFiles;
use ftrt_models::ModelConfig;
use safetensors::tensor::{Dtype, TensorView};

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama/bnb4bit")
}

fn golden() -> SafetensorsFiles {
    SafetensorsFiles::open(&dir().join("golden.safetensors")).unwrap()
}

#[test]
fn weights_dequantize_bit_for_bit_as_bitsandbytes() {
    let weights = WeightSource::Safetensors(SafetensorsFiles::open(&dir()).unwrap());
    assert!(weights.has_bnb_4bit());
    let plain = dir().with_file_name("llama");
    assert!(!WeightSource::Safetensors(SafetensorsFiles::open(&plain).unwrap()).has_bnb_4bit());
    let g = golden();
    let mut checked = 0;
    for key in g.names().filter(|k| k.starts_with("weight.")) {
        let name = key.trim_start_matches("weight.");
        let info = weights.info(name).unwrap();
        assert_eq!(info.storage, StorageType::Bnb4bit, "{name}");
        assert_eq!(info.shape, g.meta(key).unwrap().shape, "{name}");
        let got = weights.to_f32(name).unwrap();
        let want = g.to_f32(key).unwrap();
        let differ = got
            .iter()
            .zip(&want)
            .filter(|(a, b)| a.to_bits() != b.to_bits())
            .count();
        assert_eq!(
            differ,
            0,
            "{name}: {differ} of {} values differ",
            want.len()
        );
        checked += 1;
    }
    assert_eq!(checked, 14, "two layers of seven projections");
}

/// The GPU 4-bit mode uploads a save's double-quantized parts as they are when their code
/// books are its own: the fixture's are, and the parts dequantize through the NF4 kernel's CPU
/// reference (which `ftrt selftest --kernels` holds the GPU kernel to, bit for bit) to
/// bitsandbytes' values.
#[test]
fn stored_nf4_parts_carry_the_gpu_code_books_and_dequantize_as_bitsandbytes() {
    use ftrt_ops::quant_prelude::{dynamic_map_signed, nf4_code};
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    let weights = WeightSource::Safetensors(SafetensorsFiles::open(&dir()).unwrap());
    let g = golden();
    let mut checked = 0;
    for key in g.names().filter(|k| k.starts_with("weight.")) {
        let name = key.trim_start_matches("weight.");
        let q = weights.nf4_parts(name).unwrap().expect("double quantized");
        assert_eq!(bits(&q.code2), bits(&dynamic_map_signed()), "{name}");
        assert_eq!(bits(&q.code), bits(&nf4_code()), "{name}");
        assert_eq!(
            (q.packed.len() * 2, q.absmax_q.len() * 64),
            (q.n, q.n),
            "{name}"
        );
        assert_eq!(
            bits(&q.dequantize()),
            bits(&g.to_f32(key).unwrap()),
            "{name}"
        );
        checked += 1;
    }
    assert_eq!(checked, 14, "two layers of seven projections");
    let plain =
        WeightSource::Safetensors(SafetensorsFiles::open(&dir().with_file_name("llama")).unwrap());
    assert_eq!(
        plain
            .nf4_parts("model.layers.0.self_attn.q_proj.weight")
            .unwrap(),
        None
    );
}

#[test]
fn logits_equal_transformers_on_the_dequantized_weights() {
    let config = ModelConfig::from_file(&dir().join("config.json")).unwrap();
    let weights = WeightSource::Safetensors(SafetensorsFiles::open(&dir()).unwrap());
    let model = LlamaModel::new(&config, &weights, Rounding::F32).unwrap();
    let g = golden();
    let prompts: [&[u32]; 2] = [&[1, 17, 33, 5, 99, 64, 2, 120, 45], &[7, 3, 88, 12, 127]];
    for (i, p) in prompts.iter().enumerate() {
        let got = model.forward(&Batch::packed(&[p.to_vec()]), None).unwrap();
        let want = g.to_f32(&format!("logits.{i}")).unwrap();
        let scale = want.iter().fold(0f32, |m, x| m.max(x.abs()));
        let err = got
            .iter()
            .zip(&want)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()))
            / scale;
        assert!(err < 2e-5, "prompt {i}: max rel err {err:e}");
    }
}

#[test]
fn a_broken_quant_state_names_the_file_and_the_weight() {
    let d = tempfile::tempdir().unwrap();
    let packed = [0u8; 32];
    let absmax = 1f32.to_le_bytes();
    let code: Vec<u8> = (0..16).flat_map(|i| (i as f32).to_le_bytes()).collect();
    let bad_state = b"{not json";
    let fp4_state =
        br#"{"quant_type": "fp4", "blocksize": 64, "dtype": "bfloat16", "shape": [8, 8]}"#;
    let tensors = HashMap::from([
        ("a.weight", (Dtype::U8, vec![32, 1], &packed[..])),
        ("a.weight.absmax", (Dtype::F32, vec![1], &absmax[..])),
        ("a.weight.quant_map", (Dtype::F32, vec![16], &code[..])),
        (
            "a.weight.quant_state.bitsandbytes__nf4",
            (Dtype::U8, vec![bad_state.len()], &bad_state[..]),
        ),
        ("b.weight", (Dtype::U8, vec![32, 1], &packed[..])),
        (
            "b.weight.quant_state.bitsandbytes__fp4",
            (Dtype::U8, vec![fp4_state.len()], &fp4_state[..]),
        ),
    ]);
    let views: Vec<(&str, TensorView)> = tensors
        .iter()
        .map(|(n, (dt, shape, bytes))| (*n, TensorView::new(*dt, shape.clone(), bytes).unwrap()))
        .collect();
    let path = d.path().join("model.safetensors");
    std::fs::write(&path, safetensors::serialize(views, None).unwrap()).unwrap();
    let weights = WeightSource::Safetensors(SafetensorsFiles::open(&path).unwrap());
    let bad = weights.to_f32("a.weight").unwrap_err().to_string();
    assert!(
        bad.contains("model.safetensors") && bad.contains("\"a.weight\""),
        "{bad}"
    );
    assert!(bad.contains("quant state"), "{bad}");
    let fp4 = weights.to_f32("b.weight").unwrap_err().to_string();
    assert!(fp4.contains("FP4") && fp4.contains("only NF4"), "{fp4}");
}
