//! The projections' GEMMs with LoRA, by input group ([`Proj::INPUT_GROUPS`]): the projections
//! that read one input (q/k/v, gate/up) share one stacked x A^T GEMM in the forward and one
//! dA and one dx GEMM in the backward, so the input is read once per group, not once per
//! projection. All GEMMs are cuBLASLt, f32 accumulation.
//!
//! Forward of a group with adapted members 1..m (stack A_s = [A_1; ...; A_m], (m r, in)):
//!   xa (n, m r) = x A_s^T                          (one GEMM; member i owns columns i r..)
//!   y_i (n, out_i) = s xa_i B_i^T, then += x W_i^T (+ b_i)   (the base GEMM adds in its
//!                                                   epilogue, beta 1: y is read once)
//! Backward with W frozen:
//!   dB_i += s dy_i^T xa_i,  dxa_i = s dy_i B_i      (per member; dxa (n, m r))
//!   dA_s += dxa^T x,  dx (+)= dxa A_s                (one GEMM each for the stack)
//!   dx += dy_i W_i                                  (per member, beta 1)
//! except that gate's and up's `s xa_i B_i^T` and down's `dxa A_s` go into the MLP's
//! activation instead where it takes them ([`super::mlp_activation`]).

use ftrt_runtime::{DevPtr, GemmDesc};
use half::bf16;

use super::{GpuLlama, GpuResult};
use crate::llama::lora::LoraStack;
use crate::llama::weights::Proj;

/// Profile label of the rank-r GEMMs.
const LORA_GEMM: &str = "GEMM LoRA (rank r)";

impl GpuLlama<'_> {
    /// Layer `l`'s stack of input group `g`, if any member is adapted.
    fn stack(&self, l: usize, g: usize) -> Option<&LoraStack> {
        self.lora.as_ref()?.stacks[l][g].as_ref()
    }

    /// Row stride (elements) of group `g`'s x A^T buffers: its widest stack in any layer, in
    /// columns of r.
    pub(super) fn xa_ld(&self, g: usize) -> usize {
        self.lora
            .as_ref()
            .map_or(0, |lg| lg.widths[g] * lg.layout.r)
    }

    /// The rows of group `g`'s x A^T buffer `xa` from row `r0` on.
    pub(super) fn xa_rows(&self, xa: DevPtr<bf16>, g: usize, r0: usize) -> DevPtr<bf16> {
        if xa.is_null() {
            xa
        } else {
            xa.offset(r0 * self.xa_ld(g))
        }
    }

    /// xa (n, m r) = x (n, in) A_s^T for layer `l`'s stack of group `g` (nothing when none of
    /// the group is adapted); row stride [`Self::xa_ld`].
    pub(super) fn stack_xa(
        &self,
        l: usize,
        g: usize,
        x: DevPtr<bf16>,
        xa: DevPtr<bf16>,
        n: usize,
    ) -> GpuResult<()> {
        let (Some(st), Some(lg)) = (self.stack(l, g), self.lora.as_ref()) else {
            return Ok(());
        };
        let width = st.members.len() * lg.layout.r;
        let inn = st.members[0].shape(&self.dims).1;
        let mut desc = GemmDesc::new(n, width, inn).transposed(false, true);
        desc.ldc = self.xa_ld(g);
        self.lora_gemm(&desc, x, lg.bf16.offset(st.a.start), xa)
    }

    /// y (n, out) = x (n, in) W^T (+ b) + s xa_p B^T, xa_p being `p`'s columns of its group's
    /// x A^T `xa` (from [`Self::stack_xa`]). The low-rank term is written first and the base
    /// GEMM adds its product in the epilogue (beta 1): the compute-bound GEMM reads y once,
    /// instead of a memory-bound rank-r GEMM reading and writing all of y again after it.
    /// Gate's and up's term is left to the activation when [`Self::lora_in_activation`]
    /// ([`super::mlp_activation`]): y is x W^T alone.
    pub(super) fn project(
        &self,
        l: usize,
        p: Proj,
        x: DevPtr<bf16>,
        y: DevPtr<bf16>,
        xa: DevPtr<bf16>,
        n: usize,
    ) -> GpuResult<()> {
        let (out, inn) = p.shape(&self.dims);
        let bias = self.layout.layers[l].bias[p.index()]
            .as_ref()
            .map(|r| self.w(r));
        let mut beta = 0.0;
        let in_activation = matches!(p, Proj::Gate | Proj::Up) && self.lora_in_activation(l);
        if let Some((col, b, _, s)) = self.member(l, p).filter(|_| !in_activation) {
            let mut desc = GemmDesc::new(n, out, self.r())
                .transposed(false, true)
                .scaled(s, 0.0);
            desc.lda = self.xa_ld(p.input_group());
            self.lora_gemm(&desc, xa.offset(col), b, y)?;
            beta = 1.0;
        }
        let wt = self.proj_weight(l, p)?;
        self.gemm(
            &GemmDesc::new(n, out, inn)
                .transposed(false, true)
                .scaled(1.0, beta),
            x,
            wt,
            y,
            bias,
        )
    }

    /// Backward of layer `l`'s projections of group `g` (each `(p, dy)`, dy (n, out_p)) with
    /// W frozen, from their input x (n, in) and x A^T `xa`: dx (n, in) (+)= sum_p dy_p W_p +
    /// s (dy_p B_p) A_p (added to dx when `accumulate`); dB_p += s dy_p^T xa_p and dA_p +=
    /// (s dy_p B_p)^T x into the f32 gradients. `dxa` is an (n, 3 r) scratch. With `x` None
    /// the dA GEMM is left to the caller ([`Self::stack_da`] on the same `dxa`, once x exists).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn group_backward(
        &self,
        l: usize,
        g: usize,
        x: Option<DevPtr<bf16>>,
        xa: DevPtr<bf16>,
        dys: &[(Proj, DevPtr<bf16>)],
        dx: DevPtr<bf16>,
        accumulate: bool,
        n: usize,
        dxa: DevPtr<bf16>,
    ) -> GpuResult<()> {
        let inn = Proj::INPUT_GROUPS[g][0].shape(&self.dims).1;
        let mut beta = if accumulate { 1.0 } else { 0.0 };
        if let (Some(st), Some(lg)) = (self.stack(l, g), self.lora.as_ref()) {
            let r = lg.layout.r;
            let width = st.members.len() * r;
            for &(p, dy) in dys {
                let Some((col, b, gb, s)) = self.member(l, p) else {
                    continue;
                };
                let out = p.shape(&self.dims).0;
                // dB (out, r) += s dy^T (out, n) · xa_p (n, r)
                let mut db = GemmDesc::new(out, r, n)
                    .transposed(true, false)
                    .scaled(s, 1.0);
                db.ldb = self.xa_ld(g);
                self.lora_gemm_f32(&db, dy, xa.offset(col), gb)?;
                // dxa_p (n, r) = s dy (n, out) · B (out, r), into its columns of dxa (n, m r)
                let mut dxa_p = GemmDesc::new(n, r, out).scaled(s, 0.0);
                dxa_p.ldc = width;
                self.lora_gemm(&dxa_p, dy, b, dxa.offset(col))?;
            }
            if let Some(x) = x {
                self.stack_da(l, g, x, n, dxa)?;
            }
            // dx (+)= dxa (n, m r) · A_s (m r, in); down's is left to the activation's backward
            // when [`Self::lora_in_activation`] (it reads dxa)
            if g != Proj::Down.input_group() || !self.lora_in_activation(l) {
                self.lora_gemm(
                    &GemmDesc::new(n, inn, width).scaled(1.0, beta),
                    dxa,
                    lg.bf16.offset(st.a.start),
                    dx,
                )?;
                beta = 1.0;
            }
        }
        for &(p, dy) in dys {
            let out = p.shape(&self.dims).0;
            let wt = self.proj_weight(l, p)?;
            self.gemm(
                &GemmDesc::new(n, inn, out).scaled(1.0, beta),
                dy,
                wt,
                dx,
                None,
            )?;
            beta = 1.0;
        }
        Ok(())
    }

    /// dA_s (m r, in) += dxa^T (m r, n) · x (n, in) for layer `l`'s stack of group `g` (nothing
    /// when none of the group is adapted), `dxa` as [`Self::group_backward`] left it.
    pub(super) fn stack_da(
        &self,
        l: usize,
        g: usize,
        x: DevPtr<bf16>,
        n: usize,
        dxa: DevPtr<bf16>,
    ) -> GpuResult<()> {
        let (Some(st), Some(lg)) = (self.stack(l, g), self.lora.as_ref()) else {
            return Ok(());
        };
        let width = st.members.len() * lg.layout.r;
        let inn = Proj::INPUT_GROUPS[g][0].shape(&self.dims).1;
        self.lora_gemm_f32(
            &GemmDesc::new(width, inn, n)
                .transposed(true, false)
                .scaled(1.0, 1.0),
            dxa,
            x,
            lg.grad.offset(st.a.start),
        )
    }

    /// Layer `l`'s stacked A_s (m r, in) of group `g` (bf16 copy), if any member is adapted.
    pub(super) fn stack_a(&self, l: usize, g: usize) -> Option<DevPtr<bf16>> {
        let lg = self.lora.as_ref()?;
        Some(lg.bf16.offset(self.stack(l, g)?.a.start))
    }

    /// The rank r (0 without an adapter).
    pub(super) fn r(&self) -> usize {
        self.lora.as_ref().map_or(0, |g| g.layout.r)
    }

    /// Projection `p` of layer `l`, if adapted: its first column in its group's x A^T, its B
    /// (bf16 copy) and B's f32 gradient, and the scale s.
    pub(super) fn member(
        &self,
        l: usize,
        p: Proj,
    ) -> Option<(usize, DevPtr<bf16>, DevPtr<f32>, f32)> {
        let lg = self.lora.as_ref()?;
        let i = self.stack(l, p.input_group())?.position(p)?;
        let b = lg.layout.slot(l, p)?.b.start;
        Some((
            i * lg.layout.r,
            lg.bf16.offset(b),
            lg.grad.offset(b),
            lg.layout.scale,
        ))
    }

    /// A rank-r GEMM, bf16 out (profiled as LoRA).
    fn lora_gemm(
        &self,
        desc: &GemmDesc,
        a: DevPtr<bf16>,
        b: DevPtr<bf16>,
        c: DevPtr<bf16>,
    ) -> GpuResult<()> {
        self.gemm_as(LORA_GEMM, desc, a, b, c, None)
    }

    /// A rank-r GEMM into an f32 gradient (beta 1 accumulates).
    fn lora_gemm_f32(
        &self,
        desc: &GemmDesc,
        a: DevPtr<bf16>,
        b: DevPtr<bf16>,
        c: DevPtr<f32>,
    ) -> GpuResult<()> {
        self.gemm_f32_as(LORA_GEMM, desc, a, b, c)
    }
}
