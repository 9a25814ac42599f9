//! kv-control's one loop over an in-memory platform that records what it is
//! asked to do: the order both real platforms rely on (topology kept before
//! any action, kills before the push, the push before any stop or start,
//! finish last), what a refusal does with and without a fallback, and that a
//! failed call ends the round.
//!
//! The platform here runs no node: it only records calls, which is all the
//! loop sees of a platform.

mod planner_support;

use std::collections::BTreeSet;

use kv_control::planner::{Action, Desired, Observed, Plan, Refusal};
use kv_control::{Observation, Platform, Step, step};
use kv_core::Topology;
use planner_support::*;

#[derive(Default)]
struct Recorder {
    /// What observe returns; `None`: nothing to plan.
    observation: Option<Observation>,
    /// What `refused` offers instead of a refused spec.
    fallback: Option<Desired>,
    /// The call that fails, by name.
    fail_on: Option<&'static str>,
    calls: Vec<String>,
}

impl Recorder {
    fn seeing(desired: Desired, observed: Observed) -> Recorder {
        Recorder {
            observation: Some(Observation {
                desired,
                observed,
                config: config(),
            }),
            ..Recorder::default()
        }
    }

    fn call(&mut self, what: String) -> Result<(), String> {
        let name = what.split(' ').next().unwrap_or_default().to_string();
        self.calls.push(what);
        match self.fail_on {
            Some(f) if f == name => Err(format!("{name} failed")),
            _ => Ok(()),
        }
    }
}

impl Platform for Recorder {
    type Error = String;

    async fn observe(&mut self) -> Result<Option<Observation>, String> {
        self.call("observe".into())?;
        Ok(self.observation.clone())
    }

    async fn refused(
        &mut self,
        refusal: &Refusal,
        _: &Observation,
    ) -> Result<Option<Desired>, String> {
        self.call(format!("refused {}", refusal.reason))?;
        Ok(self.fallback.clone())
    }

    async fn prepare(&mut self, _: &Plan, _: &Observed) -> Result<(), String> {
        self.call("prepare".into())
    }

    async fn commit(&mut self, topology: &Topology, changed: bool) -> Result<(), String> {
        self.call(format!("commit {} {changed}", topology.epoch))
    }

    async fn kill(&mut self, ordinal: u32) -> Result<(), String> {
        self.call(format!("kill {ordinal}"))
    }

    async fn push(&mut self, topology: &Topology) -> Result<(), String> {
        self.call(format!("push {}", topology.epoch))
    }

    async fn stop(&mut self, ordinal: u32) -> Result<(), String> {
        self.call(format!("stop {ordinal}"))
    }

    async fn start(&mut self, ordinal: u32) -> Result<(), String> {
        self.call(format!("start {ordinal}"))
    }

    async fn finish(&mut self, step: &Step, _: &Observed) -> Result<(), String> {
        let what = match step {
            Step::Skipped => "skipped",
            Step::Refused(_) => "refused",
            Step::Planned { .. } => "planned",
        };
        self.call(format!("finish {what}"))
    }
}

fn run(platform: &mut Recorder) -> Result<Step, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a runtime");
    rt.block_on(step(platform))
}

/// The calls a carried-out plan must produce, in its order.
fn expected(plan: &Plan, topology: &Topology) -> Vec<String> {
    let mut calls = vec![
        "observe".to_string(),
        "prepare".to_string(),
        format!("commit {} {}", topology.epoch, plan.topology.is_some()),
    ];
    calls.extend(plan.actions.iter().map(|a| match a {
        Action::Kill(o) => format!("kill {o}"),
        Action::PushTopology => format!("push {}", topology.epoch),
        Action::Stop(o) => format!("stop {o}"),
        Action::Start(o) => format!("start {o}"),
    }));
    calls.push("finish planned".to_string());
    calls
}

fn held(replicas: u32, failed: &[u32]) -> Desired {
    Desired {
        failed_nodes: failed.iter().copied().collect::<BTreeSet<_>>(),
        ..desired(replicas)
    }
}

#[test]
fn a_new_cluster_keeps_its_topology_before_any_node_is_started() {
    let mut p = Recorder::seeing(desired(3), observed(None, vec![]));
    let step = run(&mut p).expect("the round");
    let Step::Planned {
        plan,
        topology,
        refused: None,
    } = &step
    else {
        panic!("not planned: {step:?}");
    };
    assert!(plan.actions.contains(&Action::Start(0)), "{plan:?}");
    assert_eq!(p.calls, expected(plan, topology));
    assert_eq!(p.calls[2], format!("commit {} true", topology.epoch));
}

#[test]
fn a_hold_down_kills_the_node_then_pushes_the_topology_that_says_so() {
    let (t, _) = settle(&desired(3), None, 3);
    let mut p = Recorder::seeing(
        held(3, &[1]),
        observed(Some(t.clone()), all_synced(3, t.epoch)),
    );
    let step = run(&mut p).expect("the round");
    let Step::Planned { plan, topology, .. } = &step else {
        panic!("not planned: {step:?}");
    };
    assert!(topology.epoch > t.epoch);
    assert_eq!(p.calls, expected(plan, topology));
    let at = |call: &str| p.calls.iter().position(|c| c == call);
    let (commit, kill, push) = (
        at(&format!("commit {} true", topology.epoch)),
        at("kill 1"),
        at(&format!("push {}", topology.epoch)),
    );
    assert!(commit < kill && kill < push, "{:?}", p.calls);
}

#[test]
fn a_settled_cluster_keeps_its_topology_and_changes_nothing() {
    let (t, _) = settle(&desired(3), None, 3);
    let mut p = Recorder::seeing(
        desired(3),
        observed(Some(t.clone()), all_synced(3, t.epoch)),
    );
    run(&mut p).expect("the round");
    assert_eq!(
        p.calls,
        vec![
            "observe".to_string(),
            "prepare".to_string(),
            format!("commit {} false", t.epoch),
            "finish planned".to_string(),
        ]
    );
}

#[test]
fn a_refused_spec_without_a_fallback_changes_nothing_and_is_recorded() {
    let (t, _) = settle(&desired(3), None, 3);
    // Two of three held down at Quorum: keys would be short of W.
    let mut p = Recorder::seeing(
        held(3, &[0, 1]),
        observed(Some(t.clone()), all_synced(3, t.epoch)),
    );
    let step = run(&mut p).expect("the round");
    let Step::Refused(plan) = &step else {
        panic!("not refused: {step:?}");
    };
    let reason = plan
        .refusal
        .as_ref()
        .map(|r| r.reason.clone())
        .unwrap_or_default();
    assert!(!reason.is_empty());
    assert_eq!(
        p.calls,
        vec![
            "observe".to_string(),
            format!("refused {reason}"),
            "finish refused".to_string()
        ]
    );
}

#[test]
fn a_refused_spec_carries_on_with_the_platforms_fallback() {
    let (t, _) = settle(&desired(3), None, 3);
    let mut p = Recorder::seeing(
        held(3, &[0, 1]),
        observed(Some(t.clone()), all_synced(3, t.epoch)),
    );
    p.fallback = Some(desired(3));
    let step = run(&mut p).expect("the round");
    let Step::Planned {
        plan,
        topology,
        refused: Some(refusal),
    } = &step
    else {
        panic!("not carried on: {step:?}");
    };
    assert_eq!(plan.refusal, None);
    assert_eq!(topology.epoch, t.epoch, "the fallback changes nothing here");
    assert_eq!(p.calls[1], format!("refused {}", refusal.reason));
    assert_eq!(p.calls.last().map(String::as_str), Some("finish planned"));
}

#[test]
fn a_fallback_the_planner_refuses_too_changes_nothing() {
    let (t, _) = settle(&desired(3), None, 3);
    let mut p = Recorder::seeing(
        held(3, &[0, 1]),
        observed(Some(t.clone()), all_synced(3, t.epoch)),
    );
    p.fallback = Some(held(3, &[1, 2]));
    let step = run(&mut p).expect("the round");
    assert!(matches!(step, Step::Refused(_)), "{step:?}");
    assert!(
        !p.calls.iter().any(|c| c.starts_with("commit")),
        "{:?}",
        p.calls
    );
    assert_eq!(p.calls.last().map(String::as_str), Some("finish refused"));
}

#[test]
fn a_failed_call_ends_the_round_before_anything_after_it() {
    let (t, _) = settle(&desired(3), None, 3);
    let mut p = Recorder::seeing(
        held(3, &[1]),
        observed(Some(t.clone()), all_synced(3, t.epoch)),
    );
    p.fail_on = Some("commit");
    assert_eq!(run(&mut p).err().as_deref(), Some("commit failed"));
    assert_eq!(p.calls.len(), 3, "{:?}", p.calls);
    assert!(p.calls[2].starts_with("commit"));
}

#[test]
fn nothing_to_observe_is_a_skipped_round() {
    let mut p = Recorder::default();
    assert_eq!(run(&mut p), Ok(Step::Skipped));
    assert_eq!(p.calls, vec!["observe".to_string()]);
}
