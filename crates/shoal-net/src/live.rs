//! A certificate that is replaced while the process runs (renewal), for servers and clients.
//!
//! tonic's own server TLS fixes its certificate when the server is built, so a server whose
//! certificate is renewed does the TLS handshake itself ([`tls_incoming`]): a rustls acceptor
//! whose certificate resolver reads the current [`RenewableIdentity`] at every handshake, and
//! which requires a client certificate of the cluster CA exactly like [`crate::server_builder`].
//! The accepted streams carry the same connection info (peer certificates, address) tonic
//! gives the authorization layer, so [`crate::AuthLayer`] works unchanged.
//!
//! Clients take [`RenewableIdentity::mode`] when they connect; a link built before a renewal
//! keeps the old certificate until it is rebuilt (the owner of the link rebuilds it).

use crate::error::NetError;
use crate::identity::{CertificateInfo, PeerIdentity};
use crate::pki::pem_certificates;
use crate::tls::{HANDSHAKE_TIMEOUT, TlsMaterial, TlsMode, ensure_crypto_provider};
use futures::Stream;
use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use std::fmt;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

/// Accepted connections waiting for the server to take them.
const ACCEPTED_QUEUE: usize = 64;
/// Handshakes in progress at most; further connections wait in the listen backlog.
const MAX_HANDSHAKES: usize = 256;
/// Pause after a failed `accept` (for example, out of file descriptors).
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);

struct Current {
    material: TlsMaterial,
    info: CertificateInfo,
    key: Arc<CertifiedKey>,
}

/// This peer's certificate and key, replaceable at run time by a renewed certificate for the
/// same identity under the same CA. Cheap to clone; clones share the current certificate.
#[derive(Clone)]
pub struct RenewableIdentity {
    current: Arc<RwLock<Arc<Current>>>,
}

impl fmt::Debug for RenewableIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = self.get();
        f.debug_struct("RenewableIdentity")
            .field("identity", &c.info.identity)
            .field("serial", &c.info.serial)
            .finish_non_exhaustive()
    }
}

fn load(material: TlsMaterial) -> Result<Current, NetError> {
    let certs: Vec<CertificateDer<'static>> = pem_certificates(&material.cert_pem)
        .into_iter()
        .map(CertificateDer::from)
        .collect();
    let first = certs.first().ok_or(NetError::NotACertificate {
        what: "the peer certificate",
    })?;
    let info = CertificateInfo::from_der(first)?;
    let key = PrivateKeyDer::from_pem_slice(material.key_pem.as_bytes()).map_err(|_| {
        NetError::RenewalMismatch {
            problem: "the private key is not PEM PKCS#8, SEC1 or PKCS#1",
        }
    })?;
    let key = CertifiedKey::from_der(certs, key, &rustls::crypto::ring::default_provider())
        .map_err(|_| NetError::RenewalMismatch {
            problem: "the private key does not belong to the certificate",
        })?;
    Ok(Current {
        material,
        info,
        key: Arc::new(key),
    })
}

impl RenewableIdentity {
    /// Starts from `material` (checked: it names a shoal peer and its key fits).
    pub fn new(material: TlsMaterial) -> Result<Self, NetError> {
        ensure_crypto_provider();
        Ok(RenewableIdentity {
            current: Arc::new(RwLock::new(Arc::new(load(material)?))),
        })
    }

    fn get(&self) -> Arc<Current> {
        // Replaced whole under the lock: a poisoned lock still holds a complete value.
        Arc::clone(&self.current.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// The current material.
    pub fn material(&self) -> TlsMaterial {
        self.get().material.clone()
    }

    /// mTLS with the current material, for links built from now on.
    pub fn mode(&self) -> TlsMode {
        TlsMode::Mtls(self.material())
    }

    /// The identity the certificate names (it never changes across renewals).
    pub fn identity(&self) -> PeerIdentity {
        self.get().info.identity.clone()
    }

    /// Serial and validity of the current certificate.
    pub fn certificate(&self) -> CertificateInfo {
        self.get().info.clone()
    }

    /// Replaces the certificate and key. New handshakes present the new certificate at once;
    /// open connections keep the one they were made with. The replacement must name the same
    /// peer and trust the same CA.
    pub fn replace(&self, material: TlsMaterial) -> Result<(), NetError> {
        let next = load(material)?;
        let now = self.get();
        if next.info.identity != now.info.identity {
            return Err(NetError::RenewalMismatch {
                problem: "the new certificate names another peer",
            });
        }
        if next.material.ca_pem.trim() != now.material.ca_pem.trim() {
            return Err(NetError::RenewalMismatch {
                problem: "the new certificate comes with another CA",
            });
        }
        tracing::info!(
            peer = %next.info.identity,
            serial = %next.info.serial,
            "certificate replaced"
        );
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(next);
        Ok(())
    }
}

#[derive(Debug)]
struct Resolver(RenewableIdentity);

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(&self.0.get().key))
    }
}

/// A tonic server builder for [`tls_incoming`] streams: shoal's settings, no TLS of its own
/// (the incoming stream does it).
pub fn server_builder_for_incoming() -> tonic::transport::Server {
    ensure_crypto_provider();
    crate::tls::base_server()
}

/// Accepted TLS connections on `listener`, each presenting the current certificate of
/// `identity` and requiring a client certificate from its CA. Feed it to tonic's
/// `serve_with_incoming*` on a [`server_builder_for_incoming`] server. The accept loop stops
/// when the stream is dropped.
pub fn tls_incoming(
    listener: TcpListener,
    identity: &RenewableIdentity,
) -> Result<
    impl Stream<Item = Result<TlsStream<TcpStream>, std::io::Error>> + Send + 'static,
    NetError,
> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    for der in pem_certificates(&identity.material().ca_pem) {
        roots
            .add(CertificateDer::from(der))
            .map_err(|source| NetError::TrustAnchor { source })?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|source| NetError::Verifier { source })?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|source| NetError::TlsConfig { source })?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(Resolver(identity.clone())));
    config.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let (tx, rx) = mpsc::channel(ACCEPTED_QUEUE);
    tokio::spawn(accept_loop(listener, acceptor, tx));
    Ok(futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    }))
}

type Accepted = Result<TlsStream<TcpStream>, std::io::Error>;

async fn accept_loop(listener: TcpListener, acceptor: TlsAcceptor, tx: mpsc::Sender<Accepted>) {
    let handshakes = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    loop {
        let permit = tokio::select! {
            () = tx.closed() => return,
            p = Arc::clone(&handshakes).acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
        };
        let (tcp, peer) = tokio::select! {
            () = tx.closed() => return,
            r = listener.accept() => match r {
                Ok(conn) => conn,
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    continue;
                }
            },
        };
        // Small frames (one token each) must not wait for delayed ACKs.
        let _ = tcp.set_nodelay(true);
        let (acceptor, tx) = (acceptor.clone(), tx.clone());
        tokio::spawn(async move {
            let _permit = permit;
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(stream)) => {
                    // A closed queue means the server stopped; the connection just drops.
                    let _ = tx.send(Ok(stream)).await;
                }
                Ok(Err(e)) => {
                    tracing::info!(%peer, error = %e, "TLS handshake refused");
                }
                Err(_) => tracing::info!(%peer, "TLS handshake timed out"),
            }
        });
    }
}
