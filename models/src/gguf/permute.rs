//! Undoing llama.cpp's Q/K row permutation.
//!
//! Hugging Face Llama applies RoPE to the two halves of each head (`rotate_half`); ggml's
//! default RoPE rotates adjacent pairs. llama.cpp's converter therefore reorders the rows of
//! q_proj (with `n_head`) and k_proj (with `n_head_kv`):
//! `w.reshape(n_head, 2, head_dim / 2, cols).swapaxes(1, 2).reshape(rows, cols)`,
//! i.e. GGUF row `h * head_dim + 2 * i + a` holds Hugging Face row `h * head_dim + a * head_dim / 2 + i`.
//! [`unpermute_rows`] applies the inverse.

/// Restores Hugging Face row order of a `[rows, cols]` row-major matrix (or a bias, `cols = 1`)
/// that llama.cpp permuted with `n_head` heads. Errors if `rows` is not `n_head` heads of an
/// even width or the data is not `rows * cols` long.
pub fn unpermute_rows(
    data: &[f32],
    rows: usize,
    cols: usize,
    n_head: usize,
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
                let src = (h * head_dim + 2 * i + a) * cols;
                let dst = (h * head_dim + a * half + i) * cols;
                out[dst..dst + cols].copy_from_slice(&data[src..src + cols]);
            }
        }
    }
    Ok(out)
}
