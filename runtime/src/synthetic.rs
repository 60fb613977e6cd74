//! Synthetic training-like graphs and one trivial kernel, for the runtime's tests and the
//! selftest: every kernel node computes, per output `o` of n elements,
//! `o[i] = c + sum_j a_j * in_j[i % len_j]` (plus `0.5 * o[i]` first when `o` is
//! read-modify-write), on f32 tensors, with the same rounding on CPU and GPU.

use crate::device::{DevPtr, Gpu, PtxModule};
use crate::dtype::DType;
use crate::error::RuntimeError;
use crate::gemm::GemmDesc;
use crate::graph::{
    CpuArgs, CpuKernel, GpuArgs, GpuKernel, Graph, GraphBuilder, Lifetime, Node, TensorId,
};
use crate::rng::SplitMix64;
use cudarc::driver::{LaunchConfig, PushKernelArg};

/// Hand-written PTX (ISA 7.0, sm_80) of `ftrt_mix_f32(out, x, y, n, nx, ny, a, b, c)`:
/// `out[i] = fma(a, x[i % nx], b * y[i % ny]) + c` for `i < n` (f32, one thread per element).
pub static MIX_PTX: PtxModule = PtxModule {
    name: "ftrt_runtime_selftest",
    arch: "compute_80",
    cubins: &[],
    cuda_source: r#"extern "C" __global__ void ftrt_mix_f32(float* out, const float* x, const float* y,
    unsigned n, unsigned nx, unsigned ny, float a, float b, float c) {
    unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = __fmaf_rn(a, x[i % nx], b * y[i % ny]) + c;
}
"#,
    ptx: r#".version 7.0
.target sm_80
.address_size 64

.visible .entry ftrt_mix_f32(
    .param .u64 p_out, .param .u64 p_x, .param .u64 p_y,
    .param .u32 p_n, .param .u32 p_nx, .param .u32 p_ny,
    .param .f32 p_a, .param .f32 p_b, .param .f32 p_c)
{
    .reg .pred %p;
    .reg .b32 %r<10>;
    .reg .f32 %f<8>;
    .reg .b64 %rd<12>;

    ld.param.u64 %rd1, [p_out];
    ld.param.u64 %rd2, [p_x];
    ld.param.u64 %rd3, [p_y];
    ld.param.u32 %r1, [p_n];
    ld.param.u32 %r2, [p_nx];
    ld.param.u32 %r3, [p_ny];
    ld.param.f32 %f1, [p_a];
    ld.param.f32 %f2, [p_b];
    ld.param.f32 %f3, [p_c];
    mov.u32 %r4, %ctaid.x;
    mov.u32 %r5, %ntid.x;
    mov.u32 %r6, %tid.x;
    mad.lo.u32 %r7, %r4, %r5, %r6;
    setp.ge.u32 %p, %r7, %r1;
    @%p bra DONE;
    rem.u32 %r8, %r7, %r2;
    rem.u32 %r9, %r7, %r3;
    cvta.to.global.u64 %rd4, %rd2;
    mul.wide.u32 %rd5, %r8, 4;
    add.s64 %rd6, %rd4, %rd5;
    ld.global.f32 %f4, [%rd6];
    cvta.to.global.u64 %rd7, %rd3;
    mul.wide.u32 %rd8, %r9, 4;
    add.s64 %rd9, %rd7, %rd8;
    ld.global.f32 %f5, [%rd9];
    mul.rn.f32 %f6, %f2, %f5;
    fma.rn.f32 %f6, %f1, %f4, %f6;
    add.rn.f32 %f7, %f6, %f3;
    cvta.to.global.u64 %rd10, %rd1;
    mul.wide.u32 %rd11, %r7, 4;
    add.s64 %rd10, %rd10, %rd11;
    st.global.f32 [%rd10], %f7;
DONE:
    ret;
}
"#,
};

/// `out[i] = fma(a, x[i % nx], b * y[i % ny]) + c` on the GPU's compute stream.
#[allow(clippy::too_many_arguments)]
pub fn launch_mix(
    gpu: &Gpu,
    out: DevPtr<f32>,
    n: u32,
    x: DevPtr<f32>,
    nx: u32,
    y: DevPtr<f32>,
    ny: u32,
    (a, b, c): (f32, f32, f32),
) -> Result<(), RuntimeError> {
    let f = gpu.function(&MIX_PTX, "ftrt_mix_f32")?;
    let mut l = gpu.stream().launch_builder(&f);
    l.arg(&out.addr)
        .arg(&x.addr)
        .arg(&y.addr)
        .arg(&n)
        .arg(&nx)
        .arg(&ny)
        .arg(&a)
        .arg(&b)
        .arg(&c);
    let cfg = LaunchConfig {
        grid_dim: (n.div_ceil(256), 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: the argument list matches the PTX signature; callers pass buffers of n, nx, ny
    // f32 elements.
    unsafe { l.launch(cfg) }?;
    Ok(())
}

/// CPU twin of [`launch_mix`] (same operation order and rounding).
pub fn mix_cpu(out: &mut [f32], x: &[f32], y: Option<&[f32]>, (a, b, c): (f32, f32, f32)) {
    for (i, o) in out.iter_mut().enumerate() {
        let yv = y.map_or(*o, |y| y[i % y.len()]);
        *o = a.mul_add(x[i % x.len()], b * yv) + c;
    }
}

/// The synthetic kernel of one node: a coefficient and length per input, a constant and
/// length per output, and which outputs are read-modify-write.
#[derive(Debug, Clone)]
pub struct MixKernel {
    pub coeffs: Vec<f32>,
    pub in_lens: Vec<usize>,
    pub consts: Vec<f32>,
    pub out_lens: Vec<usize>,
    pub rmw: Vec<bool>,
}

impl CpuKernel for MixKernel {
    fn run(&self, args: &mut CpuArgs<'_>) -> Result<(), RuntimeError> {
        let (inputs, outputs) = args.split::<f32>();
        for (k, out) in outputs.into_iter().enumerate() {
            let first_y = if self.rmw[k] { None } else { Some(inputs[0]) };
            let b = if self.rmw[k] { 0.5 } else { 0.0 };
            mix_cpu(out, inputs[0], first_y, (self.coeffs[0], b, self.consts[k]));
            for (j, x) in inputs.iter().enumerate().skip(1) {
                mix_cpu(out, x, None, (self.coeffs[j], 1.0, 0.0));
            }
        }
        Ok(())
    }
}

impl GpuKernel for MixKernel {
    fn launch(&self, gpu: &Gpu, args: &GpuArgs) -> Result<(), RuntimeError> {
        let len = |n: usize| {
            u32::try_from(n).map_err(|_| RuntimeError::InvalidArgument("mix: too long".into()))
        };
        for (k, &n) in self.out_lens.iter().enumerate() {
            let (out, n) = (args.output::<f32>(k), len(n)?);
            let (x0, n0) = (args.input::<f32>(0), len(self.in_lens[0])?);
            if self.rmw[k] {
                launch_mix(
                    gpu,
                    out,
                    n,
                    x0,
                    n0,
                    out,
                    n,
                    (self.coeffs[0], 0.5, self.consts[k]),
                )?;
            } else {
                launch_mix(
                    gpu,
                    out,
                    n,
                    x0,
                    n0,
                    x0,
                    n0,
                    (self.coeffs[0], 0.0, self.consts[k]),
                )?;
            }
            for j in 1..self.in_lens.len() {
                let (x, nx) = (args.input::<f32>(j), len(self.in_lens[j])?);
                launch_mix(gpu, out, n, x, nx, out, n, (self.coeffs[j], 1.0, 0.0))?;
            }
        }
        Ok(())
    }
}

/// Builds a synthetic training-like graph (all tensors f32): weights and optimizer state,
/// `layers` forward nodes each saving a tensor for the backward (half of them recomputable),
/// a loss, backward nodes reading the saved tensors in reverse, gradient accumulation and an
/// optimizer update (read-modify-write of weights and state). Element counts are drawn
/// log-uniformly from `[1, max_elems]`.
pub fn training_graph(seed: u64, layers: usize, max_elems: usize) -> Graph {
    let mut rng = SplitMix64::new(seed);
    let mut b = GraphBuilder::new();
    let len = |rng: &mut SplitMix64| {
        let e = (max_elems as f64).ln() * rng.unit_f64();
        (e.exp() as usize).clamp(1, max_elems)
    };
    let kernel = |b: &mut GraphBuilder,
                  rng: &mut SplitMix64,
                  name: String,
                  reads: &[TensorId],
                  writes: &[TensorId]| {
        let node = Node::kernel(name, reads, writes);
        let elems = |t: &TensorId| b.shape(*t).iter().product::<usize>();
        let mix = MixKernel {
            coeffs: node
                .inputs()
                .iter()
                .map(|_| rng.symmetric_f32() * 0.5)
                .collect(),
            in_lens: node.inputs().iter().map(elems).collect(),
            consts: writes.iter().map(|_| rng.symmetric_f32()).collect(),
            out_lens: writes.iter().map(elems).collect(),
            rmw: writes.iter().map(|w| reads.contains(w)).collect(),
        };
        b.node(node.with_cpu(mix.clone()).with_gpu(mix));
    };
    let input = b.tensor("input", &[len(&mut rng)], DType::F32, Lifetime::Weight);
    let mut x = input;
    let mut saved = Vec::new();
    let mut weights = Vec::new();
    for l in 0..layers {
        let w = b.tensor(
            format!("w{l}"),
            &[len(&mut rng)],
            DType::F32,
            Lifetime::Weight,
        );
        let m = b.tensor(
            format!("m{l}"),
            &[len(&mut rng)],
            DType::F32,
            Lifetime::OptimizerState,
        );
        let gw = b.tensor(
            format!("gw{l}"),
            &[len(&mut rng)],
            DType::F32,
            Lifetime::Gradient,
        );
        weights.push((w, m, gw));
        let s = b.tensor(
            format!("saved{l}"),
            &[len(&mut rng)],
            DType::F32,
            Lifetime::Saved,
        );
        if rng.chance(0.5) {
            b.mark_recomputable(s);
        }
        kernel(&mut b, &mut rng, format!("fwd{l}"), &[x, w], &[s]);
        let tmp = b.tensor(
            format!("tmp{l}"),
            &[len(&mut rng)],
            DType::F32,
            Lifetime::Scratch,
        );
        let a = b.tensor(
            format!("act{l}"),
            &[len(&mut rng)],
            DType::F32,
            Lifetime::Activation,
        );
        kernel(&mut b, &mut rng, format!("act{l}.a"), &[s], &[tmp]);
        kernel(&mut b, &mut rng, format!("act{l}.b"), &[tmp, s], &[a]);
        saved.push(s);
        x = a;
    }
    let mut g = b.tensor("dloss", &[len(&mut rng)], DType::F32, Lifetime::Gradient);
    kernel(&mut b, &mut rng, "loss".into(), &[x], &[g]);
    for l in (0..layers).rev() {
        let (w, _, gw) = weights[l];
        let g_next = b.tensor(
            format!("dx{l}"),
            &[len(&mut rng)],
            DType::F32,
            Lifetime::Gradient,
        );
        kernel(
            &mut b,
            &mut rng,
            format!("bwd{l}"),
            &[g, saved[l], w],
            &[g_next, gw],
        );
        g = g_next;
    }
    for (l, &(w, m, gw)) in weights.iter().enumerate() {
        kernel(&mut b, &mut rng, format!("adam{l}"), &[gw, w, m], &[w, m]);
    }
    let out = b.tensor("final", &[len(&mut rng)], DType::F32, Lifetime::Weight);
    kernel(&mut b, &mut rng, "final".into(), &[g], &[out]);
    b.build().expect("synthetic graphs are valid")
}

/// Shape of [`offload_graph`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OffloadGraphShape {
    pub layers: usize,
    /// Forward and backward passes in one step (gradient accumulation): saved tensors of
    /// different micro-batches have disjoint host lifetimes, so the pinned pool is reused.
    pub micro_batches: usize,
    /// bf16 GEMMs per layer in each direction (>= 3); each is `tokens x hidden x hidden`.
    pub gemms_per_layer: usize,
    pub tokens: usize,
    pub hidden: usize,
    /// Weights and activations: bf16 on the CUDA backend, f32 or f64 on the CPU backend
    /// (weight gradients are f32, so the CPU backend needs f32).
    pub dtype: DType,
}

impl OffloadGraphShape {
    /// The selftest's step: 16 layers, 2 micro-batches, 6 GEMMs of 8192x4096x4096 per layer
    /// and direction (~0.35 ms each on an H200), one 64 MiB saved activation per layer: its
    /// 1.2 ms copy each way at 55 GB/s fits in the ~2.1 ms of GEMMs of a layer.
    pub const SELFTEST: OffloadGraphShape = OffloadGraphShape {
        layers: 16,
        micro_batches: 2,
        gemms_per_layer: 6,
        tokens: 8192,
        hidden: 4096,
        dtype: DType::BF16,
    };
}

/// The tensors of [`offload_graph`] that hold its results after a step (whole-step
/// optimizer-state tensors: the weight gradients and the input gradient of every micro-batch)
/// and the step inputs (weights and token activations) to fill before it.
#[derive(Debug, Clone, Default)]
pub struct OffloadGraphIo {
    pub inputs: Vec<TensorId>,
    pub outputs: Vec<TensorId>,
    pub saved: Vec<TensorId>,
}

/// A training-like step of bf16 GEMMs only (runs on the CUDA backend). Per micro-batch `m`
/// and layer `l`, forward: `s[m][l] = x · W[l][0]` (Saved, `tokens x hidden` bf16), then
/// `gemms_per_layer - 1` more GEMMs through `W[l][1..]` give the next layer's input. Backward
/// (layers in reverse): `gemms_per_layer - 2` GEMMs through `W[l][G-1..2]^T` give `d`,
/// the weight gradient `gw[l] (+)= s[m][l]^T · d` (f32, accumulated over micro-batches: the
/// read of the saved tensor), and `g = d · W[l][1]^T` goes on to the layer below; the last
/// `g` of each micro-batch is copied into a whole-step output. Results: `gw` and those copies.
pub fn offload_graph(shape: &OffloadGraphShape) -> (Graph, OffloadGraphIo) {
    let OffloadGraphShape {
        layers,
        micro_batches,
        gemms_per_layer: gl,
        tokens: t,
        hidden: h,
        dtype: dt,
    } = *shape;
    assert!(gl >= 3 && layers >= 1 && micro_batches >= 1);
    let mut b = GraphBuilder::new();
    let mut io = OffloadGraphIo::default();
    b.gemm_workspace(crate::gemm::cublaslt::DEFAULT_WORKSPACE_BYTES);
    let w: Vec<Vec<TensorId>> = (0..layers)
        .map(|l| {
            (0..gl)
                .map(|j| b.tensor(format!("w{l}.{j}"), &[h, h], dt, Lifetime::Weight))
                .collect()
        })
        .collect();
    io.inputs.extend(w.iter().flatten());
    // Weight-gradient accumulators, whole step (declared optimizer state): the optimizer
    // reads them after the last micro-batch, and every micro-batch's peak sees them.
    let gw: Vec<TensorId> = (0..layers)
        .map(|l| {
            b.tensor(
                format!("gw{l}"),
                &[h, h],
                DType::F32,
                Lifetime::OptimizerState,
            )
        })
        .collect();
    io.outputs.extend(&gw);
    let fwd = GemmDesc::new(t, h, h);
    let bwd = GemmDesc::new(t, h, h).transposed(false, true);
    let mut dx_out = Vec::new();
    for m in 0..micro_batches {
        let x0 = b.tensor(format!("x0.mb{m}"), &[t, h], dt, Lifetime::Weight);
        io.inputs.push(x0);
        let mut x = x0;
        let mut saved = Vec::new();
        for (l, wl) in w.iter().enumerate() {
            let s = b.tensor(format!("s{l}.mb{m}"), &[t, h], dt, Lifetime::Saved);
            b.node(Node::gemm(
                format!("fwd{l}.0.mb{m}"),
                fwd,
                x,
                wl[0],
                s,
                None,
            ));
            let mut y = s;
            for (j, &wj) in wl.iter().enumerate().skip(1) {
                let z = b.tensor(format!("h{l}.{j}.mb{m}"), &[t, h], dt, Lifetime::Activation);
                b.node(Node::gemm(format!("fwd{l}.{j}.mb{m}"), fwd, y, wj, z, None));
                y = z;
            }
            saved.push(s);
            x = y;
        }
        io.saved.extend(&saved);
        let mut g = x;
        for l in (0..layers).rev() {
            let mut d = g;
            for j in (2..gl).rev() {
                let z = b.tensor(format!("d{l}.{j}.mb{m}"), &[t, h], dt, Lifetime::Gradient);
                b.node(Node::gemm(
                    format!("bwd{l}.{j}.mb{m}"),
                    bwd,
                    d,
                    w[l][j],
                    z,
                    None,
                ));
                d = z;
            }
            let wgrad = GemmDesc::new(h, h, t)
                .transposed(true, false)
                .scaled(1.0, if m == 0 { 0.0 } else { 1.0 });
            b.node(Node::gemm(
                format!("wgrad{l}.mb{m}"),
                wgrad,
                saved[l],
                d,
                gw[l],
                None,
            ));
            let z = b.tensor(format!("g{l}.mb{m}"), &[t, h], dt, Lifetime::Gradient);
            b.node(Node::gemm(
                format!("bwd{l}.1.mb{m}"),
                bwd,
                d,
                w[l][1],
                z,
                None,
            ));
            g = z;
        }
        let out = b.tensor(format!("dx.mb{m}"), &[t, h], dt, Lifetime::OptimizerState);
        b.node(Node::copy(format!("dx_out.mb{m}"), g, out));
        dx_out.push(out);
    }
    io.outputs.extend(dx_out);
    (b.build().expect("the offload graph is valid"), io)
}

/// The two plans of the offload bar for [`offload_graph`]: everything kept (no budget), and
/// a budget `force` saved activations (per micro-batch) below that, which moves most saved
/// tensors to pinned host memory. Both use `opts`' timing.
pub fn offload_bar_plans(
    g: &Graph,
    shape: &OffloadGraphShape,
    force: usize,
    opts: &crate::planner::PlanOptions,
) -> Result<(crate::planner::Plan, crate::planner::Plan), RuntimeError> {
    let kept = crate::planner::plan(
        g,
        &crate::planner::PlanOptions {
            vram_budget: None,
            ..opts.clone()
        },
    )?;
    let saved = crate::planner::align_up(
        shape.tokens * shape.hidden * shape.dtype.size(),
        crate::planner::ARENA_ALIGNMENT,
    );
    let budget = kept.arena_bytes.saturating_sub(force * saved);
    let off = crate::planner::plan(g, &opts.clone().with_budget(budget))?;
    Ok((kept, off))
}

#[cfg(test)]
mod offload_graph_tests {
    use super::*;
    use crate::offload::estimate;
    use crate::planner::{CostModel, PlanOptions};

    #[test]
    fn selftest_offload_plan_by_bandwidth() {
        let shape = OffloadGraphShape::SELFTEST;
        let (g, io) = offload_graph(&shape);
        let (kept, off) = offload_bar_plans(&g, &shape, 12, &PlanOptions::default()).unwrap();
        let c = CostModel::H200;
        let (ek, eo) = (estimate(&g, &kept, &c), estimate(&g, &off, &c));
        eprintln!("{off}");
        eprintln!("kept {ek:?}\noffloaded {eo:?}");
        assert!(kept.offloads.is_empty());
        assert!(
            off.offloads.len() * 4 >= io.saved.len() * 3,
            "{}",
            off.offloads.len()
        );
    }
}
