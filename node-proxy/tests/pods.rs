//! node-proxy in-process with real network namespaces: pods handed over, served,
//! refused and removed, counting file descriptors and tasks. Needs root.
#![allow(clippy::unwrap_used)] // a test fails by panicking

use std::fs::File;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use controller::testing::{namespace_yaml, pod_yaml, TestController};
use runtime::handoff::{HandoffClient, HandoffError, PodInfo};
use runtime::netns::Netns;
use tokio_util::sync::CancellationToken;

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A network namespace with eth0 (one end of a veth pair) at `addr`, deleted on drop.
struct TestNetns(String);

impl TestNetns {
    fn new(name: &str, addr: Option<&str>) -> Self {
        let _ = Command::new("ip").args(["netns", "delete", name]).output();
        ip(&["netns", "add", name]);
        // From here on, a failed step still removes the namespace.
        let ns = TestNetns(name.to_owned());
        ip(&["-n", name, "link", "set", "lo", "up"]);
        ip(&[
            "-n", name, "link", "add", "eth0", "type", "veth", "peer", "name", "eth1",
        ]);
        ip(&["-n", name, "link", "set", "eth1", "up"]);
        ip(&["-n", name, "link", "set", "eth0", "up"]);
        if let Some(addr) = addr {
            ip(&[
                "-n",
                name,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                "eth0",
            ]);
        }
        ns
    }

    fn file(&self) -> File {
        File::open(Path::new("/run/netns").join(&self.0)).unwrap()
    }
}

impl Drop for TestNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.0])
            .output();
    }
}

fn pod(uid: &str, ip: &str) -> PodInfo {
    PodInfo {
        uid: uid.into(),
        name: uid.into(),
        namespace: "shop".into(),
        service_account: "cart".into(),
        ips: vec![ip.parse().unwrap()],
    }
}

/// Open descriptors, not counting handles on this process's own network namespace:
/// each runtime thread keeps one to return to after making a socket in a pod, once,
/// not per pod or connection. A pod's namespace left open is still counted.
fn open_fds() -> usize {
    let own = std::fs::read_link("/proc/self/ns/net").unwrap();
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter(|e| {
            e.as_ref().map_or(true, |e| {
                std::fs::read_link(e.path()).ok().as_ref() != Some(&own)
            })
        })
        .count()
}

/// A real controller in `dir/controller` whose model holds the pods `(uid, ip)` of the
/// enrolled namespace shop, on node-1, running as service account cart.
async fn controller(dir: &Path, pods: &[(&str, &str)]) -> TestController {
    std::fs::create_dir_all(dir).unwrap();
    let mut files = vec![("namespaces.yaml".to_owned(), namespace_yaml("shop", true))];
    for (uid, ip) in pods {
        files.push((
            format!("pod-{uid}.yaml"),
            pod_yaml("shop", uid, uid, "node-1", "cart", ip, &[]),
        ));
    }
    let files: Vec<(&str, &str)> = files
        .iter()
        .map(|(n, t)| (n.as_str(), t.as_str()))
        .collect();
    TestController::start(&dir.join("controller"), &["node-1"], &files)
        .await
        .unwrap()
}

/// Starts node-proxy in this process, served by `controller`.
fn start(
    dir: &Path,
    controller: &TestController,
) -> (
    CancellationToken,
    tokio::task::JoinHandle<anyhow::Result<()>>,
    PathBuf,
) {
    let (shutdown, task) = run_in(dir, controller);
    (shutdown, task, dir.join("handoff.sock"))
}

/// Starts (another) node-proxy in this process with its handoff socket in `dir`.
fn run_in(
    dir: &Path,
    controller: &TestController,
) -> (
    CancellationToken,
    tokio::task::JoinHandle<anyhow::Result<()>>,
) {
    run_limited(dir, controller, 1000, 10_000, None)
}

/// As [`run_in`], as the container of a pod whose directory (its emptyDir) is `pod_dir`.
fn run_in_pod(
    dir: &Path,
    controller: &TestController,
    pod_dir: &Path,
) -> (
    CancellationToken,
    tokio::task::JoinHandle<anyhow::Result<()>>,
) {
    run_limited(dir, controller, 1000, 10_000, Some(pod_dir.to_owned()))
}

/// As [`run_in`], with connection limits per listener and for the node.
fn run_limited(
    dir: &Path,
    controller: &TestController,
    max_connections: usize,
    max_node_connections: usize,
    pod_dir: Option<PathBuf>,
) -> (
    CancellationToken,
    tokio::task::JoinHandle<anyhow::Result<()>>,
) {
    let handoff = dir.join("handoff.sock");
    let config = node_proxy::Config {
        node: "node-1".into(),
        handoff: handoff.clone(),
        control: runtime::config_client::ControllerFlags {
            controller: controller.grpc.to_string(),
            controller_name: controller::testing::SERVER_NAME.into(),
            controller_ca: controller.root.clone(),
            token_file: controller.token("node-1"),
        },
        trust_domain: "cluster.local".into(),
        admin: "127.0.0.1:0".parse().unwrap(),
        pod_dir,
        drain_grace: 1,
        max_connections,
        max_node_connections,
        pod_wait: 2,
        access_log_rate: 1000,
        worker_threads: 1,
    };
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(node_proxy::run(config, shutdown.clone()));
    (shutdown, task)
}

fn connect(path: &Path) -> HandoffClient {
    let start = Instant::now();
    loop {
        match HandoffClient::connect(path) {
            Ok(c) => return c,
            Err(_) if start.elapsed() < Duration::from_secs(10) => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(e) => panic!("{e}"),
        }
    }
}

fn listening(ns: &TestNetns) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", &ns.0, "ss", "-Hltn"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[ignore = "needs root"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_come_and_go_without_leaks_and_bad_handoffs_leave_nothing() {
    let id = std::process::id();
    let dir = std::env::temp_dir().join(format!("weft-np-{id}"));
    let control = controller(&dir, &[("ghost", "10.250.0.9"), ("cart", "10.250.0.2")]).await;
    let (shutdown, task, handoff) = start(&dir, &control);
    let good = TestNetns::new(&format!("np{id}-good"), Some("10.250.0.2"));
    let bare = TestNetns::new(&format!("np{id}-bare"), None);
    let good_file = good.file();

    let mut client = tokio::task::spawn_blocking({
        let handoff = handoff.clone();
        move || connect(&handoff)
    })
    .await
    .unwrap();
    let runtime = tokio::runtime::Handle::current();

    // A pod whose namespace lacks its IP (its network vanished) is refused, by name,
    // and nothing of it keeps running.
    let bare_file = bare.file();
    let (client2, err) = tokio::task::spawn_blocking(move || {
        let err = client.add(&pod("ghost", "10.250.0.9"), bare_file.as_fd(), None);
        (client, err)
    })
    .await
    .unwrap();
    client = client2;
    match err {
        Err(HandoffError::Rejected(msg)) => assert!(
            msg.contains("shop/ghost") && msg.contains("10.250.0.9"),
            "names the pod and the address: {msg}"
        ),
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(
        !listening(&bare).contains("1500"),
        "nothing listens in the refused pod"
    );

    // 20 add/remove cycles with connections in between; each removal also releases the
    // pod's identity (certificate and refresh task).
    let baseline = (open_fds(), runtime.metrics().num_alive_tasks());
    for round in 0..20 {
        let fd = good_file.try_clone().unwrap();
        client = tokio::task::spawn_blocking(move || {
            if let Err(e) = client.add(&pod("cart", "10.250.0.2"), fd.as_fd(), None) {
                panic!("round {round}: {e}");
            }
            client
        })
        .await
        .unwrap();
        if round == 0 {
            let ports = listening(&good);
            for p in ["127.0.0.1:15001", "10.250.0.2:15006", "10.250.0.2:15008"] {
                assert!(ports.contains(p), "listening on {p}: {ports}");
            }
        }
        // Connections that end at once: plaintext junk to the HBONE port, and a
        // connection to the outbound port that was never redirected.
        let ns = Netns::enter(good.file().into(), "test").unwrap();
        for port in [15008u16, 15001] {
            let addr = if port == 15001 {
                "127.0.0.1"
            } else {
                "10.250.0.2"
            };
            let addr: std::net::SocketAddr = format!("{addr}:{port}").parse().unwrap();
            // The proxy may reset before connect() returns (it refuses both at once).
            let Ok(mut s) = ns.outbound_socket(addr).unwrap().connect(addr).await else {
                continue;
            };
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let _ = s.write_all(b"GET / HTTP/1.1\r\n\r\n").await;
            let _ =
                tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut Vec::new())).await;
        }
        // A connection still open (an HBONE client that has not started its handshake)
        // when the pod is removed: the ports must close at once all the same.
        let hbone: std::net::SocketAddr = "10.250.0.2:15008".parse().unwrap();
        let idle = ns
            .outbound_socket(hbone)
            .unwrap()
            .connect(hbone)
            .await
            .unwrap();
        drop(ns);
        client = tokio::task::spawn_blocking(move || {
            client.remove("cart").unwrap();
            client
        })
        .await
        .unwrap();
        if round == 0 {
            let ports = listening(&good);
            assert!(
                !ports.contains(":1500"),
                "a removed pod's ports close before remove answers, whatever is still open: {ports}"
            );
        }
        drop(idle);
    }
    // Removal drains in the background (grace 1 s); then everything is back to the
    // baseline.
    let settled = async {
        loop {
            let now = (open_fds(), runtime.metrics().num_alive_tasks());
            if now.0 <= baseline.0 && now.1 <= baseline.1 {
                return now;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let now = tokio::time::timeout(Duration::from_secs(15), settled)
        .await
        .unwrap_or_else(|_| {
            panic!(
                "leak: fds/tasks {:?} after 20 cycles, baseline {baseline:?}",
                (open_fds(), runtime.metrics().num_alive_tasks())
            )
        });
    eprintln!("fds/tasks: baseline {baseline:?}, after 20 add/remove cycles {now:?}");
    assert!(
        !listening(&good).contains("1500"),
        "no listener left after remove"
    );

    drop(client);
    shutdown.cancel();
    task.await.unwrap().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[ignore = "needs root"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_node_proxy_takes_over_the_listeners() {
    let id = std::process::id();
    let dir = std::env::temp_dir().join(format!("weft-np-takeover-{id}"));
    let control = controller(&dir, &[("cart", "10.250.2.2")]).await;
    let pod_a = dir.join("pod-a");
    let (shutdown_a, task_a) = run_in_pod(&dir, &control, &pod_a);
    let handoff = dir.join("handoff.sock");
    let ns = TestNetns::new(&format!("np{id}-take"), Some("10.250.2.2"));
    let ns_file = ns.file();
    let client = tokio::task::spawn_blocking({
        let handoff = handoff.clone();
        move || {
            let mut client = connect(&handoff);
            client
                .add(&pod("cart", "10.250.2.2"), ns_file.as_fd(), None)
                .unwrap();
            client
        }
    })
    .await
    .unwrap();
    let ports = |ns: &TestNetns| {
        let l = listening(ns);
        ["127.0.0.1:15001", "10.250.2.2:15006", "10.250.2.2:15008"]
            .iter()
            .all(|p| l.contains(p))
    };
    assert!(ports(&ns), "{}", listening(&ns));

    // A takeover that is abandoned: changes are refused while it lasts, then accepted.
    let client = tokio::task::spawn_blocking({
        let handoff = handoff.clone();
        move || {
            let mut client = client;
            let mut taker = connect(&handoff);
            let handed = taker.take_over().unwrap();
            assert_eq!(handed.pods.len(), 1);
            let refused = client.remove("no-such-uid").unwrap_err().to_string();
            assert!(refused.contains("handing its pods"), "{refused}");
            let second = connect(&handoff).take_over().unwrap_err().to_string();
            assert!(second.contains("already taking over"), "{second}");
            drop((taker, handed));
            let start = Instant::now();
            while let Err(e) = client.remove("no-such-uid") {
                assert!(
                    start.elapsed() < Duration::from_secs(5),
                    "still refused: {e}"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
            client
        }
    })
    .await
    .unwrap();
    drop(client);

    // A real one: a second node-proxy on the same files. The first drains and ends by
    // itself; the pod's ports never stop listening, now held by the second: the very
    // same sockets (inodes), not new ones.
    let sockets = |ns: &TestNetns| {
        let out = Command::new("ip")
            .args(["netns", "exec", &ns.0, "ss", "-Hltne"])
            .output()
            .unwrap();
        let mut inodes: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .filter(|w| w.starts_with("ino:"))
            .map(str::to_owned)
            .collect();
        inodes.sort();
        inodes
    };
    let before = sockets(&ns);
    assert_eq!(before.len(), 3, "{before:?}");
    let pod_b = dir.join("pod-b");
    let (shutdown_b, task_b) = run_in_pod(&dir, &control, &pod_b);
    // Once the second confirms, the first says so in its pod's directory, drains, and
    // stays retired until its pod is deleted.
    let retired = pod_a.join("retired");
    let said = tokio::time::timeout(Duration::from_secs(20), async {
        while !retired.exists() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(
        said.is_ok(),
        "the first node-proxy records that it was taken over"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        !task_a.is_finished(),
        "retired, it waits for its pod's deletion"
    );
    shutdown_a.cancel();
    let ended = tokio::time::timeout(Duration::from_secs(20), task_a).await;
    assert!(
        matches!(ended, Ok(Ok(Ok(())))),
        "deleted, the retired node-proxy exits: {ended:?}"
    );
    // Its container restarted (the same pod directory): it does not take the node back.
    let (shutdown_a2, task_a2) = run_in_pod(&dir, &control, &pod_a);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        !pod_b.join("retired").exists() && !task_b.is_finished(),
        "the second node-proxy still serves: it was not taken over"
    );
    shutdown_a2.cancel();
    let ended = tokio::time::timeout(Duration::from_secs(20), task_a2).await;
    assert!(matches!(ended, Ok(Ok(Ok(())))), "{ended:?}");
    assert!(ports(&ns), "still listening: {}", listening(&ns));
    assert_eq!(sockets(&ns), before, "the same listening sockets");
    // The second one serves the pod already: a replayed add changes nothing.
    let ns_file = ns.file();
    tokio::task::spawn_blocking(move || {
        let mut client = connect(&handoff);
        client
            .add(&pod("cart", "10.250.2.2"), ns_file.as_fd(), None)
            .unwrap();
    })
    .await
    .unwrap();
    assert_eq!(sockets(&ns), before, "a replay opens no new listeners");
    shutdown_b.cancel();
    task_b.await.unwrap().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

/// Plays a running node-proxy on `path` for one takeover: answers `hello`, then
/// `takeover` with the admin listener and one pod part carrying `fds` (namespace and
/// three listeners), and returns the types of the messages that follow until the
/// taker hangs up.
fn fake_old_node_proxy(
    path: &Path,
    pod: PodInfo,
    fds: [std::os::fd::RawFd; 4],
) -> std::thread::JoinHandle<Vec<String>> {
    use nix::sys::socket::{recv, sendmsg, ControlMessage, MsgFlags};
    use socket2::{Domain, SockAddr, Socket, Type};
    use std::os::fd::AsRawFd;
    let _ = std::fs::remove_file(path);
    let listener = Socket::new(Domain::UNIX, Type::SEQPACKET, None).unwrap();
    listener.bind(&SockAddr::unix(path).unwrap()).unwrap();
    listener.listen(1).unwrap();
    let admin = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    std::thread::spawn(move || {
        let (conn, _) = listener.accept().unwrap();
        let fd = conn.as_raw_fd();
        let mut buf = vec![0u8; 64 * 1024];
        let mut next = || -> Option<serde_json::Value> {
            let n = recv(fd, &mut buf, MsgFlags::empty()).unwrap();
            (n > 0).then(|| serde_json::from_slice(&buf[..n]).unwrap())
        };
        let send = |message: serde_json::Value, fds: &[std::os::fd::RawFd]| {
            let bytes = serde_json::to_vec(&message).unwrap();
            let rights = [ControlMessage::ScmRights(fds)];
            let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &rights };
            sendmsg::<()>(
                fd,
                &[std::io::IoSlice::new(&bytes)],
                cmsgs,
                MsgFlags::empty(),
                None,
            )
            .unwrap();
        };
        assert_eq!(next().unwrap()["type"], "hello");
        send(serde_json::json!({"ok": true, "version": 1}), &[]);
        assert_eq!(next().unwrap()["type"], "takeover");
        send(serde_json::json!({"type": "admin"}), &[admin.as_raw_fd()]);
        send(serde_json::json!({"type": "pod", "pod": pod}), &fds);
        send(serde_json::json!({"ok": true}), &[]);
        let mut seen = Vec::new();
        while let Some(message) = next() {
            seen.push(message["type"].as_str().unwrap_or_default().to_owned());
            send(serde_json::json!({"ok": true}), &[]);
        }
        seen
    })
}

#[ignore = "needs root"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_of_another_pod_is_not_taken_over() {
    use std::os::fd::AsRawFd;
    let id = std::process::id();
    let dir = std::env::temp_dir().join(format!("weft-np-mixed-{id}"));
    let control = controller(&dir, &[("a", "10.250.3.2")]).await;
    let a = TestNetns::new(&format!("np{id}-mixa"), Some("10.250.3.2"));
    let b = TestNetns::new(&format!("np{id}-mixb"), Some("10.250.3.3"));
    let (in_a, in_b) = (
        Netns::enter(a.file().into(), "shop/a").unwrap(),
        Netns::enter(b.file().into(), "shop/b").unwrap(),
    );
    async fn listen(ns: &Netns, addr: &str) -> std::net::TcpListener {
        let listener = ns.listen(addr.parse().unwrap()).await.unwrap();
        listener.into_std().unwrap()
    }
    let a_outbound = listen(&in_a, "127.0.0.1:15001").await;
    let b_outbound = listen(&in_b, "127.0.0.1:15001").await;
    let a_plaintext = listen(&in_a, "10.250.3.2:15006").await;
    let a_hbone = listen(&in_a, "10.250.3.2:15008").await;
    let a_file = a.file();
    let path = dir.join("handoff.sock");

    // Pod a handed over with b's 127.0.0.1:15001: same address, other pod. Serving it
    // would give b's applications a's identity; the taker must give up instead.
    let fake = fake_old_node_proxy(
        &path,
        pod("a", "10.250.3.2"),
        [
            a_file.as_raw_fd(),
            b_outbound.as_raw_fd(),
            a_plaintext.as_raw_fd(),
            a_hbone.as_raw_fd(),
        ],
    );
    let (_shutdown, task) = run_in(&dir, &control);
    let ended = tokio::time::timeout(Duration::from_secs(30), task).await;
    let err = match ended {
        Ok(Ok(Err(e))) => format!("{e:#}"),
        other => panic!("the takeover must fail: {other:?}"),
    };
    assert!(
        err.contains("127.0.0.1:15001 is not in its network namespace") && err.contains("shop/a"),
        "{err}"
    );
    let seen = tokio::task::spawn_blocking(move || fake.join().unwrap())
        .await
        .unwrap();
    assert!(!seen.contains(&"takeover_done".to_owned()), "{seen:?}");

    // The same with a's own listener is taken over and confirmed, also when the pod has
    // an IPv6 address and the listeners are an earlier release's IPv4 ones (a pod with
    // IPv6 gets [::] listeners now).
    let mut dual = pod("a", "10.250.3.2");
    dual.ips.push("fd00:250:3::2".parse().unwrap());
    let fake = fake_old_node_proxy(
        &path,
        dual,
        [
            a_file.as_raw_fd(),
            a_outbound.as_raw_fd(),
            a_plaintext.as_raw_fd(),
            a_hbone.as_raw_fd(),
        ],
    );
    let (shutdown, task) = run_in(&dir, &control);
    let seen = tokio::task::spawn_blocking(move || fake.join().unwrap())
        .await
        .unwrap();
    assert_eq!(seen, ["takeover_done"]);
    shutdown.cancel();
    task.await.unwrap().unwrap();
    drop((in_a, in_b));
    let _ = std::fs::remove_dir_all(&dir);
}

/// Opens a connection from inside `ns` as its application would (no mark, so the
/// capture rules apply) and holds it.
async fn app_connect(ns: &Netns, to: &str) -> std::net::TcpStream {
    let to: std::net::SocketAddr = to.parse().unwrap();
    ns.run(move || std::net::TcpStream::connect_timeout(&to, Duration::from_secs(5)))
        .await
        .unwrap()
        .unwrap()
}

#[ignore = "needs root"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_limits_hold_connections_back_per_listener_and_per_node() {
    let id = std::process::id();
    for (case, per_listener, per_node) in [("listener", 2, 100), ("node", 100, 2)] {
        let dir = std::env::temp_dir().join(format!("weft-np-limit-{case}-{id}"));
        let control = controller(&dir, &[("lim", "10.250.5.2")]).await;
        let (shutdown, task) = run_limited(&dir, &control, per_listener, per_node, None);
        let ns = TestNetns::new(&format!("np{id}-lim{}", &case[..1]), Some("10.250.5.2"));
        // A destination outside the mesh, across the veth in a namespace of its own,
        // that holds the connections it accepts.
        let far = TestNetns::new(&format!("np{id}-far{}", &case[..1]), None);
        ip(&["-n", &far.0, "link", "del", "eth0"]);
        ip(&["-n", &ns.0, "link", "set", "eth1", "netns", &far.0]);
        ip(&["-n", &far.0, "addr", "add", "10.250.5.99/24", "dev", "eth1"]);
        ip(&["-n", &far.0, "link", "set", "eth1", "up"]);
        let far_ns = Netns::enter(far.file().into(), "far").unwrap();
        let server = far_ns
            .listen("10.250.5.99:7000".parse().unwrap())
            .await
            .unwrap();
        let netns = Netns::enter(ns.file().into(), "shop/lim").unwrap();
        weft_node_agent::capture::install(
            netns.fd(),
            "shop/lim",
            weft_node_agent::capture::PROBE_SOURCE,
            false,
        )
        .await
        .unwrap();
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = server.accept().await {
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                // Held until the client hangs up, then closed.
                tokio::spawn(async move {
                    use tokio::io::AsyncReadExt;
                    let _ = s.read_to_end(&mut Vec::new()).await;
                });
            }
        });
        let handoff = dir.join("handoff.sock");
        let file = ns.file();
        tokio::task::spawn_blocking(move || {
            connect(&handoff)
                .add(&pod("lim", "10.250.5.2"), file.as_fd(), None)
                .unwrap()
        })
        .await
        .unwrap();
        let seen = |n: usize| {
            let accepted = accepted.clone();
            async move {
                for _ in 0..100 {
                    if accepted.load(std::sync::atomic::Ordering::SeqCst) >= n {
                        return true;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                false
            }
        };
        // Three application connections, each relayed through node-proxy to the server:
        // only two are let through; the third waits in the listener's backlog.
        let mut clients = Vec::new();
        for _ in 0..3 {
            clients.push(app_connect(&netns, "10.250.5.99:7000").await);
        }
        assert!(seen(2).await, "{case}: two connections are relayed");
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(
            accepted.load(std::sync::atomic::Ordering::SeqCst),
            2,
            "{case} limit of 2: the third connection is held back"
        );
        // One ends: the third goes through.
        drop(clients.remove(0));
        assert!(
            seen(3).await,
            "{case}: the held-back connection is served once one ends"
        );
        drop(clients);
        drop(netns);
        shutdown.cancel();
        task.await.unwrap().unwrap();
        control.stop().await;
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[ignore = "needs root"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_handed_over_before_the_model_knows_it_waits_for_it() {
    let id = std::process::id();
    let dir = std::env::temp_dir().join(format!("weft-np-late-{id}"));
    let control = controller(&dir, &[]).await;
    let (shutdown, task, handoff) = start(&dir, &control);
    let late = TestNetns::new(&format!("np{id}-late"), Some("10.250.6.2"));
    let file = late.file();
    let path = handoff.clone();
    let added = tokio::task::spawn_blocking(move || {
        connect(&path).add(&pod("late", "10.250.6.2"), file.as_fd(), None)
    });
    // The handoff came first (the CNI plugin runs before the controller has seen the
    // pod); its workload reaches the model a moment later.
    tokio::time::sleep(Duration::from_millis(500)).await;
    control
        .write(
            "pod-late.yaml",
            &pod_yaml("shop", "late", "late", "node-1", "cart", "10.250.6.2", &[]),
        )
        .unwrap();
    added
        .await
        .unwrap()
        .expect("the pod is served once its workload arrives");
    assert!(listening(&late).contains("10.250.6.2:15008"));
    // One the controller never sends is refused after the wait, saying why.
    let never = TestNetns::new(&format!("np{id}-never"), Some("10.250.6.3"));
    let file = never.file();
    let refused = tokio::task::spawn_blocking(move || {
        connect(&handoff).add(&pod("never", "10.250.6.3"), file.as_fd(), None)
    })
    .await
    .unwrap();
    match refused {
        Err(HandoffError::Rejected(msg)) => assert!(
            msg.contains("shop/never") && msg.contains("not in the mesh model after 2 s"),
            "{msg}"
        ),
        other => panic!("expected a refusal, got {other:?}"),
    }
    shutdown.cancel();
    task.await.unwrap().unwrap();
    control.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}
