//! End-to-end tests: one test binary (it links once), each test starting the real server's
//! `run()` on port 0 and speaking only the public API over real sockets. `smtp_sink` is the local
//! mail server OTP codes are sent to.

mod accounts;
mod admin;
mod city;
mod console;
mod contract;
mod edges;
mod harness;
mod mail;
mod metrics;
mod requests;
mod smtp_sink;
mod websockets;
