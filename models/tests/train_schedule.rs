//! Learning-rate schedules against transformers' formulas (and hand-computed values), and one
//! AdamW step through the optimizer against torch's update written out.

use ftrt_models::train::optim::Optimizer;
use ftrt_models::train::{warmup_from_ratio, AdamHyper, LrSchedule, OptimKind, SchedulerKind};

fn sched(kind: SchedulerKind, warmup: usize, total: usize) -> LrSchedule {
    LrSchedule {
        kind,
        base_lr: 1.0,
        warmup_steps: warmup,
        total_steps: total,
    }
}

/// transformers' `_get_linear_schedule_with_warmup_lr_lambda`, transcribed.
fn hf_linear(t: usize, w: usize, total: usize) -> f64 {
    if t < w {
        return t as f64 / 1usize.max(w) as f64;
    }
    0f64.max((total - t.min(total)) as f64 / 1usize.max(total - w) as f64)
}

/// transformers' `_get_cosine_schedule_with_warmup_lr_lambda` with num_cycles = 0.5.
fn hf_cosine(t: usize, w: usize, total: usize) -> f64 {
    if t < w {
        return t as f64 / 1usize.max(w) as f64;
    }
    let progress = (t - w) as f64 / 1usize.max(total - w) as f64;
    0f64.max(0.5 * (1.0 + (std::f64::consts::PI * 0.5 * 2.0 * progress).cos()))
}

#[test]
fn linear_and_cosine_match_transformers() {
    for (w, total) in [(0, 10), (3, 10), (10, 10), (5, 100), (1, 1)] {
        for t in 0..=total {
            let l = sched(SchedulerKind::Linear, w, total).factor(t);
            let c = sched(SchedulerKind::Cosine, w, total).factor(t);
            assert!(
                (l - hf_linear(t, w, total)).abs() < 1e-15,
                "linear t={t} w={w} T={total}"
            );
            assert!(
                (c - hf_cosine(t, w, total)).abs() < 1e-15,
                "cosine t={t} w={w} T={total}"
            );
        }
    }
}

#[test]
fn hand_computed_values() {
    let lin = sched(SchedulerKind::Linear, 2, 10);
    let want = [
        0.0, 0.5, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125, 0.0,
    ];
    for (t, w) in want.iter().enumerate() {
        assert_eq!(lin.factor(t), *w, "t = {t}");
    }
    let cos = sched(SchedulerKind::Cosine, 0, 4);
    assert!((cos.factor(2) - 0.5).abs() < 1e-15);
    assert!((cos.factor(1) - (0.5 + 0.5 * std::f64::consts::FRAC_1_SQRT_2)).abs() < 1e-15);
    assert_eq!(sched(SchedulerKind::Constant, 5, 10).factor(0), 1.0);
    assert_eq!(
        sched(SchedulerKind::ConstantWithWarmup, 4, 10).factor(1),
        0.25
    );
    assert_eq!(
        sched(SchedulerKind::ConstantWithWarmup, 4, 10).factor(7),
        1.0
    );
    // Step 1 (1-based) uses factor(0): zero under warmup, as in the HF Trainer.
    assert_eq!(lin.lr_for_step(1), 0.0);
    assert_eq!(lin.lr_for_step(3), 1.0);
    assert_eq!(warmup_from_ratio(100, 0.03), 3);
    assert_eq!(warmup_from_ratio(10, 0.01), 1);
    assert!("cosine_with_restarts".parse::<SchedulerKind>().is_err());
}

/// p = 1, g = 0.5, lr = 0.1, wd = 0.01, t = 1, as torch.optim.AdamW computes it.
#[test]
fn adamw_step_matches_torch_update() {
    let hyper = AdamHyper {
        weight_decay: 0.01,
        ..AdamHyper::default()
    };
    let mut opt = Optimizer::new(OptimKind::AdamW, hyper, std::slice::from_ref(&(0..1)));
    let mut p = vec![1.0f32];
    opt.step(&mut p, &[0.5], 0.1);
    let (b1, b2) = (0.9f64, 0.999f64);
    let m = (1.0 - b1) * 0.5;
    let v = (1.0 - b2) * 0.25;
    let want =
        1.0 * (1.0 - 0.1 * 0.01) - 0.1 / (1.0 - b1) * m / (v.sqrt() / (1.0 - b2).sqrt() + 1e-8);
    assert!((p[0] as f64 - want).abs() < 1e-6, "{} vs {want}", p[0]);
    assert_eq!(opt.steps, 1);
}
