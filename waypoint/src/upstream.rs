//! Connections from the waypoint to endpoints: HBONE (with the waypoint's identity,
//! naming the client it forwards for) to meshed endpoints, plain TCP from the
//! waypoint's namespace to the others; HTTP/1.1 or HTTP/2 on top, kept alive.
//!
//! Connections are pooled by (client principal, endpoint, HTTP version): the
//! destination node-proxy authorizes each HBONE stream as the client named on it, so
//! requests of different clients never share one. An HTTP/1.1 connection goes back
//! to the pool as soon as its request is sent and is handed out again once its
//! response has been read to the end; an HTTP/2 one is shared.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use api::model::Target;
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::combinators::BoxBody;
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use runtime::netns::Netns;
use runtime::netns::PodSockets;
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::debug;
use tunnel::hbone::{ConnectRequest, Pool};
use tunnel::identity::Identity;
use tunnel::tls::TlsIdentity;

/// Errors of bodies the waypoint forwards.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body of every request and response the waypoint sends.
pub type Body = BoxBody<Bytes, BoxError>;

/// A byte stream to an endpoint.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}

/// Why a request did not get a response from the endpoint.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// The endpoint could not be reached (HBONE refused, TCP refused, handshake).
    #[error("cannot connect to {addr}: {why}")]
    Connect {
        /// The endpoint.
        addr: SocketAddr,
        /// Why.
        why: String,
    },
    /// The connection broke before a response arrived.
    #[error("{addr} did not answer: {source}")]
    Request {
        /// The endpoint.
        addr: SocketAddr,
        /// Why.
        source: hyper::Error,
    },
}

type Key = (String, SocketAddr, bool);
/// Pooled HTTP/1.1 connections, oldest first, and when each was last handed out.
type Idle = Vec<(Instant, http1::SendRequest<Body>)>;

/// Idle HTTP/1.1 connections kept per key (busy ones are not counted: they are bounded
/// by the requests in flight), and how long one may stay unused.
const IDLE_PER_KEY: usize = 64;
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a connection to an endpoint outside the mesh may take to be accepted, as
/// HBONE's dial may: an address that drops packets fails the attempt (and counts
/// against the endpoint) instead of holding it for the kernel's SYN retries (~2 min).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How often [`Upstreams::sweep`] should run: often enough that an idle connection
/// outlives [`IDLE_TIMEOUT`] by at most half of it.
pub const SWEEP_EVERY: Duration = Duration::from_secs(30);

/// Connects to endpoints and pools the connections.
pub struct Upstreams {
    /// The waypoint's credentials.
    pub tls: Arc<TlsIdentity>,
    /// The waypoint pod's IP, the source of its connections.
    pub pod_ip: IpAddr,
    /// The waypoint pod's namespace, where its sockets are made.
    pub netns: Arc<Netns>,
    /// The HBONE client.
    pub pool: Pool,
    /// The trust domain, for endpoint identities.
    pub trust_domain: String,
    idle: Mutex<HashMap<Key, Idle>>,
    shared: Mutex<HashMap<Key, http2::SendRequest<Body>>>,
}

impl Upstreams {
    /// A pool with nothing in it.
    pub fn new(
        tls: Arc<TlsIdentity>,
        pod_ip: IpAddr,
        netns: Arc<Netns>,
        pool: Pool,
        trust_domain: String,
    ) -> Arc<Self> {
        Arc::new(Upstreams {
            tls,
            pod_ip,
            netns,
            pool,
            trust_domain,
            idle: Mutex::new(HashMap::new()),
            shared: Mutex::new(HashMap::new()),
        })
    }

    /// A byte stream to `target`, on behalf of `principal` (empty: plaintext client).
    pub async fn dial(
        &self,
        target: &Target,
        principal: &str,
        forwarded_for: Option<SocketAddr>,
    ) -> Result<Pin<Box<dyn Io>>, UpstreamError> {
        let addr = target.addr;
        let fail = |why: String| UpstreamError::Connect { addr, why };
        match &target.workload {
            Some(w) if w.enrolled => {
                let dst = Identity::new(&self.trust_domain, &w.namespace, &w.service_account)
                    .map_err(|e| fail(e.to_string()))?;
                let request = ConnectRequest {
                    src: self.tls.clone(),
                    src_addr: Some(self.pod_ip),
                    socket: Some(Arc::new(PodSockets(self.netns.clone()))),
                    dst,
                    dst_addr: SocketAddr::new(addr.ip(), tunnel::hbone::PORT),
                    target: addr,
                    forwarded_for,
                    traceparent: None,
                    on_behalf_of: (!principal.is_empty()).then(|| principal.to_owned()),
                };
                let stream = self
                    .pool
                    .connect(&request)
                    .await
                    .map_err(|e| fail(e.to_string()))?;
                Ok(Box::pin(stream))
            }
            _ => {
                let socket = self
                    .netns
                    .outbound_socket(addr)
                    .map_err(|e| fail(e.to_string()))?;
                let tcp = tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(addr))
                    .await
                    .map_err(|_| {
                        fail(format!(
                            "no answer to the connection within {} s",
                            CONNECT_TIMEOUT.as_secs()
                        ))
                    })?
                    .map_err(|e| fail(e.to_string()))?;
                Ok(Box::pin(tcp))
            }
        }
    }

    /// Sends `req` to `target` over a pooled connection of the request's HTTP version.
    pub async fn send(
        self: &Arc<Self>,
        target: &Target,
        principal: &str,
        req: Request<Body>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let addr = target.addr;
        let h2 = req.version() == http::Version::HTTP_2;
        let key: Key = (principal.to_owned(), addr, h2);
        if h2 {
            let mut sender = self.h2_sender(&key, target, principal).await?;
            return sender
                .send_request(req)
                .await
                .map_err(|source| UpstreamError::Request { addr, source });
        }
        let mut sender = match self.checkout(&key) {
            Some(s) => s,
            None => self.http1(target, principal, false).await?,
        };
        let response = sender.send_request(req);
        // Back in the pool at once, busy until its response has been read: no task
        // waits for that per request. Past IDLE_PER_KEY entries the list is trimmed of
        // closed, stale and surplus idle connections.
        {
            let mut idle = self.idle.lock().expect("idle lock");
            let list = idle.entry(key).or_default();
            let now = Instant::now();
            if list.len() >= IDLE_PER_KEY {
                trim(list, now);
            }
            list.push((now, sender));
        }
        response
            .await
            .map_err(|source| UpstreamError::Request { addr, source })
    }

    /// Sends an HTTP/1.1 upgrade request (WebSocket) on a connection of its own.
    pub async fn send_upgrade(
        &self,
        target: &Target,
        principal: &str,
        req: Request<Body>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let addr = target.addr;
        let mut sender = self.http1(target, principal, true).await?;
        sender
            .send_request(req)
            .await
            .map_err(|source| UpstreamError::Request { addr, source })
    }

    /// A new HTTP/1.1 connection to `target`, its connection task spawned (serving
    /// upgrades when `upgrades`).
    async fn http1(
        &self,
        target: &Target,
        principal: &str,
        upgrades: bool,
    ) -> Result<http1::SendRequest<Body>, UpstreamError> {
        let addr = target.addr;
        let io = self.dial(target, principal, None).await?;
        let (sender, conn) = http1::Builder::new()
            .handshake(TokioIo::new(io))
            .await
            .map_err(|e| UpstreamError::Connect {
                addr,
                why: e.to_string(),
            })?;
        tokio::spawn(async move {
            let ended = match upgrades {
                true => conn.with_upgrades().await,
                false => conn.await,
            };
            if let Err(e) = ended {
                debug!(%addr, "upstream connection ended: {e}");
            }
        });
        Ok(sender)
    }

    /// A pooled connection that can take a request now: busy ones (their response
    /// still being read) stay, closed ones and ones unused too long go.
    fn checkout(&self, key: &Key) -> Option<http1::SendRequest<Body>> {
        let mut idle = self.idle.lock().expect("idle lock");
        let list = idle.get_mut(key)?;
        trim(list, Instant::now());
        let found = list
            .iter()
            .rposition(|(_, s)| s.is_ready())
            .map(|i| list.remove(i).1);
        if list.is_empty() {
            idle.remove(key);
        }
        found
    }

    async fn h2_sender(
        &self,
        key: &Key,
        target: &Target,
        principal: &str,
    ) -> Result<http2::SendRequest<Body>, UpstreamError> {
        if let Some(s) = self.shared.lock().expect("shared lock").get(key) {
            if !s.is_closed() {
                return Ok(s.clone());
            }
        }
        let addr = target.addr;
        let io = self.dial(target, principal, None).await?;
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .handshake(TokioIo::new(io))
            .await
            .map_err(|e| UpstreamError::Connect {
                addr,
                why: e.to_string(),
            })?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                debug!(%addr, "upstream h2 connection ended: {e}");
            }
        });
        let mut shared = self.shared.lock().expect("shared lock");
        shared.retain(|_, s| !s.is_closed());
        shared.insert(key.clone(), sender.clone());
        Ok(sender)
    }

    /// Lets go of connections no request will take: idle ones past [`IDLE_TIMEOUT`]
    /// or [`IDLE_PER_KEY`], closed ones, and the keys left with none. A key is trimmed
    /// when it is checked out, but an endpoint that left the model never is again; only
    /// this frees what was pooled for it. Run every [`SWEEP_EVERY`].
    pub fn sweep(&self) {
        sweep(&mut self.idle.lock().expect("idle lock"), Instant::now());
        self.shared
            .lock()
            .expect("shared lock")
            .retain(|_, s| !s.is_closed());
    }

    /// Idle HTTP/1.1 connections and shared HTTP/2 ones, for `/config_dump`.
    pub fn pooled(&self) -> (usize, usize) {
        let idle = self
            .idle
            .lock()
            .expect("idle lock")
            .values()
            .flatten()
            .filter(|(_, s)| s.is_ready())
            .count();
        (idle, self.shared.lock().expect("shared lock").len())
    }
}

/// Drops from `list` the closed connections, the idle ones unused for
/// [`IDLE_TIMEOUT`], and the oldest idle ones past [`IDLE_PER_KEY`]; busy ones stay.
fn trim(list: &mut Idle, now: Instant) {
    list.retain(|(since, s)| {
        !s.is_closed() && (!s.is_ready() || now.duration_since(*since) < IDLE_TIMEOUT)
    });
    let mut surplus = list
        .iter()
        .filter(|(_, s)| s.is_ready())
        .count()
        .saturating_sub(IDLE_PER_KEY);
    list.retain(|(_, s)| {
        let drop = surplus > 0 && s.is_ready();
        surplus -= usize::from(drop);
        !drop
    });
}

/// Trims every key's list, and forgets the keys left with no connection.
fn sweep(idle: &mut HashMap<Key, Idle>, now: Instant) {
    idle.retain(|_, list| {
        trim(list, now);
        !list.is_empty()
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Empty};
    use tokio::sync::watch;

    /// An HTTP/1.1 connection to an in-process server that answers 200 to everything
    /// once `go` is true.
    async fn connection(go: &watch::Receiver<bool>) -> http1::SendRequest<Body> {
        let (client, server) = tokio::io::duplex(4096);
        let go = go.clone();
        let service = hyper::service::service_fn(move |_req| {
            let mut go = go.clone();
            async move {
                let _ = go.wait_for(|go| *go).await;
                Ok::<_, std::convert::Infallible>(Response::new(Empty::<Bytes>::new()))
            }
        });
        tokio::spawn(
            hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(server), service),
        );
        let (sender, conn) = http1::handshake(TokioIo::new(client))
            .await
            .expect("handshake");
        tokio::spawn(conn);
        sender
    }

    fn request() -> Request<Body> {
        Request::builder()
            .uri("/")
            .header(http::header::HOST, "test")
            .body(Empty::new().map_err(|e| -> BoxError { match e {} }).boxed())
            .expect("request")
    }

    #[tokio::test]
    async fn busy_connections_stay_pooled_and_idle_ones_are_bounded() {
        let now = Instant::now();
        let (answer, go) = watch::channel(false);
        let mut list = Idle::new();
        // More requests in flight than idle connections are kept: every connection
        // stays pooled while its response is pending.
        let mut pending = Vec::new();
        for _ in 0..IDLE_PER_KEY + 8 {
            let mut s = connection(&go).await;
            s.ready().await.expect("ready");
            pending.push(s.send_request(request()));
            list.push((now, s));
            trim(&mut list, now);
        }
        assert_eq!(list.len(), IDLE_PER_KEY + 8, "busy connections are kept");
        // Once the responses are read they are idle: only IDLE_PER_KEY stay.
        answer.send(true).expect("servers listening");
        for p in pending {
            let r = p.await.expect("response");
            r.into_body().collect().await.expect("body");
        }
        for (_, s) in list.iter_mut() {
            s.ready().await.expect("idle again");
        }
        trim(&mut list, now);
        assert_eq!(list.len(), IDLE_PER_KEY, "idle connections are bounded");
        // Unused for IDLE_TIMEOUT: gone.
        trim(&mut list, now + IDLE_TIMEOUT);
        assert!(list.is_empty());
    }

    #[tokio::test]
    async fn a_sweep_frees_the_connections_of_endpoints_no_longer_used() {
        let now = Instant::now();
        let (_answer, go) = watch::channel(true);
        let key = |port| {
            (
                "".to_owned(),
                SocketAddr::from(([10, 244, 0, 9], port)),
                false,
            )
        };
        let mut idle = HashMap::new();
        // An endpoint still in use, one that left the model (never checked out again).
        idle.insert(key(80), vec![(now + IDLE_TIMEOUT, connection(&go).await)]);
        idle.insert(key(81), vec![(now, connection(&go).await)]);
        for list in idle.values_mut() {
            list[0].1.ready().await.expect("ready");
        }
        sweep(&mut idle, now + IDLE_TIMEOUT);
        assert_eq!(idle.keys().collect::<Vec<_>>(), [&key(80)]);
        sweep(&mut idle, now + IDLE_TIMEOUT * 2);
        assert!(idle.is_empty(), "no key is kept without connections");
    }
}
