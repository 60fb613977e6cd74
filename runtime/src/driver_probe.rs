//! Checks, before cudarc touches the driver, that a real CUDA driver and a GPU are there.
//!
//! cudarc panics when it cannot dlopen a library, so every entry point into CUDA goes through
//! [`probe_driver`] first and gets one clear [`RuntimeError`] line instead.
//!
//! Stub libraries: cudarc dlopens `libcuda.so` before `libcuda.so.1`. The CUDA toolkit ships a
//! link-time stub `libcuda.so` in `.../lib64/stubs`; when that directory is on
//! `LD_LIBRARY_PATH` the stub wins over the driver's `libcuda.so.1`. The stub's `cuInit` returns
//! `CUDA_ERROR_STUB_LIBRARY` (34); we turn that into [`RuntimeError::StubDriver`] naming the file
//! that was loaded (read from `/proc/self/maps`) and how to fix the search path.

use crate::error::RuntimeError;
use cudarc::driver::{result, sys, DriverError};

/// Oldest driver API version (`cuDriverGetVersion` encoding) the `cuda-12040` bindings need.
pub const REQUIRED_DRIVER_VERSION: i32 = 12040;

/// Opens libcuda, initialises it and checks the driver version and that `ordinal` exists.
/// Returns the driver version (e.g. 13000 for CUDA 13.0).
pub fn probe_driver(ordinal: usize) -> Result<i32, RuntimeError> {
    // SAFETY: only dlopens candidate library names; no symbol is called.
    if !unsafe { sys::is_culib_present() } {
        return Err(RuntimeError::NoDriver(
            "libcuda.so / libcuda.so.1 not found on the library search path \
             (no NVIDIA driver installed?); use the CPU backend"
                .into(),
        ));
    }
    match result::init() {
        Ok(()) => {}
        Err(DriverError(sys::CUresult::CUDA_ERROR_STUB_LIBRARY)) => {
            return Err(RuntimeError::StubDriver(format!(
                "cuInit returned CUDA_ERROR_STUB_LIBRARY; loaded {}. Remove the toolkit's \
                 'stubs' directory from LD_LIBRARY_PATH so the driver's libcuda.so.1 is used",
                loaded_libcuda_paths()
            )))
        }
        Err(DriverError(sys::CUresult::CUDA_ERROR_NO_DEVICE)) => {
            return Err(RuntimeError::NoDevice(
                "the driver loaded but reports no CUDA-capable device (CUDA_ERROR_NO_DEVICE)"
                    .into(),
            ))
        }
        Err(e) => return Err(RuntimeError::NoDevice(format!("cuInit failed: {e}"))),
    }
    let mut version = 0i32;
    // SAFETY: writes one c_int through a valid pointer.
    unsafe { sys::cuDriverGetVersion(&mut version) }.result()?;
    if version < REQUIRED_DRIVER_VERSION {
        return Err(RuntimeError::DriverTooOld {
            found: version,
            required: REQUIRED_DRIVER_VERSION,
        });
    }
    let count = result::device::get_count()?;
    if ordinal >= count.max(0) as usize {
        return Err(RuntimeError::NoDevice(format!(
            "GPU ordinal {ordinal} requested, the driver sees {count} device(s)"
        )));
    }
    Ok(version)
}

/// Checks that cuBLASLt can be opened, so that cudarc's loader cannot panic later.
pub fn probe_cublaslt() -> Result<(), RuntimeError> {
    // SAFETY: only dlopens candidate library names.
    if unsafe { cudarc::cublaslt::sys::is_culib_present() } {
        Ok(())
    } else {
        Err(RuntimeError::NoCublasLt(
            "libcublasLt.so (or .so.12/.so.11) not found on the library search path; \
             a libcublasLt.so.13 alone needs a libcublasLt.so symlink next to it"
                .into(),
        ))
    }
}

/// Checks that NVRTC can be opened (needed only when FTRT_KERNEL_DIR is set).
pub fn probe_nvrtc() -> Result<(), RuntimeError> {
    // SAFETY: only dlopens candidate library names.
    if unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        Ok(())
    } else {
        Err(RuntimeError::Nvrtc(
            "FTRT_KERNEL_DIR is set but libnvrtc.so was not found on the library search path"
                .into(),
        ))
    }
}

/// The libcuda files mapped into this process, for error messages.
fn loaded_libcuda_paths() -> String {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    let mut paths: Vec<&str> = maps
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .filter(|p| p.contains("libcuda.so"))
        .collect();
    paths.dedup();
    if paths.is_empty() {
        "an unknown libcuda".into()
    } else {
        paths.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_driver_is_an_error_not_a_panic() {
        // On a machine with a GPU this opens it; without one it must return an error line.
        match probe_driver(0) {
            Ok(v) => assert!(v >= REQUIRED_DRIVER_VERSION),
            Err(e) => assert!(!e.to_string().contains('\n'), "one line: {e}"),
        }
    }
}
