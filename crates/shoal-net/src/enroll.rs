//! Getting a certificate without one: join tokens and the enrollment link.
//!
//! A join token, `shoal-join.<id>.<secret>.<ca sha256>`, carries everything a new node needs:
//! the id and secret it proves itself with (the coordinator keeps only the secret's hash, and
//! accepts a token once, before it expires), and the sha256 of the cluster CA certificate, so
//! the node can trust the coordinator with no prior material (like kubeadm's discovery hash).
//!
//! Why a separate enrollment listener rather than optional client certificates on the main
//! one: the main gRPC listener keeps requiring a client certificate in the TLS handshake, so a
//! peer without one never gets a single HTTP/2 byte parsed there, and a bug in a policy
//! table cannot open a method to anonymous callers. The enrollment listener
//! ([`enrollment_server_builder`]) authenticates the coordinator only; behind it the
//! authorization layer with [`crate::AccessPolicy::enrollment`] lets exactly
//! `shoal.v1.Enrollment/Enroll` through without a certificate, and that call does nothing
//! without a valid token. It can be left off (no CA key on the coordinator) and exposed on
//! another interface than the main port.
//!
//! The node dials it with [`connect_for_enrollment`]: the coordinator presents its certificate
//! and the CA; the CA must hash to the pinned value, and the coordinator's certificate must
//! chain to it, match the dialled name and name the coordinator role of the CA's cluster.

use crate::error::NetError;
use crate::identity::{CertificateInfo, Role};
use crate::pki::sha256_hex;
use crate::tls::{ConnectOptions, TlsMaterial, endpoint_host, ensure_crypto_provider};
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint, Identity, Server, ServerTlsConfig};

/// The prefix of every join token.
pub const JOIN_TOKEN_PREFIX: &str = "shoal-join";
/// Hex digits of a token id (64 bits).
const ID_HEX: usize = 16;
/// Hex digits of a token secret (128 bits).
const SECRET_HEX: usize = 32;
/// Hex digits of a sha256.
const SHA256_HEX: usize = 64;

/// A parsed join token. `Display` writes the token string; `Debug` hides the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken {
    /// Public id: how the coordinator finds the token (safe to log).
    pub id: String,
    /// The secret part (never logged).
    pub secret: String,
    /// sha256 of the cluster CA certificate (DER), lower-case hex.
    pub ca_sha256: String,
}

impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinToken")
            .field("id", &self.id)
            .field("ca_sha256", &self.ca_sha256)
            .finish_non_exhaustive()
    }
}

impl fmt::Display for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{JOIN_TOKEN_PREFIX}.{}.{}.{}",
            self.id, self.secret, self.ca_sha256
        )
    }
}

impl JoinToken {
    /// A fresh random id and secret for a cluster whose CA hashes to `ca_sha256`.
    pub fn generate(ca_sha256: &str) -> Result<JoinToken, NetError> {
        let id: [u8; ID_HEX / 2] = rand::random();
        let secret: [u8; SECRET_HEX / 2] = rand::random();
        let token = JoinToken {
            id: crate::identity::hex_lower(&id),
            secret: crate::identity::hex_lower(&secret),
            ca_sha256: ca_sha256.to_ascii_lowercase(),
        };
        // Round-trip through the parser so only well-formed tokens leave here.
        token.to_string().parse()
    }

    /// sha256 of the secret, lower-case hex: all the coordinator stores.
    pub fn secret_hash(secret: &str) -> String {
        sha256_hex(secret.as_bytes())
    }
}

fn is_lower_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

impl FromStr for JoinToken {
    type Err = NetError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = |problem| NetError::InvalidJoinToken { problem };
        let mut parts = s.trim().split('.');
        let (Some(prefix), Some(id), Some(secret), Some(ca), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(invalid(
                "expected shoal-join.<id>.<secret>.<ca sha256> (four dot-separated parts)",
            ));
        };
        if prefix != JOIN_TOKEN_PREFIX {
            return Err(invalid("it does not start with shoal-join."));
        }
        if !is_lower_hex(id, ID_HEX) {
            return Err(invalid("the id is not 16 lower-case hex digits"));
        }
        if !is_lower_hex(secret, SECRET_HEX) {
            return Err(invalid("the secret is not 32 lower-case hex digits"));
        }
        if !is_lower_hex(ca, SHA256_HEX) {
            return Err(invalid("the CA hash is not 64 lower-case hex digits"));
        }
        Ok(JoinToken {
            id: id.to_owned(),
            secret: secret.to_owned(),
            ca_sha256: ca.to_owned(),
        })
    }
}

/// A server builder for the enrollment listener: TLS with `material`'s certificate and the
/// CA behind it (so a node can check the pinned hash), and no client authentication. Pair it
/// with [`crate::AuthLayer`] and [`crate::AccessPolicy::enrollment`].
pub fn enrollment_server_builder(material: &TlsMaterial) -> Result<Server, NetError> {
    ensure_crypto_provider();
    material.identity()?;
    let chain = format!("{}\n{}", material.cert_pem.trim_end(), material.ca_pem);
    let tls = ServerTlsConfig::new()
        .identity(Identity::from_pem(chain, &material.key_pem))
        .timeout(crate::tls::HANDSHAKE_TIMEOUT);
    crate::tls::base_server()
        .tls_config(tls)
        .map_err(|source| NetError::TransportConfig {
            endpoint: "enrollment server".to_owned(),
            source,
        })
}

/// Connects to a coordinator's enrollment listener without any certificate of our own,
/// trusting only a coordinator certificate that chains to the CA hashing to `ca_sha256`.
pub async fn connect_for_enrollment(
    endpoint: &str,
    ca_sha256: &str,
    opts: ConnectOptions,
) -> Result<Channel, NetError> {
    ensure_crypto_provider();
    let host = endpoint_host(endpoint)?;
    let config_err = |source| NetError::TransportConfig {
        endpoint: endpoint.to_owned(),
        source,
    };
    let tls = ClientTlsConfig::new()
        .domain_name(opts.server_name.clone().unwrap_or(host))
        .timeout(opts.connect_timeout);
    let verifier = PinnedCaVerifier {
        ca_sha256: ca_sha256.to_ascii_lowercase(),
    };
    let ep = Endpoint::from_shared(format!("https://{endpoint}"))
        .map_err(config_err)?
        .connect_timeout(opts.connect_timeout)
        .tcp_nodelay(true)
        .tls_config_with_verifier(tls, Arc::new(verifier))
        .map_err(config_err)?;
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

/// Checks that `ca_pem` (as returned by the coordinator) is the CA a token pins.
pub fn check_pinned_ca(ca_pem: &str, ca_sha256: &str) -> Result<(), NetError> {
    let found = crate::pki::ca_fingerprint(ca_pem)?;
    if found != ca_sha256.to_ascii_lowercase() {
        return Err(NetError::CaPinMismatch {
            expected: ca_sha256.to_owned(),
            found,
        });
    }
    Ok(())
}

/// Trusts the CA in the presented chain whose sha256 is pinned, then verifies the server
/// against it like any other link.
#[derive(Debug)]
struct PinnedCaVerifier {
    ca_sha256: String,
}

/// Why the enrollment server's certificate is refused.
#[derive(Debug, thiserror::Error)]
enum PinError {
    #[error("no certificate in the server's chain hashes to the pinned CA sha256")]
    NoPinnedCa,
    #[error("the pinned CA is not usable: {0}")]
    BadCa(String),
    #[error("the server certificate names no valid shoal identity")]
    Identity(#[from] crate::error::IdentityError),
    #[error("the server is {found}, not a coordinator of the pinned CA's cluster")]
    NotTheCoordinator { found: String },
}

fn other(e: PinError) -> rustls::Error {
    tracing::warn!(reason = %e, "refusing the enrollment server's certificate");
    rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(e))))
}

impl PinnedCaVerifier {
    fn inner_for(&self, ca: &CertificateDer<'_>) -> Result<Arc<WebPkiServerVerifier>, PinError> {
        let mut roots = RootCertStore::empty();
        roots
            .add(ca.clone().into_owned())
            .map_err(|e| PinError::BadCa(e.to_string()))?;
        WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .map_err(|e| PinError::BadCa(e.to_string()))
    }

    fn pinned<'a>(
        &self,
        intermediates: &'a [CertificateDer<'a>],
    ) -> Result<&'a CertificateDer<'a>, PinError> {
        intermediates
            .iter()
            .find(|c| sha256_hex(c) == self.ca_sha256)
            .ok_or(PinError::NoPinnedCa)
    }
}

impl ServerCertVerifier for PinnedCaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = self.pinned(intermediates).map_err(other)?;
        let inner = self.inner_for(ca).map_err(other)?;
        let verified =
            inner.verify_server_cert(end_entity, &[], server_name, ocsp_response, now)?;
        let id = CertificateInfo::from_der(end_entity)
            .map_err(|e| other(e.into()))?
            .identity;
        let cluster = ca_cluster(ca);
        if id.role != Role::Coordinator || cluster.as_deref() != Some(id.cluster_id.as_str()) {
            return Err(other(PinError::NotTheCoordinator {
                found: id.to_string(),
            }));
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &rustls::crypto::ring::default_provider().signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &rustls::crypto::ring::default_provider().signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The cluster id in a CA certificate's `shoal://<cluster_id>` SAN.
fn ca_cluster(ca: &CertificateDer<'_>) -> Option<String> {
    crate::pki::cluster_of_ca_der(ca)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_hide_their_secret() {
        let t = JoinToken::generate(&"ab".repeat(32)).unwrap();
        let s = t.to_string();
        assert!(s.starts_with("shoal-join."));
        assert_eq!(s.parse::<JoinToken>().unwrap(), t);
        assert!(!format!("{t:?}").contains(&t.secret));
        assert_ne!(JoinToken::generate(&"ab".repeat(32)).unwrap(), t);
        assert_eq!(JoinToken::secret_hash(&t.secret).len(), 64);
    }

    #[test]
    fn malformed_tokens_are_refused_with_a_reason() {
        let ok = format!(
            "shoal-join.{}.{}.{}",
            "1".repeat(16),
            "2".repeat(32),
            "3".repeat(64)
        );
        assert!(ok.parse::<JoinToken>().is_ok());
        for bad in [
            "",
            "shoal-join",
            &format!(
                "other.{}.{}.{}",
                "1".repeat(16),
                "2".repeat(32),
                "3".repeat(64)
            ),
            &format!(
                "shoal-join.{}.{}.{}",
                "1".repeat(15),
                "2".repeat(32),
                "3".repeat(64)
            ),
            &format!(
                "shoal-join.{}.{}.{}",
                "1".repeat(16),
                "G".repeat(32),
                "3".repeat(64)
            ),
            &format!(
                "shoal-join.{}.{}.{}",
                "1".repeat(16),
                "2".repeat(32),
                "3".repeat(63)
            ),
            &format!("{ok}.extra"),
        ] {
            assert!(
                matches!(
                    bad.parse::<JoinToken>(),
                    Err(NetError::InvalidJoinToken { .. })
                ),
                "{bad}"
            );
        }
    }
}
