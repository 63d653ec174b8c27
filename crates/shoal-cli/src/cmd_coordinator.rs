//! `shoal coordinator`: membership, placement, the control plane and the OpenAI gateway.

use crate::catalog;
use crate::gateway::GatewayArgs;
use crate::tls::TlsArgs;
use anyhow::{Context, Result};
use clap::Args;
use shoal_api::ApiConfig;
use shoal_cluster::{ClusterBackendConfig, Coordinator, CoordinatorOptions};
use shoal_control::CoordinatorConfig;
use shoal_net::Role;
use shoal_types::ModelId;
use std::net::SocketAddr;
use std::path::PathBuf;
use tokio_util::sync::CancellationToken;

/// Arguments of `shoal coordinator`.
#[derive(Debug, Args)]
pub struct CoordinatorArgs {
    /// Where clients reach the OpenAI-compatible API.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Where agents and operators reach the gRPC services.
    #[arg(long, default_value = "127.0.0.1:7070")]
    pub grpc_listen: SocketAddr,
    /// Models the cluster serves: catalogue names or GGUF paths (repeatable).
    #[arg(long = "model", default_values_t = [catalog::DEFAULT_MODEL.to_owned()])]
    pub models: Vec<String>,
    /// A TOML configuration file (leases, pins, replicas, store); flags override it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// A silent node is declared dead after this many milliseconds.
    #[arg(long)]
    pub lease_ms: Option<u64>,
    /// Agents heartbeat this often (milliseconds).
    #[arg(long)]
    pub heartbeat_ms: Option<u64>,
    /// Replicas per model (default: every node with room).
    #[arg(long)]
    pub replicas: Option<usize>,
    /// The state database (redb); default: in memory.
    #[arg(long)]
    pub store: Option<PathBuf>,
    /// A generation whose node sends nothing for this many milliseconds (after its first
    /// token) moves to another replica; it must outlast the slowest node's longest step.
    #[arg(long, default_value_t = 10_000)]
    pub stall_timeout_ms: u64,
    /// The same bound before a generation's first token, which waits for any queue ahead of
    /// it and then for its prefill (each prefill chunk's progress restarts the count).
    #[arg(long, default_value_t = 60_000)]
    pub first_token_timeout_ms: u64,
    /// Moves to another replica after a node lost work on a generation (it computed part of
    /// it, no token came, and no checkpoint kept it), at most: a request that keeps killing
    /// its node fails after this many.
    #[arg(long, default_value_t = 3)]
    pub max_failovers: usize,
    /// Moves of one generation at most, counting those that cost it nothing (after tokens,
    /// with a checkpoint, or from a node's queue).
    #[arg(long, default_value_t = 16)]
    pub max_moves: usize,
    /// Checkpoint each generation's KV cache to another ready replica every this many
    /// positions (0: off), so a failover resumes from the checkpoint instead of prefilling
    /// the whole context again. Pays for long contexts on links faster than the prefill.
    #[arg(long, default_value_t = 0)]
    pub checkpoint_every: u32,
    /// Generation requests in flight at most; more get 429.
    #[arg(long, default_value_t = 256)]
    pub max_in_flight: usize,
    #[command(flatten)]
    pub tls: TlsArgs,
    #[command(flatten)]
    pub gateway: GatewayArgs,
    /// The key of encrypted models: the coordinator decrypts them into memory once, to read
    /// their shape for placement.
    #[command(flatten)]
    pub keys: crate::cmd_model::ModelKeyArgs,
    /// Enroll new nodes with join tokens on this address (TLS that authenticates the
    /// coordinator only; `Enroll` is the one call it serves). Needs the cluster CA's key.
    #[arg(long)]
    pub enroll_listen: Option<SocketAddr>,
    /// Directory with the cluster CA (`ca.crt`, `ca.key`) that signs enrolled nodes'
    /// certificates. Default: `$SHOAL_HOME/cluster`.
    #[arg(long, requires = "enroll_listen")]
    pub ca_dir: Option<PathBuf>,
    /// Lifetime of the certificates signed for enrolled nodes (they renew at 2/3).
    #[arg(long, default_value = "24h", value_parser = crate::cmd_token::parse_duration)]
    pub cert_validity: std::time::Duration,
    /// Stop when standard input closes (set by `shoal up` so no process outlives it).
    #[arg(long, hide = true)]
    pub exit_on_stdin_eof: bool,
}

/// Runs a coordinator until Ctrl-C, SIGTERM or (with `--exit-on-stdin-eof`) stdin's end.
pub fn run(args: CoordinatorArgs) -> Result<()> {
    let mut config = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            CoordinatorConfig::from_toml_str(&text)
                .with_context(|| format!("parsing {}", path.display()))?
        }
        None => CoordinatorConfig::default(),
    };
    if let Some(v) = args.lease_ms {
        config.lease_ms = v;
    }
    if let Some(v) = args.heartbeat_ms {
        config.heartbeat_interval_ms = v;
    }
    if args.replicas.is_some() {
        config.replicas = args.replicas;
    }
    if args.store.is_some() {
        config.store_path = args.store.clone();
    }
    let keys = args.keys.provider()?;
    for name in &args.models {
        let m = catalog::resolve_model(name, true)?;
        // Opened as an agent opens it: the sidecar manifest checked, an encrypted file
        // decrypted into memory (and dropped once described).
        let (model, _) = crate::cmd_model::open(&m.path, keys.as_deref(), None)?;
        let spec = shoal_cluster::spec_of(ModelId::new(&m.name), model.file(), m.sha256)
            .with_context(|| format!("describing {}", m.path.display()))?;
        drop(model);
        config.models.retain(|existing| existing.id != spec.id);
        config.models.push(spec);
    }
    let config = config.validate()?;
    let tls = args.tls.mode(Role::Coordinator, "coordinator")?;
    let enrollment = match args.enroll_listen {
        None => None,
        Some(listen) => {
            let dir = args
                .ca_dir
                .clone()
                .or_else(|| args.tls.cluster_dir.clone())
                .unwrap_or_else(|| catalog::shoal_home().join("cluster"));
            let ca = shoal_net::ClusterCa::load(&dir)
                .with_context(|| format!("loading the cluster CA from {}", dir.display()))?;
            Some(shoal_cluster::EnrollmentOptions {
                ca: std::sync::Arc::new(ca),
                listen,
                cert_validity: args.cert_validity,
                token_ttl: shoal_cluster::enroll::DEFAULT_TOKEN_TTL,
            })
        }
    };
    let runtime = crate::runtime()?;
    runtime.block_on(async move {
        let cancel = CancellationToken::new();
        let opts = CoordinatorOptions {
            config,
            tls,
            grpc_listen: args.grpc_listen,
            api: {
                let mut api = ApiConfig {
                    bind: args.listen,
                    max_in_flight: args.max_in_flight,
                    ..ApiConfig::default()
                };
                args.gateway
                    .apply(&mut api, args.tls.cluster_dir.as_deref());
                api
            },
            backend: ClusterBackendConfig {
                stall_timeout: std::time::Duration::from_millis(args.stall_timeout_ms.max(1)),
                first_token_timeout: std::time::Duration::from_millis(
                    args.first_token_timeout_ms.max(1),
                ),
                checkpoint_every: args.checkpoint_every,
                max_failovers: args.max_failovers,
                max_moves: args.max_moves,
                ..ClusterBackendConfig::default()
            },
        };
        let mut coordinator =
            Coordinator::start_with_enrollment(opts, enrollment, cancel.clone()).await?;
        println!(
            "coordinator: gRPC {} · API {}://{}/v1{}",
            coordinator.grpc_addr(),
            args.gateway.scheme(),
            coordinator.http_addr(),
            coordinator
                .enroll_addr()
                .map(|a| format!(" · enrollment {a}"))
                .unwrap_or_default()
        );
        crate::signals::until_stopped(args.exit_on_stdin_eof, coordinator.wait()).await?;
        eprintln!("coordinator: stopping");
        coordinator.shutdown().await?;
        Ok(())
    })
}
