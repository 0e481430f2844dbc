//! L4 authorization: a pure function of the policies that apply to a workload and of
//! one connection. DENY wins; with no ALLOW policy everything else is allowed; with
//! ALLOW policies, a connection must match one of them.
//!
//! A node-proxy sees no HTTP, so it cannot evaluate paths, methods or headers. It
//! errs on the safe side: an operation with HTTP conditions counts as matching in a
//! DENY policy (it denies more) and as not matching in an ALLOW policy (it allows
//! less).
//!
//! A plaintext connection proves no identity. It is not *from* anyone: `principals`
//! and `namespaces` never match it. Whether it is *not from* someone cannot be known,
//! so `notPrincipals` and `notNamespaces` match it in a DENY policy and not in an
//! ALLOW one. `DENY from notPrincipals: ["*"]` therefore refuses plaintext, and a DENY
//! naming one identity leaves plaintext alone, as in Istio; an ALLOW policy never
//! lets plaintext in through a source condition.

use std::fmt;

use crate::resource::{Action, AuthorizationPolicy, ObjectName, Operation, Pattern, Rule, Source};

/// What authorization looks at.
#[derive(Debug, Clone, Copy)]
pub struct Connection<'a> {
    /// The peer's proven SPIFFE ID; `None` for plaintext.
    pub principal: Option<&'a str>,
    /// The peer's namespace, from its identity; `None` for plaintext.
    pub namespace: Option<&'a str>,
    /// The destination port (the application's).
    pub port: u16,
    /// What is known of HTTP.
    pub http: Http<'a>,
}

/// The HTTP side of what is authorized.
#[derive(Debug, Clone, Copy)]
pub enum Http<'a> {
    /// A node-proxy on a direct connection: HTTP is not seen. Conditions on it count
    /// as matching in DENY and as not matching in ALLOW.
    Unseen,
    /// A node-proxy on a connection from a waypoint, which evaluated the HTTP
    /// conditions of the same policies for each request: they are taken as met in ALLOW
    /// and as not met in DENY, so the L4 check decides on the rest.
    CheckedByWaypoint,
    /// A waypoint, for one request.
    Request(&'a dyn Request),
}

/// One HTTP request's attributes, as a waypoint sees them.
pub trait Request: fmt::Debug {
    /// The path, without the query.
    fn path(&self) -> &str;
    /// The method, upper case.
    fn method(&self) -> &str;
    /// The first value of header `name` (lower case), if present and text.
    fn header(&self, name: &str) -> Option<&str>;
}

/// An allowed connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allowed {
    /// The ALLOW policy that matched; `None` when no ALLOW policy applies.
    pub by: Option<ObjectName>,
}

/// A denied connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denied {
    /// A DENY policy matched.
    DenyPolicy(ObjectName),
    /// ALLOW policies apply and none matched.
    NoAllowMatched(Vec<ObjectName>),
}

impl Denied {
    /// The policy to name in logs and metrics: the DENY policy, or the first ALLOW one.
    pub fn policy(&self) -> String {
        match self {
            Denied::DenyPolicy(p) => p.to_string(),
            Denied::NoAllowMatched(ps) => ps.first().map(ToString::to_string).unwrap_or_default(),
        }
    }

    /// `deny_policy` or `no_allow_match`, for metric labels.
    pub fn reason(&self) -> &'static str {
        match self {
            Denied::DenyPolicy(_) => "deny_policy",
            Denied::NoAllowMatched(_) => "no_allow_match",
        }
    }
}

impl fmt::Display for Denied {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Denied::DenyPolicy(p) => write!(f, "denied by DENY policy {p}"),
            Denied::NoAllowMatched(ps) => {
                let names: Vec<String> = ps.iter().map(ToString::to_string).collect();
                write!(
                    f,
                    "no rule of the ALLOW policies {} matches",
                    names.join(", ")
                )
            }
        }
    }
}

/// Decides a connection against the policies that apply to its destination.
pub fn check<'a>(
    policies: impl IntoIterator<Item = &'a AuthorizationPolicy>,
    conn: &Connection<'_>,
) -> Result<Allowed, Denied> {
    let mut allows = Vec::new();
    let mut allowed_by = None;
    for policy in policies {
        let matched = policy
            .rules
            .iter()
            .any(|r| rule_matches(r, conn, policy.action));
        match policy.action {
            Action::Deny if matched => return Err(Denied::DenyPolicy(policy.object_name())),
            Action::Deny => {}
            Action::Allow => {
                if matched && allowed_by.is_none() {
                    allowed_by = Some(policy.object_name());
                }
                allows.push(policy.object_name());
            }
        }
    }
    match (allows.is_empty(), allowed_by) {
        (true, _) => Ok(Allowed { by: None }),
        (false, Some(by)) => Ok(Allowed { by: Some(by) }),
        (false, None) => Err(Denied::NoAllowMatched(allows)),
    }
}

fn rule_matches(rule: &Rule, conn: &Connection<'_>, action: Action) -> bool {
    let from = rule.from.is_empty() || rule.from.iter().any(|s| source_matches(s, conn, action));
    let to = rule.to.is_empty() || rule.to.iter().any(|o| operation_matches(o, conn, action));
    from && to
}

/// A condition on an attribute the connection does not have: true in DENY (deny
/// more), false in ALLOW (allow less).
fn unknown(action: Action) -> bool {
    action == Action::Deny
}

fn any(patterns: &[Pattern], value: &str) -> bool {
    patterns.iter().any(|p| p.matches(value))
}

/// `patterns` in / not in, against a value a plaintext connection does not have.
fn attribute(
    include: &[Pattern],
    exclude: &[Pattern],
    value: Option<&str>,
    action: Action,
) -> bool {
    match value {
        Some(v) => (include.is_empty() || any(include, v)) && !any(exclude, v),
        // Not from anyone; "not from" is unknown.
        None => include.is_empty() && (exclude.is_empty() || unknown(action)),
    }
}

fn source_matches(source: &Source, conn: &Connection<'_>, action: Action) -> bool {
    attribute(
        &source.principals,
        &source.not_principals,
        conn.principal,
        action,
    ) && attribute(
        &source.namespaces,
        &source.not_namespaces,
        conn.namespace,
        action,
    )
}

fn operation_matches(op: &Operation, conn: &Connection<'_>, action: Action) -> bool {
    let ports = (op.ports.is_empty() || op.ports.contains(&conn.port))
        && !op.not_ports.contains(&conn.port);
    if !ports || !op.has_http_conditions() {
        return ports;
    }
    match conn.http {
        Http::Unseen => unknown(action),
        Http::CheckedByWaypoint => action == Action::Allow,
        Http::Request(req) => http_matches(op, req),
    }
}

fn http_matches(op: &Operation, req: &dyn Request) -> bool {
    let path = req.path();
    let method = req.method();
    (op.paths.is_empty() || any(&op.paths, path))
        && !any(&op.not_paths, path)
        && (op.methods.is_empty() || op.methods.iter().any(|m| m.eq_ignore_ascii_case(method)))
        && !op
            .not_methods
            .iter()
            .any(|m| m.eq_ignore_ascii_case(method))
        && op
            .headers
            .iter()
            .all(|(name, values)| req.header(name).is_some_and(|v| any(values, v)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resource::Scope;

    fn p(s: &str) -> Pattern {
        Pattern::parse(s).expect("valid pattern")
    }

    fn policy(name: &str, action: Action, rules: Vec<Rule>) -> AuthorizationPolicy {
        AuthorizationPolicy {
            namespace: "demo".into(),
            name: name.into(),
            scope: Scope::NamespaceWide,
            action,
            rules,
        }
    }

    fn from_ns(ns: &str) -> Rule {
        Rule {
            from: vec![Source {
                namespaces: vec![p(ns)],
                ..Source::default()
            }],
            to: vec![],
        }
    }

    const CLIENT: Connection<'static> = Connection {
        principal: Some("spiffe://cluster.local/ns/demo/sa/client"),
        namespace: Some("demo"),
        port: 8080,
        http: Http::Unseen,
    };
    const LEGACY: Connection<'static> = Connection {
        principal: Some("spiffe://cluster.local/ns/legacy/sa/default"),
        namespace: Some("legacy"),
        port: 8080,
        http: Http::Unseen,
    };
    const PLAINTEXT: Connection<'static> = Connection {
        principal: None,
        namespace: None,
        port: 8080,
        http: Http::Unseen,
    };

    #[test]
    fn no_policy_allows_everything() {
        assert_eq!(check([], &PLAINTEXT), Ok(Allowed { by: None }));
    }

    #[test]
    fn deny_wins_over_allow() {
        let allow_all = policy("all", Action::Allow, vec![Rule::default()]);
        let deny_legacy = policy("no-legacy", Action::Deny, vec![from_ns("legacy")]);
        let ps = [allow_all, deny_legacy];
        assert_eq!(
            check(&ps, &LEGACY),
            Err(Denied::DenyPolicy(ObjectName::new("demo", "no-legacy")))
        );
        assert_eq!(
            check(&ps, &CLIENT),
            Ok(Allowed {
                by: Some(ObjectName::new("demo", "all"))
            })
        );
    }

    #[test]
    fn allow_policies_deny_what_they_do_not_match() {
        let ps = [policy("demo-only", Action::Allow, vec![from_ns("demo")])];
        assert!(check(&ps, &CLIENT).is_ok());
        let denied = check(&ps, &LEGACY).expect_err("legacy is not allowed");
        assert_eq!(denied.reason(), "no_allow_match");
        assert_eq!(
            denied.to_string(),
            "no rule of the ALLOW policies demo/demo-only matches"
        );
        // An ALLOW policy without rules allows nothing.
        assert!(check(&[policy("nothing", Action::Allow, vec![])], &CLIENT).is_err());
    }

    #[test]
    fn principals_ports_and_negations() {
        let rule = Rule {
            from: vec![Source {
                principals: vec![p("spiffe://cluster.local/ns/demo/*")],
                not_principals: vec![p("*/sa/client")],
                ..Source::default()
            }],
            to: vec![Operation {
                ports: vec![8080, 9090],
                ..Operation::default()
            }],
        };
        let ps = [policy("p", Action::Deny, vec![rule])];
        assert!(
            check(&ps, &CLIENT).is_ok(),
            "client is excluded by notPrincipals"
        );
        let other = Connection {
            principal: Some("spiffe://cluster.local/ns/demo/sa/other"),
            ..CLIENT
        };
        assert!(check(&ps, &other).is_err());
        assert!(check(
            &ps,
            &Connection {
                port: 7000,
                ..other
            }
        )
        .is_ok());
    }

    #[test]
    fn what_a_node_proxy_cannot_see_errs_on_the_safe_side() {
        let http = Rule {
            from: vec![],
            to: vec![Operation {
                paths: vec![p("/admin*")],
                ..Operation::default()
            }],
        };
        // DENY with HTTP conditions denies at L4; ALLOW with them does not allow.
        assert!(check(&[policy("d", Action::Deny, vec![http.clone()])], &CLIENT).is_err());
        assert!(check(&[policy("a", Action::Allow, vec![http])], &CLIENT).is_err());
        // Plaintext is from no one: principals match it neither in ALLOW nor in DENY.
        let principals = Rule {
            from: vec![Source {
                principals: vec![p("*")],
                ..Source::default()
            }],
            to: vec![],
        };
        assert!(check(
            &[policy("a", Action::Allow, vec![principals.clone()])],
            &PLAINTEXT
        )
        .is_err());
        assert!(check(&[policy("d", Action::Deny, vec![principals])], &PLAINTEXT).is_ok());
        // "Not from" is unknown: notPrincipals denies it in DENY (the way to refuse
        // plaintext) and does not allow it in ALLOW.
        let not_any = Rule {
            from: vec![Source {
                not_principals: vec![p("*")],
                ..Source::default()
            }],
            to: vec![],
        };
        assert_eq!(
            check(&[policy("d", Action::Deny, vec![not_any])], &PLAINTEXT),
            Err(Denied::DenyPolicy(ObjectName::new("demo", "d")))
        );
        let not_legacy = Rule {
            from: vec![Source {
                not_namespaces: vec![p("legacy")],
                ..Source::default()
            }],
            to: vec![],
        };
        assert!(check(&[policy("a", Action::Allow, vec![not_legacy])], &PLAINTEXT).is_err());
    }

    #[derive(Debug)]
    struct Req(
        &'static str,
        &'static str,
        &'static [(&'static str, &'static str)],
    );

    impl Request for Req {
        fn path(&self) -> &str {
            self.0
        }
        fn method(&self) -> &str {
            self.1
        }
        fn header(&self, name: &str) -> Option<&str> {
            self.2.iter().find(|(n, _)| *n == name).map(|(_, v)| *v)
        }
    }

    #[test]
    fn a_waypoint_decides_on_paths_methods_and_headers() {
        let rule = Rule {
            from: vec![],
            to: vec![Operation {
                paths: vec![p("/admin*")],
                methods: vec!["POST".into()],
                headers: vec![("x-team".into(), vec![p("ops")])],
                ..Operation::default()
            }],
        };
        let deny = [policy("no-admin-posts", Action::Deny, vec![rule])];
        let at = |req: &'static Req| Connection {
            http: Http::Request(req),
            ..CLIENT
        };
        static HIT: Req = Req("/admin/users", "POST", &[("x-team", "ops")]);
        static GET: Req = Req("/admin/users", "GET", &[("x-team", "ops")]);
        static OTHER_PATH: Req = Req("/shop", "POST", &[("x-team", "ops")]);
        static NO_HEADER: Req = Req("/admin", "POST", &[]);
        assert_eq!(
            check(&deny, &at(&HIT)),
            Err(Denied::DenyPolicy(ObjectName::new(
                "demo",
                "no-admin-posts"
            )))
        );
        for req in [&GET, &OTHER_PATH, &NO_HEADER] {
            assert!(check(&deny, &at(req)).is_ok(), "{req:?}");
        }
        // Behind the waypoint the node-proxy takes the HTTP conditions as checked: a DENY
        // on a path no longer refuses the whole connection, and an ALLOW on one lets it in.
        let behind = Connection {
            http: Http::CheckedByWaypoint,
            ..CLIENT
        };
        assert!(check(&deny, &behind).is_ok());
        let allow_get = Rule {
            from: vec![],
            to: vec![Operation {
                methods: vec!["GET".into()],
                ..Operation::default()
            }],
        };
        let allow = [policy("reads", Action::Allow, vec![allow_get])];
        assert!(check(&allow, &behind).is_ok());
        assert!(check(&allow, &CLIENT).is_err(), "unseen HTTP allows less");
        assert!(check(&allow, &at(&GET)).is_ok());
        assert!(check(&allow, &at(&HIT)).is_err());
    }
}
