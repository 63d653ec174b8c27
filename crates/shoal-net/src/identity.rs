//! Who a peer is. Every certificate the cluster CA issues names exactly one peer with a SAN
//! URI `shoal://<cluster_id>/<role>/<node_id>`; this module writes that URI and reads it
//! back from a peer's DER certificate, together with the validity window the authorization
//! layer re-checks. A certificate without exactly one well-formed shoal URI names nobody and
//! is rejected.

use crate::error::IdentityError;
use std::fmt;
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use x509_parser::extensions::GeneralName;

/// URI scheme of shoal identities.
const SCHEME: &str = "shoal://";
/// Longest cluster or node id accepted (keeps headers and log lines bounded).
const MAX_COMPONENT_LEN: usize = 128;

/// What a peer is allowed to be in the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// The control plane: placement, membership, routing.
    Coordinator,
    /// A node agent that runs shards and serves the data plane.
    Agent,
    /// Operator tooling (the CLI) that inspects the cluster.
    Client,
}

impl Role {
    /// Every role, in a fixed order.
    pub const ALL: [Role; 3] = [Role::Coordinator, Role::Agent, Role::Client];

    /// Stable lower-case name, as written in the identity URI.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Coordinator => "coordinator",
            Role::Agent => "agent",
            Role::Client => "client",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = IdentityError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| IdentityError::UnknownRole { role: s.to_owned() })
    }
}

/// A peer as its certificate names it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PeerIdentity {
    /// The cluster the certificate was issued for.
    pub cluster_id: String,
    /// What the peer may do.
    pub role: Role,
    /// The peer's stable name in the cluster.
    pub node_id: String,
}

impl PeerIdentity {
    /// A validated identity.
    pub fn new(
        cluster_id: impl Into<String>,
        role: Role,
        node_id: impl Into<String>,
    ) -> Result<Self, IdentityError> {
        let id = PeerIdentity {
            cluster_id: cluster_id.into(),
            role,
            node_id: node_id.into(),
        };
        id.validate()?;
        Ok(id)
    }

    /// Checks the id components (a struct literal bypasses [`PeerIdentity::new`]).
    pub fn validate(&self) -> Result<(), IdentityError> {
        validate_component("cluster_id", &self.cluster_id)?;
        validate_component("node_id", &self.node_id)
    }

    /// The SAN URI that encodes this identity: `shoal://<cluster_id>/<role>/<node_id>`.
    pub fn uri(&self) -> String {
        format!("{SCHEME}{}/{}/{}", self.cluster_id, self.role, self.node_id)
    }

    /// Parses a SAN URI written by [`PeerIdentity::uri`].
    pub fn from_uri(uri: &str) -> Result<Self, IdentityError> {
        let malformed = |problem| IdentityError::MalformedUri {
            uri: uri.to_owned(),
            problem,
        };
        let rest = uri
            .strip_prefix(SCHEME)
            .ok_or_else(|| malformed("not a shoal:// URI"))?;
        let mut parts = rest.split('/');
        let (Some(cluster), Some(role), Some(node), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(malformed("expected shoal://<cluster_id>/<role>/<node_id>"));
        };
        PeerIdentity::new(cluster, role.parse()?, node)
    }

    /// Reads the identity from a DER certificate (see [`CertificateInfo::from_der`]).
    pub fn from_der(der: &[u8]) -> Result<Self, IdentityError> {
        CertificateInfo::from_der(der).map(|info| info.identity)
    }
}

impl fmt::Display for PeerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri())
    }
}

/// Checks a cluster id with the rules of every identity component.
pub(crate) fn validate_cluster_id(cluster_id: &str) -> Result<(), IdentityError> {
    validate_component("cluster_id", cluster_id)
}

fn validate_component(field: &'static str, value: &str) -> Result<(), IdentityError> {
    let ok = !value.is_empty()
        && value.len() <= MAX_COMPONENT_LEN
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(IdentityError::InvalidComponent {
            field,
            value: value.chars().take(MAX_COMPONENT_LEN).collect(),
        })
    }
}

/// What the authorization layer needs from a peer certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateInfo {
    /// The peer the certificate names.
    pub identity: PeerIdentity,
    /// Serial number, lower-case hex without separators.
    pub serial: String,
    /// Start of validity.
    pub not_before: SystemTime,
    /// End of validity.
    pub not_after: SystemTime,
}

impl CertificateInfo {
    /// Parses a DER certificate and extracts the single shoal identity URI it must carry.
    ///
    /// Only parses: the chain and signature are checked by the TLS handshake, which runs
    /// before any certificate reaches this function.
    pub fn from_der(der: &[u8]) -> Result<Self, IdentityError> {
        let (_, cert) =
            x509_parser::parse_x509_certificate(der).map_err(|e| IdentityError::Unparseable {
                detail: e.to_string(),
            })?;
        let sans = cert
            .subject_alternative_name()
            .map_err(|e| IdentityError::Unparseable {
                detail: e.to_string(),
            })?;
        let uris: Vec<&str> = sans
            .iter()
            .flat_map(|ext| ext.value.general_names.iter())
            .filter_map(|name| match name {
                GeneralName::URI(u) if u.starts_with(SCHEME) => Some(*u),
                _ => None,
            })
            .collect();
        let identity = match uris.as_slice() {
            [] => return Err(IdentityError::NoShoalUri),
            [one] => PeerIdentity::from_uri(one)?,
            many => {
                return Err(IdentityError::AmbiguousShoalUri { count: many.len() });
            }
        };
        let validity = cert.validity();
        Ok(CertificateInfo {
            identity,
            serial: hex_lower(cert.raw_serial()),
            not_before: system_time(validity.not_before.timestamp()),
            not_after: system_time(validity.not_after.timestamp()),
        })
    }
}

/// Seconds since the epoch as a `SystemTime` (X.509 times are whole seconds).
fn system_time(secs: i64) -> SystemTime {
    let magnitude = Duration::from_secs(secs.unsigned_abs());
    if secs >= 0 {
        UNIX_EPOCH + magnitude
    } else {
        UNIX_EPOCH - magnitude
    }
}

pub(crate) fn hex_lower(bytes: &[u8]) -> String {
    use fmt::Write as _;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        // Writing into a String cannot fail.
        let _ = write!(s, "{b:02x}");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uri_round_trips_for_every_role() {
        for role in Role::ALL {
            let id = PeerIdentity::new("edge-lab", role, "pi-4.kitchen_2").unwrap();
            assert_eq!(id.uri(), format!("shoal://edge-lab/{role}/pi-4.kitchen_2"));
            assert_eq!(PeerIdentity::from_uri(&id.uri()).unwrap(), id);
        }
    }

    #[test]
    fn malformed_uris_are_rejected() {
        for bad in [
            "https://edge/agent/n1",
            "shoal://edge/agent",
            "shoal://edge/agent/n1/extra",
            "shoal:///agent/n1",
            "shoal://edge//n1",
            "shoal://edge/agent/",
            "shoal://edge/admin/n1",
            "shoal://edge/Agent/n1",
            "shoal://ed ge/agent/n1",
            "shoal://edge/agent/n1?x=1",
        ] {
            assert!(PeerIdentity::from_uri(bad).is_err(), "{bad} was accepted");
        }
        let long = "a".repeat(MAX_COMPONENT_LEN + 1);
        assert!(PeerIdentity::new("c", Role::Agent, long).is_err());
        assert!(PeerIdentity::new("c", Role::Agent, "a".repeat(MAX_COMPONENT_LEN)).is_ok());
    }

    #[test]
    fn garbage_der_is_unparseable_not_a_panic() {
        for der in [&b""[..], b"\x30\x03\x02\x01", &[0xff; 64]] {
            let err = CertificateInfo::from_der(der).unwrap_err();
            assert!(matches!(err, IdentityError::Unparseable { .. }), "{err:?}");
            assert_eq!(err.reason(), "certificate_unparseable");
        }
    }

    #[test]
    fn certificates_without_exactly_one_shoal_uri_are_rejected() {
        let key = rcgen::KeyPair::generate().unwrap();
        let plain = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        let der = plain.self_signed(&key).unwrap().der().to_vec();
        assert_eq!(
            CertificateInfo::from_der(&der),
            Err(IdentityError::NoShoalUri)
        );

        let mut other_uri = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        other_uri.subject_alt_names = vec![rcgen::SanType::URI(
            "spiffe://edge/agent/n1".try_into().unwrap(),
        )];
        let der = other_uri.self_signed(&key).unwrap().der().to_vec();
        assert_eq!(
            CertificateInfo::from_der(&der),
            Err(IdentityError::NoShoalUri)
        );

        let mut two = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        two.subject_alt_names = vec![
            rcgen::SanType::URI("shoal://edge/agent/n1".try_into().unwrap()),
            rcgen::SanType::URI("shoal://edge/coordinator/n1".try_into().unwrap()),
        ];
        let der = two.self_signed(&key).unwrap().der().to_vec();
        assert_eq!(
            CertificateInfo::from_der(&der),
            Err(IdentityError::AmbiguousShoalUri { count: 2 })
        );

        let mut bad = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        bad.subject_alt_names = vec![rcgen::SanType::URI(
            "shoal://edge/root/n1".try_into().unwrap(),
        )];
        let der = bad.self_signed(&key).unwrap().der().to_vec();
        assert_eq!(
            CertificateInfo::from_der(&der).unwrap_err().reason(),
            "malformed_shoal_identity"
        );
    }

    #[test]
    fn negative_timestamps_map_before_the_epoch() {
        assert_eq!(system_time(-10), UNIX_EPOCH - Duration::from_secs(10));
        assert_eq!(system_time(10), UNIX_EPOCH + Duration::from_secs(10));
    }
}
