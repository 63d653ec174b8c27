//! Typed identifiers. Each wraps its raw value so that a node id can never be passed where a
//! request id is expected.

use serde::{Deserialize, Serialize};
use std::fmt;

/// A sequence's identity inside one model runtime: owns one KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SeqId(pub u64);

impl fmt::Display for SeqId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "seq-{}", self.0)
    }
}

macro_rules! string_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            /// Wraps a raw identifier.
            pub fn new(raw: impl Into<String>) -> Self {
                Self(raw.into())
            }
            /// The raw identifier.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl From<&str> for $name {
            fn from(raw: &str) -> Self {
                Self(raw.to_owned())
            }
        }
    };
}

string_id!(
    /// A machine in the cluster.
    NodeId
);
string_id!(
    /// A model as clients name it (for example `smollm2-135m-instruct`).
    ModelId
);
string_id!(
    /// One client request, carried through every hop for tracing and the audit log.
    RequestId
);
