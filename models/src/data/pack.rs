//! Padding-free packing: sequences concatenated into micro-batches of at most a token budget,
//! with per-sequence positions and `cu_seqlens` so attention never crosses sequences.

use super::{Example, IGNORE_INDEX};

/// One micro-batch of `N` tokens from `S` sequences laid end to end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackedBatch {
    /// (N) token ids.
    pub input_ids: Vec<u32>,
    /// (N) labels aligned with `input_ids`; -100 = ignored. The first position of every
    /// sequence is -100, so the shifted loss never predicts across a sequence boundary (as
    /// transformers' `DataCollatorWithFlattening` does).
    pub labels: Vec<i32>,
    /// (N) position of each token within its own sequence, restarting at 0.
    pub position_ids: Vec<i32>,
    /// (S+1) prefix sums of the sequence lengths: sequence `s` is `cu_seqlens[s]..cu_seqlens[s+1]`.
    pub cu_seqlens: Vec<i32>,
    /// Positions whose label is not -100.
    pub num_loss_tokens: usize,
}

impl PackedBatch {
    fn new() -> Self {
        Self {
            input_ids: Vec::new(),
            labels: Vec::new(),
            position_ids: Vec::new(),
            cu_seqlens: vec![0],
            num_loss_tokens: 0,
        }
    }

    /// Appends one sequence.
    fn push(&mut self, input_ids: &[u32], labels: &[i32]) {
        self.input_ids.extend_from_slice(input_ids);
        self.labels.push(IGNORE_INDEX);
        self.labels.extend_from_slice(&labels[1..]);
        self.position_ids.extend(0..input_ids.len() as i32);
        self.cu_seqlens.push(self.input_ids.len() as i32);
        self.num_loss_tokens += labels[1..].iter().filter(|&&l| l != IGNORE_INDEX).count();
    }
}

/// Packed micro-batches and what had to be cut.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packing {
    /// The micro-batches, in order of creation.
    pub batches: Vec<PackedBatch>,
    /// Sequences longer than the budget, cut to it.
    pub truncated: usize,
}

/// Packs `examples` (already in the order wanted, e.g. shuffled) greedily first-fit: each
/// sequence goes into the first micro-batch with room for it, else starts a new one.
/// Deterministic. Sequences longer than `token_budget` are cut to it; empty ones are skipped.
pub fn pack(examples: &[Example], token_budget: usize) -> Vec<PackedBatch> {
    pack_with_report(examples, token_budget).batches
}

/// [`pack`], also counting the sequences cut to the budget.
pub fn pack_with_report(examples: &[Example], token_budget: usize) -> Packing {
    let mut batches: Vec<PackedBatch> = Vec::new();
    let mut truncated = 0;
    if token_budget == 0 {
        return Packing { batches, truncated };
    }
    for example in examples {
        let len = example.input_ids.len().min(example.labels.len());
        if len == 0 {
            continue;
        }
        let take = if len > token_budget {
            truncated += 1;
            token_budget
        } else {
            len
        };
        let slot = batches
            .iter()
            .position(|batch| batch.input_ids.len() + take <= token_budget);
        let batch = match slot {
            Some(index) => &mut batches[index],
            None => {
                batches.push(PackedBatch::new());
                batches.last_mut().expect("just pushed")
            }
        };
        batch.push(&example.input_ids[..take], &example.labels[..take]);
    }
    Packing { batches, truncated }
}
