//! The server's shared state, built once by `run` and handed to every connection as an `Arc`:
//! the engine's parts, token keys, the mailer, the media folder and the counters the operator
//! view reads. The lifecycle is set once recovery has loaded open requests; until then the
//! server answers `/health` with 503 and every API call with 503 too.

use crate::auth::Jwt;
use crate::config::Config;
use crate::mail::Mailer;
use crate::media::Media;
use crate::metrics::{Disconnects, Histogram, LATENCY_MICROS_BOUNDS, RouteLatency};
use sanjevani_engine::Error;
use sanjevani_engine::accounts::Accounts;
use sanjevani_engine::hub::Hub;
use sanjevani_engine::index::PharmacyIndex;
use sanjevani_engine::lifecycle::Lifecycle;
use sanjevani_engine::store::SqliteStore;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

/// Counters kept by the shell (the engine keeps its own).
pub struct ShellStats {
    /// Live messages (from the hub's queues) fully written to a WebSocket.
    pub delivered: AtomicU64,
    /// Every text message fully written to a WebSocket: `connection`, replays, `sync`, live
    /// messages and answers to client messages (the load generator checks it against what it read).
    pub messages_sent: AtomicU64,
    /// WebSocket connections accepted (after authentication).
    pub ws_connects: AtomicU64,
    /// Requests refused by a rate limit.
    pub rate_limited: AtomicU64,
    /// WebSockets ended, by close code.
    pub ws_disconnects: Disconnects,
    /// HTTP handling time per route pattern.
    pub http_latency: RouteLatency,
    /// `POST /medicine/request/` from handler start to the last `new_request` queued.
    pub request_fanout: Histogram,
    /// Requests created per second over the last minute, as (second, count) buckets.
    created_buckets: [(AtomicU64, AtomicU64); 60],
}

impl Default for ShellStats {
    fn default() -> Self {
        ShellStats {
            delivered: AtomicU64::new(0),
            messages_sent: AtomicU64::new(0),
            ws_connects: AtomicU64::new(0),
            rate_limited: AtomicU64::new(0),
            ws_disconnects: Disconnects::default(),
            http_latency: RouteLatency::default(),
            request_fanout: Histogram::new(&LATENCY_MICROS_BOUNDS),
            created_buckets: std::array::from_fn(|_| (AtomicU64::new(0), AtomicU64::new(0))),
        }
    }
}

impl ShellStats {
    /// Counts one request created now.
    pub fn count_created(&self) {
        let now = unix_secs();
        let (second, count) = &self.created_buckets[(now % 60) as usize];
        if second.swap(now, Ordering::Relaxed) != now {
            count.store(0, Ordering::Relaxed);
        }
        count.fetch_add(1, Ordering::Relaxed);
    }

    /// Requests created within the last 60 seconds.
    pub fn created_last_minute(&self) -> u64 {
        let now = unix_secs();
        self.created_buckets
            .iter()
            .filter(|(second, _)| now.saturating_sub(second.load(Ordering::Relaxed)) < 60)
            .map(|(_, count)| count.load(Ordering::Relaxed))
            .sum()
    }
}

fn unix_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Everything a handler needs.
pub struct App {
    /// Settings.
    pub config: Config,
    /// The durable store.
    pub store: Arc<SqliteStore>,
    /// This node's live connections.
    pub hub: Arc<Hub>,
    /// Approved pharmacies.
    pub index: Arc<PharmacyIndex>,
    /// Users, OTPs, approval.
    pub accounts: Accounts,
    /// Token keys.
    pub jwt: Jwt,
    /// Outbound mail.
    pub mail: Mailer,
    /// Uploaded files and their signed URLs.
    pub media: Arc<Media>,
    /// Shell counters.
    pub stats: ShellStats,
    lifecycle: OnceLock<Lifecycle>,
    ready: AtomicBool,
}

impl App {
    /// Assembles the state; not ready until [`set_ready`](Self::set_ready).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        config: Config,
        store: Arc<SqliteStore>,
        hub: Arc<Hub>,
        index: Arc<PharmacyIndex>,
        accounts: Accounts,
        jwt: Jwt,
        mail: Mailer,
        media: Arc<Media>,
    ) -> App {
        App {
            config,
            store,
            hub,
            index,
            accounts,
            jwt,
            mail,
            media,
            stats: ShellStats::default(),
            lifecycle: OnceLock::new(),
            ready: AtomicBool::new(false),
        }
    }

    /// Marks recovery done: `/health` answers 200 from now on.
    pub fn set_ready(&self, lifecycle: Lifecycle) {
        let _ = self.lifecycle.set(lifecycle);
        self.ready.store(true, Ordering::Release);
    }

    /// Whether the index and open requests are loaded.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// The lifecycle, or 503 while the server is still starting.
    pub fn lifecycle(&self) -> Result<&Lifecycle, Error> {
        self.lifecycle.get().ok_or_else(|| Error::Unavailable("The server is starting; try again shortly".into()))
    }
}
