//! The harness every end-to-end test uses: the real server's `run()` on port 0 with a temp data
//! dir, a small real HTTP/1 client (hyper) and a real WebSocket client (fastwebsockets), all over
//! real loopback sockets. Every reply and every WebSocket message passes the OpenAPI contract
//! check (`contract.rs`) on its way to the test: one that drifts from the document fails it.

use crate::contract;
use bytes::Bytes;
use fastwebsockets::{FragmentCollector, Frame, OpCode};
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use sanjevani::Config;
use serde_json::Value;
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A running server.
pub struct Server {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its data dir (kept so a restart can reuse it).
    pub dir: tempfile::TempDir,
    /// The Host header requests carry (the first `--allowed-hosts` entry, if any).
    pub host: String,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), sanjevani::ServeError>>>,
}

impl Server {
    /// A server with default settings (tests get `--rate-limits on`, approval auto).
    pub async fn start() -> Server {
        Server::start_with(|_| {}).await
    }

    /// A server with settings changed by `tweak`.
    pub async fn start_with(tweak: impl FnOnce(&mut Config)) -> Server {
        Server::start_in(tempfile::tempdir().unwrap(), tweak).await
    }

    /// A server on an existing data dir (a restart).
    pub async fn start_in(dir: tempfile::TempDir, tweak: impl FnOnce(&mut Config)) -> Server {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut config = Config::for_tests(dir.path());
        config.bind = addr;
        config.jwt_secret = Some("end-to-end-test-secret-0123456789abcdef".into());
        tweak(&mut config);
        let host = config.allowed_hosts.first().cloned().unwrap_or_else(|| format!("127.0.0.1:{}", addr.port()));
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(sanjevani::run(listener, config, async move {
            let _ = stopped.await;
        }));
        let server = Server { addr, dir, host, stop: Some(stop), task: Some(task) };
        for _ in 0..500 {
            if let Ok(r) = server.get("/health").send().await {
                if r.status == 200 {
                    return server;
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("server did not become healthy");
    }

    /// Stops the server (as SIGTERM would) and returns its data dir.
    pub async fn stop(mut self) -> tempfile::TempDir {
        self.shutdown().await;
        let dir = tempfile::tempdir().unwrap();
        std::mem::replace(&mut self.dir, dir)
    }

    async fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let result = tokio::time::timeout(Duration::from_secs(15), task).await;
            assert!(matches!(result, Ok(Ok(Ok(())))), "server did not stop cleanly: {result:?}");
        }
    }

    /// A request builder.
    pub fn request(&self, method: &str, path: &str) -> Call {
        Call {
            addr: self.addr,
            method: method.into(),
            path: path.into(),
            headers: vec![("host".into(), self.host.clone())],
            body: Bytes::new(),
        }
    }

    /// GET.
    pub fn get(&self, path: &str) -> Call {
        self.request("GET", path)
    }

    /// POST.
    pub fn post(&self, path: &str) -> Call {
        self.request("POST", path)
    }

    /// Opens a WebSocket to `path` (with its query).
    pub async fn ws(&self, path: &str) -> Ws {
        Ws::connect(self.addr, path, None).await
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// One HTTP request being built.
pub struct Call {
    addr: SocketAddr,
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    body: Bytes,
}

/// A response, body parsed as JSON where it is JSON.
#[derive(Debug)]
pub struct Reply {
    /// Status code.
    pub status: u16,
    /// Headers (lower-case names).
    pub headers: hyper::HeaderMap,
    /// Raw body.
    pub bytes: Bytes,
    /// Body as JSON (`Null` if it is not JSON).
    pub json: Value,
}

impl Reply {
    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

impl Call {
    /// Adds a header.
    pub fn header(mut self, name: &str, value: &str) -> Call {
        if name.eq_ignore_ascii_case("host") {
            self.headers.retain(|(n, _)| n != "host");
        }
        self.headers.push((name.to_ascii_lowercase(), value.into()));
        self
    }

    /// `Authorization: Bearer`.
    pub fn bearer(self, token: &str) -> Call {
        self.header("authorization", &format!("Bearer {token}"))
    }

    /// A JSON body.
    pub fn json(mut self, value: Value) -> Call {
        self.body = Bytes::from(value.to_string());
        self.header("content-type", "application/json")
    }

    /// A form-encoded body.
    pub fn form(mut self, pairs: &[(&str, &str)]) -> Call {
        let body: String =
            pairs.iter().map(|(k, v)| format!("{}={}", urlencode(k), urlencode(v))).collect::<Vec<_>>().join("&");
        self.body = Bytes::from(body);
        self.header("content-type", "application/x-www-form-urlencoded")
    }

    /// A multipart body: text fields and files `(name, filename, bytes)`.
    pub fn multipart(mut self, fields: &[(&str, &str)], files: &[(&str, &str, &[u8])]) -> Call {
        let boundary = "----sanjevani-test-boundary-7d3f";
        let mut body = Vec::new();
        for (name, value) in fields {
            body.extend_from_slice(
                format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n")
                    .as_bytes(),
            );
        }
        for (name, filename, bytes) in files {
            body.extend_from_slice(
                format!(
                    "--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"{filename}\"\r\nContent-Type: application/octet-stream\r\n\r\n"
                )
                .as_bytes(),
            );
            body.extend_from_slice(bytes);
            body.extend_from_slice(b"\r\n");
        }
        body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
        self.body = Bytes::from(body);
        self.header("content-type", &format!("multipart/form-data; boundary={boundary}"))
    }

    /// A raw body with a content type.
    pub fn raw(mut self, content_type: &str, body: impl Into<Bytes>) -> Call {
        self.body = body.into();
        self.header("content-type", content_type)
    }

    /// Sends it on a fresh connection.
    pub async fn send(self) -> Result<Reply, hyper::Error> {
        let stream = TcpStream::connect(self.addr).await.expect("connect");
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        let mut builder = Request::builder().method(self.method.as_str()).uri(&self.path);
        for (name, value) in &self.headers {
            builder = builder.header(name.as_str(), value.as_str());
        }
        let request = builder.body(Full::new(self.body)).expect("request");
        let response = sender.send_request(request).await?;
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let bytes = response.into_body().collect().await?.to_bytes();
        if let Err(problem) = contract::check_http(&self.method, &self.path, status, &headers, &bytes) {
            panic!("{problem}");
        }
        let json = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Ok(Reply { status, headers, bytes, json })
    }

    /// Sends it and returns the reply, panicking on a transport error.
    pub async fn go(self) -> Reply {
        self.send().await.expect("HTTP request failed")
    }
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

struct SpawnExecutor;

impl<F> hyper::rt::Executor<F> for SpawnExecutor
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        tokio::spawn(fut);
    }
}

/// What a WebSocket read returned.
#[derive(Debug, PartialEq)]
pub enum WsEvent {
    /// A text message, parsed.
    Json(Value),
    /// A close frame with its code.
    Closed(u16),
}

/// A real WebSocket client.
pub struct Ws {
    ws: FragmentCollector<TokioIo<Upgraded>>,
    /// The document's union of the messages this endpoint sends (by path), to check each against.
    messages: Option<&'static str>,
}

impl Ws {
    /// Connects; `recv_buffer` sets SO_RCVBUF before connecting (a slow client).
    pub async fn connect(addr: SocketAddr, path: &str, recv_buffer: Option<u32>) -> Ws {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        if let Some(size) = recv_buffer {
            socket.set_recv_buffer_size(size).unwrap();
        }
        let stream = socket.connect(addr).await.expect("connect");
        let request = Request::builder()
            .method("GET")
            .uri(path)
            .header("host", format!("127.0.0.1:{}", addr.port()))
            .header("upgrade", "websocket")
            .header("connection", "upgrade")
            .header("sec-websocket-key", fastwebsockets::handshake::generate_key())
            .header("sec-websocket-version", "13")
            .body(http_body_util::Empty::<Bytes>::new())
            .unwrap();
        let (ws, response) = fastwebsockets::handshake::client(&SpawnExecutor, request, stream).await.expect("upgrade");
        assert_eq!(response.status(), 101);
        Ws { ws: FragmentCollector::new(ws), messages: contract::ws_side(path) }
    }

    /// The next message or close, within `within`.
    pub async fn next_within(&mut self, within: Duration) -> Option<WsEvent> {
        loop {
            let frame = tokio::time::timeout(within, self.ws.read_frame()).await.ok()?.ok()?;
            match frame.opcode {
                OpCode::Text => {
                    let message: Value = serde_json::from_slice(&frame.payload).expect("JSON text");
                    if let Some(Err(problem)) = self.messages.map(|union| contract::check_ws(union, &message)) {
                        panic!("{problem}");
                    }
                    return Some(WsEvent::Json(message));
                }
                OpCode::Close => {
                    let code = if frame.payload.len() >= 2 {
                        u16::from_be_bytes([frame.payload[0], frame.payload[1]])
                    } else {
                        1005
                    };
                    return Some(WsEvent::Closed(code));
                }
                _ => continue,
            }
        }
    }

    /// The next JSON message (panics on a close or a 5 s silence).
    pub async fn json(&mut self) -> Value {
        match self.next_within(Duration::from_secs(5)).await {
            Some(WsEvent::Json(v)) => v,
            other => panic!("expected a message, got {other:?}"),
        }
    }

    /// The next message of this `type`, skipping others.
    pub async fn json_of(&mut self, kind: &str) -> Value {
        loop {
            let msg = self.json().await;
            if msg["type"] == kind {
                return msg;
            }
        }
    }

    /// The close code that ends the stream, skipping messages before it.
    pub async fn close_code(&mut self) -> u16 {
        loop {
            match self.next_within(Duration::from_secs(5)).await {
                Some(WsEvent::Closed(code)) => return code,
                Some(WsEvent::Json(_)) => continue,
                None => panic!("expected a close frame"),
            }
        }
    }

    /// Asserts nothing arrives within `within`.
    pub async fn silent_for(&mut self, within: Duration) {
        if let Some(event) = self.next_within(within).await {
            panic!("expected silence, got {event:?}");
        }
    }

    /// Sends a text frame.
    pub async fn send_text(&mut self, text: &str) {
        self.ws.write_frame(Frame::text(fastwebsockets::Payload::Owned(text.as_bytes().to_vec()))).await.unwrap();
    }

    /// Sends any frame.
    pub async fn send_frame(&mut self, frame: Frame<'_>) {
        self.ws.write_frame(frame).await.unwrap();
    }
}

/// Logs in and returns the access token.
pub async fn login(server: &Server, email: &str, password: &str) -> String {
    let reply = server.post("/login").json(serde_json::json!({"email": email, "password": password})).go().await;
    assert_eq!(reply.status, 200, "login {email}: {:?}", reply.json);
    reply.json["access"].as_str().unwrap().to_string()
}

/// Registers a customer and returns (user id, access token).
pub async fn customer(server: &Server, email: &str) -> (i64, String) {
    let reply = server
        .post("/customer/register/")
        .json(serde_json::json!({"email": email, "password": "password-123", "name": "John Doe", "phone_number": "9841234567"}))
        .go()
        .await;
    assert_eq!(reply.status, 201, "{:?}", reply.json);
    (reply.json["user"]["id"].as_i64().unwrap(), login(server, email, "password-123").await)
}

/// Registers a pharmacy and returns (pharmacy id, access token).
pub async fn pharmacy(server: &Server, email: &str, lat: f64, lng: f64) -> (i64, String) {
    let reply = server
        .post("/pharmacy/register/")
        .json(serde_json::json!({
            "email": email, "password": "password-123", "name": "Owner", "phone_number": "9841000000",
            "pharmacy_name": format!("Pharmacy {email}"), "lat": lat, "lng": lng,
        }))
        .go()
        .await;
    assert_eq!(reply.status, 201, "{:?}", reply.json);
    (reply.json["pharmacy"]["id"].as_i64().unwrap(), login(server, email, "password-123").await)
}
