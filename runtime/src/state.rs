//! The mesh model and workload certificates, as the data path reads them: the model
//! behind one `ArcSwap` (one load per connection), certificates per identity behind a
//! [`CertSource`] (the controller's CA in production, an in-process CA in tests).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime};

use api::Model;
use arc_swap::ArcSwap;
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use tunnel::hbone::BoxFuture;
use tunnel::identity::{CaError, Identity, TrustBundle, WorkloadCert};
use tunnel::tls::TlsIdentity;

/// The current model, read on every connection without locking.
pub type SharedModel = Arc<ArcSwap<Model>>;

/// Where the model stands, for `/ready`, `/config_dump` and logs.
#[derive(Debug, Default, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ModelStatus {
    /// A model has been applied.
    pub loaded: bool,
    /// The subscription to the controller is up.
    pub connected: bool,
    /// The controller instance the model came from.
    pub epoch: String,
    /// The version applied last.
    pub version: u64,
    /// Why the last subscription attempt or update failed, if it did.
    pub last_error: Option<String>,
    /// Resources of the last update that were refused, as `key: reason`.
    pub rejected: Vec<String>,
    /// Seconds since the epoch of the last update applied.
    pub updated_at: u64,
}

/// Why a certificate could not be had.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// The CA refused to sign.
    #[error("the controller refused to sign it: {0}")]
    Refused(String),
    /// The CA could not be reached.
    #[error("the controller is unreachable: {0}")]
    Unavailable(String),
    /// What the CA returned is unusable, or the request could not be made.
    #[error(transparent)]
    Invalid(#[from] CaError),
    /// The credentials could not be built from the certificate.
    #[error(transparent)]
    Tls(#[from] tunnel::tls::TlsError),
}

impl CertError {
    /// A metric label.
    pub fn label(&self) -> &'static str {
        match self {
            CertError::Refused(_) => "refused",
            CertError::Unavailable(_) => "unavailable",
            CertError::Invalid(_) | CertError::Tls(_) => "invalid",
        }
    }
}

/// Where workload certificates come from.
pub trait CertSource: Send + Sync + 'static {
    /// A fresh leaf for `identity`, and the trust bundle to use with it.
    fn fetch(
        &self,
        identity: &Identity,
    ) -> BoxFuture<'_, Result<(WorkloadCert, TrustBundle), CertError>>;
}

/// A CA held in-process: for tests of the data path without a controller.
pub struct LocalCa {
    ca: tunnel::identity::CertificateAuthority,
    bundle: TrustBundle,
}

impl LocalCa {
    /// Signs with `ca`, trusting only it.
    pub fn new(ca: tunnel::identity::CertificateAuthority) -> Result<Self, CaError> {
        let bundle = TrustBundle::new(vec![ca.cert_der().clone()])
            .map_err(|e| CaError::CaCert(e.to_string()))?;
        Ok(LocalCa { ca, bundle })
    }
}

impl CertSource for LocalCa {
    fn fetch(
        &self,
        identity: &Identity,
    ) -> BoxFuture<'_, Result<(WorkloadCert, TrustBundle), CertError>> {
        let result = self
            .ca
            .issue(identity, tunnel::identity::LEAF_TTL)
            .map(|c| (c, self.bundle.clone()))
            .map_err(CertError::from);
        Box::pin(async move { result })
    }
}

/// One identity's credentials, held by the pods that run as it. When the last pod
/// lets go, the credentials are forgotten and their refresh stops.
pub struct Lease {
    tls: Arc<TlsIdentity>,
    not_after: Mutex<SystemTime>,
    _stop: tokio_util::sync::DropGuard,
}

impl Lease {
    /// The credentials.
    pub fn tls(&self) -> &Arc<TlsIdentity> {
        &self.tls
    }

    /// When the current leaf expires.
    pub fn not_after(&self) -> SystemTime {
        *self.not_after.lock().expect("lease lock is never poisoned")
    }
}

/// Credentials of the identities this node's pods run as, refreshed at half-life and
/// kept only while some pod uses them.
pub struct Identities {
    source: Arc<dyn CertSource>,
    held: Mutex<HashMap<Identity, Weak<Lease>>>,
    /// Where certificate rotations are counted.
    pub rotations: prometheus_client::metrics::counter::Counter,
    shutdown: CancellationToken,
}

impl Identities {
    /// Empty; certificates are fetched on first use.
    pub fn new(source: Arc<dyn CertSource>, shutdown: CancellationToken) -> Arc<Self> {
        Arc::new(Identities {
            source,
            held: Mutex::new(HashMap::new()),
            rotations: Default::default(),
            shutdown,
        })
    }

    /// How many identities are held (for tests and the admin dump).
    pub fn held(&self) -> usize {
        let mut held = self.held.lock().expect("identities lock is never poisoned");
        held.retain(|_, lease| lease.strong_count() > 0);
        held.len()
    }

    /// The held identities and when their leaves expire.
    pub fn expiries(&self) -> Vec<(Identity, SystemTime)> {
        let held = self.held.lock().expect("identities lock is never poisoned");
        held.iter()
            .filter_map(|(id, l)| l.upgrade().map(|l| (id.clone(), l.not_after())))
            .collect()
    }

    /// A new trust bundle for every held identity (a root rotation); later handshakes
    /// use it.
    pub fn set_bundle(&self, bundle: &TrustBundle) {
        let held = self.held.lock().expect("identities lock is never poisoned");
        for lease in held.values().filter_map(Weak::upgrade) {
            lease.tls.set_bundle(bundle.clone());
        }
    }

    /// The credentials for `identity`, fetching a leaf unless a pod already holds them.
    pub async fn get(self: &Arc<Self>, identity: &Identity) -> Result<Arc<Lease>, CertError> {
        if let Some(lease) = self.lookup(identity) {
            return Ok(lease);
        }
        let (cert, bundle) = self.source.fetch(identity).await?;
        let tls = TlsIdentity::new(&cert, bundle)?;
        let mut held = self.held.lock().expect("identities lock is never poisoned");
        // Another pod of the same identity may have won the race; keep one.
        if let Some(lease) = held.get(identity).and_then(Weak::upgrade) {
            return Ok(lease);
        }
        let stop = self.shutdown.child_token();
        let lease = Arc::new(Lease {
            tls: tls.clone(),
            not_after: Mutex::new(cert.not_after),
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
            cert.not_after,
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
        mut not_after: SystemTime,
    ) {
        let (source, rotations) = (self.source.clone(), self.rotations.clone());
        tokio::spawn(async move {
            let mut failures = 0u32;
            loop {
                let wait = at.duration_since(SystemTime::now()).unwrap_or_default();
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(wait) => {}
                }
                let Some(lease) = lease.upgrade() else { return };
                let result = match source.fetch(&identity).await {
                    Ok((cert, bundle)) => lease
                        .tls
                        .rotate(&cert)
                        .map(|()| (cert, bundle))
                        .map_err(CertError::from),
                    Err(e) => Err(e),
                };
                match result {
                    Ok((cert, bundle)) => {
                        lease.tls.set_bundle(bundle);
                        *lease
                            .not_after
                            .lock()
                            .expect("lease lock is never poisoned") = cert.not_after;
                        rotations.inc();
                        info!(%identity, "certificate rotated");
                        // Never sooner than a second: a leaf that is already half
                        // gone must not turn this into a signing loop.
                        let soonest = SystemTime::now() + Duration::from_secs(1);
                        (at, not_after, failures) =
                            (cert.refresh_at().max(soonest), cert.not_after, 0);
                    }
                    Err(e) => {
                        // Retry sooner the closer the leaf is to expiring: a tenth of what
                        // is left, between 1 s and 30 s, doubling per failure.
                        failures += 1;
                        let left = not_after
                            .duration_since(SystemTime::now())
                            .unwrap_or_default();
                        let backoff = Duration::from_secs(1 << failures.min(5))
                            .min(left / 10)
                            .clamp(Duration::from_secs(1), Duration::from_secs(30));
                        warn!(%identity, "certificate refresh failed, retrying in {} s: {e}", backoff.as_secs());
                        at = SystemTime::now() + backoff;
                    }
                }
            }
        });
    }
}

/// Exports when each held identity's leaf expires, read from [`Identities`] at each
/// scrape: `weft_certificate_expiration_timestamp_seconds{identity}`, so a dashboard
/// or an alert sees a renewal that stopped before the leaf runs out.
pub struct ExpiryCollector(pub Arc<Identities>);

impl std::fmt::Debug for ExpiryCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExpiryCollector").finish_non_exhaustive()
    }
}

impl prometheus_client::collector::Collector for ExpiryCollector {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        use prometheus_client::metrics::gauge::ConstGauge;
        let expiries = self.0.expiries();
        if expiries.is_empty() {
            return Ok(());
        }
        let mut family = encoder.encode_descriptor(
            "weft_certificate_expiration_timestamp_seconds",
            "When the workload certificate of each identity held expires, seconds since the Unix epoch",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        for (identity, not_after) in expiries {
            let at = not_after
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64());
            let labels = [("identity", identity.to_string())];
            ConstGauge::new(at).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}
