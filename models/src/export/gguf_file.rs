//! A merged model as a GGUF file for llama.cpp. From a GGUF base: the source's metadata
//! (architecture, hyperparameters, tokenizer, chat template) and its tensors in their order;
//! from a Hugging Face folder: metadata as llama.cpp's converter writes it ([`super::gguf_meta`])
//! and tensors in its order. `general.file_type` states the written type. Matrices are written
//! in the chosen type (Q8_0 rows not a multiple of 32 fall back to F16, as llama.cpp's
//! converter does), vectors (norms, biases, rope factors) in F32, and for the llama
//! architecture Q/K rows in llama.cpp's permuted order.

use std::path::Path;

use super::gguf_meta::{gguf_arch_name, hf_gguf_metadata};
use super::merge::MergedWeights;
use super::ExportDtype;
use crate::checkpoint::WeightSource;
use crate::gguf::names::{
    file_order, gguf_name, hf_name, permuted_projection, QkProjection, ROPE_FREQS,
};
use crate::gguf::permute::permute_rows;
use crate::gguf::reader::GgufFile;
use crate::gguf::types::GgmlType;
use crate::gguf::value::MetaValue;
use crate::gguf::writer::{encode, write_gguf, TensorOut, Q8_0_BLOCK};

/// Metadata keys the writer sets itself rather than copying.
const REWRITTEN_KEYS: [&str; 3] = [
    "general.file_type",
    "general.alignment",
    "general.quantization_version",
];
/// ggml's quantization format version, written with quantized tensors.
const QUANTIZATION_VERSION: u32 = 2;

/// Where a tensor's values come from.
enum Values<'a> {
    /// A merged weight under its Hugging Face name.
    Weight(String),
    /// Given values (a Hugging Face model's rope factors).
    Given(Vec<f32>),
    /// Stored in the GGUF source as they are (its rope factors).
    Stored(&'a GgufFile),
}

/// Writes `merged` to the GGUF file `out` in `dtype`. `on_tensor` is called after each tensor
/// is written, with its GGUF name.
pub fn write_gguf_file(
    merged: &MergedWeights,
    dtype: ExportDtype,
    out: &Path,
    on_tensor: &mut dyn FnMut(&str),
) -> Result<(), String> {
    let model = merged.model();
    // (GGUF name, row-major shape, values) of every tensor, in file order, and the metadata
    let (mut metadata, entries) = match &model.weights {
        WeightSource::Gguf(source) => {
            let file = source.file();
            let metadata: Vec<(String, MetaValue)> = file
                .metadata()
                .iter()
                .filter(|(k, _)| !REWRITTEN_KEYS.contains(&k.as_str()))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            let entries = file
                .tensors()
                .iter()
                .map(|t| {
                    let values = hf_name(&t.name).map_or(Values::Stored(file), Values::Weight);
                    (t.name.clone(), t.shape(), values)
                })
                .collect();
            (metadata, entries)
        }
        WeightSource::Safetensors(_) => {
            let (metadata, rope_factors) = hf_gguf_metadata(model)?;
            let mut entries: Vec<(String, Vec<usize>, Values)> = Vec::new();
            if let Some(f) = rope_factors {
                entries.push((ROPE_FREQS.to_owned(), vec![f.len()], Values::Given(f)));
            }
            for hf in merged.names() {
                let name =
                    gguf_name(&hf).ok_or_else(|| format!("{hf}: no GGUF name for this tensor"))?;
                entries.push((name, merged.shape(&hf)?, Values::Weight(hf)));
            }
            entries.sort_by_key(|e| file_order(&e.0));
            (metadata, entries)
        }
    };
    // general.architecture first, as llama.cpp's writer orders it; then by key
    metadata.sort_by(|a, b| {
        (a.0 != "general.architecture", &a.0).cmp(&(b.0 != "general.architecture", &b.0))
    });
    let matrix_type = dtype.ggml_type();
    let tensors: Vec<TensorOut> = entries
        .iter()
        .map(|(name, shape, _)| {
            let ggml_type = if shape.len() < 2 {
                GgmlType::F32
            } else if matrix_type == GgmlType::Q8_0
                && !shape[shape.len() - 1].is_multiple_of(Q8_0_BLOCK)
            {
                GgmlType::F16
            } else {
                matrix_type
            };
            TensorOut {
                name: name.clone(),
                shape: shape.clone(),
                ggml_type,
            }
        })
        .collect();
    metadata.push((
        "general.file_type".into(),
        MetaValue::U32(dtype.llama_file_type()),
    ));
    if tensors.iter().any(|t| t.ggml_type == GgmlType::Q8_0) {
        metadata.push((
            "general.quantization_version".into(),
            MetaValue::U32(QUANTIZATION_VERSION),
        ));
    }
    let permuted = gguf_arch_name(model.config.arch) == "llama";
    let (heads, kv_heads) = (
        model.config.num_attention_heads,
        model.config.num_key_value_heads,
    );
    write_gguf(out, &metadata, &tensors, |i| {
        let (t, (_, _, source)) = (&tensors[i], &entries[i]);
        let values = match source {
            Values::Given(v) => v.clone(),
            Values::Stored(file) => file.dequantize(&t.name).map_err(|e| e.to_string())?,
            Values::Weight(hf) => {
                let merged_values = merged.get(hf)?;
                let n_head = match permuted_projection(hf) {
                    Some(QkProjection::Q) if permuted => heads,
                    Some(QkProjection::K) if permuted => kv_heads,
                    _ => 0,
                };
                if n_head == 0 {
                    merged_values
                } else {
                    let rows = t.shape[0];
                    let cols = merged_values.len() / rows.max(1);
                    permute_rows(&merged_values, rows, cols, n_head)
                        .map_err(|e| format!("{hf}: {e}"))?
                }
            }
        };
        let bytes = encode(t.ggml_type, &values).map_err(|e| format!("{}: {e}", t.name))?;
        on_tensor(&t.name);
        Ok(bytes)
    })
}
