//! `serve --demo`: the seed's test data (one customer, pharmacies A–D around Kathmandu, one
//! pharmacy awaiting approval, one admin), embedded in the binary from `data/demo.json` so a
//! first run needs no files and every machine gets the same fixture.
//!
//! Accounts are created through `Accounts`, exactly as a client registering would create them
//! (same validation, same argon2 hashes, the index updated the same way), only where the email
//! is missing: a second run creates nothing, and a demo account changed since (say, a pharmacy
//! an admin suspended) is left as it is. A new pharmacy's approval is then set to what the file
//! says, whatever `--pharmacy-approval` is. Demo emails are marked verified by issuing and
//! redeeming an OTP through `Accounts` (the engine has no other way), with an address no client
//! can have, so no client's OTP budget is spent. The logins are public and printed on stdout,
//! never logged.

use crate::progress::Progress;
use sanjevani_engine::Error;
use sanjevani_engine::accounts::{Accounts, Registration};
use sanjevani_engine::geo::LatLng;
use sanjevani_engine::model::Role;
use serde::Deserialize;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};

/// The demo data as shipped (`data/demo.json`, identical to the shared `demo.json`).
pub const DEMO_JSON: &str = include_str!("../../data/demo.json");

/// The client address demo OTPs are issued for: `::` is never a peer's address, so this spends
/// no real client's OTP allowance.
const DEMO_OTP_IP: IpAddr = IpAddr::V6(Ipv6Addr::UNSPECIFIED);

/// The demo file.
#[derive(Debug, Clone, Deserialize)]
pub struct DemoData {
    /// What the data is.
    pub about: String,
    /// The point the pharmacies are placed around (where a demo customer stands).
    pub center: DemoPoint,
    /// CUSTOMER accounts.
    pub customers: Vec<DemoPerson>,
    /// PHARMACY accounts with their pharmacies.
    pub pharmacies: Vec<DemoPharmacy>,
    /// ADMIN accounts.
    pub admins: Vec<DemoPerson>,
}

/// A point in the demo file.
#[derive(Debug, Clone, Copy, Deserialize)]
pub struct DemoPoint {
    /// Latitude, degrees.
    pub lat: f64,
    /// Longitude, degrees.
    pub lng: f64,
}

/// A customer or admin in the demo file.
#[derive(Debug, Clone, Deserialize)]
pub struct DemoPerson {
    /// Login email.
    pub email: String,
    /// Login password (public).
    pub password: String,
    /// Display name.
    pub name: String,
    /// Phone number (admins have none).
    #[serde(default)]
    pub phone_number: String,
}

/// A pharmacy in the demo file.
#[derive(Debug, Clone, Deserialize)]
pub struct DemoPharmacy {
    /// Short key (`A`…`E`) the docs and tests refer to it by.
    pub key: String,
    /// Login email.
    pub email: String,
    /// Login password (public).
    pub password: String,
    /// Owner's name.
    pub name: String,
    /// Phone number.
    pub phone_number: String,
    /// Business name.
    pub pharmacy_name: String,
    /// Latitude.
    pub lat: f64,
    /// Longitude.
    pub lng: f64,
    /// Whether it starts approved.
    pub approved: bool,
    /// Distance from `center` in km, as the seed states it (documentation only).
    #[serde(default)]
    pub distance_km: Option<f64>,
}

/// The embedded demo data, parsed.
pub fn demo_data() -> Result<DemoData, serde_json::Error> {
    serde_json::from_str(DEMO_JSON)
}

/// One demo login, for the printed table.
#[derive(Debug, Clone, PartialEq)]
pub struct DemoLogin {
    /// Login email.
    pub email: String,
    /// Login password (public).
    pub password: String,
    /// Role.
    pub role: Role,
    /// For pharmacies: the key (`A`…) and business name.
    pub pharmacy: Option<(String, String)>,
    /// For pharmacies: whether the demo data has it approved.
    pub approved: Option<bool>,
    /// Whether this run created the account (`false`: it already existed and was left alone).
    pub created: bool,
}

/// What [`load_demo`] did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DemoReport {
    /// Every demo login, customers first, then pharmacies, then admins.
    pub logins: Vec<DemoLogin>,
}

impl DemoReport {
    /// Accounts this run created.
    pub fn created(&self) -> usize {
        self.logins.iter().filter(|l| l.created).count()
    }
}

/// Why the demo data could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// The embedded file does not parse (a build with a broken `data/demo.json`).
    #[error("the embedded demo data is invalid: {0}")]
    Data(#[from] serde_json::Error),
    /// The engine refused or failed on one account.
    #[error("demo account {email}: {source}")]
    Account {
        /// The account's email.
        email: String,
        /// The engine's error.
        source: Error,
    },
}

fn account_error(email: &str) -> impl FnOnce(Error) -> DemoError + '_ {
    move |source| DemoError::Account { email: email.to_string(), source }
}

/// `Ok(Some)` for a new account, `Ok(None)` when the email is taken (the account exists).
fn new_or_existing<T>(email: &str, result: Result<T, Error>) -> Result<Option<T>, DemoError> {
    match result {
        Ok(value) => Ok(Some(value)),
        Err(Error::Conflict(_)) => Ok(None),
        Err(e) => Err(account_error(email)(e)),
    }
}

/// Marks a demo email verified by issuing an OTP and redeeming it at once.
async fn verify_email(accounts: &Accounts, email: &str) -> Result<(), DemoError> {
    let code = accounts.send_otp(email, DEMO_OTP_IP).await.map_err(account_error(email))?;
    accounts.verify_otp(email, &code).await.map_err(account_error(email))
}

/// Creates the demo accounts that are missing (customers, pharmacies with the file's approval,
/// admins), their emails verified. Idempotent: accounts whose email exists are left untouched.
pub async fn load_demo(accounts: &Accounts) -> Result<DemoReport, DemoError> {
    let data = demo_data()?;
    let total = data.customers.len() + data.pharmacies.len() + data.admins.len();
    let progress = Progress::start("loading demo data", Some(total as u64));
    let mut report = DemoReport::default();
    let registration = |email: &str, password: &str, name: &str, phone: &str| Registration {
        email: email.to_string(),
        password: password.to_string(),
        name: name.to_string(),
        phone_number: phone.to_string(),
    };

    for c in &data.customers {
        let reg = registration(&c.email, &c.password, &c.name, &c.phone_number);
        let created = new_or_existing(&c.email, accounts.register_customer(reg).await)?.is_some();
        if created {
            verify_email(accounts, &c.email).await?;
        }
        report.logins.push(DemoLogin {
            email: c.email.clone(),
            password: c.password.clone(),
            role: Role::Customer,
            pharmacy: None,
            approved: None,
            created,
        });
        progress.inc(1);
    }

    for p in &data.pharmacies {
        let location = LatLng::new(p.lat, p.lng).map_err(|e| account_error(&p.email)(e.on("lat")))?;
        let reg = registration(&p.email, &p.password, &p.name, &p.phone_number);
        let result = accounts.register_pharmacy(reg, &p.pharmacy_name, location).await;
        let created = match new_or_existing(&p.email, result)? {
            Some((_, pharmacy)) => {
                if pharmacy.approved != p.approved {
                    let set = if p.approved {
                        accounts.approve(pharmacy.id).await
                    } else {
                        accounts.suspend(pharmacy.id).await
                    };
                    set.map_err(account_error(&p.email))?;
                }
                verify_email(accounts, &p.email).await?;
                true
            }
            None => false,
        };
        report.logins.push(DemoLogin {
            email: p.email.clone(),
            password: p.password.clone(),
            role: Role::Pharmacy,
            pharmacy: Some((p.key.clone(), p.pharmacy_name.clone())),
            approved: Some(p.approved),
            created,
        });
        progress.inc(1);
    }

    for a in &data.admins {
        let reg = registration(&a.email, &a.password, &a.name, &a.phone_number);
        let created = new_or_existing(&a.email, accounts.create_admin(reg).await)?.is_some();
        if created {
            verify_email(accounts, &a.email).await?;
        }
        report.logins.push(DemoLogin {
            email: a.email.clone(),
            password: a.password.clone(),
            role: Role::Admin,
            pharmacy: None,
            approved: None,
            created,
        });
        progress.inc(1);
    }

    progress.finish(report.created() as u64, &format!("of {total} demo accounts created"));
    Ok(report)
}

/// The console's URL for people: `--public-url`, else the listener's address (an unspecified
/// address such as `0.0.0.0` shown as loopback, which is reachable from this machine).
pub fn console_url(public_url: Option<&str>, local_addr: SocketAddr) -> String {
    if let Some(url) = public_url {
        return format!("{}/", url.trim_end_matches('/'));
    }
    let mut addr = local_addr;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr.ip() {
            IpAddr::V4(_) => IpAddr::from([127, 0, 0, 1]),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
        });
    }
    format!("http://{addr}/")
}

/// The logins table and console URL as [`print_logins`] prints them.
pub fn render_logins(report: &DemoReport, console_url: &str) -> String {
    let rows: Vec<[String; 4]> = report
        .logins
        .iter()
        .map(|l| {
            let pharmacy = match (&l.pharmacy, l.approved) {
                (Some((key, name)), Some(false)) => format!("{key}  {name} (awaiting approval)"),
                (Some((key, name)), _) => format!("{key}  {name}"),
                (None, _) => String::new(),
            };
            [l.email.clone(), l.password.clone(), l.role.as_str().to_string(), pharmacy]
        })
        .collect();
    let header = ["EMAIL", "PASSWORD", "ROLE", "PHARMACY"].map(String::from);
    let mut widths = header.clone().map(|h| h.len());
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let _ = writeln!(out, "Demo logins (public: never use them in production)");
    for row in std::iter::once(&header).chain(&rows) {
        let line = format!(
            "  {:w0$}  {:w1$}  {:w2$}  {}",
            row[0],
            row[1],
            row[2],
            row[3],
            w0 = widths[0],
            w1 = widths[1],
            w2 = widths[2]
        );
        let _ = writeln!(out, "{}", line.trim_end());
    }
    let _ = writeln!(out, "Console: {console_url}");
    out
}

/// Prints the demo logins (email, password, role, pharmacy key) and the console URL on stdout.
pub fn print_logins(report: &DemoReport, console_url: &str) {
    print!("{}", render_logins(report, console_url));
}

#[cfg(test)]
mod tests {
    use super::*;
    use async_trait::async_trait;
    use sanjevani_engine::accounts::{AccountsConfig, Approval};
    use sanjevani_engine::hub::Hub;
    use sanjevani_engine::index::PharmacyIndex;
    use sanjevani_engine::model::*;
    use sanjevani_engine::store::Store;
    use std::collections::{HashMap, HashSet};
    use std::sync::{Arc, Mutex};

    /// Just enough of a store for accounts: the engine's `MemoryStore` is not on this branch yet.
    #[derive(Default)]
    struct AccountsOnlyStore {
        state: Mutex<FakeState>,
    }

    #[derive(Default)]
    struct FakeState {
        users: Vec<User>,
        pharmacies: Vec<Pharmacy>,
        otps: HashMap<String, OtpRecord>,
        verified: HashSet<String>,
    }

    fn not_in_fake<T>() -> sanjevani_engine::Result<T> {
        Err(Error::Unavailable("not part of the accounts-only test store".into()))
    }

    impl FakeState {
        fn insert(&mut self, new: NewUser) -> sanjevani_engine::Result<User> {
            if self.users.iter().any(|u| u.email == new.email) {
                return Err(Error::Conflict("email taken".into()));
            }
            let user = User {
                id: self.users.len() as i64 + 1,
                email: new.email,
                password_hash: new.password_hash,
                name: new.name,
                phone_number: new.phone_number,
                role: new.role,
                email_verified: new.email_verified,
                created_at: new.created_at,
            };
            self.users.push(user.clone());
            Ok(user)
        }
    }

    #[async_trait]
    impl Store for AccountsOnlyStore {
        async fn insert_user(&self, user: NewUser) -> sanjevani_engine::Result<User> {
            self.state.lock().unwrap().insert(user)
        }
        async fn insert_pharmacy_user(
            &self,
            user: NewUser,
            pharmacy: NewPharmacy,
        ) -> sanjevani_engine::Result<(User, Pharmacy)> {
            let mut state = self.state.lock().unwrap();
            let created_at = user.created_at;
            let user = state.insert(user)?;
            let pharmacy = Pharmacy {
                id: state.pharmacies.len() as i64 + 1,
                user_id: user.id,
                name: pharmacy.name,
                location: pharmacy.location,
                approved: pharmacy.approved,
                created_at,
            };
            state.pharmacies.push(pharmacy.clone());
            Ok((user, pharmacy))
        }
        async fn user_by_email(&self, email: &str) -> sanjevani_engine::Result<Option<User>> {
            Ok(self.state.lock().unwrap().users.iter().find(|u| u.email == email).cloned())
        }
        async fn user_by_id(&self, id: UserId) -> sanjevani_engine::Result<Option<User>> {
            Ok(self.state.lock().unwrap().users.iter().find(|u| u.id == id).cloned())
        }
        async fn pharmacy_by_user(&self, user_id: UserId) -> sanjevani_engine::Result<Option<Pharmacy>> {
            Ok(self.state.lock().unwrap().pharmacies.iter().find(|p| p.user_id == user_id).cloned())
        }
        async fn pharmacy_by_id(&self, id: PharmacyId) -> sanjevani_engine::Result<Option<Pharmacy>> {
            Ok(self.state.lock().unwrap().pharmacies.iter().find(|p| p.id == id).cloned())
        }
        async fn update_pharmacy(&self, _: PharmacyId, _: PharmacyPatch) -> sanjevani_engine::Result<Pharmacy> {
            not_in_fake()
        }
        async fn set_pharmacy_approved(&self, id: PharmacyId, approved: bool) -> sanjevani_engine::Result<Pharmacy> {
            let mut state = self.state.lock().unwrap();
            let pharmacy = state
                .pharmacies
                .iter_mut()
                .find(|p| p.id == id)
                .ok_or_else(|| Error::NotFound("no such pharmacy".into()))?;
            pharmacy.approved = approved;
            Ok(pharmacy.clone())
        }
        async fn list_pharmacies(&self, _: Option<bool>) -> sanjevani_engine::Result<Vec<PharmacyListing>> {
            not_in_fake()
        }
        async fn load_pharmacies(&self) -> sanjevani_engine::Result<Vec<Pharmacy>> {
            Ok(self.state.lock().unwrap().pharmacies.clone())
        }
        async fn put_otp(&self, otp: OtpRecord) -> sanjevani_engine::Result<()> {
            self.state.lock().unwrap().otps.insert(otp.email.clone(), otp);
            Ok(())
        }
        async fn otp(&self, email: &str) -> sanjevani_engine::Result<Option<OtpRecord>> {
            Ok(self.state.lock().unwrap().otps.get(email).cloned())
        }
        async fn check_otp(&self, email: &str, code_hash: &str, now: UnixMs) -> sanjevani_engine::Result<OtpOutcome> {
            let mut state = self.state.lock().unwrap();
            match state.otps.remove(email) {
                Some(otp) if otp.code_hash == code_hash && otp.expires_at > now => {
                    state.verified.insert(email.to_string());
                    for user in state.users.iter_mut().filter(|u| u.email == email) {
                        user.email_verified = true;
                    }
                    Ok(OtpOutcome::Verified)
                }
                Some(_) => Ok(OtpOutcome::Wrong { remaining: 0 }),
                None => Ok(OtpOutcome::NoCode),
            }
        }
        async fn email_verified(&self, email: &str) -> sanjevani_engine::Result<bool> {
            Ok(self.state.lock().unwrap().verified.contains(email))
        }
        async fn create_request(&self, _: NewRequest, _: Vec<Recipient>) -> sanjevani_engine::Result<Created> {
            not_in_fake()
        }
        async fn record_response(&self, _: NewResponse) -> sanjevani_engine::Result<ResponseOutcome> {
            not_in_fake()
        }
        async fn cancel_request(&self, _: RequestId, _: UserId, _: UnixMs) -> sanjevani_engine::Result<Decision> {
            not_in_fake()
        }
        async fn expire_request(&self, _: RequestId, _: UnixMs) -> sanjevani_engine::Result<Decision> {
            not_in_fake()
        }
        async fn request(&self, _: RequestId) -> sanjevani_engine::Result<Option<MedicineRequest>> {
            not_in_fake()
        }
        async fn requests_of_customer(&self, _: UserId) -> sanjevani_engine::Result<Vec<MedicineRequest>> {
            not_in_fake()
        }
        async fn responses(&self, _: RequestId) -> sanjevani_engine::Result<Vec<PharmacyResponse>> {
            not_in_fake()
        }
        async fn recipients(&self, _: RequestId) -> sanjevani_engine::Result<Vec<Recipient>> {
            not_in_fake()
        }
        async fn load_live_requests(&self, _: UnixMs) -> sanjevani_engine::Result<Vec<RequestSnapshot>> {
            not_in_fake()
        }
    }

    fn accounts(store: Arc<AccountsOnlyStore>, approval: Approval) -> (Accounts, Arc<PharmacyIndex>) {
        let index = Arc::new(PharmacyIndex::default());
        let config = AccountsConfig { approval, ..AccountsConfig::default() };
        let accounts = Accounts::new(store, index.clone(), Hub::new(16), &[7u8; 32], config).unwrap();
        (accounts, index)
    }

    #[test]
    fn the_embedded_file_parses_and_matches_the_seed() {
        let data = demo_data().unwrap();
        assert_eq!(data.customers.len(), 1);
        assert_eq!(data.admins.len(), 1);
        let keys: Vec<&str> = data.pharmacies.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(keys, ["A", "B", "C", "D", "E"]);
        assert_eq!(data.pharmacies.iter().filter(|p| !p.approved).count(), 1);
        let center = LatLng::new(data.center.lat, data.center.lng).unwrap();
        for p in &data.pharmacies {
            let d = sanjevani_engine::geo::haversine_km(center, LatLng::new(p.lat, p.lng).unwrap());
            assert!((d - p.distance_km.unwrap()).abs() < 0.05, "{}: {d} km", p.key);
        }
    }

    async fn check_loads_once(approval: Approval) {
        let store = Arc::new(AccountsOnlyStore::default());
        let (accounts, index) = accounts(store.clone(), approval);
        let report = load_demo(&accounts).await.unwrap();
        assert_eq!(report.logins.len(), 7);
        assert_eq!(report.created(), 7);
        {
            let state = store.state.lock().unwrap();
            assert_eq!(state.users.len(), 7);
            assert!(state.users.iter().all(|u| u.email_verified), "every demo email is verified");
            let roles: Vec<Role> = state.users.iter().map(|u| u.role).collect();
            assert_eq!(roles.iter().filter(|r| **r == Role::Pharmacy).count(), 5);
            assert_eq!(roles.iter().filter(|r| **r == Role::Admin).count(), 1);
            let approved: Vec<(&str, bool)> = state.pharmacies.iter().map(|p| (p.name.as_str(), p.approved)).collect();
            assert_eq!(
                approved,
                [
                    ("City Pharmacy", true),
                    ("Health Plus Pharmacy", true),
                    ("MediCare Pharmacy", true),
                    ("Far Away Pharmacy", true),
                    ("New Life Pharmacy", false),
                ]
            );
        }
        assert_eq!(index.len(), 4, "approved pharmacies are in the index, the unapproved one is not");
        for login in &report.logins {
            let ip = IpAddr::from([127, 0, 0, 1]);
            accounts.login(&login.email, &login.password, ip).await.expect("demo login works");
        }

        let (accounts, _) = self::accounts(store.clone(), approval);
        let again = load_demo(&accounts).await.unwrap();
        assert_eq!(again.created(), 0, "a second run creates nothing");
        assert_eq!(again.logins.len(), 7);
        assert_eq!(store.state.lock().unwrap().users.len(), 7);
    }

    #[tokio::test]
    async fn loads_once_under_auto_approval() {
        check_loads_once(Approval::Auto).await;
    }

    #[tokio::test]
    async fn loads_once_under_manual_approval() {
        check_loads_once(Approval::Manual).await;
    }

    #[tokio::test]
    async fn an_existing_account_is_left_alone() {
        let store = Arc::new(AccountsOnlyStore::default());
        let (accounts, _) = accounts(store.clone(), Approval::Auto);
        let reg = Registration {
            email: "pharmacy.e@demo.sanjevani.test".into(),
            password: "changed-password".into(),
            name: "Someone Else".into(),
            phone_number: "1".into(),
        };
        accounts.register_pharmacy(reg, "Renamed", LatLng::new(0.0, 0.0).unwrap()).await.unwrap();
        let report = load_demo(&accounts).await.unwrap();
        assert_eq!(report.created(), 6);
        let state = store.state.lock().unwrap();
        let e = state.pharmacies.iter().find(|p| p.name == "Renamed").unwrap();
        assert!(e.approved, "not suspended: the demo only sets approval on accounts it creates");
    }

    #[test]
    fn the_table_lists_every_login_and_the_console() {
        let report = DemoReport {
            logins: vec![
                DemoLogin {
                    email: "customer@demo.sanjevani.test".into(),
                    password: "demo-customer-1".into(),
                    role: Role::Customer,
                    pharmacy: None,
                    approved: None,
                    created: true,
                },
                DemoLogin {
                    email: "pharmacy.e@demo.sanjevani.test".into(),
                    password: "demo-pharmacy-e".into(),
                    role: Role::Pharmacy,
                    pharmacy: Some(("E".into(), "New Life Pharmacy".into())),
                    approved: Some(false),
                    created: false,
                },
            ],
        };
        let text = render_logins(&report, "http://127.0.0.1:8000/");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 5, "{text}");
        assert!(lines[1].contains("EMAIL") && lines[1].contains("PASSWORD") && lines[1].contains("ROLE"));
        assert!(lines[2].contains("customer@demo.sanjevani.test") && lines[2].contains("demo-customer-1"));
        assert!(lines[2].contains("CUSTOMER"));
        assert!(lines[3].contains("PHARMACY") && lines[3].contains("E  New Life Pharmacy (awaiting approval)"));
        assert_eq!(lines[1].find("ROLE"), lines[2].find("CUSTOMER"), "columns line up");
        assert_eq!(lines[4], "Console: http://127.0.0.1:8000/");
    }

    #[test]
    fn console_urls() {
        assert_eq!(console_url(None, "0.0.0.0:8000".parse().unwrap()), "http://127.0.0.1:8000/");
        assert_eq!(console_url(None, "[::]:8000".parse().unwrap()), "http://[::1]:8000/");
        assert_eq!(console_url(None, "10.1.2.3:80".parse().unwrap()), "http://10.1.2.3:80/");
        assert_eq!(console_url(Some("https://x.org"), "0.0.0.0:1".parse().unwrap()), "https://x.org/");
    }
}
