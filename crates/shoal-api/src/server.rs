//! Serving a router on a listener with graceful shutdown.

use axum::Router;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::error::ApiError;

/// Serves `router` on `listener` until `shutdown` is cancelled, then stops accepting connections
/// and waits for in-flight requests (including open streams) to finish.
///
/// Shutdown has three phases: cancelling `shutdown` stops accepting and starts the drain; the
/// caller bounds the drain with its own deadline, and when it passes cancels the token given to
/// [`crate::ApiState::try_new`], which ends every remaining generation so this future returns.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: CancellationToken,
) -> Result<(), ApiError> {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "HTTP gateway listening");
    }
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
        .map_err(|source| ApiError::Serve { source })?;
    tracing::info!("HTTP gateway stopped");
    Ok(())
}
