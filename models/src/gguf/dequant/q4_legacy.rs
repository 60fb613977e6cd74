//! Q4_0 and Q4_1: blocks of 32 weights, 4 bits each, two per byte.
//!
//! Byte `j` of `qs` holds weight `j` in its low nibble and weight `j + 16` in its high nibble.
//!
//! Q4_0, 18 bytes:
//!
//! | bytes  | field                |
//! |--------|----------------------|
//! | 0..2   | `d`: f16 scale       |
//! | 2..18  | `qs`: 16 bytes       |
//!
//! `y[j] = d * ((qs[j] & 0xF) - 8)`, `y[j + 16] = d * ((qs[j] >> 4) - 8)`.
//!
//! Q4_1, 20 bytes:
//!
//! | bytes  | field                |
//! |--------|----------------------|
//! | 0..2   | `d`: f16 scale       |
//! | 2..4   | `m`: f16 minimum     |
//! | 4..20  | `qs`: 16 bytes       |
//!
//! `y[j] = d * (qs[j] & 0xF) + m`, `y[j + 16] = d * (qs[j] >> 4) + m`.

use super::f16_at;

/// Dequantizes one 18-byte Q4_0 block into 32 values.
pub(super) fn block_q4_0(b: &[u8], out: &mut Vec<f32>) {
    let d = f16_at(b, 0);
    let qs = &b[2..18];
    out.extend(qs.iter().map(|&q| d * (f32::from(q & 0xF) - 8.0)));
    out.extend(qs.iter().map(|&q| d * (f32::from(q >> 4) - 8.0)));
}

/// Dequantizes one 20-byte Q4_1 block into 32 values.
pub(super) fn block_q4_1(b: &[u8], out: &mut Vec<f32>) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    let qs = &b[4..20];
    out.extend(qs.iter().map(|&q| d * f32::from(q & 0xF) + m));
    out.extend(qs.iter().map(|&q| d * f32::from(q >> 4) + m));
}
