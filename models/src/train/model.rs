//! What the training loop needs from a model: its LoRA-adaptable linear modules, the loss and
//! LoRA gradients of a packed batch, and greedy generation. The loop never sees how the model
//! computes (CPU references, the GPU graph, a toy in the tests).

use crate::data::PackedBatch;
use crate::lora::{LoraTarget, LoraWeights};

/// A model that trains LoRA adapters.
///
/// Batches follow [`PackedBatch`]'s conventions: sequences laid end to end, `labels` aligned with
/// `input_ids` (position t's logits are scored against `labels[t + 1]`, -100 = no loss; the
/// first label of every sequence is -100 so nothing is predicted across a boundary), positions
/// restarting at 0 per sequence, attention never crossing `cu_seqlens`.
pub trait LoraModel {
    /// Every linear module an adapter may attach to (for the Llama family:
    /// [`crate::lora::linear_targets`] of the config). A [`LoraWeights`] passed to the other
    /// methods adapts a subset of these, in this order.
    fn lora_shapes(&self) -> Vec<LoraTarget>;

    /// Runs forward and backward on `batch` with the adapter `lora`. Returns the **sum** of the
    /// token cross-entropies (natural log) over the batch's loss positions, and **adds**
    /// d(sum)/d(A, B) into `grads` (same layout as `lora`; the caller zeroes it). Summing rather
    /// than averaging lets the trainer normalise over all micro-batches of an optimizer step by
    /// their total number of loss tokens, as transformers does with `num_items_in_batch`.
    fn loss_and_grads(
        &mut self,
        batch: &PackedBatch,
        lora: &LoraWeights,
        grads: &mut LoraWeights,
    ) -> Result<f32, String>;

    /// The sum of the token losses of `batch`, without gradients (evaluation). The default runs
    /// [`LoraModel::loss_and_grads`] into a scratch buffer; implement it to skip the backward.
    fn loss(&mut self, batch: &PackedBatch, lora: &LoraWeights) -> Result<f32, String> {
        let mut scratch = lora.zeros_like();
        self.loss_and_grads(batch, lora, &mut scratch)
    }

    /// Greedy decoding of every prompt (batched where the model can): up to `max_new` tokens
    /// after each, stopping after a token of `eos` (which is included). Returns the new tokens
    /// of each prompt.
    fn generate(
        &mut self,
        prompts: &[Vec<u32>],
        lora: &LoraWeights,
        max_new: usize,
        eos: &[u32],
    ) -> Result<Vec<Vec<u32>>, String>;

    /// Sets LoRA dropout (probability `p` on the LoRA branch's input) for the next
    /// [`LoraModel::loss_and_grads`] call, with masks drawn from `seed` (the trainer derives it
    /// from the run's seed, the step and the micro-batch, so resumed runs draw the same masks).
    /// `p = 0` turns it off. Models without dropout support refuse `p > 0`.
    fn set_dropout(&mut self, p: f32, seed: u64) -> Result<(), String> {
        let _ = seed;
        if p == 0.0 {
            Ok(())
        } else {
            Err(format!(
                "lora_dropout = {p} is not supported by this model backend; use 0"
            ))
        }
    }
}
