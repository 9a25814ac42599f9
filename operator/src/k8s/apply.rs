//! What one reconcile writes, in this order: the generated Secrets (created
//! once, never overwritten; the nodes' certificate is renewed in place), the
//! topology ConfigMap, the push of the topology to every running node, the
//! peer and client Services, the StatefulSet, the claims' sizes, the
//! PodDisruptionBudget (or its removal), the NetworkPolicy (or its
//! removal), the PodMonitor, the deletion of pods held down by fault
//! injection, Events for what changed, and the status with
//! `observedGeneration`. The ConfigMap goes before the StatefulSet so that a
//! scale-down removes pods only after the topology without them is written.
//!
//! Everything is server-side apply with the field manager `kv-operator`.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Instant, SystemTime};

use k8s_openapi::api::core::v1::{ConfigMap, PersistentVolumeClaim, Pod, Secret, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::storage::v1::StorageClass;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::events::EventType;
use kube::{Resource, ResourceExt};
use kv_control::planner::Observed;
use kv_core::Topology;
use tracing::{info, warn};

use super::controller::{
    Context, Decision, Error, MONITORING_DISCOVERY_TTL, apply, apply_or_delete, get_opt,
    is_not_found,
};
use super::crd::{Condition, FORCE_FAULT_INJECTION, KvCluster, KvClusterStatus, Phase, TlsMode};
use super::events::{publish, publish_hibernation, publish_transitions};
use super::hibernation::{self, Hibernation};
use super::nodes::push_topology;
use super::observe::{ordinal_of, pod_ready, secret_token};
use super::round::Round;
use super::status::{cond, conditions_of, write_status};
use super::{bootstrap, objects, restart, tls, volumes};

/// Before the ConfigMap: the bootstrap source, the token Secrets and the
/// certificates nodes need before they start. What cannot be made is a
/// problem for the status, not a failed reconcile.
pub(super) async fn credentials(r: &mut Round<'_>) -> Result<(), Error> {
    let Some(seen) = r.seen.as_mut() else {
        return Ok(());
    };
    let kvc = r.target.as_ref().unwrap_or(r.kvc);
    let name = kvc.name_any();
    // Before the StatefulSet: no node of a cluster started from a backup
    // may start without the source.
    let bootstrap_problem =
        bootstrap::prepare(kvc, &r.secrets, r.previous.bootstrap.as_ref()).await?;
    if let Some(p) = &bootstrap_problem {
        r.problems.push(("BootstrapSourceUnusable", p.clone()));
    }
    r.bootstrap_problem = bootstrap_problem;
    let secret_name = objects::auth_secret_name(kvc);
    let cluster_secret_name = objects::cluster_auth_secret_name(kvc);
    if kvc.spec.auth_secret_name.is_none() {
        if seen.secret.is_none() {
            let s = objects::auth_secret(kvc, &kv_control::token::random_token());
            r.secrets.create(&PostParams::default(), &s).await?;
            info!(kvcluster = %name, secret = %secret_name, "generated the client token Secret");
        }
        if seen.cluster_secret.is_none() {
            // A cluster made when `<name>-auth` held both tokens keeps its
            // cluster token: its running nodes know only that one.
            let kept = seen
                .secret
                .as_ref()
                .and_then(|s| s.data.as_ref()?.get(objects::CLUSTER_TOKEN_KEY))
                .and_then(|t| String::from_utf8(t.0.clone()).ok())
                .filter(|t| kv_net::token::parse("cluster token", t).is_ok());
            let token = kept.unwrap_or_else(kv_control::token::random_token);
            let s = objects::cluster_auth_secret(kvc, &token);
            r.secrets.create(&PostParams::default(), &s).await?;
            info!(kvcluster = %name, secret = %cluster_secret_name, "generated the cluster token Secret");
        }
    } else if secret_token(seen.secret.as_ref(), objects::TOKEN_KEY).is_none()
        || secret_token(seen.cluster_secret.as_ref(), objects::CLUSTER_TOKEN_KEY).is_none()
    {
        r.problems.push((
            "AuthSecretMissing",
            format!("Secret {secret_name} is missing or lacks the keys token and cluster-token"),
        ));
    }
    let pods = r.decision.as_ref().map_or(0, |d| d.pods);
    let named = pods.max(kvc.spec.replicas);
    match kvc.spec.tls.mode {
        TlsMode::Generated => {
            let (ca, cert) = (seen.ca_secret.take(), seen.tls_secret.take());
            let problem = ensure_tls(kvc, &r.secrets, ca, cert, named).await?;
            r.problems.extend(problem.map(|p| ("TlsCaUnusable", p)));
        }
        TlsMode::Provided => r.problems.extend(
            tls::check_provided(kvc, seen.tls_secret.as_ref(), named, SystemTime::now())
                .err()
                .map(|p| ("TlsSecretInvalid", p)),
        ),
        TlsMode::Disabled => {}
    }
    Ok(())
}

/// The topology ConfigMap: the copy a starting node reads.
pub(super) async fn topology(r: &mut Round<'_>, topology: &Topology) -> Result<(), Error> {
    let Some(seen) = r.seen.as_ref() else {
        return Ok(());
    };
    let kvc = r.target();
    let cm = objects::topology_configmap(kvc, topology)
        .map_err(|e| Error::Serialization("topology", e))?;
    write_topology(&r.cms, &seen.cm_name, cm, seen.stored_version.clone()).await
}

/// A running node sees a change of the ConfigMap only at the kubelet's next
/// sync (a minute or more), so every running node is told at once. Nodes
/// keep the newest epoch they are given; one that missed this push reports
/// an older epoch and is pushed to again at the next reconcile.
pub(super) async fn push(r: &mut Round<'_>, topology: &Topology) {
    let Some(seen) = r.seen.as_ref() else {
        return;
    };
    let kvc = r.target();
    if let (Some(links), Some(http), Some(cluster_token)) = (
        &r.ctx.node_reports,
        &seen.node_http,
        secret_token(seen.cluster_secret.as_ref(), objects::CLUSTER_TOKEN_KEY),
    ) {
        push_topology(links, http, kvc, &seen.running, topology, &cluster_token).await;
    }
}

/// After the plan's actions: the objects that run the nodes, the pods to
/// delete, Events, the status, and when to look again.
pub(super) async fn converge(r: &mut Round<'_>, observed: &Observed) -> Result<(), Error> {
    let (Some(seen), Some(decision)) = (r.seen.take(), r.decision.take()) else {
        return Ok(());
    };
    let ctx = r.ctx;
    let kvc = r.target.take().unwrap_or_else(|| r.kvc.clone());
    let kvc = &kvc;
    let name = kvc.name_any();
    let now = r.now;
    let previous = &r.previous;
    let hibernated = decision.phase == Phase::Hibernated;
    let svcs: Api<Service> = Api::namespaced(ctx.client.clone(), &r.ns);
    apply(
        &svcs,
        &objects::peer_service_name(kvc),
        &objects::peer_service(kvc),
    )
    .await?;
    apply(
        &svcs,
        &objects::client_service_name(kvc),
        &objects::client_service(kvc),
    )
    .await?;
    let mut statefulset = objects::statefulset(kvc, decision.pods);
    if let Some(live) = &seen.sts {
        volumes::keep_template_size(&mut statefulset, live);
    }
    apply(&r.stss, &objects::statefulset_name(kvc), &statefulset).await?;
    // Once a resize was asked for, the claims are watched over (a scale-up
    // makes claims of the template's size; a size set back is reported).
    let resized_before = previous
        .conditions
        .iter()
        .any(|c| c.type_ == volumes::CONDITION);
    let volumes_condition =
        if resized_before || volumes::resize_asked(&kvc.spec.storage.size, seen.sts.as_ref()) {
            Some(resize_volumes(ctx, kvc, &seen.selector).await?)
        } else {
            None
        };
    let pdbs: Api<PodDisruptionBudget> = Api::namespaced(ctx.client.clone(), &r.ns);
    apply_or_delete(&pdbs, &objects::pdb_name(kvc), objects::pdb(kvc).as_ref()).await?;
    let nps: Api<NetworkPolicy> = Api::namespaced(ctx.client.clone(), &r.ns);
    let np = objects::network_policy(kvc, ctx.operator_namespace.as_deref());
    apply_or_delete(&nps, &objects::network_policy_name(kvc), np.as_ref()).await?;
    if pod_monitors_served(ctx).await {
        let monitors: Api<DynamicObject> =
            Api::namespaced_with(ctx.client.clone(), &r.ns, &objects::pod_monitor_resource());
        let pm = objects::pod_monitor(kvc);
        apply_or_delete(&monitors, &objects::pod_monitor_name(kvc), pm.as_ref()).await?;
    }
    for &ordinal in &r.kills {
        let pod = objects::pod_name(kvc, ordinal);
        // Gone already or not: the hold-down stands all the same.
        delete_pod(&r.pods, &pod).await?;
        info!(kvcluster = %name, %pod, "fault injection: pod deleted and held down");
        let mut note = format!(
            "node {ordinal} ({pod}) deleted and held Failed until removed from faultInjection.failedNodes"
        );
        if kvc.force_fault_injection() == Ok(true) {
            note.push_str(&format!(
                " (planned with force: {FORCE_FAULT_INJECTION} is \"true\")"
            ));
        }
        publish(
            ctx,
            kvc,
            EventType::Normal,
            "FaultInjected",
            "DeletePod",
            &note,
        )
        .await;
    }
    // A released node's pod waits on the held list it read at start; its
    // mounted copy changes only at the kubelet's next sync (a minute or
    // more), so the pod is deleted once, and the new one reads the list
    // just written.
    let held_now = kvc.desired().failed_nodes;
    for &ordinal in seen.was_held.difference(&held_now) {
        let pod = objects::pod_name(kvc, ordinal);
        if hibernated || !observed.nodes.get(&ordinal).is_some_and(|o| o.running) {
            continue;
        }
        if !delete_pod(&r.pods, &pod).await? {
            continue;
        }
        info!(kvcluster = %name, %pod, "hold-down released: pod deleted to restart with the current list");
        publish(
            ctx,
            kvc,
            EventType::Normal,
            "HoldReleased",
            "DeletePod",
            &format!("node {ordinal} ({pod}) released from faultInjection.failedNodes: its pod restarts and the node catches up"),
        )
        .await;
    }
    publish_transitions(ctx, kvc, &decision).await;
    let hibernation = hibernation::state(
        hibernated,
        decision.hibernation_deferred.as_deref(),
        seen.waking,
        &seen.not_back,
        previous,
    );
    publish_hibernation(ctx, kvc, hibernation.as_ref(), previous).await;
    let restart = restart_step(
        kvc,
        &decision,
        &seen.pods,
        observed,
        &seen.catching_up,
        hibernation.as_ref(),
        now,
        previous,
    );
    if let Some(ordinal) = restart.delete {
        let pod = objects::pod_name(kvc, ordinal);
        delete_pod(&r.pods, &pod).await?;
        info!(kvcluster = %name, %pod, "rolling restart: pod deleted");
    }
    if let Some((reason, note)) = &restart.event {
        publish(ctx, kvc, EventType::Normal, reason, "Restart", note).await;
    }

    super::record::status(
        r,
        kvc,
        &seen,
        &decision,
        hibernation,
        &restart,
        volumes_condition,
    )
    .await
}

/// Delete a pod; `false` when it was gone already.
async fn delete_pod(pods: &Api<Pod>, pod: &str) -> Result<bool, Error> {
    match pods.delete(pod, &DeleteParams::default()).await {
        Ok(_) => Ok(true),
        Err(e) if is_not_found(&e) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Nothing is applied: a condition and (once per generation) an Event say
/// why; `extra` conditions are shown with it.
#[allow(clippy::too_many_arguments)]
pub(super) async fn refuse(
    ctx: &Context,
    kvc: &KvCluster,
    kvcs: &Api<KvCluster>,
    previous: &KvClusterStatus,
    reason_code: &str,
    reason: &str,
    extra: Vec<Condition>,
    now: Timestamp,
) -> Result<(), Error> {
    let generation = kvc.meta().generation;
    let already = previous.observed_generation == generation
        && previous.phase == Some(Phase::Failed)
        && previous
            .conditions
            .iter()
            .any(|c| c.type_ == "Progressing" && c.reason == reason_code && c.message == reason);
    if !already {
        publish(
            ctx,
            kvc,
            EventType::Warning,
            reason_code,
            "Validate",
            reason,
        )
        .await;
    }
    let status = KvClusterStatus {
        phase: Some(Phase::Failed),
        observed_generation: generation,
        conditions: conditions_of(
            kvc,
            &previous.conditions,
            std::iter::once(cond("Progressing", false, reason_code, reason, generation))
                .chain(extra)
                .collect(),
            generation,
            now,
        ),
        ..previous.clone()
    };
    write_status(kvcs, kvc, &status).await
}

/// Whether PodMonitors can be made here (the Prometheus Operator's CRDs are
/// installed), asked of the API server's discovery at most once per
/// [`MONITORING_DISCOVERY_TTL`]. A failed question is not remembered.
async fn pod_monitors_served(ctx: &Context) -> bool {
    let Some(cache) = &ctx.pod_monitors else {
        return false;
    };
    if let Ok(c) = cache.lock()
        && let Some((at, served)) = *c
        && at.elapsed() < MONITORING_DISCOVERY_TTL
    {
        return served;
    }
    let resource = objects::pod_monitor_resource();
    let served = match ctx
        .client
        .list_api_group_resources(&resource.api_version)
        .await
    {
        Ok(list) => list.resources.iter().any(|r| r.name == resource.plural),
        Err(e) if is_not_found(&e) => false,
        Err(e) => {
            warn!(error = %e, "cannot tell whether PodMonitors are served; none made this time");
            return false;
        }
    };
    if let Ok(mut c) = cache.lock() {
        *c = Some((Instant::now(), served));
    }
    served
}

/// Grow the claims of `kvc` (those of label `selector`) to
/// `spec.storage.size` where their class allows it; the condition
/// [`volumes::CONDITION`] says how far it got (see [`volumes`]).
async fn resize_volumes(
    ctx: &Context,
    kvc: &KvCluster,
    selector: &str,
) -> Result<Condition, Error> {
    let ns = kvc.namespace().ok_or(Error::MissingNamespace)?;
    let generation = kvc.meta().generation;
    let want = &kvc.spec.storage.size;
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &ns);
    let claims = pvcs
        .list(&ListParams::default().labels(selector))
        .await?
        .items;
    let classes: Api<StorageClass> = Api::all(ctx.client.clone());
    let mut allows = BTreeMap::new();
    for class in claims.iter().filter_map(volumes::class_of) {
        if allows.contains_key(&class) {
            continue;
        }
        let allowed = get_opt(&classes, &class)
            .await?
            .and_then(|c| c.allow_volume_expansion)
            .unwrap_or(false);
        allows.insert(class, allowed);
    }
    let assessment = volumes::assess(want, &claims, &allows);
    let patch = serde_json::json!({"spec": {"resources": {"requests": {"storage": want}}}});
    for claim in &assessment.expand {
        match pvcs
            .patch(claim, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {
                info!(kvcluster = %kvc.name_any(), claim, size = %want, "resizing the volume claim");
            }
            // The API server's admission has the last word (e.g. a class
            // edited since it was read): say what it said.
            Err(kube::Error::Api(e)) if e.code == 403 || e.code == 422 => {
                return Ok(cond(
                    volumes::CONDITION,
                    false,
                    "ExpansionRefused",
                    &format!(
                        "the API server refused to resize {claim} to {want}: {}",
                        e.message
                    ),
                    generation,
                ));
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(cond(
        volumes::CONDITION,
        assessment.done,
        assessment.reason,
        &assessment.message,
        generation,
    ))
}

/// Keeps `<name>-ca` and `<name>-tls` (`spec.tls.mode: Generated`): the CA
/// made once, the certificate for pods `0..pods` issued again when
/// [`tls::reissue_reason`] says so (conditionally on the version read). A
/// CA Secret that is there but unusable is a problem for the status, never
/// replaced: certificates the nodes trust may chain to it.
async fn ensure_tls(
    kvc: &KvCluster,
    secrets: &Api<Secret>,
    ca_secret: Option<Secret>,
    tls_secret: Option<Secret>,
    pods: u32,
) -> Result<Option<String>, Error> {
    let name = kvc.name_any();
    let ca = match &ca_secret {
        Some(s) => match tls::ca_of(kvc, s) {
            Some(ca) => ca,
            None => {
                return Ok(Some(format!(
                    "Secret {} holds no usable CA ({} and {}); it is never replaced: delete it to have a new CA made",
                    tls::ca_secret_name(kvc),
                    tls::CA_CERT_KEY,
                    tls::CA_KEY_KEY
                )));
            }
        },
        None => {
            let (ca, s) = tls::new_ca(kvc).map_err(Error::Tls)?;
            secrets.create(&PostParams::default(), &s).await?;
            info!(kvcluster = %name, secret = %tls::ca_secret_name(kvc), "generated the cluster CA");
            ca
        }
    };
    let now = SystemTime::now();
    let Some(reason) = tls::reissue_reason(tls_secret.as_ref(), ca.cert_pem(), pods, now) else {
        return Ok(None);
    };
    let mut s = tls::cert_secret(kvc, &ca, pods, now).map_err(Error::Tls)?;
    match tls_secret {
        None => {
            secrets.create(&PostParams::default(), &s).await?;
        }
        Some(old) => {
            s.metadata.resource_version = old.metadata.resource_version;
            secrets
                .replace(&tls::tls_secret_name(kvc), &PostParams::default(), &s)
                .await?;
        }
    }
    info!(kvcluster = %name, secret = %tls::tls_secret_name(kvc), %reason, pods, "issued the nodes' certificate");
    Ok(None)
}

/// Write the topology ConfigMap only over the version it was planned from
/// (`stored`: `None` when there was none, then it is created): two
/// controllers overlapping across a leader change cannot both publish the
/// next epoch with different contents; the loser gets a conflict, and its
/// reconcile is retried from what the winner wrote.
async fn write_topology(
    cms: &Api<ConfigMap>,
    name: &str,
    mut cm: ConfigMap,
    stored: Option<Option<String>>,
) -> Result<(), Error> {
    match stored {
        Some(version) => {
            cm.metadata.resource_version = version;
            cms.replace(name, &PostParams::default(), &cm).await?;
        }
        None => {
            cms.create(&PostParams::default(), &cm).await?;
        }
    }
    Ok(())
}

/// The rolling restart's next step (see [`restart`]), from the pods and
/// reports this reconcile saw and the topology it planned.
#[allow(clippy::too_many_arguments)]
fn restart_step(
    kvc: &KvCluster,
    d: &Decision,
    pods: &[Pod],
    observed: &Observed,
    catching_up: &BTreeSet<u32>,
    hibernation: Option<&Hibernation>,
    now: Timestamp,
    previous: &KvClusterStatus,
) -> restart::Step {
    let mut nodes: BTreeMap<u32, restart::NodeView> = BTreeMap::new();
    for pod in pods {
        let Some(ordinal) = ordinal_of(&kvc.name_any(), &pod.name_any()) else {
            continue;
        };
        let v = nodes.entry(ordinal).or_default();
        v.pod_uid = pod.metadata.uid.clone();
        v.ready = pod_ready(pod) && pod.metadata.deletion_timestamp.is_none();
    }
    for (&ordinal, obs) in &observed.nodes {
        let v = nodes.entry(ordinal).or_default();
        v.report = obs.report.clone();
        v.store_catching_up = catching_up.contains(&ordinal);
    }
    let hold = match hibernation {
        Some(Hibernation::Hibernated) => Some("the cluster to wake up (spec.hibernation)"),
        Some(Hibernation::WakingUp(_)) => Some("the cluster to finish waking up"),
        _ if d.phase == Phase::Rebalancing || d.topology.pending.is_some() => {
            Some("the pending placement change to commit")
        }
        _ => None,
    };
    restart::step(
        restart::requested(kvc),
        previous.last_restart.as_ref(),
        &d.topology,
        &nodes,
        hold,
        &now.to_string(),
    )
}
