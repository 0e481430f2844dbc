//! Access logs: one JSON line per connection (node-proxy) or request (waypoint), written
//! to stdout from a thread of its own.
//!
//! Two bounds keep a log from costing more than it is worth: a rate cap (a token bucket of
//! `rate` lines a second, with a second's worth of burst), so a connection storm cannot
//! flood the log, and a queue bounded in lines and in bytes (a waypoint's line carries the
//! request's path, up to its 64 KiB limit), so a slow stdout never holds traffic back or
//! grows memory. Lines over either bound are dropped and counted in
//! `weft_access_log_dropped_total{reason}`.

use std::io::{self, Write};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

/// Lines queued for the writer thread at most.
const QUEUE: usize = 16_384;
/// Bytes of lines queued for the writer thread at most.
const QUEUE_BYTES: usize = 16 * 1024 * 1024;
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
    /// Bytes queued and not yet taken by the writer thread.
    queued: Arc<AtomicUsize>,
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
        let queued = Arc::new(AtomicUsize::new(0));
        let taken = queued.clone();
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || {
                let mut batch = Vec::with_capacity(64 * 1024);
                let take = |batch: &mut Vec<u8>, line: Vec<u8>| {
                    taken.fetch_sub(line.len(), Ordering::AcqRel);
                    batch.extend_from_slice(&line);
                };
                while let Ok(line) = rx.recv() {
                    take(&mut batch, line);
                    std::thread::sleep(INTERVAL);
                    while batch.len() < BATCH {
                        match rx.try_recv() {
                            Ok(l) => take(&mut batch, l),
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
            queued,
            bucket,
            dropped: Family::default(),
        })
    }

    /// A writer that logs nothing (the log is switched off).
    pub fn off() -> Self {
        LogWriter {
            tx: None,
            queued: Arc::default(),
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

    /// Queues one line (a newline is added); dropped and counted when the writer is behind
    /// by [`QUEUE`] lines or [`QUEUE_BYTES`] bytes.
    pub fn send(&self, mut line: Vec<u8>) {
        let Some(tx) = &self.tx else {
            return;
        };
        line.push(b'\n');
        let len = line.len();
        if self.queued.fetch_add(len, Ordering::AcqRel) + len > QUEUE_BYTES
            || tx.try_send(line).is_err()
        {
            self.queued.fetch_sub(len, Ordering::AcqRel);
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
    fn a_stalled_stdout_holds_at_most_the_queue_in_bytes() {
        // stdout blocked: the writer thread takes one line and waits on it.
        let gate = Arc::new(Mutex::new(()));
        let held = gate.lock().unwrap();
        let log = LogWriter::start_to(0, {
            let gate = gate.clone();
            move || Stalled(gate.clone())
        })
        .unwrap();
        // Lines of 1 MiB, far fewer than QUEUE: the byte bound drops them.
        let line = vec![b'x'; 1024 * 1024 - 1];
        for _ in 0..40 {
            log.send(line.clone());
        }
        let dropped = log
            .dropped
            .get_or_create(&DropLabels { reason: "backlog" })
            .get();
        // 16 fit the queue; the writer takes at most a 4 MiB batch out of it and blocks.
        assert!((20..=24).contains(&dropped), "dropped {dropped}");
        assert!(log.queued.load(Ordering::Acquire) <= QUEUE_BYTES);
        drop(held);
    }

    #[test]
    fn an_off_log_admits_nothing() {
        let log = LogWriter::off();
        assert!(!log.admit());
        log.send(b"x".to_vec());
    }

    struct Sink(Arc<Mutex<Vec<u8>>>);

    /// A stdout that blocks until the gate opens.
    struct Stalled(Arc<Mutex<()>>);

    impl Write for Stalled {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            drop(self.0.lock());
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

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
