//! `sanjevani-load`: drives a running Sanjevani server over real loopback sockets and checks that
//! nothing is lost on the way. It holds pharmacy WebSockets (accounts and tokens from
//! `sanjevani generate-city`), has customers post requests at a fixed open-loop rate, accepts by a
//! seeded policy, and prints one JSON summary on stdout: HTTP latency per route, POST-to-delivery
//! latency, deliveries per second, and correctness counters — expected (by the generator's own
//! Haversine) against received deliveries, duplicates, lost, double winners, messages after
//! `request_taken`. It exits 1 when a correctness counter is not zero, 2 when the run could not be
//! set up. Every loop is bounded in count and time, and only loopback addresses are accepted.

mod http;
mod plan;
mod run;
mod stats;
mod ws;

use clap::Parser;
use hyper::Method;
use indicatif::{ProgressBar, ProgressStyle};
use plan::{RadiusChoice, Tokens};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use run::{Control, Mode, Planned, Run, SocketState, state};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};
use tokio::sync::{Semaphore, watch};

/// Most sockets one generator holds: the machine's fd limit is 20,000 per process.
const MAX_SOCKETS: usize = 19_500;
/// Longest run.
const MAX_DURATION: Duration = Duration::from_secs(600);
/// Most requests per second.
const MAX_RATE: f64 = 50_000.0;

/// `sanjevani-load`: load and correctness tests of a running Sanjevani server, loopback only.
#[derive(Debug, Parser)]
#[command(name = "sanjevani-load", version)]
struct Args {
    /// fanout | race | connections | reconnect-storm.
    #[arg(value_enum)]
    mode: Mode,
    /// The server, http://127.0.0.1:PORT [default: tokens.json's base_url, else http://127.0.0.1:8000].
    #[arg(long)]
    url: Option<String>,
    /// tokens.json written by `sanjevani generate-city`.
    #[arg(long, value_name = "FILE")]
    tokens: std::path::PathBuf,
    /// Pharmacy sockets held, cycling through the listed pharmacies (several sockets of one
    /// account are several devices) [default: one per listed pharmacy, at most 19,500].
    #[arg(long, value_name = "P")]
    sockets: Option<usize>,
    /// Requests posted per second (open loop: on schedule, whatever the answers take).
    #[arg(long, value_name = "R", default_value_t = 100.0)]
    rate: f64,
    /// How long requests are posted, or idle sockets held (humantime, or seconds).
    #[arg(long, value_name = "D", default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
    /// A fixed radius for every request, km (instead of --recipients).
    #[arg(long, value_name = "KM", conflicts_with = "recipients")]
    radius: Option<f64>,
    /// Choose each request's radius for about N recipients, from the city's density.
    #[arg(long, value_name = "N", default_value_t = 50)]
    recipients: usize,
    /// Share of requests accepted, each by one random recipient (fanout, reconnect-storm).
    #[arg(long, value_name = "F", default_value_t = 0.2)]
    accept_ratio: f64,
    /// Concurrent accepts per request (race).
    #[arg(long, value_name = "K", default_value_t = 20)]
    race: usize,
    /// Seed of every choice (locations, customers, accepters, contenders).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// The server's pid: report its RSS, CPU time and open files from /proc (needed for
    /// `connections`).
    #[arg(long, value_name = "PID")]
    server_pid: Option<u32>,
    /// Handshakes in flight at once. Keep it at or below the server's listen backlog (4096):
    /// beyond it the kernel drops SYNs and those clients retry a second later.
    #[arg(long, value_name = "N", default_value_t = 100)]
    connect_concurrency: usize,
    /// After the last POST, how long to wait for outstanding deliveries.
    #[arg(long, value_name = "D", default_value = "5s", value_parser = parse_duration)]
    drain: Duration,
    /// Distinct request locations (radii and expected recipients are computed for each up front).
    #[arg(long, value_name = "N", default_value_t = 1024)]
    spots: usize,
    /// Most HTTP calls in flight; a request due beyond it is skipped and counted.
    #[arg(long, value_name = "N", default_value_t = 10_000)]
    max_inflight: i64,
    /// When the reconnect storm hits, from the first POST [default: half the duration].
    #[arg(long, value_name = "D", value_parser = parse_duration)]
    storm_at: Option<Duration>,
    /// Sockets ask for no replay and sync (`?replay=0`).
    #[arg(long)]
    no_replay: bool,
    /// How long to wait for /health 200 before starting.
    #[arg(long, value_name = "D", default_value = "30s", value_parser = parse_duration)]
    wait: Duration,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    if let Ok(secs) = s.parse::<f64>() {
        return if secs.is_finite() && secs >= 0.0 {
            Ok(Duration::from_secs_f64(secs))
        } else {
            Err("must be a non-negative number of seconds".into())
        };
    }
    humantime::parse_duration(s).map_err(|e| e.to_string())
}

/// Why the run could not be set up.
#[derive(Debug)]
struct SetupError(String);

impl<E: std::fmt::Display> From<E> for SetupError {
    fn from(e: E) -> Self {
        SetupError(e.to_string())
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    match setup(&args) {
        Ok(prepared) => {
            let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
                Ok(runtime) => runtime,
                Err(e) => {
                    eprintln!("sanjevani-load: cannot start the runtime: {e}");
                    return ExitCode::from(2);
                }
            };
            let outcome = runtime.block_on(execute(&args, prepared));
            runtime.shutdown_timeout(Duration::from_secs(2));
            match outcome {
                Ok(ok) => {
                    if ok {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::from(1)
                    }
                }
                Err(SetupError(e)) => {
                    eprintln!("sanjevani-load: {e}");
                    ExitCode::from(2)
                }
            }
        }
        Err(SetupError(e)) => {
            eprintln!("sanjevani-load: {e}");
            ExitCode::from(2)
        }
    }
}

/// Everything decided before the runtime starts.
struct Prepared {
    run: Arc<Run>,
    total: usize,
}

/// The server's address: loopback only.
fn loopback(url: &str) -> Result<(SocketAddr, String), SetupError> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| SetupError(format!("--url {url:?}: only http://127.0.0.1:PORT (loopback) is supported")))?;
    let authority = rest.split('/').next().unwrap_or_default();
    let (host, port) = authority
        .rsplit_once(':')
        .ok_or_else(|| SetupError(format!("--url {url:?}: give the port, e.g. http://127.0.0.1:8000")))?;
    let port: u16 = port.parse().map_err(|_| SetupError(format!("--url {url:?}: bad port")))?;
    let ip: IpAddr = match host.trim_start_matches('[').trim_end_matches(']') {
        "localhost" => IpAddr::V4(Ipv4Addr::LOCALHOST),
        other => other.parse().map_err(|_| SetupError(format!("--url {url:?}: the host must be a loopback IP")))?,
    };
    if !ip.is_loopback() {
        return Err(SetupError(format!("--url {url:?}: {ip} is not a loopback address; load goes to 127.0.0.1 only")));
    }
    Ok((SocketAddr::new(ip, port), authority.to_string()))
}

fn setup(args: &Args) -> Result<Prepared, SetupError> {
    if args.duration > MAX_DURATION || args.drain > Duration::from_secs(60) {
        return Err(SetupError("--duration is at most 600 s and --drain at most 60 s".into()));
    }
    if !(args.rate > 0.0 && args.rate <= MAX_RATE) {
        return Err(SetupError(format!("--rate must be in (0, {MAX_RATE}]")));
    }
    if !(0.0..=1.0).contains(&args.accept_ratio) {
        return Err(SetupError("--accept-ratio must be between 0 and 1".into()));
    }
    if let Some(r) = args.radius
        && !(plan::MIN_RADIUS_KM..=plan::MAX_RADIUS_KM).contains(&r)
    {
        return Err(SetupError("--radius must be between 1 and 50 km".into()));
    }
    if args.mode == Mode::Connections && args.server_pid.is_none() {
        return Err(SetupError("connections needs --server-pid to read the server's RSS".into()));
    }
    let started = Instant::now();
    let text = std::fs::read(&args.tokens).map_err(|e| format!("{}: {e}", args.tokens.display()))?;
    let tokens: Tokens = serde_json::from_slice(&text).map_err(|e| format!("{}: {e}", args.tokens.display()))?;
    drop(text);
    if tokens.pharmacies.is_empty() {
        return Err(SetupError("tokens.json lists no pharmacies".into()));
    }
    let url = args.url.clone().or(tokens.base_url.clone()).unwrap_or_else(|| "http://127.0.0.1:8000".into());
    let (addr, host) = loopback(&url)?;
    let sockets = args.sockets.unwrap_or(tokens.pharmacies.len()).min(MAX_SOCKETS);
    if sockets == 0 {
        return Err(SetupError("--sockets must be at least 1".into()));
    }
    let held = sockets.min(tokens.pharmacies.len());
    let city_total = tokens.city.as_ref().map_or(tokens.pharmacies.len(), |c| c.pharmacies);
    let posting = args.mode != Mode::Connections;
    if posting && tokens.customers.is_empty() {
        return Err(SetupError("tokens.json lists no customers".into()));
    }
    let total = if posting { (args.rate * args.duration.as_secs_f64()).round() as usize } else { 0 };
    if total > 10_000_000 {
        return Err(SetupError("at most 10,000,000 requests per run".into()));
    }
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let spots = if posting {
        let choice = args.radius.map_or(RadiusChoice::Recipients(args.recipients), RadiusChoice::Fixed);
        plan::build_spots(
            &tokens.pharmacies,
            held,
            city_total,
            args.spots.clamp(1, 1 << 16),
            args.seed,
            choice,
            threads,
        )
    } else {
        Vec::new()
    };
    let mut rng = StdRng::seed_from_u64(args.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let accepts = matches!(args.mode, Mode::Fanout | Mode::ReconnectStorm);
    let plan: Vec<Planned> = (0..total)
        .map(|_| {
            let spot = rng.random_range(0..spots.len()) as u32;
            let customer = rng.random_range(0..tokens.customers.len()) as u32;
            let recipients = &spots[spot as usize].definite;
            let accepter = (accepts && !recipients.is_empty() && rng.random::<f64>() < args.accept_ratio)
                .then(|| recipients[rng.random_range(0..recipients.len())]);
            Planned { spot, customer, accepter }
        })
        .collect();
    let run_id: u32 = rand::random();
    let run = Run {
        mode: args.mode,
        tag: format!("load:{run_id:08x}:"),
        t0: Instant::now(),
        addr,
        host: host.clone(),
        pharmacies: tokens.pharmacies,
        held,
        sockets,
        customers: tokens.customers,
        spots,
        race_k: args.race.max(1),
        seed: args.seed,
        replay: !args.no_replay,
        sent_ns: (0..total).map(|_| Default::default()).collect(),
        request_id: (0..total).map(|_| Default::default()).collect(),
        state: (0..total).map(|_| Default::default()).collect(),
        winners: (0..total).map(|_| Default::default()).collect(),
        winner: (0..total).map(|_| Default::default()).collect(),
        contenders: (0..total).map(|_| Default::default()).collect(),
        accept_fired: (0..total).map(|_| Default::default()).collect(),
        plan,
        by_request_id: Default::default(),
        http: http::HttpPool::new(addr, &host),
        create_route: Default::default(),
        accept_route: Default::default(),
        delivery: Default::default(),
        replay_delivery: Default::default(),
        ws_connect: Default::default(),
        c: Default::default(),
        errors: Default::default(),
        connect_gate: Semaphore::new(args.connect_concurrency.clamp(1, 4096)),
    };
    log(&format!(
        "{:?}: {} sockets over {} pharmacies, {} requests planned over {} spots; prepared in {:.1} s",
        args.mode,
        sockets,
        held,
        total,
        run.spots.len(),
        started.elapsed().as_secs_f64()
    ));
    Ok(Prepared { run: Arc::new(run), total })
}

fn log(line: &str) {
    eprintln!("sanjevani-load: {line}");
}

/// A bar on a terminal; on anything else, a log line every 5 s.
struct Progress {
    bar: Option<ProgressBar>,
    last_log: Instant,
}

impl Progress {
    fn new(total: u64, what: &str) -> Progress {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new(total);
            let style = ProgressStyle::with_template("{prefix:>12} [{bar:40}] {pos}/{len} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> ");
            bar.set_style(style);
            bar.set_prefix(what.to_string());
            bar
        });
        Progress { bar, last_log: Instant::now() }
    }

    fn update(&mut self, position: u64, message: String) {
        match &self.bar {
            Some(bar) => {
                bar.set_position(position);
                bar.set_message(message);
            }
            None => {
                if self.last_log.elapsed() >= Duration::from_secs(5) {
                    self.last_log = Instant::now();
                    log(&format!("{position} {message}"));
                }
            }
        }
    }

    fn finish(self) {
        if let Some(bar) = self.bar {
            bar.finish_and_clear();
        }
    }
}

async fn wait_healthy(run: &Run, within: Duration) -> Result<(), SetupError> {
    let deadline = Instant::now() + within;
    loop {
        match run.http.call(Method::GET, "/health", None, None).await {
            Ok(a) if a.status == 200 => return Ok(()),
            _ if Instant::now() >= deadline => {
                return Err(SetupError(format!("{} did not answer /health with 200 in time", run.host)));
            }
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// The server's Prometheus counters (unlabelled ones), if `/metrics` is served.
async fn metrics(run: &Run) -> Option<BTreeMap<String, f64>> {
    let answer = run.http.call(Method::GET, "/metrics", None, None).await.ok()?;
    if answer.status != 200 {
        return None;
    }
    let text = String::from_utf8_lossy(&answer.body);
    Some(
        text.lines()
            .filter(|l| !l.starts_with('#') && !l.contains('{'))
            .filter_map(|l| {
                let (name, value) = l.split_once(' ')?;
                Some((name.to_string(), value.trim().parse().ok()?))
            })
            .collect(),
    )
}

/// Waits until `ready` reaches `target`, showing progress, or `within` passes.
async fn wait_ready(run: &Run, target: u64, base: u64, within: Duration, what: &str) -> bool {
    let deadline = Instant::now() + within;
    let mut progress = Progress::new(target - base, what);
    loop {
        let ready = run.c.ready.load(Relaxed);
        progress.update(
            ready.saturating_sub(base),
            format!("sockets ready ({} failed)", run.c.connect_failures.load(Relaxed)),
        );
        if ready >= target {
            progress.finish();
            return true;
        }
        if Instant::now() >= deadline {
            progress.finish();
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn execute(args: &Args, prepared: Prepared) -> Result<bool, SetupError> {
    let Prepared { run, total } = prepared;
    wait_healthy(&run, args.wait).await?;
    let server_pid = args.server_pid.map(|p| p.to_string());
    let server_before = server_pid.as_deref().and_then(stats::proc_sample);
    let me_before = stats::proc_sample("self");
    let metrics_before = metrics(&run).await;

    let (control, watcher) = watch::channel(Control::default());
    let connect_started = Instant::now();
    let spawn = |slots: std::ops::Range<usize>| {
        slots.map(|slot| tokio::spawn(run::socket_task(run.clone(), slot, watcher.clone()))).collect::<Vec<_>>()
    };
    let sockets = run.sockets as u64;
    // `connections` first opens a few sockets and samples the server again, so the per-socket
    // figure can leave out one-time costs (runtime threads' stacks, first allocations, the page
    // cache of the accounts read at admission) that the first sockets would otherwise carry.
    let warm = if args.mode == Mode::Connections { (run.sockets / 20).clamp(1, 200) } else { 0 };
    let mut tasks = spawn(0..warm);
    let mut server_warm = None;
    if warm > 0 && wait_ready(&run, warm as u64, 0, Duration::from_secs(30), "warming up").await {
        tokio::time::sleep(Duration::from_secs(1)).await;
        server_warm = server_pid.as_deref().and_then(stats::proc_sample);
    }
    tasks.extend(spawn(warm..run.sockets));
    let connect_budget = Duration::from_secs(30) + Duration::from_millis(10 * sockets);
    let all_ready = wait_ready(&run, sockets, 0, connect_budget, "connecting").await;
    let connect_s = connect_started.elapsed().as_secs_f64();
    log(&format!("{} of {sockets} sockets ready in {connect_s:.1} s", run.c.ready.load(Relaxed)));
    let mut setup_failed = (!all_ready).then(|| "not every socket connected".to_string());

    let mut extra = serde_json::Map::new();
    let mut posting_s = 0.0;
    if setup_failed.is_none() {
        if args.mode == Mode::Connections {
            let measured = hold_idle(args, &run, server_pid.as_deref(), server_before, server_warm.map(|w| (warm, w)));
            extra.insert("connections".into(), measured.await);
        } else {
            let (seconds, storm) = post_all(args, &run, &control, total).await;
            posting_s = seconds;
            if let Some(storm) = storm {
                extra.insert("storm".into(), storm);
            }
            drain(args, &run).await;
        }
    }

    control.send_modify(|c| c.stop = true);
    let mut states = Vec::with_capacity(tasks.len());
    let stop_deadline = Instant::now() + Duration::from_secs(10);
    for task in tasks {
        let left = stop_deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left.max(Duration::from_millis(10)), task).await {
            Ok(Ok(st)) => states.push(st),
            _ => states.push(SocketState::lost()),
        }
    }
    if setup_failed.is_none() && states.iter().any(|s| s.gave_up) {
        setup_failed = Some("some sockets gave up (see errors)".into());
    }
    let metrics_after = metrics(&run).await;
    let server_after = server_pid.as_deref().and_then(stats::proc_sample);
    let me_after = stats::proc_sample("self");

    let (summary, mut ok) = summarize(args, &run, &states, total, posting_s, connect_s, extra);
    let mut summary = summary;
    if let (Some(before), Some(after)) = (server_before, server_after) {
        summary["server"] = json!({
            "pid": args.server_pid,
            "cpu_s": round3(after.cpu_s - before.cpu_s),
            "rss_kib_before": before.rss_kib,
            "rss_kib_after": after.rss_kib,
            "fds_after": after.fds,
        });
    }
    if let (Some(before), Some(after)) = (me_before, me_after) {
        summary["generator"] = json!({"cpu_s": round3(after.cpu_s - before.cpu_s), "rss_kib": after.rss_kib});
    }
    if let (Some(before), Some(after)) = (metrics_before, metrics_after) {
        let delta: BTreeMap<&String, f64> =
            after.iter().filter_map(|(k, v)| Some((k, v - before.get(k)?))).filter(|(_, d)| *d != 0.0).collect();
        summary["server_metrics_delta"] = json!(delta);
        // Every text message the server wrote was read (modes whose sockets are never dropped;
        // the drain leaves nothing in flight). A server without the counter is not checked.
        let sent_key = "sanjevani_ws_messages_sent_total".to_string();
        if matches!(args.mode, Mode::Fanout | Mode::Race) && after.contains_key(&sent_key) {
            let sent = delta.get(&sent_key).copied().unwrap_or(0.0) as u64;
            let read = summary["delivery"]["frames"].as_u64().unwrap_or(0);
            summary["delivery"]["server_messages_sent"] = json!(sent);
            summary["correctness"]["frames_unaccounted"] = json!(sent.abs_diff(read));
            ok &= sent == read;
        }
    }
    if let Some(why) = &setup_failed {
        summary["setup_error"] = json!(why);
    }
    println!("{}", serde_json::to_string_pretty(&summary).unwrap_or_default());
    log(&digest(&summary));
    let ok = ok && setup_failed.is_none();
    log(if ok { "passed: every correctness counter is zero" } else { "FAILED: see correctness and errors" });
    Ok(ok)
}

/// One line of the figures that matter, for logs.
fn digest(s: &Value) -> String {
    let failing: Vec<String> = s["correctness"]
        .as_object()
        .map(|m| m.iter().filter(|(_, v)| v.as_u64() != Some(0)).map(|(k, v)| format!("{k}={v}")).collect())
        .unwrap_or_default();
    let delivery = &s["delivery"]["post_to_delivery"];
    let create = &s["http"]["POST /medicine/request/"];
    let mut line = format!(
        "{}: {} sockets; {} requests created of {} planned; {} live deliveries ({}/s); POST->delivery p50 {} ms p99 {} ms \
         p999 {} ms; POST /medicine/request/ p99 {} ms",
        s["mode"].as_str().unwrap_or("?"),
        s["config"]["sockets"],
        s["requests"]["created"],
        s["requests"]["planned"],
        s["delivery"]["live_deliveries"],
        s["delivery"]["deliveries_per_s"],
        delivery["p50_ms"],
        delivery["p99_ms"],
        delivery["p999_ms"],
        create["p99_ms"],
    );
    if let Some(c) = s.get("connections") {
        line = format!(
            "connections: {} sockets, {} KiB of server RSS each ({} KiB each after the first {})",
            c["sockets"], c["kib_per_socket"], c["kib_per_socket_after_warm_up"], c["warm_sockets"]
        );
    }
    if failing.is_empty() { line } else { format!("{line}; FAILING: {}", failing.join(", ")) }
}

fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

/// `connections`: hold the sockets idle and measure the server's RSS per socket.
async fn hold_idle(
    args: &Args,
    run: &Run,
    pid: Option<&str>,
    before: Option<stats::ProcSample>,
    warm: Option<(usize, stats::ProcSample)>,
) -> Value {
    // Let allocations settle (tasks parked, buffers at rest) before sampling.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let settled = pid.and_then(stats::proc_sample);
    let started = Instant::now();
    let mut progress = Progress::new(args.duration.as_secs(), "holding");
    while started.elapsed() < args.duration {
        let left = args.duration.saturating_sub(started.elapsed());
        tokio::time::sleep(left.min(Duration::from_millis(500))).await;
        progress.update(started.elapsed().as_secs(), format!("s, {} sockets", run.sockets));
    }
    progress.finish();
    let held = pid.and_then(stats::proc_sample);
    let n = run.sockets as f64;
    let marginal = match (warm, settled) {
        (Some((w, at_warm)), Some(s)) if run.sockets > w => {
            Some(round3((s.rss_kib as f64 - at_warm.rss_kib as f64) / (run.sockets - w) as f64))
        }
        _ => None,
    };
    match (before, settled, held) {
        (Some(b), Some(s), Some(h)) => json!({
            "warm_sockets": warm.map(|(w, _)| w),
            "rss_kib_warm": warm.map(|(_, s)| s.rss_kib),
            "kib_per_socket_after_warm_up": marginal,
            "sockets": run.sockets,
            "rss_kib_before": b.rss_kib,
            "rss_kib_connected": s.rss_kib,
            "rss_kib_after_hold": h.rss_kib,
            "kib_per_socket": round3((s.rss_kib as f64 - b.rss_kib as f64) / n),
            "kib_per_socket_after_hold": round3((h.rss_kib as f64 - b.rss_kib as f64) / n),
            "server_fds": h.fds,
            "held_s": round3(started.elapsed().as_secs_f64()),
        }),
        _ => json!({"sockets": run.sockets, "error": "could not read /proc of --server-pid"}),
    }
}

/// Posts every planned request on schedule (open loop); fires the storm. Returns the posting
/// time and the storm's figures.
async fn post_all(args: &Args, run: &Arc<Run>, control: &watch::Sender<Control>, total: usize) -> (f64, Option<Value>) {
    let started = tokio::time::Instant::now();
    let storm_at = (args.mode == Mode::ReconnectStorm).then(|| args.storm_at.unwrap_or(args.duration / 2));
    let mut storm_task = None;
    let mut progress = Progress::new(total as u64, "posting");
    let mut last_update = Instant::now();
    for seq in 0..total {
        let due = started + Duration::from_secs_f64(seq as f64 / args.rate);
        tokio::time::sleep_until(due).await;
        if let Some(at) = storm_at
            && storm_task.is_none()
            && started.elapsed() >= at
        {
            storm_task = Some(tokio::spawn(storm(run.clone(), control.clone())));
        }
        if run.c.inflight.load(Relaxed) >= args.max_inflight {
            run.c.skipped.fetch_add(1, Relaxed);
            run.state[seq].store(state::SKIPPED, Relaxed);
            continue;
        }
        run.c.inflight.fetch_add(1, Relaxed);
        let run2 = run.clone();
        tokio::spawn(async move {
            run::post_request(run2.clone(), seq as u32).await;
            run2.c.inflight.fetch_sub(1, Relaxed);
        });
        if last_update.elapsed() >= Duration::from_millis(200) {
            last_update = Instant::now();
            progress.update(
                seq as u64,
                format!(
                    "requests, {} deliveries, {} in flight",
                    run.c.live_deliveries.load(Relaxed),
                    run.c.inflight.load(Relaxed)
                ),
            );
        }
    }
    // A storm due after the last request still happens (the run is its subject).
    if storm_at.is_some() && storm_task.is_none() {
        storm_task = Some(tokio::spawn(storm(run.clone(), control.clone())));
    }
    let posting = started.elapsed().as_secs_f64();
    progress.finish();
    let storm = match storm_task {
        Some(task) => task.await.ok(),
        None => None,
    };
    (posting, storm)
}

/// Drops every socket at once and waits until all have reconnected and synced.
async fn storm(run: Arc<Run>, control: watch::Sender<Control>) -> Value {
    let ready_before = run.c.ready.load(Relaxed);
    let started = Instant::now();
    log(&format!("reconnect storm: dropping all {} sockets", run.sockets));
    control.send_modify(|c| c.storm += 1);
    let target = ready_before + run.sockets as u64;
    let within = Duration::from_secs(30) + Duration::from_millis(10 * run.sockets as u64);
    let all = wait_ready(&run, target, ready_before, within, "reconnecting").await;
    let seconds = started.elapsed().as_secs_f64();
    log(&format!(
        "reconnect storm: {} of {} back in {seconds:.2} s",
        run.c.ready.load(Relaxed) - ready_before,
        run.sockets
    ));
    json!({"sockets": run.sockets, "all_reconnected": all, "reconnect_s": round3(seconds)})
}

/// Waits for calls in flight, then for every due delivery and `request_taken`, within --drain.
async fn drain(args: &Args, run: &Run) {
    let deadline = Instant::now() + args.drain + Duration::from_secs(15);
    while run.c.inflight.load(Relaxed) > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let deadline = Instant::now() + args.drain;
    let c = &run.c;
    while Instant::now() < deadline {
        let deliveries = c.definite_received.load(Relaxed) >= c.definite_expected.load(Relaxed);
        let taken = c.taken_received.load(Relaxed) >= c.taken_expected.load(Relaxed);
        if deliveries && taken && c.inflight.load(Relaxed) <= 0 {
            // A moment more for duplicates or strays that would follow.
            tokio::time::sleep(Duration::from_millis(200)).await;
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Checks what every socket saw against what the run did, and renders the summary.
fn summarize(
    args: &Args,
    run: &Run,
    states: &[SocketState],
    total: usize,
    posting_s: f64,
    connect_s: f64,
    extra: serde_json::Map<String, Value>,
) -> (Value, bool) {
    let storm = run.mode == Mode::ReconnectStorm;
    let mut created = 0u64;
    let mut failed = 0u64;
    let (mut expected, mut either, mut received_definite, mut lost) = (0u64, 0u64, 0u64, 0u64);
    let (mut not_held, mut taken_lost, mut taken_to_winner, mut double_winners, mut no_winner) = (0, 0, 0, 0, 0);
    let mut accepted = 0u64;
    for seq in 0..total {
        match run.state[seq].load(Relaxed) {
            state::CREATED => created += 1,
            state::FAILED | state::SENT => failed += 1,
            _ => continue,
        }
        let id = run.request_id[seq].load(Relaxed);
        if run.state[seq].load(Relaxed) != state::CREATED || id == 0 {
            continue;
        }
        let winners = run.winners[seq].load(Relaxed);
        if winners > 1 {
            double_winners += 1;
        }
        if run.mode == Mode::Race && run.contenders[seq].load(Relaxed) > 0 && winners == 0 {
            no_winner += 1;
        }
        let winner = run.winner[seq].load(Relaxed);
        if winner > 0 {
            accepted += 1;
        }
        let spot = run.spot_of(seq as u32);
        for &p in &spot.either {
            either += run.sockets_of(p).count() as u64;
        }
        for &p in &spot.definite {
            for slot in run.sockets_of(p) {
                expected += 1;
                let st = &states[slot];
                if st.received.contains_key(&id) {
                    received_definite += 1;
                } else if !(storm && winner > 0) {
                    // In a storm, a request taken while a socket was away is rightly never seen.
                    lost += 1;
                }
                if winner == 0 {
                    if !st.held.contains(&id) {
                        not_held += 1;
                    }
                } else if winner == p + 1 {
                    if st.taken.contains(&id) {
                        taken_to_winner += 1;
                    }
                } else if !storm && !st.taken.contains(&id) {
                    taken_lost += 1;
                }
            }
        }
    }
    let mut stale_held = 0u64;
    for st in states {
        for id in &st.held {
            if let Some(r) = st.received.get(id) {
                let winner = run.winner[r.seq as usize].load(Relaxed);
                if winner > 0 && winner != st.pharmacy + 1 {
                    stale_held += 1;
                }
            }
        }
    }
    let sum = |f: fn(&SocketState) -> u64| states.iter().map(f).sum::<u64>();
    let c = &run.c;
    let received_live = c.live_deliveries.load(Relaxed);
    let window_s = {
        let first = c.first_send_ns.load(Relaxed);
        let last = c.last_delivery_ns.load(Relaxed);
        if first > 0 && last > first { (last - first) as f64 / 1e9 } else { 0.0 }
    };
    let http_errors = run.create_route.errors.load(Relaxed) + run.accept_route.errors.load(Relaxed);
    let correctness = json!({
        "lost": lost,
        "duplicates": sum(|s| s.duplicates),
        "unexpected": sum(|s| s.unexpected),
        "double_winners": double_winners,
        "race_no_winner": no_winner,
        "after_taken": sum(|s| s.after_taken),
        "taken_lost": taken_lost,
        "taken_to_winner": taken_to_winner,
        "not_held": not_held,
        "stale_held": stale_held,
        "sync_mismatch": sum(|s| s.sync_mismatch),
        "http_errors": http_errors,
        "socket_failures": c.connect_failures.load(Relaxed) + c.unexpected_closes.load(Relaxed),
        "bad_frames": sum(|s| s.bad_frames),
        "generator_overload": c.skipped.load(Relaxed),
    });
    let ok = correctness.as_object().is_some_and(|m| m.values().all(|v| v.as_u64() == Some(0)));
    let mut summary = json!({
        "mode": run.mode,
        "ok": ok,
        "config": {
            "url": format!("http://{}", run.host),
            "sockets": run.sockets,
            "pharmacies_held": run.held,
            "pharmacies_listed": run.pharmacies.len(),
            "customers": run.customers.len(),
            "rate": args.rate,
            "duration_s": args.duration.as_secs_f64(),
            "radius_km": args.radius,
            "recipients": if args.radius.is_none() { Some(args.recipients) } else { None },
            "accept_ratio": if matches!(run.mode, Mode::Fanout | Mode::ReconnectStorm) { Some(args.accept_ratio) } else { None },
            "race": if run.mode == Mode::Race { Some(run.race_k) } else { None },
            "seed": args.seed,
            "replay": run.replay,
        },
        "connect": {"seconds": round3(connect_s), "handshake": run.ws_connect.summary()},
        "requests": {
            "planned": total,
            "created": created,
            "failed": failed,
            "skipped": c.skipped.load(Relaxed),
            "accepted": accepted,
            "posting_s": round3(posting_s),
            "achieved_rate": if posting_s > 0.0 { round3((created + failed) as f64 / posting_s) } else { 0.0 },
            "mean_definite_recipients_held": if created > 0 { round3(expected as f64 / created as f64) } else { 0.0 },
        },
        "http": {
            "POST /medicine/request/": route(&run.create_route),
            "POST /medicine/response/": route(&run.accept_route),
        },
        "delivery": {
            "post_to_delivery": run.delivery.summary(),
            "post_to_replayed_delivery": run.replay_delivery.summary(),
            "live_deliveries": received_live,
            "deliveries_per_s": if window_s > 0.0 { (received_live as f64 / window_s).round() } else { 0.0 },
            "frames": c.frames.load(Relaxed),
        },
        "expected": {
            "definite": expected,
            "received_definite": received_definite,
            "either": either,
            "taken_expected": c.taken_expected.load(Relaxed),
            "taken_received": c.taken_received.load(Relaxed),
        },
        "correctness": correctness,
        "info": {
            "notified_mismatch": c.notified_mismatch.load(Relaxed),
            "foreign_requests": sum(|s| s.foreign),
            "race_losers": c.race_losers.load(Relaxed),
            "accepts_sent": c.accepts.load(Relaxed),
            "reconnects": states.iter().map(|s| u64::from(s.connects.saturating_sub(1))).sum::<u64>(),
        },
        "errors": *run.errors.lock(),
    });
    for (k, v) in extra {
        summary[k] = v;
    }
    (summary, ok)
}

fn route(r: &run::Route) -> Value {
    let mut v = r.latency.summary();
    v["errors"] = json!(r.errors.load(Relaxed));
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_urls_are_accepted() {
        assert_eq!(loopback("http://127.0.0.1:8000").unwrap().0, "127.0.0.1:8000".parse().unwrap());
        assert_eq!(loopback("http://localhost:9/").unwrap().0, "127.0.0.1:9".parse().unwrap());
        assert_eq!(loopback("http://[::1]:80").unwrap().0, "[::1]:80".parse().unwrap());
        assert!(loopback("http://127.3.4.5:1").is_ok());
        assert!(loopback("http://10.0.0.1:8000").is_err());
        assert!(loopback("http://example.com:80").is_err());
        assert!(loopback("https://127.0.0.1:443").is_err());
        assert!(loopback("http://127.0.0.1").is_err(), "a port is required");
    }

    #[test]
    fn durations_are_humantime_or_seconds() {
        assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("1.5").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert!(parse_duration("-1").is_err());
    }
}
