//! Services: VIPs, ports, waypoint binding, and endpoints, which become bindings on the
//! workloads that serve them (so a pod change touches one workload on the wire, not
//! every service it is part of).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};

use api::{
    AppProtocol, Endpoint, ObjectName, PortMapping, Resource, Service, ServiceBinding, ServicePort,
};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::workloads::{resolve_waypoint, NamespaceInfo, Pods};
use super::{Audience, Entry, Report, Translation, WAYPOINT_LABEL};
use crate::objects::{ObjectKind, Objects};

/// The label EndpointSlices carry to name their service.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// A port of the service and how endpoints serve it.
struct PortSpec {
    port: u16,
    name: Option<String>,
    target: Target,
    protocol: AppProtocol,
}

enum Target {
    Number(u16),
    Named(String),
}

pub(super) fn services(
    objects: &Objects,
    namespaces: &BTreeMap<String, NamespaceInfo>,
    waypoints: &BTreeSet<ObjectName>,
    pods: &mut Pods<'_>,
    out: &mut Translation,
) {
    let mut slices: BTreeMap<ObjectName, Vec<(&ObjectName, &EndpointSlice)>> = BTreeMap::new();
    for (name, obj) in &objects.endpoint_slices {
        let labels = obj.value.metadata.labels.as_ref();
        if let Some(service) = labels.and_then(|l| l.get(SERVICE_NAME_LABEL)) {
            slices
                .entry(ObjectName::new(&name.namespace, service))
                .or_default()
                .push((name, &obj.value));
        }
    }
    let mut vips: BTreeMap<SocketAddr, ObjectName> = BTreeMap::new();
    for (name, obj) in &objects.services {
        let service = &obj.value;
        let mut report = Report::new(ObjectKind::Service, name, &obj.origin, &mut out.problems);
        let Some(spec) = service.spec.as_ref() else {
            report.reject("spec", "is missing");
            continue;
        };
        if spec.type_.as_deref() == Some("ExternalName") {
            continue;
        }
        let Ok(service_vips) = parse_vips(spec, &mut report) else {
            continue;
        };
        let Ok(ports) = parse_ports(spec, &mut report) else {
            continue;
        };
        let addrs: Vec<SocketAddr> = service_vips
            .iter()
            .flat_map(|ip| ports.iter().map(move |p| SocketAddr::new(*ip, p.port)))
            .collect();
        if let Some((addr, other)) = addrs.iter().find_map(|a| vips.get(a).map(|o| (a, o))) {
            report.reject(
                "spec.clusterIP",
                format!("{addr} is already served by service {other}; give each service its own cluster IP"),
            );
            continue;
        }
        for addr in addrs {
            vips.insert(addr, name.clone());
        }
        let labels = service.metadata.labels.clone().unwrap_or_default();
        let waypoint_label = labels.get(WAYPOINT_LABEL).or_else(|| {
            namespaces
                .get(&name.namespace)
                .and_then(|n| n.labels.get(WAYPOINT_LABEL))
        });
        let waypoint = waypoint_label
            .and_then(|v| resolve_waypoint(v, &name.namespace, waypoints, &mut report));

        let mut addresses = Vec::new();
        match slices.get(name) {
            Some(slices) => {
                for (slice_name, slice) in slices {
                    from_slice(name, &ports, slice_name, slice, pods, &mut addresses);
                }
            }
            None => from_selector(name, &ports, spec.selector.as_ref(), pods),
        }
        addresses.sort_by_key(|e: &Endpoint| e.ip);
        addresses.dedup_by_key(|e| e.ip);
        let resource = Resource::Service(Service {
            namespace: name.namespace.clone(),
            name: name.name.clone(),
            vips: service_vips,
            ports: ports
                .iter()
                .map(|p| ServicePort {
                    name: p.name.clone(),
                    port: p.port,
                    target_port: match p.target {
                        Target::Number(n) => Some(n),
                        Target::Named(_) => None,
                    },
                    protocol: p.protocol,
                })
                .collect(),
            waypoint,
            addresses,
        });
        out.entries.insert(
            resource.key(),
            Entry {
                resource,
                audience: Audience::All,
            },
        );
    }
}

fn parse_vips(
    spec: &k8s_openapi::api::core::v1::ServiceSpec,
    report: &mut Report<'_>,
) -> Result<Vec<IpAddr>, ()> {
    let texts: Vec<(String, String)> = match &spec.cluster_ips {
        Some(ips) if !ips.is_empty() => ips
            .iter()
            .enumerate()
            .map(|(i, ip)| (format!("spec.clusterIPs[{i}]"), ip.clone()))
            .collect(),
        _ => spec
            .cluster_ip
            .iter()
            .map(|ip| ("spec.clusterIP".to_owned(), ip.clone()))
            .collect(),
    };
    let mut vips = Vec::new();
    for (field, text) in texts {
        if text.is_empty() || text == "None" {
            continue;
        }
        match text.parse::<IpAddr>() {
            Ok(ip) => vips.push(ip.to_canonical()),
            Err(_) => {
                report.reject(field, format!("{text:?} is not an IP address; give one like 10.96.0.10, \"None\" for a headless service, or leave it out"));
                return Err(());
            }
        }
    }
    Ok(vips)
}

fn parse_ports(
    spec: &k8s_openapi::api::core::v1::ServiceSpec,
    report: &mut Report<'_>,
) -> Result<Vec<PortSpec>, ()> {
    let mut ports: Vec<PortSpec> = Vec::new();
    for (i, p) in spec.ports.iter().flatten().enumerate() {
        if !matches!(p.protocol.as_deref(), None | Some("TCP")) {
            continue;
        }
        let field = |f: &str| format!("spec.ports[{i}].{f}");
        let Some(port) = u16::try_from(p.port).ok().filter(|p| *p != 0) else {
            report.reject(
                field("port"),
                format!("{} is not a port from 1 to 65535", p.port),
            );
            return Err(());
        };
        if let Some(other) = ports.iter().position(|o| o.port == port) {
            report.reject(
                field("port"),
                format!("{port} is also the port of spec.ports[{other}]; each port must be unique"),
            );
            return Err(());
        }
        let target = match &p.target_port {
            None => Target::Number(port),
            Some(IntOrString::Int(n)) => match u16::try_from(*n).ok().filter(|n| *n != 0) {
                Some(n) => Target::Number(n),
                None => {
                    report.reject(
                        field("targetPort"),
                        format!("{n} is not a port from 1 to 65535"),
                    );
                    return Err(());
                }
            },
            Some(IntOrString::String(s)) if s.is_empty() => Target::Number(port),
            Some(IntOrString::String(s)) => Target::Named(s.clone()),
        };
        ports.push(PortSpec {
            port,
            name: p.name.clone().filter(|n| !n.is_empty()),
            target,
            protocol: AppProtocol::declared(p.app_protocol.as_deref(), p.name.as_deref()),
        });
    }
    Ok(ports)
}

/// The container port called `name` in the pod's spec.
fn named_port(pod: &Pod, name: &str) -> Option<u16> {
    pod.spec
        .as_ref()?
        .containers
        .iter()
        .flat_map(|c| c.ports.iter().flatten())
        .find(|p| p.name.as_deref() == Some(name))
        .and_then(|p| u16::try_from(p.container_port).ok())
        .filter(|p| *p != 0)
}

fn from_selector(
    service: &ObjectName,
    ports: &[PortSpec],
    selector: Option<&BTreeMap<String, String>>,
    pods: &mut Pods<'_>,
) {
    // A service without a selector has its endpoints managed elsewhere (EndpointSlices).
    let Some(selector) = selector.filter(|s| !s.is_empty()) else {
        return;
    };
    // The pods carrying one of the pairs (the first); the others are checked on them.
    let Some((key, value)) = selector.iter().next() else {
        return;
    };
    for i in pods.with_label(&service.namespace, key, value) {
        let pod = &mut pods.list[i];
        let w = &pod.workload;
        if !w.ready
            || w.ips.is_empty()
            || !selector.iter().all(|(k, v)| pod.labels.get(k) == Some(v))
        {
            continue;
        }
        let mappings: Vec<PortMapping> = ports
            .iter()
            .filter_map(|p| {
                let target = match &p.target {
                    Target::Number(n) => *n,
                    Target::Named(port_name) => named_port(pod.pod, port_name)?,
                };
                Some(PortMapping {
                    service_port: p.port,
                    target_port: target,
                })
            })
            .collect();
        if !mappings.is_empty() || ports.is_empty() {
            pod.workload.services.push(ServiceBinding {
                service: service.clone(),
                ports: mappings,
            });
        }
    }
}

fn from_slice(
    service: &ObjectName,
    ports: &[PortSpec],
    slice_name: &ObjectName,
    slice: &EndpointSlice,
    pods: &mut Pods<'_>,
    addresses: &mut Vec<Endpoint>,
) {
    if !matches!(slice.address_type.as_str(), "IPv4" | "IPv6") {
        return;
    }
    // Service ports map to slice ports by name ("" for an unnamed single port).
    let mappings: Vec<PortMapping> = ports
        .iter()
        .filter_map(|p| {
            let name = p.name.clone().unwrap_or_default();
            let port = slice
                .ports
                .iter()
                .flatten()
                .find(|sp| {
                    sp.name.clone().unwrap_or_default() == name
                        && matches!(sp.protocol.as_deref(), None | Some("TCP"))
                })?
                .port?;
            Some(PortMapping {
                service_port: p.port,
                target_port: u16::try_from(port).ok().filter(|p| *p != 0)?,
            })
        })
        .collect();
    for endpoint in slice.endpoints.iter().flatten() {
        let ready = endpoint
            .conditions
            .as_ref()
            .and_then(|c| c.ready)
            .unwrap_or(true);
        if !ready {
            continue;
        }
        let pod = endpoint
            .target_ref
            .as_ref()
            .filter(|r| r.kind.as_deref() == Some("Pod"))
            .and_then(|r| {
                let ns = r
                    .namespace
                    .clone()
                    .unwrap_or_else(|| slice_name.namespace.clone());
                Some(ObjectName::new(ns, r.name.clone()?))
            })
            .filter(|name| pods.get_mut(name).is_some());
        match pod {
            Some(name) => {
                if let Some(pod) = pods.get_mut(&name) {
                    let bindings = &mut pod.workload.services;
                    if !bindings.iter().any(|b| &b.service == service) {
                        bindings.push(ServiceBinding {
                            service: service.clone(),
                            ports: mappings.clone(),
                        });
                    }
                }
            }
            None => {
                for address in &endpoint.addresses {
                    if let Ok(ip) = address.parse::<IpAddr>() {
                        addresses.push(Endpoint {
                            ip: ip.to_canonical(),
                            ports: mappings.clone(),
                        });
                    }
                }
            }
        }
    }
}
