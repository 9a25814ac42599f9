//! Acknowledged writes survive kill -9 of the writing process.
//!
//! The test runs its own binary again as a child (selected by an environment
//! variable) that writes through [`Store`] from several concurrent tasks and
//! prints each key once `apply` has returned. The parent kills the child with
//! SIGKILL mid-stream, reopens the database, and checks that every key the
//! child reported is there with its value, that SQLite finds the file sound,
//! and that the bucket digests (rebuilt on opening) stay equal to a
//! recomputation from the rows as the recovered store takes more writes.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kv_core::{Record, Version};
use kv_node::{Store, StoreOptions};

const CHILD_ENV: &str = "KV_STORAGE_CRASH_CHILD_DIR";
const ROUND_ENV: &str = "KV_STORAGE_CRASH_ROUND";

fn value_of(key: &str) -> Vec<u8> {
    format!("value-of-{key}").into_bytes()
}

/// The version of the delete the child issues for `key`
/// (`r<round>w<writer>-<i>`), if it issues one.
fn delete_version_of(key: &str) -> Option<Version> {
    let (head, i) = key.rsplit_once('-')?;
    let i: u64 = i.parse().ok()?;
    let writer: u32 = head.rsplit_once('w')?.1.parse().ok()?;
    (i % 10 == 4).then(|| Version::new(i + 6, writer))
}

/// The child: writes until killed.
fn run_child(dir: &str, round: &str) {
    let round = round.to_string();
    // The log is copied back every 50 pages (not 32 000), so the kill lands
    // while records are appended, while a checkpoint copies the log back, or
    // while the log starts over.
    let store = Store::open(
        std::path::Path::new(dir),
        StoreOptions {
            checkpoint_frames: 50,
            ..StoreOptions::default()
        },
    )
    .expect("child opens the store");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let mut tasks = Vec::new();
        for writer in 0..8u32 {
            let store = store.clone();
            let round = round.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0u64.. {
                    let key = format!("r{round}w{writer}-{i}");
                    let record = Record {
                        key: key.clone().into_bytes(),
                        value: Some(value_of(&key)),
                        version: Version::new(i + 1, writer),
                    };
                    // A delete of an earlier key now and then, so tombstones are in the history too.
                    let mut batch = vec![record];
                    if i % 10 == 9 {
                        let gone = format!("r{round}w{writer}-{}", i - 5);
                        batch.push(Record {
                            key: gone.into_bytes(),
                            value: None,
                            version: Version::new(i + 1, writer),
                        });
                    }
                    if store.apply(batch).await.is_err() {
                        return;
                    }
                    println!("ack {key}");
                    if i % 10 == 9 {
                        println!("del r{round}w{writer}-{}", i - 5);
                    }
                }
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
    });
}

#[test]
fn acknowledged_writes_survive_kill_9_of_the_writer() {
    if let Ok(dir) = std::env::var(CHILD_ENV) {
        run_child(&dir, &std::env::var(ROUND_ENV).unwrap_or_default());
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    // 30 kills in the test suite (about 1.5 s); the soak (README, "Fault
    // testing") sets more.
    let rounds: u32 = std::env::var("KV_STORAGE_CRASH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(30);
    for round in 0..rounds {
        // kill after a different number of acknowledgements each round
        let kill_after = 100 + (round as usize * 137) % 400;
        let mut child = Command::new(std::env::current_exe().expect("test binary"))
            .args([
                "--exact",
                "acknowledged_writes_survive_kill_9_of_the_writer",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, dir.path())
            .env(ROUND_ENV, round.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn child writer");
        let stdout = child.stdout.take().expect("child stdout");
        let mut acked = Vec::new();
        let started = Instant::now();
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if line.starts_with("ack ") || line.starts_with("del ") {
                acked.push(line);
            }
            if acked.len() >= kill_after || started.elapsed() > Duration::from_secs(30) {
                break;
            }
        }
        child.kill().expect("SIGKILL the writer");
        let _ = child.wait();
        assert!(
            acked.len() >= 100,
            "round {round}: the child acknowledged only {} writes",
            acked.len()
        );

        let store = Store::open(dir.path(), StoreOptions::default()).expect("reopen after kill -9");
        store
            .integrity_check()
            .expect("database is sound after kill -9");
        for line in &acked {
            if let Some(deleted) = line.strip_prefix("del ") {
                let r = store.get(deleted.as_bytes()).expect("get");
                assert!(
                    r.as_ref().is_some_and(|r| r.value.is_none()),
                    "round {round}: acknowledged delete of {deleted} lost: {r:?}"
                );
            } else if let Some(key) = line.strip_prefix("ack ") {
                let r = store.get(key.as_bytes()).expect("get");
                // The value is there, or the child's own later delete of this
                // key (issued for i % 10 == 4 at version i + 6) was applied,
                // acknowledged to us or not.
                let own_delete = delete_version_of(key);
                let ok = r.as_ref().is_some_and(|r| {
                    r.value.as_deref() == Some(value_of(key).as_slice())
                        || (r.value.is_none() && Some(r.version) == own_delete)
                });
                assert!(ok, "round {round}: acknowledged write {key} lost: {r:?}");
            }
        }
        // overwrite and delete some of what the child left, on top of the
        // digests rebuilt at opening
        let survivors: Vec<Record> = store
            .scan(b"", None, 50)
            .expect("scan")
            .into_iter()
            .enumerate()
            .map(|(i, r)| Record {
                value: (i % 2 == 0).then(|| b"after-recovery".to_vec()),
                version: Version::new(r.version.ts + 1_000_000, 99),
                key: r.key,
            })
            .collect();
        let n = survivors.len();
        let applied = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
            .block_on(store.apply(survivors))
            .expect("apply after recovery");
        assert_eq!(
            applied.iter().map(|a| a.stored()).collect::<Vec<_>>(),
            vec![true; n]
        );
        assert_eq!(
            store.bucket_digests().expect("digests"),
            store.recompute_digests().expect("recompute"),
            "round {round}: bucket digests drifted from the rows after recovery"
        );
    }
    eprintln!("{rounds} kill -9 rounds: every acknowledged write and delete was there after each");
}
