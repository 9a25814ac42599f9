//! Every object a KvCluster would own, rendered offline as YAML
//! (`kv-operator render -f kvcluster.yaml`).
//!
//! The same pure builders the controller applies, with the initial topology
//! the controller would write for a new cluster. The rendered objects carry no
//! owner references (there is no live KvCluster to point at) and the Secret
//! holds freshly generated tokens; they are meant for review and for schema
//! validation (`kubernetes-validate --strict`), not for `kubectl apply`.

use kube::ResourceExt;
use serde::Serialize;

use super::controller::decide;
use super::crd::KvCluster;
use super::objects;
use kv_control::planner::Observed;

/// Where deploy/operator.yaml runs kv-operator.
pub const DEFAULT_OPERATOR_NAMESPACE: &str = "kvstore-system";

/// Why a cluster could not be rendered.
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error("invalid KvCluster spec: {0}")]
    InvalidSpec(String),
    #[error("serializing {0}: {1}")]
    Serialization(&'static str, String),
}

fn doc(kind: &'static str, obj: &impl Serialize) -> Result<String, RenderError> {
    serde_yaml::to_string(obj).map_err(|e| RenderError::Serialization(kind, e.to_string()))
}

/// Render the owned objects of `kvc` (namespace `default` when it has none).
pub fn render(kvc: &KvCluster) -> Result<String, RenderError> {
    kvc.spec.validate().map_err(RenderError::InvalidSpec)?;
    let mut kvc = kvc.clone();
    if kvc.namespace().is_none() {
        kvc.metadata.namespace = Some("default".to_string());
    }
    kvc.metadata.uid = None;
    let observed = Observed {
        cluster_id: format!("{}/{}", kvc.namespace().unwrap_or_default(), kvc.name_any()),
        ..Observed::default()
    };
    let d = decide(&kvc, &observed).map_err(RenderError::InvalidSpec)?;
    let mut docs = Vec::new();
    if kvc.spec.auth_secret_name.is_none() {
        let secret = objects::auth_secret(&kvc, &objects::random_token());
        docs.push(doc("Secret", &secret)?);
        let secret = objects::cluster_auth_secret(&kvc, &objects::random_token());
        docs.push(doc("Secret", &secret)?);
    }
    let cm = objects::topology_configmap(&kvc, &d.topology)
        .map_err(|e| RenderError::Serialization("ConfigMap", e.to_string()))?;
    docs.push(doc("ConfigMap", &cm)?);
    docs.push(doc("Service", &objects::peer_service(&kvc))?);
    docs.push(doc("Service", &objects::client_service(&kvc))?);
    docs.push(doc("StatefulSet", &objects::statefulset(&kvc, d.pods))?);
    if let Some(pdb) = objects::pdb(&kvc) {
        docs.push(doc("PodDisruptionBudget", &pdb)?);
    }
    // The namespace of deploy/operator.yaml: the one a live operator gets
    // from POD_NAMESPACE is unknown offline.
    if let Some(np) = objects::network_policy(&kvc, Some(DEFAULT_OPERATOR_NAMESPACE)) {
        docs.push(doc("NetworkPolicy", &np)?);
    }
    Ok(docs.iter().map(|d| format!("---\n{d}")).collect::<String>())
}
