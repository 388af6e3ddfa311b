//! `GET /metrics`: scraped before and after a request is created and accepted, the counters must
//! have moved by exactly what happened in between (no more, no less), histograms must be
//! well-formed (cumulative buckets ending with `+Inf` equal to `_count`), `/admin/stats` must show
//! the same counts, and `--metrics-token` must be enforced.

use crate::harness::*;
use fastwebsockets::Frame;
use serde_json::json;
use std::collections::HashMap;
use std::time::Duration;

const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// One scrape, parsed: every `name{labels} value` line, and each family's TYPE.
#[derive(Debug)]
struct Metrics {
    samples: Vec<Sample>,
    kinds: HashMap<String, String>,
}

/// A series' labels, in order: `(name, value)`.
type Labels = Vec<(String, String)>;

#[derive(Debug)]
struct Sample {
    name: String,
    labels: Labels,
    value: f64,
}

impl Metrics {
    /// Parses the text exposition format, checking that every sample belongs to a family that
    /// was announced with HELP and TYPE.
    fn parse(text: &str) -> Metrics {
        let (mut samples, mut kinds, mut helped) = (Vec::new(), HashMap::new(), Vec::new());
        for line in text.lines().filter(|l| !l.is_empty()) {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                helped.push(rest.split(' ').next().unwrap().to_string());
                continue;
            }
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap();
                assert!(helped.iter().any(|h| h == name), "TYPE without HELP: {line}");
                kinds.insert(name.to_string(), kind.to_string());
                continue;
            }
            assert!(!line.starts_with('#'), "unexpected comment: {line}");
            let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("no value: {line}"));
            let value: f64 = value.parse().unwrap_or_else(|_| panic!("bad value: {line}"));
            let (name, labels) = match series.split_once('{') {
                None => (series.to_string(), Vec::new()),
                Some((name, rest)) => (name.to_string(), parse_labels(rest.strip_suffix('}').expect("closing brace"))),
            };
            assert!(name.starts_with("sanjevani_"), "unprefixed: {line}");
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| {
                    name.strip_suffix(suffix).filter(|base| kinds.get(*base).is_some_and(|k| k == "histogram"))
                })
                .unwrap_or(&name);
            assert!(kinds.contains_key(family), "sample before its TYPE: {line}");
            samples.push(Sample { name, labels, value });
        }
        Metrics { samples, kinds }
    }

    /// The value of the series `name{labels}` (`labels` as written: `route="/x/"`); panics if
    /// the scrape does not have it.
    fn get(&self, name: &str, labels: &str) -> f64 {
        let want = parse_labels(labels);
        self.samples
            .iter()
            .find(|s| s.name == name && s.labels == want)
            .unwrap_or_else(|| panic!("no series {name}{{{labels}}}"))
            .value
    }

    /// Every histogram: buckets cumulative, `le` ascending, the last `+Inf` and equal to
    /// `_count`. Returns how many histogram series were checked.
    fn check_histograms(&self) -> usize {
        let mut checked = 0;
        for (family, _) in self.kinds.iter().filter(|(_, kind)| *kind == "histogram") {
            let bucket_name = format!("{family}_bucket");
            let mut series: Vec<(Labels, Vec<(f64, f64)>)> = Vec::new();
            for s in self.samples.iter().filter(|s| s.name == bucket_name) {
                let (le, rest): (Vec<_>, Vec<_>) = s.labels.iter().cloned().partition(|(k, _)| k == "le");
                let le = match le[0].1.as_str() {
                    "+Inf" => f64::INFINITY,
                    v => v.parse().unwrap(),
                };
                match series.iter_mut().find(|(labels, _)| *labels == rest) {
                    Some((_, buckets)) => buckets.push((le, s.value)),
                    None => series.push((rest, vec![(le, s.value)])),
                }
            }
            assert!(!series.is_empty(), "{family} has no buckets");
            for (labels, buckets) in &series {
                for pair in buckets.windows(2) {
                    assert!(pair[0].0 < pair[1].0, "{family}{labels:?}: le not ascending: {buckets:?}");
                    assert!(pair[0].1 <= pair[1].1, "{family}{labels:?}: buckets not cumulative: {buckets:?}");
                }
                let (last_le, last) = *buckets.last().unwrap();
                assert_eq!(last_le, f64::INFINITY, "{family}{labels:?}: the last bucket must be +Inf");
                let count = self
                    .samples
                    .iter()
                    .find(|s| s.name == format!("{family}_count") && s.labels == *labels)
                    .unwrap_or_else(|| panic!("{family}{labels:?}: no _count"));
                assert_eq!(last, count.value, "{family}{labels:?}: +Inf bucket != _count");
                assert!(
                    self.samples.iter().any(|s| s.name == format!("{family}_sum") && s.labels == *labels),
                    "{family}{labels:?}: no _sum"
                );
                checked += 1;
            }
        }
        checked
    }
}

/// `a="x",b="y"` → pairs, with `\"`, `\\` and `\n` unescaped.
fn parse_labels(text: &str) -> Labels {
    let mut labels = Vec::new();
    let mut chars = text.chars().peekable();
    while chars.peek().is_some() {
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        assert_eq!(chars.next(), Some('"'), "label {key} must be quoted in {text}");
        let mut value = String::new();
        loop {
            match chars.next().unwrap_or_else(|| panic!("unterminated label in {text}")) {
                '"' => break,
                '\\' => match chars.next() {
                    Some('n') => value.push('\n'),
                    Some(c) => value.push(c),
                    None => panic!("dangling escape in {text}"),
                },
                c => value.push(c),
            }
        }
        labels.push((key.trim_start_matches(',').to_string(), value));
        if chars.peek() == Some(&',') {
            chars.next();
        }
    }
    labels
}

async fn scrape(server: &Server) -> Metrics {
    let reply = server.get("/metrics").go().await;
    assert_eq!(reply.status, 200, "{:?}", reply.bytes);
    assert_eq!(reply.header("content-type"), Some(CONTENT_TYPE));
    Metrics::parse(std::str::from_utf8(&reply.bytes).expect("UTF-8"))
}

/// Scrapes until `done` holds (counters a socket's writer bumps after the client already saw
/// the frame), for at most 5 s.
async fn scrape_until(server: &Server, done: impl Fn(&Metrics) -> bool) -> Metrics {
    for _ in 0..250 {
        let metrics = scrape(server).await;
        if done(&metrics) {
            return metrics;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("metrics did not reach the expected values within 5 s: {:?}", scrape(server).await.samples);
}

/// The counter families and /admin/stats keys that must agree.
const REQUEST_EVENTS: [&str; 7] = ["created", "notified", "delivered", "accepted", "rejected", "cancelled", "expired"];

fn request_count(m: &Metrics, event: &str) -> f64 {
    m.get(&format!("sanjevani_requests_{event}_total"), "")
}

/// On the demo data a 3 km request reaches A and B. A and C have live sockets (C is out of
/// range), B has none and accepts over HTTP: so notified +2 but delivered +3 (new_request to A,
/// request_taken to A, pharmacy_response to the customer), and nothing to C.
#[tokio::test]
async fn counters_move_by_exactly_what_happened() {
    let server = Server::start_with(|c| c.demo = true).await;
    let customer = login(&server, "customer@demo.sanjevani.test", "demo-customer-1").await;
    let a = login(&server, "pharmacy.a@demo.sanjevani.test", "demo-pharmacy-a").await;
    let b = login(&server, "pharmacy.b@demo.sanjevani.test", "demo-pharmacy-b").await;
    let c = login(&server, "pharmacy.c@demo.sanjevani.test", "demo-pharmacy-c").await;
    let admin = login(&server, "admin@demo.sanjevani.test", "demo-admin-1").await;

    let start = scrape(&server).await;
    assert_eq!(start.get("sanjevani_ready", ""), 1.0);
    let mut ws_a = server.ws(&format!("/ws/pharmacy/?token={a}")).await;
    let mut ws_c = server.ws(&format!("/ws/pharmacy/?token={c}")).await;
    let mut ws_customer = server.ws(&format!("/ws/customer/?token={customer}")).await;
    ws_a.json_of("sync").await;
    ws_c.json_of("sync").await;
    ws_customer.json_of("sync").await;

    let before = scrape(&server).await;
    assert_eq!(before.get("sanjevani_ws_connects_total", "") - start.get("sanjevani_ws_connects_total", ""), 3.0);
    assert_eq!(before.get("sanjevani_ws_sockets", r#"role="pharmacy""#), 2.0);
    assert_eq!(before.get("sanjevani_ws_sockets", r#"role="customer""#), 1.0);
    let sent = |m: &Metrics| m.get("sanjevani_ws_messages_sent_total", "");
    assert_eq!(sent(&before) - sent(&start), 6.0, "connection and sync to each of the three sockets");
    let metrics_count = r#"route="/metrics""#;
    assert_eq!(
        before.get("sanjevani_http_request_duration_seconds_count", metrics_count)
            - start.get("sanjevani_http_request_duration_seconds_count", metrics_count),
        1.0,
        "the scrape in between is counted under its route pattern"
    );

    let created = server
        .post("/medicine/request/")
        .bearer(&customer)
        .json(json!({"patient_lat": 27.7172, "patient_lng": 85.3240, "radius_km": 3, "quantity": 1}))
        .go()
        .await;
    assert_eq!((created.status, created.json["pharmacies_notified"].as_i64()), (201, Some(2)), "{:?}", created.json);
    let id = created.json["request_id"].as_i64().unwrap();
    assert_eq!(ws_a.json().await["type"], "new_request");
    let pending = scrape(&server).await;
    assert_eq!(pending.get("sanjevani_requests_pending", ""), before.get("sanjevani_requests_pending", "") + 1.0);

    let accepted = server
        .post("/medicine/response/")
        .bearer(&b)
        .json(json!({"request_id": id, "response_type": "ACCEPTED"}))
        .go()
        .await;
    assert_eq!(accepted.status, 201, "{:?}", accepted.json);
    assert_eq!(ws_a.json().await["type"], "request_taken");
    assert_eq!(ws_customer.json().await["type"], "pharmacy_response");
    ws_c.silent_for(Duration::from_millis(100)).await;

    let delivered_before = request_count(&before, "delivered");
    let after = scrape_until(&server, |m| request_count(m, "delivered") >= delivered_before + 3.0).await;
    let moved = |event: &str| request_count(&after, event) - request_count(&before, event);
    assert_eq!(moved("created"), 1.0);
    assert_eq!(moved("notified"), 2.0, "recipients at creation: A and B");
    assert_eq!(moved("delivered"), 3.0, "new_request and request_taken to A, pharmacy_response to the customer");
    assert_eq!(moved("accepted"), 1.0);
    assert_eq!(sent(&after) - sent(&before), 3.0, "the same three, counted among all text messages");
    for event in ["rejected", "cancelled", "expired"] {
        assert_eq!(moved(event), 0.0, "{event}");
    }
    assert_eq!(after.get("sanjevani_requests_pending", ""), before.get("sanjevani_requests_pending", ""));
    assert_eq!(after.get("sanjevani_ws_connects_total", ""), before.get("sanjevani_ws_connects_total", ""));
    assert_eq!(after.get("sanjevani_ws_slow_consumer_cuts_total", ""), 0.0);

    let histogram_moved = |name: &str, labels: &str| after.get(name, labels) - before.get(name, labels);
    let http = "sanjevani_http_request_duration_seconds_count";
    assert_eq!(histogram_moved(http, r#"route="/medicine/request/""#), 1.0);
    assert_eq!(histogram_moved(http, r#"route="/medicine/response/""#), 1.0);
    assert_eq!(histogram_moved(http, r#"route="/medicine/request/{id}/""#), 0.0);
    assert!(histogram_moved(http, metrics_count) >= 2.0, "`before` and `pending` at least");
    assert_eq!(histogram_moved("sanjevani_request_fanout_seconds_count", ""), 1.0);
    assert!(histogram_moved("sanjevani_request_fanout_seconds_sum", "") > 0.0);
    assert!(histogram_moved("sanjevani_store_batch_size_count", "") >= 2.0, "the create and the accept committed");
    assert!(histogram_moved("sanjevani_store_batch_size_sum", "") >= 2.0);
    assert!(histogram_moved("sanjevani_store_commit_seconds_count", "") >= 2.0);

    // A detail request is labelled by its pattern, never by the id.
    let detail = server.get(&format!("/medicine/request/{id}/")).bearer(&customer).go().await;
    assert_eq!(detail.status, 200);
    let unknown = server.get("/no/such/thing").go().await;
    assert_eq!(unknown.status, 404);
    let later = scrape(&server).await;
    assert_eq!(
        later.get(http, r#"route="/medicine/request/{id}/""#) - after.get(http, r#"route="/medicine/request/{id}/""#),
        1.0
    );
    assert_eq!(later.get(http, r#"route="other""#) - after.get(http, r#"route="other""#), 1.0);
    let raw = later
        .samples
        .iter()
        .flat_map(|s| &s.labels)
        .find(|(k, v)| k == "route" && v.contains(|c: char| c.is_ascii_digit()));
    assert_eq!(raw, None, "routes are patterns, never raw paths");
    assert!(later.check_histograms() > 20, "per-route HTTP, fan-out, store batch size and commit time");

    // /admin/stats shows the same counts.
    let stats = server.get("/admin/stats").bearer(&admin).go().await;
    assert_eq!(stats.status, 200);
    for event in REQUEST_EVENTS {
        assert_eq!(stats.json["requests"][event].as_f64(), Some(request_count(&later, event)), "{event}");
    }
    assert_eq!(stats.json["requests"]["pending"].as_f64(), Some(later.get("sanjevani_requests_pending", "")));
    assert_eq!(
        stats.json["sockets"]["pharmacy"].as_f64(),
        Some(later.get("sanjevani_ws_sockets", r#"role="pharmacy""#))
    );
    assert_eq!(stats.json["slow_consumer_cuts"].as_f64(), Some(later.get("sanjevani_ws_slow_consumer_cuts_total", "")));

    // Disconnects by close code: the customer closes with 1000, a bad token is refused with 4001.
    let disconnects = "sanjevani_ws_disconnects_total";
    let (client_1000, server_4001) = (r#"code="1000",by="client""#, r#"code="4001",by="server""#);
    ws_customer.send_frame(Frame::close(1000, b"bye")).await;
    assert_eq!(ws_customer.close_code().await, 1000);
    let mut refused = server.ws("/ws/customer/?token=not-a-token").await;
    assert_eq!(refused.close_code().await, 4001);
    let closed = scrape_until(&server, |m| {
        m.get(disconnects, client_1000) > later.get(disconnects, client_1000)
            && m.get(disconnects, server_4001) > later.get(disconnects, server_4001)
    })
    .await;
    assert_eq!(closed.get(disconnects, client_1000) - later.get(disconnects, client_1000), 1.0);
    assert_eq!(closed.get(disconnects, server_4001) - later.get(disconnects, server_4001), 1.0);
    assert_eq!(closed.get("sanjevani_ws_sockets", r#"role="customer""#), 0.0);
    assert_eq!(
        closed.get("sanjevani_ws_connects_total", ""),
        later.get("sanjevani_ws_connects_total", ""),
        "a refused token is not a connect"
    );
}

#[tokio::test]
async fn a_metrics_token_is_required_when_set() {
    let server = Server::start_with(|c| c.metrics_token = Some("m3trics-s3cret".into())).await;
    let missing = server.get("/metrics").go().await;
    assert_eq!(missing.status, 401);
    assert!(missing.json["error"].is_string(), "a JSON error: {:?}", missing.bytes);
    assert_eq!(missing.header("content-type"), Some("application/json"));
    for wrong in ["Bearer m3trics-s3cre", "Bearer m3trics-s3cret2", "Bearer ", "Basic m3trics-s3cret", "m3trics-s3cret"]
    {
        let reply = server.get("/metrics").header("authorization", wrong).go().await;
        assert_eq!(reply.status, 401, "{wrong}");
        assert!(reply.json["error"].is_string());
    }
    let right = server.get("/metrics").bearer("m3trics-s3cret").go().await;
    assert_eq!(right.status, 200);
    assert_eq!(right.header("content-type"), Some(CONTENT_TYPE));
    let metrics = Metrics::parse(std::str::from_utf8(&right.bytes).unwrap());
    assert_eq!(metrics.get("sanjevani_ready", ""), 1.0);
    assert!(metrics.check_histograms() > 0);
}

#[tokio::test]
async fn without_a_token_metrics_are_open_and_hold_no_personal_data() {
    let server = Server::start().await;
    let (_, customer) = customer(&server, "private.person@example.com").await;
    let reply = server
        .post("/medicine/request/")
        .bearer(&customer)
        .json(json!({"patient_lat": 27.7172, "patient_lng": 85.3240, "radius_km": 3, "quantity": 1, "medicine_name": "Secretol"}))
        .go()
        .await;
    assert_eq!(reply.status, 201);
    let text = server.get("/metrics").go().await;
    assert_eq!(text.status, 200);
    let body = std::str::from_utf8(&text.bytes).unwrap();
    for private in ["private.person", "example.com", "John Doe", "Secretol", "27.71", "9841234567"] {
        assert!(!body.contains(private), "{private} leaked into /metrics");
    }
    assert_eq!(Metrics::parse(body).get("sanjevani_requests_created_total", ""), 1.0);
}
