//! GEMM interface shared by both backends: a row-major strided-batched product
//! `C_b[m,n] = alpha * op(A_b) · op(B_b) + beta * C_b (+ bias[n])` for every batch `b`.
//!
//! - [`cpu`]: f32 / f64 host slices through `matrixmultiply`.
//! - [`cublaslt`]: bf16 device inputs, f32 accumulation, bf16 or f32 output, through cuBLASLt.

pub mod cpu;
pub mod cublaslt;

use crate::error::RuntimeError;

/// Shape and layout of one (batched) GEMM, all row-major, all counts in elements.
///
/// Storage: `op(A)` is `[m, k]`: A is stored `[m, k]` with row stride `lda >= k`, or, when
/// `transa`, `[k, m]` with `lda >= m`. `op(B)` is `[k, n]`: B is stored `[k, n]` (`ldb >= n`)
/// or, when `transb`, `[n, k]` (`ldb >= k`). C is `[m, n]` with `ldc >= n`. Batch `b` starts at
/// `b * stride_*` (a stride of 0 broadcasts A or B over the batch). The bias is a length-`n`
/// vector of C's dtype added to every row of every batch. `beta = 1` accumulates into C;
/// with `beta = 0` C is never read.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GemmDesc {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub transa: bool,
    pub transb: bool,
    pub lda: usize,
    pub ldb: usize,
    pub ldc: usize,
    pub batch: usize,
    pub stride_a: usize,
    pub stride_b: usize,
    pub stride_c: usize,
    pub alpha: f32,
    pub beta: f32,
}

impl GemmDesc {
    /// Dense `C[m,n] = A[m,k] · B[k,n]`, one batch, alpha 1, beta 0.
    pub fn new(m: usize, n: usize, k: usize) -> Self {
        Self {
            m,
            n,
            k,
            transa: false,
            transb: false,
            lda: k.max(1),
            ldb: n.max(1),
            ldc: n.max(1),
            batch: 1,
            stride_a: m * k,
            stride_b: k * n,
            stride_c: m * n,
            alpha: 1.0,
            beta: 0.0,
        }
    }

    /// Sets the transposes and the dense leading dimensions that go with them.
    pub fn transposed(mut self, transa: bool, transb: bool) -> Self {
        self.transa = transa;
        self.transb = transb;
        self.lda = if transa { self.m } else { self.k }.max(1);
        self.ldb = if transb { self.k } else { self.n }.max(1);
        self
    }

    /// `batch` dense batches laid out back to back.
    pub fn batched(mut self, batch: usize) -> Self {
        self.batch = batch;
        self.stride_a = self.m * self.k;
        self.stride_b = self.k * self.n;
        self.stride_c = self.m * self.n;
        self
    }

    /// Sets alpha and beta (`beta = 1.0` accumulates into C).
    pub fn scaled(mut self, alpha: f32, beta: f32) -> Self {
        self.alpha = alpha;
        self.beta = beta;
        self
    }

    /// (rows, cols) of A and B as stored.
    pub fn stored_a(&self) -> (usize, usize) {
        if self.transa {
            (self.k, self.m)
        } else {
            (self.m, self.k)
        }
    }

    /// (rows, cols) of B as stored.
    pub fn stored_b(&self) -> (usize, usize) {
        if self.transb {
            (self.n, self.k)
        } else {
            (self.k, self.n)
        }
    }

    /// Minimum element counts of the A, B and C buffers.
    pub fn required_lens(&self) -> (usize, usize, usize) {
        let extent = |(r, c): (usize, usize), ld: usize| {
            if r == 0 || c == 0 {
                0
            } else {
                (r - 1) * ld + c
            }
        };
        let batched = |ext: usize, stride: usize| {
            if ext == 0 {
                0
            } else {
                (self.batch - 1) * stride + ext
            }
        };
        (
            batched(extent(self.stored_a(), self.lda), self.stride_a),
            batched(extent(self.stored_b(), self.ldb), self.stride_b),
            batched(extent((self.m, self.n), self.ldc), self.stride_c),
        )
    }

    /// 2·m·n·k·batch.
    pub fn flops(&self) -> f64 {
        2.0 * self.m as f64 * self.n as f64 * self.k as f64 * self.batch as f64
    }

    /// Checks leading dimensions and that batches of C do not overlap.
    pub fn validate(&self) -> Result<(), RuntimeError> {
        let bad = |what: String| {
            Err(RuntimeError::InvalidArgument(format!(
                "GEMM {self:?}: {what}"
            )))
        };
        if self.batch == 0 {
            return bad("batch must be >= 1".into());
        }
        let (_, ac) = self.stored_a();
        let (_, bc) = self.stored_b();
        if self.lda < ac.max(1) || self.ldb < bc.max(1) || self.ldc < self.n.max(1) {
            return bad(format!(
                "leading dims must cover the stored columns ({ac}, {bc}, {})",
                self.n
            ));
        }
        let c_extent = if self.m == 0 {
            0
        } else {
            (self.m - 1) * self.ldc + self.n
        };
        if self.batch > 1 && self.stride_c < c_extent {
            return bad(format!(
                "stride_c {} overlaps batches of C (extent {c_extent})",
                self.stride_c
            ));
        }
        Ok(())
    }

    /// Validates, then checks buffer lengths (in elements) against [`Self::required_lens`].
    pub fn check_lens(
        &self,
        a: usize,
        b: usize,
        c: usize,
        bias: Option<usize>,
    ) -> Result<(), RuntimeError> {
        self.validate()?;
        let (ra, rb, rc) = self.required_lens();
        if a < ra || b < rb || c < rc {
            return Err(RuntimeError::InvalidArgument(format!(
                "GEMM buffers too short: A {a} < {ra}, B {b} < {rb} or C {c} < {rc}"
            )));
        }
        if let Some(len) = bias {
            if len < self.n {
                return Err(RuntimeError::InvalidArgument(format!(
                    "GEMM bias has {len} < n = {} elements",
                    self.n
                )));
            }
        }
        Ok(())
    }
}
