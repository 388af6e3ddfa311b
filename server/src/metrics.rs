//! `GET /metrics`: the server's counts in the Prometheus text exposition format (0.0.4), written
//! here by hand because the format is a few lines of text and every number already lives in an
//! atomic somewhere (the engine's `LifecycleStats` and `HubStats`, the store's writer counters,
//! the mailer, the shell's `ShellStats`). A scrape reads those atomics and formats them; nothing
//! on a hot path takes a lock or allocates for the metrics' sake. Only counts are exported: no
//! email, name, id or place ever becomes a label.
//!
//! Histograms are fixed-bucket and lock-free ([`Histogram`]): one `AtomicU64` per bucket plus a
//! sum, so an observation is two `fetch_add`s. Buckets are counted non-cumulatively and summed at
//! scrape time, and `_count` is the total of the buckets, so a scrape that races an observation
//! still shows `le="+Inf"` equal to `_count`. Times are kept in microseconds and exported in
//! seconds, as Prometheus expects.
//!
//! HTTP latency is labelled by the route's pattern (`/medicine/request/{id}/`), never by the raw
//! path, so the number of series is fixed whatever clients request; paths no route serves are
//! `other`. Like `/health`, the endpoint answers before recovery has finished, with what is known
//! then: the lifecycle's counters appear once it has loaded.

use crate::app::App;
use crate::http::{Body, error_response};
use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{self, HeaderValue};
use hyper::{Response, StatusCode};
use sanjevani_engine::Error;
use sanjevani_engine::store::Buckets;
use sha2::{Digest, Sha256};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

/// The Content-Type of the text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Upper bounds (inclusive) of the latency histograms, in microseconds: 100 µs to 10 s.
pub const LATENCY_MICROS_BOUNDS: [u64; 16] = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000, 2_500_000,
    5_000_000, 10_000_000,
];

/// The route patterns HTTP latency is labelled with, written as API.md writes the paths (with or
/// without the trailing slash; both forms match). `{id}` stands for one path segment, `{key...}`
/// for one or more; a path none of them matches is `other`. A new route belongs here too.
pub const ROUTES: [&str; 24] = [
    "/",
    "/health",
    "/metrics",
    "/openapi.json",
    "/send-otp",
    "/verify-otp",
    "/login",
    "/token/refresh",
    "/customer/register/",
    "/pharmacy/register/",
    "/customer/profile/",
    "/pharmacy/profile/",
    "/pharmacy/requests/",
    "/medicine/request/",
    "/medicine/request/{id}/",
    "/medicine/request/{id}/cancel/",
    "/medicine/response/",
    "/admin/pharmacies/",
    "/admin/pharmacies/{id}/approve/",
    "/admin/pharmacies/{id}/suspend/",
    "/admin/stats",
    "/media/{key...}",
    "/ws/customer/",
    "/ws/pharmacy/",
];

/// The label of paths no route serves.
pub const OTHER_ROUTE: &str = "other";

/// WebSocket close codes counted on their own; any other code a client sends is `other`.
pub const CLOSE_CODES: [u16; 14] = [1000, 1001, 1002, 1003, 1005, 1006, 1007, 1008, 1009, 1011, 4001, 4003, 4004, 4008];

/// A lock-free histogram with fixed buckets: `AtomicU64` per bucket plus the sum.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [u64],
    /// Observations per bucket (not cumulative); one more than `bounds` for values above all.
    buckets: Box<[AtomicU64]>,
    sum: AtomicU64,
}

impl Histogram {
    /// An empty histogram with these inclusive upper bounds (ascending).
    pub fn new(bounds: &'static [u64]) -> Histogram {
        Histogram { bounds, buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(), sum: AtomicU64::new(0) }
    }

    /// Counts one value.
    pub fn observe(&self, value: u64) {
        let bucket = self.bounds.partition_point(|&bound| bound < value);
        self.buckets[bucket].fetch_add(1, Relaxed);
        self.sum.fetch_add(value, Relaxed);
    }

    /// Counts a duration, in microseconds.
    pub fn observe_duration(&self, elapsed: Duration) {
        self.observe(u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX));
    }

    /// Counts the time since `started`, in microseconds.
    pub fn observe_since(&self, started: Instant) {
        self.observe_duration(started.elapsed());
    }

    /// The counts so far, in the shape the store's histograms come in.
    pub fn snapshot(&self) -> Buckets {
        Buckets {
            bounds: self.bounds,
            counts: self.buckets.iter().map(|b| b.load(Relaxed)).collect(),
            sum: self.sum.load(Relaxed),
        }
    }
}

/// HTTP latency, one histogram per entry of [`ROUTES`] plus one for `other`.
#[derive(Debug)]
pub struct RouteLatency {
    histograms: Box<[Histogram]>,
}

impl Default for RouteLatency {
    fn default() -> Self {
        RouteLatency { histograms: (0..=ROUTES.len()).map(|_| Histogram::new(&LATENCY_MICROS_BOUNDS)).collect() }
    }
}

impl RouteLatency {
    /// Counts one request to `path` (the URI's path, without the query) that took `elapsed`.
    pub fn observe(&self, path: &str, elapsed: Duration) {
        self.histograms[route_index(path)].observe_duration(elapsed);
    }

    /// Each route's label with its histogram, `other` last.
    pub fn routes(&self) -> impl Iterator<Item = (&'static str, &Histogram)> {
        ROUTES.iter().copied().chain([OTHER_ROUTE]).zip(self.histograms.iter())
    }
}

/// The index in [`ROUTES`] of the pattern `path` matches, or `ROUTES.len()` for `other`.
fn route_index(path: &str) -> usize {
    ROUTES.iter().position(|pattern| route_matches(pattern, path)).unwrap_or(ROUTES.len())
}

/// The route label of `path`: its pattern in [`ROUTES`], or `other`.
pub fn route_label(path: &str) -> &'static str {
    ROUTES.get(route_index(path)).copied().unwrap_or(OTHER_ROUTE)
}

/// Whether `path` matches `pattern`, segment by segment, either trailing-slash form (as the
/// router accepts both).
fn route_matches(pattern: &str, path: &str) -> bool {
    let mut want = pattern.split('/').filter(|s| !s.is_empty());
    let mut have = path.split('/').filter(|s| !s.is_empty());
    loop {
        match (want.next(), have.next()) {
            (None, None) => return true,
            (Some(p), Some(_)) if p.ends_with("...}") => return want.next().is_none(),
            (Some(p), Some(s)) if p.starts_with('{') || p == s => continue,
            _ => return false,
        }
    }
}

/// Who ended a WebSocket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClosedBy {
    /// The server sent the close frame (idle, slow consumer, suspension, shutdown, a refused
    /// token, a protocol error).
    Server,
    /// The client sent the close frame, or vanished without one (counted as 1006).
    Client,
}

/// WebSocket disconnects by close code and by who closed.
#[derive(Debug)]
pub struct Disconnects {
    /// `[server, client]`, each one counter per [`CLOSE_CODES`] entry plus `other`.
    counts: [[AtomicU64; CLOSE_CODES.len() + 1]; 2],
}

impl Default for Disconnects {
    fn default() -> Self {
        Disconnects { counts: std::array::from_fn(|_| std::array::from_fn(|_| AtomicU64::new(0))) }
    }
}

impl Disconnects {
    /// Counts one socket that ended with `code`.
    pub fn count(&self, code: u16, by: ClosedBy) {
        let slot = CLOSE_CODES.iter().position(|&c| c == code).unwrap_or(CLOSE_CODES.len());
        self.counts[by as usize][slot].fetch_add(1, Relaxed);
    }

    /// Disconnects so far with `code` (`None`: the codes not in [`CLOSE_CODES`]) by `by`.
    pub fn get(&self, code: Option<u16>, by: ClosedBy) -> u64 {
        let slot = code.and_then(|code| CLOSE_CODES.iter().position(|&c| c == code)).unwrap_or(CLOSE_CODES.len());
        self.counts[by as usize][slot].load(Relaxed)
    }
}

/// Handles `GET /metrics`: checks `--metrics-token` if one is set, then renders every family.
pub fn scrape(app: &App, authorization: Option<&str>) -> Response<Body> {
    if let Some(expected) = app.config.metrics_token.as_deref()
        && !authorization.is_some_and(|given| same_token(given, expected))
    {
        let mut response = error_response(&Error::Unauthorized("A valid metrics token is required".into()));
        response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        return response;
    }
    let mut response = Response::new(Full::new(Bytes::from(render(app))));
    *response.status_mut() = StatusCode::OK;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// Compares tokens in constant time: both are hashed first, so the time taken says nothing about
/// how long the common prefix is, nor (unlike a byte-wise compare) about the expected length.
fn same_token(given: &str, expected: &str) -> bool {
    let (a, b) = (Sha256::digest(given.as_bytes()), Sha256::digest(expected.as_bytes()));
    let difference = a.iter().zip(b.iter()).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(difference) == 0
}

/// The exposition text. Families the server cannot know yet (the lifecycle's, before recovery)
/// are left out rather than shown as zero.
pub fn render(app: &App) -> String {
    let mut out = Exposition(String::with_capacity(16 * 1024));
    let shell = &app.stats;

    out.gauge("sanjevani_ready", "1 once the store is open and the index and open requests are loaded.");
    out.sample("sanjevani_ready", "", u64::from(app.is_ready()));

    if let Ok(lifecycle) = app.lifecycle() {
        let engine = lifecycle.stats();
        let requests: [(&str, &str, u64); 7] = [
            ("created", "Medicine requests created.", engine.created.load(Relaxed)),
            (
                "notified",
                "Pharmacies notified at creation (the recipients of each new request, summed).",
                engine.notified.load(Relaxed),
            ),
            (
                "delivered",
                "Messages fully written to a WebSocket (new_request, request_taken, responses, ...).",
                shell.delivered.load(Relaxed),
            ),
            ("accepted", "Requests accepted (first ACCEPTED response wins).", engine.accepted.load(Relaxed)),
            ("rejected", "REJECTED responses recorded.", engine.rejected.load(Relaxed)),
            ("cancelled", "Requests cancelled by their customer.", engine.cancelled.load(Relaxed)),
            ("expired", "Requests that expired unanswered.", engine.expired.load(Relaxed)),
        ];
        for (event, help, value) in requests {
            let name = format!("sanjevani_requests_{event}_total");
            out.counter(&name, help);
            out.sample(&name, "", value);
        }
        out.gauge("sanjevani_requests_pending", "Requests PENDING now.");
        out.sample("sanjevani_requests_pending", "", engine.pending.load(Relaxed).max(0) as u64);
    }

    let (customers, pharmacies) = app.hub.socket_counts();
    out.gauge("sanjevani_ws_sockets", "Live WebSockets by role.");
    out.sample("sanjevani_ws_sockets", "role=\"customer\"", customers as u64);
    out.sample("sanjevani_ws_sockets", "role=\"pharmacy\"", pharmacies as u64);

    out.counter("sanjevani_ws_connects_total", "WebSockets accepted (their token was valid for the endpoint).");
    out.sample("sanjevani_ws_connects_total", "", shell.ws_connects.load(Relaxed));

    out.counter(
        "sanjevani_ws_disconnects_total",
        "WebSockets ended, by close code and by who closed (refused tokens included; 1006: no close frame).",
    );
    for by in [ClosedBy::Server, ClosedBy::Client] {
        let by_label = if by == ClosedBy::Server { "server" } else { "client" };
        for code in CLOSE_CODES.iter().map(|&c| Some(c)).chain([None]) {
            let code_label = code.map_or_else(|| "other".to_string(), |c| c.to_string());
            let labels = format!("code=\"{code_label}\",by=\"{by_label}\"");
            out.sample("sanjevani_ws_disconnects_total", &labels, shell.ws_disconnects.get(code, by));
        }
    }

    out.counter(
        "sanjevani_ws_messages_sent_total",
        "Text messages fully written to WebSockets (connection, replays, sync, live messages, answers).",
    );
    out.sample("sanjevani_ws_messages_sent_total", "", shell.messages_sent.load(Relaxed));

    let hub = app.hub.stats();
    out.counter("sanjevani_ws_enqueued_total", "Messages queued to a WebSocket's outbound queue.");
    out.sample("sanjevani_ws_enqueued_total", "", hub.enqueued.load(Relaxed));
    out.counter("sanjevani_ws_slow_consumer_cuts_total", "WebSockets closed with 4008 for overflowing their queue.");
    out.sample("sanjevani_ws_slow_consumer_cuts_total", "", hub.slow_cuts.load(Relaxed));

    out.counter("sanjevani_rate_limited_total", "HTTP requests refused by a rate limit (429).");
    out.sample("sanjevani_rate_limited_total", "", shell.rate_limited.load(Relaxed));

    let mail = app.mail.stats();
    out.counter("sanjevani_mail_sent_total", "Mails the SMTP server accepted.");
    out.sample("sanjevani_mail_sent_total", "", mail.sent);
    out.counter("sanjevani_mail_failed_total", "Mails dropped undelivered (after the last retry, or refused).");
    out.sample("sanjevani_mail_failed_total", "", mail.failed);
    out.counter("sanjevani_mail_retried_total", "Mail retries scheduled after a failed send.");
    out.sample("sanjevani_mail_retried_total", "", mail.retried);
    out.gauge("sanjevani_mail_queued", "Mails in the queue now, in flight or waiting for a retry.");
    out.sample("sanjevani_mail_queued", "", mail.queued);

    let name = "sanjevani_http_request_duration_seconds";
    out.histogram(name, "HTTP request handling time by route pattern, until the response head is ready.");
    for (route, histogram) in shell.http_latency.routes() {
        out.buckets(name, &format!("route=\"{route}\""), &histogram.snapshot(), MICROS);
    }

    let name = "sanjevani_request_fanout_seconds";
    out.histogram(
        name,
        "POST /medicine/request/ from the start of its handler until Lifecycle::create returned: the request \
         durable, new_request queued to every recipient (at commit, before the fsync); new requests only.",
    );
    out.buckets(name, "", &shell.request_fanout.snapshot(), MICROS);

    let store = app.store.commit_histograms();
    let name = "sanjevani_store_batch_size";
    out.histogram(name, "Write commands per committed store batch (group commit).");
    out.buckets(name, "", &store.batch_size, 1.0);
    let name = "sanjevani_store_commit_seconds";
    out.histogram(name, "Time in COMMIT per store batch (writing the WAL; the syncer thread fsyncs it after).");
    out.buckets(name, "", &store.commit_micros, MICROS);
    out.counter(
        "sanjevani_store_syncs_total",
        "fdatasync calls of the WAL by the syncer thread, each making every commit before it durable.",
    );
    out.sample("sanjevani_store_syncs_total", "", app.store.stats().syncs);
    out.counter("sanjevani_store_failed_batches_total", "Store batches whose transaction failed.");
    out.sample("sanjevani_store_failed_batches_total", "", app.store.stats().failed_batches);

    out.0
}

/// Exported times are in seconds; histograms keep microseconds (divided, not multiplied by 1e-6,
/// so that bounds print exactly: `0.0001`, not `0.00010000000000000002`).
const MICROS: f64 = 1e6;

/// The text being written. Label values are all fixed strings of this module, so none needs
/// escaping.
struct Exposition(String);

impl Exposition {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    fn counter(&mut self, name: &str, help: &str) {
        self.family(name, "counter", help);
    }

    fn gauge(&mut self, name: &str, help: &str) {
        self.family(name, "gauge", help);
    }

    fn histogram(&mut self, name: &str, help: &str) {
        self.family(name, "histogram", help);
    }

    fn sample(&mut self, name: &str, labels: &str, value: u64) {
        if labels.is_empty() {
            let _ = writeln!(self.0, "{name} {value}");
        } else {
            let _ = writeln!(self.0, "{name}{{{labels}}} {value}");
        }
    }

    /// One histogram's `_bucket` (cumulative, ending with `+Inf`), `_sum` and `_count` lines;
    /// bounds and sum are divided by `unit` (1e6 turns microseconds into seconds).
    fn buckets(&mut self, name: &str, labels: &str, buckets: &Buckets, unit: f64) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        for (i, count) in buckets.counts.iter().enumerate() {
            cumulative += count;
            match buckets.bounds.get(i) {
                Some(&bound) => {
                    let le = bound as f64 / unit;
                    let _ = writeln!(self.0, "{name}_bucket{{{labels}{sep}le=\"{le}\"}} {cumulative}");
                }
                None => {
                    let _ = writeln!(self.0, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {cumulative}");
                }
            }
        }
        let sum = buckets.sum as f64 / unit;
        let braces = if labels.is_empty() { String::new() } else { format!("{{{labels}}}") };
        let _ = writeln!(self.0, "{name}_sum{braces} {sum}\n{name}_count{braces} {cumulative}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_are_labelled_by_pattern() {
        assert_eq!(route_label("/medicine/request/42/"), "/medicine/request/{id}/");
        assert_eq!(route_label("/medicine/request/42"), "/medicine/request/{id}/");
        assert_eq!(route_label("/medicine/request/"), "/medicine/request/");
        assert_eq!(route_label("/medicine/request/7/cancel/"), "/medicine/request/{id}/cancel/");
        assert_eq!(route_label("/admin/pharmacies/3/approve/"), "/admin/pharmacies/{id}/approve/");
        assert_eq!(route_label("/admin/stats/"), "/admin/stats");
        assert_eq!(route_label("/media/prescriptions/2025/a.jpg"), "/media/{key...}");
        assert_eq!(route_label("/media/"), OTHER_ROUTE);
        assert_eq!(route_label("/health"), "/health");
        assert_eq!(route_label("/metrics"), "/metrics");
        assert_eq!(route_label("/"), "/");
        assert_eq!(route_label("/ws/pharmacy/"), "/ws/pharmacy/");
        assert_eq!(route_label("/no/such/path"), OTHER_ROUTE);
        assert_eq!(route_label("/medicine/request/1/2/3/"), OTHER_ROUTE);
        assert_eq!(route_label("/login/extra"), OTHER_ROUTE);
    }

    #[test]
    fn histogram_counts_by_inclusive_upper_bound() {
        static BOUNDS: [u64; 3] = [1, 10, 100];
        let h = Histogram::new(&BOUNDS);
        for v in [0, 1, 2, 10, 11, 100, 101, 5000] {
            h.observe(v);
        }
        let snap = h.snapshot();
        assert_eq!(snap.counts, vec![2, 2, 2, 2]);
        assert_eq!(snap.sum, 5225);
    }

    #[test]
    fn buckets_are_cumulative_and_end_with_inf_equal_to_count() {
        static BOUNDS: [u64; 2] = [1_000, 1_000_000];
        let h = Histogram::new(&BOUNDS);
        h.observe(500);
        h.observe(2_000);
        h.observe(3_000_000);
        let mut out = Exposition(String::new());
        out.buckets("t_seconds", "route=\"/x\"", &h.snapshot(), MICROS);
        assert_eq!(
            out.0,
            "t_seconds_bucket{route=\"/x\",le=\"0.001\"} 1\n\
             t_seconds_bucket{route=\"/x\",le=\"1\"} 2\n\
             t_seconds_bucket{route=\"/x\",le=\"+Inf\"} 3\n\
             t_seconds_sum{route=\"/x\"} 3.0025\n\
             t_seconds_count{route=\"/x\"} 3\n"
        );
    }

    #[test]
    fn disconnects_count_unknown_codes_as_other() {
        let d = Disconnects::default();
        d.count(1000, ClosedBy::Client);
        d.count(4008, ClosedBy::Server);
        d.count(3999, ClosedBy::Client);
        assert_eq!(d.get(Some(1000), ClosedBy::Client), 1);
        assert_eq!(d.get(Some(1000), ClosedBy::Server), 0);
        assert_eq!(d.get(Some(4008), ClosedBy::Server), 1);
        assert_eq!(d.get(None, ClosedBy::Client), 1);
    }

    #[test]
    fn tokens_compare_equal_only_when_identical() {
        assert!(same_token("s3cret", "s3cret"));
        assert!(!same_token("s3cret", "s3cre"));
        assert!(!same_token("", "s3cret"));
        assert!(!same_token("S3cret", "s3cret"));
    }
}
