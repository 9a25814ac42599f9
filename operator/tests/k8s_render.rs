//! `kv-operator render`: every example renders to the objects the controller
//! would apply, as YAML documents that parse back into Kubernetes types.

use std::path::Path;

use k8s_openapi::api::apps::v1::StatefulSet;
use kv_operator::k8s::{KvCluster, render::render};

fn example(name: &str) -> KvCluster {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/examples")
        .join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn documents(yaml: &str) -> Vec<serde_yaml::Value> {
    yaml.split("---\n")
        .filter(|d| !d.trim().is_empty())
        .map(|d| serde_yaml::from_str(d).expect("each document is YAML"))
        .collect()
}

fn kinds(docs: &[serde_yaml::Value]) -> Vec<String> {
    docs.iter()
        .map(|d| d["kind"].as_str().expect("kind").to_string())
        .collect()
}

#[test]
fn every_example_renders_its_owned_objects_without_owner_references() {
    for (name, expected) in [
        (
            "minimal.yaml",
            vec![
                "Secret",
                "Secret",
                "ConfigMap",
                "Service",
                "Service",
                "StatefulSet",
                "PodDisruptionBudget",
                "NetworkPolicy",
            ],
        ),
        // The two generated Secrets (client, cluster); full.yaml names its
        // own Secret, so none is generated.
        (
            "full.yaml",
            vec![
                "ConfigMap",
                "Service",
                "Service",
                "StatefulSet",
                "PodDisruptionBudget",
                "NetworkPolicy",
            ],
        ),
        // factor 2 with W=One leaves one node of slack: a budget of 1.
        (
            "fault-injection.yaml",
            vec![
                "Secret",
                "Secret",
                "ConfigMap",
                "Service",
                "Service",
                "StatefulSet",
                "PodDisruptionBudget",
                "NetworkPolicy",
            ],
        ),
    ] {
        let yaml = render(&example(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        let docs = documents(&yaml);
        assert_eq!(kinds(&docs), expected, "{name}");
        for d in &docs {
            assert!(
                d["metadata"]["ownerReferences"].is_null(),
                "{name}: rendered objects must not point at a KvCluster that does not exist"
            );
            assert_eq!(
                d["metadata"]["labels"]["app.kubernetes.io/managed-by"].as_str(),
                Some("kv-operator")
            );
        }
        let sts: StatefulSet = serde_yaml::from_value(
            docs[kinds(&docs)
                .iter()
                .position(|k| k == "StatefulSet")
                .expect("sts")]
            .clone(),
        )
        .expect("the StatefulSet parses back");
        let np = &docs[kinds(&docs)
            .iter()
            .position(|k| k == "NetworkPolicy")
            .expect("NetworkPolicy")];
        assert_eq!(
            np["spec"]["ingress"][0]["from"][1]["namespaceSelector"]["matchLabels"]
                ["kubernetes.io/metadata.name"]
                .as_str(),
            Some(kv_operator::k8s::render::DEFAULT_OPERATOR_NAMESPACE),
            "{name}: rendered for the operator of deploy/operator.yaml"
        );
        let replicas = example(name).spec.replicas;
        assert_eq!(
            sts.spec.and_then(|s| s.replicas),
            Some(replicas as i32),
            "{name}"
        );
    }
}

#[test]
fn an_invalid_spec_does_not_render() {
    let kvc: KvCluster = serde_yaml::from_str("{apiVersion: kvstore.dev/v1alpha1, kind: KvCluster, metadata: {name: x}, spec: {replicas: 2, replication: {factor: 3}}}")
        .expect("parses");
    let err = render(&kvc).expect_err("refused");
    assert!(err.to_string().contains("exceeds replicas"), "{err}");
}
