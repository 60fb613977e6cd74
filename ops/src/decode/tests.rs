//! CPU tests of the decode references: stored prompts + decode attention equal the last rows of
//! the packed causal attention reference (`attention_forward_cpu`), in shuffled cache slots.
//! (The GPU kernels are checked against these references by `ftrt selftest --kernels`.)

use super::*;
use crate::attention::{attention_forward_cpu, AttentionDims};
use ftrt_runtime::rng::{fresh_seed, SplitMix64};

fn rand_vec(rng: &mut SplitMix64, n: usize) -> Vec<f64> {
    (0..n).map(|_| 2.0 * rng.unit_f64() - 1.0).collect()
}

#[test]
fn cached_decode_equals_the_last_row_of_causal_attention() {
    let mut rng = SplitMix64::new(fresh_seed());
    for &(hq, hkv, hd) in &[(4usize, 2usize, 16usize), (6, 3, 8), (2, 2, 64)] {
        let lens: Vec<usize> = (0..3).map(|_| rng.range(1, 9)).collect();
        let n: usize = lens.iter().sum();
        let adims = AttentionDims::new(n, lens.len(), hq, hkv, hd);
        let q = rand_vec(&mut rng, adims.q_len());
        let k = rand_vec(&mut rng, adims.kv_len());
        let v = rand_vec(&mut rng, adims.kv_len());
        let mut cu = vec![0i32];
        for &l in &lens {
            cu.push(cu.last().unwrap() + l as i32);
        }
        let mut want = vec![0f64; adims.q_len()];
        let mut lse = vec![0f64; adims.lse_len()];
        attention_forward_cpu(&adims, &cu, &q, &k, &v, &mut want, &mut lse);

        // Store every token of sequence s into slot 2 - s (reversed), then decode its last.
        let cd = CacheDims {
            heads: hq,
            kv_heads: hkv,
            head_dim: hd,
            capacity: 10,
            scale: adims.scale,
        };
        let slot_of = |s: usize| (lens.len() - 1 - s) as i32;
        let (mut slots, mut pos) = (Vec::new(), Vec::new());
        for (s, &l) in lens.iter().enumerate() {
            for p in 0..l {
                slots.push(slot_of(s));
                pos.push(p as i32);
            }
        }
        let cache_len = lens.len() * cd.capacity * hkv * hd;
        let (mut kc, mut vc) = (vec![0f64; cache_len], vec![0f64; cache_len]);
        kv_store_cpu(&cd, &k, &v, &slots, &pos, &mut kc, &mut vc);
        let last: Vec<usize> = cu[1..].iter().map(|&c| c as usize - 1).collect();
        let q_last: Vec<f64> = last
            .iter()
            .flat_map(|&i| q[i * hq * hd..(i + 1) * hq * hd].to_vec())
            .collect();
        let seq_slots: Vec<i32> = (0..lens.len()).map(slot_of).collect();
        let seq_lens: Vec<i32> = lens.iter().map(|&l| l as i32).collect();
        let mut got = vec![0f64; q_last.len()];
        decode_attention_cpu(&cd, &q_last, &kc, &vc, &seq_slots, &seq_lens, &mut got);
        for (s, &i) in last.iter().enumerate() {
            for e in 0..hq * hd {
                let (g, w) = (got[s * hq * hd + e], want[i * hq * hd + e]);
                assert!(
                    (g - w).abs() < 1e-12,
                    "hq {hq} hkv {hkv} d {hd} seq {s}: {g} vs {w}"
                );
            }
        }
    }
}

#[test]
fn greedy_takes_the_first_of_equal_maxima() {
    let rows = [1.0f32, 3.0, 3.0, -1.0, -5.0, -5.0, -7.0, -5.0];
    assert_eq!(sample_rows_cpu(&rows, 4, 0.0, 1), vec![1, 0]);
    assert_eq!(sample_rows_cpu(&rows, 2, 0.0, 1), vec![1, 0, 0, 1]);
}

#[test]
fn gumbel_max_draws_follow_the_softmax() {
    // 4000 draws of one 4-way row at T = 2: frequencies within 4 sigma of softmax(x / T).
    let x = [0.5f32, -1.0, 2.0, 0.0];
    let t = 2.0f32;
    let z: f64 = x.iter().map(|&v| ((v / t) as f64).exp()).sum();
    let seed = fresh_seed();
    let draws = 4000;
    let rows: Vec<f32> = (0..draws).flat_map(|_| x).collect();
    let picks = sample_rows_cpu(&rows, 4, 1.0 / t, seed);
    for (c, &v) in x.iter().enumerate() {
        let p = ((v / t) as f64).exp() / z;
        let f = picks.iter().filter(|&&i| i as usize == c).count() as f64 / draws as f64;
        let sigma = (p * (1.0 - p) / draws as f64).sqrt();
        assert!(
            (f - p).abs() < 4.0 * sigma,
            "token {c}: {f} vs {p} (seed {seed})"
        );
    }
}

#[test]
fn split_plans_cover_the_cache_in_64_to_256_key_splits() {
    let mut rng = SplitMix64::new(fresh_seed());
    for _ in 0..200 {
        let kv_heads = rng.range(1, 9);
        let d = CacheDims {
            heads: kv_heads * rng.range(1, 9),
            kv_heads,
            head_dim: [64, 80, 128][rng.range(0, 2)],
            capacity: rng.range(1, 5000),
            scale: 1.0,
        };
        let seqs = rng.range(1, 129);
        let p = SplitPlan::new(&d, seqs);
        let k = p.keys_per_split;
        assert!(
            k.is_multiple_of(64) && (64..=256).contains(&k),
            "{p:?} for {d:?}"
        );
        // Every position has a split, and no split starts past the capacity.
        assert!(
            p.splits * k >= d.capacity && (p.splits - 1) * k < d.capacity,
            "{p:?} {d:?}"
        );
        let blocks = seqs * d.kv_heads * d.blocks_per_kv_head() * p.splits;
        // Short splits whenever longer ones would leave fewer than ~1024 blocks.
        if k > 64 {
            assert!(
                blocks * k / 64 > 1024 || p.splits == 1,
                "{p:?} {d:?} seqs {seqs}"
            );
        }
    }
}
