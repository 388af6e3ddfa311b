//! Criterion benchmarks of the engine's hot paths, with ids that tools parse:
//!
//! - `radius_query/{rtree,scan}/N`: the R*-tree's radius query against the seed's linear
//!   Haversine scan, 1 km around seeded centres in a 100 km box of N pharmacies. Both return the
//!   same nearest-first list (the bench crate's `equal` test checks that), so the ratio is the
//!   gain of the index alone.
//! - `fanout/hub/K`: one `new_request` rendered once, patched with each of K pharmacies' own
//!   distance and queued on their connections, every queue drained and every message written to
//!   a buffer within the iteration, so the figure is the cost of delivery, not of a slow-client cut.
//! - `store/{group_commit,txn_per_write}/1000`: 1,000 concurrent durable request creates, each
//!   `Store::create_request` with 10 recipients (exactly what `POST /medicine/request/` writes),
//!   against `SqliteStore` on a real file with `synchronous=FULL`: 1,000 tasks on a 2-worker
//!   runtime each await one create, and the iteration ends when all are acknowledged (committed
//!   and fsynced). `group_commit` is the store as the server opens it (`max_batch` 1024);
//!   `txn_per_write` is `max_batch: 1`, one transaction and one fsync per create. Throughput is
//!   in creates/s. One store per bench, so the file grows across iterations, as it would live.
//!   Each prints, on stderr, the creates per COMMIT and the time in COMMIT that it saw.
//! - `lifecycle/accept_race/20`: one request created through `Lifecycle::create` reaching 20
//!   approved pharmacies, then 20 concurrent `Lifecycle::respond(ACCEPTED)`; each round checks
//!   there is exactly one winner. SQLite on a temp file, a hub with no subscribers.
//!
//! Every group is sized so that the whole `cargo bench -p sanjevani-bench` stays under ten
//! minutes on a 2-core machine: the slow ones (big scans, durable writes) take 10 flat samples.

use criterion::{BenchmarkId, Criterion, SamplingMode, Throughput, criterion_group, criterion_main};
use sanjevani_bench::{
    CENTRES_SEED, CITY_SEED, NewRequestFixture, PHARMACY_NAMES, cards, city, offset_km, query_centres, recipients,
    request_creates,
};
use sanjevani_engine::Error;
use sanjevani_engine::accounts;
use sanjevani_engine::clock::now_ms;
use sanjevani_engine::error::ALREADY_ASSIGNED;
use sanjevani_engine::geo::{LatLng, RadiusKm};
use sanjevani_engine::hub::{Audience, Fanout, Hub, Outbound};
use sanjevani_engine::index::{PharmacyIndex, linear_scan};
use sanjevani_engine::lifecycle::{Lifecycle, LifecycleConfig, RequestInput, ResponseInput};
use sanjevani_engine::message::PlainMediaUrls;
use sanjevani_engine::model::{Created, NewPharmacy, NewUser, Pharmacy, RequestId, ResponseType, Role, User};
use sanjevani_engine::store::{SqliteStore, Store, StoreOptions};
use std::cell::OnceCell;
use std::fmt::Write as _;
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::runtime::Runtime;

/// City sizes for the radius query.
const CITY_SIZES: [usize; 4] = [1_000, 10_000, 100_000, 1_000_000];
/// Query radius, km: the smallest a customer may choose, the common case.
const RADIUS_KM: f64 = 1.0;
/// Centres the queries rotate through, so no single lucky or unlucky centre sets the figure.
/// A power of two, so the rotation is a mask.
const CENTRES: usize = 1024;
/// Receivers per broadcast.
const RECEIVERS: [usize; 4] = [1, 100, 1_000, 10_000];
/// Each connection's queue: far more than one iteration queues, so nothing is ever cut as slow.
const QUEUE_CAPACITY: usize = 1024;
/// Seed of the recipients' distances.
const RECIPIENTS_SEED: u64 = 10_000;
/// Concurrent creates per store iteration.
const WRITERS: usize = 1_000;
/// Recipients per create.
const RECIPIENTS_PER_CREATE: usize = 10;
/// Seed of the creates.
const CREATES_SEED: u64 = 1_000_003;
/// Whether the store benchmarks' creates carry an `Idempotency-Key`.
const IDEMPOTENCY_KEYS: bool = false;
/// Pharmacies racing to accept one request.
const RACERS: usize = 20;
/// Tokio workers: the machine's two cores, as the server runs.
const WORKERS: usize = 2;

/// The runtime the async groups run on: multi-threaded with two workers, like the server.
fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(WORKERS).enable_all().build().expect("a tokio runtime")
}

fn radius_query(c: &mut Criterion) {
    let centres = query_centres(CENTRES, CENTRES_SEED);
    let mut group = c.benchmark_group("radius_query");
    for n in CITY_SIZES {
        // Built on first use, so a filtered run (`cargo bench -- fanout`) skips the big cities.
        let points_cell = OnceCell::new();
        let points = || points_cell.get_or_init(|| city(n, CITY_SEED));
        let index_cell = OnceCell::new();
        let index = || index_cell.get_or_init(|| PharmacyIndex::bulk_load(cards(points())));

        group
            .sampling_mode(SamplingMode::Auto)
            .sample_size(50)
            .warm_up_time(Duration::from_millis(1000))
            .measurement_time(Duration::from_secs(3));
        group.bench_function(BenchmarkId::new("rtree", n), |b| {
            let index = index();
            let mut i = 0;
            b.iter(|| {
                let centre = centres[i & (CENTRES - 1)];
                i += 1;
                index.within(black_box(centre), black_box(RADIUS_KM))
            });
        });

        // A scan of 100k pharmacies takes milliseconds and of 1M tens of milliseconds: criterion's
        // default 100 linearly growing samples would take minutes, so take 10 flat samples.
        if n >= 100_000 {
            group.sampling_mode(SamplingMode::Flat).sample_size(10);
        }
        group.bench_function(BenchmarkId::new("scan", n), |b| {
            let points = points();
            let mut i = 0;
            b.iter(|| {
                let centre = centres[i & (CENTRES - 1)];
                i += 1;
                linear_scan(black_box(points), black_box(centre), black_box(RADIUS_KM))
            });
        });
    }
    group.finish();
}

fn fanout(c: &mut Criterion) {
    let request = NewRequestFixture::default();
    let mut group = c.benchmark_group("fanout");
    group.sample_size(50).warm_up_time(Duration::from_millis(1000)).measurement_time(Duration::from_secs(3));
    for k in RECEIVERS {
        let hub = Hub::new(QUEUE_CAPACITY);
        let connections: Vec<_> = (0..k).map(|i| hub.subscribe(Audience::Pharmacy(i as i64))).collect();
        let to = recipients(k, RECIPIENTS_SEED);
        group.bench_with_input(BenchmarkId::new("hub", k), &to, |b, to| {
            let mut batch: Vec<Outbound> = Vec::with_capacity(4);
            let mut frame: Vec<u8> = Vec::with_capacity(1024);
            b.iter(|| {
                let template = Arc::new(black_box(&request).render_template());
                let queued = hub.send_patched(&template, to);
                // What each connection's writer task does: take its queue, write each frame.
                let mut written = 0;
                for connection in &connections {
                    connection.try_recv(&mut batch);
                    for msg in batch.drain(..) {
                        frame.clear();
                        msg.write_to(&mut frame);
                        written += black_box(&frame).len();
                    }
                }
                assert_eq!(queued, k);
                written
            });
        });
    }
    group.finish();
}

fn store(c: &mut Criterion) {
    let runtime = runtime();
    // Built once and cloned per iteration outside the timed part: the figure is the store's.
    // Without idempotency keys: a create is its request row and 10 recipient rows, DESIGN.md's
    // target. (A keyed create adds a look-up first; `IDEMPOTENCY_KEYS` switches it on.)
    let creates = request_creates(WRITERS, RECIPIENTS_PER_CREATE, IDEMPOTENCY_KEYS, CREATES_SEED, now_ms());
    let mut group = c.benchmark_group("store");
    // One transaction per create runs ~3,500 creates/s here, ~0.3 s an iteration: criterion's
    // 100 linearly growing samples would take over ten minutes, so take 10 flat samples (at
    // least one iteration each). 20 s of measuring is ~70 rounds of 1,000 creates for
    // txn_per_write and several hundred for group commit; with warm-up, ~25 s each.
    group
        .sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .warm_up_time(Duration::from_secs(3))
        .measurement_time(Duration::from_secs(20))
        .throughput(Throughput::Elements(WRITERS as u64));
    // The product: batches, the WAL fsynced by the syncer thread behind the writer. The baseline:
    // one transaction per write, fsynced inside its COMMIT (synchronous=FULL).
    let product = StoreOptions::default();
    let baseline = StoreOptions { max_batch: 1, background_sync: false, ..StoreOptions::default() };
    for (name, options, synchronous_wanted) in [("group_commit", product, 1), ("txn_per_write", baseline, 2)] {
        let dir = tempfile::tempdir().expect("a temp dir");
        let store = SqliteStore::open(&dir.path().join("bench.db"), options).expect("open the store");
        let (journal_mode, synchronous) = runtime.block_on(store.pragmas()).expect("read pragmas");
        assert_eq!((journal_mode.as_str(), synchronous), ("wal", synchronous_wanted), "WAL, NORMAL or FULL");
        let before = store.stats();
        let mut rounds = 0u64;
        group.bench_function(BenchmarkId::new(name, WRITERS), |b| {
            b.iter_custom(|iters| {
                let mut elapsed = Duration::ZERO;
                for _ in 0..iters {
                    // Each round is new requests: the time now and, if keyed, fresh keys (a
                    // repeated key would make the store answer `Existing` and write nothing).
                    rounds += 1;
                    let now = now_ms();
                    let round: Vec<_> = creates
                        .iter()
                        .cloned()
                        .map(|(mut req, to)| {
                            (req.created_at, req.expires_at) = (now, now + 15 * 60 * 1000);
                            if let Some(key) = &mut req.idempotency_key {
                                write!(key, "-{rounds}").expect("writing to a String cannot fail");
                            }
                            (req, to)
                        })
                        .collect();
                    elapsed += runtime.block_on(async {
                        let start = Instant::now();
                        let tasks: Vec<_> = round
                            .into_iter()
                            .map(|(req, to)| {
                                let store = store.clone();
                                tokio::spawn(async move { store.create_request(req, to).await })
                            })
                            .collect();
                        for task in tasks {
                            let created = task.await.expect("a create task").expect("a durable create");
                            assert!(matches!(created, Created::New(_)), "every create is a new request");
                        }
                        start.elapsed()
                    });
                }
                elapsed
            });
        });
        let stats = store.stats();
        runtime.block_on(store.shutdown());
        if rounds > 0 {
            // What group commit did, to check against the figure (and against an strace count
            // of fsyncs): creates per COMMIT, and the COMMIT's own time, where the fsync is.
            let (writes, commits) = (stats.writes - before.writes, stats.commits - before.commits);
            assert_eq!(writes, rounds * WRITERS as u64, "every create was one write");
            eprintln!(
                "store/{name}: {writes} creates in {commits} commits ({:.1} per commit, {:.0} µs in COMMIT each)",
                writes as f64 / commits.max(1) as f64,
                (stats.total_commit_micros - before.total_commit_micros) as f64 / commits.max(1) as f64,
            );
        }
    }
    group.finish();
}

/// An account with a placeholder hash: the race never logs in.
fn bench_user(email: String, name: String, role: Role) -> NewUser {
    NewUser {
        email,
        password_hash: "$argon2id$v=19$m=19456,t=2,p=1$not-used-in-benchmarks".into(),
        name,
        phone_number: "9841000000".into(),
        role,
        email_verified: true,
        created_at: now_ms(),
    }
}

/// A lifecycle over SQLite on a temp file, a hub nobody listens to, and `RACERS` approved
/// pharmacies within 1 km of the box's centre (in the index and the store, as registration puts
/// them), plus the customer who posts.
async fn race_world(dir: &tempfile::TempDir) -> (SqliteStore, Lifecycle, User, Vec<Pharmacy>) {
    let store = SqliteStore::open(&dir.path().join("race.db"), StoreOptions::default()).expect("open the store");
    let customer = store
        .insert_user(bench_user("sita@example.com".into(), "Sita Shrestha".into(), Role::Customer))
        .await
        .expect("insert the customer");
    let mut pharmacies = Vec::with_capacity(RACERS);
    for i in 0..RACERS {
        let (lat, lng) = offset_km(0.04 * i as f64, 0.03 * i as f64);
        let name = format!("{}, Baneshwor", PHARMACY_NAMES[i % PHARMACY_NAMES.len()]);
        let pharmacy =
            NewPharmacy { name: name.clone(), location: LatLng::new(lat, lng).expect("in the box"), approved: true };
        let (_, p) = store
            .insert_pharmacy_user(bench_user(format!("racer{i}@example.com"), name, Role::Pharmacy), pharmacy)
            .await
            .expect("insert a pharmacy");
        pharmacies.push(p);
    }
    let index = Arc::new(PharmacyIndex::bulk_load(pharmacies.iter().map(accounts::card).collect()));
    let hub: Arc<dyn Fanout> = Hub::new(QUEUE_CAPACITY);
    let lifecycle =
        Lifecycle::start(Arc::new(store.clone()), hub, index, Arc::new(PlainMediaUrls), LifecycleConfig::default())
            .await
            .expect("start the lifecycle");
    (store, lifecycle, customer, pharmacies)
}

/// One round: create a request that reaches every racer, then all accept at once. Returns the
/// request and how many won.
async fn accept_round(lifecycle: &Lifecycle, customer: &User, racers: &[Pharmacy]) -> (RequestId, usize) {
    let (lat, lng) = offset_km(0.0, 0.0);
    let input = RequestInput {
        location: LatLng::new(lat, lng).expect("the box's centre"),
        radius: RadiusKm::new(2.0).expect("a valid radius"),
        quantity: 10,
        medicine_name: Some("Amoxicillin 500 mg".into()),
        note: Some("Needed tonight, generic is fine.".into()),
        image: None,
        idempotency_key: None,
    };
    let created = lifecycle.create(customer, input, "http://localhost:8000").await.expect("create");
    assert_eq!(created.pharmacies_notified, racers.len());
    let id = created.request.id;
    let tasks: Vec<_> = racers
        .iter()
        .cloned()
        .map(|p| {
            let lifecycle = lifecycle.clone();
            tokio::spawn(async move {
                let answer = ResponseInput {
                    request_id: id,
                    response_type: ResponseType::Accepted,
                    text_message: Some("In stock, ready in 10 minutes".into()),
                    audio: None,
                };
                lifecycle.respond(&p, answer, "http://localhost:8000").await
            })
        })
        .collect();
    let mut winners = 0;
    for task in tasks {
        match task.await.expect("a respond task") {
            Ok(_) => winners += 1,
            Err(e) => assert_eq!(e, Error::invalid(ALREADY_ASSIGNED), "a loser is told it is taken"),
        }
    }
    (id, winners)
}

fn lifecycle(c: &mut Criterion) {
    let runtime = runtime();
    let dir = tempfile::tempdir().expect("a temp dir");
    let (store, lifecycle, customer, racers) = runtime.block_on(race_world(&dir));
    let mut group = c.benchmark_group("lifecycle");
    // A round is two fsynced commits (the create, then the winning accept; losers that reach
    // the store write nothing), well under a millisecond: 10 flat samples over 5 s are
    // thousands of rounds.
    group
        .sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .warm_up_time(Duration::from_secs(2))
        .measurement_time(Duration::from_secs(5));
    group.bench_function(BenchmarkId::new("accept_race", RACERS), |b| {
        b.iter_custom(|iters| {
            runtime.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    let (id, winners) = accept_round(&lifecycle, &customer, &racers).await;
                    assert_eq!(winners, 1, "exactly one winner for request {id}");
                }
                start.elapsed()
            })
        });
    });
    group.finish();
    drop(lifecycle);
    runtime.block_on(store.shutdown());
}

criterion_group!(benches, radius_query, fanout, store, lifecycle);
criterion_main!(benches);
