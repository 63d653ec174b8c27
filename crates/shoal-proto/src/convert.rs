//! Conversions between the wire's error classes and status codes and the domain's.

use crate::v1;
use shoal_types::ErrorClass;
use tonic::Code;

/// The wire enum value for a class.
pub fn class_to_wire(c: ErrorClass) -> v1::ErrorClass {
    match c {
        ErrorClass::InvalidRequest => v1::ErrorClass::InvalidRequest,
        ErrorClass::NotFound => v1::ErrorClass::NotFound,
        ErrorClass::Unavailable => v1::ErrorClass::Unavailable,
        ErrorClass::CapacityExhausted => v1::ErrorClass::CapacityExhausted,
        ErrorClass::Cancelled => v1::ErrorClass::Cancelled,
        ErrorClass::DeadlineExceeded => v1::ErrorClass::DeadlineExceeded,
        ErrorClass::Unauthenticated => v1::ErrorClass::Unauthenticated,
        ErrorClass::PermissionDenied => v1::ErrorClass::PermissionDenied,
        ErrorClass::Internal => v1::ErrorClass::Internal,
    }
}

/// The class of a wire enum value; unknown values (a newer peer) count as internal.
pub fn class_from_wire(c: i32) -> ErrorClass {
    match v1::ErrorClass::try_from(c) {
        Ok(v1::ErrorClass::InvalidRequest) => ErrorClass::InvalidRequest,
        Ok(v1::ErrorClass::NotFound) => ErrorClass::NotFound,
        Ok(v1::ErrorClass::Unavailable) => ErrorClass::Unavailable,
        Ok(v1::ErrorClass::CapacityExhausted) => ErrorClass::CapacityExhausted,
        Ok(v1::ErrorClass::Cancelled) => ErrorClass::Cancelled,
        Ok(v1::ErrorClass::DeadlineExceeded) => ErrorClass::DeadlineExceeded,
        Ok(v1::ErrorClass::Unauthenticated) => ErrorClass::Unauthenticated,
        Ok(v1::ErrorClass::PermissionDenied) => ErrorClass::PermissionDenied,
        _ => ErrorClass::Internal,
    }
}

/// The gRPC status code a class is rendered as.
pub fn code_for_class(c: ErrorClass) -> Code {
    match c {
        ErrorClass::InvalidRequest => Code::InvalidArgument,
        ErrorClass::NotFound => Code::NotFound,
        ErrorClass::Unavailable => Code::Unavailable,
        ErrorClass::CapacityExhausted => Code::ResourceExhausted,
        ErrorClass::Cancelled => Code::Cancelled,
        ErrorClass::DeadlineExceeded => Code::DeadlineExceeded,
        ErrorClass::Unauthenticated => Code::Unauthenticated,
        ErrorClass::PermissionDenied => Code::PermissionDenied,
        ErrorClass::Internal => Code::Internal,
    }
}

/// The class a status code most likely means, for statuses that carry no class header
/// (transport failures, peers of other implementations).
pub fn class_for_code(code: Code) -> ErrorClass {
    match code {
        Code::InvalidArgument | Code::OutOfRange | Code::FailedPrecondition => {
            ErrorClass::InvalidRequest
        }
        Code::NotFound => ErrorClass::NotFound,
        Code::Unavailable | Code::Aborted => ErrorClass::Unavailable,
        Code::ResourceExhausted => ErrorClass::CapacityExhausted,
        Code::Cancelled => ErrorClass::Cancelled,
        Code::DeadlineExceeded => ErrorClass::DeadlineExceeded,
        Code::Unauthenticated => ErrorClass::Unauthenticated,
        Code::PermissionDenied => ErrorClass::PermissionDenied,
        _ => ErrorClass::Internal,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_round_trip_through_the_wire_and_status_codes() {
        for c in ErrorClass::ALL {
            assert_eq!(class_from_wire(class_to_wire(c) as i32), c);
            assert_eq!(class_for_code(code_for_class(c)), c);
        }
        assert_eq!(class_from_wire(999), ErrorClass::Internal);
    }
}
