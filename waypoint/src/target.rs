//! The model compiled for the request path, once per model version and off it: for
//! each service port this waypoint fronts, its routes (matches compiled, per client
//! namespace) and a ready-made default, and for each rule a typed [`Target`]: parsed
//! header names and values, redirect and rewrite settings, backends resolved to
//! [`Pool`]s of endpoints with their resilience state, retry and timeouts.
//!
//! ```text
//!  Model v(n) + Compiled v(n-1) --compile--> Compiled v(n)
//!    fronts: (service, port) -> Front { routes (producer, consumer by namespace), default }
//!    rule  -> Target { filters, split: [BackendRef -> Pool], retry, timeouts }
//!    Pool  =  (service, port) -> endpoints + their counters + the service's Backend state
//!    problems: routes that could not be compiled, reported in the ack
//! ```
//!
//! Only what changed is compiled again: a route whose object is the one of the version
//! before keeps its compiled matches and targets' settings (only their pools are
//! resolved again), a pool whose endpoints and policy did not change is reused as is,
//! and a service's resilience state lives as long as its TrafficPolicy does.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use api::model::Target as Addr;
use api::proto::{self, route_filter::Filter, RouteKind};
use api::{Key, Kind, Model, ObjectName};
use http::header::{HeaderName, HeaderValue};
use http::StatusCode;

use crate::resilience::{Backend, Endpoint};
use crate::router::{self, Match, Route, Routes, Rule};

/// Numbers compilations; 0 is the empty one before the first model.
static GENERATION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// The first wait between attempts when a route's retry gives none.
pub const DEFAULT_BACKOFF: Duration = Duration::from_millis(25);

/// Everything the request path reads, for one model version.
#[derive(Debug, Default)]
pub struct Compiled {
    /// This compilation's number in the process, never reused (a model version may be
    /// seen again from a restarted controller): what connections cache their
    /// [`Front`] by.
    pub generation: u64,
    fronts: HashMap<(ObjectName, u16), Arc<Front>>,
    /// Routes that could not be compiled, and why; they serve no request.
    pub problems: Vec<(Key, String)>,
    /// Kept for the next version: compiled routes by name, with the object compiled.
    routes: HashMap<ObjectName, (Arc<proto::Route>, Arc<[RuleSpec]>)>,
    /// Kept for the next version: resilience state by service, pools by service port.
    backends: HashMap<ObjectName, Arc<Backend>>,
    pools: HashMap<(ObjectName, u16), Arc<Pool>>,
}

/// A service port this waypoint fronts.
#[derive(Debug)]
pub struct Front {
    /// The service, `namespace/name`.
    pub service: ObjectName,
    /// The port addressed.
    pub port: u16,
    /// The routes attached to it.
    pub routes: Routes,
    /// What a request takes when no route is attached: the service itself.
    pub default: Arc<Target>,
}

/// What a matched rule does with a request, every setting parsed.
#[derive(Debug, Default)]
pub struct Target {
    /// The route, `namespace/name`, for metrics and logs; `None` for a service's
    /// default.
    pub route: Option<Arc<str>>,
    /// Answer with a redirect instead of forwarding.
    pub redirect: Option<Redirect>,
    /// Request header changes, in order.
    pub request_headers: Vec<HeaderOps>,
    /// Response header changes, in order.
    pub response_headers: Vec<HeaderOps>,
    /// URL rewrite.
    pub rewrite: Option<Rewrite>,
    /// Copies of the request sent elsewhere.
    pub mirrors: Vec<Mirror>,
    /// The prefix a prefix rewrite replaces.
    pub matched_prefix: Option<String>,
    /// Where requests go, by weight.
    pub split: Split,
    /// Retries.
    pub retry: Retry,
    /// Each attempt's timeout.
    pub per_try: Option<Duration>,
    /// The whole request's timeout, retries included.
    pub overall: Option<Duration>,
}

/// A rule's settings that do not depend on endpoints: compiled once per route object.
#[derive(Debug)]
struct RuleSpec {
    matches: Arc<[Match]>,
    settings: Settings,
    backends: Vec<proto::Backend>,
    mirrors: Vec<(proto::Backend, u32)>,
}

#[derive(Debug, Clone, Default)]
struct Settings {
    redirect: Option<Redirect>,
    request_headers: Vec<HeaderOps>,
    response_headers: Vec<HeaderOps>,
    rewrite: Option<Rewrite>,
    matched_prefix: Option<String>,
    retry: Retry,
    per_try: Option<Duration>,
    overall: Option<Duration>,
}

/// A `RequestRedirect`.
#[derive(Debug, Clone)]
pub struct Redirect {
    /// `None`: keep `http`.
    pub scheme: Option<String>,
    /// `None`: keep the request's host.
    pub hostname: Option<String>,
    /// `None`: the listener's port, or the scheme's when it changes.
    pub port: Option<u16>,
    /// Path change.
    pub path: Option<PathChange>,
    /// 301 or 302 (or another 3xx).
    pub status: StatusCode,
}

/// A path change of a redirect or rewrite.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathChange {
    /// Replace the whole path.
    Full(String),
    /// Replace the matched prefix.
    Prefix(String),
}

/// A `URLRewrite`.
#[derive(Debug, Clone)]
pub struct Rewrite {
    /// The new `Host`.
    pub host: Option<HeaderValue>,
    /// The path change.
    pub path: Option<PathChange>,
}

/// A header modifier, names and values parsed.
#[derive(Debug, Clone, Default)]
pub struct HeaderOps {
    /// Replace.
    pub set: Vec<(HeaderName, HeaderValue)>,
    /// Append.
    pub add: Vec<(HeaderName, HeaderValue)>,
    /// Remove.
    pub remove: Vec<HeaderName>,
}

impl HeaderOps {
    /// Applies the changes to `headers`.
    pub fn apply(&self, headers: &mut http::HeaderMap) {
        for (n, v) in &self.set {
            headers.insert(n.clone(), v.clone());
        }
        for (n, v) in &self.add {
            headers.append(n.clone(), v.clone());
        }
        for n in &self.remove {
            headers.remove(n);
        }
    }
}

/// A `RequestMirror`.
#[derive(Debug)]
pub struct Mirror {
    /// Where copies go.
    pub to: Arc<Pool>,
    /// Share of requests copied, in millionths.
    pub fraction_ppm: u32,
}

/// The backends of a rule, by weight.
#[derive(Debug, Default)]
pub struct Split {
    /// Each backend.
    pub backends: Vec<BackendRef>,
    /// The sum of their weights.
    pub total: u64,
}

/// One backend of a rule.
#[derive(Debug)]
pub struct BackendRef {
    /// `namespace/name`, for metrics and logs.
    pub name: Arc<str>,
    /// Its weight.
    pub weight: u32,
    /// Where it sends, or why its share is answered 500.
    pub to: Result<Arc<Pool>, Arc<str>>,
}

/// A rule's retry settings.
#[derive(Debug, Clone)]
pub struct Retry {
    /// Retries after the first attempt.
    pub attempts: u32,
    /// The statuses retried; empty means 500, 502, 503 and 504.
    pub codes: Vec<u16>,
    /// The first wait between attempts.
    pub backoff: Duration,
}

impl Default for Retry {
    fn default() -> Self {
        Retry {
            attempts: 0,
            codes: Vec::new(),
            backoff: DEFAULT_BACKOFF,
        }
    }
}

impl Retry {
    /// Whether a response with `status` is tried again.
    pub fn retryable(&self, status: u16) -> bool {
        match self.codes.is_empty() {
            true => matches!(status, 500 | 502 | 503 | 504),
            false => self.codes.contains(&status),
        }
    }
}

/// A service port to send to: its endpoints with their counters, for one model version.
#[derive(Debug)]
pub struct Pool {
    /// The service.
    pub service: ObjectName,
    /// `namespace/name`, for metrics and logs.
    pub label: Arc<str>,
    /// The service port.
    pub port: u16,
    /// Requests go out as HTTP/2 (`Some(true)`), HTTP/1.1 (`Some(false)`), or as the
    /// client spoke (`None`), as the port declares.
    pub h2: Option<bool>,
    /// The service's resilience state.
    pub state: Arc<Backend>,
    /// Its ready endpoints.
    pub endpoints: Vec<Endpoint>,
}

impl Pool {
    /// A pool of `targets` sharing `state`.
    pub fn new(
        service: ObjectName,
        port: u16,
        h2: Option<bool>,
        state: Arc<Backend>,
        targets: &[Addr],
    ) -> Pool {
        Pool {
            label: service.to_string().into(),
            endpoints: state.stats_for(targets),
            service,
            port,
            h2,
            state,
        }
    }
}

impl Compiled {
    /// The front for requests to `service`:`port`.
    pub fn front(&self, service: &ObjectName, port: u16) -> Option<&Arc<Front>> {
        self.fronts.get(&(service.clone(), port))
    }

    /// How many service ports have routes attached.
    pub fn routed(&self) -> usize {
        self.fronts
            .values()
            .filter(|f| !f.routes.is_empty())
            .count()
    }

    /// Compiles what `gateway` serves of `model`, reusing what `previous` compiled
    /// from the same objects.
    pub fn compile(gateway: &ObjectName, model: &Model, previous: &Compiled) -> Compiled {
        let mut next = Compiled {
            generation: GENERATION.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            ..Compiled::default()
        };
        let mut cx = Cx {
            model,
            previous,
            next: &mut next,
        };
        // The services this waypoint fronts.
        let fronted: Vec<&Arc<api::Service>> = model
            .services()
            .filter(|s| s.waypoint.as_ref() == Some(gateway))
            .collect();
        let fronted_names: std::collections::HashSet<ObjectName> =
            fronted.iter().map(|s| s.object_name()).collect();
        // Routes attached to them, by (service, port); port 0 is every port.
        let mut attached: HashMap<(ObjectName, u16), Vec<Arc<Route>>> = HashMap::new();
        for r in model.routes() {
            let parents: Vec<(ObjectName, u16)> = r
                .parents
                .iter()
                .filter_map(|p| {
                    let (ns, svc) = p.service.split_once('/')?;
                    let name = ObjectName::new(ns, svc);
                    fronted_names
                        .contains(&name)
                        .then(|| (name, u16::try_from(p.port).unwrap_or(0)))
                })
                .collect();
            if parents.is_empty() {
                continue;
            }
            let name = ObjectName::new(&r.namespace, &r.name);
            let Some(route) = cx.route(&name, r) else {
                continue;
            };
            for parent in parents {
                attached.entry(parent).or_default().push(route.clone());
            }
        }
        for service in fronted {
            let name = service.object_name();
            for port in &service.ports {
                let mut routes: Vec<Arc<Route>> = Vec::new();
                for key in [(name.clone(), port.port), (name.clone(), 0)] {
                    routes.extend(attached.get(&key).into_iter().flatten().cloned());
                }
                let default = Arc::new(Target {
                    split: cx.split(
                        &[proto::Backend {
                            service: name.to_string(),
                            port: u32::from(port.port),
                            weight: 1,
                            ..Default::default()
                        }],
                        port.port,
                    ),
                    ..Target::default()
                });
                cx.next.fronts.insert(
                    (name.clone(), port.port),
                    Arc::new(Front {
                        routes: Routes::new(&name, routes),
                        service: name.clone(),
                        port: port.port,
                        default,
                    }),
                );
            }
        }
        next
    }
}

/// The compile step's context.
struct Cx<'a> {
    model: &'a Model,
    previous: &'a Compiled,
    next: &'a mut Compiled,
}

impl Cx<'_> {
    /// The route compiled, or `None` (reported) when it cannot be.
    fn route(&mut self, name: &ObjectName, r: &Arc<proto::Route>) -> Option<Arc<Route>> {
        let kind = RouteKind::try_from(r.kind).unwrap_or(RouteKind::Http);
        let specs = match self.previous.routes.get(name) {
            Some((old, specs)) if Arc::ptr_eq(old, r) || **old == **r => specs.clone(),
            _ => match compile_rules(r) {
                Ok(specs) => Arc::<[RuleSpec]>::from(specs),
                Err(why) => {
                    let kind = match kind {
                        RouteKind::Grpc => Kind::GrpcRoute,
                        RouteKind::Http => Kind::HttpRoute,
                    };
                    tracing::warn!(route = %name, "route not served: {why}");
                    self.next
                        .problems
                        .push((Key::new(kind, name.to_string()), why));
                    return None;
                }
            },
        };
        self.next
            .routes
            .insert(name.clone(), (r.clone(), specs.clone()));
        let label: Arc<str> = name.to_string().into();
        let rules = specs
            .iter()
            .map(|spec| Rule {
                matches: spec.matches.clone(),
                target: Arc::new(self.target(label.clone(), spec)),
            })
            .collect();
        Some(Arc::new(Route {
            name: name.clone(),
            kind,
            created: r.created,
            rules,
        }))
    }

    fn target(&mut self, route: Arc<str>, spec: &RuleSpec) -> Target {
        let s = spec.settings.clone();
        let mirrors = spec
            .mirrors
            .iter()
            .filter_map(|(b, fraction_ppm)| {
                let (svc, port) = backend_name(b)?;
                Some(Mirror {
                    to: self.pool(&svc, port),
                    fraction_ppm: *fraction_ppm,
                })
            })
            .collect();
        Target {
            route: Some(route),
            redirect: s.redirect,
            request_headers: s.request_headers,
            response_headers: s.response_headers,
            rewrite: s.rewrite,
            mirrors,
            matched_prefix: s.matched_prefix,
            split: self.split(&spec.backends, 0),
            retry: s.retry,
            per_try: s.per_try,
            overall: s.overall,
        }
    }

    fn split(&mut self, backends: &[proto::Backend], default_port: u16) -> Split {
        let backends: Vec<BackendRef> = backends
            .iter()
            .map(|b| {
                let to = match (b.invalid.is_empty(), backend_name(b)) {
                    (false, _) => Err(Arc::from(format!(
                        "backend {} is invalid: {}",
                        b.service, b.invalid
                    ))),
                    (true, None) => Err(Arc::from(format!(
                        "backend {:?} is not namespace/name",
                        b.service
                    ))),
                    (true, Some((svc, port))) => {
                        Ok(self.pool(&svc, if port == 0 { default_port } else { port }))
                    }
                };
                BackendRef {
                    name: b.service.as_str().into(),
                    weight: b.weight,
                    to,
                }
            })
            .collect();
        Split {
            total: backends.iter().map(|b| u64::from(b.weight)).sum(),
            backends,
        }
    }

    /// The pool of `service`:`port` for this version: the one of the version before
    /// if nothing it depends on changed.
    fn pool(&mut self, service: &ObjectName, port: u16) -> Arc<Pool> {
        let key = (service.clone(), port);
        if let Some(p) = self.next.pools.get(&key) {
            return p.clone();
        }
        let state = self.state(service);
        let targets = self.model.endpoints(service, port);
        let h2 = declared_h2(self.model, service, port);
        let pool = match self.previous.pools.get(&key) {
            Some(p)
                if Arc::ptr_eq(&p.state, &state)
                    && p.h2 == h2
                    && p.endpoints.len() == targets.len()
                    && p.endpoints.iter().zip(targets).all(|(e, t)| e.target == *t) =>
            {
                p.clone()
            }
            _ => Arc::new(Pool::new(service.clone(), port, h2, state, targets)),
        };
        self.next.pools.insert(key, pool.clone());
        pool
    }

    /// The service's resilience state: kept while its TrafficPolicy is the same.
    fn state(&mut self, service: &ObjectName) -> Arc<Backend> {
        if let Some(b) = self.next.backends.get(service) {
            return b.clone();
        }
        let policy = self.model.traffic_policy(service).map(|p| &**p);
        let state = match self.previous.backends.get(service) {
            Some(b) if b.is_for(policy) => b.clone(),
            _ => Arc::new(Backend::new(policy)),
        };
        self.next.backends.insert(service.clone(), state.clone());
        state
    }
}

/// Whether requests to `service`:`port` go out as HTTP/2: when the port declares
/// HTTP/2 or gRPC; HTTP/1.1 when it declares HTTP or TCP; else as the client spoke.
fn declared_h2(model: &Model, service: &ObjectName, port: u16) -> Option<bool> {
    use api::AppProtocol as P;
    let declared = model
        .service(service)
        .and_then(|s| s.ports.iter().find(|p| p.port == port).map(|p| p.protocol))
        .unwrap_or(P::Unknown);
    match declared {
        P::Http2 | P::Grpc => Some(true),
        P::Http | P::Tcp => Some(false),
        P::Unknown => None,
    }
}

fn backend_name(b: &proto::Backend) -> Option<(ObjectName, u16)> {
    let (ns, name) = b.service.split_once('/')?;
    Some((
        ObjectName::new(ns, name),
        u16::try_from(b.port).unwrap_or(0),
    ))
}

/// Every rule of a route compiled, or why one cannot be (the route is then not served).
fn compile_rules(r: &proto::Route) -> Result<Vec<RuleSpec>, String> {
    r.rules
        .iter()
        .enumerate()
        .map(|(i, rule)| compile_rule(rule).map_err(|why| format!("rules[{i}]: {why}")))
        .collect()
}

fn compile_rule(rule: &proto::RouteRule) -> Result<RuleSpec, String> {
    let matches = router::compile_matches(rule)?;
    let matched_prefix = rule.matches.iter().find_map(|m| {
        m.path
            .as_ref()
            .filter(|p| p.r#type == proto::PathMatchType::PathPrefix as i32)
            .map(|p| p.value.clone())
    });
    let mut s = Settings {
        matched_prefix,
        ..Settings::default()
    };
    let mut mirrors = Vec::new();
    for (i, f) in rule.filters.iter().enumerate() {
        let at = |why: String| format!("filters[{i}]: {why}");
        match &f.filter {
            None => {}
            Some(Filter::RequestHeaderModifier(m)) => {
                s.request_headers.push(header_ops(m).map_err(at)?)
            }
            Some(Filter::ResponseHeaderModifier(m)) => {
                s.response_headers.push(header_ops(m).map_err(at)?)
            }
            Some(Filter::RequestRedirect(r)) => s.redirect = Some(redirect(r).map_err(at)?),
            Some(Filter::UrlRewrite(rw)) => {
                s.rewrite = Some(Rewrite {
                    host: match rw.hostname.as_str() {
                        "" => None,
                        h => Some(HeaderValue::try_from(h).map_err(|_| {
                            at(format!("urlRewrite.hostname {h:?} is not a header value"))
                        })?),
                    },
                    path: rw.path.as_ref().and_then(path_change),
                })
            }
            Some(Filter::RequestMirror(m)) => {
                if let Some(b) = &m.backend {
                    if b.invalid.is_empty() {
                        mirrors.push((b.clone(), m.fraction_ppm));
                    }
                }
            }
        }
    }
    if let Some(r) = &rule.retry {
        s.retry = Retry {
            attempts: r.attempts,
            codes: r
                .codes
                .iter()
                .map(|c| {
                    u16::try_from(*c)
                        .ok()
                        .filter(|c| (100..=599).contains(c))
                        .ok_or_else(|| format!("retry code {c} is not an HTTP status"))
                })
                .collect::<Result<_, _>>()?,
            backoff: match r.backoff_ms {
                0 => DEFAULT_BACKOFF,
                ms => Duration::from_millis(u64::from(ms)),
            },
        };
    }
    let ms = |v: u32| (v > 0).then(|| Duration::from_millis(u64::from(v)));
    s.per_try = ms(rule.backend_request_timeout_ms);
    s.overall = ms(rule.request_timeout_ms);
    Ok(RuleSpec {
        matches: matches.into(),
        settings: s,
        backends: rule.backends.clone(),
        mirrors,
    })
}

fn path_change(m: &proto::PathModifier) -> Option<PathChange> {
    match &m.path {
        Some(proto::path_modifier::Path::Full(p)) => Some(PathChange::Full(p.clone())),
        Some(proto::path_modifier::Path::Prefix(p)) => Some(PathChange::Prefix(p.clone())),
        None => None,
    }
}

fn redirect(r: &proto::Redirect) -> Result<Redirect, String> {
    let status = match r.status_code {
        0 => StatusCode::FOUND,
        c => u16::try_from(c)
            .ok()
            .and_then(|c| StatusCode::from_u16(c).ok())
            .filter(StatusCode::is_redirection)
            .ok_or_else(|| format!("requestRedirect.statusCode {c} is not a redirection"))?,
    };
    let port = match r.port {
        0 => None,
        p => Some(
            u16::try_from(p)
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| format!("requestRedirect.port {p} is not a port"))?,
        ),
    };
    let text = |v: &str| (!v.is_empty()).then(|| v.to_owned());
    Ok(Redirect {
        scheme: text(&r.scheme),
        hostname: text(&r.hostname),
        port,
        path: r.path.as_ref().and_then(path_change),
        status,
    })
}

fn header_ops(m: &proto::HeaderModifier) -> Result<HeaderOps, String> {
    let name = |n: &str| {
        HeaderName::try_from(n.to_ascii_lowercase())
            .map_err(|_| format!("{n:?} is not a header name"))
    };
    let pair = |h: &proto::Header| {
        Ok::<_, String>((
            name(&h.name)?,
            HeaderValue::try_from(h.value.as_str())
                .map_err(|_| format!("the value of {:?} is not a header value", h.name))?,
        ))
    };
    Ok(HeaderOps {
        set: m.set.iter().map(pair).collect::<Result<_, _>>()?,
        add: m.add.iter().map(pair).collect::<Result<_, _>>()?,
        remove: m.remove.iter().map(|n| name(n)).collect::<Result<_, _>>()?,
    })
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use api::{AppProtocol, PortMapping, Resource, Service, ServiceBinding, ServicePort, Workload};

    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("literal")
    }

    fn workload(uid: &str, ipv4: &str, service: &str, port: u16) -> Resource {
        Resource::Workload(Workload {
            uid: uid.into(),
            name: format!("pod-{uid}"),
            namespace: "shop".into(),
            service_account: "echo".into(),
            node: "node-1".into(),
            ips: vec![ip(ipv4)],
            enrolled: true,
            ready: true,
            services: vec![ServiceBinding {
                service: ObjectName::new("shop", service),
                ports: vec![PortMapping {
                    service_port: port,
                    target_port: 8080,
                }],
            }],
            authorization_policies: vec![],
            waypoint: None,
        })
    }

    fn service(name: &str, vip: &str, ports: &[u16]) -> Resource {
        Resource::Service(Service {
            namespace: "shop".into(),
            name: name.into(),
            vips: vec![ip(vip)],
            ports: ports
                .iter()
                .map(|p| ServicePort {
                    name: None,
                    port: *p,
                    target_port: None,
                    protocol: AppProtocol::Http,
                })
                .collect(),
            waypoint: Some(ObjectName::new("shop", "wp")),
            addresses: vec![],
        })
    }

    fn route(name: &str, port: u32, header: &str, backend: &str) -> Resource {
        Resource::Route(proto::Route {
            namespace: "shop".into(),
            name: name.into(),
            parents: vec![proto::ParentRef {
                service: "shop/echo".into(),
                port,
            }],
            rules: vec![proto::RouteRule {
                matches: vec![proto::RouteMatch {
                    headers: vec![proto::ValueMatch {
                        name: "x-version".into(),
                        value: header.into(),
                        regex: true,
                    }],
                    ..Default::default()
                }],
                backends: vec![proto::Backend {
                    service: backend.into(),
                    port: 80,
                    weight: 1,
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        })
    }

    fn apply(model: &Model, version: u64, upserts: Vec<Resource>) -> Model {
        let applied = model.apply(&proto::Update {
            epoch: 1,
            version,
            kind: if version == 1 {
                proto::UpdateKind::Full
            } else {
                proto::UpdateKind::Delta
            } as i32,
            buckets: vec![],
            upserts: upserts.iter().map(Resource::to_proto).collect(),
            removals: vec![],
        });
        assert!(applied.rejected.is_empty(), "{:?}", applied.rejected);
        applied.model
    }

    fn gateway() -> ObjectName {
        ObjectName::new("shop", "wp")
    }

    /// A route bound to one port applies there only; one that cannot be compiled is
    /// reported and serves nothing; the default target of a port without routes goes
    /// to the service itself.
    #[test]
    fn routes_compile_per_port_and_a_rule_that_cannot_is_reported() {
        let model = apply(
            &Model::default(),
            1,
            vec![
                service("echo", "10.96.0.10", &[80, 8080]),
                service("echo-v2", "10.96.0.11", &[80]),
                workload("a", "10.244.1.1", "echo", 80),
                workload("b", "10.244.1.2", "echo-v2", 80),
                route("alt-only", 8080, "v2", "shop/echo-v2"),
                route("broken", 0, "(", "shop/echo-v2"),
            ],
        );
        let c = Compiled::compile(&gateway(), &model, &Compiled::default());
        let echo = ObjectName::new("shop", "echo");
        assert!(c.front(&echo, 8080).is_some_and(|f| !f.routes.is_empty()));
        let on_80 = c.front(&echo, 80).expect("port 80 is served");
        assert!(on_80.routes.is_empty(), "the broken route serves nothing");
        let default = &on_80.default.split.backends[0];
        let pool = default.to.as_ref().expect("resolves");
        assert_eq!(
            (&*pool.label, pool.port, pool.h2),
            ("shop/echo", 80, Some(false))
        );
        assert_eq!(pool.endpoints.len(), 1);
        assert_eq!(c.problems.len(), 1, "{:?}", c.problems);
        let (key, why) = &c.problems[0];
        assert_eq!(
            key.to_string(),
            Key::new(Kind::HttpRoute, "shop/broken").to_string()
        );
        assert!(
            why.contains("rules[0]: matches[0]") && why.contains("regular expression"),
            "{why}"
        );
        assert_eq!(c.routed(), 1);
    }

    /// A new model version compiles again only what changed: unchanged routes keep
    /// their compiled matches, pools whose endpoints did not change are the same, and
    /// the resilience state of a service lives on.
    #[test]
    fn only_what_changed_is_compiled_again() {
        let v1 = apply(
            &Model::default(),
            1,
            vec![
                service("echo", "10.96.0.10", &[80]),
                service("echo-v2", "10.96.0.11", &[80]),
                workload("a", "10.244.1.1", "echo", 80),
                workload("b", "10.244.1.2", "echo-v2", 80),
                route("canary", 0, "v2", "shop/echo-v2"),
            ],
        );
        let c1 = Compiled::compile(&gateway(), &v1, &Compiled::default());
        // A new endpoint of echo only.
        let v2 = apply(&v1, 2, vec![workload("c", "10.244.1.3", "echo", 80)]);
        let c2 = Compiled::compile(&gateway(), &v2, &c1);
        let name = ObjectName::new("shop", "canary");
        assert!(
            Arc::ptr_eq(&c1.routes[&name].1, &c2.routes[&name].1),
            "matches reused"
        );
        let key = |s: &str| (ObjectName::new("shop", s), 80);
        assert!(Arc::ptr_eq(
            &c1.pools[&key("echo-v2")],
            &c2.pools[&key("echo-v2")]
        ));
        assert!(!Arc::ptr_eq(
            &c1.pools[&key("echo")],
            &c2.pools[&key("echo")]
        ));
        assert_eq!(c2.pools[&key("echo")].endpoints.len(), 2);
        let echo = ObjectName::new("shop", "echo");
        assert!(
            Arc::ptr_eq(&c1.backends[&echo], &c2.backends[&echo]),
            "state kept"
        );
        // An edited route is compiled again.
        let v3 = apply(&v2, 3, vec![route("canary", 0, "v3", "shop/echo-v2")]);
        let c3 = Compiled::compile(&gateway(), &v3, &c2);
        assert!(!Arc::ptr_eq(&c2.routes[&name].1, &c3.routes[&name].1));
    }
}
