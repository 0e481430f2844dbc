//! Weft's policies: AuthorizationPolicy (L4 at node-proxies, L7 at waypoints) and
//! TrafficPolicy (for waypoints).

use std::collections::BTreeSet;
use std::str::FromStr;

use api::{
    Action, AuthorizationPolicy, ObjectName, Operation, Pattern, Resource, Rule, Scope, Source,
};

use super::selector::Selector;
use super::workloads::Pods;
use super::{accepted_status, Audience, Entry, Report, Translation};
use crate::crd::{self, PolicyAction, PolicyOperation, PolicyRule, PolicySource};
use crate::objects::{Effect, ObjectKind, Objects};

/// Istio writes principals without the scheme (`cluster.local/ns/a/sa/b`); Weft
/// accepts that and means the SPIFFE ID.
fn principal(text: &str) -> String {
    if text.starts_with("spiffe://") || text.starts_with('*') {
        text.to_owned()
    } else {
        format!("spiffe://{text}")
    }
}

fn patterns(
    field: &str,
    values: &[String],
    map: fn(&str) -> String,
) -> Result<Vec<Pattern>, (String, String)> {
    values
        .iter()
        .enumerate()
        .map(|(i, v)| Pattern::parse(&map(v)).map_err(|e| (format!("{field}[{i}]"), e)))
        .collect()
}

fn same(text: &str) -> String {
    text.to_owned()
}

fn ports(field: &str, values: &[u16]) -> Result<Vec<u16>, (String, String)> {
    match values.iter().position(|p| *p == 0) {
        Some(i) => Err((
            format!("{field}[{i}]"),
            "0 is not a port; use 1 to 65535".into(),
        )),
        None => Ok(values.to_vec()),
    }
}

fn methods(field: &str, values: &[String]) -> Result<Vec<String>, (String, String)> {
    for (i, m) in values.iter().enumerate() {
        if m.is_empty() || !m.bytes().all(|b| b.is_ascii_uppercase()) {
            return Err((
                format!("{field}[{i}]"),
                format!("{m:?} is not an HTTP method; write it in capitals, like GET"),
            ));
        }
    }
    Ok(values.to_vec())
}

fn source(at: &str, s: &PolicySource) -> Result<Source, (String, String)> {
    Ok(Source {
        principals: patterns(&format!("{at}.principals"), &s.principals, principal)?,
        not_principals: patterns(&format!("{at}.notPrincipals"), &s.not_principals, principal)?,
        namespaces: patterns(&format!("{at}.namespaces"), &s.namespaces, same)?,
        not_namespaces: patterns(&format!("{at}.notNamespaces"), &s.not_namespaces, same)?,
    })
}

fn operation(at: &str, o: &PolicyOperation) -> Result<Operation, (String, String)> {
    let mut headers = Vec::new();
    for (name, values) in &o.headers {
        if name.is_empty() || values.is_empty() {
            return Err((
                format!("{at}.headers"),
                "every header needs a name and at least one value".into(),
            ));
        }
        headers.push((
            name.to_ascii_lowercase(),
            patterns(&format!("{at}.headers[{name}]"), values, same)?,
        ));
    }
    Ok(Operation {
        ports: ports(&format!("{at}.ports"), &o.ports)?,
        not_ports: ports(&format!("{at}.notPorts"), &o.not_ports)?,
        paths: patterns(&format!("{at}.paths"), &o.paths, same)?,
        not_paths: patterns(&format!("{at}.notPaths"), &o.not_paths, same)?,
        methods: methods(&format!("{at}.methods"), &o.methods)?,
        not_methods: methods(&format!("{at}.notMethods"), &o.not_methods)?,
        headers,
    })
}

fn rule(i: usize, r: &PolicyRule) -> Result<Rule, (String, String)> {
    Ok(Rule {
        from: r
            .from
            .iter()
            .enumerate()
            .map(|(j, s)| source(&format!("spec.rules[{i}].from[{j}]"), s))
            .collect::<Result<_, _>>()?,
        to: r
            .to
            .iter()
            .enumerate()
            .map(|(j, o)| operation(&format!("spec.rules[{i}].to[{j}]"), o))
            .collect::<Result<_, _>>()?,
    })
}

pub(super) fn authorization(objects: &Objects, pods: &mut Pods<'_>, out: &mut Translation) {
    for (name, obj) in &objects.authorization_policies {
        let policy = &obj.value;
        let first = out.problems.len();
        let mut report = Report::new(
            ObjectKind::AuthorizationPolicy,
            name,
            &obj.origin,
            &mut out.problems,
        );
        let action = match policy.spec.action {
            PolicyAction::Allow => Action::Allow,
            PolicyAction::Deny => Action::Deny,
        };
        let selector = match policy.spec.selector.as_ref().map(Selector::parse) {
            None => None,
            Some(Ok(s)) if s.is_empty() => None,
            Some(Ok(s)) => Some(s),
            Some(Err((field, why))) => {
                report.reject(
                    format!("spec.selector.{field}"),
                    format!("{why}; the policy is not applied until it is fixed"),
                );
                out.statuses.push(accepted_status(
                    ObjectKind::AuthorizationPolicy,
                    name,
                    policy.metadata.generation,
                    &out.problems,
                    first,
                ));
                continue;
            }
        };
        let mut rules = Vec::new();
        for (i, r) in policy.spec.rules.iter().enumerate() {
            match rule(i, r) {
                Ok(rule) => rules.push(rule),
                // Fail closed: a DENY rule nobody can read denies everything, an ALLOW
                // rule nobody can read allows nothing.
                Err((field, why)) => {
                    let effect = match action {
                        Action::Deny => {
                            rules.push(Rule::default());
                            "this rule denies every connection until it is fixed"
                        }
                        Action::Allow => "this rule allows nothing until it is fixed",
                    };
                    report.add(
                        field,
                        format!("{why}; {effect}"),
                        Effect::FailedClosed,
                        "Invalid",
                    );
                }
            }
        }
        let scope = match selector {
            None => Scope::NamespaceWide,
            Some(_) => Scope::Selector,
        };
        let mut nodes = BTreeSet::new();
        for pod in pods.in_namespace(&name.namespace) {
            if !pod.workload.enrolled {
                continue;
            }
            match &selector {
                None => {}
                Some(s) if s.matches(pod.labels) => {
                    pod.workload.authorization_policies.push(name.clone())
                }
                Some(_) => continue,
            }
            nodes.insert(pod.workload.node.clone());
        }
        let resource = Resource::AuthorizationPolicy(AuthorizationPolicy {
            namespace: name.namespace.clone(),
            name: name.name.clone(),
            scope,
            action,
            rules,
        });
        out.entries.insert(
            resource.key(),
            Entry {
                resource,
                audience: Audience::Nodes(nodes),
            },
        );
        out.statuses.push(accepted_status(
            ObjectKind::AuthorizationPolicy,
            name,
            policy.metadata.generation,
            &out.problems,
            first,
        ));
    }
}

fn duration_ms(field: &str, text: &str) -> Result<u32, (String, String)> {
    let d = gateway_api::Duration::from_str(text).map_err(|e| {
        (
            field.to_owned(),
            format!("{text:?} is not a duration like 500ms or 30s: {e}"),
        )
    })?;
    u32::try_from(d.as_millis()).map_err(|_| (field.to_owned(), format!("{text:?} is too long")))
}

fn percent_ppm(field: &str, percent: f64) -> Result<u32, (String, String)> {
    if !(0.0..=100.0).contains(&percent) {
        return Err((
            field.to_owned(),
            format!("{percent} is not a percentage from 0 to 100"),
        ));
    }
    Ok((percent * 10_000.0).round() as u32)
}

fn traffic_policy(
    name: &ObjectName,
    spec: &crd::TrafficPolicySpec,
) -> Result<api::proto::TrafficPolicy, (String, String)> {
    use api::proto;
    let t = &spec.target_ref;
    if !(t.group.is_empty() || t.group == "core") || t.kind != "Service" {
        return Err((
            "spec.targetRef".into(),
            format!(
                "targets {}/{}; a TrafficPolicy targets a Service (group \"\", kind Service)",
                t.group, t.kind
            ),
        ));
    }
    let mut out = proto::TrafficPolicy {
        namespace: name.namespace.clone(),
        name: name.name.clone(),
        service: ObjectName::new(&name.namespace, &t.name).to_string(),
        ..Default::default()
    };
    if let Some(lb) = &spec.load_balancer {
        out.load_balancer = match lb.type_ {
            crd::LoadBalancerType::P2C => proto::LoadBalancer::P2cEwma,
            crd::LoadBalancerType::RoundRobin => proto::LoadBalancer::RoundRobin,
        } as i32;
    }
    if let Some(o) = &spec.outlier_detection {
        let max = o.max_ejection_percent.unwrap_or(50);
        if max > 100 {
            return Err((
                "spec.outlierDetection.maxEjectionPercent".into(),
                format!("{max} is more than 100"),
            ));
        }
        out.outlier_detection = Some(proto::OutlierDetection {
            consecutive_5xx: o.consecutive5xx.unwrap_or(5),
            consecutive_connect_failures: o.consecutive_connect_failures.unwrap_or(5),
            base_ejection_ms: match &o.base_ejection_time {
                Some(t) => duration_ms("spec.outlierDetection.baseEjectionTime", t)?,
                None => 30_000,
            },
            max_ejection_percent: max,
        });
    }
    if let Some(c) = &spec.connection_pool {
        for (field, v) in [
            ("maxConnections", c.max_connections),
            ("maxPendingRequests", c.max_pending_requests),
        ] {
            if v == Some(0) {
                return Err((
                    format!("spec.connectionPool.{field}"),
                    "0 would refuse every request; leave it out for no limit".into(),
                ));
            }
        }
        out.limits = Some(proto::ConnectionLimits {
            max_connections: c.max_connections.unwrap_or(0),
            max_pending_requests: c.max_pending_requests.unwrap_or(0),
        });
    }
    if let Some(f) = &spec.fault {
        let mut fault = proto::Fault::default();
        if let Some(d) = &f.delay {
            fault.delay_ppm = percent_ppm("spec.fault.delay.percent", d.percent)?;
            fault.delay_ms = duration_ms("spec.fault.delay.fixedDelay", &d.fixed_delay)?;
        }
        if let Some(a) = &f.abort {
            fault.abort_ppm = percent_ppm("spec.fault.abort.percent", a.percent)?;
            if !(200..=599).contains(&a.http_status) {
                return Err((
                    "spec.fault.abort.httpStatus".into(),
                    format!("{} is not an HTTP status from 200 to 599", a.http_status),
                ));
            }
            fault.abort_status = a.http_status.into();
        }
        out.fault = Some(fault);
    }
    if let Some(r) = &spec.rate_limit {
        if r.requests_per_second == 0 {
            return Err((
                "spec.rateLimit.requestsPerSecond".into(),
                "0 would refuse every request".into(),
            ));
        }
        if r.burst == Some(0) {
            return Err((
                "spec.rateLimit.burst".into(),
                "0 would refuse every request; leave it out for a burst of requestsPerSecond"
                    .into(),
            ));
        }
        out.rate_limit = Some(proto::RateLimit {
            burst: r.burst.unwrap_or(r.requests_per_second),
            per_second: r.requests_per_second,
        });
    }
    if let Some(b) = &spec.retry_budget {
        if let Some(p) = b.percent.filter(|p| *p > 100) {
            return Err((
                "spec.retryBudget.percent".into(),
                format!("{p} is not a percentage from 0 to 100"),
            ));
        }
        out.retry_budget = Some(proto::RetryBudget {
            percent: b.percent.unwrap_or(20),
            min_per_second: b.min_retries_per_second.unwrap_or(10),
        });
    }
    Ok(out)
}

pub(super) fn traffic(objects: &Objects, out: &mut Translation) {
    for (name, obj) in &objects.traffic_policies {
        let policy = &obj.value;
        let first = out.problems.len();
        let mut report = Report::new(
            ObjectKind::TrafficPolicy,
            name,
            &obj.origin,
            &mut out.problems,
        );
        match traffic_policy(name, &policy.spec) {
            Err((field, why)) => report.reject(
                field,
                format!("{why}; the service keeps its defaults until it is fixed"),
            ),
            Ok(tp) => {
                let target = ObjectName::new(&name.namespace, &policy.spec.target_ref.name);
                if objects.services.contains_key(&target) {
                    let resource = Resource::TrafficPolicy(tp);
                    out.entries.insert(
                        resource.key(),
                        Entry {
                            resource,
                            audience: Audience::Waypoints,
                        },
                    );
                } else {
                    report.add(
                        "spec.targetRef.name",
                        format!("there is no Service {target}"),
                        Effect::Rejected,
                        "TargetNotFound",
                    );
                }
            }
        }
        out.statuses.push(accepted_status(
            ObjectKind::TrafficPolicy,
            name,
            policy.metadata.generation,
            &out.problems,
            first,
        ));
    }
}
