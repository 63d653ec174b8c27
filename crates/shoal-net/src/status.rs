//! The error contract on the wire: a gRPC status code plus the `shoal-error-class` and
//! `shoal-error-reason` headers. Errors are rendered here once on the way out and read back
//! here once on the way in, so no other code touches those headers.

use shoal_proto::{ERROR_CLASS_HEADER, ERROR_REASON_HEADER, class_for_code, code_for_class};
use shoal_types::ErrorClass;
use std::error::Error as _;
use tonic::metadata::MetadataValue;
use tonic::{Code, Status};

/// A status for `class` with its stable `reason` and a `message` safe to show the caller.
pub fn status(class: ErrorClass, reason: &str, message: impl Into<String>) -> Status {
    status_with_code(code_for_class(class), class, reason, message)
}

/// Like [`status`], with a code other than the class's usual one (a protocol-version
/// mismatch is `FAILED_PRECONDITION` of class `invalid_request`).
pub fn status_with_code(
    code: Code,
    class: ErrorClass,
    reason: &str,
    message: impl Into<String>,
) -> Status {
    let mut status = Status::new(code, message);
    let md = status.metadata_mut();
    md.insert(
        ERROR_CLASS_HEADER,
        MetadataValue::from_static(class.as_str()),
    );
    // Reasons are snake_case constants; one that is not a valid header value is left off
    // rather than failing the error path.
    if let Ok(v) = MetadataValue::try_from(reason) {
        md.insert(ERROR_REASON_HEADER, v);
    }
    status
}

/// The message tonic gives the `CANCELLED` status it produces when a call's `grpc-timeout`
/// deadline passes (on either side).
const TONIC_TIMEOUT_MESSAGE: &str = "Timeout expired";

/// The class and reason a status carries; statuses without a class header (transport
/// failures, other implementations) are classified by their code.
pub fn class_of(status: &Status) -> (ErrorClass, Option<String>) {
    let md = status.metadata();
    let class = md
        .get(ERROR_CLASS_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_class)
        .unwrap_or_else(|| fallback_class(status));
    let reason = md
        .get(ERROR_REASON_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    (class, reason)
}

/// How rustls words a fatal alert from the peer (its `Error::AlertReceived` message).
const RUSTLS_ALERT_PREFIX: &str = "received fatal alert";

fn fallback_class(status: &Status) -> ErrorClass {
    // A refused TLS handshake reaches the caller as UNKNOWN "transport error"; what it means
    // is that one side did not accept the other's credentials.
    if status.source().is_some_and(is_tls_failure) {
        return ErrorClass::Unauthenticated;
    }
    // tonic reports an expired deadline as CANCELLED rather than DEADLINE_EXCEEDED; its fixed
    // message is the only mark that tells it from a real cancellation.
    if status.code() == Code::Cancelled && status.message() == TONIC_TIMEOUT_MESSAGE {
        return ErrorClass::DeadlineExceeded;
    }
    class_for_code(status.code())
}

/// Whether the chain holds a TLS failure. Before the handshake completes, the rustls error
/// is there as a value; after it (TLS 1.3 reports a refused client certificate on the
/// first read), h2 has flattened it into an `InvalidData` io error carrying only rustls's
/// message, so that message prefix is the one mark left.
fn is_tls_failure(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(err);
    while let Some(e) = cur {
        if e.is::<rustls::Error>() {
            return true;
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && let Some(inner) = io.get_ref()
            && (inner.is::<rustls::Error>()
                || (io.kind() == std::io::ErrorKind::InvalidData
                    && inner.to_string().starts_with(RUSTLS_ALERT_PREFIX)))
        {
            return true;
        }
        cur = e.source();
    }
    false
}

/// The class named by its wire name (`ErrorClass::as_str`).
pub fn parse_class(name: &str) -> Option<ErrorClass> {
    ErrorClass::ALL.into_iter().find(|c| c.as_str() == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_class_survives_a_round_trip_through_a_status() {
        for class in ErrorClass::ALL {
            let s = status(class, "some_reason", "msg");
            assert_eq!(s.code(), code_for_class(class));
            assert_eq!(s.message(), "msg");
            assert_eq!(class_of(&s), (class, Some("some_reason".to_owned())));
        }
    }

    #[test]
    fn the_header_wins_over_the_code_and_the_code_is_the_fallback() {
        let s = status_with_code(
            Code::FailedPrecondition,
            ErrorClass::InvalidRequest,
            "protocol_version_mismatch",
            "x",
        );
        assert_eq!(s.code(), Code::FailedPrecondition);
        assert_eq!(class_of(&s).0, ErrorClass::InvalidRequest);

        let bare = Status::resource_exhausted("full");
        assert_eq!(class_of(&bare), (ErrorClass::CapacityExhausted, None));
        let mut odd = Status::unavailable("x");
        odd.metadata_mut().insert(
            ERROR_CLASS_HEADER,
            MetadataValue::from_static("no_such_class"),
        );
        assert_eq!(class_of(&odd), (ErrorClass::Unavailable, None));
    }

    #[test]
    fn tonics_timeout_status_counts_as_deadline_exceeded() {
        let timeout = Status::cancelled(TONIC_TIMEOUT_MESSAGE);
        assert_eq!(class_of(&timeout).0, ErrorClass::DeadlineExceeded);
        assert_eq!(
            class_of(&Status::cancelled("user")).0,
            ErrorClass::Cancelled
        );
        let tagged = status(ErrorClass::Cancelled, "client_gone", TONIC_TIMEOUT_MESSAGE);
        assert_eq!(class_of(&tagged).0, ErrorClass::Cancelled);
    }

    #[test]
    fn a_tls_failure_under_a_transport_error_is_unauthenticated() {
        let alert = rustls::Error::AlertReceived(rustls::AlertDescription::CertificateExpired);
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, alert);
        let status = Status::from_error(Box::new(io));
        assert_eq!(
            class_of(&status).0,
            ErrorClass::Unauthenticated,
            "{status:?}"
        );
        let flattened = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "received fatal alert: CertificateRequired",
        );
        let status = Status::from_error(Box::new(flattened));
        assert_eq!(
            class_of(&status).0,
            ErrorClass::Unauthenticated,
            "{status:?}"
        );
        let plain_io = std::io::Error::new(std::io::ErrorKind::BrokenPipe, "pipe");
        let status = Status::from_error(Box::new(plain_io));
        assert_ne!(
            class_of(&status).0,
            ErrorClass::Unauthenticated,
            "{status:?}"
        );
    }

    #[test]
    fn an_invalid_reason_is_dropped_not_a_failure() {
        let s = status(ErrorClass::Internal, "bad\nreason", "m");
        assert_eq!(class_of(&s), (ErrorClass::Internal, None));
    }
}
