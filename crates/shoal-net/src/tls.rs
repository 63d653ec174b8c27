//! TLS modes and the two ends of a link: a tonic server that demands a client certificate
//! from the cluster CA, and a channel that presents one and checks the server's. Mutual TLS
//! is the default everywhere; plaintext exists for development and says so loudly each time
//! it is used.
//!
//! Besides the chain and the server name, the client checks that the server's certificate
//! names a peer of its own cluster (and, when asked, of a given role), so an agent cannot pose
//! as the coordinator just because its certificate is signed by the same CA.

use crate::error::NetError;
use crate::identity::{CertificateInfo, PeerIdentity, Role};
use crate::pki::{CA_CERT_FILE, pem_certificates, read_file, warn_if_key_exposed, write_file};
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use std::fmt;
use std::path::Path;
use std::sync::{Arc, Once};
use std::time::Duration;
use tonic::transport::{
    Certificate, Channel, ClientTlsConfig, Endpoint, Identity, Server, ServerTlsConfig,
};

/// File name of a peer's certificate inside a material directory.
pub const NODE_CERT_FILE: &str = "node.crt";
/// File name of a peer's private key inside a material directory (mode 0600).
pub const NODE_KEY_FILE: &str = "node.key";

/// A TLS handshake that takes longer than this is abandoned (slow or hostile peer).
pub(crate) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// HTTP/2 pings find dead links that TCP would keep open for minutes.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// A ping unanswered this long closes the connection.
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// What a peer needs for mutual TLS: the cluster CA, its own certificate and key (PEM).
#[derive(Clone, PartialEq, Eq)]
pub struct TlsMaterial {
    /// The cluster CA certificate: the only trust anchor.
    pub ca_pem: String,
    /// This peer's certificate, issued by the cluster CA.
    pub cert_pem: String,
    /// This peer's private key.
    pub key_pem: String,
}

impl fmt::Debug for TlsMaterial {
    // The private key stays out of logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsMaterial")
            .field("identity", &self.identity().ok())
            .finish_non_exhaustive()
    }
}

impl TlsMaterial {
    /// The identity this peer's own certificate names.
    pub fn identity(&self) -> Result<PeerIdentity, NetError> {
        let der = pem_certificates(&self.cert_pem).into_iter().next().ok_or(
            NetError::NotACertificate {
                what: "the peer certificate",
            },
        )?;
        Ok(CertificateInfo::from_der(&der)?.identity)
    }

    /// Writes `ca.crt`, `node.crt` and `node.key` (mode 0600) into `dir`, creating it.
    pub fn save(&self, dir: &Path) -> Result<(), NetError> {
        std::fs::create_dir_all(dir).map_err(|source| NetError::Io {
            action: "creating",
            path: dir.to_owned(),
            source,
        })?;
        write_file(&dir.join(NODE_KEY_FILE), &self.key_pem, 0o600)?;
        write_file(&dir.join(NODE_CERT_FILE), &self.cert_pem, 0o644)?;
        write_file(&dir.join(CA_CERT_FILE), &self.ca_pem, 0o644)
    }

    /// Loads material written by [`TlsMaterial::save`] and checks it names a shoal peer.
    pub fn load(dir: &Path) -> Result<TlsMaterial, NetError> {
        let key_path = dir.join(NODE_KEY_FILE);
        let material = TlsMaterial {
            ca_pem: read_file(&dir.join(CA_CERT_FILE))?,
            cert_pem: read_file(&dir.join(NODE_CERT_FILE))?,
            key_pem: read_file(&key_path)?,
        };
        warn_if_key_exposed(&key_path);
        material.identity()?;
        Ok(material)
    }
}

/// How a link is secured.
#[derive(Clone, Debug)]
pub enum TlsMode {
    /// Mutual TLS with the cluster CA (the default for every link).
    Mtls(TlsMaterial),
    /// No encryption and no peer authentication. Development only.
    Plaintext,
}

/// How to reach a peer.
#[derive(Clone, Debug)]
pub struct ConnectOptions {
    /// Bound on TCP connect plus TLS handshake plus HTTP/2 set-up.
    pub connect_timeout: Duration,
    /// Name checked against the server certificate; defaults to the endpoint's host.
    pub server_name: Option<String>,
    /// When set, the server's certificate must name this role (an agent dialling the
    /// coordinator expects [`Role::Coordinator`]).
    pub expect_role: Option<Role>,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            connect_timeout: Duration::from_secs(5),
            server_name: None,
            expect_role: None,
        }
    }
}

/// Installs ring as the process's rustls provider, once; an already installed provider wins.
pub(crate) fn ensure_crypto_provider() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        // Err means another provider is installed already, which rustls then uses.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

fn warn_plaintext(side: &'static str, peer: &str) {
    tracing::warn!(
        side,
        peer,
        "PLAINTEXT gRPC {side}: no encryption and no peer authentication; development only, never on a real network"
    );
}

/// A tonic server builder for `mode`. With mTLS, a client must present a certificate from the
/// cluster CA or the handshake fails; pair it with [`crate::AuthLayer`] for identity checks.
pub fn server_builder(mode: &TlsMode) -> Result<Server, NetError> {
    ensure_crypto_provider();
    let server = base_server();
    match mode {
        TlsMode::Plaintext => {
            warn_plaintext("server", "-");
            Ok(server)
        }
        TlsMode::Mtls(m) => {
            // Fail at start-up, not at the first handshake, when the certificate names nobody.
            m.identity()?;
            let tls = ServerTlsConfig::new()
                .identity(Identity::from_pem(&m.cert_pem, &m.key_pem))
                .client_ca_root(Certificate::from_pem(&m.ca_pem))
                .timeout(HANDSHAKE_TIMEOUT);
            server
                .tls_config(tls)
                .map_err(|source| NetError::TransportConfig {
                    endpoint: "server".to_owned(),
                    source,
                })
        }
    }
}

/// A tonic server with shoal's socket and HTTP/2 settings and no TLS of its own.
pub(crate) fn base_server() -> Server {
    Server::builder()
        .tcp_nodelay(true)
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
}

/// Connects to `endpoint` (`host:port`) and waits until the link is up, within
/// `opts.connect_timeout`.
pub async fn connect(
    endpoint: &str,
    mode: &TlsMode,
    opts: ConnectOptions,
) -> Result<Channel, NetError> {
    let ep = build_endpoint(endpoint, mode, &opts)?;
    match tokio::time::timeout(opts.connect_timeout, ep.connect()).await {
        Ok(Ok(channel)) => Ok(channel),
        Ok(Err(source)) => Err(NetError::Connect {
            endpoint: endpoint.to_owned(),
            source,
        }),
        Err(_) => Err(NetError::ConnectTimeout {
            endpoint: endpoint.to_owned(),
            timeout: opts.connect_timeout,
        }),
    }
}

/// A channel to `endpoint` that connects on first use (and reconnects after failures).
pub fn connect_lazy(
    endpoint: &str,
    mode: &TlsMode,
    opts: ConnectOptions,
) -> Result<Channel, NetError> {
    Ok(build_endpoint(endpoint, mode, &opts)?.connect_lazy())
}

fn build_endpoint(
    endpoint: &str,
    mode: &TlsMode,
    opts: &ConnectOptions,
) -> Result<Endpoint, NetError> {
    ensure_crypto_provider();
    let host = endpoint_host(endpoint)?;
    let scheme = match mode {
        TlsMode::Mtls(_) => "https",
        TlsMode::Plaintext => "http",
    };
    let config_err = |source| NetError::TransportConfig {
        endpoint: endpoint.to_owned(),
        source,
    };
    let ep = Endpoint::from_shared(format!("{scheme}://{endpoint}"))
        .map_err(config_err)?
        .connect_timeout(opts.connect_timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT);
    match mode {
        TlsMode::Plaintext => {
            warn_plaintext("client", endpoint);
            Ok(ep)
        }
        TlsMode::Mtls(m) => {
            let own = m.identity()?;
            let verifier = ShoalServerVerifier::new(&m.ca_pem, own.cluster_id, opts.expect_role)?;
            let tls = ClientTlsConfig::new()
                .identity(Identity::from_pem(&m.cert_pem, &m.key_pem))
                .domain_name(opts.server_name.clone().unwrap_or(host))
                .timeout(opts.connect_timeout);
            ep.tls_config_with_verifier(tls, Arc::new(verifier))
                .map_err(config_err)
        }
    }
}

/// The host of a `host:port` endpoint (brackets of an IPv6 literal removed).
pub(crate) fn endpoint_host(endpoint: &str) -> Result<String, NetError> {
    let invalid = |problem| NetError::InvalidEndpoint {
        endpoint: endpoint.to_owned(),
        problem,
    };
    if endpoint.contains("://") || endpoint.contains('/') {
        return Err(invalid("give host:port without a scheme or path"));
    }
    let (host, port) = endpoint
        .rsplit_once(':')
        .ok_or_else(|| invalid("missing :port"))?;
    port.parse::<u16>()
        .map_err(|_| invalid("port is not a number from 0 to 65535"))?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if host.is_empty() {
        return Err(invalid("missing host"));
    }
    Ok(host.to_owned())
}

/// Chain and name checks by webpki, then the shoal identity of the server.
#[derive(Debug)]
struct ShoalServerVerifier {
    inner: Arc<WebPkiServerVerifier>,
    cluster_id: String,
    expect_role: Option<Role>,
}

/// Why a server certificate that chains to the CA is still refused.
#[derive(Debug, thiserror::Error)]
enum ServerIdentityError {
    #[error("server certificate names no valid shoal identity")]
    Identity(#[from] crate::error::IdentityError),
    #[error("server belongs to cluster {found:?}, expected {expected:?}")]
    WrongCluster { expected: String, found: String },
    #[error("server has role {found}, expected {expected}")]
    WrongRole { expected: Role, found: Role },
}

impl ShoalServerVerifier {
    fn new(ca_pem: &str, cluster_id: String, expect_role: Option<Role>) -> Result<Self, NetError> {
        let mut roots = RootCertStore::empty();
        for der in pem_certificates(ca_pem) {
            roots
                .add(CertificateDer::from(der))
                .map_err(|source| NetError::TrustAnchor { source })?;
        }
        if roots.is_empty() {
            return Err(NetError::NotACertificate {
                what: "the cluster CA certificate",
            });
        }
        let inner = WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .map_err(|source| NetError::Verifier { source })?;
        Ok(ShoalServerVerifier {
            inner,
            cluster_id,
            expect_role,
        })
    }

    fn check_identity(&self, end_entity: &[u8]) -> Result<(), ServerIdentityError> {
        let id = PeerIdentity::from_der(end_entity)?;
        if id.cluster_id != self.cluster_id {
            return Err(ServerIdentityError::WrongCluster {
                expected: self.cluster_id.clone(),
                found: id.cluster_id,
            });
        }
        match self.expect_role {
            Some(expected) if expected != id.role => Err(ServerIdentityError::WrongRole {
                expected,
                found: id.role,
            }),
            _ => Ok(()),
        }
    }
}

impl ServerCertVerifier for ShoalServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verified = self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        self.check_identity(end_entity).map_err(|e| {
            tracing::warn!(server = ?server_name, reason = %e, "refusing server certificate");
            rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(
                Arc::new(e),
            )))
        })?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::ClusterCa;

    #[test]
    fn endpoint_hosts_are_extracted_and_bad_endpoints_refused() {
        assert_eq!(endpoint_host("127.0.0.1:7000").unwrap(), "127.0.0.1");
        assert_eq!(endpoint_host("node-a.lan:1").unwrap(), "node-a.lan");
        assert_eq!(endpoint_host("[::1]:7000").unwrap(), "::1");
        for bad in [
            "127.0.0.1",
            "https://a:1",
            "a:port",
            ":7000",
            "a:70000",
            "a:1/x",
        ] {
            assert!(
                matches!(endpoint_host(bad), Err(NetError::InvalidEndpoint { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn material_round_trips_and_names_its_identity() {
        let ca = ClusterCa::generate("lab").unwrap();
        let id = PeerIdentity::new("lab", Role::Agent, "n1").unwrap();
        let m = ca
            .issue(&id, &[], Duration::from_secs(60))
            .unwrap()
            .into_material(ca.cert_pem());
        assert_eq!(m.identity().unwrap(), id);
        assert!(!format!("{m:?}").contains("PRIVATE KEY"));
        let dir = tempfile::tempdir().unwrap();
        m.save(dir.path()).unwrap();
        assert_eq!(TlsMaterial::load(dir.path()).unwrap(), m);
    }

    #[test]
    fn a_server_refuses_material_that_names_nobody() {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let m = TlsMaterial {
            ca_pem: cert.pem(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        };
        assert!(matches!(
            server_builder(&TlsMode::Mtls(m)),
            Err(NetError::Identity(_))
        ));
    }
}
