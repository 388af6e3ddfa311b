//! Accounts end to end: OTP mail through the local SMTP sink (limits, single use, the 5-try
//! burn, STARTTLS with `--smtp-ca`, a retry after the sink was down), registration, login and
//! its lockout, refresh, profiles, and tokens of the original Django server's shape.

use crate::harness::*;
use crate::smtp_sink::SmtpSink;
use serde_json::json;
use std::io::Write;
use std::time::Duration;

fn code_in(data: &str) -> String {
    let digits: Vec<char> = data.chars().collect();
    for window in digits.windows(6) {
        if window.iter().all(|c| c.is_ascii_digit()) {
            return window.iter().collect();
        }
    }
    panic!("no 6-digit code in mail: {data}");
}

#[tokio::test]
async fn otp_through_the_sink_with_limits_and_burn() {
    let sink = SmtpSink::start().await;
    let url = sink.url();
    let server = Server::start_with(|c| c.smtp_url = Some(url)).await;
    let sent = server.post("/send-otp").json(json!({"email": " Patient@Example.com "})).go().await;
    assert_eq!((sent.status, &sent.json), (200, &json!({"message": "OTP sent successfully"})));
    let mails = sink.wait_for(1, Duration::from_secs(5)).await;
    assert_eq!(mails.len(), 1);
    assert_eq!(mails[0].to, vec!["patient@example.com".to_string()]);
    let code = code_in(&mails[0].data);

    // One per 60 s per email.
    let again = server.post("/send-otp").json(json!({"email": "patient@example.com"})).go().await;
    assert_eq!(again.status, 429);
    assert!(again.header("retry-after").unwrap().parse::<u64>().unwrap() > 0);

    // A wrong code counts; the right one verifies once.
    let wrong = if code == "000000" { "111111" } else { "000000" };
    let bad = server.post("/verify-otp").json(json!({"email": "patient@example.com", "otp": wrong})).go().await;
    assert_eq!((bad.status, bad.json["field"].as_str()), (400, Some("otp")));
    let ok = server.post("/verify-otp").form(&[("email", "patient@example.com"), ("otp", &code)]).go().await;
    assert_eq!((ok.status, &ok.json), (200, &json!({"message": "Email verified successfully"})));
    let reused = server.post("/verify-otp").json(json!({"email": "patient@example.com", "otp": code})).go().await;
    assert_eq!(reused.status, 400, "single use");

    // Registration records that the email was verified beforehand.
    let reg = server
        .post("/customer/register/")
        .json(json!({"email": "PATIENT@example.com", "password": "password-123", "name": "Pat", "phone_number": "98"}))
        .go()
        .await;
    assert_eq!(reg.status, 201);
    let token = login(&server, "patient@example.com", "password-123").await;
    let profile = server.get("/customer/profile/").bearer(&token).go().await;
    assert_eq!(profile.json["email_verified"], json!(true));

    // Five wrong tries burn a code: the right one no longer works.
    assert_eq!(server.post("/send-otp").json(json!({"email": "burn@example.com"})).go().await.status, 200);
    let mails = sink.wait_for(2, Duration::from_secs(5)).await;
    let code = code_in(&mails[1].data);
    let wrong = if code == "000000" { "111111" } else { "000000" };
    for _ in 0..5 {
        let r = server.post("/verify-otp").json(json!({"email": "burn@example.com", "otp": wrong})).go().await;
        assert_eq!(r.status, 400);
    }
    let burned = server.post("/verify-otp").json(json!({"email": "burn@example.com", "otp": code})).go().await;
    assert_eq!(burned.status, 400, "burned after 5 wrong tries: {:?}", burned.json);
    assert_eq!(
        server.post("/verify-otp").json(json!({"email": "burn@example.com", "otp": "12ab56"})).go().await.status,
        400
    );
}

/// 30 OTPs per hour per client IP; an `X-Forwarded-For` from an untrusted peer changes nothing.
#[tokio::test]
async fn otp_ip_limit_ignores_untrusted_forwarded_for() {
    let server = Server::start().await;
    for i in 0..30 {
        let r = server
            .post("/send-otp")
            .header("x-forwarded-for", &format!("10.0.0.{i}"))
            .json(json!({"email": format!("u{i}@example.com")}))
            .go()
            .await;
        assert_eq!(r.status, 200, "{i}");
    }
    let r = server
        .post("/send-otp")
        .header("x-forwarded-for", "10.9.9.9")
        .json(json!({"email": "u99@example.com"}))
        .go()
        .await;
    assert_eq!(r.status, 429);
    assert!(r.header("retry-after").is_some());
}

/// Behind a trusted proxy, the client IP is the proxy's `X-Forwarded-For` entry.
#[tokio::test]
async fn trusted_proxy_forwarded_for_is_the_client() {
    let server = Server::start_with(|c| c.trusted_proxies = vec!["127.0.0.0/8".parse().unwrap()]).await;
    for i in 0..31 {
        let r = server
            .post("/send-otp")
            .header("x-forwarded-for", &format!("203.0.113.{i}"))
            .json(json!({"email": format!("t{i}@example.com")}))
            .go()
            .await;
        assert_eq!(r.status, 200, "each forwarded client has its own limit ({i})");
    }
}

#[tokio::test]
async fn otp_over_starttls_with_private_ca() {
    let sink = SmtpSink::start_tls().await;
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::File::create(&ca).unwrap().write_all(sink.cert_pem().unwrap().as_bytes()).unwrap();
    let url = format!("smtp://mailer:s3cret@localhost:{}?tls=required", sink.port());
    let server = Server::start_with(|c| {
        c.smtp_url = Some(url);
        c.smtp_ca = Some(ca);
    })
    .await;
    assert_eq!(server.post("/send-otp").json(json!({"email": "tls@example.com"})).go().await.status, 200);
    let mails = sink.wait_for(1, Duration::from_secs(10)).await;
    assert_eq!(mails.len(), 1);
    assert!(mails[0].tls, "delivered over STARTTLS");
}

#[tokio::test]
async fn otp_mail_is_retried_after_the_sink_comes_back() {
    let sink = SmtpSink::start().await;
    let url = sink.url();
    let server = Server::start_with(|c| c.smtp_url = Some(url)).await;
    sink.stop().await;
    assert_eq!(server.post("/send-otp").json(json!({"email": "late@example.com"})).go().await.status, 200);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    sink.start_again().await;
    let mails = sink.wait_for(1, Duration::from_secs(10)).await;
    assert_eq!(mails.len(), 1);
    assert_eq!(mails[0].to, vec!["late@example.com".to_string()]);
}

#[tokio::test]
async fn register_login_refresh_profiles() {
    let server = Server::start().await;
    let reg = server
        .post("/customer/register/")
        .form(&[
            ("email", "Jo@Example.com"),
            ("password", "password-123"),
            ("name", "John Doe"),
            ("phone_number", "9841234567"),
        ])
        .go()
        .await;
    assert_eq!(reg.status, 201, "{:?}", reg.json);
    assert_eq!(reg.json["message"], "Customer registration successful");
    assert_eq!(reg.json["user"]["email"], "jo@example.com");
    assert_eq!(reg.json["user"]["role"], "CUSTOMER");
    let dup = server
        .post("/customer/register/")
        .json(json!({"email": "jo@example.com", "password": "password-123", "name": "J", "phone_number": "1"}))
        .go()
        .await;
    assert_eq!(dup.status, 409);
    let short = server
        .post("/customer/register/")
        .json(json!({"email": "x@example.com", "password": "short", "name": "J", "phone_number": "1"}))
        .go()
        .await;
    assert_eq!((short.status, short.json["field"].as_str()), (400, Some("password")));

    let login = server.post("/login").json(json!({"email": "JO@example.com ", "password": "password-123"})).go().await;
    assert_eq!(login.status, 200);
    for key in ["refresh", "access", "role", "user_id", "name"] {
        assert!(login.json.get(key).is_some(), "{key}");
    }
    assert_eq!(login.json["name"], "John Doe");
    let (access, refresh) = (login.json["access"].as_str().unwrap(), login.json["refresh"].as_str().unwrap());
    let wrong = server.post("/login").json(json!({"email": "jo@example.com", "password": "nope-nope"})).go().await;
    let unknown = server.post("/login").json(json!({"email": "who@example.com", "password": "nope-nope"})).go().await;
    assert_eq!((wrong.status, unknown.status), (401, 401));
    assert_eq!(wrong.json, unknown.json, "one message for both");

    let refreshed = server.post("/token/refresh").json(json!({"refresh": refresh})).go().await;
    assert_eq!(refreshed.status, 200);
    assert!(refreshed.json["access"].is_string());
    assert_eq!(server.post("/token/refresh/").json(json!({"refresh": access})).go().await.status, 401);
    assert_eq!(server.get("/customer/profile/").bearer(refresh).go().await.status, 401, "refresh is not access");
    let profile = server.get("/customer/profile").bearer(access).go().await;
    assert_eq!(profile.status, 200);
    assert_eq!(profile.json["phone_number"], "9841234567");
    assert_eq!(profile.json["role"], "CUSTOMER");
    assert_eq!(server.get("/pharmacy/profile/").bearer(access).go().await.status, 403);
    assert_eq!(server.get("/customer/profile/").go().await.status, 401);

    let (_, pharmacy) = pharmacy(&server, "ph@example.com", 27.7, 85.3).await;
    let profile = server.get("/pharmacy/profile/").bearer(&pharmacy).go().await;
    assert_eq!(profile.json["pharmacy"]["approved"], json!(true));
    assert_eq!(profile.json["pharmacy"]["lat"], json!(27.7));
}

#[tokio::test]
async fn login_lockout_after_ten_failures() {
    let server = Server::start().await;
    customer(&server, "lock@example.com").await;
    for _ in 0..10 {
        let r = server.post("/login").json(json!({"email": "lock@example.com", "password": "wrong-pass"})).go().await;
        assert_eq!(r.status, 401);
    }
    let r = server.post("/login").json(json!({"email": "lock@example.com", "password": "password-123"})).go().await;
    assert_eq!(r.status, 429, "even the right password");
    let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!(retry > 800 && retry <= 900, "{retry}");
}

/// A token signed the original's way (`user_id`, `token_type`, no role) is accepted.
#[tokio::test]
async fn original_token_shape_is_accepted() {
    #[derive(serde::Serialize)]
    struct Original {
        token_type: &'static str,
        exp: u64,
        iat: u64,
        jti: &'static str,
        user_id: i64,
    }
    let server = Server::start().await;
    let (user_id, _) = customer(&server, "old@example.com").await;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &Original { token_type: "access", exp: now + 300, iat: now, jti: "0123abcd", user_id },
        &jsonwebtoken::EncodingKey::from_secret(b"end-to-end-test-secret-0123456789abcdef"),
    )
    .unwrap();
    let profile = server.get("/customer/profile/").bearer(&token).go().await;
    assert_eq!(profile.status, 200, "{:?}", profile.json);
    let mut ws = server.ws(&format!("/ws/customer/?token={token}")).await;
    assert_eq!(ws.json().await["type"], "connection");
    let forged = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &Original { token_type: "access", exp: now + 300, iat: now, jti: "x", user_id },
        &jsonwebtoken::EncodingKey::from_secret(b"some other secret entirely!!!!!!!!!"),
    )
    .unwrap();
    assert_eq!(server.get("/customer/profile/").bearer(&forged).go().await.status, 401);
}
