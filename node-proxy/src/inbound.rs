//! Inbound: HBONE streams on 15008 and plaintext connections captured on 15006, both
//! delivered to the application with the client's own source address.
//!
//! HBONE binds identity to address: the certificate the peer proved must belong to the
//! workload that owns the connection's source IP, so a certificate stolen from one pod
//! is useless from another. Plaintext from outside the mesh is allowed unless the pod's
//! namespace is in STRICT mode.

use std::net::SocketAddr;
use std::sync::Arc;

use api::MtlsMode;
use tokio::net::TcpStream;
use tracing::{debug, info, warn};
use tunnel::hbone::{Handler, InboundRequest, Refusal};

use crate::metrics::ConnLabels;
use crate::netns::original_dst;
use crate::outbound::reset;
use crate::proxy::{Ctx, Pod};

/// The HBONE stream handler of one pod.
pub struct Hbone {
    /// Shared state.
    pub ctx: Arc<Ctx>,
    /// The pod the streams are for.
    pub pod: Arc<Pod>,
}

/// Connects to the application at `target` from `client`'s address.
/// How long the connection to the application may take. Shorter than the client side's
/// wait for a CONNECT answer (10 s), so a full accept queue is answered with a 503
/// instead of holding the stream until the kernel gives up (~2 minutes).
const APP_CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

async fn connect_app(
    pod: &Pod,
    client: SocketAddr,
    target: SocketAddr,
) -> std::io::Result<TcpStream> {
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

impl Handler for Hbone {
    async fn handle(&self, request: InboundRequest) {
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
            return request.refuse(Refusal::Denied);
        }
        let (src_name, src_ns) = owner.map(|(n, ns, _)| (n, ns)).unwrap_or_default();
        let target = request.target;
        let client = SocketAddr::new(src_ip, request.peer_addr.port());
        let app = match Box::pin(connect_app(pod, client, target)).await {
            Ok(s) => s,
            Err(e) => {
                return request.refuse_because(Refusal::Unreachable, Some(&e.to_string()));
            }
        };
        let Ok(stream) = request.accept() else {
            return;
        };
        let guard = ctx.metrics.open(ConnLabels {
            direction: "inbound",
            source_workload: src_name,
            source_namespace: src_ns,
            source_principal: peer.to_string(),
            destination_workload: pod.info.name.clone(),
            destination_namespace: pod.info.namespace.clone(),
            destination_principal: pod.tls.identity().to_string(),
            destination_service: String::new(),
            connection_security_policy: "mutual_tls",
        });
        // The TCP side is the destination: what the stream delivers is what the client sent.
        if let Err(e) = stream
            .copy_bidirectional_counted(app, &guard.tunnel(false))
            .await
        {
            debug!(%target, "inbound stream ended: {e}");
        }
    }
}

/// Serves one plaintext connection captured on 15006.
pub async fn serve_plaintext(ctx: Arc<Ctx>, pod: Arc<Pod>, client: TcpStream) {
    let (Ok(target), Ok(src)) = (original_dst(&client), client.peer_addr()) else {
        return;
    };
    let _ = client.set_nodelay(true);
    let strict = ctx
        .model
        .load()
        .namespace(&pod.info.namespace)
        .is_some_and(|ns| ns.mtls_mode == MtlsMode::Strict);
    if strict {
        info!(
            pod = %pod.name(), source = %src, %target,
            "plaintext connection refused: namespace {} requires mTLS (STRICT)", pod.info.namespace
        );
        ctx.metrics.refuse("strict_mtls");
        reset(&client);
        return;
    }
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
    let guard = ctx.metrics.open(ConnLabels {
        direction: "inbound",
        source_workload: src_name,
        source_namespace: src_ns,
        source_principal: String::new(),
        destination_workload: pod.info.name.clone(),
        destination_namespace: pod.info.namespace.clone(),
        destination_principal: pod.tls.identity().to_string(),
        destination_service: String::new(),
        connection_security_policy: "none",
    });
    if let Err(e) = crate::relay::relay(client, app, guard.sent(), guard.received()).await {
        debug!(%target, "inbound plaintext connection ended: {e}");
    }
}
