//! Per-connection series with the mesh's standard labels, and the connection access log.
//!
//! Byte counters read as Istio's standard metrics do: `weft_tcp_sent_bytes_total` is the
//! response direction (destination to source), `weft_tcp_received_bytes_total` the
//! request direction, so queries written for `istio_tcp_*_bytes_total` read the same.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use serde::Serialize;
use tunnel::access_log::{rfc3339, LogWriter};
use tunnel::hbone::Progress;

/// Who talked to whom, as Prometheus labels.
#[derive(Clone, Debug, Default, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnLabels {
    /// `inbound` (this node served the destination) or `outbound`.
    pub direction: &'static str,
    /// Source pod name (`unknown` outside the mesh model).
    pub source_workload: String,
    /// Source namespace.
    pub source_namespace: String,
    /// Source SPIFFE ID, when proven by mTLS or known from the model.
    pub source_principal: String,
    /// Destination pod name.
    pub destination_workload: String,
    /// Destination namespace.
    pub destination_namespace: String,
    /// Destination SPIFFE ID.
    pub destination_principal: String,
    /// The service the client addressed, when it used a service address.
    pub destination_service: String,
    /// `mutual_tls` through HBONE, `none` for plaintext.
    pub connection_security_policy: &'static str,
}

/// Why an inbound connection was refused, as a label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusalLabels {
    /// `identity_mismatch`, `strict_mtls`, `denied`, `limit`.
    pub reason: &'static str,
}

pub use runtime::metrics::{count, KindLabels};

/// An authorization outcome.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PolicyLabels {
    /// `namespace/name` of the policy that decided.
    pub policy: String,
    /// `deny_policy` or `no_allow_match`.
    pub reason: &'static str,
    /// `connect` (refused when opened) or `recheck` (closed when a policy changed).
    pub when: &'static str,
}

/// node-proxy's connection series.
#[derive(Clone)]
pub struct Metrics {
    /// TCP connections opened.
    pub opened: Family<ConnLabels, Counter>,
    /// TCP connections closed.
    pub closed: Family<ConnLabels, Counter>,
    /// Bytes of the response direction, destination to source (Istio's
    /// `istio_tcp_sent_bytes_total`).
    pub sent: Family<ConnLabels, Counter>,
    /// Bytes of the request direction, source to destination (Istio's
    /// `istio_tcp_received_bytes_total`).
    pub received: Family<ConnLabels, Counter>,
    /// Inbound connections refused.
    pub refused: Family<RefusalLabels, Counter>,
    /// Connections denied by authorization policy, when opened or later.
    pub denied: Family<PolicyLabels, Counter>,
    /// Pod handoffs refused, by reason.
    pub pod_refusals: Family<KindLabels, Counter>,
    /// Connections refused because a connection limit was reached, by limit.
    pub limited: Family<KindLabels, Counter>,
    /// One line per connection on close.
    pub log: LogWriter,
    /// Each series' labels and counters, shared by the connections of that series: an
    /// open connection holds one `Arc`, not a copy of its label strings. Grows with the
    /// series, as the families do.
    series: Arc<Mutex<HashMap<ConnLabels, Arc<Series>>>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::with_log(LogWriter::off())
    }
}

/// One series: its labels and its counters.
struct Series {
    labels: ConnLabels,
    sent: Counter,
    received: Counter,
    closed: Counter,
}

impl Metrics {
    /// Series that log nothing (tests, tools).
    fn with_log(log: LogWriter) -> Self {
        Metrics {
            opened: Family::default(),
            closed: Family::default(),
            sent: Family::default(),
            received: Family::default(),
            refused: Family::default(),
            denied: Family::default(),
            pod_refusals: Family::default(),
            limited: Family::default(),
            log,
            series: Arc::default(),
        }
    }

    /// Creates and registers the series under `weft_`, with `log` as the access log.
    pub fn new(registry: &mut Registry, log: LogWriter) -> Self {
        let m = Metrics::with_log(log);
        m.log.register(registry);
        let r = registry.sub_registry_with_prefix("weft");
        r.register(
            "tcp_connections_opened",
            "TCP connections opened",
            m.opened.clone(),
        );
        r.register(
            "tcp_connections_closed",
            "TCP connections closed",
            m.closed.clone(),
        );
        r.register(
            "tcp_sent_bytes",
            "Bytes of the response direction, destination to source (as istio_tcp_sent_bytes_total)",
            m.sent.clone(),
        );
        r.register(
            "tcp_received_bytes",
            "Bytes of the request direction, source to destination (as istio_tcp_received_bytes_total)",
            m.received.clone(),
        );
        r.register(
            "inbound_refusals",
            "Inbound connections refused, by reason",
            m.refused.clone(),
        );
        r.register(
            "authorization_denials",
            "Connections denied by authorization policy, by policy, reason and when",
            m.denied.clone(),
        );
        r.register(
            "pod_refusals",
            "Pods handed over that node-proxy refused to serve, by reason",
            m.pod_refusals.clone(),
        );
        r.register(
            "connection_limit_refusals",
            "Connections refused at a connection limit, by limit (listener, node)",
            m.limited.clone(),
        );
        m
    }

    /// Counts a refusal.
    pub fn refuse(&self, reason: &'static str) {
        self.refused.get_or_create(&RefusalLabels { reason }).inc();
    }

    /// Counts an opened connection from `source` to `destination` and returns a guard
    /// that counts its bytes as they move, and its close (with an access-log line) when
    /// finished or dropped.
    pub fn open(
        &self,
        labels: ConnLabels,
        source: SocketAddr,
        destination: SocketAddr,
    ) -> ConnGuard {
        let series = {
            let mut all = self.series.lock().unwrap_or_else(|e| e.into_inner());
            // Under the lock, so that a prune cannot take the counter in between.
            self.opened.get_or_create(&labels).inc();
            match all.get(&labels) {
                Some(s) => s.clone(),
                None => {
                    let s = Arc::new(Series {
                        sent: self.sent.get_or_create(&labels).clone(),
                        received: self.received.get_or_create(&labels).clone(),
                        closed: self.closed.get_or_create(&labels).clone(),
                        labels: labels.clone(),
                    });
                    all.insert(labels, s.clone());
                    s
                }
            }
        };
        ConnGuard {
            series,
            log: self.log.clone(),
            source,
            destination,
            started: Instant::now(),
            request: AtomicU64::new(0),
            response: AtomicU64::new(0),
            reason: None,
        }
    }
}

impl Metrics {
    /// Drops the series of which no connection is open and whose source or destination
    /// pod is gone (`live(namespace, name)` says whether one is): every rollout brings
    /// pods of new names, whose series would otherwise stay in memory and on the
    /// metrics page for good. Series of sources outside the mesh model (`unknown`) stay.
    /// Returns how many went.
    pub fn prune(&self, live: impl Fn(&str, &str) -> bool) -> usize {
        let gone = |namespace: &str, name: &str| {
            !name.is_empty() && name != "unknown" && !live(namespace, name)
        };
        let mut all = self.series.lock().unwrap_or_else(|e| e.into_inner());
        let before = all.len();
        all.retain(|labels, series| {
            // The map's reference is the only one: no connection of it is open.
            let keep = Arc::strong_count(series) > 1
                || !(gone(&labels.source_namespace, &labels.source_workload)
                    || gone(&labels.destination_namespace, &labels.destination_workload));
            if !keep {
                self.opened.remove(labels);
                self.closed.remove(labels);
                self.sent.remove(labels);
                self.received.remove(labels);
            }
            keep
        });
        before - all.len()
    }
}

/// One open connection: its bytes as they move, its close and access-log line when
/// finished (or dropped, reason `aborted`).
pub struct ConnGuard {
    series: Arc<Series>,
    log: LogWriter,
    source: SocketAddr,
    destination: SocketAddr,
    started: Instant,
    request: AtomicU64,
    response: AtomicU64,
    reason: Option<Close>,
}

/// Why a connection ended, for the access log.
#[derive(Debug, Clone)]
pub enum Close {
    /// Both sides finished.
    Done,
    /// A side failed; the error.
    Error(String),
    /// An authorization policy changed and no longer allows it.
    Denied,
}

impl Close {
    /// How a copy's result ended the connection.
    pub fn of<T>(result: &std::io::Result<T>) -> Self {
        match result {
            Ok(_) => Close::Done,
            Err(e) => Close::Error(e.to_string()),
        }
    }
}

impl ConnGuard {
    /// Counts bytes for a copy whose TCP side (in [`Progress`]' terms) is the
    /// connection's source (the client application, outbound) or its destination (the
    /// server application, inbound).
    pub fn tunnel(&self, tcp_is_source: bool) -> TunnelBytes<'_> {
        TunnelBytes {
            guard: self,
            tcp_is_source,
        }
    }

    /// Counts `n` bytes from source to destination.
    pub fn request_bytes(&self, n: u64) {
        self.request.fetch_add(n, Ordering::Relaxed);
        self.series.received.inc_by(n);
    }

    /// Counts `n` bytes from destination to source.
    pub fn response_bytes(&self, n: u64) {
        self.response.fetch_add(n, Ordering::Relaxed);
        self.series.sent.inc_by(n);
    }

    /// Ends the connection for `reason`: counts its close and writes its log line.
    pub fn finish(mut self, reason: Close) {
        self.reason = Some(reason);
    }
}

/// One access-log line: a connection, on close.
#[derive(Serialize)]
struct ConnLog<'a> {
    start_time: String,
    direction: &'a str,
    source_address: String,
    source_workload: &'a str,
    source_namespace: &'a str,
    source_principal: &'a str,
    destination_address: String,
    destination_workload: &'a str,
    destination_namespace: &'a str,
    destination_principal: &'a str,
    destination_service: &'a str,
    connection_security_policy: &'a str,
    /// The response direction, as `weft_tcp_sent_bytes_total`.
    bytes_sent: u64,
    /// The request direction, as `weft_tcp_received_bytes_total`.
    bytes_received: u64,
    duration_ms: f64,
    reason: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a str>,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.series.closed.inc();
        if !self.log.admit() {
            return;
        }
        let l = &self.series.labels;
        let elapsed = self.started.elapsed();
        let (reason, error) = match &self.reason {
            Some(Close::Done) => ("closed", None),
            Some(Close::Error(e)) => ("error", Some(e.as_str())),
            Some(Close::Denied) => ("denied", None),
            None => ("aborted", None),
        };
        let line = ConnLog {
            start_time: rfc3339(SystemTime::now() - elapsed),
            direction: l.direction,
            source_address: self.source.to_string(),
            source_workload: &l.source_workload,
            source_namespace: &l.source_namespace,
            source_principal: &l.source_principal,
            destination_address: self.destination.to_string(),
            destination_workload: &l.destination_workload,
            destination_namespace: &l.destination_namespace,
            destination_principal: &l.destination_principal,
            destination_service: &l.destination_service,
            connection_security_policy: l.connection_security_policy,
            bytes_sent: self.response.load(Ordering::Relaxed),
            bytes_received: self.request.load(Ordering::Relaxed),
            duration_ms: elapsed.as_secs_f64() * 1e3,
            reason,
            error,
        };
        if let Ok(bytes) = serde_json::to_vec(&line) {
            self.log.send(bytes);
        }
    }
}

/// A [`Progress`] for a copy, from [`ConnGuard::tunnel`].
pub struct TunnelBytes<'a> {
    guard: &'a ConnGuard,
    tcp_is_source: bool,
}

impl Progress for TunnelBytes<'_> {
    fn tcp_to_stream(&self, n: u64) {
        if self.tcp_is_source {
            self.guard.request_bytes(n);
        } else {
            self.guard.response_bytes(n);
        }
    }

    fn stream_to_tcp(&self, n: u64) {
        if self.tcp_is_source {
            self.guard.response_bytes(n);
        } else {
            self.guard.request_bytes(n);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(from: &str, to: &str) -> ConnLabels {
        ConnLabels {
            direction: "inbound",
            source_workload: from.into(),
            source_namespace: "shop".into(),
            destination_workload: to.into(),
            destination_namespace: "shop".into(),
            connection_security_policy: "mutual_tls",
            ..ConnLabels::default()
        }
    }

    fn page(registry: &Registry) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, registry).expect("encode");
        text
    }

    #[test]
    fn series_of_pods_gone_leave_once_their_connections_are_closed() {
        let mut registry = Registry::default();
        let m = Metrics::new(&mut registry, LogWriter::off());
        let addr: SocketAddr = "10.244.1.5:8080".parse().expect("address");
        let open = |from: &str, to: &str| m.open(labels(from, to), addr, addr);
        drop(open("web-7d4f-old", "cart-0"));
        let still_open = open("web-7d4f-old2", "cart-0");
        drop(open("web-5c9a-new", "cart-0"));
        drop(open("unknown", "cart-0"));
        let before = page(&registry);
        for name in [
            "web-7d4f-old\"",
            "web-7d4f-old2",
            "web-5c9a-new",
            "source_workload=\"unknown",
        ] {
            assert!(before.contains(name), "{name} before: {before}");
        }
        // The old replica set's pods are gone; the new one's and cart-0 run.
        let live = |_: &str, name: &str| name == "web-5c9a-new" || name == "cart-0";
        assert_eq!(m.prune(live), 1);
        let after = page(&registry);
        assert!(!after.contains("web-7d4f-old\""), "{after}");
        assert!(
            after.contains("web-7d4f-old2"),
            "a connection is open: {after}"
        );
        assert!(after.contains("web-5c9a-new"), "{after}");
        assert!(after.contains("source_workload=\"unknown"), "{after}");
        drop(still_open);
        assert_eq!(m.prune(live), 1);
        assert!(!page(&registry).contains("web-7d4f-old2"));
        // A pod of the same name back: its series starts again.
        drop(open("web-7d4f-old", "cart-0"));
        assert!(page(&registry).contains("web-7d4f-old\""));
    }
}
