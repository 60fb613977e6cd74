//! Typed model configuration, parsed from a Hugging Face `config.json`.
//!
//! Supported architectures: Llama (3.x, with "llama3" rope scaling and tied embeddings),
//! Mistral, Qwen2/2.5 (q/k/v bias) and Qwen3 (q/k norm). Shape fields that no real config omits
//! are required; the others take the default of the matching `transformers` config class.

use std::path::Path;

use serde_json::{Map, Value};

use crate::errors::{Error, ErrorKind, Result};

/// Model family; selects the layer structure of the forward graph.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// `LlamaForCausalLM` (`model_type` "llama").
    Llama,
    /// `MistralForCausalLM` (`model_type` "mistral").
    Mistral,
    /// `Qwen2ForCausalLM` (`model_type` "qwen2"), Qwen2 and Qwen2.5: q/k/v projections carry a bias.
    Qwen2,
    /// `Qwen3ForCausalLM` (`model_type` "qwen3"): RMS norm on each head of q and k.
    Qwen3,
}

impl Architecture {
    /// Every supported architecture with its `model_type` and its `architectures` class name.
    pub const SUPPORTED: [(Architecture, &'static str, &'static str); 4] = [
        (Architecture::Llama, "llama", "LlamaForCausalLM"),
        (Architecture::Mistral, "mistral", "MistralForCausalLM"),
        (Architecture::Qwen2, "qwen2", "Qwen2ForCausalLM"),
        (Architecture::Qwen3, "qwen3", "Qwen3ForCausalLM"),
    ];

    /// The architecture whose `model_type` or class name is `name`.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::SUPPORTED
            .iter()
            .find(|(_, model_type, class)| *model_type == name || *class == name)
            .map(|(arch, _, _)| *arch)
    }

    /// "llama (LlamaForCausalLM), mistral (...), ..." for error messages.
    pub fn supported_list() -> String {
        Self::SUPPORTED
            .iter()
            .map(|(_, model_type, class)| format!("{model_type} ({class})"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// How rotary frequencies are rescaled for long contexts.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Llama 3.x (`rope_type` "llama3"): for each inverse frequency `f` with wavelength
    /// `w = 2π / f`, `w < original / high_freq_factor` keeps `f`, `w > original / low_freq_factor`
    /// uses `f / factor`, and wavelengths in between interpolate smoothly.
    Llama3 {
        /// Divisor of the low frequencies.
        factor: f64,
        /// Wavelength bound (as `original / low_freq_factor`) above which `factor` applies fully.
        low_freq_factor: f64,
        /// Wavelength bound (as `original / high_freq_factor`) below which frequencies stay.
        high_freq_factor: f64,
        /// Context length of the unscaled model.
        original_max_position_embeddings: usize,
    },
    /// Per-frequency divisors, `head_dim / 2` f32 values: inverse frequency `i` becomes
    /// `theta^(-2i/head_dim) / factors[i]`. This is how GGUF files carry llama3 scaling
    /// (tensor `rope_freqs.weight`).
    FreqFactors(Vec<f32>),
}

/// The typed configuration of a decoder-only transformer.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// Model family.
    pub arch: Architecture,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the gated MLP's hidden layer.
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads per layer.
    pub num_attention_heads: usize,
    /// Key/value heads per layer (grouped-query attention when fewer than query heads).
    pub num_key_value_heads: usize,
    /// Width of one attention head (q_proj has `num_attention_heads * head_dim` rows).
    pub head_dim: usize,
    /// Rows of the embedding and of the LM head.
    pub vocab_size: usize,
    /// Epsilon of every RMS norm.
    pub rms_norm_eps: f64,
    /// RoPE base.
    pub rope_theta: f64,
    /// RoPE frequency rescaling, if any.
    pub rope_scaling: Option<RopeScaling>,
    /// The LM head reuses the embedding matrix (no `lm_head.weight` stored).
    pub tie_word_embeddings: bool,
    /// Longest context the model was trained for.
    pub max_position_embeddings: usize,
    /// q_proj, k_proj and v_proj carry a bias (always for Qwen2; `attention_bias` otherwise).
    pub qkv_bias: bool,
    /// o_proj carries a bias (`attention_bias` for Llama and Qwen3).
    pub o_proj_bias: bool,
    /// gate/up/down projections carry a bias (Llama's `mlp_bias`).
    pub mlp_bias: bool,
    /// RMS norm over each head of q and of k before RoPE (Qwen3).
    pub qk_norm: bool,
    /// Attention window in tokens, when attention is local (Mistral's `sliding_window`).
    pub sliding_window: Option<usize>,
    /// Beginning-of-sequence token id.
    pub bos_token_id: Option<u32>,
    /// End-of-sequence token ids (`eos_token_id` may be one id or a list).
    pub eos_token_ids: Vec<u32>,
    /// Storage dtype of the checkpoint ("bfloat16", "float16", "float32"), if stated.
    pub torch_dtype: Option<String>,
}

impl ModelConfig {
    /// Reads and parses a `config.json` file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).map_err(|e| Error::io(path, "cannot read config", &e))?;
        Self::from_json_str(&text, path)
    }

    /// Parses the text of a `config.json`; `path` is only used in error messages.
    pub fn from_json_str(text: &str, path: &Path) -> Result<Self> {
        let value: Value = serde_json::from_str(text)
            .map_err(|e| Error::new(path, ErrorKind::Malformed, format!("invalid JSON: {e}")))?;
        let Value::Object(obj) = value else {
            return Err(Error::new(
                path,
                ErrorKind::Malformed,
                "config is not a JSON object",
            ));
        };
        Fields { obj: &obj, path }.parse()
    }
}

/// Typed access to the fields of one JSON object, with errors naming the file and field.
struct Fields<'a> {
    obj: &'a Map<String, Value>,
    path: &'a Path,
}

impl Fields<'_> {
    fn parse(&self) -> Result<ModelConfig> {
        let arch = self.arch()?;
        let hidden_size = self.req_usize("hidden_size")?;
        let num_attention_heads = self.req_usize("num_attention_heads")?;
        if num_attention_heads == 0 {
            return Err(self.bad("num_attention_heads", "must be positive"));
        }
        let head_dim = match arch {
            Architecture::Qwen3 => self.req_usize("head_dim")?,
            _ => self
                .opt_usize("head_dim")?
                .unwrap_or(hidden_size / num_attention_heads),
        };
        let num_key_value_heads = self
            .opt_usize("num_key_value_heads")?
            .unwrap_or(num_attention_heads);
        if num_key_value_heads == 0 || num_attention_heads % num_key_value_heads != 0 {
            return Err(self.bad(
                "num_key_value_heads",
                &format!("{num_key_value_heads} does not divide num_attention_heads {num_attention_heads}"),
            ));
        }
        let attention_bias = self.opt_bool("attention_bias")?.unwrap_or(false);
        let (qkv_bias, o_proj_bias) = match arch {
            Architecture::Qwen2 => (true, false),
            Architecture::Mistral => (false, false),
            Architecture::Llama | Architecture::Qwen3 => (attention_bias, attention_bias),
        };
        let mlp_bias = arch == Architecture::Llama && self.opt_bool("mlp_bias")?.unwrap_or(false);
        Ok(ModelConfig {
            arch,
            hidden_size,
            intermediate_size: self.req_usize("intermediate_size")?,
            num_hidden_layers: self.req_usize("num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            vocab_size: self.req_usize("vocab_size")?,
            rms_norm_eps: self.opt_f64("rms_norm_eps")?.unwrap_or(1e-6),
            rope_theta: self.opt_f64("rope_theta")?.unwrap_or(10_000.0),
            rope_scaling: self.rope_scaling()?,
            tie_word_embeddings: self.opt_bool("tie_word_embeddings")?.unwrap_or(false),
            max_position_embeddings: self.opt_usize("max_position_embeddings")?.unwrap_or(
                match arch {
                    Architecture::Llama => 2048,
                    Architecture::Mistral => 4096 * 32,
                    Architecture::Qwen2 | Architecture::Qwen3 => 32768,
                },
            ),
            qkv_bias,
            o_proj_bias,
            mlp_bias,
            qk_norm: arch == Architecture::Qwen3,
            sliding_window: self.sliding_window(arch)?,
            bos_token_id: self.opt_token_id("bos_token_id")?,
            eos_token_ids: self.eos_token_ids()?,
            torch_dtype: self.opt_str("torch_dtype")?.or(self.opt_str("dtype")?),
        })
    }

    /// From `model_type`, else from the first entry of `architectures`.
    fn arch(&self) -> Result<Architecture> {
        let name = match self.opt_str("model_type")? {
            Some(name) => name,
            None => match self.obj.get("architectures").and_then(|a| a.get(0)) {
                Some(Value::String(class)) => class.clone(),
                _ => return Err(self.missing("model_type")),
            },
        };
        Architecture::from_name(&name).ok_or_else(|| {
            Error::new(
                self.path,
                ErrorKind::Unsupported,
                format!(
                    "unsupported architecture \"{name}\"; supported: {}",
                    Architecture::supported_list()
                ),
            )
        })
    }

    fn rope_scaling(&self) -> Result<Option<RopeScaling>> {
        let scaling = match self.obj.get("rope_scaling") {
            None | Some(Value::Null) => return Ok(None),
            Some(Value::Object(scaling)) => scaling,
            Some(_) => return Err(self.bad("rope_scaling", "must be an object or null")),
        };
        let sub = Fields {
            obj: scaling,
            path: self.path,
        };
        let rope_type = match sub.opt_str("rope_type")? {
            Some(t) => t,
            None => sub.opt_str("type")?.unwrap_or_default(),
        };
        match rope_type.as_str() {
            "default" => Ok(None),
            "llama3" => Ok(Some(RopeScaling::Llama3 {
                factor: sub.req_f64("factor", "rope_scaling.")?,
                low_freq_factor: sub.req_f64("low_freq_factor", "rope_scaling.")?,
                high_freq_factor: sub.req_f64("high_freq_factor", "rope_scaling.")?,
                original_max_position_embeddings: sub
                    .opt_usize("original_max_position_embeddings")?
                    .ok_or_else(|| sub.missing("rope_scaling.original_max_position_embeddings"))?,
            })),
            other => Err(Error::new(
                self.path,
                ErrorKind::Unsupported,
                format!(
                    "unsupported rope_scaling rope_type \"{other}\"; supported: llama3, default"
                ),
            )),
        }
    }

    fn sliding_window(&self, arch: Architecture) -> Result<Option<usize>> {
        match arch {
            Architecture::Mistral => match self.obj.get("sliding_window") {
                None => Ok(Some(4096)),
                Some(Value::Null) => Ok(None),
                Some(_) => self.opt_usize("sliding_window"),
            },
            Architecture::Qwen2 | Architecture::Qwen3 => {
                if self.opt_bool("use_sliding_window")?.unwrap_or(false) {
                    Err(Error::new(
                        self.path,
                        ErrorKind::Unsupported,
                        "use_sliding_window: true (per-layer sliding windows) is not supported",
                    ))
                } else {
                    Ok(None)
                }
            }
            Architecture::Llama => Ok(None),
        }
    }

    fn eos_token_ids(&self) -> Result<Vec<u32>> {
        match self.obj.get("eos_token_id") {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| {
                    as_token_id(v)
                        .ok_or_else(|| self.bad("eos_token_id", "list entries must be token ids"))
                })
                .collect(),
            Some(v) => as_token_id(v)
                .map(|id| vec![id])
                .ok_or_else(|| self.bad("eos_token_id", "must be a token id or a list of them")),
        }
    }

    fn opt_token_id(&self, key: &str) -> Result<Option<u32>> {
        match self.obj.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => as_token_id(v)
                .map(Some)
                .ok_or_else(|| self.bad(key, "must be a token id")),
        }
    }

    fn req_usize(&self, key: &str) -> Result<usize> {
        self.opt_usize(key)?.ok_or_else(|| self.missing(key))
    }

    fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        match self.obj.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .map(Some)
                .ok_or_else(|| self.bad(key, "must be a non-negative integer")),
        }
    }

    /// A required float; `prefix` (e.g. "rope_scaling.") qualifies the field in errors.
    fn req_f64(&self, key: &str, prefix: &str) -> Result<f64> {
        self.opt_f64(key)?
            .ok_or_else(|| self.missing(&format!("{prefix}{key}")))
    }

    fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.obj.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.bad(key, "must be a number")),
        }
    }

    fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.obj.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| self.bad(key, "must be true or false")),
        }
    }

    fn opt_str(&self, key: &str) -> Result<Option<String>> {
        match self.obj.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(self.bad(key, "must be a string")),
        }
    }

    fn missing(&self, key: &str) -> Error {
        Error::new(
            self.path,
            ErrorKind::Missing,
            format!("missing required field \"{key}\""),
        )
    }

    fn bad(&self, key: &str, why: &str) -> Error {
        Error::new(
            self.path,
            ErrorKind::Malformed,
            format!("field \"{key}\" {why}"),
        )
    }
}

fn as_token_id(v: &Value) -> Option<u32> {
    v.as_u64().and_then(|n| u32::try_from(n).ok())
}
