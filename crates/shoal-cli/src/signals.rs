//! How long-running commands learn they must stop: Ctrl-C, SIGTERM, or the end of standard
//! input (a parent such as `shoal up` holding the other end of a pipe; when it dies, so does
//! the child).

use anyhow::{Context, Result};
use std::future::Future;
use tokio::io::AsyncReadExt;

/// Resolves when the process is asked to stop, or returns `work`'s error if it ends first.
pub async fn until_stopped<E>(
    watch_stdin: bool,
    work: impl Future<Output = Result<(), E>>,
) -> Result<()>
where
    E: std::error::Error + Send + Sync + 'static,
{
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    let stdin_closed = async {
        if !watch_stdin {
            return std::future::pending().await;
        }
        let mut stdin = tokio::io::stdin();
        let mut buf = [0u8; 64];
        loop {
            match stdin.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.context("waiting for Ctrl-C"),
        _ = term.recv() => Ok(()),
        () = stdin_closed => Ok(()),
        r = work => r.context("a server stopped"),
    }
}
