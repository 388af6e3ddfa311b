//! Replays the committed fuzz corpus (`fuzz/corpus/<target>/`) through the same functions the
//! fuzz targets call, so CI checks every saved input without installing cargo-fuzz. A missing
//! or empty corpus directory fails the test rather than passing with nothing checked.

use std::path::PathBuf;

fn replay(target: &str, check: fn(&[u8])) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus").join(target);
    let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("corpus {}: {e}", dir.display()));
    let mut files: Vec<PathBuf> = entries.map(|entry| entry.expect("a corpus entry").path()).collect();
    files.retain(|path| path.is_file());
    files.sort();
    assert!(!files.is_empty(), "corpus {} is empty", dir.display());
    for path in &files {
        let data = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        // Name the input that broke an invariant: the panic inside `check` does not know it.
        let outcome = std::panic::catch_unwind(|| check(&data));
        assert!(outcome.is_ok(), "fuzz input {} fails", path.display());
    }
}

#[test]
fn json_corpus() {
    replay("json", sanjevani::fuzzing::json);
}

#[test]
fn form_corpus() {
    replay("form", sanjevani::fuzzing::form);
}

#[test]
fn multipart_corpus() {
    replay("multipart", sanjevani::fuzzing::multipart);
}

#[test]
fn ws_message_corpus() {
    replay("ws_message", sanjevani::fuzzing::ws_message);
}

#[test]
fn ws_frames_corpus() {
    replay("ws_frames", sanjevani::fuzzing::ws_frames);
}
