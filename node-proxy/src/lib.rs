//! node-proxy: Weft's per-node L4 proxy.
//!
//! Every enrolled pod on the node is handed over on the handoff socket with its network
//! namespace. node-proxy opens the pod's listeners inside that namespace, where the
//! pod's redirect rules send its traffic:
//!
//! ```text
//!  app --> 15001 outbound --model--> HBONE (pod's identity, from the pod's IP) --> peer:15008
//!  peer --> 15008 HBONE --mTLS + identity bound to source IP--> app (client's source IP kept)
//!  non-mesh client --> 15006 plaintext --(refused in STRICT)--> app
//! ```
//!
//! Modules follow the data path: [`handoff`] (pods in), [`netns`] and [`redirect`]
//! (namespaces and capture rules), [`outbound`], [`inbound`], [`state`] (model and
//! certificates), [`metrics`], [`admin`], and [`proxy`] tying them together.

pub mod admin;
pub mod handoff;
pub mod inbound;
pub mod metrics;
pub mod netns;
pub mod outbound;
pub mod proxy;
pub mod redirect;
pub mod relay;
pub mod state;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use arc_swap::ArcSwap;
use prometheus_client::registry::Registry;
use std::os::fd::AsFd;
use tokio_util::sync::CancellationToken;

use tracing::{debug, info, warn};

use crate::proxy::{Ctx, Limits, Pods};
use crate::state::{Identities, LocalCa, ModelFile, ModelSource, ModelStatus};

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
        default_value = "/run/weft/handoff.sock"
    )]
    pub handoff: PathBuf,
    /// The mesh model file (JSON), re-read when it changes.
    #[arg(long, env = "WEFT_MODEL")]
    pub model: PathBuf,
    /// The CA certificate (PEM) that signs workload leaves.
    #[arg(long, env = "WEFT_CA_CERT")]
    pub ca_cert: PathBuf,
    /// The CA private key (PEM).
    #[arg(long, env = "WEFT_CA_KEY")]
    pub ca_key: PathBuf,
    /// The SPIFFE trust domain.
    #[arg(long, env = "WEFT_TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,
    /// Admin endpoint (metrics, health, config dump).
    #[arg(long, env = "WEFT_ADMIN", default_value = "127.0.0.1:15000")]
    pub admin: SocketAddr,
    /// Seconds open connections may finish after SIGTERM.
    #[arg(long, env = "WEFT_DRAIN_GRACE", default_value_t = 5)]
    pub drain_grace: u64,
    /// Connections one listener serves at once.
    #[arg(long, env = "WEFT_MAX_CONNECTIONS", default_value_t = 65536)]
    pub max_connections: usize,
}

/// Runs node-proxy until `shutdown`, then drains.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let read = |p: &PathBuf| {
        std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))
    };
    let ca_cert = read(&config.ca_cert)?;
    let ca = LocalCa::from_pem(&ca_cert, &read(&config.ca_key)?, &ca_cert)
        .map_err(|e| anyhow::anyhow!("CA from {}: {e}", config.ca_cert.display()))?;

    let mut registry = Registry::default();
    let tunnel_metrics = tunnel::metrics::Metrics::new(&mut registry);
    let metrics = metrics::Metrics::new(&mut registry);

    let status = Arc::new(Mutex::new(ModelStatus::default()));
    let source = ModelFile {
        path: config.model.clone(),
        interval: Duration::from_millis(250),
        status: status.clone(),
    };
    let model = Arc::new(ArcSwap::from_pointee(
        api::Model::new(api::Snapshot::default()).context("empty model")?,
    ));
    tokio::spawn(Box::new(source).run(model.clone(), shutdown.clone()));

    let identities = Identities::new(Arc::new(ca), shutdown.clone());
    let ctx = Ctx::new(
        config.node.clone(),
        config.trust_domain.clone(),
        model,
        status.clone(),
        identities,
        tunnel_metrics,
        metrics,
        Limits {
            max_connections: config.max_connections,
            drain_grace: Duration::from_secs(config.drain_grace),
        },
    );
    let pods = Pods::new(ctx.clone());

    // Serve nothing before the model is known: with an empty one, inbound identities
    // would not match their source and services would not resolve.
    let waited = tokio::time::timeout(Duration::from_secs(5), async {
        while !status.lock().expect("status lock is never poisoned").loaded {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    if waited.is_err() {
        warn!(
            "no model loaded from {} after 5 s; starting without one",
            config.model.display()
        );
    }
    // A node-proxy already serving this node hands over its listeners and drains.
    let handed = {
        let path = config.handoff.clone();
        tokio::task::spawn_blocking(move || take_over(&path))
            .await
            .context("takeover task")?
    };
    let adopted = handed.admin.and_then(|fd| {
        admin::adopt(fd, config.admin)
            .map_err(|e| warn!("{e}; opening {} instead", config.admin))
            .ok()
    });
    let admin_listener = match adopted {
        Some(l) => l,
        None => tokio::net::TcpListener::bind(config.admin)
            .await
            .with_context(|| format!("cannot listen on admin address {}", config.admin))?,
    };
    let admin_fd = admin_listener
        .as_fd()
        .try_clone_to_owned()
        .context("cannot duplicate the admin listener")?;
    let admin = Arc::new(admin::Admin {
        ctx: ctx.clone(),
        pods: pods.clone(),
        registry,
    });
    tokio::spawn(admin.serve(admin_listener, shutdown.clone()));
    if let Some(dir) = config.handoff.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    for p in handed.pods {
        let name = p.pod.to_string();
        if let Err(e) = pods.adopt(p.pod, p.netns, p.listeners).await {
            warn!("pod {name} handed over by the previous node-proxy: {e}");
        }
    }
    let handoff = tokio::spawn(proxy::serve_handoff(
        config.handoff.clone(),
        pods.clone(),
        Some(admin_fd),
        shutdown.clone(),
    ));
    info!(node = %config.node, admin = %config.admin, "node-proxy started");
    shutdown.cancelled().await;
    info!("draining");
    pods.drain_all().await;
    match handoff.await {
        Ok(Err(e)) => Err(e).context(format!("handoff socket {}", config.handoff.display())),
        _ => Ok(()),
    }
}

/// Takes over from a node-proxy listening at the handoff socket `path`, if one is:
/// its admin listener and its pods with their listeners, so no connection waits on a
/// closed port while one process replaces the other. Nothing there (a first start, or
/// a stale socket after a crash) is a fresh start; a refusal is logged and ignored.
fn take_over(path: &std::path::Path) -> handoff::Takeover {
    let mut client = match handoff::HandoffClient::connect(path) {
        Ok(c) => c,
        Err(e) => {
            debug!("no node-proxy to take over from: {e}");
            return handoff::Takeover::default();
        }
    };
    match client.take_over() {
        Ok(handed) => {
            info!(
                pods = handed.pods.len(),
                pid = client.peer_pid(),
                "took over from the running node-proxy"
            );
            handed
        }
        Err(e) => {
            warn!("the running node-proxy did not hand over (it may predate takeovers): {e}");
            handoff::Takeover::default()
        }
    }
}

/// Cancels `token` on SIGTERM or SIGINT.
pub fn cancel_on_signals(token: CancellationToken) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        token.cancel();
    });
    Ok(())
}
