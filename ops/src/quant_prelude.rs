//! bitsandbytes-compatible quantization primitives: the CPU reference.
//!
//! Mirrors `ops/kernels/quant_prelude.cuh` function for function. Both follow the arithmetic of
//! bitsandbytes' CUDA kernels (`kQuantizeBlockwise`, `dQuantizeNF4`, `dQuantize<0>`,
//! `kDequantizeBlockwise`), which are built with `--use_fast_math`: subnormal inputs and results of
//! multiplies are flushed to zero (`ftz`), emulated here by [`mul_ftz`]. The full algorithm, the
//! places where the bitsandbytes CPU path differs, and the one step that is not reproducible
//! bit for bit (the `offset = absmax.mean()` reduction order, and `rcp.approx` vs a correctly
//! rounded reciprocal) are written down in `ops/fixtures/BNB_NOTES.md`.
//!
//! Depends on std only (tests also use `safetensors`).

/// NF4 code book (`bnb.functional.get_4bit_type("nf4")`), as f32 bit patterns.
const NF4_CODE_BITS: [u32; 16] = [
    0xbf80_0000, // -1.0
    0xbf32_39b1, // -0.6961928009986877
    0xbf06_6b30, // -0.5250730514526367
    0xbeca_32a0, // -0.39491748809814453
    0xbe91_a24d, // -0.28444138169288635
    0xbe3d_353f, // -0.18477343022823334
    0xbdba_7871, // -0.09105003625154495
    0x0000_0000, //  0.0
    0x3da2_faff, //  0.07958029955625534
    0x3e24_cae3, //  0.16093020141124725
    0x3e7c_04dd, //  0.24611230194568634
    0x3ead_033a, //  0.33791524171829224
    0x3ee1_a4b8, //  0.44070982933044434
    0x3f10_07ab, //  0.5626170039176941
    0x3f39_13b3, //  0.7229568362236023
    0x3f80_0000, //  1.0
];

/// The 15 thresholds of bitsandbytes' `dQuantizeNF4` decision tree, as the f32 values the CUDA
/// float literals round to. Each equals `(code[k] + code[k+1]) * 0.5f` computed in f32.
const NF4_THRESHOLD_BITS: [u32; 15] = [
    0xbf59_1cd8, // -0.8480964004993439f
    0xbf1c_5270, // -0.6106329262256622f
    0xbeeb_8480, // -0.4599952697753906f
    0xbead_ea76, // -0.33967943489551544f
    0xbe70_3cec, // -0.23460740596055984f
    0xbe0d_38bc, // -0.13791173323988914f
    0xbd3a_7871, // -0.045525018125772476f
    0x3d22_faff, //  0.03979014977812767f
    0x3df6_4862, //  0.1202552504837513f
    0x3e50_67e0, //  0.2035212516784668f
    0x3e95_82d4, //  0.2920137718319893f
    0x3ec7_53f9, //  0.3893125355243683f
    0x3f00_6d04, //  0.5016634166240692f
    0x3f24_8daf, //  0.6427869200706482f
    0x3f5c_89da, //  0.8614784181118011f
];

/// The 15 thresholds as f32 values.
pub const NF4_THRESHOLDS: [f32; 15] = {
    let mut t = [0.0f32; 15];
    let mut i = 0;
    while i < 15 {
        t[i] = f32::from_bits(NF4_THRESHOLD_BITS[i]);
        i += 1;
    }
    t
};

/// The NF4 code book, index 0..15 (index = the 4-bit value stored in a nibble).
pub fn nf4_code() -> [f32; 16] {
    let mut c = [0.0f32; 16];
    for (o, b) in c.iter_mut().zip(NF4_CODE_BITS.iter()) {
        *o = f32::from_bits(*b);
    }
    c
}

/// NF4 4-bit index of `x` (already multiplied by the reciprocal of the block absmax), exactly
/// bitsandbytes' `dQuantizeNF4`: a binary decision tree of strict `>` comparisons, so a value equal
/// to a threshold goes to the lower index. NaN compares false everywhere and gives 0.
pub fn nf4_index(x: f32) -> u8 {
    let t = &NF4_THRESHOLDS;
    if x > t[7] {
        if x > t[11] {
            if x > t[13] {
                if x > t[14] {
                    0b1111
                } else {
                    0b1110
                }
            } else if x > t[12] {
                0b1101
            } else {
                0b1100
            }
        } else if x > t[9] {
            if x > t[10] {
                0b1011
            } else {
                0b1010
            }
        } else if x > t[8] {
            0b1001
        } else {
            0b1000
        }
    } else if x > t[3] {
        if x > t[5] {
            if x > t[6] {
                0b0111
            } else {
                0b0110
            }
        } else if x > t[4] {
            0b0101
        } else {
            0b0100
        }
    } else if x > t[1] {
        if x > t[2] {
            0b0011
        } else {
            0b0010
        }
    } else if x > t[0] {
        0b0001
    } else {
        0b0000
    }
}

/// Smallest positive normal f32 (2^-126).
const F32_MIN_NORMAL: f32 = 1.175_494_4e-38;

/// Flush a subnormal to a zero of the same sign (what `.ftz` instructions do).
#[inline]
pub fn ftz(x: f32) -> f32 {
    if x != 0.0 && x.abs() < F32_MIN_NORMAL {
        0.0f32.copysign(x)
    } else {
        x
    }
}

/// `mul.ftz.f32`: subnormal inputs and a subnormal result are flushed to signed zero.
#[inline]
pub fn mul_ftz(a: f32, b: f32) -> f32 {
    ftz(ftz(a) * ftz(b))
}

/// The reciprocal of a block absmax, `1.0f / absmax` in bitsandbytes' kernels. The CUDA build
/// (`--use_fast_math`) emits `rcp.approx.ftz.f32` for it; this reference uses the correctly
/// rounded reciprocal with ftz on input and output. Exact for powers of two, 0 (-> +inf) and
/// inf; the two may differ by 1 ulp elsewhere (see BNB_NOTES.md, "reciprocal").
#[inline]
pub fn bnb_recip(a: f32) -> f32 {
    ftz(1.0f32 / ftz(a))
}

/// `f32::mul_add`-based f32 `torch.linspace(start, end, steps)` as PyTorch's vectorized (AVX2 /
/// AVX-512) CPU kernel computes it: `fma(step, i, start)` for the first half,
/// `fma(-step, steps-1-i, end)` for the rest, `step = (end - start) / (steps - 1)`.
fn torch_linspace_f32(start: f32, end: f32, steps: usize) -> Vec<f32> {
    if steps == 1 {
        return vec![start];
    }
    let step = (end - start) / (steps - 1) as f32;
    let half = steps / 2;
    (0..steps)
        .map(|i| {
            if i < half {
                step.mul_add(i as f32, start)
            } else {
                (-step).mul_add((steps - 1 - i) as f32, end)
            }
        })
        .collect()
}

/// `bnb.functional.create_dynamic_map(signed, max_exponent_bits=7, total_bits=8)`, bit for bit.
fn create_dynamic_map(signed: bool) -> [f32; 256] {
    const MAX_EXP_BITS: i32 = 7;
    const NON_SIGN_BITS: i32 = 7;
    // Python: 10 ** (-(max_exponent_bits - 1) + i), a double, cast to f32 by torch's scalar mul.
    const POW10: [f64; 7] = [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0];
    let mut data: Vec<f32> = Vec::with_capacity(256);
    for i in 0..MAX_EXP_BITS {
        let fraction_items = if signed {
            (1usize << (i + NON_SIGN_BITS - MAX_EXP_BITS)) + 1
        } else {
            (1usize << (i + NON_SIGN_BITS - MAX_EXP_BITS + 1)) + 1
        };
        let b = torch_linspace_f32(0.1f32, 1.0f32, fraction_items);
        let scale = POW10[i as usize] as f32;
        let means: Vec<f32> = b.windows(2).map(|w| (w[0] + w[1]) / 2.0).collect();
        for &m in &means {
            data.push(scale * m);
        }
        if signed {
            for &m in &means {
                data.push(-scale * m);
            }
        }
    }
    // additional_items = 2^(non_sign_bits - max_exponent_bits) - 1 = 0 for the defaults.
    data.push(0.0);
    data.push(1.0);
    assert_eq!(data.len(), 256);
    data.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let mut out = [0.0f32; 256];
    out.copy_from_slice(&data);
    out
}

/// Signed 8-bit dynamic map (`create_dynamic_map(signed=True)`): NF4's nested absmax code and
/// the first-moment code of 8-bit Adam. code[0] = -0.99297, code[127] = 0, code[255] = 1.
pub fn dynamic_map_signed() -> [f32; 256] {
    create_dynamic_map(true)
}

/// Unsigned 8-bit dynamic map (`create_dynamic_map(signed=False)`): second-moment code of 8-bit
/// Adam. code[0] = 0, code[255] = 1.
pub fn dynamic_map_unsigned() -> [f32; 256] {
    create_dynamic_map(false)
}

/// bitsandbytes' `dQuantize<0>` (nearest code by binary search, `code` sorted ascending, 256
/// entries). Seven halving steps from pivot 127 end on an even pivot `p`; then
/// if `x > code[p]`: `x > (code[p+1] + code[p]) * 0.5` ? p+1 : p, else
/// `x < (code[p-1] + code[p]) * 0.5` ? p-1 : p. A tie on a midpoint therefore goes to the even
/// index. NaN gives 0.
pub fn dynamic_index(code: &[f32], x: f32) -> u8 {
    assert!(code.len() >= 256, "dynamic_index needs a 256-entry code");
    let mut pivot: usize = 127;
    let mut upper_pivot: usize = 255;
    let mut lower_pivot: usize = 0;
    let mut lower = -1.0f32;
    let mut upper = 1.0f32;
    let mut val = code[pivot];
    let mut i = 64usize;
    while i > 0 {
        if x > val {
            lower_pivot = pivot;
            lower = val;
            pivot += i;
        } else {
            upper_pivot = pivot;
            upper = val;
            pivot -= i;
        }
        val = code[pivot];
        i >>= 1;
    }
    if upper_pivot == 255 {
        upper = code[upper_pivot];
    }
    if lower_pivot == 0 {
        lower = code[lower_pivot];
    }
    let r = if x > val {
        let midpoint = mul_ftz(ftz(upper + val), 0.5);
        if x > midpoint {
            upper_pivot
        } else {
            pivot
        }
    } else {
        let midpoint = mul_ftz(ftz(lower + val), 0.5);
        if x < midpoint {
            lower_pivot
        } else {
            pivot
        }
    };
    r as u8
}

/// Per-block absmax as `kQuantizeBlockwise` computes it: `fmaxf` over `fabsf` (NaN ignored,
/// subnormals flushed), the last block may be partial.
pub fn block_absmax(x: &[f32], blocksize: usize) -> Vec<f32> {
    x.chunks(blocksize)
        .map(|b| b.iter().fold(0.0f32, |m, &v| m.max(ftz(v.abs()))))
        .collect()
}

/// `quantize_blockwise(A, code, blocksize)` on CUDA (`kQuantizeBlockwise<.., General8bit>`):
/// per block `absmax = max|a|`, `q = dQuantize(code, a * (1/absmax))`. Returns (q, absmax).
pub fn quantize_blockwise_cpu(x: &[f32], code: &[f32], blocksize: usize) -> (Vec<u8>, Vec<f32>) {
    let absmax = block_absmax(x, blocksize);
    let mut q = Vec::with_capacity(x.len());
    for (b, chunk) in x.chunks(blocksize).enumerate() {
        let r = bnb_recip(absmax[b]);
        for &v in chunk {
            q.push(dynamic_index(code, mul_ftz(v, r)));
        }
    }
    (q, absmax)
}

/// `dequantize_blockwise` to f32 (`kDequantizeBlockwise`): `code[q] * absmax[block]`.
pub fn dequantize_blockwise_cpu(
    q: &[u8],
    absmax: &[f32],
    code: &[f32],
    blocksize: usize,
) -> Vec<f32> {
    q.iter()
        .enumerate()
        .map(|(i, &c)| mul_ftz(code[c as usize], absmax[i / blocksize]))
        .collect()
}

/// An NF4 tensor in bitsandbytes' layout (`quantize_4bit(..., compress_statistics=True,
/// quant_type="nf4")`).
#[derive(Clone, Debug, PartialEq)]
pub struct Nf4Quantized {
    /// ceil(N/2) bytes; element 2i in the high nibble, 2i+1 in the low nibble.
    pub packed: Vec<u8>,
    /// ceil(N/blocksize) bytes: the block absmax minus `offset`, quantized with `code2`.
    pub absmax_q: Vec<u8>,
    /// ceil(len(absmax_q)/256) f32: absmax of each 256-block of (absmax - offset).
    pub absmax2: Vec<f32>,
    /// The signed dynamic map (`state2.code`).
    pub code2: [f32; 256],
    /// `absmax.mean()` (f32).
    pub offset: f32,
    /// NF4 block size (64 for bitsandbytes' default).
    pub blocksize: usize,
}

/// Blocksize of the nested (double) quantization of the absmax.
pub const NESTED_BLOCKSIZE: usize = 256;

/// Mean of the block absmax as this reference computes `offset`: exact f64 sum, one rounding
/// to f32 of sum/n. bitsandbytes uses `torch.mean` (f32 tree reduction), which may differ in
/// the last bits; pass bitsandbytes' offset to [`quantize_nf4_cpu_with_offset`] to match it.
pub fn absmax_mean(absmax: &[f32]) -> f32 {
    if absmax.is_empty() {
        return 0.0;
    }
    let s: f64 = absmax.iter().map(|&a| a as f64).sum();
    (s / absmax.len() as f64) as f32
}

/// NF4 nibbles of `x` given the per-block absmax (`kQuantizeBlockwise<.., NF4>`), packed two
/// per byte, high nibble first. An odd tail is padded with a 0.0 input (index 7, or 0 in an
/// all-zero block).
pub fn nf4_pack(x: &[f32], absmax: &[f32], blocksize: usize) -> Vec<u8> {
    assert!(blocksize.is_multiple_of(2));
    let n = x.len();
    let mut packed = vec![0u8; n.div_ceil(2)];
    for (j, byte) in packed.iter_mut().enumerate() {
        let i0 = 2 * j;
        let r = bnb_recip(absmax[i0 / blocksize]);
        let hi = nf4_index(mul_ftz(x[i0], r));
        let v1 = if i0 + 1 < n { x[i0 + 1] } else { 0.0 };
        let lo = nf4_index(mul_ftz(v1, r));
        *byte = (hi << 4) | lo;
    }
    packed
}

/// NF4 quantization with double-quantized absmax, following bitsandbytes'
/// `quantize_4bit(x, blocksize, compress_statistics=True, quant_type="nf4")` on CUDA.
/// `x` holds the N input values as f32 (bf16 inputs widened exactly).
pub fn quantize_nf4_cpu(x: &[f32], blocksize: usize) -> Nf4Quantized {
    quantize_nf4_cpu_with_offset(x, blocksize, None)
}

/// [`quantize_nf4_cpu`] with an optional `offset` override (use bitsandbytes' stored offset to
/// reproduce its absmax quantization bit for bit; `None` computes [`absmax_mean`]).
pub fn quantize_nf4_cpu_with_offset(
    x: &[f32],
    blocksize: usize,
    offset: Option<f32>,
) -> Nf4Quantized {
    let absmax = block_absmax(x, blocksize);
    let packed = nf4_pack(x, &absmax, blocksize);
    let offset = offset.unwrap_or_else(|| absmax_mean(&absmax));
    // torch: `_absmax - offset` (f32, IEEE).
    let centered: Vec<f32> = absmax.iter().map(|&a| a - offset).collect();
    let code2 = dynamic_map_signed();
    let (absmax_q, absmax2) = quantize_blockwise_cpu(&centered, &code2, NESTED_BLOCKSIZE);
    Nf4Quantized {
        packed,
        absmax_q,
        absmax2,
        code2,
        offset,
        blocksize,
    }
}

/// The per-block absmax as dequantization sees it: `code2[absmax_q] * absmax2 + offset` (f32).
pub fn dequantize_nf4_absmax(q: &Nf4Quantized) -> Vec<f32> {
    dequantize_blockwise_cpu(&q.absmax_q, &q.absmax2, &q.code2, NESTED_BLOCKSIZE)
        .into_iter()
        .map(|a| a + q.offset)
        .collect()
}

/// `dequantize_4bit` (NF4): `nf4_code[nibble] * absmax[block]` in f32, for the first `n`
/// elements. bitsandbytes then stores this product in the output dtype (bf16: round to nearest
/// even, [`f32_to_bf16_bits`]).
pub fn dequantize_nf4_cpu(q: &Nf4Quantized, n: usize) -> Vec<f32> {
    let absmax = dequantize_nf4_absmax(q);
    dequantize_nf4_with_absmax(&q.packed, &absmax, q.blocksize, n)
}

/// NF4 dequantization given an f32 absmax per block (no nested quantization).
pub fn dequantize_nf4_with_absmax(
    packed: &[u8],
    absmax: &[f32],
    blocksize: usize,
    n: usize,
) -> Vec<f32> {
    let code = nf4_code();
    (0..n)
        .map(|i| {
            let byte = packed[i / 2];
            let nib = if i % 2 == 0 { byte >> 4 } else { byte & 0x0f };
            mul_ftz(code[nib as usize], absmax[i / blocksize])
        })
        .collect()
}

/// f32 -> bf16 bits, round to nearest even (`__float2bfloat16`, torch's `.to(bfloat16)`).
pub fn f32_to_bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return ((b >> 16) | 0x0040) as u16;
    }
    let rounding = 0x7fff + ((b >> 16) & 1);
    ((b.wrapping_add(rounding)) >> 16) as u16
}

/// bf16 bits -> f32 (exact).
pub fn bf16_bits_to_f32(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::{Dtype, SafeTensors};
    use std::collections::HashMap;

    const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures");

    fn load(name: &str) -> Option<Vec<u8>> {
        std::fs::read(format!("{FIXTURES}/{name}")).ok()
    }

    fn meta(bytes: &[u8]) -> HashMap<String, String> {
        let (_, m) = SafeTensors::read_metadata(bytes).unwrap();
        m.metadata().clone().unwrap_or_default()
    }

    fn f32s(st: &SafeTensors, name: &str) -> Vec<f32> {
        let t = st
            .tensor(name)
            .unwrap_or_else(|_| panic!("missing tensor {name}"));
        match t.dtype() {
            Dtype::F32 => t
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Dtype::BF16 => t
                .data()
                .chunks_exact(2)
                .map(|c| bf16_bits_to_f32(u16::from_le_bytes([c[0], c[1]])))
                .collect(),
            d => panic!("{name}: unexpected dtype {d:?}"),
        }
    }

    fn u8s(st: &SafeTensors, name: &str) -> Vec<u8> {
        let t = st.tensor(name).unwrap();
        assert_eq!(t.dtype(), Dtype::U8, "{name}");
        t.data().to_vec()
    }

    /// bitsandbytes' CPU `quantize_blockwise` rounds y to a grid of 65536 points over [-1, 1]
    /// (spacing 2/65535) and takes the code nearest to the grid point. A different index from
    /// ours is explained when the bnb code is no farther from y than ours plus one grid spacing.
    fn lut_explains(code: &[f32], y: f32, ours: u8, theirs: u8) -> bool {
        let d_ours = (code[ours as usize] as f64 - y as f64).abs();
        let d_theirs = (code[theirs as usize] as f64 - y as f64).abs();
        d_theirs <= d_ours + 1.5 * 2.0 / 65535.0
    }

    fn fixture_files(prefix: &str) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(FIXTURES)
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.starts_with(prefix) && n.ends_with(".safetensors"))
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    #[test]
    fn nf4_thresholds_are_code_midpoints() {
        let c = nf4_code();
        for k in 0..15 {
            assert_eq!((c[k] + c[k + 1]) * 0.5, NF4_THRESHOLDS[k], "threshold {k}");
        }
    }

    #[test]
    fn nf4_index_hand_cases() {
        let c = nf4_code();
        for (k, &v) in c.iter().enumerate() {
            assert_eq!(nf4_index(v) as usize, k);
        }
        for (k, &t) in NF4_THRESHOLDS.iter().enumerate() {
            // strict '>' : the threshold itself goes down, the next float up goes up
            assert_eq!(nf4_index(t) as usize, k, "at threshold {k}");
            assert_eq!(
                nf4_index(f32::from_bits(t.to_bits().wrapping_add(if t > 0.0 {
                    1
                } else {
                    u32::MAX
                }))) as usize,
                k + 1
            );
        }
        assert_eq!(nf4_index(f32::NAN), 0);
        assert_eq!(nf4_index(-0.0), 7);
        assert_eq!(nf4_index(2.0), 15);
        assert_eq!(nf4_index(-2.0), 0);
    }

    #[test]
    fn dynamic_maps_shape() {
        let s = dynamic_map_signed();
        let u = dynamic_map_unsigned();
        assert_eq!(s[127], 0.0);
        assert_eq!(s[255], 1.0);
        assert_eq!(u[0], 0.0);
        assert_eq!(u[255], 1.0);
        for k in 0..255 {
            assert!(s[k] < s[k + 1] && u[k] < u[k + 1]);
        }
    }

    #[test]
    fn dynamic_index_exact_codes_and_ties() {
        for code in [dynamic_map_signed(), dynamic_map_unsigned()] {
            for k in 0..256 {
                assert_eq!(dynamic_index(&code, code[k]) as usize, k);
            }
            for k in 0..255 {
                let mid = (code[k] + code[k + 1]) * 0.5;
                let want = if mid == code[k] {
                    k
                } else if mid == code[k + 1] {
                    k + 1
                } else if k % 2 == 0 {
                    k
                } else {
                    k + 1
                };
                assert_eq!(dynamic_index(&code, mid) as usize, want, "tie at {k}");
            }
            assert_eq!(dynamic_index(&code, 5.0), 255);
            assert_eq!(dynamic_index(&code, -5.0), 0);
            assert_eq!(dynamic_index(&code, f32::NAN), 0);
        }
    }

    #[test]
    fn nf4_zero_block_matches_cuda() {
        // absmax 0 -> 1/0 = inf -> 0*inf = NaN -> index 0 (CUDA); dequant gives -1 * 0 = -0.
        let x = vec![0.0f32; 128];
        let q = quantize_nf4_cpu(&x, 64);
        assert!(q.packed.iter().all(|&b| b == 0));
        let d = dequantize_nf4_cpu(&q, 128);
        assert!(d.iter().all(|&v| v == 0.0));
    }

    #[test]
    fn bf16_rounding() {
        assert_eq!(f32_to_bf16_bits(1.0), 0x3f80);
        assert_eq!(f32_to_bf16_bits(f32::from_bits(0x3f80_8000)), 0x3f80); // tie -> even
        assert_eq!(f32_to_bf16_bits(f32::from_bits(0x3f81_8000)), 0x3f82); // tie -> even
        assert_eq!(f32_to_bf16_bits(f32::from_bits(0x3f80_8001)), 0x3f81);
    }

    /// Maps against `bitsandbytes.functional.create_dynamic_map` / `get_4bit_type`.
    #[test]
    fn maps_match_bnb_fixture() {
        let Some(bytes) = load("bnb_maps.safetensors") else {
            eprintln!("skip: fixtures/bnb_maps.safetensors missing");
            return;
        };
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(
            bits(&f32s(&st, "dynamic_signed")),
            bits(&dynamic_map_signed())
        );
        assert_eq!(
            bits(&f32s(&st, "dynamic_unsigned")),
            bits(&dynamic_map_unsigned())
        );
        assert_eq!(bits(&f32s(&st, "nf4_code")), bits(&nf4_code()));
    }

    /// 8-bit dynamic quantization against bitsandbytes' `quantize_blockwise`. CUDA-made
    /// fixtures must match exactly; the CPU path of bitsandbytes uses a 65536-entry lookup table
    /// (`build_quantize_lut`) instead of `dQuantize`, so there each mismatch must be explained by
    /// that table's resolution (|code[ours] - code[bnb]| <= 2 * 2/65535 in normalized units).
    #[test]
    fn dynamic_quant_matches_bnb_fixtures() {
        let files = fixture_files("bnb_dynamic_");
        if files.is_empty() {
            eprintln!("skip: no bnb_dynamic_* fixtures");
        }
        for f in files {
            let bytes = load(&f).unwrap();
            let st = SafeTensors::deserialize(&bytes).unwrap();
            let m = meta(&bytes);
            let cuda = m
                .get("device")
                .map(|d| d.starts_with("cuda"))
                .unwrap_or(false);
            for (sfx, code) in [
                ("signed", dynamic_map_signed()),
                ("unsigned", dynamic_map_unsigned()),
            ] {
                let x = f32s(&st, &format!("x_{sfx}"));
                let bs: usize = m[&format!("blocksize_{sfx}")].parse().unwrap();
                let want_q = u8s(&st, &format!("q_{sfx}"));
                let want_absmax = f32s(&st, &format!("absmax_{sfx}"));
                let (q, absmax) = quantize_blockwise_cpu(&x, &code, bs);
                assert_eq!(
                    absmax.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    want_absmax.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    "{f} {sfx}: absmax"
                );
                let mut mism = 0usize;
                for i in 0..x.len() {
                    if q[i] != want_q[i] {
                        mism += 1;
                        assert!(
                            !cuda,
                            "{f} {sfx}: element {i} x={:e}: ours {} bnb {}",
                            x[i], q[i], want_q[i]
                        );
                        let y = mul_ftz(x[i], bnb_recip(absmax[i / bs]));
                        assert!(
                            lut_explains(&code, y, q[i], want_q[i]),
                            "{f} {sfx}: element {i} y={y:e}: ours {} bnb {}",
                            q[i],
                            want_q[i]
                        );
                    }
                }
                eprintln!(
                    "{f} {sfx}: {} values, {mism} index mismatches (device {:?})",
                    x.len(),
                    m.get("device")
                );
                let want_dq = f32s(&st, &format!("dequant_{sfx}"));
                let dq = dequantize_blockwise_cpu(&want_q, &want_absmax, &code, bs);
                for i in 0..x.len() {
                    assert_eq!(
                        dq[i].to_bits(),
                        want_dq[i].to_bits(),
                        "{f} {sfx}: dequant {i}"
                    );
                }
            }
        }
    }

    /// NF4 against bitsandbytes' `quantize_4bit` / `dequantize_4bit` fixtures.
    #[test]
    fn nf4_matches_bnb_fixtures() {
        let files = fixture_files("bnb_nf4_");
        if files.is_empty() {
            eprintln!("skip: no bnb_nf4_* fixtures");
        }
        for f in files {
            let bytes = load(&f).unwrap();
            let st = SafeTensors::deserialize(&bytes).unwrap();
            let m = meta(&bytes);
            let cuda = m
                .get("device")
                .map(|d| d.starts_with("cuda"))
                .unwrap_or(false);
            let bs: usize = m["blocksize"].parse().unwrap();
            let x = f32s(&st, "x");
            let n = x.len();
            let out_bf16 = st.tensor("dequant").unwrap().dtype() == Dtype::BF16;

            // 1. raw per-block absmax (compress_statistics=False): exact on both paths
            let absmax_raw = f32s(&st, "absmax_raw");
            let absmax = block_absmax(&x, bs);
            assert_eq!(absmax.len(), absmax_raw.len());
            for b in 0..absmax.len() {
                assert_eq!(
                    absmax[b].to_bits(),
                    absmax_raw[b].to_bits(),
                    "{f}: absmax block {b}"
                );
            }

            // 2. packed nibbles
            let packed_bnb = u8s(&st, "packed");
            let packed = nf4_pack(&x, &absmax, bs);
            assert_eq!(packed.len(), packed_bnb.len());
            let nblocks = absmax.len();
            let mut mism = 0usize;
            for j in 0..packed.len() {
                if packed[j] != packed_bnb[j] {
                    let b = (2 * j) / bs;
                    // bitsandbytes' CUDA kernel resolves some values lying exactly on (or one
                    // f32 step from) an NF4 threshold differently from its decision tree as
                    // written; not reproduced yet, so only those values may differ on CUDA files.
                    let on_threshold = [2 * j, 2 * j + 1].iter().any(|&i| {
                        let v = mul_ftz(x.get(i).copied().unwrap_or(0.0), bnb_recip(absmax[b]));
                        NF4_THRESHOLDS
                            .iter()
                            .any(|t| (v.to_bits() as i64 - t.to_bits() as i64).abs() <= 1)
                    });
                    let explained_cuda = cuda && on_threshold;
                    let explained_cpu = !cuda
                        && (absmax[b] == 0.0 // CPU clamps absmax to 1e-38: zeros go to index 7, CUDA gives 0
                            || bnb_recip(absmax[b]) == 0.0 // absmax >= 2^126: CUDA's rcp.approx.ftz flushes 1/absmax to 0
                            || (b == nblocks - 1 && !n.is_multiple_of(bs))); // CPU divides the partial block
                    assert!(
                        explained_cpu || explained_cuda,
                        "{f}: byte {j} (block {b}, absmax {:e}, x = {:e}, {:e}): ours {:#04x} bnb {:#04x}",
                        absmax[b], x[2 * j], x.get(2 * j + 1).copied().unwrap_or(0.0), packed[j], packed_bnb[j]
                    );
                    mism += 1;
                }
            }
            eprintln!("{f}: n={n}, {mism} packed-byte mismatches explained by the bnb CPU path (device {:?})", m.get("device"));

            // 3. offset: ours is the exactly rounded mean, bnb's is torch.mean's
            let offset_bnb = f32s(&st, "offset")[0];
            let offset = absmax_mean(&absmax);
            let tol = 32.0 * f32::EPSILON * offset.abs().max(f32::MIN_POSITIVE); // torch.mean: f32 tree sum
            assert!(
                (offset - offset_bnb).abs() <= tol,
                "{f}: offset {offset} vs bnb {offset_bnb}"
            );

            // 4. nested quantization with bnb's offset
            let q = quantize_nf4_cpu_with_offset(&x, bs, Some(offset_bnb));
            let absmax2_bnb = f32s(&st, "absmax2");
            assert_eq!(
                q.absmax2.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                absmax2_bnb.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "{f}: absmax2"
            );
            let code2_bnb = f32s(&st, "code2");
            assert_eq!(
                code2_bnb.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                q.code2.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            );
            let absmax_q_bnb = u8s(&st, "absmax_q");
            let mut qm = 0usize;
            for b in 0..nblocks {
                if q.absmax_q[b] != absmax_q_bnb[b] {
                    qm += 1;
                    assert!(
                        !cuda,
                        "{f}: absmax_q[{b}] ours {} bnb {}",
                        q.absmax_q[b], absmax_q_bnb[b]
                    );
                    let r = bnb_recip(q.absmax2[b / NESTED_BLOCKSIZE]);
                    if r == 0.0 {
                        continue; // absmax2 >= 2^126: CUDA flushes 1/absmax2 to 0, the CPU path does not
                    }
                    let y = mul_ftz(absmax[b] - offset_bnb, r);
                    assert!(
                        lut_explains(&q.code2, y, q.absmax_q[b], absmax_q_bnb[b]),
                        "{f}: absmax_q[{b}] y={y:e}: ours {} bnb {}",
                        q.absmax_q[b],
                        absmax_q_bnb[b]
                    );
                }
            }
            eprintln!("{f}: {nblocks} absmax, {qm} nested-index mismatches (bnb CPU LUT)");

            // 5. dequantization of bnb's own quant state: exact on both paths
            let theirs = Nf4Quantized {
                packed: packed_bnb.clone(),
                absmax_q: absmax_q_bnb.clone(),
                absmax2: absmax2_bnb.clone(),
                code2: q.code2,
                offset: offset_bnb,
                blocksize: bs,
            };
            let dq_absmax_bnb = f32s(&st, "dequant_absmax");
            let dq_absmax = dequantize_nf4_absmax(&theirs);
            for b in 0..nblocks {
                assert_eq!(
                    dq_absmax[b].to_bits(),
                    dq_absmax_bnb[b].to_bits(),
                    "{f}: dequant absmax {b}"
                );
            }
            let dq_bnb = f32s(&st, "dequant");
            let dq = dequantize_nf4_cpu(&theirs, n);
            for i in 0..n {
                let ours = if out_bf16 {
                    bf16_bits_to_f32(f32_to_bf16_bits(dq[i]))
                } else {
                    dq[i]
                };
                assert_eq!(
                    ours.to_bits(),
                    dq_bnb[i].to_bits(),
                    "{f}: dequant element {i}: {} vs {}",
                    ours,
                    dq_bnb[i]
                );
            }
        }
    }
}
