//! Seeded fixtures shared by the benchmarks and the bench crate's tests, so that every figure
//! can be reproduced exactly: the same seed gives the same city, the same query centres and the
//! same broadcast, on any machine with this lock file.
//!
//! The city is a 100 km × 100 km box centred on Kathmandu (27.7° N, 85.3° E) with pharmacies
//! uniform in kilometres, not in degrees: a degree of longitude is shorter than a degree of
//! latitude by cos(latitude), so the box's longitude span is wider in degrees to stay 100 km
//! wide. With 1,000,000 pharmacies that is 100 per km², about 314 in a 1 km radius.
//!
//! The store benchmarks write what `POST /medicine/request/` writes: [`request_creates`] gives
//! seeded requests from customers in the box, each with its recipients (named, placed and
//! measured as the index would hand them over, nearest first).

use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sanjevani_engine::geo::{EARTH_RADIUS_KM, LatLng, haversine_km};
use sanjevani_engine::hub::{Audience, Template};
use sanjevani_engine::index::PharmacyCard;
use sanjevani_engine::model::{NewRequest, PharmacyId, Recipient, UserId};

/// Latitude of the box's centre, degrees.
pub const CENTRE_LAT: f64 = 27.7;
/// Longitude of the box's centre, degrees.
pub const CENTRE_LNG: f64 = 85.3;
/// Side of the square box, km.
pub const BOX_KM: f64 = 100.0;
/// Seed of the city every benchmark and test uses.
pub const CITY_SEED: u64 = 27_700_853;
/// Seed of the query centres every benchmark and test uses (a different stream from the city's,
/// so centres are not correlated with pharmacies).
pub const CENTRES_SEED: u64 = 1_024;

/// Kilometres per degree of latitude (and of longitude at the equator) on the engine's sphere,
/// R·π/180 ≈ 111.195 km.
pub fn km_per_degree() -> f64 {
    EARTH_RADIUS_KM.to_radians()
}

/// The point `north_km` north and `east_km` east of the box's centre. Longitude degrees are
/// scaled by cos(centre latitude), so a kilometre east is the same length as a kilometre north
/// along the box's middle.
pub fn offset_km(north_km: f64, east_km: f64) -> (f64, f64) {
    let lat = CENTRE_LAT + north_km / km_per_degree();
    let lng = CENTRE_LNG + east_km / (km_per_degree() * CENTRE_LAT.to_radians().cos());
    (lat, lng)
}

fn uniform_in_box(rng: &mut StdRng) -> (f64, f64) {
    let half = BOX_KM / 2.0;
    offset_km(rng.random_range(-half..half), rng.random_range(-half..half))
}

/// `n` pharmacies uniform in the box, as the plain `(id, lat, lng)` rows the linear scan reads.
/// Ids are `0..n`, so `city[id]` is pharmacy `id`.
pub fn city(n: usize, seed: u64) -> Vec<(PharmacyId, f64, f64)> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n)
        .map(|i| {
            let (lat, lng) = uniform_in_box(&mut rng);
            (i as PharmacyId, lat, lng)
        })
        .collect()
}

/// The same pharmacies as cards, for `PharmacyIndex::bulk_load`.
pub fn cards(city: &[(PharmacyId, f64, f64)]) -> Vec<PharmacyCard> {
    city.iter()
        .map(|&(id, lat, lng)| PharmacyCard {
            id,
            name: format!("Pharmacy {id}").into(),
            location: LatLng::new(lat, lng).expect("fixture points lie inside the box"),
        })
        .collect()
}

/// `count` query centres uniform in the box.
pub fn query_centres(count: usize, seed: u64) -> Vec<LatLng> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..count)
        .map(|_| {
            let (lat, lng) = uniform_in_box(&mut rng);
            LatLng::new(lat, lng).expect("fixture points lie inside the box")
        })
        .collect()
}

/// `k` pharmacies (ids `0..k`) as a broadcast addresses them: each with its distance in km,
/// rounded for display as the engine sends it, nearest first.
pub fn recipients(k: usize, seed: u64) -> Vec<(Audience, f64)> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut to: Vec<(Audience, f64)> = (0..k)
        .map(|i| {
            let km: f64 = rng.random_range(0.0..10.0);
            (Audience::Pharmacy(i as PharmacyId), (km * 100.0).round() / 100.0)
        })
        .collect();
    to.sort_by(|a, b| a.1.total_cmp(&b.1));
    to
}

/// Pharmacy names as they read on Kathmandu shop signs; with [`AREAS`] they give the recipients'
/// stored names realistic lengths (20 to 40 bytes).
pub const PHARMACY_NAMES: [&str; 12] = [
    "Sunrise Pharmacy",
    "Nepal Medical Hall",
    "Himalayan Medicos",
    "Shree Ganesh Aushadhi Pasal",
    "Annapurna Pharmacy",
    "Everest Drug House",
    "Om Shanti Medical Store",
    "Kathmandu Chemists",
    "Pashupati Pharma",
    "Green Cross Pharmacy",
    "Bagmati Medicals",
    "Lifeline Pharmacy",
];
/// Neighbourhoods appended to [`PHARMACY_NAMES`].
pub const AREAS: [&str; 8] =
    ["Baneshwor", "Thamel", "Patan Dhoka", "Koteshwor", "Maharajgunj", "Kalanki", "Chabahil", "Jawalakhel"];
/// Medicines customers ask for, with strength, as the console's form sends them.
const MEDICINES: [&str; 6] = [
    "Amoxicillin 500 mg",
    "Paracetamol 650 mg",
    "Metformin 500 mg",
    "Amlodipine 5 mg",
    "Salbutamol inhaler 100 mcg",
    "Cetirizine 10 mg",
];
/// Farthest a recipient lies from the patient in [`request_creates`], km: the radius customers
/// pick most often is a few km.
pub const CREATE_RADIUS_KM: f64 = 3.0;

/// `count` request creates as the lifecycle hands them to `Store::create_request`: customers in
/// the box (ids `1..=500`, so each has a history), a medicine name, a note on every third, an
/// image key on every other, a 15-minute TTL, and `recipients_each` pharmacies within
/// [`CREATE_RADIUS_KM`], nearest first, with their names, places and unrounded distances.
/// Pharmacy ids are drawn from a 1M city; the recipients table has no foreign key on them.
///
/// With `idempotency_keys`, each create carries a unique `Idempotency-Key` (optional in API.md),
/// which makes the store look the key up before inserting; without, it writes the request row and
/// its recipient rows only, which is what DESIGN.md's create target counts.
/// `created_at` is `now_ms`; callers restamp it before each round.
pub fn request_creates(
    count: usize,
    recipients_each: usize,
    idempotency_keys: bool,
    seed: u64,
    now_ms: i64,
) -> Vec<(NewRequest, Vec<Recipient>)> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..count)
        .map(|i| {
            let (lat, lng) = uniform_in_box(&mut rng);
            let patient = LatLng::new(lat, lng).expect("fixture points lie inside the box");
            let mut recipients: Vec<Recipient> = (0..recipients_each)
                .map(|_| {
                    let pharmacy_id: PharmacyId = rng.random_range(0..1_000_000);
                    let km = CREATE_RADIUS_KM * rng.random::<f64>().sqrt();
                    let bearing = rng.random_range(0.0..std::f64::consts::TAU);
                    let north = km * bearing.cos() / km_per_degree();
                    let east = km * bearing.sin() / (km_per_degree() * lat.to_radians().cos());
                    let location = LatLng::new(lat + north, lng + east).expect("a few km from a point in the box");
                    Recipient {
                        pharmacy_id,
                        pharmacy_name: format!(
                            "{}, {}",
                            PHARMACY_NAMES[pharmacy_id as usize % PHARMACY_NAMES.len()],
                            AREAS[pharmacy_id as usize / PHARMACY_NAMES.len() % AREAS.len()]
                        ),
                        location,
                        distance_km: haversine_km(patient, location),
                    }
                })
                .collect();
            recipients.sort_by(|a, b| a.distance_km.total_cmp(&b.distance_km).then(a.pharmacy_id.cmp(&b.pharmacy_id)));
            let customer_id: UserId = rng.random_range(1..=500);
            let request = NewRequest {
                customer_id,
                patient_name: format!("Customer {customer_id} Shrestha"),
                patient_phone: format!("98{:08}", rng.random_range(0..100_000_000u32)),
                location: patient,
                radius_km: CREATE_RADIUS_KM,
                quantity: rng.random_range(1..=30),
                medicine_name: Some(MEDICINES[i % MEDICINES.len()].to_string()),
                note: (i % 3 == 0).then(|| "Needed tonight, generic is fine.".to_string()),
                image: (i % 2 == 0).then(|| format!("prescriptions/{:016x}.jpg", rng.random::<u64>())),
                idempotency_key: idempotency_keys.then(|| format!("{seed:x}-{i:08}-{:016x}", rng.random::<u64>())),
                created_at: now_ms,
                expires_at: now_ms + 15 * 60 * 1000,
            };
            (request, recipients)
        })
        .collect()
}

/// A realistic `new_request` as the seed sends it (plus API.md's `medicine_name` and `note`),
/// about 400 bytes once rendered.
#[derive(Debug, Clone)]
pub struct NewRequestFixture {
    /// Request id.
    pub request_id: i64,
    /// Customer's name.
    pub patient_name: String,
    /// Customer's phone.
    pub patient_phone: String,
    /// Patient latitude.
    pub lat: f64,
    /// Patient longitude.
    pub lng: f64,
    /// Units wanted.
    pub quantity: u32,
    /// Medicine name.
    pub medicine_name: String,
    /// Customer's note.
    pub note: String,
    /// Signed prescription image URL.
    pub image_url: String,
    /// Creation time, RFC 3339.
    pub timestamp: String,
}

impl Default for NewRequestFixture {
    fn default() -> Self {
        NewRequestFixture {
            request_id: 184_467,
            patient_name: "Sita Shrestha".into(),
            patient_phone: "9841234567".into(),
            lat: 27.717245,
            lng: 85.323961,
            quantity: 10,
            medicine_name: "Amoxicillin 500 mg".into(),
            note: "Needed tonight, generic is fine.".into(),
            image_url: "http://localhost:8000/media/prescriptions/3f9a1c0e7b2d4a6f.jpg\
                        ?exp=1771929000&sig=9c1e4b7a2d5f8e0b"
                .into(),
            timestamp: "2026-02-24T10:30:00Z".into(),
        }
    }
}

impl NewRequestFixture {
    /// Renders the message once, leaving `distance_km` open for each recipient's own number.
    /// Strings go through serde_json so they are escaped exactly as the engine will escape them.
    pub fn render_template(&self) -> Template {
        let mut prefix = Vec::with_capacity(256);
        prefix.extend_from_slice(b"{\"type\":\"new_request\",\"request_id\":");
        json(&mut prefix, &self.request_id);
        prefix.extend_from_slice(b",\"patient_name\":");
        json(&mut prefix, &self.patient_name);
        prefix.extend_from_slice(b",\"patient_phone\":");
        json(&mut prefix, &self.patient_phone);
        prefix.extend_from_slice(b",\"patient_location\":{\"lat\":");
        json(&mut prefix, &self.lat);
        prefix.extend_from_slice(b",\"lng\":");
        json(&mut prefix, &self.lng);
        prefix.extend_from_slice(b"},\"distance_km\":");

        let mut suffix = Vec::with_capacity(256);
        suffix.extend_from_slice(b",\"quantity\":");
        json(&mut suffix, &self.quantity);
        suffix.extend_from_slice(b",\"medicine_name\":");
        json(&mut suffix, &self.medicine_name);
        suffix.extend_from_slice(b",\"note\":");
        json(&mut suffix, &self.note);
        suffix.extend_from_slice(b",\"image_url\":");
        json(&mut suffix, &self.image_url);
        suffix.extend_from_slice(b",\"timestamp\":");
        json(&mut suffix, &self.timestamp);
        suffix.push(b'}');

        Template::new(Bytes::from(prefix), Bytes::from(suffix))
    }
}

fn json<T: serde::Serialize + ?Sized>(out: &mut Vec<u8>, value: &T) {
    serde_json::to_writer(&mut *out, value).expect("writing JSON to a Vec cannot fail");
}

#[cfg(test)]
mod tests {
    use super::*;
    use sanjevani_engine::geo::haversine_raw_km;

    #[test]
    fn the_box_is_100_km_square() {
        let (south, west) = offset_km(-50.0, -50.0);
        let (north, east) = offset_km(50.0, 50.0);
        let ns = haversine_raw_km(south, CENTRE_LNG, north, CENTRE_LNG);
        let ew = haversine_raw_km(CENTRE_LAT, west, CENTRE_LAT, east);
        assert!((ns - BOX_KM).abs() < 1e-6, "north-south {ns} km");
        // Along the middle the east-west chord is a great circle, a hair shorter than the
        // parallel it was measured along.
        assert!((ew - BOX_KM).abs() < 0.01, "east-west {ew} km");
    }

    #[test]
    fn fixtures_are_seeded_and_inside_the_box() {
        assert_eq!(city(500, 7), city(500, 7));
        assert_ne!(city(500, 7), city(500, 8));
        let (south, west) = offset_km(-50.0, -50.0);
        let (north, east) = offset_km(50.0, 50.0);
        for (i, &(id, lat, lng)) in city(10_000, CITY_SEED).iter().enumerate() {
            assert_eq!(id, i as PharmacyId);
            assert!((south..north).contains(&lat) && (west..east).contains(&lng));
        }
        for c in query_centres(1000, CENTRES_SEED) {
            assert!((south..north).contains(&c.lat()) && (west..east).contains(&c.lng()));
        }
        let to = recipients(100, 1);
        assert!(to.windows(2).all(|w| w[0].1 <= w[1].1));
    }

    #[test]
    fn request_creates_are_seeded_realistic_and_nearest_first() {
        let creates = request_creates(300, 10, true, 5, 1_000);
        assert_eq!(creates, request_creates(300, 10, true, 5, 1_000));
        assert!(request_creates(10, 10, false, 5, 1_000).iter().all(|(req, _)| req.idempotency_key.is_none()));
        let mut keys = std::collections::HashSet::new();
        for (req, to) in &creates {
            assert!(keys.insert(req.idempotency_key.clone().unwrap()), "idempotency keys are unique");
            assert!((1..=500).contains(&req.customer_id) && req.quantity >= 1);
            assert_eq!(req.expires_at - req.created_at, 15 * 60 * 1000);
            assert_eq!(to.len(), 10);
            assert!(to.windows(2).all(|w| w[0].distance_km <= w[1].distance_km));
            for r in to {
                assert!(r.distance_km <= CREATE_RADIUS_KM + 1e-9, "{} km", r.distance_km);
                assert!((20..=45).contains(&r.pharmacy_name.len()), "{:?}", r.pharmacy_name);
            }
        }
    }

    #[test]
    fn template_renders_valid_json_of_realistic_size() {
        let template = NewRequestFixture::default().render_template();
        let bytes = template.render(2.47);
        assert!((380..=420).contains(&bytes.len()), "{} bytes", bytes.len());
        let msg: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(msg["type"], "new_request");
        assert_eq!(msg["distance_km"], 2.47);
        assert_eq!(msg["patient_location"]["lng"], 85.323961);
        assert_eq!(msg["quantity"], 10);
    }
}
