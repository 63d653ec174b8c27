//! shoal's wire protocol: the `.proto` files in `proto/shoal/v1/` (the public, documented
//! interface another runtime could implement), the code generated from them, the protocol
//! version, and conversions between wire and domain types.
//!
//! Must depend on nothing but prost/tonic and `shoal-types`.

#![allow(missing_docs, clippy::all)] // generated code below

/// Generated messages and services of package `shoal.v1`.
pub mod v1 {
    tonic::include_proto!("shoal.v1");
}

mod convert;

pub use convert::{class_for_code, class_from_wire, class_to_wire, code_for_class};

/// Major protocol version. Peers of another major version refuse each other.
pub const PROTOCOL_VERSION: u32 = 1;

/// Metadata header carrying the caller's protocol version on every call.
pub const VERSION_HEADER: &str = "shoal-protocol-version";
/// Metadata header carrying an error's class.
pub const ERROR_CLASS_HEADER: &str = "shoal-error-class";
/// Metadata header carrying an error's stable reason.
pub const ERROR_REASON_HEADER: &str = "shoal-error-reason";
