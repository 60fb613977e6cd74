//! Generation through the forward graph: prompts packed into prefill steps, then one decoding
//! step per new token, each step one phase of the graph run on an executor (on the GPU, the
//! phase's captured CUDA graph replayed).

use std::ops::Range;

use ftrt_runtime::graph::TensorId;
use ftrt_runtime::{CudaExecutor, RuntimeError};

use super::{sampling_words, ForwardGraph, Phase, StepRow};
use crate::llama::Sampler;

/// What a step of the forward graph needs from an executor: write the inputs, run one phase,
/// read the logits or the picked tokens. Implemented by the runtime's CPU and CUDA executors.
pub trait StepExecutor {
    fn write_i32(&mut self, t: TensorId, v: &[i32]) -> Result<(), RuntimeError>;
    fn write_u64(&mut self, t: TensorId, v: &[u64]) -> Result<(), RuntimeError>;
    fn run(&mut self, nodes: Range<usize>) -> Result<(), RuntimeError>;
    fn read_f32(&mut self, t: TensorId) -> Result<Vec<f32>, RuntimeError>;
    fn read_i32(&mut self, t: TensorId) -> Result<Vec<i32>, RuntimeError>;
}

impl StepExecutor for ftrt_runtime::CpuExecutor<'_> {
    fn write_i32(&mut self, t: TensorId, v: &[i32]) -> Result<(), RuntimeError> {
        self.write(t, v)
    }
    fn write_u64(&mut self, t: TensorId, v: &[u64]) -> Result<(), RuntimeError> {
        self.write(t, v)
    }
    fn run(&mut self, nodes: Range<usize>) -> Result<(), RuntimeError> {
        self.run_nodes(nodes)
    }
    fn read_f32(&mut self, t: TensorId) -> Result<Vec<f32>, RuntimeError> {
        self.read(t)
    }
    fn read_i32(&mut self, t: TensorId) -> Result<Vec<i32>, RuntimeError> {
        self.read(t)
    }
}

/// On the GPU a step is the replay of its phase's captured CUDA graph ([`capture_phases`]).
impl StepExecutor for CudaExecutor<'_> {
    fn write_i32(&mut self, t: TensorId, v: &[i32]) -> Result<(), RuntimeError> {
        self.write(t, v)
    }
    fn write_u64(&mut self, t: TensorId, v: &[u64]) -> Result<(), RuntimeError> {
        self.write(t, v)
    }
    fn run(&mut self, nodes: Range<usize>) -> Result<(), RuntimeError> {
        self.replay_nodes(nodes).map(drop)
    }
    fn read_f32(&mut self, t: TensorId) -> Result<Vec<f32>, RuntimeError> {
        self.read(t)
    }
    fn read_i32(&mut self, t: TensorId) -> Result<Vec<i32>, RuntimeError> {
        self.read(t)
    }
}

/// Writes the inputs of steps of padding rows only (they touch the spare slot) and captures
/// both phases of `fg` on `ex` (its weights written), each into a CUDA graph.
pub fn capture_phases(fg: &ForwardGraph, ex: &mut CudaExecutor<'_>) -> Result<(), String> {
    for phase in fg.phases() {
        write_step(fg, ex, phase, &[], &[], sampling_words(0.0, 0))?;
        ex.capture_nodes(phase.nodes.clone())
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Writes a step's inputs: `rows` (padded), the logit rows `picks` (prefill), the segments
/// of a flash-attention phase (runs of one slot; each must start at position 0) and the
/// sampling words.
pub fn write_step<E: StepExecutor>(
    fg: &ForwardGraph,
    ex: &mut E,
    phase: &Phase,
    rows: &[StepRow],
    picks: &[usize],
    sampling: [u64; 2],
) -> Result<(), String> {
    let e = |e: RuntimeError| e.to_string();
    let (ids, pos, slot, len) = fg.step_inputs(phase, rows).map_err(|e| e.to_string())?;
    for (t, v) in [
        (phase.ids, ids),
        (phase.pos, pos),
        (phase.slot, slot),
        (phase.len, len),
    ] {
        ex.write_i32(t, &v).map_err(e)?;
    }
    if let Some(t) = phase.picks {
        let mut p: Vec<i32> = picks.iter().map(|&r| r as i32).collect();
        p.resize(phase.logit_rows, 0);
        ex.write_i32(t, &p).map_err(e)?;
    }
    if let Some(t) = phase.cu_seqlens {
        ex.write_i32(t, &segments(rows, fg.slots + 1)?).map_err(e)?;
    }
    ex.write_u64(fg.sampling, &sampling).map_err(e)
}

/// cu_seqlens (len entries) of `rows` cut into runs of one slot, each starting at position 0;
/// the entries past the last run repeat its end (empty segments).
fn segments(rows: &[StepRow], len: usize) -> Result<Vec<i32>, String> {
    let mut cu = vec![0i32];
    for (i, r) in rows.iter().enumerate() {
        let starts = i == 0 || rows[i - 1].slot != r.slot;
        if starts {
            if r.pos != 0 {
                return Err(format!("row {r:?} starts a run away from position 0"));
            }
            if i > 0 {
                cu.push(i as i32);
            }
        } else if r.pos != rows[i - 1].pos + 1 {
            return Err(format!("row {r:?} does not follow its slot's previous row"));
        }
    }
    if !rows.is_empty() {
        cu.push(rows.len() as i32);
    }
    if cu.len() > len {
        return Err(format!(
            "{} runs in a step of at most {}",
            cu.len() - 1,
            len - 1
        ));
    }
    let end = *cu.last().unwrap_or(&0);
    cu.resize(len, end);
    Ok(cu)
}

/// Generation through the forward graph: prompts packed `fg.prefill.rows` tokens per step,
/// then one row per unfinished sequence per decoding step. Greedy picks and draws at a
/// temperature (no top-k / top-p) are made on the device, reading L tokens per step; other
/// sampling reads the logits and uses the caller's sampler ([`crate::llama::generate_with`]).
pub struct GraphSteps<'g, E: StepExecutor> {
    pub fg: &'g ForwardGraph,
    pub ex: E,
    /// Tokens in each slot's cache.
    lens: Vec<usize>,
}

impl<'g, E: StepExecutor> GraphSteps<'g, E> {
    /// Steps of `fg` on `ex` (its weights written; on the GPU, [`capture_phases`] done), every
    /// slot empty.
    pub fn new(fg: &'g ForwardGraph, ex: E) -> Self {
        Self {
            lens: vec![0; fg.slots],
            fg,
            ex,
        }
    }

    /// Runs one step of `phase` on `rows`; the next token of each logit row `picks` (indices
    /// into `rows`; for decoding, whose logit rows are its rows, 0..k).
    fn step(
        &mut self,
        phase: &Phase,
        rows: &[StepRow],
        picks: &[usize],
        sampler: &mut Sampler,
    ) -> Result<Vec<u32>, String> {
        let p = sampler.params;
        let on_device = p.temperature <= 0.0 || (p.top_k == 0 && p.top_p >= 1.0);
        let sampling = match (on_device, p.temperature > 0.0) {
            (true, true) => sampling_words(1.0 / p.temperature, sampler.draw_seed()),
            _ => sampling_words(0.0, 0),
        };
        write_step(self.fg, &mut self.ex, phase, rows, picks, sampling)?;
        let e = |e: RuntimeError| e.to_string();
        self.ex.run(phase.nodes.clone()).map_err(e)?;
        let k = picks.len();
        if on_device {
            let next = self.ex.read_i32(phase.next).map_err(e)?;
            return Ok(next[..k].iter().map(|&t| t as u32).collect());
        }
        let logits = self.ex.read_f32(phase.logits).map_err(e)?;
        Ok(logits
            .chunks(self.fg.vocab)
            .take(k)
            .map(|row| sampler.pick(row))
            .collect())
    }

    /// Checks that `slot` can take `n` more tokens; returns its current length.
    fn reserve(&mut self, slot: usize, n: usize) -> Result<usize, String> {
        let start = *self
            .lens
            .get(slot)
            .ok_or_else(|| format!("no slot {slot}"))?;
        if n == 0 || start + n > self.fg.capacity {
            return Err(format!(
                "slot {slot}: {n} tokens after {start} do not fit the graph's {} positions",
                self.fg.capacity
            ));
        }
        self.lens[slot] = start + n;
        Ok(start)
    }
}

impl<E: StepExecutor> crate::llama::NextTokens for GraphSteps<'_, E> {
    /// Packs the prompts' tokens into prefill steps; each step's logit rows are the last rows
    /// of the prompts ending in it.
    fn prefill(
        &mut self,
        slots: &[usize],
        prompts: &[Vec<u32>],
        sampler: &mut Sampler,
    ) -> Result<Vec<u32>, String> {
        if slots.len() > self.fg.prefill.logit_rows {
            return Err(format!(
                "{} prompts at once, the graph has {} slots",
                slots.len(),
                self.fg.slots
            ));
        }
        let mut rows = Vec::new();
        let mut last = Vec::new();
        for (&slot, toks) in slots.iter().zip(prompts) {
            if let Some(l) = self.lens.get_mut(slot) {
                *l = 0;
            }
            let start = self.reserve(slot, toks.len())?;
            rows.extend(toks.iter().enumerate().map(|(i, &token)| StepRow {
                token,
                slot,
                pos: start + i,
            }));
            last.push(rows.len() - 1);
        }
        let fg = self.fg;
        let mut out = Vec::with_capacity(last.len());
        for chunk in prefill_chunks(&last, fg.prefill.rows) {
            let picks: Vec<usize> = last
                .iter()
                .filter(|&&w| chunk.contains(&w))
                .map(|&w| w - chunk.start)
                .collect();
            let step_rows = &rows[chunk];
            // whole prompts only: attend within the step, not over the cache
            let phase = match &fg.prefill_fresh {
                Some(fresh) if segments(step_rows, fg.slots + 1).is_ok() => fresh,
                _ => &fg.prefill,
            };
            out.extend(self.step(phase, step_rows, &picks, sampler)?);
        }
        Ok(out)
    }

    fn decode(
        &mut self,
        slots: &[usize],
        tokens: &[u32],
        sampler: &mut Sampler,
    ) -> Result<Vec<u32>, String> {
        let mut rows = Vec::with_capacity(slots.len());
        for (&slot, &token) in slots.iter().zip(tokens) {
            let pos = self.reserve(slot, 1)?;
            rows.push(StepRow { token, slot, pos });
        }
        let picks: Vec<usize> = (0..rows.len()).collect();
        let fg = self.fg;
        self.step(&fg.decode, &rows, &picks, sampler)
    }
}

/// Row ranges of the prefill steps of prompts whose last rows are `last` (increasing): whole
/// prompts packed up to `rows` per step, a prompt longer than `rows` in steps of its own.
fn prefill_chunks(last: &[usize], rows: usize) -> Vec<Range<usize>> {
    let mut chunks = Vec::new();
    let (mut start, mut prompt_start) = (0, 0);
    for &l in last {
        let end = l + 1;
        if end - start > rows && prompt_start > start {
            chunks.push(start..prompt_start); // close the step before this prompt
            start = prompt_start;
        }
        while end - start > rows {
            chunks.push(start..start + rows); // a prompt longer than a step
            start += rows;
        }
        prompt_start = end;
    }
    if prompt_start > start {
        chunks.push(start..prompt_start);
    }
    chunks
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefill_chunks_keep_prompts_whole_when_they_fit() {
        // prompts of 9, 5 and 1 rows (last rows 8, 13, 14)
        assert_eq!(prefill_chunks(&[8, 13, 14], 32), vec![0..15]);
        assert_eq!(prefill_chunks(&[8, 13, 14], 10), vec![0..9, 9..15]);
        assert_eq!(
            prefill_chunks(&[8, 13, 14], 4),
            vec![0..4, 4..8, 8..9, 9..13, 13..15]
        );
        assert_eq!(prefill_chunks(&[2, 5], 3), vec![0..3, 3..6]);
        assert!(prefill_chunks(&[], 3).is_empty());
    }

    #[test]
    fn segments_are_runs_of_one_slot_from_position_zero() {
        let row = |slot, pos| StepRow {
            token: 1,
            slot,
            pos,
        };
        let rows = [row(2, 0), row(2, 1), row(0, 0), row(1, 0), row(1, 1)];
        assert_eq!(segments(&rows, 5).unwrap(), vec![0, 2, 3, 5, 5]);
        assert!(segments(&rows, 3).is_err()); // three runs need four entries
        assert!(segments(&[row(0, 1)], 2).is_err()); // not from position 0
        assert!(segments(&[row(0, 0), row(0, 2)], 2).is_err()); // a gap
        assert_eq!(segments(&[], 3).unwrap(), vec![0, 0, 0]);
    }
}
