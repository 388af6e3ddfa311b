//! The generator's HTTP client: HTTP/1.1 keep-alive connections (hyper's client connection),
//! pooled and shared by every simulated customer and pharmacy — each call carries its own
//! `Authorization`, so any connection serves any account. An open-loop run at 1,000 requests a
//! second would otherwise open a connection per call and leave tens of thousands of sockets in
//! TIME_WAIT. A connection that errs is dropped, never retried: a POST is not idempotent, and
//! a silent retry would hide a server fault from the counters.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HOST, HeaderValue};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::net::TcpStream;

/// A connection idle this long is not reused: the server closes keep-alive connections idle for
/// 60 s, and a request racing that close would fail for no fault of the server.
const MAX_IDLE: Duration = Duration::from_secs(50);
/// Most idle connections kept.
const MAX_POOLED: usize = 1024;
/// Longest any one call may take.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(15);

/// What came back.
#[derive(Debug)]
pub struct Answer {
    /// Status code.
    pub status: u16,
    /// Body.
    pub body: Bytes,
}

/// A pool of keep-alive connections to one server.
pub struct HttpPool {
    addr: SocketAddr,
    host: HeaderValue,
    idle: Mutex<Vec<(SendRequest<Full<Bytes>>, Instant)>>,
}

impl HttpPool {
    /// A pool for `addr`, sending `Host: host`.
    pub fn new(addr: SocketAddr, host: &str) -> HttpPool {
        HttpPool {
            addr,
            host: HeaderValue::from_str(host).unwrap_or_else(|_| HeaderValue::from_static("127.0.0.1")),
            idle: Mutex::new(Vec::new()),
        }
    }

    /// Sends one request (JSON body if any) and reads the whole answer, within [`CALL_TIMEOUT`].
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Bytes>,
    ) -> Result<Answer, String> {
        tokio::time::timeout(CALL_TIMEOUT, self.call_inner(method, path, token, body))
            .await
            .map_err(|_| format!("no answer within {} s", CALL_TIMEOUT.as_secs()))?
    }

    async fn call_inner(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Bytes>,
    ) -> Result<Answer, String> {
        let mut sender = self.checkout().await?;
        let mut builder = Request::builder().method(method).uri(path).header(HOST, self.host.clone());
        if let Some(token) = token {
            builder = builder.header(AUTHORIZATION, format!("Bearer {token}"));
        }
        if body.is_some() {
            builder = builder.header(CONTENT_TYPE, "application/json");
        }
        let request = builder.body(Full::new(body.unwrap_or_default())).map_err(|e| e.to_string())?;
        let response = sender.send_request(request).await.map_err(|e| format!("HTTP: {e}"))?;
        let status = response.status().as_u16();
        let body = response.into_body().collect().await.map_err(|e| format!("HTTP body: {e}"))?.to_bytes();
        let mut idle = self.idle.lock();
        if idle.len() < MAX_POOLED {
            idle.push((sender, Instant::now()));
        }
        Ok(Answer { status, body })
    }

    async fn checkout(&self) -> Result<SendRequest<Full<Bytes>>, String> {
        loop {
            let Some((mut sender, since)) = self.idle.lock().pop() else { break };
            if since.elapsed() < MAX_IDLE && !sender.is_closed() && sender.ready().await.is_ok() {
                return Ok(sender);
            }
        }
        let stream = TcpStream::connect(self.addr).await.map_err(|e| format!("connect {}: {e}", self.addr))?;
        stream.set_nodelay(true).map_err(|e| e.to_string())?;
        let (sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| format!("HTTP: {e}"))?;
        tokio::spawn(async move {
            // Ends when the connection closes; its errors surface on the next call through it.
            let _ = connection.await;
        });
        Ok(sender)
    }
}
