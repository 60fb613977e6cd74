//! Residual-checkpoint offload ([`super::GpuLlama::set_offload_residuals`]): the input residuals
//! (N, C) bf16 of the recomputed layers 0..m live in a ring of [`plan::RESID_RING`] device
//! slots (layer l's in slot l % slots) instead of one buffer per layer. Those a later residual
//! overwrites in the forward (layers 0..m - slots) travel to pinned host memory and back; the
//! last `slots` are still in their slots when the backward reaches them ("resident").
//!
//! Streams and events (per slot s; kernels run on the compute stream `gpu.stream()`):
//! - forward, after the compute stream wrote resid[l] into s: record `written[s]` (compute);
//!   the device-to-host stream waits for it, copies s to host row l, records `copied_out[s]`;
//! - forward, before the compute stream writes resid[l] into s: it waits for `copied_out[s]`
//!   (the copy of the residual s held before);
//! - backward, at the start of layer l + 1 (prefetch of resid[l]): record `free[s]` (compute:
//!   every earlier reader of s is done); the host-to-device stream waits for `free[s]` and
//!   `copied_out[s]` (the last copy out of s, so host row l is written: the stream runs its
//!   copies in order), copies host row l into s, records `copied_in[s]`;
//! - backward, at the start of layer l: the compute stream waits for `copied_in[s]`.
//!
//! A wait on an event never recorded is a no-op (first use of a slot). Only events: no stream
//! or device synchronisation while a step runs.

use std::sync::Arc;

use ftrt_runtime::cudarc::driver::{sys, CudaEvent, CudaStream};
use ftrt_runtime::offload::PinnedHostBuffer;
use ftrt_runtime::{DevPtr, Gpu};
use half::bf16;

use super::{plan, Ctx, GpuResult, Held};

/// The ring, the pinned host rows, the copy streams and the events of the module doc.
pub(super) struct ResidOffload {
    /// Recomputed layers (0..m) whose input residual lives in the ring.
    m: usize,
    /// min(RESID_RING, m) slots (N, C) bf16 (owned by the activations' [`Held`]).
    slots: Vec<DevPtr<bf16>>,
    /// Token budget N and hidden size C: a slot and a host row hold (N, C).
    n_max: usize,
    c: usize,
    /// (m - slots, N, C) bf16: the residuals of layers 0..m - slots between forward and backward.
    host: PinnedHostBuffer,
    d2h: Arc<CudaStream>,
    h2d: Arc<CudaStream>,
    written: Vec<CudaEvent>,
    copied_out: Vec<CudaEvent>,
    free: Vec<CudaEvent>,
    copied_in: Vec<CudaEvent>,
}

impl ResidOffload {
    /// Allocates the ring (into `held`) for the input residuals (n_max, c) of layers 0..m, the
    /// pinned host rows, two copy streams and the events.
    pub(super) fn new(
        gpu: &Gpu,
        held: &mut Held,
        m: usize,
        n_max: usize,
        c: usize,
    ) -> GpuResult<Self> {
        let ring = plan::resid_ring(m);
        let slots = (0..ring)
            .map(|_| held.alloc::<bf16>(gpu, n_max * c))
            .collect::<GpuResult<Vec<_>>>()?;
        let events = || {
            (0..ring)
                .map(|_| gpu.context().new_event(None))
                .collect::<Result<Vec<_>, _>>()
                .ctx("creating offload events")
        };
        let host_bytes = plan::offloaded_residuals(m) * n_max * c * std::mem::size_of::<bf16>();
        Ok(Self {
            m,
            slots,
            n_max,
            c,
            host: PinnedHostBuffer::new(gpu, host_bytes).ctx("allocating pinned host memory")?,
            d2h: gpu.context().new_stream().ctx("creating a copy stream")?,
            h2d: gpu.context().new_stream().ctx("creating a copy stream")?,
            written: events()?,
            copied_out: events()?,
            free: events()?,
            copied_in: events()?,
        })
    }

    /// The ring slot holding layer `l`'s input residual (`l` < m).
    pub(super) fn slot(&self, l: usize) -> DevPtr<bf16> {
        self.slots[l % self.slots.len()]
    }

    /// Whether resid[l] is in the ring at all (`l` is a recomputed layer).
    fn in_ring(&self, l: usize) -> bool {
        l < self.m
    }

    /// Whether resid[l] goes through host memory: no later residual overwrites its slot in the
    /// forward otherwise.
    fn travels(&self, l: usize) -> bool {
        l + self.slots.len() < self.m
    }

    /// Forward, before the compute stream writes resid[l]: wait until the residual its slot
    /// held before is copied out.
    pub(super) fn before_write(&self, gpu: &Gpu, l: usize) -> GpuResult<()> {
        if !self.in_ring(l) {
            return Ok(());
        }
        let s = l % self.slots.len();
        gpu.stream()
            .wait(&self.copied_out[s])
            .ctx("waiting for a residual copy-out")
    }

    /// Forward, after the compute stream wrote resid[l] ((n, C) of the batch's n tokens): copy
    /// it to host row l on the device-to-host stream.
    pub(super) fn after_write(&self, gpu: &Gpu, l: usize, n: usize) -> GpuResult<()> {
        if !self.travels(l) {
            return Ok(());
        }
        let s = l % self.slots.len();
        let (host, bytes) = self.host_row(l, n);
        self.written[s]
            .record(gpu.stream())
            .ctx("recording a residual write")?;
        self.d2h
            .wait(&self.written[s])
            .ctx("ordering a residual copy-out")?;
        gpu.context().bind_to_thread().ctx("binding the context")?;
        // SAFETY: the slot holds N * C >= n * C bf16 and the host row `bytes` (host_row); both
        // outlive the copy (dropping the offload waits for the copy streams first).
        unsafe {
            sys::cuMemcpyDtoHAsync_v2(
                host as *mut _,
                self.slots[s].addr,
                bytes,
                self.d2h.cu_stream(),
            )
        }
        .result()
        .ctx("residual copy-out")?;
        self.copied_out[s]
            .record(&self.d2h)
            .ctx("recording a residual copy-out")
    }

    /// Backward, at the start of layer l + 1: bring resid[l] back into its slot on the
    /// host-to-device stream (nothing for residuals that stayed in the ring).
    pub(super) fn prefetch(&self, gpu: &Gpu, l: usize, n: usize) -> GpuResult<()> {
        if !self.travels(l) {
            return Ok(());
        }
        let s = l % self.slots.len();
        let (host, bytes) = self.host_row(l, n);
        self.free[s]
            .record(gpu.stream())
            .ctx("recording a free residual slot")?;
        self.h2d
            .wait(&self.free[s])
            .ctx("ordering a residual prefetch")?;
        self.h2d
            .wait(&self.copied_out[s])
            .ctx("ordering a residual prefetch")?;
        gpu.context().bind_to_thread().ctx("binding the context")?;
        // SAFETY: as in after_write, in the other direction.
        unsafe {
            sys::cuMemcpyHtoDAsync_v2(
                self.slots[s].addr,
                host as *const _,
                bytes,
                self.h2d.cu_stream(),
            )
        }
        .result()
        .ctx("residual prefetch")?;
        self.copied_in[s]
            .record(&self.h2d)
            .ctx("recording a residual prefetch")
    }

    /// Backward, before layer `l` reads resid[l]: the compute stream waits for its prefetch.
    pub(super) fn wait_prefetched(&self, gpu: &Gpu, l: usize) -> GpuResult<()> {
        if !self.travels(l) {
            return Ok(());
        }
        gpu.stream()
            .wait(&self.copied_in[l % self.slots.len()])
            .ctx("waiting for a residual prefetch")
    }

    /// Host address of row `l` (layer l's residual) and the bytes of its first `n` tokens.
    fn host_row(&self, l: usize, n: usize) -> (*mut u8, usize) {
        assert!(n <= self.n_max && self.travels(l));
        let token = self.c * std::mem::size_of::<bf16>();
        (self.host.ptr_at(l * self.n_max * token), n * token)
    }
}

impl Drop for ResidOffload {
    /// Copies may still run (a forward without a backward): wait for them before the slots and
    /// the host rows are freed.
    fn drop(&mut self) {
        for s in [&self.d2h, &self.h2d] {
            s.context().record_err(s.synchronize());
        }
    }
}
