//! Decoding with a KV cache, raw ops (`ops/kernels/decode.cu`): the CPU references and the
//! typed launchers.
//!
//! Layouts (row-major, bf16 unless noted):
//! - cache `kc`, `vc`: (slots, Hkv, T, D), T = the cache's capacity per sequence: each
//!   (sequence, kv head)'s keys contiguous, so a decode block streams one contiguous range;
//! - `split_qkv`: `qkv` (rows, Hq + 2 Hkv, D) -> `q` (rows, Hq, D), `k`, `v` (rows, Hkv, D):
//!   a fused q/k/v projection's heads split apart, RoPE (ops::rope) applied to q and k on the
//!   way unless q/k norms must come first;
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

use crate::dsl::{Real, Rounding};
use ftrt_runtime::cudarc::driver::{LaunchConfig, PushKernelArg};
use ftrt_runtime::rng::SplitMix64;
use ftrt_runtime::{DevPtr, Gpu, RuntimeError};
use half::bf16;

use crate::kernels::DECODE as KERNELS;

/// Largest head dim the decode kernels take (one thread per dim in `kv_store`).
pub const MAX_HEAD_DIM: usize = 128;
/// Query heads of one kv head's group that one `decode_attention` split block takes.
const HEADS_PER_BLOCK: usize = 4;

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
    /// Dims with the standard softmax scale 1 / sqrt(head_dim).
    pub fn new(heads: usize, kv_heads: usize, head_dim: usize, capacity: usize) -> Self {
        Self {
            heads,
            kv_heads,
            head_dim,
            capacity,
            scale: 1.0 / (head_dim as f32).sqrt(),
        }
    }

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
    /// Whether decode attention runs on tensor cores: head dim 64 or 128 and at most 16 query
    /// heads per kv head (one m16 tile); else the CUDA-core kernel, 4 heads per block.
    fn tensor_cores(&self) -> bool {
        matches!(self.head_dim, 64 | 128) && self.heads / self.kv_heads <= 16
    }
    /// Split blocks per kv head: one on tensor cores, else one per 4 query heads.
    fn blocks_per_kv_head(&self) -> usize {
        if self.tensor_cores() {
            1
        } else {
            (self.heads / self.kv_heads.max(1)).div_ceil(HEADS_PER_BLOCK)
        }
    }
    /// Offset of (slot, kv head, position)'s key (or value) in a (slots, Hkv, T, D) cache.
    fn at(&self, slot: usize, kv_head: usize, pos: usize) -> usize {
        ((slot * self.kv_heads + kv_head) * self.capacity + pos) * self.head_dim
    }
}

/// Heads of a fused q/k/v projection (Hq, Hkv, D) and, for [`split_qkv`]'s RoPE, the cos / sin
/// tables' positions P.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct QkvDims {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub positions: usize,
}

impl QkvDims {
    /// Columns of each of q, k, v.
    pub fn widths(&self) -> [usize; 3] {
        let kv = self.kv_heads * self.head_dim;
        [self.heads * self.head_dim, kv, kv]
    }
}

/// CPU reference of [`split_qkv`]: the column blocks of `qkv` (rows, Hq D + 2 Hkv D), then
/// `rope` = (pos, cos, sin) applied to q and k by ops::rope's own CPU reference.
pub fn split_qkv_cpu<T: Real>(
    d: &QkvDims,
    qkv: &[T],
    rope: Option<(&[i32], &[T], &[T])>,
    rt: Rounding,
) -> [Vec<T>; 3] {
    let widths = d.widths();
    let w: usize = widths.iter().sum();
    let mut out: [Vec<T>; 3] = Default::default();
    for row in qkv.chunks(w.max(1)) {
        let mut c = 0;
        for (o, &wi) in out.iter_mut().zip(&widths) {
            o.extend_from_slice(&row[c..c + wi]);
            c += wi;
        }
    }
    if let Some((pos, cos, sin)) = rope {
        for (x, heads) in out.iter_mut().zip([d.heads, d.kv_heads]) {
            let rd = crate::rope::rope::Dims {
                N: pos.len(),
                H: heads,
                D: d.head_dim,
                P: d.positions,
            };
            crate::rope::rope::forward_cpu(&rd, x, pos, cos, sin, rt);
        }
    }
    out
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
    let hd = d.head_dim;
    for r in 0..slot.len() {
        for h in 0..d.kv_heads {
            let at = d.at(slot[r] as usize, h, pos[r] as usize);
            let src = (r * d.kv_heads + h) * hd;
            kc[at..at + hd].copy_from_slice(&k_new[src..src + hd]);
            vc[at..at + hd].copy_from_slice(&v_new[src..src + hd]);
        }
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
    let (hd, group) = (d.head_dim, d.heads / d.kv_heads);
    for s in 0..slot.len() {
        for h in 0..d.heads {
            let qrow = &q[(s * d.heads + h) * hd..][..hd];
            let at = |t: usize| d.at(slot[s] as usize, h / group, t);
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
    // positions inside the (slots, Hkv, T, D) cache (the caller's contract).
    unsafe { b.launch(cfg) }?;
    Ok(())
}

/// `qkv` (rows, Hq + 2 Hkv, D) into `out` = [q (rows, Hq, D), k, v (rows, Hkv, D)], with RoPE
/// on q and k when `rope` = (pos (rows) i32, cos, sin (P, D)) is given (compute stream).
pub fn split_qkv(
    gpu: &Gpu,
    d: &QkvDims,
    rows: usize,
    qkv: DevPtr<bf16>,
    rope: Option<(DevPtr<i32>, DevPtr<bf16>, DevPtr<bf16>)>,
    out: [DevPtr<bf16>; 3],
) -> Result<(), RuntimeError> {
    if !d.head_dim.is_multiple_of(2) || d.head_dim > MAX_HEAD_DIM || rows > u32::MAX as usize {
        return Err(RuntimeError::InvalidArgument(format!(
            "split_qkv takes an even head dim up to {MAX_HEAD_DIM} (got {}) and at most 2^32 rows",
            d.head_dim
        )));
    }
    let heads = d.heads + 2 * d.kv_heads;
    if rows == 0 || heads == 0 || d.head_dim == 0 {
        return Ok(());
    }
    let f = gpu.function(&KERNELS, "split_qkv")?;
    let (hq, hkv, hd) = (d.heads as i32, d.kv_heads as i32, d.head_dim as i32);
    let (pos, cos, sin) = rope.map_or((0, 0, 0), |(p, c, s)| (p.addr, c.addr, s.addr));
    let with_rope = i32::from(rope.is_some());
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(&qkv.addr);
    b.arg(&pos);
    b.arg(&cos);
    b.arg(&sin);
    b.arg(&hq);
    b.arg(&hkv);
    b.arg(&hd);
    b.arg(&with_rope);
    for o in &out {
        b.arg(&o.addr);
    }
    let cfg = LaunchConfig {
        grid_dim: (rows as u32, heads as u32, 1),
        block_dim: (d.head_dim as u32 / 2, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: qkv holds rows * heads * D elements, out its three blocks; with RoPE, pos holds
    // rows positions below P and cos / sin P * D elements (the caller's contract).
    unsafe { b.launch(cfg) }?;
    Ok(())
}

/// How [`decode_attention`] splits each sequence's keys: every split of `keys_per_split`
/// keys is one block (per sequence, kv head and 4 query heads) writing an online-softmax
/// partial, and a second kernel merges a sequence's `ceil(len / keys_per_split)` partials.
/// The grid has `splits` blocks along the keys whatever the lengths (blocks past a sequence's
/// end return at once), so one launch shape serves a whole generation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SplitPlan {
    pub keys_per_split: usize,
    pub splits: usize,
}

impl SplitPlan {
    /// Blocks wanted when every sequence is full: about 8 per SM of an H100/H200.
    const TARGET_BLOCKS: usize = 1024;

    /// Splits of 64..=256 keys (multiples of 64: four warps of 16 keys) for up to `seqs`
    /// sequences of up to `d.capacity` keys: long enough to amortize each block's partial,
    /// short enough to give ~1024 blocks at batch 1 too.
    pub fn new(d: &CacheDims, seqs: usize) -> Self {
        let per_split = (seqs.max(1) * d.kv_heads * d.blocks_per_kv_head()).max(1);
        let want = Self::TARGET_BLOCKS.div_ceil(per_split);
        let keys = d
            .capacity
            .div_ceil(want)
            .next_multiple_of(64)
            .clamp(64, 256);
        SplitPlan {
            keys_per_split: keys,
            splits: d.capacity.div_ceil(keys).max(1),
        }
    }

    /// f32 scratch of a call on `seqs` sequences: max and sum (S, Hq, splits), then the
    /// unnormalized outputs (S, Hq, splits, D).
    pub fn scratch_len(&self, d: &CacheDims, seqs: usize) -> usize {
        seqs * d.heads * self.splits * (d.head_dim + 2)
    }
}

/// Attention of one query row per sequence against its cache (compute stream), in two
/// launches (split partials, then their merge; see [`SplitPlan`]). Every `len[s]` must be in
/// 1..=T, and `scratch` hold [`SplitPlan::scratch_len`] f32 for `seqs`.
#[allow(clippy::too_many_arguments)]
pub fn decode_attention(
    gpu: &Gpu,
    d: &CacheDims,
    plan: &SplitPlan,
    seqs: usize,
    q: DevPtr<bf16>,
    kc: DevPtr<bf16>,
    vc: DevPtr<bf16>,
    slot: DevPtr<i32>,
    len: DevPtr<i32>,
    scratch: DevPtr<f32>,
    out: DevPtr<bf16>,
) -> Result<(), RuntimeError> {
    d.check()?;
    if seqs == 0 {
        return Ok(());
    }
    for (name, p) in [("kc", kc), ("vc", vc), ("q", q)] {
        check_aligned(name, p)?;
    }
    let stats = seqs * d.heads * plan.splits;
    let (pm, pl, pacc) = (scratch, scratch.offset(stats), scratch.offset(2 * stats));
    let f = if d.tensor_cores() {
        gpu.function(
            &KERNELS,
            &format!("decode_attention_split_mma_d{}", d.head_dim),
        )?
    } else {
        let dpl = match d.head_dim {
            0..=32 => 4,
            33..=64 => 8,
            _ => 16,
        };
        gpu.function(&KERNELS, &format!("decode_attention_split_p{dpl}"))?
    };
    let (hq, hkv, hd, t) = (
        d.heads as i32,
        d.kv_heads as i32,
        d.head_dim as i32,
        d.capacity as i32,
    );
    let (ch, nz) = (plan.keys_per_split as i32, plan.splits as i32);
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(&q.addr);
    b.arg(&kc.addr);
    b.arg(&vc.addr);
    b.arg(&slot.addr);
    b.arg(&len.addr);
    b.arg(&hq);
    b.arg(&hkv);
    if !d.tensor_cores() {
        b.arg(&hd);
    }
    b.arg(&t);
    b.arg(&ch);
    b.arg(&d.scale);
    b.arg(&pm.addr);
    b.arg(&pl.addr);
    b.arg(&pacc.addr);
    let cfg = LaunchConfig {
        grid_dim: (
            seqs as u32,
            (d.kv_heads * d.blocks_per_kv_head()) as u32,
            plan.splits as u32,
        ),
        block_dim: (128, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: q holds seqs * Hq * D elements, slot/len name filled cache rows (caller), the
    // scratch holds scratch_len(seqs) f32 (caller).
    unsafe { b.launch(cfg) }?;
    let f = gpu.function(&KERNELS, "decode_attention_combine")?;
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(&pm.addr);
    b.arg(&pl.addr);
    b.arg(&pacc.addr);
    b.arg(&len.addr);
    b.arg(&hq);
    b.arg(&hd);
    b.arg(&ch);
    b.arg(&nz);
    b.arg(&out.addr);
    let cfg = LaunchConfig {
        grid_dim: (seqs as u32, d.heads as u32, 1),
        block_dim: (MAX_HEAD_DIM as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: the partials of every used split were written above; out holds seqs * Hq * D.
    unsafe { b.launch(cfg) }?;
    Ok(())
}

/// Threads per row of [`sample_rows`] (the kernel's `SAMPLE_THREADS`).
const SAMPLE_THREADS: u32 = 1024;

/// Where [`sample_rows`] takes its temperature and seed from.
#[derive(Debug, Clone, Copy)]
pub enum Sampling {
    /// `inv_temp` = 1 / T (0: greedy) and the seed, as launch arguments.
    Given { inv_temp: f32, seed: u64 },
    /// (2) u64 in device memory, [the f32 bits of inv_temp, seed], read when the kernel runs:
    /// a captured CUDA graph replays with what the host wrote before each step.
    InMemory(DevPtr<u64>),
}

/// The next token per row of `logits` (rows, V) f32 into `idx` (rows) i32 (compute stream):
/// greedy when inv_temp is 0, else a Gumbel-max draw from softmax(x * inv_temp) under the seed.
pub fn sample_rows(
    gpu: &Gpu,
    rows: usize,
    v: usize,
    sampling: Sampling,
    logits: DevPtr<f32>,
    idx: DevPtr<i32>,
) -> Result<(), RuntimeError> {
    if rows == 0 || v == 0 {
        return Ok(());
    }
    let name = match sampling {
        Sampling::Given { .. } => "sample_rows",
        Sampling::InMemory(_) => "sample_rows_from",
    };
    let f = gpu.function(&KERNELS, name)?;
    let vv = v as i64;
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(&logits.addr);
    b.arg(&vv);
    match &sampling {
        Sampling::Given { inv_temp, seed } => {
            b.arg(inv_temp);
            b.arg(seed);
        }
        Sampling::InMemory(params) => {
            b.arg(&params.addr);
        }
    }
    b.arg(&idx.addr);
    let cfg = LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (SAMPLE_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: logits holds rows * V elements, idx rows i32, params (if any) 2 u64.
    unsafe { b.launch(cfg) }?;
    Ok(())
}
