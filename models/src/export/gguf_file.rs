//! A merged model as a GGUF file for llama.cpp, from a GGUF source: the source's metadata
//! (architecture, hyperparameters, tokenizer, chat template) with `general.file_type` set to
//! the written type, and its tensors in their order, the adapted ones merged. Matrices are
//! written in the chosen type (Q8_0 rows not a multiple of 32 fall back to F16, as llama.cpp's
//! converter does), vectors (norms, biases, rope factors) in F32, and Q/K rows back in
//! llama.cpp's permuted order.

use std::path::Path;

use super::merge::MergedWeights;
use super::ExportDtype;
use crate::checkpoint::WeightSource;
use crate::config::Architecture;
use crate::gguf::names::{hf_name, permuted_projection, QkProjection};
use crate::gguf::permute::permute_rows;
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

/// Writes `merged` (whose model must come from a GGUF file) to the GGUF file `out` in `dtype`.
/// `on_tensor` is called after each tensor is written, with its GGUF name.
pub fn write_gguf_file(
    merged: &MergedWeights,
    dtype: ExportDtype,
    out: &Path,
    on_tensor: &mut dyn FnMut(&str),
) -> Result<(), String> {
    let model = merged.model();
    let WeightSource::Gguf(source) = &model.weights else {
        return Err(format!(
            "{}: GGUF export needs a GGUF base model (--model file.gguf). From a Hugging Face \
             folder, export safetensors (--format safetensors) and convert them with llama.cpp's \
             convert_hf_to_gguf.py",
            model.path.display()
        ));
    };
    let file = source.file();
    let matrix_type = dtype.ggml_type();
    let mut tensors = Vec::new();
    for t in file.tensors() {
        let shape = t.shape();
        let ggml_type = if shape.len() < 2 {
            GgmlType::F32
        } else if matrix_type == GgmlType::Q8_0
            && !shape[shape.len() - 1].is_multiple_of(Q8_0_BLOCK)
        {
            GgmlType::F16
        } else {
            matrix_type
        };
        tensors.push(TensorOut {
            name: t.name.clone(),
            shape,
            ggml_type,
        });
    }
    let mut metadata: Vec<(String, MetaValue)> = file
        .metadata()
        .iter()
        .filter(|(k, _)| !REWRITTEN_KEYS.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    // general.architecture first, as llama.cpp's writer orders it; then by key
    metadata.sort_by(|a, b| {
        (a.0 != "general.architecture", &a.0).cmp(&(b.0 != "general.architecture", &b.0))
    });
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
    let permuted = model.config.arch == Architecture::Llama;
    let (heads, kv_heads) = (
        model.config.num_attention_heads,
        model.config.num_key_value_heads,
    );
    write_gguf(out, &metadata, &tensors, |i| {
        let t = &tensors[i];
        let values = match hf_name(&t.name) {
            None => file.dequantize(&t.name).map_err(|e| e.to_string())?,
            Some(hf) => {
                let merged_values = merged.get(&hf)?;
                let n_head = match permuted_projection(&hf) {
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
