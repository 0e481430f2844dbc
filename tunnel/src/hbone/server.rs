//! The HBONE server: accepts mTLS connections, checks each CONNECT, and hands
//! well-formed streams to a [`Handler`] along with the peer's verified identity.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use h2::server::SendResponse;
use h2::RecvStream;
use http::{HeaderValue, Request, Response, StatusCode};
use rustls_pki_types::CertificateDer;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;

use super::readahead::ReadAhead;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn, Instrument};

use super::stream::H2Stream;
use super::{parse_connect, Refusal};
use crate::identity::Identity;
use crate::metrics::{DirectionLabels, Metrics, INBOUND};
use crate::tls::{peer_identity, TlsIdentity};

/// Server limits and checks.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Connections served at once; further connections wait in the kernel backlog.
    pub max_connections: usize,
    /// Concurrent CONNECT streams a client may open on one connection (advertised as
    /// SETTINGS_MAX_CONCURRENT_STREAMS; the client opens another connection beyond it).
    pub max_streams_per_connection: u32,
    /// Refuse (400) a CONNECT whose authority IP is not the local address the client
    /// dialled. On for node-proxies, where each pod's HBONE listener serves that pod
    /// only; off for waypoints, which receive traffic for service addresses.
    pub require_local_authority: bool,
    /// Target ports refused with 503 because they are the proxy's own.
    pub proxy_ports: Vec<u16>,
    /// A TLS handshake that takes longer is abandoned, and so is a connection whose
    /// HTTP/2 preface does not follow within as long again.
    pub handshake_timeout: Duration,
    /// A connection with no stream open for this long (up to twice it) is closed with
    /// GOAWAY, so peers that open connections and leave them cannot hold them forever.
    /// A peer that does not let it close (it does not answer the GOAWAY's PING) is cut
    /// off one period later. Longer than the client pool's idle timeout, which normally
    /// closes first.
    pub idle_timeout: Duration,
    /// A connection whose client stays silent this long is given up, and its streams
    /// with it (see [`PEER_SILENCE`](super::PEER_SILENCE)).
    pub peer_silence: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_connections: 4096,
            max_streams_per_connection: 1000,
            require_local_authority: true,
            proxy_ports: super::PROXY_PORTS.to_vec(),
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
            peer_silence: super::PEER_SILENCE,
        }
    }
}

/// Serves the streams a server accepted. Implementations connect to the target (or
/// refuse), enforce policy, then move bytes.
pub trait Handler: Send + Sync + 'static {
    /// Handles one well-formed CONNECT; must answer it with `accept` or `refuse`. The
    /// future is spawned as it is, so what it holds is what an open stream costs.
    fn handle(
        self: Arc<Self>,
        request: InboundRequest,
    ) -> impl Future<Output = ()> + Send + 'static;
}

/// A CONNECT that passed the protocol checks, waiting for an answer.
pub struct InboundRequest {
    /// The verified identity of the client.
    pub peer: Identity,
    /// The client's leaf certificate (shared by all streams of the connection), for
    /// audit logs and debugging.
    pub peer_leaf: Arc<CertificateDer<'static>>,
    /// The client's address on the HBONE connection.
    pub peer_addr: SocketAddr,
    /// The original destination, from `:authority`.
    pub target: SocketAddr,
    /// The original source, from `forwarded: for=`, when the client sent it.
    pub forwarded_for: Option<SocketAddr>,
    /// W3C trace context, passed through untouched.
    pub traceparent: Option<HeaderValue>,
    /// The client a waypoint says it forwards for ([`SOURCE_PRINCIPAL`](super::SOURCE_PRINCIPAL)),
    /// when sent as text; to be believed only from a waypoint's identity.
    pub on_behalf_of: Option<String>,
    /// W3C baggage, passed through untouched.
    pub baggage: Option<HeaderValue>,
    respond: SendResponse<Bytes>,
    recv: RecvStream,
    metrics: Metrics,
}

impl std::fmt::Debug for InboundRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InboundRequest")
            .field("peer", &self.peer)
            .field("peer_addr", &self.peer_addr)
            .field("target", &self.target)
            .finish()
    }
}

impl InboundRequest {
    /// Answers 200 and returns the stream.
    pub fn accept(mut self) -> io::Result<H2Stream> {
        let send = self
            .respond
            .send_response(ok_response(), false)
            .map_err(io::Error::other)?;
        self.metrics
            .streams
            .get_or_create(&DirectionLabels { direction: INBOUND })
            .inc();
        let open = self
            .metrics
            .streams_open
            .get_or_create(&DirectionLabels { direction: INBOUND })
            .clone();
        open.inc();
        Ok(H2Stream::new(
            send,
            self.recv,
            Some(Box::new(move || {
                open.dec();
            })),
        ))
    }

    /// Answers with the refusal's status, logs and counts it.
    pub fn refuse(self, refusal: Refusal) {
        self.refuse_because(refusal, None)
    }

    /// As [`refuse`](Self::refuse), with what went wrong for the log ("connection
    /// refused", "no answer within 5s"); the peer sees only the status.
    pub fn refuse_because(mut self, refusal: Refusal, cause: Option<&str>) {
        match cause {
            Some(cause) => {
                info!(peer = %self.peer, target = %self.target, reason = refusal.reason(), "HBONE stream refused: {refusal}: {cause}")
            }
            None => {
                info!(peer = %self.peer, target = %self.target, reason = refusal.reason(), "HBONE stream refused: {refusal}")
            }
        }
        self.metrics.stream_refused(INBOUND, refusal.reason());
        let _ = self
            .respond
            .send_response(status_response(refusal.status()), true);
    }
}

fn peer_leaf(conn: &rustls::CommonState) -> Arc<CertificateDer<'static>> {
    // The handshake succeeded with client auth mandatory, so a leaf is present.
    Arc::new(
        conn.peer_certificates()
            .and_then(|c| c.first())
            .cloned()
            .unwrap_or_else(|| CertificateDer::from(Vec::new())),
    )
}

fn ok_response() -> Response<()> {
    status_response(StatusCode::OK)
}

fn status_response(status: StatusCode) -> Response<()> {
    let mut r = Response::new(());
    *r.status_mut() = status;
    r
}

/// The plain forwarding handler: connect to the target over TCP and copy bytes both
/// ways, 503 when the target does not answer. The node-proxy wraps this with policy and
/// source-address preservation; tests and benchmarks use it as is.
#[derive(Debug, Clone)]
pub struct Forward {
    /// How long to wait for the target's SYN-ACK.
    pub connect_timeout: Duration,
}

impl Default for Forward {
    fn default() -> Self {
        Forward {
            connect_timeout: Duration::from_secs(5),
        }
    }
}

impl Handler for Forward {
    async fn handle(self: Arc<Self>, request: InboundRequest) {
        let target = request.target;
        let upstream =
            match tokio::time::timeout(self.connect_timeout, TcpStream::connect(target)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    return request.refuse_because(Refusal::Unreachable, Some(&e.to_string()));
                }
                Err(_) => {
                    return request.refuse_because(Refusal::Unreachable, Some("connect timed out"));
                }
            };
        let _ = upstream.set_nodelay(true);
        let Ok(stream) = request.accept() else {
            return;
        };
        if let Err(e) = stream.copy_bidirectional(upstream).await {
            debug!(%target, "stream ended with error: {e}");
        }
    }
}

/// An HBONE server for one workload identity.
pub struct Server {
    acceptor: TlsAcceptor,
    config: ServerConfig,
    metrics: Metrics,
    limit: Arc<Semaphore>,
}

/// Why an inbound TLS handshake failed, as a metric label.
fn handshake_reason(e: &io::Error) -> &'static str {
    use rustls::{AlertDescription, CertificateError, Error as TlsErr};
    let Some(tls) = e.get_ref().and_then(|e| e.downcast_ref::<TlsErr>()) else {
        return match e.kind() {
            io::ErrorKind::UnexpectedEof => "eof",
            _ => "io",
        };
    };
    match tls {
        TlsErr::InvalidCertificate(c) => match c {
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => "expired",
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                "not_yet_valid"
            }
            CertificateError::UnknownIssuer => "untrusted_chain",
            CertificateError::BadSignature => "untrusted_chain",
            CertificateError::Other(_) => "wrong_identity",
            _ => "bad_certificate",
        },
        TlsErr::NoCertificatesPresented => "no_client_cert",
        TlsErr::InvalidMessage(_) => "not_tls",
        TlsErr::NoApplicationProtocol => "no_alpn",
        TlsErr::AlertReceived(AlertDescription::BadCertificate)
        | TlsErr::AlertReceived(AlertDescription::UnknownCA)
        | TlsErr::AlertReceived(AlertDescription::CertificateUnknown) => "peer_rejected_cert",
        TlsErr::PeerIncompatible(_) => "incompatible",
        _ => "tls",
    }
}

impl Server {
    /// A server presenting `tls`'s identity.
    pub fn new(tls: &Arc<TlsIdentity>, config: ServerConfig, metrics: Metrics) -> Self {
        Server {
            acceptor: TlsAcceptor::from(tls.server_config()),
            limit: Arc::new(Semaphore::new(config.max_connections)),
            config,
            metrics,
        }
    }

    /// Accepts connections until `drain` fires, then stops accepting, lets open
    /// streams finish (GOAWAY), and force-closes what is left after `grace`.
    pub async fn serve<H: Handler>(
        self: Arc<Self>,
        listener: TcpListener,
        handler: Arc<H>,
        drain: CancellationToken,
        grace: Duration,
    ) {
        let tracker = TaskTracker::new();
        let force = CancellationToken::new();
        loop {
            let permit = tokio::select! {
                _ = drain.cancelled() => break,
                p = self.limit.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => break,
                },
            };
            let (tcp, peer_addr) = tokio::select! {
                _ = drain.cancelled() => break,
                accepted = crate::net::accept(&listener, "HBONE") => accepted,
            };
            let this = self.clone();
            let handler = handler.clone();
            let (drain, force) = (drain.clone(), force.clone());
            tracker.spawn(async move {
                this.serve_connection(tcp, peer_addr, handler, drain, force)
                    .await;
                drop(permit);
            });
        }
        drop(listener);
        tracker.close();
        if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
            warn!(
                remaining = tracker.len(),
                "HBONE drain deadline passed; closing remaining connections"
            );
            force.cancel();
            tracker.wait().await;
        }
    }

    /// Serves one accepted TCP connection to the end.
    pub async fn serve_connection<H: Handler>(
        &self,
        tcp: TcpStream,
        peer_addr: SocketAddr,
        handler: Arc<H>,
        drain: CancellationToken,
        force: CancellationToken,
    ) {
        // A dual-stack listener reports IPv4 as IPv4-mapped IPv6: compare as IPv4.
        let canonical = |a: SocketAddr| SocketAddr::new(a.ip().to_canonical(), a.port());
        let local_addr = match tcp.local_addr() {
            Ok(a) => canonical(a),
            Err(_) => return,
        };
        let peer_addr = canonical(peer_addr);
        let _ = tcp.set_nodelay(true);
        super::watch_peer(&tcp, self.config.peer_silence);
        let span = tracing::info_span!("hbone_in", peer = %peer_addr, local = %local_addr);
        async move {
            let tls = match tokio::time::timeout(
                self.config.handshake_timeout,
                self.acceptor.accept(ReadAhead::new(tcp)),
            )
            .await
            {
                Ok(Ok(mut tls)) => {
                    tls.get_mut()
                        .1
                        .set_buffer_limit(Some(super::TLS_WRITE_BUFFER));
                    tls
                }
                Ok(Err(e)) => {
                    let reason = handshake_reason(&e);
                    self.metrics.handshake_failed(INBOUND, reason);
                    info!(
                        reason,
                        "HBONE connection refused: TLS handshake failed: {e}"
                    );
                    return;
                }
                Err(_) => {
                    self.metrics.handshake_failed(INBOUND, "timeout");
                    info!("HBONE connection refused: TLS handshake timed out");
                    return;
                }
            };
            let peer = match peer_identity(tls.get_ref().1) {
                Ok(p) => (p, peer_leaf(tls.get_ref().1)),
                Err(e) => {
                    self.metrics.handshake_failed(INBOUND, "wrong_identity");
                    info!("HBONE connection refused: {e}");
                    return;
                }
            };
            let dir = DirectionLabels { direction: INBOUND };
            self.metrics.connections.get_or_create(&dir).inc();
            let open = self.metrics.connections_open.get_or_create(&dir).clone();
            open.inc();
            debug!(peer = %peer.0, "HBONE connection established");
            // A peer that finished TLS and then says nothing would otherwise hold its
            // slot of `max_connections` for good.
            let conn = tokio::time::timeout(
                self.config.handshake_timeout,
                h2::server::Builder::new()
                    .initial_window_size(super::STREAM_WINDOW)
                    .initial_connection_window_size(super::CONNECTION_WINDOW)
                    .max_frame_size(super::MAX_FRAME)
                    .max_send_buffer_size(super::SEND_BUFFER)
                    .max_concurrent_streams(self.config.max_streams_per_connection)
                    .max_header_list_size(super::MAX_HEADER_LIST)
                    .handshake::<_, Bytes>(tls),
            )
            .await;
            match conn {
                Ok(Ok(conn)) => {
                    self.drive(conn, peer, peer_addr, local_addr, handler, drain, force)
                        .await
                }
                Ok(Err(e)) => {
                    self.metrics.handshake_failed(INBOUND, "not_h2");
                    info!("HBONE connection refused: HTTP/2 handshake failed: {e}");
                }
                Err(_) => {
                    self.metrics.handshake_failed(INBOUND, "timeout");
                    info!(
                        peer = %peer.0,
                        "HBONE connection refused: no HTTP/2 preface within {:?} of the TLS handshake",
                        self.config.handshake_timeout
                    );
                }
            }
            open.dec();
        }
        .instrument(span)
        .await
    }

    #[allow(clippy::too_many_arguments)]
    async fn drive<H: Handler>(
        &self,
        mut conn: h2::server::Connection<
            tokio_rustls::server::TlsStream<ReadAhead<TcpStream>>,
            Bytes,
        >,
        peer: (Identity, Arc<CertificateDer<'static>>),
        peer_addr: SocketAddr,
        local_addr: SocketAddr,
        handler: Arc<H>,
        drain: CancellationToken,
        force: CancellationToken,
    ) {
        let mut draining = false;
        // The connection's stream tasks. No stream open at the last tick, and none
        // accepted since, means a whole tick without a stream: the connection is idle.
        let streams = TaskTracker::new();
        let (mut accepted, mut was_empty) = (0u64, true);
        let mut idle = tokio::time::interval(self.config.idle_timeout);
        idle.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        idle.tick().await;
        loop {
            let next = tokio::select! {
                next = conn.accept() => next,
                _ = idle.tick() => {
                    if draining {
                        // A period after the GOAWAY: a connection still open without
                        // a stream has a peer that does not let it close.
                        if streams.is_empty() {
                            debug!(peer = %peer.0, "HBONE connection not closed by its peer a period after GOAWAY; cutting it off");
                            conn.abrupt_shutdown(h2::Reason::NO_ERROR);
                            return;
                        }
                        continue;
                    }
                    if accepted == 0 && was_empty {
                        debug!(peer = %peer.0, "HBONE connection idle for {:?}; closing", self.config.idle_timeout);
                        conn.graceful_shutdown();
                        draining = true;
                    }
                    (accepted, was_empty) = (0, streams.is_empty());
                    continue;
                }
                _ = drain.cancelled(), if !draining => {
                    // GOAWAY: no new streams; `accept` returns None once open ones end.
                    conn.graceful_shutdown();
                    draining = true;
                    continue;
                }
                _ = force.cancelled() => {
                    conn.abrupt_shutdown(h2::Reason::NO_ERROR);
                    return;
                }
            };
            let (req, respond) = match next {
                None => return,
                Some(Ok(x)) => x,
                Some(Err(e)) => {
                    debug!("HBONE connection ended: {e}");
                    return;
                }
            };
            if let Some(request) = self.check(req, respond, &peer, peer_addr, local_addr) {
                accepted += 1;
                // Spawned as it is (the tracker's wrapper adds a pointer): an async block
                // awaiting it would hold the future twice, as the capture and the awaitee.
                streams.spawn(
                    handler
                        .clone()
                        .handle(request)
                        .instrument(tracing::Span::current()),
                );
            }
        }
    }

    fn check(
        &self,
        req: Request<RecvStream>,
        mut respond: SendResponse<Bytes>,
        (peer, peer_leaf): &(Identity, Arc<CertificateDer<'static>>),
        peer_addr: SocketAddr,
        local_addr: SocketAddr,
    ) -> Option<InboundRequest> {
        let (parts, recv) = req.into_parts();
        let refusal = match parse_connect(&parts.method, &parts.uri, &parts.headers) {
            Ok(c) if self.config.require_local_authority && c.target.ip() != local_addr.ip() => {
                Err(Refusal::AuthorityMismatch)
            }
            Ok(c) if self.config.proxy_ports.contains(&c.target.port()) => Err(Refusal::ProxyPort),
            other => other,
        };
        match refusal {
            Ok(c) => Some(InboundRequest {
                peer: peer.clone(),
                peer_leaf: peer_leaf.clone(),
                peer_addr,
                target: c.target,
                forwarded_for: c.forwarded_for,
                traceparent: parts.headers.get("traceparent").cloned(),
                on_behalf_of: parts
                    .headers
                    .get(super::SOURCE_PRINCIPAL)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned),
                baggage: parts.headers.get("baggage").cloned(),
                respond,
                recv,
                metrics: self.metrics.clone(),
            }),
            Err(refusal) => {
                info!(%peer, method = %parts.method, authority = ?parts.uri.authority().map(|a| a.as_str()), reason = refusal.reason(), "HBONE stream refused: {refusal}");
                self.metrics.stream_refused(INBOUND, refusal.reason());
                let _ = respond.send_response(status_response(refusal.status()), true);
                None
            }
        }
    }
}
