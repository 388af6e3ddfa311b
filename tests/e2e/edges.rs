//! The HTTP edges: allowed hosts, CORS, 404/405, malformed input of every kind getting its 4xx
//! while the server keeps serving, the slow-header cut, and a restart keeping everything.

use crate::harness::*;
use serde_json::json;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn hosts_and_routing() {
    let server = Server::start().await;
    assert_eq!(server.get("/health").go().await.json, json!({"status": "ok"}));
    let evil = server.get("/health").header("host", "evil.example.com").go().await;
    assert_eq!(evil.status, 400);
    assert!(evil.json["error"].is_string());
    assert_eq!(server.get("/health").header("host", "localhost:8000").go().await.status, 200);
    assert_eq!(server.get("/health").header("host", "[::1]:8000").go().await.status, 200);
    let missing = server.get("/no/such/path").go().await;
    assert_eq!((missing.status, missing.json["error"].is_string()), (404, true));
    let wrong = server.request("DELETE", "/login").go().await;
    assert_eq!((wrong.status, wrong.json["error"].is_string()), (405, true));
    assert_eq!(server.get("/login").go().await.status, 405);
    assert_eq!(server.post("/login/").json(json!({})).go().await.status, 400, "both slash forms");
    let server = Server::start_with(|c| c.allowed_hosts = vec!["api.example.com".into()]).await;
    assert_eq!(server.get("/health").go().await.status, 200);
    assert_eq!(server.get("/health").header("host", "127.0.0.1").go().await.status, 400);
}

#[tokio::test]
async fn cors_preflight_and_headers() {
    let server =
        Server::start_with(|c| c.cors_origins = sanjevani::config::CorsOrigins::parse("http://app.example.com")).await;
    let ok = server
        .request("OPTIONS", "/medicine/request/")
        .header("origin", "http://app.example.com")
        .header("access-control-request-method", "POST")
        .go()
        .await;
    assert_eq!(ok.status, 204);
    assert_eq!(ok.header("access-control-allow-origin"), Some("http://app.example.com"));
    assert_eq!(ok.header("access-control-allow-methods"), Some("GET, POST, PATCH, OPTIONS"));
    assert_eq!(ok.header("access-control-allow-headers"), Some("Authorization, Content-Type, Idempotency-Key"));
    assert_eq!(ok.header("access-control-max-age"), Some("600"));
    let foreign = server
        .request("OPTIONS", "/medicine/request/")
        .header("origin", "http://evil.example.com")
        .header("access-control-request-method", "POST")
        .go()
        .await;
    assert_eq!(foreign.status, 204);
    assert!(foreign.header("access-control-allow-origin").is_none());
    assert!(foreign.header("access-control-allow-methods").is_none());
    let get = server.get("/health").header("origin", "http://app.example.com").go().await;
    assert_eq!(get.header("access-control-allow-origin"), Some("http://app.example.com"));
    assert_eq!(get.header("access-control-expose-headers"), Some("Retry-After"));
    assert!(
        server
            .get("/health")
            .header("origin", "http://evil.example.com")
            .go()
            .await
            .header("access-control-allow-origin")
            .is_none()
    );
}

/// Malformed input of every kind gets its 4xx, in API.md's order, and the server keeps serving.
#[tokio::test]
async fn malformed_input_gets_4xx() {
    let server = Server::start().await;
    let (_, customer) = customer(&server, "bad@example.com").await;
    let (_, pharmacy) = pharmacy(&server, "bad-p@example.com", 27.7, 85.3).await;
    let post = |body: serde_json::Value| server.post("/medicine/request/").bearer(&customer).json(body).go();
    let base = json!({"patient_lat": 27.7, "patient_lng": 85.3, "radius_km": 5, "quantity": 1});
    let with = |k: &str, v: serde_json::Value| {
        let mut b = base.clone();
        b[k] = v;
        b
    };
    for (body, field) in [
        (with("patient_lat", json!(91)), "patient_lat"),
        (with("patient_lng", json!(-180.5)), "patient_lng"),
        (with("patient_lat", json!("NaN")), "patient_lat"),
        (with("patient_lat", json!("abc")), "patient_lat"),
        (with("radius_km", json!(0.5)), "radius_km"),
        (with("radius_km", json!(51)), "radius_km"),
        (with("quantity", json!(0)), "quantity"),
        (with("quantity", json!(1.5)), "quantity"),
        (with("quantity", json!([1])), "quantity"),
        (with("medicine_name", json!("x".repeat(201))), "medicine_name"),
        (with("note", json!("x".repeat(1001))), "note"),
        (json!({"patient_lng": 85.3, "radius_km": 5, "quantity": 1}), "patient_lat"),
    ] {
        let r = post(body.clone()).await;
        assert_eq!((r.status, r.json["field"].as_str()), (400, Some(field)), "{body}");
    }
    let r = server.post("/medicine/request/").bearer(&customer).raw("application/json", "{not json").go().await;
    assert_eq!(r.status, 400);
    let r = server.post("/medicine/request/").bearer(&customer).raw("application/json", "[1,2]").go().await;
    assert_eq!(r.status, 400);
    let r = server.post("/medicine/request/").bearer(&customer).raw("text/plain", "hello").go().await;
    assert_eq!(r.status, 415);
    let r = server.post("/medicine/request/").raw("text/plain", "hello").go().await;
    assert_eq!(r.status, 401, "401 before 415");
    let r = server.post("/medicine/request/").bearer(&pharmacy).raw("text/plain", "x").go().await;
    assert_eq!(r.status, 403, "403 before 415");
    let r =
        server.post("/medicine/request/").bearer(&customer).raw("application/json", vec![b' '; 70 * 1024]).go().await;
    assert_eq!(r.status, 413);
    let r = server.post("/medicine/request/").bearer(&customer).raw("multipart/form-data", "x").go().await;
    assert_eq!(r.status, 400, "multipart without boundary");
    let r = server
        .post("/medicine/request/")
        .bearer(&customer)
        .raw("multipart/form-data; boundary=zzz", "--zzz\r\nContent-Disposition: form-data; name=\"quantity\"\r\n\r\n1")
        .go()
        .await;
    assert_eq!(r.status, 400, "truncated multipart");
    let r = server
        .post("/medicine/request/")
        .bearer(&customer)
        .raw("application/json; charset=utf-8", base.to_string())
        .go()
        .await;
    assert_eq!(r.status, 201, "media-type parameters ignored");
    let r = server
        .post("/medicine/response/")
        .bearer(&pharmacy)
        .json(json!({"request_id": 1, "response_type": "MAYBE"}))
        .go()
        .await;
    assert_eq!((r.status, r.json["field"].as_str()), (400, Some("response_type")));
    let r = server
        .post("/medicine/response/")
        .bearer(&pharmacy)
        .json(json!({"request_id": "x", "response_type": "ACCEPTED"}))
        .go()
        .await;
    assert_eq!(r.status, 400);
    let r = server
        .post("/medicine/response/")
        .bearer(&pharmacy)
        .json(json!({"request_id": 99999, "response_type": "ACCEPTED"}))
        .go()
        .await;
    assert_eq!(r.status, 404);
    assert_eq!(server.get("/medicine/request/abc/").bearer(&customer).go().await.status, 404);
    assert_eq!(server.get("/medicine/request/abc/").go().await.status, 401, "401 before 404 (API.md's order)");
    assert_eq!(server.request("DELETE", "/admin/pharmacies/abc/approve/").go().await.status, 405);
    assert_eq!(server.get("/medicine/request/99999/").bearer(&customer).go().await.status, 404);
    let r = server.post("/pharmacy/register/").json(json!({"email": "p2@example.com", "password": "password-123", "name": "N", "phone_number": "1", "pharmacy_name": "P", "lat": 27.7, "lng": 200})).go().await;
    assert_eq!((r.status, r.json["field"].as_str()), (400, Some("lng")));
    let r = server
        .post("/customer/register/")
        .json(json!({"email": "not-an-email", "password": "password-123", "name": "N", "phone_number": "1"}))
        .go()
        .await;
    assert_eq!((r.status, r.json["field"].as_str()), (400, Some("email")));
    let r = server.post("/login").bearer("garbage").json(json!({"email": 5, "password": null})).go().await;
    assert_eq!(r.status, 400);
    // Still serving.
    assert_eq!(server.get("/health").go().await.status, 200);
    assert_eq!(server.get("/medicine/request/").bearer(&customer).go().await.json["count"], 1);
}

/// A client that sends its request head one byte a second is dropped after 10 s; an idle
/// keep-alive connection stays open beyond that.
#[tokio::test]
async fn slow_headers_are_cut_after_ten_seconds() {
    let server = Server::start().await;
    let mut slow = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let mut idle = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let started = std::time::Instant::now();
    let head =
        b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Padding: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";
    let mut cut_at = None;
    for byte in head.iter() {
        if slow.write_all(&[*byte]).await.is_err() {
            cut_at = Some(started.elapsed());
            break;
        }
        let mut probe = [0u8; 64];
        match tokio::time::timeout(Duration::from_secs(1), slow.read(&mut probe)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                cut_at = Some(started.elapsed());
                break;
            }
            Ok(Ok(_)) => panic!("the server answered a request it never fully received"),
            Err(_) => {}
        }
    }
    let cut_at = cut_at.expect("the slow client was never cut");
    assert!(cut_at >= Duration::from_secs(9) && cut_at < Duration::from_secs(13), "{cut_at:?}");
    // The idle keep-alive connection (no bytes sent) is still usable after those ~10 s.
    idle.write_all(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").await.unwrap();
    let mut buf = [0u8; 256];
    let n = tokio::time::timeout(Duration::from_secs(2), idle.read(&mut buf)).await.unwrap().unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&buf[..n]));
}

/// A restart on the same data dir keeps accounts, requests and their state.
#[tokio::test]
async fn restart_keeps_everything() {
    let server = Server::start().await;
    let (_, customer) = customer(&server, "keep@example.com").await;
    let (_, p) = pharmacy(&server, "keep-p@example.com", 27.7172, 85.3240).await;
    let body = json!({"patient_lat": 27.7172, "patient_lng": 85.3240, "radius_km": 5, "quantity": 3});
    let accepted = server.post("/medicine/request/").bearer(&customer).json(body.clone()).go().await.json["request_id"]
        .as_i64()
        .unwrap();
    let open =
        server.post("/medicine/request/").bearer(&customer).json(body).go().await.json["request_id"].as_i64().unwrap();
    assert_eq!(
        server
            .post("/medicine/response/")
            .bearer(&p)
            .json(json!({"request_id": accepted, "response_type": "ACCEPTED"}))
            .go()
            .await
            .status,
        201
    );
    let dir = server.stop().await;

    let server = Server::start_in(dir, |_| {}).await;
    let list = server.get("/medicine/request/").bearer(&customer).go().await;
    assert_eq!(list.status, 200, "tokens survive: the secret is the same");
    assert_eq!(list.json["count"], 2);
    let detail = server.get(&format!("/medicine/request/{accepted}/")).bearer(&customer).go().await;
    assert_eq!(detail.json["status"], "ACCEPTED");
    assert_eq!(detail.json["responses"].as_array().unwrap().len(), 1);
    let pending = server.get("/pharmacy/requests/").bearer(&p).go().await;
    assert_eq!(pending.json["requests"][0]["id"], json!(open));
    let mut ws = server.ws(&format!("/ws/pharmacy/?token={p}")).await;
    ws.json_of("connection").await;
    assert_eq!(ws.json().await["request_id"], json!(open));
    assert_eq!(ws.json().await, json!({"type": "sync", "pending": [open]}));
    login(&server, "keep@example.com", "password-123").await;
}

/// `--max-connections`: past the limit, a new connection waits in the listen backlog and is
/// served once another closes.
#[tokio::test]
async fn connections_past_the_limit_wait() {
    let server = Server::start_with(|c| c.max_connections = Some(2)).await;
    let request = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n";
    let mut first = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let mut second = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let mut buf = [0u8; 256];
    for conn in [&mut first, &mut second] {
        conn.write_all(request).await.unwrap();
        let n = tokio::time::timeout(Duration::from_secs(2), conn.read(&mut buf)).await.unwrap().unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    }
    let mut third = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    third.write_all(request).await.unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(500), third.read(&mut buf)).await.is_err(),
        "the third connection is not served while two are open"
    );
    drop(first);
    let n = tokio::time::timeout(Duration::from_secs(2), third.read(&mut buf)).await.unwrap().unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "served once a slot freed");
}

/// A multipart body over `--max-upload` → 413, checked before it is buffered.
#[tokio::test]
async fn uploads_over_the_limit_get_413() {
    let server = Server::start_with(|c| c.max_upload = 64 * 1024).await;
    let (_, customer) = customer(&server, "big@example.com").await;
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    png.resize(100 * 1024, 0);
    let reply = server
        .post("/medicine/request/")
        .bearer(&customer)
        .multipart(
            &[("patient_lat", "27.7"), ("patient_lng", "85.3"), ("radius_km", "5"), ("quantity", "1")],
            &[("image", "big.png", &png)],
        )
        .go()
        .await;
    assert_eq!(reply.status, 413);
    assert_eq!(server.get("/health").go().await.status, 200);
}
