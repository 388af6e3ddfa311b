//! The end-to-end tests, one binary so they link once: each `mod` is one area of the product,
//! `smtp_sink` is the local mail server they send OTP codes to.

mod mail;
mod smtp_sink;
