//! The waypoint's data path: HBONE streams in, each one a client connection to a
//! service the waypoint fronts; HTTP requests routed, filtered, authorized and sent to
//! an endpoint with retries and timeouts; anything else forwarded as TCP.
//!
//! ```text
//!  HBONE CONNECT(vip:port) from client node-proxy
//!    -> identity == owner of source IP, service uses this waypoint
//!    -> protocol: declared (appProtocol / port name) or sniffed (first bytes, 100 ms)
//!       HTTP: hyper server (h1 + h2) -> per request, against the compiled model
//!             (crate::target) the connection resolved its service port in:
//!             path normalised -> route select -> the stages of crate::stages
//!             (filters, split, admit, balance, L7 authz of the endpoint's workload
//!             (403), upstream, retry, timeouts)
//!             -> metrics (series cached per connection) + access log
//!       TCP:  endpoint of the service -> copy both ways
//! ```

use std::borrow::Cow;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use api::authz;
use api::{Model, ObjectName, Workload};
use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Request, Response, Version};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use opentelemetry::trace::{SpanId, TraceId};
use opentelemetry::KeyValue;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;
use tokio::io::AsyncReadExt;
use tracing::{debug, info, warn};
use tunnel::hbone::{Handler, InboundRequest, Refusal};
use tunnel::identity::Identity;

use crate::metrics::{AccessLog, Metrics, RequestLabels, ServiceLabels};
use crate::router::{RequestView, Selected};
use crate::stages::{Outcomes, Path, Refused};
use crate::target::{Compiled, Front, Target};
use crate::upstream::{Body, Upstreams};

pub use crate::stages::LIMITED_HEADER;

/// How long the first bytes of a connection to a port of unknown protocol are awaited
/// before it is taken for a server-speaks-first protocol and forwarded as TCP.
const SNIFF_WAIT: Duration = Duration::from_millis(100);
/// The longest a client of an HTTP service may wait before its first bytes, and an
/// HTTP/1.1 client may take to send a request head or to start the next one on a
/// kept-alive connection (hyper counts both): a client that sends nothing, or a byte a
/// second, holds its stream no longer than this. An HTTP/2 connection past its preface
/// may idle (that is normal); it is bound by the stream limit (`--max-streams`).
pub const REQUEST_HEAD_TIMEOUT: Duration = Duration::from_secs(30);
/// Mirrored requests in flight at once, over all routes; past it a copy is not sent
/// (and counted), so a slow mirror backend cannot pile up tasks, bodies and connections.
const MAX_MIRRORS: usize = 256;

/// Shared by every stream and request.
pub struct Waypoint {
    /// The Gateway this waypoint is.
    pub gateway: ObjectName,
    /// The SPIFFE trust domain.
    pub trust_domain: String,
    /// The current model.
    pub model: Arc<ArcSwap<Model>>,
    /// What the request path reads, compiled from it (by [`compile_on_change`]).
    pub compiled: Arc<ArcSwap<Compiled>>,
    /// Connections to endpoints.
    pub upstreams: Arc<Upstreams>,
    /// Metrics.
    pub metrics: Metrics,
    /// Spans.
    pub tracing: crate::trace::Tracing,
    /// Permits for mirrored requests in flight ([`MAX_MIRRORS`]).
    mirrors: Arc<tokio::sync::Semaphore>,
    /// Permits for the client streams served at once (`--max-streams`).
    streams: Arc<tokio::sync::Semaphore>,
}

/// Who a connection is from and what it is for.
#[derive(Debug)]
struct Conn {
    principal: String,
    /// `x-forwarded-for` for its requests: the client's IP.
    forwarded_for: Option<HeaderValue>,
    namespace: String,
    workload: String,
    addr: SocketAddr,
    /// The service addressed, `namespace/name`.
    name: ObjectName,
    port: u16,
    /// The series its last request was counted in.
    series: Mutex<Option<Series>>,
    /// Its service port as compiled, and the compilation it is from.
    front: Mutex<Option<(u64, Option<Arc<Front>>)>>,
}

/// A request series and what it was made for, so that a connection's requests with
/// the outcome of the one before (the common case) are counted without building and
/// hashing nine labels.
#[derive(Debug)]
struct Series {
    labels: RequestLabels,
    /// The workload that answered.
    endpoint: Option<Arc<Workload>>,
    requests: Counter,
    duration: Histogram,
}

impl Conn {
    /// Its service port in the current compiled model: looked up once per model
    /// version, not per request.
    fn front(&self, wp: &Waypoint) -> Option<Arc<Front>> {
        let compiled = wp.compiled.load();
        let mut cached = self.front.lock().expect("front lock");
        match &*cached {
            Some((generation, front)) if *generation == compiled.generation => front.clone(),
            _ => {
                let front = compiled.front(&self.name, self.port).cloned();
                *cached = Some((compiled.generation, front.clone()));
                front
            }
        }
    }

    /// Counts a request in `weft_requests_total` and `weft_request_duration_seconds`.
    fn count(&self, wp: &Waypoint, out: &Outcomes, status: u16, flags: &str, elapsed: Duration) {
        let endpoint = out.endpoint.as_ref().and_then(|t| t.workload.as_ref());
        let route = out.route.as_deref().unwrap_or("");
        let mut series = self.series.lock().expect("series lock");
        let same = series.as_ref().is_some_and(|s| {
            s.labels.response_code == status
                && s.labels.route == route
                && s.labels.response_flags == flags
                && match (&s.endpoint, endpoint) {
                    (None, None) => true,
                    (Some(a), Some(b)) => {
                        Arc::ptr_eq(a, b)
                            || (a.name == b.name
                                && a.namespace == b.namespace
                                && a.service_account == b.service_account)
                    }
                    _ => false,
                }
        });
        if !same {
            let labels = RequestLabels {
                source_workload: self.workload.clone(),
                source_namespace: self.namespace.clone(),
                source_principal: self.principal.clone(),
                destination_service: self.name.to_string(),
                destination_workload: endpoint.map(|w| w.name.clone()).unwrap_or_default(),
                destination_principal: endpoint
                    .map(|w| {
                        format!(
                            "spiffe://{}/ns/{}/sa/{}",
                            wp.trust_domain, w.namespace, w.service_account
                        )
                    })
                    .unwrap_or_default(),
                route: route.to_owned(),
                response_code: status,
                response_flags: flags.to_owned(),
            };
            let (requests, duration) = wp.metrics.series(&labels);
            *series = Some(Series {
                requests,
                duration,
                endpoint: endpoint.cloned(),
                labels,
            });
        }
        if let Some(s) = series.as_ref() {
            s.requests.inc();
            s.duration.observe(elapsed.as_secs_f64());
        }
    }
}

impl Waypoint {
    /// A waypoint serving `gateway`'s services.
    pub fn new(
        gateway: ObjectName,
        model: Arc<ArcSwap<Model>>,
        compiled: Arc<ArcSwap<Compiled>>,
        upstreams: Arc<Upstreams>,
        metrics: Metrics,
        tracing: crate::trace::Tracing,
        max_streams: usize,
    ) -> Arc<Self> {
        Arc::new(Waypoint {
            gateway,
            trust_domain: upstreams.trust_domain.clone(),
            model,
            compiled,
            upstreams,
            metrics,
            tracing,
            mirrors: Arc::new(tokio::sync::Semaphore::new(MAX_MIRRORS)),
            streams: Arc::new(tokio::sync::Semaphore::new(max_streams)),
        })
    }
}

/// The subscription's check: each new model compiled for `gateway` into `compiled`
/// (reusing what did not change) before it is acknowledged, off the request path; the
/// routes that cannot be compiled are refused in the ack.
pub fn compile_on_change(
    gateway: ObjectName,
    compiled: Arc<ArcSwap<Compiled>>,
) -> runtime::config_client::Check {
    Arc::new(move |model: &Arc<Model>| {
        let next = Compiled::compile(&gateway, model, &compiled.load());
        let problems = next.problems.clone();
        compiled.store(Arc::new(next));
        problems
    })
}

/// The HBONE handler.
pub struct Streams(pub Arc<Waypoint>);

impl Handler for Streams {
    /// Two phases: checking and accepting the stream (and sniffing its protocol), in a
    /// boxed future freed once it is done, then serving it. Only the second lives as
    /// long as the client's connection; the request is moved into the first at once,
    /// so the second does not keep a copy of it.
    fn handle(
        self: Arc<Self>,
        request: InboundRequest,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let accepting = Box::pin(async move { self.accept(request).await });
        async move {
            let Some(Accepted {
                wp,
                conn,
                io,
                http,
                permit,
            }) = accepting.await
            else {
                return;
            };
            if http {
                serve_http(wp, conn, io).await;
            } else {
                serve_tcp(wp, conn, io).await;
            }
            drop(permit);
        }
    }
}

/// A stream accepted and ready to serve.
struct Accepted {
    wp: Arc<Waypoint>,
    conn: Arc<Conn>,
    io: crate::prefixed::Prefixed,
    /// Served as HTTP, or forwarded as TCP.
    http: bool,
    /// Its place under the waypoint's stream limit, held while it is served.
    permit: tokio::sync::OwnedSemaphorePermit,
}

impl Streams {
    /// Checks the stream, accepts it and tells HTTP from other protocols: what to
    /// serve it with, or None once it has been refused.
    async fn accept(self: Arc<Self>, request: InboundRequest) -> Option<Accepted> {
        let wp = &self.0;
        let Ok(permit) = wp.streams.clone().try_acquire_owned() else {
            wp.metrics.streams_refused.inc();
            debug!(peer = %request.peer, "stream refused: the waypoint serves its maximum of streams (--max-streams)");
            request.refuse_because(
                Refusal::Unreachable,
                Some("the waypoint's stream limit is reached"),
            );
            return None;
        };
        let model = wp.model.load_full();
        let src_ip = request.peer_addr.ip();
        // As at a node-proxy: the identity must be the one of the pod at the source.
        let owner = model.workload_by_ip(src_ip).cloned();
        let expected = owner
            .as_ref()
            .and_then(|w| Identity::new(&wp.trust_domain, &w.namespace, &w.service_account).ok());
        if expected.as_ref() != Some(&request.peer) {
            warn!(peer = %request.peer, source = %src_ip, "HBONE connection refused: the peer's identity is not the one of the pod at its source address");
            request.refuse(Refusal::Denied);
            return None;
        }
        let Some((service, port)) = model.service_by_vip(request.target) else {
            request.refuse_because(
                Refusal::Unreachable,
                Some("the target is not a service address"),
            );
            return None;
        };
        if service.waypoint.as_ref() != Some(&wp.gateway) {
            request.refuse_because(
                Refusal::Denied,
                Some(&format!(
                    "service {} does not use waypoint {}",
                    service.object_name(),
                    wp.gateway
                )),
            );
            return None;
        }
        let addr = request
            .forwarded_for
            .filter(|a| a.ip() == src_ip)
            .unwrap_or(request.peer_addr);
        let conn = Arc::new(Conn {
            principal: request.peer.to_string(),
            forwarded_for: HeaderValue::try_from(addr.ip().to_string()).ok(),
            namespace: request.peer.namespace().to_owned(),
            workload: owner.map(|w| w.name.clone()).unwrap_or_default(),
            addr,
            name: service.object_name(),
            port: port.port,
            series: Mutex::new(None),
            front: Mutex::new(None),
        });
        let protocol = port.protocol;
        let Ok(mut stream) = request.accept() else {
            return None;
        };
        use api::AppProtocol as P;
        let (http, prefix) = match protocol {
            P::Http | P::Http2 | P::Grpc => {
                // hyper runs no timer until it has told HTTP/1.1 from HTTP/2: the first
                // bytes are waited for here, as long as a request head may take.
                let mut buf = vec![0u8; 1024];
                match tokio::time::timeout(REQUEST_HEAD_TIMEOUT, stream.read(&mut buf)).await {
                    Ok(Ok(n)) if n > 0 => {
                        buf.truncate(n);
                        (true, Bytes::from(buf))
                    }
                    Ok(_) => return None,
                    Err(_) => {
                        debug!(peer = %conn.principal, service = %conn.name, "HTTP stream closed: nothing sent within {REQUEST_HEAD_TIMEOUT:?}");
                        return None;
                    }
                }
            }
            P::Tcp => (false, Bytes::new()),
            P::Unknown => {
                let mut buf = vec![0u8; 1024];
                match tokio::time::timeout(SNIFF_WAIT, stream.read(&mut buf)).await {
                    Ok(Ok(0)) | Ok(Err(_)) => return None,
                    Ok(Ok(n)) => {
                        buf.truncate(n);
                        (looks_like_http(&buf), Bytes::from(buf))
                    }
                    // Nothing yet: a server-speaks-first protocol.
                    Err(_) => (false, Bytes::new()),
                }
            }
        };
        let io = crate::prefixed::Prefixed::new(prefix, stream);
        Some(Accepted {
            wp: wp.clone(),
            conn,
            io,
            http,
            permit,
        })
    }
}

/// Whether the first bytes of a connection are an HTTP/1 request line or the HTTP/2
/// preface.
fn looks_like_http(first: &[u8]) -> bool {
    if first.starts_with(b"PRI * HTTP/2.0") {
        return true;
    }
    let token: Vec<u8> = first.iter().take_while(|b| **b != b' ').copied().collect();
    const METHODS: [&[u8]; 9] = [
        b"GET", b"POST", b"PUT", b"DELETE", b"HEAD", b"OPTIONS", b"PATCH", b"CONNECT", b"TRACE",
    ];
    token.len() < first.len() && METHODS.contains(&token.as_slice())
}

async fn serve_tcp(wp: Arc<Waypoint>, conn: Arc<Conn>, mut io: crate::prefixed::Prefixed) {
    let name = &conn.name;
    let Some(front) = conn.front(&wp) else {
        info!(service = %name, "TCP connection dropped: the service is not served by this waypoint");
        return;
    };
    let endpoint = match front.default.split.backends.first().map(|b| &b.to) {
        Some(Ok(pool)) => crate::stages::balance(pool).map(|e| e.target.clone()),
        _ => Err(Refused::NotServed(name.to_string())),
    };
    let target = match endpoint {
        Ok(t) => t,
        Err(why) => {
            info!(service = %name, "TCP connection dropped: {:?}", why);
            return;
        }
    };
    wp.metrics
        .tcp
        .get_or_create(&ServiceLabels {
            destination_service: name.to_string(),
        })
        .inc();
    let mut upstream = match wp
        .upstreams
        .dial(&target, &conn.principal, Some(conn.addr))
        .await
    {
        Ok(u) => u,
        Err(e) => {
            info!(service = %name, "TCP connection dropped: {e}");
            return;
        }
    };
    if let Err(e) = tokio::io::copy_bidirectional(&mut io, &mut upstream).await {
        debug!(service = %name, "TCP connection ended: {e}");
    }
}

async fn serve_http(wp: Arc<Waypoint>, conn: Arc<Conn>, io: crate::prefixed::Prefixed) {
    let service = hyper::service::service_fn(move |req| {
        let (wp, conn) = (wp.clone(), conn.clone());
        async move { Ok::<_, Infallible>(handle(wp, conn, req).await) }
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(REQUEST_HEAD_TIMEOUT);
    if let Err(e) = builder
        .serve_connection_with_upgrades(TokioIo::new(io), service)
        .await
    {
        debug!("client connection ended: {e}");
    }
}

/// The request's attributes for L7 authorization.
#[derive(Debug)]
struct Attributes<'a> {
    path: &'a str,
    method: &'a str,
    headers: &'a HeaderMap,
}

impl authz::Request for Attributes<'_> {
    fn path(&self) -> &str {
        self.path
    }
    fn method(&self) -> &str {
        self.method
    }
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// W3C trace context when spans are not exported: the caller's trace id (or a new one)
/// and a new span id.
fn trace_context(parent: Option<(TraceId, SpanId)>) -> (TraceId, SpanId) {
    let trace = match parent {
        Some((t, _)) => t,
        None => TraceId::from(fastrand::u128(1..)),
    };
    (trace, SpanId::from(fastrand::u64(1..)))
}

async fn handle(wp: Arc<Waypoint>, conn: Arc<Conn>, mut req: Request<Incoming>) -> Response<Body> {
    let start = Instant::now();
    let started_at = SystemTime::now();
    let front = conn.front(&wp);
    let parent = req
        .headers()
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .and_then(crate::trace::parse_traceparent);
    let span = wp.tracing.start(&conn.name, parent);
    let (trace_id, span_id) = span.ids().unwrap_or_else(|| trace_context(parent));
    let method = req.method().clone();
    // Both share the request's buffers: cloning them copies no bytes.
    let uri = req.uri().clone();
    let host = req.headers().get(header::HOST).cloned();
    let version = req.version();
    let mut out = Outcomes::default();
    let response = match route(&conn, front.as_deref(), &mut req) {
        Err(refused) => {
            if let Some(f) = refused.flag() {
                out.flag(f);
            }
            refused.response()
        }
        Ok(target) => {
            // The request as the policies see it: before filters change it.
            let asked = Asked {
                model: wp.model.load_full(),
                conn: &conn,
                path: req.uri().path().to_owned(),
                method: req.method().clone(),
                headers: req.headers().clone(),
            };
            req.headers_mut().insert(
                "traceparent",
                HeaderValue::from_maybe_shared(Bytes::from(format!("00-{trace_id}-{span_id}-01")))
                    .unwrap_or_else(|_| HeaderValue::from_static("")),
            );
            let path = Path {
                upstream: &wp.upstreams,
                authz: Some(&asked),
                mirrors: &wp.mirrors,
                mirrors_skipped: &wp.metrics.mirrors_skipped,
                principal: &conn.principal,
                forwarded_for: conn.forwarded_for.as_ref(),
                listener_port: conn.port,
            };
            path.forward(&target, req, &mut out).await
        }
    };
    if let Some(policy) = &out.denied_by {
        info!(service = %conn.name, principal = %conn.principal, path = %uri.path(), %policy, "request denied");
    }
    let status = response.status().as_u16();
    let flags: Cow<'static, str> = match out.flags.is_empty() {
        true => Cow::Borrowed("-"),
        false => Cow::Owned(out.flags.join(",")),
    };
    let elapsed = start.elapsed();
    conn.count(&wp, &out, status, &flags, elapsed);
    let route = out.route.as_deref().unwrap_or("");
    if wp.metrics.log.admit() {
        AccessLog {
            start_time: crate::metrics::rfc3339(started_at),
            source_address: conn.addr,
            source_principal: &conn.principal,
            method: method.as_str(),
            authority: uri
                .authority()
                .map(|a| a.as_str())
                .or_else(|| host.as_ref().and_then(|h| h.to_str().ok()))
                .unwrap_or_default(),
            path: uri.path_and_query().map_or("/", |p| p.as_str()),
            protocol: match version {
                Version::HTTP_2 => "HTTP/2",
                Version::HTTP_10 => "HTTP/1.0",
                _ => "HTTP/1.1",
            },
            response_code: status,
            response_flags: &flags,
            route,
            upstream_service: out.backend.as_deref().unwrap_or(""),
            upstream_host: out.endpoint.as_ref().map(|t| t.addr),
            attempts: out.attempts,
            duration_ms: elapsed.as_secs_f64() * 1e3,
            trace_id,
            denied_by: out.denied_by.as_deref(),
        }
        .emit(&wp.metrics.log);
    }
    span.end(|| {
        vec![
            KeyValue::new("http.request.method", method.to_string()),
            KeyValue::new(
                "url.path",
                uri.path_and_query().map_or("/", |p| p.as_str()).to_owned(),
            ),
            KeyValue::new("http.response.status_code", i64::from(status)),
            KeyValue::new("weft.route", route.to_owned()),
            KeyValue::new("weft.response_flags", flags.into_owned()),
            KeyValue::new("source.principal", conn.principal.clone()),
        ]
    });
    response
}

/// The route stage and L7 authorization: the target a request takes, or why it is
/// refused before any backend is tried.
fn route(
    conn: &Conn,
    front: Option<&Front>,
    req: &mut Request<Incoming>,
) -> Result<Arc<Target>, Refused> {
    let Some(front) = front else {
        return Err(Refused::NotServed(conn.name.to_string()));
    };
    normalize_path(req)?;
    let selected = front.routes.select(
        &conn.namespace,
        &RequestView {
            method: req.method(),
            path: req.uri().path(),
            query: req.uri().query(),
            headers: req.headers(),
        },
    );
    match selected {
        Selected::NoMatch => Err(Refused::NoMatch),
        Selected::NoRoutes => Ok(front.default.clone()),
        Selected::Rule(t) => Ok(t.clone()),
    }
}

/// The request's path normalised in place ([`crate::normalize`]), before routes and
/// policy read it and as the backend gets it.
fn normalize_path<B>(req: &mut Request<B>) -> Result<(), Refused> {
    let std::borrow::Cow::Owned(normal) = crate::normalize::path(req.uri().path()) else {
        return Ok(());
    };
    let path_and_query = match req.uri().query() {
        Some(q) => format!("{normal}?{q}"),
        None => normal,
    };
    let mut parts = req.uri().clone().into_parts();
    let bad = |e: &dyn std::fmt::Display| Refused::BadRequest(format!("the request path: {e}"));
    parts.path_and_query =
        Some(http::uri::PathAndQuery::try_from(path_and_query).map_err(|e| bad(&e))?);
    *req.uri_mut() = http::Uri::from_parts(parts).map_err(|e| bad(&e))?;
    Ok(())
}

/// What a request asked, kept for each attempt's L7 authorization
/// ([`crate::stages::Authorize`]): checked against the policies of the workload each
/// attempt is sent to.
struct Asked<'a> {
    model: Arc<Model>,
    conn: &'a Conn,
    path: String,
    method: http::Method,
    headers: HeaderMap,
}

impl crate::stages::Authorize for Asked<'_> {
    fn check(&self, endpoint: &api::model::Target) -> Result<(), String> {
        let Some(workload) = &endpoint.workload else {
            // A plain address: no workload, no policy of its own.
            return Ok(());
        };
        let attrs = Attributes {
            path: &self.path,
            method: self.method.as_str(),
            headers: &self.headers,
        };
        let c = authz::Connection {
            principal: Some(&self.conn.principal),
            namespace: Some(&self.conn.namespace),
            port: endpoint.addr.port(),
            http: authz::Http::Request(&attrs),
        };
        authz::check(self.model.policies_for(workload).map(|p| &**p), &c)
            .map(drop)
            .map_err(|d| d.policy())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_is_told_from_other_protocols_by_its_first_bytes() {
        assert!(looks_like_http(b"GET / HTTP/1.1\r\n"));
        assert!(looks_like_http(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"));
        assert!(!looks_like_http(b"GET"));
        assert!(!looks_like_http(b"\x16\x03\x01\x02\x00"));
        assert!(!looks_like_http(b"SSH-2.0-OpenSSH_9.2\r\n"));
        assert!(!looks_like_http(b"PING\r\n"));
    }
}
