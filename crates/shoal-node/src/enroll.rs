//! A node's own certificate: enrollment with a join token, and renewal before expiry.
//!
//! [`enroll`] generates a key pair on this machine, sends a signing request naming the node
//! together with the token to the coordinator's enrollment listener (trusting it by the CA
//! hash the token pins), and returns the material to save: the key never leaves the node.
//! [`Renewal`] lets a running [`crate::Agent`] renew the certificate over mTLS once 2/3 of
//! its lifetime has passed, and present the new one on new connections without a restart.

use shoal_net::{
    CertificateInfo, CertificateRequest, ConnectOptions, JoinToken, NetError, RenewableIdentity,
    ShoalEnrollmentClient, TlsMaterial, check_pinned_ca, class_of, connect_for_enrollment,
    enrollment_client, with_deadline,
};
use shoal_proto::v1::{CertificateResponse, EnrollRequest, RenewRequest};
use shoal_types::{ErrorClass, NodeId};
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

/// Deadline of one enrollment or renewal call.
const CALL_DEADLINE: Duration = Duration::from_secs(10);

/// What enrollment needs.
#[derive(Debug, Clone)]
pub struct EnrollConfig {
    /// `host:port` of the coordinator's enrollment listener.
    pub enroll_addr: String,
    /// The join token (`shoal-join.…`).
    pub token: JoinToken,
    /// The node id to enroll as.
    pub node_id: NodeId,
    /// Host names and addresses peers reach this node at (they go in the certificate).
    pub hosts: Vec<String>,
    /// Bound on connecting.
    pub connect_timeout: Duration,
}

/// Why enrollment or renewal failed.
#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    /// A key, request or connection could not be made.
    #[error("enrollment transport")]
    Net(#[from] NetError),
    /// The coordinator refused (bad, expired or used token; revoked or live node id ...).
    #[error("the coordinator refused: {message} ({class}, {reason})")]
    Refused {
        /// The refusal's class.
        class: ErrorClass,
        /// Its stable reason.
        reason: String,
        /// What the coordinator said.
        message: String,
    },
    /// The answer does not fit the request (another CA, another node, a bad certificate).
    #[error("the coordinator's answer is unusable")]
    BadAnswer(#[source] NetError),
}

fn refused(status: &tonic::Status) -> EnrollError {
    let (class, reason) = class_of(status);
    EnrollError::Refused {
        class,
        reason: reason.unwrap_or_default(),
        message: status.message().to_owned(),
    }
}

/// Enrolls this node: returns its certificate, key and the cluster CA.
pub async fn enroll(cfg: &EnrollConfig) -> Result<TlsMaterial, EnrollError> {
    let request = CertificateRequest::generate(cfg.node_id.as_str(), &cfg.hosts)?;
    let channel = connect_for_enrollment(
        &cfg.enroll_addr,
        &cfg.token.ca_sha256,
        ConnectOptions {
            connect_timeout: cfg.connect_timeout,
            ..ConnectOptions::default()
        },
    )
    .await?;
    let mut client = enrollment_client(channel, CALL_DEADLINE);
    let answer = client
        .enroll(with_deadline(
            EnrollRequest {
                token_id: cfg.token.id.clone(),
                token_secret: cfg.token.secret.clone(),
                csr_pem: request.csr_pem().to_owned(),
            },
            CALL_DEADLINE,
        ))
        .await
        .map_err(|s| refused(&s))?
        .into_inner();
    // The TLS handshake already checked the pin; the CA handed back must be the same one.
    check_pinned_ca(&answer.ca_pem, &cfg.token.ca_sha256).map_err(EnrollError::BadAnswer)?;
    let material = request.into_material(answer.cert_pem, answer.ca_pem);
    let id = material.identity().map_err(EnrollError::BadAnswer)?;
    if id.node_id != cfg.node_id.as_str() {
        return Err(EnrollError::BadAnswer(NetError::RenewalMismatch {
            problem: "the certificate names another node",
        }));
    }
    tracing::info!(peer = %id, "enrolled");
    Ok(material)
}

/// When a certificate is due for renewal: once 2/3 of its lifetime has passed.
pub fn renewal_due(cert: &CertificateInfo) -> SystemTime {
    let life = cert
        .not_after
        .duration_since(cert.not_before)
        .unwrap_or_default();
    cert.not_before + life.mul_f64(2.0 / 3.0)
}

/// How a running agent renews its certificate.
#[derive(Debug, Clone)]
pub struct Renewal {
    /// The certificate the agent presents and replaces.
    pub identity: RenewableIdentity,
    /// Where renewed material is saved (`ca.crt`, `node.crt`, `node.key` mode 0600), if
    /// anywhere.
    pub save_to: Option<PathBuf>,
    /// Host names and addresses for the renewed certificate.
    pub hosts: Vec<String>,
}

impl Renewal {
    /// Renews over `client` (a link authenticated by the current certificate), saves and
    /// installs the new material, and returns it.
    pub(crate) async fn renew(
        &self,
        client: &mut ShoalEnrollmentClient,
    ) -> Result<TlsMaterial, EnrollError> {
        let id = self.identity.identity();
        let request = CertificateRequest::generate(&id.node_id, &self.hosts)?;
        let answer: CertificateResponse = client
            .renew(with_deadline(
                RenewRequest {
                    csr_pem: request.csr_pem().to_owned(),
                },
                CALL_DEADLINE,
            ))
            .await
            .map_err(|s| refused(&s))?
            .into_inner();
        let material = request.into_material(answer.cert_pem, answer.ca_pem);
        self.identity
            .replace(material.clone())
            .map_err(EnrollError::BadAnswer)?;
        if let Some(dir) = &self.save_to {
            // Installed already: a failed save costs a renewal after a restart, no more.
            if let Err(e) = material.save(dir) {
                tracing::error!(dir = %dir.display(), error = %e, "saving the renewed certificate failed");
            }
        }
        Ok(material)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_is_due_at_two_thirds_of_the_lifetime() {
        let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        let info = CertificateInfo {
            identity: shoal_net::PeerIdentity::new("c", shoal_net::Role::Agent, "n").unwrap(),
            serial: "01".into(),
            not_before: start,
            not_after: start + Duration::from_secs(300),
        };
        assert_eq!(renewal_due(&info), start + Duration::from_secs(200));
    }
}
