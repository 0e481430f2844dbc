//! Access logs: one JSON line per connection (node-proxy) or request (waypoint), written
//! to stdout from a thread of its own.
//!
//! Two bounds keep a log from costing more than it is worth: a rate cap (a token bucket of
//! `rate` lines a second, with a second's worth of burst), so a connection storm cannot
//! flood the log, and a bounded queue, so a slow stdout never holds traffic back or grows
//! memory. Lines over either bound are dropped and counted in
//! `weft_access_log_dropped_total{reason}`.

use std::io::{self, Write};
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

/// Lines queued for the writer thread at most.
const QUEUE: usize = 16_384;
/// How long lines may wait to be written: one wake-up and one write per interval under
/// load instead of one per line.
const INTERVAL: Duration = Duration::from_millis(20);
/// The most bytes written at once.
const BATCH: usize = 4 * 1024 * 1024;

/// Why a line was dropped.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct DropLabels {
    /// `rate_limit` (over the configured lines per second) or `backlog` (stdout was not
    /// keeping up).
    pub reason: &'static str,
}

/// A token bucket: `rate` tokens a second, holding at most `rate`.
#[derive(Debug)]
struct Bucket {
    rate: f64,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn take(&mut self, now: Instant) -> bool {
        let refill = now.saturating_duration_since(self.at).as_secs_f64() * self.rate;
        self.tokens = (self.tokens + refill).min(self.rate);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Hands lines to the writer thread. Cloning shares the thread, the cap and the counters.
#[derive(Clone)]
pub struct LogWriter {
    tx: Option<SyncSender<Vec<u8>>>,
    bucket: Option<Arc<Mutex<Bucket>>>,
    /// Lines dropped, by reason.
    pub dropped: Family<DropLabels, Counter>,
}

impl LogWriter {
    /// Starts a writer of at most `rate` lines a second (0: no cap) to stdout.
    pub fn start(rate: u32) -> io::Result<Self> {
        Self::start_to(rate, io::stdout)
    }

    /// Starts a writer to what `out` returns (called for each batch).
    pub fn start_to<W: Write>(rate: u32, out: impl Fn() -> W + Send + 'static) -> io::Result<Self> {
        let (tx, rx) = sync_channel::<Vec<u8>>(QUEUE);
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || {
                let mut batch = Vec::with_capacity(64 * 1024);
                while let Ok(line) = rx.recv() {
                    batch.extend_from_slice(&line);
                    std::thread::sleep(INTERVAL);
                    while batch.len() < BATCH {
                        match rx.try_recv() {
                            Ok(l) => batch.extend_from_slice(&l),
                            Err(_) => break,
                        }
                    }
                    let mut w = out();
                    let _ = w.write_all(&batch).and_then(|()| w.flush());
                    batch.clear();
                }
            })?;
        let bucket = (rate > 0).then(|| {
            Arc::new(Mutex::new(Bucket {
                rate: f64::from(rate),
                tokens: f64::from(rate),
                at: Instant::now(),
            }))
        });
        Ok(LogWriter {
            tx: Some(tx),
            bucket,
            dropped: Family::default(),
        })
    }

    /// A writer that logs nothing (the log is switched off).
    pub fn off() -> Self {
        LogWriter {
            tx: None,
            bucket: None,
            dropped: Family::default(),
        }
    }

    /// Registers `weft_access_log_dropped_total`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "weft_access_log_dropped",
            "Access-log lines dropped, by reason (rate_limit, backlog)",
            self.dropped.clone(),
        );
    }

    /// Whether a line may be written now; `false` when the log is off or over its rate
    /// (counted). Call before building the line, so a dropped line costs nothing.
    pub fn admit(&self) -> bool {
        if self.tx.is_none() {
            return false;
        }
        let Some(bucket) = &self.bucket else {
            return true;
        };
        let admitted = bucket
            .lock()
            .map(|mut b| b.take(Instant::now()))
            .unwrap_or(false);
        if !admitted {
            self.drop_line("rate_limit");
        }
        admitted
    }

    /// Queues one line (a newline is added); dropped and counted when the writer is behind.
    pub fn send(&self, mut line: Vec<u8>) {
        let Some(tx) = &self.tx else {
            return;
        };
        line.push(b'\n');
        if tx.try_send(line).is_err() {
            self.drop_line("backlog");
        }
    }

    fn drop_line(&self, reason: &'static str) {
        self.dropped.get_or_create(&DropLabels { reason }).inc();
    }
}

/// `time` as RFC 3339 UTC.
pub fn rfc3339(time: SystemTime) -> String {
    time::OffsetDateTime::from(time)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bucket_admits_its_rate_then_refills() {
        let start = Instant::now();
        let mut b = Bucket {
            rate: 10.0,
            tokens: 10.0,
            at: start,
        };
        let burst = (0..50).filter(|_| b.take(start)).count();
        assert_eq!(burst, 10, "a second's worth of burst");
        let later = start + Duration::from_millis(500);
        let refilled = (0..50).filter(|_| b.take(later)).count();
        assert_eq!(refilled, 5, "half a second refills half the rate");
        let much_later = later + Duration::from_secs(60);
        let capped = (0..50).filter(|_| b.take(much_later)).count();
        assert_eq!(capped, 10, "tokens never exceed the rate");
    }

    #[test]
    fn lines_over_the_rate_are_dropped_and_counted() {
        let out = Arc::new(Mutex::new(Vec::new()));
        let sink = out.clone();
        let log = LogWriter::start_to(3, move || Sink(sink.clone())).unwrap();
        for i in 0..10 {
            if log.admit() {
                log.send(format!("{{\"n\":{i}}}").into_bytes());
            }
        }
        let dropped = log
            .dropped
            .get_or_create(&DropLabels {
                reason: "rate_limit",
            })
            .get();
        assert_eq!(dropped, 7);
        let deadline = Instant::now() + Duration::from_secs(5);
        while out.lock().unwrap().len() < 3 * 8 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let text = String::from_utf8(out.lock().unwrap().clone()).unwrap();
        assert_eq!(text, "{\"n\":0}\n{\"n\":1}\n{\"n\":2}\n");
    }

    #[test]
    fn an_off_log_admits_nothing() {
        let log = LogWriter::off();
        assert!(!log.admit());
        log.send(b"x".to_vec());
    }

    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
}
