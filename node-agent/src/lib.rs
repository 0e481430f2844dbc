//! The node agent: one long-lived process per node that owns the node's enrolled pods,
//! in a cluster and in the sandbox alike.
//!
//! ```text
//!  source (API server | the sandbox's objects) --view--> reconciler (agent)
//!  weft-cni --ADD/DEL/CHECK + netns fd--> cni socket --> reconciler
//!  /proc (pods' processes, kubelet cgroups) --netns of running pods--> reconciler
//!  reconciler --netlink--> capture rules in each pod, probe exemption on the node
//!  reconciler --link: snapshot on every connection, then changes--> node-proxy
//!  chain keeper --> weft-cni stays in the node's CNI configuration
//!  state file --> the enrolled namespaces, for weft-cni while the agent is down
//! ```
//!
//! It outlives node-proxy restarts and upgrades: it holds each captured pod's listeners,
//! so while node-proxy restarts a new connection waits in a listener's queue instead of
//! being refused, and it replays every pod to each node-proxy that connects. Restarted
//! itself, it finds the pods again under `/proc` and their listeners in node-proxy's
//! inventory, and changes nothing that is already right.

pub mod agent;
pub mod capture;
pub mod chain;
pub mod cni;
pub mod config;
pub mod dir_watch;
pub mod discover;
pub mod fuzzing;
pub mod link;
pub mod metrics;
pub mod plan;
pub mod source;

use std::path::Path;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use http::StatusCode;
use prometheus_client::registry::Registry;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub use config::Config;

use crate::agent::{Agent, Settings, Status};
use crate::source::{Source, View};

/// Runs the agent until `shutdown`.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let mut registry = Registry::default();
    let metrics = Arc::new(metrics::Metrics::new(&mut registry));
    registry.register_collector(Box::new(tunnel::process::ProcessCollector));
    let node_netns = discover::own_netns(&config.proc)
        .context("cannot read this process's network namespace")?;
    let (seen_tx, seen) = watch::channel(Seen::Unknown);
    let source: Box<dyn Source> = match &config.objects {
        Some(dir) => Box::new(source::files::Files::new(dir.clone())),
        None => {
            let client = kube::Client::try_default()
                .await
                .context("cannot reach the API server (in a pod: its service account; elsewhere: KUBECONFIG)")?;
            if let Some((namespace, name)) = config.until_removed() {
                tokio::spawn(follow_daemonset(
                    client.clone(),
                    namespace.to_owned(),
                    name.to_owned(),
                    seen_tx,
                    shutdown.clone(),
                ));
            }
            Box::new(source::kube::Kube::new(client))
        }
    };
    let settings = Settings {
        proc: config.proc.clone(),
        node_netns,
        probe_source: capture::ProbeSource {
            v4: config.probe_source,
            v6: config.probe_source_v6,
        },
        source: source.describe(),
        handoff: config.handoff.clone(),
    };
    info!(node = %config.node, source = %settings.source, "node agent starting");
    let (views_tx, views) = watch::channel(Arc::new(View::default()));
    tokio::spawn(source.run(config.node.clone(), views_tx, shutdown.clone()));

    let (events_tx, link_events) = mpsc::unbounded_channel();
    let link = link::Link::start(config.handoff.clone(), events_tx, shutdown.clone())
        .context("cannot start the node-proxy link")?;

    // The plugin's socket exists before the plugin is chained. What the last run
    // published is read before this run overwrites it.
    let (cni_tx, cni_rx) = mpsc::channel(64);
    let socket = config.socket.clone();
    let cni_shutdown = shutdown.clone();
    let triage = cni::Triage {
        views: views.clone(),
        published: ipc::agent::PublishedState::read(&config.state)
            .filter(|p| p.node == config.node),
        metrics: metrics.clone(),
    };
    let cni_socket =
        tokio::spawn(async move { cni::serve(&socket, cni_tx, triage, cni_shutdown).await });

    let status = Arc::new(Mutex::new(Status::default()));
    let (chained_tx, chained) = watch::channel(false);
    let admin = tokio::net::TcpListener::bind(config.admin)
        .await
        .with_context(|| format!("cannot listen on {} (admin)", config.admin))?;
    tokio::spawn(runtime::admin::serve(
        admin,
        Arc::new(Admin {
            registry,
            status: status.clone(),
            chained,
        }),
        shutdown.clone(),
    ));
    tokio::spawn(publish_and_chain(
        config.clone(),
        views.clone(),
        chained_tx,
        shutdown.clone(),
    ));

    let agent = Agent::new(settings, link, status, metrics);
    let inputs = agent::Inputs {
        views,
        cni: cni_rx,
        link_events,
    };
    let mut agent = agent.run(inputs, shutdown.clone()).await;
    if cni_socket.is_finished() {
        if let Ok(Err(e)) = cni_socket.await {
            return Err(e).context("the plugin's socket failed");
        }
    }
    if leaving(&config, *seen.borrow()).await {
        info!("Weft is being removed from this node: releasing every pod and the plugin");
        agent.uninstall().await;
        match chain::uninstall(&config.cni_bin_dir, &config.cni_conf_dir) {
            Ok(report) => report.iter().for_each(|l| info!("{l}")),
            Err(e) => warn!("cannot remove weft-cni from the node: {e}"),
        }
        let _ = std::fs::remove_file(&config.state);
    }
    let _ = std::fs::remove_file(&config.socket);
    info!("node agent stopped; the pods stay captured");
    Ok(())
}

/// Publishes the enrolled namespaces for weft-cni whenever they change, once the source
/// has listed everything, and from then on keeps the plugin chained: the plugin never
/// runs on a node where it could not tell an enrolled pod while the agent is down.
async fn publish_and_chain(
    config: Config,
    mut views: watch::Receiver<Arc<View>>,
    chained: watch::Sender<bool>,
    shutdown: CancellationToken,
) {
    let mut written: Option<Vec<String>> = None;
    let mut keeper = None;
    loop {
        let view = views.borrow_and_update().clone();
        if view.synced {
            let enrolled = view.enrolled_namespaces();
            if written.as_ref() != Some(&enrolled) {
                match write_state(&config.state, &config.node, &enrolled) {
                    Ok(()) => written = Some(enrolled),
                    Err(e) => {
                        warn!(file = %config.state.display(), "cannot publish the enrolled namespaces: {e}")
                    }
                }
            }
            if written.is_some() && keeper.is_none() {
                let binary = config.cni_plugin.clone().unwrap_or_else(|| {
                    std::env::current_exe()
                        .map(|e| e.with_file_name(chain::PLUGIN))
                        .unwrap_or_else(|_| chain::PLUGIN.into())
                });
                let chain = chain::Chain {
                    binary,
                    bin_dir: config.cni_bin_dir.clone(),
                    conf_dir: config.cni_conf_dir.clone(),
                    entry: chain::Entry {
                        agent_socket: config.socket.clone(),
                        agent_state: config.state.clone(),
                        exclude_namespaces: config.excluded(),
                        fail_open: config.cni_fail_open,
                    },
                };
                keeper = Some(tokio::spawn(chain::keep(
                    chain,
                    chained.clone(),
                    shutdown.clone(),
                )));
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            r = views.changed() => if r.is_err() { return },
        }
    }
}

fn write_state(path: &Path, node: &str, enrolled: &[String]) -> Result<(), String> {
    let state = ipc::agent::PublishedState {
        version: ipc::agent::VERSION,
        node: node.to_owned(),
        enrolled_namespaces: enrolled.to_vec(),
    };
    let text = serde_json::to_vec_pretty(&state).map_err(|e| e.to_string())?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    chain::write_atomic(path, &text, 0o644).map_err(|e| e.to_string())
}

/// Whether Weft is leaving the node: the agent's DaemonSet (`--until-removed`) is gone
/// or being deleted, as its watch saw it or, if it did not, as a last read says. Without
/// the flag, or when neither can say, the agent is only restarting (an upgrade):
/// everything stays in place.
async fn leaving(config: &Config, seen: Seen) -> bool {
    let Some((namespace, name)) = config.until_removed() else {
        return false;
    };
    let read = if seen.removed() {
        None
    } else {
        let read = async {
            let client = kube::Client::try_default()
                .await
                .map_err(|e| ReadError::Failed(e.to_string()))?;
            daemonset(client, namespace, name).await
        };
        Some(
            tokio::time::timeout(std::time::Duration::from_secs(10), read)
                .await
                .unwrap_or_else(|_| Err(ReadError::Failed("no answer within 10 s".into()))),
        )
    };
    let (decision, why) = on_stop(seen, read);
    info!("stopping: {why}");
    decision == OnStop::Uninstall
}

/// What the agent last saw of its own DaemonSet. An uninstall deletes the agent's RBAC
/// right after its DaemonSet, before the agent is stopped, so the agent watches the
/// DaemonSet all its life instead of relying on reading it when stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// Not (yet) seen: no watch, or no answer.
    Unknown,
    /// There, not being deleted.
    Present,
    /// Being deleted (a deletion timestamp: foreground deletion).
    Deleting,
    /// Gone.
    Gone,
}

impl Seen {
    /// Gone or going.
    pub fn removed(self) -> bool {
        matches!(self, Seen::Deleting | Seen::Gone)
    }

    fn of(ds: Option<&k8s_openapi::api::apps::v1::DaemonSet>) -> Seen {
        match ds {
            None => Seen::Gone,
            Some(ds) if ds.metadata.deletion_timestamp.is_some() => Seen::Deleting,
            Some(_) => Seen::Present,
        }
    }
}

/// Follows DaemonSet `namespace/name` into `seen` until `shutdown`; a failed watch is
/// logged and retried with a backoff, keeping the last state seen.
pub async fn follow_daemonset(
    client: kube::Client,
    namespace: String,
    name: String,
    seen: watch::Sender<Seen>,
    shutdown: CancellationToken,
) {
    use futures::StreamExt;
    use kube::runtime::WatchStreamExt;
    let api: kube::Api<k8s_openapi::api::apps::v1::DaemonSet> =
        kube::Api::namespaced(client, &namespace);
    let events = kube::runtime::watcher::watch_object(api, &name).default_backoff();
    tokio::pin!(events);
    loop {
        let event = tokio::select! {
            _ = shutdown.cancelled() => return,
            e = events.next() => e,
        };
        match event {
            None => return,
            Some(Ok(ds)) => {
                let now = Seen::of(ds.as_ref());
                if seen.send_replace(now) != now {
                    info!("DaemonSet {namespace}/{name}: {now:?}");
                }
            }
            Some(Err(e)) => warn!("cannot watch DaemonSet {namespace}/{name}: {e} (retrying)"),
        }
    }
}

/// Why the agent's DaemonSet could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReadError {
    /// 401 or 403: the agent's ServiceAccount (its token) or its RBAC is gone. Both are
    /// removed only by an uninstall, right after the DaemonSet.
    #[error("the API server refused the agent ({code}): its ServiceAccount or RBAC is gone")]
    Refused {
        /// The HTTP status.
        code: u16,
    },
    /// Anything else: the API server could not answer.
    #[error("{0}")]
    Failed(String),
}

/// Reads DaemonSet `namespace/name` (`None`: it is gone).
pub async fn daemonset(
    client: kube::Client,
    namespace: &str,
    name: &str,
) -> Result<Option<k8s_openapi::api::apps::v1::DaemonSet>, ReadError> {
    let api: kube::Api<k8s_openapi::api::apps::v1::DaemonSet> =
        kube::Api::namespaced(client, namespace);
    api.get_opt(name).await.map_err(|e| match e {
        kube::Error::Api(status) if matches!(status.code, 401 | 403) => {
            ReadError::Refused { code: status.code }
        }
        other => ReadError::Failed(other.to_string()),
    })
}

/// What the agent does when it stops, from what reading its DaemonSet gave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnStop {
    /// The DaemonSet is gone or being deleted: Weft is being removed from the node.
    Uninstall,
    /// The DaemonSet is there: this pod is being replaced (an upgrade, a restart).
    Keep,
}

/// The decision on stop: uninstall only when the DaemonSet is known to be going, from
/// its watch (`seen`) or a last read (`read`, made only when the watch did not see it
/// go). When neither can say, everything stays: a restarted agent needs it, and the
/// node's pods keep their capture.
pub fn on_stop(
    seen: Seen,
    read: Option<Result<Option<k8s_openapi::api::apps::v1::DaemonSet>, ReadError>>,
) -> (OnStop, String) {
    let known = match (seen.removed(), read) {
        (true, _) => Ok(seen),
        (false, Some(Ok(ds))) => Ok(Seen::of(ds.as_ref())),
        // The uninstall deleted the DaemonSet, then the agent's RBAC (403) or
        // ServiceAccount (401), before the watch said so (or while it was reconnecting).
        // A 401 right after the watch saw the DaemonSet is not taken as that: a pod
        // deleted with --force loses its bound token at once, and its node must keep Weft.
        (false, Some(Err(ReadError::Refused { code: 401 }))) if seen == Seen::Present => {
            Err("the API server refused the agent's token (401) though its DaemonSet was there: this pod was deleted at once (--force)? leaving everything in place".into())
        }
        (false, Some(Err(e @ ReadError::Refused { .. }))) => {
            return (OnStop::Uninstall, e.to_string())
        }
        (false, Some(Err(e))) => Err(format!(
            "cannot read the DaemonSet ({e}); leaving everything in place"
        )),
        (false, None) => Err("the DaemonSet was not read; leaving everything in place".into()),
    };
    match known {
        Ok(Seen::Gone) => (OnStop::Uninstall, "the DaemonSet is gone".into()),
        Ok(Seen::Deleting) => (OnStop::Uninstall, "the DaemonSet is being deleted".into()),
        Ok(_) => (
            OnStop::Keep,
            "the DaemonSet is still there (an upgrade or restart)".into(),
        ),
        Err(why) => (OnStop::Keep, why),
    }
}

/// The admin endpoint.
struct Admin {
    registry: Registry,
    status: Arc<Mutex<Status>>,
    chained: watch::Receiver<bool>,
}

impl runtime::admin::Routes for Admin {
    fn route<'a>(&'a self, path: &'a str) -> tunnel::hbone::BoxFuture<'a, runtime::admin::Answer> {
        let answer = match path {
            "/metrics" => runtime::admin::metrics(&self.registry),
            "/healthz" => (StatusCode::OK, "text/plain", "ok\n".into()),
            "/ready" => {
                let synced = self
                    .status
                    .lock()
                    .expect("status lock is never poisoned")
                    .synced;
                match (synced, *self.chained.borrow()) {
                    (true, true) => (StatusCode::OK, "text/plain", "ready\n".into()),
                    (false, _) => (
                        StatusCode::SERVICE_UNAVAILABLE,
                        "text/plain",
                        "not ready: the source has not been read yet\n".into(),
                    ),
                    (true, false) => (
                        StatusCode::SERVICE_UNAVAILABLE,
                        "text/plain",
                        "not ready: weft-cni is not in the node's CNI configuration (see the log)\n"
                            .into(),
                    ),
                }
            }
            "/pods" => {
                let status = self
                    .status
                    .lock()
                    .expect("status lock is never poisoned")
                    .clone();
                runtime::admin::json(&status)
            }
            _ => (
                StatusCode::NOT_FOUND,
                "text/plain",
                "not found; try /metrics, /healthz, /ready or /pods\n".into(),
            ),
        };
        Box::pin(std::future::ready(answer))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weft_leaves_the_node_only_when_its_daemonset_goes() {
        use k8s_openapi::api::apps::v1::DaemonSet;
        let unseen = Seen::Unknown;
        assert_eq!(on_stop(unseen, Some(Ok(None))).0, OnStop::Uninstall);
        let mut ds = DaemonSet::default();
        assert_eq!(on_stop(unseen, Some(Ok(Some(ds.clone())))).0, OnStop::Keep);
        assert_eq!(
            on_stop(Seen::Present, Some(Ok(Some(ds.clone())))).0,
            OnStop::Keep
        );
        ds.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::now(),
            ));
        assert_eq!(on_stop(unseen, Some(Ok(Some(ds)))).0, OnStop::Uninstall);
        let refused = || Some(Err(ReadError::Failed("connection refused".into())));
        assert_eq!(on_stop(unseen, refused()).0, OnStop::Keep);
        assert_eq!(on_stop(Seen::Present, refused()).0, OnStop::Keep);
        // Refused: 403 (RBAC gone) means removed; 401 (token gone) too, unless the watch
        // had just seen the DaemonSet (a pod force-deleted loses its token at once).
        let denied = |code| Some(Err(ReadError::Refused { code }));
        assert_eq!(on_stop(unseen, denied(401)).0, OnStop::Uninstall);
        assert_eq!(on_stop(unseen, denied(403)).0, OnStop::Uninstall);
        assert_eq!(on_stop(Seen::Present, denied(403)).0, OnStop::Uninstall);
        assert_eq!(on_stop(Seen::Present, denied(401)).0, OnStop::Keep);
        // Seen going by the watch: no read needed, none trusted over it.
        assert_eq!(on_stop(Seen::Deleting, None).0, OnStop::Uninstall);
        assert_eq!(on_stop(Seen::Gone, refused()).0, OnStop::Uninstall);
    }
}
