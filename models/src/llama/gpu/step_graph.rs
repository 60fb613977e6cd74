//! Repeated steps (a training step, a decode step) as CUDA graphs. A step's launches on the
//! compute stream, and on the copy streams that join it through events, run eagerly the first
//! time its key is seen (that loads every module and GEMM plan), are captured into a graph the
//! second time and replayed from then on. The key names everything the launches bake in:
//! shapes and buffer addresses. What changes between steps of one key is data the host writes
//! to fixed device buffers before each replay (token ids, targets, cu_seqlens).
//!
//! `FTRT_CUDA_GRAPH=0` runs every step eagerly (the model's switch, [`graphs_enabled`]). A
//! capture that fails (an operation a graph cannot hold) reruns the step eagerly, says why
//! once, and runs every later step of the cache eagerly.

use ftrt_runtime::cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use ftrt_runtime::cudarc::driver::CudaGraph;
use ftrt_runtime::Gpu;

use super::{Ctx, GpuLlama, GpuResult};

/// Environment switch: `0` runs every step eagerly.
pub const CUDA_GRAPH_ENV: &str = "FTRT_CUDA_GRAPH";

/// What a step of a given key does this time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Turn {
    /// First sighting (or graphs off): launch eagerly.
    Eager,
    /// Second sighting: capture, then launch the graph.
    Capture,
    /// Captured before: launch the graph.
    Replay,
}

/// What a step's launches bake in: the loaded batch's token and segment counts, the model's
/// weight, activation and adapter buffers (addresses, rank, scale), and which kernels add the
/// MLP's LoRA terms ([`GpuLlama::set_lora_in_activation`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct StepKey {
    rows: usize,
    segments: usize,
    weights: u64,
    acts: u64,
    lora: Option<(u64, usize, u32)>,
    lora_in_activation: bool,
}

impl GpuLlama<'_> {
    /// The key of a step over the loaded batch.
    pub(super) fn step_key(&self) -> GpuResult<StepKey> {
        let (rows, segments) = self.last.ok_or("no batch loaded")?;
        let a = self.acts.as_ref().ok_or("activations not allocated")?;
        Ok(StepKey {
            rows,
            segments,
            weights: self.weights.addr,
            acts: a.ids.addr,
            lora: self
                .lora
                .as_ref()
                .map(|g| (g.bf16.addr, g.layout.r, g.layout.scale.to_bits())),
            lora_in_activation: self.activation_lora,
        })
    }
}

/// Graphs of the `cap` most recently used keys, most recent first (`G`: the graph type; a
/// plain value in tests). Whether steps use them at all is the model's switch
/// ([`graphs_enabled`], `GpuLlama::set_cuda_graphs`); this only remembers a failed capture.
pub(super) struct StepGraphs<K, G = CudaGraph> {
    entries: Vec<(K, Option<G>)>,
    cap: usize,
    /// A capture failed: every later step runs eagerly.
    capture_failed: bool,
}

/// Whether CUDA graphs are on by default: unless `FTRT_CUDA_GRAPH=0`.
pub(super) fn graphs_enabled() -> bool {
    std::env::var(CUDA_GRAPH_ENV).as_deref() != Ok("0")
}

impl<K, G> StepGraphs<K, G> {
    /// Room for `cap` keys' graphs.
    pub(super) fn new(cap: usize) -> Self {
        Self {
            entries: Vec::new(),
            cap: cap.max(1),
            capture_failed: false,
        }
    }

    /// Drops every graph (each key starts eager again).
    pub(super) fn clear(&mut self) {
        self.entries.clear();
    }

    /// After a failed capture: drops every graph and runs every later step eagerly.
    fn give_up(&mut self) {
        self.capture_failed = true;
        self.entries.clear();
    }
}

impl<K: PartialEq, G> StepGraphs<K, G> {
    /// The turn of a step of `key`, its entry moved to the front; a new key's entry evicts the
    /// least recently used one past `cap`.
    fn turn(&mut self, key: K) -> Turn {
        if self.capture_failed {
            return Turn::Eager;
        }
        match self.entries.iter().position(|(k, _)| *k == key) {
            Some(i) => {
                let entry = self.entries.remove(i);
                let turn = if entry.1.is_some() {
                    Turn::Replay
                } else {
                    Turn::Capture
                };
                self.entries.insert(0, entry);
                turn
            }
            None => {
                self.entries.insert(0, (key, None));
                self.entries.truncate(self.cap);
                Turn::Eager
            }
        }
    }

    /// The front entry's graph (the key [`Self::turn`] was last given).
    fn front(&mut self) -> &mut Option<G> {
        &mut self.entries[0].1
    }
}

impl<K: PartialEq> StepGraphs<K> {
    /// Runs a step of `key` ([`Self::turn`]): `enqueue` launches it (nothing else: no host
    /// synchronisation, no allocation), eagerly or into a graph; `what` names the step in
    /// errors. Returns whether a graph ran it.
    pub(super) fn run(
        &mut self,
        gpu: &Gpu,
        key: K,
        what: &str,
        mut enqueue: impl FnMut() -> GpuResult<()>,
    ) -> GpuResult<bool> {
        let turn = self.turn(key);
        if turn == Turn::Eager {
            return enqueue().map(|()| false);
        }
        if turn == Turn::Capture {
            match capture(gpu, what, &mut enqueue) {
                Ok(graph) => *self.front() = Some(graph),
                Err(e) => {
                    eprintln!("note: {what} runs eagerly: its CUDA graph capture failed ({e})");
                    self.give_up();
                    return enqueue().map(|()| false);
                }
            }
        }
        let graph = self.front().as_ref().ok_or("no captured graph")?;
        graph.launch().ctx(&format!("replaying the {what}"))?;
        Ok(true)
    }
}

/// `enqueue`'s launches on the compute stream (and the streams that join it) captured into an
/// instantiated, uploaded CUDA graph.
fn capture(
    gpu: &Gpu,
    what: &str,
    enqueue: &mut impl FnMut() -> GpuResult<()>,
) -> GpuResult<CudaGraph> {
    let stream = gpu.stream();
    stream
        .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        .ctx(&format!("capturing the {what}"))?;
    let enqueued = enqueue();
    let ended = stream.end_capture(CUgraphInstantiate_flags(0));
    enqueued?;
    let graph = ended
        .ctx(&format!("instantiating the {what}'s graph"))?
        .ok_or_else(|| format!("captured an empty {what}"))?;
    graph
        .upload()
        .ctx(&format!("uploading the {what}'s graph"))?;
    Ok(graph)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Eager at a key's first step, capture at its second, replay after; the least recently
    /// used key goes when a new one passes the capacity, and comes back eager.
    #[test]
    fn keys_run_eager_then_capture_then_replay_and_the_oldest_is_evicted() {
        let mut g: StepGraphs<u32, ()> = StepGraphs::new(2);
        let step = |g: &mut StepGraphs<u32, ()>, k| {
            let t = g.turn(k);
            if t == Turn::Capture {
                *g.front() = Some(());
            }
            t
        };
        assert_eq!(step(&mut g, 1), Turn::Eager);
        assert_eq!(step(&mut g, 1), Turn::Capture);
        assert_eq!(step(&mut g, 1), Turn::Replay);
        assert_eq!(step(&mut g, 2), Turn::Eager);
        assert_eq!(step(&mut g, 1), Turn::Replay); // 1 now most recent
        assert_eq!(step(&mut g, 3), Turn::Eager); // evicts 2, the least recently used
        assert_eq!(step(&mut g, 1), Turn::Replay);
        assert_eq!(step(&mut g, 2), Turn::Eager); // evicted: first sighting again
        assert_eq!(step(&mut g, 3), Turn::Eager); // 3 was evicted by 2
    }

    /// After a failed capture every step is eager and nothing is kept; a cleared cache sees
    /// every key anew.
    #[test]
    fn a_failed_capture_runs_every_later_step_eagerly_and_clear_starts_over() {
        let mut g: StepGraphs<u32, ()> = StepGraphs::new(4);
        g.turn(7);
        assert_eq!(g.turn(7), Turn::Capture);
        g.clear();
        assert_eq!(g.turn(7), Turn::Eager, "entries were dropped by clear");
        assert_eq!(g.turn(7), Turn::Capture);
        g.give_up();
        for _ in 0..3 {
            assert_eq!(g.turn(7), Turn::Eager);
        }
        assert!(g.entries.is_empty());
    }
}
