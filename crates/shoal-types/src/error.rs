//! The closed error taxonomy. Every error that crosses a process boundary is classified once,
//! near its cause, into one of these classes plus a stable reason string; each boundary renders
//! the class once (an HTTP status and OpenAI error JSON in the gateway, a gRPC code between nodes).

use serde::{Deserialize, Serialize};
use std::fmt;

/// What kind of failure happened, as a client or peer needs to know it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorClass {
    /// The request itself is wrong (bad JSON, bad parameter, prompt too long).
    InvalidRequest,
    /// The named thing (model, node, session) does not exist.
    NotFound,
    /// No healthy path can serve the request right now; retrying later may work.
    Unavailable,
    /// Admission refused: queues, quotas or memory are full.
    CapacityExhausted,
    /// The caller cancelled.
    Cancelled,
    /// The request's deadline passed.
    DeadlineExceeded,
    /// No or bad credentials.
    Unauthenticated,
    /// Valid credentials without the right.
    PermissionDenied,
    /// A bug or an unexpected failure; details stay in the operator's logs.
    Internal,
}

impl ErrorClass {
    /// Every class, for metrics that pre-register one series per class.
    pub const ALL: [ErrorClass; 9] = [
        ErrorClass::InvalidRequest,
        ErrorClass::NotFound,
        ErrorClass::Unavailable,
        ErrorClass::CapacityExhausted,
        ErrorClass::Cancelled,
        ErrorClass::DeadlineExceeded,
        ErrorClass::Unauthenticated,
        ErrorClass::PermissionDenied,
        ErrorClass::Internal,
    ];

    /// Stable lower-case name, used as a metric label and on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::InvalidRequest => "invalid_request",
            ErrorClass::NotFound => "not_found",
            ErrorClass::Unavailable => "unavailable",
            ErrorClass::CapacityExhausted => "capacity_exhausted",
            ErrorClass::Cancelled => "cancelled",
            ErrorClass::DeadlineExceeded => "deadline_exceeded",
            ErrorClass::Unauthenticated => "unauthenticated",
            ErrorClass::PermissionDenied => "permission_denied",
            ErrorClass::Internal => "internal",
        }
    }

    /// Whether the same request may succeed if retried elsewhere or later.
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            ErrorClass::Unavailable | ErrorClass::CapacityExhausted
        )
    }
}

impl fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
