//! Latency histograms (HDR: 3 significant digits from 1 µs to 100 s, so p999 is exact to 0.1 %
//! however long the tail) and reading a process's RSS, CPU time and open files from `/proc`.

use hdrhistogram::Histogram;
use parking_lot::Mutex;
use serde_json::{Value, json};

/// Largest latency recorded, µs (longer ones are clamped to it).
const MAX_MICROS: u64 = 100_000_000;

/// A shared latency histogram in microseconds.
pub struct Latency {
    histogram: Mutex<Histogram<u64>>,
}

impl Default for Latency {
    fn default() -> Self {
        Latency { histogram: Mutex::new(new_histogram()) }
    }
}

fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_MICROS, 3).unwrap_or_else(|_| unreachable!("constant, valid bounds"))
}

impl Latency {
    /// Records one value.
    pub fn record(&self, micros: u64) {
        self.histogram.lock().saturating_record(micros.clamp(1, MAX_MICROS));
    }

    /// Records many values under one lock.
    pub fn record_all(&self, micros: &[u64]) {
        if micros.is_empty() {
            return;
        }
        let mut h = self.histogram.lock();
        for &m in micros {
            h.saturating_record(m.clamp(1, MAX_MICROS));
        }
    }

    /// `{count, p50_ms, p90_ms, p99_ms, p999_ms, max_ms, mean_ms}`.
    pub fn summary(&self) -> Value {
        let h = self.histogram.lock();
        if h.is_empty() {
            return json!({"count": 0});
        }
        let ms = |micros: u64| (micros as f64 / 10.0).round() / 100.0;
        json!({
            "count": h.len(),
            "p50_ms": ms(h.value_at_quantile(0.5)),
            "p90_ms": ms(h.value_at_quantile(0.9)),
            "p99_ms": ms(h.value_at_quantile(0.99)),
            "p999_ms": ms(h.value_at_quantile(0.999)),
            "max_ms": ms(h.max()),
            "mean_ms": (h.mean() / 10.0).round() / 100.0,
        })
    }
}

/// A process as `/proc` shows it.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ProcSample {
    /// Resident set size, KiB.
    pub rss_kib: u64,
    /// User + system CPU time, seconds.
    pub cpu_s: f64,
    /// Open file descriptors.
    pub fds: u64,
}

/// Reads `/proc/<pid>` (`self` for this process).
pub fn proc_sample(pid: &str) -> Option<ProcSample> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces, inside parentheses).
    let rest = stat.rsplit_once(')').map(|(_, r)| r)?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line; `rest` starts at field 3.
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // SAFETY: sysconf only reads a configuration value.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let cpu_s = (ticks(11) + ticks(12)) as f64 / hz;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count() as u64).unwrap_or(0);
    Some(ProcSample { rss_kib, cpu_s, fds })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_in_milliseconds() {
        let l = Latency::default();
        let values: Vec<u64> = (1..=1000).collect();
        l.record_all(&values);
        let s = l.summary();
        assert_eq!(s["count"], 1000);
        assert_eq!(s["p50_ms"], 0.5);
        assert_eq!(s["p99_ms"], 0.99);
        assert_eq!(s["max_ms"], 1.0);
        l.record(1_000_000_000);
        assert!(l.summary()["max_ms"].as_f64().unwrap() >= 100_000.0, "clamped, not lost");
    }

    #[test]
    fn reads_this_process() {
        let me = proc_sample("self").unwrap();
        assert!(me.rss_kib > 0 && me.fds > 0);
    }
}
