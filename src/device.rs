//! The device a command runs on: `FTRT_DEVICE` = `cpu` | `gpu` | `auto` (default: the GPU when
//! one opens, else the CPU).

use ftrt_runtime::Gpu;

/// The GPU `FTRT_DEVICE` asks for: `None` for the CPU backend (asked for, or `auto` without a
/// usable GPU); an error when `gpu` is asked for and none opens.
pub fn requested_gpu() -> Result<Option<Gpu>, String> {
    let device = std::env::var("FTRT_DEVICE").unwrap_or_else(|_| "auto".into());
    match device.as_str() {
        "cpu" => Ok(None),
        "gpu" => Gpu::open(0)
            .map(Some)
            .map_err(|e| format!("FTRT_DEVICE=gpu: {e}")),
        "auto" | "" => Ok(Gpu::open(0).ok()),
        other => Err(format!(
            "FTRT_DEVICE must be cpu, gpu or auto, not {other:?}"
        )),
    }
}
