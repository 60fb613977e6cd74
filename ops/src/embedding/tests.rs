//! Embedding gather and its deterministic scatter-add backward: by hand, edge shapes, token
//! order of the sums, and the same bits on every run.
use super::*;
use crate::dsl::fixtures::bf16_round;
use crate::dsl::gradcheck::Rng;
use crate::dsl::Rounding;

/// Two tokens, ids [2, 0], over a vocabulary of 3 rows of width 2:
/// w = [[1, 2], [3, 4], [5, 6]] gathers y = [[5, 6], [1, 2]].
/// Backward with ids [1, 1, 0] and dy = [[1, 2], [10, 20], [100, 200]]:
/// dw[0] = dy[2] = [100, 200], dw[1] = dy[0] + dy[1] = [11, 22], dw[2] = 0 (unused row).
#[test]
fn two_tokens_by_hand() {
    let w = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
    let d = embedding::Dims { N: 2, V: 3, C: 2 };
    let mut y = [0f64; 4];
    embedding::forward_cpu::<f64>(&d, &[2, 0], &w, &mut y, Rounding::EXACT);
    assert_eq!(y, [5.0, 6.0, 1.0, 2.0]);

    let d = embedding::Dims { N: 3, V: 3, C: 2 };
    let dy = [1.0, 2.0, 10.0, 20.0, 100.0, 200.0];
    let mut dw = [f64::NAN; 6];
    embedding::backward_cpu::<f64>(&d, &[1, 1, 0], &dy, &mut dw, Rounding::EXACT);
    assert_eq!(dw, [100.0, 200.0, 11.0, 22.0, 0.0, 0.0]);
}

/// The backward sums a row's gradients in token order, in f32: 1e8 + 1 rounds to 1e8, then
/// - 1e8 gives 0 (any other order would keep the 1). The bf16 store rounds the f32 sum once.
#[test]
fn backward_sums_in_token_order() {
    let d = embedding::Dims { N: 3, V: 1, C: 1 };
    let mut dw = [0f32; 1];
    embedding::backward_cpu::<f32>(&d, &[0, 0, 0], &[1e8, 1.0, -1e8], &mut dw, Rounding::F32);
    assert_eq!(dw, [0.0]);
    embedding::backward_cpu::<f32>(&d, &[0, 0, 0], &[1e8, -1e8, 1.0], &mut dw, Rounding::F32);
    assert_eq!(dw, [1.0]);
    // bf16: 1 + 2^-8 + 2^-8 = 1 + 2^-7 exactly in f32, one rounding at the store (kept), where
    // rounding after every add would give 1 (1 + 2^-8 is a tie, rounded to even: 1).
    let e = 2f32.powi(-8);
    embedding::backward_cpu::<f32>(&d, &[0, 0, 0], &[1.0, e, e], &mut dw, Rounding::BF16);
    assert_eq!(dw, [1.0 + 2.0 * e]);
}

/// Edge shapes: one token, one row, an odd width, ids hitting the first and last rows;
/// the gather copies bits, the backward of a one-hot dy puts each row back.
#[test]
fn edge_shapes() {
    let mut rng = Rng::fresh("embedding_edges");
    for (n, v, c) in [(1, 1, 1), (1, 5, 7), (6, 3, 7), (4, 32001, 3)] {
        let w = bf16_round(&(0..v * c).map(|_| rng.normal() as f32).collect::<Vec<_>>());
        let mut ids: Vec<i32> = (0..n).map(|_| rng.int_in(0, v as i64) as i32).collect();
        ids[0] = v as i32 - 1;
        if n > 1 {
            ids[1] = 0;
        }
        let d = embedding::Dims { N: n, V: v, C: c };
        let mut y = vec![0f32; n * c];
        embedding::forward_cpu::<f32>(&d, &ids, &w, &mut y, Rounding::BF16);
        for (t, &id) in ids.iter().enumerate() {
            let row = &w[id as usize * c..(id as usize + 1) * c];
            assert_eq!(
                &y[t * c..(t + 1) * c],
                row,
                "n{n} v{v} c{c} token {t} (seed {})",
                rng.seed
            );
        }
        if v * c * n > 1_000_000 {
            continue; // the backward is O(V N C): keep it to small vocabularies
        }
        let mut dw = vec![0f32; v * c];
        embedding::backward_cpu::<f32>(&d, &ids, &y, &mut dw, Rounding::BF16);
        for r in 0..v {
            let count = ids.iter().filter(|&&i| i as usize == r).count() as f32;
            for k in 0..c {
                let want = half::bf16::from_f32(w[r * c + k] * count).to_f32();
                assert_eq!(
                    dw[r * c + k],
                    want,
                    "n{n} v{v} c{c} row {r} (seed {})",
                    rng.seed
                );
            }
        }
    }
}

/// Determinism: on the same input with many repeated ids the backward gives the same bits
/// twice (bf16 and f32), and equals the token-order f32 sum written out.
#[test]
fn backward_is_deterministic() {
    let mut rng = Rng::fresh("embedding_determinism");
    let (n, v, c) = (257, 7, 33);
    let ids: Vec<i32> = (0..n).map(|_| rng.int_in(0, v as i64) as i32).collect();
    let dy = bf16_round(
        &(0..n * c)
            .map(|_| (rng.normal() * 10.0) as f32)
            .collect::<Vec<_>>(),
    );
    let d = embedding::Dims { N: n, V: v, C: c };
    for rt in [Rounding::BF16, Rounding::F32] {
        let mut first = vec![0f32; v * c];
        let mut second = vec![1f32; v * c];
        embedding::backward_cpu::<f32>(&d, &ids, &dy, &mut first, rt);
        embedding::backward_cpu::<f32>(&d, &ids, &dy, &mut second, rt);
        let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&first), bits(&second), "{rt:?}: two runs differ");
        for r in 0..v {
            for k in 0..c {
                let mut s = 0f32;
                for t in 0..n {
                    if ids[t] as usize == r {
                        s += dy[t * c + k];
                    }
                }
                assert_eq!(
                    first[r * c + k].to_bits(),
                    rt.t.round(s).to_bits(),
                    "{rt:?} row {r} col {k}"
                );
            }
        }
    }
}
