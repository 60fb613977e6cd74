//! Host-side planning of the GPU model, testable without a GPU: the weight layout of a config
//! (the same ranges [`WeightStore::load`] produces), the element count of every activation
//! buffer for a token budget, the cross-entropy row chunk, and the checks a batch must pass
//! before any kernel sees it (so no kernel ever reads out of bounds).

use std::ops::Range;

use super::super::model::Batch;
use super::super::weights::{Dims, LayerWeights, Proj, WeightStore};
use crate::config::ModelConfig;

/// Logit elements held at once by the chunked cross-entropy (bf16: 512 MiB), when every
/// layer's activations are kept (the throughput mode).
pub const LOGIT_BUDGET: usize = 1 << 28;

/// The same with gradient checkpointing (bf16: 128 MiB): the lean mode trades a few more,
/// still large, head GEMMs for memory.
pub const LOGIT_BUDGET_LEAN: usize = 1 << 26;

/// Logit elements of one cross-entropy chunk when `kept` of `layers` layers keep their
/// activations.
pub fn logit_budget(kept: usize, layers: usize) -> usize {
    if kept < layers {
        LOGIT_BUDGET_LEAN
    } else {
        LOGIT_BUDGET
    }
}

/// Device slots of the rings holding the recomputed layers' offloaded checkpoints (see
/// `GpuLlama::set_offload_residuals`): a layer's copy-out has two layers' compute to finish in
/// before its slot is written again. One more while gate/up sets travel ([`resid_ring`]).
pub const RESID_RING: usize = 3;

/// From this many tokens per micro-batch on, the rings take one slot less: a layer's compute
/// there (tens of milliseconds, most of it attention on long sequences) covers its copies
/// many times over, and each slot is large (a 65,536-token (N, C) bf16 tensor of the 8B is
/// 0.5 GiB).
pub const SHORT_RING_TOKENS: usize = 65_536;

/// Whether the checkpoint offloads may pin `pinned` bytes of host rows: at most half of
/// `available` host memory (unknown: assumed to fit). The attention checkpoints travel along
/// with the residuals only then (long sequences fall back to checkpoints without q, k, v, then
/// to recomputing the attention half, whose checkpoints stay in the GPU's shared buffers), and
/// gate/up outputs only when all three fit.
pub fn pinned_rows_fit(pinned: usize, available: Option<u64>) -> bool {
    available.is_none_or(|a| pinned as u64 <= a / 2)
}

/// What happens to the recomputed layers' checkpoints (see `GpuLlama::set_offload_residuals`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offload {
    /// They stay on the device (one input residual per layer); the backward recomputes each
    /// layer's whole attention half.
    Off,
    /// Input residuals and attention checkpoints ([`attention_checkpoint`], with q, k and v
    /// when `qkv`) live in device rings and travel through pinned host memory; so do the gate
    /// and up outputs of the layers [`gate_up_layers`] picks. Without `qkv`, the q, k and v of
    /// [`below_top_layers`]`(.., resident_qkv)` stay on the device instead of being
    /// recomputed. At most `resid_travel` input residuals travel ([`resid_members`]; the
    /// host's memory sets it, [`resid_travel_cap`]): when fewer than all, the higher layers'
    /// stay in device buffers of their own and the attention checkpoints do not travel.
    ///
    /// The attention checkpoints travel only when no attention output is resident on the
    /// device ([`below_top_layers`]) and `outputs_travel` (the host's memory sets it,
    /// [`outputs_travel_cap`]) is no fewer than the recomputed layers. Else the attention
    /// outputs and log-sum-exps ([`attention_outputs`]) of the recomputed layers that keep none
    /// on the device take a one-slot ring instead of the shared set's buffers, and those of
    /// the lowest `outputs_travel` travel through host memory: their recompute runs no
    /// attention kernel; the others recompute theirs into the slot.
    ///
    /// When some would recompute theirs and storing no input residual for `sparse_skips` layers
    /// lets at least `sparse_min_gain` more outputs travel (at most `sparse_outputs_travel`
    /// then; [`sparse_min_gain`]: what pays for the re-runs, usize::MAX: never), the residuals
    /// are sparse ([`sparse_skips`]): that many recomputed layers at odd positions below the
    /// top, the lowest, store none ([`skipped_residuals`]), and the backward rebuilds one by
    /// re-running the forward of the layer below. With `resident_spares_skip` (an attention
    /// output's host row is no smaller than an input residual's: q_dim >= hidden, as in every
    /// supported model), each attention output kept on the device lets one skipped layer
    /// store its residual in the host rows the output would have taken.
    Checkpoints {
        qkv: bool,
        gate_up: GateUp,
        resident_qkv: usize,
        resid_travel: usize,
        outputs_travel: usize,
        sparse_skips: usize,
        sparse_outputs_travel: usize,
        sparse_min_gain: usize,
        resident_spares_skip: bool,
    },
}

/// The most input residuals ((`n`, `hidden`) bf16 each) whose pinned host rows fit half the
/// host's `available` memory ([`pinned_rows_fit`]); unbounded when it is unknown.
pub fn resid_travel_cap(n: usize, hidden: usize, available: Option<u64>) -> usize {
    let row = (2 * n * hidden).next_multiple_of(256) as u64;
    match available {
        Some(a) => (a / 2 / row.max(1)) as usize,
        None => usize::MAX,
    }
}

impl Offload {
    /// Checkpoint offload for micro-batches of `n` tokens in sequences of at most `seq` on a
    /// host with `available` memory (unknown: unbounded), with the checkpoints' q, k, v, the
    /// gate/up choice and the resident q, k, v as given: the residuals' and outputs' travel
    /// caps ([`resid_travel_cap`], [`outputs_travel_cap`] with every residual stored and with
    /// `sparse_skips` fewer), and what sparse residuals must gain ([`sparse_min_gain`]).
    /// `sparse_skips` is the fewest skipped residuals (of the (L - 1) / 2 at odd positions
    /// below the top) that let every layer below the top's outputs travel when all L are
    /// recomputed, or all of them where none do: each skip re-runs a layer forward, so no
    /// more than the host needs.
    pub fn for_host(
        d: &Dims,
        (n, seq): (usize, usize),
        available: Option<u64>,
        (qkv, gate_up, resident_qkv): (bool, GateUp, usize),
    ) -> Self {
        let resid_travel = resid_travel_cap(n, d.hidden, available);
        // the host rows of `stored` residuals: the ring's slots stay on the device
        let outputs_with = |stored: usize| {
            let rows = stored
                .saturating_sub(resid_ring(stored, n, false))
                .min(resid_travel);
            outputs_travel_cap(d, n, rows, available)
        };
        let most = d.layers.saturating_sub(1) / 2;
        let below = d.layers.saturating_sub(1);
        let sparse_skips = (1..=most)
            .find(|&k| outputs_with(d.layers - k) >= below)
            .unwrap_or(most);
        Offload::Checkpoints {
            qkv,
            gate_up,
            resident_qkv,
            resid_travel,
            outputs_travel: outputs_with(d.layers),
            sparse_skips,
            sparse_outputs_travel: outputs_with(d.layers - sparse_skips),
            sparse_min_gain: sparse_min_gain(d, n, seq, sparse_skips),
            resident_spares_skip: attention_outputs(d).iter().sum::<usize>() >= 2 * d.hidden,
        }
    }

    /// Checkpoint offload as on a host with room for everything (every residual and attention
    /// checkpoint travels, residuals never sparse), with the checkpoints' q, k, v, the gate/up
    /// choice and the resident q, k, v as given.
    pub const fn unbounded(qkv: bool, gate_up: GateUp, resident_qkv: usize) -> Self {
        Offload::Checkpoints {
            qkv,
            gate_up,
            resident_qkv,
            resid_travel: usize::MAX,
            outputs_travel: usize::MAX,
            sparse_skips: 0,
            sparse_outputs_travel: 0,
            sparse_min_gain: usize::MAX,
            resident_spares_skip: true,
        }
    }

    /// The same with `layers` recomputed layers keeping q, k, v on the device (no change
    /// without checkpoint offload).
    pub fn with_resident_qkv(self, layers: usize) -> Self {
        match self {
            Offload::Checkpoints {
                qkv,
                gate_up,
                resid_travel,
                outputs_travel,
                sparse_skips,
                sparse_outputs_travel,
                sparse_min_gain,
                resident_spares_skip,
                ..
            } => Offload::Checkpoints {
                qkv,
                gate_up,
                resident_qkv: layers,
                resid_travel,
                outputs_travel,
                sparse_skips,
                sparse_outputs_travel,
                sparse_min_gain,
                resident_spares_skip,
            },
            Offload::Off => Offload::Off,
        }
    }
}

/// Host memory the checkpoint offloads never pin when the attention outputs fill what the
/// residuals leave, for the process itself and the rest of the machine: 1/16 of the
/// `available` memory, at least [`HOST_RESERVE_MIN`] (8 GiB of the H200 host's 123.6, where
/// the 262k step's process holds ~3 GiB besides its pinned rows).
pub fn host_reserve(available: u64) -> u64 {
    (available / 16).max(HOST_RESERVE_MIN)
}

/// The least [`host_reserve`]: 8 GiB.
pub const HOST_RESERVE_MIN: u64 = 8 << 30;

/// Bytes per token of the attention outputs' set ([`Offload::Checkpoints`]): the attention
/// output (bf16 (Hq D)) and the log-sum-exp (f32 per query head).
pub fn attention_outputs(d: &Dims) -> [usize; 2] {
    [2 * d.q_dim(), 4 * d.heads]
}

/// The most recomputed layers whose attention outputs ([`attention_outputs`], `n` tokens) fit
/// in pinned host rows next to `resid_rows` travelling input residuals, within the host's
/// `available` memory less [`host_reserve`]; unbounded when it is unknown.
/// The 8B at one 262,144-token sequence on the H200 host (123.6 GiB available, 8 reserved):
/// 30 residuals pin 60 GiB, and 27 layers' outputs (2.03 GiB each) fit the 55.6 GiB left; with
/// 26 residual rows (4 layers storing none, [`sparse_skips`]) all 31 below the top fit.
pub fn outputs_travel_cap(d: &Dims, n: usize, resid_rows: usize, available: Option<u64>) -> usize {
    let Some(a) = available else {
        return usize::MAX;
    };
    let row = |pieces: &[usize]| piece_start(n, pieces, pieces.len()).max(1) as u64;
    let resid = resid_rows as u64 * row(&[2 * d.hidden]);
    let free = a.saturating_sub(host_reserve(a)).saturating_sub(resid);
    (free / row(&attention_outputs(d))) as usize
}

/// Byte offset of piece `i` in a checkpoint offload's slot (and in its host row): pieces 0..i
/// (`piece_bytes` bytes per token each), each `n_max` tokens rounded up to 256 bytes (every
/// piece aligned for vector loads).
pub fn piece_start(n_max: usize, piece_bytes: &[usize], i: usize) -> usize {
    piece_bytes[..i]
        .iter()
        .map(|&b| (n_max * b).next_multiple_of(256))
        .sum()
}

/// How many of `m` recomputed layers store no input residual with checkpoint `offload` at `n`
/// tokens, `resident` of them keeping their attention outputs on the device (at most
/// (m - 1) / 2: odd positions below the top, [`skipped_residuals`]). None unless, storing all,
/// some of the other layers below the top would recompute their attention (fewer than them
/// travel, [`Offload::Checkpoints`]); then `sparse_skips` (one fewer for each resident output
/// with `resident_spares_skip` when `sparse_skips` let every output below the top travel),
/// when that lets enough more travel to pay for the re-runs ([`sparse_min_gain`]; the 8B at
/// 262k: 4 of 15, every output travels; 1 with 3 resident), or all (m - 1) / 2 when, with
/// resident outputs and re-runs cheaper than attention, they take the residuals that the host
/// cannot hold off the device (the 8B at 524k: 15 of 4 GiB each, room for the resident
/// outputs).
pub fn sparse_skips(offload: Offload, m: usize, n: usize, resident: usize) -> usize {
    match offload {
        Offload::Checkpoints {
            resid_travel,
            outputs_travel,
            sparse_skips,
            sparse_outputs_travel,
            sparse_min_gain,
            resident_spares_skip,
            ..
        } if m >= 3 => {
            let below = m - 1 - resident.min(m - 1);
            let gain = sparse_outputs_travel
                .min(below)
                .saturating_sub(outputs_travel.min(below));
            let more = gain > 0 && gain >= sparse_min_gain;
            let room = resident > 0
                && sparse_min_gain != usize::MAX
                && resid_members(m, n, resid_travel) < m;
            // with every output below the top travelling at `sparse_skips`, a resident output's
            // host row holds a residual's
            let spares = resident_spares_skip && sparse_outputs_travel >= m - 1;
            let spared = usize::from(spares) * resident;
            match outputs_travel < below {
                true if room => (m - 1) / 2,
                true if more => sparse_skips.min((m - 1) / 2).saturating_sub(spared),
                _ => 0,
            }
        }
        _ => 0,
    }
}

/// Attention FLOPs per second the checkpoint planner assumes for the kernels inside a long
/// step (session 14, 262k: ~500 TFLOP/s at the power limit).
const ATTENTION_FLOPS_PER_S: f64 = 500e12;

/// Seconds of one layer's attention forward and of one layer forward without it, at
/// micro-batches of `n` tokens in sequences of `seq` ([`ATTENTION_FLOPS_PER_S`],
/// [`layer_forward_seconds`]).
fn attention_and_layer_seconds(d: &Dims, n: usize, seq: usize) -> (f64, f64) {
    let attention = attention_forward_flops(d, seq) * n as f64 / ATTENTION_FLOPS_PER_S;
    (attention, layer_forward_seconds(d) * n as f64)
}

/// The fewest more layers whose attention outputs `skips` skipped residuals ([`sparse_skips`])
/// must let travel to pay for the layer forwards they add (`skips` re-runs without attention,
/// against that many attention forwards at micro-batches of `n` tokens in sequences of at most
/// `seq`); usize::MAX where an attention forward costs no more than a layer forward (short
/// sequences: never). The 8B at one 262k sequence: 2 for its 8 skips (re-runs of 0.23 s
/// against 1.1 s attention forwards; 8 more travel there), 4 for 15; at 64 sequences of 4096
/// tokens in the same budget: never.
pub fn sparse_min_gain(d: &Dims, n: usize, seq: usize, skips: usize) -> usize {
    let (attention, layer) = attention_and_layer_seconds(d, n, seq);
    if attention <= layer {
        return usize::MAX;
    }
    (skips as f64 * layer / attention).floor() as usize + 1
}

/// Seconds the backward of `m` recomputed layers spends on forward work that memory could
/// spare, with checkpoint `offload` and `resident` attention outputs on the device: the
/// attention forwards of the layers below the top whose outputs neither stay nor travel
/// ([`outputs_travelling`]; none when the attention checkpoints travel), and the layer
/// forwards that sparse residuals re-run ([`skipped_residuals`]), with their attention where
/// their outputs are not kept.
pub fn spared_work_seconds(
    d: &Dims,
    offload: Offload,
    (m, n, seq): (usize, usize, usize),
    resident: usize,
) -> f64 {
    let (attention, layer) = attention_and_layer_seconds(d, n, seq);
    let below = m.saturating_sub(1);
    let resident = resident.min(below);
    let full = matches!(offload, Offload::Checkpoints { resid_travel, outputs_travel, .. }
        if resident == 0 && outputs_travel >= m && resid_members(m, n, resid_travel) == m);
    let recomputed = match full {
        true => 0,
        false => {
            below - resident - outputs_travelling(offload, m, n, resident).min(below - resident)
        }
    };
    // a re-run whose layer keeps no attention output recomputes that attention too
    let skipped = skipped_residuals(offload, m, n, resident);
    let reruns_attending = skipped
        .iter()
        .filter(|&&l| !keeps_attention_output(offload, m, n, resident, l - 1))
        .count();
    recomputed as f64 * attention
        + skipped.len() as f64 * layer
        + reruns_attending as f64 * attention
}

/// How many of `m` recomputed layers' attention outputs travel at `n` tokens with checkpoint
/// `offload` when the attention checkpoints do not and `resident` keep theirs on the device:
/// the lowest, at most the cap that goes with [`sparse_skips`], none of the resident ones or
/// the top.
pub fn outputs_travelling(offload: Offload, m: usize, n: usize, resident: usize) -> usize {
    match offload {
        Offload::Checkpoints {
            outputs_travel,
            sparse_outputs_travel,
            ..
        } if m >= 2 => {
            let cap = match sparse_skips(offload, m, n, resident) {
                0 => outputs_travel,
                _ => sparse_outputs_travel,
            };
            cap.min(m - 1 - resident.min(m - 1))
        }
        _ => 0,
    }
}

/// The recomputed layers (of `0..m`, the lowest) that store no input residual with checkpoint
/// `offload` at `n` tokens and `resident` attention outputs on the device: the lowest
/// [`sparse_skips`] of those at odd positions below the highest (whose input the backward
/// needs first, with nothing below re-run yet). Each one's layer below stores its own.
pub fn skipped_residuals(offload: Offload, m: usize, n: usize, resident: usize) -> Vec<usize> {
    let count = sparse_skips(offload, m, n, resident);
    (1..m.saturating_sub(1)).step_by(2).take(count).collect()
}

/// Whether recomputed layer `l` (of `0..m`) keeps its attention outputs from the forward to its
/// backward when they do not take the checkpoint ring: it is among the lowest
/// [`outputs_travelling`] or the `resident` below the top ([`below_top_layers`]).
pub fn keeps_attention_output(
    offload: Offload,
    m: usize,
    n: usize,
    resident: usize,
    l: usize,
) -> bool {
    let resident_from = m.saturating_sub(1) - resident.min(m.saturating_sub(1));
    l < outputs_travelling(offload, m, n, resident) || (l >= resident_from && l + 1 < m)
}

/// How many of `recomputed` layers' input residuals live in the residual ring at `n` tokens
/// when at most `travel` of them go through host memory: the lowest `travel` plus the ring's
/// slots (those stay in their slots); the layers above keep theirs in device buffers.
pub fn resid_members(recomputed: usize, n: usize, travel: usize) -> usize {
    // (gate/up sets travel only when every residual does: the ring without their slot)
    recomputed.min(travel.saturating_add(resid_ring(recomputed, n, false)))
}

/// The recomputed layers (`recomputed`, ascending) that keep some of their forward's tensors
/// in device buffers of their own: the `count` highest below the highest recomputed layer
/// (whose forward's shared buffers still hold its own), ascending. They keep
/// - q, k and v (after norm and RoPE; with q/k norms also the norms' inputs and rstds) and
///   q/k/v's x A^T, when the attention checkpoints travel without them: the backward then
///   recomputes no projection of their attention half. Memory is the limit:
///   [`resident_qkv_bytes`] a layer, which `--keep-layers auto` spends after whole layers (the
///   1B at 8 x 2048: 100 MB a layer against ~0.5 ms of recompute);
/// - or the attention output and log-sum-exp, when no attention checkpoint travels
///   ([`resident_attention_bytes`]): the backward's recompute then runs no attention kernel.
pub fn below_top_layers(recomputed: &[usize], count: usize) -> Vec<usize> {
    let below_top = recomputed.len().saturating_sub(1);
    recomputed[below_top.saturating_sub(count)..below_top].to_vec()
}

/// Device bytes of the attention output (bf16 (Hq D)) and log-sum-exp (f32 per query head) of
/// one layer [`below_top_layers`] keeps, each buffer at least 256 bytes, as allocated.
pub fn resident_attention_bytes(d: &Dims, n: usize) -> usize {
    (2 * n * d.q_dim()).max(256) + (4 * n * d.heads).max(256)
}

/// Device bytes of one layer [`below_top_layers`] keeps: q, k, v, the q/k/v stack's x A^T
/// (`xa_qkv` columns) and, with q/k norms, their inputs and f32 rstds; each buffer at least
/// 256 bytes, as allocated.
pub fn resident_qkv_bytes(d: &Dims, n: usize, qk_norm: bool, xa_qkv: usize) -> usize {
    let mut bufs = vec![2 * n * d.q_dim(), 2 * n * d.kv_dim(), 2 * n * d.kv_dim()];
    if xa_qkv > 0 {
        bufs.push(2 * n * xa_qkv);
    }
    if qk_norm {
        bufs.extend([
            2 * n * d.q_dim(),
            2 * n * d.kv_dim(),
            4 * n * d.heads,
            4 * n * d.kv_heads,
        ]);
    }
    bufs.iter().map(|&b| b.max(256)).sum()
}

/// How many recomputed layers carry their gate and up outputs through host memory (see
/// [`gate_up_layers`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GateUp {
    /// As many as the forward's spare device-to-host time carries.
    Auto,
    /// This many (0: none).
    Layers(usize),
}

/// Piece indices of [`attention_checkpoint`].
pub mod ckpt {
    pub const ATT: usize = 0;
    pub const RESID_MID: usize = 1;
    pub const XA_O: usize = 2;
    pub const LSE: usize = 3;
    pub const XA_GATE_UP: usize = 4;
    pub const XA_DOWN: usize = 5;
    pub const Q: usize = 6;
    pub const K: usize = 7;
    pub const V: usize = 8;
    pub const XA_QKV: usize = 9;
    pub const Q_PRE: usize = 10;
    pub const K_PRE: usize = 11;
    pub const Q_RSTD: usize = 12;
    pub const K_RSTD: usize = 13;
}

/// The attention checkpoint of a recomputed layer, bytes per token of each piece in ring order
/// ([`ckpt`]): what its backward reads of the attention half besides its input residual, and
/// the MLP's x A^T. The attention output (bf16 (Hq D)), the post-attention residual (C),
/// o_proj's x A^T, the log-sum-exp (f32 per query head), the gate/up and down stacks' x A^T
/// (`xa[g]` columns for input group g, [`Proj::INPUT_GROUPS`]); with `qkv` also the queries,
/// keys and values after norm and RoPE, the q/k/v stack's x A^T and, with q/k norms
/// (`qk_norm`), the norms' inputs and f32 rstds: the backward then recomputes no projection
/// of the attention half, and of the MLP only gate and up.
pub fn attention_checkpoint(d: &Dims, qk_norm: bool, xa: [usize; 4], qkv: bool) -> Vec<usize> {
    let g = |p: Proj| 2 * xa[p.input_group()];
    let mut pieces = vec![
        2 * d.q_dim(),
        2 * d.hidden,
        g(Proj::O),
        4 * d.heads,
        g(Proj::Gate),
        g(Proj::Down),
    ];
    if qkv {
        pieces.extend([2 * d.q_dim(), 2 * d.kv_dim(), 2 * d.kv_dim(), g(Proj::Q)]);
        if qk_norm {
            pieces.extend([2 * d.q_dim(), 2 * d.kv_dim(), 4 * d.heads, 4 * d.kv_heads]);
        }
    }
    pieces
}

/// Projection FLOPs per second of a lean layer forward, everything in it counted (the 8B
/// QLoRA forward: ~480 TFLOP/s of its projections' FLOPs, session 9's profile).
const LAYER_FORWARD_FLOPS_PER_S: f64 = 500e12;

/// Whether the attention checkpoints should carry q, k and v: when a layer's forward, timed by
/// its projection FLOPs, still covers the device-to-host copies of its offloaded tensors
/// (input residual plus checkpoint with q, k, v) at the H200's planned copy bandwidth. Else
/// the copies would stall the forward longer than recomputing the q/k/v projections takes
/// (the 1B: its narrow layers make ~0.24 us of forward per token against ~0.37 us of copies;
/// the 8B: 0.87 against 0.74).
pub fn checkpoint_qkv(d: &Dims, qk_norm: bool) -> bool {
    let cost = ftrt_runtime::planner::CostModel::H200;
    let per_token: usize = 2 * d.hidden
        + attention_checkpoint(d, qk_norm, [0; 4], true)
            .iter()
            .sum::<usize>();
    cost.d2h_seconds(per_token) <= layer_forward_seconds(d)
}

/// Seconds per token of one layer's forward, timed by its projection FLOPs at
/// [`LAYER_FORWARD_FLOPS_PER_S`].
fn layer_forward_seconds(d: &Dims) -> f64 {
    let (c, q, kv) = (d.hidden, d.q_dim(), d.kv_dim());
    let params = c * (2 * q + 2 * kv) + 3 * c * d.intermediate;
    2.0 * params as f64 / LAYER_FORWARD_FLOPS_PER_S
}

/// Share of the forward's spare device-to-host time that [`GateUp::Auto`] gives the gate/up
/// copies (the rest absorbs the forward running faster than planned).
const GATE_UP_SPARE_USE: f64 = 0.75;

/// The recomputed layers (of `0..m`, ascending) whose gate and up outputs ((N, I) bf16 each)
/// the forward writes into a one-slot device ring, copied to pinned host memory when the next
/// one needs the slot and brought back for the backward: their MLP recompute then runs no
/// projection (only the norm for gate/up's dA and the fused SwiGLU backward). The highest
/// recomputed layer is left out (its forward's values are on the device anyway) unless
/// [`GateUp::Layers`] asks for more than the others. The picks are spread evenly, highest
/// first, so each copy has several layers' compute to hide behind.
///
/// [`GateUp::Auto`] takes one that stays in the slot (no copy); with `travel`, also as many
/// travelling ones as [`GATE_UP_SPARE_USE`] of the forward's spare device-to-host time carries:
/// `m` layer forwards ([`layer_forward_seconds`]) less the copies of the travelling input
/// residuals and attention checkpoints (`checkpoint` bytes per token). None when the batch has
/// more rows than one MLP tile (`mlp_rows`: the slot holds every row of the batch) or `m` < 2.
/// The caller allows travel with NF4 weights only: on the H200 at 2 x 2048 the 8B's five
/// picks gained 1.1% a step in 4-bit mode and lost 0.9% with bf16 weights (the copies slow a
/// forward that has no dequantization to hide them behind; session 10, call F).
pub fn gate_up_layers(
    d: &Dims,
    checkpoint: usize,
    (m, n, mlp_rows): (usize, usize, usize),
    want: GateUp,
    travel: bool,
) -> Vec<usize> {
    let count = match want {
        GateUp::Layers(k) => k.min(m),
        GateUp::Auto if n > mlp_rows || m < 2 => 0,
        GateUp::Auto if !travel => 1,
        GateUp::Auto => {
            let cost = ftrt_runtime::planner::CostModel::H200;
            // the sets that travel with the ring's base slots (one more stays with gate/up's)
            let travelling = (m - resid_ring(m, n, false)) as f64;
            let spare = m as f64 * layer_forward_seconds(d)
                - travelling * cost.d2h_seconds(2 * d.hidden + checkpoint);
            let per_layer = cost.d2h_seconds(4 * d.intermediate);
            1 + (GATE_UP_SPARE_USE * spare / per_layer).max(0.0) as usize
        }
    };
    if count == 0 {
        return Vec::new();
    }
    let below_top = if count < m { m - 1 } else { m };
    let count = count.min(below_top);
    let step = below_top / count;
    let mut layers: Vec<usize> = (0..count).map(|i| below_top - 1 - i * step).collect();
    layers.reverse();
    layers
}

/// Rows per MLP tile: the MLP (gate, up, act and their gradients) of a recomputed layer runs
/// over the tokens in tiles of this many rows, so its (rows, I) buffers are a tile's, not the
/// whole batch's (the intermediate width is 3.5-4x the hidden width).
pub const MLP_TILE_ROWS: usize = 4096;

/// Whether some of [`gate_up_layers`]' `count` picks travel through the host: all but the
/// top one do (it stays in the device slot), and then the rings take a slot more
/// ([`resid_ring`]).
pub fn gate_up_travel(count: usize) -> bool {
    count > 1
}

/// Ring slots for `recomputed` offloaded layers at `n` tokens per micro-batch: [`RESID_RING`],
/// one fewer from [`SHORT_RING_TOKENS`] tokens on, and one more while some layers' gate/up sets
/// travel (`gate_up_travel`, [`gate_up_layers`]). Such a set's copy to the host (two (N, I)
/// bf16 tensors: 224 MiB, ~4.5 ms on the 8B at 4096 tokens) outlasts a layer's forward, and
/// the copies queued behind it would hold up the ring's next writes: a fourth slot gives them
/// a third layer's compute (the 8B QLoRA lean at 2 x 2048: +1.4% a step for 0.14 GiB,
/// session 29).
pub fn resid_ring(recomputed: usize, n: usize, gate_up_travel: bool) -> usize {
    let slots = if n >= SHORT_RING_TOKENS {
        RESID_RING - 1
    } else {
        RESID_RING
    };
    recomputed.min(slots + usize::from(gate_up_travel))
}

/// Residual streams (N, C) on the device at `n` tokens when `resident` recomputed layers keep
/// their attention outputs there: L + 1, or with checkpoint offload the ring instead of its
/// members' inputs ([`resid_members`] of the layers that store one; the kept layers' inputs,
/// the last layer's output and the recomputed layers above the members stay; the layers of
/// [`skipped_residuals`] share the last layer's output's buffer, free while the layers'
/// backward runs; the ring has a slot more while gate/up sets travel, `gate_up_travel`).
pub fn device_residuals(
    layers: usize,
    kept: usize,
    offload: Offload,
    n: usize,
    resident: usize,
    gate_up_travel: bool,
) -> usize {
    let recomputed = layers - kept.min(layers);
    match offload {
        Offload::Checkpoints { resid_travel, .. } => {
            let skipped = skipped_residuals(offload, recomputed, n, resident).len();
            let members = resid_members(recomputed - skipped, n, resid_travel);
            layers + 1 - skipped - members + resid_ring(members, n, gate_up_travel)
        }
        Offload::Off => layers + 1,
    }
}

/// Head dims the GPU attention kernels are instantiated for; others are zero-padded to 64.
pub const ATTN_HEAD_DIMS: [usize; 2] = [64, 128];

/// The ranges of every weight of `config` in one flat buffer, in [`WeightStore::load`]'s order
/// (`data` left empty): the layout of the device weight buffer when no host copy exists.
pub fn weight_layout(config: &ModelConfig) -> WeightStore {
    let d = Dims::of(config);
    let mut at = 0usize;
    let mut take = |n: usize| {
        let r = at..at + n;
        at += n;
        r
    };
    let embed = take(d.vocab * d.hidden);
    let mut layers = Vec::with_capacity(d.layers);
    for _ in 0..d.layers {
        let input_norm = take(d.hidden);
        let mut proj: [Range<usize>; 7] = Default::default();
        let mut bias: [Option<Range<usize>>; 7] = Default::default();
        for p in Proj::ALL {
            let (out, inn) = p.shape(&d);
            proj[p.index()] = take(out * inn);
            let wants_bias = match p {
                Proj::Q | Proj::K | Proj::V => config.qkv_bias,
                Proj::O => config.o_proj_bias,
                _ => config.mlp_bias,
            };
            if wants_bias {
                bias[p.index()] = Some(take(out));
            }
        }
        let (q_norm, k_norm) = if config.qk_norm {
            (Some(take(d.head_dim)), Some(take(d.head_dim)))
        } else {
            (None, None)
        };
        let post_norm = take(d.hidden);
        layers.push(LayerWeights {
            input_norm,
            proj,
            bias,
            q_norm,
            k_norm,
            post_norm,
        });
    }
    let final_norm = take(d.hidden);
    let lm_head = if config.tie_word_embeddings {
        None
    } else {
        Some(take(d.vocab * d.hidden))
    };
    WeightStore {
        data: Vec::new(),
        embed,
        layers,
        final_norm,
        lm_head,
    }
}

/// Total elements of a layout (end of its last range).
pub fn layout_len(w: &WeightStore) -> usize {
    let mut end = w.embed.end.max(w.final_norm.end);
    if let Some(h) = &w.lm_head {
        end = end.max(h.end);
    }
    for l in &w.layers {
        end = end.max(l.input_norm.end).max(l.post_norm.end);
        for r in l
            .proj
            .iter()
            .chain(l.bias.iter().flatten())
            .chain(l.q_norm.iter())
            .chain(l.k_norm.iter())
        {
            end = end.max(r.end);
        }
    }
    end
}

/// (host range, device range) of one weight.
pub type RangePair = (Range<usize>, Range<usize>);

/// Projection weights that stay bf16 in the 4-bit mode ("dynamic 4-bit"): those whose Hugging
/// Face module path (`model.layers.{l}.mlp.down_proj`) contains one of the patterns, as
/// transformers' `llm_int8_skip_modules` matches. The default, no pattern, quantizes every
/// decoder projection (embeddings, norms and lm_head are bf16 in any case).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeepBf16(pub Vec<String>);

impl KeepBf16 {
    /// Patterns from a comma-separated list (empty items dropped).
    pub fn parse(csv: &str) -> Self {
        Self(
            csv.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect(),
        )
    }

    /// Whether projection `p` of layer `l` stays bf16.
    pub fn keeps(&self, l: usize, p: Proj) -> bool {
        let path = p.hf_prefix(l);
        self.0.iter().any(|pat| path.contains(pat.as_str()))
    }

    /// The patterns that match no projection of a `layers`-layer model (a typo must not pass
    /// silently).
    pub fn unmatched(&self, layers: usize) -> Vec<&str> {
        self.0
            .iter()
            .filter(|pat| {
                !(0..layers).any(|l| {
                    Proj::ALL
                        .iter()
                        .any(|p| p.hf_prefix(l).contains(pat.as_str()))
                })
            })
            .map(String::as_str)
            .collect()
    }
}

/// The device layout of the 4-bit mode: every range of `w` except the projection weights that
/// are quantized (all but those `keep` names), packed in the same order into one bf16 buffer
/// (quantized projections' ranges left empty at the position they would start, since their NF4
/// copies live elsewhere), and the (host range, device range) pairs to copy. `norm_ranges` of
/// the result are the norms' device ranges.
pub fn compact_without_proj(w: &WeightStore, keep: &KeepBf16) -> (WeightStore, Vec<RangePair>) {
    let mut at = 0usize;
    let mut pairs = Vec::new();
    let mut mv = |r: &Range<usize>| {
        let d = at..at + r.len();
        at += r.len();
        pairs.push((r.clone(), d.clone()));
        d
    };
    let embed = mv(&w.embed);
    let mut layers = Vec::with_capacity(w.layers.len());
    for (li, l) in w.layers.iter().enumerate() {
        let input_norm = mv(&l.input_norm);
        let mut proj: [Range<usize>; 7] = Default::default();
        let mut bias: [Option<Range<usize>>; 7] = Default::default();
        for (b, src) in bias.iter_mut().zip(&l.bias) {
            *b = src.as_ref().map(&mut mv);
        }
        let q_norm = l.q_norm.as_ref().map(&mut mv);
        let k_norm = l.k_norm.as_ref().map(&mut mv);
        let post_norm = mv(&l.post_norm);
        for (p, (dst, src)) in Proj::ALL.iter().zip(proj.iter_mut().zip(&l.proj)) {
            *dst = if keep.keeps(li, *p) {
                mv(src)
            } else {
                post_norm.end..post_norm.end
            };
        }
        layers.push(LayerWeights {
            input_norm,
            proj,
            bias,
            q_norm,
            k_norm,
            post_norm,
        });
    }
    let final_norm = mv(&w.final_norm);
    let lm_head = w.lm_head.as_ref().map(&mut mv);
    (
        WeightStore {
            data: Vec::new(),
            embed,
            layers,
            final_norm,
            lm_head,
        },
        pairs,
    )
}

/// Ranges of the norm weights (initialised to 1 by a random init, like Hugging Face).
pub fn norm_ranges(w: &WeightStore) -> Vec<Range<usize>> {
    let mut v = vec![w.final_norm.clone()];
    for l in &w.layers {
        v.push(l.input_norm.clone());
        v.push(l.post_norm.clone());
        v.extend(l.q_norm.clone());
        v.extend(l.k_norm.clone());
    }
    v
}

/// Element counts of the activation buffers for a budget of `n` tokens (all bf16 unless
/// noted). Per layer: what the backward reads; shared: forward/backward scratch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ActSizes {
    /// N: token budget.
    pub n: usize,
    /// (N, C): residual streams (L + 1 of them), norm outputs (L + 1), resid_mid (and a kept
    /// layer's ln2) per layer.
    pub nc: usize,
    /// (N, Hq * D): q, att (and q_pre with q/k norms).
    pub nq: usize,
    /// (N, Hkv * D): k, v (and k_pre).
    pub nkv: usize,
    /// (N, I): gate, up, act of a kept layer.
    pub ni: usize,
    /// Rows per MLP tile (at most N): a recomputed layer's ln2 holds that many rows; and
    /// (rows, I): its gate, up, act and the backward's d act, d gate, d up.
    pub mlp_rows: usize,
    pub ti: usize,
    /// (N, r): x A^T of one adapted projection (the backward's dxa scratch holds three, one
    /// q/k/v stack's).
    pub nr: usize,
    /// (Hq, N) f32: attention lse.
    pub lse: usize,
    /// Padded head dim used by the attention kernel (= D when D is 64 or 128).
    pub head_dim_pad: usize,
    /// Bytes of the attention backward's scratch ([`ftrt_ops::attention::scratch_bytes`]:
    /// dvec, and from `FUSED_DQ_MIN_TOKENS` tokens at head dim 128 the fused dq pass's accumulator).
    pub attn_scratch: usize,
    /// (N, Hq, Dp) and (N, Hkv, Dp): padded attention operands (0 when no padding is needed).
    pub nq_pad: usize,
    pub nkv_pad: usize,
    /// Rows of one cross-entropy chunk, and its logits (rows, V).
    pub ce_rows: usize,
    pub logits: usize,
    /// 4-bit mode with the MLP in more than one tile: 2 I C, up's and down's dequantized
    /// weights in slots of their own (0 otherwise; [`Self::with_nf4_slots`]).
    pub nf4_slots: usize,
    /// Whether the projections are NF4: then `GateUp::Auto` may send gate/up sets through the
    /// host ([`gate_up_layers`]).
    pub four_bit: bool,
}

impl ActSizes {
    /// Sizes for `n` tokens of a model of `d`, LoRA rank `r` (0: no adapter), cross-entropy
    /// chunks of at most `logit_budget` logits, MLP tiles of [`MLP_TILE_ROWS`].
    pub fn new(d: &Dims, n: usize, r: usize, logit_budget: usize) -> Self {
        Self::with_mlp_rows(d, n, r, logit_budget, MLP_TILE_ROWS)
    }

    /// [`Self::new`] with MLP tiles of `mlp_rows` rows (clamped to 1..=N).
    pub fn with_mlp_rows(
        d: &Dims,
        n: usize,
        r: usize,
        logit_budget: usize,
        mlp_rows: usize,
    ) -> Self {
        let mlp_rows = mlp_rows.clamp(1, n.max(1));
        let dp = padded_head_dim(d.head_dim);
        let pad = dp != d.head_dim;
        let ce_rows = ce_rows(n, d.vocab, logit_budget);
        Self {
            n,
            nc: n * d.hidden,
            nq: n * d.q_dim(),
            nkv: n * d.kv_dim(),
            ni: n * d.intermediate,
            mlp_rows,
            ti: mlp_rows * d.intermediate,
            nr: n * r,
            lse: n * d.heads,
            head_dim_pad: dp,
            attn_scratch: ftrt_ops::attention::scratch_bytes(
                &ftrt_ops::attention::AttentionDims::new(n, 1, d.heads, d.kv_heads, dp),
            ),
            nq_pad: if pad { n * d.heads * dp } else { 0 },
            nkv_pad: if pad { n * d.kv_heads * dp } else { 0 },
            ce_rows,
            logits: ce_rows * d.vocab,
            nf4_slots: 0,
            four_bit: false,
        }
    }

    /// These sizes for a model whose projections are NF4 (`four_bit`): when the MLP runs in
    /// more than one tile, up's and down's weights are dequantized into slots of their own
    /// (gate's into the model's scratch, [`super::GpuLlama::proj_weight`]), once a pass
    /// instead of once a tile. The 8B at one 262k sequence (64 tiles): +224 MiB, and a layer's
    /// MLP dequantizes 8 weights a step (forward 3, the recompute's gate and up, backward 3)
    /// instead of 512 (the step's 18,330 dequantizations took 0.9 s of 142.8, session 17).
    /// Their gate/up sets may travel too ([`Self::four_bit`]).
    pub fn with_nf4_slots(mut self, d: &Dims, four_bit: bool) -> Self {
        let tiled = self.mlp_rows < self.n;
        self.nf4_slots = usize::from(four_bit && tiled) * 2 * d.intermediate * d.hidden;
        self.four_bit = four_bit;
        self
    }

    /// Bytes of every buffer [`super::GpuLlama`] allocates on the device for activations
    /// (weights, LoRA state and pinned host memory excluded): per-layer saved tensors, residual
    /// streams and rstds, norm outputs, and the shared scratch, when
    /// - the last `kept` of the `d.layers` layers keep their activations and the others are
    ///   recomputed (one shared set of per-layer buffers for them, its MLP buffers one tile's);
    /// - with checkpoint `offload`, the residual ring's members ([`resid_members`]) keep their
    ///   input residuals in a ring of [`resid_ring`] slots, and, when every recomputed layer is
    ///   a member, every layer's attention outputs may travel and no attention output is
    ///   resident, their attention checkpoints ([`attention_checkpoint`]) take a ring too (the
    ///   upper bound: when they do not fit half the host, [`pinned_rows_fit`], the attention
    ///   outputs take a one-slot ring of the shared set's size instead); else, with some
    ///   outputs travelling (below the resident ones), the attention outputs take a one-slot
    ///   ring ([`attention_outputs`]); the layers of [`skipped_residuals`] hold no residual;
    /// - `widths[g]` adapted projections are in input group g's widest stack
    ///   ([`Proj::INPUT_GROUPS`]);
    /// - `resident_attention` recomputed layers ([`below_top_layers`]) keep their attention
    ///   output and log-sum-exp in buffers of their own.
    pub fn bytes(
        &self,
        d: &Dims,
        qk_norm: bool,
        widths: [usize; 4],
        kept: usize,
        offload: Offload,
        resident_attention: usize,
    ) -> usize {
        let b = 2usize;
        let kept = kept.min(d.layers);
        let shared = usize::from(kept < d.layers);
        let slots = kept + shared;
        let adapted_per_layer: usize = widths.iter().sum();
        // a layer's saved tensors, its ln2, gate, up and act `rows` rows (N, or one MLP tile's)
        let per_layer = |rows: usize| {
            b * (self.nc + rows * d.hidden + 2 * self.nq + 2 * self.nkv + 3 * rows * d.intermediate)
                + 4 * (self.lse + self.n)
                + adapted_per_layer * b * self.nr
                + if qk_norm {
                    b * (self.nq + self.nkv) + 4 * self.n * (d.heads + d.kv_heads)
                } else {
                    0
                }
        };
        // the attention checkpoint: out of the shared set, into a ring of slots (256-byte
        // aligned pieces) when offloading
        // the gate/up ring's slot (two (N, I) pieces) when some layers use it
        let recomputed = d.layers - kept;
        let resident = below_top_layers(&(0..recomputed).collect::<Vec<_>>(), resident_attention);
        let resident = resident.len();
        // (an upper bound: the checkpoints may not fit the host, [`pinned_rows_fit`])
        let checkpoints_travel = match offload {
            Offload::Checkpoints {
                resid_travel,
                outputs_travel,
                ..
            } => {
                recomputed > 0
                    && resident_attention == 0
                    && resid_members(recomputed, self.n, resid_travel) == recomputed
                    && outputs_travel >= recomputed
            }
            Offload::Off => false,
        };
        let (attn_ring, gate_up_travel) = match offload {
            Offload::Checkpoints {
                qkv,
                gate_up,
                resident_qkv,
                ..
            } if checkpoints_travel => {
                let r = self.nr / self.n.max(1);
                let pieces = attention_checkpoint(d, qk_norm, widths.map(|w| w * r), qkv);
                let checkpoint = |align: usize| {
                    pieces
                        .iter()
                        .map(|&p| (self.n * p).next_multiple_of(align))
                        .sum::<usize>()
                };
                let per_token = pieces.iter().sum();
                // (`Auto` picks several with 4-bit weights, the one that stays with bf16)
                let rows = (recomputed, self.n, self.mlp_rows);
                let gate_up = gate_up_layers(d, per_token, rows, gate_up, self.four_bit).len();
                let gate_up_travel = gate_up_travel(gate_up);
                let gate_up_slot = match gate_up {
                    0 => 0,
                    _ => 2 * (self.n * b * d.intermediate).next_multiple_of(256),
                };
                let resident = match qkv {
                    true => 0,
                    false => {
                        let layers: Vec<usize> = (0..recomputed).collect();
                        below_top_layers(&layers, resident_qkv).len()
                            * resident_qkv_bytes(
                                d,
                                self.n,
                                qk_norm,
                                widths[Proj::Q.input_group()] * r,
                            )
                    }
                };
                let ring = resid_ring(recomputed, self.n, gate_up_travel);
                let bytes = ring * checkpoint(256) - checkpoint(1) + gate_up_slot + resident;
                (bytes, gate_up_travel)
            }
            // the attention outputs' slot instead of the shared set's output and lse, when some
            // travel (below the resident ones)
            Offload::Checkpoints { .. }
                if outputs_travelling(offload, recomputed, self.n, resident) > 0 =>
            {
                let slot = piece_start(self.n, &attention_outputs(d), 2);
                (slot - b * self.nq - 4 * self.lse, false)
            }
            _ => (0, false),
        };
        let streams = device_residuals(d.layers, kept, offload, self.n, resident, gate_up_travel)
            * b
            * self.nc
            + (d.layers + 1) * 4 * self.n
            + (slots + 1) * b * self.nc;
        // dln, datt and tmp_c in one buffer (d resid is the final norm output's, in `streams`);
        // d act, d gate, d up; dq unless it is the shared resid_mid; dk, dv; dxa; logits;
        // padding operands; attention scratch
        let dq = usize::from(!dq_in_resid_mid(d, recomputed, !checkpoints_travel)) * self.nq;
        let scratch = b
            * (self.nc.max(self.nq)
                + 3 * self.ti
                + dq
                + 2 * self.nkv
                + 3 * self.nr
                + self.logits)
            + if qk_norm { b * (self.nq + self.nkv) } else { 0 }
            + b * (4 * self.nq_pad + 4 * self.nkv_pad)
            + self.attn_scratch
            + b * self.nf4_slots
            // the step's input block, and the cross-entropy's running lse and picked logit
            + 4 * (StepInput::block_words(self.n) + 2 * self.n);
        let resident_attention = resident * resident_attention_bytes(d, self.n);
        kept * per_layer(self.n)
            + shared * per_layer(self.mlp_rows)
            + attn_ring
            + resident_attention
            + streams
            + scratch
    }
}

/// Whether the backward's dq ((N, Hq D) bf16) lives in the recomputed layers' shared resid_mid
/// ((N, C)) for a model of `d` with `recomputed` of its layers recomputed, when the shared set
/// holds resid_mid in a buffer of its own (`resid_mid_own`: the attention checkpoints do not
/// travel, or it would be in their ring): only when every layer is recomputed (a kept layer's
/// backward would write dq over the highest recomputed layer's resid_mid, which its forward
/// left for its backward) and dq fits.
pub fn dq_in_resid_mid(d: &Dims, recomputed: usize, resid_mid_own: bool) -> bool {
    recomputed == d.layers && resid_mid_own && d.q_dim() <= d.hidden
}

/// The most layers whose activations fit: the largest `kept` in 0..=L whose activation bytes
/// (`sizes(kept)`, which sets the [`logit_budget`] of `kept`; stack widths `widths`, the
/// recomputed layers' checkpoints as `offload` says, no resident attention; see
/// [`ActSizes::bytes`]) are at most `budget` (what is left once weights and LoRA state are
/// placed); `None` when even recomputing every layer does not fit.
pub fn kept_layers_within(
    d: &Dims,
    sizes: impl Fn(usize) -> ActSizes,
    (qk_norm, widths): (bool, [usize; 4]),
    offload: Offload,
    budget: usize,
) -> Option<usize> {
    (0..=d.layers)
        .rev()
        .find(|&k| sizes(k).bytes(d, qk_norm, widths, k, offload, 0) <= budget)
}

/// How many of the recomputed layers (`d.layers - kept`) keep their attention outputs on the
/// device ([`below_top_layers`]) for the least [`spared_work_seconds`] within `budget`
/// activation bytes ([`ActSizes::bytes`] of `s`, with `qk_norm` and stack `widths`), the
/// fewest among equals; 0 where sparse residuals cannot pay ([`sparse_min_gain`]: there
/// the attention is cheap, and whole layers or q, k, v spend the memory better). The 8B at one
/// 262k sequence: one for each ~2 GiB past ~23.5 GiB of activations (each one skipped
/// residual fewer, [`sparse_skips`]), all 4 whose outputs the host cannot hold from ~29.6 (the
/// lean 36 GiB card budget leaves ~30.5).
pub fn resident_attention_within(
    d: &Dims,
    s: &ActSizes,
    (qk_norm, widths): (bool, [usize; 4]),
    (kept, offload): (usize, Offload),
    seq: usize,
    budget: usize,
) -> usize {
    let m = d.layers - kept.min(d.layers);
    if m < 2 || sparse_min_gain(d, s.n, seq, 1) == usize::MAX {
        return 0;
    }
    let cost = |k| spared_work_seconds(d, offload, (m, s.n, seq), k);
    (0..m)
        .filter(|&k| s.bytes(d, qk_norm, widths, kept, offload, k) <= budget)
        .min_by(|&a, &b| cost(a).total_cmp(&cost(b)).then(a.cmp(&b)))
        .unwrap_or(0)
}

/// The head dim the attention kernel runs at: D itself when a kernel exists, else 64 (or 128)
/// with zero padding, which leaves scores and outputs unchanged.
pub fn padded_head_dim(d: usize) -> usize {
    if ATTN_HEAD_DIMS.contains(&d) {
        d
    } else if d < 64 {
        64
    } else {
        128
    }
}

/// Rows of one GEMM tile of the head: chunks of whole tiles leave none of the head GEMM's
/// tiles part empty (523-row chunks of the 8B's 128,256 logits ran at 660 TFLOP/s).
const CE_ROW_ALIGN: usize = 128;

/// Rows per cross-entropy chunk: as many as fit `budget` logit elements, rounded down to a
/// multiple of [`CE_ROW_ALIGN`] when that many fit, at least 1, at most `n`.
pub fn ce_rows(n: usize, vocab: usize, budget: usize) -> usize {
    let fit = budget / vocab.max(1);
    let aligned = if fit >= CE_ROW_ALIGN {
        fit / CE_ROW_ALIGN * CE_ROW_ALIGN
    } else {
        fit
    };
    aligned.clamp(1, n.max(1))
}

/// Checks a packed batch against the model and the buffers: tokens in the vocabulary, at most
/// `max_tokens`, `cu_seqlens` from 0 strictly increasing to N, positions in `0..positions`,
/// targets in the vocabulary or -100. Returns the number of counted targets.
#[allow(clippy::too_many_arguments)]
pub fn check_batch(
    tokens: &[u32],
    cu_seqlens: &[i32],
    positions: &[i32],
    targets: Option<&[i32]>,
    vocab: usize,
    max_tokens: usize,
    max_positions: usize,
    sliding_window: Option<usize>,
) -> Result<usize, String> {
    let n = tokens.len();
    if n == 0 {
        return Err("empty batch".into());
    }
    if n > max_tokens {
        return Err(format!(
            "batch of {n} tokens exceeds the GPU model's budget of {max_tokens}"
        ));
    }
    if cu_seqlens.first() != Some(&0)
        || cu_seqlens.last().map(|&e| e as i64) != Some(n as i64)
        || cu_seqlens.windows(2).any(|w| w[1] <= w[0])
    {
        return Err(format!(
            "cu_seqlens {cu_seqlens:?} must start at 0, increase strictly and end at {n}"
        ));
    }
    if positions.len() != n {
        return Err(format!("{} positions for {n} tokens", positions.len()));
    }
    if let Some(&p) = positions
        .iter()
        .find(|&&p| p < 0 || p as usize >= max_positions)
    {
        return Err(format!(
            "position {p} outside the RoPE table of {max_positions} rows"
        ));
    }
    if let Some(&t) = tokens.iter().find(|&&t| t as usize >= vocab) {
        return Err(format!("token id {t} is outside the vocabulary of {vocab}"));
    }
    if let Some(w) = sliding_window {
        let longest = cu_seqlens
            .windows(2)
            .map(|p| (p[1] - p[0]) as usize)
            .max()
            .unwrap_or(0);
        if longest > w {
            return Err(format!(
                "training attention has no sliding window: a sequence of {longest} tokens exceeds the window of {w}"
            ));
        }
    }
    let mut counted = 0;
    if let Some(t) = targets {
        if t.len() != n {
            return Err(format!("{} targets for {n} tokens", t.len()));
        }
        for &v in t {
            if v == -100 {
                continue;
            }
            if v < 0 || v as usize >= vocab {
                return Err(format!(
                    "target {v} is outside the vocabulary of {vocab} (and not -100)"
                ));
            }
            counted += 1;
        }
    }
    Ok(counted)
}

/// The regions of a step's input block (i32 words, each `n_max` long but the last, `n_max + 1`;
/// each starts on a 256-byte boundary, as the vectorized kernels want), in order: token ids,
/// positions, targets, d(mean loss)/d lse and d/d picked (f32 bits), cu_seqlens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepInput {
    Ids,
    Positions,
    Targets,
    DLse,
    DPicked,
    CuSeqlens,
}

impl StepInput {
    /// Word offset of the region in a block for `n_max` tokens.
    pub fn offset(self, n_max: usize) -> usize {
        self as usize * n_max.next_multiple_of(64)
    }
    /// Words of a block for `n_max` tokens.
    pub fn block_words(n_max: usize) -> usize {
        Self::CuSeqlens.offset(n_max) + n_max + 1
    }
}

/// The host image of a step's inputs (see [`StepInput`]), uploaded in one copy: the batch's
/// ids, positions and cu_seqlens; with `targets`, the targets and the cross-entropy
/// coefficients, 1/m and -1/m on the m counted rows and 0 on ignored ones (without, those
/// regions are zero). Only each region's first rows are meaningful; `image` is reused from
/// step to step and ends with cu_seqlens.
pub fn step_input_image(
    n_max: usize,
    batch: &Batch,
    targets: Option<&[i32]>,
    image: &mut Vec<u32>,
) {
    image.clear();
    image.resize(
        StepInput::CuSeqlens.offset(n_max) + batch.cu_seqlens.len(),
        0,
    );
    let region = |image: &mut Vec<u32>, r: StepInput, words: &mut dyn Iterator<Item = u32>| {
        for (dst, w) in image[r.offset(n_max)..].iter_mut().zip(words) {
            *dst = w;
        }
    };
    region(image, StepInput::Ids, &mut batch.tokens.iter().copied());
    region(
        image,
        StepInput::Positions,
        &mut batch.positions.iter().map(|&p| p as u32),
    );
    region(
        image,
        StepInput::CuSeqlens,
        &mut batch.cu_seqlens.iter().map(|&c| c as u32),
    );
    if let Some(t) = targets {
        let m = t.iter().filter(|&&t| t != -100).count();
        let inv = if m == 0 { 0.0 } else { 1.0 / m as f32 };
        let dlse = |t: i32| if t == -100 { 0.0 } else { inv };
        region(image, StepInput::Targets, &mut t.iter().map(|&t| t as u32));
        region(
            image,
            StepInput::DLse,
            &mut t.iter().map(|&t| dlse(t).to_bits()),
        );
        region(
            image,
            StepInput::DPicked,
            &mut t.iter().map(|&t| (-dlse(t)).to_bits()),
        );
    }
}

/// Mean loss over counted rows from the merged lse and picked logits (f64 sum).
pub fn mean_loss(lse: &[f32], picked: &[f32], targets: &[i32]) -> (f64, usize) {
    let mut s = 0f64;
    let mut m = 0usize;
    for ((l, p), t) in lse.iter().zip(picked).zip(targets) {
        if *t != -100 {
            s += *l as f64 - *p as f64;
            m += 1;
        }
    }
    (if m == 0 { 0.0 } else { s / m as f64 }, m)
}

/// The (D, Dp) selection matrix [I | 0] (row-major) that zero-pads head vectors from D to Dp
/// through a GEMM (x (rows, D) · S = (rows, Dp)); S^T takes them back. Exact in bf16.
pub fn pad_selector(d: usize, dp: usize) -> Vec<f32> {
    let mut s = vec![0f32; d * dp];
    for i in 0..d.min(dp) {
        s[i * dp + i] = 1.0;
    }
    s
}

/// FLOPs per token of one layer's causal attention forward in sequences of `seq` tokens (the
/// QK^T and PV products over the keys before each query: 2 seq (Hq D), as hf_baseline.py
/// counts them).
pub fn attention_forward_flops(d: &Dims, seq: usize) -> f64 {
    2.0 * seq as f64 * d.q_dim() as f64
}

/// Hugging Face's FLOPs per trained token (hf_baseline.py's `flop_estimate`): returns
/// (matmul params N + H, LoRA params P, model FLOPs/token, hardware FLOPs/token).
pub fn flop_estimate(d: &Dims, seq: usize, r: usize, grad_ckpt: bool) -> (f64, f64, f64, f64) {
    let (c, i, nl) = (d.hidden as f64, d.intermediate as f64, d.layers as f64);
    let q_out = d.q_dim() as f64;
    let kv_out = d.kv_dim() as f64;
    let shapes = [
        (c, q_out),
        (c, kv_out),
        (c, kv_out),
        (q_out, c),
        (c, i),
        (c, i),
        (i, c),
    ];
    let n_layers = nl * shapes.iter().map(|(a, b)| a * b).sum::<f64>();
    let n_head = d.vocab as f64 * c;
    let p = nl * shapes.iter().map(|(a, b)| r as f64 * (a + b)).sum::<f64>();
    let attn = nl * attention_forward_flops(d, seq);
    let fwd = 2.0 * (n_layers + n_head) + 2.0 * p + attn;
    let bwd = 2.0 * (n_layers + n_head) + 4.0 * p + 2.0 * attn;
    let rec = if grad_ckpt {
        2.0 * n_layers + 2.0 * p + attn
    } else {
        0.0
    };
    (n_layers + n_head, p, fwd + bwd, fwd + bwd + rec)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every projection adapted: q/k/v, o, gate/up, down stacks.
    const ALL: [usize; 4] = [3, 1, 2, 1];
    /// Checkpoint offload without q, k, v and without gate/up (the checkpoint the tests below
    /// count by hand).
    const LEAN: Offload = Offload::unbounded(false, GateUp::Layers(0), 0);

    /// Llama-3.1-8B's shapes.
    const LLAMA_8B: Dims = Dims {
        hidden: 4096,
        intermediate: 14336,
        layers: 32,
        heads: 32,
        kv_heads: 8,
        head_dim: 128,
        vocab: 128256,
    };

    /// Llama-3.2-1B's shapes.
    const LLAMA_1B: Dims = Dims {
        hidden: 2048,
        intermediate: 8192,
        layers: 16,
        heads: 32,
        kv_heads: 8,
        head_dim: 64,
        vocab: 128256,
    };

    /// [`dims`] with six layers, and its sizes for 512 tokens at rank 8.
    fn six_layers() -> (Dims, ActSizes) {
        let d = Dims {
            layers: 6,
            ..dims()
        };
        (d, ActSizes::new(&d, 512, 8, LOGIT_BUDGET_LEAN))
    }

    fn dims() -> Dims {
        Dims {
            hidden: 64,
            intermediate: 128,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            head_dim: 16,
            vocab: 128,
        }
    }

    #[test]
    fn padding_and_chunks() {
        assert_eq!(padded_head_dim(16), 64);
        assert_eq!(padded_head_dim(32), 64);
        assert_eq!(padded_head_dim(64), 64);
        assert_eq!(padded_head_dim(96), 128);
        assert_eq!(padded_head_dim(128), 128);
        assert_eq!(ce_rows(10, 128, LOGIT_BUDGET), 10);
        // whole head-GEMM tiles of rows: 2093 fit, 2048 taken; 523 fit the lean budget, 512
        assert_eq!(ce_rows(16384, 128256, LOGIT_BUDGET), 2048);
        assert_eq!(ce_rows(4096, 128256, LOGIT_BUDGET_LEAN), 512);
        assert!(ce_rows(16384, 128256, LOGIT_BUDGET) * 128256 <= LOGIT_BUDGET);
        assert_eq!(ce_rows(16384, 1 << 20, LOGIT_BUDGET_LEAN), 64);
        assert_eq!(ce_rows(5, 1 << 30, LOGIT_BUDGET), 1);
        let s = ActSizes::new(&dims(), 10, 4, LOGIT_BUDGET);
        assert_eq!(
            (s.nc, s.nq, s.nkv, s.ni, s.nr, s.lse),
            (640, 640, 320, 1280, 40, 40)
        );
        assert_eq!(
            (s.head_dim_pad, s.nq_pad, s.nkv_pad),
            (64, 10 * 4 * 64, 10 * 2 * 64)
        );
        assert!(s.bytes(&dims(), false, ALL, 2, Offload::Off, 0) > 0);
    }

    #[test]
    fn recomputing_layers_saves_their_activations() {
        // A vocabulary small enough that both logit budgets hold every row.
        let (d, s) = six_layers();
        let by_kept: Vec<usize> = (0..=6)
            .map(|k| s.bytes(&d, false, ALL, k, Offload::Off, 0))
            .collect();
        // Each kept layer replaces its share of the one shared set by its own buffers (saved
        // tensors + input norm output); keeping L - 1 layers needs as much as keeping all. With
        // every layer recomputed, dq lives in the shared set's resid_mid.
        let step = by_kept[2] - by_kept[1];
        assert_eq!(by_kept[1] - by_kept[0], step + 2 * s.nq);
        for k in 1..5 {
            assert_eq!(by_kept[k + 1] - by_kept[k], step, "kept {k}");
        }
        assert_eq!(by_kept[6], by_kept[5]);
        let layer = 2 * (3 * s.nc + 2 * s.nq + 2 * s.nkv + 3 * s.ni + 7 * s.nr) + 4 * (s.lse + s.n);
        assert_eq!(step, layer);
        let sizes = |k| ActSizes::new(&d, 512, 8, logit_budget(k, d.layers));
        let within = |budget| kept_layers_within(&d, sizes, (false, ALL), Offload::Off, budget);
        assert_eq!(within(by_kept[3]), Some(3));
        assert_eq!(within(by_kept[3] + step - 1), Some(3));
        assert_eq!(within(usize::MAX), Some(6));
        assert_eq!(within(by_kept[0] - 1), None);
        let sel = pad_selector(3, 5);
        assert_eq!(
            sel,
            vec![1., 0., 0., 0., 0., 0., 1., 0., 0., 0., 0., 0., 1., 0., 0.]
        );
    }

    #[test]
    fn mlp_tiles_shrink_the_recomputed_layers_and_the_scratch() {
        let (d, _) = six_layers();
        let full = ActSizes::new(&d, 512, 8, LOGIT_BUDGET_LEAN);
        let tiled = ActSizes::with_mlp_rows(&d, 512, 8, LOGIT_BUDGET_LEAN, 100);
        assert_eq!((full.mlp_rows, full.ti), (512, full.ni));
        assert_eq!((tiled.mlp_rows, tiled.ti), (100, 100 * d.intermediate));
        assert_eq!(
            ActSizes::with_mlp_rows(&d, 512, 8, LOGIT_BUDGET_LEAN, 0).mlp_rows,
            1
        );
        // Recomputing: the shared set's ln2, gate, up and act and the scratch's three
        // gradients are a tile's; keeping every layer: only the scratch is.
        let scratch_saved = 2 * 3 * (full.ni - tiled.ti);
        let shared_saved = scratch_saved + 2 * (full.nc - 100 * d.hidden);
        for k in 0..6 {
            let diff = full.bytes(&d, false, ALL, k, Offload::Off, 0)
                - tiled.bytes(&d, false, ALL, k, Offload::Off, 0);
            assert_eq!(diff, shared_saved + scratch_saved, "kept {k}");
        }
        let all = full.bytes(&d, false, ALL, 6, Offload::Off, 0)
            - tiled.bytes(&d, false, ALL, 6, Offload::Off, 0);
        assert_eq!(all, scratch_saved);
        // The last kept layer now costs its full ln2 and MLP over the shared set's tile.
        let step = tiled.bytes(&d, false, ALL, 6, Offload::Off, 0)
            - tiled.bytes(&d, false, ALL, 5, Offload::Off, 0);
        assert_eq!(step, shared_saved);
    }

    #[test]
    fn nf4_slots_only_when_four_bit_and_tiled() {
        let (d, _) = six_layers();
        let full = ActSizes::new(&d, 512, 8, LOGIT_BUDGET_LEAN);
        let tiled = ActSizes::with_mlp_rows(&d, 512, 8, LOGIT_BUDGET_LEAN, 100);
        assert_eq!(
            full.with_nf4_slots(&d, true).nf4_slots,
            0,
            "one tile: gate, up, down take turns"
        );
        assert_eq!(
            tiled.with_nf4_slots(&d, false),
            tiled,
            "bf16 weights: nothing to hold"
        );
        let slots = tiled.with_nf4_slots(&d, true);
        assert_eq!(slots.nf4_slots, 2 * d.intermediate * d.hidden);
        // up's and down's bf16 weights, whatever is kept or offloaded
        for (k, offload) in [
            (0, Offload::Off),
            (3, Offload::Off),
            (6, Offload::Off),
            (0, LEAN),
        ] {
            let more = slots.bytes(&d, false, ALL, k, offload, 0)
                - tiled.bytes(&d, false, ALL, k, offload, 0);
            assert_eq!(more, 4 * d.intermediate * d.hidden, "kept {k}");
        }
    }

    #[test]
    fn attention_checkpoints_travel_only_within_half_the_host_memory() {
        let gib = 1usize << 30;
        assert!(pinned_rows_fit(10 * gib + 20 * gib, Some(64 * gib as u64)));
        assert!(!pinned_rows_fit(10 * gib + 30 * gib, Some(64 * gib as u64)));
        assert!(pinned_rows_fit(usize::MAX / 4 + usize::MAX / 4, None));
    }

    #[test]
    fn offloading_residuals_keeps_a_ring() {
        let (d, s) = six_layers();
        let resid = 2 * s.nc;
        // the attention checkpoint (att, resid_mid, o_proj's x A^T, lse, gate/up's and down's
        // x A^T): one set in the shared buffers without offload, a ring of 256-byte aligned
        // slots with it
        let ckpt = 2 * s.nq + 2 * s.nc + 2 * s.nr + 4 * s.lse + 2 * 2 * s.nr + 2 * s.nr;
        let slot: usize = [
            2 * s.nq,
            2 * s.nc,
            2 * s.nr,
            4 * s.lse,
            2 * 2 * s.nr,
            2 * s.nr,
        ]
        .iter()
        .map(|x| x.next_multiple_of(256))
        .sum();
        for k in 0..=6 {
            let recomputed = 6 - k;
            // The ring replaces the recomputed layers' residual buffers once there are more of
            // them than slots; resid[L] and the kept layers' inputs stay. The attention
            // checkpoints take a ring of their own.
            let off = s.bytes(&d, false, ALL, k, LEAN, 0) as i64;
            let on_device = s.bytes(&d, false, ALL, k, Offload::Off, 0) as i64;
            let attn_ring = if recomputed > 0 {
                (resid_ring(recomputed, 512, false) * slot - ckpt) as i64
            } else {
                0
            };
            let resid_saved = (recomputed.saturating_sub(RESID_RING) * resid) as i64;
            // with every layer recomputed and no ring, dq lives in the shared resid_mid
            let dq_shared = (usize::from(k == 0) * 2 * s.nq) as i64;
            assert_eq!(
                on_device - off,
                resid_saved - attn_ring - dq_shared,
                "kept {k}"
            );
            // all but the ring's last `resid_ring` travel
            assert_eq!(
                device_residuals(6, k, LEAN, 512, 0, false),
                7 - recomputed.saturating_sub(RESID_RING)
            );
        }
        assert_eq!(device_residuals(6, 0, Offload::Off, 512, 0, false), 7);
        assert_eq!(
            (resid_ring(2, 512, false), resid_ring(6, 512, false)),
            (2, RESID_RING)
        );
        // long micro-batches: a slot less
        let long = SHORT_RING_TOKENS;
        assert_eq!(
            (resid_ring(1, long, false), resid_ring(6, long, false)),
            (1, RESID_RING - 1)
        );
        // With a model deep enough (the rings cost less than the residuals they replace),
        // recomputing every layer with offload fits a budget that keeping 0 without it does not.
        let d = Dims {
            layers: 16,
            ..dims()
        };
        let lean = s.bytes(&d, false, ALL, 0, LEAN, 0);
        let sizes = |k| ActSizes::new(&d, 512, 8, logit_budget(k, d.layers));
        let within = |offload, budget| kept_layers_within(&d, sizes, (false, ALL), offload, budget);
        assert_eq!(within(Offload::Off, lean), None);
        assert_eq!(within(LEAN, lean), Some(0));
        assert_eq!(within(LEAN, usize::MAX), Some(16));
    }

    #[test]
    fn resident_attention_outputs_add_their_buffers_and_no_attention_ring() {
        let (d, s) = six_layers();
        let one = resident_attention_bytes(&d, 512);
        assert_eq!(one, 2 * s.nq + 4 * s.lse);
        let bytes = |offload, k| s.bytes(&d, false, ALL, 0, offload, k) as i64;
        for k in 0..=7 {
            // every layer below the highest recomputed one at most (five of six)
            let kept = k.min(5) as i64 * one as i64;
            assert_eq!(bytes(Offload::Off, k) - bytes(Offload::Off, 0), kept, "{k}");
            if k > 0 {
                // with checkpoint offload, no attention ring: only the travelling residuals'
                // buffers differ from no offload
                let resid_saved = ((6 - RESID_RING) * 2 * s.nc) as i64;
                assert_eq!(bytes(Offload::Off, k) - bytes(LEAN, k), resid_saved, "{k}");
            }
        }
    }

    #[test]
    fn residuals_past_half_the_host_memory_stay_on_the_device() {
        let (d, s) = six_layers();
        let resid = 2 * s.nc;
        // the cap: as many (N, C) rows as half the host's available memory holds
        let host = |rows: usize| Some(2 * rows as u64);
        assert_eq!(resid_travel_cap(512, d.hidden, host(3 * resid)), 3);
        assert_eq!(resid_travel_cap(512, d.hidden, host(3 * resid - 1)), 2);
        assert_eq!(resid_travel_cap(512, d.hidden, None), usize::MAX);
        let travel = |t| Offload::Checkpoints {
            qkv: false,
            gate_up: GateUp::Layers(0),
            resident_qkv: 0,
            resid_travel: t,
            outputs_travel: usize::MAX,
            sparse_skips: 0,
            sparse_outputs_travel: 0,
            sparse_min_gain: usize::MAX,
            resident_spares_skip: true,
        };
        // six recomputed layers, fewer than the ring's three may travel: the ring takes the
        // lowest t + 3, the layers above keep their residuals, no attention checkpoint
        // travels; against no offload at all, only the travelling residuals' buffers go
        let off = s.bytes(&d, false, ALL, 0, Offload::Off, 0);
        for t in 0..RESID_RING {
            assert_eq!(resid_members(6, 512, t), t + RESID_RING);
            assert_eq!(device_residuals(6, 0, travel(t), 512, 0, false), 7 - t);
            assert_eq!(
                off - s.bytes(&d, false, ALL, 0, travel(t), 0),
                t * resid,
                "{t}"
            );
        }
        // three or more: every recomputed layer is a member, as without a cap
        for t in [RESID_RING, RESID_RING + 1, usize::MAX] {
            assert_eq!(resid_members(6, 512, t), 6);
            let lean = s.bytes(&d, false, ALL, 0, LEAN, 0);
            assert_eq!(s.bytes(&d, false, ALL, 0, travel(t), 0), lean);
        }
        // two kept layers: four recomputed, the cap counts among them
        assert_eq!(resid_members(4, 512, 0), RESID_RING);
        assert_eq!(device_residuals(6, 2, travel(0), 512, 0, false), 7);
        assert_eq!(device_residuals(6, 2, travel(1), 512, 0, false), 6);
    }

    /// The issue's longest row: Llama-3.1-8B QLoRA r=16, one 524,288-token sequence, every
    /// layer recomputed, on the H200 machine's host (123.6 GiB available). Its 32 residuals
    /// (4 GiB each) would pin 128 GiB; 15 travel, the ring's 2 and the 15 above stay, and the
    /// activations still leave the 4-bit weights room on the 139.8 GiB card. 13 layers'
    /// attention outputs travel too.
    #[test]
    fn llama_8b_at_524k_tokens_fits_the_h200_with_the_host_short() {
        let (n, gib) = (524_288, 1u64 << 30);
        let host = Some(1236 * gib / 10);
        let t = resid_travel_cap(n, LLAMA_8B.hidden, host);
        assert_eq!((t, resid_members(32, n, t)), (15, 17));
        let offload = |outputs_travel| Offload::Checkpoints {
            qkv: false,
            gate_up: GateUp::Layers(0),
            resident_qkv: 0,
            resid_travel: t,
            outputs_travel,
            sparse_skips: 0,
            sparse_outputs_travel: 0,
            sparse_min_gain: usize::MAX,
            resident_spares_skip: true,
        };
        assert_eq!(device_residuals(32, 0, offload(0), n, 0, false), 18);
        let s = ActSizes::new(&LLAMA_8B, n, 16, logit_budget(0, 32));
        let bytes = |o| s.bytes(&LLAMA_8B, false, ALL, 0, offload(o), 0) as u64;
        assert!(
            bytes(0) < 130 * gib,
            "{:.1} GiB",
            bytes(0) as f64 / gib as f64
        );
        // next to the 15 travelling residuals (60 GiB), 13 layers' attention outputs (4.06
        // GiB each) fit the host less its 8 GiB reserve; their slot takes the shared buffers'
        // place
        let outputs = outputs_travel_cap(&LLAMA_8B, n, t, host);
        assert_eq!(outputs, 13);
        assert_eq!(bytes(outputs), bytes(0));
    }

    /// The issue's 262k row on the H200 machine's host (123.6 GiB available): 30 residuals pin
    /// 60 GiB (half the host), the attention checkpoints (4.1 GiB a layer) do not fit, and the
    /// attention outputs (2.03 GiB a layer) of 27 layers travel within what the offloads may
    /// pin (the host less [`host_reserve`], here 8 GiB). Their one-slot ring takes the shared
    /// set's output and lse: the plan grows by the pieces' alignment only (none at this
    /// length).
    #[test]
    fn attention_outputs_travel_within_what_the_residuals_leave_of_the_host() {
        let (n, gib) = (262_144, 1u64 << 30);
        let host = 1236 * gib / 10;
        let t = resid_travel_cap(n, LLAMA_8B.hidden, Some(host));
        assert_eq!(t, 30);
        let out_row = (2 * n * LLAMA_8B.q_dim() + 4 * n * LLAMA_8B.heads) as u64;
        let resid_row = (2 * n * LLAMA_8B.hidden) as u64;
        // the reserve: 1/16 of the host, at least 8 GiB (a host under 8 GiB pins no outputs)
        assert_eq!(host_reserve(host), 8 * gib);
        assert_eq!(host_reserve(256 * gib), 16 * gib);
        assert_eq!(host_reserve(4 * gib), 8 * gib);
        assert_eq!(outputs_travel_cap(&LLAMA_8B, n, 0, Some(4 * gib)), 0);
        let by_hand = (host - 8 * gib - 30 * resid_row) / out_row;
        assert_eq!(by_hand, 27);
        assert_eq!(outputs_travel_cap(&LLAMA_8B, n, t, Some(host)), 27);
        assert_eq!(outputs_travel_cap(&LLAMA_8B, n, t, None), usize::MAX);
        // the residuals alone past what may be pinned: none
        assert_eq!(outputs_travel_cap(&LLAMA_8B, n, 32, Some(60 * gib)), 0);
        let offload = |resid_travel, outputs_travel| Offload::Checkpoints {
            qkv: false,
            gate_up: GateUp::Layers(0),
            resident_qkv: 0,
            resid_travel,
            outputs_travel,
            sparse_skips: 0,
            sparse_outputs_travel: 0,
            sparse_min_gain: usize::MAX,
            resident_spares_skip: true,
        };
        let s = ActSizes::new(&LLAMA_8B, n, 16, logit_budget(0, 32));
        let plan = |o| s.bytes(&LLAMA_8B, false, ALL, 0, o, 0);
        assert_eq!(plan(offload(t, 27)), plan(offload(t, 0)));
        // every layer's outputs may travel: the attention checkpoints' ring is planned
        assert!(plan(offload(t, usize::MAX)) > plan(offload(t, 0)));
        // with 4 outputs resident on the device (2.03 GiB each) the other 27 travel: the plan
        // adds the resident buffers only
        let resident = s.bytes(&LLAMA_8B, false, ALL, 0, offload(t, 27), 4);
        assert_eq!(
            resident - plan(offload(t, 27)),
            4 * resident_attention_bytes(&LLAMA_8B, n)
        );
        // at 500 tokens the lse piece (8,000 bytes) rounds up to 8,192
        let (d, _) = six_layers();
        let s = ActSizes::new(&d, 500, 8, LOGIT_BUDGET_LEAN);
        for kept in [0, 4] {
            let grow = s.bytes(&d, false, ALL, kept, offload(usize::MAX, 1), 0)
                - s.bytes(&d, false, ALL, kept, offload(usize::MAX, 0), 0);
            assert_eq!(grow, 192, "kept {kept}");
        }
        // the slot goes once no layer below the resident ones is left to travel: of six
        // recomputed layers, the top and four resident leave one
        let with = |resident| {
            s.bytes(&d, false, ALL, 0, offload(usize::MAX, 1), resident)
                - s.bytes(&d, false, ALL, 0, offload(usize::MAX, 0), resident)
        };
        assert_eq!(with(4), 192);
        assert_eq!(with(5), 0);
    }

    /// Sparse residuals on six layers: layers 1 and 3 store none (or, with one skip asked for,
    /// layer 1), and only when some layer below the top would recompute its attention that
    /// storing fewer lets travel or (with resident outputs) make room for.
    #[test]
    fn sparse_residuals_skip_odd_layers_below_the_top_when_that_spares_attention() {
        let (d, s) = six_layers();
        let skipping = |sparse_skips, resid_travel, outputs_travel, sparse_outputs_travel| {
            Offload::Checkpoints {
                qkv: false,
                gate_up: GateUp::Layers(0),
                resident_qkv: 0,
                resid_travel,
                outputs_travel,
                sparse_skips,
                sparse_outputs_travel,
                sparse_min_gain: 1,
                resident_spares_skip: false,
            }
        };
        let offload = |r, o, s| skipping(2, r, o, s);
        let one = |r, o, s| skipping(1, r, o, s);
        let max = usize::MAX;
        let sparse = offload(max, 0, 1);
        assert_eq!(skipped_residuals(sparse, 6, 512, 0), vec![1, 3]);
        assert_eq!(skipped_residuals(sparse, 5, 512, 0), vec![1, 3]);
        assert_eq!(skipped_residuals(sparse, 4, 512, 0), vec![1]);
        assert!(skipped_residuals(sparse, 2, 512, 0).is_empty());
        assert!(skipped_residuals(offload(max, 5, max), 6, 512, 0).is_empty());
        assert_eq!(skipped_residuals(one(max, 0, 1), 6, 512, 0), vec![1]);
        // (offload, m, resident) -> skipped residuals, travelling outputs
        let cases = [
            (offload(max, 0, 1), 6, 0, 2, 1),
            (offload(max, 1, max), 6, 0, 2, 5),
            (one(max, 1, max), 6, 0, 1, 5),
            (offload(max, 5, max), 6, 0, 0, 5),
            (offload(max, 1, 1), 6, 0, 0, 1),
            (offload(max, 3, max), 6, 2, 0, 3),
            (offload(max, 2, max), 6, 2, 2, 3),
            (offload(max, 1, max), 2, 0, 0, 1),
            (Offload::Off, 6, 0, 0, 0),
        ];
        for (o, m, resident, skips, travelling) in cases {
            assert_eq!(
                sparse_skips(o, m, 512, resident),
                skips,
                "{o:?} {m} {resident}"
            );
            assert_eq!(outputs_travelling(o, m, 512, resident), travelling, "{o:?}");
        }
        // resident outputs and residuals the host cannot hold: every other one makes room on
        // the device, whatever the host needs (unless sparse residuals never pay: short
        // sequences)
        assert_eq!(sparse_skips(offload(0, 1, 1), 6, 512, 0), 0);
        assert_eq!(sparse_skips(offload(0, 1, 1), 6, 512, 1), 2);
        assert_eq!(sparse_skips(one(0, 1, 1), 6, 512, 1), 2);
        let never = Offload::Checkpoints {
            qkv: false,
            gate_up: GateUp::Layers(0),
            resident_qkv: 0,
            resid_travel: 0,
            outputs_travel: 1,
            sparse_skips: 2,
            sparse_outputs_travel: 1,
            sparse_min_gain: usize::MAX,
            resident_spares_skip: true,
        };
        assert_eq!(sparse_skips(never, 6, 512, 1), 0);
        // more travelling outputs pay only from the minimum gain on
        let gain = |sparse_min_gain| Offload::Checkpoints {
            qkv: false,
            gate_up: GateUp::Layers(0),
            resident_qkv: 0,
            resid_travel: max,
            outputs_travel: 1,
            sparse_skips: 2,
            sparse_outputs_travel: 3,
            sparse_min_gain,
            resident_spares_skip: true,
        };
        assert_eq!(sparse_skips(gain(2), 6, 512, 0), 2);
        assert_eq!(sparse_skips(gain(3), 6, 512, 0), 0);
        // an output's host row holding a residual's: each resident output stores one skipped
        // residual again, when the skips let every output below the top travel
        let spares = |sparse_outputs_travel| Offload::Checkpoints {
            qkv: false,
            gate_up: GateUp::Layers(0),
            resident_qkv: 0,
            resid_travel: max,
            outputs_travel: 3,
            sparse_skips: 2,
            sparse_outputs_travel,
            sparse_min_gain: 1,
            resident_spares_skip: true,
        };
        // (offload, resident) -> skipped residuals, travelling outputs
        let cases = [
            (spares(5), 0, 2, 5),
            (spares(5), 1, 1, 4),
            (spares(5), 2, 0, 3),
            (spares(4), 1, 2, 4),
        ];
        for (o, resident, skips, travelling) in cases {
            assert_eq!(sparse_skips(o, 6, 512, resident), skips, "{o:?} {resident}");
            assert_eq!(outputs_travelling(o, 6, 512, resident), travelling);
        }
        // every residual travelling: the device keeps the ring either way (the skipped ones
        // share the last layer's output's buffer)
        let bytes = |o, resident| s.bytes(&d, false, ALL, 0, o, resident);
        assert_eq!(device_residuals(6, 0, offload(max, 0, 1), 512, 0, false), 4);
        assert_eq!(bytes(offload(max, 0, 1), 0), bytes(offload(max, 1, 1), 0));
        // none travelling, one resident output: the ring's three hold 0, 2, 4 instead of 0, 1,
        // 2, and the top keeps its own: two (N, C) buffers fewer than with every residual
        // stored
        assert_eq!(device_residuals(6, 0, offload(0, 1, 1), 512, 0, false), 7);
        assert_eq!(device_residuals(6, 0, offload(0, 1, 1), 512, 1, false), 5);
        let resident = bytes(offload(0, 1, 1), 1) - resident_attention_bytes(&d, 512);
        assert_eq!(bytes(offload(0, 1, 1), 0) - resident, 2 * 2 * s.nc);
        // one skip where two would do: one (N, C) buffer more than with two
        assert_eq!(device_residuals(6, 0, one(0, 1, 1), 512, 0, false), 7);
        assert_eq!(device_residuals(6, 0, one(max, 0, 1), 512, 0, false), 4);
    }

    /// What a plan pins on the host (the stored residuals' rows, at most `resid_travel`, and the
    /// travelling attention outputs' rows, [`sparse_skips`] and [`outputs_travelling`] for each
    /// count of resident outputs) stays within the host less its reserve whenever outputs
    /// travel: on random hosts, lengths, recomputed counts and shapes, with an output row at
    /// least a residual's (`resident_spares_skip`) and without (q_dim < hidden; the first
    /// case, where sparing skips there would pin past the host).
    #[test]
    fn sparse_plans_pin_no_more_than_the_host_allows() {
        let narrow_q = Dims {
            heads: 8,
            head_dim: 128,
            ..LLAMA_1B
        };
        let lean = (false, GateUp::Layers(0), 0);
        // (shape, tokens, host bytes, recomputed layers) -> resident counts that stored some
        // skipped residuals again (but not all: 0 skips is where every output travels anyway)
        let check = |d: Dims, n: usize, available: u64, m: usize| {
            let o = Offload::for_host(&d, (n, n), Some(available), lean);
            let Offload::Checkpoints { resid_travel, .. } = o else {
                unreachable!("for_host plans checkpoint offload")
            };
            let resid_row = piece_start(n, &[2 * d.hidden], 1);
            let output_row = piece_start(n, &attention_outputs(&d), 2);
            let budget = available.saturating_sub(host_reserve(available)) as usize;
            let mut spared = 0;
            for resident in 0..m {
                let skips = sparse_skips(o, m, n, resident);
                spared += usize::from(0 < skips && skips < sparse_skips(o, m, n, 0));
                let stored = m - skips;
                let rows = stored
                    .saturating_sub(resid_ring(stored, n, false))
                    .min(resid_travel);
                let travel = outputs_travelling(o, m, n, resident);
                let pinned = rows * resid_row + travel * output_row;
                assert!(
                    travel == 0 || pinned <= budget,
                    "{d:?} n {n} host {available} m {m} resident {resident}: {skips} skips, \
                     {rows} residual rows and {travel} outputs pin {pinned} > {budget}"
                );
            }
            spared
        };
        assert_eq!(check(narrow_q, 65_536, 12 << 30, 16), 0);
        let mut rng = ftrt_runtime::rng::SplitMix64::new(ftrt_runtime::rng::fresh_seed());
        let shapes = [LLAMA_8B, LLAMA_1B, narrow_q];
        let mut spared = 0;
        for _ in 0..3000 {
            let d = shapes[rng.below(shapes.len())];
            let n = (1 + rng.below(128)) * 4096;
            let available = (4 + rng.below(252) as u64) << 30;
            spared += check(d, n, available, 3 + rng.below(d.layers - 2));
        }
        // the rule that resident outputs spare skips took part
        assert!(spared > 0);
    }

    /// Sparse residuals pay where an attention forward costs more than a layer forward without
    /// it, for enough more travelling outputs: the 8B at one long sequence, not at many short
    /// ones in the same token budget.
    #[test]
    fn sparse_residuals_pay_for_long_sequences_only() {
        let n = 262_144;
        // 15 re-runs of 0.23 s against 1.13 s attention forwards: 3.05, so 4; 8: 1.63, so 2
        assert_eq!(sparse_min_gain(&LLAMA_8B, n, n, 15), 4);
        assert_eq!(sparse_min_gain(&LLAMA_8B, n, n, 8), 2);
        assert_eq!(sparse_min_gain(&LLAMA_8B, n, 4096, 15), usize::MAX);
        // the crossover: 2 seq Hq D / 500 TFLOP/s against 2 x 218M params / 500 TFLOP/s
        let params = 4096 * (2 * 4096 + 2 * 1024) + 3 * 4096 * 14336;
        let cross = params / LLAMA_8B.q_dim();
        assert_eq!(sparse_min_gain(&LLAMA_8B, n, cross, 15), usize::MAX);
        assert_eq!(sparse_min_gain(&LLAMA_8B, n, cross + 1, 15), 15);
        assert_eq!(sparse_min_gain(&LLAMA_8B, n, cross + 1, 8), 8);
    }

    /// The issue's long rows with sparse residuals on the H200 host (123.6 GiB available). At
    /// 262k, 4 skipped residuals (28 stored, 26 through the host) let every layer's outputs
    /// travel, in the same device bytes; 3 would leave one layer recomputing its attention. At
    /// 524k the host holds no more outputs (13 either way), but with 14 outputs resident on the
    /// device, half the residuals leave it room for them.
    #[test]
    fn sparse_residuals_at_262k_and_524k_tokens() {
        let gib = 1u64 << 30;
        let host = Some(1236 * gib / 10);
        let offload = |n: usize| {
            let lean = (false, GateUp::Layers(0), 0);
            Offload::for_host(&LLAMA_8B, (n, n), host, lean)
        };
        let n = 262_144;
        let o = offload(n);
        assert!(matches!(
            o,
            Offload::Checkpoints {
                outputs_travel: 27,
                sparse_skips: 4,
                sparse_outputs_travel: 31,
                ..
            }
        ));
        assert_eq!(
            (
                skipped_residuals(o, 32, n, 0),
                outputs_travelling(o, 32, n, 0)
            ),
            (vec![1, 3, 5, 7], 31)
        );
        // one skip fewer: 30 would fit
        assert_eq!(outputs_travel_cap(&LLAMA_8B, n, 32 - 3 - 2, host), 30);
        // with the 4 outputs the host cannot hold resident, every residual is stored
        assert_eq!(
            (sparse_skips(o, 32, n, 4), outputs_travelling(o, 32, n, 4)),
            (0, 27)
        );
        let dense = Offload::Checkpoints {
            qkv: false,
            gate_up: GateUp::Layers(0),
            resident_qkv: 0,
            resid_travel: 30,
            outputs_travel: 27,
            sparse_skips: 0,
            sparse_outputs_travel: 0,
            sparse_min_gain: usize::MAX,
            resident_spares_skip: true,
        };
        let s = ActSizes::new(&LLAMA_8B, n, 16, logit_budget(0, 32));
        let plan = |o| s.bytes(&LLAMA_8B, false, ALL, 0, o, 0);
        assert_eq!(plan(o), plan(dense));
        // 224k: all 31 travel with every residual stored (30 rows on the host, 2 in the ring)
        let n = 229_376;
        let o = offload(n);
        assert_eq!(
            (sparse_skips(o, 32, n, 0), outputs_travelling(o, 32, n, 0)),
            (0, 31)
        );
        let n = 524_288;
        let o = offload(n);
        assert!(matches!(
            o,
            Offload::Checkpoints {
                resid_travel: 15,
                outputs_travel: 13,
                sparse_skips: 15,
                sparse_outputs_travel: 13,
                ..
            }
        ));
        assert_eq!(sparse_skips(o, 32, n, 0), 0);
        assert_eq!(
            (sparse_skips(o, 32, n, 14), outputs_travelling(o, 32, n, 14)),
            (15, 13)
        );
        assert_eq!(device_residuals(32, 0, o, n, 14, false), 3);
        let s = ActSizes::new(&LLAMA_8B, n, 16, logit_budget(0, 32));
        let bytes = s.bytes(&LLAMA_8B, false, ALL, 0, o, 14) as u64;
        // next to the 4-bit weights (5.3 GiB measured) on the 139.8 GiB card
        assert!(bytes < 132 * gib, "{:.1} GiB", bytes as f64 / gib as f64);
    }

    /// `--keep-layers auto`'s attention outputs on the H200 (123.6 GiB host): the 8B at one
    /// 262k sequence keeps one more for each ~2 GiB from ~23.5 GiB of activations, each storing
    /// one more residual in the host row its output leaves (one re-run fewer), up to the 4 the
    /// host cannot hold from ~29.6 GiB (every residual stored, nothing re-run; the lean 36 GiB
    /// card budget leaves ~30.5), and no more with more memory; at 524k, as many as the card
    /// holds; at 64 sequences of 4096 tokens, none.
    #[test]
    fn auto_keeps_the_attention_outputs_that_spare_the_most_recompute() {
        let gib = 1usize << 30;
        let host = Some(1236 * (gib as u64) / 10);
        let offload = |n: usize| {
            let lean = (false, GateUp::Layers(0), 0);
            Offload::for_host(&LLAMA_8B, (n, n), host, lean)
        };
        let pick = |n: usize, seq: usize, budget: usize| {
            let s = ActSizes::new(&LLAMA_8B, n, 16, logit_budget(0, 32));
            let plan = (0, offload(n));
            resident_attention_within(&LLAMA_8B, &s, (false, ALL), plan, seq, budget)
        };
        // activation budgets: what a card budget leaves next to the 4-bit weights (~5.5 GiB)
        let n = 262_144;
        assert_eq!(pick(n, n, 23 * gib), 0);
        assert_eq!(pick(n, n, 24 * gib), 1);
        assert_eq!(pick(n, n, 28 * gib), 3);
        assert_eq!(pick(n, n, 30 * gib), 4);
        assert_eq!(pick(n, n, 100 * gib), 4);
        assert_eq!(pick(n, 4096, 100 * gib), 0);
        // with none resident 4 layers are re-run (~0.9 s planned), one fewer per resident
        // output, none with 4
        let o = offload(n);
        let cost = |k| spared_work_seconds(&LLAMA_8B, o, (32, n, n), k);
        let rerun = layer_forward_seconds(&LLAMA_8B) * n as f64;
        for k in 0..=4 {
            assert!((cost(k) - (4 - k) as f64 * rerun).abs() < 1e-9, "{k}");
            assert_eq!(outputs_travelling(o, 32, n, k), 31 - k);
        }
        // 524k: 13 travel; each resident output spares an attention forward (~4.5 s)
        let n = 524_288;
        assert_eq!(pick(n, n, 110 * gib), 16);
        assert_eq!(pick(n, n, 112 * gib), 17);
        let o = offload(n);
        let cost = |k| spared_work_seconds(&LLAMA_8B, o, (32, n, n), k);
        assert!(cost(16) > cost(17) && cost(0) > cost(16));
        // the 18th would leave no layer recomputing its attention, so no residual skipped:
        // 15 more (4 GiB each) on the device, past the card
        assert_eq!(cost(18), 0.0);
        assert_eq!(pick(n, n, 140 * gib), 17);
    }

    #[test]
    fn checkpoints_with_qkv_move_q_k_v_from_the_shared_set_into_the_ring() {
        let (d, s) = six_layers();
        let with = Offload::unbounded(true, GateUp::Layers(0), 0);
        for qk in [false, true] {
            // q, k, v, the q/k/v stack's x A^T (three members), and with q/k norms their
            // inputs and rstds: once in the shared set without, in every slot with
            let mut moved = vec![2 * s.nq, 2 * s.nkv, 2 * s.nkv, 2 * 3 * s.nr];
            if qk {
                moved.extend([2 * s.nq, 2 * s.nkv, 4 * s.n * d.heads, 4 * s.n * d.kv_heads]);
            }
            let slot: usize = moved.iter().map(|x| x.next_multiple_of(256)).sum();
            let once: usize = moved.iter().sum();
            for k in 0..=6 {
                let grow = s.bytes(&d, qk, ALL, k, with, 0) as i64
                    - s.bytes(&d, qk, ALL, k, LEAN, 0) as i64;
                let want = if k < 6 {
                    (resid_ring(6 - k, 512, false) * slot) as i64 - once as i64
                } else {
                    0
                };
                assert_eq!(grow, want, "qk {qk} kept {k}");
            }
            // the pieces' list, per token, matches
            let pieces = attention_checkpoint(&d, qk, ALL.map(|w| w * 8), true);
            assert_eq!(pieces.len(), if qk { 14 } else { 10 });
            let per_token: usize = pieces[ckpt::Q..].iter().sum();
            assert_eq!(per_token * s.n, once);
        }
    }

    #[test]
    fn gate_up_layers_fill_the_spare_copy_time_and_add_one_slot() {
        let per_token = |d: &Dims| -> usize {
            attention_checkpoint(d, false, ALL.map(|w| w * 16), true)
                .iter()
                .sum()
        };
        // 8B at 2 x 2048: 32 forwards of 0.87 us a token against 29 copies of 0.74 leave
        // 6.3 us, 4.1 gate/up copies (1.15 us each) at 75%: four travel, one stays, spread
        // from layer 30 (31 is the highest, already held) down in steps of 31 / 5.
        let auto =
            |d: &Dims, rows, travel| gate_up_layers(d, per_token(d), rows, GateUp::Auto, travel);
        assert_eq!(
            auto(&LLAMA_8B, (32, 4096, 4096), true),
            vec![6, 12, 18, 24, 30]
        );
        // Without travel (bf16 weights), the one that stays.
        assert_eq!(auto(&LLAMA_8B, (32, 4096, 4096), false), vec![30]);
        // More rows than one MLP tile, or a single recomputed layer: none.
        assert!(auto(&LLAMA_8B, (32, 8192, 4096), true).is_empty());
        assert!(auto(&LLAMA_8B, (1, 4096, 4096), true).is_empty());
        // The 1B's copies leave no spare time: only the one that stays in the slot.
        assert_eq!(auto(&LLAMA_1B, (16, 4096, 4096), true), vec![14]);
        // Asked for: the highest recomputed layer joins only when the others are too few.
        let d = dims();
        let asked = |rows, k| gate_up_layers(&d, 0, rows, GateUp::Layers(k), false);
        assert_eq!(asked((6, 512, 4096), 2), vec![2, 4]);
        assert_eq!(asked((2, 512, 4096), 2), vec![0, 1]);
        assert_eq!(asked((2, 512, 8), 9), vec![0, 1]);
        assert!(asked((6, 512, 4096), 0).is_empty());
        // The plan grows by the slot, two (N, I) bf16 pieces; and once some travel (all but
        // the top one of two or more), the residual and attention checkpoint rings by a slot
        // each.
        let (d, s) = six_layers();
        let gate_up = |k| Offload::unbounded(false, GateUp::Layers(k), 0);
        let slot = 2 * (2 * s.n * d.intermediate).next_multiple_of(256);
        let r = s.nr / s.n;
        let checkpoint: usize = attention_checkpoint(&d, false, ALL.map(|w| w * r), false)
            .iter()
            .map(|&p| (s.n * p).next_multiple_of(256))
            .sum();
        let ring_slot = 2 * s.nc + checkpoint;
        for k in 1..=3 {
            let grow =
                s.bytes(&d, false, ALL, 0, gate_up(k), 0) - s.bytes(&d, false, ALL, 0, LEAN, 0);
            assert_eq!(grow, slot + usize::from(k > 1) * ring_slot, "{k} layers");
        }
        assert_eq!(
            (resid_ring(6, 512, true), resid_ring(3, 512, true)),
            (RESID_RING + 1, 3)
        );
        assert_eq!(
            resid_ring(6, SHORT_RING_TOKENS, true),
            resid_ring(6, 512, false)
        );
        // Auto: the 8B at 2 x 2048 with 4-bit weights (five layers, four travelling) plans
        // the deeper rings; with bf16 weights (the one that stays) it does not.
        let s8 = ActSizes::new(&LLAMA_8B, 4096, 16, LOGIT_BUDGET_LEAN);
        let auto = Offload::unbounded(true, GateUp::Auto, 0);
        let plan = |four_bit| {
            s8.with_nf4_slots(&LLAMA_8B, four_bit)
                .bytes(&LLAMA_8B, false, ALL, 0, auto, 0)
        };
        let checkpoint: usize = attention_checkpoint(&LLAMA_8B, false, ALL.map(|w| w * 16), true)
            .iter()
            .map(|&p| (4096 * p).next_multiple_of(256))
            .sum();
        assert_eq!(plan(true) - plan(false), 2 * s8.nc + checkpoint);
    }

    #[test]
    fn resident_q_k_v_stay_below_the_highest_recomputed_layer_and_add_their_buffers() {
        assert_eq!(below_top_layers(&[0, 1, 2, 3, 4, 5], 2), vec![3, 4]);
        assert_eq!(below_top_layers(&[0, 1, 2], 9), vec![0, 1]);
        assert!(below_top_layers(&[0, 1, 2], 0).is_empty());
        assert!(below_top_layers(&[4], 3).is_empty());
        assert!(below_top_layers(&[], 3).is_empty());
        let (d, s) = six_layers();
        let offload = |qkv, k| Offload::unbounded(qkv, GateUp::Layers(0), k);
        for qk in [false, true] {
            // a resident layer's buffers, counted by hand: q, k, v, the three members' x A^T,
            // and with q/k norms their inputs and rstds
            let mut bufs = vec![2 * s.nq, 2 * s.nkv, 2 * s.nkv, 2 * 3 * s.nr];
            if qk {
                bufs.extend([2 * s.nq, 2 * s.nkv, 4 * s.n * d.heads, 4 * s.n * d.kv_heads]);
            }
            let per_layer: usize = bufs.iter().map(|&b| b.max(256)).sum();
            assert_eq!(resident_qkv_bytes(&d, s.n, qk, 3 * 8), per_layer);
            for kept in 0..=6 {
                let base = s.bytes(&d, qk, ALL, kept, LEAN, 0);
                for k in 0..=7 {
                    let grow = s.bytes(&d, qk, ALL, kept, offload(false, k), 0) - base;
                    let resident = k.min((6 - kept).saturating_sub(1));
                    assert_eq!(grow, resident * per_layer, "qk {qk} kept {kept} asked {k}");
                }
                // checkpoints that carry q, k, v keep none resident
                assert_eq!(
                    s.bytes(&d, qk, ALL, kept, offload(true, 4), 0),
                    s.bytes(&d, qk, ALL, kept, offload(true, 0), 0)
                );
            }
        }
    }

    #[test]
    fn q_k_v_travel_for_wide_layers_only() {
        // The 8B's layers are long enough to cover their copies with q, k, v; the 1B's are not.
        assert!(checkpoint_qkv(&LLAMA_8B, false));
        assert!(!checkpoint_qkv(&LLAMA_1B, false));
    }

    #[test]
    fn batch_checks() {
        let ok = check_batch(
            &[1, 2, 3],
            &[0, 2, 3],
            &[0, 1, 0],
            Some(&[5, -100, 7]),
            128,
            8,
            8,
            None,
        );
        assert_eq!(ok, Ok(2));
        assert!(check_batch(&[], &[0], &[], None, 128, 8, 8, None).is_err());
        assert!(check_batch(&[1; 9], &[0, 9], &[0; 9], None, 128, 8, 16, None).is_err());
        assert!(check_batch(&[1, 2], &[0, 2, 2], &[0, 1], None, 128, 8, 8, None).is_err());
        assert!(check_batch(&[1, 2], &[0, 2], &[0, 8], None, 128, 8, 8, None).is_err());
        assert!(check_batch(&[1, 200], &[0, 2], &[0, 1], None, 128, 8, 8, None).is_err());
        assert!(check_batch(&[1, 2], &[0, 2], &[0, 1], Some(&[1, 128]), 128, 8, 8, None).is_err());
        assert!(check_batch(&[1, 2], &[0, 2], &[0, 1], Some(&[1]), 128, 8, 8, None).is_err());
        assert!(check_batch(&[1, 2, 3], &[0, 3], &[0, 1, 2], None, 128, 8, 8, Some(2)).is_err());
        let (l, m) = mean_loss(&[3.0, 9.0, 2.0], &[1.0, 0.0, 1.0], &[1, -100, 2]);
        assert_eq!((l, m), (1.5, 2));
    }

    /// The step's input block: each region at its offset, the coefficients 1/m and -1/m on
    /// counted rows, a shorter batch's tails zero, and no targets leaving their regions zero.
    #[test]
    fn step_input_image_lays_out_every_region() {
        let batch = Batch {
            tokens: vec![5, 6, 7, 8],
            cu_seqlens: vec![0, 3, 4],
            positions: vec![0, 1, 2, 0],
        };
        let mut image = vec![9; 3]; // reused: old words must go
        let n_max = 6; // regions 64 words apart
        assert_eq!(StepInput::DLse.offset(n_max), 3 * 64);
        step_input_image(n_max, &batch, Some(&[6, -100, 8, 1]), &mut image);
        assert_eq!(image.len(), StepInput::CuSeqlens.offset(n_max) + 3);
        assert!(image.len() <= StepInput::block_words(n_max));
        let at = |r: StepInput, i: usize| image[r.offset(n_max) + i];
        let f = |w: u32| f32::from_bits(w);
        assert_eq!(
            (0..4).map(|i| at(StepInput::Ids, i)).collect::<Vec<_>>(),
            [5, 6, 7, 8]
        );
        assert_eq!(at(StepInput::Ids, 4), 0);
        assert_eq!(at(StepInput::Positions, 2), 2);
        assert_eq!(at(StepInput::Targets, 1) as i32, -100);
        assert_eq!(f(at(StepInput::DLse, 0)), 1.0 / 3.0);
        assert_eq!(f(at(StepInput::DLse, 1)), 0.0);
        assert_eq!(f(at(StepInput::DPicked, 3)), -1.0 / 3.0);
        assert_eq!(f(at(StepInput::DLse, 4)), 0.0);
        assert_eq!(
            (0..3)
                .map(|i| at(StepInput::CuSeqlens, i))
                .collect::<Vec<_>>(),
            [0, 3, 4]
        );
        step_input_image(n_max, &batch, None, &mut image);
        let at = |r: StepInput, i: usize| image[r.offset(n_max) + i];
        assert_eq!(at(StepInput::Targets, 0), 0);
        assert_eq!(f(at(StepInput::DLse, 0)), 0.0);
        assert_eq!(at(StepInput::Ids, 3), 8);
    }

    #[test]
    fn flops_match_hf_baseline_formula() {
        // llama-3.2-1b, seq 2048, r 16 (numbers from hf_baseline.py's flop_estimate).
        let d = LLAMA_1B;
        let (nm, p, mf, hf) = flop_estimate(&d, 2048, 16, true);
        let shapes: f64 = (2048.0 * 2048.0) * 2.0 + (2048.0 * 512.0) * 2.0 + 3.0 * 2048.0 * 8192.0;
        assert_eq!(nm, 16.0 * shapes + 128256.0 * 2048.0);
        assert_eq!(
            p,
            16.0 * 16.0 * (4096.0 * 2.0 + 2560.0 * 2.0 + 10240.0 * 3.0)
        );
        assert!(hf > mf && mf > 0.0);
    }
}

#[cfg(test)]
mod layout_tests {
    use super::*;
    use crate::checkpoint::WeightSource;
    use crate::safetensors_io::SafetensorsFiles;
    use ftrt_ops::dsl::Rounding;
    use std::path::PathBuf;

    #[test]
    fn kept_bf16_projections_stay_in_the_compact_layout() {
        let d = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama/llama");
        let config = ModelConfig::from_file(&d.join("config.json")).unwrap();
        let lay = weight_layout(&config);
        let keep = KeepBf16::parse(" layers.0.mlp.down_proj, layers.1.self_attn.q_proj ,");
        assert_eq!(keep.0.len(), 2);
        assert!(keep.keeps(0, Proj::Down) && keep.keeps(1, Proj::Q));
        assert!(!keep.keeps(1, Proj::Down) && !keep.keeps(0, Proj::Q));
        assert!(keep.unmatched(2).is_empty());
        assert_eq!(
            KeepBf16::parse("mlp.down,layers.7.").unmatched(2),
            ["layers.7."]
        );
        let (all4, _) = compact_without_proj(&lay, &KeepBf16::default());
        let (c, pairs) = compact_without_proj(&lay, &keep);
        let kept = |l: usize, p: Proj| lay.layers[l].proj[p.index()].clone();
        // The kept projections take their bf16 size in the buffer and are copied from the host;
        // the others stay empty.
        assert_eq!(
            layout_len(&c),
            layout_len(&all4) + kept(0, Proj::Down).len() + kept(1, Proj::Q).len()
        );
        for (l, p) in [(0, Proj::Down), (1, Proj::Q)] {
            let dev = c.layers[l].proj[p.index()].clone();
            assert_eq!(dev.len(), kept(l, p).len());
            assert!(pairs.contains(&(kept(l, p), dev)));
        }
        assert!(c.layers[0].proj[Proj::Q.index()].is_empty());
        let mut end = 0;
        for (h, dv) in &pairs {
            assert_eq!((h.len(), dv.start), (dv.len(), end));
            end = dv.end;
        }
        assert_eq!(end, layout_len(&c));
    }

    #[test]
    fn layout_matches_weight_store() {
        for arch in ["llama", "qwen2", "qwen3", "mistral"] {
            let d = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures/llama")
                .join(arch);
            let config = ModelConfig::from_file(&d.join("config.json")).unwrap();
            let ws = WeightSource::Safetensors(SafetensorsFiles::open(&d).unwrap());
            let store = WeightStore::load(&config, &ws, Rounding::F32).unwrap();
            let lay = weight_layout(&config);
            assert_eq!(lay.embed, store.embed, "{arch}");
            assert_eq!(lay.layers, store.layers, "{arch}");
            assert_eq!(lay.final_norm, store.final_norm, "{arch}");
            assert_eq!(lay.lm_head, store.lm_head, "{arch}");
            assert_eq!(layout_len(&lay), store.data.len(), "{arch}");
            assert_eq!(
                norm_ranges(&lay).len(),
                1 + 2 * config.num_hidden_layers * if config.qk_norm { 2 } else { 1 }
            );
            // 4-bit layout: everything but the projections, in order, no gaps or overlaps.
            let (c, pairs) = compact_without_proj(&lay, &KeepBf16::default());
            let proj_elems: usize = lay
                .layers
                .iter()
                .flat_map(|l| l.proj.iter())
                .map(|r| r.len())
                .sum();
            assert_eq!(layout_len(&c) + proj_elems, layout_len(&lay), "{arch}");
            let mut end = 0;
            for (h, d) in &pairs {
                assert_eq!((h.len(), d.start), (d.len(), end), "{arch}");
                end = d.end;
            }
            assert_eq!(end, layout_len(&c), "{arch}");
            assert_eq!(pairs[0], (lay.embed.clone(), c.embed.clone()));
            let want: [Option<Range<usize>>; 7] = std::array::from_fn(|i| {
                lay.layers[1].bias[i]
                    .as_ref()
                    .map(|r| pairs.iter().find(|(h, _)| h == r).unwrap().1.clone())
            });
            assert_eq!(c.layers[1].bias, want, "{arch}");
            assert!(c.layers.iter().all(|l| l.proj.iter().all(|r| r.is_empty())));
            assert_eq!(norm_ranges(&c).len(), norm_ranges(&lay).len());
        }
    }
}
