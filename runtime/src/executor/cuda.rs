//! The CUDA backend: the planned step on one device arena, launched eagerly node by node or
//! captured once into a CUDA graph (`cuStreamBeginCapture` .. `cuGraphInstantiate`) and
//! replayed with `cuGraphLaunch`; each phase of a graph (a range of its nodes) may be captured
//! and replayed on its own. Offload copies run on the [`OffloadEngine`]'s copy streams
//! and join the capture through events.

use super::{arg_ranges, check_phase, final_offset, recomputes_before};
use crate::device::{DevPtr, DeviceBuffer, Gpu};
use crate::dtype::DType;
use crate::error::RuntimeError;
use crate::gemm::cublaslt::{CublasLt, GemmWorkspace};
use crate::graph::{CpuArgs, GpuArgs, Graph, NodeKind, TensorId};
use crate::offload::OffloadEngine;
use crate::planner::Plan;
use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::CudaGraph;
use std::ops::Range;
use std::time::{Duration, Instant};

/// Runs steps of one planned graph on a GPU.
pub struct CudaExecutor<'g> {
    gpu: &'g Gpu,
    graph: &'g Graph,
    plan: &'g Plan,
    arena: DeviceBuffer,
    offload: OffloadEngine,
    blas: Option<CublasLt>,
    /// Per node: its arguments at its own time.
    node_args: Vec<GpuArgs>,
    /// Per node: (producer, arguments) of the recomputes to run before it.
    recompute_args: Vec<Vec<(usize, GpuArgs)>>,
    /// The captured CUDA graphs, each of a range of nodes (the whole step, or a phase).
    captured: Vec<(Range<usize>, CudaGraph)>,
}

impl<'g> CudaExecutor<'g> {
    /// Allocates the arena (zeroed) and the offload engine; opens cuBLASLt if the graph has
    /// GEMM nodes. All device memory of the step is allocated here, none later.
    pub fn new(gpu: &'g Gpu, graph: &'g Graph, plan: &'g Plan) -> Result<Self, RuntimeError> {
        let arena = gpu.alloc(plan.arena_bytes)?;
        gpu.memset_zero(arena.ptr(), plan.arena_bytes)?;
        let base = arena.ptr::<u8>().addr;
        let args = |node: usize, time: usize| {
            let (ins, outs) = arg_ranges(graph, plan, node, time);
            GpuArgs {
                inputs: ins.iter().map(|r| base + r.offset as u64).collect(),
                outputs: outs.iter().map(|r| base + r.offset as u64).collect(),
            }
        };
        let node_args = (0..graph.nodes.len()).map(|n| args(n, n)).collect();
        let recompute_args = recomputes_before(plan)
            .into_iter()
            .enumerate()
            .map(|(n, producers)| producers.into_iter().map(|p| (p, args(p, n))).collect())
            .collect();
        let has_gemm = graph
            .nodes
            .iter()
            .any(|n| matches!(n.kind, NodeKind::Gemm { .. }));
        let blas = if has_gemm {
            Some(CublasLt::new(gpu)?)
        } else {
            None
        };
        let exec = Self {
            gpu,
            graph,
            plan,
            offload: OffloadEngine::new(gpu, plan)?,
            arena,
            blas,
            node_args,
            recompute_args,
            captured: Vec::new(),
        };
        gpu.synchronize()?;
        Ok(exec)
    }

    /// Base address of the arena.
    pub fn arena(&self) -> DevPtr<u8> {
        self.arena.ptr()
    }

    /// Device address of `t` in its last arena region (see [`super::CpuExecutor::tensor`]).
    pub fn tensor_ptr<T>(&self, t: TensorId) -> Result<DevPtr<T>, RuntimeError> {
        let off = final_offset(self.plan, t).ok_or_else(|| {
            RuntimeError::InvalidArgument(format!(
                "tensor '{}' is never on the device",
                self.graph.tensor(t).name
            ))
        })?;
        Ok(self.arena.ptr::<u8>().offset(off).cast())
    }

    /// Uploads `data` into `t` and waits.
    pub fn write<T: bytemuck::Pod>(&self, t: TensorId, data: &[T]) -> Result<(), RuntimeError> {
        let len = self.graph.tensor(t).bytes();
        if std::mem::size_of_val(data) != len {
            return Err(RuntimeError::InvalidArgument(format!(
                "tensor '{}' has {len} bytes, got {}",
                self.graph.tensor(t).name,
                std::mem::size_of_val(data)
            )));
        }
        self.gpu.upload(self.tensor_ptr(t)?, data)
    }

    /// Downloads `t` (after waiting for the compute stream).
    pub fn read<T: bytemuck::Pod>(&self, t: TensorId) -> Result<Vec<T>, RuntimeError> {
        let n = self.graph.tensor(t).bytes() / std::mem::size_of::<T>();
        let mut out = vec![T::zeroed(); n];
        self.gpu.download(self.tensor_ptr(t)?, &mut out)?;
        Ok(out)
    }

    /// Enqueues one step eagerly; returns the host time spent enqueueing (no wait).
    pub fn run_eager(&self) -> Result<Duration, RuntimeError> {
        self.run_eager_nodes(0..self.plan.num_nodes)
    }

    /// Enqueues the nodes `nodes` (one phase) eagerly; returns the host enqueue time.
    pub fn run_eager_nodes(&self, nodes: Range<usize>) -> Result<Duration, RuntimeError> {
        check_phase(self.plan, &nodes)?;
        let t0 = Instant::now();
        self.enqueue(nodes, false)?;
        Ok(t0.elapsed())
    }

    /// Runs one eager step (loading every module and choosing every GEMM algorithm), then
    /// captures the step into a CUDA graph, instantiates and uploads it.
    pub fn capture(&mut self) -> Result<(), RuntimeError> {
        self.capture_nodes(0..self.plan.num_nodes)
    }

    /// [`Self::capture`] for the nodes `nodes` only (one phase), replayed by
    /// [`Self::replay_nodes`] with the same range; capturing a range again replaces it.
    pub fn capture_nodes(&mut self, nodes: Range<usize>) -> Result<(), RuntimeError> {
        self.run_eager_nodes(nodes.clone())?;
        self.gpu.synchronize()?;
        let stream = self.gpu.stream();
        stream.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)?;
        let enqueued = self.enqueue(nodes.clone(), true);
        let ended = stream.end_capture(CUgraphInstantiate_flags(0));
        enqueued?;
        let graph =
            ended?.ok_or_else(|| RuntimeError::Unsupported("captured an empty step".into()))?;
        graph.upload()?;
        self.captured.retain(|(r, _)| *r != nodes);
        self.captured.push((nodes, graph));
        Ok(())
    }

    /// Launches the captured step; returns the host time of the launch (no wait).
    pub fn replay(&self) -> Result<Duration, RuntimeError> {
        self.replay_nodes(0..self.plan.num_nodes)
    }

    /// Launches the CUDA graph captured for `nodes`; returns the host launch time (no wait).
    pub fn replay_nodes(&self, nodes: Range<usize>) -> Result<Duration, RuntimeError> {
        let (_, g) = self
            .captured
            .iter()
            .find(|(r, _)| *r == nodes)
            .ok_or_else(|| {
                RuntimeError::InvalidArgument(format!("replay of nodes {nodes:?} before capture"))
            })?;
        let t0 = Instant::now();
        g.launch()?;
        Ok(t0.elapsed())
    }

    fn enqueue(&self, nodes: Range<usize>, capturing: bool) -> Result<(), RuntimeError> {
        let base = self.arena.ptr::<u8>().addr;
        for n in nodes {
            self.offload.before(self.gpu, n, base)?;
            for (p, args) in &self.recompute_args[n] {
                self.run_node(*p, args, capturing)?;
            }
            self.run_node(n, &self.node_args[n], capturing)?;
            self.offload.after(self.gpu, n, base)?;
        }
        Ok(())
    }

    fn run_node(&self, node: usize, args: &GpuArgs, capturing: bool) -> Result<(), RuntimeError> {
        let nd = &self.graph.nodes[node];
        let err = |what: String| {
            RuntimeError::Unsupported(format!("node {node} '{}' on CUDA: {what}", nd.name))
        };
        match &nd.kind {
            NodeKind::Kernel { gpu, .. } => gpu
                .as_ref()
                .ok_or_else(|| err("no CUDA launcher attached".into()))?
                .launch(self.gpu, args),
            NodeKind::Copy { src, .. } => self.gpu.copy_d2d(
                args.output(0),
                args.input(0),
                self.graph.tensor(*src).bytes(),
            ),
            NodeKind::Gemm {
                desc,
                a,
                b,
                c,
                bias,
            } => {
                self.gpu.profile_mark(&nd.name)?;
                let g = self.graph;
                let blas = self.blas.as_ref().expect("opened when the graph has GEMMs");
                let ws = match g.gemm_workspace {
                    Some(w) => GemmWorkspace {
                        ptr: DevPtr::new(
                            self.arena.ptr::<u8>().addr
                                + self.plan.offset_at(w, node).unwrap_or(0) as u64,
                        ),
                        bytes: g.tensor(w).bytes(),
                    },
                    None => GemmWorkspace {
                        ptr: DevPtr::null(),
                        bytes: 0,
                    },
                };
                if g.tensor(*a).dtype != DType::BF16 || g.tensor(*b).dtype != DType::BF16 {
                    return Err(err("GEMM inputs must be bf16".into()));
                }
                let bias_ptr = bias.map(|_| args.inputs[2]);
                let out = g.tensor(*c).dtype;
                if bias.is_some_and(|t| g.tensor(t).dtype != out) {
                    return Err(err("GEMM bias must have C's dtype".into()));
                }
                match out {
                    DType::BF16 => blas.gemm_bf16(
                        desc,
                        args.input(0),
                        args.input(1),
                        args.output(0),
                        bias_ptr.map(DevPtr::new),
                        ws,
                    ),
                    DType::F32 => blas.gemm_bf16_f32(
                        desc,
                        args.input(0),
                        args.input(1),
                        args.output(0),
                        bias_ptr.map(DevPtr::new),
                        ws,
                    ),
                    other => Err(err(format!("GEMM output must be bf16 or f32, not {other}"))),
                }
            }
            NodeKind::HostCallback(k) => {
                if capturing {
                    return Err(err(
                        "host callbacks cannot be captured into a CUDA graph".into()
                    ));
                }
                self.host_callback(k.as_ref(), node, args)
            }
        }
    }

    /// Eager host callback: wait, download the arguments, run, upload the outputs.
    fn host_callback(
        &self,
        k: &dyn crate::graph::CpuKernel,
        node: usize,
        args: &GpuArgs,
    ) -> Result<(), RuntimeError> {
        let nd = &self.graph.nodes[node];
        let bytes = |t: TensorId| self.graph.tensor(t).bytes();
        let mut ins: Vec<Vec<u8>> = nd
            .inputs()
            .into_iter()
            .map(|t| vec![0u8; bytes(t)])
            .collect();
        let mut outs: Vec<Vec<u8>> = nd.writes.iter().map(|&t| vec![0u8; bytes(t)]).collect();
        for (buf, &addr) in ins
            .iter_mut()
            .zip(&args.inputs)
            .chain(outs.iter_mut().zip(&args.outputs))
        {
            self.gpu.download(DevPtr::new(addr), buf)?;
        }
        k.run(&mut CpuArgs {
            inputs: ins.iter().map(Vec::as_slice).collect(),
            outputs: outs.iter_mut().map(Vec::as_mut_slice).collect(),
        })?;
        for (buf, &addr) in outs.iter().zip(&args.outputs) {
            self.gpu.upload(DevPtr::new(addr), buf)?;
        }
        Ok(())
    }
}
