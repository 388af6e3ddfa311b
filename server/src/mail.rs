//! Placeholder for the mail queue (being written on the `mail` branch): log-only delivery with
//! the same API, so the shell compiles meanwhile.

use crate::config::Config;

/// One message.
pub struct Mail {
    /// Recipient.
    pub to: String,
    /// Subject.
    pub subject: String,
    /// Plain-text body.
    pub body: String,
}

/// The queue was full.
#[derive(Debug)]
pub struct QueueFull;

/// A bad mail setting.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct MailError(String);

/// Outbound mail.
#[derive(Clone)]
pub struct Mailer;

impl Mailer {
    /// Starts the mailer.
    pub fn start(_config: &Config) -> Result<Mailer, MailError> {
        Ok(Mailer)
    }

    /// Queues a message.
    pub fn try_send(&self, mail: Mail) -> Result<(), QueueFull> {
        tracing::warn!(to = %mail.to, body = %mail.body, "log-only mail");
        Ok(())
    }
}
