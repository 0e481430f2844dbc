//! The local sandbox: a Kubernetes-like cluster of network namespaces on one machine.
//!
//! ```text
//!  user manifests ---------------------------------------> controller (manifest mode)
//!     |  (watched)                                            ^  reads both directories
//!     v                                                       |
//!  sandbox: API server + scheduler + kubelet + runtime + DNS  |
//!     -> <state>/cluster/*.yaml: Namespaces, Pods (UID, node, IP, Ready), Services
//!        with the cluster IPs it gave out  ------------------/--> node agents read them
//!     -> fabric netns (bridge br0), a netns per node routing its pods' range
//!     -> per pod: netns + CNI chain (bridge + host-local, then weft-cni -> node agent),
//!        a pause process and the pod's command, in kubelet-style cgroups; probes from
//!        the node; /etc/netns/<pod>/hosts for service names
//!  per node, as DaemonSets: node agent (in the node's netns), node-proxy
//! ```
//!
//! The sandbox plays only Kubernetes and the container runtime: enrollment, capture and
//! handing pods to node-proxy are the node agent's and weft-cni's, the same code as on a
//! real node; the mesh model is the controller's. Editing the manifests while it runs
//! takes effect live. Everything lives in namespaces the sandbox creates; the host's own
//! namespace gets nothing but loopback ports for the controller, the node-proxies' and
//! the waypoints' admin endpoints.

pub mod cgroup;
pub mod cni;
pub mod kubelet;
pub mod manifest;
pub mod net;
pub mod probe;
pub mod summary;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context};
use api::ObjectName;
use runtime::handoff::HandoffClient;
use runtime::netns::Netns;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use self::cgroup::Cgroups;
use self::kubelet::{Addresses, RunningPod, Writer};
use self::manifest::Cluster;
use self::probe::Prober;

/// The controller's gRPC port is `admin_base_port + CONTROLLER_OFFSET` (15012 by
/// default, as in a cluster), its admin port two above; node-proxies take the ports
/// below.
pub const CONTROLLER_OFFSET: u16 = 12;
/// Waypoint pods' admin ports are `admin_base_port + WAYPOINT_ADMIN_OFFSET` and up.
pub const WAYPOINT_ADMIN_OFFSET: u16 = 15;
/// The most waypoint pods one sandbox runs.
pub const MAX_WAYPOINTS: u16 = 5;
/// Where each node agent's admin endpoint listens, inside its node's namespace.
pub const AGENT_ADMIN: SocketAddr =
    SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 15022);

/// The name in the controller's certificate, as in a cluster.
pub const CONTROLLER_NAME: &str = "weft-controller.weft-system.svc";

/// How to run the sandbox.
#[derive(Debug, Clone)]
pub struct UpOptions {
    /// The manifest directory.
    pub dir: PathBuf,
    /// The sandbox name: prefixes its namespaces; several can run side by side.
    pub name: String,
    /// Where state, certificates and logs go.
    pub state_dir: PathBuf,
    /// node-proxy admin ports are this, this + 1, ... on 127.0.0.1; the controller's
    /// are this + 12 (gRPC) and + 14 (admin).
    pub admin_base_port: u16,
    /// How often to print the traffic summary (`None`: never).
    pub summary_every: Option<Duration>,
    /// Stop after this long (`None`: until Ctrl-C or SIGTERM).
    pub duration: Option<Duration>,
    /// The executable providing `controller` and `echo` (weftctl itself); node-proxies
    /// and waypoints run their own binaries beside it ([`role_exe`]).
    pub exe: PathBuf,
    /// Lifetime of workload certificates (the controller's `--leaf-ttl`).
    pub leaf_ttl: Option<String>,
    /// Where waypoints export spans (their `--otlp-endpoint`).
    pub otlp_endpoint: Option<String>,
    /// Run a Prometheus scraping the sandbox, listening here (port 0: a free one).
    pub prometheus: Option<SocketAddr>,
    /// The cluster network's address families.
    pub ip_family: net::IpFamily,
    /// Controller replicas (a Deployment's `replicas`): the first on 127.0.0.1, the
    /// others on 127.0.0.2, ... at the same ports; proxies are given them all.
    pub controller_replicas: u8,
    /// The Gateway API CRDs the sandbox's API server has installed: its Gateway API
    /// objects are checked against them. `None`: not checked.
    pub gateway_api_crds: Option<PathBuf>,
    /// Nodes pods that name none are scheduled on (`node-1`..).
    pub nodes: u16,
}

/// The default state directory of a sandbox.
pub fn default_state_dir(name: &str) -> PathBuf {
    PathBuf::from("/run/weft/sandbox").join(name)
}

/// What a running sandbox consists of, written to `state.json` for `down` and tests.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct State {
    /// Sandbox name.
    pub name: String,
    /// The fabric namespace.
    pub fabric: String,
    /// The cluster network's address families.
    #[serde(default)]
    pub ip_family: net::IpFamily,
    /// PID of the `weftctl local up` process.
    pub supervisor_pid: u32,
    /// The controller (its first replica).
    pub controller: ControllerState,
    /// Its other replicas.
    #[serde(default)]
    pub replicas: Vec<ControllerState>,
    /// Simulated nodes.
    pub nodes: Vec<NodeState>,
    /// Pods.
    pub pods: Vec<PodState>,
    /// Services.
    pub services: Vec<ServiceState>,
    /// Everything is up.
    pub ready: bool,
    /// Upgrades (`weftctl local upgrade`) carried out so far.
    #[serde(default)]
    pub upgrades: u64,
    /// What failed in the last upgrade, per node; empty if it succeeded.
    #[serde(default)]
    pub upgrade_errors: Vec<String>,
    /// Manifest edits applied so far.
    #[serde(default)]
    pub reloads: u64,
    /// Why the last edit of the manifests could not be applied, if it could not.
    #[serde(default)]
    pub reload_error: Option<String>,
    /// The Prometheus of `up --prometheus`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prometheus: Option<PrometheusState>,
}

/// The Prometheus scraping the sandbox.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PrometheusState {
    /// Its PID.
    pub pid: u32,
    /// Its URL (loopback).
    pub url: String,
}

/// The controller process.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ControllerState {
    /// Its PID (0 while stopped).
    pub pid: u32,
    /// Where proxies connect.
    pub grpc: SocketAddr,
    /// Its admin endpoint.
    pub admin: SocketAddr,
    /// Its log.
    pub log: PathBuf,
    /// Stopped by `weftctl local controller stop`.
    pub stopped: bool,
    /// Its starts so far.
    pub starts: u64,
}

/// One of the controller's other replicas.
struct Replica {
    child: Option<Child>,
    state: ControllerState,
}

/// A simulated node: its network namespace and what runs on it as DaemonSets would.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeState {
    /// Node name.
    pub name: String,
    /// Its network namespace (the node's own network).
    pub netns: String,
    /// Its address on the fabric.
    pub ip: IpAddr,
    /// Its pod range.
    pub pod_cidr: String,
    /// Its node-proxy's admin address. Each node-proxy pod has its own network
    /// namespace in a cluster, so its own admin address: here, successive ones alternate
    /// between 127.0.0.1 and 127.0.0.2 on the node's port.
    pub admin: SocketAddr,
    /// Its node-proxy pod's number: 0, then one more on each upgrade (its `--pod-dir`
    /// is `<state>/<node>/node-proxy-<generation>`, as its pod's emptyDir).
    #[serde(default)]
    pub generation: u32,
    /// What the last upgrade of its node-proxy saw.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_upgrade: Option<UpgradeReport>,
    /// Its node-proxy's handoff socket.
    pub handoff: PathBuf,
    /// Its node-proxy's PID (changes when restarted).
    pub pid: u32,
    /// Replaced node-proxies still draining.
    #[serde(default)]
    pub draining: Vec<u32>,
    /// Its node-proxy's log.
    pub log: PathBuf,
    /// The token its node-proxy authenticates with.
    pub token: PathBuf,
    /// Its node agent.
    pub agent: AgentState,
    /// The runtime's CNI configuration directory on this node.
    pub cni_conf_dir: PathBuf,
}

/// What one node-proxy upgrade saw, played in a DaemonSet surge's order: the new pod
/// beside the old one, the old one deleted once the new one is Ready, and in between the
/// old container restarted after the takeover (as the kubelet restarts an exited one).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UpgradeReport {
    /// The new node-proxy's readiness probes that failed while the old one still served
    /// the node.
    pub not_ready_before_takeover: u32,
    /// The new node-proxy's readiness probes that passed while the old one still served
    /// the node: a DaemonSet would have deleted the old pod too early.
    pub ready_before_takeover: u32,
    /// The old node-proxy, its container restarted after the takeover, reported itself
    /// retired and took nothing back.
    pub restarted_old_retired: bool,
    /// Who served the node (the handoff socket's owner) after that restart.
    pub owner_after_restart: u32,
}

/// A node's agent.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentState {
    /// Its PID (0 while stopped).
    pub pid: u32,
    /// Its admin endpoint, inside the node's network namespace.
    pub admin: SocketAddr,
    /// The socket weft-cni asks it on.
    pub socket: PathBuf,
    /// Its log.
    pub log: PathBuf,
    /// Stopped by `weftctl local agent stop`.
    pub stopped: bool,
    /// Its starts so far.
    pub starts: u64,
}

/// A pod.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodState {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// UID.
    pub uid: String,
    /// Node.
    pub node: String,
    /// Service account.
    pub service_account: String,
    /// Its network namespace (`ip netns exec <netns> ...`).
    pub netns: String,
    /// Its IP, once its sandbox is set up (the primary one: `status.podIP`).
    pub ip: Option<IpAddr>,
    /// All its IPs when it has more than one (`status.podIPs`), the primary first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ips: Vec<IpAddr>,
    /// `Pending` (its sandbox not set up yet: see `message`) or `Running`.
    pub phase: String,
    /// Its Ready condition (its readiness probe passes, or it has none and runs).
    pub ready: bool,
    /// Container restarts so far.
    pub restarts: u32,
    /// Why it is not running, as the kubelet reports it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// PID of its process.
    pub pid: u32,
    /// Its stdout and stderr.
    pub log: PathBuf,
    /// A waypoint pod's admin endpoint (metrics, readiness, config dump).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin: Option<SocketAddr>,
    /// When it was deleted (its object's `deletionTimestamp`, RFC 3339): it runs on
    /// through its grace period, then stops and its object goes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deletion_timestamp: Option<String>,
}

/// A service.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceState {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// Its virtual IP (the primary one); none for a headless service.
    pub vip: Option<IpAddr>,
    /// All its virtual IPs when it has more than one (a dual-stack service).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub vips: Vec<IpAddr>,
}

impl PodState {
    /// Every IP of the pod, the primary first.
    pub fn all_ips(&self) -> Vec<IpAddr> {
        match self.ips.is_empty() {
            true => self.ip.into_iter().collect(),
            false => self.ips.clone(),
        }
    }
}

impl ServiceState {
    /// Every virtual IP of the service, the primary first.
    pub fn all_vips(&self) -> Vec<IpAddr> {
        match self.vips.is_empty() {
            true => self.vip.into_iter().collect(),
            false => self.vips.clone(),
        }
    }
}

/// How long a deleted pod runs on before it is stopped: its endpoints are withdrawn
/// across the mesh meanwhile, so no new connection is sent to a stopped pod. It stands for
/// a pod's `terminationGracePeriodSeconds` with the usual `preStop` pause.
const TERMINATION_GRACE: Duration = Duration::from_secs(3);

fn require_root(what: &str) -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("{what} needs root: it creates network namespaces and nftables rules (run it with sudo)");
    }
    Ok(())
}

fn write_atomic(path: &Path, contents: &[u8]) -> anyhow::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, contents).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))
}

fn stop_child(c: &mut Child, grace: Duration) {
    let pid = nix::unistd::Pid::from_raw(c.id() as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let start = Instant::now();
    while start.elapsed() < grace {
        if let Ok(Some(_)) = c.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = c.kill();
    let _ = c.wait();
}

fn log_file(path: &Path) -> anyhow::Result<(Stdio, Stdio)> {
    let f = File::options()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("cannot open log {}", path.display()))?;
    Ok((Stdio::from(f.try_clone()?), Stdio::from(f)))
}

/// How long a replaced node-proxy may take to hear it was replaced and drain (its drain
/// grace is 2 s in the sandbox) before `up` stops it.
const RETIRE_AFTER: Duration = Duration::from_secs(30);
/// How long pods wait for their node's agent to be ready before their sandboxes are set
/// up anyway (as a kubelet does not wait for a DaemonSet).
const AGENT_WAIT: Duration = Duration::from_secs(30);

/// How long a pod's sandbox setup (its CNI ADD) is the only one on its node: one at a
/// time gives a fresh sandbox's pods their addresses in manifest order, and the plugins
/// that assign them have answered long before this.
const SETUP_ALONE: Duration = Duration::from_secs(2);

/// The node agent binary, beside weftctl.
pub const NODE_AGENT_BIN: &str = "node-agent";
/// The CNI plugin binary, beside weftctl (the node agent installs it on its node).
pub const WEFT_CNI_BIN: &str = "weft-cni";

/// A node, its DaemonSets' processes, its CNI setup and its kubelet's prober.
struct Node {
    state: NodeState,
    index: u16,
    proxy: Option<Child>,
    agent: Option<Child>,
    cni: cni::Cni,
    prober: Prober,
    /// A thread in the node's namespace, to read the agent's admin endpoint there.
    netns: Netns,
    /// The agent has been ready at least once: pods may start.
    agent_ready: bool,
    since: Instant,
}

impl Node {
    /// `GET path` from the node agent's admin endpoint.
    fn agent_get(&self, path: &'static str) -> Option<String> {
        let admin = self.state.agent.admin;
        self.netns
            .run_blocking(move || summary::fetch(admin, path).ok())
            .ok()
            .flatten()
    }

    fn stop_marker(&self) -> PathBuf {
        self.state
            .agent
            .log
            .with_file_name(format!("agent-{}.stopped", self.state.name))
    }
}

/// Everything the sandbox runs.
struct Sandbox {
    opts: UpOptions,
    fabric: String,
    cluster_dir: PathBuf,
    ca_dir: PathBuf,
    tokens_dir: PathBuf,
    logs_dir: PathBuf,
    path_env: String,
    ip_exe: PathBuf,
    /// What the sandbox's API server checks objects with, and schedules pods on.
    api: manifest::ApiServer,
    controller: Option<Child>,
    controller_state: ControllerState,
    /// The controller's other replicas.
    replicas: Vec<Replica>,
    nodes: BTreeMap<String, Node>,
    /// Replaced node-proxies still draining: (node, process, since).
    retiring: Vec<(String, Child, Instant)>,
    pods: BTreeMap<ObjectName, RunningPod>,
    services: Vec<ServiceState>,
    addresses: Addresses,
    cluster: Cluster,
    cgroups: Cgroups,
    /// Pods admitted so far.
    admitted: u64,
    probes: mpsc::Receiver<probe::Outcome>,
    probes_tx: mpsc::Sender<probe::Outcome>,
    fabric_made: bool,
    upgrades: u64,
    upgrade_errors: Vec<String>,
    reloads: u64,
    reload_error: Option<String>,
    ready: bool,
    prometheus: Option<crate::prometheus::Prometheus>,
}

impl Sandbox {
    fn state(&self) -> State {
        State {
            name: self.opts.name.clone(),
            fabric: self.fabric.clone(),
            ip_family: self.opts.ip_family,
            supervisor_pid: std::process::id(),
            controller: self.controller_state.clone(),
            replicas: self.replicas.iter().map(|r| r.state.clone()).collect(),
            nodes: self.nodes.values().map(|n| n.state.clone()).collect(),
            pods: self.pods.values().map(|p| p.state.clone()).collect(),
            services: self.services.clone(),
            ready: self.ready,
            upgrades: self.upgrades,
            upgrade_errors: self.upgrade_errors.clone(),
            reloads: self.reloads,
            reload_error: self.reload_error.clone(),
            prometheus: self.prometheus.as_ref().map(|p| PrometheusState {
                pid: p.pid(),
                url: p.url(),
            }),
        }
    }

    fn save(&self) -> anyhow::Result<()> {
        let state = self.state();
        if let Some(p) = &self.prometheus {
            p.update(&state)?;
        }
        write_atomic(
            &self.opts.state_dir.join("state.json"),
            &serde_json::to_vec_pretty(&state)?,
        )
    }

    fn writer(&self) -> Writer {
        Writer {
            dir: self.cluster_dir.clone(),
        }
    }

    fn stopped_marker(&self) -> PathBuf {
        self.opts.state_dir.join("controller.stopped")
    }

    fn start_controller(&mut self) -> anyhow::Result<()> {
        let child = self.spawn_controller(&self.controller_state)?;
        self.controller_state.pid = child.id();
        self.controller_state.starts += 1;
        self.controller = Some(child);
        Ok(())
    }

    /// Starts one replica of the controller, as `state` says where.
    fn spawn_controller(&self, state: &ControllerState) -> anyhow::Result<Child> {
        let (out, err) = log_file(&state.log)?;
        let mut cmd = Command::new(&self.opts.exe);
        cmd.arg("controller")
            .arg("--manifests")
            .arg(&self.opts.dir)
            .arg("--manifests")
            .arg(&self.cluster_dir)
            .arg("--ca-dir")
            .arg(&self.ca_dir)
            .arg("--node-tokens")
            .arg(&self.tokens_dir)
            .args(["--listen", &state.grpc.to_string()])
            .args(["--admin", &state.admin.to_string()])
            .args(["--server-name", CONTROLLER_NAME])
            // Statuses, as `kubectl get -o yaml` shows them in a cluster, written by
            // the replica holding the Lease kept beside them.
            .arg("--status-dir")
            .arg(self.opts.state_dir.join("status"));
        if let Some(ttl) = &self.opts.leaf_ttl {
            cmd.args(["--leaf-ttl", ttl]);
        }
        cmd.stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .context("cannot start the controller")
    }

    /// Starts replica `index` (1-based among the others) and waits until it is ready.
    fn start_replica(&mut self, index: usize, limit: Duration) -> anyhow::Result<()> {
        let child = self.spawn_controller(&self.replicas[index].state)?;
        let replica = &mut self.replicas[index];
        replica.state.pid = child.id();
        replica.state.starts += 1;
        replica.child = Some(child);
        let start = Instant::now();
        while !summary::fetch(replica.state.admin, "/ready").is_ok_and(|b| b.starts_with("ready")) {
            if let Some(Ok(Some(status))) = replica.child.as_mut().map(Child::try_wait) {
                bail!(
                    "controller replica {} exited ({status}); see {}",
                    index + 2,
                    replica.state.log.display()
                );
            }
            if start.elapsed() > limit {
                bail!(
                    "controller replica {} is not ready after {} s; see {}",
                    index + 2,
                    limit.as_secs(),
                    replica.state.log.display()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// Every replica's gRPC address, as proxies are given them (`--controller`).
    fn controller_addrs(&self) -> String {
        std::iter::once(self.controller_state.grpc)
            .chain(self.replicas.iter().map(|r| r.state.grpc))
            .map(|a| a.to_string())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Waits until the controller answers `/ready` (it has read the manifests).
    fn wait_controller(&mut self, limit: Duration) -> anyhow::Result<()> {
        let start = Instant::now();
        loop {
            if let Some(Ok(Some(status))) = self.controller.as_mut().map(Child::try_wait) {
                bail!(
                    "the controller exited ({status}); see {}:\n{}",
                    self.controller_state.log.display(),
                    tail(&self.controller_state.log, 20)
                );
            }
            if summary::fetch(self.controller_state.admin, "/ready")
                .is_ok_and(|b| b.starts_with("ready"))
            {
                return Ok(());
            }
            if start.elapsed() > limit {
                bail!(
                    "the controller is not ready after {} s; see {}",
                    limit.as_secs(),
                    self.controller_state.log.display()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// What starting a pod's process needs from the sandbox.
    fn launch(&self) -> kubelet::Launch {
        kubelet::Launch {
            path_env: self.path_env.clone(),
            exe: self.opts.exe.clone(),
            controller: self.controller_addrs(),
            controller_name: CONTROLLER_NAME.to_owned(),
            controller_ca: self.ca_dir.join(controller::ca::ROOT_CERT),
            tokens: self.tokens_dir.clone(),
            otlp_endpoint: self.opts.otlp_endpoint.clone(),
            waypoint_admin_ports: std::sync::Arc::new(std::sync::Mutex::new(
                (self.opts.admin_base_port + WAYPOINT_ADMIN_OFFSET
                    ..self.opts.admin_base_port + WAYPOINT_ADMIN_OFFSET + MAX_WAYPOINTS)
                    .map(|p| SocketAddr::from(([127, 0, 0, 1], p)))
                    .filter(|a| !self.pods.values().any(|p| p.state.admin == Some(*a)))
                    .collect(),
            )),
        }
    }

    /// Waits (up to `limit` in all) until the `pods` run and listen on their declared
    /// ports, so a client started after `ready` finds them serving. A pod still closed at
    /// the deadline is named in a warning, not an error: its log or status says why.
    fn wait_listening(&mut self, pods: &[ObjectName], limit: Duration) {
        let start = Instant::now();
        let mut waiting: Vec<ObjectName> = pods.to_vec();
        loop {
            self.kubelet();
            waiting.retain(|name| {
                self.pods
                    .get(name)
                    .is_some_and(|p| p.child.is_none() || !kubelet::closed_ports(p).is_empty())
            });
            if waiting.is_empty() {
                return;
            }
            if start.elapsed() > limit {
                for name in waiting {
                    if let Some(p) = self.pods.get(&name) {
                        tracing::warn!(
                            pod = %p.name(),
                            ports = ?kubelet::closed_ports(p),
                            message = ?p.state.message,
                            "pod does not run and listen on its ports after {} s; see {}",
                            limit.as_secs(),
                            p.state.log.display()
                        );
                    }
                }
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn node_state(&self, name: &str, index: u16) -> anyhow::Result<NodeState> {
        let dir = self.opts.state_dir.join(name);
        std::fs::create_dir_all(&dir)?;
        // A new node has no node-proxy pods yet: an earlier sandbox's pod directories (a
        // `retired` among them) would make its first node-proxy idle.
        for entry in std::fs::read_dir(&dir)?.flatten() {
            if entry
                .file_name()
                .to_string_lossy()
                .starts_with("node-proxy-")
            {
                std::fs::remove_dir_all(entry.path())?;
            }
        }
        let token = self
            .tokens_dir
            .join(format!("{name}{}", controller::auth::TOKEN_SUFFIX));
        controller::auth::NodeTokens::create(&self.tokens_dir, name)?;
        // The node-proxy's copy: the controller's directory holds every node's token.
        let own = dir.join("token");
        std::fs::copy(&token, &own)?;
        Ok(NodeState {
            name: name.to_owned(),
            netns: format!("{}.{name}", self.opts.name),
            ip: match self.opts.ip_family.v6_first() {
                false => IpAddr::V4(net::node_ip(index)),
                true => IpAddr::V6(net::node_ip6(index)),
            },
            pod_cidr: self.pod_subnets(index).join(","),
            admin: SocketAddr::from(([127, 0, 0, 1], self.opts.admin_base_port + index)),
            generation: 0,
            last_upgrade: None,
            handoff: dir.join("handoff.sock"),
            pid: 0,
            draining: Vec::new(),
            log: self.logs_dir.join(format!("node-proxy_{name}.log")),
            token: own,
            agent: AgentState {
                pid: 0,
                admin: AGENT_ADMIN,
                socket: dir.join("node-agent.sock"),
                log: self.logs_dir.join(format!("node-agent_{name}.log")),
                stopped: false,
                starts: 0,
            },
            cni_conf_dir: dir.join("net.d"),
        })
    }

    /// Node `index`'s pod ranges, the primary family first.
    fn pod_subnets(&self, index: u16) -> Vec<String> {
        let family = self.opts.ip_family;
        let v4 = family
            .v4()
            .then(|| format!("{}/24", net::pod_subnet(index)));
        let v6 = family
            .v6()
            .then(|| format!("{}/{}", net::pod_subnet6(index), net::PREFIX6));
        match family.v6_first() {
            false => v4.into_iter().chain(v6).collect(),
            true => v6.into_iter().chain(v4).collect(),
        }
    }

    /// Starts the node-proxy of `node`'s pod number `generation`, with its own `admin`
    /// address and pod directory.
    fn spawn_node_proxy(
        &self,
        node: &NodeState,
        admin: SocketAddr,
        generation: u32,
    ) -> anyhow::Result<Child> {
        let (out, err) = log_file(&node.log)?;
        let pod_dir = self
            .opts
            .state_dir
            .join(&node.name)
            .join(format!("node-proxy-{generation}"));
        Command::new(role_exe(&self.opts.exe, NODE_PROXY_BIN))
            .args(["--node", &node.name])
            .arg("--handoff")
            .arg(&node.handoff)
            .args(["--controller", &self.controller_addrs()])
            .args(["--controller-name", CONTROLLER_NAME])
            .arg("--controller-ca")
            .arg(self.ca_dir.join(controller::ca::ROOT_CERT))
            .arg("--token-file")
            .arg(&node.token)
            .args(["--admin", &admin.to_string(), "--drain-grace", "2"])
            .arg("--pod-dir")
            .arg(pod_dir)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("cannot start node-proxy for {}", node.name))
    }

    /// The node agent of `node`, inside the node's namespace (a host-network pod with the
    /// host's PID namespace, as its DaemonSet runs it), reading the sandbox's API server
    /// objects.
    fn spawn_agent(&self, node: &NodeState) -> anyhow::Result<Child> {
        let (out, err) = log_file(&node.agent.log)?;
        let dir = self.opts.state_dir.join(&node.name);
        // Its PATH holds Weft's binaries only, as its image does: no `nft`, no `ip`.
        let path = role_exe(&self.opts.exe, NODE_AGENT_BIN)
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default();
        Command::new(&self.ip_exe)
            .args(["netns", "exec", &node.netns])
            .arg(role_exe(&self.opts.exe, NODE_AGENT_BIN))
            .env("PATH", path)
            .args(["--node", &node.name])
            .arg("--objects")
            .arg(&self.cluster_dir)
            .arg("--handoff")
            .arg(&node.handoff)
            .arg("--socket")
            .arg(&node.agent.socket)
            .arg("--state")
            .arg(dir.join("node-agent.json"))
            .arg("--cni-bin-dir")
            .arg(dir.join("cni-bin"))
            .arg("--cni-conf-dir")
            .arg(&node.cni_conf_dir)
            .arg("--cni-plugin")
            .arg(role_exe(&self.opts.exe, WEFT_CNI_BIN))
            .args(["--admin", &node.agent.admin.to_string()])
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("cannot start the node agent of {}", node.name))
    }

    /// Makes every node the pods ask for that does not exist yet: its namespace on the
    /// fabric, routes between it and the others, its network plugin's configuration, its
    /// prober, and its DaemonSets' processes (node agent, node-proxy).
    fn ensure_nodes(&mut self) -> anyhow::Result<()> {
        let mut wanted: Vec<String> = self.cluster.pods.iter().map(|p| p.node.clone()).collect();
        wanted.sort();
        wanted.dedup();
        for name in wanted {
            if self.nodes.contains_key(&name) {
                continue;
            }
            let index = u16::try_from(self.nodes.len()).unwrap_or(u16::MAX);
            if index >= CONTROLLER_OFFSET {
                bail!(
                    "the sandbox runs at most {CONTROLLER_OFFSET} nodes; {name} would be one more"
                );
            }
            let mut state = self.node_state(&name, index)?;
            let family = self.opts.ip_family;
            net::create_node(
                &self.fabric,
                &state.netns,
                &format!("n{index}"),
                index,
                family,
            )?;
            for other in self.nodes.values() {
                net::route_to_node(&state.netns, other.index, family)?;
                net::route_to_node(&other.state.netns, index, family)?;
            }
            let dir = self.opts.state_dir.join(&name);
            std::fs::create_dir_all(&state.cni_conf_dir)?;
            std::fs::create_dir_all(dir.join("cni-bin"))?;
            // What the cluster's network plugin's installer writes on the node.
            let primary = cni::primary_conflist(&self.pod_subnets(index), &dir.join("ipam"));
            write_atomic(
                &state.cni_conf_dir.join(cni::PRIMARY_CONFLIST),
                serde_json::to_string_pretty(&primary)?.as_bytes(),
            )?;
            let netns_file = File::open(Path::new("/run/netns").join(&state.netns))
                .with_context(|| format!("cannot open the namespace of node {name}"))?;
            let prober = Prober::start(
                &name,
                netns_file.try_clone()?.into(),
                self.probes_tx.clone(),
            )?;
            let netns = Netns::enter(netns_file.into(), &format!("node {name}"))?;
            let cni = cni::Cni {
                conf_dir: state.cni_conf_dir.clone(),
                bin_dirs: vec![dir.join("cni-bin"), PathBuf::from(cni::SYSTEM_PLUGINS)],
                node_netns: state.netns.clone(),
                ip: self.ip_exe.clone(),
                ipv6: self.opts.ip_family.v6(),
            };
            let agent = self.spawn_agent(&state)?;
            state.agent.pid = agent.id();
            state.agent.starts = 1;
            let proxy = self.spawn_node_proxy(&state, state.admin, state.generation)?;
            state.pid = proxy.id();
            self.nodes.insert(
                name,
                Node {
                    state,
                    index,
                    proxy: Some(proxy),
                    agent: Some(agent),
                    cni,
                    prober,
                    netns,
                    agent_ready: false,
                    since: Instant::now(),
                },
            );
        }
        Ok(())
    }

    /// Waits until every node's agent and node-proxy are ready (up to `limit`).
    fn wait_nodes(&mut self, limit: Duration) -> anyhow::Result<()> {
        let start = Instant::now();
        loop {
            let mut waiting = Vec::new();
            for node in self.nodes.values_mut() {
                node.agent_ready |= node
                    .agent_get("/ready")
                    .is_some_and(|b| b.starts_with("ready"));
                let proxy = summary::fetch(node.state.admin, "/ready")
                    .is_ok_and(|b| b.starts_with("ready"));
                if !node.agent_ready || !proxy {
                    waiting.push(node.state.name.clone());
                }
            }
            if waiting.is_empty() {
                return Ok(());
            }
            if start.elapsed() > limit {
                bail!(
                    "nodes {waiting:?} are not ready after {} s (their node agent and node-proxy); see the logs in {}",
                    limit.as_secs(),
                    self.logs_dir.display()
                );
            }
            self.supervise()?;
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Makes the running pods and services what `cluster` asks for. New pods are
    /// admitted (their objects Pending); the kubelet sets them up on its next round.
    /// A changed pod comes back as a new one, as a Deployment's rollout would make it.
    fn reconcile(&mut self, cluster: Cluster) -> anyhow::Result<Vec<ObjectName>> {
        let writer = self.writer();
        writer.namespaces(&cluster.namespaces)?;
        let services =
            kubelet::services(&cluster, &mut self.addresses, &writer, self.opts.ip_family)?;
        let services_changed = services
            .iter()
            .map(|s| (&s.namespace, &s.name, s.all_vips()))
            .ne(self
                .services
                .iter()
                .map(|s| (&s.namespace, &s.name, s.all_vips())));
        self.services = services;
        let desired: BTreeMap<ObjectName, manifest::PodSpec> = kubelet::desired(&cluster)
            .into_iter()
            .map(|(k, v)| (k, v.clone()))
            .collect();
        let stale: Vec<ObjectName> = self
            .pods
            .iter()
            .filter(|(name, pod)| desired.get(*name) != Some(&pod.spec))
            .map(|(name, _)| name.clone())
            .collect();
        // Deleted as by the API server: the object gets its deletionTimestamp (so it is
        // no endpoint any more) while the pod runs through its grace period; it stops
        // and its object goes in a later round of the kubelet. A replaced pod comes back
        // once the old one is gone, as a StatefulSet's would.
        let now = Instant::now();
        for name in stale {
            let pod = self.pods.get_mut(&name);
            if let Some(pod) = pod.filter(|p| p.state.deletion_timestamp.is_none()) {
                pod.state.deletion_timestamp =
                    Some(k8s_openapi::jiff::Timestamp::now().to_string());
                pod.stop_at = Some(now + TERMINATION_GRACE);
                writer.pod(&pod.spec, &pod.state)?;
                println!("pod {} is terminating", pod.name());
            }
        }
        self.cluster = cluster;
        self.ensure_nodes()?;
        let added = self.admit_missing()?;
        if services_changed {
            for pod in self.pods.values().filter(|p| p.netns_made) {
                if let Err(e) = kubelet::write_dns(&pod.state, &self.services) {
                    eprintln!("pod {}: {e:#}", pod.name());
                }
            }
        }
        Ok(added)
    }

    /// Admits the pods the manifests ask for that are not there, in manifest order (each
    /// node's pods get addresses in that order); returns their names.
    fn admit_missing(&mut self) -> anyhow::Result<Vec<ObjectName>> {
        let writer = self.writer();
        let mut added = Vec::new();
        for spec in &self.cluster.pods {
            let name = ObjectName::new(&spec.namespace, &spec.name);
            if self.pods.contains_key(&name) {
                continue;
            }
            self.admitted += 1;
            let pod = kubelet::admit(&self.opts.name, spec, &self.logs_dir, self.admitted);
            writer.pod(spec, &pod.state)?;
            self.pods.insert(name.clone(), pod);
            added.push(name);
        }
        Ok(added)
    }

    /// Stops the terminating pods whose grace period is over and removes their objects;
    /// admits what waited for their names. True when any went.
    fn finish_terminations(&mut self, now: Instant) -> bool {
        let over: Vec<ObjectName> = self
            .pods
            .iter()
            .filter(|(_, p)| p.stop_at.is_some_and(|at| at <= now))
            .map(|(name, _)| name.clone())
            .collect();
        let writer = self.writer();
        for name in &over {
            if let Some(pod) = self.destroy_pod(name) {
                writer.remove_pod(&pod.state);
                println!("pod {} removed", pod.name());
            }
        }
        if !over.is_empty() {
            if let Err(e) = self.admit_missing() {
                eprintln!("admitting pods: {e:#}");
            }
        }
        !over.is_empty()
    }

    /// One round of the kubelet: sandboxes set up (or retried), containers started and
    /// restarted, probe results applied, terminating pods stopped, objects updated. True
    /// when anything changed.
    fn kubelet(&mut self) -> bool {
        let now = Instant::now();
        let mut changed = self.finish_terminations(now);
        let launch = self.launch();
        let writer = self.writer();
        // Probe outcomes first: they may ask for restarts.
        while let Ok(outcome) = self.probes.try_recv() {
            let Some(pod) = self.pods.get_mut(&outcome.pod) else {
                continue;
            };
            if pod.state.uid != outcome.uid {
                continue;
            }
            match outcome.kind {
                probe::Kind::Readiness => {
                    if pod.state.ready != outcome.passing {
                        println!(
                            "pod {} is {} ({})",
                            pod.name(),
                            if outcome.passing {
                                "ready"
                            } else {
                                "not ready"
                            },
                            outcome.detail
                        );
                    }
                    pod.state.ready = outcome.passing;
                }
                probe::Kind::Liveness if !outcome.passing => {
                    println!(
                        "pod {}: liveness probe failed ({}); restarting its container",
                        pod.name(),
                        outcome.detail
                    );
                    kubelet::stop_process(pod, Duration::from_secs(2));
                    kubelet::restart_later(pod);
                }
                probe::Kind::Liveness => {}
            }
            let _ = writer.pod(&pod.spec, &pod.state);
            changed = true;
        }
        // A node sets its pods up one at a time, the earliest admitted first; but a setup
        // under way for longer than SETUP_ALONE (a CNI ADD waiting on something) does not
        // hold up the next, as a kubelet's pods are set up side by side.
        let mut busy: BTreeSet<String> = self
            .pods
            .values()
            .filter(|p| p.setup.is_some())
            .filter(|p| p.setup_since.is_none_or(|at| at.elapsed() < SETUP_ALONE))
            .map(|p| p.state.node.clone())
            .collect();
        let mut order: Vec<&mut RunningPod> = self.pods.values_mut().collect();
        order.sort_by_key(|p| p.admitted);
        for pod in order {
            let Some(node) = self.nodes.get(&pod.state.node) else {
                continue;
            };
            // A terminating pod is neither set up nor restarted; it only runs out.
            if pod.state.deletion_timestamp.is_some() {
                continue;
            }
            // A sandbox being set up.
            if let Some(outcome) = kubelet::setup_done(pod) {
                changed = true;
                match outcome {
                    Ok(ip) => {
                        let started = kubelet::start_pause(pod, &self.cgroups)
                            .and_then(|()| kubelet::write_dns(&pod.state, &self.services));
                        if let Err(e) = started {
                            eprintln!("pod {}: {e:#}", pod.name());
                        }
                        // Running with its address before its container starts, so the
                        // mesh knows the address before the first connection from it.
                        pod.state.phase = "Running".into();
                        pod.state.ready = pod.spec.readiness.is_none();
                        let _ = writer.pod(&pod.spec, &pod.state);
                        match kubelet::start_process(pod, &launch, &self.cgroups) {
                            Ok(()) => println!(
                                "pod {} started ({ip}, node {})",
                                pod.name(),
                                pod.state.node
                            ),
                            Err(e) => eprintln!("{e:#}"),
                        }
                        if let Some(target) = kubelet::probe_target(pod) {
                            node.prober.set(pod.key(), target);
                        }
                    }
                    Err(why) => {
                        eprintln!("pod {} waits: {why}", pod.name());
                        let _ = writer.pod(&pod.spec, &pod.state);
                    }
                }
                continue;
            }
            if pod.setup.is_some() {
                continue;
            }
            let due = pod.retry_at.is_none_or(|at| at <= now);
            // No sandbox yet: set one up once the node's agent is there (or has had time).
            if !pod.netns_made {
                let node_ready = node.agent_ready
                    || node.state.agent.stopped
                    || node.since.elapsed() > AGENT_WAIT;
                if due && node_ready && busy.insert(pod.state.node.clone()) {
                    pod.retry_at = None;
                    if let Err(e) = kubelet::begin_setup(pod, &node.cni) {
                        eprintln!("pod {}: {e:#}", pod.name());
                        kubelet::restart_later(pod);
                    }
                    changed = true;
                }
                continue;
            }
            // A container that exited is restarted after its backoff.
            if let Some(Ok(Some(status))) = pod.child.as_mut().map(Child::try_wait) {
                println!("pod {} exited ({status}); restarting it", pod.name());
                pod.child = None;
                pod.state.pid = 0;
                kubelet::restart_later(pod);
                let _ = writer.pod(&pod.spec, &pod.state);
                changed = true;
                continue;
            }
            if pod.child.is_none() && pod.state.ip.is_some() && due {
                pod.retry_at = None;
                match kubelet::start_process(pod, &launch, &self.cgroups) {
                    Ok(()) => {
                        if pod.spec.readiness.is_none() {
                            pod.state.ready = true;
                        }
                        if let Some(target) = kubelet::probe_target(pod) {
                            node.prober.set(pod.key(), target);
                        }
                    }
                    Err(e) => {
                        eprintln!("{e:#}");
                        kubelet::restart_later(pod);
                    }
                }
                let _ = writer.pod(&pod.spec, &pod.state);
                changed = true;
            }
        }
        changed
    }

    /// Replaces a node's node-proxy without refusing a connection, in a DaemonSet
    /// surge's order. The new pod starts beside the old one, with its own admin address
    /// (its own network namespace in a cluster), and takes over through the handoff
    /// socket: each pod's namespace and listeners, passed as file descriptors, so the
    /// ports never close; once it serves them and owns the socket's path it tells the old
    /// one, which drains. Meanwhile the new pod is probed as the kubelet probes it: it
    /// must not be Ready before it has taken over. The old container is then restarted,
    /// as the kubelet restarts one that exited, and must not take the node back; then the
    /// old pod is deleted. The node agent, connected to the old one, reconnects to the
    /// new one and replays its pods. If the new process fails before the takeover, the
    /// old one serves on.
    fn replace_node_proxy(&mut self, name: &str) -> anyhow::Result<()> {
        let node = self.nodes[name].state.clone();
        let old_admin = node.admin;
        let admin = SocketAddr::new(
            match old_admin.ip() {
                IpAddr::V4(ip) if ip == std::net::Ipv4Addr::new(127, 0, 0, 1) => {
                    IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 2))
                }
                _ => IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
            },
            old_admin.port(),
        );
        let generation = node.generation + 1;
        let mut child = self.spawn_node_proxy(&node, admin, generation)?;
        let new_pid = child.id();
        let mut report = UpgradeReport::default();
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                bail!(
                    "the new node-proxy exited ({status}) before taking over; the old one serves on (see {})",
                    node.log.display()
                );
            }
            // Readiness first, then who serves: a node-proxy reports ready only after it
            // owns the handoff socket, so ready-then-not-owner is a real fault, never a
            // takeover that completed between the two looks.
            let ready = summary::fetch(admin, "/ready").is_ok_and(|b| b.starts_with("ready"));
            let owner = HandoffClient::connect(&node.handoff)
                .ok()
                .and_then(|c| c.peer_pid());
            match (owner == Some(new_pid), ready) {
                (true, true) => break,
                (false, true) => report.ready_before_takeover += 1,
                (false, false) => report.not_ready_before_takeover += 1,
                (true, false) => {}
            }
            if start.elapsed() > Duration::from_secs(20) {
                if owner == Some(new_pid) {
                    // It serves already (the old one has retired): kept, though not ready.
                    eprintln!("the new node-proxy of {name} took over but is not ready after 20 s (see {})", node.log.display());
                    break;
                }
                let _ = child.kill();
                let _ = child.wait();
                bail!("the new node-proxy did not take over within 20 s; the old one serves on");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let entry = self.nodes.get_mut(name).context("the node just replaced")?;
        let old = entry.proxy.replace(child);
        entry.state.pid = new_pid;
        entry.state.admin = admin;
        entry.state.generation = generation;
        if let Some(mut old) = old {
            eprintln!(
                "node-proxy of {name} replaced: pid {new_pid} serves, pid {} drains",
                old.id()
            );
            // Drained (it reports itself retired), its container is restarted.
            let drained = Instant::now();
            while drained.elapsed() < Duration::from_secs(15)
                && !summary::fetch(old_admin, "/ready").is_ok_and(|b| b.contains("retired:"))
            {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = old.kill();
            let _ = old.wait();
            let mut restarted = self.spawn_node_proxy(&node, old_admin, node.generation)?;
            let since = Instant::now();
            while since.elapsed() < Duration::from_secs(10) {
                if summary::fetch(old_admin, "/ready").is_ok_and(|b| b.contains("retired")) {
                    report.restarted_old_retired = true;
                    break;
                }
                if let Ok(Some(_)) = restarted.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            report.owner_after_restart = HandoffClient::connect(&node.handoff)
                .ok()
                .and_then(|c| c.peer_pid())
                .unwrap_or(0);
            // The DaemonSet deletes the old pod: its retired process stops.
            if let Ok(pid) = i32::try_from(restarted.id()) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
            self.retiring
                .push((name.to_owned(), restarted, Instant::now()));
        }
        let entry = self.nodes.get_mut(name).context("the node just replaced")?;
        entry.state.last_upgrade = Some(report);
        Ok(())
    }

    /// Stops pod `name` as its kubelet would (container, CNI DEL on its node, cgroups,
    /// probes) and forgets it; returns what it was.
    fn destroy_pod(&mut self, name: &ObjectName) -> Option<RunningPod> {
        let mut pod = self.pods.remove(name)?;
        let node = self.nodes.get(&pod.state.node);
        kubelet::destroy(
            &mut pod,
            node.map(|n| &n.cni),
            &self.cgroups,
            node.map(|n| &n.prober),
        );
        Some(pod)
    }

    fn teardown(&mut self) {
        if let Some(mut p) = self.prometheus.take() {
            p.stop();
        }
        // Pods first, through their CNI DEL, while the agents still run.
        let names: Vec<ObjectName> = self.pods.keys().cloned().collect();
        for name in names {
            self.destroy_pod(&name);
        }
        for n in self.nodes.values_mut() {
            if let Some(c) = n.proxy.as_mut() {
                stop_child(c, Duration::from_secs(8));
            }
            if let Some(c) = n.agent.as_mut() {
                stop_child(c, Duration::from_secs(5));
            }
        }
        for (_, c, _) in self.retiring.iter_mut() {
            stop_child(c, Duration::from_secs(8));
        }
        if let Some(c) = self.controller.as_mut() {
            stop_child(c, Duration::from_secs(5));
        }
        for r in self.replicas.iter_mut() {
            if let Some(c) = r.child.as_mut() {
                stop_child(c, Duration::from_secs(5));
            }
        }
        for n in self.nodes.values() {
            net::kill_netns_pids(&n.state.netns);
            net::delete_netns(&n.state.netns);
        }
        if self.fabric_made {
            net::delete_netns(&self.fabric);
        }
        self.cgroups.remove_all();
        let _ = std::fs::remove_file(self.opts.state_dir.join("state.json"));
    }

    /// Restarts what died: a node-proxy or a node agent (unless stopped on purpose), the
    /// controller (likewise), as a kubelet restarts a DaemonSet's containers. True when
    /// anything changed.
    fn supervise(&mut self) -> anyhow::Result<bool> {
        let mut changed = false;
        let names: Vec<String> = self.nodes.keys().cloned().collect();
        for name in names {
            let spawn_proxy = {
                let node = self.nodes.get_mut(&name).context("a node")?;
                match node.proxy.as_mut().map(Child::try_wait) {
                    Some(Ok(Some(status))) => {
                        eprintln!("node-proxy of {name} exited ({status}); restarting it");
                        true
                    }
                    _ => false,
                }
            };
            if spawn_proxy {
                let state = self.nodes[&name].state.clone();
                let child = self.spawn_node_proxy(&state, state.admin, state.generation)?;
                let node = self.nodes.get_mut(&name).context("a node")?;
                node.state.pid = child.id();
                node.proxy = Some(child);
                changed = true;
            }
            let (stop_wanted, exited) = {
                let node = self.nodes.get_mut(&name).context("a node")?;
                let exited = match node.agent.as_mut().map(Child::try_wait) {
                    Some(Ok(Some(status))) => {
                        if !node.stop_marker().exists() {
                            eprintln!("node agent of {name} exited ({status}); restarting it");
                        }
                        true
                    }
                    _ => false,
                };
                (node.stop_marker().exists(), exited)
            };
            let node = self.nodes.get_mut(&name).context("a node")?;
            match (stop_wanted, node.agent.is_some()) {
                (true, true) => {
                    if let Some(mut c) = node.agent.take() {
                        let _ = c.kill();
                        let _ = c.wait();
                    }
                    eprintln!(
                        "node agent of {name} stopped (weftctl local agent start brings it back)"
                    );
                    node.state.agent.pid = 0;
                    node.state.agent.stopped = true;
                    changed = true;
                }
                (false, false) => {
                    let state = node.state.clone();
                    let child = self.spawn_agent(&state)?;
                    let node = self.nodes.get_mut(&name).context("a node")?;
                    node.state.agent.pid = child.id();
                    node.state.agent.stopped = false;
                    node.state.agent.starts += 1;
                    node.agent = Some(child);
                    eprintln!(
                        "node agent of {name} started (pid {})",
                        node.state.agent.pid
                    );
                    changed = true;
                }
                (false, true) if exited => {
                    node.agent = None;
                    let state = node.state.clone();
                    let child = self.spawn_agent(&state)?;
                    let node = self.nodes.get_mut(&name).context("a node")?;
                    node.state.agent.pid = child.id();
                    node.state.agent.starts += 1;
                    node.agent = Some(child);
                    changed = true;
                }
                _ => {}
            }
        }
        let stop_wanted = self.stopped_marker().exists();
        match (stop_wanted, self.controller.is_some()) {
            (true, true) => {
                if let Some(mut c) = self.controller.take() {
                    // As a crash would: no goodbye to the proxies.
                    let _ = c.kill();
                    let _ = c.wait();
                }
                eprintln!("controller stopped (weftctl local controller start brings it back)");
                self.controller_state.pid = 0;
                self.controller_state.stopped = true;
                changed = true;
            }
            (false, false) => {
                self.start_controller()?;
                self.controller_state.stopped = false;
                eprintln!("controller started (pid {})", self.controller_state.pid);
                changed = true;
            }
            (false, true) => {
                if let Some(Ok(Some(status))) = self.controller.as_mut().map(Child::try_wait) {
                    eprintln!("controller exited ({status}); restarting it");
                    self.controller = None;
                    self.start_controller()?;
                    changed = true;
                }
            }
            (true, false) => {}
        }
        // The other replicas are restarted as a Deployment's pods are.
        for index in 0..self.replicas.len() {
            let exited = match self.replicas[index].child.as_mut().map(Child::try_wait) {
                Some(Ok(Some(status))) => Some(status),
                _ => None,
            };
            if let Some(status) = exited {
                eprintln!(
                    "controller replica {} exited ({status}); restarting it",
                    index + 2
                );
                self.replicas[index].child = None;
                let child = self.spawn_controller(&self.replicas[index].state)?;
                let replica = &mut self.replicas[index];
                replica.state.pid = child.id();
                replica.state.starts += 1;
                replica.child = Some(child);
                changed = true;
            }
        }
        let before = self.retiring.len();
        self.retiring
            .retain_mut(|(node, c, since)| match c.try_wait() {
                Ok(None) if since.elapsed() < RETIRE_AFTER => true,
                Ok(None) => {
                    eprintln!(
                        "replaced node-proxy of {node} (pid {}) still runs after {} s; stopping it",
                        c.id(),
                        RETIRE_AFTER.as_secs()
                    );
                    stop_child(c, Duration::from_secs(5));
                    false
                }
                Ok(Some(status)) => {
                    eprintln!(
                        "replaced node-proxy of {node} (pid {}) drained and exited ({status})",
                        c.id()
                    );
                    false
                }
                Err(_) => {
                    let _ = c.kill();
                    let _ = c.wait();
                    false
                }
            });
        if self.retiring.len() != before {
            changed = true;
        }
        for node in self.nodes.values_mut() {
            node.state.draining = self
                .retiring
                .iter()
                .filter(|(n, _, _)| *n == node.state.name)
                .map(|(_, c, _)| c.id())
                .collect();
            if !node.agent_ready
                && node.agent.is_some()
                && node.since.elapsed() > Duration::from_millis(200)
            {
                node.agent_ready = node
                    .agent_get("/ready")
                    .is_some_and(|b| b.starts_with("ready"));
            }
        }
        Ok(changed)
    }

    /// The UIDs of the pods the node agents capture now, from their admin endpoints.
    fn captured(&self) -> BTreeSet<String> {
        let mut uids = BTreeSet::new();
        for node in self.nodes.values() {
            let Some(text) = node.agent_get("/pods") else {
                continue;
            };
            let Ok(status) = serde_json::from_str::<serde_json::Value>(&text) else {
                continue;
            };
            for p in status["pods"].as_array().into_iter().flatten() {
                if p["rules"] == true && p["served"] == true {
                    if let Some(uid) = p["uid"].as_str() {
                        uids.insert(uid.to_owned());
                    }
                }
            }
        }
        uids
    }

    fn print_banner(&self) {
        let captured = self.captured();
        println!(
            "sandbox {:?} is up: {} nodes, {} pods ({} captured by the node agents), {} services; controller at {} (admin {}); state in {}",
            self.opts.name,
            self.nodes.len(),
            self.pods.len(),
            self.pods.values().filter(|p| captured.contains(&p.state.uid)).count(),
            self.services.len(),
            self.controller_state.grpc,
            self.controller_state.admin,
            self.opts.state_dir.display()
        );
        for p in self.pods.values() {
            println!(
                "  pod {:<28} {:<15} node {:<8} {}",
                p.name(),
                p.state
                    .ip
                    .map_or_else(|| "-".to_owned(), |ip| ip.to_string()),
                p.state.node,
                if captured.contains(&p.state.uid) {
                    "mesh"
                } else {
                    "no mesh"
                }
            );
        }
        for s in &self.services {
            println!(
                "  service {:<24} {:<15} {}.{}.svc.cluster.local",
                format!("{}/{}", s.namespace, s.name),
                s.vip
                    .map_or_else(|| "headless".to_owned(), |v| v.to_string()),
                s.name,
                s.namespace
            );
        }
        println!(
            "  `ip netns exec {} <command>` runs a command in a pod; edit {} to change the mesh live; Ctrl-C stops the sandbox",
            self.pods.values().next().map_or("<pod netns>", |p| p.state.netns.as_str()),
            self.opts.dir.display()
        );
    }
}

/// Runs the sandbox until Ctrl-C, SIGTERM or `opts.duration`, then removes it.
pub async fn up(opts: UpOptions, shutdown: CancellationToken) -> anyhow::Result<()> {
    require_root("weftctl local up")?;
    // `weftctl local upgrade` asks for node-proxies to be replaced with SIGUSR1; watched
    // from the start, so one sent early is kept, not fatal.
    let upgrade = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1())
        .context("cannot watch for SIGUSR1")?;
    // Bad input stops here, before anything is created.
    let mut api = manifest::ApiServer {
        nodes: opts.nodes,
        ..manifest::ApiServer::default()
    };
    if let Some(dir) = &opts.gateway_api_crds {
        api = api.with_gateway_api(dir)?;
    }
    let cluster = manifest::load_dir_with(&opts.dir, &api)?;
    for binary in [NODE_PROXY_BIN, WAYPOINT_BIN, NODE_AGENT_BIN, WEFT_CNI_BIN] {
        let exe = role_exe(&opts.exe, binary);
        if !exe.is_file() {
            bail!(
                "{} is missing: the sandbox runs the {binary} binary next to weftctl; `cargo build --workspace --bins` builds them all",
                exe.display()
            );
        }
    }
    let bridge = Path::new(cni::SYSTEM_PLUGINS).join("bridge");
    if !bridge.is_file() {
        bail!(
            "{} is missing: the sandbox's nodes use the CNI bridge and host-local plugins (Debian: apt-get install containernetworking-plugins)",
            bridge.display()
        );
    }
    let ip_exe =
        which("ip").context("iproute2's `ip` is not on PATH (Debian: apt-get install iproute2)")?;
    let state_dir = opts.state_dir.clone();
    if state_dir.join("state.json").exists() {
        bail!(
            "a sandbox named {:?} is already running or was not cleaned up ({}); run `weftctl local down --name {}` first",
            opts.name,
            state_dir.join("state.json").display(),
            opts.name
        );
    }
    // Statuses and the Lease start afresh, as the objects do.
    let dirs = [
        state_dir.join("logs"),
        state_dir.join("cluster"),
        state_dir.join("tokens"),
        state_dir.join("status"),
    ];
    for d in &dirs {
        let _ = std::fs::remove_dir_all(d);
        std::fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
    }
    let _ = std::fs::remove_file(state_dir.join("controller.stopped"));
    for entry in std::fs::read_dir(state_dir.join("logs"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let _ = std::fs::remove_file(entry.path());
    }
    let exe_dir = opts.exe.parent().map(Path::to_path_buf).unwrap_or_default();
    let path_env = format!(
        "{}:{}",
        exe_dir.display(),
        std::env::var("PATH").unwrap_or_else(|_| "/usr/sbin:/usr/bin:/sbin:/bin".into())
    );
    let controller_state = ControllerState {
        pid: 0,
        grpc: SocketAddr::from(([127, 0, 0, 1], opts.admin_base_port + CONTROLLER_OFFSET)),
        admin: SocketAddr::from(([127, 0, 0, 1], opts.admin_base_port + CONTROLLER_OFFSET + 2)),
        log: state_dir.join("logs").join("controller.log"),
        stopped: false,
        starts: 0,
    };
    let replicas = (1..opts.controller_replicas.max(1))
        .map(|i| Replica {
            child: None,
            state: ControllerState {
                pid: 0,
                grpc: SocketAddr::from(([127, 0, 0, 1 + i], controller_state.grpc.port())),
                admin: SocketAddr::from(([127, 0, 0, 1 + i], controller_state.admin.port())),
                log: state_dir
                    .join("logs")
                    .join(format!("controller-{}.log", i + 1)),
                stopped: false,
                starts: 0,
            },
        })
        .collect();
    let cgroups = Cgroups::create(&opts.name)?;
    let (probes_tx, probes) = mpsc::channel();
    let mut sb = Sandbox {
        fabric: format!("{}-fabric", opts.name),
        cluster_dir: state_dir.join("cluster"),
        ca_dir: state_dir.join("ca"),
        tokens_dir: state_dir.join("tokens"),
        logs_dir: state_dir.join("logs"),
        path_env,
        ip_exe,
        api,
        controller: None,
        controller_state,
        replicas,
        nodes: BTreeMap::new(),
        retiring: Vec::new(),
        pods: BTreeMap::new(),
        services: Vec::new(),
        addresses: Addresses::default(),
        cluster: Cluster::default(),
        cgroups,
        admitted: 0,
        probes,
        probes_tx,
        fabric_made: false,
        upgrades: 0,
        upgrade_errors: Vec::new(),
        reloads: 0,
        reload_error: None,
        ready: false,
        prometheus: None,
        opts,
    };
    let result = run(&mut sb, cluster, shutdown, upgrade).await;
    eprintln!("stopping sandbox {:?}...", sb.opts.name);
    sb.teardown();
    result
}

/// The first `name` on `PATH`.
fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

async fn run(
    sb: &mut Sandbox,
    cluster: Cluster,
    shutdown: CancellationToken,
    mut upgrade: tokio::signal::unix::Signal,
) -> anyhow::Result<()> {
    net::create_fabric(&sb.fabric, sb.opts.ip_family)?;
    sb.fabric_made = true;
    // Objects first (namespaces, services, pods Pending), so the controller's first
    // model has them; then the nodes, their agents, and the pods' sandboxes.
    sb.cluster = cluster.clone();
    sb.writer().namespaces(&cluster.namespaces)?;
    sb.start_controller()?;
    sb.wait_controller(Duration::from_secs(30))?;
    for index in 0..sb.replicas.len() {
        sb.start_replica(index, Duration::from_secs(30))?;
    }
    let added = sb.reconcile(cluster)?;
    sb.wait_nodes(Duration::from_secs(60))?;
    sb.wait_listening(&added, Duration::from_secs(60));
    sb.ready = true;
    if let Some(listen) = sb.opts.prometheus {
        let opts = crate::prometheus::Options {
            listen,
            ..crate::prometheus::Options::for_sandbox(&sb.opts.state_dir)
        };
        let p = crate::prometheus::Prometheus::start(&opts, &sb.state())?;
        println!(
            "Prometheus scrapes the sandbox every second: {} (dashboards: deploy/dashboards/)",
            p.url()
        );
        sb.prometheus = Some(p);
    }
    sb.save()?;
    sb.print_banner();

    let start = Instant::now();
    let mut last_summary = Instant::now();
    let mut seen = fingerprint(&sb.opts.dir);
    // The directory as the last poll saw it, while it differs from `seen`.
    let mut unsettled = None;
    loop {
        let mut replace = false;
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = upgrade.recv() => replace = true,
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
        if sb.opts.duration.is_some_and(|d| start.elapsed() >= d) {
            break;
        }
        let mut changed = false;
        if replace {
            // One node at a time; a failure leaves that node's node-proxy serving.
            sb.upgrade_errors.clear();
            let names: Vec<String> = sb.nodes.keys().cloned().collect();
            for name in names {
                if let Err(e) = sb.replace_node_proxy(&name) {
                    eprintln!("upgrade of node-proxy of {name} failed: {e:#}");
                    sb.upgrade_errors.push(format!("{name}: {e:#}"));
                }
                sb.supervise()?;
                sb.save()?;
            }
            sb.upgrades += 1;
            changed = true;
        }
        changed |= sb.supervise()?;
        changed |= sb.kubelet();
        let now = fingerprint(&sb.opts.dir);
        // A file is read once it has stayed the same for a poll, and its reading counts
        // only if nothing changed meanwhile: a file written in place (truncated, then
        // written) must not be read half-written, as an empty file would stop its pods.
        let settled = now != seen && unsettled.as_ref() == Some(&now);
        unsettled = (now != seen).then(|| now.clone());
        let loaded = settled.then(|| manifest::load_dir_with(&sb.opts.dir, &sb.api));
        // Changed while it was read: read again once it has settled.
        if let Some(loaded) = loaded.filter(|_| fingerprint(&sb.opts.dir) == now) {
            seen = now;
            unsettled = None;
            match loaded {
                Ok(cluster) => {
                    sb.reload_error = None;
                    if let Err(e) = sb.reconcile(cluster) {
                        eprintln!("applying the edited manifests: {e:#}");
                        sb.reload_error = Some(format!("{e:#}"));
                    }
                    sb.reloads += 1;
                }
                Err(e) => {
                    // The controller keeps its last good view of a broken file too.
                    eprintln!("{e}; keeping what runs");
                    sb.reload_error = Some(e.to_string());
                    sb.reloads += 1;
                }
            }
            changed = true;
        }
        if changed {
            sb.save()?;
        }
        if let Some(every) = sb.opts.summary_every {
            if last_summary.elapsed() >= every {
                last_summary = Instant::now();
                let texts: Vec<String> = sb
                    .nodes
                    .values()
                    .filter_map(|n| summary::fetch(n.state.admin, "/metrics").ok())
                    .collect();
                let controller = summary::fetch(sb.controller_state.admin, "/metrics").ok();
                let waypoints: Vec<String> = sb
                    .pods
                    .values()
                    .filter_map(|p| p.state.admin)
                    .filter_map(|a| summary::fetch(a, "/metrics").ok())
                    .collect();
                println!(
                    "[{:>4}s] traffic through the mesh (connections since start; bytes when closed)\n{}{}{}",
                    start.elapsed().as_secs(),
                    summary::render(&summary::flows(&texts)),
                    summary::requests(&waypoints),
                    summary::control_plane(controller.as_deref(), &texts),
                );
            }
        }
    }
    Ok(())
}

/// Removes a sandbox: asks its `up` process to stop, then makes sure every process,
/// namespace and cgroup of it is gone.
pub fn down(name: &str, state_dir: &Path) -> anyhow::Result<()> {
    require_root("weftctl local down")?;
    let path = state_dir.join("state.json");
    if let Ok(text) = std::fs::read_to_string(&path) {
        let state: State = serde_json::from_str(&text)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let signal = |pid: u32, sig| {
            pid != 0 && nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig).is_ok()
        };
        if signal(state.supervisor_pid, nix::sys::signal::Signal::SIGTERM) {
            let start = Instant::now();
            while path.exists() && start.elapsed() < Duration::from_secs(30) {
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        // Still there: the supervisor is gone or stuck, so stop its processes here. (Once
        // it has cleaned up, its PIDs may belong to someone else: never signal those.)
        if path.exists() {
            for pid in state
                .pods
                .iter()
                .map(|p| p.pid)
                .chain(state.nodes.iter().map(|n| n.pid))
                .chain(state.nodes.iter().map(|n| n.agent.pid))
                .chain(state.nodes.iter().flat_map(|n| n.draining.clone()))
                .chain([state.controller.pid])
                .chain(state.prometheus.iter().map(|p| p.pid))
            {
                signal(pid, nix::sys::signal::Signal::SIGKILL);
            }
        }
    }
    for ns in net::list_netns(&format!("{name}-"))
        .into_iter()
        .chain(net::list_netns(&format!("{name}.")))
    {
        net::kill_netns_pids(&ns);
        net::delete_netns(&ns);
        let _ = std::fs::remove_dir_all(kubelet::etc_dir(&ns));
    }
    if let Ok(cgroups) = Cgroups::create(name) {
        cgroups.remove_all();
    }
    let _ = std::fs::remove_file(&path);
    Ok(())
}

/// Stops (`false`) or starts (`true`) the node agent of `node` in a running sandbox and
/// waits until it is done, as deleting its pod would (the marker keeps the sandbox's
/// kubelet from restarting it).
pub fn agent(state_dir: &Path, node: &str, run: bool) -> anyhow::Result<()> {
    require_root("weftctl local agent")?;
    let state = read_state(state_dir)?;
    let n = state
        .nodes
        .iter()
        .find(|n| n.name == node)
        .with_context(|| format!("no node {node:?} in sandbox {:?}", state.name))?;
    let marker = n.agent.log.with_file_name(format!("agent-{node}.stopped"));
    toggle(
        state_dir,
        &marker,
        run,
        &format!("the node agent of {node}"),
        |now| {
            now.nodes
                .iter()
                .find(|n| n.name == node)
                .is_some_and(|n| match run {
                    true => !n.agent.stopped && n.agent.pid != 0,
                    false => n.agent.stopped,
                })
        },
    )?;
    println!(
        "node agent of {node} {}",
        if run { "running" } else { "stopped" }
    );
    Ok(())
}

/// Writes (`run` false) or removes (`run` true) a marker that keeps the sandbox from
/// running a component (`what`), and waits up to 30 s until `done` holds of its state.
fn toggle(
    state_dir: &Path,
    marker: &Path,
    run: bool,
    what: &str,
    done: impl Fn(&State) -> bool,
) -> anyhow::Result<State> {
    if run {
        let _ = std::fs::remove_file(marker);
    } else {
        std::fs::write(marker, format!("{what} stopped by weftctl local\n"))?;
    }
    let start = Instant::now();
    loop {
        let now = read_state(state_dir)?;
        if done(&now) {
            return Ok(now);
        }
        if start.elapsed() > Duration::from_secs(30) {
            bail!(
                "the sandbox did not {} {what} within 30 s",
                if run { "start" } else { "stop" }
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The capture rules installed in a pod's namespace, for debugging, as `nft` and `ip`
/// print them.
pub fn rules(state_dir: &Path, pod: &str) -> anyhow::Result<String> {
    let state = read_state(state_dir)?;
    let p = state
        .pods
        .iter()
        .find(|p| format!("{}/{}", p.namespace, p.name) == pod || p.name == pod)
        .with_context(|| {
            format!(
                "no pod {pod:?} in sandbox {:?}; pods are named namespace/name",
                state.name
            )
        })?;
    let run = |args: &[&str]| -> anyhow::Result<String> {
        let out = Command::new("ip")
            .args(["netns", "exec", &p.netns])
            .args(args)
            .output()
            .with_context(|| format!("cannot run {args:?} in {}", p.netns))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let nft = run(&["nft", "list", "table", "inet", "weft"])?;
    let nft = if nft.is_empty() {
        "# no nftables table inet weft\n".to_owned()
    } else {
        nft
    };
    Ok(format!(
        "{nft}\n# ip rule\n{}\n# ip route table 100\n{}\n# ip -6 rule\n{}\n# ip -6 route table 100\n{}",
        run(&["ip", "rule", "show"])?,
        run(&["ip", "route", "show", "table", "100"])?,
        run(&["ip", "-6", "rule", "show"])?,
        run(&["ip", "-6", "route", "show", "table", "100"])?
    ))
}

fn read_state(state_dir: &Path) -> anyhow::Result<State> {
    let path = state_dir.join("state.json");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("no running sandbox: cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("cannot read {}", path.display()))
}

/// Asks a running sandbox to replace its node-proxies (SIGUSR1 to its `up` process) and
/// waits until every node runs a new one and the old ones have exited.
pub fn upgrade(state_dir: &Path) -> anyhow::Result<()> {
    require_root("weftctl local upgrade")?;
    let before = read_state(state_dir)?;
    let supervisor = nix::unistd::Pid::from_raw(before.supervisor_pid as i32);
    nix::sys::signal::kill(supervisor, nix::sys::signal::Signal::SIGUSR1).with_context(|| {
        format!(
            "cannot signal the sandbox's `up` process (pid {})",
            before.supervisor_pid
        )
    })?;
    let start = Instant::now();
    let mut reported: Option<State> = None;
    loop {
        std::thread::sleep(Duration::from_millis(100));
        let now = read_state(state_dir)?;
        if !alive(now.supervisor_pid) {
            bail!("the sandbox stopped during the upgrade");
        }
        // Each node: up to 20 s to take over and 20 s to replay, then its drain (bounded
        // by RETIRE_AFTER).
        let limit = Duration::from_secs(30)
            + (Duration::from_secs(40) + RETIRE_AFTER) * before.nodes.len() as u32;
        if start.elapsed() > limit {
            bail!(
                "node-proxies not replaced within {} s; see the node logs under {}",
                limit.as_secs(),
                state_dir.display()
            );
        }
        if now.upgrades <= before.upgrades {
            continue;
        }
        if !now.upgrade_errors.is_empty() {
            bail!(
                "upgrade failed on these nodes (see `up`'s output and the node logs):\n  {}",
                now.upgrade_errors.join("\n  ")
            );
        }
        let report = reported.get_or_insert(now);
        // Done once every old node-proxy has drained and exited.
        if before.nodes.iter().all(|old| !alive(old.pid)) {
            for (old, new) in before.nodes.iter().zip(&report.nodes) {
                println!("{}: node-proxy {} -> {}", new.name, old.pid, new.pid);
            }
            return Ok(());
        }
    }
}

/// Whether a process runs (a reaped one is gone; an unreaped one is a zombie, done).
fn alive(pid: u32) -> bool {
    pid != 0
        && std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
            !s.rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        })
}

/// Stops (`false`) or starts (`true`) a running sandbox's controller and waits until it
/// is done: the mesh keeps running on what the proxies hold.
pub fn controller(state_dir: &Path, run: bool) -> anyhow::Result<()> {
    require_root("weftctl local controller")?;
    read_state(state_dir)?;
    let marker = state_dir.join("controller.stopped");
    let now = toggle(state_dir, &marker, run, "its controller", |now| match run {
        true => {
            !now.controller.stopped
                && now.controller.pid != 0
                && summary::fetch(now.controller.admin, "/ready")
                    .is_ok_and(|b| b.starts_with("ready"))
        }
        false => now.controller.stopped,
    })?;
    match run {
        true => println!("controller running (pid {}), ready", now.controller.pid),
        false => println!("controller stopped; the node-proxies serve on from what they hold"),
    }
    Ok(())
}

/// The last `n` lines of a log.
fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// (name, modified, length) of every file of a directory: when it changes, the
/// manifests are read again.
fn fingerprint(dir: &Path) -> Vec<(PathBuf, Option<SystemTime>, u64)> {
    let mut out: Vec<_> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| {
                    let m = e.metadata().ok()?;
                    Some((e.path(), m.modified().ok(), m.len()))
                })
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

/// The node-proxy binary, beside weftctl.
pub const NODE_PROXY_BIN: &str = "node-proxy";
/// The waypoint binary, beside weftctl.
pub const WAYPOINT_BIN: &str = "waypoint";

/// A role's own binary next to `weftctl`, built with it (`cargo build --workspace --bins`
/// makes all of them). Each is what the role runs in a cluster too, a fraction of
/// weftctl's size, so a process's resident memory is its own and not the other roles'
/// code.
pub fn role_exe(weftctl: &Path, binary: &str) -> PathBuf {
    weftctl.with_file_name(binary)
}
