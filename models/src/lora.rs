//! LoRA as Hugging Face PEFT defines it (`peft.LoraConfig`, `peft.tuners.lora.Linear`):
//!
//! ```text
//! y = x W^T + b + scale * (dropout(x) A^T) B^T      A: (r, in_features), B: (out_features, r)
//! scale = lora_alpha / r          (lora_alpha / sqrt(r) with use_rslora)
//! ```
//!
//! - [`LoraConfig`]: r, lora_alpha, target_modules (module names, or `all-linear`),
//!   lora_dropout, use_rslora, bias (only `none`).
//! - [`LoraTarget`]: one linear module of a model that an adapter can attach to
//!   ([`linear_targets`] lists them for the Llama family).
//! - [`LoraWeights`]: every A and B in one flat f32 buffer (llm.c style) with a range per
//!   tensor; gradients and optimizer state use the same layout.
//! - Initialisation as PEFT's `init_lora_weights=True`: A ~ kaiming_uniform(a = sqrt(5)), i.e.
//!   U(-1/sqrt(in), 1/sqrt(in)), B = 0 (so a fresh adapter leaves the model unchanged).
//! - [`LoraWeights::save_peft`] / [`LoraWeights::load_peft`]: PEFT's `adapter_model.safetensors`
//!   + `adapter_config.json`.

mod init;
mod peft;
mod select;
mod weights;

pub use peft::{
    adapter_config_json, ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, PEFT_FORMAT_VERSION,
};
pub use select::{linear_targets, select_targets, LINEAR_MODULES};
pub use weights::{LoraTensor, LoraWeights};

/// `target_modules`: PEFT's special value meaning every linear layer but the output head.
pub const ALL_LINEAR: &str = "all-linear";

/// PEFT's `LoraConfig`, restricted to what plain LoRA training uses.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    /// Rank r of A (r, in) and B (out, r). PEFT's default: 8.
    pub r: usize,
    /// alpha in the scale alpha / r. PEFT's default: 8.
    pub lora_alpha: f64,
    /// Module names (`q_proj`, `v_proj`, ... or a dotted suffix such as `self_attn.q_proj`),
    /// or the single entry [`ALL_LINEAR`]. PEFT's default for Llama: `q_proj`, `v_proj`.
    pub target_modules: Vec<String>,
    /// Dropout probability on the LoRA branch's input. PEFT's default: 0.
    pub lora_dropout: f64,
    /// Rank-stabilised LoRA: scale = alpha / sqrt(r).
    pub use_rslora: bool,
    /// Which biases train: only `none` is supported (PEFT's default).
    pub bias: String,
}

impl Default for LoraConfig {
    /// PEFT's defaults for a Llama-family model.
    fn default() -> Self {
        Self {
            r: 8,
            lora_alpha: 8.0,
            target_modules: vec!["q_proj".to_owned(), "v_proj".to_owned()],
            lora_dropout: 0.0,
            use_rslora: false,
            bias: "none".to_owned(),
        }
    }
}

impl LoraConfig {
    /// The factor on the LoRA branch: alpha / r, or alpha / sqrt(r) with rslora.
    pub fn scale(&self) -> f32 {
        let r = self.r as f64;
        let s = if self.use_rslora {
            self.lora_alpha / r.sqrt()
        } else {
            self.lora_alpha / r
        };
        s as f32
    }

    /// Checks the values PEFT would refuse, or that this implementation does not support.
    pub fn validate(&self) -> Result<(), String> {
        if self.r == 0 {
            return Err("lora r must be positive".to_owned());
        }
        if !self.lora_alpha.is_finite() {
            return Err(format!(
                "lora_alpha {} is not a finite number",
                self.lora_alpha
            ));
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return Err(format!(
                "lora_dropout {} must be in [0, 1)",
                self.lora_dropout
            ));
        }
        if self.bias != "none" {
            return Err(format!(
                "bias {:?} is not supported: only \"none\" (PEFT's default) trains LoRA weights alone",
                self.bias
            ));
        }
        if self.target_modules.is_empty() {
            return Err("target_modules is empty".to_owned());
        }
        Ok(())
    }
}

/// One linear module of a model that LoRA can adapt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoraTarget {
    /// Decoder layer index.
    pub layer: usize,
    /// Module name as in Hugging Face: `q_proj`, `k_proj`, `v_proj`, `o_proj`, `gate_proj`,
    /// `up_proj`, `down_proj`.
    pub module: String,
    /// Full module path in the Hugging Face model: `model.layers.0.self_attn.q_proj`.
    pub path: String,
    /// Columns of the weight W (out, in): the input size.
    pub in_features: usize,
    /// Rows of W: the output size.
    pub out_features: usize,
}
