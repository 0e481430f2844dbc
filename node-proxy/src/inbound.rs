//! Inbound: HBONE streams on 15008 and plaintext connections captured on 15006, both
//! checked against authorization policy and delivered to the application with the
//! client's own source address.
//!
//! HBONE binds identity to address: the certificate the peer proved must belong to the
//! workload that owns the connection's source IP, so a certificate stolen from one pod
//! is useless from another. Plaintext from outside the mesh is allowed unless the pod's
//! namespace is in STRICT mode. Allowed connections stay registered with the pod, so a
//! policy change that no longer allows one closes it ([`crate::authz`]).

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpStream;
use tracing::{debug, info, warn};
use tunnel::hbone::{Handler, InboundRequest, Refusal};

use crate::authz::{self, Peer};
use crate::metrics::{Close, ConnLabels, PolicyLabels};
use crate::outbound::reset;
use crate::proxy::{Ctx, Pod};
use runtime::netns::{local_addr, original_dst, peer_addr};

/// The HBONE stream handler of one pod.
pub struct Hbone {
    /// Shared state.
    pub ctx: Arc<Ctx>,
    /// The pod the streams are for.
    pub pod: Arc<Pod>,
}

/// How long the connection to the application may take. Shorter than the client side's
/// wait for a CONNECT answer (10 s), so a full accept queue is answered with a 503
/// instead of holding the stream until the kernel gives up (~2 minutes).
const APP_CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Connects to the application at `target` from `client`'s address.
async fn connect_app(
    pod: &Pod,
    client: SocketAddr,
    target: SocketAddr,
) -> std::io::Result<TcpStream> {
    // The application sees the client's address. It is of the target's family: the
    // HBONE server takes only its own address as a target, and plaintext is redirected
    // within its family.
    let socket = pod.netns.transparent_socket(client)?;
    tokio::time::timeout(APP_CONNECT_TIMEOUT, socket.connect(target))
        .await
        .map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no answer from {target} within {APP_CONNECT_TIMEOUT:?}"),
            )
        })?
}

/// Logs and counts a connection authorization refused.
fn denied(ctx: &Ctx, pod: &Pod, peer: &Peer, why: &authz::Refused, when: &'static str) {
    let source = peer.source;
    let principal = peer
        .identity
        .as_ref()
        .map_or_else(|| "plaintext".to_owned(), ToString::to_string);
    match when {
        "connect" => {
            info!(pod = %pod.name(), %source, %principal, port = peer.port, policy = %why.policy(), "connection denied: {why}")
        }
        _ => {
            info!(pod = %pod.name(), %source, %principal, port = peer.port, policy = %why.policy(), "open connection closed: {why}")
        }
    }
    ctx.metrics
        .denied
        .get_or_create(&PolicyLabels {
            policy: why.policy(),
            reason: why.reason(),
            when,
        })
        .inc();
}

/// An accepted HBONE stream and what lives as long as it.
struct Accepted {
    stream: tunnel::hbone::H2Stream,
    app: TcpStream,
    guard: crate::metrics::ConnGuard,
    registered: authz::Registered,
    target: SocketAddr,
    _permits: (
        tokio::sync::OwnedSemaphorePermit,
        tokio::sync::OwnedSemaphorePermit,
    ),
}

impl Handler for Hbone {
    /// Two phases, like outbound: checking and connecting (boxed, freed once the
    /// stream is accepted), then copying. Only the copy phase lives as long as the
    /// connection, which keeps an idle connection's memory small; the request is moved
    /// into the first phase at once, so the second does not keep a copy of it.
    fn handle(
        self: Arc<Self>,
        request: InboundRequest,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let accepting = Box::pin(async move { self.accept(request).await });
        async move {
            let Some(Accepted {
                stream,
                app,
                guard,
                registered,
                target,
                _permits,
            }) = accepting.await
            else {
                return;
            };
            // The TCP side is the destination: what the stream delivers is what the
            // client sent.
            let progress = guard.tunnel(false);
            let close = tokio::select! {
                copied = stream.copy_bidirectional_counted(app, &progress) => {
                    if let Err(e) = &copied {
                        debug!(%target, "inbound stream ended: {e}");
                    }
                    Close::of(&copied)
                }
                _ = registered.closed() => Close::Denied,
            };
            guard.finish(close);
        }
    }
}

impl Hbone {
    /// Checks the stream's peer and policy, connects to the application and accepts
    /// the stream; `None` when it was refused (answered and logged here).
    async fn accept(&self, request: InboundRequest) -> Option<Accepted> {
        let (ctx, pod) = (&self.ctx, &self.pod);
        let src_ip = request.peer_addr.ip();
        let peer = request.peer.clone();
        // The identity must be the one of the workload at the source address.
        let owner = {
            let model = ctx.model.load();
            model.workload_by_ip(src_ip).map(|w| {
                (
                    w.name.clone(),
                    w.namespace.clone(),
                    w.service_account.clone(),
                )
            })
        };
        let expected = owner
            .as_ref()
            .and_then(|(_, ns, sa)| ctx.identity(ns, sa).ok());
        if expected.as_ref() != Some(&peer) {
            let owner_text = match &owner {
                Some((name, ns, _)) => format!("pod {ns}/{name}"),
                None => "no workload in the mesh model".to_owned(),
            };
            warn!(
                pod = %pod.name(), %peer, source = %src_ip,
                "HBONE connection refused: peer proved {peer} but its source address {src_ip} belongs to {owner_text}"
            );
            ctx.metrics.refuse("identity_mismatch");
            request.refuse(Refusal::Denied);
            return None;
        }
        let Some(permits) = pod.stream_permits(ctx) else {
            ctx.metrics.refuse("limit");
            request.refuse_because(Refusal::Unreachable, Some("connection limit reached"));
            return None;
        };
        let client = SocketAddr::new(src_ip, request.peer_addr.port());
        let target = request.target;
        // A waypoint forwards for its clients: authorization and metrics see the client
        // it names, which it proved to the waypoint. Anyone else's claim is ignored.
        let behalf = match &request.on_behalf_of {
            Some(claim) if ctx.model.load().is_waypoint_ip(src_ip) => {
                match claim.parse::<tunnel::identity::Identity>() {
                    Ok(id) => Some(id),
                    Err(e) => {
                        warn!(pod = %pod.name(), %peer, "waypoint sent an invalid source principal: {e}");
                        ctx.metrics.refuse("bad_source_principal");
                        request.refuse(Refusal::Denied);
                        return None;
                    }
                }
            }
            _ => None,
        };
        let via_waypoint = behalf.is_some();
        let who = Peer {
            identity: Some(behalf.unwrap_or_else(|| peer.clone())),
            source: client,
            port: target.port(),
            via_waypoint,
        };
        let principal = who
            .identity
            .as_ref()
            .map_or_else(String::new, ToString::to_string);
        let decision = authz::decide(&ctx.model.load(), &pod.info.uid, &pod.info.namespace, &who);
        if let Err(why) = decision {
            denied(ctx, pod, &who, &why, "connect");
            ctx.metrics.refuse("denied");
            request.refuse(Refusal::Denied);
            return None;
        }
        let registered = pod.conns.register(who);
        let (src_name, src_ns) = owner.map(|(n, ns, _)| (n, ns)).unwrap_or_default();
        let app = match connect_app(pod, client, target).await {
            Ok(s) => s,
            Err(e) => {
                request.refuse_because(Refusal::Unreachable, Some(&e.to_string()));
                return None;
            }
        };
        let stream = request.accept().ok()?;
        let guard = ctx.metrics.open(
            ConnLabels {
                direction: "inbound",
                source_workload: src_name,
                source_namespace: src_ns,
                source_principal: principal,
                destination_workload: pod.info.name.clone(),
                destination_namespace: pod.info.namespace.clone(),
                destination_principal: pod.tls.identity().to_string(),
                destination_service: String::new(),
                connection_security_policy: "mutual_tls",
            },
            client,
            target,
        );
        Some(Accepted {
            stream,
            app,
            guard,
            registered,
            target,
            _permits: permits,
        })
    }
}

/// Serves one plaintext connection captured on 15006.
pub async fn serve_plaintext(ctx: Arc<Ctx>, pod: Arc<Pod>, client: TcpStream) {
    let (Ok(target), Ok(src)) = (original_dst(&client), peer_addr(&client)) else {
        return;
    };
    // Not redirected (made to 15006 itself): delivering it would loop back here. Nor
    // is anything delivered to the proxy's own ports, whatever the rules let through.
    if local_addr(&client).ok() == Some(target)
        || tunnel::hbone::PROXY_PORTS.contains(&target.port())
    {
        reset(&client);
        return;
    }
    let _ = client.set_nodelay(true);
    let who = Peer {
        identity: None,
        source: src,
        port: target.port(),
        via_waypoint: false,
    };
    if let Err(why) = authz::decide(&ctx.model.load(), &pod.info.uid, &pod.info.namespace, &who) {
        denied(&ctx, &pod, &who, &why, "connect");
        ctx.metrics.refuse(match why {
            authz::Refused::StrictMtls => "strict_mtls",
            authz::Refused::Policy(_) => "denied",
        });
        reset(&client);
        return;
    }
    let registered = pod.conns.register(who);
    let (src_name, src_ns) = ctx
        .model
        .load()
        .workload_by_ip(src.ip())
        .map(|w| (w.name.clone(), w.namespace.clone()))
        .unwrap_or_default();
    let app = match connect_app(&pod, src, target).await {
        Ok(s) => s,
        Err(e) => {
            debug!(%target, "application connect failed: {e}");
            reset(&client);
            return;
        }
    };
    let guard = ctx.metrics.open(
        ConnLabels {
            direction: "inbound",
            source_workload: src_name,
            source_namespace: src_ns,
            source_principal: String::new(),
            destination_workload: pod.info.name.clone(),
            destination_namespace: pod.info.namespace.clone(),
            destination_principal: pod.tls.identity().to_string(),
            destination_service: String::new(),
            connection_security_policy: "none",
        },
        src,
        target,
    );
    // The client is the source.
    let progress = guard.tunnel(true);
    let close = tokio::select! {
        relayed = crate::relay::relay(client, app, &progress) => {
            if let Err(e) = &relayed {
                debug!(%target, "inbound plaintext connection ended: {e}");
            }
            Close::of(&relayed)
        }
        _ = registered.closed() => Close::Denied,
    };
    guard.finish(close);
}

/// Re-checks every open inbound connection of `pods` against the current model and
/// closes those it no longer allows.
pub fn recheck(ctx: &Ctx, pods: &[Arc<Pod>]) {
    let model = ctx.model.load();
    for pod in pods {
        for (peer, why) in pod
            .conns
            .recheck(&model, &pod.info.uid, &pod.info.namespace)
        {
            denied(ctx, pod, &peer, &why, "recheck");
        }
    }
}
