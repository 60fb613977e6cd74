//! Chunked cross-entropy against Hugging Face (`ops/fixtures/hf_ce_*`:
//! `F.cross_entropy(logits.float(), labels, ignore_index=-100)`, and Gemma 2's softcap), over
//! vocabulary chunks of uneven sizes, and by hand.
use super::*;
use crate::dsl::fixtures::{assert_bf16, assert_close_f32, Bf16Stats, Fixture};
use crate::dsl::{Real, Rounding};

/// Chunk sizes covering `v`: `chunk` wide, the remainder last.
fn split(v: usize, chunk: usize) -> Vec<usize> {
    let mut out = vec![chunk; v / chunk];
    if !v.is_multiple_of(chunk) {
        out.push(v % chunk);
    }
    out
}

/// Columns v0..v0+w of an (r, v) row-major matrix, as an (r, w) matrix.
fn columns<S: Copy>(m: &[S], r: usize, v: usize, v0: usize, w: usize) -> Vec<S> {
    (0..r)
        .flat_map(|i| m[i * v + v0..i * v + v0 + w].iter().copied())
        .collect()
}

/// What the trainer does with the op: lse = -inf and picked = 0, one forward per chunk, the
/// per-token loss, the mean over counted tokens; then dlse = 1 / count and dpicked = -1 / count
/// for counted tokens (0 for ignored ones) and one backward per chunk.
struct Ce<S> {
    lse: Vec<S>,
    loss_rows: Vec<S>,
    loss: S,
    dlogits: Vec<S>,
}

fn chunked<S: Real>(
    r: usize,
    v: usize,
    logits: &[S],
    target: &[i32],
    cap: f32,
    chunks: &[usize],
    rt: Rounding,
) -> Ce<S> {
    assert_eq!(chunks.iter().sum::<usize>(), v);
    let mut lse = vec![S::from_f64(f64::NEG_INFINITY); r];
    let mut picked = vec![S::zero(); r];
    let mut v0 = 0;
    for &w in chunks {
        let chunk = columns(logits, r, v, v0, w);
        let d = cross_entropy::Dims { R: r, V: w };
        cross_entropy::forward_cpu::<S>(
            &d,
            v0 as i32,
            cap,
            &chunk,
            target,
            &mut lse,
            &mut picked,
            rt,
        );
        v0 += w;
    }
    let mut loss_rows = vec![S::zero(); r];
    cross_entropy_loss::forward_cpu::<S>(
        &cross_entropy_loss::Dims { R: r },
        &lse,
        &picked,
        target,
        &mut loss_rows,
        rt,
    );
    let count = target.iter().filter(|&&t| t != -100).count();
    let mut total = S::zero();
    for l in &loss_rows {
        total = total + *l;
    }
    let loss = total / S::from_f64(count as f64);
    let inv = S::from_f64(1.0 / count as f64);
    let dlse: Vec<S> = target
        .iter()
        .map(|&t| if t == -100 { S::zero() } else { inv })
        .collect();
    let dpicked: Vec<S> = dlse.iter().map(|&x| -x).collect();
    let mut dlogits = vec![S::zero(); r * v];
    let mut v0 = 0;
    for &w in chunks {
        let chunk = columns(logits, r, v, v0, w);
        let mut dchunk = vec![S::zero(); r * w];
        let d = cross_entropy::Dims { R: r, V: w };
        cross_entropy::backward_cpu::<S>(
            &d,
            v0 as i32,
            cap,
            &chunk,
            target,
            &lse,
            &dlse,
            &dpicked,
            &mut dchunk,
            rt,
        );
        for i in 0..r {
            dlogits[i * v + v0..i * v + v0 + w].copy_from_slice(&dchunk[i * w..(i + 1) * w]);
        }
        v0 += w;
    }
    Ce {
        lse,
        loss_rows,
        loss,
        dlogits,
    }
}

/// The chunkings tried on a vocabulary of v: 4096-wide chunks and a remainder, uneven
/// chunks (1000 and 7, then the rest), and a single chunk.
fn chunkings(v: usize) -> Vec<Vec<usize>> {
    let mut uneven = vec![1000.min(v)];
    if v > 1007 {
        uneven.push(7);
    }
    let rest = v - uneven.iter().sum::<usize>();
    if rest > 0 {
        uneven.extend(split(rest, 4093));
    }
    vec![split(v, 4096), uneven, vec![v]]
}

/// Tolerance of the f32 reference's lse, loss and dlogits (relative to the reference's max).
/// The CPU reference folds each logit into the running logsumexp with a logaddexp (the
/// emitter's serial `logsumexp`: m + ln(1 + e^(x - m)) per element, in f32), which drops every
/// contribution below half an ulp of the running value: lse comes out 27 to 566 f32 ulps low
/// (5e-4 absolute on a row of 32001 words in one chunk), where torch (max, then one sum of
/// exps) and the GPU kernel (online max and sum) are exact to the ulp. p = exp(z - lse) inherits that relative
/// error. The same math in f64 matches HF to 1e-6 and its lse bit for bit (asserted).
const LSE_F32_TOL: f32 = 3e-5;

fn parity(dtype: &str) {
    let f = Fixture::load(&format!("hf_ce_{dtype}.safetensors"));
    assert!(
        f.meta("cases").contains("\"softcap\": 30.0"),
        "{}: cap",
        f.name
    );
    let rt = if dtype == "f32" {
        Rounding::F32
    } else {
        Rounding::BF16
    };
    let mut plain = Bf16Stats::default();
    let mut capped = Bf16Stats::default();
    for i in 0..2 {
        let p = format!("c{i}.");
        let shape = f.shape(&format!("{p}logits"));
        let (r, v) = (shape[0], shape[1]);
        let logits = f.f32s(&format!("{p}logits"));
        let target = f.i32s(&format!("{p}labels"));
        assert_eq!(target[0], v as i32 - 1, "row 0's label is the last id");
        assert!(target.contains(&-100));
        let logits64: Vec<f64> = logits.iter().map(|&x| x as f64).collect();
        for chunks in chunkings(v) {
            let what = format!("{} {p} chunks {:?}", f.name, &chunks[..chunks.len().min(3)]);
            for cap in [0.0, 30.0] {
                let what = if cap > 0.0 {
                    format!("{what} softcap")
                } else {
                    what.clone()
                };
                let key = |n: &str| {
                    if cap > 0.0 {
                        format!("{p}softcap.{n}")
                    } else {
                        format!("{p}{n}")
                    }
                };
                let want_dl = f.f32s(&key("dlogits"));
                let want_loss = f.f32s(&key("loss"));
                // The op's math in f64 (f32 file: HF's f32 softcap roundings are below 1e-6):
                // HF's lse is the exact one rounded to f32, bit for bit.
                if dtype == "f32" || cap == 0.0 {
                    let exact =
                        chunked::<f64>(r, v, &logits64, &target, cap, &chunks, Rounding::EXACT);
                    let to32 = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<_>>();
                    assert_close_f32(
                        &format!("{what} f64 loss"),
                        &[exact.loss as f32],
                        &want_loss,
                        1e-6,
                    );
                    if cap == 0.0 {
                        assert_eq!(to32(&exact.lse), f.f32s(&key("lse")), "{what}: exact lse");
                        assert_close_f32(
                            &format!("{what} f64 loss_rows"),
                            &to32(&exact.loss_rows),
                            &f.f32s(&key("loss_rows")),
                            1e-6,
                        );
                    }
                    if dtype == "f32" {
                        assert_close_f32(
                            &format!("{what} f64 dlogits"),
                            &to32(&exact.dlogits),
                            &want_dl,
                            1e-6,
                        );
                    }
                }
                // The f32 reference (f32 file) and the GPU's rounding model (bf16 file).
                let ce = chunked::<f32>(r, v, &logits, &target, cap, &chunks, rt);
                assert_close_f32(&format!("{what} loss"), &[ce.loss], &want_loss, LSE_F32_TOL);
                if cap == 0.0 {
                    let hf_lse = f.f32s(&key("lse"));
                    let ulps: Vec<i64> = ce
                        .lse
                        .iter()
                        .zip(&hf_lse)
                        .map(|(a, b)| a.to_bits() as i64 - b.to_bits() as i64)
                        .collect();
                    eprintln!("{what}: f32 reference's lse minus HF's, in f32 ulps: {ulps:?}");
                    assert_close_f32(&format!("{what} lse"), &ce.lse, &hf_lse, LSE_F32_TOL);
                    assert_close_f32(
                        &format!("{what} loss_rows"),
                        &ce.loss_rows,
                        &f.f32s(&key("loss_rows")),
                        LSE_F32_TOL,
                    );
                }
                if dtype == "f32" {
                    assert_close_f32(
                        &format!("{what} dlogits"),
                        &ce.dlogits,
                        &want_dl,
                        LSE_F32_TOL,
                    );
                } else {
                    let s = assert_bf16(
                        &format!("{what} dlogits"),
                        &ce.dlogits,
                        &want_dl,
                        0.999,
                        1.0,
                    );
                    if cap > 0.0 {
                        capped.add(s)
                    } else {
                        plain.add(s)
                    }
                }
            }
        }
    }
    if dtype == "bf16" {
        eprintln!(
            "cross-entropy bf16 dlogits, all cases and chunkings: plain {plain} | softcap {capped}"
        );
    }
}

#[test]
fn cross_entropy_matches_hf_f32() {
    parity("f32");
}

#[test]
fn cross_entropy_matches_hf_bf16() {
    parity("bf16");
}

/// Two tokens over a 3-word vocabulary, logits [0, ln 2, ln 3] in both rows, targets [2, 0]:
/// lse = ln(1 + 2 + 3) = ln 6; loss0 = ln 6 - ln 3 = ln 2, loss1 = ln 6 - 0 = ln 6;
/// mean = (ln 2 + ln 6) / 2 = ln(12) / 2. softmax = [1/6, 1/3, 1/2], so with dlse = 1/2 and
/// dpicked = -1/2: dlogits row 0 = ([1/6, 1/3, 1/2] - [0, 0, 1]) / 2 = [1/12, 1/6, -1/4],
/// row 1 = ([1/6, 1/3, 1/2] - [1, 0, 0]) / 2 = [-5/12, 1/6, 1/4].
/// Same in chunks [2, 1] and [1, 1, 1]. A third token with target -100 changes nothing (count
/// stays 2) and gets loss 0 and zero gradient.
#[test]
fn two_tokens_three_words_by_hand() {
    let (l2, l3, l6) = (2f64.ln(), 3f64.ln(), 6f64.ln());
    let row = [0.0, l2, l3];
    for chunks in [vec![3], vec![2, 1], vec![1, 1, 1]] {
        let logits: Vec<f64> = row.iter().chain(&row).chain(&row).copied().collect();
        let ce = chunked::<f64>(3, 3, &logits, &[2, 0, -100], 0.0, &chunks, Rounding::EXACT);
        let near = |a: &[f64], b: &[f64]| a.iter().zip(b).all(|(a, b)| (a - b).abs() < 1e-14);
        assert!(near(&ce.lse, &[l6, l6, l6]), "{chunks:?}: lse {:?}", ce.lse);
        assert!(
            near(&ce.loss_rows, &[l2, l6, 0.0]),
            "{chunks:?}: loss rows {:?}",
            ce.loss_rows
        );
        assert!(
            (ce.loss - 12f64.ln() / 2.0).abs() < 1e-14,
            "{chunks:?}: loss {}",
            ce.loss
        );
        let want = [
            1.0 / 12.0,
            1.0 / 6.0,
            -0.25,
            -5.0 / 12.0,
            1.0 / 6.0,
            0.25,
            0.0,
            0.0,
            0.0,
        ];
        assert!(
            near(&ce.dlogits, &want),
            "{chunks:?}: dlogits {:?}",
            ce.dlogits
        );
    }
}

/// Softcap by hand: cap 1, logits [0, atanh(1/2)] -> z = [0, 1/2]; target 1:
/// lse = ln(1 + e^0.5), loss = lse - 0.5; dz = softmax - onehot = [p0, p1 - 1] with
/// p0 = 1 / (1 + e^0.5); dlogits = dz * (1 - tanh^2) = [p0, (p1 - 1) * 3/4].
#[test]
fn softcap_by_hand() {
    let a = 0.5f64.atanh();
    let ce = chunked::<f64>(1, 2, &[0.0, a], &[1], 1.0, &[1, 1], Rounding::EXACT);
    let lse = (1.0 + 0.5f64.exp()).ln();
    assert!(
        (ce.lse[0] - lse).abs() < 1e-14 && (ce.loss - (lse - 0.5)).abs() < 1e-14,
        "{:?} {}",
        ce.lse,
        ce.loss
    );
    let p0 = 1.0 / (1.0 + 0.5f64.exp());
    let want = [p0, (1.0 - p0 - 1.0) * 0.75];
    assert!(
        ce.dlogits
            .iter()
            .zip(&want)
            .all(|(g, w)| (g - w).abs() < 1e-14),
        "{:?} vs {want:?}",
        ce.dlogits
    );
}

/// Edge shapes against an exact f64 log-softmax: one row, a vocabulary of 1, odd vocabularies
/// split so that no chunk size divides it (V = 7 in [3, 3, 1]; V = 1001 in 64-wide chunks and a
/// remainder of 41), targets in the first and the last chunk, and every token ignored (count 0
/// is the caller's to avoid: here the per-row loss must just be 0).
#[test]
fn edge_shapes() {
    let mut rng = crate::dsl::gradcheck::Rng::fresh("cross_entropy_edges");
    for (r, v, chunks) in [
        (1, 1, vec![1]),
        (1, 7, vec![3, 3, 1]),
        (3, 7, vec![7]),
        (2, 1001, split(1001, 64)),
    ] {
        let logits: Vec<f64> = (0..r * v).map(|_| rng.normal() * 3.0).collect();
        let mut target: Vec<i32> = (0..r).map(|_| rng.int_in(0, v as i64) as i32).collect();
        target[0] = v as i32 - 1;
        if r > 1 {
            target[1] = 0;
        }
        let ce = chunked::<f64>(r, v, &logits, &target, 0.0, &chunks, Rounding::EXACT);
        for i in 0..r {
            let row = &logits[i * v..(i + 1) * v];
            let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let lse = m + row.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
            assert!(
                (ce.lse[i] - lse).abs() < 1e-12,
                "r{r} v{v} row {i}: lse {} vs {lse}",
                ce.lse[i]
            );
            let loss = lse - row[target[i] as usize];
            assert!((ce.loss_rows[i] - loss).abs() < 1e-12, "r{r} v{v} row {i}");
            for (c, x) in row.iter().enumerate() {
                let want = ((x - lse).exp() - (c as i32 == target[i]) as i32 as f64) / r as f64;
                assert!(
                    (ce.dlogits[i * v + c] - want).abs() < 1e-12,
                    "r{r} v{v} row {i} col {c} (seed {})",
                    rng.seed
                );
            }
        }
    }
    // All ignored: the op's per-row loss is 0 and the gradient 0 (dlse = dpicked = 0).
    let d = cross_entropy::Dims { R: 2, V: 3 };
    let (mut lse, mut picked) = (vec![f64::NEG_INFINITY; 2], vec![0.0; 2]);
    let logits = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
    cross_entropy::forward_cpu::<f64>(
        &d,
        0,
        0.0,
        &logits,
        &[-100, -100],
        &mut lse,
        &mut picked,
        Rounding::EXACT,
    );
    assert_eq!(picked, [0.0, 0.0]);
    let mut loss = [1.0; 2];
    cross_entropy_loss::forward_cpu::<f64>(
        &cross_entropy_loss::Dims { R: 2 },
        &lse,
        &picked,
        &[-100, -100],
        &mut loss,
        Rounding::EXACT,
    );
    assert_eq!(loss, [0.0, 0.0]);
    let mut dl = [1.0; 6];
    cross_entropy::backward_cpu::<f64>(
        &d,
        0,
        0.0,
        &logits,
        &[-100, -100],
        &lse,
        &[0.0; 2],
        &[0.0; 2],
        &mut dl,
        Rounding::EXACT,
    );
    assert_eq!(dl, [0.0; 6]);
}

#[test]
fn fused_shape_covers_a_row_in_at_most_eight_blocks() {
    // (columns a block, blocks a row): the smaller slice that fits 8 blocks
    assert_eq!(fused_shape(49152), Some((16384, 3))); // SmolLM2
    assert_eq!(fused_shape(128256), Some((16384, 8))); // Llama 3
    assert_eq!(fused_shape(131072), Some((16384, 8)));
    assert_eq!(fused_shape(131080), Some((32768, 5)));
    assert_eq!(fused_shape(151936), Some((32768, 5))); // Qwen2.5
    assert_eq!(fused_shape(262144), Some((32768, 8)));
    for v in [0, 4, 32004, 262152] {
        assert_eq!(fused_shape(v), None, "v = {v}");
    }
    for v in (8..300_000).step_by(8 * 997) {
        if let Some((slice, blocks)) = fused_shape(v) {
            assert!(blocks * slice >= v && blocks <= 8 && (slice == 16384 || slice == 32768));
            assert!(
                slice == 16384 || v > 8 * 16384,
                "v = {v} fits the smaller slice"
            );
        }
    }
}
