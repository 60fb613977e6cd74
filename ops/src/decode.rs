//! Decoding with a KV cache, raw ops (`ops/kernels/decode.cu`): the CPU references and the
//! typed launchers.
//!
//! Layouts (row-major, bf16 unless noted):
//! - cache `kc`, `vc`: (slots, T, Hkv, D), T = the cache's capacity per sequence;
//! - `kv_store`: `k_new`, `v_new` (rows, Hkv, D) with `slot`, `pos` (rows) i32:
//!   `kc[slot[r], pos[r]] = k_new[r]`, the same for v (prefill stores every prompt token,
//!   decoding one token per sequence);
//! - `decode_attention`: `q` (S, Hq, D), `slot`, `len` (S) i32, `out` (S, Hq, D):
//!   `out[s, h] = sum_{t < len[s]} softmax_t(scale q[s, h] . k[t]) v[t]` over the keys and
//!   values of kv head h / (Hq / Hkv) in slot `slot[s]`: the last row of causal attention
//!   over a sequence of `len[s]` tokens (the new token's own key stored first);
//! - `sample_rows`: `logits` (rows, V) f32 -> `idx` (rows) i32 without copying logits to the
//!   host:
//!   at temperature 0 the first index of each row's largest value (greedy); at temperature T
//!   the argmax of `x / T + g`, g = -ln(-ln u) standard Gumbel noise with u from a counter-based
//!   hash of (seed, row * V + column): an exact draw from softmax(x / T) (the Gumbel-max trick),
//!   the same draw on every run with the same seed.

#[cfg(test)]
mod tests;

use crate::dsl::Real;
use ftrt_runtime::cudarc::driver::{LaunchConfig, PushKernelArg};
use ftrt_runtime::rng::SplitMix64;
use ftrt_runtime::{DevPtr, Gpu, RuntimeError};
use half::bf16;

use crate::kernels::DECODE as KERNELS;

/// Largest head dim the decode kernels take (one thread per dim in `kv_store`).
pub const MAX_HEAD_DIM: usize = 128;
/// Query heads of one kv head's group that one `decode_attention` block takes.
const HEADS_PER_BLOCK: usize = 8;

/// Shape of a KV cache and of one decode call.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CacheDims {
    /// Query heads, key/value heads (divides `heads`), head dim (<= [`MAX_HEAD_DIM`]).
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// T: tokens each cache slot holds.
    pub capacity: usize,
    /// Softmax scale (1 / sqrt(D) normally).
    pub scale: f32,
}

impl CacheDims {
    fn check(&self) -> Result<(), RuntimeError> {
        if self.kv_heads == 0
            || !self.heads.is_multiple_of(self.kv_heads)
            || self.head_dim == 0
            || self.head_dim > MAX_HEAD_DIM
        {
            return Err(RuntimeError::InvalidArgument(format!(
                "decode: unsupported heads {}/{} head_dim {} (at most {MAX_HEAD_DIM})",
                self.heads, self.kv_heads, self.head_dim
            )));
        }
        Ok(())
    }
    /// Elements of one row of keys (Hkv * D).
    fn kv_row(&self) -> usize {
        self.kv_heads * self.head_dim
    }
}

/// CPU reference of [`kv_store`].
pub fn kv_store_cpu<T: Real>(
    d: &CacheDims,
    k_new: &[T],
    v_new: &[T],
    slot: &[i32],
    pos: &[i32],
    kc: &mut [T],
    vc: &mut [T],
) {
    let w = d.kv_row();
    for r in 0..slot.len() {
        let at = (slot[r] as usize * d.capacity + pos[r] as usize) * w;
        kc[at..at + w].copy_from_slice(&k_new[r * w..(r + 1) * w]);
        vc[at..at + w].copy_from_slice(&v_new[r * w..(r + 1) * w]);
    }
}

/// CPU reference of [`decode_attention`] (softmax in f64 through `T`'s arithmetic).
#[allow(clippy::too_many_arguments)]
pub fn decode_attention_cpu<T: Real>(
    d: &CacheDims,
    q: &[T],
    kc: &[T],
    vc: &[T],
    slot: &[i32],
    len: &[i32],
    out: &mut [T],
) {
    let (hd, w, group) = (d.head_dim, d.kv_row(), d.heads / d.kv_heads);
    for s in 0..slot.len() {
        let base = slot[s] as usize * d.capacity * w;
        for h in 0..d.heads {
            let qrow = &q[(s * d.heads + h) * hd..][..hd];
            let at = |t: usize| base + t * w + (h / group) * hd;
            let scores: Vec<f64> = (0..len[s] as usize)
                .map(|t| {
                    let k = &kc[at(t)..at(t) + hd];
                    d.scale as f64
                        * qrow
                            .iter()
                            .zip(k)
                            .map(|(a, b)| a.to_f64() * b.to_f64())
                            .sum::<f64>()
                })
                .collect();
            let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let p: Vec<f64> = scores.iter().map(|x| (x - m).exp()).collect();
            let z: f64 = p.iter().sum();
            let mut acc = vec![0f64; hd];
            for (t, pt) in p.iter().enumerate() {
                for (a, v) in acc.iter_mut().zip(&vc[at(t)..at(t) + hd]) {
                    *a += pt * v.to_f64();
                }
            }
            for (o, a) in out[(s * d.heads + h) * hd..][..hd].iter_mut().zip(&acc) {
                *o = T::from_f64(a / z);
            }
        }
    }
}

/// The uniform in (0, 1) that [`sample_rows`] draws for element `n` under `seed`: the top 24
/// bits of splitmix64's draw `n` ([`SplitMix64::nth`], the kernel's `dec_uniform`), centred.
pub fn uniform_of(seed: u64, n: u64) -> f32 {
    ((SplitMix64::nth(seed, n) >> 40) as f32 + 0.5) * (1.0 / 16_777_216.0)
}

/// CPU reference of [`sample_rows`] (`inv_temp` = 1 / T, 0 for greedy).
pub fn sample_rows_cpu(logits: &[f32], v: usize, inv_temp: f32, seed: u64) -> Vec<i32> {
    logits
        .chunks(v)
        .enumerate()
        .map(|(r, row)| {
            let key = |c: usize| {
                if inv_temp > 0.0 {
                    let u = uniform_of(seed, (r * v + c) as u64);
                    row[c] * inv_temp - (-u.ln()).ln()
                } else {
                    row[c]
                }
            };
            let (mut best, mut best_key) = (0, key(0));
            for c in 1..row.len() {
                let k = key(c);
                if k > best_key {
                    (best, best_key) = (c, k);
                }
            }
            best as i32
        })
        .collect()
}

fn check_aligned(name: &str, p: DevPtr<bf16>) -> Result<(), RuntimeError> {
    if !p.addr.is_multiple_of(16) {
        return Err(RuntimeError::InvalidArgument(format!(
            "decode: {name} must be 16-byte aligned"
        )));
    }
    Ok(())
}

/// Stores `rows` rows of new keys and values into the cache (compute stream).
#[allow(clippy::too_many_arguments)]
pub fn kv_store(
    gpu: &Gpu,
    d: &CacheDims,
    rows: usize,
    k_new: DevPtr<bf16>,
    v_new: DevPtr<bf16>,
    slot: DevPtr<i32>,
    pos: DevPtr<i32>,
    kc: DevPtr<bf16>,
    vc: DevPtr<bf16>,
) -> Result<(), RuntimeError> {
    d.check()?;
    if rows == 0 {
        return Ok(());
    }
    let f = gpu.function(&KERNELS, "kv_store")?;
    let (hkv, hd, t) = (d.kv_heads as i32, d.head_dim as i32, d.capacity as i32);
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(&k_new.addr);
    b.arg(&v_new.addr);
    b.arg(&slot.addr);
    b.arg(&pos.addr);
    b.arg(&hkv);
    b.arg(&hd);
    b.arg(&t);
    b.arg(&kc.addr);
    b.arg(&vc.addr);
    let cfg = LaunchConfig {
        grid_dim: (rows as u32, d.kv_heads as u32, 1),
        block_dim: (d.head_dim as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: k_new/v_new hold rows * Hkv * D elements, slot/pos `rows` i32 naming slots and
    // positions inside the (slots, T, Hkv, D) cache (the caller's contract).
    unsafe { b.launch(cfg) }?;
    Ok(())
}

/// Attention of one query row per sequence against its cache (compute stream). Every
/// `len[s]` must be in 1..=T.
#[allow(clippy::too_many_arguments)]
pub fn decode_attention(
    gpu: &Gpu,
    d: &CacheDims,
    seqs: usize,
    q: DevPtr<bf16>,
    kc: DevPtr<bf16>,
    vc: DevPtr<bf16>,
    slot: DevPtr<i32>,
    len: DevPtr<i32>,
    out: DevPtr<bf16>,
) -> Result<(), RuntimeError> {
    d.check()?;
    if seqs == 0 {
        return Ok(());
    }
    for (name, p) in [("kc", kc), ("vc", vc)] {
        check_aligned(name, p)?;
    }
    let f = gpu.function(&KERNELS, "decode_attention")?;
    let (hq, hkv, hd, t) = (
        d.heads as i32,
        d.kv_heads as i32,
        d.head_dim as i32,
        d.capacity as i32,
    );
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(&q.addr);
    b.arg(&kc.addr);
    b.arg(&vc.addr);
    b.arg(&slot.addr);
    b.arg(&len.addr);
    b.arg(&hq);
    b.arg(&hkv);
    b.arg(&hd);
    b.arg(&t);
    b.arg(&d.scale);
    b.arg(&out.addr);
    let groups = (d.heads / d.kv_heads).div_ceil(HEADS_PER_BLOCK);
    let cfg = LaunchConfig {
        grid_dim: (seqs as u32, d.kv_heads as u32, groups as u32),
        block_dim: (128, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: q/out hold seqs * Hq * D elements; slot/len name filled cache rows (caller).
    unsafe { b.launch(cfg) }?;
    Ok(())
}

/// The next token per row of `logits` (rows, V) f32 into `idx` (rows) i32 (compute stream):
/// greedy when `inv_temp` is 0, else a Gumbel-max draw from softmax(x * inv_temp) under `seed`.
pub fn sample_rows(
    gpu: &Gpu,
    rows: usize,
    v: usize,
    inv_temp: f32,
    seed: u64,
    logits: DevPtr<f32>,
    idx: DevPtr<i32>,
) -> Result<(), RuntimeError> {
    if rows == 0 || v == 0 {
        return Ok(());
    }
    let f = gpu.function(&KERNELS, "sample_rows")?;
    let vv = v as i64;
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(&logits.addr);
    b.arg(&vv);
    b.arg(&inv_temp);
    b.arg(&seed);
    b.arg(&idx.addr);
    let cfg = LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: logits holds rows * V elements, idx rows i32.
    unsafe { b.launch(cfg) }?;
    Ok(())
}
