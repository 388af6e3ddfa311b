//! Admin and the demo data: the seed's four scenarios on `--demo`, manual pharmacy approval,
//! suspension closing sockets with 4003, the pharmacy list and the stats.

use crate::harness::*;
use serde_json::json;
use std::time::Duration;

async fn demo() -> Server {
    Server::start_with(|c| c.demo = true).await
}

async fn admin_token(server: &Server) -> String {
    login(server, "admin@demo.sanjevani.test", "demo-admin-1").await
}

/// The seed's test scenarios on the demo data: 3 km reaches A and B only, 20 km all four, a
/// wrong-role token gets 4003, and a late response gets 400 with the documented error.
#[tokio::test]
async fn seed_scenarios_on_demo_data() {
    let server = demo().await;
    let customer = login(&server, "customer@demo.sanjevani.test", "demo-customer-1").await;
    let a = login(&server, "pharmacy.a@demo.sanjevani.test", "demo-pharmacy-a").await;
    let b = login(&server, "pharmacy.b@demo.sanjevani.test", "demo-pharmacy-b").await;
    let c = login(&server, "pharmacy.c@demo.sanjevani.test", "demo-pharmacy-c").await;
    let d = login(&server, "pharmacy.d@demo.sanjevani.test", "demo-pharmacy-d").await;
    let mut sockets = Vec::new();
    for token in [&a, &b, &c, &d] {
        let mut ws = server.ws(&format!("/ws/pharmacy/?token={token}")).await;
        ws.json_of("sync").await;
        sockets.push(ws);
    }
    let post = |radius: &str| {
        server
            .post("/medicine/request/")
            .bearer(&customer)
            .multipart(
                &[("patient_lat", "27.7172"), ("patient_lng", "85.3240"), ("radius_km", radius), ("quantity", "10")],
                &[],
            )
            .go()
    };
    // Scenario 1: 3 km → A and B.
    let small = post("3.0").await;
    assert_eq!((small.status, small.json["pharmacies_notified"].as_i64()), (201, Some(2)));
    let small_id = small.json["request_id"].as_i64().unwrap();
    assert_eq!(sockets[0].json().await["distance_km"], json!(0.8));
    assert_eq!(sockets[1].json().await["distance_km"], json!(2.2));
    sockets[2].silent_for(Duration::from_millis(200)).await;
    sockets[3].silent_for(Duration::from_millis(10)).await;
    // Scenario 2: 20 km → all four, D at 15 km.
    let large = post("20.0").await;
    assert_eq!(large.json["pharmacies_notified"], 4);
    for (ws, km) in sockets.iter_mut().zip([0.8, 2.2, 4.2, 15.0]) {
        assert_eq!(ws.json().await["distance_km"], json!(km));
    }
    // Scenario 3: a customer token on the pharmacy socket → 4003.
    let mut wrong = server.ws(&format!("/ws/pharmacy/?token={customer}")).await;
    assert_eq!(wrong.close_code().await, 4003);
    // Scenario 4: two pharmacies accept; the second gets 400 with the seed's sentence.
    let first = server
        .post("/medicine/response/")
        .bearer(&a)
        .json(json!({"request_id": small_id, "response_type": "ACCEPTED"}))
        .go()
        .await;
    assert_eq!(first.status, 201);
    let second = server
        .post("/medicine/response/")
        .bearer(&b)
        .json(json!({"request_id": small_id, "response_type": "ACCEPTED"}))
        .go()
        .await;
    assert_eq!(
        (second.status, &second.json),
        (400, &json!({"error": "This request has already been assigned to a pharmacy"}))
    );
    // Pharmacy E is waiting for approval: not notified, 4003 on its socket, 403 on the API.
    let e = login(&server, "pharmacy.e@demo.sanjevani.test", "demo-pharmacy-e").await;
    let mut ws_e = server.ws(&format!("/ws/pharmacy/?token={e}")).await;
    assert_eq!(ws_e.close_code().await, 4003);
    assert_eq!(server.get("/pharmacy/requests/").bearer(&e).go().await.status, 403);
    assert_eq!(server.get("/pharmacy/profile/").bearer(&e).go().await.json["pharmacy"]["approved"], json!(false));
}

/// `--demo` on a second start creates nothing new.
#[tokio::test]
async fn demo_is_loaded_once() {
    let server = demo().await;
    let admin = admin_token(&server).await;
    let before = server.get("/admin/pharmacies/").bearer(&admin).go().await.json["count"].clone();
    let dir = server.stop().await;
    let server = Server::start_in(dir, |c| c.demo = true).await;
    let admin = admin_token(&server).await;
    assert_eq!(server.get("/admin/pharmacies/").bearer(&admin).go().await.json["count"], before);
}

#[tokio::test]
async fn manual_approval_and_suspension() {
    let server = Server::start_with(|c| {
        c.demo = true;
        c.pharmacy_approval = sanjevani_engine::accounts::Approval::Manual;
    })
    .await;
    let admin = admin_token(&server).await;
    let customer = login(&server, "customer@demo.sanjevani.test", "demo-customer-1").await;
    let reg = server
        .post("/pharmacy/register/")
        .json(json!({"email": "new@example.com", "password": "password-123", "name": "N", "phone_number": "1",
                     "pharmacy_name": "Newcomer", "lat": 27.7172, "lng": 85.3241}))
        .go()
        .await;
    assert_eq!(reg.json["pharmacy"]["approved"], json!(false));
    let id = reg.json["pharmacy"]["id"].as_i64().unwrap();
    let token = login(&server, "new@example.com", "password-123").await;
    let mut ws = server.ws(&format!("/ws/pharmacy/?token={token}")).await;
    assert_eq!(ws.close_code().await, 4003);
    assert_eq!(
        server
            .post("/medicine/response/")
            .bearer(&token)
            .json(json!({"request_id": 1, "response_type": "ACCEPTED"}))
            .go()
            .await
            .status,
        403
    );
    let create = || {
        server
            .post("/medicine/request/")
            .bearer(&customer)
            .json(json!({"patient_lat": 27.7172, "patient_lng": 85.3241, "radius_km": 1, "quantity": 1}))
            .go()
    };
    assert_eq!(create().await.json["pharmacies_notified"], 1, "only A, not the unapproved newcomer");

    let pending = server.get("/admin/pharmacies/?approved=false").bearer(&admin).go().await;
    let ids: Vec<i64> =
        pending.json["pharmacies"].as_array().unwrap().iter().map(|p| p["id"].as_i64().unwrap()).collect();
    assert!(ids.contains(&id), "{ids:?}");
    let listed = pending.json["pharmacies"].as_array().unwrap().iter().find(|p| p["id"] == json!(id)).unwrap().clone();
    for key in
        ["id", "user_id", "email", "name", "pharmacy_name", "phone_number", "lat", "lng", "approved", "created_at"]
    {
        assert!(listed.get(key).is_some(), "{key}");
    }
    assert_eq!(server.get("/admin/pharmacies/").bearer(&customer).go().await.status, 403);
    assert_eq!(server.get("/admin/pharmacies/?approved=maybe").bearer(&admin).go().await.status, 400);
    let approved = server.post(&format!("/admin/pharmacies/{id}/approve/")).bearer(&admin).go().await;
    assert_eq!((approved.status, &approved.json["approved"]), (200, &json!(true)));
    assert_eq!(create().await.json["pharmacies_notified"], 2, "approved: in the next broadcast");
    let mut ws = server.ws(&format!("/ws/pharmacy/?token={token}")).await;
    ws.json_of("sync").await;
    let mut second_device = server.ws(&format!("/ws/pharmacy/?token={token}")).await;
    second_device.json_of("sync").await;

    let suspended = server.post(&format!("/admin/pharmacies/{id}/suspend")).bearer(&admin).go().await;
    assert_eq!((suspended.status, &suspended.json["approved"]), (200, &json!(false)));
    assert_eq!(ws.close_code().await, 4003);
    assert_eq!(second_device.close_code().await, 4003);
    assert_eq!(create().await.json["pharmacies_notified"], 1, "suspended: out of broadcasts at once");
    assert_eq!(server.post("/admin/pharmacies/999999/approve/").bearer(&admin).go().await.status, 404);

    let stats = server.get("/admin/stats").bearer(&admin).go().await;
    assert_eq!(stats.status, 200);
    assert_eq!(stats.json["requests"]["created"], 3);
    assert_eq!(stats.json["requests"]["notified"], 4);
    assert_eq!(stats.json["requests"]["pending"], 3);
    assert_eq!(stats.json["requests_last_minute"], 3);
    for key in ["delivered", "accepted", "rejected", "cancelled", "expired"] {
        assert!(stats.json["requests"][key].is_u64(), "{key}");
    }
    assert!(stats.json["sockets"]["pharmacy"].is_u64());
    assert!(stats.json["slow_consumer_cuts"].is_u64());
}
