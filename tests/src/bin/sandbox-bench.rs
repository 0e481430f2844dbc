//! The sandbox benchmark: pod-to-pod direct (outside the mesh) against pod-to-pod through
//! two node-proxies (captured, HBONE, mTLS), measured in one run on the same machine, with
//! a peer for scale: two HAProxy processes relaying plain TCP over the same hops.
//!
//! `sudo scripts/ship && sudo target/ship-pgo/sandbox-bench` (the binaries the image ships)
//! (or `bench/sandbox/run`). Prints a Markdown report. `WEFT_BENCH_SECONDS` sets the
//! iperf3 duration (default 10), `WEFT_BENCH_HOLD` the idle connections held (10000).

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::Value;
use weft_e2e::bench::{env, median, met, status_kib, Ratio};
use weft_e2e::{is_root, repo_root, weftctl, Sandbox};

fn json(out: std::process::Output, what: &str) -> anyhow::Result<Value> {
    if !out.status.success() {
        bail!("{what} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    serde_json::from_slice(&out.stdout)
        .with_context(|| format!("{what}: {}", String::from_utf8_lossy(&out.stdout)))
}

fn rss_kib(pid: i32) -> anyhow::Result<f64> {
    status_kib(pid, "VmRSS")
}

/// A path's figures: throughput from one run, the rest per alternating round.
struct PathResult {
    gbit_s: f64,
    p50s: Vec<f64>,
    p99s: Vec<f64>,
    rates: Vec<f64>,
}

impl PathResult {
    fn p50(&self) -> f64 {
        median(self.p50s.clone())
    }
    fn p99(&self) -> f64 {
        median(self.p99s.clone())
    }
    fn conns_s(&self) -> f64 {
        median(self.rates.clone())
    }
}

/// One way from the client pod to the server apps.
struct Path {
    /// The pod the clients run in.
    client: String,
    /// Where iperf3 connects.
    iperf: (String, u16),
    /// Where ping-pong and the connection-rate test connect.
    echo: String,
}

impl Path {
    /// Straight to the server pod, as `ns`'s client sees it.
    fn to_server(sb: &Sandbox, ns: &str) -> anyhow::Result<Self> {
        let server = sb.ip(&format!("{ns}/server"))?;
        Ok(Self {
            client: format!("{ns}/client"),
            iperf: (server.clone(), 5201),
            echo: format!("{server}:9000"),
        })
    }
}

/// The peer: two HAProxy processes relaying plain TCP over the same hops as the mesh
/// (client pod loopback -> relay -> fabric -> relay -> server pod loopback), with
/// HAProxy's default settings. No TLS, no HTTP/2, no capture: the cost of two relays.
struct Relays {
    children: Vec<std::process::Child>,
    dir: PathBuf,
}

const RELAY_IPERF: u16 = 7201;
const RELAY_ECHO: u16 = 7900;

impl Relays {
    fn start(sb: &Sandbox) -> anyhow::Result<Self> {
        if Command::new("haproxy").arg("-v").output().is_err() {
            bail!("haproxy is not installed (Debian: apt-get install haproxy; bench/sandbox/run installs it)");
        }
        let server = sb.ip("direct/server")?;
        let dir = std::env::temp_dir().join(format!("weft-bench-relays-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let mut relays = Self {
            children: Vec::new(),
            dir,
        };
        let config = |hops: &[(String, String)]| {
            let mut c = String::from(
                "global\n  maxconn 8000\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n",
            );
            for (i, (bind, to)) in hops.iter().enumerate() {
                c.push_str(&format!("listen r{i}\n  bind {bind}\n  server s {to}\n"));
            }
            c
        };
        let client_side = config(&[
            (
                format!("127.0.0.1:{RELAY_IPERF}"),
                format!("{server}:{}", RELAY_IPERF + 1),
            ),
            (
                format!("127.0.0.1:{RELAY_ECHO}"),
                format!("{server}:{}", RELAY_ECHO + 1),
            ),
        ]);
        let server_side = config(&[
            (
                format!("{server}:{}", RELAY_IPERF + 1),
                "127.0.0.1:5201".to_owned(),
            ),
            (
                format!("{server}:{}", RELAY_ECHO + 1),
                "127.0.0.1:9000".to_owned(),
            ),
        ]);
        for (pod, cfg) in [
            ("direct/client", client_side),
            ("direct/server", server_side),
        ] {
            let file = relays.dir.join(format!("{}.cfg", pod.replace('/', "-")));
            std::fs::write(&file, cfg)?;
            let child = Command::new("ip")
                .args(["netns", "exec", &sb.netns(pod)?, "haproxy", "-db", "-f"])
                .arg(&file)
                .stdout(Stdio::null())
                .spawn()
                .context("starting haproxy")?;
            relays.children.push(child);
        }
        for (pod, port) in [
            ("direct/client", RELAY_ECHO),
            ("direct/server", RELAY_ECHO + 1),
        ] {
            let listening = weft_e2e::eventually(Duration::from_secs(5), || {
                let out = sb
                    .exec(pod, &["ss", "-Hltn", &format!("sport = :{port}")])
                    .ok()?;
                (!out.stdout.is_empty()).then_some(())
            });
            if listening.is_none() {
                bail!("haproxy in {pod} is not listening on port {port}");
            }
        }
        Ok(relays)
    }

    fn path(&self) -> Path {
        Path {
            client: "direct/client".to_owned(),
            iperf: ("127.0.0.1".to_owned(), RELAY_IPERF),
            echo: format!("127.0.0.1:{RELAY_ECHO}"),
        }
    }
}

impl Drop for Relays {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn iperf3(sb: &Sandbox, path: &Path, seconds: u64) -> anyhow::Result<f64> {
    // iperf3 may need a moment after the sandbox starts; retry briefly.
    for _ in 0..20 {
        let out = sb.exec(
            &path.client,
            &[
                "iperf3",
                "-c",
                &path.iperf.0,
                "-p",
                &path.iperf.1.to_string(),
                "-t",
                &seconds.to_string(),
                "-J",
            ],
        )?;
        if out.status.success() {
            let result = json(out, "iperf3")?;
            let bps = result["end"]["sum_received"]["bits_per_second"]
                .as_f64()
                .context("iperf3 result")?;
            return Ok(bps / 1e9);
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    bail!(
        "iperf3 never connected to {}:{}",
        path.iperf.0,
        path.iperf.1
    )
}

fn pingpong(sb: &Sandbox, path: &Path, rounds: u32) -> anyhow::Result<(f64, f64)> {
    let weftctl = weftctl()?;
    let weftctl = weftctl.to_str().context("weftctl path")?;
    let rounds = rounds.to_string();
    let pp = json(
        sb.exec(
            &path.client,
            &[
                weftctl, "debug", "pingpong", "--to", &path.echo, "--rounds", &rounds,
            ],
        )?,
        "pingpong",
    )?;
    Ok((
        pp["p50_us"].as_f64().unwrap_or(f64::NAN),
        pp["p99_us"].as_f64().unwrap_or(f64::NAN),
    ))
}

fn connrate(sb: &Sandbox, path: &Path, seconds: u64) -> anyhow::Result<f64> {
    let weftctl = weftctl()?;
    let weftctl = weftctl.to_str().context("weftctl path")?;
    let cr = json(
        sb.exec(
            &path.client,
            &[
                weftctl,
                "debug",
                "connrate",
                "--to",
                &path.echo,
                "--seconds",
                &seconds.to_string(),
            ],
        )?,
        "connrate",
    )?;
    Ok(cr["per_second"].as_f64().unwrap_or(f64::NAN))
}

/// Measures every path. Latency and connection rate drift by tens of percent over
/// minutes on a shared machine, so for them the paths take turns: [`ROUNDS`] rounds,
/// alternating, of 4,000 round trips and then of one second of new connections. Each
/// path keeps its rounds, so a ratio can pair each round with its neighbour's.
fn measure(sb: &Sandbox, paths: &[&Path], seconds: u64) -> anyhow::Result<Vec<PathResult>> {
    let mut gbit = Vec::new();
    for path in paths {
        gbit.push(iperf3(sb, path, seconds)?);
    }
    let mut lat: Vec<(Vec<f64>, Vec<f64>)> = vec![(Vec::new(), Vec::new()); paths.len()];
    for _ in 0..ROUNDS {
        for (i, path) in paths.iter().enumerate() {
            let (p50, p99) = pingpong(sb, path, 4000)?;
            lat[i].0.push(p50);
            lat[i].1.push(p99);
        }
    }
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); paths.len()];
    for _ in 0..ROUNDS {
        for (i, path) in paths.iter().enumerate() {
            rates[i].push(connrate(sb, path, 1)?);
        }
    }
    Ok(gbit
        .into_iter()
        .zip(lat)
        .zip(rates)
        .map(|((gbit_s, (p50s, p99s)), rates)| PathResult {
            gbit_s,
            p50s,
            p99s,
            rates,
        })
        .collect())
}

const ROUNDS: usize = 5;

fn main() -> anyhow::Result<()> {
    if !is_root() {
        bail!("the sandbox benchmark needs root (network namespaces)");
    }
    let seconds = env("WEFT_BENCH_SECONDS", 10);
    let hold = env("WEFT_BENCH_HOLD", 10_000);
    let sb = Sandbox::up("bench", &repo_root().join("bench/sandbox"))?;
    let nodes = sb.nodes();
    let pids: Vec<i32> = nodes
        .iter()
        .map(|n| sb.node_pid(n))
        .collect::<Result<_, _>>()?;
    let idle: Vec<f64> = pids.iter().map(|p| rss_kib(*p)).collect::<Result<_, _>>()?;
    // Every pod may reuse TIME_WAIT ports for new outgoing connections, so tens of
    // thousands of short connections do not slow the kernel's port search in the next
    // test. In the mesh the proxy's connections to the server app start in the server
    // pod (from the client's address) and end in TIME_WAIT there, so both ends matter.
    for client in [
        "direct/client",
        "mesh/client",
        "direct/server",
        "mesh/server",
    ] {
        sb.exec(client, &["sysctl", "-q", "-w", "net.ipv4.tcp_tw_reuse=1"])?;
    }

    // Idle connections through the mesh first: the connection-rate test leaves tens of
    // thousands of sockets in TIME_WAIT, which slows the kernel's port search for new
    // connections.
    let server = sb.ip("mesh/server")?;
    let ns = sb.netns("mesh/client")?;
    let mut holder = Command::new("ip")
        .args(["netns", "exec", &ns])
        .arg(weftctl()?)
        .args([
            "debug",
            "hold",
            "--to",
            &format!("{server}:9000"),
            "--count",
            &hold.to_string(),
        ])
        .stdout(Stdio::piped())
        .spawn()?;
    let stdout = holder.stdout.take().context("hold stdout")?;
    let start = Instant::now();
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    if !line.starts_with("holding") {
        let _ = holder.kill();
        bail!("could not hold {hold} connections: {line:?}");
    }
    let opened_in = start.elapsed();
    std::thread::sleep(Duration::from_secs(1));
    let held: Vec<f64> = pids.iter().map(|p| rss_kib(*p)).collect::<Result<_, _>>()?;
    let _ = holder.kill();
    let _ = holder.wait();

    let relays = Relays::start(&sb)?;
    let paths = [
        Path::to_server(&sb, "direct")?,
        Path::to_server(&sb, "mesh")?,
        relays.path(),
    ];
    let mut results = measure(&sb, &[&paths[0], &paths[1], &paths[2]], seconds)?.into_iter();
    drop(relays);
    let (Some(direct), Some(mesh), Some(peer)) = (results.next(), results.next(), results.next())
    else {
        bail!("a path went unmeasured");
    };
    let after_load: Vec<f64> = pids.iter().map(|p| rss_kib(*p)).collect::<Result<_, _>>()?;
    let (cpu, kernel) = (
        std::fs::read_to_string("/proc/cpuinfo")
            .unwrap_or_default()
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, m)| m.trim().to_owned())
            .unwrap_or_default(),
        String::from_utf8_lossy(&Command::new("uname").arg("-r").output()?.stdout)
            .trim()
            .to_owned(),
    );
    println!(
        "Sandbox benchmark: {} CPUs ({cpu}), Linux {kernel}",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );
    println!();
    // Latency and connection rate are judged on each round's ratio to the path measured
    // next to it in that round (the rounds go direct, mesh, peer), then the median.
    let p50_direct = Ratio::paired(&mesh.p50s, &direct.p50s);
    let p50_peer = Ratio::paired(&mesh.p50s, &peer.p50s);
    let p99_peer = Ratio::paired(&mesh.p99s, &peer.p99s);
    let rate_direct = Ratio::paired(&mesh.rates, &direct.rates);
    println!("| measure | direct (no mesh) | mesh (2 node-proxies) | peer: 2 HAProxy TCP relays | mesh / direct | peer / direct | mesh / peer |");
    println!("|---|---:|---:|---:|---|---:|---|");
    let t = mesh.gbit_s / direct.gbit_s;
    println!(
        "| iperf3 single stream, Gbit/s | {:.2} | {:.2} | {:.2} | {:.0}%, >= 40% {} | {:.0}% | |",
        direct.gbit_s,
        mesh.gbit_s,
        peer.gbit_s,
        t * 100.0,
        met(t >= 0.4),
        peer.gbit_s / direct.gbit_s * 100.0,
    );
    println!(
        "| 1-byte ping-pong p50, µs | {:.1} | {:.1} | {:.1} | {:.2}x ({}), <= 1.6x {} | {:.2}x | {:.2}x ({}), <= 0.9x {} |",
        direct.p50(),
        mesh.p50(),
        peer.p50(),
        p50_direct.median,
        p50_direct.range(),
        p50_direct.verdict(1.6),
        peer.p50() / direct.p50(),
        p50_peer.median,
        p50_peer.range(),
        p50_peer.verdict(0.9),
    );
    println!(
        "| 1-byte ping-pong p99, µs | {:.1} | {:.1} | {:.1} | {:.2}x | {:.2}x | {:.2}x ({}), <= 1.0x {} |",
        direct.p99(),
        mesh.p99(),
        peer.p99(),
        mesh.p99() / direct.p99(),
        peer.p99() / direct.p99(),
        p99_peer.median,
        p99_peer.range(),
        p99_peer.verdict(1.0),
    );
    println!(
        "| new connections/s (connect, 1 request, close) | {:.0} | {:.0} | {:.0} | {:.0}% ({:.0}–{:.0}%), >= 30% {} | {:.0}% | |",
        direct.conns_s(),
        mesh.conns_s(),
        peer.conns_s(),
        rate_direct.median * 100.0,
        rate_direct.lo * 100.0,
        rate_direct.hi * 100.0,
        rate_direct.at_least(0.3),
        peer.conns_s() / direct.conns_s() * 100.0,
    );
    println!();
    println!("| node-proxy | RSS idle | RSS with {hold} idle connections | per idle connection | RSS after all the load |");
    println!("|---|---:|---:|---:|---:|");
    for (i, node) in nodes.iter().enumerate() {
        let per = (held[i] - idle[i].min(held[i])) * 1024.0 / hold as f64;
        println!(
            "| {node} | {:.1} MiB {} | {:.1} MiB | {:.0} B {} | {:.1} MiB |",
            idle[i] / 1024.0,
            met(idle[i] / 1024.0 <= 15.0),
            held[i] / 1024.0,
            per,
            met(per <= 4096.0),
            after_load[i] / 1024.0,
        );
    }
    println!();
    println!(
        "{hold} connections opened in {:.1} s; iperf3 {seconds} s per path; ping-pong {ROUNDS} alternating rounds of 4,000 round trips per path, connection rate {ROUNDS} alternating rounds of 1 s per path; figures are the medians of the rounds, and a ratio with a range in parentheses is the median (and range) of each round's ratio to the other path's round beside it; RSS from /proc/<pid>/status VmRSS. The peer relays plain TCP (no TLS, no HTTP/2, no capture) over the mesh's hops, with HAProxy's default settings. Targets: throughput >= 40% of direct, p50 <= 1.6x direct and <= 0.9x the peer, p99 <= 1.0x the peer, connections/s >= 30% of direct, RSS idle <= 15 MiB, <= 4 KiB per idle connection.",
        opened_in.as_secs_f64()
    );
    Ok(())
}
