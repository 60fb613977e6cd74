//! Token embedding: a gather of rows, and its backward as a deterministic scatter-add.
use crate::kernels::EMBEDDING as KERNELS;
use ftrt_macros::op;

op! {
    /// y[n, :] = w[ids[n], :]  (ids (N) i32 in [0, V), w (V, C)).
    /// Backward: dw[v, :] = sum of dy[n, :] over tokens n with ids[n] == v, summed in token
    /// order by one thread per element of dw, so every run gives the same bits (no atomics).
    /// Cost O(V * N * C) comparisons: meant for checks and small vocabularies; LoRA never
    /// trains the embedding.
    embedding(ids: [N] i32, w: [V, C] T) -> (y: [N, C] T) {
        forward for n in N, c in C {
            y[n, c] = w[ids[n], c];
        }
        backward (dy) -> (dw) for v in V, c in C {
            dw[v, c] = sum(k in 0..N, select(ids[k] == v, dy[k, c], 0.0));
        }
        check { ids in 0..V }
    }
}

#[cfg(test)]
mod tests;
