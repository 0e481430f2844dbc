//! Fuzz harness for the waypoint's own parsing of request input (not hyper's): route
//! matching on hostile paths, headers and query strings, redirect and rewrite
//! building, and `traceparent`. Used by `waypoint/fuzz` (cargo-fuzz, nightly) and by
//! `tests/fuzz_corpus.rs`, which replays the committed corpus on stable Rust in CI.
//!
//! Input: line 1 the method, line 2 the path and query, then `name: value` header
//! lines up to an empty line, then a `traceparent` value.

use std::sync::{Arc, OnceLock};

use api::proto::{self, PathMatchType};
use api::ObjectName;
use http::header::{HeaderName, HeaderValue};
use http::{Method, Request, StatusCode, Uri};

use crate::router::{self, RequestView, Route, Routes, Rule, Selected};
use crate::stages;
use crate::target::{PathChange, Redirect, Rewrite, Target};

fn path(t: PathMatchType, v: &str) -> Option<proto::PathMatch> {
    Some(proto::PathMatch {
        r#type: t as i32,
        value: v.into(),
    })
}

fn value(name: &str, value: &str, regex: bool) -> proto::ValueMatch {
    proto::ValueMatch {
        name: name.into(),
        value: value.into(),
        regex,
    }
}

/// Routes with every kind of match, producer and consumer.
fn routes() -> &'static Routes {
    static ROUTES: OnceLock<Routes> = OnceLock::new();
    ROUTES.get_or_init(|| {
        let matches = [
            proto::RouteMatch {
                path: path(PathMatchType::Exact, "/exact"),
                ..Default::default()
            },
            proto::RouteMatch {
                path: path(PathMatchType::PathPrefix, "/api/v1/"),
                method: "POST".into(),
                ..Default::default()
            },
            proto::RouteMatch {
                path: path(PathMatchType::RegularExpression, "/items/[0-9]+(/.*)?"),
                headers: vec![value("x-canary", "yes|true", true)],
                ..Default::default()
            },
            proto::RouteMatch {
                query_params: vec![value("v", "2", false), value("q", "[a-z]*", true)],
                headers: vec![value("X-Version", "v2", false)],
                ..Default::default()
            },
            proto::RouteMatch {
                grpc: Some(proto::GrpcMethodMatch {
                    service: "echo.Echo".into(),
                    method: String::new(),
                    regex: false,
                }),
                ..Default::default()
            },
            proto::RouteMatch::default(),
        ];
        let route = |ns: &str, name: &str| {
            let name = ObjectName::new(ns, name);
            Arc::new(Route {
                kind: proto::RouteKind::Http,
                created: 0,
                rules: matches
                    .iter()
                    .enumerate()
                    .map(|(i, m)| Rule {
                        matches: router::compile_matches(&proto::RouteRule {
                            matches: vec![m.clone()],
                            ..Default::default()
                        })
                        .expect("the harness's matches compile")
                        .into(),
                        target: Arc::new(Target {
                            route: Some(format!("{name}#{i}").into()),
                            ..Target::default()
                        }),
                    })
                    .collect(),
                name,
            })
        };
        Routes::new(
            &ObjectName::new("shop", "echo"),
            vec![route("shop", "producer"), route("front", "consumer")],
        )
    })
}

/// Targets with redirects and rewrites of every kind.
fn targets() -> &'static [Target] {
    static TARGETS: OnceLock<Vec<Target>> = OnceLock::new();
    TARGETS.get_or_init(|| {
        let redirect = |scheme: Option<&str>, host: Option<&str>, port, path| Target {
            redirect: Some(Redirect {
                scheme: scheme.map(Into::into),
                hostname: host.map(Into::into),
                port,
                path,
                status: StatusCode::MOVED_PERMANENTLY,
            }),
            matched_prefix: Some("/api".into()),
            ..Target::default()
        };
        let rewrite = |host: Option<&'static str>, path| Target {
            rewrite: Some(Rewrite {
                host: host.map(HeaderValue::from_static),
                path,
            }),
            matched_prefix: Some("/api/".into()),
            ..Target::default()
        };
        vec![
            redirect(None, None, None, None),
            redirect(Some("https"), Some("example.org"), None, None),
            redirect(
                None,
                None,
                Some(9443),
                Some(PathChange::Prefix("/v2".into())),
            ),
            redirect(None, None, None, Some(PathChange::Full("/fixed".into()))),
            rewrite(None, Some(PathChange::Prefix("/".into()))),
            rewrite(Some("internal"), Some(PathChange::Prefix("/v2/".into()))),
            rewrite(None, Some(PathChange::Full("/fixed".into()))),
        ]
    })
}

/// The normaliser's promises for an origin-form `path`: the result is a path, with no
/// empty, `.` or `..` segment, no backslash, that normalises to itself and parses back.
fn normalised(path: &str) {
    if !path.starts_with('/') {
        return;
    }
    let normal = crate::normalize::path(path);
    assert!(normal.starts_with('/'), "{path:?} -> {normal:?}");
    assert!(!normal.contains('\\'), "{path:?} -> {normal:?}");
    assert!(
        !normal.contains("//") && !normal.split('/').any(|s| s == "." || s == ".."),
        "{path:?} -> {normal:?}"
    );
    assert_eq!(crate::normalize::path(&normal), normal, "{path:?}");
    assert!(
        http::uri::PathAndQuery::try_from(normal.as_ref()).is_ok(),
        "{path:?} -> {normal:?}"
    );
}

/// One input through path normalisation, route selection, request filters and
/// `traceparent` parsing. Panics on a broken invariant: a normalised path that is not
/// one, a redirect's `Location` that is not a URI, an origin-form path rewritten to
/// one that does not start with `/`, a `traceparent` that does not read back as
/// written.
pub fn request(data: &[u8]) {
    let mut lines = data.split(|b| *b == b'\n');
    let method = lines.next().unwrap_or_default();
    let target = lines.next().unwrap_or_default();
    let mut builder = Request::builder();
    if let Ok(m) = Method::from_bytes(method) {
        builder = builder.method(m);
    }
    if let Ok(uri) = Uri::try_from(target) {
        builder = builder.uri(uri);
    }
    for line in lines.by_ref() {
        if line.is_empty() {
            break;
        }
        let Some(colon) = line.iter().position(|b| *b == b':') else {
            continue;
        };
        let (name, value) = (&line[..colon], line[colon + 1..].trim_ascii());
        if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(name), HeaderValue::from_bytes(value)) {
            builder = builder.header(n, v);
        }
    }
    if let Ok(req) = builder.body(()) {
        normalised(req.uri().path());
        let view = RequestView {
            method: req.method(),
            path: req.uri().path(),
            query: req.uri().query(),
            headers: req.headers(),
        };
        for client in ["shop", "front", "other"] {
            match routes().select(client, &view) {
                Selected::Rule(t) => assert!(t.route.is_some()),
                Selected::NoMatch | Selected::NoRoutes => {}
            }
        }
        for t in targets() {
            let mut r = req.clone();
            match stages::request_filters(t, &mut r, 8080) {
                Some(answer) => {
                    if let Some(location) = answer.headers().get(http::header::LOCATION) {
                        assert!(
                            Uri::try_from(location.as_bytes()).is_ok(),
                            "Location {location:?} is not a URI"
                        );
                    }
                }
                // An origin-form path stays one (`*`, asterisk-form, is left as it is).
                None => assert!(
                    !req.uri().path().starts_with('/') || r.uri().path().starts_with('/'),
                    "{:?} rewritten to {:?}",
                    req.uri(),
                    r.uri()
                ),
            }
        }
    }
    let traceparent = lines.next().unwrap_or_default();
    if let Ok(text) = std::str::from_utf8(traceparent) {
        if let Some((trace, span)) = crate::trace::parse_traceparent(text) {
            let again = format!("00-{trace}-{span}-01");
            assert_eq!(
                crate::trace::parse_traceparent(&again),
                Some((trace, span)),
                "{text:?} read back as {again:?}"
            );
        }
    }
}
