//! What the clients did: one [`Op`] per request, with its invocation and
//! completion times on one monotonic clock (microseconds since the run
//! started) and what came of it.

use std::fmt;
use std::sync::Mutex;
use std::time::Instant;

/// The request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OpKind {
    /// `PUT` of a value unique to this write.
    Write(String),
    /// A create-only write of a value unique to it: `PUT` with
    /// `If-None-Match: *`, or (`classic`) the original store's `POST /write`.
    /// It succeeds only if the key has no value.
    Create {
        value: String,
        classic: bool,
    },
    Read,
    Delete,
}

impl OpKind {
    /// The value a write or create carries.
    pub fn value(&self) -> Option<&str> {
        match self {
            OpKind::Write(v) | OpKind::Create { value: v, .. } => Some(v),
            OpKind::Read | OpKind::Delete => None,
        }
    }
}

/// What came of a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Outcome {
    /// Acknowledged (a write or delete took effect; a read answered).
    Ok,
    /// Definitely did not happen: the connection was refused, the node said
    /// it does not serve clients, or the request was rejected (4xx).
    Fail,
    /// May or may not have happened: a timeout, a cut connection, or a 5xx
    /// after the coordinator started (a 503 "unavailable" write may still be
    /// on fewer than W owners and spread from there).
    Unknown,
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Outcome::Ok => "ok",
            Outcome::Fail => "fail",
            Outcome::Unknown => "unknown",
        })
    }
}

/// One operation of the history.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Op {
    pub id: usize,
    /// The client that issued it ([`FINAL_CLIENT`] for the final reads).
    pub client: usize,
    pub key: String,
    pub kind: OpKind,
    /// Microseconds since the run started.
    pub invoke: u64,
    /// `None` when the outcome is unknown: it may take effect at any time.
    pub complete: Option<u64>,
    pub outcome: Outcome,
    /// An acknowledged read: the value, or `None` for not found.
    pub read: Option<String>,
    /// An acknowledged delete answered 404: there was nothing to delete.
    pub absent: bool,
    /// A create refused because the key had a value (412, or 409 on the
    /// classic route): nothing was written (the outcome is `Fail`).
    pub exists: bool,
    /// Where it was sent (`gateway` or `node N`).
    pub target: String,
    /// The error, for failed and unknown operations.
    pub note: String,
}

/// The client id of the final reads after heal.
pub const FINAL_CLIENT: usize = usize::MAX;

impl Op {
    pub fn is_mutation(&self) -> bool {
        !matches!(self.kind, OpKind::Read)
    }

    /// A write or delete the store acknowledged (a delete that found nothing
    /// changed nothing and is not counted).
    pub fn acknowledged_mutation(&self) -> bool {
        self.outcome == Outcome::Ok && self.is_mutation() && !self.absent
    }

    /// A create the store acknowledged.
    pub fn acknowledged_create(&self) -> bool {
        self.outcome == Outcome::Ok && matches!(self.kind, OpKind::Create { .. })
    }

    /// Did this operation complete before `other` was invoked?
    pub fn precedes(&self, other: &Op) -> bool {
        self.complete.is_some_and(|c| c < other.invoke)
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let who = if self.client == FINAL_CLIENT {
            "final".to_string()
        } else {
            format!("c{}", self.client)
        };
        let what = match &self.kind {
            OpKind::Write(v) => format!("write {v:?}"),
            OpKind::Create {
                value,
                classic: false,
            } => format!("create {value:?}"),
            OpKind::Create {
                value,
                classic: true,
            } => format!("create (POST /write) {value:?}"),
            OpKind::Read => "read".to_string(),
            OpKind::Delete => "delete".to_string(),
        };
        let done = self
            .complete
            .map_or("?".to_string(), |c| format!("{:.3}", c as f64 / 1e6));
        write!(
            f,
            "#{:<6} {who:>5} {:>9.3}s..{done:>9}s {:<7} {:<20} {what}",
            self.id,
            self.invoke as f64 / 1e6,
            self.outcome.to_string(),
            self.key,
        )?;
        if self.outcome == Outcome::Ok {
            match (&self.kind, &self.read) {
                (OpKind::Read, Some(v)) => write!(f, " -> {v:?}")?,
                (OpKind::Read, None) => write!(f, " -> not found")?,
                (OpKind::Delete, _) if self.absent => write!(f, " -> not found")?,
                _ => {}
            }
        }
        if self.exists {
            write!(f, " -> exists")?;
        }
        write!(f, " via {}", self.target)?;
        if !self.note.is_empty() {
            write!(f, " ({})", self.note)?;
        }
        Ok(())
    }
}

/// The shared recorder: a clock and the operations, appended as they
/// complete (ids in invocation order per client, unique overall).
pub struct Recorder {
    start: Instant,
    ops: Mutex<Vec<Op>>,
    next_id: std::sync::atomic::AtomicUsize,
}

impl Recorder {
    pub fn new() -> Recorder {
        Recorder {
            start: Instant::now(),
            ops: Mutex::new(Vec::new()),
            next_id: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    /// Microseconds since the run started.
    pub fn now(&self) -> u64 {
        self.start.elapsed().as_micros() as u64
    }

    pub fn start(&self) -> Instant {
        self.start
    }

    pub fn next_id(&self) -> usize {
        self.next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }

    pub fn record(&self, op: Op) {
        self.ops.lock().unwrap_or_else(|p| p.into_inner()).push(op);
    }

    /// Every operation recorded, sorted by invocation.
    pub fn ops(&self) -> Vec<Op> {
        let mut ops = self.ops.lock().unwrap_or_else(|p| p.into_inner()).clone();
        ops.sort_by_key(|o| (o.invoke, o.id));
        ops
    }
}

impl Default for Recorder {
    fn default() -> Self {
        Recorder::new()
    }
}
