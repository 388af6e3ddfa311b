//! Outbound mail (the OTP codes of `/send-otp`). A request handler never talks SMTP: it calls
//! `Mailer::try_send`, which only takes a slot in a bounded queue (1,000 messages) and returns at
//! once, or answers `QueueFull` so the HTTP layer can say 503 instead of growing memory or making
//! the client wait on a slow mail server. A delivery task hands each message to lettre's pooled
//! async SMTP transport, a few at a time; a failed send sleeps in its own task until its next try
//! (1, 2, 4, 8, 16 s), so a message waiting for a retry holds its queue slot but never holds up the
//! others. With no `--smtp-url` the mailer is log-only: every message, OTP included, is logged
//! with a warning, which is how a developer sees the code.

use crate::Config;
use lettre::message::header::ContentType;
use lettre::message::{Mailbox, Message};
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
use lettre::transport::smtp::extension::ClientId;
use lettre::transport::smtp::{AsyncSmtpTransport, PoolConfig};
use lettre::{AsyncTransport, Tokio1Executor};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc};

/// How many messages the queue holds, counting those waiting for a retry.
pub const QUEUE_CAPACITY: usize = 1_000;

/// Waits before each retry of a failed send: 5 retries, then the message is dropped.
pub const RETRY_SCHEDULE: [Duration; 5] = [
    Duration::from_secs(1),
    Duration::from_secs(2),
    Duration::from_secs(4),
    Duration::from_secs(8),
    Duration::from_secs(16),
];

/// Sends in flight at once; also the SMTP connection pool's size.
const CONCURRENT_SENDS: usize = 4;

/// Limit on each SMTP connect and command, so a hung server frees its send slot.
const SMTP_TIMEOUT: Duration = Duration::from_secs(30);

/// One plain-text message to one recipient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mail {
    /// Recipient address (`user@example.com` or `Name <user@example.com>`).
    pub to: String,
    /// Subject line.
    pub subject: String,
    /// Plain-text body.
    pub body: String,
}

/// The queue already holds `QUEUE_CAPACITY` messages; the HTTP layer answers 503.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the mail queue is full ({QUEUE_CAPACITY} messages)")]
pub struct QueueFull;

/// Why the mailer could not start: an unusable setting. Messages never contain a password.
#[derive(Debug, thiserror::Error)]
pub enum MailError {
    /// `--smtp-url` is malformed or uses an unknown form.
    #[error("--smtp-url: {0}")]
    Url(String),
    /// `--smtp-ca` could not be read or holds no usable certificate.
    #[error("--smtp-ca {path}: {reason}")]
    Ca {
        /// The file named by `--smtp-ca`.
        path: String,
        /// What is wrong with it.
        reason: String,
    },
    /// `--mail-from` is not a mailbox.
    #[error("--mail-from {value:?}: {reason}")]
    From {
        /// The value given.
        value: String,
        /// Why it does not parse.
        reason: String,
    },
    /// The TLS settings could not be built.
    #[error("smtp tls: {0}")]
    Tls(String),
    /// `Mailer::start` was called outside a tokio runtime.
    #[error("the mailer must be started inside a tokio runtime")]
    NoRuntime,
}

/// A snapshot of the mailer's counters, for `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MailStats {
    /// Messages the SMTP server accepted.
    pub sent: u64,
    /// Messages dropped undelivered (after the last retry, or refused permanently).
    pub failed: u64,
    /// Retries scheduled after a failed send.
    pub retried: u64,
    /// Messages in the queue now, in flight or waiting for a retry.
    pub queued: u64,
}

/// How the connection to the SMTP server is secured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Security {
    /// `smtp://` without `tls`: plain text, for a local relay or a test sink.
    Plain,
    /// `smtp://…?tls=opportunistic`: STARTTLS when offered, else plain.
    Opportunistic,
    /// `smtp://…?tls=required`: STARTTLS or no delivery.
    Required,
    /// `smtps://`: TLS from the first byte.
    Implicit,
}

/// `--smtp-url`, parsed and checked.
#[derive(Clone, PartialEq, Eq)]
struct Endpoint {
    /// Host name or IP address (IPv6 without brackets), also the name the certificate must carry.
    host: String,
    port: u16,
    security: Security,
    /// User and password, percent-decoded.
    credentials: Option<(String, String)>,
    /// The URL's path, if any: the name sent in EHLO (as lettre's own URL form does).
    hello_name: Option<String>,
}

impl Endpoint {
    /// Parses `smtp://[user:pass@]host[:port][?tls=required|opportunistic]` or
    /// `smtps://[user:pass@]host[:port]`.
    fn parse(raw: &str) -> Result<Endpoint, MailError> {
        let bad = |why: String| MailError::Url(why);
        // `url::ParseError` never echoes its input, so a password cannot leak through it.
        let url = url::Url::parse(raw.trim()).map_err(|e| bad(format!("not a URL ({e})")))?;
        let mut tls = None;
        for (key, value) in url.query_pairs() {
            match key.as_ref() {
                "tls" if tls.is_none() => tls = Some(value.into_owned()),
                "tls" => return Err(bad("`tls` is given twice".into())),
                other => return Err(bad(format!("unknown parameter `{other}` (only `tls` is understood)"))),
            }
        }
        let security = match (url.scheme(), tls.as_deref()) {
            ("smtp", None) => Security::Plain,
            ("smtp", Some("required")) => Security::Required,
            ("smtp", Some("opportunistic")) => Security::Opportunistic,
            ("smtp", Some(other)) => {
                return Err(bad(format!("tls={other:?} is not understood (use `required` or `opportunistic`)")));
            }
            ("smtps", None) => Security::Implicit,
            ("smtps", Some(_)) => return Err(bad("smtps:// is always TLS; drop the `tls` parameter".into())),
            (other, _) => return Err(bad(format!("scheme `{other}` is not smtp or smtps"))),
        };
        let host = match url.host() {
            Some(url::Host::Domain(name)) if !name.is_empty() => name.to_owned(),
            Some(url::Host::Ipv4(ip)) => ip.to_string(),
            Some(url::Host::Ipv6(ip)) => ip.to_string(),
            _ => return Err(bad("no host".into())),
        };
        let port = url.port().unwrap_or(match security {
            Security::Plain => 25,
            Security::Opportunistic | Security::Required => 587,
            Security::Implicit => 465,
        });
        let decode = |s: &str, what: &str| {
            percent_encoding::percent_decode_str(s)
                .decode_utf8()
                .map(|s| s.into_owned())
                .map_err(|_| bad(format!("the {what} is not UTF-8 once percent-decoded")))
        };
        let user = decode(url.username(), "user name")?;
        let password = decode(url.password().unwrap_or(""), "password")?;
        let credentials = if user.is_empty() && password.is_empty() {
            None
        } else if user.is_empty() {
            return Err(bad("a password without a user name".into()));
        } else {
            Some((user, password))
        };
        let path = url.path().trim_matches('/');
        let hello_name = if path.is_empty() { None } else { Some(decode(path, "EHLO name")?) };
        Ok(Endpoint { host, port, security, credentials, hello_name })
    }

    /// Whether the host is this machine, where plain text does not cross a network.
    fn is_loopback(&self) -> bool {
        self.host.eq_ignore_ascii_case("localhost")
            || self.host.parse::<std::net::IpAddr>().map(|ip| ip.is_loopback()).unwrap_or(false)
    }
}

/// The URL without its user info: safe to log.
impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.security == Security::Implicit { "smtps" } else { "smtp" };
        if self.host.contains(':') {
            write!(f, "{scheme}://[{}]:{}", self.host, self.port)?;
        } else {
            write!(f, "{scheme}://{}:{}", self.host, self.port)?;
        }
        match self.security {
            Security::Required => f.write_str("?tls=required"),
            Security::Opportunistic => f.write_str("?tls=opportunistic"),
            Security::Plain | Security::Implicit => Ok(()),
        }
    }
}

/// Never prints the password.
impl fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let user = self.credentials.as_ref().map(|(user, _)| user.as_str());
        f.debug_struct("Endpoint").field("url", &self.to_string()).field("user", &user).finish()
    }
}

/// Reads `--smtp-ca`: one or more PEM certificates, trusted in addition to the built-in roots.
fn load_ca(path: &Path) -> Result<Certificate, MailError> {
    let ca_error = |reason: String| MailError::Ca { path: path.display().to_string(), reason };
    let pem = std::fs::read(path).map_err(|e| ca_error(e.to_string()))?;
    // lettre skips whatever is not a certificate, so check there is at least one ourselves.
    let count = CertificateDer::pem_slice_iter(&pem)
        .try_fold(0usize, |n, cert| cert.map(|_| n + 1))
        .map_err(|e| ca_error(format!("not PEM ({e})")))?;
    if count == 0 {
        return Err(ca_error("no CERTIFICATE block".into()));
    }
    Certificate::from_pem(&pem).map_err(|e| ca_error(e.to_string()))
}

/// Builds the lettre transport for `endpoint`, trusting `ca` as an extra root.
fn build_transport(
    endpoint: &Endpoint,
    ca: Option<&Certificate>,
) -> Result<AsyncSmtpTransport<Tokio1Executor>, MailError> {
    let tls_parameters = || {
        let mut builder = TlsParameters::builder(endpoint.host.clone());
        if let Some(ca) = ca {
            builder = builder.add_root_certificate(ca.clone());
        }
        builder.build().map_err(|e| MailError::Tls(e.to_string()))
    };
    let tls = match endpoint.security {
        Security::Plain => Tls::None,
        Security::Opportunistic => Tls::Opportunistic(tls_parameters()?),
        Security::Required => Tls::Required(tls_parameters()?),
        Security::Implicit => Tls::Wrapper(tls_parameters()?),
    };
    let mut builder = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(endpoint.host.as_str())
        .port(endpoint.port)
        .tls(tls)
        .timeout(Some(SMTP_TIMEOUT))
        .pool_config(PoolConfig::new().max_size(CONCURRENT_SENDS as u32));
    if let Some((user, password)) = &endpoint.credentials {
        builder = builder.credentials(Credentials::new(user.clone(), password.clone()));
    }
    if let Some(name) = &endpoint.hello_name {
        builder = builder.hello_name(ClientId::Domain(name.clone()));
    }
    Ok(builder.build())
}

/// Counters and the queue's bound, shared by the handles and the delivery tasks.
struct Shared {
    sent: AtomicU64,
    failed: AtomicU64,
    retried: AtomicU64,
    /// One permit per free queue slot.
    slots: Arc<Semaphore>,
    /// Signalled whenever a message leaves the queue, for `flush`.
    left_queue: Notify,
}

impl Shared {
    fn queued(&self) -> usize {
        QUEUE_CAPACITY.saturating_sub(self.slots.available_permits())
    }
}

/// A message's place in the queue, held from `try_send` until it is sent or dropped.
struct QueueSlot {
    permit: Option<OwnedSemaphorePermit>,
    shared: Arc<Shared>,
}

impl Drop for QueueSlot {
    fn drop(&mut self) {
        drop(self.permit.take());
        self.shared.left_queue.notify_waiters();
    }
}

/// A queued message, ready to go on the wire.
struct Job {
    envelope: lettre::address::Envelope,
    raw: Vec<u8>,
    /// For logs: the recipient (never the body in SMTP mode).
    to: String,
    _slot: QueueSlot,
}

enum Mode {
    LogOnly,
    Smtp { queue: mpsc::UnboundedSender<Job>, endpoint: Endpoint },
}

struct Inner {
    mode: Mode,
    from: Mailbox,
    shared: Arc<Shared>,
}

/// Handle to the outbound mail queue; cheap to clone into every handler.
#[derive(Clone)]
pub struct Mailer {
    inner: Arc<Inner>,
}

impl fmt::Debug for Mailer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let endpoint = match &self.inner.mode {
            Mode::LogOnly => "log-only".to_owned(),
            Mode::Smtp { endpoint, .. } => endpoint.to_string(),
        };
        f.debug_struct("Mailer").field("endpoint", &endpoint).field("stats", &self.stats()).finish()
    }
}

impl Mailer {
    /// Checks `--smtp-url`, `--smtp-ca` and `--mail-from`, and starts the delivery task. Must be
    /// called inside a tokio runtime. Retries follow `RETRY_SCHEDULE`.
    pub fn start(config: &Config) -> Result<Mailer, MailError> {
        Mailer::start_with_schedule(config, &RETRY_SCHEDULE)
    }

    /// `start` with another retry schedule (one wait per retry), so tests need not wait 31 s.
    pub fn start_with_schedule(config: &Config, retry_schedule: &[Duration]) -> Result<Mailer, MailError> {
        let from: Mailbox = config.mail_from.parse().map_err(|e: lettre::address::AddressError| MailError::From {
            value: config.mail_from.clone(),
            reason: e.to_string(),
        })?;
        let endpoint = config.smtp_url.as_deref().map(Endpoint::parse).transpose()?;
        let ca = config.smtp_ca.as_deref().map(load_ca).transpose()?;
        let shared = Arc::new(Shared {
            sent: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            retried: AtomicU64::new(0),
            slots: Arc::new(Semaphore::new(QUEUE_CAPACITY)),
            left_queue: Notify::new(),
        });
        let Some(endpoint) = endpoint else {
            if config.smtp_ca.is_some() {
                tracing::warn!("mail: --smtp-ca is ignored without --smtp-url");
            }
            tracing::warn!("mail: no --smtp-url, so nothing is sent: every message, OTP codes included, is logged");
            return Ok(Mailer { inner: Arc::new(Inner { mode: Mode::LogOnly, from, shared }) });
        };
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| MailError::NoRuntime)?;
        if ca.is_some() && endpoint.security == Security::Plain {
            tracing::warn!("mail: --smtp-ca is ignored: {endpoint} does not use TLS");
        }
        if endpoint.credentials.is_some() && endpoint.security == Security::Plain && !endpoint.is_loopback() {
            tracing::warn!("mail: {endpoint} sends the SMTP password unencrypted; consider ?tls=required or smtps://");
        }
        // The pool spawns its reaper on the current runtime, so build inside it.
        let transport = {
            let _guard = runtime.enter();
            build_transport(&endpoint, ca.as_ref())?
        };
        let (queue, jobs) = mpsc::unbounded_channel();
        let delivery = Delivery {
            transport,
            shared: Arc::clone(&shared),
            retry_schedule: retry_schedule.into(),
            send_slots: Arc::new(Semaphore::new(CONCURRENT_SENDS)),
        };
        runtime.spawn(delivery.run(jobs));
        tracing::info!("mail: delivering through {endpoint}");
        Ok(Mailer { inner: Arc::new(Inner { mode: Mode::Smtp { queue, endpoint }, from, shared }) })
    }

    /// Queues `mail` without blocking. `Err(QueueFull)` when `QUEUE_CAPACITY` messages are already
    /// queued or waiting for a retry. A recipient that is not an address is logged and dropped
    /// (counted as failed): validate addresses before calling.
    pub fn try_send(&self, mail: Mail) -> Result<(), QueueFull> {
        let inner = &*self.inner;
        let queue = match &inner.mode {
            Mode::LogOnly => {
                tracing::warn!(to = %mail.to, subject = %mail.subject, body = %mail.body, "mail not sent (log-only mode)");
                return Ok(());
            }
            Mode::Smtp { queue, .. } => queue,
        };
        let permit = Arc::clone(&inner.shared.slots).try_acquire_owned().map_err(|_| QueueFull)?;
        let slot = QueueSlot { permit: Some(permit), shared: Arc::clone(&inner.shared) };
        let message = match build_message(&inner.from, &mail) {
            Ok(message) => message,
            Err(reason) => {
                inner.shared.failed.fetch_add(1, Ordering::Relaxed);
                tracing::error!(to = %mail.to, "mail dropped: {reason}");
                return Ok(());
            }
        };
        let job = Job { envelope: message.envelope().clone(), raw: message.formatted(), to: mail.to, _slot: slot };
        queue.send(job).map_err(|_| {
            // Only once the runtime is shutting down; the slot comes back with the dropped job.
            tracing::error!("mail: the delivery task has stopped");
            QueueFull
        })
    }

    /// Whether no `--smtp-url` was given, so messages are logged instead of sent.
    pub fn is_log_only(&self) -> bool {
        matches!(self.inner.mode, Mode::LogOnly)
    }

    /// The counters now.
    pub fn stats(&self) -> MailStats {
        let shared = &self.inner.shared;
        MailStats {
            sent: shared.sent.load(Ordering::Relaxed),
            failed: shared.failed.load(Ordering::Relaxed),
            retried: shared.retried.load(Ordering::Relaxed),
            queued: shared.queued() as u64,
        }
    }

    /// On shutdown: waits up to `within` for the queue to empty (best effort; a message waiting
    /// for a late retry may be left behind, and is logged).
    pub async fn flush(&self, within: Duration) {
        let shared = &self.inner.shared;
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let left = shared.left_queue.notified();
            tokio::pin!(left);
            // Register before looking, so a message leaving in between still wakes us.
            left.as_mut().enable();
            let queued = shared.queued();
            if queued == 0 {
                return;
            }
            if tokio::time::timeout_at(deadline, left).await.is_err() {
                tracing::warn!("mail: {queued} message(s) still queued at shutdown are lost");
                return;
            }
        }
    }
}

/// Turns `mail` into a lettre message from `from`; the reason when an address does not parse.
fn build_message(from: &Mailbox, mail: &Mail) -> Result<Message, String> {
    let to: Mailbox = mail.to.parse().map_err(|e| format!("recipient is not an address: {e}"))?;
    Message::builder()
        .from(from.clone())
        .to(to)
        .subject(mail.subject.as_str())
        .header(ContentType::TEXT_PLAIN)
        .body(mail.body.clone())
        .map_err(|e| format!("cannot build the message: {e}"))
}

/// The delivery side: takes jobs off the queue and gives each its own task.
struct Delivery {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    shared: Arc<Shared>,
    retry_schedule: Arc<[Duration]>,
    /// Caps sends in flight; a message sleeping before a retry holds none.
    send_slots: Arc<Semaphore>,
}

impl Delivery {
    /// Runs until every `Mailer` handle is gone and the queue is empty.
    async fn run(self, mut jobs: mpsc::UnboundedReceiver<Job>) {
        let this = Arc::new(self);
        while let Some(job) = jobs.recv().await {
            tokio::spawn(Arc::clone(&this).deliver(job));
        }
    }

    /// Sends `job`, retrying after each wait of the schedule; then it leaves the queue.
    async fn deliver(self: Arc<Self>, job: Job) {
        let attempts = self.retry_schedule.len() + 1;
        for attempt in 1..=attempts {
            let result = {
                // The semaphore is never closed, so acquiring cannot fail; if it ever did, send anyway.
                let _sending = self.send_slots.acquire().await.ok();
                self.transport.send_raw(&job.envelope, &job.raw).await
            };
            let error = match result {
                Ok(_) => {
                    self.shared.sent.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(to = %job.to, attempt, "mail sent");
                    return;
                }
                Err(error) => error,
            };
            if error.is_permanent() {
                // A 5xx answer (unknown user, refused sender) will not change on retry.
                self.shared.failed.fetch_add(1, Ordering::Relaxed);
                tracing::error!(to = %job.to, attempt, "mail dropped, refused by the server: {error}");
                return;
            }
            let Some(wait) = self.retry_schedule.get(attempt - 1).copied() else {
                self.shared.failed.fetch_add(1, Ordering::Relaxed);
                tracing::error!(to = %job.to, attempts, "mail dropped after {attempts} attempts: {error}");
                return;
            };
            self.shared.retried.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(to = %job.to, attempt, "mail not sent, retrying in {wait:?}: {error}");
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(url: &str) -> Endpoint {
        Endpoint::parse(url).expect("valid URL")
    }

    #[test]
    fn plain_url_defaults_to_port_25() {
        let e = parse("smtp://127.0.0.1");
        assert_eq!((e.host.as_str(), e.port, e.security, e.credentials), ("127.0.0.1", 25, Security::Plain, None));
        assert_eq!(parse("smtp://127.0.0.1:2525").port, 2525);
    }

    #[test]
    fn starttls_url_decodes_credentials_and_defaults_to_587() {
        let e = parse("smtp://us%40er:p%3Ass%2Fw@mail.example.com?tls=required");
        assert_eq!(e.security, Security::Required);
        assert_eq!(e.port, 587);
        assert_eq!(e.credentials, Some(("us@er".into(), "p:ss/w".into())));
        assert_eq!(parse("smtp://h:26?tls=opportunistic").security, Security::Opportunistic);
    }

    #[test]
    fn smtps_url_is_implicit_tls_on_465() {
        let e = parse("smtps://user:pass@smtp.gmail.com");
        assert_eq!((e.security, e.port), (Security::Implicit, 465));
        assert_eq!(parse("smtps://[::1]:4650").host, "::1");
    }

    #[test]
    fn path_becomes_the_ehlo_name() {
        assert_eq!(parse("smtp://h/client.example").hello_name.as_deref(), Some("client.example"));
    }

    #[test]
    fn bad_urls_are_refused_with_a_reason() {
        for url in [
            "http://h",
            "smtp://h?tls=maybe",
            "smtps://h?tls=required",
            "smtp://h?tsl=required",
            "smtp://:secret@h",
            "smtp://",
            "not a url",
        ] {
            let error = Endpoint::parse(url).expect_err(url).to_string();
            assert!(error.starts_with("--smtp-url: "), "{url}: {error}");
        }
    }

    #[test]
    fn display_and_debug_hide_the_password() {
        let e = parse("smtp://user:hunter2@h:587?tls=required");
        assert_eq!(e.to_string(), "smtp://h:587?tls=required");
        assert!(!format!("{e:?}").contains("hunter2"));
        assert_eq!(parse("smtps://u:p@[::1]").to_string(), "smtps://[::1]:465");
        let error = Endpoint::parse("smtp://user:hunter2@h?tls=bogus").expect_err("bad").to_string();
        assert!(!error.contains("hunter2"), "{error}");
    }

    #[test]
    fn ca_file_without_a_certificate_is_refused() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("ca.pem");
        std::fs::write(&path, "not a certificate\n").expect("write");
        let error = load_ca(&path).expect_err("no cert").to_string();
        assert!(error.contains("no CERTIFICATE"), "{error}");
        let error = load_ca(&dir.path().join("missing.pem")).expect_err("missing").to_string();
        assert!(error.starts_with("--smtp-ca "), "{error}");
    }

    #[test]
    fn bad_mail_from_is_refused() {
        let config = Config { mail_from: "not an address".into(), ..Config::default() };
        assert!(matches!(Mailer::start(&config), Err(MailError::From { .. })));
    }

    #[tokio::test]
    async fn log_only_mode_accepts_everything_and_queues_nothing() {
        let mailer = Mailer::start(&Config::default()).expect("log-only");
        assert!(mailer.is_log_only());
        for _ in 0..(QUEUE_CAPACITY + 10) {
            mailer.try_send(Mail { to: "a@b.c".into(), subject: "s".into(), body: "123456".into() }).expect("logged");
        }
        assert_eq!(mailer.stats(), MailStats::default());
        mailer.flush(Duration::from_millis(10)).await;
    }
}
