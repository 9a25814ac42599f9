//! A container's environment, resolved the way the real kubelet does it:
//! `envFrom` first, then `env` in order, each value expanding `$(VAR)`
//! references to variables defined before it; `command` and `args` expand
//! against the result. ConfigMaps and Secrets are fetched by the caller
//! ([`Sources`]), so everything here is pure.

use std::collections::BTreeMap;

use anyhow::{Context, Result, anyhow, bail};
use k8s_openapi::api::core::v1::{Container, Pod};

/// What a pod's fieldRefs can name; the pod IP comes from this kubelet.
#[derive(Clone, Debug, Default)]
pub struct PodFacts {
    pub name: String,
    pub namespace: String,
    pub uid: String,
    pub node_name: String,
    pub service_account: String,
    pub pod_ip: String,
    pub host_ip: String,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
}

impl PodFacts {
    pub fn of(pod: &Pod, pod_ip: &str, host_ip: &str) -> Self {
        let spec = pod.spec.as_ref();
        PodFacts {
            name: pod.metadata.name.clone().unwrap_or_default(),
            namespace: pod.metadata.namespace.clone().unwrap_or_default(),
            uid: pod.metadata.uid.clone().unwrap_or_default(),
            node_name: spec.and_then(|s| s.node_name.clone()).unwrap_or_default(),
            service_account: spec
                .and_then(|s| s.service_account_name.clone())
                .unwrap_or_else(|| "default".into()),
            pod_ip: pod_ip.into(),
            host_ip: host_ip.into(),
            labels: pod.metadata.labels.clone().unwrap_or_default(),
            annotations: pod.metadata.annotations.clone().unwrap_or_default(),
        }
    }

    /// The value of a `fieldRef.fieldPath`, as the downward API gives it.
    pub fn field(&self, path: &str) -> Result<String> {
        let keyed = |prefix: &str, map: &BTreeMap<String, String>| {
            let key = path.strip_prefix(prefix)?.strip_suffix("']")?;
            Some(map.get(key).cloned().unwrap_or_default())
        };
        Ok(match path {
            "metadata.name" => self.name.clone(),
            "metadata.namespace" => self.namespace.clone(),
            "metadata.uid" => self.uid.clone(),
            "spec.nodeName" => self.node_name.clone(),
            "spec.serviceAccountName" => self.service_account.clone(),
            "status.podIP" | "status.podIPs" => self.pod_ip.clone(),
            "status.hostIP" | "status.hostIPs" => self.host_ip.clone(),
            _ => keyed("metadata.labels['", &self.labels)
                .or_else(|| keyed("metadata.annotations['", &self.annotations))
                .ok_or_else(|| anyhow!("fieldRef {path:?} is not supported"))?,
        })
    }
}

/// The data of the ConfigMaps and Secrets a pod refers to (Secret values
/// decoded), by name; a name missing here does not exist.
#[derive(Clone, Debug, Default)]
pub struct Sources {
    pub config_maps: BTreeMap<String, BTreeMap<String, String>>,
    pub secrets: BTreeMap<String, BTreeMap<String, String>>,
}

/// Names of the ConfigMaps and Secrets a container's env refers to.
pub fn referenced(container: &Container) -> (Vec<String>, Vec<String>) {
    let (mut cms, mut secrets) = (Vec::new(), Vec::new());
    for from in container.env_from.iter().flatten() {
        if let Some(r) = &from.config_map_ref {
            cms.push(r.name.clone());
        }
        if let Some(r) = &from.secret_ref {
            secrets.push(r.name.clone());
        }
    }
    for var in container.env.iter().flatten() {
        let Some(from) = &var.value_from else {
            continue;
        };
        if let Some(r) = &from.config_map_key_ref {
            cms.push(r.name.clone());
        }
        if let Some(r) = &from.secret_key_ref {
            secrets.push(r.name.clone());
        }
    }
    (cms, secrets)
}

/// An ordered environment (later entries replace earlier ones of the same name).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Env(pub Vec<(String, String)>);

impl Env {
    pub fn set(&mut self, name: &str, value: String) {
        match self.0.iter_mut().find(|(n, _)| n == name) {
            Some(entry) => entry.1 = value,
            None => self.0.push((name.to_string(), value)),
        }
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Resolves a container's env on top of `base` (what the runtime sets).
pub fn resolve(
    container: &Container,
    facts: &PodFacts,
    sources: &Sources,
    base: Env,
) -> Result<Env> {
    let mut env = base;
    for from in container.env_from.iter().flatten() {
        let prefix = from.prefix.clone().unwrap_or_default();
        let (data, what, name, optional) = if let Some(r) = &from.config_map_ref {
            (
                sources.config_maps.get(&r.name),
                "ConfigMap",
                &r.name,
                r.optional,
            )
        } else if let Some(r) = &from.secret_ref {
            (sources.secrets.get(&r.name), "Secret", &r.name, r.optional)
        } else {
            continue;
        };
        match data {
            Some(data) => {
                for (k, v) in data {
                    env.set(&format!("{prefix}{k}"), v.clone());
                }
            }
            None if optional == Some(true) => {}
            None => bail!("{what} {name:?} not found (envFrom)"),
        }
    }
    for var in container.env.iter().flatten() {
        let value = match (&var.value, &var.value_from) {
            (_, Some(from)) => {
                let looked_up = if let Some(f) = &from.field_ref {
                    Some(facts.field(&f.field_path)?)
                } else if let Some(r) = &from.config_map_key_ref {
                    key_of(
                        sources.config_maps.get(&r.name),
                        "ConfigMap",
                        &r.name,
                        &r.key,
                        r.optional,
                    )?
                } else if let Some(r) = &from.secret_key_ref {
                    key_of(
                        sources.secrets.get(&r.name),
                        "Secret",
                        &r.name,
                        &r.key,
                        r.optional,
                    )?
                } else {
                    bail!("env {}: resourceFieldRef is not supported", var.name);
                };
                match looked_up {
                    Some(v) => v,
                    None => continue, // optional and absent: the variable is not set
                }
            }
            (Some(v), None) => expand(v, &env),
            (None, None) => String::new(),
        };
        env.set(&var.name, value);
    }
    Ok(env)
}

fn key_of(
    data: Option<&BTreeMap<String, String>>,
    what: &str,
    name: &str,
    key: &str,
    optional: Option<bool>,
) -> Result<Option<String>> {
    let optional = optional == Some(true);
    match data.map(|d| d.get(key)) {
        Some(Some(v)) => Ok(Some(v.clone())),
        _ if optional => Ok(None),
        None => bail!("{what} {name:?} not found"),
        Some(None) => {
            Err(anyhow!("key {key:?} not found")).with_context(|| format!("{what} {name:?}"))
        }
    }
}

/// Kubernetes' `$(VAR)` expansion: a defined variable is replaced, an
/// undefined reference is left as written, `$$` is a literal `$`.
pub fn expand(s: &str, env: &Env) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(inner) = after.strip_prefix('(')
            && let Some(close) = inner.find(')')
        {
            let name = &inner[..close];
            match env.get(name) {
                Some(v) => out.push_str(v),
                None => out.push_str(&format!("$({name})")),
            }
            rest = &inner[close + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{
        ConfigMapKeySelector, EnvFromSource, EnvVar, EnvVarSource, ObjectFieldSelector,
        SecretEnvSource, SecretKeySelector,
    };

    fn facts() -> PodFacts {
        PodFacts {
            name: "demo-2".into(),
            namespace: "ns".into(),
            pod_ip: "127.0.1.3".into(),
            labels: [("app".to_string(), "kv".to_string())].into(),
            ..PodFacts::default()
        }
    }

    fn sources() -> Sources {
        Sources {
            config_maps: [(
                "cfg".to_string(),
                [("mode".to_string(), "fast".to_string())].into(),
            )]
            .into(),
            secrets: [(
                "auth".to_string(),
                [("token".to_string(), "s3cret".to_string())].into(),
            )]
            .into(),
        }
    }

    fn var(name: &str, value: &str) -> EnvVar {
        EnvVar {
            name: name.into(),
            value: Some(value.into()),
            ..EnvVar::default()
        }
    }

    fn from(name: &str, source: EnvVarSource) -> EnvVar {
        EnvVar {
            name: name.into(),
            value_from: Some(source),
            ..EnvVar::default()
        }
    }

    fn field(path: &str) -> EnvVarSource {
        EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.into(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn secret_key(name: &str, key: &str, optional: Option<bool>) -> EnvVarSource {
        EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: name.into(),
                key: key.into(),
                optional,
            }),
            ..Default::default()
        }
    }

    fn container(env: Vec<EnvVar>) -> Container {
        Container {
            name: "c".into(),
            env: Some(env),
            ..Container::default()
        }
    }

    #[test]
    fn field_refs_secret_and_config_map_keys_resolve() {
        let c = container(vec![
            from("POD_NAME", field("metadata.name")),
            from("NS", field("metadata.namespace")),
            from("IP", field("status.podIP")),
            from("APP", field("metadata.labels['app']")),
            from("TOKEN", secret_key("auth", "token", None)),
            from(
                "MODE",
                EnvVarSource {
                    config_map_key_ref: Some(ConfigMapKeySelector {
                        name: "cfg".into(),
                        key: "mode".into(),
                        optional: None,
                    }),
                    ..Default::default()
                },
            ),
        ]);
        let env = resolve(&c, &facts(), &sources(), Env::default()).unwrap();
        assert_eq!(
            env.0,
            [
                ("POD_NAME", "demo-2"),
                ("NS", "ns"),
                ("IP", "127.0.1.3"),
                ("APP", "kv"),
                ("TOKEN", "s3cret"),
                ("MODE", "fast")
            ]
            .map(|(a, b)| (a.to_string(), b.to_string()))
        );
    }

    #[test]
    fn values_expand_earlier_variables_and_keep_unknown_references() {
        let c = container(vec![
            from("POD_NAME", field("metadata.name")),
            var("ADVERTISE", "$(POD_NAME).peers:7400"),
            var("LATER", "$(UNDEFINED)-$$(POD_NAME)-$$"),
        ]);
        let env = resolve(&c, &facts(), &sources(), Env::default()).unwrap();
        assert_eq!(env.get("ADVERTISE"), Some("demo-2.peers:7400"));
        assert_eq!(env.get("LATER"), Some("$(UNDEFINED)-$(POD_NAME)-$"));
    }

    #[test]
    fn a_missing_secret_is_an_error_unless_optional() {
        let c = container(vec![from("T", secret_key("nope", "token", None))]);
        let err = resolve(&c, &facts(), &sources(), Env::default()).unwrap_err();
        assert!(
            format!("{err:#}").contains("Secret \"nope\" not found"),
            "{err:#}"
        );
        let c = container(vec![from("T", secret_key("auth", "other", None))]);
        let err = resolve(&c, &facts(), &sources(), Env::default()).unwrap_err();
        assert!(
            format!("{err:#}").contains("key \"other\" not found"),
            "{err:#}"
        );
        let c = container(vec![from("T", secret_key("nope", "token", Some(true)))]);
        let env = resolve(&c, &facts(), &sources(), Env::default()).unwrap();
        assert_eq!(env.get("T"), None);
    }

    #[test]
    fn env_from_comes_first_and_env_overrides_it() {
        let mut c = container(vec![var("token", "explicit")]);
        c.env_from = Some(vec![EnvFromSource {
            secret_ref: Some(SecretEnvSource {
                name: "auth".into(),
                optional: None,
            }),
            ..Default::default()
        }]);
        let mut base = Env::default();
        base.set("HOSTNAME", "demo-2".into());
        let env = resolve(&c, &facts(), &sources(), base).unwrap();
        assert_eq!(
            env.0,
            [("HOSTNAME", "demo-2"), ("token", "explicit")]
                .map(|(a, b)| (a.to_string(), b.to_string()))
        );
    }

    #[test]
    fn an_unsupported_field_ref_is_named() {
        let c = container(vec![from("X", field("spec.bogus"))]);
        let err = resolve(&c, &facts(), &sources(), Env::default()).unwrap_err();
        assert!(err.to_string().contains("spec.bogus"));
    }
}
