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

use std::time::Duration;

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
    let (tx, rx) = watch::channel(false);
    let api: Api<Lease> = Api::namespaced(client, namespace);
    (rx, tokio::spawn(elect(api, identity, timing, tx, shutdown)))
}

/// A Lease's record as seen: its holder and last renewal.
type Record = (Option<String>, Option<MicroTime>);

fn now() -> MicroTime {
    MicroTime(k8s_openapi::jiff::Timestamp::now())
}

async fn elect(
    api: Api<Lease>,
    me: String,
    timing: Timing,
    tx: watch::Sender<bool>,
    shutdown: CancellationToken,
) {
    // The record last seen (holder, renewTime) and when it was first seen so.
    let mut observed: Option<(Record, Instant)> = None;
    let mut renewed: Option<Instant> = None;
    let seconds = i32::try_from(timing.duration.as_secs()).unwrap_or(i32::MAX);
    loop {
        let led = match try_once(&api, &me, seconds, timing, &mut observed).await {
            Ok(true) => {
                renewed = Some(Instant::now());
                true
            }
            Ok(false) => false,
            Err(e) => {
                debug!("lease {LEASE_NAME}: {e}");
                // A holder keeps leading through errors until the renew deadline.
                renewed.is_some_and(|at| at.elapsed() < timing.renew_deadline)
            }
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
        release(&api, &me).await;
    }
}

/// One round: `Ok(true)` if this replica holds the Lease after it.
async fn try_once(
    api: &Api<Lease>,
    me: &str,
    seconds: i32,
    timing: Timing,
    observed: &mut Option<(Record, Instant)>,
) -> Result<bool, kube::Error> {
    let Some(mut lease) = api.get_opt(LEASE_NAME).await? else {
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
        return match api.create(&PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            // Another replica created it first.
            Err(kube::Error::Api(s)) if s.is_already_exists() => Ok(false),
            Err(e) => Err(e),
        };
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
        return Ok(false);
    }
    if !held_by_me {
        spec.holder_identity = Some(me.to_owned());
        spec.acquire_time = Some(now());
        spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
    }
    spec.renew_time = Some(now());
    spec.lease_duration_seconds = Some(seconds);
    // At the resourceVersion read: a concurrent taker makes this a 409.
    match api
        .replace(LEASE_NAME, &PostParams::default(), &lease)
        .await
    {
        Ok(_) => {
            if !held_by_me {
                info!(identity = %me, previous = ?holder, "took the lease");
            }
            Ok(true)
        }
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}

/// Empties the Lease's holder, so another replica takes over at its next try.
async fn release(api: &Api<Lease>, me: &str) {
    let Ok(Some(mut lease)) = api.get_opt(LEASE_NAME).await else {
        return;
    };
    let spec = lease.spec.get_or_insert_with(Default::default);
    if spec.holder_identity.as_deref() != Some(me) {
        return;
    }
    spec.holder_identity = None;
    spec.renew_time = Some(now());
    match api
        .replace(LEASE_NAME, &PostParams::default(), &lease)
        .await
    {
        Ok(_) => info!(identity = %me, "gave the lease up"),
        Err(e) => debug!("cannot give the lease up: {e}"),
    }
}
