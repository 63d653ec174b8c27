//! The router's shared state: configuration, backend, admission semaphore, metrics and the
//! parent cancellation token of every request. Built once, validated once, cloned per request.

use std::fmt;
use std::sync::Arc;

use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::audit::{AuditLog, AuditSlot};
use crate::auth::{Authenticator, Principal};
use crate::backend::InferenceBackend;
use crate::config::ApiConfig;
use crate::error::{ApiError, RequestError};
use crate::metrics::Metrics;

/// Shared state of the gateway's router. Cheap to clone.
#[derive(Clone)]
pub struct ApiState {
    inner: Arc<Inner>,
}

struct Inner {
    config: ApiConfig,
    backend: Arc<dyn InferenceBackend>,
    admission: Arc<Semaphore>,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
    auth: Authenticator,
    audit: Option<AuditLog>,
    tls: Option<Arc<rustls::ServerConfig>>,
}

impl fmt::Debug for ApiState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiState")
            .field("config", &self.inner.config)
            .field(
                "available_permits",
                &self.inner.admission.available_permits(),
            )
            .finish_non_exhaustive()
    }
}

impl ApiState {
    /// Validates `config` and builds the state: loads the API key file and the TLS certificate,
    /// and opens the audit log (starting its writer thread).
    ///
    /// `cancel` is the gateway's node in the cancellation tree: every request runs under a child
    /// of it. Cancelling it is the last phase of shutdown ("cancel the rest"): in-flight
    /// generations end, streams close with a `shutting_down` error, and [`crate::serve`]'s drain
    /// completes.
    pub fn try_new(
        config: ApiConfig,
        backend: Arc<dyn InferenceBackend>,
        cancel: CancellationToken,
    ) -> Result<Self, ApiError> {
        Self::try_new_with_metrics(config, backend, cancel, Arc::new(Metrics::new()))
    }

    /// Like [`ApiState::try_new`], exposing `metrics` (built with
    /// [`Metrics::with_extension`] to carry the embedding process's own metrics).
    pub fn try_new_with_metrics(
        config: ApiConfig,
        backend: Arc<dyn InferenceBackend>,
        cancel: CancellationToken,
        metrics: Arc<Metrics>,
    ) -> Result<Self, ApiError> {
        config
            .validate()
            .map_err(|problems| ApiError::InvalidConfig { problems })?;
        let auth = Authenticator::new(
            config.api_key.clone(),
            config.api_keys_file.as_deref(),
            config.require_api_key,
            metrics.clone(),
        )?;
        let tls = config
            .tls
            .as_ref()
            .map(crate::tls::server_config)
            .transpose()?;
        let audit = config
            .audit
            .as_ref()
            .map(|a| AuditLog::open(a, metrics.clone()))
            .transpose()?;
        Ok(Self {
            inner: Arc::new(Inner {
                admission: Arc::new(Semaphore::new(config.max_in_flight)),
                config,
                backend,
                metrics,
                cancel,
                auth,
                audit,
                tls,
            }),
        })
    }

    /// The validated configuration.
    pub fn config(&self) -> &ApiConfig {
        &self.inner.config
    }

    /// The gateway's metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.inner.metrics
    }

    /// Whether the gateway serves HTTPS.
    pub fn is_tls(&self) -> bool {
        self.inner.tls.is_some()
    }

    /// Writes everything the gateway still holds: pending audit entries (then closes the log,
    /// so later requests are refused) and key usage. The last step of shutdown, after the
    /// server stopped; [`crate::serve_gateway`] calls it.
    pub async fn close(&self) {
        if let Some(audit) = &self.inner.audit
            && !audit.close().await
        {
            tracing::error!(
                "the audit log was not closed cleanly; its last entries may be missing"
            );
        }
        self.inner.auth.save_usage();
    }

    /// Waits until every audit entry of a finished request is on disk (for tests and tools).
    pub async fn flush_audit(&self) -> bool {
        match &self.inner.audit {
            Some(audit) => audit.flush().await,
            None => true,
        }
    }

    pub(crate) fn backend(&self) -> &dyn InferenceBackend {
        self.inner.backend.as_ref()
    }

    pub(crate) fn admission(&self) -> &Arc<Semaphore> {
        &self.inner.admission
    }

    pub(crate) fn tls_config(&self) -> Option<Arc<rustls::ServerConfig>> {
        self.inner.tls.clone()
    }

    /// A fresh token for one request, cancelled with the gateway's.
    pub(crate) fn request_token(&self) -> CancellationToken {
        self.inner.cancel.child_token()
    }

    pub(crate) fn is_shutting_down(&self) -> bool {
        self.inner.cancel.is_cancelled()
    }

    /// Renders a request error, adding the configured `Retry-After` to retryable classes.
    pub(crate) fn render(&self, err: RequestError) -> Response {
        err.with_default_retry_after(self.inner.config.retry_after_secs())
            .into_response()
    }

    /// Checks `Authorization: Bearer <key>` when keys are required.
    pub(crate) fn authorize(&self, headers: &HeaderMap) -> Result<(), RequestError> {
        self.authenticate(headers).map(drop)
    }

    /// Like [`ApiState::authorize`], returning the key that authenticated the request.
    pub(crate) fn authenticate(
        &self,
        headers: &HeaderMap,
    ) -> Result<Option<Principal>, RequestError> {
        self.inner.auth.authenticate(headers)
    }

    /// Applies the key's quota and rate limit to a generation request.
    pub(crate) fn admit_key(&self, principal: Option<&Principal>) -> Result<(), RequestError> {
        self.inner.auth.admit(principal)
    }

    /// A slot in the audit log for one request (none when auditing is off).
    pub(crate) async fn audit_slot(&self) -> Result<Option<(AuditSlot, bool)>, RequestError> {
        match &self.inner.audit {
            Some(audit) => Ok(Some((audit.reserve().await?, audit.include_text()))),
            None => Ok(None),
        }
    }
}
