//! The outbound mail queue (`sanjevani::mail::Mailer`) against the in-test SMTP sink: delivery,
//! the retry after the mail server comes back, STARTTLS with an extra CA (and its refusal without
//! one), the bounded queue's 503 signal, and log-only mode. These drive the mailer directly, so
//! they hold whatever the HTTP layer later builds on top of it.

use crate::smtp_sink::SmtpSink;
use sanjevani::Config;
use sanjevani::mail::{Mail, Mailer, QUEUE_CAPACITY, QueueFull};
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const FROM: &str = "otp@sanjevani.test";

fn config(smtp_url: Option<String>) -> Config {
    Config { smtp_url, mail_from: format!("Sanjevani <{FROM}>"), ..Config::default() }
}

fn otp_mail(code: u32) -> Mail {
    Mail {
        to: "patient@example.com".into(),
        subject: "Your Sanjevani code".into(),
        body: format!("Your code is {code:06}. It expires in 10 minutes."),
    }
}

/// Polls `done` every 10 ms until it holds or `timeout` passes; whether it held.
async fn eventually(timeout: Duration, done: impl Fn() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    while !done() {
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    true
}

/// Collects what `tracing` writes on this thread while the returned guard lives (the tests run on
/// a current-thread runtime, so the mailer's tasks log here too).
fn capture_logs() -> (Arc<Mutex<Vec<u8>>>, tracing::subscriber::DefaultGuard) {
    #[derive(Clone)]
    struct Capture(Arc<Mutex<Vec<u8>>>);
    impl Write for Capture {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap_or_else(|p| p.into_inner()).extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let buffer = Arc::new(Mutex::new(Vec::new()));
    let writer = Capture(Arc::clone(&buffer));
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::DEBUG)
        .finish();
    (buffer, tracing::subscriber::set_default(subscriber))
}

fn logged(buffer: &Mutex<Vec<u8>>) -> String {
    String::from_utf8_lossy(&buffer.lock().unwrap_or_else(|p| p.into_inner())).into_owned()
}

#[tokio::test]
async fn message_reaches_a_plain_sink() {
    let sink = SmtpSink::start().await;
    let mailer = Mailer::start(&config(Some(sink.url()))).expect("mailer starts");
    assert!(!mailer.is_log_only());

    mailer.try_send(otp_mail(493_817)).expect("queued");
    let received = sink.wait_for(1, Duration::from_secs(5)).await;
    assert_eq!(received.len(), 1, "the message arrives");
    let message = &received[0];
    assert_eq!(message.from, FROM);
    assert_eq!(message.to, ["patient@example.com"]);
    assert!(!message.tls && message.auth.is_none());
    // The body is short ASCII, so lettre sends it as 7bit and it reads back verbatim.
    assert!(message.data.contains("\r\nTo: patient@example.com\r\n"), "{}", message.data);
    assert!(message.data.contains("\r\nSubject: Your Sanjevani code\r\n"), "{}", message.data);
    assert!(message.data.contains("Your code is 493817. It expires in 10 minutes."), "{}", message.data);

    mailer.flush(Duration::from_secs(5)).await;
    let stats = mailer.stats();
    assert_eq!((stats.sent, stats.failed, stats.retried, stats.queued), (1, 0, 0, 0));
}

#[tokio::test]
async fn message_queued_while_the_server_is_down_arrives_on_a_retry() {
    let sink = SmtpSink::start().await;
    sink.stop().await;
    let mailer = Mailer::start(&config(Some(sink.url()))).expect("mailer starts");

    // Default schedule: tries at 0 s and 1 s fail, the one at 3 s finds the server back.
    mailer.try_send(otp_mail(111_222)).expect("queued");
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert!(sink.messages().is_empty());
    // Normally 2 (the first try and the 1 s retry); at least 1 even on a badly loaded machine.
    assert!(mailer.stats().retried >= 1, "the first try failed and a retry is scheduled");
    assert_eq!(mailer.stats().queued, 1, "a message waiting for its retry keeps its slot");

    sink.start_again().await;
    let received = sink.wait_for(1, Duration::from_secs(5)).await;
    assert_eq!(received.len(), 1, "the retry delivers it");
    assert!(received[0].data.contains("Your code is 111222."));
    mailer.flush(Duration::from_secs(2)).await;
    let stats = mailer.stats();
    assert_eq!((stats.sent, stats.failed, stats.queued), (1, 0, 0));
    assert!((1..=2).contains(&stats.retried), "{stats:?}");
}

#[tokio::test]
async fn starttls_with_the_extra_ca_delivers_and_sends_the_decoded_credentials() {
    let sink = SmtpSink::start_tls().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let ca = dir.path().join("sink-ca.pem");
    std::fs::write(&ca, sink.cert_pem().expect("TLS sink has a certificate")).expect("write CA");
    let url = format!("smtp://otp%40sanjevani.test:p%40ss%3Aw0rd@localhost:{}?tls=required", sink.port());
    let config = Config { smtp_ca: Some(ca), ..config(Some(url)) };
    let mailer = Mailer::start_with_schedule(&config, &[Duration::from_millis(50)]).expect("mailer starts");

    mailer.try_send(otp_mail(654_321)).expect("queued");
    let received = sink.wait_for(1, Duration::from_secs(5)).await;
    assert_eq!(received.len(), 1, "the message arrives over TLS");
    assert!(received[0].tls, "sent after STARTTLS");
    assert_eq!(received[0].auth, Some(("otp@sanjevani.test".into(), "p@ss:w0rd".into())));
    assert!(received[0].data.contains("Your code is 654321."));
    mailer.flush(Duration::from_secs(2)).await;
    assert_eq!(mailer.stats().sent, 1);
}

#[tokio::test]
async fn starttls_without_the_ca_fails_verification_retries_then_drops_and_logs_no_password() {
    let (logs, _guard) = capture_logs();
    let sink = SmtpSink::start_tls().await;
    let url = format!("smtp://otp:hunter2secret@localhost:{}?tls=required", sink.port());
    let schedule = [Duration::from_millis(20), Duration::from_millis(20)];
    let mailer = Mailer::start_with_schedule(&config(Some(url)), &schedule).expect("mailer starts");

    mailer.try_send(otp_mail(1)).expect("queued");
    assert!(eventually(Duration::from_secs(5), || mailer.stats().failed == 1).await, "{:?}", mailer.stats());
    let stats = mailer.stats();
    assert_eq!((stats.sent, stats.retried, stats.queued), (0, 2, 0));
    assert!(sink.messages().is_empty(), "nothing crosses an unverified connection");

    let logs = logged(&logs);
    assert!(logs.contains(&format!("smtp://localhost:{}?tls=required", sink.port())), "{logs}");
    assert!(logs.contains("mail dropped after 3 attempts"), "{logs}");
    assert!(logs.contains("invalid peer certificate"), "it failed verification: {logs}");
    assert!(!logs.contains("hunter2secret"), "the password leaked into the logs:\n{logs}");
}

#[tokio::test]
async fn full_queue_refuses_with_queue_full() {
    let sink = SmtpSink::start().await;
    sink.stop().await;
    let mailer = Mailer::start(&config(Some(sink.url()))).expect("mailer starts");

    // No await in between: on this current-thread runtime nothing is delivered meanwhile, and with
    // the server down nothing could be anyway; every message waits for a retry.
    for code in 0..QUEUE_CAPACITY {
        mailer.try_send(otp_mail(code as u32)).expect("room in the queue");
    }
    assert_eq!(mailer.try_send(otp_mail(7)), Err(QueueFull));
    assert_eq!(mailer.stats().queued, QUEUE_CAPACITY as u64);

    // Messages waiting for a retry still count.
    assert!(eventually(Duration::from_secs(5), || mailer.stats().retried >= 1).await);
    assert_eq!(mailer.try_send(otp_mail(8)), Err(QueueFull));
}

#[tokio::test]
async fn log_only_mode_logs_the_code_and_sends_nothing() {
    let (logs, _guard) = capture_logs();
    let mailer = Mailer::start(&config(None)).expect("mailer starts");
    assert!(mailer.is_log_only());

    mailer.try_send(otp_mail(908_172)).expect("logged");
    mailer.flush(Duration::from_secs(1)).await;
    let stats = mailer.stats();
    assert_eq!((stats.sent, stats.failed, stats.retried, stats.queued), (0, 0, 0, 0));
    let logs = logged(&logs);
    assert!(logs.contains("WARN") && logs.contains("Your code is 908172."), "{logs}");
}
