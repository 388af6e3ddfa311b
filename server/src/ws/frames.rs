//! The client side of the WebSocket framing (RFC 6455 §5), parsed by hand so that an idle socket
//! holds no read buffer: the socket task reads into a stack buffer when the kernel says there is
//! something to read and pushes the bytes here; only a partial frame or a fragmented message is
//! kept between reads, and the space goes back once it has been used.
//!
//! Rules enforced, each answered with the close code the RFC gives: client frames must be masked,
//! reserved bits clear and opcodes known (1002); control frames unfragmented and at most 125
//! bytes (1002); a continuation only inside a fragmented message and a new message only outside
//! one (1002); a message at most [`MAX_MESSAGE`] bytes after reassembly, refused as soon as a
//! frame header announces more (1009); text valid UTF-8 (1007).

/// Largest client message after reassembly.
pub const MAX_MESSAGE: usize = 64 * 1024;

/// Something the client sent, complete.
#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    /// A text message (reassembled, valid UTF-8).
    Text(String),
    /// A binary message (reassembled).
    Binary(Vec<u8>),
    /// A ping with its payload, to be answered by a pong with the same payload.
    Ping(Vec<u8>),
    /// A pong (nothing to do but note that the client is alive).
    Pong,
    /// A close frame with its payload (status code and reason, or empty).
    Close(Vec<u8>),
}

/// Why the connection must be closed: the close code and reason to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Violation {
    /// WebSocket close code.
    pub code: u16,
    /// Short reason for the close frame.
    pub reason: &'static str,
}

const PROTOCOL: Violation = Violation { code: 1002, reason: "protocol error" };
const TOO_BIG: Violation = Violation { code: 1009, reason: "message too big" };
const NOT_UTF8: Violation = Violation { code: 1007, reason: "invalid UTF-8" };

/// Incremental parser of the frames a client sends.
#[derive(Debug, Default)]
pub struct FrameReader {
    /// Bytes received and not yet parsed (a partial frame).
    pending: Vec<u8>,
    /// Where parsing resumes in `pending`.
    pos: usize,
    /// A fragmented message being reassembled: whether it is text, and its bytes so far.
    message: Option<(bool, Vec<u8>)>,
    /// Set once a close frame or a violation has been returned; nothing more is parsed.
    done: bool,
}

impl FrameReader {
    /// A reader with nothing buffered.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds bytes read from the socket.
    pub fn push(&mut self, bytes: &[u8]) {
        if !self.done {
            self.pending.extend_from_slice(bytes);
        }
    }

    /// The next complete event, `Ok(None)` when more bytes are needed, or the violation that ends
    /// the connection. After a close frame or a violation nothing more is returned.
    pub fn next_event(&mut self) -> Result<Option<Event>, Violation> {
        while !self.done {
            let Some((header, frame_len)) = self.header()? else {
                self.compact();
                return Ok(None);
            };
            let start = self.pos + header.len;
            let mut payload = self.pending[start..start + header.payload_len].to_vec();
            unmask(&mut payload, header.mask);
            self.pos += frame_len;
            if let Some(event) = self.frame(header, payload)? {
                if matches!(event, Event::Close(_)) {
                    self.finish();
                }
                return Ok(Some(event));
            }
        }
        Ok(None)
    }

    /// Capacity held between reads (partial frame and partial message); the tests check that an
    /// idle reader holds none.
    pub fn buffered(&self) -> usize {
        self.pending.capacity() + self.message.as_ref().map_or(0, |(_, m)| m.capacity())
    }

    /// Parses the header at `pos`; `None` if the whole frame has not arrived yet.
    fn header(&mut self) -> Result<Option<(Header, usize)>, Violation> {
        let input = &self.pending[self.pos..];
        if input.len() < 2 {
            return Ok(None);
        }
        let (b0, b1) = (input[0], input[1]);
        let fin = b0 & 0x80 != 0;
        let opcode = b0 & 0x0f;
        if b0 & 0x70 != 0 || b1 & 0x80 == 0 {
            return Err(self.fail(PROTOCOL));
        }
        let (len, mut at) = match b1 & 0x7f {
            126 => {
                let Some(b) = input.get(2..4) else { return Ok(None) };
                (u16::from_be_bytes([b[0], b[1]]) as u64, 4)
            }
            127 => {
                let Some(b) = input.get(2..10) else { return Ok(None) };
                let len = u64::from_be_bytes(b.try_into().unwrap_or_default());
                if len >> 63 != 0 {
                    return Err(self.fail(PROTOCOL));
                }
                (len, 10)
            }
            n => (n as u64, 2),
        };
        match opcode {
            0x8..=0xa if !fin || len > 125 => return Err(self.fail(PROTOCOL)),
            0x8..=0xa => {}
            0x0..=0x2 => {
                let so_far = self.message.as_ref().map_or(0, |(_, m)| m.len()) as u64;
                if so_far + len > MAX_MESSAGE as u64 {
                    return Err(self.fail(TOO_BIG));
                }
            }
            _ => return Err(self.fail(PROTOCOL)),
        }
        let Some(mask) = input.get(at..at + 4) else { return Ok(None) };
        let mask = [mask[0], mask[1], mask[2], mask[3]];
        at += 4;
        let payload_len = len as usize;
        if input.len() < at + payload_len {
            return Ok(None);
        }
        Ok(Some((Header { fin, opcode, mask, len: at, payload_len }, at + payload_len)))
    }

    /// Applies one whole frame; returns the event it completes, if any.
    fn frame(&mut self, header: Header, payload: Vec<u8>) -> Result<Option<Event>, Violation> {
        let event = match (header.opcode, self.message.take()) {
            (0x8, message) => {
                self.message = message;
                if payload.len() == 1 {
                    return Err(self.fail(PROTOCOL));
                }
                Event::Close(payload)
            }
            (0x9, message) => {
                self.message = message;
                Event::Ping(payload)
            }
            (0xa, message) => {
                self.message = message;
                Event::Pong
            }
            (0x1 | 0x2, None) if !header.fin => {
                self.message = Some((header.opcode == 0x1, payload));
                return Ok(None);
            }
            (0x1, None) => return self.text(payload).map(Some),
            (0x2, None) => Event::Binary(payload),
            (0x0, Some((text, mut so_far))) => {
                so_far.extend_from_slice(&payload);
                if !header.fin {
                    self.message = Some((text, so_far));
                    return Ok(None);
                }
                if text {
                    return self.text(so_far).map(Some);
                }
                Event::Binary(so_far)
            }
            _ => return Err(self.fail(PROTOCOL)),
        };
        Ok(Some(event))
    }

    fn text(&mut self, bytes: Vec<u8>) -> Result<Event, Violation> {
        String::from_utf8(bytes).map(Event::Text).map_err(|_| self.fail(NOT_UTF8))
    }

    fn fail(&mut self, violation: Violation) -> Violation {
        self.finish();
        violation
    }

    fn finish(&mut self) {
        self.done = true;
        self.pending = Vec::new();
        self.message = None;
        self.pos = 0;
    }

    /// Drops parsed bytes; an empty buffer is given back, so an idle socket holds none.
    fn compact(&mut self) {
        if self.pos == self.pending.len() {
            self.pending = Vec::new();
        } else if self.pos > 0 {
            self.pending.drain(..self.pos);
        }
        self.pos = 0;
    }
}

#[derive(Debug, Clone, Copy)]
struct Header {
    fin: bool,
    opcode: u8,
    mask: [u8; 4],
    /// Header length in bytes.
    len: usize,
    payload_len: usize,
}

fn unmask(payload: &mut [u8], mask: [u8; 4]) {
    for (i, byte) in payload.iter_mut().enumerate() {
        *byte ^= mask[i & 3];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MASK: [u8; 4] = [0x12, 0x34, 0x56, 0x78];

    /// A masked client frame, as a client sends it.
    fn client_frame(fin: bool, opcode: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
        let mut out = vec![(if fin { 0x80 } else { 0 }) | opcode];
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
        out.extend_from_slice(&mask);
        let start = out.len();
        out.extend_from_slice(payload);
        unmask(&mut out[start..], mask);
        out
    }

    fn all(reader: &mut FrameReader) -> Result<Vec<Event>, Violation> {
        let mut events = Vec::new();
        while let Some(event) = reader.next_event()? {
            events.push(event);
        }
        Ok(events)
    }

    fn feed(bytes: &[u8]) -> Result<Vec<Event>, Violation> {
        let mut reader = FrameReader::new();
        reader.push(bytes);
        all(&mut reader)
    }

    #[test]
    fn whole_frames_in_one_read() {
        let mut bytes = client_frame(true, 1, br#"{"type":"ping"}"#, MASK);
        bytes.extend(client_frame(true, 9, b"hi", MASK));
        bytes.extend(client_frame(true, 10, b"", MASK));
        bytes.extend(client_frame(true, 2, &[0, 1, 2], MASK));
        assert_eq!(
            feed(&bytes).unwrap(),
            vec![
                Event::Text(r#"{"type":"ping"}"#.into()),
                Event::Ping(b"hi".to_vec()),
                Event::Pong,
                Event::Binary(vec![0, 1, 2])
            ]
        );
    }

    #[test]
    fn byte_by_byte_with_all_length_forms_and_a_ping_between_fragments() {
        let long = "x".repeat(300);
        let huge = "y".repeat(4_000); // the 16-bit length form
        let mut bytes = client_frame(false, 1, long.as_bytes(), MASK);
        bytes.extend(client_frame(true, 9, b"p", MASK));
        bytes.extend(client_frame(true, 0, huge.as_bytes(), MASK));
        let mut eight = vec![0x82, 0x80 | 127];
        eight.extend_from_slice(&5u64.to_be_bytes());
        eight.extend_from_slice(&[0; 4]);
        eight.extend_from_slice(b"abcde");
        bytes.extend(eight);
        let mut reader = FrameReader::new();
        let mut events = Vec::new();
        for b in &bytes {
            reader.push(std::slice::from_ref(b));
            events.extend(all(&mut reader).unwrap());
        }
        assert_eq!(
            events,
            vec![Event::Ping(b"p".to_vec()), Event::Text(long + &huge), Event::Binary(b"abcde".to_vec())]
        );
        assert_eq!(reader.buffered(), 0, "nothing kept once the message is out");
    }

    #[test]
    fn violations_get_their_close_codes() {
        let code = |bytes: &[u8]| feed(bytes).unwrap_err().code;
        let mut unmasked = client_frame(true, 1, b"a", MASK);
        unmasked[1] &= 0x7f;
        assert_eq!(code(&unmasked), 1002);
        assert_eq!(code(&[0xc1, 0x80, 0, 0, 0, 0]), 1002, "RSV1 set");
        assert_eq!(code(&client_frame(true, 3, b"", MASK)), 1002, "reserved opcode");
        assert_eq!(code(&client_frame(false, 9, b"", MASK)), 1002, "fragmented ping");
        assert_eq!(code(&client_frame(true, 9, &[0; 126], MASK)), 1002, "long ping");
        assert_eq!(code(&client_frame(true, 0, b"a", MASK)), 1002, "stray continuation");
        let mut two = client_frame(false, 1, b"a", MASK);
        two.extend(client_frame(true, 1, b"b", MASK));
        assert_eq!(code(&two), 1002, "new message inside a fragmented one");
        assert_eq!(code(&client_frame(true, 1, &[0xff, 0xfe], MASK)), 1007);
        assert_eq!(code(&client_frame(true, 8, &[3], MASK)), 1002, "one-byte close payload");
        // Too big is refused from the header alone, before the payload arrives.
        assert_eq!(code(&client_frame(true, 1, &vec![b'a'; MAX_MESSAGE + 1], MASK)[..14]), 1009);
        let mut pieces = client_frame(false, 1, &vec![b'a'; MAX_MESSAGE], MASK);
        pieces.extend(client_frame(true, 0, b"a", MASK));
        assert_eq!(code(&pieces), 1009, "too big after reassembly");
        let mut top_bit = vec![0x82, 0x80 | 127];
        top_bit.extend_from_slice(&(1u64 << 63).to_be_bytes());
        assert_eq!(code(&top_bit), 1002);
        assert!(feed(&client_frame(true, 1, &vec![b'a'; MAX_MESSAGE], MASK)).is_ok(), "exactly the limit");
    }

    #[test]
    fn nothing_after_close_or_a_violation() {
        let mut bytes = client_frame(true, 8, &1000u16.to_be_bytes(), MASK);
        bytes.extend(client_frame(true, 9, b"late", MASK));
        assert_eq!(feed(&bytes).unwrap(), vec![Event::Close(1000u16.to_be_bytes().to_vec())]);
        let mut reader = FrameReader::new();
        reader.push(&[0xc1, 0x80, 0, 0, 0, 0]);
        assert!(reader.next_event().is_err());
        reader.push(&client_frame(true, 9, b"x", MASK));
        assert_eq!(reader.next_event(), Ok(None));
        assert_eq!(reader.buffered(), 0);
    }
}
