//! `ftrt`: fine-tune LLMs with fused, ahead-of-time compiled kernels.
use clap::{Parser, Subcommand};
use std::process::ExitCode;

mod selftest;

#[derive(Parser)]
#[command(name = "ftrt", version, about = "Fine-tune LLMs faster and in less GPU memory: LoRA/QLoRA SFT, one binary, no Python")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the GPU this machine has (or why none is usable).
    Info,
    /// Check every kernel and the runtime on the GPU against the CPU references.
    Selftest(selftest::SelftestArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Info => selftest::info(),
        Command::Selftest(args) => selftest::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
