//! The CPU backend: runs a planned graph on a host arena with the nodes' CPU kernels and the
//! CPU GEMM, performing the offload schedule's copies (to a host-side "pinned pool") in order,
//! so that plans with offloads and recomputes are checked end to end on any machine.

use std::ops::Range;

use super::{arg_ranges, check_phase, final_offset, recomputes_before, ArgRange};
use crate::dtype::DType;
use crate::error::RuntimeError;
use crate::gemm::cpu::gemm;
use crate::graph::{CpuArgs, Graph, NodeKind, TensorId};
use crate::offload::{schedule, Action, OffloadSchedule};
use crate::planner::Plan;

/// Runs steps of one planned graph on the CPU.
pub struct CpuExecutor<'g> {
    graph: &'g Graph,
    plan: &'g Plan,
    schedule: OffloadSchedule,
    recomputes: Vec<Vec<usize>>,
    /// The arena as u64 words, so every 256-byte aligned offset is 8-byte aligned.
    arena: Vec<u64>,
    host: Vec<u8>,
}

impl<'g> CpuExecutor<'g> {
    /// Allocates the (zeroed) arena and host pool of `plan`.
    pub fn new(graph: &'g Graph, plan: &'g Plan) -> Self {
        Self {
            graph,
            plan,
            schedule: schedule(plan),
            recomputes: recomputes_before(plan),
            arena: vec![0; plan.arena_bytes.div_ceil(8)],
            host: vec![0; plan.host_bytes],
        }
    }

    fn bytes(&self) -> &[u8] {
        bytemuck::cast_slice(&self.arena)
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        bytemuck::cast_slice_mut(&mut self.arena)
    }

    fn region(&self, t: TensorId) -> Result<(usize, usize), RuntimeError> {
        let off = final_offset(self.plan, t).ok_or_else(|| {
            RuntimeError::InvalidArgument(format!(
                "tensor '{}' is never on the device",
                self.graph.tensor(t).name
            ))
        })?;
        Ok((off, self.graph.tensor(t).bytes()))
    }

    /// The bytes of `t` in its last arena region. Reliable after a step for whole-step
    /// tensors (weights, optimizer state); others may have been overwritten by later tensors.
    pub fn tensor(&self, t: TensorId) -> Result<&[u8], RuntimeError> {
        let (off, len) = self.region(t)?;
        Ok(&self.bytes()[off..off + len])
    }

    /// `t` copied out as `T` elements.
    pub fn read<T: bytemuck::Pod>(&self, t: TensorId) -> Result<Vec<T>, RuntimeError> {
        let bytes = self.tensor(t)?;
        let n = bytes.len() / std::mem::size_of::<T>();
        let mut out = vec![T::zeroed(); n];
        bytemuck::cast_slice_mut::<T, u8>(&mut out)
            .copy_from_slice(&bytes[..n * std::mem::size_of::<T>()]);
        Ok(out)
    }

    /// Writes `data` into `t` (e.g. weights and step inputs before a step).
    pub fn write<T: bytemuck::Pod>(&mut self, t: TensorId, data: &[T]) -> Result<(), RuntimeError> {
        let (off, len) = self.region(t)?;
        let src: &[u8] = bytemuck::cast_slice(data);
        if src.len() != len {
            return Err(RuntimeError::InvalidArgument(format!(
                "tensor '{}' has {len} bytes, got {}",
                self.graph.tensor(t).name,
                src.len()
            )));
        }
        self.bytes_mut()[off..off + len].copy_from_slice(src);
        Ok(())
    }

    /// Runs one step.
    pub fn run_step(&mut self) -> Result<(), RuntimeError> {
        self.run_nodes(0..self.plan.num_nodes)
    }

    /// Runs the nodes `nodes` of the step only (one phase of the graph; see [`super`]).
    pub fn run_nodes(&mut self, nodes: Range<usize>) -> Result<(), RuntimeError> {
        check_phase(self.plan, &nodes)?;
        for n in nodes {
            self.copies(n, true);
            for k in 0..self.recomputes[n].len() {
                self.run_node(self.recomputes[n][k], n)?;
            }
            self.run_node(n, n)?;
            self.copies(n, false);
        }
        Ok(())
    }

    /// Offload copies happen immediately on the CPU; events are no-ops.
    fn copies(&mut self, n: usize, before: bool) {
        let Self {
            schedule,
            arena,
            host,
            ..
        } = self;
        let arena: &mut [u8] = bytemuck::cast_slice_mut(arena);
        let actions = if before {
            &schedule.before[n]
        } else {
            &schedule.after[n]
        };
        for a in actions {
            match *a {
                Action::CopyToHost {
                    device,
                    host: h,
                    bytes,
                    ..
                } => host[h..h + bytes].copy_from_slice(&arena[device..device + bytes]),
                Action::CopyToDevice {
                    device,
                    host: h,
                    bytes,
                    ..
                } => arena[device..device + bytes].copy_from_slice(&host[h..h + bytes]),
                _ => {}
            }
        }
    }

    fn run_node(&mut self, node: usize, time: usize) -> Result<(), RuntimeError> {
        let (g, nd) = (self.graph, &self.graph.nodes[node]);
        let (ins, outs) = arg_ranges(g, self.plan, node, time);
        let err = |what: &str| {
            RuntimeError::Unsupported(format!(
                "node {node} '{}' on the CPU backend: {what}",
                nd.name
            ))
        };
        match &nd.kind {
            NodeKind::Kernel { cpu, .. } => {
                let k = cpu.as_ref().ok_or_else(|| err("no CPU kernel attached"))?;
                k.run(&mut self.args(&ins, &outs))
            }
            NodeKind::HostCallback(k) => k.run(&mut self.args(&ins, &outs)),
            NodeKind::Copy { .. } => {
                let (src, dst) = (ins[0], outs[0]);
                self.bytes_mut()
                    .copy_within(src.offset..src.offset + src.bytes, dst.offset);
                Ok(())
            }
            NodeKind::Gemm {
                desc,
                a,
                b,
                c,
                bias,
            } => {
                let dt = g.tensor(*a).dtype;
                let same = [*b, *c]
                    .iter()
                    .chain(bias)
                    .all(|t| g.tensor(*t).dtype == dt);
                // Operands in the node's input order: a, b, then bias (c is an output).
                let mut args = self.args(&ins, &outs);
                let bias_idx = bias.map(|_| 2);
                match dt {
                    DType::F32 if same => {
                        let (i, mut o) = args.split::<f32>();
                        gemm(desc, i[0], i[1], o[0], bias_idx.map(|k| i[k]))
                    }
                    DType::F64 if same => {
                        let (i, mut o) = args.split::<f64>();
                        gemm(desc, i[0], i[1], o[0], bias_idx.map(|k| i[k]))
                    }
                    _ => {
                        // bf16 / f32 operands, as on the GPU: f32 arithmetic, c stored in its
                        // dtype (bf16 rounded to nearest even)
                        let dtypes: Vec<DType> = [*a, *b]
                            .iter()
                            .chain(bias)
                            .map(|t| g.tensor(*t).dtype)
                            .collect();
                        let cdt = g.tensor(*c).dtype;
                        if let Some(bad) = dtypes
                            .iter()
                            .chain([&cdt])
                            .find(|d| !matches!(d, DType::BF16 | DType::F32))
                        {
                            return Err(err(&format!(
                                "CPU GEMM takes f32, f64 or bf16 / f32 operands, not {bad}"
                            )));
                        }
                        let ins32: Vec<Vec<f32>> = dtypes
                            .iter()
                            .zip(&args.inputs)
                            .map(|(d, x)| to_f32(*d, x))
                            .collect();
                        let mut c32 = to_f32(cdt, args.outputs[0]);
                        gemm(
                            desc,
                            &ins32[0],
                            &ins32[1],
                            &mut c32,
                            bias_idx.map(|k| ins32[k].as_slice()),
                        )?;
                        from_f32(cdt, &c32, args.outputs[0]);
                        Ok(())
                    }
                }
            }
        }
    }

    /// Disjoint slices of the arena for one node's arguments.
    fn args(&mut self, ins: &[ArgRange], outs: &[ArgRange]) -> CpuArgs<'_> {
        let all: Vec<(ArgRange, bool)> = ins
            .iter()
            .map(|r| (*r, false))
            .chain(outs.iter().map(|r| (*r, true)))
            .collect();
        for (i, (a, aw)) in all.iter().enumerate() {
            for (b, bw) in &all[i + 1..] {
                let overlap = a.offset < b.offset + b.bytes && b.offset < a.offset + a.bytes;
                assert!(
                    !(overlap && (*aw || *bw)),
                    "planner gave a node overlapping arguments"
                );
            }
        }
        let len = self.arena.len() * 8;
        assert!(all.iter().all(|(r, _)| r.offset + r.bytes <= len));
        let base = self.arena.as_mut_ptr() as *mut u8;
        // SAFETY: every range is inside the arena (checked), and no output overlaps any other
        // argument (checked), so the shared and exclusive slices never alias mutably. They
        // borrow `self` mutably for the lifetime of the returned value.
        unsafe {
            CpuArgs {
                inputs: ins
                    .iter()
                    .map(|r| std::slice::from_raw_parts(base.add(r.offset), r.bytes) as &[u8])
                    .collect(),
                outputs: outs
                    .iter()
                    .map(|r| std::slice::from_raw_parts_mut(base.add(r.offset), r.bytes))
                    .collect(),
            }
        }
    }
}

/// A bf16 or f32 tensor's values as f32.
fn to_f32(dtype: DType, bytes: &[u8]) -> Vec<f32> {
    match dtype {
        DType::BF16 => bytemuck::cast_slice::<u8, half::bf16>(bytes)
            .iter()
            .map(|v| v.to_f32())
            .collect(),
        _ => bytemuck::cast_slice::<u8, f32>(bytes).to_vec(),
    }
}

/// Stores f32 values into a bf16 (rounded to nearest even) or f32 tensor.
fn from_f32(dtype: DType, values: &[f32], bytes: &mut [u8]) {
    match dtype {
        DType::BF16 => {
            for (d, v) in bytemuck::cast_slice_mut::<u8, half::bf16>(bytes)
                .iter_mut()
                .zip(values)
            {
                *d = half::bf16::from_f32(*v);
            }
        }
        _ => bytemuck::cast_slice_mut::<u8, f32>(bytes).copy_from_slice(values),
    }
}
