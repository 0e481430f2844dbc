//! The controller's series, under `weft_controller_` and `weft_ca_`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// A label with one value.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    /// The kind (of update, resource, refusal...).
    pub kind: String,
}

/// A refusal reason.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// Why.
    pub reason: &'static str,
}

/// The controller's metrics.
#[derive(Clone, Debug)]
pub struct Metrics {
    /// Open subscriptions.
    pub subscribers: Gauge,
    /// Updates sent, by kind (`full`, `resync`, `delta`).
    pub pushes: Family<KindLabel, Counter>,
    /// Bytes of updates sent (protobuf-encoded size).
    pub pushed_bytes: Counter,
    /// Resources sent (upserts and removals).
    pub pushed_resources: Counter,
    /// Acknowledgements received.
    pub acks: Counter,
    /// Resources proxies refused, by resource kind.
    pub rejections: Family<KindLabel, Counter>,
    /// Subscriptions refused or ended by the controller, by reason.
    pub subscribe_refusals: Family<ReasonLabel, Counter>,
    /// Translations run.
    pub translations: Counter,
    /// Translations of only the pods that changed (the rest of the model kept).
    pub incremental_translations: Counter,
    /// Time one translation and publication takes.
    pub translation_seconds: Histogram,
    /// The model's current version.
    pub model_version: Gauge,
    /// Resources in the model.
    pub resources: Gauge,
    /// Problems found in the objects read.
    pub problems: Gauge,
    /// Leaves signed.
    pub certificates_signed: Counter,
    /// Certificate requests refused, by reason.
    pub certificate_refusals: Family<ReasonLabel, Counter>,
    /// When the CA certificate, or the first above it, expires (Unix seconds).
    pub ca_expires: Gauge,
    /// Status writes to the API server, by result.
    pub status_writes: Family<KindLabel, Counter>,
}

impl Metrics {
    /// Creates and registers the series.
    pub fn new(registry: &mut Registry) -> Self {
        let m = Metrics {
            subscribers: Gauge::default(),
            pushes: Family::default(),
            pushed_bytes: Counter::default(),
            pushed_resources: Counter::default(),
            acks: Counter::default(),
            rejections: Family::default(),
            subscribe_refusals: Family::default(),
            translations: Counter::default(),
            incremental_translations: Counter::default(),
            translation_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 14)),
            model_version: Gauge::default(),
            resources: Gauge::default(),
            problems: Gauge::default(),
            certificates_signed: Counter::default(),
            certificate_refusals: Family::default(),
            ca_expires: Gauge::default(),
            status_writes: Family::default(),
        };
        let r = registry.sub_registry_with_prefix("weft_controller");
        r.register(
            "subscribers",
            "Proxies subscribed to the model",
            m.subscribers.clone(),
        );
        r.register(
            "pushes",
            "Model updates sent to proxies, by kind (full, resync, delta)",
            m.pushes.clone(),
        );
        r.register(
            "pushed_bytes",
            "Bytes of model updates sent to proxies",
            m.pushed_bytes.clone(),
        );
        r.register(
            "pushed_resources",
            "Resources sent to proxies (upserts and removals)",
            m.pushed_resources.clone(),
        );
        r.register("acks", "Update acknowledgements received", m.acks.clone());
        r.register(
            "rejections",
            "Resources proxies refused, by resource kind",
            m.rejections.clone(),
        );
        r.register(
            "subscribe_refusals",
            "Subscriptions refused or ended, by reason",
            m.subscribe_refusals.clone(),
        );
        r.register(
            "translations",
            "Translations of the cluster into the model",
            m.translations.clone(),
        );
        r.register(
            "incremental_translations",
            "Translations of only the pods that changed, the rest of the model kept",
            m.incremental_translations.clone(),
        );
        r.register(
            "translation_seconds",
            "Time to translate and publish the model",
            m.translation_seconds.clone(),
        );
        r.register(
            "model_version",
            "The model's current version",
            m.model_version.clone(),
        );
        r.register("resources", "Resources in the model", m.resources.clone());
        r.register(
            "problems",
            "Problems found in the objects read",
            m.problems.clone(),
        );
        r.register(
            "status_writes",
            "Status writes to the API server, by result",
            m.status_writes.clone(),
        );
        let ca = registry.sub_registry_with_prefix("weft_ca");
        ca.register(
            "certificates_signed",
            "Workload certificates signed",
            m.certificates_signed.clone(),
        );
        ca.register(
            "refusals",
            "Certificate requests refused, by reason",
            m.certificate_refusals.clone(),
        );
        ca.register(
            "expiry_timestamp_seconds",
            "When the CA certificate, or the first certificate above it, expires (Unix time)",
            m.ca_expires.clone(),
        );
        m
    }

    /// Counts one kind of something.
    pub fn count(family: &Family<KindLabel, Counter>, kind: &str) {
        family
            .get_or_create(&KindLabel {
                kind: kind.to_owned(),
            })
            .inc();
    }
}
