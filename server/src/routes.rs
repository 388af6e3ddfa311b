//! The route table and the handlers. Each handler authenticates, parses its body into validated
//! engine types, calls the engine, and renders JSON; the checks run in API.md's order
//! (401 → 403 → 429 → 415 → 413 → 400 → 404 → state). Both trailing-slash forms of every path
//! reach the same handler without a redirect.

use crate::app::App;
use crate::auth::TokenType;
use crate::body::{self, Form};
use crate::console;
use crate::http::{Body, Ctx, json};
use crate::mail::Mail;
use crate::media::MediaKind;
use crate::metrics;
use crate::ws;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use sanjevani_engine::Error;
use sanjevani_engine::accounts::Registration;
use sanjevani_engine::clock::rfc3339;
use sanjevani_engine::geo::{LatLng, RadiusKm, round2};
use sanjevani_engine::lifecycle::{RequestInput, ResponseInput};
use sanjevani_engine::model::*;
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

type Reply = Result<Response<Body>, Error>;

/// Dispatches a request to its handler; unknown path → 404, known path with another method → 405.
pub async fn route(app: &Arc<App>, req: Request<Incoming>, ctx: &Ctx) -> Reply {
    let path = req.uri().path().to_owned();
    let segments: Vec<&str> = path.trim_matches('/').split('/').filter(|s| !s.is_empty()).collect();
    let method = req.method().clone();
    use Method as M;
    macro_rules! allow {
        ($($m:ident => $h:expr),+ $(,)?) => {
            match method {
                $(M::$m => $h,)+
                _ => method_not_allowed(&[$(stringify!($m)),+]),
            }
        };
    }
    if segments.first() == Some(&"health") && segments.len() == 1 {
        return allow!(GET => Ok(health(app)));
    }
    if segments.first() == Some(&"metrics") && segments.len() == 1 {
        return allow!(GET => Ok(metrics::scrape(app, bearer(&req))));
    }
    // The console's files need nothing from the store: served while starting too.
    if let Some(asset) = console::asset(&segments) {
        return allow!(GET => Ok(console::respond(asset, req.headers())));
    }
    if !app.is_ready() && segments.first() != Some(&"media") {
        return Err(Error::Unavailable("The server is starting; try again shortly".into()));
    }
    match segments.as_slice() {
        ["send-otp"] => allow!(POST => send_otp(app, req, ctx).await),
        ["verify-otp"] => allow!(POST => verify_otp(app, req).await),
        ["login"] => allow!(POST => login(app, req, ctx).await),
        ["token", "refresh"] => allow!(POST => refresh(app, req).await),
        ["customer", "register"] => allow!(POST => register_customer(app, req).await),
        ["pharmacy", "register"] => allow!(POST => register_pharmacy(app, req).await),
        ["customer", "profile"] => allow!(GET => customer_profile(app, &req).await),
        ["pharmacy", "profile"] => {
            allow!(GET => pharmacy_profile(app, &req).await, PATCH => patch_pharmacy(app, req).await)
        }
        ["pharmacy", "requests"] => allow!(GET => pharmacy_requests(app, &req, ctx).await),
        ["medicine", "request"] => {
            allow!(POST => create_request(app, req, ctx).await, GET => list_requests(app, &req, ctx).await)
        }
        ["medicine", "request", id] => allow!(GET => request_detail(app, &req, ctx, id).await),
        ["medicine", "request", id, "cancel"] => allow!(POST => cancel_request(app, req, id).await),
        ["medicine", "response"] => allow!(POST => respond(app, req, ctx).await),
        ["admin", "pharmacies"] => allow!(GET => admin_list(app, &req).await),
        ["admin", "pharmacies", id, action @ ("approve" | "suspend")] => {
            let approve = *action == "approve";
            allow!(POST => admin_set(app, req, id, approve).await)
        }
        ["admin", "stats"] => allow!(GET => admin_stats(app, &req).await),
        ["media", rest @ ..] if !rest.is_empty() => {
            let key = rest.join("/");
            allow!(GET => media(app, &req, &key).await)
        }
        ["ws", "customer"] => allow!(GET => ws::upgrade(app, req, ws::Side::Customer).await),
        ["ws", "pharmacy"] => allow!(GET => ws::upgrade(app, req, ws::Side::Pharmacy).await),
        ["openapi.json"] => allow!(GET => Ok(openapi())),
        _ => Err(Error::NotFound("Not found".into())),
    }
}

fn method_not_allowed(allowed: &[&str]) -> Reply {
    let mut response = json(StatusCode::METHOD_NOT_ALLOWED, &json!({"error": "Method not allowed"}));
    if let Ok(v) = HeaderValue::from_str(&allowed.join(", ")) {
        response.headers_mut().insert(header::ALLOW, v);
    }
    Ok(response)
}

/// A path id; parsed by the handler after authentication, so that the checks run in API.md's
/// order (401 before 404) and a wrong method gets 405 whatever the id.
fn parse_id(s: &str) -> Result<i64, Error> {
    s.parse::<i64>().ok().filter(|id| *id > 0).ok_or_else(|| Error::NotFound("Not found".into()))
}

fn health(app: &App) -> Response<Body> {
    if app.is_ready() {
        json(StatusCode::OK, &json!({"status": "ok"}))
    } else {
        json(StatusCode::SERVICE_UNAVAILABLE, &json!({"status": "starting"}))
    }
}

// ---------------------------------------------------------------- auth helpers

fn bearer(req: &Request<Incoming>) -> Option<&str> {
    let value = req.headers().get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// The caller's account from its access token (401), checked against `roles` (403).
pub async fn caller(app: &App, req: &Request<Incoming>, roles: &[Role]) -> Result<User, Error> {
    let unauthorized = || Error::Unauthorized("Authentication credentials were not provided or are invalid".into());
    let token = bearer(req).ok_or_else(unauthorized)?;
    let verified = app.jwt.verify(token, TokenType::Access).ok_or_else(unauthorized)?;
    let user = app.accounts.user(verified.user_id).await?.ok_or_else(unauthorized)?;
    if verified.role.is_some_and(|r| r != user.role) {
        return Err(unauthorized());
    }
    if !roles.contains(&user.role) {
        return Err(Error::Forbidden(format!("This endpoint is not available to the {} role", user.role.as_str())));
    }
    Ok(user)
}

/// The caller's pharmacy; `approved_only` refuses new and suspended pharmacies with 403.
async fn caller_pharmacy(app: &App, req: &Request<Incoming>, approved_only: bool) -> Result<(User, Pharmacy), Error> {
    let user = caller(app, req, &[Role::Pharmacy]).await?;
    let pharmacy = app
        .accounts
        .pharmacy_of(user.id)
        .await?
        .ok_or_else(|| Error::Forbidden("No pharmacy record exists for this account".into()))?;
    if approved_only && !pharmacy.approved {
        return Err(Error::Forbidden("This pharmacy is not approved".into()));
    }
    Ok((user, pharmacy))
}

async fn read_form(app: &App, req: Request<Incoming>) -> Result<Form, Error> {
    let (parts, body) = req.into_parts();
    Form::read(&parts.headers, body, app.config.max_upload).await
}

/// Counts a 429 for the metrics on its way out.
fn count_refusal<T>(app: &App, result: Result<T, Error>) -> Result<T, Error> {
    if let Err(Error::RateLimited { .. }) = &result {
        app.stats.rate_limited.fetch_add(1, Relaxed);
    }
    result
}

// ---------------------------------------------------------------- accounts

async fn send_otp(app: &App, req: Request<Incoming>, ctx: &Ctx) -> Reply {
    let form = read_form(app, req).await?;
    let email = form.text("email")?;
    let result = async {
        let code = app.accounts.send_otp(&email, ctx.client_ip).await?;
        let mail = Mail {
            to: email.trim().to_lowercase(),
            subject: "Your Sanjevani verification code".into(),
            body: format!("Your Sanjevani verification code is {code}. It is valid for 10 minutes."),
        };
        app.mail.try_send(mail).map_err(|_| Error::Unavailable("The mail queue is full; try again shortly".into()))?;
        Ok(json(StatusCode::OK, &json!({"message": "OTP sent successfully"})))
    }
    .await;
    count_refusal(app, result)
}

async fn verify_otp(app: &App, req: Request<Incoming>) -> Reply {
    let form = read_form(app, req).await?;
    let (email, otp) = (form.text("email")?, form.text("otp")?);
    app.accounts.verify_otp(&email, &otp).await?;
    Ok(json(StatusCode::OK, &json!({"message": "Email verified successfully"})))
}

fn registration(form: &Form) -> Result<Registration, Error> {
    Ok(Registration {
        email: form.text("email")?,
        password: form.text("password")?,
        name: form.text("name")?,
        phone_number: form.text("phone_number")?,
    })
}

fn user_json(user: &User) -> Value {
    json!({"id": user.id, "email": user.email, "name": user.name, "role": user.role.as_str()})
}

fn pharmacy_json(p: &Pharmacy) -> Value {
    json!({"id": p.id, "name": p.name, "lat": p.location.lat(), "lng": p.location.lng(), "approved": p.approved})
}

async fn register_customer(app: &App, req: Request<Incoming>) -> Reply {
    let form = read_form(app, req).await?;
    let user = app.accounts.register_customer(registration(&form)?).await?;
    Ok(json(StatusCode::CREATED, &json!({"message": "Customer registration successful", "user": user_json(&user)})))
}

fn location(form: &Form) -> Result<LatLng, Error> {
    let (lat, lng) = (form.number("lat")?, form.number("lng")?);
    LatLng::new(lat, lng).map_err(|e| e.on(if LatLng::new(lat, 0.0).is_err() { "lat" } else { "lng" }))
}

async fn register_pharmacy(app: &App, req: Request<Incoming>) -> Reply {
    let form = read_form(app, req).await?;
    let reg = registration(&form)?;
    let pharmacy_name = form.text("pharmacy_name")?;
    let location = location(&form)?;
    let (user, pharmacy) = app.accounts.register_pharmacy(reg, &pharmacy_name, location).await?;
    Ok(json(
        StatusCode::CREATED,
        &json!({"message": "Pharmacy registration successful", "user": user_json(&user), "pharmacy": pharmacy_json(&pharmacy)}),
    ))
}

async fn login(app: &App, req: Request<Incoming>, ctx: &Ctx) -> Reply {
    let form = read_form(app, req).await?;
    let (email, password) = (form.text("email")?, form.text("password")?);
    let user = count_refusal(app, app.accounts.login(&email, &password, ctx.client_ip).await)?;
    Ok(json_user_login(app, &user))
}

fn json_user_login(app: &App, user: &User) -> Response<Body> {
    json(
        StatusCode::OK,
        &json!({
            "refresh": app.jwt.issue(user, TokenType::Refresh),
            "access": app.jwt.issue(user, TokenType::Access),
            "role": user.role.as_str(),
            "user_id": user.id,
            "name": user.name,
        }),
    )
}

async fn refresh(app: &App, req: Request<Incoming>) -> Reply {
    let form = read_form(app, req).await?;
    let token = form.text("refresh")?;
    let invalid = || Error::Unauthorized("Token is invalid or expired".into());
    let verified = app.jwt.verify(&token, TokenType::Refresh).ok_or_else(invalid)?;
    let user = app.accounts.user(verified.user_id).await?.ok_or_else(invalid)?;
    Ok(json(StatusCode::OK, &json!({"access": app.jwt.issue(&user, TokenType::Access)})))
}

fn profile_json(user: &User) -> Value {
    json!({
        "id": user.id, "email": user.email, "name": user.name, "phone_number": user.phone_number,
        "role": user.role.as_str(), "email_verified": user.email_verified, "created_at": rfc3339(user.created_at),
    })
}

async fn customer_profile(app: &App, req: &Request<Incoming>) -> Reply {
    let user = caller(app, req, &[Role::Customer]).await?;
    Ok(json(StatusCode::OK, &profile_json(&user)))
}

async fn pharmacy_profile(app: &App, req: &Request<Incoming>) -> Reply {
    let (user, pharmacy) = caller_pharmacy(app, req, false).await?;
    let mut body = profile_json(&user);
    body["pharmacy"] = pharmacy_json(&pharmacy);
    Ok(json(StatusCode::OK, &body))
}

async fn patch_pharmacy(app: &App, req: Request<Incoming>) -> Reply {
    let (_, pharmacy) = caller_pharmacy(app, &req, false).await?;
    let form = read_form(app, req).await?;
    let lat = form.opt_number("lat")?;
    let lng = form.opt_number("lng")?;
    let location = match (lat, lng) {
        (None, None) => None,
        (lat, lng) => {
            let (lat, lng) = (lat.unwrap_or(pharmacy.location.lat()), lng.unwrap_or(pharmacy.location.lng()));
            Some(LatLng::new(lat, lng).map_err(|e| e.on(if LatLng::new(lat, 0.0).is_err() { "lat" } else { "lng" }))?)
        }
    };
    let patch =
        PharmacyPatch { name: form.opt_text("pharmacy_name")?, location, phone_number: form.opt_text("phone_number")? };
    let pharmacy = app.accounts.update_pharmacy(pharmacy.id, patch).await?;
    let user = app.accounts.user(pharmacy.user_id).await?.ok_or_else(|| Error::NotFound("Not found".into()))?;
    let mut body = profile_json(&user);
    body["pharmacy"] = pharmacy_json(&pharmacy);
    Ok(json(StatusCode::OK, &body))
}

// ---------------------------------------------------------------- medicine requests

fn media_url(app: &App, ctx: &Ctx, key: Option<&str>) -> Value {
    key.map_or(Value::Null, |k| Value::String(app.media.signed_url(&ctx.base_url, k)))
}

/// The request object of API.md, used in the 201, the list and the detail.
fn request_json(app: &App, ctx: &Ctx, r: &MedicineRequest) -> Value {
    json!({
        "id": r.id,
        "patient_name": r.patient_name,
        "patient_lat": r.location.lat(),
        "patient_lng": r.location.lng(),
        "radius_km": r.radius_km,
        "quantity": r.quantity,
        "medicine_name": r.medicine_name,
        "note": r.note,
        "image": media_url(app, ctx, r.image.as_deref()),
        "status": r.status.as_str(),
        "pharmacy": r.pharmacy_id,
        "pharmacy_name": r.pharmacy_name,
        "created_at": rfc3339(r.created_at),
    })
}

fn response_json(app: &App, ctx: &Ctx, r: &PharmacyResponse) -> Value {
    json!({
        "id": r.id,
        "request_id": r.request_id,
        "pharmacy_id": r.pharmacy_id,
        "pharmacy_name": r.pharmacy_name,
        "response_type": r.response_type.as_str(),
        "text_message": r.text_message,
        "audio": media_url(app, ctx, r.audio.as_deref()),
        "responded_at": rfc3339(r.responded_at),
    })
}

async fn create_request(app: &App, req: Request<Incoming>, ctx: &Ctx) -> Reply {
    let started = std::time::Instant::now();
    let customer = caller(app, &req, &[Role::Customer]).await?;
    let idempotency_header = req.headers().get("idempotency-key").map(|v| v.to_str().map(str::to_owned));
    let lifecycle = app.lifecycle()?;
    let form = read_form(app, req).await?;
    let idempotency_key = match idempotency_header {
        None => None,
        Some(Ok(key)) if !key.is_empty() && key.len() <= 255 => Some(key),
        Some(_) => return Err(Error::invalid("Idempotency-Key must be 1 to 255 printable ASCII characters")),
    };
    let (lat, lng) = (form.number("patient_lat")?, form.number("patient_lng")?);
    let location = LatLng::new(lat, lng)
        .map_err(|e| e.on(if LatLng::new(lat, 0.0).is_err() { "patient_lat" } else { "patient_lng" }))?;
    let radius = RadiusKm::new(form.number("radius_km")?).map_err(|e| e.on("radius_km"))?;
    let quantity = form.integer("quantity")?;
    let medicine_name = form.opt_text("medicine_name")?;
    let note = form.opt_text("note")?;
    if form.has("image") && form.file("image").is_none() {
        return Err(Error::field("image", "image must be an uploaded file (multipart/form-data)"));
    }
    let image = match form.file("image") {
        Some(upload) => Some(app.media.save(MediaKind::Prescription, "image", upload.bytes.clone()).await?),
        None => None,
    };
    let input = RequestInput { location, radius, quantity, medicine_name, note, image, idempotency_key };
    let created = lifecycle.create(&customer, input, &ctx.base_url).await?;
    if !created.repeated {
        app.stats.count_created();
        // `create` returns right after its last `send_patched`: every recipient's queue has it.
        app.stats.request_fanout.observe_since(started);
    }
    let n = created.pharmacies_notified;
    Ok(json(
        StatusCode::CREATED,
        &json!({
            "message": format!("Medicine request sent to {n} nearby pharmacies"),
            "request_id": created.request.id,
            "pharmacies_notified": n,
            "data": request_json(app, ctx, &created.request),
        }),
    ))
}

async fn list_requests(app: &App, req: &Request<Incoming>, ctx: &Ctx) -> Reply {
    let customer = caller(app, req, &[Role::Customer]).await?;
    let requests = app.lifecycle()?.list(customer.id).await?;
    let items: Vec<Value> = requests.iter().map(|r| request_json(app, ctx, r)).collect();
    Ok(json(StatusCode::OK, &json!({"count": items.len(), "requests": items})))
}

async fn request_detail(app: &App, req: &Request<Incoming>, ctx: &Ctx, id: &str) -> Reply {
    let customer = caller(app, req, &[Role::Customer]).await?;
    let id: RequestId = parse_id(id)?;
    let detail = app.lifecycle()?.detail(customer.id, id).await?;
    let mut body = request_json(app, ctx, &detail.request);
    body["responses"] = detail.responses.iter().map(|r| response_json(app, ctx, r)).collect();
    body["notified"] = detail
        .notified
        .iter()
        .map(|n| {
            json!({
                "pharmacy_id": n.pharmacy_id, "pharmacy_name": n.pharmacy_name,
                "lat": n.location.lat(), "lng": n.location.lng(), "distance_km": round2(n.distance_km),
            })
        })
        .collect();
    Ok(json(StatusCode::OK, &body))
}

async fn cancel_request(app: &App, req: Request<Incoming>, id: &str) -> Reply {
    let customer = caller(app, &req, &[Role::Customer]).await?;
    let id: RequestId = parse_id(id)?;
    body::discard(req.into_body()).await;
    let request = app.lifecycle()?.cancel(customer.id, id).await?;
    Ok(json(
        StatusCode::OK,
        &json!({"message": "Medicine request cancelled", "request_id": request.id, "status": request.status.as_str()}),
    ))
}

async fn respond(app: &App, req: Request<Incoming>, ctx: &Ctx) -> Reply {
    let (_, pharmacy) = caller_pharmacy(app, &req, true).await?;
    let lifecycle = app.lifecycle()?;
    let form = read_form(app, req).await?;
    let request_id = form.integer("request_id")?;
    let kind = form.text("response_type")?;
    let response_type = ResponseType::parse(kind.trim().to_ascii_uppercase().as_str())
        .ok_or_else(|| Error::field("response_type", "response_type must be ACCEPTED or REJECTED"))?;
    let text_message = form.opt_text("text_message")?;
    if form.has("audio") && form.file("audio").is_none() {
        return Err(Error::field("audio", "audio must be an uploaded file (multipart/form-data) or null"));
    }
    let audio = match form.file("audio") {
        Some(upload) => Some(app.media.save(MediaKind::Audio, "audio", upload.bytes.clone()).await?),
        None => None,
    };
    let input = ResponseInput { request_id, response_type, text_message, audio };
    let responded = lifecycle.respond(&pharmacy, input, &ctx.base_url).await?;
    let mut body = response_json(app, ctx, &responded.response);
    body["message"] = "Response recorded. Customer will be notified.".into();
    Ok(json(StatusCode::CREATED, &body))
}

async fn pharmacy_requests(app: &App, req: &Request<Incoming>, ctx: &Ctx) -> Reply {
    let (_, pharmacy) = caller_pharmacy(app, req, true).await?;
    let pending = app.lifecycle()?.pending_for_pharmacy(pharmacy.id);
    let items: Vec<Value> = pending
        .iter()
        .map(|(r, distance)| {
            let mut item = request_json(app, ctx, r);
            item["distance_km"] = round2(*distance).into();
            item
        })
        .collect();
    Ok(json(StatusCode::OK, &json!({"count": items.len(), "requests": items})))
}

// ---------------------------------------------------------------- admin

fn listing_json(l: &PharmacyListing) -> Value {
    let p = &l.pharmacy;
    json!({
        "id": p.id, "user_id": p.user_id, "email": l.email, "name": l.owner_name, "pharmacy_name": p.name,
        "phone_number": l.phone_number, "lat": p.location.lat(), "lng": p.location.lng(),
        "approved": p.approved, "created_at": rfc3339(p.created_at),
    })
}

async fn admin_list(app: &App, req: &Request<Incoming>) -> Reply {
    caller(app, req, &[Role::Admin]).await?;
    let approved =
        match req.uri().query().and_then(|q| {
            form_urlencoded::parse(q.as_bytes()).find(|(k, _)| k == "approved").map(|(_, v)| v.into_owned())
        }) {
            None => None,
            Some(v) => match v.to_ascii_lowercase().as_str() {
                "true" | "1" => Some(true),
                "false" | "0" => Some(false),
                _ => return Err(Error::field("approved", "approved must be true or false")),
            },
        };
    let list = app.accounts.list_pharmacies(approved).await?;
    let items: Vec<Value> = list.iter().map(listing_json).collect();
    Ok(json(StatusCode::OK, &json!({"count": items.len(), "pharmacies": items})))
}

async fn admin_set(app: &App, req: Request<Incoming>, id: &str, approve: bool) -> Reply {
    caller(app, &req, &[Role::Admin]).await?;
    let id: PharmacyId = parse_id(id)?;
    body::discard(req.into_body()).await;
    let pharmacy = if approve { app.accounts.approve(id).await? } else { app.accounts.suspend(id).await? };
    let owner = app.accounts.user(pharmacy.user_id).await?.ok_or_else(|| Error::NotFound("Not found".into()))?;
    let listing =
        PharmacyListing { email: owner.email, owner_name: owner.name, phone_number: owner.phone_number, pharmacy };
    Ok(json(StatusCode::OK, &listing_json(&listing)))
}

async fn admin_stats(app: &App, req: &Request<Incoming>) -> Reply {
    caller(app, req, &[Role::Admin]).await?;
    Ok(json(StatusCode::OK, &stats_json(app)?))
}

/// The counts `/admin/stats` shows (and `/metrics` exports).
pub fn stats_json(app: &App) -> Result<Value, Error> {
    let engine = app.lifecycle()?.stats();
    let (customers, pharmacies) = app.hub.socket_counts();
    Ok(json!({
        "sockets": {"customer": customers, "pharmacy": pharmacies},
        "requests": {
            "pending": engine.pending.load(Relaxed).max(0),
            "created": engine.created.load(Relaxed),
            "notified": engine.notified.load(Relaxed),
            "delivered": app.stats.delivered.load(Relaxed),
            "accepted": engine.accepted.load(Relaxed),
            "rejected": engine.rejected.load(Relaxed),
            "cancelled": engine.cancelled.load(Relaxed),
            "expired": engine.expired.load(Relaxed),
        },
        "slow_consumer_cuts": app.hub.stats().slow_cuts.load(Relaxed),
        "requests_last_minute": app.stats.created_last_minute(),
    }))
}

// ---------------------------------------------------------------- media

async fn media(app: &App, req: &Request<Incoming>, key: &str) -> Reply {
    let (bytes, content_type) =
        app.media.open(key, req.uri().query()).await.ok_or_else(|| Error::NotFound("Not found".into()))?;
    let mut response = Response::new(http_body_util::Full::new(bytes::Bytes::from(bytes)));
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("private, max-age=3600"));
    headers.insert("x-content-type-options", HeaderValue::from_static("nosniff"));
    Ok(response)
}

// ---------------------------------------------------------------- the API's own description

/// The OpenAPI 3.1 document of every endpoint and WebSocket message (`server/openapi.json`).
/// It is a file rather than built in code so that a client developer can review it as it is
/// served; the end-to-end suite validates every response it receives against it.
pub const OPENAPI_JSON: &str = include_str!("../openapi.json");

fn openapi() -> Response<Body> {
    let mut response = Response::new(http_body_util::Full::new(bytes::Bytes::from_static(OPENAPI_JSON.as_bytes())));
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

#[cfg(test)]
mod tests {
    use super::OPENAPI_JSON;

    #[test]
    fn the_openapi_document_is_json_for_openapi_3_1() {
        let doc: serde_json::Value = serde_json::from_str(OPENAPI_JSON).expect("server/openapi.json is not valid JSON");
        assert!(doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.1.")), "{}", doc["openapi"]);
        assert!(doc["paths"]["/openapi.json"]["get"].is_object());
    }
}
