//! The same store rules as SQLite, kept in memory behind one `parking_lot::Mutex`: for the
//! engine's tests, which should not need a file, and as the reference the SQLite store is checked
//! against by the shared contract suite. Every method takes the lock once and never across an
//! `.await`, so each call is atomic exactly as a command on SQLite's writer thread is. Nothing is
//! durable.

use super::{
    Store, email_taken, idempotency_binds, normalize_email, otp_expired, pharmacy_not_found, request_not_found,
    same_code_hash,
};
use crate::error::Result;
use crate::model::*;
use async_trait::async_trait;
use parking_lot::Mutex;
use rustc_hash::{FxHashMap, FxHashSet};
use std::collections::BTreeMap;

/// An in-memory [`Store`]; ids start at 1 in every table, as SQLite's do.
#[derive(Debug, Default)]
pub struct MemoryStore {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    users: BTreeMap<UserId, User>,
    user_by_email: FxHashMap<String, UserId>,
    pharmacies: BTreeMap<PharmacyId, Pharmacy>,
    pharmacy_by_user: FxHashMap<UserId, PharmacyId>,
    otps: FxHashMap<String, OtpRecord>,
    verified_emails: FxHashSet<String>,
    requests: BTreeMap<RequestId, MedicineRequest>,
    /// Nearest first, as given.
    recipients: FxHashMap<RequestId, Vec<Recipient>>,
    /// In the order recorded, which is oldest first.
    responses: FxHashMap<RequestId, Vec<PharmacyResponse>>,
    /// The newest request per (customer, idempotency key).
    idempotency: FxHashMap<(UserId, String), RequestId>,
    next_user: i64,
    next_pharmacy: i64,
    next_request: i64,
    next_response: i64,
}

/// Hands out ids from 1 upwards.
fn next(counter: &mut i64) -> i64 {
    *counter += 1;
    *counter
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }
}

impl State {
    fn insert_user(&mut self, user: NewUser) -> Result<User> {
        let email = normalize_email(&user.email);
        if self.user_by_email.contains_key(&email) {
            return Err(email_taken());
        }
        let user = user.into_user(next(&mut self.next_user), email);
        self.user_by_email.insert(user.email.clone(), user.id);
        self.users.insert(user.id, user.clone());
        Ok(user)
    }

    fn pharmacy_mut(&mut self, id: PharmacyId) -> Result<&mut Pharmacy> {
        self.pharmacies.get_mut(&id).ok_or_else(pharmacy_not_found)
    }

    fn close(&mut self, id: RequestId, owner: Option<UserId>, to: RequestStatus, now: UnixMs) -> Result<Decision> {
        let req = self.requests.get_mut(&id).ok_or_else(request_not_found)?;
        if owner.is_some_and(|owner| owner != req.customer_id) {
            return Err(request_not_found());
        }
        if req.status != RequestStatus::Pending {
            return Ok(Decision::Lost(req.status));
        }
        req.status = to;
        req.closed_at = Some(now);
        Ok(Decision::Won)
    }
}

#[async_trait]
impl Store for MemoryStore {
    async fn insert_user(&self, user: NewUser) -> Result<User> {
        self.state.lock().insert_user(user)
    }

    async fn insert_pharmacy_user(&self, user: NewUser, pharmacy: NewPharmacy) -> Result<(User, Pharmacy)> {
        let mut state = self.state.lock();
        let user = state.insert_user(user)?;
        let pharmacy = Pharmacy {
            id: next(&mut state.next_pharmacy),
            user_id: user.id,
            name: pharmacy.name,
            location: pharmacy.location,
            approved: pharmacy.approved,
            created_at: user.created_at,
        };
        state.pharmacy_by_user.insert(user.id, pharmacy.id);
        state.pharmacies.insert(pharmacy.id, pharmacy.clone());
        Ok((user, pharmacy))
    }

    async fn user_by_email(&self, email: &str) -> Result<Option<User>> {
        let state = self.state.lock();
        Ok(state.user_by_email.get(&normalize_email(email)).and_then(|id| state.users.get(id)).cloned())
    }

    async fn user_by_id(&self, id: UserId) -> Result<Option<User>> {
        Ok(self.state.lock().users.get(&id).cloned())
    }

    async fn pharmacy_by_user(&self, user_id: UserId) -> Result<Option<Pharmacy>> {
        let state = self.state.lock();
        Ok(state.pharmacy_by_user.get(&user_id).and_then(|id| state.pharmacies.get(id)).cloned())
    }

    async fn pharmacy_by_id(&self, id: PharmacyId) -> Result<Option<Pharmacy>> {
        Ok(self.state.lock().pharmacies.get(&id).cloned())
    }

    async fn update_pharmacy(&self, id: PharmacyId, patch: PharmacyPatch) -> Result<Pharmacy> {
        let mut state = self.state.lock();
        let pharmacy = state.pharmacy_mut(id)?;
        if let Some(name) = patch.name {
            pharmacy.name = name;
        }
        if let Some(location) = patch.location {
            pharmacy.location = location;
        }
        let pharmacy = pharmacy.clone();
        if let Some(phone) = patch.phone_number
            && let Some(owner) = state.users.get_mut(&pharmacy.user_id)
        {
            owner.phone_number = phone;
        }
        Ok(pharmacy)
    }

    async fn set_pharmacy_approved(&self, id: PharmacyId, approved: bool) -> Result<Pharmacy> {
        let mut state = self.state.lock();
        let pharmacy = state.pharmacy_mut(id)?;
        pharmacy.approved = approved;
        Ok(pharmacy.clone())
    }

    async fn list_pharmacies(&self, approved: Option<bool>) -> Result<Vec<PharmacyListing>> {
        let state = self.state.lock();
        Ok(state
            .pharmacies
            .values()
            .filter(|p| approved.is_none_or(|a| p.approved == a))
            .filter_map(|p| {
                let owner = state.users.get(&p.user_id)?;
                Some(PharmacyListing {
                    pharmacy: p.clone(),
                    email: owner.email.clone(),
                    owner_name: owner.name.clone(),
                    phone_number: owner.phone_number.clone(),
                })
            })
            .collect())
    }

    async fn load_pharmacies(&self) -> Result<Vec<Pharmacy>> {
        Ok(self.state.lock().pharmacies.values().cloned().collect())
    }

    async fn put_otp(&self, otp: OtpRecord) -> Result<()> {
        let email = normalize_email(&otp.email);
        let otp = OtpRecord { email: email.clone(), attempts: 0, ..otp };
        self.state.lock().otps.insert(email, otp);
        Ok(())
    }

    async fn otp(&self, email: &str) -> Result<Option<OtpRecord>> {
        Ok(self.state.lock().otps.get(&normalize_email(email)).cloned())
    }

    async fn check_otp(&self, email: &str, code_hash: &str, now: UnixMs) -> Result<OtpOutcome> {
        let email = normalize_email(email);
        let mut state = self.state.lock();
        let Some(otp) = state.otps.get_mut(&email) else {
            return Ok(OtpOutcome::NoCode);
        };
        if otp_expired(otp.expires_at, now) {
            state.otps.remove(&email);
            return Ok(OtpOutcome::NoCode);
        }
        if same_code_hash(&otp.code_hash, code_hash) {
            state.otps.remove(&email);
            if let Some(user) = state.user_by_email.get(&email).copied().and_then(|id| state.users.get_mut(&id)) {
                user.email_verified = true;
            }
            state.verified_emails.insert(email);
            return Ok(OtpOutcome::Verified);
        }
        otp.attempts = otp.attempts.saturating_add(1);
        if otp.attempts >= super::OTP_MAX_ATTEMPTS {
            state.otps.remove(&email);
            return Ok(OtpOutcome::Wrong { remaining: 0 });
        }
        Ok(OtpOutcome::Wrong { remaining: super::OTP_MAX_ATTEMPTS - otp.attempts })
    }

    async fn email_verified(&self, email: &str) -> Result<bool> {
        let email = normalize_email(email);
        let state = self.state.lock();
        Ok(state.verified_emails.contains(&email)
            || state.user_by_email.get(&email).and_then(|id| state.users.get(id)).is_some_and(|u| u.email_verified))
    }

    async fn create_request(&self, req: NewRequest, recipients: Vec<Recipient>) -> Result<Created> {
        let mut state = self.state.lock();
        if let Some(key) = &req.idempotency_key
            && let Some(earlier) =
                state.idempotency.get(&(req.customer_id, key.clone())).and_then(|id| state.requests.get(id))
            && idempotency_binds(earlier.created_at, req.created_at)
        {
            return Ok(Created::Existing(earlier.clone()));
        }
        let request = req.into_request(next(&mut state.next_request));
        if let Some(key) = &request.idempotency_key {
            state.idempotency.insert((request.customer_id, key.clone()), request.id);
        }
        state.recipients.insert(request.id, recipients);
        state.requests.insert(request.id, request.clone());
        Ok(Created::New(request))
    }

    async fn record_response(&self, resp: NewResponse) -> Result<ResponseOutcome> {
        let mut state = self.state.lock();
        let state = &mut *state;
        if let Some(earlier) = state
            .responses
            .get(&resp.request_id)
            .and_then(|list| list.iter().find(|r| r.pharmacy_id == resp.pharmacy_id))
        {
            return Ok(ResponseOutcome::Repeat(earlier.clone()));
        }
        let notified = state
            .recipients
            .get(&resp.request_id)
            .is_some_and(|list| list.iter().any(|r| r.pharmacy_id == resp.pharmacy_id));
        let Some(request) = state.requests.get_mut(&resp.request_id).filter(|_| notified) else {
            return Ok(ResponseOutcome::NotNotified);
        };
        if request.status != RequestStatus::Pending {
            return Ok(ResponseOutcome::Closed(request.status));
        }
        if resp.response_type == ResponseType::Accepted {
            request.status = RequestStatus::Accepted;
            request.pharmacy_id = Some(resp.pharmacy_id);
            request.pharmacy_name = Some(resp.pharmacy_name.clone());
            request.closed_at = Some(resp.responded_at);
        }
        let response = resp.into_response(next(&mut state.next_response));
        state.responses.entry(response.request_id).or_default().push(response.clone());
        Ok(ResponseOutcome::Recorded(response))
    }

    async fn cancel_request(&self, id: RequestId, customer_id: UserId, now: UnixMs) -> Result<Decision> {
        self.state.lock().close(id, Some(customer_id), RequestStatus::Cancelled, now)
    }

    async fn expire_request(&self, id: RequestId, now: UnixMs) -> Result<Decision> {
        self.state.lock().close(id, None, RequestStatus::Expired, now)
    }

    async fn request(&self, id: RequestId) -> Result<Option<MedicineRequest>> {
        Ok(self.state.lock().requests.get(&id).cloned())
    }

    async fn requests_of_customer(&self, customer_id: UserId) -> Result<Vec<MedicineRequest>> {
        let mut list: Vec<MedicineRequest> =
            self.state.lock().requests.values().filter(|r| r.customer_id == customer_id).cloned().collect();
        list.sort_by_key(|r| std::cmp::Reverse((r.created_at, r.id)));
        Ok(list)
    }

    async fn responses(&self, request_id: RequestId) -> Result<Vec<PharmacyResponse>> {
        let mut list = self.state.lock().responses.get(&request_id).cloned().unwrap_or_default();
        list.sort_by_key(|r| (r.responded_at, r.id));
        Ok(list)
    }

    async fn recipients(&self, request_id: RequestId) -> Result<Vec<Recipient>> {
        Ok(self.state.lock().recipients.get(&request_id).cloned().unwrap_or_default())
    }

    async fn load_live_requests(&self, closed_since: UnixMs) -> Result<Vec<RequestSnapshot>> {
        let state = self.state.lock();
        Ok(state
            .requests
            .values()
            .filter(|r| r.status == RequestStatus::Pending || r.closed_at.is_some_and(|at| at >= closed_since))
            .map(|r| RequestSnapshot {
                request: r.clone(),
                recipients: state.recipients.get(&r.id).cloned().unwrap_or_default(),
                responded: state
                    .responses
                    .get(&r.id)
                    .map(|list| {
                        let mut answers: Vec<_> = list.iter().map(|x| (x.pharmacy_id, x.response_type)).collect();
                        answers.sort_unstable_by_key(|(pharmacy, _)| *pharmacy);
                        answers
                    })
                    .unwrap_or_default(),
            })
            .collect())
    }
}
