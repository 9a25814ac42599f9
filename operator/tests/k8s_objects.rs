//! The owned objects of a KvCluster, checked field by field.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kv_core::{NodeState, Topology};
use kv_operator::k8s::KvCluster;
use kv_operator::k8s::objects::{self, CLIENT_PORT, PEER_PORT};

fn cluster(spec_yaml: &str) -> KvCluster {
    let mut kvc = KvCluster::new(
        "demo",
        serde_yaml::from_str(spec_yaml).expect("test spec parses"),
    );
    kvc.metadata.namespace = Some("ns".into());
    kvc.metadata.uid = Some("uid-1".into());
    kvc.metadata.generation = Some(1);
    kvc
}

fn assert_owned(
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    component: &str,
) {
    let owners = meta.owner_references.as_ref().expect("owner references");
    assert_eq!(owners.len(), 1);
    assert_eq!(owners[0].kind, "KvCluster");
    assert_eq!(owners[0].name, "demo");
    assert_eq!(owners[0].uid, "uid-1");
    assert_eq!(owners[0].controller, Some(true));
    assert_eq!(meta.namespace.as_deref(), Some("ns"));
    let labels = meta.labels.as_ref().expect("labels");
    assert_eq!(labels["app.kubernetes.io/name"], "kvstore");
    assert_eq!(labels["app.kubernetes.io/instance"], "demo");
    assert_eq!(labels["app.kubernetes.io/component"], component);
    assert_eq!(labels["app.kubernetes.io/managed-by"], "kv-operator");
}

fn selector() -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_string(), "kvstore".to_string()),
        ("app.kubernetes.io/instance".to_string(), "demo".to_string()),
        (
            "app.kubernetes.io/component".to_string(),
            "node".to_string(),
        ),
    ])
}

#[test]
fn the_statefulset_runs_one_hardened_kv_node_per_ordinal_with_its_own_volume() {
    let kvc = cluster("{replicas: 3, storage: {size: 2Gi, storageClassName: fast}}");
    let sts = objects::statefulset(&kvc, 3);
    assert_eq!(sts.metadata.name.as_deref(), Some("demo"));
    assert_owned(&sts.metadata, "node");
    let spec = sts.spec.expect("spec");
    assert_eq!(spec.replicas, Some(3));
    assert_eq!(spec.service_name.as_deref(), Some("demo-peers"));
    assert_eq!(spec.pod_management_policy.as_deref(), Some("Parallel"));
    assert_eq!(spec.selector.match_labels, Some(selector()));

    let claims = spec.volume_claim_templates.expect("claims");
    assert_eq!(claims.len(), 1);
    assert_eq!(claims[0].metadata.name.as_deref(), Some("data"));
    let claim = claims[0].spec.as_ref().expect("claim spec");
    assert_eq!(claim.storage_class_name.as_deref(), Some("fast"));
    assert_eq!(claim.access_modes, Some(vec!["ReadWriteOnce".to_string()]));
    let requests = claim
        .resources
        .as_ref()
        .and_then(|r| r.requests.as_ref())
        .expect("requests");
    assert_eq!(requests["storage"].0, "2Gi");

    let template = spec.template;
    assert_eq!(
        template
            .metadata
            .as_ref()
            .and_then(|m| m.labels.as_ref())
            .map(|l| l["app.kubernetes.io/component"].as_str()),
        Some("node")
    );
    let pod = template.spec.expect("pod spec");
    let psc = pod.security_context.expect("pod security context");
    assert_eq!(psc.run_as_non_root, Some(true));
    assert_eq!(psc.run_as_user, Some(65532));
    assert_eq!(psc.fs_group, Some(65532));
    assert_eq!(
        psc.seccomp_profile.map(|s| s.type_).as_deref(),
        Some("RuntimeDefault")
    );
    assert_eq!(pod.automount_service_account_token, Some(false));

    let anti = pod
        .affinity
        .and_then(|a| a.pod_anti_affinity)
        .and_then(|a| a.preferred_during_scheduling_ignored_during_execution)
        .expect("default preferred anti-affinity");
    assert_eq!(
        anti[0].pod_affinity_term.topology_key,
        "kubernetes.io/hostname"
    );
    assert_eq!(
        anti[0]
            .pod_affinity_term
            .label_selector
            .as_ref()
            .and_then(|s| s.match_labels.clone()),
        Some(selector())
    );

    // and over zones where it can, without refusing to schedule
    let spread = pod
        .topology_spread_constraints
        .clone()
        .expect("default topology spread");
    assert_eq!(spread.len(), 1);
    assert_eq!(
        (
            spread[0].topology_key.as_str(),
            spread[0].max_skew,
            spread[0].when_unsatisfiable.as_str()
        ),
        ("topology.kubernetes.io/zone", 1, "ScheduleAnyway")
    );
    assert_eq!(
        spread[0]
            .label_selector
            .as_ref()
            .and_then(|s| s.match_labels.clone()),
        Some(selector())
    );

    assert_eq!(pod.containers.len(), 1);
    let c = &pod.containers[0];
    assert_eq!(c.image, Some(kv_operator::k8s::crd::default_image()));
    let args = c.args.clone().expect("args");
    for expected in [
        "--listen=0.0.0.0:7400",
        "--peer-listen=0.0.0.0:7401",
        "--advertise=$(POD_NAME).demo-peers.ns.svc:7400",
        "--data-dir=/data",
        "--node-id-from-hostname",
        "--token-file=/etc/kvstore/secret/token",
        "--cluster-token-file=/etc/kvstore/cluster-secret/cluster-token",
        "--topology-file=/etc/kvstore/topology/topology.json",
    ] {
        assert!(
            args.iter().any(|a| a == expected),
            "missing {expected} in {args:?}"
        );
    }
    let env = c.env.clone().expect("env");
    assert_eq!(env[0].name, "POD_NAME");
    assert_eq!(
        env[0]
            .value_from
            .as_ref()
            .and_then(|v| v.field_ref.as_ref())
            .map(|f| f.field_path.as_str()),
        Some("metadata.name")
    );
    let ports: Vec<(Option<String>, i32)> = c
        .ports
        .clone()
        .expect("ports")
        .into_iter()
        .map(|p| (p.name, p.container_port))
        .collect();
    assert_eq!(
        ports,
        [
            (Some("client".into()), CLIENT_PORT),
            (Some("peer".into()), PEER_PORT)
        ]
    );
    let path = |p: &Option<k8s_openapi::api::core::v1::Probe>| {
        p.as_ref()
            .and_then(|p| p.http_get.as_ref())
            .and_then(|h| h.path.clone())
    };
    assert_eq!(path(&c.readiness_probe).as_deref(), Some("/readyz"));
    assert_eq!(path(&c.liveness_probe).as_deref(), Some("/healthz"));
    let sc = c
        .security_context
        .clone()
        .expect("container security context");
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_eq!(sc.run_as_non_root, Some(true));
    assert_eq!(
        sc.capabilities.and_then(|c| c.drop),
        Some(vec!["ALL".to_string()])
    );

    let mounts: BTreeMap<String, (String, Option<bool>)> = c
        .volume_mounts
        .clone()
        .expect("mounts")
        .into_iter()
        .map(|m| (m.name, (m.mount_path, m.read_only)))
        .collect();
    assert_eq!(mounts["data"], ("/data".to_string(), None));
    assert_eq!(
        mounts["topology"],
        ("/etc/kvstore/topology".to_string(), Some(true))
    );
    assert_eq!(
        mounts["secret"],
        ("/etc/kvstore/secret".to_string(), Some(true))
    );
    let volumes = pod.volumes.expect("volumes");
    let topo = volumes
        .iter()
        .find(|v| v.name == "topology")
        .expect("topology volume");
    assert_eq!(
        topo.config_map.as_ref().map(|c| c.name.as_str()),
        Some("demo-topology")
    );
    let secret = volumes
        .iter()
        .find(|v| v.name == "secret")
        .expect("secret volume");
    assert_eq!(
        secret
            .secret
            .as_ref()
            .and_then(|s| s.secret_name.as_deref()),
        Some("demo-auth")
    );
    let cluster_secret = volumes
        .iter()
        .find(|v| v.name == "cluster-secret")
        .and_then(|v| v.secret.as_ref())
        .expect("cluster secret volume");
    assert_eq!(
        cluster_secret.secret_name.as_deref(),
        Some("demo-cluster-auth")
    );
    let keys = |s: &k8s_openapi::api::core::v1::SecretVolumeSource| {
        s.items
            .iter()
            .flatten()
            .map(|i| i.key.clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(keys(cluster_secret), ["cluster-token"]);
    assert_eq!(
        secret.secret.as_ref().map(keys),
        Some(vec!["token".to_string()])
    );
}

#[test]
fn an_empty_spread_list_asks_for_no_topology_spread() {
    let kvc = cluster("{topologySpreadConstraints: []}");
    let pod = objects::statefulset(&kvc, 3)
        .spec
        .expect("spec")
        .template
        .spec
        .expect("pod");
    assert_eq!(pod.topology_spread_constraints, None);
    // the hostname anti-affinity stays
    assert!(pod.affinity.and_then(|a| a.pod_anti_affinity).is_some());
}

#[test]
fn user_scheduling_and_a_user_secret_replace_the_defaults() {
    let kvc = cluster(
        "{authSecretName: mine, imagePullPolicy: Always, nodeSelector: {disk: ssd},
          tolerations: [{key: k, operator: Exists}],
          affinity: {podAntiAffinity: {requiredDuringSchedulingIgnoredDuringExecution: [{topologyKey: zone}]}},
          topologySpreadConstraints: [{maxSkew: 2, topologyKey: rack, whenUnsatisfiable: DoNotSchedule,
                                       labelSelector: {matchLabels: {app: mine}}}]}",
    );
    let pod = objects::statefulset(&kvc, 3)
        .spec
        .expect("spec")
        .template
        .spec
        .expect("pod");
    assert_eq!(
        pod.node_selector,
        Some(BTreeMap::from([("disk".into(), "ssd".into())]))
    );
    assert_eq!(
        pod.tolerations.map(|t| t[0].key.clone()),
        Some(Some("k".into()))
    );
    let anti = pod
        .affinity
        .and_then(|a| a.pod_anti_affinity)
        .expect("anti-affinity");
    assert!(
        anti.preferred_during_scheduling_ignored_during_execution
            .is_none()
    );
    assert_eq!(
        anti.required_during_scheduling_ignored_during_execution
            .map(|r| r[0].topology_key.clone())
            .as_deref(),
        Some("zone")
    );
    let spread = pod
        .topology_spread_constraints
        .clone()
        .expect("the user's spread");
    assert_eq!(
        spread
            .iter()
            .map(|c| (
                c.topology_key.as_str(),
                c.max_skew,
                c.when_unsatisfiable.as_str()
            ))
            .collect::<Vec<_>>(),
        [("rack", 2, "DoNotSchedule")]
    );
    assert_eq!(
        pod.containers[0].image_pull_policy.as_deref(),
        Some("Always")
    );
    let secret = pod
        .volumes
        .expect("volumes")
        .into_iter()
        .find(|v| v.name == "secret")
        .expect("secret volume");
    assert_eq!(
        secret.secret.and_then(|s| s.secret_name).as_deref(),
        Some("mine")
    );
}

#[test]
fn the_peer_service_is_headless_and_publishes_pods_that_are_not_ready_on_the_peer_port_only() {
    let svc = objects::peer_service(&cluster("{}"));
    assert_eq!(svc.metadata.name.as_deref(), Some("demo-peers"));
    assert_owned(&svc.metadata, "peers");
    let spec = svc.spec.expect("spec");
    assert_eq!(spec.cluster_ip.as_deref(), Some("None"));
    assert_eq!(spec.publish_not_ready_addresses, Some(true));
    assert_eq!(spec.selector, Some(selector()));
    let ports: Vec<(Option<String>, i32)> = spec
        .ports
        .expect("ports")
        .into_iter()
        .map(|p| (p.name, p.port))
        .collect();
    // A not-Ready pod's client port is not published; its DNS name still
    // resolves (the operator reads reports there by that name).
    assert_eq!(ports, [(Some("peer".into()), 7401)]);
}

#[test]
fn the_client_service_routes_to_ready_pods_on_the_client_port_only() {
    let svc = objects::client_service(&cluster("{}"));
    assert_eq!(svc.metadata.name.as_deref(), Some("demo"));
    assert_owned(&svc.metadata, "client");
    let spec = svc.spec.expect("spec");
    assert_ne!(spec.cluster_ip.as_deref(), Some("None"));
    assert_ne!(spec.publish_not_ready_addresses, Some(true));
    assert_eq!(spec.selector, Some(selector()));
    let ports = spec.ports.expect("ports");
    assert_eq!(ports.len(), 1);
    assert_eq!(ports[0].port, 7400);
    assert_eq!(
        ports[0].target_port,
        Some(IntOrString::String("client".into()))
    );
}

#[test]
fn the_topology_configmap_holds_the_kv_core_topology_json() {
    let kvc = cluster("{replicas: 2, replication: {factor: 2}}");
    let topology = Topology {
        cluster_id: "ns/demo".into(),
        epoch: 4,
        read_consistency: kv_core::Consistency::Quorum,
        write_consistency: kv_core::Consistency::Quorum,
        placement: kv_core::PlacementSpec {
            strategy: kv_core::Strategy::ConsistentHashing,
            factor: 2,
            members: vec![0, 1],
        },
        pending: None,
        nodes: vec![
            objects::node_info(&kvc, 0, NodeState::Up),
            objects::node_info(&kvc, 1, NodeState::Failed),
        ],
    };
    assert_eq!(
        topology.validate(),
        Ok(()),
        "node_info gives valid host:port addresses"
    );
    assert_eq!(topology.nodes[1].address, "demo-1.demo-peers.ns.svc:7400");
    assert_eq!(
        topology.nodes[1].peer_address,
        "demo-1.demo-peers.ns.svc:7401"
    );
    let cm = objects::topology_configmap(&kvc, &topology).expect("serializes");
    assert_eq!(cm.metadata.name.as_deref(), Some("demo-topology"));
    assert_owned(&cm.metadata, "topology");
    let data = cm.data.expect("data");
    let parsed = Topology::from_json(data["topology.json"].as_bytes()).expect("valid topology");
    assert_eq!(parsed, topology);
}

#[test]
fn the_generated_secrets_hold_one_token_each_and_tokens_are_random() {
    let kvc = cluster("{}");
    let (a, b) = (objects::random_token(), objects::random_token());
    assert_eq!(a.len(), 64);
    assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
    assert_ne!(a, b);
    let secret = objects::auth_secret(&kvc, &a);
    assert_eq!(secret.metadata.name.as_deref(), Some("demo-auth"));
    assert_owned(&secret.metadata, "auth");
    let data = secret.data.expect("data");
    assert_eq!(data.keys().collect::<Vec<_>>(), ["token"]);
    assert_eq!(data["token"].0, a.as_bytes());
    let secret = objects::cluster_auth_secret(&kvc, &b);
    assert_eq!(secret.metadata.name.as_deref(), Some("demo-cluster-auth"));
    assert_owned(&secret.metadata, "cluster-auth");
    let data = secret.data.expect("data");
    assert_eq!(data.keys().collect::<Vec<_>>(), ["cluster-token"]);
    assert_eq!(data["cluster-token"].0, b.as_bytes());
}

#[test]
fn the_disruption_budget_allows_factor_minus_w_nodes_down_or_none_when_that_is_zero() {
    let cases = [
        ("{replicas: 3, replication: {factor: 3}}", Some(1)), // 3 - Quorum(3)=2
        ("{replicas: 5, replication: {factor: 5}}", Some(2)), // 5 - 3
        (
            "{replicas: 3, replication: {factor: 2, writeConsistency: One}}",
            Some(1),
        ),
        ("{replicas: 3, replication: {factor: 2}}", None), // 2 - Quorum(2)=2
        ("{replicas: 1, replication: {factor: 1}}", None),
        (
            "{replicas: 3, replication: {factor: 3, writeConsistency: All}}",
            None,
        ),
        (
            "{replicas: 4, replication: {strategy: Full, factor: 1}}",
            Some(1),
        ), // Full: 4 - 3
    ];
    for (spec, want) in cases {
        let kvc = cluster(spec);
        assert_eq!(objects::max_unavailable(&kvc), want, "{spec}");
        let pdb = objects::pdb(&kvc);
        assert_eq!(pdb.is_some(), want.is_some(), "{spec}");
        if let (Some(pdb), Some(n)) = (pdb, want) {
            assert_owned(&pdb.metadata, "node");
            let s = pdb.spec.expect("spec");
            assert_eq!(s.max_unavailable, Some(IntOrString::Int(n as i32)));
            assert_eq!(s.selector.and_then(|s| s.match_labels), Some(selector()));
        }
    }
}

/// Volume claims are kept by default (a volume may hold the only copy of
/// data); a KvCluster opts into deleting them, per event, and the
/// StatefulSet carries exactly that policy.
#[test]
fn the_pvc_retention_policy_defaults_to_retain_and_reaches_the_statefulset() {
    let policy = |kvc: &KvCluster| {
        let p = objects::statefulset(kvc, 3)
            .spec
            .expect("spec")
            .persistent_volume_claim_retention_policy
            .expect("a retention policy");
        (p.when_deleted, p.when_scaled)
    };
    assert_eq!(
        policy(&cluster("{}")),
        (Some("Retain".into()), Some("Retain".into()))
    );
    assert_eq!(
        policy(&cluster(
            "{storage: {size: 2Gi, persistentVolumeClaimRetentionPolicy: {whenDeleted: Delete}}}"
        )),
        (Some("Delete".into()), Some("Retain".into()))
    );
    assert!(
        serde_yaml::from_str::<kv_operator::k8s::crd::KvClusterSpec>(
            "{storage: {persistentVolumeClaimRetentionPolicy: {whenScaled: Sometimes}}}"
        )
        .is_err(),
        "an unknown action is refused"
    );
}

/// The `from` of the ingress rule on `port`; `None` means any source.
fn ingress_from(
    np: &k8s_openapi::api::networking::v1::NetworkPolicy,
    port: i32,
) -> Option<Vec<serde_json::Value>> {
    let rules = np
        .spec
        .as_ref()
        .and_then(|s| s.ingress.clone())
        .expect("ingress rules");
    let rule = rules
        .into_iter()
        .find(|r| {
            r.ports.as_ref().is_some_and(|ps| {
                ps.iter().any(|p| {
                    p.port == Some(IntOrString::Int(port)) && p.protocol.as_deref() == Some("TCP")
                })
            })
        })
        .unwrap_or_else(|| panic!("a rule for port {port}"));
    assert_eq!(rule.ports.map(|p| p.len()), Some(1), "one port per rule");
    rule.from.map(|from| {
        from.iter()
            .map(|p| serde_json::to_value(p).expect("json"))
            .collect()
    })
}

fn operator_pods_in(namespace_selector: serde_json::Value) -> serde_json::Value {
    serde_json::json!({
        "namespaceSelector": namespace_selector,
        "podSelector": {"matchLabels": {
            "app.kubernetes.io/name": "kv-operator",
            "app.kubernetes.io/component": "operator"
        }}
    })
}

#[test]
fn the_network_policy_opens_the_peer_port_only_to_the_clusters_nodes_and_the_operator() {
    let np =
        objects::network_policy(&cluster("{}"), Some("kvstore-system")).expect("on by default");
    assert_eq!(np.metadata.name.as_deref(), Some("demo"));
    assert_owned(&np.metadata, "node");
    let spec = np.spec.clone().expect("spec");
    assert_eq!(
        spec.pod_selector.and_then(|s| s.match_labels),
        Some(selector())
    );
    assert_eq!(spec.policy_types, Some(vec!["Ingress".to_string()]));
    assert_eq!(spec.egress, None, "egress is not fenced");
    assert_eq!(spec.ingress.map(|r| r.len()), Some(2));
    let operator = operator_pods_in(
        serde_json::json!({"matchLabels": {"kubernetes.io/metadata.name": "kvstore-system"}}),
    );
    assert_eq!(
        ingress_from(&np, PEER_PORT),
        Some(vec![
            serde_json::json!({"podSelector": {"matchLabels": selector()}}),
            operator,
        ])
    );
    assert_eq!(
        ingress_from(&np, CLIENT_PORT),
        None,
        "by default the client port takes any source"
    );
}

#[test]
fn the_operator_pods_match_the_labels_of_the_shipped_operator_deployments() {
    // deploy/operator.yaml's pod template and the chart's operator selector.
    let deploy = include_str!("../../deploy/operator.yaml");
    let chart = include_str!("../../charts/kvstore/templates/_helpers.tpl");
    for (k, v) in objects::OPERATOR_POD_LABELS {
        let line = format!("{k}: {v}");
        assert!(
            deploy.contains(&format!("        {line}\n")),
            "deploy/operator.yaml pods lack {line}"
        );
        assert!(
            chart.contains(&format!("\n{line}\n")),
            "the chart's operator selector lacks {line}"
        );
    }
}

#[test]
fn an_operator_of_unknown_namespace_is_let_in_from_any_namespace() {
    let np = objects::network_policy(&cluster("{}"), None).expect("policy");
    let peer = ingress_from(&np, PEER_PORT).expect("peer sources");
    assert_eq!(peer[1], operator_pods_in(serde_json::json!({})));
}

#[test]
fn client_from_restricts_the_client_port_and_keeps_the_operator_and_the_monitoring_namespace() {
    let kvc = cluster(
        "{networkPolicy: {clientFrom: [{namespaceSelector: {matchLabels: {team: apps}}}, {ipBlock: {cidr: 10.0.0.0/8}}], monitoringNamespace: monitoring}}",
    );
    let np = objects::network_policy(&kvc, Some("ops")).expect("policy");
    assert_eq!(
        ingress_from(&np, CLIENT_PORT),
        Some(vec![
            operator_pods_in(
                serde_json::json!({"matchLabels": {"kubernetes.io/metadata.name": "ops"}})
            ),
            serde_json::json!({"namespaceSelector": {"matchLabels": {"team": "apps"}}}),
            serde_json::json!({"ipBlock": {"cidr": "10.0.0.0/8"}}),
            serde_json::json!({"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}),
        ])
    );
    // The peer port is the same whatever clientFrom says.
    assert_eq!(ingress_from(&np, PEER_PORT).map(|p| p.len()), Some(2));
}

#[test]
fn a_monitoring_namespace_alone_leaves_the_client_port_open() {
    let kvc = cluster("{networkPolicy: {monitoringNamespace: monitoring}}");
    let np = objects::network_policy(&kvc, Some("ops")).expect("policy");
    assert_eq!(ingress_from(&np, CLIENT_PORT), None);
}

#[test]
fn network_policy_enabled_false_makes_none() {
    let kvc = cluster("{networkPolicy: {enabled: false}}");
    assert!(objects::network_policy(&kvc, Some("ops")).is_none());
}

#[test]
fn tls_generated_mounts_the_certificate_secret_passes_the_tls_flags_and_probes_over_https() {
    let pod_of = |kvc: &KvCluster| {
        let sts = objects::statefulset(kvc, 3);
        sts.spec
            .and_then(|s| s.template.spec)
            .expect("a pod template")
    };
    let off = pod_of(&cluster("{}"));
    let on = pod_of(&cluster("{tls: {mode: Generated}}"));
    let tls_args = |pod: &k8s_openapi::api::core::v1::PodSpec| -> Vec<String> {
        pod.containers[0]
            .args
            .iter()
            .flatten()
            .filter(|a| a.starts_with("--tls-"))
            .cloned()
            .collect()
    };
    assert!(tls_args(&off).is_empty(), "plaintext by default");
    assert_eq!(
        tls_args(&on),
        [
            "--tls-cert=/etc/kvstore/tls/tls.crt",
            "--tls-key=/etc/kvstore/tls/tls.key",
            "--tls-cluster-ca=/etc/kvstore/tls/ca.crt",
        ]
    );
    let volume = |pod: &k8s_openapi::api::core::v1::PodSpec| {
        pod.volumes
            .iter()
            .flatten()
            .find(|v| v.name == "tls")
            .cloned()
    };
    assert!(volume(&off).is_none());
    let secret = volume(&on).and_then(|v| v.secret).expect("a Secret volume");
    assert_eq!(secret.secret_name.as_deref(), Some("demo-tls"));
    assert_eq!(secret.default_mode, Some(0o440));
    let keys: Vec<String> = secret
        .items
        .iter()
        .flatten()
        .map(|i| i.key.clone())
        .collect();
    assert_eq!(keys, ["tls.crt", "tls.key", "ca.crt"], "never the CA's key");
    let mount = on.containers[0]
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.name == "tls")
        .expect("mounted");
    assert_eq!(
        (mount.mount_path.as_str(), mount.read_only),
        ("/etc/kvstore/tls", Some(true))
    );
    let schemes = |pod: &k8s_openapi::api::core::v1::PodSpec| {
        let c = &pod.containers[0];
        [&c.readiness_probe, &c.liveness_probe, &c.startup_probe]
            .map(|p| p.as_ref().and_then(|p| p.http_get.as_ref()?.scheme.clone()))
    };
    assert_eq!(schemes(&off), [None, None, None]);
    assert_eq!(
        schemes(&on),
        [
            Some("HTTPS".to_string()),
            Some("HTTPS".to_string()),
            Some("HTTPS".to_string())
        ]
    );
}
