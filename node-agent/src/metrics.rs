//! The agent's metrics (`/metrics` on its admin endpoint).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// One label, `what`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct What {
    /// What happened.
    pub what: String,
}

/// Counts one `what` in `family`.
pub fn count(family: &Family<What, Counter>, what: &str) {
    family
        .get_or_create(&What {
            what: what.to_owned(),
        })
        .inc();
}

/// The agent's series.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Pods captured now.
    pub captured: Gauge,
    /// 1 while node-proxy is connected and has the node's pods.
    pub node_proxy: Gauge,
    /// Captures installed.
    pub captures: Counter,
    /// Full sets replayed to node-proxy (one per connection).
    pub replays: Counter,
    /// Looks under `/proc`.
    pub scans: Counter,
    /// Failed attempts, by what failed.
    pub failures: Family<What, Counter>,
    /// Requests of the CNI plugin, by kind.
    pub cni_requests: Family<What, Counter>,
    /// Answers to CNI ADDs: captured, passed, failed.
    pub cni_answers: Family<What, Counter>,
}

impl Metrics {
    /// The series, registered in `registry`.
    pub fn new(registry: &mut Registry) -> Self {
        let m = Metrics::default();
        let r = registry.sub_registry_with_prefix("weft_agent");
        r.register(
            "pods_captured",
            "Pods whose traffic is captured now",
            m.captured.clone(),
        );
        r.register(
            "node_proxy_connected",
            "1 while node-proxy is connected and has been given the node's pods",
            m.node_proxy.clone(),
        );
        r.register("captures", "Captures installed", m.captures.clone());
        r.register(
            "replays",
            "Full sets of pods replayed to node-proxy, one per connection",
            m.replays.clone(),
        );
        r.register(
            "proc_scans",
            "Looks under /proc for pods' network namespaces",
            m.scans.clone(),
        );
        r.register(
            "failures",
            "Failed attempts, by what failed",
            m.failures.clone(),
        );
        r.register(
            "cni_requests",
            "Requests of the CNI plugin, by kind",
            m.cni_requests.clone(),
        );
        r.register(
            "cni_adds",
            "Answers to the CNI plugin's ADDs: captured, passed, failed",
            m.cni_answers.clone(),
        );
        m
    }
}
