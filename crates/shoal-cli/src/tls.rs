//! Where a process's mTLS identity comes from: a directory of issued material, or a cluster
//! directory whose CA issues one on the spot (created on first use), or, for development only,
//! no TLS at all.

use crate::catalog;
use anyhow::{Context, Result, bail};
use clap::Args;
use shoal_net::{CA_CERT_FILE, ClusterCa, PeerIdentity, Role, TlsMaterial, TlsMode};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How long certificates issued from a local cluster directory are valid.
const LOCAL_CERT_VALIDITY: Duration = Duration::from_secs(30 * 24 * 3600);

/// Command-line choice of a process's transport security.
#[derive(Debug, Clone, Args)]
pub struct TlsArgs {
    /// Directory with this peer's certificate, key and the cluster CA (`node.crt`, `node.key`,
    /// `ca.crt`).
    #[arg(long, conflicts_with_all = ["cluster_dir", "insecure_plaintext"])]
    pub tls_dir: Option<PathBuf>,
    /// Cluster directory holding the CA (created on first use); the process issues its own
    /// certificate from it. Default: `$SHOAL_HOME/cluster`.
    #[arg(long, conflicts_with = "insecure_plaintext")]
    pub cluster_dir: Option<PathBuf>,
    /// DEVELOPMENT ONLY: no encryption and no authentication on gRPC links.
    #[arg(long)]
    pub insecure_plaintext: bool,
    /// Extra DNS names or addresses to put in an issued certificate (besides localhost and
    /// 127.0.0.1).
    #[arg(long = "cert-host")]
    pub cert_hosts: Vec<String>,
}

impl TlsArgs {
    /// The transport mode for a peer of `role` named `name`.
    pub fn mode(&self, role: Role, name: &str) -> Result<TlsMode> {
        if self.insecure_plaintext {
            return Ok(TlsMode::Plaintext);
        }
        if let Some(dir) = &self.tls_dir {
            let material = TlsMaterial::load(dir)
                .with_context(|| format!("loading TLS material from {}", dir.display()))?;
            let id = material.identity()?;
            if id.role != role {
                bail!(
                    "the certificate in {} names a {} ({}), not a {role}",
                    dir.display(),
                    id.role,
                    id.uri()
                );
            }
            return Ok(TlsMode::Mtls(material));
        }
        let dir = self
            .cluster_dir
            .clone()
            .unwrap_or_else(|| catalog::shoal_home().join("cluster"));
        let ca = open_or_create_ca(&dir)?;
        let material = issue(&ca, role, name, &self.cert_hosts)?;
        Ok(TlsMode::Mtls(material))
    }
}

/// The CA in `dir`, created (with a fresh cluster id) when there is none.
pub fn open_or_create_ca(dir: &Path) -> Result<ClusterCa> {
    if dir.join(CA_CERT_FILE).exists() {
        return ClusterCa::load(dir)
            .with_context(|| format!("loading the CA in {}", dir.display()));
    }
    let id = format!("shoal-{:016x}", rand::random::<u64>());
    let ca = ClusterCa::generate(&id)?;
    ca.save(dir)
        .with_context(|| format!("saving the CA in {}", dir.display()))?;
    tracing::info!(cluster = id, dir = %dir.display(), "created a cluster CA");
    Ok(ca)
}

/// Material for `role`/`name` issued by `ca`, valid for loopback plus `hosts`.
pub fn issue(ca: &ClusterCa, role: Role, name: &str, hosts: &[String]) -> Result<TlsMaterial> {
    let id = PeerIdentity::new(ca.cluster_id(), role, name)
        .with_context(|| format!("naming {role} {name}"))?;
    let mut all = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
    all.extend(hosts.iter().cloned());
    let cert = ca
        .issue(&id, &all, LOCAL_CERT_VALIDITY)
        .with_context(|| format!("issuing a certificate for {}", id.uri()))?;
    Ok(cert.into_material(ca.cert_pem()))
}

/// Arguments of `shoal ca init`.
#[derive(Debug, Args)]
pub struct CaInitArgs {
    /// Cluster directory to create the CA in. Default: `$SHOAL_HOME/cluster`.
    #[arg(long)]
    pub cluster_dir: Option<PathBuf>,
}

/// Creates the cluster CA if the directory has none, and prints the cluster id.
pub fn ca_init(args: CaInitArgs) -> Result<()> {
    let dir = args
        .cluster_dir
        .unwrap_or_else(|| catalog::shoal_home().join("cluster"));
    let ca = open_or_create_ca(&dir)?;
    println!("cluster {} · CA in {}", ca.cluster_id(), dir.display());
    Ok(())
}
