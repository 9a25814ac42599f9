//! The KvCluster's status: the conditions, the per-node view, and the
//! server-side apply that writes it over the version it was computed from.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch};
use kube::{Resource, ResourceExt};
use kv_core::NodeState;

use super::crd::{Condition, FORCE_FAULT_INJECTION, KvCluster, KvClusterStatus, NodeStatus, Phase};
use super::hibernation::Hibernation;
use super::objects;
use super::restart;

use super::controller::{Decision, Error, ROLLOUT_DEADLINE_SECONDS, apply_params};

/// Apply the status over the very KvCluster it was computed from: the
/// `resourceVersion` in the apply is a precondition. A reconcile that worked
/// from a stale copy (a cache behind the API server, or an operator replica
/// that lost its lease mid-reconcile) then gets 409 and runs again from the
/// current object, instead of overwriting a newer status with an older one.
pub(super) async fn write_status(
    api: &Api<KvCluster>,
    kvc: &KvCluster,
    status: &KvClusterStatus,
) -> Result<(), Error> {
    api.patch_status(
        &kvc.name_any(),
        &apply_params(),
        &Patch::Apply(&status_patch(kvc, status)),
    )
    .await?;
    Ok(())
}

/// The server-side apply body of [`write_status`].
pub fn status_patch(kvc: &KvCluster, status: &KvClusterStatus) -> serde_json::Value {
    let mut patch = serde_json::json!({
        "apiVersion": "kvstore.dev/v1alpha1",
        "kind": "KvCluster",
        "status": status,
    });
    if let Some(version) = &kvc.metadata.resource_version {
        patch["metadata"] = serde_json::json!({ "resourceVersion": version });
    }
    patch
}

/// The condition of a spec the planner refuses.
pub const SPEC_REFUSED: &str = "SpecRefused";

/// `SpecRefused` True with the planner's reason, and which generation is
/// carried out meanwhile (`carried`; `None` when none is).
pub(super) fn spec_refused(
    reason: &str,
    carried: Option<Option<i64>>,
    generation: Option<i64>,
) -> Condition {
    let message = match carried {
        Some(Some(g)) => format!("{reason} (still carrying out the spec of generation {g})"),
        Some(None) => format!("{reason} (still carrying out the last accepted spec)"),
        None => format!("{reason} (no accepted spec to carry out meanwhile)"),
    };
    cond(SPEC_REFUSED, true, "PlannerRefused", &message, generation)
}

pub(super) fn parse_ms(rfc3339: &str) -> Option<u64> {
    let t: Timestamp = rfc3339.parse().ok()?;
    u64::try_from(t.as_millisecond()).ok()
}

pub(super) fn rfc3339(ms: u64) -> String {
    i64::try_from(ms)
        .ok()
        .and_then(|ms| Timestamp::from_millisecond(ms).ok())
        .unwrap_or(Timestamp::UNIX_EPOCH)
        .to_string()
}

/// While a rolling restart is under way and nothing else is progressing,
/// Progressing says so.
pub(super) fn show_restart(
    status: &mut KvClusterStatus,
    step: &restart::Step,
    generation: Option<i64>,
    now: Timestamp,
) {
    let Some(r) = step.status.as_ref().filter(|_| step.in_progress()) else {
        return;
    };
    let idle = status
        .conditions
        .iter()
        .any(|c| c.type_ == "Progressing" && c.reason == "Reconciled");
    if !idle {
        return;
    }
    let doing = match (&r.restarting, &r.waiting_for) {
        (_, Some(w)) => format!("waiting for {w}"),
        (Some(n), None) => format!("restarting node {}", n.ordinal),
        (None, None) => "starting".to_string(),
    };
    let message = format!(
        "rolling restart {}: {} of {} nodes done; {doing}",
        r.requested_at,
        r.restarted.len(),
        status.nodes.len()
    );
    status.conditions = merge_conditions(
        &status.conditions,
        vec![cond(
            "Progressing",
            true,
            "Restarting",
            &message,
            generation,
        )],
        generation,
        now,
    );
}

pub(super) fn cond(
    type_: &str,
    status: bool,
    reason: &str,
    message: &str,
    generation: Option<i64>,
) -> Condition {
    Condition {
        type_: type_.to_string(),
        status: if status { "True" } else { "False" }.to_string(),
        observed_generation: generation,
        last_transition_time: None,
        reason: reason.to_string(),
        message: message.to_string(),
    }
}

/// The condition that shows the [`FORCE_FAULT_INJECTION`] annotation.
pub const FORCE_CONDITION: &str = "ForceFaultInjection";

/// The `ForceFaultInjection` condition, present only while the annotation
/// asks for something: True (reason `Annotated`) while it is `"true"` and the
/// planner carries out hold-downs that leave keys short of W live owners;
/// False (reason `InvalidAnnotation`) for a value other than `"true"` or
/// `"false"`, which is planned without force. `None` (the condition is
/// removed) when the annotation is absent or `"false"`.
pub fn force_condition(kvc: &KvCluster, generation: Option<i64>) -> Option<Condition> {
    match kvc.force_fault_injection() {
        Ok(false) => None,
        Ok(true) => Some(cond(
            FORCE_CONDITION,
            true,
            "Annotated",
            &format!(
                "{FORCE_FAULT_INJECTION} is \"true\": nodes in faultInjection.failedNodes are held down even when some keys are left with fewer live owners than writes need"
            ),
            generation,
        )),
        Err(value) => Some(cond(
            FORCE_CONDITION,
            false,
            "InvalidAnnotation",
            &format!(
                "{FORCE_FAULT_INJECTION} is {value:?}; only \"true\" or \"false\" are understood, so the cluster is planned without force"
            ),
            generation,
        )),
    }
}

/// `merge_conditions` with `new` plus the annotation's condition, which is
/// dropped from the status when the annotation no longer asks for anything.
pub(super) fn conditions_of(
    kvc: &KvCluster,
    previous: &[Condition],
    mut new: Vec<Condition>,
    generation: Option<i64>,
    now: Timestamp,
) -> Vec<Condition> {
    let force = force_condition(kvc, generation);
    let drop_force = force.is_none();
    new.extend(force);
    let mut merged = merge_conditions(previous, new, generation, now);
    if drop_force {
        merged.retain(|c| c.type_ != FORCE_CONDITION);
    }
    merged
}

/// Replace conditions by type, keeping `lastTransitionTime` when the status did not change.
pub(super) fn merge_conditions(
    previous: &[Condition],
    new: Vec<Condition>,
    generation: Option<i64>,
    now: Timestamp,
) -> Vec<Condition> {
    let mut out: Vec<Condition> = previous
        .iter()
        .filter(|p| !new.iter().any(|n| n.type_ == p.type_))
        .cloned()
        .collect();
    for mut c in new {
        let old = previous.iter().find(|p| p.type_ == c.type_);
        c.last_transition_time = match old {
            Some(o) if o.status == c.status => o.last_transition_time.clone(),
            _ => Some(now.to_string()),
        };
        c.observed_generation = generation;
        out.push(c);
    }
    out.sort_by(|a, b| a.type_.cmp(&b.type_));
    out
}

#[allow(clippy::too_many_arguments)]
pub(super) fn status_of(
    kvc: &KvCluster,
    d: &Decision,
    ready: &BTreeMap<u32, bool>,
    sts: Option<&StatefulSet>,
    previous: &KvClusterStatus,
    problems: Vec<(&'static str, String)>,
    hibernation: Option<&Hibernation>,
    now: Timestamp,
) -> KvClusterStatus {
    let generation = kvc.meta().generation;
    let t = &d.topology;
    let is_ready = |o: u32| ready.get(&o).copied().unwrap_or(false);
    let ready_replicas = t.nodes.iter().filter(|n| is_ready(n.ordinal)).count();
    // Waking up, the planner keeps every node Up so that none catches up
    // from the others; one whose pod is not back yet serves nothing, and
    // is shown Recovering until it is.
    let waking_up = match hibernation {
        Some(Hibernation::WakingUp(nodes)) => nodes.clone(),
        _ => BTreeSet::new(),
    };
    let shown = |ordinal: u32, state: NodeState| {
        if state == NodeState::Up && waking_up.contains(&ordinal) {
            NodeState::Recovering
        } else {
            state
        }
    };

    // A new cluster stays Creating until every node meant to run is Ready
    // once; after that, readiness no longer decides the phase.
    let expected_ready = t
        .nodes
        .iter()
        .filter(|n| n.state != NodeState::Failed)
        .count();
    let was_creating = matches!(previous.phase, None | Some(Phase::Creating));
    let phase = if was_creating
        && !matches!(d.phase, Phase::Rebalancing | Phase::Hibernated)
        && ready_replicas < expected_ready
    {
        Phase::Creating
    } else {
        d.phase
    };
    let phase = match phase {
        Phase::Creating | Phase::Running | Phase::Degraded if !waking_up.is_empty() => {
            Phase::WakingUp
        }
        p => p,
    };

    // Available: every key keeps W live owners, i.e. at most factor − W members are down.
    let members = &t.placement.members;
    let factor = t.placement.effective_factor();
    let slack = factor.saturating_sub(t.write_consistency.required(factor));
    let down = members
        .iter()
        .filter(|&&o| !(t.state_of(o).is_some_and(|s| s.counts_in_quorum()) && is_ready(o)))
        .count();
    let available = if d.phase == Phase::Hibernated {
        cond(
            "Available",
            false,
            "Hibernated",
            "every pod is stopped (spec.hibernation)",
            generation,
        )
    } else if members.is_empty() || down > slack {
        cond(
            "Available",
            false,
            "QuorumLost",
            &format!(
                "{down} of {} nodes not Up and Ready; writes at {} tolerate {slack}",
                members.len(),
                t.write_consistency
            ),
            generation,
        )
    } else {
        cond(
            "Available",
            true,
            "QuorumAvailable",
            &format!("{ready_replicas} of {} nodes Ready", t.nodes.len()),
            generation,
        )
    };

    let catching_up: Vec<u32> = t
        .nodes
        .iter()
        .filter(|n| matches!(n.state, NodeState::Joining | NodeState::Recovering))
        .map(|n| n.ordinal)
        .collect();
    let rollout_incomplete = sts.and_then(|s| s.status.as_ref()).is_some_and(|s| {
        s.updated_replicas.unwrap_or(0) < s.replicas
            || s.current_revision.is_some() && s.current_revision != s.update_revision
    });
    let progressing = if let Some((reason, p)) = problems.first() {
        cond("Progressing", false, reason, p, generation)
    } else if d.phase == Phase::Hibernated {
        cond(
            "Progressing",
            false,
            "Hibernated",
            "nothing runs until spec.hibernation is false",
            generation,
        )
    } else if t.pending.is_some() {
        cond(
            "Progressing",
            true,
            "Rebalancing",
            "new owners are streaming their buckets in",
            generation,
        )
    } else if phase == Phase::WakingUp {
        cond(
            "Progressing",
            true,
            "WakingUp",
            &format!("nodes {waking_up:?} are starting on their volumes after hibernation"),
            generation,
        )
    } else if phase == Phase::Creating {
        cond(
            "Progressing",
            true,
            "Creating",
            "the nodes are starting",
            generation,
        )
    } else if !catching_up.is_empty() {
        cond(
            "Progressing",
            true,
            "CatchingUp",
            &format!("nodes {catching_up:?} are catching up"),
            generation,
        )
    } else if rollout_incomplete {
        let prev = previous
            .conditions
            .iter()
            .find(|c| c.type_ == "Progressing");
        let since = prev
            .filter(|c| {
                c.status == "True"
                    && c.reason == "RollingOut"
                    && c.observed_generation == generation
            })
            .and_then(|c| c.last_transition_time.as_ref())
            .and_then(|s| s.parse::<Timestamp>().ok());
        match since {
            Some(s) if now.as_second() - s.as_second() > ROLLOUT_DEADLINE_SECONDS => cond(
                "Progressing",
                false,
                "RolloutStuck",
                "the StatefulSet rollout has not completed; edit the spec to fix it",
                generation,
            ),
            _ => cond(
                "Progressing",
                true,
                "RollingOut",
                "the StatefulSet is rolling out",
                generation,
            ),
        }
    } else {
        cond(
            "Progressing",
            false,
            "Reconciled",
            "nothing is changing",
            generation,
        )
    };

    let not_up: Vec<String> = t
        .nodes
        .iter()
        .map(|n| (n.ordinal, shown(n.ordinal, n.state)))
        .filter(|&(_, state)| state != NodeState::Up)
        .map(|(ordinal, state)| format!("{ordinal}={state}"))
        .collect();
    let degraded = if !not_up.is_empty() {
        cond(
            "Degraded",
            true,
            "NodesNotUp",
            &format!("nodes not Up: {}", not_up.join(", ")),
            generation,
        )
    } else if objects::max_unavailable(kvc).is_none() {
        cond(
            "Degraded",
            true,
            "NoDisruptionBudget",
            "factor − W is 0: no PodDisruptionBudget protects the nodes, so a drain can make keys unwritable",
            generation,
        )
    } else {
        cond(
            "Degraded",
            false,
            "AllNodesUp",
            "every node is Up",
            generation,
        )
    };

    KvClusterStatus {
        phase: Some(phase),
        observed_generation: generation,
        ready_replicas: u32::try_from(ready_replicas).unwrap_or(u32::MAX),
        topology_epoch: t.epoch,
        // Every node's pod name, also of a node whose pod does not exist now.
        nodes: d
            .nodes
            .iter()
            .map(|n| NodeStatus {
                state: shown(n.ordinal, n.state),
                ..n.clone()
            })
            .collect(),
        accepted_spec: previous.accepted_spec.clone(),
        last_restart: previous.last_restart.clone(),
        bootstrap: previous.bootstrap.clone(),
        last_verify: previous.last_verify.clone(),
        conditions: conditions_of(
            kvc,
            &previous.conditions,
            vec![available, progressing, degraded],
            generation,
            now,
        ),
    }
}
