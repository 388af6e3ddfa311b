//! The HTTP shell: the accept loop, one hyper HTTP/1 connection per socket (with upgrades for
//! WebSockets), the route table, and the edges every request passes: the Host check, CORS, and the
//! one translation from `engine::Error` to a status and `{"error": ...}`.
//!
//! Connection limits follow mini-redis: a semaphore as wide as `--max-connections` is acquired
//! before `accept`, so excess clients wait in the listen backlog. hyper's own header timeout
//! would also cut idle keep-alive connections at 10 s, so each socket is watched here instead:
//! once the first byte of a request head arrives it has 10 s to be complete (a client sending one
//! byte a second is dropped), and a connection idle between requests is closed after 60 s.

use crate::app::App;
use crate::routes;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use sanjevani_engine::Error;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio_util::task::TaskTracker;

/// Time a request head has to arrive once its first byte has.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Time an idle keep-alive connection is kept.
pub const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(60);

/// The body type of every response.
pub type Body = Full<Bytes>;

/// Where a connection is between requests, as the watchdog sees it.
#[derive(Debug, Clone, Copy)]
enum Phase {
    /// Waiting for a request; idle since then.
    Idle(Instant),
    /// Bytes of a request head arrived, the first at this instant.
    Head(Instant),
    /// A request is being handled (its body may still be arriving).
    Busy,
}

/// Shared between the socket wrapper, the service and the watchdog.
pub struct ConnState {
    phase: Mutex<Phase>,
}

impl ConnState {
    fn new() -> Arc<ConnState> {
        Arc::new(ConnState { phase: Mutex::new(Phase::Idle(Instant::now())) })
    }

    fn begin(&self) {
        *self.phase.lock() = Phase::Busy;
    }

    fn end(&self) {
        *self.phase.lock() = Phase::Idle(Instant::now());
    }

    fn bytes_arrived(&self) {
        let mut phase = self.phase.lock();
        if let Phase::Idle(_) = *phase {
            *phase = Phase::Head(Instant::now());
        }
    }

    fn overdue(&self, now: Instant) -> bool {
        match *self.phase.lock() {
            Phase::Idle(since) => now.duration_since(since) >= KEEP_ALIVE_TIMEOUT,
            Phase::Head(since) => now.duration_since(since) >= HEADER_TIMEOUT,
            Phase::Busy => false,
        }
    }
}

/// A TCP stream that tells its connection's watchdog when request bytes arrive.
pub struct WatchedStream {
    stream: TcpStream,
    state: Arc<ConnState>,
}

impl WatchedStream {
    /// The socket, for a WebSocket that takes it over after the upgrade.
    pub fn into_inner(self) -> TcpStream {
        self.stream
    }
}

impl AsyncRead for WatchedStream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.stream).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.state.bytes_arrived();
        }
        poll
    }
}

impl AsyncWrite for WatchedStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// What a handler knows about the request besides the request itself.
pub struct Ctx {
    /// The client's IP (the peer, or the `X-Forwarded-For` entry a trusted proxy added).
    pub client_ip: IpAddr,
    /// Base of absolute URLs: `--public-url`, else `http://<Host>`.
    pub base_url: String,
}

/// Accepts connections until `shutdown` resolves; returns once every connection has finished
/// (in-flight requests complete; idle keep-alive connections are closed).
pub async fn serve(listener: TcpListener, app: Arc<App>, shutdown: impl Future<Output = ()>, max_connections: usize) {
    let permits = Arc::new(Semaphore::new(max_connections.max(1)));
    let tracker = TaskTracker::new();
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            permit = permits.clone().acquire_owned() => match permit { Ok(p) => p, Err(_) => break },
            _ = &mut shutdown => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(error) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let (app, stop) = (app.clone(), stop_rx.clone());
        tracker.spawn(async move {
            connection(app, stream, peer, stop).await;
            drop(permit);
        });
    }
    drop(listener);
    let _ = stop_tx.send(true);
    tracker.close();
    if tokio::time::timeout(Duration::from_secs(10), tracker.wait()).await.is_err() {
        tracing::warn!("some HTTP connections were still busy after 10 s; closing them");
    }
}

async fn connection(app: Arc<App>, stream: TcpStream, peer: SocketAddr, mut stop: watch::Receiver<bool>) {
    let state = ConnState::new();
    let io = TokioIo::new(WatchedStream { stream, state: state.clone() });
    let service = {
        let state = state.clone();
        service_fn(move |req| {
            let (app, state) = (app.clone(), state.clone());
            async move {
                state.begin();
                let response = handle(&app, req, peer).await;
                state.end();
                Ok::<_, std::convert::Infallible>(response)
            }
        })
    };
    let conn =
        http1::Builder::new().keep_alive(true).max_buf_size(64 * 1024).serve_connection(io, service).with_upgrades();
    tokio::pin!(conn);
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let mut stopping = false;
    loop {
        tokio::select! {
            _ = conn.as_mut() => return,
            _ = tick.tick() => {
                if state.overdue(Instant::now()) {
                    return;
                }
            }
            _ = stop.changed(), if !stopping => {
                stopping = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    }
}

/// One request through the edges: Host check, CORS, routing, error translation.
async fn handle(app: &Arc<App>, req: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
    let started = Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let origin = req.headers().get(header::ORIGIN).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let cors = origin.as_deref().filter(|o| app.config.cors_origins.allows(o)).map(str::to_owned);

    let mut response = match host_of(req.headers()) {
        Some(host) if host_allowed(app, &host) => {
            if method == Method::OPTIONS {
                preflight(cors.as_deref())
            } else {
                let ctx = Ctx { client_ip: client_ip(app, req.headers(), peer.ip()), base_url: base_url(app, &host) };
                match routes::route(app, req, &ctx).await {
                    Ok(response) => response,
                    Err(error) => error_response(&error),
                }
            }
        }
        _ => error_response(&Error::invalid("The Host header is not allowed on this server")),
    };
    if let Some(origin) = cors {
        let headers = response.headers_mut();
        if let Ok(v) = HeaderValue::from_str(&origin) {
            headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, v);
        }
        headers.insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, HeaderValue::from_static("Retry-After"));
        headers.append(header::VARY, HeaderValue::from_static("Origin"));
    }
    app.stats.http_latency.observe(&path, started.elapsed());
    // The query string may carry a token (`/ws/...?token=`): log the path only.
    tracing::debug!(%method, %path, status = response.status().as_u16(), micros = started.elapsed().as_micros() as u64, "http");
    response
}

fn preflight(allowed_origin: Option<&str>) -> Response<Body> {
    let mut response = empty(StatusCode::NO_CONTENT);
    if allowed_origin.is_some() {
        let h = response.headers_mut();
        h.insert(header::ACCESS_CONTROL_ALLOW_METHODS, HeaderValue::from_static("GET, POST, PATCH, OPTIONS"));
        h.insert(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            HeaderValue::from_static("Authorization, Content-Type, Idempotency-Key"),
        );
        h.insert(header::ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static("600"));
    }
    response
}

/// The Host header without its port, lower-cased (`[::1]` keeps its brackets).
fn host_of(headers: &HeaderMap) -> Option<String> {
    let host = headers.get(header::HOST)?.to_str().ok()?.trim().to_ascii_lowercase();
    if host.is_empty() {
        return None;
    }
    Some(host)
}

fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return host.split_once(']').map_or(host, |(h, _)| &host[..h.len() + 1]);
    }
    host.rsplit_once(':').filter(|(_, port)| port.bytes().all(|b| b.is_ascii_digit())).map_or(host, |(h, _)| h)
}

fn host_allowed(app: &App, host_header: &str) -> bool {
    let host = strip_port(host_header);
    let config = &app.config;
    if config.allowed_hosts.is_empty() {
        let bind = config.bind.ip();
        let bind_host = if bind.is_ipv6() { format!("[{bind}]") } else { bind.to_string() };
        let public = config.public_url.as_deref().and_then(|u| u.split_once("://")).map(|(_, rest)| {
            let authority = rest.split('/').next().unwrap_or("");
            strip_port(&authority.to_ascii_lowercase()).to_string()
        });
        ["localhost", "127.0.0.1", "[::1]"].contains(&host) || host == bind_host || public.as_deref() == Some(host)
    } else {
        config.allowed_hosts.iter().any(|h| h == "*" || h.eq_ignore_ascii_case(host))
    }
}

/// Base of absolute URLs: `--public-url`, else `http://<Host>`.
pub fn base_url(app: &App, host_header: &str) -> String {
    match &app.config.public_url {
        Some(url) => url.clone(),
        None => format!("http://{host_header}"),
    }
}

/// The peer, unless it is a trusted proxy: then the right-most `X-Forwarded-For` entry that is
/// not itself a trusted proxy (the one the proxy added).
fn client_ip(app: &App, headers: &HeaderMap, peer: IpAddr) -> IpAddr {
    let trusted = |ip: &IpAddr| app.config.trusted_proxies.iter().any(|net| net.contains(ip));
    if !trusted(&peer) {
        return peer;
    }
    let forwarded: Vec<IpAddr> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    forwarded.into_iter().rev().find(|ip| !trusted(ip)).unwrap_or(peer)
}

/// A JSON response.
pub fn json(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from(value.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// An empty response.
pub fn empty(status: StatusCode) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = status;
    response
}

/// The one place an `Error` becomes a status and `{"error": ...}`.
pub fn error_response(error: &Error) -> Response<Body> {
    let status = StatusCode::from_u16(error.status()).unwrap_or(StatusCode::BAD_REQUEST);
    let mut body = serde_json::json!({"error": error.to_string()});
    if let Some(field) = error.field_name() {
        body["field"] = field.into();
    }
    let mut response = json(status, &body);
    if let Error::RateLimited { retry_after_secs, .. } = error {
        if let Ok(v) = HeaderValue::from_str(&retry_after_secs.to_string()) {
            response.headers_mut().insert(header::RETRY_AFTER, v);
        }
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_stripped() {
        assert_eq!(strip_port("localhost:8000"), "localhost");
        assert_eq!(strip_port("127.0.0.1"), "127.0.0.1");
        assert_eq!(strip_port("[::1]:8000"), "[::1]");
        assert_eq!(strip_port("[::1]"), "[::1]");
    }
}
