//! What a TrafficPolicy turns on for a backend service, and the state it needs: load
//! balancing, outlier detection, connection and pending-request limits, the retry
//! budget, fault injection and the local rate limit.
//!
//! One [`Backend`] per service the waypoint sends to, made again when the service's
//! TrafficPolicy changes (its counters start over). Endpoint statistics are kept per
//! endpoint address and forgotten with the endpoint.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use api::model::Target;
use api::proto;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
// tokio's clock, which is the system's outside tests, so tests can run on paused time.
use tokio::time::Instant;

/// Defaults when a TrafficPolicy leaves a field at 0.
const DEFAULT_EJECTION: Duration = Duration::from_secs(30);
const DEFAULT_MAX_EJECTION_PERCENT: u32 = 10;
/// Without a TrafficPolicy: retries may add 20% to the requests, plus 10 a second.
const DEFAULT_BUDGET_PERCENT: u32 = 20;
const DEFAULT_BUDGET_MIN_PER_SECOND: u32 = 10;
/// The latency an endpoint without samples is assumed to have.
const EWMA_START_US: f64 = 1_000.0;
/// How fast a latency sample's weight decays (seconds): the EWMA's memory.
const EWMA_TAU_SECS: f64 = 1.0;
/// How fast the cost of an endpoint that gets no requests falls (seconds), so that
/// one slow answer, or a tie lost by noise, does not starve it.
const IDLE_TAU_SECS: f64 = 0.1;

/// One endpoint's counters, kept across model versions while the endpoint stays.
#[derive(Debug, Default)]
pub struct Stats {
    outstanding: AtomicUsize,
    /// Latency EWMA in µs, as f64 bits.
    ewma_us: AtomicU64,
    /// When it was last updated, in µs since the backend's start.
    updated_us: AtomicU64,
    /// Ejected until this many µs after the backend's start; 0 when not ejected. Read
    /// by every pick without a lock.
    ejected_until_us: AtomicU64,
    health: Mutex<Health>,
}

#[derive(Debug, Default)]
struct Health {
    consecutive_5xx: u32,
    consecutive_connect_failures: u32,
    ejections: u32,
}

/// An endpoint of a model version with its counters: what balancing picks from.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// Where it is.
    pub target: Target,
    /// Its counters.
    pub stats: Arc<Stats>,
}

/// How an attempt on an endpoint ended, for outlier detection and the EWMA.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A response with this status.
    Status(u16),
    /// The endpoint could not be reached.
    ConnectFailure,
    /// No answer in time.
    Timeout,
}

/// Why a request was not sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limited {
    /// Too many requests wait for a connection (circuit breaking).
    PendingRequests,
    /// The local rate limit.
    RateLimit,
}

impl Limited {
    /// The `weft-limited` header value.
    pub fn as_str(self) -> &'static str {
        match self {
            Limited::PendingRequests => "max-pending-requests",
            Limited::RateLimit => "rate-limit",
        }
    }
}

/// A service's resilience state.
#[derive(Debug)]
pub struct Backend {
    policy: proto::TrafficPolicy,
    endpoints: Mutex<HashMap<SocketAddr, Arc<Stats>>>,
    round_robin: AtomicUsize,
    round_robin_policy: bool,
    connections: Option<Arc<Semaphore>>,
    pending: AtomicUsize,
    bucket: Mutex<Bucket>,
    budget: Mutex<Bucket>,
    born: Instant,
}

/// A token bucket.
#[derive(Debug)]
struct Bucket {
    tokens: f64,
    capacity: f64,
    per_second: f64,
    last: Instant,
}

impl Bucket {
    fn new(capacity: f64, per_second: f64) -> Self {
        Bucket {
            tokens: capacity,
            capacity,
            per_second,
            last: Instant::now(),
        }
    }

    fn refill(&mut self) {
        let now = Instant::now();
        let elapsed = now.duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.per_second).min(self.capacity);
    }

    fn take(&mut self) -> bool {
        self.refill();
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    fn deposit(&mut self, n: f64) {
        self.refill();
        self.tokens = (self.tokens + n).min(self.capacity);
    }
}

/// Holds a connection slot and the endpoint's outstanding count while a request is out.
#[derive(Debug)]
pub struct InFlight {
    endpoint: Arc<Stats>,
    started: Instant,
    _slot: Option<OwnedSemaphorePermit>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.endpoint.outstanding.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Backend {
    /// The state for a service tuned by `policy` (the default policy when `None`).
    pub fn new(policy: Option<&proto::TrafficPolicy>) -> Self {
        let policy = policy.cloned().unwrap_or_default();
        let limits = policy.limits.unwrap_or_default();
        let rate = policy.rate_limit.unwrap_or_default();
        let budget = policy.retry_budget.unwrap_or(proto::RetryBudget {
            percent: DEFAULT_BUDGET_PERCENT,
            min_per_second: DEFAULT_BUDGET_MIN_PER_SECOND,
        });
        let bucket = match rate.per_second {
            0 => Bucket::new(f64::INFINITY, 0.0),
            n => Bucket::new(f64::from(rate.burst.max(1)), f64::from(n)),
        };
        // The budget starts with what its floor allows in one second.
        let floor = f64::from(budget.min_per_second);
        let mut budget_bucket = Bucket::new(floor.max(1.0) * 10.0 + 100.0, floor);
        budget_bucket.tokens = floor;
        let round_robin_policy = proto::LoadBalancer::try_from(policy.load_balancer)
            == Ok(proto::LoadBalancer::RoundRobin);
        Backend {
            connections: (limits.max_connections > 0)
                .then(|| Arc::new(Semaphore::new(limits.max_connections as usize))),
            policy,
            endpoints: Mutex::new(HashMap::new()),
            round_robin: AtomicUsize::new(0),
            round_robin_policy,
            pending: AtomicUsize::new(0),
            bucket: Mutex::new(bucket),
            budget: Mutex::new(budget_bucket),
            born: Instant::now(),
        }
    }

    /// Whether this state was made for `policy`.
    pub fn is_for(&self, policy: Option<&proto::TrafficPolicy>) -> bool {
        match policy {
            Some(p) => *p == self.policy,
            None => self.policy == proto::TrafficPolicy::default(),
        }
    }

    /// The fault to inject into one request: a delay, then maybe an abort status.
    pub fn fault(&self) -> (Option<Duration>, Option<u16>) {
        let Some(f) = &self.policy.fault else {
            return (None, None);
        };
        let hit = |ppm: u32| ppm > 0 && fastrand::u32(0..1_000_000) < ppm;
        let delay = hit(f.delay_ppm).then(|| Duration::from_millis(u64::from(f.delay_ms)));
        let status = u16::try_from(f.abort_status).unwrap_or(503);
        let abort = hit(f.abort_ppm).then_some(if status == 0 { 503 } else { status });
        (delay, abort)
    }

    /// Takes a token of the local rate limit.
    pub fn admit(&self) -> Result<(), Limited> {
        match self.bucket.lock().expect("bucket lock").take() {
            true => Ok(()),
            false => Err(Limited::RateLimit),
        }
    }

    /// Counts a first attempt toward the retry budget.
    pub fn count_request(&self) {
        let percent = self
            .policy
            .retry_budget
            .map_or(DEFAULT_BUDGET_PERCENT, |b| b.percent);
        self.budget
            .lock()
            .expect("budget lock")
            .deposit(f64::from(percent) / 100.0);
    }

    /// Whether the budget allows one more retry (taking it).
    pub fn allow_retry(&self) -> bool {
        self.budget.lock().expect("budget lock").take()
    }

    /// The counters of each of `targets` (made for new ones, kept for known ones),
    /// in order: once per model version, so that picks take no lock.
    pub fn stats_for(&self, targets: &[Target]) -> Vec<Endpoint> {
        let mut map = self.endpoints.lock().expect("endpoints lock");
        if map.len() > targets.len() * 2 + 16 {
            map.retain(|addr, _| targets.iter().any(|t| t.addr == *addr));
        }
        targets
            .iter()
            .map(|t| Endpoint {
                target: t.clone(),
                stats: map.entry(t.addr).or_default().clone(),
            })
            .collect()
    }

    fn now_us(&self) -> u64 {
        self.born.elapsed().as_micros() as u64
    }

    /// Picks one of `endpoints`, skipping ejected ones: power of two choices (two
    /// random endpoints, neither scanned nor locked beyond those two) or round robin.
    pub fn pick<'e>(&self, endpoints: &'e [Endpoint]) -> Option<&'e Endpoint> {
        let n = endpoints.len();
        if n == 0 {
            return None;
        }
        let now_us = self.now_us();
        let up = |e: &Endpoint| {
            let until = e.stats.ejected_until_us.load(Ordering::Relaxed);
            until == 0 || until <= now_us
        };
        let round_robin = self.round_robin_policy;
        if round_robin || n == 1 {
            let start = self.round_robin.fetch_add(1, Ordering::Relaxed);
            return (0..n).map(|k| &endpoints[(start + k) % n]).find(|e| up(e));
        }
        let i = fastrand::usize(0..n);
        let mut j = fastrand::usize(0..n - 1);
        if j >= i {
            j += 1;
        }
        let (a, b) = (&endpoints[i], &endpoints[j]);
        match (up(a), up(b)) {
            (true, true) => {}
            (true, false) => return Some(a),
            (false, true) => return Some(b),
            // Both ejected (rare: at most the set share of endpoints is): the first
            // endpoint up after them.
            (false, false) => return (1..n).map(|k| &endpoints[(i + k) % n]).find(|e| up(e)),
        }
        // Peak-EWMA style: the cost of an endpoint that got no answer for a while
        // decays, so one slow sample does not starve it.
        let cost = |e: &Endpoint| {
            let s = &e.stats;
            let ewma = f64::from_bits(s.ewma_us.load(Ordering::Relaxed));
            let ewma = if ewma == 0.0 { EWMA_START_US } else { ewma };
            let idle = now_us.saturating_sub(s.updated_us.load(Ordering::Relaxed)) as f64 / 1e6;
            let decayed = ewma * (-idle / IDLE_TAU_SECS).exp();
            decayed * (s.outstanding.load(Ordering::Relaxed) as f64 + 1.0)
        };
        Some(if cost(b) < cost(a) { b } else { a })
    }

    /// Waits for a connection slot (circuit breaking) and marks a request outstanding
    /// on `target`.
    pub async fn start(&self, endpoint: &Endpoint) -> Result<InFlight, Limited> {
        let slot = match &self.connections {
            None => None,
            Some(sem) => match sem.clone().try_acquire_owned() {
                Ok(p) => Some(p),
                Err(_) => {
                    let max = self
                        .policy
                        .limits
                        .map_or(0, |l| l.max_pending_requests as usize);
                    if self.pending.fetch_add(1, Ordering::SeqCst) >= max {
                        self.pending.fetch_sub(1, Ordering::SeqCst);
                        return Err(Limited::PendingRequests);
                    }
                    let p = sem.clone().acquire_owned().await;
                    self.pending.fetch_sub(1, Ordering::SeqCst);
                    p.ok()
                }
            },
        };
        let endpoint = endpoint.stats.clone();
        endpoint.outstanding.fetch_add(1, Ordering::Relaxed);
        Ok(InFlight {
            endpoint,
            started: Instant::now(),
            _slot: slot,
        })
    }

    /// Records how an attempt ended; returns true when it ejected the endpoint.
    pub fn finish(&self, flight: InFlight, outcome: Outcome, endpoints: usize) -> bool {
        let e = flight.endpoint.clone();
        let sample = flight.started.elapsed().as_secs_f64() * 1e6;
        let old = f64::from_bits(e.ewma_us.load(Ordering::Relaxed));
        let now_us = self.now_us();
        let dt = now_us.saturating_sub(e.updated_us.swap(now_us, Ordering::Relaxed)) as f64 / 1e6;
        let new = if old == 0.0 {
            sample
        } else {
            // The older the last sample, the less it weighs.
            let w = (-dt / EWMA_TAU_SECS).exp();
            old * w + sample * (1.0 - w)
        };
        e.ewma_us.store(new.to_bits(), Ordering::Relaxed);
        drop(flight);
        let Some(od) = self.policy.outlier_detection else {
            return false;
        };
        let mut h = e.health.lock().expect("health lock");
        let ejected_until = e.ejected_until_us.load(Ordering::Relaxed);
        match outcome {
            Outcome::Status(s) if s >= 500 => {
                h.consecutive_5xx += 1;
                h.consecutive_connect_failures = 0;
            }
            Outcome::Status(_) => {
                h.consecutive_5xx = 0;
                h.consecutive_connect_failures = 0;
                if ejected_until != 0 && ejected_until <= now_us {
                    e.ejected_until_us.store(0, Ordering::Relaxed);
                }
                return false;
            }
            Outcome::ConnectFailure | Outcome::Timeout => {
                h.consecutive_connect_failures += 1;
            }
        }
        let tripped = (od.consecutive_5xx > 0 && h.consecutive_5xx >= od.consecutive_5xx)
            || (od.consecutive_connect_failures > 0
                && h.consecutive_connect_failures >= od.consecutive_connect_failures);
        if !tripped || ejected_until > now_us {
            return false;
        }
        drop(h);
        // Never more than the set share of endpoints ejected (at least one may be).
        let max_percent = match od.max_ejection_percent {
            0 => DEFAULT_MAX_EJECTION_PERCENT,
            p => p.min(100),
        };
        let ejected = self
            .endpoints
            .lock()
            .expect("endpoints lock")
            .values()
            .filter(|x| x.ejected_until_us.load(Ordering::Relaxed) > now_us)
            .count();
        let allowed = ((endpoints as u64 * u64::from(max_percent)) / 100).max(1) as usize;
        if ejected >= allowed {
            return false;
        }
        let mut h = e.health.lock().expect("health lock");
        h.ejections += 1;
        let base = match od.base_ejection_ms {
            0 => DEFAULT_EJECTION,
            ms => Duration::from_millis(u64::from(ms)),
        };
        // Each ejection lasts longer: base times the number of ejections so far.
        let until = now_us + (base * h.ejections.min(10)).as_micros() as u64;
        e.ejected_until_us.store(until.max(1), Ordering::Relaxed);
        h.consecutive_5xx = 0;
        h.consecutive_connect_failures = 0;
        true
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// `n` plain endpoints, 10.244.0.1:8080 on.
    pub(crate) fn targets(n: u8) -> Vec<Target> {
        (1..=n)
            .map(|i| Target {
                workload: None,
                addr: SocketAddr::from(([10, 244, 0, i], 8080)),
            })
            .collect()
    }

    fn endpoints(b: &Backend, n: u8) -> Vec<Endpoint> {
        b.stats_for(&targets(n))
    }

    #[tokio::test]
    async fn an_endpoint_failing_in_a_row_is_ejected_then_returns() {
        let policy = proto::TrafficPolicy {
            outlier_detection: Some(proto::OutlierDetection {
                consecutive_5xx: 3,
                consecutive_connect_failures: 0,
                base_ejection_ms: 50,
                max_ejection_percent: 50,
            }),
            load_balancer: proto::LoadBalancer::RoundRobin as i32,
            ..Default::default()
        };
        let b = Backend::new(Some(&policy));
        let ts = endpoints(&b, 3);
        let bad = ts[0].target.addr;
        let mut ejected = false;
        for _ in 0..30 {
            let t = b.pick(&ts).expect("an endpoint").clone();
            let f = b.start(&t).await.expect("no limits");
            let status = if t.target.addr == bad { 503 } else { 200 };
            ejected |= b.finish(f, Outcome::Status(status), ts.len());
        }
        assert!(ejected);
        for _ in 0..20 {
            assert_ne!(b.pick(&ts).expect("an endpoint").target.addr, bad);
        }
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert!((0..20).any(|_| b.pick(&ts).is_some_and(|t| t.target.addr == bad)));
        // With one of three allowed (50%), a second failing endpoint stays in.
        let second = ts[1].target.addr;
        for _ in 0..60 {
            let t = b.pick(&ts).expect("an endpoint").clone();
            let f = b.start(&t).await.expect("no limits");
            let status = if t.target.addr == bad || t.target.addr == second {
                503
            } else {
                200
            };
            b.finish(f, Outcome::Status(status), ts.len());
        }
        let now = b.now_us();
        let out = ts
            .iter()
            .filter(|e| e.stats.ejected_until_us.load(Ordering::Relaxed) > now)
            .count();
        assert_eq!(out, 1);
    }

    // On paused time: each sleep takes exactly what it says, so the latencies the
    // balancer sees are the ones the test chose, however busy the machine is.
    #[tokio::test(start_paused = true)]
    async fn p2c_shares_equal_endpoints_and_prefers_the_faster() {
        let b = Backend::new(None);
        let ts = endpoints(&b, 2);
        let run = |slow_first: bool| {
            let (b, ts) = (&b, &ts);
            async move {
                let mut first = 0;
                for _ in 0..300 {
                    let t = b.pick(ts).expect("an endpoint").clone();
                    let is_first = t.target.addr == ts[0].target.addr;
                    first += usize::from(is_first);
                    let f = b.start(&t).await.expect("no limits");
                    let ms = if slow_first && is_first { 5 } else { 1 };
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    b.finish(f, Outcome::Status(200), 2);
                }
                first
            }
        };
        let first = run(false).await;
        assert!(
            (60..=240).contains(&first),
            "equal endpoints: first got {first} of 300"
        );
        let first = run(true).await;
        assert!(first < 100, "a 5x slower endpoint still got {first} of 300");
    }

    #[tokio::test]
    async fn pending_requests_beyond_the_limit_are_refused() {
        let policy = proto::TrafficPolicy {
            limits: Some(proto::ConnectionLimits {
                max_connections: 1,
                max_pending_requests: 1,
            }),
            ..Default::default()
        };
        let b = Arc::new(Backend::new(Some(&policy)));
        let t = endpoints(&b, 1).remove(0);
        let first = b.start(&t).await.expect("a slot");
        let waiting = {
            let (b, t) = (b.clone(), t.clone());
            tokio::spawn(async move { b.start(&t).await.map(drop) })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(b.start(&t).await.err(), Some(Limited::PendingRequests));
        drop(first);
        waiting
            .await
            .expect("task")
            .expect("the waiting request gets the slot");
    }

    #[test]
    fn the_retry_budget_allows_its_share_and_the_rate_limit_its_burst() {
        let policy = proto::TrafficPolicy {
            retry_budget: Some(proto::RetryBudget {
                percent: 20,
                min_per_second: 0,
            }),
            rate_limit: Some(proto::RateLimit {
                burst: 5,
                per_second: 1,
            }),
            ..Default::default()
        };
        let b = Backend::new(Some(&policy));
        let mut retries = 0;
        for _ in 0..1000 {
            b.count_request();
            if b.allow_retry() {
                retries += 1;
            }
        }
        assert!((195..=201).contains(&retries), "{retries}");
        let admitted = (0..20).filter(|_| b.admit().is_ok()).count();
        assert_eq!(admitted, 5);
    }
}
