//! The WebSocket messages, rendered to JSON bytes exactly as the seed documents them (field
//! names, nesting, string ids in `connection`) plus API.md's additions. Each message is rendered
//! once per event; `new_request`, which differs per pharmacy only in `distance_km`, is rendered
//! once as a [`Template`] with that number left open.

use crate::clock::rfc3339;
use crate::geo::{LatLng, round2};
use crate::hub::Template;
use crate::model::{MedicineRequest, Pharmacy, PharmacyResponse, Recipient, RequestId, RequestStatus, User};
use bytes::Bytes;
use serde::Serialize;

/// Turns a stored media key into the absolute URL a client fetches it from. The shell signs
/// URLs (`?exp=&sig=`); the engine only knows keys.
pub trait MediaUrls: Send + Sync + 'static {
    /// The URL for `key` under `base` (e.g. `http://127.0.0.1:8000`).
    fn url(&self, base: &str, key: &str) -> String;
}

/// Unsigned `base/media/key` URLs, for tests and tools.
pub struct PlainMediaUrls;

impl MediaUrls for PlainMediaUrls {
    fn url(&self, base: &str, key: &str) -> String {
        format!("{base}/media/{key}")
    }
}

#[derive(Serialize)]
struct Location {
    lat: f64,
    lng: f64,
}

impl From<LatLng> for Location {
    fn from(p: LatLng) -> Self {
        Location { lat: p.lat(), lng: p.lng() }
    }
}

fn to_bytes(value: &impl Serialize) -> Bytes {
    // Serialising these plain structs cannot fail: no maps with non-string keys, no I/O.
    Bytes::from(serde_json::to_vec(value).unwrap_or_default())
}

/// `connection` for a customer socket (ids as strings, as the seed documents).
pub fn customer_connection(user: &User) -> Bytes {
    #[derive(Serialize)]
    struct Msg<'a> {
        r#type: &'static str,
        message: &'static str,
        user_id: String,
        user_name: &'a str,
    }
    to_bytes(&Msg {
        r#type: "connection",
        message: "Connected to customer channel",
        user_id: user.id.to_string(),
        user_name: &user.name,
    })
}

/// `connection` for a pharmacy socket.
pub fn pharmacy_connection(pharmacy: &Pharmacy) -> Bytes {
    #[derive(Serialize)]
    struct Msg<'a> {
        r#type: &'static str,
        message: &'static str,
        pharmacy_id: String,
        pharmacy_name: &'a str,
        location: Location,
    }
    to_bytes(&Msg {
        r#type: "connection",
        message: "Connected to pharmacy channel",
        pharmacy_id: pharmacy.id.to_string(),
        pharmacy_name: &pharmacy.name,
        location: pharmacy.location.into(),
    })
}

/// `new_request` with `distance_km` left open; `replay` adds `"replay": true`.
pub fn new_request_template(req: &MedicineRequest, image_url: Option<&str>, replay: bool) -> Template {
    #[derive(Serialize)]
    struct Msg<'a> {
        r#type: &'static str,
        request_id: RequestId,
        patient_name: &'a str,
        patient_phone: &'a str,
        patient_location: Location,
        distance_km: f64,
        quantity: u32,
        image_url: Option<&'a str>,
        timestamp: String,
        medicine_name: Option<&'a str>,
        note: Option<&'a str>,
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        replay: bool,
    }
    let json = serde_json::to_vec(&Msg {
        r#type: "new_request",
        request_id: req.id,
        patient_name: &req.patient_name,
        patient_phone: &req.patient_phone,
        patient_location: req.location.into(),
        distance_km: 0.0,
        quantity: req.quantity,
        image_url,
        timestamp: rfc3339(req.created_at),
        medicine_name: req.medicine_name.as_deref(),
        note: req.note.as_deref(),
        replay,
    })
    .unwrap_or_default();
    // Keys are unique and every string value is escaped, so this byte run occurs exactly once.
    const OPEN: &[u8] = b"\"distance_km\":0.0";
    let at = json.windows(OPEN.len()).position(|w| w == OPEN).map_or(0, |p| p + OPEN.len() - 3);
    let json = Bytes::from(json);
    Template::new(json.slice(..at), json.slice(at + 3..))
}

/// `request_taken`, to the pharmacies that did not win.
pub fn request_taken(request_id: RequestId) -> Bytes {
    #[derive(Serialize)]
    struct Msg {
        r#type: &'static str,
        request_id: RequestId,
        message: &'static str,
    }
    to_bytes(&Msg {
        r#type: "request_taken",
        request_id,
        message: "This request has been accepted by another pharmacy",
    })
}

/// `request_cancelled` or `request_expired`.
pub fn request_closed(request_id: RequestId, status: RequestStatus) -> Bytes {
    #[derive(Serialize)]
    struct Msg {
        r#type: &'static str,
        request_id: RequestId,
    }
    let r#type = match status {
        RequestStatus::Expired => "request_expired",
        _ => "request_cancelled",
    };
    to_bytes(&Msg { r#type, request_id })
}

/// `pharmacy_response`, to the customer.
pub fn pharmacy_response(resp: &PharmacyResponse, recipient: &Recipient, audio_url: Option<&str>) -> Bytes {
    #[derive(Serialize)]
    struct Msg<'a> {
        r#type: &'static str,
        request_id: RequestId,
        pharmacy_id: i64,
        pharmacy_name: &'a str,
        pharmacy_location: Location,
        response_type: &'static str,
        text_message: Option<&'a str>,
        audio_url: Option<&'a str>,
        distance_km: f64,
        responded_at: String,
    }
    to_bytes(&Msg {
        r#type: "pharmacy_response",
        request_id: resp.request_id,
        pharmacy_id: resp.pharmacy_id,
        pharmacy_name: &resp.pharmacy_name,
        pharmacy_location: recipient.location.into(),
        response_type: resp.response_type.as_str(),
        text_message: resp.text_message.as_deref(),
        audio_url,
        distance_km: round2(recipient.distance_km),
        responded_at: rfc3339(resp.responded_at),
    })
}

/// `sync` for a pharmacy: the PENDING requests it was notified of and has not answered.
pub fn pharmacy_sync(pending: &[RequestId]) -> Bytes {
    #[derive(Serialize)]
    struct Msg<'a> {
        r#type: &'static str,
        pending: &'a [RequestId],
    }
    to_bytes(&Msg { r#type: "sync", pending })
}

/// `sync` for a customer: its PENDING requests and those closed within the last request TTL.
pub fn customer_sync(pending: &[RequestId], closed: &[(RequestId, RequestStatus)]) -> Bytes {
    #[derive(Serialize)]
    struct Closed {
        request_id: RequestId,
        status: &'static str,
    }
    #[derive(Serialize)]
    struct Msg<'a> {
        r#type: &'static str,
        pending: &'a [RequestId],
        closed: Vec<Closed>,
    }
    let closed = closed.iter().map(|&(request_id, s)| Closed { request_id, status: s.as_str() }).collect();
    to_bytes(&Msg { r#type: "sync", pending, closed })
}

/// `pong`, the answer to a client's `{"type":"ping"}`.
pub fn pong() -> Bytes {
    Bytes::from_static(b"{\"type\":\"pong\"}")
}

/// `error`, for a frame the server did not understand; the connection stays open.
pub fn error(message: &str) -> Bytes {
    to_bytes(&serde_json::json!({"type": "error", "message": message}))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::*;
    use serde_json::{Value, json};

    fn request() -> MedicineRequest {
        MedicineRequest {
            id: 1,
            customer_id: 7,
            patient_name: "John \"distance_km\":0.0 Doe".into(),
            patient_phone: "9841234567".into(),
            location: LatLng::new(27.7172, 85.324).unwrap(),
            radius_km: 10.0,
            quantity: 10,
            medicine_name: Some("Amoxicillin".into()),
            note: None,
            image: None,
            status: RequestStatus::Pending,
            pharmacy_id: None,
            pharmacy_name: None,
            idempotency_key: None,
            created_at: 1_771_929_000_000,
            expires_at: 1_771_929_900_000,
            closed_at: None,
        }
    }

    #[test]
    fn new_request_matches_the_seed_shape() {
        let t = new_request_template(&request(), Some("http://h/media/x.jpg"), false);
        let v: Value = serde_json::from_slice(&t.render(2.5)).unwrap();
        assert_eq!(
            v,
            json!({
                "type": "new_request", "request_id": 1, "patient_name": "John \"distance_km\":0.0 Doe",
                "patient_phone": "9841234567", "patient_location": {"lat": 27.7172, "lng": 85.324},
                "distance_km": 2.5, "quantity": 10, "image_url": "http://h/media/x.jpg",
                "timestamp": "2026-02-24T10:30:00Z", "medicine_name": "Amoxicillin", "note": null
            })
        );
        let replay: Value = serde_json::from_slice(&new_request_template(&request(), None, true).render(1.0)).unwrap();
        assert_eq!(replay["replay"], json!(true));
        assert_eq!(replay["distance_km"], json!(1.0));
    }

    #[test]
    fn connection_ids_are_strings() {
        let user = User {
            id: 7,
            email: "a@b.c".into(),
            password_hash: String::new(),
            name: "John Doe".into(),
            phone_number: String::new(),
            role: Role::Customer,
            email_verified: true,
            created_at: 0,
        };
        let v: Value = serde_json::from_slice(&customer_connection(&user)).unwrap();
        assert_eq!(
            v,
            json!({"type": "connection", "message": "Connected to customer channel", "user_id": "7", "user_name": "John Doe"})
        );
    }
}
