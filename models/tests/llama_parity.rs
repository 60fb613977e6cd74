//! Llama-family CPU forward, decode and LoRA backward against transformers + PEFT goldens
//! (fixtures/llama/gen_llama_fixtures.py): tiny random Llama (llama3 rope scaling, tied
//! embeddings), Mistral (sliding window 4), Qwen2 (q/k/v bias), Qwen3 (q/k norm, head_dim 32).

mod llama_common;

use ftrt_models::llama::{Batch, LoraAdapter, Proj, Rounding, SamplingParams};
use llama_common::{dir, model, prompts, rel_err, Golden, ARCHS, TOL};

#[test]
fn prefill_logits_match_transformers() {
    for arch in ARCHS {
        let m = model(arch, Rounding::F32);
        let g = Golden::open(arch);
        for (i, p) in prompts().iter().enumerate() {
            let got = m
                .forward(&Batch::packed(std::slice::from_ref(p)), None)
                .unwrap();
            let e = rel_err(&got, &g.f(&format!("logits.{i}")));
            eprintln!("{arch} prompt {i}: prefill rel err {e:.2e}");
            assert!(e < TOL, "{arch} prompt {i}: rel err {e:e}");
        }
    }
}

#[test]
fn packed_prefill_equals_separate_runs() {
    for arch in ARCHS {
        let m = model(arch, Rounding::F32);
        let g = Golden::open(arch);
        let got = m.forward(&Batch::packed(&prompts()), None).unwrap();
        let want: Vec<f32> = (0..3).flat_map(|i| g.f(&format!("logits.{i}"))).collect();
        let e = rel_err(&got, &want);
        assert!(e < TOL, "{arch} packed: rel err {e:e}");
        // Selected rows only: the last token of each sequence.
        let b = Batch::packed(&prompts());
        let rows = b.last_rows();
        let sel = m.forward_rows(&b, &rows, None).unwrap();
        let v = m.dims.vocab;
        for (j, &r) in rows.iter().enumerate() {
            // (few rows take the dot-product path, many the packed GEMM: same sums, other order)
            assert!(rel_err(&sel[j * v..(j + 1) * v], &got[r * v..(r + 1) * v]) < 1e-6);
        }
    }
}

#[test]
fn decode_with_kv_cache_matches_transformers_step_by_step() {
    for arch in ARCHS {
        let m = model(arch, Rounding::F32);
        let g = Golden::open(arch);
        let ps = prompts();
        let v = m.dims.vocab;
        let mut cache = m.new_cache(ps.len());
        let slots: Vec<usize> = (0..ps.len()).collect();
        let mut logits = m.prefill(&mut cache, &slots, &ps, None).unwrap();
        let (toks, dec) = g.decode_goldens(ps.len());
        let steps = toks[0].len();
        let mut worst = 0.0f64;
        for s in 0..steps {
            for i in 0..ps.len() {
                let e = rel_err(&logits[i * v..(i + 1) * v], &dec[i][s * v..(s + 1) * v]);
                worst = worst.max(e);
                assert!(e < TOL, "{arch} seq {i} step {s}: rel err {e:e}");
            }
            if s + 1 < steps {
                let next: Vec<u32> = toks.iter().map(|t| t[s] as u32).collect();
                logits = m.decode(&mut cache, &slots, &next, None).unwrap();
            }
        }
        eprintln!("{arch}: decode worst rel err {worst:.2e}");
        for (i, p) in ps.iter().enumerate() {
            assert_eq!(cache.len(i), p.len() + steps - 1);
        }
        // Greedy generation reproduces transformers' continuation.
        let got = m
            .generate(&ps, steps, &[], SamplingParams::default(), None)
            .unwrap();
        for i in 0..ps.len() {
            let want: Vec<u32> = toks[i].iter().map(|&t| t as u32).collect();
            assert_eq!(got[i], want, "{arch} greedy continuation of prompt {i}");
        }
    }
}

#[test]
fn decode_of_one_slot_leaves_the_others_alone() {
    let m = model("qwen2", Rounding::F32);
    let g = Golden::open("qwen2");
    let ps = prompts();
    let v = m.dims.vocab;
    let mut cache = m.new_cache(3);
    m.prefill(&mut cache, &[0, 1, 2], &ps, None).unwrap();
    let t1 = g.ints("tokens.1");
    let l = m.decode(&mut cache, &[1], &[t1[0] as u32], None).unwrap();
    let want = g.f("decode_logits.1");
    assert!(rel_err(&l, &want[v..2 * v]) < TOL);
    assert_eq!((cache.len(0), cache.len(1), cache.len(2)), (9, 6, 1));
}

#[test]
fn bf16_semantics_stay_close_to_f32() {
    for arch in ARCHS {
        let m32 = model(arch, Rounding::F32);
        let m16 = model(arch, Rounding::BF16);
        let b = Batch::packed(&prompts());
        let a = m32.forward(&b, None).unwrap();
        let c = m16.forward(&b, None).unwrap();
        let e = rel_err(&c, &a);
        eprintln!("{arch}: bf16 vs f32 logits rel err {e:.2e}");
        assert!(e < 5e-2, "{arch} bf16 vs f32: {e:e}");
        assert!(e > 1e-6, "{arch}: bf16 rounding had no effect");
    }
}

#[test]
fn bad_input_is_an_error_not_a_panic() {
    let m = model("llama", Rounding::F32);
    assert!(m.forward(&Batch::packed(&[vec![1, 500]]), None).is_err());
    let mut b = Batch::packed(&prompts());
    b.cu_seqlens[1] = 100;
    assert!(m.forward(&b, None).is_err());
    let b = Batch::packed(&prompts());
    assert!(m.loss(&b, &vec![3; b.len() - 1], None).is_err());
    assert!(m.loss(&b, &vec![128; b.len()], None).is_err());
    let mut cache = m.new_cache(1);
    assert!(m.prefill(&mut cache, &[1], &[vec![1]], None).is_err());
    assert!(m.prefill(&mut cache, &[0], &[vec![]], None).is_err());
}

fn train_batch(g: &Golden) -> (Batch, Vec<i32>) {
    let ids: Vec<u32> = g.ints("train.ids").into_iter().map(|t| t as u32).collect();
    let cu = g.ints("train.cu_seqlens");
    let seqs: Vec<Vec<u32>> = cu
        .windows(2)
        .map(|w| ids[w[0] as usize..w[1] as usize].to_vec())
        .collect();
    let b = Batch::packed(&seqs);
    assert_eq!(b.cu_seqlens, cu);
    (b, g.ints("train.targets"))
}

#[test]
fn loss_matches_transformers_with_chunked_vocabulary() {
    for arch in ARCHS {
        let mut m = model(arch, Rounding::F32);
        let g = Golden::open(arch);
        let (b, t) = train_batch(&g);
        let ad = LoraAdapter::load_peft(&dir(arch).join("adapter"), &m.dims).unwrap();
        let want = g.f("train.loss")[0] as f64;
        for chunk in [8192, 50, 7] {
            m.vocab_chunk = chunk;
            let got = m.loss(&b, &t, Some(&ad)).unwrap() as f64;
            assert!(
                (got - want).abs() / want < TOL,
                "{arch} chunk {chunk}: loss {got} vs {want}"
            );
        }
    }
}

#[test]
fn lora_gradients_match_peft() {
    for arch in ARCHS {
        let mut m = model(arch, Rounding::F32);
        m.vocab_chunk = 48;
        let g = Golden::open(arch);
        let (b, t) = train_batch(&g);
        let ad = LoraAdapter::load_peft(&dir(arch).join("adapter"), &m.dims).unwrap();
        if m.config.sliding_window.is_some_and(|w| w < 10) {
            // Mistral's window binds on this batch; the training attention has no window.
            assert!(m.loss_and_lora_grads(&b, &t, &ad).is_err());
            continue;
        }
        let (loss, grads) = m.loss_and_lora_grads(&b, &t, &ad).unwrap();
        let want = g.f("train.loss")[0];
        assert!(
            ((loss - want) / want).abs() < 1e-5,
            "{arch}: loss {loss} vs {want}"
        );
        let mut checked = 0;
        let mut worst = 0.0f64;
        for l in 0..m.dims.layers {
            for p in Proj::ALL {
                for which_b in [false, true] {
                    let key = format!("grad.{}", LoraAdapter::peft_name(l, p, which_b));
                    assert!(g.has(&key), "{key} missing from the golden");
                    let got = if which_b {
                        grads.b(l, p)
                    } else {
                        grads.a(l, p)
                    }
                    .unwrap();
                    let e = rel_err(got, &g.f(&key));
                    worst = worst.max(e);
                    assert!(e < 1e-5, "{arch} {key}: rel err {e:e}");
                    checked += 1;
                }
            }
        }
        assert_eq!(checked, m.dims.layers * 14);
        eprintln!("{arch}: loss {loss} vs {want}, worst LoRA grad rel err {worst:.2e}");
    }
}

#[test]
fn recorded_forward_matches_inference_forward() {
    for arch in ["llama", "qwen2", "qwen3"] {
        let m = model(arch, Rounding::F32);
        let b = Batch::packed(&prompts());
        let acts = m.forward_record(&b, None).unwrap();
        let rows: Vec<usize> = (0..b.len()).collect();
        let a = m.logits_of(&acts.ln_f, &rows).unwrap();
        let c = m.forward(&b, None).unwrap();
        assert!(rel_err(&a, &c) < 1e-6, "{arch}");
        assert_eq!(acts.layers.len(), m.dims.layers);
    }
}
