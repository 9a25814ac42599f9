//! Every object a `KvCluster` owns, computed from the spec as pure functions.
//!
//! Nothing here talks to the API server: each builder takes the cluster (and,
//! for the topology, what the planner decided) and returns the object the
//! controller applies with server-side apply. That keeps the shape of the
//! cluster reviewable field by field in unit tests and renderable offline
//! (`kv-operator render`).
//!
//! Names: the StatefulSet is `<name>` (pods `<name>-<ordinal>`, so that
//! `--node-id-from-hostname` finds the ordinal), the headless peer Service
//! `<name>-peers`, the client Service `<name>`, the topology ConfigMap
//! `<name>-topology`, the generated token Secrets `<name>-auth` (client) and
//! `<name>-cluster-auth` (node to node), the
//! PodDisruptionBudget `<name>` and the NetworkPolicy `<name>`.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::apps::v1::{
    StatefulSet, StatefulSetPersistentVolumeClaimRetentionPolicy, StatefulSetSpec,
};
use k8s_openapi::api::core::v1::{
    Affinity, Capabilities, ConfigMap, ConfigMapVolumeSource, Container, ContainerPort,
    EmptyDirVolumeSource, EnvFromSource, EnvVar, EnvVarSource, HTTPGetAction, KeyToPath,
    ObjectFieldSelector, PersistentVolumeClaim, PersistentVolumeClaimSpec, PodAffinityTerm,
    PodAntiAffinity, PodSecurityContext, PodSpec, PodTemplateSpec, Probe, SeccompProfile, Secret,
    SecretEnvSource, SecretVolumeSource, SecurityContext, Service, ServicePort, ServiceSpec,
    TopologySpreadConstraint, Volume, VolumeMount, VolumeResourceRequirements,
    WeightedPodAffinityTerm,
};
use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort,
    NetworkPolicySpec,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{Resource, ResourceExt};
use kv_core::Topology;

use super::crd::KvCluster;

pub use kv_crd::names::*;

/// Labels of every owned object: the selector labels plus who manages it.
pub fn labels(kvc: &KvCluster, component: &str) -> BTreeMap<String, String> {
    let mut l = selector_labels(kvc);
    l.insert(
        "app.kubernetes.io/component".to_string(),
        component.to_string(),
    );
    l.insert(
        "app.kubernetes.io/managed-by".to_string(),
        MANAGER.to_string(),
    );
    l
}

/// Metadata with the owner reference that makes Kubernetes garbage-collect the
/// object with its KvCluster.
pub(crate) fn meta(kvc: &KvCluster, name: String, component: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: kvc.namespace(),
        labels: Some(labels(kvc, component)),
        owner_references: kvc.controller_owner_ref(&()).map(|o| vec![o]),
        ..ObjectMeta::default()
    }
}

/// The StatefulSet: one pod per node, each with its own volume.
///
/// `replicas` is the number of pods the topology needs (its highest ordinal
/// plus one), not `spec.replicas`: during a scale-down the leaving nodes keep
/// their pods until they have streamed their data out.
pub fn statefulset(kvc: &KvCluster, pods: u32) -> StatefulSet {
    let spec = &kvc.spec;
    let retention = spec.storage.persistent_volume_claim_retention_policy;
    let tls = super::tls::enabled(kvc);
    let mut args = vec![
        format!("--listen=0.0.0.0:{CLIENT_PORT}"),
        format!("--peer-listen=0.0.0.0:{PEER_PORT}"),
        format!(
            "--advertise=$(POD_NAME).{}.{}.svc:{CLIENT_PORT}",
            peer_service_name(kvc),
            namespace(kvc)
        ),
        format!("--data-dir={DATA_DIR}"),
        "--node-id-from-hostname".to_string(),
        format!("--token-file={SECRET_DIR}/{TOKEN_KEY}"),
        format!("--cluster-token-file={CLUSTER_SECRET_DIR}/{CLUSTER_TOKEN_KEY}"),
        format!("--topology-file={TOPOLOGY_DIR}/{TOPOLOGY_KEY}"),
        format!("--held-file={TOPOLOGY_DIR}/{HELD_KEY}"),
    ];
    if tls {
        use super::tls::{CA_CERT_KEY, CERT_KEY, KEY_KEY, TLS_DIR};
        args.extend([
            format!("--tls-cert={TLS_DIR}/{CERT_KEY}"),
            format!("--tls-key={TLS_DIR}/{KEY_KEY}"),
            format!("--tls-cluster-ca={TLS_DIR}/{CA_CERT_KEY}"),
        ]);
    }
    let http_probe = |path: &str, period: i32, failures: i32| Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_string()),
            port: IntOrString::String("client".to_string()),
            // The kubelet does not verify the certificate of an HTTPS
            // probe, and the client port asks for no client certificate.
            scheme: tls.then(|| "HTTPS".to_string()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        timeout_seconds: Some(2),
        ..Probe::default()
    };
    let mut container = Container {
        name: "kv-node".to_string(),
        image: Some(spec.image.clone()),
        image_pull_policy: spec.image_pull_policy.map(|p| p.as_str().to_string()),
        args: Some(args),
        env: Some(vec![EnvVar {
            name: "POD_NAME".to_string(),
            value_from: Some(EnvVarSource {
                field_ref: Some(ObjectFieldSelector {
                    field_path: "metadata.name".to_string(),
                    ..ObjectFieldSelector::default()
                }),
                ..EnvVarSource::default()
            }),
            ..EnvVar::default()
        }]),
        // A cluster started from a backup: the source, while it restores
        // (the Secret is deleted once it has; see `bootstrap`).
        env_from: spec.bootstrap.as_ref().map(|_| {
            vec![EnvFromSource {
                secret_ref: Some(SecretEnvSource {
                    name: super::bootstrap::secret_name(kvc),
                    optional: Some(true),
                }),
                ..EnvFromSource::default()
            }]
        }),
        ports: Some(vec![
            ContainerPort {
                name: Some("client".to_string()),
                container_port: CLIENT_PORT,
                protocol: Some("TCP".to_string()),
                ..ContainerPort::default()
            },
            ContainerPort {
                name: Some("peer".to_string()),
                container_port: PEER_PORT,
                protocol: Some("TCP".to_string()),
                ..ContainerPort::default()
            },
        ]),
        // Ready means Up with a current topology: the client Service routes
        // only to such pods. The operator itself never waits on readiness.
        readiness_probe: Some(http_probe("/readyz", 5, 1)),
        liveness_probe: Some(http_probe("/healthz", 10, 3)),
        // Opening a large database may take a while; liveness starts after it.
        startup_probe: Some(http_probe("/healthz", 2, 60)),
        resources: spec.resources.clone(),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(true),
            run_as_user: Some(NODE_UID),
            run_as_group: Some(NODE_UID),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".to_string()]),
                ..Capabilities::default()
            }),
            ..SecurityContext::default()
        }),
        volume_mounts: Some(vec![
            VolumeMount {
                name: "data".to_string(),
                mount_path: DATA_DIR.to_string(),
                ..VolumeMount::default()
            },
            VolumeMount {
                name: "topology".to_string(),
                mount_path: TOPOLOGY_DIR.to_string(),
                read_only: Some(true),
                ..VolumeMount::default()
            },
            VolumeMount {
                name: "secret".to_string(),
                mount_path: SECRET_DIR.to_string(),
                read_only: Some(true),
                ..VolumeMount::default()
            },
            VolumeMount {
                name: "cluster-secret".to_string(),
                mount_path: CLUSTER_SECRET_DIR.to_string(),
                read_only: Some(true),
                ..VolumeMount::default()
            },
            VolumeMount {
                name: "tmp".to_string(),
                mount_path: "/tmp".to_string(),
                ..VolumeMount::default()
            },
        ]),
        ..Container::default()
    };
    if tls {
        container
            .volume_mounts
            .get_or_insert_default()
            .push(VolumeMount {
                name: "tls".to_string(),
                mount_path: super::tls::TLS_DIR.to_string(),
                read_only: Some(true),
                ..VolumeMount::default()
            });
    }
    let mut volumes = vec![
        Volume {
            name: "topology".to_string(),
            config_map: Some(ConfigMapVolumeSource {
                name: topology_configmap_name(kvc),
                ..ConfigMapVolumeSource::default()
            }),
            ..Volume::default()
        },
        // Each token from its own Secret, and only its key: no file of the
        // pod holds both tokens unless the user's one Secret does. The
        // kubelet updates these files when a Secret changes (no subPath),
        // and the node reads them again (a token rotation).
        secret_volume("secret", auth_secret_name(kvc), &[TOKEN_KEY]),
        secret_volume(
            "cluster-secret",
            cluster_auth_secret_name(kvc),
            &[CLUSTER_TOKEN_KEY],
        ),
        // SQLite's temporary files, since the root filesystem is read-only.
        Volume {
            name: "tmp".to_string(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Volume::default()
        },
    ];
    if tls {
        // The certificate, its key and the cluster CA's certificate (never
        // the CA's key, which stays in `<name>-ca`), updated in place when
        // the operator renews them.
        use super::tls::{CA_CERT_KEY, CERT_KEY, KEY_KEY};
        volumes.push(secret_volume(
            "tls",
            super::tls::tls_secret_name(kvc),
            &[CERT_KEY, KEY_KEY, CA_CERT_KEY],
        ));
    }
    let affinity = spec
        .affinity
        .clone()
        .unwrap_or_else(|| default_affinity(kvc));
    let pod = PodSpec {
        containers: vec![container],
        volumes: Some(volumes),
        affinity: Some(affinity),
        tolerations: spec.tolerations.clone(),
        node_selector: spec.node_selector.clone(),
        topology_spread_constraints: Some(
            spec.topology_spread_constraints
                .clone()
                .unwrap_or_else(|| default_spread(kvc)),
        )
        .filter(|c| !c.is_empty()),
        enable_service_links: Some(false),
        automount_service_account_token: Some(false),
        termination_grace_period_seconds: Some(30),
        security_context: Some(PodSecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(NODE_UID),
            run_as_group: Some(NODE_UID),
            fs_group: Some(NODE_UID),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".to_string(),
                ..SeccompProfile::default()
            }),
            ..PodSecurityContext::default()
        }),
        ..PodSpec::default()
    };
    let claim = PersistentVolumeClaim {
        metadata: ObjectMeta {
            name: Some("data".to_string()),
            labels: Some(selector_labels(kvc)),
            ..ObjectMeta::default()
        },
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(vec!["ReadWriteOnce".to_string()]),
            storage_class_name: spec.storage.storage_class_name.clone(),
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([(
                    "storage".to_string(),
                    Quantity(spec.storage.size.clone()),
                )])),
                ..VolumeResourceRequirements::default()
            }),
            ..PersistentVolumeClaimSpec::default()
        }),
        ..PersistentVolumeClaim::default()
    };
    StatefulSet {
        metadata: meta(kvc, statefulset_name(kvc), "node"),
        spec: Some(StatefulSetSpec {
            replicas: Some(i32::try_from(pods).unwrap_or(i32::MAX)),
            service_name: Some(peer_service_name(kvc)),
            // Nodes find each other through the topology, not through start
            // order; parallel start lets a whole cluster come back at once.
            pod_management_policy: Some("Parallel".to_string()),
            selector: LabelSelector {
                match_labels: Some(selector_labels(kvc)),
                ..LabelSelector::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels(kvc, "node")),
                    ..ObjectMeta::default()
                }),
                spec: Some(pod),
            },
            volume_claim_templates: Some(vec![claim]),
            persistent_volume_claim_retention_policy: Some(
                StatefulSetPersistentVolumeClaimRetentionPolicy {
                    when_deleted: Some(retention.when_deleted.as_str().to_string()),
                    when_scaled: Some(retention.when_scaled.as_str().to_string()),
                },
            ),
            ..StatefulSetSpec::default()
        }),
        status: None,
    }
}

/// Spread nodes over Kubernetes nodes when possible, so that one machine
/// failing takes down at most one replica of each key.
fn default_affinity(kvc: &KvCluster) -> Affinity {
    Affinity {
        pod_anti_affinity: Some(PodAntiAffinity {
            preferred_during_scheduling_ignored_during_execution: Some(vec![
                WeightedPodAffinityTerm {
                    weight: 100,
                    pod_affinity_term: PodAffinityTerm {
                        topology_key: "kubernetes.io/hostname".to_string(),
                        label_selector: Some(LabelSelector {
                            match_labels: Some(selector_labels(kvc)),
                            ..LabelSelector::default()
                        }),
                        ..PodAffinityTerm::default()
                    },
                },
            ]),
            ..PodAntiAffinity::default()
        }),
        ..Affinity::default()
    }
}

/// Spread nodes evenly over zones where the scheduler can (ScheduleAnyway:
/// a cluster in one zone, or on nodes without a zone label, still
/// schedules), so that with factor 3 over three zones a zone's outage
/// takes at most one owner of each key. The hostname spread is
/// [`default_affinity`]'s.
fn default_spread(kvc: &KvCluster) -> Vec<TopologySpreadConstraint> {
    vec![TopologySpreadConstraint {
        max_skew: 1,
        topology_key: "topology.kubernetes.io/zone".to_string(),
        when_unsatisfiable: "ScheduleAnyway".to_string(),
        label_selector: Some(LabelSelector {
            match_labels: Some(selector_labels(kvc)),
            ..LabelSelector::default()
        }),
        ..TopologySpreadConstraint::default()
    }]
}

fn service_port(name: &str, port: i32) -> ServicePort {
    ServicePort {
        name: Some(name.to_string()),
        port,
        target_port: Some(IntOrString::String(name.to_string())),
        protocol: Some("TCP".to_string()),
        ..ServicePort::default()
    }
}

/// The headless Service behind the pods' stable DNS names. It publishes pods
/// that are not Ready too: a Recovering node must be reachable by its peers to
/// catch up, and peers must find a Joining node to stream data to it. It
/// lists only the peer port, so a not-Ready pod's client port is not
/// published; the DNS names (which the operator also uses for the client
/// port) do not depend on the ports listed.
pub fn peer_service(kvc: &KvCluster) -> Service {
    Service {
        metadata: meta(kvc, peer_service_name(kvc), "peers"),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".to_string()),
            publish_not_ready_addresses: Some(true),
            selector: Some(selector_labels(kvc)),
            ports: Some(vec![service_port("peer", PEER_PORT)]),
            ..ServiceSpec::default()
        }),
        status: None,
    }
}

/// The Service clients use. Its endpoints are the Ready pods only, and a pod
/// is Ready only when its node is Up, so clients never reach a node that is
/// catching up or fenced.
pub fn client_service(kvc: &KvCluster) -> Service {
    Service {
        metadata: meta(kvc, client_service_name(kvc), "client"),
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".to_string()),
            selector: Some(selector_labels(kvc)),
            ports: Some(vec![service_port("client", CLIENT_PORT)]),
            ..ServiceSpec::default()
        }),
        status: None,
    }
}

/// The topology ConfigMap the nodes watch (`topology.json`).
pub fn topology_configmap(
    kvc: &KvCluster,
    topology: &Topology,
) -> Result<ConfigMap, serde_json::Error> {
    let json = serde_json::to_string_pretty(topology)?;
    let held = kv_core::topology::format_held(&kvc.desired().failed_nodes);
    Ok(ConfigMap {
        metadata: meta(kvc, topology_configmap_name(kvc), "topology"),
        data: Some(BTreeMap::from([
            (TOPOLOGY_KEY.to_string(), json),
            (HELD_KEY.to_string(), held),
        ])),
        ..ConfigMap::default()
    })
}

/// A volume of some keys of a Secret, readable by the node's group only.
fn secret_volume(name: &str, secret: String, keys: &[&str]) -> Volume {
    Volume {
        name: name.to_string(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(secret),
            default_mode: Some(0o440),
            items: Some(
                keys.iter()
                    .map(|key| KeyToPath {
                        key: key.to_string(),
                        path: key.to_string(),
                        mode: None,
                    })
                    .collect(),
            ),
            ..SecretVolumeSource::default()
        }),
        ..Volume::default()
    }
}

/// The generated client token Secret `<name>-auth` (key `token`). Created
/// once when absent and never applied again: a token is changed by a
/// rotation (kv_net::token), not by a reconcile.
pub fn auth_secret(kvc: &KvCluster, token: &str) -> Secret {
    one_key_secret(
        kvc,
        format!("{}-auth", kvc.name_any()),
        "auth",
        TOKEN_KEY,
        token,
    )
}

/// The generated cluster token Secret `<name>-cluster-auth` (key
/// `cluster-token`), created once like [`auth_secret`].
pub fn cluster_auth_secret(kvc: &KvCluster, cluster_token: &str) -> Secret {
    one_key_secret(
        kvc,
        format!("{}-cluster-auth", kvc.name_any()),
        "cluster-auth",
        CLUSTER_TOKEN_KEY,
        cluster_token,
    )
}

fn one_key_secret(
    kvc: &KvCluster,
    name: String,
    component: &str,
    key: &str,
    value: &str,
) -> Secret {
    Secret {
        metadata: meta(kvc, name, component),
        type_: Some("Opaque".to_string()),
        data: Some(BTreeMap::from([(
            key.to_string(),
            ByteString(value.as_bytes().to_vec()),
        )])),
        ..Secret::default()
    }
}

pub use kv_control::token::random_token;

/// How many nodes a voluntary disruption (a drain) may take down at once
/// without losing write availability: `factor − W`. `None` when that is 0
/// (factor 1, or W = All): no budget would let any drain through.
pub fn max_unavailable(kvc: &KvCluster) -> Option<u32> {
    let factor = kvc.spec.effective_factor() as usize;
    let w = kvc.spec.replication.write_consistency.required(factor);
    let slack = factor.saturating_sub(w);
    (slack >= 1).then(|| u32::try_from(slack).unwrap_or(u32::MAX))
}

/// The PodDisruptionBudget, when the replication leaves room for one (see
/// [`max_unavailable`]); otherwise the controller warns with a condition.
pub fn pdb(kvc: &KvCluster) -> Option<PodDisruptionBudget> {
    let slack = max_unavailable(kvc)?;
    Some(PodDisruptionBudget {
        metadata: meta(kvc, pdb_name(kvc), "node"),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(i32::try_from(slack).unwrap_or(1))),
            selector: Some(LabelSelector {
                match_labels: Some(selector_labels(kvc)),
                ..LabelSelector::default()
            }),
            ..PodDisruptionBudgetSpec::default()
        }),
        status: None,
    })
}

fn policy_port(port: i32) -> Option<Vec<NetworkPolicyPort>> {
    Some(vec![NetworkPolicyPort {
        port: Some(IntOrString::Int(port)),
        protocol: Some("TCP".to_string()),
        ..NetworkPolicyPort::default()
    }])
}

fn namespace_named(name: &str) -> LabelSelector {
    LabelSelector {
        match_labels: Some(BTreeMap::from([(
            NAMESPACE_NAME_LABEL.to_string(),
            name.to_string(),
        )])),
        ..LabelSelector::default()
    }
}

/// kv-operator's pods in `operator_namespace`, or in any namespace when it
/// is unknown (an operator started without `POD_NAMESPACE`).
fn operator_peer(operator_namespace: Option<&str>) -> NetworkPolicyPeer {
    NetworkPolicyPeer {
        namespace_selector: Some(
            operator_namespace.map_or_else(LabelSelector::default, namespace_named),
        ),
        pod_selector: Some(LabelSelector {
            match_labels: Some(
                OPERATOR_POD_LABELS
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
            ..LabelSelector::default()
        }),
        ..NetworkPolicyPeer::default()
    }
}

/// The NetworkPolicy of the node pods, unless `spec.networkPolicy.enabled`
/// is false (see [`NetworkPolicySettings`](super::crd::NetworkPolicySettings)).
/// Ingress only: the peer port from the cluster's own node pods and
/// kv-operator's pods; the client port from anyone when
/// `clientFrom` is empty, else from kv-operator, `clientFrom` and the
/// monitoring namespace.
pub fn network_policy(kvc: &KvCluster, operator_namespace: Option<&str>) -> Option<NetworkPolicy> {
    let settings = &kvc.spec.network_policy;
    if !settings.enabled {
        return None;
    }
    let own_nodes = NetworkPolicyPeer {
        pod_selector: Some(LabelSelector {
            match_labels: Some(selector_labels(kvc)),
            ..LabelSelector::default()
        }),
        ..NetworkPolicyPeer::default()
    };
    let operator = operator_peer(operator_namespace);
    // No `from` at all opens the port to every source.
    let client_from = (!settings.client_from.is_empty()).then(|| {
        let mut from = vec![operator.clone()];
        from.extend(settings.client_from.iter().cloned());
        from.extend(
            settings
                .monitoring_namespace
                .as_deref()
                .map(|ns| NetworkPolicyPeer {
                    namespace_selector: Some(namespace_named(ns)),
                    ..NetworkPolicyPeer::default()
                }),
        );
        from
    });
    Some(NetworkPolicy {
        metadata: meta(kvc, network_policy_name(kvc), "node"),
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(LabelSelector {
                match_labels: Some(selector_labels(kvc)),
                ..LabelSelector::default()
            }),
            policy_types: Some(vec!["Ingress".to_string()]),
            ingress: Some(vec![
                NetworkPolicyIngressRule {
                    ports: policy_port(PEER_PORT),
                    from: Some(vec![own_nodes, operator]),
                },
                NetworkPolicyIngressRule {
                    ports: policy_port(CLIENT_PORT),
                    from: client_from,
                },
            ]),
            ..NetworkPolicySpec::default()
        }),
    })
}

/// The Prometheus Operator's PodMonitor kind (monitoring.coreos.com/v1).
pub fn pod_monitor_resource() -> kube::api::ApiResource {
    kube::api::ApiResource {
        group: "monitoring.coreos.com".to_string(),
        version: "v1".to_string(),
        api_version: "monitoring.coreos.com/v1".to_string(),
        kind: "PodMonitor".to_string(),
        plural: "podmonitors".to_string(),
    }
}

pub fn pod_monitor_name(kvc: &KvCluster) -> String {
    kvc.name_any()
}

/// The PodMonitor of the node pods' `/metrics` on the client port (https
/// with the cluster CA under `spec.tls`), or `None` when
/// `spec.monitoring.podMonitor` is false. `kvcluster` comes from the pod's
/// instance label; the Prometheus Operator adds `namespace` and `pod`.
pub fn pod_monitor(kvc: &KvCluster) -> Option<kube::api::DynamicObject> {
    let settings = &kvc.spec.monitoring;
    if !settings.pod_monitor {
        return None;
    }
    let mut labels = settings.labels.clone();
    labels.extend(self::labels(kvc, "monitoring"));
    let mut endpoint = serde_json::json!({
        "port": "client",
        "path": "/metrics",
        "relabelings": [{
            "sourceLabels": ["__meta_kubernetes_pod_label_app_kubernetes_io_instance"],
            "targetLabel": "kvcluster",
        }],
    });
    if let Some(interval) = &settings.interval {
        endpoint["interval"] = interval.clone().into();
    }
    if super::tls::enabled(kvc) {
        endpoint["scheme"] = "https".into();
        // The nodes' certificate Secret carries the CA too: the CA Secret
        // also holds the CA's key, which a scraper has no business reading.
        endpoint["tlsConfig"] = serde_json::json!({
            "ca": {"secret": {"name": super::tls::tls_secret_name(kvc), "key": super::tls::CA_CERT_KEY}},
            "serverName": format!("{}.{}.svc", client_service_name(kvc), kvc.namespace().unwrap_or_default()),
        });
    }
    let mut meta = meta(kvc, pod_monitor_name(kvc), "monitoring");
    meta.labels = Some(labels);
    let mut obj = kube::api::DynamicObject::new(&pod_monitor_name(kvc), &pod_monitor_resource());
    obj.metadata = meta;
    obj.data = serde_json::json!({
        "spec": {
            "selector": {"matchLabels": selector_labels(kvc)},
            "podMetricsEndpoints": [endpoint],
        }
    });
    Some(obj)
}
