//! Q8_0: blocks of 32 weights in 34 bytes.
//!
//! | bytes  | field                  |
//! |--------|------------------------|
//! | 0..2   | `d`: f16 scale         |
//! | 2..34  | `qs`: 32 × i8 values   |
//!
//! `y[i] = d * qs[i]`.

use super::f16_at;

/// Dequantizes one 34-byte block into 32 values.
pub(super) fn block(b: &[u8], out: &mut Vec<f32>) {
    let d = f16_at(b, 0);
    out.extend(b[2..34].iter().map(|&q| d * f32::from(q as i8)));
}
