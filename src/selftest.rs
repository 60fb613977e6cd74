//! `ftrt info` and `ftrt selftest`: the GPU against the CPU references.
use ftrt_runtime::selftest::{format_rows, SelftestRow};
use ftrt_runtime::Gpu;

#[derive(clap::Args)]
pub struct SelftestArgs {
    /// Only the kernels (every op at real sizes against its CPU reference).
    #[arg(long)]
    kernels: bool,
    /// Only the runtime (GEMM, offload, graph replay).
    #[arg(long)]
    runtime: bool,
    /// GPU ordinal.
    #[arg(long, default_value_t = 0)]
    device: usize,
}

pub fn info() -> Result<(), String> {
    let gpu = Gpu::open(0).map_err(|e| e.to_string())?;
    println!("{}", gpu.info());
    Ok(())
}

pub fn run(args: &SelftestArgs) -> Result<(), String> {
    let gpu =
        Gpu::open(args.device).map_err(|e| format!("{e}\nftrt selftest needs an NVIDIA GPU."))?;
    println!("{}", gpu.info());
    let both = !args.kernels && !args.runtime;
    let mut rows: Vec<SelftestRow> = Vec::new();
    let mut failed = Vec::new();
    if args.kernels || both {
        match ftrt_ops::selftest::selftest_kernels(&gpu) {
            Ok(r) => rows.extend(r),
            Err(e) => failed.push(e.to_string()),
        }
        match ftrt_ops::attention::selftest(&gpu) {
            Ok(r) => rows.extend(r.into_iter().map(|(name, err, ms)| SelftestRow {
                name,
                max_rel_err: err,
                time_us: ms * 1e3,
                detail: String::new(),
            })),
            Err(e) => failed.push(format!("attention: {e}")),
        }
    }
    if args.runtime || both {
        match ftrt_runtime::selftest_runtime(&gpu) {
            Ok(r) => rows.extend(r),
            Err(e) => failed.push(format!("runtime: {e}")),
        }
    }
    print!("{}", format_rows(&rows));
    if failed.is_empty() {
        println!("selftest: all {} checks passed", rows.len());
        Ok(())
    } else {
        Err(format!("selftest failed:\n  {}", failed.join("\n  ")))
    }
}
