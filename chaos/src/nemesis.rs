//! The nemesis: a schedule of faults drawn from a seed, and the code that
//! injects and heals them: kill -9, hold Failed, partition, slow peer links,
//! factor and strategy changes, a node's clock skewed by up to ±1 h (it
//! restarts with `KV_CLOCK_OFFSET_MS`), and a node's volume lost (its data
//! directory emptied under it; it restarts on a new store).
//!
//! One fault at a time, each held for a few seconds and then healed, so
//! that (with factor 3 and `Quorum`) every key keeps a quorum of live owners
//! and availability stays meaningful; the checker's correctness checks do
//! not depend on that. Before each fault the nemesis waits (bounded) for
//! every node to be Up again, so a fault never lands on a cluster still
//! recovering from the previous one; if the cluster is not back in time the
//! fault is skipped and counted as such.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kv_core::Strategy;
use rand::rngs::Xoshiro256PlusPlus;
use rand::{RngExt, SeedableRng};

use crate::cluster::Cluster;

/// Longest wait for a node restarted on purpose to run again.
const RESTART_LIMIT: Duration = Duration::from_secs(30);

/// One kind of fault.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// SIGKILL a node's process; the platform restarts it (Failed →
    /// Recovering → Up).
    Kill(u32),
    /// Hold a node Failed (the platform's fail), then recover it.
    Fail(u32),
    /// Cut one node off from every other node (peer links, both ways).
    Partition(u32),
    /// Delay every chunk to and from one node's peer links.
    Slow(u32, Duration),
    /// Change the replication factor, then change it back.
    Factor(u32),
    /// Switch to `Full`, then back to `ConsistentHashing`.
    StrategyFull,
    /// Restart a node with its clock off by this many milliseconds (up to
    /// ±1 h; `KV_CLOCK_OFFSET_MS`), then restart it with the true clock.
    ClockSkew(u32, i64),
    /// Lose a node's volume: freeze the process, empty its data directory,
    /// kill it; the platform restarts it on a new, empty store.
    Wipe(u32),
}

impl Fault {
    /// The short name `--faults` selects it by ([`FAULT_NAMES`]).
    pub fn name(&self) -> &'static str {
        match self {
            Fault::Kill(_) => "kill",
            Fault::Fail(_) => "fail",
            Fault::Partition(_) => "partition",
            Fault::Slow(..) => "slow",
            Fault::Factor(_) => "factor",
            Fault::StrategyFull => "strategy",
            Fault::ClockSkew(..) => "skew",
            Fault::Wipe(_) => "wipe",
        }
    }

    /// The name faults are counted by.
    pub fn kind(&self) -> &'static str {
        match self {
            Fault::Kill(_) => "kill -9",
            Fault::Fail(_) => "fail/recover",
            Fault::Partition(_) => "partition",
            Fault::Slow(..) => "slow peer",
            Fault::Factor(_) => "factor change",
            Fault::StrategyFull => "strategy change",
            Fault::ClockSkew(..) => "clock skew",
            Fault::Wipe(_) => "wiped volume",
        }
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fault::Kill(o) => write!(f, "kill -9 node {o}"),
            Fault::Fail(o) => write!(f, "hold node {o} Failed, then recover it"),
            Fault::Partition(o) => write!(f, "partition node {o} from the others"),
            Fault::Slow(o, d) => write!(f, "slow node {o}'s peer links by {} ms", d.as_millis()),
            Fault::Factor(r) => write!(f, "replication factor -> {r}, then back"),
            Fault::StrategyFull => write!(f, "strategy -> Full, then back to ConsistentHashing"),
            Fault::ClockSkew(o, ms) => write!(
                f,
                "restart node {o} with its clock {:+.3} s off, then with the true clock",
                *ms as f64 / 1000.0
            ),
            Fault::Wipe(o) => write!(
                f,
                "wipe node {o}'s volume (SIGSTOP, empty its data directory, kill -9; it restarts on an empty store)"
            ),
        }
    }
}

/// A fault at a time into the run, held for a while.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Step {
    pub at: Duration,
    pub fault: Fault,
    pub hold: Duration,
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "at {:>7.1}s for {:>4.1}s: {}",
            self.at.as_secs_f64(),
            self.hold.as_secs_f64(),
            self.fault
        )
    }
}

/// The names `--faults` accepts, one per kind of fault.
pub const FAULT_NAMES: [&str; 8] = [
    "kill",
    "fail",
    "partition",
    "slow",
    "factor",
    "strategy",
    "skew",
    "wipe",
];

/// How often each kind of [`FAULT_NAMES`] is drawn (percent).
const WEIGHTS: [u32; 8] = [16, 12, 14, 10, 8, 8, 16, 16];

/// One of `kinds` (name, weight), drawn by weight.
fn draw_kind<'a>(rng: &mut Xoshiro256PlusPlus, kinds: &[(&'a str, u32)]) -> &'a str {
    let total: u32 = kinds.iter().map(|(_, w)| w).sum();
    let mut r = rng.random_range(0..total.max(1));
    for (name, w) in kinds {
        if r < *w {
            return name;
        }
        r -= w;
    }
    FAULT_NAMES[0]
}

/// A fault of kind `name` ([`FAULT_NAMES`]) on a random node.
fn draw_fault(rng: &mut Xoshiro256PlusPlus, name: &str, nodes: u32, factor: u32) -> Fault {
    let node = rng.random_range(0..nodes.max(1));
    match name {
        "kill" => Fault::Kill(node),
        "fail" => Fault::Fail(node),
        "partition" => Fault::Partition(node),
        "slow" => Fault::Slow(node, Duration::from_millis(rng.random_range(50..=400))),
        "factor" => Fault::Factor(if factor > 2 { factor - 1 } else { factor + 1 }),
        "strategy" => Fault::StrategyFull,
        "skew" => {
            // Half small (HLC timestamps of nodes interleave), half large.
            let ms: i64 = if rng.random_range(0..2) == 0 {
                rng.random_range(50..=5_000)
            } else {
                rng.random_range(60_000..=3_600_000)
            };
            Fault::ClockSkew(node, if rng.random_range(0..2) == 0 { ms } else { -ms })
        }
        // "wipe"
        _ => Fault::Wipe(node),
    }
}

/// The schedule for `seed` with every kind of fault: see [`schedule_of`].
pub fn schedule(seed: u64, duration: Duration, nodes: u32, factor: u32) -> Vec<Step> {
    schedule_of(seed, duration, nodes, factor, &[])
}

/// The schedule for `seed`: faults from 1.5 s on, each held 2–5 s with
/// 1–3 s between them, none later than `duration` minus 2 s, drawn among
/// the kinds named in `only` ([`FAULT_NAMES`]; empty = every kind).
pub fn schedule_of(
    seed: u64,
    duration: Duration,
    nodes: u32,
    factor: u32,
    only: &[&str],
) -> Vec<Step> {
    // The kinds to draw from, with their weights (an empty or unknown set
    // allows every kind).
    let mut allowed: Vec<(&str, u32)> = FAULT_NAMES
        .iter()
        .copied()
        .zip(WEIGHTS)
        .filter(|(n, _)| only.contains(n))
        .collect();
    if allowed.is_empty() {
        allowed = FAULT_NAMES.iter().copied().zip(WEIGHTS).collect();
    }
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed);
    let mut steps = Vec::new();
    let mut t = Duration::from_millis(1500);
    loop {
        let hold = Duration::from_millis(rng.random_range(2000..=5000));
        if t + hold + Duration::from_secs(2) > duration {
            break;
        }
        let name = draw_kind(&mut rng, &allowed);
        let fault = draw_fault(&mut rng, name, nodes, factor);
        steps.push(Step { at: t, fault, hold });
        t += hold + Duration::from_millis(rng.random_range(1000..=3000));
    }
    steps
}

/// `count` fresh seeds taken from `draw`, for runs of `duration`: while
/// some kind of fault allowed by `only` ([`FAULT_NAMES`]; empty = all) is
/// not yet covered, a seed is redrawn (bounded) until its schedule's first
/// fault — injected 1.5 s in, on a cluster all Up — is of such a kind. With
/// `count` at least the number of kinds, every kind is exercised.
pub fn fresh_seeds(
    mut draw: impl FnMut() -> u64,
    count: usize,
    duration: Duration,
    nodes: u32,
    factor: u32,
    only: &[&str],
) -> Vec<u64> {
    let first_kind = |seed| {
        schedule_of(seed, duration, nodes, factor, only)
            .first()
            .map(|s| s.fault.name())
    };
    let mut uncovered: Vec<&str> = FAULT_NAMES
        .iter()
        .copied()
        .filter(|n| only.is_empty() || only.contains(n))
        .collect();
    let mut seeds = Vec::new();
    for _ in 0..count {
        let mut seed = draw();
        for _ in 0..10_000 {
            match first_kind(seed) {
                Some(k) if uncovered.contains(&k) => break,
                _ if uncovered.is_empty() => break,
                _ => seed = draw(),
            }
        }
        if let Some(k) = first_kind(seed) {
            uncovered.retain(|n| *n != k);
        }
        seeds.push(seed);
    }
    seeds
}

/// What happened to one step.
#[derive(Clone, Debug)]
pub struct Event {
    pub step: Step,
    /// When it was injected (seconds into the run), or why it was not.
    pub injected_at: Option<Duration>,
    pub skipped: Option<String>,
    /// Heal problems (a change back the planner kept refusing).
    pub heal_note: Option<String>,
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.step)?;
        match (&self.injected_at, &self.skipped) {
            (Some(t), _) => write!(f, " — injected at {:.1}s", t.as_secs_f64())?,
            (None, Some(why)) => write!(f, " — skipped: {why}")?,
            (None, None) => write!(f, " — not reached")?,
        }
        if let Some(n) = &self.heal_note {
            write!(f, "; heal: {n}")?;
        }
        Ok(())
    }
}

/// Runs `steps` against `cluster` (times relative to `start`), stopping at
/// `deadline`; heals each fault after its hold.
pub async fn run(
    cluster: Arc<Cluster>,
    steps: Vec<Step>,
    start: Instant,
    deadline: Instant,
) -> Vec<Event> {
    let mut events = Vec::new();
    for step in steps {
        let at = start + step.at;
        if at >= deadline {
            break;
        }
        tokio::time::sleep_until(at.into()).await;
        // One fault at a time: let the previous one finish healing.
        let settle = deadline
            .saturating_duration_since(Instant::now())
            .min(Duration::from_secs(20));
        if !cluster.wait_all_up(settle).await {
            events.push(Event {
                step,
                injected_at: None,
                skipped: Some(format!("cluster not all Up ({})", cluster.describe())),
                heal_note: None,
            });
            continue;
        }
        let injected = start.elapsed();
        if let Err(why) = inject(&cluster, &step.fault, deadline).await {
            events.push(Event {
                step,
                injected_at: None,
                skipped: Some(why),
                heal_note: None,
            });
            continue;
        }
        let until = (Instant::now() + step.hold).min(deadline);
        tokio::time::sleep_until(until.into()).await;
        let heal_note = heal(&cluster, &step.fault).await.err();
        events.push(Event {
            step,
            injected_at: Some(injected),
            skipped: None,
            heal_note,
        });
    }
    events
}

/// Injects `fault`. A clock skew returns once the skewed node serves again
/// (bounded by `deadline`), so that its hold is spent serving.
async fn inject(cluster: &Cluster, fault: &Fault, deadline: Instant) -> Result<(), String> {
    match fault {
        Fault::Kill(o) => cluster.kill_node(*o),
        Fault::Wipe(o) => cluster.wipe_node(*o),
        Fault::ClockSkew(o, ms) => {
            cluster.set_clock_offset(*o, Some(*ms));
            let left = || deadline.saturating_duration_since(Instant::now());
            if let Err(e) = cluster
                .restart_node(*o, left().min(Duration::from_secs(30)))
                .await
            {
                cluster.set_clock_offset(*o, None);
                return Err(e);
            }
            cluster
                .wait_all_up(left().min(Duration::from_secs(20)))
                .await;
            Ok(())
        }
        Fault::Fail(o) => cluster
            .platform
            .change(|d| {
                d.failed_nodes.insert(*o);
            })
            .map(|_| ())
            .map_err(|r| format!("planner refused: {r}")),
        Fault::Partition(o) => {
            cluster.net.set(|f| {
                f.partitioned.insert(*o);
            });
            Ok(())
        }
        Fault::Slow(o, d) => {
            cluster.net.set(|f| {
                f.slow.insert(*o, *d);
            });
            Ok(())
        }
        Fault::Factor(r) => cluster
            .platform
            .change(|d| d.factor = *r)
            .map(|_| ())
            .map_err(|r| format!("planner refused: {r}")),
        Fault::StrategyFull => cluster
            .platform
            .change(|d| d.strategy = Strategy::Full)
            .map(|_| ())
            .map_err(|r| format!("planner refused: {r}")),
    }
}

/// Undoes `fault`. Changes of the desired cluster are retried (bounded)
/// while the planner refuses them, e.g. while a rebalance is still pending.
async fn heal(cluster: &Cluster, fault: &Fault) -> Result<(), String> {
    match fault {
        Fault::Kill(_) | Fault::Wipe(_) => Ok(()),
        Fault::ClockSkew(o, _) => {
            cluster.set_clock_offset(*o, None);
            cluster.restart_node(*o, RESTART_LIMIT).await
        }
        Fault::Partition(o) => {
            cluster.net.set(|f| {
                f.partitioned.remove(o);
            });
            Ok(())
        }
        Fault::Slow(o, _) => {
            cluster.net.set(|f| {
                f.slow.remove(o);
            });
            Ok(())
        }
        Fault::Fail(o) => {
            retry_change(cluster, |d| {
                d.failed_nodes.remove(o);
            })
            .await
        }
        Fault::Factor(_) | Fault::StrategyFull => {
            let factor = cluster.initial_factor();
            retry_change(cluster, move |d| {
                d.strategy = Strategy::ConsistentHashing;
                d.factor = factor;
            })
            .await
        }
    }
}

async fn retry_change(
    cluster: &Cluster,
    f: impl Fn(&mut kv_control::planner::Desired),
) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match cluster.platform.change(&f) {
            Ok(_) => return Ok(()),
            Err(r) if Instant::now() >= deadline => {
                return Err(format!("planner kept refusing for 30 s: {r}"));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
}

/// Heals everything: every net fault, every skewed clock, every held-down
/// node, the initial strategy and factor (bounded retries while the
/// planner refuses).
pub async fn heal_all(cluster: &Cluster) -> Result<(), String> {
    cluster.net.heal();
    let mut problems = Vec::new();
    for o in cluster.skewed_nodes() {
        cluster.set_clock_offset(o, None);
        // A node not running now starts with the true clock anyway.
        if cluster.platform.node_pid(o).is_none() {
            continue;
        }
        if let Err(e) = cluster.restart_node(o, RESTART_LIMIT).await {
            problems.push(e);
        }
    }
    let factor = cluster.initial_factor();
    if let Err(e) = retry_change(cluster, move |d| {
        d.failed_nodes.clear();
        d.strategy = Strategy::ConsistentHashing;
        d.factor = factor;
    })
    .await
    {
        problems.push(e);
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}

/// Faults injected, by kind.
pub fn injected_by_kind(events: &[Event]) -> BTreeMap<&'static str, usize> {
    let mut m = BTreeMap::new();
    for e in events.iter().filter(|e| e.injected_at.is_some()) {
        *m.entry(e.step.fault.kind()).or_insert(0) += 1;
    }
    m
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_schedule_and_another_seed_another() {
        let a = schedule(42, Duration::from_secs(120), 5, 3);
        assert_eq!(a, schedule(42, Duration::from_secs(120), 5, 3));
        assert_ne!(a, schedule(43, Duration::from_secs(120), 5, 3));
        assert!(a.len() >= 10, "{a:?}");
        assert!(a.windows(2).all(|w| w[0].at + w[0].hold < w[1].at));
        assert!(
            a.iter()
                .all(|s| s.at + s.hold + Duration::from_secs(2) <= Duration::from_secs(120))
        );
    }

    #[test]
    fn faults_draws_only_the_kinds_named() {
        for seed in 0..50 {
            let s = schedule_of(seed, Duration::from_secs(60), 5, 3, &["skew", "wipe"]);
            assert!(!s.is_empty());
            assert!(
                s.iter()
                    .all(|s| matches!(s.fault, Fault::ClockSkew(..) | Fault::Wipe(_))),
                "{s:?}"
            );
        }
        // Every kind can be selected alone.
        for name in FAULT_NAMES {
            let s = schedule_of(1, Duration::from_secs(30), 5, 3, &[name]);
            assert!(s.iter().all(|s| s.fault.name() == name), "{name}: {s:?}");
        }
    }

    #[test]
    fn clock_skews_stay_within_an_hour_either_way() {
        let skews: Vec<i64> = (0..200)
            .flat_map(|seed| schedule_of(seed, Duration::from_secs(60), 5, 3, &["skew"]))
            .map(|s| match s.fault {
                Fault::ClockSkew(_, ms) => ms,
                other => panic!("{other:?}"),
            })
            .collect();
        assert!(skews.iter().all(|ms| *ms != 0 && ms.abs() <= 3_600_000));
        assert!(skews.iter().any(|ms| *ms < -60_000) && skews.iter().any(|ms| *ms > 60_000));
        assert!(skews.iter().any(|ms| ms.abs() < 5_001));
    }

    #[test]
    fn fresh_seeds_cover_every_kind_of_fault_with_their_first_faults() {
        let mut source = 1000u64;
        let draw = || {
            source += 7919;
            source
        };
        let d = Duration::from_secs(15);
        let seeds = fresh_seeds(draw, 10, d, 5, 3, &[]);
        assert_eq!(seeds.len(), 10);
        let firsts: BTreeSet<&str> = seeds
            .iter()
            .filter_map(|s| schedule(*s, d, 5, 3).first().map(|s| s.fault.name()))
            .collect();
        assert_eq!(firsts.len(), FAULT_NAMES.len(), "{firsts:?}");
        // Restricted to some kinds, it covers those.
        let seeds = fresh_seeds(rand::random::<u64>, 3, d, 5, 3, &["wipe", "skew"]);
        let firsts: BTreeSet<&str> = seeds
            .iter()
            .filter_map(|s| {
                schedule_of(*s, d, 5, 3, &["wipe", "skew"])
                    .first()
                    .map(|s| s.fault.name())
            })
            .collect();
        assert_eq!(firsts, BTreeSet::from(["skew", "wipe"]));
    }
}
