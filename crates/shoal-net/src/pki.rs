//! The cluster's private PKI. One self-signed ECDSA P-256 CA per cluster issues every
//! coordinator, agent and client certificate; the certificate's SAN URI carries the peer's
//! identity (see [`crate::identity`]), so trust in a peer means "signed by our CA and naming
//! a role in our cluster". The CA key never leaves the operator's machine except as a file
//! readable by its owner only.

use crate::error::{IdentityError, NetError};
use crate::identity::{PeerIdentity, hex_lower, validate_cluster_id};
use crate::tls::TlsMaterial;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use std::fmt;
use std::fs;
use std::io::Write as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use time::OffsetDateTime;
use x509_parser::extensions::GeneralName;

/// File name of the CA certificate inside a CA directory (and of a node's trust anchor).
pub const CA_CERT_FILE: &str = "ca.crt";
/// File name of the CA private key inside a CA directory (mode 0600).
pub const CA_KEY_FILE: &str = "ca.key";
/// How long a generated CA is valid.
const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Back-dating of new certificates, so peers with slightly slow clocks accept them at once.
const CLOCK_SKEW: Duration = Duration::from_secs(5 * 60);

/// A cluster certificate authority that can issue peer certificates.
pub struct ClusterCa {
    cluster_id: String,
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl fmt::Debug for ClusterCa {
    // The signing key stays out of logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterCa")
            .field("cluster_id", &self.cluster_id)
            .finish_non_exhaustive()
    }
}

/// A freshly issued peer certificate and its private key.
#[derive(Clone)]
pub struct IssuedCert {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// The certificate's private key, PKCS#8 PEM.
    pub key_pem: String,
    /// Serial number, lower-case hex (what [`crate::Revocations::revoke_serial`] takes).
    pub serial: String,
    /// Start of validity (whole seconds, as written in the certificate).
    pub not_before: SystemTime,
    /// End of validity (whole seconds, as written in the certificate).
    pub not_after: SystemTime,
}

impl fmt::Debug for IssuedCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssuedCert")
            .field("serial", &self.serial)
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl IssuedCert {
    /// The TLS material a peer holding this certificate uses, trusting `ca_pem`.
    pub fn into_material(self, ca_pem: impl Into<String>) -> TlsMaterial {
        TlsMaterial {
            ca_pem: ca_pem.into(),
            cert_pem: self.cert_pem,
            key_pem: self.key_pem,
        }
    }
}

impl ClusterCa {
    /// Generates a new self-signed CA for `cluster_id`, valid for ten years.
    pub fn generate(cluster_id: &str) -> Result<ClusterCa, NetError> {
        validate_cluster_id(cluster_id)?;
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|source| {
            NetError::CertGeneration {
                what: "the CA key",
                source,
            }
        })?;
        let now = SystemTime::now();
        let (not_before, _) = x509_time(now.checked_sub(CLOCK_SKEW).unwrap_or(now))?;
        let (not_after, _) = x509_time(now + CA_VALIDITY)?;

        let mut params = CertificateParams::default();
        params.not_before = not_before;
        params.not_after = not_after;
        params.serial_number = Some(random_serial().0);
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::OrganizationName, "shoal");
        params
            .distinguished_name
            .push(DnType::CommonName, format!("shoal cluster CA {cluster_id}"));
        // The cluster id rides in the CA too, so `load` recovers it from the certificate alone.
        params.subject_alt_names = vec![uri_san(&format!("shoal://{cluster_id}"))?];
        // Path length 0: the CA signs peer certificates only, never another CA.
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params
            .self_signed(&key)
            .map_err(|source| NetError::CertGeneration {
                what: "the CA certificate",
                source,
            })?;
        Ok(ClusterCa {
            cluster_id: cluster_id.to_owned(),
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// The cluster this CA belongs to.
    pub fn cluster_id(&self) -> &str {
        &self.cluster_id
    }

    /// The CA certificate, PEM: every peer's trust anchor.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Writes `ca.crt` and `ca.key` (mode 0600) into `dir`, creating it if needed.
    pub fn save(&self, dir: &Path) -> Result<(), NetError> {
        fs::create_dir_all(dir).map_err(|source| NetError::Io {
            action: "creating",
            path: dir.to_owned(),
            source,
        })?;
        write_file(
            &dir.join(CA_KEY_FILE),
            &self.issuer.key().serialize_pem(),
            0o600,
        )?;
        write_file(&dir.join(CA_CERT_FILE), &self.cert_pem, 0o644)
    }

    /// Loads a CA written by [`ClusterCa::save`], checking that key and certificate match.
    pub fn load(dir: &Path) -> Result<ClusterCa, NetError> {
        let cert_path = dir.join(CA_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);
        let cert_pem = read_file(&cert_path)?;
        let key_pem = read_file(&key_path)?;
        warn_if_key_exposed(&key_path);
        let key = KeyPair::from_pem(&key_pem).map_err(|source| NetError::BadPem {
            what: "the CA key",
            path: key_path.clone(),
            source,
        })?;

        let der =
            pem_certificates(&cert_pem)
                .into_iter()
                .next()
                .ok_or(NetError::NotACertificate {
                    what: "the CA certificate",
                })?;
        let (_, cert) =
            x509_parser::parse_x509_certificate(&der).map_err(|_| NetError::NotACertificate {
                what: "the CA certificate",
            })?;
        if cert.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(NetError::KeyMismatch {
                dir: dir.to_owned(),
            });
        }
        let cluster_id = ca_cluster_id(&cert)?;
        let issuer =
            Issuer::from_ca_cert_der(&der.into(), key).map_err(|source| NetError::BadPem {
                what: "the CA certificate",
                path: cert_path,
                source,
            })?;
        Ok(ClusterCa {
            cluster_id,
            cert_pem,
            issuer,
        })
    }

    /// Issues a certificate for `id`, valid from now (less a little clock skew) for `validity`.
    ///
    /// `hosts` are the DNS names or IP addresses clients check the peer's server name
    /// against (for example `localhost`, `127.0.0.1`); a client-only peer may pass none.
    pub fn issue(
        &self,
        id: &PeerIdentity,
        hosts: &[String],
        validity: Duration,
    ) -> Result<IssuedCert, NetError> {
        let now = SystemTime::now();
        self.issue_with_window(
            id,
            hosts,
            now.checked_sub(CLOCK_SKEW).unwrap_or(now),
            now + validity,
        )
    }

    /// Issues a certificate valid exactly from `not_before` to `not_after` (whole seconds).
    ///
    /// Lets tests and tooling produce certificates that are already expired or not yet valid.
    pub fn issue_with_window(
        &self,
        id: &PeerIdentity,
        hosts: &[String],
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<IssuedCert, NetError> {
        id.validate()?;
        if id.cluster_id != self.cluster_id {
            return Err(NetError::ClusterMismatch {
                ca_cluster: self.cluster_id.clone(),
                requested: id.cluster_id.clone(),
            });
        }
        let (nb, not_before) = x509_time(not_before)?;
        let (na, not_after) = x509_time(not_after)?;
        if not_after <= not_before {
            return Err(NetError::InvalidValidity {
                problem: "not_after must be later than not_before",
            });
        }

        let (params, serial_hex) = peer_params(id, hosts, nb, na)?;
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|source| {
            NetError::CertGeneration {
                what: "a peer key",
                source,
            }
        })?;
        let cert =
            params
                .signed_by(&key, &self.issuer)
                .map_err(|source| NetError::CertGeneration {
                    what: "a peer certificate",
                    source,
                })?;
        Ok(IssuedCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            serial: serial_hex,
            not_before,
            not_after,
        })
    }
}

impl ClusterCa {
    /// Signs a certificate for `id` over the public key of a verified signing request: the
    /// key stays with the requester. The identity and validity are the CA's choice; only the
    /// request's host names are taken from it.
    pub fn sign_request(
        &self,
        request: &VerifiedRequest,
        id: &PeerIdentity,
        validity: Duration,
    ) -> Result<SignedCert, NetError> {
        id.validate()?;
        if id.cluster_id != self.cluster_id {
            return Err(NetError::ClusterMismatch {
                ca_cluster: self.cluster_id.clone(),
                requested: id.cluster_id.clone(),
            });
        }
        let now = SystemTime::now();
        // Back-dated for slow clocks, but by a quarter of the lifetime at most, so that a
        // short-lived certificate's renewal point (2/3 of its lifetime) still lies ahead.
        let skew = CLOCK_SKEW.min(validity / 4);
        let (nb, not_before) = x509_time(now.checked_sub(skew).unwrap_or(now))?;
        let (na, not_after) = x509_time(now + validity)?;
        if not_after <= not_before {
            return Err(NetError::InvalidValidity {
                problem: "not_after must be later than not_before",
            });
        }
        let (params, serial) = peer_params(id, &request.hosts, nb, na)?;
        let cert = params
            .signed_by(&request.public_key, &self.issuer)
            .map_err(|source| NetError::CertGeneration {
                what: "a peer certificate",
                source,
            })?;
        Ok(SignedCert {
            cert_pem: cert.pem(),
            serial,
            not_before,
            not_after,
        })
    }

    /// sha256 of the CA certificate (DER), lower-case hex: what a join token pins.
    pub fn fingerprint(&self) -> Result<String, NetError> {
        ca_fingerprint(&self.cert_pem)
    }
}

/// sha256 of the first certificate in `ca_pem` (DER), lower-case hex.
pub fn ca_fingerprint(ca_pem: &str) -> Result<String, NetError> {
    let der = pem_certificates(ca_pem)
        .into_iter()
        .next()
        .ok_or(NetError::NotACertificate {
            what: "the CA certificate",
        })?;
    Ok(sha256_hex(&der))
}

pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    hex_lower(&sha2::Sha256::digest(bytes))
}

/// A certificate the CA signed for a key it never saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedCert {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// Serial number, lower-case hex.
    pub serial: String,
    /// Start of validity (whole seconds).
    pub not_before: SystemTime,
    /// End of validity (whole seconds).
    pub not_after: SystemTime,
}

/// Most host names a signing request may ask for.
const MAX_REQUEST_HOSTS: usize = 16;

/// A node's fresh key pair and the signing request for its certificate. The key is written
/// only by the node itself ([`TlsMaterial::save`], mode 0600).
pub struct CertificateRequest {
    key: KeyPair,
    csr_pem: String,
}

impl fmt::Debug for CertificateRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertificateRequest").finish_non_exhaustive()
    }
}

impl CertificateRequest {
    /// A new ECDSA P-256 key and a request naming `node_id` (subject common name) and
    /// `hosts` (the DNS names or addresses peers reach the node at).
    pub fn generate(node_id: &str, hosts: &[String]) -> Result<Self, NetError> {
        // Checked with the rules of every identity component.
        PeerIdentity::new("request", crate::identity::Role::Agent, node_id)?;
        if hosts.len() > MAX_REQUEST_HOSTS {
            return Err(NetError::InvalidRequest {
                problem: "too many host names",
            });
        }
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|source| {
            NetError::CertGeneration {
                what: "a node key",
                source,
            }
        })?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, node_id.to_owned());
        params.subject_alt_names = hosts
            .iter()
            .map(|h| host_san(h))
            .collect::<Result<_, _>>()?;
        let csr_pem = params
            .serialize_request(&key)
            .and_then(|csr| csr.pem())
            .map_err(|source| NetError::CertGeneration {
                what: "a certificate signing request",
                source,
            })?;
        Ok(CertificateRequest { key, csr_pem })
    }

    /// The request, PEM (what the coordinator signs).
    pub fn csr_pem(&self) -> &str {
        &self.csr_pem
    }

    /// The material this node uses once the CA signed `cert_pem`, trusting `ca_pem`.
    pub fn into_material(self, cert_pem: String, ca_pem: String) -> TlsMaterial {
        TlsMaterial {
            ca_pem,
            cert_pem,
            key_pem: self.key.serialize_pem(),
        }
    }
}

/// A signing request whose signature was checked (the requester holds the key).
#[derive(Debug, Clone)]
pub struct VerifiedRequest {
    /// The node id the request names (its subject common name).
    pub node_id: String,
    /// Host names and addresses it asks for.
    pub hosts: Vec<String>,
    public_key: rcgen::PublicKey,
}

impl VerifiedRequest {
    /// Parses a PEM signing request and checks its signature, its node id and its host
    /// names. Nothing else of the request is used.
    pub fn from_pem(csr_pem: &str) -> Result<Self, NetError> {
        let invalid = |problem| NetError::InvalidRequest { problem };
        let parsed =
            rcgen::CertificateSigningRequestParams::from_pem(csr_pem).map_err(|e| match e {
                rcgen::Error::InvalidCertificationRequestSignature => {
                    invalid("the request's signature does not verify")
                }
                _ => invalid("not a PEM certificate signing request shoal can read"),
            })?;
        let node_id = common_name(&parsed.params.distinguished_name)
            .ok_or_else(|| invalid("the request names no node (no subject common name)"))?;
        PeerIdentity::new("request", crate::identity::Role::Agent, node_id.as_str())?;
        let mut hosts = Vec::new();
        for san in &parsed.params.subject_alt_names {
            let host = match san {
                SanType::DnsName(name) => name.as_str().to_owned(),
                SanType::IpAddress(ip) => ip.to_string(),
                _ => return Err(invalid("only DNS names and IP addresses may be requested")),
            };
            host_san(&host)?;
            hosts.push(host);
        }
        if hosts.len() > MAX_REQUEST_HOSTS {
            return Err(invalid("too many host names"));
        }
        Ok(VerifiedRequest {
            node_id,
            hosts,
            public_key: parsed.public_key,
        })
    }
}

fn common_name(dn: &DistinguishedName) -> Option<String> {
    match dn.get(&DnType::CommonName)? {
        rcgen::DnValue::Utf8String(s) => Some(s.clone()),
        rcgen::DnValue::PrintableString(s) => Some(s.as_str().to_owned()),
        rcgen::DnValue::Ia5String(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

/// The parameters of a peer certificate for `id`: the identity URI and `hosts` as SANs, both
/// key usages, never a CA. Returns the serial too, as hex.
fn peer_params(
    id: &PeerIdentity,
    hosts: &[String],
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
) -> Result<(CertificateParams, String), NetError> {
    let mut params = CertificateParams::default();
    params.not_before = not_before;
    params.not_after = not_after;
    let (serial, serial_hex) = random_serial();
    params.serial_number = Some(serial);
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::OrganizationName, "shoal");
    params
        .distinguished_name
        .push(DnType::CommonName, id.node_id.clone());
    let mut sans = vec![uri_san(&id.uri())?];
    for host in hosts {
        sans.push(host_san(host)?);
    }
    params.subject_alt_names = sans;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    // Every peer both serves and calls (agents talk to each other), so both usages.
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    Ok((params, serial_hex))
}

/// The DER certificates in a PEM text (non-certificate blocks are skipped).
pub(crate) fn pem_certificates(pem: &str) -> Vec<Vec<u8>> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject as _;
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .filter_map(Result::ok)
        .map(|c| c.to_vec())
        .collect()
}

/// The cluster id of a DER CA certificate, if it is a shoal CA.
pub(crate) fn cluster_of_ca_der(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    ca_cluster_id(&cert).ok()
}

/// The cluster id a CA certificate was generated for (its `shoal://<cluster_id>` SAN).
fn ca_cluster_id(cert: &x509_parser::certificate::X509Certificate<'_>) -> Result<String, NetError> {
    let sans = cert
        .subject_alternative_name()
        .map_err(|_| NetError::NotACertificate {
            what: "the CA certificate",
        })?;
    let cluster = sans
        .iter()
        .flat_map(|ext| ext.value.general_names.iter())
        .find_map(|name| match name {
            GeneralName::URI(u) => u.strip_prefix("shoal://"),
            _ => None,
        })
        .ok_or(IdentityError::NoShoalUri)?;
    validate_cluster_id(cluster)?;
    Ok(cluster.to_owned())
}

/// A random positive 128-bit serial, and its hex form.
fn random_serial() -> (SerialNumber, String) {
    let mut bytes: [u8; 16] = rand::random();
    // Clear the top bit so the DER INTEGER is positive without a padding byte; keep the
    // byte non-zero so the encoding is exactly 16 bytes (minimal DER, stable hex).
    bytes[0] = (bytes[0] & 0x7f) | 0x01;
    (SerialNumber::from_slice(&bytes), hex_lower(&bytes))
}

fn uri_san(uri: &str) -> Result<SanType, NetError> {
    let value = uri
        .to_owned()
        .try_into()
        .map_err(|source| NetError::CertGeneration {
            what: "a SAN URI",
            source,
        })?;
    Ok(SanType::URI(value))
}

fn host_san(host: &str) -> Result<SanType, NetError> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(SanType::IpAddress(ip));
    }
    let invalid = |problem| NetError::InvalidHost {
        host: host.to_owned(),
        problem,
    };
    validate_dns_name(host).map_err(invalid)?;
    let name = host
        .to_owned()
        .try_into()
        .map_err(|_| invalid("not an IA5 string"))?;
    Ok(SanType::DnsName(name))
}

/// Checks the preferred DNS name syntax (RFC 1123 labels), which is what TLS clients match.
fn validate_dns_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() || name.len() > 253 {
        return Err("a DNS name has 1 to 253 characters");
    }
    for label in name.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err("each DNS label has 1 to 63 characters");
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Err("DNS labels use letters, digits and '-' only");
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err("a DNS label neither starts nor ends with '-'");
        }
    }
    Ok(())
}

/// A time as X.509 writes it (whole seconds), and the `SystemTime` of exactly that instant.
fn x509_time(t: SystemTime) -> Result<(OffsetDateTime, SystemTime), NetError> {
    let secs: i64 = match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).ok(),
        Err(e) => i64::try_from(e.duration().as_secs()).ok().map(|s| -s),
    }
    .ok_or(NetError::InvalidValidity {
        problem: "time out of range",
    })?;
    let odt = OffsetDateTime::from_unix_timestamp(secs).map_err(|_| NetError::InvalidValidity {
        problem: "time out of range",
    })?;
    // GeneralizedTime in X.509 stops at year 9999.
    if !(0..=9999).contains(&odt.year()) {
        return Err(NetError::InvalidValidity {
            problem: "time outside years 0..=9999",
        });
    }
    let exact = if secs >= 0 {
        UNIX_EPOCH + Duration::from_secs(secs.unsigned_abs())
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
    };
    Ok((odt, exact))
}

pub(crate) fn read_file(path: &Path) -> Result<String, NetError> {
    fs::read_to_string(path).map_err(|source| NetError::Io {
        action: "reading",
        path: path.to_owned(),
        source,
    })
}

/// Writes `contents` to `path` with `mode`, replacing it atomically: a reader sees the old
/// file or the new one, and a private key is never readable by others, not even briefly.
pub(crate) fn write_file(path: &Path, contents: &str, mode: u32) -> Result<(), NetError> {
    let io_err = |action, path: &Path| {
        let path: PathBuf = path.to_owned();
        move |source| NetError::Io {
            action,
            path,
            source,
        }
    };
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(format!(".tmp-{}", std::process::id()));
    let tmp = PathBuf::from(tmp_name);
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        opts.mode(mode);
    }
    #[cfg(not(unix))]
    let _ = mode; // no POSIX modes here; the directory's ACLs decide
    let mut file = opts.open(&tmp).map_err(io_err("creating", &tmp))?;
    #[cfg(unix)]
    {
        // `mode` only applies when the file is created; a stale temp file keeps its own.
        use std::os::unix::fs::PermissionsExt as _;
        file.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(io_err("setting permissions of", &tmp))?;
    }
    file.write_all(contents.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(io_err("writing", &tmp))?;
    drop(file);
    fs::rename(&tmp, path).map_err(io_err("renaming into", path))
}

/// Logs when a private key file is readable by group or others.
pub(crate) fn warn_if_key_exposed(path: &Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        if let Ok(meta) = fs::metadata(path) {
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                tracing::warn!(
                    path = %path.display(),
                    mode = format_args!("{mode:o}"),
                    "private key file is readable by other users; chmod 600 it"
                );
            }
        }
    }
    #[cfg(not(unix))]
    let _ = path;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Role;
    use crate::identity::CertificateInfo;

    fn first_der(pem: &str) -> Vec<u8> {
        pem_certificates(pem).into_iter().next().unwrap()
    }

    #[test]
    fn issued_certificates_carry_identity_serial_and_window() {
        let ca = ClusterCa::generate("edge-lab").unwrap();
        let id = PeerIdentity::new("edge-lab", Role::Agent, "pi-1").unwrap();
        let hosts = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
        let issued = ca.issue(&id, &hosts, Duration::from_secs(3600)).unwrap();
        let info = CertificateInfo::from_der(&first_der(&issued.cert_pem)).unwrap();
        assert_eq!(info.identity, id);
        assert_eq!(info.serial, issued.serial);
        assert_eq!(info.not_after, issued.not_after);
        assert_eq!(info.not_before, issued.not_before);
        assert!(info.not_before < SystemTime::now());

        let der = first_der(&issued.cert_pem);
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        assert!(!cert.is_ca());
        let san = cert.subject_alternative_name().unwrap().unwrap().value;
        let names: Vec<String> = san
            .general_names
            .iter()
            .map(|n| match n {
                GeneralName::URI(u) => format!("uri:{u}"),
                GeneralName::DNSName(d) => format!("dns:{d}"),
                GeneralName::IPAddress(ip) => format!("ip:{ip:?}"),
                other => format!("{other:?}"),
            })
            .collect();
        assert_eq!(
            names,
            [
                "uri:shoal://edge-lab/agent/pi-1",
                "dns:localhost",
                "ip:[127, 0, 0, 1]"
            ]
        );
        // Two certificates never share a serial.
        let again = ca.issue(&id, &hosts, Duration::from_secs(3600)).unwrap();
        assert_ne!(again.serial, issued.serial);
    }

    #[test]
    fn refuses_other_clusters_and_empty_windows() {
        let ca = ClusterCa::generate("edge-lab").unwrap();
        let foreign = PeerIdentity::new("other", Role::Agent, "pi-1").unwrap();
        assert!(matches!(
            ca.issue(&foreign, &[], Duration::from_secs(60)),
            Err(NetError::ClusterMismatch { .. })
        ));
        let id = PeerIdentity::new("edge-lab", Role::Agent, "pi-1").unwrap();
        let now = SystemTime::now();
        assert!(matches!(
            ca.issue_with_window(&id, &[], now, now),
            Err(NetError::InvalidValidity { .. })
        ));
        let bogus = PeerIdentity {
            cluster_id: "edge-lab".into(),
            role: Role::Agent,
            node_id: "a/b".into(),
        };
        assert!(matches!(
            ca.issue(&bogus, &[], Duration::from_secs(60)),
            Err(NetError::Identity(_))
        ));
        for bad in [
            "bad host!",
            "",
            "a..b",
            "-a.lan",
            "a_b.lan",
            &"x".repeat(64),
        ] {
            assert!(
                matches!(
                    ca.issue(&id, &[bad.to_owned()], Duration::from_secs(60)),
                    Err(NetError::InvalidHost { .. })
                ),
                "{bad:?}"
            );
        }
        for good in ["node-1.lan", "localhost", "::1", "10.0.0.7", "A1.example"] {
            assert!(
                ca.issue(&id, &[good.to_owned()], Duration::from_secs(60))
                    .is_ok()
            );
        }
        assert!(ClusterCa::generate("bad/cluster").is_err());
    }

    #[test]
    fn expired_windows_are_written_as_asked() {
        let ca = ClusterCa::generate("edge-lab").unwrap();
        let id = PeerIdentity::new("edge-lab", Role::Client, "cli").unwrap();
        let now = SystemTime::now();
        let issued = ca
            .issue_with_window(
                &id,
                &[],
                now - Duration::from_secs(2 * 86400),
                now - Duration::from_secs(86400),
            )
            .unwrap();
        let info = CertificateInfo::from_der(&first_der(&issued.cert_pem)).unwrap();
        assert!(info.not_after < now);
        assert_eq!(info.not_after, issued.not_after);
    }

    #[test]
    fn save_and_load_round_trip_with_a_private_key_file() {
        let dir = tempfile::tempdir().unwrap();
        let ca = ClusterCa::generate("edge-lab").unwrap();
        ca.save(dir.path()).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = fs::metadata(dir.path().join(CA_KEY_FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let loaded = ClusterCa::load(dir.path()).unwrap();
        assert_eq!(loaded.cluster_id(), "edge-lab");
        assert_eq!(loaded.cert_pem(), ca.cert_pem());

        // The loaded CA signs with the same name and key: its leaf names the saved CA as issuer.
        let id = PeerIdentity::new("edge-lab", Role::Agent, "pi-2").unwrap();
        let leaf = loaded.issue(&id, &[], Duration::from_secs(60)).unwrap();
        let leaf_der = first_der(&leaf.cert_pem);
        let ca_der = first_der(ca.cert_pem());
        let (_, leaf_x) = x509_parser::parse_x509_certificate(&leaf_der).unwrap();
        let (_, ca_x) = x509_parser::parse_x509_certificate(&ca_der).unwrap();
        assert_eq!(leaf_x.issuer(), ca_x.subject());
        leaf_x.verify_signature(Some(ca_x.public_key())).unwrap();
    }

    #[test]
    fn load_rejects_a_key_from_another_ca_and_missing_files() {
        let dir = tempfile::tempdir().unwrap();
        let a = ClusterCa::generate("edge-lab").unwrap();
        let b = ClusterCa::generate("edge-lab").unwrap();
        a.save(dir.path()).unwrap();
        write_file(
            &dir.path().join(CA_KEY_FILE),
            &b.issuer.key().serialize_pem(),
            0o600,
        )
        .unwrap();
        assert!(matches!(
            ClusterCa::load(dir.path()),
            Err(NetError::KeyMismatch { .. })
        ));
        let empty = tempfile::tempdir().unwrap();
        assert!(matches!(
            ClusterCa::load(empty.path()),
            Err(NetError::Io { .. })
        ));
    }
}
