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

async fn create(server: &Server, token: &str, radius: f64) -> i64 {
    let reply = server
        .post("/medicine/request/")
        .bearer(token)
        .json(json!({"patient_lat": 27.7172, "patient_lng": 85.3240, "radius_km": radius, "quantity": 2, "medicine_name": "Paracetamol"}))
        .go()
        .await;
    assert_eq!(reply.status, 201, "{:?}", reply.json);
    reply.json["request_id"].as_i64().unwrap()
}

async fn answer(server: &Server, token: &str, id: i64, kind: &str) -> Reply {
    server.post("/medicine/response/").bearer(token).json(json!({"request_id": id, "response_type": kind})).go().await
}

/// 20 pharmacies accept at once: one 201, nineteen 400s; the winner's and a rejecter's retries
/// get their own 201 back; a pharmacy that was not notified gets 404.
#[tokio::test]
async fn first_accept_wins_under_20_concurrent_accepts() {
    let server = Server::start().await;
    let (_, customer) = customer(&server, "race@example.com").await;
    let mut tokens = Vec::new();
    for i in 0..21 {
        tokens.push(pharmacy(&server, &format!("p{i}@example.com"), 27.7172 + i as f64 * 1e-4, 85.3240).await.1);
    }
    let (_, far) = pharmacy(&server, "far@example.com", 28.5, 85.3240).await;
    let id = create(&server, &customer, 5.0).await;
    let rejecter = tokens.pop().unwrap();
    let rejected = answer(&server, &rejecter, id, "REJECTED").await;
    assert_eq!(rejected.status, 201);
    let calls = tokens.iter().map(|t| answer(&server, t, id, "ACCEPTED"));
    let replies = futures_util::future::join_all(calls).await;
    let winners: Vec<usize> = replies.iter().enumerate().filter(|(_, r)| r.status == 201).map(|(i, _)| i).collect();
    assert_eq!(winners.len(), 1, "{:?}", replies.iter().map(|r| r.status).collect::<Vec<_>>());
    for r in replies.iter().filter(|r| r.status != 201) {
        assert_eq!(
            (r.status, r.json["error"].as_str()),
            (400, Some("This request has already been assigned to a pharmacy"))
        );
    }
    let winner = &tokens[winners[0]];
    let again = answer(&server, winner, id, "ACCEPTED").await;
    assert_eq!(again.status, 201);
    assert_eq!(again.json["id"], replies[winners[0]].json["id"]);
    let again = answer(&server, &rejecter, id, "REJECTED").await;
    assert_eq!((again.status, &again.json["id"]), (201, &rejected.json["id"]));
    assert_eq!(answer(&server, &rejecter, id, "ACCEPTED").await.status, 409);
    assert_eq!(answer(&server, &far, id, "ACCEPTED").await.status, 404);
    let detail = server.get(&format!("/medicine/request/{id}/")).bearer(&customer).go().await;
    assert_eq!(detail.status, 200);
    assert_eq!(detail.json["status"], "ACCEPTED");
    assert_eq!(detail.json["responses"].as_array().unwrap().len(), 2);
    assert_eq!(detail.json["notified"].as_array().unwrap().len(), 21);
    assert_eq!(detail.json["notified"][0]["distance_km"], json!(0.0));
}

/// The same Idempotency-Key creates one request, concurrent duplicates included.
#[tokio::test]
async fn idempotent_create() {
    let server = Server::start().await;
    let (_, customer) = customer(&server, "idem@example.com").await;
    let (_, p) = pharmacy(&server, "idem-p@example.com", 27.7172, 85.3240).await;
    let mut ws = server.ws(&format!("/ws/pharmacy/?token={p}")).await;
    ws.json_of("sync").await;
    let post = || {
        server
            .post("/medicine/request/")
            .bearer(&customer)
            .header("idempotency-key", "order-42")
            .json(json!({"patient_lat": 27.7172, "patient_lng": 85.3240, "radius_km": 5, "quantity": 1}))
            .go()
    };
    let replies = futures_util::future::join_all((0..8).map(|_| post())).await;
    let ids: Vec<i64> = replies.iter().map(|r| r.json["request_id"].as_i64().unwrap()).collect();
    assert!(replies.iter().all(|r| r.status == 201));
    assert!(ids.iter().all(|id| *id == ids[0]), "{ids:?}");
    assert_eq!(post().await.json["request_id"], json!(ids[0]));
    assert_eq!(ws.json().await["request_id"], json!(ids[0]));
    ws.silent_for(Duration::from_millis(300)).await;
    let list = server.get("/medicine/request/").bearer(&customer).go().await;
    assert_eq!(list.json["count"], 1);
    let bad = server
        .post("/medicine/request/")
        .bearer(&customer)
        .header("idempotency-key", &"k".repeat(256))
        .json(json!({"patient_lat": 27.7172, "patient_lng": 85.3240, "radius_km": 5, "quantity": 1}))
        .go()
        .await;
    assert_eq!(bad.status, 400);
}

/// Cancel while PENDING; then cancel again → 400 naming the status; others' requests → 404.
#[tokio::test]
async fn cancel_and_list() {
    let server = Server::start().await;
    let (_, customer) = customer(&server, "cancel@example.com").await;
    let (_, other) = self::customer(&server, "other@example.com").await;
    let (_, p) = pharmacy(&server, "cancel-p@example.com", 27.7172, 85.3240).await;
    let mut ws = server.ws(&format!("/ws/pharmacy/?token={p}")).await;
    let mut ws_c = server.ws(&format!("/ws/customer/?token={customer}")).await;
    ws.json_of("sync").await;
    ws_c.json_of("sync").await;
    let id = create(&server, &customer, 5.0).await;
    ws.json_of("new_request").await;
    assert_eq!(server.post(&format!("/medicine/request/{id}/cancel/")).bearer(&other).go().await.status, 404);
    assert_eq!(server.get(&format!("/medicine/request/{id}/")).bearer(&other).go().await.status, 404);
    let reply = server.post(&format!("/medicine/request/{id}/cancel")).bearer(&customer).go().await;
    assert_eq!(reply.status, 200, "{:?}", reply.json);
    assert_eq!(reply.json["status"], "CANCELLED");
    assert_eq!(reply.json["request_id"], json!(id));
    assert_eq!(ws.json().await, json!({"type": "request_cancelled", "request_id": id}));
    assert_eq!(ws_c.json().await, json!({"type": "request_cancelled", "request_id": id}));
    let again = server.post(&format!("/medicine/request/{id}/cancel/")).bearer(&customer).go().await;
    assert_eq!(again.status, 400);
    assert!(again.json["error"].as_str().unwrap().contains("CANCELLED"));
    assert_eq!(answer(&server, &p, id, "ACCEPTED").await.status, 400);
    let second = create(&server, &customer, 5.0).await;
    let list = server.get("/medicine/request").bearer(&customer).go().await;
    assert_eq!(list.json["count"], 2);
    assert_eq!(list.json["requests"][0]["id"], json!(second), "newest first");
    assert_eq!(list.json["requests"][1]["status"], "CANCELLED");
    assert_eq!(server.get("/medicine/request/").bearer(&other).go().await.json["count"], 0);
    let pending = server.get("/pharmacy/requests/").bearer(&p).go().await;
    assert_eq!(pending.json["count"], 1);
    assert_eq!(pending.json["requests"][0]["id"], json!(second));
    assert_eq!(pending.json["requests"][0]["distance_km"], json!(0.0));
}

/// A short `--request-ttl`: the request expires, both sides are told, responses are refused.
#[tokio::test]
async fn expiry() {
    let server = Server::start_with(|c| c.request_ttl = Duration::from_millis(800)).await;
    let (_, customer) = customer(&server, "exp@example.com").await;
    let (_, p) = pharmacy(&server, "exp-p@example.com", 27.7172, 85.3240).await;
    let mut ws = server.ws(&format!("/ws/pharmacy/?token={p}")).await;
    let mut ws_c = server.ws(&format!("/ws/customer/?token={customer}")).await;
    ws.json_of("sync").await;
    ws_c.json_of("sync").await;
    let id = create(&server, &customer, 5.0).await;
    ws.json_of("new_request").await;
    assert_eq!(ws.json().await, json!({"type": "request_expired", "request_id": id}));
    assert_eq!(ws_c.json().await, json!({"type": "request_expired", "request_id": id}));
    let late = answer(&server, &p, id, "ACCEPTED").await;
    assert_eq!(late.status, 400);
    let detail = server.get(&format!("/medicine/request/{id}/")).bearer(&customer).go().await;
    assert_eq!(detail.json["status"], "EXPIRED");
}

/// A PATCHed location is used by the very next broadcast.
#[tokio::test]
async fn patched_location_is_used_next() {
    let server = Server::start().await;
    let (_, customer) = customer(&server, "patch@example.com").await;
    let (_, p) = pharmacy(&server, "patch-p@example.com", 28.5, 84.0).await;
    assert_eq!(
        server
            .post("/medicine/request/")
            .bearer(&customer)
            .json(json!({"patient_lat": 27.7172, "patient_lng": 85.3240, "radius_km": 5, "quantity": 1}))
            .go()
            .await
            .json["pharmacies_notified"],
        0
    );
    let reply = server
        .request("PATCH", "/pharmacy/profile/")
        .bearer(&p)
        .form(&[("lat", "27.7172"), ("lng", "85.3250"), ("pharmacy_name", "Moved Pharmacy")])
        .go()
        .await;
    assert_eq!(reply.status, 200, "{:?}", reply.json);
    assert_eq!(reply.json["pharmacy"]["name"], "Moved Pharmacy");
    assert_eq!(reply.json["pharmacy"]["lng"], json!(85.325));
    let created = server
        .post("/medicine/request/")
        .bearer(&customer)
        .json(json!({"patient_lat": 27.7172, "patient_lng": 85.3240, "radius_km": 5, "quantity": 1}))
        .go()
        .await;
    assert_eq!(created.json["pharmacies_notified"], 1);
    let bad = server.request("PATCH", "/pharmacy/profile/").bearer(&p).json(json!({"lat": 95})).go().await;
    assert_eq!((bad.status, bad.json["field"].as_str()), (400, Some("lat")));
}

/// Images travel by multipart, come back as signed URLs, and only signed URLs serve them.
#[tokio::test]
async fn prescription_image_and_signed_urls() {
    let server = Server::start().await;
    let (_, customer) = customer(&server, "img@example.com").await;
    let (_, p) = pharmacy(&server, "img-p@example.com", 27.7172, 85.3240).await;
    let mut ws = server.ws(&format!("/ws/pharmacy/?token={p}")).await;
    ws.json_of("sync").await;
    let png = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDRfake-image-bytes";
    let reply = server
        .post("/medicine/request/")
        .bearer(&customer)
        .multipart(
            &[("patient_lat", "27.7172"), ("patient_lng", "85.3240"), ("radius_km", "10.0"), ("quantity", "10")],
            &[("image", "rx.png", png)],
        )
        .go()
        .await;
    assert_eq!(reply.status, 201, "{:?}", reply.json);
    let url = reply.json["data"]["image"].as_str().unwrap().to_string();
    assert!(url.contains("/media/prescriptions/") && url.contains("exp=") && url.contains("sig="), "{url}");
    let path = url.split_once(&format!("127.0.0.1:{}", server.addr.port())).unwrap().1.to_string();
    let image = server.get(&path).go().await;
    assert_eq!(image.status, 200);
    assert_eq!(image.header("content-type"), Some("image/png"));
    assert_eq!(&image.bytes[..], &png[..]);
    let unsigned = path.split('?').next().unwrap().to_string();
    assert_eq!(server.get(&unsigned).go().await.status, 404);
    assert_eq!(server.get(&path.replace("sig=", "sig=00")).go().await.status, 404);
    assert_eq!(server.get("/media/../sanjevani.db").go().await.status, 404);
    assert_eq!(server.get("/media/prescriptions/..%2F..%2Fsanjevani.db?exp=9999999999&sig=x").go().await.status, 404);
    let msg = ws.json_of("new_request").await;
    assert!(msg["image_url"].as_str().unwrap().contains("/media/prescriptions/"));
    let gif = server
        .post("/medicine/request/")
        .bearer(&customer)
        .multipart(
            &[("patient_lat", "27.7172"), ("patient_lng", "85.3240"), ("radius_km", "10"), ("quantity", "1")],
            &[("image", "rx.png", b"GIF89a....")],
        )
        .go()
        .await;
    assert_eq!((gif.status, gif.json["field"].as_str()), (400, Some("image")));
    let audio = server
        .post("/medicine/response/")
        .bearer(&p)
        .multipart(
            &[("request_id", &reply.json["request_id"].to_string()), ("response_type", "REJECTED")],
            &[("audio", "note.ogg", b"OggS\0\x02rest-of-ogg")],
        )
        .go()
        .await;
    assert_eq!(audio.status, 201, "{:?}", audio.json);
    assert!(audio.json["audio"].as_str().unwrap().contains("/media/audio/"));
}
