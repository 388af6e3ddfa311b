//! What the pharmacy index costs besides a query, on the benchmark's 1M-pharmacy city:
//!
//! - `bulk_load` and `replace_all` of 1M cards (the server's start-up path), best of three;
//! - one `upsert` moving a pharmacy, median and p99 of 10,000 distinct ones, each timed alone; the 10,000th
//!   crosses the rebuild threshold (1% of 1M) and starts a background rebuild;
//! - a 1 km `within` with an empty overlay and with 9,999 changes pending, median of 20 rounds
//!   over the 1,024 benchmark centres.
//!
//! Run: `cargo run --release -p sanjevani-bench --example index_costs`.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sanjevani_bench::{CENTRES_SEED, CITY_SEED, cards, city, offset_km, query_centres};
use sanjevani_engine::geo::LatLng;
use sanjevani_engine::index::{PharmacyCard, PharmacyIndex};
use std::hint::black_box;
use std::time::{Duration, Instant};

const N: usize = 1_000_000;
const UPSERTS: usize = 10_000;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Median time of one query over `rounds` passes through `centres`.
fn query_median(index: &PharmacyIndex, centres: &[LatLng], rounds: usize) -> Duration {
    let mut per_query: Vec<Duration> = (0..rounds)
        .map(|_| {
            let started = Instant::now();
            for centre in centres {
                black_box(index.within(black_box(*centre), 1.0));
            }
            started.elapsed() / centres.len() as u32
        })
        .collect();
    per_query.sort();
    percentile(&per_query, 0.5)
}

fn main() {
    let points = city(N, CITY_SEED);
    let all = cards(&points);
    let centres = query_centres(1024, CENTRES_SEED);

    let best_of = |f: &dyn Fn() -> Duration| (0..3).map(|_| f()).min().unwrap_or_default();
    let bulk = best_of(&|| {
        let batch = all.clone();
        let started = Instant::now();
        let index = PharmacyIndex::bulk_load(batch);
        let took = started.elapsed();
        drop(black_box(index));
        took
    });
    let replace = best_of(&|| {
        let index = PharmacyIndex::default();
        let batch = all.clone();
        let started = Instant::now();
        index.replace_all(batch);
        started.elapsed()
    });
    println!("bulk_load of {N}: {bulk:.2?}; replace_all of {N}: {replace:.2?} (best of 3)");

    let index = PharmacyIndex::bulk_load(all.clone());
    let quiet = query_median(&index, &centres, 20);

    let mut rng = StdRng::seed_from_u64(7);
    let moves: Vec<PharmacyCard> = rand::seq::index::sample(&mut rng, N, UPSERTS)
        .into_iter()
        .map(|i| {
            let mut card = all[i].clone();
            let (lat, lng) = offset_km(rng.random_range(-50.0..50.0), rng.random_range(-50.0..50.0));
            card.location = LatLng::new(lat, lng).expect("inside the box");
            card
        })
        .collect();
    let mut took = Vec::with_capacity(UPSERTS);
    for (n, card) in moves.into_iter().enumerate() {
        if n == UPSERTS - 1 {
            // All changes but the one that triggers the rebuild are pending: time queries now.
            let pending = query_median(&index, &centres, 20);
            println!("within 1 km: {quiet:.2?} with an empty overlay, {pending:.2?} with {n} pending changes");
        }
        let started = Instant::now();
        index.upsert(card);
        took.push(started.elapsed());
    }
    let last = took.last().copied().unwrap_or_default();
    took.sort();
    println!(
        "upsert (move) into {N}: median {:.2?}, p99 {:.2?}, max {:.2?}; the one that starts the rebuild {last:.2?}",
        percentile(&took, 0.5),
        percentile(&took, 0.99),
        percentile(&took, 1.0),
    );
}
