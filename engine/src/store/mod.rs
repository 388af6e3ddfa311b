//! Durable records behind one small trait, so the lifecycle and accounts do not care where they
//! live. `SqliteStore` is the embedded default: WAL mode, one writer thread that owns the
//! connection and drains a bounded write-ahead queue in batches, committing once per batch
//! (group commit), and a syncer thread that fdatasyncs the WAL behind it, once for every commit
//! made since its last call, so that the writer never waits for the disk. `MemoryStore` keeps the
//! same rules in memory; the engine tests run against both. A later PostgreSQL implementation
//! decides the once-only transitions (accept, cancel, expire) with the same conditional UPDATEs.
//!
//! Every method that returns `Ok` for a write has made it durable (for SQLite: committed and
//! fsynced). The two `*_visible` methods answer earlier, once the write is committed and
//! visible to every reader (it then survives the process dying, but not yet a power loss), with
//! a [`Durable`] the caller awaits before it acknowledges anything: the lifecycle fans a new
//! request (or its acceptance) out at commit and answers the HTTP call at durability. Storage
//! failures come back as `Error::Unavailable`.

mod memory;
mod sqlite;

pub use memory::MemoryStore;
pub use sqlite::{
    BATCH_SIZE_BOUNDS, Buckets, BulkLoader, COMMIT_MICROS_BOUNDS, CommitHistograms, SqliteStore, StoreOptions,
    StoreStats,
};

use crate::error::{Error, Result};
use crate::model::*;
use async_trait::async_trait;
use tokio::sync::watch;

/// How far commits are durable: every commit numbered up to `synced`, unless `failed`.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct SyncMark {
    pub(crate) synced: u64,
    pub(crate) failed: bool,
}

/// A committed write's durability, to await before acknowledging it.
#[must_use = "a write is not durable until this is awaited"]
#[derive(Debug)]
pub struct Durable(Option<(u64, watch::Receiver<SyncMark>)>);

impl Durable {
    /// Already durable.
    pub fn now() -> Durable {
        Durable(None)
    }

    pub(crate) fn pending(seq: u64, marks: watch::Receiver<SyncMark>) -> Durable {
        Durable(Some((seq, marks)))
    }

    /// Waits until the write is on disk; `Error::Unavailable` if the sync failed (the write is
    /// committed, but it must not be acknowledged).
    pub async fn wait(self) -> Result<()> {
        let Some((seq, mut marks)) = self.0 else { return Ok(()) };
        let unavailable = || Error::store("make a write durable", "the WAL could not be synced");
        let mark = *marks.wait_for(|m| m.synced >= seq || m.failed).await.map_err(|_| unavailable())?;
        if mark.synced >= seq { Ok(()) } else { Err(unavailable()) }
    }
}

/// How long an `Idempotency-Key` binds a customer's create to its first result.
pub const IDEMPOTENCY_WINDOW_MS: i64 = 24 * 60 * 60 * 1000;

/// Wrong OTP tries that burn a code.
pub const OTP_MAX_ATTEMPTS: u32 = 5;

/// The engine's persistence. Implementations must be safe to call from many tasks at once.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    // ---- accounts ----

    /// Creates an account. A taken email → `Error::Conflict`.
    async fn insert_user(&self, user: NewUser) -> Result<User>;
    /// Creates a PHARMACY account and its pharmacy in one transaction. Taken email → `Conflict`.
    async fn insert_pharmacy_user(&self, user: NewUser, pharmacy: NewPharmacy) -> Result<(User, Pharmacy)>;
    /// The account with this (lower-case) email.
    async fn user_by_email(&self, email: &str) -> Result<Option<User>>;
    /// The account with this id.
    async fn user_by_id(&self, id: UserId) -> Result<Option<User>>;
    /// The pharmacy owned by this user.
    async fn pharmacy_by_user(&self, user_id: UserId) -> Result<Option<Pharmacy>>;
    /// The pharmacy with this id.
    async fn pharmacy_by_id(&self, id: PharmacyId) -> Result<Option<Pharmacy>>;
    /// Applies a profile change (name and location on the pharmacy, phone on its owner).
    /// Unknown id → `NotFound`.
    async fn update_pharmacy(&self, id: PharmacyId, patch: PharmacyPatch) -> Result<Pharmacy>;
    /// Approves or suspends. Unknown id → `NotFound`.
    async fn set_pharmacy_approved(&self, id: PharmacyId, approved: bool) -> Result<Pharmacy>;
    /// Pharmacies with their owners, by pharmacy id ascending; `Some(b)` filters on `approved`.
    async fn list_pharmacies(&self, approved: Option<bool>) -> Result<Vec<PharmacyListing>>;
    /// Every pharmacy, for start-up (approved ones go into the index).
    async fn load_pharmacies(&self) -> Result<Vec<Pharmacy>>;

    // ---- email verification ----

    /// Stores a fresh OTP for `otp.email`, replacing any earlier one (attempts start at 0).
    async fn put_otp(&self, otp: OtpRecord) -> Result<()>;
    /// The live OTP for this email, if any (expired ones may be returned; callers check).
    async fn otp(&self, email: &str) -> Result<Option<OtpRecord>>;
    /// Checks a code hash atomically: a match consumes the code and marks the email verified
    /// (the user's `email_verified` too, if the account exists); a miss counts one try and
    /// deletes the code at `OTP_MAX_ATTEMPTS`; an expired code is deleted and reported `NoCode`.
    async fn check_otp(&self, email: &str, code_hash: &str, now: UnixMs) -> Result<OtpOutcome>;
    /// Whether the email was verified by OTP (before or after registering).
    async fn email_verified(&self, email: &str) -> Result<bool>;

    // ---- medicine requests ----

    /// Stores a new PENDING request and its recipients (nearest first) in one transaction.
    /// With an idempotency key the customer already used within `IDEMPOTENCY_WINDOW_MS` of
    /// `req.created_at`, stores nothing and returns that request as `Created::Existing`; an
    /// older use of the key no longer binds it.
    async fn create_request(&self, req: NewRequest, recipients: Vec<Recipient>) -> Result<Created>;
    /// As [`Store::create_request`], answering once the request is committed and visible; the
    /// caller must await the [`Durable`] before acknowledging it.
    async fn create_request_visible(&self, req: NewRequest, recipients: Vec<Recipient>) -> Result<(Created, Durable)> {
        Ok((self.create_request(req, recipients).await?, Durable::now()))
    }
    /// Records a response, deciding atomically: a pharmacy's earlier response → `Repeat`;
    /// not a recipient (or no such request) → `NotNotified`; request not PENDING → `Closed`;
    /// ACCEPTED → conditional `PENDING → ACCEPTED` with `pharmacy_id`/`pharmacy_name` set and
    /// the response stored (`Recorded` means this pharmacy won); REJECTED → stored while PENDING.
    async fn record_response(&self, resp: NewResponse) -> Result<ResponseOutcome>;
    /// As [`Store::record_response`], answering once the decision is committed and visible; the
    /// caller must await the [`Durable`] before acknowledging it.
    async fn record_response_visible(&self, resp: NewResponse) -> Result<(ResponseOutcome, Durable)> {
        Ok((self.record_response(resp).await?, Durable::now()))
    }
    /// PENDING → CANCELLED for the owner. Not the owner's or unknown → `NotFound`.
    async fn cancel_request(&self, id: RequestId, customer_id: UserId, now: UnixMs) -> Result<Decision>;
    /// PENDING → EXPIRED. Unknown → `NotFound`.
    async fn expire_request(&self, id: RequestId, now: UnixMs) -> Result<Decision>;
    /// One request.
    async fn request(&self, id: RequestId) -> Result<Option<MedicineRequest>>;
    /// A customer's requests, newest first.
    async fn requests_of_customer(&self, customer_id: UserId) -> Result<Vec<MedicineRequest>>;
    /// A request's responses, oldest first.
    async fn responses(&self, request_id: RequestId) -> Result<Vec<PharmacyResponse>>;
    /// A request's recipients, nearest first.
    async fn recipients(&self, request_id: RequestId) -> Result<Vec<Recipient>>;
    /// For start-up: every PENDING request, and every request closed at or after
    /// `closed_since`, each with its recipients and who responded.
    async fn load_live_requests(&self, closed_since: UnixMs) -> Result<Vec<RequestSnapshot>>;
}

// ---- rules both implementations share, so they cannot drift apart ----

/// The form an email is stored and looked up in. Accounts already normalise at the edge; the
/// store does it again so that no caller can create two accounts that differ only in case.
pub(crate) fn normalize_email(email: &str) -> String {
    email.trim().to_lowercase()
}

/// Whether an earlier use of an idempotency key at `first_ms` still binds a create at `now_ms`.
pub(crate) fn idempotency_binds(first_ms: UnixMs, now_ms: UnixMs) -> bool {
    now_ms - first_ms <= IDEMPOTENCY_WINDOW_MS
}

/// Whether an OTP is past its expiry at `now` (at `expires_at` exactly it is already dead).
pub(crate) fn otp_expired(otp_expires_at: UnixMs, now: UnixMs) -> bool {
    now >= otp_expires_at
}

/// Compares two code hashes in time independent of where they differ, so that response timing
/// tells an attacker nothing about the stored hash.
pub(crate) fn same_code_hash(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The 409 for a taken email, worded once for both implementations.
pub(crate) fn email_taken() -> crate::Error {
    crate::Error::Conflict("An account with this email already exists".into())
}

/// The 404 for an unknown pharmacy id.
pub(crate) fn pharmacy_not_found() -> crate::Error {
    crate::Error::NotFound("Pharmacy not found".into())
}

/// The 404 for an unknown request id, or one the caller may not see.
pub(crate) fn request_not_found() -> crate::Error {
    crate::Error::NotFound("Request not found".into())
}
