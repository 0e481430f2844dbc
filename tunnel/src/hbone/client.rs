//! The HBONE client: a pool of mTLS HTTP/2 connections keyed by (source identity and
//! address, destination identity, destination address), each carrying many streams.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::TlsConnector;

use super::readahead::ReadAhead;
use tracing::{debug, Instrument};

use super::stream::H2Stream;
use super::{forwarded_value, Refusal};
use crate::identity::Identity;
use crate::metrics::{DirectionLabels, Metrics, OUTBOUND};
use crate::tls::{describe_handshake_error, server_name, TlsIdentity, ALPN_H2};

/// Client limits.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// Most streams we put on one connection, even if the server allows more.
    pub max_streams_per_connection: usize,
    /// TCP connect plus TLS and HTTP/2 handshakes must finish within this.
    pub connect_timeout: Duration,
    /// The CONNECT answer must arrive within this.
    pub response_timeout: Duration,
    /// A connection with no streams for this long is closed and leaves the pool.
    pub idle_timeout: Duration,
    /// A connection whose server stays silent this long is given up (see
    /// [`PEER_SILENCE`](super::PEER_SILENCE)).
    pub peer_silence: Duration,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            max_streams_per_connection: MAX_STREAMS_PER_CONNECTION,
            connect_timeout: Duration::from_secs(10),
            response_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            peer_silence: super::PEER_SILENCE,
        }
    }
}

/// Makes the socket an HBONE connection is dialled from. The node-proxy creates it inside
/// the source pod's network namespace, marked so the pod's redirect rules let it pass.
pub trait SocketFactory: Send + Sync {
    /// A fresh, unconnected socket for a connection to `dst`.
    fn socket(&self, dst: SocketAddr) -> BoxFuture<'_, io::Result<TcpSocket>>;
}

/// A boxed future, as trait objects need.
pub type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

/// One stream to open: who we are, whom we reach, and the original destination.
#[derive(Clone)]
pub struct ConnectRequest {
    /// The source workload's credentials.
    pub src: Arc<TlsIdentity>,
    /// The source pod's IP to bind the connection to, if any.
    pub src_addr: Option<IpAddr>,
    /// Where to make the socket; a plain host socket when `None`.
    pub socket: Option<Arc<dyn SocketFactory>>,
    /// The identity the destination must prove.
    pub dst: Identity,
    /// Where the destination's HBONE listener is (`pod-ip:15008`).
    pub dst_addr: SocketAddr,
    /// The original destination, sent as `:authority`.
    pub target: SocketAddr,
    /// The original source, sent as `forwarded: for=`.
    pub forwarded_for: Option<SocketAddr>,
    /// W3C trace context to pass on.
    pub traceparent: Option<String>,
    /// For a waypoint: the SPIFFE ID of the client it forwards for, sent as
    /// [`SOURCE_PRINCIPAL`](super::SOURCE_PRINCIPAL). The destination believes it only
    /// from a waypoint.
    pub on_behalf_of: Option<String>,
}

/// Why a stream could not be opened. Messages name the address and suggest a cause.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// TCP connect failed.
    #[error("connect to {addr} failed: {source} (is the destination's node-proxy running, or a NetworkPolicy blocking port 15008?)")]
    Tcp {
        /// The HBONE address.
        addr: SocketAddr,
        /// The socket error.
        source: io::Error,
    },
    /// The TLS handshake failed (including identity checks).
    #[error(
        "mTLS handshake with {addr} ({expected}) failed: {}",
        describe_handshake_error(source)
    )]
    Tls {
        /// The HBONE address.
        addr: SocketAddr,
        /// The identity we required.
        expected: Identity,
        /// What rustls said.
        source: io::Error,
    },
    /// The server did not negotiate `h2`.
    #[error("{addr} did not negotiate ALPN h2; it is not an HBONE server")]
    NoAlpn {
        /// The HBONE address.
        addr: SocketAddr,
    },
    /// The HTTP/2 layer failed.
    #[error("HTTP/2 with {addr} failed: {source}")]
    H2 {
        /// The HBONE address.
        addr: SocketAddr,
        /// What h2 said.
        source: h2::Error,
    },
    /// The connection this stream waited for, dialled for another stream to the same
    /// address, could not be made.
    #[error("{message} (the connection this stream waited for)")]
    DialFailed {
        /// The HBONE address.
        addr: SocketAddr,
        /// The dial's error.
        message: String,
        /// Its reason label.
        reason: &'static str,
        /// Whether it came before a stream, as [`ConnectError::before_stream`].
        before_stream: bool,
    },
    /// A step did not finish in time.
    #[error("{what} with {addr} timed out after {after:?}")]
    Timeout {
        /// Which step.
        what: &'static str,
        /// The HBONE address.
        addr: SocketAddr,
        /// The limit.
        after: Duration,
    },
    /// The CONNECT could not be made from the request: a header value the caller gave
    /// (trace context, source principal) is not a valid HTTP header value.
    #[error("cannot send CONNECT {target}: {source}")]
    BadRequest {
        /// The original destination.
        target: SocketAddr,
        /// What `http` said.
        source: http::Error,
    },
    /// The server answered the CONNECT with an error status.
    #[error("{addr} refused CONNECT {target}: {status}{}", reason(*.status))]
    Refused {
        /// The HBONE address.
        addr: SocketAddr,
        /// The original destination.
        target: SocketAddr,
        /// The status.
        status: StatusCode,
    },
}

/// The one step whose timeout comes after a stream was opened.
const CONNECT_RESPONSE: &str = "CONNECT response";

fn reason(status: StatusCode) -> &'static str {
    match status {
        StatusCode::SERVICE_UNAVAILABLE => " (target unreachable)",
        StatusCode::UNAUTHORIZED => " (denied by policy)",
        StatusCode::BAD_REQUEST => " (malformed request)",
        _ => "",
    }
}

impl ConnectError {
    /// Whether this is the server's answer rather than a transport failure.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            ConnectError::Refused { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// Whether the failure came before a stream was opened on the connection (TCP,
    /// TLS or HTTP/2 setup): nothing of the application's was sent, and the server
    /// never saw the request, so another endpoint may be tried with the same bytes.
    pub fn before_stream(&self) -> bool {
        match self {
            ConnectError::Tcp { .. } | ConnectError::Tls { .. } | ConnectError::NoAlpn { .. } => {
                true
            }
            ConnectError::Timeout { what, .. } => what != &CONNECT_RESPONSE,
            ConnectError::DialFailed { before_stream, .. } => *before_stream,
            ConnectError::H2 { .. }
            | ConnectError::BadRequest { .. }
            | ConnectError::Refused { .. } => false,
        }
    }

    /// A short label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            ConnectError::Tcp { .. } => "connect",
            ConnectError::Tls { .. } => "tls",
            ConnectError::NoAlpn { .. } => "no_alpn",
            ConnectError::H2 { .. } => "h2",
            ConnectError::Timeout { .. } => "timeout",
            ConnectError::DialFailed { reason, .. } => reason,
            ConnectError::BadRequest { .. } => "bad_request",
            ConnectError::Refused { status, .. } => match *status {
                StatusCode::SERVICE_UNAVAILABLE => Refusal::Unreachable.reason(),
                StatusCode::UNAUTHORIZED => Refusal::Denied.reason(),
                _ => "refused",
            },
        }
    }
}

/// Most bytes forwarded before the CONNECT is answered: enough for a request's headers
/// and a small body; a larger upload waits for the answer.
///
/// The server holds early data unread until it has dialled the target, and meanwhile
/// it counts against the shared connection window. Bounded like this, even a full
/// connection of streams all waiting on slow targets cannot use up that window and
/// stall the connection's other streams.
pub const EARLY_DATA_MAX: usize = 16 * 1024;

const _: () = assert!(
    EARLY_DATA_MAX * MAX_STREAMS_PER_CONNECTION <= super::CONNECTION_WINDOW as usize,
    "early data of every stream must fit in the connection window"
);

/// The default for [`PoolConfig::max_streams_per_connection`].
const MAX_STREAMS_PER_CONNECTION: usize = 1000;

/// Bytes the application sent before the CONNECT was answered, until the answer.
struct EarlyData<'a> {
    source: Option<&'a TcpStream>,
    sent: Vec<Bytes>,
    /// Whether the socket was read without waiting for readiness yet.
    asked: bool,
}

/// One early read's size.
const EARLY_READ: usize = 16 * 1024;

impl<'a> EarlyData<'a> {
    fn from(source: Option<&'a TcpStream>) -> Self {
        EarlyData {
            source,
            sent: Vec::new(),
            asked: false,
        }
    }

    /// Bytes read so far.
    fn len(&self) -> usize {
        self.sent.iter().map(Bytes::len).sum()
    }

    /// Reads what the application has sent, up to the limit. `None` once there is
    /// nothing more to forward early: the limit is reached, or the socket is at EOF or
    /// failed (the relay reads that again and handles it).
    async fn next(&mut self) -> Option<Bytes> {
        let source = self.source?;
        loop {
            let room = EARLY_DATA_MAX - self.len();
            if room == 0 {
                self.source = None;
                return None;
            }
            let read = if !self.asked {
                // The first read goes to the socket directly: a just-accepted socket's
                // readiness is unknown to Tokio until its next poll of epoll, and by
                // then the CONNECT would have been written alone.
                self.asked = true;
                let mut buf = bytes::BytesMut::zeroed(room.min(EARLY_READ));
                std::io::Read::read(&mut &*socket2::SockRef::from(source), &mut buf).map(|n| {
                    buf.truncate(n);
                    buf
                })
            } else {
                if source.readable().await.is_err() {
                    self.source = None;
                    return None;
                }
                let mut buf = bytes::BytesMut::with_capacity(room.min(EARLY_READ));
                source.try_read_buf(&mut buf).map(|_| buf)
            };
            match read {
                Ok(buf) if !buf.is_empty() => {
                    let chunk = buf.freeze();
                    self.sent.push(chunk.clone());
                    return Some(chunk);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                _ => {
                    self.source = None;
                    return None;
                }
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct PoolKey {
    src: Identity,
    src_addr: Option<IpAddr>,
    dst: Identity,
    dst_addr: SocketAddr,
}

/// One pooled HTTP/2 connection.
struct Conn {
    id: u64,
    send: h2::client::SendRequest<Bytes>,
    /// Streams open (or being opened) on this connection.
    active: Arc<AtomicUsize>,
    /// Streams ever reserved; the idle check compares it between ticks.
    opened: Arc<AtomicU64>,
    closed: Arc<AtomicBool>,
    /// The source credentials' generation when this connection was made; after a
    /// rotation it gets no new streams and closes when its last stream ends.
    generation: u64,
}

impl Conn {
    /// Takes a stream slot if the connection is alive, current and not full.
    fn try_reserve(&self, generation: u64, limit: usize) -> bool {
        if self.closed.load(Ordering::Acquire) || self.generation != generation {
            return false;
        }
        let limit = limit.min(self.send.current_max_send_streams());
        let reserved = self
            .active
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < limit).then_some(n + 1)
            })
            .is_ok();
        if reserved {
            self.opened.fetch_add(1, Ordering::Relaxed);
        }
        reserved
    }
}

/// One dial at a time per destination; the last one's failure, for those that waited
/// for it.
type DialLock = Arc<tokio::sync::Mutex<Option<DialFailure>>>;

/// A failed dial, as the streams that waited for it report it.
#[derive(Debug, Clone)]
struct DialFailure {
    at: tokio::time::Instant,
    message: String,
    reason: &'static str,
    before_stream: bool,
}

/// A stream's place in its destination's dial queue. However the stream leaves it
/// (dialled, found a connection, failed with the dial it waited for, cancelled), the
/// last one out forgets the destination's lock, so the map stays bounded.
struct Dialing<'a> {
    inner: &'a Inner,
    key: &'a PoolKey,
    lock: DialLock,
}

impl Drop for Dialing<'_> {
    fn drop(&mut self) {
        let mut dialing = self.inner.dialing.lock().unwrap_or_else(|e| e.into_inner());
        // The map's copy and ours are the only ones left: nobody else waits.
        if dialing
            .get(self.key)
            .is_some_and(|l| Arc::ptr_eq(l, &self.lock) && Arc::strong_count(&self.lock) <= 2)
        {
            dialing.remove(self.key);
        }
    }
}

/// A pool of HBONE connections shared by all streams of a process.
///
/// Memory stays bounded by live connections: a connection leaves the pool when it dies
/// or has been idle for `idle_timeout`, and per-key bookkeeping goes with it.
pub struct Pool {
    inner: Arc<Inner>,
}

struct Inner {
    config: PoolConfig,
    metrics: Metrics,
    conns: Mutex<HashMap<PoolKey, Vec<Arc<Conn>>>>,
    /// One dial at a time per key, so a burst of streams shares one new connection
    /// instead of each opening its own.
    dialing: Mutex<HashMap<PoolKey, DialLock>>,
}

impl Pool {
    /// An empty pool.
    pub fn new(config: PoolConfig, metrics: Metrics) -> Self {
        Pool {
            inner: Arc::new(Inner {
                config,
                metrics,
                conns: Mutex::new(HashMap::new()),
                dialing: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// Destinations with a dial in progress or streams waiting for one (for tests).
    pub fn dialling(&self) -> usize {
        self.inner
            .dialing
            .lock()
            .expect("pool lock is never poisoned")
            .len()
    }

    /// Live connections currently in the pool (for tests and the admin dump).
    pub fn connections(&self) -> usize {
        let conns = self
            .inner
            .conns
            .lock()
            .expect("pool lock is never poisoned");
        conns
            .values()
            .flatten()
            .filter(|c| !c.closed.load(Ordering::Acquire))
            .count()
    }

    /// Opens a stream to `req.target` through `req.dst_addr`, reusing a pooled
    /// connection when one has room.
    pub async fn connect(&self, req: &ConnectRequest) -> Result<H2Stream, ConnectError> {
        self.open(req, &mut EarlyData::from(None)).await
    }

    /// Like [`connect`](Self::connect), for a stream that will carry `app`'s bytes: while
    /// the CONNECT waits for its answer, whatever `app` has sent (up to
    /// [`EARLY_DATA_MAX`] bytes) is forwarded on the stream at once instead of after the
    /// answer, which takes one round trip between the proxies off a client-speaks-first
    /// connection. Returns the stream and how many bytes were forwarded early; on an
    /// error those bytes are gone with the refused stream, as the connection is. They
    /// are sent at most once: a stream that fails after them is not opened again.
    pub async fn connect_sending(
        &self,
        req: &ConnectRequest,
        app: &TcpStream,
    ) -> Result<(H2Stream, u64), ConnectError> {
        let mut early = EarlyData::from(Some(app));
        let stream = self.open(req, &mut early).await?;
        Ok((stream, early.len() as u64))
    }

    async fn open(
        &self,
        req: &ConnectRequest,
        early: &mut EarlyData<'_>,
    ) -> Result<H2Stream, ConnectError> {
        let key = PoolKey {
            src: req.src.identity(),
            src_addr: req.src_addr,
            dst: req.dst.clone(),
            dst_addr: req.dst_addr,
        };
        // A pooled connection can die between the check and the send; one retry on a
        // fresh connection covers that without looping on a broken destination. Not once
        // the application's first bytes went out on the stream: the server may have
        // passed them on before the connection died, and sent again they would reach an
        // application twice (a request run twice). The stream fails then, as a TCP
        // connection cut in flight does, and nothing is sent anywhere else either: its
        // error is not `before_stream`.
        let mut retried = false;
        loop {
            let conn = self.inner.checkout(&key, req).await?;
            match self.inner.open_stream(&conn, req, early).await {
                Err(ConnectError::H2 { source, .. })
                    if !retried
                        && early.sent.is_empty()
                        && (source.is_go_away() || source.is_io()) =>
                {
                    conn.closed.store(true, Ordering::Release);
                    retried = true;
                }
                Err(e @ ConnectError::Timeout { .. }) => {
                    // A connection that leaves a CONNECT unanswered may lead to a peer
                    // that is gone without a word: new streams go on a fresh one, and
                    // this one ends with the streams it has.
                    conn.closed.store(true, Ordering::Release);
                    return Err(e);
                }
                other => return other,
            }
        }
    }
}

impl Inner {
    fn find(&self, key: &PoolKey, generation: u64) -> Option<Arc<Conn>> {
        let mut conns = self.conns.lock().expect("pool lock is never poisoned");
        let list = conns.get_mut(key)?;
        list.retain(|c| !c.closed.load(Ordering::Acquire) && c.generation == generation);
        let limit = self.config.max_streams_per_connection;
        let found = list
            .iter()
            .find(|c| c.try_reserve(generation, limit))
            .cloned();
        if list.is_empty() {
            conns.remove(key);
        }
        found
    }

    /// Drops a connection from the pool (it died or idled out).
    fn forget(&self, key: &PoolKey, id: u64) {
        let mut conns = self.conns.lock().expect("pool lock is never poisoned");
        if let Some(list) = conns.get_mut(key) {
            list.retain(|c| c.id != id);
            if list.is_empty() {
                conns.remove(key);
            }
        }
    }

    async fn checkout(
        self: &Arc<Self>,
        key: &PoolKey,
        req: &ConnectRequest,
    ) -> Result<Arc<Conn>, ConnectError> {
        let generation = req.src.generation();
        if let Some(c) = self.find(key, generation) {
            return Ok(c);
        }
        let dialing = Dialing {
            inner: self,
            key,
            lock: {
                let mut dialing = self.dialing.lock().expect("pool lock is never poisoned");
                dialing.entry(key.clone()).or_default().clone()
            },
        };
        let waiting_since = tokio::time::Instant::now();
        let mut last_failure = dialing.lock.lock().await;
        if let Some(c) = self.find(key, generation) {
            return Ok(c);
        }
        // The dial this stream waited for failed: so fails this stream, at once, rather
        // than each waiting stream dialling in turn (a destination that swallows SYNs
        // would hold the k-th of them k connect timeouts). A stream that comes later
        // dials again.
        if let Some(failed) = last_failure.as_ref().filter(|f| f.at >= waiting_since) {
            return Err(ConnectError::DialFailed {
                addr: key.dst_addr,
                message: failed.message.clone(),
                reason: failed.reason,
                before_stream: failed.before_stream,
            });
        }
        let result = self.dial(key, req, generation).await;
        *last_failure = result.as_ref().err().map(|e| DialFailure {
            at: tokio::time::Instant::now(),
            message: e.to_string(),
            reason: e.reason(),
            before_stream: e.before_stream(),
        });
        drop(last_failure);
        drop(dialing);
        let conn = Arc::new(result?);
        // Reserve before publishing, so the connection that was dialled for this stream
        // cannot be filled by others first.
        conn.active.fetch_add(1, Ordering::AcqRel);
        conn.opened.fetch_add(1, Ordering::Relaxed);
        self.conns
            .lock()
            .expect("pool lock is never poisoned")
            .entry(key.clone())
            .or_default()
            .push(conn.clone());
        Ok(conn)
    }

    async fn dial(
        self: &Arc<Self>,
        key: &PoolKey,
        req: &ConnectRequest,
        generation: u64,
    ) -> Result<Conn, ConnectError> {
        let addr = req.dst_addr;
        let timeout = self.config.connect_timeout;
        let timed_out = |what| ConnectError::Timeout {
            what,
            addr,
            after: timeout,
        };
        let deadline = tokio::time::Instant::now() + timeout;
        let socket = match &req.socket {
            Some(factory) => factory.socket(addr).await,
            None if addr.is_ipv4() => TcpSocket::new_v4(),
            None => TcpSocket::new_v6(),
        }
        .map_err(|source| ConnectError::Tcp { addr, source })?;
        if let Some(ip) = req.src_addr {
            socket
                .bind(SocketAddr::new(ip, 0))
                .map_err(|source| ConnectError::Tcp { addr, source })?;
        }
        let tcp = tokio::time::timeout_at(deadline, socket.connect(addr))
            .await
            .map_err(|_| timed_out("TCP connect"))?
            .map_err(|source| ConnectError::Tcp { addr, source })?;
        let _ = tcp.set_nodelay(true);
        super::watch_peer(&tcp, self.config.peer_silence);
        let connector = TlsConnector::from(req.src.client_config(req.dst.clone()));
        let tls = match tokio::time::timeout_at(
            deadline,
            connector.connect(server_name(addr.ip()), ReadAhead::new(tcp)),
        )
        .await
        {
            Err(_) => {
                self.metrics.handshake_failed(OUTBOUND, "timeout");
                return Err(timed_out("TLS handshake"));
            }
            Ok(Err(source)) => {
                self.metrics.handshake_failed(OUTBOUND, "tls");
                return Err(ConnectError::Tls {
                    addr,
                    expected: req.dst.clone(),
                    source,
                });
            }
            Ok(Ok(mut tls)) => {
                tls.get_mut()
                    .1
                    .set_buffer_limit(Some(super::TLS_WRITE_BUFFER));
                tls
            }
        };
        if tls.get_ref().1.alpn_protocol() != Some(ALPN_H2) {
            self.metrics.handshake_failed(OUTBOUND, "no_alpn");
            return Err(ConnectError::NoAlpn { addr });
        }
        let (send, conn) = tokio::time::timeout_at(
            deadline,
            h2::client::Builder::new()
                .initial_window_size(super::STREAM_WINDOW)
                .initial_connection_window_size(super::CONNECTION_WINDOW)
                .max_frame_size(super::MAX_FRAME)
                .max_send_buffer_size(super::SEND_BUFFER)
                .max_header_list_size(super::MAX_HEADER_LIST)
                .enable_push(false)
                .handshake::<_, Bytes>(tls),
        )
        .await
        .map_err(|_| timed_out("HTTP/2 handshake"))?
        .map_err(|source| ConnectError::H2 { addr, source })?;
        static NEXT_ID: AtomicU64 = AtomicU64::new(0);
        let pooled = Conn {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            send,
            active: Arc::new(AtomicUsize::new(0)),
            opened: Arc::new(AtomicU64::new(0)),
            closed: Arc::new(AtomicBool::new(false)),
            generation,
        };
        let dir = DirectionLabels {
            direction: OUTBOUND,
        };
        self.metrics.connections.get_or_create(&dir).inc();
        let open = self.metrics.connections_open.get_or_create(&dir).clone();
        open.inc();
        let (id, active, opened, closed) = (
            pooled.id,
            pooled.active.clone(),
            pooled.opened.clone(),
            pooled.closed.clone(),
        );
        let (pool, key, idle) = (Arc::downgrade(self), key.clone(), self.config.idle_timeout);
        let span = tracing::debug_span!("hbone_out", dst = %req.dst, %addr);
        tokio::spawn(
            async move {
                tokio::pin!(conn);
                let mut last_opened = u64::MAX;
                loop {
                    tokio::select! {
                        ended = &mut conn => {
                            if let Err(e) = ended {
                                debug!("HBONE connection ended: {e}");
                            }
                            break;
                        }
                        _ = tokio::time::sleep(idle), if !closed.load(Ordering::Acquire) => {
                            // Idle for a whole period: no stream open now and none
                            // opened since the last tick. Leaving the pool drops our
                            // request handle, so h2 closes the connection cleanly.
                            let now = opened.load(Ordering::Relaxed);
                            if active.load(Ordering::Acquire) == 0 && now == last_opened {
                                debug!("HBONE connection idle; closing");
                                closed.store(true, Ordering::Release);
                                if let Some(pool) = pool.upgrade() {
                                    pool.forget(&key, id);
                                }
                            }
                            last_opened = now;
                        }
                    }
                }
                closed.store(true, Ordering::Release);
                open.dec();
                if let Some(pool) = pool.upgrade() {
                    pool.forget(&key, id);
                }
            }
            .instrument(span),
        );
        debug!(src = %req.src.identity(), dst = %req.dst, %addr, "HBONE connection established");
        Ok(pooled)
    }

    /// Sends the CONNECT on a reserved slot of `conn` and waits for the answer,
    /// forwarding `early` data meanwhile.
    async fn open_stream(
        &self,
        conn: &Conn,
        req: &ConnectRequest,
        early: &mut EarlyData<'_>,
    ) -> Result<H2Stream, ConnectError> {
        let addr = req.dst_addr;
        let release = {
            let active = conn.active.clone();
            move || {
                active.fetch_sub(1, Ordering::AcqRel);
            }
        };
        let h2_err = |source| ConnectError::H2 { addr, source };
        let mut request = Request::builder()
            .method(Method::CONNECT)
            .uri(req.target.to_string());
        if let Some(src) = req.forwarded_for {
            request = request.header(http::header::FORWARDED, forwarded_value(src));
        }
        if let Some(id) = &req.on_behalf_of {
            request = request.header(super::SOURCE_PRINCIPAL, id.as_str());
        }
        if let Some(tp) = &req.traceparent {
            request = request.header("traceparent", tp.as_str());
        }
        // The caller's trace and principal strings become header values; one that is
        // not a valid header value is the caller's error, not a panic.
        let request = match request.body(()) {
            Ok(request) => request,
            Err(source) => {
                release();
                return Err(ConnectError::BadRequest {
                    target: req.target,
                    source,
                });
            }
        };
        let sent = async {
            let mut send = conn.send.clone().ready().await?;
            send.send_request(request, false)
        }
        .await;
        let (response, mut send_stream) = match sent {
            Ok(x) => x,
            Err(e) => {
                release();
                return Err(h2_err(e));
            }
        };
        // h2 buffers DATA beyond the peer's window, and early data is bounded, so
        // these sends never wait. (Empty: a stream is opened again only when nothing
        // had been sent on the one before.)
        let sending = early
            .sent
            .iter()
            .try_for_each(|chunk| send_stream.send_data(chunk.clone(), false));
        let timeout = self.config.response_timeout;
        let answer = async {
            sending?;
            let mut response = std::pin::pin!(response);
            loop {
                tokio::select! {
                    biased;
                    r = &mut response => return r,
                    Some(chunk) = early.next() => send_stream.send_data(chunk, false)?,
                }
            }
        };
        let response = match tokio::time::timeout(timeout, answer).await {
            Err(_) => {
                release();
                return Err(ConnectError::Timeout {
                    what: CONNECT_RESPONSE,
                    addr,
                    after: timeout,
                });
            }
            Ok(Err(e)) => {
                release();
                return Err(h2_err(e));
            }
            Ok(Ok(r)) => r,
        };
        if response.status() != StatusCode::OK {
            release();
            let err = ConnectError::Refused {
                addr,
                target: req.target,
                status: response.status(),
            };
            self.metrics.stream_refused(OUTBOUND, err.reason());
            return Err(err);
        }
        let dir = DirectionLabels {
            direction: OUTBOUND,
        };
        self.metrics.streams.get_or_create(&dir).inc();
        let open = self.metrics.streams_open.get_or_create(&dir).clone();
        open.inc();
        Ok(H2Stream::new(
            send_stream,
            response.into_body(),
            Some(Box::new(move || {
                release();
                open.dec();
            })),
        ))
    }
}
