//! The waypoint's request metrics and access log.

use std::net::SocketAddr;

use opentelemetry::trace::TraceId;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use serde::{Serialize, Serializer};
pub use tunnel::access_log::{rfc3339, LogWriter};

/// Labels of a request series.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RequestLabels {
    /// The client's workload name ("" when unknown).
    pub source_workload: String,
    /// The client's namespace.
    pub source_namespace: String,
    /// The client's SPIFFE ID.
    pub source_principal: String,
    /// The service addressed, `namespace/name`.
    pub destination_service: String,
    /// The workload that answered ("" when none did).
    pub destination_workload: String,
    /// Its SPIFFE ID.
    pub destination_principal: String,
    /// The route, `namespace/name` ("" when no route applied).
    pub route: String,
    /// The status returned to the client.
    pub response_code: u16,
    /// What the waypoint did besides forwarding: `retried`, `ejected`, `limited`,
    /// `timed_out`, `faulted`, `no_endpoints`, `denied`, joined by `,`; "-" for none.
    pub response_flags: String,
}

/// Every waypoint metric.
#[derive(Clone)]
pub struct Metrics {
    /// Requests answered.
    pub requests: Family<RequestLabels, Counter>,
    /// Their duration, from the request's head to the response's head.
    pub duration: Family<RequestLabels, Histogram>,
    /// TCP connections forwarded (non-HTTP traffic), by destination service.
    pub tcp: Family<ServiceLabels, Counter>,
    /// Mirrored copies not sent because too many were in flight, by mirror service.
    pub mirrors_skipped: Family<ServiceLabels, Counter>,
    /// Client streams refused at the stream limit.
    pub streams_refused: Counter,
    /// The access log.
    pub log: LogWriter,
    /// The request label sets in use, for [`Metrics::prune`].
    in_use: std::sync::Arc<std::sync::Mutex<std::collections::HashSet<RequestLabels>>>,
}

/// A service label.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ServiceLabels {
    /// `namespace/name`.
    pub destination_service: String,
}

fn histogram() -> Histogram {
    Histogram::new([
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    ])
}

impl Metrics {
    /// Registers every metric, with `log` as the access log.
    pub fn new(registry: &mut Registry, log: LogWriter) -> Self {
        let m = Metrics {
            requests: Family::default(),
            duration: Family::new_with_constructor(histogram),
            tcp: Family::default(),
            mirrors_skipped: Family::default(),
            streams_refused: Counter::default(),
            log,
            in_use: Default::default(),
        };
        m.log.register(registry);
        registry.register(
            "weft_requests",
            "HTTP and gRPC requests answered by the waypoint",
            m.requests.clone(),
        );
        registry.register(
            "weft_request_duration_seconds",
            "Time from a request's head to its response's head at the waypoint",
            m.duration.clone(),
        );
        registry.register(
            "weft_waypoint_tcp_connections",
            "Non-HTTP connections the waypoint forwarded",
            m.tcp.clone(),
        );
        registry.register(
            "weft_waypoint_mirrors_skipped",
            "Mirrored copies of requests not sent because too many were in flight",
            m.mirrors_skipped.clone(),
        );
        registry.register(
            "weft_waypoint_streams_refused",
            "Client streams refused because the waypoint served its maximum (--max-streams)",
            m.streams_refused.clone(),
        );
        m
    }
}

impl Metrics {
    /// The request series of `labels`: its count and its duration.
    pub fn series(&self, labels: &RequestLabels) -> (Counter, Histogram) {
        self.in_use
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(labels.clone());
        (
            self.requests.get_or_create_owned(labels),
            self.duration.get_or_create_owned(labels),
        )
    }

    /// Drops the request series whose client or answering pod is gone
    /// (`live(namespace, name)` says whether one is): the workload labels are pod names,
    /// and every rollout brings new ones, whose series would otherwise stay in memory and
    /// on the metrics page for good. Returns how many went.
    pub fn prune(&self, live: impl Fn(&str, &str) -> bool) -> usize {
        let gone = |namespace: &str, name: &str| !name.is_empty() && !live(namespace, name);
        let mut in_use = self.in_use.lock().unwrap_or_else(|e| e.into_inner());
        let before = in_use.len();
        in_use.retain(|l| {
            // The answering pod's namespace is in its principal (a backend may be a
            // service of another namespace than the one addressed).
            let namespace = l
                .destination_principal
                .split_once("/ns/")
                .and_then(|(_, rest)| rest.split('/').next());
            let keep = !gone(&l.source_namespace, &l.source_workload)
                && namespace.is_none_or(|ns| !gone(ns, &l.destination_workload));
            if !keep {
                self.requests.remove(l);
                self.duration.remove(l);
            }
            keep
        });
        before - in_use.len()
    }
}

/// One access-log line: printed to stdout as JSON when a response's head is sent.
#[derive(Debug, Serialize)]
pub struct AccessLog<'a> {
    /// RFC 3339 time the request arrived (UTC, milliseconds).
    pub start_time: String,
    /// The client's address.
    #[serde(serialize_with = "display")]
    pub source_address: SocketAddr,
    /// The client's SPIFFE ID.
    pub source_principal: &'a str,
    /// Method.
    pub method: &'a str,
    /// Authority (`Host`).
    pub authority: &'a str,
    /// Path and query.
    pub path: &'a str,
    /// `HTTP/1.1`, `HTTP/2`.
    pub protocol: &'a str,
    /// Status returned.
    pub response_code: u16,
    /// See [`RequestLabels::response_flags`].
    pub response_flags: &'a str,
    /// Route, `namespace/name`.
    pub route: &'a str,
    /// The backend service chosen.
    pub upstream_service: &'a str,
    /// The endpoint that answered ("" when none did).
    #[serde(serialize_with = "display_or_empty")]
    pub upstream_host: Option<SocketAddr>,
    /// Attempts made (1 without retries).
    pub attempts: u32,
    /// Milliseconds to the response's head.
    pub duration_ms: f64,
    /// The W3C trace id.
    #[serde(serialize_with = "display")]
    pub trace_id: TraceId,
    /// The policy that denied the request, if one did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub denied_by: Option<&'a str>,
}

/// A line's usual size: written into one allocation.
const LINE: usize = 512;

impl AccessLog<'_> {
    /// Hands the line to the log writer (see [`LogWriter`] for what bounds it).
    pub fn emit(&self, log: &LogWriter) {
        let mut line = Vec::with_capacity(LINE);
        if serde_json::to_writer(&mut line, self).is_ok() {
            log.send(line);
        }
    }
}

/// Serializes a value as its `Display` string, formatted straight into the line.
fn display<T: std::fmt::Display, S: Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

fn display_or_empty<T: std::fmt::Display, S: Serializer>(
    v: &Option<T>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match v {
        Some(v) => s.collect_str(v),
        None => s.serialize_str(""),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_series_of_pods_gone_leave() {
        let mut registry = Registry::default();
        let m = Metrics::new(&mut registry, LogWriter::off());
        let labels = |from: &str, to: &str| RequestLabels {
            source_workload: from.into(),
            source_namespace: "web".into(),
            destination_service: "shop/cart".into(),
            destination_workload: to.into(),
            // A backend of another namespace than the service addressed.
            destination_principal: "spiffe://cluster.local/ns/shop-canary/sa/cart".into(),
            response_code: 200,
            ..RequestLabels::default()
        };
        for (from, to) in [
            ("web-old", "cart-1"),
            ("web-new", "cart-1"),
            ("web-new", "cart-0"),
            ("", "cart-1"),
        ] {
            let (requests, _) = m.series(&labels(from, to));
            requests.inc();
        }
        let page = |r: &Registry| {
            let mut text = String::new();
            prometheus_client::encoding::text::encode(&mut text, r).expect("encode");
            text
        };
        let live = |namespace: &str, name: &str| {
            matches!(
                (namespace, name),
                ("web", "web-new") | ("shop-canary", "cart-1")
            )
        };
        assert_eq!(m.prune(live), 2, "web-old's series and cart-0's");
        let text = page(&registry);
        assert!(!text.contains("web-old"), "{text}");
        assert!(!text.contains("cart-0"), "{text}");
        assert!(text.contains("source_workload=\"web-new\""), "{text}");
        assert!(
            text.contains("source_workload=\"\""),
            "an unknown client stays: {text}"
        );
        assert_eq!(m.prune(live), 0);
    }
}
