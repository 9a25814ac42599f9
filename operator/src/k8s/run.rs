//! Running the controller: leader election, watches, and the HTTP endpoints.
//!
//! Several operator replicas may run; only the holder of the coordination
//! Lease (`kv-operator` in the operator's namespace, via kube-lease-manager)
//! reconciles. A replica that loses the lease exits, so that a restarted
//! process starts from a clean cache rather than racing the new leader.
//! `/healthz` answers as long as the process runs, `/readyz` once the
//! KvCluster API answered, `/metrics` at all times (standbys included).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{Api, ListParams};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{Controller, watcher};
use kube::{Client, ResourceExt};
use prometheus::Registry;
use tracing::{error, info, warn};
use warp::Filter;

use super::backup::{self, BackupContext, KvBackup};
use super::controller::{Context, NodeReports, error_policy, reconcile};
use super::crd::KvCluster;
use super::events::publish;
use super::objects;
use kube::runtime::events::EventType;
use kv_control::metrics::Metrics;

/// How `kv-operator run` is configured (flags and environment, see main.rs).
#[derive(Clone, Debug)]
pub struct RunConfig {
    /// Where `/metrics`, `/healthz` and `/readyz` are served.
    pub metrics_listen: SocketAddr,
    /// Watch only this namespace; all namespaces when `None`.
    pub watch_namespace: Option<String>,
    /// Lease name and namespace for leader election; `None` disables it.
    pub lease: Option<(String, String)>,
    /// This replica's identity in the Lease (the pod name).
    pub identity: String,
    /// Ask nodes for their reports on `/v1/cluster`.
    pub node_reports: bool,
    /// The operator's own namespace (`POD_NAMESPACE`), let in by the
    /// clusters' NetworkPolicies.
    pub operator_namespace: Option<String>,
}

/// Serve `/metrics`, `/healthz` and `/readyz` on `listener` until the process
/// ends. The caller binds, so that a taken port is an error at start-up.
pub fn serve_http(listener: tokio::net::TcpListener, registry: Registry, ready: Arc<AtomicBool>) {
    let metrics = warp::path("metrics").and(warp::path::end()).map(move || {
        let body = prometheus::TextEncoder::new()
            .encode_to_string(&registry.gather())
            .unwrap_or_else(|e| format!("# encoding failed: {e}\n"));
        warp::reply::with_header(body, "content-type", "text/plain; version=0.0.4")
    });
    let healthz = warp::path("healthz")
        .and(warp::path::end())
        .map(|| warp::reply::with_status("ok", warp::http::StatusCode::OK));
    let readyz = warp::path("readyz").and(warp::path::end()).map(move || {
        if ready.load(Ordering::Relaxed) {
            warp::reply::with_status("ok", warp::http::StatusCode::OK)
        } else {
            warp::reply::with_status("not ready", warp::http::StatusCode::SERVICE_UNAVAILABLE)
        }
    });
    let routes = warp::get().and(metrics.or(healthz).or(readyz));
    tokio::spawn(warp::serve(routes).incoming(listener).run());
}

/// An API over one namespace, or over all of them.
fn scoped<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: kube::Resource<Scope = kube::core::NamespaceResourceScope>,
    K::DynamicType: Default,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// Run the controller until a shutdown signal (or the loss of the lease).
pub async fn run(cfg: RunConfig) -> anyhow::Result<()> {
    let client = Client::try_default().await?;
    let registry = Registry::new();
    let metrics = Metrics::new(&registry)?;
    let ready = Arc::new(AtomicBool::new(false));
    let listener = tokio::net::TcpListener::bind(cfg.metrics_listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", cfg.metrics_listen))?;
    serve_http(listener, registry, ready.clone());
    info!(listen = %cfg.metrics_listen, "serving /metrics, /healthz, /readyz");

    let kvcs: Api<KvCluster> = match &cfg.watch_namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    if let Err(e) = kvcs.list(&ListParams::default().limit(1)).await {
        anyhow::bail!(
            "the KvCluster API is not available ({e}); install the CRD first: kubectl apply -f deploy/crd.yaml"
        );
    }
    ready.store(true, Ordering::Relaxed);

    let mut leadership = None;
    if let Some((name, namespace)) = &cfg.lease {
        let manager = kube_lease_manager::LeaseManagerBuilder::new(client.clone(), name)
            .with_namespace(namespace)
            .with_identity(&cfg.identity)
            .with_field_manager(objects::MANAGER)
            .with_duration(15)
            .with_grace(5)
            .build()
            .await?;
        let (mut rx, task) = manager.watch().await;
        info!(lease = %name, %namespace, identity = %cfg.identity, "waiting for leadership");
        while !*rx.borrow_and_update() {
            rx.changed().await?;
        }
        info!("acquired leadership");
        leadership = Some((rx, task));
    }

    let ns = cfg.watch_namespace.as_deref();
    let stss: Api<StatefulSet> = scoped(&client, ns);
    let cms: Api<ConfigMap> = scoped(&client, ns);
    let svcs: Api<Service> = scoped(&client, ns);
    let pdbs: Api<PodDisruptionBudget> = scoped(&client, ns);
    let nps: Api<NetworkPolicy> = scoped(&client, ns);
    let pods: Api<Pod> = scoped(&client, ns);
    let managed = format!("app.kubernetes.io/managed-by={}", objects::MANAGER);
    let owned = || watcher::Config::default().labels(&managed);
    let ctx = Arc::new(
        Context::new(
            client.clone(),
            metrics,
            cfg.node_reports.then(NodeReports::in_cluster).flatten(),
        )
        .with_operator_namespace(cfg.operator_namespace.clone())
        .with_pod_monitors(),
    );
    // KvBackups, where their CRD is installed (deploy/crd-kvbackup.yaml):
    // an operator upgraded before the CRD runs without them.
    let kvbs: Api<KvBackup> = scoped(&client, ns);
    let backups_served = kvbs.list(&ListParams::default().limit(1)).await.is_ok();
    let controller = Controller::new(kvcs, watcher::Config::default());
    let store = controller.store();
    // spec.backup.schedule: the KvBackups due, looked for every few seconds
    // in the controller's cache of KvClusters (by the leader only: this runs
    // after the Lease is held).
    let schedules = store.clone();
    let schedule_ctx = ctx.clone();
    tokio::spawn(async move {
        if !backups_served {
            return;
        }
        // An invalid schedule is told once (log and Warning Event) per
        // cluster and schedule text, not at every look.
        let mut told: std::collections::BTreeSet<(String, String)> = Default::default();
        let mut tick = tokio::time::interval(backup::SCHEDULE_EVERY);
        loop {
            tick.tick().await;
            for kvc in schedules.state() {
                match backup::run_schedule(&schedule_ctx.client, &kvc).await {
                    Ok(run) => {
                        if let Some(name) = run.created {
                            let note = format!("KvBackup {name} made by spec.backup.schedule");
                            publish(
                                &schedule_ctx,
                                &kvc,
                                EventType::Normal,
                                "BackupScheduled",
                                "Backup",
                                &note,
                            )
                            .await;
                        }
                        for name in run.pruned {
                            let note = format!(
                                "KvBackup {name} and its objects deleted (spec.backup.keep)"
                            );
                            publish(
                                &schedule_ctx,
                                &kvc,
                                EventType::Normal,
                                "BackupPruned",
                                "Backup",
                                &note,
                            )
                            .await;
                        }
                        if let Some(why) = run.invalid {
                            let schedule = kvc
                                .spec
                                .backup
                                .as_ref()
                                .map(|b| format!("{b:?}"))
                                .unwrap_or_default();
                            if told.insert((kvc.name_any(), schedule)) {
                                warn!(kvcluster = %kvc.name_any(), reason = %why, "backup schedule not used");
                                publish(
                                    &schedule_ctx,
                                    &kvc,
                                    EventType::Warning,
                                    "BackupScheduleInvalid",
                                    "Backup",
                                    &why,
                                )
                                .await;
                            }
                        }
                    }
                    Err(e) => {
                        warn!(kvcluster = %kvc.name_any(), error = %e, "cannot make the scheduled backup");
                    }
                }
            }
        }
    });
    let gauges = ctx.metrics.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(30));
        loop {
            tick.tick().await;
            let keys: Vec<String> = store
                .state()
                .iter()
                .map(|k| format!("{}/{}", k.namespace().unwrap_or_default(), k.name_any()))
                .collect();
            gauges.retain_clusters(&keys);
        }
    });
    let controller = controller
        .owns(stss, owned())
        .owns(cms, owned())
        .owns(svcs, owned())
        .owns(pdbs, owned())
        .owns(nps, owned())
        // Pods belong to the StatefulSet, not to the KvCluster: map them back by label.
        .watches(
            pods,
            watcher::Config::default()
                .labels(&format!("app.kubernetes.io/name={}", objects::APP_NAME)),
            |pod: Pod| {
                let ns = pod.namespace();
                pod.labels().get("app.kubernetes.io/instance").map(|name| {
                    let r = ObjectRef::<KvCluster>::new(name);
                    match ns {
                        Some(ns) => r.within(&ns),
                        None => r,
                    }
                })
            },
        )
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx)
        .for_each(|res| async move {
            match res {
                Ok((obj, _)) => tracing::debug!(kvcluster = %obj.name, "reconciled"),
                Err(e) => warn!(error = %e, "reconcile error"),
            }
        });
    let backups = if backups_served {
        let bctx = Arc::new(BackupContext::new(
            client.clone(),
            cfg.node_reports.then(NodeReports::in_cluster).flatten(),
        ));
        Controller::new(kvbs, watcher::Config::default())
            .shutdown_on_signal()
            .run(backup::reconcile, backup::error_policy, bctx)
            .for_each(|res| async move {
                if let Err(e) = res {
                    warn!(error = %e, "KvBackup reconcile error");
                }
            })
            .boxed()
    } else {
        warn!(
            "the KvBackup API is not available: backups are off (kubectl apply -f deploy/crd-kvbackup.yaml)"
        );
        futures::future::pending::<()>().boxed()
    };
    // The KvCluster controller ends the process's work (a shutdown signal);
    // the backup controller runs beside it.
    let controller = async move {
        tokio::select! {
            () = controller => {}
            () = backups => {}
        }
    };

    match leadership {
        None => controller.await,
        Some((mut rx, _task)) => {
            let lost = async move {
                loop {
                    if rx.changed().await.is_err() || !*rx.borrow() {
                        break;
                    }
                }
            };
            tokio::select! {
                () = controller => {}
                () = lost => {
                    error!("lost leadership; exiting so that a fresh process can stand by");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    anyhow::bail!("lost the leader lease");
                }
            }
        }
    }
    info!("controller stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_http_endpoints_serve_metrics_health_and_readiness_once_ready() {
        let registry = Registry::new();
        let metrics = Metrics::new(&registry).expect("metrics");
        metrics.record(std::time::Instant::now(), "ok");
        let ready = Arc::new(AtomicBool::new(false));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let base = format!("http://{}", listener.local_addr().expect("addr"));
        serve_http(listener, registry, ready.clone());
        let get = |path: &str| {
            let url = format!("{base}{path}");
            async move { reqwest::get(url).await.expect("request") }
        };
        assert_eq!(get("/healthz").await.status(), 200);
        assert_eq!(get("/readyz").await.status(), 503);
        ready.store(true, Ordering::Relaxed);
        assert_eq!(get("/readyz").await.status(), 200);
        let body = get("/metrics").await.text().await.expect("body");
        assert!(
            body.contains("kv_operator_reconciles_total{result=\"ok\"} 1"),
            "{body}"
        );
        assert_eq!(get("/nothing").await.status(), 404);
    }
}
