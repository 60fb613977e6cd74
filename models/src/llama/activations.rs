//! The activation record of one forward pass over a packed batch of N tokens: everything the
//! LoRA backward reads, and nothing more (llm.c's `ActivationTensors`). C = hidden, I =
//! intermediate, Hq/Hkv = query/kv heads, D = head dim, r = LoRA rank.

/// Saved tensors of one decoder layer.
#[derive(Debug, Clone, Default)]
pub struct LayerActivations {
    /// (N, C) residual stream entering the layer (embedding for layer 0, else the previous
    /// layer's add_rms_norm output h).
    pub resid_in: Vec<f32>,
    /// (N, C) input_layernorm output: the q/k/v projections' input.
    pub ln1: Vec<f32>,
    /// (N) f32 rstd of that norm.
    pub rstd1: Vec<f32>,
    /// (N, Hq, D) q_proj output before the per-head q norm (Qwen3 only; else empty).
    pub q_pre: Vec<f32>,
    /// (N * Hq) rstd of the q norm (Qwen3 only).
    pub q_rstd: Vec<f32>,
    /// (N, Hkv, D) k_proj output before the per-head k norm (Qwen3 only).
    pub k_pre: Vec<f32>,
    /// (N * Hkv) rstd of the k norm (Qwen3 only).
    pub k_rstd: Vec<f32>,
    /// (N, Hq, D) queries after norm and RoPE: the attention's input.
    pub q: Vec<f32>,
    /// (N, Hkv, D) keys after norm and RoPE.
    pub k: Vec<f32>,
    /// (N, Hkv, D) values.
    pub v: Vec<f32>,
    /// (N, Hq * D) attention output: o_proj's input.
    pub att: Vec<f32>,
    /// (Hq, N) logsumexp of every query row's scaled scores (saved by the attention forward).
    pub lse: Vec<f32>,
    /// (N, C) residual stream after the attention block: h = resid_in + o_proj(att).
    pub resid_mid: Vec<f32>,
    /// (N, C) post_attention_layernorm output: gate/up's input.
    pub ln2: Vec<f32>,
    /// (N) rstd of that norm.
    pub rstd2: Vec<f32>,
    /// (N, I) gate_proj output.
    pub gate: Vec<f32>,
    /// (N, I) up_proj output.
    pub up: Vec<f32>,
    /// (N, I) T(silu(gate)) * up: down_proj's input.
    pub act: Vec<f32>,
    /// Per projection ([`super::Proj::index`]): (N, r) x A^T of the LoRA branch (empty when the
    /// projection has no adapter).
    pub lora_xa: [Vec<f32>; 7],
}

/// Saved tensors of the whole forward.
#[derive(Debug, Clone, Default)]
pub struct Activations {
    /// N: tokens.
    pub n_tokens: usize,
    /// (S + 1) prefix sums of the sequence lengths.
    pub cu_seqlens: Vec<i32>,
    /// (N) position of every token within its sequence.
    pub positions: Vec<i32>,
    /// (N, D) cos and sin rows of every token (rounded to the model dtype).
    pub cos: Vec<f32>,
    pub sin: Vec<f32>,
    /// One record per layer.
    pub layers: Vec<LayerActivations>,
    /// (N, C) residual stream after the last layer (input of the final norm).
    pub resid_final: Vec<f32>,
    /// (N, C) final norm output: the LM head's input.
    pub ln_f: Vec<f32>,
    /// (N) rstd of the final norm.
    pub rstd_f: Vec<f32>,
}
