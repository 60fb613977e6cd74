//! Ten AdamW steps of LoRA training against transformers + PEFT + torch.optim.AdamW on the
//! CPU in f32 (fixtures/llama/gen_adamw_fixtures.py): the loss before each step and the final
//! LoRA A/B, for the tiny random Llama (llama3 rope scaling, tied embeddings) and Qwen2 (q/k/v
//! bias) fixtures. The step is the AdamW op's CPU reference over the adapter's flat data.

mod llama_common;

use ftrt_models::llama::{Batch, LoraAdapter, Proj, Rounding};
use ftrt_models::safetensors_io::SafetensorsFiles;
use ftrt_ops::adamw::adamw;
use llama_common::{dir, model, rel_err};

const ARCHS: [&str; 2] = ["llama", "qwen2"];
const STEPS: usize = 10;
const LOSS_TOL: f64 = 1e-4;
const WEIGHT_TOL: f64 = 1e-4;
// The generator's torch.optim.AdamW hyperparameters.
const LR: f64 = 1e-3;
const BETA1: f64 = 0.9;
const BETA2: f64 = 0.999;
const EPS: f64 = 1e-8;
const WD: f64 = 0.01;

/// The packed training batch and targets of golden.safetensors (as llama_parity.rs builds them).
fn train_batch(g: &SafetensorsFiles) -> (Batch, Vec<i32>) {
    let ints =
        |k: &str| -> Vec<i32> { g.to_f32(k).unwrap().into_iter().map(|v| v as i32).collect() };
    let ids: Vec<u32> = ints("train.ids").into_iter().map(|t| t as u32).collect();
    let cu = ints("train.cu_seqlens");
    let seqs: Vec<Vec<u32>> = cu
        .windows(2)
        .map(|w| ids[w[0] as usize..w[1] as usize].to_vec())
        .collect();
    let b = Batch::packed(&seqs);
    assert_eq!(b.cu_seqlens, cu);
    (b, ints("train.targets"))
}

/// One torch.optim.AdamW step (single-tensor path) on every LoRA weight: the bias corrections
/// are computed in double precision as PyTorch computes them from Python floats.
fn adamw_step(t: i32, p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]) {
    let step_size = LR / (1.0 - BETA1.powi(t));
    let bc2_sqrt = (1.0 - BETA2.powi(t)).sqrt();
    adamw::forward_cpu::<f32>(
        &adamw::Dims { N: p.len() },
        LR as f32,
        WD as f32,
        BETA1 as f32,
        BETA2 as f32,
        EPS as f32,
        step_size as f32,
        bc2_sqrt as f32,
        p,
        g,
        m,
        v,
        Rounding::F32,
    );
}

#[test]
fn ten_adamw_steps_match_peft_and_torch() {
    for arch in ARCHS {
        let mut m = model(arch, Rounding::F32);
        m.vocab_chunk = 48;
        let d = dir(arch);
        let golden = SafetensorsFiles::open(&d.join("golden.safetensors")).unwrap();
        let want = SafetensorsFiles::open(&d.join("adamw10.safetensors")).unwrap();
        let (b, t) = train_batch(&golden);
        let mut ad = LoraAdapter::load_peft(&d.join("adapter"), &m.dims).unwrap();
        let want_loss = want.to_f32("loss").unwrap();
        assert_eq!(want_loss.len(), STEPS);
        let n = ad.data.len();
        let (mut mm, mut vv) = (vec![0f32; n], vec![0f32; n]);
        let mut worst_loss = 0.0f64;
        for (step, &w) in want_loss.iter().enumerate() {
            let (loss, grads) = m.loss_and_lora_grads(&b, &t, &ad).unwrap();
            let w = w as f64;
            let e = (loss as f64 - w).abs() / w.abs();
            eprintln!("{arch} step {step}: loss {loss:.6} vs {w:.6} (rel err {e:.2e})");
            worst_loss = worst_loss.max(e);
            assert!(e < LOSS_TOL, "{arch} step {step}: loss {loss} vs {w}");
            adamw_step(step as i32 + 1, &mut ad.data, &grads.data, &mut mm, &mut vv);
        }
        // The losses fell: the steps did something.
        assert!(want_loss[STEPS - 1] < want_loss[0] - 0.1);
        let mut checked = 0;
        let mut worst = 0.0f64;
        for l in 0..m.dims.layers {
            for p in Proj::ALL {
                for which_b in [false, true] {
                    let key = format!("final.{}", LoraAdapter::peft_name(l, p, which_b));
                    let got = if which_b { ad.b(l, p) } else { ad.a(l, p) }
                        .unwrap_or_else(|| panic!("{arch}: {key} not in the adapter"));
                    let w = want
                        .to_f32(&key)
                        .unwrap_or_else(|e| panic!("{arch}: {key}: {e}"));
                    let e = rel_err(got, &w);
                    worst = worst.max(e);
                    assert!(e < WEIGHT_TOL, "{arch} {key}: rel err {e:e}");
                    checked += 1;
                }
            }
        }
        assert_eq!(checked, m.dims.layers * 14);
        eprintln!(
            "{arch}: worst loss rel err {worst_loss:.2e}, worst final LoRA A/B rel err {worst:.2e}"
        );
    }
}
