//! Optimizers: AdamW with f32 state (PyTorch's update order), and bitsandbytes-style 8-bit
//! blockwise AdamW (state quantized per block of 256 with the dynamic maps).
use crate::kernels::ADAMW as KERNELS;
use ftrt_macros::op;

op! {
    /// AdamW as torch.optim.AdamW (decoupled weight decay, bias correction, f32 state):
    /// p *= 1 - lr * wd;  m += (1 - b1) (g - m);  v = b2 v + (1 - b2) g^2;
    /// p -= step_size * m / (sqrt(v) / bc2_sqrt + eps),  step_size = lr / (1 - b1^t),  bc2_sqrt = sqrt(1 - b2^t).
    adamw(mut p: [N] f32, g: [N] f32, mut m: [N] f32, mut v: [N] f32, lr: f32, wd: f32, beta1: f32, beta2: f32, eps: f32, step_size: f32, bc2_sqrt: f32) {
        forward for i in N {
            let gi = g[i];
            let mi = m[i] + (1.0 - beta1) * (gi - m[i]);
            let vi = beta2 * v[i] + (1.0 - beta2) * gi * gi;
            m[i] = mi;
            v[i] = vi;
            p[i] = p[i] * (1.0 - lr * wd) - step_size * mi / (sqrt(vi) / bc2_sqrt + eps);
        }
    }
}

op! {
    /// 8-bit blockwise AdamW in the style of bitsandbytes' AdamW8bit (blocks of 256): m uses the
    /// signed dynamic map, v the unsigned one. Per block: dequantize with the old absmax, update
    /// v then m, new absmax = max |m|, max v over the block, p += step_size * m / (sqrt(v) + eps2)
    /// then p *= decay, re-quantize to the nearest code, keeping m's sign.
    /// step_size = -lr * sqrt(1 - b2^t) / (1 - b1^t),  eps2 = sqrt(1 - b2^t) * eps,  decay = 1 - lr * wd.
    adamw_8bit(mut p: [N] f32, g: [N] f32, mut qm: [N] u8, mut qv: [N] u8, mut am: [(N + 255) / 256] f32, mut av: [(N + 255) / 256] f32, code_m: [256] f32, code_v: [256] f32, beta1: f32, beta2: f32, eps2: f32, step_size: f32, decay: f32) {
        forward for b in (N + 255) / 256, j in 256 {
            let i = b * 256 + j;
            let old_am = am[b];
            let old_av = av[b];
            let gi = select(i < N, g[i], 0.0);
            let vi = select(i < N, code_v[qv[i]] * old_av, 0.0) * beta2 + (1.0 - beta2) * gi * gi;
            let mi = select(i < N, code_m[qm[i]] * old_am, 0.0) * beta1 + (1.0 - beta1) * gi;
            let new_am = max(j, abs(mi));
            let new_av = max(j, vi);
            am[b] = new_am;
            av[b] = new_av;
            if i < N { p[i] = (p[i] + step_size * mi / (sqrt(vi) + eps2)) * decay; }
            let c1 = dynamic_index(code_m, mi / new_am);
            let fix = select(signbit(code_m[c1]) != signbit(mi), select(mi > 0.0, 1, -1), 0);
            if i < N { qm[i] = c1 + fix; }
            if i < N { qv[i] = dynamic_index(code_v, vi / new_av); }
        }
    }
}

#[cfg(test)]
mod tests;
