//! The fault harness on fresh seeds: every run draws twelve new seeds (so that
//! CI keeps exploring), chosen so that between them their first faults cover
//! every kind, and runs each in turn: a 5-node cluster (ConsistentHashing,
//! factor 3, Quorum) under 8 clients, create races and the seeded nemesis
//! for 15 s, then heal and check. Every seed is printed first; a failing one
//! replays with `cargo run -p kv-chaos -- --seed N --duration 15s`, and
//! `KV_CHAOS_SEEDS=1,2,3` pins the seeds of this test. About 16-20 s a seed,
//! some 3-4 minutes in all.

use std::collections::BTreeMap;
use std::time::Duration;

use kv_chaos::cluster::kv_node_bin;
use kv_chaos::history::Outcome;
use kv_chaos::nemesis::{self, FAULT_NAMES};
use kv_chaos::run::{RunOptions, run};

const FRESH_SEEDS: usize = 12;
const WORKLOAD: Duration = Duration::from_secs(15);

/// `KV_CHAOS_SEEDS` (comma-separated), or fresh seeds; `true` when fresh.
fn seeds() -> (Vec<u64>, bool) {
    match std::env::var("KV_CHAOS_SEEDS") {
        Ok(list) => (
            list.split(',')
                .filter(|s| !s.trim().is_empty())
                .map(|s| {
                    s.trim()
                        .parse()
                        .unwrap_or_else(|_| panic!("KV_CHAOS_SEEDS: {s:?} is not a seed"))
                })
                .collect(),
            false,
        ),
        Err(_) => {
            let o = RunOptions::new(0, WORKLOAD, "kv-node".into());
            let seeds = nemesis::fresh_seeds(
                || u64::from(rand::random::<u32>()),
                FRESH_SEEDS,
                WORKLOAD,
                o.nodes,
                o.factor,
                &[],
            );
            (seeds, true)
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_seed_breaks_the_consistency_promise_under_faults() {
    let bin = kv_node_bin().expect("the kv-node binary");
    let (seeds, fresh) = seeds();
    let replay = format!(
        "replay one with `cargo run -p kv-chaos -- --seed N --duration {}s`",
        WORKLOAD.as_secs()
    );
    println!("kv-chaos seeds: {seeds:?} ({replay}; KV_CHAOS_SEEDS pins them)");
    let mut failures = Vec::new();
    let mut faults: BTreeMap<&str, usize> = BTreeMap::new();
    for &seed in &seeds {
        // A cluster that does not start fails the seed; the others still run.
        let report = match run(RunOptions::new(seed, WORKLOAD, bin.clone())).await {
            Ok(r) => r,
            Err(e) => {
                println!("seed {seed}: the cluster did not start: {e}");
                failures.push(format!("seed {seed}: the cluster did not start: {e}"));
                continue;
            }
        };
        println!("{report}");
        // The run did something worth checking.
        let acked = report
            .ops
            .iter()
            .filter(|o| o.acknowledged_mutation())
            .count();
        let reads = report
            .ops
            .iter()
            .filter(|o| o.outcome == Outcome::Ok && !o.is_mutation())
            .count();
        assert!(
            acked >= 100 && reads >= 50,
            "seed {seed}: too little load to check ({acked} acknowledged mutations, {reads} reads)"
        );
        assert!(
            report.verdict.creates_checked > 0,
            "seed {seed}: no create was checked"
        );
        let injected = nemesis::injected_by_kind(&report.events);
        assert!(
            !injected.is_empty(),
            "seed {seed}: the nemesis injected nothing:\n{report}"
        );
        for e in report.events.iter().filter(|e| e.injected_at.is_some()) {
            *faults.entry(e.step.fault.name()).or_insert(0) += 1;
        }
        // Peer traffic went through the proxies (the topology's peer
        // addresses are theirs), so partitions and slow links were real.
        assert!(
            report.net.connections.keys().any(|(s, d)| s != d),
            "seed {seed}: no peer connection went through a proxy"
        );
        if !report.passed() {
            failures.push(format!("{report}"));
        }
    }
    println!("faults injected over seeds {seeds:?}: {faults:?}");
    assert!(
        failures.is_empty(),
        "FAIL ({} of {} seeds; {replay}):\n{}",
        failures.len(),
        seeds.len(),
        failures.join("\n")
    );
    if fresh {
        let missing: Vec<&str> = FAULT_NAMES
            .into_iter()
            .filter(|n| !faults.contains_key(n))
            .collect();
        assert!(
            missing.is_empty(),
            "seeds {seeds:?}: no {missing:?} fault was injected (injected {faults:?})"
        );
    }
}
