//! Medicine requests over HTTP and WebSockets: broadcast by radius, first-accept-wins, the
//! event × recipient table, repeats, cancel, expiry, replay and `sync`.

use crate::harness::*;
use serde_json::json;
use std::time::Duration;

#[tokio::test]
async fn broadcast_accept_and_taken() {
    let server = Server::start().await;
    let (_, customer) = customer(&server, "c@example.com").await;
    let (a_id, a) = pharmacy(&server, "a@example.com", 27.722287, 85.329747).await;
    let (b_id, b) = pharmacy(&server, "b@example.com", 27.703209, 85.339802).await;
    let (_, d) = pharmacy(&server, "d@example.com", 27.812546, 85.216154).await;
    let mut ws_a = server.ws(&format!("/ws/pharmacy/?token={a}")).await;
    let mut ws_b = server.ws(&format!("/ws/pharmacy/?token={b}")).await;
    let mut ws_d = server.ws(&format!("/ws/pharmacy/?token={d}")).await;
    let mut ws_c = server.ws(&format!("/ws/customer/?token={customer}")).await;
    let hello = ws_a.json().await;
    assert_eq!(hello["type"], "connection");
    assert_eq!(hello["pharmacy_id"], json!(a_id.to_string()));
    assert_eq!(ws_a.json().await, json!({"type": "sync", "pending": []}));
    ws_b.json_of("sync").await;
    ws_d.json_of("sync").await;
    assert_eq!(ws_c.json().await["message"], "Connected to customer channel");
    assert_eq!(ws_c.json().await, json!({"type": "sync", "pending": [], "closed": []}));

    let reply = server
        .post("/medicine/request/")
        .bearer(&customer)
        .json(json!({"patient_lat": 27.7172, "patient_lng": 85.3240, "radius_km": "3", "quantity": 10}))
        .go()
        .await;
    assert_eq!(reply.status, 201, "{:?}", reply.json);
    assert_eq!(reply.json["pharmacies_notified"], 2);
    assert_eq!(reply.json["message"], "Medicine request sent to 2 nearby pharmacies");
    assert_eq!(reply.json["data"]["status"], "PENDING");
    let id = reply.json["request_id"].as_i64().unwrap();
    let msg = ws_a.json().await;
    assert_eq!(
        (msg["type"].as_str(), msg["request_id"].as_i64(), msg["distance_km"].as_f64()),
        (Some("new_request"), Some(id), Some(0.8))
    );
    assert_eq!(ws_b.json().await["distance_km"], json!(2.2));
    ws_d.silent_for(Duration::from_millis(200)).await;

    let reply = server
        .post("/medicine/response/")
        .bearer(&b)
        .json(json!({"request_id": id, "response_type": "ACCEPTED", "text_message": "We have it"}))
        .go()
        .await;
    assert_eq!(reply.status, 201, "{:?}", reply.json);
    assert_eq!(reply.json["pharmacy_id"], json!(b_id));
    assert_eq!(reply.json["message"], "Response recorded. Customer will be notified.");
    let msg = ws_c.json().await;
    assert_eq!(msg["type"], "pharmacy_response");
    assert_eq!(msg["response_type"], "ACCEPTED");
    assert_eq!(msg["distance_km"], json!(2.2));
    assert_eq!(
        ws_a.json().await,
        json!({"type": "request_taken", "request_id": id, "message": "This request has been accepted by another pharmacy"})
    );
    ws_b.silent_for(Duration::from_millis(200)).await;

    let late = server
        .post("/medicine/response/")
        .bearer(&a)
        .json(json!({"request_id": id, "response_type": "ACCEPTED"}))
        .go()
        .await;
    assert_eq!(late.status, 400);
    assert_eq!(late.json, json!({"error": "This request has already been assigned to a pharmacy"}));
}
