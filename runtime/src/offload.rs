//! Activation offload: the copy schedule derived from a [`Plan`] (pure data, CPU-tested) and
//! the CUDA engine that carries it out with a pinned host pool, two copy streams and events.
//!
//! For each offloaded tensor (node indices from its [`OffloadSpec`]):
//! - after node `d2h_after` (its producer): record `produced` on the compute stream; the
//!   device-to-host stream waits for it, copies the tensor to its host region, records
//!   `d2h_done`;
//! - before node `device_free_from`: the compute stream waits for `d2h_done`, so nothing
//!   overwrites the device copy before it has been read;
//! - before node `prefetch_before`: record `free` on the compute stream (everything that used
//!   the region before is done); the host-to-device stream waits for `free` and `d2h_done`,
//!   copies the tensor into its second device region, records `h2d_done`;
//! - before node `first_consumer`: the compute stream waits for `h2d_done`.
//!
//! Within "before node n", all `d2h_done` waits come first, then prefetch issues, then the
//! consumer waits, so a prefetch never overtakes a copy-out of memory it reuses. Only events:
//! no device-wide or stream synchronisation.

use crate::device::Gpu;
use crate::error::RuntimeError;
use crate::graph::{Graph, TensorId};
use crate::planner::{CostModel, Plan};
use cudarc::driver::{CudaEvent, CudaStream};
pub use pinned::{available_host_memory, gib, PinnedHostBuffer};
use std::sync::Arc;

/// The two copy streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyStream {
    DeviceToHost,
    HostToDevice,
}

/// Index into [`OffloadSchedule::num_events`] events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventId(pub usize);

/// One step of the offload schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Record the event on the compute stream.
    RecordCompute(EventId),
    /// The compute stream waits for the event.
    ComputeWaits(EventId),
    /// The copy stream waits for the event.
    CopyWaits(CopyStream, EventId),
    /// Record the event on the copy stream.
    RecordCopy(CopyStream, EventId),
    /// Device-to-host copy of `bytes` from arena offset `device` to host pool offset `host`.
    CopyToHost {
        tensor: TensorId,
        device: usize,
        host: usize,
        bytes: usize,
    },
    /// Host-to-device copy of `bytes` from host pool offset `host` to arena offset `device`.
    CopyToDevice {
        tensor: TensorId,
        device: usize,
        host: usize,
        bytes: usize,
    },
}

/// Actions to issue before and after every node of the schedule.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OffloadSchedule {
    pub before: Vec<Vec<Action>>,
    pub after: Vec<Vec<Action>>,
    pub num_events: usize,
}

/// Builds the copy schedule for `plan.offloads` (four events per offloaded tensor).
pub fn schedule(plan: &Plan) -> OffloadSchedule {
    let n = plan.num_nodes;
    let mut s = OffloadSchedule {
        before: vec![Vec::new(); n],
        after: vec![Vec::new(); n],
        num_events: 4 * plan.offloads.len(),
    };
    let offset =
        |t: TensorId, node: usize| plan.offset_at(t, node).expect("offloaded tensor is placed");
    // Issue order on each copy stream: copies out by producer, prefetches by issue node then
    // consumer (the streams are first-in first-out, and the planner timed them so).
    let mut out_order: Vec<usize> = (0..plan.offloads.len()).collect();
    out_order.sort_by_key(|&k| (plan.offloads[k].d2h_after, plan.offloads[k].tensor));
    let mut in_order = out_order.clone();
    in_order.sort_by_key(|&k| {
        let o = &plan.offloads[k];
        (o.prefetch_before, o.first_consumer, o.tensor)
    });
    for &k in &out_order {
        let o = &plan.offloads[k];
        let [produced, d2h_done] = [EventId(4 * k), EventId(4 * k + 1)];
        s.after[o.d2h_after].extend([
            Action::RecordCompute(produced),
            Action::CopyWaits(CopyStream::DeviceToHost, produced),
            Action::CopyToHost {
                tensor: o.tensor,
                device: offset(o.tensor, o.d2h_after),
                host: o.host_offset,
                bytes: o.bytes,
            },
            Action::RecordCopy(CopyStream::DeviceToHost, d2h_done),
        ]);
        s.before[o.device_free_from].push(Action::ComputeWaits(d2h_done));
    }
    for &k in &in_order {
        let o = &plan.offloads[k];
        let [d2h_done, free, h2d_done] =
            [EventId(4 * k + 1), EventId(4 * k + 2), EventId(4 * k + 3)];
        s.before[o.prefetch_before].extend([
            Action::RecordCompute(free),
            Action::CopyWaits(CopyStream::HostToDevice, free),
            Action::CopyWaits(CopyStream::HostToDevice, d2h_done),
            Action::CopyToDevice {
                tensor: o.tensor,
                device: offset(o.tensor, o.prefetch_before),
                host: o.host_offset,
                bytes: o.bytes,
            },
            Action::RecordCopy(CopyStream::HostToDevice, h2d_done),
        ]);
    }
    for &k in &in_order {
        let o = &plan.offloads[k];
        s.before[o.first_consumer].push(Action::ComputeWaits(EventId(4 * k + 3)));
    }
    s
}

/// What [`estimate`] predicts for one step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepEstimate {
    /// Sum of the estimated node times (recomputes included): the step without copies.
    pub compute_s: f64,
    /// Estimated step time with the copies' waits.
    pub step_s: f64,
    /// Time the compute stream waits for copies (`step_s - compute_s`).
    pub stall_s: f64,
    /// Busy time of the device-to-host and host-to-device streams.
    pub d2h_busy_s: f64,
    pub h2d_busy_s: f64,
}

/// Simulates `plan`'s step with its offload schedule in issue order: the compute stream runs
/// the estimated node times of `cost`, each copy stream its copies at the nominal bandwidths
/// (no margin), events carry times between streams. Stalls are the compute stream's waits.
pub fn estimate(graph: &Graph, plan: &Plan, cost: &CostModel) -> StepEstimate {
    let s = schedule(plan);
    let mut ev = vec![0.0f64; s.num_events];
    let (mut tc, mut td, mut th) = (0.0f64, 0.0f64, 0.0f64);
    let (mut compute, mut d2h_busy, mut h2d_busy) = (0.0, 0.0, 0.0);
    let mut recompute_before = vec![Vec::new(); plan.num_nodes];
    for r in &plan.recomputes {
        recompute_before[r.before].push(r.producer);
    }
    let mut issue = |acts: &[Action], tc: &mut f64, td: &mut f64, th: &mut f64| {
        for a in acts {
            match *a {
                Action::RecordCompute(e) => ev[e.0] = *tc,
                Action::ComputeWaits(e) => *tc = tc.max(ev[e.0]),
                Action::CopyWaits(CopyStream::DeviceToHost, e) => *td = td.max(ev[e.0]),
                Action::CopyWaits(CopyStream::HostToDevice, e) => *th = th.max(ev[e.0]),
                Action::RecordCopy(CopyStream::DeviceToHost, e) => ev[e.0] = *td,
                Action::RecordCopy(CopyStream::HostToDevice, e) => ev[e.0] = *th,
                Action::CopyToHost { bytes, .. } => {
                    let d = bytes as f64 / cost.d2h_bytes_per_s;
                    *td += d;
                    d2h_busy += d;
                }
                Action::CopyToDevice { bytes, .. } => {
                    let d = bytes as f64 / cost.h2d_bytes_per_s;
                    *th += d;
                    h2d_busy += d;
                }
            }
        }
    };
    for (n, recomputes) in recompute_before.iter().enumerate() {
        issue(&s.before[n], &mut tc, &mut td, &mut th);
        for &p in recomputes {
            let d = cost.node_seconds(graph, p);
            tc += d;
            compute += d;
        }
        let d = cost.node_seconds(graph, n);
        tc += d;
        compute += d;
        issue(&s.after[n], &mut tc, &mut td, &mut th);
    }
    StepEstimate {
        compute_s: compute,
        step_s: tc,
        stall_s: tc - compute,
        d2h_busy_s: d2h_busy,
        h2d_busy_s: h2d_busy,
    }
}

/// Carries out an [`OffloadSchedule`] on the GPU: pinned host pool, two copy streams, events.
pub struct OffloadEngine {
    schedule: OffloadSchedule,
    host: PinnedHostBuffer,
    d2h: Arc<CudaStream>,
    h2d: Arc<CudaStream>,
    events: Vec<CudaEvent>,
}

impl OffloadEngine {
    /// Allocates the pinned pool (`plan.host_bytes`), the copy streams and the events.
    pub fn new(gpu: &Gpu, plan: &Plan) -> Result<Self, RuntimeError> {
        let schedule = schedule(plan);
        let events = (0..schedule.num_events)
            .map(|_| gpu.context().new_event(None))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            host: PinnedHostBuffer::new(gpu, plan.host_bytes)?,
            d2h: gpu.context().new_stream()?,
            h2d: gpu.context().new_stream()?,
            events,
            schedule,
        })
    }

    /// The schedule being executed.
    pub fn schedule(&self) -> &OffloadSchedule {
        &self.schedule
    }

    /// The pinned host pool.
    pub fn host(&self) -> &PinnedHostBuffer {
        &self.host
    }

    /// Issues the actions scheduled before node `node`; `arena` is the arena's base address.
    pub fn before(&self, gpu: &Gpu, node: usize, arena: u64) -> Result<(), RuntimeError> {
        self.issue(gpu, &self.schedule.before[node], arena)
    }

    /// Issues the actions scheduled after node `node`.
    pub fn after(&self, gpu: &Gpu, node: usize, arena: u64) -> Result<(), RuntimeError> {
        self.issue(gpu, &self.schedule.after[node], arena)
    }

    fn stream(&self, s: CopyStream) -> &CudaStream {
        match s {
            CopyStream::DeviceToHost => &self.d2h,
            CopyStream::HostToDevice => &self.h2d,
        }
    }

    fn issue(&self, gpu: &Gpu, actions: &[Action], arena: u64) -> Result<(), RuntimeError> {
        for a in actions {
            match *a {
                Action::RecordCompute(e) => self.events[e.0].record(gpu.stream())?,
                Action::ComputeWaits(e) => gpu.stream().wait(&self.events[e.0])?,
                Action::CopyWaits(s, e) => self.stream(s).wait(&self.events[e.0])?,
                Action::RecordCopy(s, e) => self.events[e.0].record(self.stream(s))?,
                Action::CopyToHost {
                    device,
                    host,
                    bytes,
                    ..
                } => {
                    assert!(host + bytes <= self.host.bytes());
                    // SAFETY: the host range lies in the pinned pool (checked); the device range
                    // is the tensor's arena region at this node (planner invariant).
                    unsafe {
                        cudarc::driver::sys::cuMemcpyDtoHAsync_v2(
                            self.host.ptr_at(host) as *mut _,
                            arena + device as u64,
                            bytes,
                            self.d2h.cu_stream(),
                        )
                    }
                    .result()?
                }
                Action::CopyToDevice {
                    device,
                    host,
                    bytes,
                    ..
                } => {
                    assert!(host + bytes <= self.host.bytes());
                    // SAFETY: as above, in the other direction.
                    unsafe {
                        cudarc::driver::sys::cuMemcpyHtoDAsync_v2(
                            arena + device as u64,
                            self.host.ptr_at(host) as *const _,
                            bytes,
                            self.h2d.cu_stream(),
                        )
                    }
                    .result()?
                }
            }
        }
        Ok(())
    }
}

mod pinned;
#[cfg(test)]
mod tests;
