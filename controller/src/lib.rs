//! The Weft controller: the only component that reads Kubernetes. It translates the
//! cluster into the mesh model, streams the model to every proxy as versioned deltas,
//! and is the mesh CA.
//!
//! ```text
//!  source (API server | --manifests DIR) --changed--> debounce --> translate (pure)
//!      --> store (keyed, versioned, history) --> one stream per proxy (filtered per node)
//!  node-proxy --Sign(CSR) + token--> CA: only identities of pods on the caller's node
//!  problems --> status conditions (cluster) | logs and `weftctl check` (manifests)
//! ```
//!
//! Modules: [`crd`] (Weft's CRDs), [`objects`] (the typed object set), [`source`],
//! [`manifests`] and [`kubernetes`] (the two sources), [`translate`], [`store`],
//! [`server`] (gRPC distribution) over [`tls`], [`ca`] and [`auth`] (certificates and
//! who asks for them), [`metrics`], [`admin`].

pub mod admin;
pub mod auth;
pub mod ca;
pub mod crd;
pub mod fuzzing;
pub mod install;
pub mod kubernetes;
pub mod leader;
pub mod manifests;
pub mod metrics;
pub mod objects;
pub mod server;
pub mod source;
pub mod store;
#[cfg(feature = "testing")]
pub mod testing;
pub mod tls;
pub mod translate;
pub mod waypoints;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::objects::Problem;
use crate::server::Shared;
use crate::source::Source;
use crate::translate::incremental::{Entries, Translator};
use crate::translate::{DesiredStatus, Settings};

/// A duration flag, written like Gateway API durations (`24h`, `90s`, `500ms`).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    use std::str::FromStr;
    gateway_api::Duration::from_str(text).map(|d| Duration::from_millis(d.as_millis() as u64))
}

/// The controller's configuration, from flags or environment variables.
#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    /// Read these manifest directories instead of the API server (repeatable; objects
    /// in a later directory override the same objects in an earlier one).
    #[arg(long = "manifests", env = "WEFT_MANIFESTS", value_delimiter = ',')]
    pub manifests: Vec<PathBuf>,
    /// Where proxies connect (gRPC over TLS: the model and certificates). `0.0.0.0` or
    /// `[::]` is every address of both families (IPv4 alone where there is no IPv6).
    #[arg(long, env = "WEFT_LISTEN", default_value = "0.0.0.0:15012")]
    pub listen: SocketAddr,
    /// Admin endpoint (metrics, health, debug views); an unspecified address is both
    /// families, as for `--listen`.
    #[arg(long, env = "WEFT_ADMIN", default_value = "0.0.0.0:15014")]
    pub admin: SocketAddr,
    /// The SPIFFE trust domain.
    #[arg(long, env = "WEFT_TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,
    /// Directory of the mesh root (`root.pem`, `root-key.pem`), created on first start.
    /// Manifest mode; in the cluster the root lives in a Secret.
    #[arg(long, env = "WEFT_CA_DIR")]
    pub ca_dir: Option<PathBuf>,
    /// An operator-provided CA certificate (PEM: the CA first, then any above it).
    #[arg(long, env = "WEFT_CA_CERT", requires = "ca_key")]
    pub ca_cert: Option<PathBuf>,
    /// The private key of `--ca-cert`.
    #[arg(long, env = "WEFT_CA_KEY", requires = "ca_cert")]
    pub ca_key: Option<PathBuf>,
    /// The roots to distribute, when `--ca-cert` is an intermediate without its root.
    #[arg(long, env = "WEFT_CA_BUNDLE")]
    pub ca_bundle: Option<PathBuf>,
    /// Directory of per-node tokens (`<node>.token`) node-proxies authenticate with
    /// (manifest mode).
    #[arg(long, env = "WEFT_NODE_TOKENS")]
    pub node_tokens: Option<PathBuf>,
    /// Names (DNS or IP) in the controller's serving certificate.
    #[arg(
        long = "server-name",
        env = "WEFT_SERVER_NAMES",
        value_delimiter = ',',
        default_value = "weft-controller.weft-system.svc"
    )]
    pub server_names: Vec<String>,
    /// Lifetime of workload certificates; node-proxies renew them at half-life.
    #[arg(long, env = "WEFT_LEAF_TTL", default_value = "24h", value_parser = parse_duration)]
    pub leaf_ttl: Duration,
    /// How long to wait after a change for more before translating.
    #[arg(long, env = "WEFT_DEBOUNCE", default_value = "5ms", value_parser = parse_duration)]
    pub debounce: Duration,
    /// The controller's namespace in the cluster (it keeps the root Secret there).
    #[arg(long, env = "WEFT_NAMESPACE", default_value = "weft-system")]
    pub namespace: String,
    /// The audience node-proxies' tokens must have.
    #[arg(long, env = "WEFT_TOKEN_AUDIENCE", default_value = "weft-controller")]
    pub token_audience: String,
    /// The service account node-proxies run as (in `--namespace`).
    #[arg(
        long,
        env = "WEFT_NODE_PROXY_SERVICE_ACCOUNT",
        default_value = "weft-node-proxy"
    )]
    pub node_proxy_service_account: String,
    /// In a cluster: the image waypoints run (its `waypoint` binary); the controller
    /// creates a Deployment and Service for each Gateway of class weft-waypoint. Not
    /// given: it creates none.
    #[arg(long, env = "WEFT_WAYPOINT_IMAGE")]
    pub waypoint_image: Option<String>,
    /// Manifest mode: write each object's status under this directory
    /// (`<kind>/<namespace>/<name>.yaml`, as `status` would read in a cluster), the
    /// replicas sharing it electing the one that writes with a Lease kept there
    /// (`lease.json`). Not given: statuses are only logged and on `/debug/problems`.
    #[arg(long, env = "WEFT_STATUS_DIR")]
    pub status_dir: Option<PathBuf>,
    /// How long the Lease electing the writing replica lasts without a renewal; a
    /// replica that dies is replaced as writer after it.
    #[arg(long, env = "WEFT_LEASE_DURATION", default_value = "15s", value_parser = parse_duration)]
    pub lease_duration: Duration,
}

/// What the controller writes back to the API server.
struct ClusterWriters {
    statuses: kubernetes::StatusWriter,
    waypoints: Option<waypoints::Deployer>,
    debug_auth: Option<Arc<dyn admin::DebugAuth>>,
    leading: leader::Leading,
    /// This replica's name in the Lease.
    identity: String,
    /// The election's task (taken by the controller, which waits for it on shutdown).
    election: Option<tokio::task::JoinHandle<()>>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            manifests: Vec::new(),
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            admin: SocketAddr::from(([127, 0, 0, 1], 0)),
            trust_domain: "cluster.local".into(),
            ca_dir: None,
            ca_cert: None,
            ca_key: None,
            ca_bundle: None,
            node_tokens: None,
            server_names: vec!["weft-controller.weft-system.svc".into()],
            leaf_ttl: Duration::from_secs(24 * 60 * 60),
            debounce: Duration::from_millis(5),
            namespace: "weft-system".into(),
            token_audience: "weft-controller".into(),
            node_proxy_service_account: "weft-node-proxy".into(),
            waypoint_image: None,
            status_dir: None,
            lease_duration: Duration::from_secs(15),
        }
    }
}

/// A controller that is listening, before it runs.
pub struct Controller {
    /// Where proxies connect.
    pub grpc_addr: SocketAddr,
    /// The admin endpoint.
    pub admin_addr: SocketAddr,
    /// Shared state (for tests).
    pub shared: Arc<Shared>,
    grpc: TcpListener,
    admin: TcpListener,
    registry: Registry,
    source: Arc<dyn Source>,
    changed: Arc<Notify>,
    settings: Settings,
    debounce: Duration,
    cluster: Option<ClusterWriters>,
    server_names: Vec<String>,
    debug_auth: Option<Arc<dyn admin::DebugAuth>>,
    /// Whether this replica writes, and its name in the Lease.
    leading: Option<(leader::Leading, String)>,
    /// The election's task: on shutdown it gives the Lease up, waited for briefly.
    election: Option<tokio::task::JoinHandle<()>>,
}

fn random_epoch() -> u64 {
    let mut bytes = [0u8; 8];
    let _ = aws_lc_rs::rand::fill(&mut bytes);
    u64::from_le_bytes(bytes) | 1
}

impl Controller {
    /// Sets the controller up: CA, source, listeners. Errors here (a bad flag, an
    /// unreadable directory, an address in use) stop it before it serves anything.
    pub async fn start(config: Config, shutdown: CancellationToken) -> anyhow::Result<Self> {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(tunnel::process::ProcessCollector));
        let metrics = metrics::Metrics::new(&mut registry);
        let changed = Arc::new(Notify::new());
        let (ca, auth, source, mut statuses): (
            ca::Ca,
            Arc<dyn auth::Authenticator>,
            Arc<dyn Source>,
            _,
        ) = if !config.manifests.is_empty() {
            let ca = match (&config.ca_cert, &config.ca_key, &config.ca_dir) {
                (Some(cert), Some(key), _) => ca::Ca::from_files(cert, key, config.ca_bundle.as_deref(), &config.trust_domain, config.leaf_ttl)?,
                (_, _, Some(dir)) => ca::Ca::from_dir(dir, &config.trust_domain, config.leaf_ttl)?,
                _ => anyhow::bail!("manifest mode needs --ca-dir (where the mesh root is kept) or --ca-cert and --ca-key"),
            };
            let tokens = config
                .node_tokens
                .as_ref()
                .context("manifest mode needs --node-tokens: the directory of each node's token")?;
            let auth = auth::NodeTokens::new(tokens)
                .with_context(|| format!("cannot read node tokens in {}", tokens.display()))?;
            let source = manifests::ManifestSource::new(config.manifests.clone())?;
            tokio::spawn(source.clone().watch(changed.clone(), shutdown.clone()));
            let writers = match &config.status_dir {
                None => None,
                Some(dir) => {
                    std::fs::create_dir_all(dir).with_context(|| {
                        format!("cannot create the status directory {}", dir.display())
                    })?;
                    let identity = leader::identity();
                    let (leading, election) = leader::spawn_on(
                        Arc::new(leader::FileLeases::new(dir.join("lease.json"))),
                        identity.clone(),
                        leader::Timing::for_duration(config.lease_duration),
                        shutdown.clone(),
                    );
                    let sink = kubernetes::FileSink::new(dir.clone(), identity.clone());
                    Some(ClusterWriters {
                        statuses: kubernetes::StatusWriter::to(
                            Arc::new(sink),
                            metrics.clone(),
                            leading.clone(),
                        ),
                        waypoints: None,
                        debug_auth: None,
                        leading,
                        identity,
                        election: Some(election),
                    })
                }
            };
            (ca, Arc::new(auth), source, writers)
        } else {
            let client = kube::Client::try_default().await.context(
                "no --manifests given and no Kubernetes API reachable (in-cluster or kubeconfig)",
            )?;
            let ca = match (&config.ca_cert, &config.ca_key) {
                (Some(cert), Some(key)) => ca::Ca::from_files(
                    cert,
                    key,
                    config.ca_bundle.as_deref(),
                    &config.trust_domain,
                    config.leaf_ttl,
                )?,
                _ => {
                    kubernetes::root_ca(
                        client.clone(),
                        &config.namespace,
                        &config.trust_domain,
                        config.leaf_ttl,
                    )
                    .await?
                }
            };
            kubernetes::publish_roots(client.clone(), &config.namespace, &ca.bundle_pem()).await?;
            let auth = kubernetes::TokenReviewer::new(
                client.clone(),
                config.token_audience.clone(),
                format!(
                    "system:serviceaccount:{}:{}",
                    config.namespace, config.node_proxy_service_account
                ),
            );
            let source =
                kubernetes::KubeSource::start(client.clone(), changed.clone(), shutdown.clone());
            let identity = leader::identity();
            let (leading, election) = leader::spawn(
                client.clone(),
                &config.namespace,
                identity.clone(),
                leader::Timing::for_duration(config.lease_duration),
                shutdown.clone(),
            );
            let waypoints = match &config.waypoint_image {
                Some(image) => {
                    let host = config.server_names.first().cloned().unwrap_or_default();
                    Some(waypoints::Deployer::with_leader(
                        client.clone(),
                        waypoints::Settings {
                            image: image.clone(),
                            controller: format!("{host}:{}", config.listen.port()),
                            controller_name: host,
                            trust_domain: config.trust_domain.clone(),
                            roots_pem: ca.bundle_pem(),
                        },
                        leading.clone(),
                    ))
                }
                None => {
                    info!("no --waypoint-image: Gateways of class weft-waypoint are not deployed by the controller");
                    None
                }
            };
            let client_for_debug = client.clone();
            let statuses =
                kubernetes::StatusWriter::with_leader(client, metrics.clone(), leading.clone());
            (
                ca,
                Arc::new(auth),
                source,
                Some(ClusterWriters {
                    statuses,
                    waypoints,
                    debug_auth: Some(Arc::new(kubernetes::DebugReviewer::new(client_for_debug))),
                    leading,
                    identity,
                    election: Some(election),
                }),
            )
        };
        let settings = Settings {
            trust_domain: config.trust_domain.clone(),
            trust_bundle: ca.bundle().iter().map(|c| c.to_vec()).collect(),
        };
        let shared = Shared::new(random_epoch(), Arc::new(ca), auth, metrics, shutdown);
        let grpc = tunnel::net::listen(config.listen)
            .with_context(|| format!("cannot listen on {}", config.listen))?;
        let admin = tunnel::net::listen(config.admin)
            .with_context(|| format!("cannot listen on admin address {}", config.admin))?;
        Ok(Controller {
            grpc_addr: grpc.local_addr()?,
            admin_addr: admin.local_addr()?,
            shared,
            grpc,
            admin,
            registry,
            source,
            changed,
            settings,
            debounce: config.debounce,
            election: statuses.as_mut().and_then(|c| c.election.take()),
            debug_auth: statuses.as_ref().and_then(|c| c.debug_auth.clone()),
            leading: statuses
                .as_ref()
                .map(|c| (c.leading.clone(), c.identity.clone())),
            cluster: statuses,
            server_names: config.server_names,
        })
    }

    /// The roots (PEM) proxies must trust the controller with.
    pub fn root_pem(&self) -> String {
        self.shared.ca.bundle_pem()
    }

    /// Serves until shutdown.
    pub async fn run(self) -> anyhow::Result<()> {
        let problems = Arc::new(Mutex::new(Vec::new()));
        let shutdown = self.shared.shutdown.clone();
        tokio::spawn(translate_loop(
            self.shared.clone(),
            self.source,
            self.changed,
            self.settings,
            self.debounce,
            problems.clone(),
            self.cluster,
        ));
        let admin = Arc::new(admin::Admin {
            shared: self.shared.clone(),
            registry: self.registry,
            problems,
            debug_auth: self.debug_auth,
            leading: self.leading,
        });
        tokio::spawn(admin.serve(self.admin, shutdown.clone()));
        tokio::spawn(watch_ca(self.shared.clone()));
        info!(grpc = %self.grpc_addr, admin = %self.admin_addr, "controller started");
        let served = server::serve(self.shared, self.grpc, self.server_names).await;
        // Give the Lease up before exiting, so another replica writes at once.
        if let Some(election) = self.election {
            let _ = tokio::time::timeout(Duration::from_secs(2), election).await;
        }
        served
    }
}

/// How often an operator-provided CA's files are read again.
const CA_RELOAD: Duration = Duration::from_secs(60);

/// Keeps the CA's expiry in its metric, reads an operator-provided CA's files again
/// each [`CA_RELOAD`] (a Secret's mounted files change in place when it is renewed),
/// and warns once a day while it expires within a week.
async fn watch_ca(shared: Arc<server::Shared>) {
    let ca = shared.ca.clone();
    let metrics = shared.metrics.clone();
    let mut last_warned: Option<std::time::Instant> = None;
    let mut tick = tokio::time::interval(CA_RELOAD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        if let Err(e) = ca.reload() {
            warn!("the CA in use stays: {e}");
        }
        let expires = ca.expires();
        let unix = expires
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        metrics
            .ca_expires
            .set(i64::try_from(unix).unwrap_or(i64::MAX));
        let left = expires
            .duration_since(std::time::SystemTime::now())
            .unwrap_or_default();
        let day = Duration::from_secs(24 * 3600);
        if left < 7 * day && last_warned.is_none_or(|t| t.elapsed() >= day) {
            last_warned = Some(std::time::Instant::now());
            warn!(
                hours_left = left.as_secs() / 3600,
                "the mesh CA expires soon: workload certificates end with it, and none is signed after; renew the CA (--ca-cert) or its root"
            );
        }
    }
}

/// Runs a controller until `shutdown`.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    Controller::start(config, shutdown).await?.run().await
}

/// Reads, translates and publishes on every change, at most once per `debounce`.
async fn translate_loop(
    shared: Arc<Shared>,
    source: Arc<dyn Source>,
    changed: Arc<Notify>,
    settings: Settings,
    debounce: Duration,
    problems_out: Arc<Mutex<Vec<Problem>>>,
    cluster: Option<ClusterWriters>,
) {
    let mut reported: BTreeSet<String> = BTreeSet::new();
    let mut translator = Some(Translator::new(settings.clone()));
    loop {
        let started = Instant::now();
        let snapshot = source.snapshot();
        let read = started.elapsed();
        // A round that cannot finish (translation panicked) waits for the next change
        // like any other: trying again at once would spin on the same objects.
        'round: {
            if !snapshot.ready {
                break 'round;
            }
            let objects = snapshot.objects.clone();
            let mut t = translator
                .take()
                .unwrap_or_else(|| Translator::new(settings.clone()));
            let Ok((t, output)) = tokio::task::spawn_blocking(move || {
                let output = t.translate(&objects);
                (t, output)
            })
            .await
            else {
                // The translator is lost with its state: the next translation is full.
                error!("translation panicked (a bug: please report it with this log); keeping the published model until the next change");
                break 'round;
            };
            translator = Some(t);
            let translated = started.elapsed();
            let incremental = output.incremental();
            let mut problems = snapshot.problems;
            problems.extend(output.problems);
            let published = {
                let mut store = shared.store.write().expect("store lock is never poisoned");
                let p = match output.entries {
                    Entries::Full(entries) => store.publish(entries),
                    Entries::Changed { upserts, removals } => store.apply(upserts, removals),
                };
                shared.metrics.resources.set(store.len() as i64);
                p
            };
            shared.identities.store(output.identities);
            if let Some(p) = published {
                shared.version.send_replace(p.version);
                shared.metrics.model_version.set(p.version as i64);
                info!(
                    version = p.version,
                    changed = p.changed,
                    objects = snapshot.objects.len(),
                    incremental,
                    read_ms = read.as_millis() as u64,
                    translated_ms = translated.as_millis() as u64,
                    took_ms = started.elapsed().as_millis() as u64,
                    "model published"
                );
            }
            if incremental {
                shared.metrics.incremental_translations.inc();
            }
            shared.metrics.translations.inc();
            shared
                .metrics
                .translation_seconds
                .observe(started.elapsed().as_secs_f64());
            shared.metrics.problems.set(problems.len() as i64);
            report(&mut reported, &problems);
            if let Some(cluster) = &cluster {
                let mut statuses = output.statuses;
                statuses.extend(snapshot.statuses.iter().cloned());
                statuses.extend(translate::gateway_statuses(&snapshot.objects));
                let left = translate::routes_left(&snapshot.objects, &statuses);
                statuses.extend(left);
                refuse_routes(&mut statuses, &shared.subscribers());
                cluster.statuses.write(statuses);
                if let Some(deployer) = &cluster.waypoints {
                    // A Gateway whose parameters do not resolve is left as it is (its
                    // status says why).
                    deployer.write_with(
                        snapshot
                            .objects
                            .gateways
                            .values()
                            .filter_map(|g| {
                                let parameters =
                                    waypoints::parameters(&g.value, &snapshot.objects).ok()?;
                                Some((g.value.clone(), parameters.cloned()))
                            })
                            .collect(),
                    );
                }
            }
            *problems_out
                .lock()
                .expect("problems lock is never poisoned") = problems;
        }
        tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            _ = changed.notified() => {}
            _ = shared.refusals_changed.notified() => {}
        }
        // More changes usually follow the first (a file written twice, a rollout):
        // they are taken together.
        tokio::time::sleep(debounce).await;
    }
}

/// The routes a proxy refused (a waypoint that cannot compile them, as when it is of
/// an older release than the controller): each parent of theirs gets `Accepted: False`,
/// `UnsupportedValue`, naming the proxy and why, until an ack no longer refuses them.
fn refuse_routes(
    statuses: &mut [translate::DesiredStatus],
    subscribers: &[server::SubscriberStatus],
) {
    for s in subscribers {
        for refused in &s.refused_routes {
            let kind = match refused.kind {
                "grpc_route" => objects::ObjectKind::GrpcRoute,
                _ => objects::ObjectKind::HttpRoute,
            };
            let Some((ns, name)) = refused.name.split_once('/') else {
                continue;
            };
            for status in statuses.iter_mut().filter(|d| {
                d.object.kind == kind
                    && d.object.namespace.as_deref() == Some(ns)
                    && d.object.name == name
            }) {
                for (_, conditions) in &mut status.parents {
                    for c in conditions.iter_mut().filter(|c| c.type_ == "Accepted") {
                        c.status = false;
                        c.reason = "UnsupportedValue";
                        c.message = format!("{} cannot serve it: {}", s.node, refused.reason);
                    }
                }
            }
        }
    }
}

/// Logs problems that are new since the last translation, and those that are gone.
fn report(reported: &mut BTreeSet<String>, problems: &[Problem]) {
    let now: BTreeSet<String> = problems.iter().map(ToString::to_string).collect();
    for p in now.difference(reported) {
        warn!("{p}");
    }
    for p in reported.difference(&now) {
        info!("resolved: {p}");
    }
    *reported = now;
}

/// Statuses the translation wants written (unused in manifest mode).
pub type Statuses = Vec<DesiredStatus>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::objects::{ObjectKind, ObjectRef};
    use crate::server::{RefusedRoute, SubscriberStatus};
    use crate::translate::{Condition, DesiredStatus};

    /// A route whose status carries Weft's parent entry but which the translation has
    /// no status for (it left the mesh) gets a status without parents, to clear them;
    /// one the translation covers, or with only other controllers' entries, does not.
    #[test]
    fn a_route_that_left_the_mesh_gets_its_weft_parents_cleared() {
        let route = |name: &str, controller: &str| {
            let r: gateway_api::experimental::httproutes::HttpRoute =
                serde_json::from_value(serde_json::json!({
                    "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
                    "metadata": {"name": name, "namespace": "shop", "generation": 2},
                    "spec": {"parentRefs": [{"name": "edge"}]},
                    "status": {"parents": [{"controllerName": controller,
                        "parentRef": {"group": "", "kind": "Service", "name": "echo"}, "conditions": []}]}}))
                .expect("a route");
            objects::AnyObject::HttpRoute(Arc::new(r))
        };
        let mut objects = objects::Objects::default();
        for (name, controller) in [
            ("left", translate::CONTROLLER_NAME),
            ("still-in", translate::CONTROLLER_NAME),
            ("theirs", "example.com/other"),
        ] {
            objects
                .insert(route(name, controller), objects::Origin::Cluster, true)
                .expect("inserted");
        }
        let left = translate::routes_left(&objects, &[status("still-in")]);
        assert_eq!(left.len(), 1, "{left:?}");
        assert_eq!(left[0].object.name, "left");
        assert!(left[0].parents.is_empty());
        assert_eq!(left[0].generation, Some(2));
    }

    fn status(name: &str) -> DesiredStatus {
        DesiredStatus {
            object: ObjectRef::new(ObjectKind::HttpRoute, &api::ObjectName::new("shop", name)),
            generation: Some(1),
            parents: vec![(
                Some(serde_json::json!({"kind": "Service", "name": "echo"})),
                vec![Condition {
                    type_: "Accepted",
                    status: true,
                    reason: "Accepted",
                    message: "applies".into(),
                }],
            )],
        }
    }

    /// A route a waypoint refused in its ack is shown not accepted, naming the
    /// waypoint and why; the others are left alone.
    #[test]
    fn a_route_a_waypoint_refuses_is_not_accepted_at_its_parents() {
        let mut statuses = vec![status("broken"), status("fine")];
        let waypoint = SubscriberStatus {
            node: "waypoint shop/wp".into(),
            peer: None,
            since: 0,
            start: "full",
            sent_version: 2,
            acked_version: 2,
            proxy_version: "0.0.9".into(),
            rejected: 1,
            last_rejection: None,
            refused_routes: vec![RefusedRoute {
                kind: "http_route",
                name: "shop/broken".into(),
                reason: "rules[0]: filters[0]: \"x y\" is not a header name".into(),
            }],
        };
        refuse_routes(&mut statuses, &[waypoint]);
        let accepted = &statuses[0].parents[0].1[0];
        assert!(!accepted.status);
        assert_eq!(accepted.reason, "UnsupportedValue");
        assert_eq!(
            accepted.message,
            "waypoint shop/wp cannot serve it: rules[0]: filters[0]: \"x y\" is not a header name"
        );
        assert!(
            statuses[1].parents[0].1[0].status,
            "another route is untouched"
        );
    }
}
