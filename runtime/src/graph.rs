//! Graph IR of one static training step: tensors with a lifetime class and nodes in schedule
//! order. Built once by the models crate with [`GraphBuilder`], planned by
//! [`crate::planner`], run by [`crate::executor`].
//!
//! Argument convention for kernels and host callbacks: `inputs` are the node's `reads` that it
//! does not also write, in order; `outputs` are its `writes`, in order. A tensor that is both
//! read and written (read-modify-write, e.g. gradient accumulation) is passed as an output only.

use crate::device::{DevPtr, Gpu};
use crate::dtype::DType;
use crate::error::RuntimeError;
use crate::gemm::GemmDesc;
use std::fmt;
use std::sync::Arc;

/// Index of a tensor in [`Graph::tensors`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TensorId(pub usize);

/// How long a tensor lives, which decides its memory treatment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Lifetime {
    /// Model weights and other host-written, step-persistent tensors (also the step's inputs,
    /// e.g. token ids, which the host writes before each step). Live for the whole step.
    Weight,
    /// A forward/backward value not needed by the backward pass beyond its neighbours.
    Activation,
    /// Saved by the forward for the backward: may be kept, offloaded or recomputed.
    Saved,
    /// A gradient.
    Gradient,
    /// Optimizer moments etc. Live for the whole step.
    OptimizerState,
    /// Temporary workspace (including the GEMM workspace).
    Scratch,
}

impl Lifetime {
    /// Every class, in report order.
    pub const ALL: [Lifetime; 6] = [
        Self::Weight,
        Self::Activation,
        Self::Saved,
        Self::Gradient,
        Self::OptimizerState,
        Self::Scratch,
    ];

    /// Whether tensors of this class live for the whole step regardless of their uses.
    pub fn whole_step(self) -> bool {
        matches!(self, Self::Weight | Self::OptimizerState)
    }
}

impl fmt::Display for Lifetime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            Self::Weight => "weight",
            Self::Activation => "activation",
            Self::Saved => "saved",
            Self::Gradient => "gradient",
            Self::OptimizerState => "optimizer state",
            Self::Scratch => "scratch",
        };
        f.write_str(s)
    }
}

/// A tensor: dense, row-major `shape` of `dtype`.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub dtype: DType,
    pub lifetime: Lifetime,
    /// The graph allows the planner to recompute this tensor instead of keeping it: its
    /// producer node may be run again right before the tensor's backward use.
    pub recomputable: bool,
}

impl Tensor {
    /// Number of elements (product of the shape).
    pub fn elems(&self) -> usize {
        self.shape.iter().product()
    }
    /// Size in bytes.
    pub fn bytes(&self) -> usize {
        self.elems() * self.dtype.size()
    }
}

/// A node's arguments on the CPU backend: byte slices into the arena (see the module doc for
/// which tensors are inputs and which are outputs).
pub struct CpuArgs<'a> {
    pub inputs: Vec<&'a [u8]>,
    pub outputs: Vec<&'a mut [u8]>,
}

impl CpuArgs<'_> {
    /// Input `i` viewed as `[T]` (arena offsets are 256-byte aligned).
    pub fn input<T: bytemuck::Pod>(&self, i: usize) -> &[T] {
        bytemuck::cast_slice(self.inputs[i])
    }
    /// Output `i` viewed as `[T]`.
    pub fn output<T: bytemuck::Pod>(&mut self, i: usize) -> &mut [T] {
        bytemuck::cast_slice_mut(self.outputs[i])
    }
    /// All inputs and outputs at once, viewed as `[T]` (for kernels of one dtype).
    pub fn split<T: bytemuck::Pod>(&mut self) -> (Vec<&[T]>, Vec<&mut [T]>) {
        let ins = self
            .inputs
            .iter()
            .map(|s| bytemuck::cast_slice(s))
            .collect();
        let outs = self
            .outputs
            .iter_mut()
            .map(|s| bytemuck::cast_slice_mut(s))
            .collect();
        (ins, outs)
    }
}

/// A node's arguments on the CUDA backend: device addresses, same order as [`CpuArgs`].
#[derive(Debug, Clone, Default)]
pub struct GpuArgs {
    pub inputs: Vec<u64>,
    pub outputs: Vec<u64>,
}

impl GpuArgs {
    pub fn input<T>(&self, i: usize) -> DevPtr<T> {
        DevPtr::new(self.inputs[i])
    }
    pub fn output<T>(&self, i: usize) -> DevPtr<T> {
        DevPtr::new(self.outputs[i])
    }
}

/// A kernel's CPU implementation (the ops crate's generated CPU reference, for example).
pub trait CpuKernel: Send + Sync {
    fn run(&self, args: &mut CpuArgs<'_>) -> Result<(), RuntimeError>;
}

impl<F: Fn(&mut CpuArgs<'_>) -> Result<(), RuntimeError> + Send + Sync> CpuKernel for F {
    fn run(&self, args: &mut CpuArgs<'_>) -> Result<(), RuntimeError> {
        self(args)
    }
}

/// A kernel's CUDA launcher: enqueues work on `gpu.stream()` and nothing else (no syncs,
/// no allocation), so that it can be captured into a CUDA graph.
pub trait GpuKernel: Send + Sync {
    fn launch(&self, gpu: &Gpu, args: &GpuArgs) -> Result<(), RuntimeError>;
}

impl<F: Fn(&Gpu, &GpuArgs) -> Result<(), RuntimeError> + Send + Sync> GpuKernel for F {
    fn launch(&self, gpu: &Gpu, args: &GpuArgs) -> Result<(), RuntimeError> {
        self(gpu, args)
    }
}

/// What a node does.
#[derive(Clone)]
pub enum NodeKind {
    /// A kernel with per-backend implementations (a missing one is an executor error).
    Kernel {
        cpu: Option<Arc<dyn CpuKernel>>,
        gpu: Option<Arc<dyn GpuKernel>>,
    },
    /// `c = alpha·op(a)·op(b) + beta·c (+ bias)`, see [`GemmDesc`]. CPU: f32/f64 tensors;
    /// CUDA: bf16 a and b, bf16 or f32 c and bias. Uses the graph's GEMM workspace if any.
    Gemm {
        desc: GemmDesc,
        a: TensorId,
        b: TensorId,
        c: TensorId,
        bias: Option<TensorId>,
    },
    /// Byte copy of `src` into `dst` (same size).
    Copy { src: TensorId, dst: TensorId },
    /// Host code run in schedule order (CPU backend: on the arena; CUDA eager: on downloaded
    /// copies, with the outputs uploaded after; not capturable into a CUDA graph).
    HostCallback(Arc<dyn CpuKernel>),
}

/// One step of the schedule.
#[derive(Clone)]
pub struct Node {
    pub name: String,
    pub kind: NodeKind,
    pub reads: Vec<TensorId>,
    pub writes: Vec<TensorId>,
    /// Floating-point operations of a kernel node (attention, fused loss, ...), for the
    /// planner's time estimate ([`crate::planner::CostModel`]); GEMM nodes count their own.
    pub flops: Option<f64>,
}

impl fmt::Debug for Node {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match &self.kind {
            NodeKind::Kernel { .. } => "kernel",
            NodeKind::Gemm { .. } => "gemm",
            NodeKind::Copy { .. } => "copy",
            NodeKind::HostCallback(_) => "host",
        };
        write!(
            f,
            "{kind} {} reads {:?} writes {:?}",
            self.name, self.reads, self.writes
        )
    }
}

impl Node {
    /// A kernel node with no implementation attached yet (see [`Node::with_cpu`]/[`Node::with_gpu`]).
    pub fn kernel(name: impl Into<String>, reads: &[TensorId], writes: &[TensorId]) -> Self {
        Self {
            name: name.into(),
            kind: NodeKind::Kernel {
                cpu: None,
                gpu: None,
            },
            reads: reads.to_vec(),
            writes: writes.to_vec(),
            flops: None,
        }
    }

    /// Sets the node's FLOP count for the planner's time estimate (see [`Node::flops`]).
    pub fn with_flops(mut self, flops: f64) -> Self {
        self.flops = Some(flops);
        self
    }

    /// Attaches the CPU implementation of a kernel node (no-op for other kinds).
    pub fn with_cpu(mut self, k: impl CpuKernel + 'static) -> Self {
        if let NodeKind::Kernel { cpu, .. } = &mut self.kind {
            *cpu = Some(Arc::new(k));
        }
        self
    }

    /// Attaches the CUDA launcher of a kernel node (no-op for other kinds).
    pub fn with_gpu(mut self, k: impl GpuKernel + 'static) -> Self {
        if let NodeKind::Kernel { gpu, .. } = &mut self.kind {
            *gpu = Some(Arc::new(k));
        }
        self
    }

    /// A GEMM node; reads a, b, bias and (when beta != 0) c; writes c.
    pub fn gemm(
        name: impl Into<String>,
        desc: GemmDesc,
        a: TensorId,
        b: TensorId,
        c: TensorId,
        bias: Option<TensorId>,
    ) -> Self {
        let mut reads = vec![a, b];
        reads.extend(bias);
        if desc.beta != 0.0 {
            reads.push(c);
        }
        Self {
            name: name.into(),
            kind: NodeKind::Gemm {
                desc,
                a,
                b,
                c,
                bias,
            },
            reads,
            writes: vec![c],
            flops: None,
        }
    }

    /// A copy node.
    pub fn copy(name: impl Into<String>, src: TensorId, dst: TensorId) -> Self {
        Self {
            name: name.into(),
            kind: NodeKind::Copy { src, dst },
            reads: vec![src],
            writes: vec![dst],
            flops: None,
        }
    }

    /// A host callback node.
    pub fn host(
        name: impl Into<String>,
        reads: &[TensorId],
        writes: &[TensorId],
        f: impl CpuKernel + 'static,
    ) -> Self {
        Self {
            name: name.into(),
            kind: NodeKind::HostCallback(Arc::new(f)),
            reads: reads.to_vec(),
            writes: writes.to_vec(),
            flops: None,
        }
    }

    /// The reads that are not also written: the kernel's `inputs`, in order.
    pub fn inputs(&self) -> Vec<TensorId> {
        self.reads
            .iter()
            .copied()
            .filter(|t| !self.writes.contains(t))
            .collect()
    }
}

/// A validated graph: tensors plus nodes in schedule order.
#[derive(Clone, Debug, Default)]
pub struct Graph {
    pub tensors: Vec<Tensor>,
    pub nodes: Vec<Node>,
    /// The Scratch tensor GEMM nodes use as cuBLASLt workspace (lives for the whole step).
    pub gemm_workspace: Option<TensorId>,
}

impl Graph {
    pub fn tensor(&self, t: TensorId) -> &Tensor {
        &self.tensors[t.0]
    }

    /// Whether `t` lives for the whole step (weights, optimizer state, GEMM workspace).
    pub fn whole_step(&self, t: TensorId) -> bool {
        self.tensor(t).lifetime.whole_step() || self.gemm_workspace == Some(t)
    }

    /// Checks ids, that no node writes a tensor twice, that GEMM and copy operands agree with
    /// their descriptors, and that every non-persistent tensor is written before it is read.
    pub fn validate(&self) -> Result<(), RuntimeError> {
        let err = |s: String| Err(RuntimeError::Graph(s));
        let mut written = vec![false; self.tensors.len()];
        for (i, node) in self.nodes.iter().enumerate() {
            for t in node.reads.iter().chain(&node.writes) {
                if t.0 >= self.tensors.len() {
                    return err(format!(
                        "node {i} '{}' uses unknown tensor {}",
                        node.name, t.0
                    ));
                }
            }
            for (j, t) in node.writes.iter().enumerate() {
                if node.writes[..j].contains(t) {
                    return err(format!(
                        "node {i} '{}' writes '{}' twice",
                        node.name,
                        self.tensor(*t).name
                    ));
                }
            }
            for &t in &node.reads {
                if !written[t.0] && !self.whole_step(t) {
                    return err(format!(
                        "node {i} '{}' reads {} tensor '{}' before anything writes it",
                        node.name,
                        self.tensor(t).lifetime,
                        self.tensor(t).name
                    ));
                }
            }
            for &t in &node.writes {
                written[t.0] = true;
            }
            self.validate_operands(i, node)?;
        }
        Ok(())
    }

    fn validate_operands(&self, i: usize, node: &Node) -> Result<(), RuntimeError> {
        let elems = |t: TensorId| self.tensor(t).elems();
        match &node.kind {
            NodeKind::Gemm {
                desc,
                a,
                b,
                c,
                bias,
            } => desc
                .check_lens(elems(*a), elems(*b), elems(*c), bias.map(elems))
                .map_err(|e| RuntimeError::Graph(format!("node {i} '{}': {e}", node.name))),
            NodeKind::Copy { src, dst }
                if self.tensor(*src).bytes() != self.tensor(*dst).bytes() =>
            {
                Err(RuntimeError::Graph(format!(
                    "node {i} '{}' copies {} bytes into {} bytes",
                    node.name,
                    self.tensor(*src).bytes(),
                    self.tensor(*dst).bytes()
                )))
            }
            _ => Ok(()),
        }
    }
}

/// Builds a [`Graph`] node by node, in schedule order.
#[derive(Default)]
pub struct GraphBuilder {
    graph: Graph,
}

impl GraphBuilder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Declares a tensor.
    pub fn tensor(
        &mut self,
        name: impl Into<String>,
        shape: &[usize],
        dtype: DType,
        lifetime: Lifetime,
    ) -> TensorId {
        self.graph.tensors.push(Tensor {
            name: name.into(),
            shape: shape.to_vec(),
            dtype,
            lifetime,
            recomputable: false,
        });
        TensorId(self.graph.tensors.len() - 1)
    }

    /// The shape of a declared tensor.
    pub fn shape(&self, t: TensorId) -> &[usize] {
        &self.graph.tensors[t.0].shape
    }

    /// Allows the planner to recompute `t` (its producer is re-run before the backward use).
    pub fn mark_recomputable(&mut self, t: TensorId) -> &mut Self {
        self.graph.tensors[t.0].recomputable = true;
        self
    }

    /// Declares the GEMM workspace: a whole-step Scratch tensor of `bytes` bytes.
    pub fn gemm_workspace(&mut self, bytes: usize) -> TensorId {
        let t = self.tensor("gemm_workspace", &[bytes], DType::U8, Lifetime::Scratch);
        self.graph.gemm_workspace = Some(t);
        t
    }

    /// Nodes appended so far (the index the next one gets).
    pub fn node_count(&self) -> usize {
        self.graph.nodes.len()
    }

    /// Appends a node to the schedule; returns its index.
    pub fn node(&mut self, node: Node) -> usize {
        self.graph.nodes.push(node);
        self.graph.nodes.len() - 1
    }

    /// Validates and returns the graph.
    pub fn build(self) -> Result<Graph, RuntimeError> {
        self.graph.validate()?;
        Ok(self.graph)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builder_and_validation() {
        let mut b = GraphBuilder::new();
        let w = b.tensor("w", &[4, 4], DType::F32, Lifetime::Weight);
        let x = b.tensor("x", &[2, 4], DType::F32, Lifetime::Activation);
        let y = b.tensor("y", &[2, 4], DType::F32, Lifetime::Saved);
        b.node(Node::kernel("fill", &[], &[x]));
        b.node(Node::gemm("mm", GemmDesc::new(2, 4, 4), x, w, y, None));
        let g = b.build().unwrap();
        assert_eq!(g.nodes[1].reads, vec![x, w]);
        assert_eq!(g.tensor(y).bytes(), 32);

        let mut b = GraphBuilder::new();
        let x = b.tensor("x", &[2], DType::F32, Lifetime::Activation);
        let y = b.tensor("y", &[2], DType::F32, Lifetime::Activation);
        b.node(Node::kernel("use", &[x], &[y]));
        assert!(b
            .build()
            .unwrap_err()
            .to_string()
            .contains("before anything writes"));

        let mut b = GraphBuilder::new();
        let x = b.tensor("x", &[2, 3], DType::F32, Lifetime::Weight);
        let y = b.tensor("y", &[2, 2], DType::F32, Lifetime::Activation);
        b.node(Node::gemm("bad", GemmDesc::new(2, 2, 4), x, x, y, None));
        assert!(b.build().is_err());
    }

    #[test]
    fn inputs_exclude_read_modify_write() {
        let n = Node::kernel("acc", &[TensorId(0), TensorId(1)], &[TensorId(1)]);
        assert_eq!(n.inputs(), vec![TensorId(0)]);
    }
}
