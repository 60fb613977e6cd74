//! LoRA's low-rank products, a raw op (`ops/kernels/lora.cu`): the CPU reference and the typed
//! launcher.
//!
//! `expand`: y (M, N) bf16 = alpha x (M, K) w, beta 0, f32 accumulation, K a multiple of 16
//! up to [`MAX_K`] (the rank times a stack's members). w is either (N, K) row-major (`w_kn`
//! false: y = s xa B^T, the forward's B products) or (K, N) row-major (`w_kn` true: dx = dxa A,
//! the backward's). cuBLASLt runs these at ~2.3 TB/s of y written (4096 x 14336 x 16 in 51 us
//! on an H200); the product is bound by that write, so the kernel's warps each multiply a
//! 16 x 64 piece of y on tensor cores from fragments loaded straight from L2 and store it
//! from registers, many warps per SM and no barrier between them.

use crate::dsl::Rounding;
use ftrt_runtime::cudarc::driver::{LaunchConfig, PushKernelArg};
use ftrt_runtime::{DevPtr, Gpu, RuntimeError};
use half::bf16;

use crate::kernels::LORA as KERNELS;

/// Largest K of one product.
pub const MAX_K: usize = 64;
/// Rows of y per block (four warps of 16), columns per block.
const BLOCK_ROWS: usize = 64;
const BLOCK_COLS: usize = 64;

/// Shape of one product (leading dimensions in elements).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ExpandDims {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub lda: usize,
    pub ldb: usize,
    pub ldc: usize,
    /// w is (K, N) row-major; else (N, K).
    pub w_kn: bool,
    pub alpha: f32,
}

impl ExpandDims {
    /// Whether the kernel takes this shape: K a multiple of 16 up to [`MAX_K`], even leading
    /// dimensions of x and w (32-bit loads), N a multiple of 8 and ldc even (32-bit stores),
    /// and sizes that fit its i32 arguments and its grid.
    pub fn supported(&self) -> bool {
        let fits = |v: usize| v <= i32::MAX as usize;
        self.k > 0
            && self.k.is_multiple_of(16)
            && self.k <= MAX_K
            && self.lda.is_multiple_of(2)
            && self.ldb.is_multiple_of(2)
            && self.n.is_multiple_of(8)
            && self.ldc.is_multiple_of(2)
            && self.lda >= self.k
            && self.ldb >= if self.w_kn { self.n } else { self.k }
            && self.ldc >= self.n
            && [self.m, self.n, self.lda, self.ldb, self.ldc]
                .into_iter()
                .all(fits)
            && self.m.div_ceil(BLOCK_ROWS) <= 65_535
    }

    /// Whether [`expand`] takes this shape on these operands: [`Self::supported`], x, w and y
    /// 4-byte aligned (32-bit loads and stores).
    pub fn takes(&self, x: DevPtr<bf16>, w: DevPtr<bf16>, y: DevPtr<bf16>) -> bool {
        self.supported()
            && x.addr.is_multiple_of(4)
            && w.addr.is_multiple_of(4)
            && y.addr.is_multiple_of(4)
    }
}

/// CPU reference: y (m, n) = alpha x w, f32 sums in k order, y rounded to the op's type as
/// `rounding` says (`Rounding::BF16`: as the kernel writes it).
pub fn expand_cpu(d: &ExpandDims, x: &[f32], w: &[f32], rounding: Rounding) -> Vec<f32> {
    let mut y = vec![0f32; d.m * d.n];
    for i in 0..d.m {
        for j in 0..d.n {
            let mut s = 0f32;
            for kk in 0..d.k {
                let wv = if d.w_kn {
                    w[kk * d.ldb + j]
                } else {
                    w[j * d.ldb + kk]
                };
                s += x[i * d.lda + kk] * wv;
            }
            y[i * d.n + j] = rounding.t.round(d.alpha * s);
        }
    }
    y
}

/// y = alpha x w on the compute stream (see the module doc); a shape or operands the kernel
/// does not take ([`ExpandDims::takes`]) are an error.
pub fn expand(
    gpu: &Gpu,
    d: &ExpandDims,
    x: DevPtr<bf16>,
    w: DevPtr<bf16>,
    y: DevPtr<bf16>,
) -> Result<(), RuntimeError> {
    if !d.takes(x, w, y) {
        return Err(RuntimeError::InvalidArgument(format!(
            "lora expand: unsupported shape or alignment {d:?} (x {:#x}, w {:#x}, y {:#x})",
            x.addr, w.addr, y.addr
        )));
    }
    if d.m == 0 || d.n == 0 {
        return Ok(());
    }
    let name = if d.w_kn {
        "lora_expand_nn"
    } else {
        "lora_expand_nt"
    };
    let f = gpu.function(&KERNELS, name)?;
    let [lda, ldb, ldc, m, n, k] = [d.lda, d.ldb, d.ldc, d.m, d.n, d.k].map(|v| v as i32);
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(&x.addr);
    b.arg(&lda);
    b.arg(&w.addr);
    b.arg(&ldb);
    b.arg(&y.addr);
    b.arg(&ldc);
    b.arg(&m);
    b.arg(&n);
    b.arg(&k);
    b.arg(&d.alpha);
    let cfg = LaunchConfig {
        grid_dim: (
            d.n.div_ceil(BLOCK_COLS) as u32,
            d.m.div_ceil(BLOCK_ROWS) as u32,
            1,
        ),
        block_dim: (128, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: x holds m rows of lda elements, w its k (or n) rows of ldb, y m rows of ldc (the
    // caller's contract); `supported` bounds every index the kernel forms.
    unsafe { b.launch(cfg) }?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_the_kernel_takes() {
        let d = ExpandDims {
            m: 4096,
            n: 14336,
            k: 16,
            lda: 32,
            ldb: 16,
            ldc: 14336,
            w_kn: false,
            alpha: 2.0,
        };
        assert!(d.supported());
        assert!(!ExpandDims { k: 24, ..d }.supported());
        assert!(!ExpandDims {
            k: 80,
            lda: 80,
            ldb: 80,
            ..d
        }
        .supported());
        assert!(!ExpandDims { n: 14332, ..d }.supported());
        assert!(!ExpandDims { lda: 8, ..d }.supported());
        assert!(ExpandDims {
            w_kn: true,
            ldb: 14336,
            ..d
        }
        .supported());
        assert!(!ExpandDims { w_kn: true, ..d }.supported());
    }

    #[test]
    fn reference_reads_both_layouts() {
        // w (N, K) and the same values as (K, N) give the same product.
        let (m, n, k) = (3, 8, 16);
        let x: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32 - 3.0).collect();
        let w: Vec<f32> = (0..n * k).map(|i| (i % 5) as f32 * 0.5).collect();
        let wt: Vec<f32> = (0..k * n).map(|i| w[(i % n) * k + i / n]).collect();
        let d = ExpandDims {
            m,
            n,
            k,
            lda: k,
            ldb: k,
            ldc: n,
            w_kn: false,
            alpha: 0.5,
        };
        let a = expand_cpu(&d, &x, &w, Rounding::F32);
        let b = expand_cpu(
            &ExpandDims {
                w_kn: true,
                ldb: n,
                ..d
            },
            &x,
            &wt,
            Rounding::F32,
        );
        assert_eq!(a, b);
        let direct: f32 = (0..k).map(|kk| x[k + kk] * w[2 * k + kk]).sum::<f32>() * 0.5;
        assert_eq!(a[n + 2], direct);
    }
}
