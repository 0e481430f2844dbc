//! The parts of a cluster the sandbox plays for pods: the API server (UIDs, cluster IPs,
//! the objects it stores), the kubelet (pod sandboxes, their processes in kubelet-style
//! cgroups, probes from the node, the Ready condition, restarts) and the container
//! runtime (each sandbox's network namespace, set up by the node's CNI chain). It does
//! no Weft job: capture, enrollment and handing pods to node-proxy are the node agent's
//! and weft-cni's, as on a real node.
//!
//! ```text
//!  desired (manifests) vs running --> new: Pod object (Pending) -> netns -> CNI ADD
//!                                          (bridge + host-local, then weft-cni: the
//!                                          agent captures it) -> pause process ->
//!                                          Pod object (Running, IP) -> container
//!                                      gone: container and pause stopped -> CNI DEL
//!                                          -> netns and cgroups removed -> object gone
//!  a failed CNI ADD: the pod stays Pending with the error, retried with a backoff
//!  probes (from the node) -> Ready; liveness failed or process exited -> restart
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use api::ObjectName;
use k8s_openapi::api::core::v1 as core;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use serde_json::Value;

use super::cgroup::{self, Cgroups};
use super::cni::{Attachment, Cni, CniFailure};
use super::manifest::{Cluster, NamespaceSpec, PodSpec, Probe, ProbeAction, ServiceSpec};
use super::probe::{self, Prober};
use super::{net, write_atomic, PodState, ServiceState};

/// The first retry of a pod whose sandbox could not be set up, doubled up to 10 s.
const SETUP_BACKOFF: Duration = Duration::from_millis(500);
/// The first restart of a container that exited, doubled up to 10 s.
const RESTART_BACKOFF: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(10);

/// What a CNI ADD gave: its result and the pod's addresses in it.
pub type CniOutcome = Result<(Value, Vec<IpAddr>), CniFailure>;

/// A pod the sandbox runs.
pub struct RunningPod {
    /// What it was created from.
    pub spec: PodSpec,
    /// What `state.json` shows of it.
    pub state: PodState,
    /// Its sandbox's container ID (what CNI names it by).
    pub sandbox_id: String,
    /// The CNI ADD's result, handed back on DEL.
    pub cni_result: Option<Value>,
    /// Its network namespace exists (the sandbox is set up or being set up).
    pub netns_made: bool,
    /// A CNI ADD under way on its own thread.
    pub setup: Option<mpsc::Receiver<CniOutcome>>,
    /// When the CNI ADD under way began.
    pub setup_since: Option<Instant>,
    /// The process holding its sandbox (as a pause container does).
    pub pause: Option<Child>,
    /// Its container's process.
    pub child: Option<Child>,
    /// When to try again (sandbox setup or container restart).
    pub retry_at: Option<Instant>,
    /// The current backoff.
    pub backoff: Duration,
    /// When it was admitted: a node sets its pods up one at a time in this order, so a
    /// fresh sandbox gives each node's pods their addresses in manifest order (a setup
    /// that takes long holds up the next no longer: `SETUP_ALONE` in the sandbox).
    pub admitted: u64,
    /// Terminating: when its grace period ends and it is stopped.
    pub stop_at: Option<Instant>,
}

impl RunningPod {
    /// `namespace/name`.
    pub fn name(&self) -> String {
        format!("{}/{}", self.state.namespace, self.state.name)
    }

    /// Its key.
    pub fn key(&self) -> ObjectName {
        ObjectName::new(&self.state.namespace, &self.state.name)
    }

    fn attachment(&self) -> Attachment {
        Attachment {
            namespace: self.state.namespace.clone(),
            name: self.state.name.clone(),
            uid: self.state.uid.clone(),
            container_id: self.sandbox_id.clone(),
            netns: Path::new("/run/netns").join(&self.state.netns),
        }
    }
}

/// `count` random bytes as lowercase hex.
fn random_hex(count: usize) -> String {
    use std::io::Read;
    let mut bytes = vec![0u8; count];
    let read = File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes));
    if read.is_err() {
        // Not cryptographic, only unique: time and a counter.
        use std::sync::atomic::{AtomicU64, Ordering};
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
            ^ NEXT.fetch_add(1, Ordering::Relaxed).rotate_left(32);
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = (seed.rotate_left((i * 8) as u32 % 64) & 0xff) as u8;
        }
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A new pod UID, as the API server gives one: a random (version 4) UUID.
pub fn new_uid() -> String {
    let h = random_hex(16);
    let variant = ["8", "9", "a", "b"][usize::from(h.as_bytes()[16]) % 4];
    format!(
        "{}-{}-4{}-{variant}{}-{}",
        &h[0..8],
        &h[8..12],
        &h[13..16],
        &h[17..20],
        &h[20..32]
    )
}

/// Cluster IPs handed out by the sandbox's API server, kept while a service exists.
#[derive(Default)]
pub struct Addresses {
    services: BTreeMap<ObjectName, Vec<IpAddr>>,
}

impl Addresses {
    /// The cluster IPs of each service, the service's primary family first: as written,
    /// or given out here and kept. The families are the service's `spec.ipFamilies`, or
    /// the cluster's primary one, and the other too for a dual-stack service on a
    /// dual-stack cluster (as the API server allocates them).
    fn services(
        &mut self,
        services: &[ServiceSpec],
        family: net::IpFamily,
    ) -> anyhow::Result<BTreeMap<ObjectName, Vec<IpAddr>>> {
        let names: BTreeSet<ObjectName> = services
            .iter()
            .map(|s| ObjectName::new(&s.namespace, &s.name))
            .collect();
        self.services.retain(|n, _| names.contains(n));
        let mut taken: BTreeSet<IpAddr> = services
            .iter()
            .filter_map(|s| s.cluster_ip)
            .chain(self.services.values().flatten().copied())
            .collect();
        let mut out = BTreeMap::new();
        for s in services {
            let name = ObjectName::new(&s.namespace, &s.name);
            if s.headless {
                out.insert(name, Vec::new());
                continue;
            }
            let available = |v6: bool| if v6 { family.v6() } else { family.v4() };
            if let Some(ip) = s.cluster_ip.filter(|ip| !available(ip.is_ipv6())) {
                bail!(
                    "Service {name}: spec.clusterIP {ip} is of a family the sandbox's network \
                     (--ip-family {family}) does not have: give an address of its family, or \
                     leave spec.clusterIP out"
                );
            }
            // The first family: as listed, else the fixed address's, else the cluster's.
            let mut wanted: Vec<bool> = match (s.families.first(), s.cluster_ip) {
                (Some(&v6), _) => vec![v6],
                (None, Some(ip)) => vec![ip.is_ipv6()],
                (None, None) => vec![family.v6_first()],
            };
            if s.require_dual_stack && family != net::IpFamily::Dual {
                bail!(
                    "Service {name}: spec.ipFamilyPolicy RequireDualStack needs both families, \
                     and the sandbox's network (--ip-family {family}) has one"
                );
            }
            if s.dual_stack && family == net::IpFamily::Dual {
                wanted.push(!wanted[0]);
            }
            if let Some(&v6) = wanted.iter().find(|&&v6| !available(v6)) {
                bail!(
                    "Service {name}: spec.ipFamilies asks for {}, which the sandbox's network \
                     (--ip-family {}) does not have",
                    if v6 { "IPv6" } else { "IPv4" },
                    family
                );
            }
            if let Some(ip) = s.cluster_ip {
                if ip.is_ipv6() != wanted[0] {
                    bail!(
                        "Service {name}: spec.clusterIP {ip} is not of the service's family \
                         ({}, on a sandbox run with --ip-family {}): give an address of that \
                         family, or leave spec.clusterIP out",
                        if wanted[0] { "IPv6" } else { "IPv4" },
                        family
                    );
                }
                out.insert(name, vec![ip]);
                continue;
            }
            let kept = self.services.entry(name.clone()).or_default();
            kept.retain(|ip| wanted.contains(&ip.is_ipv6()));
            for &v6 in &wanted {
                if kept.iter().any(|ip| ip.is_ipv6() == v6) {
                    continue;
                }
                let ip = (0..)
                    .map(|j| net::service_ip_of(v6, j))
                    .find(|ip| !taken.contains(ip))
                    .unwrap_or(net::service_ip_of(v6, 0));
                taken.insert(ip);
                kept.push(ip);
            }
            kept.sort_by_key(|ip| ip.is_ipv6() != wanted[0]);
            out.insert(name, kept.clone());
        }
        Ok(out)
    }
}

/// The API server's store: the objects the controller and the node agents read
/// (`<state>/cluster`): every Namespace, the Pods the kubelet runs with their status,
/// and the Services with the cluster IPs given out.
pub struct Writer {
    /// The directory (`<state>/cluster`).
    pub dir: PathBuf,
}

fn container_probe(probe: &Probe) -> core::Probe {
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    let (http_get, tcp_socket) = match &probe.action {
        ProbeAction::Http { path, port } => (
            Some(core::HTTPGetAction {
                path: Some(path.clone()),
                port: IntOrString::Int(i32::from(*port)),
                ..Default::default()
            }),
            None,
        ),
        ProbeAction::Tcp { port } => (
            None,
            Some(core::TCPSocketAction {
                port: IntOrString::Int(i32::from(*port)),
                ..Default::default()
            }),
        ),
    };
    let secs = |d: Duration| i32::try_from(d.as_secs()).ok();
    core::Probe {
        http_get,
        tcp_socket,
        initial_delay_seconds: secs(probe.initial_delay),
        period_seconds: secs(probe.period),
        timeout_seconds: secs(probe.timeout),
        failure_threshold: i32::try_from(probe.failure_threshold).ok(),
        success_threshold: i32::try_from(probe.success_threshold).ok(),
        ..Default::default()
    }
}

impl Writer {
    fn pod_path(&self, pod: &PodState) -> PathBuf {
        self.dir
            .join(format!("pod_{}_{}.yaml", pod.namespace, pod.name))
    }

    fn service_path(&self, name: &ObjectName) -> PathBuf {
        self.dir
            .join(format!("service_{}_{}.yaml", name.namespace, name.name))
    }

    fn namespace_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("namespace_{name}.yaml"))
    }

    /// The Pod object as an API server holds it: its spec, and its status as the
    /// kubelet last reported it.
    pub fn pod(&self, spec: &PodSpec, pod: &PodState) -> anyhow::Result<()> {
        let ports: Vec<core::ContainerPort> = spec
            .ports
            .iter()
            .map(|(name, port)| core::ContainerPort {
                name: name.clone(),
                container_port: i32::from(*port),
                ..Default::default()
            })
            .collect();
        let running = pod.phase == "Running";
        let condition = |type_: &str, on: bool| core::PodCondition {
            type_: type_.into(),
            status: if on { "True" } else { "False" }.into(),
            ..Default::default()
        };
        let object = core::Pod {
            metadata: ObjectMeta {
                name: Some(pod.name.clone()),
                namespace: Some(pod.namespace.clone()),
                uid: Some(pod.uid.clone()),
                labels: Some(spec.labels.clone()).filter(|l| !l.is_empty()),
                deletion_timestamp: pod
                    .deletion_timestamp
                    .as_deref()
                    .and_then(|t| t.parse().ok())
                    .map(Time),
                ..Default::default()
            },
            spec: Some(core::PodSpec {
                node_name: Some(pod.node.clone()),
                service_account_name: Some(pod.service_account.clone()),
                containers: vec![core::Container {
                    name: "main".into(),
                    command: Some(spec.command.clone()),
                    ports: Some(ports).filter(|p| !p.is_empty()),
                    readiness_probe: spec.readiness.as_ref().map(container_probe),
                    liveness_probe: spec.liveness.as_ref().map(container_probe),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            status: Some(core::PodStatus {
                phase: Some(pod.phase.clone()),
                pod_ip: pod.ip.map(|ip| ip.to_string()),
                pod_ips: pod.ip.map(|_| {
                    pod.all_ips()
                        .iter()
                        .map(|ip| core::PodIP { ip: ip.to_string() })
                        .collect()
                }),
                conditions: Some(vec![
                    condition("PodScheduled", true),
                    condition("Initialized", true),
                    condition("ContainersReady", running && pod.ready),
                    condition("Ready", running && pod.ready),
                ]),
                message: pod.message.clone(),
                ..Default::default()
            }),
        };
        let text = format!(
            "# Written by the sandbox (its API server and kubelet): the pod and its status.\n{}",
            serde_yaml_ng::to_string(&object)?
        );
        write_atomic(&self.pod_path(pod), text.as_bytes())
    }

    /// Removes a pod's object.
    pub fn remove_pod(&self, pod: &PodState) {
        let _ = std::fs::remove_file(self.pod_path(pod));
    }

    /// The Namespace objects: those of the manifests, and the ones every cluster has.
    /// Objects of namespaces no longer there are removed.
    pub fn namespaces(&self, namespaces: &[NamespaceSpec]) -> anyhow::Result<()> {
        let mut all: BTreeMap<&str, BTreeMap<String, String>> = ["default", "kube-system"]
            .into_iter()
            .map(|n| (n, BTreeMap::new()))
            .collect();
        for ns in namespaces {
            all.insert(&ns.name, ns.labels.clone());
        }
        for (name, labels) in &all {
            let object = core::Namespace {
                metadata: ObjectMeta {
                    name: Some((*name).to_owned()),
                    labels: Some(labels.clone()).filter(|l| !l.is_empty()),
                    ..Default::default()
                },
                ..Default::default()
            };
            let text = format!(
                "# Written by the sandbox (its API server): the namespace.\n{}",
                serde_yaml_ng::to_string(&object)?
            );
            let path = self.namespace_path(name);
            if std::fs::read_to_string(&path).ok().as_deref() != Some(&text) {
                write_atomic(&path, text.as_bytes())?;
            }
        }
        self.retain_files("namespace_", |rest| all.contains_key(rest));
        Ok(())
    }

    /// The Service object with the cluster IP given out, for services that named none.
    pub fn service(&self, spec: &ServiceSpec, ips: &[IpAddr]) -> anyhow::Result<()> {
        let mut object = spec.object.clone();
        let s = object.spec.get_or_insert_with(Default::default);
        s.cluster_ip = ips.first().map(ToString::to_string);
        s.cluster_ips = Some(ips.iter().map(ToString::to_string).collect());
        s.ip_families = Some(
            ips.iter()
                .map(|ip| if ip.is_ipv6() { "IPv6" } else { "IPv4" }.to_owned())
                .collect(),
        );
        let text = format!(
            "# Written by the sandbox (its API server): the service with the cluster IP it was given.\n{}",
            serde_yaml_ng::to_string(&object)?
        );
        write_atomic(
            &self.service_path(&ObjectName::new(&spec.namespace, &spec.name)),
            text.as_bytes(),
        )
    }

    /// Removes service objects not in `keep`.
    pub fn retain_services(&self, keep: &BTreeSet<ObjectName>) {
        self.retain_files("service_", |rest| {
            keep.iter()
                .any(|n| format!("{}_{}", n.namespace, n.name) == rest)
        });
    }

    /// Removes `<prefix><rest>.yaml` files whose `rest` is not kept.
    fn retain_files(&self, prefix: &str, keep: impl Fn(&str) -> bool) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for entry in entries.flatten() {
            let file = entry.file_name().to_string_lossy().into_owned();
            let Some(rest) = file
                .strip_prefix(prefix)
                .and_then(|f| f.strip_suffix(".yaml"))
            else {
                continue;
            };
            if !keep(rest) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
}

/// The hosts file of a pod in `namespace`: every service by its cluster names, and
/// its own namespace's services by their short names, as cluster DNS answers them.
pub fn hosts_file(namespace: &str, pod: &PodState, services: &[ServiceState]) -> String {
    let mut text = String::from(
        "# Written by the weft sandbox: cluster DNS names of the services.\n127.0.0.1 localhost\n::1 localhost ip6-localhost\n",
    );
    for ip in pod.all_ips() {
        text.push_str(&format!("{ip} {}\n", pod.name));
    }
    for s in services {
        let mut names = format!(
            "{n}.{ns}.svc.cluster.local {n}.{ns}.svc {n}.{ns}",
            n = s.name,
            ns = s.namespace
        );
        if s.namespace == namespace {
            names.push(' ');
            names.push_str(&s.name);
        }
        for vip in s.all_vips() {
            text.push_str(&format!("{vip} {names}\n"));
        }
    }
    text
}

/// The resolver configuration of a pod in `namespace`.
pub fn resolv_conf(namespace: &str) -> String {
    format!(
        "# Written by the weft sandbox: names resolve from /etc/hosts.\nsearch {namespace}.svc.cluster.local svc.cluster.local cluster.local\nnameserver 127.0.0.1\noptions ndots:5 timeout:1 attempts:1\n"
    )
}

/// `/etc/netns/<netns>`: files `ip netns exec` mounts over the pod's `/etc`.
pub fn etc_dir(netns: &str) -> PathBuf {
    Path::new("/etc/netns").join(netns)
}

/// Writes a pod's DNS files, in place (processes already running see the bind-mounted
/// file, which a rename would replace with another).
pub fn write_dns(pod: &PodState, services: &[ServiceState]) -> anyhow::Result<()> {
    use std::io::Write;
    let dir = etc_dir(&pod.netns);
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    for (name, text) in [
        ("hosts", hosts_file(&pod.namespace, pod, services)),
        ("resolv.conf", resolv_conf(&pod.namespace)),
    ] {
        let path = dir.join(name);
        let mut f = File::options()
            .create(true)
            .write(true)
            .truncate(true)
            .open(&path)
            .with_context(|| format!("cannot write {}", path.display()))?;
        f.write_all(text.as_bytes())?;
    }
    Ok(())
}

/// A pod admitted to a node: its object is Pending, nothing of it exists yet.
pub fn admit(sandbox: &str, spec: &PodSpec, logs: &Path, admitted: u64) -> RunningPod {
    let netns = format!("{sandbox}-{}-{}", spec.namespace, spec.name);
    RunningPod {
        spec: spec.clone(),
        state: PodState {
            namespace: spec.namespace.clone(),
            name: spec.name.clone(),
            uid: new_uid(),
            node: spec.node.clone(),
            service_account: spec.service_account.clone(),
            netns,
            ip: None,
            ips: Vec::new(),
            phase: "Pending".into(),
            ready: false,
            restarts: 0,
            message: None,
            pid: 0,
            log: logs.join(format!("{}_{}.log", spec.namespace, spec.name)),
            admin: None,
            deletion_timestamp: None,
        },
        sandbox_id: random_hex(32),
        cni_result: None,
        netns_made: false,
        setup: None,
        setup_since: None,
        pause: None,
        child: None,
        retry_at: None,
        backoff: Duration::ZERO,
        admitted,
        stop_at: None,
    }
}

/// Starts setting up a pod's sandbox: its network namespace now, the CNI chain on a
/// thread of its own ([`setup_done`] takes the outcome).
pub fn begin_setup(pod: &mut RunningPod, cni: &Cni) -> anyhow::Result<()> {
    net::delete_netns(&pod.state.netns);
    net::ip(&["netns", "add", &pod.state.netns])?;
    pod.netns_made = true;
    // What a runtime's loopback plugin does first.
    net::ip(&["-n", &pod.state.netns, "link", "set", "lo", "up"])?;
    if cni.ipv6 {
        // Its IPv6 addresses usable at once, not after duplicate address detection.
        net::no_dad(&pod.state.netns)?;
    }
    let (tx, rx) = mpsc::channel();
    let (cni, attachment) = (cni.clone(), pod.attachment());
    std::thread::Builder::new()
        .name(format!("cni {}", pod.name()))
        .spawn(move || {
            let _ = tx.send(cni.add(&attachment));
        })?;
    pod.setup = Some(rx);
    pod.setup_since = Some(Instant::now());
    pod.sandbox_id = random_hex(32);
    Ok(())
}

/// The CNI ADD's outcome, once it is known: the sandbox is up (its IP) or the pod waits
/// for a retry (the error, as the kubelet reports it in the pod's status).
pub fn setup_done(pod: &mut RunningPod) -> Option<Result<IpAddr, String>> {
    let outcome = match pod.setup.as_ref()?.try_recv() {
        Ok(outcome) => outcome,
        Err(mpsc::TryRecvError::Empty) => return None,
        Err(mpsc::TryRecvError::Disconnected) => Err(CniFailure::Exec {
            plugin: "(all)".into(),
            why: "the CNI thread ended without an answer".into(),
        }),
    };
    pod.setup = None;
    match outcome {
        Ok((result, ips)) => match ips.first() {
            Some(ip) => {
                pod.cni_result = Some(result);
                pod.state.ip = Some(*ip);
                pod.state.ips = match ips.len() {
                    1 => Vec::new(),
                    _ => ips.clone(),
                };
                pod.state.message = None;
                pod.backoff = Duration::ZERO;
                Some(Ok(*ip))
            }
            None => Some(Err("the CNI chain gave the pod no address".into())),
        },
        Err(e) => {
            // The runtime tore the chain down; the namespace goes too, as a failed
            // sandbox's does.
            net::delete_netns(&pod.state.netns);
            pod.netns_made = false;
            pod.backoff = (pod.backoff * 2).clamp(SETUP_BACKOFF, BACKOFF_MAX);
            pod.retry_at = Some(Instant::now() + pod.backoff);
            let why = format!("FailedCreatePodSandBox: {e}");
            pod.state.message = Some(why.clone());
            Some(Err(why))
        }
    }
}

/// Starts the process that holds a pod's sandbox (a pause container), in its cgroup.
pub fn start_pause(pod: &mut RunningPod, cgroups: &Cgroups) -> anyhow::Result<()> {
    let cg = cgroups.container(&pod.state.uid, "pause")?;
    let child = cgroup::in_cgroup(
        &cg,
        Path::new("ip"),
        &[
            "netns".into(),
            "exec".into(),
            pod.state.netns.clone(),
            "sleep".into(),
            "infinity".into(),
        ],
    )
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .spawn()
    .with_context(|| format!("cannot start the sandbox process of pod {}", pod.name()))?;
    pod.pause = Some(child);
    Ok(())
}

/// Starts a pod's container process inside its namespace and cgroup.
pub fn start_process(
    pod: &mut RunningPod,
    launch: &Launch,
    cgroups: &Cgroups,
) -> anyhow::Result<()> {
    let (out, err) = super::log_file(&pod.state.log)?;
    if pod.spec.command.is_empty() {
        bail!("pod {} has no command", pod.name());
    }
    let Some(ip) = pod.state.ip else {
        bail!("pod {} has no address yet", pod.name());
    };
    let cg = cgroups.container(&pod.state.uid, "main")?;
    let mut cmd = match pod.spec.waypoint.clone() {
        Some(gateway) => waypoint_command(pod, &gateway, launch, &cg)?,
        None => {
            let mut args = vec![
                "netns".to_owned(),
                "exec".to_owned(),
                pod.state.netns.clone(),
            ];
            args.extend(pod.spec.command.iter().cloned());
            cgroup::in_cgroup(&cg, Path::new("ip"), &args)
        }
    };
    let child = cmd
        .env("PATH", &launch.path_env)
        .env("POD_NAME", &pod.state.name)
        .env("POD_NAMESPACE", &pod.state.namespace)
        .env("POD_IP", ip.to_string())
        .env("NODE_NAME", &pod.state.node)
        .envs(pod.spec.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .with_context(|| format!("cannot start pod {}", pod.name()))?;
    pod.state.pid = child.id();
    pod.child = Some(child);
    pod.state.phase = "Running".into();
    Ok(())
}

/// What the prober checks of a running pod.
pub fn probe_target(pod: &RunningPod) -> Option<probe::Target> {
    let probes: Vec<(probe::Kind, Probe)> = [
        (probe::Kind::Readiness, pod.spec.readiness.clone()),
        (probe::Kind::Liveness, pod.spec.liveness.clone()),
    ]
    .into_iter()
    .filter_map(|(k, p)| Some((k, p?)))
    .collect();
    Some(probe::Target {
        uid: pod.state.uid.clone(),
        ip: pod.state.ip?,
        probes,
    })
}

/// Stops a pod's container (SIGTERM, then SIGKILL after `grace`).
pub fn stop_process(pod: &mut RunningPod, grace: Duration) {
    if let Some(mut c) = pod.child.take() {
        super::stop_child(&mut c, grace);
    }
    pod.state.pid = 0;
}

/// Removes a pod: its processes, its sandbox (CNI DEL, as the runtime does), its
/// namespace, cgroups and DNS files, and takes it from `prober`. The caller removes its
/// object.
pub fn destroy(
    pod: &mut RunningPod,
    cni: Option<&Cni>,
    cgroups: &Cgroups,
    prober: Option<&Prober>,
) {
    if let Some(p) = prober {
        p.remove(pod.key());
    }
    stop_process(pod, Duration::from_secs(2));
    // A CNI ADD still running finishes first: DEL must come after it.
    if let Some(rx) = pod.setup.take() {
        if let Ok(Ok((result, _))) = rx.recv_timeout(Duration::from_secs(130)) {
            pod.cni_result = Some(result);
        }
    }
    if pod.netns_made {
        if let Some(cni) = cni {
            if let Err(e) = cni.del(&pod.attachment(), pod.cni_result.as_ref()) {
                eprintln!("pod {}: {e}", pod.name());
            }
        }
    }
    if let Some(mut c) = pod.pause.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
    net::kill_netns_pids(&pod.state.netns);
    net::delete_netns(&pod.state.netns);
    pod.netns_made = false;
    cgroups.remove_pod(&pod.state.uid);
    let _ = std::fs::remove_dir_all(etc_dir(&pod.state.netns));
}

/// Schedules a container restart after its backoff (CrashLoopBackOff's shape).
pub fn restart_later(pod: &mut RunningPod) {
    pod.backoff = (pod.backoff * 2).clamp(RESTART_BACKOFF, BACKOFF_MAX);
    pod.retry_at = Some(Instant::now() + pod.backoff);
    pod.state.restarts += 1;
    pod.state.ready = false;
}

/// What starting a pod's process needs from the sandbox.
#[derive(Debug, Clone)]
pub struct Launch {
    /// `PATH` for pod processes (weftctl first).
    pub path_env: String,
    /// The weftctl binary.
    pub exe: PathBuf,
    /// The controller's gRPC addresses (its replicas), comma-separated.
    pub controller: String,
    /// The name its certificate carries.
    pub controller_name: String,
    /// The mesh root it chains to.
    pub controller_ca: PathBuf,
    /// The controller's token directory.
    pub tokens: PathBuf,
    /// Admin addresses free for waypoint pods.
    /// (Taken from as each waypoint starts, so two started in one round differ.)
    pub waypoint_admin_ports: std::sync::Arc<std::sync::Mutex<Vec<std::net::SocketAddr>>>,
    /// Where waypoints export spans.
    pub otlp_endpoint: Option<String>,
}

/// A waypoint pod's process: the `waypoint` binary in the host's namespace (where the
/// controller listens), serving HBONE inside the pod's namespace, with a token of the
/// Gateway's service account, as a projected token would be in a cluster.
fn waypoint_command(
    pod: &mut RunningPod,
    gateway: &str,
    launch: &Launch,
    cgroup: &Path,
) -> anyhow::Result<Command> {
    let (ns, sa) = (&pod.state.namespace, &pod.state.service_account);
    controller::auth::NodeTokens::create_workload(&launch.tokens, ns, sa)
        .with_context(|| format!("cannot write the token of waypoint {gateway}"))?;
    let token = launch
        .tokens
        .join(controller::auth::SERVICE_ACCOUNTS)
        .join(ns)
        .join(format!("{sa}{}", controller::auth::TOKEN_SUFFIX));
    let admin = match pod.state.admin {
        Some(a) => a,
        None => {
            let mut free = launch
                .waypoint_admin_ports
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if free.is_empty() {
                anyhow::bail!(
                    "waypoint {gateway}: the sandbox runs at most {} waypoint pods (lower a WaypointParameters' replicas)",
                    super::MAX_WAYPOINTS
                );
            }
            free.remove(0)
        }
    };
    pod.state.admin = Some(admin);
    let ip = pod.state.ip.context("a waypoint pod without an address")?;
    let mut cmd = cgroup::in_cgroup(
        cgroup,
        &super::role_exe(&launch.exe, super::WAYPOINT_BIN),
        &[],
    );
    cmd.args(["--gateway", gateway])
        .args(["--node", &pod.state.node])
        .args(["--pod-ip", &ip.to_string()])
        .arg("--netns")
        .arg(Path::new("/run/netns").join(&pod.state.netns))
        .args(["--controller", &launch.controller])
        .args(["--controller-name", &launch.controller_name])
        .arg("--controller-ca")
        .arg(&launch.controller_ca)
        .arg("--token-file")
        .arg(token)
        .args(["--admin", &admin.to_string(), "--drain-grace", "2"]);
    if let Some(endpoint) = &launch.otlp_endpoint {
        cmd.args(["--otlp-endpoint", endpoint]);
    }
    Ok(cmd)
}

/// The ports of `pod`'s first container that nothing listens on yet, as a kubelet's
/// TCP readiness probe would find them closed.
pub fn closed_ports(pod: &RunningPod) -> Vec<u16> {
    let listening = listening_ports(pod.state.pid);
    pod.spec
        .ports
        .iter()
        .map(|(_, p)| *p)
        .filter(|p| !listening.contains(p))
        .collect()
}

/// The TCP ports something listens on in the network namespaces of process `pid`'s
/// threads (a waypoint serves its pod's namespace from one thread), from their
/// `/proc/<pid>/task/<tid>/net/tcp{,6}` tables.
fn listening_ports(pid: u32) -> std::collections::BTreeSet<u16> {
    let mut listening = std::collections::BTreeSet::new();
    let tasks: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    for (tid, table) in tasks.iter().flat_map(|t| [(t, "tcp"), (t, "tcp6")]) {
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/net/{table}"))
        else {
            continue;
        };
        // `sl local_address rem_address st ...`; state 0A is LISTEN.
        for line in text.lines().skip(1) {
            let mut fields = line.split_whitespace().skip(1);
            let (Some(local), Some(_), Some("0A")) = (fields.next(), fields.next(), fields.next())
            else {
                continue;
            };
            if let Some(port) = local
                .rsplit_once(':')
                .and_then(|(_, p)| u16::from_str_radix(p, 16).ok())
            {
                listening.insert(port);
            }
        }
    }
    listening
}

/// The pods and services a cluster asks for, by name.
pub fn desired(cluster: &Cluster) -> BTreeMap<ObjectName, &PodSpec> {
    cluster
        .pods
        .iter()
        .map(|p| (ObjectName::new(&p.namespace, &p.name), p))
        .collect()
}

/// Gives every service its cluster IP (writing objects for those given one here) and
/// returns what `state.json` and DNS show.
pub fn services(
    cluster: &Cluster,
    addresses: &mut Addresses,
    writer: &Writer,
    family: net::IpFamily,
) -> anyhow::Result<Vec<ServiceState>> {
    let ips = addresses.services(&cluster.services, family)?;
    let mut written = BTreeSet::new();
    let mut out = Vec::new();
    for s in &cluster.services {
        let name = ObjectName::new(&s.namespace, &s.name);
        let vips = ips.get(&name).cloned().unwrap_or_default();
        if s.cluster_ip.is_none() && !vips.is_empty() {
            writer.service(s, &vips)?;
            written.insert(name.clone());
        }
        out.push(ServiceState {
            namespace: s.namespace.clone(),
            name: s.name.clone(),
            vip: vips.first().copied(),
            vips: match vips.len() {
                0 | 1 => Vec::new(),
                _ => vips,
            },
        });
    }
    writer.retain_services(&written);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(ns: &str, name: &str, ip: &str) -> PodState {
        PodState {
            namespace: ns.into(),
            name: name.into(),
            uid: "u".into(),
            node: "node-1".into(),
            service_account: "default".into(),
            netns: format!("t-{ns}-{name}"),
            ip: Some(ip.parse().expect("literal")),
            phase: "Running".into(),
            ready: true,
            restarts: 0,
            message: None,
            pid: 0,
            log: PathBuf::new(),
            admin: None,
            deletion_timestamp: None,
            ips: Vec::new(),
        }
    }

    #[test]
    fn hosts_name_services_as_cluster_dns_does() {
        let services = [
            ServiceState {
                namespace: "demo".into(),
                name: "echo".into(),
                vip: Some("10.96.0.10".parse().expect("literal")),
                vips: vec![
                    "10.96.0.10".parse().expect("literal"),
                    "fd00:10:96::a".parse().expect("literal"),
                ],
            },
            ServiceState {
                namespace: "other".into(),
                name: "db".into(),
                vip: Some("10.96.0.11".parse().expect("literal")),
                vips: Vec::new(),
            },
            ServiceState {
                namespace: "demo".into(),
                name: "headless".into(),
                vip: None,
                vips: Vec::new(),
            },
        ];
        let text = hosts_file("demo", &state("demo", "client", "10.244.1.5"), &services);
        assert!(
            text.contains("10.96.0.10 echo.demo.svc.cluster.local echo.demo.svc echo.demo echo\n"),
            "{text}"
        );
        assert!(
            text.contains("10.96.0.11 db.other.svc.cluster.local db.other.svc db.other\n"),
            "{text}"
        );
        assert!(
            text.contains("fd00:10:96::a echo.demo.svc.cluster.local"),
            "a dual-stack service resolves to both addresses: {text}"
        );
        assert!(!text.contains("headless"), "{text}");
    }

    #[test]
    fn uids_are_version_4_uuids() {
        let (a, b) = (new_uid(), new_uid());
        assert_ne!(a, b);
        assert_eq!(a.len(), 36);
        assert_eq!(a.as_bytes()[14], b'4', "{a}");
        assert!("89ab".contains(a.as_bytes()[19] as char), "{a}");
        assert!(a.chars().all(|c| c.is_ascii_hexdigit() || c == '-'), "{a}");
    }

    fn svc(name: &str, ip: Option<&str>) -> ServiceSpec {
        ServiceSpec {
            name: name.into(),
            namespace: "demo".into(),
            cluster_ip: ip.map(|i| i.parse().expect("literal")),
            headless: false,
            families: Vec::new(),
            dual_stack: false,
            require_dual_stack: false,
            object: Default::default(),
        }
    }

    #[test]
    fn services_keep_their_cluster_ips() {
        let mut a = Addresses::default();
        let v4 = net::IpFamily::Ipv4;
        let given = a
            .services(&[svc("a", Some("10.96.0.10")), svc("b", None)], v4)
            .expect("addresses");
        let b = given[&ObjectName::new("demo", "b")].clone();
        assert_eq!(b, [IpAddr::V4(net::service_ip(1))], "10.96.0.10 is taken");
        let again = a
            .services(&[svc("b", None), svc("c", None)], v4)
            .expect("addresses");
        assert_eq!(
            again[&ObjectName::new("demo", "b")],
            b,
            "kept across changes"
        );
    }

    #[test]
    fn services_get_the_families_they_ask_for_that_the_network_has() {
        let mut a = Addresses::default();
        let dual = net::IpFamily::Dual;
        let mut both = svc("both", None);
        both.dual_stack = true;
        let mut required = both.clone();
        required.require_dual_stack = true;
        let refused = Addresses::default()
            .services(&[required], net::IpFamily::Ipv4)
            .expect_err("RequireDualStack on one family");
        assert!(
            refused.to_string().contains("RequireDualStack"),
            "{refused}"
        );
        let six_fixed = Addresses::default()
            .services(&[svc("fixed6", Some("fd00:10:96::99"))], dual)
            .expect("an IPv6 address of its own on dual stack");
        assert_eq!(six_fixed.values().next().map(Vec::len), Some(1));
        let mut six = svc("six", None);
        six.families = vec![true];
        let got = a
            .services(&[svc("single", None), both.clone(), six.clone()], dual)
            .expect("addresses");
        let at = |n: &str| got[&ObjectName::new("demo", n)].clone();
        assert_eq!(at("single"), [IpAddr::V4(net::service_ip(0))]);
        assert_eq!(
            at("both"),
            [
                IpAddr::V4(net::service_ip(1)),
                IpAddr::V6(net::service_ip6(0))
            ]
        );
        assert_eq!(at("six"), [IpAddr::V6(net::service_ip6(1))]);
        // IPv6 only: the primary family is IPv6; a dual-stack service gets one address.
        let got = Addresses::default()
            .services(&[svc("single", None), both], net::IpFamily::Ipv6)
            .expect("addresses");
        assert!(got.values().flatten().all(IpAddr::is_ipv6), "{got:?}");
        // An address or a family the network does not have is refused, naming it.
        let refused = Addresses::default()
            .services(&[svc("fixed", Some("10.96.0.10"))], net::IpFamily::Ipv6)
            .expect_err("an IPv4 cluster IP on IPv6 only");
        assert!(
            refused
                .to_string()
                .contains("Service demo/fixed: spec.clusterIP 10.96.0.10"),
            "{refused}"
        );
        let refused = Addresses::default()
            .services(&[six], net::IpFamily::Ipv4)
            .expect_err("IPv6 on IPv4 only");
        assert!(
            refused
                .to_string()
                .contains("spec.ipFamilies asks for IPv6"),
            "{refused}"
        );
    }
}

#[cfg(test)]
mod probe_tests {
    #[test]
    fn a_listening_port_is_seen_and_a_closed_one_is_not() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let seen = super::listening_ports(std::process::id());
        assert!(seen.contains(&port), "{port} in {seen:?}");
        drop(listener);
        assert!(!super::listening_ports(std::process::id()).contains(&port));
    }
}
