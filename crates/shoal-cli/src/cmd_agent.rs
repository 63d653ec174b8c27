//! `shoal agent`: one machine joining a cluster and serving what the coordinator assigns it.

use crate::catalog;
use crate::tls::TlsArgs;
use anyhow::{Context, Result};
use clap::Args;
use shoal_engine::EngineConfig;
use shoal_net::Role;
use shoal_node::{Agent, AgentConfig, ModelFile};
use shoal_types::{ModelId, NodeId};
use std::net::SocketAddr;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// How long in-flight generations may run on after a stop is asked for.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Arguments of `shoal agent`.
#[derive(Debug, Args)]
pub struct AgentArgs {
    /// The coordinator's gRPC address (host:port).
    #[arg(long)]
    pub join: String,
    /// This node's name in the cluster (default: the host name).
    #[arg(long)]
    pub name: Option<String>,
    /// Model files this node holds: catalogue names or GGUF paths (repeatable).
    #[arg(long = "model", default_values_t = [catalog::DEFAULT_MODEL.to_owned()])]
    pub models: Vec<String>,
    /// Where the data plane (gRPC) listens.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,
    /// The data-plane address peers should dial, if not the listening one (NAT, containers).
    #[arg(long)]
    pub advertise: Option<String>,
    /// Where the node's HTTP endpoint (metrics, health, OpenAI API for its models) listens.
    #[arg(long)]
    pub http: Option<SocketAddr>,
    /// Compute threads (default: every core).
    #[arg(long, env = crate::env::SHOAL_THREADS)]
    pub threads: Option<usize>,
    /// Sequences decoded together at most.
    #[arg(long, default_value_t = 16)]
    pub max_batch: usize,
    /// Completion length when a request gives none.
    #[arg(long, default_value_t = 256)]
    pub default_max_tokens: u32,
    /// Memory this node may give to models, in MiB (default: what the OS reports available).
    #[arg(long)]
    pub memory_mib: Option<u64>,
    /// Skip the start-up micro-benchmark (the planner then assumes this node is slow).
    #[arg(long)]
    pub no_benchmark: bool,
    #[command(flatten)]
    pub tls: TlsArgs,
    /// Stop when standard input closes (set by `shoal up` so no process outlives it).
    #[arg(long, hide = true)]
    pub exit_on_stdin_eof: bool,
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "node".to_owned())
}

/// Runs an agent until Ctrl-C, SIGTERM or (with `--exit-on-stdin-eof`) stdin's end.
pub fn run(args: AgentArgs) -> Result<()> {
    let name = args.name.clone().unwrap_or_else(host_name);
    shoal_control::check_node_id(&name)
        .map_err(|why| anyhow::anyhow!("invalid node name {name:?}: {why}"))?;
    let mut models = Vec::new();
    for m in &args.models {
        let r = catalog::resolve_model(m, true)?;
        models.push(ModelFile {
            id: ModelId::new(&r.name),
            path: r.path,
            sha256: r.sha256,
            bytes: r.bytes,
        });
    }
    let tls = args.tls.mode(Role::Agent, &name)?;
    let cfg = AgentConfig {
        node_id: NodeId::new(&name),
        coordinator: args.join.clone(),
        tls,
        data_listen: args.listen,
        advertise_addr: args.advertise.clone(),
        http_listen: args.http,
        models,
        threads: crate::threads_or_default(args.threads),
        engine: EngineConfig {
            max_active: args.max_batch,
            ..EngineConfig::default()
        },
        default_max_tokens: args.default_max_tokens,
        memory_budget: args.memory_mib.map(|m| m << 20),
        benchmark: !args.no_benchmark,
    };
    let runtime = crate::runtime()?;
    runtime.block_on(async move {
        let cancel = CancellationToken::new();
        let agent = Agent::start(cfg, cancel.clone())
            .await
            .with_context(|| format!("starting agent {name}"))?;
        println!(
            "agent {name}: data plane {}{} · joining {}",
            agent.data_addr(),
            agent
                .http_addr()
                .map(|a| format!(" · http://{a}"))
                .unwrap_or_default(),
            args.join
        );
        crate::signals::until_stopped(
            args.exit_on_stdin_eof,
            std::future::pending::<Result<(), std::io::Error>>(),
        )
        .await?;
        eprintln!("agent {name}: leaving the cluster");
        agent.shutdown(SHUTDOWN_GRACE).await?;
        Ok(())
    })
}
