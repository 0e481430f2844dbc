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
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn, Instrument};
use tunnel::hbone::{BoxFuture, Pool, PoolConfig, Server, ServerConfig, SocketFactory};
use tunnel::identity::Identity;
use tunnel::tls::TlsIdentity;

use crate::handoff::{HandoffListener, PodInfo, Request};
use crate::metrics::Metrics;
use crate::netns::Netns;
use crate::state::{Identities, ModelStatus, SharedModel};
use crate::{inbound, outbound};

/// Ports inside every pod.
pub const OUTBOUND_PORT: u16 = 15001;
/// Inbound plaintext capture port.
pub const INBOUND_PLAINTEXT_PORT: u16 = 15006;

/// Limits and timings.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Connections one listener serves at once; more wait in the backlog.
    pub max_connections: usize,
    /// How long open connections may finish after a drain starts.
    pub drain_grace: Duration,
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
    /// Round-robin position per service (`namespace/name`).
    rr: Mutex<HashMap<String, usize>>,
}

impl Ctx {
    /// A context; `pool_config` for outbound HBONE.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        node: String,
        trust_domain: String,
        model: SharedModel,
        model_status: Arc<Mutex<ModelStatus>>,
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
            limits,
            rr: Mutex::new(HashMap::new()),
        })
    }

    /// The next index (of `n`) for a round-robin over a service's endpoints.
    pub fn next_endpoint(&self, service: &str, n: usize) -> usize {
        let mut rr = self.rr.lock().expect("rr lock is never poisoned");
        let i = rr.entry(service.to_owned()).or_default();
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
    /// Its primary IP.
    pub ip: IpAddr,
    /// Its credentials.
    pub tls: Arc<TlsIdentity>,
    /// Keeps the credentials (and their refresh) alive while the pod is served.
    _lease: Arc<crate::state::Lease>,
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
    fn accept_loop<F, Fut>(self: &Arc<Self>, ctx: &Arc<Ctx>, listener: TcpListener, serve: F)
    where
        F: Fn(Arc<Ctx>, Arc<Pod>, tokio::net::TcpStream) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let (pod, ctx) = (self.clone(), ctx.clone());
        let limit = Arc::new(Semaphore::new(ctx.limits.max_connections));
        let span = tracing::info_span!("pod", pod = %self.name());
        self.accepting.spawn(
            async move {
                loop {
                    let permit = tokio::select! {
                        _ = pod.drain.cancelled() => return,
                        p = limit.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
                    };
                    let stream = tokio::select! {
                        _ = pod.drain.cancelled() => return,
                        r = listener.accept() => match r {
                            Ok((s, _)) => s,
                            Err(e) => {
                                warn!("accept failed: {e}");
                                tokio::time::sleep(Duration::from_millis(50)).await;
                                continue;
                            }
                        },
                    };
                    let fut = serve(ctx.clone(), pod.clone(), stream);
                    let force = pod.force.clone();
                    pod.tasks.spawn(
                        async move {
                            tokio::select! {
                                _ = fut => {}
                                _ = force.cancelled() => {}
                            }
                            drop(permit);
                        }
                        .in_current_span(),
                    );
                }
            }
            .instrument(span),
        );
    }
}

/// Makes outbound sockets inside a pod's namespace.
struct PodSockets(Arc<Netns>);

impl SocketFactory for PodSockets {
    fn socket(
        &self,
        dst: std::net::SocketAddr,
    ) -> BoxFuture<'_, std::io::Result<tokio::net::TcpSocket>> {
        Box::pin(std::future::ready(self.0.outbound_socket(dst)))
    }
}

impl Pod {
    /// A socket factory for HBONE connections from this pod.
    pub fn sockets(&self) -> Arc<dyn SocketFactory> {
        Arc::new(PodSockets(self.netns.clone()))
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

    /// Starts serving a pod: enters its namespace, fetches its certificate, opens its
    /// listeners. All or nothing: on error nothing of the pod is left running.
    pub async fn add(&self, info: PodInfo, netns: OwnedFd) -> Result<(), String> {
        self.add_with(info, netns, None).await
    }

    /// As [`add`](Self::add), serving listeners a node-proxy it replaces handed over
    /// (outbound, inbound plaintext, HBONE) instead of opening new ones: connections
    /// waiting in their queues are accepted here, none is refused.
    pub async fn adopt(
        &self,
        info: PodInfo,
        netns: OwnedFd,
        listeners: [OwnedFd; 3],
    ) -> Result<(), String> {
        self.add_with(info, netns, Some(listeners)).await
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

    async fn add_with(
        &self,
        info: PodInfo,
        netns: OwnedFd,
        listeners: Option<[OwnedFd; 3]>,
    ) -> Result<(), String> {
        let name = format!("{}/{}", info.namespace, info.name);
        if let Some(seen) = self
            .snapshot
            .lock()
            .expect("snapshot lock is never poisoned")
            .as_mut()
        {
            seen.insert(info.uid.clone());
        }
        let netns_id = netns_id(&netns).map_err(|e| format!("pod {name}: {e}"))?;
        let mut pods = self.pods.lock().await;
        self.handing_over()
            .map_err(|e| format!("add for pod {name}: {e}"))?;
        if let Some(existing) = pods.get(&info.uid) {
            if existing.info == info && existing.netns_id == netns_id {
                debug!(pod = %name, "pod already served");
                return Ok(());
            }
        }
        if let Some(old) = pods.remove(&info.uid) {
            stop(old, Duration::ZERO).await;
        }
        let pod = self
            .start(info, netns, netns_id, listeners)
            .await
            .map_err(|e| format!("pod {name}: {e}"))?;
        info!(pod = %name, ip = %pod.ip, identity = %pod.tls.identity(), "pod added");
        pods.insert(pod.info.uid.clone(), pod);
        Ok(())
    }

    async fn start(
        &self,
        info: PodInfo,
        fd: OwnedFd,
        netns_id: (u64, u64),
        handed: Option<[OwnedFd; 3]>,
    ) -> Result<Arc<Pod>, String> {
        let ctx = &self.ctx;
        let name = format!("{}/{}", info.namespace, info.name);
        let ip = *info.ips.first().ok_or("it has no IP")?;
        let netns = Arc::new(Netns::enter(fd, &name).map_err(|e| e.to_string())?);
        let identity = ctx.identity(&info.namespace, &info.service_account)?;
        let lease = ctx.identities.get(&identity).await?;
        let tls = lease.tls().clone();
        // Inbound listeners bind the pod's IP: that also proves the namespace is the
        // pod's and still has its network.
        let listen = |port| {
            let netns = netns.clone();
            async move {
                netns
                    .listen((ip, port).into())
                    .await
                    .map_err(|e| format!("cannot listen on {ip}:{port} in its network namespace: {e} (is the pod's IP configured there?)"))
            }
        };
        let outbound_addr = SocketAddr::from(([127, 0, 0, 1], OUTBOUND_PORT));
        let (outbound_l, plaintext_l, hbone_l) = match handed {
            Some([outbound, plaintext, hbone]) => {
                let adopted = (
                    adopt_listener(outbound, outbound_addr)?,
                    adopt_listener(plaintext, (ip, INBOUND_PLAINTEXT_PORT).into())?,
                    adopt_listener(hbone, (ip, tunnel::hbone::PORT).into())?,
                );
                in_namespace(&netns, [&adopted.0, &adopted.1, &adopted.2]).await?;
                adopted
            }
            // Open every listener before serving any, so a failure leaves nothing behind.
            None => (
                netns
                    .listen(outbound_addr)
                    .await
                    .map_err(|e| format!("cannot listen on 127.0.0.1:{OUTBOUND_PORT}: {e}"))?,
                listen(INBOUND_PLAINTEXT_PORT).await?,
                listen(tunnel::hbone::PORT).await?,
            ),
        };
        // Captured application connections never leave the pod; accepted sockets inherit
        // the listener's congestion control, so this is set once, not per connection.
        crate::netns::pod_local_congestion(&outbound_l);
        let dup = |l: &TcpListener| {
            l.as_fd()
                .try_clone_to_owned()
                .map_err(|e| format!("cannot duplicate a listener: {e}"))
        };
        let listeners = [dup(&outbound_l)?, dup(&plaintext_l)?, dup(&hbone_l)?];
        let pod = Arc::new(Pod {
            info,
            ip,
            tls: tls.clone(),
            _lease: lease,
            netns,
            netns_id,
            listeners: Mutex::new(Some(listeners)),
            drain: CancellationToken::new(),
            force: CancellationToken::new(),
            accepting: TaskTracker::new(),
            tasks: TaskTracker::new(),
        });
        pod.accept_loop(ctx, outbound_l, outbound::serve);
        pod.accept_loop(ctx, plaintext_l, inbound::serve_plaintext);
        let server = Arc::new(Server::new(
            &tls,
            ServerConfig::default(),
            ctx.tunnel_metrics.clone(),
        ));
        let handler = Arc::new(inbound::Hbone {
            ctx: ctx.clone(),
            pod: pod.clone(),
        });
        pod.accept_loop(ctx, hbone_l, move |_, pod, stream| {
            let (server, handler) = (server.clone(), handler.clone());
            async move {
                let Ok(peer) = stream.peer_addr() else { return };
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

/// Checks that listeners handed over for a pod are in that pod's network namespace.
/// The address alone does not tell: 127.0.0.1:15001 is the same in every pod, and
/// serving another pod's under this pod's identity would give that pod's connections
/// this one's.
async fn in_namespace(netns: &Netns, listeners: [&TcpListener; 3]) -> Result<(), String> {
    let here = netns
        .run(crate::netns::listening_inodes)
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
/// from a node-proxy replacing this one is answered with `admin` (a duplicate of the
/// admin listener) and every pod; this process keeps serving (both accept on the same
/// sockets) until `takeover_done` on that connection, then cancels `shutdown` and
/// drains. A takeover connection that ends without it leaves this process serving.
pub async fn serve_handoff(
    listener: HandoffListener,
    pods: Arc<Pods>,
    admin: Option<OwnedFd>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let admin = admin.map(Arc::new);
    loop {
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
        let admin = admin.clone();
        tokio::spawn(async move {
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
                    Ok(Some(Request::Add { pod, netns })) => pods.add(pod, netns).await,
                    Ok(Some(Request::Remove { uid })) => pods.remove(&uid).await,
                    Ok(Some(Request::SnapshotStart)) => pods.snapshot_start(),
                    Ok(Some(Request::SnapshotEnd)) => pods.snapshot_end().await,
                    Ok(Some(Request::TakeoverDone)) if handover.armed => {
                        handover.armed = false;
                        let _ = conn.reply(Ok(())).await;
                        info!("a new node-proxy serves this node's pods; draining");
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
                        let admin = admin.as_ref().map(|a| a.as_fd());
                        match conn.hand_over(admin, &borrowed).await {
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
