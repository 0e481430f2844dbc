//! Label sets shared by the processes' metrics.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

/// One label, `kind`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    /// What kind.
    pub kind: String,
}

/// Counts one `kind` in `family`.
pub fn count(family: &Family<KindLabels, Counter>, kind: &str) {
    family
        .get_or_create(&KindLabels {
            kind: kind.to_owned(),
        })
        .inc();
}
