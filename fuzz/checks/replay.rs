//! Replays a checked-in fuzz corpus through its check on stable Rust, so that
//! `cargo test` runs every seed and every crash reproducer found so far.
//! Included (`#[path]`) by the `fuzz_corpus.rs` test of each crate.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

/// `fuzz/corpus/<target>` of this repository.
pub fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target)
}

/// Every file of a corpus directory, sorted by name. A missing or empty
/// directory is an error: a replay of nothing must not pass.
pub fn read_corpus(dir: &Path) -> Result<Vec<(String, Vec<u8>)>, String> {
    let entries = std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut files = Vec::new();
    for entry in entries {
        let path = entry.map_err(|e| format!("{}: {e}", dir.display()))?.path();
        if path.is_file() {
            let bytes = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            files.push((path.display().to_string(), bytes));
        }
    }
    files.sort();
    if files.is_empty() {
        return Err(format!("{} holds no corpus file", dir.display()));
    }
    Ok(files)
}

/// Runs `check` on every file; each one that panics is named with its
/// message. Returns how many files passed.
pub fn run(files: &[(String, Vec<u8>)], check: impl Fn(&[u8])) -> Result<usize, String> {
    let mut failures = Vec::new();
    for (name, bytes) in files {
        if let Err(panic) = catch_unwind(AssertUnwindSafe(|| check(bytes))) {
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "(no message)".into());
            failures.push(format!("{name}: {message}"));
        }
    }
    if failures.is_empty() {
        Ok(files.len())
    } else {
        Err(format!(
            "{} of {} corpus files fail:\n{}",
            failures.len(),
            files.len(),
            failures.join("\n")
        ))
    }
}

/// Reads `fuzz/corpus/<target>` and runs `check` on it, panicking with every failure.
pub fn replay(target: &str, check: impl Fn(&[u8])) -> usize {
    let files = read_corpus(&corpus_dir(target)).unwrap_or_else(|e| panic!("{e}"));
    run(&files, check).unwrap_or_else(|e| panic!("{e}"))
}

/// The replay itself can fail: a check that rejects one file fails the run
/// and names that file; an empty corpus fails too.
pub fn assert_the_replay_can_fail() {
    let files = vec![
        ("seed-good".to_string(), b"good".to_vec()),
        ("crash-bad".to_string(), b"bad".to_vec()),
    ];
    let err = run(&files, |d| {
        assert!(d != b"bad", "the check rejects this input")
    })
    .expect_err("a failing check must fail the replay");
    assert!(
        err.contains("crash-bad") && err.contains("the check rejects this input"),
        "{err}"
    );
    assert!(!err.contains("seed-good"), "{err}");
    assert_eq!(run(&files, |_| {}), Ok(2));
    let empty = std::env::temp_dir().join(format!("kv-fuzz-empty-corpus-{}", std::process::id()));
    std::fs::create_dir_all(&empty).expect("a scratch directory");
    let refused = read_corpus(&empty);
    let _ = std::fs::remove_dir(&empty);
    assert!(
        refused.is_err(),
        "an empty corpus must not replay as a pass"
    );
}
