//! Writes and deletes at level `W`: a version from this node's clock, sent
//! to every write owner, acknowledged once the [`WritePlan`]'s quorums are;
//! owners that are down or fail get a durable hint on this node.

use std::sync::Arc;

use kv_core::{Applied, Consistency, Record, Version};

use super::plan::{Ack, WritePlan, WriteTally};
use super::quorum::{Calls, Fanout};
use super::{CoordError, Coordinator, WriteKind, peer_address};
use crate::cluster::View;
use crate::peer::{ApplyReply, PeerError};
use crate::storage::StorageError;

/// Most times a write is re-issued because an owner held a newer version.
const MAX_REISSUES: u32 = 8;

/// How long a write refused as stale waits for the newer topology.
const NEWER_TOPOLOGY_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

#[derive(Debug, PartialEq)]
pub(super) enum Replicated {
    /// Acknowledged by enough owners.
    Done(Record),
    /// Not acknowledged: an owner holds this newer version.
    Superseded(Version),
    /// Not acknowledged: an owner holds a newer topology; plan again on it.
    Stale,
}

/// Why one owner did not acknowledge a write.
pub(super) enum WriteFailure {
    /// It holds a newer version of the key: the write is re-issued above it.
    Newer(Version),
    DiskFull,
    /// The owner (or this node) holds a newer topology than the write was
    /// planned on: it stored the record, but the write must be planned again.
    Stale(String),
    Other(String),
}

impl WriteFailure {
    fn message(&self) -> String {
        match self {
            WriteFailure::Newer(v) => format!("holds a newer version {v}"),
            WriteFailure::DiskFull => "its disk is full".into(),
            WriteFailure::Stale(m) | WriteFailure::Other(m) => m.clone(),
        }
    }
}

impl Coordinator {
    /// Writes `key` at `level` (cluster default when `None`).
    ///
    /// Per-key monotonic versions: an owner that already holds a newer
    /// version of the key says so instead of acknowledging; the coordinator
    /// moves its clock past that version and re-issues the write. An
    /// acknowledgement therefore means the owner held nothing newer, and
    /// since any two write quorums share an owner, a write that begins after
    /// another was acknowledged (both at Quorum or All) gets the higher
    /// version, whatever the coordinators' clocks say.
    pub async fn write(
        &self,
        key: Vec<u8>,
        kind: WriteKind,
        level: Option<Consistency>,
    ) -> Result<Record, CoordError> {
        let view = self.require_serving()?;
        self.node.check_clock()?;
        let level = level.unwrap_or(view.topology.write_consistency);
        match kind {
            WriteKind::Create(value) => self.create(&view, key, value, level).await,
            WriteKind::Put(value) => self.replicate(&view, key, Some(value), level).await,
            WriteKind::Delete => {
                let current = self.read(&key, None).await?;
                if current.as_ref().is_none_or(|r| r.value.is_none()) {
                    return Err(CoordError::NotFound);
                }
                self.replicate(&view, key, None, level).await
            }
        }
    }

    /// Runs a write on the key's owners, re-issuing it with a higher version
    /// while an owner holds a newer one (a bounded number of times).
    async fn replicate(
        &self,
        view: &Arc<View>,
        key: Vec<u8>,
        value: Option<Vec<u8>>,
        level: Consistency,
    ) -> Result<Record, CoordError> {
        let mut attempt = 0;
        let mut view = view.clone();
        loop {
            let record = Record {
                key: key.clone(),
                value: value.clone(),
                version: self.node.hlc.now(),
            };
            match self.replicate_once(&view, record, level).await? {
                Replicated::Done(r) => return Ok(r),
                Replicated::Stale => {
                    attempt += 1;
                    if attempt >= MAX_REISSUES {
                        return Err(CoordError::Unavailable(
                            "the key's owners kept moving to newer topologies during the write; it is not reported as written and may or may not become visible".into(),
                        ));
                    }
                    view = self.newer_view(view.topology.epoch).await?;
                }
                Replicated::Superseded(newer) => {
                    self.node.hlc.observe(newer);
                    attempt += 1;
                    self.node.metrics.writes_reissued.inc();
                    if attempt >= MAX_REISSUES {
                        return Err(CoordError::Unavailable(format!(
                            "the key's owners kept holding newer versions through {attempt} attempts (concurrent writers); the write is not reported as written and may or may not become visible"
                        )));
                    }
                }
            }
        }
    }

    async fn replicate_once(
        &self,
        view: &Arc<View>,
        record: Record,
        level: Consistency,
    ) -> Result<Replicated, CoordError> {
        let plan = WritePlan::new(view, &record.key, level)?;
        let (live, down) = plan.live_and_down(view);
        let calls = Calls::start(live, Fanout::all(), |o| {
            let (c, view, rec) = (self.clone(), view.clone(), record.clone());
            async move { c.write_replica(&view, o, rec).await }
        });
        // Hints for owners known to be down are stored before the answer
        // (while the calls run), so they outlive a crash of this node right
        // after it.
        let hints = async {
            if !down.is_empty() {
                let n = down.len();
                let hints = down.into_iter().map(|o| (o, record.clone())).collect();
                if let Err(e) = self.node.store.add_hints(hints).await {
                    tracing::warn!(error = %e, count = n, "cannot store hints");
                }
            }
        };
        let mut tally = WriteTally::new(&plan, view);
        let ((), replies) = tokio::join!(hints, calls.until(&mut tally));
        if replies.met {
            return Ok(Replicated::Done(record));
        }
        not_acknowledged(level, &tally, &replies.failed)
    }

    /// Waits (briefly) for this node to install a topology newer than
    /// `epoch`: an owner that refused a write as stale answered with its
    /// epoch, which makes this node fetch it (`follow_epochs`).
    async fn newer_view(&self, epoch: u64) -> Result<Arc<View>, CoordError> {
        let cluster = &self.node.cluster;
        let mut changed = cluster.subscribe();
        let wait = async {
            while cluster.epoch() <= epoch {
                if changed.changed().await.is_err() {
                    break;
                }
            }
        };
        let _ = tokio::time::timeout(NEWER_TOPOLOGY_WAIT, wait).await;
        if cluster.epoch() <= epoch {
            return Err(CoordError::Unavailable(format!(
                "an owner holds a newer topology than this node's (epoch {epoch}) and it did not arrive within {NEWER_TOPOLOGY_WAIT:?}; the write is not reported as written and may or may not become visible"
            )));
        }
        self.require_serving()
    }

    /// One owner's part of a write. An owner that fails (not one that holds
    /// a newer version or topology: it has the write or a newer one) gets a
    /// hint here, in the call itself, which runs to its end even after the
    /// quorum was met (see `quorum`), so one that fails late gets it too.
    async fn write_replica(
        &self,
        view: &View,
        ordinal: u32,
        record: Record,
    ) -> Result<Ack, WriteFailure> {
        let r = self.apply_on(view, ordinal, record.clone()).await;
        if matches!(r, Err(WriteFailure::Other(_) | WriteFailure::DiskFull))
            && ordinal != self.me()
            && let Err(e) = self.node.store.add_hints(vec![(ordinal, record)]).await
        {
            tracing::warn!(node = ordinal, error = %e, "cannot store a hint");
        }
        let reply = r?;
        match reply.outcome {
            Applied::Stored | Applied::Had => Ok(Ack {
                catching_up: reply.catching_up,
            }),
            Applied::Newer(v) => Err(WriteFailure::Newer(v)),
        }
    }

    async fn apply_on(
        &self,
        view: &View,
        ordinal: u32,
        record: Record,
    ) -> Result<ApplyReply, WriteFailure> {
        let node = &self.node;
        if ordinal == self.me() {
            return match node.store.apply(vec![record]).await {
                // Our own copy is fenced as a peer's is (peer_api's
                // fence_stale_writer): checked after the write, so a pull for
                // the newer topology, served only once we hold it, either saw
                // the write or this copy does not count.
                Ok(_) if node.cluster.epoch() > view.topology.epoch => {
                    Err(WriteFailure::Stale(format!(
                        "this node moved to topology epoch {} during the write",
                        node.cluster.epoch()
                    )))
                }
                Ok(outcomes) => match outcomes.first() {
                    Some(outcome) => Ok(ApplyReply {
                        outcome: *outcome,
                        catching_up: node.store.catching_up(),
                    }),
                    None => Err(WriteFailure::Other("the store answered nothing".into())),
                },
                Err(StorageError::DiskFull(_)) => Err(WriteFailure::DiskFull),
                Err(e) => Err(WriteFailure::Other(e.to_string())),
            };
        }
        let addr = peer_address(view, ordinal).map_err(|e| WriteFailure::Other(e.to_string()))?;
        let r = node.peers.apply_one(ordinal, &addr, record).await;
        let outcome = if r.is_ok() { "ok" } else { "error" };
        node.metrics
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
}

/// What a write too few owners acknowledged does next: re-issued above
/// the newest version an owner holds, else planned again on a newer
/// topology, else refused with every owner's failure (a full disk among
/// them makes it a [`CoordError::DiskFull`]).
pub(super) fn not_acknowledged(
    level: Consistency,
    tally: &WriteTally<'_>,
    failed: &[(u32, WriteFailure)],
) -> Result<Replicated, CoordError> {
    let newer = failed
        .iter()
        .filter_map(|(_, f)| match f {
            WriteFailure::Newer(v) => Some(*v),
            _ => None,
        })
        .max();
    if let Some(v) = newer {
        return Ok(Replicated::Superseded(v));
    }
    if failed
        .iter()
        .any(|(_, f)| matches!(f, WriteFailure::Stale(_)))
    {
        return Ok(Replicated::Stale);
    }
    let failures: Vec<String> = failed
        .iter()
        .map(|(o, f)| format!("node {o}: {}", f.message()))
        .collect();
    let msg = format!(
        "write at {level} was acknowledged by {} ({}); it is not reported as written and may or may not become visible",
        tally.shortfall(),
        failures.join("; ")
    );
    if failed
        .iter()
        .any(|(_, f)| matches!(f, WriteFailure::DiskFull))
    {
        Err(CoordError::DiskFull(msg))
    } else {
        Err(CoordError::Unavailable(msg))
    }
}
