//! The mesh model and workload certificates, each behind a trait so the controller's
//! stream and CA can replace today's local sources without touching the data path.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime};

use api::{Model, Snapshot};
use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};
use tunnel::hbone::BoxFuture;
use tunnel::identity::{
    CaError, CertificateAuthority, Identity, TrustBundle, WorkloadCert, LEAF_TTL,
};
use tunnel::tls::TlsIdentity;

/// The current model, read on every connection without locking.
pub type SharedModel = Arc<ArcSwap<Model>>;

/// Where the model comes from.
pub trait ModelSource: Send + 'static {
    /// Publishes models into `model` until `shutdown`; on bad input keeps the last good
    /// model and reports the error.
    fn run(
        self: Box<Self>,
        model: SharedModel,
        shutdown: CancellationToken,
    ) -> BoxFuture<'static, ()>;
}

/// Status of the model source, for `/ready` and `/config_dump`.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct ModelStatus {
    /// A model has been loaded.
    pub loaded: bool,
    /// The last load error, if the newest input was rejected.
    pub last_error: Option<String>,
}

/// The model from a JSON file (an `api::Snapshot`), re-read when it changes.
pub struct ModelFile {
    /// The file.
    pub path: PathBuf,
    /// How often to check it.
    pub interval: Duration,
    /// Shared status.
    pub status: Arc<Mutex<ModelStatus>>,
}

impl ModelFile {
    /// Reads and validates the file once.
    pub fn load(&self) -> Result<Model, String> {
        let path = self.path.display();
        let text = std::fs::read_to_string(&self.path)
            .map_err(|e| format!("model file {path}: cannot read: {e}"))?;
        let snapshot: Snapshot =
            serde_json::from_str(&text).map_err(|e| format!("model file {path}: {e}"))?;
        Model::new(snapshot).map_err(|e| format!("model file {path}: {e}"))
    }
}

impl ModelSource for ModelFile {
    fn run(
        self: Box<Self>,
        model: SharedModel,
        shutdown: CancellationToken,
    ) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            let mut seen: Option<(SystemTime, u64)> = None;
            loop {
                let stamp = std::fs::metadata(&self.path)
                    .ok()
                    .and_then(|m| Some((m.modified().ok()?, m.len())));
                if stamp.is_some() && stamp != seen {
                    seen = stamp;
                    match self.load() {
                        Ok(m) => {
                            info!(
                                version = m.version(),
                                "model loaded from {}",
                                self.path.display()
                            );
                            model.store(Arc::new(m));
                            let mut st = self.status.lock().expect("status lock is never poisoned");
                            st.loaded = true;
                            st.last_error = None;
                        }
                        Err(e) => {
                            error!("{e}; keeping the previous model");
                            self.status
                                .lock()
                                .expect("status lock is never poisoned")
                                .last_error = Some(e);
                        }
                    }
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(self.interval) => {}
                }
            }
        })
    }
}

/// Where workload certificates come from.
pub trait CertSource: Send + Sync + 'static {
    /// A fresh leaf for `identity`.
    fn fetch(&self, identity: &Identity) -> BoxFuture<'_, Result<WorkloadCert, CaError>>;
    /// The roots peers must chain to.
    fn bundle(&self) -> TrustBundle;
}

/// A CA held in-process (the local sandbox): leaves are minted from CSRs in memory.
pub struct LocalCa {
    ca: CertificateAuthority,
    bundle: TrustBundle,
    ttl: Duration,
}

impl LocalCa {
    /// A CA from PEM files' contents; `roots_pem` is the bundle to trust.
    pub fn from_pem(cert_pem: &str, key_pem: &str, roots_pem: &str) -> Result<Self, String> {
        let ca = CertificateAuthority::from_pem(cert_pem, key_pem).map_err(|e| e.to_string())?;
        let bundle = TrustBundle::from_pem(roots_pem).map_err(|e| e.to_string())?;
        Ok(LocalCa {
            ca,
            bundle,
            ttl: LEAF_TTL,
        })
    }
}

impl CertSource for LocalCa {
    fn fetch(&self, identity: &Identity) -> BoxFuture<'_, Result<WorkloadCert, CaError>> {
        let result = self.ca.issue(identity, self.ttl);
        Box::pin(async move { result })
    }

    fn bundle(&self) -> TrustBundle {
        self.bundle.clone()
    }
}

/// One identity's credentials, held by the pods that run as it. When the last pod
/// lets go, the credentials are forgotten and their refresh stops.
pub struct Lease {
    tls: Arc<TlsIdentity>,
    _stop: tokio_util::sync::DropGuard,
}

impl Lease {
    /// The credentials.
    pub fn tls(&self) -> &Arc<TlsIdentity> {
        &self.tls
    }
}

/// Credentials of the identities this node's pods run as, refreshed at half-life and
/// kept only while some pod uses them.
pub struct Identities {
    source: Arc<dyn CertSource>,
    held: Mutex<HashMap<Identity, Weak<Lease>>>,
    shutdown: CancellationToken,
}

impl Identities {
    /// Empty; certificates are fetched on first use.
    pub fn new(source: Arc<dyn CertSource>, shutdown: CancellationToken) -> Arc<Self> {
        Arc::new(Identities {
            source,
            held: Mutex::new(HashMap::new()),
            shutdown,
        })
    }

    /// How many identities are held (for tests and the admin dump).
    pub fn held(&self) -> usize {
        let mut held = self.held.lock().expect("identities lock is never poisoned");
        held.retain(|_, lease| lease.strong_count() > 0);
        held.len()
    }

    /// The credentials for `identity`, fetching a leaf unless a pod already holds them.
    pub async fn get(self: &Arc<Self>, identity: &Identity) -> Result<Arc<Lease>, String> {
        if let Some(lease) = self.lookup(identity) {
            return Ok(lease);
        }
        let cert = self
            .source
            .fetch(identity)
            .await
            .map_err(|e| format!("certificate for {identity}: {e}"))?;
        let tls = TlsIdentity::new(&cert, self.source.bundle()).map_err(|e| e.to_string())?;
        let mut held = self.held.lock().expect("identities lock is never poisoned");
        // Another pod of the same identity may have won the race; keep one.
        if let Some(lease) = held.get(identity).and_then(Weak::upgrade) {
            return Ok(lease);
        }
        let stop = self.shutdown.child_token();
        let lease = Arc::new(Lease {
            tls: tls.clone(),
            _stop: stop.clone().drop_guard(),
        });
        held.retain(|_, l| l.strong_count() > 0);
        held.insert(identity.clone(), Arc::downgrade(&lease));
        drop(held);
        self.spawn_refresh(
            identity.clone(),
            Arc::downgrade(&lease),
            stop,
            cert.refresh_at(),
        );
        Ok(lease)
    }

    fn lookup(&self, identity: &Identity) -> Option<Arc<Lease>> {
        let held = self.held.lock().expect("identities lock is never poisoned");
        held.get(identity).and_then(Weak::upgrade)
    }

    fn spawn_refresh(
        self: &Arc<Self>,
        identity: Identity,
        lease: Weak<Lease>,
        stop: CancellationToken,
        mut at: SystemTime,
    ) {
        let source = self.source.clone();
        tokio::spawn(async move {
            loop {
                let wait = at.duration_since(SystemTime::now()).unwrap_or_default();
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(wait) => {}
                }
                let Some(lease) = lease.upgrade() else { return };
                match source.fetch(&identity).await {
                    Ok(cert) => match lease.tls.rotate(&cert) {
                        Ok(()) => {
                            info!(%identity, "certificate rotated");
                            at = cert.refresh_at();
                        }
                        Err(e) => {
                            warn!(%identity, "certificate rotation failed: {e}");
                            at = SystemTime::now() + Duration::from_secs(30);
                        }
                    },
                    Err(e) => {
                        warn!(%identity, "certificate refresh failed, retrying in 30 s: {e}");
                        at = SystemTime::now() + Duration::from_secs(30);
                    }
                }
            }
        });
    }
}
