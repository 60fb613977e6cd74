//! The forward graph's nodes: each op node carries its CPU reference (on f32 views of the
//! graph's f32 or bf16 tensors) and its GPU launcher (bf16 tensors).

use std::borrow::Cow;

use ftrt_ops::attention::{self, AttentionDims};
use ftrt_ops::decode::{self, CacheDims, QkvDims, SplitPlan};
use ftrt_ops::dsl::{Prec, Rounding};
use ftrt_ops::{activation, embedding, norm, rope};
use ftrt_runtime::graph::{CpuArgs, GpuArgs, Node, TensorId};
use ftrt_runtime::{Gpu, RuntimeError};
use half::bf16;

/// Input `i` of a CPU kernel as f32 values (bf16 widened; f32 borrowed, not copied: the
/// embedding table is an input of every step).
fn floats<'a>(args: &'a CpuArgs<'_>, i: usize, rt: Rounding) -> Cow<'a, [f32]> {
    match rt.t {
        Prec::Bf16 => Cow::Owned(widen(args.inputs[i])),
        _ => Cow::Borrowed(bytemuck::cast_slice::<u8, f32>(args.inputs[i])),
    }
}

/// Output `i`'s current values as f32 (for in-place ops).
fn current(args: &CpuArgs<'_>, i: usize, rt: Rounding) -> Vec<f32> {
    match rt.t {
        Prec::Bf16 => widen(args.outputs[i]),
        _ => bytemuck::cast_slice::<u8, f32>(args.outputs[i]).to_vec(),
    }
}

/// bf16 bytes as f32 values.
fn widen(bytes: &[u8]) -> Vec<f32> {
    bytemuck::cast_slice::<u8, bf16>(bytes)
        .iter()
        .map(|v| v.to_f32())
        .collect()
}

/// Stores f32 values into output `i` of the graph's element type (bf16: nearest even).
fn store(args: &mut CpuArgs<'_>, i: usize, rt: Rounding, v: &[f32]) {
    match rt.t {
        Prec::Bf16 => {
            for (d, x) in args.output::<bf16>(i).iter_mut().zip(v) {
                *d = bf16::from_f32(*x);
            }
        }
        _ => args.output::<f32>(i).copy_from_slice(v),
    }
}

/// A kernel node with its CPU reference and GPU launcher.
fn kernel(
    name: &str,
    reads: &[TensorId],
    writes: &[TensorId],
    cpu: impl Fn(&mut CpuArgs<'_>) -> Result<(), RuntimeError> + Send + Sync + 'static,
    gpu: impl Fn(&Gpu, &GpuArgs) -> Result<(), RuntimeError> + Send + Sync + 'static,
) -> Node {
    Node::kernel(name, reads, writes)
        .with_cpu(cpu)
        .with_gpu(gpu)
}

/// out (N, C) = table[ids] for a table (V, C): the token embeddings, or rows gathered.
#[allow(clippy::too_many_arguments)]
pub(super) fn embedding_node(
    name: &str,
    n: usize,
    v: usize,
    c: usize,
    rt: Rounding,
    ids: TensorId,
    table: TensorId,
    out: TensorId,
) -> Node {
    let d = embedding::embedding::Dims { N: n, V: v, C: c };
    kernel(
        name,
        &[ids, table],
        &[out],
        move |a| {
            let mut y = vec![0f32; n * c];
            embedding::embedding::forward_cpu(&d, a.input::<i32>(0), &floats(a, 1, rt), &mut y, rt);
            store(a, 0, rt, &y);
            Ok(())
        },
        move |gpu, a| embedding::embedding::forward(gpu, &d, a.input(0), a.input(1), a.output(0)),
    )
}

/// qkv (N, Hq + 2 Hkv, D) -> out = [q (N, Hq, D), k, v (N, Hkv, D)], RoPE applied to q and k
/// when `rope` = (pos (N) i32, cos, sin (P, D)) is given.
pub(super) fn split_qkv_node(
    name: &str,
    n: usize,
    d: QkvDims,
    rt: Rounding,
    qkv: TensorId,
    rope: Option<(TensorId, TensorId, TensorId)>,
    out: [TensorId; 3],
) -> Node {
    let reads = match rope {
        Some((pos, cos, sin)) => vec![qkv, pos, cos, sin],
        None => vec![qkv],
    };
    let with_rope = rope.is_some();
    kernel(
        name,
        &reads,
        &out,
        move |a| {
            let (x, cos, sin) = (
                floats(a, 0, rt),
                opt_floats(a, 2, with_rope, rt),
                opt_floats(a, 3, with_rope, rt),
            );
            let r = with_rope.then(|| (a.input::<i32>(1), &cos[..], &sin[..]));
            let parts = decode::split_qkv_cpu(&d, &x, r, rt);
            for (i, part) in parts.iter().enumerate() {
                store(a, i, rt, part);
            }
            Ok(())
        },
        move |gpu, a| {
            let r = with_rope.then(|| (a.input(1), a.input(2), a.input(3)));
            let out = [a.output(0), a.output(1), a.output(2)];
            decode::split_qkv(gpu, &d, n, a.input(0), r, out)
        },
    )
}

/// Input `i` as f32 values when `present`, else empty.
fn opt_floats<'a>(args: &'a CpuArgs<'_>, i: usize, present: bool, rt: Rounding) -> Cow<'a, [f32]> {
    if present {
        floats(args, i, rt)
    } else {
        Cow::Borrowed(&[])
    }
}

/// y (R, C), rstd (R) = rms_norm(x) w.
#[allow(clippy::too_many_arguments)]
pub(super) fn rms_norm_node(
    name: &str,
    r: usize,
    c: usize,
    eps: f32,
    rt: Rounding,
    x: TensorId,
    w: TensorId,
    y: TensorId,
    rstd: TensorId,
) -> Node {
    let d = norm::rms_norm::Dims { R: r, C: c };
    kernel(
        name,
        &[x, w],
        &[y, rstd],
        move |a| {
            let (mut yv, mut rs) = (vec![0f32; r * c], vec![0f32; r]);
            norm::rms_norm::forward_cpu(
                &d,
                eps,
                &floats(a, 0, rt),
                &floats(a, 1, rt),
                &mut yv,
                &mut rs,
                rt,
            );
            store(a, 0, rt, &yv);
            a.output::<f32>(1).copy_from_slice(&rs);
            Ok(())
        },
        move |gpu, a| {
            norm::rms_norm::forward(
                gpu,
                &d,
                eps,
                a.input(0),
                a.input(1),
                a.output(0),
                a.output(1),
            )
        },
    )
}

/// h = x + res; y = rms_norm(h) w (and rstd).
#[allow(clippy::too_many_arguments)]
pub(super) fn add_rms_norm_node(
    name: &str,
    r: usize,
    c: usize,
    eps: f32,
    rt: Rounding,
    x: TensorId,
    res: TensorId,
    w: TensorId,
    y: TensorId,
    h: TensorId,
    rstd: TensorId,
) -> Node {
    let d = norm::add_rms_norm::Dims { R: r, C: c };
    kernel(
        name,
        &[x, res, w],
        &[y, h, rstd],
        move |a| {
            let (mut yv, mut hv, mut rs) = (vec![0f32; r * c], vec![0f32; r * c], vec![0f32; r]);
            let (xv, rv, wv) = (floats(a, 0, rt), floats(a, 1, rt), floats(a, 2, rt));
            norm::add_rms_norm::forward_cpu(&d, eps, &xv, &rv, &wv, &mut yv, &mut hv, &mut rs, rt);
            store(a, 0, rt, &yv);
            store(a, 1, rt, &hv);
            a.output::<f32>(2).copy_from_slice(&rs);
            Ok(())
        },
        move |gpu, a| {
            norm::add_rms_norm::forward(
                gpu,
                &d,
                eps,
                a.input(0),
                a.input(1),
                a.input(2),
                a.output(0),
                a.output(1),
                a.output(2),
            )
        },
    )
}

/// RoPE in place on x (N, H, D) at positions `pos` from cos / sin (P, D).
#[allow(clippy::too_many_arguments)]
pub(super) fn rope_node(
    name: &str,
    n: usize,
    h: usize,
    hd: usize,
    p: usize,
    rt: Rounding,
    x: TensorId,
    pos: TensorId,
    cos: TensorId,
    sin: TensorId,
) -> Node {
    let d = rope::rope::Dims {
        N: n,
        H: h,
        D: hd,
        P: p,
    };
    kernel(
        name,
        &[pos, cos, sin],
        &[x],
        move |a| {
            let mut xv = current(a, 0, rt);
            rope::rope::forward_cpu(
                &d,
                &mut xv,
                a.input::<i32>(0),
                &floats(a, 1, rt),
                &floats(a, 2, rt),
                rt,
            );
            store(a, 0, rt, &xv);
            Ok(())
        },
        move |gpu, a| rope::rope::forward(gpu, &d, a.output(0), a.input(0), a.input(1), a.input(2)),
    )
}

/// kc[slot, :, pos] = k, vc[slot, :, pos] = v for every row (in place on the caches).
#[allow(clippy::too_many_arguments)]
pub(super) fn kv_store_node(
    name: &str,
    cd: CacheDims,
    n: usize,
    rt: Rounding,
    k: TensorId,
    v: TensorId,
    slot: TensorId,
    pos: TensorId,
    kc: TensorId,
    vc: TensorId,
) -> Node {
    kernel(
        name,
        &[k, v, slot, pos],
        &[kc, vc],
        move |a| {
            // the op's CPU reference: on the f32 caches in place; bf16 caches widened first
            if rt.t == Prec::Bf16 {
                let (mut kc, mut vc) = (current(a, 0, rt), current(a, 1, rt));
                let (k, v) = (floats(a, 0, rt), floats(a, 1, rt));
                decode::kv_store_cpu(&cd, &k, &v, a.input(2), a.input(3), &mut kc, &mut vc);
                store(a, 0, rt, &kc);
                store(a, 1, rt, &vc);
            } else {
                let CpuArgs { inputs, outputs } = a;
                let f = |i: usize| bytemuck::cast_slice::<u8, f32>(inputs[i]);
                let i32s = |i: usize| bytemuck::cast_slice::<u8, i32>(inputs[i]);
                let [kc, vc] = &mut outputs[..] else {
                    return Err(RuntimeError::Graph("kv_store writes two caches".into()));
                };
                let (kc, vc) = (bytemuck::cast_slice_mut(kc), bytemuck::cast_slice_mut(vc));
                decode::kv_store_cpu::<f32>(&cd, f(0), f(1), i32s(2), i32s(3), kc, vc);
            }
            Ok(())
        },
        move |gpu, a| {
            decode::kv_store(
                gpu,
                &cd,
                n,
                a.input(0),
                a.input(1),
                a.input(2),
                a.input(3),
                a.output(0),
                a.output(1),
            )
        },
    )
}

/// out (N, Hq, D): each row's attention over its slot's first `len` cached keys.
#[allow(clippy::too_many_arguments)]
pub(super) fn attention_node(
    name: &str,
    cd: CacheDims,
    split: SplitPlan,
    n: usize,
    rt: Rounding,
    q: TensorId,
    kc: TensorId,
    vc: TensorId,
    slot: TensorId,
    len: TensorId,
    scratch: TensorId,
    out: TensorId,
) -> Node {
    kernel(
        name,
        &[q, kc, vc, slot, len],
        &[scratch, out],
        move |a| {
            let mut o = vec![0f32; n * cd.heads * cd.head_dim];
            let (qv, kv, vv) = (floats(a, 0, rt), floats(a, 1, rt), floats(a, 2, rt));
            decode::decode_attention_cpu::<f32>(
                &cd,
                &qv,
                &kv,
                &vv,
                a.input::<i32>(3),
                a.input::<i32>(4),
                &mut o,
            );
            store(a, 1, rt, &o);
            Ok(())
        },
        move |gpu, a| {
            decode::decode_attention(
                gpu,
                &cd,
                &split,
                n,
                a.input(0),
                a.input(1),
                a.input(2),
                a.input(3),
                a.input(4),
                a.output(0),
                a.output(1),
            )
        },
    )
}

/// out (N, Hq, D), lse (Hq, N) f32 = causal attention of q (N, Hq, D) over k, v (N, Hkv, D)
/// within the segments of cu_seqlens (S + 1) i32 (`inputs` = [q, k, v, cu_seqlens]).
pub(super) fn flash_attention_node(
    name: &str,
    dims: AttentionDims,
    rt: Rounding,
    inputs: [TensorId; 4],
    out: TensorId,
    lse: TensorId,
) -> Node {
    kernel(
        name,
        &inputs,
        &[out, lse],
        move |a| {
            let (q, k, v) = (floats(a, 0, rt), floats(a, 1, rt), floats(a, 2, rt));
            let mut o = vec![0f32; dims.q_len()];
            let mut l = vec![0f32; dims.lse_len()];
            attention::attention_forward_cpu(&dims, a.input::<i32>(3), &q, &k, &v, &mut o, &mut l);
            store(a, 0, rt, &o);
            a.output::<f32>(1).copy_from_slice(&l);
            Ok(())
        },
        move |gpu, a| {
            let (q, k, v, cu) = (a.input(0), a.input(1), a.input(2), a.input(3));
            attention::attention_forward(gpu, dims, q, k, v, cu, a.output(0), a.output(1))
        },
    )
}

/// act = silu(gate) * up over `len` elements.
pub(super) fn swiglu_node(
    name: &str,
    len: usize,
    rt: Rounding,
    gate: TensorId,
    up: TensorId,
    act: TensorId,
) -> Node {
    let d = activation::swiglu::Dims { N: len };
    kernel(
        name,
        &[gate, up],
        &[act],
        move |a| {
            let mut y = vec![0f32; len];
            activation::swiglu::forward_cpu(&d, &floats(a, 0, rt), &floats(a, 1, rt), &mut y, rt);
            store(a, 0, rt, &y);
            Ok(())
        },
        move |gpu, a| activation::swiglu::forward(gpu, &d, a.input(0), a.input(1), a.output(0)),
    )
}

/// next (N) i32 = a pick from each row of logits (N, V) f32 under `sampling` (16) u8 = [the
/// f32 bits of 1 / T, seed] as two little-endian u64: the first index of the row's largest
/// logit when 1 / T is 0 (greedy), else a Gumbel-max draw from softmax(x / T).
pub(super) fn sample_node(
    n: usize,
    v: usize,
    logits: TensorId,
    sampling: TensorId,
    next: TensorId,
) -> Node {
    kernel(
        "sample",
        &[logits, sampling],
        &[next],
        move |a| {
            let word =
                |i: usize| u64::from_le_bytes(a.inputs[1][8 * i..8 * i + 8].try_into().unwrap());
            let inv_temp = f32::from_bits(word(0) as u32);
            let picked = decode::sample_rows_cpu(a.input::<f32>(0), v, inv_temp, word(1));
            a.output::<i32>(0).copy_from_slice(&picked);
            Ok(())
        },
        move |gpu, a| {
            let params = decode::Sampling::InMemory(a.input(1));
            decode::sample_rows(gpu, n, v, params, a.input(0), a.output(0))
        },
    )
}
