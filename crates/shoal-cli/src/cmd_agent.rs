//! `shoal agent`: one machine joining a cluster and serving what the coordinator assigns it.

use crate::catalog;
use crate::tls::TlsArgs;
use anyhow::{Context, Result};
use clap::Args;
use shoal_engine::EngineConfig;
use shoal_net::Role;
use shoal_net::{JoinToken, RenewableIdentity, TlsMaterial};
use shoal_node::{Agent, AgentConfig, EnrollConfig, ModelFile, Renewal};
use shoal_types::{ModelId, NodeId};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};
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
    /// Room for other nodes' KV-cache checkpoints, in MiB (default: 512, or an eighth of
    /// --memory-mib when that is smaller). Not counted in the memory given to models.
    #[arg(long)]
    pub checkpoint_store_mib: Option<u64>,
    /// Skip the start-up micro-benchmark (the planner then assumes this node is slow).
    #[arg(long)]
    pub no_benchmark: bool,
    #[command(flatten)]
    pub tls: TlsArgs,
    #[command(flatten)]
    pub keys: crate::cmd_model::ModelKeyArgs,
    /// A join token from `shoal token create`: enroll this node (a key pair made here, a
    /// certificate signed by the coordinator) instead of using TLS material from disk.
    #[arg(
        long,
        env = crate::env::SHOAL_JOIN_TOKEN,
        hide_env_values = true,
        requires = "data_dir",
        conflicts_with_all = ["tls_dir", "insecure_plaintext"]
    )]
    pub join_token: Option<String>,
    /// Where an enrolled node keeps its certificate, key (mode 0600) and CA. A later start
    /// uses them, and renews them, without a token.
    #[arg(long, conflicts_with_all = ["tls_dir", "insecure_plaintext"])]
    pub data_dir: Option<PathBuf>,
    /// The coordinator's enrollment listener (default: the --join host, port + 1).
    #[arg(long)]
    pub enroll_addr: Option<String>,
    /// Stop when standard input closes (set by `shoal up` so no process outlives it).
    #[arg(long, hide = true)]
    pub exit_on_stdin_eof: bool,
}

/// The enrollment listener's default address: the coordinator's host, port + 1.
fn default_enroll_addr(join: &str) -> Result<String> {
    let (host, port) = join
        .rsplit_once(':')
        .and_then(|(h, p)| Some((h, p.parse::<u16>().ok()?.checked_add(1)?)))
        .ok_or_else(|| anyhow::anyhow!("--join {join:?} is not host:port"))?;
    Ok(format!("{host}:{port}"))
}

/// Host names and addresses for this node's certificate.
fn cert_hosts(args: &AgentArgs) -> Vec<String> {
    let mut hosts = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
    if !args.listen.ip().is_unspecified() {
        hosts.push(args.listen.ip().to_string());
    }
    if let Some((host, _)) = args.advertise.as_deref().and_then(|a| a.rsplit_once(':')) {
        hosts.push(
            host.trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned(),
        );
    }
    hosts.extend(args.tls.cert_hosts.iter().cloned());
    hosts.sort();
    hosts.dedup();
    hosts
}

/// Material in `dir` that still names `name` and has not expired, if any.
fn usable_material(dir: &Path, name: &str) -> Option<TlsMaterial> {
    if !dir.join(shoal_net::NODE_CERT_FILE).exists() {
        return None;
    }
    let material = match TlsMaterial::load(dir) {
        Ok(m) => m,
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "stored certificate unusable");
            return None;
        }
    };
    let identity = RenewableIdentity::new(material.clone()).ok()?;
    let cert = identity.certificate();
    (cert.identity.node_id == name && cert.not_after > SystemTime::now()).then_some(material)
}

/// The renewing identity of an enrolled node: from `--data-dir`, or enrolled now with the
/// token (and saved there).
async fn enrolled(args: &AgentArgs, dir: &Path, name: &str) -> Result<Renewal> {
    let hosts = cert_hosts(args);
    let material = match (usable_material(dir, name), &args.join_token) {
        (Some(m), token) => {
            if token.is_some() {
                eprintln!(
                    "agent {name}: already enrolled (certificate in {}); the join token is not used",
                    dir.display()
                );
            }
            m
        }
        (None, None) => anyhow::bail!(
            "no usable certificate for {name} in {}; enroll with --join-token",
            dir.display()
        ),
        (None, Some(token)) => {
            let token: JoinToken = token.parse().context("reading --join-token")?;
            let enroll_addr = match &args.enroll_addr {
                Some(a) => a.clone(),
                None => default_enroll_addr(&args.join)?,
            };
            let material = shoal_node::enroll(&EnrollConfig {
                enroll_addr: enroll_addr.clone(),
                token,
                node_id: NodeId::new(name),
                hosts: hosts.clone(),
                connect_timeout: Duration::from_secs(10),
            })
            .await
            .with_context(|| format!("enrolling {name} at {enroll_addr}"))?;
            material
                .save(dir)
                .with_context(|| format!("saving the certificate in {}", dir.display()))?;
            eprintln!(
                "agent {name}: enrolled; certificate saved in {}",
                dir.display()
            );
            material
        }
    };
    Ok(Renewal {
        identity: RenewableIdentity::new(material)?,
        save_to: Some(dir.to_owned()),
        hosts,
    })
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
    let runtime = crate::runtime()?;
    let renewal = match &args.data_dir {
        Some(dir) => Some(runtime.block_on(enrolled(&args, dir, &name))?),
        None => None,
    };
    let tls = match &renewal {
        Some(r) => r.identity.mode(),
        None => args.tls.mode(Role::Agent, &name)?,
    };
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
        checkpoint_store: args.checkpoint_store_mib.map(|m| m << 20),
        benchmark: !args.no_benchmark,
        model_keys: args.keys.provider()?,
    };
    runtime.block_on(async move {
        let cancel = CancellationToken::new();
        let agent = match renewal {
            Some(r) => Agent::start_renewing(cfg, r, cancel.clone()).await,
            None => Agent::start(cfg, cancel.clone()).await,
        }
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
