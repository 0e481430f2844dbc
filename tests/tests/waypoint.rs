//! The waypoint end to end in the sandbox, with real clients (curl, h2load): a Gateway
//! of class weft-waypoint runs as a pod, services labelled to use it go through it, and
//! HTTPRoutes, TrafficPolicies and L7 authorization apply to their requests.
//! Manifests: tests/manifests/waypoint (also the traffic-management guide's examples).

#![allow(clippy::unwrap_used)] // a test fails by panicking

use std::path::PathBuf;
use std::time::{Duration, Instant};

use weft_e2e::{eventually, metric_sum, repo_root, Load, Sandbox, TempManifests};

fn manifests() -> PathBuf {
    repo_root().join("tests/manifests/waypoint")
}

const CLIENT: &str = "shop/client";
const WAYPOINT: &str = "shop/waypoint-0";
const ECHO: &str = "http://10.96.1.10";

/// Requests the waypoint answered for `service` by `workload`, with `code` if given.
fn answered(sb: &Sandbox, service: &str, workload: &str, code: Option<&str>) -> f64 {
    let m = sb.waypoint_metrics(WAYPOINT).unwrap_or_default();
    let mut labels = vec![
        ("destination_service", service),
        ("destination_workload", workload),
    ];
    if let Some(c) = code {
        labels.push(("response_code", c));
    }
    metric_sum(&m, "weft_requests_total", &labels)
}

/// `curl` from the client: (status, headers and body).
fn get(sb: &Sandbox, url: &str, extra: &[&str]) -> (u16, String) {
    get_from(sb, CLIENT, url, extra)
}

/// `curl` from `pod`: (status, headers and body).
fn get_from(sb: &Sandbox, pod: &str, url: &str, extra: &[&str]) -> (u16, String) {
    let mut args = vec!["curl", "-sS", "-i", "--max-time", "5"];
    args.extend_from_slice(extra);
    args.push(url);
    let out = sb.exec(pod, &args).unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, text)
}

/// The share of echo's answers that came from v1 over `requests` more requests.
fn v1_share(sb: &Sandbox, requests: u64) -> f64 {
    let before = (
        answered(sb, "shop/echo", "echo-v1-0", Some("200")),
        answered(sb, "shop/echo", "echo-v2-0", Some("200")),
    );
    let n = requests.to_string();
    let run = sb
        .h2load(CLIENT, &["--h1", "-n", &n, "-c", "4", &format!("{ECHO}/")])
        .unwrap();
    assert_eq!(
        run.status_2xx, requests,
        "every request answered:\n{}",
        run.text
    );
    let v1 = answered(sb, "shop/echo", "echo-v1-0", Some("200")) - before.0;
    let v2 = answered(sb, "shop/echo", "echo-v2-0", Some("200")) - before.1;
    assert_eq!(v1 + v2, requests as f64);
    v1 / (v1 + v2)
}

#[test]
#[ignore = "needs root"]
fn canary_split_by_weight_then_reweighted_live_without_a_failed_request() {
    let manifests = TempManifests::copy(&manifests()).unwrap();
    let sb = Sandbox::up("e2e-canary", manifests.path()).unwrap();

    let share = v1_share(&sb, 10_000);
    assert!(
        (0.78..=0.82).contains(&share),
        "80/20 split gave v1 {share:.4}"
    );

    // The source node-proxy tunnels to the waypoint, the waypoint to the endpoint with
    // its own identity naming the client: the destination counts the client.
    let m = sb.metrics("node-2").unwrap();
    assert!(
        metric_sum(
            &m,
            "weft_tcp_connections_opened_total",
            &[
                ("direction", "inbound"),
                ("source_workload", "waypoint-0"),
                (
                    "source_principal",
                    "spiffe://cluster.local/ns/shop/sa/client"
                ),
                ("destination_workload", "echo-v1-0"),
                ("connection_security_policy", "mutual_tls"),
            ],
        ) >= 1.0,
        "{m}"
    );
    // Upstream connections are kept alive and reused: 10,000 requests on 4 client
    // connections open a handful of streams to each endpoint, not one per request.
    let nodes: Vec<String> = ["node-1", "node-2"]
        .iter()
        .map(|n| sb.metrics(n).unwrap())
        .collect();
    for endpoint in ["echo-v1-0", "echo-v2-0"] {
        let opened: f64 = nodes
            .iter()
            .map(|m| {
                metric_sum(
                    m,
                    "weft_tcp_connections_opened_total",
                    &[
                        ("direction", "inbound"),
                        ("source_workload", "waypoint-0"),
                        ("destination_workload", endpoint),
                    ],
                )
            })
            .sum();
        assert!(
            (1.0..=16.0).contains(&opened),
            "{opened} streams from the waypoint to {endpoint}"
        );
    }

    // 50/50 while a client keeps calling: no request fails, and the new weights apply.
    let load = Load::start(
        &sb.netns(CLIENT).unwrap(),
        &format!("{ECHO}/"),
        Duration::from_millis(20),
        Duration::from_secs(60),
    );
    std::thread::sleep(Duration::from_millis(500));
    let route = std::fs::read_to_string(manifests.path().join("20-route.yaml")).unwrap();
    let even = route
        .replace("weight: 80", "weight: 50")
        .replace("weight: 20", "weight: 50");
    assert_ne!(route, even);
    let edited = Instant::now();
    manifests.write("20-route.yaml", &even).unwrap();
    // Applied once the waypoint's model moved past the edit: v2 then answers about half.
    let applied = eventually(Duration::from_secs(10), || {
        let v1 = answered(&sb, "shop/echo", "echo-v1-0", Some("200"));
        let v2 = answered(&sb, "shop/echo", "echo-v2-0", Some("200"));
        sb.h2load(
            CLIENT,
            &["--h1", "-n", "200", "-c", "2", &format!("{ECHO}/")],
        )
        .ok()?;
        let v1 = answered(&sb, "shop/echo", "echo-v1-0", Some("200")) - v1;
        let v2 = answered(&sb, "shop/echo", "echo-v2-0", Some("200")) - v2;
        (v2 / (v1 + v2).max(1.0) > 0.35).then(|| edited.elapsed())
    })
    .expect("the 50/50 weights reach the waypoint");
    println!("new weights served after at most {applied:?}");
    std::thread::sleep(Duration::from_millis(500));
    let (requests, failed) = load.stop();
    assert!(requests > 20, "the load ran ({requests} requests)");
    assert!(
        failed.is_empty(),
        "requests failed while reweighting: {failed:?}"
    );
    let share = v1_share(&sb, 10_000);
    assert!(
        (0.48..=0.52).contains(&share),
        "50/50 split gave v1 {share:.4}"
    );
}

#[test]
#[ignore = "needs root"]
fn routing_filters_and_l7_authorization() {
    let sb = Sandbox::up("e2e-routing", &manifests()).unwrap();
    let version = |text: &str| {
        let body = text.split("\r\n\r\n").nth(1).unwrap_or("");
        let v: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
        v["version"].as_str().unwrap_or("").to_owned()
    };
    // An Exact path beats the split's catch-all; a header pins v1.
    for _ in 0..10 {
        let (code, text) = get(&sb, &format!("{ECHO}/v2"), &[]);
        assert_eq!((code, version(&text).as_str()), (200, "v2"), "{text}");
        let (code, text) = get(&sb, &format!("{ECHO}/"), &["-H", "x-version: v1"]);
        assert_eq!((code, version(&text).as_str()), (200, "v1"), "{text}");
    }
    // RequestRedirect, keeping the query.
    let (code, text) = get(&sb, &format!("{ECHO}/old/page?q=1"), &[]);
    assert_eq!(code, 301, "{text}");
    assert!(
        text.to_ascii_lowercase()
            .contains("location: http://10.96.1.10/new/page?q=1"),
        "{text}"
    );
    // URLRewrite of the prefix, request headers added and removed, a response header set.
    let (code, text) = get(
        &sb,
        &format!("{ECHO}/api/items"),
        &["-H", "x-remove-me: yes"],
    );
    assert_eq!(code, 200, "{text}");
    assert!(text.contains("\"path\":\"/items\""), "{text}");
    assert!(text.contains("\"x-added\":\"by-waypoint\""), "{text}");
    assert!(!text.contains("x-remove-me"), "{text}");
    assert!(
        text.to_ascii_lowercase()
            .contains("x-served-through: waypoint"),
        "{text}"
    );
    // RequestMirror: v1 answers, v2 sees a copy.
    let (code, text) = get(&sb, &format!("{ECHO}/mirror/copy-me"), &[]);
    assert_eq!((code, version(&text).as_str()), (200, "v1"), "{text}");
    assert!(
        eventually(Duration::from_secs(5), || sb
            .log("shop/echo-v2-0")
            .ok()?
            .contains("path=/mirror/copy-me")
            .then_some(()))
        .is_some(),
        "the mirror got its copy"
    );
    // A backend that does not exist gets 500 for its share.
    let (code, text) = get(&sb, &format!("{ECHO}/nowhere"), &[]);
    assert_eq!(code, 500, "{text}");
    // L7 DENY on a path: 403 for that path only, and the policy named in the log.
    let (code, text) = get(&sb, &format!("{ECHO}/admin/users"), &[]);
    assert_eq!(code, 403, "{text}");
    assert!(text.contains("shop/no-admin"), "{text}");
    let (code, _) = get(&sb, &format!("{ECHO}/administrator-free"), &[]);
    assert_eq!(code, 403, "the policy's pattern is /admin*");
    // Paths that name /admin another way are matched as the path they name (curl
    // sends them as written).
    for path in [
        "//admin/users",
        "/x/../admin/users",
        "/./admin",
        "/%61dmin/users",
    ] {
        let (code, text) = get(&sb, &format!("{ECHO}{path}"), &["--path-as-is"]);
        assert_eq!(code, 403, "{path}: {text}");
    }
    let (code, text) = get(&sb, &format!("{ECHO}/users"), &[]);
    assert_eq!(code, 200, "{text}");
    let log = sb.log(WAYPOINT).unwrap();
    assert!(
        log.lines().any(|l| l.contains("\"path\":\"/admin/users\"")
            && l.contains("\"response_code\":403")
            && l.contains("\"denied_by\":\"shop/no-admin\"")),
        "{log}"
    );
    // gRPC through the waypoint, routed by GRPCRoute: unary calls to v1, server streams
    // to v2 (every reply, in order), and a status code with its message (trailers).
    let grpc = |args: &[&str]| {
        let weftctl = weft_e2e::weftctl().unwrap();
        let mut all = vec![
            weftctl.to_str().unwrap(),
            "debug",
            "grpc",
            "--to",
            "http://10.96.1.30:9090",
        ];
        all.extend_from_slice(args);
        let out = sb.exec(CLIENT, &all).unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    for _ in 0..5 {
        let unary = grpc(&["--message", "hi"]);
        assert_eq!(unary["code"], 0, "{unary}");
        assert_eq!(unary["versions"], serde_json::json!(["v1"]), "{unary}");
    }
    let stream = grpc(&["--stream", "500"]);
    assert_eq!(
        (&stream["code"], &stream["replies"], &stream["in_order"]),
        (
            &serde_json::json!(0),
            &serde_json::json!(500),
            &serde_json::json!(true)
        ),
        "{stream}"
    );
    assert_eq!(stream["versions"], serde_json::json!(["v2"]), "{stream}");
    let failed = grpc(&["--message", "fail:14"]);
    assert_eq!(failed["code"], 14, "UNAVAILABLE passes through: {failed}");
    assert!(
        failed["message"].as_str().unwrap_or("").contains("fail:14"),
        "{failed}"
    );
    let m = sb.waypoint_metrics(WAYPOINT).unwrap();
    assert!(
        metric_sum(
            &m,
            "weft_requests_total",
            &[
                ("destination_service", "shop/grpc"),
                ("route", "shop/grpc-methods"),
                ("destination_workload", "grpc-v2-0")
            ]
        ) >= 1.0,
        "{m}"
    );

    // A WebSocket upgrade is forwarded and spliced: every message comes back.
    let weftctl = weft_e2e::weftctl().unwrap();
    let out = sb
        .exec(
            CLIENT,
            &[
                weftctl.to_str().unwrap(),
                "debug",
                "websocket",
                "--to",
                "ws://10.96.1.10/ws",
                "--messages",
                "50",
            ],
        )
        .unwrap();
    let ws: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|_| panic!("{}", String::from_utf8_lossy(&out.stderr)));
    assert_eq!(ws, serde_json::json!({"status": 101, "echoed": 50}));

    // HTTP/2 (h2c) from the client reaches the HTTP/1.1 echo through the waypoint.
    let run = sb
        .h2load(
            CLIENT,
            &["-n", "200", "-c", "2", "-m", "4", &format!("{ECHO}/")],
        )
        .unwrap();
    assert_eq!(run.status_2xx, 200, "{}", run.text);

    // A consumer route (70-consumer.yaml): front's clients get v2 for every path, the
    // producer's redirect and split included, from a backend in shop with no
    // ReferenceGrant; shop's own client still gets the producer's routes; and shop's L7
    // policy still applies to front's requests.
    let front = |path: &str| get_from(&sb, "front/client", &format!("{ECHO}{path}"), &[]);
    for path in ["/", "/old/page", "/api/items", "/nowhere"] {
        for _ in 0..3 {
            let (code, text) = front(path);
            assert_eq!(
                (code, version(&text).as_str()),
                (200, "v2"),
                "{path}: {text}"
            );
        }
    }
    let (code, text) = get(&sb, &format!("{ECHO}/old/page"), &[]);
    assert_eq!(code, 301, "shop's client keeps the producer route: {text}");
    let (code, text) = front("/admin/users");
    assert_eq!(code, 403, "{text}");
    let m = sb.waypoint_metrics(WAYPOINT).unwrap();
    assert!(
        metric_sum(
            &m,
            "weft_requests_total",
            &[
                ("source_namespace", "front"),
                ("route", "front/echo-for-front"),
                ("destination_workload", "echo-v2-0"),
                ("response_code", "200")
            ]
        ) >= 12.0,
        "{m}"
    );
}

#[test]
#[ignore = "needs root"]
fn the_waypoint_serves_at_most_its_stream_limit() {
    let sb = Sandbox::up_with_env(
        "e2e-wp-limit",
        &manifests(),
        &[],
        &[("WEFT_MAX_STREAMS", "1")],
    )
    .unwrap();
    let ok = || get(&sb, &format!("{ECHO}/"), &[]).0 == 200;
    assert!(
        eventually(Duration::from_secs(30), || ok().then_some(())).is_some(),
        "echo answers through the waypoint"
    );
    // One client connection held open: an upload whose body never ends.
    let ns = sb.netns(CLIENT).unwrap();
    let mut upload = std::process::Command::new("ip")
        .args(["netns", "exec", &ns, "curl", "-sS", "-T", "-"])
        .arg(format!("{ECHO}/upload"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Its connection is up through the waypoint once curl has sent the request's head
    // and waits on stdin; a refused one would have ended curl.
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        upload.try_wait().unwrap().is_none(),
        "the upload was refused"
    );
    let refused = || {
        let m = sb.waypoint_metrics(WAYPOINT).unwrap_or_default();
        m.lines()
            .find_map(|l| l.strip_prefix("weft_waypoint_streams_refused_total "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // The next connection is refused (reset: no status) and counted.
    let mut last = (0, String::new());
    let limited = eventually(Duration::from_secs(10), || {
        last = get(&sb, &format!("{ECHO}/"), &[]);
        (last.0 == 0 && refused() >= 1.0).then_some(())
    });
    let _ = upload.kill();
    let _ = upload.wait();
    assert!(
        limited.is_some(),
        "a second stream was served past the limit of 1: {} refused, the last answer {last:?}",
        refused()
    );
    // Once the upload's connection is gone, its place is free again.
    assert!(
        eventually(Duration::from_secs(10), || ok().then_some(())).is_some(),
        "the limit's place was not given back"
    );
}

/// A mirror backend that never answers in time: `stuck` sleeps a minute per request,
/// and requests under /stuck-mirror are answered by v1 with a copy sent to it.
const STUCK_MIRROR: &str = "\
apiVersion: apps/v1
kind: Deployment
metadata: {name: stuck, namespace: shop}
spec:
  replicas: 1
  selector: {matchLabels: {app: stuck}}
  template:
    metadata: {labels: {app: stuck}}
    spec:
      nodeName: node-2
      serviceAccountName: echo
      containers:
        - name: echo
          command: [\"weftctl\", \"echo\", \"--port\", \"8080\", \"--latency-ms\", \"60000\"]
          ports: [{containerPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: stuck, namespace: shop}
spec:
  clusterIP: 10.96.1.40
  selector: {app: stuck}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: echo-stuck-mirror, namespace: shop}
spec:
  parentRefs: [{group: \"\", kind: Service, name: echo, port: 80}]
  rules:
    - matches: [{path: {type: PathPrefix, value: /stuck-mirror}}]
      filters:
        - type: RequestMirror
          requestMirror: {backendRef: {name: stuck, port: 80}}
      backendRefs: [{name: echo-v1, port: 80}]
";

#[test]
#[ignore = "needs root"]
fn mirrored_copies_in_flight_are_bounded_and_abandoned_after_their_timeout() {
    let manifests = TempManifests::copy(&manifests()).unwrap();
    manifests
        .write("90-stuck-mirror.yaml", STUCK_MIRROR)
        .unwrap();
    let sb = Sandbox::up("e2e-mirror-limit", manifests.path()).unwrap();
    let url = format!("{ECHO}/stuck-mirror/");
    // Echo answers through the waypoint, and `stuck` is ready (its health check answers
    // at once) in the model the waypoint reads too.
    let ready = |url: &str| get(&sb, url, &[]).0 == 200;
    assert!(
        eventually(Duration::from_secs(30), || (ready(&format!("{ECHO}/"))
            && ready("http://10.96.1.40/healthz"))
        .then_some(()))
        .is_some(),
        "echo and stuck answer"
    );
    std::thread::sleep(Duration::from_secs(1));
    let skipped = || {
        let m = sb.waypoint_metrics(WAYPOINT).unwrap_or_default();
        metric_sum(
            &m,
            "weft_waypoint_mirrors_skipped_total",
            &[("destination_service", "shop/stuck")],
        )
    };
    // 300 requests, each answered by v1 at once while its copy waits on `stuck`: past
    // 256 copies in flight the waypoint sends no more of them, and counts each one it
    // skips. (The copies are abandoned after 15 s; 300 requests take a second or two
    // even in a debug build.)
    let started = Instant::now();
    let run = sb
        .h2load(CLIENT, &["--h1", "-n", "300", "-c", "4", &url])
        .unwrap();
    assert_eq!(run.status_2xx, 300, "every request answered:\n{}", run.text);
    assert!(
        started.elapsed() < Duration::from_secs(14),
        "the load took {:?}: copies may have been abandoned during it",
        started.elapsed()
    );
    let past_the_limit = 300.0 - 256.0;
    assert_eq!(
        skipped(),
        past_the_limit,
        "copies skipped past 256 in flight"
    );
    // Once abandoned (15 s), their places are free: new copies are sent, none skipped.
    std::thread::sleep(Duration::from_secs(16));
    for _ in 0..10 {
        assert_eq!(get(&sb, &url, &[]).0, 200);
    }
    assert_eq!(
        skipped(),
        past_the_limit,
        "copies were skipped after the stuck ones had been abandoned"
    );
}

#[test]
#[ignore = "needs root"]
fn retries_budgets_timeouts_outliers_and_limits() {
    let sb = Sandbox::up("e2e-resilience", &manifests()).unwrap();

    // flaky fails 30% with 503; three retries make every request succeed.
    let run = sb
        .h2load(
            CLIENT,
            &["--h1", "-n", "2000", "-c", "2", "http://10.96.1.20/"],
        )
        .unwrap();
    let success = run.status_2xx as f64 / 2000.0;
    assert!(success >= 0.995, "success {success:.4}:\n{}", run.text);
    let m = sb.waypoint_metrics(WAYPOINT).unwrap();
    assert!(
        metric_sum(
            &m,
            "weft_requests_total",
            &[
                ("destination_service", "shop/flaky"),
                ("response_flags", "retried")
            ]
        ) > 100.0,
        "retries are flagged:\n{m}"
    );

    // broken fails everything; the 20% budget caps what it sees at ~1.2x the requests.
    let before = count_lines(&sb, "shop/broken-0", "status=503");
    let run = sb
        .h2load(
            CLIENT,
            &["--h1", "-n", "1000", "-c", "2", "http://10.96.1.21/"],
        )
        .unwrap();
    assert_eq!(run.status_5xx, 1000, "{}", run.text);
    let seen = count_lines(&sb, "shop/broken-0", "status=503") - before;
    let ratio = seen as f64 / 1000.0;
    println!("the failing backend saw {ratio:.3}x the client's requests");
    assert!(
        (1.0..=1.25).contains(&ratio),
        "{seen} attempts for 1000 requests"
    );

    // slow answers in 400 ms; the route's 200 ms request timeout answers 504 first.
    for _ in 0..3 {
        let out = sb
            .exec(
                CLIENT,
                &[
                    "curl",
                    "-s",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code} %{time_total}",
                    "http://10.96.1.22/",
                ],
            )
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (code, secs) = text.split_once(' ').unwrap();
        assert_eq!(code, "504", "{text}");
        let secs: f64 = secs.parse().unwrap();
        println!("504 after {:.0} ms (timeout 200 ms)", secs * 1e3);
        assert!(secs >= 0.2, "not before the timeout: {secs}");
    }

    // stalling's backend sends its headers and half its body, and the rest after the
    // stall asked. The route's 1 s request timeout covers the body too: a 5 s stall is
    // cut, so curl sees an incomplete answer (HTTP/1.1: the connection closes before
    // the last chunk; HTTP/2: the stream is reset), not a whole one 5 s later. A short
    // stall passes whole.
    for version in ["--http1.1", "--http2-prior-knowledge"] {
        for (stall, whole) in [("5s", false), ("200ms", true)] {
            let out = sb
                .exec(
                    CLIENT,
                    &[
                        "curl",
                        "-sS",
                        version,
                        "--max-time",
                        "20",
                        "-o",
                        "/dev/null",
                        "-w",
                        "%{http_code}",
                        "-H",
                        &format!("x-echo-stall: {stall}"),
                        "http://10.96.1.28/",
                    ],
                )
                .unwrap();
            let code = String::from_utf8_lossy(&out.stdout).into_owned();
            let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
            println!(
                "{version}, stall {stall}: {code} {:?} {stderr}",
                out.status.code()
            );
            assert_eq!(code, "200", "{version} {stall}: the headers came in time");
            assert_eq!(out.status.success(), whole, "{version} {stall}: {stderr}");
        }
    }

    // Outlier detection: one of pool's three replicas fails; it is ejected, then
    // returns once it recovers.
    let flags = PathBuf::from("/run/weft/e2e-fail");
    std::fs::create_dir_all(&flags).unwrap();
    let flag = flags.join("pool-0");
    std::fs::write(&flag, "").unwrap();
    let _cleanup = RemoveOnDrop(flag.clone());
    let run = sb
        .h2load(
            CLIENT,
            &["--h1", "-n", "30", "-c", "1", "http://10.96.1.23/"],
        )
        .unwrap();
    println!("while being ejected: {} of 30 failed", run.status_5xx);
    let run = sb
        .h2load(
            CLIENT,
            &["--h1", "-n", "1000", "-c", "2", "http://10.96.1.23/"],
        )
        .unwrap();
    let success = run.status_2xx as f64 / 1000.0;
    assert!(
        success >= 0.99,
        "after ejection {success:.4}:\n{}",
        run.text
    );
    std::fs::remove_file(&flag).unwrap();
    let back = eventually(Duration::from_secs(15), || {
        let before = count_lines(&sb, "shop/pool-0", "status=200");
        sb.h2load(
            CLIENT,
            &["--h1", "-n", "30", "-c", "1", "http://10.96.1.23/"],
        )
        .ok()?;
        (count_lines(&sb, "shop/pool-0", "status=200") > before).then_some(())
    });
    assert!(back.is_some(), "pool-0 serves again after it recovered");

    // Circuit breaking: one connection and one pending request to slow; the rest are
    // refused with 503 and a header saying why.
    let run = sb
        .h2load(
            CLIENT,
            &["--h1", "-n", "12", "-c", "6", "http://10.96.1.27/"],
        )
        .unwrap();
    assert!(run.status_5xx >= 1 && run.status_2xx >= 1, "{}", run.text);
    let (code, text) = {
        let sb = &sb;
        let slow = std::thread::spawn({
            let ns = sb.netns(CLIENT).unwrap();
            move || {
                std::process::Command::new("ip")
                    .args([
                        "netns",
                        "exec",
                        &ns,
                        "h2load",
                        "--h1",
                        "-n",
                        "4",
                        "-c",
                        "4",
                        "http://10.96.1.27/",
                    ])
                    .output()
            }
        });
        std::thread::sleep(Duration::from_millis(100));
        let r = get(sb, "http://10.96.1.27/", &[]);
        let _ = slow.join();
        r
    };
    assert_eq!(code, 503, "{text}");
    assert!(
        text.contains("weft-limited: max-pending-requests"),
        "{text}"
    );
    let m = sb.waypoint_metrics(WAYPOINT).unwrap();
    assert!(
        metric_sum(
            &m,
            "weft_requests_total",
            &[
                ("destination_service", "shop/guarded"),
                ("response_flags", "limited")
            ]
        ) >= 1.0,
        "{m}"
    );

    // Fault injection: half of faulty's requests are aborted with 418.
    let run = sb
        .h2load(
            CLIENT,
            &["--h1", "-n", "1000", "-c", "2", "http://10.96.1.26/"],
        )
        .unwrap();
    let aborted = run.status_4xx as f64 / 1000.0;
    assert!(
        (0.44..=0.56).contains(&aborted),
        "aborted {aborted:.3}:\n{}",
        run.text
    );

    // Rate limiting: a burst of 5 at 5/s; a quick burst of 50 gets mostly 429.
    let run = sb
        .h2load(
            CLIENT,
            &["--h1", "-n", "50", "-c", "1", "http://10.96.1.25/"],
        )
        .unwrap();
    assert!(
        run.status_2xx >= 5 && run.status_2xx <= 15 && run.status_4xx >= 35,
        "{}",
        run.text
    );
    let m = sb.waypoint_metrics(WAYPOINT).unwrap();
    assert!(
        metric_sum(
            &m,
            "weft_requests_total",
            &[
                ("destination_service", "shop/limited"),
                ("response_code", "429")
            ]
        ) >= 35.0,
        "{m}"
    );

    // A port with no declared protocol carrying a raw TCP protocol is forwarded.
    let weftctl = weft_e2e::weftctl().unwrap();
    let out = sb
        .exec(
            CLIENT,
            &[
                weftctl.to_str().unwrap(),
                "debug",
                "pingpong",
                "--to",
                "10.96.1.24:9000",
                "--rounds",
                "200",
            ],
        )
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let m = sb.waypoint_metrics(WAYPOINT).unwrap();
    assert!(
        metric_sum(
            &m,
            "weft_waypoint_tcp_connections_total",
            &[("destination_service", "shop/tcp-echo")]
        ) >= 1.0,
        "{m}"
    );
}

/// An OTLP/gRPC receiver on loopback: the trace ids (hex) and parent span ids of every
/// span exported to it.
struct Receiver {
    addr: std::net::SocketAddr,
    spans: std::sync::Arc<std::sync::Mutex<Vec<(String, String)>>>,
    _runtime: tokio::runtime::Runtime,
}

struct Collect(std::sync::Arc<std::sync::Mutex<Vec<(String, String)>>>);

#[tonic::async_trait]
impl opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceService
    for Collect
{
    async fn export(
        &self,
        request: tonic::Request<
            opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest,
        >,
    ) -> Result<
        tonic::Response<
            opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse,
        >,
        tonic::Status,
    > {
        let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
        let mut spans = self.0.lock().unwrap();
        for rs in request.into_inner().resource_spans {
            for ss in rs.scope_spans {
                for span in ss.spans {
                    spans.push((hex(&span.trace_id), hex(&span.parent_span_id)));
                }
            }
        }
        Ok(tonic::Response::new(Default::default()))
    }
}

impl Receiver {
    fn start() -> Self {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let spans = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let service = opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceServiceServer::new(
            Collect(spans.clone()),
        );
        runtime.spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        Receiver {
            addr,
            spans,
            _runtime: runtime,
        }
    }
}

#[test]
#[ignore = "needs root"]
fn a_span_per_request_reaches_an_otlp_receiver_with_the_callers_trace_id() {
    let receiver = Receiver::start();
    let endpoint = format!("http://{}", receiver.addr);
    let sb = Sandbox::up_with("e2e-otlp", &manifests(), &["--otlp-endpoint", &endpoint]).unwrap();
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let parent = "00f067aa0ba902b7";
    let (code, text) = get(
        &sb,
        &format!("{ECHO}/traced"),
        &["-H", &format!("traceparent: 00-{trace}-{parent}-01")],
    );
    assert_eq!(code, 200, "{text}");
    // The request went on in the caller's trace, as a child of the waypoint's span.
    assert!(
        text.contains(&format!("\"traceparent\":\"00-{trace}-")),
        "{text}"
    );
    assert!(
        !text.contains(parent),
        "the waypoint's own span is the parent upstream: {text}"
    );
    let got = eventually(Duration::from_secs(20), || {
        let spans = receiver.spans.lock().unwrap();
        spans
            .iter()
            .any(|(t, p)| t == trace && p == parent)
            .then_some(())
    });
    assert!(
        got.is_some(),
        "no span with trace {trace} and parent {parent}: {:?}",
        receiver.spans.lock().unwrap()
    );

    // Stopped with tracing on, the waypoint flushes its spans and exits: the flush
    // must not wait on the runtime thread it runs on.
    let pid = sb.pid(WAYPOINT).unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let stopped = eventually(Duration::from_secs(20), || {
        sb.log(WAYPOINT)
            .ok()
            .filter(|l| l.contains("waypoint stopped"))
    });
    assert!(
        stopped.is_some(),
        "the waypoint did not stop after SIGTERM:\n{}",
        sb.log(WAYPOINT).unwrap_or_default()
    );
}

/// What `scripts/run` shows a user: mTLS, the canary split, a retry, a denied client.
#[test]
#[ignore = "needs root"]
fn the_demo_shows_mtls_a_canary_a_retry_and_a_denial() {
    let sb = Sandbox::up("e2e-demo", &repo_root().join("examples/demo")).unwrap();
    // The demo's waypoint runs the default two replicas; their counts are summed.
    let wp = "demo/waypoint";
    assert_eq!(sb.waypoint_pods(wp).len(), 2, "{}", sb.state["pods"]);
    let requests = |labels: &[(&str, &str)]| {
        metric_sum(&sb.gateway_metrics(wp), "weft_requests_total", labels)
    };
    // Enough answers for the split to show: with 80/20, v2 answering at least as many of
    // 40 as v1 has a chance of about 1 in 100,000.
    let seen = eventually(Duration::from_secs(60), || {
        let v1 = requests(&[("destination_workload", "echo-0"), ("response_code", "200")])
            + requests(&[("destination_workload", "echo-1"), ("response_code", "200")]);
        let v2 = requests(&[
            ("destination_workload", "echo-v2-0"),
            ("response_code", "200"),
        ]);
        let retried = requests(&[("source_workload", "client"), ("response_flags", "retried")]);
        let denied = requests(&[("source_workload", "intruder"), ("response_code", "403")]);
        (v1 + v2 >= 40.0 && v2 >= 1.0 && retried >= 1.0 && denied >= 1.0).then_some((v1, v2))
    });
    let m = sb.gateway_metrics(wp);
    let (v1, v2) = seen.unwrap_or_else(|| panic!("the demo did not show it all:\n{m}"));
    assert!(v1 > v2, "80/20: v1 {v1}, v2 {v2}");
    let client_failures = requests(&[("source_workload", "client"), ("response_code", "503")]);
    assert_eq!(client_failures, 0.0, "v2's failures are retried away:\n{m}");
    let node1 = sb.metrics("node-1").unwrap();
    let to = |pod| {
        metric_sum(
            &node1,
            "weft_tcp_connections_opened_total",
            &[
                ("source_workload", "client"),
                ("destination_workload", pod),
                ("connection_security_policy", "mutual_tls"),
            ],
        )
    };
    assert!(to("waypoint-0") + to("waypoint-1") >= 1.0, "{node1}");
}

/// The traffic-management guide shows these manifests as they are: a block that names a
/// file is that file, and every other YAML block is a part of one of them.
#[test]
fn the_guide_shows_the_tested_manifests() {
    let guide = std::fs::read_to_string(repo_root().join("docs/traffic-management.md")).unwrap();
    let files: Vec<(String, String)> = std::fs::read_dir(manifests())
        .unwrap()
        .map(|e| {
            let p = e.unwrap().path();
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read_to_string(&p).unwrap(),
            )
        })
        .collect();
    let blocks: Vec<&str> = guide
        .split("```yaml\n")
        .skip(1)
        .map(|b| b.split("```").next().unwrap())
        .collect();
    assert!(blocks.len() >= 8, "{} blocks", blocks.len());
    for block in blocks {
        match block.strip_prefix("# file: tests/manifests/waypoint/") {
            Some(rest) => {
                let (name, body) = rest.split_once('\n').unwrap();
                let (_, text) = files
                    .iter()
                    .find(|(n, _)| n == name)
                    .unwrap_or_else(|| panic!("the guide names {name}, not a file"));
                assert_eq!(body, text, "the guide's copy of {name} differs");
            }
            None => assert!(
                files.iter().any(|(_, text)| text.contains(block)),
                "this block of the guide is in no tested manifest:\n{block}"
            ),
        }
    }
}

fn count_lines(sb: &Sandbox, pod: &str, needle: &str) -> usize {
    sb.log(pod)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(needle))
        .count()
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Two waypoints in one sandbox, as two Gateways in a namespace, two pods each over two
/// nodes (so started in the same round): each pod gets its own admin port, all run, and
/// each waypoint serves the service that names it.
#[test]
#[ignore = "needs root"]
fn two_waypoints_in_one_sandbox_each_serve_their_service() {
    let manifests = TempManifests::copy(&repo_root().join("examples/demo")).unwrap();
    manifests
        .write(
            "50-second-waypoint.yaml",
            "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata:\n  name: second\n  namespace: demo\n  annotations: {sandbox.weft.dev/node: node-2}\n\
             spec:\n  gatewayClassName: weft-waypoint\n  listeners:\n    - {name: mesh, port: 15008, protocol: HBONE}\n---\n\
             apiVersion: v1\nkind: Service\nmetadata:\n  name: echo-second\n  namespace: demo\n  labels:\n    weft.dev/use-waypoint: second\n\
             spec:\n  selector: {app: echo, version: v1}\n  ports: [{name: http, port: 80, targetPort: 8080}]\n",
        )
        .unwrap();
    let sb = Sandbox::up("e2e-two-wp", manifests.path()).unwrap();
    let admins: Vec<String> = sb.state["pods"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["admin"].as_str().map(str::to_owned))
        .collect();
    // Each Gateway's Deployment runs the default two replicas.
    assert_eq!(
        admins.len(),
        4,
        "four waypoint pods with admin ports: {admins:?}"
    );
    let distinct: std::collections::BTreeSet<&String> = admins.iter().collect();
    assert_eq!(distinct.len(), 4, "each its own: {admins:?}");
    assert_eq!(sb.waypoint_pods("demo/second").len(), 2);
    let served = eventually(Duration::from_secs(30), || {
        let (code, body) = sb.curl("demo/client", "http://echo-second/").ok()?;
        (code == 0 && !body.is_empty()).then_some(())
    });
    assert!(served.is_some(), "the second waypoint's service answers");
    let through = eventually(Duration::from_secs(10), || {
        let m = sb.gateway_metrics("demo/second");
        (metric_sum(&m, "weft_requests_total", &[("response_code", "200")]) >= 1.0).then_some(())
    });
    assert!(through.is_some(), "through the second waypoint");
    assert!(
        sb.waypoint_metrics("demo/waypoint-0").is_ok(),
        "the first still runs"
    );
}
