//! Which pods the mesh captures. One rule, read by the controller's translation (a pod's
//! workload is `enrolled`) and by the node agent (a pod is captured and handed to
//! node-proxy), so the two can never disagree about a pod.

use std::collections::BTreeMap;

/// The label that enrolls a namespace (`enabled`) or opts a pod out (`disabled`).
pub const MESH_LABEL: &str = "weft.dev/mesh";

/// A namespace's `weft.dev/mesh` label holds a value Weft does not know; the namespace
/// counts as not enrolled.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a value Weft knows; use \"enabled\" to enroll the namespace")]
pub struct UnknownValue(pub String);

/// Whether a namespace with these labels is enrolled: `weft.dev/mesh=enabled`. No label
/// or `disabled` is not enrolled; any other value is not enrolled either, and is an
/// error for the caller to report.
pub fn namespace_enrolled(labels: &BTreeMap<String, String>) -> Result<bool, UnknownValue> {
    match labels.get(MESH_LABEL).map(String::as_str) {
        None | Some("disabled") => Ok(false),
        Some("enabled") => Ok(true),
        Some(other) => Err(UnknownValue(other.to_owned())),
    }
}

/// Whether a pod is captured: its namespace is enrolled, it did not opt out with
/// `weft.dev/mesh=disabled`, and it does not share the node's network namespace.
pub fn pod_enrolled(
    namespace_enrolled: bool,
    pod_labels: &BTreeMap<String, String>,
    host_network: bool,
) -> bool {
    let opted_out = pod_labels.get(MESH_LABEL).map(String::as_str) == Some("disabled");
    namespace_enrolled && !opted_out && !host_network
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(value: Option<&str>) -> BTreeMap<String, String> {
        value
            .map(|v| BTreeMap::from([(MESH_LABEL.to_owned(), v.to_owned())]))
            .unwrap_or_default()
    }

    #[test]
    fn the_rule() {
        assert_eq!(namespace_enrolled(&labels(Some("enabled"))), Ok(true));
        assert_eq!(namespace_enrolled(&labels(Some("disabled"))), Ok(false));
        assert_eq!(namespace_enrolled(&labels(None)), Ok(false));
        assert_eq!(
            namespace_enrolled(&labels(Some("yes"))),
            Err(UnknownValue("yes".into()))
        );
        assert!(pod_enrolled(true, &labels(None), false));
        assert!(pod_enrolled(true, &labels(Some("enabled")), false));
        assert!(!pod_enrolled(true, &labels(Some("disabled")), false));
        assert!(!pod_enrolled(true, &labels(None), true));
        assert!(!pod_enrolled(false, &labels(Some("enabled")), false));
    }
}
