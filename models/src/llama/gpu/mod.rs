//! The Llama family on the GPU (bf16), for LoRA training: the same math as the CPU model in
//! `Rounding::BF16` (see `../model.rs` and `../backward.rs`), launched op by op on one stream.
//!
//! Layout, llm.c style:
//! - weights: one bf16 buffer with the ranges of [`WeightStore`] (uploaded from the CPU model's
//!   store, or random for benchmarks);
//! - LoRA ([`GpuLora`]): f32 master A/B in [`LoraAdapter`]'s flat layout, a bf16 copy the GEMMs
//!   read, f32 gradients, AdamW m and v;
//! - activations ([`Acts`]): one allocation per tensor, sized once for a token budget; fields
//!   commented with their shapes. Per-layer gradient checkpointing
//!   ([`GpuLlama::set_kept_layers`]): the last k layers keep everything their backward reads;
//!   the others keep only their input residual and are recomputed, just before their backward,
//!   into one shared set of buffers ([`plan::kept_layers_within`] picks k for a memory budget).
//!   With [`GpuLlama::set_offload_residuals`] those input residuals, and the attention half's
//!   outputs (with q, k, v for layers wide enough, [`plan::checkpoint_qkv`]), live in small
//!   device rings and travel to pinned host memory and back on copy streams
//!   ([`layer_offload`]): the recompute then redoes only the MLP (and q, k, v when they stay).
//!   When the residuals' host rows would take more than half the host's memory (the 8B at
//!   524k tokens: 128 GiB), only the lowest layers' travel and the layers above keep theirs on
//!   the device ([`plan::resid_travel_cap`]). When the attention checkpoints do not fit the
//!   host (the 8B at 262k tokens: 4 GiB a layer), the attention outputs of as many layers as
//!   the host holds next to the residuals travel instead ([`plan::outputs_travel_cap`]), so
//!   those layers' recompute runs no attention kernel.
//!
//! Projections ([`lora_gemm`]): `xa = x A^T` once per group of projections reading one input
//! (q/k/v, gate/up: their A's stacked), `y = s xa B^T`, then `y += x W^T (+ b)` (beta = 1);
//! cuBLASLt, f32 accumulation, bf16 outputs. Backward with W frozen: `dB += s dy^T xa` and
//! `dxa = s dy B` per projection, `dA += dxa^T x` and `dx (+)= dxa A` per stack (f32 gradients,
//! beta = 1: they accumulate over micro-batches until zeroed), `dx += dy W`.
//! The cross-entropy runs over chunks of rows ([`plan::ce_rows`]): logits (rows, V) of one chunk
//! through the head GEMM, the CE kernel's forward (final lse), its backward in place, and
//! `dln_f[rows] = dlogits · head` (one bf16 rounding): never the full (N, V) logits.
//! 4-bit mode (QLoRA, [`GpuLlama::from_model_4bit`], [`GpuLlama::random_4bit`]): the seven
//! projection weights of every layer are stored as NF4 with double-quantized absmax, exactly
//! bitsandbytes' `quantize_4bit(blocksize=64, compress_statistics=True, quant_type="nf4")`
//! layout, quantized on the GPU at load from a bf16 upload of one weight at a time (the bf16
//! model never sits on the GPU whole); embeddings, norms, biases and lm_head stay bf16 in the
//! weight buffer. Before each base GEMM (forward `x W^T`, backward `dy W`) the projection is
//! dequantized into one shared bf16 scratch sized for the largest projection (up's and down's
//! into slots of their own when the MLP runs in several tiles, so a weight is dequantized once
//! a pass, not once a tile); everything runs on one stream, so the next dequantization cannot
//! overwrite a weight a GEMM still reads.
//! Attention: the varlen causal GQA kernels; head dims other than 64/128 (the tiny test
//! models) are zero-padded to 64 through exact selection GEMMs, with the softmax scale of the
//! true head dim.

pub mod decode;
mod embed_host;
mod graph_check;
mod layer_offload;
mod lora_gemm;
mod mlp_activation;
pub mod plan;
pub mod random_init;
pub mod selftest;
mod step_graph;
pub mod trainable;

use ftrt_ops::attention::{attention_backward, attention_forward, AttentionDims};
use ftrt_ops::{adamw, cross_entropy, embedding, nf4, norm, quant_prelude, rope};
use ftrt_runtime::cudarc::driver::{LaunchConfig, PushKernelArg};
use ftrt_runtime::rng::SplitMix64;
use ftrt_runtime::{CublasLt, DevPtr, DeviceBuffer, GemmDesc, GemmWorkspace, Gpu, PtxModule};
use half::bf16;
use std::cell::{Cell, RefCell};

use super::lora::{LoraAdapter, LoraStack};
use super::model::{inv_freq_of, Batch, LlamaModel};
use super::weights::{Dims, Proj, WeightStore};
use crate::bnb4bit::Nf4Parts;
use crate::checkpoint::WeightSource;
use crate::config::ModelConfig;
use layer_offload::LayerOffload;
use plan::ActSizes;
use step_graph::{StepGraphs, StepKey};

pub use decode::{GpuKvCache, GpuSteps};
pub use mlp_activation::LORA_IN_ACTIVATION_ENV;
pub use plan::{attention_forward_flops, check_batch, flop_estimate, weight_layout, KeepBf16};
pub use selftest::selftest_model;
pub use step_graph::CUDA_GRAPH_ENV;
pub use trainable::{Checkpointing, GpuPlacement, GpuTrainable};

/// Environment override of [`plan::checkpoint_qkv`]: `0` or `1` (see
/// [`GpuLlama::set_offload_residuals`]).
pub const CHECKPOINT_QKV_ENV: &str = "FTRT_CHECKPOINT_QKV";

/// Environment override of [`plan::GateUp::Auto`]: how many recomputed layers carry their gate
/// and up outputs through host memory (see [`GpuLlama::set_offload_residuals`]).
pub const GATE_UP_LAYERS_ENV: &str = "FTRT_GATE_UP_LAYERS";

/// How many recomputed layers keep their q, k and v on the GPU when the checkpoints travel
/// without them ([`plan::below_top_layers`]; see [`GpuLlama::set_offload_residuals`]).
pub const RESIDENT_QKV_LAYERS_ENV: &str = "FTRT_RESIDENT_QKV_LAYERS";

/// How many recomputed layers keep their attention output and lse on the GPU in `ftrt bench`
/// (see [`GpuLlama::set_resident_attention`]).
pub const RESIDENT_ATTENTION_LAYERS_ENV: &str = "FTRT_RESIDENT_ATTENTION_LAYERS";

/// Errors of the GPU model are one-line strings (context + cause).
pub type GpuResult<T> = Result<T, String>;

trait Ctx<T> {
    fn ctx(self, what: &str) -> GpuResult<T>;
}
impl<T, E: std::fmt::Display> Ctx<T> for Result<T, E> {
    fn ctx(self, what: &str) -> GpuResult<T> {
        self.map_err(|e| format!("{what}: {e}"))
    }
}

/// f32 -> bf16 cast (hand-written PTX, see cast.ptx).
static CAST: PtxModule = PtxModule {
    name: "ftrt_llama_gpu_cast",
    arch: "compute_80",
    ptx: include_str!("cast.ptx"),
    cuda_source: "y[i] = __float2bfloat16_rn(x[i]) (hand-written PTX)",
    cubins: &[],
};

/// y (n) bf16 = round-to-nearest-even of x (n) f32.
pub fn cast_f32_bf16(gpu: &Gpu, x: DevPtr<f32>, y: DevPtr<bf16>, n: usize) -> GpuResult<()> {
    if n == 0 {
        return Ok(());
    }
    let f = gpu
        .function(&CAST, "ftrt_cast_f32_bf16")
        .ctx("loading the cast kernel")?;
    let blocks = n.div_ceil(256).min(65535) as u32;
    let n64 = n as u64;
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(&x.addr);
    b.arg(&y.addr);
    b.arg(&n64);
    let cfg = LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: x holds n f32 and y n bf16 (caller's contract); the kernel touches [0, n) only.
    unsafe { b.launch(cfg) }.ctx("launching the cast kernel")?;
    Ok(())
}

/// What a forward over the loaded batch is for.
#[derive(Clone, Copy)]
enum Pass<'c> {
    /// Training or scoring: varlen causal attention over the batch.
    Train,
    /// Gradient checkpointing, in the backward: stops after the post-attention norm (the MLP
    /// is recomputed tile by tile as its backward runs).
    Recompute,
    /// Sparse residuals, in the backward: the whole layer again, as [`Pass::Recompute`] takes
    /// its attention, to rebuild the next layer's input residual ([`plan::skipped_residuals`]).
    Reforward,
    /// Generation, prompts: keys and values also stored into the cache (rows' slots and
    /// positions in the cache's row tables), attention over the batch itself.
    Prefill(&'c GpuKvCache),
    /// Generation, one token per sequence: its key and value stored, attention over the cache.
    Decode(&'c GpuKvCache),
}

/// Device buffers owned together; typed pointers into them.
struct Held {
    bufs: Vec<DeviceBuffer>,
    bytes: usize,
}

impl Held {
    /// A null pointer when `skip` (the tensor lives elsewhere), else [`Self::alloc`].
    fn alloc_unless<T>(&mut self, gpu: &Gpu, skip: bool, elems: usize) -> GpuResult<DevPtr<T>> {
        if skip {
            Ok(DevPtr::null())
        } else {
            self.alloc(gpu, elems)
        }
    }

    fn alloc<T>(&mut self, gpu: &Gpu, elems: usize) -> GpuResult<DevPtr<T>> {
        let bytes = (elems * std::mem::size_of::<T>()).max(256);
        let b = gpu
            .alloc(bytes)
            .ctx(&format!("allocating {bytes} bytes of GPU memory"))?;
        let p = b.ptr::<T>();
        self.bytes += bytes;
        self.bufs.push(b);
        Ok(p)
    }
}

/// Uploads `v` as bf16 to `dst` in chunks (no full bf16 host copy).
fn upload_bf16(gpu: &Gpu, dst: DevPtr<bf16>, v: &[f32]) -> GpuResult<()> {
    const CHUNK: usize = 1 << 24;
    for (i, c) in v.chunks(CHUNK).enumerate() {
        let h: Vec<bf16> = c.iter().map(|&x| bf16::from_f32(x)).collect();
        gpu.upload(dst.offset(i * CHUNK), &h)
            .ctx("uploading weights")?;
    }
    Ok(())
}

/// LoRA state on the GPU, in [`LoraAdapter`]'s flat layout.
pub struct GpuLora {
    /// Ranges of every A and B (its `data` is not kept in sync with the device).
    pub layout: LoraAdapter,
    /// Elements of the flat layout.
    pub len: usize,
    /// (len) f32 master weights.
    pub master: DevPtr<f32>,
    /// (len) bf16 copy the GEMMs read.
    pub bf16: DevPtr<bf16>,
    /// (len) f32 gradients (accumulated until [`GpuLlama::zero_grads`]).
    pub grad: DevPtr<f32>,
    /// (len) f32 AdamW moments.
    pub m: DevPtr<f32>,
    pub v: DevPtr<f32>,
    /// AdamW steps taken.
    pub step: u64,
    /// [layer][input group]: the adapted projections whose A's are stacked (see [`lora_gemm`]).
    stacks: Vec<[Option<LoraStack>; 4]>,
    /// [input group]: the most adapted members of the group in any layer (x A^T buffers are
    /// that many r wide).
    widths: [usize; 4],
    _held: Held,
}

/// Per-layer saved activations for a budget of N tokens (bf16 unless noted). Kept layers own
/// theirs; every recomputed layer aliases one shared set (see [`GpuLlama::set_kept_layers`]).
#[derive(Clone, Copy)]
struct LayerActs {
    /// (N, Hq * D) q_proj output before the q norm (Qwen3; else null).
    q_pre: DevPtr<bf16>,
    /// (N * Hq) f32 rstd of the q norm (Qwen3).
    q_rstd: DevPtr<f32>,
    /// (N, Hkv * D) k_proj output before the k norm (Qwen3).
    k_pre: DevPtr<bf16>,
    /// (N * Hkv) f32.
    k_rstd: DevPtr<f32>,
    /// (N, Hq, D) queries after norm + RoPE.
    q: DevPtr<bf16>,
    /// (N, Hkv, D) keys after norm + RoPE, values.
    k: DevPtr<bf16>,
    v: DevPtr<bf16>,
    /// (N, Hq * D) attention output (o_proj's input).
    att: DevPtr<bf16>,
    /// (Hq, N) f32 attention logsumexp.
    lse: DevPtr<f32>,
    /// (N, C) residual after attention; (N, C) the post-attention norm output (the MLP's
    /// input: in the shared set one MLP tile's rows, see [`GpuLlama::mlp_rows`]); (N) f32 its
    /// rstd.
    resid_mid: DevPtr<bf16>,
    ln2: DevPtr<bf16>,
    rstd2: DevPtr<f32>,
    /// (N, I) gate, up, and T(silu(gate)) * up (down_proj's input); in the set shared by the
    /// recomputed layers, one MLP tile's rows (see [`GpuLlama::mlp_rows`]).
    gate: DevPtr<bf16>,
    up: DevPtr<bf16>,
    act: DevPtr<bf16>,
    /// Per input group ([`Proj::INPUT_GROUPS`]): (N, widths[g] r) x A^T of its stack, member i
    /// in columns [i r, (i + 1) r) (null when none of the group is adapted).
    xa: [DevPtr<bf16>; 4],
}

/// Activations and scratch of one forward/backward (llm.c's ActivationTensors).
struct Acts {
    sizes: ActSizes,
    /// The step's inputs in one block ([`plan::StepInput`]), uploaded in one copy
    /// ([`GpuLlama::load_batch`]); the views below point into it.
    inputs: DevPtr<u32>,
    /// (N) i32 token ids, positions, targets; (N + 1) cu_seqlens.
    ids: DevPtr<i32>,
    pos: DevPtr<i32>,
    targets: DevPtr<i32>,
    cu: DevPtr<i32>,
    /// L + 1 residual streams (N, C): [0] the embedding, [l + 1] layer l's output. With
    /// residual offload, the recomputed layers' inputs alias the slots of `resid_offload`'s ring.
    resid: Vec<DevPtr<bf16>>,
    /// L + 1 norm outputs (N, C): [l] layer l's input norm, [L] the final norm; (N) f32 rstds.
    /// Recomputed layers' input norms alias one shared buffer.
    ln: Vec<DevPtr<bf16>>,
    rstd: Vec<DevPtr<f32>>,
    layers: Vec<LayerActs>,
    /// Scratch (N, C): projection outputs in the forward, the recompute and the re-runs of
    /// layers below skipped residuals. It is `dln`'s memory: those run at the start of a
    /// layer's backward, after the layer above's input norm backward has read dln and before
    /// this layer's MLP backward writes it.
    tmp_c: DevPtr<bf16>,
    /// (N, C) d loss / d residual stream, updated in place by each add + norm backward (its
    /// dx and dres outputs are equal, and each thread reads an element of dh before it writes
    /// it). It is the final norm output's memory, `ln[L]`, which nothing reads after the
    /// cross-entropy.
    dres: DevPtr<bf16>,
    /// (N, C) gradient into a norm output (dln1, dln2, dln_f).
    dln: DevPtr<bf16>,
    /// (rows of one MLP tile, I) dact, dgate, dup.
    dact: DevPtr<bf16>,
    dgate: DevPtr<bf16>,
    dup: DevPtr<bf16>,
    /// (N, Hq * D) datt, dq, dq_pre; (N, Hkv * D) dk, dv, dk_pre.
    /// - datt is `dln`'s memory (the larger of the two sizes): a layer's o_proj backward writes
    ///   datt after its post-attention norm backward has read dln, and its attention backward
    ///   has read datt before its q/k/v backward writes dln.
    /// - dq is the recomputed layers' shared resid_mid where [`plan::dq_in_resid_mid`] says: a
    ///   layer's post-attention norm backward has read resid_mid before its attention backward
    ///   writes dq, and its q/k/v backward has read dq before the next layer's recompute
    ///   writes resid_mid.
    datt: DevPtr<bf16>,
    dq: DevPtr<bf16>,
    dq_pre: DevPtr<bf16>,
    dk: DevPtr<bf16>,
    dv: DevPtr<bf16>,
    dk_pre: DevPtr<bf16>,
    /// (N, 3 r) dxa of the stack being differentiated.
    dxa: DevPtr<bf16>,
    /// (Hq * N) f32 attention-backward scratch.
    attn_scratch: DevPtr<f32>,
    /// 4-bit mode with the MLP in several tiles ([`plan::ActSizes::nf4_slots`]): (I, C) and
    /// (C, I) bf16, up's and down's dequantized weights (gate's goes to the model's scratch), so
    /// that a tile after the first dequantizes none of its three ([`GpuLlama::proj_weight`]);
    /// null otherwise.
    nf4_slots: [DevPtr<bf16>; 2],
    /// Padded attention operands (N, H, Dp) (null without padding).
    qp: DevPtr<bf16>,
    kp: DevPtr<bf16>,
    vp: DevPtr<bf16>,
    op: DevPtr<bf16>,
    dop: DevPtr<bf16>,
    dqp: DevPtr<bf16>,
    dkp: DevPtr<bf16>,
    dvp: DevPtr<bf16>,
    /// (D, Dp) padding selector.
    sel: DevPtr<bf16>,
    /// (ce_rows, V) logits of one cross-entropy chunk (dlogits in place).
    logits: DevPtr<bf16>,
    /// (N) f32 running lse, picked logit, d/d lse, d/d picked (the last two in `inputs`).
    ce_lse: DevPtr<f32>,
    ce_picked: DevPtr<f32>,
    ce_dlse: DevPtr<f32>,
    ce_dpicked: DevPtr<f32>,
    /// The offloads of the recomputed layers' input residuals and of their attention
    /// checkpoints ([`plan::attention_checkpoint`]), if on. Declared before `_held`: dropped
    /// first, they wait for their copies before the rings are freed.
    resid_offload: Option<LayerOffload>,
    attn_offload: Option<LayerOffload>,
    /// The gate and up outputs of [`plan::gate_up_layers`]' layers (pieces 0 and 1, (N, I)
    /// each), if any.
    gate_up_offload: Option<LayerOffload>,
    /// The attention outputs and lse ([`plan::attention_outputs`]) of every recomputed layer,
    /// when the attention checkpoints do not travel and the host holds some outputs (see
    /// [`plan::Offload::Checkpoints`]): a one-slot ring whose lowest members' travel.
    outputs_offload: Option<LayerOffload>,
    /// Whether the attention checkpoints carry q, k, v (and what the q/k norms read, and
    /// q/k/v's x A^T): the backward then recomputes no projection of the attention half.
    qkv_in_checkpoint: bool,
    /// The recomputed layers whose q, k, v (and x A^T, and what the q/k norms read) have device
    /// buffers of their own ([`plan::below_top_layers`]): their backward does not recompute
    /// them either.
    resident_qkv: Vec<usize>,
    /// The recomputed layers whose attention output and lse have device buffers of their own
    /// ([`GpuLlama::set_resident_attention`]): their recompute runs no attention kernel.
    resident_attention: Vec<usize>,
    /// The recomputed layers that store no input residual ([`plan::skipped_residuals`]): it
    /// aliases resid[L], and the backward rebuilds it by re-running the layer below.
    skipped_resid: Vec<usize>,
    /// The training step as CUDA graphs ([`step_graph`]); they bake in these buffers, so they
    /// go with them. A cell, so that a graph is captured or replayed while the step reads the
    /// model.
    step_graphs: RefCell<StepGraphs<StepKey>>,
    _held: Held,
}

/// One projection weight as NF4 with double-quantized absmax (bitsandbytes' layout).
#[derive(Clone, Copy)]
struct Nf4Weight {
    /// (N / 2) u8: two codes per byte, element 2i in the high nibble.
    packed: DevPtr<u8>,
    /// (N / 64) u8: block absmax minus `offset`, quantized with the signed dynamic map.
    absmax_q: DevPtr<u8>,
    /// (ceil(N / 64 / 256)) f32: absmax of each 256-block of the centred absmax.
    absmax2: DevPtr<f32>,
    /// Mean of the block absmax (bitsandbytes' `offset`).
    offset: f32,
    /// Elements (out * in); 0 for a projection kept bf16 ([`KeepBf16`]).
    n: usize,
}

impl Nf4Weight {
    /// A projection the 4-bit mode keeps in bf16 (in the weight buffer).
    const KEPT_BF16: Nf4Weight = Nf4Weight {
        packed: DevPtr::null(),
        absmax_q: DevPtr::null(),
        absmax2: DevPtr::null(),
        offset: 0.0,
        n: 0,
    };
}

/// State of the 4-bit mode.
struct Nf4Base {
    /// [layer][Proj::index].
    w: Vec<[Nf4Weight; 7]>,
    /// (256) f32 signed dynamic map (absmax codes), (16) f32 NF4 code.
    code2: DevPtr<f32>,
    code: DevPtr<f32>,
    /// (largest out * in) bf16: the dequantized weight of the GEMM in flight (up's and down's
    /// go to their own slots when the MLP runs in several tiles, [`Acts::nf4_slots`]); also
    /// the staging buffer of the bf16 upload while quantizing at load.
    scratch: DevPtr<bf16>,
    /// Its capacity in elements.
    scratch_len: usize,
    /// The (layer, projection) whose weight the scratch, up's slot and down's slot hold, as
    /// dequantized within the current pass ([`GpuLlama::proj_weight`]; each
    /// [`GpuLlama::forward_pass`] starts with none, so a pass, captured as a CUDA graph or not,
    /// dequantizes every weight at its first use).
    dequantized: Cell<[Option<(usize, Proj)>; 3]>,
    /// Projections uploaded as a bitsandbytes checkpoint stores them (not re-quantized).
    as_stored: usize,
}

/// A Llama-family decoder on the GPU, bf16 (or NF4 projection weights), LoRA-trainable.
pub struct GpuLlama<'g> {
    gpu: &'g Gpu,
    blas: CublasLt,
    ws: GemmWorkspace,
    /// The checkpoint's config and the sizes derived from it.
    pub config: ModelConfig,
    pub dims: Dims,
    eps: f32,
    /// Weight ranges in `weights` (no host data).
    layout: WeightStore,
    /// All weights, bf16 (in 4-bit mode all but the projections, see [`plan::compact_without_proj`]),
    /// at `weights + range.start`; with the embedding in host memory the buffer starts after
    /// the table's range ([`embed_host`]).
    weights: DevPtr<bf16>,
    /// The NF4 projection weights in 4-bit mode.
    nf4: Option<Nf4Base>,
    /// (P, D) bf16 RoPE tables for positions 0..P (P = max_tokens).
    cos: DevPtr<bf16>,
    sin: DevPtr<bf16>,
    max_tokens: usize,
    /// The longest sequence a batch holds (default: max_tokens): the checkpoint offload weighs
    /// a recomputed attention forward by it ([`plan::sparse_residuals_pay`]).
    max_seq_len: usize,
    /// LoRA rank the activation buffers were sized for.
    r_cap: usize,
    /// Layers whose activations the forward keeps (the last `kept_layers`); the others keep
    /// only their input residual and are recomputed in the backward.
    kept_layers: usize,
    /// What happens to the recomputed layers' checkpoints (input residuals, attention half).
    offload: plan::Offload,
    /// Rows per MLP tile ([`plan::MLP_TILE_ROWS`] unless set for tests).
    mlp_tile_rows: usize,
    /// Recomputed layers that keep their attention output and lse on the device
    /// ([`Self::set_resident_attention`]).
    resident_attention: usize,
    lora: Option<GpuLora>,
    acts: Option<Acts>,
    /// The batch of the last forward (its token count and cu_seqlens).
    last: Option<(usize, usize)>,
    /// The embedding table when it lives in pinned host memory ([`embed_host`]).
    embed_host: Option<ftrt_runtime::offload::PinnedHostBuffer>,
    /// Whether training and decode steps may run as CUDA graphs ([`Self::set_cuda_graphs`]),
    /// and how many training steps did.
    cuda_graphs: bool,
    graph_steps: usize,
    /// Whether the MLP's activation adds the LoRA terms of gate, up and down
    /// ([`Self::set_lora_in_activation`], [`mlp_activation`]).
    activation_lora: bool,
    /// The host image of a step's inputs, reused from step to step ([`Self::load_batch`]).
    input_image: Vec<u32>,
    _held: Held,
}

impl<'g> GpuLlama<'g> {
    /// Uploads the CPU model's weights (rounded to bf16) and sizes buffers for `max_tokens`
    /// tokens per micro-batch and LoRA rank up to `max_rank`.
    pub fn from_model(
        gpu: &'g Gpu,
        model: &LlamaModel,
        max_tokens: usize,
        max_rank: usize,
    ) -> GpuResult<Self> {
        let mut me = Self::empty(
            gpu,
            &model.config,
            &model.weights,
            max_tokens,
            max_rank,
            None,
        )?;
        if model.weights.data.len() != plan::layout_len(&me.layout) {
            return Err("the CPU model's weight store does not match its config".into());
        }
        upload_bf16(gpu, me.weights, &model.weights.data)?;
        me.finish_init()?;
        Ok(me)
    }

    /// [`Self::from_model`] in 4-bit mode (QLoRA): the projection weights, rounded to bf16, are
    /// uploaded one at a time into the scratch and quantized to NF4 there; the rest, and the
    /// projections `keep` names, are bf16. With the model's checkpoint as `source`, weights it
    /// stores double-quantized by bitsandbytes go up as stored instead (the same layout and
    /// code books: the GPU dequantizes them to the values the CPU model holds).
    pub fn from_model_4bit(
        gpu: &'g Gpu,
        model: &LlamaModel,
        max_tokens: usize,
        max_rank: usize,
        keep: &KeepBf16,
        source: Option<&WeightSource>,
    ) -> GpuResult<Self> {
        let host = &model.weights;
        if host.data.len() != plan::layout_len(&weight_layout(&model.config))
            || host.data.len() != plan::layout_len(host)
        {
            return Err("the CPU model's weight store does not match its config".into());
        }
        let mut me = Self::empty(gpu, &model.config, host, max_tokens, max_rank, Some(keep))?;
        let (_, pairs) = plan::compact_without_proj(host, keep);
        for (h, d) in pairs {
            upload_bf16(gpu, me.weights.offset(d.start), &host.data[h])?;
        }
        let tmp = me.absmax_tmp()?;
        let scratch = me.nf4.as_ref().expect("4-bit").scratch;
        for l in 0..me.dims.layers {
            for p in Proj::ALL.into_iter().filter(|&p| !keep.keeps(l, p)) {
                let name = format!("{}.weight", p.hf_prefix(l));
                let stored = match source {
                    Some(w) => w.nf4_parts(&name).map_err(|e| e.to_string())?,
                    None => None,
                };
                match stored {
                    Some(q) if me.takes_as_stored(l, p, &q) => me.upload_nf4(l, p, &q)?,
                    _ => {
                        let r = host.layers[l].proj[p.index()].clone();
                        upload_bf16(gpu, scratch, &host.data[r])?;
                        me.quantize_proj(l, p, scratch, tmp.ptr())?;
                    }
                }
            }
        }
        me.finish_init()?;
        Ok(me)
    }

    /// Random weights (HF init: normal(0, 0.02), norms 1) for benchmarks: a block of random
    /// values tiled over the weight buffer ([`random_init`]: the same values on the host).
    pub fn random(
        gpu: &'g Gpu,
        config: &ModelConfig,
        max_tokens: usize,
        max_rank: usize,
        seed: u64,
    ) -> GpuResult<Self> {
        Self::random_with(gpu, config, max_tokens, max_rank, seed, None)
    }

    /// [`Self::random`] in 4-bit mode: the same random block tiled over the scratch is quantized
    /// to NF4 for every projection but those `keep` names (the bf16 weights never exist whole
    /// on the GPU).
    pub fn random_4bit(
        gpu: &'g Gpu,
        config: &ModelConfig,
        max_tokens: usize,
        max_rank: usize,
        seed: u64,
        keep: &KeepBf16,
    ) -> GpuResult<Self> {
        Self::random_with(gpu, config, max_tokens, max_rank, seed, Some(keep))
    }

    fn random_with(
        gpu: &'g Gpu,
        config: &ModelConfig,
        max_tokens: usize,
        max_rank: usize,
        seed: u64,
        four_bit: Option<&KeepBf16>,
    ) -> GpuResult<Self> {
        let layout = weight_layout(config);
        let mut me = Self::empty(gpu, config, &layout, max_tokens, max_rank, four_bit)?;
        let total = plan::layout_len(&me.layout);
        let block = random_init::random_block(seed);
        if let Some((scratch, len)) = me.nf4.as_ref().map(|q| (q.scratch, q.scratch_len)) {
            let mut at = 0;
            while at < len {
                let k = block.len().min(len - at);
                gpu.upload(scratch.offset(at), &block[..k])
                    .ctx("uploading random weights")?;
                at += k;
            }
            let tmp = me.absmax_tmp()?;
            for l in 0..me.dims.layers {
                for p in Proj::ALL {
                    if !four_bit.is_some_and(|k| k.keeps(l, p)) {
                        me.quantize_proj(l, p, scratch, tmp.ptr())?;
                    }
                }
            }
            // The last double quantization reads `tmp`: done before it is freed.
            gpu.synchronize().ctx("quantizing weights")?;
        }
        let mut at = 0;
        while at < total {
            let k = block.len().min(total - at);
            gpu.upload(me.weights.offset(at), &block[..k])
                .ctx("uploading random weights")?;
            at += k;
        }
        for r in plan::norm_ranges(&me.layout) {
            gpu.upload(me.weights.offset(r.start), &vec![bf16::ONE; r.len()])
                .ctx("uploading norm weights")?;
        }
        me.finish_init()?;
        Ok(me)
    }

    fn empty(
        gpu: &'g Gpu,
        config: &ModelConfig,
        store: &WeightStore,
        max_tokens: usize,
        max_rank: usize,
        four_bit: Option<&KeepBf16>,
    ) -> GpuResult<Self> {
        let dims = Dims::of(config);
        if max_tokens == 0 {
            return Err("the token budget must be positive".into());
        }
        if dims.hidden == 0
            || dims.kv_heads == 0
            || !dims.heads.is_multiple_of(dims.kv_heads)
            || !dims.head_dim.is_multiple_of(2)
            || dims.head_dim > 128
        {
            return Err(format!(
                "unsupported shape for the GPU model: hidden {} heads {}/{} head_dim {}",
                dims.hidden, dims.heads, dims.kv_heads, dims.head_dim
            ));
        }
        let full = WeightStore {
            data: Vec::new(),
            embed: store.embed.clone(),
            layers: store.layers.clone(),
            final_norm: store.final_norm.clone(),
            lm_head: store.lm_head.clone(),
        };
        let mut held = Held {
            bufs: Vec::new(),
            bytes: 0,
        };
        let (layout, nf4) = if let Some(keep) = four_bit {
            let sizes: Vec<usize> = Proj::ALL
                .iter()
                .map(|p| {
                    let (o, i) = p.shape(&dims);
                    o * i
                })
                .collect();
            if let Some(p) = Proj::ALL.iter().find(|p| {
                let (o, i) = p.shape(&dims);
                !(o * i).is_multiple_of(64)
            }) {
                return Err(format!(
                    "4-bit mode needs projection sizes that are multiples of 64 ({} is not)",
                    p.module()
                ));
            }
            let code2 = held.alloc::<f32>(gpu, 256)?;
            gpu.upload(code2, &quant_prelude::dynamic_map_signed())
                .ctx("uploading the absmax code")?;
            let code = held.alloc::<f32>(gpu, 16)?;
            gpu.upload(code, &quant_prelude::nf4_code())
                .ctx("uploading the NF4 code")?;
            let scratch_len = sizes.iter().copied().max().unwrap_or(0);
            let scratch = held.alloc::<bf16>(gpu, scratch_len)?;
            let mut w = Vec::with_capacity(dims.layers);
            for l in 0..dims.layers {
                let mut row = Vec::with_capacity(7);
                for (p, &n) in Proj::ALL.iter().zip(&sizes) {
                    row.push(if keep.keeps(l, *p) {
                        Nf4Weight::KEPT_BF16
                    } else {
                        Nf4Weight {
                            packed: held.alloc(gpu, n / 2)?,
                            absmax_q: held.alloc(gpu, n / 64)?,
                            absmax2: held.alloc(gpu, (n / 64).div_ceil(256))?,
                            offset: 0.0,
                            n,
                        }
                    });
                }
                w.push(row.try_into().map_err(|_| "seven projections")?);
            }
            let base = Nf4Base {
                w,
                code2,
                code,
                scratch,
                scratch_len,
                dequantized: Cell::new([None; 3]),
                as_stored: 0,
            };
            (plan::compact_without_proj(&full, keep).0, Some(base))
        } else {
            (full, None)
        };
        let weights = held.alloc::<bf16>(gpu, plan::layout_len(&layout))?;
        let ws_bytes = ftrt_runtime::gemm::cublaslt::DEFAULT_WORKSPACE_BYTES;
        let ws_ptr = held.alloc::<u8>(gpu, ws_bytes)?;
        let blas = CublasLt::new(gpu).ctx("opening cuBLASLt")?;
        // RoPE tables (P, D) for positions 0..P, rounded to bf16 like the CPU model's rows.
        let inv = inv_freq_of(config);
        let d = dims.head_dim;
        let half = inv.len();
        let (mut cos, mut sin) = (
            Vec::with_capacity(max_tokens * d),
            Vec::with_capacity(max_tokens * d),
        );
        for p in 0..max_tokens {
            for i in 0..d {
                let a = p as f32 * inv[i % half];
                cos.push(bf16::from_f32(a.cos()));
                sin.push(bf16::from_f32(a.sin()));
            }
        }
        let cos_d = held.alloc::<bf16>(gpu, cos.len())?;
        let sin_d = held.alloc::<bf16>(gpu, sin.len())?;
        gpu.upload(cos_d, &cos).ctx("uploading RoPE tables")?;
        gpu.upload(sin_d, &sin).ctx("uploading RoPE tables")?;
        Ok(Self {
            gpu,
            blas,
            ws: GemmWorkspace {
                ptr: ws_ptr,
                bytes: ws_bytes,
            },
            config: config.clone(),
            dims,
            eps: config.rms_norm_eps as f32,
            layout,
            weights,
            nf4,
            cos: cos_d,
            sin: sin_d,
            max_tokens,
            max_seq_len: max_tokens,
            r_cap: max_rank,
            kept_layers: dims.layers,
            offload: plan::Offload::Off,
            mlp_tile_rows: plan::MLP_TILE_ROWS,
            resident_attention: 0,
            lora: None,
            acts: None,
            last: None,
            embed_host: None,
            cuda_graphs: step_graph::graphs_enabled(),
            graph_steps: 0,
            activation_lora: mlp_activation::lora_in_activation_enabled(),
            input_image: Vec::new(),
            _held: held,
        })
    }

    /// A temporary (largest out * in / 64) f32 buffer for the block absmax while quantizing.
    fn absmax_tmp(&self) -> GpuResult<DeviceBuffer> {
        let q = self.nf4.as_ref().ok_or("not in 4-bit mode")?;
        let bytes = (q.scratch_len / 64 * 4).max(256);
        self.gpu
            .alloc(bytes)
            .ctx(&format!("allocating {bytes} bytes of GPU memory"))
    }

    /// Quantizes the bf16 weight (out * in) at `src` into projection `p` of layer `l`: NF4 codes
    /// and f32 block absmax (into `absmax`), the absmax' mean on the host (f64 sum, as
    /// [`quant_prelude::absmax_mean`]), then the absmax double-quantized around it.
    fn quantize_proj(
        &mut self,
        l: usize,
        p: Proj,
        src: DevPtr<bf16>,
        absmax: DevPtr<f32>,
    ) -> GpuResult<()> {
        let gpu = self.gpu;
        let q = self.nf4.as_mut().ok_or("not in 4-bit mode")?;
        let w = &mut q.w[l][p.index()];
        let na = w.n / 64;
        nf4::nf4_quantize::forward(
            gpu,
            &nf4::nf4_quantize::Dims { N: w.n },
            src,
            w.packed,
            absmax,
        )
        .ctx("nf4 quantize")?;
        let mut am = vec![0f32; na];
        gpu.download(absmax, &mut am)
            .ctx("downloading the NF4 absmax")?;
        w.offset = quant_prelude::absmax_mean(&am);
        nf4::absmax_quantize::forward(
            gpu,
            &nf4::absmax_quantize::Dims { NA: na },
            w.offset,
            absmax,
            q.code2,
            w.absmax_q,
            w.absmax2,
        )
        .ctx("nf4 absmax double quantization")?;
        Ok(())
    }

    /// Whether the stored NF4 parts `q` of projection `p` in layer `l` fit its slot as they
    /// are: its element count, and the code books the GPU dequantizes with, bit for bit.
    fn takes_as_stored(&self, l: usize, p: Proj, q: &Nf4Parts) -> bool {
        let same = |a: &[f32], b: &[f32]| {
            a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
        };
        self.nf4
            .as_ref()
            .is_some_and(|b| b.w[l][p.index()].n == q.n)
            && same(&q.code2, &quant_prelude::dynamic_map_signed())
            && same(&q.code, &quant_prelude::nf4_code())
    }

    /// Uploads a checkpoint's NF4 parts of projection `p` in layer `l` as they are (checked by
    /// [`Self::takes_as_stored`]).
    fn upload_nf4(&mut self, l: usize, p: Proj, q: &Nf4Parts) -> GpuResult<()> {
        let gpu = self.gpu;
        let b = self.nf4.as_mut().ok_or("not in 4-bit mode")?;
        let w = &mut b.w[l][p.index()];
        gpu.upload(w.packed, &q.packed).ctx("uploading NF4 codes")?;
        gpu.upload(w.absmax_q, &q.absmax_q)
            .ctx("uploading NF4 absmax codes")?;
        gpu.upload(w.absmax2, &q.absmax2)
            .ctx("uploading the nested absmax")?;
        w.offset = q.offset;
        b.as_stored += 1;
        Ok(())
    }

    /// Projections whose NF4 weights came from the checkpoint as stored (4-bit mode built by
    /// [`Self::from_model_4bit`] from a bitsandbytes save); the others were quantized here.
    pub fn nf4_as_stored(&self) -> usize {
        self.nf4.as_ref().map_or(0, |b| b.as_stored)
    }

    /// The bf16 weight (out, in) of projection `p` in layer `l` for the next GEMM: its range of
    /// the weight buffer, or in 4-bit mode a dequantized copy: up's and down's in their own
    /// slots when the activations have them ([`Acts::nf4_slots`]), the others in the shared
    /// scratch. A buffer that already holds that weight in this pass is not dequantized again
    /// (so the MLP's tiles after the first dequantize nothing); else the dequantization is
    /// stream ordered after every GEMM that read the buffer's previous weight.
    fn proj_weight(&self, l: usize, p: Proj) -> GpuResult<DevPtr<bf16>> {
        let Some(q) = &self.nf4 else {
            return Ok(self.w(&self.layout.layers[l].proj[p.index()]));
        };
        let w = &q.w[l][p.index()];
        if w.n == 0 {
            return Ok(self.w(&self.layout.layers[l].proj[p.index()]));
        }
        let slots = self.acts.as_ref().map(|a| a.nf4_slots);
        let (i, dst) = match (p, slots) {
            (Proj::Up, Some([up, _])) if !up.is_null() => (1, up),
            (Proj::Down, Some([_, down])) if !down.is_null() => (2, down),
            _ => (0, q.scratch),
        };
        let mut held = q.dequantized.get();
        if held[i] != Some((l, p)) {
            nf4::dequantize_bf16(
                self.gpu, w.n, w.offset, w.packed, w.absmax_q, w.absmax2, q.code2, q.code, dst,
            )
            .ctx("nf4 dequantize")?;
            held[i] = Some((l, p));
            q.dequantized.set(held);
        }
        Ok(dst)
    }

    /// Forgets which weights the 4-bit mode's buffers hold, so that each is dequantized at its
    /// next use ([`Self::proj_weight`]).
    fn forget_dequantized(&self) {
        if let Some(q) = &self.nf4 {
            q.dequantized.set([None; 3]);
        }
    }

    /// Whether the projection weights are NF4 (4-bit mode).
    pub fn is_4bit(&self) -> bool {
        self.nf4.is_some()
    }

    /// The dequantized bf16 weight (out, in) of projection `p` in layer `l`, as f32 (tests).
    pub fn download_proj_weight(&self, l: usize, p: Proj) -> GpuResult<Vec<f32>> {
        let (out, inn) = p.shape(&self.dims);
        // a replayed CUDA graph leaves the buffers holding what the host did not see
        self.forget_dequantized();
        let ptr = self.proj_weight(l, p)?;
        let mut h = vec![bf16::ZERO; out * inn];
        self.gpu
            .download(ptr, &mut h)
            .ctx("downloading a projection weight")?;
        Ok(h.into_iter().map(|x| x.to_f32()).collect())
    }

    fn finish_init(&mut self) -> GpuResult<()> {
        self.gpu.synchronize().ctx("after uploading weights")
    }

    /// Per-layer gradient checkpointing: the forward keeps every saved activation of the last
    /// `k` layers (clamped to L) and only the input residual of the others, which the backward
    /// recomputes (input norm + the layer's attention block, then the MLP one row tile at a
    /// time) just before it differentiates them, into one shared set of buffers (its MLP
    /// buffers one tile's). `k = L` (the default) recomputes nothing; `k = 0` holds one layer's
    /// activations. Changing it frees the activation buffers (reallocated at the next batch).
    /// [`plan::kept_layers_within`] picks `k` for a budget.
    pub fn set_kept_layers(&mut self, k: usize) {
        let k = k.min(self.dims.layers);
        if k != self.kept_layers {
            self.kept_layers = k;
            self.acts = None;
        }
    }

    /// Rows per MLP tile (default [`plan::MLP_TILE_ROWS`]); the model selftest sets a few rows
    /// so that the fixtures' small batches run in several tiles. Frees the activation buffers.
    pub fn set_mlp_tile_rows(&mut self, rows: usize) {
        let rows = rows.max(1);
        if rows != self.mlp_tile_rows {
            self.mlp_tile_rows = rows;
            self.acts = None;
        }
    }

    /// The longest sequence a batch will hold (clamped to 1..=the token budget; default: the
    /// budget, one sequence). Set it before [`Self::set_offload_residuals`], which weighs a
    /// recomputed attention forward by it.
    pub fn set_max_seq_len(&mut self, seq: usize) {
        self.max_seq_len = seq.clamp(1, self.max_tokens.max(1));
    }

    /// Layers whose activations the forward keeps (see [`Self::set_kept_layers`]).
    pub fn kept_layers(&self) -> usize {
        self.kept_layers
    }

    /// Checkpoint offload (off by default): the input residuals (N, C) of the recomputed layers
    /// (see [`Self::set_kept_layers`]), and their attention checkpoints
    /// ([`plan::attention_checkpoint`]), live in rings of [`plan::resid_ring`] device slots (one
    /// more while gate/up sets travel) instead of one buffer per layer; the forward copies each set
    /// a later layer overwrites to pinned host memory on a copy stream, the backward prefetches it
    /// on another one while the layer above is differentiated (see [`layer_offload`]). The
    /// recompute then redoes ln2 and the MLP (gate, up, the activation), and q, k, v unless the
    /// checkpoints carry them too ([`plan::checkpoint_qkv`] decides by the layer's width;
    /// `FTRT_CHECKPOINT_QKV=0|1` overrides it), not the attention and o_proj. A few recomputed
    /// layers' gate and up outputs travel too when the forward's copies leave time for them and the
    /// batch is one MLP tile ([`plan::gate_up_layers`]; `FTRT_GATE_UP_LAYERS=k` sets how many):
    /// their recompute runs no projection at all. Kept layers' activations and the last layer's
    /// output stay on the device; so do the input residuals of the recomputed layers above the
    /// lowest [`plan::resid_travel_cap`] ones, when host memory holds no more (read now); and when
    /// the attention checkpoints do not fit the host, the attention outputs of the lowest
    /// [`plan::outputs_travel_cap`] layers travel instead, and where that pays at the longest
    /// sequence ([`Self::set_max_seq_len`], [`plan::sparse_min_gain`]) some layers (at most every
    /// other one, no more than the host needs) store no input residual (see
    /// [`plan::Offload::Checkpoints`]). Changing it frees the activation buffers (reallocated at
    /// the next batch).
    pub fn set_offload_residuals(&mut self, on: bool) {
        let qkv = match std::env::var(CHECKPOINT_QKV_ENV).as_deref() {
            Ok("0") => false,
            Ok("1") => true,
            _ => plan::checkpoint_qkv(&self.dims, self.config.qk_norm),
        };
        let gate_up = match std::env::var(GATE_UP_LAYERS_ENV).map(|v| v.parse::<usize>()) {
            Ok(Ok(k)) => plan::GateUp::Layers(k),
            _ => plan::GateUp::Auto,
        };
        let resident_qkv = std::env::var(RESIDENT_QKV_LAYERS_ENV)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let available = ftrt_runtime::offload::available_host_memory();
        let (n, seq) = (self.max_tokens, self.max_seq_len);
        self.set_offload(if on {
            plan::Offload::for_host(
                &self.dims,
                (n, seq),
                available,
                (qkv, gate_up, resident_qkv),
            )
        } else {
            plan::Offload::Off
        });
    }

    /// With checkpoint offload whose checkpoints travel without q, k, v: the most recomputed
    /// layers ([`plan::below_top_layers`]) whose q, k, v fit next to everything else when
    /// the model may hold `budget` bytes in all (as [`Self::kept_layers_for_budget`] counts
    /// them, for the kept layers set now); 0 otherwise. `--keep-layers auto` spends what whole
    /// layers leave of the budget on them.
    pub fn resident_qkv_for_budget(&self, budget: usize) -> usize {
        let offload @ plan::Offload::Checkpoints { qkv: false, .. } = self.offload else {
            return 0;
        };
        let Some(budget) = self.activation_budget(budget) else {
            return 0;
        };
        let bytes = |layers| self.planned_activation_bytes(offload.with_resident_qkv(layers));
        let recomputed = self.dims.layers - self.kept_layers.min(self.dims.layers);
        (0..recomputed)
            .rev()
            .find(|&k| bytes(k) <= budget)
            .unwrap_or(0)
    }

    /// Sets how many recomputed layers keep q, k, v on the GPU (see
    /// [`plan::Offload::Checkpoints`]); nothing without checkpoint offload.
    pub fn set_resident_qkv(&mut self, layers: usize) {
        self.set_offload(self.offload.with_resident_qkv(layers));
    }

    /// The recomputed layers whose q, k, v stay on the GPU in the allocated activations (see
    /// [`plan::below_top_layers`]; none before the first batch).
    pub fn resident_qkv_layers(&self) -> Vec<usize> {
        self.acts
            .as_ref()
            .map_or(Vec::new(), |a| a.resident_qkv.clone())
    }

    /// How many recomputed layers should keep their attention outputs on the GPU when the model
    /// may hold `budget` bytes in all (as [`Self::kept_layers_for_budget`] counts them, for the
    /// kept layers and checkpoint offload set now): [`plan::resident_attention_within`], 0 for
    /// short sequences. `--keep-layers auto` and `ftrt train`'s automatic plan set it.
    pub fn resident_attention_for_budget(&self, budget: usize) -> usize {
        let Some(budget) = self.activation_budget(budget) else {
            return 0;
        };
        let shapes = (self.config.qk_norm, self.stack_widths());
        let d = &self.dims;
        let (s, plan) = (self.act_sizes(), (self.kept_layers, self.offload));
        plan::resident_attention_within(d, &s, shapes, plan, self.max_seq_len, budget)
    }

    /// How many recomputed layers keep their attention output (N, Hq D) and log-sum-exp on the
    /// device from the forward to their backward, whose recompute then runs no attention
    /// kernel: the highest below the highest recomputed layer ([`plan::below_top_layers`]; it
    /// recomputes nothing anyway). For long sequences whose attention checkpoints do not fit
    /// the host (the 8B at 262k tokens: 2 GiB a layer against ~1 s of attention forward);
    /// with any, no attention checkpoint travels, only the attention outputs of layers below
    /// them (see [`plan::Offload::Checkpoints`]). [`RESIDENT_ATTENTION_LAYERS_ENV`] sets it
    /// in `ftrt bench`. Changing it frees the activation buffers.
    pub fn set_resident_attention(&mut self, layers: usize) {
        if layers != self.resident_attention {
            self.resident_attention = layers;
            self.acts = None;
        }
    }

    /// How many recomputed layers are set to keep their attention outputs on the GPU (see
    /// [`Self::set_resident_attention`]).
    pub fn resident_attention(&self) -> usize {
        self.resident_attention
    }

    /// The recomputed layers whose attention output and lse stay on the GPU in the allocated
    /// activations (see [`Self::set_resident_attention`]; none before the first batch).
    pub fn resident_attention_layers(&self) -> Vec<usize> {
        self.acts
            .as_ref()
            .map_or(Vec::new(), |a| a.resident_attention.clone())
    }

    /// [`Self::set_offload_residuals`] with the checkpoints' q, k, v chosen by the caller.
    pub fn set_offload(&mut self, offload: plan::Offload) {
        if offload != self.offload {
            self.offload = offload;
            self.acts = None;
        }
    }

    /// Whether the allocated activations' attention checkpoints carry q, k, v (see
    /// [`Self::set_offload_residuals`]; false before the first batch, without offload, or when
    /// host memory was too short for them).
    pub fn checkpoints_carry_qkv(&self) -> bool {
        self.acts.as_ref().is_some_and(|a| a.qkv_in_checkpoint)
    }

    /// The layers whose gate and up outputs travel through host memory in the allocated
    /// activations (see [`Self::set_offload_residuals`]; none before the first batch).
    pub fn gate_up_offloaded(&self) -> Vec<usize> {
        let o = self.acts.as_ref().and_then(|a| a.gate_up_offload.as_ref());
        o.map_or(Vec::new(), |o| o.members().to_vec())
    }

    /// The layers whose attention outputs travel through host memory in the allocated
    /// activations (see [`plan::Offload::Checkpoints`]; none before the first batch).
    pub fn outputs_offloaded(&self) -> Vec<usize> {
        let o = self.acts.as_ref().and_then(|a| a.outputs_offload.as_ref());
        o.map_or(Vec::new(), |o| o.travelling())
    }

    /// The recomputed layers that store no input residual in the allocated activations (see
    /// [`plan::sparse_skips`]; none before the first batch).
    pub fn skipped_residuals(&self) -> Vec<usize> {
        self.acts
            .as_ref()
            .map_or(Vec::new(), |a| a.skipped_resid.clone())
    }

    /// Whether checkpoint offload is on (see [`Self::set_offload_residuals`]).
    pub fn offload_residuals(&self) -> bool {
        self.offload != plan::Offload::Off
    }

    /// The most layers whose activations can be kept (see [`Self::set_kept_layers`]) when the
    /// model may hold `budget` bytes of GPU memory in all, its weights, tables, workspace and
    /// LoRA state (allocated by now) included; `None` when even recomputing every layer does
    /// not fit. Call after [`Self::set_lora`] and [`Self::set_offload_residuals`] (the ring
    /// counts, the pinned host memory does not).
    pub fn kept_layers_for_budget(&self, budget: usize) -> Option<usize> {
        plan::kept_layers_within(
            &self.dims,
            |kept| self.act_sizes_for(kept),
            (self.config.qk_norm, self.stack_widths()),
            self.offload,
            self.activation_budget(budget)?,
        )
    }

    /// What `budget` bytes of GPU memory leave for activations once the weights, tables,
    /// workspace and LoRA state (allocated by now) are placed; `None` when they do not fit.
    fn activation_budget(&self, budget: usize) -> Option<usize> {
        let lora = self.lora.as_ref().map_or(0, |g| g._held.bytes);
        budget.checked_sub(self._held.bytes + lora)
    }

    /// The activation sizes of the current settings (token budget, rank, kept layers, MLP
    /// tiles, 4-bit mode).
    fn act_sizes(&self) -> ActSizes {
        self.act_sizes_for(self.kept_layers)
    }

    /// [`Self::act_sizes`] with `kept` layers kept.
    fn act_sizes_for(&self, kept: usize) -> ActSizes {
        let d = &self.dims;
        let logits = plan::logit_budget(kept, d.layers);
        ActSizes::with_mlp_rows(d, self.max_tokens, self.r(), logits, self.mlp_tile_rows)
            .with_nf4_slots(d, self.nf4.is_some())
    }

    /// [`plan::ActSizes::bytes`] of the current settings with the recomputed layers'
    /// checkpoints as `offload` says.
    fn planned_activation_bytes(&self, offload: plan::Offload) -> usize {
        let (qk, widths) = (self.config.qk_norm, self.stack_widths());
        let (kept, attention) = (self.kept_layers, self.resident_attention);
        self.act_sizes()
            .bytes(&self.dims, qk, widths, kept, offload, attention)
    }

    /// Adapted projections in each input group's widest stack (the (N, r) x A^T buffers of a
    /// layer).
    fn stack_widths(&self) -> [usize; 4] {
        self.lora.as_ref().map_or([0; 4], |g| g.widths)
    }

    /// Activation bytes on the device: (allocated for the current settings, if allocated;
    /// what [`plan::ActSizes::bytes`] plans for them). Tests hold the plan to the allocation.
    pub fn activation_bytes(&self) -> (Option<usize>, usize) {
        let planned = self.planned_activation_bytes(self.offload);
        (self.acts.as_ref().map(|a| a._held.bytes), planned)
    }

    fn is_kept(&self, l: usize) -> bool {
        l + self.kept_layers >= self.dims.layers
    }

    /// The token budget per micro-batch.
    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    /// Bytes of GPU memory held (weights, NF4 weights and their bf16 scratch in 4-bit mode,
    /// tables, LoRA, activations, workspace).
    pub fn held_bytes(&self) -> usize {
        self._held.bytes
            + self.lora.as_ref().map_or(0, |l| l._held.bytes)
            + self.acts.as_ref().map_or(0, |a| a._held.bytes)
    }

    fn w(&self, r: &std::ops::Range<usize>) -> DevPtr<bf16> {
        self.weights.offset(r.start)
    }

    fn head(&self) -> DevPtr<bf16> {
        self.w(self.layout.lm_head.as_ref().unwrap_or(&self.layout.embed))
    }

    /// The adapter on the GPU, if any.
    pub fn lora(&self) -> Option<&GpuLora> {
        self.lora.as_ref()
    }

    /// Sets the adapter: allocates its state when the layout changes (and the activations
    /// that depend on it), uploads A and B as the f32 master and the bf16 copy. Gradients and
    /// AdamW state are zeroed when the state is (re)allocated.
    pub fn set_lora(&mut self, ad: &LoraAdapter) -> GpuResult<()> {
        if ad.r == 0 || ad.r > self.r_cap {
            return Err(format!(
                "LoRA rank {} outside 1..={} the GPU model was sized for",
                ad.r, self.r_cap
            ));
        }
        if ad.slots.len() != self.dims.layers {
            return Err(format!(
                "adapter has {} layers, the model {}",
                ad.slots.len(),
                self.dims.layers
            ));
        }
        for (l, row) in ad.slots.iter().enumerate() {
            for p in Proj::ALL {
                if let Some(s) = &row[p.index()] {
                    let (out, inn) = p.shape(&self.dims);
                    if s.a.len() != ad.r * inn
                        || s.b.len() != out * ad.r
                        || s.a.end > ad.data.len()
                        || s.b.end > ad.data.len()
                    {
                        return Err(format!(
                            "adapter slot of layer {l} {} has the wrong size",
                            p.module()
                        ));
                    }
                }
            }
        }
        let same = self.lora.as_ref().is_some_and(|g| {
            g.layout.slots == ad.slots && g.layout.r == ad.r && g.len == ad.data.len()
        });
        if !same {
            let stacks = (0..self.dims.layers)
                .map(|l| -> GpuResult<[Option<LoraStack>; 4]> {
                    let mut row: [Option<LoraStack>; 4] = Default::default();
                    for (g, st) in row.iter_mut().enumerate() {
                        *st = ad.stack(l, g)?;
                    }
                    Ok(row)
                })
                .collect::<GpuResult<Vec<_>>>()?;
            let mut widths = [0; 4];
            for (g, w) in widths.iter_mut().enumerate() {
                *w = stacks
                    .iter()
                    .filter_map(|row| row[g].as_ref().map(|st| st.members.len()))
                    .max()
                    .unwrap_or(0);
            }
            self.lora = None;
            self.acts = None;
            let gpu = self.gpu;
            let mut held = Held {
                bufs: Vec::new(),
                bytes: 0,
            };
            let len = ad.data.len();
            let master = held.alloc::<f32>(gpu, len)?;
            let bf = held.alloc::<bf16>(gpu, len)?;
            let grad = held.alloc::<f32>(gpu, len)?;
            let m = held.alloc::<f32>(gpu, len)?;
            let v = held.alloc::<f32>(gpu, len)?;
            for p in [grad, m, v] {
                gpu.memset_zero(p.cast(), len * 4)
                    .ctx("zeroing LoRA state")?;
            }
            let layout = LoraAdapter {
                r: ad.r,
                scale: ad.scale,
                data: Vec::new(),
                slots: ad.slots.clone(),
            };
            self.lora = Some(GpuLora {
                layout,
                len,
                master,
                bf16: bf,
                grad,
                m,
                v,
                step: 0,
                stacks,
                widths,
                _held: held,
            });
        }
        let g = self.lora.as_mut().expect("set above");
        g.layout.scale = ad.scale;
        self.gpu
            .upload(g.master, &ad.data)
            .ctx("uploading LoRA weights")?;
        cast_f32_bf16(self.gpu, g.master, g.bf16, g.len)?;
        self.gpu.synchronize().ctx("uploading LoRA weights")
    }

    /// Zeroes the LoRA gradients (call before the first micro-batch of an optimizer step).
    pub fn zero_grads(&mut self) -> GpuResult<()> {
        if let Some(g) = &self.lora {
            self.gpu
                .memset_zero(g.grad.cast(), g.len * 4)
                .ctx("zeroing LoRA gradients")?;
        }
        Ok(())
    }

    /// The LoRA gradients, in the adapter's layout.
    pub fn download_grads(&self) -> GpuResult<LoraAdapter> {
        let g = self.lora.as_ref().ok_or("no adapter is set")?;
        let mut data = vec![0f32; g.len];
        self.gpu
            .download(g.grad, &mut data)
            .ctx("downloading LoRA gradients")?;
        Ok(LoraAdapter {
            data,
            ..g.layout.clone()
        })
    }

    /// The LoRA master weights, in the adapter's layout.
    pub fn download_lora(&self) -> GpuResult<LoraAdapter> {
        let g = self.lora.as_ref().ok_or("no adapter is set")?;
        let mut data = vec![0f32; g.len];
        self.gpu
            .download(g.master, &mut data)
            .ctx("downloading LoRA weights")?;
        Ok(LoraAdapter {
            data,
            ..g.layout.clone()
        })
    }

    /// One AdamW step (torch.optim.AdamW semantics) on the GPU over every LoRA weight (f32
    /// master, m, v), reading the accumulated gradients as they are (gradients of the mean
    /// loss), then refreshes the bf16 copy with the f32 -> bf16 cast kernel.
    pub fn adamw_step(
        &mut self,
        lr: f32,
        weight_decay: f32,
        beta1: f32,
        beta2: f32,
        eps: f32,
    ) -> GpuResult<()> {
        let gpu = self.gpu;
        let g = self.lora.as_mut().ok_or("no adapter is set")?;
        g.step += 1;
        let t = g.step as i32;
        let step_size = lr / (1.0 - beta1.powi(t));
        let bc2 = (1.0 - beta2.powi(t)).sqrt();
        adamw::adamw::forward(
            gpu,
            &adamw::adamw::Dims { N: g.len },
            lr,
            weight_decay,
            beta1,
            beta2,
            eps,
            step_size,
            bc2,
            g.master,
            g.grad,
            g.m,
            g.v,
        )
        .ctx("adamw")?;
        cast_f32_bf16(gpu, g.master, g.bf16, g.len)
    }

    /// Allocates the activations for the current settings (a no-op while they are allocated;
    /// the first batch calls it too): with checkpoint offload this pins the host rows, tens of
    /// GiB at long sequences, which a caller timing its first step keeps out of the time by
    /// calling it first.
    pub fn allocate_activations(&mut self) -> GpuResult<()> {
        if self.acts.is_some() {
            return Ok(());
        }
        let gpu = self.gpu;
        let d = self.dims;
        let r = self.r();
        let s = self.act_sizes();
        let qk = self.config.qk_norm;
        let n = s.n;
        let mut h = Held {
            bufs: Vec::new(),
            bytes: 0,
        };
        let null = DevPtr::<bf16>::null();
        let nullf = DevPtr::<f32>::null();
        // `rows`: rows of ln2, gate, up and act (a kept layer's N, or one MLP tile's). With
        // `ring` Some(qkv), the attention checkpoint's tensors (with q, k, v when `qkv`) are
        // left null: each recomputed layer's point into its slot of the attention offload's ring.
        let offloading =
            self.offload != plan::Offload::Off && (0..d.layers).any(|l| !self.is_kept(l));
        let widths = self.stack_widths();
        let (g_qkv, g_o) = (Proj::Q.input_group(), Proj::O.input_group());
        let (g_gu, g_down) = (Proj::Gate.input_group(), Proj::Down.input_group());
        // With `outputs`, the attention output and lse are left null: each recomputed layer's
        // point into the attention outputs' ring.
        let layer_acts = |h: &mut Held, rows: usize, ring: Option<bool>, outputs: bool| {
            let mlp = rows * d.intermediate;
            let in_ring = ring.is_some();
            let qkv_in_ring = ring == Some(true);
            let mut xa = [null; 4];
            for (g, &w) in widths.iter().enumerate() {
                let ringed = (in_ring && g != g_qkv) || (qkv_in_ring && g == g_qkv);
                if w > 0 && !ringed {
                    xa[g] = h.alloc(gpu, w * s.nr)?;
                }
            }
            let (pre_q, pre_k, rs_q, rs_k) = if qk {
                (
                    h.alloc_unless(gpu, qkv_in_ring, s.nq)?,
                    h.alloc_unless(gpu, qkv_in_ring, s.nkv)?,
                    h.alloc_unless(gpu, qkv_in_ring, n * d.heads)?,
                    h.alloc_unless(gpu, qkv_in_ring, n * d.kv_heads)?,
                )
            } else {
                (null, null, nullf, nullf)
            };
            GpuResult::Ok(LayerActs {
                q_pre: pre_q,
                q_rstd: rs_q,
                k_pre: pre_k,
                k_rstd: rs_k,
                q: h.alloc_unless(gpu, qkv_in_ring, s.nq)?,
                k: h.alloc_unless(gpu, qkv_in_ring, s.nkv)?,
                v: h.alloc_unless(gpu, qkv_in_ring, s.nkv)?,
                att: h.alloc_unless(gpu, in_ring || outputs, s.nq)?,
                lse: h.alloc_unless(gpu, in_ring || outputs, s.lse)?,
                resid_mid: h.alloc_unless(gpu, in_ring, s.nc)?,
                ln2: h.alloc(gpu, rows * d.hidden)?,
                rstd2: h.alloc(gpu, n)?,
                gate: h.alloc(gpu, mlp)?,
                up: h.alloc(gpu, mlp)?,
                act: h.alloc(gpu, mlp)?,
                xa,
            })
        };
        let recomputed: Vec<usize> = (0..d.layers).filter(|&l| !self.is_kept(l)).collect();
        let m = recomputed.len();
        let (wants_qkv, wants_gate_up, wants_resident, resid_travel, all_outputs_fit) =
            match self.offload {
                plan::Offload::Checkpoints {
                    qkv,
                    gate_up,
                    resident_qkv,
                    resid_travel,
                    outputs_travel,
                    ..
                } => (
                    qkv,
                    gate_up,
                    resident_qkv,
                    resid_travel,
                    outputs_travel >= m,
                ),
                plan::Offload::Off => (false, plan::GateUp::Layers(0), 0, 0, false),
            };
        // Sparse residuals ([`plan::sparse_skips`]): decided as if no attention checkpoint
        // travels (when one may, every residual is stored anyway).
        let resident_unless_ring = plan::below_top_layers(&recomputed, self.resident_attention);
        let resident_count = resident_unless_ring.len();
        let skipped_resid = match offloading {
            true => plan::skipped_residuals(self.offload, m, n, resident_count),
            false => Vec::new(),
        };
        let stored: Vec<usize> = recomputed
            .iter()
            .copied()
            .filter(|l| !skipped_resid.contains(l))
            .collect();
        // The residual ring's members ([`plan::resid_members`]): the lowest recomputed layers
        // that store one, all of them unless their host rows would not fit; the layers above
        // keep their input residuals in buffers of their own.
        let resid_members = stored[..plan::resid_members(stored.len(), n, resid_travel)].to_vec();
        let resid_row = [2 * d.hidden];
        let resid_host = |k| {
            let ring = plan::resid_ring(k, n, false);
            LayerOffload::host_bytes((k, ring, usize::MAX), n, &resid_row)
        };
        let available = ftrt_runtime::offload::available_host_memory();
        let gib = |b: usize| b as f64 / (1u64 << 30) as f64;
        if offloading && resid_members.len() < stored.len() {
            let staying = stored.len() - resid_members.len();
            eprintln!(
                "note: the input residuals of {staying} of {} recomputed layers storing one stay on the GPU ({:.1} GiB), and no attention checkpoint travels: all residuals would pin {:.1} GiB of host memory, more than half of the {:.1} GiB available",
                stored.len(),
                gib(staying * s.nc * 2),
                gib(resid_host(stored.len())),
                gib(available.unwrap_or(0) as usize)
            );
        }
        let resid_host = resid_host(resid_members.len());
        // The attention checkpoint's pieces ([`plan::attention_checkpoint`]), with q, k, v if
        // asked. It travels too only when every residual does, both offloads' pinned rows fit
        // half the host's available memory and every layer's attention outputs fit the host:
        // else without q, k, v; else the backward recomputes the attention half as without
        // offload (long sequences), from the attention outputs of the layers whose outputs
        // travel.
        // (the pinned rows with the rings' base slots: gate/up's travel adds one, which only
        // takes a row off)
        let base_slots = plan::resid_ring(m, n, false);
        let pieces = |qkv| plan::attention_checkpoint(&d, qk, widths.map(|w| w * r), qkv);
        let attn_host =
            |qkv| LayerOffload::host_bytes((m, base_slots, usize::MAX), n, &pieces(qkv));
        let fits = |qkv| {
            resid_members.len() == m
                && all_outputs_fit
                && plan::pinned_rows_fit(resid_host + attn_host(qkv), available)
        };
        let ring = match offloading {
            false => None,
            true if self.resident_attention > 0 => None,
            true if wants_qkv && fits(true) => Some(true),
            true if fits(false) => Some(false),
            true => None,
        };
        if offloading
            && resid_members.len() == m
            && self.resident_attention == 0
            && ring != Some(wants_qkv)
        {
            let attn_host = attn_host(wants_qkv);
            eprintln!(
                "note: the attention checkpoints of {m} recomputed layers {}: with the residuals they would pin {:.1} GiB of host memory, more than half of the {:.1} GiB available",
                if ring.is_some() {
                    "travel without q, k, v, which are recomputed"
                } else {
                    "do not travel"
                },
                gib(resid_host + attn_host),
                gib(available.unwrap_or(0) as usize)
            );
        }
        // Recomputed layers whose attention output and lse stay in buffers of their own.
        let resident_attention = match ring {
            None => resident_unless_ring,
            Some(_) => Vec::new(),
        };
        // The attention outputs' ring ([`plan::Offload::Checkpoints`]): when the checkpoints do
        // not travel, the lowest `outputs_travel` layers' travel, below the resident ones (the
        // highest recomputed layer's stays in the slot: its backward recomputes nothing).
        let outputs_travel = match ring {
            None if offloading => plan::outputs_travelling(self.offload, m, n, resident_count),
            _ => 0,
        };
        if !skipped_resid.is_empty() {
            eprintln!(
                "note: {} of {m} recomputed layers store no input residual (at odd positions from the lowest; the backward rebuilds each by re-running the layer below), so that more attention outputs fit the host or the resident ones the GPU",
                skipped_resid.len()
            );
        }
        let output_pieces = plan::attention_outputs(&d).to_vec();
        if outputs_travel > 0 {
            let host = LayerOffload::host_bytes((m, 1, outputs_travel), n, &output_pieces);
            let resident = resident_attention.len();
            eprintln!(
                "note: the attention outputs of the lowest {outputs_travel} of {m} recomputed layers travel through host memory ({:.1} GiB pinned next to the residuals' {:.1}), so their recompute runs no attention kernel; of the layers above, {} recompute theirs and {resident} keep theirs on the GPU",
                gib(host),
                gib(resid_host),
                m - 1 - outputs_travel - resident,
            );
        }
        // The layers whose gate and up outputs travel ([`plan::gate_up_layers`]): only with the
        // attention checkpoints (their recompute takes the MLP's x A^T from them), and while
        // all three offloads' pinned rows fit half the host's available memory.
        let gate_up_pieces = vec![2 * d.intermediate; 2];
        let gate_up_layers = match ring {
            Some(qkv) => {
                let per_token = pieces(qkv).iter().sum();
                let rows = (m, n, s.mlp_rows);
                let travel = self.nf4.is_some();
                let picks = plan::gate_up_layers(&d, per_token, rows, wants_gate_up, travel);
                let host =
                    LayerOffload::host_bytes((picks.len(), 1, usize::MAX), n, &gate_up_pieces);
                let pinned = resid_host + attn_host(qkv) + host;
                match plan::pinned_rows_fit(pinned, available) {
                    true => picks,
                    false => Vec::new(),
                }
            }
            None => Vec::new(),
        };
        let gate_up_travel = plan::gate_up_travel(gate_up_layers.len());
        // One set shared by the recomputed layers and their input norm outputs.
        let shared = if recomputed.is_empty() {
            None
        } else {
            Some((
                layer_acts(&mut h, s.mlp_rows, ring, outputs_travel > 0)?,
                h.alloc::<bf16>(gpu, s.nc)?,
            ))
        };
        let mut layers = Vec::with_capacity(d.layers);
        let mut ln = Vec::with_capacity(d.layers + 1);
        for l in 0..d.layers {
            match shared {
                Some((la, ln_shared)) if !self.is_kept(l) => {
                    layers.push(la);
                    ln.push(ln_shared);
                }
                _ => {
                    layers.push(layer_acts(&mut h, n, None, false)?);
                    ln.push(h.alloc(gpu, s.nc)?);
                }
            }
        }
        ln.push(h.alloc(gpu, s.nc)?);
        let resid_offload = if offloading {
            let slots = plan::resid_ring(resid_members.len(), n, gate_up_travel);
            let pieces = resid_row.into();
            Some(LayerOffload::new(
                gpu,
                &mut h,
                (resid_members, slots, usize::MAX),
                n,
                pieces,
            )?)
        } else {
            None
        };
        let attn_offload = match ring {
            Some(qkv) => {
                use plan::ckpt;
                let slots = plan::resid_ring(m, n, gate_up_travel);
                let members = (recomputed.clone(), slots, usize::MAX);
                let o = LayerOffload::new(gpu, &mut h, members, n, pieces(qkv))?;
                let piece_or_null = |l, i, w: usize| if w > 0 { o.piece(l, i) } else { null };
                for &l in &recomputed {
                    let la = &mut layers[l];
                    la.att = o.piece(l, ckpt::ATT);
                    la.resid_mid = o.piece(l, ckpt::RESID_MID);
                    la.xa[g_o] = piece_or_null(l, ckpt::XA_O, widths[g_o]);
                    la.lse = o.piece(l, ckpt::LSE);
                    la.xa[g_gu] = piece_or_null(l, ckpt::XA_GATE_UP, widths[g_gu]);
                    la.xa[g_down] = piece_or_null(l, ckpt::XA_DOWN, widths[g_down]);
                    if qkv {
                        la.q = o.piece(l, ckpt::Q);
                        la.k = o.piece(l, ckpt::K);
                        la.v = o.piece(l, ckpt::V);
                        la.xa[g_qkv] = piece_or_null(l, ckpt::XA_QKV, widths[g_qkv]);
                    }
                    if qkv && qk {
                        la.q_pre = o.piece(l, ckpt::Q_PRE);
                        la.k_pre = o.piece(l, ckpt::K_PRE);
                        la.q_rstd = o.piece(l, ckpt::Q_RSTD);
                        la.k_rstd = o.piece(l, ckpt::K_RSTD);
                    }
                }
                Some(o)
            }
            None => None,
        };
        // Recomputed layers that keep q, k, v (and what the backward reads with them) in
        // buffers of their own, when the checkpoints travel without them.
        let resident_qkv = match ring {
            Some(false) if !wants_qkv => plan::below_top_layers(&recomputed, wants_resident),
            _ => Vec::new(),
        };
        for &l in &resident_qkv {
            let la = &mut layers[l];
            la.q = h.alloc(gpu, s.nq)?;
            la.k = h.alloc(gpu, s.nkv)?;
            la.v = h.alloc(gpu, s.nkv)?;
            if widths[g_qkv] > 0 {
                la.xa[g_qkv] = h.alloc(gpu, widths[g_qkv] * s.nr)?;
            }
            if qk {
                la.q_pre = h.alloc(gpu, s.nq)?;
                la.k_pre = h.alloc(gpu, s.nkv)?;
                la.q_rstd = h.alloc(gpu, n * d.heads)?;
                la.k_rstd = h.alloc(gpu, n * d.kv_heads)?;
            }
        }
        for &l in &resident_attention {
            let la = &mut layers[l];
            la.att = h.alloc(gpu, s.nq)?;
            la.lse = h.alloc(gpu, s.lse)?;
        }
        let gate_up_offload = match gate_up_layers.is_empty() {
            true => None,
            false => Some(LayerOffload::new(
                gpu,
                &mut h,
                (gate_up_layers, 1, usize::MAX),
                n,
                gate_up_pieces,
            )?),
        };
        let outputs_offload = match outputs_travel {
            0 => None,
            travel => {
                let members = (recomputed.clone(), 1, travel);
                let o = LayerOffload::new(gpu, &mut h, members, n, output_pieces)?;
                for &l in recomputed
                    .iter()
                    .filter(|l| !resident_attention.contains(l))
                {
                    layers[l].att = o.piece(l, 0);
                    layers[l].lse = o.piece(l, 1);
                }
                Some(o)
            }
        };
        let mut resid = Vec::new();
        let mut rstd = Vec::new();
        for l in 0..=d.layers {
            resid.push(match &resid_offload {
                Some(o) if o.holds(l) => o.piece(l, 0),
                _ if skipped_resid.contains(&l) => null,
                _ => h.alloc(gpu, s.nc)?,
            });
            rstd.push(h.alloc(gpu, n)?);
        }
        // A skipped layer's input lives in the last layer's output's buffer: in the forward
        // until the layer has run, in the backward once the final norm's backward has read it.
        for &l in &skipped_resid {
            resid[l] = resid[d.layers];
        }
        let pad = s.nq_pad > 0;
        let dp = s.head_dim_pad;
        let sel = if pad {
            let p = h.alloc::<bf16>(gpu, d.head_dim * dp)?;
            let v: Vec<bf16> = plan::pad_selector(d.head_dim, dp)
                .into_iter()
                .map(bf16::from_f32)
                .collect();
            gpu.upload(p, &v).ctx("uploading the padding selector")?;
            p
        } else {
            null
        };
        let dln = h.alloc::<bf16>(gpu, s.nc.max(s.nq))?;
        let dres = ln[d.layers];
        let dq = match shared {
            Some((la, _)) if plan::dq_in_resid_mid(&d, m, !la.resid_mid.is_null()) => la.resid_mid,
            _ => h.alloc::<bf16>(gpu, s.nq)?,
        };
        let inputs = h.alloc::<u32>(gpu, plan::StepInput::block_words(n))?;
        let input = |r: plan::StepInput| inputs.offset(r.offset(n));
        let acts = Acts {
            sizes: s,
            inputs,
            ids: input(plan::StepInput::Ids).cast(),
            pos: input(plan::StepInput::Positions).cast(),
            targets: input(plan::StepInput::Targets).cast(),
            cu: input(plan::StepInput::CuSeqlens).cast(),
            resid,
            ln,
            rstd,
            layers,
            tmp_c: dln,
            dres,
            dln,
            dact: h.alloc(gpu, s.ti)?,
            dgate: h.alloc(gpu, s.ti)?,
            dup: h.alloc(gpu, s.ti)?,
            datt: dln,
            dq,
            dq_pre: h.alloc_unless(gpu, !qk, s.nq)?,
            dk: h.alloc(gpu, s.nkv)?,
            dv: h.alloc(gpu, s.nkv)?,
            dk_pre: h.alloc_unless(gpu, !qk, s.nkv)?,
            dxa: h.alloc(gpu, 3 * s.nr)?,
            attn_scratch: h.alloc(gpu, s.attn_scratch / 4 + 1)?,
            nf4_slots: [
                h.alloc_unless(gpu, s.nf4_slots == 0, s.nf4_slots / 2)?,
                h.alloc_unless(gpu, s.nf4_slots == 0, s.nf4_slots / 2)?,
            ],
            qp: h.alloc_unless(gpu, !pad, s.nq_pad)?,
            kp: h.alloc_unless(gpu, !pad, s.nkv_pad)?,
            vp: h.alloc_unless(gpu, !pad, s.nkv_pad)?,
            op: h.alloc_unless(gpu, !pad, s.nq_pad)?,
            dop: h.alloc_unless(gpu, !pad, s.nq_pad)?,
            dqp: h.alloc_unless(gpu, !pad, s.nq_pad)?,
            dkp: h.alloc_unless(gpu, !pad, s.nkv_pad)?,
            dvp: h.alloc_unless(gpu, !pad, s.nkv_pad)?,
            sel,
            logits: h.alloc(gpu, s.logits)?,
            ce_lse: h.alloc(gpu, n)?,
            ce_picked: h.alloc(gpu, n)?,
            ce_dlse: input(plan::StepInput::DLse).cast(),
            ce_dpicked: input(plan::StepInput::DPicked).cast(),
            resid_offload,
            attn_offload,
            gate_up_offload,
            outputs_offload,
            qkv_in_checkpoint: ring == Some(true),
            resident_qkv,
            resident_attention,
            skipped_resid,
            step_graphs: RefCell::new(StepGraphs::new(8)),
            _held: h,
        };
        self.acts = Some(acts);
        Ok(())
    }

    /// A frozen-projection or head GEMM (bf16 out), profiled by its shape.
    fn gemm(
        &self,
        desc: &GemmDesc,
        a: DevPtr<bf16>,
        b: DevPtr<bf16>,
        c: DevPtr<bf16>,
        bias: Option<DevPtr<bf16>>,
    ) -> GpuResult<()> {
        self.gemm_as(self.gemm_label(desc), desc, a, b, c, bias)
    }

    /// A GEMM (bf16 out) under the profile label `label`.
    fn gemm_as(
        &self,
        label: &str,
        desc: &GemmDesc,
        a: DevPtr<bf16>,
        b: DevPtr<bf16>,
        c: DevPtr<bf16>,
        bias: Option<DevPtr<bf16>>,
    ) -> GpuResult<()> {
        self.mark_gemm(label, desc)?;
        self.blas.gemm_bf16(desc, a, b, c, bias, self.ws).ctx(label)
    }

    /// Opens `label`'s profile span for a GEMM; with `FTRT_PROFILE_GEMM_SHAPES=1` the label
    /// also names the shape (m x n x k, transposes, beta), so the profile shows each shape's
    /// time per call (the FLOPs are 2 m n k).
    fn mark_gemm(&self, label: &str, desc: &GemmDesc) -> GpuResult<()> {
        static SHAPES: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        let shapes = *SHAPES
            .get_or_init(|| std::env::var("FTRT_PROFILE_GEMM_SHAPES").is_ok_and(|v| v == "1"));
        if shapes && self.gpu.profiling() {
            let t = |x: bool| if x { "T" } else { "N" };
            let label = format!(
                "{label} {}x{}x{} {}{} beta {}",
                desc.m,
                desc.n,
                desc.k,
                t(desc.transa),
                t(desc.transb),
                desc.beta
            );
            return self.gpu.profile_mark(&label).ctx("profiling");
        }
        self.gpu.profile_mark(label).ctx("profiling")
    }

    /// A GEMM with an f32 C (beta 1 accumulates) under the profile label `label`.
    fn gemm_f32_as(
        &self,
        label: &str,
        desc: &GemmDesc,
        a: DevPtr<bf16>,
        b: DevPtr<bf16>,
        c: DevPtr<f32>,
    ) -> GpuResult<()> {
        self.mark_gemm(label, desc)?;
        self.blas
            .gemm_bf16_f32(desc, a, b, c, None, self.ws)
            .ctx(label)
    }

    /// Profile label of a (non-LoRA) GEMM by its shape: the head has the vocabulary as one
    /// dimension, everything else is a frozen projection.
    fn gemm_label(&self, desc: &GemmDesc) -> &'static str {
        if [desc.m, desc.n, desc.k].contains(&self.dims.vocab) {
            "GEMM head (vocabulary)"
        } else {
            "GEMM projection (frozen)"
        }
    }

    /// Checks a batch (and its targets) against the vocabulary and the token budget, allocates
    /// the activations and records the batch's shape as the loaded one (the uploads are the
    /// caller's); returns the number of counted targets.
    fn prepare_batch(&mut self, batch: &Batch, targets: Option<&[i32]>) -> GpuResult<usize> {
        let counted = check_batch(
            &batch.tokens,
            &batch.cu_seqlens,
            &batch.positions,
            targets,
            self.dims.vocab,
            self.max_tokens,
            self.max_tokens,
            self.config.sliding_window,
        )?;
        self.allocate_activations()?;
        self.last = Some((batch.len(), batch.num_seqs()));
        Ok(counted)
    }

    /// Uploads a batch (checked), its targets and their cross-entropy coefficients in one copy
    /// ([`plan::step_input_image`]); returns the number of counted targets.
    fn load_batch(&mut self, batch: &Batch, targets: Option<&[i32]>) -> GpuResult<usize> {
        let counted = self.prepare_batch(batch, targets)?;
        let a = self.acts.as_ref().expect("allocated");
        plan::step_input_image(a.sizes.n, batch, targets, &mut self.input_image);
        self.gpu
            .upload(a.inputs, &self.input_image)
            .ctx("uploading the step's inputs")?;
        Ok(counted)
    }

    /// Attention forward of layer `l` (padding head dims the kernels lack).
    fn attn_forward(&self, a: &Acts, la: &LayerActs, n: usize, s: usize) -> GpuResult<()> {
        let d = self.dims;
        let dp = a.sizes.head_dim_pad;
        let mut ad = AttentionDims::new(n, s, d.heads, d.kv_heads, dp);
        if dp == d.head_dim {
            return attention_forward(self.gpu, ad, la.q, la.k, la.v, a.cu, la.att, la.lse)
                .ctx("attention forward");
        }
        ad.scale = 1.0 / (d.head_dim as f32).sqrt();
        self.pad(la.q, a.qp, n * d.heads, a.sel)?;
        self.pad(la.k, a.kp, n * d.kv_heads, a.sel)?;
        self.pad(la.v, a.vp, n * d.kv_heads, a.sel)?;
        attention_forward(self.gpu, ad, a.qp, a.kp, a.vp, a.cu, a.op, la.lse)
            .ctx("attention forward (padded)")?;
        self.unpad(a.op, la.att, n * d.heads, a.sel)
    }

    /// (rows, D) -> (rows, Dp) zero-padded: x · [I | 0].
    fn pad(
        &self,
        x: DevPtr<bf16>,
        y: DevPtr<bf16>,
        rows: usize,
        sel: DevPtr<bf16>,
    ) -> GpuResult<()> {
        let (dh, dp) = (
            self.dims.head_dim,
            self.acts.as_ref().map_or(0, |a| a.sizes.head_dim_pad),
        );
        self.gemm(&GemmDesc::new(rows, dp, dh), x, sel, y, None)
    }

    /// (rows, Dp) -> (rows, D): x · [I | 0]^T.
    fn unpad(
        &self,
        x: DevPtr<bf16>,
        y: DevPtr<bf16>,
        rows: usize,
        sel: DevPtr<bf16>,
    ) -> GpuResult<()> {
        let (dh, dp) = (
            self.dims.head_dim,
            self.acts.as_ref().map_or(0, |a| a.sizes.head_dim_pad),
        );
        self.gemm(
            &GemmDesc::new(rows, dh, dp).transposed(false, true),
            x,
            sel,
            y,
            None,
        )
    }

    /// Forward of the loaded batch through the final norm, saving every activation.
    fn forward_loaded(&self) -> GpuResult<()> {
        self.forward_pass(Pass::Train)
    }

    /// Embedding, first input norm and every layer over the loaded batch, for `pass`.
    fn forward_pass(&self, pass: Pass) -> GpuResult<()> {
        let (n, s) = self.last.ok_or("no batch loaded")?;
        let a = self.acts.as_ref().ok_or("activations not allocated")?;
        let gpu = self.gpu;
        let d = self.dims;
        self.forget_dequantized();
        self.write_resid(a, 0, n, || {
            embedding::embedding::forward(
                gpu,
                &embedding::embedding::Dims {
                    N: n,
                    V: d.vocab,
                    C: d.hidden,
                },
                a.ids,
                self.embed_table(),
                a.resid[0],
            )
            .ctx("embedding")
        })?;
        self.input_norm(a, 0, n)?;
        for l in 0..d.layers {
            self.write_resid(a, l + 1, n, || {
                let Some(o) = &a.attn_offload else {
                    return self.layer_forward(a, l, n, s, pass);
                };
                o.before_write(gpu, l)?;
                self.layer_forward(a, l, n, s, pass)?;
                o.after_write(gpu, l, n)
            })?;
        }
        Ok(())
    }

    /// Runs `write` (compute stream), which writes resid[l] (the embedding, or layer l - 1's
    /// forward at its end); with residual offload, it first waits until the copy-out of the
    /// residual resid[l]'s ring slot held before is done, and afterwards copies resid[l] out.
    fn write_resid(
        &self,
        a: &Acts,
        l: usize,
        n: usize,
        write: impl FnOnce() -> GpuResult<()>,
    ) -> GpuResult<()> {
        let Some(o) = &a.resid_offload else {
            return write();
        };
        o.before_write(self.gpu, l)?;
        write()?;
        o.after_write(self.gpu, l, n)
    }

    /// ln[l] (N, C), rstd[l] (N) = rms_norm(resid[l]) with layer `l`'s input norm weight: the
    /// first layer's input in the forward, a recomputed layer's in the backward (the same
    /// values layer l - 1's fused add + norm wrote).
    fn input_norm(&self, a: &Acts, l: usize, n: usize) -> GpuResult<()> {
        norm::rms_norm::forward(
            self.gpu,
            &norm::rms_norm::Dims {
                R: n,
                C: self.dims.hidden,
            },
            self.eps,
            a.resid[l],
            self.w(&self.layout.layers[l].input_norm),
            a.ln[l],
            a.rstd[l],
        )
        .ctx("input norm")
    }

    /// Rows [r0, r0 + t) of ln2[l] (the MLP tile's buffer, [`Self::mlp_rows`]) and of rstd2[l]
    /// = rms_norm(resid_mid[l]) with layer `l`'s post-attention norm weight: the values the
    /// forward's fused add + norm wrote (it normalizes the rounded sum), for a recomputed
    /// layer's MLP tile in the backward.
    fn post_attention_norm_rows(&self, a: &Acts, l: usize, r0: usize, t: usize) -> GpuResult<()> {
        let la = &a.layers[l];
        let c = self.dims.hidden;
        norm::rms_norm::forward(
            self.gpu,
            &norm::rms_norm::Dims { R: t, C: c },
            self.eps,
            la.resid_mid.offset(r0 * c),
            self.w(&self.layout.layers[l].post_norm),
            self.mlp_rows(a, l, r0).0,
            la.rstd2.offset(r0),
        )
        .ctx("post-attention norm")
    }

    /// Layer `l` of the forward from `acts.ln[l]` (its input norm output) and `acts.resid[l]`:
    /// writes its saved activations, `resid[l + 1]`, `ln[l + 1]` and `rstd[l + 1]`; the
    /// post-attention add + norm and the MLP run in row tiles ([`Self::mlp_forward_rows`]). For
    /// [`Pass::Recompute`] it stops after the post-attention add + norm (resid_mid and rstd2):
    /// the backward recomputes ln2 and the MLP tile by tile.
    fn layer_forward(&self, a: &Acts, l: usize, n: usize, s: usize, pass: Pass) -> GpuResult<()> {
        let gpu = self.gpu;
        let d = self.dims;
        let c = d.hidden;
        let and = norm::add_rms_norm::Dims { R: n, C: c };
        let lw = &self.layout.layers[l];
        let la = &a.layers[l];
        self.attention_inputs(a, l, n)?;
        let outputs = a.outputs_offload.as_ref();
        match pass {
            // a resident attention output and lse are still there from the forward, a
            // travelling one is back (or on its way) in the outputs' slot
            Pass::Recompute | Pass::Reforward if a.resident_attention.contains(&l) => {}
            Pass::Recompute | Pass::Reforward if outputs.is_some_and(|o| o.keeps(l)) => {
                outputs.map_or(Ok(()), |o| o.wait_prefetched(gpu, l))?
            }
            Pass::Recompute | Pass::Reforward => self.attn_forward(a, la, n, s)?,
            // a travelling output goes out while o_proj and the MLP run
            Pass::Train => {
                outputs.map_or(Ok(()), |o| o.before_write(gpu, l))?;
                self.attn_forward(a, la, n, s)?;
                outputs.map_or(Ok(()), |o| o.after_write(gpu, l, n))?;
            }
            Pass::Prefill(cache) => {
                cache.store(gpu, l, n, a.pos, la.k, la.v)?;
                self.attn_forward(a, la, n, s)?;
            }
            Pass::Decode(cache) => {
                cache.store(gpu, l, n, a.pos, la.k, la.v)?;
                cache.attend(gpu, l, n, la.q, la.att)?;
            }
        }
        let g_o = Proj::O.input_group();
        self.stack_xa(l, g_o, la.att, la.xa[g_o], n)?;
        self.project(l, Proj::O, la.att, a.tmp_c, la.xa[g_o], n)?;
        // A tile's add + norm reads its rows of the o_proj output in tmp_c before its MLP
        // writes down_proj's output over them. Travelling gate/up outputs go out once every
        // tile has written them.
        let gate_up = a
            .gate_up_offload
            .as_ref()
            .filter(|_| matches!(pass, Pass::Train));
        if let Some(o) = gate_up {
            o.before_write(gpu, l)?;
        }
        for (r0, t) in self.mlp_tiles(a, n) {
            norm::add_rms_norm::forward(
                gpu,
                &norm::add_rms_norm::Dims { R: t, C: c },
                self.eps,
                a.tmp_c.offset(r0 * c),
                a.resid[l].offset(r0 * c),
                self.w(&lw.post_norm),
                self.mlp_rows(a, l, r0).0,
                la.resid_mid.offset(r0 * c),
                la.rstd2.offset(r0),
            )
            .ctx("post-attention norm")?;
            if !matches!(pass, Pass::Recompute) {
                self.mlp_forward_rows(a, l, r0, t, Some(a.tmp_c.offset(r0 * c)))?;
            }
        }
        if let Some(o) = gate_up {
            o.after_write(gpu, l, n)?;
        }
        if let Pass::Recompute = pass {
            // ln2 and the MLP are recomputed tile by tile in the backward.
            return Ok(());
        }
        let next = if l + 1 < d.layers {
            &self.layout.layers[l + 1].input_norm
        } else {
            &self.layout.final_norm
        };
        norm::add_rms_norm::forward(
            gpu,
            &and,
            self.eps,
            a.tmp_c,
            la.resid_mid,
            self.w(next),
            a.ln[l + 1],
            a.resid[l + 1],
            a.rstd[l + 1],
        )
        .ctx("residual + next norm")?;
        Ok(())
    }

    /// Layer `l`'s attention inputs from `acts.ln[l]`: the q, k, v projections (their x A^T
    /// saved), the per-head q/k norms (Qwen3) and RoPE on the query and key heads.
    fn attention_inputs(&self, a: &Acts, l: usize, n: usize) -> GpuResult<()> {
        let gpu = self.gpu;
        let d = self.dims;
        let (hq, hkv, hd) = (d.heads, d.kv_heads, d.head_dim);
        let eps = self.eps;
        let p_rows = self.max_tokens;
        let lw = &self.layout.layers[l];
        let la = &a.layers[l];
        let x = a.ln[l];
        let qk = lw.q_norm.is_some();
        let q_out = if qk { la.q_pre } else { la.q };
        let k_out = if qk { la.k_pre } else { la.k };
        let xa = la.xa[Proj::Q.input_group()];
        self.stack_xa(l, Proj::Q.input_group(), x, xa, n)?;
        self.project(l, Proj::Q, x, q_out, xa, n)?;
        self.project(l, Proj::K, x, k_out, xa, n)?;
        self.project(l, Proj::V, x, la.v, xa, n)?;
        // Per-head q/k norms (Qwen3) and RoPE on the query and key heads, in place.
        let head_norm = |rows: usize, x, w, y, rstd, what| {
            norm::rms_norm::forward(
                gpu,
                &norm::rms_norm::Dims { R: rows, C: hd },
                eps,
                x,
                w,
                y,
                rstd,
            )
            .ctx(what)
        };
        if let (Some(qn), Some(kn)) = (&lw.q_norm, &lw.k_norm) {
            head_norm(n * hq, la.q_pre, self.w(qn), la.q, la.q_rstd, "q norm")?;
            head_norm(n * hkv, la.k_pre, self.w(kn), la.k, la.k_rstd, "k norm")?;
        }
        let rope = |x, heads, what| {
            rope::rope::forward(
                gpu,
                &rope::rope::Dims {
                    N: n,
                    H: heads,
                    D: hd,
                    P: p_rows,
                },
                x,
                a.pos,
                self.cos,
                self.sin,
            )
            .ctx(what)
        };
        rope(la.q, hq, "rope q")?;
        rope(la.k, hkv, "rope k")
    }

    /// The MLP's row tiles of an `n`-row batch: (first row, rows).
    fn mlp_tiles(&self, a: &Acts, n: usize) -> impl DoubleEndedIterator<Item = (usize, usize)> {
        let rows = a.sizes.mlp_rows;
        (0..n).step_by(rows).map(move |r0| (r0, rows.min(n - r0)))
    }

    /// Layer `l`'s ln2, gate, up and act from row `r0` on: its own (N, C) and (N, I) buffers
    /// at that row when kept, else the shared set's one-tile buffers; gate and up in the
    /// gate/up offload's slot at that row when they travel.
    fn mlp_rows(
        &self,
        a: &Acts,
        l: usize,
        r0: usize,
    ) -> (DevPtr<bf16>, DevPtr<bf16>, DevPtr<bf16>, DevPtr<bf16>) {
        let la = &a.layers[l];
        let row = if self.is_kept(l) { r0 } else { 0 };
        let (c, i) = (row * self.dims.hidden, row * self.dims.intermediate);
        let (gate, up) = match &a.gate_up_offload {
            Some(o) if o.holds(l) => {
                let at = r0 * self.dims.intermediate;
                (
                    o.piece::<bf16>(l, 0).offset(at),
                    o.piece::<bf16>(l, 1).offset(at),
                )
            }
            _ => (la.gate.offset(i), la.up.offset(i)),
        };
        (la.ln2.offset(c), gate, up, la.act.offset(i))
    }

    /// Layer `l`'s MLP on rows [r0, r0 + t) of its post-attention norm output: gate and up
    /// (their x A^T rows saved), act = swiglu, then down_proj into `out`'s rows (`out` is the
    /// batch's (N, C) output) — or, recomputing for the backward (`out` None), down_proj's
    /// x A^T rows; when the attention checkpoint brought the x A^T back, only gate and up
    /// (the backward's fused swiglu writes act).
    fn mlp_forward_rows(
        &self,
        a: &Acts,
        l: usize,
        r0: usize,
        t: usize,
        out: Option<DevPtr<bf16>>,
    ) -> GpuResult<()> {
        let la = &a.layers[l];
        let (g_gu, g_down) = (Proj::Gate.input_group(), Proj::Down.input_group());
        let xa_gu = self.xa_rows(la.xa[g_gu], g_gu, r0);
        let xa_down = self.xa_rows(la.xa[g_down], g_down, r0);
        let (x, gate, up, act) = self.mlp_rows(a, l, r0);
        let from_checkpoint = out.is_none() && self.mlp_from_checkpoint(a, l);
        if !from_checkpoint {
            self.stack_xa(l, g_gu, x, xa_gu, t)?;
        }
        self.project(l, Proj::Gate, x, gate, xa_gu, t)?;
        self.project(l, Proj::Up, x, up, xa_gu, t)?;
        if from_checkpoint {
            return Ok(());
        }
        self.mlp_activation(l, (gate, up, xa_gu), act, t)?;
        self.stack_xa(l, g_down, act, xa_down, t)?;
        match out {
            Some(y) => self.project(l, Proj::Down, act, y, xa_down, t),
            None => Ok(()),
        }
    }

    /// Whether layer `l` is the highest recomputed layer: nothing writes the shared set of the
    /// recomputed layers ([`Self::set_kept_layers`]) between its forward and its backward (the
    /// kept layers above it own their buffers), so its input norm, its attention half and its
    /// last MLP tile are still there, and the backward recomputes none of them.
    fn forward_still_held(&self, l: usize) -> bool {
        !self.is_kept(l) && self.is_kept(l + 1)
    }

    /// Whether layer `l`'s MLP is recomputed from its attention checkpoint: the x A^T of gate/up
    /// and down came back with it, so the recompute runs only gate and up, and the backward's
    /// swiglu writes act ([`Self::mlp_forward_rows`]).
    fn mlp_from_checkpoint(&self, a: &Acts, l: usize) -> bool {
        !self.is_kept(l) && a.attn_offload.is_some()
    }

    /// Cross-entropy of the final norm output in chunks of `ce_rows` rows: each chunk's
    /// logits (rows, V) through the head, their lse and picked logit per row (from the running
    /// values lse = -inf and picked = 0, set here), and with `grad` d loss / d ln_f into `dln`
    /// (the coefficients uploaded with the batch, [`Self::load_batch`]; forward and backward
    /// in one pass where [`cross_entropy::fused_supported`]). Launches only.
    fn cross_entropy_loaded(&self, grad: bool) -> GpuResult<()> {
        let (n, _) = self.last.ok_or("no batch loaded")?;
        let a = self.acts.as_ref().ok_or("activations not allocated")?;
        let gpu = self.gpu;
        gpu.fill_u32(a.ce_lse.cast(), f32::NEG_INFINITY.to_bits(), n)
            .ctx("init lse")?;
        gpu.memset_zero(a.ce_picked.cast(), n * 4)
            .ctx("init picked")?;
        let (c, v) = (self.dims.hidden, self.dims.vocab);
        let head = self.head();
        let ln_f = a.ln[self.dims.layers];
        let rows = a.sizes.ce_rows;
        // each chunk spans the whole vocabulary: on Hopper its forward and backward are one pass
        let fused = cross_entropy::fused_supported(gpu, v);
        let mut r0 = 0;
        while r0 < n {
            let rc = rows.min(n - r0);
            let x = ln_f.offset(r0 * c);
            // logits (rc, V) = x (rc, C) · head^T
            self.gemm(
                &GemmDesc::new(rc, v, c).transposed(false, true),
                x,
                head,
                a.logits,
                None,
            )?;
            let cd = cross_entropy::cross_entropy::Dims { R: rc, V: v };
            let (target, lse, picked) = (
                a.targets.offset(r0),
                a.ce_lse.offset(r0),
                a.ce_picked.offset(r0),
            );
            let (dlse, dpicked) = (a.ce_dlse.offset(r0), a.ce_dpicked.offset(r0));
            if grad && fused {
                // forward and backward in one pass over the logits, dlogits in place
                cross_entropy::forward_backward(
                    gpu, rc, v, a.logits, target, dlse, dpicked, lse, picked,
                )
                .ctx("cross-entropy forward and backward")?;
            } else {
                cross_entropy::cross_entropy::forward(
                    gpu, &cd, 0, 0.0, a.logits, target, lse, picked,
                )
                .ctx("cross-entropy forward")?;
                if grad {
                    cross_entropy::cross_entropy::backward(
                        gpu, &cd, 0, 0.0, a.logits, target, lse, dlse, dpicked, a.logits,
                    )
                    .ctx("cross-entropy backward")?;
                }
            }
            if grad {
                // dln_f (rc, C) = dlogits (rc, V) · head (V, C)
                self.gemm(
                    &GemmDesc::new(rc, c, v),
                    a.logits,
                    head,
                    a.dln.offset(r0 * c),
                    None,
                )?;
            }
            r0 += rc;
        }
        Ok(())
    }

    /// Mean cross-entropy of the step that ran on the loaded batch (downloads lse and picked
    /// logits: waits for the step).
    fn mean_loss_loaded(&self, targets: &[i32]) -> GpuResult<f64> {
        let (n, _) = self.last.ok_or("no batch loaded")?;
        let a = self.acts.as_ref().ok_or("activations not allocated")?;
        let gpu = self.gpu;
        let mut lse = vec![0f32; n];
        let mut picked = vec![0f32; n];
        gpu.download(a.ce_lse, &mut lse).ctx("downloading lse")?;
        gpu.download(a.ce_picked, &mut picked)
            .ctx("downloading picked logits")?;
        let (loss, _) = plan::mean_loss(&lse, &picked, targets);
        if !loss.is_finite() {
            return Err(format!("the GPU loss is not finite ({loss})"));
        }
        Ok(loss)
    }

    /// Backward from `acts.dln` (d loss / d final norm output) to the LoRA gradients.
    fn backward_loaded(&self) -> GpuResult<()> {
        let (n, s) = self.last.ok_or("no batch loaded")?;
        let a = self.acts.as_ref().ok_or("activations not allocated")?;
        let gpu = self.gpu;
        let d = self.dims;
        let (c, hq, hkv, hd) = (d.hidden, d.heads, d.kv_heads, d.head_dim);
        let nd = norm::add_rms_norm::Dims { R: n, C: c };
        let p_rows = self.max_tokens;
        // Each add + norm backward adds the norm's dx into d resid in place.
        let add_norm_backward = |w, x, rstd, what| {
            norm::add_rms_norm::backward(gpu, &nd, w, x, rstd, a.dln, a.dres, a.dres, a.dres)
                .ctx(what)
        };
        // Final norm: d resid after the last layer (no residual gradient from above: zero).
        gpu.memset_zero(a.dres.cast(), n * c * 2)
            .ctx("zeroing the residual gradient")?;
        add_norm_backward(
            self.w(&self.layout.final_norm),
            a.resid[d.layers],
            a.rstd[d.layers],
            "final norm backward",
        )?;
        for l in (0..d.layers).rev() {
            if !self.is_kept(l) {
                // With checkpoint offload, resid[l]'s ring slot is read by the recompute (input
                // norm) and this layer's input-norm backward, its attention checkpoint by the
                // rest of its backward: wait for their prefetches; the member below's come back
                // into other slots meanwhile. The recompute then redoes q, k, v only if the
                // checkpoint lacks them (and, below, the MLP): the attention output and the
                // post-attention residual are back.
                // A layer without a stored residual waits for the one below, prefetched at the
                // layer above, and rebuilds its own by re-running the layer below (whose
                // attention output comes back first: see the prefetch after attention).
                let skipped = a.skipped_resid.contains(&l);
                for o in [&a.resid_offload, &a.attn_offload].into_iter().flatten() {
                    if skipped {
                        o.wait_prefetched(gpu, l - 1)?;
                        continue;
                    }
                    o.wait_prefetched(gpu, l)?;
                    if let Some(below) = o.member_below(l) {
                        o.prefetch(gpu, below, n)?;
                    }
                }
                if let Some(o) = &a.gate_up_offload {
                    o.wait_prefetched(gpu, l)?;
                }
                if skipped {
                    self.input_norm(a, l - 1, n)?;
                    self.layer_forward(a, l - 1, n, s, Pass::Reforward)?;
                    if let Some(o) = &a.outputs_offload {
                        o.prefetch(gpu, l, n)?;
                    }
                }
                if !self.forward_still_held(l) {
                    self.input_norm(a, l, n)?;
                    if a.attn_offload.is_none() {
                        self.layer_forward(a, l, n, s, Pass::Recompute)?;
                    } else if !a.qkv_in_checkpoint && !a.resident_qkv.contains(&l) {
                        self.attention_inputs(a, l, n)?;
                    }
                }
            }
            let la = &a.layers[l];
            let lw = &self.layout.layers[l];
            // MLP, one tile of rows at a time, the last first: a recomputed layer's ln2 and
            // MLP are recomputed tile by tile, except the highest one's last tile, which its
            // forward left in the shared buffers; travelling gate/up outputs are back.
            let gate_up = a.gate_up_offload.as_ref().filter(|o| o.holds(l));
            for (i, (r0, t)) in self.mlp_tiles(a, n).rev().enumerate() {
                let on_device = self.is_kept(l) || (i == 0 && self.forward_still_held(l));
                if !on_device {
                    self.post_attention_norm_rows(a, l, r0, t)?;
                    if gate_up.is_none() {
                        self.mlp_forward_rows(a, l, r0, t, None)?;
                    }
                }
                let (x, gate, up, act) = self.mlp_rows(a, l, r0);
                let dln = a.dln.offset(r0 * c);
                let xa = |g: usize| self.xa_rows(la.xa[g], g, r0);
                let dy = a.dres.offset(r0 * c);
                let g_down = Proj::Down.input_group();
                // A recompute from the checkpoint wrote gate and up but not act: down's dA
                // waits until swiglu's backward has written act too.
                let act_later = !on_device && self.mlp_from_checkpoint(a, l);
                self.group_backward(
                    l,
                    g_down,
                    (!act_later).then_some(act),
                    xa(g_down),
                    &[(Proj::Down, dy)],
                    a.dact,
                    false,
                    t,
                    a.dxa,
                )?;
                let g_gu = Proj::Gate.input_group();
                self.mlp_activation_backward(
                    l,
                    (gate, up, xa(g_gu)),
                    (a.dact, a.dxa),
                    (a.dgate, a.dup),
                    act_later.then_some(act),
                    t,
                )?;
                if act_later {
                    self.stack_da(l, g_down, act, t, a.dxa)?;
                }
                self.group_backward(
                    l,
                    g_gu,
                    Some(x),
                    xa(g_gu),
                    &[(Proj::Gate, a.dgate), (Proj::Up, a.dup)],
                    dln,
                    false,
                    t,
                    a.dxa,
                )?;
            }
            // The gate/up slot is free: the next travelling layer's come back meanwhile.
            if let Some(o) = gate_up {
                if let Some(below) = o.member_below(l) {
                    o.prefetch(gpu, below, n)?;
                }
            }
            add_norm_backward(
                self.w(&lw.post_norm),
                la.resid_mid,
                la.rstd2,
                "post-attention norm backward",
            )?;
            // Attention block: dres is d resid_in (so far) and d o_proj output.
            let g_o = Proj::O.input_group();
            self.group_backward(
                l,
                g_o,
                Some(la.att),
                la.xa[g_o],
                &[(Proj::O, a.dres)],
                a.datt,
                false,
                n,
                a.dxa,
            )?;
            self.attn_backward(a, la, n, s)?;
            // The outputs' slot is free: the layer below's come back meanwhile (when that one
            // stores no residual, the outputs of the layer it re-runs first).
            if let Some(o) = &a.outputs_offload {
                if let Some(below) = o.member_below(l) {
                    let first = below - usize::from(a.skipped_resid.contains(&below));
                    o.prefetch(gpu, first, n)?;
                }
            }
            let rope_back = |dx, heads, what| {
                rope::rope::backward(
                    gpu,
                    &rope::rope::Dims {
                        N: n,
                        H: heads,
                        D: hd,
                        P: p_rows,
                    },
                    a.pos,
                    self.cos,
                    self.sin,
                    dx,
                )
                .ctx(what)
            };
            rope_back(a.dq, hq, "rope backward q")?;
            rope_back(a.dk, hkv, "rope backward k")?;
            let (mut dq, mut dk) = (a.dq, a.dk);
            if let (Some(qn), Some(kn)) = (&lw.q_norm, &lw.k_norm) {
                let head_norm_back = |rows: usize, x, w, rstd, dy, dx, what| {
                    norm::rms_norm::backward_dx(
                        gpu,
                        &norm::rms_norm::Dims { R: rows, C: hd },
                        x,
                        w,
                        rstd,
                        dy,
                        dx,
                    )
                    .ctx(what)
                };
                head_norm_back(
                    n * hq,
                    la.q_pre,
                    self.w(qn),
                    la.q_rstd,
                    a.dq,
                    a.dq_pre,
                    "q norm backward",
                )?;
                head_norm_back(
                    n * hkv,
                    la.k_pre,
                    self.w(kn),
                    la.k_rstd,
                    a.dk,
                    a.dk_pre,
                    "k norm backward",
                )?;
                dq = a.dq_pre;
                dk = a.dk_pre;
            }
            let x = a.ln[l];
            let g_qkv = Proj::Q.input_group();
            self.group_backward(
                l,
                g_qkv,
                Some(x),
                la.xa[g_qkv],
                &[(Proj::Q, dq), (Proj::K, dk), (Proj::V, a.dv)],
                a.dln,
                false,
                n,
                a.dxa,
            )?;
            if l > 0 {
                add_norm_backward(
                    self.w(&lw.input_norm),
                    a.resid[l],
                    a.rstd[l],
                    "input norm backward",
                )?;
            }
        }
        Ok(())
    }

    /// Attention backward of layer `l` from `acts.datt` into `acts.dq`, `dk`, `dv`.
    fn attn_backward(&self, a: &Acts, la: &LayerActs, n: usize, s: usize) -> GpuResult<()> {
        let d = self.dims;
        let dp = a.sizes.head_dim_pad;
        let mut ad = AttentionDims::new(n, s, d.heads, d.kv_heads, dp);
        if dp == d.head_dim {
            return attention_backward(
                self.gpu,
                ad,
                la.q,
                la.k,
                la.v,
                la.att,
                la.lse,
                a.datt,
                a.cu,
                a.dq,
                a.dk,
                a.dv,
                a.attn_scratch,
            )
            .ctx("attention backward");
        }
        ad.scale = 1.0 / (d.head_dim as f32).sqrt();
        self.pad(la.q, a.qp, n * d.heads, a.sel)?;
        self.pad(la.k, a.kp, n * d.kv_heads, a.sel)?;
        self.pad(la.v, a.vp, n * d.kv_heads, a.sel)?;
        self.pad(la.att, a.op, n * d.heads, a.sel)?;
        self.pad(a.datt, a.dop, n * d.heads, a.sel)?;
        attention_backward(
            self.gpu,
            ad,
            a.qp,
            a.kp,
            a.vp,
            a.op,
            la.lse,
            a.dop,
            a.cu,
            a.dqp,
            a.dkp,
            a.dvp,
            a.attn_scratch,
        )
        .ctx("attention backward (padded)")?;
        self.unpad(a.dqp, a.dq, n * d.heads, a.sel)?;
        self.unpad(a.dkp, a.dk, n * d.kv_heads, a.sel)?;
        self.unpad(a.dvp, a.dv, n * d.kv_heads, a.sel)
    }

    /// Mean cross-entropy of a packed batch (`targets` (N): next-token ids, -100 ignored).
    pub fn loss(&mut self, batch: &Batch, targets: &[i32]) -> GpuResult<f32> {
        let counted = self.load_batch(batch, Some(targets))?;
        if counted == 0 {
            return Ok(0.0);
        }
        self.forward_loaded()?;
        self.cross_entropy_loaded(false)?;
        let loss = self.mean_loss_loaded(targets)?;
        Ok(loss as f32)
    }

    /// Mean cross-entropy and its LoRA gradients, **added** into the device gradients (call
    /// [`Self::zero_grads`] first for a fresh step). Requires an adapter ([`Self::set_lora`]).
    /// The step (forward, loss, backward) runs as a CUDA graph from the second step of a batch
    /// shape on ([`step_graph`]), unless a profile is open or gate/up outputs travel through
    /// the host ([`Self::graph_pays`]): the host uploads the batch, its targets and the loss
    /// coefficients before it in one copy ([`Self::load_batch`]) and reads the loss after.
    pub fn loss_and_grads(&mut self, batch: &Batch, targets: &[i32]) -> GpuResult<f32> {
        if self.lora.is_none() {
            return Err("loss_and_grads needs an adapter (set_lora)".into());
        }
        let counted = self.load_batch(batch, Some(targets))?;
        if counted == 0 {
            return Ok(0.0);
        }
        let step = |m: &Self| {
            m.forward_loaded()?;
            m.cross_entropy_loaded(true)?;
            m.backward_loaded()
        };
        if !self.cuda_graphs || self.gpu.profiling() || !self.graph_pays() {
            step(self)?;
        } else {
            let key = self.step_key()?;
            let a = self.acts.as_ref().ok_or("activations not allocated")?;
            let ran = a
                .step_graphs
                .borrow_mut()
                .run(self.gpu, key, "training step", || step(self));
            self.graph_steps += usize::from(ran?);
        }
        self.gpu.synchronize().ctx("training step")?;
        let loss = self.mean_loss_loaded(targets)?;
        Ok(loss as f32)
    }

    /// Whether the training step gains from running as a CUDA graph: not when gate/up outputs
    /// travel through the host (235 MB a layer for the 8B at 2 x 2048). Measured on the H200
    /// (benches/RESULTS.md, session 18), graph against eager: 3-4% slower with five layers'
    /// gate/up travelling (8B QLoRA and LoRA at 2 x 2048), +0.3-0.6% without (the 8B QLoRA
    /// with residuals and attention checkpoints travelling, or nothing; the 1B at 8 x 2048).
    fn graph_pays(&self) -> bool {
        let gate_up = self.acts.as_ref().and_then(|a| a.gate_up_offload.as_ref());
        gate_up.is_none_or(|o| o.travelling().is_empty())
    }

    /// Lets training and decode steps run as CUDA graphs (the default, unless
    /// `FTRT_CUDA_GRAPH=0`) or runs every one eagerly (off drops the training step's graphs, and a
    /// decode cache's at its next step).
    pub fn set_cuda_graphs(&mut self, on: bool) {
        self.cuda_graphs = on;
        if let (false, Some(a)) = (on, self.acts.as_ref()) {
            a.step_graphs.borrow_mut().clear();
        }
    }

    /// Adds the LoRA terms of gate, up and down in the MLP's activation (the default, unless
    /// `FTRT_LORA_IN_ACTIVATION=0`) or by rank-r GEMMs over the projections' outputs
    /// ([`mlp_activation`]). Graphs captured the other way are not replayed: the setting is
    /// part of their key ([`step_graph`]).
    pub fn set_lora_in_activation(&mut self, on: bool) {
        self.activation_lora = on;
    }

    /// Training steps run as CUDA graphs so far (captured and launched, or replayed).
    pub fn graph_steps(&self) -> usize {
        self.graph_steps
    }

    /// Final-norm outputs (N, C) of a batch, as f32 (tests).
    pub fn hidden(&mut self, batch: &Batch) -> GpuResult<Vec<f32>> {
        self.load_batch(batch, None)?;
        self.forward_loaded()?;
        let a = self.acts.as_ref().expect("allocated");
        let mut h = vec![bf16::ZERO; batch.len() * self.dims.hidden];
        self.gpu
            .download(a.ln[self.dims.layers], &mut h)
            .ctx("downloading hidden states")?;
        Ok(h.into_iter().map(|x| x.to_f32()).collect())
    }

    /// The GPU this model runs on.
    pub fn gpu(&self) -> &'g Gpu {
        self.gpu
    }
}

/// A PEFT-initialised adapter on every projection of `targets`: A ~ U(-1/sqrt(in), 1/sqrt(in)),
/// B = 0 (or B ~ U(-b_amp, b_amp) when `b_amp > 0`, so that gradients of A are non-zero in checks).
pub fn init_adapter(
    dims: &Dims,
    r: usize,
    alpha: f32,
    targets: &[Proj],
    seed: u64,
    b_amp: f32,
) -> LoraAdapter {
    let mut ad = LoraAdapter::zeros(dims, r, alpha, false, targets);
    let mut rng = SplitMix64::new(seed);
    for row in ad.slots.clone() {
        for (i, s) in row.iter().enumerate() {
            if let Some(s) = s {
                let inn = Proj::ALL[i].shape(dims).1;
                let bound = 1.0 / (inn as f32).sqrt();
                for x in &mut ad.data[s.a.clone()] {
                    *x = (rng.next_f32() * 2.0 - 1.0) * bound;
                }
                for x in &mut ad.data[s.b.clone()] {
                    *x = if b_amp > 0.0 {
                        (rng.next_f32() * 2.0 - 1.0) * b_amp
                    } else {
                        0.0
                    };
                }
            }
        }
    }
    ad
}
