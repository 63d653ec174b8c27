//! The crate's error boundary: one enum for everything that can go wrong while building
//! certificates, TLS configurations and connections, plus the narrower [`IdentityError`] that
//! the authorization layer turns into a stable rejection reason.

use std::path::PathBuf;
use std::time::Duration;

/// Why a certificate does not name a valid shoal peer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// The peer presented no certificate at all.
    #[error("the peer presented no certificate")]
    NoCertificate,
    /// The certificate is not valid DER X.509.
    #[error("the certificate does not parse as X.509: {detail}")]
    Unparseable {
        /// What the parser reported.
        detail: String,
    },
    /// The certificate carries no `shoal://` URI in its subject alternative names.
    #[error("the certificate names no shoal identity (no shoal:// URI SAN)")]
    NoShoalUri,
    /// The certificate carries more than one `shoal://` URI, so it names no single peer.
    #[error("the certificate names {count} shoal identities; exactly one is required")]
    AmbiguousShoalUri {
        /// How many shoal URIs were found.
        count: usize,
    },
    /// A `shoal://` URI that is not `shoal://<cluster_id>/<role>/<node_id>`.
    #[error("malformed shoal identity URI {uri:?}: {problem}")]
    MalformedUri {
        /// The URI as found.
        uri: String,
        /// What is wrong with it.
        problem: &'static str,
    },
    /// A cluster or node id with characters outside `[A-Za-z0-9._-]`, empty, or too long.
    #[error("invalid {field} {value:?}: use 1 to 128 characters from [A-Za-z0-9._-]")]
    InvalidComponent {
        /// Which part of the identity (`cluster_id` or `node_id`).
        field: &'static str,
        /// The rejected value.
        value: String,
    },
    /// A role name other than `coordinator`, `agent` or `client`.
    #[error("unknown role {role:?}")]
    UnknownRole {
        /// The rejected role name.
        role: String,
    },
}

impl IdentityError {
    /// Stable machine-readable reason, sent in the `shoal-error-reason` header.
    pub fn reason(&self) -> &'static str {
        match self {
            IdentityError::NoCertificate => "no_client_certificate",
            IdentityError::Unparseable { .. } => "certificate_unparseable",
            IdentityError::NoShoalUri => "no_shoal_identity",
            IdentityError::AmbiguousShoalUri { .. } => "ambiguous_shoal_identity",
            IdentityError::MalformedUri { .. }
            | IdentityError::InvalidComponent { .. }
            | IdentityError::UnknownRole { .. } => "malformed_shoal_identity",
        }
    }
}

/// Errors of the shoal transport: PKI, TLS configuration and connection set-up.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// rcgen refused to generate a key or certificate.
    #[error("generating {what} failed")]
    CertGeneration {
        /// What was being generated.
        what: &'static str,
        /// The generator's error.
        #[source]
        source: rcgen::Error,
    },
    /// A host name for a certificate that is neither an IP address nor a valid DNS name.
    #[error("invalid host {host:?} for a certificate: {problem}")]
    InvalidHost {
        /// The rejected host.
        host: String,
        /// Why it was rejected.
        problem: &'static str,
    },
    /// The identity to issue or use is not a valid shoal identity.
    #[error("invalid shoal identity")]
    Identity(#[from] IdentityError),
    /// A certificate was requested for another cluster than the CA's.
    #[error("this CA belongs to cluster {ca_cluster:?}, not {requested:?}")]
    ClusterMismatch {
        /// The CA's cluster.
        ca_cluster: String,
        /// The cluster the certificate was requested for.
        requested: String,
    },
    /// A validity window that is empty or outside what X.509 can express.
    #[error("invalid certificate validity window: {problem}")]
    InvalidValidity {
        /// What is wrong with it.
        problem: &'static str,
    },
    /// Reading or writing a PKI file failed.
    #[error("{action} {path} failed")]
    Io {
        /// What was being done (`reading`, `writing`, …).
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A stored PEM key or certificate does not load.
    #[error("{what} at {path} does not load")]
    BadPem {
        /// What the file should hold.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The loader's error.
        #[source]
        source: rcgen::Error,
    },
    /// The CA key on disk does not belong to the CA certificate next to it.
    #[error("the CA key in {dir} does not match the CA certificate")]
    KeyMismatch {
        /// The CA directory.
        dir: PathBuf,
    },
    /// PEM text that holds no certificate, or a certificate that does not parse.
    #[error("{what} is not a PEM certificate")]
    NotACertificate {
        /// Which certificate.
        what: &'static str,
    },
    /// The endpoint string is not `host:port`.
    #[error("invalid endpoint {endpoint:?}: {problem}")]
    InvalidEndpoint {
        /// The rejected endpoint.
        endpoint: String,
        /// What is wrong with it.
        problem: &'static str,
    },
    /// tonic rejected the endpoint or the TLS configuration.
    #[error("transport configuration for {endpoint} rejected")]
    TransportConfig {
        /// The endpoint (or `server` for a server configuration).
        endpoint: String,
        /// tonic's error.
        #[source]
        source: tonic::transport::Error,
    },
    /// Building the server-certificate verifier failed (for example an unusable CA).
    #[error("building the certificate verifier failed")]
    Verifier {
        /// rustls's error.
        #[source]
        source: rustls::server::VerifierBuilderError,
    },
    /// The CA certificate could not be added to a trust store.
    #[error("the cluster CA certificate is not a usable trust anchor")]
    TrustAnchor {
        /// rustls's error.
        #[source]
        source: rustls::Error,
    },
    /// rustls refused a TLS configuration.
    #[error("building the TLS configuration failed")]
    TlsConfig {
        /// rustls's error.
        #[source]
        source: rustls::Error,
    },
    /// A certificate signing request that cannot be signed.
    #[error("invalid certificate signing request: {problem}")]
    InvalidRequest {
        /// What is wrong with it.
        problem: &'static str,
    },
    /// A join token that is not `shoal-join.<id>.<secret>.<ca sha256>`.
    #[error("invalid join token: {problem}")]
    InvalidJoinToken {
        /// What is wrong with it.
        problem: &'static str,
    },
    /// The CA a server presented is not the one the join token pins.
    #[error(
        "the coordinator's CA does not match the join token (sha256 {found}, expected {expected})"
    )]
    CaPinMismatch {
        /// The pinned sha256.
        expected: String,
        /// The sha256 of what was presented.
        found: String,
    },
    /// A replacement certificate that does not fit the material it replaces.
    #[error("the renewed certificate cannot replace the current one: {problem}")]
    RenewalMismatch {
        /// What differs.
        problem: &'static str,
    },
    /// Connecting (TCP, TLS handshake, HTTP/2 set-up) failed.
    #[error("connecting to {endpoint} failed")]
    Connect {
        /// The endpoint.
        endpoint: String,
        /// tonic's error, whose sources say whether TCP, TLS or HTTP/2 failed.
        #[source]
        source: tonic::transport::Error,
    },
    /// Connecting did not finish within the connect timeout.
    #[error("connecting to {endpoint} timed out after {timeout:?}")]
    ConnectTimeout {
        /// The endpoint.
        endpoint: String,
        /// The timeout that expired.
        timeout: Duration,
    },
}
