//! A real gateway in process: shoal-api's router over shoal-node's `LocalBackend` serving a
//! tiny random-weight model on 127.0.0.1:0.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use shoal_api::{ApiConfig, ApiState};
use shoal_engine::EngineConfig;
use shoal_model::Model;
use shoal_node::{LocalBackend, LocalBackendConfig};
use shoal_types::ModelId;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Bound on every await in these tests.
pub const WAIT: Duration = Duration::from_secs(120);

pub struct Gateway {
    /// Base URL including `/v1`.
    pub url: String,
    pub stop: CancellationToken,
    _dir: tempfile::TempDir,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Starts a gateway admitting `max_in_flight` generations at once.
pub async fn start_gateway(max_in_flight: usize) -> Gateway {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    shoal_synth::write_model(&shoal_synth::SynthSpec::tiny_llama(), &path).unwrap();
    let model = Arc::new(Model::open(&path).unwrap());
    let cfg = LocalBackendConfig {
        model_id: ModelId::new("tiny"),
        threads: 1,
        engine: EngineConfig::default(),
        default_max_tokens: 16,
    };
    let backend = Arc::new(LocalBackend::start(model, cfg).unwrap());
    let stop = CancellationToken::new();
    let api = ApiConfig {
        max_in_flight,
        ..ApiConfig::default()
    };
    let state = ApiState::try_new(api, backend, stop.clone()).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/v1", listener.local_addr().unwrap());
    tokio::spawn(shoal_api::serve(
        listener,
        shoal_api::router(state),
        stop.clone(),
    ));
    Gateway {
        url,
        stop,
        _dir: dir,
    }
}
