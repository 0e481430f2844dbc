//! Namespaces and pods: enrollment, mTLS mode, identity, addresses, readiness.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use api::{MtlsMode, Namespace, ObjectName, Resource, Workload};
use k8s_openapi::api::core::v1::Pod;

use super::{
    Audience, Entry, Report, Settings, Translation, MESH_LABEL, MTLS_LABEL, WAYPOINT_LABEL,
};
use crate::objects::{ObjectKind, Objects, Origin, Problem};

/// What translation needs of a namespace.
#[derive(Debug, Clone, Default)]
pub(super) struct NamespaceInfo {
    pub(super) enrolled: bool,
    pub(super) labels: BTreeMap<String, String>,
}

/// A pod on its way to becoming a workload; borrows from the objects.
#[derive(Debug, Clone)]
pub(super) struct PodInfo<'a> {
    pub(super) name: &'a ObjectName,
    pub(super) workload: Workload,
    pub(super) labels: &'a BTreeMap<String, String>,
    pub(super) pod: &'a Pod,
    pub(super) origin: &'a Origin,
}

/// The labels of no pod.
static NO_LABELS: BTreeMap<String, String> = BTreeMap::new();

/// The pods that become workloads, in name order, with the indexes translation needs:
/// by name, each namespace's (contiguous) range, and by label for selectors. Keys borrow
/// from the objects, so building them allocates little.
#[derive(Debug, Default)]
pub(super) struct Pods<'a> {
    pub(super) list: Vec<PodInfo<'a>>,
    by_name: HashMap<&'a ObjectName, usize>,
    by_label: HashMap<(&'a str, &'a str, &'a str), Vec<usize>>,
}

impl<'a> Pods<'a> {
    fn new(list: Vec<PodInfo<'a>>) -> Self {
        let mut by_name = HashMap::with_capacity(list.len());
        let mut by_label: HashMap<(&str, &str, &str), Vec<usize>> = HashMap::new();
        for (i, p) in list.iter().enumerate() {
            by_name.insert(p.name, i);
            for (k, v) in p.labels {
                by_label
                    .entry((p.name.namespace.as_str(), k.as_str(), v.as_str()))
                    .or_default()
                    .push(i);
            }
        }
        Pods {
            list,
            by_name,
            by_label,
        }
    }

    /// The pod called `name`.
    pub(super) fn get_mut(&mut self, name: &ObjectName) -> Option<&mut PodInfo<'a>> {
        let i = *self.by_name.get(name)?;
        self.list.get_mut(i)
    }

    /// The pods of `namespace` carrying `key=value`, in name order.
    pub(super) fn with_label(&self, namespace: &str, key: &str, value: &str) -> Vec<usize> {
        self.by_label
            .get(&(namespace, key, value))
            .cloned()
            .unwrap_or_default()
    }

    /// The pods of `namespace`, in name order.
    pub(super) fn in_namespace<'s>(
        &'s mut self,
        namespace: &'s str,
    ) -> impl Iterator<Item = &'s mut PodInfo<'a>> + 's {
        let start = self
            .list
            .partition_point(|p| p.name.namespace.as_str() < namespace);
        self.list[start..]
            .iter_mut()
            .take_while(move |p| p.name.namespace == namespace)
    }
}

pub(super) fn namespaces(
    objects: &Objects,
    out: &mut Translation,
) -> BTreeMap<String, NamespaceInfo> {
    let mut infos = BTreeMap::new();
    for (name, obj) in &objects.namespaces {
        let labels = obj.value.metadata.labels.clone().unwrap_or_default();
        let mut report =
            Report::cluster(ObjectKind::Namespace, name, &obj.origin, &mut out.problems);
        let enrolled = match super::enrollment::namespace_enrolled(&labels) {
            Ok(enrolled) => enrolled,
            Err(unknown) => {
                report.ignore(
                    format!("metadata.labels[{MESH_LABEL}]"),
                    unknown.to_string(),
                );
                false
            }
        };
        let mtls_mode = match labels
            .get(MTLS_LABEL)
            .map(|v| v.to_ascii_lowercase())
            .as_deref()
        {
            None | Some("permissive") => MtlsMode::Permissive,
            Some("strict") => MtlsMode::Strict,
            Some(other) => {
                // The stricter mode is the safe reading of a value nobody can read.
                report.add(
                    format!("metadata.labels[{MTLS_LABEL}]"),
                    format!("{other:?} is neither \"strict\" nor \"permissive\"; strict is applied until it is fixed"),
                    crate::objects::Effect::FailedClosed,
                    "Invalid",
                );
                MtlsMode::Strict
            }
        };
        let resource = Resource::Namespace(Namespace {
            name: name.clone(),
            enrolled,
            mtls_mode,
        });
        out.entries.insert(
            resource.key(),
            Entry {
                resource,
                audience: Audience::All,
            },
        );
        infos.insert(name.clone(), NamespaceInfo { enrolled, labels });
    }
    infos
}

fn pod_ips(pod: &Pod, report: &mut Report<'_>) -> Result<Vec<IpAddr>, ()> {
    let status = pod.status.as_ref();
    // (position in status.podIPs, or None for status.podIP; the text)
    let listed: Vec<(Option<usize>, &str)> = match status.and_then(|s| s.pod_ips.as_ref()) {
        Some(ips) if !ips.is_empty() => ips
            .iter()
            .enumerate()
            .map(|(i, ip)| (Some(i), ip.ip.as_str()))
            .collect(),
        _ => status
            .and_then(|s| s.pod_ip.as_deref())
            .filter(|ip| !ip.is_empty())
            .map(|ip| vec![(None, ip)])
            .unwrap_or_default(),
    };
    let mut ips = Vec::with_capacity(listed.len());
    for (position, text) in listed {
        match text.parse::<IpAddr>() {
            Ok(ip) => {
                let ip = ip.to_canonical();
                if !ips.contains(&ip) {
                    ips.push(ip);
                }
            }
            Err(_) => {
                let field = match position {
                    Some(i) => format!("status.podIPs[{i}].ip"),
                    None => "status.podIP".to_owned(),
                };
                report.reject(field, format!("{text:?} is not an IP address"));
                return Err(());
            }
        }
    }
    Ok(ips)
}

pub(super) fn pods<'a>(
    objects: &'a Objects,
    settings: &Settings,
    namespaces: &BTreeMap<String, NamespaceInfo>,
    out: &mut Translation,
) -> Pods<'a> {
    let mut pods = Vec::with_capacity(objects.pods.len());
    let mut owners: HashMap<IpAddr, &ObjectName> = HashMap::new();
    let mut uids: HashMap<&str, &ObjectName> = HashMap::new();
    // Service accounts repeat across pods: each is checked once.
    let mut identities: std::collections::HashMap<(&str, String), Result<(), String>> =
        Default::default();
    for (name, obj) in &objects.pods {
        let pod = &obj.value;
        let mut report = Report::new(ObjectKind::Pod, name, &obj.origin, &mut out.problems);
        // A pod without UID or node is not running anywhere yet (in manifest mode: a
        // Pod the sandbox has not started); one that finished gives its IP back.
        let Some(uid) = pod.metadata.uid.as_deref().filter(|u| !u.is_empty()) else {
            continue;
        };
        let spec = pod.spec.as_ref();
        let Some(node) = spec
            .and_then(|s| s.node_name.clone())
            .filter(|n| !n.is_empty())
        else {
            continue;
        };
        let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
        if matches!(phase, Some("Succeeded" | "Failed")) {
            continue;
        }
        if let Some(other) = uids.get(uid) {
            out.collisions += 1;
            report.reject(
                "metadata.uid",
                format!("{uid} is also the UID of pod {other}; UIDs are unique"),
            );
            continue;
        }
        let Ok(ips) = pod_ips(pod, &mut report) else {
            continue;
        };
        if let Some((ip, other)) = ips.iter().find_map(|ip| owners.get(ip).map(|o| (ip, o))) {
            out.collisions += 1;
            report.reject(
                "status.podIP",
                format!("{ip} is also the IP of pod {other}; a pod IP belongs to one running pod at a time"),
            );
            continue;
        }
        let service_account = spec
            .and_then(|s| s.service_account_name.clone())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "default".into());
        let checked = identities
            .entry((name.namespace.as_str(), service_account.clone()))
            .or_insert_with(|| {
                tunnel::identity::Identity::new(
                    &settings.trust_domain,
                    &name.namespace,
                    &service_account,
                )
                .map(|_| ())
                .map_err(|e| e.to_string())
            });
        if let Err(e) = checked {
            report.reject(
                "spec.serviceAccountName",
                format!("no workload identity can be made of it: {e}"),
            );
            continue;
        }
        let labels = pod.metadata.labels.as_ref().unwrap_or(&NO_LABELS);
        let host_network = spec.and_then(|s| s.host_network).unwrap_or(false);
        let enrolled = super::enrollment::pod_enrolled(
            namespaces.get(&name.namespace).is_some_and(|n| n.enrolled),
            labels,
            host_network,
        );
        // A terminating pod stays in the mesh (it still runs and is served) but is no
        // service's endpoint, as the EndpointSlice controller marks it not ready: its
        // Ready condition stays True until its containers stop.
        let ready = pod.metadata.deletion_timestamp.is_none()
            && pod
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
        for ip in &ips {
            owners.insert(*ip, name);
        }
        uids.insert(uid, name);
        pods.push(PodInfo {
            name,
            workload: Workload {
                uid: uid.to_owned(),
                name: name.name.clone(),
                namespace: name.namespace.clone(),
                service_account,
                node,
                ips,
                enrolled,
                ready,
                services: Vec::new(),
                authorization_policies: Vec::new(),
                waypoint: None,
            },
            labels,
            pod,
            origin: &obj.origin,
        });
    }
    // objects.pods is a BTreeMap: the list is in name order, namespaces contiguous.
    Pods::new(pods)
}

/// Pods labelled with a waypoint send traffic for their own address through it.
pub(super) fn waypoints(
    _objects: &Objects,
    _namespaces: &BTreeMap<String, NamespaceInfo>,
    waypoints: &BTreeSet<ObjectName>,
    pods: &mut Pods<'_>,
    problems: &mut Vec<Problem>,
) {
    for pod in pods.list.iter_mut() {
        let name = pod.name;
        let Some(value) = pod.labels.get(WAYPOINT_LABEL) else {
            continue;
        };
        let mut report = Report::new(ObjectKind::Pod, name, pod.origin, problems);
        pod.workload.waypoint = resolve_waypoint(value, &name.namespace, waypoints, &mut report);
    }
}

/// The waypoint a `weft.dev/use-waypoint` label value names, if it exists.
pub(super) fn resolve_waypoint(
    value: &str,
    namespace: &str,
    waypoints: &BTreeSet<ObjectName>,
    report: &mut Report<'_>,
) -> Option<ObjectName> {
    if value == "none" {
        return None;
    }
    let name = ObjectName::new(namespace, value);
    if waypoints.contains(&name) {
        return Some(name);
    }
    report.add(
        format!("metadata.labels[{WAYPOINT_LABEL}]"),
        format!("no Gateway {name} of class {}; traffic goes directly to the endpoints until there is one", super::WAYPOINT_CLASS),
        crate::objects::Effect::Ignored,
        "WaypointNotFound",
    );
    None
}
