//! One run: start the cluster, let the clients and the nemesis loose for a
//! while, heal, let the cluster converge (bounded), read every key at
//! `All`, compare co-owner digests, and check the history.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvctl::verify::VerifyReport;

use crate::checker::{self, Verdict};
use crate::client::{self, Workload};
use crate::cluster::{Cluster, ClusterError, ClusterOptions};
use crate::history::{Op, OpKind, Outcome, Recorder};
use crate::nemesis::{self, Event, Step};
use crate::proxy::NetStats;

/// How long the end of a run may wait for each phase.
const HEAL_LIMIT: Duration = Duration::from_secs(90);
const CONVERGE_LIMIT: Duration = Duration::from_secs(60);
const FINAL_READ_ATTEMPTS: usize = 10;

#[derive(Clone, Debug)]
pub struct RunOptions {
    pub seed: u64,
    /// Clients and nemesis run this long.
    pub duration: Duration,
    pub nodes: u32,
    pub factor: u32,
    pub clients: usize,
    /// Creates sent at the same moment in each create race (0: no races).
    pub create_race_width: usize,
    pub keys: usize,
    pub node_binary: PathBuf,
    pub request_timeout: Duration,
    pub max_think: Duration,
    pub anti_entropy_secs: u64,
    /// Kinds of fault the nemesis draws from (empty = all).
    pub faults: Vec<&'static str>,
    /// `X-Consistency` on client requests (`None` = the cluster's
    /// `Quorum`): weakening it shows the checker catching what follows.
    pub read_consistency: Option<&'static str>,
    pub write_consistency: Option<&'static str>,
    pub keep_data: bool,
    /// Print the schedule and the nemesis' progress as it goes.
    pub verbose: bool,
}

impl RunOptions {
    pub fn new(seed: u64, duration: Duration, node_binary: PathBuf) -> RunOptions {
        RunOptions {
            seed,
            duration,
            nodes: 5,
            factor: 3,
            clients: 8,
            create_race_width: 3,
            keys: 8,
            node_binary,
            request_timeout: Duration::from_secs(4),
            max_think: Duration::from_millis(20),
            anti_entropy_secs: 2,
            faults: Vec::new(),
            read_consistency: None,
            write_consistency: None,
            keep_data: false,
            verbose: false,
        }
    }
}

/// Everything a run found.
pub struct RunReport {
    pub seed: u64,
    pub options: RunOptions,
    pub schedule: Vec<Step>,
    pub events: Vec<Event>,
    pub ops: Vec<Op>,
    pub finals: Vec<Op>,
    pub verdict: Verdict,
    /// `kvctl verify` after the final reads; `None` if a node did not answer.
    pub verify: Option<VerifyReport>,
    /// Problems of the end phase: not all Up, no convergence, refused heals.
    pub heal_problems: Vec<String>,
    /// Time from heal to every node Up and digests equal.
    pub converged_after: Option<Duration>,
    pub elapsed: Duration,
    pub data_dir: PathBuf,
    /// What the peer-link proxies saw.
    pub net: NetStats,
}

impl RunReport {
    /// The checker found nothing, the cluster healed and the replicas agree.
    pub fn passed(&self) -> bool {
        self.verdict.ok()
            && self.heal_problems.is_empty()
            && self.verify.as_ref().is_some_and(|v| v.consistent())
    }

    /// Client operations counted by kind and outcome.
    pub fn ops_by_outcome(&self) -> BTreeMap<(&'static str, Outcome), usize> {
        let mut m = BTreeMap::new();
        for op in &self.ops {
            let k = match op.kind {
                OpKind::Write(_) => "write",
                OpKind::Create { .. } if op.exists => "create (exists)",
                OpKind::Create { .. } => "create",
                OpKind::Read => "read",
                OpKind::Delete => "delete",
            };
            *m.entry((k, op.outcome)).or_insert(0) += 1;
        }
        m
    }

    /// The operations on `key` around a violation: from 5 s before the
    /// acknowledged operation it contradicts to the operation that shows
    /// it, and the final read.
    fn minimal_history(&self, v: &checker::Violation) -> Vec<&Op> {
        let all = checker::history_of(&v.key, &self.ops, &self.finals);
        let find = |id: Option<usize>| id.and_then(|i| all.iter().find(|o| o.id == i).copied());
        let from = find(v.against)
            .or_else(|| find(v.witness))
            .map_or(0, |o| o.invoke.saturating_sub(5_000_000));
        let to = find(v.witness).and_then(|o| o.complete).unwrap_or(u64::MAX);
        all.into_iter()
            .filter(|o| {
                (o.invoke >= from && o.invoke <= to)
                    || o.client == crate::history::FINAL_CLIENT
                    || Some(o.id) == v.against
            })
            .collect()
    }
}

impl fmt::Display for RunReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let o = &self.options;
        writeln!(
            f,
            "seed {}: {} nodes (ConsistentHashing, factor {}, reads {} / writes {}), {} clients and create races {} wide on {} keys for {:.0}s; run took {:.1}s",
            self.seed,
            o.nodes,
            o.factor,
            o.read_consistency.unwrap_or("quorum"),
            o.write_consistency.unwrap_or("quorum"),
            o.clients,
            o.create_race_width,
            o.keys,
            o.duration.as_secs_f64(),
            self.elapsed.as_secs_f64()
        )?;
        let by = self.ops_by_outcome();
        write!(f, "operations: {} —", self.ops.len())?;
        for ((k, out), n) in &by {
            write!(f, " {k} {out} {n},")?;
        }
        writeln!(f)?;
        let faults = nemesis::injected_by_kind(&self.events);
        let skipped = self
            .events
            .iter()
            .filter(|e| e.injected_at.is_none())
            .count();
        write!(f, "faults injected: {} —", faults.values().sum::<usize>())?;
        for (k, n) in &faults {
            write!(f, " {k} {n},")?;
        }
        writeln!(f, " skipped {skipped}")?;
        writeln!(
            f,
            "peer links: {} connections proxied over {} links, {} stalled by a partition, {} chunks delayed",
            self.net.connections.values().sum::<u64>(),
            self.net.connections.len(),
            self.net.stalled,
            self.net.delayed
        )?;
        match self.converged_after {
            Some(d) => writeln!(f, "converged {:.1}s after heal", d.as_secs_f64())?,
            None => writeln!(f, "did not converge within the limits")?,
        }
        for p in &self.heal_problems {
            writeln!(f, "heal: {p}")?;
        }
        match &self.verify {
            Some(v) => writeln!(
                f,
                "verify: {} buckets compared, {} divergent",
                v.buckets_compared,
                v.divergent.len()
            )?,
            None => writeln!(f, "verify: a node did not answer /v1/digests")?,
        }
        writeln!(
            f,
            "checker: {} reads, {} acknowledged writes/deletes and {} creates on {} keys checked — {}",
            self.verdict.reads_checked,
            self.verdict.acknowledged_checked,
            self.verdict.creates_checked,
            self.verdict.keys,
            if self.passed() { "PASS" } else { "FAIL" }
        )?;
        if !self.passed() {
            writeln!(
                f,
                "replay with --seed {} --duration {}s; nemesis schedule:",
                self.seed,
                o.duration.as_secs()
            )?;
            for e in &self.events {
                writeln!(f, "  {e}")?;
            }
            for (k, n) in self.verdict.by_kind() {
                writeln!(f, "{k}: {n}")?;
            }
            if let Some(v) = &self.verify {
                for d in v.divergent.iter().take(5) {
                    writeln!(f, "divergent bucket {}: {:?}", d.bucket, d.owners)?;
                }
            }
            let mut shown = std::collections::BTreeSet::new();
            for v in &self.verdict.violations {
                // One history per key is enough.
                if !shown.insert(v.key.clone()) || shown.len() > 5 {
                    continue;
                }
                writeln!(f, "VIOLATION {v}")?;
                writeln!(f, "  history of {:?} (times in s since start):", v.key)?;
                for op in self.minimal_history(v) {
                    writeln!(f, "    {op}")?;
                }
            }
            writeln!(f, "data directory: {}", self.data_dir.display())?;
        }
        Ok(())
    }
}

/// Runs one seed end to end.
pub async fn run(opts: RunOptions) -> Result<RunReport, ClusterError> {
    let began = Instant::now();
    let schedule = nemesis::schedule_of(
        opts.seed,
        opts.duration,
        opts.nodes,
        opts.factor,
        &opts.faults,
    );
    if opts.verbose {
        println!("seed {}: nemesis schedule", opts.seed);
        for s in &schedule {
            println!("  {s}");
        }
    }
    let cluster = Arc::new(
        Cluster::start(&ClusterOptions {
            nodes: opts.nodes,
            factor: opts.factor,
            node_binary: opts.node_binary.clone(),
            anti_entropy_secs: opts.anti_entropy_secs,
            failure_detection_ms: 3000,
            keep_data: opts.keep_data,
        })
        .await?,
    );
    let data_dir = cluster.data_dir.clone();
    let rec = Arc::new(Recorder::new());
    let start = Instant::now();
    let deadline = start + opts.duration;
    let targets = Arc::new(cluster.targets());
    let work = Workload {
        keys: opts.keys,
        request_timeout: opts.request_timeout,
        max_think: opts.max_think,
        read_consistency: opts.read_consistency,
        write_consistency: opts.write_consistency,
    };
    let clients: Vec<_> = (0..opts.clients)
        .map(|id| {
            tokio::spawn(client::run_client(
                id,
                opts.seed,
                targets.clone(),
                work.clone(),
                rec.clone(),
                deadline,
            ))
        })
        .collect();
    let races = tokio::spawn(client::run_create_races(
        opts.clients,
        opts.create_race_width,
        opts.seed,
        targets.clone(),
        work.clone(),
        rec.clone(),
        deadline,
    ));
    let nemesis = tokio::spawn(nemesis::run(
        cluster.clone(),
        schedule.clone(),
        start,
        deadline,
    ));
    for c in clients {
        let _ = c.await;
    }
    let _ = races.await;
    let events = nemesis.await.unwrap_or_default();
    if opts.verbose {
        for e in &events {
            println!("  {e}");
        }
    }

    // Heal everything and let the cluster converge (bounded).
    let mut heal_problems = Vec::new();
    let healed = Instant::now();
    if let Err(e) = nemesis::heal_all(&cluster).await {
        heal_problems.push(e);
    }
    if !cluster.wait_all_up(HEAL_LIMIT).await {
        heal_problems.push(format!(
            "not every node Up {}s after heal: {}",
            HEAL_LIMIT.as_secs(),
            cluster.describe()
        ));
    }
    let http = client::http_client(Duration::from_secs(10));
    let converged_after = converge(&cluster, &http, CONVERGE_LIMIT)
        .await
        .then(|| healed.elapsed());
    if converged_after.is_none() {
        heal_problems.push(format!(
            "digests still differ or hints still pending {}s after every node was Up",
            CONVERGE_LIMIT.as_secs()
        ));
    }

    // Final reads at All, then the replicas must agree.
    let mut finals = Vec::new();
    for k in 0..opts.keys {
        let key = client::key_name(k);
        let mut last = None;
        for attempt in 0..FINAL_READ_ATTEMPTS {
            let (o, addr) = &targets.nodes[(k + attempt) % targets.nodes.len().max(1)];
            let op = client::final_read(
                &http,
                &rec,
                addr,
                &format!("node {o}"),
                &targets.token,
                key.clone(),
            )
            .await;
            let ok = op.outcome == Outcome::Ok;
            last = Some(op);
            if ok {
                break;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        finals.extend(last);
    }
    let _ = converge(&cluster, &http, Duration::from_secs(20)).await;
    let verify = cluster.verify(&http).await.map(|(v, _)| v);
    let ops: Vec<Op> = rec
        .ops()
        .into_iter()
        .filter(|o| o.client != crate::history::FINAL_CLIENT)
        .collect();
    let verdict = checker::check(&ops, &finals);
    let net = cluster.net.stats();
    match Arc::try_unwrap(cluster) {
        Ok(c) => c.stop().await,
        Err(c) => c.platform.shutdown().await,
    }
    Ok(RunReport {
        seed: opts.seed,
        options: opts,
        schedule,
        events,
        ops,
        finals,
        verdict,
        verify,
        heal_problems,
        converged_after,
        elapsed: began.elapsed(),
        data_dir,
        net,
    })
}

/// Waits (bounded) until co-owner digests agree and no hint is pending.
async fn converge(cluster: &Cluster, http: &reqwest::Client, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if let Some((v, hints)) = cluster.verify(http).await
            && v.consistent()
            && hints == 0
        {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
