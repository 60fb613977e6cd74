//! Synthetic training-like graphs and one trivial kernel, for the runtime's tests and the
//! selftest: every kernel node computes, per output `o` of n elements,
//! `o[i] = c + sum_j a_j * in_j[i % len_j]` (plus `0.5 * o[i]` first when `o` is
//! read-modify-write), on f32 tensors, with the same rounding on CPU and GPU.

use crate::device::{DevPtr, Gpu, PtxModule};
use crate::dtype::DType;
use crate::error::RuntimeError;
use crate::graph::{
    CpuArgs, CpuKernel, GpuArgs, GpuKernel, Graph, GraphBuilder, Lifetime, Node, TensorId,
};
use crate::rng::SplitMix64;
use cudarc::driver::{LaunchConfig, PushKernelArg};

/// Hand-written PTX (ISA 7.0, sm_80) of `ftrt_mix_f32(out, x, y, n, nx, ny, a, b, c)`:
/// `out[i] = fma(a, x[i % nx], b * y[i % ny]) + c` for `i < n` (f32, one thread per element).
pub static MIX_PTX: PtxModule = PtxModule {
    name: "ftrt_runtime_selftest",
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
