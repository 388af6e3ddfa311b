//! `generate-city` as a load test uses it: a small city written into a temp data dir, then the
//! real server started on it answers `/health`, knows every generated account, pharmacy and open
//! request, and accepts the generated tokens (signed with the data dir's own secret) on HTTP and
//! WebSockets.

use crate::harness::*;
use sanjevani::city::{self, CityOptions};
use sanjevani::datadir::{DataDir, DataDirError};
use sanjevani_engine::geo::{LatLng, haversine_km};
use serde_json::{Value, json};

#[tokio::test]
async fn a_generated_city_serves_its_tokens_and_open_requests() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("tokens.json");
    let mut options = CityOptions::new(1_000, 10, &out);
    options.seed = 3;
    options.open_requests = 5;
    options.recipients = 20;
    options.base_url = Some("http://127.0.0.1:8000".into());
    let report = {
        let data_dir = DataDir::open(dir.path()).unwrap();
        // No configured secret: the data dir's generated one, which `serve` will read too.
        let secret = data_dir.jwt_secret(None).unwrap();
        city::generate(&data_dir, &secret, &options).unwrap()
    };
    assert_eq!((report.pharmacies, report.customers, report.open_requests), (1_000, 10, 5));
    assert_eq!(report.recipients, 5 * 20, "each open request's radius holds exactly 20 pharmacies");
    let tokens: Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    assert_eq!(tokens["base_url"], "http://127.0.0.1:8000");
    assert_eq!(tokens["password"], city::DEFAULT_PASSWORD);
    let customers = tokens["customers"].as_array().unwrap();
    let pharmacies = tokens["pharmacies"].as_array().unwrap();
    assert_eq!((customers.len(), pharmacies.len()), (10, 1_000));

    let server = Server::start_in(dir, |c| c.jwt_secret = None).await;
    assert_eq!(server.get("/health").go().await.status, 200);
    let err = DataDir::open(server.dir.path()).unwrap_err();
    assert!(matches!(err, DataDirError::Locked { .. }), "generate-city cannot take the lock while serve runs: {err}");

    // A generated customer's access token works, and its refresh token refreshes.
    let customer = &customers[0];
    let access = customer["access"].as_str().unwrap();
    let profile = server.get("/customer/profile/").bearer(access).go().await;
    assert_eq!(profile.status, 200, "{:?}", profile.json);
    assert_eq!(profile.json["id"], customer["user_id"]);
    assert_eq!(profile.json["role"], "CUSTOMER");
    assert_eq!(profile.json["email_verified"], true);
    let refreshed =
        server.post("/token/refresh").json(json!({"refresh": customer["refresh"].as_str().unwrap()})).go().await;
    assert_eq!(refreshed.status, 200, "{:?}", refreshed.json);

    // The shared password logs in (the one argon2id hash is a real one).
    let email = profile.json["email"].as_str().unwrap().to_string();
    assert_eq!(email, "customer-s3-00@city.test");
    let login = server.post("/login").json(json!({"email": email, "password": city::DEFAULT_PASSWORD})).go().await;
    assert_eq!(login.status, 200, "{:?}", login.json);

    // A generated pharmacy: its profile matches the file, and its socket is admitted.
    let pharmacy = &pharmacies[7];
    let p_access = pharmacy["access"].as_str().unwrap();
    let profile = server.get("/pharmacy/profile/").bearer(p_access).go().await;
    assert_eq!(profile.status, 200, "{:?}", profile.json);
    assert_eq!(profile.json["pharmacy"]["id"], pharmacy["pharmacy_id"]);
    assert_eq!(profile.json["pharmacy"]["approved"], true);
    assert_eq!(profile.json["pharmacy"]["lat"], pharmacy["lat"]);
    let mut ws = server.ws(&format!("/ws/pharmacy/?token={p_access}")).await;
    let hello = ws.json().await;
    assert_eq!(hello["type"], "connection");
    assert_eq!(hello["pharmacy_id"], json!(pharmacy["pharmacy_id"].as_i64().unwrap().to_string()));

    // The open requests were loaded at start-up with their recipients: across every pharmacy,
    // the lists of PENDING requests add up to the recipient rows written.
    let mut listed = 0;
    for p in pharmacies {
        let reply = server.get("/pharmacy/requests/").bearer(p["access"].as_str().unwrap()).go().await;
        assert_eq!(reply.status, 200, "{:?}", reply.json);
        listed += reply.json["count"].as_u64().unwrap() as usize;
    }
    assert_eq!(listed, report.recipients);

    // A new request reaches exactly the generated pharmacies a Haversine count finds in its radius.
    let at = LatLng::new(pharmacy["lat"].as_f64().unwrap(), pharmacy["lng"].as_f64().unwrap()).unwrap();
    let radius_km = 3.0;
    let inside = pharmacies
        .iter()
        .filter(|p| {
            let here = LatLng::new(p["lat"].as_f64().unwrap(), p["lng"].as_f64().unwrap()).unwrap();
            haversine_km(at, here) <= radius_km
        })
        .count();
    let reply = server
        .post("/medicine/request/")
        .bearer(access)
        .json(json!({"patient_lat": at.lat(), "patient_lng": at.lng(), "radius_km": radius_km, "quantity": 1}))
        .go()
        .await;
    assert_eq!(reply.status, 201, "{:?}", reply.json);
    assert_eq!(reply.json["pharmacies_notified"], json!(inside));
    let id = reply.json["request_id"].as_i64().unwrap();
    let msg = ws.json_of("new_request").await;
    let msg = if msg.get("replay").is_some() {
        // Replays of the generated open requests come first; the live one follows `sync`.
        ws.json_of("sync").await;
        ws.json_of("new_request").await
    } else {
        msg
    };
    assert_eq!(msg["request_id"], json!(id));
    assert_eq!(msg["distance_km"], json!(0.0));
    server.stop().await;
}

#[test]
fn a_second_city_of_the_same_seed_is_refused_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = DataDir::open(dir.path()).unwrap();
    let secret = "a-load-test-secret-of-at-least-32-bytes";
    let options = CityOptions::new(20, 2, dir.path().join("tokens.json"));
    city::generate(&data_dir, secret, &options).unwrap();
    let err = city::generate(&data_dir, secret, &options).unwrap_err().to_string();
    assert!(err.contains("already holds the city of seed 1"), "{err}");
    let other = CityOptions { seed: 2, ..options };
    let report = city::generate(&data_dir, secret, &other).unwrap();
    assert_eq!(report.pharmacies, 20, "another seed's city fits beside it");
}
