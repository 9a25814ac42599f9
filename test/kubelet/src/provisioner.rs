//! A small volume provisioner: every pending PersistentVolumeClaim without a
//! storage class (or of a `--storage-class` this kubelet serves) gets a
//! PersistentVolume backed by a directory under `<root>/volumes/`, pre-bound
//! to the claim (`claimRef`) and pinned to this Node (`nodeAffinity`); the
//! controller-manager's PV controller then binds the claim. A released volume
//! of ours with reclaim policy Delete is removed with its directory, as an
//! external provisioner must do (the annotation `pv.kubernetes.io/provisioned-by`
//! tells the PV controller to leave that to us). A bound claim of ours whose
//! request grew is resized as a CSI external resizer and the kubelet would
//! together: the volume's and then the claim's capacity become the request
//! (a directory has no size to grow; shrinking is not emulated, the API
//! server refuses it anyway).

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
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

fn storage(q: Option<&std::collections::BTreeMap<String, Quantity>>) -> Option<String> {
    q?.get("storage").map(|q| q.0.clone())
}

async fn resize(
    ctx: &Ctx,
    claims: &Api<PersistentVolumeClaim>,
    volumes: &Api<PersistentVolume>,
    existing: &[PersistentVolume],
) -> Result<()> {
    for claim in claims.list(&ListParams::default()).await? {
        let spec = claim.spec.clone().unwrap_or_default();
        let bound = claim.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound");
        let Some(pv) = existing
            .iter()
            .find(|v| Some(v.name_any()) == spec.volume_name)
        else {
            continue;
        };
        let ours = pv
            .annotations()
            .get("pv.kubernetes.io/provisioned-by")
            .map(String::as_str)
            == Some(PROVISIONER);
        let Some(wanted) = storage(spec.resources.as_ref().and_then(|r| r.requests.as_ref()))
        else {
            continue;
        };
        let has = storage(pv.spec.as_ref().and_then(|s| s.capacity.as_ref()));
        let shown = storage(claim.status.as_ref().and_then(|s| s.capacity.as_ref()));
        if !bound || !ours || (has.as_deref() == Some(&wanted) && shown.as_deref() == Some(&wanted))
        {
            continue;
        }
        let patch = json!({"spec": {"capacity": {"storage": wanted}}});
        volumes
            .patch(
                &pv.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await?;
        let ns_claims: Api<PersistentVolumeClaim> =
            Api::namespaced(ctx.client.clone(), &claim.namespace().unwrap_or_default());
        let patch = json!({"status": {"capacity": {"storage": wanted}}});
        ns_claims
            .patch_status(
                &claim.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await?;
        tracing::info!(claim = %format!("{}/{}", claim.namespace().unwrap_or_default(), claim.name_any()),
            volume = %pv.name_any(), from = ?has, to = %wanted, "resized");
    }
    Ok(())
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
    resize(ctx, &claims, &volumes, &existing.items).await?;
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
