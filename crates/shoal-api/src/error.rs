//! Errors of this crate, and the one place where an [`ErrorClass`] becomes an HTTP status.
//!
//! [`RequestError`] is what a single request fails with; it renders as OpenAI's error JSON
//! `{"error":{"message","type","param","code"}}` where `code` is the stable reason. The status
//! and `type` come from [`http_status_and_type`], the only class-to-HTTP mapping in the crate
//! (streaming errors reuse the same body). [`ApiError`] is what the crate's own functions
//! (start-up, serving) fail with.

use std::borrow::Cow;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use shoal_types::ErrorClass;

use crate::backend::BackendError;
use crate::config::ConfigProblem;

/// Failures of the crate's own operations (not of individual requests).
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The configuration failed validation; every problem is listed.
    #[error("invalid API configuration: {}", join_problems(.problems))]
    InvalidConfig {
        /// Everything wrong, in field order.
        problems: Vec<ConfigProblem>,
    },
    /// The API key file could not be loaded.
    #[error("API keys: {0}")]
    Keys(#[from] crate::keys::KeyError),
    /// The audit log could not be opened.
    #[error("{0}")]
    Audit(#[from] crate::audit::AuditError),
    /// The gateway's certificate or key could not be loaded.
    #[error("gateway TLS: {0}")]
    Tls(#[from] crate::tls::TlsError),
    /// The HTTP server stopped with an I/O error.
    #[error("HTTP server failed")]
    Serve {
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

fn join_problems(problems: &[ConfigProblem]) -> String {
    problems
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// Stable reason codes the gateway itself produces (backends bring their own).
pub mod reason {
    /// The body is not valid JSON.
    pub const INVALID_JSON: &str = "invalid_json";
    /// The body names a parameter the API does not have.
    pub const UNKNOWN_PARAMETER: &str = "unknown_parameter";
    /// A parameter has the wrong type or is missing.
    pub const INVALID_TYPE: &str = "invalid_type";
    /// A parameter is out of range or otherwise unacceptable.
    pub const INVALID_VALUE: &str = "invalid_value";
    /// A known OpenAI parameter whose non-default value shoal does not implement.
    pub const UNSUPPORTED_PARAMETER: &str = "unsupported_parameter";
    /// The body is larger than the configured limit (rendered as 413).
    pub const BODY_TOO_LARGE: &str = "body_too_large";
    /// The body could not be read from the connection.
    pub const BODY_READ_FAILED: &str = "body_read_failed";
    /// The `Content-Type` is not `application/json` (rendered as 415).
    pub const UNSUPPORTED_MEDIA_TYPE: &str = "unsupported_media_type";
    /// The method is not allowed on this path (rendered as 405).
    pub const METHOD_NOT_ALLOWED: &str = "method_not_allowed";
    /// No such path.
    pub const UNKNOWN_URL: &str = "unknown_url";
    /// The requested model is not served.
    pub const MODEL_NOT_FOUND: &str = "model_not_found";
    /// Missing or wrong API key.
    pub const INVALID_API_KEY: &str = "invalid_api_key";
    /// The admission limit is reached.
    pub const TOO_MANY_REQUESTS: &str = "too_many_requests";
    /// The API key's rate limit is reached (429 with `Retry-After`).
    pub const RATE_LIMIT_EXCEEDED: &str = "rate_limit_exceeded";
    /// The API key's token quota is spent (429, not worth retrying).
    pub const INSUFFICIENT_QUOTA: &str = "insufficient_quota";
    /// The API key file cannot be read, so no key can be checked (503).
    pub const AUTH_UNAVAILABLE: &str = "auth_unavailable";
    /// The audit log cannot take the request's entry (503).
    pub const AUDIT_UNAVAILABLE: &str = "audit_unavailable";
    /// The client went away before the response was complete (audit log only).
    pub const CLIENT_DISCONNECTED: &str = "client_disconnected";
    /// The server is shutting down and cancelled the request.
    pub const SHUTTING_DOWN: &str = "shutting_down";
    /// The backend cancelled the generation on its own.
    pub const GENERATION_CANCELLED: &str = "generation_cancelled";
    /// The backend's event stream ended without a terminal event.
    pub const BACKEND_STREAM_TRUNCATED: &str = "backend_stream_truncated";
}

/// What clients read for [`ErrorClass::Internal`], whatever the cause.
const INTERNAL_MESSAGE: &str = "The server had an error while processing your request.";

/// The HTTP status and OpenAI error `type` for a class and reason. This is the only mapping from
/// [`ErrorClass`] to HTTP in the crate; the reason only refines statuses that HTTP distinguishes
/// and the class catalogue does not (413, 415, 405 are all "invalid request").
pub fn http_status_and_type(class: ErrorClass, reason: &str) -> (StatusCode, &'static str) {
    match class {
        ErrorClass::InvalidRequest => {
            let status = match reason {
                reason::BODY_TOO_LARGE => StatusCode::PAYLOAD_TOO_LARGE,
                reason::UNSUPPORTED_MEDIA_TYPE => StatusCode::UNSUPPORTED_MEDIA_TYPE,
                reason::METHOD_NOT_ALLOWED => StatusCode::METHOD_NOT_ALLOWED,
                _ => StatusCode::BAD_REQUEST,
            };
            (status, "invalid_request_error")
        }
        ErrorClass::NotFound => (StatusCode::NOT_FOUND, "not_found_error"),
        ErrorClass::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "service_unavailable_error"),
        ErrorClass::CapacityExhausted => {
            let kind = match reason {
                // OpenAI's own type for a spent quota, so clients stop retrying.
                reason::INSUFFICIENT_QUOTA => "insufficient_quota",
                _ => "rate_limit_error",
            };
            (StatusCode::TOO_MANY_REQUESTS, kind)
        }
        // 499 is the de-facto "client closed request" status; the client rarely sees it, but the
        // access log and the status-class metric do.
        ErrorClass::Cancelled => (client_closed_request(), "request_cancelled"),
        ErrorClass::DeadlineExceeded => (StatusCode::GATEWAY_TIMEOUT, "timeout_error"),
        ErrorClass::Unauthenticated => (StatusCode::UNAUTHORIZED, "authentication_error"),
        ErrorClass::PermissionDenied => (StatusCode::FORBIDDEN, "permission_error"),
        ErrorClass::Internal => (StatusCode::INTERNAL_SERVER_ERROR, "server_error"),
    }
}

fn client_closed_request() -> StatusCode {
    StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST)
}

/// Why one request failed, in the form clients see.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{class} ({reason}): {message}")]
pub struct RequestError {
    /// What kind of failure.
    pub class: ErrorClass,
    /// Stable reason code, rendered as the error's `code`.
    pub reason: Cow<'static, str>,
    /// Client-safe description.
    pub message: String,
    /// The offending request parameter, if one is to blame (`messages[0].role`).
    pub param: Option<String>,
    /// Seconds for `Retry-After`; set on retryable classes before rendering.
    pub retry_after_secs: Option<u64>,
}

impl RequestError {
    /// An error without a parameter.
    pub fn new(
        class: ErrorClass,
        reason: impl Into<Cow<'static, str>>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            class,
            reason: reason.into(),
            message: message.into(),
            param: None,
            retry_after_secs: None,
        }
    }

    /// A 400 `invalid_value` blaming `param`.
    pub fn invalid_value(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self::new(ErrorClass::InvalidRequest, reason::INVALID_VALUE, message).with_param(param)
    }

    /// A 400 `unsupported_parameter` blaming `param`.
    pub fn unsupported(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self::new(
            ErrorClass::InvalidRequest,
            reason::UNSUPPORTED_PARAMETER,
            message,
        )
        .with_param(param)
    }

    /// Names the parameter at fault.
    pub fn with_param(mut self, param: impl Into<String>) -> Self {
        self.param = Some(param.into());
        self
    }

    /// Sets `Retry-After` if the class is retryable and none is set yet (a spent quota is not
    /// retryable whatever its class).
    pub fn with_default_retry_after(mut self, secs: u64) -> Self {
        if self.class.is_retryable()
            && self.retry_after_secs.is_none()
            && self.reason != reason::INSUFFICIENT_QUOTA
        {
            self.retry_after_secs = Some(secs);
        }
        self
    }

    /// The OpenAI error JSON body (also used as an SSE error event).
    pub fn body(&self) -> serde_json::Value {
        let (_, kind) = http_status_and_type(self.class, &self.reason);
        let message = if self.class == ErrorClass::Internal {
            INTERNAL_MESSAGE
        } else {
            self.message.as_str()
        };
        serde_json::to_value(ErrorEnvelope {
            error: ErrorBody {
                message,
                kind,
                param: self.param.as_deref(),
                code: &self.reason,
            },
        })
        .unwrap_or(serde_json::Value::Null)
    }
}

impl From<BackendError> for RequestError {
    fn from(err: BackendError) -> Self {
        if err.class == ErrorClass::Internal {
            // The backend's text may carry operator detail; it stays in the log.
            tracing::error!(reason = %err.reason, detail = %err.message, "backend internal error");
        } else {
            tracing::debug!(class = %err.class, reason = %err.reason, "backend refused request");
        }
        Self::new(err.class, err.reason, err.message)
    }
}

#[derive(Serialize)]
struct ErrorEnvelope<'a> {
    error: ErrorBody<'a>,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    param: Option<&'a str>,
    code: &'a str,
}

impl IntoResponse for RequestError {
    fn into_response(self) -> Response {
        let (status, _) = http_status_and_type(self.class, &self.reason);
        let mut response = (status, axum::Json(self.body())).into_response();
        if let Some(secs) = self.retry_after_secs {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        // The metrics middleware reads the class back to label outcomes and logs.
        response.extensions_mut().insert(self.class);
        response
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap
mod tests {
    use super::*;

    #[test]
    fn every_class_has_a_distinct_error_status() {
        let mut seen = std::collections::HashSet::new();
        for class in ErrorClass::ALL {
            let (status, kind) = http_status_and_type(class, "whatever");
            assert!(
                status.is_client_error() || status.is_server_error(),
                "{class}"
            );
            assert!(!kind.is_empty());
            assert!(seen.insert(status), "{class} shares status {status}");
        }
    }

    #[test]
    fn statuses_match_openai_conventions() {
        let status = |class, reason| http_status_and_type(class, reason).0.as_u16();
        assert_eq!(
            status(ErrorClass::InvalidRequest, reason::INVALID_VALUE),
            400
        );
        assert_eq!(
            status(ErrorClass::InvalidRequest, reason::BODY_TOO_LARGE),
            413
        );
        assert_eq!(
            status(ErrorClass::InvalidRequest, reason::UNSUPPORTED_MEDIA_TYPE),
            415
        );
        assert_eq!(status(ErrorClass::Unauthenticated, "x"), 401);
        assert_eq!(status(ErrorClass::NotFound, reason::MODEL_NOT_FOUND), 404);
        assert_eq!(status(ErrorClass::CapacityExhausted, "x"), 429);
        assert_eq!(status(ErrorClass::Internal, "x"), 500);
        assert_eq!(status(ErrorClass::Unavailable, "x"), 503);
    }

    #[test]
    fn internal_message_is_replaced() {
        let err = RequestError::new(ErrorClass::Internal, "oops", "disk /dev/sda1 on fire");
        let body = err.body();
        assert_eq!(body["error"]["message"], INTERNAL_MESSAGE);
        assert_eq!(body["error"]["type"], "server_error");
        assert_eq!(body["error"]["code"], "oops");
        assert!(body["error"]["param"].is_null());
    }

    #[test]
    fn retry_after_only_for_retryable_classes() {
        let err = RequestError::new(ErrorClass::CapacityExhausted, "full", "busy")
            .with_default_retry_after(3);
        assert_eq!(err.retry_after_secs, Some(3));
        let response = err.into_response();
        assert_eq!(response.headers()[header::RETRY_AFTER], "3");

        let err = RequestError::invalid_value("n", "bad").with_default_retry_after(3);
        assert_eq!(err.retry_after_secs, None);
    }

    #[test]
    fn invalid_config_lists_every_problem() {
        let err = ApiError::InvalidConfig {
            problems: vec![ConfigProblem::ZeroBodyLimit, ConfigProblem::EmptyApiKey],
        };
        assert_eq!(
            err.to_string(),
            "invalid API configuration: body_limit_bytes must be at least 1; api_key is set but empty"
        );
    }
}
