//! ftrt-runtime: the thin runtime under the kernels. Index of modules:
//!
//! - [`cpu_rows`]: row-parallel loops for the CPU references (`FTRT_CPU_THREADS`).
//! - [`device`]: CUDA device, kernel modules, [`DevPtr`], allocations and copies
//!   ([`driver_probe`]: clear errors instead of loader panics; [`kernel_source`]:
//!   `FTRT_KERNEL_DIR` overrides compiled with NVRTC).
//! - [`gemm`]: the GEMM interface, CPU (`matrixmultiply`) and cuBLASLt backends.
//! - [`graph`]: the training-step graph IR and its builder.
//! - [`planner`]: liveness, arena offsets, budget decisions (keep / offload / recompute).
//! - [`offload`]: the activation offload schedule and the pinned-memory copy engine.
//! - [`executor`]: CPU and CUDA executors (CUDA graph capture and replay).
//! - [`selftest`]: GPU checks of this crate (`ftrt selftest --runtime`).
//! - [`synthetic`], [`rng`]: synthetic graphs, a trivial PTX kernel and a seeded PRNG for
//!   tests and the selftest.

pub mod cpu_rows;
pub mod device;
pub mod driver_probe;
pub mod dtype;
pub mod error;
pub mod executor;
pub mod gemm;
pub mod graph;
pub mod kernel_source;
pub mod offload;
pub mod planner;
pub mod profile;
pub mod rng;
pub mod selftest;
pub mod synthetic;

pub use device::{cudarc, DevPtr, DeviceBuffer, DeviceInfo, Gpu, PtxModule};
pub use dtype::DType;
pub use error::RuntimeError;
pub use executor::{CpuExecutor, CudaExecutor};
pub use gemm::cublaslt::{CublasLt, GemmWorkspace};
pub use gemm::GemmDesc;
pub use graph::{
    CpuArgs, CpuKernel, GpuArgs, GpuKernel, Graph, GraphBuilder, Lifetime, Node, TensorId,
};
pub use planner::{plan, Plan, PlanOptions};
pub use profile::{format_table, ProfileRow};
pub use selftest::{selftest_runtime, SelftestRow};
