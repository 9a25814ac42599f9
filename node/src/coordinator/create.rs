//! Create-only writes, linearizable per key: they run on the key's create
//! leader, under a per-key lock, as a quorum read and two steps on the
//! owners (promise, then accept; `kv_core::CreateVote`).

use std::sync::Arc;

use kv_core::wire::CreateAnswer;
use kv_core::{Consistency, NodeState, Record, bucket_of};

use super::plan::{Ack, WritePlan, WriteTally};
use super::quorum::{Calls, Fanout};
use super::{CoordError, Coordinator, peer_address};
use crate::cluster::View;
use crate::peer::{CreatePhase, PeerError};

/// The node that serialises create-only writes of `key`: the first of its
/// owners (committed placement) that counts in quorum. Every node holding
/// the same topology names the same one.
fn create_leader(view: &View, key: &[u8]) -> Option<u32> {
    view.layout
        .current
        .owners(bucket_of(key))
        .iter()
        .copied()
        .find(|o| view.state_of(*o).is_some_and(NodeState::counts_in_quorum))
}

impl Coordinator {
    /// A create-only write, linearizable per key: it runs on the key's create
    /// leader, which holds a per-key lock across a quorum read and the write,
    /// so of concurrent creators exactly one finds the key absent. Creates
    /// read and write at Quorum at least, so each sees every create
    /// acknowledged before it, even one whose leader has changed since.
    pub(super) async fn create(
        &self,
        view: &Arc<View>,
        key: Vec<u8>,
        value: Vec<u8>,
        level: Consistency,
    ) -> Result<Record, CoordError> {
        let Some(leader) = create_leader(view, &key) else {
            return Err(CoordError::Unavailable(
                "a create-only write needs one of the key's owners Up".into(),
            ));
        };
        if leader == self.me() {
            return self.create_as_leader(key, value, level).await;
        }
        let addr =
            peer_address(view, leader).map_err(|e| CoordError::Unavailable(e.to_string()))?;
        let record = Record {
            key,
            value: Some(value),
            version: kv_core::Version::ZERO,
        };
        match self.node.peers.create(leader, &addr, &record, level).await {
            Ok(r) => Ok(r),
            Err(PeerError::Status(_, status, body))
                if status < 500 || status == 503 || status == 507 =>
            {
                let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
                let message = v["message"]
                    .as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| {
                        format!("the key's create leader (node {leader}) answered {status}")
                    });
                Err(match status {
                    412 => CoordError::Exists(message),
                    503 => CoordError::Unavailable(message),
                    507 => CoordError::DiskFull(message),
                    status => CoordError::LeaderRefused { status, message },
                })
            }
            Err(e) => Err(CoordError::Unavailable(format!(
                "the key's create leader (node {leader}) did not answer: {e}; the create may or may not have taken effect"
            ))),
        }
    }

    /// [`Coordinator::create`] on the leader itself.
    pub async fn create_as_leader(
        &self,
        key: Vec<u8>,
        value: Vec<u8>,
        level: Consistency,
    ) -> Result<Record, CoordError> {
        let view = self.require_serving()?;
        self.node.check_clock()?;
        if create_leader(&view, &key) != Some(self.me()) {
            return Err(CoordError::Unavailable(format!(
                "node {} is not the create leader of this key in its topology (epoch {}); retry",
                self.me(),
                view.topology.epoch
            )));
        }
        let level = level.max(Consistency::Quorum);
        let locks = &self.node.create_locks;
        let _serialised = locks[bucket_of(&key) as usize % locks.len()].lock().await;
        let current = self.read(&key, Some(level)).await?;
        if current.as_ref().is_some_and(|r| r.value.is_some()) {
            return Err(CoordError::Exists(
                "the key already has a value (If-None-Match: *)".into(),
            ));
        }
        if let Some(c) = &current {
            self.node.hlc.observe(c.version);
        }
        // A topology that changed during the read (a push, or a newer epoch
        // seen on a replica's answer) may name another leader, which can be
        // creating this key at the same time: nothing is written yet, so
        // give up rather than create beside it (a chaos seed caught two
        // leaders acknowledging one key's create at a commit).
        let now = self.node.cluster.epoch();
        if now != view.topology.epoch {
            return Err(CoordError::Unavailable(format!(
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
            version: self.node.hlc.now(),
        };
        self.create_step(&view, CreatePhase::Promise, &record, level)
            .await?;
        self.create_step(&view, CreatePhase::Accept, &record, level)
            .await?;
        Ok(record)
    }

    /// Runs one step of a create on the key's write owners and waits for the
    /// quorums a write needs (committed placement, and pending one while a
    /// rebalance runs). An accept also leaves hints for owners that did not
    /// answer, as a write does; a promise has nothing to hand off.
    async fn create_step(
        &self,
        view: &Arc<View>,
        phase: CreatePhase,
        record: &Record,
        level: Consistency,
    ) -> Result<(), CoordError> {
        let plan = WritePlan::new(view, &record.key, level)?;
        let (live, down) = plan.live_and_down(view);
        let calls = Calls::start(live, Fanout::all(), |o| {
            let (c, view, rec) = (self.clone(), view.clone(), record.clone());
            async move { c.create_vote(&view, o, phase, rec).await }
        });
        let hints = async {
            if phase == CreatePhase::Accept && !down.is_empty() {
                let hints = down.into_iter().map(|o| (o, record.clone())).collect();
                if let Err(e) = self.node.store.add_hints(hints).await {
                    tracing::warn!(error = %e, "cannot store hints");
                }
            }
        };
        let mut tally = WriteTally::new(&plan, view);
        let ((), replies) = tokio::join!(hints, calls.until(&mut tally));
        if replies.met {
            return Ok(());
        }
        self.node.metrics.create_conflicts.inc();
        let effect = match phase {
            CreatePhase::Promise => "nothing was written; retry",
            CreatePhase::Accept => {
                "it is not reported as written and may or may not become visible"
            }
        };
        let refusals: Vec<String> = replies
            .failed
            .iter()
            .map(|(o, e)| format!("node {o}: {e}"))
            .collect();
        Err(CoordError::Unavailable(format!(
            "create-only write: the {} step was granted by {} ({}); {effect}",
            phase.route(),
            tally.shortfall(),
            refusals.join("; ")
        )))
    }

    /// One owner's vote on a create step: granted, or why not. A refusal
    /// moves this node's clock past the version the owner has seen; an
    /// owner that fails an accept gets a hint (in the call itself, which
    /// runs to its end, so also after the quorum was met).
    async fn create_vote(
        &self,
        view: &View,
        ordinal: u32,
        phase: CreatePhase,
        record: Record,
    ) -> Result<Ack, String> {
        let r = self.create_step_on(view, ordinal, phase, &record).await;
        if r.is_err()
            && phase == CreatePhase::Accept
            && ordinal != self.me()
            && let Err(e) = self.node.store.add_hints(vec![(ordinal, record)]).await
        {
            tracing::warn!(node = ordinal, error = %e, "cannot store a hint");
        }
        let answer = r?;
        if answer.vote.granted() {
            return Ok(Ack {
                catching_up: answer.catching_up,
            });
        }
        if let Some(v) = answer.vote.seen() {
            self.node.hlc.observe(v);
        }
        Err(answer.vote.to_string())
    }

    async fn create_step_on(
        &self,
        view: &View,
        ordinal: u32,
        phase: CreatePhase,
        record: &Record,
    ) -> Result<CreateAnswer, String> {
        let node = &self.node;
        if ordinal == self.me() {
            let vote = match phase {
                CreatePhase::Promise => {
                    node.store.promise(record.key.clone(), record.version).await
                }
                CreatePhase::Accept => node.store.accept(record.clone()).await,
            }
            .map_err(|e| e.to_string())?;
            if node.cluster.epoch() > view.topology.epoch {
                return Err(format!(
                    "{}: this node moved to topology epoch {} during the create",
                    crate::peer_api::STALE_EPOCH,
                    node.cluster.epoch()
                ));
            }
            return Ok(CreateAnswer {
                catching_up: node.store.catching_up(),
                vote,
            });
        }
        let addr = peer_address(view, ordinal).map_err(|e| e.to_string())?;
        node.peers
            .create_step(ordinal, &addr, phase, record)
            .await
            .map_err(|e| e.to_string())
    }
}
