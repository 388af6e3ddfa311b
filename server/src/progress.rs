//! Feedback on long work (start-up recovery, `serve --demo`): on a terminal a spinner or bar
//! drawn with `indicatif` on stderr, elsewhere (a service manager's journal, a pipe, CI) one log
//! line when the work starts and one when it ends, with its count and duration. Either way the
//! end is logged, so a log file always says how long start-up took.
//!
//! Log lines and bars share stderr. A bar redraws by moving the cursor over the lines it drew, so
//! a log line written in between would be overwritten or leave a stale bar behind; [`log_writer`]
//! is the `tracing` writer that prints each log line with the bars lifted (`MultiProgress::suspend`),
//! which keeps both intact.

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::{IsTerminal, Write};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The process's bars, all drawn on stderr.
fn bars() -> &'static MultiProgress {
    static BARS: OnceLock<MultiProgress> = OnceLock::new();
    BARS.get_or_init(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr()))
}

/// One long task being reported.
#[derive(Debug)]
pub struct Progress {
    what: &'static str,
    started: Instant,
    /// `Some` when stderr is a terminal.
    bar: Option<ProgressBar>,
    finished: bool,
}

impl Progress {
    /// Starts reporting `what` (`"loading pharmacies"`): a bar of `total` steps if the total is
    /// known, else a spinner; off a terminal, a log line.
    pub fn start(what: &'static str, total: Option<u64>) -> Progress {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = match total {
                Some(total) => ProgressBar::new(total).with_style(
                    ProgressStyle::with_template("{spinner} {msg} [{bar:30}] {pos}/{len} {elapsed}")
                        .unwrap_or_else(|_| ProgressStyle::default_bar())
                        .progress_chars("=> "),
                ),
                None => ProgressBar::new_spinner().with_style(
                    ProgressStyle::with_template("{spinner} {msg} {elapsed}")
                        .unwrap_or_else(|_| ProgressStyle::default_spinner()),
                ),
            };
            let bar = bars().add(bar.with_message(what));
            bar.enable_steady_tick(Duration::from_millis(100));
            bar
        });
        if bar.is_none() {
            tracing::info!(task = what, total, "{what}…");
        }
        Progress { what, started: Instant::now(), bar, finished: false }
    }

    /// Advances the bar by `steps`.
    pub fn inc(&self, steps: u64) {
        if let Some(bar) = &self.bar {
            bar.inc(steps);
        }
    }

    /// Ends the task: clears the bar and logs `what: count noun in N ms`.
    pub fn finish(mut self, count: u64, noun: &str) {
        self.finished = true;
        self.clear();
        let millis = self.started.elapsed().as_millis() as u64;
        tracing::info!(task = self.what, count, millis, "{}: {count} {noun} in {millis} ms", self.what);
    }

    fn clear(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
            bars().remove(bar);
        }
    }
}

impl Drop for Progress {
    /// A task that ends without [`finish`](Progress::finish) (an error path) says so.
    fn drop(&mut self) {
        if !self.finished {
            self.clear();
            let millis = self.started.elapsed().as_millis() as u64;
            tracing::warn!(task = self.what, millis, "{} did not finish", self.what);
        }
    }
}

/// A `tracing_subscriber` writer for stderr that keeps log lines from tearing progress bars:
/// `fmt().with_writer(progress::log_writer)`.
pub fn log_writer() -> LogLine {
    LogLine(Vec::with_capacity(256))
}

/// One log event, buffered and written to stderr as a whole when dropped.
#[derive(Debug)]
pub struct LogLine(Vec<u8>);

impl Write for LogLine {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for LogLine {
    fn drop(&mut self) {
        let line = std::mem::take(&mut self.0);
        bars().suspend(|| {
            let _ = std::io::stderr().write_all(&line);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_runs_to_its_end_on_or_off_a_terminal() {
        let progress = Progress::start("testing", Some(3));
        progress.inc(3);
        progress.finish(3, "steps");
        let mut line = log_writer();
        line.write_all(b"").unwrap();
    }
}
