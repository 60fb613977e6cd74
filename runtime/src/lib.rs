//! ftrt-runtime: the thin runtime under the kernels. Index of modules:
//!
//! - [`device`]: CUDA device, kernel modules, [`DevPtr`], allocations and copies.
//! - [`gemm`]: the GEMM interface, CPU (`matrixmultiply`) and cuBLASLt backends.
//! - [`graph`]: the training-step graph IR and its builder.
//! - [`planner`]: liveness, arena offsets, budget decisions (keep / offload / recompute).
//! - [`offload`]: the activation offload schedule and the pinned-memory copy engine.
//! - [`executor`]: CPU and CUDA executors (CUDA graph capture and replay).
//! - [`selftest`]: GPU checks of this crate (`ftrt selftest --runtime`).

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
pub mod rng;
pub mod synthetic;

pub use device::{cudarc, DevPtr, DeviceBuffer, DeviceInfo, Gpu, PtxModule};
pub use dtype::DType;
pub use error::RuntimeError;
pub use gemm::GemmDesc;
