//! Vocabulary shared by every shoal crate: identifiers, half-open layer ranges and the closed
//! error taxonomy ([`ErrorClass`]) that travels on the wire.
//!
//! This crate is plain data. It must not depend on an async runtime, a transport or the model
//! code, so that every other crate can use it.

mod error;
mod ids;
mod range;

pub use error::ErrorClass;
pub use ids::{ModelId, NodeId, RequestId, SeqId};
pub use range::{LayerRange, LayerRangeError};
