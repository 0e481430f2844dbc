//! Weft's own custom resources (group `weft.dev`, version `v1alpha1`), defined once here
//! with their schema; `weft-controller crds` prints the CustomResourceDefinitions that
//! `deploy/crds/` holds, and a test keeps the two in sync.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A pattern value of a policy: exact, `prefix*`, `*suffix` or `*`.
const PATTERN: &str = r"^(\*|\*?[^*]+|[^*]+\*)$";
/// A duration as Gateway API writes them (GEP-2257): `500ms`, `30s`, `1h30m`.
const DURATION: &str = r"^([0-9]{1,5}(h|m|s|ms)){1,4}$";
/// An HTTP method, in capitals.
const METHOD: &str = r"^[A-Z]+$";

/// A label selector whose expressions the API server checks as the controller does:
/// the operator is one of the four, and In/NotIn come with values, the others without.
fn selector_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
    let mut schema = <Option<LabelSelector> as JsonSchema>::json_schema(generator);
    if let Some(items) = schema
        .as_object_mut()
        .and_then(|s| s.get_mut("properties"))
        .and_then(|p| p.get_mut("matchExpressions"))
        .and_then(|m| m.get_mut("items"))
        .and_then(|i| i.as_object_mut())
    {
        if let Some(op) = items
            .get_mut("properties")
            .and_then(|p| p.get_mut("operator"))
            .and_then(|o| o.as_object_mut())
        {
            op.insert(
                "enum".into(),
                serde_json::json!(["In", "NotIn", "Exists", "DoesNotExist"]),
            );
        }
        items.insert(
            "x-kubernetes-validations".into(),
            serde_json::json!([{
                "rule": "self.operator == 'In' || self.operator == 'NotIn' ? \
                         has(self.values) && size(self.values) > 0 : \
                         !has(self.values) || size(self.values) == 0",
                "message": "In and NotIn need values; Exists and DoesNotExist take none",
            }]),
        );
    }
    schema
}

/// Who may connect to the workloads a policy selects.
///
/// DENY policies win over ALLOW policies; a workload without ALLOW policies accepts
/// every connection no DENY policy matches; a workload with ALLOW policies accepts
/// only connections one of them matches. Enforced by the destination's node-proxy
/// (principals, namespaces, ports) and by waypoints (also paths, methods, headers).
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "weft.dev",
    version = "v1alpha1",
    kind = "AuthorizationPolicy",
    plural = "authorizationpolicies",
    shortname = "wauthz",
    namespaced,
    status = "PolicyStatus",
    printcolumn = r#"{"name":"Action","type":"string","jsonPath":".spec.action"}"#,
    printcolumn = r#"{"name":"Accepted","type":"string","jsonPath":".status.conditions[?(@.type==\"Accepted\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthorizationPolicySpec {
    /// The pods of the policy's namespace it applies to; absent: all of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "selector_schema")]
    pub selector: Option<LabelSelector>,
    /// `ALLOW` (default) or `DENY`.
    #[serde(default)]
    pub action: PolicyAction,
    /// The policy matches a connection that matches any rule. An ALLOW policy without
    /// rules allows nothing; `rules: [{}]` matches everything.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<PolicyRule>,
}

/// ALLOW or DENY.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum PolicyAction {
    /// Allow what the rules match.
    #[default]
    #[serde(rename = "ALLOW")]
    Allow,
    /// Deny what the rules match.
    #[serde(rename = "DENY")]
    Deny,
}

/// Matches a connection when it matches any of `from` (or `from` is empty) and any of
/// `to` (or `to` is empty).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PolicyRule {
    /// Sources; each matches when all its non-empty fields do.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from: Vec<PolicySource>,
    /// Operations; each matches when all its non-empty fields do.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to: Vec<PolicyOperation>,
}

/// Who the connection comes from. Values are patterns: `*`, `prefix*`, `*suffix` or
/// exact. Principals are SPIFFE IDs (`spiffe://cluster.local/ns/<ns>/sa/<sa>`); they
/// and namespaces are only known for mTLS connections.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PolicySource {
    /// The peer's identity is one of these.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(inner(regex(pattern = PATTERN)))]
    pub principals: Vec<String>,
    /// The peer's identity is none of these.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(inner(regex(pattern = PATTERN)))]
    pub not_principals: Vec<String>,
    /// The peer's namespace is one of these.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(inner(regex(pattern = PATTERN)))]
    pub namespaces: Vec<String>,
    /// The peer's namespace is none of these.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(inner(regex(pattern = PATTERN)))]
    pub not_namespaces: Vec<String>,
}

/// What the connection is for. Ports are the workload's own (container) ports; the
/// HTTP fields are enforced by waypoints only (a node-proxy treats them as matching in
/// a DENY policy and as not matching in an ALLOW policy).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PolicyOperation {
    /// The destination port is one of these.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(inner(range(min = 1)))]
    pub ports: Vec<u16>,
    /// The destination port is none of these.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(inner(range(min = 1)))]
    pub not_ports: Vec<u16>,
    /// HTTP request paths (patterns).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(inner(regex(pattern = PATTERN)))]
    pub paths: Vec<String>,
    /// HTTP request paths excluded (patterns).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(inner(regex(pattern = PATTERN)))]
    pub not_paths: Vec<String>,
    /// HTTP methods (`GET`, `POST`, ...).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(inner(regex(pattern = METHOD)))]
    pub methods: Vec<String>,
    /// HTTP methods excluded.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(inner(regex(pattern = METHOD)))]
    pub not_methods: Vec<String>,
    /// HTTP request headers: each named header must match one of its values
    /// (patterns).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, Vec<String>>,
}

/// The status Weft writes on its resources: an `Accepted` condition saying whether the
/// controller could use the object, and why not.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PolicyStatus {
    /// Conditions, of the same shape as Gateway API's.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// How a waypoint sends traffic to the endpoints of one Service: load balancing,
/// outlier detection, circuit breaking, fault injection, rate limiting and the retry
/// budget. Applied by the waypoint of the service.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "weft.dev",
    version = "v1alpha1",
    kind = "TrafficPolicy",
    plural = "trafficpolicies",
    shortname = "wtp",
    namespaced,
    status = "PolicyStatus",
    printcolumn = r#"{"name":"Target","type":"string","jsonPath":".spec.targetRef.name"}"#,
    printcolumn = r#"{"name":"Accepted","type":"string","jsonPath":".status.conditions[?(@.type==\"Accepted\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TrafficPolicySpec {
    /// The Service in the policy's namespace it tunes.
    pub target_ref: TargetRef,
    /// How requests are spread over endpoints.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_balancer: Option<LoadBalancerSpec>,
    /// Ejecting endpoints that keep failing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<OutlierDetectionSpec>,
    /// Circuit breaking: limits on connections and queued requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_pool: Option<ConnectionPoolSpec>,
    /// Fault injection: delay or abort a share of requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault: Option<FaultSpec>,
    /// Local rate limiting (token bucket; excess answered 429).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimitSpec>,
    /// How many retries routes may add on top of requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_budget: Option<RetryBudgetSpec>,
}

/// A reference to a Service.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TargetRef {
    /// `""` (core).
    #[serde(default)]
    #[schemars(extend("enum" = ["", "core"]))]
    pub group: String,
    /// `Service`.
    #[serde(default = "service_kind")]
    #[schemars(extend("enum" = ["Service"]))]
    pub kind: String,
    /// The Service's name.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

fn service_kind() -> String {
    "Service".into()
}

/// Load balancing.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LoadBalancerSpec {
    /// `P2C` (power of two choices over least outstanding requests with a latency
    /// EWMA; the default) or `RoundRobin`.
    #[serde(rename = "type", default)]
    pub type_: LoadBalancerType,
}

/// Load-balancing algorithms.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum LoadBalancerType {
    /// Power of two choices, least outstanding requests, latency EWMA.
    #[default]
    P2C,
    /// Round robin.
    RoundRobin,
}

/// Outlier detection.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OutlierDetectionSpec {
    /// Consecutive 5xx answers that eject an endpoint (default 5).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consecutive5xx: Option<u32>,
    /// Consecutive connect failures that eject an endpoint (default 5).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consecutive_connect_failures: Option<u32>,
    /// First ejection's length; each further ejection lasts longer (default `30s`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION))]
    pub base_ejection_time: Option<String>,
    /// Never eject more than this share of endpoints, in percent (default 50).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 100))]
    pub max_ejection_percent: Option<u32>,
}

/// Circuit breaking.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConnectionPoolSpec {
    /// Connections to the service's endpoints at once (per waypoint).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_connections: Option<u32>,
    /// Requests waiting for a connection; more are answered 503.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_pending_requests: Option<u32>,
}

/// Fault injection.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FaultSpec {
    /// Delay a share of requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay: Option<DelayFault>,
    /// Answer a share of requests with an error status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abort: Option<AbortFault>,
}

/// A delay.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DelayFault {
    /// Share of requests delayed, 0 to 100.
    #[schemars(range(min = 0, max = 100))]
    pub percent: f64,
    /// How long, e.g. `200ms`.
    #[schemars(regex(pattern = DURATION))]
    pub fixed_delay: String,
}

/// An abort.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AbortFault {
    /// Share of requests aborted, 0 to 100.
    #[schemars(range(min = 0, max = 100))]
    pub percent: f64,
    /// The status they are answered with, 200 to 599.
    #[schemars(range(min = 200, max = 599))]
    pub http_status: u16,
}

/// Local rate limiting.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RateLimitSpec {
    /// Sustained requests per second (per waypoint).
    #[schemars(range(min = 1))]
    pub requests_per_second: u32,
    /// Requests allowed in a burst above the rate (default: one second's worth).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub burst: Option<u32>,
}

/// Retry budget.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RetryBudgetSpec {
    /// Retries allowed as a percentage of requests (default 20).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 100))]
    pub percent: Option<u32>,
    /// Retries always allowed per second, whatever the share (default 10).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_retries_per_second: Option<u32>,
}

/// Settings of the waypoints of the Gateways whose `spec.infrastructure.parametersRef`
/// names it (group `weft.dev`, kind `WaypointParameters`, in the Gateway's namespace).
/// What it leaves out keeps its default.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "weft.dev",
    version = "v1alpha1",
    kind = "WaypointParameters",
    plural = "waypointparameters",
    shortname = "wwp",
    namespaced,
    printcolumn = r#"{"name":"Replicas","type":"integer","jsonPath":".spec.replicas"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "!(has(self.replicas) && has(self.autoscaling))",
    "message": "replicas and autoscaling exclude each other: a fixed count, or a HorizontalPodAutoscaler's",
}]))]
pub struct WaypointParametersSpec {
    /// Waypoint pods (default 2). The PodDisruptionBudget keeps one available. Not with
    /// `autoscaling`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100))]
    pub replicas: Option<i32>,
    /// Scale the waypoint by its CPU use with a HorizontalPodAutoscaler the controller
    /// creates (named after the Gateway), instead of a fixed `replicas`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<AutoscalingSpec>,
    /// What the waypoint container requests (default: `cpu: 100m`, `memory: 64Mi`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests: Option<ResourceAmounts>,
    /// Its limits (default: `memory: 1Gi`, no CPU limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<ResourceAmounts>,
}

/// The bounds and target of a waypoint's HorizontalPodAutoscaler.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "!has(self.minReplicas) || self.minReplicas <= self.maxReplicas",
    "message": "minReplicas is above maxReplicas",
}]))]
pub struct AutoscalingSpec {
    /// The fewest pods (default 2, or `maxReplicas` if that is lower).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100))]
    pub min_replicas: Option<i32>,
    /// The most pods.
    #[schemars(range(min = 1, max = 100))]
    pub max_replicas: i32,
    /// The average CPU use, as a percentage of the pods' CPU request (`requests.cpu`),
    /// the autoscaler keeps them at (default 80).
    #[serde(
        default,
        rename = "targetCPUUtilizationPercentage",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(range(min = 1, max = 100))]
    pub target_cpu_utilization_percentage: Option<i32>,
}

/// CPU and memory, as Kubernetes quantities (`250m`, `128Mi`).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ResourceAmounts {
    /// CPU, e.g. `250m` or `1`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = QUANTITY))]
    pub cpu: Option<String>,
    /// Memory, e.g. `128Mi` or `1Gi`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = QUANTITY))]
    pub memory: Option<String>,
}

/// A Kubernetes quantity, as its API accepts one.
const QUANTITY: &str = r"^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$";

/// The CustomResourceDefinitions, as `deploy/crds/` holds them (one YAML stream).
pub fn crds_yaml() -> Result<String, serde_yaml_ng::Error> {
    use kube::CustomResourceExt;
    let mut out = String::from(
        "# Generated by `weft-controller crds` from controller/src/crd.rs; do not edit.\n",
    );
    for crd in [
        AuthorizationPolicy::crd(),
        TrafficPolicy::crd(),
        WaypointParameters::crd(),
    ] {
        out.push_str("---\n");
        out.push_str(&serde_yaml_ng::to_string(&crd)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `deploy/crds/weft.dev.yaml` is what the types above generate.
    #[test]
    fn deploy_crds_are_in_sync() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/crds/weft.dev.yaml");
        let committed = std::fs::read_to_string(path).unwrap_or_default();
        let generated = crds_yaml().expect("the CRDs serialize");
        assert!(
            committed == generated,
            "deploy/crds/weft.dev.yaml is out of date with controller/src/crd.rs; regenerate it:\n  \
             cargo run -p weft-controller -- crds > deploy/crds/weft.dev.yaml"
        );
    }

    #[test]
    fn policy_yaml_reads() {
        let yaml = r#"
apiVersion: weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: deny-legacy, namespace: demo}
spec:
  selector: {matchLabels: {app: echo}}
  action: DENY
  rules:
    - from: [{namespaces: [legacy]}]
      to: [{ports: [8080]}]
"#;
        let p: AuthorizationPolicy = serde_yaml_ng::from_str(yaml).expect("parses");
        assert_eq!(p.spec.action, PolicyAction::Deny);
        assert_eq!(p.spec.rules[0].from[0].namespaces, ["legacy"]);
        assert_eq!(p.spec.rules[0].to[0].ports, [8080]);
    }
}
