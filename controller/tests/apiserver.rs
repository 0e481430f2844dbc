//! Weft's CRDs make the API server refuse what the controller would refuse: the golden
//! inputs' Weft resources are checked as an API server checks them (schema, unknown
//! fields, CEL rules, `crdcheck`), and every one the controller rejects for a reason the
//! object alone shows is refused there, at the field the controller names; every one it
//! accepts, and every Weft resource the project ships or documents, is stored.

#![allow(clippy::unwrap_used)] // a test fails by panicking

use std::path::{Path, PathBuf};

use crdcheck::Crds;
use serde::Deserialize;
use serde_json::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The YAML documents of `text`, as JSON.
fn documents(text: &str) -> Vec<Value> {
    serde_yaml_ng::Deserializer::from_str(text)
        .map(|d| Value::deserialize(d).unwrap())
        .filter(|v| !v.is_null())
        .collect()
}

fn weft_crds() -> Crds {
    let text = std::fs::read_to_string(repo().join("deploy/crds/weft.dev.yaml")).unwrap();
    Crds::new(&documents(&text)).unwrap()
}

fn name(object: &Value) -> String {
    format!(
        "{} {}/{}",
        object["kind"].as_str().unwrap_or(""),
        object["metadata"]["namespace"].as_str().unwrap_or(""),
        object["metadata"]["name"].as_str().unwrap_or("")
    )
}

/// Rejections that depend on other objects (a Service that does not exist): the API
/// server cannot see them.
const NOT_THE_OBJECTS_FAULT: &[&str] = &["TrafficPolicy demo/no-target"];

#[test]
fn the_api_server_refuses_the_weft_resources_the_controller_rejects() {
    let crds = weft_crds();
    let mut refused = 0;
    for golden in ["authorization", "traffic"] {
        let dir = repo().join("controller/tests/golden").join(golden);
        let input = std::fs::read_to_string(dir.join("input.yaml")).unwrap();
        let expected = std::fs::read_to_string(dir.join("expected.out")).unwrap();
        // "input.yaml:65: AuthorizationPolicy demo/bad-selector: spec.selector...: why"
        let problems: Vec<(String, String)> = expected
            .split("# problems\n")
            .nth(1)
            .unwrap_or("")
            .lines()
            .take_while(|l| !l.starts_with('#'))
            .filter_map(|l| {
                let mut parts = l.splitn(4, ": ");
                let (_, object, field) = (parts.next()?, parts.next()?, parts.next()?);
                Some((object.to_owned(), field.to_owned()))
            })
            .collect();
        for object in documents(&input) {
            let Some(violations) = crds.check(&object) else {
                continue;
            };
            let who = name(&object);
            let rejected = problems.iter().find(|(o, _)| *o == who);
            match rejected {
                Some((_, field)) if !NOT_THE_OBJECTS_FAULT.contains(&who.as_str()) => {
                    assert!(
                        violations.iter().any(|v| v.field.starts_with(field.as_str())),
                        "{who}: the controller rejects {field}; the API server must refuse it there, \
                         but says {violations:?}"
                    );
                    refused += 1;
                }
                _ => assert!(
                    violations.is_empty(),
                    "{who}: the controller accepts it; the API server must too: {violations:?}"
                ),
            }
        }
    }
    assert!(
        refused >= 10,
        "the goldens hold invalid objects of each kind"
    );
}

/// Every `weft.dev` object in the examples, the test manifests and the docs' YAML blocks.
#[test]
fn every_weft_resource_shipped_or_documented_is_accepted() {
    let crds = weft_crds();
    let mut checked = 0;
    for (path, block) in shipped_yaml() {
        if !block.contains("weft.dev/v1alpha1") {
            continue;
        }
        for object in documents(&block) {
            if let Some(violations) = crds.check(&object) {
                assert!(
                    violations.is_empty(),
                    "{}: {}: {violations:?}",
                    path.display(),
                    name(&object)
                );
                checked += 1;
            }
        }
    }
    assert!(checked >= 5, "found the shipped resources ({checked})");
}

/// The Gateway API objects the project ships or shows (examples, test manifests, docs).
fn shipped_gateway_api_objects() -> Vec<(PathBuf, Value)> {
    let mut out = Vec::new();
    for (path, block) in shipped_yaml() {
        if !block.contains("gateway.networking.k8s.io/") {
            continue;
        }
        for object in documents(&block) {
            let group = object["apiVersion"].as_str().unwrap_or("");
            if group.starts_with("gateway.networking.k8s.io/") {
                out.push((path.clone(), object));
            }
        }
    }
    out
}

/// Every YAML file (and every `yaml` block of the docs) under examples/, tests/manifests/
/// and docs/, with where it is.
fn shipped_yaml() -> Vec<(PathBuf, String)> {
    let mut files: Vec<PathBuf> = Vec::new();
    for dir in ["examples", "tests/manifests", "docs"] {
        let mut stack = vec![repo().join(dir)];
        while let Some(d) = stack.pop() {
            for entry in std::fs::read_dir(&d).unwrap().flatten() {
                let path = entry.path();
                if path.is_dir() {
                    stack.push(path);
                } else if matches!(
                    path.extension().and_then(|e| e.to_str()),
                    Some("yaml" | "yml" | "md")
                ) {
                    files.push(path);
                }
            }
        }
    }
    files.sort();
    let mut out = Vec::new();
    for path in files {
        let text = std::fs::read_to_string(&path).unwrap();
        match path.extension().and_then(|e| e.to_str()) {
            Some("md") => out.extend(
                text.split("```yaml\n")
                    .skip(1)
                    .filter_map(|b| b.split("```").next())
                    .map(|b| (path.clone(), b.to_owned())),
            ),
            _ => out.push((path, text)),
        }
    }
    out
}

fn gateway_api_crds(release: &str, channel: &str) -> Crds {
    let dir = repo()
        .join("../shared/gateway-api")
        .join(release)
        .join(channel);
    let mut docs = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap().flatten() {
        docs.extend(documents(&std::fs::read_to_string(entry.path()).unwrap()));
    }
    Crds::new(&docs).unwrap()
}

const RELEASES: &[&str] = &["v1.2.1", "v1.4.1", "v1.5.1", "v1.6.1"];

/// Every Gateway API object the project ships or shows, against the CRDs of each release
/// from v1.2.1 on (`../shared/gateway-api`), defaults applied and strict about unknown
/// fields, CEL rules included: the experimental channel takes all of them; the standard
/// channel refuses exactly those using route retries, which only the experimental
/// channel has, and the install guide says so.
#[test]
fn shipped_gateway_api_objects_pass_every_release_and_need_experimental_only_for_retries() {
    let objects = shipped_gateway_api_objects();
    assert!(
        objects.len() >= 10,
        "found the shipped objects ({})",
        objects.len()
    );
    let mut need_experimental = std::collections::BTreeSet::new();
    for release in RELEASES {
        let experimental = gateway_api_crds(release, "experimental");
        let standard = gateway_api_crds(release, "standard");
        for (path, object) in &objects {
            let at = format!("{} {} ({release})", path.display(), name(object));
            let v = experimental
                .check(object)
                .unwrap_or_else(|| panic!("{at}: no CRD"));
            assert!(v.is_empty(), "{at}, experimental channel: {v:?}");
            let v = standard
                .check(object)
                .unwrap_or_else(|| panic!("{at}: no CRD"));
            if !v.is_empty() {
                assert!(
                    v.iter()
                        .all(|v| v.message.contains("'retry' was unexpected")),
                    "{at}, standard channel: refused for more than retries: {v:?}"
                );
                need_experimental.insert(name(object));
            }
        }
    }
    assert!(
        need_experimental.contains("HTTPRoute demo/echo-canary"),
        "the demo's canary retries: {need_experimental:?}"
    );
    let install = std::fs::read_to_string(repo().join("docs/install.md")).unwrap();
    assert!(
        install.contains("experimental channel") && install.contains("`retry`"),
        "docs/install.md says which features need the experimental channel"
    );
}

/// A deliberately invalid object of each Gateway API kind Weft reads is refused, naming
/// the field, by every release.
#[test]
fn invalid_gateway_api_objects_are_refused_at_their_field() {
    let cases = [
        (
            "apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: no-port, namespace: shop}
spec:
  parentRefs: [{group: \"\", kind: Service, name: echo}]
  rules: [{backendRefs: [{name: echo}]}]
",
            "spec.rules[0].backendRefs[0]",
        ),
        (
            "apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: bad-match, namespace: shop}
spec:
  parentRefs: [{group: \"\", kind: Service, name: echo}]
  rules: [{matches: [{path: {type: Glob, value: /x}}], backendRefs: [{name: echo, port: 80}]}]
",
            "spec.rules[0].matches[0].path.type",
        ),
        (
            "apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: typo, namespace: shop}
spec:
  parentRefs: [{group: \"\", kind: Service, name: echo}]
  rules: [{backendRefs: [{name: echo, port: 80, wieght: 3}]}]
",
            "spec.rules[0].backendRefs[0]",
        ),
        (
            "apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: wp, namespace: shop}
spec:
  gatewayClassName: weft-waypoint
  listeners: [{name: mesh, port: 0, protocol: HBONE}]
",
            "spec.listeners[0].port",
        ),
        (
            "apiVersion: gateway.networking.k8s.io/v1beta1
kind: ReferenceGrant
metadata: {name: grant, namespace: shop}
spec:
  from: [{group: gateway.networking.k8s.io, kind: HTTPRoute}]
  to: [{group: \"\", kind: Service}]
",
            "spec.from[0]",
        ),
    ];
    for release in RELEASES {
        let crds = gateway_api_crds(release, "standard");
        for (text, field) in &cases {
            let object = &documents(text)[0];
            let v = crds.check(object).expect("a Gateway API kind");
            assert!(
                v.iter().any(|v| v.field.starts_with(field)),
                "{release}: {} must be refused at {field}: {v:?}",
                name(object)
            );
        }
    }
}

/// WaypointParameters: what the controller refuses (the Gateway is then not accepted,
/// naming the field) the API server refuses at the same field, by schema or CEL rule;
/// what one takes the other takes.
#[test]
fn waypoint_parameters_are_refused_alike_by_the_api_server_and_the_controller() {
    let crds = weft_crds();
    let object = |spec: Value| {
        serde_json::json!({"apiVersion": "weft.dev/v1alpha1", "kind": "WaypointParameters",
            "metadata": {"name": "p", "namespace": "shop"}, "spec": spec})
    };
    let cases = [
        (serde_json::json!({"replicas": 3}), None),
        (serde_json::json!({"autoscaling": {"maxReplicas": 5}}), None),
        (
            serde_json::json!({"autoscaling": {"minReplicas": 3, "maxReplicas": 3, "targetCPUUtilizationPercentage": 60}}),
            None,
        ),
        (
            serde_json::json!({"replicas": 2, "autoscaling": {"maxReplicas": 5}}),
            Some("spec"),
        ),
        (
            serde_json::json!({"autoscaling": {"minReplicas": 6, "maxReplicas": 5}}),
            Some("spec.autoscaling"),
        ),
        (
            serde_json::json!({"autoscaling": {"maxReplicas": 0}}),
            Some("spec.autoscaling.maxReplicas"),
        ),
        (
            serde_json::json!({"autoscaling": {"maxReplicas": 4, "targetCPUUtilizationPercentage": 150}}),
            Some("spec.autoscaling.targetCPUUtilizationPercentage"),
        ),
        (serde_json::json!({"replicas": 0}), Some("spec.replicas")),
    ];
    for (spec, refused_at) in cases {
        let v = crds.check(&object(spec.clone())).expect("a Weft kind");
        let parsed: controller::crd::WaypointParametersSpec =
            serde_json::from_value(spec.clone()).unwrap();
        let controller = controller::waypoints::check_parameters(&parsed);
        match refused_at {
            None => {
                assert!(v.is_empty(), "{spec}: {v:?}");
                assert_eq!(controller, Ok(()), "{spec}");
            }
            Some(field) => {
                assert!(
                    v.iter().any(|v| v.field.starts_with(field)),
                    "{spec}: the API server refuses it at {field}: {v:?}"
                );
                let why = controller.expect_err("the controller refuses it too");
                assert!(why.starts_with(field), "{spec}: {why}");
            }
        }
    }
}

/// The admission policy rendered beside the controller's RBAC lets the controller write
/// a waypoint's objects and the roots ConfigMap, and nothing else those grants reach:
/// evaluated as the API server evaluates it (match conditions, then validations, CEL).
#[test]
fn the_controllers_cluster_wide_writes_are_limited_to_waypoints() {
    let (policy, binding) = controller::install::controller_writes_policy("weft-system");
    let policy = serde_json::to_value(&policy).unwrap();
    assert_eq!(
        serde_json::to_value(&binding).unwrap()["spec"]["policyName"],
        policy["metadata"]["name"]
    );
    let controller = "system:serviceaccount:weft-system:weft-controller";
    let plural = |kind: &str| match kind {
        "ServiceAccount" => "serviceaccounts",
        "ConfigMap" => "configmaps",
        "Deployment" => "deployments",
        "Service" => "services",
        "PodDisruptionBudget" => "poddisruptionbudgets",
        "HorizontalPodAutoscaler" => "horizontalpodautoscalers",
        other => panic!("{other}"),
    };
    let request = |user: &str, operation: &str, object: &Value| {
        serde_json::json!({
            "operation": operation,
            "userInfo": {"username": user},
            "resource": {"resource": plural(object["kind"].as_str().unwrap())},
            "namespace": object["metadata"]["namespace"],
            "name": object["metadata"]["name"],
        })
    };
    let verdict = |user: &str, operation: &str, object: &Value, old: &Value| {
        // A delete has no new object: the request names the old one.
        let named = if object.is_null() { old } else { object };
        crdcheck::admission(&policy, object, old, &request(user, operation, named)).unwrap()
    };
    // Every kind a waypoint has is matched by the policy.
    let matched: Vec<String> = policy["spec"]["matchConstraints"]["resourceRules"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| r["resources"].as_array().unwrap().clone())
        .map(|r| r.as_str().unwrap().to_owned())
        .collect();
    let gateway: gateway_api::gateways::Gateway = serde_json::from_value(serde_json::json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
        "metadata": {"name": "wp", "namespace": "shop", "uid": "u-1"},
        "spec": {"gatewayClassName": "weft-waypoint", "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]}}))
    .unwrap();
    let settings = controller::waypoints::Settings {
        image: "weft:test".into(),
        controller: "weft-controller.weft-system.svc:15012".into(),
        controller_name: "weft-controller.weft-system.svc".into(),
        trust_domain: "cluster.local".into(),
        roots_pem: "ROOTS".into(),
    };
    // Autoscaled, so that its HorizontalPodAutoscaler is among them.
    let autoscaled: controller::crd::WaypointParametersSpec =
        serde_json::from_value(serde_json::json!({"autoscaling": {"maxReplicas": 4}})).unwrap();
    let all = controller::waypoints::desired_with(&gateway, Some(&autoscaled), &settings).unwrap();
    assert!(all.iter().any(|(k, _)| *k == "HorizontalPodAutoscaler"));
    for (kind, object) in all {
        assert!(
            matched.iter().any(|m| m == plural(kind)),
            "{kind} is matched"
        );
        assert_eq!(
            verdict(controller, "CREATE", &object, &Value::Null),
            None,
            "{kind} created"
        );
        assert_eq!(
            verdict(controller, "UPDATE", &object, &object),
            None,
            "{kind} updated"
        );
        // It deletes only an autoscaler a waypoint no longer wants.
        let deleted = verdict(controller, "DELETE", &Value::Null, &object);
        assert_eq!(
            deleted.is_none(),
            kind == "HorizontalPodAutoscaler",
            "{kind} deleted: {deleted:?}"
        );
        if kind == "HorizontalPodAutoscaler" {
            let mut theirs = object.clone();
            theirs["metadata"]["ownerReferences"] = serde_json::json!([]);
            assert!(
                verdict(controller, "DELETE", &Value::Null, &theirs).is_some(),
                "an autoscaler the Gateway does not control is not deleted"
            );
        }
    }
    // The roots ConfigMap in Weft's namespace.
    let roots = serde_json::json!({"apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "weft-root-ca", "namespace": "weft-system"}, "data": {"root.pem": "x"}});
    assert_eq!(verdict(controller, "CREATE", &roots, &Value::Null), None);
    // What the grants would otherwise reach: another team's Deployment, another
    // ConfigMap, a Service taken over by adding the labels and owner.
    let coredns = serde_json::json!({"apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "coredns", "namespace": "kube-system"}, "spec": {}});
    let denied = verdict(controller, "UPDATE", &coredns, &coredns).expect("denied");
    assert!(
        denied.contains("not UPDATE of deployments kube-system/coredns"),
        "{denied}"
    );
    let other = serde_json::json!({"apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "app-config", "namespace": "shop"}, "data": {}});
    assert!(verdict(controller, "UPDATE", &other, &other).is_some());
    let objects = controller::waypoints::desired(&gateway, &settings).unwrap();
    let service = &objects.iter().find(|(k, _)| *k == "Service").unwrap().1;
    let theirs = serde_json::json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "wp", "namespace": "shop"}, "spec": {}});
    assert!(
        verdict(controller, "UPDATE", service, &theirs).is_some(),
        "an object the Gateway did not control before is not taken over"
    );
    // Another implementation's Gateway objects (its label, no part-of weft), an object
    // owned by a Gateway of another name, a Deployment running as another service
    // account, anything in kube-system: refused, even with a forged owner.
    let deployment = objects
        .iter()
        .find(|(k, _)| *k == "Deployment")
        .unwrap()
        .1
        .clone();
    let mut theirs = deployment.clone();
    theirs["metadata"]["labels"]["app.kubernetes.io/part-of"] = Value::from("istio");
    assert!(
        verdict(controller, "UPDATE", &theirs, &theirs).is_some(),
        "another implementation's"
    );
    let mut renamed = deployment.clone();
    renamed["metadata"]["ownerReferences"][0]["name"] = Value::from("other-gateway");
    assert!(
        verdict(controller, "CREATE", &renamed, &Value::Null).is_some(),
        "owner of another name"
    );
    let mut escalated = deployment.clone();
    escalated["spec"]["template"]["spec"]["serviceAccountName"] = Value::from("cluster-admin-sa");
    assert!(
        verdict(controller, "CREATE", &escalated, &Value::Null).is_some(),
        "another service account"
    );
    let mut system = deployment.clone();
    system["metadata"]["namespace"] = Value::from("kube-system");
    assert!(
        verdict(controller, "CREATE", &system, &Value::Null).is_some(),
        "kube-system"
    );
    // A waypoint object whose labels someone removed is still repaired.
    let mut unlabelled = deployment.clone();
    unlabelled["metadata"]["labels"] = serde_json::json!({});
    assert_eq!(
        verdict(controller, "UPDATE", &deployment, &unlabelled),
        None,
        "repaired"
    );
    // Anyone else is not this policy's business.
    assert_eq!(verdict("alice", "UPDATE", &coredns, &coredns), None);
}
