//! The parts of a cluster the sandbox plays: scheduler and kubelet (pods to network
//! namespaces and processes, their addresses), the API server's allocator (UIDs, cluster
//! IPs), the CNI node agent (capture rules, handing enrolled pods to the node-proxy) and
//! cluster DNS (names in each pod's hosts file). What it decides is written as Pod and
//! Service objects into a directory the controller reads beside the user's manifests.
//!
//! ```text
//!  desired (manifests) vs running --> remove: handoff remove, stop, netns gone, YAML gone
//!                                 --> add:    IP + UID, netns + veth, DNS files, YAML,
//!                                             handoff add, capture rules, process
//!                                 --> enrollment flipped: handoff + rules, process kept
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::{bail, Context};
use api::ObjectName;
use k8s_openapi::api::core::v1 as core;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use runtime::handoff::{HandoffClient, PodInfo};
use runtime::netns::Netns;

use super::manifest::{Cluster, NamespaceSpec, PodSpec, ServiceSpec};
use super::{net, write_atomic, PodState, ServiceState};

/// A pod the sandbox runs.
pub struct RunningPod {
    /// What it was created from.
    pub spec: PodSpec,
    /// What `state.json` shows of it.
    pub state: PodState,
    /// Its network namespace, held open for handoffs.
    pub netns_file: File,
    /// Its process, once started.
    pub child: Option<Child>,
    /// The fabric-side end of its veth.
    pub port: String,
}

impl RunningPod {
    /// `namespace/name`.
    pub fn name(&self) -> String {
        format!("{}/{}", self.state.namespace, self.state.name)
    }

    /// What its node-proxy is told.
    pub fn info(&self) -> PodInfo {
        PodInfo {
            uid: self.state.uid.clone(),
            name: self.state.name.clone(),
            namespace: self.state.namespace.clone(),
            service_account: self.state.service_account.clone(),
            ips: vec![self.state.ip],
        }
    }
}

/// Whether a pod is captured: its namespace is enrolled and it did not opt out.
pub fn enrolled(namespaces: &[NamespaceSpec], spec: &PodSpec) -> bool {
    use controller::translate::enrollment::{namespace_enrolled, pod_enrolled};
    let ns = namespaces
        .iter()
        .any(|n| n.name == spec.namespace && namespace_enrolled(&n.labels) == Ok(true));
    // Sandbox pods never share the node's network namespace.
    pod_enrolled(ns, &spec.labels, false)
}

/// Addresses handed out, lowest free first, so a fresh sandbox numbers its pods in
/// manifest order (10.244.1.2, .3, ...) and the demo can name them.
#[derive(Default)]
pub struct Addresses {
    pods: BTreeSet<usize>,
    services: BTreeMap<ObjectName, IpAddr>,
}

impl Addresses {
    fn pod(&mut self) -> (usize, Ipv4Addr) {
        let i = (0..).find(|i| !self.pods.contains(i)).unwrap_or_default();
        self.pods.insert(i);
        (i, net::pod_ip(i))
    }

    fn free_pod(&mut self, ip: IpAddr) {
        self.pods.retain(|i| IpAddr::V4(net::pod_ip(*i)) != ip);
    }

    /// The cluster IP of each service: as written, or one given out here and kept.
    fn services(&mut self, services: &[ServiceSpec]) -> BTreeMap<ObjectName, Option<IpAddr>> {
        let names: BTreeSet<ObjectName> = services
            .iter()
            .map(|s| ObjectName::new(&s.namespace, &s.name))
            .collect();
        self.services.retain(|n, _| names.contains(n));
        let taken: BTreeSet<IpAddr> = services
            .iter()
            .filter_map(|s| s.cluster_ip)
            .chain(self.services.values().copied())
            .collect();
        let mut taken = taken;
        let mut out = BTreeMap::new();
        for s in services {
            let name = ObjectName::new(&s.namespace, &s.name);
            let ip = match (s.cluster_ip, s.headless) {
                (Some(ip), _) => Some(ip),
                (None, true) => None,
                (None, false) => Some(*self.services.entry(name.clone()).or_insert_with(|| {
                    let ip = (0..)
                        .map(|j| IpAddr::V4(net::service_ip(j)))
                        .find(|ip| !taken.contains(ip))
                        .unwrap_or(IpAddr::V4(net::service_ip(0)));
                    taken.insert(ip);
                    ip
                })),
            };
            out.insert(name, ip);
        }
        out
    }
}

/// Where the sandbox writes what the controller reads.
pub struct Writer {
    /// The directory (`<state>/cluster`).
    pub dir: PathBuf,
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

    /// The Pod object as an API server would hold it once the pod runs.
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
        let object = core::Pod {
            metadata: ObjectMeta {
                name: Some(pod.name.clone()),
                namespace: Some(pod.namespace.clone()),
                uid: Some(pod.uid.clone()),
                labels: Some(spec.labels.clone()).filter(|l| !l.is_empty()),
                ..Default::default()
            },
            spec: Some(core::PodSpec {
                node_name: Some(pod.node.clone()),
                service_account_name: Some(pod.service_account.clone()),
                containers: vec![core::Container {
                    name: "main".into(),
                    command: Some(spec.command.clone()),
                    ports: Some(ports).filter(|p| !p.is_empty()),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            status: Some(core::PodStatus {
                phase: Some("Running".into()),
                pod_ip: Some(pod.ip.to_string()),
                pod_ips: Some(vec![core::PodIP {
                    ip: pod.ip.to_string(),
                }]),
                conditions: Some(vec![core::PodCondition {
                    type_: "Ready".into(),
                    status: "True".into(),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
        };
        let text = format!(
            "# Written by the sandbox (its kubelet): the pod it runs.\n{}",
            serde_yaml_ng::to_string(&object)?
        );
        write_atomic(&self.pod_path(pod), text.as_bytes())
    }

    /// Removes a pod's object.
    pub fn remove_pod(&self, pod: &PodState) {
        let _ = std::fs::remove_file(self.pod_path(pod));
    }

    /// The Service object with the cluster IP given out, for services that named none.
    pub fn service(&self, spec: &ServiceSpec, ip: IpAddr) -> anyhow::Result<()> {
        let mut object = spec.object.clone();
        let s = object.spec.get_or_insert_with(Default::default);
        s.cluster_ip = Some(ip.to_string());
        s.cluster_ips = Some(vec![ip.to_string()]);
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
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for entry in entries.flatten() {
            let file = entry.file_name().to_string_lossy().into_owned();
            let Some(rest) = file
                .strip_prefix("service_")
                .and_then(|f| f.strip_suffix(".yaml"))
            else {
                continue;
            };
            let keep_it = keep
                .iter()
                .any(|n| format!("{}_{}", n.namespace, n.name) == rest);
            if !keep_it {
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
    text.push_str(&format!("{} {}\n", pod.ip, pod.name));
    for s in services {
        let Some(vip) = s.vip else { continue };
        let mut names = format!(
            "{n}.{ns}.svc.cluster.local {n}.{ns}.svc {n}.{ns}",
            n = s.name,
            ns = s.namespace
        );
        if s.namespace == namespace {
            names.push(' ');
            names.push_str(&s.name);
        }
        text.push_str(&format!("{vip} {names}\n"));
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

/// Where pods are made: the sandbox's name (prefix of its namespaces), its fabric
/// namespace, and the directory of pod logs.
pub struct Site<'a> {
    /// The sandbox's name.
    pub sandbox: &'a str,
    /// The fabric namespace.
    pub fabric: &'a str,
    /// Where pod logs go.
    pub logs: &'a Path,
}

/// Creates a pod's network namespace, address and DNS files; nothing runs in it yet.
pub fn create_pod(
    site: &Site<'_>,
    spec: &PodSpec,
    addresses: &mut Addresses,
    uid: String,
    enrolled: bool,
    services: &[ServiceState],
) -> anyhow::Result<RunningPod> {
    let (sandbox, fabric, log_dir) = (site.sandbox, site.fabric, site.logs);
    let (index, ip) = addresses.pod();
    let netns = format!("{sandbox}-{}-{}", spec.namespace, spec.name);
    let port = format!("p{index}");
    let state = PodState {
        namespace: spec.namespace.clone(),
        name: spec.name.clone(),
        uid,
        node: spec.node.clone(),
        service_account: spec.service_account.clone(),
        netns: netns.clone(),
        ip: IpAddr::V4(ip),
        enrolled,
        pid: 0,
        log: log_dir.join(format!("{}_{}.log", spec.namespace, spec.name)),
        admin: None,
    };
    let created = (|| -> anyhow::Result<File> {
        net::create_pod(fabric, &netns, &port, ip)?;
        let path = Path::new("/run/netns").join(&netns);
        let file = File::open(&path).with_context(|| format!("cannot open {}", path.display()))?;
        write_dns(&state, services)?;
        Ok(file)
    })();
    match created {
        Ok(netns_file) => Ok(RunningPod {
            spec: spec.clone(),
            state,
            netns_file,
            child: None,
            port,
        }),
        Err(e) => {
            net::delete_netns(&netns);
            let _ = std::fs::remove_dir_all(etc_dir(&netns));
            addresses.free_pod(IpAddr::V4(ip));
            Err(e)
        }
    }
}

/// Installs or removes a pod's capture rules.
pub fn capture(pod: &RunningPod, on: bool) -> anyhow::Result<()> {
    let who = pod.name();
    let ns = Netns::enter(pod.netns_file.try_clone()?.into(), &who)?;
    if on {
        node_proxy::redirect::install(&ns, &who)?;
    } else {
        node_proxy::redirect::remove(&ns, &who)?;
    }
    Ok(())
}

/// Tells a node-proxy to serve (or stop serving) a pod, over its handoff socket.
pub fn hand(handoff: &Path, pod: &RunningPod, serve: bool) -> anyhow::Result<()> {
    let mut client = HandoffClient::connect(handoff)?;
    if serve {
        client
            .add(&pod.info(), pod.netns_file.as_fd(), None)
            .with_context(|| format!("handing pod {} to its node-proxy", pod.name()))
    } else {
        client
            .remove(&pod.state.uid)
            .with_context(|| format!("taking pod {} from its node-proxy", pod.name()))
    }
}

/// Starts a pod's process inside its namespace.
pub fn start_process(pod: &mut RunningPod, launch: &Launch) -> anyhow::Result<()> {
    let (out, err) = super::log_file(&pod.state.log)?;
    if pod.spec.command.is_empty() {
        bail!("pod {} has no command", pod.name());
    }
    let mut cmd = match pod.spec.waypoint.clone() {
        Some(gateway) => waypoint_command(pod, &gateway, launch)?,
        None => {
            let mut cmd = Command::new("ip");
            cmd.args(["netns", "exec", &pod.state.netns])
                .args(&pod.spec.command);
            cmd
        }
    };
    let child = cmd
        .env("PATH", &launch.path_env)
        .env("POD_NAME", &pod.state.name)
        .env("POD_NAMESPACE", &pod.state.namespace)
        .env("POD_IP", pod.state.ip.to_string())
        .env("NODE_NAME", &pod.state.node)
        .envs(pod.spec.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .with_context(|| format!("cannot start pod {}", pod.name()))?;
    pod.state.pid = child.id();
    pod.child = Some(child);
    Ok(())
}

/// What starting a pod's process needs from the sandbox.
#[derive(Debug, Clone)]
pub struct Launch {
    /// `PATH` for pod processes (weftctl first).
    pub path_env: String,
    /// The weftctl binary.
    pub exe: PathBuf,
    /// The controller's gRPC address.
    pub controller: std::net::SocketAddr,
    /// The name its certificate carries.
    pub controller_name: String,
    /// The mesh root it chains to.
    pub controller_ca: PathBuf,
    /// The controller's token directory.
    pub tokens: PathBuf,
    /// Admin addresses free for waypoint pods.
    pub waypoint_admin_ports: Vec<std::net::SocketAddr>,
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
        None => *launch.waypoint_admin_ports.first().with_context(|| {
            format!(
                "waypoint {gateway}: the sandbox runs at most {} waypoints",
                super::MAX_WAYPOINTS
            )
        })?,
    };
    pod.state.admin = Some(admin);
    let mut cmd = Command::new(super::role_exe(&launch.exe, super::WAYPOINT_BIN));
    cmd.args(["--gateway", gateway])
        .args(["--node", &pod.state.node])
        .args(["--pod-ip", &pod.state.ip.to_string()])
        .arg("--netns")
        .arg(Path::new("/run/netns").join(&pod.state.netns))
        .args(["--controller", &launch.controller.to_string()])
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

/// Removes a pod: its process, its namespace, its DNS files. The caller has taken it
/// from its node-proxy and removed its object.
pub fn destroy(pod: &mut RunningPod, addresses: &mut Addresses) {
    if let Some(c) = pod.child.as_mut() {
        super::stop_child(c, std::time::Duration::from_secs(2));
    }
    net::kill_netns_pids(&pod.state.netns);
    net::delete_netns(&pod.state.netns);
    let _ = std::fs::remove_dir_all(etc_dir(&pod.state.netns));
    addresses.free_pod(pod.state.ip);
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
) -> anyhow::Result<Vec<ServiceState>> {
    let ips = addresses.services(&cluster.services);
    let mut written = BTreeSet::new();
    let mut out = Vec::new();
    for s in &cluster.services {
        let name = ObjectName::new(&s.namespace, &s.name);
        let vip = ips.get(&name).copied().flatten();
        if let (None, Some(ip)) = (s.cluster_ip, vip) {
            writer.service(s, ip)?;
            written.insert(name.clone());
        }
        out.push(ServiceState {
            namespace: s.namespace.clone(),
            name: s.name.clone(),
            vip,
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
            ip: ip.parse().expect("literal"),
            enrolled: true,
            pid: 0,
            log: PathBuf::new(),
            admin: None,
        }
    }

    #[test]
    fn hosts_name_services_as_cluster_dns_does() {
        let services = [
            ServiceState {
                namespace: "demo".into(),
                name: "echo".into(),
                vip: Some("10.96.0.10".parse().expect("literal")),
            },
            ServiceState {
                namespace: "other".into(),
                name: "db".into(),
                vip: Some("10.96.0.11".parse().expect("literal")),
            },
            ServiceState {
                namespace: "demo".into(),
                name: "headless".into(),
                vip: None,
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
        assert!(!text.contains("headless"), "{text}");
    }

    #[test]
    fn addresses_are_reused_lowest_first_and_services_keep_theirs() {
        let mut a = Addresses::default();
        let (_, first) = a.pod();
        let (_, second) = a.pod();
        assert_eq!((first, second), (net::pod_ip(0), net::pod_ip(1)));
        a.free_pod(IpAddr::V4(first));
        assert_eq!(a.pod().1, first);
        let svc = |name: &str, ip: Option<&str>| ServiceSpec {
            name: name.into(),
            namespace: "demo".into(),
            cluster_ip: ip.map(|i| i.parse().expect("literal")),
            headless: false,
            object: Default::default(),
        };
        let given = a.services(&[svc("a", Some("10.96.0.10")), svc("b", None)]);
        let b = given[&ObjectName::new("demo", "b")];
        assert_eq!(
            b,
            Some(IpAddr::V4(net::service_ip(1))),
            "10.96.0.10 is taken"
        );
        let again = a.services(&[svc("b", None), svc("c", None)]);
        assert_eq!(
            again[&ObjectName::new("demo", "b")],
            b,
            "kept across changes"
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
