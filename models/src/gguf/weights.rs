//! The weights of a GGUF file under Hugging Face names, dequantized to f32 on demand, with
//! Q/K rows restored to Hugging Face order for llama-architecture files.

use std::collections::BTreeMap;

use super::config::gguf_arch;
use super::names::{hf_name, permuted_projection, QkProjection, ROPE_FREQS};
use super::permute::unpermute_rows;
use super::reader::{GgufFile, GgufTensorInfo};
use crate::config::{Architecture, ModelConfig};
use crate::errors::{Error, ErrorKind, Result};

/// A GGUF file's tensors, addressed by Hugging Face name.
pub struct GgufWeights {
    file: GgufFile,
    /// Hugging Face name -> GGUF name.
    names: BTreeMap<String, String>,
    /// Whether q_proj/k_proj rows are in llama.cpp's permuted order (llama architecture).
    permuted: bool,
    num_attention_heads: usize,
    num_key_value_heads: usize,
}

impl GgufWeights {
    /// Indexes the tensors of `file` by Hugging Face name; `config` gives the head counts used
    /// to un-permute Q and K. Every tensor must have a known name (`rope_freqs.weight` excepted:
    /// it is part of the config).
    pub fn new(file: GgufFile, config: &ModelConfig) -> Result<Self> {
        let (_, arch) = gguf_arch(&file)?;
        let mut names = BTreeMap::new();
        for t in file.tensors().iter().filter(|t| t.name != ROPE_FREQS) {
            let hf = hf_name(&t.name).ok_or_else(|| {
                Error::new(
                    file.path(),
                    ErrorKind::Unsupported,
                    format!("tensor \"{}\" has no Hugging Face counterpart", t.name),
                )
            })?;
            names.insert(hf, t.name.clone());
        }
        Ok(Self {
            file,
            names,
            permuted: arch == Architecture::Llama,
            num_attention_heads: config.num_attention_heads,
            num_key_value_heads: config.num_key_value_heads,
        })
    }

    /// The underlying file.
    pub fn file(&self) -> &GgufFile {
        &self.file
    }

    /// Hugging Face names of all weights, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.names.keys().map(String::as_str)
    }

    /// The GGUF tensor info behind Hugging Face name `hf`.
    pub fn info(&self, hf: &str) -> Option<&GgufTensorInfo> {
        self.names.get(hf).and_then(|g| self.file.tensor(g))
    }

    /// Weight `hf` as f32, row-major over its Hugging Face shape ([`GgufTensorInfo::shape`]).
    pub fn to_f32(&self, hf: &str) -> Result<Vec<f32>> {
        let info = self.info(hf).ok_or_else(|| {
            Error::new(
                self.file.path(),
                ErrorKind::Missing,
                format!("no tensor named \"{hf}\""),
            )
        })?;
        let data = self.file.dequantize(&info.name)?;
        let heads = match permuted_projection(hf) {
            Some(_) if !self.permuted => return Ok(data),
            None => return Ok(data),
            Some(QkProjection::Q) => self.num_attention_heads,
            Some(QkProjection::K) => self.num_key_value_heads,
        };
        let rows = info.shape()[0];
        let cols = data.len() / rows.max(1);
        unpermute_rows(&data, rows, cols, heads).map_err(|reason| {
            Error::new(
                self.file.path(),
                ErrorKind::Malformed,
                format!("tensor \"{}\" cannot be un-permuted: {reason}", info.name),
            )
        })
    }
}
