//! The command line: `sanjevani serve`, `sanjevani admin create`, and how every `serve` setting is
//! resolved into a [`Config`].
//!
//! Each setting comes from the first of: the flag, the environment variable `SANJEVANI_<FLAG>`
//! (upper case, `-` → `_`), the same key in a `.env` file in the working directory, and the
//! default. The original Django deployment's `.env` keys (`SECRET_KEY`, `EMAIL_HOST_USER` +
//! `EMAIL_HOST_PASSWORD`, `CORS_ALLOWED_ORIGINS`) are read as fallbacks when no new source sets
//! the setting, so an existing deployment's file works unchanged; `DEBUG`, `REDIS_HOST` and
//! `REDIS_PORT` are noted as ignored. Clap only collects the raw flag strings: the environment and
//! `.env` are passed in as maps and every value is parsed here by one set of parsers, so the
//! precedence is a pure function ([`resolve_noted`]) that tests drive without touching the
//! process environment, and a bad value gets the same error naming the flag and where it came
//! from, whichever source set it. Secrets (`--jwt-secret`, `--smtp-url`, `--metrics-token`,
//! `EMAIL_HOST_PASSWORD`) are never echoed in errors or logs.

use crate::config::{Config, CorsOrigins};
use clap::{Args, Parser, Subcommand};
use ipnet::IpNet;
use sanjevani_engine::accounts::Approval;
use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Prefix of the environment (and `.env`) keys that mirror the flags.
pub const ENV_PREFIX: &str = "SANJEVANI_";

/// File descriptors kept back from `--max-connections`' default for the store, media files, mail
/// and logs.
pub const RESERVED_FDS: u64 = 256;

/// Smallest default `--max-connections`, whatever the open-file limit says.
pub const MIN_DEFAULT_CONNECTIONS: usize = 16;

/// Shortest `--jwt-secret` accepted, in bytes (HS256 wants a key at least as long as its hash).
pub const MIN_JWT_SECRET_BYTES: usize = 32;

/// Every `serve` flag, in `--help` order; each also reads `SANJEVANI_<FLAG>`.
pub const SERVE_FLAGS: &[&str] = &[
    "bind",
    "data-dir",
    "demo",
    "smtp-url",
    "smtp-ca",
    "mail-from",
    "jwt-secret",
    "access-ttl",
    "refresh-ttl",
    "request-ttl",
    "public-url",
    "allowed-hosts",
    "trusted-proxy",
    "cors-origins",
    "max-upload",
    "max-connections",
    "pharmacy-approval",
    "metrics-token",
    "rate-limits",
    "ws-ping",
    "ws-idle",
    "ws-queue",
];

/// Flags whose values are secret: never echoed in an error or a log line.
const SECRET_FLAGS: &[&str] = &["jwt-secret", "smtp-url", "metrics-token"];

const SOURCES_HELP: &str = "Every serve flag may also be set by the environment variable SANJEVANI_<FLAG> (upper case, \
'-' becomes '_'), or by the same key in a .env file in the working directory; a flag beats the \
environment, which beats .env, which beats the default. The original deployment's .env keys \
SECRET_KEY, EMAIL_HOST_USER + EMAIL_HOST_PASSWORD and CORS_ALLOWED_ORIGINS are used when the new \
setting is absent. Durations are humantime (30s, 15m, 1h, 1d), sizes IEC or SI (10MiB, 500KB) \
or bytes, booleans true/false.";

/// `sanjevani`: the command line.
#[derive(Debug, Parser)]
#[command(name = "sanjevani", version, about = "Sanjevani: nearby pharmacies answer medicine requests live.")]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Runs the server.
    #[command(after_help = SOURCES_HELP)]
    Serve(Box<ServeArgs>),
    /// Administrative commands; they write the data dir and refuse to run while `serve` holds it.
    #[command(subcommand)]
    Admin(AdminCommand),
    /// Writes a synthetic city (accounts, approved pharmacies, optional open requests) straight
    /// into the data dir for load tests, and long-lived tokens for its accounts into a JSON file.
    /// Refuses to run while `serve` holds the data dir.
    GenerateCity(Box<GenerateCityArgs>),
}

/// `sanjevani generate-city`.
#[derive(Debug, Clone, Args)]
pub struct GenerateCityArgs {
    /// Pharmacies to create, each with its PHARMACY account, all approved.
    #[arg(long, value_name = "N")]
    pub pharmacies: usize,
    /// CUSTOMER accounts to create.
    #[arg(long, value_name = "M")]
    pub customers: usize,
    /// Seed of every random choice; emails carry it, so cities of different seeds can share a dir.
    #[arg(long, value_name = "S", default_value_t = 1)]
    pub seed: u64,
    /// The city's centre.
    #[arg(long, value_name = "LAT,LNG", default_value = "27.7172,85.3240")]
    pub center: String,
    /// Data dir holding the database [default: ./var] [env: SANJEVANI_DATA_DIR].
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<String>,
    /// PENDING requests to create, each with its recipients from the engine's index.
    #[arg(long, value_name = "R", default_value_t = 0)]
    pub open_requests: usize,
    /// Recipients each open request's radius is chosen for (radius 1-50 km).
    #[arg(long, value_name = "K", default_value_t = 50)]
    pub recipients: usize,
    /// How long the open requests stay open.
    #[arg(long, value_name = "DURATION", default_value = "1d")]
    pub request_ttl: String,
    /// The tokens file to write.
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    /// Secret signing the tokens [default: as serve resolves it: SANJEVANI_JWT_SECRET, .env, or
    /// the data dir's generated secret].
    #[arg(long, value_name = "SECRET")]
    pub jwt_secret: Option<String>,
    /// Lifetime of the minted access and refresh tokens.
    #[arg(long, value_name = "DURATION", default_value = "7d")]
    pub token_ttl: String,
    /// The password every generated account shares (printed).
    #[arg(long, value_name = "PASSWORD", default_value = crate::city::DEFAULT_PASSWORD)]
    pub password: String,
    /// `base_url` to write into the tokens file, e.g. http://127.0.0.1:8000.
    #[arg(long, value_name = "URL")]
    pub base_url: Option<String>,
    /// List only the first N pharmacies (a uniform sample) in the tokens file [default: all].
    #[arg(long, value_name = "N")]
    pub token_limit: Option<usize>,
    /// Radius of the disc the city lies in, km [default: 30 × max(1, √(N / 10,000))].
    #[arg(long, value_name = "KM")]
    pub edge_km: Option<f64>,
    /// Standard deviation of the dense centre, km [default: a quarter of the edge radius].
    #[arg(long, value_name = "KM")]
    pub sigma_km: Option<f64>,
    /// Share of pharmacies and request locations in the dense centre (0-1).
    #[arg(long, value_name = "SHARE", default_value_t = 0.5)]
    pub dense_share: f64,
}

/// Parses `lat,lng` into a validated point.
pub fn parse_center(s: &str) -> Result<sanjevani_engine::geo::LatLng, String> {
    let (lat, lng) = s.split_once(',').ok_or_else(|| format!("{s:?} is not LAT,LNG"))?;
    let number = |v: &str| v.trim().parse::<f64>().map_err(|_| format!("{s:?} is not LAT,LNG"));
    sanjevani_engine::geo::LatLng::new(number(lat)?, number(lng)?).map_err(|e| format!("{s:?}: {e}"))
}

/// `sanjevani admin ...`.
#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// Creates an ADMIN account.
    Create(AdminCreateArgs),
}

/// `sanjevani admin create`.
#[derive(Debug, Clone, Default, Args)]
pub struct AdminCreateArgs {
    /// The admin's email.
    #[arg(long, value_name = "EMAIL")]
    pub email: String,
    /// The admin's password (at least 8 characters); read from the first line of standard input
    /// when absent, so it need not appear in the process list.
    #[arg(long, value_name = "PASSWORD")]
    pub password: Option<String>,
    /// The admin's display name.
    #[arg(long, value_name = "NAME", default_value = "Admin")]
    pub name: String,
    /// Data dir holding the database [default: ./var] [env: SANJEVANI_DATA_DIR].
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<String>,
}

/// `sanjevani serve`: the raw flag values, `None` where the flag was not given. Parsing happens
/// in [`resolve_noted`], the same for every source.
#[derive(Debug, Clone, Default, Args)]
pub struct ServeArgs {
    /// Address to listen on [default: 127.0.0.1:8000].
    #[arg(long, value_name = "ADDR")]
    pub bind: Option<String>,
    /// Directory for the database, media and generated secret; created if missing [default: ./var].
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<String>,
    /// Load the demo accounts where missing and print their logins (`--demo=false` to turn off).
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub demo: Option<String>,
    /// Mail server: smtp://host:port, smtp://user:pass@host:587?tls=required or
    /// smtps://user:pass@host:465 [default: none, OTP codes are logged].
    #[arg(long, value_name = "URL")]
    pub smtp_url: Option<String>,
    /// Extra CA certificate (PEM) for a private mail server.
    #[arg(long, value_name = "FILE")]
    pub smtp_ca: Option<String>,
    /// Sender address of OTP mails [default: Sanjevani <no-reply@sanjevani.local>].
    #[arg(long, value_name = "ADDRESS")]
    pub mail_from: Option<String>,
    /// Secret signing the JWTs, at least 32 bytes [default: a random one kept in the data dir].
    #[arg(long, value_name = "SECRET")]
    pub jwt_secret: Option<String>,
    /// Lifetime of access tokens [default: 5m].
    #[arg(long, value_name = "DURATION")]
    pub access_ttl: Option<String>,
    /// Lifetime of refresh tokens [default: 1d].
    #[arg(long, value_name = "DURATION")]
    pub refresh_ttl: Option<String>,
    /// How long a request waits for an acceptance before it expires [default: 15m].
    #[arg(long, value_name = "DURATION")]
    pub request_ttl: Option<String>,
    /// Public base URL of absolute media URLs, http(s) [default: the request's Host].
    #[arg(long, value_name = "URL")]
    pub public_url: Option<String>,
    /// Comma-separated Host values accepted, or `*` [default: localhost, 127.0.0.1, [::1], the
    /// bind address].
    #[arg(long, value_name = "HOSTS")]
    pub allowed_hosts: Option<String>,
    /// Comma-separated CIDRs of proxies whose X-Forwarded-For is believed; a bare IP is one host.
    #[arg(long, value_name = "CIDRS")]
    pub trusted_proxy: Option<String>,
    /// Comma-separated origins allowed by CORS, or `*` [default: none].
    #[arg(long, value_name = "ORIGINS")]
    pub cors_origins: Option<String>,
    /// Largest multipart upload [default: 10MiB].
    #[arg(long, value_name = "SIZE")]
    pub max_upload: Option<String>,
    /// Most sockets open at once [default: the open-file limit minus 256].
    #[arg(long, value_name = "N")]
    pub max_connections: Option<String>,
    /// `auto` approves new pharmacies at once, `manual` waits for an admin [default: auto].
    #[arg(long, value_name = "auto|manual")]
    pub pharmacy_approval: Option<String>,
    /// Bearer token /metrics requires [default: none, /metrics is open].
    #[arg(long, value_name = "TOKEN")]
    pub metrics_token: Option<String>,
    /// Per-IP and per-email rate limits; `off` only for load tests [default: on].
    #[arg(long, value_name = "on|off")]
    pub rate_limits: Option<String>,
    /// Interval of WebSocket pings [default: 20s].
    #[arg(long, value_name = "DURATION")]
    pub ws_ping: Option<String>,
    /// A WebSocket silent this long is closed [default: 60s].
    #[arg(long, value_name = "DURATION")]
    pub ws_idle: Option<String>,
    /// Messages a WebSocket may have queued before it is cut as too slow [default: 1024].
    #[arg(long, value_name = "N")]
    pub ws_queue: Option<String>,
}

impl ServeArgs {
    /// The raw flag value of `flag` (one of [`SERVE_FLAGS`]).
    fn get(&self, flag: &str) -> Option<&str> {
        let value = match flag {
            "bind" => &self.bind,
            "data-dir" => &self.data_dir,
            "demo" => &self.demo,
            "smtp-url" => &self.smtp_url,
            "smtp-ca" => &self.smtp_ca,
            "mail-from" => &self.mail_from,
            "jwt-secret" => &self.jwt_secret,
            "access-ttl" => &self.access_ttl,
            "refresh-ttl" => &self.refresh_ttl,
            "request-ttl" => &self.request_ttl,
            "public-url" => &self.public_url,
            "allowed-hosts" => &self.allowed_hosts,
            "trusted-proxy" => &self.trusted_proxy,
            "cors-origins" => &self.cors_origins,
            "max-upload" => &self.max_upload,
            "max-connections" => &self.max_connections,
            "pharmacy-approval" => &self.pharmacy_approval,
            "metrics-token" => &self.metrics_token,
            "rate-limits" => &self.rate_limits,
            "ws-ping" => &self.ws_ping,
            "ws-idle" => &self.ws_idle,
            "ws-queue" => &self.ws_queue,
            _ => &None,
        };
        value.as_deref()
    }
}

/// A setting that cannot be used, or a `.env` file that cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// A value is invalid; names the flag and where the value came from.
    #[error("--{flag} (from {origin}): {reason}")]
    Invalid {
        /// The flag, without `--`.
        flag: &'static str,
        /// Where the value came from, e.g. "the command line" or "SANJEVANI_ACCESS_TTL in .env".
        origin: String,
        /// What is wrong (the value is quoted unless it is a secret).
        reason: String,
    },
    /// The `.env` file exists but cannot be read or parsed.
    #[error("{path}: {reason}")]
    DotEnv {
        /// The file.
        path: String,
        /// What is wrong (never the content of the line, which may hold a secret).
        reason: String,
    },
}

impl ConfigError {
    /// The flag an `Invalid` error names.
    pub fn flag(&self) -> Option<&'static str> {
        match self {
            ConfigError::Invalid { flag, .. } => Some(flag),
            ConfigError::DotEnv { .. } => None,
        }
    }
}

/// Where a setting's value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// The command line.
    Flag,
    /// A `SANJEVANI_*` environment variable.
    Env(String),
    /// A `SANJEVANI_*` key in `.env`.
    DotEnv(String),
    /// One of the original deployment's `.env` keys.
    Original(&'static str),
    /// The default.
    Default,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Flag => f.write_str("the command line"),
            Origin::Env(key) => write!(f, "environment variable {key}"),
            Origin::DotEnv(key) => write!(f, "{key} in .env"),
            Origin::Original(key) => write!(f, "{key} in .env, the original deployment's key"),
            Origin::Default => f.write_str("the default"),
        }
    }
}

/// How loud a [`Note`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoteLevel {
    /// Logged at info.
    Info,
    /// Logged at warn.
    Warn,
}

/// Something resolution wants logged (an original key used or ignored, a computed default).
/// Collected rather than logged on the spot so that tests can check them; never holds a secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note {
    /// How loud.
    pub level: NoteLevel,
    /// The sentence.
    pub message: String,
}

/// A resolved configuration and what to log about it.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// The settings.
    pub config: Config,
    /// What to log, in order.
    pub notes: Vec<Note>,
}

impl Resolved {
    /// Logs the notes through `tracing`.
    pub fn log(&self) {
        for note in &self.notes {
            match note.level {
                NoteLevel::Info => tracing::info!("{}", note.message),
                NoteLevel::Warn => tracing::warn!("{}", note.message),
            }
        }
    }
}

/// The `SANJEVANI_*` variables of the process environment (values not valid UTF-8 are converted
/// lossily, so they fail parsing with an error naming the variable rather than vanish).
pub fn sanjevani_env() -> HashMap<String, String> {
    std::env::vars_os()
        .filter_map(|(key, value)| {
            let key = key.into_string().ok()?;
            key.starts_with(ENV_PREFIX).then(|| (key, value.to_string_lossy().into_owned()))
        })
        .collect()
}

/// Reads a `.env` file into a map without touching the process environment. A missing file is
/// an empty map. Lines dotenvy refuses but python-dotenv (which the original used) accepts, such
/// as `EMAIL_HOST_PASSWORD=abcd efgh ijkl mnop` (a Gmail app password as Google shows it), are
/// read as python-dotenv reads them. Any other bad line is an error naming its line number (not
/// its content, which may hold a secret).
pub fn read_dotenv(path: &Path) -> Result<HashMap<String, String>, ConfigError> {
    let shown = path.display().to_string();
    let content = match std::fs::read_to_string(path) {
        Ok(content) => content,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(HashMap::new()),
        Err(e) => return Err(ConfigError::DotEnv { path: shown, reason: format!("cannot read it: {e}") }),
    };
    let lines: Vec<&str> = content.lines().collect();
    // Lines before this one were already matched to an error, so a repeated value is matched to
    // the next line that has it, in file order as dotenvy reports them.
    let mut next_line = 0;
    let mut map = HashMap::new();
    for item in dotenvy::from_read_iter(content.as_bytes()) {
        match item {
            Ok((key, value)) => {
                map.insert(key, value);
            }
            // dotenvy reports only the refused value, not its key: find the line it came from.
            Err(dotenvy::Error::LineParse(fragment, _)) => {
                let fragment = fragment.trim();
                let lenient = lines.iter().enumerate().skip(next_line).find_map(|(i, line)| {
                    python_dotenv_line(line).filter(|(_, value)| value == fragment).map(|kv| (i, kv))
                });
                if let Some((i, (key, value))) = lenient {
                    next_line = i + 1;
                    map.insert(key, value);
                    continue;
                }
                let number = lines.iter().skip(next_line).position(|l| l.contains(fragment)).map(|i| next_line + i + 1);
                let reason = match number {
                    Some(number) => format!("line {number} is not KEY=VALUE"),
                    None => "a line is not KEY=VALUE (an unclosed quote?)".to_string(),
                };
                return Err(ConfigError::DotEnv { path: shown, reason });
            }
            Err(e) => return Err(ConfigError::DotEnv { path: shown, reason: e.to_string() }),
        }
    }
    Ok(map)
}

/// python-dotenv's reading of an unquoted line: `[export ]KEY=value with spaces  # comment` →
/// the value up to an inline ` #` comment, trimmed. `None` for anything else (quoted values that
/// dotenvy refused are really broken).
fn python_dotenv_line(line: &str) -> Option<(String, String)> {
    let line = line.trim();
    let line = line.strip_prefix("export ").map_or(line, str::trim_start);
    let (key, value) = line.split_once('=')?;
    let key = key.trim();
    let valid_key = key.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
        && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.');
    let value = value.trim();
    if !valid_key || value.starts_with(['"', '\'']) {
        return None;
    }
    let value = value.find(" #").map_or(value, |i| &value[..i]).trim_end();
    Some((key.to_string(), value.to_string()))
}

/// The environment key mirroring `flag`: `SANJEVANI_` + upper case, `-` → `_`.
pub fn env_key(flag: &str) -> String {
    format!("{ENV_PREFIX}{}", flag.to_ascii_uppercase().replace('-', "_"))
}

/// A raw value and where it came from.
#[derive(Debug, Clone)]
struct Raw {
    value: String,
    origin: Origin,
}

/// The sources of one resolution, in precedence order.
struct Sources<'a> {
    args: &'a ServeArgs,
    env: &'a HashMap<String, String>,
    dotenv: &'a HashMap<String, String>,
}

impl Sources<'_> {
    /// The first non-empty value of `flag` among flag, environment and `.env` (the original's
    /// keys are not consulted here). An empty value counts as unset, so `KEY=` in a file is
    /// harmless.
    fn get(&self, flag: &'static str) -> Option<Raw> {
        let non_empty = |s: &str| !s.trim().is_empty();
        if let Some(value) = self.args.get(flag).filter(|v| non_empty(v)) {
            return Some(Raw { value: value.to_string(), origin: Origin::Flag });
        }
        let key = env_key(flag);
        if let Some(value) = self.env.get(&key).filter(|v| non_empty(v)) {
            return Some(Raw { value: value.clone(), origin: Origin::Env(key) });
        }
        if let Some(value) = self.dotenv.get(&key).filter(|v| non_empty(v)) {
            return Some(Raw { value: value.clone(), origin: Origin::DotEnv(key) });
        }
        None
    }

    /// A non-empty original key from `.env`.
    fn original(&self, key: &'static str) -> Option<&str> {
        self.dotenv.get(key).map(String::as_str).filter(|v| !v.trim().is_empty())
    }
}

/// Parses `raw` with `parse`, turning a failure into an error naming the flag and origin. The
/// value is quoted in the error unless the flag is secret.
fn parse<T>(flag: &'static str, raw: &Raw, parser: impl FnOnce(&str) -> Result<T, String>) -> Result<T, ConfigError> {
    parser(raw.value.trim()).map_err(|reason| {
        let reason = if SECRET_FLAGS.contains(&flag) { reason } else { format!("{:?} {reason}", raw.value.trim()) };
        ConfigError::Invalid { flag, origin: raw.origin.to_string(), reason }
    })
}

/// Resolves the `serve` settings and logs what the resolution notes. See [`resolve_noted`].
pub fn resolve(
    args: ServeArgs,
    env: &HashMap<String, String>,
    dotenv: &HashMap<String, String>,
) -> Result<Config, ConfigError> {
    let resolved = resolve_noted(args, env, dotenv)?;
    resolved.log();
    Ok(resolved.config)
}

/// Resolves every `serve` setting: flag > `env` (`SANJEVANI_*`) > `dotenv` (`SANJEVANI_*`, then
/// the original's keys) > default, validating each value. Pure apart from reading the open-file
/// limit for `--max-connections`' default.
pub fn resolve_noted(
    args: ServeArgs,
    env: &HashMap<String, String>,
    dotenv: &HashMap<String, String>,
) -> Result<Resolved, ConfigError> {
    let src = Sources { args: &args, env, dotenv };
    let mut notes = Vec::new();
    let mut config = Config::default();
    let info = |notes: &mut Vec<Note>, message: String| notes.push(Note { level: NoteLevel::Info, message });
    let warn = |notes: &mut Vec<Note>, message: String| notes.push(Note { level: NoteLevel::Warn, message });

    for (key, why) in [
        ("DEBUG", "there is no debug mode"),
        ("REDIS_HOST", "no Redis is needed"),
        ("REDIS_PORT", "no Redis is needed"),
    ] {
        if dotenv.contains_key(key) {
            info(&mut notes, format!("{key} in .env is ignored: {why}"));
        }
    }
    for key in env.keys().chain(dotenv.keys()) {
        if let Some(flag) = key.strip_prefix(ENV_PREFIX)
            && !SERVE_FLAGS.iter().any(|f| env_key(f) == *key)
        {
            let place = if env.contains_key(key) { "environment variable" } else { "key in .env" };
            warn(&mut notes, format!("unknown {place} {key} is ignored (no flag --{})", flag_name(flag)));
        }
    }

    if let Some(raw) = src.get("bind") {
        config.bind = parse("bind", &raw, |s| {
            s.parse::<SocketAddr>().map_err(|_| "is not an address such as 127.0.0.1:8000 or [::]:8000".to_string())
        })?;
    }
    if let Some(raw) = src.get("data-dir") {
        config.data_dir = PathBuf::from(raw.value.trim());
    }
    if let Some(raw) = src.get("demo") {
        config.demo = parse("demo", &raw, parse_bool)?;
    }

    // Mail: the new settings, else the original's Gmail account.
    let gmail_user = src.original("EMAIL_HOST_USER").map(str::trim);
    let gmail_password = src.original("EMAIL_HOST_PASSWORD");
    if let Some(raw) = src.get("smtp-url") {
        config.smtp_url = Some(parse("smtp-url", &raw, parse_smtp_url)?);
        if gmail_user.is_some() || gmail_password.is_some() {
            info(
                &mut notes,
                format!("EMAIL_HOST_USER/EMAIL_HOST_PASSWORD in .env not used: --smtp-url is set by {}", raw.origin),
            );
        }
    } else {
        match (gmail_user, gmail_password) {
            (Some(user), Some(password)) => {
                config.smtp_url = Some(gmail_smtp_url(user, password));
                info(
                    &mut notes,
                    format!(
                        "using EMAIL_HOST_USER and EMAIL_HOST_PASSWORD from .env (the original's keys): mail goes \
                         through smtp.gmail.com:465 as {user}"
                    ),
                );
            }
            (Some(_), None) => {
                warn(&mut notes, "EMAIL_HOST_USER in .env without EMAIL_HOST_PASSWORD: no mail server set".into())
            }
            (None, Some(_)) => {
                warn(&mut notes, "EMAIL_HOST_PASSWORD in .env without EMAIL_HOST_USER: no mail server set".into())
            }
            (None, None) => {}
        }
    }
    if let Some(raw) = src.get("smtp-ca") {
        config.smtp_ca = Some(PathBuf::from(raw.value.trim()));
    }
    if let Some(raw) = src.get("mail-from") {
        config.mail_from = parse("mail-from", &raw, parse_mail_from)?;
    } else if let Some(user) = gmail_user {
        let raw = Raw { value: user.to_string(), origin: Origin::Original("EMAIL_HOST_USER") };
        config.mail_from = parse("mail-from", &raw, parse_mail_from)?;
        info(&mut notes, format!("using EMAIL_HOST_USER from .env (the original's key) as --mail-from {user}"));
    }

    // The JWT secret: the new setting, else the original's SECRET_KEY so clients stay signed in.
    if let Some(raw) = src.get("jwt-secret") {
        config.jwt_secret = Some(parse("jwt-secret", &raw, parse_jwt_secret)?);
        if src.original("SECRET_KEY").is_some() {
            info(&mut notes, format!("SECRET_KEY in .env not used: --jwt-secret is set by {}", raw.origin));
        }
    } else if let Some(secret) = src.original("SECRET_KEY") {
        let raw = Raw { value: secret.to_string(), origin: Origin::Original("SECRET_KEY") };
        config.jwt_secret = Some(parse("jwt-secret", &raw, parse_jwt_secret)?);
        info(
            &mut notes,
            "using SECRET_KEY from .env (the original's key) as --jwt-secret: its tokens stay valid".to_string(),
        );
    }

    if let Some(raw) = src.get("access-ttl") {
        config.access_ttl = parse("access-ttl", &raw, parse_duration)?;
    }
    if let Some(raw) = src.get("refresh-ttl") {
        config.refresh_ttl = parse("refresh-ttl", &raw, parse_duration)?;
    }
    if let Some(raw) = src.get("request-ttl") {
        config.request_ttl = parse("request-ttl", &raw, parse_duration)?;
    }
    if let Some(raw) = src.get("public-url") {
        config.public_url = Some(parse("public-url", &raw, parse_public_url)?);
    }
    if let Some(raw) = src.get("allowed-hosts") {
        config.allowed_hosts = parse("allowed-hosts", &raw, parse_allowed_hosts)?;
    }
    if let Some(raw) = src.get("trusted-proxy") {
        config.trusted_proxies = parse("trusted-proxy", &raw, |s| parse_list(s, parse_cidr))?;
    }
    if let Some(raw) = src.get("cors-origins") {
        config.cors_origins = parse("cors-origins", &raw, parse_cors_origins)?;
        if src.original("CORS_ALLOWED_ORIGINS").is_some() {
            info(&mut notes, format!("CORS_ALLOWED_ORIGINS in .env not used: --cors-origins is set by {}", raw.origin));
        }
    } else if let Some(origins) = src.original("CORS_ALLOWED_ORIGINS") {
        let raw = Raw { value: origins.to_string(), origin: Origin::Original("CORS_ALLOWED_ORIGINS") };
        config.cors_origins = parse("cors-origins", &raw, parse_cors_origins)?;
        info(
            &mut notes,
            format!("using CORS_ALLOWED_ORIGINS from .env (the original's key) as --cors-origins {}", origins.trim()),
        );
    }
    if let Some(raw) = src.get("max-upload") {
        config.max_upload = parse("max-upload", &raw, parse_size)?;
    }

    let fd_limit = open_file_limit();
    config.max_connections = Some(match src.get("max-connections") {
        Some(raw) => {
            let n = parse("max-connections", &raw, |s| parse_count(s, 1))?;
            if let Some(limit) = fd_limit
                && n as u64 > limit
            {
                warn(
                    &mut notes,
                    format!("--max-connections {n} exceeds the open-file limit {limit}: accepts may fail with EMFILE"),
                );
            }
            info(&mut notes, format!("max connections: {n} (set by {})", raw.origin));
            n
        }
        None => {
            let n = default_max_connections(fd_limit);
            match fd_limit {
                Some(limit) => info(
                    &mut notes,
                    format!(
                        "max connections: {n} (open-file limit {limit} minus {RESERVED_FDS}, at least {MIN_DEFAULT_CONNECTIONS})"
                    ),
                ),
                None => warn(&mut notes, format!("max connections: {n} (the open-file limit could not be read)")),
            }
            n
        }
    });

    if let Some(raw) = src.get("pharmacy-approval") {
        config.pharmacy_approval = parse("pharmacy-approval", &raw, parse_approval)?;
    }
    if let Some(raw) = src.get("metrics-token") {
        config.metrics_token = Some(raw.value.trim().to_string());
    }
    if let Some(raw) = src.get("rate-limits") {
        config.rate_limits = parse("rate-limits", &raw, parse_bool)?;
    }
    if !config.rate_limits {
        warn(&mut notes, "RATE LIMITS ARE OFF (--rate-limits off): for load tests only, never in production".into());
    }
    if let Some(raw) = src.get("ws-ping") {
        config.ws_ping = parse("ws-ping", &raw, parse_duration)?;
    }
    if let Some(raw) = src.get("ws-idle") {
        config.ws_idle = parse("ws-idle", &raw, parse_duration)?;
    }
    if config.ws_idle <= config.ws_ping {
        warn(
            &mut notes,
            format!(
                "--ws-idle {} is not longer than --ws-ping {}: idle clients may be closed before they are pinged",
                humantime::format_duration(config.ws_idle),
                humantime::format_duration(config.ws_ping)
            ),
        );
    }
    if let Some(raw) = src.get("ws-queue") {
        config.ws_queue = parse("ws-queue", &raw, |s| parse_count(s, 1))?;
    }

    Ok(Resolved { config, notes })
}

/// The `--data-dir` of commands other than `serve` (flag > `SANJEVANI_DATA_DIR` > `.env` >
/// `./var`), so that `admin create` finds the database `serve` uses.
pub fn resolve_data_dir(
    flag: Option<&str>,
    env: &HashMap<String, String>,
    dotenv: &HashMap<String, String>,
) -> PathBuf {
    let args = ServeArgs { data_dir: flag.map(str::to_string), ..ServeArgs::default() };
    let src = Sources { args: &args, env, dotenv };
    src.get("data-dir").map_or_else(|| Config::default().data_dir, |raw| PathBuf::from(raw.value.trim()))
}

/// `SANJEVANI_ACCESS_TTL`'s tail `ACCESS_TTL` as the flag name `access-ttl`.
fn flag_name(env_tail: &str) -> String {
    env_tail.to_ascii_lowercase().replace('_', "-")
}

/// The soft `RLIMIT_NOFILE`, if it can be read (`u64::MAX` for unlimited).
pub fn open_file_limit() -> Option<u64> {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit only writes the struct we pass, which lives for the call.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    if rc != 0 {
        return None;
    }
    Some(if limit.rlim_cur == libc::RLIM_INFINITY { u64::MAX } else { limit.rlim_cur })
}

/// `--max-connections`' default for an open-file limit: the limit minus [`RESERVED_FDS`], at
/// least [`MIN_DEFAULT_CONNECTIONS`]; an unknown or unlimited limit counts as 65,536.
pub fn default_max_connections(fd_limit: Option<u64>) -> usize {
    let limit = fd_limit.unwrap_or(65_536).min(1 << 20);
    usize::try_from(limit.saturating_sub(RESERVED_FDS)).unwrap_or(usize::MAX).max(MIN_DEFAULT_CONNECTIONS)
}

/// A humantime duration greater than zero (`30s`, `15m`, `1h`, `1d`, `1h 30m`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("is not a duration such as 30s, 15m or 1d: {e}"))?;
    if d.is_zero() {
        return Err("must be longer than zero".into());
    }
    Ok(d)
}

/// A size in bytes: plain bytes (`1048576`, `512B`), IEC (`KiB`, `MiB`, `GiB`) or SI (`KB`, `MB`,
/// `GB`), units case-insensitive, a space allowed before the unit; greater than zero.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(split);
    let hint = "use bytes or a size such as 10MiB, 512KiB or 5MB";
    if digits.is_empty() {
        return Err(format!("is not a size: {hint}"));
    }
    let number: u64 = digits.parse().map_err(|_| format!("is too large: {hint}"))?;
    let multiplier: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        _ => return Err(format!("has an unknown unit: {hint}")),
    };
    let bytes = number.checked_mul(multiplier).ok_or_else(|| format!("is too large: {hint}"))?;
    if bytes == 0 {
        return Err("must be greater than zero".into());
    }
    Ok(bytes)
}

/// `true`/`false`, also `on`/`off`, `yes`/`no`, `1`/`0`, any case.
pub fn parse_bool(s: &str) -> Result<bool, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "true" | "on" | "yes" | "1" => Ok(true),
        "false" | "off" | "no" | "0" => Ok(false),
        _ => Err("is not a boolean: use true or false (on or off)".into()),
    }
}

/// A whole number at least `min`.
pub fn parse_count(s: &str, min: usize) -> Result<usize, String> {
    let n: usize = s.trim().parse().map_err(|_| "is not a whole number".to_string())?;
    if n < min {
        return Err(format!("must be at least {min}"));
    }
    Ok(n)
}

/// A CIDR (`10.0.0.0/8`, `fd00::/8`); a bare IP is that one host (`/32` or `/128`).
pub fn parse_cidr(s: &str) -> Result<IpNet, String> {
    let s = s.trim();
    if let Ok(net) = s.parse::<IpNet>() {
        return Ok(net.trunc());
    }
    s.parse::<IpAddr>().map(IpNet::from).map_err(|_| format!("{s:?} is not an IP address or CIDR such as 10.0.0.0/8"))
}

/// A comma-separated list, each item parsed by `item`; empty items are skipped.
fn parse_list<T>(s: &str, item: impl Fn(&str) -> Result<T, String>) -> Result<Vec<T>, String> {
    s.split(',').map(str::trim).filter(|i| !i.is_empty()).map(item).collect()
}

/// `auto` or `manual`.
pub fn parse_approval(s: &str) -> Result<Approval, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "auto" => Ok(Approval::Auto),
        "manual" => Ok(Approval::Manual),
        _ => Err("is neither auto nor manual".into()),
    }
}

/// An absolute http(s) URL with a host and no query or fragment; returned without a trailing
/// slash, ready to have `/media/...` appended.
pub fn parse_public_url(s: &str) -> Result<String, String> {
    let s = s.trim();
    let rest = s
        .strip_prefix("https://")
        .or_else(|| s.strip_prefix("http://"))
        .ok_or_else(|| "must start with http:// or https://".to_string())?;
    let host = rest.split('/').next().unwrap_or_default();
    if host.is_empty() || host.starts_with(':') || host.contains('@') {
        return Err("has no host".into());
    }
    if s.contains(['?', '#']) || s.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("must be a plain base URL without query, fragment or spaces".into());
    }
    Ok(s.trim_end_matches('/').to_string())
}

/// `--allowed-hosts`: `*` or host names/addresses, lower-cased, a `:port` suffix dropped (any port
/// is allowed).
pub fn parse_allowed_hosts(s: &str) -> Result<Vec<String>, String> {
    parse_list(s, |item| {
        let host = item.to_ascii_lowercase();
        if host == "*" {
            return Ok(host);
        }
        let host = strip_port(&host);
        if host.is_empty() || host.contains(['/', '@', ' ']) {
            return Err(format!("{item:?} is not a host name"));
        }
        Ok(host.to_string())
    })
}

/// `example.com:8000` → `example.com`, `[::1]:80` → `[::1]`; a bare IPv6 address is left alone.
fn strip_port(host: &str) -> &str {
    if let Some(end) = host.find(']') {
        return &host[..=end];
    }
    match host.rsplit_once(':') {
        Some((name, port)) if !name.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    }
}

/// `--cors-origins`: `*` or a comma-separated list of `scheme://host[:port]` origins (a trailing
/// slash is dropped, as Django's `CORS_ALLOWED_ORIGINS` entries sometimes have one).
pub fn parse_cors_origins(s: &str) -> Result<CorsOrigins, String> {
    let origins = CorsOrigins::parse(s);
    if let CorsOrigins::List(list) = &origins {
        for origin in list {
            let Some((scheme, host)) = origin.split_once("://") else {
                return Err(format!("has {origin:?}, which is not an origin such as https://app.example.com"));
            };
            if scheme.is_empty() || host.is_empty() || host.contains(['/', '?', '#']) {
                return Err(format!("has {origin:?}, which is not an origin such as https://app.example.com"));
            }
        }
    }
    Ok(origins)
}

/// `smtp://` or `smtps://` with a host. The message never quotes the URL: it may hold a password.
pub fn parse_smtp_url(s: &str) -> Result<String, String> {
    let rest = s
        .strip_prefix("smtps://")
        .or_else(|| s.strip_prefix("smtp://"))
        .ok_or_else(|| "must start with smtp:// or smtps://".to_string())?;
    let authority = rest.split(['/', '?']).next().unwrap_or_default();
    let host = authority.rsplit_once('@').map_or(authority, |(_, host)| host);
    if host.is_empty() || host.starts_with(':') {
        return Err("has no host".into());
    }
    Ok(s.to_string())
}

/// A sender address: `user@example.com` or `Name <user@example.com>`.
pub fn parse_mail_from(s: &str) -> Result<String, String> {
    if !s.contains('@') || s.chars().any(char::is_control) {
        return Err("is not an address such as no-reply@example.com or Name <no-reply@example.com>".into());
    }
    Ok(s.to_string())
}

/// At least [`MIN_JWT_SECRET_BYTES`] bytes; the message never quotes the secret.
pub fn parse_jwt_secret(s: &str) -> Result<String, String> {
    if s.len() < MIN_JWT_SECRET_BYTES {
        return Err(format!("must be at least {MIN_JWT_SECRET_BYTES} bytes long (it has {})", s.len()));
    }
    Ok(s.to_string())
}

/// The original deployment's mail account as an `--smtp-url`:
/// `smtps://USER:PASS@smtp.gmail.com:465`, user and password percent-encoded.
pub fn gmail_smtp_url(user: &str, password: &str) -> String {
    format!("smtps://{}:{}@smtp.gmail.com:465", percent_encode_userinfo(user), percent_encode_userinfo(password))
}

/// Percent-encodes everything but RFC 3986's unreserved characters, so any byte of a user name or
/// password survives inside a URL's userinfo (`@` → `%40`, space → `%20`, `:` → `%3A`).
pub fn percent_encode_userinfo(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn none() -> HashMap<String, String> {
        HashMap::new()
    }

    const SECRET_A: &str = "flag-secret-flag-secret-flag-secret!";
    const SECRET_B: &str = "env-secret-env-secret-env-secret-env!";
    const SECRET_C: &str = "dotenv-secret-dotenv-secret-dotenv!!";
    const SECRET_D: &str = "django-insecure-0123456789abcdefghijklmnopqrstuvwxyz";

    #[test]
    fn defaults_when_nothing_is_set() {
        let r = resolve_noted(ServeArgs::default(), &none(), &none()).unwrap();
        let c = r.config;
        let d = Config::default();
        assert_eq!(c.bind, "127.0.0.1:8000".parse().unwrap());
        assert_eq!(c.data_dir, PathBuf::from("./var"));
        assert!(!c.demo);
        assert_eq!(c.smtp_url, None);
        assert_eq!(c.mail_from, d.mail_from);
        assert_eq!(c.jwt_secret, None);
        assert_eq!(c.access_ttl, Duration::from_secs(300));
        assert_eq!(c.refresh_ttl, Duration::from_secs(86_400));
        assert_eq!(c.request_ttl, Duration::from_secs(900));
        assert_eq!(c.max_upload, 10 * 1024 * 1024);
        assert_eq!(c.pharmacy_approval, Approval::Auto);
        assert!(c.rate_limits);
        assert_eq!(c.ws_ping, Duration::from_secs(20));
        assert_eq!(c.ws_idle, Duration::from_secs(60));
        assert_eq!(c.ws_queue, 1024);
        assert_eq!(c.cors_origins, CorsOrigins::None);
        assert!(c.max_connections.is_some_and(|n| n >= MIN_DEFAULT_CONNECTIONS));
        assert!(r.notes.iter().any(|n| n.message.starts_with("max connections:")));
    }

    #[test]
    fn flag_beats_env_beats_dotenv_beats_default() {
        let env = map(&[("SANJEVANI_ACCESS_TTL", "2m"), ("SANJEVANI_REFRESH_TTL", "2h"), ("SANJEVANI_WS_QUEUE", "7")]);
        let dotenv = map(&[
            ("SANJEVANI_ACCESS_TTL", "3m"),
            ("SANJEVANI_REFRESH_TTL", "3h"),
            ("SANJEVANI_REQUEST_TTL", "3s"),
            ("SANJEVANI_WS_QUEUE", "9"),
        ]);
        let args = ServeArgs { access_ttl: Some("1m".into()), ..ServeArgs::default() };
        let c = resolve_noted(args, &env, &dotenv).unwrap().config;
        assert_eq!(c.access_ttl, Duration::from_secs(60), "flag wins");
        assert_eq!(c.refresh_ttl, Duration::from_secs(7200), "env beats .env");
        assert_eq!(c.request_ttl, Duration::from_secs(3), ".env beats default");
        assert_eq!(c.ws_queue, 7);
        assert_eq!(c.ws_ping, Duration::from_secs(20), "default");
    }

    #[test]
    fn every_flag_has_an_env_key_that_is_read() {
        for flag in SERVE_FLAGS {
            let key = env_key(flag);
            assert!(key.starts_with("SANJEVANI_") && !key.contains('-'), "{key}");
        }
        assert_eq!(env_key("max-connections"), "SANJEVANI_MAX_CONNECTIONS");
        let env = map(&[
            ("SANJEVANI_BIND", "0.0.0.0:9000"),
            ("SANJEVANI_DATA_DIR", "/srv/sanjevani"),
            ("SANJEVANI_DEMO", "true"),
            ("SANJEVANI_SMTP_URL", "smtp://127.0.0.1:2525"),
            ("SANJEVANI_SMTP_CA", "/etc/ca.pem"),
            ("SANJEVANI_MAIL_FROM", "Sanjevani <otp@example.com>"),
            ("SANJEVANI_JWT_SECRET", SECRET_B),
            ("SANJEVANI_PUBLIC_URL", "https://api.example.com/"),
            ("SANJEVANI_ALLOWED_HOSTS", "api.example.com, Example.org:8443"),
            ("SANJEVANI_TRUSTED_PROXY", "10.0.0.0/8, 192.168.1.7, ::1"),
            ("SANJEVANI_CORS_ORIGINS", "https://app.example.com"),
            ("SANJEVANI_MAX_UPLOAD", "5MB"),
            ("SANJEVANI_MAX_CONNECTIONS", "500"),
            ("SANJEVANI_PHARMACY_APPROVAL", "manual"),
            ("SANJEVANI_METRICS_TOKEN", "m3trics"),
            ("SANJEVANI_RATE_LIMITS", "off"),
            ("SANJEVANI_WS_PING", "10s"),
            ("SANJEVANI_WS_IDLE", "30s"),
            ("SANJEVANI_WS_QUEUE", "64"),
        ]);
        let r = resolve_noted(ServeArgs::default(), &env, &none()).unwrap();
        let c = r.config;
        assert_eq!(c.bind, "0.0.0.0:9000".parse().unwrap());
        assert_eq!(c.data_dir, PathBuf::from("/srv/sanjevani"));
        assert!(c.demo);
        assert_eq!(c.smtp_url.as_deref(), Some("smtp://127.0.0.1:2525"));
        assert_eq!(c.smtp_ca, Some(PathBuf::from("/etc/ca.pem")));
        assert_eq!(c.mail_from, "Sanjevani <otp@example.com>");
        assert_eq!(c.jwt_secret.as_deref(), Some(SECRET_B));
        assert_eq!(c.public_url.as_deref(), Some("https://api.example.com"));
        assert_eq!(c.allowed_hosts, vec!["api.example.com", "example.org"]);
        let proxies: Vec<String> = c.trusted_proxies.iter().map(|n| n.to_string()).collect();
        assert_eq!(proxies, vec!["10.0.0.0/8", "192.168.1.7/32", "::1/128"]);
        assert_eq!(c.cors_origins, CorsOrigins::List(vec!["https://app.example.com".into()]));
        assert_eq!(c.max_upload, 5_000_000);
        assert_eq!(c.max_connections, Some(500));
        assert_eq!(c.pharmacy_approval, Approval::Manual);
        assert_eq!(c.metrics_token.as_deref(), Some("m3trics"));
        assert!(!c.rate_limits);
        assert!(r.notes.iter().any(|n| n.level == NoteLevel::Warn && n.message.contains("RATE LIMITS ARE OFF")));
        assert_eq!(c.ws_ping, Duration::from_secs(10));
        assert_eq!(c.ws_idle, Duration::from_secs(30));
        assert_eq!(c.ws_queue, 64);
        assert!(r.notes.iter().all(|n| !n.message.contains("unknown")), "{:?}", r.notes);
    }

    #[test]
    fn every_listed_flag_is_a_serve_flag() {
        use clap::CommandFactory;
        let cli = Cli::command();
        let serve = cli.find_subcommand("serve").unwrap();
        let longs: Vec<&str> = serve.get_arguments().filter_map(|a| a.get_long()).collect();
        for flag in SERVE_FLAGS {
            assert!(longs.contains(flag), "--{flag} missing");
            let args = Cli::try_parse_from(["sanjevani", "serve", &format!("--{flag}=x")]).unwrap();
            let Command::Serve(args) = args.command else { panic!("not serve") };
            assert_eq!(args.get(flag), Some("x"), "--{flag} not wired to ServeArgs::get");
        }
        assert_eq!(longs.len(), SERVE_FLAGS.len(), "{longs:?}");
    }

    #[test]
    fn empty_values_fall_through() {
        let env = map(&[("SANJEVANI_WS_QUEUE", "")]);
        let dotenv = map(&[("SANJEVANI_WS_QUEUE", "5")]);
        let args = ServeArgs { ws_queue: Some(" ".into()), ..ServeArgs::default() };
        assert_eq!(resolve_noted(args, &env, &dotenv).unwrap().config.ws_queue, 5);
    }

    #[test]
    fn original_keys_are_fallbacks_only() {
        let dotenv = map(&[
            ("SECRET_KEY", SECRET_D),
            ("EMAIL_HOST_USER", "clinic@gmail.com"),
            ("EMAIL_HOST_PASSWORD", "abcd efgh ijkl mnop"),
            ("CORS_ALLOWED_ORIGINS", "http://localhost:3000,http://localhost:8080"),
        ]);
        let r = resolve_noted(ServeArgs::default(), &none(), &dotenv).unwrap();
        let c = &r.config;
        assert_eq!(c.jwt_secret.as_deref(), Some(SECRET_D));
        assert_eq!(
            c.smtp_url.as_deref(),
            Some("smtps://clinic%40gmail.com:abcd%20efgh%20ijkl%20mnop@smtp.gmail.com:465")
        );
        assert_eq!(c.mail_from, "clinic@gmail.com");
        assert_eq!(
            c.cors_origins,
            CorsOrigins::List(vec!["http://localhost:3000".into(), "http://localhost:8080".into()])
        );
        for key in ["SECRET_KEY", "EMAIL_HOST_USER", "CORS_ALLOWED_ORIGINS"] {
            assert!(r.notes.iter().any(|n| n.message.contains(key) && n.message.starts_with("using")), "{key}");
        }
        for note in &r.notes {
            assert!(!note.message.contains(SECRET_D) && !note.message.contains("abcd efgh"), "secret logged: {note:?}");
        }

        // Any new source of the same setting wins over the original's key, wherever it is.
        let env = map(&[("SANJEVANI_JWT_SECRET", SECRET_B), ("SANJEVANI_SMTP_URL", "smtp://127.0.0.1:2525")]);
        let mut dotenv2 = dotenv.clone();
        dotenv2.insert("SANJEVANI_CORS_ORIGINS".into(), "*".into());
        let args = ServeArgs { mail_from: Some("otp@example.com".into()), ..ServeArgs::default() };
        let r = resolve_noted(args, &env, &dotenv2).unwrap();
        assert_eq!(r.config.jwt_secret.as_deref(), Some(SECRET_B));
        assert_eq!(r.config.smtp_url.as_deref(), Some("smtp://127.0.0.1:2525"));
        assert_eq!(r.config.mail_from, "otp@example.com");
        assert_eq!(r.config.cors_origins, CorsOrigins::Any);
        assert!(r.notes.iter().any(|n| n.message.starts_with("SECRET_KEY in .env not used")));
        assert!(r.notes.iter().any(|n| n.message.starts_with("CORS_ALLOWED_ORIGINS in .env not used")));

        // The original's keys are read from .env only, not from the process environment.
        let env = map(&[("SECRET_KEY", SECRET_D)]);
        assert_eq!(resolve_noted(ServeArgs::default(), &env, &none()).unwrap().config.jwt_secret, None);
    }

    #[test]
    fn gmail_needs_both_keys() {
        let dotenv = map(&[("EMAIL_HOST_USER", "clinic@gmail.com")]);
        let r = resolve_noted(ServeArgs::default(), &none(), &dotenv).unwrap();
        assert_eq!(r.config.smtp_url, None);
        assert_eq!(r.config.mail_from, "clinic@gmail.com");
        assert!(
            r.notes.iter().any(|n| n.level == NoteLevel::Warn && n.message.contains("without EMAIL_HOST_PASSWORD"))
        );
    }

    #[test]
    fn gmail_url_is_percent_encoded() {
        assert_eq!(
            gmail_smtp_url("a.b+c@gmail.com", "p@ss:w/rd%?#é"),
            "smtps://a.b%2Bc%40gmail.com:p%40ss%3Aw%2Frd%25%3F%23%C3%A9@smtp.gmail.com:465"
        );
        assert_eq!(percent_encode_userinfo("AZaz09-._~"), "AZaz09-._~");
    }

    #[test]
    fn debug_and_redis_are_ignored_but_noted() {
        let dotenv = map(&[("DEBUG", "True"), ("REDIS_HOST", "localhost"), ("REDIS_PORT", "6379")]);
        let r = resolve_noted(ServeArgs::default(), &none(), &dotenv).unwrap();
        for key in ["DEBUG", "REDIS_HOST", "REDIS_PORT"] {
            assert!(
                r.notes.iter().any(|n| n.message.starts_with(&format!("{key} in .env is ignored"))),
                "{key}: {:?}",
                r.notes
            );
        }
        let d = Config::default();
        assert_eq!(r.config.rate_limits, d.rate_limits);
        assert_eq!(r.config.demo, d.demo);
    }

    #[test]
    fn unknown_sanjevani_keys_are_warned_about() {
        let env = map(&[("SANJEVANI_ACESS_TTL", "1m")]);
        let r = resolve_noted(ServeArgs::default(), &env, &none()).unwrap();
        assert!(r.notes.iter().any(|n| n.level == NoteLevel::Warn && n.message.contains("SANJEVANI_ACESS_TTL")));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(parse_duration("1h 30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("1d"), Ok(Duration::from_secs(86_400)));
        for bad in ["", "5", "5x", "0s", "-1m", "soon"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("10MiB"), Ok(10 << 20));
        assert_eq!(parse_size("10 mib"), Ok(10 << 20));
        assert_eq!(parse_size("512KiB"), Ok(512 << 10));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("5MB"), Ok(5_000_000));
        assert_eq!(parse_size("2KB"), Ok(2_000));
        assert_eq!(parse_size("1GB"), Ok(1_000_000_000));
        assert_eq!(parse_size("1048576"), Ok(1_048_576));
        assert_eq!(parse_size("100B"), Ok(100));
        for bad in
            ["", "MiB", "10XB", "10M", "1.5MiB", "0", "0MiB", "-1", "99999999999999999999", "18446744073709551615GiB"]
        {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn booleans() {
        for yes in ["true", "TRUE", "on", "yes", "1"] {
            assert_eq!(parse_bool(yes), Ok(true), "{yes}");
        }
        for no in ["false", "False", "off", "no", "0"] {
            assert_eq!(parse_bool(no), Ok(false), "{no}");
        }
        assert!(parse_bool("maybe").is_err());
        let args = ServeArgs { rate_limits: Some("true".into()), demo: Some("false".into()), ..ServeArgs::default() };
        let c = resolve_noted(args, &none(), &none()).unwrap().config;
        assert!(c.rate_limits);
        assert!(!c.demo);
    }

    #[test]
    fn cidrs() {
        assert_eq!(parse_cidr("10.1.2.3/8").unwrap().to_string(), "10.0.0.0/8");
        assert_eq!(parse_cidr("192.168.0.1").unwrap().to_string(), "192.168.0.1/32");
        assert_eq!(parse_cidr("fd00::1").unwrap().to_string(), "fd00::1/128");
        assert_eq!(parse_cidr("fd00::/8").unwrap().to_string(), "fd00::/8");
        for bad in ["10.0.0.0/33", "example.com", "10.0.0", ""] {
            assert!(parse_cidr(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn public_urls() {
        assert_eq!(parse_public_url("https://api.example.com/"), Ok("https://api.example.com".into()));
        assert_eq!(parse_public_url("http://10.0.0.5:8000/sanjevani//"), Ok("http://10.0.0.5:8000/sanjevani".into()));
        for bad in ["api.example.com", "ftp://x.org", "https://", "https:///x", "https://x.org/?a=1", "https://x .org"]
        {
            assert!(parse_public_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn hosts_and_origins() {
        assert_eq!(
            parse_allowed_hosts("A.example.com:80, [::1]:8000, ::1, *,"),
            Ok(vec!["a.example.com".to_string(), "[::1]".to_string(), "::1".to_string(), "*".to_string()])
        );
        assert!(parse_allowed_hosts("http://x.org/").is_err());
        assert_eq!(parse_cors_origins("*"), Ok(CorsOrigins::Any));
        assert_eq!(
            parse_cors_origins("https://a.org/, http://b.org:8080"),
            Ok(CorsOrigins::List(vec!["https://a.org".into(), "http://b.org:8080".into()]))
        );
        assert!(parse_cors_origins("a.org").is_err());
        assert!(parse_cors_origins("https://a.org/app").is_err());
    }

    #[test]
    fn bad_values_name_the_flag_and_where_they_came_from() {
        fn check(args: ServeArgs, env: &[(&str, &str)], dotenv: &[(&str, &str)], flag: &str, origin: &str) {
            let err = resolve_noted(args, &map(env), &map(dotenv)).unwrap_err();
            assert_eq!(err.flag(), Some(flag), "{err}");
            let text = err.to_string();
            assert!(text.starts_with(&format!("--{flag} (from ")), "{text}");
            assert!(text.contains(origin), "{text}");
        }
        let flag = |set: fn(&mut ServeArgs)| {
            let mut args = ServeArgs::default();
            set(&mut args);
            args
        };
        check(flag(|a| a.bind = Some("localhost".into())), &[], &[], "bind", "the command line");
        check(ServeArgs::default(), &[("SANJEVANI_ACCESS_TTL", "5x")], &[], "access-ttl", "SANJEVANI_ACCESS_TTL");
        check(
            ServeArgs::default(),
            &[],
            &[("SANJEVANI_MAX_UPLOAD", "10XB")],
            "max-upload",
            "SANJEVANI_MAX_UPLOAD in .env",
        );
        check(flag(|a| a.ws_queue = Some("0".into())), &[], &[], "ws-queue", "at least 1");
        check(flag(|a| a.max_connections = Some("-3".into())), &[], &[], "max-connections", "whole number");
        check(flag(|a| a.rate_limits = Some("maybe".into())), &[], &[], "rate-limits", "boolean");
        check(flag(|a| a.demo = Some("yes please".into())), &[], &[], "demo", "boolean");
        check(flag(|a| a.pharmacy_approval = Some("later".into())), &[], &[], "pharmacy-approval", "auto nor manual");
        check(flag(|a| a.trusted_proxy = Some("10.0.0.0/8,nope".into())), &[], &[], "trusted-proxy", "\"nope\"");
        check(flag(|a| a.public_url = Some("example.com".into())), &[], &[], "public-url", "http://");
        check(flag(|a| a.ws_ping = Some("0s".into())), &[], &[], "ws-ping", "longer than zero");
        check(flag(|a| a.smtp_url = Some("mail.example.com".into())), &[], &[], "smtp-url", "smtp://");
        check(flag(|a| a.mail_from = Some("nobody".into())), &[], &[], "mail-from", "address");
        check(
            ServeArgs::default(),
            &[],
            &[("CORS_ALLOWED_ORIGINS", "localhost:3000")],
            "cors-origins",
            "CORS_ALLOWED_ORIGINS",
        );
    }

    #[test]
    fn short_jwt_secrets_are_refused_without_being_shown() {
        let short = "short-secret";
        let args = ServeArgs { jwt_secret: Some(short.into()), ..ServeArgs::default() };
        let err = resolve_noted(args, &none(), &none()).unwrap_err();
        assert_eq!(err.flag(), Some("jwt-secret"));
        assert!(!err.to_string().contains(short), "{err}");
        assert!(err.to_string().contains("32 bytes"), "{err}");

        let dotenv = map(&[("SECRET_KEY", "your-django-secret-key-here")]);
        let err = resolve_noted(ServeArgs::default(), &none(), &dotenv).unwrap_err();
        assert!(err.to_string().contains("SECRET_KEY in .env"), "{err}");
        assert!(!err.to_string().contains("your-django"), "{err}");

        let args = ServeArgs { jwt_secret: Some(SECRET_A.into()), ..ServeArgs::default() };
        let env = map(&[("SANJEVANI_JWT_SECRET", SECRET_B)]);
        let dotenv = map(&[("SANJEVANI_JWT_SECRET", SECRET_C)]);
        assert_eq!(resolve_noted(args, &env, &dotenv).unwrap().config.jwt_secret.as_deref(), Some(SECRET_A));
    }

    #[test]
    fn smtp_url_errors_do_not_show_the_password() {
        let args = ServeArgs { smtp_url: Some("https://user:hunter2@mail.example.com".into()), ..ServeArgs::default() };
        let err = resolve_noted(args, &none(), &none()).unwrap_err();
        assert!(!err.to_string().contains("hunter2"), "{err}");
    }

    #[test]
    fn max_connections_default_follows_the_open_file_limit() {
        assert_eq!(default_max_connections(Some(20_000)), 19_744);
        assert_eq!(default_max_connections(Some(1024)), 768);
        assert_eq!(default_max_connections(Some(100)), MIN_DEFAULT_CONNECTIONS);
        assert_eq!(default_max_connections(Some(u64::MAX)), (1 << 20) - 256);
        assert_eq!(default_max_connections(None), 65_536 - 256);
        let limit = open_file_limit().unwrap();
        let c = resolve_noted(ServeArgs::default(), &none(), &none()).unwrap().config;
        assert_eq!(c.max_connections, Some(default_max_connections(Some(limit))));
    }

    #[test]
    fn data_dir_for_admin_commands() {
        assert_eq!(resolve_data_dir(None, &none(), &none()), PathBuf::from("./var"));
        let dotenv = map(&[("SANJEVANI_DATA_DIR", "/d")]);
        assert_eq!(resolve_data_dir(None, &none(), &dotenv), PathBuf::from("/d"));
        let env = map(&[("SANJEVANI_DATA_DIR", "/e")]);
        assert_eq!(resolve_data_dir(None, &env, &dotenv), PathBuf::from("/e"));
        assert_eq!(resolve_data_dir(Some("/f"), &env, &dotenv), PathBuf::from("/f"));
    }

    #[test]
    fn dotenv_files_are_read_without_touching_the_environment() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(".env");
        assert!(read_dotenv(&path).unwrap().is_empty(), "missing file: empty");
        std::fs::write(
            &path,
            "# Django Settings\nSECRET_KEY=abc\nDEBUG=True\n\nEMAIL_HOST_PASSWORD=\"with spaces\"\nSANJEVANI_TEST_ONLY_KEY=1\n",
        )
        .unwrap();
        let map = read_dotenv(&path).unwrap();
        assert_eq!(map.get("SECRET_KEY").map(String::as_str), Some("abc"));
        assert_eq!(map.get("EMAIL_HOST_PASSWORD").map(String::as_str), Some("with spaces"));
        assert_eq!(map.get("DEBUG").map(String::as_str), Some("True"));
        assert!(std::env::var_os("SANJEVANI_TEST_ONLY_KEY").is_none());

        std::fs::write(
            &path,
            "A=two words\nEMAIL_HOST_PASSWORD=abcd efgh ijkl mnop\nexport NOTE = two words # a comment\nSECRET_KEY=x\n",
        )
        .unwrap();
        let map = read_dotenv(&path).unwrap();
        assert_eq!(map.get("EMAIL_HOST_PASSWORD").map(String::as_str), Some("abcd efgh ijkl mnop"), "as python-dotenv");
        assert_eq!(map.get("NOTE").map(String::as_str), Some("two words"));
        assert_eq!(map.get("A").map(String::as_str), Some("two words"), "same value, matched to its own line");
        assert_eq!(map.get("SECRET_KEY").map(String::as_str), Some("x"), "lines after a lenient one are read");

        std::fs::write(&path, "A=1\nthis line holds hunter2 and is broken\n").unwrap();
        let err = read_dotenv(&path).unwrap_err().to_string();
        assert!(err.contains("line 2"), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
    }

    #[test]
    fn the_command_line_parses() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
        let cli =
            Cli::try_parse_from(["sanjevani", "serve", "--demo", "--bind", "0.0.0.0:80", "--ws-queue", "3"]).unwrap();
        let Command::Serve(args) = cli.command else { panic!("not serve") };
        assert_eq!(args.demo.as_deref(), Some("true"));
        assert_eq!(args.bind.as_deref(), Some("0.0.0.0:80"));
        let cli = Cli::try_parse_from(["sanjevani", "serve", "--demo=false"]).unwrap();
        let Command::Serve(args) = cli.command else { panic!("not serve") };
        assert_eq!(args.demo.as_deref(), Some("false"));
        let cli =
            Cli::try_parse_from(["sanjevani", "admin", "create", "--email", "a@b.org", "--password", "pw"]).unwrap();
        let Command::Admin(AdminCommand::Create(args)) = cli.command else { panic!("not admin create") };
        assert_eq!(args.email, "a@b.org");
        assert_eq!(args.password.as_deref(), Some("pw"));
        assert_eq!(args.name, "Admin");
        assert_eq!(args.data_dir, None);
        assert!(Cli::try_parse_from(["sanjevani", "serve", "--no-such-flag"]).is_err());
        let cli = Cli::try_parse_from([
            "sanjevani",
            "generate-city",
            "--pharmacies",
            "1000",
            "--customers",
            "10",
            "--out",
            "t.json",
            "--center",
            "12.97,77.59",
        ])
        .unwrap();
        let Command::GenerateCity(args) = cli.command else { panic!("not generate-city") };
        assert_eq!((args.pharmacies, args.customers, args.seed), (1000, 10, 1));
        assert_eq!(args.token_ttl, "7d");
        let center = parse_center(&args.center).unwrap();
        assert_eq!((center.lat(), center.lng()), (12.97, 77.59));
        assert!(parse_center("91,0").is_err());
        assert!(parse_center("12.9").is_err());
    }
}
