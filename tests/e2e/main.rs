//! End-to-end tests: one test binary (it links once), each test starting the real server's
//! `run()` on port 0 and speaking only the public API over real sockets.

mod harness;
mod requests;
