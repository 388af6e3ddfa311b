//! Request bodies. The original accepted JSON, `application/x-www-form-urlencoded` and
//! `multipart/form-data` on every POST and PATCH, so all three are parsed into one `Form`, and
//! handlers read validated values from it without caring which the client sent. Numbers sent as
//! strings are accepted; unknown fields are ignored. Size limits are enforced while reading, so
//! an oversized body is refused without being buffered.

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::{CONTENT_LENGTH, CONTENT_TYPE, HeaderMap};
use sanjevani_engine::Error;
use serde_json::Value;
use std::collections::HashMap;

/// Limit for JSON and form bodies.
pub const MAX_FORM_BYTES: u64 = 64 * 1024;

/// An uploaded file.
#[derive(Debug, Clone, PartialEq)]
pub struct Upload {
    /// Its bytes.
    pub bytes: Bytes,
}

/// A parsed body: named values and uploaded files.
#[derive(Debug, Default, PartialEq)]
pub struct Form {
    pub(crate) values: HashMap<String, Value>,
    pub(crate) files: HashMap<String, Upload>,
}

impl Form {
    /// Reads and parses a body. Checks in API.md's order: content type (415), size (413),
    /// syntax (400). An empty body needs no content type.
    pub async fn read(headers: &HeaderMap, body: Incoming, max_upload: u64) -> Result<Form, Error> {
        let content_type = headers.get(CONTENT_TYPE).and_then(|v| v.to_str().ok()).map(str::to_owned);
        let declared = headers.get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
        let Some(content_type) = content_type else {
            let bytes = collect(body, MAX_FORM_BYTES).await?;
            if bytes.iter().all(u8::is_ascii_whitespace) {
                return Ok(Form::default());
            }
            return Err(unsupported());
        };
        let essence = content_type.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
        match essence.as_str() {
            "application/json" => {
                check_declared(declared, MAX_FORM_BYTES)?;
                let bytes = collect(body, MAX_FORM_BYTES).await?;
                Form::from_json(bytes)
            }
            "application/x-www-form-urlencoded" => {
                check_declared(declared, MAX_FORM_BYTES)?;
                let bytes = collect(body, MAX_FORM_BYTES).await?;
                Ok(Form::from_urlencoded(&bytes))
            }
            "multipart/form-data" => {
                let boundary = multer::parse_boundary(&content_type)
                    .map_err(|_| Error::invalid("multipart/form-data needs a boundary parameter"))?;
                check_declared(declared, max_upload)?;
                Form::from_multipart(body, boundary, max_upload).await
            }
            _ => Err(unsupported()),
        }
    }

    /// A form from a JSON object body.
    pub fn from_json(bytes: Bytes) -> Result<Form, Error> {
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(Form::default());
        }
        let mut buf = bytes.to_vec();
        let value: Value =
            simd_json::serde::from_slice(&mut buf).map_err(|_| Error::invalid("The body is not valid JSON"))?;
        match value {
            Value::Object(map) => Ok(Form { values: map.into_iter().collect(), files: HashMap::new() }),
            _ => Err(Error::invalid("The JSON body must be an object")),
        }
    }

    /// A form from `application/x-www-form-urlencoded` bytes (a repeated key keeps the last value).
    pub fn from_urlencoded(bytes: &[u8]) -> Form {
        let values =
            form_urlencoded::parse(bytes).map(|(k, v)| (k.into_owned(), Value::String(v.into_owned()))).collect();
        Form { values, files: HashMap::new() }
    }

    async fn from_multipart(body: Incoming, boundary: String, max_upload: u64) -> Result<Form, Error> {
        Form::from_multipart_stream(body.into_data_stream(), boundary, max_upload).await
    }

    /// A form from a `multipart/form-data` body arriving as a stream of chunks (split anywhere),
    /// with `boundary` already taken from the content type. The stream may carry at most
    /// `max_upload` bytes (413); a malformed body or a non-UTF-8 text field is a 400. `read` uses
    /// it on the request body; the fuzz targets feed it chunks from memory.
    pub async fn from_multipart_stream<S, E>(stream: S, boundary: String, max_upload: u64) -> Result<Form, Error>
    where
        S: Stream<Item = Result<Bytes, E>> + Send + 'static,
        E: Into<Box<dyn std::error::Error + Send + Sync>> + 'static,
    {
        let limits = multer::SizeLimit::new().whole_stream(max_upload).per_field(max_upload);
        let mut multipart =
            multer::Multipart::with_constraints(stream, boundary, multer::Constraints::new().size_limit(limits));
        let mut form = Form::default();
        loop {
            let field = match multipart.next_field().await {
                Ok(Some(field)) => field,
                Ok(None) => break,
                Err(e) => return Err(multipart_error(e)),
            };
            let Some(name) = field.name().map(str::to_owned) else { continue };
            let is_file = field.file_name().is_some();
            let bytes = field.bytes().await.map_err(multipart_error)?;
            if is_file {
                if !bytes.is_empty() {
                    form.files.insert(name, Upload { bytes });
                }
            } else {
                let text = String::from_utf8(bytes.to_vec())
                    .map_err(|_| Error::invalid(format!("Field {name} must be UTF-8 text")))?;
                form.values.insert(name, Value::String(text));
            }
        }
        Ok(form)
    }

    /// A required text value.
    pub fn text(&self, name: &'static str) -> Result<String, Error> {
        self.opt_text(name)?.ok_or_else(|| missing(name))
    }

    /// An optional text value (absent or null → None). Numbers are taken as their text.
    pub fn opt_text(&self, name: &'static str) -> Result<Option<String>, Error> {
        match self.values.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(Value::Number(n)) => Ok(Some(n.to_string())),
            Some(_) => Err(Error::field(name, format!("{name} must be a string"))),
        }
    }

    /// A required number; a numeric string is accepted.
    pub fn number(&self, name: &'static str) -> Result<f64, Error> {
        self.opt_number(name)?.ok_or_else(|| missing(name))
    }

    /// An optional number (absent, null or an empty string → None).
    pub fn opt_number(&self, name: &'static str) -> Result<Option<f64>, Error> {
        let bad = || Error::field(name, format!("{name} must be a number"));
        match self.values.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Number(n)) => n.as_f64().map(Some).ok_or_else(bad),
            Some(Value::String(s)) if s.trim().is_empty() => Ok(None),
            Some(Value::String(s)) => {
                let v: f64 = s.trim().parse().map_err(|_| bad())?;
                // "NaN" and "inf" parse as f64; they are not numbers a client means.
                if v.is_finite() { Ok(Some(v)) } else { Err(bad()) }
            }
            Some(_) => Err(bad()),
        }
    }

    /// A required whole number; `"10"` and `10.0` are accepted, `10.5` is not.
    pub fn integer(&self, name: &'static str) -> Result<i64, Error> {
        self.opt_integer(name)?.ok_or_else(|| missing(name))
    }

    /// An optional whole number.
    pub fn opt_integer(&self, name: &'static str) -> Result<Option<i64>, Error> {
        let bad = || Error::field(name, format!("{name} must be a whole number"));
        match self.values.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Number(n)) => {
                if let Some(i) = n.as_i64() {
                    return Ok(Some(i));
                }
                let f = n.as_f64().ok_or_else(bad)?;
                if f.fract() == 0.0 && f.abs() < 9.0e15 { Ok(Some(f as i64)) } else { Err(bad()) }
            }
            Some(Value::String(s)) if s.trim().is_empty() => Ok(None),
            Some(Value::String(s)) => {
                let s = s.trim();
                if let Ok(i) = s.parse::<i64>() {
                    return Ok(Some(i));
                }
                let f: f64 = s.parse().map_err(|_| bad())?;
                if f.is_finite() && f.fract() == 0.0 && f.abs() < 9.0e15 { Ok(Some(f as i64)) } else { Err(bad()) }
            }
            Some(_) => Err(bad()),
        }
    }

    /// An uploaded file, if one was sent under `name`.
    pub fn file(&self, name: &str) -> Option<&Upload> {
        self.files.get(name)
    }

    /// Whether `name` was sent at all (as a value or a file).
    pub fn has(&self, name: &str) -> bool {
        self.values.get(name).is_some_and(|v| !v.is_null()) || self.files.contains_key(name)
    }
}

/// Reads a whole body up to `limit` bytes; more → 413.
pub async fn collect(body: Incoming, limit: u64) -> Result<Bytes, Error> {
    let limited = http_body_util::Limited::new(body, limit as usize);
    match limited.collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => Err(too_large()),
        Err(_) => Err(Error::invalid("The request body could not be read")),
    }
}

fn check_declared(declared: Option<u64>, limit: u64) -> Result<(), Error> {
    match declared {
        Some(len) if len > limit => Err(too_large()),
        _ => Ok(()),
    }
}

fn multipart_error(e: multer::Error) -> Error {
    match e {
        multer::Error::StreamSizeExceeded { .. } | multer::Error::FieldSizeExceeded { .. } => too_large(),
        _ => Error::invalid("The multipart body is malformed"),
    }
}

fn too_large() -> Error {
    Error::TooLarge("The request body is too large".into())
}

fn unsupported() -> Error {
    Error::UnsupportedMediaType("Use application/json, application/x-www-form-urlencoded or multipart/form-data".into())
}

fn missing(name: &'static str) -> Error {
    Error::field(name, format!("{name} is required"))
}

/// Drains the rest of a stream so keep-alive connections stay usable after an early error.
pub async fn discard(body: Incoming) {
    let mut stream = body.into_data_stream();
    let mut seen = 0usize;
    while let Some(Ok(chunk)) = stream.next().await {
        seen += chunk.len();
        if seen > 1024 * 1024 {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn json_form(v: Value) -> Form {
        Form::from_json(Bytes::from(v.to_string())).unwrap()
    }

    #[test]
    fn numbers_as_strings_and_numbers() {
        let f = json_form(json!({"a": "10", "b": 10, "c": 10.0, "d": "10.5", "e": 2.5, "f": "  27.7 ", "g": "NaN"}));
        assert_eq!(f.integer("a").unwrap(), 10);
        assert_eq!(f.integer("b").unwrap(), 10);
        assert_eq!(f.integer("c").unwrap(), 10);
        assert!(f.integer("d").is_err());
        assert_eq!(f.number("e").unwrap(), 2.5);
        assert_eq!(f.number("f").unwrap(), 27.7);
        assert!(f.number("g").is_err());
        assert_eq!(f.number("zzz").unwrap_err().field_name(), Some("zzz"));
    }

    /// Found by the `json` fuzz target (fuzz/corpus/json/regression-big-integer): simd-json
    /// refused integers beyond 64 bits, so a valid body was a 400 "not valid JSON" even when the
    /// big number sat in a field the server ignores.
    #[test]
    fn integers_beyond_64_bits_are_valid_json() {
        let body = br#"{"quantity": 2, "client_ts": 123456789012345678901234567890, "lat": -99999999999999999999}"#;
        let f = Form::from_json(Bytes::from_static(body)).unwrap();
        assert_eq!(f.integer("quantity").unwrap(), 2);
        assert_eq!(f.number("lat").unwrap(), -1e20);
        let f = json_form(json!({"quantity": 1e30}));
        assert_eq!(f.integer("quantity").unwrap_err().to_string(), "quantity must be a whole number");
    }

    #[test]
    fn urlencoded_and_bad_json() {
        let f = Form::from_urlencoded(b"email=a%40b.c&otp=123456");
        assert_eq!(f.text("email").unwrap(), "a@b.c");
        assert!(Form::from_json(Bytes::from_static(b"{bad")).is_err());
        assert!(Form::from_json(Bytes::from_static(b"[1,2]")).is_err());
        assert!(Form::from_json(Bytes::from_static(b"  ")).is_ok());
    }
}
