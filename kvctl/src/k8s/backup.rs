//! `kvctl backup --cluster NAME --to URL`: a `KvBackup` for kv-operator to
//! take, and the wait until its status says Completed or Failed.
//! `kvctl restore --cluster NAME --from URL`: a new KvCluster started from
//! the backup (`spec.bootstrap.fromBackup`), and the wait until it is
//! Restored.

use std::time::{Duration, Instant};

use kube::api::{Api, ObjectMeta, PostParams};
use kv_crd::KvClusterSpec;
use kv_crd::bootstrap::{Bootstrap, BootstrapPhase, FromBackup};
use kv_crd::kvbackup::{BackupPhase, KvBackup, KvBackupSpec, S3Settings};
use kv_crd::kvcluster::{KvCluster, TlsMode};

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

/// What `restore --cluster` asks for.
#[derive(Clone, Debug, Default)]
pub struct RestoreRequest {
    pub from: String,
    pub s3: Option<S3Settings>,
    /// The spec is taken from this KvCluster's.
    pub like: Option<KvClusterSpec>,
    /// The KvCluster to take the spec from (read by `create_restored`).
    pub like_name: Option<String>,
    pub replicas: Option<u32>,
    pub strategy: Option<kv_core::Strategy>,
    pub factor: Option<u32>,
}

/// The new KvCluster's spec: `like`'s (or the defaults), with what belongs
/// to that other cluster alone left out, the overrides, and the bootstrap.
pub fn restored_spec(req: &RestoreRequest) -> KvClusterSpec {
    let mut spec = req.like.clone().unwrap_or_default();
    spec.backup = None;
    spec.fault_injection = Default::default();
    spec.hibernation = false;
    spec.auth_secret_name = None;
    if spec.tls.mode == TlsMode::Provided {
        // its certificate names the other cluster's pods
        spec.tls.mode = TlsMode::Generated;
        spec.tls.secret_name = None;
    }
    if let Some(n) = req.replicas {
        spec.replicas = n;
    }
    if let Some(s) = req.strategy {
        spec.replication.strategy = s;
    }
    if let Some(f) = req.factor {
        spec.replication.factor = f;
    }
    spec.bootstrap = Some(Bootstrap {
        from_backup: FromBackup {
            destination: req.from.clone(),
            s3: req.s3.clone(),
        },
    });
    spec
}

impl Target {
    /// Creates KvCluster `self.name` started from the backup; it must not
    /// exist (a running cluster is restored into with `kvctl restore
    /// --endpoint`).
    pub async fn create_restored(&self, req: &RestoreRequest) -> Result<KvCluster, KubeError> {
        let mut req = req.clone();
        if let Some(like) = &req.like_name {
            let other: Api<KvCluster> =
                Api::namespaced(self.api.clone().into_client(), &self.namespace);
            let kvc = other.get(like).await.map_err(|e| match e {
                kube::Error::Api(s) if s.code == 404 => KubeError::NotFound {
                    name: like.clone(),
                    namespace: self.namespace.clone(),
                },
                other => self.error("get", other),
            })?;
            req.like = Some(kvc.spec);
        }
        let kvc = KvCluster {
            metadata: ObjectMeta {
                name: Some(self.name.clone()),
                namespace: Some(self.namespace.clone()),
                ..ObjectMeta::default()
            },
            spec: restored_spec(&req),
            status: None,
        };
        let pp = PostParams {
            field_manager: Some(FIELD_MANAGER.to_string()),
            ..PostParams::default()
        };
        self.api.create(&pp, &kvc).await.map_err(|e| match e {
            kube::Error::Api(s) if s.code == 409 => KubeError::Exists {
                name: self.name.clone(),
                namespace: self.namespace.clone(),
            },
            other => self.error("create", other),
        })
    }

    /// Polls the KvCluster until its status says Restored, or `limit`
    /// passed (then the last one read).
    pub async fn wait_restored(
        &self,
        limit: Duration,
        call_timeout: Duration,
    ) -> Result<KvCluster, KubeError> {
        let start = Instant::now();
        loop {
            let kvc = self.within(call_timeout, self.get()).await?;
            if restored(&kvc) || start.elapsed() >= limit {
                return Ok(kvc);
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

/// Whether the KvCluster's status says every node has loaded the backup.
pub fn restored(kvc: &KvCluster) -> bool {
    kvc.status
        .as_ref()
        .and_then(|s| s.bootstrap.as_ref())
        .is_some_and(|b| b.phase == BootstrapPhase::Restored)
}

/// One line on a KvCluster started from a backup.
pub fn render_restore(kvc: &KvCluster) -> String {
    let name = kvc.metadata.name.as_deref().unwrap_or("?");
    let status = kvc.status.clone().unwrap_or_default();
    let Some(b) = &status.bootstrap else {
        return format!("KvCluster {name}: not reconciled yet (is kv-operator running?)\n");
    };
    let up = status
        .nodes
        .iter()
        .filter(|n| n.state == kv_core::NodeState::Up)
        .count();
    match (b.phase, &b.message) {
        (BootstrapPhase::Restored, _) => format!(
            "KvCluster {name} Restored from {}: every node loaded its buckets and is Up{}\n",
            b.source,
            b.finished_at
                .as_ref()
                .map_or(String::new(), |at| format!(" (at {at})"))
        ),
        (BootstrapPhase::Restoring, Some(m)) => {
            format!("KvCluster {name} Restoring from {}: {m}\n", b.source)
        }
        (BootstrapPhase::Restoring, None) => format!(
            "KvCluster {name} Restoring from {}: {up} of {} nodes Up\n",
            b.source, kvc.spec.replicas
        ),
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
    use kv_crd::kvbackup::KvBackupStatus;

    #[test]
    fn a_restored_spec_is_the_other_clusters_without_what_belongs_to_it_alone() {
        let like: KvClusterSpec = serde_yaml::from_str(
            "{replicas: 5, image: 'kvstore/kv-node:1.2', replication: {factor: 3, strategy: ConsistentHashing},
              storage: {size: 5Gi}, hibernation: true, authSecretName: prod-auth,
              tls: {mode: Provided, secretName: prod-cert},
              faultInjection: {failedNodes: [1]},
              backup: {schedule: '@daily', destination: 's3://b/prod'}}",
        )
        .expect("spec");
        let spec = restored_spec(&RestoreRequest {
            from: "s3://b/prod/x".into(),
            like: Some(like),
            factor: Some(2),
            ..RestoreRequest::default()
        });
        assert_eq!(spec.replicas, 5);
        assert_eq!(spec.image, "kvstore/kv-node:1.2");
        assert_eq!(spec.replication.factor, 2);
        assert_eq!(spec.storage.size, "5Gi");
        assert!(!spec.hibernation && spec.backup.is_none() && spec.auth_secret_name.is_none());
        assert!(spec.fault_injection.failed_nodes.is_empty());
        assert_eq!(spec.tls.mode, TlsMode::Generated);
        assert_eq!(spec.tls.secret_name, None);
        let b = spec.bootstrap.expect("bootstrap");
        assert_eq!(b.from_backup.destination, "s3://b/prod/x");
        let plain = restored_spec(&RestoreRequest {
            from: "file:///b".into(),
            ..RestoreRequest::default()
        });
        assert_eq!(plain.replicas, KvClusterSpec::default().replicas);
    }

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
