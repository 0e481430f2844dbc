//! The Kubernetes objects the controller reads, as one typed set, whichever source
//! (API server or manifest directory) they came from; and the [`Problem`]s found in
//! them, each naming the object, where it came from and the field.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::sync::Arc;

use api::ObjectName;
use gateway_api::experimental::httproutes::HttpRoute;
use gateway_api::gateways::Gateway;
use gateway_api::grpcroutes::GrpcRoute;
use gateway_api::referencegrants::ReferenceGrant;
use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde::Serialize;

use crate::crd::{AuthorizationPolicy, TrafficPolicy, WaypointParameters};

/// The kinds the controller reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum ObjectKind {
    /// `v1` Namespace.
    Namespace,
    /// `v1` Pod.
    Pod,
    /// `v1` Service.
    Service,
    /// `discovery.k8s.io/v1` EndpointSlice.
    EndpointSlice,
    /// `gateway.networking.k8s.io/v1` Gateway.
    Gateway,
    /// `gateway.networking.k8s.io/v1` HTTPRoute.
    HttpRoute,
    /// `gateway.networking.k8s.io/v1` GRPCRoute.
    GrpcRoute,
    /// `gateway.networking.k8s.io/v1beta1` ReferenceGrant.
    ReferenceGrant,
    /// `weft.dev/v1alpha1` AuthorizationPolicy.
    AuthorizationPolicy,
    /// `weft.dev/v1alpha1` TrafficPolicy.
    TrafficPolicy,
    /// `weft.dev/v1alpha1` WaypointParameters.
    WaypointParameters,
}

impl ObjectKind {
    /// Every kind.
    pub const ALL: [ObjectKind; 11] = [
        ObjectKind::Namespace,
        ObjectKind::Pod,
        ObjectKind::Service,
        ObjectKind::EndpointSlice,
        ObjectKind::Gateway,
        ObjectKind::HttpRoute,
        ObjectKind::GrpcRoute,
        ObjectKind::ReferenceGrant,
        ObjectKind::AuthorizationPolicy,
        ObjectKind::TrafficPolicy,
        ObjectKind::WaypointParameters,
    ];

    /// The Kubernetes kind, as in `kind:`.
    pub fn kind(self) -> &'static str {
        match self {
            ObjectKind::Namespace => "Namespace",
            ObjectKind::Pod => "Pod",
            ObjectKind::Service => "Service",
            ObjectKind::EndpointSlice => "EndpointSlice",
            ObjectKind::Gateway => "Gateway",
            ObjectKind::HttpRoute => "HTTPRoute",
            ObjectKind::GrpcRoute => "GRPCRoute",
            ObjectKind::ReferenceGrant => "ReferenceGrant",
            ObjectKind::AuthorizationPolicy => "AuthorizationPolicy",
            ObjectKind::TrafficPolicy => "TrafficPolicy",
            ObjectKind::WaypointParameters => "WaypointParameters",
        }
    }

    /// The API group (`""` for core).
    pub fn group(self) -> &'static str {
        match self {
            ObjectKind::Namespace | ObjectKind::Pod | ObjectKind::Service => "",
            ObjectKind::EndpointSlice => "discovery.k8s.io",
            ObjectKind::Gateway
            | ObjectKind::HttpRoute
            | ObjectKind::GrpcRoute
            | ObjectKind::ReferenceGrant => "gateway.networking.k8s.io",
            ObjectKind::AuthorizationPolicy
            | ObjectKind::TrafficPolicy
            | ObjectKind::WaypointParameters => "weft.dev",
        }
    }

    /// The versions read, the preferred one first.
    pub fn versions(self) -> &'static [&'static str] {
        match self.group() {
            "" | "discovery.k8s.io" => &["v1"],
            "weft.dev" => &["v1alpha1"],
            _ if self == ObjectKind::ReferenceGrant => &["v1beta1", "v1"],
            _ => &["v1", "v1beta1"],
        }
    }

    /// Whether objects of the kind live in a namespace.
    pub fn namespaced(self) -> bool {
        self != ObjectKind::Namespace
    }

    /// The kind an `apiVersion` and `kind` name; `None` for objects the controller does
    /// not read (a Deployment, or an AuthorizationPolicy of another group).
    pub fn of(api_version: &str, kind: &str) -> Option<(ObjectKind, &'static str)> {
        let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
        let found = ObjectKind::ALL
            .into_iter()
            .find(|k| k.kind() == kind && k.group() == group)?;
        let version = found.versions().iter().find(|v| **v == version).copied();
        Some((found, version.unwrap_or("")))
    }
}

impl fmt::Display for ObjectKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.kind())
    }
}

/// Where an object came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// The API server.
    Cluster,
    /// A manifest file, at the line its document starts.
    File {
        /// The file.
        path: Arc<Path>,
        /// The line, from 1.
        line: usize,
    },
}

impl Serialize for Origin {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Cluster => f.write_str("cluster"),
            Origin::File { path, line } => write!(f, "{}:{line}", path.display()),
        }
    }
}

/// An object of the set, with its origin.
#[derive(Debug)]
pub struct Obj<T> {
    /// The object.
    pub value: Arc<T>,
    /// Where it came from.
    pub origin: Origin,
}

impl<T> Clone for Obj<T> {
    fn clone(&self) -> Self {
        Obj {
            value: self.value.clone(),
            origin: self.origin.clone(),
        }
    }
}

/// Every object the controller reads, keyed by namespace and name (namespaces by name).
#[derive(Debug, Clone, Default)]
pub struct Objects {
    /// Namespaces.
    pub namespaces: BTreeMap<String, Obj<Namespace>>,
    /// Pods.
    pub pods: BTreeMap<ObjectName, Obj<Pod>>,
    /// Services.
    pub services: BTreeMap<ObjectName, Obj<Service>>,
    /// EndpointSlices.
    pub endpoint_slices: BTreeMap<ObjectName, Obj<EndpointSlice>>,
    /// Gateways (of every class; only `weft-waypoint` ones are used).
    pub gateways: BTreeMap<ObjectName, Obj<Gateway>>,
    /// HTTPRoutes.
    pub http_routes: BTreeMap<ObjectName, Obj<HttpRoute>>,
    /// GRPCRoutes.
    pub grpc_routes: BTreeMap<ObjectName, Obj<GrpcRoute>>,
    /// ReferenceGrants.
    pub reference_grants: BTreeMap<ObjectName, Obj<ReferenceGrant>>,
    /// Weft AuthorizationPolicies.
    pub authorization_policies: BTreeMap<ObjectName, Obj<AuthorizationPolicy>>,
    /// Weft TrafficPolicies.
    pub traffic_policies: BTreeMap<ObjectName, Obj<TrafficPolicy>>,
    /// Weft WaypointParameters.
    pub waypoint_parameters: BTreeMap<ObjectName, Obj<WaypointParameters>>,
}

/// One object of any kind the controller reads.
#[derive(Debug, Clone)]
pub enum AnyObject {
    /// A Namespace.
    Namespace(Arc<Namespace>),
    /// A Pod.
    Pod(Arc<Pod>),
    /// A Service.
    Service(Arc<Service>),
    /// An EndpointSlice.
    EndpointSlice(Arc<EndpointSlice>),
    /// A Gateway.
    Gateway(Arc<Gateway>),
    /// An HTTPRoute.
    HttpRoute(Arc<HttpRoute>),
    /// A GRPCRoute.
    GrpcRoute(Arc<GrpcRoute>),
    /// A ReferenceGrant.
    ReferenceGrant(Arc<ReferenceGrant>),
    /// An AuthorizationPolicy.
    AuthorizationPolicy(Arc<AuthorizationPolicy>),
    /// A TrafficPolicy.
    TrafficPolicy(Arc<TrafficPolicy>),
    /// A WaypointParameters.
    WaypointParameters(Arc<WaypointParameters>),
}

impl AnyObject {
    /// Its kind.
    pub fn kind(&self) -> ObjectKind {
        match self {
            AnyObject::Namespace(_) => ObjectKind::Namespace,
            AnyObject::Pod(_) => ObjectKind::Pod,
            AnyObject::Service(_) => ObjectKind::Service,
            AnyObject::EndpointSlice(_) => ObjectKind::EndpointSlice,
            AnyObject::Gateway(_) => ObjectKind::Gateway,
            AnyObject::HttpRoute(_) => ObjectKind::HttpRoute,
            AnyObject::GrpcRoute(_) => ObjectKind::GrpcRoute,
            AnyObject::ReferenceGrant(_) => ObjectKind::ReferenceGrant,
            AnyObject::AuthorizationPolicy(_) => ObjectKind::AuthorizationPolicy,
            AnyObject::TrafficPolicy(_) => ObjectKind::TrafficPolicy,
            AnyObject::WaypointParameters(_) => ObjectKind::WaypointParameters,
        }
    }

    /// Its metadata.
    pub(crate) fn metadata(&self) -> &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
        match self {
            AnyObject::Namespace(o) => &o.metadata,
            AnyObject::Pod(o) => &o.metadata,
            AnyObject::Service(o) => &o.metadata,
            AnyObject::EndpointSlice(o) => &o.metadata,
            AnyObject::Gateway(o) => &o.metadata,
            AnyObject::HttpRoute(o) => &o.metadata,
            AnyObject::GrpcRoute(o) => &o.metadata,
            AnyObject::ReferenceGrant(o) => &o.metadata,
            AnyObject::AuthorizationPolicy(o) => &o.metadata,
            AnyObject::TrafficPolicy(o) => &o.metadata,
            AnyObject::WaypointParameters(o) => &o.metadata,
        }
    }

    /// Its reference: kind, namespace (`default` when a namespaced object names none)
    /// and name.
    pub fn reference(&self) -> ObjectRef {
        let meta = self.metadata();
        let kind = self.kind();
        ObjectRef {
            kind,
            namespace: kind
                .namespaced()
                .then(|| meta.namespace.clone().unwrap_or_else(|| "default".into())),
            name: meta.name.clone().unwrap_or_default(),
        }
    }
}

/// Names one object: kind, namespace and name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct ObjectRef {
    /// Its kind.
    pub kind: ObjectKind,
    /// Its namespace; `None` for cluster-scoped kinds.
    pub namespace: Option<String>,
    /// Its name.
    pub name: String,
}

impl ObjectRef {
    /// A namespaced object.
    pub fn new(kind: ObjectKind, name: &ObjectName) -> Self {
        ObjectRef {
            kind,
            namespace: Some(name.namespace.clone()),
            name: name.name.clone(),
        }
    }

    /// `namespace/name`, for a namespaced object.
    pub fn object_name(&self) -> ObjectName {
        ObjectName::new(self.namespace.clone().unwrap_or_default(), &self.name)
    }
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = if self.name.is_empty() {
            "<no name>"
        } else {
            &self.name
        };
        match &self.namespace {
            Some(ns) => write!(f, "{} {ns}/{name}", self.kind),
            None => write!(f, "{} {name}", self.kind),
        }
    }
}

/// Two objects with the same kind, namespace and name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Duplicate {
    /// Where the object kept was defined.
    pub first: Origin,
}

impl Objects {
    /// Adds an object; one already there under the same reference is kept, unless
    /// `replace`, and the clash is returned.
    pub fn insert(
        &mut self,
        object: AnyObject,
        origin: Origin,
        replace: bool,
    ) -> Result<(), Duplicate> {
        fn put<K: Ord, T>(
            map: &mut BTreeMap<K, Obj<T>>,
            key: K,
            value: Arc<T>,
            origin: Origin,
            replace: bool,
        ) -> Result<(), Duplicate> {
            use std::collections::btree_map::Entry;
            // One search of the map, not two: a snapshot inserts every object.
            match map.entry(key) {
                Entry::Occupied(first) if !replace => Err(Duplicate {
                    first: first.get().origin.clone(),
                }),
                Entry::Occupied(mut e) => {
                    e.insert(Obj { value, origin });
                    Ok(())
                }
                Entry::Vacant(e) => {
                    e.insert(Obj { value, origin });
                    Ok(())
                }
            }
        }
        let r = object.reference();
        let name = r.object_name();
        match object {
            AnyObject::Namespace(o) => put(&mut self.namespaces, r.name, o, origin, replace),
            AnyObject::Pod(o) => put(&mut self.pods, name, o, origin, replace),
            AnyObject::Service(o) => put(&mut self.services, name, o, origin, replace),
            AnyObject::EndpointSlice(o) => put(&mut self.endpoint_slices, name, o, origin, replace),
            AnyObject::Gateway(o) => put(&mut self.gateways, name, o, origin, replace),
            AnyObject::HttpRoute(o) => put(&mut self.http_routes, name, o, origin, replace),
            AnyObject::GrpcRoute(o) => put(&mut self.grpc_routes, name, o, origin, replace),
            AnyObject::ReferenceGrant(o) => {
                put(&mut self.reference_grants, name, o, origin, replace)
            }
            AnyObject::AuthorizationPolicy(o) => {
                put(&mut self.authorization_policies, name, o, origin, replace)
            }
            AnyObject::TrafficPolicy(o) => {
                put(&mut self.traffic_policies, name, o, origin, replace)
            }
            AnyObject::WaypointParameters(o) => {
                put(&mut self.waypoint_parameters, name, o, origin, replace)
            }
        }
    }

    /// How many objects of every kind.
    pub fn len(&self) -> usize {
        self.namespaces.len()
            + self.pods.len()
            + self.services.len()
            + self.endpoint_slices.len()
            + self.gateways.len()
            + self.http_routes.len()
            + self.grpc_routes.len()
            + self.reference_grants.len()
            + self.authorization_policies.len()
            + self.traffic_policies.len()
            + self.waypoint_parameters.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What happened to an object with a problem.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum Effect {
    /// The object is not in the model.
    Rejected,
    /// The field named is not used; the rest of the object is.
    Ignored,
    /// The object is used, but the field is replaced by its safe value (for example
    /// an authorization rule that cannot be read denies in a DENY policy).
    FailedClosed,
    /// The file could not be read; the objects it held last time it could are kept.
    KeptLastGood,
}

impl fmt::Display for Effect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Effect::Rejected => "rejected",
            Effect::Ignored => "field ignored",
            Effect::FailedClosed => "failed closed",
            Effect::KeptLastGood => "last good version kept",
        })
    }
}

/// Something wrong with an object (or a manifest file), for logs, `weftctl check`
/// and status conditions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    /// The object; `None` for a file that could not be read as YAML.
    pub object: Option<ObjectRef>,
    /// Where it came from.
    pub origin: Origin,
    /// The field path, e.g. `spec.rules[0].backendRefs[1].name`; empty for the object
    /// as a whole.
    pub field: String,
    /// What is wrong and what to do about it.
    pub reason: String,
    /// What the controller did about it.
    pub effect: Effect,
    /// The status condition reason it maps to (Gateway API's, e.g. `BackendNotFound`).
    pub condition_reason: &'static str,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.origin != Origin::Cluster {
            write!(f, "{}: ", self.origin)?;
        }
        if let Some(object) = &self.object {
            write!(f, "{object}: ")?;
        }
        if !self.field.is_empty() {
            write!(f, "{}: ", self.field)?;
        }
        write!(f, "{} ({})", self.reason, self.effect)
    }
}
