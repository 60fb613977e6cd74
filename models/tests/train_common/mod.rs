//! A toy [`LoraModel`] for the training-loop tests: a bigram network whose gradients are easy
//! to derive and to check by finite differences.
//!
//! For a token x: h0 = E[x]; y1 = W1 h0 + s B1 A1 h0 (module `q_proj`, d -> d); h1 = tanh(y1);
//! logits = W2 h1 + s B2 A2 h1 (module `down_proj`, d -> V). Position t is scored against
//! `labels[t + 1]` (the packed-batch convention). Computed in f64.

#![allow(dead_code)]
// Index loops read like the math of the backward here.
#![allow(clippy::needless_range_loop)]

use ftrt_models::data::{pack, Example, PackedBatch, IGNORE_INDEX};
use ftrt_models::lora::{LoraTarget, LoraWeights};
use ftrt_models::train::rng::SplitMix64;
use ftrt_models::train::LoraModel;

/// The toy network.
pub struct Toy {
    pub vocab: usize,
    pub d: usize,
    pub e: Vec<f64>,
    pub w1: Vec<f64>,
    pub w2: Vec<f64>,
}

/// Per-module LoRA views in f64: (A (r, in), B (out, r)).
struct Branch {
    a: Vec<f64>,
    b: Vec<f64>,
    a_range: std::ops::Range<usize>,
    b_range: std::ops::Range<usize>,
}

fn branch(lora: &LoraWeights, module: &str) -> Option<Branch> {
    let t = lora.find(0, module)?;
    Some(Branch {
        a: lora.data[t.a.clone()].iter().map(|&x| x as f64).collect(),
        b: lora.data[t.b.clone()].iter().map(|&x| x as f64).collect(),
        a_range: t.a.clone(),
        b_range: t.b.clone(),
    })
}

/// y (out) = W x + s B (A x); returns (y, z = A x).
fn linear(
    w: &[f64],
    br: Option<&Branch>,
    x: &[f64],
    out: usize,
    r: usize,
    s: f64,
) -> (Vec<f64>, Vec<f64>) {
    let inn = x.len();
    let mut y: Vec<f64> = (0..out)
        .map(|o| (0..inn).map(|i| w[o * inn + i] * x[i]).sum())
        .collect();
    let mut z = vec![0.0; r];
    if let Some(br) = br {
        for (k, zk) in z.iter_mut().enumerate() {
            *zk = (0..inn).map(|i| br.a[k * inn + i] * x[i]).sum();
        }
        for (o, yo) in y.iter_mut().enumerate() {
            *yo += s * (0..r).map(|k| br.b[o * r + k] * z[k]).sum::<f64>();
        }
    }
    (y, z)
}

impl Toy {
    pub fn new(vocab: usize, d: usize, seed: u64) -> Self {
        let mut rng = SplitMix64::new(seed);
        let mut draw = |n: usize, scale: f64| -> Vec<f64> {
            (0..n)
                .map(|_| (rng.next_f32() as f64 * 2.0 - 1.0) * scale)
                .collect()
        };
        Self {
            vocab,
            d,
            e: draw(vocab * d, 1.0),
            w1: draw(d * d, 1.0 / (d as f64).sqrt()),
            w2: draw(vocab * d, 1.0 / (d as f64).sqrt()),
        }
    }

    fn logits(&self, x: u32, lora: &LoraWeights) -> Vec<f64> {
        let (d, r, s) = (self.d, lora.config.r, lora.scale() as f64);
        let (b1, b2) = (branch(lora, "q_proj"), branch(lora, "down_proj"));
        let h0 = &self.e[x as usize * d..(x as usize + 1) * d];
        let (y1, _) = linear(&self.w1, b1.as_ref(), h0, d, r, s);
        let h1: Vec<f64> = y1.iter().map(|v| v.tanh()).collect();
        linear(&self.w2, b2.as_ref(), &h1, self.vocab, r, s).0
    }

    /// Sum of token losses in f64, and (when `grads` is given) the gradient added into it.
    pub fn loss_f64(
        &self,
        batch: &PackedBatch,
        lora: &LoraWeights,
        mut grads: Option<&mut LoraWeights>,
    ) -> f64 {
        let (d, v, r, s) = (self.d, self.vocab, lora.config.r, lora.scale() as f64);
        let (b1, b2) = (branch(lora, "q_proj"), branch(lora, "down_proj"));
        let n = batch.input_ids.len();
        let mut total = 0.0;
        for t in 0..n.saturating_sub(1) {
            let target = batch.labels[t + 1];
            if target == IGNORE_INDEX {
                continue;
            }
            let x = batch.input_ids[t] as usize;
            let h0 = &self.e[x * d..(x + 1) * d];
            let (y1, z1) = linear(&self.w1, b1.as_ref(), h0, d, r, s);
            let h1: Vec<f64> = y1.iter().map(|v| v.tanh()).collect();
            let (logits, z2) = linear(&self.w2, b2.as_ref(), &h1, v, r, s);
            let m = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let lse = m + logits.iter().map(|l| (l - m).exp()).sum::<f64>().ln();
            total += lse - logits[target as usize];
            let Some(g) = grads.as_deref_mut() else {
                continue;
            };
            let dl: Vec<f64> = (0..v)
                .map(|j| (logits[j] - lse).exp() - if j == target as usize { 1.0 } else { 0.0 })
                .collect();
            // down_proj: out = W2 h1 + s B2 z2.
            let mut dh1: Vec<f64> = (0..d)
                .map(|i| (0..v).map(|o| self.w2[o * d + i] * dl[o]).sum())
                .collect();
            if let Some(br) = &b2 {
                let dz2: Vec<f64> = (0..r)
                    .map(|k| s * (0..v).map(|o| br.b[o * r + k] * dl[o]).sum::<f64>())
                    .collect();
                for o in 0..v {
                    for k in 0..r {
                        g.data[br.b_range.start + o * r + k] += (s * dl[o] * z2[k]) as f32;
                    }
                }
                for k in 0..r {
                    for i in 0..d {
                        g.data[br.a_range.start + k * d + i] += (dz2[k] * h1[i]) as f32;
                        dh1[i] += br.a[k * d + i] * dz2[k];
                    }
                }
            }
            let dy1: Vec<f64> = (0..d).map(|i| dh1[i] * (1.0 - h1[i] * h1[i])).collect();
            if let Some(br) = &b1 {
                let dz1: Vec<f64> = (0..r)
                    .map(|k| s * (0..d).map(|o| br.b[o * r + k] * dy1[o]).sum::<f64>())
                    .collect();
                for o in 0..d {
                    for k in 0..r {
                        g.data[br.b_range.start + o * r + k] += (s * dy1[o] * z1[k]) as f32;
                    }
                }
                for k in 0..r {
                    for i in 0..d {
                        g.data[br.a_range.start + k * d + i] += (dz1[k] * h0[i]) as f32;
                    }
                }
            }
        }
        total
    }
}

impl LoraModel for Toy {
    fn lora_shapes(&self) -> Vec<LoraTarget> {
        vec![
            LoraTarget {
                layer: 0,
                module: "q_proj".into(),
                path: "model.layers.0.self_attn.q_proj".into(),
                in_features: self.d,
                out_features: self.d,
            },
            LoraTarget {
                layer: 0,
                module: "down_proj".into(),
                path: "model.layers.0.mlp.down_proj".into(),
                in_features: self.d,
                out_features: self.vocab,
            },
        ]
    }

    fn loss_and_grads(
        &mut self,
        batch: &PackedBatch,
        lora: &LoraWeights,
        grads: &mut LoraWeights,
    ) -> Result<f32, String> {
        Ok(self.loss_f64(batch, lora, Some(grads)) as f32)
    }

    fn loss(&mut self, batch: &PackedBatch, lora: &LoraWeights) -> Result<f32, String> {
        Ok(self.loss_f64(batch, lora, None) as f32)
    }

    fn generate(
        &mut self,
        prompts: &[Vec<u32>],
        lora: &LoraWeights,
        max_new: usize,
        eos: &[u32],
    ) -> Result<Vec<Vec<u32>>, String> {
        prompts
            .iter()
            .map(|p| self.generate_one(p, lora, max_new, eos))
            .collect()
    }
}

impl Toy {
    fn generate_one(
        &mut self,
        prompt: &[u32],
        lora: &LoraWeights,
        max_new: usize,
        eos: &[u32],
    ) -> Result<Vec<u32>, String> {
        let mut out = Vec::new();
        let mut last = *prompt.last().ok_or("empty prompt")?;
        for _ in 0..max_new {
            let l = self.logits(last, lora);
            let next = (0..l.len()).fold(0, |b, j| if l[j] > l[b] { j } else { b }) as u32;
            out.push(next);
            if eos.contains(&next) {
                break;
            }
            last = next;
        }
        Ok(out)
    }
}

/// Sequences following next = (3x + 1) mod V, loss on all but the first token (prompt).
pub fn rule_examples(count: usize, vocab: usize, seed: u64) -> Vec<Example> {
    let mut rng = SplitMix64::new(seed);
    (0..count)
        .map(|_| {
            let len = 3 + rng.below(6);
            let mut x = rng.below(vocab) as u32;
            let mut ids = Vec::with_capacity(len);
            for _ in 0..len {
                ids.push(x);
                x = (3 * x + 1) % vocab as u32;
            }
            let mut labels: Vec<i32> = ids.iter().map(|&t| t as i32).collect();
            labels[0] = IGNORE_INDEX;
            Example {
                input_ids: ids,
                labels,
            }
        })
        .collect()
}

/// Packed training and held-out batches of [`rule_examples`].
pub fn toy_data(vocab: usize, budget: usize) -> (Vec<PackedBatch>, Vec<PackedBatch>) {
    (
        pack(&rule_examples(40, vocab, 1), budget),
        pack(&rule_examples(8, vocab, 2), budget),
    )
}
