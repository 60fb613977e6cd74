//! SwiGLU of LoRA-adapted gate and up projections, a raw op (`ops/kernels/swiglu_lora.cu`):
//! the rank-r terms of gate, up and (in the backward) down's input gradient are formed inside
//! the activation's own pass, so no rank-r GEMM writes the (N, I) projections for the frozen
//! GEMMs to read back (the LoRA products' largest memory traffic: gate and up in the forward
//! and its recompute, down's input gradient in the backward).
//!
//! For row n and column i of the (N, I) frozen projections g0 = x Wg^T, u0 = x Wu^T (bf16),
//! with xa (N, ld) the group's x A^T (gate's r columns and up's), Bg, Bu (I, r), scale s, and
//! T rounding to bf16 (each term rounded before it is added, as PEFT's `base + lora * s`):
//!
//!   g = T(g0 + T(s xa_g[n] . Bg[i])),   u = T(u0 + T(s xa_u[n] . Bu[i]))
//!   forward:   h = swiglu(g, u) = T(T(silu(g)) u)                  (ops::activation::swiglu)
//!   backward:  dh = T(dh0 + T(dxa[n] . A[:, i])),  dg, du = swiglu's backward of (g, u, dh)
//!
//! where dh0 = dy W_down (N, I) is down_proj's frozen input gradient and dxa (N, r) = s dy
//! B_down, A (r, I) = down's A: down's rank-r input gradient. The backward can also write h
//! (as `activation::swiglu_backward_act`). A missing product (a projection not adapted) is
//! zero. Dot products accumulate in f32 over k = 0..r in order, on the CPU as on the GPU.
//!
//! The launchers take r = 8 or 16 and I a multiple of 8, with the x rows and factors 4-byte
//! aligned (even strides and first columns; [`supported`]). On the GPU the rank-r terms run on
//! tensor cores (one `mma.sync` m16n8k16 per 16 x 8 block), so their sums over k add in the
//! hardware's order, and the sigmoid uses the fast exp and reciprocal: a bf16 rounding apart
//! from the references at most. The rounded sums and products of two bf16 values (`T(g0 +
//! term)`, `T(silu) u`, `T(dh u)`, `dh T(silu)`) run as one `fma.rn.bf16x2` per pair, which
//! equals the references' f32 operation rounded to bf16.

#[cfg(test)]
mod tests;

use crate::activation::swiglu;
use crate::dsl::Rounding;
use crate::kernels::SWIGLU_LORA as KERNELS;
use ftrt_runtime::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
use ftrt_runtime::{DevPtr, Gpu, RuntimeError};
use half::bf16;

/// How a factor of rank r is stored for column i of the intermediate width I.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Factor {
    /// (I, r) row-major: a LoRA B of gate or up (PEFT's `lora_B.weight`).
    B,
    /// (r, I) row-major: down_proj's LoRA A (PEFT's `lora_A.weight`).
    A,
}

impl Factor {
    /// (column stride, rank stride) in elements.
    fn strides(self, r: usize, i: usize) -> (usize, usize) {
        match self {
            Factor::B => (r, 1),
            Factor::A => (1, i),
        }
    }
}

/// Shape of one call: `n` rows of the intermediate width `i`, rank `r`, gate/up scale `s`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Dims {
    pub n: usize,
    pub i: usize,
    pub r: usize,
    pub s: f32,
}

/// One rank-r product on the device: x (n, ld) bf16 from its first column (a row's r values
/// at x[row ld ..]), and the factor.
#[derive(Debug, Clone, Copy)]
pub struct LowRank {
    pub x: DevPtr<bf16>,
    pub ld: usize,
    pub factor: DevPtr<bf16>,
    pub kind: Factor,
}

/// The same on the CPU: x (n, ld) from column `col`.
#[derive(Debug, Clone, Copy)]
pub struct CpuLowRank<'a> {
    pub x: &'a [f32],
    pub ld: usize,
    pub col: usize,
    pub factor: &'a [f32],
    pub kind: Factor,
}

/// Whether the kernels take this shape and these x rows (stride and first column, elements).
pub fn supported(d: &Dims, x_rows: &[(usize, usize)]) -> bool {
    let eight = |v: usize| v.is_multiple_of(8);
    let even = |v: usize| v.is_multiple_of(2);
    (d.r == 8 || d.r == 16)
        && eight(d.i)
        && d.i < i32::MAX as usize
        && d.n < i32::MAX as usize
        && x_rows.iter().all(|&(ld, col)| even(ld) && even(col))
}

/// xa[n] . w[i] of `p` (f32, k in order), 0 without a product.
fn term(p: &Option<CpuLowRank>, d: &Dims, n: usize, i: usize) -> f32 {
    let Some(p) = p else { return 0.0 };
    let (wc, wk) = p.kind.strides(d.r, d.i);
    let x = &p.x[n * p.ld + p.col..][..d.r];
    (0..d.r).fold(0f32, |acc, k| x[k].mul_add(p.factor[i * wc + k * wk], acc))
}

fn round(v: f32) -> f32 {
    bf16::from_f32(v).to_f32()
}

/// g and u with their rank-r terms (the math above), as the kernels form them.
fn adapted(
    d: &Dims,
    (g0, u0): (&[f32], &[f32]),
    (gate, up): (&Option<CpuLowRank>, &Option<CpuLowRank>),
) -> (Vec<f32>, Vec<f32>) {
    let at = |base: &[f32], p, idx: usize| {
        let (n, i) = (idx / d.i, idx % d.i);
        round(base[idx] + round(d.s * term(p, d, n, i)))
    };
    let len = d.n * d.i;
    (
        (0..len).map(|e| at(g0, gate, e)).collect(),
        (0..len).map(|e| at(u0, up, e)).collect(),
    )
}

/// CPU reference of [`forward`]: h (n, i).
pub fn forward_cpu(
    d: &Dims,
    g0: &[f32],
    u0: &[f32],
    gate: Option<CpuLowRank>,
    up: Option<CpuLowRank>,
    h: &mut [f32],
) {
    let (g, u) = adapted(d, (g0, u0), (&gate, &up));
    swiglu::forward_cpu::<f32>(&swiglu::Dims { N: g.len() }, &g, &u, h, Rounding::BF16);
}

/// CPU reference of [`backward`]: dg, du (n, i), and h when given.
#[allow(clippy::too_many_arguments)]
pub fn backward_cpu(
    d: &Dims,
    g0: &[f32],
    u0: &[f32],
    gate: Option<CpuLowRank>,
    up: Option<CpuLowRank>,
    dh0: &[f32],
    down: Option<CpuLowRank>,
    dg: &mut [f32],
    du: &mut [f32],
    h: Option<&mut [f32]>,
) {
    let (g, u) = adapted(d, (g0, u0), (&gate, &up));
    let dh: Vec<f32> = (0..g.len())
        .map(|e| round(dh0[e] + round(term(&down, d, e / d.i, e % d.i))))
        .collect();
    let sd = swiglu::Dims { N: g.len() };
    swiglu::backward_cpu::<f32>(&sd, &g, &u, &dh, dg, du, Rounding::BF16);
    if let Some(h) = h {
        swiglu::forward_cpu::<f32>(&sd, &g, &u, h, Rounding::BF16);
    }
}

/// A product as the kernels take it (`SlProduct`): x, its row stride, the factor and the
/// factor's (column, rank) strides; a null x for none.
#[repr(C)]
#[derive(Clone, Copy)]
struct KernelProduct {
    x: u64,
    ldx: i64,
    w: u64,
    wc: i64,
    wk: i64,
}

// SAFETY: a plain C struct of five 8-byte fields that the kernels take by value.
unsafe impl DeviceRepr for KernelProduct {}

impl KernelProduct {
    fn of(p: Option<LowRank>, d: &Dims) -> Self {
        match p {
            Some(p) => {
                let (wc, wk) = p.kind.strides(d.r, d.i);
                KernelProduct {
                    x: p.x.addr,
                    ldx: p.ld as i64,
                    w: p.factor.addr,
                    wc: wc as i64,
                    wk: wk as i64,
                }
            }
            None => KernelProduct {
                x: 0,
                ldx: 0,
                w: 0,
                wc: 0,
                wk: 0,
            },
        }
    }
}

/// Rows a block of the kernels covers (four 16-row tiles) and columns (4 warps of 32).
const BLOCK_ROWS: usize = 64;
const BLOCK_COLS: usize = 128;

fn launch_config(d: &Dims) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (
            d.i.div_ceil(BLOCK_COLS) as u32,
            d.n.div_ceil(BLOCK_ROWS) as u32,
            1,
        ),
        block_dim: (128, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn check(d: &Dims, products: &[Option<LowRank>]) -> Result<(), RuntimeError> {
    let rows: Vec<(usize, usize)> = products.iter().flatten().map(|p| (p.ld, 0)).collect();
    let aligned = products
        .iter()
        .flatten()
        .all(|p| p.x.addr.is_multiple_of(4) && p.factor.addr.is_multiple_of(4));
    if supported(d, &rows) && aligned {
        Ok(())
    } else {
        Err(RuntimeError::InvalidArgument(format!(
            "swiglu_lora: r {} must be 8 or 16 and I {} a multiple of 8, x rows and factors \
             4-byte aligned with even strides ({rows:?})",
            d.r, d.i
        )))
    }
}

/// h (n, i) = swiglu of gate and up with their rank-r terms (module docs); g0, u0, h (n, i)
/// bf16 on the device.
pub fn forward(
    gpu: &Gpu,
    d: &Dims,
    g0: DevPtr<bf16>,
    u0: DevPtr<bf16>,
    gate: Option<LowRank>,
    up: Option<LowRank>,
    h: DevPtr<bf16>,
) -> Result<(), RuntimeError> {
    check(d, &[gate, up])?;
    if d.n == 0 || d.i == 0 {
        return Ok(());
    }
    let f = gpu.function(&KERNELS, "swiglu_lora_forward")?;
    let (pg, pu) = (KernelProduct::of(gate, d), KernelProduct::of(up, d));
    let (r, n, i) = (d.r as i32, d.n as i32, d.i as i32);
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(&g0.addr);
    b.arg(&u0.addr);
    b.arg(&pg);
    b.arg(&pu);
    b.arg(&r);
    b.arg(&d.s);
    b.arg(&n);
    b.arg(&i);
    b.arg(&h.addr);
    // SAFETY: g0, u0, h hold n * i elements; each product's x holds n rows of its stride from
    // its first column with r values each, its factor r * i elements (checked shapes above).
    unsafe { b.launch(launch_config(d)) }?;
    Ok(())
}

/// dg, du (n, i) (and h when given) of the same gate and up, from down's frozen input
/// gradient dh0 (n, i) and its rank-r product `down` (module docs).
#[allow(clippy::too_many_arguments)]
pub fn backward(
    gpu: &Gpu,
    d: &Dims,
    g0: DevPtr<bf16>,
    u0: DevPtr<bf16>,
    gate: Option<LowRank>,
    up: Option<LowRank>,
    dh0: DevPtr<bf16>,
    down: Option<LowRank>,
    dg: DevPtr<bf16>,
    du: DevPtr<bf16>,
    h: Option<DevPtr<bf16>>,
) -> Result<(), RuntimeError> {
    check(d, &[gate, up, down])?;
    if d.n == 0 || d.i == 0 {
        return Ok(());
    }
    let f = gpu.function(&KERNELS, "swiglu_lora_backward")?;
    let (pg, pu, pd) = (
        KernelProduct::of(gate, d),
        KernelProduct::of(up, d),
        KernelProduct::of(down, d),
    );
    let (r, n, i) = (d.r as i32, d.n as i32, d.i as i32);
    let h = h.map_or(0, |p| p.addr);
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(&g0.addr);
    b.arg(&u0.addr);
    b.arg(&pg);
    b.arg(&pu);
    b.arg(&dh0.addr);
    b.arg(&pd);
    b.arg(&r);
    b.arg(&d.s);
    b.arg(&n);
    b.arg(&i);
    b.arg(&dg.addr);
    b.arg(&du.addr);
    b.arg(&h);
    // SAFETY: as in `forward`; dh0, dg, du (and h when not null) hold n * i elements.
    unsafe { b.launch(launch_config(d)) }?;
    Ok(())
}
