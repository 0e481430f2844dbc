//! The admin endpoint: `/metrics`, `/healthz`, `/ready`, `/debug/status` (what
//! `weftctl status` reads from each replica through the API server's pod proxy), and the views of the
//! model, the subscribers and the problems found (`/debug/model`, `/debug/subscribers`,
//! `/debug/problems`), which name the mesh's objects: in a cluster those answer only a
//! caller the API server vouches for (a bearer token, TokenReview) and allows
//! (SubjectAccessReview: `get` on the path, a non-resource URL).

use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::objects::Problem;
use crate::server::Shared;

/// Connections the admin endpoint serves at once; more wait in the listen queue.
const MAX_CONNECTIONS: usize = 512;
/// A client sends each request head within this or is disconnected.
const HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// The debug views that name the mesh's objects, and so are authorized.
pub const PROTECTED: [&str; 3] = ["/debug/model", "/debug/subscribers", "/debug/problems"];

/// Why a debug request is refused.
#[derive(Debug, thiserror::Error)]
pub enum DebugDenied {
    /// No bearer token, or one the API server does not accept.
    #[error("unauthenticated: {0}")]
    Unauthenticated(String),
    /// Authenticated, but not allowed `get` on the path.
    #[error("forbidden: {0}")]
    Forbidden(String),
    /// The API server could not be asked.
    #[error("cannot authorize now: {0}")]
    Unavailable(String),
}

/// Decides whether a bearer token may read a debug path.
pub trait DebugAuth: Send + Sync {
    /// Allows, or says why not.
    fn authorize<'a>(
        &'a self,
        token: Option<&'a str>,
        path: &'a str,
    ) -> futures::future::BoxFuture<'a, Result<(), DebugDenied>>;
}

/// What the admin endpoint shows.
pub struct Admin {
    /// Shared controller state.
    pub shared: Arc<Shared>,
    /// Every metric.
    pub registry: Registry,
    /// The problems of the last translation.
    pub problems: Arc<Mutex<Vec<Problem>>>,
    /// Who may read the [`PROTECTED`] views; `None`: anyone who reaches the port (the
    /// sandbox, whose admin endpoint is on the host's loopback).
    pub debug_auth: Option<Arc<dyn DebugAuth>>,
    /// Whether this replica holds the Lease, and its name in it; `None` where nothing
    /// is written back (manifest mode without a status directory).
    pub leading: Option<(crate::leader::Leading, String)>,
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
    /// Authorizes a protected view, then answers.
    async fn handle(&self, req: &Request<Incoming>) -> Response<Full<Bytes>> {
        let path = req.uri().path();
        if let (Some(auth), true) = (&self.debug_auth, PROTECTED.contains(&path)) {
            let token = req
                .headers()
                .get(http::header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .map(str::trim)
                .filter(|t| !t.is_empty());
            if let Err(denied) = auth.authorize(token, path).await {
                let status = match denied {
                    DebugDenied::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
                    DebugDenied::Forbidden(_) => StatusCode::FORBIDDEN,
                    DebugDenied::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
                };
                debug!(path, "debug request refused: {denied}");
                let mut response = respond(status, "text/plain", format!("{denied}\n"));
                if status == StatusCode::UNAUTHORIZED {
                    response.headers_mut().insert(
                        http::header::WWW_AUTHENTICATE,
                        http::HeaderValue::from_static("Bearer"),
                    );
                }
                return response;
            }
        }
        self.route(req)
    }

    /// The subscriptions as `/debug/status` shows them: in full where the debug views
    /// are open (manifest mode); where they are authorized, without what names the
    /// mesh's objects or peers (the last refusal, the peer address), which
    /// `/debug/subscribers` keeps for an authorized caller.
    fn status_subscribers(&self) -> serde_json::Value {
        let subscribers = self.shared.subscribers();
        let mut value = serde_json::to_value(&subscribers).unwrap_or_default();
        if self.debug_auth.is_some() {
            for s in value.as_array_mut().into_iter().flatten() {
                if let Some(o) = s.as_object_mut() {
                    o.remove("peer");
                    o.remove("lastRejection");
                    o.remove("refusedRoutes");
                }
            }
        }
        value
    }

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
                    "leading": self.leading.as_ref().map(|(l, _)| crate::leader::is_leading(l)),
                    "identity": self.leading.as_ref().map(|(_, id)| id),
                    "subscribers": self.status_subscribers(),
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
        // As the proxies' admin endpoints: bounded connections, each request head read
        // within a deadline.
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
        loop {
            let Ok(permit) = slots.clone().acquire_owned().await else {
                return;
            };
            let stream = tokio::select! {
                _ = shutdown.cancelled() => return,
                (s, _) = tunnel::net::accept(&listener, "admin") => s,
            };
            let this = self.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let service = hyper::service::service_fn(move |req| {
                    let this = this.clone();
                    async move { Ok::<_, Infallible>(this.handle(&req).await) }
                });
                if let Err(e) = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT)
                    .serve_connection(TokioIo::new(stream), service)
                    .await
                {
                    debug!("admin connection: {e}");
                }
            });
        }
    }
}
