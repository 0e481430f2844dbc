//! The admin endpoint: `/metrics`, `/healthz`, `/ready`, and `/debug/...` views of the
//! model, the subscribers and the problems found.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::objects::Problem;
use crate::server::Shared;

/// What the admin endpoint shows.
pub struct Admin {
    /// Shared controller state.
    pub shared: Arc<Shared>,
    /// Every metric.
    pub registry: Registry,
    /// The problems of the last translation.
    pub problems: Arc<Mutex<Vec<Problem>>>,
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

fn json(value: &impl serde::Serialize) -> Response<Full<Bytes>> {
    respond(
        StatusCode::OK,
        "application/json",
        serde_json::to_string_pretty(value).unwrap_or_default(),
    )
}

impl Admin {
    fn route(&self, req: &Request<Incoming>) -> Response<Full<Bytes>> {
        match req.uri().path() {
            "/metrics" => {
                let mut text = String::new();
                match prometheus_client::encoding::text::encode(&mut text, &self.registry) {
                    Ok(()) => respond(StatusCode::OK, "application/openmetrics-text; version=1.0.0; charset=utf-8", text),
                    Err(e) => respond(StatusCode::INTERNAL_SERVER_ERROR, "text/plain", e.to_string()),
                }
            }
            "/healthz" => respond(StatusCode::OK, "text/plain", "ok\n"),
            "/ready" => {
                let version = *self.shared.version.borrow();
                if version > 0 {
                    respond(StatusCode::OK, "text/plain", format!("ready: model version {version}\n"))
                } else {
                    respond(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "not ready: the cluster has not been read yet\n")
                }
            }
            "/debug/subscribers" => json(&self.shared.subscribers()),
            // What `weftctl status` and `check` read: this build, the model's epoch
            // and version (as node-proxies report theirs), and each subscriber.
            "/debug/status" => {
                let epoch = self.shared.store.read().expect("store lock is never poisoned").epoch();
                json(&serde_json::json!({
                    "version": env!("CARGO_PKG_VERSION"),
                    "epoch": format!("{epoch:016x}"),
                    "modelVersion": *self.shared.version.borrow(),
                    "subscribers": self.shared.subscribers(),
                }))
            }
            "/debug/problems" => {
                let problems = self.problems.lock().expect("problems lock is never poisoned").clone();
                json(&problems)
            }
            "/debug/model" => {
                let store = self.shared.store.read().expect("store lock is never poisoned");
                let mut kinds = std::collections::BTreeMap::<&str, usize>::new();
                for (key, _) in store.iter() {
                    *kinds.entry(key.kind.as_str()).or_default() += 1;
                }
                json(&serde_json::json!({
                    "epoch": format!("{:016x}", store.epoch()),
                    "version": store.version(),
                    "resources": kinds,
                }))
            }
            _ => respond(
                StatusCode::NOT_FOUND,
                "text/plain",
                "not found; try /metrics, /healthz, /ready, /debug/status, /debug/model, /debug/subscribers or /debug/problems\n",
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
                    let response = this.route(&req);
                    async move { Ok::<_, Infallible>(response) }
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
