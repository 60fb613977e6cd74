//! The backward of the decoder for LoRA training: base weights frozen (dX = dY W, no dW), the
//! gradients of every LoRA A and B, through the ops' CPU backward passes (add_rms_norm,
//! rms_norm dx for Qwen3's q/k norms, RoPE, SwiGLU, attention, chunked cross-entropy).

use ftrt_ops::{activation, attention as ops_attn, norm, rope};
use ftrt_runtime::gemm::cpu::gemm;
use ftrt_runtime::GemmDesc;

use super::activations::Activations;
use super::lora::LoraAdapter;
use super::model::{round_all, Batch, LlamaModel};
use super::weights::Proj;
use super::LlamaError;

impl LlamaModel {
    /// Mean cross-entropy of a packed batch (`targets` (N), -100 = not counted) and the
    /// gradient of every LoRA weight of `lora` (same layout as `lora`).
    pub fn loss_and_lora_grads(
        &self,
        batch: &Batch,
        targets: &[i32],
        lora: &LoraAdapter,
    ) -> Result<(f32, LoraAdapter), LlamaError> {
        let acts = self.forward_record(batch, Some(lora))?;
        let (loss, _, dln_f) = self.chunked_ce(&acts.ln_f, targets, true)?;
        let grads = self.backward(&acts, &dln_f, lora)?;
        Ok((loss, grads))
    }

    /// Backward from d(loss)/d(final-norm output) (N, C) to the LoRA gradients.
    pub fn backward(
        &self,
        acts: &Activations,
        dln_f: &[f32],
        lora: &LoraAdapter,
    ) -> Result<LoraAdapter, LlamaError> {
        let dm = self.dims;
        let (n, c, hq, hkv, hd, inter) = (
            acts.n_tokens,
            dm.hidden,
            dm.heads,
            dm.kv_heads,
            dm.head_dim,
            dm.intermediate,
        );
        let rt = self.rt;
        let w = &self.weights;
        let mut grads = lora.zeros_like();
        let nd = norm::add_rms_norm::Dims { R: n, C: c };
        let local_pos: Vec<i32> = (0..n as i32).collect();

        // Final norm (fused with the last residual add): d resid after the last layer.
        let mut dresid = vec![0.0f32; n * c];
        {
            let zero = vec![0.0f32; n * c];
            let mut dx = vec![0.0f32; n * c];
            norm::add_rms_norm::backward_cpu(
                &nd,
                w.get(&w.final_norm),
                &acts.resid_final,
                &acts.rstd_f,
                dln_f,
                &zero,
                &mut dx,
                &mut dresid,
                rt,
            );
        }
        for l in (0..dm.layers).rev() {
            let la = &acts.layers[l];
            let lw = &w.layers[l];
            // MLP: down_proj, SwiGLU, gate/up.
            let dact = self.project_backward(
                l,
                Proj::Down,
                &la.act,
                &la.lora_xa[Proj::Down.index()],
                &dresid,
                n,
                lora,
                &mut grads,
            );
            let mut dgate = vec![0.0f32; n * inter];
            let mut dup = vec![0.0f32; n * inter];
            activation::swiglu::backward_cpu(
                &activation::swiglu::Dims { N: n * inter },
                &la.gate,
                &la.up,
                &dact,
                &mut dgate,
                &mut dup,
                rt,
            );
            let mut dln2 = self.project_backward(
                l,
                Proj::Gate,
                &la.ln2,
                &la.lora_xa[Proj::Gate.index()],
                &dgate,
                n,
                lora,
                &mut grads,
            );
            let dln2_up = self.project_backward(
                l,
                Proj::Up,
                &la.ln2,
                &la.lora_xa[Proj::Up.index()],
                &dup,
                n,
                lora,
                &mut grads,
            );
            add_into(&mut dln2, &dln2_up, rt);
            // Post-attention norm fused with the attention residual.
            let mut do_ = vec![0.0f32; n * c];
            let mut dres_in = vec![0.0f32; n * c];
            norm::add_rms_norm::backward_cpu(
                &nd,
                w.get(&lw.post_norm),
                &la.resid_mid,
                &la.rstd2,
                &dln2,
                &dresid,
                &mut do_,
                &mut dres_in,
                rt,
            );
            dresid = dres_in;
            // o_proj, attention.
            let datt = self.project_backward(
                l,
                Proj::O,
                &la.att,
                &la.lora_xa[Proj::O.index()],
                &dresid,
                n,
                lora,
                &mut grads,
            );
            let ad = ops_attn::AttentionDims::new(n, acts.cu_seqlens.len() - 1, hq, hkv, hd);
            let mut dq = vec![0.0f32; n * hq * hd];
            let mut dk = vec![0.0f32; n * hkv * hd];
            let mut dv = vec![0.0f32; n * hkv * hd];
            ops_attn::attention_backward_cpu::<f32>(
                &ad,
                &acts.cu_seqlens,
                &la.q,
                &la.k,
                &la.v,
                &la.att,
                &la.lse,
                &datt,
                &mut dq,
                &mut dk,
                &mut dv,
            );
            round_all(&mut dq, rt);
            round_all(&mut dk, rt);
            round_all(&mut dv, rt);
            // RoPE backward, in place.
            rope::rope::backward_cpu(
                &rope::rope::Dims {
                    N: n,
                    H: hq,
                    D: hd,
                    P: n,
                },
                &local_pos,
                &acts.cos,
                &acts.sin,
                &mut dq,
                rt,
            );
            rope::rope::backward_cpu(
                &rope::rope::Dims {
                    N: n,
                    H: hkv,
                    D: hd,
                    P: n,
                },
                &local_pos,
                &acts.cos,
                &acts.sin,
                &mut dk,
                rt,
            );
            // Qwen3's per-head norms.
            if let (Some(qn), Some(kn)) = (&lw.q_norm, &lw.k_norm) {
                let mut dq_pre = vec![0.0f32; dq.len()];
                let mut dk_pre = vec![0.0f32; dk.len()];
                norm::rms_norm::backward_dx_cpu(
                    &norm::rms_norm::Dims { R: n * hq, C: hd },
                    &la.q_pre,
                    w.get(qn),
                    &la.q_rstd,
                    &dq,
                    &mut dq_pre,
                    rt,
                );
                norm::rms_norm::backward_dx_cpu(
                    &norm::rms_norm::Dims { R: n * hkv, C: hd },
                    &la.k_pre,
                    w.get(kn),
                    &la.k_rstd,
                    &dk,
                    &mut dk_pre,
                    rt,
                );
                dq = dq_pre;
                dk = dk_pre;
            }
            // q/k/v projections.
            let mut dln1 = self.project_backward(
                l,
                Proj::Q,
                &la.ln1,
                &la.lora_xa[Proj::Q.index()],
                &dq,
                n,
                lora,
                &mut grads,
            );
            let dk_in = self.project_backward(
                l,
                Proj::K,
                &la.ln1,
                &la.lora_xa[Proj::K.index()],
                &dk,
                n,
                lora,
                &mut grads,
            );
            let dv_in = self.project_backward(
                l,
                Proj::V,
                &la.ln1,
                &la.lora_xa[Proj::V.index()],
                &dv,
                n,
                lora,
                &mut grads,
            );
            add_into(&mut dln1, &dk_in, rt);
            add_into(&mut dln1, &dv_in, rt);
            // Input norm: fused with the previous layer's MLP residual (layer 0: the frozen
            // embedding, whose gradient LoRA does not need).
            if l > 0 {
                let mut ddown = vec![0.0f32; n * c];
                let mut dres_prev = vec![0.0f32; n * c];
                norm::add_rms_norm::backward_cpu(
                    &nd,
                    w.get(&lw.input_norm),
                    &la.resid_in,
                    &la.rstd1,
                    &dln1,
                    &dresid,
                    &mut ddown,
                    &mut dres_prev,
                    rt,
                );
                dresid = dres_prev;
            }
        }
        Ok(grads)
    }

    /// Backward of one projection y = x W^T + b + s (x A^T) B^T with W frozen: accumulates dA
    /// and dB into `grads` and returns dx (n, in) = dy W + s (dy B) A.
    #[allow(clippy::too_many_arguments)]
    fn project_backward(
        &self,
        l: usize,
        p: Proj,
        x: &[f32],
        xa: &[f32],
        dy: &[f32],
        n: usize,
        lora: &LoraAdapter,
        grads: &mut LoraAdapter,
    ) -> Vec<f32> {
        let rt = self.rt;
        let (out, inn) = p.shape(&self.dims);
        let wt = self.weights.get(&self.weights.layers[l].proj[p.index()]);
        let mut dx = vec![0.0f32; n * inn];
        // dx = dy (n, out) · W (out, in)
        gemm::<f32>(&GemmDesc::new(n, inn, out), dy, wt, &mut dx, None).expect("shapes");
        if let (Some(a), Some(b), Some(slot)) = (lora.a(l, p), lora.b(l, p), lora.slot(l, p)) {
            let r = lora.r;
            let s = lora.scale;
            // dB (out, r) = s * dy^T (out, n) · xa (n, r)
            let mut db = vec![0.0f32; out * r];
            gemm::<f32>(
                &GemmDesc::new(out, r, n)
                    .transposed(true, false)
                    .scaled(s, 0.0),
                dy,
                xa,
                &mut db,
                None,
            )
            .expect("shapes");
            // dxa (n, r) = s * dy (n, out) · B (out, r)
            let mut dxa = vec![0.0f32; n * r];
            gemm::<f32>(
                &GemmDesc::new(n, r, out).scaled(s, 0.0),
                dy,
                b,
                &mut dxa,
                None,
            )
            .expect("shapes");
            round_all(&mut dxa, rt);
            // dA (r, in) = dxa^T (r, n) · x (n, in)
            let mut da = vec![0.0f32; r * inn];
            gemm::<f32>(
                &GemmDesc::new(r, inn, n).transposed(true, false),
                &dxa,
                x,
                &mut da,
                None,
            )
            .expect("shapes");
            // dx += dxa (n, r) · A (r, in)
            let mut dx_lora = vec![0.0f32; n * inn];
            gemm::<f32>(&GemmDesc::new(n, inn, r), &dxa, a, &mut dx_lora, None).expect("shapes");
            round_all(&mut dx, rt);
            round_all(&mut dx_lora, rt);
            add_into(&mut dx, &dx_lora, rt);
            for (g, v) in grads.data[slot.a.clone()].iter_mut().zip(&da) {
                *g += v;
            }
            for (g, v) in grads.data[slot.b.clone()].iter_mut().zip(&db) {
                *g += v;
            }
        } else {
            round_all(&mut dx, rt);
        }
        dx
    }
}

fn add_into(acc: &mut [f32], x: &[f32], rt: ftrt_ops::dsl::Rounding) {
    for (a, v) in acc.iter_mut().zip(x) {
        *a += v;
    }
    round_all(acc, rt);
}
