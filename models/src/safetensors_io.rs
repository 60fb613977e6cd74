//! Memory-mapped safetensors checkpoints, single-file or sharded.
//!
//! A safetensors file is `u64 little-endian header length N`, `N` bytes of JSON mapping each
//! tensor name to `{dtype, shape, data_offsets: [begin, end]}` (offsets relative to the byte
//! after the header), then the tensor bytes, little-endian, row-major. Sharded checkpoints add
//! `model.safetensors.index.json` whose `weight_map` maps each tensor name to its shard file.
//!
//! Every header is checked against its file's length before any tensor is read, so a truncated
//! file or a header that lies about sizes is an error naming the file, never a panic.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use memmap2::Mmap;
pub use safetensors::Dtype;
use safetensors::SafeTensors;
use serde_json::Value;

use crate::errors::{Error, ErrorKind, Result};

/// Name of the shard index in a Hugging Face folder.
pub const INDEX_FILE: &str = "model.safetensors.index.json";
/// Name of the single weight file in a Hugging Face folder.
pub const SINGLE_FILE: &str = "model.safetensors";

/// Storage type and row-major shape of one tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorMeta {
    /// Element type as stored.
    pub dtype: Dtype,
    /// Row-major shape, outermost first (a Linear weight is `[out_features, in_features]`).
    pub shape: Vec<usize>,
}

/// One mapped file and where its tensor data begins.
struct Shard {
    path: PathBuf,
    mmap: Mmap,
    data_start: usize,
}

/// Where one tensor lives: its shard and its byte range within that shard's data section.
struct Entry {
    shard: usize,
    meta: TensorMeta,
    begin: usize,
    end: usize,
}

/// All tensors of a checkpoint, looked up by name across shards; data stays mapped.
pub struct SafetensorsFiles {
    /// The file, index or folder that was opened (for error messages).
    origin: PathBuf,
    shards: Vec<Shard>,
    entries: BTreeMap<String, Entry>,
}

impl SafetensorsFiles {
    /// Opens a `.safetensors` file, a `model.safetensors.index.json`, or a folder holding
    /// either (the index wins when both exist).
    pub fn open(path: &Path) -> Result<Self> {
        if path.is_dir() {
            let index = path.join(INDEX_FILE);
            let single = path.join(SINGLE_FILE);
            return if index.is_file() {
                Self::open_index(&index)
            } else if single.is_file() {
                Self::open_files(path, &[single])
            } else {
                Err(Error::new(
                    path,
                    ErrorKind::Missing,
                    format!("folder holds neither {INDEX_FILE} nor {SINGLE_FILE}"),
                ))
            };
        }
        if path.extension().is_some_and(|e| e == "json") {
            Self::open_index(path)
        } else {
            Self::open_files(path, &[path.to_path_buf()])
        }
    }

    /// Opens every shard that a `model.safetensors.index.json` names, and checks that each
    /// tensor of its `weight_map` is in the shard it names.
    fn open_index(index: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(index)
            .map_err(|e| Error::io(index, "cannot read shard index", &e))?;
        let value: Value = serde_json::from_str(&text)
            .map_err(|e| Error::new(index, ErrorKind::Malformed, format!("invalid JSON: {e}")))?;
        let Some(Value::Object(map)) = value.get("weight_map") else {
            return Err(Error::new(
                index,
                ErrorKind::Missing,
                "missing object \"weight_map\"",
            ));
        };
        let mut weight_map = BTreeMap::new();
        for (name, file) in map {
            let Value::String(file) = file else {
                return Err(Error::new(
                    index,
                    ErrorKind::Malformed,
                    format!("weight_map entry \"{name}\" is not a file name"),
                ));
            };
            weight_map.insert(name.clone(), file.clone());
        }
        let dir = index.parent().unwrap_or(Path::new("."));
        let mut files: Vec<PathBuf> = weight_map.values().map(|f| dir.join(f)).collect();
        files.sort();
        files.dedup();
        let loaded = Self::open_files(index, &files)?;
        for (name, file) in &weight_map {
            let in_shard = loaded
                .entries
                .get(name)
                .is_some_and(|e| loaded.shards[e.shard].path == dir.join(file));
            if !in_shard {
                return Err(Error::new(
                    &dir.join(file),
                    ErrorKind::Missing,
                    format!("tensor \"{name}\" listed in {INDEX_FILE} is not in this shard"),
                ));
            }
        }
        Ok(loaded)
    }

    fn open_files(origin: &Path, files: &[PathBuf]) -> Result<Self> {
        let mut shards = Vec::with_capacity(files.len());
        let mut entries = BTreeMap::new();
        for (shard_idx, path) in files.iter().enumerate() {
            let (shard, tensors) = open_shard(path)?;
            for (name, (meta, begin, end)) in tensors {
                if entries.contains_key(&name) {
                    return Err(Error::new(
                        path,
                        ErrorKind::Malformed,
                        format!("tensor \"{name}\" appears in more than one shard"),
                    ));
                }
                let entry = Entry {
                    shard: shard_idx,
                    meta,
                    begin,
                    end,
                };
                entries.insert(name, entry);
            }
            shards.push(shard);
        }
        Ok(Self {
            origin: origin.to_path_buf(),
            shards,
            entries,
        })
    }

    /// Every tensor name, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    /// Dtype and shape of `name`, if present.
    pub fn meta(&self, name: &str) -> Option<&TensorMeta> {
        self.entries.get(name).map(|e| &e.meta)
    }

    /// The first shard file (for errors about the checkpoint as a whole).
    pub fn first_shard(&self) -> &Path {
        self.shards[0].path.as_path()
    }

    /// The shard file holding `name`, if present.
    pub fn file_of(&self, name: &str) -> Option<&Path> {
        self.entries
            .get(name)
            .map(|e| self.shards[e.shard].path.as_path())
    }

    /// The raw little-endian bytes of `name` (e.g. bitsandbytes' packed uint8 weights).
    pub fn bytes(&self, name: &str) -> Result<&[u8]> {
        let entry = self.entry(name)?;
        let shard = &self.shards[entry.shard];
        Ok(&shard.mmap[shard.data_start + entry.begin..shard.data_start + entry.end])
    }

    /// `name` converted to f32, row-major. Floats convert exactly (f64 rounds); integers and
    /// bools convert by value; sub-byte and 8-bit float formats are unsupported.
    pub fn to_f32(&self, name: &str) -> Result<Vec<f32>> {
        let entry = self.entry(name)?;
        bytes_to_f32(entry.meta.dtype, self.bytes(name)?).ok_or_else(|| {
            Error::new(
                &self.shards[entry.shard].path,
                ErrorKind::Unsupported,
                format!(
                    "tensor \"{name}\" has dtype {} with no f32 conversion",
                    entry.meta.dtype
                ),
            )
        })
    }

    /// `name` converted to bf16: BF16 is copied, other dtypes go through f32 and round to
    /// nearest even.
    pub fn to_bf16(&self, name: &str) -> Result<Vec<bf16>> {
        let entry = self.entry(name)?;
        if entry.meta.dtype == Dtype::BF16 {
            let bytes = self.bytes(name)?;
            return Ok(bytes
                .chunks_exact(2)
                .map(|b| bf16::from_le_bytes([b[0], b[1]]))
                .collect());
        }
        Ok(self.to_f32(name)?.into_iter().map(bf16::from_f32).collect())
    }

    fn entry(&self, name: &str) -> Result<&Entry> {
        self.entries.get(name).ok_or_else(|| {
            Error::new(
                &self.origin,
                ErrorKind::Missing,
                format!("no tensor named \"{name}\""),
            )
        })
    }
}

/// Tensors of one file: name -> (meta, begin, end) with offsets relative to the data section.
type ShardTensors = HashMap<String, (TensorMeta, usize, usize)>;

/// Maps `path`, checks its header against the file length, and lists its tensors.
fn open_shard(path: &Path) -> Result<(Shard, ShardTensors)> {
    let file = File::open(path).map_err(|e| Error::io(path, "cannot open safetensors file", &e))?;
    let len = file
        .metadata()
        .map_err(|e| Error::io(path, "cannot stat safetensors file", &e))?
        .len();
    if len < 8 {
        return Err(Error::new(
            path,
            ErrorKind::Truncated,
            format!("file is {len} bytes, shorter than the 8-byte header length"),
        ));
    }
    // SAFETY: the map is read-only and private to this process; like every mmap-based loader we
    // rely on the checkpoint not being modified while it is open.
    let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, "cannot map file", &e))?;
    let header_len = u64::from_le_bytes(mmap[..8].try_into().unwrap_or([0; 8]));
    let file_len = mmap.len() as u64;
    if header_len > file_len - 8 {
        return Err(Error::new(
            path,
            ErrorKind::Truncated,
            format!("header length {header_len} runs past the end of the {file_len}-byte file"),
        ));
    }
    let data_start = 8 + header_len as usize;
    let data_len = mmap.len() - data_start;
    check_offsets(path, &mmap[8..data_start], data_len)?;
    let tensors = SafeTensors::deserialize(&mmap).map_err(|e| {
        Error::new(
            path,
            ErrorKind::Malformed,
            format!("invalid safetensors header: {e}"),
        )
    })?;
    let listed = tensors
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            let begin = view.data().as_ptr() as usize - mmap[data_start..].as_ptr() as usize;
            let end = begin + view.data().len();
            let meta = TensorMeta {
                dtype: view.dtype(),
                shape: view.shape().to_vec(),
            };
            (name, (meta, begin, end))
        })
        .collect();
    let shard = Shard {
        path: path.to_path_buf(),
        mmap,
        data_start,
    };
    Ok((shard, listed))
}

/// Checks every tensor's `data_offsets` against the data section's length, naming the first
/// tensor whose bytes lie past the end of the file.
fn check_offsets(path: &Path, header: &[u8], data_len: usize) -> Result<()> {
    let header: Value = serde_json::from_slice(header).map_err(|e| {
        Error::new(
            path,
            ErrorKind::Malformed,
            format!("header is not valid JSON: {e}"),
        )
    })?;
    let Value::Object(map) = header else {
        return Err(Error::new(
            path,
            ErrorKind::Malformed,
            "header is not a JSON object",
        ));
    };
    for (name, info) in map.iter().filter(|(k, _)| *k != "__metadata__") {
        let offsets = info
            .get("data_offsets")
            .and_then(Value::as_array)
            .filter(|a| a.len() == 2)
            .and_then(|a| Some((a[0].as_u64()?, a[1].as_u64()?)));
        let Some((begin, end)) = offsets else {
            return Err(Error::new(
                path,
                ErrorKind::Malformed,
                format!("tensor \"{name}\" has no valid data_offsets [begin, end]"),
            ));
        };
        if begin > end {
            return Err(Error::new(
                path,
                ErrorKind::Malformed,
                format!("tensor \"{name}\" has data_offsets [{begin}, {end}] with begin after end"),
            ));
        }
        if end > data_len as u64 {
            return Err(Error::new(
                path,
                ErrorKind::Truncated,
                format!(
                    "tensor \"{name}\" needs data bytes [{begin}, {end}) but the file holds only {data_len} after its header"
                ),
            ));
        }
    }
    Ok(())
}

/// Converts little-endian `bytes` of `dtype` to f32; `None` for dtypes with no conversion.
pub fn bytes_to_f32(dtype: Dtype, bytes: &[u8]) -> Option<Vec<f32>> {
    fn conv<const N: usize>(bytes: &[u8], f: impl Fn([u8; N]) -> f32) -> Vec<f32> {
        bytes
            .chunks_exact(N)
            .map(|c| f(c.try_into().unwrap_or([0; N])))
            .collect()
    }
    Some(match dtype {
        Dtype::F32 => conv(bytes, f32::from_le_bytes),
        Dtype::F16 => conv(bytes, |b| f16::from_le_bytes(b).to_f32()),
        Dtype::BF16 => conv(bytes, |b| bf16::from_le_bytes(b).to_f32()),
        Dtype::F64 => conv(bytes, |b| f64::from_le_bytes(b) as f32),
        Dtype::BOOL => conv(bytes, |b: [u8; 1]| f32::from(u8::from(b[0] != 0))),
        Dtype::U8 => conv(bytes, |b: [u8; 1]| f32::from(b[0])),
        Dtype::I8 => conv(bytes, |b| f32::from(i8::from_le_bytes(b))),
        Dtype::I16 => conv(bytes, |b| f32::from(i16::from_le_bytes(b))),
        Dtype::U16 => conv(bytes, |b| f32::from(u16::from_le_bytes(b))),
        Dtype::I32 => conv(bytes, |b| i32::from_le_bytes(b) as f32),
        Dtype::U32 => conv(bytes, |b| u32::from_le_bytes(b) as f32),
        Dtype::I64 => conv(bytes, |b| i64::from_le_bytes(b) as f32),
        Dtype::U64 => conv(bytes, |b| u64::from_le_bytes(b) as f32),
        _ => return None,
    })
}
