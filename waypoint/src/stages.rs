//! The request path after routing, as small stages, each reading its settings from
//! the compiled [`Target`]:
//!
//! ```text
//!  request filters (redirect answers; headers, rewrite; mirrors)
//!    -> attempts { split (by weight) -> admit (rate limit, fault, first try only)
//!                  -> balance (P2C / round robin, ejected skipped)
//!                  -> upstream (per-try timeout) -> outlier detection }
//!       retried while the retry stage allows (budget, codes, backoff)
//!    within the request timeout -> response filters
//! ```
//!
//! A stage that refuses returns a [`Refused`]; [`Refused::response`] is the one place
//! that turns a refusal into the client's answer (status, body, `weft-limited`, flag).
//! The upstream is a trait, so every stage and their composition run in process
//! against a scripted upstream in the tests below.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use api::model::Target as Addr;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::TokioIo;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tokio::time::Instant;
use tracing::{debug, info};

use crate::metrics::ServiceLabels;
use crate::resilience::{Backend, Endpoint, Limited, Outcome};
use crate::target::{BackendRef, PathChange, Pool, Redirect, Retry, Target};
use crate::upstream::{Body, BoxError, UpstreamError, Upstreams};

/// Request bodies up to this size are buffered so that they can be retried or
/// mirrored; larger or unsized ones are streamed and tried once.
pub const MAX_BUFFERED_BODY: u64 = 64 * 1024;
/// How long a mirrored request may take before it is abandoned.
const MIRROR_TIMEOUT: Duration = Duration::from_secs(15);
/// The response header that says why the waypoint refused a request itself.
pub const LIMITED_HEADER: &str = "weft-limited";

/// Sends requests to endpoints: the waypoint's connection pools, or a script in tests.
pub trait Upstream: Clone + Send + Sync + 'static {
    /// Sends `req` to `to` on behalf of `principal`; an upgrade (WebSocket) gets a
    /// connection of its own.
    fn send(
        &self,
        to: &Addr,
        principal: &str,
        req: Request<Body>,
        upgrade: bool,
    ) -> impl Future<Output = Result<Response<Body>, UpstreamError>> + Send;
}

impl Upstream for Arc<Upstreams> {
    async fn send(
        &self,
        to: &Addr,
        principal: &str,
        req: Request<Body>,
        upgrade: bool,
    ) -> Result<Response<Body>, UpstreamError> {
        let r = match upgrade {
            true => Upstreams::send_upgrade(self, to, principal, req).await,
            false => Upstreams::send(self, to, principal, req).await,
        }?;
        Ok(r.map(|b| b.map_err(|e| -> BoxError { Box::new(e) }).boxed()))
    }
}

/// Why the waypoint answered a request itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// Routes are attached, none matches.
    NoMatch,
    /// The service is not (or no longer) one this waypoint serves.
    NotServed(String),
    /// Every backend of the rule has weight 0.
    NoWeight,
    /// The backend picked does not resolve.
    InvalidBackend(Arc<str>),
    /// The backend has no ready endpoint.
    NoEndpoints(Arc<str>),
    /// Every endpoint of the backend is ejected.
    AllEjected(Arc<str>),
    /// A limit of the backend's TrafficPolicy.
    Limited(StatusCode, Limited),
    /// An injected fault.
    Fault(StatusCode),
    /// The endpoint could not be reached or did not answer.
    Unreachable(SocketAddr),
    /// An attempt, or the whole request, ran out of time.
    Timeout,
    /// The request body could not be read.
    BadBody(String),
    /// The request cannot be answered as asked (a redirect to a `Host` that is none).
    BadRequest(String),
    /// A streamed body cannot be sent again.
    BodySent,
    /// An authorization policy denied it.
    Denied(String),
}

impl Refused {
    /// The flag it sets in metrics and the access log.
    pub fn flag(&self) -> Option<&'static str> {
        match self {
            Refused::NoEndpoints(_) => Some("no_endpoints"),
            Refused::AllEjected(_) => Some("ejected"),
            Refused::Limited(..) => Some("limited"),
            Refused::Fault(_) => Some("faulted"),
            Refused::Timeout => Some("timed_out"),
            Refused::Denied(_) => Some("denied"),
            _ => None,
        }
    }

    /// The client's answer.
    pub fn response(&self) -> Response<Body> {
        let (status, body) = match self {
            Refused::NoMatch => (StatusCode::NOT_FOUND, "no route matches".into()),
            Refused::NotServed(s) => (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("service {s} is not served by this waypoint"),
            ),
            Refused::NoWeight => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "no backend has a weight".into(),
            ),
            Refused::InvalidBackend(why) => (StatusCode::INTERNAL_SERVER_ERROR, why.to_string()),
            Refused::NoEndpoints(s) => (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("service {s} has no ready endpoint"),
            ),
            Refused::AllEjected(s) => (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("every endpoint of {s} is ejected"),
            ),
            Refused::Limited(status, why) => {
                let mut r = local(
                    *status,
                    &format!("request refused by the waypoint: {}", why.as_str()),
                );
                r.headers_mut()
                    .insert(LIMITED_HEADER, HeaderValue::from_static(why.as_str()));
                return r;
            }
            Refused::Fault(status) => (*status, "fault injected".into()),
            Refused::Unreachable(addr) => (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("upstream {addr} unreachable"),
            ),
            Refused::Timeout => (
                StatusCode::GATEWAY_TIMEOUT,
                "upstream request timeout".into(),
            ),
            Refused::BadBody(e) => (
                StatusCode::BAD_REQUEST,
                format!("cannot read the request body: {e}"),
            ),
            Refused::BadRequest(why) => (StatusCode::BAD_REQUEST, why.clone()),
            Refused::BodySent => (
                StatusCode::SERVICE_UNAVAILABLE,
                "the request body was already sent".into(),
            ),
            Refused::Denied(policy) => (
                StatusCode::FORBIDDEN,
                format!("RBAC: access denied by {policy}"),
            ),
        };
        local(status, &body)
    }
}

/// A plain-text answer.
pub fn local(status: StatusCode, body: &str) -> Response<Body> {
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

/// What a request became, for metrics and the log.
#[derive(Debug, Default)]
pub struct Outcomes {
    /// The route, `namespace/name`.
    pub route: Option<Arc<str>>,
    /// The backend service of the last attempt.
    pub backend: Option<Arc<str>>,
    /// The endpoint of the last attempt.
    pub endpoint: Option<Addr>,
    /// Attempts made.
    pub attempts: u32,
    /// What the waypoint did besides forwarding.
    pub flags: Vec<&'static str>,
    /// The policy that denied the request.
    pub denied_by: Option<String>,
}

impl Outcomes {
    /// Sets a flag once.
    pub fn flag(&mut self, f: &'static str) {
        if !self.flags.contains(&f) {
            self.flags.push(f);
        }
    }
}

// ---- request filters -------------------------------------------------------------

/// The request filters: a redirect answers at once (`Some`); otherwise header
/// changes and the rewrite are applied to `req`.
pub fn request_filters<B>(
    t: &Target,
    req: &mut Request<B>,
    listener_port: u16,
) -> Option<Response<Body>> {
    if let Some(r) = &t.redirect {
        return Some(redirect(req, r, t.matched_prefix.as_deref(), listener_port));
    }
    for ops in &t.request_headers {
        ops.apply(req.headers_mut());
    }
    if let Some(rw) = &t.rewrite {
        if let Some(h) = &rw.host {
            req.headers_mut().insert(header::HOST, h.clone());
        }
        if let Some(change) = &rw.path {
            let path = changed_path(req.uri().path(), change, t.matched_prefix.as_deref());
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
    None
}

/// The response filters.
pub fn response_filters(t: &Target, headers: &mut HeaderMap) {
    for ops in &t.response_headers {
        ops.apply(headers);
    }
}

/// The path after a change: a full replacement, or the matched prefix replaced.
pub fn changed_path(path: &str, change: &PathChange, matched_prefix: Option<&str>) -> String {
    match change {
        PathChange::Full(full) => full.clone(),
        PathChange::Prefix(replacement) => {
            let prefix = matched_prefix.unwrap_or("/").trim_end_matches('/');
            let rest = path.strip_prefix(prefix).unwrap_or(path);
            let replacement = replacement.trim_end_matches('/');
            match (replacement.is_empty(), rest.is_empty()) {
                (true, true) => "/".into(),
                (true, false) if rest.starts_with('/') => rest.into(),
                // What follows the prefix is not a path of its own (found by fuzzing:
                // `/api*` with the prefix `/api/`): it stays one.
                (true, false) => format!("/{rest}"),
                (false, _) => format!("{replacement}{rest}"),
            }
        }
    }
}

/// The answer of a `RequestRedirect` to a request addressed to the Service's
/// `listener_port` (the mesh's listener port). With no port given, the redirect keeps
/// that port, unless it changes the scheme, which takes the scheme's own port (80, 443);
/// the port is left out of `Location` where it is the scheme's.
pub fn redirect<B>(
    req: &Request<B>,
    r: &Redirect,
    matched_prefix: Option<&str>,
    listener_port: u16,
) -> Response<Body> {
    let scheme = r.scheme.as_deref().unwrap_or("http");
    let host = match &r.hostname {
        Some(h) => h.as_str(),
        None => req
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .or_else(|| req.uri().authority().map(|a| a.as_str()))
            .unwrap_or("")
            .split(':')
            .next()
            .unwrap_or(""),
    };
    let port = match (r.port, &r.scheme) {
        (Some(p), _) => p,
        (None, None) => listener_port,
        (None, Some(_)) => match scheme {
            "http" => 80,
            "https" => 443,
            _ => listener_port,
        },
    };
    let port = match (scheme, port) {
        ("http", 80) | ("https", 443) => String::new(),
        (_, p) => format!(":{p}"),
    };
    let path = match &r.path {
        Some(change) => changed_path(req.uri().path(), change, matched_prefix),
        None => req.uri().path().to_owned(),
    };
    let query = req
        .uri()
        .query()
        .map(|q| format!("?{q}"))
        .unwrap_or_default();
    // The host may come from the client's `Host` header: a Location that is not a URI
    // (a host with a space, say) is the client's error, not a redirect.
    let location = format!("{scheme}://{host}{port}{path}{query}");
    let Ok(location) = Uri::try_from(location.as_str())
        .map_err(drop)
        .and_then(|_| HeaderValue::try_from(location).map_err(drop))
    else {
        return Refused::BadRequest(format!("the Host header {host:?} is not a host")).response();
    };
    let mut resp = Response::new(Empty::new().map_err(|e| -> BoxError { match e {} }).boxed());
    *resp.status_mut() = r.status;
    resp.headers_mut().insert(header::LOCATION, location);
    resp
}

// ---- split, admit, balance ---------------------------------------------------------

/// The split stage: a backend by weight; `None` when every weight is 0.
pub fn split(t: &Target) -> Option<&BackendRef> {
    if t.split.total == 0 {
        return None;
    }
    let mut r = fastrand::u64(0..t.split.total);
    for b in &t.split.backends {
        let w = u64::from(b.weight);
        if r < w {
            return Some(b);
        }
        r -= w;
    }
    None
}

/// The admission stage, on a request's first attempt: the backend's rate limit, then
/// its injected faults (a delay, then maybe an abort).
pub async fn admit(state: &Backend, out: &mut Outcomes) -> Result<(), Refused> {
    state.count_request();
    state
        .admit()
        .map_err(|l| Refused::Limited(StatusCode::TOO_MANY_REQUESTS, l))?;
    let (delay, abort) = state.fault();
    if let Some(d) = delay {
        out.flag("faulted");
        tokio::time::sleep(d).await;
    }
    match abort {
        Some(status) => Err(Refused::Fault(
            StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
        )),
        None => Ok(()),
    }
}

/// The balance stage: an endpoint of `pool` that is not ejected.
pub fn balance(pool: &Pool) -> Result<&Endpoint, Refused> {
    if pool.endpoints.is_empty() {
        return Err(Refused::NoEndpoints(pool.label.clone()));
    }
    pool.state
        .pick(&pool.endpoints)
        .ok_or_else(|| Refused::AllEjected(pool.label.clone()))
}

// ---- retry and timeout -------------------------------------------------------------

/// The retry stage's decisions for one request.
#[derive(Debug)]
pub struct Retrier<'a> {
    retry: &'a Retry,
    /// Retries allowed: the rule's, or none when the body cannot be sent again.
    allowed: u32,
    done: u32,
}

impl<'a> Retrier<'a> {
    /// For a request whose body can be sent again (`replayable`) or not.
    pub fn new(retry: &'a Retry, replayable: bool) -> Self {
        Retrier {
            retry,
            allowed: if replayable { retry.attempts } else { 0 },
            done: 0,
        }
    }

    /// Whether an attempt that ended with `outcome` is retried, taking one retry of
    /// `budget`; the wait before it (exponential backoff, half of it jittered).
    pub fn again(&mut self, outcome: Outcome, budget: &Backend) -> Option<Duration> {
        let retryable = match outcome {
            Outcome::Status(s) => self.retry.retryable(s),
            Outcome::ConnectFailure | Outcome::Timeout => true,
        };
        if !retryable || self.done >= self.allowed || !budget.allow_retry() {
            return None;
        }
        let wait = self.retry.backoff * 2u32.saturating_pow(self.done.min(6));
        self.done += 1;
        let jitter = fastrand::u64(0..=wait.as_millis() as u64 / 2);
        Some(wait / 2 + Duration::from_millis(jitter))
    }
}

/// The timeout stage: `f`'s output, or `None` once `deadline` has passed.
pub async fn until<F: Future>(deadline: Option<Instant>, f: F) -> Option<F::Output> {
    match deadline {
        Some(d) => tokio::time::timeout_at(d, f).await.ok(),
        None => Some(f.await),
    }
}

/// A route's timeouts cover the whole response, body included, as Gateway API's
/// `timeouts` ask ("until the full response has been received"): a backend that
/// sends its headers and then stalls would otherwise hold the request for good. A
/// response still being sent at `deadline` is cut, which the client sees as a reset
/// stream (HTTP/2) or a closed connection (HTTP/1.1), never as a complete answer.
fn cut_at(
    response: Response<Body>,
    deadline: Option<Instant>,
    which: &'static str,
) -> Response<Body> {
    let Some(deadline) = deadline else {
        return response;
    };
    response.map(|body| {
        Deadline {
            body,
            at: Box::pin(tokio::time::sleep_until(deadline)),
            which,
        }
        .boxed()
    })
}

/// The response body of [`cut_at`].
struct Deadline {
    body: Body,
    at: Pin<Box<tokio::time::Sleep>>,
    which: &'static str,
}

/// Why a response was cut: its route's timeout passed while it was being sent.
#[derive(Debug, thiserror::Error)]
#[error("the route's {0} timeout passed while the response was being sent")]
pub struct CutShort(&'static str);

impl hyper::body::Body for Deadline {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, BoxError>>> {
        // The deadline first: a backend with data always ready, sent to a client that
        // reads slowly, must be cut too.
        if self.at.as_mut().poll(cx).is_ready() {
            debug!(timeout = self.which, "response cut at the route's timeout");
            return Poll::Ready(Some(Err(CutShort(self.which).into())));
        }
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

// ---- the composed path ---------------------------------------------------------------

/// A request body that can be sent more than once, or one that can be sent once.
enum Payload {
    Buffered(Bytes),
    Streaming(Option<Body>),
}

impl Payload {
    fn take(&mut self) -> Option<Body> {
        match self {
            Payload::Buffered(b) => Some(
                Full::new(b.clone())
                    .map_err(|e| -> BoxError { match e {} })
                    .boxed(),
            ),
            Payload::Streaming(s) => s.take(),
        }
    }
}

/// What the stages after routing need besides the target.
pub struct Path<'a, U> {
    /// Where requests go.
    pub upstream: &'a U,
    /// L7 authorization of each attempt and mirrored copy (none: nothing to check).
    pub authz: Option<&'a dyn Authorize>,
    /// Permits for mirrored copies in flight.
    pub mirrors: &'a Arc<tokio::sync::Semaphore>,
    /// Copies not sent for want of a permit.
    pub mirrors_skipped: &'a Family<ServiceLabels, Counter>,
    /// The client's principal, named to endpoints.
    pub principal: &'a str,
    /// `x-forwarded-for` to append.
    pub forwarded_for: Option<&'a HeaderValue>,
    /// The service port the client addressed.
    pub listener_port: u16,
}

/// L7 authorization against the workload a request is sent to. It is checked for
/// the endpoint each attempt (and each mirrored copy) goes to, not for the service the
/// client addressed: a route may send requests to another service, and a policy may
/// select only some of a service's pods. The destination's node-proxy leaves a
/// policy's HTTP conditions to the waypoint, so this check is the only one they get.
pub trait Authorize: Sync {
    /// `Err(policy)` when a policy of `endpoint`'s workload denies the request.
    fn check(&self, endpoint: &Addr) -> Result<(), String>;
}

/// Hop-by-hop headers, not forwarded (RFC 9110 7.6.1), except for upgrades; names
/// made once, not parsed per request. `HTTP2-Settings` goes with an `h2c` upgrade,
/// which is never passed on.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::TE,
    header::TRAILER,
    HeaderName::from_static("http2-settings"),
];

/// Whether an HTTP/1 request's `Upgrade` is passed on: any protocol but `h2c`. After an
/// `h2c` upgrade the connection to the backend would carry HTTP/2 the waypoint never
/// reads, so the requests that follow on it would skip routing, policy and metrics
/// ("h2c smuggling"). Such a request goes on as plain HTTP/1.1, its upgrade headers
/// dropped, as if the client had not offered one (HTTP/2 itself no longer defines it).
fn passes_upgrade(version: Version, headers: &HeaderMap) -> bool {
    version != Version::HTTP_2
        && headers.contains_key(header::UPGRADE)
        && !headers
            .get_all(header::UPGRADE)
            .iter()
            .flat_map(|v| v.to_str().unwrap_or("h2c").split(','))
            .any(|p| p.trim().eq_ignore_ascii_case("h2c"))
}

fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    for h in &HOP_BY_HOP {
        if keep_upgrade && (h == header::CONNECTION || h == header::UPGRADE) {
            continue;
        }
        if h == header::TE && headers.get(header::TE).is_some_and(|v| v == "trailers") {
            continue;
        }
        headers.remove(h);
    }
}

/// The `x-forwarded-for` header's name.
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

impl<U: Upstream> Path<'_, U> {
    /// Every stage after routing, for a request that selected `t`.
    pub async fn forward<B>(
        &self,
        t: &Target,
        mut req: Request<B>,
        out: &mut Outcomes,
    ) -> Response<Body>
    where
        B: hyper::body::Body<Data = Bytes> + Send + Sync + Unpin + 'static,
        B::Error: Into<BoxError>,
    {
        out.route = t.route.clone();
        // The request timeout runs from here: reading a body to buffer is part of it.
        let deadline = t.overall.map(|d| Instant::now() + d);
        if let Some(answer) = request_filters(t, &mut req, self.listener_port) {
            return answer;
        }
        let upgrade = passes_upgrade(req.version(), req.headers());
        let on_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        let (mut parts, body) = req.into_parts();
        let wants_copies = t.retry.attempts > 0 || !t.mirrors.is_empty();
        let mut payload = if wants_copies
            && !upgrade
            && body
                .size_hint()
                .upper()
                .is_some_and(|n| n <= MAX_BUFFERED_BODY)
        {
            match until(deadline, body.collect()).await {
                Some(Ok(b)) => Payload::Buffered(b.to_bytes()),
                Some(Err(e)) => return self.refuse(Refused::BadBody(e.into().to_string()), out),
                None => return self.refuse(Refused::Timeout, out),
            }
        } else {
            Payload::Streaming(Some(body.map_err(Into::into).boxed()))
        };
        if let Payload::Buffered(bytes) = &payload {
            for m in &t.mirrors {
                if m.fraction_ppm >= 1_000_000 || fastrand::u32(0..1_000_000) < m.fraction_ppm {
                    self.mirror(&m.to, &parts, bytes.clone());
                }
            }
        }
        strip_hop_by_hop(&mut parts.headers, upgrade);
        if let Some(v) = self.forwarded_for {
            parts.headers.append(X_FORWARDED_FOR, v.clone());
        }
        let mut retrier = Retrier::new(&t.retry, matches!(payload, Payload::Buffered(_)));
        // Moved into the request when it cannot be sent again, copied otherwise.
        let reused = retrier.allowed > 0;
        let mut parts = Some(parts);
        let attempts = async {
            let mut first = true;
            loop {
                out.attempts += 1;
                let (result, tried) = self
                    .attempt(
                        t,
                        &mut parts,
                        reused,
                        &mut payload,
                        upgrade,
                        first,
                        deadline,
                        out,
                    )
                    .await;
                first = false;
                if let Some((outcome, state)) = tried {
                    if let Some(wait) = retrier.again(outcome, state) {
                        out.flag("retried");
                        tokio::time::sleep(wait).await;
                        continue;
                    }
                }
                return result;
            }
        };
        let result = match until(deadline, attempts).await {
            Some(r) => r,
            None => Err(Refused::Timeout),
        };
        let mut response = match result {
            Ok(mut r) => {
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
                r
            }
            Err(refused) => self.refuse(refused, out),
        };
        if response.status() != StatusCode::SWITCHING_PROTOCOLS {
            strip_hop_by_hop(response.headers_mut(), false);
        }
        response_filters(t, response.headers_mut());
        response
    }

    fn refuse(&self, refused: Refused, out: &mut Outcomes) -> Response<Body> {
        if let Some(f) = refused.flag() {
            out.flag(f);
        }
        refused.response()
    }

    /// One attempt: split, admission (first only), balance, upstream with the per-try
    /// timeout, outlier detection; its response cut at the earlier of the per-try
    /// timeout and the request's `deadline`. With how it ended and the backend whose
    /// budget a retry takes, unless nothing was sent (then it is not retried).
    #[allow(clippy::too_many_arguments)]
    async fn attempt<'t>(
        &self,
        t: &'t Target,
        parts: &mut Option<http::request::Parts>,
        reused: bool,
        payload: &mut Payload,
        upgrade: bool,
        first: bool,
        deadline: Option<Instant>,
        out: &mut Outcomes,
    ) -> (
        Result<Response<Body>, Refused>,
        Option<(Outcome, &'t Backend)>,
    ) {
        let Some(backend) = split(t) else {
            return (Err(Refused::NoWeight), None);
        };
        out.backend = Some(backend.name.clone());
        let pool = match &backend.to {
            Ok(p) => p,
            Err(why) => return (Err(Refused::InvalidBackend(why.clone())), None),
        };
        let state = &pool.state;
        if first {
            if let Err(r) = admit(state, out).await {
                return (Err(r), None);
            }
        }
        let endpoint = match balance(pool) {
            Ok(e) => e,
            Err(r) => return (Err(r), None),
        };
        out.endpoint = Some(endpoint.target.clone());
        if let Some(Err(policy)) = self.authz.map(|a| a.check(&endpoint.target)) {
            out.denied_by = Some(policy.clone());
            return (Err(Refused::Denied(policy)), None);
        }
        let flight = match state.start(endpoint).await {
            Ok(f) => f,
            Err(l) => {
                return (
                    Err(Refused::Limited(StatusCode::SERVICE_UNAVAILABLE, l)),
                    None,
                )
            }
        };
        let head = match reused {
            true => parts.clone(),
            false => parts.take(),
        };
        let (Some(body), Some(head)) = (payload.take(), head) else {
            return (Err(Refused::BodySent), None);
        };
        let h2 = pool.h2.unwrap_or(head.version == Version::HTTP_2);
        let req = upstream_request(head, &endpoint.target, body, h2);
        let addr = endpoint.target.addr;
        let sent = self
            .upstream
            .send(&endpoint.target, self.principal, req, upgrade);
        let per_try = t.per_try.map(|d| Instant::now() + d);
        let (outcome, result) = match until(per_try, sent).await {
            None => (Outcome::Timeout, Err(Refused::Timeout)),
            Some(Err(e)) => {
                debug!(service = %pool.label, endpoint = %addr, "attempt failed: {e}");
                (Outcome::ConnectFailure, Err(Refused::Unreachable(addr)))
            }
            Some(Ok(r)) => {
                // One deadline for the body: whichever timeout passes first.
                let cut = match (per_try, deadline) {
                    (Some(p), Some(d)) if d < p => (deadline, "request"),
                    (Some(_), _) => (per_try, "backend request"),
                    (None, _) => (deadline, "request"),
                };
                let status = r.status().as_u16();
                (Outcome::Status(status), Ok(cut_at(r, cut.0, cut.1)))
            }
        };
        if state.finish(flight, outcome, pool.endpoints.len()) {
            info!(service = %pool.label, endpoint = %addr, "endpoint ejected");
            out.flag("ejected");
        }
        (result, Some((outcome, state)))
    }

    /// Sends a copy of the request to `pool` and drops the answer; bounded by the
    /// mirror permits.
    fn mirror(&self, pool: &Arc<Pool>, parts: &http::request::Parts, body: Bytes) {
        let Ok(endpoint) = balance(pool) else {
            return;
        };
        if let Some(Err(policy)) = self.authz.map(|a| a.check(&endpoint.target)) {
            debug!(mirror = %pool.label, %policy, "the mirrored copy is denied; not sent");
            return;
        }
        let Ok(permit) = self.mirrors.clone().try_acquire_owned() else {
            self.mirrors_skipped
                .get_or_create(&ServiceLabels {
                    destination_service: pool.label.to_string(),
                })
                .inc();
            debug!(mirror = %pool.label, "too many mirrored requests in flight; this one is not sent");
            return;
        };
        let mut parts = parts.clone();
        strip_hop_by_hop(&mut parts.headers, false);
        let h2 = pool.h2.unwrap_or(parts.version == Version::HTTP_2);
        let req = upstream_request(
            parts,
            &endpoint.target,
            Full::new(body)
                .map_err(|e| -> BoxError { match e {} })
                .boxed(),
            h2,
        );
        let (upstream, principal, to, label) = (
            self.upstream.clone(),
            self.principal.to_owned(),
            endpoint.target.clone(),
            pool.label.clone(),
        );
        tokio::spawn(async move {
            let sent = async {
                match upstream.send(&to, &principal, req, false).await {
                    Ok(r) => {
                        let _ = r.into_body().collect().await;
                    }
                    Err(e) => debug!(mirror = %label, "mirrored request failed: {e}"),
                }
            };
            if tokio::time::timeout(MIRROR_TIMEOUT, sent).await.is_err() {
                debug!(mirror = %label, "mirrored request abandoned after {MIRROR_TIMEOUT:?}");
            }
            drop(permit);
        });
    }
}

/// The request to send to `target`: origin-form for HTTP/1.1, absolute for HTTP/2.
fn upstream_request(
    parts: http::request::Parts,
    target: &Addr,
    body: Body,
    h2: bool,
) -> Request<Body> {
    let http::request::Parts {
        method,
        uri,
        mut headers,
        ..
    } = parts;
    let authority = |headers: &HeaderMap| {
        uri.authority()
            .map(|a| a.as_str().to_owned())
            .or_else(|| {
                headers
                    .get(header::HOST)
                    .and_then(|h| h.to_str().ok())
                    .map(str::to_owned)
            })
            .unwrap_or_else(|| target.addr.to_string())
    };
    let mut out = http::uri::Parts::default();
    if h2 {
        out.scheme = Some(http::uri::Scheme::HTTP);
        out.authority = authority(&headers).parse().ok();
        headers.remove(header::HOST);
    } else if !headers.contains_key(header::HOST) {
        if let Ok(v) = HeaderValue::try_from(authority(&headers)) {
            headers.insert(header::HOST, v);
        }
    }
    out.path_and_query = Some(
        uri.path_and_query()
            .cloned()
            .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/")),
    );
    let mut req = Request::new(body);
    *req.method_mut() = method;
    *req.headers_mut() = headers;
    *req.version_mut() = if h2 {
        Version::HTTP_2
    } else {
        Version::HTTP_11
    };
    if let Ok(u) = Uri::from_parts(out) {
        *req.uri_mut() = u;
    }
    req
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::Mutex;

    use api::{proto, ObjectName};

    use super::*;
    use crate::target::{HeaderOps, Mirror, Split};
    use http::header::HeaderName;

    /// How the scripted upstream answers one request.
    #[derive(Debug, Clone, Copy)]
    enum Answer {
        Status(u16),
        /// Answers after this long (on paused time, exactly).
        Slow(Duration, u16),
        /// Cannot be reached.
        Fail,
        /// Answers 200 at once with `part`, and sends `rest` of its body this much later.
        StalledBody(Duration),
        /// Answers 200 with a body that always has another frame ready.
        Endless,
    }

    /// A body of two frames with a stall between them.
    struct Stalled {
        part: Option<Bytes>,
        rest: Option<Bytes>,
        stall: Pin<Box<tokio::time::Sleep>>,
    }

    impl hyper::body::Body for Stalled {
        type Data = Bytes;
        type Error = BoxError;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, BoxError>>> {
            if let Some(part) = self.part.take() {
                return Poll::Ready(Some(Ok(hyper::body::Frame::data(part))));
            }
            if self.rest.is_some() && self.stall.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            Poll::Ready(self.rest.take().map(|r| Ok(hyper::body::Frame::data(r))))
        }
    }

    /// A body with another frame always ready.
    struct Endless;

    impl hyper::body::Body for Endless {
        type Data = Bytes;
        type Error = BoxError;

        fn poll_frame(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, BoxError>>> {
            Poll::Ready(Some(Ok(hyper::body::Frame::data(Bytes::from_static(
                b"more",
            )))))
        }
    }

    /// What the scripted upstream was sent: the endpoint and the request's head.
    type Seen = Vec<(SocketAddr, Request<()>)>;

    /// Whether the request was sent as an upgrade (in the extensions of what is seen).
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    struct Upgrading(bool);

    /// An upstream answering from a script (200 once it runs out) and recording what
    /// it was sent.
    #[derive(Clone, Default)]
    struct Script {
        answers: Arc<Mutex<VecDeque<Answer>>>,
        seen: Arc<Mutex<Seen>>,
    }

    impl Script {
        fn new(answers: &[Answer]) -> Self {
            Script {
                answers: Arc::new(Mutex::new(answers.iter().copied().collect())),
                ..Script::default()
            }
        }

        fn seen(&self) -> Seen {
            std::mem::take(&mut *self.seen.lock().expect("lock"))
        }
    }

    impl Upstream for Script {
        async fn send(
            &self,
            to: &Addr,
            _principal: &str,
            req: Request<Body>,
            upgrade: bool,
        ) -> Result<Response<Body>, UpstreamError> {
            let (mut parts, _) = req.into_parts();
            parts.extensions.insert(Upgrading(upgrade));
            self.seen
                .lock()
                .expect("lock")
                .push((to.addr, Request::from_parts(parts, ())));
            let answer = self
                .answers
                .lock()
                .expect("lock")
                .pop_front()
                .unwrap_or(Answer::Status(200));
            let status = match answer {
                Answer::Status(s) => s,
                Answer::Endless => {
                    return Ok(Response::new(Endless.boxed()));
                }
                Answer::StalledBody(d) => {
                    let body = Stalled {
                        part: Some(Bytes::from_static(b"part")),
                        rest: Some(Bytes::from_static(b"rest")),
                        stall: Box::pin(tokio::time::sleep(d)),
                    };
                    return Ok(Response::new(body.boxed()));
                }
                Answer::Slow(d, s) => {
                    tokio::time::sleep(d).await;
                    s
                }
                Answer::Fail => {
                    return Err(UpstreamError::Connect {
                        addr: to.addr,
                        why: "refused".into(),
                    })
                }
            };
            let mut r = local(
                StatusCode::from_u16(status).expect("status"),
                "from upstream",
            );
            r.headers_mut()
                .insert("x-upstream", HeaderValue::from_static("yes"));
            Ok(r)
        }
    }

    fn pool_with(name: &str, n: u8, policy: Option<proto::TrafficPolicy>) -> Arc<Pool> {
        Arc::new(Pool::new(
            ObjectName::new("shop", name),
            80,
            Some(false),
            Arc::new(Backend::new(policy.as_ref())),
            &crate::resilience::tests::targets(n),
        ))
    }

    fn to(pool: &Arc<Pool>, weight: u32) -> BackendRef {
        BackendRef {
            name: pool.label.clone(),
            weight,
            to: Ok(pool.clone()),
        }
    }

    fn target(backends: Vec<BackendRef>) -> Target {
        Target {
            route: Some("shop/r".into()),
            split: Split {
                total: backends.iter().map(|b| u64::from(b.weight)).sum(),
                backends,
            },
            ..Target::default()
        }
    }

    fn request(uri: &str) -> Request<Full<Bytes>> {
        Request::builder()
            .uri(uri)
            .header(header::HOST, "echo.shop:8080")
            .body(Full::new(Bytes::from_static(b"hello")))
            .expect("a request")
    }

    struct Run {
        status: u16,
        response: Response<Body>,
        out: Outcomes,
    }

    async fn forward(up: &Script, t: &Target, req: Request<Full<Bytes>>) -> Run {
        forward_with(up, t, req, None).await
    }

    async fn forward_with(
        up: &Script,
        t: &Target,
        req: Request<Full<Bytes>>,
        authz: Option<&dyn Authorize>,
    ) -> Run {
        let mirrors = Arc::new(tokio::sync::Semaphore::new(4));
        let skipped = Family::default();
        let path = Path {
            upstream: up,
            authz,
            mirrors: &mirrors,
            mirrors_skipped: &skipped,
            principal: "spiffe://cluster.local/ns/shop/sa/client",
            forwarded_for: None,
            listener_port: 8080,
        };
        let mut out = Outcomes::default();
        let response = path.forward(t, req, &mut out).await;
        Run {
            status: response.status().as_u16(),
            response,
            out,
        }
    }

    async fn body_text(r: Response<Body>) -> String {
        let bytes = r.into_body().collect().await.expect("body").to_bytes();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    // ---- each stage alone ----

    /// A redirect keeps the port the client addressed unless it says otherwise: a
    /// hostname alone keeps 8080; a scheme change takes the scheme's port; a port given
    /// wins; the scheme's own port is left out.
    #[test]
    fn a_redirect_keeps_the_listener_port_unless_told() {
        let req = request("/a/b?x=1");
        let location = |r: Redirect, listener: u16| {
            let resp = redirect(&req, &r, None, listener);
            resp.headers()[header::LOCATION]
                .to_str()
                .expect("ascii")
                .to_owned()
        };
        let base = Redirect {
            scheme: None,
            hostname: None,
            port: None,
            path: None,
            status: StatusCode::FOUND,
        };
        let host = |h: &str| Redirect {
            hostname: Some(h.into()),
            ..base.clone()
        };
        assert_eq!(
            location(host("example.org"), 8080),
            "http://example.org:8080/a/b?x=1"
        );
        assert_eq!(
            location(host("example.org"), 80),
            "http://example.org/a/b?x=1"
        );
        assert_eq!(
            location(base.clone(), 8080),
            "http://echo.shop:8080/a/b?x=1"
        );
        let https = Redirect {
            scheme: Some("https".into()),
            ..base.clone()
        };
        assert_eq!(location(https.clone(), 8080), "https://echo.shop/a/b?x=1");
        let port = Redirect {
            port: Some(9443),
            ..https
        };
        assert_eq!(location(port, 8080), "https://echo.shop:9443/a/b?x=1");
        // A Host that is no host (found by fuzzing): 400, not a broken Location.
        let mut bad = request("/a");
        bad.headers_mut()
            .insert(header::HOST, HeaderValue::from_static("a b"));
        let resp = redirect(&bad, &base, None, 8080);
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
        assert!(!resp.headers().contains_key(header::LOCATION));
    }

    #[test]
    fn prefix_rewrites_replace_the_matched_prefix() {
        let prefix = |p: &str| PathChange::Prefix(p.into());
        assert_eq!(
            changed_path("/api/v1/items", &prefix("/v2"), Some("/api/v1")),
            "/v2/items"
        );
        assert_eq!(changed_path("/api/v1", &prefix("/"), Some("/api/v1")), "/");
        assert_eq!(
            changed_path("/api/v1/x", &prefix("/"), Some("/api/v1/")),
            "/x"
        );
        assert_eq!(
            changed_path("/anything", &PathChange::Full("/fixed".into()), None),
            "/fixed"
        );
    }

    #[test]
    fn the_split_goes_by_weight_and_zero_weights_get_nothing() {
        let (v1, v2, v3) = (
            pool_with("v1", 1, None),
            pool_with("v2", 1, None),
            pool_with("v3", 1, None),
        );
        let t = target(vec![to(&v1, 80), to(&v2, 20), to(&v3, 0)]);
        let mut first = 0;
        for _ in 0..10_000 {
            match split(&t).map(|b| &*b.name) {
                Some("shop/v1") => first += 1,
                Some("shop/v2") => {}
                other => panic!("picked {other:?}"),
            }
        }
        assert!((7700..=8300).contains(&first), "{first}");
        assert!(split(&target(vec![to(&v1, 0)])).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn balance_skips_ejected_endpoints_and_refuses_when_all_are() {
        let policy = proto::TrafficPolicy {
            outlier_detection: Some(proto::OutlierDetection {
                consecutive_5xx: 1,
                consecutive_connect_failures: 0,
                base_ejection_ms: 1000,
                max_ejection_percent: 100,
            }),
            ..Default::default()
        };
        let pool = pool_with("echo", 3, Some(policy));
        let eject = |e: &Endpoint| {
            let pool = pool.clone();
            let e = e.clone();
            async move {
                let f = pool.state.start(&e).await.expect("no limits");
                assert!(pool.state.finish(f, Outcome::Status(503), 3));
            }
        };
        eject(&pool.endpoints[0]).await;
        eject(&pool.endpoints[1]).await;
        let up = pool.endpoints[2].target.addr;
        for _ in 0..100 {
            assert_eq!(balance(&pool).expect("one is up").target.addr, up);
        }
        eject(&pool.endpoints[2]).await;
        let refused = balance(&pool).expect_err("all ejected");
        assert_eq!(refused, Refused::AllEjected("shop/echo".into()));
        assert_eq!(refused.response().status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(refused.flag(), Some("ejected"));
        // Ejections end.
        tokio::time::sleep(Duration::from_millis(1001)).await;
        assert!(balance(&pool).is_ok());
        let empty = pool_with("none", 0, None);
        assert_eq!(
            balance(&empty).map(|e| e.target.addr),
            Err(Refused::NoEndpoints("shop/none".into()))
        );
    }

    #[test]
    fn the_retry_stage_retries_what_is_retryable_within_attempts_and_budget() {
        let retry = Retry {
            attempts: 2,
            codes: vec![503],
            backoff: Duration::from_millis(100),
        };
        let budget = Backend::new(None);
        let mut r = Retrier::new(&retry, true);
        assert!(
            r.again(Outcome::Status(500), &budget).is_none(),
            "500 is not listed"
        );
        assert!(r.again(Outcome::Status(200), &budget).is_none());
        let first = r.again(Outcome::Status(503), &budget).expect("a retry");
        assert!((50..=100).contains(&first.as_millis()), "{first:?}");
        let second = r.again(Outcome::ConnectFailure, &budget).expect("a retry");
        assert!(
            (100..=200).contains(&second.as_millis()),
            "{second:?}: doubled"
        );
        assert!(
            r.again(Outcome::Timeout, &budget).is_none(),
            "two attempts used"
        );
        // A body that cannot be sent again is never retried.
        let mut once = Retrier::new(&retry, false);
        assert!(once.again(Outcome::Status(503), &budget).is_none());
        // An empty budget stops retries.
        let empty = Backend::new(Some(&proto::TrafficPolicy {
            retry_budget: Some(proto::RetryBudget {
                percent: 0,
                min_per_second: 0,
            }),
            ..Default::default()
        }));
        let mut r = Retrier::new(&retry, true);
        assert!(r.again(Outcome::Status(503), &empty).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn the_timeout_stage_ends_what_runs_too_long() {
        let slow = tokio::time::sleep(Duration::from_secs(2));
        let in_1s = || Some(tokio::time::Instant::now() + Duration::from_secs(1));
        assert!(until(in_1s(), slow).await.is_none());
        let quick = async { 7 };
        assert_eq!(until(in_1s(), quick).await, Some(7));
        assert_eq!(until(None, async { 8 }).await, Some(8));
    }

    #[test]
    fn each_refusal_has_one_answer() {
        let limited = Refused::Limited(StatusCode::TOO_MANY_REQUESTS, Limited::RateLimit);
        let r = limited.response();
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(r.headers()[LIMITED_HEADER], "rate-limit");
        assert_eq!(limited.flag(), Some("limited"));
        for (refused, status) in [
            (Refused::NoMatch, 404),
            (Refused::NoWeight, 500),
            (Refused::InvalidBackend("x".into()), 500),
            (Refused::NoEndpoints("x".into()), 503),
            (Refused::Timeout, 504),
            (Refused::Denied("shop/p".into()), 403),
            (Refused::BadBody("eof".into()), 400),
        ] {
            assert_eq!(refused.response().status().as_u16(), status, "{refused:?}");
        }
    }

    // ---- the stages composed, against the scripted upstream ----

    #[tokio::test(start_paused = true)]
    async fn failed_attempts_are_retried_on_other_endpoints_until_one_answers() {
        let pool = pool_with("echo", 3, None);
        let mut t = target(vec![to(&pool, 1)]);
        t.retry = Retry {
            attempts: 3,
            codes: vec![],
            backoff: Duration::from_millis(10),
        };
        let up = Script::new(&[Answer::Status(503), Answer::Fail, Answer::Status(200)]);
        let run = forward(&up, &t, request("/x")).await;
        assert_eq!(run.status, 200);
        assert_eq!(run.out.attempts, 3);
        assert_eq!(run.out.flags, vec!["retried"]);
        assert_eq!(run.out.route.as_deref(), Some("shop/r"));
        assert_eq!(run.out.backend.as_deref(), Some("shop/echo"));
        assert_eq!(up.seen().len(), 3);
        assert_eq!(run.response.headers()["x-upstream"], "yes");
        // Without retries the first answer is the client's.
        t.retry.attempts = 0;
        let up = Script::new(&[Answer::Status(503)]);
        let run = forward(&up, &t, request("/x")).await;
        assert_eq!((run.status, run.out.attempts), (503, 1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_attempt_times_out_and_the_request_timeout_bounds_all_of_them() {
        let pool = pool_with("echo", 2, None);
        let mut t = target(vec![to(&pool, 1)]);
        t.per_try = Some(Duration::from_millis(100));
        t.retry.attempts = 1;
        let slow = Answer::Slow(Duration::from_secs(5), 200);
        // The first attempt times out, the retry answers.
        let up = Script::new(&[slow, Answer::Status(200)]);
        let run = forward(&up, &t, request("/")).await;
        assert_eq!((run.status, run.out.attempts), (200, 2));
        // Both time out: 504, flagged.
        let up = Script::new(&[slow, slow]);
        let run = forward(&up, &t, request("/")).await;
        assert_eq!(run.status, 504);
        assert!(run.out.flags.contains(&"timed_out"), "{:?}", run.out.flags);
        // The request timeout cuts the attempts short.
        t.per_try = None;
        t.overall = Some(Duration::from_secs(1));
        let started = tokio::time::Instant::now();
        let run = forward(&Script::new(&[slow]), &t, request("/")).await;
        assert_eq!(run.status, 504);
        assert_eq!(started.elapsed(), Duration::from_secs(1));
    }

    /// A backend that sends its headers and then stalls is cut at the route's timeout
    /// (either of them), so the client learns the answer is not whole instead of
    /// waiting for good; one that finishes in time is passed whole.
    #[tokio::test(start_paused = true)]
    async fn a_response_still_being_sent_when_a_route_timeout_passes_is_cut() {
        let pool = pool_with("echo", 1, None);
        let mut t = target(vec![to(&pool, 1)]);
        let stall = Duration::from_secs(5);
        for (per_try, overall) in [
            (None, Some(Duration::from_secs(1))),
            (Some(Duration::from_secs(1)), None),
        ] {
            (t.per_try, t.overall) = (per_try, overall);
            let started = tokio::time::Instant::now();
            let run = forward(
                &Script::new(&[Answer::StalledBody(stall)]),
                &t,
                request("/"),
            )
            .await;
            assert_eq!(run.status, 200);
            let cut = run.response.into_body().collect().await;
            let why = cut.expect_err("the body is cut").to_string();
            assert!(why.contains("timeout passed"), "{why}");
            assert_eq!(started.elapsed(), Duration::from_secs(1));
            // In time: whole.
            let run = forward(
                &Script::new(&[Answer::StalledBody(stall / 10)]),
                &t,
                request("/"),
            )
            .await;
            assert_eq!(body_text(run.response).await, "partrest");
        }
        // A backend always ready, read slowly: cut all the same.
        (t.per_try, t.overall) = (None, Some(Duration::from_secs(1)));
        let run = forward(&Script::new(&[Answer::Endless]), &t, request("/")).await;
        let mut body = run.response.into_body();
        let mut cut = false;
        for _ in 0..100 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            match body.frame().await {
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    assert!(e.to_string().contains("timeout passed"), "{e}");
                    cut = true;
                    break;
                }
                None => break,
            }
        }
        assert!(cut, "a slow reader of a fast backend is cut at the timeout");
        // Without a timeout the stall is waited out.
        (t.per_try, t.overall) = (None, None);
        let run = forward(
            &Script::new(&[Answer::StalledBody(stall)]),
            &t,
            request("/"),
        )
        .await;
        assert_eq!(body_text(run.response).await, "partrest");
    }

    #[tokio::test]
    async fn refusals_before_any_attempt_are_answered_by_the_waypoint() {
        let up = Script::default();
        let invalid = Target {
            split: Split {
                backends: vec![BackendRef {
                    name: "shop/nope".into(),
                    weight: 1,
                    to: Err("backend shop/nope is invalid: there is no Service shop/nope".into()),
                }],
                total: 1,
            },
            ..Target::default()
        };
        let run = forward(&up, &invalid, request("/")).await;
        assert_eq!(run.status, 500);
        assert!(body_text(run.response)
            .await
            .contains("there is no Service shop/nope"));
        let run = forward(
            &up,
            &target(vec![to(&pool_with("v1", 1, None), 0)]),
            request("/"),
        )
        .await;
        assert_eq!(run.status, 500, "no weight");
        let run = forward(
            &up,
            &target(vec![to(&pool_with("empty", 0, None), 1)]),
            request("/"),
        )
        .await;
        assert_eq!(run.status, 503);
        assert_eq!(run.out.flags, vec!["no_endpoints"]);
        let limited = pool_with(
            "limited",
            1,
            Some(proto::TrafficPolicy {
                rate_limit: Some(proto::RateLimit {
                    burst: 1,
                    per_second: 1,
                }),
                ..Default::default()
            }),
        );
        let t = target(vec![to(&limited, 1)]);
        assert_eq!(forward(&up, &t, request("/")).await.status, 200);
        let run = forward(&up, &t, request("/")).await;
        assert_eq!(run.status, 429);
        assert_eq!(run.response.headers()[LIMITED_HEADER], "rate-limit");
        assert_eq!(up.seen().len(), 1, "refused requests reach no endpoint");
    }

    #[tokio::test]
    async fn filters_change_the_request_and_response_and_a_redirect_answers_itself() {
        let pool = pool_with("echo", 1, None);
        let mut t = target(vec![to(&pool, 1)]);
        let ops = |set: &[(&'static str, &'static str)], remove: &[&'static str]| HeaderOps {
            set: set
                .iter()
                .map(|(n, v)| (HeaderName::from_static(n), HeaderValue::from_static(v)))
                .collect(),
            add: vec![],
            remove: remove.iter().map(|n| HeaderName::from_static(n)).collect(),
        };
        t.request_headers = vec![ops(&[("x-added", "1")], &["x-secret"])];
        t.response_headers = vec![ops(&[("x-served-through", "waypoint")], &["x-upstream"])];
        t.matched_prefix = Some("/api".into());
        t.rewrite = Some(crate::target::Rewrite {
            host: Some(HeaderValue::from_static("internal")),
            path: Some(PathChange::Prefix("/v2".into())),
        });
        let up = Script::default();
        let mut req = request("/api/items?q=1");
        req.headers_mut()
            .insert("x-secret", HeaderValue::from_static("s"));
        req.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("keep-alive"));
        let run = forward(&up, &t, req).await;
        assert_eq!(run.status, 200);
        assert_eq!(run.response.headers()["x-served-through"], "waypoint");
        assert!(!run.response.headers().contains_key("x-upstream"));
        let seen = up.seen();
        let (_, sent) = &seen[0];
        assert_eq!(
            sent.uri().path_and_query().map(|p| p.as_str()),
            Some("/v2/items?q=1")
        );
        assert_eq!(sent.headers()["x-added"], "1");
        assert_eq!(sent.headers()[header::HOST], "internal");
        assert!(!sent.headers().contains_key("x-secret"));
        assert!(
            !sent.headers().contains_key(header::CONNECTION),
            "hop-by-hop"
        );
        // A redirect answers without an attempt.
        t.redirect = Some(Redirect {
            scheme: None,
            hostname: Some("example.org".into()),
            port: None,
            path: None,
            status: StatusCode::MOVED_PERMANENTLY,
        });
        let run = forward(&up, &t, request("/api/items")).await;
        assert_eq!(run.status, 301);
        assert_eq!(
            run.response.headers()[header::LOCATION],
            "http://example.org:8080/api/items"
        );
        assert!(up.seen().is_empty());
    }

    /// A pool of one endpoint at `addr`.
    fn pool_at(name: &str, addr: SocketAddr) -> Arc<Pool> {
        Arc::new(Pool::new(
            ObjectName::new("shop", name),
            80,
            Some(false),
            Arc::new(Backend::new(None)),
            &[Addr {
                workload: None,
                addr,
            }],
        ))
    }

    /// Denies what goes to one address, as a policy selecting only that pod would.
    struct DenyTo(SocketAddr);

    impl Authorize for DenyTo {
        fn check(&self, endpoint: &Addr) -> Result<(), String> {
            match endpoint.addr == self.0 {
                true => Err("shop/deny-v2".into()),
                false => Ok(()),
            }
        }
    }

    /// Authorization goes by the endpoint a request is sent to: a request routed to a
    /// pod whose policy denies it is refused there (not retried elsewhere, nothing
    /// sent), one routed to another pod passes, and a mirrored copy is not sent to a
    /// pod that denies it.
    #[tokio::test]
    async fn each_attempt_is_authorized_against_the_pod_it_goes_to() {
        let v1 = pool_with("echo", 1, None);
        let denied = SocketAddr::from(([10, 244, 0, 9], 8080));
        let v2 = pool_at("echo-v2", denied);
        let deny = DenyTo(denied);
        let up = Script::default();
        let run = forward_with(&up, &target(vec![to(&v1, 1)]), request("/"), Some(&deny)).await;
        assert_eq!(run.status, 200);
        assert_eq!(run.out.denied_by, None);
        assert_eq!(up.seen().len(), 1);

        let mut t = target(vec![to(&v2, 1)]);
        t.retry.attempts = 2;
        let run = forward_with(&up, &t, request("/"), Some(&deny)).await;
        assert_eq!(run.status, 403);
        assert_eq!(run.out.denied_by.as_deref(), Some("shop/deny-v2"));
        assert_eq!(run.out.attempts, 1, "a denial is not retried");
        assert!(
            up.seen().is_empty(),
            "nothing is sent to the pod that denies it"
        );

        // Two mirrors, the denied one first: once the other's copy is in, the denied
        // one's would be too.
        let allowed = SocketAddr::from(([10, 244, 0, 5], 8080));
        let shadow = pool_at("shadow", allowed);
        let mut t = target(vec![to(&v1, 1)]);
        t.mirrors = [v2.clone(), shadow]
            .into_iter()
            .map(|to| Mirror {
                to,
                fraction_ppm: 1_000_000,
            })
            .collect();
        let run = forward_with(&up, &t, request("/"), Some(&deny)).await;
        assert_eq!(run.status, 200);
        let mut seen = Vec::new();
        for _ in 0..500 {
            seen.extend(up.seen().into_iter().map(|(to, _)| to));
            if seen.contains(&allowed) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(
            seen.contains(&allowed),
            "the allowed mirror gets its copy: {seen:?}"
        );
        assert!(!seen.contains(&denied), "{seen:?}");
    }

    /// A WebSocket upgrade is passed on; an `h2c` one is not: the request goes on as
    /// plain HTTP/1.1 without its upgrade headers, so the backend cannot turn the
    /// connection into HTTP/2 the waypoint does not read.
    #[tokio::test]
    async fn an_h2c_upgrade_is_dropped_and_a_websocket_one_passed_on() {
        let pool = pool_with("echo", 1, None);
        let t = target(vec![to(&pool, 1)]);
        let up = Script::default();
        let asking = |protocol: &'static str| {
            let mut req = request("/allowed");
            *req.version_mut() = Version::HTTP_11;
            let h = req.headers_mut();
            h.insert(
                header::CONNECTION,
                HeaderValue::from_static("Upgrade, HTTP2-Settings"),
            );
            h.insert(header::UPGRADE, HeaderValue::from_static(protocol));
            h.insert(
                "http2-settings",
                HeaderValue::from_static("AAMAAABkAARAAAAAAAIAAAAA"),
            );
            req
        };
        for (protocol, passed) in [
            ("h2c", false),
            ("H2C, websocket", false),
            ("websocket", true),
        ] {
            let run = forward(&up, &t, asking(protocol)).await;
            assert_eq!(run.status, 200, "{protocol}");
            let seen = up.seen();
            let (_, sent) = &seen[0];
            assert_eq!(
                sent.extensions().get(),
                Some(&Upgrading(passed)),
                "{protocol}"
            );
            assert_eq!(
                sent.headers().contains_key(header::UPGRADE),
                passed,
                "{protocol}"
            );
            assert!(!sent.headers().contains_key("http2-settings"), "{protocol}");
        }
    }

    #[tokio::test]
    async fn a_mirror_gets_a_copy_and_the_client_the_backends_answer() {
        let (main, shadow) = (pool_with("echo", 1, None), pool_with("shadow", 1, None));
        let mut t = target(vec![to(&main, 1)]);
        t.mirrors = vec![Mirror {
            to: shadow.clone(),
            fraction_ppm: 1_000_000,
        }];
        let up = Script::default();
        let run = forward(&up, &t, request("/copy-me")).await;
        assert_eq!(run.status, 200);
        let mut seen = Vec::new();
        for _ in 0..100 {
            seen.extend(up.seen());
            if seen.len() == 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let mut to: Vec<SocketAddr> = seen.iter().map(|(a, _)| *a).collect();
        to.sort();
        let mut want = vec![
            main.endpoints[0].target.addr,
            shadow.endpoints[0].target.addr,
        ];
        want.sort();
        assert_eq!(to, want, "one request to each");
    }
}
