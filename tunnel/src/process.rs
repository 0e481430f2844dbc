//! The standard `process_*` series (CPU, memory, file descriptors, threads, start time)
//! of the running process, read from `/proc/self` at each scrape.
//!
//! Names and meanings are those of Prometheus's client libraries
//! (`process_cpu_seconds_total`, `process_resident_memory_bytes`, ...), so dashboards
//! written for any exporter read Weft's components the same way. Every Weft component
//! registers [`ProcessCollector`] into its registry.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

/// Clock ticks per second of `/proc/<pid>/stat` times: the kernel reports them in
/// `USER_HZ`, fixed at 100 for userspace on the architectures Weft runs on (x86-64 and
/// arm64), whatever the kernel's own tick rate.
const USER_HZ: f64 = 100.0;

/// Reports the process's own figures on every scrape; holds no state.
#[derive(Debug, Default, Clone, Copy)]
pub struct ProcessCollector;

/// One reading of `/proc/self`; fields a kernel did not provide stay `None`.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Reading {
    /// User and system CPU time, in seconds.
    pub cpu_seconds: Option<f64>,
    /// Resident set size, in bytes.
    pub resident_bytes: Option<f64>,
    /// Virtual memory size, in bytes.
    pub virtual_bytes: Option<f64>,
    /// Threads.
    pub threads: Option<f64>,
    /// Open file descriptors.
    pub open_fds: Option<f64>,
    /// Start time, seconds since the Unix epoch.
    pub start_time_seconds: Option<f64>,
}

impl Reading {
    /// Reads `/proc/self`; what cannot be read is left out (never an error on a scrape).
    pub fn now() -> Self {
        let read = |path: &str| std::fs::read_to_string(path).unwrap_or_default();
        let mut r = Reading::from_texts(
            &read("/proc/self/stat"),
            &read("/proc/self/status"),
            &read("/proc/stat"),
        );
        r.open_fds = std::fs::read_dir("/proc/self/fd")
            .ok()
            .map(|d| d.count() as f64);
        r
    }

    /// Parses the texts of `/proc/self/stat`, `/proc/self/status` and `/proc/stat`.
    pub fn from_texts(stat: &str, status: &str, system_stat: &str) -> Self {
        // Fields after the command name, which is in parentheses and may contain spaces
        // or parentheses itself: split after the last `)`. `state` is field 3 of
        // proc_pid_stat(5), so field n is at index n - 3 here.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.split_whitespace().collect())
            .unwrap_or_default();
        let field = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<f64>().ok());
        let cpu_seconds = match (field(14), field(15)) {
            (Some(utime), Some(stime)) => Some((utime + stime) / USER_HZ),
            _ => None,
        };
        let boot_time = system_stat
            .lines()
            .find_map(|l| l.strip_prefix("btime "))
            .and_then(|v| v.trim().parse::<f64>().ok());
        let start_time_seconds = match (boot_time, field(22)) {
            (Some(boot), Some(ticks)) => Some(boot + ticks / USER_HZ),
            _ => None,
        };
        // `VmRSS:     1234 kB`
        let status_value = |key: &str| {
            status.lines().find_map(|l| {
                let rest = l.strip_prefix(key)?.strip_prefix(':')?;
                let mut parts = rest.split_whitespace();
                let n = parts.next()?.parse::<f64>().ok()?;
                Some(match parts.next() {
                    Some("kB") => n * 1024.0,
                    _ => n,
                })
            })
        };
        Reading {
            cpu_seconds,
            resident_bytes: status_value("VmRSS"),
            virtual_bytes: status_value("VmSize"),
            threads: status_value("Threads"),
            open_fds: None,
            start_time_seconds,
        }
    }
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let r = Reading::now();
        if let Some(v) = r.cpu_seconds {
            let c = ConstCounter::new(v);
            c.encode(encoder.encode_descriptor(
                "process_cpu_seconds",
                "Total user and system CPU time spent in seconds",
                None,
                c.metric_type(),
            )?)?;
        }
        for (name, help, value) in [
            (
                "process_resident_memory_bytes",
                "Resident memory size in bytes",
                r.resident_bytes,
            ),
            (
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes",
                r.virtual_bytes,
            ),
            ("process_threads", "Number of OS threads", r.threads),
            (
                "process_open_fds",
                "Number of open file descriptors",
                r.open_fds,
            ),
            (
                "process_start_time_seconds",
                "Start time of the process since the Unix epoch in seconds",
                r.start_time_seconds,
            ),
        ] {
            if let Some(v) = value {
                let g = ConstGauge::new(v);
                g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use prometheus_client::encoding::text::encode;
    use prometheus_client::registry::Registry;

    use super::*;

    #[test]
    fn parses_proc_texts() {
        let stat = "4242 (weft (x) y) S 1 4242 4242 0 -1 4194560 500 0 0 0 250 50 0 0 20 0 9 0 1000 123456789 2000 18446744073709551615";
        let status = "Name:\tweftctl\nVmSize:\t  123456 kB\nVmRSS:\t    2048 kB\nThreads:\t9\n";
        let system = "cpu  1 2 3\nbtime 1700000000\nprocesses 5\n";
        let r = Reading::from_texts(stat, status, system);
        assert_eq!(r.cpu_seconds, Some(3.0));
        assert_eq!(r.start_time_seconds, Some(1_700_000_010.0));
        assert_eq!(r.resident_bytes, Some(2048.0 * 1024.0));
        assert_eq!(r.virtual_bytes, Some(123_456.0 * 1024.0));
        assert_eq!(r.threads, Some(9.0));
        assert_eq!(Reading::from_texts("", "", ""), Reading::default());
    }

    #[test]
    fn exports_the_standard_names() {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(ProcessCollector));
        let mut text = String::new();
        encode(&mut text, &registry).expect("encoding into a String does not fail");
        for name in [
            "process_cpu_seconds_total ",
            "process_resident_memory_bytes ",
            "process_virtual_memory_bytes ",
            "process_threads ",
            "process_open_fds ",
            "process_start_time_seconds ",
        ] {
            assert!(
                text.lines().any(|l| l.starts_with(name)),
                "missing {name}in:\n{text}"
            );
        }
    }
}
