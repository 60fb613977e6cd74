//! Writing GGUF v3 files, the layout [`super::reader`] reads: header, metadata, tensor infos,
//! padding to [`DEFAULT_ALIGNMENT`], then each tensor's data at an aligned offset. Tensors are
//! encoded one at a time (F32, F16, BF16 or Q8_0) and streamed into a temporary file that is
//! synced and renamed over the target, so a failed export never leaves a torn file.

use std::io::Write;
use std::path::Path;

use half::{bf16, f16};

use super::reader::DEFAULT_ALIGNMENT;
use super::types::GgmlType;
use super::value::MetaValue;
use crate::train::atomic::stage_with;

/// GGUF's magic and the version written.
const MAGIC: &[u8; 4] = b"GGUF";
const VERSION: u32 = 3;
/// Weights in one Q8_0 block.
pub const Q8_0_BLOCK: usize = 32;

/// Metadata entries in file order.
pub type Metadata = Vec<(String, MetaValue)>;

/// One tensor to write: its GGUF name, row-major shape (outermost first, as Hugging Face's; the
/// file stores the reverse as `ne`) and storage type.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorOut {
    pub name: String,
    pub shape: Vec<usize>,
    pub ggml_type: GgmlType,
}

impl TensorOut {
    /// Bytes of its encoded data.
    pub fn n_bytes(&self) -> usize {
        let n: usize = self.shape.iter().product();
        n / self.ggml_type.block_size() * self.ggml_type.type_size()
    }
}

/// `values` (row-major) in ggml type `ty`: F32 and F16/BF16 (rounded to nearest even) as
/// little-endian values, Q8_0 as llama.cpp's reference quantizer writes it (per block of 32: `d
/// = max |x| / 127` stored as f16, `q = round(x / d)` as i8). Q8_0 needs a multiple of 32 values
/// (each row's, in a file: ggml blocks never straddle rows).
pub fn encode(ty: GgmlType, values: &[f32]) -> Result<Vec<u8>, String> {
    Ok(match ty {
        GgmlType::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        GgmlType::F16 => values
            .iter()
            .flat_map(|&v| f16::from_f32(v).to_le_bytes())
            .collect(),
        GgmlType::BF16 => values
            .iter()
            .flat_map(|&v| bf16::from_f32(v).to_le_bytes())
            .collect(),
        GgmlType::Q8_0 => {
            if !values.len().is_multiple_of(Q8_0_BLOCK) {
                return Err(format!(
                    "Q8_0 needs a multiple of {Q8_0_BLOCK} values, not {}",
                    values.len()
                ));
            }
            let mut out = Vec::with_capacity(values.len() / Q8_0_BLOCK * 34);
            for block in values.chunks_exact(Q8_0_BLOCK) {
                let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
                let d = amax / 127.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
                out.extend(block.iter().map(|&v| (v * id).round() as i8 as u8));
            }
            out
        }
        other => return Err(format!("writing {other} tensors is not supported")),
    })
}

/// Writes a GGUF file at `path`: `metadata` in the given order, then `tensors`, whose encoded
/// bytes `data(i)` returns one at a time (each must be `tensors[i].n_bytes()` long).
pub fn write_gguf(
    path: &Path,
    metadata: &[(String, MetaValue)],
    tensors: &[TensorOut],
    mut data: impl FnMut(usize) -> Result<Vec<u8>, String>,
) -> Result<(), String> {
    let align = DEFAULT_ALIGNMENT as usize;
    let mut offsets = Vec::with_capacity(tensors.len());
    let mut end = 0usize;
    for t in tensors {
        offsets.push(end);
        end = (end + t.n_bytes()).next_multiple_of(align);
    }
    let staged = stage_with(path, |w| {
        let mut head = Vec::new();
        head.extend_from_slice(MAGIC);
        head.extend_from_slice(&VERSION.to_le_bytes());
        head.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
        head.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
        for (key, value) in metadata {
            put_string(&mut head, key);
            head.extend_from_slice(&tag(value).to_le_bytes());
            put_payload(&mut head, value);
        }
        for (t, &offset) in tensors.iter().zip(&offsets) {
            put_string(&mut head, &t.name);
            head.extend_from_slice(&(t.shape.len() as u32).to_le_bytes());
            for &d in t.shape.iter().rev() {
                head.extend_from_slice(&(d as u64).to_le_bytes());
            }
            head.extend_from_slice(&t.ggml_type.id().to_le_bytes());
            head.extend_from_slice(&(offset as u64).to_le_bytes());
        }
        head.resize(head.len().next_multiple_of(align), 0);
        w.write_all(&head)?;
        let mut at = 0;
        for (i, (t, &offset)) in tensors.iter().zip(&offsets).enumerate() {
            w.write_all(&vec![0u8; offset - at])?;
            let bytes = data(i).map_err(std::io::Error::other)?;
            if bytes.len() != t.n_bytes() {
                return Err(std::io::Error::other(format!(
                    "tensor \"{}\": {} bytes encoded, {} expected for {} {:?}",
                    t.name,
                    bytes.len(),
                    t.n_bytes(),
                    t.ggml_type,
                    t.shape
                )));
            }
            w.write_all(&bytes)?;
            at = offset + bytes.len();
        }
        w.write_all(&vec![0u8; end - at])
    })?;
    staged.commit()
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// GGUF's type tag of a value ([`MetaValue`]'s variants in the reader's order).
fn tag(v: &MetaValue) -> u32 {
    match v {
        MetaValue::U8(_) => 0,
        MetaValue::I8(_) => 1,
        MetaValue::U16(_) => 2,
        MetaValue::I16(_) => 3,
        MetaValue::U32(_) => 4,
        MetaValue::I32(_) => 5,
        MetaValue::F32(_) => 6,
        MetaValue::Bool(_) => 7,
        MetaValue::String(_) => 8,
        MetaValue::Array(_) => 9,
        MetaValue::U64(_) => 10,
        MetaValue::I64(_) => 11,
        MetaValue::F64(_) => 12,
    }
}

/// A value without its tag; an array is its element tag (its first element's, string for an
/// empty one), its length and its elements' payloads.
fn put_payload(out: &mut Vec<u8>, v: &MetaValue) {
    match v {
        MetaValue::U8(x) => out.push(*x),
        MetaValue::I8(x) => out.push(*x as u8),
        MetaValue::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::Bool(x) => out.push(u8::from(*x)),
        MetaValue::String(s) => put_string(out, s),
        MetaValue::Array(items) => {
            let element = items.first().map_or(8, tag);
            out.extend_from_slice(&element.to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for item in items {
                put_payload(out, item);
            }
        }
        MetaValue::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::reader::GgufFile;
    use crate::train::rng::SplitMix64;

    /// Every metadata type and the four tensor types written, then read back by the reader:
    /// the same metadata, names, shapes and types; F32 bit-exact, F16/BF16 equal to `half`'s
    /// rounding, Q8_0 as whole steps of the block's f16 scale, each within half a step (decoded by
    /// the reader's dequantizer, which reads llama.cpp's files).
    #[test]
    fn written_files_read_back() {
        let seed = ftrt_runtime::rng::fresh_seed();
        let mut rng = SplitMix64::new(seed);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.gguf");
        let metadata: Vec<(String, MetaValue)> = vec![
            (
                "general.architecture".into(),
                MetaValue::String("llama".into()),
            ),
            ("a.u8".into(), MetaValue::U8(7)),
            ("a.i8".into(), MetaValue::I8(-7)),
            ("a.u16".into(), MetaValue::U16(65000)),
            ("a.i16".into(), MetaValue::I16(-300)),
            ("a.u32".into(), MetaValue::U32(4_000_000_000)),
            ("a.i32".into(), MetaValue::I32(-5)),
            ("a.f32".into(), MetaValue::F32(1e-5)),
            ("a.bool".into(), MetaValue::Bool(true)),
            ("a.u64".into(), MetaValue::U64(1 << 40)),
            ("a.i64".into(), MetaValue::I64(-(1 << 40))),
            ("a.f64".into(), MetaValue::F64(0.1)),
            (
                "a.strings".into(),
                MetaValue::Array(vec![
                    MetaValue::String("Ġhello".into()),
                    MetaValue::String("".into()),
                ]),
            ),
            (
                "a.nested".into(),
                MetaValue::Array(vec![MetaValue::Array(vec![MetaValue::I32(1)])]),
            ),
        ];
        let shapes = [
            (GgmlType::F32, vec![3, 5]),
            (GgmlType::F16, vec![7]),
            (GgmlType::BF16, vec![2, 3]),
            (GgmlType::Q8_0, vec![3, 64]),
        ];
        let tensors: Vec<TensorOut> = shapes
            .iter()
            .enumerate()
            .map(|(i, (ty, shape))| TensorOut {
                name: format!("t{i}.weight"),
                shape: shape.clone(),
                ggml_type: *ty,
            })
            .collect();
        let values: Vec<Vec<f32>> = tensors
            .iter()
            .map(|t| rng.normals_f32(t.shape.iter().product(), 2.0))
            .collect();
        write_gguf(&path, &metadata, &tensors, |i| {
            encode(tensors[i].ggml_type, &values[i])
        })
        .unwrap();

        let f = GgufFile::open(&path).unwrap();
        assert_eq!(f.version(), VERSION);
        for (k, v) in &metadata {
            assert_eq!(f.get(k), Some(v), "{k}");
        }
        assert_eq!(f.metadata().len(), metadata.len());
        for (t, want) in tensors.iter().zip(&values) {
            let info = f.tensor(&t.name).unwrap();
            assert_eq!(
                (info.shape(), info.ggml_type),
                (t.shape.clone(), t.ggml_type)
            );
            assert_eq!(info.offset % DEFAULT_ALIGNMENT, 0);
            let got = f.dequantize(&t.name).unwrap();
            match t.ggml_type {
                GgmlType::F32 => assert_eq!(&got, want),
                GgmlType::F16 => {
                    let r: Vec<f32> = want.iter().map(|&v| f16::from_f32(v).to_f32()).collect();
                    assert_eq!(got, r)
                }
                GgmlType::BF16 => {
                    let r: Vec<f32> = want.iter().map(|&v| bf16::from_f32(v).to_f32()).collect();
                    assert_eq!(got, r)
                }
                _ => {
                    for (g, w) in got.chunks(Q8_0_BLOCK).zip(want.chunks(Q8_0_BLOCK)) {
                        // each value is q d16 with d16 the f16 of d = max |x| / 127 and q
                        // the nearest integer to x / d
                        let d = w.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0;
                        let d16 = f16::from_f32(d).to_f32();
                        for (a, b) in g.iter().zip(w) {
                            let q = a / d16;
                            assert!(q == q.round() && q.abs() <= 127.0, "seed {seed}");
                            assert!((b - q * d).abs() <= 0.5 * d * 1.0001, "seed {seed}");
                        }
                    }
                }
            }
        }
        assert!(encode(GgmlType::Q8_0, &[0.0; 31]).is_err());
        assert!(encode(GgmlType::Q4_K, &[0.0; 256]).is_err());
    }
}
