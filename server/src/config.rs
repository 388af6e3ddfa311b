//! The server's settings, resolved once at start-up by `cli` (flag > `SANJEVANI_*` environment >
//! `.env` > default, with the original deployment's `.env` keys as fallbacks) and then read-only.
//! Tests build a `Config` directly with `Config::for_tests`.

use ipnet::IpNet;
use sanjevani_engine::accounts::Approval;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// `--cors-origins`: which browser origins may call the API.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum CorsOrigins {
    /// No origin gets CORS headers (default).
    #[default]
    None,
    /// `*`: every origin.
    Any,
    /// These exact origins (`scheme://host[:port]`).
    List(Vec<String>),
}

impl CorsOrigins {
    /// Parses `*` or a comma-separated list; empty means none.
    pub fn parse(s: &str) -> CorsOrigins {
        let s = s.trim();
        if s == "*" {
            return CorsOrigins::Any;
        }
        let list: Vec<String> =
            s.split(',').map(|o| o.trim().trim_end_matches('/').to_string()).filter(|o| !o.is_empty()).collect();
        if list.is_empty() { CorsOrigins::None } else { CorsOrigins::List(list) }
    }

    /// Whether `origin` is allowed.
    pub fn allows(&self, origin: &str) -> bool {
        match self {
            CorsOrigins::None => false,
            CorsOrigins::Any => true,
            CorsOrigins::List(list) => list.iter().any(|o| o.eq_ignore_ascii_case(origin)),
        }
    }
}

/// Everything `serve` needs.
#[derive(Debug, Clone)]
pub struct Config {
    /// `--bind` (informational inside `run`, which gets a bound listener; also an allowed host).
    pub bind: SocketAddr,
    /// `--data-dir`: SQLite database, media folder, generated JWT secret, lock file.
    pub data_dir: PathBuf,
    /// `--demo`: load the embedded demo data where those accounts are missing.
    pub demo: bool,
    /// `--smtp-url`; `None` logs OTP codes instead of mailing them.
    pub smtp_url: Option<String>,
    /// `--smtp-ca`: an extra CA certificate (PEM) for a private mail server.
    pub smtp_ca: Option<PathBuf>,
    /// `--mail-from`.
    pub mail_from: String,
    /// `--jwt-secret` (≥ 32 bytes); `None`: a random one kept in the data dir.
    pub jwt_secret: Option<String>,
    /// `--access-ttl` (5 min).
    pub access_ttl: Duration,
    /// `--refresh-ttl` (1 day).
    pub refresh_ttl: Duration,
    /// `--request-ttl` (15 min).
    pub request_ttl: Duration,
    /// `--public-url`: base of absolute media URLs; `None`: the request's Host.
    pub public_url: Option<String>,
    /// `--allowed-hosts`: Host header values accepted (no port); empty: the defaults
    /// (`localhost`, `127.0.0.1`, `[::1]`, the bind address, the public URL's host). `*` allows any.
    pub allowed_hosts: Vec<String>,
    /// `--trusted-proxy`: peers whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<IpNet>,
    /// `--cors-origins`.
    pub cors_origins: CorsOrigins,
    /// `--max-upload` in bytes (10 MiB).
    pub max_upload: u64,
    /// `--max-connections`; `None`: the open-file limit minus 256.
    pub max_connections: Option<usize>,
    /// `--pharmacy-approval`.
    pub pharmacy_approval: Approval,
    /// `--metrics-token`: bearer token `/metrics` requires, if set.
    pub metrics_token: Option<String>,
    /// `--rate-limits on|off`.
    pub rate_limits: bool,
    /// `--ws-ping` (20 s).
    pub ws_ping: Duration,
    /// `--ws-idle` (60 s).
    pub ws_idle: Duration,
    /// `--ws-queue` (1024 messages).
    pub ws_queue: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            bind: SocketAddr::from(([127, 0, 0, 1], 8000)),
            data_dir: PathBuf::from("./var"),
            demo: false,
            smtp_url: None,
            smtp_ca: None,
            mail_from: "Sanjevani <no-reply@sanjevani.local>".into(),
            jwt_secret: None,
            access_ttl: Duration::from_secs(5 * 60),
            refresh_ttl: Duration::from_secs(24 * 3600),
            request_ttl: Duration::from_secs(15 * 60),
            public_url: None,
            allowed_hosts: Vec::new(),
            trusted_proxies: Vec::new(),
            cors_origins: CorsOrigins::None,
            max_upload: 10 * 1024 * 1024,
            max_connections: None,
            pharmacy_approval: Approval::Auto,
            metrics_token: None,
            rate_limits: true,
            ws_ping: Duration::from_secs(20),
            ws_idle: Duration::from_secs(60),
            ws_queue: 1024,
        }
    }
}

impl Config {
    /// Defaults with the given data dir, for tests.
    pub fn for_tests(data_dir: impl Into<PathBuf>) -> Config {
        Config { data_dir: data_dir.into(), ..Config::default() }
    }
}
