//! The coordinator: any node takes a client request and runs it on the key's
//! owners (docs/design.md, "Quorum rules").
//!
//! A write gets a new version from this node's clock and goes to every write
//! owner in parallel (the local store directly, peers through their batchers).
//! It is acknowledged once `W` owners of the committed placement that count in
//! quorum have it on stable storage — and, while a placement is pending, `W`
//! owners of the new one too. Owners that are Failed, or that do not answer,
//! get a durable hint on this node. When too few owners are live the write is
//! refused before anything is written (503).
//!
//! A read asks the owners that serve reads, waits for `R` answers, returns the
//! newest version and repairs stale owners in the background.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use kv_core::wire::CreateAnswer;
use kv_core::{Applied, Consistency, NodeState, Record, bucket_of};
use tokio::sync::mpsc;

use crate::cluster::View;

/// How long a read waits for an owner before also asking the next one.
const SPECULATIVE_READ_AFTER: std::time::Duration = std::time::Duration::from_millis(100);
use crate::node::{ApiError, Node};
use crate::peer::{ApplyReply, CreatePhase, PeerError};
use crate::storage::StorageError;

/// What a prefix listing returns.
#[derive(Debug, PartialEq)]
pub struct Listing {
    pub keys: Vec<Vec<u8>>,
    /// The key to pass as `after` for the next page, if there may be more.
    pub next: Option<Vec<u8>>,
}

/// Whom a write of one key goes to and which acknowledgements it needs: `W`
/// of the committed placement's owners that count in quorum and, while a
/// placement is pending, `W` of the new owners as well.
struct WritePlan {
    current: Vec<u32>,
    pending: Option<Vec<u32>>,
    need_cur: usize,
    need_pend: Option<usize>,
    targets: BTreeSet<u32>,
}

impl WritePlan {
    /// Refuses (503) a write that cannot reach its quorums with the owners
    /// that are live, before anything is written.
    fn new(view: &View, key: &[u8], level: Consistency) -> Result<WritePlan, ApiError> {
        let bucket = bucket_of(key);
        let current: Vec<u32> = view.layout.current.owners(bucket).to_vec();
        let pending: Option<Vec<u32>> = view
            .layout
            .pending
            .as_ref()
            .map(|p| p.owners(bucket).to_vec());
        let state = |o: &u32| view.state_of(*o);
        let need_cur = level.required(current.len()).max(1);
        let live_cur = current
            .iter()
            .filter(|o| state(o).is_some_and(NodeState::counts_in_quorum))
            .count();
        if live_cur < need_cur {
            return Err(unavailable(format!(
                "write at {level} needs {need_cur} of the key's {} owners and only {live_cur} are Up",
                current.len()
            )));
        }
        let need_pend = pending.as_ref().map(|p| level.required(p.len()).max(1));
        if let (Some(p), Some(need)) = (&pending, need_pend) {
            let live = p
                .iter()
                .filter(|o| state(o).is_some_and(NodeState::takes_replica_writes))
                .count();
            if live < need {
                return Err(unavailable(format!(
                    "write at {level} needs {need} of the key's {} new owners (rebalancing) and only {live} take writes",
                    p.len()
                )));
            }
        }
        let targets = view.layout.write_owners(bucket).into_iter().collect();
        Ok(WritePlan {
            current,
            pending,
            need_cur,
            need_pend,
            targets,
        })
    }

    /// Which quorums an acknowledgement from `o` counts towards. An owner
    /// whose store is still catching up takes the write but does not count
    /// towards the committed placement's quorum (like a Recovering node): it
    /// may lack the newer version that would have made it refuse.
    fn counts(&self, view: &View, o: u32, catching_up: bool) -> (bool, bool) {
        let cur = self.current.contains(&o)
            && !catching_up
            && view.state_of(o).is_some_and(NodeState::counts_in_quorum);
        let pend = self.pending.as_ref().is_some_and(|p| p.contains(&o));
        (cur, pend)
    }

    fn done(&self, cur: usize, pend: usize) -> bool {
        cur >= self.need_cur && self.need_pend.is_none_or(|n| pend >= n)
    }

    /// Which quorum fell short: while a placement is pending both are needed.
    fn shortfall(&self, cur: usize, pend: usize) -> String {
        let need_cur = self.need_cur;
        match self.need_pend {
            Some(n) if pend < n => format!(
                "{pend} of the {n} owners the pending placement (a rebalance) needs, and {cur} of the {need_cur} the committed placement needs"
            ),
            _ => format!("{cur} of the {need_cur} owners it needs"),
        }
    }
}

fn unavailable(msg: String) -> ApiError {
    ApiError::new(503, "unavailable", msg)
}

impl Node {
    fn require_serving(&self) -> Result<Arc<View>, ApiError> {
        let view = self.cluster.view();
        if !self.cluster.confirmed() {
            return Err(unavailable(format!(
                "node {} has not confirmed its topology since it started; try another node",
                self.me()
            )));
        }
        match view.state_of(self.me()) {
            Some(s) if s.serves_client_reads() => Ok(view),
            Some(s) => Err(unavailable(format!(
                "node {} is {s} and serves no clients until it is Up; try another node",
                self.me()
            ))),
            None => Err(unavailable(format!(
                "node {} is not part of the cluster's topology",
                self.me()
            ))),
        }
    }

    /// Reads `key` at `level` (cluster default when `None`). Tombstones come
    /// back as records with no value.
    pub async fn read(
        self: &Arc<Self>,
        key: &[u8],
        level: Option<Consistency>,
    ) -> Result<Option<Record>, ApiError> {
        let view = self.require_serving()?;
        let level = level.unwrap_or(view.topology.read_consistency);
        let owners = view.layout.read_owners(bucket_of(key)).to_vec();
        let need = level.required(owners.len()).max(1);
        // A store that is new or rebuilt answers no reads until caught up:
        // its "absent" would be a lie (SPEC §3).
        let me_catching_up = self.store.catching_up();
        let candidates: Vec<u32> = owners
            .iter()
            .copied()
            .filter(|o| {
                view.state_of(*o)
                    .is_some_and(NodeState::serves_client_reads)
                    && !(*o == self.me() && me_catching_up)
            })
            .collect();
        if candidates.len() < need {
            return Err(unavailable(format!(
                "read at {level} needs {need} of the key's {} owners and only {} are serving",
                owners.len(),
                candidates.len()
            )));
        }
        if need == 1 && candidates.contains(&self.me()) {
            return self.store.get(key).map_err(ApiError::storage);
        }
        // Ask exactly `need` owners (this node first, the others rotated by
        // bucket to spread load); ask the next one only when one fails.
        let mut order: Vec<u32> = candidates
            .iter()
            .copied()
            .filter(|o| *o != self.me())
            .collect();
        if !order.is_empty() {
            let shift = bucket_of(key) as usize % order.len();
            order.rotate_left(shift);
        }
        if candidates.contains(&self.me()) {
            order.insert(0, self.me());
        }
        let mut queue = order.into_iter();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let spawn = |o: u32| {
            let (node, tx, key, view) = (self.clone(), tx.clone(), key.to_vec(), view.clone());
            tokio::spawn(async move {
                let r = node.read_replica(&view, o, key).await;
                let _ = tx.send((o, r));
            });
        };
        let mut in_flight = 0usize;
        for o in queue.by_ref().take(need) {
            spawn(o);
            in_flight += 1;
        }
        let mut answers: BTreeMap<u32, Option<Record>> = BTreeMap::new();
        let mut errors = Vec::new();
        // Speculative retry (as Cassandra's): an owner that has not answered
        // within SPECULATIVE_READ_AFTER may be partitioned or stalled, so the
        // next owner is asked too rather than waiting out the peer timeout.
        let speculate = tokio::time::sleep(SPECULATIVE_READ_AFTER);
        tokio::pin!(speculate);
        while answers.len() < need && in_flight > 0 {
            let (o, r) = tokio::select! {
                next = rx.recv() => match next {
                    Some(answer) => answer,
                    None => break,
                },
                _ = &mut speculate => {
                    if let Some(next) = queue.next() {
                        spawn(next);
                        in_flight += 1;
                        self.metrics.speculative_reads.inc();
                    }
                    speculate
                        .as_mut()
                        .reset(tokio::time::Instant::now() + SPECULATIVE_READ_AFTER);
                    continue;
                }
            };
            in_flight -= 1;
            match r {
                Ok(r) => {
                    answers.insert(o, r);
                }
                Err(e) => {
                    errors.push(format!("node {o}: {e}"));
                    if let Some(next) = queue.next() {
                        spawn(next);
                        in_flight += 1;
                    }
                }
            }
        }
        drop(tx);
        if answers.len() < need {
            return Err(unavailable(format!(
                "read at {level} needed {need} answers and got {} ({})",
                answers.len(),
                errors.join("; ")
            )));
        }
        let newest = newest(answers.values());
        if let Some(newest) = newest.clone() {
            let node = self.clone();
            tokio::spawn(async move { node.repair(view, newest, answers, rx).await });
        }
        Ok(newest)
    }

    async fn read_replica(
        &self,
        view: &View,
        ordinal: u32,
        key: Vec<u8>,
    ) -> Result<Option<Record>, String> {
        if ordinal == self.me() {
            return self.store.get(&key).map_err(|e| e.to_string());
        }
        let addr = peer_address(view, ordinal).map_err(|e| e.to_string())?;
        self.peers
            .read_one(ordinal, &addr, key)
            .await
            .map_err(|e| e.to_string())
    }

    /// Read repair: every owner that answered with something older than
    /// `newest` (now or later) gets it.
    async fn repair(
        self: Arc<Self>,
        view: Arc<View>,
        newest: Record,
        mut answers: BTreeMap<u32, Option<Record>>,
        mut rest: mpsc::UnboundedReceiver<(u32, Result<Option<Record>, String>)>,
    ) {
        let deadline = tokio::time::sleep(self.peers.timeout());
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                next = rest.recv() => match next {
                    Some((o, Ok(r))) => { answers.insert(o, r); }
                    Some((_, Err(_))) => {}
                    None => break,
                },
                _ = &mut deadline => break,
            }
        }
        for (o, have) in answers {
            let stale = have.as_ref().is_none_or(|h| h.version < newest.version);
            if !stale {
                continue;
            }
            let ok = if o == self.me() {
                self.store.apply(vec![newest.clone()]).await.is_ok()
            } else {
                match peer_address(&view, o) {
                    Ok(addr) => self.peers.apply_one(o, &addr, newest.clone()).await.is_ok(),
                    Err(_) => false,
                }
            };
            if ok {
                self.metrics.read_repairs.inc();
            }
        }
    }

    /// Writes `value` (`None` = delete) at `level`. With `expect_present`,
    /// 404 unless a live value exists; with `create_only`, 412 if one does
    /// (linearizable: see [`Node::create`]).
    ///
    /// Per-key monotonic versions: an owner that already holds a newer
    /// version of the key says so instead of acknowledging; the coordinator
    /// moves its clock past that version and re-issues the write. An
    /// acknowledgement therefore means the owner held nothing newer, and
    /// since any two write quorums share an owner, a write that begins after
    /// another was acknowledged (both at Quorum or All) gets the higher
    /// version, whatever the coordinators' clocks say.
    pub async fn write(
        self: &Arc<Self>,
        key: Vec<u8>,
        value: Option<Vec<u8>>,
        level: Option<Consistency>,
        create_only: bool,
        expect_present: bool,
    ) -> Result<Record, ApiError> {
        let view = self.require_serving()?;
        self.check_clock()?;
        let level = level.unwrap_or(view.topology.write_consistency);
        if create_only {
            if let Some(value) = value {
                return self.create(&view, key, value, level).await;
            }
            return Err(ApiError::bad_request("a create-only write needs a value"));
        }
        if expect_present {
            let current = self.read(&key, None).await?;
            if current.as_ref().is_none_or(|r| r.value.is_none()) {
                return Err(ApiError::new(404, "not_found", "no such key".into()));
            }
        }
        self.replicate(&view, key, value, level).await
    }

    /// Runs a write on the key's owners, re-issuing it with a higher version
    /// while an owner holds a newer one (a bounded number of times).
    pub(crate) async fn replicate(
        self: &Arc<Self>,
        view: &Arc<View>,
        key: Vec<u8>,
        value: Option<Vec<u8>>,
        level: Consistency,
    ) -> Result<Record, ApiError> {
        let mut attempt = 0;
        let mut view = view.clone();
        loop {
            let record = Record {
                key: key.clone(),
                value: value.clone(),
                version: self.hlc.now(),
            };
            match self.replicate_once(&view, record, level).await? {
                Replicated::Done(r) => return Ok(r),
                Replicated::Stale => {
                    attempt += 1;
                    if attempt >= MAX_REISSUES {
                        return Err(unavailable(
                            "the key's owners kept moving to newer topologies during the write; it is not reported as written and may or may not become visible".into(),
                        ));
                    }
                    view = self.newer_view(view.topology.epoch).await?;
                }
                Replicated::Superseded(newer) => {
                    self.hlc.observe(newer);
                    attempt += 1;
                    self.metrics.writes_reissued.inc();
                    if attempt >= MAX_REISSUES {
                        return Err(unavailable(format!(
                            "the key's owners kept holding newer versions through {attempt} attempts (concurrent writers); the write is not reported as written and may or may not become visible"
                        )));
                    }
                }
            }
        }
    }

    async fn replicate_once(
        self: &Arc<Self>,
        view: &Arc<View>,
        record: Record,
        level: Consistency,
    ) -> Result<Replicated, ApiError> {
        let plan = WritePlan::new(view, &record.key, level)?;
        let state = |o: &u32| view.state_of(*o);
        let targets = plan.targets.clone();
        let (tx, mut rx) = mpsc::unbounded_channel::<(u32, Result<ApplyReply, WriteFailure>)>();
        let mut hints = Vec::new();
        for o in targets {
            if !state(&o).is_some_and(NodeState::takes_replica_writes) {
                hints.push((o, record.clone()));
                continue;
            }
            let (node, tx, rec, view) = (self.clone(), tx.clone(), record.clone(), view.clone());
            tokio::spawn(async move {
                let r = node.write_replica(&view, o, rec.clone()).await;
                // A stale refusal stored the record; the write is planned again.
                if matches!(r, Err(WriteFailure::Other(_) | WriteFailure::DiskFull))
                    && o != node.me()
                    && let Err(e) = node.store.add_hints(vec![(o, rec)]).await
                {
                    tracing::warn!(node = o, error = %e, "cannot store a hint");
                }
                let _ = tx.send((o, r));
            });
        }
        drop(tx);
        if !hints.is_empty() {
            let n = hints.len();
            // Hints for owners known to be down are stored before the answer,
            // so they outlive a crash of this node right after it.
            if let Err(e) = self.store.add_hints(hints).await {
                tracing::warn!(error = %e, count = n, "cannot store hints");
            }
        }
        let (mut acked_cur, mut acked_pend) = (0usize, 0usize);
        let mut failures = Vec::new();
        let mut disk_full = false;
        let mut newer: Option<kv_core::Version> = None;
        let mut stale = false;
        while !plan.done(acked_cur, acked_pend) {
            match rx.recv().await {
                Some((o, Ok(reply))) => match reply.outcome {
                    Applied::Stored | Applied::Had => {
                        let (c, p) = plan.counts(view, o, reply.catching_up);
                        acked_cur += usize::from(c);
                        acked_pend += usize::from(p);
                    }
                    Applied::Newer(v) => {
                        newer = newer.max(Some(v));
                        failures.push(format!("node {o}: holds a newer version {v}"));
                    }
                },
                Some((o, Err(f))) => {
                    disk_full |= matches!(f, WriteFailure::DiskFull);
                    stale |= matches!(f, WriteFailure::Stale(_));
                    failures.push(format!("node {o}: {}", f.message()));
                }
                None => break,
            }
        }
        if plan.done(acked_cur, acked_pend) {
            return Ok(Replicated::Done(record));
        }
        if let Some(v) = newer {
            return Ok(Replicated::Superseded(v));
        }
        if stale {
            return Ok(Replicated::Stale);
        }
        let short = plan.shortfall(acked_cur, acked_pend);
        let msg = format!(
            "write at {level} was acknowledged by {short} ({}); it is not reported as written and may or may not become visible",
            failures.join("; ")
        );
        if disk_full {
            Err(ApiError::new(507, "insufficient_storage", msg))
        } else {
            Err(unavailable(msg))
        }
    }

    /// The node that serialises create-only writes of `key`: the first of
    /// its owners (committed placement) that counts in quorum. Every node
    /// holding the same topology names the same one.
    fn create_leader(view: &View, key: &[u8]) -> Option<u32> {
        view.layout
            .current
            .owners(bucket_of(key))
            .iter()
            .copied()
            .find(|o| view.state_of(*o).is_some_and(NodeState::counts_in_quorum))
    }

    /// A create-only write, linearizable per key: it runs on the key's create
    /// leader, which holds a per-key lock across a quorum read and the write,
    /// so of concurrent creators exactly one finds the key absent. Creates
    /// read and write at Quorum at least, so each sees every create
    /// acknowledged before it, even one whose leader has changed since.
    async fn create(
        self: &Arc<Self>,
        view: &Arc<View>,
        key: Vec<u8>,
        value: Vec<u8>,
        level: Consistency,
    ) -> Result<Record, ApiError> {
        let Some(leader) = Self::create_leader(view, &key) else {
            return Err(unavailable(
                "a create-only write needs one of the key's owners Up".into(),
            ));
        };
        if leader == self.me() {
            return self.create_as_leader(key, value, level).await;
        }
        let addr = peer_address(view, leader).map_err(|e| unavailable(e.to_string()))?;
        let record = Record {
            key,
            value: Some(value),
            version: kv_core::Version::ZERO,
        };
        match self.peers.create(leader, &addr, &record, level).await {
            Ok(r) => Ok(r),
            Err(PeerError::Status(_, status, body))
                if status < 500 || status == 503 || status == 507 =>
            {
                let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
                let code = match status {
                    412 => "precondition_failed",
                    503 => "unavailable",
                    507 => "insufficient_storage",
                    413 => "payload_too_large",
                    _ => "bad_request",
                };
                let message = v["message"]
                    .as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| {
                        format!("the key's create leader (node {leader}) answered {status}")
                    });
                Err(ApiError::new(status, code, message))
            }
            Err(e) => Err(unavailable(format!(
                "the key's create leader (node {leader}) did not answer: {e}; the create may or may not have taken effect"
            ))),
        }
    }

    /// [`Node::create`] on the leader itself.
    pub async fn create_as_leader(
        self: &Arc<Self>,
        key: Vec<u8>,
        value: Vec<u8>,
        level: Consistency,
    ) -> Result<Record, ApiError> {
        let view = self.require_serving()?;
        self.check_clock()?;
        if Self::create_leader(&view, &key) != Some(self.me()) {
            return Err(unavailable(format!(
                "node {} is not the create leader of this key in its topology (epoch {}); retry",
                self.me(),
                view.topology.epoch
            )));
        }
        let level = level.max(Consistency::Quorum);
        let stripe = bucket_of(&key) as usize % self.create_locks.len();
        let _serialised = self.create_locks[stripe].lock().await;
        let current = self.read(&key, Some(level)).await?;
        if current.as_ref().is_some_and(|r| r.value.is_some()) {
            return Err(ApiError::new(
                412,
                "precondition_failed",
                "the key already has a value (If-None-Match: *)".into(),
            ));
        }
        if let Some(c) = &current {
            self.hlc.observe(c.version);
        }
        // A topology that changed during the read (a push, or a newer epoch
        // seen on a replica's answer) may name another leader, which can be
        // creating this key at the same time: nothing is written yet, so
        // give up rather than create beside it (a chaos seed caught two
        // leaders acknowledging one key's create at a commit).
        let now = self.cluster.epoch();
        if now != view.topology.epoch {
            return Err(unavailable(format!(
                "the topology changed during this create (epoch {} -> {now}); nothing was written, retry",
                view.topology.epoch
            )));
        }
        // Two steps on the owners, not a plain write: a leader on another
        // epoch may be creating the key too, and only replicas that refuse
        // the second of two creates make that safe (see CreateVote).
        let record = Record {
            key,
            value: Some(value),
            version: self.hlc.now(),
        };
        self.create_step(&view, CreatePhase::Promise, &record, level)
            .await?;
        self.create_step(&view, CreatePhase::Accept, &record, level)
            .await?;
        Ok(record)
    }

    /// Waits (briefly) for this node to install a topology newer than
    /// `epoch`: an owner that refused a write as stale answered with its
    /// epoch, which makes this node fetch it (`follow_epochs`).
    async fn newer_view(&self, epoch: u64) -> Result<Arc<View>, ApiError> {
        let mut changed = self.cluster.subscribe();
        let wait = async {
            while self.cluster.epoch() <= epoch {
                if changed.changed().await.is_err() {
                    break;
                }
            }
        };
        let _ = tokio::time::timeout(NEWER_TOPOLOGY_WAIT, wait).await;
        if self.cluster.epoch() <= epoch {
            return Err(unavailable(format!(
                "an owner holds a newer topology than this node's (epoch {epoch}) and it did not arrive within {NEWER_TOPOLOGY_WAIT:?}; the write is not reported as written and may or may not become visible"
            )));
        }
        self.require_serving()
    }

    /// Runs one step of a create on the key's write owners and waits for the
    /// quorums a write needs (committed placement, and pending one while a
    /// rebalance runs). An accept also leaves hints for owners that did not
    /// answer, as a write does; a promise has nothing to hand off.
    async fn create_step(
        self: &Arc<Self>,
        view: &Arc<View>,
        phase: CreatePhase,
        record: &Record,
        level: Consistency,
    ) -> Result<(), ApiError> {
        let plan = WritePlan::new(view, &record.key, level)?;
        let (tx, mut rx) = mpsc::unbounded_channel::<(u32, Result<CreateAnswer, String>)>();
        let mut hints = Vec::new();
        for o in plan.targets.iter().copied() {
            if !view
                .state_of(o)
                .is_some_and(NodeState::takes_replica_writes)
            {
                if phase == CreatePhase::Accept {
                    hints.push((o, record.clone()));
                }
                continue;
            }
            let (node, tx, rec, view) = (self.clone(), tx.clone(), record.clone(), view.clone());
            tokio::spawn(async move {
                let r = node.create_step_on(&view, o, phase, &rec).await;
                if r.is_err()
                    && phase == CreatePhase::Accept
                    && o != node.me()
                    && let Err(e) = node.store.add_hints(vec![(o, rec)]).await
                {
                    tracing::warn!(node = o, error = %e, "cannot store a hint");
                }
                let _ = tx.send((o, r));
            });
        }
        drop(tx);
        if !hints.is_empty()
            && let Err(e) = self.store.add_hints(hints).await
        {
            tracing::warn!(error = %e, "cannot store hints");
        }
        let (mut acked_cur, mut acked_pend) = (0usize, 0usize);
        let mut refusals = Vec::new();
        while !plan.done(acked_cur, acked_pend) {
            match rx.recv().await {
                Some((o, Ok(answer))) if answer.vote.granted() => {
                    let (c, p) = plan.counts(view, o, answer.catching_up);
                    acked_cur += usize::from(c);
                    acked_pend += usize::from(p);
                }
                Some((o, Ok(answer))) => {
                    if let Some(v) = answer.vote.seen() {
                        self.hlc.observe(v);
                    }
                    refusals.push(format!("node {o}: {}", answer.vote));
                }
                Some((o, Err(e))) => refusals.push(format!("node {o}: {e}")),
                None => break,
            }
        }
        if plan.done(acked_cur, acked_pend) {
            return Ok(());
        }
        self.metrics.create_conflicts.inc();
        let effect = match phase {
            CreatePhase::Promise => "nothing was written; retry",
            CreatePhase::Accept => {
                "it is not reported as written and may or may not become visible"
            }
        };
        Err(unavailable(format!(
            "create-only write: the {} step was granted by {} ({}); {effect}",
            phase.route(),
            plan.shortfall(acked_cur, acked_pend),
            refusals.join("; ")
        )))
    }

    async fn create_step_on(
        &self,
        view: &View,
        ordinal: u32,
        phase: CreatePhase,
        record: &Record,
    ) -> Result<CreateAnswer, String> {
        if ordinal == self.me() {
            let vote = match phase {
                CreatePhase::Promise => {
                    self.store.promise(record.key.clone(), record.version).await
                }
                CreatePhase::Accept => self.store.accept(record.clone()).await,
            }
            .map_err(|e| e.to_string())?;
            if self.cluster.epoch() > view.topology.epoch {
                return Err(format!(
                    "{}: this node moved to topology epoch {} during the create",
                    crate::peer_api::STALE_EPOCH,
                    self.cluster.epoch()
                ));
            }
            return Ok(CreateAnswer {
                catching_up: self.store.catching_up(),
                vote,
            });
        }
        let addr = peer_address(view, ordinal).map_err(|e| e.to_string())?;
        self.peers
            .create_step(ordinal, &addr, phase, record)
            .await
            .map_err(|e| e.to_string())
    }

    async fn write_replica(
        &self,
        view: &View,
        ordinal: u32,
        record: Record,
    ) -> Result<ApplyReply, WriteFailure> {
        if ordinal == self.me() {
            return match self.store.apply(vec![record]).await {
                // Our own copy is fenced as a peer's is (peer_api's
                // fence_stale_writer): checked after the write, so a pull for
                // the newer topology, served only once we hold it, either saw
                // the write or this copy does not count.
                Ok(_) if self.cluster.epoch() > view.topology.epoch => {
                    Err(WriteFailure::Stale(format!(
                        "this node moved to topology epoch {} during the write",
                        self.cluster.epoch()
                    )))
                }
                Ok(outcomes) => match outcomes.first() {
                    Some(outcome) => Ok(ApplyReply {
                        outcome: *outcome,
                        catching_up: self.store.catching_up(),
                    }),
                    None => Err(WriteFailure::Other("the store answered nothing".into())),
                },
                Err(StorageError::DiskFull(_)) => Err(WriteFailure::DiskFull),
                Err(e) => Err(WriteFailure::Other(e.to_string())),
            };
        }
        let addr = peer_address(view, ordinal).map_err(|e| WriteFailure::Other(e.to_string()))?;
        let r = self.peers.apply_one(ordinal, &addr, record).await;
        let outcome = if r.is_ok() { "ok" } else { "error" };
        self.metrics
            .replication
            .with_label_values(&["write", outcome])
            .inc();
        r.map_err(|e| match e {
            PeerError::Status(_, 409, body) if body.contains(crate::peer_api::STALE_EPOCH) => {
                WriteFailure::Stale(format!("node {ordinal}: {body}"))
            }
            e => WriteFailure::Other(e.to_string()),
        })
    }

    /// A page of live keys under `prefix`, merged across every serving node so
    /// that each bucket is covered by at least one owner; the newest version
    /// of each key decides whether it is live.
    pub async fn list(
        self: &Arc<Self>,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Listing, ApiError> {
        let view = self.require_serving()?;
        let me_catching_up = self.store.catching_up();
        let serving: Vec<u32> = view
            .topology
            .nodes
            .iter()
            .filter(|n| n.state.serves_client_reads())
            .filter(|n| !(n.ordinal == self.me() && me_catching_up))
            .map(|n| n.ordinal)
            .collect();
        let mut tasks = Vec::new();
        for o in serving {
            let (node, view) = (self.clone(), view.clone());
            let (prefix, after) = (prefix.to_vec(), after.map(<[u8]>::to_vec));
            tasks.push(tokio::spawn(async move {
                let r = if o == node.me() {
                    let store = node.store.clone();
                    tokio::task::spawn_blocking(move || {
                        store.scan(&prefix, after.as_deref(), limit)
                    })
                    .await
                    .map_err(|e| e.to_string())
                    .and_then(|r| r.map_err(|e| e.to_string()))
                } else {
                    match peer_address(&view, o) {
                        Ok(addr) => node
                            .peers
                            .scan(o, &addr, &prefix, after.as_deref(), limit)
                            .await
                            .map_err(|e| e.to_string()),
                        Err(e) => Err(e.to_string()),
                    }
                };
                (o, r)
            }));
        }
        let mut answered = BTreeSet::new();
        let mut merged: BTreeMap<Vec<u8>, Record> = BTreeMap::new();
        // Keys up to `bound` are complete: every node that answered a full page
        // may hold more keys after its last one.
        let mut bound: Option<Vec<u8>> = None;
        for t in tasks {
            let Ok((o, r)) = t.await else { continue };
            let Ok(records) = r else { continue };
            answered.insert(o);
            if records.len() >= limit
                && let Some(last) = records.last()
                && bound.as_ref().is_none_or(|b| last.key < *b)
            {
                bound = Some(last.key.clone());
            }
            for r in records {
                match merged.get(&r.key) {
                    Some(have) if have.version >= r.version => {}
                    _ => {
                        merged.insert(r.key.clone(), r);
                    }
                }
            }
        }
        let uncovered = (0..kv_core::BUCKETS)
            .filter(|b| {
                !view
                    .layout
                    .read_owners(*b)
                    .iter()
                    .any(|o| answered.contains(o))
            })
            .count();
        if uncovered > 0 {
            return Err(unavailable(format!(
                "cannot list: {uncovered} buckets have no reachable owner"
            )));
        }
        let mut keys = Vec::new();
        let mut next = None;
        for (k, r) in merged {
            if bound.as_ref().is_some_and(|b| k > *b) {
                break;
            }
            if r.value.is_none() {
                continue;
            }
            keys.push(k);
            if keys.len() == limit {
                break;
            }
        }
        if keys.len() == limit || bound.is_some() {
            next = keys.last().cloned().or(bound);
        }
        Ok(Listing { keys, next })
    }
}

fn newest<'a>(answers: impl Iterator<Item = &'a Option<Record>>) -> Option<Record> {
    answers.flatten().max_by_key(|r| r.version).cloned()
}

pub(crate) fn peer_address(view: &View, ordinal: u32) -> Result<String, PeerError> {
    view.topology
        .node(ordinal)
        .map(|n| n.peer_address.clone())
        .ok_or(PeerError::Unknown(ordinal))
}

/// Most times a write is re-issued because an owner held a newer version.
const MAX_REISSUES: u32 = 8;

/// How long a write refused as stale waits for the newer topology.
const NEWER_TOPOLOGY_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

enum Replicated {
    /// Acknowledged by enough owners.
    Done(Record),
    /// Not acknowledged: an owner holds this newer version.
    Superseded(kv_core::Version),
    /// Not acknowledged: an owner holds a newer topology; plan again on it.
    Stale,
}

enum WriteFailure {
    DiskFull,
    /// The owner (or this node) holds a newer topology than the write was
    /// planned on: it stored the record, but the write must be planned again.
    Stale(String),
    Other(String),
}

impl WriteFailure {
    fn message(&self) -> String {
        match self {
            WriteFailure::DiskFull => "its disk is full".into(),
            WriteFailure::Stale(m) | WriteFailure::Other(m) => m.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    //! The write quorum rules on in-memory topologies: who a write goes to,
    //! which acknowledgements count, and when it is refused before anything
    //! is written.
    use super::*;
    use kv_core::{NodeInfo, PlacementSpec, Strategy, Topology};

    fn view(states: &[NodeState], members: &[u32], pending: Option<&[u32]>) -> View {
        let spec = |m: &[u32]| PlacementSpec {
            strategy: Strategy::Full,
            factor: m.len() as u32,
            members: m.to_vec(),
        };
        View::new(Topology {
            cluster_id: "t".into(),
            epoch: 3,
            read_consistency: Consistency::Quorum,
            write_consistency: Consistency::Quorum,
            placement: spec(members),
            pending: pending.map(spec),
            nodes: states
                .iter()
                .enumerate()
                .map(|(i, s)| NodeInfo {
                    ordinal: i as u32,
                    address: format!("127.0.0.1:{}", 1000 + i),
                    peer_address: format!("127.0.0.1:{}", 2000 + i),
                    state: *s,
                })
                .collect(),
        })
    }

    use NodeState::{Failed, Joining, Up};

    #[test]
    fn a_quorum_write_needs_two_of_three_up_owners_and_is_refused_before_writing_without_them() {
        let v = view(&[Up, Up, Failed], &[0, 1, 2], None);
        let plan = WritePlan::new(&v, b"k", Consistency::Quorum).expect("two of three are Up");
        assert_eq!(plan.targets.iter().copied().collect::<Vec<_>>(), [0, 1, 2]);
        assert!(!plan.done(1, 0));
        assert!(plan.done(2, 0));
        // a Failed owner's acknowledgement never counts (its copy is a hint's)
        assert_eq!(plan.counts(&v, 2, false), (false, false));
        let all = WritePlan::new(&v, b"k", Consistency::All);
        assert_eq!(all.err().map(|e| e.status), Some(503));
        let down = view(&[Up, Failed, Failed], &[0, 1, 2], None);
        let refused = WritePlan::new(&down, b"k", Consistency::Quorum).err();
        assert!(
            refused
                .as_ref()
                .is_some_and(|e| e.status == 503 && e.message.contains("only 1 are Up")),
            "{refused:?}"
        );
        // One needs one owner, whatever the others do
        assert!(WritePlan::new(&down, b"k", Consistency::One).is_ok());
    }

    #[test]
    fn a_catching_up_owner_takes_the_write_but_does_not_count_towards_the_committed_quorum() {
        let v = view(&[Up, Up, Up], &[0, 1, 2], None);
        let plan = WritePlan::new(&v, b"k", Consistency::Quorum).expect("plan");
        assert_eq!(plan.counts(&v, 1, true), (false, false));
        assert_eq!(plan.counts(&v, 1, false), (true, false));
    }

    #[test]
    fn while_a_placement_is_pending_both_quorums_are_needed() {
        // 0,1,2 own the key now; 1,2,3 will (3 is Joining: it takes writes)
        let v = view(&[Up, Up, Up, Joining], &[0, 1, 2], Some(&[1, 2, 3]));
        let plan = WritePlan::new(&v, b"k", Consistency::Quorum).expect("plan");
        assert_eq!(
            plan.targets.iter().copied().collect::<Vec<_>>(),
            [0, 1, 2, 3]
        );
        // 0 and 3 answered: a quorum of neither placement on its own
        let (mut cur, mut pend) = (0, 0);
        for o in [0, 3] {
            let (c, p) = plan.counts(&v, o, false);
            cur += usize::from(c);
            pend += usize::from(p);
        }
        assert_eq!((cur, pend), (1, 1));
        assert!(!plan.done(cur, pend));
        assert!(plan.shortfall(cur, pend).contains("pending placement"));
        // 1 answers too: two of the old owners and two of the new
        let (c, p) = plan.counts(&v, 1, false);
        assert!(plan.done(cur + usize::from(c), pend + usize::from(p)));
        // a Joining owner counts for the new placement even while catching up
        assert_eq!(plan.counts(&v, 3, true), (false, true));
        // too few new owners take writes: refused before writing
        let v = view(&[Up, Up, Up, Failed, Failed], &[0, 1, 2], Some(&[2, 3, 4]));
        let refused = WritePlan::new(&v, b"k", Consistency::Quorum).err();
        assert!(
            refused
                .as_ref()
                .is_some_and(|e| e.status == 503 && e.message.contains("new owners")),
            "{refused:?}"
        );
    }
}
