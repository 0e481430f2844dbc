//! `weftctl status` and `weftctl check --local`: what each node-proxy runs and has applied,
//! read from the admin endpoints (the controller's `/debug/status`, each node-proxy's
//! `/config_dump`), and the problems an operator must act on.
//!
//! ```text
//!  sandbox state.json ──> controller admin + node-proxy admins
//!        GET (2 s budget each) ──> Report ──> table / JSON      (status)
//!                                       └──> problems, exit 1   (check)
//! ```
//!
//! A node-proxy is synced when it has applied the controller's current model: the same
//! epoch (the controller instance) and version.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use serde::Serialize;
use serde_json::Value;

/// How long one admin endpoint may take to answer.
const ANSWER_BUDGET: Duration = Duration::from_secs(2);
/// A certificate expiring sooner than this is reported: renewal runs at half-life, so
/// a healthy node-proxy never gets near it.
const EXPIRY_WARNING: Duration = Duration::from_secs(60 * 60);

/// Where to read: the controller's admin endpoint and each node's node-proxy's.
#[derive(Debug, Clone)]
pub struct Targets {
    /// The controller's admin endpoint (its first replica).
    pub controller: SocketAddr,
    /// Its other replicas' admin endpoints.
    pub replicas: Vec<SocketAddr>,
    /// (node, node-proxy admin endpoint).
    pub nodes: Vec<(String, SocketAddr)>,
}

impl Targets {
    /// The endpoints of the sandbox whose state is in `state_dir`.
    pub fn sandbox(state_dir: &Path) -> anyhow::Result<Self> {
        let path = state_dir.join("state.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("no running sandbox: cannot read {}", path.display()))?;
        let state: crate::sandbox::State = serde_json::from_str(&text)
            .with_context(|| format!("cannot read {}", path.display()))?;
        Ok(Targets {
            controller: state.controller.admin,
            replicas: state.replicas.iter().map(|r| r.admin).collect(),
            nodes: state.nodes.into_iter().map(|n| (n.name, n.admin)).collect(),
        })
    }
}

/// The controller as its admin endpoint shows it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ControllerStatus {
    /// The admin endpoint.
    pub admin: SocketAddr,
    /// Why it could not be read, if it could not.
    pub error: Option<String>,
    /// Its build.
    pub version: Option<String>,
    /// Its model's epoch and version.
    pub epoch: Option<String>,
    /// Its model's version.
    pub model_version: Option<u64>,
}

/// One node-proxy as its admin endpoint shows it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct NodeStatus {
    /// The node.
    pub node: String,
    /// The admin endpoint.
    pub admin: SocketAddr,
    /// Why it could not be read, if it could not.
    pub error: Option<String>,
    /// Its build.
    pub version: Option<String>,
    /// Connected to the controller.
    pub connected: bool,
    /// The epoch of the model it applied.
    pub epoch: Option<String>,
    /// The version of the model it applied (0: none).
    pub model_version: u64,
    /// Why its last subscription or update failed.
    pub last_error: Option<String>,
    /// Pods it serves.
    pub pods: usize,
    /// The earliest expiry of the certificates it holds (seconds since the epoch).
    pub earliest_expiry: Option<u64>,
    /// Certificates held.
    pub certificates: usize,
}

impl ControllerStatus {
    /// What the controller's `/debug/status` (`read`) shows, or why it could not be read.
    fn from_read(admin: SocketAddr, read: Result<&Value, &String>) -> Self {
        match read {
            Ok(v) => ControllerStatus {
                admin,
                error: None,
                version: string(v, "version"),
                epoch: string(v, "epoch"),
                model_version: v.get("modelVersion").and_then(Value::as_u64),
            },
            Err(e) => ControllerStatus {
                admin,
                error: Some(e.clone()),
                version: None,
                epoch: None,
                model_version: None,
            },
        }
    }
}

impl NodeStatus {
    /// A node-proxy nothing is known of yet.
    fn unknown(node: String, admin: SocketAddr) -> Self {
        NodeStatus {
            node,
            admin,
            error: None,
            version: None,
            connected: false,
            epoch: None,
            model_version: 0,
            last_error: None,
            pods: 0,
            earliest_expiry: None,
            certificates: 0,
        }
    }
}

/// Everything `status` shows.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Report {
    /// The controller.
    pub controller: ControllerStatus,
    /// Each node-proxy.
    pub nodes: Vec<NodeStatus>,
}

/// One GET of an admin endpoint, as JSON.
async fn get_json(addr: SocketAddr, path: &str) -> Result<Value, String> {
    let fetch = async {
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("cannot connect: {e}"))?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let request = http::Request::get(path)
            .header(http::header::HOST, addr.to_string())
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| e.to_string())?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        if !status.is_success() {
            return Err(format!("{path} answered {status}"));
        }
        serde_json::from_slice(&body).map_err(|e| format!("{path} is not JSON: {e}"))
    };
    tokio::time::timeout(ANSWER_BUDGET, fetch)
        .await
        .unwrap_or_else(|_| {
            Err(format!(
                "no answer within {} s (stopped or overloaded?)",
                ANSWER_BUDGET.as_secs()
            ))
        })
}

fn string(v: &Value, key: &str) -> Option<String> {
    v.get(key).and_then(Value::as_str).map(str::to_owned)
}

/// Reads the controller and every node-proxy, all at once.
pub async fn gather(targets: &Targets) -> Report {
    // Every replica: the one shown is the one leading, else the first that answers.
    let controller = async {
        let all: Vec<SocketAddr> = std::iter::once(targets.controller)
            .chain(targets.replicas.iter().copied())
            .collect();
        let reads =
            futures::future::join_all(all.iter().map(|a| get_json(*a, "/debug/status"))).await;
        let shown = reads
            .iter()
            .position(|r| r.as_ref().is_ok_and(|v| v["leading"] == true))
            .or_else(|| reads.iter().position(Result::is_ok))
            .unwrap_or(0);
        let replicas: Vec<(Option<String>, Option<u64>)> = reads
            .iter()
            .flatten()
            .map(|v| (string(v, "epoch"), v["modelVersion"].as_u64()))
            .collect();
        (
            ControllerStatus::from_read(all[shown], reads[shown].as_ref()),
            replicas,
        )
    };
    let nodes = futures::future::join_all(targets.nodes.iter().map(|(node, addr)| async move {
        let mut status = NodeStatus::unknown(node.clone(), *addr);
        match get_json(*addr, "/config_dump").await {
            Ok(v) => {
                let m = &v["modelStatus"];
                status.version = string(&v, "version");
                status.connected = m["connected"].as_bool().unwrap_or(false);
                status.epoch = string(m, "epoch").filter(|e| !e.is_empty());
                status.model_version = m["version"].as_u64().unwrap_or(0);
                status.last_error = string(m, "lastError");
                status.pods = v["pods"].as_array().map_or(0, Vec::len);
                let certs = v["certificates"].as_array().cloned().unwrap_or_default();
                status.certificates = certs.len();
                status.earliest_expiry = certs.iter().filter_map(|c| c["notAfter"].as_u64()).min();
            }
            Err(e) => status.error = Some(e),
        }
        status
    }));
    let ((controller, replicas), mut nodes) = futures::join!(controller, nodes);
    // A node-proxy current with the replica it is subscribed to (its epoch) is as
    // current as the replica shown (each replica numbers its own models).
    for n in &mut nodes {
        let current = replicas.iter().any(|(epoch, version)| {
            n.epoch.is_some() && *epoch == n.epoch && *version == Some(n.model_version)
        });
        if current && n.model_version > 0 {
            n.epoch = controller.epoch.clone();
            n.model_version = controller.model_version.unwrap_or(0);
        }
    }
    Report { controller, nodes }
}

/// Each controller replica's `/debug/status`, through the API server's pod proxy
/// (`pods/proxy` on each `weft-controller` pod's admin port): (pod, status or why not).
/// Each replica serves its own subscribers, so all are read.
async fn controllers_via_api(
    client: &kube::Client,
    namespace: &str,
) -> Result<Vec<(String, Result<Value, String>)>, String> {
    use k8s_openapi::api::core::v1::Pod;
    let api: kube::Api<Pod> = kube::Api::namespaced(client.clone(), namespace);
    let params = kube::api::ListParams::default().labels(&format!(
        "app.kubernetes.io/name={}",
        controller::install::CONTROLLER
    ));
    let pods = api
        .list(&params)
        .await
        .map_err(|e| format!("cannot list the controller pods: {e}"))?;
    if pods.items.is_empty() {
        return Err(format!(
            "no {} pod in {namespace}",
            controller::install::CONTROLLER
        ));
    }
    let reads = pods.items.iter().map(|pod| {
        let name = pod.metadata.name.clone().unwrap_or_default();
        let path = format!(
            "/api/v1/namespaces/{namespace}/pods/{name}:{}/proxy/debug/status",
            controller::install::ADMIN_PORT
        );
        async move {
            let read = async {
                let request = http::Request::get(&path)
                    .body(Vec::new())
                    .map_err(|e| e.to_string())?;
                let text = tokio::time::timeout(ANSWER_BUDGET * 5, client.request_text(request))
                    .await
                    .map_err(|_| "no answer from the API server within 10 s".to_owned())?
                    .map_err(|e| format!("pod {name} through the API server: {e}"))?;
                serde_json::from_str::<Value>(&text).map_err(|e| format!("{path} is not JSON: {e}"))
            };
            (name.clone(), read.await)
        }
    });
    Ok(futures::future::join_all(reads).await)
}

/// Reads a cluster through the API server: the node-proxy DaemonSet's pods in
/// `namespace` (where one should run, ready or not) and every controller replica's
/// status with the subscriptions it serves (each node-proxy's build and the model
/// version it acknowledged). The controller shown is the replica leading (writing
/// status), else the first that answered. A node-proxy is compared with the replica it
/// is subscribed to: one that applied that replica's current model is shown at the
/// shown replica's epoch and version (each replica numbers its own models).
/// The certificates node-proxies hold are not visible this way (their admin port is
/// the node's loopback), so they are not reported.
pub async fn gather_cluster(client: &kube::Client, namespace: &str) -> Report {
    use k8s_openapi::api::core::v1::Pod;
    let admin: SocketAddr = ([0, 0, 0, 0], 0).into();
    let (replicas, pods) = futures::join!(controllers_via_api(client, namespace), async {
        let api: kube::Api<Pod> = kube::Api::namespaced(client.clone(), namespace);
        let params = kube::api::ListParams::default().labels(&format!(
            "app.kubernetes.io/name={}",
            controller::install::NODE_PROXY
        ));
        api.list(&params).await.map_err(|e| e.to_string())
    });
    let answered: Vec<&Value> = replicas
        .iter()
        .flatten()
        .filter_map(|(_, r)| r.as_ref().ok())
        .collect();
    let shown: Result<Value, String> = match (
        &replicas,
        answered
            .iter()
            .find(|v| v["leading"] == true)
            .or(answered.first()),
    ) {
        (_, Some(v)) => Ok((*v).clone()),
        (Err(e), None) => Err(e.clone()),
        (Ok(list), None) => Err(list
            .iter()
            .filter_map(|(_, r)| r.as_ref().err().cloned())
            .collect::<Vec<_>>()
            .join("; ")),
    };
    let controller = ControllerStatus::from_read(admin, shown.as_ref());
    // Every replica's subscribers, each with whether it has its replica's current model.
    let subscribers: Vec<(Value, bool, Option<String>)> = answered
        .iter()
        .flat_map(|replica| {
            let current = replica["modelVersion"].as_u64();
            let epoch = string(replica, "epoch");
            replica["subscribers"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .map(move |sub| {
                    let synced = sub["ackedVersion"].as_u64() == current;
                    (sub, synced, epoch.clone())
                })
        })
        .collect();
    let nodes = match pods {
        Err(e) => vec![NodeStatus {
            error: Some(format!("cannot list the node-proxy pods: {e}")),
            ..NodeStatus::unknown("(all)".into(), admin)
        }],
        Ok(list) => {
            let mut nodes: Vec<NodeStatus> = list
                .items
                .iter()
                .map(|pod| {
                    let node = pod
                        .spec
                        .as_ref()
                        .and_then(|s| s.node_name.clone())
                        .unwrap_or_default();
                    let name = pod.metadata.name.clone().unwrap_or_default();
                    let ready = pod
                        .status
                        .as_ref()
                        .and_then(|s| s.conditions.as_ref())
                        .is_some_and(|cs| {
                            cs.iter().any(|c| c.type_ == "Ready" && c.status == "True")
                        });
                    let sub = subscribers
                        .iter()
                        .find(|(s, ..)| s["node"].as_str() == Some(node.as_str()));
                    let mut n = NodeStatus::unknown(node.clone(), admin);
                    match sub {
                        Some((sub, synced, epoch)) => {
                            n.connected = true;
                            n.version = string(sub, "proxyVersion").filter(|v| !v.is_empty());
                            if *synced {
                                // Current with its replica: as current as the one shown.
                                n.epoch = controller.epoch.clone();
                                n.model_version = controller.model_version.unwrap_or(0);
                            } else {
                                n.epoch = epoch.clone();
                                n.model_version = sub["ackedVersion"].as_u64().unwrap_or(0);
                            }
                            n.last_error = string(sub, "lastRejection");
                        }
                        None if !ready => {
                            n.error = Some(format!("pod {namespace}/{name} is not ready"));
                        }
                        None if controller.error.is_none() => {
                            n.error = Some(format!(
                                "pod {namespace}/{name} is not subscribed to the controller"
                            ));
                        }
                        None => {}
                    }
                    n
                })
                .collect();
            nodes.sort_by(|a, b| a.node.cmp(&b.node));
            nodes
        }
    };
    Report { controller, nodes }
}

/// The report `status` and `check` show: of the sandbox `local` (its state in
/// `state_dir`, or the default directory for its name), or else of the cluster of the
/// current kubeconfig, Weft running in `namespace`.
pub async fn read(
    local: Option<&str>,
    state_dir: Option<&Path>,
    namespace: &str,
) -> anyhow::Result<Report> {
    match local {
        Some(name) => {
            let dir = state_dir
                .map(Path::to_owned)
                .unwrap_or_else(|| crate::sandbox::default_state_dir(name));
            Ok(gather(&Targets::sandbox(&dir)?).await)
        }
        None => {
            let client = kube::Client::try_default().await.context(
                "no --local sandbox given, and no cluster reachable through a kubeconfig",
            )?;
            Ok(gather_cluster(&client, namespace).await)
        }
    }
}

/// A problem `check` reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    /// `controller` or `node-proxy on <node>`.
    pub subject: String,
    /// What is wrong, and what it leads to.
    pub what: String,
}

/// Now, in seconds since the epoch, as [`problems`] and [`table`] take it.
pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// " at <addr>" for an admin endpoint read directly; nothing when read through the API
/// server (port 0).
fn at(admin: SocketAddr) -> String {
    if admin.port() == 0 {
        String::new()
    } else {
        format!(" at {admin}")
    }
}

/// What is wrong in `report` at time `now` (seconds since the epoch).
pub fn problems(report: &Report, now: u64) -> Vec<Problem> {
    let mut out = Vec::new();
    let c = &report.controller;
    let controller = |what: String| Problem {
        subject: "controller".into(),
        what,
    };
    if let Some(e) = &c.error {
        out.push(controller(format!("not reachable{}: {e}", at(c.admin))));
    } else if c.model_version == Some(0) {
        out.push(controller(
            "has not read the cluster yet (model version 0)".into(),
        ));
    }
    for n in &report.nodes {
        let problem = |what: String| Problem {
            subject: format!("node-proxy on {}", n.node),
            what,
        };
        if let Some(e) = &n.error {
            out.push(problem(format!(
                "not reachable{}: {e}; the node's pods get no new connections captured",
                at(n.admin)
            )));
            continue;
        }
        if let (Some(ours), Some(theirs)) = (&c.version, &n.version) {
            if ours != theirs {
                out.push(problem(format!(
                    "runs version {theirs}, the controller {ours}; finish the upgrade"
                )));
            }
        }
        let why = n
            .last_error
            .as_deref()
            .map(|e| format!(" (last error: {e})"))
            .unwrap_or_default();
        if n.model_version == 0 {
            out.push(problem(format!("has no model from the controller{why}")));
        } else if c.error.is_none()
            && (n.epoch != c.epoch || Some(n.model_version) != c.model_version)
        {
            out.push(problem(format!(
                "applied model {}/{} but the controller is at {}/{}; it serves a stale configuration{why}",
                n.epoch.as_deref().unwrap_or("-"),
                n.model_version,
                c.epoch.as_deref().unwrap_or("-"),
                c.model_version.unwrap_or(0),
            )));
        } else if !n.connected {
            out.push(problem(format!("is not connected to the controller{why}")));
        }
        if let Some(expiry) = n.earliest_expiry {
            if expiry <= now {
                out.push(problem(format!(
                    "holds a certificate that expired {} s ago; its pods' mTLS fails",
                    now - expiry
                )));
            } else if expiry - now < EXPIRY_WARNING.as_secs() {
                out.push(problem(format!(
                    "holds a certificate expiring in {} s; renewal is not happening",
                    expiry - now
                )));
            }
        }
    }
    out
}

/// The report as a table, one line per node-proxy.
pub fn table(report: &Report, now: u64) -> String {
    let c = &report.controller;
    let name = match c.admin.port() {
        0 => "controller (through the API server)".to_owned(),
        _ => format!("controller {}", c.admin),
    };
    let mut out = match &c.error {
        Some(e) => format!("{name}: unreachable: {e}\n"),
        None => format!(
            "{name}: version {}, model {}/{}\n",
            c.version.as_deref().unwrap_or("?"),
            c.epoch.as_deref().unwrap_or("-"),
            c.model_version.unwrap_or(0)
        ),
    };
    out.push_str(&format!(
        "{:<12} {:<10} {:<9} {:<26} {:>5}  {}\n",
        "NODE", "VERSION", "STATE", "MODEL", "PODS", "CERTS (EARLIEST EXPIRY)"
    ));
    for n in &report.nodes {
        if n.error.is_some() {
            out.push_str(&format!(
                "{:<12} {:<10} {:<9} {:<26} {:>5}  -\n",
                n.node, "?", "down", "-", "-"
            ));
            continue;
        }
        let synced = n.epoch == c.epoch && Some(n.model_version) == c.model_version;
        let state = match (n.model_version, synced, n.connected) {
            (0, _, _) => "no-model",
            (_, true, true) => "synced",
            (_, true, false) => "offline",
            (_, false, _) => "stale",
        };
        let certs = match n.earliest_expiry {
            None => format!("{}", n.certificates),
            Some(t) if t <= now => format!("{} (EXPIRED)", n.certificates),
            Some(t) => format!(
                "{} (in {}h{:02}m)",
                n.certificates,
                (t - now) / 3600,
                (t - now) % 3600 / 60
            ),
        };
        out.push_str(&format!(
            "{:<12} {:<10} {:<9} {:<26} {:>5}  {}\n",
            n.node,
            n.version.as_deref().unwrap_or("?"),
            state,
            format!("{}/{}", n.epoch.as_deref().unwrap_or("-"), n.model_version),
            n.pods,
            certs
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> Report {
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let node = |name: &str| NodeStatus {
            node: name.into(),
            admin: addr,
            error: None,
            version: Some("0.1.0".into()),
            connected: true,
            epoch: Some("00000000000000aa".into()),
            model_version: 7,
            last_error: None,
            pods: 2,
            earliest_expiry: Some(1_000_000 + 86_400),
            certificates: 2,
        };
        Report {
            controller: ControllerStatus {
                admin: addr,
                error: None,
                version: Some("0.1.0".into()),
                epoch: Some("00000000000000aa".into()),
                model_version: Some(7),
            },
            nodes: vec![node("node-1"), node("node-2")],
        }
    }

    /// A scripted API server: the node-proxy pods, the controller's two replicas and
    /// their statuses through the pod proxy (`None`: the replica does not answer).
    fn api_server(pods: Value, statuses: [Option<Value>; 2]) -> kube::Client {
        crate::testing::api_server(move |path, query| {
            if path == "/api/v1/namespaces/weft-system/pods" && query.contains("weft-node-proxy") {
                (200, pods.clone())
            } else if path == "/api/v1/namespaces/weft-system/pods"
                && query.contains("weft-controller")
            {
                (
                    200,
                    serde_json::json!({"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": [
                    {"metadata": {"name": "weft-controller-1", "namespace": "weft-system"}},
                    {"metadata": {"name": "weft-controller-2", "namespace": "weft-system"}}]}),
                )
            } else if let Some(i) =
                ["weft-controller-1", "weft-controller-2"]
                    .iter()
                    .position(|p| {
                        path == format!(
                            "/api/v1/namespaces/weft-system/pods/{p}:15014/proxy/debug/status"
                        )
                    })
            {
                match &statuses[i] {
                    Some(s) => (200, s.clone()),
                    None => (
                        503,
                        serde_json::json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": "error trying to reach service: connection refused", "reason": "ServiceUnavailable", "code": 503}),
                    ),
                }
            } else {
                crate::testing::not_found()
            }
        })
    }

    fn pod(name: &str, node: &str, ready: bool) -> Value {
        serde_json::json!({"metadata": {"name": name, "namespace": "weft-system"},
            "spec": {"nodeName": node, "containers": [{"name": "node-proxy"}]},
            "status": {"conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]}})
    }

    #[tokio::test]
    async fn a_cluster_is_read_through_the_api_server() {
        let pods = serde_json::json!({"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": [
            pod("np-a", "node-a", true), pod("np-b", "node-b", true), pod("np-c", "node-c", false), pod("np-d", "node-d", true)]});
        // Two replicas, each serving some subscribers, numbering its own models; the
        // second leads.
        let first = serde_json::json!({"version": "0.1.0", "epoch": "00000000000000bb", "modelVersion": 4, "leading": false, "subscribers": [
            {"node": "node-b", "ackedVersion": 3, "proxyVersion": "0.0.9", "rejected": 1},
            {"node": "node-e", "ackedVersion": 4, "proxyVersion": "0.1.0"}]});
        let second = serde_json::json!({"version": "0.1.0", "epoch": "00000000000000aa", "modelVersion": 9, "leading": true, "subscribers": [
            {"node": "node-a", "ackedVersion": 9, "proxyVersion": "0.1.0"},
            {"node": "waypoint shop/wp", "ackedVersion": 9, "proxyVersion": "0.1.0"}]});
        let mut pods = pods;
        pods["items"]
            .as_array_mut()
            .unwrap()
            .push(pod("np-e", "node-e", true));
        let report = gather_cluster(
            &api_server(pods.clone(), [Some(first.clone()), Some(second)]),
            "weft-system",
        )
        .await;
        assert_eq!(
            report.controller.model_version,
            Some(9),
            "the leader is shown"
        );
        let nodes: Vec<&str> = report.nodes.iter().map(|n| n.node.as_str()).collect();
        assert_eq!(nodes, ["node-a", "node-b", "node-c", "node-d", "node-e"]);
        let p = problems(&report, now());
        let about = |node: &str| -> Vec<&str> {
            p.iter()
                .filter(|x| x.subject == format!("node-proxy on {node}"))
                .map(|x| x.what.as_str())
                .collect()
        };
        assert!(about("node-a").is_empty(), "{p:?}");
        assert!(
            about("node-e").is_empty(),
            "current with the replica it is subscribed to: {p:?}"
        );
        let b = about("node-b");
        assert!(b.iter().any(|w| w.contains("runs version 0.0.9")), "{b:?}");
        // (The refusal's text is on the authorized /debug/subscribers, not here.)
        assert!(b.iter().any(|w| w.contains("stale")), "{b:?}");
        assert!(about("node-c")[0].contains("np-c is not ready"), "{p:?}");
        assert!(
            about("node-d")[0].contains("np-d is not subscribed"),
            "{p:?}"
        );
        assert!(table(&report, now()).contains("through the API server"));

        // One replica down: the other is read.
        let report = gather_cluster(
            &api_server(pods.clone(), [Some(first), None]),
            "weft-system",
        )
        .await;
        assert_eq!(report.controller.model_version, Some(4));
        // None answers: said so, with the API server's words.
        let report = gather_cluster(&api_server(pods, [None, None]), "weft-system").await;
        let p = problems(&report, now());
        assert_eq!(p[0].subject, "controller");
        assert!(p[0].what.contains("connection refused"), "{p:?}");
    }

    #[test]
    fn a_healthy_mesh_has_no_problems() {
        assert_eq!(problems(&report(), 1_000_000), []);
        assert!(table(&report(), 1_000_000).contains("synced"));
    }

    #[test]
    fn each_problem_is_named_with_its_node() {
        let mut r = report();
        r.nodes[0].error = Some("no answer".into());
        r.nodes[1].model_version = 6;
        r.nodes[1].last_error = Some("unauthenticated".into());
        let p = problems(&r, 1_000_000);
        assert_eq!(p.len(), 2, "{p:?}");
        assert_eq!(p[0].subject, "node-proxy on node-1");
        assert!(p[0].what.contains("not reachable"));
        assert!(
            p[1].what.contains("stale") && p[1].what.contains("unauthenticated"),
            "{p:?}"
        );

        let mut r = report();
        r.nodes[0].version = Some("0.0.9".into());
        r.nodes[1].earliest_expiry = Some(999_000);
        let p = problems(&r, 1_000_000);
        assert!(p[0].what.contains("runs version 0.0.9"), "{p:?}");
        assert!(p[1].what.contains("expired"), "{p:?}");
    }
}
