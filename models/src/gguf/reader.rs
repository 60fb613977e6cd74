//! GGUF v2/v3 container: header, metadata, tensor infos and the memory-mapped data section.
//!
//! Layout, all little-endian:
//! - header: magic `b"GGUF"`, `u32` version (2 or 3), `u64` tensor count, `u64` metadata count;
//! - metadata: per entry a string key (`u64` length + UTF-8) and a typed value ([`MetaValue`]);
//! - tensor infos: per tensor a string name, `u32` n_dims, `n_dims` × `u64` dims `ne[0..]`
//!   (`ne[0]` varies fastest, so the row-major shape is the reverse), `u32` ggml type id and a
//!   `u64` offset relative to the data section, a multiple of the alignment;
//! - padding to `general.alignment` (default 32), then the data section.
//!
//! Every count, length and offset is checked against the file size before use.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use super::dequant;
use super::types::GgmlType;
use super::value::MetaValue;
use crate::errors::{Error, ErrorKind, Result};

/// Alignment of the data section and of each tensor when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml tensors have at most this many dimensions.
const MAX_DIMS: u32 = 4;
/// Arrays nested deeper than this are rejected (no real file nests at all).
const MAX_ARRAY_DEPTH: usize = 4;

/// One tensor's description from the tensor-info table.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufTensorInfo {
    /// GGUF name, e.g. `blk.0.attn_q.weight`.
    pub name: String,
    /// ggml dims `ne[0..n_dims]`, innermost first.
    pub dims: Vec<u64>,
    /// Storage type.
    pub ggml_type: GgmlType,
    /// Byte offset of the data, relative to the data section.
    pub offset: u64,
}

impl GgufTensorInfo {
    /// Row-major shape, outermost first (the reverse of `dims`): a weight with
    /// `ne = [in, out]` has shape `[out, in]`, as in Hugging Face.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }

    /// Number of elements.
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }

    /// Bytes of data (valid once the reader has checked the dims against the type).
    pub fn n_bytes(&self) -> u64 {
        self.n_elements() / self.ggml_type.block_size() as u64 * self.ggml_type.type_size() as u64
    }
}

/// An open GGUF file.
pub struct GgufFile {
    path: PathBuf,
    mmap: Mmap,
    version: u32,
    metadata: HashMap<String, MetaValue>,
    tensors: Vec<GgufTensorInfo>,
    by_name: HashMap<String, usize>,
    alignment: u64,
    data_offset: u64,
}

impl GgufFile {
    /// Maps and parses `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io(path, "cannot open GGUF file", &e))?;
        let len = file
            .metadata()
            .map_err(|e| Error::io(path, "cannot stat GGUF file", &e))?
            .len();
        if len < 24 {
            return Err(Error::new(
                path,
                ErrorKind::Truncated,
                format!("file is {len} bytes, shorter than a GGUF header"),
            ));
        }
        // SAFETY: the map is read-only and private to this process; like every mmap-based loader
        // we rely on the file not being modified while it is open.
        let mmap =
            unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, "cannot map file", &e))?;
        let parsed = {
            let mut cursor = Cursor {
                buf: &mmap,
                pos: 0,
                path,
            };
            parse(&mut cursor)?
        };
        let (version, metadata, tensors, alignment, data_offset) = parsed;
        let by_name = tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        Ok(Self {
            path: path.to_path_buf(),
            mmap,
            version,
            metadata,
            tensors,
            by_name,
            alignment,
            data_offset,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Format version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// All metadata entries.
    pub fn metadata(&self) -> &HashMap<String, MetaValue> {
        &self.metadata
    }

    /// The metadata value under `key`.
    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.metadata.get(key)
    }

    /// Tensor infos in file order.
    pub fn tensors(&self) -> &[GgufTensorInfo] {
        &self.tensors
    }

    /// The info of the tensor called `name`.
    pub fn tensor(&self, name: &str) -> Option<&GgufTensorInfo> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }

    /// Alignment of the data section and of tensor offsets.
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// Absolute file offset of the data section.
    pub fn data_offset(&self) -> u64 {
        self.data_offset
    }

    /// The stored bytes of tensor `name`.
    pub fn tensor_bytes(&self, name: &str) -> Result<&[u8]> {
        let info = self.info_or_err(name)?;
        // Bounds were checked against the file length when the file was opened.
        let begin = (self.data_offset + info.offset) as usize;
        Ok(&self.mmap[begin..begin + info.n_bytes() as usize])
    }

    /// Tensor `name` dequantized to f32 in ggml order (`ne[0]` fastest, i.e. row-major over
    /// [`GgufTensorInfo::shape`]).
    pub fn dequantize(&self, name: &str) -> Result<Vec<f32>> {
        let info = self.info_or_err(name)?;
        dequant::dequantize(info.ggml_type, self.tensor_bytes(name)?).map_err(|reason| {
            Error::new(
                &self.path,
                ErrorKind::Unsupported,
                format!("tensor \"{name}\": {reason}"),
            )
        })
    }

    fn info_or_err(&self, name: &str) -> Result<&GgufTensorInfo> {
        self.tensor(name).ok_or_else(|| {
            Error::new(
                &self.path,
                ErrorKind::Missing,
                format!("no tensor named \"{name}\""),
            )
        })
    }
}

type Parsed = (
    u32,
    HashMap<String, MetaValue>,
    Vec<GgufTensorInfo>,
    u64,
    u64,
);

fn parse(c: &mut Cursor) -> Result<Parsed> {
    let magic: [u8; 4] = c.array("magic")?;
    if &magic != b"GGUF" {
        return Err(c.err(
            ErrorKind::Malformed,
            format!("bad magic {magic:?}, not a GGUF file"),
        ));
    }
    let version = c.u32("version")?;
    if version != 2 && version != 3 {
        let hint = if version.swap_bytes() <= 3 {
            " (big-endian files are not supported)"
        } else {
            ""
        };
        return Err(c.err(
            ErrorKind::Unsupported,
            format!("GGUF version {version}{hint}; supported: 2, 3"),
        ));
    }
    let n_tensors = c.u64("tensor count")?;
    let n_kv = c.u64("metadata count")?;
    let mut metadata = HashMap::new();
    for _ in 0..n_kv {
        let key = c.string("metadata key")?;
        let ty = c.u32("metadata value type")?;
        let value = c.value(ty, &key, 0)?;
        metadata.insert(key, value);
    }
    let alignment = match metadata.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(v) => match v.as_u64() {
            Some(a) if a.is_power_of_two() => a,
            _ => {
                return Err(c.err(
                    ErrorKind::Malformed,
                    format!("general.alignment {v:?} is not a power of two"),
                ))
            }
        },
    };
    // Each tensor info takes at least 28 bytes: reject absurd counts before allocating.
    if n_tensors > (c.buf.len() - c.pos) as u64 / 28 {
        return Err(c.err(
            ErrorKind::Truncated,
            format!("tensor count {n_tensors} cannot fit in the file"),
        ));
    }
    let mut tensors = Vec::with_capacity(n_tensors as usize);
    for _ in 0..n_tensors {
        tensors.push(c.tensor_info()?);
    }
    let data_offset = (c.pos as u64).div_ceil(alignment) * alignment;
    let file_len = c.buf.len() as u64;
    for t in &tensors {
        if t.offset % alignment != 0 {
            return Err(c.err(
                ErrorKind::Malformed,
                format!(
                    "tensor \"{}\" offset {} is not a multiple of the alignment {alignment}",
                    t.name, t.offset
                ),
            ));
        }
        let end = data_offset
            .checked_add(t.offset)
            .and_then(|b| b.checked_add(t.n_bytes()));
        if end.is_none_or(|end| end > file_len) {
            return Err(c.err(
                ErrorKind::Truncated,
                format!(
                    "tensor \"{}\" ({} bytes at data offset {}) runs past the end of the {file_len}-byte file",
                    t.name,
                    t.n_bytes(),
                    t.offset
                ),
            ));
        }
    }
    Ok((version, metadata, tensors, alignment, data_offset))
}

/// A bounds-checked little-endian reader over the mapped file.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl Cursor<'_> {
    fn err(&self, kind: ErrorKind, reason: String) -> Error {
        Error::new(self.path, kind, reason)
    }

    fn bytes(&mut self, n: u64, what: &str) -> Result<&[u8]> {
        let remaining = (self.buf.len() - self.pos) as u64;
        if n > remaining {
            return Err(self.err(
                ErrorKind::Truncated,
                format!(
                    "{what} at byte {} needs {n} bytes, only {remaining} remain",
                    self.pos
                ),
            ));
        }
        let start = self.pos;
        self.pos += n as usize;
        Ok(&self.buf[start..self.pos])
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let b = self.bytes(N as u64, what)?;
        let mut out = [0u8; N];
        out.copy_from_slice(b);
        Ok(out)
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        self.array(what).map(u64::from_le_bytes)
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let len = self.u64(what)?;
        let at = self.pos;
        let bytes = self.bytes(len, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| {
            self.err(
                ErrorKind::Malformed,
                format!("{what} at byte {at} is not valid UTF-8"),
            )
        })
    }

    fn value(&mut self, ty: u32, key: &str, depth: usize) -> Result<MetaValue> {
        Ok(match ty {
            0 => MetaValue::U8(u8::from_le_bytes(self.array(key)?)),
            1 => MetaValue::I8(i8::from_le_bytes(self.array(key)?)),
            2 => MetaValue::U16(u16::from_le_bytes(self.array(key)?)),
            3 => MetaValue::I16(i16::from_le_bytes(self.array(key)?)),
            4 => MetaValue::U32(u32::from_le_bytes(self.array(key)?)),
            5 => MetaValue::I32(i32::from_le_bytes(self.array(key)?)),
            6 => MetaValue::F32(f32::from_le_bytes(self.array(key)?)),
            7 => match self.array::<1>(key)?[0] {
                0 => MetaValue::Bool(false),
                1 => MetaValue::Bool(true),
                b => {
                    return Err(self.err(
                        ErrorKind::Malformed,
                        format!("metadata \"{key}\": bool byte {b} is neither 0 nor 1"),
                    ))
                }
            },
            8 => MetaValue::String(self.string(key)?),
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(self.err(
                        ErrorKind::Malformed,
                        format!("metadata \"{key}\": arrays nested deeper than {MAX_ARRAY_DEPTH}"),
                    ));
                }
                let elem_ty = self.u32(key)?;
                let count = self.u64(key)?;
                // Every element takes at least one byte.
                if count > (self.buf.len() - self.pos) as u64 {
                    return Err(self.err(
                        ErrorKind::Truncated,
                        format!(
                            "metadata \"{key}\": array of {count} elements cannot fit in the file"
                        ),
                    ));
                }
                let mut items = Vec::with_capacity(count as usize);
                for _ in 0..count {
                    items.push(self.value(elem_ty, key, depth + 1)?);
                }
                MetaValue::Array(items)
            }
            10 => MetaValue::U64(u64::from_le_bytes(self.array(key)?)),
            11 => MetaValue::I64(i64::from_le_bytes(self.array(key)?)),
            12 => MetaValue::F64(f64::from_le_bytes(self.array(key)?)),
            other => {
                return Err(self.err(
                    ErrorKind::Malformed,
                    format!("metadata \"{key}\" has unknown value type {other}"),
                ))
            }
        })
    }

    fn tensor_info(&mut self) -> Result<GgufTensorInfo> {
        let name = self.string("tensor name")?;
        let n_dims = self.u32(&name)?;
        if n_dims == 0 || n_dims > MAX_DIMS {
            return Err(self.err(
                ErrorKind::Malformed,
                format!("tensor \"{name}\" has {n_dims} dims; ggml allows 1 to {MAX_DIMS}"),
            ));
        }
        let dims = (0..n_dims)
            .map(|_| self.u64(&name))
            .collect::<Result<Vec<_>>>()?;
        let type_id = self.u32(&name)?;
        let offset = self.u64(&name)?;
        let ggml_type = GgmlType::from_id(type_id).ok_or_else(|| {
            self.err(
                ErrorKind::Unsupported,
                format!("tensor \"{name}\" has unknown or unsupported tensor type id {type_id}"),
            )
        })?;
        let n_elements = dims
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .filter(|&n| n <= self.buf.len() as u64 * 8);
        if n_elements.is_none() {
            return Err(self.err(
                ErrorKind::Malformed,
                format!("tensor \"{name}\" dims {dims:?} are too large for the file"),
            ));
        }
        if dims[0] % ggml_type.block_size() as u64 != 0 {
            return Err(self.err(
                ErrorKind::Malformed,
                format!(
                    "tensor \"{name}\" has ne[0] = {} which is not a multiple of {ggml_type}'s block size {}",
                    dims[0],
                    ggml_type.block_size()
                ),
            ));
        }
        Ok(GgufTensorInfo {
            name,
            dims,
            ggml_type,
            offset,
        })
    }
}
