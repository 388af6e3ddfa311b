//! The Sanjevani server: a thin HTTP and WebSocket shell around `sanjevani-engine`. It parses and
//! authenticates requests, calls the engine, and renders answers; every business rule lives in
//! the engine. `run` serves on an already bound listener until `shutdown` completes, so tests bind
//! port 0 and never race for ports.

pub mod app;
pub mod auth;
pub mod body;
pub mod city;
pub mod cli;
pub mod config;
pub mod console;
pub mod datadir;
pub mod demo;
pub mod fuzzing;
pub mod http;
pub mod mail;
pub mod media;
pub mod metrics;
pub mod progress;
pub mod routes;
pub mod ws;

pub use config::Config;

use app::App;
use progress::Progress;
use sanjevani_engine::accounts::{Accounts, AccountsConfig, card};
use sanjevani_engine::hub::{Close, Hub};
use sanjevani_engine::index::PharmacyIndex;
use sanjevani_engine::lifecycle::{Lifecycle, LifecycleConfig};
use sanjevani_engine::store::{SqliteStore, Store, StoreOptions};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};
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
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let data_dir = datadir::DataDir::open(&config.data_dir).map_err(|e| ServeError::DataDir(e.to_string()))?;
    let secret = data_dir.jwt_secret(config.jwt_secret.as_deref()).map_err(|e| ServeError::DataDir(e.to_string()))?;
    let store = Arc::new(SqliteStore::open(&data_dir.db_path(), StoreOptions::default())?);
    let hub = Hub::new(config.ws_queue);
    let index = Arc::new(PharmacyIndex::default());
    let accounts_config = AccountsConfig {
        approval: config.pharmacy_approval,
        rate_limits: config.rate_limits,
        ..AccountsConfig::default()
    };
    if !config.rate_limits {
        tracing::warn!("rate limits are OFF (--rate-limits off): for load tests only");
    }
    let accounts = Accounts::new(store.clone(), index.clone(), hub.clone(), secret.as_bytes(), accounts_config)?;
    let media = Arc::new(media::Media::new(&data_dir.media_dir(), secret.as_bytes())?);
    let mail = mail::Mailer::start(&config).map_err(|e| ServeError::Config(e.to_string()))?;
    let jwt = auth::Jwt::new(secret.as_bytes(), config.access_ttl, config.refresh_ttl);
    let max_connections =
        config.max_connections.unwrap_or_else(|| cli::default_max_connections(cli::open_file_limit()));
    let local = listener.local_addr()?;
    let app = Arc::new(App::new(config, store.clone(), hub.clone(), index.clone(), accounts, jwt, mail, media));

    let loader = tokio::spawn(recover(app.clone(), local));
    tracing::info!(%local, max_connections, "listening");
    http::serve(listener, app.clone(), shutdown, max_connections).await;

    tracing::info!("shutting down: closing WebSockets with 1001, flushing the store");
    loader.abort();
    hub.close_all(Close::SHUTDOWN);
    // Writers flush their queues and close frames within their 1 s grace.
    let deadline = Instant::now() + Duration::from_secs(2);
    while hub.socket_counts() != (0, 0) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    store.shutdown().await;
    app.mail.flush(Duration::from_secs(2)).await;
    Ok(())
}

/// Loads the index and open requests, then marks the server ready.
async fn recover(app: Arc<App>, local: std::net::SocketAddr) {
    let started = Instant::now();
    let result: Result<(), sanjevani_engine::Error> = async {
        let progress = Progress::start("loading pharmacies", None);
        let pharmacies = app.store.load_pharmacies().await?;
        let cards: Vec<_> = pharmacies.iter().filter(|p| p.approved).map(card).collect();
        let approved = cards.len();
        app.index.replace_all(cards);
        progress.finish(approved as u64, "approved pharmacies indexed");
        let progress = Progress::start("loading open requests", None);
        let config = LifecycleConfig { request_ttl: app.config.request_ttl };
        let lifecycle =
            Lifecycle::start(app.store.clone(), app.hub.clone(), app.index.clone(), app.media.clone(), config).await?;
        let pending = lifecycle.stats().pending.load(std::sync::atomic::Ordering::Relaxed);
        progress.finish(pending.max(0) as u64, "requests pending");
        if app.config.demo {
            match demo::load_demo(&app.accounts).await {
                Ok(report) => {
                    let url = demo::console_url(app.config.public_url.as_deref(), local);
                    demo::print_logins(&report, &url);
                }
                Err(error) => tracing::error!(%error, "demo data could not be loaded"),
            }
        }
        app.set_ready(lifecycle);
        // The index may have grown since it was loaded (the demo registers pharmacies).
        let approved = app.index.len();
        tracing::info!(approved, pending, millis = started.elapsed().as_millis() as u64, "ready");
        Ok(())
    }
    .await;
    if let Err(error) = result {
        tracing::error!(%error, "recovery failed; the server stays unready");
    }
}
