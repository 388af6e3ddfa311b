//! The medicine request's life, and who is told what. This module owns every rule of API.md's
//! "Medicine requests" and of the WebSocket event × recipient table:
//!
//! - create: query the index, record the request and its recipients durably, then queue one
//!   `new_request` (rendered once, distance patched per pharmacy) to every recipient, nearest first;
//! - respond: only notified pharmacies; a pharmacy answers once and a repeat gets its original
//!   answer back; the first ACCEPTED wins and everyone else notified is told it is taken;
//! - cancel by the owner while PENDING, and expiry after the request TTL;
//! - the replay and `sync` snapshot a (re)connecting client reads after subscribing.
//!
//! The in-memory view (open requests and those closed within the last TTL) answers the obvious
//! cases at once and feeds replays, but the transitions that must happen exactly once — accept,
//! cancel, expire — are decided by the store (a conditional UPDATE on its writer thread), so a
//! shared store can decide them for several nodes later. Messages for one request are queued
//! under that request's lock, so a pharmacy never sees `request_taken` before `new_request`.

use crate::clock::now_ms;
use crate::error::{ALREADY_ASSIGNED, Error, Result};
use crate::geo::{LatLng, RadiusKm};
use crate::hub::{Audience, Fanout};
use crate::index::PharmacyIndex;
use crate::message::{self, MediaUrls};
use crate::model::*;
use crate::store::Store;
use bytes::Bytes;
use dashmap::DashMap;
use parking_lot::Mutex;
use rustc_hash::{FxBuildHasher, FxHashMap};
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;
use tokio::sync::Notify;

/// Longest `medicine_name`, in characters.
pub const MAX_MEDICINE_NAME_CHARS: usize = 200;
/// Longest `note`, in characters.
pub const MAX_NOTE_CHARS: usize = 1000;
/// Longest `Idempotency-Key`, in bytes.
pub const MAX_IDEMPOTENCY_KEY: usize = 255;

/// Settings of the lifecycle.
#[derive(Debug, Clone)]
pub struct LifecycleConfig {
    /// How long a request stays PENDING without an acceptance (`--request-ttl`, default 15 min).
    pub request_ttl: Duration,
}

impl Default for LifecycleConfig {
    fn default() -> Self {
        LifecycleConfig { request_ttl: Duration::from_secs(15 * 60) }
    }
}

/// A customer's new request, already parsed at the edge into validated coordinates.
#[derive(Debug, Clone)]
pub struct RequestInput {
    /// Where the patient is.
    pub location: LatLng,
    /// Search radius.
    pub radius: RadiusKm,
    /// Units needed (≥ 1).
    pub quantity: i64,
    /// Optional medicine name (≤ 200 characters).
    pub medicine_name: Option<String>,
    /// Optional note (≤ 1,000 characters).
    pub note: Option<String>,
    /// Media key of an uploaded prescription image.
    pub image: Option<String>,
    /// `Idempotency-Key` header (1–255 printable ASCII).
    pub idempotency_key: Option<String>,
}

/// A pharmacy's answer.
#[derive(Debug, Clone)]
pub struct ResponseInput {
    /// The request answered.
    pub request_id: RequestId,
    /// ACCEPTED or REJECTED.
    pub response_type: ResponseType,
    /// Optional text.
    pub text_message: Option<String>,
    /// Media key of an audio note.
    pub audio: Option<String>,
}

/// What `create` did.
#[derive(Debug, Clone, PartialEq)]
pub struct CreatedRequest {
    /// The request (the first one again for a repeated idempotency key).
    pub request: MedicineRequest,
    /// How many pharmacies were notified.
    pub pharmacies_notified: usize,
    /// True when the idempotency key matched an earlier request and nothing new was created.
    pub repeated: bool,
}

/// What `respond` did.
#[derive(Debug, Clone, PartialEq)]
pub struct Responded {
    /// The recorded response (the original one for a repeat).
    pub response: PharmacyResponse,
    /// True when this was a repeat of the pharmacy's earlier, identical answer.
    pub repeated: bool,
}

/// A request with its responses and recipients, for the owner's detail view.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestDetail {
    /// The request.
    pub request: MedicineRequest,
    /// Responses, oldest first.
    pub responses: Vec<PharmacyResponse>,
    /// Notified pharmacies as they were when notified, nearest first.
    pub notified: Vec<Recipient>,
}

/// Counters for the operator view and `/metrics`.
#[derive(Debug, Default)]
pub struct LifecycleStats {
    /// Requests created.
    pub created: AtomicU64,
    /// Recipients at creation, summed.
    pub notified: AtomicU64,
    /// Requests accepted.
    pub accepted: AtomicU64,
    /// REJECTED responses recorded.
    pub rejected: AtomicU64,
    /// Requests cancelled.
    pub cancelled: AtomicU64,
    /// Requests expired.
    pub expired: AtomicU64,
    /// Requests PENDING now.
    pub pending: AtomicI64,
}

/// A request in memory: PENDING, or closed within the last TTL.
struct LiveRequest {
    request: MedicineRequest,
    recipients: Vec<Recipient>,
    responded: FxHashMap<PharmacyId, ResponseType>,
}

impl LiveRequest {
    fn recipient(&self, pharmacy_id: PharmacyId) -> Option<&Recipient> {
        self.recipients.iter().find(|r| r.pharmacy_id == pharmacy_id)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum TimerKind {
    /// PENDING past its TTL: ask the store to expire it.
    Expire,
    /// Closed more than a TTL ago: drop it from memory (customer `sync` no longer lists it).
    Forget,
}

#[derive(Default)]
struct Timers {
    due: Mutex<BinaryHeap<Reverse<(UnixMs, TimerKind, RequestId)>>>,
    wake: Notify,
}

impl Timers {
    fn schedule(&self, at: UnixMs, kind: TimerKind, id: RequestId) {
        let mut due = self.due.lock();
        let earliest = due.peek().is_none_or(|Reverse((first, ..))| at < *first);
        due.push(Reverse((at, kind, id)));
        drop(due);
        if earliest {
            self.wake.notify_one();
        }
    }
}

struct Inner {
    store: Arc<dyn Store>,
    fanout: Arc<dyn Fanout>,
    index: Arc<PharmacyIndex>,
    urls: Arc<dyn MediaUrls>,
    ttl_ms: i64,
    live: DashMap<RequestId, Arc<Mutex<LiveRequest>>, FxBuildHasher>,
    /// Per pharmacy: PENDING requests it was notified of and has not answered, with distances.
    unanswered: DashMap<PharmacyId, FxHashMap<RequestId, f64>, FxBuildHasher>,
    /// Per customer: its live requests.
    by_customer: DashMap<UserId, Vec<RequestId>, FxBuildHasher>,
    timers: Arc<Timers>,
    stats: LifecycleStats,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Let the timer task see that the lifecycle is gone and stop.
        self.timers.wake.notify_one();
    }
}

/// The request lifecycle. Cheap to clone; clones share one state.
#[derive(Clone)]
pub struct Lifecycle {
    inner: Arc<Inner>,
}

impl Lifecycle {
    /// Loads PENDING requests and those closed within the last TTL from the store, starts the
    /// expiry timer (requests whose TTL passed while the server was down expire at once) and
    /// returns the lifecycle. Must be called inside a tokio runtime.
    pub async fn start(
        store: Arc<dyn Store>,
        fanout: Arc<dyn Fanout>,
        index: Arc<PharmacyIndex>,
        urls: Arc<dyn MediaUrls>,
        config: LifecycleConfig,
    ) -> Result<Lifecycle> {
        let ttl_ms = i64::try_from(config.request_ttl.as_millis()).unwrap_or(i64::MAX / 4).max(1);
        let inner = Arc::new(Inner {
            store,
            fanout,
            index,
            urls,
            ttl_ms,
            live: DashMap::with_hasher(FxBuildHasher),
            unanswered: DashMap::with_hasher(FxBuildHasher),
            by_customer: DashMap::with_hasher(FxBuildHasher),
            timers: Arc::new(Timers::default()),
            stats: LifecycleStats::default(),
        });
        let snapshots = inner.store.load_live_requests(now_ms() - ttl_ms).await?;
        for snap in snapshots {
            inner.restore(snap);
        }
        tokio::spawn(run_timers(Arc::downgrade(&inner), inner.timers.clone()));
        Ok(Lifecycle { inner })
    }

    /// The lifecycle's counters.
    pub fn stats(&self) -> &LifecycleStats {
        &self.inner.stats
    }

    /// Creates a request for `customer`, records it with its recipients (approved pharmacies in
    /// the radius, nearest first) and queues `new_request` to each. `base_url` is what media URLs
    /// in the broadcast are built on. A repeated idempotency key returns the first request.
    ///
    /// Runs to completion on its own task: a caller that goes away (an HTTP client that
    /// disconnects drops its handler) cannot stop it between the store's commit and the fan-out.
    pub async fn create(&self, customer: &User, input: RequestInput, base_url: &str) -> Result<CreatedRequest> {
        let (this, customer, base_url) = (self.clone(), customer.clone(), base_url.to_owned());
        detached(async move { this.create_now(&customer, input, &base_url).await }).await
    }

    async fn create_now(&self, customer: &User, input: RequestInput, base_url: &str) -> Result<CreatedRequest> {
        let inner = &self.inner;
        if customer.role != Role::Customer {
            return Err(Error::Forbidden("Only customers can create medicine requests".into()));
        }
        let quantity = u32::try_from(input.quantity)
            .ok()
            .filter(|q| *q >= 1)
            .ok_or_else(|| Error::field("quantity", "quantity must be a whole number of at least 1"))?;
        let medicine_name = non_empty(input.medicine_name);
        if medicine_name.as_ref().is_some_and(|s| s.chars().count() > MAX_MEDICINE_NAME_CHARS) {
            return Err(Error::field("medicine_name", "medicine_name must be at most 200 characters"));
        }
        let note = non_empty(input.note);
        if note.as_ref().is_some_and(|s| s.chars().count() > MAX_NOTE_CHARS) {
            return Err(Error::field("note", "note must be at most 1000 characters"));
        }
        if let Some(key) = &input.idempotency_key {
            validate_idempotency_key(key)?;
        }

        let recipients = inner.index.recipients_within(input.location, input.radius.km());
        let now = now_ms();
        let new = NewRequest {
            customer_id: customer.id,
            patient_name: customer.name.clone(),
            patient_phone: customer.phone_number.clone(),
            location: input.location,
            radius_km: input.radius.km(),
            quantity,
            medicine_name,
            note,
            image: input.image,
            idempotency_key: input.idempotency_key,
            created_at: now,
            expires_at: now + inner.ttl_ms,
        };
        // Fanned out as soon as it is committed (visible to every reader, safe from the process
        // dying); the customer's 201 waits until it is on disk.
        let (created, durable) = inner.store.create_request_visible(new, recipients.clone()).await?;
        match created {
            Created::Existing(request) => {
                durable.wait().await?;
                let pharmacies_notified = match inner.live.get(&request.id).map(|e| e.value().clone()) {
                    Some(live) => live.lock().recipients.len(),
                    None => inner.store.recipients(request.id).await?.len(),
                };
                Ok(CreatedRequest { request, pharmacies_notified, repeated: true })
            }
            Created::New(request) => {
                let pharmacies_notified = recipients.len();
                inner.stats.created.fetch_add(1, Ordering::Relaxed);
                inner.stats.notified.fetch_add(pharmacies_notified as u64, Ordering::Relaxed);
                inner.open(request.clone(), recipients, FxHashMap::default(), Some(base_url));
                durable.wait().await?;
                Ok(CreatedRequest { request, pharmacies_notified, repeated: false })
            }
        }
    }

    /// Records a pharmacy's answer. First ACCEPTED wins; a repeat of the pharmacy's own answer
    /// gets the original back and sends nothing; see API.md for every other case.
    /// Runs to completion on its own task, as [`Lifecycle::create`] does.
    pub async fn respond(&self, pharmacy: &Pharmacy, input: ResponseInput, base_url: &str) -> Result<Responded> {
        let (this, pharmacy, base_url) = (self.clone(), pharmacy.clone(), base_url.to_owned());
        detached(async move { this.respond_now(&pharmacy, input, &base_url).await }).await
    }

    async fn respond_now(&self, pharmacy: &Pharmacy, input: ResponseInput, base_url: &str) -> Result<Responded> {
        let inner = &self.inner;
        let live = inner.live.get(&input.request_id).map(|e| e.value().clone());
        if let Some(live) = &live {
            // Answer the obvious refusals from memory; the store decides everything else.
            let state = live.lock();
            if state.recipient(pharmacy.id).is_none() {
                return Err(not_found());
            }
            if state.request.status != RequestStatus::Pending && !state.responded.contains_key(&pharmacy.id) {
                return Err(closed_error(state.request.status));
            }
        }
        // As for creates: the winner's news goes out at commit, every answer waits for the disk.
        let (outcome, durable) = inner
            .store
            .record_response_visible(NewResponse {
                request_id: input.request_id,
                pharmacy_id: pharmacy.id,
                pharmacy_name: pharmacy.name.clone(),
                response_type: input.response_type,
                text_message: non_empty(input.text_message),
                audio: input.audio,
                responded_at: now_ms(),
            })
            .await?;
        if let ResponseOutcome::Recorded(response) = &outcome {
            inner.recorded(response, live, base_url).await?;
        }
        durable.wait().await?;
        match outcome {
            ResponseOutcome::Recorded(response) => Ok(Responded { response, repeated: false }),
            ResponseOutcome::Repeat(response) if response.response_type == input.response_type => {
                Ok(Responded { response, repeated: true })
            }
            ResponseOutcome::Repeat(response) => Err(Error::Conflict(format!(
                "This pharmacy has already responded {} to this request",
                response.response_type.as_str()
            ))),
            ResponseOutcome::Closed(status) => Err(closed_error(status)),
            ResponseOutcome::NotNotified => Err(not_found()),
        }
    }

    /// Cancels the owner's PENDING request and tells its customer and the pharmacies that have
    /// not answered.
    /// Runs to completion on its own task, as [`Lifecycle::create`] does.
    pub async fn cancel(&self, customer_id: UserId, request_id: RequestId) -> Result<MedicineRequest> {
        let this = self.clone();
        detached(async move { this.cancel_now(customer_id, request_id).await }).await
    }

    async fn cancel_now(&self, customer_id: UserId, request_id: RequestId) -> Result<MedicineRequest> {
        let inner = &self.inner;
        if let Some(live) = inner.live.get(&request_id).map(|e| e.value().clone()) {
            let state = live.lock();
            if state.request.customer_id != customer_id {
                return Err(not_found());
            }
            if state.request.status != RequestStatus::Pending {
                return Err(not_pending(state.request.status));
            }
        }
        let now = now_ms();
        match inner.store.cancel_request(request_id, customer_id, now).await? {
            Decision::Won => {
                inner.stats.cancelled.fetch_add(1, Ordering::Relaxed);
                Ok(inner.close(request_id, RequestStatus::Cancelled, now).await?)
            }
            Decision::Lost(status) => Err(not_pending(status)),
        }
    }

    /// The owner's request with its responses and recipients; anyone else's → 404.
    pub async fn detail(&self, customer_id: UserId, request_id: RequestId) -> Result<RequestDetail> {
        let store = &self.inner.store;
        let request =
            store.request(request_id).await?.filter(|r| r.customer_id == customer_id).ok_or_else(not_found)?;
        let responses = store.responses(request_id).await?;
        let notified = store.recipients(request_id).await?;
        Ok(RequestDetail { request, responses, notified })
    }

    /// The customer's requests, newest first.
    pub async fn list(&self, customer_id: UserId) -> Result<Vec<MedicineRequest>> {
        self.inner.store.requests_of_customer(customer_id).await
    }

    /// PENDING requests this pharmacy was notified of and has not answered, nearest first, with
    /// its distance to each.
    pub fn pending_for_pharmacy(&self, pharmacy_id: PharmacyId) -> Vec<(MedicineRequest, f64)> {
        let mut ids: Vec<(RequestId, f64)> = self
            .inner
            .unanswered
            .get(&pharmacy_id)
            .map(|m| m.iter().map(|(&id, &d)| (id, d)).collect())
            .unwrap_or_default();
        ids.sort_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)));
        ids.into_iter()
            .filter_map(|(id, distance)| {
                let live = self.inner.live.get(&id).map(|e| e.value().clone())?;
                let state = live.lock();
                let open =
                    state.request.status == RequestStatus::Pending && !state.responded.contains_key(&pharmacy_id);
                open.then(|| (state.request.clone(), distance))
            })
            .collect()
    }

    /// What a (re)connecting socket reads after it has subscribed to live messages: for a
    /// pharmacy, a `new_request` with `"replay": true` for each request it would find in
    /// [`pending_for_pharmacy`](Self::pending_for_pharmacy), then `sync` naming them; for a
    /// customer, `sync` with its PENDING requests and those closed within the last TTL.
    pub fn replay(&self, who: Audience, base_url: &str) -> Vec<Bytes> {
        match who {
            Audience::Pharmacy(pharmacy_id) => {
                let pending = self.pending_for_pharmacy(pharmacy_id);
                let mut frames: Vec<Bytes> = pending
                    .iter()
                    .map(|(req, distance)| {
                        let image = req.image.as_deref().map(|key| self.inner.urls.url(base_url, key));
                        let template = message::new_request_template(req, image.as_deref(), true);
                        Bytes::from(template.render(crate::geo::round2(*distance)))
                    })
                    .collect();
                let ids: Vec<RequestId> = pending.iter().map(|(r, _)| r.id).collect();
                frames.push(message::pharmacy_sync(&ids));
                frames
            }
            Audience::Customer(customer_id) => {
                let ids = self.inner.by_customer.get(&customer_id).map(|v| v.clone()).unwrap_or_default();
                let (mut pending, mut closed) = (Vec::new(), Vec::new());
                for id in ids {
                    let Some(live) = self.inner.live.get(&id).map(|e| e.value().clone()) else {
                        continue;
                    };
                    match live.lock().request.status {
                        RequestStatus::Pending => pending.push(id),
                        status => closed.push((id, status)),
                    }
                }
                vec![message::customer_sync(&pending, &closed)]
            }
        }
    }
}

impl Inner {
    /// Puts a request into memory; with `broadcast_base`, queues `new_request` to its recipients
    /// while still holding the request's lock.
    fn open(
        &self,
        request: MedicineRequest,
        recipients: Vec<Recipient>,
        responded: FxHashMap<PharmacyId, ResponseType>,
        broadcast_base: Option<&str>,
    ) {
        let id = request.id;
        let customer_id = request.customer_id;
        let pending = request.status == RequestStatus::Pending;
        let expires_at = request.expires_at;
        let forget_at = request.closed_at.map(|t| t + self.ttl_ms);
        let live = Arc::new(Mutex::new(LiveRequest { request, recipients, responded }));
        let state = live.lock();
        self.live.insert(id, live.clone());
        self.by_customer.entry(customer_id).or_default().push(id);
        if pending {
            for r in state.recipients.iter().filter(|r| !state.responded.contains_key(&r.pharmacy_id)) {
                self.unanswered.entry(r.pharmacy_id).or_default().insert(id, r.distance_km);
            }
            self.stats.pending.fetch_add(1, Ordering::Relaxed);
            self.timers.schedule(expires_at, TimerKind::Expire, id);
        } else if let Some(at) = forget_at {
            self.timers.schedule(at, TimerKind::Forget, id);
        }
        if let Some(base) = broadcast_base {
            let image = state.request.image.as_deref().map(|key| self.urls.url(base, key));
            let template = Arc::new(message::new_request_template(&state.request, image.as_deref(), false));
            let targets: Vec<(Audience, f64)> = state
                .recipients
                .iter()
                .map(|r| (Audience::Pharmacy(r.pharmacy_id), crate::geo::round2(r.distance_km)))
                .collect();
            self.fanout.send_patched(&template, &targets);
        }
    }

    fn restore(&self, snap: RequestSnapshot) {
        let responded = snap.responded.into_iter().collect();
        self.open(snap.request, snap.recipients, responded, None);
    }

    /// The request's in-memory state; one this node does not hold (another node created it, or
    /// it closed long ago) is loaded from the store, detached from the maps, so that its
    /// messages still go out.
    async fn live_or_load(&self, id: RequestId) -> Result<Arc<Mutex<LiveRequest>>> {
        if let Some(live) = self.live.get(&id).map(|e| e.value().clone()) {
            return Ok(live);
        }
        let request = self.store.request(id).await?.ok_or_else(not_found)?;
        let recipients = self.store.recipients(id).await?;
        let responded = self.store.responses(id).await?.into_iter().map(|r| (r.pharmacy_id, r.response_type)).collect();
        Ok(Arc::new(Mutex::new(LiveRequest { request, recipients, responded })))
    }

    /// A response the store recorded: update memory and tell the customer (and, for the winner,
    /// every other notified pharmacy).
    async fn recorded(
        &self,
        response: &PharmacyResponse,
        live: Option<Arc<Mutex<LiveRequest>>>,
        base_url: &str,
    ) -> Result<()> {
        let live = match live {
            Some(live) => live,
            None => self.live_or_load(response.request_id).await?,
        };
        let mut state = live.lock();
        state.responded.insert(response.pharmacy_id, response.response_type);
        self.drop_unanswered(response.pharmacy_id, response.request_id);
        let audio = response.audio.as_deref().map(|key| self.urls.url(base_url, key));
        if let Some(recipient) = state.recipient(response.pharmacy_id) {
            let msg = message::pharmacy_response(response, recipient, audio.as_deref());
            self.fanout.send_each(&[Audience::Customer(state.request.customer_id)], &msg);
        }
        match response.response_type {
            ResponseType::Rejected => {
                self.stats.rejected.fetch_add(1, Ordering::Relaxed);
            }
            ResponseType::Accepted => {
                self.stats.accepted.fetch_add(1, Ordering::Relaxed);
                if state.request.status == RequestStatus::Pending {
                    self.stats.pending.fetch_sub(1, Ordering::Relaxed);
                }
                state.request.status = RequestStatus::Accepted;
                state.request.pharmacy_id = Some(response.pharmacy_id);
                state.request.pharmacy_name = Some(response.pharmacy_name.clone());
                state.request.closed_at = Some(response.responded_at);
                let others: Vec<Audience> = state
                    .recipients
                    .iter()
                    .filter(|r| r.pharmacy_id != response.pharmacy_id)
                    .map(|r| Audience::Pharmacy(r.pharmacy_id))
                    .collect();
                self.forget_unanswered(&state);
                self.fanout.send_each(&others, &message::request_taken(response.request_id));
                self.timers.schedule(response.responded_at + self.ttl_ms, TimerKind::Forget, response.request_id);
            }
        }
        Ok(())
    }

    /// A cancel or expiry the store decided: update memory, tell the customer and the pharmacies
    /// that have not answered. Returns the closed request.
    async fn close(&self, id: RequestId, status: RequestStatus, now: UnixMs) -> Result<MedicineRequest> {
        let live = self.live_or_load(id).await?;
        let mut state = live.lock();
        if state.request.status == RequestStatus::Pending {
            self.stats.pending.fetch_sub(1, Ordering::Relaxed);
        }
        state.request.status = status;
        state.request.closed_at = Some(now);
        let msg = message::request_closed(id, status);
        let mut told: Vec<Audience> = vec![Audience::Customer(state.request.customer_id)];
        told.extend(
            state
                .recipients
                .iter()
                .filter(|r| !state.responded.contains_key(&r.pharmacy_id))
                .map(|r| Audience::Pharmacy(r.pharmacy_id)),
        );
        self.forget_unanswered(&state);
        self.fanout.send_each(&told, &msg);
        self.timers.schedule(now + self.ttl_ms, TimerKind::Forget, id);
        Ok(state.request.clone())
    }

    fn forget_unanswered(&self, state: &LiveRequest) {
        for r in &state.recipients {
            self.drop_unanswered(r.pharmacy_id, state.request.id);
        }
    }

    fn drop_unanswered(&self, pharmacy_id: PharmacyId, request_id: RequestId) {
        if let Some(mut pending) = self.unanswered.get_mut(&pharmacy_id) {
            pending.remove(&request_id);
        }
        self.unanswered.remove_if(&pharmacy_id, |_, pending| pending.is_empty());
    }

    async fn expire(self: Arc<Self>, id: RequestId) {
        let now = now_ms();
        match self.store.expire_request(id, now).await {
            Ok(Decision::Won) => {
                self.stats.expired.fetch_add(1, Ordering::Relaxed);
                if let Err(error) = self.close(id, RequestStatus::Expired, now).await {
                    tracing::warn!(request_id = id, %error, "expired request could not be reloaded");
                }
            }
            Ok(Decision::Lost(_)) => {}
            Err(Error::NotFound(_)) => {
                self.live.remove(&id);
            }
            Err(error) => {
                tracing::warn!(request_id = id, %error, "expiry failed; retrying in 1 s");
                self.timers.schedule(now + 1000, TimerKind::Expire, id);
            }
        }
    }

    fn forget(&self, id: RequestId) {
        if let Some((_, live)) = self.live.remove(&id) {
            let customer_id = live.lock().request.customer_id;
            if let dashmap::Entry::Occupied(mut ids) = self.by_customer.entry(customer_id) {
                ids.get_mut().retain(|&r| r != id);
                if ids.get().is_empty() {
                    ids.remove();
                }
            }
        }
    }
}

/// Fires expiries and forgets. Holds only a weak reference, so it ends with the lifecycle.
async fn run_timers(inner: Weak<Inner>, timers: Arc<Timers>) {
    loop {
        let wake = timers.wake.notified();
        let next = timers.due.lock().peek().map(|Reverse(entry)| *entry);
        let Some(inner) = inner.upgrade() else { return };
        match next {
            Some((at, kind, id)) if at <= now_ms() => {
                timers.due.lock().pop();
                match kind {
                    // Each expiry is its own task so that many due at once share the store's batches.
                    TimerKind::Expire => {
                        let still_pending = inner
                            .live
                            .get(&id)
                            .is_some_and(|e| e.value().lock().request.status == RequestStatus::Pending);
                        if still_pending {
                            tokio::spawn(inner.clone().expire(id));
                        }
                    }
                    TimerKind::Forget => {
                        let closed = inner
                            .live
                            .get(&id)
                            .is_some_and(|e| e.value().lock().request.status != RequestStatus::Pending);
                        if closed {
                            inner.forget(id);
                        }
                    }
                }
            }
            Some((at, ..)) => {
                drop(inner);
                let sleep = Duration::from_millis(u64::try_from(at - now_ms()).unwrap_or(0));
                let _ = tokio::time::timeout(sleep, wake).await;
            }
            None => {
                drop(inner);
                wake.await;
            }
        }
    }
}

fn non_empty(s: Option<String>) -> Option<String> {
    s.filter(|s| !s.trim().is_empty())
}

fn validate_idempotency_key(key: &str) -> Result<()> {
    let printable = key.bytes().all(|b| (0x20..=0x7e).contains(&b));
    if key.is_empty() || key.len() > MAX_IDEMPOTENCY_KEY || !printable {
        return Err(Error::invalid("Idempotency-Key must be 1 to 255 printable ASCII characters"));
    }
    Ok(())
}

fn not_found() -> Error {
    Error::NotFound("Medicine request not found".into())
}

fn closed_error(status: RequestStatus) -> Error {
    match status {
        RequestStatus::Accepted => Error::invalid(ALREADY_ASSIGNED),
        RequestStatus::Cancelled => Error::invalid("This request has been cancelled"),
        RequestStatus::Expired => Error::invalid("This request has expired"),
        RequestStatus::Pending => Error::invalid("This request is still pending"),
    }
}

fn not_pending(status: RequestStatus) -> Error {
    Error::invalid(format!("Only a PENDING request can be cancelled; this one is {}", status.as_str()))
}

/// Runs `work` on a task of its own and waits for it. A store decision (a commit) must always be
/// followed by what depends on it (memory, messages), whether or not the caller still waits.
async fn detached<T: Send + 'static>(work: impl Future<Output = Result<T>> + Send + 'static) -> Result<T> {
    tokio::spawn(work).await.map_err(|e| Error::store("finish a request's change", e))?
}
