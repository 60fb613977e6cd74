//! `ftrt`: fine-tune LLMs with fused, ahead-of-time compiled kernels.
use clap::{Parser, Subcommand};
use std::process::ExitCode;

mod bench;
mod bench_graph;
mod bench_init;
mod device;
mod export;
mod generate;
mod generate_graph;
mod plan;
mod selftest;
mod train;

#[derive(Parser)]
#[command(
    name = "ftrt",
    version,
    about = "Fine-tune LLMs faster and in less GPU memory: LoRA/QLoRA SFT, one binary, no Python"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Fine-tune a LoRA adapter (default: SmolLM2-135M-Instruct on the bundled arithmetic data).
    Train(Box<train::TrainArgs>),
    /// Generate text from a model (HF folder or GGUF), optionally with a LoRA adapter.
    Generate(generate::GenerateArgs),
    /// Merge a LoRA adapter into its base model and save it: a Hugging Face folder (safetensors) or a GGUF file for llama.cpp.
    Export(export::ExportArgs),
    /// Print the memory plan of a training step (peak, keep/offload/recompute) before loading anything.
    Plan(plan::PlanArgs),
    /// Print the GPU this machine has (or why none is usable).
    Info,
    /// LoRA training throughput on random weights of a preset shape (tokens/s, memory, MFU).
    Bench(bench::BenchArgs),
    /// Check every kernel and the runtime on the GPU against the CPU references.
    Selftest(selftest::SelftestArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Train(args) => train::run(args),
        Command::Generate(args) => generate::run(args),
        Command::Export(args) => export::run(args),
        Command::Plan(args) => plan::run(args),
        Command::Info => selftest::info(),
        Command::Bench(args) => bench::run(args),
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
