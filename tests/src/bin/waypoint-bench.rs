//! The waypoint benchmark: small HTTP/1.1 keep-alive requests (h2load) from a client
//! pod to an echo server, in one run and in alternating rounds:
//!
//! - mesh: client -> node-proxy -> waypoint -> node-proxy -> server (HBONE, mTLS);
//! - peer: client -> HAProxy (its own pod, `mode http`, the same prefix route, no TLS)
//!   -> server;
//! - direct: client -> server.
//!
//! Reports requests/s, p50/p99 latency (from h2load's per-request log), proxy CPU per
//! request (utime + stime from /proc of the waypoint and both node-proxies, and of
//! HAProxy) and the waypoint's RSS under load.
//!
//! `cargo build --release -p weft-cli -p weft-e2e && sudo target/release/waypoint-bench`
//! (or `bench/waypoint/run`). `WEFT_BENCH_REQUESTS` sets the requests per round
//! (default 20000), `WEFT_BENCH_ROUNDS` the rounds per path (5), `WEFT_BENCH_CLIENTS`
//! the connections (8).

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};
use weft_e2e::bench::{cpu_seconds, env, median, percentile, status_kib, Ratio};
use weft_e2e::{is_root, repo_root, Sandbox};

fn rss_mib(pid: i32) -> anyhow::Result<f64> {
    Ok(status_kib(pid, "VmRSS")? / 1024.0)
}

/// One round's figures.
#[derive(Debug, Clone, Copy, Default)]
struct Round {
    rps: f64,
    p50_us: f64,
    p99_us: f64,
    cpu_us_per_request: f64,
}

struct Way {
    name: &'static str,
    client: &'static str,
    url: String,
    /// The proxies whose CPU is counted.
    pids: Vec<i32>,
}

fn round(sb: &Sandbox, way: &Way, requests: u64, clients: u64) -> anyhow::Result<Round> {
    let log = std::env::temp_dir().join(format!(
        "weft-waypoint-bench-{}-{}.log",
        std::process::id(),
        way.name
    ));
    let before: Vec<f64> = way
        .pids
        .iter()
        .map(|p| cpu_seconds(*p))
        .collect::<Result<_, _>>()?;
    let out = sb.exec(
        way.client,
        &[
            "h2load",
            "--h1",
            "-n",
            &requests.to_string(),
            "-c",
            &clients.to_string(),
            "--log-file",
            log.to_str().context("log path")?,
            &way.url,
        ],
    )?;
    let after: Vec<f64> = way
        .pids
        .iter()
        .map(|p| cpu_seconds(*p))
        .collect::<Result<_, _>>()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !text.contains(&format!("{requests} succeeded"))
        || !text.contains(&format!("{requests} 2xx"))
    {
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
    let cpu: f64 = after.iter().zip(&before).map(|(a, b)| a - b).sum();
    Ok(Round {
        rps,
        p50_us: percentile(&latencies, 0.5),
        p99_us: percentile(&latencies, 0.99),
        cpu_us_per_request: cpu * 1e6 / requests as f64,
    })
}

/// HAProxy in the `direct/proxy` pod: `mode http`, the same prefix route to the server.
struct Haproxy {
    child: std::process::Child,
    dir: PathBuf,
}

const HAPROXY_PORT: u16 = 8081;

impl Haproxy {
    fn start(sb: &Sandbox) -> anyhow::Result<Self> {
        if Command::new("haproxy").arg("-v").output().is_err() {
            bail!("haproxy is not installed (Debian: apt-get install haproxy; bench/waypoint/run installs it)");
        }
        let server = sb.ip("direct/server")?;
        let proxy = sb.ip("direct/proxy")?;
        let dir = std::env::temp_dir().join(format!("weft-waypoint-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let config = format!(
            "global\n  maxconn 8000\n  nbthread 1\ndefaults\n  mode http\n  option http-keep-alive\n  http-reuse always\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\nfrontend f\n  bind {proxy}:{HAPROXY_PORT}\n  acl all_paths path_beg /\n  use_backend server if all_paths\nbackend server\n  server s {server}:8080\n"
        );
        let file = dir.join("haproxy.cfg");
        std::fs::write(&file, config)?;
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &sb.netns("direct/proxy")?,
                "haproxy",
                "-db",
                "-f",
            ])
            .arg(&file)
            .stdout(Stdio::null())
            .spawn()
            .context("starting haproxy")?;
        let listening = weft_e2e::eventually(Duration::from_secs(5), || {
            let out = sb
                .exec(
                    "direct/proxy",
                    &["ss", "-Hltn", &format!("sport = :{HAPROXY_PORT}")],
                )
                .ok()?;
            (!out.stdout.is_empty()).then_some(())
        });
        if listening.is_none() {
            bail!("haproxy is not listening on port {HAPROXY_PORT}");
        }
        Ok(Haproxy { child, dir })
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The PID of the process `ip netns exec` started (haproxy replaces it by exec).
fn haproxy_pid(h: &Haproxy) -> i32 {
    h.child.id() as i32
}

fn main() -> anyhow::Result<()> {
    if !is_root() {
        bail!("the waypoint benchmark needs root (network namespaces)");
    }
    let requests = env("WEFT_BENCH_REQUESTS", 20_000);
    let rounds = env("WEFT_BENCH_ROUNDS", 5);
    let clients = env("WEFT_BENCH_CLIENTS", 8);
    let sb = Sandbox::up("wpbench", &repo_root().join("bench/waypoint"))?;
    let waypoint_pid = sb.pid("mesh/waypoint-0")?;
    let node_pids: Vec<i32> = sb
        .nodes()
        .iter()
        .map(|n| sb.node_pid(n))
        .collect::<Result<_, _>>()?;
    let haproxy = Haproxy::start(&sb)?;
    let direct_server = sb.ip("direct/server")?;
    let proxy = sb.ip("direct/proxy")?;
    let mut mesh_pids = vec![waypoint_pid];
    mesh_pids.extend(&node_pids);
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
            url: format!("http://{proxy}:{HAPROXY_PORT}/"),
            pids: vec![haproxy_pid(&haproxy)],
        },
        Way {
            name: "mesh",
            client: "mesh/client",
            url: "http://10.96.2.10/".to_owned(),
            pids: mesh_pids,
        },
    ];
    // Warm-up: connections, pools, the waypoint's routes.
    for way in &ways {
        round(&sb, way, 2_000.min(requests), clients)?;
    }
    let mut results: Vec<Vec<Round>> = vec![Vec::new(); ways.len()];
    let mut waypoint_cpu = Vec::new();
    let mut rss_under_load = 0.0f64;
    for _ in 0..rounds {
        for (i, way) in ways.iter().enumerate() {
            let before = cpu_seconds(waypoint_pid)?;
            let r = round(&sb, way, requests, clients)?;
            if way.name == "mesh" {
                waypoint_cpu.push((cpu_seconds(waypoint_pid)? - before) * 1e6 / requests as f64);
                rss_under_load = rss_under_load.max(rss_mib(waypoint_pid)?);
            }
            results[i].push(r);
        }
    }
    let summary: Vec<Round> = results
        .iter()
        .map(|rs| Round {
            rps: median(rs.iter().map(|r| r.rps).collect()),
            p50_us: median(rs.iter().map(|r| r.p50_us).collect()),
            p99_us: median(rs.iter().map(|r| r.p99_us).collect()),
            cpu_us_per_request: median(rs.iter().map(|r| r.cpu_us_per_request).collect()),
        })
        .collect();
    let (direct, peer, mesh) = (summary[0], summary[1], summary[2]);
    let wp_cpu = median(waypoint_cpu.clone());
    println!(
        "Waypoint benchmark: {} CPUs, {requests} requests x {rounds} alternating rounds per path, {clients} keep-alive connections (h2load --h1)",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );
    println!();
    println!("| measure | direct | HAProxy (L7, no TLS) | mesh (node-proxy, waypoint, node-proxy; mTLS) | mesh / HAProxy | target |");
    println!("|---|---:|---:|---:|---:|---|");
    println!(
        "| requests/s | {:.0} | {:.0} | {:.0} | {:.2}x | |",
        direct.rps,
        peer.rps,
        mesh.rps,
        mesh.rps / peer.rps
    );
    println!(
        "| p50 latency, µs | {:.0} | {:.0} | {:.0} | {:.2}x | |",
        direct.p50_us,
        peer.p50_us,
        mesh.p50_us,
        mesh.p50_us / peer.p50_us
    );
    // The targets are judged on each round's ratio against the HAProxy round just
    // before it, then the median of those: a slow minute of the machine moves both
    // sides of one ratio, where it would move only one of two separate medians.
    let of = |rs: &[Round], f: fn(&Round) -> f64| rs.iter().map(f).collect::<Vec<_>>();
    let p99 = Ratio::paired(
        &of(&results[2], |r| r.p99_us),
        &of(&results[1], |r| r.p99_us),
    );
    println!(
        "| p99 latency, µs | {:.0} | {:.0} | {:.0} | {:.2}x ({}) | <= 2x {} |",
        direct.p99_us,
        peer.p99_us,
        mesh.p99_us,
        p99.median,
        p99.range(),
        p99.verdict(2.0)
    );
    let cpu = Ratio::paired(&waypoint_cpu, &of(&results[1], |r| r.cpu_us_per_request));
    println!(
        "| proxy CPU per request, µs | | {:.1} | waypoint {:.1} (with both node-proxies {:.1}) | {:.2}x ({}) | waypoint <= 1.5x {} |",
        peer.cpu_us_per_request,
        wp_cpu,
        mesh.cpu_us_per_request,
        cpu.median,
        cpu.range(),
        cpu.verdict(1.5)
    );
    println!("| waypoint RSS under load, MiB | | | {rss_under_load:.1} | | |");
    println!();
    println!("Medians of the rounds; mesh / HAProxy for p99 and CPU is the median (and range) of each round's ratio to the HAProxy round before it; latency percentiles from h2load's per-request log; CPU from /proc/<pid>/stat (utime + stime) before and after each round. HAProxy: Debian's package, `mode http`, keep-alive and `http-reuse always`, one thread as the waypoint has, the same prefix route.");
    drop(haproxy);
    Ok(())
}
