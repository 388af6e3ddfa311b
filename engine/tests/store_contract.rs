//! The `Store` contract, run against both implementations: every rule the trait's doc comments
//! state is driven here once and checked on `MemoryStore` and on `SqliteStore` over a real file,
//! so the two cannot drift apart. The SQLite-only part at the end checks group commit itself.

use sanjevani_engine::Error;
use sanjevani_engine::geo::LatLng;
use sanjevani_engine::model::*;
use sanjevani_engine::store::{IDEMPOTENCY_WINDOW_MS, MemoryStore, SqliteStore, Store, StoreOptions};
use std::sync::Arc;
use tempfile::TempDir;

const T0: UnixMs = 1_771_929_000_000;

fn memory_store() -> Arc<dyn Store> {
    Arc::new(MemoryStore::new())
}

fn sqlite_store_with(options: StoreOptions) -> (Arc<SqliteStore>, TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("store.db"), options).unwrap();
    (Arc::new(store), dir)
}

/// Generates one test per contract function and store kind.
macro_rules! contract {
    ($($name:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(super::memory_store()).await;
                }
            )*
        }
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let (store, _dir) = super::sqlite_store_with(Default::default());
                    super::$name(store).await;
                }
            )*
        }
    };
}

contract!(
    users_and_email_conflicts,
    pharmacy_account_is_created_atomically,
    pharmacy_updates_and_approval,
    pharmacy_listing_filters,
    otp_match_consumes_and_verifies,
    otp_wrong_tries_burn_the_code,
    otp_expiry_and_replacement,
    create_request_keeps_recipient_order,
    idempotency_key_binds_for_24_hours,
    responses_are_decided_once,
    cancel_is_for_the_owner_while_pending,
    expire_loses_to_accept,
    customer_requests_newest_first,
    live_requests_for_start_up,
    concurrent_accepts_have_one_winner,
);

// ---- fixtures ----

fn new_user(email: &str, role: Role) -> NewUser {
    NewUser {
        email: email.into(),
        password_hash: "$argon2id$v=19$m=19456,t=2,p=1$test".into(),
        name: format!("Name of {email}"),
        phone_number: "9800000000".into(),
        role,
        email_verified: false,
        created_at: T0,
    }
}

fn at(lat: f64, lng: f64) -> LatLng {
    LatLng::new(lat, lng).unwrap()
}

fn new_pharmacy(name: &str, approved: bool) -> NewPharmacy {
    NewPharmacy { name: name.into(), location: at(27.7, 85.3), approved }
}

fn new_request(customer_id: UserId, created_at: UnixMs, key: Option<&str>) -> NewRequest {
    NewRequest {
        customer_id,
        patient_name: "Patient".into(),
        patient_phone: "9811111111".into(),
        location: at(27.7172, 85.324),
        radius_km: 5.0,
        quantity: 2,
        medicine_name: Some("Paracetamol".into()),
        note: None,
        image: Some("prescriptions/abc.png".into()),
        idempotency_key: key.map(str::to_owned),
        created_at,
        expires_at: created_at + 15 * 60 * 1000,
    }
}

/// Recipients nearest first; ids deliberately not ascending, so that order must be kept, not
/// re-derived from the id.
fn recipients_for(pharmacies: &[(PharmacyId, &str)]) -> Vec<Recipient> {
    pharmacies
        .iter()
        .enumerate()
        .map(|(i, &(id, name))| Recipient {
            pharmacy_id: id,
            pharmacy_name: name.into(),
            location: at(27.7 + i as f64 * 0.001, 85.3),
            distance_km: 0.5 + i as f64,
        })
        .collect()
}

async fn create(store: &Arc<dyn Store>, req: NewRequest, recipients: Vec<Recipient>) -> MedicineRequest {
    match store.create_request(req, recipients).await.unwrap() {
        Created::New(r) => r,
        other => panic!("expected a new request, got {other:?}"),
    }
}

fn response(request_id: RequestId, pharmacy_id: PharmacyId, kind: ResponseType, at_ms: UnixMs) -> NewResponse {
    NewResponse {
        request_id,
        pharmacy_id,
        pharmacy_name: format!("Pharmacy #{pharmacy_id}"),
        response_type: kind,
        text_message: Some(format!("{} at {at_ms}", kind.as_str())),
        audio: None,
        responded_at: at_ms,
    }
}

fn otp(email: &str, hash: &str, created_at: UnixMs) -> OtpRecord {
    OtpRecord {
        email: email.into(),
        code_hash: hash.into(),
        created_at,
        expires_at: created_at + 10 * 60 * 1000,
        attempts: 0,
    }
}

fn is_conflict<T: std::fmt::Debug>(r: sanjevani_engine::Result<T>) -> bool {
    matches!(r, Err(Error::Conflict(_)))
}

fn is_not_found<T: std::fmt::Debug>(r: sanjevani_engine::Result<T>) -> bool {
    matches!(r, Err(Error::NotFound(_)))
}

// ---- accounts ----

async fn users_and_email_conflicts(store: Arc<dyn Store>) {
    let first = store.insert_user(new_user("asha@example.com", Role::Customer)).await.unwrap();
    assert_eq!(first.id, 1, "ids start at 1");
    assert_eq!(first.email, "asha@example.com");
    assert_eq!(first.role, Role::Customer);

    assert!(is_conflict(store.insert_user(new_user("asha@example.com", Role::Admin)).await));
    // The store keeps emails lower-case, so case and spaces do not make a second account.
    assert!(is_conflict(store.insert_user(new_user(" Asha@Example.COM ", Role::Customer)).await));

    let second = store.insert_user(new_user("bina@example.com", Role::Admin)).await.unwrap();
    assert!(second.id > first.id);
    assert_eq!(store.user_by_email("asha@example.com").await.unwrap(), Some(first.clone()));
    assert_eq!(store.user_by_email("ASHA@example.com").await.unwrap(), Some(first.clone()));
    assert_eq!(store.user_by_id(second.id).await.unwrap(), Some(second));
    assert_eq!(store.user_by_email("nobody@example.com").await.unwrap(), None);
    assert_eq!(store.user_by_id(999).await.unwrap(), None);
}

async fn pharmacy_account_is_created_atomically(store: Arc<dyn Store>) {
    let (user, pharmacy) = store
        .insert_pharmacy_user(new_user("p1@example.com", Role::Pharmacy), new_pharmacy("Himalaya Pharmacy", false))
        .await
        .unwrap();
    assert_eq!(pharmacy.user_id, user.id);
    assert_eq!(pharmacy.name, "Himalaya Pharmacy");
    assert!(!pharmacy.approved);
    assert_eq!(pharmacy.created_at, user.created_at);
    assert_eq!(user.role, Role::Pharmacy);
    assert_eq!(store.pharmacy_by_user(user.id).await.unwrap(), Some(pharmacy.clone()));
    assert_eq!(store.pharmacy_by_id(pharmacy.id).await.unwrap(), Some(pharmacy.clone()));

    // A customer taking the email first: the pharmacy account fails whole, leaving no pharmacy.
    let customer = store.insert_user(new_user("taken@example.com", Role::Customer)).await.unwrap();
    assert!(is_conflict(
        store.insert_pharmacy_user(new_user("taken@example.com", Role::Pharmacy), new_pharmacy("Ghost", true)).await
    ));
    assert_eq!(store.load_pharmacies().await.unwrap(), vec![pharmacy]);
    assert_eq!(store.pharmacy_by_user(customer.id).await.unwrap(), None);
    assert_eq!(store.pharmacy_by_id(999).await.unwrap(), None);
}

async fn pharmacy_updates_and_approval(store: Arc<dyn Store>) {
    let (user, pharmacy) = store
        .insert_pharmacy_user(new_user("p@example.com", Role::Pharmacy), new_pharmacy("Old Name", false))
        .await
        .unwrap();
    // Read first, so that a store caching these reads must see the writes below.
    assert_eq!(store.pharmacy_by_user(user.id).await.unwrap(), Some(pharmacy.clone()));
    assert_eq!(store.user_by_id(user.id).await.unwrap(), Some(user.clone()));

    let moved = store
        .update_pharmacy(pharmacy.id, PharmacyPatch { name: None, location: Some(at(28.2, 83.98)), phone_number: None })
        .await
        .unwrap();
    assert_eq!(moved.name, "Old Name", "an absent field is left as it was");
    assert_eq!(moved.location, at(28.2, 83.98));

    let renamed = store
        .update_pharmacy(
            pharmacy.id,
            PharmacyPatch { name: Some("New Name".into()), location: None, phone_number: Some("9822222222".into()) },
        )
        .await
        .unwrap();
    assert_eq!(renamed.name, "New Name");
    assert_eq!(renamed.location, at(28.2, 83.98));
    assert_eq!(store.pharmacy_by_id(pharmacy.id).await.unwrap(), Some(renamed.clone()));
    let owner = store.user_by_id(user.id).await.unwrap().unwrap();
    assert_eq!(owner.phone_number, "9822222222", "the phone lives on the owner");
    assert_eq!(store.pharmacy_by_user(user.id).await.unwrap(), Some(renamed.clone()));

    let approved = store.set_pharmacy_approved(pharmacy.id, true).await.unwrap();
    assert!(approved.approved);
    assert_eq!(approved, Pharmacy { approved: true, ..renamed });
    assert_eq!(store.pharmacy_by_id(pharmacy.id).await.unwrap(), Some(approved.clone()), "by id");
    assert_eq!(store.pharmacy_by_user(user.id).await.unwrap(), Some(approved.clone()));
    let suspended = store.set_pharmacy_approved(pharmacy.id, false).await.unwrap();
    assert!(!suspended.approved);
    assert_eq!(store.pharmacy_by_id(pharmacy.id).await.unwrap(), Some(suspended.clone()));
    assert_eq!(store.pharmacy_by_user(user.id).await.unwrap(), Some(suspended));

    assert!(is_not_found(store.update_pharmacy(999, PharmacyPatch::default()).await));
    assert!(is_not_found(store.set_pharmacy_approved(999, true).await));
}

async fn pharmacy_listing_filters(store: Arc<dyn Store>) {
    let mut made = Vec::new();
    for (email, approved) in [("a@example.com", true), ("b@example.com", false), ("c@example.com", true)] {
        made.push(
            store
                .insert_pharmacy_user(
                    new_user(email, Role::Pharmacy),
                    new_pharmacy(&format!("Pharmacy {email}"), approved),
                )
                .await
                .unwrap(),
        );
    }
    let all = store.list_pharmacies(None).await.unwrap();
    assert_eq!(all.len(), 3);
    for (listing, (user, pharmacy)) in all.iter().zip(&made) {
        assert_eq!(listing.pharmacy, *pharmacy);
        assert_eq!(listing.email, user.email);
        assert_eq!(listing.owner_name, user.name);
        assert_eq!(listing.phone_number, user.phone_number);
    }
    let ids = |list: Vec<PharmacyListing>| -> Vec<PharmacyId> { list.into_iter().map(|l| l.pharmacy.id).collect() };
    assert_eq!(ids(store.list_pharmacies(Some(true)).await.unwrap()), vec![made[0].1.id, made[2].1.id]);
    assert_eq!(ids(store.list_pharmacies(Some(false)).await.unwrap()), vec![made[1].1.id]);
    let loaded = store.load_pharmacies().await.unwrap();
    assert_eq!(loaded, made.into_iter().map(|(_, p)| p).collect::<Vec<_>>());
}

// ---- email verification ----

async fn otp_match_consumes_and_verifies(store: Arc<dyn Store>) {
    let email = "otp@example.com";
    let user = store.insert_user(new_user(email, Role::Customer)).await.unwrap();
    assert!(!store.email_verified(email).await.unwrap());
    assert!(!store.user_by_id(user.id).await.unwrap().unwrap().email_verified, "read before the check");

    // Attempts start at 0 whatever the record says.
    store.put_otp(OtpRecord { attempts: 3, ..otp(email, "hash-1", T0) }).await.unwrap();
    assert_eq!(store.otp(email).await.unwrap(), Some(otp(email, "hash-1", T0)));

    assert_eq!(store.check_otp(email, "wrong", T0 + 1).await.unwrap(), OtpOutcome::Wrong { remaining: 4 });
    assert_eq!(store.otp(email).await.unwrap().unwrap().attempts, 1);
    assert_eq!(store.check_otp(email, "hash-1", T0 + 2).await.unwrap(), OtpOutcome::Verified);
    assert_eq!(store.otp(email).await.unwrap(), None, "a match consumes it");
    assert!(store.email_verified(email).await.unwrap());
    assert!(store.user_by_id(user.id).await.unwrap().unwrap().email_verified);
    assert_eq!(store.check_otp(email, "hash-1", T0 + 3).await.unwrap(), OtpOutcome::NoCode, "single use");

    // Verified before registering: recorded for the email alone.
    let early = "early@example.com";
    store.put_otp(otp(early, "hash-2", T0)).await.unwrap();
    assert_eq!(store.check_otp(early, "hash-2", T0 + 1).await.unwrap(), OtpOutcome::Verified);
    assert!(store.email_verified(early).await.unwrap());
    assert_eq!(store.check_otp("never@example.com", "x", T0).await.unwrap(), OtpOutcome::NoCode);
}

async fn otp_wrong_tries_burn_the_code(store: Arc<dyn Store>) {
    let email = "burn@example.com";
    store.put_otp(otp(email, "right", T0)).await.unwrap();
    for remaining in (0..5).rev() {
        assert_eq!(store.check_otp(email, "wrong", T0 + 1).await.unwrap(), OtpOutcome::Wrong { remaining });
    }
    assert_eq!(store.otp(email).await.unwrap(), None, "the 5th miss burns it");
    assert_eq!(store.check_otp(email, "right", T0 + 2).await.unwrap(), OtpOutcome::NoCode);
    assert!(!store.email_verified(email).await.unwrap());
}

async fn otp_expiry_and_replacement(store: Arc<dyn Store>) {
    let email = "late@example.com";
    let record = otp(email, "code", T0);
    store.put_otp(record.clone()).await.unwrap();
    assert_eq!(
        store.check_otp(email, "code", record.expires_at).await.unwrap(),
        OtpOutcome::NoCode,
        "expired at its expiry time"
    );
    assert_eq!(store.otp(email).await.unwrap(), None, "an expired code is deleted");
    assert!(!store.email_verified(email).await.unwrap());

    // A fresh code replaces the earlier one and its tries.
    store.put_otp(otp(email, "first", T0)).await.unwrap();
    store.check_otp(email, "wrong", T0 + 1).await.unwrap();
    store.put_otp(otp(email, "second", T0 + 2)).await.unwrap();
    assert_eq!(store.otp(email).await.unwrap().unwrap().attempts, 0);
    assert_eq!(store.check_otp(email, "first", T0 + 3).await.unwrap(), OtpOutcome::Wrong { remaining: 4 });
    assert_eq!(store.check_otp(email, "second", T0 + 4).await.unwrap(), OtpOutcome::Verified);
}

// ---- medicine requests ----

async fn create_request_keeps_recipient_order(store: Arc<dyn Store>) {
    let recipients = recipients_for(&[(30, "Thirty"), (10, "Ten"), (20, "Twenty")]);
    let req = new_request(7, T0, None);
    let created = create(&store, req.clone(), recipients.clone()).await;
    assert!(created.id >= 1);
    assert_eq!(
        created,
        MedicineRequest {
            id: created.id,
            customer_id: 7,
            patient_name: req.patient_name,
            patient_phone: req.patient_phone,
            location: req.location,
            radius_km: req.radius_km,
            quantity: req.quantity,
            medicine_name: req.medicine_name,
            note: None,
            image: req.image,
            status: RequestStatus::Pending,
            pharmacy_id: None,
            pharmacy_name: None,
            idempotency_key: None,
            created_at: T0,
            expires_at: req.expires_at,
            closed_at: None,
        }
    );
    assert_eq!(store.request(created.id).await.unwrap(), Some(created.clone()));
    assert_eq!(store.recipients(created.id).await.unwrap(), recipients);
    assert_eq!(store.responses(created.id).await.unwrap(), vec![]);

    let lonely = create(&store, new_request(7, T0 + 1, None), vec![]).await;
    assert!(lonely.id > created.id);
    assert_eq!(store.recipients(lonely.id).await.unwrap(), vec![]);
    assert_eq!(store.request(999).await.unwrap(), None);
    assert_eq!(store.recipients(999).await.unwrap(), vec![]);
}

async fn idempotency_key_binds_for_24_hours(store: Arc<dyn Store>) {
    let recipients = recipients_for(&[(1, "One")]);
    let first = create(&store, new_request(7, T0, Some("key-1")), recipients.clone()).await;

    for later in [1, 60 * 60 * 1000, IDEMPOTENCY_WINDOW_MS] {
        let again = store
            .create_request(new_request(7, T0 + later, Some("key-1")), recipients_for(&[(2, "Two")]))
            .await
            .unwrap();
        assert_eq!(again, Created::Existing(first.clone()), "{later} ms later");
    }
    assert_eq!(store.requests_of_customer(7).await.unwrap().len(), 1);
    assert_eq!(store.recipients(first.id).await.unwrap(), recipients);

    // Keys are per customer, and requests without a key never match.
    let other = create(&store, new_request(8, T0 + 1, Some("key-1")), vec![]).await;
    assert_ne!(other.id, first.id);
    create(&store, new_request(7, T0 + 2, None), vec![]).await;
    create(&store, new_request(7, T0 + 3, None), vec![]).await;

    // Past the window the key binds no longer: a new request, which the key then binds to.
    let after = T0 + IDEMPOTENCY_WINDOW_MS + 1;
    let renewed = create(&store, new_request(7, after, Some("key-1")), vec![]).await;
    assert_ne!(renewed.id, first.id);
    assert_eq!(
        store.create_request(new_request(7, after + 1, Some("key-1")), vec![]).await.unwrap(),
        Created::Existing(renewed)
    );
}

async fn responses_are_decided_once(store: Arc<dyn Store>) {
    let request =
        create(&store, new_request(7, T0, None), recipients_for(&[(1, "One"), (2, "Two"), (3, "Three")])).await;
    let id = request.id;

    // A rejection is stored and leaves the request open.
    let rejected = match store.record_response(response(id, 1, ResponseType::Rejected, T0 + 10)).await.unwrap() {
        ResponseOutcome::Recorded(r) => r,
        other => panic!("{other:?}"),
    };
    assert_eq!(rejected.response_type, ResponseType::Rejected);
    assert_eq!(rejected.pharmacy_id, 1);
    assert_eq!(store.request(id).await.unwrap().unwrap().status, RequestStatus::Pending);

    // Repeats, of either type, return the original untouched.
    let mut same = response(id, 1, ResponseType::Rejected, T0 + 11);
    same.text_message = Some("changed my mind".into());
    assert_eq!(store.record_response(same).await.unwrap(), ResponseOutcome::Repeat(rejected.clone()));
    assert_eq!(
        store.record_response(response(id, 1, ResponseType::Accepted, T0 + 12)).await.unwrap(),
        ResponseOutcome::Repeat(rejected.clone())
    );
    assert_eq!(store.request(id).await.unwrap().unwrap().status, RequestStatus::Pending);

    // Not a recipient, or no such request.
    assert_eq!(
        store.record_response(response(id, 99, ResponseType::Accepted, T0 + 13)).await.unwrap(),
        ResponseOutcome::NotNotified
    );
    assert_eq!(
        store.record_response(response(999, 1, ResponseType::Accepted, T0 + 13)).await.unwrap(),
        ResponseOutcome::NotNotified
    );

    // The first accept wins and closes the request.
    let accepted = match store.record_response(response(id, 2, ResponseType::Accepted, T0 + 20)).await.unwrap() {
        ResponseOutcome::Recorded(r) => r,
        other => panic!("{other:?}"),
    };
    let won = store.request(id).await.unwrap().unwrap();
    assert_eq!(won.status, RequestStatus::Accepted);
    assert_eq!(won.pharmacy_id, Some(2));
    assert_eq!(won.pharmacy_name.as_deref(), Some("Pharmacy #2"));
    assert_eq!(won.closed_at, Some(T0 + 20));

    // Everyone else now hears it is taken, for either type; the winner and the rejecter repeat.
    for kind in [ResponseType::Accepted, ResponseType::Rejected] {
        assert_eq!(
            store.record_response(response(id, 3, kind, T0 + 30)).await.unwrap(),
            ResponseOutcome::Closed(RequestStatus::Accepted)
        );
    }
    assert_eq!(
        store.record_response(response(id, 2, ResponseType::Accepted, T0 + 31)).await.unwrap(),
        ResponseOutcome::Repeat(accepted.clone())
    );
    assert_eq!(
        store.record_response(response(id, 1, ResponseType::Rejected, T0 + 32)).await.unwrap(),
        ResponseOutcome::Repeat(rejected.clone())
    );
    assert_eq!(store.responses(id).await.unwrap(), vec![rejected, accepted], "oldest first, and nothing else recorded");
}

async fn cancel_is_for_the_owner_while_pending(store: Arc<dyn Store>) {
    let request = create(&store, new_request(7, T0, None), recipients_for(&[(1, "One")])).await;
    let id = request.id;
    assert!(is_not_found(store.cancel_request(id, 8, T0 + 1).await));
    assert!(is_not_found(store.cancel_request(999, 7, T0 + 1).await));
    assert_eq!(store.request(id).await.unwrap().unwrap().status, RequestStatus::Pending);

    assert_eq!(store.cancel_request(id, 7, T0 + 5).await.unwrap(), Decision::Won);
    let cancelled = store.request(id).await.unwrap().unwrap();
    assert_eq!(cancelled.status, RequestStatus::Cancelled);
    assert_eq!(cancelled.closed_at, Some(T0 + 5));
    assert_eq!(cancelled.pharmacy_id, None);

    assert_eq!(store.cancel_request(id, 7, T0 + 6).await.unwrap(), Decision::Lost(RequestStatus::Cancelled));
    assert_eq!(store.expire_request(id, T0 + 7).await.unwrap(), Decision::Lost(RequestStatus::Cancelled));
    assert_eq!(
        store.record_response(response(id, 1, ResponseType::Accepted, T0 + 8)).await.unwrap(),
        ResponseOutcome::Closed(RequestStatus::Cancelled)
    );
    assert_eq!(store.request(id).await.unwrap().unwrap().closed_at, Some(T0 + 5), "a lost transition changes nothing");
}

async fn expire_loses_to_accept(store: Arc<dyn Store>) {
    let recipients = recipients_for(&[(1, "One")]);
    let open = create(&store, new_request(7, T0, None), recipients.clone()).await;
    assert_eq!(store.expire_request(open.id, T0 + 900_000).await.unwrap(), Decision::Won);
    let expired = store.request(open.id).await.unwrap().unwrap();
    assert_eq!(expired.status, RequestStatus::Expired);
    assert_eq!(expired.closed_at, Some(T0 + 900_000));
    assert_eq!(
        store.record_response(response(open.id, 1, ResponseType::Rejected, T0 + 900_001)).await.unwrap(),
        ResponseOutcome::Closed(RequestStatus::Expired)
    );

    let taken = create(&store, new_request(7, T0, None), recipients).await;
    store.record_response(response(taken.id, 1, ResponseType::Accepted, T0 + 10)).await.unwrap();
    assert_eq!(store.expire_request(taken.id, T0 + 900_000).await.unwrap(), Decision::Lost(RequestStatus::Accepted));
    assert_eq!(store.cancel_request(taken.id, 7, T0 + 900_000).await.unwrap(), Decision::Lost(RequestStatus::Accepted));
    let still = store.request(taken.id).await.unwrap().unwrap();
    assert_eq!(still.status, RequestStatus::Accepted);
    assert_eq!(still.closed_at, Some(T0 + 10));
    assert!(is_not_found(store.expire_request(999, T0).await));
}

async fn customer_requests_newest_first(store: Arc<dyn Store>) {
    let a = create(&store, new_request(7, T0, None), vec![]).await;
    let c = create(&store, new_request(7, T0 + 2_000, None), vec![]).await;
    let b = create(&store, new_request(7, T0 + 1_000, None), vec![]).await;
    let other = create(&store, new_request(8, T0 + 3_000, None), vec![]).await;
    // Same instant: the later id is the newer.
    let d = create(&store, new_request(7, T0 + 2_000, None), vec![]).await;

    let ids: Vec<RequestId> = store.requests_of_customer(7).await.unwrap().into_iter().map(|r| r.id).collect();
    assert_eq!(ids, vec![d.id, c.id, b.id, a.id]);
    assert_eq!(store.requests_of_customer(8).await.unwrap(), vec![other]);
    assert_eq!(store.requests_of_customer(9).await.unwrap(), vec![]);
}

async fn live_requests_for_start_up(store: Arc<dyn Store>) {
    let people = [(5, "Five"), (3, "Three"), (4, "Four")];
    let pending = create(&store, new_request(7, T0, None), recipients_for(&people)).await;
    let accepted_early = create(&store, new_request(7, T0, None), recipients_for(&people)).await;
    let cancelled = create(&store, new_request(8, T0, None), recipients_for(&people[..1])).await;
    let accepted_late = create(&store, new_request(8, T0, None), recipients_for(&people)).await;
    let bare = create(&store, new_request(9, T0, None), vec![]).await;

    store.record_response(response(pending.id, 3, ResponseType::Rejected, T0 + 1)).await.unwrap();
    store.record_response(response(accepted_early.id, 5, ResponseType::Accepted, T0 + 1_000)).await.unwrap();
    store.cancel_request(cancelled.id, 8, T0 + 5_000).await.unwrap();
    store.record_response(response(accepted_late.id, 4, ResponseType::Rejected, T0 + 6_000)).await.unwrap();
    store.record_response(response(accepted_late.id, 3, ResponseType::Accepted, T0 + 7_000)).await.unwrap();

    let live = store.load_live_requests(T0 + 5_000).await.unwrap();
    let ids: Vec<RequestId> = live.iter().map(|s| s.request.id).collect();
    assert_eq!(
        ids,
        vec![pending.id, cancelled.id, accepted_late.id, bare.id],
        "pending ones and those closed at or after the cut-off, by id"
    );
    for snapshot in &live {
        assert_eq!(Some(&snapshot.request), store.request(snapshot.request.id).await.unwrap().as_ref());
        assert_eq!(
            snapshot.recipients,
            store.recipients(snapshot.request.id).await.unwrap(),
            "recipients nearest first"
        );
    }
    assert_eq!(live[0].recipients, recipients_for(&people));
    assert_eq!(live[0].responded, vec![(3, ResponseType::Rejected)]);
    assert_eq!(live[1].responded, vec![]);
    assert_eq!(live[2].responded, vec![(3, ResponseType::Accepted), (4, ResponseType::Rejected)]);
    assert_eq!(live[3].recipients, vec![]);

    let everything = store.load_live_requests(0).await.unwrap();
    assert_eq!(everything.len(), 5);
}

async fn concurrent_accepts_have_one_winner(store: Arc<dyn Store>) {
    let contenders: Vec<(PharmacyId, String)> = (1..=32).map(|i| (i, format!("P{i}"))).collect();
    let named: Vec<(PharmacyId, &str)> = contenders.iter().map(|(i, n)| (*i, n.as_str())).collect();
    let request = create(&store, new_request(7, T0, None), recipients_for(&named)).await;

    let tasks: Vec<_> = contenders
        .iter()
        .map(|&(pharmacy_id, _)| {
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                store
                    .record_response(response(request.id, pharmacy_id, ResponseType::Accepted, T0 + pharmacy_id))
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut winners = Vec::new();
    for task in tasks {
        match task.await.unwrap() {
            ResponseOutcome::Recorded(r) => winners.push(r.pharmacy_id),
            ResponseOutcome::Closed(RequestStatus::Accepted) => {}
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(winners.len(), 1);
    let closed = store.request(request.id).await.unwrap().unwrap();
    assert_eq!(closed.pharmacy_id, Some(winners[0]));
    assert_eq!(store.responses(request.id).await.unwrap().len(), 1);
}

// ---- SQLite only: group commit ----

async fn create_concurrently(store: &Arc<SqliteStore>, count: usize) -> Vec<RequestId> {
    let people: Vec<(PharmacyId, String)> = (1..=10).map(|i| (i, format!("P{i}"))).collect();
    let tasks: Vec<_> = (0..count)
        .map(|i| {
            let store = Arc::clone(store);
            let named: Vec<(PharmacyId, &str)> = people.iter().map(|(id, n)| (*id, n.as_str())).collect();
            let recipients = recipients_for(&named);
            tokio::spawn(async move {
                let req = new_request(1 + (i % 50) as UserId, T0 + i as UnixMs, None);
                match store.create_request(req, recipients).await.unwrap() {
                    Created::New(r) => r.id,
                    other => panic!("{other:?}"),
                }
            })
        })
        .collect();
    let mut ids = Vec::with_capacity(count);
    for task in tasks {
        ids.push(task.await.unwrap());
    }
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_commit_batches_concurrent_creates() {
    let (store, _dir) = sqlite_store_with(StoreOptions::default());
    let mut ids = create_concurrently(&store, 1_000).await;
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 1_000);

    let stats = store.stats();
    eprintln!("{stats:?}");
    assert_eq!(stats.writes, 1_000);
    assert!(stats.commits <= 250, "1,000 concurrent creates took {} commits", stats.commits);
    assert_eq!(stats.failed_batches, 0);
    // Everything acknowledged is readable at once, from another connection.
    for id in [ids[0], ids[499], ids[999]] {
        assert_eq!(store.recipients(id).await.unwrap().len(), 10);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_batch_one_commits_every_write() {
    let (store, _dir) = sqlite_store_with(StoreOptions { max_batch: 1, ..StoreOptions::default() });
    create_concurrently(&store, 200).await;
    let stats = store.stats();
    assert_eq!(stats.writes, 200);
    assert_eq!(stats.commits, 200);
    assert_eq!(stats.last_batch, 1);
}
