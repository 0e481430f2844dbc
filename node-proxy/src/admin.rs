//! The admin endpoint: `/metrics`, `/healthz`, `/ready`, `/config_dump`.

use std::sync::Arc;

use http::StatusCode;
use prometheus_client::registry::Registry;
use runtime::admin::Answer;
use tokio::net::TcpListener;

use crate::proxy::{Ctx, Pods};

/// The admin listener handed over by the node-proxy this one replaces; it must be
/// bound to `addr`, the address this process is configured with.
pub fn adopt(fd: std::os::fd::OwnedFd, addr: std::net::SocketAddr) -> anyhow::Result<TcpListener> {
    let socket = socket2::Socket::from(fd);
    let local = socket.local_addr().ok().and_then(|a| a.as_socket());
    // Port 0 in the configuration means any port.
    let matches = local.is_some_and(|l| l == addr || (addr.port() == 0 && l.ip() == addr.ip()));
    if !matches || !socket.is_listener().unwrap_or(false) {
        anyhow::bail!("the admin listener handed over is bound to {local:?}, not {addr}");
    }
    socket.set_nonblocking(true)?;
    Ok(TcpListener::from_std(socket.into())?)
}

/// What the admin endpoint reads.
pub struct Admin {
    /// Shared proxy state.
    pub ctx: Arc<Ctx>,
    /// The pods.
    pub pods: Arc<Pods>,
    /// Every metric of the process.
    pub registry: Registry,
}

impl runtime::admin::Routes for Admin {
    fn route<'a>(&'a self, path: &'a str) -> tunnel::hbone::BoxFuture<'a, Answer> {
        Box::pin(self.answer(path))
    }
}

impl Admin {
    async fn answer(&self, path: &str) -> Answer {
        match path {
            "/metrics" => runtime::admin::metrics(&self.registry),
            "/healthz" => (StatusCode::OK, "text/plain", "ok\n".into()),
            "/ready" => {
                let status = self
                    .ctx
                    .model_status
                    .lock()
                    .expect("status lock is never poisoned")
                    .clone();
                if status.loaded {
                    (
                        StatusCode::OK,
                        "text/plain",
                        format!("ready: model version {}\n", status.version),
                    )
                } else {
                    let why = status
                        .last_error
                        .unwrap_or_else(|| "no model loaded yet".into());
                    (
                        StatusCode::SERVICE_UNAVAILABLE,
                        "text/plain",
                        format!("not ready: {why}\n"),
                    )
                }
            }
            "/config_dump" => {
                let model = self.ctx.model.load();
                let certificates: Vec<_> = self
                    .ctx
                    .identities
                    .expiries()
                    .into_iter()
                    .map(|(id, not_after)| {
                        let secs = not_after
                            .duration_since(std::time::UNIX_EPOCH)
                            .map_or(0, |d| d.as_secs());
                        serde_json::json!({"identity": id.to_string(), "notAfter": secs})
                    })
                    .collect();
                let dump = serde_json::json!({
                    "node": self.ctx.node,
                    "version": env!("CARGO_PKG_VERSION"),
                    "certificates": certificates,
                    "modelStatus": *self.ctx.model_status.lock().expect("status lock is never poisoned"),
                    "model": &**model,
                    "pods": self.pods.list().await,
                    "identitiesHeld": self.ctx.identities.held(),
                    "hboneConnections": self.ctx.pool.connections(),
                });
                runtime::admin::json(&dump)
            }
            _ => (
                StatusCode::NOT_FOUND,
                "text/plain",
                "not found; try /metrics, /healthz, /ready or /config_dump\n".into(),
            ),
        }
    }
}
