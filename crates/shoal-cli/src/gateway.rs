//! Flags of the OpenAI gateway shared by `shoal coordinator` and `shoal serve`: API keys, HTTPS
//! and the audit log.

use crate::catalog;
use clap::Args;
use shoal_api::ApiConfig;
use shoal_api::audit::AuditConfig;
use shoal_api::keys::KEY_FILE_NAME;
use shoal_api::tls::TlsFiles;
use std::path::{Path, PathBuf};

/// Audit queue slots beyond `max_in_flight` (requests still being read or refused hold one).
const AUDIT_QUEUE_HEADROOM: usize = 4096;

/// Client access control, HTTPS and auditing of the API.
#[derive(Debug, Clone, Args)]
pub struct GatewayArgs {
    /// The API key file `shoal key` manages; once it holds a key, every /v1 request needs
    /// `Authorization: Bearer <key>`. Default: `api-keys.json` in the cluster directory
    /// (`$SHOAL_HOME/cluster`).
    #[arg(long, value_name = "FILE")]
    pub api_keys: Option<PathBuf>,
    /// Refuse /v1 requests without a valid key even while the key file holds none.
    #[arg(long)]
    pub require_api_key: bool,
    /// Serve the API over HTTPS with this PEM certificate chain (with --api-tls-key).
    #[arg(long, value_name = "PEM", requires = "api_tls_key")]
    pub api_tls_cert: Option<PathBuf>,
    /// The PEM private key of --api-tls-cert.
    #[arg(long, value_name = "PEM", requires = "api_tls_cert")]
    pub api_tls_key: Option<PathBuf>,
    /// Append one hash-chained JSON line per generation request to this file (check it with
    /// `shoal audit verify`).
    #[arg(long, value_name = "FILE")]
    pub audit_log: Option<PathBuf>,
    /// Record prompt and completion text in the audit log, not only their SHA-256.
    #[arg(long, requires = "audit_log")]
    pub audit_include_text: bool,
}

impl GatewayArgs {
    /// Sets the key file (default in `cluster_dir`), TLS and audit settings on `api`.
    pub fn apply(&self, api: &mut ApiConfig, cluster_dir: Option<&Path>) {
        let cluster_dir = cluster_dir.map_or_else(default_cluster_dir, Path::to_path_buf);
        api.api_keys_file = Some(
            self.api_keys
                .clone()
                .unwrap_or_else(|| cluster_dir.join(KEY_FILE_NAME)),
        );
        api.require_api_key = self.require_api_key;
        api.tls = self
            .api_tls_cert
            .clone()
            .zip(self.api_tls_key.clone())
            .map(|(cert, key)| TlsFiles { cert, key });
        api.audit = self.audit_log.as_ref().map(|path| AuditConfig {
            include_text: self.audit_include_text,
            queue_capacity: api.max_in_flight.saturating_add(AUDIT_QUEUE_HEADROOM),
            ..AuditConfig::new(path)
        });
    }

    /// `https` when the API is served over TLS, else `http`.
    pub fn scheme(&self) -> &'static str {
        if self.api_tls_cert.is_some() {
            "https"
        } else {
            "http"
        }
    }
}

/// `$SHOAL_HOME/cluster`.
pub fn default_cluster_dir() -> PathBuf {
    catalog::shoal_home().join("cluster")
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        gateway: GatewayArgs,
    }

    #[test]
    fn flags_fill_the_api_config() {
        let cli = Cli::try_parse_from([
            "x",
            "--api-tls-cert=c.pem",
            "--api-tls-key=k.pem",
            "--audit-log=a.jsonl",
            "--audit-include-text",
            "--require-api-key",
        ])
        .unwrap();
        let mut api = ApiConfig::default();
        cli.gateway.apply(&mut api, Some(Path::new("/cluster")));
        assert_eq!(api.validate(), Ok(()));
        assert_eq!(
            api.api_keys_file.as_deref(),
            Some(Path::new("/cluster/api-keys.json"))
        );
        assert!(api.require_api_key);
        assert_eq!(api.tls.unwrap().cert, Path::new("c.pem"));
        let audit = api.audit.unwrap();
        assert!(audit.include_text);
        assert!(audit.queue_capacity > api.max_in_flight);
        assert_eq!(cli.gateway.scheme(), "https");
    }

    #[test]
    fn a_certificate_needs_its_key() {
        assert!(Cli::try_parse_from(["x", "--api-tls-cert=c.pem"]).is_err());
        assert!(Cli::try_parse_from(["x", "--audit-include-text"]).is_err());
    }
}
