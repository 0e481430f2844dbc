//! The sandbox benchmark: pod-to-pod direct (outside the mesh) against pod-to-pod through
//! two node-proxies (captured, HBONE, mTLS), measured in one run on the same machine.
//!
//! `cargo build --release -p weft-cli -p weft-e2e && sudo target/release/sandbox-bench`
//! (or `bench/sandbox/run`). Prints a Markdown report. `WEFT_BENCH_SECONDS` sets the
//! iperf3 duration (default 10), `WEFT_BENCH_HOLD` the idle connections held (10000).

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::Value;
use weft_e2e::{is_root, repo_root, weftctl, Sandbox};

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn json(out: std::process::Output, what: &str) -> anyhow::Result<Value> {
    if !out.status.success() {
        bail!("{what} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    serde_json::from_slice(&out.stdout)
        .with_context(|| format!("{what}: {}", String::from_utf8_lossy(&out.stdout)))
}

fn rss_kib(pid: i32) -> anyhow::Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .context("no VmRSS")?;
    Ok(line
        .split_whitespace()
        .nth(1)
        .context("VmRSS value")?
        .parse()?)
}

struct PathResult {
    gbit_s: f64,
    p50: f64,
    p99: f64,
    conns_s: f64,
}

fn measure(sb: &Sandbox, ns: &str, seconds: u64) -> anyhow::Result<PathResult> {
    let client = format!("{ns}/client");
    let server = sb.ip(&format!("{ns}/server"))?;
    let weftctl = weftctl()?;
    let weftctl = weftctl.to_str().context("weftctl path")?;
    // iperf3 may need a moment after the sandbox starts; retry briefly.
    let mut iperf = None;
    for _ in 0..20 {
        let out = sb.exec(
            &client,
            &[
                "iperf3",
                "-c",
                &server,
                "-p",
                "5201",
                "-t",
                &seconds.to_string(),
                "-J",
            ],
        )?;
        if out.status.success() {
            iperf = Some(json(out, "iperf3")?);
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let iperf = iperf.context("iperf3 never connected")?;
    let bps = iperf["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .context("iperf3 result")?;
    let to = format!("{server}:9000");
    let pp = json(
        sb.exec(
            &client,
            &[
                weftctl, "debug", "pingpong", "--to", &to, "--rounds", "10000",
            ],
        )?,
        "pingpong",
    )?;
    let cr = json(
        sb.exec(
            &client,
            &[weftctl, "debug", "connrate", "--to", &to, "--seconds", "5"],
        )?,
        "connrate",
    )?;
    Ok(PathResult {
        gbit_s: bps / 1e9,
        p50: pp["p50_us"].as_f64().unwrap_or(f64::NAN),
        p99: pp["p99_us"].as_f64().unwrap_or(f64::NAN),
        conns_s: cr["per_second"].as_f64().unwrap_or(f64::NAN),
    })
}

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

    let direct = measure(&sb, "direct", seconds)?;
    let mesh = measure(&sb, "mesh", seconds)?;
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
    println!("| measure | direct (no mesh) | mesh (2 node-proxies) | mesh / direct | target |");
    println!("|---|---:|---:|---:|---|");
    let ratio = |m: f64, d: f64| m / d;
    let t = ratio(mesh.gbit_s, direct.gbit_s);
    println!(
        "| iperf3 single stream, Gbit/s | {:.2} | {:.2} | {:.0}% | >= 40% {} |",
        direct.gbit_s,
        mesh.gbit_s,
        t * 100.0,
        ok(t >= 0.4)
    );
    let p = ratio(mesh.p50, direct.p50);
    println!(
        "| 1-byte ping-pong p50, µs | {:.1} | {:.1} | {:.2}x | <= 1.6x {} |",
        direct.p50,
        mesh.p50,
        p,
        ok(p <= 1.6)
    );
    println!(
        "| 1-byte ping-pong p99, µs | {:.1} | {:.1} | {:.2}x | |",
        direct.p99,
        mesh.p99,
        ratio(mesh.p99, direct.p99)
    );
    let c = ratio(mesh.conns_s, direct.conns_s);
    println!(
        "| new connections/s (connect, 1 request, close) | {:.0} | {:.0} | {:.0}% | >= 30% {} |",
        direct.conns_s,
        mesh.conns_s,
        c * 100.0,
        ok(c >= 0.3)
    );
    println!();
    println!("| node-proxy | RSS idle | RSS with {hold} idle connections | per idle connection | RSS after all the load |");
    println!("|---|---:|---:|---:|---:|");
    for (i, node) in nodes.iter().enumerate() {
        let per = (held[i] - idle[i].min(held[i])) * 1024.0 / hold as f64;
        println!(
            "| {node} | {:.1} MiB {} | {:.1} MiB | {:.0} B {} | {:.1} MiB |",
            idle[i] / 1024.0,
            ok(idle[i] / 1024.0 <= 15.0),
            held[i] / 1024.0,
            per,
            ok(per <= 4096.0),
            after_load[i] / 1024.0,
        );
    }
    println!();
    println!(
        "{hold} connections opened in {:.1} s; iperf3 {seconds} s per path; ping-pong 10,000 round trips; connection rate over 5 s; RSS from /proc/<pid>/status VmRSS. Targets: throughput >= 40%, p50 <= 1.6x, connections/s >= 30%, RSS idle <= 15 MiB, <= 4 KiB per idle connection.",
        opened_in.as_secs_f64()
    );
    Ok(())
}

fn ok(met: bool) -> &'static str {
    if met {
        "(met)"
    } else {
        "(NOT met)"
    }
}
