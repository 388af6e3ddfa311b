//! What a run will do, decided before it starts: the city from `tokens.json`, a seeded pool of
//! request locations with their radii, and for each location the pharmacies the generator
//! expects to be notified — computed here with the generator's own Haversine over the pharmacies
//! it holds sockets for, never with the engine's index, so that a fault in the index cannot hide
//! behind an oracle that shares it. A pharmacy within 1 m of the radius's edge may fall either
//! side in floating point and is counted as "either".
//!
//! Request locations follow the city: each is a random pharmacy's location moved by up to 1 km,
//! so dense districts get more requests, as they would. With `--recipients ~N` the radius of a
//! location is halfway between its N-th and (N+1)-th nearest pharmacy (1–50 km), so the server
//! notifies about N pharmacies everywhere; with `--radius` it is fixed.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Deserialize;

/// Earth radius of the API's Haversine, km.
pub const EARTH_RADIUS_KM: f64 = 6371.0;
/// Pharmacies this close to the edge of the radius (1 m) count as "either".
pub const EDGE_KM: f64 = 0.001;
/// Radius limits of the API.
pub const MIN_RADIUS_KM: f64 = 1.0;
/// Radius limits of the API.
pub const MAX_RADIUS_KM: f64 = 50.0;
/// At most this many pharmacies are scanned to choose a radius (a uniform sample of a bigger city).
const RADIUS_SAMPLE: usize = 50_000;

/// `tokens.json` as `generate-city` writes it (unknown fields ignored).
#[derive(Debug, Deserialize)]
pub struct Tokens {
    /// Where the server was meant to run, if the generator was told.
    #[serde(default)]
    pub base_url: Option<String>,
    /// The city's parameters; `pharmacies` is the city's full size when only a sample is listed.
    #[serde(default)]
    pub city: Option<CityInfo>,
    /// Customers with access tokens.
    pub customers: Vec<Customer>,
    /// Pharmacies with access tokens, in generation order (a uniform sample of the city).
    pub pharmacies: Vec<PharmacyEntry>,
}

/// The part of the city's parameters the generator uses.
#[derive(Debug, Deserialize)]
pub struct CityInfo {
    /// Pharmacies in the whole city.
    pub pharmacies: usize,
}

/// A customer account.
#[derive(Debug, Deserialize)]
pub struct Customer {
    /// Access token.
    pub access: String,
}

/// A pharmacy and its owner's access token.
#[derive(Debug, Deserialize)]
pub struct PharmacyEntry {
    /// Pharmacy id.
    pub pharmacy_id: i64,
    /// Latitude.
    pub lat: f64,
    /// Longitude.
    pub lng: f64,
    /// Access token.
    pub access: String,
}

/// Great-circle distance in km (Haversine, R = 6371 km), the generator's own.
pub fn haversine_km(lat1: f64, lng1: f64, lat2: f64, lng2: f64) -> f64 {
    let (p1, p2) = (lat1.to_radians(), lat2.to_radians());
    let dp = (lat2 - lat1).to_radians();
    let dl = (lng2 - lng1).to_radians();
    let a = (dp / 2.0).sin().powi(2) + p1.cos() * p2.cos() * (dl / 2.0).sin().powi(2);
    2.0 * EARTH_RADIUS_KM * a.sqrt().atan2((1.0 - a).sqrt())
}

/// How each request's radius is chosen.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RadiusChoice {
    /// The same radius for every request, km.
    Fixed(f64),
    /// About this many recipients per request.
    Recipients(usize),
}

/// A request location and what the generator expects of it.
#[derive(Debug, Clone)]
pub struct Spot {
    /// Patient latitude.
    pub lat: f64,
    /// Patient longitude.
    pub lng: f64,
    /// Radius sent, km (rounded to a millimetre so JSON carries it exactly).
    pub radius_km: f64,
    /// Held pharmacies (indices into the token list) certainly inside, ascending.
    pub definite: Vec<u32>,
    /// Held pharmacies within 1 m of the edge, ascending.
    pub either: Vec<u32>,
    /// Over every listed pharmacy (when the list is the whole city): (certainly inside, either).
    pub listed: Option<(usize, usize)>,
}

/// Whether a pharmacy is expected to hear of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// Inside the radius.
    Definite,
    /// Within 1 m of the edge.
    Either,
    /// Outside.
    Outside,
}

impl Spot {
    /// What `pharmacy` (an index into the token list) should see.
    pub fn expect(&self, pharmacy: u32) -> Expect {
        if self.definite.binary_search(&pharmacy).is_ok() {
            Expect::Definite
        } else if self.either.binary_search(&pharmacy).is_ok() {
            Expect::Either
        } else {
            Expect::Outside
        }
    }
}

/// Rounded to a millimetre.
fn round_mm(km: f64) -> f64 {
    (km * 1e6).round() / 1e6
}

/// Builds `size` seeded spots over the listed pharmacies; `held` is how many of them (the first
/// ones) have sockets; `city_total` is the city's full size. Runs on `threads` threads.
pub fn build_spots(
    pharmacies: &[PharmacyEntry],
    held: usize,
    city_total: usize,
    size: usize,
    seed: u64,
    choice: RadiusChoice,
    threads: usize,
) -> Vec<Spot> {
    if pharmacies.is_empty() {
        return Vec::new();
    }
    let mut rng = StdRng::seed_from_u64(seed);
    let centres: Vec<(f64, f64)> = (0..size)
        .map(|_| {
            let anchor = &pharmacies[rng.random_range(0..pharmacies.len())];
            let r = rng.random::<f64>().sqrt();
            let (s, c) = (std::f64::consts::TAU * rng.random::<f64>()).sin_cos();
            let km_per_degree = EARTH_RADIUS_KM.to_radians();
            let lat = (anchor.lat + r * c / km_per_degree).clamp(-89.9, 89.9);
            let lng = anchor.lng + r * s / (km_per_degree * anchor.lat.to_radians().cos().max(0.01));
            (lat, lng.clamp(-180.0, 180.0))
        })
        .collect();
    let sample = &pharmacies[..pharmacies.len().min(RADIUS_SAMPLE)];
    let complete = sample.len() == pharmacies.len() && pharmacies.len() >= city_total;
    let held = &pharmacies[..held.min(pharmacies.len())];
    let per_thread = size.div_ceil(threads.max(1)).max(1);
    std::thread::scope(|scope| {
        let handles: Vec<_> = centres
            .chunks(per_thread)
            .map(|chunk| {
                scope.spawn(move || {
                    let mut distances = Vec::with_capacity(sample.len());
                    chunk
                        .iter()
                        .map(|&(lat, lng)| spot(lat, lng, sample, held, city_total, complete, choice, &mut distances))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles.into_iter().flat_map(|h| h.join().unwrap_or_default()).collect()
    })
}

#[allow(clippy::too_many_arguments)]
fn spot(
    lat: f64,
    lng: f64,
    sample: &[PharmacyEntry],
    held: &[PharmacyEntry],
    city_total: usize,
    complete: bool,
    choice: RadiusChoice,
    distances: &mut Vec<f64>,
) -> Spot {
    distances.clear();
    distances.extend(sample.iter().map(|p| haversine_km(lat, lng, p.lat, p.lng)));
    let radius_km = match choice {
        RadiusChoice::Fixed(km) => round_mm(km),
        RadiusChoice::Recipients(wanted) => {
            // The sample stands for the whole city: scale the rank to the sample's share.
            let scale = sample.len() as f64 / city_total.max(sample.len()) as f64;
            let rank = ((wanted as f64 * scale).round() as usize).max(1);
            if rank >= distances.len() {
                MAX_RADIUS_KM
            } else {
                let (below, nth, _) = distances.select_nth_unstable_by(rank, f64::total_cmp);
                let next = *nth;
                let last_inside = below.iter().copied().fold(f64::MIN, f64::max);
                round_mm(((last_inside + next) / 2.0).clamp(MIN_RADIUS_KM, MAX_RADIUS_KM))
            }
        }
    };
    let listed = complete.then(|| {
        let inside = distances.iter().filter(|d| **d <= radius_km - EDGE_KM).count();
        let near = distances.iter().filter(|d| (**d - radius_km).abs() <= EDGE_KM).count();
        (inside, near)
    });
    let (mut definite, mut either) = (Vec::new(), Vec::new());
    for (i, p) in held.iter().enumerate() {
        let d = haversine_km(lat, lng, p.lat, p.lng);
        if d <= radius_km - EDGE_KM {
            definite.push(i as u32);
        } else if d <= radius_km + EDGE_KM {
            either.push(i as u32);
        }
    }
    Spot { lat, lng, radius_km, definite, either, listed }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(i: i64, lat: f64, lng: f64) -> PharmacyEntry {
        PharmacyEntry { pharmacy_id: i, lat, lng, access: String::new() }
    }

    #[test]
    fn haversine_matches_known_distances() {
        // One degree of latitude on R = 6371 km.
        assert!((haversine_km(0.0, 0.0, 1.0, 0.0) - 111.19492664455873).abs() < 1e-9);
        // Across the antimeridian.
        assert!((haversine_km(0.0, 179.9, 0.0, -179.9) - 22.238985328911745).abs() < 1e-9);
        // The seed README's pair: Kathmandu centre to Asan, ~0.8 km.
        let d = haversine_km(27.7172, 85.3240, 27.722287, 85.329747);
        assert!((d - 0.8).abs() < 0.01, "{d}");
    }

    #[test]
    fn a_radius_for_n_recipients_holds_exactly_n_and_leaves_the_edge_clear() {
        // 400 pharmacies on a 20 × 20 grid of ~0.9 km; every one held.
        let km = EARTH_RADIUS_KM.to_radians();
        let list: Vec<PharmacyEntry> =
            (0..400).map(|i| entry(i, 27.0 + (i / 20) as f64 * 0.9 / km, 85.0 + (i % 20) as f64 * 0.9 / km)).collect();
        let spots = build_spots(&list, 400, 400, 64, 9, RadiusChoice::Recipients(25), 2);
        assert_eq!(spots.len(), 64);
        for s in &spots {
            let inside = list.iter().filter(|p| haversine_km(s.lat, s.lng, p.lat, p.lng) <= s.radius_km).count();
            if s.radius_km > MIN_RADIUS_KM {
                // Halfway between the 25th and 26th: only a near-tie leaves anyone on the edge.
                let (sure, maybe) = (s.definite.len(), s.either.len());
                assert!(sure <= 25 && sure + maybe >= 25, "{sure} + {maybe} at {} km", s.radius_km);
            }
            assert!(s.definite.len() <= inside && inside <= s.definite.len() + s.either.len());
            assert_eq!(s.listed, Some((s.definite.len(), s.either.len())));
        }
        let again = build_spots(&list, 400, 400, 64, 9, RadiusChoice::Recipients(25), 1);
        assert_eq!(again[5].radius_km, spots[5].radius_km, "seeded, whatever the thread count");
    }

    #[test]
    fn only_held_pharmacies_are_expected_and_the_edge_is_either() {
        let km = EARTH_RADIUS_KM.to_radians();
        let list =
            vec![entry(1, 0.0, 0.0), entry(2, 0.0, 2.0 / km), entry(3, 0.0, 2.0005 / km), entry(4, 0.0, 1.0 / km)];
        let s = spot(0.0, 0.0, &list, &list[..3], 4, true, RadiusChoice::Fixed(2.0), &mut Vec::new());
        assert_eq!(s.definite, vec![0]);
        assert_eq!(s.either, vec![1, 2], "within a metre of 2 km, either side");
        assert_eq!(s.expect(0), Expect::Definite);
        assert_eq!(s.expect(2), Expect::Either);
        assert_eq!(s.expect(3), Expect::Outside, "pharmacy 4 is inside but not held");
        assert_eq!(s.listed, Some((2, 2)));
    }
}
