//! Typed resources of the mesh model, their [`Key`]s, and conversion from and to the
//! wire. Converting from the wire validates: a proxy refuses a resource it cannot use
//! with a [`ResourceError`] naming the field, and applies the rest of the update.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use serde::Serialize;

use crate::proto;

/// `namespace/name` of a namespaced object.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct ObjectName {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
}

impl ObjectName {
    /// `namespace/name`.
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        ObjectName {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for ObjectName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

impl FromStr for ObjectName {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once('/') {
            Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
                Ok(ObjectName::new(ns, name))
            }
            _ => Err(format!("{s:?} is not of the form namespace/name")),
        }
    }
}

/// The kinds of resources the model holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum Kind {
    /// A [`Namespace`].
    Namespace,
    /// A [`Workload`].
    Workload,
    /// A [`Service`].
    Service,
    /// An [`AuthorizationPolicy`].
    AuthorizationPolicy,
    /// A [`Waypoint`].
    Waypoint,
    /// An HTTPRoute.
    HttpRoute,
    /// A GRPCRoute.
    GrpcRoute,
    /// A TrafficPolicy.
    TrafficPolicy,
    /// The [`TrustBundle`].
    TrustBundle,
}

impl Kind {
    /// Every kind, in wire order.
    pub const ALL: [Kind; 9] = [
        Kind::Namespace,
        Kind::Workload,
        Kind::Service,
        Kind::AuthorizationPolicy,
        Kind::Waypoint,
        Kind::HttpRoute,
        Kind::GrpcRoute,
        Kind::TrafficPolicy,
        Kind::TrustBundle,
    ];

    /// The kind's name in logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Namespace => "namespace",
            Kind::Workload => "workload",
            Kind::Service => "service",
            Kind::AuthorizationPolicy => "authorization_policy",
            Kind::Waypoint => "waypoint",
            Kind::HttpRoute => "http_route",
            Kind::GrpcRoute => "grpc_route",
            Kind::TrafficPolicy => "traffic_policy",
            Kind::TrustBundle => "trust_bundle",
        }
    }

    fn to_proto(self) -> proto::Kind {
        match self {
            Kind::Namespace => proto::Kind::Namespace,
            Kind::Workload => proto::Kind::Workload,
            Kind::Service => proto::Kind::Service,
            Kind::AuthorizationPolicy => proto::Kind::AuthorizationPolicy,
            Kind::Waypoint => proto::Kind::Waypoint,
            Kind::HttpRoute => proto::Kind::HttpRoute,
            Kind::GrpcRoute => proto::Kind::GrpcRoute,
            Kind::TrafficPolicy => proto::Kind::TrafficPolicy,
            Kind::TrustBundle => proto::Kind::TrustBundle,
        }
    }

    /// The kind a wire value names; `None` for kinds this build does not know.
    pub fn from_proto(value: i32) -> Option<Kind> {
        Some(match proto::Kind::try_from(value).ok()? {
            proto::Kind::Unspecified => return None,
            proto::Kind::Namespace => Kind::Namespace,
            proto::Kind::Workload => Kind::Workload,
            proto::Kind::Service => Kind::Service,
            proto::Kind::AuthorizationPolicy => Kind::AuthorizationPolicy,
            proto::Kind::Waypoint => Kind::Waypoint,
            proto::Kind::HttpRoute => Kind::HttpRoute,
            proto::Kind::GrpcRoute => Kind::GrpcRoute,
            proto::Kind::TrafficPolicy => Kind::TrafficPolicy,
            proto::Kind::TrustBundle => Kind::TrustBundle,
        })
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A resource's identity: workloads by pod UID, namespaces by name, the trust bundle as
/// `trust-bundle`, everything else as `namespace/name`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct Key {
    /// The kind.
    pub kind: Kind,
    /// The name within the kind.
    pub name: String,
}

/// The trust bundle's key name.
pub const TRUST_BUNDLE_KEY: &str = "trust-bundle";

impl Key {
    /// A key.
    pub fn new(kind: Kind, name: impl Into<String>) -> Self {
        Key {
            kind,
            name: name.into(),
        }
    }

    /// Its wire form.
    pub fn to_proto(&self) -> proto::Key {
        proto::Key {
            kind: self.kind.to_proto() as i32,
            name: self.name.clone(),
        }
    }

    /// The key a wire value names; `None` for kinds this build does not know.
    pub fn from_proto(key: &proto::Key) -> Option<Key> {
        Some(Key::new(Kind::from_proto(key.kind)?, key.name.clone()))
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.kind, self.name)
    }
}

/// Whether enrolled workloads accept plaintext from sources outside the mesh.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize)]
pub enum MtlsMode {
    /// Plaintext from non-mesh sources is allowed; mesh peers still use mTLS.
    #[default]
    Permissive,
    /// Plaintext from non-mesh sources is refused.
    Strict,
}

/// A Kubernetes namespace and the mesh settings of everything in it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Namespace {
    /// Its name.
    pub name: String,
    /// Labelled `weft.dev/mesh=enabled`.
    pub enrolled: bool,
    /// What inbound traffic from outside the mesh may do.
    pub mtls_mode: MtlsMode,
}

/// A pod, with what proxies need to capture, identify and reach it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Workload {
    /// Pod UID: the key the CNI plugin hands over.
    pub uid: String,
    /// Pod name.
    pub name: String,
    /// Namespace.
    pub namespace: String,
    /// Service account: the workload's identity.
    pub service_account: String,
    /// The node it is scheduled on.
    pub node: String,
    /// Pod IPs; empty until the runtime has given it one.
    pub ips: Vec<IpAddr>,
    /// In the mesh: its namespace is enrolled and it did not opt out.
    pub enrolled: bool,
    /// Its Ready condition.
    pub ready: bool,
    /// The services it is a ready endpoint of, with its ports for each.
    pub services: Vec<ServiceBinding>,
    /// Selector-scoped authorization policies that select it.
    pub authorization_policies: Vec<ObjectName>,
    /// The waypoint its own address is served through.
    pub waypoint: Option<ObjectName>,
}

impl Workload {
    /// `namespace/name`, for logs.
    pub fn object_name(&self) -> ObjectName {
        ObjectName::new(&self.namespace, &self.name)
    }

    /// `spiffe://<trust_domain>/ns/<namespace>/sa/<service account>`.
    pub fn spiffe_id(&self, trust_domain: &str) -> String {
        format!(
            "spiffe://{trust_domain}/ns/{}/sa/{}",
            self.namespace, self.service_account
        )
    }
}

/// A workload's membership in a service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServiceBinding {
    /// The service.
    pub service: ObjectName,
    /// Service port to the workload's port, for each port it serves.
    pub ports: Vec<PortMapping>,
}

/// A service port and the port an endpoint serves it on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct PortMapping {
    /// The port clients connect to on the service's VIP.
    pub service_port: u16,
    /// The endpoint's port.
    pub target_port: u16,
}

/// A Kubernetes service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Service {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// Cluster IPs; empty for a headless service.
    pub vips: Vec<IpAddr>,
    /// Its ports.
    pub ports: Vec<ServicePort>,
    /// The waypoint its traffic goes through.
    pub waypoint: Option<ObjectName>,
    /// Endpoints that are not workloads of the model, reached as plain TCP.
    pub addresses: Vec<Endpoint>,
}

impl Service {
    /// `namespace/name`.
    pub fn object_name(&self) -> ObjectName {
        ObjectName::new(&self.namespace, &self.name)
    }

    /// The cluster DNS name, `<name>.<namespace>.svc.cluster.local`.
    pub fn hostname(&self) -> String {
        format!("{}.{}.svc.cluster.local", self.name, self.namespace)
    }
}

/// One port of a [`Service`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServicePort {
    /// Its name, if any.
    pub name: Option<String>,
    /// The port on the VIP.
    pub port: u16,
    /// The endpoints' port; `None` when it is resolved per endpoint (named targetPort).
    pub target_port: Option<u16>,
    /// What it speaks, when declared.
    pub protocol: AppProtocol,
}

/// What a service port speaks, from its `appProtocol` or its name's prefix
/// (`http-web`, `grpc`, `tcp-db`), as Istio reads them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AppProtocol {
    /// Not declared: a waypoint detects HTTP from the first bytes.
    #[default]
    Unknown,
    /// HTTP/1.1 (or HTTP/2 if the client speaks it).
    Http,
    /// HTTP/2 (h2c) to the endpoints.
    Http2,
    /// gRPC: HTTP/2 to the endpoints.
    Grpc,
    /// Opaque TCP: a waypoint forwards bytes.
    Tcp,
}

impl AppProtocol {
    /// The wire form.
    pub fn as_str(self) -> &'static str {
        match self {
            AppProtocol::Unknown => "",
            AppProtocol::Http => "http",
            AppProtocol::Http2 => "http2",
            AppProtocol::Grpc => "grpc",
            AppProtocol::Tcp => "tcp",
        }
    }

    /// Reads the wire form; a value this build does not know is `Unknown`.
    pub fn from_wire(text: &str) -> AppProtocol {
        match text {
            "http" => AppProtocol::Http,
            "http2" => AppProtocol::Http2,
            "grpc" => AppProtocol::Grpc,
            "tcp" => AppProtocol::Tcp,
            _ => AppProtocol::Unknown,
        }
    }

    /// From a Service port's `appProtocol`, else its name: `http`, `http-*`, `grpc`,
    /// `grpc-*`, `http2`, `http2-*`, `h2c`, `tcp`, `tcp-*` (and the Kubernetes standard
    /// `kubernetes.io/h2c`, `kubernetes.io/ws`); `https`, `tls` and `kubernetes.io/wss`
    /// are TLS the application speaks itself, so TCP to a waypoint.
    pub fn declared(app_protocol: Option<&str>, name: Option<&str>) -> AppProtocol {
        let of = |text: &str| {
            let lower = text.to_ascii_lowercase();
            let head = lower.split('-').next().unwrap_or_default().to_owned();
            match head.as_str() {
                "http" | "kubernetes.io/ws" => AppProtocol::Http,
                "http2" | "h2c" | "kubernetes.io/h2c" => AppProtocol::Http2,
                "grpc" | "grpc_web" => AppProtocol::Grpc,
                // TLS the application speaks itself is opaque to a waypoint.
                "tcp" | "https" | "tls" | "kubernetes.io/wss" | "mongo" | "mysql" | "redis" => {
                    AppProtocol::Tcp
                }
                _ => AppProtocol::Unknown,
            }
        };
        match app_protocol.map(of) {
            Some(p) if p != AppProtocol::Unknown => p,
            _ => name.map(of).unwrap_or_default(),
        }
    }
}

/// An endpoint by address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Endpoint {
    /// Its IP.
    pub ip: IpAddr,
    /// Its ports.
    pub ports: Vec<PortMapping>,
}

/// What a policy applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Scope {
    /// The workloads that list it.
    Selector,
    /// Every workload of its namespace.
    NamespaceWide,
}

/// What a matching policy does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Action {
    /// Allows; when a workload has ALLOW policies, what none of them matches is denied.
    Allow,
    /// Denies; wins over every ALLOW.
    Deny,
}

/// An `AuthorizationPolicy`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AuthorizationPolicy {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// What it applies to.
    pub scope: Scope,
    /// Allow or deny.
    pub action: Action,
    /// The policy matches a connection that matches any rule.
    pub rules: Vec<Rule>,
}

impl AuthorizationPolicy {
    /// `namespace/name`.
    pub fn object_name(&self) -> ObjectName {
        ObjectName::new(&self.namespace, &self.name)
    }
}

/// Matches when every non-empty part matches.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Rule {
    /// Any of these sources (none: every source).
    pub from: Vec<Source>,
    /// Any of these operations (none: every operation).
    pub to: Vec<Operation>,
}

/// Who a connection comes from; every non-empty field must match.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Source {
    /// The peer's SPIFFE ID matches one.
    pub principals: Vec<Pattern>,
    /// The peer's SPIFFE ID matches none.
    pub not_principals: Vec<Pattern>,
    /// The peer's namespace matches one.
    pub namespaces: Vec<Pattern>,
    /// The peer's namespace matches none.
    pub not_namespaces: Vec<Pattern>,
}

/// What a connection is for; every non-empty field must match.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Operation {
    /// The destination port is one of these.
    pub ports: Vec<u16>,
    /// The destination port is none of these.
    pub not_ports: Vec<u16>,
    /// HTTP paths (waypoints only).
    pub paths: Vec<Pattern>,
    /// HTTP paths excluded (waypoints only).
    pub not_paths: Vec<Pattern>,
    /// HTTP methods (waypoints only).
    pub methods: Vec<String>,
    /// HTTP methods excluded (waypoints only).
    pub not_methods: Vec<String>,
    /// HTTP header conditions (waypoints only).
    pub headers: Vec<(String, Vec<Pattern>)>,
}

impl Operation {
    /// Whether it has conditions only an HTTP proxy can check.
    pub fn has_http_conditions(&self) -> bool {
        !(self.paths.is_empty()
            && self.not_paths.is_empty()
            && self.methods.is_empty()
            && self.not_methods.is_empty()
            && self.headers.is_empty())
    }
}

/// A string pattern: `*` anything, `x*` a prefix, `*x` a suffix, else exact.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum Pattern {
    /// `*`.
    Any,
    /// An exact value.
    Exact(String),
    /// `prefix*`.
    Prefix(String),
    /// `*suffix`.
    Suffix(String),
}

impl Pattern {
    /// Parses the wire form.
    pub fn parse(text: &str) -> Result<Pattern, String> {
        if text.is_empty() {
            return Err("is empty; use \"*\" to match anything".into());
        }
        let stars = text.matches('*').count();
        Ok(match (stars, text) {
            (0, _) => Pattern::Exact(text.to_owned()),
            (1, "*") => Pattern::Any,
            (1, t) if t.ends_with('*') => Pattern::Prefix(t[..t.len() - 1].to_owned()),
            (1, t) if t.starts_with('*') => Pattern::Suffix(t[1..].to_owned()),
            _ => {
                return Err(format!(
                    "{text:?} has a '*' in the middle or several; a pattern is exact, \"prefix*\", \"*suffix\" or \"*\""
                ))
            }
        })
    }

    /// Whether `value` matches.
    pub fn matches(&self, value: &str) -> bool {
        match self {
            Pattern::Any => true,
            Pattern::Exact(v) => v == value,
            Pattern::Prefix(p) => value.starts_with(p.as_str()),
            Pattern::Suffix(s) => value.ends_with(s.as_str()),
        }
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Pattern::Any => f.write_str("*"),
            Pattern::Exact(v) => f.write_str(v),
            Pattern::Prefix(p) => write!(f, "{p}*"),
            Pattern::Suffix(s) => write!(f, "*{s}"),
        }
    }
}

/// A Gateway of class `weft-waypoint`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Waypoint {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// The Service in front of its pods.
    pub service: ObjectName,
}

/// The roots workload certificates chain to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TrustBundle {
    /// DER certificates.
    #[serde(skip)]
    pub roots: Vec<Vec<u8>>,
}

/// One resource of the model.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", content = "spec")]
pub enum Resource {
    /// A namespace.
    Namespace(Namespace),
    /// A workload.
    Workload(Workload),
    /// A service.
    Service(Service),
    /// An authorization policy.
    AuthorizationPolicy(AuthorizationPolicy),
    /// A waypoint.
    Waypoint(Waypoint),
    /// An HTTPRoute or GRPCRoute, as the waypoint consumes it.
    Route(proto::Route),
    /// A TrafficPolicy, as the waypoint consumes it.
    TrafficPolicy(proto::TrafficPolicy),
    /// The trust bundle.
    TrustBundle(TrustBundle),
}

/// Why a proxy refuses a resource.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResourceError {
    /// The resource carries no content this build understands.
    #[error("{key}: the resource has no content")]
    Empty {
        /// The key.
        key: Key,
    },
    /// The key does not name the content.
    #[error("{key}: the key does not match the content, which is {content}")]
    KeyMismatch {
        /// The key sent.
        key: Key,
        /// The key of the content.
        content: Key,
    },
    /// A field is unusable.
    #[error("{key}: field `{field}`: {problem}")]
    Field {
        /// The resource.
        key: Key,
        /// The field path.
        field: String,
        /// What is wrong.
        problem: String,
    },
}

impl Resource {
    /// The resource's key.
    pub fn key(&self) -> Key {
        match self {
            Resource::Namespace(n) => Key::new(Kind::Namespace, &n.name),
            Resource::Workload(w) => Key::new(Kind::Workload, &w.uid),
            Resource::Service(s) => Key::new(Kind::Service, s.object_name().to_string()),
            Resource::AuthorizationPolicy(p) => {
                Key::new(Kind::AuthorizationPolicy, p.object_name().to_string())
            }
            Resource::Waypoint(w) => {
                Key::new(Kind::Waypoint, format!("{}/{}", w.namespace, w.name))
            }
            Resource::Route(r) => {
                let kind = match proto::RouteKind::try_from(r.kind) {
                    Ok(proto::RouteKind::Grpc) => Kind::GrpcRoute,
                    _ => Kind::HttpRoute,
                };
                Key::new(kind, format!("{}/{}", r.namespace, r.name))
            }
            Resource::TrafficPolicy(t) => {
                Key::new(Kind::TrafficPolicy, format!("{}/{}", t.namespace, t.name))
            }
            Resource::TrustBundle(_) => Key::new(Kind::TrustBundle, TRUST_BUNDLE_KEY),
        }
    }

    /// The wire form of the content, without key or hash.
    pub fn to_proto_kind(&self) -> proto::resource::Kind {
        use proto::resource::Kind as K;
        match self {
            Resource::Namespace(n) => K::Namespace(proto::Namespace {
                name: n.name.clone(),
                enrolled: n.enrolled,
                mtls_mode: match n.mtls_mode {
                    MtlsMode::Permissive => proto::MtlsMode::Permissive,
                    MtlsMode::Strict => proto::MtlsMode::Strict,
                } as i32,
            }),
            Resource::Workload(w) => K::Workload(proto::Workload {
                uid: w.uid.clone(),
                name: w.name.clone(),
                namespace: w.namespace.clone(),
                service_account: w.service_account.clone(),
                node: w.node.clone(),
                ips: w.ips.iter().map(|ip| ip_bytes(*ip)).collect(),
                enrolled: w.enrolled,
                ready: w.ready,
                services: w
                    .services
                    .iter()
                    .map(|b| proto::ServiceBinding {
                        service: b.service.to_string(),
                        ports: b.ports.iter().map(port_mapping).collect(),
                    })
                    .collect(),
                authorization_policies: w
                    .authorization_policies
                    .iter()
                    .map(ToString::to_string)
                    .collect(),
                waypoint: w
                    .waypoint
                    .as_ref()
                    .map(ToString::to_string)
                    .unwrap_or_default(),
            }),
            Resource::Service(s) => K::Service(proto::Service {
                namespace: s.namespace.clone(),
                name: s.name.clone(),
                vips: s.vips.iter().map(|ip| ip_bytes(*ip)).collect(),
                ports: s
                    .ports
                    .iter()
                    .map(|p| proto::ServicePort {
                        name: p.name.clone().unwrap_or_default(),
                        port: p.port.into(),
                        target_port: p.target_port.unwrap_or(0).into(),
                        protocol: p.protocol.as_str().to_owned(),
                    })
                    .collect(),
                waypoint: s
                    .waypoint
                    .as_ref()
                    .map(ToString::to_string)
                    .unwrap_or_default(),
                addresses: s
                    .addresses
                    .iter()
                    .map(|e| proto::Endpoint {
                        ip: ip_bytes(e.ip),
                        ports: e.ports.iter().map(port_mapping).collect(),
                    })
                    .collect(),
            }),
            Resource::AuthorizationPolicy(p) => {
                K::AuthorizationPolicy(proto::AuthorizationPolicy {
                    namespace: p.namespace.clone(),
                    name: p.name.clone(),
                    scope: match p.scope {
                        Scope::Selector => proto::Scope::Selector,
                        Scope::NamespaceWide => proto::Scope::NamespaceWide,
                    } as i32,
                    action: match p.action {
                        Action::Allow => proto::Action::Allow,
                        Action::Deny => proto::Action::Deny,
                    } as i32,
                    rules: p.rules.iter().map(rule_to_proto).collect(),
                })
            }
            Resource::Waypoint(w) => K::Waypoint(proto::Waypoint {
                namespace: w.namespace.clone(),
                name: w.name.clone(),
                service: w.service.to_string(),
            }),
            Resource::Route(r) => K::Route(r.clone()),
            Resource::TrafficPolicy(t) => K::TrafficPolicy(t.clone()),
            Resource::TrustBundle(b) => K::TrustBundle(proto::TrustBundle {
                roots: b.roots.clone(),
            }),
        }
    }

    /// The wire form, with its key and content hash.
    pub fn to_proto(&self) -> proto::Resource {
        let key = self.key();
        let kind = self.to_proto_kind();
        let hash = crate::digest::resource_hash(&key, &kind);
        proto::Resource {
            key: Some(key.to_proto()),
            hash,
            kind: Some(kind),
        }
    }

    /// Validates a resource from the wire. `Ok(None)`: a kind this build does not know,
    /// to be acknowledged and ignored.
    pub fn from_proto(
        resource: &proto::Resource,
    ) -> Result<Option<(Key, Resource)>, ResourceError> {
        let Some(key) = resource.key.as_ref().and_then(Key::from_proto) else {
            return Ok(None);
        };
        let Some(kind) = &resource.kind else {
            return Err(ResourceError::Empty { key });
        };
        let parsed = Parser { key: &key }.resource(kind)?;
        let content = parsed.key();
        if content != key {
            return Err(ResourceError::KeyMismatch { key, content });
        }
        Ok(Some((key, parsed)))
    }
}

fn ip_bytes(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

fn port_mapping(m: &PortMapping) -> proto::PortMapping {
    proto::PortMapping {
        service_port: m.service_port.into(),
        target_port: m.target_port.into(),
    }
}

fn rule_to_proto(rule: &Rule) -> proto::Rule {
    let patterns = |ps: &[Pattern]| ps.iter().map(ToString::to_string).collect();
    let ports = |ps: &[u16]| ps.iter().map(|p| u32::from(*p)).collect();
    proto::Rule {
        from: rule
            .from
            .iter()
            .map(|s| proto::Source {
                principals: patterns(&s.principals),
                not_principals: patterns(&s.not_principals),
                namespaces: patterns(&s.namespaces),
                not_namespaces: patterns(&s.not_namespaces),
            })
            .collect(),
        to: rule
            .to
            .iter()
            .map(|o| proto::Operation {
                ports: ports(&o.ports),
                not_ports: ports(&o.not_ports),
                paths: patterns(&o.paths),
                not_paths: patterns(&o.not_paths),
                methods: o.methods.clone(),
                not_methods: o.not_methods.clone(),
                headers: o
                    .headers
                    .iter()
                    .map(|(name, values)| proto::HeaderCondition {
                        name: name.clone(),
                        values: patterns(values),
                    })
                    .collect(),
            })
            .collect(),
    }
}

/// Field-by-field validation of one resource from the wire.
struct Parser<'a> {
    key: &'a Key,
}

impl Parser<'_> {
    fn err(&self, field: impl Into<String>, problem: impl Into<String>) -> ResourceError {
        ResourceError::Field {
            key: self.key.clone(),
            field: field.into(),
            problem: problem.into(),
        }
    }

    fn required(&self, field: &str, value: &str) -> Result<String, ResourceError> {
        if value.is_empty() {
            return Err(self.err(field, "is empty"));
        }
        Ok(value.to_owned())
    }

    fn ip(&self, field: String, bytes: &[u8]) -> Result<IpAddr, ResourceError> {
        match bytes.len() {
            4 => {
                let b: [u8; 4] = bytes.try_into().map_err(|_| self.err(&field, "bad IPv4"))?;
                Ok(IpAddr::from(b))
            }
            16 => {
                let b: [u8; 16] = bytes.try_into().map_err(|_| self.err(&field, "bad IPv6"))?;
                Ok(IpAddr::from(b).to_canonical())
            }
            n => Err(self.err(field, format!("is {n} bytes; an IP address is 4 or 16"))),
        }
    }

    fn port(&self, field: String, value: u32) -> Result<u16, ResourceError> {
        match u16::try_from(value) {
            Ok(p) if p != 0 => Ok(p),
            _ => Err(self.err(field, format!("{value} is not a port from 1 to 65535"))),
        }
    }

    fn name(&self, field: String, value: &str) -> Result<ObjectName, ResourceError> {
        value.parse().map_err(|e: String| self.err(field, e))
    }

    fn optional_name(&self, field: &str, value: &str) -> Result<Option<ObjectName>, ResourceError> {
        match value {
            "" => Ok(None),
            v => self.name(field.to_owned(), v).map(Some),
        }
    }

    fn mappings(
        &self,
        field: &str,
        ports: &[proto::PortMapping],
    ) -> Result<Vec<PortMapping>, ResourceError> {
        ports
            .iter()
            .enumerate()
            .map(|(i, m)| {
                Ok(PortMapping {
                    service_port: self.port(format!("{field}[{i}].servicePort"), m.service_port)?,
                    target_port: self.port(format!("{field}[{i}].targetPort"), m.target_port)?,
                })
            })
            .collect()
    }

    fn patterns(&self, field: String, values: &[String]) -> Result<Vec<Pattern>, ResourceError> {
        values
            .iter()
            .enumerate()
            .map(|(i, v)| Pattern::parse(v).map_err(|e| self.err(format!("{field}[{i}]"), e)))
            .collect()
    }

    fn resource(&self, kind: &proto::resource::Kind) -> Result<Resource, ResourceError> {
        use proto::resource::Kind as K;
        Ok(match kind {
            K::Namespace(n) => Resource::Namespace(Namespace {
                name: self.required("name", &n.name)?,
                enrolled: n.enrolled,
                mtls_mode: match proto::MtlsMode::try_from(n.mtls_mode) {
                    Ok(proto::MtlsMode::Strict) => MtlsMode::Strict,
                    Ok(proto::MtlsMode::Permissive) => MtlsMode::Permissive,
                    // A mode this build does not know: the stricter one is the safe choice.
                    Err(_) => MtlsMode::Strict,
                },
            }),
            K::Workload(w) => Resource::Workload(self.workload(w)?),
            K::Service(s) => Resource::Service(self.service(s)?),
            K::AuthorizationPolicy(p) => Resource::AuthorizationPolicy(self.policy(p)?),
            K::Waypoint(w) => Resource::Waypoint(Waypoint {
                namespace: self.required("namespace", &w.namespace)?,
                name: self.required("name", &w.name)?,
                service: self.name("service".into(), &w.service)?,
            }),
            K::Route(r) => {
                self.required("namespace", &r.namespace)?;
                self.required("name", &r.name)?;
                Resource::Route(r.clone())
            }
            K::TrafficPolicy(t) => {
                self.required("namespace", &t.namespace)?;
                self.required("name", &t.name)?;
                Resource::TrafficPolicy(t.clone())
            }
            K::TrustBundle(b) => {
                if b.roots.is_empty() {
                    return Err(self.err("roots", "is empty; a trust bundle needs a root"));
                }
                Resource::TrustBundle(TrustBundle {
                    roots: b.roots.clone(),
                })
            }
        })
    }

    fn workload(&self, w: &proto::Workload) -> Result<Workload, ResourceError> {
        Ok(Workload {
            uid: self.required("uid", &w.uid)?,
            name: self.required("name", &w.name)?,
            namespace: self.required("namespace", &w.namespace)?,
            service_account: self.required("serviceAccount", &w.service_account)?,
            node: w.node.clone(),
            ips: w
                .ips
                .iter()
                .enumerate()
                .map(|(i, ip)| self.ip(format!("ips[{i}]"), ip))
                .collect::<Result<_, _>>()?,
            enrolled: w.enrolled,
            ready: w.ready,
            services: w
                .services
                .iter()
                .enumerate()
                .map(|(i, b)| {
                    Ok(ServiceBinding {
                        service: self.name(format!("services[{i}].service"), &b.service)?,
                        ports: self.mappings(&format!("services[{i}].ports"), &b.ports)?,
                    })
                })
                .collect::<Result<_, _>>()?,
            authorization_policies: w
                .authorization_policies
                .iter()
                .enumerate()
                .map(|(i, p)| self.name(format!("authorizationPolicies[{i}]"), p))
                .collect::<Result<_, _>>()?,
            waypoint: self.optional_name("waypoint", &w.waypoint)?,
        })
    }

    fn service(&self, s: &proto::Service) -> Result<Service, ResourceError> {
        Ok(Service {
            namespace: self.required("namespace", &s.namespace)?,
            name: self.required("name", &s.name)?,
            vips: s
                .vips
                .iter()
                .enumerate()
                .map(|(i, ip)| self.ip(format!("vips[{i}]"), ip))
                .collect::<Result<_, _>>()?,
            ports: s
                .ports
                .iter()
                .enumerate()
                .map(|(i, p)| {
                    Ok(ServicePort {
                        name: (!p.name.is_empty()).then(|| p.name.clone()),
                        port: self.port(format!("ports[{i}].port"), p.port)?,
                        target_port: match p.target_port {
                            0 => None,
                            t => Some(self.port(format!("ports[{i}].targetPort"), t)?),
                        },
                        protocol: AppProtocol::from_wire(&p.protocol),
                    })
                })
                .collect::<Result<_, _>>()?,
            waypoint: self.optional_name("waypoint", &s.waypoint)?,
            addresses: s
                .addresses
                .iter()
                .enumerate()
                .map(|(i, e)| {
                    Ok(Endpoint {
                        ip: self.ip(format!("addresses[{i}].ip"), &e.ip)?,
                        ports: self.mappings(&format!("addresses[{i}].ports"), &e.ports)?,
                    })
                })
                .collect::<Result<_, _>>()?,
        })
    }

    fn policy(&self, p: &proto::AuthorizationPolicy) -> Result<AuthorizationPolicy, ResourceError> {
        let scope = match proto::Scope::try_from(p.scope) {
            Ok(proto::Scope::Selector) => Scope::Selector,
            Ok(proto::Scope::NamespaceWide) => Scope::NamespaceWide,
            Err(_) => {
                return Err(self.err(
                    "scope",
                    format!("{} is not a scope this proxy knows", p.scope),
                ))
            }
        };
        // An action this build does not know cannot be enforced safely either way.
        let action = match proto::Action::try_from(p.action) {
            Ok(proto::Action::Allow) => Action::Allow,
            Ok(proto::Action::Deny) => Action::Deny,
            Err(_) => {
                return Err(self.err(
                    "action",
                    format!("{} is not an action this proxy knows", p.action),
                ))
            }
        };
        let rules = p
            .rules
            .iter()
            .enumerate()
            .map(|(r, rule)| {
                let from = rule
                    .from
                    .iter()
                    .enumerate()
                    .map(|(i, s)| {
                        let f = |name: &str| format!("rules[{r}].from[{i}].{name}");
                        Ok(Source {
                            principals: self.patterns(f("principals"), &s.principals)?,
                            not_principals: self.patterns(f("notPrincipals"), &s.not_principals)?,
                            namespaces: self.patterns(f("namespaces"), &s.namespaces)?,
                            not_namespaces: self.patterns(f("notNamespaces"), &s.not_namespaces)?,
                        })
                    })
                    .collect::<Result<_, ResourceError>>()?;
                let to = rule
                    .to
                    .iter()
                    .enumerate()
                    .map(|(i, o)| {
                        let f = |name: &str| format!("rules[{r}].to[{i}].{name}");
                        let ports = |field: &str, ps: &[u32]| {
                            ps.iter()
                                .enumerate()
                                .map(|(j, p)| self.port(format!("{}[{j}]", f(field)), *p))
                                .collect::<Result<Vec<_>, _>>()
                        };
                        Ok(Operation {
                            ports: ports("ports", &o.ports)?,
                            not_ports: ports("notPorts", &o.not_ports)?,
                            paths: self.patterns(f("paths"), &o.paths)?,
                            not_paths: self.patterns(f("notPaths"), &o.not_paths)?,
                            methods: o.methods.clone(),
                            not_methods: o.not_methods.clone(),
                            headers: o
                                .headers
                                .iter()
                                .enumerate()
                                .map(|(j, h)| {
                                    Ok((
                                        h.name.clone(),
                                        self.patterns(
                                            format!("{}[{j}].values", f("headers")),
                                            &h.values,
                                        )?,
                                    ))
                                })
                                .collect::<Result<_, ResourceError>>()?,
                        })
                    })
                    .collect::<Result<_, ResourceError>>()?;
                Ok(Rule { from, to })
            })
            .collect::<Result<_, ResourceError>>()?;
        Ok(AuthorizationPolicy {
            namespace: self.required("namespace", &p.namespace)?,
            name: self.required("name", &p.name)?,
            scope,
            action,
            rules,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workload() -> Workload {
        Workload {
            uid: "u-1".into(),
            name: "echo-0".into(),
            namespace: "demo".into(),
            service_account: "echo".into(),
            node: "node-2".into(),
            ips: vec![
                "10.244.1.2".parse().expect("literal"),
                "fd00::2".parse().expect("literal"),
            ],
            enrolled: true,
            ready: true,
            services: vec![ServiceBinding {
                service: ObjectName::new("demo", "echo"),
                ports: vec![PortMapping {
                    service_port: 80,
                    target_port: 8080,
                }],
            }],
            authorization_policies: vec![ObjectName::new("demo", "deny-legacy")],
            waypoint: Some(ObjectName::new("demo", "waypoint")),
        }
    }

    fn policy() -> AuthorizationPolicy {
        AuthorizationPolicy {
            namespace: "demo".into(),
            name: "deny-legacy".into(),
            scope: Scope::Selector,
            action: Action::Deny,
            rules: vec![Rule {
                from: vec![Source {
                    principals: vec![Pattern::Prefix("spiffe://cluster.local/ns/legacy/".into())],
                    namespaces: vec![Pattern::Exact("legacy".into())],
                    ..Source::default()
                }],
                to: vec![Operation {
                    ports: vec![8080],
                    paths: vec![Pattern::Suffix(".php".into())],
                    ..Operation::default()
                }],
            }],
        }
    }

    #[test]
    fn every_kind_round_trips() {
        let resources = [
            Resource::Namespace(Namespace {
                name: "demo".into(),
                enrolled: true,
                mtls_mode: MtlsMode::Strict,
            }),
            Resource::Workload(workload()),
            Resource::Service(Service {
                namespace: "demo".into(),
                name: "echo".into(),
                vips: vec!["10.96.0.10".parse().expect("literal")],
                ports: vec![
                    ServicePort {
                        name: Some("http".into()),
                        port: 80,
                        target_port: Some(8080),
                        protocol: AppProtocol::Http,
                    },
                    ServicePort {
                        name: None,
                        port: 90,
                        target_port: None,
                        protocol: AppProtocol::Unknown,
                    },
                ],
                waypoint: None,
                addresses: vec![Endpoint {
                    ip: "192.0.2.1".parse().expect("literal"),
                    ports: vec![PortMapping {
                        service_port: 80,
                        target_port: 80,
                    }],
                }],
            }),
            Resource::AuthorizationPolicy(policy()),
            Resource::Waypoint(Waypoint {
                namespace: "demo".into(),
                name: "waypoint".into(),
                service: ObjectName::new("demo", "waypoint"),
            }),
            Resource::TrustBundle(TrustBundle {
                roots: vec![vec![1, 2, 3]],
            }),
        ];
        for resource in resources {
            let wire = resource.to_proto();
            let (key, back) = Resource::from_proto(&wire)
                .expect("valid")
                .expect("known kind");
            assert_eq!(key, resource.key());
            assert_eq!(back, resource);
        }
    }

    #[test]
    fn hash_changes_with_content_and_not_otherwise() {
        let a = Resource::Workload(workload()).to_proto();
        assert_eq!(a.hash, Resource::Workload(workload()).to_proto().hash);
        let mut changed = workload();
        changed.ready = false;
        assert_ne!(a.hash, Resource::Workload(changed).to_proto().hash);
    }

    #[test]
    fn unknown_kind_is_ignored_not_refused() {
        // A newer controller's resource: a key kind and content this build lacks.
        let wire = proto::Resource {
            key: Some(proto::Key {
                kind: 99,
                name: "demo/x".into(),
            }),
            hash: 1,
            kind: None,
        };
        assert_eq!(Resource::from_proto(&wire), Ok(None));
    }

    #[test]
    fn unknown_fields_of_a_newer_controller_are_skipped() {
        use prost::Message;
        let mut bytes = Resource::Workload(workload()).to_proto().encode_to_vec();
        // Field 15 of the Resource (not in this build), a varint: tag (15 << 3) | 0.
        bytes.extend_from_slice(&[15 << 3, 42]);
        let decoded = proto::Resource::decode(bytes.as_slice()).expect("decodes");
        let (_, back) = Resource::from_proto(&decoded)
            .expect("valid")
            .expect("known");
        assert_eq!(back, Resource::Workload(workload()));
    }

    fn refused(mutate: impl FnOnce(&mut proto::Resource)) -> String {
        let mut wire = Resource::Workload(workload()).to_proto();
        mutate(&mut wire);
        Resource::from_proto(&wire)
            .expect_err("refused")
            .to_string()
    }

    fn wire_workload(r: &mut proto::Resource) -> &mut proto::Workload {
        match r.kind.as_mut() {
            Some(proto::resource::Kind::Workload(w)) => w,
            _ => unreachable!("the test resource is a workload"),
        }
    }

    #[test]
    fn bad_fields_are_named() {
        assert_eq!(
            refused(|r| wire_workload(r).ips[1] = vec![1, 2, 3]),
            "workload u-1: field `ips[1]`: is 3 bytes; an IP address is 4 or 16"
        );
        assert_eq!(
            refused(|r| wire_workload(r).services[0].ports[0].target_port = 70000),
            "workload u-1: field `services[0].ports[0].targetPort`: 70000 is not a port from 1 to 65535"
        );
        assert_eq!(
            refused(|r| wire_workload(r).service_account.clear()),
            "workload u-1: field `serviceAccount`: is empty"
        );
        assert_eq!(
            refused(|r| wire_workload(r).waypoint = "nonamespace".into()),
            "workload u-1: field `waypoint`: \"nonamespace\" is not of the form namespace/name"
        );
        assert_eq!(
            refused(|r| wire_workload(r).uid = "u-2".into()),
            "workload u-1: the key does not match the content, which is workload u-2"
        );
    }

    #[test]
    fn patterns() {
        assert_eq!(Pattern::parse("*"), Ok(Pattern::Any));
        assert_eq!(Pattern::parse("a*"), Ok(Pattern::Prefix("a".into())));
        assert_eq!(Pattern::parse("*a"), Ok(Pattern::Suffix("a".into())));
        assert_eq!(Pattern::parse("a"), Ok(Pattern::Exact("a".into())));
        assert!(Pattern::parse("a*b").is_err());
        assert!(Pattern::parse("**").is_err());
        assert!(Pattern::parse("").is_err());
        assert!(Pattern::Prefix("spiffe://td/ns/a/".into()).matches("spiffe://td/ns/a/sa/x"));
        assert!(!Pattern::Suffix("/sa/x".into()).matches("spiffe://td/ns/a/sa/y"));
    }
}
