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

#[cfg(test)]
mod tests;
