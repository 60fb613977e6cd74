//! ftrt-models
pub mod bnb4bit;
pub mod chat_template;
pub mod checkpoint;
pub mod config;
pub mod data;
pub mod errors;
pub mod export;
pub mod gguf;
pub mod safetensors_io;
pub mod tokenizer;

pub use checkpoint::{open_model, LoadedModel, StorageType, WeightInfo, WeightSource};
pub use config::{Architecture, ModelConfig, RopeScaling};
pub use errors::{Error, ErrorKind, Result};
pub mod llama;
pub mod lora;
pub mod train;
