//! The Node object and its heartbeat: a Ready Node with capacity, so the
//! scheduler binds pods to it, and a Lease in `kube-node-lease` renewed every
//! `--heartbeat-secs`, so the node lifecycle controller does not mark it
//! NotReady (it looks at the Lease first, then the Ready condition).

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::{DeleteParams, Patch, PatchParams};
use serde_json::{Value, json};

use crate::Ctx;

pub const MANAGER: &str = "kv-test-kubelet";

fn status(ctx: &Ctx, since: &str, now: &str) -> Value {
    let a = &ctx.args;
    let resources = json!({"cpu": a.cpu, "memory": a.memory, "pods": a.max_pods.to_string(), "ephemeral-storage": "100Gi"});
    let condition = |type_: &str, status: &str, reason: &str, message: &str| {
        json!({"type": type_, "status": status, "reason": reason, "message": message,
               "lastHeartbeatTime": now, "lastTransitionTime": since})
    };
    json!({
        "apiVersion": "v1", "kind": "Node", "metadata": {"name": a.node_name},
        "status": {
            "capacity": resources, "allocatable": resources,
            "conditions": [
                condition("Ready", "True", "KubeletReady", "kv-test-kubelet is posting ready status"),
                condition("MemoryPressure", "False", "KubeletHasSufficientMemory", "not measured"),
                condition("DiskPressure", "False", "KubeletHasNoDiskPressure", "not measured"),
                condition("PIDPressure", "False", "KubeletHasSufficientPID", "not measured"),
            ],
            "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}, {"type": "Hostname", "address": a.node_name}],
            "nodeInfo": {
                "architecture": std::env::consts::ARCH, "operatingSystem": "linux",
                "osImage": "kv-test-kubelet (processes, no containers)",
                "kernelVersion": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
                "containerRuntimeVersion": "kv-test-kubelet://processes",
                "kubeletVersion": concat!("kv-test-kubelet/", env!("CARGO_PKG_VERSION")),
                "kubeProxyVersion": "", "machineID": "", "systemUUID": "",
                "bootID": std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default().trim(),
            },
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 0}},
        }
    })
}

/// Creates or updates the Node (server-side apply) and marks it Ready.
pub async fn register(ctx: &Ctx) -> Result<()> {
    let nodes: Api<Node> = Api::all(ctx.client.clone());
    let name = &ctx.args.node_name;
    let node = json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": {
            "kubernetes.io/hostname": name, "kubernetes.io/os": "linux",
            "kubernetes.io/arch": match std::env::consts::ARCH { "x86_64" => "amd64", "aarch64" => "arm64", a => a },
            "kvstore.dev/test-kubelet": "true",
        }},
    });
    let pp = PatchParams::apply(MANAGER).force();
    nodes.patch(name, &pp, &Patch::Apply(&node)).await?;
    let now = Timestamp::now().to_string();
    nodes
        .patch_status(name, &pp, &Patch::Apply(status(ctx, &now, &now)))
        .await?;
    renew_lease(ctx).await?;
    Ok(())
}

async fn renew_lease(ctx: &Ctx) -> Result<()> {
    let leases: Api<Lease> = Api::namespaced(ctx.client.clone(), "kube-node-lease");
    let name = &ctx.args.node_name;
    let now = Timestamp::now();
    // RFC 3339 with microseconds, as MicroTime wants.
    let renew = now.strftime("%Y-%m-%dT%H:%M:%S%.6fZ").to_string();
    let lease = json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": name, "namespace": "kube-node-lease"},
        "spec": {"holderIdentity": name, "leaseDurationSeconds": 40, "renewTime": renew},
    });
    leases
        .patch(
            name,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&lease),
        )
        .await?;
    Ok(())
}

/// Renews the Lease every heartbeat and re-posts the Node status every
/// fourth one (its conditions' heartbeat times), until aborted.
pub async fn heartbeat(ctx: Arc<Ctx>) {
    let since = Timestamp::now().to_string();
    let nodes: Api<Node> = Api::all(ctx.client.clone());
    let mut tick = tokio::time::interval(Duration::from_secs(ctx.args.heartbeat_secs.max(1)));
    for n in 0u64.. {
        tick.tick().await;
        if let Err(e) = renew_lease(&ctx).await {
            tracing::warn!("renewing the node Lease: {e:#}");
        }
        if n % 4 == 0 {
            let now = Timestamp::now().to_string();
            let pp = PatchParams::apply(MANAGER).force();
            if let Err(e) = nodes
                .patch_status(
                    &ctx.args.node_name,
                    &pp,
                    &Patch::Apply(status(&ctx, &since, &now)),
                )
                .await
            {
                tracing::warn!("posting the Node status: {e:#}");
            }
        }
    }
}

pub async fn delete(ctx: &Ctx) -> Result<()> {
    let name = &ctx.args.node_name;
    let leases: Api<Lease> = Api::namespaced(ctx.client.clone(), "kube-node-lease");
    let _ = leases.delete(name, &DeleteParams::default()).await;
    Api::<Node>::all(ctx.client.clone())
        .delete(name, &DeleteParams::default())
        .await?;
    tracing::info!(node = %name, "node deleted");
    Ok(())
}
