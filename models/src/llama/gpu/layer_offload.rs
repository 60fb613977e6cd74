//! Checkpoint offload ([`super::GpuLlama::set_offload_residuals`]): per member layer (some of
//! the recomputed layers, in ascending order), a set of tensors that the forward writes and the
//! backward reads — the layer's input residual (N, C) bf16; its attention checkpoint
//! ([`attention_checkpoint`]); or its gate and up outputs ([`gate_up_layers`]) — lives in a
//! ring of device slots (the member at position p in slot p % slots) instead of one buffer per
//! layer. A slot holds the set's tensors ("pieces") one after another, each sized
//! for N tokens and starting on a 256-byte boundary; a batch of n tokens uses the first n
//! tokens' bytes of each. The sets a later member overwrites in the forward (all but the last
//! `slots` members) travel to pinned host memory and back, at most the lowest `travel` of them
//! (the attention outputs' ring: the host holds no more; the others' sets are lost and their
//! backward recomputes them into the slot); the last `slots` are still in their slots when the
//! backward reaches them ("resident").
//!
//! Streams and events (per slot s; kernels run on the compute stream `gpu.stream()`):
//! - forward, after the compute stream wrote layer l's set into s: record `written[s]`
//!   (compute); the device-to-host stream waits for it, copies s to l's host row, records
//!   `copied_out[s]`;
//! - forward, before the compute stream writes layer l's set into s: it waits for
//!   `copied_out[s]` (the copy of the set s held before in this step, if that travelled);
//! - backward, once the set's slot is free (for the residuals and checkpoints: at the start of
//!   the member above; for the attention outputs' one slot: after the attention backward of
//!   the layer above, and after the re-run of a layer below one that stores no residual):
//!   record `free[s]` (compute: every earlier reader of s is done); the
//!   host-to-device stream waits for `free[s]` and `copied_out[s]` (the last copy out of s,
//!   so l's host row is written: the stream runs its copies in order), copies l's host row
//!   into s, records `copied_in[s]`;
//! - backward, before layer l reads its set: the compute stream waits for `copied_in[s]`.
//!
//! Every wait is on an event recorded earlier in the same step (so a step can be captured into
//! a CUDA graph). Only events: no stream or device synchronisation while a step runs.
//!
//! [`attention_checkpoint`]: super::plan::attention_checkpoint
//! [`gate_up_layers`]: super::plan::gate_up_layers

use std::sync::Arc;

use ftrt_runtime::cudarc::driver::{sys, CudaEvent, CudaStream};
use ftrt_runtime::offload::PinnedHostBuffer;
use ftrt_runtime::{DevPtr, Gpu};

use super::plan::piece_start;
use super::{Ctx, GpuResult, Held};

/// The ring, the pinned host rows, the copy streams and the events of the module doc.
pub(super) struct LayerOffload {
    /// The layers whose set lives in the ring, ascending.
    members: Vec<usize>,
    /// Device slots of `slot_bytes` (owned by the activations' [`Held`]).
    slots: Vec<DevPtr<u8>>,
    /// Token budget N; bytes per token of each piece ([`piece_start`]).
    n_max: usize,
    piece_bytes: Vec<usize>,
    /// How many of the lowest members may travel.
    travel: usize,
    /// A row of `slot_bytes` per travelling member (all but the last `slots`, at most
    /// `travel`): their sets between forward and backward.
    host: PinnedHostBuffer,
    d2h: Arc<CudaStream>,
    h2d: Arc<CudaStream>,
    written: Vec<CudaEvent>,
    copied_out: Vec<CudaEvent>,
    free: Vec<CudaEvent>,
    copied_in: Vec<CudaEvent>,
}

impl LayerOffload {
    /// Allocates a ring of `ring` slots (into `held`) for the sets of the layers `members`
    /// (ascending), each of pieces of `piece_bytes` bytes per token for `n_max` tokens, the
    /// pinned host rows of at most `travel` travelling members, two copy streams and the
    /// events.
    pub(super) fn new(
        gpu: &Gpu,
        held: &mut Held,
        (members, ring, travel): (Vec<usize>, usize, usize),
        n_max: usize,
        piece_bytes: Vec<usize>,
    ) -> GpuResult<Self> {
        let ring = ring.min(members.len());
        let slot_bytes = piece_start(n_max, &piece_bytes, piece_bytes.len());
        let slots = (0..ring)
            .map(|_| held.alloc::<u8>(gpu, slot_bytes))
            .collect::<GpuResult<Vec<_>>>()?;
        let events = || {
            (0..ring)
                .map(|_| gpu.context().new_event(None))
                .collect::<Result<Vec<_>, _>>()
                .ctx("creating offload events")
        };
        let host_bytes = Self::host_bytes((members.len(), ring, travel), n_max, &piece_bytes);
        Ok(Self {
            members,
            slots,
            travel,
            n_max,
            piece_bytes,
            host: PinnedHostBuffer::new(gpu, host_bytes).ctx("allocating pinned host memory")?,
            d2h: gpu.context().new_stream().ctx("creating a copy stream")?,
            h2d: gpu.context().new_stream().ctx("creating a copy stream")?,
            written: events()?,
            copied_out: events()?,
            free: events()?,
            copied_in: events()?,
        })
    }

    /// Pinned host bytes of an offload of `members` layers' sets of `piece_bytes` for `n_max`
    /// tokens in a ring of `ring` slots, at most `travel` of them travelling.
    pub(super) fn host_bytes(
        (members, ring, travel): (usize, usize, usize),
        n_max: usize,
        piece_bytes: &[usize],
    ) -> usize {
        let rows = members.saturating_sub(ring).min(travel);
        rows * piece_start(n_max, piece_bytes, piece_bytes.len())
    }

    /// Piece `i` of the ring slot holding layer `l`'s set (`l` a member), as a typed pointer.
    pub(super) fn piece<T>(&self, l: usize, i: usize) -> DevPtr<T> {
        let start = piece_start(self.n_max, &self.piece_bytes, i);
        self.slots[self.slot(l)].offset(start).cast()
    }

    /// The layers whose set lives in the ring, ascending.
    pub(super) fn members(&self) -> &[usize] {
        &self.members
    }

    /// The members whose set travels, ascending.
    pub(super) fn travelling(&self) -> Vec<usize> {
        let travel = self.members.iter().filter(|&&l| self.travels(l));
        travel.copied().collect()
    }

    /// Layer `l`'s position among the members, if it is one.
    fn position(&self, l: usize) -> Option<usize> {
        self.members.binary_search(&l).ok()
    }

    /// Whether layer `l`'s set is in the ring at all.
    pub(super) fn holds(&self, l: usize) -> bool {
        self.position(l).is_some()
    }

    /// The slot of member `l`.
    fn slot(&self, l: usize) -> usize {
        self.position(l).expect("a member of the offload") % self.slots.len()
    }

    /// The member below `l`, if any.
    pub(super) fn member_below(&self, l: usize) -> Option<usize> {
        self.members.iter().rev().find(|&&m| m < l).copied()
    }

    /// Whether layer l's set goes through host memory: one of the lowest `travel` members that
    /// a later member overwrites in the forward.
    fn travels(&self, l: usize) -> bool {
        self.position(l)
            .is_some_and(|p| p < self.travel && p + self.slots.len() < self.members.len())
    }

    /// Whether member `l`'s set is back in its slot for its backward: it travels, or no later
    /// member overwrote it.
    pub(super) fn keeps(&self, l: usize) -> bool {
        self.position(l)
            .is_some_and(|p| p + self.slots.len() >= self.members.len() || self.travels(l))
    }

    /// Forward, before the compute stream writes layer l's set: wait until the set its slot
    /// held before in this step is copied out, if it travels (the member `slots` positions
    /// below; the wait orders after any earlier copy out of the slot too, which that member's
    /// own write waited for). A slot's first member of the step waits for nothing: the last
    /// step's copies of it finished before its backward read the slot, and a step captured
    /// into a CUDA graph may only wait for events recorded within it.
    pub(super) fn before_write(&self, gpu: &Gpu, l: usize) -> GpuResult<()> {
        let Some(p) = self.position(l) else {
            return Ok(());
        };
        let ring = self.slots.len();
        if p < ring || !self.travels(self.members[p - ring]) {
            return Ok(());
        }
        gpu.stream()
            .wait(&self.copied_out[self.slot(l)])
            .ctx("waiting for a checkpoint copy-out")
    }

    /// Forward, after the compute stream wrote layer l's set (of the batch's n tokens): copy
    /// it to host row l on the device-to-host stream.
    pub(super) fn after_write(&self, gpu: &Gpu, l: usize, n: usize) -> GpuResult<()> {
        if !self.travels(l) {
            return Ok(());
        }
        let s = self.slot(l);
        self.written[s]
            .record(gpu.stream())
            .ctx("recording a checkpoint write")?;
        self.d2h
            .wait(&self.written[s])
            .ctx("ordering a checkpoint copy-out")?;
        gpu.context().bind_to_thread().ctx("binding the context")?;
        for (dev, host, bytes) in self.pieces(l, n) {
            // SAFETY: a piece holds n_max >= n tokens in the slot and in host row l
            // (`pieces`); both outlive the copy (dropping the offload waits for the streams).
            unsafe { sys::cuMemcpyDtoHAsync_v2(host as *mut _, dev, bytes, self.d2h.cu_stream()) }
                .result()
                .ctx("checkpoint copy-out")?;
        }
        self.copied_out[s]
            .record(&self.d2h)
            .ctx("recording a checkpoint copy-out")
    }

    /// Backward, once every reader of its slot's current set is done: bring layer l's set back
    /// into its slot on the host-to-device stream (nothing for sets that do not travel).
    pub(super) fn prefetch(&self, gpu: &Gpu, l: usize, n: usize) -> GpuResult<()> {
        if !self.travels(l) {
            return Ok(());
        }
        let s = self.slot(l);
        self.free[s]
            .record(gpu.stream())
            .ctx("recording a free checkpoint slot")?;
        self.h2d
            .wait(&self.free[s])
            .ctx("ordering a checkpoint prefetch")?;
        self.h2d
            .wait(&self.copied_out[s])
            .ctx("ordering a checkpoint prefetch")?;
        gpu.context().bind_to_thread().ctx("binding the context")?;
        for (dev, host, bytes) in self.pieces(l, n) {
            // SAFETY: as in after_write, in the other direction.
            unsafe {
                sys::cuMemcpyHtoDAsync_v2(dev, host as *const _, bytes, self.h2d.cu_stream())
            }
            .result()
            .ctx("checkpoint prefetch")?;
        }
        self.copied_in[s]
            .record(&self.h2d)
            .ctx("recording a checkpoint prefetch")
    }

    /// Backward, before layer `l` reads its set: the compute stream waits for its prefetch.
    pub(super) fn wait_prefetched(&self, gpu: &Gpu, l: usize) -> GpuResult<()> {
        if !self.travels(l) {
            return Ok(());
        }
        gpu.stream()
            .wait(&self.copied_in[self.slot(l)])
            .ctx("waiting for a checkpoint prefetch")
    }

    /// Per piece of layer l's set, the first `n` tokens: (device address in its slot, host
    /// address in its row, bytes).
    fn pieces(&self, l: usize, n: usize) -> Vec<(u64, *mut u8, usize)> {
        assert!(n <= self.n_max && self.travels(l));
        let pb = &self.piece_bytes;
        let row = self.position(l).expect("a member") * piece_start(self.n_max, pb, pb.len());
        let slot = self.slots[self.slot(l)].addr;
        (0..pb.len())
            .filter(|&i| pb[i] > 0)
            .map(|i| {
                let start = piece_start(self.n_max, pb, i);
                let dev = slot + start as u64;
                (dev, self.host.ptr_at(row + start), n * pb[i])
            })
            .collect()
    }
}

impl Drop for LayerOffload {
    /// Copies may still run (a forward without a backward): wait for them before the slots and
    /// the host rows are freed.
    fn drop(&mut self) {
        for s in [&self.d2h, &self.h2d] {
            s.context().record_err(s.synchronize());
        }
    }
}
