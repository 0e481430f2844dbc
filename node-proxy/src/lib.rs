//! node-proxy: Weft's per-node L4 proxy.
//!
//! The node agent hands every enrolled pod on the node over the handoff socket, with its
//! network namespace and the listeners it opened there, where the pod's capture rules
//! (the agent's too) send its traffic:
//!
//! ```text
//!  app --> 15001 outbound --model--> HBONE (pod's identity, from the pod's IP) --> peer:15008
//!  peer --> 15008 HBONE --mTLS + identity bound to source IP--> app (client's source IP kept)
//!  non-mesh client --> 15006 plaintext --(refused in STRICT)--> app
//! ```
//!
//! The model and certificates come from the controller ([`config_client`]): one
//! subscription keeps the model current (served from the last good one while the
//! controller is away), and each pod identity's leaf is signed by the controller's CA.
//! node-proxy holds no CA key.
//!
//! Modules follow the data path: [`outbound`], [`inbound`] and [`authz`] (policy),
//! [`relay`], [`metrics`], [`admin`], and [`proxy`] tying them together; the handoff
//! socket, network namespaces, the model and certificates and the controller client
//! are `weft-runtime`'s, shared with the node agent and the waypoint.

pub mod admin;
pub mod authz;
pub mod inbound;
pub mod metrics;
pub mod outbound;
pub mod proxy;
pub mod relay;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use arc_swap::ArcSwap;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use tracing::{debug, info, warn};

use runtime::config_client::{self, ControllerFlags};
use runtime::handoff;
use runtime::state::{self, Identities, ModelStatus};

use crate::proxy::{Ctx, Limits, Pods};

/// node-proxy's configuration, from flags or environment variables.
#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    /// The node this proxy serves.
    #[arg(long, env = "WEFT_NODE")]
    pub node: String,
    /// The Unix socket pods are handed over on.
    #[arg(
        long,
        env = "WEFT_HANDOFF_SOCKET",
        default_value = runtime::handoff::DEFAULT_SOCKET
    )]
    pub handoff: PathBuf,
    /// Where the controller is and how to authenticate to it.
    #[command(flatten)]
    pub control: ControllerFlags,
    /// The SPIFFE trust domain.
    #[arg(long, env = "WEFT_TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,
    /// Admin endpoint (metrics, health, readiness, config dump). In its DaemonSet,
    /// node-proxy has a network namespace of its own and this is on its pod IP, where the
    /// kubelet probes it and Prometheus scrapes it.
    #[arg(long, env = "WEFT_ADMIN", default_value = "127.0.0.1:15000")]
    pub admin: SocketAddr,
    /// A directory that lives as long as this node-proxy's pod (an `emptyDir`). Once a
    /// newer node-proxy has taken the node over, this one says so there, so that its
    /// container, restarted by the kubelet, does not take the node back.
    #[arg(long, env = "WEFT_POD_DIR")]
    pub pod_dir: Option<PathBuf>,
    /// Seconds open connections may finish after SIGTERM.
    #[arg(long, env = "WEFT_DRAIN_GRACE", default_value_t = 5)]
    pub drain_grace: u64,
    /// Connections one listener serves at once (for HBONE: proxied streams).
    #[arg(long, env = "WEFT_MAX_CONNECTIONS", default_value_t = 65536)]
    pub max_connections: usize,
    /// Proxied connections the whole node-proxy serves at once.
    #[arg(long, env = "WEFT_MAX_NODE_CONNECTIONS", default_value_t = 262_144)]
    pub max_node_connections: usize,
    /// Seconds a pod handed over waits for its workload to reach the model (at most an
    /// hour).
    #[arg(long, env = "WEFT_POD_WAIT", default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(0..=3600))]
    pub pod_wait: u64,
    /// Access-log lines (one per connection on close, JSON on stdout) written per second
    /// at most; lines over the rate are dropped and counted. 0 switches the log off.
    #[arg(long, env = "WEFT_ACCESS_LOG_RATE", default_value_t = 1000)]
    pub access_log_rate: u32,
    /// Threads serving connections (read by the `node-proxy` binary, which builds its
    /// runtime from it). One, a single-threaded runtime, costs the least CPU per request:
    /// with two, the workers wake each other (a `futex` call for most requests) to share
    /// the work (docs/performance.md). Raise it on a node whose meshed traffic needs more
    /// than a core.
    #[arg(long, env = "WEFT_WORKER_THREADS", default_value_t = 1,
          value_parser = clap::value_parser!(u16).range(1..))]
    pub worker_threads: u16,
}

/// How long node-proxy waits for its first model before taking over or serving.
const FIRST_MODEL_WAIT: Duration = Duration::from_secs(10);

/// The file in `--pod-dir` that says this pod's node-proxy was taken over.
const RETIRED: &str = "retired";

/// Runs node-proxy until `shutdown`, then drains. Taken over by a newer node-proxy, it
/// drains and then stays retired (not ready, serving nothing) until `shutdown`.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let phase = Arc::new(Mutex::new(admin::Phase::Starting(
        "waiting for a model from the controller".into(),
    )));
    let set_phase = |p: admin::Phase| *phase.lock().expect("phase lock is never poisoned") = p;
    // Serving stops on SIGTERM, or once a newer node-proxy has taken the node over.
    let serving = shutdown.child_token();
    let mut registry = Registry::default();
    let tunnel_metrics = tunnel::metrics::Metrics::new(&mut registry);
    let log = match config.access_log_rate {
        0 => tunnel::access_log::LogWriter::off(),
        rate => tunnel::access_log::LogWriter::start(rate)
            .context("cannot start the access log's writer")?,
    };
    let metrics = metrics::Metrics::new(&mut registry, log);
    let config_metrics = config_client::ConfigMetrics::new(&mut registry);

    let status = Arc::new(Mutex::new(ModelStatus::default()));
    let model = Arc::new(ArcSwap::from_pointee(api::Model::default()));
    let controller = config.control.config(&config.node, None);
    let channel = config_client::channel(&controller);
    let ca = config_client::CaClient::new(controller.clone(), channel.clone());
    let identities = Identities::new(Arc::new(ca), serving.clone());
    registry.register(
        "weft_certificate_rotations",
        "Workload certificates renewed before expiry",
        identities.rotations.clone(),
    );
    registry.register_collector(Box::new(state::ExpiryCollector(identities.clone())));
    registry.register_collector(Box::new(tunnel::process::ProcessCollector));
    let (changed_tx, changed_rx) = tokio::sync::watch::channel(config_client::Changed::default());
    let subscription = config_client::Subscription {
        config: controller,
        channel,
        model: model.clone(),
        status: status.clone(),
        changed: changed_tx,
        identities: identities.clone(),
        metrics: config_metrics,
        check: None,
    };
    // The admin endpoint first, on this process's own address: the kubelet's probes
    // reach this process, not the one it replaces.
    let admin_listener = tunnel::net::listen(config.admin)
        .with_context(|| format!("cannot listen on admin address {}", config.admin))?;
    // Anything but "no such file" counts as retired: a node-proxy that cannot tell must
    // not take the node from the one serving it.
    let retired = match config.pod_dir.as_ref().map(|d| d.join(RETIRED)) {
        None => None,
        Some(file) => match std::fs::read_to_string(&file) {
            Ok(why) => Some(why),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => Some(format!("{} cannot be read ({e})", file.display())),
        },
    };

    let ctx = Ctx::new(
        config.node.clone(),
        config.trust_domain.clone(),
        model,
        status.clone(),
        changed_rx,
        identities,
        tunnel_metrics,
        metrics,
        Limits {
            max_connections: config.max_connections,
            max_node_connections: config.max_node_connections,
            drain_grace: Duration::from_secs(config.drain_grace),
            pod_wait: Duration::from_secs(config.pod_wait),
        },
    );
    let pods = Pods::new(ctx.clone());
    let admin = Arc::new(admin::Admin {
        ctx: ctx.clone(),
        pods: pods.clone(),
        registry,
        phase: phase.clone(),
    });
    if let Some(why) = retired {
        // This pod's node-proxy was taken over before its container restarted: it asks
        // the controller for nothing and serves nothing but its admin endpoint.
        let why = format!("retired: {}", why.trim());
        warn!("{why}; not taking the node back (this pod is being replaced)");
        set_phase(admin::Phase::Retired(why));
        runtime::admin::serve(admin_listener, admin, shutdown).await;
        return Ok(());
    }
    tokio::spawn(subscription.run(serving.clone()));
    tokio::spawn(pods.clone().enforce_changes(serving.clone()));
    tokio::spawn(pods.clone().prune_metrics(serving.clone()));
    tokio::spawn(runtime::admin::serve(
        admin_listener,
        admin,
        shutdown.clone(),
    ));

    if let Some(dir) = config.handoff.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    // Serve nothing before the model is known: with an empty one, inbound identities
    // would not match their source and services would not resolve.
    let loaded = tokio::select! {
        _ = shutdown.cancelled() => return Ok(()),
        waited = tokio::time::timeout(FIRST_MODEL_WAIT, async {
            while !status.lock().expect("status lock is never poisoned").loaded {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }) => waited.is_ok(),
    };
    // A node-proxy already serving this node hands over its listeners. It keeps serving
    // and keeps the handoff socket's path until this one confirms (`takeover_done`), so
    // any failure before that ends only this process and leaves the node served; this
    // one's handoff socket waits at a staging path until then.
    set_phase(admin::Phase::Starting(
        "taking over from the node-proxy serving this node".into(),
    ));
    let takeover = {
        let path = config.handoff.clone();
        tokio::task::spawn_blocking(move || take_over(&path, loaded))
            .await
            .context("takeover task")??
    };
    if !loaded {
        warn!(
            controller = %config.control.controller,
            "no model from the controller after {} s; starting without one (pods wait for it)",
            FIRST_MODEL_WAIT.as_secs()
        );
    }
    let (predecessor, handed) = match takeover {
        Some((client, handed)) => (Some(client), handed),
        None => (None, handoff::Takeover::default()),
    };
    let bind_at = match predecessor {
        Some(_) => staging_path(&config.handoff),
        None => config.handoff.clone(),
    };
    let unstage = |path: &std::path::Path| {
        if *path != *config.handoff {
            let _ = std::fs::remove_file(path);
        }
    };
    let mut handoff_listener = match start_serving(&pods, handed, &bind_at).await {
        Ok(started) => started,
        Err(e) => {
            // Connections the adopted pods accepted meanwhile are finished, not reset.
            pods.drain_all().await;
            unstage(&bind_at);
            return Err(e);
        }
    };
    if let Some(mut client) = predecessor {
        if shutdown.is_cancelled() {
            info!("stopped while taking over; the running node-proxy serves on");
            drop(client);
            pods.drain_all().await;
            unstage(&bind_at);
            return Ok(());
        }
        let old_pid = client.peer_pid().filter(|p| *p > 0);
        let confirmed = match tokio::task::spawn_blocking(move || client.takeover_done()).await {
            Ok(r) => r.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        match confirmed {
            Ok(()) => info!("the previous node-proxy drains"),
            Err(e) => {
                // This process serves every pod already; two serving the same sockets
                // would let removals and identity changes reach only one of them.
                warn!(
                    pid = old_pid,
                    "could not confirm the takeover ({e}); stopping the previous node-proxy"
                );
                if let Some(pid) = old_pid.and_then(|p| i32::try_from(p).ok()) {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGTERM,
                    );
                }
            }
        }
        handoff_listener
            .publish(&config.handoff)
            .with_context(|| format!("handoff socket {}", config.handoff.display()))?;
    }
    info!("handoff socket listening at {}", config.handoff.display());
    let (taken_over_tx, taken_over) = tokio::sync::oneshot::channel();
    let handoff = tokio::spawn(proxy::serve_handoff(
        handoff_listener,
        pods.clone(),
        taken_over_tx,
        serving.clone(),
    ));
    set_phase(admin::Phase::Serving);
    info!(node = %config.node, admin = %config.admin, "node-proxy started");
    serving.cancelled().await;
    // Said before draining, so a restart in the middle of it does not take the node
    // back either.
    let successor = match taken_over.await {
        Ok(pid) => {
            // Without the host's PID namespace the peer's pid reads as 0.
            let why = match pid.filter(|p| *p > 0) {
                Some(pid) => format!("a newer node-proxy (pid {pid}) serves this node"),
                None => "a newer node-proxy serves this node".to_owned(),
            };
            if let Some(dir) = &config.pod_dir {
                let file = dir.join(RETIRED);
                if let Err(e) = std::fs::create_dir_all(dir)
                    .and_then(|()| std::fs::write(&file, format!("{why}\n")))
                {
                    warn!("cannot write {}: {e}; a restart of this container would take the node back", file.display());
                }
            }
            set_phase(admin::Phase::Retired(format!("retired, draining: {why}")));
            Some(why)
        }
        Err(_) => {
            set_phase(admin::Phase::Stopping);
            None
        }
    };
    info!("draining");
    pods.drain_all().await;
    let result = match handoff.await {
        Ok(Err(e)) => Err(e).context(format!("handoff socket {}", config.handoff.display())),
        _ => Ok(()),
    };
    if let Some(why) = successor {
        info!("drained; {why}: retired until this pod is deleted");
        set_phase(admin::Phase::Retired(format!("retired: {why}")));
        shutdown.cancelled().await;
    }
    result
}

/// Where a node-proxy that takes over binds its handoff socket until the predecessor
/// has been told; then it is renamed over the real path.
fn staging_path(path: &std::path::Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{}", std::process::id()));
    PathBuf::from(name)
}

/// Every handed-over pod served, and the handoff socket bound at `bind_at`. All or
/// nothing: an error leaves the caller to drain the pods adopted so far. An admin
/// listener handed over (by a node-proxy from before each had its own) is closed.
async fn start_serving(
    pods: &Arc<Pods>,
    handed: handoff::Takeover,
    bind_at: &std::path::Path,
) -> anyhow::Result<handoff::HandoffListener> {
    for p in handed.pods {
        // The error names the pod already.
        pods.adopt(p.pod, p.netns, p.listeners).await.map_err(|e| {
            anyhow::anyhow!(
                "cannot serve a pod the running node-proxy handed over: {e}; it keeps serving"
            )
        })?;
    }
    Ok(handoff::HandoffListener::bind(bind_at)?)
}

/// Asks a node-proxy listening at the handoff socket `path`, if one is, for its admin
/// listener and its pods with their listeners; returns the connection to confirm on.
/// Nothing there (a first start, or a stale socket after a crash) is a fresh start. A
/// node-proxy that answers but does not hand over, or a model that has not loaded, is an
/// error: starting anyway would fight the running one for its ports, or serve its pods
/// without a model.
fn take_over(
    path: &std::path::Path,
    model_loaded: bool,
) -> anyhow::Result<Option<(handoff::HandoffClient, handoff::Takeover)>> {
    let mut client = match handoff::HandoffClient::connect(path) {
        Ok(c) => c,
        Err(e) => {
            debug!("no node-proxy to take over from: {e}");
            return Ok(None);
        }
    };
    let pid = client
        .peer_pid()
        .map_or_else(|| "?".to_owned(), |p| p.to_string());
    if !model_loaded {
        anyhow::bail!(
            "a node-proxy (pid {pid}) serves this node, and this one has no model yet; \
             not taking over from it"
        );
    }
    let handed = client.take_over().with_context(|| {
        format!(
            "a node-proxy (pid {pid}) serves this node at {} but did not hand over its \
             listeners (it may predate takeovers: stop it first)",
            path.display()
        )
    })?;
    info!(
        pods = handed.pods.len(),
        pid, "took over the running node-proxy's listeners"
    );
    Ok(Some((client, handed)))
}
