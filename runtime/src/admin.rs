//! The admin endpoint every Weft process serves (`/metrics`, `/healthz`, `/ready` and a
//! dump of its state): plain HTTP/1.1, one answer per path, from [`Routes`].

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use http::{Response, StatusCode};
use http_body_util::Full;
use hyper::body::Bytes;
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::debug;
use tunnel::hbone::BoxFuture;

/// One answer: status, content type, body.
pub type Answer = (StatusCode, &'static str, String);

/// What a process answers on its admin paths.
pub trait Routes: Send + Sync + 'static {
    /// The answer for `path`.
    fn route<'a>(&'a self, path: &'a str) -> BoxFuture<'a, Answer>;
}

/// The registry's series in the text exposition format.
pub fn metrics(registry: &Registry) -> Answer {
    let mut text = String::new();
    match prometheus_client::encoding::text::encode(&mut text, registry) {
        Ok(()) => (
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            text,
        ),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain",
            e.to_string(),
        ),
    }
}

/// A JSON document.
pub fn json(value: &impl serde::Serialize) -> Answer {
    (
        StatusCode::OK,
        "application/json",
        serde_json::to_string_pretty(value).unwrap_or_default(),
    )
}

/// Connections the admin endpoint serves at once; more wait in the listen queue.
pub const MAX_CONNECTIONS: usize = 512;
/// A client sends each request head within this or is disconnected, so that slow or
/// silent clients cannot hold the connections scrapers need.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves `routes` on `listener` until `shutdown`.
pub async fn serve(listener: TcpListener, routes: Arc<dyn Routes>, shutdown: CancellationToken) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let stream = tokio::select! {
            _ = shutdown.cancelled() => return,
            (s, _) = tunnel::net::accept(&listener, "admin") => s,
        };
        let routes = routes.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let service =
                hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let routes = routes.clone();
                    async move {
                        let (status, content_type, body) = routes.route(req.uri().path()).await;
                        let response = Response::builder()
                            .status(status)
                            .header(http::header::CONTENT_TYPE, content_type)
                            .body(Full::new(Bytes::from(body)))
                            .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())));
                        Ok::<_, Infallible>(response)
                    }
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
