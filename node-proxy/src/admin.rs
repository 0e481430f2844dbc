//! The admin endpoint: `/metrics`, `/healthz`, `/ready`, `/config_dump`.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::debug;

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

fn respond(
    status: StatusCode,
    content_type: &str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, content_type)
        .body(Full::new(body.into()))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
}

impl Admin {
    async fn route(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        match req.uri().path() {
            "/metrics" => {
                let mut text = String::new();
                match prometheus_client::encoding::text::encode(&mut text, &self.registry) {
                    Ok(()) => respond(
                        StatusCode::OK,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        text,
                    ),
                    Err(e) => respond(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "text/plain",
                        e.to_string(),
                    ),
                }
            }
            "/healthz" => respond(StatusCode::OK, "text/plain", "ok\n"),
            "/ready" => {
                let status = self
                    .ctx
                    .model_status
                    .lock()
                    .expect("status lock is never poisoned")
                    .clone();
                if status.loaded {
                    respond(
                        StatusCode::OK,
                        "text/plain",
                        format!("ready: model version {}\n", status.version),
                    )
                } else {
                    let why = status
                        .last_error
                        .unwrap_or_else(|| "no model loaded yet".into());
                    respond(
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
                respond(
                    StatusCode::OK,
                    "application/json",
                    serde_json::to_string_pretty(&dump).unwrap_or_default(),
                )
            }
            _ => respond(
                StatusCode::NOT_FOUND,
                "text/plain",
                "not found; try /metrics, /healthz, /ready or /config_dump\n",
            ),
        }
    }

    /// Serves until `shutdown`.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, shutdown: CancellationToken) {
        loop {
            let stream = tokio::select! {
                _ = shutdown.cancelled() => return,
                (s, _) = tunnel::net::accept(&listener, "admin") => s,
            };
            let this = self.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let this = this.clone();
                    async move { Ok::<_, Infallible>(this.route(req).await) }
                });
                if let Err(e) = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await
                {
                    debug!("admin connection: {e}");
                }
            });
        }
    }
}
