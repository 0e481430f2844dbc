//! The L4 mesh end to end: pods in network namespaces on two simulated nodes, captured by
//! nftables, carried over HBONE between two node-proxy processes, driven by curl.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use weft_e2e::{
    capture_fabric, eventually, metric_sum, repo_root, server_hellos, weftctl, Sandbox,
};

fn manifests() -> PathBuf {
    repo_root().join("tests/manifests/mesh")
}

const A: &str = "shop/client";
const B: &str = "shop/echo";

#[test]
#[ignore = "needs root"]
fn pod_to_pod_by_ip_and_by_service() {
    let sb = Sandbox::up("e2e-ip", &manifests()).unwrap();
    let (a_ip, b_ip) = (sb.ip(A).unwrap(), sb.ip(B).unwrap());

    let (code, body) = sb.curl(A, &format!("http://{b_ip}:8080/by-ip")).unwrap();
    assert_eq!(code, 0, "curl by pod IP: {body}");
    assert!(body.contains("\"pod\":\"echo\""), "{body}");
    let (code, body) = sb.curl(A, "http://10.96.0.10/by-vip").unwrap();
    assert_eq!(code, 0, "curl by service VIP: {body}");
    assert!(body.contains("\"pod\":\"echo\""), "{body}");

    // B sees A's own pod IP as the client, for both requests.
    let log = sb.log(B).unwrap();
    for path in ["/by-ip", "/by-vip"] {
        assert!(
            log.lines()
                .any(|l| l.contains(&format!("client={a_ip}:"))
                    && l.contains(&format!("path={path}"))),
            "echo's log shows {a_ip} as the source of {path}:\n{log}"
        );
    }
    // Node 2 saw A's SPIFFE principal over mTLS.
    let seen = sb.inbound_mtls("node-2", "spiffe://cluster.local/ns/shop/sa/client", "echo");
    assert!(
        seen >= 2.0,
        "node-2 counts A's connections with its principal"
    );
}

#[test]
#[ignore = "needs root"]
fn byte_counters_move_while_a_connection_is_open() {
    let sb = Sandbox::up("e2e-bytes", &manifests()).unwrap();
    let b_ip = sb.ip(B).unwrap();
    // One connection from A to B's TCP echo: 300,000 bytes out, then held open.
    let script = format!("exec 3<>/dev/tcp/{b_ip}/9000; head -c 300000 /dev/zero >&3; sleep 30");
    let mut conn = sb.spawn(A, &["bash", "-c", &script]).unwrap();
    let counted = |node: &str, direction: &str, metric: &str| {
        let m = sb.metrics(node).ok()?;
        let labels = [("direction", direction), ("destination_workload", "echo")];
        Some(metric_sum(&m, metric, &labels))
    };
    let seen = eventually(Duration::from_secs(15), || {
        // Istio's meaning: the request direction (A to B) is "received", the response
        // direction (B's echo) "sent".
        let request_out = counted("node-1", "outbound", "weft_tcp_received_bytes_total")?;
        let request_in = counted("node-2", "inbound", "weft_tcp_received_bytes_total")?;
        let echoed = counted("node-2", "inbound", "weft_tcp_sent_bytes_total")?;
        (request_out >= 300_000.0 && request_in >= 300_000.0 && echoed > 0.0).then_some((
            request_out,
            request_in,
            echoed,
        ))
    });
    // Read while the connection is still open, then end it.
    let m = sb.metrics("node-2").unwrap();
    let still_open = conn.try_wait().unwrap().is_none();
    let _ = conn.kill();
    let _ = conn.wait();
    assert!(
        still_open,
        "the connection must still be open when its bytes are seen"
    );
    assert!(
        seen.is_some(),
        "both node-proxies count the open connection's bytes:\n{m}"
    );
    let closed = metric_sum(
        &m,
        "weft_tcp_connections_closed_total",
        &[("direction", "inbound"), ("destination_workload", "echo")],
    );
    assert_eq!(closed, 0.0, "counted before the close:\n{m}");

    // On close, each node-proxy writes one access-log line for it, bytes each way included.
    let line = eventually(Duration::from_secs(10), || {
        sb.node_log("node-2").lines().find_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).ok()?;
            (v["direction"] == "inbound"
                && v["destination_workload"] == "echo"
                && v["source_principal"] == "spiffe://cluster.local/ns/shop/sa/client")
                .then_some(v)
        })
    });
    let line = line.unwrap_or_else(|| panic!("no access-log line:\n{}", sb.node_log("node-2")));
    assert!(
        line["bytes_received"].as_u64() >= Some(300_000) && line["bytes_sent"].as_u64() > Some(0),
        "{line}"
    );
    assert_eq!(line["connection_security_policy"], "mutual_tls", "{line}");
    assert!(line["duration_ms"].as_f64() > Some(0.0), "{line}");
    assert!(
        line["source_address"]
            .as_str()
            .is_some_and(|a| a.starts_with(&format!("{}:", sb.ip(A).unwrap()))),
        "the client's own address: {line}"
    );

    // A connection whose directions differ: a 200 kB upload answered by a short reply.
    let upload = format!(
        "head -c 200000 /dev/zero | curl -s -o /dev/null --data-binary @- http://{b_ip}:8080/up"
    );
    let out = sb.exec(A, &["sh", "-c", &upload]).unwrap();
    assert!(out.status.success(), "{out:?}");
    let line = eventually(Duration::from_secs(10), || {
        sb.node_log("node-1").lines().find_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).ok()?;
            (v["direction"] == "outbound"
                && v["destination_address"] == format!("{b_ip}:8080").as_str())
            .then_some(v)
        })
    });
    let line = line.unwrap_or_else(|| panic!("no access-log line:\n{}", sb.node_log("node-1")));
    assert!(
        line["bytes_received"].as_u64() >= Some(200_000)
            && line["bytes_sent"].as_u64() < Some(100_000),
        "the request direction is bytes_received, the response bytes_sent: {line}"
    );
    assert_eq!(line["reason"], "closed", "{line}");
}

#[test]
#[ignore = "needs root"]
fn an_application_that_never_answers_is_given_up_on() {
    let sb = Sandbox::up("e2e-silent", &manifests()).unwrap();
    let b_ip = sb.ip(B).unwrap();
    // B's TCP echo stops answering: its SYNs vanish, as with a full accept queue.
    let drop_syn = "add table inet weft-test
        add chain inet weft-test in { type filter hook input priority 0; }
        add rule inet weft-test in tcp dport 9000 tcp flags syn drop";
    let out = sb.exec(B, &["nft", drop_syn]).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let out = sb
        .exec(
            A,
            &[
                "curl",
                "-sS",
                "--max-time",
                "60",
                &format!("http://{b_ip}:9000/"),
            ],
        )
        .unwrap();
    let code = out.status.code().unwrap_or(-1);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // 52: empty reply, 56: connection reset. Not 28: curl's own time limit.
    assert!(
        code == 52 || code == 56,
        "the client's connection ends with an error instead of hanging (curl exit {code}): {stderr}"
    );
    // node-2 gave up on the application and said so: a 503 counted as `unreachable`,
    // not the client side's own wait for an answer running out.
    let m = sb.metrics("node-2").unwrap();
    let refused = metric_sum(
        &m,
        "hbone_stream_refusals_total",
        &[("direction", "inbound"), ("reason", "unreachable")],
    );
    assert!(
        refused >= 1.0,
        "node-2 counts the unreachable application:\n{m}"
    );
    let log = sb.node_log("node-2");
    assert!(
        log.lines().any(|l| l.contains("HBONE stream refused")
            && l.contains(&format!("{b_ip}:9000"))
            && l.contains("no answer from")),
        "node-2 logs the refusal with its target and cause:\n{log}"
    );
}

#[test]
#[ignore = "needs root"]
fn fabric_capture_shows_tls13_and_no_plaintext() {
    let sb = Sandbox::up("e2e-pcap", &manifests()).unwrap();
    let b_ip = sb.ip(B).unwrap();
    let pcap = sb.state_dir.join("fabric.pcap");
    // Warm up with plaintext to a pod outside the mesh: the tunnel to B is not opened yet.
    let web_ip = sb.ip("legacy/web").unwrap();
    let tcpdump = capture_fabric(&sb, "tcp", &pcap, || {
        let _ = sb.curl(A, &format!("http://{web_ip}:8080/warm-up"));
    })
    .unwrap();
    let marker = "plaintext-must-not-appear-on-the-wire";
    let (code, body) = sb.curl(A, &format!("http://{b_ip}:8080/{marker}")).unwrap();
    assert_eq!(code, 0, "{body}");
    assert!(body.contains(marker), "the request arrived: {body}");
    tcpdump.stop();

    let bytes = std::fs::read(&pcap).unwrap();
    assert!(bytes.len() > 24 + 200, "the capture holds packets");
    assert!(
        !bytes.windows(marker.len()).any(|w| w == marker.as_bytes()),
        "the request's plaintext crossed the fabric"
    );
    // The tunnel is TLS 1.3 to port 15008, as tshark decodes it.
    let text = server_hellos(
        &pcap,
        &["tcp.srcport", "tls.handshake.extensions.supported_version"],
    )
    .unwrap();
    assert!(
        text.lines()
            .any(|l| l.starts_with("15008") && l.contains("0x0304")),
        "a ServerHello from port 15008 negotiating TLS 1.3 (0x0304): {text:?}"
    );
}

#[test]
#[ignore = "needs root"]
fn outside_the_mesh_and_strict_mode() {
    let sb = Sandbox::up("e2e-strict", &manifests()).unwrap();
    let (b_ip, vault_ip, web_ip) = (
        sb.ip(B).unwrap(),
        sb.ip("vault/secrets").unwrap(),
        sb.ip("legacy/web").unwrap(),
    );
    let outsider_ip = sb.ip("legacy/outsider").unwrap();

    // A pod outside the mesh reaches a meshed pod (permissive), with its own address.
    let (code, body) = sb
        .curl(
            "legacy/outsider",
            &format!("http://{b_ip}:8080/from-outside"),
        )
        .unwrap();
    assert_eq!(code, 0, "{body}");
    assert!(sb
        .log(B)
        .unwrap()
        .contains(&format!("client={outsider_ip}:")));

    // ...but not one in a STRICT namespace.
    let (code, body) = sb
        .curl("legacy/outsider", &format!("http://{vault_ip}:8080/"))
        .unwrap();
    assert_ne!(code, 0, "STRICT must refuse plaintext: {body}");
    let m = sb.metrics("node-2").unwrap();
    assert!(
        metric_sum(
            &m,
            "weft_inbound_refusals_total",
            &[("reason", "strict_mtls")]
        ) >= 1.0,
        "{m}"
    );
    // A meshed client does reach the STRICT pod (over mTLS).
    let (code, body) = sb.curl(A, &format!("http://{vault_ip}:8080/")).unwrap();
    assert_eq!(code, 0, "{body}");

    // A meshed pod reaches a pod outside the mesh directly: plain TCP, no tunnel.
    let (code, body) = sb
        .curl(A, &format!("http://{web_ip}:8080/to-legacy"))
        .unwrap();
    assert_eq!(code, 0, "{body}");
    let m = sb.metrics("node-1").unwrap();
    let plain = metric_sum(
        &m,
        "weft_tcp_connections_opened_total",
        &[
            ("direction", "outbound"),
            ("destination_workload", "web"),
            ("connection_security_policy", "none"),
        ],
    );
    assert!(
        plain >= 1.0,
        "node-1 passed the connection through in plaintext:\n{m}"
    );
    let web_log = sb.log("legacy/web").unwrap();
    assert!(
        web_log.contains(&format!("client={}:", sb.ip(A).unwrap())),
        "{web_log}"
    );
}

#[test]
#[ignore = "needs root"]
fn stolen_certificate_is_refused() {
    let sb = Sandbox::up("e2e-steal", &manifests()).unwrap();
    let b_ip = sb.ip(B).unwrap();
    // The mesh root, as an attacker who stole it would hold it: node-proxies never see it.
    let ca_cert = sb.state_dir.join("ca/root.pem");
    let ca_key = sb.state_dir.join("ca/root-key.pem");
    let weftctl = weftctl().unwrap();
    let attempt = |identity: &str| {
        sb.exec(
            A,
            &[
                weftctl.to_str().unwrap(),
                "debug",
                "hbone",
                "--ca-cert",
                ca_cert.to_str().unwrap(),
                "--ca-key",
                ca_key.to_str().unwrap(),
                "--identity",
                identity,
                "--peer",
                "spiffe://cluster.local/ns/shop/sa/echo",
                "--to",
                &format!("{b_ip}:15008"),
                "--target",
                &format!("{b_ip}:8080"),
                // Bypass A's capture, as an attacker with root in the pod could.
                "--mark",
                "0x539",
            ],
        )
        .unwrap()
    };
    // Control: A's own identity from A's address works.
    let own = attempt("spiffe://cluster.local/ns/shop/sa/client");
    assert!(
        own.status.success(),
        "{}",
        String::from_utf8_lossy(&own.stderr)
    );
    assert!(String::from_utf8_lossy(&own.stdout).starts_with("HTTP/1.0 200"));
    // C's valid certificate presented from A's address is refused.
    let stolen = attempt("spiffe://cluster.local/ns/shop/sa/admin");
    let err = String::from_utf8_lossy(&stolen.stderr);
    assert!(!stolen.status.success(), "stolen identity accepted");
    assert!(err.contains("401"), "refused as a policy denial: {err}");
    let m = sb.metrics("node-2").unwrap();
    assert_eq!(
        metric_sum(
            &m,
            "weft_inbound_refusals_total",
            &[("reason", "identity_mismatch")]
        ),
        1.0,
        "{m}"
    );
    let log = sb.node_log("node-2");
    assert!(
        log.contains("spiffe://cluster.local/ns/shop/sa/admin")
            && log.contains("belongs to pod shop/client"),
        "the refusal is logged with both identities:\n{log}"
    );
}

#[test]
#[ignore = "needs root"]
fn node_proxy_upgrade_refuses_no_connection() {
    let mut sb = Sandbox::up("e2e-upgrade", &manifests()).unwrap();
    let old = [
        sb.node_pid("node-1").unwrap(),
        sb.node_pid("node-2").unwrap(),
    ];
    // A connection held open keeps each old node-proxy draining for its grace (2 s in
    // the sandbox), so old and new overlap for that long.
    let b_ip = sb.ip(B).unwrap();
    let script = format!("exec 3<>/dev/tcp/{b_ip}/9000; sleep 60");
    let mut held = sb.spawn(A, &["bash", "-c", &script]).unwrap();
    // Requests from A (node-1) to B's service (node-2), one connection each, while both
    // node-proxies are replaced: the outbound, inbound and HBONE sides all change hands.
    let upgrade = {
        let mut command = sb.local(&["upgrade"]).unwrap();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(2));
            let started = Instant::now();
            let out = command.output().unwrap();
            (started, Instant::now(), out)
        })
    };
    let mut results: Vec<(Instant, bool)> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut done_at = None;
    while Instant::now() < deadline
        && done_at.is_none_or(|t: Instant| t.elapsed() < Duration::from_secs(2))
    {
        let out = sb
            .exec(
                A,
                &[
                    "curl",
                    "-sf",
                    "-o",
                    "/dev/null",
                    "--max-time",
                    "5",
                    "http://10.96.0.10/upgrade",
                ],
            )
            .unwrap();
        results.push((Instant::now(), out.status.success()));
        if done_at.is_none() && upgrade.is_finished() {
            done_at = Some(Instant::now());
        }
    }
    let (started, finished, out) = upgrade.join().unwrap();
    let _ = held.kill();
    let _ = held.wait();
    assert!(
        out.status.success(),
        "weftctl local upgrade: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let during = results
        .iter()
        .filter(|(t, _)| *t > started && *t < finished)
        .count();
    let failed = results.iter().filter(|(_, ok)| !ok).count();
    eprintln!(
        "upgrade took {:.2} s; {} requests, {during} during it, {failed} failed",
        (finished - started).as_secs_f64(),
        results.len()
    );
    assert!(during >= 10, "requests ran during the upgrade ({during})");
    assert_eq!(
        failed, 0,
        "no request fails while node-proxies are replaced"
    );
    sb.refresh().unwrap();
    for (node, old) in ["node-1", "node-2"].iter().zip(old) {
        assert_ne!(
            sb.node_pid(node).unwrap(),
            old,
            "{node} runs a new node-proxy"
        );
        assert!(
            !std::path::Path::new(&format!("/proc/{old}")).exists(),
            "{node}'s old node-proxy has exited"
        );
    }
    // In the DaemonSet's order: the new pod was probed not Ready until it had taken the
    // node over; the old one, its container restarted after the takeover, reported
    // itself retired and the new one kept the node.
    for node in ["node-1", "node-2"] {
        let report = &sb.state["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["name"] == *node)
            .unwrap()["lastUpgrade"];
        assert_eq!(report["readyBeforeTakeover"], 0, "{node}: {report}");
        assert!(
            report["notReadyBeforeTakeover"].as_u64().unwrap() >= 1,
            "{node}: probed while taking over: {report}"
        );
        assert_eq!(report["restartedOldRetired"], true, "{node}: {report}");
        assert_eq!(
            report["ownerAfterRestart"].as_u64().unwrap(),
            sb.node_pid(node).unwrap() as u64,
            "{node}: the new node-proxy keeps the node: {report}"
        );
        assert!(
            sb.node_log(node).contains("not taking the node back"),
            "{node}: the restarted old node-proxy says why it idles"
        );
    }
    // Each new node-proxy was handed its predecessor's listeners (its two pods'), and
    // each old one drained only once the new one confirmed.
    for node in ["node-1", "node-2"] {
        let log = sb.node_log(node);
        assert!(
            log.lines().any(
                |l| l.contains("took over the running node-proxy's listeners")
                    && l.contains("pods=2")
            ),
            "{node}'s new node-proxy took over the listeners:\n{log}"
        );
        assert!(
            log.contains("a new node-proxy serves this node's pods; draining"),
            "{node}'s old node-proxy drained after the confirmation:\n{log}"
        );
        assert!(!log.contains("gave up its takeover"), "{log}");
    }
    // The old node-2 told node-1 to move on (GOAWAY); the new one carries the traffic.
    let (code, body) = sb.curl(A, "http://10.96.0.10/after").unwrap();
    assert_eq!(code, 0, "{body}");

    // An upgrade that cannot succeed changes nothing: with the controller away the new
    // node-proxies get no model, refuse to take over, and the running ones serve on.
    let serving = [
        sb.node_pid("node-1").unwrap(),
        sb.node_pid("node-2").unwrap(),
    ];
    sb.run_local(&["controller", "stop"]).unwrap();
    let out = sb.local(&["upgrade"]).unwrap().output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the upgrade reports failure");
    assert!(
        stderr.contains("node-1") && stderr.contains("exited"),
        "it names the node and what happened: {stderr}"
    );
    sb.refresh().unwrap();
    for (node, pid) in ["node-1", "node-2"].iter().zip(serving) {
        assert_eq!(
            sb.node_pid(node).unwrap(),
            pid,
            "{node} keeps its node-proxy"
        );
    }
    let (code, body) = sb
        .curl(A, "http://10.96.0.10/after-failed-upgrade")
        .unwrap();
    assert_eq!(code, 0, "{body}");
    assert!(
        sb.node_log("node-1")
            .contains("has no model yet; not taking over"),
        "the new node-proxy says why it stopped:\n{}",
        sb.node_log("node-1")
    );
}

#[test]
#[ignore = "needs root"]
fn broken_yaml_keeps_the_last_good_model() {
    let manifests = weft_e2e::TempManifests::copy(&manifests()).unwrap();
    let sb = Sandbox::up("e2e-yaml", manifests.path()).unwrap();
    let version = |sb: &Sandbox| -> Option<u64> {
        let (_, body) = weft_e2e::http_get(sb.controller_admin().ok()?, "/debug/model").ok()?;
        serde_json::from_str::<serde_json::Value>(&body).ok()?["version"].as_u64()
    };
    let before = version(&sb).expect("the controller answers");
    // The file with the service breaks: the controller keeps what it held and names the
    // file and line; the service still resolves and answers.
    let pods = manifests.path().join("pods.yaml");
    let good = std::fs::read_to_string(&pods).unwrap();
    std::fs::write(
        &pods,
        format!("{good}---\napiVersion: v1\nkind: [unclosed\n"),
    )
    .unwrap();
    let lines = good.lines().count();
    let problem = eventually(Duration::from_secs(10), || {
        let (_, body) = weft_e2e::http_get(sb.controller_admin().ok()?, "/debug/problems").ok()?;
        let problems: serde_json::Value = serde_json::from_str(&body).ok()?;
        problems.as_array()?.iter().find_map(|p| {
            let origin = p["origin"].as_str()?;
            origin.contains("pods.yaml").then(|| {
                (
                    origin.to_owned(),
                    p["reason"].as_str().unwrap_or("").to_owned(),
                )
            })
        })
    })
    .expect("the controller reports the broken file");
    let (origin, reason) = problem;
    assert!(reason.contains("not valid YAML"), "{reason}");
    let line: usize = origin.rsplit(':').next().unwrap().parse().unwrap();
    assert!(
        line > lines,
        "names the line of the broken document ({origin}, the file had {lines} lines)"
    );
    let log = std::fs::read_to_string(sb.state_dir.join("logs/controller.log")).unwrap();
    assert!(
        log.contains("pods.yaml") && log.contains("keeping the objects it held before"),
        "{log}"
    );
    assert_eq!(version(&sb), Some(before), "the model did not change");
    let (code, body) = sb.curl(A, "http://echo.shop/still-works").unwrap();
    assert_eq!(code, 0, "{body}");
    // Fixed again: picked up.
    std::fs::write(&pods, &good).unwrap();
    let cleared = eventually(Duration::from_secs(10), || {
        let (_, body) = weft_e2e::http_get(sb.controller_admin().ok()?, "/debug/problems").ok()?;
        (!body.contains("pods.yaml")).then_some(())
    });
    assert!(
        cleared.is_some(),
        "the problem clears when the file is fixed"
    );
    let (code, body) = sb.curl(A, "http://echo.shop/again").unwrap();
    assert_eq!(code, 0, "{body}");
}
