//! The runtime's error type: every fallible runtime call returns [`RuntimeError`].

use cudarc::cublaslt::result::CublasError;
use cudarc::driver::DriverError;
use std::fmt;

/// Everything that can go wrong in the runtime. `Display` gives one readable line.
#[derive(Debug)]
pub enum RuntimeError {
    /// No usable CUDA driver library (libcuda) could be opened.
    NoDriver(String),
    /// The libcuda that was opened is the CUDA toolkit's link-time stub, not a real driver.
    StubDriver(String),
    /// The driver loaded but reports no usable GPU (or not the requested ordinal).
    NoDevice(String),
    /// The installed driver is older than the CUDA 12.4 bindings this build uses.
    DriverTooOld { found: i32, required: i32 },
    /// A CUDA driver API call failed.
    Driver(DriverError),
    /// cuBLASLt could not be opened.
    NoCublasLt(String),
    /// A cuBLASLt call failed; the string names the call.
    Cublas(String, CublasError),
    /// NVRTC was needed (FTRT_KERNEL_DIR) and is missing, or compilation failed.
    Nvrtc(String),
    /// A module or function could not be found or loaded.
    Module(String),
    /// Reading a file failed.
    Io(String),
    /// A caller passed something inconsistent (shapes, lengths, dtypes).
    InvalidArgument(String),
    /// The graph is malformed (unknown tensor, read before write, ...).
    Graph(String),
    /// The planned step cannot fit in the VRAM budget, even with every saved tensor offloaded,
    /// or its offload in the host's memory.
    DoesNotFit(String),
    /// The executor met a node it cannot run on this backend.
    Unsupported(String),
}

impl fmt::Display for RuntimeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoDriver(s) => write!(f, "no CUDA driver: {s}"),
            Self::StubDriver(s) => write!(f, "CUDA driver is a stub library: {s}"),
            Self::NoDevice(s) => write!(f, "no CUDA device: {s}"),
            Self::DriverTooOld { found, required } => write!(
                f,
                "CUDA driver too old: it supports CUDA {}.{}, this build needs {}.{} or newer",
                found / 1000,
                (found % 1000) / 10,
                required / 1000,
                (required % 1000) / 10
            ),
            Self::Driver(e) => write!(f, "CUDA driver error: {e}"),
            Self::NoCublasLt(s) => write!(f, "cuBLASLt unavailable: {s}"),
            Self::Cublas(call, e) => write!(f, "cuBLASLt error in {call}: {e}"),
            Self::Nvrtc(s) => write!(f, "NVRTC: {s}"),
            Self::Module(s) => write!(f, "kernel module: {s}"),
            Self::Io(s) => write!(f, "I/O: {s}"),
            Self::InvalidArgument(s) => write!(f, "invalid argument: {s}"),
            Self::Graph(s) => write!(f, "graph: {s}"),
            Self::DoesNotFit(s) => write!(f, "does not fit: {s}"),
            Self::Unsupported(s) => write!(f, "unsupported: {s}"),
        }
    }
}

impl std::error::Error for RuntimeError {}

impl From<DriverError> for RuntimeError {
    fn from(e: DriverError) -> Self {
        Self::Driver(e)
    }
}
