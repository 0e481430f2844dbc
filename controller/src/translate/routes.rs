//! Waypoints (Gateways of class `weft-waypoint`) and the routes attached to Services
//! (GAMMA HTTPRoutes and GRPCRoutes), checked per the Gateway API spec, with the status
//! conditions (`Accepted`, `ResolvedRefs`) each parent should show.

use std::collections::BTreeSet;
use std::str::FromStr;

use api::proto;
use api::{ObjectName, Resource, Waypoint};
use serde::Deserialize;

use super::{Audience, Condition, DesiredStatus, Entry, Translation, WAYPOINT_CLASS};
use crate::objects::{Effect, ObjectKind, ObjectRef, Objects, Origin, Problem};

pub(super) fn waypoints(objects: &Objects, out: &mut Translation) -> BTreeSet<ObjectName> {
    let mut names = BTreeSet::new();
    for (name, obj) in &objects.gateways {
        if obj.value.spec.gateway_class_name != WAYPOINT_CLASS {
            continue;
        }
        let resource = Resource::Waypoint(Waypoint {
            namespace: name.namespace.clone(),
            name: name.name.clone(),
            service: name.clone(),
        });
        out.entries.insert(
            resource.key(),
            Entry {
                resource,
                audience: Audience::All,
            },
        );
        names.insert(name.clone());
    }
    names
}

// The parts of HTTPRoute and GRPCRoute that translation reads, in one neutral shape
// (both kinds are read through JSON into it, so their rules share one checker).

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct RouteSpec {
    parent_refs: Vec<ParentRefSpec>,
    hostnames: Vec<String>,
    rules: Vec<RuleSpec>,
}

#[derive(Debug, Default, Deserialize, serde::Serialize)]
#[serde(rename_all = "camelCase", default)]
struct ParentRefSpec {
    #[serde(skip_serializing_if = "Option::is_none")]
    group: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    kind: Option<String>,
    name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    namespace: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    port: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    section_name: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct RuleSpec {
    name: Option<String>,
    matches: Vec<MatchSpec>,
    filters: Vec<FilterSpec>,
    backend_refs: Vec<BackendSpec>,
    timeouts: Option<TimeoutsSpec>,
    retry: Option<RetrySpec>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RetrySpec {
    attempts: Option<i64>,
    codes: Vec<i64>,
    backoff: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct MatchSpec {
    path: Option<PathSpec>,
    headers: Vec<ValueMatchSpec>,
    query_params: Vec<ValueMatchSpec>,
    /// A string for HTTPRoute, an object for GRPCRoute.
    method: Option<serde_json::Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct PathSpec {
    #[serde(rename = "type")]
    type_: Option<String>,
    value: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct ValueMatchSpec {
    #[serde(rename = "type")]
    type_: Option<String>,
    name: String,
    value: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct GrpcMethodSpec {
    #[serde(rename = "type")]
    type_: Option<String>,
    service: Option<String>,
    method: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct FilterSpec {
    #[serde(rename = "type")]
    type_: String,
    request_header_modifier: Option<HeaderModifierSpec>,
    response_header_modifier: Option<HeaderModifierSpec>,
    request_redirect: Option<RedirectSpec>,
    url_rewrite: Option<RewriteSpec>,
    request_mirror: Option<MirrorSpec>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct HeaderModifierSpec {
    set: Vec<HeaderSpec>,
    add: Vec<HeaderSpec>,
    remove: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct HeaderSpec {
    name: String,
    value: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct PathModifierSpec {
    #[serde(rename = "type")]
    type_: String,
    replace_full_path: Option<String>,
    replace_prefix_match: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct RedirectSpec {
    scheme: Option<String>,
    hostname: Option<String>,
    path: Option<PathModifierSpec>,
    port: Option<i32>,
    status_code: Option<i32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RewriteSpec {
    hostname: Option<String>,
    path: Option<PathModifierSpec>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct MirrorSpec {
    backend_ref: BackendSpec,
    percent: Option<i32>,
    fraction: Option<FractionSpec>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct FractionSpec {
    numerator: i32,
    denominator: Option<i32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct BackendSpec {
    group: Option<String>,
    kind: Option<String>,
    name: String,
    namespace: Option<String>,
    port: Option<i32>,
    weight: Option<i32>,
    filters: Vec<FilterSpec>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct TimeoutsSpec {
    request: Option<String>,
    backend_request: Option<String>,
}

/// A route being checked: collects problems and the worst condition per type.
struct Check<'a> {
    object: ObjectRef,
    origin: &'a Origin,
    problems: Vec<Problem>,
    /// First `Accepted` failure: (reason, message).
    accepted: Option<(&'static str, String)>,
    /// First `ResolvedRefs` failure.
    resolved: Option<(&'static str, String)>,
    objects: &'a Objects,
}

impl Check<'_> {
    /// The route cannot be used at all.
    fn invalid(&mut self, field: String, why: String) {
        self.problems.push(Problem {
            object: Some(self.object.clone()),
            origin: self.origin.clone(),
            field: field.clone(),
            reason: why.clone(),
            effect: Effect::Rejected,
            condition_reason: "UnsupportedValue",
        });
        self.accepted
            .get_or_insert(("UnsupportedValue", format!("{field}: {why}")));
    }

    /// A backend cannot be resolved: its share of requests is answered 500.
    fn unresolved(&mut self, field: String, reason: &'static str, why: String) -> String {
        self.problems.push(Problem {
            object: Some(self.object.clone()),
            origin: self.origin.clone(),
            field: field.clone(),
            reason: format!("{why}; its share of requests is answered 500"),
            effect: Effect::Ignored,
            condition_reason: reason,
        });
        self.resolved
            .get_or_insert((reason, format!("{field}: {why}")));
        why
    }

    fn regex(&mut self, field: &str, value: &str) {
        if let Err(e) = regex::Regex::new(value) {
            // The parser draws a caret under the spot over several lines; its last line
            // says what is wrong.
            let text = e.to_string();
            let why = text
                .lines()
                .last()
                .unwrap_or_default()
                .trim_start_matches("error: ");
            self.invalid(
                field.to_owned(),
                format!("{value:?} is not a valid regular expression: {why}"),
            );
        }
    }

    fn path_match(&mut self, field: &str, p: &PathSpec) -> proto::PathMatch {
        let value = p.value.clone().unwrap_or_else(|| "/".into());
        let type_ = match p.type_.as_deref().unwrap_or("PathPrefix") {
            "PathPrefix" => proto::PathMatchType::PathPrefix,
            "Exact" => proto::PathMatchType::Exact,
            "RegularExpression" => proto::PathMatchType::RegularExpression,
            other => {
                self.invalid(
                    format!("{field}.type"),
                    format!("{other:?} is not PathPrefix, Exact or RegularExpression"),
                );
                proto::PathMatchType::PathPrefix
            }
        };
        match type_ {
            proto::PathMatchType::RegularExpression => {
                self.regex(&format!("{field}.value"), &value)
            }
            _ if !value.starts_with('/') => {
                self.invalid(
                    format!("{field}.value"),
                    format!("{value:?} must start with /"),
                );
            }
            _ => {}
        }
        proto::PathMatch {
            r#type: type_ as i32,
            value,
        }
    }

    fn value_matches(
        &mut self,
        field: &str,
        values: &[ValueMatchSpec],
        lowercase: bool,
    ) -> Vec<proto::ValueMatch> {
        values
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let regex = match v.type_.as_deref().unwrap_or("Exact") {
                    "Exact" => false,
                    "RegularExpression" => {
                        self.regex(&format!("{field}[{i}].value"), &v.value);
                        true
                    }
                    other => {
                        self.invalid(
                            format!("{field}[{i}].type"),
                            format!("{other:?} is not Exact or RegularExpression"),
                        );
                        false
                    }
                };
                if v.name.is_empty() {
                    self.invalid(format!("{field}[{i}].name"), "is empty".into());
                }
                proto::ValueMatch {
                    name: if lowercase {
                        v.name.to_ascii_lowercase()
                    } else {
                        v.name.clone()
                    },
                    value: v.value.clone(),
                    regex,
                }
            })
            .collect()
    }

    fn matches(
        &mut self,
        at: &str,
        kind: ObjectKind,
        matches: &[MatchSpec],
    ) -> Vec<proto::RouteMatch> {
        matches
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let field = format!("{at}.matches[{i}]");
                let mut out = proto::RouteMatch {
                    headers: self.value_matches(&format!("{field}.headers"), &m.headers, true),
                    query_params: self.value_matches(
                        &format!("{field}.queryParams"),
                        &m.query_params,
                        false,
                    ),
                    ..Default::default()
                };
                match kind {
                    ObjectKind::GrpcRoute => {
                        if let Some(method) = &m.method {
                            let g: GrpcMethodSpec =
                                serde_json::from_value(method.clone()).unwrap_or_default();
                            let regex = g.type_.as_deref() == Some("RegularExpression");
                            if regex {
                                for v in [&g.service, &g.method].into_iter().flatten() {
                                    self.regex(&format!("{field}.method"), v);
                                }
                            }
                            if g.service.is_none() && g.method.is_none() {
                                self.invalid(
                                    format!("{field}.method"),
                                    "names neither a service nor a method".into(),
                                );
                            }
                            out.grpc = Some(proto::GrpcMethodMatch {
                                service: g.service.unwrap_or_default(),
                                method: g.method.unwrap_or_default(),
                                regex,
                            });
                        }
                    }
                    _ => {
                        out.path = Some(self.path_match(
                            &format!("{field}.path"),
                            m.path.as_ref().unwrap_or(&PathSpec::default()),
                        ));
                        if let Some(method) = m.method.as_ref().and_then(|v| v.as_str()) {
                            out.method = method.to_owned();
                        }
                    }
                }
                out
            })
            .collect()
    }

    fn headers(&mut self, field: &str, m: &HeaderModifierSpec) -> proto::HeaderModifier {
        let header = |h: &HeaderSpec| proto::Header {
            name: h.name.to_ascii_lowercase(),
            value: h.value.clone(),
        };
        for (i, h) in m.set.iter().chain(&m.add).enumerate() {
            if h.name.is_empty() || http::HeaderName::from_str(&h.name).is_err() {
                self.invalid(
                    format!("{field}[{i}].name"),
                    format!("{:?} is not a header name", h.name),
                );
            }
        }
        proto::HeaderModifier {
            set: m.set.iter().map(header).collect(),
            add: m.add.iter().map(header).collect(),
            remove: m.remove.iter().map(|n| n.to_ascii_lowercase()).collect(),
        }
    }

    fn path_modifier(
        &mut self,
        field: &str,
        p: &PathModifierSpec,
        prefix_matched: bool,
    ) -> Option<proto::PathModifier> {
        use proto::path_modifier::Path;
        let path = match p.type_.as_str() {
            "ReplaceFullPath" => Path::Full(p.replace_full_path.clone().unwrap_or_default()),
            "ReplacePrefixMatch" => {
                if !prefix_matched {
                    self.invalid(
                        format!("{field}.type"),
                        "ReplacePrefixMatch needs every match of the rule to be a PathPrefix match"
                            .into(),
                    );
                }
                Path::Prefix(p.replace_prefix_match.clone().unwrap_or_default())
            }
            other => {
                self.invalid(
                    format!("{field}.type"),
                    format!("{other:?} is not ReplaceFullPath or ReplacePrefixMatch"),
                );
                return None;
            }
        };
        Some(proto::PathModifier { path: Some(path) })
    }

    fn filters(
        &mut self,
        at: &str,
        filters: &[FilterSpec],
        prefix_matched: bool,
        route_ns: &str,
        kind: ObjectKind,
    ) -> Vec<proto::RouteFilter> {
        use proto::route_filter::Filter;
        let mut out = Vec::new();
        let (mut redirect, mut rewrite) = (false, false);
        for (i, f) in filters.iter().enumerate() {
            let field = format!("{at}.filters[{i}]");
            let missing = |this: &mut Self, name: &str| {
                this.invalid(
                    format!("{field}.{name}"),
                    format!("is missing for a {} filter", f.type_),
                )
            };
            let filter = match f.type_.as_str() {
                "RequestHeaderModifier" => match &f.request_header_modifier {
                    Some(m) => Filter::RequestHeaderModifier(
                        self.headers(&format!("{field}.requestHeaderModifier"), m),
                    ),
                    None => {
                        missing(self, "requestHeaderModifier");
                        continue;
                    }
                },
                "ResponseHeaderModifier" => match &f.response_header_modifier {
                    Some(m) => Filter::ResponseHeaderModifier(
                        self.headers(&format!("{field}.responseHeaderModifier"), m),
                    ),
                    None => {
                        missing(self, "responseHeaderModifier");
                        continue;
                    }
                },
                "RequestRedirect" if kind == ObjectKind::HttpRoute => {
                    redirect = true;
                    let Some(r) = &f.request_redirect else {
                        missing(self, "requestRedirect");
                        continue;
                    };
                    let status = r.status_code.unwrap_or(302);
                    if ![301, 302, 303, 307, 308].contains(&status) {
                        self.invalid(
                            format!("{field}.requestRedirect.statusCode"),
                            format!("{status} is not 301, 302, 303, 307 or 308"),
                        );
                    }
                    if let Some(s) = r
                        .scheme
                        .as_deref()
                        .filter(|s| !matches!(*s, "http" | "https"))
                    {
                        self.invalid(
                            format!("{field}.requestRedirect.scheme"),
                            format!("{s:?} is not http or https"),
                        );
                    }
                    let port = r.port.unwrap_or(0);
                    if !(0..=65535).contains(&port) {
                        self.invalid(
                            format!("{field}.requestRedirect.port"),
                            format!("{port} is not a port"),
                        );
                    }
                    Filter::RequestRedirect(proto::Redirect {
                        scheme: r.scheme.clone().unwrap_or_default(),
                        hostname: r.hostname.clone().unwrap_or_default(),
                        path: r.path.as_ref().and_then(|p| {
                            self.path_modifier(
                                &format!("{field}.requestRedirect.path"),
                                p,
                                prefix_matched,
                            )
                        }),
                        port: port.clamp(0, 65535) as u32,
                        status_code: status.clamp(0, 999) as u32,
                    })
                }
                "URLRewrite" if kind == ObjectKind::HttpRoute => {
                    rewrite = true;
                    let Some(r) = &f.url_rewrite else {
                        missing(self, "urlRewrite");
                        continue;
                    };
                    Filter::UrlRewrite(proto::Rewrite {
                        hostname: r.hostname.clone().unwrap_or_default(),
                        path: r.path.as_ref().and_then(|p| {
                            self.path_modifier(
                                &format!("{field}.urlRewrite.path"),
                                p,
                                prefix_matched,
                            )
                        }),
                    })
                }
                "RequestMirror" => {
                    let Some(m) = &f.request_mirror else {
                        missing(self, "requestMirror");
                        continue;
                    };
                    let fraction_ppm = match (&m.fraction, m.percent) {
                        (Some(fr), _) => {
                            let den = fr.denominator.unwrap_or(100);
                            if den <= 0 || fr.numerator < 0 || fr.numerator > den {
                                self.invalid(
                                    format!("{field}.requestMirror.fraction"),
                                    "must be a fraction from 0 to 1 with a positive denominator"
                                        .into(),
                                );
                                0
                            } else {
                                (i64::from(fr.numerator) * 1_000_000 / i64::from(den)) as u32
                            }
                        }
                        (None, Some(p)) if (0..=100).contains(&p) => p as u32 * 10_000,
                        (None, Some(p)) => {
                            self.invalid(
                                format!("{field}.requestMirror.percent"),
                                format!("{p} is not from 0 to 100"),
                            );
                            0
                        }
                        (None, None) => 1_000_000,
                    };
                    let backend = self.backend(
                        &format!("{field}.requestMirror.backendRef"),
                        &m.backend_ref,
                        route_ns,
                        kind,
                        false,
                    );
                    Filter::RequestMirror(proto::Mirror {
                        backend: Some(backend),
                        fraction_ppm,
                    })
                }
                other => {
                    self.invalid(
                        format!("{field}.type"),
                        format!(
                            "{other:?} filters are not supported by Weft on a {}",
                            kind.kind()
                        ),
                    );
                    continue;
                }
            };
            out.push(proto::RouteFilter {
                filter: Some(filter),
            });
        }
        if redirect && rewrite {
            self.invalid(
                format!("{at}.filters"),
                "RequestRedirect and URLRewrite cannot be used together".into(),
            );
        }
        out
    }

    fn backend(
        &mut self,
        field: &str,
        b: &BackendSpec,
        route_ns: &str,
        kind: ObjectKind,
        with_filters: bool,
    ) -> proto::Backend {
        let namespace = b.namespace.clone().unwrap_or_else(|| route_ns.to_owned());
        let service = ObjectName::new(&namespace, &b.name);
        let weight = b.weight.unwrap_or(1);
        if !(0..=1_000_000).contains(&weight) {
            self.invalid(
                format!("{field}.weight"),
                format!("{weight} is not from 0 to 1000000"),
            );
        }
        let group = b.group.as_deref().unwrap_or("");
        let backend_kind = b.kind.as_deref().unwrap_or("Service");
        let port = b.port.unwrap_or(0);
        // Every route Weft serves is a mesh route (its parents are Services), and a mesh
        // route may name a backend in any namespace without a ReferenceGrant (GEP-1294):
        // the request reaches the backend's pods as the client that sent it (the
        // waypoint names it on the HBONE stream), so the backend namespace's
        // authorization policies still decide.
        let invalid = if !(group.is_empty() || group == "core") || backend_kind != "Service" {
            self.unresolved(
                field.to_owned(),
                "InvalidKind",
                format!("{group}/{backend_kind} is not a kind Weft routes to; use a Service"),
            )
        } else if !(1..=65535).contains(&port) {
            self.unresolved(
                format!("{field}.port"),
                "UnsupportedProtocol",
                "a Service backend needs a port".into(),
            )
        } else {
            match self.objects.services.get(&service) {
                None => self.unresolved(
                    format!("{field}.name"),
                    "BackendNotFound",
                    format!("there is no Service {service}"),
                ),
                Some(s)
                    if !s
                        .value
                        .spec
                        .as_ref()
                        .and_then(|sp| sp.ports.as_ref())
                        .is_some_and(|ps| ps.iter().any(|p| p.port == port)) =>
                {
                    self.unresolved(
                        format!("{field}.port"),
                        "BackendNotFound",
                        format!("Service {service} has no port {port}"),
                    )
                }
                Some(_) => String::new(),
            }
        };
        let filters = if with_filters {
            self.filters(field, &b.filters, false, route_ns, kind)
        } else {
            Vec::new()
        };
        proto::Backend {
            service: service.to_string(),
            port: port.clamp(0, 65535) as u32,
            weight: weight.clamp(0, 1_000_000) as u32,
            invalid,
            filters,
        }
    }

    /// Most retries a rule may ask for; more only multiply an outage.
    const MAX_RETRIES: i64 = 10;

    fn retry(&mut self, at: &str, spec: &RetrySpec) -> proto::Retry {
        let attempts = match spec.attempts {
            None => 1,
            Some(n @ 0..=Self::MAX_RETRIES) => n as u32,
            Some(n) => {
                self.invalid(
                    format!("{at}.retry.attempts"),
                    format!("{n} is not from 0 to {}", Self::MAX_RETRIES),
                );
                0
            }
        };
        let mut codes = Vec::new();
        for (i, c) in spec.codes.iter().enumerate() {
            match u32::try_from(*c) {
                Ok(c @ 400..=599) => codes.push(c),
                _ => self.invalid(
                    format!("{at}.retry.codes[{i}]"),
                    format!("{c} is not an HTTP error status (400 to 599)"),
                ),
            }
        }
        proto::Retry {
            attempts,
            codes,
            backoff_ms: self.timeout(&format!("{at}.retry.backoff"), &spec.backoff),
        }
    }

    fn timeout(&mut self, field: &str, value: &Option<String>) -> u32 {
        let Some(text) = value else { return 0 };
        match gateway_api::Duration::from_str(text) {
            Ok(d) => u32::try_from(d.as_millis()).unwrap_or(u32::MAX),
            Err(e) => {
                self.invalid(
                    field.to_owned(),
                    format!("{text:?} is not a duration like 500ms or 10s: {e}"),
                );
                0
            }
        }
    }
}

/// One route of either kind, read into the neutral shape.
struct RouteInput<'a> {
    kind: ObjectKind,
    name: &'a ObjectName,
    origin: &'a Origin,
    generation: Option<i64>,
    created: i64,
    spec: Result<RouteSpec, serde_json::Error>,
}

pub(super) fn routes(objects: &Objects, out: &mut Translation) {
    let http = objects.http_routes.iter().map(|(name, o)| RouteInput {
        kind: ObjectKind::HttpRoute,
        name,
        origin: &o.origin,
        generation: o.value.metadata.generation,
        created: created(&o.value.metadata),
        spec: serde_json::to_value(&o.value.spec).and_then(serde_json::from_value),
    });
    let grpc = objects.grpc_routes.iter().map(|(name, o)| RouteInput {
        kind: ObjectKind::GrpcRoute,
        name,
        origin: &o.origin,
        generation: o.value.metadata.generation,
        created: created(&o.value.metadata),
        spec: serde_json::to_value(&o.value.spec).and_then(serde_json::from_value),
    });
    for input in http.chain(grpc) {
        route(objects, input, out);
    }
}

/// The creation time in Unix seconds, 0 when the object has none (manifests).
fn created(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> i64 {
    meta.creation_timestamp
        .as_ref()
        .map_or(0, |t| t.0.as_second())
}

fn route(objects: &Objects, input: RouteInput<'_>, out: &mut Translation) {
    let name = input.name;
    let mut check = Check {
        object: ObjectRef::new(input.kind, name),
        origin: input.origin,
        problems: Vec::new(),
        accepted: None,
        resolved: None,
        objects,
    };
    let spec = match input.spec {
        Ok(s) => s,
        Err(e) => {
            check.invalid("spec".into(), format!("cannot be read: {e}"));
            out.problems.append(&mut check.problems);
            return;
        }
    };
    // Parents: only Services are Weft's (GAMMA); other parents belong to other
    // implementations and get no status from Weft.
    let mut parents = Vec::new();
    for (i, p) in spec.parent_refs.iter().enumerate() {
        let group = p.group.as_deref().unwrap_or("gateway.networking.k8s.io");
        let kind = p.kind.as_deref().unwrap_or("Gateway");
        if !((group.is_empty() || group == "core") && kind == "Service") {
            continue;
        }
        let service = ObjectName::new(
            p.namespace
                .clone()
                .unwrap_or_else(|| name.namespace.clone()),
            &p.name,
        );
        let mut port = p.port.unwrap_or(0);
        let service_ports = objects
            .services
            .get(&service)
            .and_then(|s| s.value.spec.as_ref())
            .and_then(|sp| sp.ports.clone())
            .unwrap_or_default();
        // `sectionName` names one of the Service's ports: the route applies to it only.
        let section = p.section_name.as_ref().map(|section| {
            match service_ports
                .iter()
                .find(|sp| sp.name.as_deref() == Some(section.as_str()))
            {
                None => Err(format!("Service {service} has no port named {section:?}")),
                Some(sp) if port != 0 && sp.port != port => Err(format!(
                    "Service {service}'s port {section:?} is {}, not the parentRef's port {port}",
                    sp.port
                )),
                Some(sp) => Ok(sp.port),
            }
        });
        let problem = match (objects.services.get(&service), section) {
            (None, _) => Some(format!("there is no Service {service}")),
            (Some(_), Some(Err(why))) => Some(why),
            (Some(_), Some(Ok(section_port))) => {
                port = section_port;
                None
            }
            (Some(s), None)
                if port != 0
                    && !s
                        .value
                        .spec
                        .as_ref()
                        .and_then(|sp| sp.ports.as_ref())
                        .is_some_and(|ps| ps.iter().any(|sp| sp.port == port)) =>
            {
                Some(format!("Service {service} has no port {port}"))
            }
            (Some(_), None) => None,
        };
        if let Some(why) = &problem {
            check.problems.push(Problem {
                object: Some(check.object.clone()),
                origin: input.origin.clone(),
                field: format!("spec.parentRefs[{i}]"),
                reason: format!("{why}; the route does not apply to it"),
                effect: Effect::Ignored,
                condition_reason: "NoMatchingParent",
            });
        }
        parents.push((p, service, port, problem));
    }
    if parents.is_empty() {
        return;
    }
    let mut rules = Vec::new();
    for (i, r) in spec.rules.iter().enumerate() {
        let at = format!("spec.rules[{i}]");
        let matches = check.matches(&at, input.kind, &r.matches);
        let prefix_matched = !matches.is_empty()
            && matches.iter().all(|m| {
                m.path
                    .as_ref()
                    .is_some_and(|p| p.r#type == proto::PathMatchType::PathPrefix as i32)
            });
        let prefix_matched =
            prefix_matched || (r.matches.is_empty() && input.kind == ObjectKind::HttpRoute);
        let filters = check.filters(&at, &r.filters, prefix_matched, &name.namespace, input.kind);
        let backends = r
            .backend_refs
            .iter()
            .enumerate()
            .map(|(j, b)| {
                check.backend(
                    &format!("{at}.backendRefs[{j}]"),
                    b,
                    &name.namespace,
                    input.kind,
                    true,
                )
            })
            .collect();
        let (request, backend_request) = match &r.timeouts {
            Some(t) => (
                check.timeout(&format!("{at}.timeouts.request"), &t.request),
                check.timeout(&format!("{at}.timeouts.backendRequest"), &t.backend_request),
            ),
            None => (0, 0),
        };
        if request != 0 && backend_request > request {
            check.invalid(
                format!("{at}.timeouts.backendRequest"),
                "is longer than timeouts.request; it must not be".into(),
            );
        }
        let retry = r.retry.as_ref().map(|spec| check.retry(&at, spec));
        rules.push(proto::RouteRule {
            name: r.name.clone().unwrap_or_default(),
            index: i as u32,
            matches,
            filters,
            backends,
            request_timeout_ms: request,
            backend_request_timeout_ms: backend_request,
            retry,
        });
    }
    let accepted_parents: Vec<proto::ParentRef> = parents
        .iter()
        .filter(|(_, _, _, problem)| problem.is_none())
        .map(|(_, service, port, _)| proto::ParentRef {
            service: service.to_string(),
            port: *port as u32,
        })
        .collect();
    let valid = check.accepted.is_none();
    let mut parent_status = Vec::new();
    for (p, _, _, problem) in &parents {
        let accepted = match (problem, &check.accepted) {
            (Some(why), _) => Condition {
                type_: "Accepted",
                status: false,
                reason: "NoMatchingParent",
                message: why.clone(),
            },
            (None, Some((reason, why))) => Condition {
                type_: "Accepted",
                status: false,
                reason,
                message: why.clone(),
            },
            (None, None) => Condition {
                type_: "Accepted",
                status: true,
                reason: "Accepted",
                message: "the route applies to this Service's traffic through its waypoint".into(),
            },
        };
        let resolved = match &check.resolved {
            Some((reason, why)) => Condition {
                type_: "ResolvedRefs",
                status: false,
                reason,
                message: why.clone(),
            },
            None => Condition {
                type_: "ResolvedRefs",
                status: true,
                reason: "ResolvedRefs",
                message: "every backend reference resolved".into(),
            },
        };
        parent_status.push((serde_json::to_value(p).ok(), vec![accepted, resolved]));
    }
    out.statuses.push(DesiredStatus {
        object: check.object.clone(),
        generation: input.generation,
        parents: parent_status,
    });
    out.problems.append(&mut check.problems);
    if !valid || accepted_parents.is_empty() {
        return;
    }
    let resource = Resource::Route(proto::Route {
        namespace: name.namespace.clone(),
        name: name.name.clone(),
        kind: match input.kind {
            ObjectKind::GrpcRoute => proto::RouteKind::Grpc,
            _ => proto::RouteKind::Http,
        } as i32,
        parents: accepted_parents,
        hostnames: spec.hostnames,
        rules,
        created: input.created,
    });
    out.entries.insert(
        resource.key(),
        Entry {
            resource,
            audience: Audience::Waypoints,
        },
    );
}
