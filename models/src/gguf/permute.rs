//! llama.cpp's Q/K row permutation, both ways.
//!
//! Hugging Face Llama applies RoPE to the two halves of each head (`rotate_half`); ggml's
//! default RoPE rotates adjacent pairs. llama.cpp's converter therefore reorders the rows of
//! q_proj (with `n_head`) and k_proj (with `n_head_kv`):
//! `w.reshape(n_head, 2, head_dim / 2, cols).swapaxes(1, 2).reshape(rows, cols)`,
//! i.e. GGUF row `h * head_dim + 2 * i + a` holds Hugging Face row `h * head_dim + a * head_dim / 2 + i`.
//! [`unpermute_rows`] restores Hugging Face's order (reading a GGUF file); [`permute_rows`]
//! applies llama.cpp's (writing one).

/// Restores Hugging Face row order of a `[rows, cols]` row-major matrix (or a bias, `cols = 1`)
/// that llama.cpp permuted with `n_head` heads. Errors if `rows` is not `n_head` heads of an
/// even width or the data is not `rows * cols` long.
pub fn unpermute_rows(
    data: &[f32],
    rows: usize,
    cols: usize,
    n_head: usize,
) -> Result<Vec<f32>, String> {
    reorder_rows(data, rows, cols, n_head, false)
}

/// Puts the rows of a Hugging Face `[rows, cols]` q_proj or k_proj (or its bias) in llama.cpp's
/// order for `n_head` heads: the inverse of [`unpermute_rows`], with the same errors.
pub fn permute_rows(
    data: &[f32],
    rows: usize,
    cols: usize,
    n_head: usize,
) -> Result<Vec<f32>, String> {
    reorder_rows(data, rows, cols, n_head, true)
}

/// Moves GGUF row `h * head_dim + 2 * i + a` to Hugging Face row `h * head_dim + a * head_dim / 2
/// + i` (`to_gguf` false), or back (`to_gguf` true).
fn reorder_rows(
    data: &[f32],
    rows: usize,
    cols: usize,
    n_head: usize,
    to_gguf: bool,
) -> Result<Vec<f32>, String> {
    if n_head == 0 || !rows.is_multiple_of(n_head) || !(rows / n_head).is_multiple_of(2) {
        return Err(format!(
            "{rows} rows do not split into {n_head} heads of even width"
        ));
    }
    if data.len() != rows * cols {
        return Err(format!(
            "{} values are not {rows} rows of {cols}",
            data.len()
        ));
    }
    let head_dim = rows / n_head;
    let half = head_dim / 2;
    let mut out = vec![0f32; data.len()];
    for h in 0..n_head {
        for a in 0..2 {
            for i in 0..half {
                let gguf = (h * head_dim + 2 * i + a) * cols;
                let hf = (h * head_dim + a * half + i) * cols;
                let (src, dst) = if to_gguf { (hf, gguf) } else { (gguf, hf) };
                out[dst..dst + cols].copy_from_slice(&data[src..src + cols]);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::rng::SplitMix64;

    /// llama.cpp's permutation written as its converter states it (reshape, swap axes 1 and
    /// 2, reshape), on fresh random data: `permute_rows` must equal it, and `unpermute_rows`
    /// must undo it.
    #[test]
    fn permute_matches_the_converter_and_unpermute_inverts_it() {
        let seed = ftrt_runtime::rng::fresh_seed();
        let mut rng = SplitMix64::new(seed);
        for (n_head, head_dim, cols) in [(4, 8, 3), (3, 64, 5), (2, 2, 1)] {
            let rows = n_head * head_dim;
            let data: Vec<f32> = (0..rows * cols).map(|_| rng.next_f32()).collect();
            // w.reshape(n_head, 2, head_dim / 2, cols).swapaxes(1, 2): element (h, i, a, c)
            // of the result is (h, a, i, c) of the source.
            let half = head_dim / 2;
            let mut want = Vec::with_capacity(data.len());
            for h in 0..n_head {
                for i in 0..half {
                    for a in 0..2 {
                        let src = ((h * 2 + a) * half + i) * cols;
                        want.extend_from_slice(&data[src..src + cols]);
                    }
                }
            }
            let got = permute_rows(&data, rows, cols, n_head).unwrap();
            assert_eq!(got, want, "n_head {n_head} head_dim {head_dim} seed {seed}");
            assert_eq!(unpermute_rows(&got, rows, cols, n_head).unwrap(), data);
        }
        assert!(permute_rows(&[0.0; 6], 6, 1, 4).is_err());
    }
}
