//! Measures (prints, never asserts) the per-call latency of a unary `Node.Status` call over
//! loopback: mutual TLS with the authorization layer, mutual TLS without it (to isolate the
//! layer's cost), and plaintext with the layer (version check only).
//!
//! Run with `cargo run --release -p shoal-net --example latency [calls]`.

use anyhow::Context as _;
use shoal_net::{
    AccessPolicy, AuthLayer, ClusterCa, ConnectOptions, PeerIdentity, Revocations, Role, TlsMode,
    connect, node_client, server_builder,
};
use shoal_proto::v1::node_server::{Node, NodeServer};
use shoal_proto::v1::{self, GenerateEvent, GenerateRequest, StatusRequest, StatusResponse};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};

const WARMUP: usize = 200;
const STEP: Duration = Duration::from_secs(10);

struct Echo;

#[tonic::async_trait]
impl Node for Echo {
    type GenerateStream = futures::stream::Empty<Result<GenerateEvent, Status>>;

    async fn generate(
        &self,
        _: Request<GenerateRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        Err(Status::unimplemented("latency probe"))
    }

    async fn status(&self, _: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        Ok(Response::new(StatusResponse {
            node_id: "probe".to_owned(),
            ..Default::default()
        }))
    }

    async fn push_checkpoint(
        &self,
        _: Request<tonic::Streaming<v1::KvChunk>>,
    ) -> Result<Response<v1::PushCheckpointReply>, Status> {
        Err(Status::unimplemented("latency probe"))
    }

    type FetchCheckpointStream = futures::stream::Empty<Result<v1::KvChunk, Status>>;

    async fn fetch_checkpoint(
        &self,
        _: Request<v1::FetchCheckpointRequest>,
    ) -> Result<Response<Self::FetchCheckpointStream>, Status> {
        Err(Status::unimplemented("latency probe"))
    }

    async fn drop_checkpoint(
        &self,
        _: Request<v1::DropCheckpointRequest>,
    ) -> Result<Response<v1::DropCheckpointReply>, Status> {
        Err(Status::unimplemented("latency probe"))
    }

    async fn retarget_checkpoint(
        &self,
        _: Request<v1::RetargetCheckpointRequest>,
    ) -> Result<Response<v1::RetargetCheckpointReply>, Status> {
        Err(Status::unimplemented("latency probe"))
    }
}

async fn serve(mode: &TlsMode, with_auth: bool) -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let incoming = TcpIncoming::from(listener);
    let svc = NodeServer::new(Echo);
    if with_auth {
        let layer = AuthLayer::new(mode, AccessPolicy::shoal_default(), Revocations::new())?;
        let router = server_builder(mode)?.layer(layer).add_service(svc);
        tokio::spawn(router.serve_with_incoming(incoming));
    } else {
        let router = server_builder(mode)?.add_service(svc);
        tokio::spawn(router.serve_with_incoming(incoming));
    }
    Ok(addr)
}

/// Per-call latencies in microseconds, sorted.
async fn measure(
    server_mode: &TlsMode,
    client_mode: &TlsMode,
    with_auth: bool,
    calls: usize,
) -> anyhow::Result<Vec<f64>> {
    let addr = serve(server_mode, with_auth).await?;
    let channel = tokio::time::timeout(
        STEP,
        connect(&addr.to_string(), client_mode, ConnectOptions::default()),
    )
    .await
    .context("connect hung")??;
    let mut client = node_client(channel, STEP);
    let mut samples = Vec::with_capacity(calls);
    for i in 0..WARMUP + calls {
        let start = Instant::now();
        tokio::time::timeout(STEP, client.status(StatusRequest {}))
            .await
            .context("a Status call hung")??;
        if i >= WARMUP {
            samples.push(start.elapsed().as_secs_f64() * 1e6);
        }
    }
    samples.sort_by(f64::total_cmp);
    Ok(samples)
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(idx).copied().unwrap_or(f64::NAN)
}

/// Prints one line of figures and returns the median, which background load disturbs far
/// less than the mean on a shared machine.
fn report(name: &str, s: &[f64]) -> f64 {
    let mean = s.iter().sum::<f64>() / s.len() as f64;
    println!(
        "{name:<28} mean {mean:>7.1} µs   p50 {:>7.1}   p90 {:>7.1}   p99 {:>7.1}   max {:>8.1}",
        pct(s, 0.5),
        pct(s, 0.9),
        pct(s, 0.99),
        pct(s, 1.0)
    );
    pct(s, 0.5)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let calls: usize = match std::env::args().nth(1) {
        Some(n) => n.parse().context("calls must be a number")?,
        None => 2000,
    };
    let ca = ClusterCa::generate("bench")?;
    let hosts = ["127.0.0.1".to_owned()];
    let issue = |role, node: &str| -> anyhow::Result<TlsMode> {
        let id = PeerIdentity::new("bench", role, node)?;
        let issued = ca.issue(&id, &hosts, Duration::from_secs(3600))?;
        Ok(TlsMode::Mtls(issued.into_material(ca.cert_pem())))
    };
    let server = issue(Role::Agent, "server")?;
    let client = issue(Role::Coordinator, "client")?;

    println!(
        "{calls} sequential unary Node.Status calls over 127.0.0.1 after {WARMUP} warm-up calls"
    );
    let tls_auth = measure(&server, &client, true, calls).await?;
    let tls_bare = measure(&server, &client, false, calls).await?;
    let plain = measure(&TlsMode::Plaintext, &TlsMode::Plaintext, true, calls).await?;
    let a = report("mTLS + authorization", &tls_auth);
    let b = report("mTLS, no authorization", &tls_bare);
    let c = report("plaintext + version check", &plain);
    println!(
        "medians: mTLS+auth / plaintext = {:.2}x   authorization layer ≈ {:.1} µs per call",
        a / c,
        a - b
    );
    Ok(())
}
