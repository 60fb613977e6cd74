//! GGUF reader and dequantizers on small files written here or by the committed generator.

mod loading_common;

use std::path::{Path, PathBuf};

use ftrt_models::gguf::permute::unpermute_rows;
use ftrt_models::gguf::{GgmlType, GgufFile, MetaValue};
use ftrt_models::ErrorKind;
use loading_common::{
    f32_bytes, permute_rows, quantize_q4_0, quantize_q4_1, quantize_q8_0, test_values, write_gguf,
    Kv, RawTensor,
};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/quants.gguf")
}

/// Max |a - b| relative to max |b|.
fn max_rel_err(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-30);
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

#[test]
fn fixture_matches_gguf_python_dequantizer() {
    let file = GgufFile::open(&fixture()).unwrap();
    assert_eq!(file.version(), 3);
    assert_eq!(
        file.get("general.architecture"),
        Some(&MetaValue::String("llama".into()))
    );
    for (name, ty) in [
        ("Q4_K", GgmlType::Q4_K),
        ("Q6_K", GgmlType::Q6_K),
        ("Q8_0", GgmlType::Q8_0),
        ("Q4_0", GgmlType::Q4_0),
        ("Q4_1", GgmlType::Q4_1),
        ("F16", GgmlType::F16),
        ("BF16", GgmlType::BF16),
    ] {
        let info = file.tensor(name).unwrap();
        assert_eq!(info.ggml_type, ty);
        assert_eq!(info.shape(), vec![4, 512]);
        let got = file.dequantize(name).unwrap();
        let want = file.dequantize(&format!("{name}.expected")).unwrap();
        let err = max_rel_err(&got, &want);
        assert!(err <= 1e-6, "{name}: max relative error {err}");
    }
}

/// Quantizes data with the reference quantizers, writes it as GGUF, reads it back.
#[test]
fn legacy_quants_round_trip_through_reference_quantizers() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.gguf");
    let x = test_values(3 * 64, 7);
    let quants: [(&str, u32, Vec<u8>); 3] = [
        ("q8", 8, quantize_q8_0(&x)),
        ("q40", 2, quantize_q4_0(&x)),
        ("q41", 3, quantize_q4_1(&x)),
    ];
    let tensors: Vec<RawTensor> = quants
        .iter()
        .map(|(n, id, data)| RawTensor {
            name: n.to_string(),
            dims: vec![64, 3],
            type_id: *id,
            data: data.clone(),
        })
        .collect();
    write_gguf(
        &path,
        &[("general.architecture", Kv::Str("llama".into()))],
        &tensors,
    );
    let file = GgufFile::open(&path).unwrap();
    // Worst-case error of each format relative to the block's range: half a quantization step.
    for (name, tol) in [
        ("q8", 0.5 / 127.0),
        ("q40", 1.0 / 8.0),
        ("q41", 0.5 / 15.0 + 1e-3),
    ] {
        let y = file.dequantize(name).unwrap();
        for (bx, by) in x.chunks(32).zip(y.chunks(32)) {
            let amax = bx.iter().fold(0f32, |m, v| m.max(v.abs()));
            let range = bx.iter().copied().fold(f32::MIN, f32::max)
                - bx.iter().copied().fold(f32::MAX, f32::min);
            let bound = if name == "q41" { range } else { amax } * tol * 1.01;
            for (a, b) in bx.iter().zip(by) {
                assert!((a - b).abs() <= bound, "{name}: {a} vs {b} (bound {bound})");
            }
        }
    }
    // Exact values for a hand-made Q4_1 block: d = 0.5, m = -1, nibbles 0..15.
    let mut block = half::f16::from_f32(0.5).to_le_bytes().to_vec();
    block.extend_from_slice(&half::f16::from_f32(-1.0).to_le_bytes());
    block.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
    let path2 = dir.path().join("exact.gguf");
    write_gguf(
        &path2,
        &[],
        &[RawTensor {
            name: "b".into(),
            dims: vec![32],
            type_id: 3,
            data: block,
        }],
    );
    let y = GgufFile::open(&path2).unwrap().dequantize("b").unwrap();
    let want: Vec<f32> = (0..16)
        .map(|j| 0.5 * j as f32 - 1.0)
        .chain((0..16).map(|j| 0.5 * (15 - j) as f32 - 1.0))
        .collect();
    assert_eq!(y, want);
}

#[test]
fn metadata_of_every_value_type() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kv.gguf");
    write_gguf(
        &path,
        &[
            ("a.u32", Kv::U32(7)),
            ("a.i32", Kv::I32(-3)),
            ("a.f32", Kv::F32(1e-5)),
            ("a.bool", Kv::Bool(true)),
            ("a.str", Kv::Str("héllo".into())),
            ("a.strs", Kv::StrArray(vec!["x".into(), "".into()])),
            ("a.ints", Kv::I32Array(vec![1, -2])),
            ("general.alignment", Kv::U32(32)),
        ],
        &[RawTensor {
            name: "t".into(),
            dims: vec![2, 2],
            type_id: 0,
            data: f32_bytes(&[1.0, 2.0, 3.0, 4.0]),
        }],
    );
    let f = GgufFile::open(&path).unwrap();
    assert_eq!(f.get("a.u32").and_then(MetaValue::as_u64), Some(7));
    assert_eq!(f.get("a.i32").and_then(MetaValue::as_i64), Some(-3));
    assert_eq!(f.get("a.i32").and_then(MetaValue::as_u64), None);
    assert_eq!(f.get("a.f32").and_then(MetaValue::as_f64), Some(1e-5));
    assert_eq!(f.get("a.bool").and_then(MetaValue::as_bool), Some(true));
    assert_eq!(f.get("a.str").and_then(MetaValue::as_str), Some("héllo"));
    let strs = f.get("a.strs").and_then(MetaValue::as_array).unwrap();
    assert_eq!(
        strs,
        [
            MetaValue::String("x".into()),
            MetaValue::String(String::new())
        ]
    );
    assert_eq!(
        f.get("a.ints"),
        Some(&MetaValue::Array(vec![
            MetaValue::I32(1),
            MetaValue::I32(-2)
        ]))
    );
    assert_eq!(f.alignment(), 32);
    assert_eq!(f.data_offset() % 32, 0);
    let t = f.tensor("t").unwrap();
    assert_eq!(
        (t.dims.clone(), t.shape(), t.n_bytes()),
        (vec![2, 2], vec![2, 2], 16)
    );
    assert_eq!(f.dequantize("t").unwrap(), [1.0, 2.0, 3.0, 4.0]);
}

#[test]
fn unpermute_inverts_llama_cpp_permutation() {
    for (rows, cols, heads) in [(576, 3, 9), (192, 2, 3), (8, 1, 2)] {
        let w: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
        let permuted = permute_rows(&w, rows, cols, heads);
        assert_ne!(permuted, w);
        assert_eq!(unpermute_rows(&permuted, rows, cols, heads).unwrap(), w);
    }
    assert!(unpermute_rows(&[0.0; 6], 6, 1, 2).is_err());
}

fn open_err(bytes: &[u8]) -> ftrt_models::Error {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.gguf");
    std::fs::write(&path, bytes).unwrap();
    let err = GgufFile::open(&path).err().expect("bad file must not open");
    assert!(
        err.to_string().starts_with(&path.display().to_string()),
        "{err}"
    );
    err
}

fn small_file(type_id: u32, data: Vec<u8>) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.gguf");
    write_gguf(
        &path,
        &[("general.architecture", Kv::Str("llama".into()))],
        &[RawTensor {
            name: "blk.0.attn_q.weight".into(),
            dims: vec![32, 2],
            type_id,
            data,
        }],
    );
    std::fs::read(path).unwrap()
}

#[test]
fn unknown_tensor_type_names_id_and_tensor() {
    let err = open_err(&small_file(77, vec![0; 128]));
    assert_eq!(err.kind, ErrorKind::Unsupported);
    assert!(
        err.reason.contains("77") && err.reason.contains("blk.0.attn_q.weight"),
        "{err}"
    );
    // A known type without a dequantizer opens, and dequantizing names the type and tensor.
    let bytes = small_file(6, vec![0; 44]);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q5.gguf");
    std::fs::write(&path, bytes).unwrap();
    let err = GgufFile::open(&path)
        .unwrap()
        .dequantize("blk.0.attn_q.weight")
        .unwrap_err();
    assert_eq!(err.kind, ErrorKind::Unsupported);
    assert!(
        err.reason.contains("Q5_0") && err.reason.contains("blk.0.attn_q.weight"),
        "{err}"
    );
}

#[test]
fn truncated_and_malformed_files() {
    let good = small_file(0, vec![0; 256]);
    for cut in [0, 10, 30, 60, good.len() - 1] {
        assert_eq!(
            open_err(&good[..cut]).kind,
            ErrorKind::Truncated,
            "cut at {cut}"
        );
    }
    let mut magic = good.clone();
    magic[0] = b'X';
    assert_eq!(open_err(&magic).kind, ErrorKind::Malformed);
    let mut version = good.clone();
    version[4..8].copy_from_slice(&1u32.to_le_bytes());
    assert_eq!(open_err(&version).kind, ErrorKind::Unsupported);
    // A tensor count that cannot fit in the file.
    let mut count = good.clone();
    count[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
    assert_eq!(open_err(&count).kind, ErrorKind::Truncated);
    // A metadata string length beyond the file.
    let mut key_len = good.clone();
    key_len[24..32].copy_from_slice(&(1u64 << 40).to_le_bytes());
    assert_eq!(open_err(&key_len).kind, ErrorKind::Truncated);
    assert_eq!(
        GgufFile::open(Path::new("/nonexistent/x.gguf"))
            .err()
            .unwrap()
            .kind,
        ErrorKind::Missing
    );
}

/// A two-layer llama-shaped GGUF with the given extra tensors, all F32.
fn tiny_llama(path: &Path, arch: &str, extra: &[(&str, Vec<u64>)]) {
    let kv = |k: &str| format!("{arch}.{k}");
    let mut tensors = vec![
        ("token_embd.weight", vec![8u64, 16]),
        ("blk.0.attn_q.weight", vec![8, 8]),
        ("blk.0.attn_k.weight", vec![8, 4]),
        ("blk.0.attn_q.bias", vec![8]),
        ("output_norm.weight", vec![8]),
    ];
    tensors.extend(extra.iter().cloned());
    let raw: Vec<RawTensor> = tensors
        .iter()
        .map(|(name, dims)| {
            let n = dims.iter().product::<u64>() as usize;
            let values: Vec<f32> = (0..n).map(|i| i as f32).collect();
            RawTensor {
                name: name.to_string(),
                dims: dims.clone(),
                type_id: 0,
                data: f32_bytes(&values),
            }
        })
        .collect();
    write_gguf(
        path,
        &[
            ("general.architecture", Kv::Str(arch.into())),
            (&kv("block_count"), Kv::U32(1)),
            (&kv("context_length"), Kv::U32(128)),
            (&kv("embedding_length"), Kv::U32(8)),
            (&kv("feed_forward_length"), Kv::U32(24)),
            (&kv("attention.head_count"), Kv::U32(2)),
            (&kv("attention.head_count_kv"), Kv::U32(1)),
            (&kv("attention.layer_norm_rms_epsilon"), Kv::F32(1e-6)),
            (&kv("rope.freq_base"), Kv::F32(500000.0)),
            (
                "tokenizer.ggml.tokens",
                Kv::StrArray((0..16).map(|i| format!("t{i}")).collect()),
            ),
            ("tokenizer.ggml.eos_token_id", Kv::U32(3)),
            ("tokenizer.ggml.eot_token_id", Kv::U32(5)),
        ],
        &raw,
    );
}

#[test]
fn config_and_weights_from_gguf_metadata() {
    use ftrt_models::gguf::{config_from_gguf, GgufWeights};
    use ftrt_models::{Architecture, RopeScaling};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    tiny_llama(
        &path,
        "llama",
        &[
            ("rope_freqs.weight", vec![2]),
            ("output.weight", vec![8, 16]),
        ],
    );
    let file = GgufFile::open(&path).unwrap();
    let c = config_from_gguf(&file).unwrap();
    assert_eq!(c.arch, Architecture::Llama);
    assert_eq!(
        (c.hidden_size, c.intermediate_size, c.num_hidden_layers),
        (8, 24, 1)
    );
    assert_eq!(
        (c.num_attention_heads, c.num_key_value_heads, c.head_dim),
        (2, 1, 4)
    );
    assert_eq!((c.vocab_size, c.max_position_embeddings), (16, 128));
    assert_eq!((c.rms_norm_eps, c.rope_theta), (1e-6, 500000.0));
    assert_eq!(
        c.rope_scaling,
        Some(RopeScaling::FreqFactors(vec![0.0, 1.0]))
    );
    assert!(!c.tie_word_embeddings && c.qkv_bias && !c.qk_norm);
    assert_eq!(c.eos_token_ids, [3, 5]);
    let w = GgufWeights::new(file, &c).unwrap();
    assert!(w.names().all(|n| n != "rope_freqs.weight"));
    assert_eq!(w.info("lm_head.weight").unwrap().shape(), [16, 8]);
    // q bias [8] = 2 heads of 4: rows (0, 2, 1, 3) per head become (0, 1, 2, 3).
    assert_eq!(
        w.to_f32("model.layers.0.self_attn.q_proj.bias").unwrap(),
        [0.0, 2.0, 1.0, 3.0, 4.0, 6.0, 5.0, 7.0]
    );

    // qwen2 files are not permuted.
    let qwen = dir.path().join("qwen.gguf");
    tiny_llama(&qwen, "qwen2", &[]);
    let file = GgufFile::open(&qwen).unwrap();
    let c = config_from_gguf(&file).unwrap();
    assert!(c.tie_word_embeddings && c.rope_scaling.is_none());
    let w = GgufWeights::new(file, &c).unwrap();
    let bias = w.to_f32("model.layers.0.self_attn.q_proj.bias").unwrap();
    assert_eq!(bias, (0..8).map(|i| i as f32).collect::<Vec<_>>());
}

#[test]
fn unsupported_gguf_models_are_errors() {
    use ftrt_models::gguf::{config_from_gguf, GgufWeights};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gemma.gguf");
    tiny_llama(&path, "gemma2", &[]);
    let err = config_from_gguf(&GgufFile::open(&path).unwrap()).unwrap_err();
    assert_eq!(err.kind, ErrorKind::Unsupported);
    assert!(
        err.reason.contains("gemma2") && err.reason.contains("qwen3"),
        "{err}"
    );

    let path = dir.path().join("odd.gguf");
    tiny_llama(&path, "llama", &[("blk.0.mystery.weight", vec![8])]);
    let file = GgufFile::open(&path).unwrap();
    let c = config_from_gguf(&file).unwrap();
    let err = GgufWeights::new(file, &c).err().unwrap();
    assert!(err.reason.contains("blk.0.mystery.weight"), "{err}");
}
