//! `kv-chaos`: the soak run of the fault harness.
//!
//! `cargo run -p kv-chaos --release -- --seed 42 --duration 10m` runs one
//! seed for ten minutes (`--runs N` runs seeds 42, 43, … one after another;
//! without `--seed`, N fresh seeds whose first faults between them cover
//! every kind) and prints operations by outcome, faults injected by kind,
//! the seeds run and the checker's verdict; it exits 1 when any seed fails.
//! A seed replays with `--seed N --duration D` (the schedule depends on
//! both).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;
use kv_chaos::cluster::kv_node_bin;
use kv_chaos::nemesis;
use kv_chaos::run::{RunOptions, run};

#[derive(Parser, Debug)]
#[command(
    name = "kv-chaos",
    about = "Fault-inject a local kvstore cluster and check its history"
)]
struct Cli {
    /// Seed of the nemesis schedule and the clients' choices (of the first
    /// run; default: fresh seeds, printed).
    #[arg(long)]
    seed: Option<u64>,
    /// How long clients and nemesis run per seed: 90s, 10m, 1h.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    duration: Duration,
    /// Seeds to run, from --seed up (or fresh).
    #[arg(long, default_value_t = 1)]
    runs: u64,
    #[arg(long, default_value_t = 5)]
    nodes: u32,
    #[arg(long, default_value_t = 3)]
    replication_factor: u32,
    #[arg(long, default_value_t = 8)]
    clients: usize,
    /// Size of the key space (small, so that clients collide).
    #[arg(long, default_value_t = 8)]
    keys: usize,
    /// The kv-node binary (default: built by cargo beside this program).
    #[arg(long, env = "KV_NODE_BIN")]
    node_binary: Option<PathBuf>,
    /// Keep each run's data directory and node logs.
    #[arg(long)]
    keep_data: bool,
    /// Kinds of fault to inject, comma-separated: kill, fail, partition,
    /// slow, factor, strategy, skew, wipe (default: all).
    #[arg(long, value_delimiter = ',', value_parser = parse_fault)]
    faults: Vec<&'static str>,
    /// Consistency of client reads (one, quorum, all). Below quorum the
    /// promise no longer holds: the checker should then fail.
    #[arg(long, value_parser = parse_level)]
    read_consistency: Option<&'static str>,
    /// Consistency of client writes and deletes.
    #[arg(long, value_parser = parse_level)]
    write_consistency: Option<&'static str>,
    /// Write every run's full history (one operation a line) to
    /// `<DIR>/history-<seed>.txt`.
    #[arg(long)]
    history_dir: Option<PathBuf>,
    /// Print each seed's nemesis schedule and exit (nothing is started).
    #[arg(long)]
    schedule_only: bool,
}

fn parse_fault(s: &str) -> Result<&'static str, String> {
    nemesis::FAULT_NAMES
        .iter()
        .find(|n| n.eq_ignore_ascii_case(s.trim()))
        .copied()
        .ok_or_else(|| format!("{s:?}: the faults are {}", nemesis::FAULT_NAMES.join(", ")))
}

fn parse_level(s: &str) -> Result<&'static str, String> {
    ["one", "quorum", "all"]
        .into_iter()
        .find(|n| n.eq_ignore_ascii_case(s.trim()))
        .ok_or_else(|| format!("{s:?}: one, quorum or all"))
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 90s, 10m or 1h"))?;
    let secs = match unit {
        "" | "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        _ => return Err(format!("{s:?}: the unit must be s, m or h")),
    };
    Ok(Duration::from_secs(secs))
}

#[tokio::main]
async fn main() -> ExitCode {
    match soak(Cli::parse()).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("kv-chaos: {e:#}");
            ExitCode::from(2)
        }
    }
}

async fn soak(cli: Cli) -> anyhow::Result<bool> {
    if cli.nodes < 3 || cli.replication_factor < 2 || cli.replication_factor > cli.nodes {
        bail!("need at least 3 nodes and a factor between 2 and the node count");
    }
    let seeds: Vec<u64> = match cli.seed {
        Some(first) => (first..first.saturating_add(cli.runs)).collect(),
        None => nemesis::fresh_seeds(
            || u64::from(rand::random::<u32>()),
            usize::try_from(cli.runs).unwrap_or(usize::MAX),
            cli.duration,
            cli.nodes,
            cli.replication_factor,
            &cli.faults,
        ),
    };
    let secs = cli.duration.as_secs();
    println!("seeds: {seeds:?} ({secs}s each; replay one with --seed N --duration {secs}s)");
    if cli.schedule_only {
        for &seed in &seeds {
            println!("seed {seed}:");
            for s in nemesis::schedule_of(
                seed,
                cli.duration,
                cli.nodes,
                cli.replication_factor,
                &cli.faults,
            ) {
                println!("  {s}");
            }
        }
        return Ok(true);
    }
    let node_binary = match cli.node_binary {
        Some(p) => p,
        None => kv_node_bin().context("finding the kv-node binary")?,
    };
    let mut passed = Vec::new();
    let mut failed = Vec::new();
    let (mut ops, mut faults) = (0usize, std::collections::BTreeMap::new());
    for &seed in &seeds {
        let mut opts = RunOptions::new(seed, cli.duration, node_binary.clone());
        opts.nodes = cli.nodes;
        opts.factor = cli.replication_factor;
        opts.clients = cli.clients;
        opts.keys = cli.keys;
        opts.keep_data = cli.keep_data;
        opts.faults = cli.faults.clone();
        opts.read_consistency = cli.read_consistency;
        opts.write_consistency = cli.write_consistency;
        opts.verbose = true;
        // A cluster that does not start fails the seed; the others still run.
        let report = match run(opts).await {
            Ok(r) => r,
            Err(e) => {
                println!("seed {seed}: the cluster did not start: {e}\nverdict: FAIL");
                failed.push(seed);
                continue;
            }
        };
        println!("{report}");
        if let Some(dir) = &cli.history_dir {
            let path = dir.join(format!("history-{seed}.txt"));
            let mut text = String::new();
            for op in report.ops.iter().chain(report.finals.iter()) {
                text.push_str(&format!("{op}\n"));
            }
            std::fs::create_dir_all(dir)
                .and_then(|_| std::fs::write(&path, text))
                .with_context(|| format!("writing {}", path.display()))?;
            println!("history: {}", path.display());
        }
        ops += report.ops.len();
        for (k, n) in nemesis::injected_by_kind(&report.events) {
            *faults.entry(k).or_insert(0) += n;
        }
        if report.passed() {
            passed.push(seed);
        } else {
            failed.push(seed);
        }
    }
    println!(
        "seeds run: {seeds:?}; passed {passed:?}; failed {failed:?}; {ops} operations; faults {faults:?}"
    );
    println!(
        "verdict: {}",
        if failed.is_empty() { "PASS" } else { "FAIL" }
    );
    Ok(failed.is_empty())
}
