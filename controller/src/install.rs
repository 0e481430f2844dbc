//! What `weftctl install` renders: every object of an installation, built as typed
//! Kubernetes objects from one place, so the manifests in `deploy/weft.yaml`, the
//! command and its tests cannot drift apart. The RBAC rules live here beside the
//! controller's code that needs them (`controller/tests/kubernetes.rs` checks they are
//! exactly what that code calls).
//!
//! ```text
//!  Options ──> objects() ──> [Namespace, CRDs, ServiceAccounts, RBAC, Service,
//!                             controller Deployment, node agent DaemonSet,
//!                             node-proxy DaemonSet, GatewayClass]
//!                   └──> yaml()            (install: kubectl apply -f -)
//!                   └──> uninstall_yaml()  (the same objects, reversed, names only)
//! ```

use std::collections::BTreeMap;

use gateway_api::gatewayclasses::{GatewayClass, GatewayClassSpec};
use k8s_openapi::api::admissionregistration::v1::{
    ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding,
};
use k8s_openapi::api::apps::v1::{
    DaemonSet, DaemonSetSpec, DaemonSetUpdateStrategy, Deployment, DeploymentSpec,
    RollingUpdateDaemonSet,
};
use k8s_openapi::api::core::v1::{
    Affinity, Capabilities, ConfigMapVolumeSource, Container, ContainerPort, EnvVar, EnvVarSource,
    HTTPGetAction, HostPathVolumeSource, Namespace, ObjectFieldSelector, PodAffinityTerm,
    PodAntiAffinity, PodSecurityContext, PodSpec, PodTemplateSpec, Probe, ProjectedVolumeSource,
    ResourceQuota, ResourceQuotaSpec, ResourceRequirements, SELinuxOptions, ScopeSelector,
    ScopedResourceSelectorRequirement, SeccompProfile, SecurityContext, Service, ServiceAccount,
    ServiceAccountTokenProjection, ServicePort, ServiceSpec, Toleration, Volume, VolumeMount,
    VolumeProjection, WeightedPodAffinityTerm,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::api::rbac::v1::{
    ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding, RoleRef, Subject,
};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::ObjectMeta;
use kube::CustomResourceExt;
use serde::Serialize;

use crate::crd::{AuthorizationPolicy, TrafficPolicy, WaypointParameters};
use crate::kubernetes::{ROOTS_CONFIGMAP, ROOTS_KEY, ROOT_SECRET};
use crate::translate::{CONTROLLER_NAME, WAYPOINT_CLASS};

/// The controller's name: its ServiceAccount, RBAC, Deployment and Service.
pub const CONTROLLER: &str = "weft-controller";
/// The node-proxy's name: its ServiceAccount and DaemonSet.
pub const NODE_PROXY: &str = "weft-node-proxy";
/// The node agent's name: its ServiceAccount, RBAC and DaemonSet.
pub const NODE_AGENT: &str = "weft-node-agent";
/// GKE's quota for `system-node-critical` pods in Weft's namespace.
const NODE_CRITICAL_QUOTA: &str = "weft-node-critical-pods";
/// The node agent's admin port (loopback of the node: `/ready`, `/metrics`, `/pods`).
pub const NODE_AGENT_ADMIN_PORT: i32 = 15022;
/// The audience of node-proxies' projected tokens (the controller checks it).
pub const TOKEN_AUDIENCE: &str = "weft-controller";
/// The controller's gRPC port (model and certificates) and admin port (metrics).
pub const GRPC_PORT: i32 = 15012;
/// The controller's admin port.
pub const ADMIN_PORT: i32 = 15014;
/// node-proxy's admin port, on its pod IP (metrics, `/ready`, `/healthz`).
pub const NODE_PROXY_ADMIN_PORT: i32 = 15000;
/// node-proxy's `emptyDir`, which outlives its container's restarts (`--pod-dir`).
const POD_DIR: &str = "/var/lib/weft/pod";
/// Where node-proxies' projected token is mounted.
pub const TOKEN_DIR: &str = "/var/run/secrets/weft";
/// Where node-proxies mount the published roots. Not under `/var/run`, which is
/// `/run` in the image, where the handoff directory is a hostPath.
pub const ROOTS_DIR: &str = "/etc/weft/roots";
/// The host directory of the node's sockets (node-proxy's handoff socket, the node
/// agent's socket the CNI plugin asks on).
pub const HANDOFF_DIR: &str = "/run/weft";
/// The host directory the node agent publishes its state in for `weft-cni` (the
/// enrolled namespaces): kept across a reboot, unlike `/run`, and mounted at the same
/// path, since the plugin on the node reads the path the agent writes into the chain.
pub const STATE_DIR: &str = "/var/lib/weft";
/// Where the node agent's container sees the node's CNI plugin directory.
const CNI_BIN_MOUNT: &str = "/host/cni/bin";
/// Where the node agent's container sees the node's CNI configuration directory.
const CNI_CONF_MOUNT: &str = "/host/cni/net.d";
/// The oldest Kubernetes release Weft supports: CRD validation rules (CEL) and
/// ValidatingAdmissionPolicy (which limits the controller's writes) are GA from it, and
/// every rendered object is checked against its API schemas.
pub const OLDEST_KUBERNETES: &str = "1.30";

/// Controller replicas: every one serves the model and signs certificates; the one
/// holding the Lease writes status, events and waypoints.
pub const CONTROLLER_REPLICAS: i32 = 2;

/// The platforms `--platform` knows: where each one's container runtime looks for CNI
/// plugins and configuration, and what else it needs of Weft's node pods.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Platform {
    /// Any conformant cluster with the usual CNI directories.
    #[default]
    Generic,
    /// Google Kubernetes Engine.
    Gke,
    /// Amazon Elastic Kubernetes Service.
    Eks,
    /// Azure Kubernetes Service.
    Aks,
    /// k3s (and k3d).
    K3s,
    /// RKE2.
    Rke2,
    /// MicroK8s.
    Microk8s,
    /// OpenShift.
    Openshift,
    /// kind.
    Kind,
}

impl Platform {
    /// Every platform, in the order `--help` lists them.
    pub const ALL: [Platform; 9] = [
        Platform::Generic,
        Platform::Gke,
        Platform::Eks,
        Platform::Aks,
        Platform::K3s,
        Platform::Rke2,
        Platform::Microk8s,
        Platform::Openshift,
        Platform::Kind,
    ];

    /// Its `--platform` value.
    pub fn name(self) -> &'static str {
        match self {
            Platform::Generic => "generic",
            Platform::Gke => "gke",
            Platform::Eks => "eks",
            Platform::Aks => "aks",
            Platform::K3s => "k3s",
            Platform::Rke2 => "rke2",
            Platform::Microk8s => "microk8s",
            Platform::Openshift => "openshift",
            Platform::Kind => "kind",
        }
    }

    /// Where the node's container runtime looks for CNI plugins.
    pub fn cni_bin_dir(self) -> &'static str {
        match self {
            Platform::Gke => "/home/kubernetes/bin",
            Platform::K3s => "/var/lib/rancher/k3s/data/current/bin",
            Platform::Microk8s => "/var/snap/microk8s/current/opt/cni/bin",
            Platform::Openshift => "/var/lib/cni/bin",
            _ => "/opt/cni/bin",
        }
    }

    /// Where the node's container runtime reads its CNI configuration.
    pub fn cni_conf_dir(self) -> &'static str {
        match self {
            Platform::K3s => "/var/lib/rancher/k3s/agent/etc/cni/net.d",
            Platform::Microk8s => "/var/snap/microk8s/current/args/cni-network",
            Platform::Openshift => "/etc/kubernetes/cni/net.d",
            _ => "/etc/cni/net.d",
        }
    }

    /// Its nodes run SELinux enforcing by default: the node pods run as `spc_t`, the
    /// type of privileged containers, to write the CNI directories and enter pods'
    /// namespaces.
    fn selinux(self) -> bool {
        matches!(self, Platform::Openshift | Platform::Rke2)
    }
}

impl std::str::FromStr for Platform {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Platform::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Platform::ALL.iter().map(|p| p.name()).collect();
                format!("not a platform; one of {}", names.join(", "))
            })
    }
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What `weftctl install` takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// The namespace Weft runs in.
    pub namespace: String,
    /// The SPIFFE trust domain.
    pub trust_domain: String,
    /// The image holding every binary (see the Dockerfile).
    pub image: String,
    /// The log filter of every component (`info`, `debug`, `weft=debug,info`, ...).
    pub log_level: String,
    /// The platform: its CNI directories and what else its nodes need.
    pub platform: Platform,
    /// The node's CNI plugin directory, when not the platform's.
    pub cni_bin_dir: Option<String>,
    /// The node's CNI configuration directory, when not the platform's.
    pub cni_conf_dir: Option<String>,
}

/// The image `weftctl install` uses unless told otherwise: Weft's own, at this release.
pub const DEFAULT_IMAGE: &str = concat!("registry.weft.dev/weft:", env!("CARGO_PKG_VERSION"));

impl Default for Options {
    fn default() -> Self {
        Options {
            namespace: "weft-system".into(),
            trust_domain: "cluster.local".into(),
            image: DEFAULT_IMAGE.into(),
            log_level: "info".into(),
            platform: Platform::Generic,
            cni_bin_dir: None,
            cni_conf_dir: None,
        }
    }
}

/// Why the options cannot be rendered.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OptionsError {
    /// A value Kubernetes or the mesh would refuse.
    #[error("--{flag} {value:?}: {reason}")]
    Invalid {
        /// The flag.
        flag: &'static str,
        /// What was given.
        value: String,
        /// Why it is refused.
        reason: &'static str,
    },
}

impl Options {
    /// Refuses values that would render objects the API server or the mesh refuses.
    pub fn validate(&self) -> Result<(), OptionsError> {
        let invalid = |flag, value: &str, reason| {
            Err(OptionsError::Invalid {
                flag,
                value: value.to_owned(),
                reason,
            })
        };
        if tunnel::identity::check_dns_label(&self.namespace).is_err() {
            return invalid(
                "namespace",
                &self.namespace,
                "not a namespace name (lower-case letters, digits and '-', at most 63)",
            );
        }
        let td_ok = !self.trust_domain.is_empty()
            && self.trust_domain.split('.').all(|l| {
                !l.is_empty()
                    && l.bytes().all(|b| {
                        b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_'
                    })
            });
        if !td_ok {
            return invalid(
                "trust-domain",
                &self.trust_domain,
                "not a SPIFFE trust domain (dot-separated lower-case letters, digits, '-', '_')",
            );
        }
        if let Err(reason) = image_reference(&self.image) {
            return invalid("image", &self.image, reason);
        }
        for (flag, dir) in [
            ("cni-bin-dir", &self.cni_bin_dir),
            ("cni-conf-dir", &self.cni_conf_dir),
        ] {
            if let Some(dir) = dir {
                let clean = dir.starts_with('/')
                    && !dir.chars().any(|c| c.is_whitespace() || c.is_control())
                    && !dir.split('/').any(|part| part == "..");
                if !clean {
                    return invalid(flag, dir, "not an absolute path on the node (no '..')");
                }
            }
        }
        if self.log_level.is_empty() || self.log_level.chars().any(char::is_whitespace) {
            return invalid(
                "log-level",
                &self.log_level,
                "not a log filter (info, debug, weft=debug,info, ...)",
            );
        }
        Ok(())
    }

    /// The controller's name in its serving certificate and in node-proxies' flags.
    pub fn controller_host(&self) -> String {
        format!("{CONTROLLER}.{}.svc", self.namespace)
    }

    /// The node's CNI plugin directory.
    pub fn cni_bin_dir(&self) -> &str {
        self.cni_bin_dir
            .as_deref()
            .unwrap_or(self.platform.cni_bin_dir())
    }

    /// The node's CNI configuration directory.
    pub fn cni_conf_dir(&self) -> &str {
        self.cni_conf_dir
            .as_deref()
            .unwrap_or(self.platform.cni_conf_dir())
    }
}

/// Checks an image reference as the container runtime parses it (the distribution
/// grammar): `[host[:port]/]path[:tag][@algorithm:hex]`, path components lower-case, and
/// a tag or a digest (without either the runtime pulls `latest`, which names no release).
pub fn image_reference(image: &str) -> Result<(), &'static str> {
    let (name, digest) = match image.split_once('@') {
        Some((name, digest)) => (name, Some(digest)),
        None => (image, None),
    };
    if let Some(digest) = digest {
        digest_ok(digest)
            .ok_or("the digest is not <algorithm>:<hex> (sha256: 64 lower-case hex digits)")?;
    }
    // The tag follows the last ':' after the last '/' (a ':' before it is a port).
    let last_slash = name.rfind('/').map_or(0, |i| i + 1);
    let (path, tag) = match name[last_slash..].rfind(':') {
        Some(i) => (&name[..last_slash + i], Some(&name[last_slash + i + 1..])),
        None => (name, None),
    };
    if let Some(tag) = tag {
        let tag_ok = !tag.is_empty()
            && tag.len() <= 128
            && tag.starts_with(|c: char| c.is_ascii_alphanumeric() || c == '_')
            && tag
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        if !tag_ok {
            return Err(
                "not an image reference: the tag has letters, digits, '.', '_', '-' (at most 128)",
            );
        }
    } else if digest.is_none() {
        return Err("no tag or digest: the runtime would pull `latest`; name the release (<repository>:<version>)");
    }
    if path.len() > 255 {
        return Err("not an image reference: the name is longer than 255 characters");
    }
    let mut parts: Vec<&str> = path.split('/').collect();
    // A first part with a '.', a ':' or an upper-case letter, or `localhost`, is the
    // registry.
    let first = parts[0];
    if parts.len() > 1
        && (first.contains(['.', ':'])
            || first == "localhost"
            || first.bytes().any(|b| b.is_ascii_uppercase()))
    {
        let host = parts.remove(0);
        let (hostname, port) = match host.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (host, None),
        };
        let host_ok = !hostname.is_empty()
            && hostname.split('.').all(|l| {
                !l.is_empty()
                    && !l.starts_with('-')
                    && !l.ends_with('-')
                    && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            })
            && port.is_none_or(|p| p.parse::<u16>().is_ok_and(|p| p != 0));
        if !host_ok {
            return Err("not an image reference: the registry is not host[:port]");
        }
    }
    if !parts.iter().all(|c| path_component_ok(c)) {
        return Err("not an image reference: the repository is lower-case letters and digits, joined by '.', '_', '__' or dashes, between '/'");
    }
    Ok(())
}

/// A repository path component: lower-case letters and digits, runs of them joined by
/// one '.', one '_', two '_' or any number of '-'.
fn path_component_ok(c: &str) -> bool {
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let bytes = c.as_bytes();
    if !bytes.first().is_some_and(|b| alnum(*b)) || !bytes.last().is_some_and(|b| alnum(*b)) {
        return false;
    }
    // Each maximal run of non-alphanumerics is a separator.
    c.split(|ch: char| ch.is_ascii_lowercase() || ch.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .all(|s| matches!(s, "." | "_" | "__") || s.bytes().all(|b| b == b'-'))
}

/// `algorithm:hex` as the distribution grammar has it; sha256 is 64 lower-case hex.
fn digest_ok(digest: &str) -> Option<()> {
    let (algorithm, hex) = digest.split_once(':')?;
    let algorithm_ok = algorithm.split(['+', '.', '_', '-']).all(|part| {
        !part.is_empty()
            && part
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    });
    let hex_ok = hex.len() >= 32 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    let length_ok = algorithm != "sha256" || hex.len() == 64;
    (algorithm_ok && hex_ok && length_ok).then_some(())
}

/// One object of an installation.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
#[allow(missing_docs)]
#[allow(clippy::large_enum_variant)] // a score of objects, rendered once per command
pub enum Object {
    Namespace(Namespace),
    CustomResourceDefinition(Box<CustomResourceDefinition>),
    ServiceAccount(ServiceAccount),
    ClusterRole(ClusterRole),
    ClusterRoleBinding(ClusterRoleBinding),
    Role(Role),
    RoleBinding(RoleBinding),
    Service(Service),
    Deployment(Box<Deployment>),
    DaemonSet(Box<DaemonSet>),
    GatewayClass(GatewayClass),
    ResourceQuota(ResourceQuota),
    PodDisruptionBudget(PodDisruptionBudget),
    ValidatingAdmissionPolicy(Box<ValidatingAdmissionPolicy>),
    ValidatingAdmissionPolicyBinding(ValidatingAdmissionPolicyBinding),
}

impl Object {
    /// The object's `kind`.
    pub fn kind(&self) -> &'static str {
        match self {
            Object::Namespace(_) => "Namespace",
            Object::CustomResourceDefinition(_) => "CustomResourceDefinition",
            Object::ServiceAccount(_) => "ServiceAccount",
            Object::ClusterRole(_) => "ClusterRole",
            Object::ClusterRoleBinding(_) => "ClusterRoleBinding",
            Object::Role(_) => "Role",
            Object::RoleBinding(_) => "RoleBinding",
            Object::Service(_) => "Service",
            Object::Deployment(_) => "Deployment",
            Object::DaemonSet(_) => "DaemonSet",
            Object::GatewayClass(_) => "GatewayClass",
            Object::ResourceQuota(_) => "ResourceQuota",
            Object::PodDisruptionBudget(_) => "PodDisruptionBudget",
            Object::ValidatingAdmissionPolicy(_) => "ValidatingAdmissionPolicy",
            Object::ValidatingAdmissionPolicyBinding(_) => "ValidatingAdmissionPolicyBinding",
        }
    }

    /// The object as JSON, with its `apiVersion` and `kind`.
    pub fn to_value(&self) -> serde_json::Value {
        serde_json::to_value(self).expect("Kubernetes objects serialize")
    }

    /// Parses a rendered object back into its type (by its `kind`).
    pub fn from_value(value: serde_json::Value) -> Result<Object, serde_json::Error> {
        use serde::de::Error as _;
        let kind = value
            .get("kind")
            .and_then(|k| k.as_str())
            .unwrap_or_default()
            .to_owned();
        let v = value;
        Ok(match kind.as_str() {
            "Namespace" => Object::Namespace(serde_json::from_value(v)?),
            "CustomResourceDefinition" => {
                Object::CustomResourceDefinition(Box::new(serde_json::from_value(v)?))
            }
            "ServiceAccount" => Object::ServiceAccount(serde_json::from_value(v)?),
            "ClusterRole" => Object::ClusterRole(serde_json::from_value(v)?),
            "ClusterRoleBinding" => Object::ClusterRoleBinding(serde_json::from_value(v)?),
            "Role" => Object::Role(serde_json::from_value(v)?),
            "RoleBinding" => Object::RoleBinding(serde_json::from_value(v)?),
            "Service" => Object::Service(serde_json::from_value(v)?),
            "Deployment" => Object::Deployment(Box::new(serde_json::from_value(v)?)),
            "DaemonSet" => Object::DaemonSet(Box::new(serde_json::from_value(v)?)),
            "GatewayClass" => Object::GatewayClass(serde_json::from_value(v)?),
            "ResourceQuota" => Object::ResourceQuota(serde_json::from_value(v)?),
            "PodDisruptionBudget" => Object::PodDisruptionBudget(serde_json::from_value(v)?),
            "ValidatingAdmissionPolicy" => {
                Object::ValidatingAdmissionPolicy(Box::new(serde_json::from_value(v)?))
            }
            "ValidatingAdmissionPolicyBinding" => {
                Object::ValidatingAdmissionPolicyBinding(serde_json::from_value(v)?)
            }
            other => return Err(serde_json::Error::custom(format!("unknown kind {other:?}"))),
        })
    }
}

fn labels(component: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_owned(), component.to_owned()),
        ("app.kubernetes.io/part-of".to_owned(), "weft".to_owned()),
        (
            "app.kubernetes.io/version".to_owned(),
            env!("CARGO_PKG_VERSION").to_owned(),
        ),
    ])
}

fn selector(component: &str) -> BTreeMap<String, String> {
    BTreeMap::from([("app.kubernetes.io/name".to_owned(), component.to_owned())])
}

fn meta(name: &str, namespace: Option<&str>, component: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_owned()),
        namespace: namespace.map(str::to_owned),
        labels: Some(labels(component)),
        ..Default::default()
    }
}

fn strings(items: &[&str]) -> Option<Vec<String>> {
    Some(items.iter().map(|s| (*s).to_owned()).collect())
}

fn rule(group: &str, resources: &[&str], verbs: &[&str]) -> PolicyRule {
    PolicyRule {
        api_groups: strings(&[group]),
        resources: strings(resources),
        verbs: verbs.iter().map(|s| (*s).to_owned()).collect(),
        ..Default::default()
    }
}

fn named_rule(group: &str, resources: &[&str], names: &[&str], verbs: &[&str]) -> PolicyRule {
    PolicyRule {
        resource_names: strings(names),
        ..rule(group, resources, verbs)
    }
}

/// The controller's cluster-wide rules: watch what it translates, write the status of
/// routes and Weft's policies, record events, review node-proxies' tokens, and apply each waypoint's
/// ServiceAccount, Deployment, Service and roots ConfigMap in its Gateway's namespace.
pub fn controller_cluster_rules() -> Vec<PolicyRule> {
    vec![
        rule("", &["namespaces", "services"], &["list", "watch"]),
        rule("", &["pods"], &["list", "watch"]),
        rule("discovery.k8s.io", &["endpointslices"], &["list", "watch"]),
        rule(
            "gateway.networking.k8s.io",
            &["gateways", "httproutes", "grpcroutes", "referencegrants"],
            &["list", "watch"],
        ),
        rule(
            "gateway.networking.k8s.io",
            &["httproutes/status", "grpcroutes/status", "gateways/status"],
            &["get", "patch"],
        ),
        // Its own GatewayClass's status, by name (cluster-scoped).
        named_rule(
            "gateway.networking.k8s.io",
            &["gatewayclasses/status"],
            &[WAYPOINT_CLASS],
            &["get", "patch"],
        ),
        rule(
            "weft.dev",
            &[
                "authorizationpolicies",
                "trafficpolicies",
                "waypointparameters",
            ],
            &["list", "watch"],
        ),
        rule(
            "weft.dev",
            &["authorizationpolicies/status", "trafficpolicies/status"],
            &["get", "patch"],
        ),
        rule("authentication.k8s.io", &["tokenreviews"], &["create"]),
        // Whether the caller of a debug view may read it.
        rule(
            "authorization.k8s.io",
            &["subjectaccessreviews"],
            &["create"],
        ),
        // Events on the objects it refuses and the waypoints it creates or repairs
        // (`patch` counts a repeat into the first event's series).
        rule("events.k8s.io", &["events"], &["create", "patch"]),
        // Each waypoint's objects, by server-side apply (which creates what is absent).
        rule(
            "",
            &["serviceaccounts", "services", "configmaps"],
            &["create", "patch"],
        ),
        rule("apps", &["deployments"], &["create", "patch"]),
        rule("policy", &["poddisruptionbudgets"], &["create", "patch"]),
        // An autoscaled waypoint's HorizontalPodAutoscaler, deleted when it is no
        // longer autoscaled.
        rule(
            "autoscaling",
            &["horizontalpodautoscalers"],
            &["create", "patch", "delete"],
        ),
        // ... and watched, to apply again what someone else deleted or changed (the
        // roots ConfigMaps by their name only); a Deployment read for the replica count
        // it hands over to an autoscaler.
        rule("", &["serviceaccounts"], &["list", "watch"]),
        rule("apps", &["deployments"], &["get", "list", "watch"]),
        rule("policy", &["poddisruptionbudgets"], &["list", "watch"]),
        rule(
            "autoscaling",
            &["horizontalpodautoscalers"],
            &["list", "watch"],
        ),
        named_rule("", &["configmaps"], &[ROOTS_CONFIGMAP], &["list", "watch"]),
    ]
}

/// The admission policy narrowing the controller's cluster-wide writes: RBAC grants
/// `create` and `patch` on ServiceAccounts, Services, ConfigMaps, Deployments,
/// PodDisruptionBudgets and HorizontalPodAutoscalers everywhere (a waypoint may be in
/// any namespace), and `delete` on the last; this policy lets the controller's service
/// account write only a waypoint's objects (named after their Gateway, labelled with it
/// and as Weft's, controlled by it, a Deployment running as the Gateway's service
/// account; before the write already controlled by it, so nothing is taken over) and the
/// roots ConfigMap `weft-root-ca`, in no system namespace, and delete only a waypoint's
/// HorizontalPodAutoscaler.
pub fn controller_writes_policy(
    ns: &str,
) -> (ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding) {
    use crate::waypoints::GATEWAY_NAME_LABEL;
    use k8s_openapi::api::admissionregistration::v1::{
        MatchCondition, MatchResources, NamedRuleWithOperations,
        ValidatingAdmissionPolicyBindingSpec, ValidatingAdmissionPolicySpec, Validation,
    };
    let name = format!("weft-controller-writes-{ns}");
    let rule = |group: &str, version: &str, resources: &[&str]| NamedRuleWithOperations {
        api_groups: strings(&[group]),
        api_versions: strings(&[version]),
        operations: strings(&["CREATE", "UPDATE", "DELETE"]),
        resources: strings(resources),
        ..Default::default()
    };
    // Controlled by the Gateway its name says (a waypoint's objects are named after
    // their Gateway).
    let controlled = |o: &str| {
        format!(
            "has({o}.metadata.ownerReferences) && {o}.metadata.ownerReferences.exists(r, \
             r.kind == 'Gateway' && r.apiVersion.startsWith('gateway.networking.k8s.io/') && \
             r.name == {o}.metadata.name && has(r.controller) && r.controller)"
        )
    };
    // Weft's waypoint object, as `waypoints::desired` makes it.
    let owned = |o: &str| {
        format!(
            "has({o}.metadata.labels) && '{GATEWAY_NAME_LABEL}' in {o}.metadata.labels && \
             {o}.metadata.labels['{GATEWAY_NAME_LABEL}'] == {o}.metadata.name && \
             'app.kubernetes.io/part-of' in {o}.metadata.labels && \
             {o}.metadata.labels['app.kubernetes.io/part-of'] == 'weft' && {} && \
             (request.resource.resource != 'deployments' || \
             {o}.spec.template.spec.serviceAccountName == {o}.metadata.name)",
            controlled(o)
        )
    };
    let policy = ValidatingAdmissionPolicy {
        metadata: meta(&name, None, CONTROLLER),
        spec: Some(ValidatingAdmissionPolicySpec {
            failure_policy: Some("Fail".into()),
            match_constraints: Some(MatchResources {
                resource_rules: Some(vec![
                    rule("", "v1", &["serviceaccounts", "services", "configmaps"]),
                    rule("apps", "v1", &["deployments"]),
                    rule("policy", "v1", &["poddisruptionbudgets"]),
                    rule("autoscaling", "v2", &["horizontalpodautoscalers"]),
                ]),
                ..Default::default()
            }),
            match_conditions: Some(vec![MatchCondition {
                name: "weft-controller".into(),
                expression: format!(
                    "request.userInfo.username == 'system:serviceaccount:{ns}:{CONTROLLER}'"
                ),
            }]),
            validations: Some(vec![Validation {
                expression: format!(
                    "!(request.namespace in ['kube-system', 'kube-public', 'kube-node-lease']) && \
                     (request.operation == 'DELETE' \
                     ? request.resource.resource == 'horizontalpodautoscalers' && {} \
                     : request.resource.resource == 'configmaps' \
                     ? object.metadata.name == '{ROOTS_CONFIGMAP}' \
                     : {} && (oldObject == null || {}))",
                    owned("oldObject"),
                    owned("object"),
                    controlled("oldObject")
                ),
                message_expression: Some(format!(
                    "'{CONTROLLER} writes only the objects of a waypoint (labelled {GATEWAY_NAME_LABEL} \
                     and controlled by its Gateway) and ConfigMaps {ROOTS_CONFIGMAP}, not ' + \
                     request.operation + ' of ' + request.resource.resource + ' ' + \
                     request.namespace + '/' + request.name"
                )),
                reason: Some("Forbidden".into()),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    };
    let binding = ValidatingAdmissionPolicyBinding {
        metadata: meta(&name, None, CONTROLLER),
        spec: ValidatingAdmissionPolicyBindingSpec {
            policy_name: name.clone(),
            validation_actions: vec!["Deny".into()],
            ..Default::default()
        },
    };
    (policy, binding)
}

/// The controller's rules in its own namespace: the root's Secret, the ConfigMap its
/// certificates are published in (`create` cannot be limited to a name), and the
/// node-proxy pod a token is bound to when the token names no node.
pub fn controller_namespace_rules() -> Vec<PolicyRule> {
    vec![
        // The Lease electing the replica that writes (`create` cannot be limited to
        // a name).
        named_rule(
            "coordination.k8s.io",
            &["leases"],
            &[crate::leader::LEASE_NAME],
            &["get", "update"],
        ),
        rule("coordination.k8s.io", &["leases"], &["create"]),
        rule("", &["pods"], &["get"]),
        named_rule("", &["secrets"], &[ROOT_SECRET], &["get"]),
        rule("", &["secrets"], &["create"]),
        named_rule("", &["configmaps"], &[ROOTS_CONFIGMAP], &["get", "update"]),
        rule("", &["configmaps"], &["create"]),
    ]
}

/// The node agent's cluster-wide rules: it watches the pods of its node (RBAC cannot
/// narrow a list to a field selector, so this reads every pod) and every namespace.
pub fn node_agent_cluster_rules() -> Vec<PolicyRule> {
    vec![rule("", &["namespaces", "pods"], &["list", "watch"])]
}

/// The node agent's rules in Weft's namespace: it reads its own DaemonSet when it stops,
/// to take Weft off its node only when Weft is being uninstalled.
pub fn node_agent_namespace_rules() -> Vec<PolicyRule> {
    // It watches its own DaemonSet (list and watch by `metadata.name`, which
    // `resourceNames` allows) to know, when stopped, whether Weft is being removed.
    vec![named_rule(
        "apps",
        &["daemonsets"],
        &[NODE_AGENT],
        &["get", "list", "watch"],
    )]
}

fn subject(name: &str, namespace: &str) -> Option<Vec<Subject>> {
    Some(vec![Subject {
        kind: "ServiceAccount".into(),
        name: name.into(),
        namespace: Some(namespace.into()),
        ..Default::default()
    }])
}

fn role_ref(kind: &str, name: &str) -> RoleRef {
    RoleRef {
        api_group: Some("rbac.authorization.k8s.io".into()),
        kind: kind.into(),
        name: name.into(),
    }
}

/// An environment variable with a value.
pub(crate) fn env(name: &str, value: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        ..Default::default()
    }
}

/// An environment variable from a field of the pod (the downward API).
pub(crate) fn field_env(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn mount(name: &str, path: &str, read_only: bool) -> VolumeMount {
    VolumeMount {
        name: name.into(),
        mount_path: path.into(),
        read_only: read_only.then_some(true),
        ..Default::default()
    }
}

fn host_path(name: &str, path: &str, type_: &str) -> Volume {
    Volume {
        name: name.into(),
        host_path: Some(HostPathVolumeSource {
            path: path.into(),
            type_: Some(type_.into()),
        }),
        ..Default::default()
    }
}

fn resources(cpu: &str, memory: &str, memory_limit: &str) -> Option<ResourceRequirements> {
    Some(ResourceRequirements {
        requests: Some(BTreeMap::from([
            ("cpu".to_owned(), Quantity(cpu.into())),
            ("memory".to_owned(), Quantity(memory.into())),
        ])),
        limits: Some(BTreeMap::from([(
            "memory".to_owned(),
            Quantity(memory_limit.into()),
        )])),
        ..Default::default()
    })
}

fn http_probe(path: &str, port: i32, host: Option<&str>) -> Option<Probe> {
    Some(Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::Int(port),
            host: host.map(str::to_owned),
            ..Default::default()
        }),
        period_seconds: Some(5),
        ..Default::default()
    })
}

/// The pod security of Weft's unprivileged pods (the controller, waypoints), as the
/// `restricted` Pod Security level asks: not root (the image's user, 65532, unless the
/// platform assigns one, as OpenShift does) and the runtime's default seccomp profile.
pub(crate) fn non_root() -> PodSecurityContext {
    PodSecurityContext {
        run_as_non_root: Some(true),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Schedules a pod on Linux nodes only: Weft's binaries are Linux ones, and a pod on a
/// Windows node would never start (and hold a DaemonSet's rollout).
pub(crate) fn linux_only() -> Option<BTreeMap<String, String>> {
    Some(BTreeMap::from([(
        "kubernetes.io/os".to_owned(),
        "linux".to_owned(),
    )]))
}

/// The security context of a node container running as root with `capabilities`:
/// privilege escalation stays allowed (the runtime refuses added `SYS_ADMIN` otherwise,
/// and Pod Security counts `SYS_ADMIN` as privileged anyway), and on SELinux platforms
/// the type of privileged containers, so it may write the node's CNI directories and
/// enter pods' namespaces.
fn node_security(platform: Platform, capabilities: &[&str]) -> SecurityContext {
    SecurityContext {
        run_as_user: Some(0),
        run_as_non_root: Some(false),
        allow_privilege_escalation: Some(true),
        read_only_root_filesystem: Some(true),
        capabilities: Some(Capabilities {
            add: strings(capabilities),
            drop: strings(&["ALL"]),
        }),
        se_linux_options: platform.selinux().then(|| SELinuxOptions {
            type_: Some("spc_t".into()),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The volume `token` holding a projected service-account token for the controller
/// (audience [`TOKEN_AUDIENCE`], an hour, rotated by the kubelet): how node-proxies and
/// waypoints authenticate.
pub(crate) fn token_volume() -> Volume {
    Volume {
        name: "token".into(),
        projected: Some(ProjectedVolumeSource {
            sources: Some(vec![VolumeProjection {
                service_account_token: Some(ServiceAccountTokenProjection {
                    audience: Some(TOKEN_AUDIENCE.into()),
                    expiration_seconds: Some(3600),
                    path: "token".into(),
                }),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn controller_deployment(o: &Options) -> Deployment {
    let ns = o.namespace.as_str();
    let container = Container {
        name: "controller".into(),
        image: Some(o.image.clone()),
        args: strings(&[
            "controller",
            "--namespace",
            ns,
            "--trust-domain",
            &o.trust_domain,
            "--server-name",
            &o.controller_host(),
            "--waypoint-image",
            &o.image,
        ]),
        env: Some(vec![env("RUST_LOG", &o.log_level)]),
        ports: Some(vec![
            ContainerPort {
                name: Some("grpc".into()),
                container_port: GRPC_PORT,
                ..Default::default()
            },
            ContainerPort {
                name: Some("admin".into()),
                container_port: ADMIN_PORT,
                ..Default::default()
            },
        ]),
        readiness_probe: http_probe("/ready", ADMIN_PORT, None),
        liveness_probe: http_probe("/healthz", ADMIN_PORT, None),
        resources: resources("100m", "128Mi", "1Gi"),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            capabilities: Some(Capabilities {
                drop: strings(&["ALL"]),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    Deployment {
        metadata: meta(CONTROLLER, Some(ns), CONTROLLER),
        spec: Some(DeploymentSpec {
            replicas: Some(CONTROLLER_REPLICAS),
            selector: LabelSelector {
                match_labels: Some(selector(CONTROLLER)),
                ..Default::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels(CONTROLLER)),
                    ..Default::default()
                }),
                spec: Some(PodSpec {
                    service_account_name: Some(CONTROLLER.into()),
                    security_context: Some(non_root()),
                    node_selector: linux_only(),
                    // Replicas on different nodes where there are several, so a node
                    // lost takes one of them at most.
                    affinity: Some(Affinity {
                        pod_anti_affinity: Some(PodAntiAffinity {
                            preferred_during_scheduling_ignored_during_execution: Some(vec![
                                WeightedPodAffinityTerm {
                                    weight: 100,
                                    pod_affinity_term: PodAffinityTerm {
                                        topology_key: "kubernetes.io/hostname".into(),
                                        label_selector: Some(LabelSelector {
                                            match_labels: Some(selector(CONTROLLER)),
                                            ..Default::default()
                                        }),
                                        ..Default::default()
                                    },
                                },
                            ]),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }),
                    containers: vec![container],
                    ..Default::default()
                }),
            },
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A DaemonSet of Weft's node side: on every Linux node (every taint tolerated),
/// node-critical, rolled `(max_surge, max_unavailable)`, on the host's network if
/// `host_network`; `pod` gives its containers, volumes and what else differs.
fn node_daemonset(
    name: &str,
    ns: &str,
    rollout: (i32, i32),
    host_network: bool,
    pod: PodSpec,
) -> DaemonSet {
    // What runs in a network namespace of its own is scraped on its pod IP.
    let annotations = (!host_network).then(|| {
        BTreeMap::from([
            ("prometheus.io/scrape".to_owned(), "true".to_owned()),
            (
                "prometheus.io/port".to_owned(),
                NODE_PROXY_ADMIN_PORT.to_string(),
            ),
            ("prometheus.io/path".to_owned(), "/metrics".to_owned()),
        ])
    });
    DaemonSet {
        metadata: meta(name, Some(ns), name),
        spec: Some(DaemonSetSpec {
            selector: LabelSelector {
                match_labels: Some(selector(name)),
                ..Default::default()
            },
            update_strategy: Some(DaemonSetUpdateStrategy {
                type_: Some("RollingUpdate".into()),
                rolling_update: Some(RollingUpdateDaemonSet {
                    max_surge: Some(IntOrString::Int(rollout.0)),
                    max_unavailable: Some(IntOrString::Int(rollout.1)),
                }),
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels(name)),
                    annotations,
                    ..Default::default()
                }),
                spec: Some(PodSpec {
                    service_account_name: Some(name.into()),
                    host_network: host_network.then_some(true),
                    dns_policy: host_network.then(|| "ClusterFirstWithHostNet".into()),
                    priority_class_name: Some("system-node-critical".into()),
                    termination_grace_period_seconds: Some(30),
                    node_selector: linux_only(),
                    tolerations: Some(vec![Toleration {
                        operator: Some("Exists".into()),
                        ..Default::default()
                    }]),
                    ..pod
                }),
            },
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn node_proxy_daemonset(o: &Options) -> DaemonSet {
    let ns = o.namespace.as_str();
    let controller = format!("{}:{GRPC_PORT}", o.controller_host());
    let node_proxy = Container {
        name: "node-proxy".into(),
        image: Some(o.image.clone()),
        // The node role's own binary: a quarter of weftctl's size, so the resident code
        // per node is the node-proxy's alone.
        command: strings(&["/usr/local/bin/node-proxy"]),
        args: strings(&[
            "--controller",
            &controller,
            "--controller-name",
            &o.controller_host(),
            "--trust-domain",
            &o.trust_domain,
            "--admin",
            &format!("0.0.0.0:{NODE_PROXY_ADMIN_PORT}"),
            "--pod-dir",
            POD_DIR,
        ]),
        ports: Some(vec![ContainerPort {
            name: Some("admin".into()),
            container_port: NODE_PROXY_ADMIN_PORT,
            ..Default::default()
        }]),
        env: Some(vec![
            field_env("WEFT_NODE", "spec.nodeName"),
            env("RUST_LOG", &o.log_level),
            env("WEFT_CONTROLLER_CA", &format!("{ROOTS_DIR}/{ROOTS_KEY}")),
            env("WEFT_TOKEN_FILE", &format!("{TOKEN_DIR}/token")),
        ]),
        // On its own pod IP: the kubelet probes this process, not the one it replaces.
        // Ready once it has a model and has taken the node over.
        readiness_probe: http_probe("/ready", NODE_PROXY_ADMIN_PORT, None),
        liveness_probe: http_probe("/healthz", NODE_PROXY_ADMIN_PORT, None),
        resources: resources("100m", "128Mi", "2Gi"),
        // Root with two capabilities: NET_ADMIN for sockets in pods' namespaces
        // (transparent, marked), SYS_ADMIN to enter those namespaces (setns).
        security_context: Some(node_security(o.platform, &["NET_ADMIN", "SYS_ADMIN"])),
        volume_mounts: Some(vec![
            mount("handoff", HANDOFF_DIR, false),
            mount("token", TOKEN_DIR, true),
            mount("roots", ROOTS_DIR, true),
            mount("pod", POD_DIR, false),
        ]),
        ..Default::default()
    };
    let token = token_volume();
    let roots = Volume {
        name: "roots".into(),
        config_map: Some(ConfigMapVolumeSource {
            name: ROOTS_CONFIGMAP.into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    node_daemonset(
        NODE_PROXY,
        ns,
        // The new node-proxy starts beside the old one and takes its listeners over
        // (docs/handoff.md), so a node is never without one.
        (1, 0),
        // A network namespace of its own: its probes and metrics are its own, on its pod
        // IP. It serves pods from listeners in their namespaces, handed over on the
        // handoff socket in the host's /run/weft.
        false,
        PodSpec {
            // It calls no Kubernetes API: its projected token (audience weft-controller)
            // is for the controller only, and the default one would be unused.
            automount_service_account_token: Some(false),
            containers: vec![node_proxy],
            volumes: Some(vec![
                host_path("handoff", HANDOFF_DIR, "DirectoryOrCreate"),
                token,
                roots,
                Volume {
                    name: "pod".into(),
                    empty_dir: Some(Default::default()),
                    ..Default::default()
                },
            ]),
            ..Default::default()
        },
    )
}

/// The node agent's DaemonSet: one agent per node, beside (not in) node-proxy's pod, so
/// it outlives node-proxy's restarts and upgrades. It runs in the node's network and PID
/// namespaces: it finds pods' processes under `/proc`, enters their network namespaces,
/// installs the node's probe exemption, and keeps `weft-cni` in the node's CNI chain.
/// It is never surged: two agents on one node would both act on its pods.
fn node_agent_daemonset(o: &Options) -> DaemonSet {
    let ns = o.namespace.as_str();
    let agent = Container {
        name: "node-agent".into(),
        image: Some(o.image.clone()),
        command: strings(&["/usr/local/bin/node-agent"]),
        args: strings(&[
            "--cni-bin-dir",
            CNI_BIN_MOUNT,
            "--cni-conf-dir",
            CNI_CONF_MOUNT,
            "--cni-plugin",
            "/usr/local/bin/weft-cni",
            "--state",
            &format!("{STATE_DIR}/node-agent.json"),
            "--until-removed",
            &format!("{ns}/{NODE_AGENT}"),
            // Weft's own pods (node-proxy's) never wait for the agent.
            "--exclude-namespaces",
            &format!("kube-system,{ns}"),
        ]),
        env: Some(vec![
            field_env("WEFT_NODE", "spec.nodeName"),
            env("RUST_LOG", &o.log_level),
        ]),
        readiness_probe: http_probe("/ready", NODE_AGENT_ADMIN_PORT, Some("127.0.0.1")),
        liveness_probe: http_probe("/healthz", NODE_AGENT_ADMIN_PORT, Some("127.0.0.1")),
        resources: resources("50m", "64Mi", "512Mi"),
        // Root with the capabilities of its job: SYS_ADMIN to enter pods' network
        // namespaces, SYS_PTRACE to open those of other users' processes, NET_ADMIN
        // for nftables and routes there and on the node; CHOWN, DAC_OVERRIDE and
        // FOWNER to write the node's CNI directories.
        security_context: Some(node_security(
            o.platform,
            &[
                "SYS_ADMIN",
                "SYS_PTRACE",
                "NET_ADMIN",
                "CHOWN",
                "DAC_OVERRIDE",
                "FOWNER",
            ],
        )),
        volume_mounts: Some(vec![
            mount("run", HANDOFF_DIR, false),
            mount("state", STATE_DIR, false),
            mount("cni-bin", CNI_BIN_MOUNT, false),
            mount("cni-conf", CNI_CONF_MOUNT, false),
        ]),
        ..Default::default()
    };
    node_daemonset(
        NODE_AGENT,
        ns,
        (0, 1),
        true,
        PodSpec {
            host_pid: Some(true),
            containers: vec![agent],
            volumes: Some(vec![
                host_path("run", HANDOFF_DIR, "DirectoryOrCreate"),
                host_path("state", STATE_DIR, "DirectoryOrCreate"),
                host_path("cni-bin", o.cni_bin_dir(), "DirectoryOrCreate"),
                host_path("cni-conf", o.cni_conf_dir(), "DirectoryOrCreate"),
            ]),
            ..Default::default()
        },
    )
}

/// Every object of an installation, in the order they are applied.
pub fn objects(o: &Options) -> Result<Vec<Object>, OptionsError> {
    o.validate()?;
    let ns = o.namespace.as_str();
    let mut crds = [
        AuthorizationPolicy::crd(),
        TrafficPolicy::crd(),
        WaypointParameters::crd(),
    ];
    for crd in &mut crds {
        crd.metadata.labels = Some(labels("weft-crds"));
    }
    // The node pods use the host's network, PIDs and paths: Pod Security `privileged`
    // (where the cluster's default is baseline or restricted, they would be refused).
    let mut ns_meta = meta(ns, None, "weft");
    let ns_labels = ns_meta.labels.get_or_insert_with(BTreeMap::new);
    for mode in ["enforce", "audit", "warn"] {
        ns_labels.insert(
            format!("pod-security.kubernetes.io/{mode}"),
            "privileged".into(),
        );
    }
    if o.platform == Platform::Openshift {
        // OpenShift rewrites Pod Security labels from the SCCs its pods may use, unless
        // told not to.
        ns_labels.insert(
            "security.openshift.io/scc.podSecurityLabelSync".into(),
            "false".into(),
        );
    }
    let mut out = vec![Object::Namespace(Namespace {
        metadata: ns_meta,
        ..Default::default()
    })];
    if o.platform == Platform::Gke {
        // GKE admits `system-node-critical` pods outside kube-system only against a
        // quota that covers them.
        out.push(Object::ResourceQuota(ResourceQuota {
            metadata: meta(NODE_CRITICAL_QUOTA, Some(ns), "weft"),
            spec: Some(ResourceQuotaSpec {
                hard: Some(BTreeMap::from([(
                    "pods".to_owned(),
                    Quantity("1000".into()),
                )])),
                scope_selector: Some(ScopeSelector {
                    match_expressions: Some(vec![ScopedResourceSelectorRequirement {
                        operator: "In".into(),
                        scope_name: "PriorityClass".into(),
                        values: strings(&["system-node-critical"]),
                    }]),
                }),
                ..Default::default()
            }),
            ..Default::default()
        }));
    }
    out.extend(
        crds.into_iter()
            .map(|c| Object::CustomResourceDefinition(Box::new(c))),
    );
    // node-proxy calls no Kubernetes API: its service account only identifies it (by its
    // projected token) to the controller.
    out.push(Object::ServiceAccount(ServiceAccount {
        metadata: meta(NODE_PROXY, Some(ns), NODE_PROXY),
        ..Default::default()
    }));
    for (name, cluster_rules, namespace_rules) in [
        (
            CONTROLLER,
            controller_cluster_rules(),
            controller_namespace_rules(),
        ),
        (
            NODE_AGENT,
            node_agent_cluster_rules(),
            node_agent_namespace_rules(),
        ),
    ] {
        out.push(Object::ServiceAccount(ServiceAccount {
            metadata: meta(name, Some(ns), name),
            ..Default::default()
        }));
        // Cluster-scoped names carry the namespace, so two installations do not clash.
        let cluster_name = format!("{name}-{ns}");
        out.push(Object::ClusterRole(ClusterRole {
            metadata: meta(&cluster_name, None, name),
            rules: Some(cluster_rules),
            ..Default::default()
        }));
        out.push(Object::ClusterRoleBinding(ClusterRoleBinding {
            metadata: meta(&cluster_name, None, name),
            role_ref: role_ref("ClusterRole", &cluster_name),
            subjects: subject(name, ns),
        }));
        out.push(Object::Role(Role {
            metadata: meta(name, Some(ns), name),
            rules: Some(namespace_rules),
        }));
        out.push(Object::RoleBinding(RoleBinding {
            metadata: meta(name, Some(ns), name),
            role_ref: role_ref("Role", name),
            subjects: subject(name, ns),
        }));
    }
    if o.platform == Platform::Openshift {
        // The node pods use the host's network, PIDs and paths as root: OpenShift admits
        // them under the `privileged` SCC only, which their ServiceAccounts may use.
        let scc = format!("weft-node-scc-{ns}");
        out.push(Object::ClusterRole(ClusterRole {
            metadata: meta(&scc, None, NODE_AGENT),
            rules: Some(vec![named_rule(
                "security.openshift.io",
                &["securitycontextconstraints"],
                &["privileged"],
                &["use"],
            )]),
            ..Default::default()
        }));
        let mut subjects = subject(NODE_AGENT, ns).unwrap_or_default();
        subjects.extend(subject(NODE_PROXY, ns).unwrap_or_default());
        out.push(Object::ClusterRoleBinding(ClusterRoleBinding {
            metadata: meta(&scc, None, NODE_AGENT),
            role_ref: role_ref("ClusterRole", &scc),
            subjects: Some(subjects),
        }));
    }
    // Bound to nobody: who may read the controller's debug views (the admin port's
    // /debug/model, /debug/subscribers, /debug/problems, each checked with a
    // SubjectAccessReview), for a platform team to bind.
    out.push(Object::ClusterRole(ClusterRole {
        metadata: meta(&format!("weft-debug-{ns}"), None, CONTROLLER),
        rules: Some(vec![PolicyRule {
            non_resource_urls: Some(
                crate::admin::PROTECTED
                    .iter()
                    .map(|p| (*p).to_owned())
                    .collect(),
            ),
            verbs: vec!["get".into()],
            ..Default::default()
        }]),
        ..Default::default()
    }));
    let (policy, binding) = controller_writes_policy(ns);
    out.push(Object::ValidatingAdmissionPolicy(Box::new(policy)));
    out.push(Object::ValidatingAdmissionPolicyBinding(binding));
    out.push(Object::Service(Service {
        metadata: meta(CONTROLLER, Some(ns), CONTROLLER),
        spec: Some(ServiceSpec {
            selector: Some(selector(CONTROLLER)),
            ports: Some(vec![
                ServicePort {
                    name: Some("grpc".into()),
                    port: GRPC_PORT,
                    target_port: Some(IntOrString::String("grpc".into())),
                    ..Default::default()
                },
                ServicePort {
                    name: Some("admin".into()),
                    port: ADMIN_PORT,
                    target_port: Some(IntOrString::String("admin".into())),
                    ..Default::default()
                },
            ]),
            ..Default::default()
        }),
        ..Default::default()
    }));
    out.push(Object::Deployment(Box::new(controller_deployment(o))));
    // Voluntary disruptions (drains, evictions) leave one controller serving.
    out.push(Object::PodDisruptionBudget(PodDisruptionBudget {
        metadata: meta(CONTROLLER, Some(ns), CONTROLLER),
        spec: Some(PodDisruptionBudgetSpec {
            min_available: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector {
                match_labels: Some(selector(CONTROLLER)),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }));
    // Uninstall deletes in reverse: the agents first, which take the capture off their
    // nodes while node-proxy still serves.
    out.push(Object::DaemonSet(Box::new(node_proxy_daemonset(o))));
    out.push(Object::DaemonSet(Box::new(node_agent_daemonset(o))));
    out.push(Object::GatewayClass(GatewayClass {
        metadata: meta(WAYPOINT_CLASS, None, CONTROLLER),
        spec: GatewayClassSpec {
            controller_name: CONTROLLER_NAME.into(),
            description: Some("Weft waypoints: L7 proxies for the services that use them".into()),
            parameters_ref: None,
        },
        status: None,
    }));
    Ok(out)
}

fn documents(header: &str, values: impl Iterator<Item = serde_json::Value>) -> String {
    let mut out = String::from(header);
    for v in values {
        out.push_str("---\n");
        out.push_str(&serde_yaml_ng::to_string(&v).expect("JSON values serialize as YAML"));
    }
    out
}

/// The installation as YAML documents, for `kubectl apply -f -`.
pub fn yaml(o: &Options) -> Result<String, OptionsError> {
    let objects = objects(o)?;
    Ok(documents(
        "# Weft, rendered by `weftctl install`; docs/install.md describes each object.\n",
        objects.iter().map(Object::to_value),
    ))
}

/// What removes the installation, for `kubectl delete -f -`: the same objects, named
/// only, in reverse order, which the header lists. The node agents' DaemonSet goes
/// right after the GatewayClass: each agent, seeing it deleted (or, stopped later, refused by the API server
/// once its RBAC or ServiceAccount is gone), takes capture and `weft-cni` off its node
/// while node-proxy still serves.
pub fn uninstall_yaml(o: &Options) -> Result<String, OptionsError> {
    let objects = objects(o)?;
    let mut header = String::from(
        "# Removes Weft, rendered by `weftctl uninstall`; docs/install.md.\n\
         # kubectl deletes in this order. Each node agent takes Weft off its node (capture\n\
         # rules, the weft-cni entry and binary) when it sees its DaemonSet deleted, or when\n\
         # it stops later and finds it gone or is refused (401/403: its ServiceAccount or\n\
         # RBAC went in a later step). Only an agent the API server does not answer at all\n\
         # leaves things in place (docs/install.md, Uninstall).\n",
    );
    for (i, obj) in objects.iter().rev().enumerate() {
        let v = obj.to_value();
        let name = |k: &str| v["metadata"][k].as_str().unwrap_or_default().to_owned();
        let namespaced = match name("namespace") {
            ns if ns.is_empty() => name("name"),
            ns => format!("{ns}/{}", name("name")),
        };
        header.push_str(&format!("#  {:>2}. {} {namespaced}\n", i + 1, obj.kind()));
    }
    Ok(documents(
        &header,
        objects.iter().rev().map(|obj| {
            let v = obj.to_value();
            let mut m = serde_json::Map::new();
            for k in ["apiVersion", "kind"] {
                if let Some(x) = v.get(k) {
                    m.insert(k.into(), x.clone());
                }
            }
            let mut md = serde_json::Map::new();
            for k in ["name", "namespace"] {
                if let Some(x) = v.get("metadata").and_then(|md| md.get(k)) {
                    md.insert(k.into(), x.clone());
                }
            }
            m.insert("metadata".into(), md.into());
            serde_json::Value::Object(m)
        }),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each rendered object parses back into its Kubernetes type and serializes to the
    /// same JSON: a field the type does not know would be dropped on the way and show.
    #[test]
    fn every_object_round_trips_through_its_type_without_unknown_fields() {
        let rendered = yaml(&Options::default()).unwrap();
        let mut kinds = Vec::new();
        for doc in serde_yaml_ng::Deserializer::from_str(&rendered) {
            let value = serde_json::to_value(
                <serde_yaml_ng::Value as serde::Deserialize>::deserialize(doc).unwrap(),
            )
            .unwrap();
            let parsed = Object::from_value(value.clone()).unwrap();
            assert_eq!(parsed.to_value(), value, "{} changed", parsed.kind());
            kinds.push(parsed.kind());
        }
        assert!(kinds.contains(&"DaemonSet") && kinds.contains(&"GatewayClass"));
        // A field no type has is noticed.
        let mut bad = Object::Namespace(Namespace::default()).to_value();
        bad["spec"] = serde_json::json!({"finalizerz": ["x"]});
        let parsed = Object::from_value(bad.clone()).unwrap();
        assert_ne!(parsed.to_value(), bad);
    }

    #[test]
    fn invalid_options_are_refused_naming_the_flag() {
        for (o, flag) in [
            (
                Options {
                    namespace: "Weft_System".into(),
                    ..Options::default()
                },
                "--namespace",
            ),
            (
                Options {
                    trust_domain: "a..b".into(),
                    ..Options::default()
                },
                "--trust-domain",
            ),
            (
                Options {
                    image: "".into(),
                    ..Options::default()
                },
                "--image",
            ),
            (
                Options {
                    log_level: "de bug".into(),
                    ..Options::default()
                },
                "--log-level",
            ),
        ] {
            let e = yaml(&o).unwrap_err().to_string();
            assert!(e.starts_with(flag), "{e}");
        }
    }

    /// `deploy/weft.yaml` is what `weftctl install` renders by default.
    #[test]
    fn deploy_weft_yaml_is_in_sync() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/weft.yaml");
        let committed = std::fs::read_to_string(path).unwrap_or_default();
        let generated = yaml(&Options::default()).unwrap();
        assert!(
            committed == generated,
            "deploy/weft.yaml is out of date with controller/src/install.rs; regenerate it:\n  \
             cargo run -p weft-cli --bin weftctl -- install > deploy/weft.yaml"
        );
    }
}
