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
//! Creates (create-only writes) are writes to every rule above: an
//! acknowledged create must be seen as an acknowledged write must, and a
//! create answered "exists" wrote nothing. A create succeeds only on an
//! absent key, so besides:
//!
//! - **double create**: two creates of a key were both acknowledged and no
//!   delete that may have taken effect can be ordered between them, in
//!   either order: at most one acknowledged create per key per absence;
//! - **create over a value**: a create was acknowledged although an
//!   acknowledged write of the key was over before it began and no delete
//!   that may have taken effect can be ordered between them;
//! - **create refused on an absent key**: a create was answered "exists"
//!   although nothing that could have given the key a value was invoked
//!   before it completed (since the last acknowledged delete over before it
//!   began, if any).
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
    DoubleCreate,
    CreateOverValue,
    CreateRefusedOnAbsentKey,
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
            ViolationKind::DoubleCreate => "double create",
            ViolationKind::CreateOverValue => "create over a value",
            ViolationKind::CreateRefusedOnAbsentKey => "create refused on an absent key",
        })
    }
}

/// One broken promise, with the operations that show it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    pub kind: ViolationKind,
    pub key: String,
    /// The operation that shows it (op id): the read that saw it, or the
    /// create that should not have succeeded (or failed).
    pub witness: Option<usize>,
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
    /// Creates checked against the create rules: acknowledged, or refused
    /// because the key had a value.
    pub creates_checked: usize,
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
        verdict.creates_checked += check_creates(ops, &mut verdict.violations);
        match fin {
            Some(f) if is_answered_read(f) => {
                verdict.reads_checked += 1;
                verdict.acknowledged_checked += acked.len();
                check_read(f, ops, &acked, true, &mut verdict.violations);
            }
            Some(f) if !acked.is_empty() => verdict.violations.push(Violation {
                kind: ViolationKind::NoFinalRead,
                key: key.to_string(),
                witness: Some(f.id),
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
                witness: None,
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
        (OpKind::Write(_) | OpKind::Create { .. }, Some(seen)) => x.kind.value() == Some(seen),
        (OpKind::Delete, None) => true,
        _ => false,
    }
}

/// How an operation is named in a violation's message.
fn describe(x: &Op) -> String {
    match &x.kind {
        OpKind::Write(v) => format!("write #{} of {v:?}", x.id),
        OpKind::Create { value, .. } => format!("create #{} of {value:?}", x.id),
        OpKind::Read => format!("read #{}", x.id),
        OpKind::Delete => format!("delete #{}", x.id),
    }
}

/// The deletes of one key that may have taken effect (acknowledged and not
/// a 404, or unknown), sorted by invocation, with the running maximum of
/// their completion times (an unknown one never completes).
struct Deletes {
    invoked: Vec<u64>,
    latest_done: Vec<u64>,
}

impl Deletes {
    fn of(ops: &[&Op]) -> Deletes {
        let mut ds: Vec<(u64, u64)> = ops
            .iter()
            .filter(|o| o.kind == OpKind::Delete && o.outcome != Outcome::Fail && !o.absent)
            .map(|o| (o.invoke, o.complete.unwrap_or(u64::MAX)))
            .collect();
        ds.sort();
        let mut latest = 0;
        Deletes {
            invoked: ds.iter().map(|d| d.0).collect(),
            latest_done: ds
                .iter()
                .map(|d| {
                    latest = latest.max(d.1);
                    latest
                })
                .collect(),
        }
    }

    /// Can some delete be ordered after `a` and before `b`? One that did
    /// not complete before `a` was invoked, invoked before `b` completed.
    fn between(&self, a: &Op, b: &Op) -> bool {
        let until = b.complete.unwrap_or(u64::MAX);
        let n = self.invoked.partition_point(|&t| t <= until);
        n > 0 && self.latest_done[n - 1] >= a.invoke
    }
}

/// The create rules over one key's operations; returns the creates checked.
fn check_creates(ops: &[&Op], out: &mut Vec<Violation>) -> usize {
    let deletes = Deletes::of(ops);
    let created: Vec<&Op> = ops
        .iter()
        .copied()
        .filter(|o| o.acknowledged_create())
        .collect();
    let refused: Vec<&Op> = ops
        .iter()
        .copied()
        .filter(|o| matches!(o.kind, OpKind::Create { .. }) && o.exists)
        .collect();
    let violation = |kind, b: &Op, a: Option<&Op>, message| Violation {
        kind,
        key: b.key.clone(),
        witness: Some(b.id),
        against: a.map(|a| a.id),
        message,
    };
    // Two acknowledged creates need an absence between them.
    for (j, b) in created.iter().copied().enumerate() {
        let first = created[..j].iter().copied().find(|a| {
            let a_then_b = !b.precedes(a) && deletes.between(a, b);
            let b_then_a = !a.precedes(b) && deletes.between(b, a);
            !a_then_b && !b_then_a
        });
        if let Some(a) = first {
            out.push(violation(
                ViolationKind::DoubleCreate,
                b,
                Some(a),
                format!(
                    "{} and {} were both acknowledged, and no delete that may have taken effect can be ordered between them",
                    describe(a),
                    describe(b)
                ),
            ));
        }
    }
    // An acknowledged write over before a create began needs an absence
    // between them; the latest such write is the hardest to excuse.
    for c in created.iter().copied() {
        let w = ops
            .iter()
            .copied()
            .filter(|w| matches!(w.kind, OpKind::Write(_)) && w.outcome == Outcome::Ok)
            .filter(|w| w.precedes(c))
            .max_by_key(|w| w.invoke);
        if let Some(w) = w
            && !deletes.between(w, c)
        {
            out.push(violation(
                ViolationKind::CreateOverValue,
                c,
                Some(w),
                format!(
                    "{} was acknowledged, but {} was acknowledged before it began and no delete that may have taken effect can be ordered between them",
                    describe(c),
                    describe(w)
                ),
            ));
        }
    }
    // A create answered "exists" needs something that may have given the
    // key a value, invoked before the create completed and not over before
    // the latest acknowledged delete that was over before the create began.
    for c in refused.iter().copied() {
        let d = ops
            .iter()
            .copied()
            .filter(|d| d.acknowledged_mutation() && d.kind == OpKind::Delete)
            .filter(|d| d.precedes(c))
            .max_by_key(|d| d.invoke);
        let explained = ops.iter().copied().any(|s| {
            s.kind.value().is_some()
                && s.outcome != Outcome::Fail
                && !c.precedes(s)
                && d.is_none_or(|d| !s.precedes(d))
        });
        if !explained {
            let since = match d {
                Some(d) => format!(" since {} was acknowledged before it began", describe(d)),
                None => String::new(),
            };
            out.push(violation(
                ViolationKind::CreateRefusedOnAbsentKey,
                c,
                d,
                format!(
                    "{} was answered \"exists\" ({}), but nothing that may have given the key a value was invoked{since} before it completed",
                    describe(c),
                    c.note
                ),
            ));
        }
    }
    created.len() + refused.len()
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
            let later = ops.iter().any(|x| x.kind.value() == Some(v.as_str()));
            out.push(Violation {
                kind: ViolationKind::PhantomValue,
                key,
                witness: Some(r.id),
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
                witness: Some(r.id),
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
        let what = describe(w);
        let who = if r.client == FINAL_CLIENT {
            "the final read".to_string()
        } else {
            format!("read #{}", r.id)
        };
        out.push(Violation {
            kind,
            key: key.clone(),
            witness: Some(r.id),
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
            exists: false,
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
        /// A create through the v1 API; `exists` = answered 412.
        fn create(mut self, c: usize, v: &str, from: u64, to: Option<u64>, o: Outcome) -> H {
            let id = self.ops.len();
            let kind = OpKind::Create {
                value: v.into(),
                classic: false,
            };
            self.ops.push(op(id, c, kind, from, to, o));
            self
        }
        fn exists(mut self, c: usize, v: &str, from: u64, to: u64) -> H {
            self = self.create(c, v, from, Some(to), Outcome::Fail);
            if let Some(last) = self.ops.last_mut() {
                last.exists = true;
                last.note = "412".into();
            }
            self
        }
        fn unknown_delete(mut self, c: usize, from: u64) -> H {
            let id = self.ops.len();
            self.ops
                .push(op(id, c, OpKind::Delete, from, None, Outcome::Unknown));
            self
        }
        fn absent_delete(mut self, c: usize, from: u64, to: u64) -> H {
            self = self.delete(c, from, to);
            if let Some(last) = self.ops.last_mut() {
                last.absent = true;
            }
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
    fn two_acknowledged_creates_with_no_delete_between_are_a_double_create() {
        let h = H::new()
            .create(0, "a", 0, Some(10), Outcome::Ok)
            .create(1, "b", 20, Some(30), Outcome::Ok)
            .fin(100, Some("b"));
        assert_eq!(h.kinds(), vec![ViolationKind::DoubleCreate]);
        let v = h.check();
        assert_eq!(
            (v.violations[0].witness, v.violations[0].against),
            (Some(1), Some(0))
        );
        assert_eq!(v.creates_checked, 2);
    }

    #[test]
    fn concurrent_creates_that_both_succeed_are_a_double_create() {
        let h = H::new()
            .create(0, "a", 0, Some(10), Outcome::Ok)
            .create(1, "b", 1, Some(9), Outcome::Ok)
            .create(2, "c", 2, Some(8), Outcome::Ok)
            .fin(100, Some("a"));
        assert_eq!(
            h.kinds(),
            vec![ViolationKind::DoubleCreate, ViolationKind::DoubleCreate]
        );
    }

    #[test]
    fn create_delete_create_passes() {
        let h = H::new()
            .create(0, "a", 0, Some(10), Outcome::Ok)
            .read(2, 11, 12, Some("a"))
            .delete(1, 20, 30)
            .create(2, "b", 40, Some(50), Outcome::Ok)
            .exists(0, "c", 60, 70)
            .fin(100, Some("b"));
        let v = h.check();
        assert!(v.ok(), "{:?}", v.violations);
        assert_eq!(v.creates_checked, 3);
    }

    #[test]
    fn a_delete_concurrent_with_both_creates_may_come_between_them() {
        let h = H::new()
            .create(0, "a", 0, Some(10), Outcome::Ok)
            .delete(1, 5, 25)
            .create(2, "b", 20, Some(30), Outcome::Ok)
            .fin(100, Some("b"));
        assert!(h.check().ok(), "{:?}", h.check().violations);
        // The delete may also come between them in the other order.
        let h = H::new()
            .create(0, "a", 0, Some(30), Outcome::Ok)
            .create(2, "b", 1, Some(5), Outcome::Ok)
            .delete(1, 10, 20)
            .fin(100, Some("a"));
        assert!(h.check().ok(), "{:?}", h.check().violations);
    }

    #[test]
    fn an_unknown_delete_may_have_come_between_two_creates() {
        let h = H::new()
            .create(0, "a", 0, Some(10), Outcome::Ok)
            .unknown_delete(1, 12)
            .create(2, "b", 20, Some(30), Outcome::Ok)
            .fin(100, Some("b"));
        assert!(h.check().ok(), "{:?}", h.check().violations);
    }

    #[test]
    fn a_delete_that_found_nothing_or_ended_too_early_does_not_excuse_a_double_create() {
        let h = H::new()
            .delete(1, 0, 2)
            .create(0, "a", 5, Some(10), Outcome::Ok)
            .absent_delete(1, 12, 14)
            .create(2, "b", 20, Some(30), Outcome::Ok)
            .fin(100, Some("b"));
        assert_eq!(h.kinds(), vec![ViolationKind::DoubleCreate]);
    }

    #[test]
    fn a_create_that_timed_out_and_one_that_succeeded_pass() {
        let h = H::new()
            .create(0, "a", 0, None, Outcome::Unknown)
            .create(1, "b", 1, Some(10), Outcome::Ok)
            .create(2, "c", 2, Some(3), Outcome::Fail)
            .fin(100, Some("b"));
        assert!(h.check().ok(), "{:?}", h.check().violations);
    }

    #[test]
    fn a_create_acknowledged_after_an_acknowledged_write_is_a_create_over_a_value() {
        let h = H::new()
            .write(0, "a", 0, Some(10), Outcome::Ok)
            .create(1, "b", 20, Some(30), Outcome::Ok)
            .fin(100, Some("b"));
        assert_eq!(h.kinds(), vec![ViolationKind::CreateOverValue]);
        // A write concurrent with the create may be ordered after it.
        let h = H::new()
            .write(0, "a", 0, Some(25), Outcome::Ok)
            .create(1, "b", 20, Some(30), Outcome::Ok)
            .fin(100, Some("b"));
        assert!(h.check().ok(), "{:?}", h.check().violations);
    }

    #[test]
    fn a_create_refused_on_a_key_nothing_wrote_is_reported() {
        let h = H::new().exists(0, "a", 0, 10);
        assert_eq!(h.kinds(), vec![ViolationKind::CreateRefusedOnAbsentKey]);
        let h = H::new()
            .write(0, "a", 0, Some(10), Outcome::Ok)
            .delete(1, 20, 30)
            .exists(2, "b", 40, 50)
            .fin(100, None);
        assert_eq!(h.kinds(), vec![ViolationKind::CreateRefusedOnAbsentKey]);
        // A write that may have landed after the delete explains it.
        let h = H::new()
            .write(0, "a", 0, Some(10), Outcome::Ok)
            .write(0, "x", 15, None, Outcome::Unknown)
            .delete(1, 20, 30)
            .exists(2, "b", 40, 50)
            .fin(100, Some("x"));
        assert!(h.check().ok(), "{:?}", h.check().violations);
    }

    #[test]
    fn an_acknowledged_create_counts_as_a_write_for_reads() {
        let h = H::new()
            .create(0, "a", 0, Some(10), Outcome::Ok)
            .read(1, 11, 12, None)
            .fin(100, Some("a"));
        assert_eq!(h.kinds(), vec![ViolationKind::StaleRead]);
        let h = H::new()
            .create(0, "a", 0, Some(10), Outcome::Ok)
            .fin(100, None);
        assert_eq!(h.kinds(), vec![ViolationKind::LostWrite]);
        // An older value after an acknowledged create is stale too.
        let h = H::new()
            .write(0, "a", 0, Some(10), Outcome::Ok)
            .delete(1, 20, 30)
            .create(2, "b", 40, Some(50), Outcome::Ok)
            .read(1, 60, 70, Some("a"))
            .fin(100, Some("b"));
        assert_eq!(h.kinds(), vec![ViolationKind::StaleRead]);
    }

    #[test]
    fn the_value_of_a_create_answered_exists_must_never_show() {
        let h = H::new()
            .write(0, "a", 0, Some(10), Outcome::Ok)
            .exists(1, "b", 20, 30)
            .read(2, 40, 50, Some("b"))
            .fin(100, Some("a"));
        assert_eq!(h.kinds(), vec![ViolationKind::RefusedWriteVisible]);
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
