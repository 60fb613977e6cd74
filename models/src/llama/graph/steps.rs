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
    for phase in [&fg.prefill, &fg.decode] {
        write_step(fg, ex, phase, &[], &[], sampling_words(0.0, 0))?;
        ex.capture_nodes(phase.nodes.clone())
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Writes a step's inputs: `rows` (padded), the logit rows `picks` (prefill) and the
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
    ex.write_u64(fg.sampling, &sampling).map_err(e)
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
        for (c, chunk) in rows.chunks(fg.prefill.rows).enumerate() {
            let start = c * fg.prefill.rows;
            let picks: Vec<usize> = last
                .iter()
                .filter(|&&w| (start..start + chunk.len()).contains(&w))
                .map(|&w| w - start)
                .collect();
            out.extend(self.step(&fg.prefill, chunk, &picks, sampler)?);
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
