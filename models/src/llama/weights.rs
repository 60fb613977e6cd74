//! One flat f32 store for every weight of a Llama-family model (llm.c's `ParameterTensors`):
//! a single allocation, and per tensor the range it occupies. Values are f32; a bf16 model
//! keeps bf16-representable values (rounded on load), so the same store serves both.

use std::ops::Range;

use ftrt_ops::dsl::{Prec, Rounding};

use super::LlamaError;
use crate::checkpoint::{StorageType, WeightSource};
use crate::config::ModelConfig;

/// The seven linear projections of a decoder layer (LoRA's targets), in PEFT's usual order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Proj {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Proj {
    /// All seven, in index order.
    pub const ALL: [Proj; 7] = [
        Proj::Q,
        Proj::K,
        Proj::V,
        Proj::O,
        Proj::Gate,
        Proj::Up,
        Proj::Down,
    ];

    /// The projections that read one input, in [`Proj::ALL`] order: q/k/v (the input norm's
    /// output), o (the attention output), gate/up (the post-attention norm's output), down
    /// (the activation). LoRA stacks the A's of a group into one GEMM.
    pub const INPUT_GROUPS: [&'static [Proj]; 4] = [
        &[Proj::Q, Proj::K, Proj::V],
        &[Proj::O],
        &[Proj::Gate, Proj::Up],
        &[Proj::Down],
    ];

    /// Position in [`Proj::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// Index of this projection's group in [`Proj::INPUT_GROUPS`].
    pub fn input_group(self) -> usize {
        match self {
            Proj::Q | Proj::K | Proj::V => 0,
            Proj::O => 1,
            Proj::Gate | Proj::Up => 2,
            Proj::Down => 3,
        }
    }

    /// PEFT's module name (`q_proj`, ..., `down_proj`).
    pub fn module(self) -> &'static str {
        match self {
            Proj::Q => "q_proj",
            Proj::K => "k_proj",
            Proj::V => "v_proj",
            Proj::O => "o_proj",
            Proj::Gate => "gate_proj",
            Proj::Up => "up_proj",
            Proj::Down => "down_proj",
        }
    }

    /// Hugging Face name of the module inside layer `layer`.
    pub fn hf_prefix(self, layer: usize) -> String {
        let block = match self {
            Proj::Q | Proj::K | Proj::V | Proj::O => "self_attn",
            _ => "mlp",
        };
        format!("model.layers.{layer}.{block}.{}", self.module())
    }

    /// (out_features, in_features) of this projection under `dims`.
    pub fn shape(self, d: &Dims) -> (usize, usize) {
        match self {
            Proj::Q => (d.q_dim(), d.hidden),
            Proj::K | Proj::V => (d.kv_dim(), d.hidden),
            Proj::O => (d.hidden, d.q_dim()),
            Proj::Gate | Proj::Up => (d.intermediate, d.hidden),
            Proj::Down => (d.hidden, d.intermediate),
        }
    }
}

/// The sizes every buffer of the model is derived from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dims {
    /// C: width of the residual stream.
    pub hidden: usize,
    /// I: width of the MLP's hidden layer.
    pub intermediate: usize,
    /// L: decoder layers.
    pub layers: usize,
    /// Hq: query heads.
    pub heads: usize,
    /// Hkv: key/value heads.
    pub kv_heads: usize,
    /// D: head dim.
    pub head_dim: usize,
    /// V: vocabulary.
    pub vocab: usize,
}

impl Dims {
    /// The dims of `config`.
    pub fn of(config: &ModelConfig) -> Self {
        Self {
            hidden: config.hidden_size,
            intermediate: config.intermediate_size,
            layers: config.num_hidden_layers,
            heads: config.num_attention_heads,
            kv_heads: config.num_key_value_heads,
            head_dim: config.head_dim,
            vocab: config.vocab_size,
        }
    }
    /// Hq * D.
    pub fn q_dim(&self) -> usize {
        self.heads * self.head_dim
    }
    /// Hkv * D.
    pub fn kv_dim(&self) -> usize {
        self.kv_heads * self.head_dim
    }
}

/// Ranges of one decoder layer's weights in [`WeightStore::data`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerWeights {
    /// input_layernorm.weight (C)
    pub input_norm: Range<usize>,
    /// Linear weights (out, in), indexed by [`Proj::index`].
    pub proj: [Range<usize>; 7],
    /// Optional biases (out), indexed by [`Proj::index`] (Qwen2's q/k/v, attention/mlp bias).
    pub bias: [Option<Range<usize>>; 7],
    /// q_norm.weight / k_norm.weight (D), Qwen3.
    pub q_norm: Option<Range<usize>>,
    pub k_norm: Option<Range<usize>>,
    /// post_attention_layernorm.weight (C)
    pub post_norm: Range<usize>,
}

/// Every weight of the model in one allocation.
#[derive(Debug, Clone)]
pub struct WeightStore {
    /// All values, f32 (bf16-representable when loaded for a bf16 model).
    pub data: Vec<f32>,
    /// embed_tokens.weight (V, C)
    pub embed: Range<usize>,
    pub layers: Vec<LayerWeights>,
    /// norm.weight (C)
    pub final_norm: Range<usize>,
    /// lm_head.weight (V, C); `None` with tied embeddings (the embedding is used).
    pub lm_head: Option<Range<usize>>,
}

impl WeightStore {
    /// The values of range `r`.
    pub fn get(&self, r: &Range<usize>) -> &[f32] {
        &self.data[r.clone()]
    }

    /// The LM head (V, C): lm_head.weight, or the embedding when tied.
    pub fn head(&self) -> &[f32] {
        self.get(self.lm_head.as_ref().unwrap_or(&self.embed))
    }

    /// Loads every weight of `config`'s architecture from `source`, checking shapes; values are
    /// rounded to bf16 when `rt` is a bf16 model.
    pub fn load(
        config: &ModelConfig,
        source: &WeightSource,
        rt: Rounding,
    ) -> Result<Self, LlamaError> {
        let d = Dims::of(config);
        let mut b = Builder {
            source,
            data: Vec::new(),
            prec: rt.t,
        };
        let embed = b.take("model.embed_tokens.weight", &[d.vocab, d.hidden])?;
        let mut layers = Vec::with_capacity(d.layers);
        for l in 0..d.layers {
            let p = |s: &str| format!("model.layers.{l}.{s}");
            let input_norm = b.take(&p("input_layernorm.weight"), &[d.hidden])?;
            let mut proj: [Range<usize>; 7] = Default::default();
            let mut bias: [Option<Range<usize>>; 7] = Default::default();
            for pr in Proj::ALL {
                let (out, inn) = pr.shape(&d);
                let prefix = pr.hf_prefix(l);
                proj[pr.index()] = b.take(&format!("{prefix}.weight"), &[out, inn])?;
                let wants_bias = match pr {
                    Proj::Q | Proj::K | Proj::V => config.qkv_bias,
                    Proj::O => config.o_proj_bias,
                    _ => config.mlp_bias,
                };
                if wants_bias {
                    bias[pr.index()] = Some(b.take(&format!("{prefix}.bias"), &[out])?);
                }
            }
            let (q_norm, k_norm) = if config.qk_norm {
                (
                    Some(b.take(&p("self_attn.q_norm.weight"), &[d.head_dim])?),
                    Some(b.take(&p("self_attn.k_norm.weight"), &[d.head_dim])?),
                )
            } else {
                (None, None)
            };
            let post_norm = b.take(&p("post_attention_layernorm.weight"), &[d.hidden])?;
            layers.push(LayerWeights {
                input_norm,
                proj,
                bias,
                q_norm,
                k_norm,
                post_norm,
            });
        }
        let final_norm = b.take("model.norm.weight", &[d.hidden])?;
        let lm_head = if config.tie_word_embeddings {
            None
        } else {
            Some(b.take("lm_head.weight", &[d.vocab, d.hidden])?)
        };
        Ok(Self {
            data: b.data,
            embed,
            layers,
            final_norm,
            lm_head,
        })
    }
}

impl WeightStore {
    /// Every tensor's Hugging Face name, range and shape, in layout order: the names
    /// [`Self::load`] reads (for writing a store as a checkpoint).
    pub fn hf_tensors(&self, config: &ModelConfig) -> Vec<(String, Range<usize>, Vec<usize>)> {
        let d = Dims::of(config);
        let mut v = vec![(
            "model.embed_tokens.weight".to_owned(),
            self.embed.clone(),
            vec![d.vocab, d.hidden],
        )];
        for (l, lw) in self.layers.iter().enumerate() {
            let p = |s: &str| format!("model.layers.{l}.{s}");
            v.push((
                p("input_layernorm.weight"),
                lw.input_norm.clone(),
                vec![d.hidden],
            ));
            for pr in Proj::ALL {
                let (out, inn) = pr.shape(&d);
                let prefix = pr.hf_prefix(l);
                v.push((
                    format!("{prefix}.weight"),
                    lw.proj[pr.index()].clone(),
                    vec![out, inn],
                ));
                if let Some(b) = &lw.bias[pr.index()] {
                    v.push((format!("{prefix}.bias"), b.clone(), vec![out]));
                }
            }
            for (name, r) in [("q_norm", &lw.q_norm), ("k_norm", &lw.k_norm)] {
                if let Some(r) = r {
                    v.push((
                        p(&format!("self_attn.{name}.weight")),
                        r.clone(),
                        vec![d.head_dim],
                    ));
                }
            }
            v.push((
                p("post_attention_layernorm.weight"),
                lw.post_norm.clone(),
                vec![d.hidden],
            ));
        }
        v.push((
            "model.norm.weight".to_owned(),
            self.final_norm.clone(),
            vec![d.hidden],
        ));
        if let Some(h) = &self.lm_head {
            v.push((
                "lm_head.weight".to_owned(),
                h.clone(),
                vec![d.vocab, d.hidden],
            ));
        }
        v
    }
}

struct Builder<'a> {
    source: &'a WeightSource,
    data: Vec<f32>,
    prec: Prec,
}

impl Builder<'_> {
    fn take(&mut self, name: &str, shape: &[usize]) -> Result<Range<usize>, LlamaError> {
        let info = self.source.info(name).ok_or_else(|| {
            LlamaError::Weights(format!("weight \"{name}\" is missing from the checkpoint"))
        })?;
        if info.storage == StorageType::Bnb4bit && info.shape.is_empty() {
            // The quant state gave no shape: reading the weight says what is wrong with it.
            self.source.to_f32(name).map_err(LlamaError::Load)?;
        }
        if info.shape != shape {
            return Err(LlamaError::Weights(format!(
                "weight \"{name}\" has shape {:?}, the config implies {shape:?}",
                info.shape
            )));
        }
        let values = self.source.to_f32(name).map_err(LlamaError::Load)?;
        let start = self.data.len();
        match self.prec {
            Prec::Bf16 => self
                .data
                .extend(values.iter().map(|&v| half::bf16::from_f32(v).to_f32())),
            Prec::F32 | Prec::Exact => self.data.extend_from_slice(&values),
        }
        Ok(start..self.data.len())
    }
}
