//! Reads what the sandbox runs from the user's manifests into a plain [`Cluster`].
//!
//! ```text
//! DIR/*.yaml|*.yml (sorted) -> YAML documents -> kind dispatch -> k8s-openapi types
//!     -> validation (nodeName, command, ports, names, namespaces) -> Cluster
//! ```
//!
//! The sandbox plays scheduler and kubelet only: it reads Namespaces (their labels decide
//! which pods it captures), Pods and Deployments (expanded into their replicas) to run,
//! and Services to give cluster IPs and DNS names. It places each pod on the simulated node
//! its `spec.nodeName` names, or schedules it (spread over `node-1`..`node-N`, the same
//! node every time for the same pod), and runs each pod's first container `command` as a
//! process (the image is for a cluster).
//! Every other kind (policies, routes, gateways, ...) is the controller's to read and is
//! skipped here, as is checking what the controller checks.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Pod, PodSpec as K8sPodSpec, Service};
use k8s_openapi::Resource;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_yaml_ng::Value;

/// Namespace of objects that name none, created implicitly when used.
const DEFAULT_NAMESPACE: &str = "default";

/// Everything the sandbox runs, in file and document order.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Cluster {
    /// Declared namespaces, plus an implicit `default` (first) when objects use it.
    pub namespaces: Vec<NamespaceSpec>,
    /// Pods, with each Deployment expanded into its replicas.
    pub pods: Vec<PodSpec>,
    /// Services.
    pub services: Vec<ServiceSpec>,
}

/// A namespace and the labels that decide, e.g., whether the mesh captures it.
#[derive(Debug, Clone, PartialEq)]
pub struct NamespaceSpec {
    /// Namespace name.
    pub name: String,
    /// `metadata.labels`.
    pub labels: BTreeMap<String, String>,
}

/// One pod: a process in its own network namespace on a simulated node.
#[derive(Debug, Clone, PartialEq)]
pub struct PodSpec {
    /// Pod name; `<deployment>-<i>` for the replicas of a Deployment.
    pub name: String,
    /// Namespace name.
    pub namespace: String,
    /// `spec.nodeName`: the simulated node that runs the pod.
    pub node: String,
    /// `spec.serviceAccountName`, `default` when not given.
    pub service_account: String,
    /// Pod labels (a Deployment's template labels).
    pub labels: BTreeMap<String, String>,
    /// First container's `command` followed by its `args`; never empty.
    pub command: Vec<String>,
    /// First container's environment variables with plain values (`valueFrom` is skipped).
    pub env: Vec<(String, String)>,
    /// First container's ports: name (if any) and number.
    pub ports: Vec<(Option<String>, u16)>,
    /// For the pod the sandbox runs for a Gateway of class `weft-waypoint`: the
    /// Gateway, `namespace/name`. Its process is the `waypoint` binary, started by the
    /// sandbox with the controller's address and its own token.
    pub waypoint: Option<String>,
    /// First container's `readinessProbe`: the kubelet runs it from the node; the pod is
    /// Ready once it passes.
    pub readiness: Option<Probe>,
    /// First container's `livenessProbe`: the kubelet restarts the container when it
    /// fails `failureThreshold` times in a row.
    pub liveness: Option<Probe>,
}

/// A probe the sandbox's kubelet runs, as Kubernetes defines it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    /// What it checks.
    pub action: ProbeAction,
    /// `initialDelaySeconds`.
    pub initial_delay: Duration,
    /// `periodSeconds` (default 10).
    pub period: Duration,
    /// `timeoutSeconds` (default 1).
    pub timeout: Duration,
    /// `failureThreshold` (default 3).
    pub failure_threshold: u32,
    /// `successThreshold` (default 1).
    pub success_threshold: u32,
}

/// A probe's check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeAction {
    /// `httpGet`: a GET answered 200-399.
    Http {
        /// `path`.
        path: String,
        /// `port`, resolved.
        port: u16,
    },
    /// `tcpSocket`: the port accepts a connection.
    Tcp {
        /// `port`, resolved.
        port: u16,
    },
}

/// A service: the sandbox gives it a cluster IP and DNS names.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceSpec {
    /// Service name.
    pub name: String,
    /// Namespace name.
    pub namespace: String,
    /// `spec.clusterIP` when given as an address.
    pub cluster_ip: Option<IpAddr>,
    /// `spec.clusterIP: None`: no cluster IP, no name to resolve to one.
    pub headless: bool,
    /// `spec.ipFamilies`, as "is IPv6" (empty: the cluster's primary family).
    pub families: Vec<bool>,
    /// `spec.ipFamilyPolicy` is `PreferDualStack` or `RequireDualStack`.
    pub dual_stack: bool,
    /// `spec.ipFamilyPolicy` is `RequireDualStack`.
    pub require_dual_stack: bool,
    /// The object as written, to hand to the controller with the cluster IP filled in.
    pub object: Service,
}

/// Why a manifest directory cannot run in the sandbox.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// The directory cannot be listed.
    #[error(
        "cannot list manifest directory {dir}: {source} — pass an existing, readable directory"
    )]
    ReadDir {
        /// The directory.
        dir: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A manifest file cannot be read.
    #[error("{file}: cannot read: {source}")]
    Read {
        /// The file.
        file: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A file is not valid YAML; the source names line and column.
    #[error("{file}: invalid YAML: {source}")]
    Syntax {
        /// The file.
        file: PathBuf,
        /// The parser error, with its location.
        source: serde_yaml_ng::Error,
    },
    /// A document is not a Kubernetes object.
    #[error(
        "{file}: document {document} has no kind — every YAML document must be a Kubernetes \
         object with apiVersion and kind"
    )]
    MissingKind {
        /// The file.
        file: PathBuf,
        /// Position of the document in the file, from 1.
        document: usize,
    },
    /// An object does not match its Kubernetes schema.
    #[error("{file}: {object}: {source} — fix it to match the Kubernetes schema of its kind")]
    Schema {
        /// The file.
        file: PathBuf,
        /// The object, as `Kind namespace/name`.
        object: String,
        /// The decoding error.
        source: serde_yaml_ng::Error,
    },
    /// A field is missing or holds a value the sandbox cannot run.
    #[error("{file}: {object}: {field} {problem}")]
    Invalid {
        /// The file.
        file: PathBuf,
        /// The object, as `Kind namespace/name` (or `Namespace name`).
        object: String,
        /// The field path, e.g. `spec.template.spec.nodeName`.
        field: String,
        /// What is wrong and what to do about it.
        problem: String,
    },
}

/// What the sandbox's API server and scheduler bring beyond the manifests.
#[derive(Default)]
pub struct ApiServer {
    /// The Gateway API CRDs the "cluster" has installed (`--gateway-api-crds`): Gateway
    /// API objects are checked against them (schema, unknown fields, CEL rules), and a
    /// kind they do not define is refused. `None`: Gateway API objects are not checked.
    pub gateway_api: Option<crdcheck::Crds>,
    /// Where Gateway API CRDs came from, for messages.
    pub gateway_api_dir: Option<PathBuf>,
    /// The nodes a pod that names none (`spec.nodeName`) is scheduled on: `node-1` up to
    /// `node-<nodes>` (at least 1).
    pub nodes: u16,
}

impl ApiServer {
    /// With the Gateway API CRDs of every YAML file in `dir`.
    pub fn with_gateway_api(mut self, dir: &Path) -> Result<Self, ManifestError> {
        let list_error = |source| ManifestError::ReadDir {
            dir: dir.to_owned(),
            source,
        };
        let mut documents = Vec::new();
        let mut files: Vec<PathBuf> = fs::read_dir(dir)
            .map_err(list_error)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
            .collect();
        files.sort();
        for file in &files {
            let text = fs::read_to_string(file).map_err(|source| ManifestError::Read {
                file: file.clone(),
                source,
            })?;
            for document in serde_yaml_ng::Deserializer::from_str(&text) {
                let value = serde_json::Value::deserialize(document).map_err(|e| {
                    ManifestError::Invalid {
                        file: file.clone(),
                        object: "CustomResourceDefinition".into(),
                        field: String::new(),
                        problem: e.to_string(),
                    }
                })?;
                if value["kind"] == "CustomResourceDefinition" {
                    documents.push(value);
                }
            }
        }
        let crds = crdcheck::Crds::new(&documents).map_err(|e| ManifestError::Invalid {
            file: dir.to_owned(),
            object: "CustomResourceDefinition".into(),
            field: String::new(),
            problem: e.to_string(),
        })?;
        self.gateway_api = Some(crds);
        self.gateway_api_dir = Some(dir.to_owned());
        Ok(self)
    }

    /// The node a pod that names none runs on: spread over the nodes, the same one
    /// every time for the same pod (`key` is its Deployment's or its own name, `index`
    /// its replica).
    fn schedule(&self, key: &str, index: u32) -> String {
        // FNV-1a: stable across runs, so a pod keeps its node when the manifests change.
        let hash = key.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
        let nodes = u64::from(self.nodes.max(1));
        format!("node-{}", 1 + (hash + u64::from(index)) % nodes)
    }
}

/// Loads every `*.yaml` and `*.yml` file directly in `dir`, in name order, as an API
/// server with Weft's CRDs and no Gateway API CRDs, with two nodes to schedule on.
pub fn load_dir(dir: &Path) -> Result<Cluster, ManifestError> {
    load_dir_with(
        dir,
        &ApiServer {
            nodes: 2,
            ..ApiServer::default()
        },
    )
}

/// Loads every `*.yaml` and `*.yml` file directly in `dir`, in name order.
pub fn load_dir_with(dir: &Path, api: &ApiServer) -> Result<Cluster, ManifestError> {
    let list_error = |source| ManifestError::ReadDir {
        dir: dir.to_owned(),
        source,
    };
    let mut files = Vec::new();
    for entry in fs::read_dir(dir).map_err(list_error)? {
        let path = entry.map_err(list_error)?.path();
        let is_yaml = matches!(
            path.extension().and_then(|ext| ext.to_str()),
            Some("yaml" | "yml")
        );
        if is_yaml && path.is_file() {
            files.push(path);
        }
    }
    files.sort();

    let mut loader = Loader {
        api,
        cluster: Cluster::default(),
        defined: HashMap::new(),
        uses: Vec::new(),
        waypoint_parameters: HashMap::new(),
        waypoints: Vec::new(),
    };
    for file in &files {
        let text = fs::read_to_string(file).map_err(|source| ManifestError::Read {
            file: file.clone(),
            source,
        })?;
        loader.load_file(file, &text)?;
    }
    loader.finish()
}

/// The object a document defines, for error messages.
struct Object<'a> {
    file: &'a Path,
    /// `Kind namespace/name`, or `Namespace name`.
    label: String,
}

impl Object<'_> {
    fn invalid(&self, field: impl Into<String>, problem: impl Into<String>) -> ManifestError {
        ManifestError::Invalid {
            file: self.file.to_owned(),
            object: self.label.clone(),
            field: field.into(),
            problem: problem.into(),
        }
    }

    /// Decodes the document from the original text, so errors carry field path and location.
    fn decode<T: Resource + DeserializeOwned + serde::Serialize>(
        &self,
        value: &Value,
        document: serde_yaml_ng::Deserializer<'_>,
    ) -> Result<T, ManifestError> {
        // Checked here because the decoder reports a wrong apiVersion without naming the field.
        let api_version = value.get("apiVersion").and_then(Value::as_str);
        if api_version != Some(T::API_VERSION) {
            let found = api_version.map_or("missing".to_owned(), |found| format!("{found:?}"));
            return Err(self.invalid(
                "apiVersion",
                format!(
                    "is {found} — a {} needs apiVersion: {}",
                    T::KIND,
                    T::API_VERSION
                ),
            ));
        }
        let decoded = T::deserialize(document).map_err(|source| ManifestError::Schema {
            file: self.file.to_owned(),
            object: self.label.clone(),
            source,
        })?;
        // Strict field validation, as `kubectl` asks of the API server: a field the
        // kind does not have (lost when the object is read and written back) is refused.
        let given = serde_json::to_value(value).unwrap_or_default();
        let kept = serde_json::to_value(&decoded).unwrap_or_default();
        if let Some(field) = unknown_field(&given, &kept, "") {
            return Err(self.invalid(
                field,
                format!(
                    "is not a field of a {} — the API server refuses it (strict field validation; a typo?)",
                    T::KIND
                ),
            ));
        }
        Ok(decoded)
    }
}

/// The first field of `given` that `kept` lacks, as a path (`spec.template.spec.nodeNme`,
/// `spec.containers[0].portz`); nulls are nothing given.
fn unknown_field(given: &serde_json::Value, kept: &serde_json::Value, at: &str) -> Option<String> {
    use serde_json::Value as J;
    match (given, kept) {
        (J::Object(given), J::Object(kept)) => given.iter().find_map(|(key, value)| {
            let path = if at.is_empty() {
                key.clone()
            } else {
                format!("{at}.{key}")
            };
            match kept.get(key) {
                None if !value.is_null() => Some(path),
                None => None,
                Some(k) => unknown_field(value, k, &path),
            }
        }),
        (J::Array(given), J::Array(kept)) => given
            .iter()
            .zip(kept)
            .enumerate()
            .find_map(|(i, (g, k))| unknown_field(g, k, &format!("{at}[{i}]"))),
        _ => None,
    }
}

/// `spec.gatewayClassName` of the Gateways that are waypoints.
pub const WAYPOINT_CLASS: &str = "weft-waypoint";
/// The label on a waypoint's pods and in its Service's selector (as Istio's and the
/// Gateway API's implementations label a Gateway's pods).
pub const GATEWAY_NAME_LABEL: &str = "gateway.networking.k8s.io/gateway-name";
/// Gateway annotation: the simulated node that runs the waypoint's pod.
pub const WAYPOINT_NODE_ANNOTATION: &str = "sandbox.weft.dev/node";
/// The node of a waypoint's pod when its Gateway does not say.
pub const DEFAULT_WAYPOINT_NODE: &str = "node-1";

/// The kinds the sandbox runs.
enum Kind {
    Namespace,
    Pod,
    Deployment,
    Service,
    Gateway,
}

/// Where a name was first defined: file and object.
type Definition = (PathBuf, String);

/// Weft's CRDs, as `weftctl install` renders them, to check Weft objects as an API
/// server with them installed does.
fn weft_crds() -> &'static crdcheck::Crds {
    static CRDS: std::sync::LazyLock<crdcheck::Crds> = std::sync::LazyLock::new(|| {
        let text = controller::crd::crds_yaml().unwrap_or_default();
        let documents: Vec<serde_json::Value> = serde_yaml_ng::Deserializer::from_str(&text)
            .filter_map(|d| serde_json::Value::deserialize(d).ok())
            .collect();
        // Built from Weft's own types: a failure is a bug, caught by the tests below.
        crdcheck::Crds::new(&documents).unwrap_or_default()
    });
    &CRDS
}

struct Loader<'a> {
    api: &'a ApiServer,
    cluster: Cluster,
    /// First definition of each (kind, namespace, name), to report duplicates.
    defined: HashMap<(&'static str, String, String), Definition>,
    /// Objects and the namespace they use, checked once every file is read.
    uses: Vec<(Definition, String)>,
    /// WaypointParameters by `namespace/name`.
    waypoint_parameters: HashMap<String, controller::crd::WaypointParametersSpec>,
    /// The waypoint Gateways read, whose other replicas are added once every file is
    /// read (their WaypointParameters may come later).
    waypoints: Vec<WaypointReplicas>,
}

/// A waypoint Gateway's pods beyond its first, to run once its WaypointParameters are
/// known.
struct WaypointReplicas {
    definition: Definition,
    /// The WaypointParameters its `spec.infrastructure.parametersRef` names,
    /// `namespace/name`.
    parameters: Option<String>,
    /// Its first pod, the template of the others.
    first: PodSpec,
}

impl Loader<'_> {
    fn load_file(&mut self, file: &Path, text: &str) -> Result<(), ManifestError> {
        // Each document is parsed twice: to a `Value` to read its kind and name, then into
        // its Kubernetes type from the text, so schema errors point into the file.
        let values = serde_yaml_ng::Deserializer::from_str(text);
        let documents = serde_yaml_ng::Deserializer::from_str(text);
        for (index, (value, document)) in values.zip(documents).enumerate() {
            let value = Value::deserialize(value).map_err(|source| ManifestError::Syntax {
                file: file.to_owned(),
                source,
            })?;
            if !value.is_null() {
                self.load_document(file, index + 1, &value, document)?;
            }
        }
        Ok(())
    }

    fn load_document(
        &mut self,
        file: &Path,
        number: usize,
        value: &Value,
        document: serde_yaml_ng::Deserializer<'_>,
    ) -> Result<(), ManifestError> {
        let Some(kind) = value.get("kind").and_then(Value::as_str).map(str::to_owned) else {
            return Err(ManifestError::MissingKind {
                file: file.to_owned(),
                document: number,
            });
        };
        let metadata = |key| {
            value
                .get("metadata")
                .and_then(|metadata| metadata.get(key))
                .and_then(Value::as_str)
                .map(str::to_owned)
        };
        let namespace = metadata("namespace").unwrap_or_else(|| DEFAULT_NAMESPACE.to_owned());
        let name = metadata("name").filter(|name| !name.is_empty());
        let shown = name
            .clone()
            .unwrap_or_else(|| format!("<document {number}>"));
        let label = match kind.as_str() {
            "Namespace" => format!("Namespace {shown}"),
            _ => format!("{kind} {namespace}/{shown}"),
        };
        let object = Object { file, label };
        // Weft's own kinds: the API server would check them against their CRDs.
        let weft = value
            .get("apiVersion")
            .and_then(Value::as_str)
            .is_some_and(|v| v.starts_with("weft.dev/"));
        let gateway_api = value
            .get("apiVersion")
            .and_then(Value::as_str)
            .is_some_and(|v| v.starts_with("gateway.networking.k8s.io/"));
        let checked = match (weft, gateway_api, &self.api.gateway_api) {
            (true, _, _) => serde_json::to_value(value)
                .ok()
                .and_then(|json| weft_crds().check(&json)),
            (_, true, Some(crds)) => {
                let json = serde_json::to_value(value).unwrap_or_default();
                let from = self
                    .api
                    .gateway_api_dir
                    .as_ref()
                    .map(|d| d.display().to_string())
                    .unwrap_or_default();
                match crds.check(&json) {
                    Some(violations) if !violations.is_empty() => {
                        let first = &violations[0];
                        let more: String =
                            violations[1..].iter().map(|v| format!("; {v}")).collect();
                        return Err(object.invalid(
                            first.field.clone(),
                            format!(
                                "{}{more} — the API server refuses it (the Gateway API CRDs of {from})",
                                first.message
                            ),
                        ));
                    }
                    Some(_) => None,
                    None => {
                        return Err(object.invalid(
                            "kind",
                            format!(
                                "{kind} is not served: the Gateway API CRDs installed ({from}) do not define it (another release or channel may)"
                            ),
                        ))
                    }
                }
            }
            _ => None,
        };
        if let Some(violations) = checked {
            if let Some(first) = violations.first() {
                let more: String = violations[1..].iter().map(|v| format!("; {v}")).collect();
                return Err(object.invalid(
                    first.field.clone(),
                    format!(
                        "{}{more} — the API server refuses it (see deploy/crds/weft.dev.yaml)",
                        first.message
                    ),
                ));
            }
        }
        if kind == "WaypointParameters" {
            // Read here for the replicas of the waypoints naming it (the controller
            // would render them into their Deployments); checked against the CRD above.
            if let (Some(name), Some(spec)) = (&name, value.get("spec")) {
                let spec = serde_yaml_ng::from_value(spec.clone())
                    .map_err(|e| object.invalid("spec", e.to_string()))?;
                self.waypoint_parameters
                    .insert(format!("{namespace}/{name}"), spec);
            }
            return Ok(());
        }
        let kind = match kind.as_str() {
            "Namespace" => Kind::Namespace,
            "Pod" => Kind::Pod,
            "Deployment" => Kind::Deployment,
            "Service" => Kind::Service,
            // A waypoint's Gateway: the sandbox runs its pod, as the controller's
            // Deployment would in a cluster. The controller reads the Gateway too.
            "Gateway"
                if value
                    .get("spec")
                    .and_then(|s| s.get("gatewayClassName"))
                    .and_then(Value::as_str)
                    == Some(WAYPOINT_CLASS) =>
            {
                Kind::Gateway
            }
            // Policies, routes, other gateways...: the controller reads those.
            _ => return Ok(()),
        };
        let Some(name) = name else {
            return Err(object.invalid("metadata.name", "is missing — give every object a name"));
        };

        match kind {
            Kind::Namespace => {
                let ns: Namespace = object.decode(value, document)?;
                self.define(&object, "Namespace", "", &name)?;
                self.cluster.namespaces.push(NamespaceSpec {
                    name,
                    labels: ns.metadata.labels.unwrap_or_default(),
                });
            }
            Kind::Pod => {
                let pod: Pod = object.decode(value, document)?;
                let spec = pod
                    .spec
                    .ok_or_else(|| object.invalid("spec", "is missing — a pod needs containers"))?;
                let template = pod_template(&object, "spec", spec)?;
                self.define(&object, "Pod", &namespace, &name)?;
                self.use_namespace(&object, &namespace);
                let labels = pod.metadata.labels.unwrap_or_default();
                let key = format!("{namespace}/{name}");
                let api = self.api;
                self.cluster
                    .pods
                    .push(template.into_pod(name, namespace, labels, || api.schedule(&key, 0)));
            }
            Kind::Deployment => {
                let deployment: Deployment = object.decode(value, document)?;
                let spec = deployment.spec.ok_or_else(|| {
                    object.invalid("spec", "is missing — a deployment needs a pod template")
                })?;
                let replicas = spec.replicas.unwrap_or(1);
                let replicas = u32::try_from(replicas).map_err(|_| {
                    object.invalid("spec.replicas", format!("is {replicas} — use 0 or more"))
                })?;
                let pod_spec = spec.template.spec.ok_or_else(|| {
                    object.invalid(
                        "spec.template.spec",
                        "is missing — a deployment needs a pod template with containers",
                    )
                })?;
                let template = pod_template(&object, "spec.template.spec", pod_spec)?;
                let labels = spec
                    .template
                    .metadata
                    .and_then(|metadata| metadata.labels)
                    .unwrap_or_default();
                self.define(&object, "Deployment", &namespace, &name)?;
                self.use_namespace(&object, &namespace);
                let key = format!("{namespace}/{name}");
                for i in 0..replicas {
                    let pod_name = format!("{name}-{i}");
                    self.define(&object, "Pod", &namespace, &pod_name)?;
                    let api = self.api;
                    let pod = template.clone().into_pod(
                        pod_name,
                        namespace.clone(),
                        labels.clone(),
                        || api.schedule(&key, i),
                    );
                    self.cluster.pods.push(pod);
                }
            }
            Kind::Gateway => {
                let node = value
                    .get("metadata")
                    .and_then(|m| m.get("annotations"))
                    .and_then(|a| a.get(WAYPOINT_NODE_ANNOTATION))
                    .and_then(Value::as_str)
                    .unwrap_or(DEFAULT_WAYPOINT_NODE)
                    .to_owned();
                let pod_name = format!("{name}-0");
                self.define(&object, "Pod", &namespace, &pod_name)?;
                self.define(&object, "Service", &namespace, &name)?;
                self.use_namespace(&object, &namespace);
                let labels = BTreeMap::from([
                    (GATEWAY_NAME_LABEL.to_owned(), name.clone()),
                    ("weft.dev/mesh".to_owned(), "disabled".to_owned()),
                ]);
                let first = PodSpec {
                    name: pod_name,
                    namespace: namespace.clone(),
                    node,
                    service_account: name.clone(),
                    labels,
                    command: vec![super::WAYPOINT_BIN.into()],
                    env: Vec::new(),
                    ports: vec![(Some("mesh".into()), tunnel::hbone::PORT)],
                    waypoint: Some(format!("{namespace}/{name}")),
                    readiness: None,
                    liveness: None,
                };
                let infrastructure = value.get("spec").and_then(|s| s.get("infrastructure"));
                let reference = infrastructure.and_then(|i| i.get("parametersRef"));
                let parameters = reference
                    .filter(|r| {
                        r.get("group").and_then(Value::as_str) == Some("weft.dev")
                            && r.get("kind").and_then(Value::as_str) == Some("WaypointParameters")
                    })
                    .and_then(|r| r.get("name"))
                    .and_then(Value::as_str)
                    .map(|p| format!("{namespace}/{p}"));
                self.waypoints.push(WaypointReplicas {
                    definition: (object.file.to_owned(), object.label.clone()),
                    parameters,
                    first: first.clone(),
                });
                self.cluster.pods.push(first);
                let service: Service = serde_json::from_value(serde_json::json!({
                    "apiVersion": "v1",
                    "kind": "Service",
                    "metadata": {
                        "name": name,
                        "namespace": namespace,
                        "labels": { GATEWAY_NAME_LABEL: name },
                    },
                    "spec": {
                        "selector": { GATEWAY_NAME_LABEL: name },
                        "ports": [{
                            "name": "mesh",
                            "port": tunnel::hbone::PORT,
                            "targetPort": tunnel::hbone::PORT,
                            "appProtocol": "https",
                        }],
                    },
                }))
                .map_err(|e| object.invalid("metadata", format!("cannot make its Service: {e}")))?;
                self.cluster.services.push(ServiceSpec {
                    name,
                    namespace,
                    cluster_ip: None,
                    headless: false,
                    families: Vec::new(),
                    dual_stack: false,
                    require_dual_stack: false,
                    object: service,
                });
            }
            Kind::Service => {
                let service: Service = object.decode(value, document)?;
                let spec = service.spec.clone().unwrap_or_default();
                let (cluster_ip, headless) = match spec.cluster_ip.as_deref() {
                    None | Some("") => (None, false),
                    Some("None") => (None, true),
                    Some(ip) => (
                        Some(ip.parse().map_err(|_| {
                            object.invalid(
                                "spec.clusterIP",
                                format!(
                                    "{ip:?} is not an IP address — give one like 10.96.0.10, or \
                                     leave it out"
                                ),
                            )
                        })?),
                        false,
                    ),
                };
                let mut families = Vec::new();
                for (i, family) in spec.ip_families.iter().flatten().enumerate() {
                    families.push(match family.as_str() {
                        "IPv4" => false,
                        "IPv6" => true,
                        other => {
                            return Err(object.invalid(
                                format!("spec.ipFamilies[{i}]"),
                                format!("{other:?} is not a family: IPv4 or IPv6"),
                            ))
                        }
                    });
                }
                let dual_stack = match spec.ip_family_policy.as_deref() {
                    None | Some("SingleStack") => false,
                    Some("PreferDualStack" | "RequireDualStack") => true,
                    Some(other) => {
                        return Err(object.invalid(
                            "spec.ipFamilyPolicy",
                            format!(
                                "{other:?} is not a policy: SingleStack, PreferDualStack or \
                                 RequireDualStack"
                            ),
                        ))
                    }
                };
                let require_dual_stack =
                    spec.ip_family_policy.as_deref() == Some("RequireDualStack");
                if families.len() > 2 || (families.len() == 2 && families[0] == families[1]) {
                    return Err(object.invalid(
                        "spec.ipFamilies",
                        "lists a family twice; give IPv4, IPv6, or both once".to_owned(),
                    ));
                }
                if families.len() == 2 && !dual_stack {
                    return Err(object.invalid(
                        "spec.ipFamilies",
                        "lists two families, which a SingleStack service cannot have: set \
                         spec.ipFamilyPolicy to PreferDualStack or RequireDualStack"
                            .to_owned(),
                    ));
                }
                if dual_stack && cluster_ip.is_some() {
                    return Err(object.invalid(
                        "spec.clusterIP",
                        "a dual-stack service (spec.ipFamilyPolicy) gets its addresses from \
                         the sandbox: leave spec.clusterIP out"
                            .to_owned(),
                    ));
                }
                self.define(&object, "Service", &namespace, &name)?;
                self.use_namespace(&object, &namespace);
                self.cluster.services.push(ServiceSpec {
                    name,
                    namespace,
                    cluster_ip,
                    headless,
                    families,
                    dual_stack,
                    require_dual_stack,
                    object: service,
                });
            }
        }
        Ok(())
    }

    /// Records that `object` defines `kind` `namespace/name`, failing if something already did.
    fn define(
        &mut self,
        object: &Object<'_>,
        kind: &'static str,
        namespace: &str,
        name: &str,
    ) -> Result<(), ManifestError> {
        let key = (kind, namespace.to_owned(), name.to_owned());
        if let Some((first_file, first_object)) = self.defined.get(&key) {
            return Err(object.invalid(
                "metadata.name",
                format!(
                    "gives {kind} name {name:?}, already defined by {first_object} in {} — \
                     names must be unique per kind and namespace; rename one of them",
                    first_file.display()
                ),
            ));
        }
        let definition = (object.file.to_owned(), object.label.clone());
        self.defined.insert(key, definition);
        Ok(())
    }

    fn use_namespace(&mut self, object: &Object<'_>, namespace: &str) {
        let definition = (object.file.to_owned(), object.label.clone());
        self.uses.push((definition, namespace.to_owned()));
    }

    fn finish(mut self) -> Result<Cluster, ManifestError> {
        // A waypoint runs the replicas of the Deployment the controller renders for it
        // (`weft.dev` WaypointParameters' `replicas`, or the controller's default), its
        // first pod on the Gateway's node and the others spread over the next nodes, as
        // the Deployment's topology spread asks.
        for waypoint in std::mem::take(&mut self.waypoints) {
            let parameters = waypoint
                .parameters
                .as_ref()
                .and_then(|p| self.waypoint_parameters.get(p));
            let replicas = u32::try_from(controller::waypoints::replicas(parameters)).unwrap_or(1);
            let gateway = waypoint.first.waypoint.clone().unwrap_or_default();
            let base = waypoint.first.name.trim_end_matches("-0").to_owned();
            let first_node = waypoint
                .first
                .node
                .strip_prefix("node-")
                .and_then(|n| n.parse::<u32>().ok());
            let object = Object {
                file: &waypoint.definition.0,
                label: waypoint.definition.1.clone(),
            };
            for i in 1..replicas {
                let name = format!("{base}-{i}");
                self.define(&object, "Pod", &waypoint.first.namespace, &name)?;
                let node = match first_node {
                    Some(n) => format!(
                        "node-{}",
                        1 + (n.saturating_sub(1) + i) % u32::from(self.api.nodes.max(1))
                    ),
                    None => self.api.schedule(&gateway, i),
                };
                self.cluster.pods.push(PodSpec {
                    name,
                    node,
                    ..waypoint.first.clone()
                });
            }
        }
        for ((file, label), namespace) in &self.uses {
            if self
                .cluster
                .namespaces
                .iter()
                .any(|ns| &ns.name == namespace)
            {
                continue;
            }
            if namespace == DEFAULT_NAMESPACE {
                let default = NamespaceSpec {
                    name: DEFAULT_NAMESPACE.to_owned(),
                    labels: BTreeMap::new(),
                };
                self.cluster.namespaces.insert(0, default);
                continue;
            }
            let object = Object {
                file,
                label: label.clone(),
            };
            return Err(object.invalid(
                "metadata.namespace",
                format!(
                    "{namespace:?} has no Namespace document — add one (apiVersion: v1, \
                     kind: Namespace, metadata.name: {namespace}) to the directory"
                ),
            ));
        }
        Ok(self.cluster)
    }
}

/// The parts of a pod shared by all replicas of a Deployment.
#[derive(Clone)]
struct PodTemplate {
    /// `spec.nodeName`; `None`: the sandbox schedules it.
    node: Option<String>,
    service_account: String,
    command: Vec<String>,
    env: Vec<(String, String)>,
    ports: Vec<(Option<String>, u16)>,
    readiness: Option<Probe>,
    liveness: Option<Probe>,
}

impl PodTemplate {
    fn into_pod(
        self,
        name: String,
        namespace: String,
        labels: BTreeMap<String, String>,
        scheduled: impl FnOnce() -> String,
    ) -> PodSpec {
        PodSpec {
            name,
            namespace,
            node: self.node.unwrap_or_else(scheduled),
            service_account: self.service_account,
            labels,
            command: self.command,
            env: self.env,
            ports: self.ports,
            waypoint: None,
            readiness: self.readiness,
            liveness: self.liveness,
        }
    }
}

/// Checks a pod spec found at `field` (`spec` or `spec.template.spec`) of `object`.
fn pod_template(
    object: &Object<'_>,
    field: &str,
    spec: K8sPodSpec,
) -> Result<PodTemplate, ManifestError> {
    let node = spec.node_name.filter(|node| !node.is_empty());
    let Some(container) = spec.containers.into_iter().next() else {
        return Err(object.invalid(
            format!("{field}.containers"),
            "is empty — the sandbox runs the first container's command as a process; add a \
             container with e.g. command: [weftctl, echo]",
        ));
    };
    let command: Vec<String> = container
        .command
        .into_iter()
        .flatten()
        .chain(container.args.into_iter().flatten())
        .collect();
    if command.is_empty() {
        return Err(object.invalid(
            format!("{field}.containers[0].command"),
            "is missing — the sandbox runs it as a process instead of an image, e.g. \
             command: [weftctl, echo]",
        ));
    }
    let mut ports = Vec::new();
    for (i, port) in container.ports.into_iter().flatten().enumerate() {
        let number = port_number(port.container_port).ok_or_else(|| {
            object.invalid(
                format!("{field}.containers[0].ports[{i}].containerPort"),
                format!("is {} — use a port from 1 to 65535", port.container_port),
            )
        })?;
        ports.push((port.name, number));
    }
    let env = container
        .env
        .into_iter()
        .flatten()
        .filter(|var| var.value_from.is_none())
        .map(|var| (var.name, var.value.unwrap_or_default()))
        .collect();
    let at = |which: &str| format!("{field}.containers[0].{which}");
    let readiness = container
        .readiness_probe
        .map(|p| probe(object, &at("readinessProbe"), p, &ports))
        .transpose()?;
    let liveness = container
        .liveness_probe
        .map(|p| probe(object, &at("livenessProbe"), p, &ports))
        .transpose()?;
    Ok(PodTemplate {
        node,
        service_account: spec
            .service_account_name
            .or(spec.service_account)
            .unwrap_or_else(|| "default".to_owned()),
        command,
        env,
        ports,
        readiness,
        liveness,
    })
}

/// A container's probe, its port resolved against the container's named ports.
fn probe(
    object: &Object<'_>,
    field: &str,
    p: k8s_openapi::api::core::v1::Probe,
    ports: &[(Option<String>, u16)],
) -> Result<Probe, ManifestError> {
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    let port = |at: &str, value: &IntOrString| -> Result<u16, ManifestError> {
        match value {
            IntOrString::Int(n) => port_number(*n).ok_or_else(|| {
                object.invalid(
                    format!("{field}.{at}.port"),
                    format!("is {n} — use a port from 1 to 65535"),
                )
            }),
            IntOrString::String(name) => ports
                .iter()
                .find(|(n, _)| n.as_deref() == Some(name.as_str()))
                .map(|(_, p)| *p)
                .ok_or_else(|| {
                    object.invalid(
                        format!("{field}.{at}.port"),
                        format!("names port {name:?}, which the container does not declare"),
                    )
                }),
        }
    };
    let action = match (&p.http_get, &p.tcp_socket, &p.grpc, &p.exec) {
        (Some(h), None, None, None) => {
            if h.scheme.as_deref().is_some_and(|s| s != "HTTP") {
                return Err(object.invalid(
                    format!("{field}.httpGet.scheme"),
                    "is not HTTP — the sandbox's kubelet probes over plain HTTP",
                ));
            }
            ProbeAction::Http {
                path: h.path.clone().unwrap_or_else(|| "/".into()),
                port: port("httpGet", &h.port)?,
            }
        }
        (None, Some(t), None, None) => ProbeAction::Tcp {
            port: port("tcpSocket", &t.port)?,
        },
        (None, None, Some(_), None) | (None, None, None, Some(_)) => {
            return Err(object.invalid(
                field,
                "uses grpc or exec — the sandbox's kubelet runs httpGet and tcpSocket probes",
            ))
        }
        _ => {
            return Err(object.invalid(
                field,
                "needs exactly one of httpGet, tcpSocket (grpc and exec are not run here)",
            ))
        }
    };
    let seconds = |name: &str, value: Option<i32>, default: i32, least: i32| {
        let v = value.unwrap_or(default);
        match u32::try_from(v) {
            Ok(n) if v >= least => Ok(n),
            _ => Err(object.invalid(
                format!("{field}.{name}"),
                format!("is {v} — use {least} or more"),
            )),
        }
    };
    Ok(Probe {
        action,
        initial_delay: Duration::from_secs(
            seconds("initialDelaySeconds", p.initial_delay_seconds, 0, 0)?.into(),
        ),
        period: Duration::from_secs(seconds("periodSeconds", p.period_seconds, 10, 1)?.into()),
        timeout: Duration::from_secs(seconds("timeoutSeconds", p.timeout_seconds, 1, 1)?.into()),
        failure_threshold: seconds("failureThreshold", p.failure_threshold, 3, 1)?,
        success_threshold: seconds("successThreshold", p.success_threshold, 1, 1)?,
    })
}

/// A TCP port number, 1 to 65535.
fn port_number(value: i32) -> Option<u16> {
    u16::try_from(value).ok().filter(|&port| port != 0)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// A directory under the system temp dir, unique per test and process, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn with(files: &[(&str, &str)]) -> Self {
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            let dir = std::env::temp_dir().join(format!(
                "weft-manifest-test-{}-{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ));
            fs::create_dir_all(&dir).unwrap();
            for (name, text) in files {
                fs::write(dir.join(name), text).unwrap();
            }
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    /// A waypoint runs the replicas its WaypointParameters ask for (read after the
    /// Gateway that names them), the first on the Gateway's node and the next on the
    /// following nodes; one naming none runs the controller's default.
    #[test]
    fn a_waypoint_runs_its_parameters_replicas_spread_over_nodes() {
        let gateway = |name: &str, parameters: &str| {
            format!(
                "---\napiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata:\n  name: {name}\n  namespace: shop\n  annotations: {{sandbox.weft.dev/node: node-2}}\nspec:\n  gatewayClassName: weft-waypoint\n{parameters}  listeners: [{{name: mesh, port: 15008, protocol: HBONE}}]\n"
            )
        };
        let busy = gateway(
            "busy",
            "  infrastructure:\n    parametersRef: {group: weft.dev, kind: WaypointParameters, name: three}\n",
        );
        let plain = gateway("plain", "");
        let dir = TempDir::with(&[
            ("a.yaml", &format!("{NAMESPACE}{busy}{plain}")),
            (
                "b.yaml",
                "apiVersion: weft.dev/v1alpha1\nkind: WaypointParameters\nmetadata: {name: three, namespace: shop}\nspec: {replicas: 3}\n",
            ),
        ]);
        let cluster = load_dir_with(
            &dir.0,
            &ApiServer {
                nodes: 3,
                ..ApiServer::default()
            },
        )
        .unwrap();
        let pods: Vec<(&str, &str, Option<&str>)> = cluster
            .pods
            .iter()
            .map(|p| (p.name.as_str(), p.node.as_str(), p.waypoint.as_deref()))
            .collect();
        assert_eq!(
            pods,
            [
                ("busy-0", "node-2", Some("shop/busy")),
                ("plain-0", "node-2", Some("shop/plain")),
                ("busy-1", "node-3", Some("shop/busy")),
                ("busy-2", "node-1", Some("shop/busy")),
                ("plain-1", "node-3", Some("shop/plain")),
            ]
        );
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    const NAMESPACE: &str = "
apiVersion: v1
kind: Namespace
metadata:
  name: shop
  labels:
    weft.dev/mesh: enabled
";

    const APPS: &str = "
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: cart
  namespace: shop
spec:
  replicas: 2
  selector:
    matchLabels: {app: cart}
  template:
    metadata:
      labels: {app: cart, version: v1}
    spec:
      nodeName: node-1
      serviceAccountName: cart
      containers:
      - name: cart
        command: [weftctl, echo]
        args: [--version, v1]
        env:
        - {name: LATENCY, value: 5ms}
        - name: POD_NAME
          valueFrom: {fieldRef: {fieldPath: metadata.name}}
        ports:
        - {name: http, containerPort: 8080}
        - containerPort: 9090
        readinessProbe:
          httpGet: {path: /healthz, port: http}
          periodSeconds: 1
        livenessProbe:
          tcpSocket: {port: 9090}
---
---
apiVersion: v1
kind: Service
metadata:
  name: cart
  namespace: shop
spec:
  selector: {app: cart}
  clusterIP: 10.96.0.10
  ports:
  - {name: http, port: 80, targetPort: 8080}
  - {port: 9090}
";

    const CLIENT: &str = "
apiVersion: v1
kind: Pod
metadata:
  name: client
  labels: {app: client}
spec:
  nodeName: node-2
  containers:
  - name: client
    command: [sleep, infinity]
";

    /// Loads `text` as the only file, `apps.yaml`, after the shop Namespace, and returns
    /// the error message.
    fn error(text: &str) -> String {
        let dir = TempDir::with(&[("0-namespaces.yaml", NAMESPACE), ("apps.yaml", text)]);
        let message = load_dir(&dir.0).unwrap_err().to_string();
        let file = dir.0.join("apps.yaml").display().to_string();
        assert!(message.starts_with(&file), "{message}");
        message
    }

    fn assert_contains(message: &str, parts: &[&str]) {
        for part in parts {
            assert!(message.contains(part), "{part:?} not in {message:?}");
        }
    }

    #[test]
    fn golden_cluster() {
        let dir = TempDir::with(&[
            ("b-apps.yml", APPS),
            ("a-namespace.yaml", NAMESPACE),
            ("c-client.yaml", CLIENT),
            ("README.md", "kind: Ignored"),
        ]);
        fs::create_dir(dir.0.join("nested.yaml")).unwrap();
        let cart = |i: usize| PodSpec {
            name: format!("cart-{i}"),
            namespace: "shop".into(),
            node: "node-1".into(),
            service_account: "cart".into(),
            labels: labels(&[("app", "cart"), ("version", "v1")]),
            command: ["weftctl", "echo", "--version", "v1"]
                .map(String::from)
                .to_vec(),
            env: vec![("LATENCY".into(), "5ms".into())],
            ports: vec![(Some("http".into()), 8080), (None, 9090)],
            waypoint: None,
            readiness: Some(Probe {
                action: ProbeAction::Http {
                    path: "/healthz".into(),
                    port: 8080,
                },
                initial_delay: Duration::ZERO,
                period: Duration::from_secs(1),
                timeout: Duration::from_secs(1),
                failure_threshold: 3,
                success_threshold: 1,
            }),
            liveness: Some(Probe {
                action: ProbeAction::Tcp { port: 9090 },
                initial_delay: Duration::ZERO,
                period: Duration::from_secs(10),
                timeout: Duration::from_secs(1),
                failure_threshold: 3,
                success_threshold: 1,
            }),
        };
        let expected = Cluster {
            namespaces: vec![
                NamespaceSpec {
                    name: "default".into(),
                    labels: BTreeMap::new(),
                },
                NamespaceSpec {
                    name: "shop".into(),
                    labels: labels(&[("weft.dev/mesh", "enabled")]),
                },
            ],
            pods: vec![
                cart(0),
                cart(1),
                PodSpec {
                    name: "client".into(),
                    namespace: "default".into(),
                    node: "node-2".into(),
                    service_account: "default".into(),
                    labels: labels(&[("app", "client")]),
                    command: vec!["sleep".into(), "infinity".into()],
                    env: vec![],
                    ports: vec![],
                    waypoint: None,
                    readiness: None,
                    liveness: None,
                },
            ],
            services: Vec::new(),
        };
        let mut cluster = load_dir(&dir.0).unwrap();
        let services = std::mem::take(&mut cluster.services);
        assert_eq!(cluster, expected);
        assert_eq!(services.len(), 1);
        let cart = &services[0];
        assert_eq!(
            (cart.name.as_str(), cart.namespace.as_str()),
            ("cart", "shop")
        );
        assert_eq!(cart.cluster_ip, Some("10.96.0.10".parse().unwrap()));
        assert!(!cart.headless);
        assert_eq!(
            cart.object
                .spec
                .as_ref()
                .and_then(|s| s.ports.as_ref())
                .map(Vec::len),
            Some(2),
            "the object is kept as written, for the controller"
        );
    }

    #[test]
    fn kinds_the_controller_reads_are_skipped() {
        let text = format!(
            "{CLIENT}---\napiVersion: weft.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: p, namespace: shop}}\nspec: {{action: DENY}}\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: {{name: cfg, namespace: shop}}\n"
        );
        let dir = TempDir::with(&[("0-namespaces.yaml", NAMESPACE), ("apps.yaml", &text)]);
        let cluster = load_dir(&dir.0).unwrap();
        assert_eq!(cluster.pods.len(), 1);
    }

    #[test]
    fn placeholder_for_golden_end() {}

    #[test]
    fn no_default_namespace_unless_used_and_headless_service() {
        let dir = TempDir::with(&[(
            "all.yaml",
            &format!(
                "{NAMESPACE}---
apiVersion: v1
kind: Service
metadata: {{name: db, namespace: shop}}
spec:
  clusterIP: None
  ports: [{{port: 5432}}]
"
            ),
        )]);
        let cluster = load_dir(&dir.0).unwrap();
        let names: Vec<_> = cluster.namespaces.iter().map(|ns| &ns.name).collect();
        assert_eq!(names, ["shop"]);
        assert_eq!(cluster.services[0].cluster_ip, None);
        assert!(cluster.services[0].headless);
    }

    #[test]
    fn a_pod_that_names_no_node_is_scheduled_spread_and_stays_put() {
        let text = format!(
            "{}---\n{}",
            APPS.replace("      nodeName: node-1\n", ""),
            CLIENT.replace("  nodeName: node-2\n", "")
        );
        let dir = TempDir::with(&[("0-namespaces.yaml", NAMESPACE), ("apps.yaml", &text)]);
        let nodes = |api: &ApiServer| -> Vec<(String, String)> {
            load_dir_with(&dir.0, api)
                .unwrap()
                .pods
                .into_iter()
                .map(|p| (p.name, p.node))
                .collect()
        };
        let two = ApiServer {
            nodes: 2,
            ..ApiServer::default()
        };
        let placed = nodes(&two);
        let carts: Vec<&str> = placed
            .iter()
            .filter(|(name, _)| name.starts_with("cart-"))
            .map(|(_, node)| node.as_str())
            .collect();
        assert_eq!(carts.len(), 2);
        assert_ne!(
            carts[0], carts[1],
            "a Deployment's replicas are spread: {placed:?}"
        );
        assert!(
            placed.iter().all(|(_, n)| n == "node-1" || n == "node-2"),
            "{placed:?}"
        );
        assert_eq!(nodes(&two), placed, "read again, every pod keeps its node");
        let one = ApiServer {
            nodes: 1,
            ..ApiServer::default()
        };
        assert!(nodes(&one).iter().all(|(_, n)| n == "node-1"));
    }

    /// With a release's Gateway API CRDs installed, the sandbox refuses a Gateway API
    /// object as the API server does: at its field, or for a kind the channel lacks.
    #[test]
    fn gateway_api_objects_are_checked_against_the_installed_crds() {
        let shared =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/gateway-api/v1.6.1/standard");
        let api = ApiServer {
            nodes: 2,
            ..ApiServer::default()
        }
        .with_gateway_api(&shared)
        .unwrap_or_else(|e| {
            panic!("the CRDs are read from shared/gateway-api beside the repository: {e}")
        });
        let route = |spec: &str| {
            format!("apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: r, namespace: shop}}\nspec: {spec}\n")
        };
        let load = |text: &str| {
            let dir = TempDir::with(&[("0-namespaces.yaml", NAMESPACE), ("routes.yaml", text)]);
            load_dir_with(&dir.0, &api)
                .map(|_| ())
                .map_err(|e| e.to_string())
        };
        load(&route("{parentRefs: [{kind: Service, group: \"\", name: echo}], rules: [{backendRefs: [{name: echo, port: 80}]}]}"))
            .expect("a valid route is stored");
        let bad = load(&route("{parentRefs: [{kind: Service, group: \"\", name: echo}], rules: [{matches: [{path: {type: Prefix, value: nope}}]}]}"))
            .unwrap_err();
        assert!(
            bad.contains("HTTPRoute shop/r") && bad.contains("spec.rules[0].matches[0].path"),
            "{bad}"
        );
        let unknown = load("apiVersion: gateway.networking.k8s.io/v1alpha2\nkind: TCPRoute\nmetadata: {name: t, namespace: shop}\nspec: {rules: [{backendRefs: [{name: echo, port: 80}]}]}\n")
            .unwrap_err();
        assert!(unknown.contains("TCPRoute is not served"), "{unknown}");
        // Without CRDs installed, the same route is left to the controller.
        let dir = TempDir::with(&[
            ("0-namespaces.yaml", NAMESPACE),
            ("routes.yaml", &route("{parentRefs: [{kind: Service, group: \"\", name: echo}], rules: [{matches: [{path: {type: Prefix, value: nope}}]}]}")),
        ]);
        assert!(load_dir(&dir.0).is_ok());
    }

    /// Every manifest directory the project ships or tests with is accepted as the
    /// sandbox's API server (with the newest Gateway API CRDs) checks it.
    #[test]
    fn every_shipped_manifest_directory_is_accepted() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let api = ApiServer {
            nodes: 2,
            ..ApiServer::default()
        }
        .with_gateway_api(&root.join("../shared/gateway-api/v1.6.1/experimental"))
        .expect("the CRDs are read from shared/gateway-api beside the repository");
        let mut dirs = vec![root.join("examples/demo")];
        for entry in fs::read_dir(root.join("tests/manifests")).unwrap() {
            dirs.push(entry.unwrap().path());
        }
        for dir in dirs {
            if let Err(e) = load_dir_with(&dir, &api) {
                panic!("{}: {e}", dir.display());
            }
        }
    }

    /// As an API server with strict field validation: a field the kind lacks is refused,
    /// named by its path.
    #[test]
    fn an_unknown_field_of_a_built_in_kind_is_refused() {
        let text = APPS.replace(
            "      serviceAccountName: cart\n",
            "      serviceAcountName: cart\n",
        );
        assert_contains(
            &error(&text),
            &[
                "Deployment shop/cart: spec.template.spec.serviceAcountName is not a field of a Deployment",
                "strict field validation",
            ],
        );
        let text = CLIENT.replace("  containers:\n", "  containerz: []\n  containers:\n");
        assert_contains(&error(&text), &["Pod default/client: spec.containerz"]);
        let text = APPS.replace("  - {port: 9090}\n", "  - {port: 9090, protocl: TCP}\n");
        assert_contains(&error(&text), &["Service shop/cart: spec.ports[1].protocl"]);
    }

    #[test]
    fn document_without_kind() {
        let text = format!("{CLIENT}---\napiVersion: v1\nmetadata: {{name: x}}\n");
        assert_contains(&error(&text), &["document 2 has no kind"]);
    }

    #[test]
    fn yaml_syntax_error_has_location() {
        let text = "apiVersion: v1\nkind: Pod\nmetadata: {name: [unclosed\n";
        assert_contains(&error(text), &["invalid YAML", "line 3"]);
    }

    #[test]
    fn schema_error_names_object() {
        let text = APPS.replace("replicas: 2", "replicas: two");
        assert_contains(
            &error(&text),
            &[
                "Deployment shop/cart: spec.replicas: invalid type",
                "line 9",
            ],
        );
        let text = CLIENT.replace("apiVersion: v1", "apiVersion: v2");
        assert_contains(
            &error(&text),
            &["Pod default/client: apiVersion is \"v2\" — a Pod needs apiVersion: v1"],
        );
    }

    #[test]
    fn missing_name() {
        let text = CLIENT.replace("  name: client\n", "");
        assert_contains(
            &error(&text),
            &["Pod default/<document 1>: metadata.name is missing"],
        );
    }

    #[test]
    fn duplicate_names() {
        let text = format!("{CLIENT}---{CLIENT}");
        assert_contains(
            &error(&text),
            &[
                "Pod default/client: metadata.name",
                "already defined by Pod default/client in",
            ],
        );
        // A Pod may not take the name of a Deployment's replica either.
        let replica = CLIENT.replacen("name: client\n", "name: cart-1\n  namespace: shop\n", 1);
        let text = format!("{APPS}---{replica}");
        assert_contains(
            &error(&text),
            &[
                "Pod shop/cart-1: metadata.name",
                "already defined by Deployment shop/cart",
            ],
        );
    }

    #[test]
    fn pod_without_containers_or_command() {
        let text = CLIENT.replace(
            "  containers:\n  - name: client\n    command: [sleep, infinity]\n",
            "  containers: []\n",
        );
        assert_contains(
            &error(&text),
            &["Pod default/client: spec.containers is empty"],
        );
        let text = CLIENT.replace("    command: [sleep, infinity]\n", "    image: busybox\n");
        assert_contains(
            &error(&text),
            &[
                "Pod default/client: spec.containers[0].command is missing",
                "as a process",
            ],
        );
    }

    #[test]
    fn ports_out_of_range() {
        let text = APPS.replace("containerPort: 9090", "containerPort: 0");
        assert_contains(
            &error(&text),
            &["Deployment shop/cart: spec.template.spec.containers[0].ports[1].containerPort is 0"],
        );
    }

    #[test]
    fn bad_cluster_ip() {
        let text = APPS.replace("clusterIP: 10.96.0.10", "clusterIP: 10.96.0");
        assert_contains(
            &error(&text),
            &["Service shop/cart: spec.clusterIP \"10.96.0\""],
        );
    }

    #[test]
    fn a_weft_resource_its_crd_refuses_is_refused_naming_the_field() {
        assert_eq!(
            weft_crds()
                .for_object(&serde_json::json!({
                    "apiVersion": "weft.dev/v1alpha1", "kind": "TrafficPolicy"
                }))
                .map(|c| c.group_kind()),
            Some(("weft.dev", "TrafficPolicy"))
        );
        let policy = "apiVersion: weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: no-admin, namespace: shop}
spec:
  action: DENY
  rules: [{to: [{ports: [0]}]}]
";
        assert_contains(
            &error(&format!("{APPS}---\n{policy}")),
            &[
                "AuthorizationPolicy shop/no-admin: spec.rules[0].to[0].ports[0]",
                "the API server refuses it",
            ],
        );
        let typo = policy.replace("action: DENY", "acton: DENY");
        assert_contains(&error(&format!("{APPS}---\n{typo}")), &["acton"]);
        // A valid one is the controller's to read.
        let fine = policy.replace("ports: [0]", "ports: [8080]");
        let dir = TempDir::with(&[
            ("0-namespaces.yaml", NAMESPACE),
            ("apps.yaml", &format!("{APPS}---\n{fine}")),
        ]);
        assert!(load_dir(&dir.0).is_ok());
    }

    #[test]
    fn bad_ip_families() {
        let dual = APPS.replace(
            "clusterIP: 10.96.0.10",
            "clusterIP: 10.96.0.10\n  ipFamilyPolicy: RequireDualStack",
        );
        assert_contains(
            &error(&dual),
            &[
                "Service shop/cart: spec.clusterIP",
                "leave spec.clusterIP out",
            ],
        );
        let family = APPS.replace("clusterIP: 10.96.0.10", "ipFamilies: [IPv5]");
        assert_contains(
            &error(&family),
            &["Service shop/cart: spec.ipFamilies[0] \"IPv5\" is not a family"],
        );
        let two = APPS.replace("clusterIP: 10.96.0.10", "ipFamilies: [IPv4, IPv6]");
        assert_contains(
            &error(&two),
            &["spec.ipFamilies lists two families", "PreferDualStack"],
        );
        let policy = APPS.replace("clusterIP: 10.96.0.10", "ipFamilyPolicy: Both");
        assert_contains(&error(&policy), &["spec.ipFamilyPolicy \"Both\""]);
    }

    #[test]
    fn negative_replicas() {
        let text = APPS.replace("replicas: 2", "replicas: -1");
        assert_contains(
            &error(&text),
            &["Deployment shop/cart: spec.replicas is -1"],
        );
    }

    #[test]
    fn namespace_without_document() {
        let text = CLIENT.replacen("name: client\n", "name: client\n  namespace: billing\n", 1);
        assert_contains(
            &error(&text),
            &[
                "Pod billing/client: metadata.namespace \"billing\" has no Namespace document",
                "kind: Namespace",
            ],
        );
    }

    #[test]
    fn missing_directory() {
        let dir = std::env::temp_dir().join("weft-manifest-test-does-not-exist");
        let message = load_dir(&dir).unwrap_err().to_string();
        assert_contains(&message, &["weft-manifest-test-does-not-exist"]);
    }

    #[test]
    fn probes_the_kubelet_cannot_run_are_refused_by_field() {
        let text = APPS.replace("port: http}", "port: web}");
        assert_contains(
            &error(&text),
            &["spec.template.spec.containers[0].readinessProbe.httpGet.port names port \"web\""],
        );
        let text = APPS.replace("tcpSocket: {port: 9090}", "grpc: {port: 9090}");
        assert_contains(
            &error(&text),
            &["containers[0].livenessProbe uses grpc or exec"],
        );
        let text = APPS.replace("periodSeconds: 1", "periodSeconds: 0");
        assert_contains(&error(&text), &["readinessProbe.periodSeconds is 0"]);
    }
}
