//! The controller benchmark: a mesh of `WEFT_BENCH_PODS` pods (10,000) behind
//! `WEFT_BENCH_SERVICES` services (1,000) in a manifest directory, one controller
//! process (`weftctl controller`), and `WEFT_BENCH_SUBSCRIBERS` node-proxy subscriptions
//! (100, one per node) in this process over loopback TLS, each applying the model as
//! node-proxy does. Reports, in one run:
//!
//! - the initial sync per subscriber (subscribe to full model applied);
//! - `WEFT_BENCH_CHANGES` (100) one-pod changes (a pod's file rewritten with a new IP):
//!   time from the write to the last subscriber (and to the first) having applied it;
//! - bytes pushed per one-pod change per subscriber;
//! - the controller's RSS and CPU.
//!
//! Baselines measured in the same run: one translation of the whole mesh (the floor of
//! any change-to-applied time, since a change is a full re-translation), and the first
//! subscriber to apply each change (the fan-out cost is the gap to the last).
//!
//! `cargo build --release -p weft-cli -p weft-e2e && target/release/controller-bench`.
//! Needs no root: everything is on loopback.

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use arc_swap::ArcSwap;
use runtime::config_client::{self, Changed, ConfigMetrics, ControllerConfig, Subscription};
use runtime::state::{CertSource, Identities, ModelStatus};
use tokio_util::sync::CancellationToken;
use weft_e2e::bench::{cpu_seconds, env, percentile, status_kib};
use weft_e2e::weftctl;

/// A CA source the benchmark never calls (subscriptions need one to hand bundles to).
struct NoCertificates;

impl CertSource for NoCertificates {
    fn fetch(
        &self,
        _: &tunnel::identity::Identity,
    ) -> tunnel::hbone::BoxFuture<
        '_,
        Result<
            (
                tunnel::identity::WorkloadCert,
                tunnel::identity::TrustBundle,
            ),
            runtime::state::CertError,
        >,
    > {
        Box::pin(async {
            Err(runtime::state::CertError::Unavailable(
                "not in the benchmark".into(),
            ))
        })
    }
}

const NAMESPACES: u64 = 10;

fn pod_ip(i: u64) -> IpAddr {
    IpAddr::from([10, 244, (1 + i / 250) as u8, (i % 250 + 2) as u8])
}

fn pod_file(i: u64, services: u64, ip: IpAddr) -> String {
    let service = i % services;
    controller::testing::pod_yaml(
        &format!("ns-{}", service % NAMESPACES),
        &format!("pod-{i}"),
        &format!("uid-{i}"),
        &format!("node-{}", i % env("WEFT_BENCH_SUBSCRIBERS", 100)),
        &format!("sa-{service}"),
        &ip.to_string(),
        &[("app", &format!("svc-{service}"))],
    )
}

fn write_atomic(path: &Path, text: &str) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(tmp, path)
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// (utime + stime in seconds, VmRSS KiB, VmHWM KiB) of a process.
fn usage(pid: u32) -> anyhow::Result<(f64, f64, f64)> {
    let pid = i32::try_from(pid)?;
    Ok((
        cpu_seconds(pid)?,
        status_kib(pid, "VmRSS")?,
        status_kib(pid, "VmHWM")?,
    ))
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.split_whitespace().next() == Some(name))
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        .sum()
}

struct Stopper(Child);

impl Drop for Stopper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn main() -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run())
}

async fn run() -> anyhow::Result<()> {
    let pods = env("WEFT_BENCH_PODS", 10_000);
    let services = env("WEFT_BENCH_SERVICES", 1_000).max(1);
    let subscribers = env("WEFT_BENCH_SUBSCRIBERS", 100).max(1);
    let changes = env("WEFT_BENCH_CHANGES", 100).max(1);
    let dir = std::env::temp_dir().join(format!("weft-controller-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let manifests = dir.join("manifests");
    std::fs::create_dir_all(&manifests)?;

    // The mesh: namespaces, one file per pod, one file of services per namespace.
    for n in 0..NAMESPACES {
        std::fs::write(
            manifests.join(format!("ns-{n}.yaml")),
            controller::testing::namespace_yaml(&format!("ns-{n}"), true),
        )?;
    }
    for i in 0..pods {
        std::fs::write(
            manifests.join(format!("pod-{i}.yaml")),
            pod_file(i, services, pod_ip(i)),
        )?;
    }
    let mut svc = vec![String::new(); NAMESPACES as usize];
    for j in 0..services {
        let vip = IpAddr::from([10, 96, (j / 250) as u8, (j % 250 + 2) as u8]);
        let _ = write!(
            svc[(j % NAMESPACES) as usize],
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: svc-{j}, namespace: ns-{}}}\nspec: {{clusterIP: {vip}, selector: {{app: svc-{j}}}, ports: [{{name: http, port: 80, targetPort: 8080}}]}}\n",
            j % NAMESPACES
        );
    }
    for (n, text) in svc.iter().enumerate() {
        std::fs::write(manifests.join(format!("svc-{n}.yaml")), text)?;
    }
    let tokens = dir.join("tokens");
    for s in 0..subscribers {
        controller::auth::NodeTokens::create(&tokens, &format!("node-{s}"))?;
    }

    // Baseline: one translation of the whole mesh, in this process.
    let objects = controller::manifests::load(std::slice::from_ref(&manifests))?.objects;
    let mut translate_ms = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        let translation =
            controller::translate::translate(&objects, &controller::translate::Settings::default());
        translate_ms.push(t.elapsed().as_secs_f64() * 1000.0);
        std::hint::black_box(translation);
    }
    translate_ms.sort_by(f64::total_cmp);
    drop(objects);

    let (grpc, admin) = (free_port()?, free_port()?);
    let grpc_addr = SocketAddr::from(([127, 0, 0, 1], grpc));
    let admin_addr = SocketAddr::from(([127, 0, 0, 1], admin));
    let started = Instant::now();
    let child = Command::new(weftctl()?)
        .arg("controller")
        .arg("--manifests")
        .arg(&manifests)
        .arg("--ca-dir")
        .arg(dir.join("ca"))
        .arg("--node-tokens")
        .arg(&tokens)
        .args([
            "--listen",
            &grpc_addr.to_string(),
            "--admin",
            &admin_addr.to_string(),
        ])
        .env(
            "RUST_LOG",
            std::env::var("WEFT_BENCH_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("controller.log"))?)
        .spawn()
        .context("cannot start the controller")?;
    let controller = Stopper(child);
    let pid = controller.0.id();
    loop {
        if weft_e2e::http_get(admin_addr, "/ready").is_ok_and(|(s, _)| s == 200) {
            break;
        }
        if started.elapsed() > Duration::from_secs(120) {
            bail!(
                "the controller is not ready after 120 s; see {}",
                dir.join("controller.log").display()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let ready_s = started.elapsed().as_secs_f64();
    let cpu_at_ready = usage(pid)?.0;

    // The subscribers, all at once, as node-proxies after a controller rollout.
    let shutdown = CancellationToken::new();
    let target: Arc<Mutex<Option<(String, IpAddr)>>> = Arc::new(Mutex::new(None));
    let mut applied = Vec::new();
    let mut synced = Vec::new();
    let sync_start = Instant::now();
    for s in 0..subscribers {
        let node = format!("node-{s}");
        let config = ControllerConfig {
            addr: grpc_addr.to_string(),
            server_name: controller::testing::SERVER_NAME.into(),
            roots: dir.join("ca").join(controller::ca::ROOT_CERT),
            token: tokens.join(format!("{node}{}", controller::auth::TOKEN_SUFFIX)),
            node,
            waypoint: None,
        };
        let channel = config_client::channel(&config);
        let model = Arc::new(ArcSwap::from_pointee(api::Model::default()));
        let (tx, mut rx) = tokio::sync::watch::channel(Changed::default());
        let subscription = Subscription {
            config,
            channel,
            model: model.clone(),
            status: Arc::new(Mutex::new(ModelStatus::default())),
            changed: tx,
            identities: Identities::new(Arc::new(NoCertificates), shutdown.clone()),
            metrics: ConfigMetrics::default(),
            check: None,
        };
        tokio::spawn(subscription.run(shutdown.clone()));
        let done: Arc<Mutex<Option<Instant>>> = Arc::default();
        let first: Arc<Mutex<Option<Instant>>> = Arc::default();
        let (target, done2, first2) = (target.clone(), done.clone(), first.clone());
        tokio::spawn(async move {
            while rx.changed().await.is_ok() {
                let now = Instant::now();
                let m = model.load();
                first2.lock().expect("no poison").get_or_insert(now);
                let want = target.lock().expect("no poison").clone();
                if let Some((uid, ip)) = want {
                    if m.workload(&uid).is_some_and(|w| w.ips == [ip]) {
                        done2.lock().expect("no poison").get_or_insert(now);
                    }
                }
            }
        });
        applied.push(done);
        synced.push(first);
    }
    loop {
        let all = synced
            .iter()
            .all(|s| s.lock().expect("no poison").is_some());
        if all {
            break;
        }
        if sync_start.elapsed() > Duration::from_secs(300) {
            bail!("not every subscriber synced within 300 s");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let sync_wall = sync_start.elapsed().as_secs_f64();
    let mut sync_ms: Vec<f64> = synced
        .iter()
        .filter_map(|s| {
            s.lock()
                .expect("no poison")
                .map(|t| (t - sync_start).as_secs_f64() * 1000.0)
        })
        .collect();
    sync_ms.sort_by(f64::total_cmp);
    let (cpu_synced, rss_synced, _) = usage(pid)?;
    let metrics_before = weft_e2e::http_get(admin_addr, "/metrics")?.1;
    let bytes_before = metric(&metrics_before, "weft_controller_pushed_bytes_total");

    // One-pod changes, one after the other.
    let mut last_ms = Vec::new();
    let mut first_ms = Vec::new();
    let changes_start = Instant::now();
    for k in 0..changes {
        let i = (k * 7919) % pods;
        let ip = IpAddr::from([10, 250, (k / 250) as u8, (k % 250 + 2) as u8]);
        for a in &applied {
            *a.lock().expect("no poison") = None;
        }
        *target.lock().expect("no poison") = Some((format!("uid-{i}"), ip));
        let t0 = Instant::now();
        write_atomic(
            &manifests.join(format!("pod-{i}.yaml")),
            &pod_file(i, services, ip),
        )?;
        loop {
            let times: Vec<Option<Instant>> = applied
                .iter()
                .map(|a| *a.lock().expect("no poison"))
                .collect();
            if times.iter().all(Option::is_some) {
                let times: Vec<Instant> = times.into_iter().flatten().collect();
                let last = times.iter().max().copied().unwrap_or(t0);
                let first = times.iter().min().copied().unwrap_or(t0);
                last_ms.push((last - t0).as_secs_f64() * 1000.0);
                first_ms.push((first - t0).as_secs_f64() * 1000.0);
                break;
            }
            if t0.elapsed() > Duration::from_secs(30) {
                bail!("change {k} (pod-{i}) not applied everywhere within 30 s");
            }
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        // Changes a little apart, as edits are: each its own version.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let changes_wall = changes_start.elapsed().as_secs_f64();
    let (cpu_end, rss_end, hwm) = usage(pid)?;
    let metrics_after = weft_e2e::http_get(admin_addr, "/metrics")?.1;
    let bytes_per_change = (metric(&metrics_after, "weft_controller_pushed_bytes_total")
        - bytes_before)
        / (changes * subscribers) as f64;
    shutdown.cancel();
    last_ms.sort_by(f64::total_cmp);
    first_ms.sort_by(f64::total_cmp);

    let model_resources = metric(&metrics_after, "weft_controller_resources");
    println!("## Controller: {pods} pods, {services} services, {subscribers} subscribers\n");
    println!("| measure | value | target |\n|---|---:|---:|");
    println!("| resources in the model | {model_resources} | |");
    println!("| controller start to first model (reads {pods} files) | {ready_s:.2} s | |");
    println!(
        "| translation of the whole mesh, in-process (baseline), median of 5 | {:.1} ms | |",
        percentile(&translate_ms, 0.5)
    );
    println!(
        "| initial sync per subscriber, p50 / p99 / max | {:.0} / {:.0} / {:.0} ms | |",
        percentile(&sync_ms, 0.5),
        percentile(&sync_ms, 0.99),
        sync_ms.last().copied().unwrap_or(f64::NAN)
    );
    println!("| all {subscribers} subscribers synced (they start together) | {sync_wall:.2} s | |");
    println!("| change to every subscriber applied, p50 / p99 ({changes} changes) | {:.1} / {:.1} ms | p99 <= 100 ms |", percentile(&last_ms, 0.5), percentile(&last_ms, 0.99));
    println!(
        "| change to the first subscriber applied, p50 / p99 | {:.1} / {:.1} ms | |",
        percentile(&first_ms, 0.5),
        percentile(&first_ms, 0.99)
    );
    println!(
        "| change to all applied, p50, as a multiple of one translation | {:.1}x | |",
        percentile(&last_ms, 0.5) / percentile(&translate_ms, 0.5)
    );
    println!(
        "| bytes pushed per one-pod change per subscriber | {bytes_per_change:.0} B | <= 2048 B |"
    );
    println!("| controller RSS after the initial sync / at the end / peak | {:.0} / {:.0} / {:.0} MiB | <= 300 MiB |", rss_synced / 1024.0, rss_end / 1024.0, hwm / 1024.0);
    println!("| controller CPU: start and read | {cpu_at_ready:.2} s | |");
    println!(
        "| controller CPU: initial sync of all subscribers | {:.2} s | |",
        cpu_synced - cpu_at_ready
    );
    println!(
        "| controller CPU during the changes | {:.2} s over {changes_wall:.1} s ({:.0}% of a core) | |",
        cpu_end - cpu_synced,
        100.0 * (cpu_end - cpu_synced) / changes_wall
    );
    drop(controller);
    if std::env::var_os("WEFT_BENCH_KEEP").is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(())
}
