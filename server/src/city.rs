//! `sanjevani generate-city`: a synthetic city written straight into the data dir's SQLite, and
//! long-lived tokens for its accounts, so that a load test with 10,000 or 1,000,000 pharmacies
//! does not spend minutes registering accounts over HTTP and hashing their passwords.
//!
//! The city is a mixture, as a real one is: a share of the pharmacies (`dense_share`) sits in a
//! 2-D Gaussian of `sigma_km` around the centre, the rest is spread uniformly over a disc of
//! `edge_km`; everything lies within that disc. The defaults keep the density of a 10,000-pharmacy
//! city of 30 km whatever the size (the disc grows with √N), so "a radius for ~50 recipients"
//! exists everywhere at 1–50 km. Every account shares one argon2id hash of one known password
//! (hashed once; the rows are otherwise what registration writes), and every pharmacy is
//! approved. Optional open requests get their recipients from the engine's own index, so they are
//! the recipients the server would have chosen.
//!
//! Everything is one transaction on the store's own schema ([`SqliteStore::bulk_loader`]) under
//! the data dir's lock, so a running `serve` makes this refuse, and a failure leaves the file as
//! it was. The tokens are minted afterwards with the server's secret and written to a JSON file
//! (written to a temporary name and renamed, so a reader never sees half of it).

use crate::auth::{Jwt, TokenType};
use crate::datadir::DataDir;
use indicatif::{ProgressBar, ProgressStyle};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sanjevani_engine::accounts::{card, hash_password_blocking};
use sanjevani_engine::clock::now_ms;
use sanjevani_engine::geo::{EARTH_RADIUS_KM, LatLng, MAX_RADIUS_KM, MIN_RADIUS_KM};
use sanjevani_engine::index::{PharmacyCard, PharmacyIndex};
use sanjevani_engine::model::{NewPharmacy, NewRequest, NewUser, PharmacyId, Role, UserId};
use sanjevani_engine::store::SqliteStore;
use serde::Serialize;
use std::io::{BufWriter, IsTerminal, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// The password every generated account shares unless `--password` says otherwise.
pub const DEFAULT_PASSWORD: &str = "load-test-password";

/// Domain of the generated emails (`.test` is reserved, so no real mailbox is ever named).
pub const EMAIL_DOMAIN: &str = "city.test";

/// Most pharmacies, customers or open requests one run generates.
pub const MAX_ROWS: usize = 10_000_000;

/// Pharmacies of the city whose density the default shape keeps at every size.
const REFERENCE_PHARMACIES: f64 = 10_000.0;
/// Edge radius of that reference city, km.
const REFERENCE_EDGE_KM: f64 = 30.0;

/// Tokens minted per block: the blocks are minted on every core and written in order, so memory
/// stays bounded for a million pharmacies.
const TOKEN_BLOCK: usize = 16_384;

/// What to generate.
#[derive(Debug, Clone)]
pub struct CityOptions {
    /// Pharmacies (each with its PHARMACY account), all approved.
    pub pharmacies: usize,
    /// CUSTOMER accounts.
    pub customers: usize,
    /// Seed of every random choice: the same seed gives the same city (ids aside).
    pub seed: u64,
    /// The city's centre.
    pub center: LatLng,
    /// Radius of the disc everything lies in, km; `None`: 30 km × max(1, √(N / 10,000)).
    pub edge_km: Option<f64>,
    /// Standard deviation of the dense centre, km; `None`: a quarter of the edge radius.
    pub sigma_km: Option<f64>,
    /// Share of pharmacies (and of request locations) in the dense centre, 0–1.
    pub dense_share: f64,
    /// PENDING requests to create, each from a random customer.
    pub open_requests: usize,
    /// Recipients each open request's radius is chosen for (nearest-first, radius 1–50 km).
    pub recipients: usize,
    /// How long the open requests stay open, from now.
    pub request_ttl: Duration,
    /// The shared password (at least 8 characters).
    pub password: String,
    /// Lifetime of the minted access and refresh tokens.
    pub token_ttl: Duration,
    /// Pharmacies listed with tokens in the file (the first ones generated, a uniform sample of
    /// the city); `None`: all.
    pub token_limit: Option<usize>,
    /// `base_url` written into the tokens file, if any.
    pub base_url: Option<String>,
    /// The tokens file.
    pub out: PathBuf,
}

impl CityOptions {
    /// Options for a city of `pharmacies` and `customers` with every other setting at its default.
    pub fn new(pharmacies: usize, customers: usize, out: impl Into<PathBuf>) -> CityOptions {
        CityOptions {
            pharmacies,
            customers,
            seed: 1,
            center: LatLng::new(27.7172, 85.3240).unwrap_or_else(|_| unreachable!("a valid constant")),
            edge_km: None,
            sigma_km: None,
            dense_share: 0.5,
            open_requests: 0,
            recipients: 50,
            request_ttl: Duration::from_secs(24 * 3600),
            password: DEFAULT_PASSWORD.to_string(),
            token_ttl: Duration::from_secs(7 * 24 * 3600),
            token_limit: None,
            base_url: None,
            out: out.into(),
        }
    }
}

/// What was generated.
#[derive(Debug, Clone, PartialEq)]
pub struct CityReport {
    /// Pharmacies written.
    pub pharmacies: usize,
    /// Customers written.
    pub customers: usize,
    /// Open requests written.
    pub open_requests: usize,
    /// Recipient rows of those requests.
    pub recipients: usize,
    /// Pharmacies listed with tokens in the file.
    pub pharmacy_tokens: usize,
    /// The disc everything lies in, km.
    pub edge_km: f64,
    /// The dense centre's standard deviation, km.
    pub sigma_km: f64,
    /// Time spent writing the database.
    pub database: Duration,
    /// Time spent minting and writing tokens.
    pub tokens: Duration,
}

/// Why a city could not be generated.
#[derive(Debug, thiserror::Error)]
pub enum CityError {
    /// A setting is unusable.
    #[error("{0}")]
    Invalid(String),
    /// The store refused (a taken email means this seed's city is already in the data dir).
    #[error("{0}")]
    Store(#[from] sanjevani_engine::Error),
    /// The tokens file could not be written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

/// Where pharmacies and patients are: a Gaussian core and a uniform disc.
#[derive(Debug, Clone, Copy)]
struct Shape {
    center: LatLng,
    edge_km: f64,
    sigma_km: f64,
    dense_share: f64,
}

impl Shape {
    /// A random point: inside the edge disc always, in the core with probability `dense_share`.
    fn sample(&self, rng: &mut StdRng) -> LatLng {
        let km_per_degree = EARTH_RADIUS_KM.to_radians();
        let lng_scale = km_per_degree * self.center.lat().to_radians().cos();
        loop {
            let (north, east) = if rng.random::<f64>() < self.dense_share {
                // Box–Muller: two independent standard normals.
                let u: f64 = 1.0 - rng.random::<f64>();
                let v: f64 = rng.random();
                let r = (-2.0 * u.ln()).sqrt() * self.sigma_km;
                let (s, c) = (std::f64::consts::TAU * v).sin_cos();
                (r * c, r * s)
            } else {
                let r = self.edge_km * rng.random::<f64>().sqrt();
                let (s, c) = (std::f64::consts::TAU * rng.random::<f64>()).sin_cos();
                (r * c, r * s)
            };
            if north.hypot(east) > self.edge_km {
                continue;
            }
            let lat = self.center.lat() + north / km_per_degree;
            let mut lng = self.center.lng() + east / lng_scale;
            if lng > 180.0 {
                lng -= 360.0;
            } else if lng < -180.0 {
                lng += 360.0;
            }
            if let Ok(point) = LatLng::new(lat, lng) {
                return point;
            }
        }
    }
}

/// The radius (1–50 km) whose disc around `center` holds about `wanted` pharmacies: halfway
/// between the `wanted`-th and the next nearest, so neither sits on the edge.
pub fn radius_for(index: &PharmacyIndex, center: LatLng, wanted: usize) -> f64 {
    if wanted == 0 {
        return MIN_RADIUS_KM;
    }
    let mut reach = MIN_RADIUS_KM;
    loop {
        let hits = index.within(center, reach);
        if hits.len() > wanted {
            let between = (hits[wanted - 1].1 + hits[wanted].1) / 2.0;
            return round_mm(between.clamp(MIN_RADIUS_KM, reach));
        }
        if reach >= MAX_RADIUS_KM {
            return MAX_RADIUS_KM;
        }
        reach = (reach * 2.0).min(MAX_RADIUS_KM);
    }
}

/// Rounded to the metre's thousandth (a millimetre), so the radius survives JSON unchanged.
fn round_mm(km: f64) -> f64 {
    (km * 1e6).round() / 1e6
}

/// A progress bar on a terminal, plain log lines (every 10 %) otherwise.
struct Progress {
    bar: Option<ProgressBar>,
    label: &'static str,
    total: u64,
    done: u64,
    next_log: u64,
}

impl Progress {
    fn new(label: &'static str, total: u64) -> Progress {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new(total);
            let style = ProgressStyle::with_template("{msg:>14} [{bar:40}] {pos}/{len} {per_sec} eta {eta}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> ");
            bar.set_style(style);
            bar.set_message(label);
            bar
        });
        Progress { bar, label, total, done: 0, next_log: total / 10 }
    }

    fn inc(&mut self, n: u64) {
        self.done += n;
        match &self.bar {
            Some(bar) => {
                if self.done % 1024 == 0 || self.done == self.total {
                    bar.set_position(self.done);
                }
            }
            None => {
                if self.done >= self.next_log && self.done < self.total {
                    tracing::info!("{}: {} of {}", self.label, self.done, self.total);
                    self.next_log = self.done + (self.total / 10).max(1);
                }
            }
        }
    }

    fn finish(self) {
        match self.bar {
            Some(bar) => bar.finish(),
            None => tracing::info!("{}: {} done", self.label, self.total),
        }
    }
}

/// One generated pharmacy, as the tokens file lists it.
#[derive(Debug, Clone, Copy)]
struct Generated {
    pharmacy_id: PharmacyId,
    user_id: UserId,
    lat: f64,
    lng: f64,
}

/// Generates the city into `data_dir` (whose lock the caller holds by owning it), signing tokens
/// with `secret`.
pub fn generate(data_dir: &DataDir, secret: &str, options: &CityOptions) -> Result<CityReport, CityError> {
    let invalid = |m: &str| Err(CityError::Invalid(m.to_string()));
    if options.pharmacies > MAX_ROWS || options.customers > MAX_ROWS || options.open_requests > MAX_ROWS {
        return invalid("at most 10,000,000 pharmacies, customers or open requests");
    }
    if options.open_requests > 0 && options.customers == 0 {
        return invalid("open requests need at least one customer");
    }
    if !(0.0..=1.0).contains(&options.dense_share) {
        return invalid("--dense-share must be between 0 and 1");
    }
    if options.center.lat().abs() > 80.0 {
        return invalid("--center must be within 80° of the equator");
    }
    let scale = (options.pharmacies as f64 / REFERENCE_PHARMACIES).sqrt().max(1.0);
    let edge_km = options.edge_km.unwrap_or(REFERENCE_EDGE_KM * scale);
    let sigma_km = options.sigma_km.unwrap_or(edge_km / 4.0);
    if !(edge_km > 0.0 && edge_km <= 2_000.0 && sigma_km > 0.0 && sigma_km.is_finite()) {
        return invalid("--edge-km must be in (0, 2000] and --sigma-km positive");
    }
    let shape = Shape { center: options.center, edge_km, sigma_km, dense_share: options.dense_share };

    let started = Instant::now();
    tracing::info!("hashing the shared password once (argon2id)");
    let password_hash = hash_password_blocking(&options.password)?;
    let loader = SqliteStore::bulk_loader(&data_dir.db_path())?;
    let existing: Vec<PharmacyCard> = loader.pharmacies()?.iter().filter(|p| p.approved).map(card).collect();
    let mut rng = StdRng::seed_from_u64(options.seed);
    let now = now_ms();
    let seed = options.seed;
    let taken = |e: sanjevani_engine::Error| match e {
        sanjevani_engine::Error::Conflict(_) => CityError::Invalid(format!(
            "this data dir already holds the city of seed {seed} (its emails are taken); use another --seed or a fresh --data-dir"
        )),
        e => CityError::Store(e),
    };

    let digits = |n: usize| n.max(1).to_string().len();
    let mut customers = Vec::with_capacity(options.customers);
    let mut progress = Progress::new("customers", options.customers as u64);
    let width = digits(options.customers);
    for i in 0..options.customers {
        let user = loader
            .insert_user(NewUser {
                email: format!("customer-s{seed}-{i:0width$}@{EMAIL_DOMAIN}"),
                password_hash: password_hash.clone(),
                name: format!("Customer {i}"),
                phone_number: format!("97{:08}", i % 100_000_000),
                role: Role::Customer,
                email_verified: true,
                created_at: now,
            })
            .map_err(taken)?;
        customers.push(user);
        progress.inc(1);
    }
    progress.finish();

    let mut pharmacies = Vec::with_capacity(options.pharmacies);
    let mut progress = Progress::new("pharmacies", options.pharmacies as u64);
    let width = digits(options.pharmacies);
    for i in 0..options.pharmacies {
        let location = shape.sample(&mut rng);
        let (user, pharmacy) = loader
            .insert_pharmacy_user(
                NewUser {
                    email: format!("pharmacy-s{seed}-{i:0width$}@{EMAIL_DOMAIN}"),
                    password_hash: password_hash.clone(),
                    name: format!("Owner {i}"),
                    phone_number: format!("98{:08}", i % 100_000_000),
                    role: Role::Pharmacy,
                    email_verified: true,
                    created_at: now,
                },
                NewPharmacy { name: format!("Pharmacy {i}"), location, approved: true },
            )
            .map_err(taken)?;
        pharmacies.push(Generated {
            pharmacy_id: pharmacy.id,
            user_id: user.id,
            lat: location.lat(),
            lng: location.lng(),
        });
        progress.inc(1);
    }
    progress.finish();

    let mut recipients_total = 0;
    if options.open_requests > 0 {
        tracing::info!("indexing {} approved pharmacies for the open requests", existing.len() + pharmacies.len());
        let mut cards = existing;
        cards.extend(pharmacies.iter().enumerate().map(|(i, p)| PharmacyCard {
            id: p.pharmacy_id,
            name: format!("Pharmacy {i}").into(),
            location: LatLng::new(p.lat, p.lng).unwrap_or(options.center),
        }));
        let index = PharmacyIndex::bulk_load(cards);
        const MEDICINES: &[&str] =
            &["Paracetamol 500mg", "Amoxicillin 250mg", "Insulin glargine", "Salbutamol inhaler", "Metformin 500mg"];
        let ttl_ms = i64::try_from(options.request_ttl.as_millis()).unwrap_or(i64::MAX / 4);
        let mut progress = Progress::new("open requests", options.open_requests as u64);
        for _ in 0..options.open_requests {
            let customer = &customers[rng.random_range(0..customers.len())];
            let location = shape.sample(&mut rng);
            let radius_km = radius_for(&index, location, options.recipients);
            let recipients = index.recipients_within(location, radius_km);
            recipients_total += recipients.len();
            loader.create_request(
                NewRequest {
                    customer_id: customer.id,
                    patient_name: customer.name.clone(),
                    patient_phone: customer.phone_number.clone(),
                    location,
                    radius_km,
                    quantity: rng.random_range(1..=5),
                    medicine_name: Some(MEDICINES[rng.random_range(0..MEDICINES.len())].to_string()),
                    note: Some("generated by sanjevani generate-city".to_string()),
                    image: None,
                    idempotency_key: None,
                    created_at: now,
                    expires_at: now.saturating_add(ttl_ms),
                },
                recipients,
            )?;
            progress.inc(1);
        }
        progress.finish();
    }
    tracing::info!("committing");
    loader.commit()?;
    let database = started.elapsed();

    let started = Instant::now();
    let listed = options.token_limit.unwrap_or(usize::MAX).min(pharmacies.len());
    write_tokens(secret, options, &customers.iter().map(|u| u.id).collect::<Vec<_>>(), &pharmacies[..listed], shape)
        .map_err(|source| CityError::Io { path: options.out.clone(), source })?;
    Ok(CityReport {
        pharmacies: pharmacies.len(),
        customers: customers.len(),
        open_requests: options.open_requests,
        recipients: recipients_total,
        pharmacy_tokens: listed,
        edge_km,
        sigma_km,
        database,
        tokens: started.elapsed(),
    })
}

#[derive(Serialize)]
struct CityHeader<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    base_url: Option<&'a str>,
    password: &'a str,
    token_ttl_secs: u64,
    city: CityShape,
}

#[derive(Serialize)]
struct CityShape {
    seed: u64,
    center: [f64; 2],
    edge_km: f64,
    sigma_km: f64,
    dense_share: f64,
    pharmacies: usize,
    customers: usize,
    open_requests: usize,
}

#[derive(Serialize)]
struct CustomerTokens {
    user_id: UserId,
    access: String,
    refresh: String,
}

#[derive(Serialize)]
struct PharmacyTokens {
    pharmacy_id: PharmacyId,
    user_id: UserId,
    lat: f64,
    lng: f64,
    access: String,
    refresh: String,
}

/// Writes `{"base_url"?, "password", "token_ttl_secs", "city", "customers": [...], "pharmacies":
/// [...]}`, minting every token on all cores in blocks.
fn write_tokens(
    secret: &str,
    options: &CityOptions,
    customers: &[UserId],
    pharmacies: &[Generated],
    shape: Shape,
) -> std::io::Result<()> {
    let jwt = Jwt::new(secret.as_bytes(), options.token_ttl, options.token_ttl);
    let ttl = options.token_ttl;
    let tmp = options.out.with_extension("json.tmp");
    let file = std::fs::File::create(&tmp)?;
    let mut out = BufWriter::with_capacity(1 << 20, file);
    let header = CityHeader {
        base_url: options.base_url.as_deref(),
        password: &options.password,
        token_ttl_secs: ttl.as_secs(),
        city: CityShape {
            seed: options.seed,
            center: [shape.center.lat(), shape.center.lng()],
            edge_km: shape.edge_km,
            sigma_km: shape.sigma_km,
            dense_share: shape.dense_share,
            pharmacies: options.pharmacies,
            customers: options.customers,
            open_requests: options.open_requests,
        },
    };
    let head = serde_json::to_vec(&header).map_err(std::io::Error::other)?;
    // Everything of the header but its closing brace, then the two lists.
    out.write_all(&head[..head.len() - 1])?;

    let mint = |user_id: UserId, role: Role| {
        (jwt.issue_for(user_id, role, TokenType::Access, ttl), jwt.issue_for(user_id, role, TokenType::Refresh, ttl))
    };
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let mut progress = Progress::new("tokens", (customers.len() + pharmacies.len()) as u64);

    out.write_all(b",\"customers\":[")?;
    let mut first = true;
    for block in customers.chunks(TOKEN_BLOCK) {
        let rendered = render_parallel(block, threads, |&user_id| {
            let (access, refresh) = mint(user_id, Role::Customer);
            serde_json::to_vec(&CustomerTokens { user_id, access, refresh })
        })?;
        write_items(&mut out, &rendered, &mut first)?;
        progress.inc(block.len() as u64);
    }
    out.write_all(b"],\n\"pharmacies\":[")?;
    let mut first = true;
    for block in pharmacies.chunks(TOKEN_BLOCK) {
        let rendered = render_parallel(block, threads, |p| {
            let (access, refresh) = mint(p.user_id, Role::Pharmacy);
            serde_json::to_vec(&PharmacyTokens {
                pharmacy_id: p.pharmacy_id,
                user_id: p.user_id,
                lat: p.lat,
                lng: p.lng,
                access,
                refresh,
            })
        })?;
        write_items(&mut out, &rendered, &mut first)?;
        progress.inc(block.len() as u64);
    }
    out.write_all(b"]}\n")?;
    progress.finish();
    let file = out.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()?;
    std::fs::rename(&tmp, &options.out)
}

/// Renders every item of `items` to JSON on `threads` threads, in order.
fn render_parallel<T: Sync>(
    items: &[T],
    threads: usize,
    render: impl Fn(&T) -> serde_json::Result<Vec<u8>> + Sync,
) -> std::io::Result<Vec<Vec<u8>>> {
    let per_thread = items.len().div_ceil(threads.max(1)).max(1);
    let render = &render;
    let parts: Vec<serde_json::Result<Vec<Vec<u8>>>> = std::thread::scope(|scope| {
        let handles: Vec<_> = items
            .chunks(per_thread)
            .map(|chunk| scope.spawn(move || chunk.iter().map(render).collect::<serde_json::Result<Vec<_>>>()))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Ok(Vec::new()))).collect()
    });
    let mut all = Vec::with_capacity(items.len());
    for part in parts {
        all.extend(part.map_err(std::io::Error::other)?);
    }
    if all.len() != items.len() {
        return Err(std::io::Error::other("a token-minting thread panicked"));
    }
    Ok(all)
}

fn write_items(out: &mut impl Write, items: &[Vec<u8>], first: &mut bool) -> std::io::Result<()> {
    for item in items {
        if !*first {
            out.write_all(b",\n")?;
        }
        *first = false;
        out.write_all(item)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shape_has_a_dense_core_and_stays_inside_its_disc() {
        let center = LatLng::new(27.7, 85.3).unwrap();
        let shape = Shape { center, edge_km: 30.0, sigma_km: 5.0, dense_share: 0.5 };
        let mut rng = StdRng::seed_from_u64(7);
        let points: Vec<LatLng> = (0..20_000).map(|_| shape.sample(&mut rng)).collect();
        let distance = |p: &LatLng| sanjevani_engine::geo::haversine_km(center, *p);
        assert!(points.iter().all(|p| distance(p) <= 30.05), "everything within the edge");
        let core = points.iter().filter(|p| distance(p) <= 5.0).count() as f64;
        let ring = points.iter().filter(|p| (25.0..=30.0).contains(&distance(p))).count() as f64;
        // Per km², the core (π·25 km²) is far denser than the outer ring (π·275 km²).
        assert!(core / 25.0 > 10.0 * ring / 275.0, "core {core}, ring {ring}");
        let mut again = StdRng::seed_from_u64(7);
        assert_eq!(shape.sample(&mut again), points[0], "seeded");
    }

    #[test]
    fn the_radius_lies_between_the_wanted_and_the_next_pharmacy() {
        let center = LatLng::new(0.0, 0.0).unwrap();
        // Pharmacies due east at 1.5, 2.5, ... km.
        let cards: Vec<PharmacyCard> = (0..40)
            .map(|i| PharmacyCard {
                id: i,
                name: "p".into(),
                location: LatLng::new(0.0, (1.5 + i as f64) / EARTH_RADIUS_KM.to_radians()).unwrap(),
            })
            .collect();
        let index = PharmacyIndex::bulk_load(cards);
        let r = radius_for(&index, center, 10);
        assert!((r - 11.0).abs() < 1e-3, "{r}");
        assert_eq!(index.within(center, r).len(), 10);
        assert_eq!(radius_for(&index, center, 0), 1.0);
        assert_eq!(radius_for(&index, center, 1), 2.0);
        assert_eq!(radius_for(&index, center, 100), 50.0, "fewer than wanted: the largest radius");
    }
}
