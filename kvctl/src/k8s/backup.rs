//! `kvctl backup --cluster NAME --to URL`: a `KvBackup` for kv-operator to
//! take, and the wait until its status says Completed or Failed.

use std::time::{Duration, Instant};

use kube::api::{Api, ObjectMeta, PostParams};
use kv_operator::k8s::backup::{BackupPhase, KvBackup, KvBackupSpec, S3Settings};

use super::{FIELD_MANAGER, KubeError, Target};
use crate::client::error_chain;

/// What `backup --cluster` asks for.
#[derive(Clone, Debug, Default)]
pub struct BackupRequest {
    /// The KvBackup's name; `<cluster>-<UTC time>` when `None`.
    pub name: Option<String>,
    pub destination: String,
    pub s3: Option<S3Settings>,
}

/// A KvBackup's default name: the cluster's, then the UTC time to the
/// second (`demo-20261204-083015`).
pub fn default_backup_name(cluster: &str, now: k8s_openapi::jiff::Timestamp) -> String {
    format!("{cluster}-{}", now.strftime("%Y%m%d-%H%M%S"))
}

impl Target {
    fn backups(&self) -> Api<KvBackup> {
        Api::namespaced(self.api.clone().into_client(), &self.namespace)
    }

    fn backup_error(&self, verb: &'static str, name: &str, e: kube::Error) -> KubeError {
        match e {
            kube::Error::Api(s) if s.code == 403 => KubeError::Forbidden {
                verb,
                resource: "kvbackups.kvstore.dev",
                namespace: self.namespace.clone(),
                message: s.message,
            },
            kube::Error::Api(s) if s.code == 401 => KubeError::Unauthorized { message: s.message },
            kube::Error::Api(s) => KubeError::Backup {
                verb,
                name: name.to_string(),
                message: format!("{} ({} {})", s.message, s.code, s.reason),
            },
            other => KubeError::Backup {
                verb,
                name: name.to_string(),
                message: error_chain(&other),
            },
        }
    }

    /// Creates the KvBackup of this cluster; the KvCluster must exist.
    pub async fn create_backup(&self, req: &BackupRequest) -> Result<KvBackup, KubeError> {
        self.get().await?;
        let name = req.name.clone().unwrap_or_else(|| {
            default_backup_name(&self.name, k8s_openapi::jiff::Timestamp::now())
        });
        let b = KvBackup {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(self.namespace.clone()),
                ..ObjectMeta::default()
            },
            spec: KvBackupSpec {
                cluster: self.name.clone(),
                destination: req.destination.clone(),
                s3: req.s3.clone(),
            },
            status: None,
        };
        let pp = PostParams {
            field_manager: Some(FIELD_MANAGER.to_string()),
            ..PostParams::default()
        };
        self.backups()
            .create(&pp, &b)
            .await
            .map_err(|e| self.backup_error("create", &name, e))
    }

    /// The KvBackup `name` as stored now.
    pub async fn get_backup(&self, name: &str) -> Result<KvBackup, KubeError> {
        self.backups()
            .get(name)
            .await
            .map_err(|e| self.backup_error("get", name, e))
    }

    /// Polls the KvBackup until it completed or failed, or `limit` passed
    /// (then the last one read, still Running or not started).
    pub async fn wait_backup(
        &self,
        name: &str,
        limit: Duration,
        call_timeout: Duration,
    ) -> Result<KvBackup, KubeError> {
        let start = Instant::now();
        loop {
            let b = self.within(call_timeout, self.get_backup(name)).await?;
            let done = matches!(
                b.status.as_ref().and_then(|s| s.phase),
                Some(BackupPhase::Completed | BackupPhase::Failed)
            );
            if done || start.elapsed() >= limit {
                return Ok(b);
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

/// One line on a KvBackup: its phase and what its status says.
pub fn render_backup(b: &KvBackup) -> String {
    let name = b.metadata.name.as_deref().unwrap_or("?");
    let Some(s) = &b.status else {
        return format!("KvBackup {name}: not started yet (is kv-operator running?)\n");
    };
    let phase = match s.phase {
        Some(BackupPhase::Running) => "Running",
        Some(BackupPhase::Completed) => "Completed",
        Some(BackupPhase::Failed) => "Failed",
        None => "Pending",
    };
    let detail = match s.phase {
        Some(BackupPhase::Running) => format!(
            "{} of {} segments, {} records, {} bytes so far",
            s.segments_done, s.segments, s.records, s.bytes
        ),
        _ => s.message.clone().unwrap_or_default(),
    };
    format!("KvBackup {name} {phase}: {detail}\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use kv_operator::k8s::backup::KvBackupStatus;

    #[test]
    fn the_default_name_is_the_cluster_and_the_utc_second() {
        let t: k8s_openapi::jiff::Timestamp = "2026-12-04T08:30:15Z".parse().expect("time");
        assert_eq!(default_backup_name("demo", t), "demo-20261204-083015");
    }

    #[test]
    fn a_backup_renders_by_phase() {
        let mut b = KvBackup::new(
            "demo-1",
            KvBackupSpec {
                cluster: "demo".into(),
                destination: "s3://b/p".into(),
                s3: None,
            },
        );
        assert!(render_backup(&b).contains("not started yet"));
        b.status = Some(KvBackupStatus {
            phase: Some(BackupPhase::Running),
            segments_done: 3,
            segments: 64,
            records: 10,
            bytes: 99,
            ..KvBackupStatus::default()
        });
        assert_eq!(
            render_backup(&b),
            "KvBackup demo-1 Running: 3 of 64 segments, 10 records, 99 bytes so far\n"
        );
        b.status = Some(KvBackupStatus {
            phase: Some(BackupPhase::Failed),
            message: Some("no node answered".into()),
            ..KvBackupStatus::default()
        });
        assert_eq!(
            render_backup(&b),
            "KvBackup demo-1 Failed: no node answered\n"
        );
    }
}
