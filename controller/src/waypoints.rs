//! In a cluster, the controller runs each waypoint: for every Gateway of class
//! `weft-waypoint` it applies a ServiceAccount, a Deployment and a Service named after
//! the Gateway (owned by it, so they go when it goes), and the roots ConfigMap the
//! waypoint trusts the controller with, in the Gateway's namespace. The sandbox does
//! the same from the same Gateway itself (`cli/src/sandbox/manifest.rs`).
//!
//! ```text
//!  translation ──Gateways──> Deployer (latest wins) ──server-side apply, field manager
//!                                     weft-controller──> ServiceAccount, ConfigMap,
//!                                     Deployment, Service, PDB, and an HPA when
//!                                     autoscaled (unchanged: not sent again; failed:
//!                                     retried every 30 s)
//!  watch of those objects (by label) ──deleted, or changed by another hand──> applied
//!                                     again at once; Event WaypointCreated/Repaired
//! ```

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use gateway_api::gateways::Gateway;
use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::autoscaling::v2::{
    CrossVersionObjectReference, HorizontalPodAutoscaler, HorizontalPodAutoscalerSpec, MetricSpec,
    MetricTarget, ResourceMetricSource,
};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMap, ConfigMapVolumeSource, Container, ContainerPort, HTTPGetAction,
    ObjectReference, PodSpec, PodTemplateSpec, Probe, ResourceRequirements, SecurityContext,
    Service, ServiceAccount, ServicePort, ServiceSpec, TopologySpreadConstraint, Volume,
    VolumeMount,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{
    Api, ApiResource, DynamicObject, GroupVersionKind, ObjectMeta, Patch, PatchParams,
};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::{watcher, WatchStreamExt};
use kube::Client;
use serde_json::Value;
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use crate::crd::{AutoscalingSpec, ResourceAmounts, WaypointParametersSpec};
use crate::install::{env, field_env};
use crate::kubernetes::{ROOTS_CONFIGMAP, ROOTS_KEY};
use crate::translate::WAYPOINT_CLASS;

/// The label tying a waypoint's pods and Service to its Gateway (Gateway API's own).
pub const GATEWAY_NAME_LABEL: &str = "gateway.networking.k8s.io/gateway-name";
/// The label of the roots ConfigMaps the controller writes in waypoints' namespaces.
pub const ROOTS_LABEL: &str = "weft.dev/roots";
/// The field manager of everything the controller applies.
pub const FIELD_MANAGER: &str = "weft-controller";
/// Waypoint pods per Gateway: two, so a node drain or an eviction leaves one serving
/// (the PodDisruptionBudget keeps one available).
pub const WAYPOINT_REPLICAS: i32 = 2;
/// The CPU use, as a percentage of the pods' request, an autoscaled waypoint is kept at.
pub const WAYPOINT_CPU_TARGET: i32 = 80;
/// The field manager that keeps a Deployment's replica count while its ownership passes
/// from the controller to a HorizontalPodAutoscaler (see [`hand_over_replicas`]).
pub const HANDOVER_MANAGER: &str = "weft-controller-handover-to-hpa";

/// The waypoint's admin port (metrics, `/ready`), on the pod's IP.
pub const WAYPOINT_ADMIN_PORT: i32 = 15020;

/// What every waypoint is run with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// The image (the one with `weftctl`).
    pub image: String,
    /// The controller (`host:port`) and the name in its certificate.
    pub controller: String,
    /// The name in the controller's certificate.
    pub controller_name: String,
    /// The trust domain.
    pub trust_domain: String,
    /// The roots (PEM) proxies trust the controller with.
    pub roots_pem: String,
}

/// A Deployment, Service and ServiceAccount for `gateway`, and the roots ConfigMap of its
/// namespace, as JSON to apply; `None` for a Gateway of another class or without a uid.
pub fn desired(gateway: &Gateway, s: &Settings) -> Option<Vec<(&'static str, Value)>> {
    desired_with(gateway, None, s)
}

/// As [`desired`], with the settings of the Gateway's WaypointParameters (its
/// `spec.infrastructure.parametersRef`) over the defaults.
pub fn desired_with(
    gateway: &Gateway,
    parameters: Option<&WaypointParametersSpec>,
    s: &Settings,
) -> Option<Vec<(&'static str, Value)>> {
    if gateway.spec.gateway_class_name != WAYPOINT_CLASS {
        return None;
    }
    let name = gateway.metadata.name.clone()?;
    let namespace = gateway.metadata.namespace.clone()?;
    let uid = gateway.metadata.uid.clone()?;
    let owner = OwnerReference {
        api_version: "gateway.networking.k8s.io/v1".into(),
        kind: "Gateway".into(),
        name: name.clone(),
        uid,
        controller: Some(true),
        // Not blockOwnerDeletion: setting it needs `update` on gateways/finalizers
        // (OpenShift and clusters with OwnerReferencesPermissionEnforcement check), and
        // a foreground deletion of the Gateway need not wait for its waypoint.
        block_owner_deletion: None,
    };
    // The Gateway's `spec.infrastructure` labels and annotations go on everything made
    // for it, pods included (Gateway API's Extended support); Weft's own labels win.
    let infrastructure = gateway.spec.infrastructure.as_ref();
    let autoscaling = parameters.and_then(|p| p.autoscaling.as_ref());
    let mut labels: BTreeMap<String, String> = infrastructure
        .and_then(|i| i.labels.clone())
        .unwrap_or_default();
    labels.insert(GATEWAY_NAME_LABEL.to_owned(), name.clone());
    labels.insert("app.kubernetes.io/part-of".to_owned(), "weft".to_owned());
    let annotations = infrastructure
        .and_then(|i| i.annotations.clone())
        .filter(|a| !a.is_empty());
    let meta = |name: &str| ObjectMeta {
        name: Some(name.to_owned()),
        namespace: Some(namespace.clone()),
        labels: Some(labels.clone()),
        annotations: annotations.clone(),
        owner_references: Some(vec![owner.clone()]),
        ..Default::default()
    };
    let mut pod_labels = labels.clone();
    // The waypoint is reached through HBONE itself; its pod is not captured.
    pod_labels.insert("weft.dev/mesh".into(), "disabled".into());
    let selector = BTreeMap::from([(GATEWAY_NAME_LABEL.to_owned(), name.clone())]);
    let mount = |name: &str, path: &str| VolumeMount {
        name: name.into(),
        mount_path: path.into(),
        read_only: Some(true),
        ..Default::default()
    };
    let container = Container {
        name: "waypoint".into(),
        image: Some(s.image.clone()),
        // The waypoint's own binary: it does not link the controller or the Kubernetes
        // client, so its resident code is the waypoint's alone.
        command: Some(vec!["/usr/local/bin/waypoint".to_owned()]),
        args: Some(
            [
                "--gateway",
                &format!("{namespace}/{name}"),
                "--controller",
                &s.controller,
                "--controller-name",
                &s.controller_name,
                "--trust-domain",
                &s.trust_domain,
                "--admin",
                &format!("0.0.0.0:{WAYPOINT_ADMIN_PORT}"),
            ]
            .map(str::to_owned)
            .to_vec(),
        ),
        env: Some(vec![
            field_env("WEFT_NODE", "spec.nodeName"),
            field_env("POD_IP", "status.podIP"),
            env(
                "WEFT_CONTROLLER_CA",
                &format!("/etc/weft/roots/{ROOTS_KEY}"),
            ),
            env("WEFT_TOKEN_FILE", "/var/run/secrets/weft/token"),
        ]),
        ports: Some(vec![
            ContainerPort {
                name: Some("mesh".into()),
                container_port: i32::from(tunnel::hbone::PORT),
                ..Default::default()
            },
            ContainerPort {
                name: Some("admin".into()),
                container_port: WAYPOINT_ADMIN_PORT,
                ..Default::default()
            },
        ]),
        readiness_probe: Some(admin_probe("/ready", 5, 3)),
        // Alive while its admin endpoint answers; up to a minute to start (a certificate
        // and a first model from the controller) before the liveness probe counts.
        liveness_probe: Some(admin_probe("/healthz", 10, 3)),
        startup_probe: Some(admin_probe("/healthz", 2, 30)),
        // Requests so a ResourceQuota admits it and the scheduler places it; a memory
        // limit so a leak is the waypoint's own restart, not the node's OOM.
        resources: Some(ResourceRequirements {
            requests: Some(amounts(
                &[("cpu", "100m"), ("memory", "64Mi")],
                parameters.and_then(|p| p.requests.as_ref()),
            )),
            limits: Some(amounts(
                &[("memory", "1Gi")],
                parameters.and_then(|p| p.limits.as_ref()),
            )),
            ..Default::default()
        }),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                ..Default::default()
            }),
            ..Default::default()
        }),
        volume_mounts: Some(vec![
            mount("token", "/var/run/secrets/weft"),
            mount("roots", "/etc/weft/roots"),
        ]),
        ..Default::default()
    };
    let deployment = Deployment {
        metadata: meta(&name),
        spec: Some(DeploymentSpec {
            // Autoscaled: the HorizontalPodAutoscaler's to set, not the controller's.
            replicas: autoscaling.is_none().then(|| replicas(parameters)),
            selector: LabelSelector {
                match_labels: Some(selector.clone()),
                ..Default::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels),
                    annotations: annotations.clone(),
                    ..Default::default()
                }),
                spec: Some(PodSpec {
                    service_account_name: Some(name.clone()),
                    security_context: Some(crate::install::non_root()),
                    node_selector: crate::install::linux_only(),
                    // It calls no Kubernetes API; its projected token is the controller's.
                    automount_service_account_token: Some(false),
                    // Replicas on different nodes where there are several.
                    topology_spread_constraints: Some(vec![TopologySpreadConstraint {
                        max_skew: 1,
                        topology_key: "kubernetes.io/hostname".into(),
                        when_unsatisfiable: "ScheduleAnyway".into(),
                        label_selector: Some(LabelSelector {
                            match_labels: Some(selector.clone()),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }]),
                    containers: vec![container],
                    volumes: Some(vec![
                        crate::install::token_volume(),
                        Volume {
                            name: "roots".into(),
                            config_map: Some(ConfigMapVolumeSource {
                                name: ROOTS_CONFIGMAP.into(),
                                ..Default::default()
                            }),
                            ..Default::default()
                        },
                    ]),
                    ..Default::default()
                }),
            },
            ..Default::default()
        }),
        ..Default::default()
    };
    let service = Service {
        metadata: meta(&name),
        spec: Some(ServiceSpec {
            selector: Some(selector.clone()),
            ports: Some(vec![ServicePort {
                name: Some("mesh".into()),
                port: i32::from(tunnel::hbone::PORT),
                target_port: Some(IntOrString::Int(i32::from(tunnel::hbone::PORT))),
                app_protocol: Some("https".into()),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    };
    let account = ServiceAccount {
        metadata: meta(&name),
        ..Default::default()
    };
    // Voluntary disruptions (drains, evictions) leave one waypoint pod serving.
    let budget = PodDisruptionBudget {
        metadata: meta(&name),
        spec: Some(PodDisruptionBudgetSpec {
            // One pod at a time: with two or more, one keeps serving; with one
            // (WaypointParameters `replicas: 1`), a drain may still evict it.
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector {
                match_labels: Some(selector.clone()),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    // Shared by the namespace's waypoints, so owned by none of them and labelled
    // alike whichever applies it.
    let roots = ConfigMap {
        metadata: ObjectMeta {
            name: Some(ROOTS_CONFIGMAP.to_owned()),
            namespace: Some(namespace.clone()),
            labels: Some(BTreeMap::from([
                ("app.kubernetes.io/part-of".to_owned(), "weft".to_owned()),
                (ROOTS_LABEL.to_owned(), "true".to_owned()),
            ])),
            ..Default::default()
        },
        data: Some(BTreeMap::from([(
            ROOTS_KEY.to_owned(),
            s.roots_pem.clone(),
        )])),
        ..Default::default()
    };
    let json = |v: serde_json::Result<Value>| v.expect("Kubernetes objects serialize");
    let mut objects = vec![
        ("ServiceAccount", json(serde_json::to_value(account))),
        ("ConfigMap", json(serde_json::to_value(roots))),
        ("Deployment", json(serde_json::to_value(deployment))),
        ("Service", json(serde_json::to_value(service))),
        ("PodDisruptionBudget", json(serde_json::to_value(budget))),
    ];
    if let Some(a) = autoscaling {
        let autoscaler = autoscaler(meta(&name), &name, a);
        objects.push((
            "HorizontalPodAutoscaler",
            json(serde_json::to_value(autoscaler)),
        ));
    }
    Some(objects)
}

/// The HorizontalPodAutoscaler of an autoscaled waypoint's Deployment `name`: CPU use
/// against the pods' request.
fn autoscaler(metadata: ObjectMeta, name: &str, a: &AutoscalingSpec) -> HorizontalPodAutoscaler {
    HorizontalPodAutoscaler {
        metadata,
        spec: HorizontalPodAutoscalerSpec {
            scale_target_ref: CrossVersionObjectReference {
                api_version: Some("apps/v1".into()),
                kind: "Deployment".into(),
                name: name.to_owned(),
            },
            min_replicas: Some(fewest(a)),
            max_replicas: a.max_replicas,
            metrics: Some(vec![MetricSpec {
                type_: "Resource".into(),
                resource: Some(ResourceMetricSource {
                    name: "cpu".into(),
                    target: MetricTarget {
                        type_: "Utilization".into(),
                        average_utilization: Some(
                            a.target_cpu_utilization_percentage
                                .unwrap_or(WAYPOINT_CPU_TARGET),
                        ),
                        ..Default::default()
                    },
                }),
                ..Default::default()
            }]),
            ..Default::default()
        },
        ..Default::default()
    }
}

/// Resource amounts: `defaults`, each replaced by what `given` sets.
fn amounts(
    defaults: &[(&str, &str)],
    given: Option<&ResourceAmounts>,
) -> BTreeMap<String, Quantity> {
    let mut out: BTreeMap<String, Quantity> = defaults
        .iter()
        .map(|(k, v)| ((*k).to_owned(), Quantity((*v).to_owned())))
        .collect();
    if let Some(given) = given {
        for (key, value) in [("cpu", &given.cpu), ("memory", &given.memory)] {
            if let Some(v) = value {
                out.insert(key.to_owned(), Quantity(v.clone()));
            }
        }
    }
    out
}

/// How many pods a waypoint runs: its WaypointParameters' `replicas`, or the default;
/// autoscaled, the fewest its autoscaler keeps (what it runs without load).
pub fn replicas(parameters: Option<&WaypointParametersSpec>) -> i32 {
    match parameters {
        Some(WaypointParametersSpec {
            autoscaling: Some(a),
            ..
        }) => fewest(a),
        _ => parameters
            .and_then(|p| p.replicas)
            .unwrap_or(WAYPOINT_REPLICAS),
    }
}

/// The fewest pods an autoscaled waypoint runs: `minReplicas`, else the default count
/// or `maxReplicas` if that is lower (an autoscaler's minimum may not exceed its maximum).
fn fewest(a: &AutoscalingSpec) -> i32 {
    a.min_replicas
        .unwrap_or(WAYPOINT_REPLICAS.min(a.max_replicas))
}

/// Why WaypointParameters cannot be used, naming the field: what its CRD's schema
/// and rules refuse, checked again for manifests no API server has seen.
pub fn check_parameters(p: &WaypointParametersSpec) -> Result<(), String> {
    let count = |field: &str, n: i32| match (1..=100).contains(&n) {
        true => Ok(()),
        false => Err(format!("{field}: {n} is not between 1 and 100")),
    };
    if let Some(n) = p.replicas {
        count("spec.replicas", n)?;
    }
    let Some(a) = &p.autoscaling else {
        return Ok(());
    };
    if p.replicas.is_some() {
        return Err("spec.autoscaling: replicas and autoscaling exclude each other: a fixed count, or a HorizontalPodAutoscaler's".into());
    }
    count("spec.autoscaling.maxReplicas", a.max_replicas)?;
    if let Some(n) = a.min_replicas {
        count("spec.autoscaling.minReplicas", n)?;
        if n > a.max_replicas {
            return Err(format!(
                "spec.autoscaling.minReplicas: {n} is above maxReplicas {}",
                a.max_replicas
            ));
        }
    }
    if let Some(n) = a.target_cpu_utilization_percentage {
        count("spec.autoscaling.targetCPUUtilizationPercentage", n)?;
    }
    Ok(())
}

/// The WaypointParameters a waypoint Gateway's `spec.infrastructure.parametersRef`
/// names, from `objects`: `Ok(None)` when it names none, `Err(why)` when it names
/// something else or something absent (the Gateway is then `Accepted: False`, reason
/// `InvalidParameters`, and its waypoint is left as it is).
pub fn parameters<'a>(
    gateway: &Gateway,
    objects: &'a crate::objects::Objects,
) -> Result<Option<&'a WaypointParametersSpec>, String> {
    let Some(r) = gateway
        .spec
        .infrastructure
        .as_ref()
        .and_then(|i| i.parameters_ref.as_ref())
    else {
        return Ok(None);
    };
    if r.group != "weft.dev" || r.kind != "WaypointParameters" {
        return Err(format!(
            "spec.infrastructure.parametersRef names a {}/{}; a waypoint takes a weft.dev WaypointParameters",
            r.group, r.kind
        ));
    }
    let namespace = gateway.metadata.namespace.clone().unwrap_or_default();
    let name = api::ObjectName::new(&namespace, &r.name);
    match objects.waypoint_parameters.get(&name) {
        Some(p) => match check_parameters(&p.value.spec) {
            Ok(()) => Ok(Some(&p.value.spec)),
            Err(why) => Err(format!("WaypointParameters {name}: {why}")),
        },
        None => Err(format!(
            "spec.infrastructure.parametersRef: there is no WaypointParameters {namespace}/{}",
            r.name
        )),
    }
}

/// A probe of the waypoint's admin endpoint.
fn admin_probe(path: &str, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::Int(WAYPOINT_ADMIN_PORT),
            ..Default::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        ..Default::default()
    }
}

/// The kinds the controller applies for a waypoint: (kind, apiVersion, plural, whether
/// its spec changes bump `metadata.generation`).
const OWNED: [(&str, &str, &str, bool); 6] = [
    ("ServiceAccount", "v1", "serviceaccounts", false),
    ("ConfigMap", "v1", "configmaps", false),
    ("Deployment", "apps/v1", "deployments", true),
    ("Service", "v1", "services", false),
    (
        "PodDisruptionBudget",
        "policy/v1",
        "poddisruptionbudgets",
        true,
    ),
    (
        "HorizontalPodAutoscaler",
        "autoscaling/v2",
        "horizontalpodautoscalers",
        true,
    ),
];

fn api_resource(kind: &str) -> Option<(ApiResource, bool)> {
    OWNED
        .iter()
        .find(|(k, ..)| *k == kind)
        .map(|(kind, api_version, plural, generation)| {
            let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
            (
                ApiResource::from_gvk_with_plural(
                    &GroupVersionKind::gvk(group, version, kind),
                    plural,
                ),
                *generation,
            )
        })
}

/// (kind, namespace, name) of an owned object.
type Key = (String, String, String);

fn key_of(kind: &str, object: &kube::api::ObjectMeta) -> Key {
    (
        kind.to_owned(),
        object.namespace.clone().unwrap_or_default(),
        object.name.clone().unwrap_or_default(),
    )
}

/// Where an object stands, as the API server shows it.
#[derive(Debug, Clone, Default)]
struct Version {
    generation: Option<i64>,
    resource_version: Option<String>,
    /// A digest of its `spec`: what its watchers see change, not its status (an
    /// autoscaler's status every few seconds), where the kind has no generation or the
    /// cluster does not set it.
    spec: Option<u64>,
}

impl Version {
    fn of(metadata: &ObjectMeta, data: &Value) -> Self {
        use std::hash::{Hash, Hasher};
        Version {
            generation: metadata.generation,
            resource_version: metadata.resource_version.clone(),
            spec: data.get("spec").map(|spec| {
                let mut h = std::collections::hash_map::DefaultHasher::new();
                spec.to_string().hash(&mut h);
                h.finish()
            }),
        }
    }
}

/// What the watch of the owned objects saw.
#[derive(Debug)]
enum Seen {
    /// Present, at this version.
    Present(Key, Version),
    /// Deleted.
    Gone(Key),
    /// A (re)list of `kind` began then.
    Listing(String, tokio::time::Instant),
    /// A (re)list of `kind` is complete: these are all there are.
    Listed(String, Vec<Key>),
}

/// A waypoint Gateway and its parameters.
pub type Waypoint = (Arc<Gateway>, Option<WaypointParametersSpec>);

/// Applies the waypoints' objects in the background: latest set of Gateways wins. The
/// objects are watched too: one deleted or changed by someone else is applied again
/// at once (drift repair), with an event on its Gateway.
pub struct Deployer {
    tx: watch::Sender<Arc<Vec<Waypoint>>>,
}

impl Deployer {
    /// A deployer applying through `client`, always (a single replica).
    pub fn new(client: Client, settings: Settings) -> Self {
        Self::with_leader(client, settings, crate::leader::fixed(true))
    }

    /// A deployer applying through `client` while `leading`; a new leader applies
    /// everything again (no-ops where nothing differs).
    pub fn with_leader(
        client: Client,
        settings: Settings,
        leading: crate::leader::Leading,
    ) -> Self {
        let (tx, rx) = watch::channel(Arc::new(Vec::new()));
        let (seen_tx, seen_rx) = mpsc::unbounded_channel();
        for (kind, ..) in OWNED {
            tokio::spawn(watch_owned(client.clone(), kind, seen_tx.clone()));
        }
        tokio::spawn(apply_loop(client, settings, rx, seen_rx, leading));
        Deployer { tx }
    }

    /// The Gateways of the latest translation, with default settings.
    pub fn write(&self, gateways: Vec<Arc<Gateway>>) {
        self.write_with(
            gateways
                .into_iter()
                .map(|gateway| (gateway, None))
                .collect(),
        );
    }

    /// The waypoint Gateways of the latest translation, each with its parameters (those
    /// whose parameters cannot be resolved left out: their waypoints stay as they are).
    pub fn write_with(&self, waypoints: Vec<Waypoint>) {
        self.tx.send_replace(Arc::new(waypoints));
    }
}

/// Watches the objects of `kind` the controller applies (by their label), forever.
async fn watch_owned(client: Client, kind: &'static str, tx: mpsc::UnboundedSender<Seen>) {
    let Some((resource, _)) = api_resource(kind) else {
        return;
    };
    // The roots ConfigMaps by their one name, which RBAC can limit the grant to.
    let config = if kind == "ConfigMap" {
        watcher::Config::default().fields(&format!("metadata.name={ROOTS_CONFIGMAP}"))
    } else {
        watcher::Config::default().labels(GATEWAY_NAME_LABEL)
    };
    let api: Api<DynamicObject> = Api::all_with(client, &resource);
    let stream = watcher::watcher(api, config).default_backoff();
    futures::pin_mut!(stream);
    let mut listing: Vec<Key> = Vec::new();
    while let Some(event) = stream.next().await {
        let seen = match event {
            Ok(watcher::Event::Init) => {
                listing.clear();
                Seen::Listing(kind.to_owned(), tokio::time::Instant::now())
            }
            Ok(watcher::Event::InitApply(o)) => {
                let key = key_of(kind, &o.metadata);
                listing.push(key.clone());
                Seen::Present(key, Version::of(&o.metadata, &o.data))
            }
            Ok(watcher::Event::InitDone) => {
                Seen::Listed(kind.to_owned(), std::mem::take(&mut listing))
            }
            Ok(watcher::Event::Apply(o)) => {
                Seen::Present(key_of(kind, &o.metadata), Version::of(&o.metadata, &o.data))
            }
            Ok(watcher::Event::Delete(o)) => Seen::Gone(key_of(kind, &o.metadata)),
            Err(e) => {
                debug!(kind, "watch of the waypoints' objects: {e}");
                continue;
            }
        };
        if tx.send(seen).is_err() {
            return;
        }
    }
}

/// Before the controller stops setting an autoscaled Deployment's `spec.replicas`, the
/// count it has now is applied by [`HANDOVER_MANAGER`], which keeps it: a field left
/// by its last manager would be removed, and the Deployment fall back to one pod until
/// the autoscaler acts. The autoscaler takes the field over with its first change
/// (Kubernetes' documented way to hand replicas to an autoscaler). Nothing to do for a
/// Deployment not there yet or without a count.
async fn hand_over_replicas(client: &Client, key: &Key) -> Result<(), kube::Error> {
    let Some((resource, _)) = api_resource(&key.0) else {
        return Ok(());
    };
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), &key.1, &resource);
    let Some(live) = api.get_opt(&key.2).await? else {
        return Ok(());
    };
    let Some(replicas) = live.data["spec"]["replicas"].as_i64() else {
        return Ok(());
    };
    let count = serde_json::json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": key.2, "namespace": key.1},
        "spec": {"replicas": replicas},
    });
    api.patch(
        &key.2,
        &PatchParams::apply(HANDOVER_MANAGER),
        &Patch::Apply(&count),
    )
    .await?;
    info!(namespace = %key.1, name = %key.2, replicas, "the waypoint's replica count is handed over to its autoscaler");
    Ok(())
}

/// Deletes the owned object `key`; one already gone is not an error.
async fn delete_one(client: &Client, key: &Key) -> Result<(), kube::Error> {
    let Some((resource, _)) = api_resource(&key.0) else {
        return Ok(());
    };
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), &key.1, &resource);
    match api.delete(&key.2, &Default::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(e),
    }
}

/// Applies `object` (server-side, as [`FIELD_MANAGER`], forcing its fields back) and
/// returns its version as the API server answered.
async fn apply_one(client: &Client, kind: &str, object: &Value) -> Result<Version, kube::Error> {
    let ns = object["metadata"]["namespace"].as_str().unwrap_or_default();
    let name = object["metadata"]["name"].as_str().unwrap_or_default();
    let Some((resource, _)) = api_resource(kind) else {
        return Ok(Version::default());
    };
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, &resource);
    let applied = api.patch(name, &params, &Patch::Apply(object)).await?;
    Ok(Version::of(&applied.metadata, &applied.data))
}

/// One object as applied: its content, when, and its version as the API server gave it.
struct Applied {
    object: Value,
    at: tokio::time::Instant,
    version: Version,
}

/// Why an object is applied again.
fn drifted(applied: &Applied, has_generation: bool, seen: &Version) -> bool {
    let was = &applied.version;
    match (has_generation, seen.generation, seen.spec, was.spec) {
        // Status updates (available replicas) do not bump the generation; spec edits do.
        // An event older than the last apply (seen late) is not drift.
        (true, Some(_), ..) => seen.generation > was.generation,
        // No generation (a kind without one, or a cluster that does not set it): the
        // spec, not a status update, decides.
        (_, _, Some(now), Some(then)) => now != then,
        _ => seen.resource_version.is_some() && seen.resource_version != was.resource_version,
    }
}

async fn apply_loop(
    client: Client,
    settings: Settings,
    mut rx: watch::Receiver<Arc<Vec<Waypoint>>>,
    mut seen: mpsc::UnboundedReceiver<Seen>,
    mut leading: crate::leader::Leading,
) {
    let events = Recorder::new(client.clone(), crate::kubernetes::reporter());
    // What was applied last, per object; a failed apply is retried.
    let mut applied: HashMap<Key, Applied> = HashMap::new();
    // Objects to apply again, and why ("deleted" or "changed").
    // Objects to apply again: why ("deleted" or "changed"), and the spec seen changed
    // (an apply that leaves that spec as it was changed nothing the controller sets:
    // not a repair).
    let mut repair: HashMap<Key, (&'static str, Option<u64>)> = HashMap::new();
    // Autoscaled Deployments whose replica count was handed over to the autoscaler.
    let mut handed_over: std::collections::HashSet<Key> = std::collections::HashSet::new();
    // Objects a relist did not show, with the resourceVersion they were applied at.
    let mut unsure: HashMap<Key, Option<String>> = HashMap::new();
    // What the watches saw exist, per kind once listed.
    let mut present: HashMap<Key, ()> = HashMap::new();
    let mut listed: std::collections::HashSet<String> = std::collections::HashSet::new();
    let mut listing_since: HashMap<String, tokio::time::Instant> = HashMap::new();
    let mut retry = tokio::time::interval(Duration::from_secs(30));
    let mut was_leading = false;
    loop {
        tokio::select! {
            changed = rx.changed() => if changed.is_err() { return },
            _ = retry.tick() => {}
            _ = crate::leader::changed(&mut leading) => {}
            Some(first) = seen.recv() => {
                // Everything seen so far, in one round.
                let mut batch = vec![first];
                while let Ok(more) = seen.try_recv() {
                    batch.push(more);
                }
                for s in batch {
                    match s {
                        Seen::Present(key, seen) => {
                            let has_generation = api_resource(&key.0).is_some_and(|(_, g)| g);
                            if let Some(a) = applied.get(&key) {
                                if drifted(a, has_generation, &seen) {
                                    repair.insert(key.clone(), ("changed", seen.spec));
                                    applied.remove(&key);
                                }
                            }
                            present.insert(key, ());
                        }
                        Seen::Gone(key) => {
                            present.remove(&key);
                            if applied.remove(&key).is_some() {
                                repair.insert(key, ("deleted", None));
                            }
                        }
                        Seen::Listing(kind, at) => {
                            listing_since.insert(kind, at);
                        }
                        Seen::Listed(kind, keys) => {
                            let since = listing_since.get(&kind).copied();
                            let keys: std::collections::HashSet<Key> = keys.into_iter().collect();
                            present.retain(|k, _| k.0 != kind || keys.contains(k));
                            // Applied before the list began and not in it: deleted while
                            // the watch was away, or applied as the list was read. Applied
                            // again (a no-op in the second case, told apart by the
                            // resourceVersion the apply returns).
                            let missing: Vec<Key> = applied
                                .iter()
                                .filter(|(k, a)| {
                                    k.0 == kind
                                        && !keys.contains(*k)
                                        && since.is_some_and(|since| a.at < since)
                                })
                                .map(|(k, _)| k.clone())
                                .collect();
                            for key in missing {
                                if let Some(a) = applied.remove(&key) {
                                    unsure.insert(key, a.version.resource_version);
                                }
                            }
                            listed.insert(kind);
                        }
                    }
                }
                if repair.is_empty() && unsure.is_empty() {
                    continue;
                }
            }
        }
        let now_leading = crate::leader::is_leading(&leading);
        if now_leading && !was_leading {
            // A new leader applies everything again (no-ops where nothing differs).
            applied.clear();
            repair.clear();
            unsure.clear();
            handed_over.clear();
        }
        was_leading = now_leading;
        if !now_leading {
            continue;
        }
        let gateways = rx.borrow_and_update().clone();
        // Every object some Gateway wants now.
        let mut wanted: std::collections::HashSet<Key> = std::collections::HashSet::new();
        for (gateway, parameters) in gateways.iter() {
            let Some(objects) = desired_with(gateway, parameters.as_ref(), &settings) else {
                continue;
            };
            let mut created = Vec::new();
            let mut repaired: Vec<(&'static str, String)> = Vec::new();
            // An autoscaler the waypoint no longer wants goes first, so that it does not
            // scale the Deployment away from the count applied next.
            let autoscaler = (
                "HorizontalPodAutoscaler".to_owned(),
                gateway.metadata.namespace.clone().unwrap_or_default(),
                gateway.metadata.name.clone().unwrap_or_default(),
            );
            if !objects.iter().any(|(kind, _)| *kind == autoscaler.0)
                && present.contains_key(&autoscaler)
                && crate::leader::is_leading(&leading)
            {
                match delete_one(&client, &autoscaler).await {
                    Ok(()) => {
                        info!(namespace = %autoscaler.1, name = %autoscaler.2, "the waypoint is no longer autoscaled: its HorizontalPodAutoscaler is deleted");
                        present.remove(&autoscaler);
                        applied.remove(&autoscaler);
                    }
                    Err(e) => {
                        warn!(namespace = %autoscaler.1, name = %autoscaler.2, "cannot delete the waypoint's HorizontalPodAutoscaler: {e}; retrying in 30 s");
                        continue;
                    }
                }
            }
            for (kind, object) in objects {
                let key = (
                    kind.to_owned(),
                    object["metadata"]["namespace"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned(),
                    object["metadata"]["name"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned(),
                );
                wanted.insert(key.clone());
                if applied.get(&key).is_some_and(|a| a.object == object) {
                    continue;
                }
                // Leadership may be lost during a round: a follower applies nothing more.
                if !crate::leader::is_leading(&leading) {
                    break;
                }
                let new = listed.contains(kind) && !present.contains_key(&key);
                let autoscaled = kind == "Deployment" && object["spec"]["replicas"].is_null();
                if autoscaled && !handed_over.contains(&key) {
                    if let Err(e) = hand_over_replicas(&client, &key).await {
                        warn!(namespace = %key.1, name = %key.2, "cannot hand the waypoint's replica count over to its autoscaler: {e}; retrying in 30 s");
                        continue;
                    }
                    handed_over.insert(key.clone());
                } else if !autoscaled {
                    handed_over.remove(&key);
                }
                match apply_one(&client, kind, &object).await {
                    Ok(version) => {
                        let why = match repair.remove(&key) {
                            // Changed only in what the controller does not set (an
                            // autoscaler's replica count): the apply changed nothing.
                            Some(("changed", seen)) if seen.is_some() && seen == version.spec => {
                                debug!(kind, namespace = %key.1, name = %key.2, "changed by someone else in fields the controller leaves alone");
                                None
                            }
                            Some((why, _)) => Some(why),
                            None => unsure
                                .remove(&key)
                                .filter(|was| *was != version.resource_version)
                                .map(|_| "deleted"),
                        };
                        match why {
                            Some(why) => {
                                warn!(kind, namespace = %key.1, name = %key.2, "the waypoint's {kind} was {why} by someone else; applied again");
                                repaired.push((
                                    why,
                                    format!(
                                        "{kind} {} was {why} by someone else; applied again",
                                        key.2
                                    ),
                                ));
                            }
                            None if new => created.push(format!("{kind} {}", key.2)),
                            None => {
                                info!(kind, namespace = %key.1, name = %key.2, "waypoint object applied")
                            }
                        }
                        applied.insert(
                            key,
                            Applied {
                                object,
                                at: tokio::time::Instant::now(),
                                version,
                            },
                        );
                    }
                    Err(e) => warn!(
                        kind,
                        namespace = %key.1,
                        name = %key.2,
                        "cannot apply the waypoint's {kind}: {e}; retrying in 30 s"
                    ),
                }
            }
            let mut events_now: Vec<Event> = repaired
                .into_iter()
                .map(|(why, note)| Event {
                    type_: EventType::Warning,
                    reason: "WaypointRepaired".into(),
                    note: Some(note),
                    action: if why == "deleted" {
                        "Recreate"
                    } else {
                        "Revert"
                    }
                    .into(),
                    secondary: None,
                })
                .collect();
            if !created.is_empty() {
                info!(gateway = %gateway_name(gateway), "waypoint created: {}", created.join(", "));
                events_now.push(Event {
                    type_: EventType::Normal,
                    reason: "WaypointCreated".into(),
                    note: Some(created.join(", ")),
                    action: "Create".into(),
                    secondary: None,
                });
            }
            for event in events_now {
                if let Err(e) = events.publish(&event, &gateway_reference(gateway)).await {
                    debug!("cannot record an event: {e}");
                }
            }
        }
        // A repair of an object no Gateway wants any more is not one.
        repair.retain(|k, _| wanted.contains(k));
        unsure.retain(|k, _| wanted.contains(k) && !applied.contains_key(k));
    }
}

fn gateway_name(gateway: &Gateway) -> String {
    format!(
        "{}/{}",
        gateway.metadata.namespace.as_deref().unwrap_or_default(),
        gateway.metadata.name.as_deref().unwrap_or_default()
    )
}

fn gateway_reference(gateway: &Gateway) -> ObjectReference {
    ObjectReference {
        api_version: Some("gateway.networking.k8s.io/v1".into()),
        kind: Some("Gateway".into()),
        name: gateway.metadata.name.clone(),
        namespace: gateway.metadata.namespace.clone(),
        uid: gateway.metadata.uid.clone(),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gateway(class: &str) -> Gateway {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
            "metadata": {"name": "wp", "namespace": "shop", "uid": "u-1"},
            "spec": {"gatewayClassName": class, "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]}
        }))
        .expect("a Gateway")
    }

    fn settings() -> Settings {
        Settings {
            image: "weft:test".into(),
            controller: "weft-controller.weft-system.svc:15012".into(),
            controller_name: "weft-controller.weft-system.svc".into(),
            trust_domain: "cluster.local".into(),
            roots_pem: "ROOTS".into(),
        }
    }

    /// A Gateway's `spec.infrastructure.parametersRef` to a WaypointParameters sets its
    /// replicas and resources; one naming something else, or nothing there, makes the
    /// Gateway `Accepted: False` (`InvalidParameters`) and leaves its waypoint alone.
    #[test]
    fn waypoint_parameters_are_read_through_the_gateways_parameters_ref() {
        use crate::objects::{AnyObject, Objects, Origin};
        let with_ref = |group: &str, kind: &str, name: &str| {
            let mut g = gateway(WAYPOINT_CLASS);
            g.spec.infrastructure = Some(
                serde_json::from_value(serde_json::json!({
                    "parametersRef": {"group": group, "kind": kind, "name": name}}))
                .unwrap(),
            );
            g
        };
        let params: crate::crd::WaypointParameters = serde_json::from_value(serde_json::json!({
            "apiVersion": "weft.dev/v1alpha1", "kind": "WaypointParameters",
            "metadata": {"name": "big", "namespace": "shop"},
            "spec": {"replicas": 3, "requests": {"cpu": "250m"}, "limits": {"memory": "2Gi"}}}))
        .unwrap();
        let mut objects = Objects::default();
        objects
            .insert(
                AnyObject::WaypointParameters(Arc::new(params)),
                Origin::Cluster,
                true,
            )
            .unwrap();
        let both: crate::crd::WaypointParameters = serde_json::from_value(serde_json::json!({
            "apiVersion": "weft.dev/v1alpha1", "kind": "WaypointParameters",
            "metadata": {"name": "both", "namespace": "shop"},
            "spec": {"replicas": 3, "autoscaling": {"maxReplicas": 5}}}))
        .unwrap();
        objects
            .insert(
                AnyObject::WaypointParameters(Arc::new(both)),
                Origin::Cluster,
                true,
            )
            .unwrap();
        let good = with_ref("weft.dev", "WaypointParameters", "big");
        let spec = parameters(&good, &objects).unwrap().expect("found");
        let d = desired_with(&good, Some(spec), &settings())
            .unwrap()
            .remove(2)
            .1;
        assert_eq!(d["spec"]["replicas"], 3);
        let resources = &d["spec"]["template"]["spec"]["containers"][0]["resources"];
        assert_eq!(resources["requests"]["cpu"], "250m");
        assert_eq!(
            resources["requests"]["memory"], "64Mi",
            "the rest keeps its default"
        );
        assert_eq!(resources["limits"]["memory"], "2Gi");
        assert_eq!(
            parameters(&gateway(WAYPOINT_CLASS), &objects).unwrap(),
            None
        );
        for (bad, says) in [
            (
                with_ref("weft.dev", "WaypointParameters", "small"),
                "no WaypointParameters shop/small",
            ),
            (
                with_ref("", "ConfigMap", "big"),
                "takes a weft.dev WaypointParameters",
            ),
            (
                with_ref("weft.dev", "WaypointParameters", "both"),
                "WaypointParameters shop/both: spec.autoscaling: replicas and autoscaling exclude each other",
            ),
        ] {
            let why = parameters(&bad, &objects).unwrap_err();
            assert!(why.contains(says), "{why}");
            let mut with_gateway = objects.clone();
            with_gateway
                .insert(AnyObject::Gateway(Arc::new(bad)), Origin::Cluster, true)
                .unwrap();
            let status = &crate::translate::gateway_statuses(&with_gateway)[0];
            let accepted = &status.parents[0].1[0];
            assert_eq!(
                (accepted.type_, accepted.status, accepted.reason),
                ("Accepted", false, "InvalidParameters")
            );
        }
    }

    /// Autoscaled: the Deployment names no count (the autoscaler's to set) and a
    /// HorizontalPodAutoscaler targets it; the sandbox runs the fewest it keeps.
    #[test]
    fn an_autoscaled_waypoint_gets_an_autoscaler_and_no_fixed_count() {
        let spec: WaypointParametersSpec = serde_json::from_value(serde_json::json!({
            "autoscaling": {"maxReplicas": 8, "targetCPUUtilizationPercentage": 60}}))
        .unwrap();
        let objects = desired_with(&gateway(WAYPOINT_CLASS), Some(&spec), &settings()).unwrap();
        let of = |kind: &str| {
            objects
                .iter()
                .find(|(k, _)| *k == kind)
                .map(|(_, o)| o.clone())
        };
        let deployment = of("Deployment").unwrap();
        assert!(deployment["spec"]["replicas"].is_null(), "{deployment}");
        let hpa = of("HorizontalPodAutoscaler").expect("an autoscaler");
        assert_eq!(hpa["apiVersion"], "autoscaling/v2");
        assert_eq!(hpa["metadata"]["name"], "wp");
        assert_eq!(hpa["metadata"]["ownerReferences"][0]["kind"], "Gateway");
        assert_eq!(hpa["spec"]["scaleTargetRef"]["name"], "wp");
        assert_eq!(hpa["spec"]["minReplicas"], WAYPOINT_REPLICAS);
        assert_eq!(hpa["spec"]["maxReplicas"], 8);
        let target = &hpa["spec"]["metrics"][0]["resource"];
        assert_eq!(target["name"], "cpu");
        assert_eq!(target["target"]["averageUtilization"], 60);
        assert_eq!(replicas(Some(&spec)), WAYPOINT_REPLICAS);
        // At most one pod: the default minimum follows it down.
        let one: WaypointParametersSpec =
            serde_json::from_value(serde_json::json!({"autoscaling": {"maxReplicas": 1}})).unwrap();
        let objects = desired_with(&gateway(WAYPOINT_CLASS), Some(&one), &settings()).unwrap();
        let hpa = &objects
            .iter()
            .find(|(k, _)| *k == "HorizontalPodAutoscaler")
            .unwrap()
            .1;
        assert_eq!(
            (
                hpa["spec"]["minReplicas"].clone(),
                hpa["spec"]["maxReplicas"].clone()
            ),
            (1.into(), 1.into())
        );
        // Not autoscaled: no autoscaler, a fixed count.
        let objects = desired(&gateway(WAYPOINT_CLASS), &settings()).unwrap();
        assert!(objects.iter().all(|(k, _)| *k != "HorizontalPodAutoscaler"));
        // Parameters the API server would refuse leave the Gateway not accepted.
        let both: WaypointParametersSpec = serde_json::from_value(serde_json::json!({
            "replicas": 2, "autoscaling": {"maxReplicas": 8}}))
        .unwrap();
        assert!(check_parameters(&both)
            .unwrap_err()
            .contains("replicas and autoscaling exclude each other"));
    }

    #[test]
    fn a_waypoint_gateway_gets_its_deployment_service_and_account() {
        assert!(desired(&gateway("other"), &settings()).is_none());
        let objects = desired(&gateway(WAYPOINT_CLASS), &settings()).unwrap();
        let kinds: Vec<&str> = objects.iter().map(|(k, _)| *k).collect();
        assert_eq!(
            kinds,
            [
                "ServiceAccount",
                "ConfigMap",
                "Deployment",
                "Service",
                "PodDisruptionBudget"
            ]
        );
        let by = |k: &str| {
            objects
                .iter()
                .find(|(kind, _)| *kind == k)
                .unwrap()
                .1
                .clone()
        };
        let d = by("Deployment");
        assert_eq!(d["metadata"]["ownerReferences"][0]["uid"], "u-1");
        assert!(
            d["metadata"]["ownerReferences"][0]["blockOwnerDeletion"].is_null(),
            "no grant on gateways/finalizers is needed"
        );
        // Two replicas spread over nodes, one kept through voluntary disruptions.
        assert_eq!(d["spec"]["replicas"], 2);
        let pdb = by("PodDisruptionBudget");
        assert_eq!(pdb["spec"]["maxUnavailable"], 1);
        assert!(
            pdb["spec"]["minAvailable"].is_null(),
            "a drain can evict a lone pod"
        );
        assert_eq!(
            pdb["spec"]["selector"]["matchLabels"][GATEWAY_NAME_LABEL],
            "wp"
        );
        assert_eq!(pdb["metadata"]["ownerReferences"][0]["uid"], "u-1");
        let pod = &d["spec"]["template"];
        assert_eq!(pod["metadata"]["labels"]["weft.dev/mesh"], "disabled");
        assert_eq!(pod["spec"]["serviceAccountName"], "wp");
        // As Pod Security `restricted` asks, on Linux nodes, with no API token mounted.
        assert_eq!(pod["spec"]["securityContext"]["runAsNonRoot"], true);
        assert_eq!(
            pod["spec"]["securityContext"]["seccompProfile"]["type"],
            "RuntimeDefault"
        );
        assert_eq!(pod["spec"]["nodeSelector"]["kubernetes.io/os"], "linux");
        assert_eq!(pod["spec"]["automountServiceAccountToken"], false);
        // The image's waypoint binary, not weftctl: the Dockerfile installs it there.
        let container = &pod["spec"]["containers"][0];
        assert_eq!(container["resources"]["requests"]["cpu"], "100m");
        assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
        assert_eq!(container["startupProbe"]["failureThreshold"], 30);
        assert_eq!(
            container["command"],
            serde_json::json!(["/usr/local/bin/waypoint"])
        );
        let args = container["args"].as_array().unwrap();
        assert_eq!(args[0], "--gateway", "flags only, no subcommand: {args:?}");
        assert!(args.contains(&Value::from("shop/wp")), "{args:?}");
        let s = by("Service");
        assert_eq!(s["spec"]["selector"][GATEWAY_NAME_LABEL], "wp");
        assert_eq!(s["spec"]["ports"][0]["port"], 15008);
        let roots = by("ConfigMap");
        assert_eq!(roots["data"][ROOTS_KEY], "ROOTS");
        assert!(
            roots["metadata"]["ownerReferences"].is_null(),
            "shared, not owned"
        );
        // The Gateway's infrastructure labels and annotations, on every object it owns
        // and its pods; Weft's own labels are not overridden.
        let mut with = gateway(WAYPOINT_CLASS);
        with.spec.infrastructure = Some(
            serde_json::from_value(serde_json::json!({
            "labels": {"team": "shop", GATEWAY_NAME_LABEL: "spoofed"},
            "annotations": {"cost-center": "42"}}))
            .unwrap(),
        );
        for (kind, object) in desired(&with, &settings()).unwrap() {
            if kind == "ConfigMap" {
                continue;
            }
            assert_eq!(object["metadata"]["labels"]["team"], "shop", "{kind}");
            assert_eq!(
                object["metadata"]["labels"][GATEWAY_NAME_LABEL], "wp",
                "{kind}"
            );
            assert_eq!(
                object["metadata"]["annotations"]["cost-center"], "42",
                "{kind}"
            );
        }
        let d = desired(&with, &settings()).unwrap().remove(2).1;
        assert_eq!(d["spec"]["template"]["metadata"]["labels"]["team"], "shop");
        assert_eq!(
            d["spec"]["template"]["metadata"]["annotations"]["cost-center"],
            "42"
        );
        assert_eq!(
            d["spec"]["selector"]["matchLabels"][GATEWAY_NAME_LABEL],
            "wp"
        );
        // Each is what its type would read back.
        let d2: Deployment = serde_json::from_value(d.clone()).unwrap();
        assert_eq!(serde_json::to_value(d2).unwrap(), d);
    }
}
