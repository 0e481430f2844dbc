//! What the benchmarks in `src/bin/` share: their settings from the environment, a
//! process's CPU and memory from `/proc`, and how a round's figures become a verdict.
//!
//! On a shared machine the absolute figures drift by 2x within an hour, so the
//! benchmarks measure their paths in alternating rounds and judge a target on each
//! round's ratio to the baseline round run next to it ([`Ratio`]): a slow minute then
//! moves both sides of one ratio, where it would move only one of two separate medians.

use anyhow::Context;

/// `name` from the environment as a number, or `default` when unset or not a number.
pub fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The `p`-th quantile (0..=1) of sorted values, nearest rank; NaN when there are none.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// The median (nearest rank) of the values; NaN when there are none.
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    percentile(&v, 0.5)
}

/// CPU seconds (user + system) a process has used, all its threads.
pub fn cpu_seconds(pid: i32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The fields after the command name (which may hold spaces and parentheses).
    let rest = stat.rsplit_once(')').context("stat format")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat, 11 and 12 after the name.
    let utime: f64 = fields.get(11).context("utime")?.parse()?;
    let stime: f64 = fields.get(12).context("stime")?.parse()?;
    let ticks = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    Ok((utime + stime) / ticks)
}

/// A `/proc/<pid>/status` figure in KiB, e.g. `VmRSS` or `VmHWM`.
pub fn status_kib(pid: i32, key: &str) -> anyhow::Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let value = status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next())
        .with_context(|| format!("no {key} in /proc/{pid}/status"))?;
    Ok(value.parse()?)
}

/// `"(met)"` or `"(NOT met)"`.
pub fn met(met: bool) -> &'static str {
    if met {
        "(met)"
    } else {
        "(NOT met)"
    }
}

/// Each round's ratio of a path to its baseline, summarized.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Ratio {
    /// The median of the rounds' ratios: what a target is judged on.
    pub median: f64,
    /// The lowest round's ratio.
    pub lo: f64,
    /// The highest round's ratio.
    pub hi: f64,
}

impl Ratio {
    /// `a[i] / b[i]` over the rounds: `b[i]` is the baseline round run next to `a[i]`.
    pub fn paired(a: &[f64], b: &[f64]) -> Self {
        let ratios: Vec<f64> = a.iter().zip(b).map(|(a, b)| a / b).collect();
        Self {
            lo: ratios.iter().copied().fold(f64::INFINITY, f64::min),
            hi: ratios.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            median: median(ratios),
        }
    }

    /// `"1.21–1.48"`: the rounds' lowest and highest ratio.
    pub fn range(&self) -> String {
        format!("{:.2}–{:.2}", self.lo, self.hi)
    }

    /// Whether the median is at most `target`, and, when the rounds disagree by more
    /// than a third, that the machine was too noisy for the verdict to mean much.
    pub fn verdict(&self, target: f64) -> String {
        self.judged(self.median <= target)
    }

    /// As [`Ratio::verdict`], for a target the ratio must reach: at least `target`.
    pub fn at_least(&self, target: f64) -> String {
        self.judged(self.median >= target)
    }

    fn judged(&self, ok: bool) -> String {
        let verdict = met(ok);
        if self.hi > self.lo * 1.33 {
            format!("{verdict}, but the rounds disagree: re-run when the machine is quiet")
        } else {
            verdict.to_owned()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ratio_pairs_each_round_with_its_own_baseline() {
        // The machine slows by 2x in the middle round: both sides move, the ratio does not.
        let r = Ratio::paired(&[150.0, 300.0, 160.0], &[100.0, 200.0, 100.0]);
        assert_eq!(r.median, 1.5);
        assert_eq!((r.lo, r.hi), (1.5, 1.6));
        assert_eq!(r.range(), "1.50–1.60");
        assert_eq!(r.verdict(1.5), "(met)");
        assert_eq!(r.verdict(1.4), "(NOT met)");
        assert_eq!(r.at_least(1.5), "(met)");
        assert_eq!(r.at_least(1.6), "(NOT met)");
    }

    #[test]
    fn rounds_that_disagree_say_so() {
        let r = Ratio::paired(&[80.0, 100.0, 150.0], &[100.0, 100.0, 100.0]);
        assert_eq!(r.median, 1.0);
        assert!(r.verdict(1.0).starts_with("(met), but the rounds disagree"));
    }

    #[test]
    fn percentiles_by_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), 51.0);
        assert_eq!(percentile(&v, 0.99), 99.0);
        assert_eq!(percentile(&v, 1.0), 100.0);
        assert!(percentile(&[], 0.5).is_nan());
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
    }
}
