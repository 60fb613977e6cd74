//! Causal self-attention, a raw op: hand-written flash-style CUDA C in two families,
//! `ops/kernels/attention.cu` (mma.sync, any GPU from Ampere on; HIP-portable) and
//! `ops/kernels/attention_sm90.cu` (Hopper: warpgroup MMAs fed by TMA), with the same math and
//! layouts (read their headers for the tiling); this CPU reference; and the typed launchers,
//! which pick the family per call ([`AttentionKernels::for_call`]).
//!
//! Layouts (row-major; N = tokens of one packed micro-batch, S sequences):
//! - `q`, `out`, `dout`, `dq`: (N, Hq, D) bf16; `k`, `v`, `dk`, `dv`: (N, Hkv, D) bf16;
//! - `lse`: (Hq, N) f32, the natural-log logsumexp of each query row's scaled scores, saved by
//!   the forward for the backward;
//! - `cu_seqlens`: (S + 1) i32 prefix sums with `cu[0] = 0`, nondecreasing, `cu[S] <= N`.
//!
//! Math, with x_ij = scale * (q_i . k_j) over the keys j that query i sees:
//! ```text
//! lse_i = log sum_j exp(x_ij)        p_ij = exp(x_ij - lse_i)        out_i = sum_j p_ij v_j
//! dvec_i = dout_i . out_i            dp_ij = dout_i . v_j            ds_ij = p_ij (dp_ij - dvec_i)
//! dq_i = scale sum_j ds_ij k_j       dk_j = scale sum_i ds_ij q_i    dv_j = sum_i p_ij dout_i
//! ```
//! Query head h reads kv head h / (Hq / Hkv); dk and dv of a kv head sum over its query heads.
//! Token i of segment [cu[s], cu[s+1]) sees keys j with cu[s] <= j <= i. Tokens at or after
//! cu[S] (padding up to the token budget) form one more trailing segment, so every row sees at
//! least itself and nothing becomes NaN; attention never crosses segments.
//!
//! GPU: every kernel is deterministic (no atomics): dk/dv blocks own a key tile and loop
//! over the group's query heads and query tiles; dq has its own pass over key tiles (it repeats
//! the p and dp products: ~7 instead of 5 matmul-equivalents per backward, the price of
//! bit-reproducible dq without an f32 scratch). Scratch: `dvec`, Hq * N f32.
//!
//! Dynamic shared memory per block of attention.cu (pitch D + 8; attention_sm90.cu's are in
//! `AttentionKernels::launch`): fwd (128 + 2 KT)*(D+8)*2 with KT = 64
//! / 32 keys per tile at D = 64 / 128 (36/51 KiB), dq 4*64*(D+8)*2 (36/68 KiB), dkdv
//! (128 + 2*BMB)*(D+8)*2 + 8*BMB with BMB = 64 / 32 rows at D = 64 / 128 (37/51 KiB): the
//! launchers opt in above 48 KiB. The HIP build uses pitch D (a HIP launcher must size with
//! D) so that dq at D = 128 fits gfx90a's 64 KiB;
//! the HIP path emulates the MMA fragments with shuffles and is correct-first, not fast.
//!
//! `sim/` runs attention.cu's kernels on a CPU emulator (every MMA / ldmatrix fragment, warp
//! schedule and cp.async ordering emulated) against this reference:
//! `cd ops/src/attention/sim && cargo test --release`.

#[cfg(test)]
mod tests;

use crate::dsl::Real;
use ftrt_runtime::cpu_rows::for_row_blocks;
use ftrt_runtime::cudarc::driver::PushKernelArg;
use ftrt_runtime::{cudarc, DevPtr, Gpu, RuntimeError};
use half::bf16;

/// The fewest rows (queries or keys) any launch gives a block: grids have N / 64 tiles at most
/// along y (limit 65,535).
const TILE: usize = 64;
/// Rows each lane group of `attention_bwd_dot` takes (attention.cu's `DOT_ROWS`).
const DOT_ROWS: usize = 4;
/// Head dims the kernels are instantiated for.
pub const HEAD_DIMS: [usize; 2] = [64, 128];
/// GPU vs CPU tolerance (max |gpu - ref| / max |ref|), bf16 outputs.
pub const TOLERANCE: f64 = 1e-2;

/// Shape of one attention call.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttentionDims {
    /// N: tokens of the packed micro-batch (the token budget, padding included).
    pub n_tokens: usize,
    /// S: sequences; `cu_seqlens` has S + 1 entries.
    pub num_seqs: usize,
    /// Hq: query heads.
    pub n_heads_q: usize,
    /// Hkv: key/value heads; divides Hq.
    pub n_heads_kv: usize,
    /// D: head dim, 64 or 128 on the GPU (any on the CPU).
    pub head_dim: usize,
    /// Softmax scale, normally 1 / sqrt(D).
    pub scale: f32,
}

impl AttentionDims {
    /// Dims with the standard scale 1 / sqrt(head_dim).
    pub fn new(
        n_tokens: usize,
        num_seqs: usize,
        n_heads_q: usize,
        n_heads_kv: usize,
        head_dim: usize,
    ) -> Self {
        Self {
            n_tokens,
            num_seqs,
            n_heads_q,
            n_heads_kv,
            head_dim,
            scale: 1.0 / (head_dim as f32).sqrt(),
        }
    }
    /// Elements of q / out / dout / dq.
    pub fn q_len(&self) -> usize {
        self.n_tokens * self.n_heads_q * self.head_dim
    }
    /// Elements of k / v / dk / dv.
    pub fn kv_len(&self) -> usize {
        self.n_tokens * self.n_heads_kv * self.head_dim
    }
    /// Elements of lse (and of the backward's dvec scratch).
    pub fn lse_len(&self) -> usize {
        self.n_heads_q * self.n_tokens
    }
    /// Query heads per kv head.
    pub fn group(&self) -> usize {
        self.n_heads_q / self.n_heads_kv
    }
    fn check(&self) -> Result<(), String> {
        if self.n_heads_kv == 0
            || self.n_heads_q == 0
            || !self.n_heads_q.is_multiple_of(self.n_heads_kv)
        {
            return Err(format!(
                "Hq {} must be a positive multiple of Hkv {}",
                self.n_heads_q, self.n_heads_kv
            ));
        }
        if self.head_dim == 0 {
            return Err("head_dim must be positive".into());
        }
        Ok(())
    }
    fn check_gpu(&self) -> Result<(), RuntimeError> {
        self.check().map_err(RuntimeError::InvalidArgument)?;
        if !HEAD_DIMS.contains(&self.head_dim) {
            return Err(RuntimeError::InvalidArgument(format!(
                "attention kernels exist for head_dim {HEAD_DIMS:?}, not {}",
                self.head_dim
            )));
        }
        if self.n_tokens > i32::MAX as usize
            || self.num_seqs >= i32::MAX as usize
            || self.n_tokens.div_ceil(TILE) > 65535
        {
            return Err(RuntimeError::InvalidArgument(format!(
                "attention dims out of range: {self:?}"
            )));
        }
        Ok(())
    }
    /// Useful forward FLOPs (QK^T and PV over the visible pairs only) for these sequence lengths.
    pub fn forward_flops(&self, cu_seqlens: &[i32]) -> f64 {
        let pairs: f64 = segments(cu_seqlens, self.n_tokens)
            .iter()
            .map(|&(s, e)| {
                let l = (e - s) as f64;
                l * (l + 1.0) / 2.0
            })
            .sum();
        4.0 * pairs * self.head_dim as f64 * self.n_heads_q as f64
    }
    /// Useful backward FLOPs (the usual 2.5x the forward: S, dP, dV, dK, dQ).
    pub fn backward_flops(&self, cu_seqlens: &[i32]) -> f64 {
        2.5 * self.forward_flops(cu_seqlens)
    }
}

/// Bytes of scratch the backward needs (dvec: Hq * N f32).
pub fn scratch_bytes(dims: &AttentionDims) -> usize {
    let pass = match fused_dq_fits(dims) {
        true => DqPass::Fused,
        false => DqPass::Split,
    };
    scratch_bytes_for(dims, pass)
}

/// The backward's scratch for a given dq pass: dvec (Hq, N) f32, and for [`DqPass::Fused`]
/// (256-byte aligned after it) one kv head's query heads' f32 dq accumulator (rows rounded up
/// to 64-row tiles, in the kernel's fragment order) and counters.
pub fn scratch_bytes_for(dims: &AttentionDims, pass: DqPass) -> usize {
    match pass {
        DqPass::Fused => fused_dq_offset(dims) + fused_dq_scratch(dims).iter().sum::<usize>(),
        DqPass::Split => dims.lse_len() * 4,
    }
}

/// Where the fused dq pass's scratch starts: after dvec (Hq, N) f32, 256-byte aligned.
fn fused_dq_offset(dims: &AttentionDims) -> usize {
    (dims.lse_len() * 4).next_multiple_of(256)
}

/// How the backward forms dq.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DqPass {
    /// A dq kernel after the dk/dv pass, recomputing the scores (every family, every head dim).
    Split,
    /// In the dk/dv pass, one launch per kv head, each key tile adding its part in key order
    /// (sm90, head dim 128): 5 tile products instead of 7, deterministic.
    Fused,
}

impl DqPass {
    /// The pass for a call: [`Self::Fused`] for sm90 at head dim 128 when the sequences
    /// average at least [`FUSED_DQ_MIN_TOKENS`] tokens, else [`Self::Split`]; [`DQ_ENV`]
    /// (`fused` or `split`) overrides where the fused pass can run and [`scratch_bytes`] has
    /// room for it.
    pub fn for_call(kernels: AttentionKernels, dims: &AttentionDims) -> Result<Self, RuntimeError> {
        let can = kernels == AttentionKernels::Sm90 && fused_dq_fits(dims);
        let long = dims.n_tokens / dims.num_seqs.max(1) >= FUSED_DQ_MIN_TOKENS;
        match std::env::var(DQ_ENV).ok().as_deref() {
            Some("fused") if can => Ok(Self::Fused),
            Some("fused" | "split") => Ok(Self::Split),
            Some(other) => Err(RuntimeError::InvalidArgument(format!(
                "{DQ_ENV}={other}: expected fused or split"
            ))),
            None if can && long => Ok(Self::Fused),
            None => Ok(Self::Split),
        }
    }
}

/// Sequences at least this long on average (tokens per sequence) run the sm90 backward at head
/// dim 128 as one pass per kv head that also forms dq (`attention_bwd_dkdvdq_sm90_d128`), not
/// dk/dv then a dq kernel that recomputes the scores. Measured on the H200 (8B QLoRA lean step,
/// one sequence): at 32,768 tokens the fused pass makes the step 2.6-3.0% shorter (4.25-4.29
/// against 4.38-4.40 s); at 2,048-token sequences (64 blocks a launch at 8,192 tokens) it is
/// 4x slower than the split kernels, so shorter sequences keep those.
pub const FUSED_DQ_MIN_TOKENS: usize = 32768;

/// `fused` or `split` forces the sm90 backward's dq path at head dim 128 (see
/// [`FUSED_DQ_MIN_TOKENS`]), e.g. to compare them.
pub const DQ_ENV: &str = "FTRT_ATTENTION_DQ";

/// Whether [`scratch_bytes`] makes room for the fused dq pass: head dim 128 and at least
/// [`FUSED_DQ_MIN_TOKENS`] tokens (a single sequence could then be that long).
fn fused_dq_fits(dims: &AttentionDims) -> bool {
    dims.head_dim == 128 && dims.n_tokens >= FUSED_DQ_MIN_TOKENS
}

/// The fused dq pass's scratch after dvec, bytes: one kv head's query heads' f32 dq
/// accumulator (G, N rounded up to 64, D; each 64-row tile in the kernel's fragment order),
/// then their per-tile counters (G, ceil(N / 64)) u32.
fn fused_dq_scratch(dims: &AttentionDims) -> [usize; 2] {
    let g = dims.n_heads_q / dims.n_heads_kv.max(1);
    let n = dims.n_tokens;
    [
        (g * n.next_multiple_of(64) * dims.head_dim * 4).next_multiple_of(256),
        g * n.div_ceil(64) * 4,
    ]
}

/// The segments [start, end) of the token axis: the S sequences, then (if cu[S] < N) the
/// trailing padding segment. Panics on a malformed `cu_seqlens`.
pub fn segments(cu_seqlens: &[i32], n_tokens: usize) -> Vec<(usize, usize)> {
    assert!(
        !cu_seqlens.is_empty() && cu_seqlens[0] == 0,
        "cu_seqlens must start with 0"
    );
    let mut v = Vec::with_capacity(cu_seqlens.len());
    for w in cu_seqlens.windows(2) {
        assert!(
            w[0] <= w[1],
            "cu_seqlens must be nondecreasing: {cu_seqlens:?}"
        );
        v.push((w[0] as usize, w[1] as usize));
    }
    let last = *cu_seqlens.last().unwrap() as usize;
    assert!(
        last <= n_tokens,
        "cu_seqlens ends at {last} > n_tokens {n_tokens}"
    );
    if last < n_tokens {
        v.push((last, n_tokens));
    }
    v
}

/// (start, end) of the segment of every token.
fn token_bounds(cu_seqlens: &[i32], n_tokens: usize) -> Vec<(usize, usize)> {
    let mut b = vec![(0, 0); n_tokens];
    for (s, e) in segments(cu_seqlens, n_tokens) {
        for x in &mut b[s..e] {
            *x = (s, e);
        }
    }
    b
}

fn dot<T: Real>(a: &[T], b: &[T]) -> T {
    let mut s = T::zero();
    for (&x, &y) in a.iter().zip(b) {
        s = s + x * y;
    }
    s
}

/// The CPU reference, row by row, so callers can check any subset of rows (the GPU selftest
/// does); [`attention_forward_cpu`] and [`attention_backward_cpu`] run it on everything.
pub struct Reference<'a, T: Real> {
    pub dims: AttentionDims,
    bounds: Vec<(usize, usize)>,
    q: &'a [T],
    k: &'a [T],
    v: &'a [T],
}

impl<'a, T: Real> Reference<'a, T> {
    pub fn new(
        dims: AttentionDims,
        cu_seqlens: &[i32],
        q: &'a [T],
        k: &'a [T],
        v: &'a [T],
    ) -> Self {
        dims.check().unwrap();
        assert_eq!(
            cu_seqlens.len(),
            dims.num_seqs + 1,
            "cu_seqlens needs num_seqs + 1 entries"
        );
        assert_eq!(q.len(), dims.q_len());
        assert_eq!(k.len(), dims.kv_len());
        assert_eq!(v.len(), dims.kv_len());
        Self {
            dims,
            bounds: token_bounds(cu_seqlens, dims.n_tokens),
            q,
            k,
            v,
        }
    }
    fn qrow(&self, i: usize, h: usize) -> &'a [T] {
        let d = self.dims.head_dim;
        &self.q[(i * self.dims.n_heads_q + h) * d..][..d]
    }
    fn krow(&self, j: usize, hk: usize) -> &'a [T] {
        let d = self.dims.head_dim;
        &self.k[(j * self.dims.n_heads_kv + hk) * d..][..d]
    }
    fn vrow(&self, j: usize, hk: usize) -> &'a [T] {
        let d = self.dims.head_dim;
        &self.v[(j * self.dims.n_heads_kv + hk) * d..][..d]
    }
    /// Keys visible to query i.
    pub fn keys_of(&self, i: usize) -> std::ops::Range<usize> {
        self.bounds[i].0..i + 1
    }
    /// Queries that see key j.
    pub fn queries_of(&self, j: usize) -> std::ops::Range<usize> {
        j..self.bounds[j].1
    }
    /// Scaled scores of query i, head h, over keys_of(i).
    fn scores(&self, i: usize, h: usize) -> Vec<T> {
        let hk = h / self.dims.group();
        let scale = T::from_f64(self.dims.scale as f64);
        let qi = self.qrow(i, h);
        self.keys_of(i)
            .map(|j| dot(qi, self.krow(j, hk)) * scale)
            .collect()
    }
    /// Forward of query row i, head h: writes out_i (D values), returns lse_i.
    pub fn forward_row(&self, i: usize, h: usize, out: &mut [T]) -> T {
        let hk = h / self.dims.group();
        let x = self.scores(i, h);
        let mut m = x[0];
        for &s in &x {
            if s > m {
                m = s;
            }
        }
        let mut l = T::zero();
        let p: Vec<T> = x
            .iter()
            .map(|&s| {
                let e = (s - m).exp();
                l = l + e;
                e
            })
            .collect();
        out.iter_mut().for_each(|o| *o = T::zero());
        for (pj, j) in p.iter().zip(self.keys_of(i)) {
            for (o, &vv) in out.iter_mut().zip(self.vrow(j, hk)) {
                *o = *o + *pj * vv;
            }
        }
        for o in out.iter_mut() {
            *o = *o / l;
        }
        m + l.ln()
    }
    /// dq_i of query row i, head h, given the forward's lse_i and dvec_i = dout_i . out_i.
    pub fn dq_row(&self, i: usize, h: usize, lse_i: T, dvec_i: T, dout_i: &[T], dq: &mut [T]) {
        let hk = h / self.dims.group();
        let scale = T::from_f64(self.dims.scale as f64);
        dq.iter_mut().for_each(|o| *o = T::zero());
        for (x, j) in self.scores(i, h).into_iter().zip(self.keys_of(i)) {
            let p = (x - lse_i).exp();
            let ds = p * (dot(dout_i, self.vrow(j, hk)) - dvec_i);
            for (o, &kk) in dq.iter_mut().zip(self.krow(j, hk)) {
                *o = *o + scale * ds * kk;
            }
        }
    }
    /// dk_j, dv_j of key j of kv head hk (summed over the group's query heads).
    /// `lse`, `dvec`: (Hq, N); `dout`: (N, Hq, D).
    #[allow(clippy::too_many_arguments)]
    pub fn dkdv_row(
        &self,
        j: usize,
        hk: usize,
        lse: &[T],
        dvec: &[T],
        dout: &[T],
        dk: &mut [T],
        dv: &mut [T],
    ) {
        let (d, n, hq, g) = (
            self.dims.head_dim,
            self.dims.n_tokens,
            self.dims.n_heads_q,
            self.dims.group(),
        );
        let scale = T::from_f64(self.dims.scale as f64);
        dk.iter_mut().for_each(|o| *o = T::zero());
        dv.iter_mut().for_each(|o| *o = T::zero());
        let (kj, vj) = (self.krow(j, hk), self.vrow(j, hk));
        for h in hk * g..(hk + 1) * g {
            for i in self.queries_of(j) {
                let qi = self.qrow(i, h);
                let doi = &dout[(i * hq + h) * d..][..d];
                let p = (scale * dot(qi, kj) - lse[h * n + i]).exp();
                let ds = p * (dot(doi, vj) - dvec[h * n + i]);
                for c in 0..d {
                    dk[c] = dk[c] + scale * ds * qi[c];
                    dv[c] = dv[c] + p * doi[c];
                }
            }
        }
    }
}

/// dvec = rowsum(dout * out), (Hq, N).
pub fn attention_dvec_cpu<T: Real>(dims: &AttentionDims, out: &[T], dout: &[T]) -> Vec<T> {
    let (d, n, hq) = (dims.head_dim, dims.n_tokens, dims.n_heads_q);
    let mut dvec = vec![T::zero(); hq * n];
    for i in 0..n {
        for h in 0..hq {
            let r = (i * hq + h) * d;
            dvec[h * n + i] = dot(&out[r..r + d], &dout[r..r + d]);
        }
    }
    dvec
}

/// Fewest token rows a thread of the CPU attention references (these and the model's KV-cache
/// attention) takes at once: each row is Hq heads' pass over up to N keys.
pub const CPU_ROW_BLOCK: usize = 16;

/// CPU forward: out (N, Hq, D), lse (Hq, N). Token rows run in parallel ([`for_row_blocks`]).
pub fn attention_forward_cpu<T: Real>(
    dims: &AttentionDims,
    cu_seqlens: &[i32],
    q: &[T],
    k: &[T],
    v: &[T],
    out: &mut [T],
    lse: &mut [T],
) {
    let r = Reference::new(*dims, cu_seqlens, q, k, v);
    let (d, n, hq) = (dims.head_dim, dims.n_tokens, dims.n_heads_q);
    assert_eq!(out.len(), dims.q_len());
    assert_eq!(lse.len(), dims.lse_len());
    let mut lse_rows = vec![T::zero(); n * hq]; // (N, Hq): row-major by token, as out
    for_row_blocks(
        [out, &mut lse_rows],
        n,
        CPU_ROW_BLOCK,
        |rows, [out, lse_rows]| {
            for (t, i) in rows.enumerate() {
                for h in 0..hq {
                    let o = &mut out[(t * hq + h) * d..][..d];
                    lse_rows[t * hq + h] = r.forward_row(i, h, o);
                }
            }
        },
    );
    for i in 0..n {
        for h in 0..hq {
            lse[h * n + i] = lse_rows[i * hq + h];
        }
    }
}

/// CPU backward from the forward's out and lse: dq (N, Hq, D), dk, dv (N, Hkv, D). Token rows
/// run in parallel ([`for_row_blocks`]).
#[allow(clippy::too_many_arguments)]
pub fn attention_backward_cpu<T: Real>(
    dims: &AttentionDims,
    cu_seqlens: &[i32],
    q: &[T],
    k: &[T],
    v: &[T],
    out: &[T],
    lse: &[T],
    dout: &[T],
    dq: &mut [T],
    dk: &mut [T],
    dv: &mut [T],
) {
    let r = Reference::new(*dims, cu_seqlens, q, k, v);
    let (d, n, hq, hkv) = (
        dims.head_dim,
        dims.n_tokens,
        dims.n_heads_q,
        dims.n_heads_kv,
    );
    assert_eq!(out.len(), dims.q_len());
    assert_eq!(dout.len(), dims.q_len());
    assert_eq!(lse.len(), dims.lse_len());
    assert_eq!(
        (dq.len(), dk.len(), dv.len()),
        (dims.q_len(), dims.kv_len(), dims.kv_len())
    );
    let dvec = attention_dvec_cpu(dims, out, dout);
    for_row_blocks([dq], n, CPU_ROW_BLOCK, |rows, [dq]| {
        for (t, i) in rows.enumerate() {
            for h in 0..hq {
                let o = (i * hq + h) * d;
                let (lse_i, dvec_i) = (lse[h * n + i], dvec[h * n + i]);
                let dqi = &mut dq[(t * hq + h) * d..][..d];
                r.dq_row(i, h, lse_i, dvec_i, &dout[o..o + d], dqi);
            }
        }
    });
    for_row_blocks([dk, dv], n, CPU_ROW_BLOCK, |rows, [dk, dv]| {
        for (t, j) in rows.enumerate() {
            for hk in 0..hkv {
                let o = (t * hkv + hk) * d;
                let (dkj, dvj) = (&mut dk[o..o + d], &mut dv[o..o + d]);
                r.dkdv_row(j, hk, lse, &dvec, dout, dkj, dvj);
            }
        }
    });
}

// ------------------------------------------------------------------------------ GPU launchers

/// Which kernel family runs attention on a GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttentionKernels {
    /// `attention.cu`: per-warp mma.sync tiles, compute_80 PTX (every GPU from Ampere on).
    Sm80,
    /// `attention_sm90.cu`: warpgroup MMAs (wgmma), compute_90a PTX (Hopper only).
    Sm90,
}

/// Environment variable that forces a kernel family (`sm80` or `sm90`), e.g. to compare them.
pub const KERNELS_ENV: &str = "FTRT_ATTENTION_KERNELS";

/// The three launches of one kernel family that differ between families (the dvec kernel is
/// attention.cu's for both).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pass {
    Fwd,
    Dkdv,
    Dq,
    /// Sm90 only, head dim 128: dk, dv and dq in one pass per kv head.
    DkdvDq,
}

/// Name, block size, rows (queries or keys) per block and dynamic shared memory of a launch;
/// for Sm90, the rows of the TMA boxes of q and dout, and of k and v.
struct Launch {
    name: String,
    threads: u32,
    rows: usize,
    smem: u32,
    box_rows: (usize, usize),
}

/// A TMA descriptor (CUtensorMap) of one (N, H, D) bf16 tensor as attention_sm90.cu reads it:
/// four dimensions, innermost first (64 elements, N rows, D / 64 column halves, H heads) with
/// the 128-byte swizzle, so a box of one head's rows lands in shared memory as wgmma's
/// 128-byte-swizzled operand tiles; rows past N read as zeros.
#[repr(transparent)]
#[derive(Clone, Copy)]
struct TmaMap(cudarc::driver::sys::CUtensorMap);

// SAFETY: a plain 128-byte value that the kernels take by value (__grid_constant__).
unsafe impl cudarc::driver::DeviceRepr for TmaMap {}

impl TmaMap {
    /// The map of `x` (n rows of `heads` heads of d elements), boxes of `rows` rows.
    fn new(
        x: DevPtr<bf16>,
        n: usize,
        heads: usize,
        d: usize,
        rows: usize,
    ) -> Result<Self, RuntimeError> {
        use cudarc::driver::sys;
        let row_bytes = (heads * d * 2) as u64;
        let dims: [u64; 4] = [64, n as u64, (d / 64) as u64, heads as u64];
        let strides: [u64; 3] = [row_bytes, 128, (d * 2) as u64];
        let boxes: [u32; 4] = [64, rows as u32, (d / 64) as u32, 1];
        let unit: [u32; 4] = [1; 4];
        let mut map = std::mem::MaybeUninit::<sys::CUtensorMap>::uninit();
        // SAFETY: dims, boxes and unit hold the rank's 4 entries and strides its 3; the map is
        // written by the call before it is read.
        let r = unsafe {
            sys::cuTensorMapEncodeTiled(
                map.as_mut_ptr(),
                sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
                4,
                x.addr as *mut std::ffi::c_void,
                dims.as_ptr(),
                strides.as_ptr(),
                boxes.as_ptr(),
                unit.as_ptr(),
                sys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
                sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
                sys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_128B,
                sys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
            )
        };
        if r != sys::CUresult::CUDA_SUCCESS {
            return Err(RuntimeError::Driver(cudarc::driver::DriverError(r)));
        }
        // SAFETY: initialized by the successful call above.
        Ok(Self(unsafe { map.assume_init() }))
    }
}

impl AttentionKernels {
    /// The family for a call of shape `dims` on `gpu`: Sm90 on compute capability 9.0 when
    /// the token count is a multiple of 8 (its TMA tiles start on row groups), else Sm80;
    /// `FTRT_ATTENTION_KERNELS` overrides (sm90 then fails where it cannot run).
    pub fn for_call(gpu: &Gpu, dims: &AttentionDims) -> Result<Self, RuntimeError> {
        match std::env::var(KERNELS_ENV).ok().as_deref() {
            Some("sm80") => Ok(Self::Sm80),
            Some("sm90") => Ok(Self::Sm90),
            Some(other) => Err(RuntimeError::InvalidArgument(format!(
                "{KERNELS_ENV}={other}: expected sm80 or sm90"
            ))),
            None if is_hopper(gpu) && dims.n_tokens.is_multiple_of(8) => Ok(Self::Sm90),
            None => Ok(Self::Sm80),
        }
    }

    /// The family's short name, as `FTRT_ATTENTION_KERNELS` spells it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Sm80 => "sm80",
            Self::Sm90 => "sm90",
        }
    }

    /// Sm90 needs its tiles to start on row groups of 8 tokens.
    fn check(self, dims: &AttentionDims) -> Result<(), RuntimeError> {
        if self == Self::Sm90 && !dims.n_tokens.is_multiple_of(8) {
            return Err(RuntimeError::InvalidArgument(format!(
                "attention: the sm90 kernels need a token count that is a multiple of 8, not {}",
                dims.n_tokens
            )));
        }
        Ok(())
    }

    /// The families this GPU can run (the selftest checks each).
    pub fn available(gpu: &Gpu) -> Vec<Self> {
        if is_hopper(gpu) {
            vec![Self::Sm80, Self::Sm90]
        } else {
            vec![Self::Sm80]
        }
    }

    fn module(self) -> &'static ftrt_runtime::PtxModule {
        match self {
            Self::Sm80 => &crate::kernels::ATTENTION,
            Self::Sm90 => &crate::kernels::ATTENTION_SM90,
        }
    }

    /// The launch of `pass` at head dim `d`; shared memory must match the kernels' layouts
    /// (attention.cu: row pitch d + 8; attention_sm90.cu: swizzled tiles, no padding).
    fn launch(self, pass: Pass, d: usize) -> Launch {
        let suffix = match self {
            Self::Sm80 => "",
            Self::Sm90 => "_sm90",
        };
        let name = |p: &str| format!("attention_{p}{suffix}_d{d}");
        match (self, pass) {
            (Self::Sm80, Pass::Fwd) => Launch {
                name: name("fwd"),
                threads: 128,
                rows: 128,
                smem: ((128 + 2 * fwd_keys(d)) * (d + 8) * 2) as u32,
                box_rows: (0, 0),
            },
            (Self::Sm80, Pass::Dkdv) => Launch {
                name: name("bwd_dkdv"),
                threads: 128,
                rows: 64,
                smem: ((128 + 2 * dkdv_query_rows(d)) * (d + 8) * 2 + 8 * dkdv_query_rows(d))
                    as u32,
                box_rows: (0, 0),
            },
            (Self::Sm80, Pass::Dq) => Launch {
                name: name("bwd_dq"),
                threads: 128,
                rows: 64,
                smem: (4 * 64 * (d + 8) * 2) as u32,
                box_rows: (0, 0),
            },
            // fwd: Q (128 rows) + K, V (128 keys, two buffers each) + 9 mbarriers; one
            // producer and two consumer warpgroups
            (Self::Sm90, Pass::Fwd) => Launch {
                name: name("fwd"),
                threads: 384,
                rows: 128,
                smem: ((128 + 4 * 128) * d * 2 + 128) as u32,
                box_rows: (128, 128),
            },
            // dkdv: K, V (128 keys) + Q, dO, lse, dvec (64 queries, three buffers each) + 7
            // mbarriers; one producer and two consumer warpgroups
            (Self::Sm90, Pass::Dkdv) => Launch {
                name: name("bwd_dkdv"),
                threads: 384,
                rows: 128,
                smem: ((2 * 128 + 6 * 64) * d * 2 + 6 * 64 * 4 + 64) as u32,
                box_rows: (64, 128),
            },
            // dq: Q, dO (128 queries) + K (64 keys, four buffers) + V (three) + 15 mbarriers;
            // one producer and two consumer warpgroups
            (Self::Sm90, Pass::Dq) => Launch {
                name: name("bwd_dq"),
                threads: 384,
                rows: 128,
                smem: ((2 * 128 + 7 * 64) * d * 2 + 128) as u32,
                box_rows: (128, 64),
            },
            // dkdvdq: dkdv's with two query stages, + two (64 queries, 128 keys) dS tiles + two
            // (64, D) f32 dq parts + 9 mbarriers
            (Self::Sm90, Pass::DkdvDq) => Launch {
                name: name("bwd_dkdvdq"),
                threads: 384,
                rows: 128,
                smem: ((2 * 128 + 4 * 64) * d * 2
                    + 2 * 64 * 128 * 2
                    + 2 * 64 * d * 4
                    + 4 * 64 * 4
                    + 128) as u32,
                box_rows: (64, 128),
            },
            (Self::Sm80, Pass::DkdvDq) => unreachable!("the fused dq pass is sm90's"),
        }
    }

    /// Sm90's TMA maps of `x`, a prefix of [q, k, v, dout], for launch `l`; none for Sm80.
    fn maps(
        self,
        dims: &AttentionDims,
        l: &Launch,
        x: &[DevPtr<bf16>],
    ) -> Result<Vec<TmaMap>, RuntimeError> {
        if self == Self::Sm80 {
            return Ok(vec![]);
        }
        let (hq, hkv) = (dims.n_heads_q, dims.n_heads_kv);
        let heads_rows = [
            (hq, l.box_rows.0),
            (hkv, l.box_rows.1),
            (hkv, l.box_rows.1),
            (hq, l.box_rows.0),
        ];
        x.iter()
            .zip(heads_rows)
            .map(|(&p, (heads, rows))| TmaMap::new(p, dims.n_tokens, heads, dims.head_dim, rows))
            .collect()
    }

    /// The launch function of `pass`, opted in to its shared memory.
    fn function(self, gpu: &Gpu, l: &Launch) -> Result<cudarc::driver::CudaFunction, RuntimeError> {
        gpu.function_with_smem(self.module(), &l.name, l.smem)
    }
}

fn check_aligned(name: &str, addr: u64) -> Result<(), RuntimeError> {
    if !addr.is_multiple_of(16) {
        return Err(RuntimeError::InvalidArgument(format!(
            "attention: {name} must be 16-byte aligned (0x{addr:x})"
        )));
    }
    Ok(())
}

fn config(grid: (u32, u32), threads: u32, smem: u32) -> cudarc::driver::LaunchConfig {
    cudarc::driver::LaunchConfig {
        grid_dim: (grid.0, grid.1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: smem,
    }
}

/// The arguments every forward and backward kernel takes after its tensor inputs:
/// cu_seqlens, S, N, Hq, Hkv, scale.
struct ShapeArgs {
    cu: u64,
    s: i32,
    n: i32,
    hq: i32,
    hkv: i32,
    scale: f32,
}

impl ShapeArgs {
    fn new(dims: &AttentionDims, cu_seqlens: DevPtr<i32>) -> Self {
        Self {
            cu: cu_seqlens.addr,
            s: dims.num_seqs as i32,
            n: dims.n_tokens as i32,
            hq: dims.n_heads_q as i32,
            hkv: dims.n_heads_kv as i32,
            scale: dims.scale,
        }
    }

    fn push<'a>(&'a self, b: &mut cudarc::driver::LaunchArgs<'a>) {
        b.arg(&self.cu);
        b.arg(&self.s);
        b.arg(&self.n);
        b.arg(&self.hq);
        b.arg(&self.hkv);
        b.arg(&self.scale);
    }
}

/// Compute capability 9.0: the GPUs the compute_90a kernels run on.
fn is_hopper(gpu: &Gpu) -> bool {
    gpu.info().compute_capability == (9, 0)
}

/// Keys per forward tile of attention.cu (`FwdTiles::BN`).
fn fwd_keys(d: usize) -> usize {
    if d >= 128 {
        32
    } else {
        64
    }
}
/// Query rows per dkdv step of attention.cu (`DkdvRows`).
fn dkdv_query_rows(d: usize) -> usize {
    if d >= 128 {
        32
    } else {
        64
    }
}

/// Forward on the compute stream: out (N, Hq, D) bf16, lse (Hq, N) f32 from q, k, v, with the
/// kernel family for the call ([`AttentionKernels::for_call`]).
#[allow(clippy::too_many_arguments)]
pub fn attention_forward(
    gpu: &Gpu,
    dims: AttentionDims,
    q: DevPtr<bf16>,
    k: DevPtr<bf16>,
    v: DevPtr<bf16>,
    cu_seqlens: DevPtr<i32>,
    out: DevPtr<bf16>,
    lse: DevPtr<f32>,
) -> Result<(), RuntimeError> {
    let kernels = AttentionKernels::for_call(gpu, &dims)?;
    attention_forward_with(kernels, gpu, dims, q, k, v, cu_seqlens, out, lse)
}

/// [`attention_forward`] with a chosen kernel family.
#[allow(clippy::too_many_arguments)]
pub fn attention_forward_with(
    kernels: AttentionKernels,
    gpu: &Gpu,
    dims: AttentionDims,
    q: DevPtr<bf16>,
    k: DevPtr<bf16>,
    v: DevPtr<bf16>,
    cu_seqlens: DevPtr<i32>,
    out: DevPtr<bf16>,
    lse: DevPtr<f32>,
) -> Result<(), RuntimeError> {
    dims.check_gpu()?;
    if dims.n_tokens == 0 {
        return Ok(());
    }
    for (name, p) in [
        ("q", q.addr),
        ("k", k.addr),
        ("v", v.addr),
        ("out", out.addr),
    ] {
        check_aligned(name, p)?;
    }
    kernels.check(&dims)?;
    let l = kernels.launch(Pass::Fwd, dims.head_dim);
    let f = kernels.function(gpu, &l)?;
    let shape = ShapeArgs::new(&dims, cu_seqlens);
    let maps = kernels.maps(&dims, &l, &[q, k, v])?;
    let mut b = gpu.stream().launch_builder(&f);
    if kernels == AttentionKernels::Sm80 {
        b.arg(&q.addr);
        b.arg(&k.addr);
        b.arg(&v.addr);
    }
    shape.push(&mut b);
    b.arg(&out.addr);
    b.arg(&lse.addr);
    for m in &maps {
        b.arg(m);
    }
    let grid = (dims.n_heads_q as u32, dims.n_tokens.div_ceil(l.rows) as u32);
    unsafe { b.launch(config(grid, l.threads, l.smem)) }?;
    Ok(())
}

/// Backward on the compute stream: dq (N, Hq, D), dk, dv (N, Hkv, D) bf16 (overwritten, not
/// accumulated) from the forward's inputs, its out and lse, and dout, with the GPU's kernel
/// family and dq pass ([`DqPass::for_call`]). `scratch` holds [`scratch_bytes`] bytes (dvec,
/// and the fused dq pass's accumulator where it may run). Deterministic: the same inputs give
/// the same bits.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    gpu: &Gpu,
    dims: AttentionDims,
    q: DevPtr<bf16>,
    k: DevPtr<bf16>,
    v: DevPtr<bf16>,
    out: DevPtr<bf16>,
    lse: DevPtr<f32>,
    dout: DevPtr<bf16>,
    cu_seqlens: DevPtr<i32>,
    dq: DevPtr<bf16>,
    dk: DevPtr<bf16>,
    dv: DevPtr<bf16>,
    scratch: DevPtr<f32>,
) -> Result<(), RuntimeError> {
    let kernels = AttentionKernels::for_call(gpu, &dims)?;
    let pass = DqPass::for_call(kernels, &dims)?;
    attention_backward_with(
        kernels, pass, gpu, dims, q, k, v, out, lse, dout, cu_seqlens, dq, dk, dv, scratch,
    )
}

/// [`attention_backward`] with a chosen kernel family and dq pass (`scratch`: at least
/// [`scratch_bytes_for`] bytes for it).
#[allow(clippy::too_many_arguments)]
pub fn attention_backward_with(
    kernels: AttentionKernels,
    pass: DqPass,
    gpu: &Gpu,
    dims: AttentionDims,
    q: DevPtr<bf16>,
    k: DevPtr<bf16>,
    v: DevPtr<bf16>,
    out: DevPtr<bf16>,
    lse: DevPtr<f32>,
    dout: DevPtr<bf16>,
    cu_seqlens: DevPtr<i32>,
    dq: DevPtr<bf16>,
    dk: DevPtr<bf16>,
    dv: DevPtr<bf16>,
    scratch: DevPtr<f32>,
) -> Result<(), RuntimeError> {
    dims.check_gpu()?;
    if dims.n_tokens == 0 {
        return Ok(());
    }
    for (name, p) in [
        ("q", q.addr),
        ("k", k.addr),
        ("v", v.addr),
        ("out", out.addr),
        ("dout", dout.addr),
        ("dq", dq.addr),
        ("dk", dk.addr),
        ("dv", dv.addr),
    ] {
        check_aligned(name, p)?;
    }
    kernels.check(&dims)?;
    if kernels == AttentionKernels::Sm90 {
        // dkdv bulk-copies rows of lse and dvec
        check_aligned("lse", lse.addr)?;
        check_aligned("scratch", scratch.addr)?;
    }
    let d = dims.head_dim;
    let shape = ShapeArgs::new(&dims, cu_seqlens);
    let dvec = scratch;

    // dvec = rowsum(dout * out): a (token, head) row by d / 8 lanes, DOT_ROWS rows a lane group
    let f = gpu.function(
        &crate::kernels::ATTENTION,
        &format!("attention_bwd_dot_d{d}"),
    )?;
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(&out.addr);
    b.arg(&dout.addr);
    b.arg(&shape.n);
    b.arg(&shape.hq);
    b.arg(&dvec.addr);
    let rows = dims.n_tokens * dims.n_heads_q;
    let rows_a_block = 128 / (d / 8) * DOT_ROWS;
    unsafe { b.launch(config((rows.div_ceil(rows_a_block) as u32, 1), 128, 0)) }?;

    if pass == DqPass::Fused {
        if kernels != AttentionKernels::Sm90 || d != 128 {
            return Err(RuntimeError::InvalidArgument(format!(
                "attention: the fused dq pass runs on the sm90 kernels at head dim 128, not {} at {d}",
                kernels.name()
            )));
        }
        // one launch per kv head: a block per key tile, its query heads' dq accumulated in
        // key order into the f32 scratch after dvec (it and the counters zeroed first), then
        // written out as bf16. Each launch looks its function up right before it, so that a
        // profile charges the kernel, not the memset before it, with its time.
        let l = kernels.launch(Pass::DkdvDq, d);
        let maps = kernels.maps(&dims, &l, &[q, k, v, dout])?;
        let [acc_bytes, sem_bytes] = fused_dq_scratch(&dims);
        let acc = scratch.offset(fused_dq_offset(&dims) / 4);
        let sem = acc.offset(acc_bytes / 4);
        let g = (dims.n_heads_q / dims.n_heads_kv) as i32;
        for hk in 0..dims.n_heads_kv as i32 {
            gpu.memset_zero(acc.cast(), acc_bytes + sem_bytes)?;
            let f = kernels.function(gpu, &l)?;
            let mut b = gpu.stream().launch_builder(&f);
            b.arg(&lse.addr);
            b.arg(&dvec.addr);
            shape.push(&mut b);
            b.arg(&hk);
            b.arg(&dk.addr);
            b.arg(&dv.addr);
            b.arg(&acc.addr);
            b.arg(&sem.addr);
            for m in &maps {
                b.arg(m);
            }
            let grid = (1, dims.n_tokens.div_ceil(l.rows) as u32);
            unsafe { b.launch(config(grid, l.threads, l.smem)) }?;
            let h0 = hk * g;
            let to_bf16 = gpu.function(kernels.module(), "attention_dq_from_acc_d128")?;
            let mut b = gpu.stream().launch_builder(&to_bf16);
            b.arg(&acc.addr);
            b.arg(&dq.addr);
            b.arg(&shape.n);
            b.arg(&shape.hq);
            b.arg(&h0);
            b.arg(&g);
            b.arg(&shape.scale);
            let quads = g as usize * dims.n_tokens * d / 4;
            unsafe { b.launch(config((quads.div_ceil(256) as u32, 1), 256, 0)) }?;
        }
        return Ok(());
    }
    // dk, dv: one block per (key tile, kv head); dq: one block per (query tile, query head)
    for (pass, heads) in [(Pass::Dkdv, dims.n_heads_kv), (Pass::Dq, dims.n_heads_q)] {
        let l = kernels.launch(pass, d);
        let f = kernels.function(gpu, &l)?;
        let maps = kernels.maps(&dims, &l, &[q, k, v, dout])?;
        let mut b = gpu.stream().launch_builder(&f);
        if kernels == AttentionKernels::Sm80 {
            b.arg(&q.addr);
            b.arg(&k.addr);
            b.arg(&v.addr);
            b.arg(&dout.addr);
        }
        b.arg(&lse.addr);
        b.arg(&dvec.addr);
        shape.push(&mut b);
        if pass == Pass::Dkdv {
            b.arg(&dk.addr);
            b.arg(&dv.addr);
        } else {
            b.arg(&dq.addr);
        }
        for m in &maps {
            b.arg(m);
        }
        let grid = (heads as u32, dims.n_tokens.div_ceil(l.rows) as u32);
        unsafe { b.launch(config(grid, l.threads, l.smem)) }?;
    }
    Ok(())
}

// ------------------------------------------------------------------------------ GPU selftest

/// Random packed inputs of one selftest / emulator case (bf16 values, as f32 too).
pub struct Case {
    pub dims: AttentionDims,
    pub cu_seqlens: Vec<i32>,
    pub q: Vec<bf16>,
    pub k: Vec<bf16>,
    pub v: Vec<bf16>,
    pub dout: Vec<bf16>,
}

impl Case {
    /// `seqlens` must sum to at most `n_tokens` (the rest is trailing padding). q is drawn
    /// from [-q_amp, q_amp) so the softmax is neither flat nor one-hot; k, v, dout from [-1, 1).
    pub fn random(
        seed: u64,
        n_tokens: usize,
        seqlens: &[usize],
        hq: usize,
        hkv: usize,
        d: usize,
        q_amp: f32,
    ) -> Case {
        let mut rng = ftrt_runtime::rng::SplitMix64::new(seed);
        let mut cu = vec![0i32];
        for &l in seqlens {
            cu.push(cu.last().unwrap() + l as i32);
        }
        assert!(*cu.last().unwrap() as usize <= n_tokens);
        let dims = AttentionDims::new(n_tokens, seqlens.len(), hq, hkv, d);
        let mut gen = |n: usize, amp: f32| -> Vec<bf16> {
            (0..n)
                .map(|_| bf16::from_f32(amp * rng.symmetric_f32()))
                .collect()
        };
        let q = gen(dims.q_len(), q_amp);
        let k = gen(dims.kv_len(), 1.0);
        let v = gen(dims.kv_len(), 1.0);
        let dout = gen(dims.q_len(), 1.0);
        Case {
            dims,
            cu_seqlens: cu,
            q,
            k,
            v,
            dout,
        }
    }
}

pub fn to_f64(x: &[bf16]) -> Vec<f64> {
    x.iter().map(|v| v.to_f64()).collect()
}

/// max |a - b| / max |b| over paired slices.
fn rel_err(pairs: &[(f64, f64)]) -> f64 {
    let mut num = 0f64;
    let mut den = 0f64;
    for &(a, b) in pairs {
        num = num.max((a - b).abs());
        den = den.max(b.abs());
    }
    if den == 0.0 {
        num
    } else {
        num / den
    }
}

/// Errors of GPU outputs against the CPU reference (f64) on a subset of rows: every
/// `stride`-th query row of query heads {0, Hq-1} (out, lse, dq) and every `stride`-th key of
/// kv heads {0, Hkv-1} (dk, dv). The backward reference takes the GPU's out and lse as its
/// inputs (they are checked separately), like the GPU backward does.
/// Returns [out, lse, dq, dk, dv] relative errors.
#[allow(clippy::too_many_arguments)]
pub fn check_against_reference(
    c: &Case,
    out: &[bf16],
    lse: &[f32],
    dq: &[bf16],
    dk: &[bf16],
    dv: &[bf16],
    stride: usize,
) -> [f64; 5] {
    let dims = c.dims;
    let (d, n, hq, hkv) = (
        dims.head_dim,
        dims.n_tokens,
        dims.n_heads_q,
        dims.n_heads_kv,
    );
    let (q, k, v, dout) = (to_f64(&c.q), to_f64(&c.k), to_f64(&c.v), to_f64(&c.dout));
    let out64 = to_f64(out);
    let lse64: Vec<f64> = lse.iter().map(|&x| x as f64).collect();
    let r = Reference::new(dims, &c.cu_seqlens, &q, &k, &v);
    let dvec = attention_dvec_cpu(&dims, &out64, &dout);
    let mut e_out = vec![];
    let mut e_lse = vec![];
    let mut e_dq = vec![];
    let mut e_dk = vec![];
    let mut e_dv = vec![];
    let mut row = vec![0f64; d];
    let mut row2 = vec![0f64; d];
    let heads = |h: usize| if h == 1 { vec![0] } else { vec![0, h - 1] };
    for h in heads(hq) {
        // rows stride apart, plus each segment's first and last row
        let mut rows: Vec<usize> = (0..n).step_by(stride).collect();
        for (s, e) in segments(&c.cu_seqlens, n) {
            if e > s {
                rows.push(s);
                rows.push(e - 1);
            }
        }
        for i in rows {
            let o = (i * hq + h) * d;
            let l = r.forward_row(i, h, &mut row);
            e_lse.push((lse64[h * n + i], l));
            e_out.extend(out64[o..o + d].iter().copied().zip(row.iter().copied()));
            r.dq_row(
                i,
                h,
                lse64[h * n + i],
                dvec[h * n + i],
                &dout[o..o + d],
                &mut row,
            );
            e_dq.extend(
                dq[o..o + d]
                    .iter()
                    .map(|x| x.to_f64())
                    .zip(row.iter().copied()),
            );
        }
    }
    for hk in heads(hkv) {
        for j in (0..n).step_by(stride) {
            let o = (j * hkv + hk) * d;
            r.dkdv_row(j, hk, &lse64, &dvec, &dout, &mut row, &mut row2);
            e_dk.extend(
                dk[o..o + d]
                    .iter()
                    .map(|x| x.to_f64())
                    .zip(row.iter().copied()),
            );
            e_dv.extend(
                dv[o..o + d]
                    .iter()
                    .map(|x| x.to_f64())
                    .zip(row2.iter().copied()),
            );
        }
    }
    [
        rel_err(&e_out),
        rel_err(&e_lse),
        rel_err(&e_dq),
        rel_err(&e_dk),
        rel_err(&e_dv),
    ]
}

/// The selftest's cases: (name, case, row stride of the CPU check).
fn selftest_cases() -> Vec<(String, Case, usize)> {
    let mut v = vec![];
    // Llama-like: D = 128, GQA 4, four uneven sequences filling the 8192-token budget
    let s = [2999, 1001, 2500, 1692];
    v.push((
        "d128 N=8192 S=4 Hq=32 Hkv=8".to_string(),
        Case::random(1, 8192, &s, 32, 8, 128, 2.0),
        41,
    ));
    // SmolLM2-135M-like: D = 64, GQA 3, a one-token sequence, a short one and two long ones
    let s = [1, 4095, 63, 4033];
    v.push((
        "d64 N=8192 S=4 Hq=9 Hkv=3".to_string(),
        Case::random(2, 8192, &s, 9, 3, 64, 2.0),
        37,
    ));
    // Llama-3.2-1B-like: D = 64, GQA 4 (query heads in pairs per kv head), two sequences
    let s = [1500, 2596];
    v.push((
        "d64 N=4096 S=2 Hq=16 Hkv=4".to_string(),
        Case::random(5, 4096, &s, 16, 4, 64, 2.0),
        29,
    ));
    // many short sequences, GQA 1, trailing padding (cu[S] < N)
    let mut rng = ftrt_runtime::rng::SplitMix64::new(3);
    let s: Vec<usize> = (0..40).map(|_| rng.range(1, 90)).collect();
    let name = "d128 N=4096 S=40 (+padding) Hq=8 Hkv=8".to_string();
    v.push((name, Case::random(4, 4096, &s, 8, 8, 128, 3.0), 13));
    v
}

/// Runs forward and backward on the GPU for each case, checks them against the CPU reference
/// (a subset of rows; see [`check_against_reference`]) and times them. Rows: (name with
/// TFLOP/s and per-tensor errors, max relative error, ms per call). The backward is also run
/// twice to check that it is bit-for-bit deterministic (a mismatch reports error 1.0). The
/// sm90 family's head-dim-128 cases run the backward with both dq passes.
pub fn selftest(gpu: &Gpu) -> Result<Vec<(String, f64, f64)>, RuntimeError> {
    let mut rows = vec![];
    for kernels in AttentionKernels::available(gpu) {
        rows.extend(selftest_family(gpu, kernels)?);
    }
    Ok(rows)
}

/// [`selftest`] of one kernel family.
fn selftest_family(
    gpu: &Gpu,
    kernels: AttentionKernels,
) -> Result<Vec<(String, f64, f64)>, RuntimeError> {
    use cudarc::driver::sys::CUevent_flags;
    let family = kernels.name();
    let mut rows = vec![];
    for (name, c, stride) in selftest_cases() {
        let name = format!("{family} {name}");
        let dims = c.dims;
        let buf_q = gpu.alloc(dims.q_len() * 2)?;
        let buf_k = gpu.alloc(dims.kv_len() * 2)?;
        let buf_v = gpu.alloc(dims.kv_len() * 2)?;
        let buf_do = gpu.alloc(dims.q_len() * 2)?;
        let buf_o = gpu.alloc(dims.q_len() * 2)?;
        let buf_lse = gpu.alloc(dims.lse_len() * 4)?;
        let buf_dq = gpu.alloc(dims.q_len() * 2)?;
        let buf_dk = gpu.alloc(dims.kv_len() * 2)?;
        let buf_dv = gpu.alloc(dims.kv_len() * 2)?;
        let buf_cu = gpu.alloc(c.cu_seqlens.len() * 4)?;
        let passes = match kernels == AttentionKernels::Sm90 && dims.head_dim == 128 {
            true => vec![DqPass::Split, DqPass::Fused],
            false => vec![DqPass::Split],
        };
        let buf_s = gpu.alloc(scratch_bytes_for(&dims, DqPass::Fused))?;
        gpu.upload(buf_q.ptr(), &c.q)?;
        gpu.upload(buf_k.ptr(), &c.k)?;
        gpu.upload(buf_v.ptr(), &c.v)?;
        gpu.upload(buf_do.ptr(), &c.dout)?;
        gpu.upload(buf_cu.ptr(), &c.cu_seqlens)?;
        let fwd = || {
            attention_forward_with(
                kernels,
                gpu,
                dims,
                buf_q.ptr(),
                buf_k.ptr(),
                buf_v.ptr(),
                buf_cu.ptr(),
                buf_o.ptr(),
                buf_lse.ptr(),
            )
        };
        let bwd = |pass| {
            attention_backward_with(
                kernels,
                pass,
                gpu,
                dims,
                buf_q.ptr(),
                buf_k.ptr(),
                buf_v.ptr(),
                buf_o.ptr(),
                buf_lse.ptr(),
                buf_do.ptr(),
                buf_cu.ptr(),
                buf_dq.ptr(),
                buf_dk.ptr(),
                buf_dv.ptr(),
                buf_s.ptr(),
            )
        };
        let time = |f: &dyn Fn() -> Result<(), RuntimeError>| -> Result<f64, RuntimeError> {
            f()?;
            let start = gpu
                .context()
                .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
            let end = gpu
                .context()
                .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
            let iters = 10;
            start.record(gpu.stream())?;
            for _ in 0..iters {
                f()?;
            }
            end.record(gpu.stream())?;
            Ok(start.elapsed_ms(&end)? as f64 / iters as f64)
        };
        let ms_f = time(&fwd)?;
        let mut out = vec![bf16::ZERO; dims.q_len()];
        let mut lse = vec![0f32; dims.lse_len()];
        gpu.synchronize()?;
        gpu.download(buf_o.ptr(), &mut out)?;
        gpu.download(buf_lse.ptr(), &mut lse)?;
        let finite = |x: &[bf16]| x.iter().all(|x| x.is_finite());
        let nonfinite = |ok: bool| if ok { 0.0 } else { f64::INFINITY };
        let fwd_finite = finite(&out) && lse.iter().all(|x| x.is_finite());
        let tf = dims.forward_flops(&c.cu_seqlens) / (ms_f * 1e-3) / 1e12;
        for (i, pass) in passes.into_iter().enumerate() {
            let ms_b = time(&|| bwd(pass))?;
            gpu.synchronize()?;
            // the gradients of a run, zeroed first
            let grads = || -> Result<[Vec<bf16>; 3], RuntimeError> {
                let mut dq = vec![bf16::ZERO; dims.q_len()];
                let mut dk = vec![bf16::ZERO; dims.kv_len()];
                let mut dv = vec![bf16::ZERO; dims.kv_len()];
                gpu.download(buf_dq.ptr(), &mut dq)?;
                gpu.download(buf_dk.ptr(), &mut dk)?;
                gpu.download(buf_dv.ptr(), &mut dv)?;
                Ok([dq, dk, dv])
            };
            let [dq, dk, dv] = grads()?;
            // determinism: one more backward must give the same bits
            gpu.memset_zero(buf_dq.ptr(), dims.q_len() * 2)?;
            gpu.memset_zero(buf_dk.ptr(), dims.kv_len() * 2)?;
            gpu.memset_zero(buf_dv.ptr(), dims.kv_len() * 2)?;
            bwd(pass)?;
            let again = grads()?;
            let same =
                |a: &[bf16], b: &[bf16]| a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
            let deterministic =
                same(&dq, &again[0]) && same(&dk, &again[1]) && same(&dv, &again[2]);
            let ok = finite(&dq) && finite(&dk) && finite(&dv);
            let e = check_against_reference(&c, &out, &lse, &dq, &dk, &dv, stride);
            if i == 0 {
                rows.push((
                    format!(
                        "attention fwd {name}: {tf:.1} TFLOP/s (out {:.1e}, lse {:.1e})",
                        e[0], e[1]
                    ),
                    e[0].max(e[1]).max(nonfinite(fwd_finite)),
                    ms_f,
                ));
            }
            let tb = dims.backward_flops(&c.cu_seqlens) / (ms_b * 1e-3) / 1e12;
            let how = match pass {
                DqPass::Split => "",
                DqPass::Fused => ", dq fused",
            };
            rows.push((
                format!(
                    "attention bwd {name}{how}: {tb:.1} TFLOP/s (dq {:.1e}, dk {:.1e}, dv {:.1e}; {})",
                    e[2],
                    e[3],
                    e[4],
                    if deterministic {
                        "deterministic"
                    } else {
                        "NOT DETERMINISTIC"
                    }
                ),
                e[2].max(e[3])
                    .max(e[4])
                    .max(if deterministic { 0.0 } else { 1.0 })
                    .max(nonfinite(ok)),
                ms_b,
            ));
        }
    }
    Ok(rows)
}
