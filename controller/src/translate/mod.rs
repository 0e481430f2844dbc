//! Translation: cluster objects in, the mesh model out, as pure functions.
//!
//! ```text
//!  Objects ─ namespaces ─> Namespace resources (enrollment, mTLS mode)
//!          ─ pods ───────> Workload resources (identity, IPs, node, readiness)
//!          ─ services ───> Service resources + each workload's service bindings
//!                          (EndpointSlices when present, else the selector; named
//!                          target ports resolved per pod)
//!          ─ policies ───> AuthorizationPolicy resources + workload policy lists
//!          ─ gateways, routes, traffic policies ─> waypoint resources
//! ```
//!
//! Every object is checked on its own: a bad one becomes a [`Problem`] naming it, its
//! origin and the field, and the rest of the model is still produced. What each
//! resource is for (every proxy, the node-proxies of some nodes, waypoints) travels
//! with it as its [`Audience`].

pub use api::enrollment;
pub mod incremental;
mod policies;
mod routes;
mod selector;
mod services;
mod workloads;

use std::collections::{BTreeSet, HashMap};

use api::{Key, Resource, TrustBundle};

use crate::objects::{Effect, ObjectKind, ObjectRef, Objects, Origin, Problem};

pub use selector::matches as selector_matches;

/// Namespace and pod label that enrolls (`enabled`) or opts a pod out (`disabled`).
pub use api::enrollment::MESH_LABEL;
/// Namespace label: `strict` refuses plaintext from outside the mesh, `permissive`
/// (default) accepts it.
pub const MTLS_LABEL: &str = "weft.dev/mtls-mode";
/// Service, namespace or pod label naming the waypoint (a Gateway of class
/// `weft-waypoint` in the same namespace) its traffic goes through.
pub const WAYPOINT_LABEL: &str = "weft.dev/use-waypoint";
/// The GatewayClass of waypoints.
pub const WAYPOINT_CLASS: &str = "weft-waypoint";
/// The controller name in route status.
pub const CONTROLLER_NAME: &str = "weft.dev/controller";

/// Settings translation depends on.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The SPIFFE trust domain.
    pub trust_domain: String,
    /// The trust bundle to distribute (DER roots); none: no bundle resource.
    pub trust_bundle: Vec<Vec<u8>>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            trust_domain: "cluster.local".into(),
            trust_bundle: Vec::new(),
        }
    }
}

/// Who a resource is sent to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Audience {
    /// Every proxy.
    All,
    /// Node-proxies of these nodes (and every waypoint).
    Nodes(BTreeSet<String>),
    /// Waypoints only.
    Waypoints,
}

impl Audience {
    /// Whether a node-proxy of `node` gets it.
    pub fn node_proxy(&self, node: &str) -> bool {
        match self {
            Audience::All => true,
            Audience::Nodes(nodes) => nodes.contains(node),
            Audience::Waypoints => false,
        }
    }
}

/// One resource of the model and who gets it.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// The resource.
    pub resource: Resource,
    /// Who gets it.
    pub audience: Audience,
}

/// A condition Weft writes on an object's status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Condition {
    /// `Accepted`, `ResolvedRefs`, ...
    pub type_: &'static str,
    /// True or false.
    pub status: bool,
    /// CamelCase reason, as Gateway API prescribes.
    pub reason: &'static str,
    /// For people.
    pub message: String,
}

/// The status an object should have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredStatus {
    /// The object.
    pub object: ObjectRef,
    /// Its `metadata.generation`, for `observedGeneration`.
    pub generation: Option<i64>,
    /// Its conditions: for a route, per parent (the parentRef as written, then its
    /// conditions); for a Weft policy, one entry with no parent; for a Gateway, its own
    /// (no key), then each listener's (`{"listener": name}`).
    pub parents: Vec<(Option<serde_json::Value>, Vec<Condition>)>,
}

/// The result of one translation.
#[derive(Debug, Clone, Default)]
pub struct Translation {
    /// The model, by key.
    pub entries: HashMap<Key, Entry>,
    /// What was wrong, object by object.
    pub problems: Vec<Problem>,
    /// The status each status-bearing object should have.
    pub statuses: Vec<DesiredStatus>,
    /// The identities (SPIFFE IDs) of the enrolled pods of each node: what a node may
    /// get certificates for.
    pub identities: HashMap<String, BTreeSet<String>>,
    /// Pods rejected for a UID or IP another pod holds: whether they are workloads
    /// depends on other pods.
    pub collisions: usize,
}

/// Collects problems for one object.
pub(crate) struct Report<'a> {
    kind: ObjectKind,
    namespace: Option<&'a str>,
    name: &'a str,
    origin: &'a Origin,
    problems: &'a mut Vec<Problem>,
}

impl<'a> Report<'a> {
    /// For a namespaced object. Nothing is copied unless a problem is added.
    pub(crate) fn new(
        kind: ObjectKind,
        name: &'a api::ObjectName,
        origin: &'a Origin,
        problems: &'a mut Vec<Problem>,
    ) -> Self {
        Report {
            kind,
            namespace: Some(&name.namespace),
            name: &name.name,
            origin,
            problems,
        }
    }

    /// For a cluster-scoped object.
    pub(crate) fn cluster(
        kind: ObjectKind,
        name: &'a str,
        origin: &'a Origin,
        problems: &'a mut Vec<Problem>,
    ) -> Self {
        Report {
            kind,
            namespace: None,
            name,
            origin,
            problems,
        }
    }

    pub(crate) fn add(
        &mut self,
        field: impl Into<String>,
        reason: impl Into<String>,
        effect: Effect,
        condition_reason: &'static str,
    ) {
        self.problems.push(Problem {
            object: Some(ObjectRef {
                kind: self.kind,
                namespace: self.namespace.map(str::to_owned),
                name: self.name.to_owned(),
            }),
            origin: self.origin.clone(),
            field: field.into(),
            reason: reason.into(),
            effect,
            condition_reason,
        });
    }

    pub(crate) fn reject(&mut self, field: impl Into<String>, reason: impl Into<String>) {
        self.add(field, reason, Effect::Rejected, "Invalid");
    }

    pub(crate) fn ignore(&mut self, field: impl Into<String>, reason: impl Into<String>) {
        self.add(field, reason, Effect::Ignored, "Invalid");
    }
}

/// Translates every object into the model.
pub fn translate(objects: &Objects, settings: &Settings) -> Translation {
    let mut out = Translation::default();
    let namespaces = workloads::namespaces(objects, &mut out);
    let mut pods = workloads::pods(objects, settings, &namespaces, &mut out);
    let waypoints = routes::waypoints(objects, &mut out);
    services::services(objects, &namespaces, &waypoints, &mut pods, &mut out);
    workloads::waypoints(
        objects,
        &namespaces,
        &waypoints,
        &mut pods,
        &mut out.problems,
    );
    policies::authorization(objects, &mut pods, &mut out);
    routes::routes(objects, &mut out);
    policies::traffic(objects, &mut out);
    // Many pods of a node share an identity: each is written out once.
    let mut seen: HashMap<&str, std::collections::HashSet<(&str, &str)>> = HashMap::new();
    for pod in &pods.list {
        let w = &pod.workload;
        if w.enrolled && !w.node.is_empty() {
            seen.entry(&w.node)
                .or_default()
                .insert((&w.namespace, &w.service_account));
        }
    }
    for (node, ids) in seen {
        out.identities.insert(
            node.to_owned(),
            ids.into_iter()
                .map(|(ns, sa)| format!("spiffe://{}/ns/{ns}/sa/{sa}", settings.trust_domain))
                .collect(),
        );
    }
    out.entries.reserve(pods.list.len());
    for pod in pods.list {
        let resource = Resource::Workload(pod.workload);
        out.entries.insert(
            resource.key(),
            Entry {
                resource,
                audience: Audience::All,
            },
        );
    }
    if !settings.trust_bundle.is_empty() {
        let resource = Resource::TrustBundle(TrustBundle {
            roots: settings.trust_bundle.clone(),
        });
        out.entries.insert(
            resource.key(),
            Entry {
                resource,
                audience: Audience::All,
            },
        );
    }
    out
}

/// A status with one `Accepted` condition, for Weft's own kinds.
pub(crate) fn accepted_status(
    kind: ObjectKind,
    name: &api::ObjectName,
    generation: Option<i64>,
    problems: &[Problem],
    first: usize,
) -> DesiredStatus {
    let mine = &problems[first..];
    let condition = match mine.first() {
        None => Condition {
            type_: "Accepted",
            status: true,
            reason: "Accepted",
            message: "applied to the mesh".into(),
        },
        Some(_) => {
            let rejected = mine.iter().any(|p| p.effect == Effect::Rejected);
            let text: Vec<String> = mine
                .iter()
                .map(|p| match p.field.is_empty() {
                    true => format!("{} ({})", p.reason, p.effect),
                    false => format!("{}: {} ({})", p.field, p.reason, p.effect),
                })
                .collect();
            Condition {
                type_: "Accepted",
                status: !rejected && mine.iter().all(|p| p.effect == Effect::Ignored),
                reason: if rejected {
                    "Invalid"
                } else {
                    mine[0].condition_reason
                },
                message: text.join("; "),
            }
        }
    };
    DesiredStatus {
        object: ObjectRef::new(kind, name),
        generation,
        parents: vec![(None, vec![condition])],
    }
}

/// Routes that `statuses` has nothing for (their parentRefs name no Service of the mesh
/// now) but whose status still carries Weft's parent entries: a status without parents
/// for each, which the writer turns into the route's parents without Weft's (others'
/// stay). Read from the routes' own status, so a route that left the mesh while no
/// controller ran, or while another replica led, is cleaned up too, and a failed write
/// is tried again.
pub fn routes_left(objects: &Objects, statuses: &[DesiredStatus]) -> Vec<DesiredStatus> {
    let covered: BTreeSet<&ObjectRef> = statuses.iter().map(|d| &d.object).collect();
    // (kind, name, generation, whether Weft has a parent entry in its status)
    let http = objects.http_routes.iter().map(|(name, r)| {
        let parents = r.value.status.iter().flat_map(|s| &s.parents);
        let ours = parents
            .map(|p| &p.controller_name)
            .any(|c| c == CONTROLLER_NAME);
        (
            ObjectKind::HttpRoute,
            name,
            r.value.metadata.generation,
            ours,
        )
    });
    let grpc = objects.grpc_routes.iter().map(|(name, r)| {
        let parents = r.value.status.iter().flat_map(|s| &s.parents);
        let ours = parents
            .map(|p| &p.controller_name)
            .any(|c| c == CONTROLLER_NAME);
        (
            ObjectKind::GrpcRoute,
            name,
            r.value.metadata.generation,
            ours,
        )
    });
    http.chain(grpc)
        .filter(|(.., ours)| *ours)
        .map(|(kind, name, generation, _)| DesiredStatus {
            object: ObjectRef::new(kind, name),
            generation,
            parents: Vec::new(),
        })
        .filter(|d| !covered.contains(&d.object))
        .collect()
}

/// The status of each waypoint Gateway (class `weft-waypoint`): `Accepted`, and
/// `Programmed` once one of its waypoint pods is ready (it serves), as Gateway API asks
/// of a Gateway's controller. Computed from the objects each round, beside translation:
/// pods come and go without the model changing.
pub fn gateway_statuses(objects: &Objects) -> Vec<DesiredStatus> {
    let mut out = Vec::new();
    for (name, gateway) in &objects.gateways {
        if gateway.value.spec.gateway_class_name != WAYPOINT_CLASS {
            continue;
        }
        let ready = objects
            .pods
            .iter()
            .filter(|(pod, _)| pod.namespace == name.namespace)
            .filter(|(_, p)| {
                let p = &p.value;
                p.metadata.deletion_timestamp.is_none()
                    && p.metadata
                        .labels
                        .as_ref()
                        .and_then(|l| l.get(crate::waypoints::GATEWAY_NAME_LABEL))
                        == Some(&name.name)
                    && p.status
                        .as_ref()
                        .and_then(|s| s.conditions.as_ref())
                        .is_some_and(|cs| {
                            cs.iter().any(|c| c.type_ == "Ready" && c.status == "True")
                        })
            })
            .count();
        let accepted = match crate::waypoints::parameters(&gateway.value, objects) {
            Ok(_) => Condition {
                type_: "Accepted",
                status: true,
                reason: "Accepted",
                message: "a waypoint of the mesh; the controller deploys it".into(),
            },
            Err(why) => Condition {
                type_: "Accepted",
                status: false,
                reason: "InvalidParameters",
                message: format!("{why}; its waypoint is left as it is until this is fixed"),
            },
        };
        let programmed = match ready {
            0 => Condition {
                type_: "Programmed",
                status: false,
                reason: "Pending",
                message: format!(
                    "no waypoint pod is ready yet (Deployment {}/{})",
                    name.namespace, name.name
                ),
            },
            n => Condition {
                type_: "Programmed",
                status: true,
                reason: "Programmed",
                message: format!("{n} waypoint pod(s) ready"),
            },
        };
        // Each listener: accepted and programmed as the Gateway is (mesh routes attach
        // to Services, not to listeners).
        let listeners = gateway.value.spec.listeners.iter().map(|l| {
            let resolved = Condition {
                type_: "ResolvedRefs",
                status: true,
                reason: "ResolvedRefs",
                message: "nothing to resolve".into(),
            };
            // A listener is accepted whatever the Gateway's parameters.
            let listener_accepted = Condition {
                type_: "Accepted",
                status: true,
                reason: "Accepted",
                message: "the mesh's HBONE listener".into(),
            };
            (
                Some(serde_json::json!({ "listener": l.name })),
                vec![listener_accepted, programmed.clone(), resolved],
            )
        });
        let mut parents = vec![(None, vec![accepted.clone(), programmed.clone()])];
        parents.extend(listeners);
        out.push(DesiredStatus {
            object: ObjectRef::new(ObjectKind::Gateway, name),
            generation: gateway.value.metadata.generation,
            parents,
        });
    }
    out
}

#[cfg(test)]
mod tests;
