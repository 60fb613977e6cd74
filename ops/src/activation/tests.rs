//! SwiGLU and GeGLU (tanh and erf) against Hugging Face (`ops/fixtures/hf_glu_*`:
//! `ACT2FN[act](gate) * up` with autograd), and by hand at g = 0 and large |g|.
use super::*;
use crate::dsl::fixtures::{assert_bf16, assert_close_f32, bf16_stats, Bf16Stats, Fixture};
use crate::dsl::Rounding;

#[derive(Clone, Copy, Debug)]
enum Act {
    Swiglu,
    GegluTanh,
    GegluErf,
}

impl Act {
    /// The activation's name in transformers' ACT2FN (and in the fixtures).
    fn hf(self) -> &'static str {
        match self {
            Act::Swiglu => "silu",
            Act::GegluTanh => "gelu_pytorch_tanh",
            Act::GegluErf => "gelu",
        }
    }
}

/// Gate values below which torch's CPU GeLU loses relative accuracy: gelu(g) and gelu'(g)
/// are tiny there and 1 + erf (or 1 + tanh) cancels; torch's vectorised erf/tanh are
/// approximations and flush some results to 0. Against the exact value, the op is the closer.
const GELU_CANCELS_BELOW: f32 = -3.0;

const ACTS: [Act; 3] = [Act::Swiglu, Act::GegluTanh, Act::GegluErf];

/// (h, dg, du) of one op on flat inputs.
fn run<S: crate::dsl::Real>(
    act: Act,
    g: &[S],
    u: &[S],
    dh: &[S],
    rt: Rounding,
) -> (Vec<S>, Vec<S>, Vec<S>) {
    let n = g.len();
    let (mut h, mut dg, mut du) = (vec![S::zero(); n], vec![S::zero(); n], vec![S::zero(); n]);
    match act {
        Act::Swiglu => {
            let d = swiglu::Dims { N: n };
            swiglu::forward_cpu::<S>(&d, g, u, &mut h, rt);
            swiglu::backward_cpu::<S>(&d, g, u, dh, &mut dg, &mut du, rt);
        }
        Act::GegluTanh => {
            let d = geglu_tanh::Dims { N: n };
            geglu_tanh::forward_cpu::<S>(&d, g, u, &mut h, rt);
            geglu_tanh::backward_cpu::<S>(&d, g, u, dh, &mut dg, &mut du, rt);
        }
        Act::GegluErf => {
            let d = geglu_erf::Dims { N: n };
            geglu_erf::forward_cpu::<S>(&d, g, u, &mut h, rt);
            geglu_erf::backward_cpu::<S>(&d, g, u, dh, &mut dg, &mut du, rt);
        }
    }
    (h, dg, du)
}

fn parity(dtype: &str) {
    let f = Fixture::load(&format!("hf_glu_{dtype}.safetensors"));
    let rt = if dtype == "f32" {
        Rounding::F32
    } else {
        Rounding::BF16
    };
    for act in ACTS {
        let mut stats = [Bf16Stats::default(); 3];
        for i in 0..3 {
            let p = format!("c{i}.");
            let (g, u, dh) = (
                f.f32s(&format!("{p}gate")),
                f.f32s(&format!("{p}up")),
                f.f32s(&format!("{p}dh")),
            );
            let (h, dg, du) = run::<f32>(act, &g, &u, &dh, rt);
            for (k, (name, got)) in [("h", &h), ("dgate", &dg), ("dup", &du)]
                .into_iter()
                .enumerate()
            {
                let want = f.f32s(&format!("{p}{}.{name}", act.hf()));
                let what = format!("{} {p}{}.{name}", f.name, act.hf());
                if dtype == "f32" {
                    assert_close_f32(&what, got, &want, 1e-5);
                    continue;
                }
                let s = bf16_stats(got, &want);
                eprintln!("{what}: {s}");
                assert!(s.max_scale_ulps <= 1.0, "{what}: {s}");
                stats[k].add(s);
                // Bit-equal everywhere for SwiGLU; for GeLU outside torch's cancellation region.
                let keep: Vec<usize> = match act {
                    Act::Swiglu => (0..g.len()).collect(),
                    _ => (0..g.len())
                        .filter(|&j| g[j] >= GELU_CANCELS_BELOW)
                        .collect(),
                };
                let pick = |v: &[f32]| keep.iter().map(|&j| v[j]).collect::<Vec<_>>();
                assert_bf16(
                    &format!("{what} (gate >= {GELU_CANCELS_BELOW})"),
                    &pick(got),
                    &pick(&want),
                    1.0,
                    0.0,
                );
            }
        }
        if dtype == "bf16" {
            eprintln!(
                "{act:?} bf16 all cases: h {} | dgate {} | dup {}",
                stats[0], stats[1], stats[2]
            );
        }
    }
}

#[test]
fn glu_matches_hf_f32() {
    parity("f32");
}

#[test]
fn glu_matches_hf_bf16() {
    parity("bf16");
}

/// By hand, exact arithmetic, u = 3, dh = 2:
/// g = 0: silu(0) = gelu(0) = 0, so h = 0 and du = 0; silu'(0) = s(1 + 0) = 1/2 and
///   gelu'(0) = Phi(0) = 1/2 (both forms), so dg = dh * u / 2 = 3.
/// g = 40: sigmoid = 1 - 4e-18, Phi = 1 to double precision: h = 40 * 3 = 120, du = 2 * 40 = 80,
///   dg = dh * u = 6 (the derivative tends to 1).
/// g = -40: h = 0 (silu(-40) = -40 e^-40 ~ -1.7e-16), du ~ 0, dg ~ 0.
#[test]
fn by_hand_at_zero_and_large_gate() {
    for act in ACTS {
        let g = [0.0, 40.0, -40.0];
        let (h, dg, du) = run::<f64>(act, &g, &[3.0; 3], &[2.0; 3], Rounding::EXACT);
        let near = |a: f64, b: f64| (a - b).abs() < 1e-12 * b.abs().max(1.0);
        assert!(
            h[0] == 0.0 && du[0] == 0.0 && near(dg[0], 3.0),
            "{act:?} at 0: h {} du {} dg {}",
            h[0],
            du[0],
            dg[0]
        );
        assert!(
            near(h[1], 120.0) && near(du[1], 80.0) && near(dg[1], 6.0),
            "{act:?} at 40: {h:?} {du:?} {dg:?}"
        );
        assert!(
            h[2].abs() < 1e-14 && du[2].abs() < 1e-14 && dg[2].abs() < 1e-13,
            "{act:?} at -40: {h:?} {du:?} {dg:?}"
        );
    }
    // SwiGLU at g = 1, u = 1, dh = 1: silu(1) = 1 / (1 + e^-1) = 0.7310585786300049,
    // silu'(1) = s (1 + 1 - s) = s (2 - s) = 0.9276705118714866.
    let (h, dg, du) = run::<f64>(Act::Swiglu, &[1.0], &[1.0], &[1.0], Rounding::EXACT);
    assert!((h[0] - 0.7310585786300049).abs() < 1e-15 && (du[0] - h[0]).abs() < 1e-15);
    assert!((dg[0] - 0.9276705118714866).abs() < 1e-15, "{dg:?}");
    // GeGLU (erf) at g = 1: gelu(1) = Phi(1) = 0.8413447460685429,
    // gelu'(1) = Phi(1) + phi(1) = 0.8413447460685429 + 0.24197072451914337.
    let (h, dg, _) = run::<f64>(Act::GegluErf, &[1.0], &[1.0], &[1.0], Rounding::EXACT);
    assert!((h[0] - 0.8413447460685429).abs() < 1e-15, "{h:?}");
    assert!(
        (dg[0] - (0.8413447460685429 + 0.24197072451914337)).abs() < 1e-15,
        "{dg:?}"
    );
}

/// Edge sizes in bf16 (one element, seven, nine) against transformers' rounding points
/// written out: h = T(T(silu(g)) * u), du = T(dh * T(silu(g))).
#[test]
fn edge_sizes_bf16() {
    let b = |v: f32| half::bf16::from_f32(v).to_f32();
    let mut rng = crate::dsl::gradcheck::Rng::fresh("glu_edges");
    for n in [1, 7, 9] {
        let g: Vec<f32> = (0..n).map(|_| b((rng.normal() * 3.0) as f32)).collect();
        let u: Vec<f32> = (0..n).map(|_| b(rng.normal() as f32)).collect();
        let dh: Vec<f32> = (0..n).map(|_| b(rng.normal() as f32)).collect();
        let (h, _, du) = run::<f32>(Act::Swiglu, &g, &u, &dh, Rounding::BF16);
        for i in 0..n {
            let a = b(g[i] / (1.0 + (-g[i]).exp()));
            assert_eq!(h[i], b(a * u[i]), "n {n} i {i} (seed {})", rng.seed);
            assert_eq!(du[i], b(dh[i] * a), "n {n} i {i} (seed {})", rng.seed);
        }
    }
}

#[test]
fn swiglu_backward_act_is_the_forward_and_the_backward_in_one_pass() {
    // Bit for bit what swiglu's forward and backward write, on fresh bf16 inputs.
    let mut rng = crate::dsl::gradcheck::Rng::fresh("swiglu_backward_act");
    let n = 4099;
    let mut draw = |scale: f64| -> Vec<f32> {
        rng.normals(n)
            .into_iter()
            .map(|x| half::bf16::from_f64(x * scale).to_f32())
            .collect()
    };
    let (g, u, dh) = (draw(3.0), draw(1.0), draw(1.0));
    let (want_h, want_dg, want_du) = run(Act::Swiglu, &g, &u, &dh, Rounding::BF16);
    let d = swiglu_backward_act::Dims { N: n };
    let (mut h, mut dg, mut du) = (vec![0f32; n], vec![0f32; n], vec![0f32; n]);
    swiglu_backward_act::forward_cpu::<f32>(
        &d,
        &g,
        &u,
        &dh,
        &mut h,
        &mut dg,
        &mut du,
        Rounding::BF16,
    );
    assert_eq!(h, want_h);
    assert_eq!(dg, want_dg);
    assert_eq!(du, want_du);
}
