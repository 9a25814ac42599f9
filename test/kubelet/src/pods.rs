//! The pod watch: every Pod with `spec.nodeName` = this Node goes to its own
//! worker (by uid), which gets each newer version of the object and `None`
//! once the object is gone from the API server.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::watcher::{self, Event};
use kube::{Api, ResourceExt};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::Ctx;
use crate::worker;

struct Handle {
    tx: watch::Sender<Option<Pod>>,
    task: JoinHandle<()>,
}

pub async fn run(ctx: Arc<Ctx>, mut stop: watch::Receiver<bool>) {
    let pods: Api<Pod> = Api::all(ctx.client.clone());
    let config =
        watcher::Config::default().fields(&format!("spec.nodeName={}", ctx.args.node_name));
    let mut stream = watcher::watcher(pods, config).boxed();
    let mut workers: HashMap<String, Handle> = HashMap::new();
    let mut relisted: BTreeSet<String> = BTreeSet::new();
    loop {
        let event = tokio::select! {
            _ = stop.changed() => break,
            e = stream.next() => e,
        };
        workers.retain(|_, h| !h.task.is_finished());
        let Some(event) = event else { break };
        match event {
            Ok(Event::Init) => relisted.clear(),
            Ok(Event::InitApply(pod)) => {
                relisted.insert(pod.uid().unwrap_or_default());
                dispatch(&ctx, &mut workers, pod, &stop);
            }
            Ok(Event::InitDone) => {
                for (uid, h) in &workers {
                    if !relisted.contains(uid) {
                        let _ = h.tx.send(None);
                    }
                }
            }
            Ok(Event::Apply(pod)) => dispatch(&ctx, &mut workers, pod, &stop),
            Ok(Event::Delete(pod)) => {
                if let Some(h) = workers.get(&pod.uid().unwrap_or_default()) {
                    let _ = h.tx.send(None);
                }
            }
            Err(e) => {
                tracing::warn!("pod watch: {e}");
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
        }
    }
    // Stopping: every worker kills its processes (stop is already set).
    for (_, h) in workers {
        let _ = h.task.await;
    }
}

fn dispatch(
    ctx: &Arc<Ctx>,
    workers: &mut HashMap<String, Handle>,
    pod: Pod,
    stop: &watch::Receiver<bool>,
) {
    let uid = pod.uid().unwrap_or_default();
    if let Some(h) = workers.get(&uid) {
        let _ = h.tx.send(Some(pod));
        return;
    }
    // A finished pod (Succeeded/Failed) that this kubelet did not run keeps its status.
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    if matches!(phase, Some("Succeeded") | Some("Failed"))
        && pod.metadata.deletion_timestamp.is_none()
    {
        return;
    }
    tracing::info!(pod = %format!("{}/{}", pod.namespace().unwrap_or_default(), pod.name_any()), %uid, "pod bound to this node");
    let (tx, rx) = watch::channel(Some(pod.clone()));
    let task = tokio::spawn(worker::run(ctx.clone(), pod, rx, stop.clone()));
    workers.insert(uid, Handle { tx, task });
}
