//! weft-cni as a container runtime calls it: the test plays the runtime. The node agent
//! chains weft-cni into a CNI configuration directory after Debian's `bridge` +
//! `host-local`; the test creates pod network namespaces and runs the chain per the CNI
//! spec (network configuration with `prevResult` on stdin, `CNI_*` in the environment,
//! and a `PATH` that holds no `nft` and no `ip`) inside a node network namespace of its
//! own, against a real controller (manifest mode), a real node-proxy and a real node
//! agent. Then it sends traffic between the captured pods, and stops the agent.
//!
//! ```text
//!  node netns: bridge wcni0 (10.244.77.0/24), node agent
//!     |-- client  10.244.77.10  cni-mesh (enrolled)     --curl--> echo, over HBONE + mTLS
//!     |-- echo    10.244.77.11  cni-mesh (enrolled)     weftctl echo :8080
//!     |-- plain   10.244.77.12  cni-plain (not enrolled)
//!     |-- optout  10.244.77.13  cni-mesh, weft.dev/mesh=disabled
//!     |-- late    10.244.77.14  cni-mesh, added while the agent is stopped, then again
//!     |-- plain2  10.244.77.15  cni-plain, added while the agent is stopped
//!     '-- system  10.244.77.16  kube-system, added while the agent is stopped
//!  host: controller (in the test), node-proxy (the binary), handoff socket
//! ```

#![allow(clippy::unwrap_used)] // a test fails by panicking
#![allow(clippy::type_complexity, clippy::needless_range_loop)] // case tables, pods by index

use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use controller::testing::{namespace_yaml, pod_yaml, TestController, SERVER_NAME};
use serde_json::{json, Value};
use weft_e2e::{eventually, http_get, metric_sum, weftctl};

const NODE: &str = "cni-node";
const MESH: &str = "cni-mesh";
const PLAIN: &str = "cni-plain";
const TRUST: &str = "spiffe://cluster.local";

/// A binary built beside weftctl.
fn binary(name: &str) -> PathBuf {
    let path = weftctl().unwrap().with_file_name(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace --bins` first",
        path.display()
    );
    path
}

/// The weft-cni binary.
fn weft_cni() -> PathBuf {
    binary("weft-cni")
}

/// A network namespace the test made, deleted on drop.
struct Netns(String);

impl Netns {
    fn new(name: &str) -> Self {
        let name = format!("wcni-{}-{name}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        run(Command::new("ip").args(["netns", "add", &name]));
        // What the runtime's loopback plugin does before the chain runs.
        run(Command::new("ip").args(["netns", "exec", &name, "ip", "link", "set", "lo", "up"]));
        Netns(name)
    }

    fn path(&self) -> String {
        format!("/run/netns/{}", self.0)
    }

    fn exec(&self, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.0])
            .args(args)
            .output()
            .unwrap()
    }

    /// Whether the weft nftables table is in this namespace.
    fn has_rules(&self) -> bool {
        self.exec(&["nft", "list", "table", "inet", "weft"])
            .status
            .success()
    }

    /// The TCP ports something listens on here.
    fn listening(&self) -> Vec<u16> {
        let out = self.exec(&["ss", "-Hltn"]);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| {
                l.split_whitespace()
                    .nth(3)?
                    .rsplit(':')
                    .next()?
                    .parse()
                    .ok()
            })
            .collect()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

/// A child process, killed on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A scratch directory, removed on drop.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn free_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// What one plugin answered.
#[derive(Debug)]
struct Answer {
    ok: bool,
    stdout: String,
    stderr: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {self:?}"))
    }
}

/// A pod as the runtime knows it.
struct Pod<'a> {
    netns: &'a Netns,
    namespace: &'a str,
    name: &'a str,
    uid: String,
    ip: &'a str,
    container: String,
}

/// The container runtime: reads the first conflist in its configuration directory and
/// runs its plugins in the node's network namespace, per the CNI spec.
struct Runtime {
    conf_dir: PathBuf,
    cni_path: String,
    node: String,
}

impl Runtime {
    fn conflist(&self) -> Value {
        let mut lists: Vec<PathBuf> = std::fs::read_dir(&self.conf_dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "conflist"))
            .collect();
        lists.sort();
        serde_json::from_str(&std::fs::read_to_string(&lists[0]).unwrap()).unwrap()
    }

    /// Runs one plugin with `conf` on stdin.
    fn plugin(&self, kind: &str, command: &str, pod: &Pod<'_>, conf: &Value) -> Answer {
        let program = self
            .cni_path
            .split(':')
            .map(|d| Path::new(d).join(kind))
            .find(|p| p.exists())
            .unwrap_or_else(|| panic!("no plugin {kind} in {}", self.cni_path));
        let args = format!(
            "IgnoreUnknown=1;IP={};K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID={};K8S_POD_UID={}",
            pod.ip, pod.namespace, pod.name, pod.container, pod.uid
        );
        // A runtime's minimal environment: no nft, no ip on the plugins' PATH (`ip`
        // itself is named by its path, found on the test's own).
        let ip = std::env::var_os("PATH")
            .iter()
            .flat_map(std::env::split_paths)
            .map(|d| d.join("ip"))
            .find(|p| p.is_file())
            .expect("ip on PATH");
        let mut child = Command::new(ip)
            .args(["netns", "exec", &self.node])
            .arg(program)
            .env_clear()
            .env("PATH", &self.cni_path)
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", &pod.container)
            .env("CNI_NETNS", pod.netns.path())
            .env("CNI_IFNAME", "eth0")
            .env("CNI_ARGS", args)
            .env("CNI_PATH", &self.cni_path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(conf.to_string().as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        Answer {
            ok: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).trim().to_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// The configuration plugin `i` of the list is run with.
    fn conf(list: &Value, i: usize, prev: Option<&Value>) -> Value {
        let mut conf = list["plugins"][i].clone();
        conf["cniVersion"] = list["cniVersion"].clone();
        conf["name"] = list["name"].clone();
        if let Some(prev) = prev {
            conf["prevResult"] = prev.clone();
        }
        conf
    }

    /// ADD through the chain: each plugin's result is the next one's `prevResult`.
    /// Returns every plugin's answer; the chain stops at the first failure.
    fn add(&self, pod: &Pod<'_>) -> Vec<Answer> {
        let list = self.conflist();
        let mut answers: Vec<Answer> = Vec::new();
        for i in 0..list["plugins"].as_array().unwrap().len() {
            let prev = answers.last().map(Answer::json);
            let kind = list["plugins"][i]["type"].as_str().unwrap().to_owned();
            let answer = self.plugin(&kind, "ADD", pod, &Self::conf(&list, i, prev.as_ref()));
            let ok = answer.ok;
            answers.push(answer);
            if !ok {
                break;
            }
        }
        answers
    }

    /// CHECK (`result`: the cached result of ADD) through the chain; the first failure.
    fn check(&self, pod: &Pod<'_>, result: &Value) -> Option<Answer> {
        let list = self.conflist();
        for i in 0..list["plugins"].as_array().unwrap().len() {
            let kind = list["plugins"][i]["type"].as_str().unwrap().to_owned();
            let answer = self.plugin(&kind, "CHECK", pod, &Self::conf(&list, i, Some(result)));
            if !answer.ok {
                return Some(answer);
            }
        }
        None
    }

    /// DEL through the chain in reverse; the first failure.
    fn del(&self, pod: &Pod<'_>, result: &Value) -> Option<Answer> {
        let list = self.conflist();
        for i in (0..list["plugins"].as_array().unwrap().len()).rev() {
            let kind = list["plugins"][i]["type"].as_str().unwrap().to_owned();
            let answer = self.plugin(&kind, "DEL", pod, &Self::conf(&list, i, Some(result)));
            if !answer.ok {
                return Some(answer);
            }
        }
        None
    }
}

/// node-proxy for the node, as the sandbox starts it.
fn start_node_proxy(ctl: &TestController, handoff: &Path, admin: SocketAddr, log: &Path) -> Proc {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    let child = Command::new(weftctl().unwrap().with_file_name("node-proxy"))
        .args(["--node", NODE, "--handoff"])
        .arg(handoff)
        .args(["--controller", &ctl.grpc.to_string()])
        .args(["--controller-name", SERVER_NAME, "--controller-ca"])
        .arg(&ctl.root)
        .arg("--token-file")
        .arg(ctl.token(NODE))
        .args(["--admin", &admin.to_string(), "--drain-grace", "1"])
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let ready = eventually(Duration::from_secs(30), || {
        (http_get(admin, "/ready").ok()?.0 == 200).then_some(())
    });
    assert!(ready.is_some(), "node-proxy not ready");
    Proc(child)
}

/// The node agent for the node, as the sandbox starts it: in the node's namespace,
/// reading `objects` as its API server's store.
fn start_agent(node: &Netns, dir: &Path, objects: &Path, handoff: &Path) -> Proc {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("node-agent.log"))
        .unwrap();
    let child = Command::new("ip")
        .args(["netns", "exec", &node.0])
        .arg(binary("node-agent"))
        .args(["--node", NODE, "--objects"])
        .arg(objects)
        .arg("--handoff")
        .arg(handoff)
        .arg("--socket")
        .arg(dir.join("agent.sock"))
        .arg("--state")
        .arg(dir.join("agent.json"))
        .arg("--cni-bin-dir")
        .arg(dir.join("bin"))
        .arg("--cni-conf-dir")
        .arg(dir.join("net.d"))
        .arg("--cni-plugin")
        .arg(weft_cni())
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let ready = eventually(Duration::from_secs(30), || {
        let out = node.exec(&["curl", "-sf", "http://127.0.0.1:15022/ready"]);
        out.status.success().then_some(())
    });
    assert!(
        ready.is_some(),
        "node agent not ready:\n{}",
        std::fs::read_to_string(dir.join("node-agent.log")).unwrap_or_default()
    );
    Proc(child)
}

#[test]
#[ignore = "needs root"]
fn a_runtime_chains_weft_cni_after_bridge() {
    let pid = std::process::id();
    let scratch = Scratch(std::env::temp_dir().join(format!("weft-cni-e2e-{pid}")));
    let dir = scratch.0.clone();
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("net.d")).unwrap();
    let uid = |name: &str| format!("uid-{pid}-{name}");
    // (namespace, name, service account, IP, extra labels)
    let pods: [(&str, &str, &str, &str, &[(&str, &str)]); 7] = [
        (MESH, "client", "client", "10.244.77.10", &[]),
        (MESH, "echo", "echo", "10.244.77.11", &[]),
        (PLAIN, "plain", "default", "10.244.77.12", &[]),
        (
            MESH,
            "optout",
            "optout",
            "10.244.77.13",
            &[("weft.dev/mesh", "disabled")],
        ),
        (MESH, "late", "late", "10.244.77.14", &[]),
        (PLAIN, "plain2", "default", "10.244.77.15", &[]),
        ("kube-system", "system", "default", "10.244.77.16", &[]),
    ];
    let mut files = vec![(
        "namespaces.yaml".to_owned(),
        format!(
            "{}---\n{}",
            namespace_yaml(MESH, true),
            namespace_yaml(PLAIN, false)
        ),
    )];
    for (ns, name, sa, ip, labels) in &pods {
        let mut all = vec![("app", *name)];
        all.extend_from_slice(labels);
        files.push((
            format!("pod_{name}.yaml"),
            pod_yaml(ns, name, &uid(name), NODE, sa, ip, &all),
        ));
    }
    let files: Vec<(&str, &str)> = files
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let ctl = rt
        .block_on(TestController::start(
            &dir.join("controller"),
            &[NODE],
            &files,
        ))
        .unwrap();
    let objects = dir.join("controller/manifests");
    let handoff = dir.join("handoff.sock");
    let admin = free_port();
    let np_log = dir.join("node-proxy.log");
    let _node_proxy = start_node_proxy(&ctl, &handoff, admin, &np_log);

    // The node: its network, as the cluster's network plugin configured it. The bridge
    // is made up front with a fixed MAC: a bridge's own address otherwise follows its
    // lowest port's, and bridge's CHECK of an earlier pod would fail on the change.
    let node = Netns::new("node");
    for args in [
        &["ip", "link", "add", "wcni0", "type", "bridge"][..],
        &["ip", "link", "set", "wcni0", "address", "02:77:00:00:00:01"],
        &["ip", "link", "set", "wcni0", "up"],
    ] {
        run(Command::new("ip")
            .args(["netns", "exec", &node.0])
            .args(args));
    }
    let bridge = json!({
        "cniVersion": "1.0.0",
        "name": "weft-cni-e2e",
        "plugins": [{
            "type": "bridge",
            "bridge": "wcni0",
            "isGateway": false,
            "ipam": {
                "type": "host-local",
                "dataDir": dir.join("ipam"),
                "ranges": [[{"subnet": "10.244.77.0/24", "rangeStart": "10.244.77.10", "rangeEnd": "10.244.77.50"}]]
            }
        }]
    });
    let primary = dir.join("net.d/10-bridge.conflist");
    std::fs::write(&primary, bridge.to_string()).unwrap();
    let mut agent = Some(start_agent(&node, &dir, &objects, &handoff));
    let runtime = Runtime {
        conf_dir: dir.join("net.d"),
        cni_path: format!("{}:/usr/lib/cni", dir.join("bin").display()),
        node: node.0.clone(),
    };
    let types = || -> Vec<Value> {
        runtime.conflist()["plugins"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["type"].clone())
            .collect()
    };
    assert_eq!(
        types(),
        [json!("bridge"), json!("weft-cni")],
        "the agent chained one weft-cni entry, last"
    );
    // The network plugin rewrites its configuration without it: chained again.
    std::fs::write(&primary, bridge.to_string()).unwrap();
    let again = eventually(Duration::from_secs(5), || {
        (types() == [json!("bridge"), json!("weft-cni")]).then_some(())
    });
    assert!(again.is_some(), "re-chained: {:?}", types());
    for plugin in runtime.cni_path.split(':') {
        for tool in ["nft", "ip"] {
            assert!(
                !Path::new(plugin).join(tool).exists(),
                "the plugins' PATH holds no {tool}"
            );
        }
    }

    let netns: Vec<Netns> = pods.iter().map(|p| Netns::new(p.1)).collect();
    let pod = |i: usize| Pod {
        netns: &netns[i],
        namespace: pods[i].0,
        name: pods[i].1,
        uid: uid(pods[i].1),
        ip: pods[i].3,
        container: format!("c{pid}{i}"),
    };
    let logs = || {
        format!(
            "node-proxy:\n{}\nnode agent:\n{}",
            std::fs::read_to_string(&np_log).unwrap_or_default(),
            std::fs::read_to_string(dir.join("node-agent.log")).unwrap_or_default()
        )
    };
    // ADD: each pod's chain succeeds and weft-cni passes bridge's result through.
    let mut results = Vec::new();
    for i in 0..4 {
        let answers = runtime.add(&pod(i));
        let last = answers.last().unwrap();
        assert!(last.ok, "ADD {}: {answers:#?}\n{}", pods[i].1, logs());
        assert_eq!(answers.len(), 2);
        assert_eq!(
            last.json(),
            answers[0].json(),
            "weft-cni returns prevResult unchanged"
        );
        let ip = &last.json()["ips"][0]["address"];
        assert_eq!(*ip, json!(format!("{}/24", pods[i].3)), "{}", pods[i].1);
        results.push(last.json());
    }
    let (client, echo, plain, optout) = (&netns[0], &netns[1], &netns[2], &netns[3]);
    assert!(
        client.has_rules() && echo.has_rules(),
        "enrolled pods are captured by the time ADD answers"
    );
    assert!(
        !plain.has_rules(),
        "a pod of a namespace that is not enrolled is untouched"
    );
    assert!(!optout.has_rules(), "a pod that opted out is untouched");
    assert!(plain.listening().is_empty() && optout.listening().is_empty());
    for ns in [client, echo] {
        let l = ns.listening();
        assert!(
            [15001, 15006, 15008].iter().all(|p| l.contains(p)),
            "listening in {}: {l:?}",
            ns.0
        );
    }

    // Traffic: client -> echo crosses the mesh, mTLS with the client's identity.
    let mut env = Command::new("ip");
    env.args(["netns", "exec", &echo.0])
        .arg(weftctl().unwrap())
        .args(["echo", "--port", "8080"])
        .env("POD_NAME", "echo")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(dir.join("echo.log")).unwrap())
        .stderr(std::fs::File::create(dir.join("echo.err")).unwrap());
    let _echo_app = Proc(env.spawn().unwrap());
    let url = "http://10.244.77.11:8080/through-the-mesh";
    let curl = || client.exec(&["curl", "-sS", "--max-time", "5", url]);
    let answered = eventually(Duration::from_secs(15), || {
        let out = curl();
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    });
    assert!(
        answered.is_some(),
        "client reaches echo: {:?}\n{}",
        curl(),
        logs()
    );
    let metrics = http_get(admin, "/metrics").unwrap().1;
    let mtls = metric_sum(
        &metrics,
        "weft_tcp_connections_opened_total",
        &[
            ("direction", "inbound"),
            ("source_principal", &format!("{TRUST}/ns/{MESH}/sa/client")),
            ("destination_workload", "echo"),
            ("connection_security_policy", "mutual_tls"),
        ],
    );
    assert!(
        mtls >= 1.0,
        "node-proxy's inbound side saw the client's SPIFFE identity over mTLS:\n{metrics}"
    );
    let echo_log = std::fs::read_to_string(dir.join("echo.log")).unwrap_or_default()
        + &std::fs::read_to_string(dir.join("echo.err")).unwrap_or_default();
    assert!(
        echo_log
            .lines()
            .any(|l| l.contains("client=10.244.77.10:") && l.contains("path=/through-the-mesh")),
        "echo saw the client's own address:\n{echo_log}"
    );

    // CHECK: fine as added; a pod whose rules were deleted by hand is reported.
    for i in 0..4 {
        let failed = runtime.check(&pod(i), &results[i]);
        assert!(failed.is_none(), "CHECK {}: {failed:?}", pods[i].1);
    }
    run(Command::new("ip").args([
        "netns", "exec", &echo.0, "nft", "delete", "table", "inet", "weft",
    ]));
    let failed = runtime
        .check(&pod(1), &results[1])
        .expect("CHECK fails without the rules");
    let e = failed.json();
    assert_eq!(e["code"], 102, "{e}");
    assert!(
        e["msg"]
            .as_str()
            .unwrap()
            .contains("nftables table inet weft"),
        "{e}"
    );
    assert_eq!(e["cniVersion"], "1.0.0", "{e}");

    // DEL: rules and listeners go; DEL again, and after the namespace is gone, succeeds.
    let failed = runtime.del(&pod(0), &results[0]);
    assert!(failed.is_none(), "DEL client: {failed:?}");
    assert!(!client.has_rules(), "DEL removes the rules");
    let rule = client.exec(&["ip", "rule", "show"]);
    assert!(
        !String::from_utf8_lossy(&rule.stdout).contains("lookup 100"),
        "and the policy rule"
    );
    let closed = eventually(Duration::from_secs(10), || {
        let l = client.listening();
        (!l.iter().any(|p| [15001, 15006, 15008].contains(p))).then_some(())
    });
    assert!(
        closed.is_some(),
        "DEL closes the pod's listeners: {:?}",
        client.listening()
    );
    let failed = runtime.del(&pod(0), &results[0]);
    assert!(failed.is_none(), "DEL twice: {failed:?}");
    for i in [1, 2, 3] {
        let failed = runtime.del(&pod(i), &results[i]);
        assert!(failed.is_none(), "DEL {}: {failed:?}", pods[i].1);
    }
    run(Command::new("ip").args(["netns", "del", &netns[2].0]));
    let gone = runtime.del(&pod(2), &results[2]);
    assert!(
        gone.is_none(),
        "DEL of a pod whose namespace is gone: {gone:?}"
    );

    // The agent stopped: an enrolled pod must wait (code 11, naming the agent); a pod
    // that is not enrolled starts, and one of kube-system is not even asked about.
    drop(agent.take());
    let answers = runtime.add(&pod(4));
    let last = answers.last().unwrap();
    assert!(!last.ok && answers.len() == 2, "{answers:#?}");
    let e = last.json();
    assert_eq!(e["code"], 11, "{e}");
    let msg = e["msg"].as_str().unwrap();
    assert!(
        msg.contains("node agent") && msg.contains("agent.sock"),
        "{e}"
    );
    assert!(!last.stderr.contains("panicked"), "{}", last.stderr);
    let failed = runtime.del(&pod(4), &answers[0].json());
    assert!(
        failed.is_none(),
        "the runtime's cleanup DEL after a failed ADD succeeds: {failed:?}"
    );
    for i in [5, 6] {
        let answers = runtime.add(&pod(i));
        let last = answers.last().unwrap();
        assert!(last.ok, "{}: {answers:#?}", pods[i].1);
        assert_eq!(last.json(), answers[0].json());
        assert!(!netns[i].has_rules());
    }
    // Back: the enrolled pod's retry is captured.
    let _agent = start_agent(&node, &dir, &objects, &handoff);
    let answers = runtime.add(&pod(4));
    assert!(answers.last().unwrap().ok, "{answers:#?}\n{}", logs());
    assert!(netns[4].has_rules());
    rt.block_on(ctl.stop());
}

/// Runs a plugin as the runtime does: `command` with only `env` in its environment and
/// `stdin` on its standard input.
fn run_plugin(mut command: Command, env: &[(&str, &str)], stdin: &str) -> Output {
    let mut child = command
        .env_clear()
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

/// Runs weft-cni with `env` and `stdin`: (exit success, stdout as JSON, stderr).
fn weft_cni_with(env: &[(&str, &str)], stdin: &str) -> (bool, Value, String) {
    let out = run_plugin(Command::new(weft_cni()), env, stdin);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let json = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {stdout:?}"));
    (
        out.status.success(),
        json,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
#[ignore = "needs the weft-cni binary (cargo build --workspace --bins)"]
fn malformed_input_gets_a_cni_error() {
    let add = [
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "abc"),
        ("CNI_NETNS", "/run/netns/none-such"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_ARGS", "K8S_POD_NAMESPACE=a;K8S_POD_NAME=b"),
        ("CNI_PATH", "/usr/lib/cni"),
    ];
    let conf = |edit: &dyn Fn(&mut Value)| {
        let mut c = json!({
            "cniVersion": "1.0.0", "name": "n", "type": "weft-cni",
            "agentSocket": "/nonexistent/agent.sock", "agentState": "/nonexistent/agent.json",
            "prevResult": {"cniVersion": "1.0.0", "ips": []}
        });
        edit(&mut c);
        c.to_string()
    };
    let good = conf(&|_| {});
    let without = |key: &str| -> Vec<(&str, &str)> {
        add.iter().copied().filter(|(k, _)| *k != key).collect()
    };
    let with = |key: &'static str, value: &'static str| -> Vec<(&'static str, &'static str)> {
        let mut e: Vec<_> = add.iter().copied().filter(|(k, _)| *k != key).collect();
        e.push((key, value));
        e
    };
    let cases: Vec<(Vec<(&str, &str)>, String, u64, &str)> = vec![
        (
            without("CNI_COMMAND"),
            good.clone(),
            4,
            "CNI_COMMAND: is not set",
        ),
        (
            with("CNI_COMMAND", "EXPLODE"),
            good.clone(),
            4,
            "not a CNI command",
        ),
        (
            without("CNI_CONTAINERID"),
            good.clone(),
            4,
            "CNI_CONTAINERID",
        ),
        (without("CNI_NETNS"), good.clone(), 4, "CNI_NETNS"),
        (
            with("CNI_ARGS", "K8S_POD_NAME"),
            good.clone(),
            4,
            "not KEY=VALUE",
        ),
        (add.to_vec(), String::new(), 6, "stdin is empty"),
        (add.to_vec(), "{\"cniVersion\": ".into(), 6, "not JSON"),
        (add.to_vec(), "\u{0}\u{1}binary".into(), 6, "not JSON"),
        (
            add.to_vec(),
            conf(&|c| c["agentSocket"] = json!(3)),
            7,
            "agentSocket: must be a string",
        ),
        (
            add.to_vec(),
            conf(&|c| c["cniVersion"] = json!("9.9.9")),
            1,
            "not supported",
        ),
        (
            add.to_vec(),
            conf(&|c| c["prevResult"] = Value::Null),
            7,
            "chained plugin",
        ),
        // Valid input, but the pod's network namespace does not exist.
        (add.to_vec(), good.clone(), 3, "/run/netns/none-such"),
    ];
    for (env, stdin, code, want) in cases {
        let (ok, out, stderr) = weft_cni_with(&env, &stdin);
        assert!(!ok, "{env:?} {stdin:?}: exit 0 with {out}");
        assert_eq!(out["code"], code, "{env:?} {stdin:?}: {out}");
        let msg = out["msg"].as_str().unwrap_or_default();
        assert!(msg.contains(want), "{env:?} {stdin:?}: {out}");
        assert!(
            out["cniVersion"].is_string() && out["details"].is_string(),
            "{out}"
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
    // No agent, and none ever published its enrolled namespaces: a pod is not held up.
    let mut reachable = with("CNI_NETNS", "/proc/self/ns/net");
    let (ok, out, stderr) = weft_cni_with(&reachable, &good);
    assert!(ok, "{out} {stderr}");
    assert!(
        stderr.contains("has published no enrolled namespaces"),
        "{stderr}"
    );
    // kube-system is never asked about, even with a netns that cannot be opened.
    reachable.retain(|(k, _)| *k != "CNI_ARGS");
    reachable.push(("CNI_ARGS", "K8S_POD_NAMESPACE=kube-system;K8S_POD_NAME=dns"));
    let (ok, out, stderr) = weft_cni_with(&reachable, &good);
    assert!(ok, "{out} {stderr}");
    assert!(stderr.contains("without asking"), "{stderr}");
    let (ok, out, _) = weft_cni_with(&[("CNI_COMMAND", "VERSION")], "{\"cniVersion\":\"1.0.0\"}");
    assert!(ok, "{out}");
    assert!(
        out["supportedVersions"]
            .as_array()
            .unwrap()
            .contains(&json!("1.0.0")),
        "{out}"
    );
}

/// What `scripts/release` ships: the plugin the runtime runs on every node's host.
#[test]
#[ignore = "needs root (chroot) and the static plugin: scripts/release --cni"]
fn the_shipped_plugin_is_static_and_runs_in_an_empty_root() {
    let plugin = weft_e2e::repo_root().join("target/dist/bin/weft-cni");
    assert!(
        plugin.exists(),
        "{} is missing: run scripts/release --cni",
        plugin.display()
    );
    let readelf = |flag: &str| {
        let out = run(Command::new("readelf").arg(flag).arg(&plugin));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let headers = readelf("--program-headers");
    assert!(
        !headers.contains("INTERP"),
        "it asks for a loader:\n{headers}"
    );
    let dynamic = readelf("--dynamic");
    assert!(
        !dynamic.contains("NEEDED"),
        "it needs shared libraries:\n{dynamic}"
    );
    assert!(
        !readelf("--sections").contains(".debug_info"),
        "it is not stripped"
    );
    let size = std::fs::metadata(&plugin).unwrap().len();
    assert!(size < 8 << 20, "{size} bytes");
    // A root holding the binary and nothing else: no libc, no loader, no /proc.
    let root = Scratch(std::env::temp_dir().join(format!("weft-cni-root-{}", std::process::id())));
    std::fs::create_dir_all(&root.0).unwrap();
    std::fs::copy(&plugin, root.0.join("weft-cni")).unwrap();
    let chrooted = |env: &[(&str, &str)], stdin: &str| {
        let mut command = Command::new("chroot");
        command.arg(&root.0).arg("/weft-cni");
        // PATH for chroot itself; inside the root there is nothing to find.
        let env = [env, &[("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")]].concat();
        run_plugin(command, &env, stdin)
    };
    let version = chrooted(&[("CNI_COMMAND", "VERSION")], "{}");
    assert!(version.status.success(), "{version:?}");
    let answer: Value = serde_json::from_slice(&version.stdout).unwrap();
    assert!(
        answer["supportedVersions"]
            .as_array()
            .unwrap()
            .contains(&json!("1.0.0")),
        "{answer}"
    );
    // A kube-system pod: the plugin asks no one and hands the previous result on.
    let prev = json!({"cniVersion": "1.0.0", "ips": [{"address": "10.244.9.9/24"}]});
    let conf = json!({
        "cniVersion": "1.0.0", "name": "n", "type": "weft-cni",
        "agentSocket": "/nonexistent/agent.sock", "agentState": "/nonexistent/agent.json",
        "prevResult": prev,
    });
    let add = chrooted(
        &[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "abc"),
            ("CNI_NETNS", "/run/netns/none-such"),
            ("CNI_IFNAME", "eth0"),
            (
                "CNI_ARGS",
                "K8S_POD_NAMESPACE=kube-system;K8S_POD_NAME=coredns",
            ),
            ("CNI_PATH", "/"),
        ],
        &conf.to_string(),
    );
    assert!(
        add.status.success(),
        "{}",
        String::from_utf8_lossy(&add.stdout)
    );
    let result: Value = serde_json::from_slice(&add.stdout).unwrap();
    assert_eq!(result["ips"], prev["ips"]);
}
