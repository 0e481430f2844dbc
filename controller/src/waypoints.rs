//! In a cluster, the controller runs each waypoint: for every Gateway of class
//! `weft-waypoint` it applies a ServiceAccount, a Deployment and a Service named after
//! the Gateway (owned by it, so they go when it goes), and the roots ConfigMap the
//! waypoint trusts the controller with, in the Gateway's namespace. The sandbox does
//! the same from the same Gateway itself (`cli/src/sandbox/manifest.rs`).
//!
//! ```text
//!  translation ──Gateways──> Deployer (latest wins) ──server-side apply, field manager
//!                                     weft-controller──> ServiceAccount, ConfigMap,
//!                                     Deployment, Service   (unchanged: not sent again;
//!                                     failed: retried every 30 s)
//! ```

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use gateway_api::gateways::Gateway;
use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMap, ConfigMapVolumeSource, Container, ContainerPort, HTTPGetAction,
    PodSpec, PodTemplateSpec, Probe, ResourceRequirements, SecurityContext, Service,
    ServiceAccount, ServicePort, ServiceSpec, TopologySpreadConstraint, Volume, VolumeMount,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, ObjectMeta, Patch, PatchParams};
use kube::Client;
use serde_json::Value;
use tokio::sync::watch;
use tracing::{info, warn};

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
        block_owner_deletion: Some(true),
    };
    let labels = BTreeMap::from([
        (GATEWAY_NAME_LABEL.to_owned(), name.clone()),
        ("app.kubernetes.io/part-of".to_owned(), "weft".to_owned()),
    ]);
    let meta = |name: &str| ObjectMeta {
        name: Some(name.to_owned()),
        namespace: Some(namespace.clone()),
        labels: Some(labels.clone()),
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
            requests: Some(BTreeMap::from([
                ("cpu".to_owned(), Quantity("100m".into())),
                ("memory".to_owned(), Quantity("64Mi".into())),
            ])),
            limits: Some(BTreeMap::from([(
                "memory".to_owned(),
                Quantity("1Gi".into()),
            )])),
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
            replicas: Some(WAYPOINT_REPLICAS),
            selector: LabelSelector {
                match_labels: Some(selector.clone()),
                ..Default::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels),
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
            min_available: Some(IntOrString::Int(1)),
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
    Some(vec![
        ("ServiceAccount", json(serde_json::to_value(account))),
        ("ConfigMap", json(serde_json::to_value(roots))),
        ("Deployment", json(serde_json::to_value(deployment))),
        ("Service", json(serde_json::to_value(service))),
        ("PodDisruptionBudget", json(serde_json::to_value(budget))),
    ])
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

/// Applies the waypoints' objects in the background: latest set of Gateways wins.
pub struct Deployer {
    tx: watch::Sender<Arc<Vec<Arc<Gateway>>>>,
}

impl Deployer {
    /// A deployer applying through `client`.
    pub fn new(client: Client, settings: Settings) -> Self {
        let (tx, rx) = watch::channel(Arc::new(Vec::new()));
        tokio::spawn(apply_loop(client, settings, rx));
        Deployer { tx }
    }

    /// The Gateways of the latest translation.
    pub fn write(&self, gateways: Vec<Arc<Gateway>>) {
        self.tx.send_replace(Arc::new(gateways));
    }
}

async fn apply_one(client: &Client, kind: &str, object: &Value) -> Result<(), kube::Error> {
    let ns = object["metadata"]["namespace"].as_str().unwrap_or_default();
    let name = object["metadata"]["name"].as_str().unwrap_or_default();
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let patch = Patch::Apply(object);
    match kind {
        "ServiceAccount" => {
            Api::<ServiceAccount>::namespaced(client.clone(), ns)
                .patch(name, &params, &patch)
                .await?;
        }
        "ConfigMap" => {
            Api::<ConfigMap>::namespaced(client.clone(), ns)
                .patch(name, &params, &patch)
                .await?;
        }
        "Deployment" => {
            Api::<Deployment>::namespaced(client.clone(), ns)
                .patch(name, &params, &patch)
                .await?;
        }
        "PodDisruptionBudget" => {
            Api::<PodDisruptionBudget>::namespaced(client.clone(), ns)
                .patch(name, &params, &patch)
                .await?;
        }
        _ => {
            Api::<Service>::namespaced(client.clone(), ns)
                .patch(name, &params, &patch)
                .await?;
        }
    }
    Ok(())
}

async fn apply_loop(
    client: Client,
    settings: Settings,
    mut rx: watch::Receiver<Arc<Vec<Arc<Gateway>>>>,
) {
    // What was applied last, per object; a failed apply is retried.
    let mut applied: HashMap<(String, String, String), Value> = HashMap::new();
    let mut retry = tokio::time::interval(Duration::from_secs(30));
    loop {
        tokio::select! {
            changed = rx.changed() => if changed.is_err() { return },
            _ = retry.tick() => {}
        }
        let gateways = rx.borrow_and_update().clone();
        for gateway in gateways.iter() {
            let Some(objects) = desired(gateway, &settings) else {
                continue;
            };
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
                if applied.get(&key) == Some(&object) {
                    continue;
                }
                match apply_one(&client, kind, &object).await {
                    Ok(()) => {
                        info!(kind, namespace = %key.1, name = %key.2, "waypoint object applied");
                        applied.insert(key, object);
                    }
                    Err(e) => warn!(
                        kind,
                        namespace = %key.1,
                        name = %key.2,
                        "cannot apply the waypoint's {kind}: {e}; retrying in 30 s"
                    ),
                }
            }
        }
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
        // Two replicas spread over nodes, one kept through voluntary disruptions.
        assert_eq!(d["spec"]["replicas"], 2);
        let pdb = by("PodDisruptionBudget");
        assert_eq!(pdb["spec"]["minAvailable"], 1);
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
        // Each is what its type would read back.
        let d2: Deployment = serde_json::from_value(d.clone()).unwrap();
        assert_eq!(serde_json::to_value(d2).unwrap(), d);
    }
}
