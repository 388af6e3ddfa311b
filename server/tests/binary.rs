//! The `sanjevani` binary itself, as an operator runs it: `admin create` makes an admin and
//! refuses a duplicate, `serve` takes the data-dir lock (so `admin create` refuses while it
//! runs), answers `/health`, and exits 0 on SIGTERM.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn sanjevani() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_sanjevani"));
    command.env_remove("RUST_LOG").env("NO_COLOR", "1");
    command
}

fn get(port: u16, path: &str) -> String {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(stream, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").unwrap();
    let mut reply = String::new();
    stream.read_to_string(&mut reply).unwrap();
    reply
}

#[test]
fn admin_create_serve_lock_and_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().to_str().unwrap();
    let create = |email: &str| {
        sanjevani()
            .args(["admin", "create", "--email", email, "--password", "admin-password-1", "--data-dir", data_dir])
            .output()
            .unwrap()
    };
    let made = create("root@example.com");
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    assert!(String::from_utf8_lossy(&made.stdout).contains("root@example.com"));
    assert!(!create("root@example.com").status.success(), "a duplicate is refused");

    let mut server = sanjevani()
        .args(["serve", "--bind", "127.0.0.1:0", "--data-dir", data_dir])
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut log = BufReader::new(server.stderr.take().unwrap());
    let mut port = None;
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut line = String::new();
    while port.is_none() && Instant::now() < deadline {
        line.clear();
        if log.read_line(&mut line).unwrap() == 0 {
            break;
        }
        if let Some(at) = line.find("local=127.0.0.1:") {
            port = line[at + 16..].split_whitespace().next().and_then(|p| p.parse::<u16>().ok());
        }
    }
    let port = port.expect("the server logs its port");
    std::thread::spawn(move || std::io::copy(&mut log, &mut std::io::sink()));
    let mut healthy = false;
    while !healthy && Instant::now() < deadline {
        healthy = get(port, "/health").starts_with("HTTP/1.1 200");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(healthy);

    let refused = create("second@example.com");
    assert!(!refused.status.success(), "admin create refuses while serve holds the lock");
    assert!(
        String::from_utf8_lossy(&refused.stderr).to_lowercase().contains("lock"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );

    // The admin made offline can log in to the running server.
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let body = r#"{"email":"root@example.com","password":"admin-password-1"}"#;
    write!(
        stream,
        "POST /login HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut reply = String::new();
    stream.read_to_string(&mut reply).unwrap();
    assert!(reply.starts_with("HTTP/1.1 200") && reply.contains("\"role\":\"ADMIN\""), "{reply}");

    // SAFETY: sending a signal to our own child process.
    unsafe { libc::kill(server.id() as i32, libc::SIGTERM) };
    let started = Instant::now();
    let status = loop {
        if let Some(status) = server.try_wait().unwrap() {
            break status;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "exit within 10 s of SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "exit 0 on SIGTERM: {status:?}");
    assert!(create("after@example.com").status.success(), "the lock is released on exit");
}
