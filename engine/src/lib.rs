//! Sanjevani's engine: everything that is the product's logic and nothing that knows HTTP.
//!
//! A medicine request flows through it in one direction: `geo` validates the coordinates,
//! `index` finds the approved pharmacies within the radius, `lifecycle` records the request and
//! its recipients in the `store` (durably, by group commit) and hands the rendered message to the
//! `hub`, which queues it on every recipient's live connections. Responses come back through
//! `lifecycle`, where first-accept-wins is decided by the store. `accounts` owns users,
//! passwords, OTP codes and pharmacy approval.

pub mod accounts;
pub mod clock;
pub mod error;
pub mod geo;
pub mod hub;
pub mod index;
pub mod lifecycle;
pub mod message;
pub mod model;
pub mod store;

pub use error::{Error, Result};
