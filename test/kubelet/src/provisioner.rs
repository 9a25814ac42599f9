//! A small volume provisioner: every pending PersistentVolumeClaim without a
//! storage class (or of a `--storage-class` this kubelet serves) gets a
//! PersistentVolume backed by a directory under `<root>/volumes/`, pre-bound
//! to the claim (`claimRef`) and pinned to this Node (`nodeAffinity`); the
//! controller-manager's PV controller then binds the claim. A released volume
//! of ours with reclaim policy Delete is removed with its directory, as an
//! external provisioner must do (the annotation `pv.kubernetes.io/provisioned-by`
//! tells the PV controller to leave that to us).

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::{Api, ResourceExt};
use serde_json::json;

use crate::Ctx;

pub const PROVISIONER: &str = "kvstore.dev/test-kubelet";

pub async fn run(ctx: Arc<Ctx>) {
    loop {
        if let Err(e) = pass(&ctx).await {
            tracing::warn!("provisioner: {e:#}");
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

fn volume_name(claim: &PersistentVolumeClaim) -> String {
    format!("pvc-{}", claim.uid().unwrap_or_default())
}

async fn pass(ctx: &Ctx) -> Result<()> {
    let claims: Api<PersistentVolumeClaim> = Api::all(ctx.client.clone());
    let volumes: Api<PersistentVolume> = Api::all(ctx.client.clone());
    let existing = volumes.list(&ListParams::default()).await?;
    for claim in claims.list(&ListParams::default()).await? {
        let spec = claim.spec.clone().unwrap_or_default();
        let pending = claim.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Pending");
        if !pending || spec.volume_name.is_some() || claim.metadata.deletion_timestamp.is_some() {
            continue;
        }
        if !ctx.served_class(spec.storage_class_name.as_deref()) {
            continue;
        }
        let name = volume_name(&claim);
        if existing.items.iter().any(|v| v.name_any() == name) {
            continue;
        }
        let dir = ctx.args.root.join("volumes").join(&name);
        std::fs::create_dir_all(&dir)?;
        let size = spec
            .resources
            .as_ref()
            .and_then(|r| r.requests.as_ref())
            .and_then(|r| r.get("storage"))
            .map(|q| q.0.clone())
            .unwrap_or_else(|| "1Gi".into());
        let pv: PersistentVolume = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "PersistentVolume",
            "metadata": {"name": name, "annotations": {"pv.kubernetes.io/provisioned-by": PROVISIONER},
                         "labels": {"kvstore.dev/test-kubelet-node": ctx.args.node_name}},
            "spec": {
                "capacity": {"storage": size},
                "accessModes": spec.access_modes.clone().unwrap_or_else(|| vec!["ReadWriteOnce".into()]),
                "persistentVolumeReclaimPolicy": "Delete",
                "storageClassName": spec.storage_class_name.clone().unwrap_or_default(),
                "volumeMode": spec.volume_mode.clone().unwrap_or_else(|| "Filesystem".into()),
                "hostPath": {"path": dir.to_string_lossy(), "type": "DirectoryOrCreate"},
                "claimRef": {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "namespace": claim.namespace(),
                             "name": claim.name_any(), "uid": claim.uid()},
                "nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [
                    {"key": "kubernetes.io/hostname", "operator": "In", "values": [ctx.args.node_name]}]}]}},
            }
        }))?;
        volumes.create(&PostParams::default(), &pv).await?;
        tracing::info!(claim = %format!("{}/{}", claim.namespace().unwrap_or_default(), claim.name_any()),
            volume = %name, dir = %dir.display(), "provisioned");
    }
    for pv in existing {
        let ours = pv
            .annotations()
            .get("pv.kubernetes.io/provisioned-by")
            .map(String::as_str)
            == Some(PROVISIONER)
            && pv.labels().get("kvstore.dev/test-kubelet-node") == Some(&ctx.args.node_name);
        let released = pv.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Released");
        let delete = pv
            .spec
            .as_ref()
            .and_then(|s| s.persistent_volume_reclaim_policy.as_deref())
            == Some("Delete");
        if ours && released && delete && pv.metadata.deletion_timestamp.is_none() {
            let dir = ctx.args.root.join("volumes").join(pv.name_any());
            let _ = std::fs::remove_dir_all(&dir);
            volumes
                .delete(&pv.name_any(), &DeleteParams::default())
                .await?;
            tracing::info!(volume = %pv.name_any(), "released volume deleted with its directory");
        }
    }
    Ok(())
}
