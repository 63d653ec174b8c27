//! HTTPS for the gateway: a PEM certificate chain and key, rustls on the ring provider, and a
//! listener that runs TLS handshakes concurrently under a deadline, so a slow or silent client
//! cannot stall accepting and a plaintext client is simply disconnected.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use crate::metrics::Metrics;

/// A handshake not finished after this long is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at most; beyond this the listener stops accepting until one ends.
pub const MAX_PENDING_HANDSHAKES: usize = 256;

/// The gateway's certificate chain and private key, as PEM files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The certificate chain, leaf first.
    pub cert: PathBuf,
    /// The private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// Why the gateway's TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("reading {}: {source}", path.display())]
    Io {
        /// Which file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The certificate file holds no PEM certificate.
    #[error("{} holds no PEM certificate", path.display())]
    NoCertificate {
        /// Which file.
        path: PathBuf,
    },
    /// The key file holds no usable PEM private key.
    #[error("{} holds no PEM private key: {detail}", path.display())]
    NoKey {
        /// Which file.
        path: PathBuf,
        /// The parser's complaint.
        detail: String,
    },
    /// rustls refused the pair (for instance the key does not match the certificate).
    #[error("the certificate and key cannot be used: {0}")]
    Rustls(#[from] rustls::Error),
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Io {
        path: path.to_owned(),
        source,
    })
}

/// Loads `files` into a server configuration (TLS 1.2 and 1.3, HTTP/1.1 by ALPN).
pub(crate) fn server_config(files: &TlsFiles) -> Result<Arc<ServerConfig>, TlsError> {
    let cert_pem = read(&files.cert)?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .filter_map(Result::ok)
        .collect();
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: files.cert.clone(),
        });
    }
    let key_pem = read(&files.key)?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| TlsError::NoKey {
        path: files.key.clone(),
        detail: e.to_string(),
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

type Handshake = Option<(TlsStream<TcpStream>, SocketAddr)>;

/// A TCP listener that yields connections once their TLS handshake is done.
pub(crate) struct TlsListener {
    tcp: TcpListener,
    acceptor: TlsAcceptor,
    pending: JoinSet<Handshake>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for TlsListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsListener")
            .field("addr", &self.tcp.local_addr().ok())
            .field("pending", &self.pending.len())
            .finish_non_exhaustive()
    }
}

impl TlsListener {
    pub(crate) fn new(tcp: TcpListener, config: Arc<ServerConfig>, metrics: Arc<Metrics>) -> Self {
        Self {
            tcp,
            acceptor: TlsAcceptor::from(config),
            pending: JoinSet::new(),
            metrics,
        }
    }

    fn start_handshake(&mut self, stream: TcpStream, addr: SocketAddr) {
        // Token frames are small; waiting for delayed ACKs would add latency to every one.
        let _ = stream.set_nodelay(true);
        let acceptor = self.acceptor.clone();
        let metrics = self.metrics.clone();
        self.pending.spawn(async move {
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => Some((tls, addr)),
                Ok(Err(e)) => {
                    metrics.tls_handshake_failure();
                    tracing::debug!(%addr, error = %e, "TLS handshake failed");
                    None
                }
                Err(_) => {
                    metrics.tls_handshake_failure();
                    tracing::debug!(%addr, "TLS handshake timed out");
                    None
                }
            }
        });
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let room = self.pending.len() < MAX_PENDING_HANDSHAKES;
            tokio::select! {
                accepted = self.tcp.accept(), if room => match accepted {
                    Ok((stream, addr)) => self.start_handshake(stream, addr),
                    Err(e) if is_connection_error(&e) => {}
                    Err(e) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        tracing::error!(error = %e, "accepting a connection failed");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                },
                Some(done) = self.pending.join_next(), if !self.pending.is_empty() => {
                    if let Ok(Some(connection)) = done {
                        return connection;
                    }
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}

fn is_connection_error(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::ConnectionRefused
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::ConnectionReset
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap
mod tests {
    use super::*;

    #[test]
    fn missing_and_bad_files_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("cert.pem");
        let key = dir.path().join("key.pem");
        let files = TlsFiles {
            cert: cert.clone(),
            key: key.clone(),
        };
        assert!(matches!(server_config(&files), Err(TlsError::Io { .. })));
        std::fs::write(&cert, "not pem").unwrap();
        assert!(matches!(
            server_config(&files),
            Err(TlsError::NoCertificate { .. })
        ));
        let generated = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        std::fs::write(&cert, generated.cert.pem()).unwrap();
        std::fs::write(&key, "nothing").unwrap();
        assert!(matches!(server_config(&files), Err(TlsError::NoKey { .. })));
        let other = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        std::fs::write(&key, other.signing_key.serialize_pem()).unwrap();
        assert!(matches!(server_config(&files), Err(TlsError::Rustls(_))));
        std::fs::write(&key, generated.signing_key.serialize_pem()).unwrap();
        assert!(server_config(&files).is_ok());
    }
}
