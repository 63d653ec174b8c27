//! `shoal`: the one binary. Each subcommand wires library crates together; no logic of its own
//! beyond argument handling and output.

mod catalog;
mod cmd_agent;
mod cmd_audit;
mod cmd_bench_model;
mod cmd_coordinator;
mod cmd_fault_proxy;
mod cmd_generate;
mod cmd_key;
mod cmd_model;
mod cmd_node;
mod cmd_serve;
mod cmd_status;
mod cmd_token;
mod cmd_up;
mod env;
mod gateway;
mod signals;
mod tls;

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
    /// Start a whole cluster on this machine (a coordinator and agents as separate processes)
    /// serving the default model over the OpenAI-compatible API, until Ctrl-C.
    Up(cmd_up::UpArgs),
    /// Run a coordinator: membership, placement, the control plane and the API gateway.
    Coordinator(cmd_coordinator::CoordinatorArgs),
    /// Run a node agent that joins a coordinator and serves what it is assigned.
    Agent(cmd_agent::AgentArgs),
    /// Show the cluster: nodes, health, capability, placement, load.
    Status(cmd_status::StatusArgs),
    /// Explain the current plan: where each model runs, the alternatives with their
    /// predicted tokens/s, and why other nodes were left out.
    Plan(cmd_status::AdminTarget),
    /// Stop sending new requests to a node; it finishes those it has.
    Drain(cmd_status::DrainArgs),
    /// Put a drained node back in service.
    Undrain(cmd_status::DrainArgs),
    /// Load generator: concurrent requests against an OpenAI-compatible API, with TTFT,
    /// inter-token and end-to-end latency percentiles, throughput, errors and bytes.
    Bench(shoal_loadgen::BenchArgs),
    /// Compare a run recorded under faults (`shoal bench --record`) with a fault-free
    /// recording: completed and identical outputs, stall at failover, detection time.
    ChaosReport(shoal_loadgen::ChaosReportArgs),
    /// Test and benchmark tool: a TCP proxy in front of one address whose traffic commands on
    /// standard input cut, heal, delay or lose (`cut`, `heal`, `delay <ms>`, `loss <percent>`,
    /// `clear`, `stats`; one answer line each). Used by `scripts/bench/chaos.sh`.
    FaultProxy(cmd_fault_proxy::FaultProxyArgs),
    /// Interactive chat against an OpenAI-compatible API (a `shoal up` cluster by default).
    Chat(shoal_loadgen::ChatArgs),
    /// The cluster's certificate authority.
    #[command(subcommand)]
    Ca(CaCommand),
    /// Join tokens for new nodes.
    #[command(subcommand)]
    Token(cmd_token::TokenCommand),
    /// Act on a node's membership (revoke).
    #[command(subcommand)]
    Node(cmd_node::NodeCommand),
    /// Generate text from a prompt on this machine, streaming tokens to stdout.
    Generate(cmd_generate::GenerateArgs),
    /// Serve a model from this machine over the OpenAI-compatible HTTP API.
    Serve(cmd_serve::ServeArgs),
    /// Fetch, inspect, synthesize and benchmark models.
    #[command(subcommand)]
    Model(cmd_model::ModelCommand),
    /// API keys of the gateway: create, list, revoke.
    #[command(subcommand)]
    Key(cmd_key::KeyCommand),
    /// The gateway's audit log.
    #[command(subcommand)]
    Audit(cmd_audit::AuditCommand),
}

#[derive(Debug, Subcommand)]
enum CaCommand {
    /// Create the cluster CA (once; later runs keep the existing one).
    Init(tls::CaInitArgs),
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
        Command::Up(args) => cmd_up::run(args),
        Command::Coordinator(args) => cmd_coordinator::run(args),
        Command::Agent(args) => cmd_agent::run(args),
        Command::Status(args) => cmd_status::run(args),
        Command::Plan(target) => cmd_status::plan(target),
        Command::Drain(args) => cmd_status::drain(args, false),
        Command::Undrain(args) => cmd_status::drain(args, true),
        Command::Ca(CaCommand::Init(args)) => tls::ca_init(args),
        Command::Token(cmd) => cmd_token::run(cmd),
        Command::Node(cmd) => cmd_node::run(cmd),
        Command::Bench(args) => {
            runtime().and_then(|rt| rt.block_on(shoal_loadgen::run_bench(args)))
        }
        Command::ChaosReport(args) => chaos_report(&args),
        Command::FaultProxy(args) => cmd_fault_proxy::run(args),
        Command::Chat(args) => runtime().and_then(|rt| {
            rt.block_on(shoal_loadgen::run_chat(
                args,
                tokio::io::BufReader::new(tokio::io::stdin()),
                tokio::io::stdout(),
            ))
        }),
        Command::Generate(args) => cmd_generate::run(args),
        Command::Model(cmd) => cmd_model::run(cmd),
        Command::Serve(args) => cmd_serve::run(args),
        Command::Key(cmd) => cmd_key::run(cmd),
        Command::Audit(cmd) => cmd_audit::run(cmd),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// `shoal chaos-report`: the report as text or JSON on stdout.
fn chaos_report(args: &shoal_loadgen::ChaosReportArgs) -> Result<()> {
    let report = shoal_loadgen::run_chaos_report(args)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.render_text());
    }
    Ok(())
}

/// Threads to compute with: the flag, else every core.
pub(crate) fn threads_or_default(threads: Option<usize>) -> usize {
    threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// The async runtime of a long-running command: two I/O threads (compute runs on the model's
/// own thread pool).
pub(crate) fn runtime() -> Result<tokio::runtime::Runtime> {
    use anyhow::Context as _;
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")
}
