//! Attention for inference: a KV cache per sequence slot, and causal GQA attention of new
//! query rows against it (with Mistral's sliding window). Prefill of a packed batch and
//! decoding are the same call: each token's key/value is appended to its slot, then each query
//! at position p attends to its slot's keys max(0, p + 1 - window)..=p.
//!
//! This is the small function boundary for the inference path; the training path uses the
//! ops' varlen reference (`ftrt_ops::attention`), which has the backward and no KV cache.

use ftrt_ops::attention::CPU_ROW_BLOCK;
use ftrt_ops::dsl::{Real, Rounding};
use ftrt_runtime::cpu_rows::for_row_blocks;

/// Keys and values (after RoPE) of every layer for a set of sequence slots.
#[derive(Debug, Clone)]
pub struct KvCache {
    /// [layer][slot]: keys, (len, Hkv, D) row-major, appended token by token.
    pub k: Vec<Vec<Vec<f32>>>,
    /// [layer][slot]: values, (len, Hkv, D).
    pub v: Vec<Vec<Vec<f32>>>,
    /// Hkv * D.
    pub kv_dim: usize,
}

impl KvCache {
    /// An empty cache of `slots` sequences for a model of `layers` layers and `kv_dim` = Hkv * D.
    pub fn new(layers: usize, slots: usize, kv_dim: usize) -> Self {
        Self {
            k: vec![vec![Vec::new(); slots]; layers],
            v: vec![vec![Vec::new(); slots]; layers],
            kv_dim,
        }
    }

    /// Number of sequence slots.
    pub fn slots(&self) -> usize {
        self.k.first().map_or(0, Vec::len)
    }

    /// Tokens cached for `slot`.
    pub fn len(&self, slot: usize) -> usize {
        self.k
            .first()
            .map_or(0, |l| l[slot].len() / self.kv_dim.max(1))
    }

    /// Whether every slot is empty.
    pub fn is_empty(&self) -> bool {
        (0..self.slots()).all(|s| self.len(s) == 0)
    }

    /// Forgets the tokens of `slot`.
    pub fn clear(&mut self, slot: usize) {
        for l in 0..self.k.len() {
            self.k[l][slot].clear();
            self.v[l][slot].clear();
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.k
            .iter()
            .chain(&self.v)
            .flatten()
            .map(|s| s.len() * 4)
            .sum()
    }
}

/// Shape of one cached attention call.
#[derive(Debug, Clone, Copy)]
pub struct CachedAttnDims {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Mistral's sliding window: a query at p sees keys j with p - j < window.
    pub window: Option<usize>,
}

/// Appends the new keys/values (N, Hkv, D) of `layer` to their slots, then computes
/// out (N, Hq * D) for queries q (N, Hq, D); token n belongs to `slots[n]` at `positions[n]`,
/// which must equal its index in the slot's cache. Query rows run in parallel
/// ([`for_row_blocks`]).
#[allow(clippy::too_many_arguments)]
pub fn attend_cached(
    cache: &mut KvCache,
    layer: usize,
    dims: CachedAttnDims,
    slots: &[usize],
    positions: &[i32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &mut [f32],
    rt: Rounding,
) {
    let (hq, hkv, d) = (dims.heads, dims.kv_heads, dims.head_dim);
    let kvd = hkv * d;
    let n = slots.len();
    for t in 0..n {
        cache.k[layer][slots[t]].extend_from_slice(&k[t * kvd..(t + 1) * kvd]);
        cache.v[layer][slots[t]].extend_from_slice(&v[t * kvd..(t + 1) * kvd]);
    }
    let group = hq / hkv;
    let scale = 1.0 / (d as f32).sqrt();
    let cache = &*cache;
    for_row_blocks([out], n, CPU_ROW_BLOCK, |rows, [out]| {
        let mut scores: Vec<f32> = Vec::new();
        for (r, t) in rows.enumerate() {
            let p = positions[t] as usize;
            let (kc, vc) = (&cache.k[layer][slots[t]], &cache.v[layer][slots[t]]);
            debug_assert!(kc.len() >= (p + 1) * kvd, "position beyond the cached keys");
            let first = match dims.window {
                Some(w) if p + 1 > w => p + 1 - w,
                _ => 0,
            };
            for h in 0..hq {
                let hk = h / group;
                let qr = &q[(t * hq + h) * d..][..d];
                scores.clear();
                let mut m = f32::NEG_INFINITY;
                for j in first..=p {
                    let kr = &kc[j * kvd + hk * d..][..d];
                    let s = dot(qr, kr) * scale;
                    m = m.max(s);
                    scores.push(s);
                }
                let mut l = 0.0f32;
                for s in scores.iter_mut() {
                    *s = (*s - m).exp();
                    l += *s;
                }
                let o = &mut out[(r * hq + h) * d..][..d];
                o.iter_mut().for_each(|x| *x = 0.0);
                for (i, j) in (first..=p).enumerate() {
                    let pj = (scores[i] / l).round_to(rt.t);
                    let vr = &vc[j * kvd + hk * d..][..d];
                    for (x, &vv) in o.iter_mut().zip(vr) {
                        *x += pj * vv;
                    }
                }
                for x in o.iter_mut() {
                    *x = x.round_to(rt.t);
                }
            }
        }
    });
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}
