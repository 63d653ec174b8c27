//! Serving a router on a listener, plain or over TLS, with graceful shutdown.

use axum::Router;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::error::ApiError;
use crate::state::ApiState;
use crate::tls::TlsListener;

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

/// Serves the gateway of `state` on `listener` (HTTPS when the configuration names a
/// certificate) until `shutdown` is cancelled, drains like [`serve`], then closes the state:
/// pending audit entries and key usage are written before this returns.
pub async fn serve_gateway(
    listener: TcpListener,
    state: ApiState,
    shutdown: CancellationToken,
) -> Result<(), ApiError> {
    let router = crate::router(state.clone());
    let served = match state.tls_config() {
        None => serve(listener, router, shutdown).await,
        Some(config) => {
            if let Ok(addr) = listener.local_addr() {
                tracing::info!(%addr, "HTTPS gateway listening");
            }
            let listener = TlsListener::new(listener, config, state.metrics().clone());
            let served = axum::serve(listener, router)
                .with_graceful_shutdown(shutdown.cancelled_owned())
                .await
                .map_err(|source| ApiError::Serve { source });
            tracing::info!("HTTPS gateway stopped");
            served
        }
    };
    state.close().await;
    served
}
