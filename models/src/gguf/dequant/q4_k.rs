//! Q4_K: super-blocks of 256 weights in 144 bytes, as 8 sub-blocks of 32.
//!
//! | bytes    | field                                             |
//! |----------|---------------------------------------------------|
//! | 0..2     | `d`: f16 super-scale of the sub-block scales      |
//! | 2..4     | `dmin`: f16 super-scale of the sub-block mins     |
//! | 4..16    | `scales`: 8 × (6-bit scale, 6-bit min), packed    |
//! | 16..144  | `qs`: 256 × 4 bits                                |
//!
//! Sub-block `j` has scale `sc_j` and min `m_j` (6 bits each): for `j < 4`,
//! `sc_j = scales[j] & 63`, `m_j = scales[j + 4] & 63`; for `j >= 4`,
//! `sc_j = (scales[j + 4] & 0xF) | ((scales[j - 4] >> 6) << 4)` and
//! `m_j = (scales[j + 4] >> 4) | ((scales[j] >> 6) << 4)`.
//!
//! The 128 bytes of `qs` form 4 chunks of 32 bytes; chunk `c` holds sub-block `2c` in its low
//! nibbles and sub-block `2c + 1` in its high nibbles. Weight `l` of sub-block `j` is
//! `y = d * sc_j * q - dmin * m_j`.

use super::f16_at;

/// Scale and min of sub-block `j` (0..8) from the 12 packed scale bytes.
fn scale_min(j: usize, scales: &[u8]) -> (u8, u8) {
    if j < 4 {
        (scales[j] & 63, scales[j + 4] & 63)
    } else {
        (
            (scales[j + 4] & 0xF) | ((scales[j - 4] >> 6) << 4),
            (scales[j + 4] >> 4) | ((scales[j] >> 6) << 4),
        )
    }
}

/// Dequantizes one 144-byte block into 256 values.
pub(super) fn block(b: &[u8], out: &mut Vec<f32>) {
    let d = f16_at(b, 0);
    let dmin = f16_at(b, 2);
    let scales = &b[4..16];
    for (c, qs) in b[16..144].chunks_exact(32).enumerate() {
        let (sc_lo, m_lo) = scale_min(2 * c, scales);
        let (sc_hi, m_hi) = scale_min(2 * c + 1, scales);
        let (d_lo, min_lo) = (d * f32::from(sc_lo), dmin * f32::from(m_lo));
        let (d_hi, min_hi) = (d * f32::from(sc_hi), dmin * f32::from(m_hi));
        out.extend(qs.iter().map(|&q| d_lo * f32::from(q & 0xF) - min_lo));
        out.extend(qs.iter().map(|&q| d_hi * f32::from(q >> 4) - min_hi));
    }
}
