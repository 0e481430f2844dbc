//! node-proxy's side of the controller: the model subscription and the CA client, both
//! over one TLS channel authenticated by the node's token.
//!
//! ```text
//!  Hello{node, position} --> controller --> full | resync | resume, then deltas
//!     each update: Model::apply (refused resources listed) -> ArcSwap store -> Ack
//!     -> changes to policies, namespaces or this node's workloads: re-check live
//!        connections; a new trust bundle: every held credential
//!  the controller away: keep serving the last model; reconnect with jittered backoff
//! ```

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use api::proto::certificates_client::CertificatesClient;
use api::proto::mesh_config_client::MeshConfigClient;
use api::proto::{self, subscribe_request};
use api::{Key, Kind, Model};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};
use tracing::{debug, info, warn};
use tunnel::hbone::BoxFuture;
use tunnel::identity::{build_csr, Identity, TrustBundle, WorkloadCert};

use crate::state::{CertError, CertSource, Identities, ModelStatus, SharedModel};

/// The flags of every process that subscribes to the controller (node-proxy, waypoint).
#[derive(Debug, Clone, clap::Args)]
pub struct ControllerFlags {
    /// The controller (host:port), for the mesh model and certificates; several,
    /// comma-separated, are its replicas, tried in turn when one does not answer.
    #[arg(
        long,
        env = "WEFT_CONTROLLER",
        default_value = "weft-controller.weft-system.svc:15012"
    )]
    pub controller: String,
    /// The name the controller's certificate carries.
    #[arg(
        long,
        env = "WEFT_CONTROLLER_NAME",
        default_value = "weft-controller.weft-system.svc"
    )]
    pub controller_name: String,
    /// The roots (PEM) the controller's certificate chains to: the mesh root, public.
    #[arg(
        long,
        env = "WEFT_CONTROLLER_CA",
        default_value = "/var/run/weft/root.pem"
    )]
    pub controller_ca: PathBuf,
    /// The token this process authenticates to the controller with: its node's, or
    /// for a waypoint its service account's (re-read on use).
    #[arg(
        long,
        env = "WEFT_TOKEN_FILE",
        default_value = "/var/run/secrets/weft/token"
    )]
    pub token_file: PathBuf,
}

impl ControllerFlags {
    /// The connection settings of `node`'s process; `waypoint` names a waypoint's
    /// Gateway ("namespace/name").
    pub fn config(&self, node: &str, waypoint: Option<String>) -> ControllerConfig {
        ControllerConfig {
            addr: self.controller.clone(),
            server_name: self.controller_name.clone(),
            roots: self.controller_ca.clone(),
            token: self.token_file.clone(),
            node: node.to_owned(),
            waypoint,
        }
    }
}

/// Where the controller is and how to prove who this node is.
#[derive(Debug, Clone)]
pub struct ControllerConfig {
    /// The controller's address, `host:port` (a DNS name is resolved per connection),
    /// or several, comma-separated (its replicas).
    pub addr: String,
    /// The name its certificate must carry.
    pub server_name: String,
    /// The roots (PEM) its certificate chains to; re-read on every connection.
    pub roots: PathBuf,
    /// The node's token; re-read on every call (projected tokens are rotated).
    pub token: PathBuf,
    /// This node.
    pub node: String,
    /// For a waypoint: "namespace/name" of its Gateway; it subscribes as a waypoint.
    pub waypoint: Option<String>,
}

/// Why talking to the controller failed.
#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    /// A local file (roots, token) could not be read.
    #[error("{path}: {source}")]
    File {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The roots file holds no usable certificate.
    #[error("{0}: no usable certificate to trust the controller with")]
    Roots(PathBuf),
    /// The controller answered with an error.
    #[error("the controller refused: {} ({:?})", .0.message(), .0.code())]
    Status(#[from] tonic::Status),
    /// The stream broke.
    #[error("the connection to the controller failed: {0}")]
    Transport(String),
}

impl ControllerError {
    fn transport(e: impl std::fmt::Display) -> Self {
        ControllerError::Transport(e.to_string())
    }
}

fn read(path: &Path) -> Result<String, ControllerError> {
    std::fs::read_to_string(path).map_err(|source| ControllerError::File {
        path: path.to_owned(),
        source,
    })
}

/// A lazily connected channel to the controller over TLS.
pub fn channel(config: &ControllerConfig) -> Channel {
    // Time for every replica to be tried in turn.
    let replicas = u32::try_from(config.addr.split(',').count())
        .unwrap_or(1)
        .max(1);
    let config = config.clone();
    // The replica to try first: the last one connected to.
    let next = Arc::new(AtomicUsize::new(0));
    let connector = tower::service_fn(move |_: http::Uri| {
        let config = config.clone();
        let next = next.clone();
        async move {
            let tls = client_tls(&config.roots)?;
            let name = rustls_pki_types::ServerName::try_from(config.server_name.clone())
                .map_err(ControllerError::transport)?;
            let connector = tokio_rustls::TlsConnector::from(Arc::new(tls));
            let stream = connect_any(&config.addr, &next, |tcp| {
                let (connector, name) = (connector.clone(), name.clone());
                async move {
                    let _ = tcp.set_nodelay(true);
                    connector.connect(name, tcp).await
                }
            })
            .await?;
            Ok::<_, ControllerError>(hyper_util::rt::TokioIo::new(stream))
        }
    });
    Endpoint::from_static("http://weft-controller")
        .connect_timeout(CONNECT_EACH * replicas + Duration::from_secs(1))
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true)
        .connect_with_connector_lazy(connector)
}

/// The TLS a client of the controller speaks: TLS 1.3, HTTP/2, trusting the roots (PEM)
/// in the file `roots`.
pub fn client_tls(roots: &Path) -> Result<rustls::ClientConfig, ControllerError> {
    let roots_pem = read(roots)?;
    let bundle =
        TrustBundle::from_pem(&roots_pem).map_err(|_| ControllerError::Roots(roots.to_owned()))?;
    let mut store = rustls::RootCertStore::empty();
    for root in bundle.roots() {
        store
            .add(root.clone())
            .map_err(|_| ControllerError::Roots(roots.to_owned()))?;
    }
    let mut tls = rustls::ClientConfig::builder_with_provider(tunnel::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(ControllerError::transport)?
        .with_root_certificates(store)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"h2".to_vec()];
    Ok(tls)
}

/// How long one controller address may take to accept a connection before the next
/// is tried.
const CONNECT_EACH: Duration = Duration::from_secs(2);

/// Connects to one of `addrs` (`host:port`, comma-separated: the controller's replicas,
/// or one name a Service balances) and completes `handshake` (TLS) with it, each within
/// [`CONNECT_EACH`], starting with the one that answered last and going round the
/// others when it does not; after a round of failures the next try starts one further.
async fn connect_any<S, F>(
    addrs: &str,
    next: &AtomicUsize,
    handshake: impl Fn(tokio::net::TcpStream) -> F,
) -> Result<S, ControllerError>
where
    F: std::future::Future<Output = std::io::Result<S>>,
{
    let list: Vec<&str> = addrs
        .split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .collect();
    if list.is_empty() {
        return Err(ControllerError::Transport(
            "no controller address given".into(),
        ));
    }
    let first = next.load(Ordering::Relaxed) % list.len();
    let mut errors = Vec::new();
    for i in 0..list.len() {
        let at = (first + i) % list.len();
        let attempt = async {
            let tcp = tokio::net::TcpStream::connect(list[at])
                .await
                .map_err(|e| format!("cannot connect: {e}"))?;
            handshake(tcp).await.map_err(|e| format!("TLS failed: {e}"))
        };
        match tokio::time::timeout(CONNECT_EACH, attempt).await {
            Ok(Ok(stream)) => {
                if at != first {
                    info!(
                        controller = list[at],
                        "connected to another controller replica"
                    );
                }
                next.store(at, Ordering::Relaxed);
                return Ok(stream);
            }
            Ok(Err(e)) => errors.push(format!("{}: {e}", list[at])),
            Err(_) => errors.push(format!("{}: no answer in {CONNECT_EACH:?}", list[at])),
        }
    }
    next.store(first + 1, Ordering::Relaxed);
    Err(ControllerError::Transport(format!(
        "cannot connect to the controller ({})",
        errors.join("; ")
    )))
}

fn with_token<T>(message: T, token: &Path) -> Result<tonic::Request<T>, ControllerError> {
    let token = read(token)?;
    let mut request = tonic::Request::new(message);
    let value = format!("Bearer {}", token.trim()).parse().map_err(|_| {
        ControllerError::Transport("the token file holds characters a header cannot carry".into())
    })?;
    request.metadata_mut().insert("authorization", value);
    Ok(request)
}

/// The controller's CA, asked for each identity's leaf.
pub struct CaClient {
    config: ControllerConfig,
    channel: Channel,
}

impl CaClient {
    /// A client on `channel`.
    pub fn new(config: ControllerConfig, channel: Channel) -> Self {
        CaClient { config, channel }
    }
}

impl CertSource for CaClient {
    fn fetch(
        &self,
        identity: &Identity,
    ) -> BoxFuture<'_, Result<(WorkloadCert, TrustBundle), CertError>> {
        let identity = identity.clone();
        Box::pin(async move {
            let csr = build_csr(&identity)?;
            let request = with_token(
                proto::SignRequest {
                    identity: identity.to_string(),
                    csr: csr.der.to_vec(),
                },
                &self.config.token,
            )
            .map_err(|e| CertError::Unavailable(e.to_string()))?;
            let mut client = CertificatesClient::new(self.channel.clone());
            let response =
                match tokio::time::timeout(Duration::from_secs(10), client.sign(request)).await {
                    Err(_) => return Err(CertError::Unavailable("no answer within 10 s".into())),
                    Ok(Err(status)) => {
                        return Err(match status.code() {
                            tonic::Code::PermissionDenied
                            | tonic::Code::InvalidArgument
                            | tonic::Code::Unauthenticated => {
                                CertError::Refused(status.message().to_owned())
                            }
                            _ => CertError::Unavailable(status.message().to_owned()),
                        })
                    }
                    Ok(Ok(r)) => r.into_inner(),
                };
            let chain = response
                .chain
                .into_iter()
                .map(rustls_pki_types::CertificateDer::from)
                .collect();
            let roots = response
                .roots
                .into_iter()
                .map(rustls_pki_types::CertificateDer::from)
                .collect();
            let bundle = TrustBundle::new(roots).map_err(|e| {
                CertError::Refused(format!("the trust bundle sent is unusable: {e}"))
            })?;
            Ok((csr.into_cert(identity, chain)?, bundle))
        })
    }
}

/// The subscription's series.
#[derive(Clone, Debug, Default)]
pub struct ConfigMetrics {
    /// The version applied last.
    pub version: Gauge,
    /// Updates applied, by kind (full, resync, delta).
    pub updates: Family<crate::metrics::KindLabels, Counter>,
    /// Resources refused, by kind.
    pub rejected: Family<crate::metrics::KindLabels, Counter>,
    /// 1 while subscribed.
    pub connected: Gauge,
    /// Subscriptions started (the first, and every reconnect).
    pub connects: Counter,
}

impl ConfigMetrics {
    /// Registers the series under `weft_config_`.
    pub fn new(registry: &mut Registry) -> Self {
        let m = ConfigMetrics::default();
        let r = registry.sub_registry_with_prefix("weft_config");
        r.register(
            "version",
            "Version of the mesh model applied last",
            m.version.clone(),
        );
        r.register(
            "updates",
            "Model updates applied, by kind",
            m.updates.clone(),
        );
        r.register(
            "rejected",
            "Resources of model updates refused, by kind",
            m.rejected.clone(),
        );
        r.register(
            "connected",
            "1 while subscribed to the controller",
            m.connected.clone(),
        );
        r.register(
            "connects",
            "Subscriptions to the controller started",
            m.connects.clone(),
        );
        m
    }
}

/// What changed in an applied update that live connections or credentials depend on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Changed {
    /// The version.
    pub version: u64,
    /// Policies, namespaces or this node's workloads changed: re-check connections.
    pub authorization: bool,
}

/// Keeps the model current from the controller until `shutdown`.
pub struct Subscription {
    /// Where the controller is.
    pub config: ControllerConfig,
    /// The channel.
    pub channel: Channel,
    /// The model to keep current.
    pub model: SharedModel,
    /// Its status.
    pub status: Arc<Mutex<ModelStatus>>,
    /// Told after each update.
    pub changed: watch::Sender<Changed>,
    /// Credentials to hand a new trust bundle to.
    pub identities: Arc<Identities>,
    /// Metrics.
    pub metrics: ConfigMetrics,
    /// Run on each new model before it is acknowledged: what the proxy cannot use of
    /// it (a waypoint's routes it cannot compile), reported in the ack as refusals.
    pub check: Option<Check>,
}

/// A proxy's own check of a new model: the keys it cannot use, and why.
pub type Check = Arc<dyn Fn(&Arc<Model>) -> Vec<(Key, String)> + Send + Sync>;

const MAX_MESSAGE: usize = 256 * 1024 * 1024;

impl Subscription {
    /// Subscribes, and resubscribes with jittered exponential backoff (100 ms to 10 s)
    /// whenever the stream ends, serving the last model meanwhile.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut backoff = Duration::from_millis(100);
        loop {
            let started = Instant::now();
            let result = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = self.subscribe_once() => r,
            };
            self.metrics.connected.set(0);
            let why = match result {
                Ok(()) => "the controller ended the subscription".to_owned(),
                Err(e) => e.to_string(),
            };
            {
                let mut st = self.status.lock().expect("status lock is never poisoned");
                st.connected = false;
                st.last_error = Some(why.clone());
            }
            // A subscription that lasted is a reconnect, not a failure to connect.
            if started.elapsed() > Duration::from_secs(10) {
                backoff = Duration::from_millis(100);
            }
            let wait = jitter(backoff);
            warn!(
                version = self.model.load().version(),
                "controller subscription: {why}; serving the last model, retrying in {} ms",
                wait.as_millis()
            );
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(10));
        }
    }

    async fn subscribe_once(&self) -> Result<(), ControllerError> {
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        let current = self.model.load_full();
        let hello = proto::Hello {
            node: self.config.node.clone(),
            role: match self.config.waypoint {
                Some(_) => proto::Role::Waypoint,
                None => proto::Role::NodeProxy,
            } as i32,
            waypoint: self.config.waypoint.clone().unwrap_or_default(),
            position: (current.version() > 0).then(|| current.position()),
            proxy_version: env!("CARGO_PKG_VERSION").to_owned(),
        };
        tx.send(proto::SubscribeRequest {
            message: Some(subscribe_request::Message::Hello(hello)),
        })
        .await
        .map_err(ControllerError::transport)?;
        let request = with_token(
            tokio_stream::wrappers::ReceiverStream::new(rx),
            &self.config.token,
        )?;
        let mut client =
            MeshConfigClient::new(self.channel.clone()).max_decoding_message_size(MAX_MESSAGE);
        let mut updates = client.subscribe(request).await?.into_inner();
        self.metrics.connects.inc();
        self.metrics.connected.set(1);
        {
            let mut st = self.status.lock().expect("status lock is never poisoned");
            st.connected = true;
            st.last_error = None;
        }
        info!(controller = %self.config.addr, "subscribed to the controller");
        while let Some(update) = updates.message().await? {
            let ack = self.apply(update).await;
            if tx
                .send(proto::SubscribeRequest {
                    message: Some(subscribe_request::Message::Ack(ack)),
                })
                .await
                .is_err()
            {
                return Err(ControllerError::Transport(
                    "the acknowledgement stream closed".into(),
                ));
            }
        }
        Ok(())
    }

    /// Applies one update and publishes the new model.
    async fn apply(&self, update: proto::Update) -> proto::Ack {
        let kind = proto::UpdateKind::try_from(update.kind).unwrap_or(proto::UpdateKind::Full);
        let current = self.model.load_full();
        // A full state or resync of a large mesh takes milliseconds: off the runtime.
        let applied = if kind == proto::UpdateKind::Delta && update.upserts.len() < 256 {
            current.apply(&update)
        } else {
            match tokio::task::spawn_blocking(move || current.apply(&update)).await {
                Ok(a) => a,
                Err(e) => {
                    warn!("applying an update failed: {e}");
                    let current = self.model.load();
                    return proto::Ack {
                        epoch: current.epoch(),
                        version: current.version(),
                        rejected: Vec::new(),
                    };
                }
            }
        };
        let mut ack = applied.ack();
        let node = &self.config.node;
        let local_workloads = applied.changed.iter().any(|k| {
            k.kind == Kind::Workload
                && [&applied.model, &*self.model.load()]
                    .iter()
                    .any(|m| m.workload(&k.name).is_some_and(|w| &w.node == node))
        });
        let authorization = applied.changed_kind(Kind::AuthorizationPolicy)
            || applied.changed_kind(Kind::Namespace)
            || local_workloads;
        let bundle_changed = applied.changed_kind(Kind::TrustBundle);
        let model = Arc::new(applied.model);
        self.model.store(model.clone());
        let mut rejected = applied.rejected;
        if let Some(check) = &self.check {
            let refused = check(&model);
            ack.rejected
                .extend(refused.iter().map(|(key, reason)| proto::Rejection {
                    key: Some(key.to_proto()),
                    reason: reason.clone(),
                }));
            rejected.extend(refused);
        }
        if bundle_changed {
            if let Some(b) = model.trust_bundle() {
                let roots = b
                    .roots
                    .iter()
                    .cloned()
                    .map(rustls_pki_types::CertificateDer::from)
                    .collect();
                match TrustBundle::new(roots) {
                    Ok(bundle) => {
                        self.identities.set_bundle(&bundle);
                        info!(
                            roots = b.roots.len(),
                            "new trust bundle handed to every credential"
                        );
                    }
                    Err(e) => {
                        warn!("the trust bundle sent is unusable, keeping the current one: {e}")
                    }
                }
            }
        }
        let label = match kind {
            proto::UpdateKind::Full => "full",
            proto::UpdateKind::Resync => "resync",
            proto::UpdateKind::Delta => "delta",
        };
        crate::metrics::count(&self.metrics.updates, label);
        self.metrics.version.set(model.version() as i64);
        for (key, reason) in &rejected {
            crate::metrics::count(&self.metrics.rejected, key.kind.as_str());
            warn!(
                version = model.version(),
                "refused {key} from the controller: {reason}"
            );
        }
        {
            let mut st = self.status.lock().expect("status lock is never poisoned");
            st.loaded = true;
            st.epoch = format!("{:016x}", model.epoch());
            st.version = model.version();
            st.updated_at = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or_default();
            st.rejected = rejected.iter().map(|(k, r)| format!("{k}: {r}")).collect();
        }
        debug!(
            version = model.version(),
            kind = label,
            changed = applied.changed.len(),
            "model applied"
        );
        self.changed.send_replace(Changed {
            version: model.version(),
            authorization,
        });
        ack
    }
}

/// Somewhere between half and all of `d`, so that proxies do not reconnect in step.
fn jitter(d: Duration) -> Duration {
    let mut b = [0u8; 2];
    let _ = aws_lc_rs::rand::fill(&mut b);
    let frac = f64::from(u16::from_le_bytes(b)) / f64::from(u16::MAX);
    d.mul_f64(0.5 + frac / 2.0)
}

/// Waits until `model` holds the workload `uid` and `ok` accepts it, or `limit`
/// passes; the last version seen either way.
pub async fn wait_for<T>(
    model: &SharedModel,
    changed: &mut watch::Receiver<Changed>,
    limit: Duration,
    mut ok: impl FnMut(&Model) -> Option<T>,
) -> Option<T> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        changed.borrow_and_update();
        if let Some(t) = ok(&model.load()) {
            return Some(t);
        }
        if tokio::time::timeout_at(deadline, changed.changed())
            .await
            .map_or(true, |r| r.is_err())
        {
            return ok(&model.load());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A handshake: send a byte, wait for one back (a replica that accepts connections
    /// but never answers fails it).
    async fn ping(mut tcp: tokio::net::TcpStream) -> std::io::Result<tokio::net::TcpStream> {
        tcp.write_all(b"?").await?;
        let mut byte = [0u8; 1];
        tcp.read_exact(&mut byte).await?;
        Ok(tcp)
    }

    /// A replica that accepts but never completes the handshake is passed over for the
    /// next one, which is then tried first; a refused one likewise.
    #[tokio::test]
    async fn a_replica_that_does_not_answer_is_passed_over_and_the_next_remembered() {
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let good = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let refused = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            l.local_addr().expect("addr")
        };
        let silent_addr = silent.local_addr().expect("addr");
        let good_addr = good.local_addr().expect("addr");
        let silent_accepts = Arc::new(AtomicUsize::new(0));
        let counted = silent_accepts.clone();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = silent.accept().await {
                counted.fetch_add(1, Ordering::Relaxed);
                held.push(s);
            }
        });
        tokio::spawn(async move {
            while let Ok((mut s, _)) = good.accept().await {
                tokio::spawn(async move {
                    let mut byte = [0u8; 1];
                    if s.read_exact(&mut byte).await.is_ok() {
                        let _ = s.write_all(b"!").await;
                    }
                    let _ = s.read(&mut byte).await;
                });
            }
        });
        let addrs = format!("{silent_addr},{refused},{good_addr}");
        let next = AtomicUsize::new(0);
        let stream = connect_any(&addrs, &next, ping).await.expect("connected");
        assert_eq!(stream.peer_addr().expect("peer"), good_addr);
        assert_eq!(
            next.load(Ordering::Relaxed),
            2,
            "the good one is tried first next"
        );
        let before = silent_accepts.load(Ordering::Relaxed);
        connect_any(&addrs, &next, ping).await.expect("connected");
        assert_eq!(
            silent_accepts.load(Ordering::Relaxed),
            before,
            "straight to the good one"
        );
        // None answers: the next round starts one further on.
        let none = format!("{silent_addr},{refused}");
        let next = AtomicUsize::new(0);
        assert!(connect_any(&none, &next, ping).await.is_err());
        assert_eq!(next.load(Ordering::Relaxed), 1);
    }
}
