//! The training loop on a toy model: gradients by finite differences, the loss falls, runs
//! repeat bit for bit, resume continues the same loss curve (also after a crash during a
//! checkpoint write), gradient accumulation, clipping, outputs.

mod train_common;

use std::path::Path;

use ftrt_models::data::pack;
use ftrt_models::lora::{LoraConfig, LoraWeights};
use ftrt_models::train::atomic::temp_path;
use ftrt_models::train::checkpoint::CHECKPOINT_FILE;
use ftrt_models::train::optim::{clip_grad_norm, grad_norm};
use ftrt_models::train::{LoraModel, OptimKind, TrainConfig, Trainer};
use train_common::{rule_examples, toy_data, Toy};

const V: usize = 16;
const D: usize = 8;

fn lora_cfg(r: usize) -> LoraConfig {
    LoraConfig {
        r,
        lora_alpha: 2.0 * r as f64,
        target_modules: vec!["q_proj".into(), "down_proj".into()],
        ..LoraConfig::default()
    }
}

fn train_cfg(dir: &Path, steps: usize) -> TrainConfig {
    TrainConfig {
        learning_rate: 2e-2,
        warmup_steps: 2,
        max_steps: steps,
        output_dir: dir.to_owned(),
        progress_bar: false,
        save_steps: 5,
        eval_steps: 5,
        ..TrainConfig::default()
    }
}

fn losses_of(model: &mut Toy, cfg: &TrainConfig, lora: LoraWeights) -> Vec<f32> {
    let (train, eval) = toy_data(V, 24);
    let t = Trainer::new(model, lora, &train, &eval, cfg, None).unwrap();
    t.run().unwrap().losses.iter().map(|p| p.1).collect()
}

#[test]
fn toy_gradients_match_finite_differences() {
    let toy = Toy::new(V, D, 3);
    let mut lora = LoraWeights::init(&lora_cfg(3), &toy.lora_shapes(), 5).unwrap();
    // Non-zero B so that every gradient path is exercised.
    for (i, x) in lora.data.iter_mut().enumerate() {
        if *x == 0.0 {
            *x = ((i * 37 % 11) as f32 - 5.0) * 0.05;
        }
    }
    let batch = &pack(&rule_examples(4, V, 9), 64)[0];
    let mut grads = lora.zeros_like();
    toy.loss_f64(batch, &lora, Some(&mut grads));
    let h = 1e-3f32;
    for i in 0..lora.len() {
        let mut p = lora.clone();
        p.data[i] += h;
        let up = toy.loss_f64(batch, &p, None);
        p.data[i] -= 2.0 * h;
        let down = toy.loss_f64(batch, &p, None);
        let fd = (up - down) / (2.0 * h as f64);
        let err = (fd - grads.data[i] as f64).abs();
        assert!(
            err < 1e-3 * (1.0 + fd.abs()),
            "param {i}: fd {fd} analytic {}",
            grads.data[i]
        );
    }
}

#[test]
fn loss_falls_and_outputs_are_written() {
    let dir = tempfile::tempdir().unwrap();
    let mut toy = Toy::new(V, D, 3);
    let lora = LoraWeights::init(&lora_cfg(4), &toy.lora_shapes(), 1).unwrap();
    let cfg = TrainConfig {
        learning_rate: 5e-2,
        ..train_cfg(dir.path(), 60)
    };
    let (train, eval) = toy_data(V, 24);
    let summary = Trainer::new(&mut toy, lora, &train, &eval, &cfg, None)
        .unwrap()
        .run()
        .unwrap();
    let first = summary.losses[0].1;
    let last = summary.losses.last().unwrap().1;
    assert!(last < 0.5 * first, "loss {first} -> {last}");
    assert_eq!(summary.steps, 60);
    assert_eq!(summary.eval_losses.len(), 12);
    assert!(summary.eval_losses[11].1 < summary.eval_losses[0].1);
    // Metrics: one line per step (logging_steps = 1) and one per evaluation.
    let text = std::fs::read_to_string(dir.path().join("metrics.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 72);
    for key in [
        "step",
        "epoch",
        "loss",
        "lr",
        "grad_norm",
        "tokens_per_s",
        "elapsed_s",
    ] {
        assert!(lines[0].get(key).is_some(), "missing {key} in {}", lines[0]);
    }
    assert!(lines.iter().any(|l| l.get("eval_loss").is_some()));
    let svg = std::fs::read_to_string(dir.path().join("loss_curve.svg")).unwrap();
    assert!(svg.contains("<polyline"));
    // The adapter reloads equal to what was trained.
    let back = LoraWeights::load_peft(dir.path(), &toy.lora_shapes()).unwrap();
    assert_eq!(
        back.data,
        Trainer::new(
            &mut toy,
            back.clone(),
            &train,
            &eval,
            &cfg,
            Some(dir.path())
        )
        .unwrap()
        .lora
        .data
    );
}

#[test]
fn runs_repeat_bit_for_bit_and_depend_on_the_seed() {
    let (d1, d2, d3) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    let run = |dir: &Path, seed: u64| {
        let mut toy = Toy::new(V, D, 3);
        let lora = LoraWeights::init(&lora_cfg(4), &toy.lora_shapes(), seed).unwrap();
        let cfg = TrainConfig {
            seed,
            ..train_cfg(dir, 12)
        };
        losses_of(&mut toy, &cfg, lora)
    };
    let (a, b, c) = (run(d1.path(), 7), run(d2.path(), 7), run(d3.path(), 8));
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&a), bits(&b));
    assert_ne!(bits(&a), bits(&c));
}

/// 10 steps in one go vs 5 steps, a fresh process state, and a resume for the other 5.
fn check_resume(optim: OptimKind, d: usize, r: usize, ga: usize, crash: bool) {
    let (full_dir, split_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (train, eval) = toy_data(V, 24);
    let cfg_for = |dir: &Path| TrainConfig {
        optim,
        gradient_accumulation_steps: ga,
        adam: ftrt_models::train::AdamHyper {
            weight_decay: 0.01,
            ..Default::default()
        },
        lr_scheduler_type: ftrt_models::train::SchedulerKind::Cosine,
        ..train_cfg(dir, 10)
    };
    let mut toy = Toy::new(V, d, 3);
    let lora = LoraWeights::init(&lora_cfg(r), &toy.lora_shapes(), 11).unwrap();
    let full = Trainer::new(
        &mut toy,
        lora.clone(),
        &train,
        &eval,
        &cfg_for(full_dir.path()),
        None,
    )
    .unwrap()
    .run()
    .unwrap();

    let cfg = cfg_for(split_dir.path());
    let mut first = Trainer::new(&mut toy, lora.clone(), &train, &eval, &cfg, None).unwrap();
    first.run_until(5).unwrap();
    let ckpt = split_dir.path().join(CHECKPOINT_FILE);
    let saved = std::fs::read(&ckpt).unwrap();
    if crash {
        // Two more steps, then killed while writing the next checkpoint: the temporary file is
        // written, the rename never happens.
        first.train_step().unwrap();
        first.train_step().unwrap();
        first.save_checkpoint_interrupted().unwrap();
        assert!(temp_path(&ckpt).exists());
        assert_eq!(
            std::fs::read(&ckpt).unwrap(),
            saved,
            "the previous checkpoint is untouched"
        );
    }
    drop(first);
    let resumed =
        Trainer::new(&mut toy, lora, &train, &eval, &cfg, Some(split_dir.path())).unwrap();
    assert_eq!(resumed.step_count(), 5);
    let rest = resumed.run().unwrap();
    let bits = |v: &[(usize, f32)]| v.iter().map(|(s, x)| (*s, x.to_bits())).collect::<Vec<_>>();
    assert_eq!(bits(&rest.losses), bits(&full.losses[5..]), "{optim:?}");
    assert_eq!(bits(&rest.eval_losses), bits(&full.eval_losses[1..]));
    assert!(
        !temp_path(&ckpt).exists(),
        "the next save replaced the stale temporary file"
    );
    let a = std::fs::read(full_dir.path().join("adapter_model.safetensors")).unwrap();
    let b = std::fs::read(split_dir.path().join("adapter_model.safetensors")).unwrap();
    assert_eq!(a, b, "same final adapter");
    // The metrics file of the resumed run holds each step once.
    let steps: Vec<u64> =
        ftrt_models::train::metrics::read_lines(&split_dir.path().join("metrics.jsonl"))
            .unwrap()
            .iter()
            .filter(|(v, _)| v.get("loss").is_some())
            .map(|(v, _)| v["step"].as_u64().unwrap())
            .collect();
    assert_eq!(steps, (1..=10).collect::<Vec<_>>());
}

#[test]
fn resume_continues_the_same_loss_curve() {
    check_resume(OptimKind::AdamW, D, 4, 1, false);
}

#[test]
fn resume_with_8bit_adamw_and_accumulation() {
    // d = r = 64: A of q_proj has 4096 values, enough for 8-bit state (bitsandbytes' minimum).
    check_resume(OptimKind::AdamW8bit, 64, 64, 2, false);
}

#[test]
fn a_crash_during_a_checkpoint_write_leaves_the_previous_one_loadable() {
    check_resume(OptimKind::AdamW, D, 4, 1, true);
}

#[test]
fn eight_bit_state_is_used_for_large_tensors_only() {
    let toy = Toy::new(V, 64, 3);
    let lora = LoraWeights::init(&lora_cfg(64), &toy.lora_shapes(), 1).unwrap();
    let opt = ftrt_models::train::Optimizer::new(
        OptimKind::AdamW8bit,
        Default::default(),
        &lora.param_ranges(),
    );
    let kinds: Vec<bool> = opt
        .state
        .iter()
        .map(|s| matches!(s.moments, ftrt_models::train::optim::Moments::Q8 { .. }))
        .collect();
    // q_proj A (64x64), q_proj B (64x64), down_proj A (64x64), down_proj B (16x64 = 1024).
    assert_eq!(kinds, vec![true, true, true, false]);
}

#[test]
fn accumulation_equals_one_big_batch() {
    let dir1 = tempfile::tempdir().unwrap();
    let dir2 = tempfile::tempdir().unwrap();
    let ex = rule_examples(2, V, 5);
    let two = vec![pack(&ex[..1], 64)[0].clone(), pack(&ex[1..], 64)[0].clone()];
    let one = pack(&ex, 64);
    assert_eq!(one.len(), 1);
    let mut toy = Toy::new(V, D, 3);
    let lora = LoraWeights::init(&lora_cfg(4), &toy.lora_shapes(), 1).unwrap();
    let cfg = |dir: &Path, ga| TrainConfig {
        gradient_accumulation_steps: ga,
        warmup_steps: 0,
        ..train_cfg(dir, 1)
    };
    let a = Trainer::new(
        &mut toy,
        lora.clone(),
        &two,
        &[],
        &cfg(dir1.path(), 2),
        None,
    )
    .unwrap()
    .run()
    .unwrap();
    let b = Trainer::new(&mut toy, lora, &one, &[], &cfg(dir2.path(), 1), None)
        .unwrap()
        .run()
        .unwrap();
    assert!(
        (a.losses[0].1 - b.losses[0].1).abs() < 1e-6,
        "{:?} vs {:?}",
        a.losses,
        b.losses
    );
    let wa = LoraWeights::load_peft(dir1.path(), &toy.lora_shapes()).unwrap();
    let wb = LoraWeights::load_peft(dir2.path(), &toy.lora_shapes()).unwrap();
    for (x, y) in wa.data.iter().zip(&wb.data) {
        assert!((x - y).abs() < 1e-5, "{x} vs {y}");
    }
}

#[test]
fn clipping_scales_to_the_max_norm() {
    let ranges = vec![0..2, 2..3];
    let mut g = vec![3.0f32, 0.0, 4.0];
    assert_eq!(grad_norm(&g, &ranges), 5.0);
    let before = clip_grad_norm(&mut g, &ranges, 1.0);
    assert_eq!(before, 5.0);
    assert!((grad_norm(&g, &ranges) - 1.0).abs() < 1e-5);
    let mut small = vec![0.3f32, 0.0, 0.4];
    clip_grad_norm(&mut small, &ranges, 1.0);
    assert_eq!(
        small,
        vec![0.3, 0.0, 0.4],
        "under the threshold nothing changes"
    );
    let mut off = vec![3.0f32, 0.0, 4.0];
    clip_grad_norm(&mut off, &ranges, 0.0);
    assert_eq!(off, vec![3.0, 0.0, 4.0], "max_norm 0 turns clipping off");
}

#[test]
fn bad_runs_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut toy = Toy::new(V, D, 3);
    let lora = LoraWeights::init(&lora_cfg(4), &toy.lora_shapes(), 1).unwrap();
    let (train, eval) = toy_data(V, 24);
    let cfg = train_cfg(dir.path(), 3);
    let err = Trainer::new(&mut toy, lora.clone(), &[], &eval, &cfg, None)
        .err()
        .unwrap();
    assert!(err.contains("empty"), "{err}");
    let err = Trainer::new(
        &mut toy,
        lora.clone(),
        &train,
        &eval,
        &cfg,
        Some(dir.path()),
    )
    .err()
    .unwrap();
    assert!(err.contains("no checkpoint"), "{err}");
    Trainer::new(&mut toy, lora.clone(), &train, &eval, &cfg, None)
        .unwrap()
        .run()
        .unwrap();
    let (other, _) = toy_data(V, 16);
    let err = Trainer::new(
        &mut toy,
        lora.clone(),
        &other,
        &eval,
        &cfg,
        Some(dir.path()),
    )
    .err()
    .unwrap();
    assert!(err.contains("training data"), "{err}");
    let bigger = LoraWeights::init(&lora_cfg(5), &toy.lora_shapes(), 1).unwrap();
    let err = Trainer::new(&mut toy, bigger, &train, &eval, &cfg, Some(dir.path()))
        .err()
        .unwrap();
    assert!(err.contains("adapter"), "{err}");
    let dropout = LoraWeights::init(
        &LoraConfig {
            lora_dropout: 0.1,
            ..lora_cfg(4)
        },
        &toy.lora_shapes(),
        1,
    )
    .unwrap();
    let d2 = tempfile::tempdir().unwrap();
    let err = Trainer::new(
        &mut toy,
        dropout,
        &train,
        &eval,
        &train_cfg(d2.path(), 3),
        None,
    )
    .unwrap()
    .run()
    .err()
    .unwrap();
    assert!(err.contains("lora_dropout"), "{err}");
}
