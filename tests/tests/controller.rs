//! The controller end to end in the sandbox: edits to the manifests take effect live
//! (enrollment, policy, scaling, DNS), the mesh serves on while the controller is away
//! and resumes without a full resend, certificates rotate under load, and no
//! node-proxy holds a CA key or gets another node's identities.

#![allow(clippy::unwrap_used)] // a test fails by panicking

use std::path::PathBuf;
use std::time::{Duration, Instant};

use weft_e2e::{
    eventually, metric_sum, repo_root, weftctl, Load, Sandbox, TempManifests, DENY_CLIENT,
};

fn mesh() -> PathBuf {
    repo_root().join("tests/manifests/mesh")
}

const A: &str = "shop/client";
const B: &str = "shop/echo";

/// A metric of the controller, summed.
fn controller_metric(sb: &Sandbox, name: &str, labels: &[(&str, &str)]) -> f64 {
    let text = sb.controller_metrics().unwrap_or_default();
    if labels.is_empty() {
        return text
            .lines()
            .filter(|l| l.split_whitespace().next() == Some(name))
            .filter_map(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
            .sum();
    }
    metric_sum(&text, name, labels)
}

#[test]
#[ignore = "needs root"]
fn a_deny_policy_closes_an_open_connection_and_refuses_new_ones() {
    let manifests = TempManifests::copy(&mesh()).unwrap();
    let sb = Sandbox::up("e2e-deny", manifests.path()).unwrap();
    let b_ip = sb.ip(B).unwrap();
    // A long-lived connection from A to B's TCP echo: cat reads until it closes.
    let script = format!("exec 3<>/dev/tcp/{b_ip}/9000; echo hello >&3; exec cat <&3");
    let mut held = sb.spawn(A, &["bash", "-c", &script]).unwrap();
    let open = eventually(Duration::from_secs(10), || {
        let m = sb.metrics("node-2").ok()?;
        let labels = [
            ("direction", "inbound"),
            ("source_workload", "client"),
            ("destination_workload", "echo"),
        ];
        (metric_sum(&m, "weft_tcp_connections_opened_total", &labels) >= 1.0).then_some(())
    });
    assert!(open.is_some(), "the connection is open");
    assert!(held.try_wait().unwrap().is_none(), "and stays open");

    manifests.write("50-deny.yaml", DENY_CLIENT).unwrap();
    let written = Instant::now();
    let took = eventually(Duration::from_secs(10), || {
        held.try_wait().unwrap().map(|_| written.elapsed())
    })
    .expect("the open connection is closed");
    eprintln!(
        "a DENY policy: the open connection closed {} ms after the edit",
        took.as_millis()
    );
    let (code, body) = sb.curl(A, &format!("http://{b_ip}:8080/denied")).unwrap();
    assert_ne!(code, 0, "a new connection is refused: {body}");
    // Others are not affected.
    let (code, body) = sb
        .curl("shop/admin", &format!("http://{b_ip}:8080/admin"))
        .unwrap();
    assert_eq!(code, 0, "{body}");
    let m = sb.metrics("node-2").unwrap();
    for when in ["recheck", "connect"] {
        let n = metric_sum(
            &m,
            "weft_authorization_denials_total",
            &[
                ("policy", "shop/deny-client"),
                ("reason", "deny_policy"),
                ("when", when),
            ],
        );
        assert!(n >= 1.0, "counted {when}: {m}");
    }
    let log = sb.node_log("node-2");
    assert!(
        log.contains("open connection closed") && log.contains("shop/deny-client"),
        "the close is logged with the policy:\n{log}"
    );
    // The policy removed: allowed again.
    std::fs::remove_file(manifests.path().join("50-deny.yaml")).unwrap();
    let again = eventually(Duration::from_secs(10), || {
        let (code, _) = sb.curl(A, &format!("http://{b_ip}:8080/again")).ok()?;
        (code == 0).then_some(())
    });
    assert!(again.is_some(), "allowed once the policy is gone");
}

#[test]
#[ignore = "needs root"]
fn the_mesh_serves_on_while_the_controller_is_away_and_resyncs_without_a_full_resend() {
    let mut sb = Sandbox::up("e2e-away", &mesh()).unwrap();
    let load = Load::start(
        &sb.netns(A).unwrap(),
        "http://echo.shop/away",
        Duration::from_millis(100),
        Duration::from_secs(150),
    );
    sb.run_local(&["controller", "stop"]).unwrap();
    sb.refresh().unwrap();
    assert_eq!(sb.controller_pid(), 0, "the controller is gone");
    std::thread::sleep(Duration::from_secs(60));
    sb.run_local(&["controller", "start"]).unwrap();
    sb.refresh().unwrap();
    // Both node-proxies come back, each resumed by digests: nothing had changed.
    let resynced = eventually(Duration::from_secs(30), || {
        let subscribed = controller_metric(&sb, "weft_controller_subscribers", &[]);
        let resyncs = controller_metric(&sb, "weft_controller_pushes_total", &[("kind", "resync")]);
        (subscribed == 2.0 && resyncs == 2.0).then_some(())
    });
    assert!(
        resynced.is_some(),
        "both node-proxies resubscribe:\n{}",
        sb.controller_metrics().unwrap_or_default()
    );
    std::thread::sleep(Duration::from_secs(2));
    let (requests, failed) = load.stop();
    eprintln!(
        "{requests} requests while the controller was away and back, {} failed",
        failed.len()
    );
    assert!(requests >= 100, "the load ran ({requests})");
    assert!(failed.is_empty(), "no request fails: {failed:?}");
    assert_eq!(
        controller_metric(&sb, "weft_controller_pushes_total", &[("kind", "full")]),
        0.0,
        "no full resend after the restart"
    );
    assert_eq!(
        controller_metric(&sb, "weft_controller_pushed_resources_total", &[]),
        0.0,
        "every bucket matched: no resource resent"
    );
    for node in ["node-1", "node-2"] {
        assert!(
            sb.node_log(node).contains("serving the last model"),
            "{node} said what it does"
        );
    }
}

/// The last lines of a log, access logs left out.
fn tail(log: &str) -> String {
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| !l.starts_with("{\"start_time\""))
        .collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

/// The node-proxies subscribed to a controller replica, from its `/debug/status`.
fn subscribed_nodes(admin: std::net::SocketAddr) -> Vec<String> {
    let Ok((200, body)) = weft_e2e::http_get(admin, "/debug/status") else {
        return Vec::new();
    };
    let status: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    let mut nodes: Vec<String> = status["subscribers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s["node"].as_str().map(str::to_owned))
        .filter(|n| n.starts_with("node-"))
        .collect();
    nodes.sort();
    nodes
}

/// Two controller replicas, as the install runs, under a request loop: the one every
/// node-proxy is subscribed to, which also holds the Lease and writes the statuses,
/// dies (killed, and kept down); the node-proxies subscribe to the other, which takes
/// the Lease once it runs out and writes the status of a route added then. The first
/// comes back, and the other is killed (SIGKILL) and restarted as a Deployment's pod is;
/// the node-proxies subscribe again. No request fails.
#[test]
#[ignore = "needs root"]
fn a_controller_replica_killed_under_load_fails_no_request() {
    const LEASE: Duration = Duration::from_secs(3);
    let manifests = TempManifests::copy(&mesh()).unwrap();
    let mut sb = Sandbox::up_with_env(
        "e2e-ha",
        manifests.path(),
        &["--controller-replicas", "2"],
        &[("WEFT_LEASE_DURATION", "3s")],
    )
    .unwrap();
    let replicas = sb.controller_replicas();
    assert_eq!(replicas.len(), 2, "two replicas run");
    let both = vec!["node-1".to_owned(), "node-2".to_owned()];
    let (first, second) = (replicas[0].0, replicas[1].0);
    let debug_status = |admin| -> serde_json::Value {
        weft_e2e::http_get(admin, "/debug/status")
            .ok()
            .and_then(|(_, b)| serde_json::from_str(&b).ok())
            .unwrap_or_default()
    };
    // The first replica, started first, holds the Lease and writes the statuses.
    let leads = eventually(Duration::from_secs(10), || {
        (debug_status(first)["leading"] == true && debug_status(second)["leading"] == false)
            .then_some(())
    });
    assert!(
        leads.is_some(),
        "the first replica leads, the second follows"
    );
    let second_identity = debug_status(second)["identity"]
        .as_str()
        .unwrap()
        .to_owned();
    let status_file = sb.state_dir.join("status/httproute/shop/to-nowhere.yaml");
    // Every proxy tries the first replica first.
    let subscribed = eventually(Duration::from_secs(20), || {
        (subscribed_nodes(first) == both).then_some(())
    });
    assert!(
        subscribed.is_some(),
        "both node-proxies subscribe to the first replica"
    );
    let load = Load::start(
        &sb.netns(A).unwrap(),
        "http://echo.shop/ha",
        Duration::from_millis(50),
        Duration::from_secs(90),
    );
    std::thread::sleep(Duration::from_secs(1));

    // The first replica dies (as a crash: no goodbye) and stays down a while.
    sb.run_local(&["controller", "stop"]).unwrap();
    let killed = Instant::now();
    let moved = eventually(Duration::from_secs(20), || {
        (subscribed_nodes(second) == both).then_some(())
    });
    let failover = killed.elapsed();
    assert!(
        moved.is_some(),
        "both node-proxies subscribe to the other replica: {:?}\nnode-1:\n{}\nnode-2:\n{}",
        subscribed_nodes(second),
        tail(&sb.node_log("node-1")),
        tail(&sb.node_log("node-2"))
    );
    // The second takes the Lease once it has run out, and writes the statuses: a route
    // added now gets its status from it.
    let took_over = eventually(Duration::from_secs(15), || {
        (debug_status(second)["leading"] == true).then(|| killed.elapsed())
    })
    .expect("the second replica takes the Lease");
    assert!(
        took_over <= LEASE * 2,
        "within the lease's duration: {took_over:?}"
    );
    manifests
        .write(
            "route.yaml",
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: to-nowhere, namespace: shop}\n\
             spec:\n  parentRefs: [{group: \"\", kind: Service, name: echo}]\n  rules: [{backendRefs: [{name: nowhere, port: 80}]}]\n",
        )
        .unwrap();
    let written = eventually(Duration::from_secs(10), || {
        let text = std::fs::read_to_string(&status_file).ok()?;
        (text.contains(&second_identity) && text.contains("BackendNotFound")).then_some(text)
    });
    assert!(
        written.is_some(),
        "the new leader writes the route's status: {:?}",
        std::fs::read_to_string(&status_file)
    );
    // `weftctl check` reads every replica: node-proxies on the second are in sync.
    let checked = eventually(Duration::from_secs(10), || {
        let out = std::process::Command::new(weftctl().unwrap())
            .args(["check", "--local", &sb.name, "--state-dir"])
            .arg(&sb.state_dir)
            .output()
            .ok()?;
        out.status.success().then_some(())
    });
    assert!(
        checked.is_some(),
        "weftctl check is clean with the first replica down"
    );
    std::thread::sleep(Duration::from_secs(2));
    sb.run_local(&["controller", "start"]).unwrap();
    let back = eventually(Duration::from_secs(30), || {
        weft_e2e::http_get(first, "/ready")
            .ok()
            .filter(|(code, _)| *code == 200)
    });
    assert!(back.is_some(), "the first replica is back");

    // The second replica is killed; the sandbox restarts it, as a Deployment would.
    sb.refresh().unwrap();
    let second_pid = sb.controller_replicas()[1].1;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(second_pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let resubscribed = eventually(Duration::from_secs(30), || {
        sb.refresh().ok()?;
        let pid = sb.controller_replicas()[1].1;
        let mut nodes = subscribed_nodes(first);
        nodes.extend(subscribed_nodes(second));
        nodes.sort();
        (pid != second_pid && pid != 0 && nodes == both).then_some(())
    });
    assert!(
        resubscribed.is_some(),
        "the killed replica is restarted and every node-proxy subscribed again"
    );
    std::thread::sleep(Duration::from_secs(2));
    let (requests, failed) = load.stop();
    eprintln!(
        "{requests} requests; node-proxies on the other replica {} ms after the first died; {} failed",
        failover.as_millis(),
        failed.len()
    );
    assert!(requests >= 50, "the load ran ({requests})");
    assert!(failed.is_empty(), "no request fails: {failed:?}");
    for node in ["node-1", "node-2"] {
        assert!(
            sb.node_log(node)
                .contains("connected to another controller replica"),
            "{node} says it failed over"
        );
    }
}

#[test]
#[ignore = "needs root"]
fn a_leaf_rotation_under_load_fails_no_request() {
    // Leaves of 8 s, renewed at half-life: two rotations in the 12 s below.
    let sb = Sandbox::up_with("e2e-rotate", &mesh(), &["--leaf-ttl", "8s"]).unwrap();
    let load = Load::start(
        &sb.netns(A).unwrap(),
        "http://echo.shop/rotate",
        Duration::from_millis(50),
        Duration::from_secs(60),
    );
    let rotations = |sb: &Sandbox, node: &str| -> f64 {
        sb.metrics(node)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.starts_with("weft_certificate_rotations_total "))
            .filter_map(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
            .sum()
    };
    // Counted from here: the sandbox may have rotated already while it came up. Each
    // node serves two identities, each rotated twice.
    let before = [rotations(&sb, "node-1"), rotations(&sb, "node-2")];
    let rotated = eventually(Duration::from_secs(30), || {
        let done = ["node-1", "node-2"]
            .iter()
            .zip(before)
            .all(|(node, b)| rotations(&sb, node) >= b + 4.0);
        done.then_some(())
    });
    let (requests, failed) = load.stop();
    assert!(
        rotated.is_some(),
        "each node-proxy rotated each of its leaves twice"
    );
    eprintln!(
        "{requests} requests across two rotations, {} failed",
        failed.len()
    );
    assert!(requests >= 50, "the load ran ({requests})");
    assert!(failed.is_empty(), "no request fails: {failed:?}");
}

#[test]
#[ignore = "needs root"]
fn node_proxies_hold_no_ca_key_and_cannot_get_another_nodes_identities() {
    let sb = Sandbox::up("e2e-ca", &mesh()).unwrap();
    let key = std::fs::read_to_string(sb.state_dir.join("ca/root-key.pem")).unwrap();
    assert!(
        key.contains("PRIVATE KEY"),
        "the controller's root key exists"
    );
    for node in ["node-1", "node-2"] {
        let pid = sb.node_pid(node).unwrap();
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        assert!(
            !args
                .iter()
                .any(|a| a.contains("root-key") || a.contains("ca-key")),
            "{node}: {args:?}"
        );
        for arg in &args {
            if let Ok(text) = std::fs::read_to_string(arg) {
                assert!(
                    !text.contains("PRIVATE KEY"),
                    "{node} is given a key in {arg}"
                );
            }
        }
        for fd in std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .flatten()
        {
            let target = std::fs::read_link(fd.path()).unwrap_or_default();
            assert!(
                !target.to_string_lossy().contains("root-key"),
                "{node} holds {target:?} open"
            );
        }
    }
    // node-1's token asks for an identity only node-2 runs.
    let ask = |identity: &str| {
        std::process::Command::new(weftctl().unwrap())
            .args(["debug", "certificate", "--controller"])
            .arg(sb.state["controller"]["grpc"].as_str().unwrap())
            .arg("--controller-ca")
            .arg(sb.state_dir.join("ca/root.pem"))
            .arg("--token-file")
            .arg(sb.state_dir.join("node-1/token"))
            .args(["--identity", identity])
            .output()
            .unwrap()
    };
    let own = ask("spiffe://cluster.local/ns/shop/sa/client");
    assert!(
        own.status.success(),
        "{}",
        String::from_utf8_lossy(&own.stderr)
    );
    assert!(String::from_utf8_lossy(&own.stdout)
        .starts_with("signed: spiffe://cluster.local/ns/shop/sa/client"));
    let stolen = ask("spiffe://cluster.local/ns/shop/sa/echo");
    let err = String::from_utf8_lossy(&stolen.stderr);
    assert!(
        !stolen.status.success(),
        "another node's identity is not signed"
    );
    assert!(
        err.contains("refused") && err.contains("node node-1"),
        "{err}"
    );
    let log = std::fs::read_to_string(sb.state_dir.join("logs/controller.log")).unwrap();
    assert!(
        log.lines().any(|l| l.contains("certificate refused")
            && l.contains("spiffe://cluster.local/ns/shop/sa/echo")
            && l.contains("node-1")),
        "the refusal is logged with node and identity:\n{log}"
    );
    assert_eq!(
        controller_metric(&sb, "weft_ca_refusals_total", &[("reason", "not_on_node")]),
        1.0
    );
}

#[test]
#[ignore = "needs root"]
fn scaling_a_deployment_and_adding_a_service_take_effect_live() {
    let manifests = TempManifests::copy(&repo_root().join("tests/manifests/scale")).unwrap();
    let mut sb = Sandbox::up("e2e-scale", manifests.path()).unwrap();
    let pods_seen = |sb: &Sandbox, url: &str, n: usize| {
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..n {
            let (code, body) = sb.curl("apps/client", url).unwrap();
            assert_eq!(code, 0, "{body}");
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            seen.insert(v["pod"].as_str().unwrap().to_owned());
        }
        seen
    };
    // web-0 is an endpoint once its readiness probe passes.
    let ready = eventually(Duration::from_secs(10), || {
        let (code, _) = sb.curl("apps/client", "http://web/").ok()?;
        (code == 0).then_some(())
    });
    assert!(ready.is_some(), "web-0 becomes ready");
    assert_eq!(pods_seen(&sb, "http://web/", 4).len(), 1);
    let web = std::fs::read_to_string(manifests.path().join("web.yaml")).unwrap();
    manifests
        .write("web.yaml", &web.replace("replicas: 1", "replicas: 3"))
        .unwrap();
    let scaled = eventually(Duration::from_secs(20), || {
        sb.refresh().ok()?;
        let running = sb.state["pods"]
            .as_array()?
            .iter()
            .filter(|p| {
                p["namespace"] == "apps"
                    && p["name"].as_str().is_some_and(|n| n.starts_with("web-"))
            })
            .count();
        (running == 3).then_some(())
    });
    assert!(scaled.is_some(), "three replicas run");
    let spread = eventually(Duration::from_secs(20), || {
        (pods_seen(&sb, "http://web.apps.svc.cluster.local/", 12).len() == 3).then_some(())
    });
    assert!(
        spread.is_some(),
        "the service's endpoints follow the Deployment"
    );
    // A new service: its name resolves in the pods at once, and it answers.
    manifests
        .write(
            "web2.yaml",
            "apiVersion: v1\nkind: Service\nmetadata: {name: web2, namespace: apps}\nspec: {selector: {app: web}, ports: [{port: 81, targetPort: 8080}]}\n",
        )
        .unwrap();
    let resolved = eventually(Duration::from_secs(20), || {
        let out = sb
            .exec(
                "apps/client",
                &["getent", "hosts", "web2.apps.svc.cluster.local"],
            )
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    })
    .expect("the new service's name resolves");
    assert!(resolved.starts_with("10.96."), "{resolved}");
    let answered = eventually(Duration::from_secs(20), || {
        let (code, _) = sb.curl("apps/client", "http://web2:81/").ok()?;
        (code == 0).then_some(())
    });
    assert!(answered.is_some(), "the new service answers");
    // Scaled back down, under requests: the replicas going away are withdrawn from the
    // mesh while they still run (their objects carry deletionTimestamp), so no request
    // is sent to a stopped pod; then only the first replica is left and answers.
    let client = sb.netns("apps/client").unwrap();
    let loads: Vec<Load> = (0..2)
        .map(|_| {
            Load::start(
                &client,
                "http://web/",
                Duration::ZERO,
                Duration::from_secs(60),
            )
        })
        .collect();
    manifests.write("web.yaml", &web).unwrap();
    let down = eventually(Duration::from_secs(20), || {
        sb.refresh().ok()?;
        let running = sb.state["pods"]
            .as_array()?
            .iter()
            .filter(|p| p["name"].as_str().is_some_and(|n| n.starts_with("web-")))
            .count();
        (running == 1).then_some(())
    });
    assert!(down.is_some(), "scaled back to one");
    for load in loads {
        let (sent, failed) = load.stop();
        assert!(sent >= 10, "requests ran through the scale-down ({sent})");
        assert!(
            failed.is_empty(),
            "{} of {sent} failed: {failed:?}",
            failed.len()
        );
    }
    let settled = eventually(Duration::from_secs(20), || {
        let seen = pods_seen(&sb, "http://web/", 6);
        (seen.len() == 1 && seen.contains("web-0")).then_some(())
    });
    assert!(settled.is_some(), "only web-0 answers");
}
