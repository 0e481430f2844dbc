//! Per-connection series with the mesh's standard labels.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
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
    /// `identity_mismatch`, `strict_mtls`, `unknown_source`, `unreachable`.
    pub reason: &'static str,
}

/// node-proxy's connection series.
#[derive(Clone, Debug, Default)]
pub struct Metrics {
    /// TCP connections opened.
    pub opened: Family<ConnLabels, Counter>,
    /// TCP connections closed.
    pub closed: Family<ConnLabels, Counter>,
    /// Bytes from source to destination.
    pub sent: Family<ConnLabels, Counter>,
    /// Bytes from destination to source.
    pub received: Family<ConnLabels, Counter>,
    /// Inbound connections refused.
    pub refused: Family<RefusalLabels, Counter>,
}

impl Metrics {
    /// Creates and registers the series under `weft_`.
    pub fn new(registry: &mut Registry) -> Self {
        let m = Metrics::default();
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
            "Bytes sent from source to destination",
            m.sent.clone(),
        );
        r.register(
            "tcp_received_bytes",
            "Bytes sent from destination back to source",
            m.received.clone(),
        );
        r.register(
            "inbound_refusals",
            "Inbound connections refused, by reason",
            m.refused.clone(),
        );
        m
    }

    /// Counts a refusal.
    pub fn refuse(&self, reason: &'static str) {
        self.refused.get_or_create(&RefusalLabels { reason }).inc();
    }

    /// Counts an opened connection and returns a guard that counts its bytes as they
    /// move and its close when dropped.
    pub fn open(&self, labels: ConnLabels) -> ConnGuard {
        self.opened.get_or_create(&labels).inc();
        // The guard keeps the series' counters, not the labels: one copy of the label
        // strings per series instead of one per open connection.
        ConnGuard {
            sent: self.sent.get_or_create(&labels).clone(),
            received: self.received.get_or_create(&labels).clone(),
            closed: self.closed.get_or_create(&labels).clone(),
        }
    }
}

/// One open connection's counters: bytes as they move, its close when dropped.
pub struct ConnGuard {
    sent: Counter,
    received: Counter,
    closed: Counter,
}

impl ConnGuard {
    /// Counts bytes for a tunnel copy whose TCP side is the connection's source (the
    /// client application, outbound) or its destination (the server application, inbound).
    pub fn tunnel(&self, tcp_is_source: bool) -> TunnelBytes<'_> {
        TunnelBytes {
            guard: self,
            tcp_is_source,
        }
    }

    /// Bytes from source to destination.
    pub fn sent(&self) -> &Counter {
        &self.sent
    }

    /// Bytes from destination to source.
    pub fn received(&self) -> &Counter {
        &self.received
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.closed.inc();
    }
}

/// A [`Progress`] for an HBONE copy, from [`ConnGuard::tunnel`].
pub struct TunnelBytes<'a> {
    guard: &'a ConnGuard,
    tcp_is_source: bool,
}

impl Progress for TunnelBytes<'_> {
    fn tcp_to_stream(&self, n: u64) {
        let c = if self.tcp_is_source {
            &self.guard.sent
        } else {
            &self.guard.received
        };
        c.inc_by(n);
    }

    fn stream_to_tcp(&self, n: u64) {
        let c = if self.tcp_is_source {
            &self.guard.received
        } else {
            &self.guard.sent
        };
        c.inc_by(n);
    }
}
