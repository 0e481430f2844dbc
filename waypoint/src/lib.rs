//! Weft's waypoint: the L7 proxy of the services that use it.
//!
//! A Gateway of class `weft-waypoint` names a waypoint; services (or namespaces)
//! labelled `weft.dev/use-waypoint=<name>` send their traffic through it. The source
//! node-proxy tunnels to the waypoint over HBONE with the client's identity; the
//! waypoint applies HTTPRoute/GRPCRoute, TrafficPolicy and the L7 rules of
//! AuthorizationPolicy, and sends each request over HBONE to the endpoint it chose,
//! with its own identity and the client's named on the stream, so the destination
//! authorizes and counts the client.
//!
//! ```text
//!  controller --Subscribe(role waypoint)--> model --> target::Compiled (per version, before the ack)
//!  controller --CA (own identity only)----> leaf
//!  pod netns: HBONE :15008 --> proxy::Streams --> upstream::Upstreams --HBONE--> node-proxy
//!  host:      admin (/ready, /metrics, /config_dump)
//! ```
//!
//! - [`target`]: the model compiled per version into typed targets (only what changed).
//! - [`router`]: route matches and the Gateway API's precedence.
//! - [`proxy`]: the data path (identity, protocol detection, routing, authz, metrics).
//! - [`stages`]: the request path after routing (filters, split, balance, upstream,
//!   retries, timeouts) and the one place refusals become answers.
//! - [`resilience`]: TrafficPolicy state (load balancing, outlier detection, limits,
//!   retry budget, faults, rate limit).
//! - [`upstream`]: connections to endpoints.
//! - [`metrics`]: request metrics and the access log.

#[doc(hidden)]
pub mod fuzzing;
pub mod metrics;
pub mod normalize;
pub mod prefixed;
pub mod proxy;
pub mod resilience;
pub mod router;
pub mod stages;
pub mod target;
pub mod trace;
pub mod upstream;

use std::net::{IpAddr, SocketAddr};
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use api::ObjectName;
use arc_swap::ArcSwap;
use http::StatusCode;
use prometheus_client::registry::Registry;
use runtime::config_client::{self, ControllerFlags};
use runtime::netns::Netns;
use runtime::state::{Identities, ModelStatus};
use tokio_util::sync::CancellationToken;
use tracing::info;
use tunnel::hbone::{Pool, PoolConfig, Server, ServerConfig};
use tunnel::identity::Identity;

/// How the waypoint is run.
#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    /// The Gateway this waypoint is, `namespace/name`.
    #[arg(long, env = "WEFT_GATEWAY")]
    pub gateway: String,
    /// The node the waypoint pod runs on.
    #[arg(long, env = "WEFT_NODE")]
    pub node: String,
    /// The waypoint pod's IP.
    #[arg(long, env = "POD_IP")]
    pub pod_ip: IpAddr,
    /// The pod's network namespace (a path such as /run/netns/<name>); the process's
    /// own when not given (in a cluster the waypoint runs inside its pod).
    #[arg(long, env = "WEFT_NETNS")]
    pub netns: Option<PathBuf>,
    /// Where the controller is and how to authenticate to it.
    #[command(flatten)]
    pub control: ControllerFlags,
    /// The SPIFFE trust domain.
    #[arg(long, env = "WEFT_TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,
    /// Admin endpoint (metrics, readiness, config dump), in the process's namespace.
    #[arg(long, env = "WEFT_ADMIN", default_value = "127.0.0.1:15020")]
    pub admin: SocketAddr,
    /// Seconds open connections may finish after SIGTERM.
    #[arg(long, env = "WEFT_DRAIN_GRACE", default_value_t = 5)]
    pub drain_grace: u64,
    /// Threads serving requests. One (a single-threaded runtime) costs the least CPU
    /// per request (no hand-offs between threads, measured in docs/performance.md);
    /// scale out with replicas, or raise this on a waypoint that needs more than a core.
    #[arg(long, env = "WEFT_WORKER_THREADS", default_value_t = 1)]
    pub worker_threads: usize,
    /// Export a span per request over OTLP/gRPC to this endpoint (e.g.
    /// http://otel-collector:4317); off when not given.
    #[arg(long, env = "WEFT_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// Access-log lines (one per request, JSON on stdout) written per second at most;
    /// lines over the rate are dropped and counted. 0 switches the log off.
    #[arg(long, env = "WEFT_ACCESS_LOG_RATE", default_value_t = 1000)]
    pub access_log_rate: u32,
    /// Client streams (connections to the services it serves) the waypoint serves at
    /// once; past it a new one is refused (503 to the client's node-proxy, which resets
    /// the client's connection) and counted, so memory stays bounded.
    #[arg(long, env = "WEFT_MAX_STREAMS", default_value_t = 16_384,
          value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub max_streams: u64,
}

/// The access log `rate` asks for: off at 0.
fn access_log(rate: u32) -> anyhow::Result<metrics::LogWriter> {
    if rate == 0 {
        return Ok(metrics::LogWriter::off());
    }
    metrics::LogWriter::start(rate).context("cannot start the access log's writer")
}

/// How long the waypoint waits for its first model and certificate.
const START_WAIT: Duration = Duration::from_secs(30);

/// Runs the waypoint until `shutdown`.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let gateway = config
        .gateway
        .split_once('/')
        .map(|(ns, n)| ObjectName::new(ns, n))
        .with_context(|| format!("--gateway {:?} must be namespace/name", config.gateway))?;
    let identity = Identity::new(&config.trust_domain, &gateway.namespace, &gateway.name)
        .with_context(|| format!("the identity of waypoint {gateway}"))?;
    let mut registry = Registry::default();
    registry.register_collector(Box::new(tunnel::process::ProcessCollector));
    let tunnel_metrics = tunnel::metrics::Metrics::new(&mut registry);
    let config_metrics = config_client::ConfigMetrics::new(&mut registry);
    let metrics = metrics::Metrics::new(&mut registry, access_log(config.access_log_rate)?);

    let status = Arc::new(Mutex::new(ModelStatus::default()));
    let model = Arc::new(ArcSwap::from_pointee(api::Model::default()));
    let compiled = Arc::new(ArcSwap::from_pointee(target::Compiled::default()));
    let controller = config
        .control
        .config(&config.node, Some(gateway.to_string()));
    let channel = config_client::channel(&controller);
    let ca = config_client::CaClient::new(controller.clone(), channel.clone());
    let identities = Identities::new(Arc::new(ca), shutdown.clone());
    let (changed_tx, _) = tokio::sync::watch::channel(config_client::Changed::default());
    tokio::spawn(
        config_client::Subscription {
            config: controller,
            channel,
            model: model.clone(),
            status: status.clone(),
            changed: changed_tx,
            identities: identities.clone(),
            metrics: config_metrics,
            check: Some(proxy::compile_on_change(gateway.clone(), compiled.clone())),
        }
        .run(shutdown.clone()),
    );
    let waited = tokio::time::timeout(START_WAIT, async {
        while !status.lock().expect("status lock").loaded {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    tokio::select! {
        _ = shutdown.cancelled() => return Ok(()),
        r = waited => r.with_context(|| format!("no model from the controller at {} after {} s", config.control.controller, START_WAIT.as_secs()))?,
    }
    let lease = tokio::time::timeout(START_WAIT, identities.get(&identity))
        .await
        .with_context(|| {
            format!(
                "no certificate for {identity} after {} s",
                START_WAIT.as_secs()
            )
        })?
        .with_context(|| format!("the controller did not sign {identity}"))?;

    let netns_fd: OwnedFd = match &config.netns {
        Some(path) => std::fs::File::open(path)
            .with_context(|| format!("cannot open network namespace {}", path.display()))?
            .into(),
        None => std::fs::File::open("/proc/self/ns/net")
            .context("cannot open the process's network namespace")?
            .into(),
    };
    let netns = Arc::new(
        Netns::enter(netns_fd, &gateway.to_string()).context("cannot enter the pod's namespace")?,
    );
    let hbone_addr = SocketAddr::new(config.pod_ip, tunnel::hbone::PORT);
    let listener = netns
        .listen(hbone_addr)
        .await
        .with_context(|| format!("cannot listen on {hbone_addr}"))?;
    let pool = Pool::new(PoolConfig::default(), tunnel_metrics.clone());
    let upstreams = upstream::Upstreams::new(
        lease.tls().clone(),
        config.pod_ip,
        netns.clone(),
        pool,
        config.trust_domain.clone(),
    );
    let tracing = trace::Tracing::new(
        config.otlp_endpoint.as_deref(),
        &format!("waypoint {gateway}"),
    )
    .context("cannot set up OTLP export")?;
    let wp = proxy::Waypoint::new(
        gateway.clone(),
        model.clone(),
        compiled,
        upstreams,
        metrics,
        tracing,
        usize::try_from(config.max_streams).unwrap_or(usize::MAX),
    );
    tokio::spawn(runtime::startup::every(
        upstream::SWEEP_EVERY,
        shutdown.clone(),
        {
            let wp = wp.clone();
            move || wp.upstreams.sweep()
        },
    ));
    // Once a minute, the request series of pods that are gone leave.
    tokio::spawn(runtime::startup::every(
        Duration::from_secs(60),
        shutdown.clone(),
        {
            let (wp, model) = (wp.clone(), model.clone());
            move || {
                let model = model.load();
                let live = model.pod_names();
                let pruned = wp.metrics.prune(|ns, name| live.contains(&(ns, name)));
                if pruned > 0 {
                    tracing::debug!(pruned, "dropped the request series of pods that are gone");
                }
            }
        },
    ));
    let server = Arc::new(Server::new(
        lease.tls(),
        ServerConfig {
            require_local_authority: false,
            ..ServerConfig::default()
        },
        tunnel_metrics,
    ));
    let admin = tunnel::net::listen(config.admin)
        .with_context(|| format!("cannot listen on {} (admin)", config.admin))?;
    let admin_state = Arc::new(Admin {
        registry,
        status: status.clone(),
        wp: wp.clone(),
    });
    tokio::spawn(runtime::admin::serve(
        admin,
        admin_state.clone(),
        shutdown.clone(),
    ));
    info!(%gateway, %hbone_addr, admin = %config.admin, "waypoint started");
    server
        .serve(
            listener,
            Arc::new(proxy::Streams(wp)),
            shutdown.clone(),
            Duration::from_secs(config.drain_grace),
        )
        .await;
    drop(lease);
    admin_state.wp.tracing.shutdown().await;
    info!("waypoint stopped");
    Ok(())
}

struct Admin {
    registry: Registry,
    status: Arc<Mutex<ModelStatus>>,
    wp: Arc<proxy::Waypoint>,
}

impl runtime::admin::Routes for Admin {
    fn route<'a>(&'a self, path: &'a str) -> tunnel::hbone::BoxFuture<'a, runtime::admin::Answer> {
        Box::pin(std::future::ready(self.answer(path)))
    }
}

impl Admin {
    fn answer(&self, path: &str) -> runtime::admin::Answer {
        match path {
            "/metrics" => runtime::admin::metrics(&self.registry),
            "/healthz" => (StatusCode::OK, "text/plain", "ok\n".into()),
            "/ready" => {
                let status = self.status.lock().expect("status lock").clone();
                (
                    StatusCode::OK,
                    "text/plain",
                    format!("ready: model version {}\n", status.version),
                )
            }
            "/config_dump" => {
                let status = self.status.lock().expect("status lock").clone();
                let (idle, shared) = self.wp.upstreams.pooled();
                let dump = serde_json::json!({
                    "gateway": self.wp.gateway.to_string(),
                    "model": status,
                    "routedParents": self.wp.compiled.load().routed(),
                    "idleConnections": idle,
                    "http2Connections": shared,
                });
                (
                    StatusCode::OK,
                    "application/json",
                    serde_json::to_string_pretty(&dump).unwrap_or_default(),
                )
            }
            _ => (
                StatusCode::NOT_FOUND,
                "text/plain",
                "not found; try /metrics, /healthz, /ready or /config_dump\n".into(),
            ),
        }
    }
}
