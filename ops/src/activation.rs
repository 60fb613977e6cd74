//! Gated activations of the MLP: SwiGLU (Llama, Qwen, Mistral) and GeGLU (Gemma), each
//! h = T(act(g)) * u as Hugging Face computes it in the model's dtype. In every backward the
//! activation's upstream gradient is T(dh * u), rounded as autograd rounds it.
use crate::kernels::ACTIVATION as KERNELS;
use ftrt_macros::op;

op! {
    /// SwiGLU: h = T(silu(g)) * u,  silu(g) = g * sigmoid(g).
    /// Backward: du = dh * T(silu(g)),  dg = T(dh * u) * s * (1 + g * (1 - s)),  s = sigmoid(g).
    swiglu(g: [N] T, u: [N] T) -> (h: [N] T) {
        forward for i in N {
            h[i] = T(g[i] * sigmoid(g[i])) * u[i];
        }
        backward (dh) -> (dg, du) for i in N {
            let s = sigmoid(g[i]);
            du[i] = dh[i] * T(g[i] * s);
            dg[i] = T(dh[i] * u[i]) * s * (1.0 + g[i] * (1.0 - s));
        }
    }

    /// SwiGLU's backward that also writes the forward's output h: a recomputed layer's MLP
    /// needs h only after its down_proj backward (for down's dA), so the recompute skips the
    /// forward and this one pass reads g and u once for both.
    swiglu_backward_act(g: [N] T, u: [N] T, dh: [N] T) -> (h: [N] T, dg: [N] T, du: [N] T) {
        forward for i in N {
            use swiglu.forward(g = g, u = u, h = h);
            use swiglu.backward(g = g, u = u, dh = dh, dg = dg, du = du);
        }
    }
}

op! {
    /// GeGLU with the tanh approximation (`gelu_pytorch_tanh`):
    /// h = T(gelu(g)) * u,  gelu(g) = 0.5 g (1 + tanh(k (g + 0.044715 g^3))),  k = sqrt(2 / pi).
    geglu_tanh(g: [N] T, u: [N] T) -> (h: [N] T) {
        forward for i in N {
            let x = g[i];
            h[i] = T(0.5 * x * (1.0 + tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)))) * u[i];
        }
        backward (dh) -> (dg, du) for i in N {
            let x = g[i];
            let t = tanh(0.7978845608028654 * (x + 0.044715 * x * x * x));
            du[i] = dh[i] * T(0.5 * x * (1.0 + t));
            let dt = 0.7978845608028654 * (1.0 + 0.134145 * x * x);
            dg[i] = T(dh[i] * u[i]) * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * dt);
        }
    }
}

op! {
    /// GeGLU with the exact GeLU: h = T(gelu(g)) * u,  gelu(g) = 0.5 g (1 + erf(g / sqrt 2)).
    /// Backward: dgelu = 0.5 (1 + erf(g / sqrt 2)) + g exp(-g^2 / 2) / sqrt(2 pi).
    geglu_erf(g: [N] T, u: [N] T) -> (h: [N] T) {
        forward for i in N {
            h[i] = T(0.5 * g[i] * (1.0 + erf(g[i] * 0.7071067811865476))) * u[i];
        }
        backward (dh) -> (dg, du) for i in N {
            let x = g[i];
            let cdf = 0.5 * (1.0 + erf(x * 0.7071067811865476));
            du[i] = dh[i] * T(x * cdf);
            dg[i] = T(dh[i] * u[i]) * (cdf + x * exp(-0.5 * x * x) * 0.3989422804014327);
        }
    }
}

#[cfg(test)]
mod tests;
