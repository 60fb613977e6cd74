//! Dequantization of ggml tensor data to f32, one file per format family.
//!
//! Every format stores consecutive blocks along the innermost dimension; dequantizing a tensor
//! is dequantizing its blocks in order. Scales stored as f16 are widened to f32 first and all
//! arithmetic is f32, as in ggml's reference `dequantize_row_*` functions.

mod float;
mod q4_k;
mod q4_legacy;
mod q6_k;
mod q8_0;

use super::types::GgmlType;

/// Types that [`dequantize`] accepts.
pub const SUPPORTED: [GgmlType; 8] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q8_0,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q4_K,
    GgmlType::Q6_K,
];

/// Dequantizes `bytes`, whole blocks of `ty`, to f32 in storage order.
/// Errors (as a reason string) for types outside [`SUPPORTED`] or a partial block.
pub fn dequantize(ty: GgmlType, bytes: &[u8]) -> Result<Vec<f32>, String> {
    if !bytes.len().is_multiple_of(ty.type_size()) {
        return Err(format!(
            "{} bytes is not a whole number of {ty} blocks of {} bytes",
            bytes.len(),
            ty.type_size()
        ));
    }
    let mut out = Vec::with_capacity(bytes.len() / ty.type_size() * ty.block_size());
    let blocks = bytes.chunks_exact(ty.type_size());
    match ty {
        GgmlType::F32 => float::f32_le(bytes, &mut out),
        GgmlType::F16 => float::f16_le(bytes, &mut out),
        GgmlType::BF16 => float::bf16_le(bytes, &mut out),
        GgmlType::Q8_0 => blocks.for_each(|b| q8_0::block(b, &mut out)),
        GgmlType::Q4_0 => blocks.for_each(|b| q4_legacy::block_q4_0(b, &mut out)),
        GgmlType::Q4_1 => blocks.for_each(|b| q4_legacy::block_q4_1(b, &mut out)),
        GgmlType::Q4_K => blocks.for_each(|b| q4_k::block(b, &mut out)),
        GgmlType::Q6_K => blocks.for_each(|b| q6_k::block(b, &mut out)),
        other => {
            let names: Vec<String> = SUPPORTED.iter().map(ToString::to_string).collect();
            return Err(format!(
                "tensor type {other} (id {}) cannot be dequantized; supported: {}",
                other.id(),
                names.join(", ")
            ));
        }
    }
    Ok(out)
}

/// The little-endian f16 at `bytes[at..at + 2]`, widened to f32.
fn f16_at(bytes: &[u8], at: usize) -> f32 {
    half::f16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f32()
}
