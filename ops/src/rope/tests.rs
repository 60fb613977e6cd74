//! RoPE against Hugging Face (`ops/fixtures/hf_rope_*`: `LlamaRotaryEmbedding` +
//! `apply_rotary_pos_emb`, packed position ids restarting at 0 and positions up to 131071),
//! and by hand.
use super::*;
use crate::dsl::fixtures::{assert_bf16, assert_close_f32, bf16_round, Bf16Stats, Fixture};
use crate::dsl::Rounding;
use std::sync::OnceLock;

const T: usize = 23;
const HQ: usize = 4;
const HK: usize = 2;
/// Rows of the tables: the fixtures' largest position id is 131071.
const P: usize = 131072;

fn llama3() -> RopeScaling {
    RopeScaling::Llama3 {
        factor: 8.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position: 8192.0,
    }
}

/// The fixture cases c0..c3: (head_dim, theta, scaling), as in the files' `cases` metadata.
fn cases() -> [(usize, f32, RopeScaling); 4] {
    [
        (64, 1e4, RopeScaling::Default),
        (16, 5e5, RopeScaling::Default),
        (64, 5e5, llama3()),
        (16, 1e4, llama3()),
    ]
}

fn file(dtype: &str) -> Fixture {
    let f = Fixture::load(&format!("hf_rope_{dtype}.safetensors"));
    let meta = f.meta("cases");
    for s in [
        "\"rope_theta\": 10000.0",
        "\"rope_theta\": 500000.0",
        "\"factor\": 8.0",
        "\"attention_scaling\": 1.0",
    ] {
        assert!(meta.contains(s), "{}: cases lack {s}: {meta}", f.name);
    }
    f
}

/// Our tables (P, D) for one case: f32, and rounded to bf16 as HF casts them (only the rows of
/// the fixtures' positions; the others are NaN, so a wrong row index cannot go unnoticed).
struct Tables {
    cos: Vec<f32>,
    sin: Vec<f32>,
    cos_bf16: Vec<f32>,
    sin_bf16: Vec<f32>,
}

/// The tables of each case, built once, one thread per case (the fixtures' positions reach
/// 131071: 21M angles in all, the slowest part of these tests in debug builds).
fn tables(case: usize) -> &'static Tables {
    static TABLES: OnceLock<Vec<Tables>> = OnceLock::new();
    &TABLES.get_or_init(|| {
        std::thread::scope(|s| {
            let hs: Vec<_> = cases()
                .into_iter()
                .map(|(d, theta, scaling)| {
                    s.spawn(move || {
                        let (cos, sin) = cos_sin_tables(P, &inv_freq(d, theta, scaling));
                        let used = Fixture::load("hf_rope_bf16.safetensors").i32s("position_ids");
                        let (mut cos_bf16, mut sin_bf16) =
                            (vec![f32::NAN; P * d], vec![f32::NAN; P * d]);
                        for p in used.iter().map(|&p| p as usize) {
                            let row = p * d..(p + 1) * d;
                            cos_bf16[row.clone()].copy_from_slice(&bf16_round(&cos[row.clone()]));
                            sin_bf16[row.clone()].copy_from_slice(&bf16_round(&sin[row]));
                        }
                        Tables {
                            cos,
                            sin,
                            cos_bf16,
                            sin_bf16,
                        }
                    })
                })
                .collect();
            hs.into_iter()
                .map(|h| h.join().expect("table thread"))
                .collect()
        })
    })[case]
}

/// inv_freq (default and llama3) against transformers' `rot.inv_freq`: bit-equal.
#[test]
fn inv_freq_matches_hf() {
    let f = file("f32");
    for (i, (d, theta, scaling)) in cases().into_iter().enumerate() {
        let want = f.f32s(&format!("c{i}.inv_freq"));
        assert_eq!(
            want,
            file("bf16").f32s(&format!("c{i}.inv_freq")),
            "c{i}: the files agree"
        );
        let got = inv_freq(d, theta, scaling);
        for (k, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(
                g.to_bits(),
                w.to_bits(),
                "c{i} inv_freq[{k}]: {g:e} vs HF {w:e}"
            );
        }
        assert_eq!(got.len(), want.len());
    }
}

/// cos/sin tables at the fixtures' position ids (up to 131071) against transformers': f32 to
/// 1e-6 (the same f32 angle through two libms), bf16 (HF casts the f32 tables) bit-equal.
#[test]
fn cos_sin_tables_match_hf() {
    for dtype in ["f32", "bf16"] {
        let f = file(dtype);
        let pos = f.i32s("position_ids");
        let mut stats = Bf16Stats::default();
        for (i, (d, _, _)) in cases().into_iter().enumerate() {
            let Tables { cos, sin, .. } = tables(i);
            let rows = |t: &[f32]| -> Vec<f32> {
                pos.iter()
                    .flat_map(|&p| t[p as usize * d..(p as usize + 1) * d].to_vec())
                    .collect()
            };
            for (name, ours) in [("cos", cos), ("sin", sin)] {
                let (got, want) = (rows(ours), f.f32s(&format!("c{i}.{name}")));
                let what = format!("{} c{i}.{name}", f.name);
                if dtype == "f32" {
                    let r = assert_close_f32(&what, &got, &want, 1e-6);
                    eprintln!("{what}: max error {r:e}");
                } else {
                    stats.add(assert_bf16(&what, &bf16_round(&got), &want, 1.0, 0.0));
                }
            }
        }
        if dtype == "bf16" {
            eprintln!("bf16 tables, all cases: {stats}");
        }
    }
}

/// The op on q (Hq = 4) and k (Hk = 2) with the fixture's position ids (two packed sequences
/// restarting at 0, then far positions), indexing our (P, D) tables, forward and backward.
fn rope_parity(dtype: &str) {
    let f = file(dtype);
    let pos = f.i32s("position_ids");
    assert_eq!(pos.len(), T);
    assert_eq!(
        &pos[..10],
        &[0, 1, 2, 3, 4, 0, 1, 2, 0, 1],
        "packed sequences restart at 0"
    );
    let rt = if dtype == "f32" {
        Rounding::F32
    } else {
        Rounding::BF16
    };
    let mut fwd = Bf16Stats::default();
    let mut bwd = Bf16Stats::default();
    for (i, (d, _, _)) in cases().into_iter().enumerate() {
        // Tables in the model's dtype, as HF casts them.
        let t = tables(i);
        let (cos, sin) = if dtype == "f32" {
            (&t.cos, &t.sin)
        } else {
            (&t.cos_bf16, &t.sin_bf16)
        };
        for (t, h) in [("q", HQ), ("k", HK)] {
            assert_eq!(f.shape(&format!("c{i}.{t}")), vec![T, h, d]);
            let dims = rope::Dims {
                N: T,
                H: h,
                D: d,
                P,
            };
            let mut x = f.f32s(&format!("c{i}.{t}"));
            rope::forward_cpu::<f32>(&dims, &mut x, &pos, cos, sin, rt);
            let mut g = f.f32s(&format!("c{i}.d{t}_out"));
            rope::backward_cpu::<f32>(&dims, &pos, cos, sin, &mut g, rt);
            let (want_x, want_g) = (
                f.f32s(&format!("c{i}.{t}_out")),
                f.f32s(&format!("c{i}.d{t}")),
            );
            let what = format!("{} c{i}.{t}", f.name);
            if dtype == "f32" {
                let r1 = assert_close_f32(&format!("{what}_out"), &x, &want_x, 1e-5);
                let r2 = assert_close_f32(&format!("{what} grad"), &g, &want_g, 1e-5);
                eprintln!("{what}: forward {r1:e}, backward {r2:e} of the scale");
            } else {
                fwd.add(assert_bf16(&format!("{what}_out"), &x, &want_x, 0.97, 1.0));
                bwd.add(assert_bf16(&format!("{what} grad"), &g, &want_g, 0.97, 1.0));
            }
        }
    }
    if dtype == "bf16" {
        eprintln!("rope bf16 all cases: forward {fwd} | backward {bwd}");
    }
}

#[test]
fn rope_matches_hf_f32() {
    rope_parity("f32");
}

#[test]
fn rope_matches_hf_bf16() {
    rope_parity("bf16");
}

/// The op alone on the fixture's own per-token tables (position n -> row n): f32 to 1e-6.
#[test]
fn rope_on_hf_tables_f32() {
    let f = file("f32");
    for (i, (d, _, _)) in cases().into_iter().enumerate() {
        let (cos, sin) = (f.f32s(&format!("c{i}.cos")), f.f32s(&format!("c{i}.sin")));
        let rows: Vec<i32> = (0..T as i32).collect();
        for (t, h) in [("q", HQ), ("k", HK)] {
            let dims = rope::Dims {
                N: T,
                H: h,
                D: d,
                P: T,
            };
            let mut x = f.f32s(&format!("c{i}.{t}"));
            rope::forward_cpu::<f32>(&dims, &mut x, &rows, &cos, &sin, Rounding::F32);
            assert_close_f32(
                &format!("c{i}.{t}_out"),
                &x,
                &f.f32s(&format!("c{i}.{t}_out")),
                1e-6,
            );
            let mut g = f.f32s(&format!("c{i}.d{t}_out"));
            rope::backward_cpu::<f32>(&dims, &rows, &cos, &sin, &mut g, Rounding::F32);
            assert_close_f32(
                &format!("c{i}.d{t}"),
                &g,
                &f.f32s(&format!("c{i}.d{t}")),
                1e-6,
            );
        }
    }
}

/// One 4-dim head at position 1, tables by hand (row 0 is the identity): the pair (x0, x2)
/// turns by pi/2 (cos 0, sin 1), the pair (x1, x3) by pi/3 (cos 1/2, sin sqrt(3)/2).
/// x = [1, 2, 3, 4]:  y0 = x0 cos - x2 sin = -3,  y2 = x2 cos + x0 sin = 1,
///                    y1 = 2/2 - 4 sqrt(3)/2 = 1 - 2 sqrt(3),  y3 = 4/2 + 2 sqrt(3)/2 = 2 + sqrt(3).
/// The backward turns back: applied to y it returns x.
#[test]
fn one_head_at_position_1_by_hand() {
    let s3 = 3f64.sqrt();
    let cos = [1.0, 1.0, 1.0, 1.0, 0.0, 0.5, 0.0, 0.5];
    let sin = [0.0, 0.0, 0.0, 0.0, 1.0, s3 / 2.0, 1.0, s3 / 2.0];
    let d = rope::Dims {
        N: 1,
        H: 1,
        D: 4,
        P: 2,
    };
    let mut x = [1.0, 2.0, 3.0, 4.0];
    rope::forward_cpu::<f64>(&d, &mut x, &[1], &cos, &sin, Rounding::EXACT);
    let want = [-3.0, 1.0 - 2.0 * s3, 1.0, 2.0 + s3];
    assert!(
        x.iter().zip(&want).all(|(a, b)| (a - b).abs() < 1e-12),
        "{x:?} vs {want:?}"
    );
    rope::backward_cpu::<f64>(&d, &[1], &cos, &sin, &mut x, Rounding::EXACT);
    assert!(
        x.iter()
            .zip(&[1.0, 2.0, 3.0, 4.0])
            .all(|(a, b)| (a - b).abs() < 1e-12),
        "back: {x:?}"
    );
    // Position 0 leaves x unchanged.
    let mut x0 = [1.0, 2.0, 3.0, 4.0];
    rope::forward_cpu::<f64>(&d, &mut x0, &[0], &cos, &sin, Rounding::EXACT);
    assert_eq!(x0, [1.0, 2.0, 3.0, 4.0]);
}

/// Tables by hand: head_dim 4, theta 1e4: inv_freq = [1, 1e4^-0.5 = 0.01]; row 1 holds the
/// angles [1, 0.01, 1, 0.01] (frequencies repeated for the two halves).
#[test]
fn tables_by_hand() {
    let f = inv_freq(4, 1e4, RopeScaling::Default);
    assert_eq!(f.len(), 2);
    assert_eq!(f[0], 1.0);
    assert!((f[1] - 0.01).abs() < 1e-9, "{f:?}");
    let (cos, sin) = cos_sin_tables(2, &f);
    assert_eq!(&cos[..4], &[1.0; 4]);
    assert_eq!(&sin[..4], &[0.0; 4]);
    let angles = [1.0f32, f[1], 1.0, f[1]];
    for k in 0..4 {
        assert!(
            (cos[4 + k] - angles[k].cos()).abs() < 1e-7
                && (sin[4 + k] - angles[k].sin()).abs() < 1e-7
        );
    }
}

/// llama3 scaling by hand (factor 8, low 1, high 4, original 8192: wavelengths above 8192 slow
/// down 8x, below 2048 stay, between blend). head_dim 4 gives frequencies [1, theta^-1/2]:
/// theta = 1e8 -> 1e-4 (wavelength 62832: 1.25e-5); theta = (4096 / 2 pi)^2 -> 2 pi / 4096
/// (wavelength 4096: smooth = (8192 / 4096 - 1) / 3 = 1/3, f' = (2/3) f / 8 + (1/3) f = 5 f / 12).
/// Frequency 1 (wavelength 2 pi) is kept.
#[test]
fn llama3_bands_by_hand() {
    let f = inv_freq(4, 1e8, llama3());
    assert_eq!(f[0], 1.0);
    assert!((f[1] / 1.25e-5 - 1.0).abs() < 1e-6, "{f:?}");
    let theta = (4096.0 / (2.0 * std::f64::consts::PI)).powi(2);
    let f = inv_freq(4, theta as f32, llama3());
    let base = 2.0 * std::f64::consts::PI / 4096.0;
    assert!(
        (f[1] as f64 / (base * 5.0 / 12.0) - 1.0).abs() < 1e-4,
        "{f:?} vs {}",
        base * 5.0 / 12.0
    );
}

/// Odd head counts and a single token: the bf16 op, forward and backward, against the rotation
/// written out (T of each product, then the sum rounded by the store), GQA-shaped (3 heads,
/// D = 6, P = 5) and D = 2.
#[test]
fn edge_shapes_bf16() {
    let b = |v: f32| half::bf16::from_f32(v).to_f32();
    let mut rng = crate::dsl::gradcheck::Rng::fresh("rope_edges");
    for (n, h, d) in [(1, 1, 2), (1, 3, 6), (7, 3, 6), (5, 1, 128)] {
        let p = 5;
        let (cos, sin) = cos_sin_tables(p, &inv_freq(d, 1e4, RopeScaling::Default));
        let (cos, sin) = (bf16_round(&cos), bf16_round(&sin));
        let pos: Vec<i32> = (0..n).map(|_| rng.int_in(0, p as i64) as i32).collect();
        let x0 = bf16_round(
            &(0..n * h * d)
                .map(|_| rng.normal() as f32)
                .collect::<Vec<_>>(),
        );
        let mut x = x0.clone();
        let dims = rope::Dims {
            N: n,
            H: h,
            D: d,
            P: p,
        };
        rope::forward_cpu::<f32>(&dims, &mut x, &pos, &cos, &sin, Rounding::BF16);
        let mut g = x0.clone();
        rope::backward_cpu::<f32>(&dims, &pos, &cos, &sin, &mut g, Rounding::BF16);
        let half = d / 2;
        for (t, &pt) in pos.iter().enumerate() {
            let row = pt as usize * d;
            for hh in 0..h {
                let base = (t * h + hh) * d;
                for c in 0..half {
                    let (x1, x2) = (x0[base + c], x0[base + c + half]);
                    let y1 = b(b(x1 * cos[row + c]) - b(x2 * sin[row + c]));
                    let y2 = b(b(x2 * cos[row + c + half]) + b(x1 * sin[row + c + half]));
                    assert_eq!(
                        (x[base + c], x[base + c + half]),
                        (y1, y2),
                        "n{n} h{h} d{d} t{t} head {hh} c{c}"
                    );
                    // Backward on upstream x0: the transposed rotation, autograd's roundings.
                    let g1 = b(b(x1 * cos[row + c]) + b(x2 * sin[row + c + half]));
                    let g2 = b(b(x2 * cos[row + c + half]) - b(x1 * sin[row + c]));
                    assert_eq!(
                        (g[base + c], g[base + c + half]),
                        (g1, g2),
                        "backward n{n} h{h} d{d} t{t} c{c}"
                    );
                }
            }
        }
    }
}
