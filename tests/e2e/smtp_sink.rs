//! A small SMTP server for tests, on 127.0.0.1 port 0: it speaks just enough SMTP for lettre
//! (EHLO, optional STARTTLS with a self-signed certificate for `localhost`, AUTH PLAIN/LOGIN, MAIL,
//! RCPT, DATA, RSET, NOOP, QUIT) and records every message so a test can read what was sent.
//! It can be stopped and started again on the same port, so a test can show a retry; stopping also
//! drops open connections, as a restarted mail server would.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::Notify;
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

/// One message as the sink received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    /// The `MAIL FROM` address (without angle brackets).
    pub from: String,
    /// The `RCPT TO` addresses.
    pub to: Vec<String>,
    /// The DATA section, dot-unstuffed, lines ending in CRLF, without the final `.` line.
    pub data: String,
    /// User and password given with AUTH, if any.
    pub auth: Option<(String, String)>,
    /// Whether the message came over STARTTLS.
    pub tls: bool,
}

/// What every connection of the sink shares.
#[derive(Default)]
struct Shared {
    messages: Mutex<Vec<Received>>,
    arrived: Notify,
}

impl Shared {
    fn messages(&self) -> MutexGuard<'_, Vec<Received>> {
        self.messages.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The running sink; dropping it stops it.
pub struct SmtpSink {
    addr: SocketAddr,
    tls: Option<TlsAcceptor>,
    cert_pem: Option<String>,
    shared: Arc<Shared>,
    server: Mutex<Option<JoinHandle<()>>>,
}

impl SmtpSink {
    /// A plain-text sink (no STARTTLS).
    pub async fn start() -> SmtpSink {
        SmtpSink::launch(None, None).await
    }

    /// A sink that offers STARTTLS with a fresh self-signed certificate for `localhost` and
    /// `127.0.0.1`; `cert_pem()` gives that certificate, to trust it as a CA.
    pub async fn start_tls() -> SmtpSink {
        let names = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
        let certified = rcgen::generate_simple_self_signed(names).expect("self-signed certificate");
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(certified.signing_key.serialize_der()));
        let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
        let config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_no_client_auth()
            .with_single_cert(vec![certified.cert.der().clone()], key)
            .expect("TLS server config");
        let acceptor = TlsAcceptor::from(Arc::new(config));
        SmtpSink::launch(Some(acceptor), Some(certified.cert.pem())).await
    }

    async fn launch(tls: Option<TlsAcceptor>, cert_pem: Option<String>) -> SmtpSink {
        let listener = bind(SocketAddr::from(([127, 0, 0, 1], 0)));
        let addr = listener.local_addr().expect("sink address");
        let sink = SmtpSink { addr, tls, cert_pem, shared: Arc::default(), server: Mutex::new(None) };
        sink.serve(listener);
        sink
    }

    fn serve(&self, listener: TcpListener) {
        let task = tokio::spawn(accept_loop(listener, self.tls.clone(), Arc::clone(&self.shared)));
        if let Some(old) = self.server().replace(task) {
            old.abort();
        }
    }

    fn server(&self) -> MutexGuard<'_, Option<JoinHandle<()>>> {
        self.server.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Its port.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// `smtp://127.0.0.1:PORT`, for `--smtp-url`.
    pub fn url(&self) -> String {
        format!("smtp://{}", self.addr)
    }

    /// The self-signed certificate (PEM) of a `start_tls` sink, to write to an `--smtp-ca` file.
    pub fn cert_pem(&self) -> Option<&str> {
        self.cert_pem.as_deref()
    }

    /// Every message received so far, oldest first (kept across `stop`/`start_again`).
    pub fn messages(&self) -> Vec<Received> {
        self.shared.messages().clone()
    }

    /// Waits until at least `n` messages have arrived or `timeout` has passed, then returns all
    /// received so far (fewer than `n` on timeout: assert on the length).
    pub async fn wait_for(&self, n: usize, timeout: Duration) -> Vec<Received> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let arrived = self.shared.arrived.notified();
            tokio::pin!(arrived);
            arrived.as_mut().enable();
            let messages = self.messages();
            if messages.len() >= n || tokio::time::timeout_at(deadline, arrived).await.is_err() {
                return self.messages();
            }
        }
    }

    /// Stops listening and drops every open connection (received messages are kept); until
    /// `start_again`, connections to its port are refused.
    pub async fn stop(&self) {
        let task = self.server().take();
        if let Some(task) = task {
            task.abort();
            // Wait until the listener is closed, so connections are refused from now on.
            let _ = task.await;
        }
    }

    /// Listens again on the same port, after `stop`.
    pub async fn start_again(&self) {
        self.stop().await;
        self.serve(bind(self.addr));
    }
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        if let Some(task) = self.server().take() {
            task.abort();
        }
    }
}

/// Binds `addr` with SO_REUSEADDR, so a stopped sink can listen on its port again at once.
fn bind(addr: SocketAddr) -> TcpListener {
    let socket = TcpSocket::new_v4().expect("socket");
    socket.set_reuseaddr(true).expect("SO_REUSEADDR");
    socket.bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
    socket.listen(64).expect("listen")
}

/// Accepts connections until aborted; aborting drops the `JoinSet`, which aborts every session.
async fn accept_loop(listener: TcpListener, tls: Option<TlsAcceptor>, shared: Arc<Shared>) {
    let mut sessions = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                sessions.spawn(session(stream, tls.clone(), Arc::clone(&shared)));
            }
            Some(_) = sessions.join_next() => {}
        }
    }
}

/// Any stream the sink talks over: TCP, then TLS after STARTTLS.
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// One client connection, upgraded in place when it asks for STARTTLS.
async fn session(stream: TcpStream, tls: Option<TlsAcceptor>, shared: Arc<Shared>) {
    let mut conn = Conn { io: BufReader::new(Box::new(stream)), tls: tls.clone(), secure: false };
    if conn.reply("220 sink ESMTP ready").await.is_err() {
        return;
    }
    loop {
        match conn.dialogue(&shared).await {
            Ok(After::Quit) | Err(_) => return,
            Ok(After::StartTls) => {
                let Some(acceptor) = conn.tls.clone() else { return };
                // The client waits for our 220 before its handshake, so nothing is buffered.
                let raw = std::mem::replace(&mut conn.io, BufReader::new(Box::new(tokio::io::duplex(1).0)));
                match acceptor.accept(raw.into_inner()).await {
                    Ok(secured) => {
                        conn.io = BufReader::new(Box::new(secured));
                        conn.secure = true;
                    }
                    Err(_) => return,
                }
            }
        }
    }
}

/// How a dialogue ended.
enum After {
    Quit,
    StartTls,
}

struct Conn {
    io: BufReader<Box<dyn Io>>,
    tls: Option<TlsAcceptor>,
    secure: bool,
}

impl Conn {
    async fn reply(&mut self, line: &str) -> std::io::Result<()> {
        let io = self.io.get_mut();
        io.write_all(line.as_bytes()).await?;
        io.write_all(b"\r\n").await?;
        io.flush().await
    }

    /// One line without its CRLF; `None` at end of stream.
    async fn line(&mut self) -> std::io::Result<Option<String>> {
        let mut buf = Vec::new();
        if self.io.read_until(b'\n', &mut buf).await? == 0 {
            return Ok(None);
        }
        while buf.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
            buf.pop();
        }
        Ok(Some(String::from_utf8_lossy(&buf).into_owned()))
    }

    /// Commands until QUIT, end of stream or STARTTLS. The envelope and AUTH start afresh.
    async fn dialogue(&mut self, shared: &Shared) -> std::io::Result<After> {
        let mut from: Option<String> = None;
        let mut to: Vec<String> = Vec::new();
        let mut auth: Option<(String, String)> = None;
        while let Some(line) = self.line().await? {
            let (verb, arg) = line.split_once(' ').unwrap_or((line.as_str(), ""));
            match verb.to_ascii_uppercase().as_str() {
                "EHLO" => {
                    let mut lines = vec!["250-sink greets you", "250-8BITMIME", "250-AUTH PLAIN LOGIN"];
                    if self.tls.is_some() && !self.secure {
                        lines.push("250-STARTTLS");
                    }
                    lines.push("250 SMTPUTF8");
                    self.reply(&lines.join("\r\n")).await?;
                }
                "HELO" => self.reply("250 sink").await?,
                "STARTTLS" if self.tls.is_some() && !self.secure => {
                    self.reply("220 2.0.0 ready to start TLS").await?;
                    return Ok(After::StartTls);
                }
                "AUTH" => match self.authenticate(arg).await? {
                    Some(credentials) => {
                        auth = Some(credentials);
                        self.reply("235 2.7.0 authenticated").await?;
                    }
                    None => self.reply("535 5.7.8 bad credentials encoding").await?,
                },
                "MAIL" => {
                    from = Some(angle_address(arg));
                    to.clear();
                    self.reply("250 2.1.0 ok").await?;
                }
                "RCPT" if from.is_some() => {
                    to.push(angle_address(arg));
                    self.reply("250 2.1.5 ok").await?;
                }
                "DATA" if from.is_some() && !to.is_empty() => {
                    self.reply("354 end data with <CR><LF>.<CR><LF>").await?;
                    let mut data = String::new();
                    loop {
                        let Some(line) = self.line().await? else { return Ok(After::Quit) };
                        if line == "." {
                            break;
                        }
                        data.push_str(line.strip_prefix('.').unwrap_or(&line));
                        data.push_str("\r\n");
                    }
                    let message = Received {
                        from: from.take().unwrap_or_default(),
                        to: std::mem::take(&mut to),
                        data,
                        auth: auth.clone(),
                        tls: self.secure,
                    };
                    shared.messages().push(message);
                    shared.arrived.notify_waiters();
                    self.reply("250 2.0.0 queued").await?;
                }
                "RCPT" | "DATA" => self.reply("503 5.5.1 bad sequence of commands").await?,
                "RSET" => {
                    from = None;
                    to.clear();
                    self.reply("250 2.0.0 ok").await?;
                }
                "NOOP" => self.reply("250 2.0.0 ok").await?,
                "QUIT" => {
                    self.reply("221 2.0.0 bye").await?;
                    return Ok(After::Quit);
                }
                _ => self.reply("502 5.5.2 command not recognized").await?,
            }
        }
        Ok(After::Quit)
    }

    /// `AUTH PLAIN [initial]` or `AUTH LOGIN`; the decoded user and password.
    async fn authenticate(&mut self, arg: &str) -> std::io::Result<Option<(String, String)>> {
        let (mechanism, initial) = arg.split_once(' ').unwrap_or((arg, ""));
        match mechanism.to_ascii_uppercase().as_str() {
            "PLAIN" => {
                let response = if initial.is_empty() {
                    self.reply("334 ").await?;
                    self.line().await?.unwrap_or_default()
                } else {
                    initial.to_owned()
                };
                let Some(decoded) = decode(&response) else { return Ok(None) };
                let mut parts = decoded.split('\0').skip(1);
                Ok(parts.next().zip(parts.next()).map(|(user, password)| (user.to_owned(), password.to_owned())))
            }
            "LOGIN" => {
                self.reply(&format!("334 {}", BASE64.encode("Username:"))).await?;
                let user = self.line().await?.and_then(|l| decode(&l));
                self.reply(&format!("334 {}", BASE64.encode("Password:"))).await?;
                let password = self.line().await?.and_then(|l| decode(&l));
                Ok(user.zip(password))
            }
            _ => Ok(None),
        }
    }
}

fn decode(b64: &str) -> Option<String> {
    BASE64.decode(b64.trim()).ok().and_then(|bytes| String::from_utf8(bytes).ok())
}

/// `FROM:<a@b> BODY=8BITMIME` → `a@b`.
fn angle_address(arg: &str) -> String {
    let start = arg.find('<').map_or(0, |i| i + 1);
    let end = arg[start..].find('>').map_or(arg.len(), |i| start + i);
    arg[start..end].to_owned()
}
