//! The gateway's typed configuration. The binary fills it from defaults, file, env and flags;
//! this crate only validates it once, at start-up, reporting every problem together.

use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use crate::audit::AuditConfig;
use crate::tls::TlsFiles;

/// Configuration of the HTTP gateway.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiConfig {
    /// Address the binary binds its listener to (`serve` itself takes a bound listener).
    pub bind: SocketAddr,
    /// Largest accepted request body in bytes; larger ones are refused with 413 without being
    /// read in full.
    pub body_limit_bytes: usize,
    /// Generation requests admitted at once; the next one gets 429 instead of waiting.
    pub max_in_flight: usize,
    /// Value of the `Retry-After` header on 429 and 503 responses (rounded up to whole seconds).
    pub retry_after: Duration,
    /// Interval of SSE comment lines sent while a stream is idle (long prefill), which keep
    /// proxies from timing out and let a dead connection be noticed.
    pub sse_keep_alive: Duration,
    /// When set, `/v1/*` requires `Authorization: Bearer <api_key>` (or a key from the file).
    pub api_key: Option<String>,
    /// The API key file (`shoal key`); once it holds a key, `/v1/*` requires one. Re-read when
    /// it changes.
    pub api_keys_file: Option<PathBuf>,
    /// Require a key on `/v1/*` even while the key file holds none.
    pub require_api_key: bool,
    /// Serve HTTPS with this certificate and key instead of plain HTTP.
    pub tls: Option<TlsFiles>,
    /// Append one hash-chained entry per generation request to this log.
    pub audit: Option<AuditConfig>,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            bind: SocketAddr::from((Ipv4Addr::LOCALHOST, 8080)),
            body_limit_bytes: 1024 * 1024,
            max_in_flight: 64,
            retry_after: Duration::from_secs(1),
            sse_keep_alive: Duration::from_secs(15),
            api_key: None,
            api_keys_file: None,
            require_api_key: false,
            tls: None,
            audit: None,
        }
    }
}

// Hand-written so the API key never lands in a log line.
impl fmt::Debug for ApiConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiConfig")
            .field("bind", &self.bind)
            .field("body_limit_bytes", &self.body_limit_bytes)
            .field("max_in_flight", &self.max_in_flight)
            .field("retry_after", &self.retry_after)
            .field("sse_keep_alive", &self.sse_keep_alive)
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .field("api_keys_file", &self.api_keys_file)
            .field("require_api_key", &self.require_api_key)
            .field("tls", &self.tls)
            .field("audit", &self.audit)
            .finish()
    }
}

/// One thing wrong with an [`ApiConfig`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ConfigProblem {
    /// `body_limit_bytes` is 0, so no request could be read.
    #[error("body_limit_bytes must be at least 1")]
    ZeroBodyLimit,
    /// `max_in_flight` is 0, so every request would be refused.
    #[error("max_in_flight must be at least 1")]
    ZeroMaxInFlight,
    /// `sse_keep_alive` is zero, which would spin.
    #[error("sse_keep_alive must be longer than zero")]
    ZeroKeepAlive,
    /// `api_key` is set but empty, which would accept `Authorization: Bearer `.
    #[error("api_key is set but empty")]
    EmptyApiKey,
    /// `require_api_key` without a key file or `api_key`: no request could ever pass.
    #[error("require_api_key needs an API key file or an api_key")]
    RequireWithoutKeys,
    /// The audit queue cannot hold an entry for every admitted request.
    #[error("the audit queue capacity must be larger than max_in_flight")]
    AuditQueueTooSmall,
}

impl ApiConfig {
    /// Checks every field and returns all problems found, not just the first.
    pub fn validate(&self) -> Result<(), Vec<ConfigProblem>> {
        let mut problems = Vec::new();
        if self.body_limit_bytes == 0 {
            problems.push(ConfigProblem::ZeroBodyLimit);
        }
        if self.max_in_flight == 0 {
            problems.push(ConfigProblem::ZeroMaxInFlight);
        }
        if self.sse_keep_alive.is_zero() {
            problems.push(ConfigProblem::ZeroKeepAlive);
        }
        if self.api_key.as_deref().is_some_and(str::is_empty) {
            problems.push(ConfigProblem::EmptyApiKey);
        }
        if self.require_api_key && self.api_keys_file.is_none() && self.api_key.is_none() {
            problems.push(ConfigProblem::RequireWithoutKeys);
        }
        if self
            .audit
            .as_ref()
            .is_some_and(|a| a.queue_capacity <= self.max_in_flight)
        {
            problems.push(ConfigProblem::AuditQueueTooSmall);
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }

    /// `Retry-After` in whole seconds, at least 1 (a 0 would invite an immediate retry storm).
    pub(crate) fn retry_after_secs(&self) -> u64 {
        let secs = self.retry_after.as_secs();
        let rounded = if self.retry_after.subsec_nanos() > 0 {
            secs.saturating_add(1)
        } else {
            secs
        };
        rounded.max(1)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap
mod tests {
    use super::*;

    #[test]
    fn default_is_valid() {
        assert_eq!(ApiConfig::default().validate(), Ok(()));
        assert_eq!(ApiConfig::default().body_limit_bytes, 1 << 20);
    }

    #[test]
    fn reports_every_problem() {
        let config = ApiConfig {
            body_limit_bytes: 0,
            max_in_flight: 0,
            sse_keep_alive: Duration::ZERO,
            api_key: Some(String::new()),
            ..ApiConfig::default()
        };
        assert_eq!(
            config.validate(),
            Err(vec![
                ConfigProblem::ZeroBodyLimit,
                ConfigProblem::ZeroMaxInFlight,
                ConfigProblem::ZeroKeepAlive,
                ConfigProblem::EmptyApiKey,
            ])
        );
        let config = ApiConfig {
            require_api_key: true,
            max_in_flight: 10,
            audit: Some(AuditConfig {
                queue_capacity: 10,
                ..AuditConfig::new("audit.jsonl")
            }),
            ..ApiConfig::default()
        };
        assert_eq!(
            config.validate(),
            Err(vec![
                ConfigProblem::RequireWithoutKeys,
                ConfigProblem::AuditQueueTooSmall,
            ])
        );
    }

    #[test]
    fn debug_redacts_api_key() {
        let config = ApiConfig {
            api_key: Some("sk-secret".into()),
            ..ApiConfig::default()
        };
        let shown = format!("{config:?}");
        assert!(!shown.contains("sk-secret"), "{shown}");
        assert!(shown.contains("<redacted>"), "{shown}");
    }

    #[test]
    fn retry_after_rounds_up_and_is_never_zero() {
        let secs = |retry_after| {
            ApiConfig {
                retry_after,
                ..ApiConfig::default()
            }
            .retry_after_secs()
        };
        assert_eq!(secs(Duration::from_millis(1500)), 2);
        assert_eq!(secs(Duration::ZERO), 1);
        assert_eq!(secs(Duration::from_secs(7)), 7);
    }
}
