//! The quorum rules over in-memory owners: the fan-out ([`Calls`]) driven
//! with fake owners that answer, answer late, answer stale, refuse or fail,
//! in paused time so that "slow" costs nothing and every run is the same.
//! Reads count any answer ([`Count`]); writes count acknowledgements
//! towards a [`WritePlan`] over an in-memory topology.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kv_core::{Consistency, NodeState, Record, Version};
use tokio::time::Instant;

use super::CoordError;
use super::plan::tests::view;
use super::plan::{Ack, WritePlan, WriteTally};
use super::quorum::{Calls, Count, Fanout, Replies, SPECULATIVE_READ_AFTER};
use super::read::{read_order, read_shortfall, stale_owners};
use super::write::{Replicated, WriteFailure, not_acknowledged};
use crate::node::ApiError;

use Consistency::{All, One, Quorum};

/// How a fake owner behaves when asked.
#[derive(Clone, Copy, Debug)]
enum Owner {
    /// Answers at once; a read gets the key at this version.
    Answers(u64),
    /// Answers after this many milliseconds.
    Slow(u64, u64),
    /// Refuses the connection at once.
    Down,
    /// Fails after this many milliseconds (a peer timeout).
    FailsAfter(u64),
}

fn record(ts: u64) -> Record {
    Record {
        key: b"k".to_vec(),
        value: Some(b"v".to_vec()),
        version: Version::new(ts, 0),
    }
}

/// In-memory owners `0..`, noting whom the fan-out asked, in order.
#[derive(Clone)]
struct Owners {
    behaviour: Vec<Owner>,
    asked: Arc<Mutex<Vec<u32>>>,
}

impl Owners {
    fn new(behaviour: &[Owner]) -> Owners {
        Owners {
            behaviour: behaviour.to_vec(),
            asked: Arc::default(),
        }
    }

    fn ordinals(&self) -> Vec<u32> {
        (0..self.behaviour.len() as u32).collect()
    }

    fn asked(&self) -> Vec<u32> {
        self.asked.lock().map(|a| a.clone()).unwrap_or_default()
    }

    /// One owner's answer: the version it holds, or why it failed.
    fn call(&self, o: u32) -> impl Future<Output = Result<u64, String>> + Send + use<> {
        if let Ok(mut asked) = self.asked.lock() {
            asked.push(o);
        }
        let behaviour = self.behaviour[o as usize];
        async move {
            match behaviour {
                Owner::Answers(v) => Ok(v),
                Owner::Slow(ms, v) => {
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    Ok(v)
                }
                Owner::Down => Err("connection refused".to_string()),
                Owner::FailsAfter(ms) => {
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    Err("timed out".to_string())
                }
            }
        }
    }

    /// A write's call to owner `o` that notes a hint for it in `hinted` when
    /// it fails, inside the call, as the coordinator's `write_replica` does.
    fn call_hinting(
        &self,
        o: u32,
        hinted: &Arc<Mutex<Vec<u32>>>,
    ) -> impl Future<Output = Result<Ack, String>> + Send + use<> {
        let (answer, hinted) = (self.call(o), hinted.clone());
        async move {
            let r = answer.await;
            if r.is_err()
                && let Ok(mut h) = hinted.lock()
            {
                h.push(o);
            }
            r.map(|_| Ack { catching_up: false })
        }
    }

    /// A read of the key from `need` of the owners, as the coordinator runs it.
    async fn read(&self, need: usize) -> Replies<Option<Record>, String> {
        let owners = self.clone();
        Calls::start(self.ordinals(), Fanout::read(need), move |o| {
            let answer = owners.call(o);
            async move { answer.await.map(|ts| Some(record(ts))) }
        })
        .until(&mut Count::new(need))
        .await
    }

    /// A write at `level` to every owner, counted towards `plan`.
    async fn write(
        &self,
        level: Consistency,
        plan: &WritePlan,
        v: &crate::cluster::View,
    ) -> WriteOutcome {
        let owners = self.clone();
        let mut tally = WriteTally::new(plan, v);
        let replies = Calls::start(self.ordinals(), Fanout::all(), move |o| {
            let answer = owners.call(o);
            async move {
                answer
                    .await
                    .map(|_| Ack { catching_up: false })
                    .map_err(WriteFailure::Other)
            }
        })
        .until(&mut tally)
        .await;
        let verdict = if replies.met {
            Ok(Replicated::Done(record(1)))
        } else {
            not_acknowledged(level, &tally, &replies.failed)
        };
        WriteOutcome {
            met: replies.met,
            verdict,
        }
    }
}

struct WriteOutcome {
    met: bool,
    verdict: Result<Replicated, CoordError>,
}

fn all_up(n: usize) -> crate::cluster::View {
    let members: Vec<u32> = (0..n as u32).collect();
    view(&vec![NodeState::Up; n], &members, None)
}

fn since(start: Instant) -> Duration {
    Instant::now() - start
}

#[tokio::test(start_paused = true)]
async fn a_read_at_one_asks_one_owner_and_returns_with_its_answer() {
    let owners = Owners::new(&[Owner::Answers(3), Owner::Answers(3), Owner::Answers(3)]);
    let start = Instant::now();
    let replies = owners.read(One.required(3)).await;
    assert!(replies.met);
    assert_eq!(owners.asked(), [0]);
    assert_eq!(since(start), Duration::ZERO);
}

#[tokio::test(start_paused = true)]
async fn a_quorum_read_asks_exactly_two_of_three_owners_when_both_answer() {
    let owners = Owners::new(&[Owner::Answers(3), Owner::Answers(3), Owner::Answers(3)]);
    let replies = owners.read(Quorum.required(3)).await;
    assert!(replies.met);
    assert_eq!(owners.asked(), [0, 1]);
    assert_eq!(replies.speculated, 0);
}

#[tokio::test(start_paused = true)]
async fn a_down_owner_makes_the_read_ask_the_next_owner_at_once() {
    let owners = Owners::new(&[Owner::Down, Owner::Answers(3), Owner::Answers(3)]);
    let start = Instant::now();
    let replies = owners.read(Quorum.required(3)).await;
    assert!(replies.met);
    assert_eq!(owners.asked(), [0, 1, 2]);
    assert_eq!(replies.failed, [(0, "connection refused".to_string())]);
    assert_eq!(since(start), Duration::ZERO, "no waiting for the timer");
    assert_eq!(replies.speculated, 0);
}

#[tokio::test(start_paused = true)]
async fn a_slow_owner_makes_the_read_ask_the_next_after_the_speculative_delay() {
    let owners = Owners::new(&[Owner::Slow(10_000, 1), Owner::Answers(3), Owner::Answers(3)]);
    let start = Instant::now();
    let replies = owners.read(Quorum.required(3)).await;
    assert!(replies.met);
    assert_eq!(
        since(start),
        SPECULATIVE_READ_AFTER,
        "not the slow owner's 10 s"
    );
    assert_eq!(owners.asked(), [0, 1, 2]);
    assert_eq!(replies.speculated, 1);
}

#[tokio::test(start_paused = true)]
async fn a_stale_answer_counts_the_newest_wins_and_stale_owners_late_ones_too_are_repaired() {
    // 1 answers after the speculative delay, so 2 is asked too
    let owners = Owners::new(&[
        Owner::Answers(5),
        Owner::Slow(150, 3),
        Owner::Slow(1_000, 1),
    ]);
    let mut replies = owners.read(All.required(3) - 1).await;
    assert!(replies.met, "a stale answer is still an answer");
    let mut answers: BTreeMap<u32, Option<Record>> = replies.ok.drain(..).collect();
    let newest = super::newest(answers.values()).expect("a record");
    assert_eq!(newest.version, Version::new(5, 0));
    assert_eq!(stale_owners(&newest, &answers), [1]);
    // The speculative third owner answers after the read returned: read
    // repair sees it on the late channel.
    let (o, late) = replies.late.recv().await.expect("a late answer");
    answers.insert(o, late.expect("an answer"));
    assert_eq!(stale_owners(&newest, &answers), [1, 2]);
}

#[tokio::test(start_paused = true)]
async fn a_read_at_all_of_five_waits_for_the_slowest_owner_and_cannot_speculate() {
    let mut behaviour = [Owner::Answers(3); 5];
    behaviour[3] = Owner::Slow(300, 3);
    let owners = Owners::new(&behaviour);
    let start = Instant::now();
    let replies = owners.read(All.required(5)).await;
    assert!(replies.met);
    assert_eq!(since(start), Duration::from_millis(300));
    assert_eq!(replies.speculated, 0, "every owner was asked already");
}

#[tokio::test(start_paused = true)]
async fn a_read_with_too_few_answers_fails_with_the_shortfall_message() {
    let owners = Owners::new(&[Owner::Down, Owner::Answers(3), Owner::FailsAfter(5_000)]);
    let replies = owners.read(Quorum.required(3)).await;
    assert!(!replies.met);
    let e = ApiError::from(read_shortfall(Quorum, 2, &replies));
    assert_eq!(
        (e.status, e.code, e.message.as_str()),
        (
            503,
            "unavailable",
            "read at Quorum needed 2 answers and got 1 (node 0: connection refused; node 2: timed out)"
        )
    );
}

#[test]
fn a_read_asks_this_node_first_then_the_others_rotated_by_bucket() {
    assert_eq!(read_order(&[0, 1, 2], 1, 4), [1, 0, 2]);
    assert_eq!(read_order(&[0, 1, 2], 1, 5), [1, 2, 0]);
    // this node does not serve the key (not an owner, or catching up)
    assert_eq!(read_order(&[0, 2], 1, 1), [2, 0]);
}

#[tokio::test(start_paused = true)]
async fn a_quorum_write_returns_once_two_of_three_acknowledge_without_waiting_for_the_third() {
    let v = all_up(3);
    let plan = WritePlan::new(&v, b"k", Quorum).expect("plan");
    let owners = Owners::new(&[Owner::Answers(1), Owner::Slow(10_000, 1), Owner::Answers(1)]);
    let start = Instant::now();
    let outcome = owners.write(Quorum, &plan, &v).await;
    assert!(outcome.met);
    assert_eq!(since(start), Duration::ZERO);
    assert_eq!(owners.asked(), [0, 1, 2], "a write goes to every owner");
}

#[tokio::test(start_paused = true)]
async fn calls_still_running_when_the_quorum_is_met_run_to_their_end() {
    // The coordinator stores a hint for an owner that fails inside that
    // owner's call: one that fails after the answer still gets it.
    let hinted = Arc::new(Mutex::new(Vec::new()));
    let v = all_up(3);
    let plan = WritePlan::new(&v, b"k", Quorum).expect("plan");
    let owners = Owners::new(&[
        Owner::Answers(1),
        Owner::Answers(1),
        Owner::FailsAfter(1_000),
    ]);
    let (calls_of, hints) = (owners.clone(), hinted.clone());
    let replies = Calls::start(owners.ordinals(), Fanout::all(), move |o| {
        calls_of.call_hinting(o, &hints)
    })
    .until(&mut WriteTally::new(&plan, &v))
    .await;
    assert!(replies.met);
    assert!(hinted.lock().map(|h| h.is_empty()).unwrap_or(false));
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(hinted.lock().map(|h| h.clone()).unwrap_or_default(), [2]);
}

#[tokio::test(start_paused = true)]
async fn calls_of_a_request_dropped_while_it_waits_run_to_their_end() {
    // The calls run inside the waiting request's task; when that request is
    // dropped (its client went away), they are moved to a task of their own
    // and still store their hints.
    let hinted = Arc::new(Mutex::new(Vec::new()));
    let v = all_up(3);
    let plan = WritePlan::new(&v, b"k", All).expect("plan");
    let owners = Owners::new(&[
        Owner::Slow(500, 1),
        Owner::FailsAfter(1_000),
        Owner::FailsAfter(1_000),
    ]);
    let (calls_of, hints) = (owners.clone(), hinted.clone());
    let mut tally = WriteTally::new(&plan, &v);
    let waiting = Calls::start(owners.ordinals(), Fanout::all(), move |o| {
        calls_of.call_hinting(o, &hints)
    })
    .until(&mut tally);
    let gave_up = tokio::time::timeout(Duration::from_millis(100), waiting).await;
    assert!(gave_up.is_err(), "no owner answers within 100 ms");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut h = hinted.lock().map(|h| h.clone()).unwrap_or_default();
    h.sort_unstable();
    assert_eq!(
        h,
        [1, 2],
        "both failing owners got their hint after the drop"
    );
}

#[tokio::test(start_paused = true)]
async fn a_write_at_all_fails_when_one_owner_fails_with_the_shortfall_message() {
    let v = all_up(3);
    let plan = WritePlan::new(&v, b"k", All).expect("plan");
    let owners = Owners::new(&[Owner::Answers(1), Owner::Answers(1), Owner::Down]);
    let mut tally = WriteTally::new(&plan, &v);
    let replies = Calls::start(owners.ordinals(), Fanout::all(), |o| {
        let answer = owners.call(o);
        async move {
            answer
                .await
                .map(|_| Ack { catching_up: false })
                .map_err(WriteFailure::Other)
        }
    })
    .until(&mut tally)
    .await;
    assert!(!replies.met);
    let e = not_acknowledged(All, &tally, &replies.failed)
        .map_err(ApiError::from)
        .err();
    assert_eq!(
        e,
        Some(ApiError::new(
            503,
            "unavailable",
            "write at All was acknowledged by 2 of the 3 owners it needs (node 2: connection refused); it is not reported as written and may or may not become visible".into()
        ))
    );
}

#[test]
fn a_write_not_acknowledged_is_reissued_above_a_newer_version_else_replanned_else_refused() {
    let v = all_up(3);
    let plan = WritePlan::new(&v, b"k", Quorum).expect("plan");
    let tally = WriteTally::new(&plan, &v);
    let stale = || WriteFailure::Stale("node 1: stale_epoch".into());
    let verdict = |failed: &[(u32, WriteFailure)]| not_acknowledged(Quorum, &tally, failed);
    // an owner holding a newer version wins over everything else
    assert_eq!(
        verdict(&[
            (0, WriteFailure::Newer(Version::new(7, 2))),
            (1, stale()),
            (2, WriteFailure::Newer(Version::new(9, 1))),
        ]),
        Ok(Replicated::Superseded(Version::new(9, 1)))
    );
    // an owner on a newer topology: plan the write again there
    assert_eq!(
        verdict(&[(1, stale()), (2, WriteFailure::DiskFull)]),
        Ok(Replicated::Stale)
    );
    // a full disk makes the refusal a 507
    let full = verdict(&[
        (1, WriteFailure::DiskFull),
        (2, WriteFailure::Other("x".into())),
    ])
    .map_err(ApiError::from)
    .err();
    assert_eq!(
        full,
        Some(ApiError::new(
            507,
            "insufficient_storage",
            "write at Quorum was acknowledged by 0 of the 2 owners it needs (node 1: its disk is full; node 2: x); it is not reported as written and may or may not become visible".into()
        ))
    );
}

#[tokio::test(start_paused = true)]
async fn a_write_while_a_placement_is_pending_needs_both_quorums() {
    use NodeState::{Joining, Up};
    // 0,1,2 own the key now; 1,2,3 will. 0 and 3 answer, 1 and 2 are slow.
    let v = view(&[Up, Up, Up, Joining], &[0, 1, 2], Some(&[1, 2, 3]));
    let plan = WritePlan::new(&v, b"k", Quorum).expect("plan");
    let owners = Owners::new(&[
        Owner::Answers(1),
        Owner::Slow(200, 1),
        Owner::FailsAfter(500),
        Owner::Answers(1),
    ]);
    let start = Instant::now();
    let outcome = owners.write(Quorum, &plan, &v).await;
    assert!(outcome.met);
    assert_eq!(since(start), Duration::from_millis(200), "1 completes both");
    assert_eq!(outcome.verdict, Ok(Replicated::Done(record(1))));
}

/// R/W/N: every level over 1, 3 and 5 owners, with any number of them down
/// (refusing) or failing late: met exactly when enough owners answer, and
/// only the shortfall is reported otherwise.
#[tokio::test(start_paused = true)]
async fn every_level_over_one_three_and_five_owners_is_met_exactly_when_enough_owners_answer() {
    for n in [1usize, 3, 5] {
        for level in [One, Quorum, All] {
            for failing in 0..=n {
                for late in [false, true] {
                    let mut behaviour = vec![Owner::Answers(2); n];
                    for (i, b) in behaviour.iter_mut().enumerate().take(failing) {
                        // spread the failures over the order the owners are asked in
                        *b = if late {
                            Owner::FailsAfter(1_000)
                        } else if i % 2 == 0 {
                            Owner::Down
                        } else {
                            Owner::FailsAfter(30)
                        };
                    }
                    let expect = n - failing >= level.required(n);
                    let case = format!("{level} over {n} owners, {failing} failing (late: {late})");

                    let owners = Owners::new(&behaviour);
                    let read = owners.read(level.required(n)).await;
                    assert_eq!(read.met, expect, "read at {case}");
                    assert_eq!(
                        read.ok.len(),
                        if expect {
                            level.required(n)
                        } else {
                            n - failing
                        },
                        "read answers at {case}"
                    );

                    let v = all_up(n);
                    let plan = WritePlan::new(&v, b"k", level).expect("every owner is Up");
                    let owners = Owners::new(&behaviour);
                    let write = owners.write(level, &plan, &v).await;
                    assert_eq!(write.met, expect, "write at {case}");
                    if !expect {
                        let message = write.verdict.err().map(|e| e.to_string());
                        let short = format!(
                            "acknowledged by {} of the {} owners it needs",
                            n - failing,
                            level.required(n)
                        );
                        assert!(
                            message.as_ref().is_some_and(|m| m.contains(&short)),
                            "write at {case}: {message:?}"
                        );
                    }
                    // let the late failures of this case finish before the next
                    tokio::time::sleep(Duration::from_secs(2)).await;
                }
            }
        }
    }
}
