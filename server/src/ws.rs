//! WebSockets. The token is checked during the upgrade, and the upgrade always completes (101) so
//! that browsers see the close code: a rejected client gets its close frame (4001, 4003, 4004)
//! as the first frame. An accepted socket is one task that owns the socket:
//!
//! - it writes `connection`, then the replay and `sync` (with back-pressure, outside the live
//!   queue), then loops over three things: the socket becoming readable, the hub's queue, and the
//!   ping timer;
//! - reading is `readable()` then `try_read` into a stack buffer, parsed by [`frames`] (our own
//!   parser: fragments reassembled up to 64 KiB, 1009 past that, 1007 for invalid UTF-8, 1002 for
//!   protocol errors). Both are cancel-safe, so they sit in the same `select!` as the queue, and an
//!   idle socket holds no read buffer, no second task and no channel — about 9 KiB less per socket
//!   than fastwebsockets' reader task with its 8 KiB buffer;
//! - every message queued since the last write leaves in one `write` call, frames encoded here
//!   (server frames are unmasked, so encoding is a header and a copy). fastwebsockets' writer sends
//!   one frame per call, which at 150,000 deliveries/s would be one syscall per message.
//!   fastwebsockets still does the handshake.
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
use fastwebsockets::OpCode;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use sanjevani_engine::Error;
use sanjevani_engine::hub::{Audience, Close, Outbound, Subscription};
use sanjevani_engine::message;
use sanjevani_engine::model::Role;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub mod frames;

use frames::{Event, FrameReader};

/// Which endpoint a socket connected to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// `/ws/customer/`.
    Customer,
    /// `/ws/pharmacy/`.
    Pharmacy,
}

pub use frames::MAX_MESSAGE;
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

async fn run_socket(app: Arc<App>, mut stream: TcpStream, read_buf: Bytes, session: Result<Session, Close>) {
    let _ = socket2::SockRef::from(&stream).set_send_buffer_size(SEND_BUFFER);
    let _ = stream.set_nodelay(true);
    let session = match session {
        Ok(session) => session,
        Err(close) => {
            app.stats.ws_disconnects.count(close.code, ClosedBy::Server);
            let mut out = Vec::new();
            encode_close(&mut out, close.code, close.reason);
            finish(&mut stream, &out).await;
            return;
        }
    };
    let mut frames = FrameReader::new();
    frames.push(&read_buf);
    drop(read_buf);
    let (code, by) = serve(&app, &mut stream, session, frames).await;
    app.stats.ws_disconnects.count(code, by);
    if (code, by) != GONE {
        drain(&mut stream).await;
    }
}

/// A socket whose client vanished without a close frame.
const GONE: Ended = (ABNORMAL, ClosedBy::Client);
/// Bytes read per wake-up, into a buffer on the stack: client frames are small, so one read
/// usually holds all of them, and a larger message simply takes several.
const READ_CHUNK: usize = 2048;

/// After our close frame: reads and discards until the client closes, for at most the close
/// grace, so that the socket is not closed with unread bytes (which would reset it before the
/// client reads the close frame).
async fn drain(stream: &mut TcpStream) {
    let _ = tokio::time::timeout(CLOSE_GRACE, async {
        let mut sink = [0u8; READ_CHUNK];
        while let Ok(n) = stream.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
}

/// The connection's life after `connection`: the replay and `sync`, then one loop that reads
/// client frames, writes the hub's queue and pings.
async fn serve(app: &App, stream: &mut TcpStream, session: Session, mut frames: FrameReader) -> Ended {
    let Session { subscription, hello, backlog } = session;
    let sent = &app.stats.messages_sent;
    // Buffers start empty and are trimmed after a burst: an idle socket costs little memory.
    // `texts` counts the text messages in `out`, added to `messages_sent` once they are written.
    let mut out = Vec::new();
    let mut texts = 1;
    encode_text(&mut out, &hello);
    for frame in backlog {
        encode_text(&mut out, &frame);
        texts += 1;
        if out.len() >= 64 * 1024 {
            if stream.write_all(&out).await.is_err() {
                return GONE;
            }
            sent.fetch_add(std::mem::take(&mut texts), Ordering::Relaxed);
            settle(&mut out);
        }
    }
    if stream.write_all(&out).await.is_err() {
        return GONE;
    }
    sent.fetch_add(std::mem::take(&mut texts), Ordering::Relaxed);
    settle(&mut out);

    let mut last_heard = Instant::now();
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + app.config.ws_ping, app.config.ws_ping);
    let mut batch: Vec<Outbound> = Vec::new();
    loop {
        // Answer every complete frame received so far (the upgrade's leftover bytes at first).
        loop {
            match frames.next_event() {
                Ok(None) => break,
                Ok(Some(Event::Text(text))) => {
                    encode_text(&mut out, &answer(&text));
                    texts += 1;
                }
                Ok(Some(Event::Binary(_))) => {
                    encode_text(&mut out, &message::error("Binary frames are not supported; send JSON text"));
                    texts += 1;
                }
                Ok(Some(Event::Ping(payload))) => encode_frame(&mut out, OpCode::Pong, &payload),
                Ok(Some(Event::Pong)) => {}
                Ok(Some(Event::Close(payload))) => {
                    encode_frame(&mut out, OpCode::Close, &payload);
                    if finish(stream, &out).await {
                        sent.fetch_add(texts, Ordering::Relaxed);
                    }
                    // A close frame without a status code is "no status received".
                    let code = payload.get(..2).map_or(1005, |c| u16::from_be_bytes([c[0], c[1]]));
                    return (code, ClosedBy::Client);
                }
                Err(violation) => {
                    encode_close(&mut out, violation.code, violation.reason);
                    if finish(stream, &out).await {
                        sent.fetch_add(texts, Ordering::Relaxed);
                    }
                    return (violation.code, ClosedBy::Server);
                }
            }
        }
        if !out.is_empty() {
            if stream.write_all(&out).await.is_err() {
                return GONE;
            }
            sent.fetch_add(std::mem::take(&mut texts), Ordering::Relaxed);
            settle(&mut out);
        }
        tokio::select! {
            biased;
            ready = stream.readable() => {
                if ready.is_err() {
                    return GONE;
                }
                let mut chunk = [0u8; READ_CHUNK];
                match stream.try_read(&mut chunk) {
                    Ok(0) => return GONE,
                    Ok(n) => {
                        last_heard = Instant::now();
                        frames.push(&chunk[..n]);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(_) => return GONE,
                }
            }
            close = subscription.recv(&mut batch) => {
                let count = batch.len() as u64;
                for msg in batch.drain(..) {
                    encode_outbound(&mut out, &msg);
                }
                match close {
                    None => {
                        if stream.write_all(&out).await.is_err() {
                            return GONE;
                        }
                        app.stats.delivered.fetch_add(count, Ordering::Relaxed);
                        sent.fetch_add(count, Ordering::Relaxed);
                        settle(&mut out);
                        if batch.capacity() > 256 {
                            batch.shrink_to(64);
                        }
                    }
                    Some(close) => {
                        encode_close(&mut out, close.code, close.reason);
                        if finish(stream, &out).await {
                            app.stats.delivered.fetch_add(count, Ordering::Relaxed);
                            sent.fetch_add(count, Ordering::Relaxed);
                        }
                        return (close.code, ClosedBy::Server);
                    }
                }
            }
            _ = ping.tick() => {
                if last_heard.elapsed() >= app.config.ws_idle {
                    encode_close(&mut out, 1000, "idle");
                    finish(stream, &out).await;
                    return (1000, ClosedBy::Server);
                }
                encode_frame(&mut out, OpCode::Ping, b"");
                if stream.write_all(&out).await.is_err() {
                    return GONE;
                }
                settle(&mut out);
            }
        }
    }
}

/// The answer to a client text message (public for the fuzz targets and their corpus replay):
/// a JSON object whose `"type"` is `"ping"` gets a pong; any other type an error naming it; anything
/// else (not JSON, not an object, no string type) the general error. A repeated key counts once,
/// with its last value, as `serde_json` reads objects.
pub fn answer(text: &str) -> Bytes {
    let general = || message::error("Messages must be JSON objects with a \"type\", e.g. {\"type\":\"ping\"}");
    let Ok(serde_json::Value::Object(fields)) = serde_json::from_str::<serde_json::Value>(text) else {
        return general();
    };
    match fields.get("type").and_then(serde_json::Value::as_str) {
        Some("ping") => message::pong(),
        Some(other) => message::error(&format!("Unknown message type: {}", other.chars().take(64).collect::<String>())),
        None => general(),
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
async fn finish(socket: &mut TcpStream, out: &[u8]) -> bool {
    tokio::time::timeout(CLOSE_GRACE, async {
        let written = socket.write_all(out).await.is_ok();
        let _ = socket.shutdown().await;
        written
    })
    .await
    .unwrap_or(false)
}

/// Appends a queued message as one text frame, rendered in place behind room for its header
/// (most messages take the 16-bit length form, so the header is filled in without moving them).
fn encode_outbound(out: &mut Vec<u8>, msg: &Outbound) {
    let start = out.len();
    out.extend_from_slice(&[0; 4]);
    msg.write_to(out);
    let len = out.len() - start - 4;
    out[start] = 0x80 | OpCode::Text as u8;
    match len {
        n if n < 126 => {
            out[start + 1] = n as u8;
            out.copy_within(start + 4.., start + 2);
            out.truncate(out.len() - 2);
        }
        n if n <= u16::MAX as usize => {
            out[start + 1] = 126;
            out[start + 2..start + 4].copy_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out[start + 1] = 127;
            let length = (n as u64).to_be_bytes();
            out.splice(start + 2..start + 4, length);
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use sanjevani_engine::hub::Template;

    #[test]
    fn queued_messages_are_framed_like_any_text() {
        for size in [0, 1, 125, 126, 400, 65_535, 65_536, 70_000] {
            let body = Bytes::from(vec![b'x'; size]);
            let (mut framed, mut expected) = (vec![7u8], vec![7u8]);
            encode_outbound(&mut framed, &Outbound::Shared(body.clone()));
            encode_text(&mut expected, &body);
            assert_eq!(framed, expected, "{size} bytes");
        }
        let template = Template::new(Bytes::from_static(b"{\"d\":"), Bytes::from_static(b"}"));
        let mut framed = Vec::new();
        encode_outbound(&mut framed, &Outbound::Patched(Arc::new(template), 1.5));
        assert_eq!(framed, b"\x81\x09{\"d\":1.5}");
    }
}
