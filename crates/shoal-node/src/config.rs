//! The agent's configuration and its errors.

use shoal_net::{NetError, Role, TlsMode};
use shoal_types::{ModelId, NodeId};
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;

/// A model file on this node's disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelFile {
    /// The name the model has in the cluster.
    pub id: ModelId,
    /// Where the GGUF file is.
    pub path: PathBuf,
    /// sha256 of the file, lower-case hex (the coordinator assigns shards by it).
    pub sha256: String,
    /// File size in bytes.
    pub bytes: u64,
}

/// Everything an [`crate::Agent`] needs to run.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// This node's name in the cluster.
    pub node_id: NodeId,
    /// `host:port` of the coordinator's gRPC endpoint.
    pub coordinator: String,
    /// Transport security: mTLS with material whose certificate names [`Role::Agent`], or
    /// plaintext (development only).
    pub tls: TlsMode,
    /// Where the data-plane gRPC service (`shoal.v1.Node`) listens; port 0 picks one.
    pub data_listen: SocketAddr,
    /// `host:port` the coordinator and peers reach the data plane at; defaults to the bound
    /// address.
    pub advertise_addr: Option<String>,
    /// Where `/metrics`, `/healthz`, `/readyz` and the OpenAI API for this node's models
    /// listen, if anywhere.
    pub http_listen: Option<SocketAddr>,
    /// Model files on this node's disk.
    pub models: Vec<ModelFile>,
    /// Compute threads per loaded shard.
    pub threads: usize,
    /// Engine limits per loaded shard.
    pub engine: shoal_engine::EngineConfig,
    /// Completion length when a request gives none.
    pub default_max_tokens: u32,
    /// Reported instead of the measured available memory (imitates a weaker device).
    pub memory_budget: Option<u64>,
    /// Bytes of other nodes' KV checkpoints this node keeps at most; `None`: 512 MiB, or an
    /// eighth of `memory_budget` when that is smaller.
    pub checkpoint_store: Option<u64>,
    /// Whether to run the capability micro-benchmark of every model at start.
    pub benchmark: bool,
    /// Keys for encrypted model files (decrypted into memory only); `None` refuses them.
    pub model_keys: Option<std::sync::Arc<dyn shoal_model::KeyProvider>>,
}

/// One problem with an [`AgentConfig`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigProblem {
    /// `threads` is 0.
    ZeroThreads,
    /// `default_max_tokens` is 0.
    ZeroMaxTokens,
    /// The engine would admit no sequence or no token per step.
    EngineLimits,
    /// Two model files claim the same model id.
    DuplicateModel(ModelId),
    /// A model file does not exist.
    MissingModelFile(PathBuf),
    /// The coordinator address is not `host:port`.
    CoordinatorAddress(String),
    /// The advertised address is not `host:port`.
    AdvertiseAddress(String),
    /// The TLS certificate names a role other than agent.
    TlsRole(Role),
}

impl fmt::Display for ConfigProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigProblem::ZeroThreads => write!(f, "threads must be at least 1"),
            ConfigProblem::ZeroMaxTokens => write!(f, "default_max_tokens must be at least 1"),
            ConfigProblem::EngineLimits => write!(
                f,
                "engine max_active, max_waiting and step_tokens must be at least 1"
            ),
            ConfigProblem::DuplicateModel(id) => write!(f, "model {id} is listed twice"),
            ConfigProblem::MissingModelFile(p) => {
                write!(f, "model file {} does not exist", p.display())
            }
            ConfigProblem::CoordinatorAddress(a) => {
                write!(f, "coordinator address {a:?} is not host:port")
            }
            ConfigProblem::AdvertiseAddress(a) => {
                write!(f, "advertised address {a:?} is not host:port")
            }
            ConfigProblem::TlsRole(r) => write!(
                f,
                "the agent's certificate names role {}, it must name agent",
                r.as_str()
            ),
        }
    }
}

/// Why the agent could not start or stop cleanly.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The configuration has problems (all of them listed).
    #[error("invalid agent configuration: {}", join_problems(problems))]
    InvalidConfig {
        /// Every problem found.
        problems: Vec<ConfigProblem>,
    },
    /// A listener could not be bound.
    #[error("binding {what} on {addr}")]
    Bind {
        /// Which listener.
        what: &'static str,
        /// Where.
        addr: SocketAddr,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The transport could not be set up (TLS material, coordinator endpoint).
    #[error("setting up the transport")]
    Net(#[from] NetError),
    /// The HTTP gateway could not be set up or failed while serving.
    #[error("the HTTP endpoint failed")]
    Http(#[from] shoal_api::ApiError),
    /// The gRPC server failed while serving.
    #[error("the data-plane gRPC server failed")]
    Grpc(#[source] tonic::transport::Error),
    /// A background task panicked or was aborted.
    #[error("the agent's {what} task ended abnormally")]
    Task {
        /// Which task.
        what: &'static str,
        /// The join error.
        #[source]
        source: tokio::task::JoinError,
    },
}

fn join_problems(problems: &[ConfigProblem]) -> String {
    problems
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// Whether `addr` looks like `host:port` (a bracketed IPv6 literal is allowed).
pub(crate) fn is_host_port(addr: &str) -> bool {
    let Some((host, port)) = addr.rsplit_once(':') else {
        return false;
    };
    !host.is_empty()
        && !addr.chars().any(|c| c.is_whitespace() || c.is_control())
        && port.parse::<u16>().is_ok()
}

impl AgentConfig {
    /// Checks the configuration, reporting every problem together.
    pub fn validate(&self) -> Result<(), AgentError> {
        let mut problems = Vec::new();
        if self.threads == 0 {
            problems.push(ConfigProblem::ZeroThreads);
        }
        if self.default_max_tokens == 0 {
            problems.push(ConfigProblem::ZeroMaxTokens);
        }
        let e = &self.engine;
        if e.max_active == 0 || e.max_waiting == 0 || e.step_tokens == 0 {
            problems.push(ConfigProblem::EngineLimits);
        }
        let mut seen = std::collections::BTreeSet::new();
        for m in &self.models {
            if !seen.insert(m.id.clone()) {
                problems.push(ConfigProblem::DuplicateModel(m.id.clone()));
            }
            if !m.path.is_file() {
                problems.push(ConfigProblem::MissingModelFile(m.path.clone()));
            }
        }
        if !is_host_port(&self.coordinator) {
            problems.push(ConfigProblem::CoordinatorAddress(self.coordinator.clone()));
        }
        if let Some(a) = &self.advertise_addr
            && !is_host_port(a)
        {
            problems.push(ConfigProblem::AdvertiseAddress(a.clone()));
        }
        if let TlsMode::Mtls(m) = &self.tls {
            let id = m.identity()?;
            if id.role != Role::Agent {
                problems.push(ConfigProblem::TlsRole(id.role));
            }
            if id.node_id != self.node_id.as_str() {
                tracing::warn!(
                    certificate = %id.node_id,
                    node = %self.node_id,
                    "the agent's certificate names another node id"
                );
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(AgentError::InvalidConfig { problems })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port_shapes() {
        for ok in ["127.0.0.1:7070", "coord.lan:1", "[::1]:7070"] {
            assert!(is_host_port(ok), "{ok}");
        }
        for bad in ["", "host", ":80", "host:", "host:99999", "a b:1"] {
            assert!(!is_host_port(bad), "{bad}");
        }
    }
}
