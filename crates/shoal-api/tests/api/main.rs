//! HTTP-level tests of the gateway against a scripted backend: through `Router::oneshot` and
//! through a real client on 127.0.0.1:0.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod audit;
mod client;
mod errors;
mod keys;
mod metrics;
mod responses;
mod streaming;
mod support;
mod tls;
