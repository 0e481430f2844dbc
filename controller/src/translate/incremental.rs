//! Incremental translation: when only pods changed, and none of them appeared,
//! disappeared or moved in a way other objects depend on, only those pods are
//! translated, and the model is patched with their workloads.
//!
//! A one-pod change is the commonest event in a cluster (an IP handed out, a readiness
//! flip) and the model holds every workload of the mesh: re-translating 10,000 pods to
//! learn that one workload changed would make every change cost the size of the mesh.
//!
//! The fast path runs the same pure [`translate`] over a reduced set of objects: the
//! changed pods, their namespaces, the services (those accepted by the last full
//! translation), EndpointSlices and AuthorizationPolicies of those namespaces, and every
//! Gateway. That is everything a pod's workload is made of, so the workload it produces
//! is the one a full translation would. What a pod contributes to *other* resources is
//! held fixed by the conditions it is taken under, and anything outside them falls back
//! to a full translation:
//!
//! - every other kind of object is unchanged (the same `Arc`s from the same origins);
//! - a pod that was a workload is still one, and one that was not is still not (a
//!   workload's presence decides whether an EndpointSlice address is a binding or a
//!   service address);
//! - a workload keeps its labels, node, enrollment and service account (the policies'
//!   audiences and the node's identities are made of them), takes no UID or IP another
//!   pod holds, and has the same problems as before;
//! - the last full translation rejected no pod for a UID or IP another pod held (whose
//!   fate an unchanged pod's change could decide), and no EndpointSlice names a pod of
//!   another namespace.
//!
//! The equivalence is tested by applying random pod changes to a mesh and comparing
//! the patched model with a full translation after each.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use api::{Key, ObjectName, Resource};

use super::{translate, DesiredStatus, Entry, Settings, Translation};
use crate::objects::{Obj, ObjectKind, Objects, Problem};

/// At most this share (one in N) of the pods may change for the fast path to be taken;
/// beyond it a full translation costs about the same.
const MAX_CHANGED_SHARE: usize = 4;

/// What changed in the model.
#[derive(Debug)]
pub enum Entries {
    /// The whole model, from a full translation.
    Full(HashMap<Key, Entry>),
    /// Only these resources, from the fast path.
    Changed {
        /// Resources that are new or may have changed.
        upserts: Vec<(Key, Entry)>,
        /// Resources that are gone.
        removals: Vec<Key>,
    },
}

/// The result of one translation, full or incremental.
#[derive(Debug)]
pub struct Output {
    /// The model, or the change to it.
    pub entries: Entries,
    /// Every problem translation found (all of them, not only new ones).
    pub problems: Vec<Problem>,
    /// The status each status-bearing object should have.
    pub statuses: Vec<DesiredStatus>,
    /// The identities of each node's enrolled pods.
    pub identities: Arc<HashMap<String, BTreeSet<String>>>,
}

impl Output {
    /// Whether it came from the fast path.
    pub fn incremental(&self) -> bool {
        matches!(self.entries, Entries::Changed { .. })
    }
}

/// Translates a stream of object sets, each one incrementally when it can.
#[derive(Debug)]
pub struct Translator {
    settings: Settings,
    last: Option<Last>,
}

/// What a pod's workload was made of, of what other resources depend on.
#[derive(Debug, Clone, PartialEq)]
struct Facts {
    uid: String,
    ips: Vec<IpAddr>,
    node: String,
    enrolled: bool,
    service_account: String,
}

/// The state after the last translation.
#[derive(Debug)]
struct Last {
    objects: Arc<Objects>,
    /// The pods that are workloads.
    workloads: HashMap<ObjectName, Facts>,
    ip_owners: HashMap<IpAddr, ObjectName>,
    uid_owners: HashMap<String, ObjectName>,
    /// The services the last full translation accepted.
    services: BTreeSet<ObjectName>,
    problems: Vec<Problem>,
    statuses: Vec<DesiredStatus>,
    identities: Arc<HashMap<String, BTreeSet<String>>>,
    /// False when a pod's change can decide something about pods that did not change.
    incremental: bool,
}

impl Translator {
    /// A translator that has translated nothing yet.
    pub fn new(settings: Settings) -> Self {
        Translator {
            settings,
            last: None,
        }
    }

    /// Translates `objects`: the change since the last call when only pods changed in
    /// the ways the module documents, else the whole model.
    pub fn translate(&mut self, objects: &Arc<Objects>) -> Output {
        if let Some(out) = self.incremental(objects) {
            return out;
        }
        let translation = translate(objects, &self.settings);
        let last = Last::of(objects.clone(), &translation);
        let out = Output {
            entries: Entries::Full(translation.entries),
            problems: translation.problems,
            statuses: translation.statuses,
            identities: last.identities.clone(),
        };
        self.last = Some(last);
        out
    }

    /// The fast path; `None` when a full translation is needed.
    fn incremental(&mut self, objects: &Arc<Objects>) -> Option<Output> {
        let last = self.last.as_mut()?;
        if !last.incremental || !same_except_pods(&last.objects, objects) {
            return None;
        }
        let changed = changed_pods(&last.objects.pods, &objects.pods);
        if changed.len() > objects.pods.len() / MAX_CHANGED_SHARE {
            return None;
        }
        let reduced = reduced(objects, &changed, &last.services);
        let translation = translate(&reduced, &self.settings);
        let mut after: HashMap<ObjectName, (Facts, Key, Entry)> = HashMap::new();
        for (key, entry) in translation.entries {
            if let Resource::Workload(w) = &entry.resource {
                let name = ObjectName::new(&w.namespace, &w.name);
                after.insert(name, (facts(w), key, entry));
            }
        }
        let problems_after = pod_problems(&translation.problems);
        let problems_before = pod_problems(&last.problems);
        // Check every pod before changing anything: a refusal leaves `last` as it was.
        for name in &changed {
            if problems_before.get(name) != problems_after.get(name) {
                return None;
            }
            match (last.workloads.get(name), after.get(name)) {
                (None, None) => {}
                (Some(before), Some((now, _, _))) => {
                    let labels = |o: &Objects| {
                        o.pods
                            .get(name)
                            .and_then(|p| p.value.metadata.labels.clone())
                    };
                    let taken = now
                        .ips
                        .iter()
                        .any(|ip| last.ip_owners.get(ip).is_some_and(|o| o != name))
                        || last.uid_owners.get(&now.uid).is_some_and(|o| o != name);
                    if before.node != now.node
                        || before.enrolled != now.enrolled
                        || before.service_account != now.service_account
                        || taken
                        || labels(&last.objects) != labels(objects)
                    {
                        return None;
                    }
                }
                _ => return None,
            }
        }
        let mut upserts = Vec::with_capacity(after.len());
        let mut removals = Vec::new();
        for (name, (now, key, entry)) in after {
            if let Some(before) = last.workloads.get(&name) {
                for ip in &before.ips {
                    last.ip_owners.remove(ip);
                }
                if before.uid != now.uid {
                    last.uid_owners.remove(&before.uid);
                    removals.push(Key::new(api::Kind::Workload, before.uid.clone()));
                }
            }
            for ip in &now.ips {
                last.ip_owners.insert(*ip, name.clone());
            }
            last.uid_owners.insert(now.uid.clone(), name.clone());
            last.workloads.insert(name, now);
            upserts.push((key, entry));
        }
        last.objects = objects.clone();
        Some(Output {
            entries: Entries::Changed { upserts, removals },
            problems: last.problems.clone(),
            statuses: last.statuses.clone(),
            identities: last.identities.clone(),
        })
    }
}

impl Last {
    fn of(objects: Arc<Objects>, translation: &Translation) -> Self {
        let mut workloads = HashMap::with_capacity(objects.pods.len());
        let mut ip_owners = HashMap::with_capacity(objects.pods.len());
        let mut uid_owners = HashMap::with_capacity(objects.pods.len());
        let mut services = BTreeSet::new();
        for entry in translation.entries.values() {
            match &entry.resource {
                Resource::Workload(w) => {
                    let name = ObjectName::new(&w.namespace, &w.name);
                    for ip in &w.ips {
                        ip_owners.insert(*ip, name.clone());
                    }
                    uid_owners.insert(w.uid.clone(), name.clone());
                    workloads.insert(name, facts(w));
                }
                Resource::Service(s) => {
                    services.insert(ObjectName::new(&s.namespace, &s.name));
                }
                _ => {}
            }
        }
        let incremental = translation.collisions == 0 && !slices_cross_namespaces(&objects);
        Last {
            objects,
            workloads,
            ip_owners,
            uid_owners,
            services,
            problems: translation.problems.clone(),
            statuses: translation.statuses.clone(),
            identities: Arc::new(translation.identities.clone()),
            incremental,
        }
    }
}

fn facts(w: &api::Workload) -> Facts {
    Facts {
        uid: w.uid.clone(),
        ips: w.ips.clone(),
        node: w.node.clone(),
        enrolled: w.enrolled,
        service_account: w.service_account.clone(),
    }
}

/// The problems of each pod, in the order found.
fn pod_problems(problems: &[Problem]) -> HashMap<ObjectName, Vec<&Problem>> {
    let mut by_pod: HashMap<ObjectName, Vec<&Problem>> = HashMap::new();
    for p in problems {
        if let Some(o) = p.object.as_ref().filter(|o| o.kind == ObjectKind::Pod) {
            let name = ObjectName::new(o.namespace.as_deref().unwrap_or_default(), &o.name);
            by_pod.entry(name).or_default().push(p);
        }
    }
    by_pod
}

/// Whether an EndpointSlice names a pod of another namespace as an endpoint.
fn slices_cross_namespaces(objects: &Objects) -> bool {
    objects.endpoint_slices.iter().any(|(name, slice)| {
        slice.value.endpoints.iter().flatten().any(|e| {
            e.target_ref
                .as_ref()
                .and_then(|r| r.namespace.as_deref())
                .is_some_and(|ns| ns != name.namespace)
        })
    })
}

/// The same objects, in the same order, from the same origins.
fn same<K: Eq, T>(a: &BTreeMap<K, Obj<T>>, b: &BTreeMap<K, Obj<T>>) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|((ka, a), (kb, b))| {
            ka == kb && Arc::ptr_eq(&a.value, &b.value) && a.origin == b.origin
        })
}

/// Whether everything but the pods is the same.
fn same_except_pods(a: &Objects, b: &Objects) -> bool {
    // Spelled out so that a new kind of object cannot be forgotten here.
    let Objects {
        namespaces,
        pods: _,
        services,
        endpoint_slices,
        gateways,
        http_routes,
        grpc_routes,
        reference_grants,
        authorization_policies,
        traffic_policies,
        waypoint_parameters,
    } = a;
    same(namespaces, &b.namespaces)
        && same(services, &b.services)
        && same(endpoint_slices, &b.endpoint_slices)
        && same(gateways, &b.gateways)
        && same(http_routes, &b.http_routes)
        && same(grpc_routes, &b.grpc_routes)
        && same(reference_grants, &b.reference_grants)
        && same(authorization_policies, &b.authorization_policies)
        && same(traffic_policies, &b.traffic_policies)
        && same(waypoint_parameters, &b.waypoint_parameters)
}

/// The pods added, removed or changed between `a` and `b`, in name order (one walk of
/// both, as both are sorted).
fn changed_pods<T>(
    a: &BTreeMap<ObjectName, Obj<T>>,
    b: &BTreeMap<ObjectName, Obj<T>>,
) -> Vec<ObjectName> {
    let mut changed = Vec::new();
    let (mut a, mut b) = (a.iter().peekable(), b.iter().peekable());
    loop {
        match (a.peek(), b.peek()) {
            (None, None) => return changed,
            (Some((ka, _)), None) => {
                changed.push((*ka).clone());
                a.next();
            }
            (None, Some((kb, _))) => {
                changed.push((*kb).clone());
                b.next();
            }
            (Some((ka, va)), Some((kb, vb))) => match ka.cmp(kb) {
                std::cmp::Ordering::Less => {
                    changed.push((*ka).clone());
                    a.next();
                }
                std::cmp::Ordering::Greater => {
                    changed.push((*kb).clone());
                    b.next();
                }
                std::cmp::Ordering::Equal => {
                    if !Arc::ptr_eq(&va.value, &vb.value) || va.origin != vb.origin {
                        changed.push((*ka).clone());
                    }
                    a.next();
                    b.next();
                }
            },
        }
    }
}

/// Of the objects in the namespaces of `pods`, those a pod's workload is made of.
fn reduced(objects: &Objects, pods: &[ObjectName], services: &BTreeSet<ObjectName>) -> Objects {
    let namespaces: BTreeSet<&str> = pods.iter().map(|p| p.namespace.as_str()).collect();
    let mut out = Objects {
        gateways: objects.gateways.clone(),
        ..Objects::default()
    };
    for name in pods {
        if let Some(pod) = objects.pods.get(name) {
            out.pods.insert(name.clone(), pod.clone());
        }
    }
    for ns in namespaces {
        if let Some(n) = objects.namespaces.get(ns) {
            out.namespaces.insert(ns.to_owned(), n.clone());
        }
        let within = |name: &ObjectName| name.namespace == ns;
        let start = ObjectName::new(ns, "");
        for (name, s) in objects.services.range(start.clone()..) {
            if !within(name) {
                break;
            }
            if services.contains(name) {
                out.services.insert(name.clone(), s.clone());
            }
        }
        for (name, s) in objects.endpoint_slices.range(start.clone()..) {
            if !within(name) {
                break;
            }
            out.endpoint_slices.insert(name.clone(), s.clone());
        }
        for (name, p) in objects.authorization_policies.range(start..) {
            if !within(name) {
                break;
            }
            out.authorization_policies.insert(name.clone(), p.clone());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::manifests::parse_file;
    use crate::objects::{AnyObject, Origin};

    /// Everything but the pods: enrolled and plain namespaces, a waypoint bound to a
    /// namespace, selector services with a named target port, an EndpointSlice naming
    /// a pod and an outside address, a service refused for a taken cluster IP, and
    /// selector and namespace-wide policies.
    const MESH: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: a, labels: {weft.dev/mesh: enabled}}
---
apiVersion: v1
kind: Namespace
metadata: {name: b, labels: {weft.dev/mesh: enabled, weft.dev/use-waypoint: wp}}
---
apiVersion: v1
kind: Namespace
metadata: {name: c}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: wp, namespace: b}
spec: {gatewayClassName: weft-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: a}
spec: {clusterIP: 10.96.0.10, selector: {app: web}, ports: [{name: http, port: 80, targetPort: http}]}
---
apiVersion: v1
kind: Service
metadata: {name: api, namespace: a}
spec: {clusterIP: 10.96.0.11, selector: {app: api}, ports: [{port: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: b}
spec: {clusterIP: 10.96.0.12, ports: [{name: sql, port: 5432}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: db-1, namespace: b, labels: {kubernetes.io/service-name: db}}
addressType: IPv4
ports: [{name: sql, port: 5432}]
endpoints:
- {addresses: [10.244.9.9], targetRef: {kind: Pod, name: db-0}}
- {addresses: [10.1.1.1]}
---
apiVersion: v1
kind: Service
metadata: {name: cache, namespace: b}
spec: {clusterIP: 10.96.0.13, selector: {app: cache}, ports: [{port: 6379}]}
---
apiVersion: v1
kind: Service
metadata: {name: plain, namespace: c}
spec: {clusterIP: 10.96.0.14, selector: {app: web}, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: clash, namespace: c}
spec: {clusterIP: 10.96.0.10, selector: {app: api}, ports: [{port: 80}]}
---
apiVersion: weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: deny-api, namespace: a}
spec:
  selector: {matchLabels: {app: api}}
  action: DENY
  rules: [{from: [{namespaces: [c]}]}]
---
apiVersion: weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: allow-mesh, namespace: b}
spec:
  action: ALLOW
  rules: [{from: [{namespaces: [a, b]}]}]
"#;

    const APPS: [&str; 5] = ["web", "api", "cache", "db", "none"];
    const NAMESPACES: [&str; 3] = ["a", "b", "c"];

    /// A pod as the test varies it.
    #[derive(Debug, Clone)]
    struct P {
        namespace: &'static str,
        name: String,
        uid: String,
        ip: String,
        node: String,
        app: &'static str,
        account: &'static str,
        ready: bool,
    }

    impl P {
        fn object(&self) -> (AnyObject, Origin) {
            let yaml = format!(
                "apiVersion: v1\nkind: Pod\n\
                 metadata: {{name: {}, namespace: {}, uid: {}, labels: {{app: {}}}}}\n\
                 spec: {{nodeName: '{}', serviceAccountName: {}, containers: [{{name: main, ports: [{{name: http, containerPort: 8080}}]}}]}}\n\
                 status: {{phase: Running, podIP: '{}', conditions: [{{type: Ready, status: '{}'}}]}}\n",
                self.name,
                self.namespace,
                self.uid,
                self.app,
                self.node,
                self.account,
                self.ip,
                if self.ready { "True" } else { "False" },
            );
            let mut parsed = parse_file(Path::new("pods.yaml"), &yaml).expect("a pod");
            parsed.objects.pop().expect("one object")
        }
    }

    fn mesh() -> Objects {
        let mut objects = Objects::default();
        for (o, origin) in parse_file(Path::new("mesh.yaml"), MESH)
            .expect("YAML")
            .objects
        {
            objects.insert(o, origin, false).expect("unique");
        }
        objects
    }

    /// xorshift64: the same sequence on every run.
    struct Rng(u64);

    impl Rng {
        fn below(&mut self, n: usize) -> usize {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 % n as u64) as usize
        }
    }

    /// The model kept by applying each output, as the store does.
    fn apply(model: &mut HashMap<Key, Entry>, output: Output) {
        match output.entries {
            Entries::Full(entries) => *model = entries,
            Entries::Changed { upserts, removals } => {
                for key in removals {
                    model.remove(&key);
                }
                model.extend(upserts);
            }
        }
    }

    fn sorted(problems: &[Problem]) -> Vec<String> {
        let mut texts: Vec<String> = problems.iter().map(ToString::to_string).collect();
        texts.sort();
        texts
    }

    /// Translates `objects` both ways and checks they agree; whether the fast path
    /// was taken.
    fn check(
        translator: &mut Translator,
        model: &mut HashMap<Key, Entry>,
        objects: &Arc<Objects>,
        step: &str,
    ) -> bool {
        let full = translate(objects, &Settings::default());
        let output = translator.translate(objects);
        let incremental = output.incremental();
        assert_eq!(sorted(&output.problems), sorted(&full.problems), "{step}");
        assert_eq!(output.statuses, full.statuses, "{step}");
        assert_eq!(*output.identities, full.identities, "{step}");
        apply(model, output);
        assert_eq!(model.len(), full.entries.len(), "{step}");
        for (key, entry) in &full.entries {
            assert_eq!(model.get(key), Some(entry), "{step}: {key:?}");
        }
        incremental
    }

    /// The mesh with `pods`; a pod that did not change keeps its object (the same
    /// `Arc`), as a source keeps what it did not re-read.
    struct World {
        base: Objects,
        parsed: HashMap<String, (String, AnyObject, Origin)>,
    }

    impl World {
        fn new() -> Self {
            World {
                base: mesh(),
                parsed: HashMap::new(),
            }
        }

        fn with_pods(&mut self, pods: &[P]) -> Arc<Objects> {
            let mut objects = self.base.clone();
            for p in pods {
                let seen = format!("{p:?}");
                let (o, origin) = match self.parsed.get(&p.name) {
                    Some((was, o, origin)) if *was == seen => (o.clone(), origin.clone()),
                    _ => {
                        let (o, origin) = p.object();
                        self.parsed
                            .insert(p.name.clone(), (seen, o.clone(), origin.clone()));
                        (o, origin)
                    }
                };
                objects.insert(o, origin, false).expect("unique pods");
            }
            Arc::new(objects)
        }
    }

    fn pods(n: usize) -> Vec<P> {
        (0..n)
            .map(|i| P {
                namespace: NAMESPACES[i % 3],
                name: if i == 1 {
                    "db-0".into()
                } else {
                    format!("p{i}")
                },
                uid: format!("u{i}"),
                ip: format!("10.244.0.{}", i + 2),
                node: format!("n{}", i % 4),
                app: APPS[i % APPS.len()],
                account: ["one", "two"][i % 2],
                ready: i % 7 != 0,
            })
            .collect()
    }

    #[test]
    fn a_pod_address_change_is_translated_alone() {
        let mut world = World::new();
        let mut list = pods(24);
        let mut translator = Translator::new(Settings::default());
        let mut model = HashMap::new();
        assert!(!check(
            &mut translator,
            &mut model,
            &world.with_pods(&list),
            "start"
        ));
        list[3].ip = "10.244.7.7".into();
        let objects = world.with_pods(&list);
        let full = translate(&objects, &Settings::default());
        let output = translator.translate(&objects);
        match &output.entries {
            Entries::Changed { upserts, removals } => {
                assert!(removals.is_empty());
                assert_eq!(upserts.len(), 1, "only the pod's workload");
                let (key, entry) = &upserts[0];
                assert_eq!(full.entries.get(key), Some(entry));
            }
            Entries::Full(_) => panic!("an IP change re-translated the whole mesh"),
        }
        // A label change may change who gets a policy (p6 is the only pod deny-api
        // selects on its node): a full one.
        list[6].app = "web";
        let objects = world.with_pods(&list);
        assert!(!check(&mut translator, &mut model, &objects, "label"));
        // A change to anything but pods is full, too.
        let mut other = (*objects).clone();
        let (ns, origin) = parse_file(
            Path::new("mesh.yaml"),
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: c}\n",
        )
        .expect("YAML")
        .objects
        .remove(0);
        other.insert(ns, origin, true).expect("replaced");
        assert!(!check(
            &mut translator,
            &mut model,
            &Arc::new(other),
            "namespace"
        ));
    }

    #[test]
    fn pod_changes_applied_incrementally_agree_with_a_full_translation() {
        let mut world = World::new();
        let mut list = pods(24);
        let mut translator = Translator::new(Settings::default());
        let mut model = HashMap::new();
        check(
            &mut translator,
            &mut model,
            &world.with_pods(&list),
            "start",
        );
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let (mut fast, mut fresh) = (0, 100);
        for step in 0..400 {
            fresh += 1;
            let i = rng.below(list.len());
            let op = rng.below(10);
            match op {
                0..=2 => list[i].ip = format!("10.244.{}.{}", 1 + fresh / 250, fresh % 250),
                3 => list[i].ready = !list[i].ready,
                4 => list[i].uid = format!("u{fresh}"),
                5 => list[i].app = APPS[rng.below(APPS.len())],
                6 if rng.below(3) == 0 => list[i].account = ["one", "two"][rng.below(2)],
                6 => list[i].node = ["", "n0", "n1", "n9"][rng.below(4)].into(),
                7 => {
                    // Another pod's IP: both depend on each other until it is moved.
                    let j = rng.below(list.len());
                    list[i].ip = list[j].ip.clone();
                }
                8 => list[i].ip = "not-an-ip".into(),
                _ if list.len() > 12 && rng.below(2) == 0 => {
                    list.remove(i);
                }
                _ => list.push(P {
                    namespace: NAMESPACES[rng.below(3)],
                    name: format!("new{fresh}"),
                    uid: format!("u{fresh}"),
                    ip: format!("10.244.200.{}", fresh % 250),
                    node: "n2".into(),
                    app: APPS[rng.below(APPS.len())],
                    account: "one",
                    ready: true,
                }),
            }
            let objects = world.with_pods(&list);
            if check(
                &mut translator,
                &mut model,
                &objects,
                &format!("step {step} op {op}"),
            ) {
                fast += 1;
            }
        }
        assert!(fast >= 40, "the fast path was taken {fast} times of 400");
    }
}
