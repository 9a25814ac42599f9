//! The checker: a pure function over a recorded history and the final reads
//! taken after heal.
//!
//! A write or delete that was not definitely refused *may have taken
//! effect*; one the store acknowledged *must* have. Replicas resolve
//! conflicts last-writer-wins, so an operation can be overwritten only by
//! one that did not complete before it was invoked. From that:
//!
//! - **phantom value**: a read returned a value no write of that key
//!   (whatever its outcome) carried, or one invoked after the read completed;
//! - **stale read**: a read that began after a write or delete `w` of its key
//!   was acknowledged returned something that cannot be newer than `w`: a
//!   value (or not-found) that only operations completed before `w` was
//!   invoked could have produced (R + W > N, SPEC §2);
//! - **lost write** / **resurrected delete**: the same rule for the final
//!   read of a key at `All` after heal, for an acknowledged write or delete;
//! - **refused write visible**: a read returned the value of a write that
//!   was definitely refused and no other write carried that value;
//! - **no final read**: a key with acknowledged mutations could not be read
//!   at all after heal.
//!
//! Digest divergence (co-owners disagree after heal) is checked by
//! [`crate::run`] with `kvctl verify`'s comparison and reported here too.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use crate::history::{FINAL_CLIENT, Op, OpKind, Outcome};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ViolationKind {
    PhantomValue,
    StaleRead,
    LostWrite,
    ResurrectedDelete,
    RefusedWriteVisible,
    NoFinalRead,
}

impl fmt::Display for ViolationKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ViolationKind::PhantomValue => "phantom value",
            ViolationKind::StaleRead => "stale read",
            ViolationKind::LostWrite => "lost acknowledged write",
            ViolationKind::ResurrectedDelete => "resurrected delete",
            ViolationKind::RefusedWriteVisible => "refused write visible",
            ViolationKind::NoFinalRead => "no final read",
        })
    }
}

/// One broken promise, with the operations that show it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    pub kind: ViolationKind,
    pub key: String,
    /// The read that saw it (op id), if any.
    pub read: Option<usize>,
    /// The acknowledged operation it contradicts (op id), if any.
    pub against: Option<usize>,
    pub message: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} on key {:?}: {}", self.kind, self.key, self.message)
    }
}

/// The checker's verdict.
#[derive(Clone, Debug, Default)]
pub struct Verdict {
    pub violations: Vec<Violation>,
    /// Reads checked (client reads answered + final reads).
    pub reads_checked: usize,
    /// Acknowledged writes and deletes whose key had a final read.
    pub acknowledged_checked: usize,
    /// Keys checked.
    pub keys: usize,
}

impl Verdict {
    pub fn ok(&self) -> bool {
        self.violations.is_empty()
    }

    /// Violations counted by kind.
    pub fn by_kind(&self) -> BTreeMap<ViolationKind, usize> {
        let mut m = BTreeMap::new();
        for v in &self.violations {
            *m.entry(v.kind).or_insert(0) += 1;
        }
        m
    }

    /// Keys with at least one violation.
    pub fn offending_keys(&self) -> BTreeSet<String> {
        self.violations.iter().map(|v| v.key.clone()).collect()
    }
}

/// Checks `history` (client operations) and `finals` (one read per key at
/// `All` after heal; an entry whose outcome is not `Ok` means the key could
/// not be read).
pub fn check(history: &[Op], finals: &[Op]) -> Verdict {
    let mut by_key: BTreeMap<&str, Vec<&Op>> = BTreeMap::new();
    for op in history {
        by_key.entry(op.key.as_str()).or_default().push(op);
    }
    let mut final_by_key: BTreeMap<&str, &Op> = BTreeMap::new();
    for f in finals {
        final_by_key.insert(f.key.as_str(), f);
    }
    let mut verdict = Verdict {
        keys: by_key.len(),
        ..Verdict::default()
    };
    for (key, ops) in &by_key {
        let fin = final_by_key.get(key).copied();
        let acked: Vec<&Op> = ops
            .iter()
            .copied()
            .filter(|o| o.acknowledged_mutation())
            .collect();
        for r in ops.iter().copied().filter(|o| is_answered_read(o)) {
            verdict.reads_checked += 1;
            check_read(r, ops, &acked, false, &mut verdict.violations);
        }
        match fin {
            Some(f) if is_answered_read(f) => {
                verdict.reads_checked += 1;
                verdict.acknowledged_checked += acked.len();
                check_read(f, ops, &acked, true, &mut verdict.violations);
            }
            Some(f) if !acked.is_empty() => verdict.violations.push(Violation {
                kind: ViolationKind::NoFinalRead,
                key: key.to_string(),
                read: Some(f.id),
                against: None,
                message: format!(
                    "{} acknowledged writes/deletes and the final read failed ({})",
                    acked.len(),
                    f.note
                ),
            }),
            None if !acked.is_empty() => verdict.violations.push(Violation {
                kind: ViolationKind::NoFinalRead,
                key: key.to_string(),
                read: None,
                against: None,
                message: format!(
                    "{} acknowledged writes/deletes, never read back",
                    acked.len()
                ),
            }),
            _ => {}
        }
    }
    verdict
}

fn is_answered_read(o: &Op) -> bool {
    o.kind == OpKind::Read && o.outcome == Outcome::Ok
}

/// Could `x` have produced what `r` returned?
fn produces(x: &Op, result: &Option<String>) -> bool {
    match (&x.kind, result) {
        (OpKind::Write(v), Some(seen)) => v == seen,
        (OpKind::Delete, None) => true,
        _ => false,
    }
}

fn check_read(r: &Op, ops: &[&Op], acked: &[&Op], is_final: bool, out: &mut Vec<Violation>) {
    let key = r.key.clone();
    let result = &r.read;
    let r_done = r.complete.unwrap_or(u64::MAX);
    // Every operation of the key that could have produced the result: it
    // carried that value (or deleted) and was invoked before the read ended.
    let all_producers: Vec<&Op> = ops
        .iter()
        .copied()
        .filter(|x| x.is_mutation() && produces(x, result) && x.invoke < r_done)
        .collect();
    if let Some(v) = result {
        if all_producers.is_empty() {
            let later = ops
                .iter()
                .any(|x| matches!(&x.kind, OpKind::Write(w) if w == v));
            out.push(Violation {
                kind: ViolationKind::PhantomValue,
                key,
                read: Some(r.id),
                against: None,
                message: if later {
                    format!(
                        "read #{} returned {v:?}, written only by a write invoked after the read completed",
                        r.id
                    )
                } else {
                    format!("read #{} returned {v:?}, which no write of this key carried", r.id)
                },
            });
            return;
        }
        if all_producers.iter().all(|x| x.outcome == Outcome::Fail) {
            out.push(Violation {
                kind: ViolationKind::RefusedWriteVisible,
                key,
                read: Some(r.id),
                against: all_producers.first().map(|x| x.id),
                message: format!(
                    "read #{} returned {v:?}, carried only by write #{} which was refused ({})",
                    r.id, all_producers[0].id, all_producers[0].note
                ),
            });
            return;
        }
    }
    // Producers that may have taken effect. A not-found result may also be
    // the key's initial state, which precedes every operation.
    let producers: Vec<&Op> = all_producers
        .into_iter()
        .filter(|x| x.outcome != Outcome::Fail)
        .collect();
    for w in acked.iter().copied().filter(|w| w.precedes(r)) {
        // Some producer is w itself or was not over before w began (so LWW
        // may order it after w).
        let explained = producers.iter().any(|p| p.id == w.id || !p.precedes(w));
        if explained {
            continue;
        }
        let kind = match (is_final, &w.kind) {
            (true, OpKind::Delete) => ViolationKind::ResurrectedDelete,
            (true, _) => ViolationKind::LostWrite,
            (false, _) => ViolationKind::StaleRead,
        };
        let seen = match result {
            Some(v) => format!("{v:?}"),
            None => "not found".to_string(),
        };
        let what = match &w.kind {
            OpKind::Write(v) => format!("write #{} of {v:?}", w.id),
            _ => format!("delete #{}", w.id),
        };
        let who = if r.client == FINAL_CLIENT {
            "the final read".to_string()
        } else {
            format!("read #{}", r.id)
        };
        out.push(Violation {
            kind,
            key: key.clone(),
            read: Some(r.id),
            against: Some(w.id),
            message: format!(
                "{who} returned {seen}, but {what} was acknowledged before it began and nothing that could produce {seen} was invoked after {what} began"
            ),
        });
        // One contradiction per read is enough to show it.
        return;
    }
}

/// The operations of one key, in invocation order, with its final read:
/// the minimal history to replay and read a violation.
pub fn history_of<'a>(key: &str, history: &'a [Op], finals: &'a [Op]) -> Vec<&'a Op> {
    let mut ops: Vec<&Op> = history
        .iter()
        .chain(finals.iter())
        .filter(|o| o.key == key)
        .collect();
    ops.sort_by_key(|o| (o.invoke, o.id));
    ops
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny history builder: times in milliseconds.
    struct H {
        ops: Vec<Op>,
        finals: Vec<Op>,
    }

    fn op(
        id: usize,
        client: usize,
        kind: OpKind,
        from: u64,
        to: Option<u64>,
        outcome: Outcome,
    ) -> Op {
        Op {
            id,
            client,
            key: "k".into(),
            kind,
            invoke: from * 1000,
            complete: to.map(|t| t * 1000),
            outcome,
            read: None,
            absent: false,
            target: "gateway".into(),
            note: String::new(),
        }
    }

    impl H {
        fn new() -> H {
            H {
                ops: Vec::new(),
                finals: Vec::new(),
            }
        }
        fn write(mut self, c: usize, v: &str, from: u64, to: Option<u64>, o: Outcome) -> H {
            let id = self.ops.len();
            self.ops
                .push(op(id, c, OpKind::Write(v.into()), from, to, o));
            self
        }
        fn delete(mut self, c: usize, from: u64, to: u64) -> H {
            let id = self.ops.len();
            self.ops
                .push(op(id, c, OpKind::Delete, from, Some(to), Outcome::Ok));
            self
        }
        fn read(mut self, c: usize, from: u64, to: u64, seen: Option<&str>) -> H {
            let id = self.ops.len();
            let mut r = op(id, c, OpKind::Read, from, Some(to), Outcome::Ok);
            r.read = seen.map(String::from);
            self.ops.push(r);
            self
        }
        fn fin(mut self, at: u64, seen: Option<&str>) -> H {
            let mut r = op(
                1000,
                FINAL_CLIENT,
                OpKind::Read,
                at,
                Some(at + 1),
                Outcome::Ok,
            );
            r.read = seen.map(String::from);
            self.finals.push(r);
            self
        }
        fn check(&self) -> Verdict {
            check(&self.ops, &self.finals)
        }
        fn kinds(&self) -> Vec<ViolationKind> {
            self.check().violations.iter().map(|v| v.kind).collect()
        }
    }

    #[test]
    fn a_linearizable_history_with_concurrency_and_unknowns_passes() {
        let h = H::new()
            .write(0, "a", 0, Some(10), Outcome::Ok)
            .read(1, 11, 15, Some("a"))
            // b and c overlap: either may win.
            .write(0, "b", 20, Some(40), Outcome::Ok)
            .write(1, "c", 25, Some(35), Outcome::Ok)
            .read(2, 30, 33, Some("a")) // concurrent with both: a is fine
            .read(2, 41, 45, Some("b"))
            .read(2, 46, 50, Some("c")) // LWW may order c after b
            // A timed-out write may land at any time.
            .write(1, "d", 60, None, Outcome::Unknown)
            .read(0, 70, 72, Some("c"))
            .read(0, 73, 75, Some("d"))
            // A refused write never shows, and does not excuse anything.
            .write(2, "e", 80, Some(81), Outcome::Fail)
            .delete(0, 90, 95)
            .read(1, 96, 99, None)
            .fin(200, None);
        let v = h.check();
        assert!(v.ok(), "{:?}", v.violations);
        assert_eq!(v.reads_checked, 8);
        assert_eq!(v.acknowledged_checked, 4);
    }

    #[test]
    fn an_acknowledged_write_missing_at_the_end_is_a_lost_write() {
        let h = H::new()
            .write(0, "a", 0, Some(10), Outcome::Ok)
            .write(1, "b", 20, Some(30), Outcome::Ok)
            .fin(100, Some("a"));
        assert_eq!(h.kinds(), vec![ViolationKind::LostWrite]);
        let v = h.check();
        assert_eq!(v.violations[0].against, Some(1));
    }

    #[test]
    fn an_acknowledged_write_absent_at_the_end_is_a_lost_write() {
        let h = H::new()
            .write(0, "a", 0, Some(10), Outcome::Ok)
            .fin(100, None);
        assert_eq!(h.kinds(), vec![ViolationKind::LostWrite]);
    }

    #[test]
    fn a_value_nobody_wrote_is_a_phantom() {
        let h = H::new()
            .write(0, "a", 0, Some(10), Outcome::Ok)
            .read(1, 20, 25, Some("zzz"))
            .fin(100, Some("a"));
        assert_eq!(h.kinds(), vec![ViolationKind::PhantomValue]);
    }

    #[test]
    fn a_value_from_the_future_is_a_phantom() {
        let h = H::new()
            .read(1, 0, 5, Some("a"))
            .write(0, "a", 10, Some(20), Outcome::Ok)
            .fin(100, Some("a"));
        assert_eq!(h.kinds(), vec![ViolationKind::PhantomValue]);
    }

    #[test]
    fn a_read_after_an_acknowledged_write_that_returns_an_older_value_is_stale() {
        let h = H::new()
            .write(0, "a", 0, Some(10), Outcome::Ok)
            .write(0, "b", 20, Some(30), Outcome::Ok)
            .read(1, 31, 35, Some("a"))
            .fin(100, Some("b"));
        assert_eq!(h.kinds(), vec![ViolationKind::StaleRead]);
    }

    #[test]
    fn a_read_after_an_acknowledged_write_that_finds_nothing_is_stale() {
        let h = H::new()
            .write(0, "a", 0, Some(10), Outcome::Ok)
            .read(1, 11, 12, None)
            .fin(100, Some("a"));
        assert_eq!(h.kinds(), vec![ViolationKind::StaleRead]);
    }

    #[test]
    fn a_deleted_key_that_comes_back_is_a_resurrected_delete() {
        let h = H::new()
            .write(0, "a", 0, Some(10), Outcome::Ok)
            .delete(1, 20, 30)
            .fin(100, Some("a"));
        assert_eq!(h.kinds(), vec![ViolationKind::ResurrectedDelete]);
    }

    #[test]
    fn a_refused_write_that_becomes_visible_is_reported() {
        let h = H::new()
            .write(0, "a", 0, Some(10), Outcome::Ok)
            .write(1, "b", 20, Some(21), Outcome::Fail)
            .read(2, 30, 31, Some("b"))
            .fin(100, Some("a"));
        assert_eq!(h.kinds(), vec![ViolationKind::RefusedWriteVisible]);
    }

    #[test]
    fn a_key_with_acknowledged_writes_that_cannot_be_read_at_the_end_fails() {
        let mut h = H::new().write(0, "a", 0, Some(10), Outcome::Ok);
        let mut f = op(
            99,
            FINAL_CLIENT,
            OpKind::Read,
            100,
            Some(101),
            Outcome::Unknown,
        );
        f.note = "timeout".into();
        h.finals.push(f);
        assert_eq!(h.kinds(), vec![ViolationKind::NoFinalRead]);
        let h = H::new().write(0, "a", 0, Some(10), Outcome::Ok);
        assert_eq!(h.kinds(), vec![ViolationKind::NoFinalRead]);
    }

    #[test]
    fn the_offending_history_holds_only_the_key_in_order() {
        let mut h = H::new()
            .write(0, "a", 5, Some(10), Outcome::Ok)
            .read(1, 0, 3, None);
        let mut other = op(7, 2, OpKind::Write("x".into()), 1, Some(2), Outcome::Ok);
        other.key = "other".into();
        h.ops.push(other);
        h = h.fin(100, Some("a"));
        let ops = history_of("k", &h.ops, &h.finals);
        let ids: Vec<usize> = ops.iter().map(|o| o.id).collect();
        assert_eq!(ids, vec![1, 0, 1000]);
    }
}
