//! Against a real cluster (kind): one reconcile creates every owned object.
//! Needs the current kube context and `kubectl apply -f deploy/crd.yaml`;
//! run with `cargo test -p kv-operator --test k8s_cluster -- --ignored`.

use std::sync::Arc;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret, Service};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kv_control::metrics::Metrics;
use kv_operator::k8s::{Context, KvCluster, reconcile};

#[tokio::test]
#[ignore = "needs a Kubernetes cluster (current kube context) with deploy/crd.yaml applied"]
async fn one_reconcile_creates_the_owned_objects_and_writes_the_status() {
    let client = kube::Client::try_default().await.expect("kube context");
    let ns = "kv-operator-it";
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let namespace: Namespace =
        serde_json::from_value(serde_json::json!({"metadata": {"name": ns}})).expect("namespace");
    let _ = namespaces.create(&PostParams::default(), &namespace).await;

    let kvcs: Api<KvCluster> = Api::namespaced(client.clone(), ns);
    let kvc: KvCluster = serde_yaml::from_str(
        "{apiVersion: kvstore.dev/v1alpha1, kind: KvCluster, metadata: {name: it}, spec: {replicas: 3}}",
    )
    .expect("kvcluster");
    let applied = kvcs
        .patch(
            "it",
            &PatchParams::apply("kv-operator-it").force(),
            &Patch::Apply(&kvc),
        )
        .await
        .expect("the CRD is installed and accepts the KvCluster");

    let registry = prometheus::Registry::new();
    let ctx = Arc::new(Context::new(
        client.clone(),
        Metrics::new(&registry).expect("metrics"),
        None,
    ));
    reconcile(Arc::new(applied), ctx).await.expect("reconcile");

    let sts = Api::<StatefulSet>::namespaced(client.clone(), ns)
        .get("it")
        .await
        .expect("StatefulSet");
    assert_eq!(sts.spec.and_then(|s| s.replicas), Some(3));
    Api::<Service>::namespaced(client.clone(), ns)
        .get("it-peers")
        .await
        .expect("peer Service");
    Api::<Service>::namespaced(client.clone(), ns)
        .get("it")
        .await
        .expect("client Service");
    Api::<ConfigMap>::namespaced(client.clone(), ns)
        .get("it-topology")
        .await
        .expect("topology");
    Api::<Secret>::namespaced(client.clone(), ns)
        .get("it-auth")
        .await
        .expect("token Secret");
    let status = kvcs
        .get_status("it")
        .await
        .expect("status")
        .status
        .expect("status written");
    assert_eq!(status.topology_epoch, 1);
    assert!(status.observed_generation.is_some());

    kvcs.delete("it", &DeleteParams::default())
        .await
        .expect("cleanup");
}
