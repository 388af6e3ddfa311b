//! Bodies of the fuzz targets in `fuzz/` (run with `cargo fuzz`), kept here so that an ordinary
//! `cargo test` replays the committed corpus through the same code (`tests/fuzz_corpus.rs`).
//!
//! Each function takes arbitrary bytes and panics only when an invariant breaks:
//!
//! - `json`, `form`, `multipart`: a body the parser refuses is a 400 (or a 413 for an oversized
//!   multipart body), never another status; a body it accepts gives a `Form` whose typed getters
//!   never panic, agree with each other, and fail only with a 400 naming the field. JSON is also
//!   checked against `serde_json`, multipart against the same body read in one chunk.
//! - `ws_frames`: the frame parser of client WebSocket bytes gives the same events however the
//!   bytes are cut into reads, every event within the protocol's limits, nothing after a close
//!   or a violation, and only the close codes 1002, 1007 and 1009.
//! - `ws_message`: the reply to any client text message is a small JSON object whose `type` is
//!   `"pong"` (only for a ping) or `"error"` (with a message).

use crate::body::Form;
use bytes::Bytes;
use sanjevani_engine::Error;
use serde_json::Value;

/// Every field name the routes read from a body; the getters are exercised on each.
pub const FIELDS: &[&str] = &[
    "email",
    "password",
    "name",
    "phone_number",
    "pharmacy_name",
    "otp",
    "refresh",
    "lat",
    "lng",
    "radius_km",
    "patient_lat",
    "patient_lng",
    "quantity",
    "medicine_name",
    "note",
    "request_id",
    "response_type",
    "text_message",
    "image",
    "audio",
];

/// Upload limits a multipart input can choose from (its first byte picks one): the server's
/// default and a few small ones, so the 413 paths are reached with small inputs.
const LIMITS: [u64; 6] = [10 * 1024 * 1024, 0, 1, 16, 100, 1000];

/// A JSON request body.
pub fn json(data: &[u8]) {
    let parsed = Form::from_json(Bytes::copy_from_slice(data));
    let blank = data.iter().all(u8::is_ascii_whitespace);
    // serde_json is the reference; it is stricter in places (nesting deeper than 128, numbers
    // beyond f64), so only its acceptance of an object is held against simd-json.
    let reference = if blank { None } else { serde_json::from_slice::<Value>(data).ok() };
    match parsed {
        Err(e) => {
            assert_bad_request(&e, &["The body is not valid JSON", "The JSON body must be an object"]);
            if let Some(Value::Object(_)) = reference {
                panic!("serde_json reads an object, the server answered {e:?}");
            }
        }
        Ok(form) => {
            assert!(form.files.is_empty(), "a JSON body gave files");
            match reference {
                Some(Value::Object(map)) => {
                    assert_eq!(form.values.len(), map.len(), "JSON fields differ from serde_json's");
                    for (key, value) in &map {
                        let ours = form.values.get(key).unwrap_or_else(|| panic!("field {key:?} lost"));
                        assert!(same_json(ours, value), "field {key:?}: {ours:?} but serde_json reads {value:?}");
                    }
                }
                Some(other) => panic!("accepted a JSON body that is not an object: {other:?}"),
                None if blank => assert!(form.values.is_empty(), "a blank body gave fields"),
                None => {}
            }
            check_getters(&form);
        }
    }
}

/// An `application/x-www-form-urlencoded` request body.
pub fn form(data: &[u8]) {
    let form = Form::from_urlencoded(data);
    assert!(form.files.is_empty(), "a urlencoded body gave files");
    // A repeated key keeps its last value.
    let mut last: Vec<Option<String>> = vec![None; FIELDS.len()];
    for (key, value) in form_urlencoded::parse(data) {
        if let Some(i) = FIELDS.iter().position(|&name| key == name) {
            last[i] = Some(value.into_owned());
        }
    }
    for (&name, last) in FIELDS.iter().zip(&last) {
        let got = form.values.get(name).map(|v| v.as_str().expect("urlencoded values are strings"));
        assert_eq!(got, last.as_deref(), "value of {name}");
    }
    check_getters(&form);
}

/// A `multipart/form-data` request body. The input is `[limit, split] boundary '\n' body`: the
/// first byte picks the upload limit from `LIMITS` (bit 3 also ends the stream with a read
/// error, as a dropped connection does), the second byte how the body is cut into chunks (0: one
/// chunk, n: pseudo-random chunks of 1..=n bytes), then the `boundary=` parameter of the content
/// type up to the first newline, then the body.
pub fn multipart(data: &[u8]) {
    let &[flags, split, ref rest @ ..] = data else { return };
    let Some(newline) = rest.iter().position(|&b| b == b'\n') else { return };
    let (parameter, body) = (&rest[..newline], &rest[newline + 1..]);
    // Header values the server can read are visible ASCII (`HeaderValue::to_str`).
    let Ok(parameter) = std::str::from_utf8(parameter) else { return };
    if !parameter.bytes().all(|b| b == b' ' || b == b'\t' || b.is_ascii_graphic()) {
        return;
    }
    // As in `Form::read`: a content type without a usable boundary is a 400 before any parsing.
    let Ok(boundary) = multer::parse_boundary(format!("multipart/form-data; boundary={parameter}")) else { return };
    let limit = LIMITS[usize::from(flags & 7) % LIMITS.len()];
    let broken = flags & 8 != 0;
    let body = Bytes::copy_from_slice(body);

    let chunked = read_multipart(chunks(&body, split), broken, &boundary, limit);
    match &chunked {
        Err(e) if e.status() == 413 => {
            assert!(body.len() as u64 > limit, "413 for {} bytes under a limit of {limit}", body.len());
            assert_eq!(e.to_string(), "The request body is too large");
        }
        Err(e) => assert_bad_request(e, &["The multipart body is malformed", "Field ", " must be UTF-8 text"]),
        Ok(form) => {
            for (name, upload) in &form.files {
                assert!(!upload.bytes.is_empty(), "empty upload {name:?} kept");
                assert!(contains(&body, &upload.bytes), "upload {name:?} is not a slice of the body");
            }
            for (name, value) in &form.values {
                let text = value.as_str().expect("multipart values are strings");
                assert!(contains(&body, text.as_bytes()), "value of {name:?} is not a slice of the body");
            }
            check_getters(form);
        }
    }
    // Where the chunks are cut must not matter. Over the limit it may: reading can stop early.
    if split != 0 && body.len() as u64 <= limit {
        let whole = read_multipart(vec![body.clone()], broken, &boundary, limit);
        match (&chunked, &whole) {
            (Ok(a), Ok(b)) => assert_eq!(a, b, "chunking changed the form"),
            (Err(a), Err(b)) => assert_eq!(a.to_string(), b.to_string(), "chunking changed the error"),
            _ => panic!("chunking changed the outcome: {chunked:?} in chunks, {whole:?} whole"),
        }
    }
}

/// A client WebSocket text message (arbitrary bytes are read as UTF-8, lossily: the frame
/// reader refuses text frames that are not UTF-8 before they get here).
pub fn ws_message(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let reply = crate::ws::answer(&text);
    // The unknown type is echoed cut to 64 characters, so a reply stays small whatever was sent.
    assert!(reply.len() <= 512, "reply of {} bytes", reply.len());
    let reply: Value = serde_json::from_slice(&reply).expect("the reply is JSON");
    let kind = reply.get("type").and_then(Value::as_str).expect("the reply has a string type");
    // Only an object is a message; a repeated key counts with its last value, as `Value` keeps.
    let sent: Option<Value> = serde_json::from_str(&text).ok();
    let sent_type = sent.as_ref().filter(|v| v.is_object()).and_then(|v| v.get("type")).and_then(Value::as_str);
    match kind {
        "pong" => {
            assert_eq!(reply.as_object().map(|o| o.len()), Some(1), "pong carries only its type");
            assert_eq!(sent_type, Some("ping"), "pong for {text:?}");
        }
        "error" => {
            let message = reply.get("message").and_then(Value::as_str).expect("an error has a message");
            if let Some(named) = message.strip_prefix("Unknown message type: ") {
                // The type sent, cut to 64 characters.
                let t = sent_type.expect("an unknown type was sent");
                assert!(t != "ping" && named == t.chars().take(64).collect::<String>(), "{message:?} for {t:?}");
            } else {
                assert_eq!(message, "Messages must be JSON objects with a \"type\", e.g. {\"type\":\"ping\"}");
                assert_eq!(sent_type, None, "general error for {text:?}");
            }
        }
        other => panic!("reply type {other:?}"),
    }
}

/// Bytes a client sends on a WebSocket, after the handshake. The first byte picks how the rest
/// is cut into reads (1 to 256 bytes each, cycling), so frame and header boundaries land
/// anywhere; the events must be the same as when everything arrives in one read, every event
/// within the protocol's limits, nothing after a close or a violation, and a violation one of
/// the three codes the parser may send.
pub fn ws_frames(data: &[u8]) {
    use crate::ws::frames::{Event, FrameReader, MAX_MESSAGE};
    let Some((&cut, bytes)) = data.split_first() else { return };
    let read = |chunks: &mut dyn Iterator<Item = &[u8]>| {
        let mut reader = FrameReader::new();
        let mut events = Vec::new();
        for chunk in chunks {
            reader.push(chunk);
            loop {
                match reader.next_event() {
                    Ok(Some(event)) => events.push(event),
                    Ok(None) => break,
                    Err(violation) => return (events, Some(violation)),
                }
            }
        }
        (events, None)
    };
    let whole = read(&mut std::iter::once(bytes));
    let step = usize::from(cut) + 1;
    let pieces = read(&mut bytes.chunks(step));
    assert_eq!(whole, pieces, "cut every {step} bytes");
    let (events, violation) = whole;
    if let Some(v) = violation {
        assert!(matches!(v.code, 1002 | 1007 | 1009), "close code {}", v.code);
    }
    for (i, event) in events.iter().enumerate() {
        match event {
            Event::Text(text) => assert!(text.len() <= MAX_MESSAGE),
            Event::Binary(payload) => assert!(payload.len() <= MAX_MESSAGE),
            Event::Ping(payload) => assert!(payload.len() <= 125),
            Event::Pong => {}
            Event::Close(payload) => {
                assert!(payload.len() <= 125 && payload.len() != 1, "close payload {payload:?}");
                assert_eq!(i, events.len() - 1, "an event after a close frame");
            }
        }
    }
}

thread_local! {
    /// Drives the async multipart parser; its stream is in memory, so no I/O or timers are needed.
    static RUNTIME: tokio::runtime::Runtime =
        tokio::runtime::Builder::new_current_thread().build().expect("a current-thread runtime");
}

fn read_multipart(chunks: Vec<Bytes>, broken: bool, boundary: &str, limit: u64) -> Result<Form, Error> {
    let mut items: Vec<Result<Bytes, std::io::Error>> = chunks.into_iter().map(Ok).collect();
    if broken {
        items.push(Err(std::io::Error::new(std::io::ErrorKind::ConnectionReset, "connection reset")));
    }
    let stream = futures_util::stream::iter(items);
    RUNTIME.with(|rt| rt.block_on(Form::from_multipart_stream(stream, boundary.to_owned(), limit)))
}

/// Cuts `body` into chunks of 1..=`split` bytes (a fixed pseudo-random sequence per `split`).
fn chunks(body: &Bytes, split: u8) -> Vec<Bytes> {
    if split == 0 {
        return vec![body.clone()];
    }
    let mut state = u32::from(split).wrapping_mul(0x9e37_79b9) | 1;
    let mut out = Vec::new();
    let mut at = 0;
    while at < body.len() {
        // xorshift32
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        let size = 1 + (state % u32::from(split)) as usize;
        let end = (at + size).min(body.len());
        out.push(body.slice(at..end));
        at = end;
    }
    out
}

/// The getters on every field the routes read: no panic, consistent answers, and every error a
/// 400 naming the field with a sentence that starts with the field's name.
fn check_getters(form: &Form) {
    for &name in FIELDS {
        let has = form.has(name);
        let text = form.opt_text(name);
        let number = form.opt_number(name);
        let integer = form.opt_integer(name);
        let file = form.file(name);
        for e in [text.as_ref().err(), number.as_ref().err(), integer.as_ref().err()].into_iter().flatten() {
            assert_field_error(e, name);
        }
        if !has {
            assert!(matches!(text, Ok(None)) && matches!(number, Ok(None)) && matches!(integer, Ok(None)));
            assert!(file.is_none());
        }
        if matches!(text, Ok(Some(_))) || matches!(number, Ok(Some(_))) || matches!(integer, Ok(Some(_))) {
            assert!(has, "{name} has a value but has() says no");
        }
        if let Some(upload) = file {
            assert!(has && !upload.bytes.is_empty());
        }
        if let Ok(Some(v)) = number {
            assert!(v.is_finite(), "{name} = {v}");
        }
        if let Ok(Some(i)) = integer {
            // A whole number is a number too, and the same one.
            match number {
                Ok(Some(v)) => assert_eq!(i as f64, v, "{name}: integer {i}, number {v}"),
                _ => panic!("{name}: integer {i}, number {number:?}"),
            }
        }
        // The required getters are the optional ones with absence as an error.
        check_required(name, form.text(name), &text);
        check_required(name, form.number(name), &number);
        check_required(name, form.integer(name), &integer);
    }
}

fn check_required<T: PartialEq + std::fmt::Debug>(
    name: &'static str,
    required: Result<T, Error>,
    optional: &Result<Option<T>, Error>,
) {
    match (required, optional) {
        (Ok(a), Ok(Some(b))) => assert_eq!(&a, b),
        (Err(e), Ok(None)) => {
            assert_field_error(&e, name);
            assert_eq!(e.to_string(), format!("{name} is required"));
        }
        (Err(a), Err(b)) => assert_eq!(a.to_string(), b.to_string()),
        (required, optional) => panic!("{name}: required {required:?}, optional {optional:?}"),
    }
}

fn assert_field_error(e: &Error, name: &'static str) {
    assert_eq!(e.status(), 400, "{e:?}");
    assert_eq!(e.field_name(), Some(name), "{e:?}");
    let message = e.to_string();
    assert!(message.starts_with(name) && message.len() < 100, "unclear message {message:?}");
}

/// A 400 not blaming a field, whose message contains every piece of one of `expected`.
fn assert_bad_request(e: &Error, expected: &[&str]) {
    assert_eq!(e.status(), 400, "{e:?}");
    assert_eq!(e.field_name(), None, "{e:?}");
    let message = e.to_string();
    assert!(expected.iter().any(|piece| message.contains(piece)), "unexpected message {message:?}");
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || haystack.windows(needle.len()).any(|w| w == needle)
}

/// JSON equality, with numbers equal to within rounding (simd-json and serde_json round some
/// long decimals differently in the last place).
fn same_json(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => match (x.as_i64(), y.as_i64(), x.as_u64(), y.as_u64()) {
            (Some(p), Some(q), _, _) => p == q,
            (_, _, Some(p), Some(q)) => p == q,
            _ => {
                let (p, q) = (x.as_f64().unwrap_or(f64::NAN), y.as_f64().unwrap_or(f64::NAN));
                p == q || (p - q).abs() <= p.abs().max(q.abs()) * 4.0 * f64::EPSILON
            }
        },
        (Value::Array(x), Value::Array(y)) => x.len() == y.len() && x.iter().zip(y).all(|(p, q)| same_json(p, q)),
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, p)| y.get(k).is_some_and(|q| same_json(p, q)))
        }
        _ => a == b,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by `ws_message` (corpus: regression-duplicate-type): a repeated "type" key. The
    /// handler now reads objects as `serde_json` does, the last value counting.
    #[test]
    fn repeated_type_key_counts_its_last_value() {
        let input = br#"{"type":"x","type":"ping"}"#;
        assert_eq!(&crate::ws::answer(std::str::from_utf8(input).unwrap())[..], br#"{"type":"pong"}"#);
        ws_message(input);
        ws_message(include_bytes!("../../fuzz/corpus/ws_message/regression-duplicate-type"));
    }

    /// Found by `ws_message` (corpus: regression-array-message): serde's derived struct reading
    /// took a one-element array, so `["ping"]` got a pong although the error says messages are
    /// objects. Arrays now get the general error.
    #[test]
    fn arrays_are_not_messages() {
        let reply: Value = serde_json::from_slice(&crate::ws::answer(r#"["ping"]"#)).unwrap();
        assert_eq!(reply["type"], "error");
        assert!(reply["message"].as_str().unwrap().starts_with("Messages must be JSON objects"));
        ws_message(br#"["ping"]"#);
        ws_message(br#"["x"]"#);
        ws_message(include_bytes!("../../fuzz/corpus/ws_message/regression-array-message"));
    }

    /// Found by `json` (corpus: regression-big-integer); see also body.rs.
    #[test]
    fn big_integers_are_read_like_serde_json_does() {
        json(include_bytes!("../../fuzz/corpus/json/regression-big-integer"));
        json(br#"{"quantity": -123456789012345678901234567890}"#);
    }
}
