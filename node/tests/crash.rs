//! kill -9 of a real `kv-node` under concurrent writers: every acknowledged
//! write survives, the database is consistent, digests match the rows.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::NodeProc;

#[test]
fn acknowledged_writes_survive_kill_9_under_concurrent_load() {
    let dir = tempfile::tempdir().unwrap();
    let mut n = NodeProc::new(common::KV_NODE, 0, dir.path(), None);
    // A log copied back every 200 pages (not 32 000): the kills land while
    // checkpoints run, and while the log starts over.
    n.extra = vec!["--checkpoint-pages".into(), "200".into()];
    n.start();
    let mut acked_total = 0;
    let acked: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
    for round in 0..3 {
        let stop = Arc::new(AtomicBool::new(false));
        let mut writers = Vec::new();
        for t in 0..8 {
            let (stop, acked, addr) = (stop.clone(), acked.clone(), n.address());
            writers.push(std::thread::spawn(move || {
                let c = common::Client::new(&addr, common::TOKEN);
                let mut i = 0u32;
                // Bounded: the node is killed within seconds.
                while !stop.load(Ordering::Relaxed) && i < 100_000 {
                    let key = format!("r{round}-t{t}-{i}");
                    let value = format!("value-{round}-{t}-{i}");
                    match c.put(&key, value.as_bytes(), None) {
                        Ok(a) if a.status == 200 => acked.lock().unwrap().push((key, value)),
                        Ok(a) => panic!("unexpected answer {}: {}", a.status, a.text()),
                        Err(_) => break, // the node died mid-request: not acknowledged
                    }
                    i += 1;
                }
            }));
        }
        std::thread::sleep(Duration::from_millis(1500));
        n.kill9();
        stop.store(true, Ordering::Relaxed);
        for w in writers {
            w.join().unwrap();
        }
        // The database as the crash left it: consistent, digests = rows.
        {
            let store =
                kv_node::Store::open(&n.data_dir, kv_node::StoreOptions::default()).unwrap();
            store.integrity_check().unwrap();
            assert_eq!(
                store.bucket_digests().unwrap(),
                store.recompute_digests().unwrap()
            );
        }
        n.start();
        let c = n.client();
        let acked = acked.lock().unwrap();
        assert!(
            acked.len() > acked_total,
            "round {round}: no write was acknowledged"
        );
        acked_total = acked.len();
        for (k, v) in acked.iter() {
            let a = c.get(k, None).unwrap();
            assert_eq!(a.status, 200, "acknowledged key {k} lost after kill -9");
            assert_eq!(a.body, v.as_bytes(), "key {k}");
        }
    }
    eprintln!("{acked_total} acknowledged writes checked across 3 kill -9 rounds");
}

/// A clean stop (SIGTERM) copies the log back and empties it: the next start
/// reads no log, and the volume does not keep up to 64 MiB of it.
#[test]
fn a_clean_stop_leaves_an_empty_log_and_every_write() {
    let dir = tempfile::tempdir().unwrap();
    let mut n = NodeProc::new(common::KV_NODE, 0, dir.path(), None);
    n.start();
    let c = n.client();
    for i in 0..300 {
        let a = c
            .put(&format!("k{i}"), format!("v{i}").as_bytes(), None)
            .unwrap();
        assert_eq!(a.status, 200, "{}", a.text());
    }
    let wal = dir.path().join("kv.sqlite3-wal");
    let size = || std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0);
    assert!(size() > 0, "the writes left nothing in the log");
    assert!(n.terminate().is_some_and(|s| s.success()), "unclean exit");
    assert_eq!(size(), 0, "the log was not emptied at a clean stop");
    n.start();
    let c = n.client();
    for i in 0..300 {
        let a = c.get(&format!("k{i}"), None).unwrap();
        assert_eq!(a.body, format!("v{i}").as_bytes(), "k{i} after the restart");
    }
}
