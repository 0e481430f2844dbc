//! Socket helpers every component's listeners share.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tracing::warn;

/// How long an accept loop waits after a failed `accept`.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// The next connection on `listener`. A failed `accept` (out of file descriptors, most
/// often) is logged, naming `what` listens, and retried after a short pause: the
/// condition persists until connections close, so retrying at once would spin a core.
/// Cancel-safe, like [`TcpListener::accept`].
pub async fn accept(listener: &TcpListener, what: &str) -> (TcpStream, SocketAddr) {
    loop {
        match listener.accept().await {
            Ok(accepted) => return accepted,
            Err(e) => {
                warn!("{what}: accept failed: {e}; retrying in {ACCEPT_BACKOFF:?}");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
            }
        }
    }
}
