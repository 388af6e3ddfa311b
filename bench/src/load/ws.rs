//! A minimal WebSocket client (RFC 6455), just what a pharmacy socket under load needs: the
//! upgrade handshake over a raw `TcpStream`, a frame parser that takes every complete frame out
//! of one read buffer (a server that writes several queued frames in one `write` is read in one
//! `read`), and masked client frames for pongs and closes. No TLS, no extensions, no hyper in the
//! read path: at 150,000 deliveries a second the generator's own overhead must stay small next to
//! the server's, on the same two cores.

use bytes::{Buf, Bytes, BytesMut};
use std::io;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Largest message the client accepts (the server's own limit is 64 KiB; replays are one message
/// per request, so nothing legitimate comes near this).
pub const MAX_MESSAGE: usize = 1 << 20;
/// Largest handshake response.
const MAX_HANDSHAKE: usize = 16 * 1024;

/// Frame opcodes.
pub mod opcode {
    /// Continuation of a fragmented message.
    pub const CONTINUATION: u8 = 0x0;
    /// UTF-8 text.
    pub const TEXT: u8 = 0x1;
    /// Binary.
    pub const BINARY: u8 = 0x2;
    /// Close, with an optional 2-byte code.
    pub const CLOSE: u8 = 0x8;
    /// Ping.
    pub const PING: u8 = 0x9;
    /// Pong.
    pub const PONG: u8 = 0xA;
}

/// One frame from the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// FIN bit.
    pub fin: bool,
    /// Opcode (see [`opcode`]).
    pub opcode: u8,
    /// Payload, unmasked (servers never mask).
    pub payload: Bytes,
}

impl Frame {
    /// The close code of a close frame (1005 when it carries none).
    pub fn close_code(&self) -> u16 {
        if self.payload.len() >= 2 { u16::from_be_bytes([self.payload[0], self.payload[1]]) } else { 1005 }
    }
}

/// Takes the first complete frame off `buf`, or `None` if more bytes are needed.
pub fn parse_frame(buf: &mut BytesMut) -> io::Result<Option<Frame>> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let (b0, b1) = (buf[0], buf[1]);
    if b1 & 0x80 != 0 {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "a server frame is masked"));
    }
    if b0 & 0x70 != 0 {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "reserved bits set (no extension was agreed)"));
    }
    let (header, len) = match b1 & 0x7F {
        126 => {
            if buf.len() < 4 {
                return Ok(None);
            }
            (4, u16::from_be_bytes([buf[2], buf[3]]) as u64)
        }
        127 => {
            if buf.len() < 10 {
                return Ok(None);
            }
            let mut n = [0u8; 8];
            n.copy_from_slice(&buf[2..10]);
            (10, u64::from_be_bytes(n))
        }
        n => (2, n as u64),
    };
    if len > MAX_MESSAGE as u64 {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("a {len}-byte frame")));
    }
    let total = header + len as usize;
    if buf.len() < total {
        buf.reserve(total - buf.len());
        return Ok(None);
    }
    buf.advance(header);
    let payload = buf.split_to(len as usize).freeze();
    Ok(Some(Frame { fin: b0 & 0x80 != 0, opcode: b0 & 0x0F, payload }))
}

/// A masked client frame (FIN set).
pub fn client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 14);
    out.push(0x80 | opcode);
    match payload.len() {
        n if n < 126 => out.push(0x80 | n as u8),
        n if n <= u16::MAX as usize => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    let mask: [u8; 4] = rand::random();
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    out
}

/// A close frame with `code`.
pub fn close_frame(code: u16) -> Vec<u8> {
    client_frame(opcode::CLOSE, &code.to_be_bytes())
}

/// An upgraded connection: the stream and whatever the server sent after its 101.
pub struct WsStream {
    /// The socket.
    pub stream: TcpStream,
    /// Bytes read but not yet parsed into frames.
    pub buf: BytesMut,
}

impl WsStream {
    /// Connects to `addr`, sends `GET path` with `Host: host` as an upgrade and waits (at most
    /// `within`) for `101 Switching Protocols`.
    pub async fn connect(addr: SocketAddr, host: &str, path: &str, within: Duration) -> io::Result<WsStream> {
        tokio::time::timeout(within, Self::handshake(addr, host, path))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "WebSocket handshake timed out"))?
    }

    async fn handshake(addr: SocketAddr, host: &str, path: &str) -> io::Result<WsStream> {
        use base64::Engine;
        let mut stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let key = base64::engine::general_purpose::STANDARD.encode(rand::random::<[u8; 16]>());
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await?;
        let mut buf = BytesMut::with_capacity(2048);
        let end = loop {
            if stream.read_buf(&mut buf).await? == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "closed during the handshake"));
            }
            if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break at + 4;
            }
            if buf.len() > MAX_HANDSHAKE {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "handshake response too long"));
            }
        };
        let head = buf.split_to(end);
        let status = head[..].split(|b| *b == b'\r').next().unwrap_or_default();
        if !status.starts_with(b"HTTP/1.1 101") {
            let status = String::from_utf8_lossy(status).into_owned();
            return Err(io::Error::new(io::ErrorKind::ConnectionRefused, format!("upgrade refused: {status}")));
        }
        Ok(WsStream { stream, buf })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server_frame(opcode: u8, fin: bool, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![if fin { 0x80 } else { 0 } | opcode];
        match payload.len() {
            n if n < 126 => out.push(n as u8),
            n if n <= 65535 => {
                out.push(126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(payload);
        out
    }

    #[test]
    fn parses_every_length_form_and_waits_for_partial_frames() {
        let long = vec![b'x'; 300];
        let huge = vec![b'y'; 70_000];
        let mut wire = server_frame(opcode::TEXT, true, b"{\"type\":\"pong\"}");
        wire.extend(server_frame(opcode::TEXT, false, &long));
        wire.extend(server_frame(opcode::CONTINUATION, true, &huge));
        wire.extend(server_frame(opcode::CLOSE, true, &1001u16.to_be_bytes()));
        let mut buf = BytesMut::new();
        let mut frames = Vec::new();
        // Fed in awkward pieces, as reads deliver them.
        for piece in wire.chunks(7) {
            buf.extend_from_slice(piece);
            while let Some(frame) = parse_frame(&mut buf).unwrap() {
                frames.push(frame);
            }
        }
        assert!(buf.is_empty());
        assert_eq!(frames.len(), 4);
        assert_eq!(&frames[0].payload[..], b"{\"type\":\"pong\"}");
        assert!(!frames[1].fin);
        assert_eq!(frames[1].payload.len(), 300);
        assert_eq!((frames[2].opcode, frames[2].payload.len()), (opcode::CONTINUATION, 70_000));
        assert_eq!((frames[3].opcode, frames[3].close_code()), (opcode::CLOSE, 1001));
    }

    #[test]
    fn refuses_masked_server_frames_and_reserved_bits() {
        let mut buf = BytesMut::from(&[0x81u8, 0x81, 1, 2, 3, 4, b'a'][..]);
        assert!(parse_frame(&mut buf).is_err());
        let mut buf = BytesMut::from(&[0xC1u8, 0x01, b'a'][..]);
        assert!(parse_frame(&mut buf).is_err());
    }

    #[test]
    fn client_frames_are_masked_and_unmask_to_the_payload() {
        for payload in [&b"hi"[..], &[7u8; 200][..], &[9u8; 70_000][..]] {
            let frame = client_frame(opcode::PONG, payload);
            assert_eq!(frame[0], 0x80 | opcode::PONG);
            assert!(frame[1] & 0x80 != 0, "masked");
            let (len, at) = match frame[1] & 0x7F {
                126 => (u16::from_be_bytes([frame[2], frame[3]]) as usize, 4),
                127 => (u64::from_be_bytes(frame[2..10].try_into().unwrap()) as usize, 10),
                n => (n as usize, 2),
            };
            assert_eq!(len, payload.len());
            let mask = &frame[at..at + 4];
            let body: Vec<u8> = frame[at + 4..].iter().enumerate().map(|(i, b)| b ^ mask[i % 4]).collect();
            assert_eq!(body, payload);
        }
    }
}
