//! CPU tests of the attention reference: against a dense masked softmax written separately,
//! f64 finite differences of the backward, and isolation of packed sequences.
//! (The GPU kernels are checked by `selftest` on a GPU and by the CPU emulator in `sim/`.)

use super::*;
use ftrt_runtime::rng::SplitMix64;

fn rand_vec(rng: &mut SplitMix64, n: usize, amp: f64) -> Vec<f64> {
    (0..n).map(|_| amp * (rng.unit_f64() * 2.0 - 1.0)).collect()
}

fn cu_of(seqlens: &[usize]) -> Vec<i32> {
    let mut cu = vec![0i32];
    for &l in seqlens {
        cu.push(cu.last().unwrap() + l as i32);
    }
    cu
}

struct Inputs {
    dims: AttentionDims,
    cu: Vec<i32>,
    q: Vec<f64>,
    k: Vec<f64>,
    v: Vec<f64>,
    dout: Vec<f64>,
}

fn inputs(seed: u64, n: usize, seqlens: &[usize], hq: usize, hkv: usize, d: usize) -> Inputs {
    let mut rng = SplitMix64::new(seed);
    let dims = AttentionDims::new(n, seqlens.len(), hq, hkv, d);
    Inputs {
        dims,
        cu: cu_of(seqlens),
        q: rand_vec(&mut rng, dims.q_len(), 2.0),
        k: rand_vec(&mut rng, dims.kv_len(), 1.5),
        v: rand_vec(&mut rng, dims.kv_len(), 1.0),
        dout: rand_vec(&mut rng, dims.q_len(), 1.0),
    }
}

/// (tokens, sequence lengths (sum <= tokens: the rest is padding), Hq, Hkv, D)
fn shapes() -> Vec<(usize, Vec<usize>, usize, usize, usize)> {
    vec![
        (1, vec![1], 1, 1, 4),
        (9, vec![3, 1, 5], 2, 2, 4),        // GQA 1, a one-token sequence
        (4, vec![1, 1, 2], 4, 2, 3),        // GQA 2, odd head dim
        (7, vec![7], 4, 1, 5),              // GQA 4, one sequence
        (8, vec![2, 0, 3], 2, 1, 6),        // empty sequence, 3 padding tokens
        (13, vec![5, 1, 1, 6], 4, 4, 8),    // odd lengths
        (70, vec![33, 1, 29, 7], 4, 2, 16), // longer, odd
    ]
}

/// Dense f64 attention with the full (N, N) mask: same[i][j] && j <= i, where a token's
/// sequence id is the number of cu entries after cu[0] that are <= it (padding: id S).
fn dense(x: &Inputs) -> (Vec<f64>, Vec<f64>) {
    let (n, hq, hkv, d) = (
        x.dims.n_tokens,
        x.dims.n_heads_q,
        x.dims.n_heads_kv,
        x.dims.head_dim,
    );
    let id: Vec<usize> = (0..n)
        .map(|i| x.cu[1..].iter().filter(|&&c| c as usize <= i).count())
        .collect();
    let mask: Vec<Vec<bool>> = (0..n)
        .map(|i| (0..n).map(|j| id[i] == id[j] && j <= i).collect())
        .collect();
    let mut out = vec![0.0; x.dims.q_len()];
    let mut lse = vec![0.0; x.dims.lse_len()];
    let scale = x.dims.scale as f64;
    for h in 0..hq {
        let kvh = h * hkv / hq;
        for i in 0..n {
            let mut sc = vec![f64::NEG_INFINITY; n];
            for j in 0..n {
                if mask[i][j] {
                    sc[j] = scale
                        * (0..d)
                            .map(|c| x.q[(i * hq + h) * d + c] * x.k[(j * hkv + kvh) * d + c])
                            .sum::<f64>();
                }
            }
            let m = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = sc.iter().map(|s| (s - m).exp()).sum();
            lse[h * n + i] = m + z.ln();
            for c in 0..d {
                out[(i * hq + h) * d + c] = (0..n)
                    .map(|j| (sc[j] - m).exp() / z * x.v[(j * hkv + kvh) * d + c])
                    .sum();
            }
        }
    }
    (out, lse)
}

fn forward(x: &Inputs) -> (Vec<f64>, Vec<f64>) {
    let mut out = vec![0.0; x.dims.q_len()];
    let mut lse = vec![0.0; x.dims.lse_len()];
    attention_forward_cpu(&x.dims, &x.cu, &x.q, &x.k, &x.v, &mut out, &mut lse);
    (out, lse)
}

fn backward(x: &Inputs, out: &[f64], lse: &[f64]) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let mut dq = vec![0.0; x.dims.q_len()];
    let mut dk = vec![0.0; x.dims.kv_len()];
    let mut dv = vec![0.0; x.dims.kv_len()];
    attention_backward_cpu(
        &x.dims, &x.cu, &x.q, &x.k, &x.v, out, lse, &x.dout, &mut dq, &mut dk, &mut dv,
    );
    (dq, dk, dv)
}

fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

#[test]
fn reference_matches_dense_masked_softmax() {
    for (seed, (n, lens, hq, hkv, d)) in shapes().into_iter().enumerate() {
        let x = inputs(seed as u64, n, &lens, hq, hkv, d);
        let (out, lse) = forward(&x);
        let (out2, lse2) = dense(&x);
        assert!(max_abs_diff(&out, &out2) < 1e-12, "out, shape {lens:?}");
        assert!(max_abs_diff(&lse, &lse2) < 1e-12, "lse, shape {lens:?}");
    }
}

#[test]
fn f32_reference_matches_f64() {
    let x = inputs(11, 70, &[33, 1, 29, 7], 4, 2, 16);
    let (out, lse) = forward(&x);
    let (dq, dk, dv) = backward(&x, &out, &lse);
    let f = |v: &[f64]| v.iter().map(|&a| a as f32).collect::<Vec<f32>>();
    let (q, k, v, dout) = (f(&x.q), f(&x.k), f(&x.v), f(&x.dout));
    let mut out32 = vec![0f32; x.dims.q_len()];
    let mut lse32 = vec![0f32; x.dims.lse_len()];
    attention_forward_cpu(&x.dims, &x.cu, &q, &k, &v, &mut out32, &mut lse32);
    let mut dq32 = vec![0f32; x.dims.q_len()];
    let mut dk32 = vec![0f32; x.dims.kv_len()];
    let mut dv32 = vec![0f32; x.dims.kv_len()];
    attention_backward_cpu(
        &x.dims, &x.cu, &q, &k, &v, &out32, &lse32, &dout, &mut dq32, &mut dk32, &mut dv32,
    );
    let up = |v: &[f32]| v.iter().map(|&a| a as f64).collect::<Vec<f64>>();
    for (a, b) in [
        (&out, up(&out32)),
        (&lse, up(&lse32)),
        (&dq, up(&dq32)),
        (&dk, up(&dk32)),
        (&dv, up(&dv32)),
    ] {
        assert!(max_abs_diff(a, &b) < 1e-4);
    }
}

#[test]
fn hand_computed_two_tokens() {
    // one sequence of two tokens, D = 1, scale 1: row 0 sees only key 0, row 1 sees both
    let mut dims = AttentionDims::new(2, 1, 1, 1, 1);
    dims.scale = 1.0;
    let (q, k, v) = ([1.0f64, 2.0], [0.5f64, -1.0], [3.0f64, 5.0]);
    let mut out = [0.0; 2];
    let mut lse = [0.0; 2];
    attention_forward_cpu(&dims, &[0, 2], &q, &k, &v, &mut out, &mut lse);
    assert!((out[0] - 3.0).abs() < 1e-15 && (lse[0] - 0.5).abs() < 1e-15);
    // row 1: scores 2*0.5 = 1, 2*(-1) = -2
    let (e1, e2) = (1f64.exp(), (-2f64).exp());
    assert!((lse[1] - (e1 + e2).ln()).abs() < 1e-15);
    assert!((out[1] - (3.0 * e1 + 5.0 * e2) / (e1 + e2)).abs() < 1e-14);
    // one-token sequences copy their value row whatever q, k are
    let x = inputs(5, 3, &[1, 1, 1], 2, 1, 4);
    let (out, lse) = forward(&x);
    for i in 0..3 {
        for h in 0..2 {
            assert_eq!(&out[(i * 2 + h) * 4..][..4], &x.v[i * 4..][..4]);
            let s: f64 = (0..4)
                .map(|c| x.q[(i * 2 + h) * 4 + c] * x.k[i * 4 + c])
                .sum::<f64>()
                * x.dims.scale as f64;
            assert!((lse[h * 3 + i] - s).abs() < 1e-12);
        }
    }
}

fn field(x: &mut Inputs, which: usize) -> &mut Vec<f64> {
    match which {
        0 => &mut x.q,
        1 => &mut x.k,
        _ => &mut x.v,
    }
}

/// loss = sum(dout * out): its gradients are exactly what the backward computes.
fn loss(x: &Inputs) -> f64 {
    let (out, _) = forward(x);
    out.iter().zip(&x.dout).map(|(a, b)| a * b).sum()
}

#[test]
#[allow(clippy::needless_range_loop)]
fn gradient_check_finite_differences() {
    let eps = 1e-5;
    for (seed, (n, lens, hq, hkv, d)) in shapes().into_iter().enumerate() {
        if n > 20 {
            continue; // every element is perturbed: keep it small
        }
        let mut x = inputs(100 + seed as u64, n, &lens, hq, hkv, d);
        let (out, lse) = forward(&x);
        let (dq, dk, dv) = backward(&x, &out, &lse);
        for (which, grad) in [(0, &dq), (1, &dk), (2, &dv)] {
            let len = grad.len();
            let mut num = vec![0.0; len];
            for e in 0..len {
                let orig = field(&mut x, which)[e];
                field(&mut x, which)[e] = orig + eps;
                let lp = loss(&x);
                field(&mut x, which)[e] = orig - eps;
                let lm = loss(&x);
                field(&mut x, which)[e] = orig;
                num[e] = (lp - lm) / (2.0 * eps);
            }
            let scale = grad.iter().map(|g| g.abs()).fold(1e-3, f64::max);
            let err = max_abs_diff(grad, &num) / scale;
            assert!(err < 1e-7, "grad {which} shape {lens:?}: rel err {err:e}");
        }
    }
}

#[test]
fn sequences_never_attend_across() {
    // f32: bit-identity must hold through the whole generic path
    let lens = [5usize, 7, 4];
    let x = inputs(21, 18, &lens, 4, 2, 8); // tokens 16, 17: padding
    let mut y = inputs(22, 18, &lens, 4, 2, 8);
    // y = x except in sequence 2 (tokens 5..12), where every input differs
    let (hq, hkv, d) = (4, 2, 8);
    for (yv, xv, heads) in [
        (&mut y.q, &x.q, hq),
        (&mut y.k, &x.k, hkv),
        (&mut y.v, &x.v, hkv),
        (&mut y.dout, &x.dout, hq),
    ] {
        for i in (0..18).filter(|i| !(5..12).contains(i)) {
            let r = i * heads * d..(i + 1) * heads * d;
            yv[r.clone()].copy_from_slice(&xv[r]);
        }
    }
    let run = |x: &Inputs| {
        let f = |v: &[f64]| v.iter().map(|&a| a as f32).collect::<Vec<f32>>();
        let (q, k, v, dout) = (f(&x.q), f(&x.k), f(&x.v), f(&x.dout));
        let mut out = vec![0f32; x.dims.q_len()];
        let mut lse = vec![0f32; x.dims.lse_len()];
        attention_forward_cpu(&x.dims, &x.cu, &q, &k, &v, &mut out, &mut lse);
        let mut dq = vec![0f32; x.dims.q_len()];
        let mut dk = vec![0f32; x.dims.kv_len()];
        let mut dv = vec![0f32; x.dims.kv_len()];
        attention_backward_cpu(
            &x.dims, &x.cu, &q, &k, &v, &out, &lse, &dout, &mut dq, &mut dk, &mut dv,
        );
        (out, lse, dq, dk, dv)
    };
    let (a, b) = (run(&x), run(&y));
    let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<u32>>();
    for i in (0..18).filter(|i| !(5..12).contains(i)) {
        let qr = i * hq * d..(i + 1) * hq * d;
        let kr = i * hkv * d..(i + 1) * hkv * d;
        assert_eq!(
            bits(&a.0[qr.clone()]),
            bits(&b.0[qr.clone()]),
            "out of token {i}"
        );
        assert_eq!(bits(&a.2[qr.clone()]), bits(&b.2[qr]), "dq of token {i}");
        assert_eq!(
            bits(&a.3[kr.clone()]),
            bits(&b.3[kr.clone()]),
            "dk of token {i}"
        );
        assert_eq!(bits(&a.4[kr.clone()]), bits(&b.4[kr]), "dv of token {i}");
        for h in 0..hq {
            assert_eq!(
                a.1[h * 18 + i].to_bits(),
                b.1[h * 18 + i].to_bits(),
                "lse of token {i}"
            );
        }
    }
    // and sequence 2's outputs did change
    assert_ne!(
        bits(&a.0[5 * hq * d..12 * hq * d]),
        bits(&b.0[5 * hq * d..12 * hq * d])
    );
}

#[test]
fn segments_and_flops() {
    assert_eq!(
        segments(&[0, 3, 3, 5], 8),
        vec![(0, 3), (3, 3), (3, 5), (5, 8)]
    );
    assert_eq!(segments(&[0, 4], 4), vec![(0, 4)]);
    let dims = AttentionDims::new(8, 3, 2, 1, 4);
    // pairs: 3*4/2 + 0 + 2*3/2 + 3*4/2 = 6 + 3 + 6 = 15
    assert_eq!(dims.forward_flops(&[0, 3, 3, 5]), 4.0 * 15.0 * 4.0 * 2.0);
    assert_eq!(scratch_bytes(&dims), 2 * 8 * 4);
}

#[test]
fn fused_dq_runs_long_head_dim_128_sequences_with_one_kv_heads_accumulator() {
    // the 8B at 32k tokens: dvec (32, N) f32, then (4, N, 128) f32 and (4, N / 64) counters
    let n = 32768;
    let dims = AttentionDims::new(n, 1, 32, 8, 128);
    let dvec = 32 * n * 4;
    assert_eq!(scratch_bytes_for(&dims, DqPass::Split), dvec);
    let fused = dvec + 4 * n * 128 * 4 + 4 * (n / 64) * 4;
    assert_eq!(scratch_bytes_for(&dims, DqPass::Fused), fused);
    assert_eq!(scratch_bytes(&dims), fused);
    // fewer tokens, or head dim 64: dvec only
    let short = AttentionDims::new(FUSED_DQ_MIN_TOKENS - 8, 1, 32, 8, 128);
    assert_eq!(scratch_bytes(&short), 32 * (FUSED_DQ_MIN_TOKENS - 8) * 4);
    assert_eq!(scratch_bytes(&AttentionDims::new(n, 1, 32, 8, 64)), dvec);
    // the pass: fused on sm90 at head dim 128 when the sequences average 32k tokens or more
    if std::env::var(DQ_ENV).is_err() {
        let pass =
            |k, seqs, d| DqPass::for_call(k, &AttentionDims::new(n, seqs, 32, 8, d)).unwrap();
        assert_eq!(pass(AttentionKernels::Sm90, 1, 128), DqPass::Fused);
        assert_eq!(pass(AttentionKernels::Sm90, 2, 128), DqPass::Split);
        assert_eq!(pass(AttentionKernels::Sm90, 1, 64), DqPass::Split);
        assert_eq!(pass(AttentionKernels::Sm80, 1, 128), DqPass::Split);
    }
}

#[test]
fn selftest_cases_are_well_formed() {
    for (_, c, _) in selftest_cases() {
        assert_eq!(c.cu_seqlens.len(), c.dims.num_seqs + 1);
        assert!(*c.cu_seqlens.last().unwrap() as usize <= c.dims.n_tokens);
        assert!(HEAD_DIMS.contains(&c.dims.head_dim));
        assert_eq!(c.q.len(), c.dims.q_len());
    }
}

#[test]
fn gpu_shared_memory_fits() {
    for d in HEAD_DIMS {
        // sm_86/sm_89 allow 99 KiB of dynamic shared memory per block; attention.cu stays below
        for pass in [Pass::Fwd, Pass::Dkdv, Pass::Dq] {
            let l = AttentionKernels::Sm80.launch(pass, d);
            assert!(l.smem <= 99 * 1024, "{}: {} bytes", l.name, l.smem);
            // Hopper: 227 KiB per block
            let l = AttentionKernels::Sm90.launch(pass, d);
            assert!(l.smem <= 227 * 1024, "{}: {} bytes", l.name, l.smem);
        }
    }
    // the sm80 forward's occupancy target on sm_90: 2 blocks per SM (228 KiB, 1 KiB reserved each)
    assert!(2 * (AttentionKernels::Sm80.launch(Pass::Fwd, 128).smem + 1024) <= 228 * 1024);
}

#[test]
fn launches_match_the_kernels() {
    // every launch names an entry point of its module, with the block size its PTX declares
    // (.maxntid, from __launch_bounds__): a mismatch would fail every launch
    for d in HEAD_DIMS {
        for kernels in [AttentionKernels::Sm80, AttentionKernels::Sm90] {
            for pass in [Pass::Fwd, Pass::Dkdv, Pass::Dq] {
                let l = kernels.launch(pass, d);
                let ptx = kernels.module().ptx;
                let entry = format!(".entry {}(", l.name);
                let at = ptx
                    .find(&entry)
                    .unwrap_or_else(|| panic!("{entry} missing"));
                let body = &ptx[at..];
                let maxntid = body[body.find(".maxntid").expect(".maxntid") + 8..]
                    .split(',')
                    .next()
                    .and_then(|x| x.trim().parse::<u32>().ok());
                assert_eq!(maxntid, Some(l.threads), "{}", l.name);
            }
        }
    }
}

#[test]
fn sm90_needs_row_groups_of_eight() {
    let ok = AttentionDims::new(1000, 1, 2, 1, 128);
    let bad = AttentionDims::new(1001, 1, 2, 1, 128);
    assert!(AttentionKernels::Sm90.check(&ok).is_ok());
    assert!(AttentionKernels::Sm90.check(&bad).is_err());
    assert!(AttentionKernels::Sm80.check(&bad).is_ok());
}
