//! Unquantized types: F32 (4 bytes), F16 (2 bytes, IEEE half), BF16 (2 bytes, the top half of
//! an f32), each little-endian, one element per "block".

use half::{bf16, f16};

/// F32: copies the values.
pub(super) fn f32_le(bytes: &[u8], out: &mut Vec<f32>) {
    out.extend(
        bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
    );
}

/// F16: widens each half exactly.
pub(super) fn f16_le(bytes: &[u8], out: &mut Vec<f32>) {
    out.extend(
        bytes
            .chunks_exact(2)
            .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32()),
    );
}

/// BF16: widens each value exactly.
pub(super) fn bf16_le(bytes: &[u8], out: &mut Vec<f32>) {
    out.extend(
        bytes
            .chunks_exact(2)
            .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32()),
    );
}
