//! The router's shared state: configuration, backend, admission semaphore, metrics and the
//! parent cancellation token of every request. Built once, validated once, cloned per request.

use std::fmt;
use std::sync::Arc;

use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use shoal_types::ErrorClass;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::backend::InferenceBackend;
use crate::config::ApiConfig;
use crate::error::{ApiError, RequestError, reason};
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
    /// Validates `config` and builds the state.
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
        Ok(Self {
            inner: Arc::new(Inner {
                admission: Arc::new(Semaphore::new(config.max_in_flight)),
                config,
                backend,
                metrics,
                cancel,
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

    pub(crate) fn backend(&self) -> &dyn InferenceBackend {
        self.inner.backend.as_ref()
    }

    pub(crate) fn admission(&self) -> &Arc<Semaphore> {
        &self.inner.admission
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

    /// Checks `Authorization: Bearer <key>` when an API key is configured.
    pub(crate) fn authorize(&self, headers: &HeaderMap) -> Result<(), RequestError> {
        let Some(expected) = self.inner.config.api_key.as_deref() else {
            return Ok(());
        };
        let presented = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        match presented {
            Some(key) if constant_time_eq(key.as_bytes(), expected.as_bytes()) => Ok(()),
            Some(_) => Err(RequestError::new(
                ErrorClass::Unauthenticated,
                reason::INVALID_API_KEY,
                "Incorrect API key provided.",
            )),
            None => Err(RequestError::new(
                ErrorClass::Unauthenticated,
                reason::INVALID_API_KEY,
                "Missing API key: send 'Authorization: Bearer <key>'.",
            )),
        }
    }
}

/// Compares without an early exit so response timing does not reveal how much of a guessed key
/// matched (the length is not secret).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap
mod tests {
    use super::*;

    #[test]
    fn constant_time_eq_is_equality() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
        assert!(constant_time_eq(b"", b""));
    }
}
