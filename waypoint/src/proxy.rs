//! The waypoint's data path: HBONE streams in, each one a client connection to a
//! service the waypoint fronts; HTTP requests routed, filtered, authorized and sent to
//! an endpoint with retries and timeouts; anything else forwarded as TCP.
//!
//! ```text
//!  HBONE CONNECT(vip:port) from client node-proxy
//!    -> identity == owner of source IP, service uses this waypoint
//!    -> protocol: declared (appProtocol / port name) or sniffed (first bytes, 100 ms)
//!       HTTP: hyper server (h1 + h2) -> per request:
//!             route select -> L7 authz (403) -> filters (redirect, headers, rewrite, mirror)
//!             -> [rate limit 429, fault] -> attempts { backend by weight (500 if invalid)
//!                -> endpoint (P2C/RR, ejected skipped; 503 none) -> limits (503)
//!                -> send (per-try timeout) -> retry if budget allows } (request timeout 504)
//!             -> response filters -> metrics + access log
//!       TCP:  endpoint of the service -> copy both ways
//! ```

use std::borrow::Cow;
use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use api::authz;
use api::model::Target;
use api::proto::{self, route_filter::Filter};
use api::{Model, ObjectName, Workload};
use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Body as _, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use opentelemetry::trace::{SpanId, TraceId};
use opentelemetry::KeyValue;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;
use tokio::io::AsyncReadExt;
use tracing::{debug, info, warn};
use tunnel::hbone::{Handler, InboundRequest, Refusal};
use tunnel::identity::Identity;

use crate::metrics::{AccessLog, Metrics, RequestLabels, ServiceLabels};
use crate::resilience::{Backend, Limited, Outcome};
use crate::router::{self, RequestView, Selected, Table};
use crate::upstream::{Body, BoxError, Upstreams};

/// Request bodies up to this size are buffered so that they can be retried or
/// mirrored; larger or unsized ones are streamed and tried once.
const MAX_BUFFERED_BODY: u64 = 64 * 1024;
/// How long the first bytes of a connection to a port of unknown protocol are awaited
/// before it is taken for a server-speaks-first protocol and forwarded as TCP.
const SNIFF_WAIT: Duration = Duration::from_millis(100);
/// Mirrored requests in flight at once, over all routes; past it a copy is not sent
/// (and counted), so a slow mirror backend cannot pile up tasks, bodies and connections.
const MAX_MIRRORS: usize = 256;
/// How long a mirrored request may take before it is abandoned.
const MIRROR_TIMEOUT: Duration = Duration::from_secs(15);
/// The first wait between attempts when a route's retry gives none.
const DEFAULT_BACKOFF: Duration = Duration::from_millis(25);
/// The response header that says why the waypoint refused a request itself.
pub const LIMITED_HEADER: &str = "weft-limited";

/// Shared by every stream and request.
pub struct Waypoint {
    /// The Gateway this waypoint is.
    pub gateway: ObjectName,
    /// The SPIFFE trust domain.
    pub trust_domain: String,
    /// The current model.
    pub model: Arc<ArcSwap<Model>>,
    /// Routes compiled from it.
    pub table: ArcSwap<Table>,
    /// Per backend service resilience state.
    backends: Mutex<HashMap<ObjectName, Arc<Backend>>>,
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
    /// Counts a request in `weft_requests_total` and `weft_request_duration_seconds`.
    fn count(
        &self,
        wp: &Waypoint,
        front: &ObjectName,
        out: &Outcomes,
        status: u16,
        flags: &str,
        elapsed: Duration,
    ) {
        let endpoint = out.endpoint.as_ref().and_then(|t| t.workload.as_ref());
        let mut series = self.series.lock().expect("series lock");
        let same = series.as_ref().is_some_and(|s| {
            s.labels.response_code == status
                && s.labels.route == out.route
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
                destination_service: front.to_string(),
                destination_workload: endpoint.map(|w| w.name.clone()).unwrap_or_default(),
                destination_principal: endpoint
                    .map(|w| {
                        format!(
                            "spiffe://{}/ns/{}/sa/{}",
                            wp.trust_domain, w.namespace, w.service_account
                        )
                    })
                    .unwrap_or_default(),
                route: out.route.clone(),
                response_code: status,
                response_flags: flags.to_owned(),
            };
            *series = Some(Series {
                requests: wp.metrics.requests.get_or_create_owned(&labels),
                duration: wp.metrics.duration.get_or_create_owned(&labels),
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

/// What a request became, for metrics and the log.
#[derive(Debug, Default)]
struct Outcomes {
    route: String,
    backend: String,
    endpoint: Option<Target>,
    attempts: u32,
    flags: Vec<&'static str>,
    denied_by: Option<String>,
}

impl Outcomes {
    fn flag(&mut self, f: &'static str) {
        if !self.flags.contains(&f) {
            self.flags.push(f);
        }
    }
}

impl Waypoint {
    /// A waypoint serving `gateway`'s services.
    pub fn new(
        gateway: ObjectName,
        trust_domain: String,
        model: Arc<ArcSwap<Model>>,
        upstreams: Arc<Upstreams>,
        metrics: Metrics,
        tracing: crate::trace::Tracing,
        max_streams: usize,
    ) -> Arc<Self> {
        let table = Table::compile(&model.load());
        Arc::new(Waypoint {
            gateway,
            trust_domain,
            model,
            table: ArcSwap::from_pointee(table),
            backends: Mutex::new(HashMap::new()),
            upstreams,
            metrics,
            tracing,
            mirrors: Arc::new(tokio::sync::Semaphore::new(MAX_MIRRORS)),
            streams: Arc::new(tokio::sync::Semaphore::new(max_streams)),
        })
    }

    /// Recompiles the routes from the current model.
    pub fn model_changed(&self) {
        let model = self.model.load();
        self.table.store(Arc::new(Table::compile(&model)));
        let mut backends = self.backends.lock().expect("backends lock");
        backends.retain(|name, b| {
            model.service(name).is_some() && b.is_for(model.traffic_policy(name).map(|p| &**p))
        });
    }

    fn backend(&self, model: &Model, service: &ObjectName) -> Arc<Backend> {
        let policy = model.traffic_policy(service).map(|p| &**p);
        let mut backends = self.backends.lock().expect("backends lock");
        match backends.get(service) {
            Some(b) if b.is_for(policy) => b.clone(),
            _ => {
                let b = Arc::new(Backend::new(policy));
                backends.insert(service.clone(), b.clone());
                b
            }
        }
    }
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
        });
        let protocol = port.protocol;
        let Ok(mut stream) = request.accept() else {
            return None;
        };
        use api::AppProtocol as P;
        let (http, prefix) = match protocol {
            P::Http | P::Http2 | P::Grpc => (true, Bytes::new()),
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
    let model = wp.model.load_full();
    let name = conn.name.clone();
    let targets = model.endpoints(&name, conn.port);
    let backend = wp.backend(&model, &name);
    let Some(target) = backend.pick(targets).cloned() else {
        info!(service = %name, "TCP connection dropped: no ready endpoint");
        return;
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
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
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

fn local(status: StatusCode, body: &str) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from(format!("{body}\n")))
            .map_err(|e| -> BoxError { match e {} })
            .boxed(),
    );
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    r
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
    let model = wp.model.load_full();
    let table = wp.table.load_full();
    let front = &conn.name;
    let parent = req
        .headers()
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .and_then(crate::trace::parse_traceparent);
    let span = wp.tracing.start(front, parent);
    let (trace_id, span_id) = span.ids().unwrap_or_else(|| trace_context(parent));
    let method = req.method().clone();
    // Both share the request's buffers: cloning them copies no bytes.
    let uri = req.uri().clone();
    let host = req.headers().get(header::HOST).cloned();
    let version = req.version();
    let mut out = Outcomes::default();

    let selected = {
        let view = RequestView {
            method: req.method(),
            path: req.uri().path(),
            query: req.uri().query(),
            headers: req.headers(),
        };
        table.select(front, conn.port, Some(&conn.namespace), &view)
    };
    let response = match authorize(&model, &conn, front, &req) {
        Err(policy) => {
            info!(service = %front, principal = %conn.principal, path = %req.uri().path(), %policy, "request denied");
            out.flag("denied");
            out.denied_by = Some(policy.clone());
            local(
                StatusCode::FORBIDDEN,
                &format!("RBAC: access denied by {policy}"),
            )
        }
        Ok(()) => {
            req.headers_mut().insert(
                "traceparent",
                HeaderValue::from_maybe_shared(Bytes::from(format!("00-{trace_id}-{span_id}-01")))
                    .unwrap_or_else(|_| HeaderValue::from_static("")),
            );
            route(&wp, &model, &conn, front, selected, req, &mut out).await
        }
    };
    let status = response.status().as_u16();
    let flags: Cow<'static, str> = match out.flags.is_empty() {
        true => Cow::Borrowed("-"),
        false => Cow::Owned(out.flags.join(",")),
    };
    let elapsed = start.elapsed();
    conn.count(&wp, front, &out, status, &flags, elapsed);
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
            route: &out.route,
            upstream_service: &out.backend,
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
            KeyValue::new("weft.route", out.route.clone()),
            KeyValue::new("weft.response_flags", flags.into_owned()),
            KeyValue::new("source.principal", conn.principal.clone()),
        ]
    });
    response
}

/// L7 authorization against the policies of the service's workloads; the denying
/// policy's name on refusal.
fn authorize(
    model: &Model,
    conn: &Conn,
    front: &ObjectName,
    req: &Request<Incoming>,
) -> Result<(), String> {
    let Some(workload) = model
        .endpoints(front, conn.port)
        .iter()
        .find_map(|t| t.workload.as_ref())
    else {
        return Ok(());
    };
    let target_port = model
        .endpoints(front, conn.port)
        .first()
        .map_or(conn.port, |t| t.addr.port());
    let attrs = Attributes {
        path: req.uri().path(),
        method: req.method().as_str(),
        headers: req.headers(),
    };
    let c = authz::Connection {
        principal: Some(&conn.principal),
        namespace: Some(&conn.namespace),
        port: target_port,
        http: authz::Http::Request(&attrs),
    };
    authz::check(model.policies_for(workload).map(|p| &**p), &c)
        .map(drop)
        .map_err(|d| d.policy())
}

fn modify_headers(headers: &mut HeaderMap, m: &proto::HeaderModifier) {
    for h in &m.set {
        if let (Ok(n), Ok(v)) = (
            HeaderName::try_from(h.name.as_str()),
            HeaderValue::try_from(h.value.as_str()),
        ) {
            headers.insert(n, v);
        }
    }
    for h in &m.add {
        if let (Ok(n), Ok(v)) = (
            HeaderName::try_from(h.name.as_str()),
            HeaderValue::try_from(h.value.as_str()),
        ) {
            headers.append(n, v);
        }
    }
    for name in &m.remove {
        headers.remove(name.as_str());
    }
}

/// The path after a `PathModifier`: a full replacement, or the matched prefix replaced.
fn modified_path(path: &str, m: &proto::PathModifier, matched_prefix: Option<&str>) -> String {
    match &m.path {
        Some(proto::path_modifier::Path::Full(full)) => full.clone(),
        Some(proto::path_modifier::Path::Prefix(replacement)) => {
            let prefix = matched_prefix.unwrap_or("/").trim_end_matches('/');
            let rest = path.strip_prefix(prefix).unwrap_or(path);
            let replacement = replacement.trim_end_matches('/');
            match (replacement.is_empty(), rest.is_empty()) {
                (true, true) => "/".into(),
                (true, false) => rest.into(),
                (false, _) => format!("{replacement}{rest}"),
            }
        }
        None => path.to_owned(),
    }
}

/// The prefix a rule's first PathPrefix match names, for prefix rewrites.
fn matched_prefix(rule: &proto::RouteRule) -> Option<&str> {
    rule.matches.iter().find_map(|m| {
        m.path
            .as_ref()
            .filter(|p| p.r#type == proto::PathMatchType::PathPrefix as i32)
            .map(|p| p.value.as_str())
    })
}

/// The answer of a `RequestRedirect` to a request addressed to the Service's
/// `listener_port` (the mesh's listener port). With no port given, the redirect keeps
/// that port, unless it changes the scheme, which takes the scheme's own port (80, 443);
/// the port is left out of `Location` where it is the scheme's.
fn redirect<B>(
    req: &Request<B>,
    r: &proto::Redirect,
    rule: &proto::RouteRule,
    listener_port: u16,
) -> Response<Body> {
    let scheme = if r.scheme.is_empty() {
        "http"
    } else {
        &r.scheme
    };
    let host_header = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri().authority().map(|a| a.as_str()))
        .unwrap_or("");
    let host = if r.hostname.is_empty() {
        host_header.split(':').next().unwrap_or("")
    } else {
        &r.hostname
    };
    let port = match u16::try_from(r.port).unwrap_or(0) {
        0 if r.scheme.is_empty() => listener_port,
        0 => match scheme {
            "http" => 80,
            "https" => 443,
            _ => listener_port,
        },
        p => p,
    };
    let port = match (scheme, port) {
        ("http", 80) | ("https", 443) => String::new(),
        (_, p) => format!(":{p}"),
    };
    let path = match &r.path {
        Some(m) => modified_path(req.uri().path(), m, matched_prefix(rule)),
        None => req.uri().path().to_owned(),
    };
    let query = req
        .uri()
        .query()
        .map(|q| format!("?{q}"))
        .unwrap_or_default();
    let status = StatusCode::from_u16(u16::try_from(r.status_code).unwrap_or(302))
        .ok()
        .filter(|s| s.is_redirection())
        .unwrap_or(StatusCode::FOUND);
    let mut resp = Response::new(Empty::new().map_err(|e| -> BoxError { match e {} }).boxed());
    *resp.status_mut() = status;
    if let Ok(v) = HeaderValue::try_from(format!("{scheme}://{host}{port}{path}{query}")) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    resp
}

/// Hop-by-hop headers, not forwarded (RFC 9110 7.6.1), except for upgrades.
const HOP_BY_HOP: [&str; 7] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "upgrade",
    "te",
    "trailer",
];

fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    for h in HOP_BY_HOP {
        if keep_upgrade && (h == "connection" || h == "upgrade") {
            continue;
        }
        if h == "te" && headers.get("te").is_some_and(|v| v == "trailers") {
            continue;
        }
        headers.remove(h);
    }
}

/// A request body that can be sent more than once, or one that can be sent once.
enum Payload {
    Buffered(Bytes),
    Streaming(Option<Incoming>),
}

impl Payload {
    fn take(&mut self) -> Option<Body> {
        match self {
            Payload::Buffered(b) => Some(
                Full::new(b.clone())
                    .map_err(|e| -> BoxError { match e {} })
                    .boxed(),
            ),
            Payload::Streaming(s) => s
                .take()
                .map(|b| b.map_err(|e| -> BoxError { Box::new(e) }).boxed()),
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn route(
    wp: &Arc<Waypoint>,
    model: &Arc<Model>,
    conn: &Arc<Conn>,
    front: &ObjectName,
    selected: Selected,
    mut req: Request<Incoming>,
    out: &mut Outcomes,
) -> Response<Body> {
    let default_rule;
    let rule: &proto::RouteRule = match &selected {
        Selected::NoMatch => return local(StatusCode::NOT_FOUND, "no route matches"),
        Selected::NoRoutes => {
            default_rule = proto::RouteRule {
                backends: vec![proto::Backend {
                    service: front.to_string(),
                    port: u32::from(conn.port),
                    weight: 1,
                    ..Default::default()
                }],
                ..Default::default()
            };
            &default_rule
        }
        Selected::Rule(r, i) => {
            out.route = r.name.to_string();
            &r.rules[*i].spec
        }
    };
    let mut response_modifiers = Vec::new();
    let mut mirrors = Vec::new();
    for f in rule.filters.iter().filter_map(|f| f.filter.as_ref()) {
        match f {
            Filter::RequestRedirect(r) => return redirect(&req, r, rule, conn.port),
            Filter::RequestHeaderModifier(m) => modify_headers(req.headers_mut(), m),
            Filter::ResponseHeaderModifier(m) => response_modifiers.push(m.clone()),
            Filter::UrlRewrite(rw) => {
                if !rw.hostname.is_empty() {
                    if let Ok(v) = HeaderValue::try_from(rw.hostname.as_str()) {
                        req.headers_mut().insert(header::HOST, v);
                    }
                }
                if let Some(m) = &rw.path {
                    let path = modified_path(req.uri().path(), m, matched_prefix(rule));
                    let pq = match req.uri().query() {
                        Some(q) => format!("{path}?{q}"),
                        None => path,
                    };
                    let mut parts = req.uri().clone().into_parts();
                    if let Ok(p) = pq.parse() {
                        parts.path_and_query = Some(p);
                    }
                    if let Ok(u) = Uri::from_parts(parts) {
                        *req.uri_mut() = u;
                    }
                }
            }
            Filter::RequestMirror(m) => mirrors.push(m.clone()),
        }
    }
    let upgrade = req.version() != Version::HTTP_2 && req.headers().contains_key(header::UPGRADE);
    let no_retry = proto::Retry::default();
    let retry = rule.retry.as_ref().unwrap_or(&no_retry);
    let on_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    let wants_copies = retry.attempts > 0 || !mirrors.is_empty();
    let mut payload = if wants_copies
        && !upgrade
        && body
            .size_hint()
            .upper()
            .is_some_and(|n| n <= MAX_BUFFERED_BODY)
    {
        match body.collect().await {
            Ok(b) => Payload::Buffered(b.to_bytes()),
            Err(e) => {
                return local(
                    StatusCode::BAD_REQUEST,
                    &format!("cannot read the request body: {e}"),
                )
            }
        }
    } else {
        Payload::Streaming(Some(body))
    };
    let attempts = match payload {
        Payload::Buffered(_) => retry.attempts,
        Payload::Streaming(_) => 0,
    };
    if let Payload::Buffered(bytes) = &payload {
        for m in mirrors {
            mirror(wp, model, conn, &parts, bytes.clone(), &m);
        }
    }
    strip_hop_by_hop(&mut parts.headers, upgrade);
    if let Some(v) = &conn.forwarded_for {
        parts.headers.append("x-forwarded-for", v.clone());
    }
    let retryable_status = |s: u16| match retry.codes.is_empty() {
        true => matches!(s, 500 | 502 | 503 | 504),
        false => retry.codes.contains(&u32::from(s)),
    };
    let per_try = (rule.backend_request_timeout_ms > 0)
        .then(|| Duration::from_millis(u64::from(rule.backend_request_timeout_ms)));
    let overall = (rule.request_timeout_ms > 0)
        .then(|| Duration::from_millis(u64::from(rule.request_timeout_ms)));
    let backoff = match retry.backoff_ms {
        0 => DEFAULT_BACKOFF,
        ms => Duration::from_millis(u64::from(ms)),
    };

    let attempt_loop = async {
        let mut attempt = 0u32;
        loop {
            out.attempts = attempt + 1;
            let Some(backend) = router::pick_backend(&rule.backends) else {
                return local(StatusCode::INTERNAL_SERVER_ERROR, "no backend has a weight");
            };
            out.backend = backend.service.clone();
            if !backend.invalid.is_empty() {
                return local(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    &format!(
                        "backend {} is invalid: {}",
                        backend.service, backend.invalid
                    ),
                );
            }
            let Some((ns, name)) = backend.service.split_once('/') else {
                return local(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "backend without a namespace",
                );
            };
            let svc = ObjectName::new(ns, name);
            let state = wp.backend(model, &svc);
            if attempt == 0 {
                state.count_request();
                if let Err(l) = state.admit() {
                    out.flag("limited");
                    return limited(StatusCode::TOO_MANY_REQUESTS, l);
                }
                let (delay, abort) = state.fault();
                if let Some(d) = delay {
                    out.flag("faulted");
                    tokio::time::sleep(d).await;
                }
                if let Some(status) = abort {
                    out.flag("faulted");
                    return local(
                        StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
                        "fault injected",
                    );
                }
            }
            let port = u16::try_from(backend.port).unwrap_or(conn.port);
            let targets = model.endpoints(&svc, port);
            if targets.is_empty() {
                out.flag("no_endpoints");
                return local(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &format!("service {svc} has no ready endpoint"),
                );
            }
            let Some(target) = state.pick(targets).cloned() else {
                out.flag("ejected");
                return local(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &format!("every endpoint of {svc} is ejected"),
                );
            };
            out.endpoint = Some(target.clone());
            let flight = match state.start(&target).await {
                Ok(f) => f,
                Err(l) => {
                    out.flag("limited");
                    return limited(StatusCode::SERVICE_UNAVAILABLE, l);
                }
            };
            let Some(body) = payload.take() else {
                return local(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the request body was already sent",
                );
            };
            let h2 = upstream_h2(model, &svc, port, parts.version);
            let upstream_req = upstream_request(&parts, &target, body, h2);
            let sent = async {
                match upgrade {
                    true => {
                        wp.upstreams
                            .send_upgrade(&target, &conn.principal, upstream_req)
                            .await
                    }
                    false => {
                        wp.upstreams
                            .send(&target, &conn.principal, upstream_req)
                            .await
                    }
                }
            };
            let result = match per_try {
                Some(t) => tokio::time::timeout(t, sent).await.ok(),
                None => Some(sent.await),
            };
            let (outcome, response) = match result {
                None => (Outcome::Timeout, None),
                Some(Err(crate::upstream::UpstreamError::Connect { why, .. })) => {
                    debug!(%svc, endpoint = %target.addr, "connect failed: {why}");
                    (Outcome::ConnectFailure, None)
                }
                Some(Err(e)) => {
                    debug!(%svc, "request failed: {e}");
                    (Outcome::ConnectFailure, None)
                }
                Some(Ok(r)) => (Outcome::Status(r.status().as_u16()), Some(r)),
            };
            if state.finish(flight, outcome, targets.len()) {
                info!(service = %svc, endpoint = %target.addr, "endpoint ejected");
                out.flag("ejected");
            }
            let retryable = match outcome {
                Outcome::Status(s) => retryable_status(s),
                Outcome::ConnectFailure | Outcome::Timeout => true,
            };
            if retryable && attempt < attempts && state.allow_retry() {
                out.flag("retried");
                let wait = backoff * 2u32.saturating_pow(attempt.min(6));
                let jitter = fastrand::u64(0..=wait.as_millis() as u64 / 2);
                tokio::time::sleep(wait / 2 + Duration::from_millis(jitter)).await;
                attempt += 1;
                continue;
            }
            return match (response, outcome) {
                (Some(mut r), _) => {
                    if let (Some(down), true) =
                        (on_upgrade, r.status() == StatusCode::SWITCHING_PROTOCOLS)
                    {
                        let up = hyper::upgrade::on(&mut r);
                        tokio::spawn(async move {
                            if let (Ok(down), Ok(up)) = (down.await, up.await) {
                                let (mut down, mut up) = (TokioIo::new(down), TokioIo::new(up));
                                let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                            }
                        });
                    }
                    r.map(|b| b.map_err(|e| -> BoxError { Box::new(e) }).boxed())
                }
                (None, Outcome::Timeout) => {
                    out.flag("timed_out");
                    local(StatusCode::GATEWAY_TIMEOUT, "upstream request timeout")
                }
                (None, _) => local(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &format!("upstream {} unreachable", target.addr),
                ),
            };
        }
    };
    let mut response = match overall {
        Some(t) => match tokio::time::timeout(t, attempt_loop).await {
            Ok(r) => r,
            Err(_) => {
                out.flag("timed_out");
                local(StatusCode::GATEWAY_TIMEOUT, "request timeout")
            }
        },
        None => attempt_loop.await,
    };
    if response.status() != StatusCode::SWITCHING_PROTOCOLS {
        strip_hop_by_hop(response.headers_mut(), false);
    }
    for m in &response_modifiers {
        modify_headers(response.headers_mut(), m);
    }
    response
}

fn limited(status: StatusCode, why: Limited) -> Response<Body> {
    let mut r = local(
        status,
        &format!("request refused by the waypoint: {}", why.as_str()),
    );
    r.headers_mut()
        .insert(LIMITED_HEADER, HeaderValue::from_static(why.as_str()));
    r
}

/// Whether requests to `service`:`port` go out as HTTP/2: when the port declares
/// HTTP/2 or gRPC; HTTP/1.1 when it declares HTTP; else as the client spoke.
fn upstream_h2(model: &Model, service: &ObjectName, port: u16, downstream: Version) -> bool {
    use api::AppProtocol as P;
    let declared = model
        .service(service)
        .and_then(|s| s.ports.iter().find(|p| p.port == port).map(|p| p.protocol))
        .unwrap_or(P::Unknown);
    match declared {
        P::Http2 | P::Grpc => true,
        P::Http | P::Tcp => false,
        P::Unknown => downstream == Version::HTTP_2,
    }
}

/// The request to send to `target`: origin-form for HTTP/1.1, absolute for HTTP/2.
fn upstream_request(
    parts: &http::request::Parts,
    target: &Target,
    body: Body,
    h2: bool,
) -> Request<Body> {
    let mut req = Request::new(body);
    *req.method_mut() = parts.method.clone();
    *req.headers_mut() = parts.headers.clone();
    let pq = parts
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
    *req.version_mut() = if h2 {
        Version::HTTP_2
    } else {
        Version::HTTP_11
    };
    let authority = || {
        parts
            .uri
            .authority()
            .map(|a| a.as_str().to_owned())
            .or_else(|| {
                parts
                    .headers
                    .get(header::HOST)
                    .and_then(|h| h.to_str().ok())
                    .map(str::to_owned)
            })
            .unwrap_or_else(|| target.addr.to_string())
    };
    let mut uri = http::uri::Parts::default();
    if h2 {
        req.headers_mut().remove(header::HOST);
        uri.scheme = Some(http::uri::Scheme::HTTP);
        uri.authority = authority().parse().ok();
    } else if !req.headers().contains_key(header::HOST) {
        if let Ok(v) = HeaderValue::try_from(authority()) {
            req.headers_mut().insert(header::HOST, v);
        }
    }
    uri.path_and_query = Some(pq);
    if let Ok(u) = Uri::from_parts(uri) {
        *req.uri_mut() = u;
    }
    req
}

/// Sends a copy of the request to the mirror backend and drops the answer.
fn mirror(
    wp: &Arc<Waypoint>,
    model: &Arc<Model>,
    conn: &Arc<Conn>,
    parts: &http::request::Parts,
    body: Bytes,
    m: &proto::Mirror,
) {
    let Some(backend) = &m.backend else { return };
    if m.fraction_ppm < 1_000_000 && fastrand::u32(0..1_000_000) >= m.fraction_ppm {
        return;
    }
    let Some((ns, name)) = backend.service.split_once('/') else {
        return;
    };
    let svc = ObjectName::new(ns, name);
    let port = u16::try_from(backend.port).unwrap_or(conn.port);
    let state = wp.backend(model, &svc);
    let Some(target) = state.pick(model.endpoints(&svc, port)).cloned() else {
        return;
    };
    let Ok(permit) = wp.mirrors.clone().try_acquire_owned() else {
        wp.metrics
            .mirrors_skipped
            .get_or_create(&ServiceLabels {
                destination_service: backend.service.clone(),
            })
            .inc();
        debug!(mirror = %svc, "{MAX_MIRRORS} mirrored requests in flight; this one is not sent");
        return;
    };
    let mut parts = parts.clone();
    strip_hop_by_hop(&mut parts.headers, false);
    let h2 = upstream_h2(model, &svc, port, parts.version);
    let req = upstream_request(
        &parts,
        &target,
        Full::new(body)
            .map_err(|e| -> BoxError { match e {} })
            .boxed(),
        h2,
    );
    let (wp, principal) = (wp.clone(), conn.principal.clone());
    tokio::spawn(async move {
        let sent = async {
            match wp.upstreams.send(&target, &principal, req).await {
                Ok(r) => {
                    let _ = r.into_body().collect().await;
                }
                Err(e) => debug!(mirror = %svc, "mirrored request failed: {e}"),
            }
        };
        if tokio::time::timeout(MIRROR_TIMEOUT, sent).await.is_err() {
            debug!(mirror = %svc, "mirrored request abandoned after {MIRROR_TIMEOUT:?}");
        }
        drop(permit);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A redirect keeps the port the client addressed unless it says otherwise: a
    /// hostname alone keeps 8080; a scheme change takes the scheme's port; a port given
    /// wins; the scheme's own port is left out.
    #[test]
    fn a_redirect_keeps_the_listener_port_unless_told() {
        let req = Request::builder()
            .uri("/a/b?x=1")
            .header(header::HOST, "echo.shop:8080")
            .body(())
            .expect("a request");
        let location = |r: proto::Redirect, listener: u16| {
            let resp = redirect(&req, &r, &proto::RouteRule::default(), listener);
            resp.headers()[header::LOCATION]
                .to_str()
                .expect("ascii")
                .to_owned()
        };
        let host = |h: &str| proto::Redirect {
            hostname: h.into(),
            ..Default::default()
        };
        assert_eq!(
            location(host("example.org"), 8080),
            "http://example.org:8080/a/b?x=1"
        );
        assert_eq!(
            location(host("example.org"), 80),
            "http://example.org/a/b?x=1"
        );
        assert_eq!(location(host(""), 8080), "http://echo.shop:8080/a/b?x=1");
        let https = proto::Redirect {
            scheme: "https".into(),
            ..Default::default()
        };
        assert_eq!(location(https.clone(), 8080), "https://echo.shop/a/b?x=1");
        let port = proto::Redirect {
            port: 9443,
            ..https
        };
        assert_eq!(location(port, 8080), "https://echo.shop:9443/a/b?x=1");
    }

    #[test]
    fn http_is_told_from_other_protocols_by_its_first_bytes() {
        assert!(looks_like_http(b"GET / HTTP/1.1\r\n"));
        assert!(looks_like_http(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"));
        assert!(!looks_like_http(b"GET"));
        assert!(!looks_like_http(b"\x16\x03\x01\x02\x00"));
        assert!(!looks_like_http(b"SSH-2.0-OpenSSH_9.2\r\n"));
        assert!(!looks_like_http(b"PING\r\n"));
    }

    #[test]
    fn prefix_rewrites_replace_the_matched_prefix() {
        let prefix = |p: &str| proto::PathModifier {
            path: Some(proto::path_modifier::Path::Prefix(p.into())),
        };
        assert_eq!(
            modified_path("/api/v1/items", &prefix("/v2"), Some("/api/v1")),
            "/v2/items"
        );
        assert_eq!(modified_path("/api/v1", &prefix("/"), Some("/api/v1")), "/");
        assert_eq!(
            modified_path("/api/v1/x", &prefix("/"), Some("/api/v1/")),
            "/x"
        );
        let full = proto::PathModifier {
            path: Some(proto::path_modifier::Path::Full("/fixed".into())),
        };
        assert_eq!(modified_path("/anything", &full, None), "/fixed");
    }
}
