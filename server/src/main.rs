//! The `sanjevani` binary: parses the command line, sets up logging and runs one command. It is
//! kept thin on purpose: settings are resolved in `cli`, the data dir is guarded by `datadir`,
//! and the server itself is `sanjevani::run`, which tests call directly. Errors reach the user as
//! one line on stderr and a non-zero exit code.

use clap::Parser;
use sanjevani::cli::{self, AdminCommand, AdminCreateArgs, Cli, Command, GenerateCityArgs, ServeArgs};
use sanjevani::datadir::DataDir;
use sanjevani_engine::accounts::{Accounts, AccountsConfig, Registration};
use sanjevani_engine::hub::Hub;
use sanjevani_engine::index::PharmacyIndex;
use sanjevani_engine::store::Store;
use std::error::Error;
use std::future::Future;
use std::io::BufRead;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::runtime::Runtime;
use tokio::signal::unix::{SignalKind, signal};

/// The binary's catch-all error: every library error already says what went wrong.
type CliResult<T = ()> = Result<T, Box<dyn Error + Send + Sync>>;

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("sanjevani: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Command::Serve(args) => serve(&runtime, *args),
        Command::Admin(AdminCommand::Create(args)) => admin_create(&runtime, args),
        Command::GenerateCity(args) => generate_city(*args),
    };
    // Blocking work still running (a stdin read) must not keep the process alive.
    runtime.shutdown_timeout(Duration::from_secs(5));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sanjevani: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Logs to stderr (stdout is for command output such as the demo logins), filtered by
/// `RUST_LOG`, `info` by default, coloured only on a terminal, written around any progress bar.
/// Nothing here logs tokens or passwords.
fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(sanjevani::progress::log_writer)
        .with_ansi(ansi)
        .init();
}

/// The `.env` of the working directory and the `SANJEVANI_*` environment.
fn sources() -> CliResult<(std::collections::HashMap<String, String>, std::collections::HashMap<String, String>)> {
    Ok((cli::sanjevani_env(), cli::read_dotenv(Path::new(".env"))?))
}

/// `sanjevani serve`: resolves the settings, binds, and runs until SIGINT or SIGTERM. `run` opens
/// (and locks) the data dir itself.
fn serve(runtime: &Runtime, args: ServeArgs) -> CliResult {
    let (env, dotenv) = sources()?;
    let config = cli::resolve(args, &env, &dotenv)?;
    runtime.block_on(async move {
        let bind = config.bind;
        let listener = listen(bind).map_err(|e| format!("cannot listen on {bind}: {e}"))?;
        let shutdown = shutdown_signal().map_err(|e| format!("cannot watch for SIGINT/SIGTERM: {e}"))?;
        sanjevani::run(listener, config, shutdown).await?;
        tracing::info!("stopped");
        Ok(())
    })
}

/// Resolves on the first SIGINT or SIGTERM. The handlers are installed before this returns, so a
/// signal arriving while the server starts is not lost.
fn shutdown_signal() -> std::io::Result<impl Future<Output = ()> + Send + 'static> {
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    Ok(async move {
        let name = tokio::select! {
            _ = interrupt.recv() => "SIGINT",
            _ = terminate.recv() => "SIGTERM",
        };
        tracing::info!("{name}: shutting down");
    })
}

/// `sanjevani admin create`: takes the data dir's lock (refused while `serve` holds it), opens the
/// store and creates an ADMIN account through `Accounts`, as registration would. No HTTP server.
fn admin_create(runtime: &Runtime, args: AdminCreateArgs) -> CliResult {
    let (env, dotenv) = sources()?;
    let data_dir = DataDir::open(cli::resolve_data_dir(args.data_dir.as_deref(), &env, &dotenv))?;
    let password = match args.password {
        Some(password) => password,
        None => read_password_from_stdin()?,
    };
    let store = open_store(&data_dir.db_path())?;
    let admin = runtime
        .block_on(async move {
            // Accounts derives its OTP key from a secret; creating an admin issues no OTP, so a
            // throwaway key serves and the data dir's JWT secret is neither read nor created.
            let otp_secret: [u8; 32] = rand::random();
            let accounts = Accounts::new(
                store,
                Arc::new(PharmacyIndex::default()),
                Hub::new(1),
                &otp_secret,
                AccountsConfig::default(),
            )?;
            let registration =
                Registration { email: args.email, password, name: args.name, phone_number: String::new() };
            accounts.create_admin(registration).await
        })
        .map_err(|e| format!("cannot create the admin: {e}"))?;
    println!("created ADMIN id {} email {}", admin.id, admin.email);
    drop(data_dir);
    Ok(())
}

/// `sanjevani generate-city`: takes the data dir's lock (refused while `serve` holds it), resolves
/// the JWT secret exactly as `serve` would, writes the city and its tokens, and prints what it did
/// (the shared password included: these are throwaway load-test accounts).
fn generate_city(args: GenerateCityArgs) -> CliResult {
    use sanjevani::city::{self, CityOptions};
    let (env, dotenv) = sources()?;
    let serve_view =
        ServeArgs { data_dir: args.data_dir.clone(), jwt_secret: args.jwt_secret.clone(), ..Default::default() };
    let resolved = cli::resolve_noted(serve_view, &env, &dotenv)?;
    let data_dir = DataDir::open(&resolved.config.data_dir)?;
    let secret = data_dir.jwt_secret(resolved.config.jwt_secret.as_deref())?;
    let duration = |flag: &str, value: &str| cli::parse_duration(value).map_err(|e| format!("--{flag} {value:?} {e}"));
    let options = CityOptions {
        pharmacies: args.pharmacies,
        customers: args.customers,
        seed: args.seed,
        center: cli::parse_center(&args.center).map_err(|e| format!("--center {e}"))?,
        edge_km: args.edge_km,
        sigma_km: args.sigma_km,
        dense_share: args.dense_share,
        open_requests: args.open_requests,
        recipients: args.recipients,
        request_ttl: duration("request-ttl", &args.request_ttl)?,
        password: args.password,
        token_ttl: duration("token-ttl", &args.token_ttl)?,
        token_limit: args.token_limit,
        base_url: args.base_url,
        out: args.out,
    };
    let report = city::generate(&data_dir, &secret, &options)?;
    println!(
        "generated {} pharmacies and {} customers (seed {}, edge {:.1} km, core sigma {:.1} km), {} open requests \
         with {} recipients, in {:.1} s; tokens for {} customers and {} pharmacies in {} ({:.1} s)",
        report.pharmacies,
        report.customers,
        options.seed,
        report.edge_km,
        report.sigma_km,
        report.open_requests,
        report.recipients,
        report.database.as_secs_f64(),
        report.customers,
        report.pharmacy_tokens,
        options.out.display(),
        report.tokens.as_secs_f64(),
    );
    println!("every generated account's password: {}", options.password);
    drop(data_dir);
    Ok(())
}

/// Binds with a deep accept backlog: std's default of 128 makes a burst of reconnecting devices
/// (a mobile network coming back) wait a one-second SYN retry each.
fn listen(bind: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if bind.is_ipv6() { tokio::net::TcpSocket::new_v6()? } else { tokio::net::TcpSocket::new_v4()? };
    socket.set_reuseaddr(true)?;
    socket.bind(bind)?;
    socket.listen(4096)
}

/// The password from the first line of standard input (without its line ending).
fn read_password_from_stdin() -> CliResult<String> {
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line).map_err(|e| format!("cannot read the password from stdin: {e}"))?;
    let password = line.trim_end_matches(['\n', '\r']).to_string();
    if password.is_empty() {
        return Err("no --password given and none on standard input".into());
    }
    Ok(password)
}

/// Opens the SQLite store (synchronously, outside the runtime, as `SqliteStore::open` asks).
fn open_store(path: &Path) -> CliResult<Arc<dyn Store>> {
    use sanjevani_engine::store::{SqliteStore, StoreOptions};
    Ok(Arc::new(SqliteStore::open(path, StoreOptions::default())?))
}
