//! Route selection, the first stage of a request: the routes attached to a service
//! port (compiled in [`crate::target`]), and the Gateway API's precedence to pick one
//! rule for a request.
//!
//! ```text
//!  Routes { producers, consumers by namespace } --select(client namespace, request)-->
//!    Selected::Rule(target) | NoMatch (404) | NoRoutes (the service's default)
//! ```
//!
//! Which routes apply: a route in the client's namespace that names the service as a
//! parent (a consumer route) hides every producer route of that service; otherwise the
//! routes in the service's own namespace apply. Routes in a third namespace apply to no
//! one here.
//!
//! Precedence across every match of every applicable rule, as the Gateway API orders
//! it: an Exact path, then the longest PathPrefix, then a method match, then the most
//! header matches, then the most query-param matches, then the oldest route, then the
//! route's `namespace/name` alphabetically, then rule and match order. A regular
//! expression path ranks below every non-root prefix and above the root prefix `/`
//! (which is what a match without a path means), so a catch-all never hides it.

use std::collections::HashMap;
use std::sync::Arc;

use api::proto::{self, PathMatchType, RouteKind};
use api::ObjectName;
use http::{HeaderMap, Method};

use crate::target::Target;

/// One compiled match.
#[derive(Debug)]
pub struct Match {
    path: PathRule,
    headers: Vec<(http::HeaderName, Value)>,
    query: Vec<(String, Value)>,
    method: Option<Method>,
}

#[derive(Debug)]
enum PathRule {
    Exact(String),
    /// Without a trailing `/` (except the root, kept as `/`).
    Prefix(String),
    Regex(regex::Regex, usize),
}

#[derive(Debug)]
enum Value {
    Exact(String),
    Regex(regex::Regex),
}

impl Value {
    fn matches(&self, v: &str) -> bool {
        match self {
            Value::Exact(e) => e == v,
            Value::Regex(r) => r.is_match(v),
        }
    }
}

/// A compiled route rule: its matches and what it does.
#[derive(Debug)]
pub struct Rule {
    /// Its matches (shared with the versions compiled from the same route object).
    pub matches: Arc<[Match]>,
    /// What a request it selects takes.
    pub target: Arc<Target>,
}

/// A compiled route.
#[derive(Debug)]
pub struct Route {
    /// `namespace/name`.
    pub name: ObjectName,
    /// HTTP or gRPC.
    pub kind: RouteKind,
    /// Its creation time (Unix seconds, 0 when unknown).
    pub created: i64,
    /// Its rules, in order.
    pub rules: Vec<Rule>,
}

/// The routes attached to one service port: a route in the client's namespace that
/// names the service as a parent (a consumer route) hides every producer route of that
/// service; otherwise the routes in the service's own namespace apply. Routes in a
/// third namespace apply to no one.
#[derive(Debug, Default)]
pub struct Routes {
    producers: Vec<Arc<Route>>,
    consumers: HashMap<String, Vec<Arc<Route>>>,
}

/// What a request's attributes select.
#[derive(Debug, Clone, Copy)]
pub enum Selected<'a> {
    /// No route is attached to the service: it goes to the service itself.
    NoRoutes,
    /// Routes are attached but none matches: 404.
    NoMatch,
    /// This rule's target.
    Rule(&'a Arc<Target>),
}

/// The parts of a request that routing looks at.
#[derive(Debug, Clone, Copy)]
pub struct RequestView<'a> {
    /// The method.
    pub method: &'a Method,
    /// The path, without the query.
    pub path: &'a str,
    /// The query, without `?`.
    pub query: Option<&'a str>,
    /// The headers.
    pub headers: &'a HeaderMap,
}

/// A sort key, larger wins.
type Rank = (u8, usize, bool, usize, usize);

impl Routes {
    /// The routes of `service`, split by who they apply to.
    pub fn new(service: &ObjectName, routes: Vec<Arc<Route>>) -> Routes {
        let mut r = Routes::default();
        for route in routes {
            if route.name.namespace == service.namespace {
                r.producers.push(route);
            } else {
                r.consumers
                    .entry(route.name.namespace.clone())
                    .or_default()
                    .push(route);
            }
        }
        r
    }

    /// Whether no route is attached.
    pub fn is_empty(&self) -> bool {
        self.producers.is_empty() && self.consumers.is_empty()
    }

    /// The rule a request from a client in `client_ns` takes.
    pub fn select<'a>(&'a self, client_ns: &str, req: &RequestView<'_>) -> Selected<'a> {
        let routes = match self.consumers.get(client_ns) {
            Some(c) => c,
            None => &self.producers,
        };
        if routes.is_empty() {
            return Selected::NoRoutes;
        }
        let mut best: Option<(Rank, &'a Arc<Route>, usize, usize)> = None;
        for route in routes {
            for (ri, rule) in route.rules.iter().enumerate() {
                for (mi, m) in rule.matches.iter().enumerate() {
                    if !m.matches(req) {
                        continue;
                    }
                    let rank = m.rank();
                    let better = match &best {
                        None => true,
                        Some((b_rank, b_route, b_ri, b_mi)) => {
                            better(rank, route, ri, mi, *b_rank, b_route, *b_ri, *b_mi)
                        }
                    };
                    if better {
                        best = Some((rank, route, ri, mi));
                    }
                }
            }
        }
        match best {
            Some((_, route, ri, _)) => Selected::Rule(&route.rules[ri].target),
            None => Selected::NoMatch,
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn better(
    rank: Rank,
    route: &Route,
    ri: usize,
    mi: usize,
    b_rank: Rank,
    b_route: &Route,
    b_ri: usize,
    b_mi: usize,
) -> bool {
    if rank != b_rank {
        return rank > b_rank;
    }
    // Older wins; an unknown creation time (0) counts as newest.
    let age = |c: i64| if c == 0 { i64::MAX } else { c };
    (
        age(route.created),
        &route.name.namespace,
        &route.name.name,
        ri,
        mi,
    ) < (
        age(b_route.created),
        &b_route.name.namespace,
        &b_route.name.name,
        b_ri,
        b_mi,
    )
}

impl Match {
    fn rank(&self) -> Rank {
        let (kind, len) = match &self.path {
            PathRule::Exact(p) => (4, p.len()),
            PathRule::Prefix(p) if p == "/" => (1, 1),
            PathRule::Prefix(p) => (3, p.len()),
            PathRule::Regex(_, len) => (2, *len),
        };
        (
            kind,
            len,
            self.method.is_some(),
            self.headers.len(),
            self.query.len(),
        )
    }

    fn matches(&self, req: &RequestView<'_>) -> bool {
        let path_ok = match &self.path {
            PathRule::Exact(p) => req.path == p,
            PathRule::Prefix(p) => prefix_matches(p, req.path),
            PathRule::Regex(r, _) => r.is_match(req.path),
        };
        path_ok
            && self.method.as_ref().is_none_or(|m| m == req.method)
            && self.headers.iter().all(|(name, value)| {
                req.headers
                    .get_all(name)
                    .iter()
                    .any(|v| v.to_str().is_ok_and(|v| value.matches(v)))
            })
            && self
                .query
                .iter()
                .all(|(name, value)| query_value(req.query, name).is_some_and(|v| value.matches(v)))
    }
}

/// Gateway API PathPrefix: element-wise, so `/foo` matches `/foo`, `/foo/` and
/// `/foo/bar` but not `/foobar`.
fn prefix_matches(prefix: &str, path: &str) -> bool {
    if prefix == "/" {
        return true;
    }
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

/// The first value of query parameter `name` (names are case-sensitive).
fn query_value<'a>(query: Option<&'a str>, name: &str) -> Option<&'a str> {
    query?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then_some(v)
    })
}

/// A rule's matches compiled (no match: every request), or why one cannot be.
pub fn compile_matches(rule: &proto::RouteRule) -> Result<Vec<Match>, String> {
    if rule.matches.is_empty() {
        return compile_match(&proto::RouteMatch::default()).map(|m| vec![m]);
    }
    rule.matches
        .iter()
        .enumerate()
        .map(|(i, m)| compile_match(m).map_err(|why| format!("matches[{i}]: {why}")))
        .collect()
}

fn regex(pattern: &str) -> Result<regex::Regex, String> {
    // Anchored: the Gateway API's regular expressions match the whole value.
    regex::Regex::new(&format!("^(?:{pattern})$"))
        .map_err(|e| format!("invalid regular expression {pattern:?}: {e}"))
}

fn value(v: &proto::ValueMatch) -> Result<Value, String> {
    match v.regex {
        true => regex(&v.value).map(Value::Regex),
        false => Ok(Value::Exact(v.value.clone())),
    }
}

fn compile_match(m: &proto::RouteMatch) -> Result<Match, String> {
    let path = match (&m.grpc, &m.path) {
        (Some(g), _) if g.regex => {
            let service = if g.service.is_empty() {
                "[^/]+"
            } else {
                &g.service
            };
            let method = if g.method.is_empty() {
                "[^/]+"
            } else {
                &g.method
            };
            let pattern = format!("/{service}/{method}");
            PathRule::Regex(regex(&pattern)?, pattern.len())
        }
        (Some(g), _) => match (g.service.is_empty(), g.method.is_empty()) {
            (false, false) => PathRule::Exact(format!("/{}/{}", g.service, g.method)),
            (false, true) => PathRule::Prefix(format!("/{}", g.service)),
            (true, false) => {
                let pattern = format!("/[^/]+/{}", regex::escape(&g.method));
                PathRule::Regex(regex(&pattern)?, pattern.len())
            }
            (true, true) => PathRule::Prefix("/".into()),
        },
        (None, None) => PathRule::Prefix("/".into()),
        (None, Some(p)) => match PathMatchType::try_from(p.r#type) {
            Ok(PathMatchType::Exact) => PathRule::Exact(p.value.clone()),
            Ok(PathMatchType::RegularExpression) => {
                PathRule::Regex(regex(&p.value)?, p.value.len())
            }
            _ => {
                let trimmed = p.value.trim_end_matches('/');
                PathRule::Prefix(if trimmed.is_empty() {
                    "/".into()
                } else {
                    trimmed.to_owned()
                })
            }
        },
    };
    let headers = m
        .headers
        .iter()
        .map(|h| {
            let name = http::HeaderName::from_bytes(h.name.to_ascii_lowercase().as_bytes())
                .map_err(|_| format!("invalid header name {:?}", h.name))?;
            Ok((name, value(h)?))
        })
        .collect::<Result<_, String>>()?;
    let query = m
        .query_params
        .iter()
        .map(|q| Ok((q.name.clone(), value(q)?)))
        .collect::<Result<_, String>>()?;
    let method = match m.method.as_str() {
        "" => None,
        other => Some(
            Method::from_bytes(other.as_bytes())
                .map_err(|_| format!("invalid method {other:?}"))?,
        ),
    };
    Ok(Match {
        path,
        headers,
        query,
        method,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use api::proto::{PathMatch, RouteMatch, ValueMatch};

    fn route(ns: &str, name: &str, created: i64, rules: Vec<Vec<RouteMatch>>) -> Arc<Route> {
        let name = ObjectName::new(ns, name);
        Arc::new(Route {
            kind: RouteKind::Http,
            created,
            rules: rules
                .into_iter()
                .enumerate()
                .map(|(i, matches)| {
                    let spec = proto::RouteRule {
                        index: i as u32,
                        matches,
                        ..Default::default()
                    };
                    Rule {
                        matches: compile_matches(&spec).expect("compiles").into(),
                        // The label says which rule was picked.
                        target: Arc::new(Target {
                            route: Some(format!("{name}#{i}").into()),
                            ..Target::default()
                        }),
                    }
                })
                .collect(),
            name,
        })
    }

    fn path(t: PathMatchType, v: &str) -> RouteMatch {
        RouteMatch {
            path: Some(PathMatch {
                r#type: t as i32,
                value: v.into(),
            }),
            ..Default::default()
        }
    }

    fn table(routes: Vec<Arc<Route>>) -> Routes {
        Routes::new(&ObjectName::new("shop", "echo"), routes)
    }

    fn pick(t: &Routes, client: &str, method: &str, uri: &str, headers: &[(&str, &str)]) -> String {
        let uri: http::Uri = uri.parse().expect("uri");
        let method = Method::from_bytes(method.as_bytes()).expect("method");
        let mut h = HeaderMap::new();
        for (k, v) in headers {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).expect("name"),
                v.parse().expect("value"),
            );
        }
        let req = RequestView {
            method: &method,
            path: uri.path(),
            query: uri.query(),
            headers: &h,
        };
        match t.select(client, &req) {
            Selected::Rule(t) => t.route.as_deref().unwrap_or("?").to_owned(),
            Selected::NoMatch => "404".into(),
            Selected::NoRoutes => "none".into(),
        }
    }

    #[test]
    fn exact_beats_the_longest_prefix_which_beats_a_shorter_one() {
        let t = table(vec![route(
            "shop",
            "r",
            1,
            vec![
                vec![path(PathMatchType::PathPrefix, "/")],
                vec![path(PathMatchType::PathPrefix, "/api/")],
                vec![path(PathMatchType::PathPrefix, "/api/v2")],
                vec![path(PathMatchType::Exact, "/api")],
            ],
        )]);
        assert_eq!(pick(&t, "shop", "GET", "/api", &[]), "shop/r#3");
        assert_eq!(pick(&t, "shop", "GET", "/api/v2/x", &[]), "shop/r#2");
        assert_eq!(pick(&t, "shop", "GET", "/api/v1", &[]), "shop/r#1");
        // Element-wise: /api/v2 does not match /api/v2x.
        assert_eq!(pick(&t, "shop", "GET", "/api/v2x", &[]), "shop/r#1");
        assert_eq!(pick(&t, "shop", "GET", "/apix", &[]), "shop/r#0");
    }

    #[test]
    fn then_method_then_most_headers_then_most_query_params() {
        let with = |method: &str, headers: &[(&str, &str)], query: &[(&str, &str)]| RouteMatch {
            method: method.into(),
            headers: headers
                .iter()
                .map(|(k, v)| ValueMatch {
                    name: (*k).into(),
                    value: (*v).into(),
                    regex: false,
                })
                .collect(),
            query_params: query
                .iter()
                .map(|(k, v)| ValueMatch {
                    name: (*k).into(),
                    value: (*v).into(),
                    regex: false,
                })
                .collect(),
            ..Default::default()
        };
        let t = table(vec![route(
            "shop",
            "r",
            1,
            vec![
                vec![with("", &[("a", "1"), ("b", "2")], &[("q", "1")])],
                vec![with(
                    "",
                    &[("a", "1"), ("b", "2")],
                    &[("q", "1"), ("r", "2")],
                )],
                vec![with("", &[("a", "1"), ("b", "2"), ("c", "3")], &[])],
                vec![with("GET", &[], &[])],
            ],
        )]);
        let all = [("a", "1"), ("b", "2"), ("c", "3")];
        // A method match outranks any number of headers.
        assert_eq!(pick(&t, "shop", "GET", "/?q=1&r=2", &all), "shop/r#3");
        // Three headers beat two headers with two query params.
        assert_eq!(pick(&t, "shop", "POST", "/?q=1&r=2", &all), "shop/r#2");
        // With equal headers, more query params win.
        let two = [("a", "1"), ("b", "2")];
        assert_eq!(pick(&t, "shop", "POST", "/?q=1&r=2", &two), "shop/r#1");
        assert_eq!(pick(&t, "shop", "POST", "/?q=1", &two), "shop/r#0");
        assert_eq!(pick(&t, "shop", "POST", "/", &two), "404");
    }

    #[test]
    fn then_the_oldest_route_then_namespace_and_name() {
        let m = || vec![vec![path(PathMatchType::PathPrefix, "/x")]];
        let t = table(vec![
            route("shop", "b-new", 200, m()),
            route("shop", "c-old", 100, m()),
        ]);
        assert_eq!(pick(&t, "shop", "GET", "/x", &[]), "shop/c-old#0");
        let t = table(vec![
            route("shop", "b", 100, m()),
            route("shop", "a", 100, m()),
        ]);
        assert_eq!(pick(&t, "shop", "GET", "/x", &[]), "shop/a#0");
    }

    #[test]
    fn consumer_routes_hide_producer_routes_for_their_namespace_only() {
        let m = || vec![vec![path(PathMatchType::PathPrefix, "/")]];
        let t = table(vec![
            route("shop", "producer", 1, m()),
            route("frontend", "consumer", 2, m()),
            route("elsewhere", "stray", 1, m()),
        ]);
        assert_eq!(pick(&t, "frontend", "GET", "/", &[]), "frontend/consumer#0");
        assert_eq!(pick(&t, "shop", "GET", "/", &[]), "shop/producer#0");
        assert_eq!(pick(&t, "other", "GET", "/", &[]), "shop/producer#0");
        assert_eq!(
            pick(&table(vec![]), "shop", "GET", "/", &[]),
            "none",
            "no routes: the service itself"
        );
    }

    #[test]
    fn regex_paths_headers_and_grpc_methods() {
        let t = table(vec![route(
            "shop",
            "r",
            1,
            vec![
                vec![RouteMatch::default()],
                vec![path(PathMatchType::RegularExpression, "/items/[0-9]+")],
                vec![RouteMatch {
                    headers: vec![ValueMatch {
                        name: "X-Canary".into(),
                        value: "yes|true".into(),
                        regex: true,
                    }],
                    ..Default::default()
                }],
                vec![RouteMatch {
                    grpc: Some(proto::GrpcMethodMatch {
                        service: "echo.Echo".into(),
                        method: "Stream".into(),
                        regex: false,
                    }),
                    ..Default::default()
                }],
            ],
        )]);
        assert_eq!(pick(&t, "shop", "GET", "/items/42", &[]), "shop/r#1");
        assert_eq!(pick(&t, "shop", "GET", "/items/4x", &[]), "shop/r#0");
        assert_eq!(
            pick(&t, "shop", "GET", "/", &[("x-canary", "true")]),
            "shop/r#2"
        );
        assert_eq!(
            pick(&t, "shop", "GET", "/", &[("x-canary", "truex")]),
            "shop/r#0"
        );
        assert_eq!(
            pick(&t, "shop", "POST", "/echo.Echo/Stream", &[]),
            "shop/r#3"
        );
        assert_eq!(
            pick(&t, "shop", "POST", "/echo.Echo/Unary", &[]),
            "shop/r#0"
        );
    }
}
