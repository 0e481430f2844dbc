//! Leader election over a `coordination.k8s.io/v1` Lease, as client-go's: every
//! replica serves the model and signs certificates; only the holder of the Lease writes
//! status, events and waypoints.
//!
//! ```text
//!  every RETRY:  GET lease ──absent──> create (holder = me)
//!                    │ held by me ──> renew (PUT at the resourceVersion read)
//!                    │ held by another, record unchanged for DURATION ──> take it (PUT)
//!                    └ otherwise follow
//!  leading = a renewal succeeded within RENEW_DEADLINE; on shutdown the holder empties
//!  the Lease, so another replica takes over at its next try instead of after DURATION
//! ```
//!
//! Expiry is judged by this replica's own clock, from when it last saw the record
//! change, never by comparing the holder's timestamps with its own (clocks differ).
//!
//! The Lease is kept by the API server in a cluster ([`KubeLeases`]) and, in manifest
//! mode (the sandbox), in a file beside the status it guards ([`FileLeases`]: the same
//! record, with the same optimistic concurrency); the election is the same code.

use std::time::Duration;

use std::path::PathBuf;
use std::sync::Arc;

use futures::future::BoxFuture;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{Api, ObjectMeta, PostParams};
use kube::Client;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// The Lease's name, in the controller's namespace.
pub const LEASE_NAME: &str = "weft-controller";

/// How the election is timed.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// How long a holder's record is good for without a renewal.
    pub duration: Duration,
    /// How long the holder keeps leading without a successful renewal.
    pub renew_deadline: Duration,
    /// How often each replica tries.
    pub retry: Duration,
}

impl Default for Timing {
    /// client-go's defaults: 15 s, 10 s, 2 s.
    fn default() -> Self {
        Timing {
            duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry: Duration::from_secs(2),
        }
    }
}

/// Whether this replica leads, as it changes.
pub type Leading = watch::Receiver<bool>;

/// A leadership that never changes: `true` for a single writer, `false` for none.
pub fn fixed(leading: bool) -> Leading {
    static FIXED: [std::sync::OnceLock<watch::Sender<bool>>; 2] =
        [std::sync::OnceLock::new(), std::sync::OnceLock::new()];
    FIXED[usize::from(leading)]
        .get_or_init(|| watch::Sender::new(leading))
        .subscribe()
}

/// Whether this replica leads now: the last word of a live election (an election that
/// ended, with its task, leads no more).
pub fn is_leading(leading: &Leading) -> bool {
    *leading.borrow() && leading.has_changed().is_ok()
}

/// Waits until leadership changes; forever once the election has ended.
pub async fn changed(leading: &mut Leading) {
    if leading.changed().await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// This replica's identity in the Lease: its pod's name (`HOSTNAME` in a pod), with a
/// random suffix so a restarted pod of the same name is a new holder.
pub fn identity() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "weft-controller".into());
    let mut bytes = [0u8; 4];
    let _ = aws_lc_rs::rand::fill(&mut bytes);
    format!("{host}_{:08x}", u32::from_le_bytes(bytes))
}

/// Why the Lease could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// The API server refused or could not be reached.
    #[error("{0}")]
    Api(#[from] kube::Error),
    /// The lease file could not be read or written.
    #[error("{path}: {source}")]
    File {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// Where the Lease is kept: read it, create it, replace it at the version read.
pub trait LeaseStore: Send + Sync + 'static {
    /// The Lease, if there is one.
    fn get(&self) -> BoxFuture<'_, Result<Option<Lease>, LeaseError>>;
    /// Creates it: `false` if another replica did first.
    fn create<'a>(&'a self, lease: &'a Lease) -> BoxFuture<'a, Result<bool, LeaseError>>;
    /// Replaces it at its `metadata.resourceVersion`: `false` if it changed since.
    fn replace<'a>(&'a self, lease: &'a Lease) -> BoxFuture<'a, Result<bool, LeaseError>>;
}

/// The Lease `LEASE_NAME` in a namespace of the API server.
pub struct KubeLeases(pub Api<Lease>);

impl LeaseStore for KubeLeases {
    fn get(&self) -> BoxFuture<'_, Result<Option<Lease>, LeaseError>> {
        Box::pin(async move { Ok(self.0.get_opt(LEASE_NAME).await?) })
    }

    fn create<'a>(&'a self, lease: &'a Lease) -> BoxFuture<'a, Result<bool, LeaseError>> {
        Box::pin(async move {
            match self.0.create(&PostParams::default(), lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(s)) if s.is_already_exists() => Ok(false),
                Err(e) => Err(e.into()),
            }
        })
    }

    fn replace<'a>(&'a self, lease: &'a Lease) -> BoxFuture<'a, Result<bool, LeaseError>> {
        Box::pin(async move {
            match self
                .0
                .replace(LEASE_NAME, &PostParams::default(), lease)
                .await
            {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                Err(e) => Err(e.into()),
            }
        })
    }
}

/// The Lease in a file (manifest mode): JSON, its version in `metadata.resourceVersion`,
/// each read-compare-write under an exclusive lock of `<file>.lock`, written by rename.
pub struct FileLeases {
    path: PathBuf,
}

impl FileLeases {
    /// The Lease in `path`.
    pub fn new(path: PathBuf) -> Self {
        FileLeases { path }
    }

    fn fail(&self, source: std::io::Error) -> LeaseError {
        LeaseError::File {
            path: self.path.clone(),
            source,
        }
    }

    /// Runs `f` on the current record under the lock.
    fn locked<T>(
        &self,
        f: impl FnOnce(Option<Lease>) -> Result<T, LeaseError>,
    ) -> Result<T, LeaseError> {
        let lock_path = self.path.with_extension("lock");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| self.fail(e))?;
        let _lock = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, errno)| self.fail(std::io::Error::from(errno)))?;
        let current = match std::fs::read(&self.path) {
            Ok(bytes) => serde_json::from_slice(&bytes).ok(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(self.fail(e)),
        };
        f(current)
    }

    fn store(&self, lease: &Lease, version: u64) -> Result<(), LeaseError> {
        let mut lease = lease.clone();
        lease.metadata.resource_version = Some(version.to_string());
        let bytes = serde_json::to_vec(&lease).map_err(|e| self.fail(e.into()))?;
        let tmp = self.path.with_extension("tmp");
        std::fs::write(&tmp, bytes).map_err(|e| self.fail(e))?;
        std::fs::rename(&tmp, &self.path).map_err(|e| self.fail(e))
    }
}

fn version_of(lease: &Lease) -> u64 {
    lease
        .metadata
        .resource_version
        .as_deref()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

impl LeaseStore for FileLeases {
    fn get(&self) -> BoxFuture<'_, Result<Option<Lease>, LeaseError>> {
        Box::pin(async move { self.locked(Ok) })
    }

    fn create<'a>(&'a self, lease: &'a Lease) -> BoxFuture<'a, Result<bool, LeaseError>> {
        Box::pin(async move {
            self.locked(|current| match current {
                Some(_) => Ok(false),
                None => self.store(lease, 1).map(|()| true),
            })
        })
    }

    fn replace<'a>(&'a self, lease: &'a Lease) -> BoxFuture<'a, Result<bool, LeaseError>> {
        Box::pin(async move {
            self.locked(|current| match current {
                Some(c) if version_of(&c) == version_of(lease) => {
                    self.store(lease, version_of(lease) + 1).map(|()| true)
                }
                _ => Ok(false),
            })
        })
    }
}

/// Starts electing in `namespace` as `identity`; runs until `shutdown`, then gives the
/// Lease up if held.
pub fn start(
    client: Client,
    namespace: &str,
    identity: String,
    timing: Timing,
    shutdown: CancellationToken,
) -> Leading {
    spawn(client, namespace, identity, timing, shutdown).0
}

/// As [`start`], with the election's task (aborting it is a replica dying: the Lease
/// is not given up, and runs out).
pub fn spawn(
    client: Client,
    namespace: &str,
    identity: String,
    timing: Timing,
    shutdown: CancellationToken,
) -> (Leading, tokio::task::JoinHandle<()>) {
    let store = KubeLeases(Api::namespaced(client, namespace));
    spawn_on(Arc::new(store), identity, timing, shutdown)
}

/// Elects on `store`, as [`spawn`].
pub fn spawn_on(
    store: Arc<dyn LeaseStore>,
    identity: String,
    timing: Timing,
    shutdown: CancellationToken,
) -> (Leading, tokio::task::JoinHandle<()>) {
    let (tx, rx) = watch::channel(false);
    (
        rx,
        tokio::spawn(elect(store, identity, timing, tx, shutdown)),
    )
}

impl Timing {
    /// client-go's proportions for a lease of `duration`: renewals given up after two
    /// thirds of it, tried every seventh (at least every 200 ms).
    pub fn for_duration(duration: Duration) -> Self {
        Timing {
            duration,
            renew_deadline: duration * 2 / 3,
            retry: (duration / 7).max(Duration::from_millis(200)),
        }
    }
}

/// A Lease's record as seen: its holder and last renewal.
type Record = (Option<String>, Option<MicroTime>);

fn now() -> MicroTime {
    MicroTime(k8s_openapi::jiff::Timestamp::now())
}

/// How often a Lease failure that lasts is logged again.
const LEASE_FAILURE_EVERY: Duration = Duration::from_secs(60);

/// Logs a failure to read or write the Lease as a warning: at its start, when it
/// changes, and once a minute while it lasts (a replica that cannot reach its Lease
/// never leads, and nothing else would say why); its end at info.
fn report_lease(failing: &mut Option<(String, Instant)>, now: Option<String>) {
    match (now, failing.as_mut()) {
        (None, None) => {}
        (None, Some(_)) => {
            *failing = None;
            info!("lease {LEASE_NAME}: read and written again");
        }
        (Some(e), Some((last, at))) if *last == e && at.elapsed() < LEASE_FAILURE_EVERY => {
            debug!("lease {LEASE_NAME}: {e}");
        }
        (Some(e), _) => {
            warn!(
                "lease {LEASE_NAME}: {e} (this replica cannot lead until it can write the Lease)"
            );
            *failing = Some((e, Instant::now()));
        }
    }
}

async fn elect(
    api: Arc<dyn LeaseStore>,
    me: String,
    timing: Timing,
    tx: watch::Sender<bool>,
    shutdown: CancellationToken,
) {
    // The record last seen (holder, renewTime) and when it was first seen so.
    let mut observed: Option<(Record, Instant)> = None;
    // When the last successful renewal was sent: leadership ends at it plus the
    // renew deadline, whatever the API server does meanwhile.
    let mut renewed: Option<Instant> = None;
    // The Lease's failure being reported, and when it was last logged.
    let mut failing: Option<(String, Instant)> = None;
    // Whole seconds, at least one (the Lease holds seconds), rounded up.
    let seconds =
        i32::try_from(timing.duration.as_millis().div_ceil(1000).max(1)).unwrap_or(i32::MAX);
    loop {
        let sent = Instant::now();
        // A call that hangs must not keep a leader leading: bounded by what is left of
        // the renew deadline (or the whole of it for a follower).
        let budget = renewed
            .map(|at| timing.renew_deadline.saturating_sub(at.elapsed()))
            .unwrap_or(timing.renew_deadline)
            .max(Duration::from_millis(50));
        let outcome = tokio::time::timeout(
            budget,
            try_once(api.as_ref(), &me, seconds, timing, &mut observed),
        )
        .await;
        let within_deadline = renewed.is_some_and(|at| at.elapsed() < timing.renew_deadline);
        let failure = match &outcome {
            Ok(Err(e)) => Some(e.to_string()),
            Err(_) => Some(format!("no answer within {budget:?}")),
            Ok(Ok(_)) => None,
        };
        report_lease(&mut failing, failure);
        let led = match outcome {
            Ok(Ok(Try::Holding)) => {
                renewed = Some(sent);
                true
            }
            Ok(Ok(Try::HeldByAnother)) => false,
            // Another write to the Lease meanwhile: a holder tries again, leading until
            // the renew deadline, as through an error.
            Ok(Ok(Try::Conflict)) | Ok(Err(_)) | Err(_) => within_deadline,
        };
        if !led {
            renewed = None;
        }
        if *tx.borrow() != led {
            if led {
                info!(identity = %me, "leading: this replica writes status, events and waypoints");
            } else {
                warn!(identity = %me, "not leading: another replica writes status, events and waypoints");
            }
            tx.send_replace(led);
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(timing.retry) => {}
        }
    }
    if *tx.borrow() {
        tx.send_replace(false);
        release(api.as_ref(), &me).await;
    }
}

/// What one round found.
enum Try {
    /// This replica holds the Lease (created, renewed or taken).
    Holding,
    /// Another holds it and has not let it run out.
    HeldByAnother,
    /// The write lost to another (created or replaced meanwhile).
    Conflict,
}

/// One round: whether this replica holds the Lease after it.
async fn try_once(
    api: &dyn LeaseStore,
    me: &str,
    seconds: i32,
    timing: Timing,
    observed: &mut Option<(Record, Instant)>,
) -> Result<Try, LeaseError> {
    let Some(mut lease) = api.get().await? else {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(LEASE_NAME.into()),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(me.to_owned()),
                lease_duration_seconds: Some(seconds),
                acquire_time: Some(now()),
                renew_time: Some(now()),
                lease_transitions: Some(0),
                ..Default::default()
            }),
        };
        return Ok(match api.create(&lease).await? {
            true => Try::Holding,
            // Another replica created it first.
            false => Try::HeldByAnother,
        });
    };
    let spec = lease.spec.get_or_insert_with(Default::default);
    let record = (spec.holder_identity.clone(), spec.renew_time.clone());
    let since = match observed {
        Some((seen, at)) if *seen == record => *at,
        _ => {
            let at = Instant::now();
            *observed = Some((record.clone(), at));
            at
        }
    };
    let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
    let held_by_me = holder.as_deref() == Some(me);
    // Another holder's record is good for its duration from when this replica saw it.
    let duration = spec
        .lease_duration_seconds
        .and_then(|s| u64::try_from(s).ok())
        .map(Duration::from_secs)
        .unwrap_or(timing.duration);
    if !held_by_me && holder.is_some() && since.elapsed() < duration {
        return Ok(Try::HeldByAnother);
    }
    if !held_by_me {
        spec.holder_identity = Some(me.to_owned());
        spec.acquire_time = Some(now());
        spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
    }
    spec.renew_time = Some(now());
    spec.lease_duration_seconds = Some(seconds);
    // At the resourceVersion read: a concurrent taker makes this fail.
    if !api.replace(&lease).await? {
        return Ok(Try::Conflict);
    }
    if !held_by_me {
        info!(identity = %me, previous = ?holder, "took the lease");
    }
    Ok(Try::Holding)
}

/// Empties the Lease's holder, so another replica takes over at its next try.
async fn release(api: &dyn LeaseStore, me: &str) {
    let Ok(Some(mut lease)) = api.get().await else {
        return;
    };
    let spec = lease.spec.get_or_insert_with(Default::default);
    if spec.holder_identity.as_deref() != Some(me) {
        return;
    }
    spec.holder_identity = None;
    spec.renew_time = Some(now());
    match api.replace(&lease).await {
        Ok(true) => info!(identity = %me, "gave the lease up"),
        Ok(false) => debug!("the lease changed meanwhile; not given up"),
        Err(e) => debug!("cannot give the lease up: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A Lease failure is logged when it starts and when it changes, not on every try
    /// within a minute, and forgotten once the Lease is written again.
    #[test]
    fn a_lasting_lease_failure_is_logged_once_a_minute_until_it_ends() {
        let mut failing = None;
        report_lease(&mut failing, Some("403 forbidden".into()));
        let first = failing.clone().expect("remembered");
        report_lease(&mut failing, Some("403 forbidden".into()));
        assert_eq!(failing, Some(first.clone()), "not logged again at once");
        report_lease(&mut failing, Some("500".into()));
        assert_eq!(failing.as_ref().map(|f| f.0.as_str()), Some("500"));
        report_lease(&mut failing, None);
        assert_eq!(failing, None);
    }

    /// The file-kept Lease: two electors, one leads; it dies without giving the Lease
    /// up and the other leads once the Lease has run out; a graceful stop hands over
    /// at once.
    #[tokio::test]
    async fn a_file_lease_elects_one_and_hands_over() {
        let dir = std::env::temp_dir().join(format!("weft-lease-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a temporary directory");
        let store = || -> Arc<dyn LeaseStore> { Arc::new(FileLeases::new(dir.join("lease.json"))) };
        let timing = Timing::for_duration(Duration::from_secs(1));
        let (a_stop, b_stop) = (CancellationToken::new(), CancellationToken::new());
        let (a, a_task) = spawn_on(store(), "a".into(), timing, a_stop.clone());
        let wait = |l: &Leading, limit: Duration| {
            let l = l.clone();
            async move {
                let start = Instant::now();
                while !is_leading(&l) {
                    if start.elapsed() > limit {
                        return None;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Some(start.elapsed())
            }
        };
        assert!(wait(&a, Duration::from_secs(2)).await.is_some(), "a leads");
        let (b, _b_task) = spawn_on(store(), "b".into(), timing, b_stop.clone());
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert!(!is_leading(&b), "one leader at a time");
        a_task.abort();
        let took = wait(&b, Duration::from_secs(3))
            .await
            .expect("b takes over");
        assert!(
            took >= Duration::from_millis(700),
            "not before a's lease ran out: {took:?}"
        );
        // b stops gracefully; a new elector leads at its first tries.
        let (c, _c_task) = spawn_on(store(), "c".into(), timing, CancellationToken::new());
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!is_leading(&c));
        b_stop.cancel();
        // b gives the Lease up (its holder emptied), rather than leaving it to run out.
        let released = async {
            loop {
                let lease = FileLeases::new(dir.join("lease.json"))
                    .get()
                    .await
                    .ok()
                    .flatten();
                let holder = lease.and_then(|l| l.spec).and_then(|s| s.holder_identity);
                if holder.as_deref() != Some("b") {
                    return holder;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        let next = tokio::time::timeout(Duration::from_secs(3), released)
            .await
            .expect("b lets the Lease go");
        assert!(next.is_none() || next.as_deref() == Some("c"), "{next:?}");
        wait(&c, Duration::from_secs(3))
            .await
            .expect("c takes over");
        let _ = std::fs::remove_dir_all(&dir);
        a_stop.cancel();
    }

    /// A store whose calls hang once told to: an API server gone silent.
    struct Hanging {
        inner: FileLeases,
        hang: std::sync::atomic::AtomicBool,
    }

    impl LeaseStore for Hanging {
        fn get(&self) -> BoxFuture<'_, Result<Option<Lease>, LeaseError>> {
            Box::pin(async move {
                if self.hang.load(std::sync::atomic::Ordering::Relaxed) {
                    std::future::pending::<()>().await;
                }
                self.inner.get().await
            })
        }
        fn create<'a>(&'a self, lease: &'a Lease) -> BoxFuture<'a, Result<bool, LeaseError>> {
            self.inner.create(lease)
        }
        fn replace<'a>(&'a self, lease: &'a Lease) -> BoxFuture<'a, Result<bool, LeaseError>> {
            self.inner.replace(lease)
        }
    }

    /// A leader whose calls to the Lease hang stops leading at its renew deadline,
    /// before another can take the Lease: never two leaders.
    #[tokio::test]
    async fn a_leader_cut_off_from_the_lease_stops_before_another_starts() {
        let dir = std::env::temp_dir().join(format!("weft-lease-hang-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a temporary directory");
        let timing = Timing::for_duration(Duration::from_secs(2));
        let a_store = Arc::new(Hanging {
            inner: FileLeases::new(dir.join("lease.json")),
            hang: std::sync::atomic::AtomicBool::new(false),
        });
        let (a, _a_task) = spawn_on(
            a_store.clone(),
            "a".into(),
            timing,
            CancellationToken::new(),
        );
        let start = Instant::now();
        while !is_leading(&a) {
            assert!(start.elapsed() < Duration::from_secs(2), "a leads");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let (b, _b_task) = spawn_on(
            Arc::new(FileLeases::new(dir.join("lease.json"))),
            "b".into(),
            timing,
            CancellationToken::new(),
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
        a_store
            .hang
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let cut = Instant::now();
        let mut a_stopped = None;
        while !is_leading(&b) {
            assert!(cut.elapsed() < Duration::from_secs(6), "b takes over");
            assert!(!(is_leading(&a) && is_leading(&b)), "never two leaders");
            if a_stopped.is_none() && !is_leading(&a) {
                a_stopped = Some(cut.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let a_stopped = a_stopped.expect("a stopped before b started");
        assert!(
            a_stopped <= timing.renew_deadline + Duration::from_millis(200),
            "a stops at its renew deadline: {a_stopped:?}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
