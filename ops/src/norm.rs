//! RMSNorm family: Llama's, Gemma's `(1 + w)` variant, and residual-add fused with RMSNorm.
use crate::kernels::NORM as KERNELS;
use ftrt_macros::op;

op! {
    /// RMSNorm over the last dim with Hugging Face Llama's cast points: the row is normalised in
    /// f32, cast to the input dtype, then multiplied by the weight in that dtype.
    /// y = T(w * T(x * rstd)),  rstd = 1 / sqrt(mean(x^2) + eps).  Saves rstd (R) f32.
    /// `backward dx` gives dx = rstd * (g - xhat * mean(g * xhat)) with g = T(dy * w) (autograd
    /// rounds the product's gradient to T), xhat = x * rstd;
    /// `backward dw` gives dw = sum over rows of T(dy * T(x * rstd)) (full fine-tuning only).
    rms_norm(x: [R, C] T, w: [C] T, eps: f32) -> (y: [R, C] T) saves (rstd: [R] f32) {
        forward for r in R, c in C {
            let rs = rsqrt(mean(c, x[r, c] * x[r, c]) + eps);
            rstd[r] = rs;
            y[r, c] = w[c] * T(x[r, c] * rs);
        }
        backward dx (dy) -> (dx) for r in R, c in C {
            let g = T(dy[r, c] * w[c]);
            let xhat = x[r, c] * rstd[r];
            let m = mean(c, g * xhat);
            dx[r, c] = rstd[r] * (g - xhat * m);
        }
        backward dw (dy) -> (dw) for c in C, r in R {
            dw[c] = sum(r, T(dy[r, c] * T(x[r, c] * rstd[r])));
        }
        check { eps = 1e-5 }
    }

    /// Gemma's RMSNorm: everything in f32, the weight offset by one, one cast at the end.
    /// y = T(x * rstd * (1 + w)).  Saves rstd (R) f32.
    rms_norm_gemma(x: [R, C] T, w: [C] T, eps: f32) -> (y: [R, C] T) saves (rstd: [R] f32) {
        forward for r in R, c in C {
            let rs = rsqrt(mean(c, x[r, c] * x[r, c]) + eps);
            rstd[r] = rs;
            y[r, c] = x[r, c] * rs * (1.0 + w[c]);
        }
        backward dx (dy) -> (dx) for r in R, c in C {
            let g = dy[r, c] * (1.0 + w[c]);
            let xhat = x[r, c] * rstd[r];
            let m = mean(c, g * xhat);
            dx[r, c] = rstd[r] * (g - xhat * m);
        }
        check { eps = 1e-6 }
    }

    /// Residual add fused with Llama RMSNorm: h = T(x + res) is the new residual stream,
    /// y = rms_norm(h). Composed from `rms_norm`'s passes; the compiler fuses the add into the
    /// norm's sweeps, so one kernel reads x and res and writes h and y.
    /// Backward: dx = dres = dh + T(rstd * (g - hhat * mean(g * hhat))), g = T(dy * w): the
    /// norm's gradient rounded to T before it joins the residual's, as autograd does.
    add_rms_norm(x: [R, C] T, res: [R, C] T, w: [C] T, eps: f32) -> (y: [R, C] T, h: [R, C] T) saves (rstd: [R] f32) {
        forward for r in R, c in C {
            let hv = T(x[r, c] + res[r, c]);
            use rms_norm.forward(x = hv, w = w, eps = eps, y = y, rstd = rstd);
            h[r, c] = hv;
        }
        backward (dy, dh) -> (dx, dres) for r in R, c in C {
            use rms_norm.backward_dx(x = h, w = w, rstd = rstd, dy = dy, dx = let dnorm);
            let dsum = dh[r, c] + T(dnorm);
            dx[r, c] = dsum;
            dres[r, c] = dsum;
        }
        check { eps = 1e-5 }
    }
}

#[cfg(test)]
mod tests;
