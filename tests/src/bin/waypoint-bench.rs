//! The waypoint benchmark: small HTTP/1.1 keep-alive requests (h2load) from a client
//! pod to an echo server, in one run and in alternating rounds:
//!
//! - mesh: client -> node-proxy -> waypoint -> node-proxy -> server (HBONE, mTLS);
//! - tls-chain, the peer doing the same encrypted job: client -> HAProxy A (plain in,
//!   TLS out, on the client's node) -> HAProxy W (the router: TLS in and out, `mode
//!   http`, the same prefix route) -> HAProxy B (TLS in, plain out, on the server's
//!   node) -> server; TLS 1.3 with mutual authentication (ECDSA P-256 certificates,
//!   TLS_AES_128_GCM_SHA256) and HTTP/2 on both TLS hops, so the client connections
//!   share one TLS connection per hop as HBONE's pool does;
//! - haproxy: client -> one HAProxy (`mode http`, the same route, no TLS) -> server;
//! - direct: client -> server.
//!
//! Reports requests/s, p50/p99 latency (from h2load's per-request log), the CPU per
//! request of every proxy process (utime + stime from /proc, before and after each
//! round), each mesh process against the HAProxy process doing its job (waypoint / W,
//! client-side node-proxy / A, server-side node-proxy / B) round by round, and the
//! waypoint's RSS. Then route changes under load: a mesh run with the route's weights
//! flipped every 100 ms beside one without, both of the same length; every request
//! must succeed and the p99s are compared.
//!
//! `sudo scripts/ship && sudo target/ship-pgo/waypoint-bench` (the binaries the image ships)
//! (or `bench/waypoint/run`). `WEFT_BENCH_REQUESTS` sets the requests per round
//! (default 20000), `WEFT_BENCH_ROUNDS` the rounds per path (5), `WEFT_BENCH_CLIENTS`
//! the connections (8), `WEFT_BENCH_FLIP_SECONDS` the length of the flip runs (10).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use weft_e2e::bench::{cpu_seconds, env, median, percentile, status_kib, Ratio};
use weft_e2e::{is_root, metric_sum, repo_root, Sandbox, TempManifests};

fn rss_mib(pid: i32) -> anyhow::Result<f64> {
    Ok(status_kib(pid, "VmRSS")? / 1024.0)
}

/// One round's figures.
#[derive(Debug, Clone, Default)]
struct Round {
    rps: f64,
    p50_us: f64,
    p99_us: f64,
    /// CPU per request of each of the way's processes, in µs.
    cpu_us: Vec<f64>,
    requests: u64,
}

struct Way {
    name: &'static str,
    client: &'static str,
    url: String,
    /// The proxies whose CPU is counted, with a name each.
    pids: Vec<(&'static str, i32)>,
}

/// How long a round runs.
#[derive(Debug, Clone, Copy)]
enum Load {
    Requests(u64),
    Seconds(u64),
}

fn round(sb: &Sandbox, way: &Way, load: Load, clients: u64) -> anyhow::Result<Round> {
    let log = std::env::temp_dir().join(format!(
        "weft-waypoint-bench-{}-{}.log",
        std::process::id(),
        way.name
    ));
    let before: Vec<f64> = way
        .pids
        .iter()
        .map(|(_, p)| cpu_seconds(*p))
        .collect::<Result<_, _>>()?;
    let mut args = vec!["h2load".to_owned(), "--h1".to_owned()];
    match load {
        Load::Requests(n) => args.extend(["-n".to_owned(), n.to_string()]),
        Load::Seconds(s) => args.extend(["-D".to_owned(), s.to_string()]),
    }
    args.extend([
        "-c".to_owned(),
        clients.to_string(),
        "--log-file".to_owned(),
        log.to_str().context("log path")?.to_owned(),
        way.url.clone(),
    ]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = sb.exec(way.client, &args)?;
    let after: Vec<f64> = way
        .pids
        .iter()
        .map(|(_, p)| cpu_seconds(*p))
        .collect::<Result<_, _>>()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    // "requests: N total, N started, N done, N succeeded, 0 failed, 0 errored, 0 timeout"
    let field = |name: &str| -> Option<u64> {
        let line = text
            .lines()
            .find(|l| l.trim_start().starts_with("requests:"))?;
        line.split(',')
            .find(|p| p.trim_end().ends_with(name))?
            .split_whitespace()
            .find_map(|w| w.parse().ok())
    };
    let succeeded = field("succeeded").unwrap_or(0);
    let failed = field("failed").unwrap_or(1) + field("errored").unwrap_or(1);
    let two_xx = text
        .lines()
        .find(|l| l.trim_start().starts_with("status codes:"))
        .and_then(|l| l.split_whitespace().nth(2))
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or(0);
    let complete = match load {
        Load::Requests(n) => succeeded == n,
        Load::Seconds(_) => succeeded > 0,
    };
    if !complete || failed > 0 || two_xx != succeeded {
        bail!("{}: not every request succeeded:\n{text}", way.name);
    }
    let rps = text
        .lines()
        .find(|l| l.starts_with("finished in"))
        .and_then(|l| l.split(',').nth(1))
        .and_then(|s| s.split_whitespace().next())
        .and_then(|n| n.parse::<f64>().ok())
        .context("h2load req/s")?;
    // start time (µs since epoch) \t status \t µs to the end of the response
    let mut latencies: Vec<f64> = std::fs::read_to_string(&log)?
        .lines()
        .filter_map(|l| l.split('\t').nth(2)?.trim().parse().ok())
        .collect();
    let _ = std::fs::remove_file(&log);
    latencies.sort_by(f64::total_cmp);
    Ok(Round {
        rps,
        p50_us: percentile(&latencies, 0.5),
        p99_us: percentile(&latencies, 0.99),
        cpu_us: after
            .iter()
            .zip(&before)
            .map(|(a, b)| (a - b) * 1e6 / succeeded.max(1) as f64)
            .collect(),
        requests: succeeded,
    })
}

/// An HAProxy process in a pod's network namespace.
struct Haproxy {
    child: std::process::Child,
}

impl Haproxy {
    fn start(
        sb: &Sandbox,
        pod: &str,
        dir: &Path,
        name: &str,
        config: &str,
        port: u16,
    ) -> anyhow::Result<Self> {
        let file = dir.join(format!("{name}.cfg"));
        std::fs::write(&file, config)?;
        let child = Command::new("ip")
            .args(["netns", "exec", &sb.netns(pod)?, "haproxy", "-db", "-f"])
            .arg(&file)
            .current_dir(dir)
            .stdout(Stdio::null())
            .spawn()
            .context("starting haproxy")?;
        let listening = weft_e2e::eventually(Duration::from_secs(5), || {
            let out = sb
                .exec(pod, &["ss", "-Hltn", &format!("sport = :{port}")])
                .ok()?;
            (!out.stdout.is_empty()).then_some(())
        });
        if listening.is_none() {
            bail!("haproxy {name} is not listening on port {port} in {pod}");
        }
        Ok(Haproxy { child })
    }

    /// The PID of the process `ip netns exec` started (haproxy replaces it by exec).
    fn pid(&self) -> i32 {
        self.child.id() as i32
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const PLAIN_PORT: u16 = 8081;
const CHAIN_PORT: u16 = 8082;
const TLS_PORT: u16 = 8443;

/// What every HAProxy shares: one thread as the waypoint has, keep-alive, connections
/// to servers reused across clients, and TLS 1.3 with one cipher suite.
const HAPROXY_GLOBAL: &str = "global
  maxconn 8000
  nbthread 1
  ssl-default-bind-ciphersuites TLS_AES_128_GCM_SHA256
  ssl-default-server-ciphersuites TLS_AES_128_GCM_SHA256
  ssl-default-bind-options ssl-min-ver TLSv1.3
  ssl-default-server-options ssl-min-ver TLSv1.3
defaults
  mode http
  option http-keep-alive
  http-reuse always
  timeout connect 5s
  timeout client 60s
  timeout server 60s
";

/// A CA and a certificate (ECDSA P-256) for each TLS hop, by its IP, made with openssl
/// in `dir`: `ca.pem`, and `<name>.pem` holding certificate and key as HAProxy wants.
fn certificates(dir: &Path, hops: &[(&str, &str)]) -> anyhow::Result<()> {
    let openssl = |args: &[&str]| -> anyhow::Result<()> {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .context("running openssl (Debian: apt-get install openssl)")?;
        if !out.status.success() {
            bail!(
                "openssl {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    };
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"];
    let mut ca = vec!["req", "-x509", "-nodes", "-days", "2"];
    ca.extend(ec);
    ca.extend([
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-subj",
        "/CN=bench-ca",
    ]);
    openssl(&ca)?;
    for (name, ip) in hops {
        let (key, csr, crt) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.crt"),
        );
        let mut req = vec!["req", "-nodes"];
        req.extend(ec);
        let subj = format!("/CN={name}");
        req.extend(["-keyout", &key, "-out", &csr, "-subj", &subj]);
        openssl(&req)?;
        let ext = dir.join(format!("{name}.ext"));
        std::fs::write(
            &ext,
            format!("subjectAltName=IP:{ip}\nextendedKeyUsage=serverAuth,clientAuth\n"),
        )?;
        openssl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-out",
            &crt,
            "-extfile",
            ext.to_str().context("path")?,
        ])?;
        let pem =
            std::fs::read_to_string(dir.join(&crt))? + &std::fs::read_to_string(dir.join(&key))?;
        std::fs::write(dir.join(format!("{name}.pem")), pem)?;
    }
    Ok(())
}

/// The four HAProxy processes: the plain router, and the chain A -> W -> B.
struct Peers {
    plain: Haproxy,
    a: Haproxy,
    w: Haproxy,
    b: Haproxy,
    dir: PathBuf,
}

impl Drop for Peers {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn start_peers(sb: &Sandbox) -> anyhow::Result<Peers> {
    if Command::new("haproxy").arg("-v").output().is_err() {
        bail!("haproxy is not installed (Debian: apt-get install haproxy; bench/waypoint/run installs it)");
    }
    let server = sb.ip("direct/server")?;
    let w_ip = sb.ip("direct/proxy")?;
    let a_ip = sb.ip("direct/hop-a")?;
    let b_ip = sb.ip("direct/hop-b")?;
    let dir = std::env::temp_dir().join(format!("weft-waypoint-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    certificates(&dir, &[("a", &a_ip), ("w", &w_ip), ("b", &b_ip)])?;
    let tls_out = |crt: &str| format!("ssl verify required ca-file ca.pem crt {crt}.pem alpn h2");
    let tls_in = |crt: &str| format!("ssl crt {crt}.pem ca-file ca.pem verify required alpn h2");
    let plain = Haproxy::start(
        sb,
        "direct/proxy",
        &dir,
        "plain",
        &format!("{HAPROXY_GLOBAL}frontend f\n  bind {w_ip}:{PLAIN_PORT}\n  acl all_paths path_beg /\n  use_backend server if all_paths\nbackend server\n  server s {server}:8080\n"),
        PLAIN_PORT,
    )?;
    let b = Haproxy::start(
        sb,
        "direct/hop-b",
        &dir,
        "b",
        &format!("{HAPROXY_GLOBAL}frontend f\n  bind {b_ip}:{TLS_PORT} {}\n  default_backend server\nbackend server\n  server s {server}:8080\n", tls_in("b")),
        TLS_PORT,
    )?;
    let w = Haproxy::start(
        sb,
        "direct/proxy",
        &dir,
        "w",
        &format!("{HAPROXY_GLOBAL}frontend f\n  bind {w_ip}:{TLS_PORT} {}\n  acl all_paths path_beg /\n  use_backend b if all_paths\nbackend b\n  server b {b_ip}:{TLS_PORT} {}\n", tls_in("w"), tls_out("w")),
        TLS_PORT,
    )?;
    let a = Haproxy::start(
        sb,
        "direct/hop-a",
        &dir,
        "a",
        // HTTP/2 has no reason phrase, and h2load's HTTP/1.1 parser wants one: A puts
        // it back, as hyper does on the mesh's side.
        &format!("{HAPROXY_GLOBAL}frontend f\n  bind {a_ip}:{CHAIN_PORT}\n  http-response set-status 200 reason OK if {{ status 200 }}\n  default_backend w\nbackend w\n  server w {w_ip}:{TLS_PORT} {}\n", tls_out("a")),
        CHAIN_PORT,
    )?;
    Ok(Peers {
        plain,
        a,
        w,
        b,
        dir,
    })
}

/// The route with `server` and `server-v2` at these weights.
fn route(v1: u32, v2: u32) -> String {
    let text =
        std::fs::read_to_string(repo_root().join("bench/waypoint/route.yaml")).unwrap_or_default();
    text.replace(
        "{name: server, port: 80, weight: 1}, {name: server-v2, port: 80, weight: 0}",
        &format!(
            "{{name: server, port: 80, weight: {v1}}}, {{name: server-v2, port: 80, weight: {v2}}}"
        ),
    )
}

fn main() -> anyhow::Result<()> {
    if !is_root() {
        bail!("the waypoint benchmark needs root (network namespaces)");
    }
    let requests = env("WEFT_BENCH_REQUESTS", 20_000);
    let rounds = env("WEFT_BENCH_ROUNDS", 5);
    let clients = env("WEFT_BENCH_CLIENTS", 8);
    let flip_seconds = env("WEFT_BENCH_FLIP_SECONDS", 10);
    let manifests = TempManifests::copy(&repo_root().join("bench/waypoint"))?;
    let sb = Sandbox::up("wpbench", manifests.path())?;
    let waypoint_pid = sb.pid("mesh/waypoint-0")?;
    let node_pid = |n: &str| sb.node_pid(n);
    let peers = start_peers(&sb)?;
    let direct_server = sb.ip("direct/server")?;
    let w_ip = sb.ip("direct/proxy")?;
    let a_ip = sb.ip("direct/hop-a")?;
    let ways = [
        Way {
            name: "direct",
            client: "direct/client",
            url: format!("http://{direct_server}:8080/"),
            pids: vec![],
        },
        Way {
            name: "haproxy",
            client: "direct/client",
            url: format!("http://{w_ip}:{PLAIN_PORT}/"),
            pids: vec![("router", peers.plain.pid())],
        },
        Way {
            name: "tls-chain",
            client: "direct/client",
            url: format!("http://{a_ip}:{CHAIN_PORT}/"),
            pids: vec![
                ("A", peers.a.pid()),
                ("W", peers.w.pid()),
                ("B", peers.b.pid()),
            ],
        },
        Way {
            name: "mesh",
            client: "mesh/client",
            url: "http://10.96.2.10/".to_owned(),
            pids: vec![
                ("node-proxy (client side)", node_pid("node-1")?),
                ("waypoint", waypoint_pid),
                ("node-proxy (server side)", node_pid("node-2")?),
            ],
        },
    ];
    let (direct, plain, chain, mesh) = (0, 1, 2, 3);
    // Each path answers before it is measured.
    for way in &ways {
        let out = sb.exec(
            way.client,
            &["curl", "-sS", "-i", "--max-time", "5", &way.url],
        )?;
        let text = String::from_utf8_lossy(&out.stdout);
        if !text.starts_with("HTTP/1.1 200") {
            bail!(
                "{} does not answer 200:\n{text}{}",
                way.name,
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    // Warm-up: connections, pools, the waypoint's routes.
    for way in &ways {
        round(&sb, way, Load::Requests(2_000.min(requests)), clients)?;
    }
    let mut results: Vec<Vec<Round>> = vec![Vec::new(); ways.len()];
    let mut rss_under_load = 0.0f64;
    for _ in 0..rounds {
        for (i, way) in ways.iter().enumerate() {
            let r = round(&sb, way, Load::Requests(requests), clients)?;
            if i == mesh {
                rss_under_load = rss_under_load.max(rss_mib(waypoint_pid)?);
            }
            results[i].push(r);
        }
    }
    let med = |i: usize, f: &dyn Fn(&Round) -> f64| median(results[i].iter().map(f).collect());
    let of = |i: usize, f: &dyn Fn(&Round) -> f64| results[i].iter().map(f).collect::<Vec<_>>();
    let cpu = |i: usize, p: usize| of(i, &|r: &Round| r.cpu_us[p]);
    println!(
        "Waypoint benchmark: {} CPUs, {requests} requests x {rounds} alternating rounds per path, {clients} keep-alive connections (h2load --h1)",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );
    println!();
    println!("| measure | direct | HAProxy (L7, no TLS) | HAProxy TLS + HTTP/2 chain | mesh | mesh / TLS chain | target |");
    println!("|---|---:|---:|---:|---:|---:|---|");
    let rps = Ratio::paired(&of(mesh, &|r| r.rps), &of(chain, &|r| r.rps));
    println!(
        "| requests/s | {:.0} | {:.0} | {:.0} | {:.0} | {:.2}x ({}) | >= 1x {} |",
        med(direct, &|r| r.rps),
        med(plain, &|r| r.rps),
        med(chain, &|r| r.rps),
        med(mesh, &|r| r.rps),
        rps.median,
        rps.range(),
        rps.at_least(1.0)
    );
    let p50 = Ratio::paired(&of(mesh, &|r| r.p50_us), &of(chain, &|r| r.p50_us));
    println!(
        "| p50 latency, µs | {:.0} | {:.0} | {:.0} | {:.0} | {:.2}x ({}) | |",
        med(direct, &|r| r.p50_us),
        med(plain, &|r| r.p50_us),
        med(chain, &|r| r.p50_us),
        med(mesh, &|r| r.p50_us),
        p50.median,
        p50.range()
    );
    let p99 = Ratio::paired(&of(mesh, &|r| r.p99_us), &of(chain, &|r| r.p99_us));
    println!(
        "| p99 latency, µs | {:.0} | {:.0} | {:.0} | {:.0} | {:.2}x ({}) | <= 1.1x {} |",
        med(direct, &|r| r.p99_us),
        med(plain, &|r| r.p99_us),
        med(chain, &|r| r.p99_us),
        med(mesh, &|r| r.p99_us),
        p99.median,
        p99.range(),
        p99.verdict(1.1)
    );
    println!();
    println!("CPU per request, µs (median of the rounds), and each mesh process against the HAProxy process doing its job (median and range of the rounds' ratios):");
    println!();
    println!("| job | mesh process | µs | HAProxy TLS chain | µs | ratio | target | HAProxy, no TLS | µs | ratio |");
    println!("|---|---|---:|---|---:|---:|---|---|---:|---:|");
    let plain_cpu = cpu(plain, 0);
    for (job, m, c, target) in [
        ("client side: plain in, encrypted out", 0, 0, 1.15),
        ("the router (L7)", 1, 1, 1.3),
        ("server side: encrypted in, plain out", 2, 2, 1.15),
    ] {
        let r = Ratio::paired(&cpu(mesh, m), &cpu(chain, c));
        let vs_plain = (m == 1).then(|| Ratio::paired(&cpu(mesh, m), &plain_cpu));
        println!(
            "| {job} | {} | {:.1} | {} | {:.1} | {:.2}x ({}) | <= {target}x {} | {} | {} | {} |",
            ways[mesh].pids[m].0,
            median(cpu(mesh, m)),
            ways[chain].pids[c].0,
            median(cpu(chain, c)),
            r.median,
            r.range(),
            r.verdict(target),
            if m == 1 { "router" } else { "" },
            if m == 1 {
                format!("{:.1}", median(plain_cpu.clone()))
            } else {
                String::new()
            },
            vs_plain
                .map(|v| format!("{:.2}x ({})", v.median, v.range()))
                .unwrap_or_default(),
        );
    }
    let total = |i: usize| -> Vec<f64> { of(i, &|r| r.cpu_us.iter().sum()) };
    let all = Ratio::paired(&total(mesh), &total(chain));
    println!(
        "| all three | | {:.1} | | {:.1} | {:.2}x ({}) | | | | |",
        median(total(mesh)),
        median(total(chain)),
        all.median,
        all.range()
    );
    println!();
    println!("Waypoint RSS under load: {rss_under_load:.1} MiB");
    println!();

    // Route changes under load: the weights flipped every 100 ms in one run, none in
    // the run beside it (which goes first alternates).
    let flip = |on: bool| -> anyhow::Result<Round> {
        let stop = Arc::new(AtomicBool::new(false));
        let flipper = on.then(|| {
            let (stop, dir) = (stop.clone(), manifests.path().to_path_buf());
            std::thread::spawn(move || {
                let started = Instant::now();
                let mut flips = 0u64;
                while !stop.load(Ordering::Relaxed)
                    && started.elapsed() < Duration::from_secs(flip_seconds + 5)
                {
                    let (v1, v2) = if flips.is_multiple_of(2) {
                        (0, 1)
                    } else {
                        (1, 0)
                    };
                    let tmp = dir.join(".route.yaml.swp");
                    if std::fs::write(&tmp, route(v1, v2)).is_ok() {
                        let _ = std::fs::rename(&tmp, dir.join("route.yaml"));
                    }
                    flips += 1;
                    std::thread::sleep(Duration::from_millis(100));
                }
                let _ = std::fs::write(dir.join("route.yaml"), route(1, 0));
                flips
            })
        });
        let r = round(&sb, &ways[mesh], Load::Seconds(flip_seconds), clients);
        stop.store(true, Ordering::Relaxed);
        let flips = flipper.map(|h| h.join().unwrap_or(0));
        if let Some(n) = flips {
            println!("(flip run: {n} route changes)");
        }
        r
    };
    let served = |workload: &str| {
        sb.waypoint_metrics("mesh/waypoint-0")
            .map(|m| {
                metric_sum(
                    &m,
                    "weft_requests_total",
                    &[("destination_workload", workload)],
                )
            })
            .unwrap_or(0.0)
    };
    let v2_before = served("server-v2");
    let mut steady = Vec::new();
    let mut flipped = Vec::new();
    for i in 0..2 {
        if i == 0 {
            steady.push(flip(false)?);
            flipped.push(flip(true)?);
        } else {
            flipped.push(flip(true)?);
            steady.push(flip(false)?);
        }
        // The route settles back to all-v1 before the next run.
        std::thread::sleep(Duration::from_millis(500));
    }
    let v2_served = served("server-v2") - v2_before;
    let p99_flip = Ratio::paired(
        &flipped.iter().map(|r| r.p99_us).collect::<Vec<_>>(),
        &steady.iter().map(|r| r.p99_us).collect::<Vec<_>>(),
    );
    println!("| route changes under load ({flip_seconds} s runs, weights flipped every 100 ms) | steady | flipping | flipping / steady | target |");
    println!("|---|---:|---:|---:|---|");
    println!(
        "| requests (all succeeded) | {} | {} | | 0 failed (met) |",
        steady.iter().map(|r| r.requests).sum::<u64>(),
        flipped.iter().map(|r| r.requests).sum::<u64>()
    );
    println!(
        "| p99 latency, µs | {:.0} | {:.0} | {:.2}x ({}) | <= 1.1x {} |",
        median(steady.iter().map(|r| r.p99_us).collect()),
        median(flipped.iter().map(|r| r.p99_us).collect()),
        p99_flip.median,
        p99_flip.range(),
        p99_flip.verdict(1.1)
    );
    println!(
        "| requests answered by server-v2 (only while flipping) | | {v2_served:.0} | | > 0 {} |",
        weft_e2e::bench::met(v2_served > 0.0)
    );
    println!();
    println!("Medians of the rounds; ratios are the median (and range) of each round's ratio to the peer's round run beside it; latency percentiles from h2load's per-request log; CPU from /proc/<pid>/stat (utime + stime) before and after each round, per request. HAProxy: Debian's package, one thread each, keep-alive and `http-reuse always`; the chain's TLS hops are TLS 1.3 with client certificates (ECDSA P-256, TLS_AES_128_GCM_SHA256) and HTTP/2.");
    if v2_served == 0.0 {
        bail!("the route flips never reached the waypoint: server-v2 answered nothing");
    }
    drop(peers);
    Ok(())
}
