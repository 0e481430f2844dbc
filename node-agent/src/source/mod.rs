//! Where the agent learns the pods of its node and the namespaces' labels: the API
//! server in a cluster ([`kube`]), a directory of the API server's objects in the
//! sandbox ([`files`]). One trait, two implementations; everything downstream of a
//! [`View`] is the same code.

pub mod files;
pub mod kube;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use api::enrollment::{namespace_enrolled, pod_enrolled};
use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// A pod's lifecycle, as far as capture cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Scheduled, its sandbox not (yet) running.
    Pending,
    /// Running: its processes are on the node.
    Running,
    /// Succeeded or Failed: nothing runs any more.
    Finished,
}

/// What the agent reads of a Pod on its node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourcePod {
    /// `metadata.uid`.
    pub uid: String,
    /// `metadata.namespace`.
    pub namespace: String,
    /// `metadata.name`.
    pub name: String,
    /// `spec.serviceAccountName` (`default` when unset).
    pub service_account: String,
    /// `metadata.labels`.
    pub labels: BTreeMap<String, String>,
    /// `spec.hostNetwork`.
    pub host_network: bool,
    /// `status.podIPs` (or `status.podIP`); empty until the kubelet reports them.
    pub ips: Vec<IpAddr>,
    /// `status.phase`.
    pub phase: Phase,
    /// `metadata.deletionTimestamp` is set.
    pub deleting: bool,
}

impl SourcePod {
    /// The pod, if it is one of `node`'s (and has a UID, as every stored Pod has).
    pub fn of(pod: &Pod, node: &str) -> Option<Self> {
        let spec = pod.spec.as_ref()?;
        if spec.node_name.as_deref() != Some(node) {
            return None;
        }
        let status = pod.status.as_ref();
        let mut ips: Vec<IpAddr> = status
            .and_then(|s| s.pod_ips.as_ref())
            .map(|ips| ips.iter().filter_map(|i| i.ip.parse().ok()).collect())
            .unwrap_or_default();
        if ips.is_empty() {
            ips.extend(
                status
                    .and_then(|s| s.pod_ip.as_deref())
                    .and_then(|ip| ip.parse::<IpAddr>().ok()),
            );
        }
        let phase = match status.and_then(|s| s.phase.as_deref()) {
            Some("Running") => Phase::Running,
            Some("Succeeded" | "Failed") => Phase::Finished,
            _ => Phase::Pending,
        };
        Some(SourcePod {
            uid: pod.metadata.uid.clone().filter(|u| !u.is_empty())?,
            namespace: pod.metadata.namespace.clone().unwrap_or_default(),
            name: pod.metadata.name.clone().unwrap_or_default(),
            service_account: spec
                .service_account_name
                .clone()
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "default".into()),
            labels: pod.metadata.labels.clone().unwrap_or_default(),
            host_network: spec.host_network.unwrap_or(false),
            ips: ips.into_iter().map(|ip| ip.to_canonical()).collect(),
            phase,
            deleting: pod.metadata.deletion_timestamp.is_some(),
        })
    }

    /// `namespace/name`.
    pub fn name(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// The node's pods and every namespace's labels, as the source last saw them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct View {
    /// Everything has been read at least once: until then nothing is decided, so a
    /// restart never drops a pod the source has not listed yet.
    pub synced: bool,
    /// This node's pods, by UID.
    pub pods: BTreeMap<String, SourcePod>,
    /// Namespaces' labels, by name.
    pub namespaces: BTreeMap<String, BTreeMap<String, String>>,
}

impl View {
    /// Builds a view from the objects a source holds.
    pub fn new<'a>(
        node: &str,
        pods: impl IntoIterator<Item = &'a Pod>,
        namespaces: impl IntoIterator<Item = &'a Namespace>,
    ) -> Self {
        View {
            synced: true,
            pods: pods
                .into_iter()
                .filter_map(|p| SourcePod::of(p, node))
                .map(|p| (p.uid.clone(), p))
                .collect(),
            namespaces: namespaces
                .into_iter()
                .filter_map(|n| {
                    Some((
                        n.metadata.name.clone()?,
                        n.metadata.labels.clone().unwrap_or_default(),
                    ))
                })
                .collect(),
        }
    }

    /// Whether pods of namespace `name` are enrolled (the controller's rule).
    pub fn namespace_enrolled(&self, name: &str) -> bool {
        self.enrollment(name).unwrap_or(false)
    }

    /// Whether pods of namespace `name` are enrolled, if the source has shown the
    /// namespace (`None`: not seen, perhaps not yet).
    pub fn enrollment(&self, name: &str) -> Option<bool> {
        self.namespaces
            .get(name)
            .map(|labels| namespace_enrolled(labels).unwrap_or(false))
    }

    /// Whether a pod not held yet should be taken in: enrolled by the controller's rule
    /// and neither finished nor being deleted.
    pub fn wants(&self, pod: &SourcePod) -> bool {
        self.keeps(pod) && !pod.deleting
    }

    /// Whether a pod already held stays in the mesh: enrolled and not finished. A pod
    /// being deleted still runs through its grace period (its connections drain, its
    /// clients may still reach it), so it stays captured until it is gone (CNI DEL or
    /// its object removed): releasing it at `deletionTimestamp` would send its last
    /// connections around mTLS and policy.
    pub fn keeps(&self, pod: &SourcePod) -> bool {
        pod_enrolled(
            self.namespace_enrolled(&pod.namespace),
            &pod.labels,
            pod.host_network,
        ) && pod.phase != Phase::Finished
    }

    /// A pod of this node by namespace and name.
    pub fn by_name(&self, namespace: &str, name: &str) -> Option<&SourcePod> {
        self.pods
            .values()
            .find(|p| p.namespace == namespace && p.name == name)
    }

    /// The enrolled namespaces, sorted.
    pub fn enrolled_namespaces(&self) -> Vec<String> {
        self.namespaces
            .keys()
            .filter(|n| self.namespace_enrolled(n))
            .cloned()
            .collect()
    }
}

/// A source of [`View`]s.
pub trait Source: Send + 'static {
    /// Where it reads, for messages: "the API server", "the objects in DIR".
    fn describe(&self) -> String;

    /// Publishes a new view on `out` whenever what it reads changes, until `shutdown`.
    fn run(
        self: Box<Self>,
        node: String,
        out: watch::Sender<Arc<View>>,
        shutdown: CancellationToken,
    ) -> BoxFuture<'static, ()>;
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn pod_yaml(text: &str) -> Pod {
        serde_yaml_ng::from_str(text).expect("a pod")
    }

    #[test]
    fn a_pod_of_this_node_is_read_as_the_controller_reads_it() {
        let pod = pod_yaml(
            r#"
metadata: {name: cart-1, namespace: shop, uid: u-1, labels: {app: cart}}
spec: {nodeName: node-1, containers: [{name: c}]}
status: {phase: Running, podIPs: [{ip: 10.244.1.7}]}
"#,
        );
        let p = SourcePod::of(&pod, "node-1").expect("on node-1");
        assert_eq!(p.service_account, "default");
        assert_eq!(p.ips, vec!["10.244.1.7".parse::<IpAddr>().expect("ip")]);
        assert_eq!(p.phase, Phase::Running);
        assert!(SourcePod::of(&pod, "node-2").is_none(), "another node's");
        let ns: Namespace =
            serde_yaml_ng::from_str("metadata: {name: shop, labels: {weft.dev/mesh: enabled}}")
                .expect("a namespace");
        let view = View::new("node-1", [&pod], [&ns]);
        assert!(view.wants(&view.pods["u-1"]));
        assert_eq!(view.enrolled_namespaces(), vec!["shop".to_owned()]);
        let mut opted_out = view.clone();
        if let Some(p) = opted_out.pods.get_mut("u-1") {
            p.labels.insert("weft.dev/mesh".into(), "disabled".into());
        }
        assert!(!opted_out.wants(&opted_out.pods["u-1"]));
    }
}
