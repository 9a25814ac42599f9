//! Storage engine behaviour, on real SQLite databases in temporary directories.

use kv_core::{BUCKETS, CreateVote, Digest, Record, Version, bucket_of};
use kv_node::{StorageError, Store, StoreOptions};
use proptest::prelude::*;

fn rec(key: &str, value: Option<&str>, ts: u64, node: u32) -> Record {
    Record {
        key: key.as_bytes().to_vec(),
        value: value.map(|v| v.as_bytes().to_vec()),
        version: Version::new(ts, node),
    }
}

fn open(dir: &tempfile::TempDir) -> Store {
    Store::open(dir.path(), StoreOptions::default()).expect("open store")
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

#[test]
fn newer_versions_win_and_older_or_equal_ones_are_ignored() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&dir);
    rt().block_on(async {
        assert_eq!(
            store
                .apply(vec![rec("k", Some("v2"), 20, 1)])
                .await
                .expect("apply")
                .iter()
                .map(|a| a.stored())
                .collect::<Vec<_>>(),
            [true]
        );
        assert_eq!(
            store
                .apply(vec![rec("k", Some("old"), 10, 9)])
                .await
                .expect("apply")
                .iter()
                .map(|a| a.stored())
                .collect::<Vec<_>>(),
            [false]
        );
        assert_eq!(
            store
                .apply(vec![rec("k", Some("same"), 20, 1)])
                .await
                .expect("apply")
                .iter()
                .map(|a| a.stored())
                .collect::<Vec<_>>(),
            [false]
        );
        assert_eq!(
            store
                .apply(vec![rec("k", Some("tie"), 20, 2)])
                .await
                .expect("apply")
                .iter()
                .map(|a| a.stored())
                .collect::<Vec<_>>(),
            [true]
        );
    });
    assert_eq!(
        store.get(b"k").expect("get"),
        Some(rec("k", Some("tie"), 20, 2))
    );
}

#[test]
fn a_delete_is_a_tombstone_that_hides_the_key_from_listing_but_keeps_its_version() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&dir);
    rt().block_on(async {
        store
            .apply(vec![rec("a", Some("1"), 1, 1), rec("b", Some("2"), 1, 1)])
            .await
            .expect("apply");
        store
            .apply(vec![rec("a", None, 2, 1)])
            .await
            .expect("delete");
        // An older write arriving late does not resurrect the key.
        assert_eq!(
            store
                .apply(vec![rec("a", Some("late"), 1, 5)])
                .await
                .expect("apply")
                .iter()
                .map(|a| a.stored())
                .collect::<Vec<_>>(),
            [false]
        );
    });
    assert_eq!(store.get(b"a").expect("get"), Some(rec("a", None, 2, 1)));
    let listed: Vec<Vec<u8>> = store
        .list(b"", None, 10)
        .expect("list")
        .into_iter()
        .map(|r| r.key)
        .collect();
    assert_eq!(listed, [b"b".to_vec()]);
    let stats = store.stats().expect("stats");
    assert_eq!((stats.keys, stats.tombstones), (1, 1));
}

#[test]
fn listing_pages_through_a_prefix_in_byte_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&dir);
    rt().block_on(async {
        let records = ["app/3", "app/1", "other", "app/2", "ap", "app/10"]
            .iter()
            .map(|k| rec(k, Some("v"), 1, 1))
            .collect();
        store.apply(records).await.expect("apply");
    });
    let page1: Vec<_> = store
        .list(b"app/", None, 2)
        .expect("list")
        .into_iter()
        .map(|r| r.key)
        .collect();
    assert_eq!(page1, [b"app/1".to_vec(), b"app/10".to_vec()]);
    let page2: Vec<_> = store
        .list(b"app/", Some(b"app/10"), 2)
        .expect("list")
        .into_iter()
        .map(|r| r.key)
        .collect();
    assert_eq!(page2, [b"app/2".to_vec(), b"app/3".to_vec()]);
    assert!(
        store
            .list(b"app/", Some(b"app/3"), 2)
            .expect("list")
            .is_empty()
    );
}

#[test]
fn bucket_digests_follow_overwrites_and_deletes_and_equal_a_recomputation() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&dir);
    let key_bucket = bucket_of(b"k") as usize;
    rt().block_on(async {
        store
            .apply(vec![rec("k", Some("1"), 1, 1)])
            .await
            .expect("apply");
        let after_put = store.bucket_digests().expect("digests")[key_bucket];
        assert_eq!(after_put.count, 1);
        store
            .apply(vec![rec("k", Some("2"), 2, 1)])
            .await
            .expect("overwrite");
        let after_overwrite = store.bucket_digests().expect("digests")[key_bucket];
        assert_eq!(after_overwrite.count, 1);
        assert_ne!(after_overwrite, after_put);
        store
            .apply(vec![rec("k", None, 3, 1)])
            .await
            .expect("delete");
        let after_delete = store.bucket_digests().expect("digests")[key_bucket];
        assert_ne!(after_delete, after_overwrite);
    });
    let digests = store.bucket_digests().expect("digests");
    assert_eq!(digests.len(), BUCKETS as usize);
    assert_eq!(digests, store.recompute_digests().expect("recompute"));
}

#[test]
fn concurrent_writes_share_transactions() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&dir);
    let requests = 64;
    rt().block_on(async {
        let writes = (0..requests).map(|i| {
            let store = store.clone();
            async move {
                store
                    .apply(vec![rec(&format!("k{i}"), Some("v"), 1, 1)])
                    .await
            }
        });
        for r in futures_join_all(writes).await {
            assert_eq!(
                r.expect("apply")
                    .iter()
                    .map(|a| a.stored())
                    .collect::<Vec<_>>(),
                [true]
            );
        }
    });
    let stats = store.stats().expect("stats");
    assert_eq!(stats.write_requests, requests);
    assert!(
        stats.commits <= requests / 2,
        "{} commits for {} requests: no group commit",
        stats.commits,
        requests
    );
    assert_eq!(stats.keys, requests);
}

/// The write-ahead log is copied back by a thread of its own; if that thread
/// did nothing (it once did, silently), the log would grow without bound and
/// the database file would stay empty.
#[test]
fn the_log_is_copied_back_and_starts_over_under_steady_writes() {
    log_stays_bounded(true);
}

/// Without that thread (or with it behind), the writer checkpoints the log
/// itself once it reaches four times its size: back-pressure, not growth.
#[test]
fn the_writer_copies_the_log_back_itself_when_nothing_else_does() {
    log_stays_bounded(false);
}

fn log_stays_bounded(background: bool) {
    let dir = tempfile::tempdir().expect("tempdir");
    let frames = 400u32;
    let store = Store::open(
        dir.path(),
        StoreOptions {
            checkpoint_frames: frames,
            background_checkpoints: background,
            ..StoreOptions::default()
        },
    )
    .expect("open store");
    let wal = dir.path().join("kv.sqlite3-wal");
    let db = dir.path().join("kv.sqlite3");
    let size = |p: &std::path::Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    // 1 KiB values over 3 000 keys: with no checkpoint at all the log of
    // these rounds reached about 42 times `frames` pages (measured); with the
    // checkpointer about 3 times, with only the writer's about 5.
    let value = "x".repeat(1024);
    let mut largest_log = 0;
    rt().block_on(async {
        for round in 0..60u64 {
            let writes = (0..200u64).map(|i| {
                let store = store.clone();
                let key = format!("k{}", (round * 200 + i) * 7919 % 3000);
                let value = value.clone();
                async move {
                    store
                        .apply(vec![rec(&key, Some(&value), round + 1, 1)])
                        .await
                }
            });
            for r in futures_join_all(writes).await {
                r.expect("apply");
            }
            largest_log = largest_log.max(size(&wal));
        }
    });
    // SQLite reuses the log file from its start, so its size is the most it
    // ever held (a frame is a 2 KiB page and a 24-byte header). The writer's
    // own checkpoint starts at 4 times `frames`; the margin is for what the
    // writes commit while a checkpoint runs.
    let bound = 12 * u64::from(frames) * 2072;
    assert!(
        largest_log <= bound,
        "the log reached {largest_log} bytes (bound {bound}): it is not copied back or never starts over"
    );
    assert!(
        size(&db) > 2 * 1024 * 1024,
        "the database file holds {} bytes after 3 MiB of records: nothing was copied back",
        size(&db)
    );
    assert_eq!(store.stats().expect("stats").keys, 3000);
    drop(store);
    let store = open(&dir);
    let got = store.get(b"k0").expect("get").expect("k0 is stored");
    assert_eq!(got.value.as_deref(), Some(value.as_bytes()));
    assert_eq!(store.stats().expect("stats").keys, 3000);
}

#[test]
fn every_acknowledged_write_was_covered_by_a_log_sync() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&dir);
    rt().block_on(async {
        for i in 0..5 {
            store
                .apply(vec![rec(&format!("s{i}"), Some("v"), 1, 1)])
                .await
                .expect("apply");
            // one write at a time: each waited for a sync of its own
            assert_eq!(store.stats().expect("stats").syncs, i + 1);
        }
    });
}

/// Writes once, lets `damage` act on the store's directory, then expects
/// every later write to be refused: the syncer can no longer vouch for what
/// it syncs.
fn later_writes_are_refused_after(damage: impl FnOnce(&std::path::Path)) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&dir);
    rt().block_on(async {
        store
            .apply(vec![rec("before", Some("v"), 1, 1)])
            .await
            .expect("apply before");
        damage(dir.path());
        for key in ["after", "again"] {
            let err = store
                .apply(vec![rec(key, Some("v"), 2, 1)])
                .await
                .expect_err("a write after the log was lost must not be acknowledged");
            assert!(err.to_string().contains("restart the node"), "{err}");
        }
    });
}

#[test]
fn a_failed_log_sync_refuses_every_later_write() {
    // The log vanishes underneath the node.
    later_writes_are_refused_after(|dir| {
        std::fs::remove_file(dir.join("kv.sqlite3-wal")).expect("remove the log");
    });
}

#[test]
fn a_log_replaced_underneath_the_node_refuses_every_later_write() {
    // Another file now answers to the log's name (a restore copied over a
    // running node's volume, say): syncing our open file says nothing of it.
    later_writes_are_refused_after(|dir| {
        let wal = dir.join("kv.sqlite3-wal");
        std::fs::rename(&wal, dir.join("moved-aside")).expect("move the log aside");
        std::fs::write(&wal, b"not our log").expect("put another file in its place");
    });
}

/// Polls every future on one task so that all requests are queued before the
/// writer can drain them.
async fn futures_join_all<F: std::future::Future>(
    futs: impl IntoIterator<Item = F>,
) -> Vec<F::Output> {
    let mut pending: Vec<_> = futs.into_iter().map(|f| Some(Box::pin(f))).collect();
    let mut results: Vec<Option<F::Output>> = (0..pending.len()).map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut all_done = true;
        for (slot, res) in pending.iter_mut().zip(results.iter_mut()) {
            if let Some(f) = slot {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => {
                        *res = Some(v);
                        *slot = None;
                    }
                    std::task::Poll::Pending => all_done = false,
                }
            }
        }
        if all_done {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await;
    results.into_iter().flatten().collect()
}

#[test]
fn data_hints_and_digests_survive_closing_and_reopening() {
    let dir = tempfile::tempdir().expect("tempdir");
    let digests_before_close = {
        let store = open(&dir);
        rt().block_on(async {
            store
                .apply(vec![rec("k", Some("v"), 5, 1)])
                .await
                .expect("apply");
            store
                .add_hints(vec![
                    (2, rec("k", Some("v"), 5, 1)),
                    (3, rec("j", None, 6, 1)),
                ])
                .await
                .expect("hints");
        });
        store.bucket_digests().expect("digests")
    };
    let k_bucket = kv_core::bucket_of(b"k") as usize;
    assert_eq!(digests_before_close[k_bucket].count, 1);
    let store = open(&dir);
    // digests are rebuilt from the records on opening...
    assert_eq!(
        store.bucket_digests().expect("digests"),
        digests_before_close
    );
    assert_eq!(
        store.get(b"k").expect("get"),
        Some(rec("k", Some("v"), 5, 1))
    );
    assert_eq!(
        store
            .pending_hints()
            .expect("pending")
            .into_iter()
            .collect::<Vec<_>>(),
        [(2, 1), (3, 1)]
    );
    let hints = store.hints_for(3, 10).expect("hints");
    assert_eq!(hints.len(), 1);
    assert_eq!(hints[0].1, rec("j", None, 6, 1));
    rt().block_on(store.delete_hints(vec![hints[0].0]))
        .expect("delete hints");
    assert_eq!(store.pending_hints().expect("pending").get(&3), None);
    // ...and kept current from there
    rt().block_on(store.apply(vec![rec("k", None, 7, 2), rec("m", Some("w"), 1, 1)]))
        .expect("apply after reopening");
    let digests = store.bucket_digests().expect("digests");
    assert_ne!(digests, digests_before_close);
    assert_eq!(digests, store.recompute_digests().expect("recompute"));
    store.integrity_check().expect("integrity");
}

#[test]
fn dropping_buckets_removes_their_records_and_empties_their_digests() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&dir);
    let records: Vec<Record> = (0..200)
        .map(|i| rec(&format!("key{i}"), Some("v"), 1, 1))
        .collect();
    let victim = records[0].bucket();
    let in_victim = records.iter().filter(|r| r.bucket() == victim).count() as u64;
    rt().block_on(async {
        store.apply(records).await.expect("apply");
        assert_eq!(
            store.drop_buckets(vec![victim]).await.expect("drop"),
            in_victim
        );
    });
    assert!(store.bucket_records(victim).expect("records").is_empty());
    assert_eq!(
        store.bucket_digests().expect("digests")[victim as usize],
        Digest::EMPTY
    );
    assert_eq!(store.stats().expect("stats").keys, 200 - in_victim);
    assert_eq!(
        store.bucket_digests().expect("digests"),
        store.recompute_digests().expect("recompute")
    );
}

#[test]
fn purging_removes_only_tombstones_older_than_the_horizon() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&dir);
    let old = rec("a", None, 10, 1);
    let bucket = old.bucket();
    // A second key in the same bucket, newer tombstone.
    let newer = (0..10_000)
        .map(|i| format!("b{i}"))
        .find(|k| bucket_of(k.as_bytes()) == bucket)
        .map(|k| rec(&k, None, 100, 1))
        .expect("a key in the same bucket");
    rt().block_on(async {
        store
            .apply(vec![
                old.clone(),
                newer.clone(),
                rec("live", Some("v"), 5, 1),
            ])
            .await
            .expect("apply");
        assert_eq!(
            store
                .purge_tombstones(bucket, Version::new(50, 0))
                .await
                .expect("purge"),
            1
        );
    });
    assert_eq!(store.get(b"a").expect("get"), None);
    assert_eq!(store.get(&newer.key).expect("get"), Some(newer));
    assert_eq!(
        store.bucket_digests().expect("digests"),
        store.recompute_digests().expect("recompute")
    );
}

/// Point reads are served from memory once read; every way a record changes
/// (a newer write, a create's accept, a purge, a dropped bucket) shows in
/// the very next read, and an older write leaves the newer record.
#[test]
fn a_read_from_memory_never_lags_what_the_store_holds() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&dir);
    let hits = || store.stats().expect("stats").cache_hits;
    let value = |k: &[u8]| {
        store
            .get(k)
            .expect("get")
            .map(|r| r.value.map(|v| String::from_utf8_lossy(&v).into_owned()))
    };
    rt().block_on(async {
        store
            .apply(vec![rec("k", Some("v1"), 10, 1), rec("t", None, 10, 1)])
            .await
            .expect("apply");
        assert_eq!(value(b"k"), Some(Some("v1".into())));
        let before = hits();
        assert_eq!(value(b"k"), Some(Some("v1".into())));
        assert_eq!(hits(), before + 1, "the second read came from memory");

        store
            .apply(vec![rec("k", Some("v2"), 20, 1)])
            .await
            .expect("apply");
        assert_eq!(value(b"k"), Some(Some("v2".into())));
        store
            .apply(vec![rec("k", Some("older"), 15, 1)])
            .await
            .expect("apply");
        assert_eq!(value(b"k"), Some(Some("v2".into())));
        assert_eq!(value(b"k"), Some(Some("v2".into())));

        // a create over a cached tombstone
        assert_eq!(value(b"t"), Some(None));
        assert_eq!(value(b"t"), Some(None));
        let ballot = Version::new(30, 2);
        assert_eq!(
            store.promise(b"t".to_vec(), ballot).await.expect("promise"),
            CreateVote::Granted
        );
        assert_eq!(
            store
                .accept(rec("t", Some("created"), 30, 2))
                .await
                .expect("accept"),
            CreateVote::Granted
        );
        assert_eq!(value(b"t"), Some(Some("created".into())));

        // a purged tombstone, read (and kept in memory) just before
        let gone = rec("gone", None, 40, 1);
        store.apply(vec![gone.clone()]).await.expect("apply");
        assert_eq!(value(b"gone"), Some(None));
        assert_eq!(value(b"gone"), Some(None));
        store
            .purge_tombstones(gone.bucket(), Version::new(50, 0))
            .await
            .expect("purge");
        assert_eq!(value(b"gone"), None);

        // a dropped bucket
        assert_eq!(value(b"k"), Some(Some("v2".into())));
        store
            .drop_buckets(vec![bucket_of(b"k")])
            .await
            .expect("drop");
        assert_eq!(value(b"k"), None);
    });
}

/// Readers racing a writer of one key: each reader sees versions only go
/// up, and once the writer is done every reader sees its last version (a
/// record read before a commit and kept after it would stay stale).
#[test]
fn readers_racing_a_writer_never_go_back_and_end_on_the_last_write() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&dir);
    const WRITES: u64 = 400;
    let done = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        for _ in 0..3 {
            s.spawn(|| {
                let mut last = 0;
                let mut reads = 0u64;
                while !done.load(std::sync::atomic::Ordering::Acquire) || reads == 0 {
                    if let Some(r) = store.get(b"hot").expect("get") {
                        assert!(r.version.ts >= last, "{} after {last}", r.version.ts);
                        last = r.version.ts;
                    }
                    reads += 1;
                }
                let end = store.get(b"hot").expect("get").expect("written");
                assert_eq!(end.version.ts, WRITES);
            });
        }
        let rt = rt();
        rt.block_on(async {
            for ts in 1..=WRITES {
                store
                    .apply(vec![rec("hot", Some("v"), ts, 1)])
                    .await
                    .expect("apply");
            }
        });
        done.store(true, std::sync::atomic::Ordering::Release);
    });
    assert!(store.stats().expect("stats").cache_hits > 0);
}

/// The replica's half of a linearizable create (kv_core::CreateVote): two
/// leaders that both found the key absent race for it, as at a placement
/// commit when two nodes name different create leaders. Without these rules
/// an owner took both creates, and both leaders were acknowledged.
#[test]
fn create_steps_let_only_one_of_two_racing_creates_through_and_promises_are_durable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (b1, b2) = (Version::new(100, 1), Version::new(200, 2));
    let key = || b"k".to_vec();
    {
        let store = open(&dir);
        rt().block_on(async {
            // leader 1 is promised, then leader 2 with a higher ballot
            assert_eq!(
                store.promise(key(), b1).await.expect("p1"),
                CreateVote::Granted
            );
            assert_eq!(
                store.promise(key(), b1).await.expect("p1 again"),
                CreateVote::Granted
            );
            assert_eq!(
                store.promise(key(), b2).await.expect("p2"),
                CreateVote::Granted
            );
            // a lower ballot is refused from now on, naming the promise it lost to
            assert_eq!(
                store.promise(key(), b1).await.expect("p1 late"),
                CreateVote::Promised(b2)
            );
            // leader 1's accept lost its promise: refused, nothing stored
            assert_eq!(
                store
                    .accept(rec("k", Some("one"), 100, 1))
                    .await
                    .expect("a1"),
                CreateVote::Promised(b2)
            );
            assert_eq!(store.get(b"k").expect("get"), None);
        });
    }
    // the promise outlives a restart: a replica must not forget what it promised
    let store = open(&dir);
    rt().block_on(async {
        assert_eq!(
            store
                .accept(rec("k", Some("one"), 100, 1))
                .await
                .expect("a1 after reopen"),
            CreateVote::Promised(b2)
        );
        assert_eq!(
            store
                .accept(rec("k", Some("two"), 200, 2))
                .await
                .expect("a2"),
            CreateVote::Granted
        );
        assert_eq!(
            store
                .accept(rec("k", Some("two"), 200, 2))
                .await
                .expect("a2 again"),
            CreateVote::Had
        );
        // the key is live now: no later create gets a promise or an accept
        let b3 = Version::new(300, 0);
        assert_eq!(
            store.promise(key(), b3).await.expect("p3"),
            CreateVote::Live(b2)
        );
        assert_eq!(
            store
                .accept(rec("k", Some("three"), 300, 0))
                .await
                .expect("a3"),
            CreateVote::Live(b2)
        );
        // after a delete a new create may run, but only above the tombstone
        store
            .apply(vec![rec("k", None, 400, 1)])
            .await
            .expect("delete");
        assert_eq!(
            store
                .promise(key(), Version::new(350, 0))
                .await
                .expect("p below tombstone"),
            CreateVote::Newer(Version::new(400, 1))
        );
        let b5 = Version::new(500, 0);
        assert_eq!(
            store.promise(key(), b5).await.expect("p5"),
            CreateVote::Granted
        );
        // an ordinary write that lands between the steps wins: the accept refuses
        store
            .apply(vec![rec("k", Some("put"), 450, 2)])
            .await
            .expect("put");
        assert_eq!(
            store
                .accept(rec("k", Some("five"), 500, 0))
                .await
                .expect("a5"),
            CreateVote::Live(Version::new(450, 2))
        );
        assert_eq!(
            store.get(b"k").expect("get").and_then(|r| r.value),
            Some(b"put".to_vec())
        );
        // an accept with no promise at all (a replica that lost it) is refused
        assert_eq!(
            store
                .accept(rec("fresh", Some("x"), 600, 0))
                .await
                .expect("a no promise"),
            CreateVote::Promised(Version::ZERO)
        );
        assert_eq!(store.get(b"fresh").expect("get"), None);
        assert_eq!(
            store.bucket_digests().expect("d"),
            store.recompute_digests().expect("r")
        );
    });
}

#[test]
fn a_data_directory_keeps_its_node_identity() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&dir);
    store.claim_identity("demo", 2).expect("first claim");
    store
        .claim_identity("demo", 2)
        .expect("same identity again");
    assert!(matches!(
        store.claim_identity("demo", 3),
        Err(StorageError::WrongIdentity { .. })
    ));
    assert!(matches!(
        store.claim_identity("other", 2),
        Err(StorageError::WrongIdentity { .. })
    ));
}

#[test]
fn writes_do_not_fail_while_the_store_records_its_own_metadata() {
    // A node writes `alive_at` on another connection while it takes writes;
    // a write transaction must wait for that one, not fail "database is
    // locked" (seen as 503s on a node's first writes under load).
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&dir);
    let meta = store.clone();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop_meta = stop.clone();
    let toucher = std::thread::spawn(move || {
        let mut n = 0u64;
        while !stop_meta.load(std::sync::atomic::Ordering::Relaxed) && n < 200_000 {
            meta.touch_alive(n).expect("alive_at recorded");
            n += 1;
        }
        n
    });
    let rt = rt();
    let failed = rt.block_on(async {
        let mut failed = Vec::new();
        for i in 0..1_000u64 {
            let r = store
                .apply(vec![rec(&format!("k{i}"), Some("v"), i + 1, 0)])
                .await;
            if let Err(e) = r {
                failed.push(e.to_string());
            }
        }
        failed
    });
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let touches = toucher.join().expect("toucher");
    assert!(touches > 0);
    assert!(
        failed.is_empty(),
        "{} of 1000 writes failed beside {touches} metadata writes; first: {:?}",
        failed.len(),
        failed.first()
    );
}

fn arb_records() -> impl Strategy<Value = Vec<Record>> {
    proptest::collection::vec(
        (
            0u8..6,
            proptest::option::of(proptest::collection::vec(any::<u8>(), 0..4)),
            1u64..20,
            0u32..3,
        ),
        1..40,
    )
    .prop_map(|v| {
        // A version names one write: the clock never issues it twice, so a
        // generated history carries each version at most once.
        let mut seen = std::collections::HashSet::new();
        v.into_iter()
            .filter(|(_, _, ts, node)| seen.insert((*ts, *node)))
            .map(|(k, value, ts, node)| Record {
                key: vec![b'k', k],
                value,
                version: Version::new(ts, node),
            })
            .collect()
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Two replicas that receive the same writes in different orders and
    /// batchings end with the same rows and the same digests.
    #[test]
    fn replicas_converge_whatever_the_order_of_puts_and_deletes(records in arb_records(), split in 1usize..5) {
        let a_dir = tempfile::tempdir().expect("tempdir");
        let b_dir = tempfile::tempdir().expect("tempdir");
        let a = open(&a_dir);
        let b = open(&b_dir);
        let rt = rt();
        rt.block_on(async {
            for r in &records {
                a.apply(vec![r.clone()]).await.expect("apply a");
            }
            let mut reversed = records.clone();
            reversed.reverse();
            for chunk in reversed.chunks(split) {
                b.apply(chunk.to_vec()).await.expect("apply b");
            }
        });
        let rows = |s: &Store| -> Vec<Record> {
            (0..BUCKETS).flat_map(|bk| s.bucket_records(bk).expect("records")).collect()
        };
        prop_assert_eq!(rows(&a), rows(&b));
        prop_assert_eq!(a.bucket_digests().expect("digests"), b.bucket_digests().expect("digests"));
        prop_assert_eq!(a.bucket_digests().expect("digests"), a.recompute_digests().expect("recompute"));
    }
}
