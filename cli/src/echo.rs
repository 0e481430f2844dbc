//! `weftctl echo`: the sandbox's demo application.
//!
//! An HTTP/1.1 and HTTP/2 (h2c, prior knowledge) server that answers every request with
//! who served it (pod, namespace, version) and what it saw (peer address, method, path,
//! headers), after an injected latency and with an injected, deterministic failure rate.
//! Tests and benchmarks read its JSON bodies and grep its one-line-per-request stdout log.
//!
//! A request may also ask for itself ([`CONTROLS`]): a delay, a status, a status for its
//! first N tries (by request id, as retries repeat it), extra response headers; so users
//! and tests can exercise retries, timeouts and header filters with Weft's own app.
//!
//! ```text
//! accept (bounded) -> HTTP/1.1 or h2c connection -> handle: controls, latency -> status
//!                                     ^ shutdown: graceful_shutdown, in-flight requests finish
//! ```

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderMap, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// Most connections served at once; further clients wait in the listen backlog.
const MAX_CONNECTIONS: usize = 4096;

/// What the echo server reports about itself and which faults it injects.
#[derive(Debug, Clone, PartialEq)]
pub struct EchoConfig {
    /// Pod name reported in bodies and logs.
    pub pod: String,
    /// Namespace reported in bodies.
    pub namespace: String,
    /// Application version reported in bodies, for traffic-split demos.
    pub version: String,
    /// Delay before answering each request (not `/healthz`).
    pub latency: Duration,
    /// Fraction of requests, 0.0 to 1.0, answered with 503; spread evenly and
    /// deterministically over the request sequence.
    pub failure_rate: f64,
    /// While this file exists every request is answered 503.
    pub fail_flag: Option<std::path::PathBuf>,
}

/// The request headers a request controls its answer with.
pub const CONTROLS: [(&str, &str); 6] = [
    ("x-echo-delay", "wait this long before answering (e.g. 250ms, 2s)"),
    (
        "x-echo-stall",
        "send the headers and half the body, and the rest this long later (e.g. 2s)",
    ),
    ("x-echo-status", "answer with this status (100 to 599)"),
    (
        "x-echo-fail-first",
        "answer the first N tries of this request id (x-echo-request-id) with x-echo-status, or 503",
    ),
    ("x-echo-request-id", "the id tries of one request share"),
    (
        "x-echo-response-header",
        "add this header (`name: value`) to the answer; repeatable",
    ),
];

/// Request ids whose tries are counted at once; the oldest is forgotten past it.
const MAX_TRACKED_IDS: usize = 10_000;

/// Shared by all connections of one server.
struct Echo {
    config: EchoConfig,
    /// Requests counted so far (not `/healthz`), which decides the ones that fail.
    requests: AtomicU64,
    /// Tries seen per request id (`x-echo-request-id`), oldest first.
    tries: std::sync::Mutex<(BTreeMap<String, u64>, std::collections::VecDeque<String>)>,
}

impl Echo {
    fn new(config: EchoConfig) -> Self {
        Echo {
            config,
            requests: AtomicU64::new(0),
            tries: std::sync::Mutex::new(Default::default()),
        }
    }

    /// This try's number (from 1) of request `id`.
    fn try_of(&self, id: &str) -> u64 {
        let mut guard = self
            .tries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (counts, order) = &mut *guard;
        if !counts.contains_key(id) {
            if order.len() >= MAX_TRACKED_IDS {
                if let Some(oldest) = order.pop_front() {
                    counts.remove(&oldest);
                }
            }
            order.push_back(id.to_owned());
        }
        let n = counts.entry(id.to_owned()).or_insert(0);
        *n += 1;
        *n
    }
}

/// What a request asked for with [`CONTROLS`], or why it cannot be had.
#[derive(Debug, Default, PartialEq)]
struct Controls {
    delay: Option<Duration>,
    stall: Option<Duration>,
    status: Option<StatusCode>,
    fail_first: Option<(u64, String)>,
    headers: Vec<(header::HeaderName, header::HeaderValue)>,
}

fn controls(headers: &HeaderMap) -> Result<Controls, String> {
    let text = |name: &str| -> Result<Option<&str>, String> {
        headers
            .get(name)
            .map(|v| v.to_str().map_err(|_| format!("{name} is not text")))
            .transpose()
    };
    let mut out = Controls::default();
    if let Some(d) = text("x-echo-delay")? {
        let d =
            controller::parse_duration(d.trim()).map_err(|e| format!("x-echo-delay {d:?}: {e}"))?;
        out.delay = Some(d.min(Duration::from_secs(60)));
    }
    if let Some(d) = text("x-echo-stall")? {
        let d =
            controller::parse_duration(d.trim()).map_err(|e| format!("x-echo-stall {d:?}: {e}"))?;
        out.stall = Some(d.min(Duration::from_secs(60)));
    }
    if let Some(s) = text("x-echo-status")? {
        let code = s
            .trim()
            .parse::<u16>()
            .ok()
            .and_then(|c| StatusCode::from_u16(c).ok());
        out.status = Some(code.ok_or_else(|| format!("x-echo-status {s:?} is not a status"))?);
    }
    if let Some(n) = text("x-echo-fail-first")? {
        let n = n
            .trim()
            .parse::<u64>()
            .map_err(|_| format!("x-echo-fail-first {n:?} is not a count"))?;
        let id = text("x-echo-request-id")?.ok_or("x-echo-fail-first needs x-echo-request-id")?;
        out.fail_first = Some((n, id.to_owned()));
    }
    for v in headers.get_all("x-echo-response-header") {
        let v = v
            .to_str()
            .map_err(|_| "x-echo-response-header is not text".to_owned())?;
        let (name, value) = v
            .split_once(':')
            .ok_or_else(|| format!("x-echo-response-header {v:?} is not `name: value`"))?;
        let name = header::HeaderName::try_from(name.trim())
            .map_err(|_| format!("x-echo-response-header: {name:?} is not a header name"))?;
        let value = header::HeaderValue::try_from(value.trim())
            .map_err(|_| format!("x-echo-response-header: {value:?} is not a header value"))?;
        out.headers.push((name, value));
    }
    Ok(out)
}

/// Serves echo requests on `listener` until `shutdown` is cancelled.
///
/// On shutdown it stops accepting, lets every in-flight request finish, closes idle
/// keep-alive connections and returns. To bound that drain, wrap the call in
/// [`tokio::time::timeout`]: dropping the future aborts the remaining connections.
pub async fn serve(
    listener: TcpListener,
    config: EchoConfig,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    serve_shared(listener, Arc::new(Echo::new(config)), shutdown).await
}

async fn serve_shared(
    listener: TcpListener,
    echo: Arc<Echo>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut connections = JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        let permit = tokio::select! {
            () = shutdown.cancelled() => break,
            permit = limit.clone().acquire_owned() => permit?,
        };
        let (stream, peer) = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = tunnel::net::accept(&listener, "echo") => accepted,
        };
        let echo = echo.clone();
        let shutdown = shutdown.clone();
        let span = tracing::debug_span!("echo_connection", client = %peer);
        connections.spawn(
            async move {
                let _permit = permit;
                let service = service_fn(move |req| handle(echo.clone(), peer, req));
                // HTTP/1.1 (keep-alive, upgrades) or h2c by its preface.
                let builder = auto::Builder::new(TokioExecutor::new());
                let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
                let mut conn = std::pin::pin!(conn);
                let result = tokio::select! {
                    result = conn.as_mut() => result,
                    () = shutdown.cancelled() => {
                        conn.as_mut().graceful_shutdown();
                        conn.await
                    }
                };
                if let Err(error) = result {
                    tracing::debug!(%error, "echo: connection ended with an error");
                }
            }
            .instrument(span),
        );
    }
    drop(listener);
    while connections.join_next().await.is_some() {}
    Ok(())
}

async fn handle(
    echo: Arc<Echo>,
    peer: SocketAddr,
    req: Request<Incoming>,
) -> Result<Response<EchoBody>, Infallible> {
    let config = &echo.config;
    let method = req.method().to_string();
    let path = req.uri().path().to_owned();
    if path == "/ws" {
        let response = websocket(req);
        log_request(&config.pod, peer, &method, &path, response.status());
        return Ok(response.map(BodyExt::boxed_unsync));
    }
    let (status, content_type, body, extra, stall) = if path == "/healthz" {
        (
            StatusCode::OK,
            "text/plain",
            Bytes::from_static(b"ok"),
            Vec::new(),
            None,
        )
    } else {
        let n = echo.requests.fetch_add(1, Ordering::Relaxed);
        let headers = headers_json(req.headers());
        let asked = controls(req.headers());
        // Read the body to its end so the connection can be kept alive.
        let mut body = req.into_body();
        while let Some(Ok(_)) = body.frame().await {}
        let asked = match asked {
            Ok(a) => a,
            Err(why) => {
                log_request(&config.pod, peer, &method, &path, StatusCode::BAD_REQUEST);
                let mut r =
                    Response::new(Full::new(Bytes::from(format!("{why}\n"))).boxed_unsync());
                *r.status_mut() = StatusCode::BAD_REQUEST;
                return Ok(r);
            }
        };
        tokio::time::sleep(asked.delay.unwrap_or(config.latency)).await;
        let flagged = config.fail_flag.as_ref().is_some_and(|f| f.exists());
        let status = match &asked.fail_first {
            Some((first, id)) => match echo.try_of(id) <= *first {
                true => asked.status.unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
                false => StatusCode::OK,
            },
            None if flagged || fails(n, config.failure_rate) => StatusCode::SERVICE_UNAVAILABLE,
            None => asked.status.unwrap_or(StatusCode::OK),
        };
        let body = serde_json::json!({
            "pod": config.pod,
            "namespace": config.namespace,
            "version": config.version,
            "client": peer.to_string(),
            "method": method,
            "path": path,
            "headers": headers,
        });
        (
            status,
            "application/json",
            Bytes::from(body.to_string()),
            asked.headers,
            asked.stall,
        )
    };
    log_request(&config.pod, peer, &method, &path, status);
    let mut response = Response::new(match stall {
        None => Full::new(body).boxed_unsync(),
        Some(stall) => stalled(body, stall),
    });
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    for (name, value) in extra {
        response.headers_mut().append(name, value);
    }
    Ok(response)
}

/// The body of an echo answer: whole, or sent in two halves.
type EchoBody = UnsyncBoxBody<Bytes, Infallible>;

/// `body`'s first half at once and the rest `stall` later, with no length announced:
/// a backend that stalls in the middle of its answer.
fn stalled(mut body: Bytes, stall: Duration) -> EchoBody {
    use futures::StreamExt;
    let head = body.split_to(body.len() / 2);
    let rest = async move {
        tokio::time::sleep(stall).await;
        Ok(hyper::body::Frame::data(body))
    };
    let frames = futures::stream::once(async { Ok(hyper::body::Frame::data(head)) })
        .chain(futures::stream::once(rest));
    StreamBody::new(frames).boxed_unsync()
}

/// `/ws`: a WebSocket echo (RFC 6455 handshake, then every text or binary message is
/// sent back as it came). 400 for a request that is not a WebSocket upgrade.
fn websocket(mut req: Request<Incoming>) -> Response<Full<Bytes>> {
    use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
    use tokio_tungstenite::tungstenite::protocol::Role;
    let key = req
        .headers()
        .get(header::SEC_WEBSOCKET_KEY)
        .map(|k| derive_accept_key(k.as_bytes()));
    let upgrade = req
        .headers()
        .get(header::UPGRADE)
        .is_some_and(|u| u.as_bytes().eq_ignore_ascii_case(b"websocket"));
    let (Some(accept), true) = (key, upgrade) else {
        let mut r = Response::new(Full::new(Bytes::from_static(
            b"a WebSocket upgrade is expected\n",
        )));
        *r.status_mut() = StatusCode::BAD_REQUEST;
        return r;
    };
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        use futures::{SinkExt, StreamExt};
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
            TokioIo::new(upgraded),
            Role::Server,
            None,
        )
        .await;
        while let Some(Ok(msg)) = ws.next().await {
            if msg.is_text() || msg.is_binary() {
                if ws.send(msg).await.is_err() {
                    break;
                }
            } else if msg.is_close() {
                break;
            }
        }
    });
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = r.headers_mut();
    h.insert(
        header::UPGRADE,
        header::HeaderValue::from_static("websocket"),
    );
    h.insert(
        header::CONNECTION,
        header::HeaderValue::from_static("Upgrade"),
    );
    if let Ok(v) = header::HeaderValue::from_str(&accept) {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, v);
    }
    r
}

/// Whether request `n` (from 0) fails: exactly floor(count * rate) of the first `count`
/// requests fail, evenly spaced, so a rate of 0.5 fails every second request.
fn fails(n: u64, rate: f64) -> bool {
    let rate = rate.clamp(0.0, 1.0);
    ((n + 1) as f64 * rate).floor() > (n as f64 * rate).floor()
}

/// Headers as a JSON object; repeated headers are joined with ", " as HTTP allows.
fn headers_json(headers: &HeaderMap) -> BTreeMap<String, String> {
    let mut map = BTreeMap::<String, String>::new();
    for (name, value) in headers {
        let value = String::from_utf8_lossy(value.as_bytes());
        map.entry(name.as_str().to_owned())
            .and_modify(|joined| {
                joined.push_str(", ");
                joined.push_str(&value);
            })
            .or_insert_with(|| value.into_owned());
    }
    map
}

/// One stable line per request for tests to grep. Write errors are ignored: a closed
/// stdout must not take the server down.
fn log_request(pod: &str, peer: SocketAddr, method: &str, path: &str, status: StatusCode) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "echo pod={pod} client={peer} method={method} path={path} status={}",
        status.as_u16()
    );
    let _ = out.flush();
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use http_body_util::Empty;
    use hyper::client::conn::http1::SendRequest;
    use tokio::net::TcpStream;
    use tokio::task::JoinHandle;

    use super::*;

    fn config(latency: Duration, failure_rate: f64) -> EchoConfig {
        EchoConfig {
            pod: "echo-0".into(),
            namespace: "shop".into(),
            version: "v2".into(),
            latency,
            failure_rate,
            fail_flag: None,
        }
    }

    struct Server {
        addr: SocketAddr,
        echo: Arc<Echo>,
        shutdown: CancellationToken,
        task: JoinHandle<anyhow::Result<()>>,
    }

    async fn start(config: EchoConfig) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let echo = Arc::new(Echo::new(config));
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(serve_shared(listener, echo.clone(), shutdown.clone()));
        Server {
            addr,
            echo,
            shutdown,
            task,
        }
    }

    /// A keep-alive client connection and its local address.
    async fn connect(addr: SocketAddr) -> (SendRequest<Empty<Bytes>>, SocketAddr) {
        let stream = TcpStream::connect(addr).await.unwrap();
        let local = stream.local_addr().unwrap();
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn);
        (sender, local)
    }

    async fn send(
        sender: &mut SendRequest<Empty<Bytes>>,
        req: Request<Empty<Bytes>>,
    ) -> (StatusCode, String, String) {
        sender.ready().await.unwrap();
        let response = sender.send_request(req).await.unwrap();
        let status = response.status();
        let content_type = response.headers()[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .to_owned();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (
            status,
            content_type,
            String::from_utf8(body.to_vec()).unwrap(),
        )
    }

    fn get(path: &str) -> Request<Empty<Bytes>> {
        Request::get(path)
            .header(header::HOST, "echo.shop")
            .body(Empty::new())
            .unwrap()
    }

    #[tokio::test]
    async fn body_reports_identity_request_and_real_peer() {
        let server = start(config(Duration::ZERO, 0.0)).await;
        let (mut sender, local) = connect(server.addr).await;
        let req = Request::post("/cart/items?id=7")
            .header(header::HOST, "echo.shop")
            .header("x-weft-test", "a")
            .header("x-weft-test", "b")
            .body(Empty::new())
            .unwrap();
        let (status, content_type, body) = send(&mut sender, req).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(content_type, "application/json");
        let body: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            body,
            serde_json::json!({
                "pod": "echo-0",
                "namespace": "shop",
                "version": "v2",
                "client": local.to_string(),
                "method": "POST",
                "path": "/cart/items",
                "headers": {"host": "echo.shop", "x-weft-test": "a, b"},
            })
        );
    }

    #[tokio::test]
    async fn latency_is_honoured() {
        let latency = Duration::from_millis(200);
        let server = start(config(latency, 0.0)).await;
        let (mut sender, _) = connect(server.addr).await;
        let started = Instant::now();
        let (status, _, _) = send(&mut sender, get("/")).await;
        // A lower bound only: the sleep can never end early, however loaded the machine.
        assert!(started.elapsed() >= latency);
        assert_eq!(status, StatusCode::OK);
    }

    #[tokio::test]
    async fn half_failure_rate_fails_every_second_request_on_one_connection() {
        let server = start(config(Duration::ZERO, 0.5)).await;
        let (mut sender, _) = connect(server.addr).await;
        let mut statuses = Vec::new();
        for _ in 0..6 {
            let (status, content_type, body) = send(&mut sender, get("/")).await;
            assert_eq!(content_type, "application/json");
            assert!(body.contains(r#""pod":"echo-0""#), "{body}");
            statuses.push(status.as_u16());
        }
        assert_eq!(statuses, [200, 503, 200, 503, 200, 503]);
    }

    #[test]
    fn failure_rate_is_exact_over_any_prefix() {
        for rate in [0.0, 0.1, 0.25, 1.0 / 3.0, 0.5, 0.9, 1.0] {
            let failed = (0..1000).filter(|&n| fails(n, rate)).count();
            assert_eq!(failed, (1000.0 * rate).floor() as usize, "rate {rate}");
        }
        assert!(!fails(0, f64::NAN));
        assert!(fails(0, 7.0));
    }

    #[tokio::test]
    async fn healthz_answers_ok_without_latency_or_failures() {
        let server = start(config(Duration::from_secs(3600), 1.0)).await;
        let (mut sender, _) = connect(server.addr).await;
        for _ in 0..2 {
            let (status, content_type, body) = send(&mut sender, get("/healthz")).await;
            assert_eq!(
                (status, content_type.as_str(), body.as_str()),
                (StatusCode::OK, "text/plain", "ok")
            );
        }
        assert_eq!(server.echo.requests.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn shutdown_finishes_in_flight_requests_and_closes_idle_connections() {
        let server = start(config(Duration::from_millis(300), 0.0)).await;
        let (mut idle, _) = connect(server.addr).await;
        let (status, _, _) = send(&mut idle, get("/healthz")).await;
        assert_eq!(status, StatusCode::OK);

        let (mut busy, _) = connect(server.addr).await;
        let in_flight = tokio::spawn(async move { send(&mut busy, get("/slow")).await });
        while server.echo.requests.load(Ordering::Relaxed) == 0 {
            tokio::task::yield_now().await;
        }
        server.shutdown.cancel();

        let (status, _, body) = in_flight.await.unwrap();
        assert_eq!(status, StatusCode::OK);
        assert!(body.contains(r#""path":"/slow""#), "{body}");
        server.task.await.unwrap().unwrap();
        // The server closed the idle connection, so a late request on it must fail.
        let late = async {
            idle.ready().await?;
            idle.send_request(get("/")).await
        };
        late.await.unwrap_err();
        TcpStream::connect(server.addr).await.unwrap_err();
    }

    /// One request with `headers`: its status and response headers.
    async fn ask(addr: SocketAddr, headers: &[(&str, &str)]) -> (StatusCode, HeaderMap, String) {
        let (mut sender, _) = connect(addr).await;
        let mut req = get("/controlled");
        for (k, v) in headers {
            req.headers_mut().append(
                header::HeaderName::try_from(*k).unwrap(),
                header::HeaderValue::try_from(*v).unwrap(),
            );
        }
        sender.ready().await.unwrap();
        let response = sender.send_request(req).await.unwrap();
        let (parts, body) = response.into_parts();
        let body = body.collect().await.unwrap().to_bytes();
        (
            parts.status,
            parts.headers,
            String::from_utf8_lossy(&body).into_owned(),
        )
    }

    /// A request sets its own status, delay and extra headers; the first N tries of a
    /// request id fail (with the status asked, else 503) and the next succeeds; a
    /// control that cannot be had is answered 400 saying why.
    #[tokio::test]
    async fn a_request_controls_its_answer() {
        let server = start(config(Duration::ZERO, 0.0)).await;
        let (status, headers, _) = ask(
            server.addr,
            &[
                ("x-echo-status", "418"),
                ("x-echo-response-header", "x-a: 1"),
                ("x-echo-response-header", "x-b: two words"),
            ],
        )
        .await;
        assert_eq!(status, StatusCode::IM_A_TEAPOT);
        assert_eq!(headers["x-a"], "1");
        assert_eq!(headers["x-b"], "two words");
        let tries = |id: &'static str, asked: Option<&'static str>| {
            let addr = server.addr;
            async move {
                let mut h = vec![("x-echo-fail-first", "2"), ("x-echo-request-id", id)];
                if let Some(s) = asked {
                    h.push(("x-echo-status", s));
                }
                let mut out = Vec::new();
                for _ in 0..3 {
                    out.push(ask(addr, &h).await.0.as_u16());
                }
                out
            }
        };
        assert_eq!(tries("r1", None).await, [503, 503, 200]);
        assert_eq!(
            tries("r2", Some("429")).await,
            [429, 429, 200],
            "ids counted apart"
        );
        let start = Instant::now();
        assert_eq!(
            ask(server.addr, &[("x-echo-delay", "150ms")]).await.0,
            StatusCode::OK
        );
        assert!(
            start.elapsed() >= Duration::from_millis(150),
            "the delay asked"
        );
        // A stalled answer comes whole, its second half after the stall.
        let start = Instant::now();
        let (status, headers, body) = ask(server.addr, &[("x-echo-stall", "150ms")]).await;
        assert_eq!(status, StatusCode::OK);
        assert!(!headers.contains_key(header::CONTENT_LENGTH), "{headers:?}");
        assert!(body.contains(r#""path":"/controlled""#), "{body}");
        assert!(start.elapsed() >= Duration::from_millis(150), "the stall");
        for bad in [
            ("x-echo-status", "lots"),
            ("x-echo-delay", "soon"),
            ("x-echo-stall", "a while"),
            ("x-echo-fail-first", "2"),
            ("x-echo-response-header", "no colon"),
        ] {
            let (status, _, body) = ask(server.addr, &[bad]).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{bad:?}");
            assert!(body.contains(bad.0), "{bad:?}: {body}");
        }
    }

    /// The same server answers HTTP/2 with prior knowledge (h2c), as gRPC clients and
    /// h2load --h2 speak it.
    #[tokio::test]
    async fn h2c_is_answered_beside_http1() {
        let server = start(config(Duration::ZERO, 0.0)).await;
        let stream = TcpStream::connect(server.addr).await.unwrap();
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .unwrap();
        tokio::spawn(conn);
        let req = Request::builder()
            .uri(format!("http://{}/h2", server.addr))
            .header("x-echo-response-header", "x-over: h2")
            .body(Empty::<Bytes>::new())
            .unwrap();
        let response = sender.send_request(req).await.unwrap();
        assert_eq!(response.version(), http::Version::HTTP_2);
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()["x-over"], "h2");
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert!(String::from_utf8_lossy(&body).contains(r#""path":"/h2""#));
    }
}
