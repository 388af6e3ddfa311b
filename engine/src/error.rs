//! The engine's one error type. Each variant is one HTTP status that API.md names, so the shell
//! translates an `Error` to a response in a single place and never has to guess a status code.

use std::fmt;

/// Result alias used across the engine.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Every way an engine call can refuse or fail; the variant decides the status code.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Error {
    /// 400: the input is invalid, or the request is in a state that forbids the call.
    #[error("{message}")]
    Invalid {
        /// The offending field, when one field is to blame.
        field: Option<&'static str>,
        /// A sentence for a human.
        message: String,
    },
    /// 401: missing, invalid or expired credentials.
    #[error("{0}")]
    Unauthorized(String),
    /// 403: authenticated, but this role or account may not do this.
    #[error("{0}")]
    Forbidden(String),
    /// 404: unknown id, or one the caller may not see.
    #[error("{0}")]
    NotFound(String),
    /// 409: conflicts with what already exists.
    #[error("{0}")]
    Conflict(String),
    /// 413: body too large.
    #[error("{0}")]
    TooLarge(String),
    /// 415: content type not accepted.
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// 429: rate limited; retry after this many seconds.
    #[error("{message}")]
    RateLimited {
        /// Seconds until a retry can succeed.
        retry_after_secs: u64,
        /// A sentence for a human.
        message: String,
    },
    /// 503: not ready, or a dependency (the store, the mail queue) is down or full.
    #[error("{0}")]
    Unavailable(String),
}

impl Error {
    /// A 400 blaming one field.
    pub fn field(field: &'static str, message: impl Into<String>) -> Self {
        Error::Invalid { field: Some(field), message: message.into() }
    }

    /// A 400 about the request's state or the input as a whole.
    pub fn invalid(message: impl Into<String>) -> Self {
        Error::Invalid { field: None, message: message.into() }
    }

    /// The HTTP status code this error maps to.
    pub fn status(&self) -> u16 {
        match self {
            Error::Invalid { .. } => 400,
            Error::Unauthorized(_) => 401,
            Error::Forbidden(_) => 403,
            Error::NotFound(_) => 404,
            Error::Conflict(_) => 409,
            Error::TooLarge(_) => 413,
            Error::UnsupportedMediaType(_) => 415,
            Error::RateLimited { .. } => 429,
            Error::Unavailable(_) => 503,
        }
    }

    /// The field to name in the error body, if any.
    pub fn field_name(&self) -> Option<&'static str> {
        match self {
            Error::Invalid { field, .. } => *field,
            _ => None,
        }
    }

    /// A storage failure: the client sees 503, the log sees the cause.
    pub fn store(context: &str, cause: impl fmt::Display) -> Self {
        tracing::error!(%cause, "store failure: {context}");
        Error::Unavailable("The data store is unavailable; try again shortly".into())
    }
}

/// The seed's exact sentence for a response to a request another pharmacy has taken.
pub const ALREADY_ASSIGNED: &str = "This request has already been assigned to a pharmacy";
