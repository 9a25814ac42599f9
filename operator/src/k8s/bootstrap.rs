//! A new cluster started from a backup (`spec.bootstrap.fromBackup`).
//!
//! The nodes do the work (kv-node `--restore-from`): a new store loads the
//! buckets it keeps from the backup, checked against the manifest, before
//! it catches up with its peers, and is Recovering, serving nothing, until
//! then. The operator hands the source to the nodes through the Secret
//! `<name>-bootstrap` (the URL and, for S3, the endpoint, region and the
//! credentials copied from `s3.credentialsSecret`), which the pods read as
//! environment (`envFrom`, optional). The Secret exists before the
//! StatefulSet does, so no node of the cluster starts without it, and it is
//! deleted once every node has been Up: a node whose volume is replaced
//! later catches up from its peers like any other, never from the backup
//! (whose deleted keys' tombstones its peers may have purged since).

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, PostParams};

use super::backup::s3_key_pair;
use super::controller::{Error, get_opt, is_not_found};
use super::crd::{KvCluster, Phase};
use super::objects;

pub use kv_crd::bootstrap::*;

/// The Secret the nodes read the source from while the cluster restores.
pub fn secret_name(kvc: &KvCluster) -> String {
    format!("{}-bootstrap", kvc.name_any())
}

/// The environment the nodes read: kv-node's `--restore-from` settings.
pub fn node_env(
    from: &FromBackup,
    credentials: Option<(String, String)>,
) -> BTreeMap<String, String> {
    let mut env = BTreeMap::from([("KV_RESTORE_FROM".to_string(), from.destination.clone())]);
    if let Some(s3) = &from.s3 {
        if let Some(e) = &s3.endpoint {
            env.insert("KV_RESTORE_S3_ENDPOINT".into(), e.clone());
        }
        env.insert(
            "KV_RESTORE_S3_REGION".into(),
            s3.region.clone().unwrap_or_else(|| "us-east-1".into()),
        );
    }
    if let Some((id, key)) = credentials {
        env.insert("KV_RESTORE_S3_ACCESS_KEY_ID".into(), id);
        env.insert("KV_RESTORE_S3_SECRET_ACCESS_KEY".into(), key);
    }
    env
}

/// Makes sure the nodes can read the source before any of them starts:
/// creates `<name>-bootstrap` while the cluster has not finished its
/// restore. Returns what stops it from being made (shown in the status),
/// if anything. Called before the StatefulSet is applied.
pub async fn prepare(
    kvc: &KvCluster,
    secrets: &Api<Secret>,
    previous: Option<&BootstrapStatus>,
) -> Result<Option<String>, Error> {
    let Some(b) = &kvc.spec.bootstrap else {
        return Ok(None);
    };
    let name = secret_name(kvc);
    if previous.is_some_and(|s| s.phase == BootstrapPhase::Restored) {
        // Done: a node whose volume is replaced catches up from its peers.
        return match secrets.delete(&name, &DeleteParams::default()).await {
            Ok(_) => Ok(None),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(e.into()),
        };
    }
    if get_opt(secrets, &name).await?.is_some() {
        return Ok(None);
    }
    let credentials = match b
        .from_backup
        .s3
        .as_ref()
        .and_then(|s| s.credentials_secret.as_ref())
    {
        None => None,
        Some(creds) => match credentials(secrets, creds).await? {
            Ok(c) => Some(c),
            Err(problem) => return Ok(Some(problem)),
        },
    };
    let env = node_env(&b.from_backup, credentials);
    let secret = Secret {
        metadata: objects::meta(kvc, name, "bootstrap"),
        type_: Some("Opaque".to_string()),
        data: Some(
            env.into_iter()
                .map(|(k, v)| (k, ByteString(v.into_bytes())))
                .collect(),
        ),
        ..Secret::default()
    };
    match secrets.create(&PostParams::default(), &secret).await {
        Ok(_) => Ok(None),
        // made meanwhile by another reconcile
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// The access key pair of `s3.credentialsSecret`, or what is wrong with it.
async fn credentials(
    secrets: &Api<Secret>,
    name: &str,
) -> Result<Result<(String, String), String>, Error> {
    let Some(s) = get_opt(secrets, name).await? else {
        return Ok(Err(format!(
            "Secret {name} (bootstrap.fromBackup.s3.credentialsSecret) does not exist"
        )));
    };
    Ok(s3_key_pair(&s))
}

/// `status.bootstrap` after this reconcile: Restoring until the cluster is
/// Running with every node of the spec Up (each loaded its buckets before
/// it could be), then Restored for good.
pub fn status(
    kvc: &KvCluster,
    previous: Option<&BootstrapStatus>,
    problem: Option<String>,
    phase: Phase,
    nodes_up: usize,
    now: &str,
) -> Option<BootstrapStatus> {
    let b = kvc.spec.bootstrap.as_ref()?;
    if let Some(p) = previous.filter(|p| p.phase == BootstrapPhase::Restored) {
        return Some(p.clone());
    }
    let done =
        problem.is_none() && phase == Phase::Running && nodes_up >= kvc.spec.replicas as usize;
    Some(BootstrapStatus {
        phase: if done {
            BootstrapPhase::Restored
        } else {
            BootstrapPhase::Restoring
        },
        source: b.from_backup.destination.clone(),
        message: problem,
        finished_at: done.then(|| now.to_string()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kvc(yaml: &str) -> KvCluster {
        let mut k = KvCluster::new("demo", serde_yaml::from_str(yaml).unwrap());
        k.metadata.namespace = Some("ns".into());
        k
    }

    #[test]
    fn the_nodes_get_the_source_and_the_credentials_as_kv_node_settings() {
        let k = kvc(
            "{replicas: 3, bootstrap: {fromBackup: {destination: 's3://b/p', s3: {endpoint: 'http://s3:9000', credentialsSecret: creds}}}}",
        );
        let from = &k.spec.bootstrap.as_ref().unwrap().from_backup;
        let env = node_env(from, Some(("id".into(), "key".into())));
        assert_eq!(env["KV_RESTORE_FROM"], "s3://b/p");
        assert_eq!(env["KV_RESTORE_S3_ENDPOINT"], "http://s3:9000");
        assert_eq!(env["KV_RESTORE_S3_REGION"], "us-east-1");
        assert_eq!(env["KV_RESTORE_S3_ACCESS_KEY_ID"], "id");
        assert_eq!(env["KV_RESTORE_S3_SECRET_ACCESS_KEY"], "key");
        let env = node_env(
            &FromBackup {
                destination: "file:///backups/one".into(),
                s3: None,
            },
            None,
        );
        assert_eq!(env.len(), 1);
    }

    #[test]
    fn restored_only_once_every_node_of_the_spec_is_up_and_then_for_good() {
        let k = kvc("{replicas: 3, bootstrap: {fromBackup: {destination: 'file:///b'}}}");
        let s = status(&k, None, None, Phase::Creating, 0, "t0").unwrap();
        assert_eq!(s.phase, BootstrapPhase::Restoring);
        let s = status(&k, Some(&s), None, Phase::Running, 2, "t1").unwrap();
        assert_eq!(s.phase, BootstrapPhase::Restoring);
        let s = status(
            &k,
            Some(&s),
            Some("no creds".into()),
            Phase::Running,
            3,
            "t2",
        )
        .unwrap();
        assert_eq!(s.phase, BootstrapPhase::Restoring);
        assert_eq!(s.message.as_deref(), Some("no creds"));
        let s = status(&k, Some(&s), None, Phase::Running, 3, "t3").unwrap();
        assert_eq!(s.phase, BootstrapPhase::Restored);
        assert_eq!(s.finished_at.as_deref(), Some("t3"));
        // a node lost later does not make it restore again
        let later = status(&k, Some(&s), None, Phase::Degraded, 2, "t4").unwrap();
        assert_eq!(later, s);
        let none = kvc("{replicas: 3}");
        assert!(status(&none, None, None, Phase::Running, 3, "t").is_none());
    }
}
