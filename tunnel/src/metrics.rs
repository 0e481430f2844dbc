//! Tunnel counters, registered into a caller-supplied registry under `hbone_`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Which side of the tunnel counted.
pub const INBOUND: &str = "inbound";
/// Which side of the tunnel counted.
pub const OUTBOUND: &str = "outbound";

/// Labels of per-direction series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    /// `inbound` (server) or `outbound` (client).
    pub direction: &'static str,
}

/// Labels of refusal series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusalLabels {
    /// `inbound` (server) or `outbound` (client).
    pub direction: &'static str,
    /// Short machine-readable reason, e.g. `untrusted_chain`, `bad_authority`.
    pub reason: &'static str,
}

/// The tunnel's series. Cheap to clone: every field is a shared handle.
#[derive(Clone, Debug, Default)]
pub struct Metrics {
    /// mTLS connections established.
    pub connections: Family<DirectionLabels, Counter>,
    /// mTLS connections currently open.
    pub connections_open: Family<DirectionLabels, Gauge>,
    /// TLS handshakes that failed, by reason.
    pub handshake_failures: Family<RefusalLabels, Counter>,
    /// CONNECT streams established (answered 200).
    pub streams: Family<DirectionLabels, Counter>,
    /// CONNECT streams currently open.
    pub streams_open: Family<DirectionLabels, Gauge>,
    /// CONNECT streams refused, by reason.
    pub stream_refusals: Family<RefusalLabels, Counter>,
}

impl Metrics {
    /// Creates the series and registers them under `hbone_` in `registry`.
    pub fn new(registry: &mut Registry) -> Self {
        let m = Metrics::default();
        let r = registry.sub_registry_with_prefix("hbone");
        r.register(
            "connections",
            "mTLS connections established",
            m.connections.clone(),
        );
        r.register(
            "connections_open",
            "mTLS connections currently open",
            m.connections_open.clone(),
        );
        r.register(
            "handshake_failures",
            "TLS handshakes that failed, by reason",
            m.handshake_failures.clone(),
        );
        r.register("streams", "CONNECT streams established", m.streams.clone());
        r.register(
            "streams_open",
            "CONNECT streams currently open",
            m.streams_open.clone(),
        );
        r.register(
            "stream_refusals",
            "CONNECT streams refused, by reason",
            m.stream_refusals.clone(),
        );
        m
    }

    pub(crate) fn handshake_failed(&self, direction: &'static str, reason: &'static str) {
        self.handshake_failures
            .get_or_create(&RefusalLabels { direction, reason })
            .inc();
    }

    pub(crate) fn stream_refused(&self, direction: &'static str, reason: &'static str) {
        self.stream_refusals
            .get_or_create(&RefusalLabels { direction, reason })
            .inc();
    }

    /// Count of refusals with this direction and reason; for tests and debugging.
    pub fn refusals(&self, direction: &'static str, reason: &'static str) -> u64 {
        self.stream_refusals
            .get_or_create(&RefusalLabels { direction, reason })
            .get()
            + self
                .handshake_failures
                .get_or_create(&RefusalLabels { direction, reason })
                .get()
    }
}

#[cfg(test)]
mod tests {
    use prometheus_client::encoding::text::encode;

    use super::*;

    #[test]
    fn series_names_match_the_docs() {
        let mut registry = Registry::default();
        let m = Metrics::new(&mut registry);
        m.connections
            .get_or_create(&DirectionLabels { direction: INBOUND })
            .inc();
        m.connections_open
            .get_or_create(&DirectionLabels { direction: INBOUND })
            .inc();
        m.streams
            .get_or_create(&DirectionLabels {
                direction: OUTBOUND,
            })
            .inc();
        m.streams_open
            .get_or_create(&DirectionLabels {
                direction: OUTBOUND,
            })
            .inc();
        m.handshake_failed(INBOUND, "not_tls");
        m.stream_refused(INBOUND, "bad_method");
        let mut text = String::new();
        encode(&mut text, &registry).unwrap();
        for line in [
            r#"hbone_connections_total{direction="inbound"} 1"#,
            r#"hbone_connections_open{direction="inbound"} 1"#,
            r#"hbone_streams_total{direction="outbound"} 1"#,
            r#"hbone_streams_open{direction="outbound"} 1"#,
            r#"hbone_handshake_failures_total{direction="inbound",reason="not_tls"} 1"#,
            r#"hbone_stream_refusals_total{direction="inbound",reason="bad_method"} 1"#,
        ] {
            assert!(text.contains(line), "missing {line} in:\n{text}");
        }
        assert_eq!(m.refusals(INBOUND, "not_tls"), 1);
    }
}
