//! The local sandbox: a Kubernetes-like cluster of network namespaces on one machine.
//!
//! ```text
//!  user manifests ---------------------------------------> controller (manifest mode)
//!     |  (watched)                                            ^   reads both directories,
//!     v                                                       |   translates, streams the
//!  sandbox: scheduler + kubelet + CNI agent + cluster DNS     |   model, signs certificates
//!     -> fabric netns (bridge br0, 10.244.0.1/16), a netns per pod, cluster IPs
//!     -> <state>/cluster/*.yaml: the Pods it runs (UID, node, IP, Ready), Services
//!        with the cluster IPs it gave out  ------------------/
//!     -> enrolled pods: capture rules, handed to their node's node-proxy
//!     -> /etc/netns/<pod>/hosts: service names; each pod's command as a process
//!  node-proxy per node: model and certificates from the controller, no CA key
//! ```
//!
//! The sandbox translates nothing into the mesh model: that is the controller's, the
//! same code as in a cluster. Editing the manifests while it runs takes effect live:
//! pods come and go, namespaces are enrolled, policies apply. Everything lives in
//! namespaces the sandbox creates; the host's own namespace gets nothing but
//! loopback ports for the controller and the node-proxies' admin endpoints.

pub mod kubelet;
pub mod manifest;
pub mod net;
pub mod summary;

use std::collections::BTreeMap;
use std::fs::File;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context};
use api::ObjectName;
use runtime::handoff::{HandoffClient, PodInfo};
use runtime::netns::Netns;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use self::kubelet::{Addresses, RunningPod, Writer};
use self::manifest::Cluster;

/// Namespace label that enrolls a namespace (or, with `disabled`, opts a pod out).
pub const MESH_LABEL: &str = "weft.dev/mesh";

/// The controller's gRPC port is `admin_base_port + CONTROLLER_OFFSET` (15012 by
/// default, as in a cluster), its admin port two above; node-proxies take the ports
/// below.
pub const CONTROLLER_OFFSET: u16 = 12;
/// Waypoint pods' admin ports are `admin_base_port + WAYPOINT_ADMIN_OFFSET` and up.
pub const WAYPOINT_ADMIN_OFFSET: u16 = 15;
/// The most waypoints one sandbox runs.
pub const MAX_WAYPOINTS: u16 = 5;

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
    /// PID of the `weftctl local up` process.
    pub supervisor_pid: u32,
    /// The controller.
    pub controller: ControllerState,
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

/// A simulated node.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeState {
    /// Node name.
    pub name: String,
    /// Its node-proxy's admin address.
    pub admin: SocketAddr,
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
    /// Its IP.
    pub ip: IpAddr,
    /// In the mesh.
    pub enrolled: bool,
    /// PID of its process.
    pub pid: u32,
    /// Its stdout and stderr.
    pub log: PathBuf,
    /// A waypoint pod's admin endpoint (metrics, readiness, config dump).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin: Option<SocketAddr>,
}

/// A service.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceState {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// Its virtual IP; none for a headless service.
    pub vip: Option<IpAddr>,
}

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

/// A node and its node-proxy.
struct Node {
    state: NodeState,
    child: Option<Child>,
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
    controller: Option<Child>,
    controller_state: ControllerState,
    nodes: BTreeMap<String, Node>,
    /// Replaced node-proxies still draining: (node, process, since).
    retiring: Vec<(String, Child, Instant)>,
    pods: BTreeMap<ObjectName, RunningPod>,
    services: Vec<ServiceState>,
    addresses: Addresses,
    /// Incarnations per pod name, so a recreated pod gets a new UID.
    generations: BTreeMap<ObjectName, u64>,
    cluster: Cluster,
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
            supervisor_pid: std::process::id(),
            controller: self.controller_state.clone(),
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

    fn stopped_marker(&self) -> PathBuf {
        self.opts.state_dir.join("controller.stopped")
    }

    fn start_controller(&mut self) -> anyhow::Result<()> {
        let (out, err) = log_file(&self.controller_state.log)?;
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
            .args(["--listen", &self.controller_state.grpc.to_string()])
            .args(["--admin", &self.controller_state.admin.to_string()])
            .args(["--server-name", CONTROLLER_NAME]);
        if let Some(ttl) = &self.opts.leaf_ttl {
            cmd.args(["--leaf-ttl", ttl]);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .context("cannot start the controller")?;
        self.controller_state.pid = child.id();
        self.controller_state.starts += 1;
        self.controller = Some(child);
        Ok(())
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
            controller: self.controller_state.grpc,
            controller_name: CONTROLLER_NAME.to_owned(),
            controller_ca: self.ca_dir.join(controller::ca::ROOT_CERT),
            tokens: self.tokens_dir.clone(),
            otlp_endpoint: self.opts.otlp_endpoint.clone(),
            waypoint_admin_ports: (self.opts.admin_base_port + WAYPOINT_ADMIN_OFFSET
                ..self.opts.admin_base_port + WAYPOINT_ADMIN_OFFSET + MAX_WAYPOINTS)
                .map(|p| SocketAddr::from(([127, 0, 0, 1], p)))
                .filter(|a| !self.pods.values().any(|p| p.state.admin == Some(*a)))
                .collect(),
        }
    }

    /// Waits (up to `limit` in all) until the `pods` listen on their declared ports, as
    /// a kubelet's readiness probe would, so a client started after `ready` finds them
    /// serving. A pod still closed at the deadline is named in a warning, not an error:
    /// its log says why.
    fn wait_listening(&self, pods: &[ObjectName], limit: Duration) {
        let start = Instant::now();
        let mut waiting: Vec<&ObjectName> = pods.iter().collect();
        loop {
            waiting.retain(|name| {
                self.pods
                    .get(*name)
                    .is_some_and(|p| !kubelet::closed_ports(p).is_empty())
            });
            if waiting.is_empty() {
                return;
            }
            if start.elapsed() > limit {
                for name in waiting {
                    if let Some(p) = self.pods.get(name) {
                        tracing::warn!(
                            pod = %p.name(),
                            ports = ?kubelet::closed_ports(p),
                            "pod does not listen on its ports after {} s; see {}",
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

    fn node_state(&self, name: &str) -> anyhow::Result<NodeState> {
        let i = self.nodes.len() as u16;
        if i >= CONTROLLER_OFFSET {
            bail!("the sandbox runs at most {CONTROLLER_OFFSET} nodes; {name} would be one more");
        }
        let dir = self.opts.state_dir.join(name);
        std::fs::create_dir_all(&dir)?;
        let token = self
            .tokens_dir
            .join(format!("{name}{}", controller::auth::TOKEN_SUFFIX));
        controller::auth::NodeTokens::create(&self.tokens_dir, name)?;
        // The node-proxy's copy: the controller's directory holds every node's token.
        let own = dir.join("token");
        std::fs::copy(&token, &own)?;
        Ok(NodeState {
            name: name.to_owned(),
            admin: SocketAddr::from(([127, 0, 0, 1], self.opts.admin_base_port + i)),
            handoff: dir.join("handoff.sock"),
            pid: 0,
            draining: Vec::new(),
            log: self.logs_dir.join(format!("node-proxy_{name}.log")),
            token: own,
        })
    }

    fn spawn_node_proxy(&self, node: &NodeState) -> anyhow::Result<Child> {
        let (out, err) = log_file(&node.log)?;
        Command::new(role_exe(&self.opts.exe, NODE_PROXY_BIN))
            .args(["--node", &node.name])
            .arg("--handoff")
            .arg(&node.handoff)
            .args(["--controller", &self.controller_state.grpc.to_string()])
            .args(["--controller-name", CONTROLLER_NAME])
            .arg("--controller-ca")
            .arg(self.ca_dir.join(controller::ca::ROOT_CERT))
            .arg("--token-file")
            .arg(&node.token)
            .args(["--admin", &node.admin.to_string(), "--drain-grace", "2"])
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("cannot start node-proxy for {}", node.name))
    }

    /// Starts a node-proxy for every node that has none.
    fn ensure_nodes(&mut self) -> anyhow::Result<()> {
        let mut wanted: Vec<String> = self.pods.values().map(|p| p.state.node.clone()).collect();
        wanted.sort();
        wanted.dedup();
        for name in wanted {
            if self.nodes.contains_key(&name) {
                continue;
            }
            let mut state = self.node_state(&name)?;
            let child = self.spawn_node_proxy(&state)?;
            state.pid = child.id();
            self.nodes.insert(
                name,
                Node {
                    state,
                    child: Some(child),
                },
            );
        }
        Ok(())
    }

    /// Hands a node's enrolled pods to its node-proxy (process `pid`) as one snapshot,
    /// waiting up to `timeout` for it to listen. Until it does, the socket's path may
    /// still lead to a node-proxy it replaces.
    fn hand_over(&self, node: &str, pid: u32, timeout: Duration) -> anyhow::Result<()> {
        let handoff = &self.nodes[node].state.handoff;
        let start = Instant::now();
        let mut client = loop {
            match HandoffClient::connect(handoff) {
                Ok(c) if c.peer_pid() == Some(pid) => break c,
                Ok(_) if start.elapsed() < timeout => std::thread::sleep(Duration::from_millis(20)),
                Ok(_) => {
                    bail!("node-proxy of {node} (pid {pid}) did not take over its handoff socket")
                }
                Err(e) if start.elapsed() < timeout => {
                    tracing::debug!("waiting for node-proxy {node}: {e}");
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => return Err(e).context(format!("node-proxy of {node} did not come up")),
            }
        };
        let mine: Vec<(PodInfo, std::os::fd::BorrowedFd<'_>)> = self
            .pods
            .values()
            .filter(|p| p.state.node == node && p.state.enrolled)
            .map(|p| (p.info(), p.netns_file.as_fd()))
            .collect();
        let mine: Vec<_> = mine
            .iter()
            .map(|(pod, netns)| runtime::handoff::SnapshotPod {
                pod,
                netns: *netns,
                listeners: None,
            })
            .collect();
        client
            .snapshot(&mine)
            .with_context(|| format!("handing pods to node-proxy of {node}"))
    }

    fn uid(&mut self, name: &ObjectName) -> String {
        let generation = self.generations.entry(name.clone()).or_default();
        let uid = match *generation {
            0 => format!("{}-{}-{}", self.opts.name, name.namespace, name.name),
            g => format!("{}-{}-{}-{g}", self.opts.name, name.namespace, name.name),
        };
        *generation += 1;
        uid
    }

    /// Makes the running pods and services what `cluster` asks for. Before the
    /// node-proxies run (`live` false) pods are only created; afterwards new pods are
    /// handed over and started, and pods whose enrollment changed are captured or
    /// released.
    fn reconcile(&mut self, cluster: Cluster, live: bool) -> anyhow::Result<()> {
        let writer = Writer {
            dir: self.cluster_dir.clone(),
        };
        let services = kubelet::services(&cluster, &mut self.addresses, &writer)?;
        let services_changed = services
            .iter()
            .map(|s| (&s.namespace, &s.name, s.vip))
            .ne(self.services.iter().map(|s| (&s.namespace, &s.name, s.vip)));
        self.services = services;
        let desired: BTreeMap<ObjectName, manifest::PodSpec> = kubelet::desired(&cluster)
            .into_iter()
            .map(|(k, v)| (k, v.clone()))
            .collect();

        // Gone or changed: removed (a changed pod comes back as a new one, as a
        // Deployment's rollout would make it).
        let stale: Vec<ObjectName> = self
            .pods
            .iter()
            .filter(|(name, pod)| desired.get(*name) != Some(&pod.spec))
            .map(|(name, _)| name.clone())
            .collect();
        for name in stale {
            if let Some(mut pod) = self.pods.remove(&name) {
                if pod.state.enrolled {
                    if let Some(node) = self.nodes.get(&pod.state.node) {
                        if let Err(e) = kubelet::hand(&node.state.handoff, &pod, false) {
                            eprintln!("{e:#}");
                        }
                    }
                }
                writer.remove_pod(&pod.state);
                kubelet::destroy(&mut pod, &mut self.addresses);
                println!("pod {} removed", pod.name());
            }
        }

        // Kept: enrollment may have changed with a label.
        let mut flipped = Vec::new();
        for (name, pod) in self.pods.iter_mut() {
            let now = kubelet::enrolled(&cluster.namespaces, &pod.spec);
            if now != pod.state.enrolled {
                pod.state.enrolled = now;
                flipped.push(name.clone());
            }
        }
        for name in flipped {
            let pod = &self.pods[&name];
            let node = self
                .nodes
                .get(&pod.state.node)
                .map(|n| n.state.handoff.clone());
            // Served before captured, released after: no connection meets a closed port.
            let result = (|| -> anyhow::Result<()> {
                match (pod.state.enrolled, node) {
                    (true, Some(handoff)) => {
                        kubelet::hand(&handoff, pod, true)?;
                        kubelet::capture(pod, true)
                    }
                    (false, Some(handoff)) => {
                        kubelet::capture(pod, false)?;
                        kubelet::hand(&handoff, pod, false)
                    }
                    (on, None) => kubelet::capture(pod, on),
                }
            })();
            match result {
                Ok(()) if pod.state.enrolled => println!("pod {} is in the mesh now", pod.name()),
                Ok(()) => println!("pod {} left the mesh", pod.name()),
                Err(e) => eprintln!("pod {}: {e:#}", pod.name()),
            }
        }

        // New, in manifest order: a fresh sandbox numbers its pods as they are written.
        let mut added = Vec::new();
        for spec in &cluster.pods {
            let name = &ObjectName::new(&spec.namespace, &spec.name);
            if self.pods.contains_key(name) {
                continue;
            }
            let uid = self.uid(name);
            let enrolled = kubelet::enrolled(&cluster.namespaces, spec);
            let site = kubelet::Site {
                sandbox: &self.opts.name,
                fabric: &self.fabric,
                logs: &self.logs_dir,
            };
            let pod = kubelet::create_pod(
                &site,
                spec,
                &mut self.addresses,
                uid,
                enrolled,
                &self.services,
            )?;
            writer.pod(spec, &pod.state)?;
            if enrolled && !live {
                kubelet::capture(&pod, true)?;
            }
            self.pods.insert(name.clone(), pod);
            added.push(name.clone());
        }
        if live {
            self.ensure_nodes()?;
            for name in &added {
                let handoff = self.nodes[&self.pods[name].state.node]
                    .state
                    .handoff
                    .clone();
                let pod = self.pods.get_mut(name).context("a pod just added")?;
                if pod.state.enrolled {
                    kubelet::hand(&handoff, pod, true)?;
                    kubelet::capture(pod, true)?;
                }
                let launch = self.launch();
                let pod = self.pods.get_mut(name).context("a pod just added")?;
                kubelet::start_process(pod, &launch)?;
                println!(
                    "pod {} started ({}, node {})",
                    pod.name(),
                    pod.state.ip,
                    pod.state.node
                );
            }
            self.wait_listening(&added, Duration::from_secs(10));
        }
        if services_changed || !added.is_empty() {
            for pod in self.pods.values() {
                if let Err(e) = kubelet::write_dns(&pod.state, &self.services) {
                    eprintln!("pod {}: {e:#}", pod.name());
                }
            }
        }
        self.cluster = cluster;
        Ok(())
    }

    /// Replaces a node's node-proxy without refusing a connection, as a DaemonSet's
    /// surge rollout would. The new process takes over from the old one through the
    /// handoff socket (its admin listener, and each pod's namespace and listeners, passed
    /// as file descriptors), so the ports never close; once it serves them and owns the
    /// socket's path it tells the old one, which then drains. `up` replays the pods to it
    /// (already served: nothing changes). If the new process fails before that, the old
    /// one serves on.
    fn replace_node_proxy(&mut self, name: &str) -> anyhow::Result<()> {
        let node = self.nodes[name].state.clone();
        let mut child = self.spawn_node_proxy(&node)?;
        let new_pid = child.id();
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                bail!(
                    "the new node-proxy exited ({status}) before taking over; the old one serves on (see {})",
                    node.log.display()
                );
            }
            let owner = HandoffClient::connect(&node.handoff)
                .ok()
                .and_then(|c| c.peer_pid());
            if owner == Some(new_pid) {
                break;
            }
            if start.elapsed() > Duration::from_secs(20) {
                let _ = child.kill();
                let _ = child.wait();
                bail!("the new node-proxy did not take over within 20 s; the old one serves on");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // From here the new process serves the node: keep it whatever the replay says.
        let replayed = self.hand_over(name, new_pid, Duration::from_secs(20));
        let entry = self.nodes.get_mut(name).context("the node just replaced")?;
        if let Some(old) = entry.child.replace(child) {
            eprintln!(
                "node-proxy of {name} replaced: pid {new_pid} serves, pid {} drains",
                old.id()
            );
            self.retiring.push((name.to_owned(), old, Instant::now()));
        }
        entry.state.pid = new_pid;
        replayed
    }

    fn teardown(&mut self) {
        if let Some(mut p) = self.prometheus.take() {
            p.stop();
        }
        for p in self.pods.values_mut() {
            if let Some(c) = p.child.as_mut() {
                stop_child(c, Duration::from_secs(2));
            }
        }
        for n in self.nodes.values_mut() {
            if let Some(c) = n.child.as_mut() {
                stop_child(c, Duration::from_secs(8));
            }
        }
        for (_, c, _) in self.retiring.iter_mut() {
            stop_child(c, Duration::from_secs(8));
        }
        if let Some(c) = self.controller.as_mut() {
            stop_child(c, Duration::from_secs(5));
        }
        for p in self.pods.values() {
            // Whatever a pod's command left behind (daemons, background jobs).
            net::kill_netns_pids(&p.state.netns);
            net::delete_netns(&p.state.netns);
            let _ = std::fs::remove_dir_all(kubelet::etc_dir(&p.state.netns));
        }
        if self.fabric_made {
            net::delete_netns(&self.fabric);
        }
        let _ = std::fs::remove_file(self.opts.state_dir.join("state.json"));
    }

    /// Restarts what died: a node-proxy (pods replayed), the controller (unless stopped
    /// on purpose). Stops the controller when asked to. True when anything changed.
    fn supervise(&mut self) -> anyhow::Result<bool> {
        let mut changed = false;
        let mut restart = Vec::new();
        for (name, node) in self.nodes.iter_mut() {
            if let Some(Ok(Some(status))) = node.child.as_mut().map(Child::try_wait) {
                eprintln!("node-proxy of {name} exited ({status}); restarting it");
                restart.push(name.clone());
            }
        }
        for name in restart {
            let state = self.nodes[&name].state.clone();
            let child = self.spawn_node_proxy(&state)?;
            let pid = child.id();
            let node = self
                .nodes
                .get_mut(&name)
                .context("a node being restarted")?;
            node.state.pid = pid;
            node.child = Some(child);
            self.hand_over(&name, pid, Duration::from_secs(20))?;
            changed = true;
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
        }
        Ok(changed)
    }

    fn print_banner(&self) {
        println!(
            "sandbox {:?} is up: {} nodes, {} pods ({} in the mesh), {} services; controller at {} (admin {}); state in {}",
            self.opts.name,
            self.nodes.len(),
            self.pods.len(),
            self.pods.values().filter(|p| p.state.enrolled).count(),
            self.services.len(),
            self.controller_state.grpc,
            self.controller_state.admin,
            self.opts.state_dir.display()
        );
        for p in self.pods.values() {
            println!(
                "  pod {:<28} {:<15} node {:<8} {}",
                p.name(),
                p.state.ip,
                p.state.node,
                if p.state.enrolled { "mesh" } else { "no mesh" }
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

/// Runs the sandbox until Ctrl-C, SIGTERM or `opts.duration`, then removes it.
pub async fn up(opts: UpOptions, shutdown: CancellationToken) -> anyhow::Result<()> {
    require_root("weftctl local up")?;
    // `weftctl local upgrade` asks for node-proxies to be replaced with SIGUSR1; watched
    // from the start, so one sent early is kept, not fatal.
    let upgrade = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1())
        .context("cannot watch for SIGUSR1")?;
    // Bad input stops here, before anything is created.
    let cluster = manifest::load_dir(&opts.dir)?;
    for binary in [NODE_PROXY_BIN, WAYPOINT_BIN] {
        let exe = role_exe(&opts.exe, binary);
        if !exe.is_file() {
            bail!(
                "{} is missing: the sandbox runs the {binary} binary next to weftctl; `cargo build --workspace --bins` builds them all",
                exe.display()
            );
        }
    }
    let state_dir = opts.state_dir.clone();
    if state_dir.join("state.json").exists() {
        bail!(
            "a sandbox named {:?} is already running or was not cleaned up ({}); run `weftctl local down --name {}` first",
            opts.name,
            state_dir.join("state.json").display(),
            opts.name
        );
    }
    let dirs = [
        state_dir.join("logs"),
        state_dir.join("cluster"),
        state_dir.join("tokens"),
    ];
    for d in &dirs {
        let _ = std::fs::remove_dir_all(d);
        std::fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
    }
    let _ = std::fs::remove_file(state_dir.join("controller.stopped"));
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
    let mut sb = Sandbox {
        fabric: format!("{}-fabric", opts.name),
        cluster_dir: state_dir.join("cluster"),
        ca_dir: state_dir.join("ca"),
        tokens_dir: state_dir.join("tokens"),
        logs_dir: state_dir.join("logs"),
        path_env,
        controller: None,
        controller_state,
        nodes: BTreeMap::new(),
        retiring: Vec::new(),
        pods: BTreeMap::new(),
        services: Vec::new(),
        addresses: Addresses::default(),
        generations: BTreeMap::new(),
        cluster: Cluster::default(),
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

async fn run(
    sb: &mut Sandbox,
    cluster: Cluster,
    shutdown: CancellationToken,
    mut upgrade: tokio::signal::unix::Signal,
) -> anyhow::Result<()> {
    net::create_fabric(&sb.fabric)?;
    sb.fabric_made = true;
    // Pods and services first, so the controller's first model has them.
    sb.reconcile(cluster, false)?;
    sb.start_controller()?;
    sb.wait_controller(Duration::from_secs(30))?;
    sb.ensure_nodes()?;
    let nodes: Vec<(String, u32)> = sb
        .nodes
        .values()
        .map(|n| (n.state.name.clone(), n.state.pid))
        .collect();
    for (name, pid) in nodes {
        sb.hand_over(&name, pid, Duration::from_secs(30))?;
    }
    let launch = sb.launch();
    for pod in sb.pods.values_mut() {
        kubelet::start_process(pod, &launch)?;
    }
    let all: Vec<ObjectName> = sb.pods.keys().cloned().collect();
    sb.wait_listening(&all, Duration::from_secs(10));
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
            // One node at a time; a failure leaves that node's node-proxy serving (or,
            // if it had already handed over, restarted once it has drained).
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
        let now = fingerprint(&sb.opts.dir);
        // A file is read once it has stayed the same for a poll, and its reading counts
        // only if nothing changed meanwhile: a file written in place (truncated, then
        // written) must not be read half-written, as an empty file would stop its pods.
        let settled = now != seen && unsettled.as_ref() == Some(&now);
        unsettled = (now != seen).then(|| now.clone());
        let loaded = settled.then(|| manifest::load_dir(&sb.opts.dir));
        // Changed while it was read: read again once it has settled.
        if let Some(loaded) = loaded.filter(|_| fingerprint(&sb.opts.dir) == now) {
            seen = now;
            unsettled = None;
            match loaded {
                Ok(cluster) => {
                    sb.reload_error = None;
                    if let Err(e) = sb.reconcile(cluster, true) {
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

fn read_state(state_dir: &Path) -> anyhow::Result<State> {
    let path = state_dir.join("state.json");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("no running sandbox: cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("cannot read {}", path.display()))
}

/// Removes a sandbox: asks its `up` process to stop, then makes sure every process and
/// namespace of it is gone.
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
            while path.exists() && start.elapsed() < Duration::from_secs(20) {
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
                .chain(state.nodes.iter().flat_map(|n| n.draining.clone()))
                .chain([state.controller.pid])
                .chain(state.prometheus.iter().map(|p| p.pid))
            {
                signal(pid, nix::sys::signal::Signal::SIGKILL);
            }
        }
    }
    for ns in net::list_netns(&format!("{name}-")) {
        net::kill_netns_pids(&ns);
        net::delete_netns(&ns);
        let _ = std::fs::remove_dir_all(kubelet::etc_dir(&ns));
    }
    let _ = std::fs::remove_file(&path);
    Ok(())
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
    if run {
        let _ = std::fs::remove_file(&marker);
    } else {
        std::fs::write(&marker, b"stopped by weftctl local controller stop\n")?;
    }
    let start = Instant::now();
    loop {
        let now = read_state(state_dir)?;
        let done = match run {
            true => {
                !now.controller.stopped
                    && now.controller.pid != 0
                    && summary::fetch(now.controller.admin, "/ready")
                        .is_ok_and(|b| b.starts_with("ready"))
            }
            false => now.controller.stopped,
        };
        if done {
            match run {
                true => println!("controller running (pid {}), ready", now.controller.pid),
                false => {
                    println!("controller stopped; the node-proxies serve on from what they hold")
                }
            }
            return Ok(());
        }
        if start.elapsed() > Duration::from_secs(30) {
            bail!(
                "the sandbox did not {} its controller within 30 s",
                if run { "start" } else { "stop" }
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The capture rules installed in a pod's namespace, for debugging.
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
    let file = File::open(Path::new("/run/netns").join(&p.netns))?;
    let ns = Netns::enter(file.into(), pod)?;
    Ok(node_proxy::redirect::list(&ns, pod)?)
}
