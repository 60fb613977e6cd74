//! The MLP's activation with the LoRA terms of its projections folded in
//! (`ftrt_ops::swiglu_lora`): gate's and up's rank-r terms are added where SwiGLU reads gate
//! and up, and down's rank-r input gradient where its backward reads d act, instead of by
//! rank-r GEMMs over the (rows, I) outputs. So the frozen gate/up GEMMs write g0 = x W^T alone
//! (beta 0; what kept or travelling layers store), and down's frozen dX GEMM d act0 alone:
//!
//!   forward:   act = swiglu(g0 + s xa_g Bg^T, u0 + s xa_u Bu^T)
//!   backward:  dgate, dup = swiglu's backward at the same g, u, of d act0 + dxa_down A_down
//!
//! (rounded as `ftrt_ops::swiglu_lora` says). Layers where none of gate, up and down is
//! adapted, or whose shapes the kernels do not take (r or I not a multiple of 8), run plain
//! SwiGLU after the rank-r GEMMs ([`super::lora_gemm`]); so does every layer with
//! `FTRT_LORA_IN_ACTIVATION=0`.

use ftrt_ops::activation;
use ftrt_ops::swiglu_lora::{self, Factor, LowRank};
use ftrt_runtime::DevPtr;
use half::bf16;

use super::{Ctx, GpuLlama, GpuResult};
use crate::llama::weights::Proj;

/// `0` runs the rank-r GEMMs over gate, up and d act instead ([`GpuLlama::lora_in_activation`]).
pub const LORA_IN_ACTIVATION_ENV: &str = "FTRT_LORA_IN_ACTIVATION";

/// Whether the LoRA terms go into the activation by default: unless the variable is `0`.
pub(super) fn lora_in_activation_enabled() -> bool {
    std::env::var(LORA_IN_ACTIVATION_ENV).as_deref() != Ok("0")
}

impl GpuLlama<'_> {
    /// Whether layer `l`'s MLP activation adds the LoRA terms of gate, up and down (see the
    /// module docs): on, some of the three adapted, and shapes the kernels take.
    pub(super) fn lora_in_activation(&self, l: usize) -> bool {
        let Some(lg) = self.lora.as_ref().filter(|_| self.activation_lora) else {
            return false;
        };
        let adapted = [Proj::Gate, Proj::Up, Proj::Down]
            .iter()
            .any(|&p| self.member(l, p).is_some());
        let rows = [(self.xa_ld(Proj::Gate.input_group()), 0), (lg.layout.r, 0)];
        adapted && swiglu_lora::supported(&self.activation_dims(0), &rows)
    }

    /// The kernels' shape for `t` rows.
    fn activation_dims(&self, t: usize) -> swiglu_lora::Dims {
        swiglu_lora::Dims {
            n: t,
            i: self.dims.intermediate,
            r: self.r(),
            s: self.lora.as_ref().map_or(0.0, |lg| lg.layout.scale),
        }
    }

    /// Gate's and up's rank-r products of layer `l` over the group's x A^T rows `xa`.
    fn gate_up_terms(&self, l: usize, xa: DevPtr<bf16>) -> [Option<LowRank>; 2] {
        let ld = self.xa_ld(Proj::Gate.input_group());
        [Proj::Gate, Proj::Up].map(|p| {
            self.member(l, p).map(|(col, b, _, _)| LowRank {
                x: xa.offset(col),
                ld,
                factor: b,
                kind: Factor::B,
            })
        })
    }

    /// act (t, I) = SwiGLU of layer `l`'s gate and up rows (their rank-r terms added from the
    /// group's x A^T rows `xa` when [`Self::lora_in_activation`]).
    pub(super) fn mlp_activation(
        &self,
        l: usize,
        (gate, up, xa): (DevPtr<bf16>, DevPtr<bf16>, DevPtr<bf16>),
        act: DevPtr<bf16>,
        t: usize,
    ) -> GpuResult<()> {
        if !self.lora_in_activation(l) {
            let d = activation::swiglu::Dims {
                N: t * self.dims.intermediate,
            };
            return activation::swiglu::forward(self.gpu, &d, gate, up, act).ctx("swiglu");
        }
        let [tg, tu] = self.gate_up_terms(l, xa);
        swiglu_lora::forward(self.gpu, &self.activation_dims(t), gate, up, tg, tu, act)
            .ctx("swiglu with LoRA terms")
    }

    /// dgate, dup (t, I) of layer `l`'s activation from d act `dact` (down's frozen dX; with
    /// [`Self::lora_in_activation`], down's rank-r term is added here from its dxa (t, r)
    /// rows `dxa`, and gate's and up's from `xa`), and act too when given (the recompute
    /// from a checkpoint left it to this pass).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn mlp_activation_backward(
        &self,
        l: usize,
        (gate, up, xa): (DevPtr<bf16>, DevPtr<bf16>, DevPtr<bf16>),
        (dact, dxa): (DevPtr<bf16>, DevPtr<bf16>),
        (dgate, dup): (DevPtr<bf16>, DevPtr<bf16>),
        act: Option<DevPtr<bf16>>,
        t: usize,
    ) -> GpuResult<()> {
        let gpu = self.gpu;
        if !self.lora_in_activation(l) {
            let n = t * self.dims.intermediate;
            return match act {
                Some(h) => activation::swiglu_backward_act::forward(
                    gpu,
                    &activation::swiglu_backward_act::Dims { N: n },
                    gate,
                    up,
                    dact,
                    h,
                    dgate,
                    dup,
                ),
                None => activation::swiglu::backward(
                    gpu,
                    &activation::swiglu::Dims { N: n },
                    gate,
                    up,
                    dact,
                    dgate,
                    dup,
                ),
            }
            .ctx("swiglu backward");
        }
        let [tg, tu] = self.gate_up_terms(l, xa);
        let down = self.stack_a(l, Proj::Down.input_group()).map(|a| LowRank {
            x: dxa,
            ld: self.r(),
            factor: a,
            kind: Factor::A,
        });
        let d = self.activation_dims(t);
        swiglu_lora::backward(gpu, &d, gate, up, tg, tu, dact, down, dgate, dup, act)
            .ctx("swiglu backward with LoRA terms")
    }
}
