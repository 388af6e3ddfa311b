//! The embedded store: one SQLite file in WAL mode with `synchronous=FULL`, written by a single
//! thread that owns the write connection and read through a small pool of read-only connections.
//!
//! Why one writer thread: SQLite serialises writers anyway, and an fsync per write caps a disk at
//! a few thousand writes a second. So callers do not write; they queue a command (a closure over
//! the connection) with a one-shot reply on a bounded channel, and the writer drains whatever is
//! queued into ONE transaction, runs each command inside its own SAVEPOINT (a failing command,
//! such as a taken email, rolls back only itself), commits once, and only then answers every
//! caller of the batch (group commit). Nothing is acknowledged before its commit; if the commit
//! fails, every caller of the batch gets `Error::Unavailable`. Because every write runs on that
//! one thread, a check-then-write inside a command (first accept wins, cancel, expire, OTP tries,
//! idempotency keys) is atomic without any further locking.
//!
//! Reads never queue behind writes: WAL lets the read-only connections read the last committed
//! state while the writer works, on tokio's blocking pool. A read issued after a write was
//! acknowledged sees it, because the acknowledgement follows the commit.
//!
//! The schema is versioned by `PRAGMA user_version`; [`MIGRATIONS`] are applied in order, in one
//! transaction, when the store opens.

use super::{Durable, SyncMark};
use super::{
    Store, email_taken, idempotency_binds, normalize_email, otp_expired, pharmacy_not_found, request_not_found,
    same_code_hash,
};
use crate::error::{Error, Result};
use crate::geo::LatLng;
use crate::model::*;
use async_trait::async_trait;
use parking_lot::Mutex;
use rusqlite::types::Type;
use rusqlite::{Connection, OpenFlags, OptionalExtension, Row, params};
use rustc_hash::FxHashMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tokio::sync::{Semaphore, mpsc, oneshot, watch};

/// The schema, one entry per version: entry `i` takes a database from `user_version` `i` to
/// `i + 1`. Append new versions; never edit one that has shipped.
///
/// Requests and recipients carry no foreign key to `users` or `pharmacies` on purpose: they are
/// records of what the lifecycle decided at that moment (names and places "as they were when
/// notified"), the lifecycle has already checked the ids in memory, and a create writes 1 + N rows
/// on the hottest write path. Responses, by contrast, must come from a recipient, and the schema
/// says so.
///
/// The idempotency index is not unique: a key binds for 24 hours only, after which the same key
/// creates a new request. The single writer makes the look-up-then-insert atomic.
const MIGRATIONS: &[&str] = &[r#"
CREATE TABLE users (
    id             INTEGER PRIMARY KEY,
    email          TEXT    NOT NULL UNIQUE CHECK (email = lower(email)),
    password_hash  TEXT    NOT NULL,
    name           TEXT    NOT NULL,
    phone_number   TEXT    NOT NULL,
    role           TEXT    NOT NULL CHECK (role IN ('CUSTOMER', 'PHARMACY', 'ADMIN')),
    email_verified INTEGER NOT NULL CHECK (email_verified IN (0, 1)),
    created_at     INTEGER NOT NULL
);

CREATE TABLE pharmacies (
    id         INTEGER PRIMARY KEY,
    user_id    INTEGER NOT NULL UNIQUE REFERENCES users (id),
    name       TEXT    NOT NULL,
    lat        REAL    NOT NULL,
    lng        REAL    NOT NULL,
    approved   INTEGER NOT NULL CHECK (approved IN (0, 1)),
    created_at INTEGER NOT NULL
);

CREATE TABLE verified_emails (
    email       TEXT    PRIMARY KEY,
    verified_at INTEGER NOT NULL
) WITHOUT ROWID;

-- One live code per email: a new code replaces the row.
CREATE TABLE otps (
    email      TEXT    PRIMARY KEY,
    code_hash  TEXT    NOT NULL,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    attempts   INTEGER NOT NULL
) WITHOUT ROWID;

CREATE TABLE requests (
    id              INTEGER PRIMARY KEY,
    customer_id     INTEGER NOT NULL,
    patient_name    TEXT    NOT NULL,
    patient_phone   TEXT    NOT NULL,
    lat             REAL    NOT NULL,
    lng             REAL    NOT NULL,
    radius_km       REAL    NOT NULL,
    quantity        INTEGER NOT NULL,
    medicine_name   TEXT,
    note            TEXT,
    image           TEXT,
    status          TEXT    NOT NULL
                    CHECK (status IN ('PENDING', 'ACCEPTED', 'CANCELLED', 'EXPIRED')),
    pharmacy_id     INTEGER,
    pharmacy_name   TEXT,
    idempotency_key TEXT,
    created_at      INTEGER NOT NULL,
    expires_at      INTEGER NOT NULL,
    closed_at       INTEGER
);
-- A customer's list, newest first.
CREATE INDEX requests_by_customer ON requests (customer_id, created_at);
-- Start-up: the open requests...
CREATE INDEX requests_by_status ON requests (status);
-- ...and the recently closed ones.
CREATE INDEX requests_by_closed_at ON requests (closed_at) WHERE closed_at IS NOT NULL;
CREATE INDEX requests_by_idempotency_key
    ON requests (customer_id, idempotency_key, created_at)
    WHERE idempotency_key IS NOT NULL;

-- Who was notified, as they were then; `position` keeps the nearest-first order.
CREATE TABLE recipients (
    request_id    INTEGER NOT NULL REFERENCES requests (id),
    pharmacy_id   INTEGER NOT NULL,
    position      INTEGER NOT NULL,
    pharmacy_name TEXT    NOT NULL,
    lat           REAL    NOT NULL,
    lng           REAL    NOT NULL,
    distance_km   REAL    NOT NULL,
    PRIMARY KEY (request_id, pharmacy_id)
) WITHOUT ROWID;

CREATE TABLE responses (
    id            INTEGER PRIMARY KEY,
    request_id    INTEGER NOT NULL,
    pharmacy_id   INTEGER NOT NULL,
    pharmacy_name TEXT    NOT NULL,
    response_type TEXT    NOT NULL CHECK (response_type IN ('ACCEPTED', 'REJECTED')),
    text_message  TEXT,
    audio         TEXT,
    responded_at  INTEGER NOT NULL,
    UNIQUE (request_id, pharmacy_id),
    FOREIGN KEY (request_id, pharmacy_id) REFERENCES recipients (request_id, pharmacy_id)
);
"#];

/// How the store is tuned. `Default` is what the server uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreOptions {
    /// Most write commands committed in one transaction (at least 1). `1` with `background_sync`
    /// off makes every write its own transaction and fsync: the baseline the group-commit
    /// benchmark compares against.
    pub max_batch: usize,
    /// Write commands that may wait in the queue (at least 1); a full queue makes writers wait
    /// (back-pressure) instead of growing memory.
    pub queue_capacity: usize,
    /// Read-only connections, i.e. reads that run at once (at least 1).
    pub read_connections: usize,
    /// Where the WAL is fsynced. `true` (the default): COMMIT only writes the WAL
    /// (`synchronous=NORMAL`) and a syncer thread fdatasyncs it, covering every commit made since
    /// its last call, while the writer goes on with the next batch; a write is answered once its
    /// commit is covered. `false`: `synchronous=FULL`, the fsync inside every COMMIT (the
    /// one-transaction-per-write baseline of the benchmark).
    pub background_sync: bool,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions { max_batch: 1024, queue_capacity: 4096, read_connections: 2, background_sync: true }
    }
}

/// A snapshot of the writer's counters, for `/metrics` and for checking group commit against an
/// `strace` count of fsyncs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Batches committed: one transaction each.
    pub commits: u64,
    /// fdatasync calls of the WAL that made commits durable (with `background_sync`; each covers
    /// every commit made before it started; without it, each commit fsyncs in COMMIT instead).
    /// A checkpoint, every 1,000 WAL pages, adds fsyncs of its own.
    pub syncs: u64,
    /// Write commands executed in committed batches (including ones that rolled back only
    /// themselves, such as a taken email).
    pub writes: u64,
    /// Commands in the most recent committed batch.
    pub last_batch: u64,
    /// Time spent in COMMIT, summed, in microseconds.
    pub total_commit_micros: u64,
    /// Batches whose transaction failed; every caller in them got `Error::Unavailable`.
    pub failed_batches: u64,
}

/// Upper bounds (inclusive) of the batch-size histogram, in commands per committed batch. The
/// default `max_batch` is 1,024, so the last bound is where a saturated writer lands.
pub const BATCH_SIZE_BOUNDS: [u64; 11] = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024];

/// Upper bounds (inclusive) of the commit-time histogram, in microseconds: an fsync on an SSD
/// takes 0.1–2 ms, on a busy or networked disk tens of ms.
pub const COMMIT_MICROS_BOUNDS: [u64; 13] =
    [100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000];

/// One histogram of the writer, as counted so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Buckets {
    /// Inclusive upper bound of every bucket but the last.
    pub bounds: &'static [u64],
    /// Observations per bucket, not cumulative: `bounds.len() + 1` entries, the last counting
    /// values above every bound.
    pub counts: Vec<u64>,
    /// Sum of the observed values.
    pub sum: u64,
}

/// The writer's histograms over committed batches, for `/metrics`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitHistograms {
    /// Commands per committed batch (its sum is [`StoreStats::writes`]).
    pub batch_size: Buckets,
    /// Time in COMMIT per batch, in microseconds (its sum is [`StoreStats::total_commit_micros`]).
    pub commit_micros: Buckets,
}

/// The counters behind [`StoreStats`], shared with the writer thread.
#[derive(Debug, Default)]
struct Counters {
    commits: AtomicU64,
    syncs: AtomicU64,
    writes: AtomicU64,
    last_batch: AtomicU64,
    total_commit_micros: AtomicU64,
    failed_batches: AtomicU64,
    /// Committed batches per [`BATCH_SIZE_BOUNDS`] bucket (one `fetch_add` per batch).
    batch_sizes: [AtomicU64; BATCH_SIZE_BOUNDS.len() + 1],
    /// Committed batches per [`COMMIT_MICROS_BOUNDS`] bucket.
    commit_times: [AtomicU64; COMMIT_MICROS_BOUNDS.len() + 1],
}

/// The bucket `value` falls in: the first whose bound is at least `value`, else the last.
fn bucket_of(bounds: &[u64], value: u64) -> usize {
    bounds.partition_point(|&bound| bound < value)
}

fn load_all(counts: &[AtomicU64]) -> Vec<u64> {
    counts.iter().map(|c| c.load(Ordering::Relaxed)).collect()
}

/// A write command as the writer thread sees it: it runs against the write connection and hands
/// back whether it succeeded and how to answer its caller.
struct Job {
    run: Box<dyn FnOnce(&Connection) -> Executed + Send>,
    /// Whether the command may fail for a reason of its own (a taken email, say) and so runs
    /// inside its own savepoint, rolled back alone. Commands that can only fail with the database
    /// itself skip the savepoint (measured at an eighth of the writer's time on request creates);
    /// if one fails anyway, the whole batch is rolled back and every caller hears `Unavailable`.
    guarded: bool,
}

/// A command that has run but whose caller must not hear of it before the batch commits.
struct Executed {
    /// `false` rolls the command's savepoint back.
    ok: bool,
    /// Sends the result with the commit's sequence number; called only after COMMIT succeeded.
    /// Dropping it instead makes the caller's reply channel close, which it reports as
    /// `Error::Unavailable`.
    reply: Box<dyn FnOnce(u64) + Send>,
}

/// The SQLite implementation of [`Store`].
///
/// A handle is cheap to clone (one `Arc`); every clone shares the one writer thread and the read
/// pool. The writer thread stops after [`SqliteStore::shutdown`], or when the last clone is
/// dropped; either way it first commits everything already queued. Dropping the last clone
/// waits for that (at most one batch), so prefer `shutdown` inside the runtime.
#[derive(Clone)]
pub struct SqliteStore {
    inner: Arc<Inner>,
}

struct Inner {
    /// `None` once shut down; cloned per write so that taking it stops new writes.
    queue: Mutex<Option<mpsc::Sender<Job>>>,
    writer: Mutex<Option<JoinHandle<()>>>,
    readers: Arc<ReadPool>,
    counters: Arc<Counters>,
    cache: AccountCache,
    sync: Arc<SyncShared>,
}

/// Commits and how far the syncer has made them durable, shared by the writer, the syncer and
/// every caller waiting for its write to be durable.
struct SyncShared {
    /// Sequence number of the last commit, and whether the syncer should stop once it has
    /// covered it.
    state: Mutex<(u64, bool)>,
    wake: parking_lot::Condvar,
    /// What the syncer has covered; callers wait on it.
    mark: watch::Sender<SyncMark>,
}

impl SyncShared {
    fn new() -> Arc<SyncShared> {
        Arc::new(SyncShared {
            state: Mutex::new((0, false)),
            wake: parking_lot::Condvar::new(),
            mark: watch::Sender::new(SyncMark::default()),
        })
    }

    /// Records a commit; returns its sequence number.
    fn committed(&self, background: bool) -> u64 {
        let mut state = self.state.lock();
        state.0 += 1;
        let seq = state.0;
        drop(state);
        if background {
            self.wake.notify_one();
        } else {
            // COMMIT itself fsynced (synchronous=FULL).
            self.mark.send_modify(|m| m.synced = seq);
        }
        seq
    }

    fn durable(&self, seq: u64) -> Durable {
        Durable::pending(seq, self.mark.subscribe())
    }
}

/// Makes commits durable off the writer thread: waits for commits, fdatasyncs the WAL once for
/// all made since the last call, publishes how far it got. An fsync error is final (the kernel
/// may have dropped the dirty pages it could not write): every later wait fails.
fn run_syncer(wal: PathBuf, shared: Arc<SyncShared>, counters: Arc<Counters>) {
    let mut file: Option<std::fs::File> = None;
    let mut synced = 0;
    loop {
        let target = {
            let mut state = shared.state.lock();
            while state.0 == synced && !state.1 {
                shared.wake.wait(&mut state);
            }
            if state.0 == synced {
                return;
            }
            state.0
        };
        let result = (|| -> std::io::Result<()> {
            if file.is_none() {
                let opened = std::fs::OpenOptions::new().read(true).write(true).open(&wal)?;
                // The WAL's directory entry must be durable too, once.
                if let Some(dir) = wal.parent() {
                    std::fs::File::open(dir)?.sync_all()?;
                }
                file = Some(opened);
            }
            file.as_ref().map_or(Ok(()), |f| f.sync_data())
        })();
        match result {
            Ok(()) => {
                synced = target;
                counters.syncs.fetch_add(1, Ordering::Relaxed);
                shared.mark.send_modify(|m| m.synced = synced);
            }
            Err(e) => {
                tracing::error!(%e, wal = %wal.display(), "fdatasync of the WAL failed; no write is acknowledged from now on");
                shared.mark.send_modify(|m| m.failed = true);
                return;
            }
        }
    }
}

/// Accounts and pharmacies by user id, which every authenticated call looks up (a read on the
/// blocking pool each, 2 for a pharmacy's accept, before this cache). Rows are cached as read and
/// the whole cache is dropped after any write that can change a user or a pharmacy (profile,
/// approval, email verification: rare). A read that started before such a write may not fill the
/// cache after it: the epoch, bumped by every invalidation, is checked under the same lock.
#[derive(Default)]
struct AccountCache {
    state: Mutex<CacheState>,
}

#[derive(Default)]
struct CacheState {
    epoch: u64,
    users: FxHashMap<UserId, User>,
    pharmacies: FxHashMap<UserId, Pharmacy>,
}

/// Entries per map before the cache starts over (bounds its memory at ~100 MB for users).
const CACHE_LIMIT: usize = 500_000;

impl AccountCache {
    fn epoch(&self) -> u64 {
        self.state.lock().epoch
    }

    fn user(&self, id: UserId) -> Option<User> {
        self.state.lock().users.get(&id).cloned()
    }

    fn pharmacy(&self, user_id: UserId) -> Option<Pharmacy> {
        self.state.lock().pharmacies.get(&user_id).cloned()
    }

    fn put_user(&self, read_at: u64, user: &User) {
        let mut state = self.state.lock();
        if state.epoch == read_at {
            if state.users.len() >= CACHE_LIMIT {
                state.users.clear();
            }
            state.users.insert(user.id, user.clone());
        }
    }

    fn put_pharmacy(&self, read_at: u64, pharmacy: &Pharmacy) {
        let mut state = self.state.lock();
        if state.epoch == read_at {
            if state.pharmacies.len() >= CACHE_LIMIT {
                state.pharmacies.clear();
            }
            state.pharmacies.insert(pharmacy.user_id, pharmacy.clone());
        }
    }

    fn invalidate(&self) {
        let mut state = self.state.lock();
        state.epoch += 1;
        state.users.clear();
        state.pharmacies.clear();
    }
}

/// Read-only connections; the semaphore bounds how many reads run at once, so a burst of reads
/// cannot occupy the whole blocking pool or open unbounded connections.
struct ReadPool {
    path: PathBuf,
    idle: Mutex<Vec<Connection>>,
    permits: Arc<Semaphore>,
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path`, applies pending migrations and starts
    /// the writer thread. Synchronous: call it before or outside the runtime.
    pub fn open(path: &Path, options: StoreOptions) -> Result<SqliteStore> {
        let max_batch = options.max_batch.max(1);
        let background_sync = options.background_sync;
        let mut conn = open_writer(path, background_sync).map_err(|e| Error::store("open the database", e))?;
        migrate(&mut conn).map_err(|e| Error::store("migrate the database", e))?;

        let read_connections = options.read_connections.max(1);
        let idle = (0..read_connections)
            .map(|_| open_reader(path))
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(|e| Error::store("open a read connection", e))?;
        let readers = Arc::new(ReadPool {
            path: path.to_path_buf(),
            idle: Mutex::new(idle),
            permits: Arc::new(Semaphore::new(read_connections)),
        });

        let counters = Arc::new(Counters::default());
        let sync = SyncShared::new();
        let syncer = if background_sync {
            let mut wal = path.as_os_str().to_owned();
            wal.push("-wal");
            let (wal, shared, counters) = (PathBuf::from(wal), Arc::clone(&sync), Arc::clone(&counters));
            let thread = std::thread::Builder::new()
                .name("sqlite-syncer".into())
                .spawn(move || run_syncer(wal, shared, counters))
                .map_err(|e| Error::store("start the syncer thread", e))?;
            Some(thread)
        } else {
            None
        };
        let (queue, jobs) = mpsc::channel(options.queue_capacity.max(1));
        let (thread_counters, thread_sync) = (Arc::clone(&counters), Arc::clone(&sync));
        let writer = std::thread::Builder::new()
            .name("sqlite-writer".into())
            .spawn(move || run_writer(conn, jobs, max_batch, &thread_counters, &thread_sync, syncer))
            .map_err(|e| Error::store("start the writer thread", e))?;
        tracing::info!(path = %path.display(), max_batch, background_sync, "store open");

        Ok(SqliteStore {
            inner: Arc::new(Inner {
                queue: Mutex::new(Some(queue)),
                writer: Mutex::new(Some(writer)),
                readers,
                counters,
                cache: AccountCache::default(),
                sync,
            }),
        })
    }

    /// The writer's counters now.
    pub fn stats(&self) -> StoreStats {
        let c = &self.inner.counters;
        StoreStats {
            commits: c.commits.load(Ordering::Relaxed),
            syncs: c.syncs.load(Ordering::Relaxed),
            writes: c.writes.load(Ordering::Relaxed),
            last_batch: c.last_batch.load(Ordering::Relaxed),
            total_commit_micros: c.total_commit_micros.load(Ordering::Relaxed),
            failed_batches: c.failed_batches.load(Ordering::Relaxed),
        }
    }

    /// The batch-size and commit-time histograms now.
    pub fn commit_histograms(&self) -> CommitHistograms {
        let c = &self.inner.counters;
        CommitHistograms {
            batch_size: Buckets {
                bounds: &BATCH_SIZE_BOUNDS,
                counts: load_all(&c.batch_sizes),
                sum: c.writes.load(Ordering::Relaxed),
            },
            commit_micros: Buckets {
                bounds: &COMMIT_MICROS_BOUNDS,
                counts: load_all(&c.commit_times),
                sum: c.total_commit_micros.load(Ordering::Relaxed),
            },
        }
    }

    /// `journal_mode` and `synchronous` as the writer connection has them (through the queue, so
    /// this is what every write really runs with): `("wal", 1)` with `background_sync` (the syncer
    /// thread fsyncs), `("wal", 2)` without.
    pub async fn pragmas(&self) -> Result<(String, i64)> {
        self.write("read pragmas", |c| {
            let mode: String = c
                .pragma_query_value(None, "journal_mode", |r| r.get(0))
                .map_err(|e| Error::store("read journal_mode", e))?;
            let sync: i64 = c
                .pragma_query_value(None, "synchronous", |r| r.get(0))
                .map_err(|e| Error::store("read synchronous", e))?;
            Ok((mode, sync))
        })
        .await
    }

    /// Stops taking writes, lets the writer commit everything already queued, and waits for its
    /// thread to end. Later writes get `Error::Unavailable`; reads keep working. Idempotent.
    pub async fn shutdown(&self) {
        // Dropping our sender closes the queue once in-flight sends (holding clones) are done.
        drop(self.inner.queue.lock().take());
        let writer = self.inner.writer.lock().take();
        if let Some(writer) = writer {
            match tokio::task::spawn_blocking(move || writer.join()).await {
                Ok(Ok(())) => tracing::info!("store writer stopped"),
                Ok(Err(_)) => tracing::error!("store writer panicked"),
                Err(e) => tracing::error!(%e, "could not wait for the store writer"),
            }
        }
    }

    /// Queues a write command and waits until its batch is committed.
    async fn write<T, F>(&self, what: &'static str, command: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T> + Send + 'static,
    {
        let (value, seq) = self.submit(what, true, command).await?;
        self.inner.sync.durable(seq).wait().await?;
        Ok(value)
    }

    /// As `write`, for a command that fails only if the database does (no savepoint of its own).
    async fn write_unguarded<T, F>(&self, what: &'static str, command: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T> + Send + 'static,
    {
        let (value, seq) = self.submit(what, false, command).await?;
        self.inner.sync.durable(seq).wait().await?;
        Ok(value)
    }

    /// As `write`, answering once the batch is committed, with its durability to await.
    async fn write_visible<T, F>(&self, what: &'static str, guarded: bool, command: F) -> Result<(T, Durable)>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T> + Send + 'static,
    {
        let (value, seq) = self.submit(what, guarded, command).await?;
        Ok((value, self.inner.sync.durable(seq)))
    }

    async fn submit<T, F>(&self, what: &'static str, guarded: bool, command: F) -> Result<(T, u64)>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T> + Send + 'static,
    {
        let queue = self.inner.queue.lock().clone().ok_or_else(|| Error::store(what, "the store is shut down"))?;
        let (reply_to, reply) = oneshot::channel();
        let run = Box::new(move |conn: &Connection| {
            let result = command(conn);
            Executed {
                ok: result.is_ok(),
                reply: Box::new(move |seq| {
                    // The caller may have gone away; the write stands regardless.
                    let _ = reply_to.send(result.map(|value| (value, seq)));
                }) as Box<dyn FnOnce(u64) + Send>,
            }
        });
        let job = Job { run, guarded };
        queue.send(job).await.map_err(|_| Error::store(what, "the writer thread has stopped"))?;
        drop(queue);
        reply.await.map_err(|_| Error::store(what, "the write was not committed"))?
    }

    /// Runs a query on a read-only connection on the blocking pool.
    async fn read<T, F>(&self, what: &'static str, query: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        let pool = Arc::clone(&self.inner.readers);
        let permit = Arc::clone(&pool.permits).acquire_owned().await.map_err(|e| Error::store(what, e))?;
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let idle = pool.idle.lock().pop();
            // A connection lost to a panic is replaced rather than shrinking the pool for good.
            let conn = match idle {
                Some(conn) => conn,
                None => open_reader(&pool.path).map_err(|e| Error::store(what, e))?,
            };
            let result = query(&conn).map_err(|e| Error::store(what, e));
            pool.idle.lock().push(conn);
            result
        })
        .await
        .map_err(|e| Error::store(what, e))?
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Readers close first, so that the writer's connection is the file's last: SQLite then
        // checkpoints the WAL into the main file and removes it, leaving one tidy file behind.
        self.readers.idle.lock().clear();
        drop(self.queue.get_mut().take());
        if let Some(writer) = self.writer.get_mut().take()
            && writer.join().is_err()
        {
            tracing::error!("store writer panicked");
        }
    }
}

// ---- connections ----

/// Per-connection settings; both kinds wait rather than fail when a checkpoint holds a lock.
fn configure(conn: &Connection) -> rusqlite::Result<()> {
    conn.busy_timeout(Duration::from_secs(5))?;
    conn.set_prepared_statement_cache_capacity(64);
    Ok(())
}

/// Failures while opening: SQLite's, or a file SQLite opened but this program cannot use.
type OpenError = Box<dyn std::error::Error + Send + Sync>;

fn open_writer(path: &Path, background_sync: bool) -> Result<Connection, OpenError> {
    let conn = Connection::open(path)?;
    configure(&conn)?;
    let mode: String = conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(format!("journal_mode is {mode}, not wal (a file system without WAL?)").into());
    }
    // An acknowledged write must survive power loss. FULL: the WAL is fsynced inside every
    // COMMIT. NORMAL (with the syncer thread): COMMIT writes the WAL, the syncer fdatasyncs it
    // before anyone hears of the write; SQLite still syncs the WAL before and the database after
    // each checkpoint.
    conn.pragma_update(None, "synchronous", if background_sync { "NORMAL" } else { "FULL" })?;
    conn.pragma_update(None, "foreign_keys", true)?;
    // A larger page cache and in-memory statement journals keep the writer off the disk between
    // commits (measured +3% on `store/group_commit/1000`).
    conn.pragma_update(None, "cache_size", -32_768)?;
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    Ok(conn)
}

fn open_reader(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)?;
    configure(&conn)?;
    Ok(conn)
}

/// Brings the schema to the newest version, all or nothing.
fn migrate(conn: &mut Connection) -> Result<(), OpenError> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let version: i64 = tx.pragma_query_value(None, "user_version", |r| r.get(0))?;
    let newest = MIGRATIONS.len() as i64;
    if version > newest {
        return Err(format!("the database has schema version {version}; this program knows up to {newest}").into());
    }
    for sql in &MIGRATIONS[version.max(0) as usize..] {
        tx.execute_batch(sql)?;
    }
    if version != newest {
        tx.pragma_update(None, "user_version", newest)?;
        tracing::info!(from = version, to = newest, "store schema migrated");
    }
    tx.commit()?;
    Ok(())
}

// ---- the writer thread ----

fn run_writer(
    conn: Connection,
    mut jobs: mpsc::Receiver<Job>,
    max_batch: usize,
    counters: &Counters,
    sync: &SyncShared,
    syncer: Option<JoinHandle<()>>,
) {
    let background = syncer.is_some();
    let mut batch = Vec::with_capacity(max_batch.min(4096));
    // Ends when every sender is gone and the queue is empty: nothing queued is ever dropped.
    while let Some(first) = jobs.blocking_recv() {
        batch.push(first);
        while batch.len() < max_batch {
            match jobs.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        commit_batch(&conn, &mut batch, counters, sync, background);
    }
    // Everything committed is made durable (and its callers answered) before the checkpoint.
    if let Some(syncer) = syncer {
        sync.state.lock().1 = true;
        sync.wake.notify_one();
        if syncer.join().is_err() {
            tracing::error!("store syncer panicked");
        }
    }
    // Fold the WAL into the main file now, even if read connections are still open, so that a
    // stopped store is one complete file (for backups) and the next start has no log to replay.
    match conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| r.get::<_, i64>(0)) {
        Ok(0) => {}
        Ok(_) => tracing::warn!("final checkpoint incomplete: a reader was still busy"),
        Err(e) => tracing::warn!(%e, "final checkpoint failed"),
    }
}

/// Runs `batch` in one transaction and answers its callers once it is committed. On any failure
/// of the transaction itself the callers' replies are dropped, which they see as `Unavailable`.
fn commit_batch(conn: &Connection, batch: &mut Vec<Job>, counters: &Counters, sync: &SyncShared, background: bool) {
    let size = batch.len() as u64;
    let mut replies = Vec::with_capacity(batch.len());
    let outcome = (|| -> rusqlite::Result<Duration> {
        conn.prepare_cached("BEGIN IMMEDIATE")?.execute([])?;
        for job in batch.drain(..) {
            if job.guarded {
                conn.prepare_cached("SAVEPOINT command")?.execute([])?;
            }
            let ok = match catch_unwind(AssertUnwindSafe(|| (job.run)(conn))) {
                Ok(executed) => {
                    replies.push(executed.reply);
                    executed.ok
                }
                Err(_) => {
                    // The job's reply went down with it; its caller sees `Unavailable`.
                    tracing::error!("a store write command panicked; rolled back");
                    false
                }
            };
            if !job.guarded {
                if !ok {
                    // Its partial writes cannot be undone alone: give up the whole batch.
                    return Err(rusqlite::Error::InvalidQuery);
                }
                continue;
            }
            if !ok {
                conn.prepare_cached("ROLLBACK TO command")?.execute([])?;
            }
            conn.prepare_cached("RELEASE command")?.execute([])?;
        }
        let started = Instant::now();
        conn.prepare_cached("COMMIT")?.execute([])?;
        Ok(started.elapsed())
    })();
    match outcome {
        Ok(commit_time) => {
            counters.commits.fetch_add(1, Ordering::Relaxed);
            counters.writes.fetch_add(size, Ordering::Relaxed);
            counters.last_batch.store(size, Ordering::Relaxed);
            let commit_micros = commit_time.as_micros() as u64;
            counters.total_commit_micros.fetch_add(commit_micros, Ordering::Relaxed);
            counters.batch_sizes[bucket_of(&BATCH_SIZE_BOUNDS, size)].fetch_add(1, Ordering::Relaxed);
            counters.commit_times[bucket_of(&COMMIT_MICROS_BOUNDS, commit_micros)].fetch_add(1, Ordering::Relaxed);
            let seq = sync.committed(background);
            for reply in replies {
                reply(seq);
            }
        }
        Err(e) => {
            counters.failed_batches.fetch_add(1, Ordering::Relaxed);
            tracing::error!(%e, size, "store batch failed; rolling back");
            batch.clear();
            if !conn.is_autocommit()
                && let Err(e) = conn.execute_batch("ROLLBACK")
            {
                tracing::error!(%e, "store rollback failed");
            }
        }
    }
}

// ---- row mapping ----

/// Invalid data in the file becomes a store error, never a panic.
fn bad_column(idx: usize, ty: Type, cause: impl std::error::Error + Send + Sync + 'static) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(idx, ty, Box::new(cause))
}

#[derive(Debug, thiserror::Error)]
#[error("unknown {what} {value:?}")]
struct UnknownName {
    what: &'static str,
    value: String,
}

fn location(row: &Row<'_>, lat: usize, lng: usize) -> rusqlite::Result<LatLng> {
    LatLng::new(row.get(lat)?, row.get(lng)?).map_err(|e| bad_column(lat, Type::Real, e))
}

fn parsed<T>(
    row: &Row<'_>,
    idx: usize,
    what: &'static str,
    parse: impl FnOnce(&str) -> Option<T>,
) -> rusqlite::Result<T> {
    let text = row.get_ref(idx)?.as_str()?;
    parse(text).ok_or_else(|| bad_column(idx, Type::Text, UnknownName { what, value: text.to_owned() }))
}

/// `concat!` needs literals, so the column lists that appear inside larger statements are macros.
macro_rules! user_columns {
    () => {
        "id, email, password_hash, name, phone_number, role, email_verified, created_at"
    };
}

fn user_row(row: &Row<'_>) -> rusqlite::Result<User> {
    Ok(User {
        id: row.get(0)?,
        email: row.get(1)?,
        password_hash: row.get(2)?,
        name: row.get(3)?,
        phone_number: row.get(4)?,
        role: parsed(row, 5, "role", Role::parse)?,
        email_verified: row.get(6)?,
        created_at: row.get(7)?,
    })
}

/// With `$p` a table alias prefix such as `"p."`, or `""`.
macro_rules! pharmacy_columns {
    ($p:literal) => {
        concat!($p, "id, ", $p, "user_id, ", $p, "name, ", $p, "lat, ", $p, "lng, ", $p, "approved, ", $p, "created_at")
    };
}

fn pharmacy_row(row: &Row<'_>) -> rusqlite::Result<Pharmacy> {
    Ok(Pharmacy {
        id: row.get(0)?,
        user_id: row.get(1)?,
        name: row.get(2)?,
        location: location(row, 3, 4)?,
        approved: row.get(5)?,
        created_at: row.get(6)?,
    })
}

macro_rules! request_columns {
    () => {
        "id, customer_id, patient_name, patient_phone, lat, lng, radius_km, quantity, \
         medicine_name, note, image, status, pharmacy_id, pharmacy_name, idempotency_key, \
         created_at, expires_at, closed_at"
    };
}

fn request_row(row: &Row<'_>) -> rusqlite::Result<MedicineRequest> {
    Ok(MedicineRequest {
        id: row.get(0)?,
        customer_id: row.get(1)?,
        patient_name: row.get(2)?,
        patient_phone: row.get(3)?,
        location: location(row, 4, 5)?,
        radius_km: row.get(6)?,
        quantity: row.get(7)?,
        medicine_name: row.get(8)?,
        note: row.get(9)?,
        image: row.get(10)?,
        status: parsed(row, 11, "status", RequestStatus::parse)?,
        pharmacy_id: row.get(12)?,
        pharmacy_name: row.get(13)?,
        idempotency_key: row.get(14)?,
        created_at: row.get(15)?,
        expires_at: row.get(16)?,
        closed_at: row.get(17)?,
    })
}

/// Columns from index `at`: pharmacy_id, pharmacy_name, lat, lng, distance_km.
fn recipient_row(row: &Row<'_>, at: usize) -> rusqlite::Result<Recipient> {
    Ok(Recipient {
        pharmacy_id: row.get(at)?,
        pharmacy_name: row.get(at + 1)?,
        location: location(row, at + 2, at + 3)?,
        distance_km: row.get(at + 4)?,
    })
}

macro_rules! response_columns {
    () => {
        "id, request_id, pharmacy_id, pharmacy_name, response_type, text_message, audio, \
         responded_at"
    };
}

fn response_row(row: &Row<'_>) -> rusqlite::Result<PharmacyResponse> {
    Ok(PharmacyResponse {
        id: row.get(0)?,
        request_id: row.get(1)?,
        pharmacy_id: row.get(2)?,
        pharmacy_name: row.get(3)?,
        response_type: parsed(row, 4, "response type", ResponseType::parse)?,
        text_message: row.get(5)?,
        audio: row.get(6)?,
        responded_at: row.get(7)?,
    })
}

fn is_unique_violation(e: &rusqlite::Error) -> bool {
    matches!(
        e,
        rusqlite::Error::SqliteFailure(f, _)
            if f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE
    )
}

// ---- queries shared by reads and write commands ----

fn pharmacy_by_id(c: &Connection, id: PharmacyId) -> rusqlite::Result<Option<Pharmacy>> {
    c.prepare_cached(concat!("SELECT ", pharmacy_columns!(""), " FROM pharmacies WHERE id = ?1"))?
        .query_row([id], pharmacy_row)
        .optional()
}

fn request_by_id(c: &Connection, id: RequestId) -> rusqlite::Result<Option<MedicineRequest>> {
    c.prepare_cached(concat!("SELECT ", request_columns!(), " FROM requests WHERE id = ?1"))?
        .query_row([id], request_row)
        .optional()
}

// ---- write commands (run on the writer thread, inside a savepoint) ----

fn insert_user(c: &Connection, user: NewUser) -> Result<User> {
    let email = normalize_email(&user.email);
    c.prepare_cached(
        "INSERT INTO users (email, password_hash, name, phone_number, role, email_verified, \
         created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )
    .and_then(|mut s| {
        s.execute(params![
            email,
            user.password_hash,
            user.name,
            user.phone_number,
            user.role.as_str(),
            user.email_verified,
            user.created_at,
        ])
    })
    .map_err(|e| if is_unique_violation(&e) { email_taken() } else { Error::store("insert a user", e) })?;
    Ok(user.into_user(c.last_insert_rowid(), email))
}

fn insert_pharmacy_user(c: &Connection, user: NewUser, pharmacy: NewPharmacy) -> Result<(User, Pharmacy)> {
    let user = insert_user(c, user)?;
    c.prepare_cached(
        "INSERT INTO pharmacies (user_id, name, lat, lng, approved, created_at) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )
    .and_then(|mut s| {
        s.execute(params![
            user.id,
            pharmacy.name,
            pharmacy.location.lat(),
            pharmacy.location.lng(),
            pharmacy.approved,
            user.created_at,
        ])
    })
    .map_err(|e| Error::store("insert a pharmacy", e))?;
    let pharmacy = Pharmacy {
        id: c.last_insert_rowid(),
        user_id: user.id,
        name: pharmacy.name,
        location: pharmacy.location,
        approved: pharmacy.approved,
        created_at: user.created_at,
    };
    Ok((user, pharmacy))
}

fn update_pharmacy(c: &Connection, id: PharmacyId, patch: PharmacyPatch) -> Result<Pharmacy> {
    let changed = c
        .prepare_cached(
            "UPDATE pharmacies SET name = COALESCE(?2, name), lat = COALESCE(?3, lat), \
             lng = COALESCE(?4, lng) WHERE id = ?1",
        )
        .and_then(|mut s| {
            s.execute(params![id, patch.name, patch.location.map(LatLng::lat), patch.location.map(LatLng::lng),])
        })
        .map_err(|e| Error::store("update a pharmacy", e))?;
    if changed == 0 {
        return Err(pharmacy_not_found());
    }
    if let Some(phone) = patch.phone_number {
        c.prepare_cached(
            "UPDATE users SET phone_number = ?2 \
             WHERE id = (SELECT user_id FROM pharmacies WHERE id = ?1)",
        )
        .and_then(|mut s| s.execute(params![id, phone]))
        .map_err(|e| Error::store("update a pharmacy's phone", e))?;
    }
    pharmacy_by_id(c, id).map_err(|e| Error::store("read a pharmacy", e))?.ok_or_else(pharmacy_not_found)
}

fn set_pharmacy_approved(c: &Connection, id: PharmacyId, approved: bool) -> Result<Pharmacy> {
    let changed = c
        .prepare_cached("UPDATE pharmacies SET approved = ?2 WHERE id = ?1")
        .and_then(|mut s| s.execute(params![id, approved]))
        .map_err(|e| Error::store("approve a pharmacy", e))?;
    if changed == 0 {
        return Err(pharmacy_not_found());
    }
    pharmacy_by_id(c, id).map_err(|e| Error::store("read a pharmacy", e))?.ok_or_else(pharmacy_not_found)
}

fn put_otp(c: &Connection, otp: OtpRecord) -> Result<()> {
    c.prepare_cached(
        "INSERT OR REPLACE INTO otps (email, code_hash, created_at, expires_at, attempts) \
         VALUES (?1, ?2, ?3, ?4, 0)",
    )
    .and_then(|mut s| s.execute(params![normalize_email(&otp.email), otp.code_hash, otp.created_at, otp.expires_at,]))
    .map_err(|e| Error::store("store an OTP", e))?;
    Ok(())
}

fn check_otp(c: &Connection, email: &str, code_hash: &str, now: UnixMs) -> Result<OtpOutcome> {
    let fail = |e| Error::store("check an OTP", e);
    let stored: Option<(String, UnixMs, u32)> = c
        .prepare_cached("SELECT code_hash, expires_at, attempts FROM otps WHERE email = ?1")
        .and_then(|mut s| s.query_row([email], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?))).optional())
        .map_err(fail)?;
    let Some((stored_hash, expires_at, attempts)) = stored else {
        return Ok(OtpOutcome::NoCode);
    };
    let delete =
        || c.prepare_cached("DELETE FROM otps WHERE email = ?1").and_then(|mut s| s.execute([email])).map_err(fail);
    if otp_expired(expires_at, now) {
        delete()?;
        return Ok(OtpOutcome::NoCode);
    }
    if same_code_hash(&stored_hash, code_hash) {
        delete()?;
        c.prepare_cached("INSERT OR IGNORE INTO verified_emails (email, verified_at) VALUES (?1, ?2)")
            .and_then(|mut s| s.execute(params![email, now]))
            .map_err(fail)?;
        c.prepare_cached("UPDATE users SET email_verified = 1 WHERE email = ?1")
            .and_then(|mut s| s.execute([email]))
            .map_err(fail)?;
        return Ok(OtpOutcome::Verified);
    }
    let attempts = attempts.saturating_add(1);
    if attempts >= super::OTP_MAX_ATTEMPTS {
        delete()?;
        return Ok(OtpOutcome::Wrong { remaining: 0 });
    }
    c.prepare_cached("UPDATE otps SET attempts = ?2 WHERE email = ?1")
        .and_then(|mut s| s.execute(params![email, attempts]))
        .map_err(fail)?;
    Ok(OtpOutcome::Wrong { remaining: super::OTP_MAX_ATTEMPTS - attempts })
}

fn create_request(c: &Connection, req: NewRequest, recipients: Vec<Recipient>) -> Result<Created> {
    let fail = |e| Error::store("create a request", e);
    if let Some(key) = &req.idempotency_key {
        let earlier = c
            .prepare_cached(concat!(
                "SELECT ",
                request_columns!(),
                " FROM requests WHERE customer_id = ?1 AND idempotency_key = ?2 \
                 ORDER BY created_at DESC, id DESC LIMIT 1"
            ))
            .and_then(|mut s| s.query_row(params![req.customer_id, key], request_row).optional())
            .map_err(fail)?;
        if let Some(earlier) = earlier
            && idempotency_binds(earlier.created_at, req.created_at)
        {
            return Ok(Created::Existing(earlier));
        }
    }
    c.prepare_cached(
        "INSERT INTO requests (customer_id, patient_name, patient_phone, lat, lng, radius_km, \
         quantity, medicine_name, note, image, status, idempotency_key, created_at, expires_at) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, 'PENDING', ?11, ?12, ?13)",
    )
    .and_then(|mut s| {
        s.execute(params![
            req.customer_id,
            req.patient_name,
            req.patient_phone,
            req.location.lat(),
            req.location.lng(),
            req.radius_km,
            req.quantity,
            req.medicine_name,
            req.note,
            req.image,
            req.idempotency_key,
            req.created_at,
            req.expires_at,
        ])
    })
    .map_err(fail)?;
    let id = c.last_insert_rowid();
    let mut insert = c
        .prepare_cached(
            // OR IGNORE: a pharmacy listed twice keeps its first (nearest) place, so this command
            // cannot fail on its own and runs without a savepoint.
            "INSERT OR IGNORE INTO recipients (request_id, pharmacy_id, position, pharmacy_name, lat, lng, \
             distance_km) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        )
        .map_err(fail)?;
    for (position, r) in recipients.iter().enumerate() {
        insert
            .execute(params![
                id,
                r.pharmacy_id,
                position as i64,
                r.pharmacy_name,
                r.location.lat(),
                r.location.lng(),
                r.distance_km,
            ])
            .map_err(fail)?;
    }
    Ok(Created::New(req.into_request(id)))
}

fn request_status(c: &Connection, id: RequestId) -> rusqlite::Result<Option<(UserId, RequestStatus)>> {
    c.prepare_cached("SELECT customer_id, status FROM requests WHERE id = ?1")?
        .query_row([id], |r| Ok((r.get(0)?, parsed(r, 1, "status", RequestStatus::parse)?)))
        .optional()
}

fn record_response(c: &Connection, resp: NewResponse) -> Result<ResponseOutcome> {
    let fail = |e| Error::store("record a response", e);
    let earlier = c
        .prepare_cached(concat!(
            "SELECT ",
            response_columns!(),
            " FROM responses WHERE request_id = ?1 AND pharmacy_id = ?2"
        ))
        .and_then(|mut s| s.query_row(params![resp.request_id, resp.pharmacy_id], response_row).optional())
        .map_err(fail)?;
    if let Some(earlier) = earlier {
        return Ok(ResponseOutcome::Repeat(earlier));
    }
    let notified = c
        .prepare_cached("SELECT 1 FROM recipients WHERE request_id = ?1 AND pharmacy_id = ?2")
        .and_then(|mut s| s.exists(params![resp.request_id, resp.pharmacy_id]))
        .map_err(fail)?;
    if !notified {
        return Ok(ResponseOutcome::NotNotified);
    }
    let Some((_, status)) = request_status(c, resp.request_id).map_err(fail)? else {
        return Ok(ResponseOutcome::NotNotified);
    };
    if status != RequestStatus::Pending {
        return Ok(ResponseOutcome::Closed(status));
    }
    if resp.response_type == ResponseType::Accepted {
        // The once-only decision; the status check above makes it succeed here, and the
        // condition keeps it correct should that check ever move.
        let won = c
            .prepare_cached(
                "UPDATE requests SET status = 'ACCEPTED', pharmacy_id = ?2, pharmacy_name = ?3, \
                 closed_at = ?4 WHERE id = ?1 AND status = 'PENDING'",
            )
            .and_then(|mut s| {
                s.execute(params![resp.request_id, resp.pharmacy_id, resp.pharmacy_name, resp.responded_at,])
            })
            .map_err(fail)?;
        if won == 0 {
            return Ok(ResponseOutcome::Closed(RequestStatus::Accepted));
        }
    }
    c.prepare_cached(
        "INSERT INTO responses (request_id, pharmacy_id, pharmacy_name, response_type, \
         text_message, audio, responded_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )
    .and_then(|mut s| {
        s.execute(params![
            resp.request_id,
            resp.pharmacy_id,
            resp.pharmacy_name,
            resp.response_type.as_str(),
            resp.text_message,
            resp.audio,
            resp.responded_at,
        ])
    })
    .map_err(fail)?;
    Ok(ResponseOutcome::Recorded(resp.into_response(c.last_insert_rowid())))
}

/// PENDING → `to`, decided once; `owner` restricts it to the customer's own request.
fn close_request(
    c: &Connection,
    id: RequestId,
    owner: Option<UserId>,
    to: RequestStatus,
    now: UnixMs,
) -> Result<Decision> {
    let fail = |e| Error::store("close a request", e);
    let Some((customer_id, status)) = request_status(c, id).map_err(fail)? else {
        return Err(request_not_found());
    };
    if owner.is_some_and(|owner| owner != customer_id) {
        return Err(request_not_found());
    }
    let won = c
        .prepare_cached("UPDATE requests SET status = ?2, closed_at = ?3 WHERE id = ?1 AND status = 'PENDING'")
        .and_then(|mut s| s.execute(params![id, to.as_str(), now]))
        .map_err(fail)?;
    Ok(if won == 1 { Decision::Won } else { Decision::Lost(status) })
}

// ---- reads (read-only connections) ----

fn list_pharmacies(c: &Connection, approved: Option<bool>) -> rusqlite::Result<Vec<PharmacyListing>> {
    let mut s = c.prepare_cached(concat!(
        "SELECT ",
        pharmacy_columns!("p."),
        ", u.email, u.name, u.phone_number FROM pharmacies p JOIN users u ON u.id = p.user_id \
         WHERE ?1 IS NULL OR p.approved = ?1 ORDER BY p.id"
    ))?;
    let rows = s.query_map([approved], |r| {
        Ok(PharmacyListing {
            pharmacy: pharmacy_row(r)?,
            email: r.get(7)?,
            owner_name: r.get(8)?,
            phone_number: r.get(9)?,
        })
    })?;
    rows.collect()
}

fn load_live_requests(c: &Connection, closed_since: UnixMs) -> rusqlite::Result<Vec<RequestSnapshot>> {
    // One snapshot of the file for all three statements.
    let tx = c.unchecked_transaction()?;
    // `closed_at` is set exactly when a request leaves PENDING, so the two halves are disjoint.
    let mut snapshots: Vec<RequestSnapshot> = tx
        .prepare_cached(concat!(
            "SELECT ",
            request_columns!(),
            " FROM requests WHERE status = 'PENDING' UNION ALL SELECT ",
            request_columns!(),
            " FROM requests WHERE closed_at >= ?1"
        ))?
        .query_map([closed_since], |r| {
            Ok(RequestSnapshot { request: request_row(r)?, recipients: Vec::new(), responded: Vec::new() })
        })?
        .collect::<rusqlite::Result<_>>()?;
    snapshots.sort_unstable_by_key(|s| s.request.id);
    let slot: FxHashMap<RequestId, usize> = snapshots.iter().enumerate().map(|(i, s)| (s.request.id, i)).collect();

    // One statement for every live request's recipients, driven by the same two indexes;
    // each request's rows come out in primary-key order and are put nearest-first here.
    let mut positioned: Vec<Vec<(i64, Recipient)>> = vec![Vec::new(); snapshots.len()];
    {
        let mut s = tx.prepare_cached(
            "SELECT rc.request_id, rc.position, rc.pharmacy_id, rc.pharmacy_name, rc.lat, rc.lng, \
             rc.distance_km FROM requests q JOIN recipients rc ON rc.request_id = q.id \
             WHERE q.status = 'PENDING' \
             UNION ALL \
             SELECT rc.request_id, rc.position, rc.pharmacy_id, rc.pharmacy_name, rc.lat, rc.lng, \
             rc.distance_km FROM requests q JOIN recipients rc ON rc.request_id = q.id \
             WHERE q.closed_at >= ?1",
        )?;
        let mut rows = s.query([closed_since])?;
        while let Some(r) = rows.next()? {
            let request_id: RequestId = r.get(0)?;
            if let Some(&i) = slot.get(&request_id) {
                positioned[i].push((r.get(1)?, recipient_row(r, 2)?));
            }
        }
    }
    for (snapshot, mut list) in snapshots.iter_mut().zip(positioned) {
        list.sort_unstable_by_key(|(position, _)| *position);
        snapshot.recipients = list.into_iter().map(|(_, r)| r).collect();
    }

    {
        let mut s = tx.prepare_cached(
            "SELECT rs.request_id, rs.pharmacy_id, rs.response_type \
             FROM requests q JOIN responses rs ON rs.request_id = q.id \
             WHERE q.status = 'PENDING' \
             UNION ALL \
             SELECT rs.request_id, rs.pharmacy_id, rs.response_type \
             FROM requests q JOIN responses rs ON rs.request_id = q.id \
             WHERE q.closed_at >= ?1 ORDER BY 1, 2",
        )?;
        let mut rows = s.query([closed_since])?;
        while let Some(r) = rows.next()? {
            let request_id: RequestId = r.get(0)?;
            if let Some(&i) = slot.get(&request_id) {
                let answer = parsed(r, 2, "response type", ResponseType::parse)?;
                snapshots[i].responded.push((r.get(1)?, answer));
            }
        }
    }
    Ok(snapshots)
}

// ---- bulk loading ----

/// One transaction on its own connection for tools that write a whole data set at once (the
/// `generate-city` load-test data), bypassing the write queue: the rows a million-pharmacy city
/// needs would otherwise be a million queued commands. It opens the file as the store does (WAL,
/// `synchronous=FULL`, foreign keys), applies the same migrations, and writes through the same
/// statements the store's commands use, so the rows are exactly what the running server would
/// have written. Nothing is visible to others until [`commit`](BulkLoader::commit); dropping the
/// loader rolls everything back. Callers must hold the data dir's lock, so that no server writes
/// the file meanwhile.
pub struct BulkLoader {
    conn: Connection,
}

impl SqliteStore {
    /// Opens the database at `path` (creating and migrating it if needed) for one bulk
    /// transaction. Synchronous: call it outside the runtime.
    pub fn bulk_loader(path: &Path) -> Result<BulkLoader> {
        let mut conn = open_writer(path, false).map_err(|e| Error::store("open the database", e))?;
        migrate(&mut conn).map_err(|e| Error::store("migrate the database", e))?;
        // A big load stays in memory until COMMIT instead of spilling half-written pages into
        // the WAL as it goes (256 MiB; SQLite allocates it only as pages are used).
        conn.pragma_update(None, "cache_size", -262_144).map_err(|e| Error::store("size the page cache", e))?;
        conn.execute_batch("BEGIN IMMEDIATE").map_err(|e| Error::store("begin the bulk load", e))?;
        Ok(BulkLoader { conn })
    }
}

impl BulkLoader {
    /// Creates an account, as [`Store::insert_user`] does. A taken email → `Error::Conflict`.
    pub fn insert_user(&self, user: NewUser) -> Result<User> {
        insert_user(&self.conn, user)
    }

    /// Creates a PHARMACY account and its pharmacy, as [`Store::insert_pharmacy_user`] does.
    pub fn insert_pharmacy_user(&self, user: NewUser, pharmacy: NewPharmacy) -> Result<(User, Pharmacy)> {
        insert_pharmacy_user(&self.conn, user, pharmacy)
    }

    /// Stores a PENDING request and its recipients (nearest first), as
    /// [`Store::create_request`] does.
    pub fn create_request(&self, req: NewRequest, recipients: Vec<Recipient>) -> Result<Created> {
        create_request(&self.conn, req, recipients)
    }

    /// Every pharmacy already in the file (including this transaction's), by id.
    pub fn pharmacies(&self) -> Result<Vec<Pharmacy>> {
        let fail = |e| Error::store("load pharmacies", e);
        let mut s = self
            .conn
            .prepare_cached(concat!("SELECT ", pharmacy_columns!(""), " FROM pharmacies ORDER BY id"))
            .map_err(fail)?;
        let rows = s.query_map([], pharmacy_row).map_err(fail)?;
        rows.collect::<rusqlite::Result<Vec<_>>>().map_err(fail)
    }

    /// Commits everything (one fsync) and folds the WAL into the main file, so the server's
    /// next start reads one tidy file.
    pub fn commit(self) -> Result<()> {
        self.conn.execute_batch("COMMIT").map_err(|e| Error::store("commit the bulk load", e))?;
        if let Err(e) = self.conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| r.get::<_, i64>(0)) {
            tracing::warn!(%e, "checkpoint after the bulk load failed; the server will replay the WAL");
        }
        Ok(())
    }
}

#[async_trait]
impl Store for SqliteStore {
    async fn insert_user(&self, user: NewUser) -> Result<User> {
        self.write("insert a user", move |c| insert_user(c, user)).await
    }

    async fn insert_pharmacy_user(&self, user: NewUser, pharmacy: NewPharmacy) -> Result<(User, Pharmacy)> {
        self.write("insert a pharmacy account", move |c| insert_pharmacy_user(c, user, pharmacy)).await
    }

    async fn user_by_email(&self, email: &str) -> Result<Option<User>> {
        let email = normalize_email(email);
        self.read("read a user by email", move |c| {
            c.prepare_cached(concat!("SELECT ", user_columns!(), " FROM users WHERE email = ?1"))?
                .query_row([email], user_row)
                .optional()
        })
        .await
    }

    async fn user_by_id(&self, id: UserId) -> Result<Option<User>> {
        let cache = &self.inner.cache;
        if let Some(user) = cache.user(id) {
            return Ok(Some(user));
        }
        let read_at = cache.epoch();
        let user = self
            .read("read a user", move |c| {
                c.prepare_cached(concat!("SELECT ", user_columns!(), " FROM users WHERE id = ?1"))?
                    .query_row([id], user_row)
                    .optional()
            })
            .await?;
        if let Some(user) = &user {
            cache.put_user(read_at, user);
        }
        Ok(user)
    }

    async fn pharmacy_by_user(&self, user_id: UserId) -> Result<Option<Pharmacy>> {
        let cache = &self.inner.cache;
        if let Some(pharmacy) = cache.pharmacy(user_id) {
            return Ok(Some(pharmacy));
        }
        let read_at = cache.epoch();
        let pharmacy = self
            .read("read a user's pharmacy", move |c| {
                c.prepare_cached(concat!("SELECT ", pharmacy_columns!(""), " FROM pharmacies WHERE user_id = ?1"))?
                    .query_row([user_id], pharmacy_row)
                    .optional()
            })
            .await?;
        if let Some(pharmacy) = &pharmacy {
            cache.put_pharmacy(read_at, pharmacy);
        }
        Ok(pharmacy)
    }

    async fn pharmacy_by_id(&self, id: PharmacyId) -> Result<Option<Pharmacy>> {
        self.read("read a pharmacy", move |c| pharmacy_by_id(c, id)).await
    }

    async fn update_pharmacy(&self, id: PharmacyId, patch: PharmacyPatch) -> Result<Pharmacy> {
        let result = self.write("update a pharmacy", move |c| update_pharmacy(c, id, patch)).await;
        self.inner.cache.invalidate();
        result
    }

    async fn set_pharmacy_approved(&self, id: PharmacyId, approved: bool) -> Result<Pharmacy> {
        let result = self.write("approve a pharmacy", move |c| set_pharmacy_approved(c, id, approved)).await;
        self.inner.cache.invalidate();
        result
    }

    async fn list_pharmacies(&self, approved: Option<bool>) -> Result<Vec<PharmacyListing>> {
        self.read("list pharmacies", move |c| list_pharmacies(c, approved)).await
    }

    async fn load_pharmacies(&self) -> Result<Vec<Pharmacy>> {
        self.read("load pharmacies", |c| {
            let tx = c.unchecked_transaction()?;
            // Ids are handed out ascending and never deleted, so the largest id (one B-tree
            // descent) sizes the vector once instead of re-growing it through a million rows.
            let max_id: Option<i64> = tx.query_row("SELECT max(id) FROM pharmacies", [], |r| r.get(0))?;
            let mut all = Vec::with_capacity(max_id.unwrap_or(0).clamp(0, 1 << 24) as usize);
            let mut s = tx.prepare_cached(concat!("SELECT ", pharmacy_columns!(""), " FROM pharmacies ORDER BY id"))?;
            let mut rows = s.query([])?;
            while let Some(row) = rows.next()? {
                all.push(pharmacy_row(row)?);
            }
            Ok(all)
        })
        .await
    }

    async fn put_otp(&self, otp: OtpRecord) -> Result<()> {
        self.write("store an OTP", move |c| put_otp(c, otp)).await
    }

    async fn otp(&self, email: &str) -> Result<Option<OtpRecord>> {
        let email = normalize_email(email);
        self.read("read an OTP", move |c| {
            c.prepare_cached(
                "SELECT email, code_hash, created_at, expires_at, attempts FROM otps \
                 WHERE email = ?1",
            )?
            .query_row([email], |r| {
                Ok(OtpRecord {
                    email: r.get(0)?,
                    code_hash: r.get(1)?,
                    created_at: r.get(2)?,
                    expires_at: r.get(3)?,
                    attempts: r.get(4)?,
                })
            })
            .optional()
        })
        .await
    }

    async fn check_otp(&self, email: &str, code_hash: &str, now: UnixMs) -> Result<OtpOutcome> {
        let email = normalize_email(email);
        let code_hash = code_hash.to_owned();
        let result = self.write("check an OTP", move |c| check_otp(c, &email, &code_hash, now)).await;
        // `email_verified` of an existing user may have changed (if the outcome is unknown, too).
        if matches!(result, Ok(OtpOutcome::Verified) | Err(_)) {
            self.inner.cache.invalidate();
        }
        result
    }

    async fn email_verified(&self, email: &str) -> Result<bool> {
        let email = normalize_email(email);
        self.read("read email verification", move |c| {
            c.prepare_cached(
                "SELECT EXISTS (SELECT 1 FROM verified_emails WHERE email = ?1) \
                 OR EXISTS (SELECT 1 FROM users WHERE email = ?1 AND email_verified = 1)",
            )?
            .query_row([email], |r| r.get(0))
        })
        .await
    }

    async fn create_request(&self, req: NewRequest, recipients: Vec<Recipient>) -> Result<Created> {
        self.write_unguarded("create a request", move |c| create_request(c, req, recipients)).await
    }

    async fn create_request_visible(&self, req: NewRequest, recipients: Vec<Recipient>) -> Result<(Created, Durable)> {
        self.write_visible("create a request", false, move |c| create_request(c, req, recipients)).await
    }

    async fn record_response(&self, resp: NewResponse) -> Result<ResponseOutcome> {
        self.write("record a response", move |c| record_response(c, resp)).await
    }

    async fn record_response_visible(&self, resp: NewResponse) -> Result<(ResponseOutcome, Durable)> {
        self.write_visible("record a response", true, move |c| record_response(c, resp)).await
    }

    async fn cancel_request(&self, id: RequestId, customer_id: UserId, now: UnixMs) -> Result<Decision> {
        self.write("cancel a request", move |c| close_request(c, id, Some(customer_id), RequestStatus::Cancelled, now))
            .await
    }

    async fn expire_request(&self, id: RequestId, now: UnixMs) -> Result<Decision> {
        self.write("expire a request", move |c| close_request(c, id, None, RequestStatus::Expired, now)).await
    }

    async fn request(&self, id: RequestId) -> Result<Option<MedicineRequest>> {
        self.read("read a request", move |c| request_by_id(c, id)).await
    }

    async fn requests_of_customer(&self, customer_id: UserId) -> Result<Vec<MedicineRequest>> {
        self.read("list a customer's requests", move |c| {
            c.prepare_cached(concat!(
                "SELECT ",
                request_columns!(),
                " FROM requests WHERE customer_id = ?1 ORDER BY created_at DESC, id DESC"
            ))?
            .query_map([customer_id], request_row)?
            .collect()
        })
        .await
    }

    async fn responses(&self, request_id: RequestId) -> Result<Vec<PharmacyResponse>> {
        self.read("list a request's responses", move |c| {
            c.prepare_cached(concat!(
                "SELECT ",
                response_columns!(),
                " FROM responses WHERE request_id = ?1 ORDER BY responded_at, id"
            ))?
            .query_map([request_id], response_row)?
            .collect()
        })
        .await
    }

    async fn recipients(&self, request_id: RequestId) -> Result<Vec<Recipient>> {
        self.read("list a request's recipients", move |c| {
            c.prepare_cached(
                "SELECT pharmacy_id, pharmacy_name, lat, lng, distance_km FROM recipients \
                 WHERE request_id = ?1 ORDER BY position",
            )?
            .query_map([request_id], |r| recipient_row(r, 0))?
            .collect()
        })
        .await
    }

    async fn load_live_requests(&self, closed_since: UnixMs) -> Result<Vec<RequestSnapshot>> {
        self.read("load live requests", move |c| load_live_requests(c, closed_since)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn new_user(email: &str) -> NewUser {
        NewUser {
            email: email.into(),
            password_hash: "$argon2id$test".into(),
            name: "Test".into(),
            phone_number: "9800000000".into(),
            role: Role::Customer,
            email_verified: false,
            created_at: 1_000,
        }
    }

    #[test]
    fn histogram_buckets_are_inclusive_upper_bounds() {
        assert_eq!(bucket_of(&BATCH_SIZE_BOUNDS, 0), 0);
        assert_eq!(bucket_of(&BATCH_SIZE_BOUNDS, 1), 0);
        assert_eq!(bucket_of(&BATCH_SIZE_BOUNDS, 2), 1);
        assert_eq!(bucket_of(&BATCH_SIZE_BOUNDS, 3), 2);
        assert_eq!(bucket_of(&BATCH_SIZE_BOUNDS, 1024), BATCH_SIZE_BOUNDS.len() - 1);
        assert_eq!(bucket_of(&BATCH_SIZE_BOUNDS, 1025), BATCH_SIZE_BOUNDS.len(), "past every bound: the last bucket");
    }

    fn user_version(path: &Path) -> i64 {
        let conn = Connection::open(path).unwrap();
        conn.pragma_query_value(None, "user_version", |r| r.get(0)).unwrap()
    }

    /// Holds the writer inside a one-command batch until `release` is sent, so that everything
    /// queued meanwhile is drained into the next batch together.
    async fn hold_writer(store: &SqliteStore) -> (std::sync::mpsc::Sender<()>, tokio::task::JoinHandle<()>) {
        let (release, held) = std::sync::mpsc::channel::<()>();
        let running = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let task = tokio::spawn({
            let store = store.clone();
            let running = Arc::clone(&running);
            async move {
                store
                    .write("hold", move |_| {
                        running.store(true, Ordering::SeqCst);
                        let _ = held.recv();
                        Ok(())
                    })
                    .await
                    .unwrap();
            }
        });
        while !running.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        (release, task)
    }

    /// Commands waiting in the queue.
    fn queued(store: &SqliteStore) -> usize {
        let queue = store.inner.queue.lock();
        let queue = queue.as_ref().unwrap();
        queue.max_capacity() - queue.capacity()
    }

    async fn wait_queued(store: &SqliteStore, n: usize) {
        while queued(store) < n {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    #[tokio::test]
    async fn migrations_run_once_and_set_user_version() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        let store = SqliteStore::open(&path, StoreOptions::default()).unwrap();
        let user = store.insert_user(new_user("a@x.org")).await.unwrap();
        store.shutdown().await;
        drop(store);
        assert_eq!(user_version(&path), MIGRATIONS.len() as i64);

        // A second open finds the schema current, changes nothing and keeps the data.
        let store = SqliteStore::open(&path, StoreOptions::default()).unwrap();
        assert_eq!(user_version(&path), MIGRATIONS.len() as i64);
        assert_eq!(store.user_by_id(user.id).await.unwrap(), Some(user));
        assert_eq!(store.pragmas().await.unwrap(), ("wal".to_string(), 1), "NORMAL: the syncer thread fsyncs");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_syncer_covers_every_acknowledged_write() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SqliteStore::open(&dir.path().join("s.db"), StoreOptions::default()).unwrap());
        let writers: Vec<_> = (0..64)
            .map(|i| {
                let store = store.clone();
                tokio::spawn(async move { store.insert_user(new_user(&format!("u{i}@x.org"))).await.unwrap() })
            })
            .collect();
        for writer in writers {
            writer.await.unwrap();
        }
        let stats = store.stats();
        // Every acknowledged commit was covered by a sync that finished before its answer.
        assert_eq!(store.inner.sync.mark.borrow().synced, stats.commits);
        assert!(stats.syncs >= 1 && stats.syncs <= stats.commits, "{stats:?}");
        // A visible write comes with its durability, which resolves.
        let (user, durable) =
            store.write_visible("insert a user", true, |c| insert_user(c, new_user("late@x.org"))).await.unwrap();
        durable.wait().await.unwrap();
        assert_eq!(store.user_by_id(user.id).await.unwrap(), Some(user));
    }

    #[tokio::test]
    async fn a_failed_sync_acknowledges_nothing_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let shared = SyncShared::new();
        let wal = dir.path().join("missing").join("s.db-wal");
        let syncer = {
            let (shared, counters) = (shared.clone(), Arc::new(Counters::default()));
            std::thread::spawn(move || run_syncer(wal, shared, counters))
        };
        let seq = shared.committed(true);
        assert!(matches!(shared.durable(seq).wait().await, Err(Error::Unavailable(_))));
        syncer.join().unwrap();
        let later = shared.committed(true);
        assert!(matches!(shared.durable(later).wait().await, Err(Error::Unavailable(_))), "sticky");
    }

    #[tokio::test]
    async fn dropping_the_last_handle_stops_the_writer_cleanly() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        let store = SqliteStore::open(&path, StoreOptions::default()).unwrap();
        let clone = store.clone();
        let user = clone.insert_user(new_user("a@x.org")).await.unwrap();
        drop(clone);
        assert!(store.user_by_id(user.id).await.unwrap().is_some(), "one clone is not the last");
        drop(store);
        // Only a connection that closed last and cleanly removes the WAL: the thread has ended.
        assert!(!dir.path().join("s.db-wal").exists());
        let store = SqliteStore::open(&path, StoreOptions::default()).unwrap();
        assert_eq!(store.user_by_id(user.id).await.unwrap(), Some(user));
    }

    #[tokio::test]
    async fn refuses_a_newer_schema() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        drop(SqliteStore::open(&path, StoreOptions::default()).unwrap());
        Connection::open(&path).unwrap().pragma_update(None, "user_version", 99).unwrap();
        let err = SqliteStore::open(&path, StoreOptions::default()).err().unwrap();
        assert_eq!(err.status(), 503);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failing_command_rolls_back_only_itself() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("s.db"), StoreOptions::default()).unwrap();
        let (release, holder) = hold_writer(&store).await;

        let first = tokio::spawn({
            let s = store.clone();
            async move { s.insert_user(new_user("same@x.org")).await }
        });
        wait_queued(&store, 1).await;
        let second = tokio::spawn({
            let s = store.clone();
            async move { s.insert_user(new_user("same@x.org")).await }
        });
        wait_queued(&store, 2).await;
        let third = tokio::spawn({
            let s = store.clone();
            async move { s.insert_user(new_user("other@x.org")).await }
        });
        wait_queued(&store, 3).await;
        release.send(()).unwrap();
        holder.await.unwrap();

        let first = first.await.unwrap().unwrap();
        assert!(matches!(second.await.unwrap(), Err(Error::Conflict(_))));
        let third = third.await.unwrap().unwrap();
        let stats = store.stats();
        assert_eq!(stats.last_batch, 3, "the three commands shared one batch");
        assert_eq!(stats.commits, 2);
        assert_eq!(stats.writes, 4);
        let histograms = store.commit_histograms();
        let batches = &histograms.batch_size;
        assert_eq!(batches.counts.len(), BATCH_SIZE_BOUNDS.len() + 1);
        assert_eq!((batches.counts[0], batches.counts[2], batches.sum), (1, 1, 4), "one batch of 1, one of 3 (≤ 4)");
        assert_eq!(batches.counts.iter().sum::<u64>(), 2);
        assert_eq!(histograms.commit_micros.counts.iter().sum::<u64>(), 2, "one commit time per batch");
        assert_eq!(store.user_by_id(first.id).await.unwrap(), Some(first));
        assert_eq!(store.user_by_id(third.id).await.unwrap(), Some(third));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_commit_answers_the_whole_batch_unavailable() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("s.db"), StoreOptions::default()).unwrap();
        let (release, holder) = hold_writer(&store).await;

        let innocent = tokio::spawn({
            let s = store.clone();
            async move { s.insert_user(new_user("innocent@x.org")).await }
        });
        wait_queued(&store, 1).await;
        // A deferred foreign-key violation passes every statement and fails only at COMMIT.
        let culprit = tokio::spawn({
            let s = store.clone();
            async move {
                s.write("violate", |c| {
                    c.execute_batch(
                        "PRAGMA defer_foreign_keys = ON; \
                         INSERT INTO pharmacies (user_id, name, lat, lng, approved, created_at) \
                         VALUES (4242, 'ghost', 0, 0, 1, 0);",
                    )
                    .map_err(|e| Error::store("test", e))
                })
                .await
            }
        });
        wait_queued(&store, 2).await;
        release.send(()).unwrap();
        holder.await.unwrap();

        assert!(matches!(innocent.await.unwrap(), Err(Error::Unavailable(_))));
        assert!(matches!(culprit.await.unwrap(), Err(Error::Unavailable(_))));
        assert_eq!(store.stats().failed_batches, 1);
        assert_eq!(store.user_by_email("innocent@x.org").await.unwrap(), None);
        // The writer carries on with the next batch.
        store.insert_user(new_user("innocent@x.org")).await.unwrap();
        assert!(store.user_by_email("innocent@x.org").await.unwrap().is_some());
    }

    #[tokio::test]
    async fn shutdown_commits_what_was_acknowledged_and_refuses_later_writes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        let store = SqliteStore::open(&path, StoreOptions::default()).unwrap();
        let user = store.insert_user(new_user("a@x.org")).await.unwrap();
        store.shutdown().await;
        store.shutdown().await;
        let wal = std::fs::metadata(dir.path().join("s.db-wal")).map_or(0, |m| m.len());
        assert_eq!(wal, 0, "the log was folded into the main file");
        assert!(matches!(store.insert_user(new_user("b@x.org")).await, Err(Error::Unavailable(_))));
        assert_eq!(store.user_by_id(user.id).await.unwrap(), Some(user));
    }

    #[tokio::test]
    async fn invalid_rows_are_store_errors_not_panics() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        let store = SqliteStore::open(&path, StoreOptions::default()).unwrap();
        let (_, pharmacy) = store
            .insert_pharmacy_user(
                NewUser { role: Role::Pharmacy, ..new_user("p@x.org") },
                NewPharmacy { name: "P".into(), location: LatLng::new(1.0, 2.0).unwrap(), approved: true },
            )
            .await
            .unwrap();
        store
            .write("corrupt", move |c| {
                // The schema has no CHECK on coordinates: the type `LatLng` is the check.
                c.execute("UPDATE pharmacies SET lat = 123 WHERE id = ?1", [pharmacy.id])
                    .map_err(|e| Error::store("test", e))
            })
            .await
            .unwrap();
        assert!(matches!(store.load_pharmacies().await, Err(Error::Unavailable(_))));
        assert!(matches!(store.pharmacy_by_id(pharmacy.id).await, Err(Error::Unavailable(_))));
    }
}

/// Start-up load times at the design's scale. Slow to set up, so run on demand, in release:
/// `cargo test --release -p sanjevani-engine --lib -- --ignored --nocapture startup_loads`
#[cfg(test)]
mod startup_tests {
    use super::*;

    const PHARMACIES: i64 = 1_000_000;
    const LIVE: i64 = 10_000;
    const CLOSED_LONG_AGO: i64 = 50_000;
    const PER_REQUEST: i64 = 50;

    /// Fills the file directly: going through the queue would time the writer, not the loads.
    fn fill(path: &Path) {
        let mut conn = Connection::open(path).unwrap();
        conn.pragma_update(None, "synchronous", "OFF").unwrap();
        let tx = conn.transaction().unwrap();
        {
            let mut user = tx
                .prepare(
                    "INSERT INTO users (id, email, password_hash, name, phone_number, role, \
                     email_verified, created_at) VALUES (?1, ?2, 'h', 'n', 'p', 'PHARMACY', 0, 0)",
                )
                .unwrap();
            let mut pharmacy = tx
                .prepare(
                    "INSERT INTO pharmacies (id, user_id, name, lat, lng, approved, created_at) \
                     VALUES (?1, ?1, ?2, ?3, ?4, 1, 0)",
                )
                .unwrap();
            for id in 1..=PHARMACIES {
                user.execute(params![id, format!("p{id}@x.org")]).unwrap();
                let (lat, lng) = (27.0 + (id % 1000) as f64 / 1000.0, 85.0 + (id / 1000) as f64 / 1000.0);
                pharmacy.execute(params![id, format!("Pharmacy {id}"), lat, lng]).unwrap();
            }
            let mut request = tx
                .prepare(
                    "INSERT INTO requests (id, customer_id, patient_name, patient_phone, lat, lng, \
                     radius_km, quantity, status, created_at, expires_at, closed_at) \
                     VALUES (?1, 1, 'n', 'p', 27.5, 85.5, 5, 1, ?2, 0, 0, ?3)",
                )
                .unwrap();
            let mut recipient = tx
                .prepare(
                    "INSERT INTO recipients (request_id, pharmacy_id, position, pharmacy_name, \
                     lat, lng, distance_km) VALUES (?1, ?2, ?3, 'Pharmacy', 27.5, 85.5, ?4)",
                )
                .unwrap();
            // Old closed requests first, then the live ones, as in a real file.
            for id in 1..=CLOSED_LONG_AGO + LIVE {
                let (status, closed_at) = if id <= CLOSED_LONG_AGO { ("EXPIRED", Some(1)) } else { ("PENDING", None) };
                request.execute(params![id, status, closed_at]).unwrap();
                for position in 0..PER_REQUEST {
                    let pharmacy = (id * 7919 + position * 104_729) % PHARMACIES + 1;
                    recipient.execute(params![id, pharmacy, position, position as f64 / 10.0]).unwrap();
                }
            }
        }
        tx.commit().unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "builds a 1M-pharmacy file; run in release"]
    async fn startup_loads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big.db");
        drop(SqliteStore::open(&path, StoreOptions::default()).unwrap());
        let started = Instant::now();
        fill(&path);
        eprintln!("filled in {:?}", started.elapsed());

        let store = SqliteStore::open(&path, StoreOptions::default()).unwrap();
        let plan = store
            .read("plan", |c| {
                let mut s = c.prepare(
                    "EXPLAIN QUERY PLAN SELECT rc.request_id FROM requests q \
                     JOIN recipients rc ON rc.request_id = q.id WHERE q.status = 'PENDING' \
                     UNION ALL SELECT rc.request_id FROM requests q \
                     JOIN recipients rc ON rc.request_id = q.id WHERE q.closed_at >= ?1",
                )?;
                s.query_map([0], |r| r.get::<_, String>(3))?.collect::<rusqlite::Result<Vec<_>>>()
            })
            .await
            .unwrap();
        eprintln!("recipients plan: {plan:#?}");

        // Warm the page cache once, as the design's start-up figure assumes.
        store.load_pharmacies().await.unwrap();
        let started = Instant::now();
        let pharmacies = store.load_pharmacies().await.unwrap();
        let pharmacies_time = started.elapsed();
        assert_eq!(pharmacies.len() as i64, PHARMACIES);

        store.load_live_requests(2).await.unwrap();
        let started = Instant::now();
        let live = store.load_live_requests(2).await.unwrap();
        let live_time = started.elapsed();
        assert_eq!(live.len() as i64, LIVE);
        assert!(live.iter().all(|s| s.recipients.len() as i64 == PER_REQUEST));
        assert!(live.iter().all(|s| { s.recipients.is_sorted_by(|a, b| a.distance_km <= b.distance_km) }));

        eprintln!("load_pharmacies: {pharmacies_time:?}; load_live_requests: {live_time:?}");
        assert!(pharmacies_time < Duration::from_secs(1));
        assert!(live_time < Duration::from_secs(1));
    }
}
