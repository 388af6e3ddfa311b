//! The request lifecycle driven end to end inside the engine: real hub queues, the real index,
//! and both stores (SQLite on a temp file, and in memory). Covers API.md's event × recipient
//! table, the response rules, the accept race, replay + sync, expiry and restart recovery.

use bytes::Bytes;
use sanjevani_engine::geo::{LatLng, RadiusKm};
use sanjevani_engine::hub::{Audience, Fanout, Hub, MemoryBus, Subscription};
use sanjevani_engine::index::PharmacyIndex;
use sanjevani_engine::lifecycle::{Lifecycle, LifecycleConfig, RequestInput, ResponseInput};
use sanjevani_engine::message::PlainMediaUrls;
use sanjevani_engine::model::*;
use sanjevani_engine::store::{MemoryStore, SqliteStore, Store, StoreOptions};
use sanjevani_engine::{Error, accounts};
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;

const BASE: &str = "http://127.0.0.1:8000";

/// The demo's four approved pharmacies around the seed's patient, plus one customer.
struct World {
    store: Arc<dyn Store>,
    hub: Arc<Hub>,
    index: Arc<PharmacyIndex>,
    lifecycle: Lifecycle,
    customer: User,
    pharmacies: Vec<Pharmacy>,
    _dir: Option<tempfile::TempDir>,
}

fn patient() -> LatLng {
    LatLng::new(27.7172, 85.3240).unwrap()
}

fn new_user(email: &str, role: Role) -> NewUser {
    NewUser {
        email: email.into(),
        password_hash: "$argon2id$not-used-here".into(),
        name: format!("Name of {email}"),
        phone_number: "9841000000".into(),
        role,
        email_verified: true,
        created_at: 0,
    }
}

enum Kind {
    Memory,
    Sqlite,
}

async fn world(kind: Kind, ttl: Duration) -> World {
    let (store, dir): (Arc<dyn Store>, _) = match kind {
        Kind::Memory => (Arc::new(MemoryStore::new()), None),
        Kind::Sqlite => {
            let dir = tempfile::tempdir().unwrap();
            let store = SqliteStore::open(&dir.path().join("test.db"), StoreOptions::default()).unwrap();
            (Arc::new(store), Some(dir))
        }
    };
    world_on(store, dir, ttl, None).await
}

async fn world_on(
    store: Arc<dyn Store>,
    dir: Option<tempfile::TempDir>,
    ttl: Duration,
    fanout: Option<Arc<dyn Fanout>>,
) -> World {
    let customer = match store.user_by_email("customer@test").await.unwrap() {
        Some(user) => user,
        None => store.insert_user(new_user("customer@test", Role::Customer)).await.unwrap(),
    };
    let spots = [(27.722287, 85.329747), (27.703209, 85.339802), (27.690488, 85.293837), (27.812546, 85.216154)];
    let mut pharmacies = Vec::new();
    for (i, (lat, lng)) in spots.into_iter().enumerate() {
        let email = format!("pharmacy{i}@test");
        let pharmacy = match store.user_by_email(&email).await.unwrap() {
            Some(user) => store.pharmacy_by_user(user.id).await.unwrap().unwrap(),
            None => {
                let new = NewPharmacy {
                    name: format!("Pharmacy {i}"),
                    location: LatLng::new(lat, lng).unwrap(),
                    approved: true,
                };
                store.insert_pharmacy_user(new_user(&email, Role::Pharmacy), new).await.unwrap().1
            }
        };
        pharmacies.push(pharmacy);
    }
    let index = Arc::new(PharmacyIndex::bulk_load(pharmacies.iter().map(accounts::card).collect()));
    let hub = Hub::new(64);
    let fanout = fanout.unwrap_or_else(|| hub.clone());
    let config = LifecycleConfig { request_ttl: ttl };
    let lifecycle =
        Lifecycle::start(store.clone(), fanout, index.clone(), Arc::new(PlainMediaUrls), config).await.unwrap();
    World { store, hub, index, lifecycle, customer, pharmacies, _dir: dir }
}

fn input(radius_km: f64) -> RequestInput {
    RequestInput {
        location: patient(),
        radius: RadiusKm::new(radius_km).unwrap(),
        quantity: 10,
        medicine_name: Some("Amoxicillin".into()),
        note: None,
        image: None,
        idempotency_key: None,
    }
}

fn answer(request_id: RequestId, response_type: ResponseType) -> ResponseInput {
    ResponseInput { request_id, response_type, text_message: Some("In stock".into()), audio: None }
}

/// Everything queued on a subscription right now, as JSON.
fn drain(sub: &Subscription) -> Vec<Value> {
    let mut batch = Vec::new();
    sub.try_recv(&mut batch);
    batch.iter().map(|m| serde_json::from_slice(&m.to_vec()).unwrap()).collect()
}

fn types(msgs: &[Value]) -> Vec<&str> {
    msgs.iter().map(|m| m["type"].as_str().unwrap()).collect()
}

fn parse(frames: &[Bytes]) -> Vec<Value> {
    frames.iter().map(|f| serde_json::from_slice(f).unwrap()).collect()
}

async fn event_table(kind: Kind) {
    let w = world(kind, Duration::from_secs(600)).await;
    let customer_a = w.hub.subscribe(Audience::Customer(w.customer.id));
    let customer_b = w.hub.subscribe(Audience::Customer(w.customer.id));
    let subs: Vec<Subscription> = w.pharmacies.iter().map(|p| w.hub.subscribe(Audience::Pharmacy(p.id))).collect();
    let [a, b, c, d] = [&w.pharmacies[0], &w.pharmacies[1], &w.pharmacies[2], &w.pharmacies[3]];

    // created: new_request to the notified pharmacies only (10 km: A, B, C), with distances.
    let created = w.lifecycle.create(&w.customer, input(10.0), BASE).await.unwrap();
    assert_eq!(created.pharmacies_notified, 3);
    assert!(!created.repeated);
    let id = created.request.id;
    assert!(drain(&customer_a).is_empty());
    let got: Vec<Vec<Value>> = subs.iter().map(drain).collect();
    assert_eq!(got[0].len(), 1);
    assert_eq!(got[0][0]["type"], "new_request");
    assert_eq!(got[0][0]["distance_km"], json!(0.8));
    assert_eq!(got[1][0]["distance_km"], json!(2.2));
    assert_eq!(got[2][0]["distance_km"], json!(4.2));
    assert_eq!(got[2][0]["request_id"], json!(id));
    assert!(got[2][0].get("replay").is_none());
    assert!(got[3].is_empty(), "D is 15 km away");

    // REJECTED by C: pharmacy_response to the customer (both devices), nothing to pharmacies.
    w.lifecycle.respond(c, answer(id, ResponseType::Rejected), BASE).await.unwrap();
    for dev in [&customer_a, &customer_b] {
        let msgs = drain(dev);
        assert_eq!(types(&msgs), ["pharmacy_response"]);
        assert_eq!(msgs[0]["response_type"], "REJECTED");
        assert_eq!(msgs[0]["pharmacy_id"], json!(c.id));
        assert_eq!(msgs[0]["distance_km"], json!(4.2));
    }
    assert!(subs.iter().all(|s| drain(s).is_empty()));

    // ACCEPTED by B: customer told; A and the rejecter C get request_taken; B and D nothing.
    let won = w.lifecycle.respond(b, answer(id, ResponseType::Accepted), BASE).await.unwrap();
    assert!(!won.repeated);
    assert_eq!(types(&drain(&customer_a)), ["pharmacy_response"]);
    assert_eq!(types(&drain(&customer_b)), ["pharmacy_response"]);
    assert_eq!(types(&drain(&subs[0])), ["request_taken"]);
    assert!(drain(&subs[1]).is_empty());
    assert_eq!(types(&drain(&subs[2])), ["request_taken"]);
    assert!(drain(&subs[3]).is_empty());

    // Late responses: 400 with the seed's sentence, for ACCEPTED and REJECTED alike.
    for t in [ResponseType::Accepted, ResponseType::Rejected] {
        let err = w.lifecycle.respond(a, answer(id, t), BASE).await.unwrap_err();
        assert_eq!(err, Error::invalid(sanjevani_engine::error::ALREADY_ASSIGNED));
    }
    // The winner's and the rejecter's retries get their original 201 back and send nothing.
    let again = w.lifecycle.respond(b, answer(id, ResponseType::Accepted), BASE).await.unwrap();
    assert!(again.repeated);
    assert_eq!(again.response, won.response);
    let again = w.lifecycle.respond(c, answer(id, ResponseType::Rejected), BASE).await.unwrap();
    assert!(again.repeated);
    // The other answer after one's own → 409.
    assert_eq!(w.lifecycle.respond(c, answer(id, ResponseType::Accepted), BASE).await.unwrap_err().status(), 409);
    // Not notified → 404.
    assert_eq!(w.lifecycle.respond(d, answer(id, ResponseType::Accepted), BASE).await.unwrap_err().status(), 404);
    assert!(drain(&customer_a).is_empty());
    assert!(subs.iter().all(|s| drain(s).is_empty()));

    // cancelled: customer and the notified pharmacies that have not answered.
    let req2 = w.lifecycle.create(&w.customer, input(20.0), BASE).await.unwrap().request.id;
    for s in &subs {
        assert_eq!(types(&drain(s)), ["new_request"]);
    }
    w.lifecycle.respond(a, answer(req2, ResponseType::Rejected), BASE).await.unwrap();
    drain(&customer_a);
    drain(&customer_b);
    let cancelled = w.lifecycle.cancel(w.customer.id, req2).await.unwrap();
    assert_eq!(cancelled.status, RequestStatus::Cancelled);
    assert_eq!(types(&drain(&customer_a)), ["request_cancelled"]);
    assert!(drain(&subs[0]).is_empty(), "A answered");
    for s in &subs[1..] {
        assert_eq!(drain(s), vec![json!({"type": "request_cancelled", "request_id": req2})]);
    }
    let err = w.lifecycle.cancel(w.customer.id, req2).await.unwrap_err();
    assert_eq!(err.status(), 400);
    assert!(err.to_string().contains("CANCELLED"), "{err}");
    let err = w.lifecycle.respond(b, answer(req2, ResponseType::Accepted), BASE).await.unwrap_err();
    assert_eq!(err.status(), 400);
    assert_eq!(w.lifecycle.cancel(w.customer.id + 1000, id).await.unwrap_err().status(), 404);

    // The detail carries responses (oldest first) and the notified list (nearest first).
    let detail = w.lifecycle.detail(w.customer.id, id).await.unwrap();
    assert_eq!(detail.request.status, RequestStatus::Accepted);
    assert_eq!(detail.request.pharmacy_id, Some(b.id));
    assert_eq!(detail.responses.iter().map(|r| r.pharmacy_id).collect::<Vec<_>>(), vec![c.id, b.id]);
    assert_eq!(detail.notified.iter().map(|r| r.pharmacy_id).collect::<Vec<_>>(), vec![a.id, b.id, c.id]);
    assert_eq!(w.lifecycle.detail(w.customer.id + 1, id).await.unwrap_err().status(), 404);
    let list = w.lifecycle.list(w.customer.id).await.unwrap();
    assert_eq!(list.iter().map(|r| r.id).collect::<Vec<_>>(), vec![req2, id]);
    let stats = w.lifecycle.stats();
    use std::sync::atomic::Ordering::Relaxed;
    assert_eq!((stats.created.load(Relaxed), stats.notified.load(Relaxed)), (2, 7));
    assert_eq!((stats.accepted.load(Relaxed), stats.rejected.load(Relaxed), stats.cancelled.load(Relaxed)), (1, 2, 1));
    assert_eq!(stats.pending.load(Relaxed), 0);
}

#[tokio::test]
async fn event_table_memory() {
    event_table(Kind::Memory).await;
}

#[tokio::test]
async fn event_table_sqlite() {
    event_table(Kind::Sqlite).await;
}

async fn validation(kind: Kind) {
    let w = world(kind, Duration::from_secs(600)).await;
    let mut bad = input(5.0);
    bad.quantity = 0;
    assert_eq!(w.lifecycle.create(&w.customer, bad, BASE).await.unwrap_err().field_name(), Some("quantity"));
    let mut bad = input(5.0);
    bad.medicine_name = Some("x".repeat(201));
    assert_eq!(w.lifecycle.create(&w.customer, bad, BASE).await.unwrap_err().field_name(), Some("medicine_name"));
    let mut bad = input(5.0);
    bad.note = Some("é".repeat(1001));
    assert_eq!(w.lifecycle.create(&w.customer, bad, BASE).await.unwrap_err().field_name(), Some("note"));
    let mut ok = input(5.0);
    ok.note = Some("é".repeat(1000));
    assert!(w.lifecycle.create(&w.customer, ok, BASE).await.is_ok());
    let mut bad = input(5.0);
    bad.idempotency_key = Some("tab\tkey".into());
    assert_eq!(w.lifecycle.create(&w.customer, bad, BASE).await.unwrap_err().status(), 400);
    let pharmacy_user = w.store.user_by_id(w.pharmacies[0].user_id).await.unwrap().unwrap();
    assert_eq!(w.lifecycle.create(&pharmacy_user, input(5.0), BASE).await.unwrap_err().status(), 403);
    assert_eq!(
        w.lifecycle
            .respond(&w.pharmacies[0], answer(999_999, ResponseType::Accepted), BASE)
            .await
            .unwrap_err()
            .status(),
        404
    );
}

#[tokio::test]
async fn validation_memory() {
    validation(Kind::Memory).await;
}

#[tokio::test]
async fn validation_sqlite() {
    validation(Kind::Sqlite).await;
}

async fn idempotent_create(kind: Kind) {
    let w = world(kind, Duration::from_secs(600)).await;
    let sub = w.hub.subscribe(Audience::Pharmacy(w.pharmacies[0].id));
    let mut first = input(3.0);
    first.idempotency_key = Some("key-1".into());
    let tasks: Vec<_> = (0..10)
        .map(|_| {
            let (lifecycle, customer, input) = (w.lifecycle.clone(), w.customer.clone(), first.clone());
            tokio::spawn(async move { lifecycle.create(&customer, input, BASE).await.unwrap() })
        })
        .collect();
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.unwrap());
    }
    let id = results[0].request.id;
    assert!(results.iter().all(|r| r.request.id == id && r.pharmacies_notified == 2));
    assert_eq!(results.iter().filter(|r| !r.repeated).count(), 1);
    assert_eq!(types(&drain(&sub)), ["new_request"], "one broadcast for one key");
    let mut other = input(3.0);
    other.idempotency_key = Some("key-2".into());
    assert_ne!(w.lifecycle.create(&w.customer, other, BASE).await.unwrap().request.id, id);
}

#[tokio::test]
async fn idempotent_create_memory() {
    idempotent_create(Kind::Memory).await;
}

#[tokio::test]
async fn idempotent_create_sqlite() {
    idempotent_create(Kind::Sqlite).await;
}

/// 1,000 rounds of 20 concurrent accepts on fresh requests: exactly one winner each, every
/// other caller gets "already assigned", and the store agrees.
async fn accept_race(kind: Kind) {
    let w = world(kind, Duration::from_secs(600)).await;
    let center = LatLng::new(10.0, 10.0).unwrap();
    let mut racers = Vec::new();
    for i in 0..20 {
        let new = NewPharmacy {
            name: format!("Racer {i}"),
            location: LatLng::new(10.0 + i as f64 * 1e-4, 10.0).unwrap(),
            approved: true,
        };
        let (_, p) =
            w.store.insert_pharmacy_user(new_user(&format!("racer{i}@test"), Role::Pharmacy), new).await.unwrap();
        w.index.upsert(accounts::card(&p));
        racers.push(p);
    }
    for _round in 0..1000 {
        let mut req = input(5.0);
        req.location = center;
        let created = w.lifecycle.create(&w.customer, req, BASE).await.unwrap();
        assert_eq!(created.pharmacies_notified, 20);
        let id = created.request.id;
        let tasks: Vec<_> = racers
            .iter()
            .cloned()
            .map(|p| {
                let lifecycle = w.lifecycle.clone();
                tokio::spawn(
                    async move { (p.id, lifecycle.respond(&p, answer(id, ResponseType::Accepted), BASE).await) },
                )
            })
            .collect();
        let mut winners = Vec::new();
        for t in tasks {
            match t.await.unwrap() {
                (pid, Ok(r)) => {
                    assert!(!r.repeated);
                    winners.push(pid);
                }
                (_, Err(e)) => assert_eq!(e, Error::invalid(sanjevani_engine::error::ALREADY_ASSIGNED)),
            }
        }
        assert_eq!(winners.len(), 1, "round for request {id}");
        let stored = w.store.request(id).await.unwrap().unwrap();
        assert_eq!(stored.status, RequestStatus::Accepted);
        assert_eq!(stored.pharmacy_id, Some(winners[0]));
        let responses = w.store.responses(id).await.unwrap();
        assert_eq!(responses.len(), 1);
        assert_eq!(responses[0].pharmacy_id, winners[0]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn accept_race_memory() {
    accept_race(Kind::Memory).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn accept_race_sqlite() {
    accept_race(Kind::Sqlite).await;
}

async fn replay_and_sync(kind: Kind) {
    let w = world(kind, Duration::from_secs(600)).await;
    let [a, b] = [&w.pharmacies[0], &w.pharmacies[1]];
    let r1 = w.lifecycle.create(&w.customer, input(3.0), BASE).await.unwrap().request.id;
    let r2 = w.lifecycle.create(&w.customer, input(3.0), BASE).await.unwrap().request.id;
    let r3 = w.lifecycle.create(&w.customer, input(3.0), BASE).await.unwrap().request.id;
    w.lifecycle.respond(a, answer(r1, ResponseType::Rejected), BASE).await.unwrap();
    w.lifecycle.respond(b, answer(r2, ResponseType::Accepted), BASE).await.unwrap();

    // A answered r1 and r2 is taken: only r3 is replayed, then sync names it.
    let msgs = parse(&w.lifecycle.replay(Audience::Pharmacy(a.id), BASE));
    assert_eq!(types(&msgs), ["new_request", "sync"]);
    assert_eq!(msgs[0]["request_id"], json!(r3));
    assert_eq!(msgs[0]["replay"], json!(true));
    assert_eq!(msgs[0]["distance_km"], json!(0.8));
    assert_eq!(msgs[1], json!({"type": "sync", "pending": [r3]}));
    // B sees r1 (it did not answer) and r3, nearest first by request age doesn't matter: same distance.
    let msgs = parse(&w.lifecycle.replay(Audience::Pharmacy(b.id), BASE));
    assert_eq!(msgs.last().unwrap()["pending"].as_array().unwrap().len(), 2);
    assert_eq!(w.lifecycle.pending_for_pharmacy(b.id).len(), 2);
    // The customer gets sync only.
    let msgs = parse(&w.lifecycle.replay(Audience::Customer(w.customer.id), BASE));
    assert_eq!(msgs.len(), 1);
    let mut pending: Vec<i64> = serde_json::from_value(msgs[0]["pending"].clone()).unwrap();
    pending.sort();
    assert_eq!(pending, vec![r1, r3]);
    assert_eq!(msgs[0]["closed"], json!([{"request_id": r2, "status": "ACCEPTED"}]));
}

#[tokio::test]
async fn replay_and_sync_memory() {
    replay_and_sync(Kind::Memory).await;
}

#[tokio::test]
async fn replay_and_sync_sqlite() {
    replay_and_sync(Kind::Sqlite).await;
}

async fn expiry(kind: Kind) {
    let w = world(kind, Duration::from_millis(600)).await;
    let customer = w.hub.subscribe(Audience::Customer(w.customer.id));
    let subs: Vec<Subscription> = w.pharmacies.iter().map(|p| w.hub.subscribe(Audience::Pharmacy(p.id))).collect();
    let id = w.lifecycle.create(&w.customer, input(3.0), BASE).await.unwrap().request.id;
    w.lifecycle.respond(&w.pharmacies[1], answer(id, ResponseType::Rejected), BASE).await.unwrap();
    drain(&customer);
    drain(&subs[0]);
    drain(&subs[1]);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(drain(&customer), vec![json!({"type": "request_expired", "request_id": id})]);
    assert_eq!(types(&drain(&subs[0])), ["request_expired"]);
    assert!(drain(&subs[1]).is_empty(), "B answered");
    assert!(drain(&subs[2]).is_empty(), "C was not notified");
    assert_eq!(w.store.request(id).await.unwrap().unwrap().status, RequestStatus::Expired);
    let err = w.lifecycle.respond(&w.pharmacies[0], answer(id, ResponseType::Accepted), BASE).await.unwrap_err();
    assert_eq!(err, Error::invalid("This request has expired"));
    // The customer's sync lists it as closed until a TTL after it closed, then forgets it.
    let sync = parse(&w.lifecycle.replay(Audience::Customer(w.customer.id), BASE));
    assert_eq!(sync[0]["closed"], json!([{"request_id": id, "status": "EXPIRED"}]));
    tokio::time::sleep(Duration::from_millis(900)).await;
    let sync = parse(&w.lifecycle.replay(Audience::Customer(w.customer.id), BASE));
    assert_eq!(sync[0], json!({"type": "sync", "pending": [], "closed": []}));
}

#[tokio::test]
async fn expiry_memory() {
    expiry(Kind::Memory).await;
}

#[tokio::test]
async fn expiry_sqlite() {
    expiry(Kind::Sqlite).await;
}

/// A restart on the same SQLite file: open requests come back (and replay), and one whose TTL
/// passed while the server was down expires at once.
#[tokio::test]
async fn restart_recovers_open_requests() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("restart.db");
    let (short, long) = {
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&path, StoreOptions::default()).unwrap());
        let w = world_on(store.clone(), None, Duration::from_millis(500), None).await;
        let short = w.lifecycle.create(&w.customer, input(3.0), BASE).await.unwrap().request.id;
        let w2 = {
            drop(w);
            world_on(store, None, Duration::from_secs(600), None).await
        };
        let long = w2.lifecycle.create(&w2.customer, input(3.0), BASE).await.unwrap().request.id;
        (short, long)
    };
    tokio::time::sleep(Duration::from_millis(700)).await;
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&path, StoreOptions::default()).unwrap());
    let w = world_on(store, None, Duration::from_secs(600), None).await;
    let customer = w.hub.subscribe(Audience::Customer(w.customer.id));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(w.store.request(short).await.unwrap().unwrap().status, RequestStatus::Expired);
    assert_eq!(drain(&customer), vec![json!({"type": "request_expired", "request_id": short})]);
    let replay = parse(&w.lifecycle.replay(Audience::Pharmacy(w.pharmacies[0].id), BASE));
    assert_eq!(replay.last().unwrap(), &json!({"type": "sync", "pending": [long]}));
    let won = w.lifecycle.respond(&w.pharmacies[0], answer(long, ResponseType::Accepted), BASE).await.unwrap();
    assert_eq!(won.response.request_id, long);
}

/// Two nodes sharing one store and an in-memory bus: a pharmacy connected to node B hears of a
/// request created on node A, and its acceptance on B reaches the customer on A.
#[tokio::test]
async fn two_nodes_share_store_and_bus() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let bus = MemoryBus::new();
    let node_a = world_on(store.clone(), None, Duration::from_secs(600), Some(bus.clone())).await;
    let node_b = world_on(store, None, Duration::from_secs(600), Some(bus.clone())).await;
    bus.join(node_a.hub.clone());
    bus.join(node_b.hub.clone());
    let customer_on_a = node_a.hub.subscribe(Audience::Customer(node_a.customer.id));
    let pharmacy_on_b = node_b.hub.subscribe(Audience::Pharmacy(node_b.pharmacies[0].id));
    let id = node_a.lifecycle.create(&node_a.customer, input(3.0), BASE).await.unwrap().request.id;
    assert_eq!(types(&drain(&pharmacy_on_b)), ["new_request"]);
    // Node B's lifecycle did not see the create; the shared store still decides the accept.
    node_b.lifecycle.respond(&node_b.pharmacies[0], answer(id, ResponseType::Accepted), BASE).await.unwrap();
    assert_eq!(types(&drain(&customer_on_a)), ["pharmacy_response"]);
    let late = node_a.lifecycle.respond(&node_a.pharmacies[1], answer(id, ResponseType::Accepted), BASE).await;
    assert_eq!(late.unwrap_err(), Error::invalid(sanjevani_engine::error::ALREADY_ASSIGNED));
}

/// Polls `work` once, then drops it, as hyper drops the handler of a client that went away.
async fn abandon(work: impl std::future::Future<Output = ()>) {
    let mut work = std::pin::pin!(work);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    let _ = work.as_mut().poll(&mut cx);
}

/// A caller that goes away mid-call (an HTTP client that disconnects drops its handler) does not
/// stop a create, an accept or a cancel between the store's commit and what must follow it.
async fn abandoned_calls_still_finish(kind: Kind) {
    let w = world(kind, Duration::from_secs(600)).await;
    let customer = w.hub.subscribe(Audience::Customer(w.customer.id));
    let subs: Vec<Subscription> = w.pharmacies.iter().map(|p| w.hub.subscribe(Audience::Pharmacy(p.id))).collect();
    let mut create = input(3.0);
    create.idempotency_key = Some("abandoned".into());
    abandon(async {
        w.lifecycle.create(&w.customer, create.clone(), BASE).await.unwrap();
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let got = drain(&subs[0]);
    assert_eq!(types(&got), ["new_request"], "the abandoned create was still broadcast");
    let id = got[0]["request_id"].as_i64().unwrap();
    let again = w.lifecycle.create(&w.customer, create, BASE).await.unwrap();
    assert!(again.repeated && again.request.id == id);

    abandon(async {
        w.lifecycle.respond(&w.pharmacies[0], answer(id, ResponseType::Accepted), BASE).await.unwrap();
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(types(&drain(&subs[1])), ["new_request", "request_taken"], "the abandoned accept was announced");
    assert_eq!(types(&drain(&customer)), ["pharmacy_response"]);
    let taken = w.store.request(id).await.unwrap().unwrap();
    assert_eq!(taken.status, RequestStatus::Accepted);
    assert!(w.lifecycle.pending_for_pharmacy(w.pharmacies[1].id).is_empty(), "memory agrees with the store");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_calls_still_finish_memory() {
    abandoned_calls_still_finish(Kind::Memory).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_calls_still_finish_sqlite() {
    abandoned_calls_still_finish(Kind::Sqlite).await;
}
