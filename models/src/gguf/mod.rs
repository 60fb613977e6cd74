//! GGUF (llama.cpp's checkpoint format): reading, dequantizing to f32, mapping to Hugging Face
//! names and layout, and rebuilding the model config and tokenizer from metadata.

pub mod config;
pub mod dequant;
pub mod fetch;
pub mod names;
pub mod permute;
pub mod reader;
pub mod tokenizer;
pub mod types;
pub mod value;
pub mod weights;
pub mod writer;

pub use config::config_from_gguf;
pub use fetch::smollm2_gguf_path;
pub use reader::{GgufFile, GgufTensorInfo};
pub use tokenizer::tokenizer_from_gguf;
pub use types::GgmlType;
pub use value::MetaValue;
pub use weights::GgufWeights;
