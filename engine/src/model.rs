//! The records the engine keeps: accounts, pharmacies, medicine requests, their recipients and
//! responses. These are plain data shared by the store, the lifecycle and the shell; the rules
//! that change them live in `lifecycle` and `accounts`.

use crate::geo::LatLng;

/// A user's id (the `users` table).
pub type UserId = i64;
/// A pharmacy record's id (distinct from its owner's user id, as in the seed).
pub type PharmacyId = i64;
/// A medicine request's id.
pub type RequestId = i64;
/// A pharmacy response's id.
pub type ResponseId = i64;
/// Milliseconds since the Unix epoch, UTC.
pub type UnixMs = i64;

/// An account's role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Posts medicine requests.
    Customer,
    /// Answers them.
    Pharmacy,
    /// Approves pharmacies and watches the system.
    Admin,
}

impl Role {
    /// The role as the API spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Customer => "CUSTOMER",
            Role::Pharmacy => "PHARMACY",
            Role::Admin => "ADMIN",
        }
    }

    /// Parses the API spelling.
    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "CUSTOMER" => Some(Role::Customer),
            "PHARMACY" => Some(Role::Pharmacy),
            "ADMIN" => Some(Role::Admin),
            _ => None,
        }
    }
}

/// A stored account.
#[derive(Debug, Clone, PartialEq)]
pub struct User {
    /// Id.
    pub id: UserId,
    /// Trimmed, lower-case email.
    pub email: String,
    /// argon2id PHC string; never leaves the engine.
    pub password_hash: String,
    /// Display name.
    pub name: String,
    /// Phone number as given.
    pub phone_number: String,
    /// Role.
    pub role: Role,
    /// Whether the email was verified by OTP before registration.
    pub email_verified: bool,
    /// Creation time.
    pub created_at: UnixMs,
}

/// An account to create; the store assigns the id.
#[derive(Debug, Clone, PartialEq)]
pub struct NewUser {
    /// Trimmed, lower-case email.
    pub email: String,
    /// argon2id PHC string.
    pub password_hash: String,
    /// Display name.
    pub name: String,
    /// Phone number.
    pub phone_number: String,
    /// Role.
    pub role: Role,
    /// Whether the email was verified beforehand.
    pub email_verified: bool,
    /// Creation time.
    pub created_at: UnixMs,
}

impl NewUser {
    /// The stored account this becomes with `id` and its normalised `email`.
    pub fn into_user(self, id: UserId, email: String) -> User {
        User {
            id,
            email,
            password_hash: self.password_hash,
            name: self.name,
            phone_number: self.phone_number,
            role: self.role,
            email_verified: self.email_verified,
            created_at: self.created_at,
        }
    }
}

/// A stored pharmacy.
#[derive(Debug, Clone, PartialEq)]
pub struct Pharmacy {
    /// Pharmacy id.
    pub id: PharmacyId,
    /// The owning PHARMACY account.
    pub user_id: UserId,
    /// The pharmacy's business name.
    pub name: String,
    /// Where it is.
    pub location: LatLng,
    /// Approved pharmacies are in broadcasts; new (under manual approval) and suspended ones are not.
    pub approved: bool,
    /// Creation time.
    pub created_at: UnixMs,
}

/// A pharmacy to create with its account.
#[derive(Debug, Clone, PartialEq)]
pub struct NewPharmacy {
    /// Business name.
    pub name: String,
    /// Location.
    pub location: LatLng,
    /// Approved at once (`--pharmacy-approval auto`) or not.
    pub approved: bool,
}

/// A change to a pharmacy's profile; `None` leaves a field as it is.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PharmacyPatch {
    /// New business name.
    pub name: Option<String>,
    /// New location.
    pub location: Option<LatLng>,
    /// New phone number (kept on the owning user).
    pub phone_number: Option<String>,
}

/// A pharmacy joined with its owner, as the admin list shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct PharmacyListing {
    /// The pharmacy.
    pub pharmacy: Pharmacy,
    /// Owner's email.
    pub email: String,
    /// Owner's name.
    pub owner_name: String,
    /// Owner's phone.
    pub phone_number: String,
}

/// Where a medicine request is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RequestStatus {
    /// Open: recipients may respond.
    Pending,
    /// A pharmacy accepted first.
    Accepted,
    /// The customer cancelled it.
    Cancelled,
    /// Nobody accepted within the TTL.
    Expired,
}

impl RequestStatus {
    /// The status as the API spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            RequestStatus::Pending => "PENDING",
            RequestStatus::Accepted => "ACCEPTED",
            RequestStatus::Cancelled => "CANCELLED",
            RequestStatus::Expired => "EXPIRED",
        }
    }

    /// Parses the API spelling.
    pub fn parse(s: &str) -> Option<RequestStatus> {
        match s {
            "PENDING" => Some(RequestStatus::Pending),
            "ACCEPTED" => Some(RequestStatus::Accepted),
            "CANCELLED" => Some(RequestStatus::Cancelled),
            "EXPIRED" => Some(RequestStatus::Expired),
            _ => None,
        }
    }
}

/// A pharmacy's answer to a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ResponseType {
    /// Has it and commits to it.
    Accepted,
    /// Cannot fulfil it.
    Rejected,
}

impl ResponseType {
    /// As the API spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            ResponseType::Accepted => "ACCEPTED",
            ResponseType::Rejected => "REJECTED",
        }
    }

    /// Parses the API spelling.
    pub fn parse(s: &str) -> Option<ResponseType> {
        match s {
            "ACCEPTED" => Some(ResponseType::Accepted),
            "REJECTED" => Some(ResponseType::Rejected),
            _ => None,
        }
    }
}

/// A stored medicine request.
#[derive(Debug, Clone, PartialEq)]
pub struct MedicineRequest {
    /// Id.
    pub id: RequestId,
    /// The customer who posted it.
    pub customer_id: UserId,
    /// The customer's name when posted.
    pub patient_name: String,
    /// The customer's phone when posted.
    pub patient_phone: String,
    /// Where the patient is.
    pub location: LatLng,
    /// Search radius in km (1–50).
    pub radius_km: f64,
    /// Units needed (≥ 1).
    pub quantity: u32,
    /// Optional medicine name (≤ 200 chars).
    pub medicine_name: Option<String>,
    /// Optional note (≤ 1,000 chars).
    pub note: Option<String>,
    /// Media key of the prescription image under the media folder, if any.
    pub image: Option<String>,
    /// Current status.
    pub status: RequestStatus,
    /// The winning pharmacy, once accepted.
    pub pharmacy_id: Option<PharmacyId>,
    /// The winning pharmacy's name when it accepted.
    pub pharmacy_name: Option<String>,
    /// The customer's `Idempotency-Key`, if one was sent.
    pub idempotency_key: Option<String>,
    /// Creation time.
    pub created_at: UnixMs,
    /// When it expires if nobody accepts.
    pub expires_at: UnixMs,
    /// When it left PENDING.
    pub closed_at: Option<UnixMs>,
}

/// A request to create. The store assigns the id; status starts PENDING.
#[derive(Debug, Clone, PartialEq)]
pub struct NewRequest {
    /// The customer.
    pub customer_id: UserId,
    /// Customer's name now.
    pub patient_name: String,
    /// Customer's phone now.
    pub patient_phone: String,
    /// Patient location.
    pub location: LatLng,
    /// Radius in km.
    pub radius_km: f64,
    /// Units.
    pub quantity: u32,
    /// Medicine name.
    pub medicine_name: Option<String>,
    /// Note.
    pub note: Option<String>,
    /// Image media key.
    pub image: Option<String>,
    /// `Idempotency-Key`, unique per customer within 24 h.
    pub idempotency_key: Option<String>,
    /// Creation time.
    pub created_at: UnixMs,
    /// Expiry time.
    pub expires_at: UnixMs,
}

impl NewRequest {
    /// The stored request this becomes once the store has given it `id`: PENDING, unassigned.
    pub fn into_request(self, id: RequestId) -> MedicineRequest {
        MedicineRequest {
            id,
            customer_id: self.customer_id,
            patient_name: self.patient_name,
            patient_phone: self.patient_phone,
            location: self.location,
            radius_km: self.radius_km,
            quantity: self.quantity,
            medicine_name: self.medicine_name,
            note: self.note,
            image: self.image,
            status: RequestStatus::Pending,
            pharmacy_id: None,
            pharmacy_name: None,
            idempotency_key: self.idempotency_key,
            created_at: self.created_at,
            expires_at: self.expires_at,
            closed_at: None,
        }
    }
}

/// A pharmacy notified of a request, as it was when notified.
#[derive(Debug, Clone, PartialEq)]
pub struct Recipient {
    /// Pharmacy id.
    pub pharmacy_id: PharmacyId,
    /// Its name then.
    pub pharmacy_name: String,
    /// Its location then.
    pub location: LatLng,
    /// Great-circle distance to the patient, km (unrounded).
    pub distance_km: f64,
}

/// A stored pharmacy response.
#[derive(Debug, Clone, PartialEq)]
pub struct PharmacyResponse {
    /// Id.
    pub id: ResponseId,
    /// The request answered.
    pub request_id: RequestId,
    /// The pharmacy answering.
    pub pharmacy_id: PharmacyId,
    /// Its name then.
    pub pharmacy_name: String,
    /// ACCEPTED or REJECTED.
    pub response_type: ResponseType,
    /// Optional text.
    pub text_message: Option<String>,
    /// Media key of an audio note, if any.
    pub audio: Option<String>,
    /// When recorded.
    pub responded_at: UnixMs,
}

/// A response to record; the store assigns the id.
#[derive(Debug, Clone, PartialEq)]
pub struct NewResponse {
    /// The request.
    pub request_id: RequestId,
    /// The pharmacy.
    pub pharmacy_id: PharmacyId,
    /// Its name now.
    pub pharmacy_name: String,
    /// ACCEPTED or REJECTED.
    pub response_type: ResponseType,
    /// Optional text.
    pub text_message: Option<String>,
    /// Audio media key.
    pub audio: Option<String>,
    /// Time of the response.
    pub responded_at: UnixMs,
}

impl NewResponse {
    /// The stored response this becomes once the store has given it `id`.
    pub fn into_response(self, id: ResponseId) -> PharmacyResponse {
        PharmacyResponse {
            id,
            request_id: self.request_id,
            pharmacy_id: self.pharmacy_id,
            pharmacy_name: self.pharmacy_name,
            response_type: self.response_type,
            text_message: self.text_message,
            audio: self.audio,
            responded_at: self.responded_at,
        }
    }
}

/// What the store decided for a response, atomically on its writer.
#[derive(Debug, Clone, PartialEq)]
pub enum ResponseOutcome {
    /// Recorded. For ACCEPTED this pharmacy won the request (PENDING → ACCEPTED).
    Recorded(PharmacyResponse),
    /// This pharmacy had already responded; here is that response, unchanged.
    Repeat(PharmacyResponse),
    /// The request is no longer PENDING; nothing recorded.
    Closed(RequestStatus),
    /// The pharmacy was not notified of this request (or the request does not exist).
    NotNotified,
}

/// Outcome of a transition decided exactly once (cancel, expire).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// This call made the transition.
    Won,
    /// Someone else got there first: the request is in this status.
    Lost(RequestStatus),
}

/// Result of creating a request.
#[derive(Debug, Clone, PartialEq)]
pub enum Created {
    /// A new request with its recipients.
    New(MedicineRequest),
    /// The customer's idempotency key matched a request from the last 24 h: that one, untouched.
    Existing(MedicineRequest),
}

/// A request with everything needed to rebuild the lifecycle's in-memory view at start-up.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestSnapshot {
    /// The request.
    pub request: MedicineRequest,
    /// Recipients, nearest first.
    pub recipients: Vec<Recipient>,
    /// Pharmacies that have responded, with their answer.
    pub responded: Vec<(PharmacyId, ResponseType)>,
}

/// A stored OTP: the code only as a keyed hash.
#[derive(Debug, Clone, PartialEq)]
pub struct OtpRecord {
    /// Lower-case email.
    pub email: String,
    /// HMAC-SHA256 of the code, hex.
    pub code_hash: String,
    /// Issue time.
    pub created_at: UnixMs,
    /// Expiry time.
    pub expires_at: UnixMs,
    /// Wrong tries so far.
    pub attempts: u32,
}

/// What the store decided for an OTP check, atomically on its writer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OtpOutcome {
    /// The code matched: it is consumed and the email marked verified.
    Verified,
    /// Wrong code; this many tries remain (0: burned).
    Wrong {
        /// Tries left before the code is burned.
        remaining: u32,
    },
    /// No live code for this email (never sent, consumed, burned or expired).
    NoCode,
}
