//! Where a kernel module's code comes from: the PTX embedded at build time, or, when
//! `FTRT_KERNEL_DIR` holds `<module>.cu`, that edited source compiled with NVRTC at start.

use crate::device::PtxModule;
use crate::driver_probe::probe_nvrtc;
use crate::error::RuntimeError;
use cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions, Ptx};
use std::path::{Path, PathBuf};

/// Environment variable naming a directory of edited `.cu` files that override embedded PTX.
pub const KERNEL_DIR_ENV: &str = "FTRT_KERNEL_DIR";
/// Environment variable with extra NVRTC include directories (`:`-separated), e.g. CUDA headers.
pub const CUDA_INCLUDE_ENV: &str = "FTRT_CUDA_INCLUDE";

/// The override source path for `module`, if `FTRT_KERNEL_DIR` is set and holds `<name>.cu`.
pub fn override_path(module: &PtxModule) -> Option<PathBuf> {
    let dir = std::env::var_os(KERNEL_DIR_ENV)?;
    let path = PathBuf::from(dir).join(format!("{}.cu", module.name));
    path.is_file().then_some(path)
}

/// The PTX to load for `module`: NVRTC's compilation of `source` (its override, from
/// [`override_path`]) when there is one, else the embedded PTX.
pub fn module_ptx(module: &PtxModule, source: Option<&Path>) -> Result<Ptx, RuntimeError> {
    let Some(path) = source else {
        return Ok(Ptx::from_src(module.ptx));
    };
    probe_nvrtc()?;
    let src = std::fs::read_to_string(path)
        .map_err(|e| RuntimeError::Io(format!("{}: {e}", path.display())))?;
    let include_paths = std::env::var(CUDA_INCLUDE_ENV)
        .map(|v| {
            v.split(':')
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect()
        })
        .unwrap_or_default();
    let opts = CompileOptions {
        arch: Some(module.arch),
        include_paths,
        name: Some(format!("{}.cu", module.name)),
        ..Default::default()
    };
    compile_ptx_with_opts(src, opts).map_err(|e| {
        let detail = match &e {
            cudarc::nvrtc::CompileError::CompileError { log, .. } => {
                log.to_string_lossy().into_owned()
            }
            other => other.to_string(),
        };
        RuntimeError::Nvrtc(format!("compiling {}: {detail}", path.display()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    static M: PtxModule = PtxModule {
        name: "no_such_module_for_tests",
        arch: "compute_80",
        ptx: "// ptx",
        cuda_source: "// cu",
        cubins: &[],
    };

    #[test]
    fn no_override_without_a_file() {
        // Whatever FTRT_KERNEL_DIR holds, it has no file for this made-up module name.
        assert!(override_path(&M).is_none());
    }
}
