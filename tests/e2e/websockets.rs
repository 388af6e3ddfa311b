//! WebSockets end to end: admission close codes, every row of the event × recipient table with
//! two devices of one account, replay and `sync` on reconnect, client messages and protocol
//! errors, the slow-consumer cut, suspension and shutdown.

use crate::harness::*;
use fastwebsockets::{Frame, OpCode, Payload};
use serde_json::json;
use std::time::Duration;

async fn create(server: &Server, token: &str, radius: f64) -> i64 {
    let reply = server
        .post("/medicine/request/")
        .bearer(token)
        .json(json!({"patient_lat": 27.7172, "patient_lng": 85.3240, "radius_km": radius, "quantity": 1}))
        .go()
        .await;
    assert_eq!(reply.status, 201, "{:?}", reply.json);
    reply.json["request_id"].as_i64().unwrap()
}

async fn answer(server: &Server, token: &str, id: i64, kind: &str) -> u16 {
    server
        .post("/medicine/response/")
        .bearer(token)
        .json(json!({"request_id": id, "response_type": kind}))
        .go()
        .await
        .status
}

async fn connected(server: &Server, path: &str) -> Ws {
    let mut ws = server.ws(path).await;
    assert_eq!(ws.json().await["type"], "connection");
    assert_eq!(ws.json().await["type"], "sync");
    ws
}

#[tokio::test]
async fn admission_close_codes() {
    let server = Server::start().await;
    let (_, customer) = customer(&server, "adm@example.com").await;
    let (_, pharmacy) = pharmacy(&server, "adm-p@example.com", 27.7, 85.3).await;
    let refresh = server
        .post("/login")
        .json(json!({"email": "adm@example.com", "password": "password-123"}))
        .go()
        .await
        .json["refresh"]
        .as_str()
        .unwrap()
        .to_string();
    for (path, code) in [
        ("/ws/customer/".to_string(), 4001),
        ("/ws/customer/?token=garbage".to_string(), 4001),
        (format!("/ws/customer/?token={refresh}"), 4001),
        (format!("/ws/pharmacy/?token={customer}"), 4003),
        (format!("/ws/customer/?token={pharmacy}"), 4003),
    ] {
        let mut ws = server.ws(&path).await;
        assert_eq!(ws.next_within(Duration::from_secs(5)).await, Some(WsEvent::Closed(code)), "{path}");
    }
    let mut ws = server.ws(&format!("/ws/customer?token={customer}")).await;
    let hello = ws.json().await;
    assert_eq!(hello["message"], "Connected to customer channel");
    assert!(hello["user_id"].is_string());
    assert_eq!(hello["user_name"], "John Doe");
    let mut ws = server.ws(&format!("/ws/pharmacy/?token={pharmacy}")).await;
    let hello = ws.json().await;
    assert_eq!(hello["message"], "Connected to pharmacy channel");
    assert!(hello["pharmacy_id"].is_string());
    assert_eq!(hello["location"], json!({"lat": 27.7, "lng": 85.3}));
    // Not an upgrade at all: a JSON 400.
    assert_eq!(server.get("/ws/customer/").go().await.status, 400);
}

/// Every row of API.md's table, with the customer on two devices.
#[tokio::test]
async fn event_recipient_table_with_two_devices() {
    let server = Server::start().await;
    let (_, customer) = customer(&server, "table@example.com").await;
    let (_, a) = pharmacy(&server, "ta@example.com", 27.722287, 85.329747).await;
    let (_, b) = pharmacy(&server, "tb@example.com", 27.703209, 85.339802).await;
    let (_, c) = pharmacy(&server, "tc@example.com", 27.690488, 85.293837).await;
    let mut phone = connected(&server, &format!("/ws/customer/?token={customer}")).await;
    let mut laptop = connected(&server, &format!("/ws/customer/?token={customer}")).await;
    let mut wa = connected(&server, &format!("/ws/pharmacy/?token={a}")).await;
    let mut wa2 = connected(&server, &format!("/ws/pharmacy/?token={a}")).await;
    let mut wb = connected(&server, &format!("/ws/pharmacy/?token={b}")).await;
    let mut wc = connected(&server, &format!("/ws/pharmacy/?token={c}")).await;
    let quiet = Duration::from_millis(150);

    // created → new_request to notified pharmacies (each device), nothing to the customer.
    let id = create(&server, &customer, 10.0).await;
    for ws in [&mut wa, &mut wa2, &mut wb, &mut wc] {
        let m = ws.json().await;
        assert_eq!((m["type"].as_str(), m["request_id"].as_i64()), (Some("new_request"), Some(id)));
        assert!(m.get("replay").is_none());
    }
    phone.silent_for(quiet).await;

    // REJECTED → pharmacy_response to the customer's devices only.
    assert_eq!(answer(&server, &c, id, "REJECTED").await, 201);
    for ws in [&mut phone, &mut laptop] {
        assert_eq!(ws.json().await["response_type"], "REJECTED");
    }
    wa.silent_for(quiet).await;

    // ACCEPTED → customer; request_taken to the others (rejecter too), not the winner.
    assert_eq!(answer(&server, &b, id, "ACCEPTED").await, 201);
    for ws in [&mut phone, &mut laptop] {
        let m = ws.json().await;
        assert_eq!((m["type"].as_str(), m["response_type"].as_str()), (Some("pharmacy_response"), Some("ACCEPTED")));
    }
    for ws in [&mut wa, &mut wa2, &mut wc] {
        assert_eq!(ws.json().await["type"], "request_taken");
    }
    wb.silent_for(quiet).await;

    // cancelled → customer, and notified pharmacies that have not answered.
    let id2 = create(&server, &customer, 10.0).await;
    for ws in [&mut wa, &mut wa2, &mut wb, &mut wc] {
        ws.json_of("new_request").await;
    }
    assert_eq!(answer(&server, &a, id2, "REJECTED").await, 201);
    for ws in [&mut phone, &mut laptop] {
        ws.json_of("pharmacy_response").await;
    }
    assert_eq!(server.post(&format!("/medicine/request/{id2}/cancel/")).bearer(&customer).go().await.status, 200);
    let cancelled = json!({"type": "request_cancelled", "request_id": id2});
    for ws in [&mut phone, &mut laptop, &mut wb, &mut wc] {
        assert_eq!(ws.json().await, cancelled);
    }
    wa.silent_for(quiet).await;
    wa2.silent_for(quiet).await;
}

/// Reconnecting: a pharmacy gets replays of what it was notified of and has not answered, then
/// `sync`; a customer gets `sync` with pending and recently closed; `?replay=0` turns both off.
#[tokio::test]
async fn replay_and_sync_after_reconnect() {
    let server = Server::start().await;
    let (_, customer) = customer(&server, "replay@example.com").await;
    let (_, a) = pharmacy(&server, "ra@example.com", 27.722287, 85.329747).await;
    let (_, b) = pharmacy(&server, "rb@example.com", 27.703209, 85.339802).await;
    let r1 = create(&server, &customer, 5.0).await;
    let r2 = create(&server, &customer, 5.0).await;
    let r3 = create(&server, &customer, 5.0).await;
    assert_eq!(answer(&server, &a, r1, "REJECTED").await, 201);
    assert_eq!(answer(&server, &b, r2, "ACCEPTED").await, 201);

    let mut ws = server.ws(&format!("/ws/pharmacy/?token={a}")).await;
    assert_eq!(ws.json().await["type"], "connection");
    let replayed = ws.json().await;
    assert_eq!((replayed["type"].as_str(), replayed["request_id"].as_i64()), (Some("new_request"), Some(r3)));
    assert_eq!(replayed["replay"], json!(true));
    assert_eq!(replayed["distance_km"], json!(0.8));
    assert_eq!(ws.json().await, json!({"type": "sync", "pending": [r3]}));

    let mut ws = server.ws(&format!("/ws/customer/?token={customer}")).await;
    ws.json_of("connection").await;
    let sync = ws.json().await;
    assert_eq!(sync["type"], "sync");
    let mut pending: Vec<i64> = serde_json::from_value(sync["pending"].clone()).unwrap();
    pending.sort();
    assert_eq!(pending, vec![r1, r3]);
    assert_eq!(sync["closed"], json!([{"request_id": r2, "status": "ACCEPTED"}]));

    let mut ws = server.ws(&format!("/ws/pharmacy/?token={a}&replay=0")).await;
    ws.json_of("connection").await;
    ws.silent_for(Duration::from_millis(200)).await;
}

#[tokio::test]
async fn client_messages_and_protocol_errors() {
    let server = Server::start().await;
    let (_, customer) = customer(&server, "msgs@example.com").await;
    let path = format!("/ws/customer/?token={customer}");
    let mut ws = connected(&server, &path).await;
    ws.send_text(r#"{"type":"ping"}"#).await;
    assert_eq!(ws.json().await, json!({"type": "pong"}));
    ws.send_text(r#"{"type":"dance"}"#).await;
    assert_eq!(ws.json().await["type"], "error");
    ws.send_text("not json").await;
    assert_eq!(ws.json().await["type"], "error");
    ws.send_frame(Frame::binary(Payload::Owned(vec![1, 2, 3]))).await;
    assert_eq!(ws.json().await["type"], "error");
    // Fragmented ping message, reassembled.
    ws.send_frame(Frame::new(false, OpCode::Text, None, Payload::Owned(br#"{"type""#.to_vec()))).await;
    ws.send_frame(Frame::new(true, OpCode::Continuation, None, Payload::Owned(br#":"ping"}"#.to_vec()))).await;
    assert_eq!(ws.json().await, json!({"type": "pong"}));

    let mut ws = connected(&server, &path).await;
    ws.send_frame(Frame::new(true, OpCode::Text, None, Payload::Owned(vec![0xff, 0xfe, 0x80]))).await;
    assert_eq!(ws.close_code().await, 1007);

    let mut ws = connected(&server, &path).await;
    let big = format!("{{\"type\":\"ping\",\"pad\":\"{}\"}}", "x".repeat(64 * 1024));
    ws.send_text(&big).await;
    assert_eq!(ws.close_code().await, 1009);

    let mut ws = connected(&server, &path).await;
    ws.send_frame(Frame::new(false, OpCode::Text, None, Payload::Owned(vec![b' '; 30 * 1024]))).await;
    for _ in 0..2 {
        ws.send_frame(Frame::new(false, OpCode::Continuation, None, Payload::Owned(vec![b' '; 30 * 1024]))).await;
    }
    assert_eq!(ws.close_code().await, 1009, "over 64 KiB after reassembly");
}

/// A raw client that never answers: it is pinged every `--ws-ping` and closed with 1000 once
/// silent for `--ws-idle`; a client that talks is kept.
#[tokio::test]
async fn idle_sockets_are_pinged_and_closed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let server = Server::start_with(|c| {
        c.ws_ping = Duration::from_millis(200);
        c.ws_idle = Duration::from_millis(900);
    })
    .await;
    let (_, customer) = customer(&server, "idle@example.com").await;
    let mut raw = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let request = format!(
        "GET /ws/customer/?token={customer} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    raw.write_all(request.as_bytes()).await.unwrap();
    let started = std::time::Instant::now();
    let mut bytes = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(Ok(n)) = tokio::time::timeout(Duration::from_secs(3), raw.read(&mut buf)).await {
        if n == 0 {
            break;
        }
        bytes.extend_from_slice(&buf[..n]);
    }
    let waited = started.elapsed();
    let head_end = bytes.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    assert!(bytes.starts_with(b"HTTP/1.1 101"));
    // Walk the frames: connection, sync, pings, then a close with 1000.
    let (mut at, mut pings, mut close) = (head_end, 0, None);
    while at + 2 <= bytes.len() {
        let (opcode, len) = (bytes[at] & 0x0f, (bytes[at + 1] & 0x7f) as usize);
        let payload = &bytes[at + 2..at + 2 + len];
        match opcode {
            0x9 => pings += 1,
            0x8 => close = Some(u16::from_be_bytes([payload[0], payload[1]])),
            _ => {}
        }
        at += 2 + len;
    }
    assert_eq!(close, Some(1000), "closed as idle");
    assert!(pings >= 2, "pinged while idle ({pings})");
    assert!(waited >= Duration::from_millis(800) && waited < Duration::from_secs(3), "{waited:?}");

    // A client that answers pings (fastwebsockets auto-pongs) stays connected.
    let mut ws = connected(&server, &format!("/ws/customer/?token={customer}")).await;
    ws.silent_for(Duration::from_millis(1500)).await;
    ws.send_text(r#"{"type":"ping"}"#).await;
    assert_eq!(ws.json().await, json!({"type": "pong"}));
}

/// A client that stops reading is cut with 4008 while another pharmacy gets every message; when
/// it reads again it finds its backlog and then the 4008.
#[tokio::test]
async fn slow_consumer_is_cut_and_others_are_not() {
    let server = Server::start_with(|c| c.ws_queue = 16).await;
    let (_, customer) = customer(&server, "slow@example.com").await;
    let (_, slow) = pharmacy(&server, "slow-p@example.com", 27.7172, 85.3240).await;
    let (_, fast) = pharmacy(&server, "fast-p@example.com", 27.7173, 85.3240).await;
    let mut stalled = Ws::connect(server.addr, &format!("/ws/pharmacy/?token={slow}"), Some(4096)).await;
    let mut healthy = connected(&server, &format!("/ws/pharmacy/?token={fast}")).await;
    // Big notes make each frame ~1.2 KB, so the stalled socket's buffers fill quickly.
    let note = "n".repeat(1000);
    let total = 400;
    let reader = tokio::spawn(async move {
        let mut ids = Vec::new();
        while ids.len() < total {
            let m = healthy.json_of("new_request").await;
            ids.push(m["request_id"].as_i64().unwrap());
        }
        ids
    });
    let mut created = Vec::new();
    for _ in 0..total {
        let reply = server
            .post("/medicine/request/")
            .bearer(&customer)
            .json(json!({"patient_lat": 27.7172, "patient_lng": 85.3240, "radius_km": 1, "quantity": 1, "note": note}))
            .go()
            .await;
        assert_eq!(reply.status, 201);
        created.push(reply.json["request_id"].as_i64().unwrap());
    }
    let got = tokio::time::timeout(Duration::from_secs(20), reader).await.unwrap().unwrap();
    assert_eq!(got, created, "the healthy pharmacy got every message, in order");
    let mut seen = 0;
    let code = loop {
        match stalled.next_within(Duration::from_secs(5)).await {
            Some(WsEvent::Json(m)) if m["type"] == "new_request" => seen += 1,
            Some(WsEvent::Json(_)) => {}
            Some(WsEvent::Closed(code)) => break code,
            None => panic!("no close frame after {seen} messages"),
        }
    };
    assert_eq!(code, 4008);
    assert!(seen > 0 && seen < total, "read its backlog ({seen}) and then the 4008");
    let stats = server.get("/admin/stats").go().await;
    assert_eq!(stats.status, 401);
}

#[tokio::test]
async fn shutdown_closes_sockets_with_1001() {
    let server = Server::start().await;
    let (_, customer) = customer(&server, "bye@example.com").await;
    let mut ws = connected(&server, &format!("/ws/customer/?token={customer}")).await;
    let stopping = tokio::spawn(server.stop());
    assert_eq!(ws.close_code().await, 1001);
    stopping.await.unwrap();
}
