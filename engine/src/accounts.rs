//! Accounts: customers, pharmacies and admins; passwords; email verification by OTP; login and
//! OTP rate limits; pharmacy approval.
//!
//! Passwords are stored only as argon2id hashes at OWASP's parameters (m = 19 MiB, t = 2, p = 1).
//! Hashing costs tens of milliseconds of CPU, so it runs on tokio's blocking pool behind a
//! semaphore as wide as the machine: a burst of logins queues for hashing instead of starving
//! the threads that serve sockets. OTP codes are stored only as HMAC-SHA256 under a key derived
//! from the server secret (a 6-digit code has too little entropy for a plain hash), expire after
//! 10 minutes and burn after 5 wrong tries. Approval decides whether a pharmacy is in the index,
//! and suspension closes its sockets with 4003.

use crate::clock::now_ms;
use crate::error::{Error, Result};
use crate::geo::LatLng;
use crate::hub::{Audience, Close, Fanout};
use crate::index::{PharmacyCard, PharmacyIndex};
use crate::model::*;
use crate::store::Store;
use argon2::{Algorithm, Argon2, Params, PasswordHash, PasswordHasher, PasswordVerifier, Version};
use hmac::{Hmac, KeyInit, Mac};
use parking_lot::Mutex;
use rand::Rng;
use sha2::Sha256;
use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;

/// Shortest password accepted.
pub const MIN_PASSWORD_CHARS: usize = 8;
/// How long an OTP code is valid.
pub const OTP_TTL: Duration = Duration::from_secs(10 * 60);

/// `--pharmacy-approval`: whether new pharmacies are approved at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Approval {
    /// Approved at registration (default, so a first run works).
    #[default]
    Auto,
    /// Unapproved until an admin approves.
    Manual,
}

/// Settings of the accounts service.
#[derive(Debug, Clone)]
pub struct AccountsConfig {
    /// Approval of new pharmacies.
    pub approval: Approval,
    /// `--rate-limits on|off` (off only for load tests).
    pub rate_limits: bool,
    /// Concurrent argon2 computations (default: available cores).
    pub hash_concurrency: usize,
}

impl Default for AccountsConfig {
    fn default() -> Self {
        AccountsConfig {
            approval: Approval::Auto,
            rate_limits: true,
            hash_concurrency: std::thread::available_parallelism().map_or(2, |n| n.get()),
        }
    }
}

/// A registration as the client sent it (validated here).
#[derive(Debug, Clone, Default)]
pub struct Registration {
    /// Email (trimmed and lower-cased here).
    pub email: String,
    /// Password (≥ 8 characters).
    pub password: String,
    /// Display name.
    pub name: String,
    /// Phone number.
    pub phone_number: String,
}

/// A sliding-window counter per key: at most `limit` events within `window`.
struct SlidingWindow<K> {
    window: Duration,
    limit: usize,
    events: Mutex<HashMap<K, VecDeque<Instant>>>,
}

impl<K: Hash + Eq + Clone> SlidingWindow<K> {
    fn new(limit: usize, window: Duration) -> Self {
        SlidingWindow { window, limit, events: Mutex::new(HashMap::new()) }
    }

    /// `Err(seconds)` until the oldest counted event leaves the window, if the key is at its limit.
    fn check(&self, key: &K, now: Instant) -> Result<(), u64> {
        let mut events = self.events.lock();
        let Some(times) = events.get_mut(key) else {
            return Ok(());
        };
        while times.front().is_some_and(|t| now.duration_since(*t) >= self.window) {
            times.pop_front();
        }
        if times.is_empty() {
            events.remove(key);
            return Ok(());
        }
        if times.len() < self.limit {
            return Ok(());
        }
        let oldest = times.front().copied().unwrap_or(now);
        let wait = self.window.saturating_sub(now.duration_since(oldest));
        Err(wait.as_secs_f64().ceil().max(1.0) as u64)
    }

    fn record(&self, key: K, now: Instant) {
        let mut events = self.events.lock();
        if events.len() > 100_000 {
            // Keep memory bounded under a flood of distinct keys: drop keys with nothing live.
            let window = self.window;
            events.retain(|_, times| times.back().is_some_and(|t| now.duration_since(*t) < window));
        }
        events.entry(key).or_default().push_back(now);
    }
}

struct Limits {
    otp_per_email: SlidingWindow<String>,
    otp_per_ip: SlidingWindow<IpAddr>,
    login_failures_per_email: SlidingWindow<String>,
    login_failures_per_ip: SlidingWindow<IpAddr>,
}

/// The accounts service. Cheap to clone.
#[derive(Clone)]
pub struct Accounts {
    inner: Arc<AccountsInner>,
}

struct AccountsInner {
    store: Arc<dyn Store>,
    index: Arc<PharmacyIndex>,
    fanout: Arc<dyn Fanout>,
    config: AccountsConfig,
    otp_key: [u8; 32],
    hashing: Semaphore,
    limits: Limits,
    /// A real hash to verify against when the email is unknown, so timing does not reveal
    /// which emails have accounts.
    decoy_hash: String,
}

fn argon2id() -> Argon2<'static> {
    // OWASP: m = 19 MiB, t = 2, p = 1. These constants are valid, so `new` cannot fail.
    let params = Params::new(19 * 1024, 2, 1, None).unwrap_or_default();
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
}

impl Accounts {
    /// Builds the service. `secret` is the server's long-lived secret (the JWT secret); the OTP
    /// key is derived from it so codes survive a restart.
    pub fn new(
        store: Arc<dyn Store>,
        index: Arc<PharmacyIndex>,
        fanout: Arc<dyn Fanout>,
        secret: &[u8],
        config: AccountsConfig,
    ) -> Result<Accounts> {
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(secret).map_err(|_| Error::invalid("bad secret"))?;
        mac.update(b"sanjevani otp key v1");
        let otp_key: [u8; 32] = mac.finalize().into_bytes().into();
        let decoy_hash = hash_blocking("decoy password that matches nothing")?;
        let hashing = Semaphore::new(config.hash_concurrency.max(1));
        let hour = Duration::from_secs(3600);
        let quarter = Duration::from_secs(15 * 60);
        Ok(Accounts {
            inner: Arc::new(AccountsInner {
                store,
                index,
                fanout,
                config,
                otp_key,
                hashing,
                decoy_hash,
                limits: Limits {
                    otp_per_email: SlidingWindow::new(1, Duration::from_secs(60)),
                    otp_per_ip: SlidingWindow::new(30, hour),
                    login_failures_per_email: SlidingWindow::new(10, quarter),
                    login_failures_per_ip: SlidingWindow::new(100, quarter),
                },
            }),
        })
    }

    /// Issues a 6-digit code for `email` and returns it for the mail queue. One per 60 s per
    /// email, 30 per hour per client IP.
    pub async fn send_otp(&self, email: &str, client_ip: IpAddr) -> Result<String> {
        let email = normalize_email(email)?;
        let inner = &self.inner;
        let now = Instant::now();
        if inner.config.rate_limits {
            inner
                .limits
                .otp_per_email
                .check(&email, now)
                .map_err(|s| rate_limited(s, "An OTP was sent to this email recently"))?;
            inner.limits.otp_per_ip.check(&client_ip, now).map_err(|s| rate_limited(s, "Too many OTP requests"))?;
            inner.limits.otp_per_email.record(email.clone(), now);
            inner.limits.otp_per_ip.record(client_ip, now);
        }
        let code = format!("{:06}", rand::rng().random_range(0..1_000_000u32));
        let created_at = now_ms();
        inner
            .store
            .put_otp(OtpRecord {
                code_hash: self.otp_hash(&email, &code),
                email,
                created_at,
                expires_at: created_at + OTP_TTL.as_millis() as i64,
                attempts: 0,
            })
            .await?;
        Ok(code)
    }

    /// Checks a code: valid 10 minutes, single use, 5 wrong tries burn it.
    pub async fn verify_otp(&self, email: &str, code: &str) -> Result<()> {
        let email = normalize_email(email)?;
        let code = code.trim();
        if code.len() != 6 || !code.bytes().all(|b| b.is_ascii_digit()) {
            return Err(Error::field("otp", "otp must be the 6-digit code from the email"));
        }
        match self.inner.store.check_otp(&email, &self.otp_hash(&email, code), now_ms()).await? {
            OtpOutcome::Verified => Ok(()),
            OtpOutcome::Wrong { remaining: 0 } => {
                Err(Error::field("otp", "Invalid OTP; too many wrong tries, request a new code"))
            }
            OtpOutcome::Wrong { remaining } => Err(Error::field("otp", format!("Invalid OTP; {remaining} tries left"))),
            OtpOutcome::NoCode => Err(Error::field("otp", "No valid OTP for this email; request a new code")),
        }
    }

    /// Registers a customer.
    pub async fn register_customer(&self, reg: Registration) -> Result<User> {
        let new = self.new_user(reg, Role::Customer).await?;
        self.inner.store.insert_user(new).await.map_err(duplicate_email)
    }

    /// Registers a pharmacy and its owner. Under `Approval::Auto` it is in broadcasts at once.
    pub async fn register_pharmacy(
        &self,
        reg: Registration,
        pharmacy_name: &str,
        location: LatLng,
    ) -> Result<(User, Pharmacy)> {
        let pharmacy_name = required("pharmacy_name", pharmacy_name, 200)?;
        let new = self.new_user(reg, Role::Pharmacy).await?;
        let pharmacy =
            NewPharmacy { name: pharmacy_name, location, approved: self.inner.config.approval == Approval::Auto };
        let (user, pharmacy) = self.inner.store.insert_pharmacy_user(new, pharmacy).await.map_err(duplicate_email)?;
        if pharmacy.approved {
            self.inner.index.upsert(card(&pharmacy));
        }
        Ok((user, pharmacy))
    }

    /// Creates an ADMIN account (`sanjevani admin create`).
    pub async fn create_admin(&self, reg: Registration) -> Result<User> {
        let new = self.new_user(reg, Role::Admin).await?;
        self.inner.store.insert_user(new).await.map_err(duplicate_email)
    }

    /// Checks credentials. After 10 failures for an email, or 100 from a client IP, within a
    /// sliding 15 minutes → 429, even with the right password.
    pub async fn login(&self, email: &str, password: &str, client_ip: IpAddr) -> Result<User> {
        let inner = &self.inner;
        let email = email.trim().to_lowercase();
        let now = Instant::now();
        if inner.config.rate_limits {
            let too_many = |s| rate_limited(s, "Too many failed logins; try again later");
            inner.limits.login_failures_per_email.check(&email, now).map_err(too_many)?;
            inner.limits.login_failures_per_ip.check(&client_ip, now).map_err(too_many)?;
        }
        let user = inner.store.user_by_email(&email).await?;
        let hash = user.as_ref().map_or(inner.decoy_hash.clone(), |u| u.password_hash.clone());
        let matches = self.verify_password(password, hash).await? && user.is_some();
        match user {
            Some(user) if matches => Ok(user),
            _ => {
                if inner.config.rate_limits {
                    inner.limits.login_failures_per_email.record(email, now);
                    inner.limits.login_failures_per_ip.record(client_ip, now);
                }
                Err(Error::Unauthorized("Invalid email or password".into()))
            }
        }
    }

    /// One account by id.
    pub async fn user(&self, id: UserId) -> Result<Option<User>> {
        self.inner.store.user_by_id(id).await
    }

    /// The pharmacy owned by `user_id`.
    pub async fn pharmacy_of(&self, user_id: UserId) -> Result<Option<Pharmacy>> {
        self.inner.store.pharmacy_by_user(user_id).await
    }

    /// Applies a profile change; a new location is used by the very next broadcast.
    pub async fn update_pharmacy(&self, id: PharmacyId, mut patch: PharmacyPatch) -> Result<Pharmacy> {
        if let Some(name) = patch.name.take() {
            patch.name = Some(required("pharmacy_name", &name, 200)?);
        }
        if let Some(phone) = patch.phone_number.take() {
            patch.phone_number = Some(required("phone_number", &phone, 32)?);
        }
        let pharmacy = self.inner.store.update_pharmacy(id, patch).await?;
        if pharmacy.approved {
            self.inner.index.upsert(card(&pharmacy));
        }
        Ok(pharmacy)
    }

    /// Approves a pharmacy: it joins broadcasts at once.
    pub async fn approve(&self, id: PharmacyId) -> Result<Pharmacy> {
        let pharmacy = self.inner.store.set_pharmacy_approved(id, true).await?;
        self.inner.index.upsert(card(&pharmacy));
        Ok(pharmacy)
    }

    /// Suspends a pharmacy: out of broadcasts at once, its sockets closed with 4003.
    pub async fn suspend(&self, id: PharmacyId) -> Result<Pharmacy> {
        let pharmacy = self.inner.store.set_pharmacy_approved(id, false).await?;
        self.inner.index.remove(id);
        self.inner.fanout.close(Audience::Pharmacy(id), Close::SUSPENDED);
        Ok(pharmacy)
    }

    /// Pharmacies with their owners for the admin list.
    pub async fn list_pharmacies(&self, approved: Option<bool>) -> Result<Vec<PharmacyListing>> {
        self.inner.store.list_pharmacies(approved).await
    }

    async fn new_user(&self, reg: Registration, role: Role) -> Result<NewUser> {
        let email = normalize_email(&reg.email)?;
        if reg.password.chars().count() < MIN_PASSWORD_CHARS {
            return Err(Error::field("password", "password must be at least 8 characters"));
        }
        if reg.password.len() > 1024 {
            return Err(Error::field("password", "password must be at most 1024 bytes"));
        }
        let name = required("name", &reg.name, 200)?;
        let phone_number = if role == Role::Admin {
            reg.phone_number.trim().to_string()
        } else {
            required("phone_number", &reg.phone_number, 32)?
        };
        let email_verified = self.inner.store.email_verified(&email).await?;
        let password_hash = self.hash_password(reg.password).await?;
        Ok(NewUser { email, password_hash, name, phone_number, role, email_verified, created_at: now_ms() })
    }

    async fn hash_password(&self, password: String) -> Result<String> {
        let _permit = self.inner.hashing.acquire().await.map_err(|_| Error::Unavailable("shutting down".into()))?;
        tokio::task::spawn_blocking(move || hash_blocking(&password))
            .await
            .map_err(|e| Error::Unavailable(format!("password hashing failed: {e}")))?
    }

    async fn verify_password(&self, password: &str, hash: String) -> Result<bool> {
        let _permit = self.inner.hashing.acquire().await.map_err(|_| Error::Unavailable("shutting down".into()))?;
        let password = password.to_owned();
        tokio::task::spawn_blocking(move || {
            PasswordHash::new(&hash)
                .is_ok_and(|parsed| argon2id().verify_password(password.as_bytes(), &parsed).is_ok())
        })
        .await
        .map_err(|e| Error::Unavailable(format!("password check failed: {e}")))
    }

    fn otp_hash(&self, email: &str, code: &str) -> String {
        let Ok(mut mac) = <Hmac<Sha256> as KeyInit>::new_from_slice(&self.inner.otp_key) else {
            return String::new();
        };
        mac.update(email.as_bytes());
        mac.update(b":");
        mac.update(code.as_bytes());
        mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// Hashes `password` with argon2id at the server's parameters, on this thread (tens of
/// milliseconds). For tools that write accounts straight into the store, such as `generate-city`,
/// which hashes its one load-test password once and gives every generated account that hash.
pub fn hash_password_blocking(password: &str) -> Result<String> {
    if password.chars().count() < MIN_PASSWORD_CHARS {
        return Err(Error::field("password", "password must be at least 8 characters"));
    }
    hash_blocking(password)
}

fn hash_blocking(password: &str) -> Result<String> {
    argon2id()
        .hash_password(password.as_bytes())
        .map(|h| h.to_string())
        .map_err(|e| Error::Unavailable(format!("password hashing failed: {e}")))
}

/// The index's view of a pharmacy.
pub fn card(p: &Pharmacy) -> PharmacyCard {
    PharmacyCard { id: p.id, name: p.name.as_str().into(), location: p.location }
}

/// Trims and lower-cases an email and checks it looks like one.
pub fn normalize_email(email: &str) -> Result<String> {
    let email = email.trim().to_lowercase();
    let valid = email.len() <= 254
        && email.split_once('@').is_some_and(|(local, domain)| {
            !local.is_empty() && domain.contains('.') && !domain.starts_with('.') && !domain.ends_with('.')
        })
        && !email.chars().any(|c| c.is_whitespace() || c.is_control())
        && email.matches('@').count() == 1;
    if valid { Ok(email) } else { Err(Error::field("email", "email must be a valid email address")) }
}

fn required(field: &'static str, value: &str, max_chars: usize) -> Result<String> {
    let value = value.trim();
    if value.is_empty() {
        return Err(Error::field(field, format!("{field} is required")));
    }
    if value.chars().count() > max_chars {
        return Err(Error::field(field, format!("{field} must be at most {max_chars} characters")));
    }
    Ok(value.to_string())
}

fn duplicate_email(e: Error) -> Error {
    match e {
        Error::Conflict(_) => Error::Conflict("An account with this email already exists".into()),
        other => other,
    }
}

fn rate_limited(retry_after_secs: u64, message: &str) -> Error {
    Error::RateLimited { retry_after_secs, message: message.into() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emails_are_normalised() {
        assert_eq!(normalize_email("  John@Example.COM ").unwrap(), "john@example.com");
        for bad in ["", "a", "a@b", "@b.c", "a@.c", "a b@c.d", "a@b@c.d"] {
            assert!(normalize_email(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn sliding_window_counts_and_tells_when_to_retry() {
        let window = SlidingWindow::new(2, Duration::from_secs(60));
        let t0 = Instant::now();
        assert!(window.check(&"k", t0).is_ok());
        window.record("k", t0);
        window.record("k", t0 + Duration::from_secs(10));
        assert_eq!(window.check(&"k", t0 + Duration::from_secs(20)), Err(40));
        assert!(window.check(&"k", t0 + Duration::from_secs(60)).is_ok());
        assert!(window.check(&"other", t0).is_ok());
    }

    #[test]
    fn owasp_parameters_and_round_trip() {
        let hash = hash_blocking("correct horse").unwrap();
        assert!(hash.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{hash}");
        let parsed = PasswordHash::new(&hash).unwrap();
        assert!(argon2id().verify_password(b"correct horse", &parsed).is_ok());
        assert!(argon2id().verify_password(b"wrong horse", &parsed).is_err());
    }
}
