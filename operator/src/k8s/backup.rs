//! The `KvBackup` resource: a one-off backup of a KvCluster, taken by
//! kv-operator with [`kv_backup`] (what `kvctl backup` runs) to
//! `s3://bucket/prefix` or `file:///dir`.
//!
//! The operator reads the cluster's topology from a node's report, the
//! tokens and TLS material from the cluster's Secrets and the S3
//! credentials from the Secret the `KvBackup` names; it then pulls every
//! bucket from a quorum of its owners over the peer port, as `kvctl backup`
//! does. `status` shows the phase, the segments written so far, and at the
//! end the records, bytes and the manifest's epoch. A backup whose operator
//! went away while it ran starts again from the beginning (nothing is final
//! until the manifest is written, last); one that finished is never run
//! again. The spec cannot change: another backup is another `KvBackup`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::{Resource, ResourceExt};
use kv_backup::peer::PeerClient;
use kv_backup::target::{S3Options, Target};
use kv_backup::{Progress, TopologySource};
use kv_core::Topology;
use serde_json::json;
use tracing::{info, warn};

use super::controller::{Error, get_opt};
use super::crd::KvCluster;
use super::nodes::{NodeReports, fetch_report, node_client};
use super::objects;
use super::observe::{secret_token, tls_secrets};

pub use kv_crd::kvbackup::*;

/// The schedule's time to take now, if any: its latest time at or before
/// `now` that is after `last` (the newest time a KvBackup of the schedule
/// stands for) and not before `since` (when the cluster was made: no backup
/// of a time when it did not exist).
pub fn due(
    cron: &croner::Cron,
    now: chrono::DateTime<chrono::Utc>,
    last: Option<chrono::DateTime<chrono::Utc>>,
    since: chrono::DateTime<chrono::Utc>,
) -> Option<chrono::DateTime<chrono::Utc>> {
    let t = cron.find_previous_occurrence(&now, true).ok()?;
    (t >= since && last.is_none_or(|l| t > l)).then_some(t)
}

/// The KvBackup a schedule makes for its time `at`.
pub fn scheduled_backup(
    cluster: &str,
    schedule: &BackupSchedule,
    at: chrono::DateTime<chrono::Utc>,
) -> KvBackup {
    let name = format!("{cluster}-{}", at.format("%Y%m%d-%H%M%S"));
    let destination = format!("{}/{name}", schedule.destination.trim_end_matches('/'));
    let mut b = KvBackup::new(
        &name,
        KvBackupSpec {
            cluster: cluster.to_string(),
            destination,
            s3: schedule.s3.clone(),
        },
    );
    b.metadata.labels = Some(BTreeMap::from([(
        SCHEDULED_FOR.to_string(),
        cluster.to_string(),
    )]));
    b.metadata.annotations = Some(BTreeMap::from([(
        SCHEDULED_AT.to_string(),
        at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
    )]));
    b
}

/// How often the schedules are looked at: a backup starts within this of
/// its time.
pub const SCHEDULE_EVERY: Duration = Duration::from_secs(20);

/// What one look at a cluster's schedule did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Scheduled {
    /// The KvBackup made now.
    pub created: Option<String>,
    /// The KvBackups deleted (with their objects) beyond `keep`.
    pub pruned: Vec<String>,
    /// Why the schedule cannot be used. The cluster is reconciled as
    /// usual; only the schedule waits for a fix.
    pub invalid: Option<String>,
}

/// The scheduled KvBackups beyond the newest `keep` Completed ones, oldest
/// first. Only those a schedule made (the label, the scheduled time, and a
/// destination of their own: `.../<name>`) are ever candidates, so a backup
/// written elsewhere is never deleted by the schedule.
pub fn beyond_keep(mine: &[KvBackup], keep: u32) -> Vec<&KvBackup> {
    let mut done: Vec<(chrono::DateTime<chrono::Utc>, &KvBackup)> = mine
        .iter()
        .filter(|b| {
            b.status.as_ref().and_then(|s| s.phase) == Some(BackupPhase::Completed)
                && b.spec.destination.ends_with(&format!("/{}", b.name_any()))
        })
        .filter_map(|b| {
            let at = b.annotations().get(SCHEDULED_AT)?;
            let at = chrono::DateTime::parse_from_rfc3339(at).ok()?;
            Some((at.with_timezone(&chrono::Utc), b))
        })
        .collect();
    done.sort_by_key(|(at, _)| std::cmp::Reverse(*at));
    let mut old: Vec<&KvBackup> = done
        .into_iter()
        .skip(keep as usize)
        .map(|(_, b)| b)
        .collect();
    old.reverse();
    old
}

/// Makes the KvBackup that `kvc`'s schedule has due now, if any. The name is
/// the scheduled time's, so a second operator (or a retry) that makes it
/// again gets 409 AlreadyExists and nothing else happens.
pub async fn run_schedule(client: &kube::Client, kvc: &KvCluster) -> Result<Scheduled, Error> {
    let mut out = Scheduled::default();
    let Some(schedule) = kvc.spec.backup.as_ref().filter(|s| !s.suspend) else {
        return Ok(out);
    };
    let (Some(ns), Some(created)) = (kvc.namespace(), kvc.meta().creation_timestamp.as_ref())
    else {
        return Ok(out);
    };
    let cron = match schedule.validate() {
        Ok(c) => c,
        Err(why) => {
            out.invalid = Some(why);
            return Ok(out);
        }
    };
    let name = kvc.name_any();
    let api: Api<KvBackup> = Api::namespaced(client.clone(), &ns);
    let mine = api
        .list(&kube::api::ListParams::default().labels(&format!("{SCHEDULED_FOR}={name}")))
        .await?;
    let last = mine
        .items
        .iter()
        .filter_map(|b| b.annotations().get(SCHEDULED_AT))
        .filter_map(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        .map(|t| t.with_timezone(&chrono::Utc))
        .max();
    let since = chrono::DateTime::from_timestamp(created.0.as_second(), 0).unwrap_or_default();
    if let Some(at) = due(&cron, chrono::Utc::now(), last, since) {
        let b = scheduled_backup(&name, schedule, at);
        let pp = kube::api::PostParams {
            field_manager: Some(objects::MANAGER.to_string()),
            ..kube::api::PostParams::default()
        };
        match api.create(&pp, &b).await {
            Ok(_) => {
                info!(kvcluster = %name, namespace = %ns, kvbackup = %b.name_any(), scheduled = %at, "scheduled backup created");
                out.created = Some(b.name_any());
            }
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(e) => return Err(e.into()),
        }
    }
    if let Some(keep) = schedule.keep {
        let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
        for old in beyond_keep(&mine.items, keep) {
            let old_name = old.name_any();
            // Objects first: a KvBackup is deleted only once nothing of it
            // is left behind, so a failure is retried at the next look.
            let deleted = match open_target(&secrets, &old.spec).await {
                Ok(t) => t.delete_all().await.map_err(|e| e.to_string()),
                Err(e) => Err(e),
            };
            match deleted {
                Ok(n) => {
                    api.delete(&old_name, &Default::default()).await?;
                    info!(kvcluster = %name, namespace = %ns, kvbackup = %old_name, objects = n, keep, "old scheduled backup deleted");
                    out.pruned.push(old_name);
                }
                Err(e) => {
                    warn!(kvcluster = %name, kvbackup = %old_name, error = %e, "cannot delete an old scheduled backup's objects; kept for now");
                }
            }
        }
    }
    Ok(out)
}

/// How often a running backup's progress is written to its status.
pub const PROGRESS_EVERY: Duration = Duration::from_secs(2);
/// How long a node call of a backup may take: a bucket pull of a large
/// bucket takes longer than a point request.
const PEER_TIMEOUT: Duration = Duration::from_secs(60);

/// What the KvBackup controller needs.
pub struct BackupContext {
    pub client: kube::Client,
    /// Where the nodes' reports are (the KvCluster controller's); `None`
    /// when node reports are off, and then no backup can run.
    pub node_reports: Option<NodeReports>,
    /// Backups this process ran or runs, by `namespace/name/uid`.
    runs: Mutex<BTreeMap<String, Run>>,
}

/// A backup this process took up.
#[derive(Clone)]
enum Run {
    Running(Arc<Progress>),
    /// Its final status is written (or was tried): the cache may still
    /// show it Running for a moment, and it must not start again.
    Done,
}

impl BackupContext {
    pub fn new(client: kube::Client, node_reports: Option<NodeReports>) -> BackupContext {
        BackupContext {
            client,
            node_reports,
            runs: Mutex::new(BTreeMap::new()),
        }
    }

    fn runs(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Run>> {
        // A panic while holding it leaves a map that is still consistent.
        self.runs.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn now() -> String {
    Timestamp::now().to_string()
}

fn key_of(b: &KvBackup) -> String {
    format!(
        "{}/{}/{}",
        b.namespace().unwrap_or_default(),
        b.name_any(),
        b.uid().unwrap_or_default()
    )
}

async fn patch_status(
    api: &Api<KvBackup>,
    name: &str,
    status: serde_json::Value,
) -> Result<(), Error> {
    api.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({ "status": status })),
    )
    .await?;
    Ok(())
}

/// Reconciles one `KvBackup`: starts it, shows its progress while it runs
/// here, and leaves it alone once it completed or failed.
pub async fn reconcile(b: Arc<KvBackup>, ctx: Arc<BackupContext>) -> Result<Action, Error> {
    let ns = b.namespace().ok_or(Error::MissingNamespace)?;
    let name = b.name_any();
    let api: Api<KvBackup> = Api::namespaced(ctx.client.clone(), &ns);
    let status = b.status.clone().unwrap_or_default();
    if matches!(
        status.phase,
        Some(BackupPhase::Completed | BackupPhase::Failed)
    ) {
        return Ok(Action::await_change());
    }
    let key = key_of(&b);
    let run = ctx.runs().get(&key).cloned();
    if let Some(Run::Done) = run {
        return Ok(Action::await_change());
    }
    if let Some(Run::Running(p)) = run {
        let n = p.now();
        patch_status(
            &api,
            &name,
            json!({
                "segmentsDone": n.segments_done,
                "segments": n.segments,
                "records": n.records,
                "bytes": n.bytes,
            }),
        )
        .await?;
        return Ok(Action::requeue(PROGRESS_EVERY));
    }
    // Not running here: never started, or started by an operator that went
    // away before it finished. Either way it runs (again) from the start.
    let progress = Arc::new(Progress::default());
    ctx.runs()
        .insert(key.clone(), Run::Running(progress.clone()));
    if let Err(e) = patch_status(
        &api,
        &name,
        json!({
            "phase": BackupPhase::Running,
            "startedAt": now(),
            "finishedAt": null,
            "segmentsDone": 0,
            "segments": progress.now().segments,
            "records": 0,
            "bytes": 0,
            "message": format!("backing up KvCluster {} to {}", b.spec.cluster, b.spec.destination),
        }),
    )
    .await
    {
        ctx.runs().remove(&key);
        return Err(e);
    }
    info!(kvbackup = %name, namespace = %ns, cluster = %b.spec.cluster, destination = %b.spec.destination, "backup started");
    let task_ctx = ctx.clone();
    tokio::spawn(async move {
        let result = take(&task_ctx, &b, &ns, &progress).await;
        let status = match result {
            Ok(m) => {
                info!(kvbackup = %name, namespace = %ns, records = m.records, bytes = m.bytes, epoch = m.epoch, "backup completed");
                json!({
                    "phase": BackupPhase::Completed,
                    "finishedAt": now(),
                    "segmentsDone": m.segments.len(),
                    "records": m.records,
                    "bytes": m.bytes,
                    "clusterId": m.cluster_id,
                    "epoch": m.epoch,
                    "message": format!(
                        "{} records ({} tombstones), {} bytes at epoch {} in {}",
                        m.records, m.tombstones, m.bytes, m.epoch, b.spec.destination
                    ),
                })
            }
            Err(why) => {
                warn!(kvbackup = %name, namespace = %ns, error = %why, "backup failed");
                json!({
                    "phase": BackupPhase::Failed,
                    "finishedAt": now(),
                    "message": why,
                })
            }
        };
        // The final status, tried a few times: a lost write would leave the
        // backup Running until an operator restart ran it again.
        for attempt in 1..=5u64 {
            match patch_status(&api, &name, status.clone()).await {
                Ok(()) => break,
                // deleted while it ran: nobody to tell
                Err(Error::Kube(kube::Error::Api(s))) if s.code == 404 => break,
                Err(e) => {
                    warn!(kvbackup = %name, namespace = %ns, error = %e, attempt, "cannot write the backup's final status");
                    tokio::time::sleep(Duration::from_secs(attempt)).await;
                }
            }
        }
        task_ctx.runs().insert(key, Run::Done);
    });
    Ok(Action::requeue(PROGRESS_EVERY))
}

pub fn error_policy(_b: Arc<KvBackup>, e: &Error, _ctx: Arc<BackupContext>) -> Action {
    warn!(error = %e, "KvBackup reconcile failed");
    Action::requeue(Duration::from_secs(5))
}

/// The topology of a cluster: the newest among its nodes' reports.
struct Reports {
    http: reqwest::Client,
    urls: Vec<String>,
    token: String,
}

impl TopologySource for Reports {
    async fn topology(&self) -> Result<Topology, String> {
        let reports = futures::future::join_all(
            self.urls
                .iter()
                .map(|u| fetch_report(&self.http, u, &self.token)),
        )
        .await;
        reports
            .into_iter()
            .flatten()
            .map(|r| r.topology)
            .max_by_key(|t| t.epoch)
            .ok_or_else(|| "no node of the cluster answered with its report".to_string())
    }
}

/// Opens a KvBackup's destination, with the S3 credentials of the Secret
/// it names (in `secrets`' namespace); the error says what is missing.
async fn open_target(secrets: &Api<Secret>, spec: &KvBackupSpec) -> Result<Target, String> {
    let Some(s3) = &spec.s3 else {
        return Target::open(&spec.destination).map_err(|e| e.to_string());
    };
    let mut options = S3Options {
        endpoint: s3.endpoint.clone(),
        region: s3.region.clone(),
        ..S3Options::default()
    };
    if let Some(name) = &s3.credentials_secret {
        let s = get_opt(secrets, name)
            .await
            .map_err(|e| format!("cannot read Secret {name}: {e}"))?
            .ok_or_else(|| format!("Secret {name} (s3.credentialsSecret) does not exist"))?;
        let (id, key) = s3_key_pair(&s)?;
        options.access_key_id = Some(id);
        options.secret_access_key = Some(key);
    }
    Target::open_with(&spec.destination, &options).map_err(|e| e.to_string())
}

/// The access key id and secret of an `s3.credentialsSecret`, or which key
/// it lacks.
pub(super) fn s3_key_pair(s: &Secret) -> Result<(String, String), String> {
    let name = s.name_any();
    let key = |k: &str| {
        s.data
            .as_ref()
            .and_then(|d| d.get(k))
            .and_then(|v| String::from_utf8(v.0.clone()).ok())
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
            .ok_or_else(|| format!("Secret {name} has no {k}"))
    };
    Ok((key(ACCESS_KEY_ID)?, key(SECRET_ACCESS_KEY)?))
}

/// Runs the backup; the error is the status message.
async fn take(
    ctx: &BackupContext,
    b: &KvBackup,
    ns: &str,
    progress: &Progress,
) -> Result<kv_backup::manifest::Manifest, String> {
    let reports = ctx.node_reports.as_ref().ok_or(
        "kv-operator runs with node reports off (--no-node-reports): it cannot reach the nodes",
    )?;
    let kvcs: Api<KvCluster> = Api::namespaced(ctx.client.clone(), ns);
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    let api_err = |what: &str, e: Error| format!("cannot read {what}: {e}");
    let kvc = get_opt(&kvcs, &b.spec.cluster)
        .await
        .map_err(|e| api_err("the KvCluster", e))?
        .ok_or_else(|| format!("KvCluster {} does not exist in {ns}", b.spec.cluster))?;
    let secret = |name: String| {
        let secrets = secrets.clone();
        async move {
            get_opt(&secrets, &name)
                .await
                .map_err(|e| api_err(&format!("Secret {name}"), e))
        }
    };
    let token = secret_token(
        secret(objects::auth_secret_name(&kvc)).await?.as_ref(),
        objects::TOKEN_KEY,
    )
    .ok_or("the cluster's client token Secret is missing or holds no token")?;
    let cluster_token = secret_token(
        secret(objects::cluster_auth_secret_name(&kvc))
            .await?
            .as_ref(),
        objects::CLUSTER_TOKEN_KEY,
    )
    .ok_or("the cluster's cluster token Secret is missing or holds no token")?;
    let (ca, tls) = tls_secrets(&secrets, &kvc)
        .await
        .map_err(|e| api_err("the cluster's TLS Secrets", e))?;
    let http = node_client(reports, &kvc, ca.as_ref(), tls.as_ref()).ok_or(
        "cannot build a client for the cluster's nodes (its TLS Secrets are missing or unusable)",
    )?;
    let peer_tls = match (ca.as_ref(), tls.as_ref()) {
        (Some(ca), Some(tls)) => Some(
            super::tls::client_config(ca, tls)
                .map_err(|e| format!("the cluster's TLS Secrets are unusable: {e}"))?,
        ),
        _ => None,
    };
    let peers = PeerClient::with_config(cluster_token, PEER_TIMEOUT, peer_tls)
        .map_err(|e| e.to_string())?;
    let source = Reports {
        http,
        urls: (0..kvc.spec.replicas)
            .map(|o| (reports.url)(&kvc, o))
            .collect(),
        token,
    };
    let target = open_target(&secrets, &b.spec).await?;
    kv_backup::backup(&source, &peers, &target, progress)
        .await
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> chrono::DateTime<chrono::Utc> {
        chrono::DateTime::parse_from_rfc3339(s)
            .expect("time")
            .with_timezone(&chrono::Utc)
    }

    fn schedule(cron: &str) -> BackupSchedule {
        BackupSchedule {
            schedule: cron.into(),
            destination: "s3://b/nightly/".into(),
            ..BackupSchedule::default()
        }
    }

    #[test]
    fn a_schedule_is_due_once_per_time_and_never_before_the_cluster() {
        let cron = schedule("0 3 * * *").cron().expect("parses");
        let since = at("2026-12-01T10:00:00Z");
        // the latest time at or before now, when no backup stands for it yet
        assert_eq!(
            due(&cron, at("2026-12-04T08:30:00Z"), None, since),
            Some(at("2026-12-04T03:00:00Z"))
        );
        // taken already: nothing until the next time
        let last = Some(at("2026-12-04T03:00:00Z"));
        assert_eq!(due(&cron, at("2026-12-04T08:30:00Z"), last, since), None);
        assert_eq!(
            due(&cron, at("2026-12-05T03:00:00Z"), last, since),
            Some(at("2026-12-05T03:00:00Z"))
        );
        // two days missed: only the latest is taken
        assert_eq!(
            due(&cron, at("2026-12-07T04:00:00Z"), last, since),
            Some(at("2026-12-07T03:00:00Z"))
        );
        // a cluster made after today's time waits for tomorrow's
        assert_eq!(due(&cron, at("2026-12-01T11:00:00Z"), None, since), None);
    }

    #[test]
    fn a_scheduled_backup_is_named_and_placed_by_its_time() {
        let b = scheduled_backup("demo", &schedule("0 3 * * *"), at("2026-12-04T03:00:00Z"));
        assert_eq!(b.name_any(), "demo-20261204-030000");
        assert_eq!(b.spec.cluster, "demo");
        assert_eq!(b.spec.destination, "s3://b/nightly/demo-20261204-030000");
        assert_eq!(
            b.labels().get(SCHEDULED_FOR).map(String::as_str),
            Some("demo")
        );
        assert_eq!(
            b.annotations().get(SCHEDULED_AT).map(String::as_str),
            Some("2026-12-04T03:00:00Z")
        );
    }

    #[test]
    fn schedules_that_are_not_five_field_cron_are_refused_with_the_reason() {
        for ok in ["0 3 * * *", "*/15 * * * *", "0 0 * * SUN", "@daily"] {
            assert!(schedule(ok).validate().is_ok(), "{ok} refused");
        }
        for bad in ["", "0 3 * *", "0 0 3 * * *", "61 * * * *", "daily"] {
            let e = schedule(bad).validate().expect_err(bad);
            assert!(e.contains("backup.schedule"), "{bad}: {e}");
        }
        let mut s = schedule("0 3 * * *");
        s.destination = "gs://b/x".into();
        assert!(s.validate().expect_err("gs").contains("backup.destination"));
    }

    fn done(b: KvBackup, phase: BackupPhase) -> KvBackup {
        KvBackup {
            status: Some(KvBackupStatus {
                phase: Some(phase),
                ..KvBackupStatus::default()
            }),
            ..b
        }
    }

    #[test]
    fn beyond_keep_deletes_the_oldest_completed_scheduled_backups_only() {
        let s = schedule("0 3 * * *");
        let b = |day: u32, phase| {
            done(
                scheduled_backup("demo", &s, at(&format!("2026-12-0{day}T03:00:00Z"))),
                phase,
            )
        };
        let mut elsewhere = b(1, BackupPhase::Completed);
        elsewhere.spec.destination = "s3://b/shared".into();
        let mine = vec![
            b(5, BackupPhase::Completed),
            b(2, BackupPhase::Completed),
            b(4, BackupPhase::Failed),
            b(3, BackupPhase::Completed),
            b(6, BackupPhase::Running),
            elsewhere,
        ];
        let names = |keep| {
            beyond_keep(&mine, keep)
                .iter()
                .map(|b| b.name_any())
                .collect::<Vec<_>>()
        };
        assert_eq!(names(1), ["demo-20261202-030000", "demo-20261203-030000"]);
        assert_eq!(names(2), ["demo-20261202-030000"]);
        assert!(names(3).is_empty());
    }

    #[test]
    fn a_spec_reads_with_and_without_s3_settings() {
        let s: KvBackupSpec =
            serde_yaml::from_str("{cluster: demo, destination: 'file:///var/backups/a'}")
                .expect("parses");
        assert_eq!(s.s3, None);
        let s: KvBackupSpec = serde_yaml::from_str(
            "{cluster: demo, destination: 's3://b/p', s3: {endpoint: 'http://s3:9000', credentialsSecret: creds}}",
        )
        .expect("parses");
        let s3 = s.s3.expect("s3");
        assert_eq!(s3.endpoint.as_deref(), Some("http://s3:9000"));
        assert_eq!(s3.credentials_secret.as_deref(), Some("creds"));
        assert_eq!(s3.region, None);
    }
}
