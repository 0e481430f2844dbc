//! Outbound: connections the application makes, captured on 127.0.0.1:15001.
//!
//! The original destination (SO_ORIGINAL_DST) is looked up in the model: a service
//! address picks one of the endpoints the controller computed, round-robin; a pod
//! address is that pod. Meshed
//! destinations are reached over HBONE from this pod's own IP with its own identity;
//! anything else passes through as plain TCP from the pod's namespace.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use tokio::net::TcpStream;
use tracing::{debug, info};
use tunnel::hbone::{ConnectRequest, Progress};

use crate::metrics::{Close, ConnLabels};
use crate::proxy::{Ctx, Pod};
use runtime::netns::{local_addr, original_dst, peer_addr};

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
    /// Over HBONE to the waypoint of the service, which picks the endpoint.
    Waypoint {
        /// The waypoint pod's IP.
        ip: std::net::IpAddr,
        /// The waypoint pod's name.
        pod: String,
        /// The waypoint's identity: its namespace and service account.
        namespace: String,
        /// Its service account.
        service_account: String,
        /// The service addressed (`namespace/name`), whose address is sent as the target.
        service: String,
        /// The waypoint, `namespace/name`.
        waypoint: String,
    },
    /// The service names a waypoint that is missing or has no ready pod: refused
    /// rather than sent around the policies the waypoint enforces.
    NoWaypoint {
        /// The service.
        service: String,
        /// The waypoint it names.
        waypoint: String,
    },
}

/// Most endpoints one captured connection tries: a service's next endpoint is tried when
/// one cannot be connected to (its pod just died, its node-proxy is restarting), as long
/// as nothing of the application's was sent.
const MAX_ATTEMPTS: usize = 3;

/// Decides where a connection to `dst` goes, passing over the endpoints in `failed`
/// (addresses this connection could not reach).
pub fn route(ctx: &Ctx, dst: SocketAddr, failed: &[IpAddr]) -> Route {
    let model = ctx.model.load();
    let (workload, target, service) = match model.service_by_vip(dst) {
        Some((svc, port)) => {
            let name = svc.object_name();
            if let Some(wp) = &svc.waypoint {
                let pods = model
                    .waypoint(wp)
                    .map(|w| model.endpoints(&w.service, tunnel::hbone::PORT))
                    .unwrap_or_default();
                let chosen = pick(ctx, wp, pods, failed)
                    .and_then(|t| t.workload.as_ref().map(|w| (t.addr.ip(), w)));
                return match chosen {
                    Some((ip, w)) => Route::Waypoint {
                        ip,
                        pod: w.name.clone(),
                        namespace: w.namespace.clone(),
                        service_account: w.service_account.clone(),
                        service: name.to_string(),
                        waypoint: wp.to_string(),
                    },
                    None => Route::NoWaypoint {
                        service: name.to_string(),
                        waypoint: wp.to_string(),
                    },
                };
            }
            let targets = model.endpoints_like(&name, port.port, dst.ip());
            let Some(t) = pick(ctx, &name, targets, failed) else {
                return Route::NoEndpoints {
                    service: name.to_string(),
                };
            };
            (t.workload.clone(), t.addr, Some(name.to_string()))
        }
        None => (model.workload_by_ip(dst.ip()).cloned(), dst, None),
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

/// The next of `service`'s `endpoints`, round-robin, passing over those in `failed`.
fn pick<'a>(
    ctx: &Ctx,
    service: &api::ObjectName,
    endpoints: &'a [api::Target],
    failed: &[IpAddr],
) -> Option<&'a api::Target> {
    if endpoints.is_empty() {
        return None;
    }
    let start = ctx.next_endpoint(service, endpoints.len());
    (0..endpoints.len())
        .map(|i| &endpoints[(start + i) % endpoints.len()])
        .find(|t| !failed.contains(&t.addr.ip()))
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
    let Some((upstream, labels, destination)) = Box::pin(connect(&ctx, &pod, &app)).await else {
        reset(&app);
        return;
    };
    let source = peer_addr(&app).unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    let guard = ctx.metrics.open(labels, source, destination);
    let copied = match upstream {
        Upstream::Tunnel(stream, early) => {
            let progress = guard.tunnel(true);
            progress.tcp_to_stream(early);
            stream.copy_bidirectional_counted(app, &progress).await
        }
        Upstream::Plain(upstream) => crate::relay::relay(app, upstream, &guard.tunnel(true)).await,
    };
    if let Err(e) = &copied {
        debug!("outbound connection ended: {e}");
    }
    guard.finish(Close::of(&copied));
}

/// Decides where `app`'s connection goes and connects there; `None` when it cannot be
/// served (logged here).
async fn connect(
    ctx: &Ctx,
    pod: &Pod,
    app: &TcpStream,
) -> Option<(Upstream, ConnLabels, SocketAddr)> {
    let dst = match original_dst(app) {
        Ok(d) => d,
        Err(e) => {
            debug!("outbound connection without original destination: {e}");
            return None;
        }
    };
    // Not redirected (someone connected to 15001 itself): relaying it would connect
    // node-proxy to its own listener, over and over.
    if local_addr(app).ok() == Some(dst) {
        debug!(%dst, "connection made to the outbound port itself; refused");
        return None;
    }
    let mut failed: Vec<IpAddr> = Vec::new();
    loop {
        let route = route(ctx, dst, &failed);
        let Some(endpoint) = route.endpoint() else {
            if !failed.is_empty() {
                // Every endpoint was tried: not "no ready endpoint", as the model has.
                info!(%dst, "no endpoint could be reached ({} tried); refusing the connection", failed.len());
                return None;
            }
            return connect_once(ctx, pod, app, dst, route).await.ok();
        };
        match connect_once(ctx, pod, app, dst, route).await {
            Ok(connected) => return Some(connected),
            Err(Retry::Another) if failed.len() + 1 < MAX_ATTEMPTS => {
                info!(%dst, %endpoint, "trying another endpoint");
                failed.push(endpoint);
            }
            Err(_) => return None,
        }
    }
}

/// Why one attempt did not connect.
enum Retry {
    /// The endpoint could not be reached and nothing was sent: another may be tried.
    Another,
    /// Final (refused by policy or by the model, or failed after sending).
    No,
}

impl Route {
    /// The endpoint chosen among a service's (or its waypoint's), which another could
    /// replace when it cannot be reached; `None` for a pod addressed directly.
    fn endpoint(&self) -> Option<IpAddr> {
        match self {
            Route::Hbone {
                target,
                service: Some(_),
                ..
            } => Some(target.ip()),
            Route::Waypoint { ip, .. } => Some(*ip),
            _ => None,
        }
    }
}

/// Connects `app`'s connection along `route` (logged here when it cannot).
async fn connect_once(
    ctx: &Ctx,
    pod: &Pod,
    app: &TcpStream,
    dst: SocketAddr,
    route: Route,
) -> Result<(Upstream, ConnLabels, SocketAddr), Retry> {
    let mut labels = ConnLabels {
        direction: "outbound",
        source_workload: pod.info.name.clone(),
        source_namespace: pod.info.namespace.clone(),
        source_principal: pod.tls.identity().to_string(),
        ..ConnLabels::default()
    };
    match route {
        Route::Hbone {
            target,
            namespace,
            name,
            service_account,
            service,
        } => {
            labels.destination_workload = name.clone();
            labels.destination_service = service.unwrap_or_default();
            let to = format!("{namespace}/{name}");
            tunnel(
                ctx,
                pod,
                app,
                dst,
                &to,
                &namespace,
                &service_account,
                target.ip(),
                target,
                labels,
            )
            .await
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
                Ok(s) => Ok((Upstream::Plain(s), labels, dst)),
                Err(e) => {
                    debug!(%target, "passthrough connect failed: {e}");
                    Err(Retry::No)
                }
            }
        }
        Route::Waypoint {
            ip,
            pod: waypoint_pod,
            namespace,
            service_account,
            service,
            waypoint,
        } => {
            labels.destination_service = service;
            labels.destination_workload = waypoint_pod;
            let to = format!("waypoint {waypoint}");
            tunnel(
                ctx,
                pod,
                app,
                dst,
                &to,
                &namespace,
                &service_account,
                ip,
                dst,
                labels,
            )
            .await
        }
        Route::NoWaypoint { service, waypoint } => {
            info!(%dst, "service {service} uses waypoint {waypoint}, which has no ready pod; refusing the connection");
            Err(Retry::No)
        }
        Route::NoEndpoints { service } => {
            info!(%dst, "service {service} has no ready endpoint; refusing the connection");
            Err(Retry::No)
        }
    }
}

/// Opens the HBONE stream for `app`'s connection to `dst`: to `hbone_ip`:15008, which
/// must prove `namespace`/`service_account`, with `target` as the CONNECT authority.
/// `to` names the destination in logs.
#[allow(clippy::too_many_arguments)]
async fn tunnel(
    ctx: &Ctx,
    pod: &Pod,
    app: &TcpStream,
    dst: SocketAddr,
    to: &str,
    namespace: &str,
    service_account: &str,
    hbone_ip: std::net::IpAddr,
    target: SocketAddr,
    mut labels: ConnLabels,
) -> Result<(Upstream, ConnLabels, SocketAddr), Retry> {
    let dst_id = match ctx.identity(namespace, service_account) {
        Ok(id) => id,
        Err(e) => {
            info!(%dst, "cannot reach {to}: {e}");
            return Err(Retry::No);
        }
    };
    labels.destination_namespace = namespace.to_owned();
    labels.destination_principal = dst_id.to_string();
    labels.connection_security_policy = "mutual_tls";
    let request = ConnectRequest {
        src: pod.tls.clone(),
        src_addr: runtime::netns::same_family(&pod.info.ips, hbone_ip),
        socket: Some(pod.sockets()),
        dst: dst_id,
        dst_addr: SocketAddr::new(hbone_ip, tunnel::hbone::PORT),
        target,
        forwarded_for: peer_addr(app).ok(),
        traceparent: None,
        on_behalf_of: None,
    };
    match ctx.pool.connect_sending(&request, app).await {
        Ok((s, early)) => Ok((Upstream::Tunnel(s, early), labels, dst)),
        Err(e) => {
            info!(%dst, %target, "connection to {to} failed: {e}");
            Err(match e.before_stream() {
                true => Retry::Another,
                false => Retry::No,
            })
        }
    }
}

/// Closes with RST, so the application sees "connection refused/reset" rather than a
/// clean close that looks like an empty answer.
pub fn reset(stream: &TcpStream) {
    let _ = socket2::SockRef::from(stream).set_linger(Some(std::time::Duration::ZERO));
}
