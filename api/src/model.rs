//! The typed mesh model: namespaces, workloads and services of one [`Snapshot`], and the
//! [`Model`] index proxies query on the hot path.
//!
//! A snapshot is plain data, as the controller computed it and as it travels; field names
//! are camelCase on the wire and unknown fields are refused so a typo fails loudly instead
//! of silently dropping configuration. [`Model::new`] checks the invariants lookups rely on
//! (unique pod IPs, unique service VIP and port, known namespaces, ...) and builds the
//! indexes once, so every lookup afterwards is a hash-map hit.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Serialize};

/// One immutable version of the mesh model, as the controller publishes it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Snapshot {
    /// Monotonic version; proxies acknowledge or reject updates by it.
    pub version: u64,
    /// Every namespace workloads and services may live in.
    #[serde(default)]
    pub namespaces: Vec<Namespace>,
    /// Every workload (pod) known to the mesh, enrolled or not.
    #[serde(default)]
    pub workloads: Vec<Workload>,
    /// Every service, with its virtual IPs and ports.
    #[serde(default)]
    pub services: Vec<Service>,
}

/// A Kubernetes namespace and the mesh settings that apply to everything in it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Namespace {
    /// Namespace name.
    pub name: String,
    /// Whether the namespace carries `weft.dev/mesh=enabled`.
    pub enrolled: bool,
    /// What inbound traffic from outside the mesh is allowed.
    #[serde(default)]
    pub mtls_mode: MtlsMode,
}

/// Whether enrolled workloads accept plaintext from sources outside the mesh.
///
/// Serialized as `Permissive` / `Strict`, the Kubernetes convention for enum values.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum MtlsMode {
    /// Plaintext from non-mesh sources is allowed, mesh peers still use mTLS.
    #[default]
    Permissive,
    /// Plaintext from non-mesh sources is refused.
    Strict,
}

/// A pod, with what proxies need to capture, identify and reach it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Workload {
    /// Pod UID, the key the CNI plugin hands to the node-proxy.
    pub uid: String,
    /// Pod name.
    pub name: String,
    /// Namespace the pod lives in; must be listed in [`Snapshot::namespaces`].
    pub namespace: String,
    /// Service account, which determines the workload's SPIFFE identity.
    pub service_account: String,
    /// Name of the node the pod is scheduled on.
    pub node: String,
    /// Pod IPs (one per family); each belongs to this workload alone.
    #[serde(default)]
    pub ips: Vec<IpAddr>,
    /// Pod labels, matched against service selectors.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Whether the pod is in the mesh (enrolled namespace and not opted out).
    pub enrolled: bool,
    /// Whether the pod is ready to receive traffic.
    pub ready: bool,
}

impl Workload {
    /// The workload's identity, `spiffe://<trust_domain>/ns/<namespace>/sa/<service account>`.
    pub fn spiffe_id(&self, trust_domain: &str) -> String {
        format!(
            "spiffe://{trust_domain}/ns/{}/sa/{}",
            self.namespace, self.service_account
        )
    }
}

/// A Kubernetes service: virtual IPs, ports and the selector that picks its endpoints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Service {
    /// Service name.
    pub name: String,
    /// Namespace the service lives in; must be listed in [`Snapshot::namespaces`].
    pub namespace: String,
    /// Cluster IPs (one per family); empty for a headless service.
    #[serde(default)]
    pub vips: Vec<IpAddr>,
    /// Ports served on every VIP.
    #[serde(default)]
    pub ports: Vec<ServicePort>,
    /// Labels a workload must all carry to be an endpoint; empty selects nothing, as in
    /// Kubernetes, where selector-less services have their endpoints managed elsewhere.
    #[serde(default)]
    pub selector: BTreeMap<String, String>,
}

impl Service {
    /// The service's cluster DNS name, `<name>.<namespace>.svc.cluster.local`.
    pub fn hostname(&self) -> String {
        format!("{}.{}.svc.cluster.local", self.name, self.namespace)
    }
}

/// One port of a [`Service`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServicePort {
    /// Port name, required by Kubernetes when a service has several ports.
    #[serde(default)]
    pub name: Option<String>,
    /// Port clients connect to on the VIP.
    pub port: u16,
    /// Port the endpoints listen on.
    pub target_port: u16,
}

/// A validated [`Snapshot`] with O(1) lookups for the proxies' data path.
#[derive(Debug, Clone)]
pub struct Model {
    snapshot: Snapshot,
    namespaces: HashMap<String, usize>,
    workloads_by_ip: HashMap<IpAddr, usize>,
    workloads_by_namespace: HashMap<String, Vec<usize>>,
    services_by_vip: HashMap<SocketAddr, (usize, usize)>,
}

impl Model {
    /// Validates `snapshot` and indexes it; the error names the first offending object.
    pub fn new(snapshot: Snapshot) -> Result<Self, ModelError> {
        let mut namespaces = HashMap::with_capacity(snapshot.namespaces.len());
        for (index, namespace) in snapshot.namespaces.iter().enumerate() {
            let object = ObjectRef::namespace(namespace);
            require(&object, index, "name", &namespace.name)?;
            if namespaces.insert(namespace.name.clone(), index).is_some() {
                return Err(ModelError::DuplicateName { object });
            }
        }

        let mut workloads_by_namespace: HashMap<String, Vec<usize>> = namespaces
            .keys()
            .map(|name| (name.clone(), Vec::new()))
            .collect();
        let mut workloads_by_ip = HashMap::new();
        let mut workload_names = HashSet::new();
        for (index, workload) in snapshot.workloads.iter().enumerate() {
            let object = ObjectRef::workload(workload);
            require(&object, index, "uid", &workload.uid)?;
            require(&object, index, "name", &workload.name)?;
            require(&object, index, "namespace", &workload.namespace)?;
            require(&object, index, "serviceAccount", &workload.service_account)?;
            let Some(members) = workloads_by_namespace.get_mut(&workload.namespace) else {
                return Err(ModelError::UnknownNamespace { object });
            };
            if !workload_names.insert((&workload.namespace, &workload.name)) {
                return Err(ModelError::DuplicateName { object });
            }
            members.push(index);
            for &ip in &workload.ips {
                // A dual-stack socket reports IPv4 peers as ::ffff:a.b.c.d; key on the
                // canonical form so both spellings find the same workload.
                match workloads_by_ip.entry(ip.to_canonical()) {
                    Entry::Vacant(slot) => {
                        slot.insert(index);
                    }
                    Entry::Occupied(taken) => {
                        let other =
                            Box::new(ObjectRef::workload(&snapshot.workloads[*taken.get()]));
                        return Err(ModelError::DuplicateIp { object, ip, other });
                    }
                }
            }
        }

        let mut services_by_vip = HashMap::new();
        let mut service_names = HashSet::new();
        for (index, service) in snapshot.services.iter().enumerate() {
            let object = ObjectRef::service(service);
            require(&object, index, "name", &service.name)?;
            require(&object, index, "namespace", &service.namespace)?;
            if !namespaces.contains_key(&service.namespace) {
                return Err(ModelError::UnknownNamespace { object });
            }
            if !service_names.insert((&service.namespace, &service.name)) {
                return Err(ModelError::DuplicateName { object });
            }
            for (port_index, port) in service.ports.iter().enumerate() {
                for (value, field) in [(port.port, "port"), (port.target_port, "targetPort")] {
                    if value == 0 {
                        let field = format!("ports[{port_index}].{field}");
                        return Err(ModelError::ZeroPort { object, field });
                    }
                }
            }
            for vip in &service.vips {
                for (port_index, port) in service.ports.iter().enumerate() {
                    let addr = SocketAddr::new(vip.to_canonical(), port.port);
                    match services_by_vip.entry(addr) {
                        Entry::Vacant(slot) => {
                            slot.insert((index, port_index));
                        }
                        Entry::Occupied(taken) => {
                            let other =
                                Box::new(ObjectRef::service(&snapshot.services[taken.get().0]));
                            return Err(ModelError::DuplicateVip {
                                object,
                                addr,
                                other,
                            });
                        }
                    }
                }
            }
        }

        Ok(Self {
            snapshot,
            namespaces,
            workloads_by_ip,
            workloads_by_namespace,
            services_by_vip,
        })
    }

    /// The snapshot's version.
    pub fn version(&self) -> u64 {
        self.snapshot.version
    }

    /// The validated snapshot this model indexes.
    pub fn snapshot(&self) -> &Snapshot {
        &self.snapshot
    }

    /// The namespace called `name`.
    pub fn namespace(&self, name: &str) -> Option<&Namespace> {
        let &index = self.namespaces.get(name)?;
        Some(&self.snapshot.namespaces[index])
    }

    /// The workload that owns `ip`; IPv4-mapped IPv6 addresses match their IPv4 form.
    pub fn workload_by_ip(&self, ip: IpAddr) -> Option<&Workload> {
        let &index = self.workloads_by_ip.get(&ip.to_canonical())?;
        Some(&self.snapshot.workloads[index])
    }

    /// The service and port a connection to `addr` (a VIP and service port) is meant for.
    pub fn service_by_vip(&self, addr: SocketAddr) -> Option<(&Service, &ServicePort)> {
        let addr = SocketAddr::new(addr.ip().to_canonical(), addr.port());
        let &(service, port) = self.services_by_vip.get(&addr)?;
        let service = &self.snapshot.services[service];
        Some((service, &service.ports[port]))
    }

    /// The ready workloads in `service`'s namespace whose labels contain every pair of
    /// its selector, in snapshot order; none for an empty selector.
    pub fn endpoints<'a>(
        &'a self,
        service: &'a Service,
    ) -> impl Iterator<Item = &'a Workload> + 'a {
        let members = if service.selector.is_empty() {
            None
        } else {
            self.workloads_by_namespace.get(&service.namespace)
        };
        members
            .into_iter()
            .flatten()
            .map(|&index| &self.snapshot.workloads[index])
            .filter(|workload| {
                workload.ready
                    && service
                        .selector
                        .iter()
                        .all(|(key, value)| workload.labels.get(key) == Some(value))
            })
    }
}

fn require(
    object: &ObjectRef,
    index: usize,
    field: &'static str,
    value: &str,
) -> Result<(), ModelError> {
    if value.is_empty() {
        return Err(ModelError::Empty {
            object: object.clone(),
            index,
            field,
        });
    }
    Ok(())
}

/// Kinds of objects a [`Snapshot`] holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ObjectKind {
    /// A [`Namespace`].
    Namespace,
    /// A [`Workload`].
    Workload,
    /// A [`Service`].
    Service,
}

impl ObjectKind {
    /// The [`Snapshot`] field that lists objects of this kind.
    pub fn list(self) -> &'static str {
        match self {
            Self::Namespace => "namespaces",
            Self::Workload => "workloads",
            Self::Service => "services",
        }
    }
}

impl fmt::Display for ObjectKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Namespace => "namespace",
            Self::Workload => "workload",
            Self::Service => "service",
        })
    }
}

/// Names one object of a [`Snapshot`], so errors can be reported where it came from.
///
/// Displays as `workload shop/cart-7d9` or `namespace shop`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ObjectRef {
    /// What kind of object it is.
    pub kind: ObjectKind,
    /// Its namespace; `None` for cluster-scoped kinds.
    pub namespace: Option<String>,
    /// Its name.
    pub name: String,
}

impl ObjectRef {
    fn namespace(namespace: &Namespace) -> Self {
        Self {
            kind: ObjectKind::Namespace,
            namespace: None,
            name: namespace.name.clone(),
        }
    }

    fn workload(workload: &Workload) -> Self {
        Self {
            kind: ObjectKind::Workload,
            namespace: Some(workload.namespace.clone()),
            name: workload.name.clone(),
        }
    }

    fn service(service: &Service) -> Self {
        Self {
            kind: ObjectKind::Service,
            namespace: Some(service.namespace.clone()),
            name: service.name.clone(),
        }
    }
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fn shown(part: &str) -> &str {
            if part.is_empty() {
                "<empty>"
            } else {
                part
            }
        }
        write!(f, "{} ", self.kind)?;
        if let Some(namespace) = &self.namespace {
            write!(f, "{}/", shown(namespace))?;
        }
        f.write_str(shown(&self.name))
    }
}

/// Why a [`Snapshot`] was refused by [`Model::new`]; each names the object and field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ModelError {
    /// A required field is empty.
    #[error(
        "{object} (item {index} of `{list}`): field `{field}` is empty; set it",
        list = .object.kind.list()
    )]
    Empty {
        /// The offending object.
        object: ObjectRef,
        /// Its position in its [`Snapshot`] list, since its name may be the empty field.
        index: usize,
        /// The empty field, as spelled on the wire.
        field: &'static str,
    },
    /// Two objects of one kind share a name in one namespace.
    #[error(
        "{object}: field `name`: an earlier entry of `{list}` has the same name; rename or remove one of them",
        list = .object.kind.list()
    )]
    DuplicateName {
        /// The later of the two objects.
        object: ObjectRef,
    },
    /// An object lives in a namespace the snapshot does not list.
    #[error(
        "{object}: field `namespace`: {namespace:?} is not listed in `namespaces`; add the namespace or correct the field",
        namespace = .object.namespace.as_deref().unwrap_or_default()
    )]
    UnknownNamespace {
        /// The offending object.
        object: ObjectRef,
    },
    /// Two workloads claim the same pod IP.
    #[error(
        "{object}: field `ips`: {ip} is already used by {other}; a pod IP belongs to one workload at a time, drop the stale entry"
    )]
    DuplicateIp {
        /// The later workload.
        object: ObjectRef,
        /// The shared IP.
        ip: IpAddr,
        /// The earlier workload holding the IP (boxed to keep the error small).
        other: Box<ObjectRef>,
    },
    /// Two services, or two ports of one service, claim the same VIP and port.
    #[error(
        "{object}: field `vips`: {addr} is already served by {other}; give each service its own VIP or port"
    )]
    DuplicateVip {
        /// The later service.
        object: ObjectRef,
        /// The shared VIP and port.
        addr: SocketAddr,
        /// The earlier service holding the address (boxed to keep the error small).
        other: Box<ObjectRef>,
    },
    /// A service port or target port is 0.
    #[error("{object}: field `{field}` is 0; use a port from 1 to 65535")]
    ZeroPort {
        /// The offending service.
        object: ObjectRef,
        /// The field, e.g. `ports[0].targetPort`.
        field: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(key, value)| (key.to_string(), value.to_string()))
            .collect()
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("test IPs are valid literals")
    }

    fn addr(text: &str) -> SocketAddr {
        text.parse()
            .expect("test socket addresses are valid literals")
    }

    fn workload(namespace: &str, name: &str, ips: &[&str], app: &str, ready: bool) -> Workload {
        Workload {
            uid: format!("uid-{name}"),
            name: name.into(),
            namespace: namespace.into(),
            service_account: app.into(),
            node: "node-a".into(),
            ips: ips.iter().map(|text| ip(text)).collect(),
            labels: labels(&[("app", app)]),
            enrolled: namespace == "shop",
            ready,
        }
    }

    /// Two namespaces, three workloads, one service: `cart-7d9` is its only endpoint, since
    /// `cart-2x1` is not ready and `legacy/cart` lives in another namespace.
    fn sample() -> Snapshot {
        Snapshot {
            version: 7,
            namespaces: vec![
                Namespace {
                    name: "shop".into(),
                    enrolled: true,
                    mtls_mode: MtlsMode::Strict,
                },
                Namespace {
                    name: "legacy".into(),
                    enrolled: false,
                    mtls_mode: MtlsMode::Permissive,
                },
            ],
            workloads: vec![
                workload("shop", "cart-7d9", &["10.244.1.7", "fd00::7"], "cart", true),
                workload("shop", "cart-2x1", &["10.244.2.9"], "cart", false),
                workload("legacy", "cart", &["10.244.3.3"], "cart", true),
            ],
            services: vec![Service {
                name: "cart".into(),
                namespace: "shop".into(),
                vips: vec![ip("10.96.0.10")],
                ports: vec![
                    ServicePort {
                        name: Some("http".into()),
                        port: 80,
                        target_port: 8080,
                    },
                    ServicePort {
                        name: Some("grpc".into()),
                        port: 9090,
                        target_port: 9090,
                    },
                ],
                selector: labels(&[("app", "cart")]),
            }],
        }
    }

    /// `sample()` as it looks on the wire.
    const SAMPLE_JSON: &str = r#"{
      "version": 7,
      "namespaces": [
        {"name": "shop", "enrolled": true, "mtlsMode": "Strict"},
        {"name": "legacy", "enrolled": false, "mtlsMode": "Permissive"}
      ],
      "workloads": [
        {"uid": "uid-cart-7d9", "name": "cart-7d9", "namespace": "shop", "serviceAccount": "cart",
         "node": "node-a", "ips": ["10.244.1.7", "fd00::7"], "labels": {"app": "cart"},
         "enrolled": true, "ready": true},
        {"uid": "uid-cart-2x1", "name": "cart-2x1", "namespace": "shop", "serviceAccount": "cart",
         "node": "node-a", "ips": ["10.244.2.9"], "labels": {"app": "cart"},
         "enrolled": true, "ready": false},
        {"uid": "uid-cart", "name": "cart", "namespace": "legacy", "serviceAccount": "cart",
         "node": "node-a", "ips": ["10.244.3.3"], "labels": {"app": "cart"},
         "enrolled": false, "ready": true}
      ],
      "services": [
        {"name": "cart", "namespace": "shop", "vips": ["10.96.0.10"],
         "ports": [{"name": "http", "port": 80, "targetPort": 8080},
                   {"name": "grpc", "port": 9090, "targetPort": 9090}],
         "selector": {"app": "cart"}}
      ]
    }"#;

    fn model() -> Model {
        Model::new(sample()).expect("the sample snapshot is valid")
    }

    fn name(workload: Option<&Workload>) -> Option<&str> {
        workload.map(|workload| workload.name.as_str())
    }

    #[test]
    fn lookups_on_sample() {
        let model = model();
        assert_eq!(model.version(), 7);
        assert_eq!(model.snapshot(), &sample());

        let shop = model.namespace("shop").expect("shop is listed");
        assert_eq!((shop.enrolled, shop.mtls_mode), (true, MtlsMode::Strict));
        assert_eq!(
            model.namespace("legacy").map(|ns| ns.mtls_mode),
            Some(MtlsMode::Permissive)
        );
        assert_eq!(model.namespace("kube-system"), None);

        assert_eq!(
            name(model.workload_by_ip(ip("10.244.1.7"))),
            Some("cart-7d9")
        );
        assert_eq!(name(model.workload_by_ip(ip("fd00::7"))), Some("cart-7d9"));
        assert_eq!(
            name(model.workload_by_ip(ip("::ffff:10.244.1.7"))),
            Some("cart-7d9")
        );
        assert_eq!(
            name(model.workload_by_ip(ip("10.244.2.9"))),
            Some("cart-2x1")
        );
        assert_eq!(name(model.workload_by_ip(ip("10.244.3.3"))), Some("cart"));
        assert_eq!(name(model.workload_by_ip(ip("10.244.9.9"))), None);

        let (service, port) = model
            .service_by_vip(addr("10.96.0.10:80"))
            .expect("VIP and port 80 belong to shop/cart");
        assert_eq!(service.hostname(), "cart.shop.svc.cluster.local");
        assert_eq!(
            (port.name.as_deref(), port.target_port),
            (Some("http"), 8080)
        );
        let (_, port) = model
            .service_by_vip(addr("[::ffff:10.96.0.10]:9090"))
            .expect("mapped VIP and port 9090 belong to shop/cart");
        assert_eq!(port.name.as_deref(), Some("grpc"));
        assert!(model.service_by_vip(addr("10.96.0.10:8080")).is_none());
        assert!(model.service_by_vip(addr("10.96.0.11:80")).is_none());

        let endpoints: Vec<_> = model.endpoints(service).map(|w| w.name.as_str()).collect();
        assert_eq!(endpoints, ["cart-7d9"]);
        let endpoint = model.endpoints(service).next().expect("one endpoint");
        assert_eq!(
            endpoint.spiffe_id("cluster.local"),
            "spiffe://cluster.local/ns/shop/sa/cart"
        );
    }

    #[test]
    fn empty_selector_selects_nothing() {
        let mut snapshot = sample();
        snapshot.services[0].selector.clear();
        let model = Model::new(snapshot).expect("a selector-less service is valid");
        assert_eq!(model.endpoints(&model.snapshot().services[0]).count(), 0);
    }

    #[test]
    fn selector_needs_every_pair() {
        let model = model();
        let mut service = model.snapshot().services[0].clone();
        service.selector.insert("version".into(), "v2".into());
        assert_eq!(model.endpoints(&service).count(), 0);
    }

    /// Applies `mutate` to the sample and checks the refusal mentions every fragment.
    fn assert_refused(mutate: impl FnOnce(&mut Snapshot), fragments: &[&str]) {
        let mut snapshot = sample();
        mutate(&mut snapshot);
        let message = Model::new(snapshot)
            .expect_err("the mutated snapshot is invalid")
            .to_string();
        for fragment in fragments {
            assert!(message.contains(fragment), "{message:?} lacks {fragment:?}");
        }
    }

    #[test]
    fn refuses_duplicate_workload_ip() {
        assert_refused(
            |s| s.workloads[1].ips.push(ip("10.244.1.7")),
            &[
                "workload shop/cart-2x1: field `ips`: 10.244.1.7 is already used by workload shop/cart-7d9",
            ],
        );
    }

    #[test]
    fn refuses_duplicate_workload_ip_in_mapped_form() {
        assert_refused(
            |s| s.workloads[2].ips = vec![ip("::ffff:10.244.2.9")],
            &[
                "workload legacy/cart: field `ips`",
                "workload shop/cart-2x1",
            ],
        );
    }

    #[test]
    fn refuses_duplicate_vip_and_port() {
        assert_refused(
            |s| {
                let mut other = s.services[0].clone();
                other.name = "cart-v2".into();
                other.ports.remove(0);
                s.services.push(other);
            },
            &[
                "service shop/cart-v2: field `vips`: 10.96.0.10:9090 is already served by service shop/cart",
            ],
        );
    }

    #[test]
    fn refuses_duplicate_port_within_service() {
        assert_refused(
            |s| s.services[0].ports[1].port = 80,
            &[
                "service shop/cart: field `vips`: 10.96.0.10:80",
                "by service shop/cart;",
            ],
        );
    }

    #[test]
    fn refuses_duplicate_workload_name() {
        assert_refused(
            |s| s.workloads[1].name = "cart-7d9".into(),
            &[
                "workload shop/cart-7d9: field `name`",
                "`workloads`",
                "rename",
            ],
        );
    }

    #[test]
    fn allows_same_workload_name_in_other_namespace() {
        let mut snapshot = sample();
        snapshot.workloads[2].name = "cart-7d9".into();
        assert!(Model::new(snapshot).is_ok());
    }

    #[test]
    fn refuses_duplicate_service_name() {
        assert_refused(
            |s| {
                let mut other = s.services[0].clone();
                other.vips = vec![ip("10.96.0.11")];
                s.services.push(other);
            },
            &["service shop/cart: field `name`", "`services`"],
        );
    }

    #[test]
    fn refuses_duplicate_namespace() {
        assert_refused(
            |s| s.namespaces[1].name = "shop".into(),
            &["namespace shop: field `name`", "`namespaces`"],
        );
    }

    #[test]
    fn refuses_empty_namespace_name() {
        assert_refused(
            |s| s.namespaces[1].name.clear(),
            &["namespace <empty> (item 1 of `namespaces`): field `name` is empty"],
        );
    }

    #[test]
    fn refuses_empty_workload_name() {
        assert_refused(
            |s| s.workloads[2].name.clear(),
            &["workload legacy/<empty> (item 2 of `workloads`): field `name` is empty"],
        );
    }

    #[test]
    fn refuses_empty_workload_namespace() {
        assert_refused(
            |s| s.workloads[0].namespace.clear(),
            &["workload <empty>/cart-7d9 (item 0 of `workloads`): field `namespace` is empty"],
        );
    }

    #[test]
    fn refuses_empty_service_account() {
        assert_refused(
            |s| s.workloads[1].service_account.clear(),
            &["workload shop/cart-2x1 (item 1 of `workloads`): field `serviceAccount` is empty"],
        );
    }

    #[test]
    fn refuses_empty_uid() {
        assert_refused(
            |s| s.workloads[1].uid.clear(),
            &["workload shop/cart-2x1", "field `uid` is empty"],
        );
    }

    #[test]
    fn refuses_empty_service_name() {
        assert_refused(
            |s| s.services[0].name.clear(),
            &["service shop/<empty> (item 0 of `services`): field `name` is empty"],
        );
    }

    #[test]
    fn refuses_empty_service_namespace() {
        assert_refused(
            |s| s.services[0].namespace.clear(),
            &["service <empty>/cart", "field `namespace` is empty"],
        );
    }

    #[test]
    fn refuses_service_port_zero() {
        assert_refused(
            |s| s.services[0].ports[1].port = 0,
            &["service shop/cart: field `ports[1].port` is 0"],
        );
    }

    #[test]
    fn refuses_service_target_port_zero() {
        assert_refused(
            |s| s.services[0].ports[0].target_port = 0,
            &["service shop/cart: field `ports[0].targetPort` is 0"],
        );
    }

    #[test]
    fn refuses_workload_in_unknown_namespace() {
        assert_refused(
            |s| s.workloads[0].namespace = "shoop".into(),
            &[
                "workload shoop/cart-7d9: field `namespace`: \"shoop\" is not listed in `namespaces`",
            ],
        );
    }

    #[test]
    fn refuses_service_in_unknown_namespace() {
        assert_refused(
            |s| s.services[0].namespace = "legacyy".into(),
            &["service legacyy/cart: field `namespace`: \"legacyy\" is not listed"],
        );
    }

    #[test]
    fn serde_round_trip_matches_wire_format() {
        let decoded: Snapshot = serde_json::from_str(SAMPLE_JSON).expect("SAMPLE_JSON parses");
        assert_eq!(decoded, sample());

        let encoded = serde_json::to_value(sample()).expect("snapshots serialize");
        let golden: serde_json::Value =
            serde_json::from_str(SAMPLE_JSON).expect("SAMPLE_JSON is JSON");
        assert_eq!(encoded, golden);

        let text = serde_json::to_string(&sample()).expect("snapshots serialize");
        let back: Snapshot = serde_json::from_str(&text).expect("own output parses");
        assert_eq!(back, sample());
    }

    #[test]
    fn serde_defaults_optional_fields() {
        let namespace: Namespace =
            serde_json::from_str(r#"{"name": "shop", "enrolled": true}"#).expect("parses");
        assert_eq!(namespace.mtls_mode, MtlsMode::Permissive);
        let snapshot: Snapshot = serde_json::from_str(r#"{"version": 1}"#).expect("parses");
        assert_eq!(
            snapshot,
            Snapshot {
                version: 1,
                ..Snapshot::default()
            }
        );
    }

    #[test]
    fn serde_rejects_unknown_field() {
        let typo = SAMPLE_JSON.replacen("\"serviceAccount\"", "\"serviceAcount\"", 1);
        let error = serde_json::from_str::<Snapshot>(&typo)
            .expect_err("a misspelt field is refused")
            .to_string();
        assert!(error.contains("unknown field `serviceAcount`"), "{error}");
    }
}
