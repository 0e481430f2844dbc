//! The node side end to end: the node agent owns each node's enrolled pods, as on a real
//! node. The sandbox plays only Kubernetes and the container runtime: its runtime runs
//! the CNI chain (bridge + host-local, then weft-cni) for each pod, its kubelet probes
//! from the node and restarts what dies; capture, enrollment and handing pods to
//! node-proxy are the agent's.
//!
//! ```text
//!  node-1: client-1, echo-1, waypoint-0, intruder, outsider (legacy)
//!  node-2: client-2, echo-2, secrets (vault: strict, ALLOW shop/client), outsider-2
//!  shop/echo: L4 to echo-1, echo-2       shop/web: the same pods through the waypoint
//! ```

#![allow(clippy::unwrap_used)] // a test fails by panicking

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use weft_e2e::{
    eventually, http_get, metric_sum, repo_root, Load, Request, Sandbox, Tcpdump, TempManifests,
};

fn manifests() -> PathBuf {
    repo_root().join("tests/manifests/node")
}

/// The pods the node agents capture.
const ENROLLED: &[&str] = &[
    "shop/client-1",
    "shop/client-2",
    "shop/echo-1",
    "shop/echo-2",
    "shop/intruder",
    "vault/secrets",
];

/// Each pod's UID and process, from `state.json`.
fn pods(sb: &Sandbox) -> BTreeMap<String, (String, i64)> {
    sb.state["pods"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                format!(
                    "{}/{}",
                    p["namespace"].as_str().unwrap(),
                    p["name"].as_str().unwrap()
                ),
                (
                    p["uid"].as_str().unwrap().to_owned(),
                    p["pid"].as_i64().unwrap(),
                ),
            )
        })
        .collect()
}

/// The capture rules of every enrolled pod.
fn rules(sb: &Sandbox) -> BTreeMap<&'static str, String> {
    ENROLLED
        .iter()
        .map(|p| (*p, sb.rules(p).unwrap()))
        .collect()
}

/// The UIDs node-proxy of `node` serves, sorted.
fn served(sb: &Sandbox, node: &str) -> Vec<String> {
    let (_, dump) = http_get(sb.admin(node).unwrap(), "/config_dump").unwrap();
    let dump: Value = serde_json::from_str(&dump).unwrap();
    let mut uids: Vec<String> = dump["pods"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["uid"].as_str().unwrap().to_owned())
        .collect();
    uids.sort();
    uids
}

/// Request loops from a client on each node, to an L4 service and through the waypoint.
fn loads(sb: &Sandbox) -> Vec<(String, Load)> {
    let mut loads = Vec::new();
    for client in ["shop/client-1", "shop/client-2"] {
        for url in ["http://echo/", "http://web/"] {
            // Every loop answers before the measurement starts.
            let ok = eventually(Duration::from_secs(20), || {
                let out = sb
                    .exec(
                        client,
                        &["curl", "-sf", "-o", "/dev/null", "--max-time", "5", url],
                    )
                    .ok()?;
                out.status.success().then_some(())
            });
            assert!(ok.is_some(), "{client} -> {url} answers");
            let netns = sb.netns(client).unwrap();
            let load = Load::start(
                &netns,
                url,
                Duration::from_millis(20),
                Duration::from_secs(90),
            );
            loads.push((format!("{client} -> {url}"), load));
        }
    }
    loads
}

/// Waits until process `pid` has died (a zombie, or gone): its sockets are closed then.
fn wait_dead(pid: i32) -> Instant {
    let dead = eventually(Duration::from_secs(10), || {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let state = stat.rsplit(')').next().unwrap_or("").trim_start();
        (stat.is_empty() || state.starts_with('Z')).then(Instant::now)
    });
    dead.expect("the killed process dies")
}

fn kill(pid: i32) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
}

#[test]
#[ignore = "needs root"]
fn node_proxy_killed_loses_only_the_connections_in_flight() {
    let mut sb = Sandbox::up("e2e-np-kill", &manifests()).unwrap();
    let (pods_before, rules_before) = (pods(&sb), rules(&sb));
    let served_before = served(&sb, "node-1");
    assert_eq!(served_before.len(), 3, "client-1, echo-1, intruder");
    let loads = loads(&sb);
    std::thread::sleep(Duration::from_secs(2));

    let old = sb.node_pid("node-1").unwrap();
    let killed = Instant::now();
    kill(old);
    let gone = wait_dead(old);
    // The sandbox's kubelet restarts it; it is up once it answers as ready.
    let admin = sb.admin("node-1").unwrap();
    let up = eventually(Duration::from_secs(30), || {
        sb.refresh().ok()?;
        let pid = sb.node_pid("node-1").ok()?;
        (pid != old && http_get(admin, "/ready").ok()?.0 == 200).then(Instant::now)
    })
    .expect("a new node-proxy comes up");
    std::thread::sleep(Duration::from_secs(3));

    let mut in_flight = 0;
    for (name, load) in loads {
        let requests: Vec<Request> = load.stop_timed();
        let failed: Vec<&Request> = requests.iter().filter(|r| !r.ok).collect();
        for f in &failed {
            assert!(
                f.start < gone,
                "{name}: a request started {} ms after node-proxy died failed: {}",
                f.start.duration_since(gone).as_millis(),
                f.why
            );
        }
        in_flight += failed.len();
        // The first connection opened once the new node-proxy is up is answered, within
        // 2 s of it being up.
        let first = requests
            .iter()
            .find(|r| r.start >= up)
            .unwrap_or_else(|| panic!("{name}: no request after the restart"));
        assert!(first.ok, "{name}: {}", first.why);
        let recovered = first.end.duration_since(up);
        assert!(
            recovered <= Duration::from_secs(2),
            "{name}: answered {} ms after node-proxy was up",
            recovered.as_millis()
        );
        // Requests open across the outage that succeeded waited in a listener's queue.
        let waited = requests
            .iter()
            .filter(|r| r.ok && r.start < up && r.end > killed)
            .map(|r| r.end.duration_since(r.start))
            .max()
            .unwrap_or_default();
        eprintln!(
            "{name}: {} requests, {} failed (in flight at the kill); the longest answered across the outage took {} ms",
            requests.len(),
            failed.len(),
            waited.as_millis()
        );
    }
    eprintln!(
        "node-proxy down for {} ms (killed to ready); {in_flight} requests in flight at the kill failed",
        up.duration_since(killed).as_millis()
    );
    sb.refresh().unwrap();
    assert_eq!(pods(&sb), pods_before, "no pod was recreated");
    assert_eq!(rules(&sb), rules_before, "the capture rules are the same");
    assert_eq!(
        served(&sb, "node-1"),
        served_before,
        "node-proxy serves the same pods"
    );
}

#[test]
#[ignore = "needs root"]
fn node_agent_killed_fails_no_request_and_readopts_every_pod() {
    let mut sb = Sandbox::up("e2e-agent-kill", &manifests()).unwrap();
    let (pods_before, rules_before) = (pods(&sb), rules(&sb));
    let (served_before, agent_before) = (served(&sb, "node-1"), sb.agent_pods("node-1").unwrap());
    let held = |v: &Value| -> Vec<(String, bool, bool, bool)> {
        v["pods"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                (
                    p["name"].as_str().unwrap().to_owned(),
                    p["rules"] == true,
                    p["served"] == true,
                    p["listeners"] == true,
                )
            })
            .collect()
    };
    let captured = |v: &Value| held(v).iter().all(|(_, r, s, l)| *r && *s && *l);
    assert!(captured(&agent_before), "{agent_before}");
    let loads = loads(&sb);
    std::thread::sleep(Duration::from_secs(1));

    let old = sb.agent_pid("node-1");
    kill(old);
    wait_dead(old);
    // Restarted by the sandbox's kubelet; it finds the pods under /proc, takes their
    // listeners back from node-proxy and replays them to it.
    let after = eventually(Duration::from_secs(30), || {
        sb.refresh().ok()?;
        let pid = sb.agent_pid("node-1");
        let pods = sb.agent_pods("node-1")?;
        (pid != old && pid != 0 && pods["nodeProxy"] == true && pods["replays"] == 1)
            .then_some(pods)
    })
    .expect("the agent is back and has replayed its pods");
    std::thread::sleep(Duration::from_secs(2));
    for (name, load) in loads {
        let (requests, failed) = load.stop();
        assert!(
            failed.is_empty(),
            "{name}: {} of {requests} failed: {failed:?}",
            failed.len()
        );
        eprintln!("{name}: {requests} requests, none failed");
    }
    assert_eq!(
        held(&after),
        held(&agent_before),
        "every pod re-adopted: {after}"
    );
    assert!(
        captured(&after),
        "with its rules, node-proxy and listeners: {after}"
    );
    sb.refresh().unwrap();
    assert_eq!(pods(&sb), pods_before, "no pod was recreated");
    let rules_after = rules(&sb);
    assert_eq!(
        rules_after, rules_before,
        "nothing reinstalled or duplicated"
    );
    for (pod, text) in &rules_after {
        // One reply rule per family (the dump lists IPv4's, then IPv6's).
        let (v4, v6) = text.split_once("# ip -6 rule").unwrap();
        for family in [v4, v6] {
            assert_eq!(
                family.matches("fwmark 0x53a lookup 100").count(),
                1,
                "{pod}: {text}"
            );
        }
        assert_eq!(text.matches("chain output").count(), 1, "{pod}: {text}");
    }
    assert_eq!(
        served(&sb, "node-1"),
        served_before,
        "node-proxy's pods are the same"
    );
    let log = std::fs::read_to_string(sb.state_dir.join("logs/node-proxy_node-1.log")).unwrap();
    assert_eq!(
        log.matches("pod added").count(),
        served_before.len(),
        "node-proxy added each pod once, before the agent's restart:\n{log}"
    );
}

/// Whether `text` crossed the fabric in the clear in `pcap`.
fn on_the_wire(pcap: &std::path::Path, text: &str) -> bool {
    let bytes = std::fs::read(pcap).unwrap_or_default();
    bytes.windows(text.len()).any(|w| w == text.as_bytes())
}

/// TCP segments to `port` in `pcap`.
fn segments_to(pcap: &std::path::Path, port: u16) -> usize {
    let out = Command::new("tcpdump")
        .args(["-nn", "-r"])
        .arg(pcap)
        .arg(format!("tcp dst port {port}"))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).lines().count()
}

/// An application of the test's own in `pod`: it echoes what each connection sends.
fn serve_echo(sb: &Sandbox, pod: &str, port: u16) {
    let listener = sb
        .enter(pod)
        .unwrap()
        .run_blocking(move || std::net::TcpListener::bind(("0.0.0.0", port)))
        .unwrap()
        .unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let Ok(mut from) = stream.try_clone() else {
                    return;
                };
                let mut to = stream;
                let _ = std::io::copy(&mut from, &mut to);
            });
        }
    });
}

/// A connection made from inside a pod and held open, as a client's pool holds one.
struct Held(std::net::TcpStream);

impl Held {
    fn open(sb: &Sandbox, pod: &str, to: std::net::SocketAddr) -> anyhow::Result<Held> {
        let stream = sb.enter(pod)?.run_blocking(move || {
            std::net::TcpStream::connect_timeout(&to, Duration::from_secs(5))
        })??;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        Ok(Held(stream))
    }

    /// Sends `text` to the echo at the other end and reads it back.
    fn echo(&mut self, text: &str) -> anyhow::Result<()> {
        use std::io::{Read, Write};
        self.0.write_all(text.as_bytes())?;
        let mut back = vec![0; text.len()];
        self.0.read_exact(&mut back)?;
        anyhow::ensure!(back == text.as_bytes(), "echoed {back:?}");
        Ok(())
    }
}

/// Labels the `legacy` namespace `weft.dev/mesh=enabled` in `manifests`, as `kubectl
/// label` would put it on the object; returns the file as it was, to unlabel it.
fn label_legacy(manifests: &TempManifests) -> String {
    let namespaces = std::fs::read_to_string(manifests.path().join("00-namespaces.yaml")).unwrap();
    let labelled = namespaces.replace(
        "metadata:\n  name: legacy\n",
        "metadata:\n  name: legacy\n  labels:\n    weft.dev/mesh: enabled\n",
    );
    assert_ne!(labelled, namespaces, "the test labels the legacy namespace");
    manifests.write("00-namespaces.yaml", &labelled).unwrap();
    namespaces
}

#[test]
#[ignore = "needs root"]
fn labelling_a_running_namespace_moves_its_pods_to_mtls_and_unlabelling_back() {
    let manifests = TempManifests::copy(&manifests()).unwrap();
    let sb = Sandbox::up("e2e-label", manifests.path()).unwrap();
    let echo = sb.ip("shop/echo-2").unwrap();
    let from = "legacy/outsider";
    let url = |marker: &str| format!("http://{echo}:8080/{marker}");
    let mtls = || {
        let m = sb.metrics("node-2").unwrap_or_default();
        metric_sum(
            &m,
            "weft_tcp_connections_opened_total",
            &[
                ("direction", "inbound"),
                ("source_workload", "outsider"),
                ("destination_workload", "echo-2"),
                ("connection_security_policy", "mutual_tls"),
            ],
        )
    };
    let pcap = sb.state_dir.join("fabric.pcap");
    let fabric = sb.state["fabric"].as_str().unwrap().to_owned();
    let capture = Tcpdump::start(&fabric, "br0", "tcp", &pcap).unwrap();
    // Until the capture runs, nothing is seen: warm it up with plaintext requests.
    eventually(Duration::from_secs(20), || {
        let _ = sb.curl(from, &url("warm-up"));
        std::fs::metadata(&pcap).ok().filter(|m| m.len() > 24)
    })
    .expect("tcpdump captures");
    let (code, body) = sb.curl(from, &url("before-the-label")).unwrap();
    assert_eq!(code, 0, "{body}");
    assert_eq!(mtls(), 0.0, "outside the mesh, it talks plaintext");
    // A connection open across the label, both of its ends in the labelled namespace.
    serve_echo(&sb, "legacy/outsider-2", 9000);
    let to = format!("{}:9000", sb.ip("legacy/outsider-2").unwrap());
    let mut held = Held::open(&sb, from, to.parse().unwrap()).unwrap();
    held.echo("held-open").unwrap();

    let namespaces = label_legacy(&manifests);
    let object = sb.state_dir.join("cluster/namespace_legacy.yaml");
    let stored = eventually(Duration::from_secs(10), || {
        let text = std::fs::read_to_string(&object).ok()?;
        text.contains("weft.dev/mesh: enabled").then(Instant::now)
    })
    .expect("the API server holds the label");
    let first = eventually(Duration::from_secs(10), || {
        let _ = sb.curl(from, &url("after-the-label"));
        (mtls() >= 1.0).then(Instant::now)
    })
    .expect("new connections of the labelled namespace go over mTLS");
    let took = first.duration_since(stored);
    eprintln!(
        "labelling a namespace: its pod's first mTLS connection {} ms after the label was stored",
        took.as_millis()
    );
    assert!(took <= Duration::from_secs(1), "{} ms", took.as_millis());
    for _ in 0..3 {
        let (code, body) = sb
            .curl(from, &url("must-not-be-seen-in-the-clear"))
            .unwrap();
        assert_eq!(code, 0, "{body}");
    }
    assert!(sb.rules(from).unwrap().contains("redirect to :15001"));
    for pod in [from, "legacy/outsider-2"] {
        // Both passes of the capture are in: the open connections listed.
        eventually(Duration::from_secs(10), || {
            let rules = sb.rules(pod).ok()?;
            rules.contains("chain kept_open").then_some(())
        })
        .unwrap_or_else(|| panic!("{pod} is captured"));
    }
    // A connection the pods had open before keeps its path until it closes.
    let answer = held.echo("held-open-across-the-label");
    assert!(
        answer.is_ok(),
        "the connection open before the label: {answer:?}"
    );
    drop(held);

    // Unlabelled: plaintext again, and the rules are gone.
    manifests.write("00-namespaces.yaml", &namespaces).unwrap();
    let released = eventually(Duration::from_secs(10), || {
        let rules = sb.rules(from).ok()?;
        (!rules.contains("redirect to")).then_some(())
    });
    assert!(
        released.is_some(),
        "the rules are removed: {}",
        sb.rules(from).unwrap()
    );
    let before = mtls();
    let (code, body) = sb.curl(from, &url("after-the-unlabel")).unwrap();
    assert_eq!(code, 0, "{body}");
    assert_eq!(mtls(), before, "no mTLS connection after the unlabel");
    std::thread::sleep(Duration::from_millis(300));
    capture.stop();

    assert!(
        on_the_wire(&pcap, "before-the-label"),
        "plaintext before the label"
    );
    assert!(
        !on_the_wire(&pcap, "must-not-be-seen-in-the-clear"),
        "after the label, the request crossed the fabric encrypted"
    );
    assert!(segments_to(&pcap, 15008) > 0, "through HBONE, port 15008");
    assert!(
        on_the_wire(&pcap, "held-open-across-the-label"),
        "the connection open before the label went on as it was"
    );
    assert!(
        on_the_wire(&pcap, "after-the-unlabel"),
        "plaintext again after the unlabel"
    );
    let rule = sb.rules(from).unwrap();
    assert!(!rule.contains("fwmark 0x53a"), "{rule}");
}

#[test]
#[ignore = "needs root"]
fn probes_pass_in_a_strict_namespace_and_nothing_else_does() {
    let mut sb = Sandbox::up("e2e-probes", &manifests()).unwrap();
    let secrets = "vault/secrets";
    let ready = |sb: &mut Sandbox| {
        sb.refresh().unwrap();
        let p = sb.state["pods"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == "secrets")
            .cloned()
            .unwrap();
        (p["ready"] == true, p["restarts"].as_i64().unwrap())
    };
    eventually(Duration::from_secs(20), || (ready(&mut sb).0).then_some(()))
        .expect("the strict, policy-guarded pod becomes Ready");
    // It stays Ready, and alive: its liveness probe passes too.
    let since = Instant::now();
    while since.elapsed() < Duration::from_secs(30) {
        assert_eq!(ready(&mut sb), (true, 0), "Ready, never restarted");
        std::thread::sleep(Duration::from_secs(1));
    }
    let object =
        std::fs::read_to_string(sb.state_dir.join("cluster/pod_vault_secrets.yaml")).unwrap();
    assert!(object.contains("type: Ready"), "{object}");
    // The probes reached the application itself, from the probe address, past the mesh.
    let log = sb.log(secrets).unwrap();
    assert!(
        log.lines()
            .any(|l| l.contains("client=169.254.7.127:") && l.contains("path=/healthz")),
        "{log}"
    );
    let ip = sb.ip(secrets).unwrap();
    let url = format!("http://{ip}:8080/");
    let (code, body) = sb.curl("shop/client-1", &url).unwrap();
    assert_eq!(code, 0, "the client the policy names is let in: {body}");
    assert!(body.contains("secrets"), "{body}");
    for (who, what) in [
        ("shop/intruder", "a meshed client the policy does not name"),
        ("legacy/outsider", "a plaintext client outside the mesh"),
    ] {
        let out = sb
            .exec(
                who,
                &[
                    "curl",
                    "-s",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code}",
                    "--max-time",
                    "5",
                    &url,
                ],
            )
            .unwrap();
        let code = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            !out.status.success() || code != "200",
            "{what} is refused: {code}"
        );
    }
    // Nothing else passes for the kubelet: the probe address from a pod, routed through
    // a node (outsider, on node-1) or bridged on the pod's own (outsider-2), is dropped
    // before it reaches the pod (its replies could not come back, but a SYN that arrives
    // is already too much): the pod sees none of it.
    let pcap = sb.state_dir.join("spoof.pcap");
    let tcpdump = Tcpdump::start(
        &sb.netns(secrets).unwrap(),
        "eth0",
        "src host 169.254.7.127 and tcp src port 47123",
        &pcap,
    )
    .unwrap();
    for who in ["legacy/outsider", "legacy/outsider-2"] {
        sb.exec(
            who,
            &["ip", "addr", "add", "169.254.7.127/32", "dev", "eth0"],
        )
        .unwrap();
        let out = sb
            .exec(
                who,
                &[
                    "curl",
                    "-sS",
                    "--interface",
                    "169.254.7.127",
                    "--local-port",
                    "47123",
                    "--max-time",
                    "2",
                    &url,
                ],
            )
            .unwrap();
        assert!(
            !out.status.success(),
            "{who} passing for the kubelet reached the pod: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    tcpdump.stop();
    let seen = std::fs::metadata(&pcap)
        .map(|m| m.len())
        .unwrap_or_default();
    assert_eq!(
        seen, 24,
        "spoofed packets reached the pod ({seen} bytes captured)"
    );
}

/// The directories of a `PATH` value that hold `nft` or `ip`.
fn with_nft_or_ip(path: &str) -> Vec<String> {
    std::env::split_paths(path)
        .filter(|d| d.join("nft").exists() || d.join("ip").exists())
        .map(|d| d.display().to_string())
        .collect()
}

#[test]
#[ignore = "needs root"]
fn a_rewritten_cni_configuration_is_chained_again_and_the_next_pod_captured_without_nft_or_ip() {
    let manifests = TempManifests::copy(&manifests()).unwrap();
    let mut sb = Sandbox::up("e2e-rechain", manifests.path()).unwrap();
    // Neither the plugin (run with the CNI bin dirs as its PATH) nor the agent could run
    // the host's `nft` or `ip`: captures are the agent's netlink.
    let cni_path =
        std::env::join_paths([sb.state_dir.join("node-1/cni-bin"), "/usr/lib/cni".into()]).unwrap();
    assert_eq!(
        with_nft_or_ip(&cni_path.to_string_lossy()),
        Vec::<String>::new()
    );
    let environ = std::fs::read(format!("/proc/{}/environ", sb.agent_pid("node-1"))).unwrap();
    let agent_path = String::from_utf8_lossy(&environ)
        .split('\0')
        .find_map(|kv| kv.strip_prefix("PATH=").map(str::to_owned))
        .expect("the agent has a PATH");
    assert_eq!(
        with_nft_or_ip(&agent_path),
        Vec::<String>::new(),
        "{agent_path}"
    );
    let conf = sb.state_dir.join("node-1/net.d/10-weft-sandbox.conflist");
    let chained = || std::fs::read_to_string(&conf).unwrap().contains("weft-cni");
    assert!(chained(), "the agent chained weft-cni");
    // The network plugin rewrites its configuration, as its installer does on restart.
    let mut list: Value = serde_json::from_str(&std::fs::read_to_string(&conf).unwrap()).unwrap();
    list["plugins"]
        .as_array_mut()
        .unwrap()
        .retain(|p| p["type"] != "weft-cni");
    let tmp = conf.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_string_pretty(&list).unwrap()).unwrap();
    std::fs::rename(&tmp, &conf).unwrap();
    eventually(Duration::from_secs(5), || chained().then_some(()))
        .expect("the agent chains weft-cni again");
    let adds = |sb: &Sandbox| {
        let m = sb.agent_get("node-1", "/metrics").unwrap_or_default();
        metric_sum(&m, "weft_agent_cni_adds_total", &[("what", "captured")])
    };
    let before = adds(&sb);
    manifests
        .write(
            "30-late.yaml",
            "apiVersion: v1\nkind: Pod\nmetadata: {name: late, namespace: shop}\nspec:\n  nodeName: node-1\n  serviceAccountName: late\n  containers: [{name: c, command: [sleep, infinity]}]\n",
        )
        .unwrap();
    let uid = eventually(Duration::from_secs(30), || {
        sb.refresh().ok()?;
        let p = sb.state["pods"]
            .as_array()?
            .iter()
            .find(|p| p["name"] == "late")?
            .clone();
        (p["phase"] == "Running").then(|| p["uid"].as_str().unwrap().to_owned())
    })
    .expect("the new pod runs");
    assert_eq!(adds(&sb), before + 1.0, "captured by its CNI ADD");
    let pods = sb.agent_pods("node-1").unwrap();
    let late = pods["pods"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["uid"] == uid.as_str())
        .cloned();
    assert!(
        late.is_some_and(|p| p["rules"] == true && p["served"] == true),
        "{pods}"
    );
}

/// A namespace unlabelled while its node's agent is away (restarting, or upgraded): the
/// agent, back, takes the rules out of its pods, which talk plaintext again.
#[test]
#[ignore = "needs root"]
fn a_namespace_unlabelled_while_the_agent_is_away_is_released_once_it_is_back() {
    let manifests = TempManifests::copy(&manifests()).unwrap();
    let sb = Sandbox::up("e2e-unlabel-away", manifests.path()).unwrap();
    let pod = "legacy/outsider";
    let url = format!("http://{}:8080/", sb.ip("shop/echo-2").unwrap());
    let namespaces = label_legacy(&manifests);
    eventually(Duration::from_secs(20), || {
        let rules = sb.rules(pod).ok()?;
        rules.contains("chain kept_open").then_some(())
    })
    .expect("the labelled namespace's pod is captured");
    let (code, body) = sb.curl(pod, &url).unwrap();
    assert_eq!(code, 0, "through the mesh: {body}");

    sb.run_local(&["agent", "stop", "--node", "node-1"])
        .unwrap();
    manifests.write("00-namespaces.yaml", &namespaces).unwrap();
    let object = sb.state_dir.join("cluster/namespace_legacy.yaml");
    eventually(Duration::from_secs(10), || {
        let text = std::fs::read_to_string(&object).ok()?;
        (!text.contains("weft.dev/mesh")).then_some(())
    })
    .expect("the API server holds the namespace without its label");
    assert!(
        sb.rules(pod).unwrap().contains("redirect to :15001"),
        "with no agent, nothing has touched the pod's rules yet"
    );
    sb.run_local(&["agent", "start", "--node", "node-1"])
        .unwrap();
    let released = eventually(Duration::from_secs(20), || {
        let rules = sb.rules(pod).ok()?;
        (!rules.contains("redirect to") && !rules.contains("fwmark 0x53a")).then_some(())
    });
    assert!(
        released.is_some(),
        "the agent back removes the rules: {}",
        sb.rules(pod).unwrap()
    );
    let (code, body) = sb.curl(pod, &url).unwrap();
    assert_eq!(code, 0, "plaintext again: {body}");
}

/// A pod of namespace `ns` on node-1, as a manifest.
fn pod(ns: &str, name: &str) -> String {
    format!("apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  nodeName: node-1\n  containers: [{{name: c, command: [sleep, infinity]}}]\n")
}

/// Pod `name` as `state.json` shows it now.
fn state(sb: &mut Sandbox, name: &str) -> Option<Value> {
    sb.refresh().ok()?;
    sb.state["pods"]
        .as_array()?
        .iter()
        .find(|p| p["name"] == name)
        .cloned()
}

/// Pod `name` of node-1 comes to run, within `wait`, and its agent captures it.
fn runs_captured(sb: &mut Sandbox, name: &str, wait: Duration, when: &str) {
    let uid = eventually(wait, || {
        state(sb, name)
            .filter(|p| p["phase"] == "Running")
            .map(|p| p["uid"].as_str().unwrap().to_owned())
    })
    .unwrap_or_else(|| panic!("{name} starts {when}"));
    let captured = eventually(Duration::from_secs(30), || {
        let pods = sb.agent_pods("node-1")?;
        let p = pods["pods"]
            .as_array()?
            .iter()
            .find(|p| p["uid"] == uid.as_str())?
            .clone();
        (p["rules"] == true && p["served"] == true).then_some(())
    });
    assert!(
        captured.is_some(),
        "{name} is captured: {:?}",
        sb.agent_pods("node-1")
    );
}

#[test]
#[ignore = "needs root"]
fn with_the_agent_stopped_only_enrolled_pods_wait_and_start_once_it_is_back() {
    let manifests = TempManifests::copy(&manifests()).unwrap();
    let mut sb = Sandbox::up("e2e-agent-away", manifests.path()).unwrap();
    sb.run_local(&["agent", "stop", "--node", "node-1"])
        .unwrap();
    manifests
        .write(
            "30-late.yaml",
            &format!(
                "apiVersion: v1\nkind: Namespace\nmetadata: {{name: kube-system}}\n---\n{}---\n{}---\n{}",
                pod("kube-system", "dns"),
                pod("legacy", "plain"),
                pod("shop", "meshed"),
            ),
        )
        .unwrap();
    for name in ["dns", "plain"] {
        let running = eventually(Duration::from_secs(30), || {
            state(&mut sb, name).filter(|p| p["phase"] == "Running" && p["pid"].as_i64() > Some(0))
        });
        assert!(
            running.is_some(),
            "{name} starts without the agent: {:?}",
            state(&mut sb, name)
        );
    }
    let waiting = eventually(Duration::from_secs(30), || {
        state(&mut sb, "meshed")
            .filter(|p| p["message"].as_str().is_some_and(|m| m.contains("code 11")))
    })
    .expect("the enrolled pod's ADD fails with the try-again code");
    let message = waiting["message"].as_str().unwrap();
    assert!(
        message.contains("node agent") && message.contains("node-agent.sock"),
        "{message}"
    );
    assert_eq!(waiting["phase"], "Pending", "{waiting}");

    sb.run_local(&["agent", "start", "--node", "node-1"])
        .unwrap();
    runs_captured(
        &mut sb,
        "meshed",
        Duration::from_secs(30),
        "once the agent is back",
    );
}

/// SIGCONTs a stopped process when dropped, even if the test failed.
struct Stopped(i32);

impl Drop for Stopped {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.0),
            nix::sys::signal::Signal::SIGCONT,
        );
    }
}

/// A node-proxy that takes a pod's handoff and never answers holds the agent up to the
/// handoff's reply timeout. Pods outside the mesh do not wait for that: while an
/// enrolled pod's ADD is stuck behind the stopped node-proxy, a pod of a namespace that
/// is not enrolled starts, and the enrolled one starts captured once node-proxy is back.
#[test]
#[ignore = "needs root"]
fn with_node_proxy_stuck_a_pod_outside_the_mesh_starts_while_an_enrolled_one_waits() {
    let manifests = TempManifests::copy(&manifests()).unwrap();
    let mut sb = Sandbox::up("e2e-proxy-stuck", manifests.path()).unwrap();
    let adds = |sb: &Sandbox| {
        let text = sb.agent_get("node-1", "/metrics").unwrap_or_default();
        metric_sum(&text, "weft_agent_cni_requests_total", &[("what", "add")])
    };
    let before = adds(&sb);
    let stopped = Stopped(sb.node_pid("node-1").unwrap());
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(stopped.0),
        nix::sys::signal::Signal::SIGSTOP,
    )
    .unwrap();
    manifests
        .write("30-meshed.yaml", &pod("shop", "meshed"))
        .unwrap();
    // The agent has the enrolled pod's ADD, and with it hands the pod to node-proxy.
    let asked = eventually(Duration::from_secs(30), || {
        (adds(&sb) > before).then_some(())
    });
    assert!(asked.is_some(), "the enrolled pod's ADD reaches the agent");
    manifests
        .write("31-plain.yaml", &pod("legacy", "plain"))
        .unwrap();
    let running = eventually(Duration::from_secs(60), || {
        state(&mut sb, "plain").filter(|p| p["phase"] == "Running" && p["pid"].as_i64() > Some(0))
    });
    assert!(
        running.is_some(),
        "the pod outside the mesh starts: {:?}",
        state(&mut sb, "plain")
    );
    // It did not wait for the handoff to fail: nothing has failed yet, and the enrolled
    // pod has had no answer.
    let text = sb.agent_get("node-1", "/metrics").unwrap_or_default();
    assert_eq!(
        metric_sum(&text, "weft_agent_failures_total", &[]),
        0.0,
        "the pod outside the mesh started only once the agent gave up on node-proxy:\n{text}"
    );
    let meshed = state(&mut sb, "meshed").expect("the enrolled pod is there");
    assert_eq!(
        (meshed["phase"].as_str(), meshed["message"].as_str()),
        (Some("Pending"), None),
        "the pod outside the mesh started while the enrolled one still waited for its answer: {meshed}"
    );

    drop(stopped);
    runs_captured(
        &mut sb,
        "meshed",
        Duration::from_secs(90),
        "once node-proxy answers again",
    );
}
