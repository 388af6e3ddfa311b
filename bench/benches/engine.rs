//! Criterion benchmarks of the engine's hot paths, with ids that tools parse:
//!
//! - `radius_query/{rtree,scan}/N`: the R*-tree's radius query against the seed's linear
//!   Haversine scan, 1 km around seeded centres in a 100 km box of N pharmacies. Both return the
//!   same nearest-first list (the bench crate's `equal` test checks that), so the ratio is the
//!   gain of the index alone.
//! - `fanout/hub/K`: one `new_request` rendered once, patched with each of K pharmacies' own
//!   distance and queued on their connections, every queue drained and every message written to
//!   a buffer within the iteration, so the figure is the cost of delivery, not of a slow-client cut.
//!
//! Still to come, when the store and the lifecycle land: `store/group_commit/1000` and
//! `store/txn_per_write/1000` (1,000 concurrent durable request creates, group commit against one
//! transaction per create), and `lifecycle/accept_race/20` (20 pharmacies accepting one request at
//! once, first-accept-wins). The settings below keep this file's groups near one minute so that
//! the whole `cargo bench` stays well under ten on a 2-core machine once those are added.

use criterion::{BenchmarkId, Criterion, SamplingMode, criterion_group, criterion_main};
use sanjevani_bench::{CENTRES_SEED, CITY_SEED, NewRequestFixture, cards, city, query_centres, recipients};
use sanjevani_engine::hub::{Audience, Fanout, Hub, Outbound};
use sanjevani_engine::index::{PharmacyIndex, linear_scan};
use std::cell::OnceCell;
use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

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

criterion_group!(benches, radius_query, fanout);
criterion_main!(benches);
