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
