//! Outbound: connections the application makes, captured on 127.0.0.1:15001.
//!
//! The original destination (SO_ORIGINAL_DST) is looked up in the model: a service
//! address picks one ready endpoint round-robin; a pod address is that pod. Meshed
//! destinations are reached over HBONE from this pod's own IP with its own identity;
//! anything else passes through as plain TCP from the pod's namespace.

use std::net::SocketAddr;
use std::sync::Arc;

use api::Workload;
use tokio::net::TcpStream;
use tracing::{debug, info};
use tunnel::hbone::{ConnectRequest, Progress};

use crate::metrics::ConnLabels;
use crate::netns::original_dst;
use crate::proxy::{Ctx, Pod};

/// Where a captured connection goes.
#[derive(Debug, PartialEq, Eq)]
pub enum Route {
    /// Over HBONE to a meshed workload.
    Hbone {
        /// The chosen workload's IP and port.
        target: SocketAddr,
        /// Its namespace.
        namespace: String,
        /// Its name.
        name: String,
        /// Its service account.
        service_account: String,
        /// The service addressed, as `namespace/name`.
        service: Option<String>,
    },
    /// Plain TCP, untouched.
    Passthrough {
        /// Where to.
        target: SocketAddr,
        /// The service addressed, as `namespace/name`.
        service: Option<String>,
        /// The workload, when the model knows it.
        workload: Option<(String, String)>,
    },
    /// A service with no ready endpoint.
    NoEndpoints {
        /// The service.
        service: String,
    },
}

/// Decides where a connection to `dst` goes.
pub fn route(ctx: &Ctx, dst: SocketAddr) -> Route {
    let model = ctx.model.load();
    let (workload, target, service): (Option<&Workload>, SocketAddr, Option<String>) =
        match model.service_by_vip(dst) {
            Some((svc, port)) => {
                let name = format!("{}/{}", svc.namespace, svc.name);
                let endpoints: Vec<&Workload> = model.endpoints(svc).collect();
                if endpoints.is_empty() {
                    return Route::NoEndpoints { service: name };
                }
                let wl = endpoints[ctx.next_endpoint(&name, endpoints.len())];
                let Some(ip) = wl.ips.first() else {
                    return Route::NoEndpoints { service: name };
                };
                (Some(wl), SocketAddr::new(*ip, port.target_port), Some(name))
            }
            None => (model.workload_by_ip(dst.ip()), dst, None),
        };
    match workload {
        Some(wl) if wl.enrolled => Route::Hbone {
            target,
            namespace: wl.namespace.clone(),
            name: wl.name.clone(),
            service_account: wl.service_account.clone(),
            service,
        },
        other => Route::Passthrough {
            target,
            service,
            workload: other.map(|w| (w.namespace.clone(), w.name.clone())),
        },
    }
}

/// What a captured connection was connected to.
enum Upstream {
    /// An HBONE stream, and how many bytes of the application's went on it before the
    /// CONNECT was answered.
    Tunnel(tunnel::hbone::H2Stream, u64),
    /// A plain TCP connection.
    Plain(TcpStream),
}

/// Serves one captured outbound connection.
///
/// Two phases: deciding and connecting (boxed, freed once connected), then copying. Only
/// the copy phase lives as long as the connection, which keeps an idle connection's
/// memory small.
pub async fn serve(ctx: Arc<Ctx>, pod: Arc<Pod>, app: TcpStream) {
    let _ = app.set_nodelay(true);
    let Some((upstream, labels)) = Box::pin(connect(&ctx, &pod, &app)).await else {
        reset(&app);
        return;
    };
    let guard = ctx.metrics.open(labels);
    let copied = match upstream {
        Upstream::Tunnel(stream, early) => {
            let progress = guard.tunnel(true);
            progress.tcp_to_stream(early);
            stream.copy_bidirectional_counted(app, &progress).await
        }
        Upstream::Plain(upstream) => {
            crate::relay::relay(app, upstream, guard.sent(), guard.received()).await
        }
    };
    if let Err(e) = copied {
        debug!("outbound connection ended: {e}");
    }
}

/// Decides where `app`'s connection goes and connects there; `None` when it cannot be
/// served (logged here).
async fn connect(ctx: &Ctx, pod: &Pod, app: &TcpStream) -> Option<(Upstream, ConnLabels)> {
    let dst = match original_dst(app) {
        Ok(d) => d,
        Err(e) => {
            debug!("outbound connection without original destination: {e}");
            return None;
        }
    };
    let mut labels = ConnLabels {
        direction: "outbound",
        source_workload: pod.info.name.clone(),
        source_namespace: pod.info.namespace.clone(),
        source_principal: pod.tls.identity().to_string(),
        ..ConnLabels::default()
    };
    match route(ctx, dst) {
        Route::Hbone {
            target,
            namespace,
            name,
            service_account,
            service,
        } => {
            let dst_id = match ctx.identity(&namespace, &service_account) {
                Ok(id) => id,
                Err(e) => {
                    info!(%dst, "cannot reach {namespace}/{name}: {e}");
                    return None;
                }
            };
            labels.destination_workload = name;
            labels.destination_namespace = namespace;
            labels.destination_principal = dst_id.to_string();
            labels.destination_service = service.unwrap_or_default();
            labels.connection_security_policy = "mutual_tls";
            let request = ConnectRequest {
                src: pod.tls.clone(),
                src_addr: Some(pod.ip),
                socket: Some(pod.sockets()),
                dst: dst_id,
                dst_addr: SocketAddr::new(target.ip(), tunnel::hbone::PORT),
                target,
                forwarded_for: app.peer_addr().ok(),
                traceparent: None,
            };
            match ctx.pool.connect_sending(&request, app).await {
                Ok((s, early)) => Some((Upstream::Tunnel(s, early), labels)),
                Err(e) => {
                    info!(%dst, %target, "outbound connection failed: {e}");
                    None
                }
            }
        }
        Route::Passthrough {
            target,
            service,
            workload,
        } => {
            if let Some((ns, name)) = workload {
                labels.destination_namespace = ns;
                labels.destination_workload = name;
            }
            labels.destination_service = service.unwrap_or_default();
            labels.connection_security_policy = "none";
            let upstream = async { pod.netns.outbound_socket(target)?.connect(target).await };
            match upstream.await {
                Ok(s) => Some((Upstream::Plain(s), labels)),
                Err(e) => {
                    debug!(%target, "passthrough connect failed: {e}");
                    None
                }
            }
        }
        Route::NoEndpoints { service } => {
            info!(%dst, "service {service} has no ready endpoint; refusing the connection");
            None
        }
    }
}

/// Closes with RST, so the application sees "connection refused/reset" rather than a
/// clean close that looks like an empty answer.
pub fn reset(stream: &TcpStream) {
    let _ = socket2::SockRef::from(stream).set_linger(Some(std::time::Duration::ZERO));
}
