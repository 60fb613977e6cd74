//! Checkpoints quantized by bitsandbytes' `load_in_4bit` (the `*-bnb-4bit` repositories): each
//! quantized Linear weight `X.weight` is stored as
//! - `X.weight` (N / 2, 1) u8: two NF4 codes per byte, element 2i in the high nibble;
//! - `X.weight.absmax` (N / blocksize): f32, or with double quantization u8 codes of the
//!   centred block absmax, decoded by `X.weight.nested_quant_map` (256) f32 and
//!   `X.weight.nested_absmax` (one f32 per `nested_blocksize` blocks), plus the state's
//!   `nested_offset`;
//! - `X.weight.quant_map` (16) f32: the NF4 code book;
//! - `X.weight.quant_state.bitsandbytes__nf4`: the quant state as JSON bytes (shape, dtype,
//!   blocksize, nested_blocksize, nested_offset).
//!
//! They load as they are: dequantized on read with the NF4 ops' CPU references (bit for bit
//! what bitsandbytes' dequantize_4bit gives, in the state's dtype), under the Hugging Face
//! shape the state records; and for the GPU 4-bit mode, whose layout is bitsandbytes', the
//! stored parts of double-quantized weights ([`nf4_parts`]) go to the GPU unchanged.

use serde::Deserialize;

use crate::errors::{Error, ErrorKind, Result};
use crate::safetensors_io::SafetensorsFiles;
use ftrt_ops::dsl::Rounding;
use ftrt_ops::nf4::{nf4_dequantize, nf4_dequantize_f32_absmax};

/// The companion tensor holding the quant state of an NF4 weight.
const NF4_STATE: &str = ".quant_state.bitsandbytes__nf4";
/// The same for FP4 weights, which are refused.
const FP4_STATE: &str = ".quant_state.bitsandbytes__fp4";

/// bitsandbytes' quant state, as `QuantState.as_dict(packed=True)` serialises it.
#[derive(Debug, Deserialize)]
struct QuantState {
    quant_type: String,
    blocksize: usize,
    dtype: String,
    shape: Vec<usize>,
    nested_blocksize: Option<usize>,
    nested_offset: Option<f32>,
}

/// Whether `name` is the quant-state companion of a 4-bit weight.
pub fn is_quant_state(name: &str) -> bool {
    name.ends_with(NF4_STATE) || name.ends_with(FP4_STATE)
}

/// Whether `name` is a bitsandbytes 4-bit weight (it has a quant state beside it).
pub fn is_4bit(st: &SafetensorsFiles, name: &str) -> bool {
    [NF4_STATE, FP4_STATE]
        .iter()
        .any(|s| st.meta(&format!("{name}{s}")).is_some())
}

/// The Hugging Face shape of the 4-bit weight `name`.
pub fn shape(st: &SafetensorsFiles, name: &str) -> Result<Vec<usize>> {
    Ok(state(st, name)?.shape)
}

/// A double-quantized NF4 weight as bitsandbytes stores it, which is also the GPU 4-bit
/// mode's layout (uploaded as it is, no re-quantization).
#[derive(Debug, Clone, PartialEq)]
pub struct Nf4Parts {
    /// Elements (the product of the Hugging Face shape).
    pub n: usize,
    /// (N / 2) u8: two codes per byte, element 2i in the high nibble.
    pub packed: Vec<u8>,
    /// (N / 64) u8: each block's absmax minus `offset`, as codes of `code2`.
    pub absmax_q: Vec<u8>,
    /// (ceil(N / 64 / 256)) f32: the nested absmax.
    pub absmax2: Vec<f32>,
    /// The nested offset (mean of the block absmax).
    pub offset: f32,
    /// (256) f32 nested code book (bitsandbytes' signed dynamic map) and (16) f32 NF4 code book.
    pub code2: Vec<f32>,
    pub code: Vec<f32>,
    /// The state's dtype, the rounding of the dequantized values.
    pub rounding: Rounding,
}

impl Nf4Parts {
    /// The weight's values through the NF4 dequantize op's CPU reference (the GPU kernel's
    /// bit-exact reference), rounded to the state's dtype as bitsandbytes returns them.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut w = vec![0f32; self.n];
        nf4_dequantize::forward_cpu::<f32>(
            &nf4_dequantize::Dims { N: self.n },
            self.offset,
            &self.packed,
            &self.absmax_q,
            &self.absmax2,
            &self.code2,
            &self.code,
            &mut w,
            self.rounding,
        );
        w
    }
}

/// What a 4-bit weight's stored absmax is.
enum Absmax {
    /// Double quantized (the parts carry everything).
    Nested(Nf4Parts),
    /// Plain f32 block absmax (no nested quantization): packed codes, absmax, code book.
    Plain(Vec<u8>, Vec<f32>, Vec<f32>, Rounding),
}

/// The 4-bit weight `name` dequantized (row-major over its shape), rounded to the state's
/// dtype as bitsandbytes returns it.
pub fn dequantize(st: &SafetensorsFiles, name: &str) -> Result<Vec<f32>> {
    match read(st, name)? {
        Absmax::Nested(q) => Ok(q.dequantize()),
        Absmax::Plain(packed, absmax, code, rounding) => {
            let mut w = vec![0f32; packed.len() * 2];
            nf4_dequantize_f32_absmax::forward_cpu::<f32>(
                &nf4_dequantize_f32_absmax::Dims { N: w.len() },
                &packed,
                &absmax,
                &code,
                &mut w,
                rounding,
            );
            Ok(w)
        }
    }
}

/// The stored parts of the 4-bit weight `name` when it is double quantized (bitsandbytes'
/// default), `None` for a plain f32 absmax.
pub fn nf4_parts(st: &SafetensorsFiles, name: &str) -> Result<Option<Nf4Parts>> {
    Ok(match read(st, name)? {
        Absmax::Nested(q) => Some(q),
        Absmax::Plain(..) => None,
    })
}

/// Reads and checks the 4-bit weight `name`: its state, codes, absmax and code books.
fn read(st: &SafetensorsFiles, name: &str) -> Result<Absmax> {
    let qs = state(st, name)?;
    let fail = |kind, reason: String| {
        Error::new(st.file_of(name).unwrap_or(st.first_shard()), kind, reason)
    };
    let n: usize = qs.shape.iter().product();
    if qs.blocksize != 64 || !n.is_multiple_of(64) {
        return Err(fail(
            ErrorKind::Unsupported,
            format!(
                "4-bit weight \"{name}\": blocksize {} over {n} elements (NF4 with blocksize 64 \
                 and a multiple of 64 elements is supported)",
                qs.blocksize
            ),
        ));
    }
    let rounding = match qs.dtype.as_str() {
        "bfloat16" => Rounding::BF16,
        "float32" => Rounding::F32,
        other => {
            return Err(fail(
                ErrorKind::Unsupported,
                format!("4-bit weight \"{name}\": dtype {other} (bfloat16 or float32)"),
            ))
        }
    };
    let part = |suffix: &str| format!("{name}.{suffix}");
    let packed = st.bytes(name)?;
    let code = st.to_f32(&part("quant_map"))?;
    let absmax = part("absmax");
    let blocks = n / 64;
    let sized = |what: &str, got: usize, want: usize| {
        if got == want {
            Ok(())
        } else {
            Err(fail(
                ErrorKind::Malformed,
                format!(
                    "4-bit weight \"{name}\": {what} holds {got} values, its shape implies {want}"
                ),
            ))
        }
    };
    sized("the packed codes", packed.len() * 2, n)?;
    sized("quant_map", code.len(), 16)?;
    match (qs.nested_blocksize, qs.nested_offset) {
        (Some(nb), Some(offset)) => {
            if nb != 256 {
                return Err(fail(
                    ErrorKind::Unsupported,
                    format!("4-bit weight \"{name}\": nested blocksize {nb} (256 is supported)"),
                ));
            }
            let absmax_q = st.bytes(&absmax)?;
            let code2 = st.to_f32(&part("nested_quant_map"))?;
            let absmax2 = st.to_f32(&part("nested_absmax"))?;
            sized("absmax", absmax_q.len(), blocks)?;
            sized("nested_quant_map", code2.len(), 256)?;
            sized("nested_absmax", absmax2.len(), blocks.div_ceil(256))?;
            Ok(Absmax::Nested(Nf4Parts {
                n,
                packed: packed.to_vec(),
                absmax_q: absmax_q.to_vec(),
                absmax2,
                offset,
                code2,
                code,
                rounding,
            }))
        }
        _ => {
            let absmax = st.to_f32(&absmax)?;
            sized("absmax", absmax.len(), blocks)?;
            Ok(Absmax::Plain(packed.to_vec(), absmax, code, rounding))
        }
    }
}

/// The parsed quant state of `name` (NF4 only).
fn state(st: &SafetensorsFiles, name: &str) -> Result<QuantState> {
    let path = st.file_of(name).unwrap_or(st.first_shard()).to_path_buf();
    if st.meta(&format!("{name}{FP4_STATE}")).is_some() {
        return Err(Error::new(
            &path,
            ErrorKind::Unsupported,
            format!("4-bit weight \"{name}\" is FP4; only NF4 bitsandbytes weights load"),
        ));
    }
    let bytes = st.bytes(&format!("{name}{NF4_STATE}"))?;
    let qs: QuantState = serde_json::from_slice(bytes).map_err(|e| {
        Error::new(
            &path,
            ErrorKind::Malformed,
            format!("quant state of \"{name}\" is not bitsandbytes' JSON: {e}"),
        )
    })?;
    if qs.quant_type != "nf4" {
        return Err(Error::new(
            &path,
            ErrorKind::Unsupported,
            format!("4-bit weight \"{name}\" has quant_type {}", qs.quant_type),
        ));
    }
    Ok(qs)
}
