//! The `KvBackup` resource (a one-off backup of a KvCluster, taken by
//! kv-operator) and `KvCluster.spec.backup` (backups on a schedule).

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A one-off backup of a KvCluster in the same namespace.
// Every `printcolumn(...)` repeats `type_ = ...`, which clippy mistakes for a duplicated attribute.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "kvstore.dev",
    version = "v1alpha1",
    kind = "KvBackup",
    namespaced,
    shortname = "kvb",
    category = "kvstore",
    status = "KvBackupStatus",
    derive = "PartialEq",
    doc = "A one-off backup of a KvCluster to a directory or S3-compatible object storage, taken by kv-operator.",
    printcolumn(name = "Cluster", type_ = "string", json_path = ".spec.cluster"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Records", type_ = "integer", json_path = ".status.records"),
    printcolumn(name = "Bytes", type_ = "integer", json_path = ".status.bytes"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[x_kube(validation = Rule::new("self == oldSelf").message("a KvBackup's spec cannot change: create another KvBackup"))]
#[x_kube(validation = Rule::new(
    "self.destination.startsWith('s3://') || self.destination.startsWith('file:///')"
).message("destination is s3://bucket/prefix or file:///absolute/dir").field_path(".destination"))]
#[serde(rename_all = "camelCase")]
pub struct KvBackupSpec {
    /// The KvCluster to back up, in this namespace.
    #[schemars(length(min = 1, max = 63))]
    pub cluster: String,
    /// Where the backup goes: `s3://bucket/prefix`, or `file:///dir` (a
    /// directory of the operator's filesystem). It must not hold a backup
    /// yet.
    #[schemars(length(min = 8, max = 1024))]
    pub destination: String,
    /// How to reach an `s3://` destination; when absent, the operator's
    /// own AWS_* environment says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s3: Option<S3Settings>,
}

/// An S3-compatible server and the Secret of its credentials.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct S3Settings {
    /// `http(s)://host:port` of an S3-compatible server; AWS when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// The region (`us-east-1` when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// A Secret in this namespace with the keys `accessKeyId` and
    /// `secretAccessKey`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret: Option<String>,
}

/// Backups on a schedule (`KvCluster.spec.backup`): at each time of
/// `schedule` the operator creates a KvBackup named
/// `<cluster>-<YYYYMMDD-HHMMSS>` (the scheduled time, UTC) that writes to
/// `<destination>/<that name>`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackupSchedule {
    /// A five-field cron expression in UTC (`0 3 * * *`: every day at
    /// 03:00), or `@hourly`, `@daily`, `@weekly`, `@monthly`. A time missed
    /// (the operator was down) is taken once when it comes back; older
    /// misses are skipped.
    #[schemars(length(min = 1, max = 100))]
    pub schedule: String,
    /// `s3://bucket/prefix` or `file:///dir`: each backup goes to a
    /// location of its own under it.
    #[schemars(length(min = 8, max = 900))]
    pub destination: String,
    /// As a KvBackup's `s3`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s3: Option<S3Settings>,
    /// No new scheduled backups while true.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub suspend: bool,
    /// Keep this many Completed scheduled backups: older ones are deleted,
    /// their objects first, then the KvBackup. All are kept when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10000))]
    pub keep: Option<u32>,
}

impl BackupSchedule {
    /// The parsed schedule, or why it is not one.
    pub fn cron(&self) -> Result<croner::Cron, String> {
        let s = self.schedule.trim();
        if !s.starts_with('@') && s.split_whitespace().count() != 5 {
            return Err(format!(
                "backup.schedule {s:?} is not a five-field cron expression (minute hour day-of-month month day-of-week)"
            ));
        }
        s.parse::<croner::Cron>()
            .map_err(|e| format!("backup.schedule {s:?} is not a cron expression: {e}"))
    }

    /// The parsed schedule, once the schedule and the destination are
    /// both usable; otherwise why not.
    pub fn validate(&self) -> Result<croner::Cron, String> {
        let cron = self.cron()?;
        let d = self.destination.trim_end_matches('/');
        kv_backup::target::parse(&format!("{d}/x"))
            .map_err(|e| format!("backup.destination: {e}"))?;
        Ok(cron)
    }
}

/// Label of the KvBackups a schedule made: the KvCluster's name.
pub const SCHEDULED_FOR: &str = "kvstore.dev/scheduled-for";
/// Annotation of such a KvBackup: the scheduled time it stands for (RFC 3339).
pub const SCHEDULED_AT: &str = "kvstore.dev/scheduled-at";

/// The credentials Secret's keys.
pub const ACCESS_KEY_ID: &str = "accessKeyId";
pub const SECRET_ACCESS_KEY: &str = "secretAccessKey";

/// Where a backup is.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum BackupPhase {
    Running,
    Completed,
    Failed,
}

/// What the operator did with a `KvBackup`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KvBackupStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<BackupPhase>,
    /// When this run of the backup started (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<String>,
    /// When it completed or failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<String>,
    /// Data objects written, of `segments`.
    #[serde(default)]
    pub segments_done: u32,
    #[serde(default)]
    pub segments: u32,
    /// Records (tombstones included) and bytes written so far; at the end,
    /// the manifest's.
    #[serde(default)]
    pub records: u64,
    #[serde(default)]
    pub bytes: u64,
    /// The backed-up cluster's id and topology epoch (the manifest's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<u64>,
    /// Why it failed, or what it wrote.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// Prints the KvBackup CRD (checked in as `deploy/crd-kvbackup.yaml`).
pub fn crd_yaml() -> Result<String, serde_yaml::Error> {
    use kube::CustomResourceExt;
    serde_yaml::to_string(&KvBackup::crd())
}
