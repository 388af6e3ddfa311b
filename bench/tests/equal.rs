//! The radius benchmarks compare like with like only if the R*-tree and the seed's linear scan
//! give the same answer. This checks it on the benchmark's own fixtures: 100,000 pharmacies in
//! the 100 km box and 200 seeded centres, same ids in the same order (nearest first, ties by id)
//! and the same distances to a micrometre.

use sanjevani_bench::{CENTRES_SEED, CITY_SEED, cards, city, query_centres};
use sanjevani_engine::geo::haversine_raw_km;
use sanjevani_engine::index::{PharmacyIndex, linear_scan};
use sanjevani_engine::model::PharmacyId;

const RADIUS_KM: f64 = 1.0;
/// 1 mm: a pharmacy this close to the edge may fall either side in floating point.
const EDGE_KM: f64 = 1e-6;
/// Distances agree to 1e-6 km; the two formulas differ only by rounding.
const DISTANCE_TOLERANCE_KM: f64 = 1e-6;

#[test]
fn rtree_and_linear_scan_agree_on_the_bench_city() {
    let points = city(100_000, CITY_SEED);
    let index = PharmacyIndex::bulk_load(cards(&points));
    let centres = query_centres(200, CENTRES_SEED);

    let (mut total_hits, mut near_edge) = (0, 0);
    for (n, centre) in centres.iter().enumerate() {
        let away_from_edge = |&(id, _): &(PharmacyId, f64)| {
            let (_, lat, lng) = points[id as usize];
            let d = haversine_raw_km(centre.lat(), centre.lng(), lat, lng);
            (d - RADIUS_KM).abs() > EDGE_KM
        };
        let tree: Vec<_> = index.within(*centre, RADIUS_KM).into_iter().filter(away_from_edge).collect();
        let all = linear_scan(&points, *centre, RADIUS_KM);
        let total = all.len();
        let scan: Vec<_> = all.into_iter().filter(away_from_edge).collect();
        near_edge += total - scan.len();

        let ids = |hits: &[(PharmacyId, f64)]| hits.iter().map(|h| h.0).collect::<Vec<_>>();
        assert_eq!(ids(&tree), ids(&scan), "centre #{n} {centre:?}");
        for (t, s) in tree.iter().zip(&scan) {
            assert!(
                (t.1 - s.1).abs() < DISTANCE_TOLERANCE_KM,
                "centre #{n}, pharmacy {}: tree {} km, scan {} km",
                t.0,
                t.1,
                s.1
            );
        }
        total_hits += scan.len();
    }

    // 10 pharmacies per km², so about π·1² · 10 ≈ 31 per query (a little fewer near the box's
    // edges). Far off means the km-to-degree conversion of the fixture is wrong.
    let mean = total_hits as f64 / centres.len() as f64;
    println!(
        "{} centres, {total_hits} hits (mean {mean:.1}), {near_edge} within 1 mm of the edge left out",
        centres.len()
    );
    assert!((25.0..38.0).contains(&mean), "mean hits {mean}");
}
