//! The end-to-end harness: runs `weftctl local up` on a manifest directory as a child
//! process, waits until the sandbox is ready, and drives it with real clients inside
//! pod network namespaces. Dropping a [`Sandbox`] stops it and removes every namespace
//! it created, also when a test fails.
//!
//! Tests need root (network namespaces) and the built `weftctl` binary next to the test
//! executable's directory (`cargo build --workspace --bins` first; `.ci/run` does).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::Value;

pub mod bench;

/// Whether the tests run as root (they need it for network namespaces).
pub fn is_root() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let root = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .and_then(|l| l.split_whitespace().nth(2))
        == Some("0");
    root
}

/// The `weftctl` binary built alongside the tests.
pub fn weftctl() -> anyhow::Result<PathBuf> {
    // Tests run from target/<profile>/deps, binaries from target/<profile>.
    let exe = std::env::current_exe()?;
    let dir = exe.parent().context("unexpected executable location")?;
    for candidate in [dir.join("weftctl"), dir.join("../weftctl")] {
        if candidate.exists() {
            return Ok(candidate);
        }
    }
    bail!(
        "weftctl is missing next to {}: run `cargo build --workspace --bins` (same profile) first",
        exe.display()
    )
}

/// The Gateway API CRDs the sandboxes install: v1.6.1's experimental channel, from
/// `shared/gateway-api` beside the repository.
pub fn gateway_api_crds() -> anyhow::Result<PathBuf> {
    let dir = repo_root().join("../shared/gateway-api/v1.6.1/experimental");
    anyhow::ensure!(
        dir.is_dir(),
        "{}: the Gateway API CRDs are read from shared/gateway-api beside the repository",
        dir.display()
    );
    Ok(dir)
}

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A running sandbox.
pub struct Sandbox {
    /// Its name.
    pub name: String,
    /// Its state directory.
    pub state_dir: PathBuf,
    child: Option<Child>,
    /// Its `state.json`, as read when it became ready.
    pub state: Value,
}

static NEXT_PORT: AtomicU16 = AtomicU16::new(0);

impl Sandbox {
    /// Starts a sandbox named `name` from `manifests`, waiting up to 90 s for it.
    pub fn up(name: &str, manifests: &Path) -> anyhow::Result<Self> {
        Self::up_with(name, manifests, &[])
    }

    /// As [`up`](Self::up), with more `weftctl local up` flags.
    pub fn up_with(name: &str, manifests: &Path, extra: &[&str]) -> anyhow::Result<Self> {
        Self::up_with_env(name, manifests, extra, &[])
    }

    /// As [`up_with`](Self::up_with), with environment variables for the sandbox and
    /// every process it starts (the components read their flags' `WEFT_*` variables).
    pub fn up_with_env(
        name: &str,
        manifests: &Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        let state_dir = PathBuf::from("/run/weft/e2e").join(name);
        // A leftover from a killed run would block the name.
        let _ = Command::new(weftctl()?)
            .args(["local", "down", "--name", name, "--state-dir"])
            .arg(&state_dir)
            .output();
        let _ = std::fs::remove_dir_all(&state_dir);
        std::fs::create_dir_all(&state_dir)?;
        // Distinct admin ports per sandbox so tests can run side by side. Node-proxies
        // take base, base + 1, ...; the controller base + 12 and + 14; waypoints + 15 on.
        // All below the kernel's ephemeral range (32768 on), where a client's source
        // port could take one first.
        let slot = (NEXT_PORT.fetch_add(1, Ordering::Relaxed)
            + (std::process::id() % 100) as u16 * 10)
            % 800;
        let base = 16000 + 20 * slot;
        let log = std::fs::File::create(state_dir.with_extension("log"))?;
        // The sandbox's API server with the newest Gateway API release's CRDs (the
        // experimental channel: the test manifests use route retries), as a cluster has.
        let crds = gateway_api_crds()?;
        let child = Command::new(weftctl()?)
            .args(["local", "up"])
            .arg(manifests)
            .arg("--gateway-api-crds")
            .arg(&crds)
            .args([
                "--name",
                name,
                "--summary-every",
                "0",
                "--admin-base-port",
                &base.to_string(),
            ])
            .arg("--state-dir")
            .arg(&state_dir)
            .args(extra)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("cannot start weftctl local up")?;
        let mut sandbox = Sandbox {
            name: name.to_owned(),
            state_dir: state_dir.clone(),
            child: Some(child),
            state: Value::Null,
        };
        let start = Instant::now();
        loop {
            if let Ok(text) = std::fs::read_to_string(state_dir.join("state.json")) {
                if let Ok(v) = serde_json::from_str::<Value>(&text) {
                    if v["ready"] == Value::Bool(true) {
                        sandbox.state = v;
                        break;
                    }
                }
            }
            if let Some(status) = sandbox
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!(
                    "weftctl local up exited ({status}):\n{}",
                    std::fs::read_to_string(state_dir.with_extension("log")).unwrap_or_default()
                );
            }
            if start.elapsed() > Duration::from_secs(90) {
                bail!("sandbox {name} not ready after 90 s");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        sandbox.wait_ready()?;
        Ok(sandbox)
    }

    /// Waits until every node-proxy reports ready.
    pub fn wait_ready(&self) -> anyhow::Result<()> {
        for node in self.nodes() {
            let start = Instant::now();
            while http_get(self.admin(&node)?, "/ready").map(|(s, _)| s).ok() != Some(200) {
                if start.elapsed() > Duration::from_secs(30) {
                    bail!("node-proxy of {node} not ready");
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        Ok(())
    }

    /// Re-reads `state.json` (it changes when a node-proxy is restarted).
    pub fn refresh(&mut self) -> anyhow::Result<()> {
        self.state =
            serde_json::from_str(&std::fs::read_to_string(self.state_dir.join("state.json"))?)?;
        Ok(())
    }

    fn pod(&self, pod: &str) -> anyhow::Result<&Value> {
        named(&self.state["pods"], pod)
            .with_context(|| format!("no pod {pod} in sandbox {}", self.name))
    }

    /// A pod's IP.
    pub fn ip(&self, pod: &str) -> anyhow::Result<String> {
        Ok(self.pod(pod)?["ip"].as_str().unwrap_or_default().to_owned())
    }

    /// A pod's IPv6 address (on a dual-stack or IPv6-only sandbox).
    pub fn ip6(&self, pod: &str) -> anyhow::Result<String> {
        let p = self.pod(pod)?;
        std::iter::once(&p["ip"])
            .chain(p["ips"].as_array().into_iter().flatten())
            .filter_map(Value::as_str)
            .find(|ip| ip.contains(':'))
            .map(str::to_owned)
            .with_context(|| format!("pod {pod} has no IPv6 address: {p}"))
    }

    /// A service's virtual IPs, the primary first.
    pub fn vips(&self, service: &str) -> anyhow::Result<Vec<String>> {
        let s = named(&self.state["services"], service)
            .with_context(|| format!("no service {service} in sandbox {}", self.name))?;
        let all: Vec<String> = match s["vips"].as_array() {
            Some(vips) => vips
                .iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect(),
            None => s["vip"].as_str().map(str::to_owned).into_iter().collect(),
        };
        Ok(all)
    }

    /// A pod's network namespace name.
    pub fn netns(&self, pod: &str) -> anyhow::Result<String> {
        Ok(self.pod(pod)?["netns"]
            .as_str()
            .unwrap_or_default()
            .to_owned())
    }

    /// A pod's log (its process's stdout and stderr).
    pub fn log(&self, pod: &str) -> anyhow::Result<String> {
        let path = self.pod(pod)?["log"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        Ok(std::fs::read_to_string(path).unwrap_or_default())
    }

    /// A node's network namespace (its agent and kubelet are there).
    pub fn node_netns(&self, node: &str) -> anyhow::Result<String> {
        let n = self.state["nodes"]
            .as_array()
            .and_then(|ns| ns.iter().find(|n| n["name"] == node))
            .with_context(|| format!("no node {node}"))?;
        Ok(n["netns"].as_str().unwrap_or_default().to_owned())
    }

    /// `GET path` from a node agent's admin endpoint (in its node's namespace): the body,
    /// `None` if it does not answer.
    pub fn agent_get(&self, node: &str, path: &str) -> Option<String> {
        let ns = self.node_netns(node).ok()?;
        let out = Command::new("ip")
            .args(["netns", "exec", &ns, "curl", "-sf", "--max-time", "2"])
            .arg(format!("http://127.0.0.1:15022{path}"))
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// A node agent's view of its pods (`/pods`).
    pub fn agent_pods(&self, node: &str) -> Option<Value> {
        serde_json::from_str(&self.agent_get(node, "/pods")?).ok()
    }

    /// The node agent's PID (0 while stopped).
    pub fn agent_pid(&self, node: &str) -> i32 {
        self.state["nodes"]
            .as_array()
            .and_then(|ns| ns.iter().find(|n| n["name"] == node))
            .and_then(|n| n["agent"]["pid"].as_i64())
            .unwrap_or_default() as i32
    }

    /// The capture rules in a pod, as `weftctl local rules` prints them.
    pub fn rules(&self, pod: &str) -> anyhow::Result<String> {
        let out = self.local(&["rules", pod])?.output()?;
        if !out.status.success() {
            bail!(
                "weftctl local rules {pod}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// A node-proxy's log.
    pub fn node_log(&self, node: &str) -> String {
        std::fs::read_to_string(
            self.state_dir
                .join("logs")
                .join(format!("node-proxy_{node}.log")),
        )
        .unwrap_or_default()
    }

    /// The node names.
    pub fn nodes(&self) -> Vec<String> {
        self.state["nodes"]
            .as_array()
            .map(|ns| {
                ns.iter()
                    .filter_map(|n| n["name"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// A node-proxy's admin address.
    pub fn admin(&self, node: &str) -> anyhow::Result<SocketAddr> {
        let n = self.state["nodes"]
            .as_array()
            .and_then(|ns| ns.iter().find(|n| n["name"] == node))
            .with_context(|| format!("no node {node}"))?;
        Ok(n["admin"].as_str().unwrap_or_default().parse()?)
    }

    /// The controller's admin address.
    pub fn controller_admin(&self) -> anyhow::Result<SocketAddr> {
        Ok(self.state["controller"]["admin"]
            .as_str()
            .unwrap_or_default()
            .parse()?)
    }

    /// Every controller replica as the sandbox runs it: (admin address, PID).
    pub fn controller_replicas(&self) -> Vec<(SocketAddr, i32)> {
        std::iter::once(&self.state["controller"])
            .chain(self.state["replicas"].as_array().into_iter().flatten())
            .map(|c| {
                (
                    c["admin"]
                        .as_str()
                        .unwrap_or_default()
                        .parse()
                        .unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0))),
                    c["pid"].as_i64().unwrap_or_default() as i32,
                )
            })
            .collect()
    }

    /// The controller's PID (0 while stopped).
    pub fn controller_pid(&self) -> i32 {
        self.state["controller"]["pid"].as_i64().unwrap_or_default() as i32
    }

    /// The controller's `/metrics`.
    pub fn controller_metrics(&self) -> anyhow::Result<String> {
        Ok(http_get(self.controller_admin()?, "/metrics")?.1)
    }

    /// A node-proxy's PID.
    pub fn node_pid(&self, node: &str) -> anyhow::Result<i32> {
        let n = self.state["nodes"]
            .as_array()
            .and_then(|ns| ns.iter().find(|n| n["name"] == node))
            .with_context(|| format!("no node {node}"))?;
        Ok(n["pid"].as_i64().unwrap_or_default() as i32)
    }

    /// A node-proxy's `/metrics`.
    pub fn metrics(&self, node: &str) -> anyhow::Result<String> {
        Ok(http_get(self.admin(node)?, "/metrics")?.1)
    }

    /// A pod's process ID.
    pub fn pid(&self, pod: &str) -> anyhow::Result<i32> {
        self.pod(pod)?["pid"]
            .as_i64()
            .and_then(|p| i32::try_from(p).ok())
            .with_context(|| format!("pod {pod} has no process"))
    }

    /// A waypoint pod's `/metrics`.
    pub fn waypoint_metrics(&self, pod: &str) -> anyhow::Result<String> {
        let admin: SocketAddr = self.pod(pod)?["admin"]
            .as_str()
            .with_context(|| format!("pod {pod} is not a waypoint"))?
            .parse()?;
        Ok(http_get(admin, "/metrics")?.1)
    }

    /// The pods of waypoint `gateway` (`namespace/name`), `namespace/<name>-<i>`.
    pub fn waypoint_pods(&self, gateway: &str) -> Vec<String> {
        let (namespace, name) = gateway.split_once('/').unwrap_or(("", gateway));
        let prefix = format!("{name}-");
        self.state["pods"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|p| p["namespace"] == namespace && p["admin"].is_string())
            .filter_map(|p| p["name"].as_str())
            .filter(|n| {
                n.strip_prefix(&prefix)
                    .is_some_and(|i| i.parse::<u32>().is_ok())
            })
            .map(|n| format!("{namespace}/{n}"))
            .collect()
    }

    /// The `/metrics` of every pod of waypoint `gateway`, one after the other: a
    /// [`metric_sum`] over it sums the replicas. Pods that do not answer are left out.
    pub fn gateway_metrics(&self, gateway: &str) -> String {
        self.waypoint_pods(gateway)
            .iter()
            .filter_map(|pod| self.waypoint_metrics(pod).ok())
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// `h2load` from a pod (`args` after the program name); its summary lines.
    pub fn h2load(&self, pod: &str, args: &[&str]) -> anyhow::Result<H2load> {
        let mut all = vec!["h2load"];
        all.extend_from_slice(args);
        let out = self.exec(pod, &all)?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let count = |line: &str, what: &str| -> u64 {
            text.lines()
                .find(|l| l.starts_with(line))
                .and_then(|l| {
                    l.split(',')
                        .find(|part| part.trim_end().ends_with(what))
                        .and_then(|p| p.split_whitespace().rev().nth(1))
                        .and_then(|n| n.parse().ok())
                })
                .unwrap_or(0)
        };
        Ok(H2load {
            succeeded: count("requests:", "succeeded"),
            failed: count("requests:", "failed"),
            status_2xx: count("status codes:", "2xx"),
            status_4xx: count("status codes:", "4xx"),
            status_5xx: count("status codes:", "5xx"),
            text,
        })
    }

    /// Runs a command inside a pod's network namespace.
    pub fn exec(&self, pod: &str, args: &[&str]) -> anyhow::Result<Output> {
        let ns = self.netns(pod)?;
        Command::new("ip")
            .args(["netns", "exec", &ns])
            .args(args)
            .output()
            .with_context(|| format!("ip netns exec {ns} {args:?}"))
    }

    /// A thread inside a pod's network namespace, for the test's own sockets there.
    pub fn enter(&self, pod: &str) -> anyhow::Result<runtime::netns::Netns> {
        let path = format!("/run/netns/{}", self.netns(pod)?);
        let fd = std::fs::File::open(&path).with_context(|| format!("open {path}"))?;
        Ok(runtime::netns::Netns::enter(fd.into(), pod)?)
    }

    /// Starts a command inside a pod's network namespace, in the background.
    pub fn spawn(&self, pod: &str, args: &[&str]) -> anyhow::Result<std::process::Child> {
        let ns = self.netns(pod)?;
        Command::new("ip")
            .args(["netns", "exec", &ns])
            .args(args)
            .spawn()
            .with_context(|| format!("ip netns exec {ns} {args:?}"))
    }

    /// `weftctl local <args> --name <this sandbox> --state-dir <its state>`, to run.
    pub fn local(&self, args: &[&str]) -> anyhow::Result<Command> {
        let mut cmd = Command::new(weftctl()?);
        cmd.arg("local")
            .args(args)
            .args(["--name", &self.name, "--state-dir"])
            .arg(&self.state_dir);
        Ok(cmd)
    }

    /// Runs `weftctl local ARGS` on this sandbox; fails with its stderr unless it
    /// succeeds, else returns its stdout.
    pub fn run_local(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = self.local(args)?.output()?;
        if !out.status.success() {
            bail!(
                "weftctl local {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `curl` from a pod; returns (exit code, body).
    pub fn curl(&self, pod: &str, url: &str) -> anyhow::Result<(i32, String)> {
        // -g: an IPv6 literal's brackets are the address, not a URL pattern.
        let out = self.exec(pod, &["curl", "-sSg", "--max-time", "5", url])?;
        Ok((
            out.status.code().unwrap_or(-1),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        ))
    }

    /// Stops the sandbox (SIGTERM, as Ctrl-C) and waits for its cleanup.
    pub fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(child.id().to_string())
                .status();
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(30) {
                if child.try_wait()?.is_some() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        // Belt and braces: whatever the supervisor left.
        let _ = Command::new(weftctl()?)
            .args(["local", "down", "--name", &self.name, "--state-dir"])
            .arg(&self.state_dir)
            .output();
        Ok(())
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// A copy of a manifest directory that a test may edit, removed on drop.
pub struct TempManifests(PathBuf);

impl TempManifests {
    /// Copies the YAML files of `from`.
    pub fn copy(from: &Path) -> anyhow::Result<Self> {
        static NEXT: AtomicU16 = AtomicU16::new(0);
        let dir = std::env::temp_dir().join(format!(
            "weft-e2e-manifests-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        for entry in std::fs::read_dir(from)? {
            let path = entry?.path();
            if let Some(name) = path.file_name() {
                std::fs::copy(&path, dir.join(name))?;
            }
        }
        Ok(TempManifests(dir))
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.0
    }

    /// Writes (replaces) a file atomically, as an editor saving it would.
    pub fn write(&self, name: &str, text: &str) -> std::io::Result<()> {
        let tmp = self.0.join(format!(".{name}.swp"));
        std::fs::write(&tmp, text)?;
        std::fs::rename(tmp, self.0.join(name))
    }
}

impl Drop for TempManifests {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What an `h2load` run reported.
#[derive(Debug, Clone)]
pub struct H2load {
    /// Requests that got a response.
    pub succeeded: u64,
    /// Requests that did not.
    pub failed: u64,
    /// Responses by class.
    pub status_2xx: u64,
    /// 4xx responses.
    pub status_4xx: u64,
    /// 5xx responses.
    pub status_5xx: u64,
    /// Its whole output.
    pub text: String,
}

/// `GET path` over HTTP/1.0; returns (status, body).
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// The sum of a metric's samples whose labels contain every `key="value"` in `labels`.
pub fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with('{'))
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
        .sum()
}

impl Sandbox {
    /// The inbound mTLS connections `node`'s node-proxy counted from `principal` to
    /// `workload`.
    pub fn inbound_mtls(&self, node: &str, principal: &str, workload: &str) -> f64 {
        metric_sum(
            &self.metrics(node).unwrap_or_default(),
            "weft_tcp_connections_opened_total",
            &[
                ("direction", "inbound"),
                ("source_principal", principal),
                ("destination_workload", workload),
                ("connection_security_policy", "mutual_tls"),
            ],
        )
    }
}

/// The object of `list` (a `state.json` array) called `name` (`namespace/name`).
fn named<'a>(list: &'a Value, name: &str) -> Option<&'a Value> {
    list.as_array()?.iter().find(|o| {
        format!(
            "{}/{}",
            o["namespace"].as_str().unwrap_or(""),
            o["name"].as_str().unwrap_or("")
        ) == name
    })
}

/// An AuthorizationPolicy denying `shop/client` (of the mesh manifests) any connection
/// to `shop/echo`.
pub const DENY_CLIENT: &str = "apiVersion: weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: deny-client, namespace: shop}
spec:
  selector: {matchLabels: {app: echo}}
  action: DENY
  rules: [{from: [{principals: [\"cluster.local/ns/shop/sa/client\"]}]}]
";

/// Starts tcpdump on the sandbox fabric's bridge, writing what `filter` matches to `pcap`,
/// and returns once it records. tcpdump lets nothing in until its filter is attached, so
/// `warm_up` (a request that must not open what the test watches, e.g. plaintext to a
/// pod outside the mesh) is repeated until the capture file grows past its header.
pub fn capture_fabric(
    sb: &Sandbox,
    filter: &str,
    pcap: &Path,
    mut warm_up: impl FnMut(),
) -> anyhow::Result<Tcpdump> {
    let fabric = sb.state["fabric"].as_str().unwrap_or_default().to_owned();
    let tcpdump = Tcpdump::start(&fabric, "br0", filter, pcap)?;
    eventually(Duration::from_secs(20), || {
        warm_up();
        std::fs::metadata(pcap).ok().filter(|m| m.len() > 24)
    })
    .context("tcpdump captures nothing")?;
    Ok(tcpdump)
}

/// The TLS ServerHellos of `pcap`, port 15008 decoded as TLS, as tshark prints `fields`
/// of them: one line per hello, the fields tab-separated.
pub fn server_hellos(pcap: &Path, fields: &[&str]) -> anyhow::Result<String> {
    let mut cmd = Command::new("tshark");
    cmd.arg("-r")
        .arg(pcap)
        .args(["-d", "tcp.port==15008,tls", "-Y", "tls.handshake.type == 2"])
        .args(["-T", "fields"]);
    for field in fields {
        cmd.args(["-e", field]);
    }
    let out = cmd
        .output()
        .context("cannot run tshark (.ci/run installs it)")?;
    if !out.status.success() {
        bail!("tshark failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// tcpdump writing the packets `filter` matches on interface `iface` of namespace `netns`
/// to `pcap`, until stopped (or dropped).
pub struct Tcpdump(Option<Child>);

impl Tcpdump {
    /// Starts it and waits until it says it listens.
    pub fn start(netns: &str, iface: &str, filter: &str, pcap: &Path) -> anyhow::Result<Self> {
        let mut child = Command::new("ip")
            .args([
                "netns",
                "exec",
                netns,
                "tcpdump",
                "--immediate-mode",
                "-i",
                iface,
            ])
            .args(["-U", "-s", "0", "-w"])
            .arg(pcap)
            .arg(filter)
            .stderr(Stdio::piped())
            .spawn()
            .context("cannot run tcpdump (.ci/run installs it)")?;
        let mut line = String::new();
        if let Some(stderr) = child.stderr.take() {
            std::io::BufRead::read_line(&mut std::io::BufReader::new(stderr), &mut line)?;
        }
        let dump = Tcpdump(Some(child));
        if !line.contains("listening on") {
            bail!("tcpdump in {netns} did not start: {line}");
        }
        Ok(dump)
    }

    /// Stops it (SIGINT: it writes out what it holds), after a moment for packets in
    /// flight.
    pub fn stop(mut self) {
        self.end();
    }

    fn end(&mut self) {
        if let Some(mut child) = self.0.take() {
            std::thread::sleep(Duration::from_millis(300));
            let _ = Command::new("kill")
                .arg("-INT")
                .arg(child.id().to_string())
                .status();
            let _ = child.wait();
        }
    }
}

impl Drop for Tcpdump {
    fn drop(&mut self) {
        self.end();
    }
}

/// Retries `f` every 100 ms until it returns `Some`, for up to `limit`.
pub fn eventually<T>(limit: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if start.elapsed() > limit {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// One request of a [`Load`].
#[derive(Debug, Clone)]
pub struct Request {
    /// When it was started.
    pub start: Instant,
    /// When it ended.
    pub end: Instant,
    /// It was answered 200.
    pub ok: bool,
    /// The status and curl's error, if any.
    pub why: String,
}

/// A load loop: `curl` from a pod to a URL, one request per connection, every
/// `interval`, until stopped (or `limit` passed), recording every outcome.
pub struct Load {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<Vec<Request>>>,
}

impl Load {
    /// Starts the loop in `netns`; bounded by `limit` in any case.
    pub fn start(netns: &str, url: &str, interval: Duration, limit: Duration) -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (netns, url, flag) = (netns.to_owned(), url.to_owned(), stop.clone());
        let thread = std::thread::spawn(move || {
            let started = Instant::now();
            let mut results = Vec::new();
            while !flag.load(Ordering::Relaxed)
                && started.elapsed() < limit
                && results.len() < 100_000
            {
                let start = Instant::now();
                let out = Command::new("ip")
                    .args([
                        "netns",
                        "exec",
                        &netns,
                        "curl",
                        "-sS",
                        "-o",
                        "/dev/null",
                        "-w",
                        "%{http_code}",
                        "--max-time",
                        "5",
                        &url,
                    ])
                    .output();
                let (ok, why) = match out {
                    Ok(o) => {
                        let code = String::from_utf8_lossy(&o.stdout).into_owned();
                        (
                            o.status.success() && code == "200",
                            format!("{code} {}", String::from_utf8_lossy(&o.stderr).trim()),
                        )
                    }
                    Err(e) => (false, e.to_string()),
                };
                results.push(Request {
                    start,
                    end: Instant::now(),
                    ok,
                    why,
                });
                std::thread::sleep(interval);
            }
            results
        });
        Load {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops the loop: (requests, the failed ones with why).
    pub fn stop(self) -> (usize, Vec<String>) {
        let results = self.stop_timed();
        let failed = results
            .iter()
            .filter(|r| !r.ok)
            .map(|r| r.why.clone())
            .collect();
        (results.len(), failed)
    }

    /// Stops the loop: every request, in order.
    pub fn stop_timed(mut self) -> Vec<Request> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default()
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A process's resident memory (bytes) and open descriptors; zeros once it is gone.
pub fn usage(pid: i32) -> (u64, usize) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap_or_default()
        * 1024;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count());
    (rss, fds)
}
