//! Acknowledged means durable: a child process creates requests from many tasks and prints each
//! id only after `create_request` returned `Ok`; the parent kills it with SIGKILL mid-stream,
//! reopens the file and finds every printed request with all its recipients.
//!
//! The child is this same test binary, re-executed with `DURABILITY_CHILD_DB` set and filtered to
//! `child_writer`, so no helper binary has to be built or found. Without the variable that test
//! returns at once, which is what happens when the whole suite runs normally.

use sanjevani_engine::geo::LatLng;
use sanjevani_engine::model::*;
use sanjevani_engine::store::{SqliteStore, Store, StoreOptions};
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

const CHILD_DB: &str = "DURABILITY_CHILD_DB";
const RECIPIENTS: usize = 10;
const WRITERS: usize = 64;
const KILL_AFTER: usize = 200;
/// The child stops on its own after this, should the parent die before killing it.
const CHILD_LIFETIME: Duration = Duration::from_secs(120);

fn recipients() -> Vec<Recipient> {
    (0..RECIPIENTS)
        .map(|i| Recipient {
            pharmacy_id: 100 - i as PharmacyId,
            pharmacy_name: format!("Pharmacy {i}"),
            location: LatLng::new(27.7 + i as f64 * 0.001, 85.3).unwrap(),
            distance_km: 0.1 * (i + 1) as f64,
        })
        .collect()
}

fn new_request(writer: usize, n: usize) -> NewRequest {
    NewRequest {
        customer_id: writer as UserId + 1,
        patient_name: format!("Patient {writer}"),
        patient_phone: "9800000000".into(),
        location: LatLng::new(27.7172, 85.324).unwrap(),
        radius_km: 5.0,
        quantity: 1,
        medicine_name: Some(format!("Medicine {n}")),
        note: None,
        image: None,
        idempotency_key: None,
        created_at: 1_771_929_000_000 + n as UnixMs,
        expires_at: 1_771_929_900_000 + n as UnixMs,
    }
}

/// Runs only in the re-executed child: writes until killed, printing each acknowledged id.
#[test]
fn child_writer() {
    let Some(path) = std::env::var_os(CHILD_DB) else {
        return;
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    runtime.block_on(async move {
        let store = Arc::new(SqliteStore::open(path.as_ref(), StoreOptions::default()).unwrap());
        let deadline = Instant::now() + CHILD_LIFETIME;
        let writers: Vec<_> = (0..WRITERS)
            .map(|writer| {
                let store = Arc::clone(&store);
                tokio::spawn(async move {
                    let mut n = 0;
                    while Instant::now() < deadline {
                        n += 1;
                        let created = store.create_request(new_request(writer, n), recipients()).await.unwrap();
                        let Created::New(request) = created else {
                            panic!("no idempotency key was sent, yet {created:?}");
                        };
                        // One write per line, flushed: a printed id is an acknowledged one.
                        let mut out = std::io::stdout().lock();
                        writeln!(out, "created {}", request.id).unwrap();
                        out.flush().unwrap();
                    }
                })
            })
            .collect();
        for writer in writers {
            writer.await.unwrap();
        }
    });
}

#[test]
fn acknowledged_creates_survive_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("durable.db");
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["child_writer", "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_DB, &path)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();

    // Read on a thread so that the parent can give up on a child that never gets going.
    let stdout = child.stdout.take().unwrap();
    let (lines_tx, lines) = mpsc::channel::<RequestId>();
    let reader = std::thread::spawn(move || {
        let mut stdout = BufReader::new(stdout);
        let mut line = String::new();
        // Only whole lines count: a line cut short by the kill ("created 12" of "created 123")
        // would name the wrong request.
        while stdout.read_line(&mut line).is_ok_and(|n| n > 0) && line.ends_with('\n') {
            if let Some(Ok(id)) = line.trim_end().strip_prefix("created ").map(str::parse) {
                let _ = lines_tx.send(id);
            }
            line.clear();
        }
    });

    let mut acknowledged = Vec::new();
    while acknowledged.len() < KILL_AFTER {
        match lines.recv_timeout(Duration::from_secs(60)) {
            Ok(id) => acknowledged.push(id),
            Err(e) => {
                let _ = child.kill();
                panic!("the child printed only {} ids: {e}", acknowledged.len());
            }
        }
    }
    // SAFETY: `kill` only sends a signal to the child we spawned and still own (not yet waited).
    let killed = unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGKILL) };
    assert_eq!(killed, 0, "kill failed: {}", std::io::Error::last_os_error());
    let status = child.wait().unwrap();
    assert!(!status.success(), "the child was killed, not finished: {status}");
    // Ids printed before the kill but not yet read are acknowledged too.
    reader.join().unwrap();
    acknowledged.extend(lines.try_iter());
    eprintln!("{} acknowledged ids before SIGKILL", acknowledged.len());

    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    runtime.block_on(async move {
        let store = SqliteStore::open(&path, StoreOptions::default()).unwrap();
        assert_eq!(store.pragmas().await.unwrap(), ("wal".to_string(), 1), "NORMAL: the syncer thread fsyncs");
        let expected = recipients();
        for id in &acknowledged {
            let request = store.request(*id).await.unwrap();
            assert!(request.is_some(), "acknowledged request {id} is missing");
            assert_eq!(store.recipients(*id).await.unwrap(), expected, "request {id} lost recipients");
        }
        store.shutdown().await;
    });
}
