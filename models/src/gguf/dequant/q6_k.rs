//! Q6_K: super-blocks of 256 weights in 210 bytes, as 16 sub-blocks of 16.
//!
//! | bytes    | field                                   |
//! |----------|-----------------------------------------|
//! | 0..128   | `ql`: low 4 bits of each weight         |
//! | 128..192 | `qh`: high 2 bits of each weight        |
//! | 192..208 | `scales`: 16 × i8 sub-block scales      |
//! | 208..210 | `d`: f16 super-scale                    |
//!
//! The block is two halves of 128 weights; half `h` uses `ql[64h..64h + 64]`,
//! `qh[32h..32h + 32]` and `scales[8h..8h + 8]`. With
//! `q(low, s) = (low | (((qh[l] >> s) & 3) << 4)) - 32`, for `l` in 0..32 and `is = l / 16`:
//! - `y[l]      = d * scales[is]     * q(ql[l] & 0xF, 0)`
//! - `y[l + 32] = d * scales[is + 2] * q(ql[l + 32] & 0xF, 2)`
//! - `y[l + 64] = d * scales[is + 4] * q(ql[l] >> 4, 4)`
//! - `y[l + 96] = d * scales[is + 6] * q(ql[l + 32] >> 4, 6)`

use super::f16_at;

/// Dequantizes one 210-byte block into 256 values.
pub(super) fn block(b: &[u8], out: &mut Vec<f32>) {
    let d = f16_at(b, 208);
    for h in 0..2 {
        let ql = &b[64 * h..64 * h + 64];
        let qh = &b[128 + 32 * h..128 + 32 * h + 32];
        let sc = &b[192 + 8 * h..192 + 8 * h + 8];
        let mut y = [0f32; 128];
        for l in 0..32 {
            let is = l / 16;
            let q =
                |low: u8, shift: u8| f32::from(((low | (((qh[l] >> shift) & 3) << 4)) as i8) - 32);
            let s = |k: usize| d * f32::from(sc[is + k] as i8);
            y[l] = s(0) * q(ql[l] & 0xF, 0);
            y[l + 32] = s(2) * q(ql[l + 32] & 0xF, 2);
            y[l + 64] = s(4) * q(ql[l] >> 4, 4);
            y[l + 96] = s(6) * q(ql[l + 32] >> 4, 6);
        }
        out.extend_from_slice(&y);
    }
}
