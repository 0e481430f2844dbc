//! The admin endpoint: `/metrics`, `/healthz`, `/ready`, `/config_dump`.

use std::sync::Arc;

use http::StatusCode;
use prometheus_client::registry::Registry;
use runtime::admin::Answer;

use crate::proxy::{Ctx, Pods};

/// Where this process is in its life, as `/ready` reports it: Ready only while it serves
/// the node (it owns the handoff socket and holds a model). A DaemonSet's surge waits for
/// that before it deletes the pod it replaces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phase {
    /// Starting: waiting for a model, or taking over from the node-proxy serving now.
    Starting(String),
    /// Serving the node's pods.
    Serving,
    /// Stopping (SIGTERM): draining the connections it holds.
    Stopping,
    /// A newer node-proxy took the node over: this one serves nothing, and never takes
    /// the node back (not when its container restarts either).
    Retired(String),
}

/// What the admin endpoint reads.
pub struct Admin {
    /// Shared proxy state.
    pub ctx: Arc<Ctx>,
    /// The pods.
    pub pods: Arc<Pods>,
    /// Every metric of the process.
    pub registry: Registry,
    /// Where the process is in its life.
    pub phase: Arc<std::sync::Mutex<Phase>>,
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
                let phase = self
                    .phase
                    .lock()
                    .expect("phase lock is never poisoned")
                    .clone();
                match phase {
                    Phase::Serving => {}
                    Phase::Stopping => {
                        return (
                            StatusCode::SERVICE_UNAVAILABLE,
                            "text/plain",
                            "not ready: stopping, draining its connections\n".into(),
                        )
                    }
                    Phase::Starting(why) | Phase::Retired(why) => {
                        return (
                            StatusCode::SERVICE_UNAVAILABLE,
                            "text/plain",
                            format!("not ready: {why}\n"),
                        )
                    }
                }
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
