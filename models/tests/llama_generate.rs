//! Sampling, prompt files and LoRA-adapted generation on the tiny fixture models.

use std::path::PathBuf;

use ftrt_models::checkpoint::WeightSource;
use ftrt_models::llama::{
    parse_prompts_jsonl, Batch, LlamaModel, LoraAdapter, Prompt, Rounding, Sampler, SamplingParams,
};
use ftrt_models::safetensors_io::SafetensorsFiles;
use ftrt_models::ModelConfig;

fn dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/llama")
        .join(name)
}

fn model(name: &str) -> LlamaModel {
    let d = dir(name);
    let config = ModelConfig::from_file(&d.join("config.json")).unwrap();
    let weights = WeightSource::Safetensors(SafetensorsFiles::open(&d).unwrap());
    LlamaModel::new(&config, &weights, Rounding::F32).unwrap()
}

#[test]
fn sampler_greedy_topk_topp_and_seeds() {
    let logits = [0.1f32, 3.0, 2.9, -1.0, 0.5];
    let greedy = |p: SamplingParams| Sampler::new(p).pick(&logits);
    assert_eq!(greedy(SamplingParams::default()), 1);
    // top-k 1 and a tiny top-p are greedy whatever the temperature and seed.
    for seed in 0..20 {
        assert_eq!(
            greedy(SamplingParams {
                temperature: 5.0,
                top_k: 1,
                seed,
                ..Default::default()
            }),
            1
        );
        assert_eq!(
            greedy(SamplingParams {
                temperature: 5.0,
                top_p: 0.01,
                seed,
                ..Default::default()
            }),
            1
        );
    }
    // top-k 2 only ever picks the two best; both appear; a seed repeats its draws.
    let draw = |seed| {
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            top_k: 2,
            seed,
            ..Default::default()
        });
        (0..200).map(|_| s.pick(&logits)).collect::<Vec<_>>()
    };
    let a = draw(7);
    assert!(a.iter().all(|&t| t == 1 || t == 2));
    assert!(a.contains(&1) && a.contains(&2));
    assert_eq!(a, draw(7));
    assert_ne!(a, draw(8));
}

#[test]
fn prompt_files_parse_or_name_the_bad_line() {
    let text = r#""plain string"
{"prompt": "p"}

{"text": "t"}
{"instruction": "Translate", "input": "bonjour"}
{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]}
"#;
    let ps = parse_prompts_jsonl(text).unwrap();
    assert_eq!(ps.len(), 5);
    assert_eq!(ps[0], Prompt::Text("plain string".into()));
    assert_eq!(ps[3], Prompt::Text("Translate\n\nbonjour".into()));
    assert!(matches!(&ps[4], Prompt::Messages(m) if m.len() == 2 && m[1].content == "u"));
    let err = parse_prompts_jsonl("{\"prompt\": \"a\"}\n{oops\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("line 2"), "{err}");
    let err = parse_prompts_jsonl("{\"messages\": [{\"role\": \"user\"}]}")
        .unwrap_err()
        .to_string();
    assert!(err.contains("line 1") && err.contains("content"), "{err}");
    assert!(parse_prompts_jsonl("\n\n").is_err());
    assert!(parse_prompts_jsonl("{\"other\": 1}").is_err());
}

#[test]
fn lora_adapter_changes_generation_consistently() {
    let m = model("qwen3");
    let ad = LoraAdapter::load_peft(&dir("qwen3").join("adapter"), &m.dims).unwrap();
    let prompts = vec![vec![5u32, 9, 33, 71], vec![3u32, 40]];
    let with = m
        .generate(&prompts, 5, &[], SamplingParams::default(), Some(&ad))
        .unwrap();
    // Greedy decoding with the cache equals argmax of full forwards over the growing sequence.
    for (p, g) in prompts.iter().zip(&with) {
        let mut seq = p.clone();
        for &t in g {
            let b = Batch::packed(&[seq.clone()]);
            let l = m.forward_rows(&b, &b.last_rows(), Some(&ad)).unwrap();
            assert_eq!(ftrt_models::llama::sampling::argmax(&l) as u32, t);
            seq.push(t);
        }
    }
    // An adapter for another shape is refused with a reason.
    let other = model("qwen2");
    let err = LoraAdapter::load_peft(&dir("qwen3").join("adapter"), &other.dims)
        .unwrap_err()
        .to_string();
    assert!(err.contains("shape"), "{err}");
    assert!(LoraAdapter::load_peft(&dir("nowhere"), &m.dims).is_err());
}

#[test]
fn generation_stops_at_eos() {
    let m = model("llama");
    let p = vec![vec![1u32, 17, 33]];
    let free = m
        .generate(&p, 6, &[], SamplingParams::default(), None)
        .unwrap();
    let stop = free[0][2];
    let cut = m
        .generate(&p, 6, &[stop], SamplingParams::default(), None)
        .unwrap();
    let first = free[0].iter().position(|&t| t == stop).unwrap();
    assert_eq!(cut[0], free[0][..=first].to_vec());
}
