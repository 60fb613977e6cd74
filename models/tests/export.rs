//! `ftrt_models::export` on tiny random models (Llama and Qwen2 shapes, word-level and real
//! tokenizers) with random adapters, checked through the readers and the CPU model: the merged
//! model's logits against the base model running the adapter unmerged (the path checked against
//! PEFT), on fresh random weights and tokens each run; GGUF tokenizers against llama.cpp's own
//! token ids.

mod loading_common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ftrt_models::checkpoint::{open_model, LoadedModel};
use ftrt_models::export::{
    write_gguf_file, write_hf_folder, ExportDtype, ExportFormat, MergedWeights, MAX_SHARD_BYTES,
};
use ftrt_models::gguf::permute::permute_rows;
use ftrt_models::gguf::reader::GgufFile;
use ftrt_models::gguf::types::GgmlType;
use ftrt_models::gguf::value::MetaValue;
use ftrt_models::gguf::writer::{encode, write_gguf, TensorOut};
use ftrt_models::llama::{Batch, LlamaModel, LoraAdapter, Rounding};
use ftrt_models::lora::{linear_targets, LoraConfig, LoraWeights, ALL_LINEAR};
use ftrt_models::safetensors_io::SafetensorsFiles;
use ftrt_models::train::rng::SplitMix64;
use loading_common::{assets, vocab_vectors};
use safetensors::tensor::TensorView;
use safetensors::Dtype;

/// A tiny model's shape.
struct Tiny {
    /// `model_type` in config.json.
    arch: &'static str,
    hidden: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    ffn: usize,
    layers: usize,
    vocab: usize,
    tied: bool,
    /// q/k/v biases (Qwen2).
    qkv_bias: bool,
}

/// The shape of the word-level and GGUF sources.
const TINY: Tiny = Tiny {
    arch: "llama",
    hidden: 64,
    heads: 4,
    kv_heads: 2,
    head_dim: 16,
    ffn: 96,
    layers: 2,
    vocab: 30,
    tied: false,
    qkv_bias: false,
};
const HIDDEN: usize = TINY.hidden;
const HEADS: usize = TINY.heads;
const KV_HEADS: usize = TINY.kv_heads;
const HEAD_DIM: usize = TINY.head_dim;
const FFN: usize = TINY.ffn;
const LAYERS: usize = TINY.layers;
/// Byte-level BPE tokens of the GGUF source: control token 0, the letters, "Ġ" (a space) and
/// two merges.
const MERGES: [&str; 2] = ["a b", "Ġ a"];

fn tokens() -> Vec<String> {
    let mut t = vec!["<|endoftext|>".to_owned()];
    t.extend(('a'..='z').map(String::from));
    t.extend(["Ġ", "ab", "Ġa"].map(String::from));
    t
}

/// Random weights under Hugging Face names, row-major shapes.
type Weights = BTreeMap<String, (Vec<usize>, Vec<f32>)>;

fn random_weights(rng: &mut SplitMix64, t: &Tiny) -> Weights {
    let mut w = Weights::new();
    let mut put = |name: String, shape: Vec<usize>, std: f32| {
        let n = shape.iter().product();
        let values = if std == 0.0 {
            (0..n).map(|_| 1.0 + 0.1 * rng.next_f32()).collect()
        } else {
            rng.normals_f32(n, std)
        };
        w.insert(name, (shape, values));
    };
    let (h, q, kv) = (t.hidden, t.heads * t.head_dim, t.kv_heads * t.head_dim);
    put("model.embed_tokens.weight".into(), vec![t.vocab, h], 1.0);
    put("model.norm.weight".into(), vec![h], 0.0);
    if !t.tied {
        put("lm_head.weight".into(), vec![t.vocab, h], 0.1);
    }
    for l in 0..t.layers {
        let p = format!("model.layers.{l}");
        put(format!("{p}.input_layernorm.weight"), vec![h], 0.0);
        put(format!("{p}.post_attention_layernorm.weight"), vec![h], 0.0);
        for (m, out, inn) in [
            ("self_attn.q_proj", q, h),
            ("self_attn.k_proj", kv, h),
            ("self_attn.v_proj", kv, h),
            ("self_attn.o_proj", h, q),
            ("mlp.gate_proj", t.ffn, h),
            ("mlp.up_proj", t.ffn, h),
            ("mlp.down_proj", h, t.ffn),
        ] {
            put(format!("{p}.{m}.weight"), vec![out, inn], 0.15);
            if t.qkv_bias
                && ["q_proj", "k_proj", "v_proj"]
                    .iter()
                    .any(|x| m.ends_with(x))
            {
                put(format!("{p}.{m}.bias"), vec![out], 0.1);
            }
        }
    }
    w
}

/// The GGUF name of a Hugging Face weight name (the inverse of `gguf::names::hf_name`).
fn gguf_name(hf: &str) -> String {
    let fixed = [
        ("model.embed_tokens.weight", "token_embd.weight"),
        ("model.norm.weight", "output_norm.weight"),
        ("lm_head.weight", "output.weight"),
    ];
    if let Some((_, g)) = fixed.iter().find(|(h, _)| *h == hf) {
        return g.to_string();
    }
    let rest = hf.strip_prefix("model.layers.").unwrap();
    let (layer, module) = rest.split_once('.').unwrap();
    let g = match module {
        "input_layernorm.weight" => "attn_norm",
        "post_attention_layernorm.weight" => "ffn_norm",
        "self_attn.q_proj.weight" => "attn_q",
        "self_attn.k_proj.weight" => "attn_k",
        "self_attn.v_proj.weight" => "attn_v",
        "self_attn.o_proj.weight" => "attn_output",
        "mlp.gate_proj.weight" => "ffn_gate",
        "mlp.up_proj.weight" => "ffn_up",
        "mlp.down_proj.weight" => "ffn_down",
        other => panic!("{other}"),
    };
    format!("blk.{layer}.{g}.weight")
}

/// A llama-architecture GGUF as llama.cpp's converter writes one: F32 tensors, Q and K rows
/// permuted, a byte-level BPE tokenizer and a chat template in the metadata.
fn write_gguf_source(path: &Path, w: &Weights) {
    let s = |v: &str| MetaValue::String(v.into());
    let u = MetaValue::U32;
    let toks = tokens();
    let metadata: Vec<(String, MetaValue)> = vec![
        ("general.architecture".into(), s("llama")),
        ("general.name".into(), s("tiny")),
        ("llama.context_length".into(), u(128)),
        ("llama.embedding_length".into(), u(HIDDEN as u32)),
        ("llama.block_count".into(), u(LAYERS as u32)),
        ("llama.feed_forward_length".into(), u(FFN as u32)),
        ("llama.attention.head_count".into(), u(HEADS as u32)),
        ("llama.attention.head_count_kv".into(), u(KV_HEADS as u32)),
        ("llama.rope.dimension_count".into(), u(HEAD_DIM as u32)),
        (
            "llama.attention.layer_norm_rms_epsilon".into(),
            MetaValue::F32(1e-5),
        ),
        ("llama.rope.freq_base".into(), MetaValue::F32(10000.0)),
        ("tokenizer.ggml.model".into(), s("gpt2")),
        ("tokenizer.ggml.pre".into(), s("gpt-2")),
        (
            "tokenizer.ggml.tokens".into(),
            MetaValue::Array(toks.iter().map(|t| s(t)).collect()),
        ),
        (
            "tokenizer.ggml.token_type".into(),
            MetaValue::Array(
                (0..toks.len())
                    .map(|i| MetaValue::I32(if i == 0 { 3 } else { 1 }))
                    .collect(),
            ),
        ),
        (
            "tokenizer.ggml.merges".into(),
            MetaValue::Array(MERGES.iter().map(|m| s(m)).collect()),
        ),
        ("tokenizer.ggml.bos_token_id".into(), u(0)),
        ("tokenizer.ggml.eos_token_id".into(), u(0)),
        (
            "tokenizer.chat_template".into(),
            s("{% for m in messages %}{{ m['content'] }}{% endfor %}"),
        ),
        ("general.file_type".into(), u(0)),
    ];
    let names: Vec<&String> = w.keys().collect();
    let tensors: Vec<TensorOut> = names
        .iter()
        .map(|n| TensorOut {
            name: gguf_name(n),
            shape: w[*n].0.clone(),
            ggml_type: GgmlType::F32,
        })
        .collect();
    write_gguf(path, &metadata, &tensors, |i| {
        let (shape, values) = &w[names[i]];
        let heads = if names[i].contains("q_proj") {
            HEADS
        } else if names[i].contains("k_proj") {
            KV_HEADS
        } else {
            0
        };
        let v = if heads > 0 {
            permute_rows(values, shape[0], shape[1], heads).unwrap()
        } else {
            values.clone()
        };
        encode(tensors[i].ggml_type, &v)
    })
    .unwrap();
}

/// A word-level tokenizer.json over [`tokens`].
fn word_level_tokenizer() -> String {
    let vocab: Vec<String> = tokens()
        .iter()
        .enumerate()
        .map(|(i, t)| format!("\"{t}\": {i}"))
        .collect();
    format!(
        r#"{{"version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {{"type": "Whitespace"}}, "post_processor": null,
        "decoder": null, "model": {{"type": "WordLevel", "vocab": {{{}}}, "unk_token": "<|endoftext|>"}}}}"#,
        vocab.join(", ")
    )
}

/// A Hugging Face folder with the weights `w` of shape `t` (f32 safetensors): a word-level
/// tokenizer over [`tokens`], or a real `tokenizer.json` and `tokenizer_config.json` copied
/// from `tokenizer`; `extra` adds config.json fields.
fn write_hf_source(dir: &Path, t: &Tiny, w: &Weights, tokenizer: Option<&Path>, extra: &str) {
    std::fs::create_dir_all(dir).unwrap();
    let config = format!(
        r#"{{"model_type": "{}", "hidden_size": {}, "intermediate_size": {},
        "num_hidden_layers": {}, "num_attention_heads": {}, "num_key_value_heads": {},
        "head_dim": {}, "vocab_size": {}, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "max_position_embeddings": 128, "tie_word_embeddings": {}, "bos_token_id": 0,
        "eos_token_id": 0, "torch_dtype": "float32"{extra}}}"#,
        t.arch, t.hidden, t.ffn, t.layers, t.heads, t.kv_heads, t.head_dim, t.vocab, t.tied
    );
    std::fs::write(dir.join("config.json"), config).unwrap();
    match tokenizer {
        Some(src) => {
            for f in ["tokenizer.json", "tokenizer_config.json"] {
                std::fs::copy(src.join(f), dir.join(f)).unwrap();
            }
        }
        None => std::fs::write(dir.join("tokenizer.json"), word_level_tokenizer()).unwrap(),
    }
    let views: Vec<(String, TensorView)> = w
        .iter()
        .map(|(n, (shape, v))| {
            let bytes: &[u8] = bytemuck::cast_slice(v);
            (
                n.clone(),
                TensorView::new(Dtype::F32, shape.clone(), bytes).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
}

/// A rank-4 adapter on every linear module with A and B both random (PEFT starts B at zero,
/// which would make the merge a no-op), saved as PEFT's folder.
fn random_adapter(model: &LoadedModel, rng: &mut SplitMix64, dir: &Path) -> LoraWeights {
    let config = LoraConfig {
        r: 4,
        lora_alpha: 8.0,
        target_modules: vec![ALL_LINEAR.to_owned()],
        ..LoraConfig::default()
    };
    let mut lora = LoraWeights::zeros(&config, &linear_targets(&model.config)).unwrap();
    let n = lora.data.len();
    lora.data = rng.normals_f32(n, 0.1);
    lora.save_peft(dir, None).unwrap();
    lora
}

fn logits(model: &LoadedModel, adapter: Option<&LoraAdapter>, ids: &[u32]) -> Vec<f32> {
    let m = LlamaModel::from_loaded(model, Rounding::EXACT).unwrap();
    m.forward(&Batch::packed(&[ids.to_vec()]), adapter).unwrap()
}

fn rel_err(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    got.iter()
        .zip(want)
        .fold(0f32, |m, (g, w)| m.max((g - w).abs()))
        / scale
}

struct Case {
    seed: u64,
    dir: tempfile::TempDir,
    base: LoadedModel,
    lora: LoraWeights,
    /// Logits of the base model running the adapter unmerged.
    want: Vec<f32>,
    ids: Vec<u32>,
}

impl Case {
    /// A fresh random model (`gguf`: as a GGUF file, else a Hugging Face folder) and adapter.
    fn new(gguf: bool) -> Self {
        let seed = ftrt_runtime::rng::fresh_seed();
        let mut rng = SplitMix64::new(seed);
        let dir = tempfile::tempdir().unwrap();
        let vocab = tokens().len();
        let w = random_weights(&mut rng, &TINY);
        let src = if gguf {
            let p = dir.path().join("base.gguf");
            write_gguf_source(&p, &w);
            p
        } else {
            let p = dir.path().join("base");
            write_hf_source(&p, &TINY, &w, None, "");
            p
        };
        let base = open_model(&src).unwrap();
        let lora = random_adapter(&base, &mut rng, &dir.path().join("adapter"));
        let adapter = LoraAdapter::load_peft(
            &dir.path().join("adapter"),
            &LlamaModel::from_loaded(&base, Rounding::EXACT)
                .unwrap()
                .dims,
        )
        .unwrap();
        let ids: Vec<u32> = (0..12).map(|_| rng.below(vocab) as u32).collect();
        let want = logits(&base, Some(&adapter), &ids);
        Self {
            seed,
            dir,
            base,
            lora,
            want,
            ids,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn export(
        &self,
        format: ExportFormat,
        dtype: ExportDtype,
        name: &str,
        shard: usize,
    ) -> Result<LoadedModel, String> {
        let merged = MergedWeights::new(&self.base, Some(&self.lora));
        let out = self.path(name);
        match format {
            ExportFormat::Safetensors => write_hf_folder(&merged, dtype, &out, shard, &mut |_| {})?,
            ExportFormat::Gguf => write_gguf_file(&merged, dtype, &out, &mut |_| {})?,
        }
        open_model(&out).map_err(|e| e.to_string())
    }
}

/// Hugging Face folder in, Hugging Face folder out: f32 matches the unmerged adapter, a
/// sharded export holds the same values, bf16 is within its rounding; the tokenizer file is
/// copied and the config records the dtype.
#[test]
fn merged_folder_matches_the_adapter_run_unmerged() {
    let c = Case::new(false);
    let f32_model = c
        .export(
            ExportFormat::Safetensors,
            ExportDtype::F32,
            "f32",
            MAX_SHARD_BYTES,
        )
        .unwrap();
    let merged = logits(&f32_model, None, &c.ids);
    let err = rel_err(&merged, &c.want);
    assert!(err < 1e-5, "f32 merge: rel err {err:.2e} (seed {})", c.seed);
    assert_ne!(
        merged,
        logits(&c.base, None, &c.ids),
        "the adapter changes the logits"
    );
    assert_eq!(f32_model.config.torch_dtype.as_deref(), Some("float32"));
    assert_eq!(
        std::fs::read(c.path("f32/tokenizer.json")).unwrap(),
        std::fs::read(c.path("base/tokenizer.json")).unwrap()
    );
    assert!(c.path("f32/model.safetensors").is_file());

    let sharded = c
        .export(
            ExportFormat::Safetensors,
            ExportDtype::F32,
            "sharded",
            40_000,
        )
        .unwrap();
    assert!(c.path("sharded/model.safetensors.index.json").is_file());
    let shards = std::fs::read_dir(c.path("sharded"))
        .unwrap()
        .filter(|e| {
            let n = e
                .as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .into_owned();
            n.starts_with("model-") && n.ends_with(".safetensors")
        })
        .count();
    assert!(shards >= 2, "{shards} shards of at most 40 kB");
    assert_eq!(logits(&sharded, None, &c.ids), merged);

    let bf16_model = c
        .export(
            ExportFormat::Safetensors,
            ExportDtype::BF16,
            "bf16",
            MAX_SHARD_BYTES,
        )
        .unwrap();
    assert_eq!(bf16_model.config.torch_dtype.as_deref(), Some("bfloat16"));
    let err = rel_err(&logits(&bf16_model, None, &c.ids), &c.want);
    assert!(
        err < 3e-2,
        "bf16 merge: rel err {err:.2e} (seed {})",
        c.seed
    );

    let e = c
        .export(
            ExportFormat::Gguf,
            ExportDtype::F16,
            "x.gguf",
            MAX_SHARD_BYTES,
        )
        .err()
        .unwrap();
    assert!(e.contains("not BPE"), "{e}");
    let e = c
        .export(
            ExportFormat::Safetensors,
            ExportDtype::Q8_0,
            "q8",
            MAX_SHARD_BYTES,
        )
        .err()
        .unwrap();
    assert!(e.contains("f32, f16 or bf16"), "{e}");
}

/// GGUF in, GGUF and Hugging Face folder out: the GGUF f32 export matches the unmerged adapter
/// (its Q/K rows re-permuted: the reader un-permutes them), Q8_0 holds each value within half
/// a step of the f32 export (logits within 10%: a 2-layer model of random weights), with
/// llama.cpp's file type and the tokenizer metadata kept, and the folder export gives the same
/// logits, config and token ids.
#[test]
fn merged_gguf_and_its_folder_match_the_adapter_run_unmerged() {
    let c = Case::new(true);
    let g32 = c
        .export(ExportFormat::Gguf, ExportDtype::F32, "m32.gguf", 0)
        .unwrap();
    let merged = logits(&g32, None, &c.ids);
    let err = rel_err(&merged, &c.want);
    assert!(err < 1e-5, "f32 merge: rel err {err:.2e} (seed {})", c.seed);
    assert_ne!(merged, logits(&c.base, None, &c.ids));

    let q8 = c
        .export(ExportFormat::Gguf, ExportDtype::Q8_0, "m8.gguf", 0)
        .unwrap();
    let err = rel_err(&logits(&q8, None, &c.ids), &c.want);
    assert!(err < 0.1, "q8_0 merge: rel err {err:.2e} (seed {})", c.seed);
    let src = GgufFile::open(&c.path("base.gguf")).unwrap();
    let out = GgufFile::open(&c.path("m8.gguf")).unwrap();
    let exact = GgufFile::open(&c.path("m32.gguf")).unwrap();
    // every Q8_0 value within half a step (plus the f16 scale's rounding) of the f32 export
    for t in out.tensors() {
        let (got, want) = (
            out.dequantize(&t.name).unwrap(),
            exact.dequantize(&t.name).unwrap(),
        );
        for (g, w) in got.chunks(32).zip(want.chunks(32)) {
            let d = w.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0;
            let slack = 0.5 * d + 127.0 * (half::f16::from_f32(d).to_f32() - d).abs();
            for (a, b) in g.iter().zip(w) {
                assert!(
                    (a - b).abs() <= slack * 1.0001,
                    "{} (seed {})",
                    t.name,
                    c.seed
                );
            }
        }
    }
    assert_eq!(out.get("general.file_type"), Some(&MetaValue::U32(7)));
    assert_eq!(
        out.get("general.quantization_version"),
        Some(&MetaValue::U32(2))
    );
    for key in [
        "tokenizer.ggml.tokens",
        "tokenizer.ggml.merges",
        "tokenizer.chat_template",
    ] {
        assert_eq!(out.get(key), src.get(key), "{key}");
    }
    let t = out.tensor("blk.0.ffn_down.weight").unwrap();
    assert_eq!(t.ggml_type, GgmlType::Q8_0);
    let t = out.tensor("blk.0.attn_norm.weight").unwrap();
    assert_eq!(t.ggml_type, GgmlType::F32);

    let folder = c
        .export(
            ExportFormat::Safetensors,
            ExportDtype::F32,
            "hf",
            MAX_SHARD_BYTES,
        )
        .unwrap();
    assert_eq!(logits(&folder, None, &c.ids), merged);
    let mut want_config = g32.config.clone();
    want_config.torch_dtype = Some("float32".into());
    assert_eq!(folder.config, want_config);
    let text = "ab a cab";
    let ids = |m: &LoadedModel| m.tokenizer.encode(text, false).unwrap().get_ids().to_vec();
    assert_eq!(ids(&folder), ids(&c.base));
    assert_eq!(
        folder.tokenizer_config.chat_template,
        c.base.tokenizer_config.chat_template
    );
}

/// Hugging Face folders with real tokenizers (Llama 3 with llama3 rope scaling; Qwen2 with q/k/v
/// biases, tied embeddings and a vocabulary padded past the tokenizer's; SmolLM2), exported to
/// GGUF with an adapter: the metadata llama.cpp reads (the pre-tokenizer named by what it
/// does, bos added where the tokenizer adds it, the rope factors), the GGUF reader's model gives
/// the adapter's logits, and its tokenizer gives llama.cpp's own token ids (`ggml-vocab-*`
/// vectors) or, for SmolLM2, the folder's.
#[test]
fn folders_with_real_tokenizers_export_to_gguf() {
    let llama3_rope = r#", "rope_scaling": {"rope_type": "llama3", "factor": 8.0,
        "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 16}"#;
    // tokenizer, model_type, vocab, tied, biases, config extra, vectors, pre, add_bos (stated
    // only where the folder says; else llama.cpp's default for the pre-tokenizer)
    let cases = [
        (
            "llama3",
            "llama",
            128256,
            false,
            false,
            llama3_rope,
            Some("llama-bpe"),
            "llama-bpe",
            None,
        ),
        (
            "qwen3",
            "qwen2",
            151680,
            true,
            true,
            "",
            Some("qwen2"),
            "qwen2",
            Some(false),
        ),
        (
            "smollm2", "llama", 49152, true, false, "", None, "smollm", None,
        ),
    ];
    for (tok, arch, vocab, tied, qkv_bias, extra, vectors, pre, add_bos) in cases {
        let seed = ftrt_runtime::rng::fresh_seed();
        let mut rng = SplitMix64::new(seed);
        let dir = tempfile::tempdir().unwrap();
        let t = Tiny {
            arch,
            hidden: 32,
            heads: 4,
            kv_heads: 2,
            head_dim: 8,
            ffn: 64,
            layers: 2,
            vocab,
            tied,
            qkv_bias,
        };
        let src = dir.path().join(tok);
        let w = random_weights(&mut rng, &t);
        write_hf_source(
            &src,
            &t,
            &w,
            Some(&assets().join("tokenizers").join(tok)),
            extra,
        );
        let base = open_model(&src).unwrap();
        let lora = random_adapter(&base, &mut rng, &dir.path().join("adapter"));
        let dims = LlamaModel::from_loaded(&base, Rounding::EXACT)
            .unwrap()
            .dims;
        let adapter = LoraAdapter::load_peft(&dir.path().join("adapter"), &dims).unwrap();
        let ids: Vec<u32> = (0..12).map(|_| rng.below(vocab) as u32).collect();
        let want = logits(&base, Some(&adapter), &ids);

        let out = dir.path().join("m.gguf");
        let merged = MergedWeights::new(&base, Some(&lora));
        write_gguf_file(&merged, ExportDtype::F32, &out, &mut |_| {}).unwrap();
        let f = GgufFile::open(&out).unwrap();
        let gguf_arch = if arch == "qwen2" { "qwen2" } else { "llama" };
        assert_eq!(
            f.get("general.architecture").and_then(MetaValue::as_str),
            Some(gguf_arch)
        );
        assert_eq!(
            f.get("tokenizer.ggml.pre").and_then(MetaValue::as_str),
            Some(pre),
            "{tok}"
        );
        assert_eq!(
            f.get("tokenizer.ggml.add_bos_token"),
            add_bos.map(MetaValue::Bool).as_ref(),
            "{tok}"
        );
        let n_tokens = f
            .get("tokenizer.ggml.tokens")
            .and_then(MetaValue::as_array)
            .unwrap()
            .len();
        assert_eq!(n_tokens, vocab, "{tok}");
        assert_eq!(
            f.tensor("rope_freqs.weight").is_some(),
            !extra.is_empty(),
            "{tok}"
        );
        assert_eq!(f.tensor("output.weight").is_none(), tied, "{tok}");

        let exported = open_model(&out).unwrap();
        let err = rel_err(&logits(&exported, None, &ids), &want);
        assert!(err < 1e-5, "{tok}: rel err {err:.2e} (seed {seed})");
        let (c, e) = (&base.config, &exported.config);
        assert_eq!(
            (
                c.hidden_size,
                c.intermediate_size,
                c.num_hidden_layers,
                c.num_attention_heads
            ),
            (
                e.hidden_size,
                e.intermediate_size,
                e.num_hidden_layers,
                e.num_attention_heads
            )
        );
        assert_eq!(
            (
                c.num_key_value_heads,
                c.head_dim,
                c.vocab_size,
                c.tie_word_embeddings,
                c.qkv_bias
            ),
            (
                e.num_key_value_heads,
                e.head_dim,
                e.vocab_size,
                e.tie_word_embeddings,
                e.qkv_bias
            )
        );
        assert_eq!(
            (c.rms_norm_eps, c.rope_theta),
            (e.rms_norm_eps, e.rope_theta)
        );

        let encode = |m: &LoadedModel, text: &str| {
            m.tokenizer.encode(text, false).unwrap().get_ids().to_vec()
        };
        match vectors {
            Some(v) => {
                let cases = vocab_vectors(v);
                assert!(cases.len() > 40, "{v}");
                for (text, ids) in &cases {
                    assert_eq!(&encode(&exported, text), ids, "{tok}: {text:?}");
                }
            }
            None => {
                for (text, _) in vocab_vectors("gpt-2") {
                    assert_eq!(
                        encode(&exported, &text),
                        encode(&base, &text),
                        "{tok}: {text:?}"
                    );
                }
            }
        }
    }
}

/// A bitsandbytes `load_in_4bit` save (the fixture transformers and bitsandbytes wrote) converted
/// to a dense folder: no `quantization_config` left, and the logits transformers computed on
/// the dequantized weights.
#[test]
fn a_4bit_checkpoint_exports_dense() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama/bnb4bit");
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("bnb");
    std::fs::create_dir_all(&src).unwrap();
    for f in ["config.json", "generation_config.json", "model.safetensors"] {
        std::fs::copy(fixture.join(f), src.join(f)).unwrap();
    }
    std::fs::write(src.join("tokenizer.json"), word_level_tokenizer()).unwrap();
    let base = open_model(&src).unwrap();
    assert!(base.weights.has_bnb_4bit());
    let out = dir.path().join("dense");
    write_hf_folder(
        &MergedWeights::new(&base, None),
        ExportDtype::F32,
        &out,
        MAX_SHARD_BYTES,
        &mut |_| {},
    )
    .unwrap();
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert!(config.get("quantization_config").is_none());
    let dense = open_model(&out).unwrap();
    assert!(!dense.weights.has_bnb_4bit());
    let golden = SafetensorsFiles::open(&fixture.join("golden.safetensors")).unwrap();
    let prompts: [&[u32]; 2] = [&[1, 17, 33, 5, 99, 64, 2, 120, 45], &[7, 3, 88, 12, 127]];
    for (i, p) in prompts.iter().enumerate() {
        let want = golden.to_f32(&format!("logits.{i}")).unwrap();
        let err = rel_err(&logits(&dense, None, p), &want);
        assert!(err < 2e-5, "prompt {i}: max rel err {err:e}");
    }
}
