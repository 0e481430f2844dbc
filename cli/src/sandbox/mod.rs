//! The local sandbox: a Kubernetes-like cluster of network namespaces on one machine.
//!
//! ```text
//!  manifests (Namespace, Pod, Deployment, Service)
//!     -> fabric netns (bridge br0, 10.244.0.1/16) + one netns per pod (eth0, 10.244.x.y)
//!     -> model.json (workloads, services with VIPs from 10.96.0.0/16) + a sandbox CA
//!     -> one node-proxy process per node (restarted if it dies, pods replayed)
//!     -> enrolled pods: redirect rules installed, handed to their node's proxy
//!     -> each pod's command started inside its netns
//! ```
//!
//! Everything lives in namespaces the sandbox creates; nothing is added to the host's
//! own network namespace but node-proxies' admin ports on 127.0.0.1.

pub mod manifest;
pub mod net;
pub mod summary;

use std::collections::BTreeMap;
use std::fs::File;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use api::{MtlsMode, Snapshot};
use node_proxy::handoff::{HandoffClient, PodInfo};
use node_proxy::netns::Netns;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tunnel::identity::CertificateAuthority;

use self::manifest::Cluster;

/// Namespace label that enrolls a namespace (or, with `disabled`, opts a pod out).
pub const MESH_LABEL: &str = "weft.dev/mesh";
/// Namespace label selecting `strict` (mTLS only) or `permissive` mode.
pub const MTLS_LABEL: &str = "weft.dev/mtls-mode";

/// How to run the sandbox.
#[derive(Debug, Clone)]
pub struct UpOptions {
    /// The manifest directory.
    pub dir: PathBuf,
    /// The sandbox name: prefixes its namespaces; several can run side by side.
    pub name: String,
    /// Where state, certificates and logs go.
    pub state_dir: PathBuf,
    /// node-proxy admin ports are this, this + 1, ... on 127.0.0.1.
    pub admin_base_port: u16,
    /// How often to print the traffic summary (`None`: never).
    pub summary_every: Option<Duration>,
    /// Stop after this long (`None`: until Ctrl-C or SIGTERM).
    pub duration: Option<Duration>,
    /// The executable providing `node-proxy` and `echo` subcommands (weftctl itself).
    pub exe: PathBuf,
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
}

/// A service.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceState {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// Its virtual IP.
    pub vip: IpAddr,
}

fn require_root(what: &str) -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("{what} needs root: it creates network namespaces and nftables rules (run it with sudo)");
    }
    Ok(())
}

fn write_atomic(path: &Path, contents: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, contents).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))
}

/// Builds the model the node-proxies read, from the manifests and assigned addresses.
pub fn model(cluster: &Cluster, pods: &[PodState], services: &[ServiceState]) -> Snapshot {
    let namespaces = cluster
        .namespaces
        .iter()
        .map(|ns| api::Namespace {
            name: ns.name.clone(),
            enrolled: ns.labels.get(MESH_LABEL).map(String::as_str) == Some("enabled"),
            mtls_mode: match ns.labels.get(MTLS_LABEL).map(String::as_str) {
                Some("strict") | Some("STRICT") => MtlsMode::Strict,
                _ => MtlsMode::Permissive,
            },
        })
        .collect();
    let workloads = cluster
        .pods
        .iter()
        .zip(pods)
        .map(|(spec, st)| api::Workload {
            uid: st.uid.clone(),
            name: spec.name.clone(),
            namespace: spec.namespace.clone(),
            service_account: spec.service_account.clone(),
            node: spec.node.clone(),
            ips: vec![st.ip],
            labels: spec.labels.clone(),
            enrolled: st.enrolled,
            ready: true,
        })
        .collect();
    let services = cluster
        .services
        .iter()
        .zip(services)
        .map(|(spec, st)| api::Service {
            name: spec.name.clone(),
            namespace: spec.namespace.clone(),
            vips: vec![st.vip],
            ports: spec
                .ports
                .iter()
                .map(|p| api::ServicePort {
                    name: p.name.clone(),
                    port: p.port,
                    target_port: p.target_port,
                })
                .collect(),
            selector: spec.selector.clone(),
        })
        .collect();
    Snapshot {
        version: 1,
        namespaces,
        workloads,
        services,
    }
}

/// Everything created so far, removed again on error or at the end.
struct Built {
    netns: Vec<String>,
    children: Vec<Child>,
    node_children: BTreeMap<String, Child>,
    /// Replaced node-proxies still draining: (node, process).
    retiring: Vec<(String, Child, Instant)>,
    state_dir: PathBuf,
}

impl Built {
    fn teardown(&mut self) {
        for c in self.children.iter_mut() {
            stop_child(c, Duration::from_secs(2));
        }
        for c in self.node_children.values_mut() {
            stop_child(c, Duration::from_secs(8));
        }
        for (_, c, _) in self.retiring.iter_mut() {
            stop_child(c, Duration::from_secs(8));
        }
        for ns in self.netns.iter().rev() {
            // Whatever a pod's command left behind (daemons, background jobs).
            net::kill_netns_pids(ns);
            net::delete_netns(ns);
        }
        let _ = std::fs::remove_file(self.state_dir.join("state.json"));
    }
}

fn stop_child(c: &mut Child, grace: Duration) {
    let pid = nix::unistd::Pid::from_raw(c.id() as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let start = Instant::now();
    while start.elapsed() < grace {
        if let Ok(Some(_)) = c.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
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

fn spawn_node_proxy(opts: &UpOptions, node: &NodeState, state_dir: &Path) -> anyhow::Result<Child> {
    let (out, err) = log_file(&node.log)?;
    Command::new(&opts.exe)
        .arg("node-proxy")
        .args(["--node", &node.name])
        .arg("--handoff")
        .arg(&node.handoff)
        .arg("--model")
        .arg(state_dir.join("model.json"))
        .arg("--ca-cert")
        .arg(state_dir.join("ca.pem"))
        .arg("--ca-key")
        .arg(state_dir.join("ca-key.pem"))
        .args(["--admin", &node.admin.to_string(), "--drain-grace", "2"])
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .with_context(|| format!("cannot start node-proxy for {}", node.name))
}

fn pod_info(p: &PodState) -> PodInfo {
    PodInfo {
        uid: p.uid.clone(),
        name: p.name.clone(),
        namespace: p.namespace.clone(),
        service_account: p.service_account.clone(),
        ips: vec![p.ip],
    }
}

/// How long a replaced node-proxy may take to hear it was replaced and drain (its drain
/// grace is 2 s in the sandbox) before `up` stops it.
const RETIRE_AFTER: Duration = Duration::from_secs(30);

/// Replaces a node's node-proxy without refusing a connection, as a DaemonSet's surge
/// rollout would. The new process takes over from the old one through the handoff
/// socket (its admin listener, and each pod's namespace and listeners, passed as file
/// descriptors), so the ports never close; once it serves them and owns the socket's
/// path it tells the old one, which then drains. `up` replays the pods to it (already
/// served: nothing changes). If the new process fails before that, the old one serves on.
fn replace_node_proxy(
    opts: &UpOptions,
    built: &mut Built,
    node: &mut NodeState,
    pods: &[(PodState, File)],
) -> anyhow::Result<()> {
    let mut child = spawn_node_proxy(opts, node, &opts.state_dir)?;
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
    let replayed = hand_over(node, new_pid, pods, Duration::from_secs(20));
    if let Some(old) = built.node_children.insert(node.name.clone(), child) {
        // It drains once the new one has confirmed (a lost confirmation: see RETIRE_AFTER).
        eprintln!(
            "node-proxy of {} replaced: pid {} serves, pid {} drains",
            node.name,
            new_pid,
            old.id()
        );
        built
            .retiring
            .push((node.name.clone(), old, Instant::now()));
    }
    node.pid = new_pid;
    replayed
}

/// Hands a node's enrolled pods to its node-proxy (process `pid`) as one snapshot,
/// waiting up to `timeout` for it to listen. Until it does, the socket's path may still
/// lead to a node-proxy it replaces.
fn hand_over(
    node: &NodeState,
    pid: u32,
    pods: &[(PodState, File)],
    timeout: Duration,
) -> anyhow::Result<()> {
    let start = Instant::now();
    let mut client = loop {
        match HandoffClient::connect(&node.handoff) {
            Ok(c) if c.peer_pid() == Some(pid) => break c,
            Ok(_) if start.elapsed() < timeout => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Ok(_) => bail!(
                "node-proxy of {} (pid {pid}) did not take over its handoff socket",
                node.name
            ),
            Err(e) if start.elapsed() < timeout => {
                tracing::debug!("waiting for node-proxy {}: {e}", node.name);
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => {
                return Err(e).context(format!("node-proxy of {} did not come up", node.name))
            }
        }
    };
    let mine: Vec<(PodInfo, std::os::fd::BorrowedFd<'_>)> = pods
        .iter()
        .filter(|(p, _)| p.node == node.name && p.enrolled)
        .map(|(p, f)| (pod_info(p), f.as_fd()))
        .collect();
    client
        .snapshot(&mine)
        .with_context(|| format!("handing pods to node-proxy of {}", node.name))
}

/// Runs the sandbox until Ctrl-C, SIGTERM or `opts.duration`, then removes it.
pub async fn up(opts: UpOptions, shutdown: CancellationToken) -> anyhow::Result<()> {
    require_root("weftctl local up")?;
    // `weftctl local upgrade` asks for node-proxies to be replaced with SIGUSR1; watched
    // from the start, so one sent early is kept, not fatal.
    let upgrade = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1())
        .context("cannot watch for SIGUSR1")?;
    let cluster = manifest::load_dir(&opts.dir)?;
    let state_dir = opts.state_dir.clone();
    if state_dir.join("state.json").exists() {
        bail!(
            "a sandbox named {:?} is already running or was not cleaned up ({}); run `weftctl local down --name {}` first",
            opts.name,
            state_dir.join("state.json").display(),
            opts.name
        );
    }
    std::fs::create_dir_all(state_dir.join("logs"))
        .with_context(|| format!("cannot create {}", state_dir.display()))?;

    // Addresses, identities and the model first: bad input stops here, before anything
    // is created.
    let fabric = format!("{}-fabric", opts.name);
    let mut pods: Vec<PodState> = Vec::new();
    for (i, p) in cluster.pods.iter().enumerate() {
        let ns_enrolled = cluster.namespaces.iter().any(|n| {
            n.name == p.namespace && n.labels.get(MESH_LABEL).map(String::as_str) == Some("enabled")
        });
        let opted_out = p.labels.get(MESH_LABEL).map(String::as_str) == Some("disabled");
        pods.push(PodState {
            namespace: p.namespace.clone(),
            name: p.name.clone(),
            uid: format!("{}-{}-{}", opts.name, p.namespace, p.name),
            node: p.node.clone(),
            service_account: p.service_account.clone(),
            netns: format!("{}-{}-{}", opts.name, p.namespace, p.name),
            ip: IpAddr::V4(net::pod_ip(i)),
            enrolled: ns_enrolled && !opted_out,
            pid: 0,
            log: state_dir
                .join("logs")
                .join(format!("{}_{}.log", p.namespace, p.name)),
        });
    }
    let services: Vec<ServiceState> = cluster
        .services
        .iter()
        .enumerate()
        .map(|(j, s)| ServiceState {
            namespace: s.namespace.clone(),
            name: s.name.clone(),
            vip: s.cluster_ip.unwrap_or(IpAddr::V4(net::service_ip(j))),
        })
        .collect();
    let snapshot = model(&cluster, &pods, &services);
    api::Model::new(snapshot.clone()).context("the manifests do not make a valid mesh model")?;
    let mut node_names: Vec<String> = pods.iter().map(|p| p.node.clone()).collect();
    node_names.sort();
    node_names.dedup();
    let mut nodes: Vec<NodeState> = node_names
        .iter()
        .enumerate()
        .map(|(i, n)| NodeState {
            name: n.clone(),
            admin: SocketAddr::from(([127, 0, 0, 1], opts.admin_base_port + i as u16)),
            handoff: state_dir.join(n).join("handoff.sock"),
            pid: 0,
            draining: Vec::new(),
            log: state_dir.join("logs").join(format!("node-proxy_{n}.log")),
        })
        .collect();

    let ca = CertificateAuthority::self_signed("cluster.local")?;
    std::fs::write(state_dir.join("ca.pem"), ca.cert_pem())?;
    {
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = File::options()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(0o600)
            .open(state_dir.join("ca-key.pem"))?;
        std::io::Write::write_all(&mut f, ca.key_pem().as_bytes())?;
    }
    write_atomic(
        &state_dir.join("model.json"),
        &serde_json::to_vec_pretty(&snapshot)?,
    )?;

    let mut built = Built {
        netns: Vec::new(),
        children: Vec::new(),
        node_children: BTreeMap::new(),
        retiring: Vec::new(),
        state_dir: state_dir.clone(),
    };
    let result = build_and_run(
        &opts, &mut built, &fabric, &mut pods, &services, &mut nodes, shutdown, upgrade,
    )
    .await;
    eprintln!("stopping sandbox {:?}...", opts.name);
    built.teardown();
    result
}

#[allow(clippy::too_many_arguments)]
async fn build_and_run(
    opts: &UpOptions,
    built: &mut Built,
    fabric: &str,
    pods: &mut [PodState],
    services: &[ServiceState],
    nodes: &mut [NodeState],
    shutdown: CancellationToken,
    mut upgrade: tokio::signal::unix::Signal,
) -> anyhow::Result<()> {
    let state_dir = &opts.state_dir;
    net::create_fabric(fabric)?;
    built.netns.push(fabric.to_owned());
    let mut netns_files: Vec<(PodState, File)> = Vec::new();
    for (i, p) in pods.iter().enumerate() {
        let port = format!("p{i}");
        let ip = match p.ip {
            IpAddr::V4(v4) => v4,
            IpAddr::V6(_) => bail!("pod {}/{}: the sandbox uses IPv4 only", p.namespace, p.name),
        };
        built.netns.push(p.netns.clone());
        net::create_pod(fabric, &p.netns, &port, ip)?;
        let path = Path::new("/run/netns").join(&p.netns);
        let file = File::open(&path).with_context(|| format!("cannot open {}", path.display()))?;
        if p.enrolled {
            let who = format!("{}/{}", p.namespace, p.name);
            let ns = Netns::enter(file.try_clone()?.into(), &who)?;
            node_proxy::redirect::install(&ns, &who)?;
        }
        netns_files.push((p.clone(), file));
    }
    for node in nodes.iter_mut() {
        std::fs::create_dir_all(node.handoff.parent().unwrap_or(state_dir))?;
        let child = spawn_node_proxy(opts, node, state_dir)?;
        node.pid = child.id();
        built.node_children.insert(node.name.clone(), child);
    }
    for node in nodes.iter() {
        hand_over(node, node.pid, &netns_files, Duration::from_secs(20))?;
    }
    let exe_dir = opts.exe.parent().map(Path::to_path_buf).unwrap_or_default();
    let path_env = format!(
        "{}:{}",
        exe_dir.display(),
        std::env::var("PATH").unwrap_or_else(|_| "/usr/sbin:/usr/bin:/sbin:/bin".into())
    );
    let cluster = manifest::load_dir(&opts.dir)?;
    for (spec, p) in cluster.pods.iter().zip(pods.iter_mut()) {
        let (out, err) = log_file(&p.log)?;
        let child = Command::new("ip")
            .args(["netns", "exec", &p.netns])
            .args(&spec.command)
            .env("PATH", &path_env)
            .env("POD_NAME", &p.name)
            .env("POD_NAMESPACE", &p.namespace)
            .env("POD_IP", p.ip.to_string())
            .env("NODE_NAME", &p.node)
            .envs(spec.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("cannot start pod {}/{}", p.namespace, p.name))?;
        p.pid = child.id();
        built.children.push(child);
    }
    let mut state = State {
        name: opts.name.clone(),
        fabric: fabric.to_owned(),
        supervisor_pid: std::process::id(),
        nodes: nodes.to_vec(),
        pods: pods.to_vec(),
        services: services.to_vec(),
        ready: true,
        upgrades: 0,
        upgrade_errors: Vec::new(),
    };
    write_atomic(
        &state_dir.join("state.json"),
        &serde_json::to_vec_pretty(&state)?,
    )?;
    println!(
        "sandbox {:?} is up: {} nodes, {} pods ({} in the mesh), {} services; state in {}",
        opts.name,
        nodes.len(),
        pods.len(),
        pods.iter().filter(|p| p.enrolled).count(),
        services.len(),
        state_dir.display()
    );
    for p in pods.iter() {
        println!(
            "  pod {:<28} {:<15} node {:<8} {}",
            format!("{}/{}", p.namespace, p.name),
            p.ip,
            p.node,
            if p.enrolled { "mesh" } else { "no mesh" }
        );
    }
    for s in services {
        println!(
            "  service {:<24} {}",
            format!("{}/{}", s.namespace, s.name),
            s.vip
        );
    }
    println!(
        "  `ip netns exec {} <command>` runs a command in a pod; Ctrl-C stops the sandbox",
        pods.first()
            .map(|p| p.netns.as_str())
            .unwrap_or("<pod netns>")
    );

    let start = Instant::now();
    let mut last_summary = Instant::now();
    loop {
        let mut replace = false;
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = upgrade.recv() => replace = true,
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
        if opts.duration.is_some_and(|d| start.elapsed() >= d) {
            break;
        }
        let mut changed = false;
        if replace {
            // One node at a time; a failure leaves that node's node-proxy serving (or,
            // if it had already handed over, restarted below once it has drained).
            state.upgrade_errors.clear();
            for i in 0..state.nodes.len() {
                let node = &mut state.nodes[i];
                if let Err(e) = replace_node_proxy(opts, built, node, &netns_files) {
                    eprintln!("upgrade of node-proxy of {} failed: {e:#}", node.name);
                    let error = format!("{}: {e:#}", node.name);
                    state.upgrade_errors.push(error);
                }
                node.draining = built
                    .retiring
                    .iter()
                    .filter(|(n, _, _)| *n == node.name)
                    .map(|(_, c, _)| c.id())
                    .collect();
                write_atomic(
                    &state_dir.join("state.json"),
                    &serde_json::to_vec_pretty(&state)?,
                )?;
            }
            state.upgrades += 1;
            changed = true;
        }
        let before = built.retiring.len();
        built
            .retiring
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
        if built.retiring.len() != before {
            for node in state.nodes.iter_mut() {
                node.draining
                    .retain(|pid| built.retiring.iter().any(|(_, c, _)| c.id() == *pid));
            }
            changed = true;
        }
        // A node-proxy that died is restarted and given its pods again, as a
        // DaemonSet and the CNI node agent would.
        for node in state.nodes.iter_mut() {
            let Some(child) = built.node_children.get_mut(&node.name) else {
                continue;
            };
            if let Ok(Some(status)) = child.try_wait() {
                eprintln!(
                    "node-proxy of {} exited ({status}); restarting it",
                    node.name
                );
                let child = spawn_node_proxy(opts, node, state_dir)?;
                node.pid = child.id();
                built.node_children.insert(node.name.clone(), child);
                hand_over(node, node.pid, &netns_files, Duration::from_secs(20))?;
                changed = true;
            }
        }
        if changed {
            write_atomic(
                &state_dir.join("state.json"),
                &serde_json::to_vec_pretty(&state)?,
            )?;
        }
        if let Some(every) = opts.summary_every {
            if last_summary.elapsed() >= every {
                last_summary = Instant::now();
                let texts: Vec<String> = state
                    .nodes
                    .iter()
                    .filter_map(|n| summary::fetch(n.admin, "/metrics").ok())
                    .collect();
                println!(
                    "[{:>4}s] traffic through the mesh (connections since start; bytes when closed)\n{}",
                    start.elapsed().as_secs(),
                    summary::render(&summary::flows(&texts))
                );
            }
        }
    }
    Ok(())
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
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig).is_ok()
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
            {
                signal(pid, nix::sys::signal::Signal::SIGKILL);
            }
        }
    }
    for ns in net::list_netns(&format!("{name}-")) {
        net::kill_netns_pids(&ns);
        net::delete_netns(&ns);
    }
    let _ = std::fs::remove_file(&path);
    Ok(())
}

/// Asks a running sandbox to replace its node-proxies (SIGUSR1 to its `up` process) and
/// waits until every node runs a new one and the old ones have exited.
pub fn upgrade(state_dir: &Path) -> anyhow::Result<()> {
    require_root("weftctl local upgrade")?;
    let path = state_dir.join("state.json");
    let read = || -> anyhow::Result<State> {
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("no running sandbox: cannot read {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("cannot read {}", path.display()))
    };
    let before = read()?;
    let alive = |pid: u32| {
        // A reaped process is gone; an unreaped one is a zombie, done with its work.
        std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
            !s.rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        })
    };
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
        let now = read()?;
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

/// The capture rules installed in a pod's namespace, for debugging.
pub fn rules(state_dir: &Path, pod: &str) -> anyhow::Result<String> {
    let path = state_dir.join("state.json");
    let state: State = serde_json::from_str(
        &std::fs::read_to_string(&path)
            .with_context(|| format!("no running sandbox: cannot read {}", path.display()))?,
    )?;
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
