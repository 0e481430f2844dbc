//! The model a proxy holds: every resource it was sent, indexed for the data path, and
//! updated by keyed upserts and removals.
//!
//! The maps are persistent (`imbl`): [`Model::apply`] makes a new model that shares
//! everything it did not change with the old one, in time proportional to the change,
//! so a proxy can publish each version as an immutable `Arc<Model>` while connections
//! keep reading the one they loaded. A resource that fails validation, or would break
//! an index invariant (two workloads on one IP, two services on one VIP and port), is
//! refused alone: the proxy keeps its previous version of that key, applies the rest
//! and reports the refusal.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use serde::Serialize;

use crate::digest::{self, Digests, BUCKETS};
use crate::proto;
use crate::resource::{
    AuthorizationPolicy, Key, Kind, Namespace, ObjectName, Resource, Scope, Service, ServicePort,
    TrustBundle, Waypoint, Workload,
};

/// One endpoint a connection to a service port can go to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The workload, unless the endpoint is a plain address.
    pub workload: Option<Arc<Workload>>,
    /// Its address and port.
    pub addr: SocketAddr,
}

/// A service's endpoints, per service port, in a stable order (by workload UID, then
/// plain addresses).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Endpoints {
    by_port: Vec<(u16, PortTargets)>,
}

/// One service port's endpoints: each workload at its primary (first) address, and
/// every address sorted by family, for a connection that should stay in its own.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct PortTargets {
    primary: Vec<Target>,
    v4: Vec<Target>,
    v6: Vec<Target>,
}

impl Endpoints {
    fn targets(&self, port: u16) -> Option<&PortTargets> {
        self.by_port
            .iter()
            .find(|(p, _)| *p == port)
            .map(|(_, t)| t)
    }

    /// The endpoints serving `port` of the service, each at its primary address.
    pub fn for_port(&self, port: u16) -> &[Target] {
        self.targets(port).map_or(&[], |t| t.primary.as_slice())
    }

    /// The endpoints serving `port` at addresses of `like`'s family (a dual-stack
    /// service's IPv6 address is served by its endpoints' IPv6 addresses, as kube-proxy
    /// does); the primary addresses when none is of that family.
    pub fn for_port_like(&self, port: u16, like: IpAddr) -> &[Target] {
        let Some(t) = self.targets(port) else {
            return &[];
        };
        let family = match like.to_canonical() {
            IpAddr::V4(_) => &t.v4,
            IpAddr::V6(_) => &t.v6,
        };
        match family.is_empty() {
            true => &t.primary,
            false => family,
        }
    }
}

/// The indexed model.
#[derive(Debug, Clone)]
pub struct Model {
    epoch: u64,
    version: u64,
    hashes: imbl::HashMap<Key, u64>,
    digests: Digests,
    namespaces: imbl::HashMap<String, Arc<Namespace>>,
    workloads: imbl::HashMap<String, Arc<Workload>>,
    by_ip: imbl::HashMap<IpAddr, Arc<Workload>>,
    services: imbl::HashMap<ObjectName, Arc<Service>>,
    by_vip: imbl::HashMap<SocketAddr, Arc<Service>>,
    members: imbl::HashMap<ObjectName, imbl::OrdSet<String>>,
    endpoints: imbl::HashMap<ObjectName, Arc<Endpoints>>,
    policies: imbl::HashMap<ObjectName, Arc<AuthorizationPolicy>>,
    namespace_policies: imbl::HashMap<String, imbl::OrdSet<ObjectName>>,
    waypoints: imbl::HashMap<ObjectName, Arc<Waypoint>>,
    routes: imbl::HashMap<Key, Arc<proto::Route>>,
    traffic_policies: imbl::HashMap<ObjectName, Arc<proto::TrafficPolicy>>,
    trust_bundle: Option<Arc<TrustBundle>>,
}

impl Default for Model {
    fn default() -> Self {
        Model {
            epoch: 0,
            version: 0,
            hashes: imbl::HashMap::new(),
            digests: [0; BUCKETS],
            namespaces: imbl::HashMap::new(),
            workloads: imbl::HashMap::new(),
            by_ip: imbl::HashMap::new(),
            services: imbl::HashMap::new(),
            by_vip: imbl::HashMap::new(),
            members: imbl::HashMap::new(),
            endpoints: imbl::HashMap::new(),
            policies: imbl::HashMap::new(),
            namespace_policies: imbl::HashMap::new(),
            waypoints: imbl::HashMap::new(),
            routes: imbl::HashMap::new(),
            traffic_policies: imbl::HashMap::new(),
            trust_bundle: None,
        }
    }
}

/// The result of [`Model::apply`].
#[derive(Debug)]
pub struct Applied {
    /// The new model.
    pub model: Model,
    /// Resources refused, with the reason; the proxy keeps its previous version of each.
    pub rejected: Vec<(Key, String)>,
    /// Keys whose content changed (upserted with new content, or removed).
    pub changed: Vec<Key>,
}

impl Applied {
    /// The acknowledgement of the update this is the result of.
    pub fn ack(&self) -> proto::Ack {
        proto::Ack {
            epoch: self.model.epoch,
            version: self.model.version,
            rejected: self
                .rejected
                .iter()
                .map(|(key, reason)| proto::Rejection {
                    key: Some(key.to_proto()),
                    reason: reason.clone(),
                })
                .collect(),
        }
    }

    /// Whether a key of `kind` changed.
    pub fn changed_kind(&self, kind: Kind) -> bool {
        self.changed.iter().any(|k| k.kind == kind)
    }
}

/// At most this many refusals are listed in one acknowledgement; the rest are counted.
const MAX_REJECTIONS: usize = 100;

impl Model {
    /// The controller instance the model came from.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The version applied last; 0 before the first update.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// How many resources it holds.
    pub fn len(&self) -> usize {
        self.hashes.len()
    }

    /// Whether it holds nothing.
    pub fn is_empty(&self) -> bool {
        self.hashes.is_empty()
    }

    /// Where this model stands, to resume a subscription from.
    pub fn position(&self) -> proto::Position {
        proto::Position {
            epoch: self.epoch,
            version: self.version,
            buckets: digest::to_wire(&self.digests),
        }
    }

    /// The namespace called `name`.
    pub fn namespace(&self, name: &str) -> Option<&Arc<Namespace>> {
        self.namespaces.get(name)
    }

    /// The workload with pod UID `uid`.
    pub fn workload(&self, uid: &str) -> Option<&Arc<Workload>> {
        self.workloads.get(uid)
    }

    /// The workload that owns `ip`; IPv4-mapped IPv6 addresses match their IPv4 form.
    pub fn workload_by_ip(&self, ip: IpAddr) -> Option<&Arc<Workload>> {
        self.by_ip.get(&ip.to_canonical())
    }

    /// The service called `name`.
    pub fn service(&self, name: &ObjectName) -> Option<&Arc<Service>> {
        self.services.get(name)
    }

    /// The service and port a connection to `addr` (a VIP and service port) is for.
    pub fn service_by_vip(&self, addr: SocketAddr) -> Option<(&Arc<Service>, &ServicePort)> {
        let addr = SocketAddr::new(addr.ip().to_canonical(), addr.port());
        let service = self.by_vip.get(&addr)?;
        let port = service.ports.iter().find(|p| p.port == addr.port())?;
        Some((service, port))
    }

    /// The endpoints of `service` for `port`, each at its primary address, in a stable
    /// order.
    pub fn endpoints(&self, service: &ObjectName, port: u16) -> &[Target] {
        self.endpoints
            .get(service)
            .map_or(&[], |e| e.for_port(port))
    }

    /// The endpoints of `service` for `port` at addresses of `like`'s family (see
    /// [`Endpoints::for_port_like`]), in a stable order.
    pub fn endpoints_like(&self, service: &ObjectName, port: u16, like: IpAddr) -> &[Target] {
        self.endpoints
            .get(service)
            .map_or(&[], |e| e.for_port_like(port, like))
    }

    /// The authorization policies that apply to `workload`: its namespace's
    /// namespace-wide ones and the selector-scoped ones that select it.
    pub fn policies_for<'a>(
        &'a self,
        workload: &'a Workload,
    ) -> impl Iterator<Item = &'a Arc<AuthorizationPolicy>> + 'a {
        let wide = self
            .namespace_policies
            .get(&workload.namespace)
            .into_iter()
            .flatten();
        wide.chain(workload.authorization_policies.iter())
            .filter_map(|name| self.policies.get(name))
    }

    /// The policy called `name`.
    pub fn policy(&self, name: &ObjectName) -> Option<&Arc<AuthorizationPolicy>> {
        self.policies.get(name)
    }

    /// The waypoint called `name`.
    pub fn waypoint(&self, name: &ObjectName) -> Option<&Arc<Waypoint>> {
        self.waypoints.get(name)
    }

    /// The trust bundle, once sent.
    pub fn trust_bundle(&self) -> Option<&Arc<TrustBundle>> {
        self.trust_bundle.as_ref()
    }

    /// Every workload, in no particular order.
    pub fn workloads(&self) -> impl Iterator<Item = &Arc<Workload>> {
        self.workloads.values()
    }

    /// Whether a pod of `name` in `namespace` is in the model, as a set to ask often.
    pub fn pod_names(&self) -> std::collections::HashSet<(&str, &str)> {
        self.workloads
            .values()
            .map(|w| (w.namespace.as_str(), w.name.as_str()))
            .collect()
    }

    /// Every service, in no particular order.
    pub fn services(&self) -> impl Iterator<Item = &Arc<Service>> {
        self.services.values()
    }

    /// Every HTTPRoute and GRPCRoute, in no particular order.
    pub fn routes(&self) -> impl Iterator<Item = &Arc<proto::Route>> {
        self.routes.values()
    }

    /// The TrafficPolicy that tunes `service`, if any (the oldest by name when several
    /// target it).
    pub fn traffic_policy(&self, service: &ObjectName) -> Option<&Arc<proto::TrafficPolicy>> {
        let wanted = service.to_string();
        self.traffic_policies
            .iter()
            .filter(|(_, t)| t.service == wanted)
            .min_by(|a, b| a.0.cmp(b.0))
            .map(|(_, t)| t)
    }

    /// Every waypoint, in no particular order.
    pub fn waypoints(&self) -> impl Iterator<Item = &Arc<Waypoint>> {
        self.waypoints.values()
    }

    /// Whether `ip` is an endpoint of a waypoint's Service: a proxy that may speak
    /// for the clients it forwards.
    pub fn is_waypoint_ip(&self, ip: IpAddr) -> bool {
        self.waypoints.values().any(|w| {
            self.endpoints.get(&w.service).is_some_and(|e| {
                e.by_port
                    .iter()
                    .any(|(_, ts)| ts.v4.iter().chain(&ts.v6).any(|t| t.addr.ip() == ip))
            })
        })
    }

    /// The keys held and their hashes.
    pub fn hashes(&self) -> impl Iterator<Item = (&Key, &u64)> {
        self.hashes.iter()
    }

    /// The resource held under `key`, as it was accepted.
    pub fn resource(&self, key: &Key) -> Option<Resource> {
        let object = || key.name.parse::<ObjectName>().ok();
        Some(match key.kind {
            Kind::Namespace => Resource::Namespace((**self.namespaces.get(&key.name)?).clone()),
            Kind::Workload => Resource::Workload((**self.workloads.get(&key.name)?).clone()),
            Kind::Service => Resource::Service((**self.services.get(&object()?)?).clone()),
            Kind::AuthorizationPolicy => {
                Resource::AuthorizationPolicy((**self.policies.get(&object()?)?).clone())
            }
            Kind::Waypoint => Resource::Waypoint((**self.waypoints.get(&object()?)?).clone()),
            Kind::HttpRoute | Kind::GrpcRoute => Resource::Route((**self.routes.get(key)?).clone()),
            Kind::TrafficPolicy => {
                Resource::TrafficPolicy((**self.traffic_policies.get(&object()?)?).clone())
            }
            Kind::TrustBundle => Resource::TrustBundle((**self.trust_bundle.as_ref()?).clone()),
        })
    }

    /// Applies one update, returning the new model; `self` is unchanged.
    pub fn apply(&self, update: &proto::Update) -> Applied {
        let kind = proto::UpdateKind::try_from(update.kind).unwrap_or(proto::UpdateKind::Full);
        let mut next = match kind {
            proto::UpdateKind::Full => Model::default(),
            _ => self.clone(),
        };
        next.epoch = update.epoch;
        next.version = update.version;
        let mut work = Work::default();

        if kind == proto::UpdateKind::Resync {
            let buckets: HashSet<u32> = update.buckets.iter().copied().collect();
            let stale: Vec<Key> = next
                .hashes
                .keys()
                .filter(|k| buckets.contains(&(digest::bucket(k) as u32)))
                .cloned()
                .collect();
            for key in stale {
                next.remove(&key, &mut work);
            }
        }
        for removal in &update.removals {
            if let Some(key) = Key::from_proto(removal) {
                next.remove(&key, &mut work);
            }
        }

        // A key upserted twice in one update: the last upsert counts, as it would in two
        // updates (each key is indexed and hashed into the position once).
        let mut seen = HashSet::new();
        let mut upserts: Vec<&proto::Resource> = (update.upserts.iter().rev())
            .filter(|w| (w.key.as_ref().and_then(Key::from_proto)).is_none_or(|k| seen.insert(k)))
            .collect();
        upserts.reverse();
        let mut parsed = Vec::with_capacity(upserts.len());
        for wire in upserts {
            match Resource::from_proto(wire) {
                Ok(Some((key, resource))) => {
                    if next.hashes.get(&key) != Some(&wire.hash) {
                        parsed.push((key, resource, wire.hash));
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    let key = match &e {
                        crate::ResourceError::Empty { key }
                        | crate::ResourceError::KeyMismatch { key, .. }
                        | crate::ResourceError::Field { key, .. } => key.clone(),
                    };
                    work.rejected.push((key, e.to_string()));
                }
            }
        }
        // Everything upserted leaves its indexes first, so values that trade places in
        // one update (an IP moving from one pod to another) do not collide.
        let mut previous = HashMap::new();
        for (key, _, _) in &parsed {
            if let Some(old) = next.remove(key, &mut work) {
                previous.insert(key.clone(), old);
            }
        }
        for (key, resource, hash) in parsed {
            if let Err(reason) = next.insert(&key, resource, hash, &mut work) {
                if let Some((old, old_hash)) = previous.remove(&key) {
                    let _ = next.insert(&key, old, old_hash, &mut work);
                }
                work.rejected.push((key, reason));
            }
        }
        for name in std::mem::take(&mut work.services) {
            next.rebuild_endpoints(&name);
        }
        let mut rejected = work.rejected;
        if rejected.len() > MAX_REJECTIONS {
            let more = rejected.len() - MAX_REJECTIONS;
            rejected.truncate(MAX_REJECTIONS);
            if let Some((key, reason)) = rejected.last_mut() {
                *reason = format!("{reason} (and {more} more refusals not listed)");
                let _ = key;
            }
        }
        let changed = work
            .changed
            .into_iter()
            .filter(|k| self.hashes.get(k) != next.hashes.get(k))
            .collect();
        Applied {
            model: next,
            rejected,
            changed,
        }
    }

    /// Removes `key`, returning what it held.
    fn remove(&mut self, key: &Key, work: &mut Work) -> Option<(Resource, u64)> {
        let hash = self.hashes.remove(key)?;
        digest::toggle(&mut self.digests, key, hash);
        work.changed.insert(key.clone());
        let resource = match key.kind {
            Kind::Namespace => Resource::Namespace((*self.namespaces.remove(&key.name)?).clone()),
            Kind::Workload => {
                let w = self.workloads.remove(&key.name)?;
                for ip in &w.ips {
                    let ip = ip.to_canonical();
                    if self.by_ip.get(&ip).is_some_and(|o| o.uid == w.uid) {
                        self.by_ip.remove(&ip);
                    }
                }
                for binding in &w.services {
                    if let Some(set) = self.members.get_mut(&binding.service) {
                        set.remove(&w.uid);
                    }
                    work.services.insert(binding.service.clone());
                }
                Resource::Workload((*w).clone())
            }
            Kind::Service => {
                let name: ObjectName = key.name.parse().ok()?;
                let s = self.services.remove(&name)?;
                for addr in vip_addrs(&s) {
                    if self
                        .by_vip
                        .get(&addr)
                        .is_some_and(|o| o.object_name() == name)
                    {
                        self.by_vip.remove(&addr);
                    }
                }
                work.services.insert(name);
                Resource::Service((*s).clone())
            }
            Kind::AuthorizationPolicy => {
                let name: ObjectName = key.name.parse().ok()?;
                let p = self.policies.remove(&name)?;
                if let Some(set) = self.namespace_policies.get_mut(&p.namespace) {
                    set.remove(&name);
                }
                Resource::AuthorizationPolicy((*p).clone())
            }
            Kind::Waypoint => {
                let name: ObjectName = key.name.parse().ok()?;
                Resource::Waypoint((*self.waypoints.remove(&name)?).clone())
            }
            Kind::HttpRoute | Kind::GrpcRoute => {
                Resource::Route((*self.routes.remove(key)?).clone())
            }
            Kind::TrafficPolicy => {
                let name: ObjectName = key.name.parse().ok()?;
                Resource::TrafficPolicy((*self.traffic_policies.remove(&name)?).clone())
            }
            Kind::TrustBundle => Resource::TrustBundle((*self.trust_bundle.take()?).clone()),
        };
        Some((resource, hash))
    }

    /// Inserts a resource whose key is free; refuses one that would break an index.
    fn insert(
        &mut self,
        key: &Key,
        resource: Resource,
        hash: u64,
        work: &mut Work,
    ) -> Result<(), String> {
        match resource {
            Resource::Namespace(n) => {
                self.namespaces.insert(n.name.clone(), Arc::new(n));
            }
            Resource::Workload(w) => {
                for ip in &w.ips {
                    if let Some(other) = self.by_ip.get(&ip.to_canonical()) {
                        return Err(format!(
                            "field `ips`: {ip} is already used by workload {} (uid {}); a pod IP belongs to one workload at a time",
                            other.object_name(),
                            other.uid
                        ));
                    }
                }
                let w = Arc::new(w);
                for ip in &w.ips {
                    self.by_ip.insert(ip.to_canonical(), w.clone());
                }
                for binding in &w.services {
                    self.members
                        .entry(binding.service.clone())
                        .or_default()
                        .insert(w.uid.clone());
                    work.services.insert(binding.service.clone());
                }
                self.workloads.insert(w.uid.clone(), w);
            }
            Resource::Service(s) => {
                let name = s.object_name();
                let addrs: Vec<SocketAddr> = vip_addrs(&s).collect();
                let unique: BTreeSet<&SocketAddr> = addrs.iter().collect();
                if unique.len() != addrs.len() {
                    return Err("field `ports`: two ports share a number".into());
                }
                for addr in &addrs {
                    if let Some(other) = self.by_vip.get(addr) {
                        return Err(format!(
                            "field `vips`: {addr} is already served by service {}",
                            other.object_name()
                        ));
                    }
                }
                let s = Arc::new(s);
                for addr in addrs {
                    self.by_vip.insert(addr, s.clone());
                }
                self.services.insert(name.clone(), s);
                work.services.insert(name);
            }
            Resource::AuthorizationPolicy(p) => {
                let name = p.object_name();
                if p.scope == Scope::NamespaceWide {
                    self.namespace_policies
                        .entry(p.namespace.clone())
                        .or_default()
                        .insert(name.clone());
                }
                self.policies.insert(name, Arc::new(p));
            }
            Resource::Waypoint(w) => {
                let name = ObjectName::new(&w.namespace, &w.name);
                self.waypoints.insert(name, Arc::new(w));
            }
            Resource::Route(r) => {
                self.routes.insert(key.clone(), Arc::new(r));
            }
            Resource::TrafficPolicy(t) => {
                let name = ObjectName::new(&t.namespace, &t.name);
                self.traffic_policies.insert(name, Arc::new(t));
            }
            Resource::TrustBundle(b) => self.trust_bundle = Some(Arc::new(b)),
        }
        self.hashes.insert(key.clone(), hash);
        digest::toggle(&mut self.digests, key, hash);
        work.changed.insert(key.clone());
        Ok(())
    }

    fn rebuild_endpoints(&mut self, name: &ObjectName) {
        let Some(service) = self.services.get(name).cloned() else {
            self.endpoints.remove(name);
            return;
        };
        let members = self.members.get(name).cloned().unwrap_or_default();
        if members.is_empty() {
            self.members.remove(name);
        }
        let by_port = service
            .ports
            .iter()
            .map(|port| {
                let mut targets = PortTargets::default();
                let mut add = |t: Target, primary: bool| {
                    match t.addr.ip().to_canonical() {
                        IpAddr::V4(_) => targets.v4.push(t.clone()),
                        IpAddr::V6(_) => targets.v6.push(t.clone()),
                    }
                    if primary {
                        targets.primary.push(t);
                    }
                };
                for uid in &members {
                    let Some(w) = self.workloads.get(uid) else {
                        continue;
                    };
                    let mapping = w
                        .services
                        .iter()
                        .find(|b| &b.service == name)
                        .and_then(|b| b.ports.iter().find(|m| m.service_port == port.port));
                    if let Some(m) = mapping {
                        for (i, ip) in w.ips.iter().enumerate() {
                            let addr = SocketAddr::new(*ip, m.target_port);
                            let workload = Some(w.clone());
                            add(Target { workload, addr }, i == 0);
                        }
                    }
                }
                for e in &service.addresses {
                    if let Some(m) = e.ports.iter().find(|m| m.service_port == port.port) {
                        let addr = SocketAddr::new(e.ip, m.target_port);
                        add(
                            Target {
                                workload: None,
                                addr,
                            },
                            true,
                        );
                    }
                }
                (port.port, targets)
            })
            .collect();
        self.endpoints
            .insert(name.clone(), Arc::new(Endpoints { by_port }));
    }
}

fn vip_addrs(s: &Service) -> impl Iterator<Item = SocketAddr> + '_ {
    s.vips.iter().flat_map(move |vip| {
        s.ports
            .iter()
            .map(move |p| SocketAddr::new(vip.to_canonical(), p.port))
    })
}

#[derive(Default)]
struct Work {
    rejected: Vec<(Key, String)>,
    changed: BTreeSet<Key>,
    services: BTreeSet<ObjectName>,
}

/// What `/config_dump` shows of a model.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Dump<'a> {
    epoch: String,
    version: u64,
    resources: usize,
    namespaces: Vec<&'a Namespace>,
    workloads: Vec<&'a Workload>,
    services: Vec<&'a Service>,
    authorization_policies: Vec<&'a AuthorizationPolicy>,
    waypoints: Vec<&'a Waypoint>,
    routes: usize,
    traffic_policies: usize,
    trust_bundle_roots: usize,
}

fn sorted<'a, T: 'a + ?Sized, K: Ord>(
    values: impl Iterator<Item = &'a Arc<T>>,
    key: impl Fn(&T) -> K,
) -> Vec<&'a T> {
    let mut v: Vec<&T> = values.map(|a| &**a).collect();
    v.sort_by_key(|t| key(t));
    v
}

impl Serialize for Model {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        Dump {
            epoch: format!("{:016x}", self.epoch),
            version: self.version,
            resources: self.hashes.len(),
            namespaces: sorted(self.namespaces.values(), |n| n.name.clone()),
            workloads: sorted(self.workloads.values(), Workload::object_name),
            services: sorted(self.services.values(), Service::object_name),
            authorization_policies: sorted(
                self.policies.values(),
                AuthorizationPolicy::object_name,
            ),
            waypoints: sorted(self.waypoints.values(), |w| {
                (w.namespace.clone(), w.name.clone())
            }),
            routes: self.routes.len(),
            traffic_policies: self.traffic_policies.len(),
            trust_bundle_roots: self.trust_bundle.as_ref().map_or(0, |b| b.roots.len()),
        }
        .serialize(serializer)
    }
}

/// The digests a model with exactly `hashes` would have; for the controller, which
/// computes what a subscriber should hold without building its model.
pub fn digests_of<'a>(hashes: impl IntoIterator<Item = (&'a Key, u64)>) -> Digests {
    let mut d = [0; BUCKETS];
    for (key, hash) in hashes {
        digest::toggle(&mut d, key, hash);
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resource::{MtlsMode, PortMapping, ServiceBinding};

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("literal")
    }

    fn workload(uid: &str, ipv4: &str, services: &[(&str, u16, u16)]) -> Workload {
        Workload {
            uid: uid.into(),
            name: format!("pod-{uid}"),
            namespace: "demo".into(),
            service_account: "echo".into(),
            node: "node-1".into(),
            ips: vec![ip(ipv4)],
            enrolled: true,
            ready: true,
            services: services
                .iter()
                .map(|(svc, port, target)| ServiceBinding {
                    service: ObjectName::new("demo", *svc),
                    ports: vec![PortMapping {
                        service_port: *port,
                        target_port: *target,
                    }],
                })
                .collect(),
            authorization_policies: vec![],
            waypoint: None,
        }
    }

    fn service(name: &str, vip: &str, ports: &[u16]) -> Service {
        Service {
            namespace: "demo".into(),
            name: name.into(),
            vips: vec![ip(vip)],
            ports: ports
                .iter()
                .map(|p| ServicePort {
                    name: None,
                    port: *p,
                    target_port: None,
                    protocol: crate::resource::AppProtocol::Unknown,
                })
                .collect(),
            waypoint: None,
            addresses: vec![],
        }
    }

    fn update(
        version: u64,
        kind: proto::UpdateKind,
        upserts: Vec<Resource>,
        removals: Vec<Key>,
    ) -> proto::Update {
        proto::Update {
            epoch: 7,
            version,
            kind: kind as i32,
            buckets: vec![],
            upserts: upserts.iter().map(Resource::to_proto).collect(),
            removals: removals.iter().map(Key::to_proto).collect(),
        }
    }

    fn delta(version: u64, upserts: Vec<Resource>, removals: Vec<Key>) -> proto::Update {
        update(version, proto::UpdateKind::Delta, upserts, removals)
    }

    fn base() -> Model {
        let applied = Model::default().apply(&update(
            1,
            proto::UpdateKind::Full,
            vec![
                Resource::Namespace(Namespace {
                    name: "demo".into(),
                    enrolled: true,
                    mtls_mode: MtlsMode::Strict,
                }),
                Resource::Service(service("echo", "10.96.0.10", &[80])),
                Resource::Workload(workload("a", "10.244.1.1", &[("echo", 80, 8080)])),
                Resource::Workload(workload("b", "10.244.1.2", &[("echo", 80, 8081)])),
            ],
            vec![],
        ));
        assert!(applied.rejected.is_empty(), "{:?}", applied.rejected);
        applied.model
    }

    fn addrs(model: &Model, svc: &str, port: u16) -> Vec<String> {
        model
            .endpoints(&ObjectName::new("demo", svc), port)
            .iter()
            .map(|t| t.addr.to_string())
            .collect()
    }

    #[test]
    fn a_dual_stack_service_is_served_in_the_family_it_was_addressed_in() {
        let mut a = workload("a", "10.244.1.1", &[("echo", 80, 8080)]);
        a.ips.push(ip("fd00:10:244:1::1"));
        let mut svc = service("echo", "10.96.0.10", &[80]);
        svc.vips.push(ip("fd00:10:96::10"));
        let applied = Model::default().apply(&update(
            1,
            proto::UpdateKind::Full,
            vec![Resource::Service(svc), Resource::Workload(a)],
            vec![],
        ));
        assert!(applied.rejected.is_empty(), "{:?}", applied.rejected);
        let m = applied.model;
        let name = ObjectName::new("demo", "echo");
        let at = |like: &str| -> Vec<String> {
            m.endpoints_like(&name, 80, ip(like))
                .iter()
                .map(|t| t.addr.to_string())
                .collect()
        };
        assert_eq!(at("fd00:10:96::10"), ["[fd00:10:244:1::1]:8080"]);
        assert_eq!(at("10.96.0.10"), ["10.244.1.1:8080"]);
        assert_eq!(at("::ffff:10.96.0.10"), ["10.244.1.1:8080"]);
        assert_eq!(addrs(&m, "echo", 80), ["10.244.1.1:8080"], "primary");
        assert!(m
            .service_by_vip("[fd00:10:96::10]:80".parse().unwrap())
            .is_some());
        // A family no endpoint has falls back to the primary addresses.
        let v4_only = base();
        assert_eq!(
            v4_only
                .endpoints_like(&name, 80, ip("fd00::1"))
                .iter()
                .map(|t| t.addr.to_string())
                .collect::<Vec<_>>(),
            ["10.244.1.1:8080", "10.244.1.2:8081"]
        );
    }

    #[test]
    fn full_state_is_indexed() {
        let m = base();
        assert_eq!((m.epoch(), m.version(), m.len()), (7, 1, 4));
        assert_eq!(
            m.workload_by_ip(ip("10.244.1.1")).map(|w| w.uid.as_str()),
            Some("a")
        );
        assert_eq!(
            m.workload_by_ip(ip("::ffff:10.244.1.2"))
                .map(|w| w.uid.as_str()),
            Some("b")
        );
        let (svc, port) = m
            .service_by_vip("10.96.0.10:80".parse().expect("literal"))
            .expect("VIP");
        assert_eq!((svc.name.as_str(), port.port), ("echo", 80));
        assert!(m
            .service_by_vip("10.96.0.10:81".parse().expect("literal"))
            .is_none());
        assert_eq!(
            addrs(&m, "echo", 80),
            ["10.244.1.1:8080", "10.244.1.2:8081"]
        );
        assert_eq!(
            m.namespace("demo").map(|n| n.mtls_mode),
            Some(MtlsMode::Strict)
        );
    }

    #[test]
    fn deltas_upsert_and_remove_and_leave_the_old_model_alone() {
        let m1 = base();
        let applied = m1.apply(&delta(
            2,
            vec![Resource::Workload(workload(
                "c",
                "10.244.1.3",
                &[("echo", 80, 8080)],
            ))],
            vec![Key::new(Kind::Workload, "a")],
        ));
        assert!(applied.rejected.is_empty());
        let m2 = applied.model;
        assert_eq!(
            addrs(&m2, "echo", 80),
            ["10.244.1.2:8081", "10.244.1.3:8080"]
        );
        assert!(m2.workload_by_ip(ip("10.244.1.1")).is_none());
        // The previous version is untouched.
        assert_eq!(
            addrs(&m1, "echo", 80),
            ["10.244.1.1:8080", "10.244.1.2:8081"]
        );
        assert_eq!(
            applied.changed,
            [Key::new(Kind::Workload, "a"), Key::new(Kind::Workload, "c")]
        );
    }

    #[test]
    fn a_bad_resource_is_refused_alone_and_the_old_value_kept() {
        let m1 = base();
        // b claims a's IP; c is fine.
        let applied = m1.apply(&delta(
            2,
            vec![
                Resource::Workload(workload("b", "10.244.1.1", &[])),
                Resource::Workload(workload("c", "10.244.1.3", &[])),
            ],
            vec![],
        ));
        assert_eq!(applied.rejected.len(), 1);
        let (key, reason) = &applied.rejected[0];
        assert_eq!(key, &Key::new(Kind::Workload, "b"));
        assert!(
            reason.contains("10.244.1.1 is already used by workload demo/pod-a"),
            "{reason}"
        );
        let m2 = applied.model;
        assert_eq!(m2.workload("b").map(|w| w.ips[0]), Some(ip("10.244.1.2")));
        assert!(m2.workload("c").is_some());
        let ack = applied_ack(&m1, &m2);
        assert_eq!(ack, (7, 2));
    }

    fn applied_ack(_: &Model, m: &Model) -> (u64, u64) {
        (m.epoch(), m.version())
    }

    #[test]
    fn ips_can_trade_places_in_one_update() {
        let applied = base().apply(&delta(
            2,
            vec![
                Resource::Workload(workload("a", "10.244.1.2", &[])),
                Resource::Workload(workload("b", "10.244.1.1", &[])),
            ],
            vec![],
        ));
        assert!(applied.rejected.is_empty(), "{:?}", applied.rejected);
        assert_eq!(
            applied
                .model
                .workload_by_ip(ip("10.244.1.1"))
                .map(|w| w.uid.as_str()),
            Some("b")
        );
    }

    #[test]
    fn duplicate_vip_is_refused() {
        let applied = base().apply(&delta(
            2,
            vec![Resource::Service(service("other", "10.96.0.10", &[80]))],
            vec![],
        ));
        assert_eq!(applied.rejected.len(), 1);
        assert!(applied.rejected[0]
            .1
            .contains("10.96.0.10:80 is already served by service demo/echo"));
        assert!(applied
            .model
            .service(&ObjectName::new("demo", "other"))
            .is_none());
    }

    #[test]
    fn an_unchanged_upsert_changes_nothing() {
        let m1 = base();
        let applied = m1.apply(&delta(
            2,
            vec![Resource::Workload(workload(
                "a",
                "10.244.1.1",
                &[("echo", 80, 8080)],
            ))],
            vec![],
        ));
        assert!(applied.changed.is_empty());
        assert_eq!(applied.model.version(), 2);
    }

    #[test]
    fn digests_follow_the_content() {
        let m1 = base();
        let expected = digests_of(m1.hashes().map(|(k, h)| (k, *h)));
        assert_eq!(m1.position().buckets, expected.to_vec());
        let m2 = m1
            .apply(&delta(2, vec![], vec![Key::new(Kind::Workload, "a")]))
            .model;
        assert_ne!(m2.position().buckets, m1.position().buckets);
        let m3 = m2
            .apply(&delta(
                3,
                vec![Resource::Workload(workload(
                    "a",
                    "10.244.1.1",
                    &[("echo", 80, 8080)],
                ))],
                vec![],
            ))
            .model;
        assert_eq!(m3.position().buckets, m1.position().buckets);
    }

    /// Found by fuzzing: the position counted both upserts of a key sent twice in one
    /// update, so a resume from it resent everything of that bucket.
    #[test]
    fn a_key_upserted_twice_in_one_update_counts_once_and_the_last_wins() {
        let m1 = base();
        let first = workload("a", "10.244.1.1", &[("echo", 80, 8080)]);
        let last = workload("a", "10.244.1.9", &[("echo", 80, 8080)]);
        let update = delta(
            2,
            vec![Resource::Workload(first), Resource::Workload(last)],
            vec![],
        );
        let m2 = m1.apply(&update).model;
        let expected = digests_of(m2.hashes().map(|(k, h)| (k, *h)));
        assert_eq!(m2.position().buckets, expected.to_vec());
        assert_eq!(
            addrs(&m2, "echo", 80),
            ["10.244.1.9:8080", "10.244.1.2:8081"]
        );
        assert!(
            m2.apply(&update).changed.is_empty(),
            "applied again, it changes nothing"
        );
    }

    #[test]
    fn resync_replaces_only_the_buckets_named() {
        let m1 = base();
        let key_a = Key::new(Kind::Workload, "a");
        let bucket_a = digest::bucket(&key_a) as u32;
        // The resync names a's bucket and does not resend a: a is gone, the rest stays
        // unless it shares the bucket.
        let mut u = update(2, proto::UpdateKind::Resync, vec![], vec![]);
        u.buckets = vec![bucket_a];
        let m2 = m1.apply(&u).model;
        assert!(m2.workload("a").is_none());
        for (key, _) in m1.hashes() {
            if digest::bucket(key) as u32 != bucket_a {
                assert!(m2.hashes.contains_key(key), "{key} kept");
            }
        }
    }

    #[test]
    fn policies_for_a_workload() {
        use crate::resource::{Action, Rule};
        let policy = |name: &str, scope| {
            Resource::AuthorizationPolicy(AuthorizationPolicy {
                namespace: "demo".into(),
                name: name.into(),
                scope,
                action: Action::Deny,
                rules: vec![Rule::default()],
            })
        };
        let mut selected = workload("s", "10.244.1.9", &[]);
        selected.authorization_policies = vec![ObjectName::new("demo", "chosen")];
        let m = base()
            .apply(&delta(
                2,
                vec![
                    policy("wide", Scope::NamespaceWide),
                    policy("chosen", Scope::Selector),
                    policy("other", Scope::Selector),
                    Resource::Workload(selected.clone()),
                ],
                vec![],
            ))
            .model;
        let names: Vec<_> = m.policies_for(&selected).map(|p| p.name.clone()).collect();
        assert_eq!(names, ["wide", "chosen"]);
        let plain = m.workload("a").expect("a").clone();
        let names: Vec<_> = m.policies_for(&plain).map(|p| p.name.clone()).collect();
        assert_eq!(names, ["wide"]);
    }
}
