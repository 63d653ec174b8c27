//! `shoal`: the one binary. Each subcommand wires library crates together; no logic of its own
//! beyond argument handling and output.

mod catalog;
mod cmd_bench_model;
mod cmd_generate;
mod cmd_model;
mod cmd_serve;
mod env;

use anyhow::Result;
use clap::{Parser, Subcommand};

/// shoal: distributed inference of small language models on edge machines.
#[derive(Debug, Parser)]
#[command(name = "shoal", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Generate text from a prompt on this machine, streaming tokens to stdout.
    Generate(cmd_generate::GenerateArgs),
    /// Serve a model from this machine over the OpenAI-compatible HTTP API.
    Serve(cmd_serve::ServeArgs),
    /// Fetch, inspect, synthesize and benchmark models.
    #[command(subcommand)]
    Model(cmd_model::ModelCommand),
}

fn main() -> std::process::ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_env(env::SHOAL_LOG)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result: Result<()> = match cli.command {
        Command::Generate(args) => cmd_generate::run(args),
        Command::Model(cmd) => cmd_model::run(cmd),
        Command::Serve(args) => cmd_serve::run(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Threads to compute with: the flag, else every core.
pub(crate) fn threads_or_default(threads: Option<usize>) -> usize {
    threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}
