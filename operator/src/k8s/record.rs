//! The status one reconcile writes, its Events about bootstrap and
//! verification, the metrics of the cluster, and when to look again.

use std::collections::BTreeMap;
use std::time::Duration;

use kube::Resource;
use kube::ResourceExt;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kv_core::NodeState;
use tracing::info;

use super::controller::{Decision, Error};
use super::crd::{Condition, KvCluster, Phase};
use super::events::publish;
use super::hibernation::Hibernation;
use super::observe::{Seen, secret_fingerprints, secret_token};
use super::round::Round;
use super::status::{
    SPEC_REFUSED, merge_conditions, rfc3339, show_restart, spec_refused, status_of, write_status,
};
use super::{bootstrap, objects, restart, verify};

/// Writes the status after the objects were applied, and sets when the
/// cluster is reconciled again: soon while anything moves.
pub(super) async fn status(
    r: &mut Round<'_>,
    kvc: &KvCluster,
    seen: &Seen,
    decision: &Decision,
    hibernation: Option<Hibernation>,
    restart: &restart::Step,
    volumes_condition: Option<Condition>,
) -> Result<(), Error> {
    let ctx = r.ctx;
    let name = kvc.name_any();
    let now = r.now;
    let previous = &r.previous;
    let problems = std::mem::take(&mut r.problems);
    let mut status = status_of(
        kvc,
        decision,
        &seen.ready,
        seen.sts.as_ref(),
        previous,
        problems,
        hibernation.as_ref(),
        now,
    );
    for n in &mut status.nodes {
        n.unreachable_since = seen.unreachable.get(&n.ordinal).map(|&ms| rfc3339(ms));
        n.tokens = seen.tokens_held.get(&n.ordinal).cloned().map(Into::into);
        // Shown as what it is to a user: not serving, catching up. (The
        // topology keeps it Up: the node itself refuses reads and its
        // acknowledgements do not count until it has caught up.)
        if n.state == NodeState::Up && seen.catching_up.contains(&n.ordinal) {
            n.state = NodeState::Recovering;
        }
    }
    if status.phase == Some(Phase::Running) && status.nodes.iter().any(|n| n.state != NodeState::Up)
    {
        status.phase = Some(Phase::Degraded);
    }
    status.bootstrap = bootstrap::status(
        kvc,
        previous.bootstrap.as_ref(),
        r.bootstrap_problem.take(),
        status.phase.unwrap_or(decision.phase),
        status
            .nodes
            .iter()
            .filter(|n| n.state == NodeState::Up)
            .count(),
        &now.to_string(),
    );
    if status.bootstrap.as_ref().map(|b| b.phase) == Some(bootstrap::BootstrapPhase::Restored)
        && previous.bootstrap.as_ref().map(|b| b.phase) != Some(bootstrap::BootstrapPhase::Restored)
    {
        publish(
            ctx,
            kvc,
            EventType::Normal,
            "Restored",
            "Bootstrap",
            &format!(
                "every node loaded its buckets from {} and is Up",
                kvc.spec
                    .bootstrap
                    .as_ref()
                    .map_or("", |b| b.from_backup.destination.as_str())
            ),
        )
        .await;
    }
    let generation = kvc.meta().generation;
    let accepted = r
        .accepted
        .clone()
        .unwrap_or_else(|| super::crd::AcceptedSpec::of(kvc));
    status.conditions = match &r.refused {
        Some(reason) => merge_conditions(
            &status.conditions,
            vec![spec_refused(reason, Some(accepted.generation), generation)],
            generation,
            now,
        ),
        None => {
            let mut cs = status.conditions;
            cs.retain(|c| c.type_ != SPEC_REFUSED);
            cs
        }
    };
    if let Some(h) = &hibernation {
        status.conditions = merge_conditions(
            &status.conditions,
            vec![h.condition(decision.topology.epoch, generation)],
            generation,
            now,
        );
    }
    // A resize in progress is looked at again soon, like a rollout.
    let volumes_settled = volumes_condition
        .as_ref()
        .is_none_or(|c| c.status == "True" || c.reason == "ExpansionNotSupported");
    if let Some(c) = volumes_condition {
        status.conditions = merge_conditions(&status.conditions, vec![c], generation, now);
    }
    if let (Some(at), Some(links), Some(http), Some(token)) = (
        verify::requested(kvc, previous.last_verify.as_ref()),
        &ctx.node_reports,
        &seen.node_http,
        secret_token(seen.secret.as_ref(), objects::TOKEN_KEY),
    ) {
        let v = verify::run(
            links,
            http,
            kvc,
            &decision.topology,
            &token,
            at,
            now.to_string(),
        )
        .await;
        let (type_, reason, note) = if v.consistent {
            (
                EventType::Normal,
                "Verified",
                format!(
                    "{} buckets compared at epoch {}: every owner holds the same",
                    v.buckets_compared, v.epoch
                ),
            )
        } else {
            (
                EventType::Warning,
                "VerifyFailed",
                format!(
                    "{} of {} buckets differ between owners; not checked: {}",
                    v.divergent_buckets,
                    v.buckets_compared,
                    if v.not_checked.is_empty() {
                        "none".to_string()
                    } else {
                        v.not_checked.join("; ")
                    }
                ),
            )
        };
        publish(ctx, kvc, type_, reason, "Verify", &note).await;
        status.last_verify = Some(v);
    }
    show_restart(&mut status, restart, generation, now);
    status.last_restart = restart.status.clone();
    status.accepted_spec = Some(accepted);
    write_status(&r.kvcs, kvc, &status).await?;
    let phase = status.phase.unwrap_or(decision.phase);
    // Failed nodes listed in faultInjection.failedNodes are a drill.
    let held = kvc
        .desired()
        .held_down(decision.topology.nodes.iter().map(|n| (n.ordinal, n.state)));
    ctx.metrics.observe_cluster(
        &r.key,
        phase,
        decision.topology.nodes.iter().map(|n| n.state).collect(),
        held,
    );
    info!(kvcluster = %name, phase = ?phase, epoch = decision.topology.epoch, "reconciled");

    // Look again soon while anything is moving or a refused spec waits;
    // node reports are polled, not watched.
    let in_topology = decision.topology.nodes.last().map_or(0, |n| n.ordinal + 1);
    let keeps_retired_pods = decision.pods > in_topology;
    // A token rotation in progress (kvctl rotate-token --cluster waits on
    // the fingerprints in the status): look again soon until every node
    // holds what the Secrets hold.
    let tokens_settled = tokens_settled(
        &seen.tokens_held,
        secret_fingerprints(seen.secret.as_ref(), objects::TOKEN_KEY),
        secret_fingerprints(seen.cluster_secret.as_ref(), objects::CLUSTER_TOKEN_KEY),
    );
    let settled = matches!(phase, Phase::Running | Phase::Hibernated)
        && tokens_settled
        && r.refused.is_none()
        && !decision.push_topology
        && !keeps_retired_pods
        && !restart.in_progress()
        && volumes_settled
        && hibernation
            .as_ref()
            .is_none_or(|h| matches!(h, Hibernation::Hibernated | Hibernation::Awake));
    r.requeue = Action::requeue(Duration::from_secs(if settled { 60 } else { 5 }));
    Ok(())
}

/// Does every node that reported hold exactly the tokens of the Secrets,
/// one token each (no rotation under way)? A Secret that cannot be read
/// says nothing against it.
pub(super) fn tokens_settled(
    held: &BTreeMap<u32, kv_core::report::TokenFingerprints>,
    client: Option<Vec<String>>,
    cluster: Option<Vec<String>>,
) -> bool {
    let one = |f: &Option<Vec<String>>| f.as_ref().is_none_or(|f| f.len() <= 1);
    one(&client)
        && one(&cluster)
        && held.values().all(|t| {
            // A node that shows no tokens (an older version) is not waited on.
            let same = |want: &Option<Vec<String>>, shown: &Vec<String>| {
                shown.is_empty() || want.as_ref().is_none_or(|w| w == shown)
            };
            same(&client, &t.client) && same(&cluster, &t.cluster)
        })
}
