//! WebSockets. The token is checked during the upgrade, and the upgrade always completes (101) so
//! that browsers see the close code: a rejected client gets its close frame (4001, 4003, 4004)
//! as the first frame. An accepted socket is split into two tasks joined by a channel:
//!
//! - the reader (fastwebsockets' `WebSocketRead`, never inside `select!`, since `read_frame` is
//!   not cancel-safe) answers client pings and `{"type":"ping"}`, reassembles fragments up to
//!   64 KiB (1009 past that; 1007 for invalid UTF-8) and records when the client was last heard;
//! - the writer owns the socket's write half. It writes `connection`, then the replay and `sync`
//!   (with back-pressure, outside the live queue), then drains the hub's queue: every message
//!   queued since its last write leaves in one `write` call, frames encoded here (server frames
//!   are unmasked, so encoding is a header and a copy). fastwebsockets' writer sends one frame
//!   per call, which at 150,000 deliveries/s would be one syscall per message.
//!
//! The subscription is registered before the snapshot is read, so no message falls between.
//! A queue that overflows closes its socket with 4008 (best effort within 1 s, then dropped);
//! a suspended pharmacy's sockets get 4003; shutdown sends 1001; silence past `--ws-idle` 1000.
//! Every socket that ends is counted once for `/metrics` by its close code and by who closed it
//! (a client that vanishes without a close frame counts as 1006).

use crate::app::App;
use crate::auth::TokenType;
use crate::http::{Body, WatchedStream};
use crate::metrics::ClosedBy;
use bytes::Bytes;
use fastwebsockets::{Frame, OpCode, Role as WsRole, WebSocketError};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use sanjevani_engine::Error;
use sanjevani_engine::hub::{Audience, Close, Outbound, Subscription};
use sanjevani_engine::message;
use sanjevani_engine::model::Role;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::mpsc;

/// Which endpoint a socket connected to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// `/ws/customer/`.
    Customer,
    /// `/ws/pharmacy/`.
    Pharmacy,
}

/// Largest client message after reassembly.
pub const MAX_MESSAGE: usize = 64 * 1024;
/// Kernel send buffer of a WebSocket, so that a stalled client is noticed.
pub const SEND_BUFFER: usize = 256 * 1024;
/// How long a closing socket may take to flush its backlog and close frame.
const CLOSE_GRACE: Duration = Duration::from_secs(1);
/// The close code of a connection that ended without a close frame (RFC 6455 §7.1.5).
const ABNORMAL: u16 = 1006;

/// How a socket ended, for `/metrics`.
type Ended = (u16, ClosedBy);

/// The result of checking the token: who connected, or the close code to send.
enum Admission {
    Accepted { audience: Audience, hello: Bytes },
    Rejected(Close),
}

async fn admit(app: &App, token: Option<&str>, side: Side) -> Admission {
    const BAD_TOKEN: Close = Close { code: 4001, reason: "authentication failed" };
    const WRONG_ROLE: Close = Close { code: 4003, reason: "wrong role" };
    const NO_PHARMACY: Close = Close { code: 4004, reason: "no pharmacy found" };
    let Some(verified) = token.and_then(|t| app.jwt.verify(t, TokenType::Access)) else {
        return Admission::Rejected(BAD_TOKEN);
    };
    let user = match app.accounts.user(verified.user_id).await {
        Ok(Some(user)) if verified.role.is_none_or(|r| r == user.role) => user,
        _ => return Admission::Rejected(BAD_TOKEN),
    };
    match (side, user.role) {
        (Side::Customer, Role::Customer) => {
            Admission::Accepted { audience: Audience::Customer(user.id), hello: message::customer_connection(&user) }
        }
        (Side::Pharmacy, Role::Pharmacy) => match app.accounts.pharmacy_of(user.id).await {
            Ok(Some(p)) if p.approved => {
                Admission::Accepted { audience: Audience::Pharmacy(p.id), hello: message::pharmacy_connection(&p) }
            }
            Ok(Some(_)) => Admission::Rejected(Close::SUSPENDED),
            _ => Admission::Rejected(NO_PHARMACY),
        },
        _ => Admission::Rejected(WRONG_ROLE),
    }
}

/// Handles `GET /ws/customer/` and `GET /ws/pharmacy/`: answers 101 and runs the socket.
pub async fn upgrade(app: &Arc<App>, mut req: Request<Incoming>, side: Side) -> Result<Response<Body>, Error> {
    if !fastwebsockets::upgrade::is_upgrade_request(&req) {
        return Err(Error::invalid("This endpoint expects a WebSocket upgrade"));
    }
    let query = req.uri().query().unwrap_or("").to_owned();
    let mut token = None;
    let mut replay = true;
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        match &*k {
            "token" => token = Some(v.into_owned()),
            "replay" => replay = v != "0" && v != "false",
            _ => {}
        }
    }
    let (response, upgraded) = fastwebsockets::upgrade::upgrade(&mut req)
        .map_err(|_| Error::invalid("Invalid WebSocket upgrade (Sec-WebSocket-Key and version 13 required)"))?;
    let admission = admit(app, token.as_deref(), side).await;
    // Subscribe now, before the snapshot is read, so nothing falls between the two.
    let session = match admission {
        Admission::Accepted { audience, hello } => {
            let subscription = app.hub.subscribe(audience);
            let base = base_url(app, &req);
            let backlog = if replay {
                match app.lifecycle() {
                    Ok(lifecycle) => lifecycle.replay(audience, &base),
                    Err(_) => Vec::new(),
                }
            } else {
                Vec::new()
            };
            app.stats.ws_connects.fetch_add(1, Ordering::Relaxed);
            Ok(Session { subscription, hello, backlog })
        }
        Admission::Rejected(close) => Err(close),
    };
    let app = app.clone();
    tokio::spawn(async move {
        let socket = match upgraded.await {
            Ok(ws) => ws.into_inner().into_inner(),
            Err(error) => {
                tracing::debug!(%error, "websocket upgrade did not complete");
                app.stats.ws_disconnects.count(ABNORMAL, ClosedBy::Client);
                return;
            }
        };
        let parts = match socket.downcast::<TokioIo<WatchedStream>>() {
            Ok(parts) => parts,
            Err(_) => {
                tracing::error!("websocket upgrade: unexpected transport");
                app.stats.ws_disconnects.count(ABNORMAL, ClosedBy::Server);
                return;
            }
        };
        let stream = parts.io.into_inner().into_inner();
        run_socket(app, stream, parts.read_buf, session).await;
    });
    let (head, _) = response.into_parts();
    Ok(Response::from_parts(head, Full::new(Bytes::new())))
}

fn base_url(app: &App, req: &Request<Incoming>) -> String {
    let host = req.headers().get(hyper::header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("localhost");
    crate::http::base_url(app, host)
}

struct Session {
    subscription: Subscription,
    hello: Bytes,
    backlog: Vec<Bytes>,
}

/// What the reader asks the writer to send.
enum Control {
    /// A WebSocket pong with this payload.
    Pong(Vec<u8>),
    /// A text message (`pong`, `error`).
    Text(Bytes),
    /// Close with this code and end.
    Close(u16, &'static str),
    /// Echo the client's close frame and end.
    CloseReply(Vec<u8>),
    /// The client went away: end without a close frame.
    Gone,
}

async fn run_socket(app: Arc<App>, stream: tokio::net::TcpStream, read_buf: Bytes, session: Result<Session, Close>) {
    let _ = socket2::SockRef::from(&stream).set_send_buffer_size(SEND_BUFFER);
    let _ = stream.set_nodelay(true);
    let (read_half, mut write_half) = stream.into_split();
    let session = match session {
        Ok(session) => session,
        Err(close) => {
            app.stats.ws_disconnects.count(close.code, ClosedBy::Server);
            let mut out = Vec::new();
            encode_close(&mut out, close.code, close.reason);
            let _ = tokio::time::timeout(CLOSE_GRACE, async {
                let _ = write_half.write_all(&out).await;
                let _ = write_half.shutdown().await;
            })
            .await;
            return;
        }
    };
    let last_heard = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let (control_tx, control_rx) = mpsc::channel::<Control>(64);
    let reader = {
        let (control_tx, last_heard) = (control_tx.clone(), last_heard.clone());
        let reader = SharedRead(Arc::new(parking_lot::Mutex::new(std::io::Cursor::new(read_buf).chain(read_half))));
        tokio::spawn(read_loop(reader, control_tx, last_heard, started))
    };
    let (code, by) = write_loop(&app, write_half, session, control_rx, last_heard, started).await;
    app.stats.ws_disconnects.count(code, by);
    // Give the reader a moment to see the client's close (or drain what it sent), so the socket is
    // not closed with unread bytes, which would reset it before the client reads our close frame.
    let abort = reader.abort_handle();
    if tokio::time::timeout(CLOSE_GRACE, reader).await.is_err() {
        abort.abort();
    }
}

type ReadSide = tokio::io::Chain<std::io::Cursor<Bytes>, tokio::net::tcp::OwnedReadHalf>;

/// The read side, shared so that the reader can drain it after fastwebsockets gives up on it.
#[derive(Clone)]
struct SharedRead(Arc<parking_lot::Mutex<ReadSide>>);

impl tokio::io::AsyncRead for SharedRead {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let mut inner = self.0.lock();
        std::pin::Pin::new(&mut *inner).poll_read(cx, buf)
    }
}

/// Reads and discards until the client closes, for at most the close grace.
async fn drain(mut reader: SharedRead) {
    let mut sink = vec![0u8; 16 * 1024];
    let _ = tokio::time::timeout(CLOSE_GRACE, async {
        while let Ok(n) = reader.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
}

async fn read_loop(reader: SharedRead, control: mpsc::Sender<Control>, last_heard: Arc<AtomicU64>, started: Instant) {
    read_frames(reader.clone(), &control, last_heard, started).await;
    drain(reader).await;
}

async fn read_frames(
    reader: SharedRead,
    control: &mpsc::Sender<Control>,
    last_heard: Arc<AtomicU64>,
    started: Instant,
) {
    let (mut ws, _) = fastwebsockets::after_handshake_split(reader, tokio::io::sink(), WsRole::Server);
    ws.set_max_message_size(MAX_MESSAGE + 1);
    let mut message: Option<(OpCode, Vec<u8>)> = None;
    loop {
        let mut obligated = |frame: Frame<'_>| {
            let control = control.clone();
            let reply = match frame.opcode {
                OpCode::Pong => Control::Pong(frame.payload.to_vec()),
                OpCode::Close => Control::CloseReply(frame.payload.to_vec()),
                _ => Control::Close(1002, "protocol error"),
            };
            async move { control.send(reply).await.map_err(|_| std::io::Error::other("writer gone")) }
        };
        let frame = match ws.read_frame(&mut obligated).await {
            Ok(frame) => frame,
            Err(error) => {
                let (code, reason) = match error {
                    WebSocketError::InvalidUTF8 => (1007, "invalid UTF-8"),
                    WebSocketError::FrameTooLarge => (1009, "message too big"),
                    WebSocketError::UnexpectedEOF | WebSocketError::IoError(_) | WebSocketError::SendError(_) => {
                        let _ = control.send(Control::Gone).await;
                        return;
                    }
                    _ => (1002, "protocol error"),
                };
                let _ = control.send(Control::Close(code, reason)).await;
                return;
            }
        };
        last_heard.store(started.elapsed().as_millis() as u64, Ordering::Relaxed);
        let (opcode, payload) = match frame.opcode {
            OpCode::Close => return,
            OpCode::Ping | OpCode::Pong => continue,
            OpCode::Text | OpCode::Binary if frame.fin && message.is_none() => (frame.opcode, frame.payload.to_vec()),
            OpCode::Text | OpCode::Binary if message.is_none() => {
                message = Some((frame.opcode, frame.payload.to_vec()));
                continue;
            }
            OpCode::Continuation if message.is_some() => {
                let Some((_, buffer)) = message.as_mut() else { continue };
                buffer.extend_from_slice(&frame.payload);
                if buffer.len() > MAX_MESSAGE {
                    let _ = control.send(Control::Close(1009, "message too big")).await;
                    return;
                }
                if !frame.fin {
                    continue;
                }
                match message.take() {
                    Some(done) => done,
                    None => continue,
                }
            }
            _ => {
                let _ = control.send(Control::Close(1002, "protocol error")).await;
                return;
            }
        };
        if payload.len() > MAX_MESSAGE {
            let _ = control.send(Control::Close(1009, "message too big")).await;
            return;
        }
        let reply = match opcode {
            OpCode::Text => match std::str::from_utf8(&payload) {
                Err(_) => {
                    let _ = control.send(Control::Close(1007, "invalid UTF-8")).await;
                    return;
                }
                Ok(text) => answer(text),
            },
            _ => message::error("Binary frames are not supported; send JSON text"),
        };
        if control.send(Control::Text(reply)).await.is_err() {
            return;
        }
    }
}

/// The answer to a client text message (public for the fuzz targets and their corpus replay).
pub fn answer(text: &str) -> Bytes {
    #[derive(serde::Deserialize)]
    struct ClientMessage {
        r#type: String,
    }
    match serde_json::from_str::<ClientMessage>(text) {
        Ok(m) if m.r#type == "ping" => message::pong(),
        Ok(m) => message::error(&format!("Unknown message type: {}", m.r#type.chars().take(64).collect::<String>())),
        Err(_) => message::error("Messages must be JSON objects with a \"type\", e.g. {\"type\":\"ping\"}"),
    }
}

async fn write_loop(
    app: &App,
    mut socket: OwnedWriteHalf,
    session: Session,
    mut control: mpsc::Receiver<Control>,
    last_heard: Arc<AtomicU64>,
    started: Instant,
) -> Ended {
    const GONE: Ended = (ABNORMAL, ClosedBy::Client);
    let Session { subscription, hello, backlog } = session;
    // Buffers start empty and are trimmed after a burst: an idle socket costs little memory.
    let mut out = Vec::new();
    encode_text(&mut out, &hello);
    for frame in backlog {
        encode_text(&mut out, &frame);
        if out.len() >= 64 * 1024 {
            if socket.write_all(&out).await.is_err() {
                return GONE;
            }
            settle(&mut out);
        }
    }
    if socket.write_all(&out).await.is_err() {
        return GONE;
    }
    settle(&mut out);

    let idle_ms = app.config.ws_idle.as_millis() as u64;
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + app.config.ws_ping, app.config.ws_ping);
    let mut batch: Vec<Outbound> = Vec::new();
    let mut scratch = Vec::new();
    loop {
        tokio::select! {
            biased;
            request = control.recv() => {
                match request {
                    Some(Control::Pong(payload)) => encode_frame(&mut out, OpCode::Pong, &payload),
                    Some(Control::Text(text)) => encode_text(&mut out, &text),
                    Some(Control::CloseReply(payload)) => {
                        encode_frame(&mut out, OpCode::Close, &payload);
                        finish(&mut socket, &out).await;
                        // A close frame without a status code is "no status received".
                        let code = payload.get(..2).map_or(1005, |c| u16::from_be_bytes([c[0], c[1]]));
                        return (code, ClosedBy::Client);
                    }
                    Some(Control::Gone) | None => return GONE,
                    Some(Control::Close(code, reason)) => {
                        encode_close(&mut out, code, reason);
                        finish(&mut socket, &out).await;
                        return (code, ClosedBy::Server);
                    }
                }
                if socket.write_all(&out).await.is_err() {
                    return GONE;
                }
                settle(&mut out);
            }
            close = subscription.recv(&mut batch) => {
                let frames = batch.len() as u64;
                for msg in batch.drain(..) {
                    scratch.clear();
                    msg.write_to(&mut scratch);
                    encode_text(&mut out, &scratch);
                }
                match close {
                    None => {
                        if socket.write_all(&out).await.is_err() {
                            return GONE;
                        }
                        app.stats.delivered.fetch_add(frames, Ordering::Relaxed);
                        settle(&mut out);
                        if batch.capacity() > 256 {
                            batch.shrink_to(64);
                        }
                    }
                    Some(close) => {
                        encode_close(&mut out, close.code, close.reason);
                        if finish(&mut socket, &out).await {
                            app.stats.delivered.fetch_add(frames, Ordering::Relaxed);
                        }
                        return (close.code, ClosedBy::Server);
                    }
                }
            }
            _ = ping.tick() => {
                let heard = last_heard.load(Ordering::Relaxed);
                let silent = (started.elapsed().as_millis() as u64).saturating_sub(heard);
                if silent >= idle_ms {
                    encode_close(&mut out, 1000, "idle");
                    finish(&mut socket, &out).await;
                    return (1000, ClosedBy::Server);
                }
                encode_frame(&mut out, OpCode::Ping, b"");
                if socket.write_all(&out).await.is_err() {
                    return GONE;
                }
                settle(&mut out);
            }
        }
    }
}

/// Empties the write buffer, giving back memory a burst made it take.
fn settle(out: &mut Vec<u8>) {
    out.clear();
    if out.capacity() > 16 * 1024 {
        out.shrink_to(4 * 1024);
    }
}

/// Writes the last bytes and the close frame within the grace period; true if all were written.
async fn finish(socket: &mut OwnedWriteHalf, out: &[u8]) -> bool {
    tokio::time::timeout(CLOSE_GRACE, async {
        let written = socket.write_all(out).await.is_ok();
        let _ = socket.shutdown().await;
        written
    })
    .await
    .unwrap_or(false)
}

fn encode_text(out: &mut Vec<u8>, payload: &[u8]) {
    encode_frame(out, OpCode::Text, payload);
}

fn encode_close(out: &mut Vec<u8>, code: u16, reason: &str) {
    let mut payload = Vec::with_capacity(2 + reason.len());
    payload.extend_from_slice(&code.to_be_bytes());
    payload.extend_from_slice(reason.as_bytes());
    encode_frame(out, OpCode::Close, &payload);
}

/// Appends one unmasked, unfragmented frame.
fn encode_frame(out: &mut Vec<u8>, opcode: OpCode, payload: &[u8]) {
    out.push(0x80 | opcode as u8);
    match payload.len() {
        n if n < 126 => out.push(n as u8),
        n if n <= u16::MAX as usize => {
            out.push(126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(payload);
}
