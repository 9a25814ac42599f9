//! The nemesis: a schedule of faults drawn from a seed, and the code that
//! injects and heals them.
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
pub const FAULT_NAMES: [&str; 6] = ["kill", "fail", "partition", "slow", "factor", "strategy"];

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
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed);
    let mut steps = Vec::new();
    let mut t = Duration::from_millis(1500);
    loop {
        let hold = Duration::from_millis(rng.random_range(2000..=5000));
        if t + hold + Duration::from_secs(2) > duration {
            break;
        }
        let mut fault = None;
        // Redraw until the kind is allowed (bounded; an empty or unknown
        // set allows everything).
        for _ in 0..64 {
            let node = rng.random_range(0..nodes.max(1));
            let f = match rng.random_range(0..100) {
                0..25 => Fault::Kill(node),
                25..45 => Fault::Fail(node),
                45..65 => Fault::Partition(node),
                65..80 => Fault::Slow(node, Duration::from_millis(rng.random_range(50..=400))),
                80..90 => Fault::Factor(if factor > 2 { factor - 1 } else { factor + 1 }),
                _ => Fault::StrategyFull,
            };
            let allowed = only.is_empty() || only.contains(&f.name());
            fault = Some(f);
            if allowed {
                break;
            }
        }
        let Some(fault) = fault else { break };
        steps.push(Step { at: t, fault, hold });
        t += hold + Duration::from_millis(rng.random_range(1000..=3000));
    }
    steps
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
        if let Err(why) = inject(&cluster, &step.fault).await {
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

async fn inject(cluster: &Cluster, fault: &Fault) -> Result<(), String> {
    match fault {
        Fault::Kill(o) => {
            let pid = cluster
                .platform
                .node_pid(*o)
                .ok_or_else(|| format!("node {o} is not running"))?;
            let pid = i32::try_from(pid).map_err(|e| e.to_string())?;
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            )
            .map_err(|e| format!("kill -9 {pid}: {e}"))
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
        Fault::Kill(_) => Ok(()),
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
    f: impl Fn(&mut kv_operator::planner::Desired),
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

/// Heals everything: every net fault, every held-down node, the initial
/// strategy and factor (bounded retries while the planner refuses).
pub async fn heal_all(cluster: &Cluster) -> Result<(), String> {
    cluster.net.heal();
    let factor = cluster.initial_factor();
    retry_change(cluster, move |d| {
        d.failed_nodes.clear();
        d.strategy = Strategy::ConsistentHashing;
        d.factor = factor;
    })
    .await
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
}
