//! `shoal serve`: one machine serving one model over the OpenAI-compatible API.

use crate::catalog;
use crate::gateway::GatewayArgs;
use anyhow::{Context, Result};
use clap::Args;
use shoal_api::{ApiConfig, ApiState};
use shoal_engine::EngineConfig;
use shoal_node::{LocalBackend, LocalBackendConfig};
use shoal_types::ModelId;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// Arguments of `shoal serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Model name from the catalogue, or a path to a GGUF file.
    #[arg(long, default_value = catalog::DEFAULT_MODEL)]
    model: String,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Compute threads (default: every core).
    #[arg(long, env = crate::env::SHOAL_THREADS)]
    threads: Option<usize>,
    /// Sequences decoded together at most.
    #[arg(long, default_value_t = 16)]
    max_batch: usize,
    /// Requests in flight at most; more get 429.
    #[arg(long, default_value_t = 64)]
    max_in_flight: usize,
    /// Completion length when a request gives none.
    #[arg(long, default_value_t = 256)]
    default_max_tokens: u32,
    #[command(flatten)]
    keys: crate::cmd_model::ModelKeyArgs,
    /// Manifest to check the model file against (default: `<file>.manifest.json` if present).
    #[arg(long)]
    manifest: Option<std::path::PathBuf>,
    #[command(flatten)]
    gateway: GatewayArgs,
}

/// Runs `shoal serve` until Ctrl-C.
pub fn run(args: ServeArgs) -> Result<()> {
    let path = catalog::resolve(&args.model, true)?;
    let keys = args.keys.provider()?;
    let (model, _) = crate::cmd_model::open(&path, keys.as_deref(), args.manifest.as_deref())?;
    let model = Arc::new(model);
    let model_id = ModelId::new(catalog::model_name(&args.model, &path));
    let cfg = LocalBackendConfig {
        model_id: model_id.clone(),
        threads: crate::threads_or_default(args.threads),
        engine: EngineConfig {
            max_active: args.max_batch,
            ..EngineConfig::default()
        },
        default_max_tokens: args.default_max_tokens,
    };
    let backend = Arc::new(LocalBackend::start(model, cfg).map_err(|e| anyhow::anyhow!("{e}"))?);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let stop = CancellationToken::new();
        let mut api = ApiConfig {
            bind: args.listen,
            max_in_flight: args.max_in_flight,
            ..ApiConfig::default()
        };
        args.gateway.apply(&mut api, None);
        let state = ApiState::try_new(api, backend.clone(), stop.clone())
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("listening on {}", args.listen))?;
        let addr = listener.local_addr()?;
        let scheme = args.gateway.scheme();
        println!("serving {model_id} at {scheme}://{addr}/v1 (OpenAI-compatible); Ctrl-C stops");
        let server = tokio::spawn(shoal_api::serve_gateway(listener, state, stop.clone()));
        tokio::signal::ctrl_c()
            .await
            .context("waiting for Ctrl-C")?;
        eprintln!("stopping: finishing requests in flight");
        stop.cancel();
        server
            .await
            .context("the server task failed")?
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        backend.drain().await;
        Ok(())
    })
}
