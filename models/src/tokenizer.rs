//! Hugging Face tokenizers: `tokenizer.json` through the `tokenizers` crate, and the settings
//! of `tokenizer_config.json` that generation needs (chat template, bos/eos strings).

use std::path::Path;

use serde_json::Value;
use tokenizers::Tokenizer;

use crate::errors::{Error, ErrorKind, Result};

/// The parts of `tokenizer_config.json` (or of GGUF tokenizer metadata) used for chat.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TokenizerConfig {
    /// Jinja chat template (the "default" one when the config lists several).
    pub chat_template: Option<String>,
    /// Beginning-of-sequence token text, e.g. `<|begin_of_text|>`.
    pub bos_token: Option<String>,
    /// End-of-sequence token text, e.g. `<|im_end|>`.
    pub eos_token: Option<String>,
    /// Whether encoding prepends bos, when the config says.
    pub add_bos_token: Option<bool>,
}

impl TokenizerConfig {
    /// Reads `tokenizer_config.json`. Token fields may be strings or `{"content": ...}` objects.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::io(path, "cannot read tokenizer config", &e))?;
        let value: Value = serde_json::from_str(&text)
            .map_err(|e| Error::new(path, ErrorKind::Malformed, format!("invalid JSON: {e}")))?;
        let token = |key: &str| match value.get(key) {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Object(o)) => o.get("content").and_then(Value::as_str).map(str::to_string),
            _ => None,
        };
        let chat_template = match value.get("chat_template") {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Array(named)) => named
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .and_then(|t| t.get("template"))
                .and_then(Value::as_str)
                .map(str::to_string),
            _ => None,
        };
        Ok(Self {
            chat_template,
            bos_token: token("bos_token"),
            eos_token: token("eos_token"),
            add_bos_token: value.get("add_bos_token").and_then(Value::as_bool),
        })
    }
}

/// Loads a `tokenizer.json`.
pub fn load_tokenizer(path: &Path) -> Result<Tokenizer> {
    if !path.is_file() {
        return Err(Error::new(
            path,
            ErrorKind::Missing,
            "tokenizer file not found",
        ));
    }
    Tokenizer::from_file(path).map_err(|e| {
        Error::new(
            path,
            ErrorKind::Tokenizer,
            format!("cannot load tokenizer: {e}"),
        )
    })
}
