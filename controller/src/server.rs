//! The gRPC services: `MeshConfig.Subscribe` (the model, streamed) and
//! `Certificates.Sign` (the CA), over TLS with the controller's own certificate.
//!
//! ```text
//!  Subscribe: token -> node; Hello{node, position}
//!     -> first: resume (same epoch, history reaches) | resync (digests) | full
//!     -> then one delta per store version, computed when the stream can take it
//!  Acks (read concurrently): applied version, refused resources (logged, counted)
//! ```
//!
//! A subscriber never has a queue: each update is computed from the store when its
//! stream is ready for one, from the version it was last sent. A slow subscriber so
//! gets fewer, larger deltas (and a full state once the history no longer reaches
//! back); it never holds up the others, and its memory stays one update.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use futures::Stream;
use prost::Message;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tracing::{debug, info, warn, Instrument};

use api::proto::certificates_server::{Certificates, CertificatesServer};
use api::proto::mesh_config_server::{MeshConfig, MeshConfigServer};
use api::proto::{self, subscribe_request};
use api::{Key, ObjectName};

use crate::auth::{bearer, AuthError, Authenticator, Caller};
use crate::ca::Ca;
use crate::metrics::{Metrics, ReasonLabel};
use crate::store::{Store, View};

/// How long a subscriber has to send its Hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Full states built at once (each holds a copy of the model until it is encoded).
const CONCURRENT_FULL_STATES: usize = 4;
/// How long connections may take to close at shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);
/// The largest request accepted on a subscription (Hello, Ack).
const MAX_REQUEST: usize = 1024 * 1024;
/// The largest `SignRequest` accepted: an identity and a CSR are under 2 KiB. The
/// caller is authenticated only once the request is decoded, so this is what anyone
/// may make the controller hold per call.
const MAX_SIGN_REQUEST: usize = 64 * 1024;
/// Calls in progress on one connection (a proxy makes one subscription and the odd
/// certificate request).
const MAX_STREAMS_PER_CONNECTION: u32 = 64;

/// What one subscription looks like, for `/debug/subscribers` and `weftctl`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SubscriberStatus {
    /// The node.
    pub node: String,
    /// The peer address.
    pub peer: Option<SocketAddr>,
    /// Seconds since the epoch when it subscribed.
    pub since: u64,
    /// How it started: `full`, `resync` or `resume`.
    pub start: &'static str,
    /// The version last sent.
    pub sent_version: u64,
    /// The version last acknowledged.
    pub acked_version: u64,
    /// The proxy's build, as its hello said.
    pub proxy_version: String,
    /// Resources it refused, in all.
    pub rejected: u64,
    /// The last refusal, as `key: reason`.
    pub last_rejection: Option<String>,
    /// The routes its last ack refused (a waypoint that cannot compile them): their
    /// parents' `Accepted` condition says so.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub refused_routes: Vec<RefusedRoute>,
}

/// A route a proxy refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RefusedRoute {
    /// `http_route` or `grpc_route`.
    pub kind: &'static str,
    /// `namespace/name`.
    pub name: String,
    /// Why.
    pub reason: String,
}

/// State the services share with the translation loop.
pub struct Shared {
    /// The published model.
    pub store: RwLock<Store>,
    /// The store's version, for subscribers to wait on.
    pub version: watch::Sender<u64>,
    /// The identities each node's pods run as (what the CA may sign for the node).
    pub identities: ArcSwap<HashMap<String, BTreeSet<String>>>,
    /// The CA.
    pub ca: Arc<Ca>,
    /// Who callers are.
    pub auth: Arc<dyn Authenticator>,
    /// Metrics.
    pub metrics: Metrics,
    /// Open subscriptions.
    pub subscribers: Mutex<BTreeMap<u64, SubscriberStatus>>,
    /// Told when the routes some proxy refuses change, so that statuses are written
    /// again.
    pub refusals_changed: tokio::sync::Notify,
    next_id: AtomicU64,
    full_states: Semaphore,
    /// Stops every stream.
    pub shutdown: CancellationToken,
}

impl Shared {
    /// State for a controller of `epoch`.
    pub fn new(
        epoch: u64,
        ca: Arc<Ca>,
        auth: Arc<dyn Authenticator>,
        metrics: Metrics,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        Arc::new(Shared {
            store: RwLock::new(Store::new(epoch)),
            version: watch::Sender::new(0),
            identities: ArcSwap::from_pointee(HashMap::new()),
            ca,
            auth,
            metrics,
            subscribers: Mutex::new(BTreeMap::new()),
            refusals_changed: tokio::sync::Notify::new(),
            next_id: AtomicU64::new(1),
            full_states: Semaphore::new(CONCURRENT_FULL_STATES),
            shutdown,
        })
    }

    /// The subscriptions, for the admin endpoint.
    pub fn subscribers(&self) -> Vec<SubscriberStatus> {
        self.subscribers
            .lock()
            .expect("subscribers lock is never poisoned")
            .values()
            .cloned()
            .collect()
    }

    fn update_status(&self, id: u64, f: impl FnOnce(&mut SubscriberStatus)) {
        if let Some(s) = self
            .subscribers
            .lock()
            .expect("subscribers lock is never poisoned")
            .get_mut(&id)
        {
            f(s);
        }
    }

    async fn authenticate(
        &self,
        metadata: &tonic::metadata::MetadataMap,
        what: &str,
    ) -> Result<Caller, Status> {
        let result = match bearer(metadata) {
            Ok(token) => self.auth.authenticate(token).await,
            Err(e) => Err(e),
        };
        result.map_err(|e| {
            warn!("{what} refused: {e}");
            self.metrics
                .subscribe_refusals
                .get_or_create(&ReasonLabel { reason: e.label() })
                .inc();
            match e {
                AuthError::Unavailable(_) => Status::unavailable(e.to_string()),
                _ => Status::unauthenticated(e.to_string()),
            }
        })
    }
}

impl Shared {
    /// Checks that `caller` runs the waypoint `name` ("namespace/name" of its Gateway):
    /// the Gateway exists and its pods run as the service account named after it, in
    /// its namespace.
    fn waypoint_of(&self, caller: &Caller, name: &str) -> Result<(), String> {
        let Ok(gateway) = name.parse::<ObjectName>() else {
            return Err(format!(
                "the Hello names waypoint {name:?}; it must be the \"namespace/name\" of its Gateway"
            ));
        };
        let store = self.store.read().expect("store lock is never poisoned");
        if store
            .get(&Key::new(api::Kind::Waypoint, gateway.to_string()))
            .is_none()
        {
            return Err(format!(
                "there is no Gateway {gateway} of class weft-waypoint in the mesh"
            ));
        }
        match caller {
            Caller::Workload {
                namespace,
                service_account,
            } if *namespace == gateway.namespace && *service_account == gateway.name => Ok(()),
            _ => Err(format!(
                "waypoint {gateway} runs as service account {gateway}; the credential belongs to {caller}"
            )),
        }
    }
}

/// How a subscriber is named in logs and on the admin endpoint.
fn subscriber_name(caller: &Caller, hello: &proto::Hello) -> String {
    match caller {
        Caller::Node(node) => node.clone(),
        Caller::Workload { .. } => format!("waypoint {}", hello.waypoint),
    }
}

/// The `MeshConfig` service.
pub struct MeshConfigService(pub Arc<Shared>);

type UpdateStream = Pin<Box<dyn Stream<Item = Result<proto::Update, Status>> + Send>>;

/// Unregisters a subscription when its stream is dropped.
struct Registration {
    shared: Arc<Shared>,
    id: u64,
    ended: CancellationToken,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.ended.cancel();
        let removed = self
            .shared
            .subscribers
            .lock()
            .expect("subscribers lock is never poisoned")
            .remove(&self.id);
        if let Some(s) = removed {
            if !s.refused_routes.is_empty() {
                self.shared.refusals_changed.notify_one();
            }
            self.shared.metrics.subscribers.dec();
            info!(node = %s.node, acked = s.acked_version, "proxy unsubscribed");
        }
    }
}

/// A subscription's state between updates.
struct Feed {
    /// Who subscribed: the node, or "waypoint namespace/name".
    name: String,
    reg: Registration,
    view: View,
    position: Option<proto::Position>,
    sent: Option<u64>,
    rx: watch::Receiver<u64>,
}

impl Feed {
    async fn next(mut self) -> Option<(Result<proto::Update, Status>, Feed)> {
        let shared = self.reg.shared.clone();
        loop {
            // The first update goes out as soon as there is a model; every later one
            // once the store has moved on from the version last sent.
            let waiting = self.sent.is_some() || *self.rx.borrow_and_update() == 0;
            if waiting {
                tokio::select! {
                    _ = shared.shutdown.cancelled() => return None,
                    _ = self.reg.ended.cancelled() => return None,
                    changed = self.rx.changed() => {
                        if changed.is_err() {
                            return None;
                        }
                    }
                }
            }
            self.rx.borrow_and_update();
            let (kind, update) = match self.sent {
                None => {
                    let _permit = shared.full_states.acquire().await.ok()?;
                    let store = shared.store.read().expect("store lock is never poisoned");
                    initial(&store, &self.view, self.position.take())
                }
                Some(sent) => {
                    let store = shared.store.read().expect("store lock is never poisoned");
                    if store.version() == sent {
                        continue;
                    }
                    match store.delta(&self.view, sent) {
                        Some(u) => ("delta", u),
                        None => ("full", store.full(&self.view)),
                    }
                }
            };
            let bytes = update.encoded_len() as u64;
            let m = &shared.metrics;
            Metrics::count(&m.pushes, kind);
            m.pushed_bytes.inc_by(bytes);
            m.pushed_resources
                .inc_by((update.upserts.len() + update.removals.len()) as u64);
            let version = update.version;
            let first = self.sent.is_none();
            self.sent = Some(version);
            shared.update_status(self.reg.id, |s| {
                s.sent_version = version;
                if first {
                    s.start = kind;
                }
            });
            if first {
                info!(
                    subscriber = %self.name,
                    kind,
                    version,
                    resources = update.upserts.len(),
                    buckets = update.buckets.len(),
                    bytes,
                    "proxy subscribed"
                );
            } else {
                debug!(view = ?self.view, version, bytes, "update sent");
            }
            return Some((Ok(update), self));
        }
    }
}

/// The first update of a subscription.
pub(crate) fn initial(
    store: &Store,
    view: &View,
    position: Option<proto::Position>,
) -> (&'static str, proto::Update) {
    let Some(p) = position.filter(|p| p.epoch != 0) else {
        return ("full", store.full(view));
    };
    if p.epoch == store.epoch() {
        if let Some(u) = store.delta(view, p.version) {
            return ("resume", u);
        }
    }
    match api::digest::from_wire(&p.buckets) {
        Some(held) => ("resync", store.resync(view, &held)),
        None => ("full", store.full(view)),
    }
}

/// What an acknowledgement says, read for the status and the log.
pub(crate) struct AckReading<'a> {
    /// The routes it refuses (a waypoint that cannot compile them).
    pub(crate) routes: Vec<RefusedRoute>,
    /// Each refusal: the kind (a metric label), the key as text, and the reason.
    pub(crate) refusals: Vec<(&'static str, String, &'a str)>,
}

/// Reads an acknowledgement's refusals; a key the controller does not know is named
/// "an unknown key", not refused.
pub(crate) fn read_ack(ack: &proto::Ack) -> AckReading<'_> {
    let mut reading = AckReading {
        routes: Vec::new(),
        refusals: Vec::with_capacity(ack.rejected.len()),
    };
    for r in &ack.rejected {
        let key = r.key.as_ref().and_then(Key::from_proto);
        if let Some(k) = key
            .as_ref()
            .filter(|k| matches!(k.kind, api::Kind::HttpRoute | api::Kind::GrpcRoute))
        {
            reading.routes.push(RefusedRoute {
                kind: k.kind.as_str(),
                name: k.name.clone(),
                reason: r.reason.clone(),
            });
        }
        let kind = key.as_ref().map_or("unknown", |k| k.kind.as_str());
        let key = key.map_or_else(|| "an unknown key".to_owned(), |k| k.to_string());
        reading.refusals.push((kind, key, &r.reason));
    }
    reading
}

async fn read_acks(
    shared: Arc<Shared>,
    id: u64,
    node: String,
    mut inbound: tonic::Streaming<proto::SubscribeRequest>,
    ended: CancellationToken,
) {
    loop {
        let message = tokio::select! {
            _ = ended.cancelled() => return,
            m = inbound.message() => m,
        };
        match message {
            Ok(Some(proto::SubscribeRequest {
                message: Some(subscribe_request::Message::Ack(ack)),
            })) => {
                shared.metrics.acks.inc();
                let AckReading { routes, refusals } = read_ack(&ack);
                let mut last = None;
                for (kind, key, reason) in refusals {
                    Metrics::count(&shared.metrics.rejections, kind);
                    warn!(%node, version = ack.version, "the proxy refused {key}: {reason}");
                    last = Some(format!("{key}: {reason}"));
                }
                let mut routes_changed = false;
                shared.update_status(id, |s| {
                    s.acked_version = ack.version;
                    s.rejected += ack.rejected.len() as u64;
                    if last.is_some() {
                        s.last_rejection = last;
                    }
                    if s.refused_routes != routes {
                        s.refused_routes = routes;
                        routes_changed = true;
                    }
                });
                if routes_changed {
                    shared.refusals_changed.notify_one();
                }
            }
            Ok(Some(other)) => {
                warn!(%node, "subscription ended: expected an Ack, got {other:?}");
                shared
                    .metrics
                    .subscribe_refusals
                    .get_or_create(&ReasonLabel { reason: "protocol" })
                    .inc();
                ended.cancel();
                return;
            }
            Ok(None) => return,
            Err(status) => {
                // Malformed or oversized messages end this subscription only.
                info!(%node, "subscription ended: {}", status.message());
                if status.code() != tonic::Code::Cancelled {
                    shared
                        .metrics
                        .subscribe_refusals
                        .get_or_create(&ReasonLabel {
                            reason: "bad_message",
                        })
                        .inc();
                }
                ended.cancel();
                return;
            }
        }
    }
}

#[tonic::async_trait]
impl MeshConfig for MeshConfigService {
    type SubscribeStream = UpdateStream;

    async fn subscribe(
        &self,
        request: Request<tonic::Streaming<proto::SubscribeRequest>>,
    ) -> Result<Response<UpdateStream>, Status> {
        let shared = self.0.clone();
        let peer = request.remote_addr();
        let caller = shared
            .authenticate(request.metadata(), "subscription")
            .await?;
        let mut inbound = request.into_inner();
        let refuse = |reason: &'static str, status: Status| {
            warn!(%caller, ?peer, "subscription refused: {}", status.message());
            shared
                .metrics
                .subscribe_refusals
                .get_or_create(&ReasonLabel { reason })
                .inc();
            Err(status)
        };
        let hello = match tokio::time::timeout(HELLO_TIMEOUT, inbound.message()).await {
            Ok(Ok(Some(proto::SubscribeRequest {
                message: Some(subscribe_request::Message::Hello(h)),
            }))) => h,
            Ok(Err(status)) => {
                return refuse(
                    "bad_message",
                    Status::invalid_argument(format!(
                        "cannot read the Hello: {}",
                        status.message()
                    )),
                )
            }
            Err(_) => {
                return refuse(
                    "no_hello",
                    Status::deadline_exceeded("no Hello within 10 s"),
                )
            }
            _ => {
                return refuse(
                    "no_hello",
                    Status::invalid_argument("the first message must be a Hello"),
                )
            }
        };
        let view = match (proto::Role::try_from(hello.role), &caller) {
            (Ok(proto::Role::NodeProxy), Caller::Node(node)) if hello.node == *node => {
                View::Node(hello.node.clone())
            }
            (Ok(proto::Role::NodeProxy), _) => {
                return refuse(
                    "wrong_node",
                    Status::permission_denied(format!(
                        "the credential belongs to {caller}; it cannot subscribe for node {:?}",
                        hello.node
                    )),
                )
            }
            (Ok(proto::Role::Waypoint), Caller::Workload { .. }) => {
                if let Err(why) = shared.waypoint_of(&caller, &hello.waypoint) {
                    return refuse("wrong_waypoint", Status::permission_denied(why));
                }
                View::Waypoint
            }
            (Ok(proto::Role::Waypoint), _) => {
                return refuse(
                    "wrong_waypoint",
                    Status::permission_denied(format!(
                        "the credential belongs to {caller}; a waypoint subscribes with its own service account's"
                    )),
                )
            }
            _ => {
                return refuse(
                    "role",
                    Status::invalid_argument(format!(
                        "role {} is not one this controller serves",
                        hello.role
                    )),
                )
            }
        };
        let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
        let since = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default();
        shared
            .subscribers
            .lock()
            .expect("subscribers lock is never poisoned")
            .insert(
                id,
                SubscriberStatus {
                    node: subscriber_name(&caller, &hello),
                    peer,
                    since,
                    start: "",
                    sent_version: 0,
                    acked_version: 0,
                    proxy_version: hello.proxy_version.clone(),
                    rejected: 0,
                    last_rejection: None,
                    refused_routes: Vec::new(),
                },
            );
        shared.metrics.subscribers.inc();
        let ended = CancellationToken::new();
        let name = subscriber_name(&caller, &hello);
        let span = tracing::info_span!("subscriber", node = %name, proxy = %hello.proxy_version);
        tokio::spawn(
            read_acks(shared.clone(), id, name.clone(), inbound, ended.clone()).instrument(span),
        );
        let feed = Feed {
            name: name.clone(),
            reg: Registration {
                shared: shared.clone(),
                id,
                ended,
            },
            view,
            position: hello.position,
            sent: None,
            rx: shared.version.subscribe(),
        };
        let stream = futures::stream::unfold(feed, Feed::next);
        Ok(Response::new(Box::pin(stream)))
    }
}

/// The `Certificates` service.
pub struct CertificatesService(pub Arc<Shared>);

#[tonic::async_trait]
impl Certificates for CertificatesService {
    async fn sign(
        &self,
        request: Request<proto::SignRequest>,
    ) -> Result<Response<proto::SignResponse>, Status> {
        let shared = &self.0;
        let caller = shared
            .authenticate(request.metadata(), "certificate request")
            .await?;
        let req = request.into_inner();
        let refuse = |reason: &'static str, status: Status| {
            warn!(%caller, identity = %req.identity, "certificate refused: {}", status.message());
            shared
                .metrics
                .certificate_refusals
                .get_or_create(&ReasonLabel { reason })
                .inc();
            Err(status)
        };
        let identity: tunnel::identity::Identity = match req.identity.parse() {
            Ok(i) => i,
            Err(e) => {
                return refuse(
                    "bad_identity",
                    Status::invalid_argument(format!(
                        "{:?} is not a workload identity: {e}",
                        req.identity
                    )),
                )
            }
        };
        if identity.trust_domain() != shared.ca.trust_domain() {
            return refuse(
                "trust_domain",
                Status::permission_denied(format!(
                    "{identity} is not of this mesh's trust domain {}",
                    shared.ca.trust_domain()
                )),
            );
        }
        match &caller {
            Caller::Node(node) => {
                let allowed = shared
                    .identities
                    .load()
                    .get(node)
                    .is_some_and(|ids| ids.contains(identity.as_str()));
                if !allowed {
                    return refuse(
                        "not_on_node",
                        Status::permission_denied(format!(
                            "no pod in the mesh on node {node} runs as {identity}; a node-proxy gets certificates only for its own node's pods"
                        )),
                    );
                }
            }
            Caller::Workload {
                namespace,
                service_account,
            } => {
                if identity.namespace() != namespace
                    || identity.service_account() != service_account
                {
                    return refuse(
                        "not_own_identity",
                        Status::permission_denied(format!(
                            "{caller} may get a certificate only for its own identity, not {identity}"
                        )),
                    );
                }
            }
        }
        let chain = match shared.ca.sign(&identity, &req.csr) {
            Ok(c) => c,
            Err(e @ tunnel::identity::CaError::Expired(_)) => {
                return refuse("ca_expired", Status::unavailable(e.to_string()))
            }
            Err(e) => return refuse("bad_csr", Status::invalid_argument(e.to_string())),
        };
        shared.metrics.certificates_signed.inc();
        debug!(%caller, %identity, "certificate signed");
        Ok(Response::new(proto::SignResponse {
            chain: chain.into_iter().map(|c| c.to_vec()).collect(),
            roots: shared.ca.bundle().iter().map(|c| c.to_vec()).collect(),
        }))
    }
}

/// Serves both services on `listener` over TLS until `shutdown`. The serving
/// certificate (for `names`) is renewed at half its life.
pub async fn serve(
    shared: Arc<Shared>,
    listener: TcpListener,
    names: Vec<String>,
) -> anyhow::Result<()> {
    let tls = crate::tls::ServingTls::new(shared.ca.clone(), names)?;
    tokio::spawn(tls.clone().renew(shared.shutdown.clone()));
    let incoming = tls.incoming(
        listener,
        shared.shutdown.clone(),
        crate::tls::MAX_CONNECTIONS,
    );
    let mesh = MeshConfigServer::new(MeshConfigService(shared.clone()))
        .max_decoding_message_size(MAX_REQUEST);
    let certs = CertificatesServer::new(CertificatesService(shared.clone()))
        .max_decoding_message_size(MAX_SIGN_REQUEST);
    let shutdown = shared.shutdown.clone();
    let server = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(5)))
        .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION))
        .concurrency_limit_per_connection(MAX_STREAMS_PER_CONNECTION as usize)
        .add_service(mesh)
        .add_service(certs)
        .serve_with_incoming_shutdown(incoming, shutdown.clone().cancelled_owned());
    // Streams end at shutdown, but one a client stopped reading cannot deliver its end:
    // it is not waited for past the grace period.
    tokio::select! {
        served = server => served?,
        _ = async {
            shutdown.cancelled().await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        } => warn!("connections still open {} s after shutdown; closing them", SHUTDOWN_GRACE.as_secs()),
    }
    Ok(())
}
