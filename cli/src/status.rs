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
    /// The controller's admin endpoint.
    pub controller: SocketAddr,
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
    let controller = async {
        let addr = targets.controller;
        match get_json(addr, "/debug/status").await {
            Ok(v) => ControllerStatus {
                admin: addr,
                error: None,
                version: string(&v, "version"),
                epoch: string(&v, "epoch"),
                model_version: v.get("modelVersion").and_then(Value::as_u64),
            },
            Err(e) => ControllerStatus {
                admin: addr,
                error: Some(e),
                version: None,
                epoch: None,
                model_version: None,
            },
        }
    };
    let nodes = futures::future::join_all(targets.nodes.iter().map(|(node, addr)| async move {
        let mut status = NodeStatus {
            node: node.clone(),
            admin: *addr,
            error: None,
            version: None,
            connected: false,
            epoch: None,
            model_version: 0,
            last_error: None,
            pods: 0,
            earliest_expiry: None,
            certificates: 0,
        };
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
    let (controller, nodes) = futures::join!(controller, nodes);
    Report { controller, nodes }
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

/// What is wrong in `report` at time `now` (seconds since the epoch).
pub fn problems(report: &Report, now: u64) -> Vec<Problem> {
    let mut out = Vec::new();
    let c = &report.controller;
    let controller = |what: String| Problem {
        subject: "controller".into(),
        what,
    };
    if let Some(e) = &c.error {
        out.push(controller(format!("not reachable at {}: {e}", c.admin)));
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
                "not reachable at {}: {e}; the node's pods get no new connections captured",
                n.admin
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
    let mut out = match &c.error {
        Some(e) => format!("controller {}: unreachable: {e}\n", c.admin),
        None => format!(
            "controller {}: version {}, model {}/{}\n",
            c.admin,
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
