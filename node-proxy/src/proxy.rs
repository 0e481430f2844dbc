//! The node-proxy process: pods handed over on the handoff socket, each served by its
//! own listeners inside its network namespace, the model and certificates shared.
//!
//! ```text
//!  handoff socket --add(pod, netns fd)--> Pods::add --> Netns thread in the pod
//!                                           +-- 127.0.0.1:15001  outbound::serve
//!                                           +-- 0.0.0.0:15006    inbound::serve_plaintext
//!                                           +-- 0.0.0.0:15008    hbone::Server + inbound::Hbone
//! ```

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn, Instrument};
use tunnel::hbone::{Pool, PoolConfig, Server, ServerConfig, SocketFactory};
use tunnel::identity::Identity;

use runtime::config_client::Changed;
use tunnel::tls::TlsIdentity;

use crate::metrics::Metrics;
use crate::{inbound, outbound};
use runtime::handoff::{HandoffListener, PodInfo, Request};
use runtime::netns::Netns;
use runtime::state::{Identities, ModelStatus, SharedModel};

/// Limits and timings.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Connections one listener serves at once (for the HBONE listener: streams, each
    /// one proxied connection); more wait in the backlog, or are refused with a 503.
    pub max_connections: usize,
    /// Proxied connections the whole node-proxy serves at once.
    pub max_node_connections: usize,
    /// How long open connections may finish after a drain starts.
    pub drain_grace: Duration,
    /// How long a pod handed over waits for its workload to reach the model.
    pub pod_wait: Duration,
}

/// What every pod's data path shares.
pub struct Ctx {
    /// This node's name.
    pub node: String,
    /// The SPIFFE trust domain.
    pub trust_domain: String,
    /// The mesh model.
    pub model: SharedModel,
    /// Whether the model loaded, and its last error.
    pub model_status: Arc<Mutex<ModelStatus>>,
    /// Pod credentials.
    pub identities: Arc<Identities>,
    /// Outbound HBONE connections.
    pub pool: Pool,
    /// HBONE counters.
    pub tunnel_metrics: tunnel::metrics::Metrics,
    /// Connection counters.
    pub metrics: Metrics,
    /// Limits.
    pub limits: Limits,
    /// Proxied connections of the whole node, at most `limits.max_node_connections`.
    pub node_permits: Arc<Semaphore>,
    /// Told after every model update.
    pub changed: tokio::sync::watch::Receiver<runtime::config_client::Changed>,
    /// Round-robin position per service.
    rr: Mutex<HashMap<api::ObjectName, usize>>,
}

impl Ctx {
    /// A context; `pool_config` for outbound HBONE.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        node: String,
        trust_domain: String,
        model: SharedModel,
        model_status: Arc<Mutex<ModelStatus>>,
        changed: tokio::sync::watch::Receiver<runtime::config_client::Changed>,
        identities: Arc<Identities>,
        tunnel_metrics: tunnel::metrics::Metrics,
        metrics: Metrics,
        limits: Limits,
    ) -> Arc<Self> {
        Arc::new(Ctx {
            node,
            trust_domain,
            model,
            model_status,
            identities,
            pool: Pool::new(PoolConfig::default(), tunnel_metrics.clone()),
            tunnel_metrics,
            metrics,
            node_permits: Arc::new(Semaphore::new(limits.max_node_connections)),
            limits,
            changed,
            rr: Mutex::new(HashMap::new()),
        })
    }

    /// The next index (of `n`) for a round-robin over a service's endpoints.
    pub fn next_endpoint(&self, service: &api::ObjectName, n: usize) -> usize {
        let mut rr = self.rr.lock().expect("rr lock is never poisoned");
        let i = match rr.get_mut(service) {
            Some(i) => i,
            None => rr.entry(service.clone()).or_default(),
        };
        *i = i.wrapping_add(1);
        *i % n.max(1)
    }

    /// The SPIFFE ID of a service account.
    pub fn identity(&self, namespace: &str, service_account: &str) -> Result<Identity, String> {
        Identity::new(&self.trust_domain, namespace, service_account).map_err(|e| e.to_string())
    }
}

/// A pod served by this node-proxy.
pub struct Pod {
    /// Its metadata.
    pub info: PodInfo,
    /// Its credentials.
    pub tls: Arc<TlsIdentity>,
    /// Keeps the credentials (and their refresh) alive while the pod is served.
    _lease: Arc<runtime::state::Lease>,
    /// The thread in its namespace.
    pub netns: Arc<Netns>,
    /// (device, inode) of the namespace, to tell a recreated pod from a replayed one.
    netns_id: (u64, u64),
    /// Duplicates of its listeners (outbound, inbound plaintext, HBONE), for handing
    /// them to a node-proxy that replaces this one; dropped when it stops accepting, so
    /// the ports close with the accept loops.
    listeners: Mutex<Option<[OwnedFd; 3]>>,
    drain: CancellationToken,
    force: CancellationToken,
    /// The accept loops; each drops its listener when it ends.
    accepting: TaskTracker,
    /// The connections.
    tasks: TaskTracker,
    /// Open inbound connections, for authorization re-checks.
    pub conns: Arc<crate::authz::Conns>,
    /// HBONE streams of this pod, at most `limits.max_connections`.
    stream_limit: Arc<Semaphore>,
}

impl Pod {
    /// Stops its accept loops and lets go of its listeners; open connections go on.
    fn stop_accepting(&self) {
        self.drain.cancel();
        self.accepting.close();
        self.listeners
            .lock()
            .expect("listeners lock is never poisoned")
            .take();
    }

    /// `namespace/name`, for logs.
    pub fn name(&self) -> String {
        format!("{}/{}", self.info.namespace, self.info.name)
    }

    /// Accepts on `listener` until drained, serving each connection with `serve`.
    /// A connection holds a permit of the listener's limit and, when `node_limited`,
    /// one of the node's (HBONE connections do not: each of their streams does).
    fn accept_loop<F, Fut>(
        self: &Arc<Self>,
        ctx: &Arc<Ctx>,
        listener: TcpListener,
        node_limited: bool,
        serve: F,
    ) where
        F: Fn(Arc<Ctx>, Arc<Pod>, tokio::net::TcpStream) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let (pod, ctx, serve) = (self.clone(), ctx.clone(), Arc::new(serve));
        let limit = Arc::new(Semaphore::new(ctx.limits.max_connections));
        let span = tracing::info_span!("pod", pod = %self.name());
        self.accepting.spawn(
            async move {
                loop {
                    // Past the listener's limit, connections wait in its backlog.
                    let permit = tokio::select! {
                        _ = pod.drain.cancelled() => return,
                        p = acquire(&limit, &ctx, "listener") => match p { Some(p) => p, None => return },
                    };
                    let stream = tokio::select! {
                        _ = pod.drain.cancelled() => return,
                        (s, _) = tunnel::net::accept(&listener, "pod listener") => s,
                    };
                    let (pod, ctx, serve) = (pod.clone(), ctx.clone(), serve.clone());
                    pod.clone().tasks.spawn(
                        async move {
                            // The node's limit is taken once accepted, not while waiting
                            // to accept: idle listeners must not hold the node's permits.
                            // Past it, the connection waits here (its listener's limit
                            // bounds how many do).
                            let node_permit = match node_limited {
                                false => None,
                                true => tokio::select! {
                                    _ = pod.force.cancelled() => return,
                                    p = acquire(&ctx.node_permits, &ctx, "node") => match p {
                                        Some(p) => Some(p),
                                        None => return,
                                    },
                                },
                            };
                            // Made here, not captured: a future captured by this block
                            // would be stored twice for the connection's life (as the
                            // capture and as the one polled).
                            let force = pod.force.clone();
                            tokio::select! {
                                _ = serve(ctx, pod, stream) => {}
                                _ = force.cancelled() => {}
                            }
                            drop((permit, node_permit));
                        }
                        .in_current_span(),
                    );
                }
            }
            .instrument(span),
        );
    }
}

/// A permit of `limit`, counting (as `which`) when one had to be waited for.
async fn acquire(
    limit: &Arc<Semaphore>,
    ctx: &Ctx,
    which: &str,
) -> Option<tokio::sync::OwnedSemaphorePermit> {
    match limit.clone().try_acquire_owned() {
        Ok(p) => Some(p),
        Err(tokio::sync::TryAcquireError::Closed) => None,
        Err(tokio::sync::TryAcquireError::NoPermits) => {
            crate::metrics::count(&ctx.metrics.limited, which);
            limit.clone().acquire_owned().await.ok()
        }
    }
}

impl Pod {
    /// Permits for one more HBONE stream (the pod's and the node's); `None` at a limit.
    pub fn stream_permits(
        &self,
        ctx: &Ctx,
    ) -> Option<(
        tokio::sync::OwnedSemaphorePermit,
        tokio::sync::OwnedSemaphorePermit,
    )> {
        let pod = match self.stream_limit.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                crate::metrics::count(&ctx.metrics.limited, "listener");
                return None;
            }
        };
        match ctx.node_permits.clone().try_acquire_owned() {
            Ok(node) => Some((pod, node)),
            Err(_) => {
                crate::metrics::count(&ctx.metrics.limited, "node");
                None
            }
        }
    }
}

impl Pod {
    /// A socket factory for HBONE connections from this pod.
    pub fn sockets(&self) -> Arc<dyn SocketFactory> {
        Arc::new(runtime::netns::PodSockets(self.netns.clone()))
    }
}

/// The pods of this node.
pub struct Pods {
    ctx: Arc<Ctx>,
    pods: tokio::sync::Mutex<HashMap<String, Arc<Pod>>>,
    /// Pods re-added since the last `snapshot_start`.
    snapshot: Mutex<Option<HashSet<String>>>,
    /// The pods are being handed to a new node-proxy: changes would not reach it.
    handing_over: std::sync::atomic::AtomicBool,
}

/// Why a pod handed over is not served.
#[derive(Debug, thiserror::Error)]
pub enum PodError {
    /// The handoff gave no IP.
    #[error("pod {pod}: it has no IP")]
    NoIp {
        /// The pod.
        pod: String,
    },
    /// The controller has not sent the pod's workload.
    #[error("pod {pod} (uid {uid}) is not in the mesh model after {secs} s: the controller has not sent it (is the controller reachable? is the pod scheduled on this node? see /config_dump)")]
    NotInModel {
        /// The pod.
        pod: String,
        /// Its UID.
        uid: String,
        /// How long it was waited for.
        secs: u64,
    },
    /// The model says the pod is not in the mesh.
    #[error("pod {pod} is not in the mesh after {secs} s: its namespace is not labelled weft.dev/mesh=enabled, or the pod opted out")]
    NotEnrolled {
        /// The pod.
        pod: String,
        /// How long it was waited for.
        secs: u64,
    },
    /// The handoff and the model disagree.
    #[error("pod {pod}: the handoff says {field} {handed:?} but the mesh model says {model:?}; node-proxy serves pods only as the controller knows them")]
    Mismatch {
        /// The pod.
        pod: String,
        /// The field.
        field: &'static str,
        /// What the handoff said.
        handed: String,
        /// What the model says.
        model: String,
    },
    /// The pod runs on another node.
    #[error("pod {pod} is scheduled on node {theirs}, not on this node ({ours})")]
    OtherNode {
        /// The pod.
        pod: String,
        /// Its node.
        theirs: String,
        /// This node.
        ours: String,
    },
    /// No certificate could be had.
    #[error("pod {pod}: no certificate for {identity}: {source}")]
    Certificate {
        /// The pod.
        pod: String,
        /// The identity.
        identity: String,
        /// Why.
        source: runtime::state::CertError,
    },
    /// Its namespace or listeners could not be set up.
    #[error("pod {pod}: {why}")]
    Setup {
        /// The pod.
        pod: String,
        /// Why.
        why: String,
    },
    /// The pods are being handed to a new node-proxy.
    #[error("add for pod {pod}: {HANDING_OVER}")]
    HandingOver {
        /// The pod.
        pod: String,
    },
}

impl PodError {
    /// A metric label.
    pub fn label(&self) -> &'static str {
        match self {
            PodError::NoIp { .. } => "no_ip",
            PodError::NotInModel { .. } => "not_in_model",
            PodError::NotEnrolled { .. } => "not_enrolled",
            PodError::Mismatch { .. } => "mismatch",
            PodError::OtherNode { .. } => "other_node",
            PodError::Certificate { source, .. } => match source.label() {
                "refused" => "certificate_refused",
                "unavailable" => "certificate_unavailable",
                _ => "certificate_invalid",
            },
            PodError::Setup { .. } => "setup",
            PodError::HandingOver { .. } => "handing_over",
        }
    }
}

/// Refusal of a change while the pods are handed to a new node-proxy.
const HANDING_OVER: &str = "node-proxy is handing its pods to a new node-proxy; \
                            reconnect and send the change (or a snapshot) to the new one";

impl Pods {
    /// No pods yet.
    pub fn new(ctx: Arc<Ctx>) -> Arc<Self> {
        Arc::new(Pods {
            ctx,
            pods: tokio::sync::Mutex::new(HashMap::new()),
            snapshot: Mutex::new(None),
            handing_over: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// The pods, for `/config_dump`.
    pub async fn list(&self) -> Vec<PodInfo> {
        self.pods
            .lock()
            .await
            .values()
            .map(|p| p.info.clone())
            .collect()
    }

    /// As [`add`](Self::add), serving listeners a node-proxy it replaces handed over
    /// (outbound, inbound plaintext, HBONE) instead of opening new ones: connections
    /// waiting in their queues are accepted here, none is refused.
    pub async fn adopt(
        &self,
        info: PodInfo,
        netns: OwnedFd,
        listeners: [OwnedFd; 3],
    ) -> Result<(), PodError> {
        self.add(info, netns, Some(listeners)).await
    }

    /// Every pod with duplicates of its namespace and listeners, for a takeover. From
    /// here until [`end_handover`](Self::end_handover) changes to the pods are refused,
    /// as is a second takeover.
    pub async fn export(&self) -> std::io::Result<Vec<(PodInfo, [OwnedFd; 4])>> {
        use std::sync::atomic::Ordering;
        let pods = self.pods.lock().await;
        if self.handing_over.swap(true, Ordering::SeqCst) {
            return Err(std::io::Error::other(
                "another node-proxy is already taking over",
            ));
        }
        let exported = self.export_locked(&pods);
        if exported.is_err() {
            self.handing_over.store(false, Ordering::SeqCst);
        }
        exported
    }

    /// Every pod with duplicates of its namespace and listeners, for a sender that
    /// restarted and takes back the listeners it held. Changes nothing.
    pub async fn inventory(&self) -> std::io::Result<Vec<(PodInfo, [OwnedFd; 4])>> {
        let pods = self.pods.lock().await;
        self.export_locked(&pods)
    }

    /// The takeover was abandoned: accept changes again.
    pub fn end_handover(&self) {
        self.handing_over
            .store(false, std::sync::atomic::Ordering::SeqCst);
    }

    fn handing_over(&self) -> Result<(), String> {
        match self.handing_over.load(std::sync::atomic::Ordering::SeqCst) {
            true => Err(HANDING_OVER.to_owned()),
            false => Ok(()),
        }
    }

    fn export_locked(
        &self,
        pods: &HashMap<String, Arc<Pod>>,
    ) -> std::io::Result<Vec<(PodInfo, [OwnedFd; 4])>> {
        let mut out = Vec::with_capacity(pods.len());
        for p in pods.values() {
            let listeners = p
                .listeners
                .lock()
                .expect("listeners lock is never poisoned");
            let Some([a, b, c]) = listeners.as_ref() else {
                continue;
            };
            let fds = [
                p.netns.fd().try_clone_to_owned()?,
                a.try_clone()?,
                b.try_clone()?,
                c.try_clone()?,
            ];
            out.push((p.info.clone(), fds));
        }
        Ok(out)
    }

    /// Starts serving a pod: waits (bounded) for its workload in the model, fetches
    /// its certificate, enters its namespace, and serves the listeners the sender opened
    /// there, or opens its own when it sent none. All or nothing: on error nothing of the
    /// pod is left running.
    pub async fn add(
        &self,
        info: PodInfo,
        netns: OwnedFd,
        listeners: Option<[OwnedFd; 3]>,
    ) -> Result<(), PodError> {
        let pod = info.to_string();
        let result = self.try_add(info, netns, listeners).await;
        if let Err(e) = &result {
            crate::metrics::count(&self.ctx.metrics.pod_refusals, e.label());
            warn!(%pod, "pod refused: {e}");
        }
        result
    }

    async fn try_add(
        &self,
        info: PodInfo,
        netns: OwnedFd,
        listeners: Option<[OwnedFd; 3]>,
    ) -> Result<(), PodError> {
        let pod = info.to_string();
        if let Some(seen) = self
            .snapshot
            .lock()
            .expect("snapshot lock is never poisoned")
            .as_mut()
        {
            seen.insert(info.uid.clone());
        }
        let setup = |why: String| PodError::Setup {
            pod: pod.clone(),
            why,
        };
        let netns_id = netns_id(&netns).map_err(setup)?;
        if self.served(&info, netns_id).await {
            debug!(%pod, "pod already served");
            return Ok(());
        }
        // Neither the wait for the model nor the certificate holds the pod lock, so a
        // slow controller delays this pod only.
        let identity = self.admit(&info).await?;
        let lease =
            self.ctx
                .identities
                .get(&identity)
                .await
                .map_err(|source| PodError::Certificate {
                    pod: pod.clone(),
                    identity: identity.to_string(),
                    source,
                })?;
        let mut pods = self.pods.lock().await;
        if self.handing_over().is_err() {
            return Err(PodError::HandingOver { pod });
        }
        if let Some(existing) = pods.get(&info.uid) {
            if existing.info == info && existing.netns_id == netns_id {
                debug!(%pod, "pod already served");
                return Ok(());
            }
        }
        if let Some(old) = pods.remove(&info.uid) {
            stop(old, Duration::ZERO).await;
        }
        let served = self
            .start(info, netns, netns_id, listeners, lease)
            .await
            .map_err(setup)?;
        info!(%pod, ips = ?served.info.ips, identity = %served.tls.identity(), "pod added");
        pods.insert(served.info.uid.clone(), served);
        Ok(())
    }

    async fn served(&self, info: &PodInfo, netns_id: (u64, u64)) -> bool {
        let pods = self.pods.lock().await;
        pods.get(&info.uid)
            .is_some_and(|p| p.info == *info && p.netns_id == netns_id)
    }

    /// Waits (bounded) for the pod's workload to reach the model and checks that the
    /// handoff agrees with it; the identity to serve the pod as is the model's.
    async fn admit(&self, info: &PodInfo) -> Result<Identity, PodError> {
        let ctx = &self.ctx;
        let pod = info.to_string();
        if info.ips.is_empty() {
            return Err(PodError::NoIp { pod });
        }
        let mut changed = ctx.changed.clone();
        let found =
            runtime::config_client::wait_for(&ctx.model, &mut changed, ctx.limits.pod_wait, |m| {
                m.workload(&info.uid).filter(|w| w.enrolled).cloned()
            })
            .await;
        let Some(w) = found else {
            let secs = ctx.limits.pod_wait.as_secs();
            return Err(match ctx.model.load().workload(&info.uid) {
                None => PodError::NotInModel {
                    pod,
                    uid: info.uid.clone(),
                    secs,
                },
                Some(_) => PodError::NotEnrolled { pod, secs },
            });
        };
        for (field, handed, model) in [
            ("namespace", &info.namespace, &w.namespace),
            ("serviceAccount", &info.service_account, &w.service_account),
        ] {
            if handed != model {
                return Err(PodError::Mismatch {
                    pod,
                    field,
                    handed: handed.clone(),
                    model: model.clone(),
                });
            }
        }
        if w.node != ctx.node {
            return Err(PodError::OtherNode {
                pod,
                theirs: w.node.clone(),
                ours: ctx.node.clone(),
            });
        }
        ctx.identity(&w.namespace, &w.service_account)
            .map_err(|why| PodError::Setup { pod, why })
    }

    async fn start(
        &self,
        info: PodInfo,
        fd: OwnedFd,
        netns_id: (u64, u64),
        handed: Option<[OwnedFd; 3]>,
        lease: Arc<runtime::state::Lease>,
    ) -> Result<Arc<Pod>, String> {
        let ctx = &self.ctx;
        let name = format!("{}/{}", info.namespace, info.name);
        let [outbound_addr, plaintext_addr, hbone_addr] =
            runtime::netns::pod_listen_addrs(&info.ips)?;
        let netns = Arc::new(Netns::enter(fd, &name).map_err(|e| e.to_string())?);
        let tls = lease.tls().clone();
        // Inbound listeners bind the pod's IP: that also proves the namespace is the
        // pod's and still has its network.
        let listen = |addr: SocketAddr| {
            let netns = netns.clone();
            async move {
                netns
                    .listen(addr)
                    .await
                    .map_err(|e| format!("cannot listen on {addr} in its network namespace: {e} (is the pod's IP configured there?)"))
            }
        };
        let (outbound_l, plaintext_l, hbone_l) = match handed {
            Some([outbound, plaintext, hbone]) => {
                // An earlier release's IPv4-only listeners of a pod with IPv6 are served
                // as they are (the agent then leaves its IPv6 uncaptured).
                let [outbound_addr, plaintext_addr, hbone_addr] =
                    match runtime::netns::ipv4_listen_addrs(&info.ips) {
                        Some(old) if bound_to(&outbound) == Some(old[0]) => old,
                        _ => [outbound_addr, plaintext_addr, hbone_addr],
                    };
                let adopted = (
                    adopt_listener(outbound, outbound_addr)?,
                    adopt_listener(plaintext, plaintext_addr)?,
                    adopt_listener(hbone, hbone_addr)?,
                );
                in_namespace(&netns, [&adopted.0, &adopted.1, &adopted.2]).await?;
                adopted
            }
            // Open every listener before serving any, so a failure leaves nothing behind.
            None => (
                listen(outbound_addr).await?,
                listen(plaintext_addr).await?,
                listen(hbone_addr).await?,
            ),
        };
        // Captured application connections never leave the pod; accepted sockets inherit
        // the listener's congestion control, so this is set once, not per connection.
        runtime::netns::pod_local_congestion(&outbound_l);
        let dup = |l: &TcpListener| {
            l.as_fd()
                .try_clone_to_owned()
                .map_err(|e| format!("cannot duplicate a listener: {e}"))
        };
        let listeners = [dup(&outbound_l)?, dup(&plaintext_l)?, dup(&hbone_l)?];
        let pod = Arc::new(Pod {
            info,
            tls: tls.clone(),
            _lease: lease,
            netns,
            netns_id,
            listeners: Mutex::new(Some(listeners)),
            drain: CancellationToken::new(),
            force: CancellationToken::new(),
            accepting: TaskTracker::new(),
            tasks: TaskTracker::new(),
            conns: Arc::default(),
            stream_limit: Arc::new(Semaphore::new(ctx.limits.max_connections)),
        });
        pod.accept_loop(ctx, outbound_l, true, outbound::serve);
        pod.accept_loop(ctx, plaintext_l, true, inbound::serve_plaintext);
        let server = Arc::new(Server::new(
            &tls,
            ServerConfig::default(),
            ctx.tunnel_metrics.clone(),
        ));
        let handler = Arc::new(inbound::Hbone {
            ctx: ctx.clone(),
            pod: pod.clone(),
        });
        pod.accept_loop(ctx, hbone_l, false, move |_, pod, stream| {
            let (server, handler) = (server.clone(), handler.clone());
            async move {
                let Ok(peer) = runtime::netns::peer_addr(&stream) else {
                    return;
                };
                let (drain, force) = (pod.drain.clone(), pod.force.clone());
                server
                    .serve_connection(stream, peer, handler, drain, force)
                    .await;
            }
        });
        Ok(pod)
    }

    /// Stops serving a pod: it stops accepting at once; open connections get the drain
    /// grace period in the background. Removing an unknown pod is not an error.
    pub async fn remove(&self, uid: &str) -> Result<(), String> {
        let pod = {
            let mut pods = self.pods.lock().await;
            self.handing_over()?;
            pods.remove(uid)
        };
        match pod {
            Some(pod) => {
                info!(pod = %pod.name(), "pod removed");
                // Listeners close before the reply, so the pod can be added again at
                // once; its connections drain in the background.
                pod.stop_accepting();
                pod.accepting.wait().await;
                tokio::spawn(stop(pod, self.ctx.limits.drain_grace));
            }
            None => debug!(uid, "remove for a pod not served here"),
        }
        Ok(())
    }

    /// Begins a snapshot: pods not re-added before its end are removed.
    pub fn snapshot_start(&self) -> Result<(), String> {
        self.handing_over()?;
        *self
            .snapshot
            .lock()
            .expect("snapshot lock is never poisoned") = Some(HashSet::new());
        Ok(())
    }

    /// Ends a snapshot, removing pods it did not mention.
    pub async fn snapshot_end(&self) -> Result<(), String> {
        self.handing_over()?;
        let seen = self
            .snapshot
            .lock()
            .expect("snapshot lock is never poisoned")
            .take()
            .ok_or("snapshot_end without snapshot_start")?;
        let stale: Vec<String> = self
            .pods
            .lock()
            .await
            .keys()
            .filter(|uid| !seen.contains(*uid))
            .cloned()
            .collect();
        for uid in stale {
            self.remove(&uid).await?;
        }
        Ok(())
    }

    /// Until `shutdown`: after every model update that changed policies, namespaces or
    /// this node's workloads, checks every open inbound connection again and closes
    /// those no longer allowed.
    pub async fn enforce_changes(self: Arc<Self>, shutdown: CancellationToken) {
        let mut changed = self.ctx.changed.clone();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                r = changed.changed() => if r.is_err() { return },
            }
            let Changed { authorization, .. } = *changed.borrow_and_update();
            if !authorization {
                continue;
            }
            let pods: Vec<Arc<Pod>> = self.pods.lock().await.values().cloned().collect();
            inbound::recheck(&self.ctx, &pods);
        }
    }

    /// Until `shutdown`: once a minute, drops the connection series of pods no longer
    /// in the model ([`Metrics::prune`]).
    pub async fn prune_metrics(self: Arc<Self>, shutdown: CancellationToken) {
        runtime::startup::every(std::time::Duration::from_secs(60), shutdown, || {
            let model = self.ctx.model.load();
            let live = model.pod_names();
            let pruned = self
                .ctx
                .metrics
                .prune(|ns, name| live.contains(&(ns, name)));
            if pruned > 0 {
                tracing::debug!(
                    pruned,
                    "dropped the connection series of pods that are gone"
                );
            }
        })
        .await
    }

    /// Drains every pod at once (SIGTERM): stop accepting everywhere, give open
    /// connections one grace period, then close the rest.
    pub async fn drain_all(&self) {
        let pods: Vec<Arc<Pod>> = self.pods.lock().await.drain().map(|(_, p)| p).collect();
        for p in &pods {
            p.stop_accepting();
            p.tasks.close();
        }
        let all = async {
            for p in &pods {
                p.tasks.wait().await;
            }
        };
        if tokio::time::timeout(self.ctx.limits.drain_grace, all)
            .await
            .is_err()
        {
            warn!("drain grace period over; closing remaining connections");
        }
        for p in &pods {
            p.force.cancel();
        }
        for p in &pods {
            p.accepting.wait().await;
            p.tasks.wait().await;
        }
    }
}

/// (device, inode) of a namespace file descriptor.
fn netns_id(fd: &OwnedFd) -> Result<(u64, u64), String> {
    let st =
        nix::sys::stat::fstat(fd).map_err(|e| format!("cannot stat its network namespace: {e}"))?;
    Ok((st.st_dev as u64, st.st_ino as u64))
}

/// Stop accepting, let connections finish for `grace`, then close the rest.
async fn stop(pod: Arc<Pod>, grace: Duration) {
    pod.stop_accepting();
    pod.tasks.close();
    pod.accepting.wait().await;
    if tokio::time::timeout(grace, pod.tasks.wait()).await.is_err() {
        warn!(pod = %pod.name(), "drain grace period over; closing remaining connections");
    }
    pod.force.cancel();
    pod.tasks.wait().await;
}

/// A takeover answered on one handoff connection: if the connection ends (or its task
/// fails) before `takeover_done`, the refusal of pod changes is lifted.
struct Handover {
    pods: Arc<Pods>,
    armed: bool,
}

impl Drop for Handover {
    fn drop(&mut self) {
        if self.armed {
            warn!("the new node-proxy gave up its takeover; serving on");
            self.pods.end_handover();
        }
    }
}

/// A listener handed over by the node-proxy this one replaces, checked to be a TCP
/// listener on `addr` (the pod's port it is served as).
fn adopt_listener(fd: OwnedFd, addr: SocketAddr) -> Result<TcpListener, String> {
    let socket = socket2::Socket::from(fd);
    let local = socket.local_addr().ok().and_then(|a| a.as_socket());
    let listening = socket.is_listener().unwrap_or(false);
    if local != Some(addr) || !listening {
        return Err(format!(
            "the listener handed over for {addr} is not one (it is bound to {local:?}, listening: {listening})"
        ));
    }
    socket
        .set_nonblocking(true)
        .and_then(|()| TcpListener::from_std(socket.into()))
        .map_err(|e| format!("cannot serve the listener handed over for {addr}: {e}"))
}

/// The address a socket is bound to.
fn bound_to(fd: &OwnedFd) -> Option<SocketAddr> {
    socket2::SockRef::from(fd).local_addr().ok()?.as_socket()
}

/// Checks that listeners handed over for a pod are in that pod's network namespace.
/// The address alone does not tell: 127.0.0.1:15001 is the same in every pod, and
/// serving another pod's under this pod's identity would give that pod's connections
/// this one's.
async fn in_namespace(netns: &Netns, listeners: [&TcpListener; 3]) -> Result<(), String> {
    let here = netns
        .run(runtime::netns::listening_inodes)
        .await
        .and_then(|r| r)
        .map_err(|e| format!("cannot list the listening sockets in its network namespace: {e}"))?;
    for listener in listeners {
        let inode = nix::sys::stat::fstat(listener)
            .map_err(|e| format!("cannot inspect a listener handed over: {e}"))?
            .st_ino;
        if !here.contains(&inode) {
            let addr = listener.local_addr().map_err(|e| e.to_string())?;
            return Err(format!(
                "the listener handed over for {addr} is not in its network namespace (it belongs to another pod or namespace)"
            ));
        }
    }
    Ok(())
}

/// Serves the handoff socket: each sender connection's requests in order. A `takeover`
/// from a node-proxy replacing this one is answered with every pod; this process keeps
/// serving (both accept on the same sockets) until `takeover_done` on that connection,
/// then sends the new process's pid on `taken_over` and cancels `shutdown`. A takeover
/// connection that ends without it leaves this process serving.
pub async fn serve_handoff(
    listener: HandoffListener,
    pods: Arc<Pods>,
    taken_over: tokio::sync::oneshot::Sender<Option<u32>>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let taken_over = Arc::new(Mutex::new(Some(taken_over)));
    let slots = Arc::new(tokio::sync::Semaphore::new(
        runtime::handoff::MAX_CONNECTIONS,
    ));
    loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            p = slots.clone().acquire_owned() => p.map_err(std::io::Error::other)?,
        };
        let mut conn = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            c = listener.accept() => match c {
                Ok(c) => c,
                Err(e) => {
                    // Out of fds or similar: back off instead of spinning.
                    warn!("handoff accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let pods = pods.clone();
        let shutdown = shutdown.clone();
        let taken_over = taken_over.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let mut handover = Handover {
                pods: pods.clone(),
                armed: false,
            };
            loop {
                let request = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    r = conn.next() => r,
                };
                let result = match request {
                    Ok(Some(Request::Add {
                        pod,
                        netns,
                        listeners,
                    })) => pods
                        .add(pod, netns, listeners)
                        .await
                        .map_err(|e| e.to_string()),
                    Ok(Some(Request::Inventory)) => {
                        let result = match pods.inventory().await {
                            Ok(listed) => {
                                let borrowed: Vec<_> = listed
                                    .iter()
                                    .map(|(pod, fds)| {
                                        (pod.clone(), fds.each_ref().map(|f| f.as_fd()))
                                    })
                                    .collect();
                                conn.hand_over(None, &borrowed).await
                            }
                            Err(e) => conn.reply(Err(format!("inventory: {e}"))).await,
                        };
                        if let Err(e) = result {
                            warn!("handoff reply failed: {e}");
                            return;
                        }
                        continue;
                    }
                    Ok(Some(Request::Remove { uid })) => pods.remove(&uid).await,
                    Ok(Some(Request::SnapshotStart)) => pods.snapshot_start(),
                    Ok(Some(Request::SnapshotEnd)) => pods.snapshot_end().await,
                    Ok(Some(Request::TakeoverDone)) if handover.armed => {
                        handover.armed = false;
                        let _ = conn.reply(Ok(())).await;
                        info!("a new node-proxy serves this node's pods; draining");
                        let successor = conn.peer_pid();
                        if let Some(tx) = taken_over.lock().ok().and_then(|mut t| t.take()) {
                            let _ = tx.send(successor);
                        }
                        shutdown.cancel();
                        return;
                    }
                    Ok(Some(Request::TakeoverDone)) => {
                        Err("takeover_done: no takeover on this connection".into())
                    }
                    Ok(Some(Request::Takeover)) if handover.armed => {
                        Err("takeover: already handed over on this connection".into())
                    }
                    Ok(Some(Request::Takeover)) => {
                        let handed = match pods.export().await {
                            Ok(handed) => handed,
                            Err(e) => {
                                let _ = conn.reply(Err(format!("takeover: {e}"))).await;
                                continue;
                            }
                        };
                        let borrowed: Vec<_> = handed
                            .iter()
                            .map(|(pod, fds)| (pod.clone(), fds.each_ref().map(|f| f.as_fd())))
                            .collect();
                        match conn.hand_over(None, &borrowed).await {
                            Ok(()) => {
                                info!(
                                    pods = handed.len(),
                                    "listeners handed to a new node-proxy; serving until it confirms"
                                );
                                handover.armed = true;
                                continue;
                            }
                            Err(e) => {
                                warn!("takeover failed, serving on: {e}");
                                pods.end_handover();
                                return;
                            }
                        }
                    }
                    Ok(None) => return,
                    Err(e) => {
                        warn!("handoff connection ended: {e}");
                        return;
                    }
                };
                if let Err(e) = &result {
                    warn!("handoff request refused: {e}");
                }
                if let Err(e) = conn.reply(result).await {
                    warn!("handoff reply failed: {e}");
                    return;
                }
            }
        });
    }
}
