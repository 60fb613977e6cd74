//! Cross-entropy over vocabulary chunks: the full (tokens x vocabulary) logits are never held.
//!
//! For each chunk of logits (R, V) covering vocabulary ids v0..v0+V (a GEMM's output), the
//! forward folds the chunk's logsumexp into the running `lse` (start: -inf) and adds the target's
//! logit to `picked` (start: 0); after the last chunk the loss of token r is lse - picked.
//! The backward, given the final lse, writes dlogits over the chunk (it may alias the logits).
//! Targets equal to -100 (ignore index) match no vocabulary id and get zero gradient when the
//! caller passes dlse = dpicked = 0 for them; the mean over counted tokens is the caller's scale.
use crate::kernels::CROSS_ENTROPY as KERNELS;
use ftrt_macros::op;
use ftrt_runtime::{DevPtr, Gpu, RuntimeError};
use half::bf16;
use std::ffi::c_void;

op! {
    /// z = T(T(tanh(T(logits / cap))) * cap) when cap > 0 (Gemma 2's logit softcap, in the
    /// logits' dtype as Gemma2ForCausalLM computes it), else z = logits.
    /// lse[r] = logaddexp(lse[r], logsumexp(z[r, :])),  picked[r] += z[r, target[r] - v0].
    /// Backward: dz = dlse * exp(z - lse) + dpicked * [c + v0 == target];  dlogits = dz without
    /// a cap, else T(T(T(dz) * cap) * (1 - y^2)) / cap with y = T(tanh(T(logits / cap))):
    /// autograd's roundings through the softcap's three ops. Both divisions are multiplies by
    /// 1 / cap (IEEE divisions per element made the backward spill registers on sm_80/sm_90;
    /// forward and backward must compute the same z).
    cross_entropy(logits: [R, V] T, target: [R] i32, v0: i32, cap: f32, mut lse: [R] f32, mut picked: [R] f32) {
        forward for r in R, c in V {
            let z = select(cap > 0.0, T(T(tanh(T(logits[r, c] * (1.0 / cap)))) * cap), logits[r, c]);
            let chunk_lse = logsumexp(c, z);
            // The target's logit is read once per row, when it lies in this chunk.
            let t = target[r] - v0;
            let xt = select(t >= 0 && t < V, logits[r, t], 0.0);
            let zt = select(cap > 0.0, T(T(tanh(T(xt * (1.0 / cap)))) * cap), xt);
            lse[r] = logaddexp(lse[r], chunk_lse);
            picked[r] = picked[r] + select(t >= 0 && t < V, zt, 0.0);
        }
        backward (dlse, dpicked) -> (dlogits) for r in R, c in V {
            let y = T(tanh(T(logits[r, c] * (1.0 / cap))));
            let z = select(cap > 0.0, T(y * cap), logits[r, c]);
            let dz = dlse[r] * exp(z - lse[r]) + select(c + v0 == target[r], dpicked[r], 0.0);
            dlogits[r, c] = select(cap > 0.0, T(T(T(dz) * cap) * (1.0 - y * y)) * (1.0 / cap), dz);
        }
        check { target in -2..V, v0 = 0, cap in [0.0, 3.0], lse = -inf, picked = 0.0 }
    }
}

op! {
    /// Per-token loss from the merged chunks: lse - picked, 0 for ignored targets (-100).
    cross_entropy_loss(lse: [R] f32, picked: [R] f32, target: [R] i32) -> (loss: [R] f32) {
        forward for r in R {
            loss[r] = select(target[r] == -100, 0.0, lse[r] - picked[r]);
        }
    }
}

/// Threads a block of `ops/kernels/cross_entropy_sm90.cu` (its `CE_THREADS`).
const FUSED_THREADS: u32 = 256;
/// The most blocks a row's cluster takes (the portable cluster size).
const FUSED_MAX_BLOCKS: usize = 8;

/// Columns a block holds in shared memory (the kernel's instantiations, 16,384 and 32,768) and
/// blocks a row of [`forward_backward`] over `v` vocabulary columns: the smaller slice that
/// covers a row in at most 8 blocks. None when `v` is not a positive multiple of 8 or past
/// 8 x 32,768 = 262,144.
pub fn fused_shape(v: usize) -> Option<(usize, usize)> {
    if v == 0 || !v.is_multiple_of(8) {
        return None;
    }
    [16384, 32768].into_iter().find_map(|slice| {
        let blocks = v.div_ceil(slice);
        (blocks <= FUSED_MAX_BLOCKS).then_some((slice, blocks))
    })
}

/// Whether [`forward_backward`] runs on `gpu` for `v` vocabulary columns: a Hopper GPU
/// (compute capability 9.0, thread-block clusters) and a [`fused_shape`].
pub fn fused_supported(gpu: &Gpu, v: usize) -> bool {
    fused_shape_on(gpu, v).is_some()
}

/// [`fused_shape`] on a Hopper GPU (compute capability 9.0: thread-block clusters), else None.
fn fused_shape_on(gpu: &Gpu, v: usize) -> Option<(usize, usize)> {
    fused_shape(v).filter(|_| gpu.info().compute_capability == (9, 0))
}

/// [`cross_entropy`]'s forward and backward over logits (R, V) bf16 that span the whole
/// vocabulary (v0 = 0), without a softcap, in one pass (`ops/kernels/cross_entropy_sm90.cu`):
/// lse[r] and picked[r] are written as the forward leaves them from lse = -inf and picked = 0,
/// and dlogits = dlse exp(z - lse) + [c == target] dpicked replaces the logits in place. Each
/// row is read once (into shared memory) and written once (the two kernels read it twice). Needs
/// [`fused_supported`]; logits 16-byte aligned.
#[allow(clippy::too_many_arguments)]
pub fn forward_backward(
    gpu: &Gpu,
    rows: usize,
    v: usize,
    logits: DevPtr<bf16>,
    target: DevPtr<i32>,
    dlse: DevPtr<f32>,
    dpicked: DevPtr<f32>,
    lse: DevPtr<f32>,
    picked: DevPtr<f32>,
) -> Result<(), RuntimeError> {
    let Some((slice, blocks)) = fused_shape_on(gpu, v) else {
        return Err(RuntimeError::InvalidArgument(format!(
            "fused cross-entropy: needs a Hopper GPU (compute capability 9.0, found {:?}) and a \
             vocabulary that is a multiple of 8 up to 262,144 (found {v})",
            gpu.info().compute_capability
        )));
    };
    if !logits.addr.is_multiple_of(16) {
        return Err(RuntimeError::InvalidArgument(format!(
            "fused cross-entropy: logits must be 16-byte aligned ({:#x})",
            logits.addr
        )));
    }
    let grid = rows * blocks;
    if grid == 0 {
        return Ok(());
    }
    let smem = (2 * slice) as u32;
    let f = gpu.function_with_smem(
        &crate::kernels::CROSS_ENTROPY_SM90,
        &format!("cross_entropy_fused_s{slice}"),
        smem,
    )?;
    let mut v32 = v as i32;
    let mut ptrs = [
        logits.addr,
        target.addr,
        dlse.addr,
        dpicked.addr,
        lse.addr,
        picked.addr,
    ];
    let mut args: Vec<*mut c_void> = vec![(&mut v32 as *mut i32).cast()];
    args.extend(ptrs.iter_mut().map(|p| (p as *mut u64).cast::<c_void>()));
    let dims = (
        u32::try_from(grid).map_err(|_| {
            RuntimeError::InvalidArgument(format!("fused cross-entropy: {rows} rows is too many"))
        })?,
        FUSED_THREADS,
        blocks as u32,
    );
    // SAFETY: args match cross_entropy_fused_s{16384,32768}(int V, bf16* logits, const int* target,
    // const float* dlse, const float* dpicked, float* lse, float* picked), each pointing at a
    // local that outlives the launch call; the tensors hold R x V and R elements.
    unsafe { gpu.launch_clustered(&f, dims, smem, &mut args) }
}

#[cfg(test)]
mod tests;
