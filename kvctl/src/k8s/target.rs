//! The API calls of `--cluster`: one KvCluster through a [`kube::Client`],
//! each call bounded in time, writes retried on a conflict.

use std::fmt::Write as _;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{Api, LogParams, Patch, PatchParams};
use kube::config::{Config, KubeConfigOptions};
use kube::{Client, ResourceExt};
use kv_crd::kvcluster::{KvCluster, RESTARTED_AT};
use serde::Serialize;
use serde_json::Value;

use crate::cli::TokenArg;

use super::*;

/// One KvCluster, through the API of the client it was built with.
pub struct Target {
    pub(super) api: Api<KvCluster>,
    /// The cluster's pods, for `logs`.
    pods: Api<Pod>,
    /// Its token Secrets, for `rotate-token`.
    secrets: Api<Secret>,
    pub(super) name: String,
    pub(super) namespace: String,
    /// The API server's URL, for messages ("" when not known).
    url: String,
}

/// What `fail` or `recover` did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Outcome {
    pub cluster: String,
    pub namespace: String,
    /// `fail` or `recover`.
    pub action: &'static str,
    pub node: u32,
    /// Whether failedNodes was written (false: it already said so).
    pub changed: bool,
    /// failedNodes as read before the write that took effect.
    pub failed_nodes_before: Vec<u32>,
    /// failedNodes as the API server stored it.
    pub failed_nodes: Vec<u32>,
    /// The `kvstore.dev/force-fault-injection` annotation as read before
    /// the write that took effect (`None`: absent).
    pub force_annotation_before: Option<String>,
    /// The annotation as the API server stored it.
    pub force_annotation: Option<String>,
    /// Reads of the resource it took (more than 1 after a 409 Conflict).
    pub attempts: usize,
}

impl Target {
    /// The KvCluster `name` in `namespace`, through `client`.
    pub fn new(client: Client, namespace: &str, name: &str) -> Target {
        Target {
            api: Api::namespaced(client.clone(), namespace),
            pods: Api::namespaced(client.clone(), namespace),
            secrets: Api::namespaced(client, namespace),
            name: name.to_string(),
            namespace: namespace.to_string(),
            url: String::new(),
        }
    }

    /// Finds the kubeconfig as kubectl does (`--context` picks a context of
    /// it); the namespace defaults to the context's, else "default".
    pub async fn connect(
        context: Option<&str>,
        namespace: Option<&str>,
        name: &str,
        timeout: Duration,
    ) -> Result<Target, KubeError> {
        Self::connect_with(context, namespace, name, timeout, Some(timeout)).await
    }

    /// As [`Target::connect`], with no bound on reads: for `logs --follow`,
    /// whose stream may stay quiet for longer than any timeout.
    pub async fn connect_streaming(
        context: Option<&str>,
        namespace: Option<&str>,
        name: &str,
        timeout: Duration,
    ) -> Result<Target, KubeError> {
        Self::connect_with(context, namespace, name, timeout, None).await
    }

    async fn connect_with(
        context: Option<&str>,
        namespace: Option<&str>,
        name: &str,
        timeout: Duration,
        read_timeout: Option<Duration>,
    ) -> Result<Target, KubeError> {
        let mut config = match context {
            None => Config::infer()
                .await
                .map_err(|e| KubeError::NoConfig(error_chain(&e)))?,
            Some(c) => {
                let options = KubeConfigOptions {
                    context: Some(c.to_string()),
                    ..KubeConfigOptions::default()
                };
                Config::from_kubeconfig(&options)
                    .await
                    .map_err(|e| KubeError::Context {
                        context: c.to_string(),
                        detail: error_chain(&e),
                    })?
            }
        };
        config.connect_timeout = Some(timeout);
        config.read_timeout = read_timeout;
        let namespace = match namespace {
            Some(ns) => ns.to_string(),
            None if config.default_namespace.is_empty() => "default".to_string(),
            None => config.default_namespace.clone(),
        };
        let url = config.cluster_url.to_string();
        let client = Client::try_from(config).map_err(|e| KubeError::Client(error_chain(&e)))?;
        let mut target = Target::new(client, &namespace, name);
        target.url = url;
        Ok(target)
    }

    /// Bounds `what` (a call on this target) by `timeout`.
    pub async fn within<T>(
        &self,
        timeout: Duration,
        what: impl std::future::Future<Output = Result<T, KubeError>>,
    ) -> Result<T, KubeError> {
        match tokio::time::timeout(timeout, what).await {
            Ok(r) => r,
            Err(_) => Err(KubeError::Timeout {
                url: if self.url.is_empty() {
                    "(unknown)".into()
                } else {
                    self.url.clone()
                },
                secs: timeout.as_secs_f64(),
            }),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The KvCluster as stored, status included.
    pub async fn get(&self) -> Result<KvCluster, KubeError> {
        self.api
            .get(&self.name)
            .await
            .map_err(|e| self.error("get", e))
    }

    /// Hold node `node` down: add it to spec.faultInjection.failedNodes;
    /// with `force`, also set the force annotation (see [`fail_change`]).
    pub async fn fail(&self, node: u32, force: bool) -> Result<Outcome, KubeError> {
        self.update("fail", node, |kvc| fail_change(kvc, node, force))
            .await
    }

    /// Release node `node`: remove it from spec.faultInjection.failedNodes,
    /// and the force annotation with the last one (see [`recover_change`]).
    pub async fn recover(&self, node: u32) -> Result<Outcome, KubeError> {
        self.update("recover", node, |kvc| recover_change(kvc, node))
            .await
    }

    /// Polls the KvCluster until the operator shows node `node` as `want`
    /// for the current generation (status.observedGeneration caught up with
    /// metadata.generation), at most `bound`: what a gateway's control call
    /// waits for, done here through the status the operator writes. A spec
    /// the operator refused ends the wait at once with its reason.
    pub async fn wait_for_node(
        &self,
        node: u32,
        want: kv_core::NodeState,
        bound: Duration,
    ) -> Result<Effect, KubeError> {
        let t0 = tokio::time::Instant::now();
        loop {
            let kvc = self.get().await?;
            let generation = kvc.metadata.generation;
            let status = kvc.status.unwrap_or_default();
            let current = generation.is_some() && status.observed_generation >= generation;
            let state = status
                .nodes
                .iter()
                .find(|n| n.ordinal == node)
                .map(|n| n.state);
            let refused = status
                .conditions
                .iter()
                .find(|c| c.type_ == "SpecRefused" && c.status == "True" && current)
                .map(|c| c.message.clone());
            let in_effect = current && state == Some(want);
            let waited = t0.elapsed();
            if in_effect || refused.is_some() || waited >= bound {
                return Ok(Effect {
                    node,
                    want,
                    in_effect,
                    state,
                    refused,
                    waited_ms: u64::try_from(waited.as_millis()).unwrap_or(u64::MAX),
                });
            }
            tokio::time::sleep(Duration::from_millis(500).min(bound - waited)).await;
        }
    }

    /// Ask kv-operator for a rolling restart: set the annotation
    /// `kvstore.dev/restartedAt` to `at` (a merge patch of that annotation
    /// alone, so nothing concurrent is overwritten; a new value is a new
    /// request whatever else changed).
    pub async fn restart(&self, at: &str) -> Result<RestartOutcome, KubeError> {
        let params = self.params();
        let stored = self
            .api
            .patch(&self.name, &params, &Patch::Merge(&restart_patch(at)))
            .await
            .map_err(|e| self.error("patch", e))?;
        Ok(RestartOutcome {
            cluster: self.name.clone(),
            namespace: self.namespace.clone(),
            requested_at: stored
                .annotations()
                .get(RESTARTED_AT)
                .cloned()
                .unwrap_or_default(),
            nodes: stored.spec.replicas,
        })
    }

    /// Asks kv-operator for a verification: the annotation
    /// `kvstore.dev/verifyRequestedAt` set to `at`.
    pub async fn request_verify(&self, at: &str) -> Result<(), KubeError> {
        let patch = serde_json::json!({"metadata": {"annotations": {
            kv_crd::verify::VERIFY_REQUESTED_AT: at
        }}});
        self.api
            .patch(&self.name, &self.params(), &Patch::Merge(&patch))
            .await
            .map_err(|e| self.error("patch", e))?;
        Ok(())
    }

    /// Polls the KvCluster until status.lastVerify answers `at`, at most
    /// `bound`; `None` past it.
    pub async fn wait_verify(
        &self,
        at: &str,
        bound: Duration,
    ) -> Result<Option<kv_crd::verify::VerifyStatus>, KubeError> {
        let t0 = tokio::time::Instant::now();
        loop {
            let kvc = self.get().await?;
            if let Some(v) = kvc
                .status
                .and_then(|s| s.last_verify)
                .filter(|v| v.requested_at == at)
            {
                return Ok(Some(v));
            }
            if t0.elapsed() >= bound {
                return Ok(None);
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Polls the KvCluster until status.lastRestart shows the restart `at`
    /// finished, at most `bound`.
    pub async fn wait_for_restart(
        &self,
        at: &str,
        bound: Duration,
    ) -> Result<RestartEffect, KubeError> {
        let t0 = tokio::time::Instant::now();
        loop {
            let kvc = self.get().await?;
            let waited = t0.elapsed();
            let effect = restart_effect(&kvc, at, waited);
            if effect.in_effect || waited >= bound {
                return Ok(effect);
            }
            tokio::time::sleep(Duration::from_millis(500).min(bound - waited)).await;
        }
    }

    /// The log of node `node`'s pod (its kv-node container), as a stream
    /// of bytes: the KvCluster is read first, so that an ordinal that is not
    /// one of its nodes, or a missing KvCluster, is named as such.
    pub async fn logs(
        &self,
        node: u32,
        args: &crate::cli::LogArgs,
    ) -> Result<impl futures::AsyncBufRead + use<>, KubeError> {
        let kvc = self.get().await?;
        if node >= kvc.spec.replicas {
            return Err(KubeError::NoSuchNode {
                node,
                name: self.name.clone(),
                replicas: kvc.spec.replicas,
            });
        }
        let pod = kv_crd::names::pod_name(&kvc, node);
        let params = LogParams {
            container: Some(NODE_CONTAINER.to_string()),
            follow: args.follow,
            tail_lines: args.tail,
            previous: args.previous,
            ..LogParams::default()
        };
        self.pods
            .log_stream(&pod, &params)
            .await
            .map_err(|e| match e {
                kube::Error::Api(s) if s.code == 404 => KubeError::NoPod {
                    pod: pod.clone(),
                    node,
                    name: self.name.clone(),
                    message: s.message,
                },
                kube::Error::Api(s) if s.code == 403 => KubeError::Forbidden {
                    verb: "get",
                    resource: "pods/log",
                    namespace: self.namespace.clone(),
                    message: s.message,
                },
                other => self.error("get the log of", other),
            })
    }

    /// Rotate `which` token of the KvCluster (see [`super::tokens`]): three
    /// writes of its Secret, each awaited until every node that is not
    /// Failed shows it in the status, at most `step_limit` each; `progress`
    /// is told each step as it is written.
    pub async fn rotate_token(
        &self,
        which: TokenArg,
        step_limit: Duration,
        progress: impl Fn(&str),
    ) -> Result<Rotation, KubeError> {
        let kvc = self.get().await?;
        let place = token_secret(&kvc, which);
        let current = self.secret_tokens(&place).await?;
        let new = kv_control::token::random_token();
        let mut rotation = Rotation {
            cluster: self.name.clone(),
            namespace: self.namespace.clone(),
            token: which.name(),
            secret: place.secret.clone(),
            key: place.key,
            fingerprint: kv_net::token::fingerprint(&new),
            steps: Vec::new(),
        };
        let steps: Vec<Vec<String>> = if nobody_runs(&kvc) {
            // Hibernated: each node reads the Secret when it wakes.
            vec![vec![new.clone()]]
        } else {
            rotation_steps(&current, &new).into()
        };
        for (i, tokens) in steps.iter().enumerate() {
            let step = i + 1;
            self.patch_kvc(&rotation_annotation_patch(Some(&format!(
                "{} {step}/3",
                which.name()
            ))))
            .await?;
            self.patch_secret(&place, &secret_patch(place.key, tokens))
                .await?;
            let expected = kv_net::token::fingerprints(tokens);
            progress(&format!(
                "step {step} of 3: Secret {} key {} holds {}; waiting for every node",
                place.secret,
                place.key,
                expected.join(",")
            ));
            let t0 = tokio::time::Instant::now();
            let nodes = loop {
                let kvc = self.get().await?;
                if nobody_runs(&kvc) {
                    break Vec::new();
                }
                let late = behind(&kvc, which, &expected);
                if late.is_empty() {
                    break waited_on(&kvc).map(|n| n.ordinal).collect();
                }
                if t0.elapsed() >= step_limit {
                    let _ = self.patch_kvc(&rotation_annotation_patch(None)).await;
                    return Err(KubeError::RotationStalled(stalled_message(
                        which, step, step_limit, &late,
                    )));
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            };
            rotation.steps.push(RotationStep {
                tokens: expected,
                nodes,
                waited_ms: u64::try_from(t0.elapsed().as_millis()).unwrap_or(u64::MAX),
            });
        }
        self.patch_kvc(&rotation_annotation_patch(None)).await?;
        Ok(rotation)
    }

    /// The tokens a Secret's key holds, in order.
    async fn secret_tokens(&self, place: &TokenSecret) -> Result<Vec<String>, KubeError> {
        let secret = self
            .secrets
            .get(&place.secret)
            .await
            .map_err(|e| self.secret_error("get", &place.secret, e))?;
        let no_token = |problem: String| KubeError::NoToken {
            secret: place.secret.clone(),
            namespace: self.namespace.clone(),
            key: place.key,
            problem,
        };
        let raw = secret
            .data
            .as_ref()
            .and_then(|d| d.get(place.key))
            .ok_or_else(|| no_token("the key is missing".into()))?;
        let text = std::str::from_utf8(&raw.0).map_err(|_| no_token("it is not UTF-8".into()))?;
        kv_net::token::parse("token", text).map_err(|e| no_token(e.to_string()))
    }

    async fn patch_secret(&self, place: &TokenSecret, patch: &Value) -> Result<(), KubeError> {
        self.secrets
            .patch(&place.secret, &self.params(), &Patch::Merge(patch))
            .await
            .map(|_| ())
            .map_err(|e| self.secret_error("patch", &place.secret, e))
    }

    async fn patch_kvc(&self, patch: &Value) -> Result<(), KubeError> {
        self.api
            .patch(&self.name, &self.params(), &Patch::Merge(patch))
            .await
            .map(|_| ())
            .map_err(|e| self.error("patch", e))
    }

    /// kvctl's writes, recorded under [`FIELD_MANAGER`].
    fn params(&self) -> PatchParams {
        PatchParams {
            field_manager: Some(FIELD_MANAGER.to_string()),
            ..PatchParams::default()
        }
    }

    fn secret_error(&self, verb: &'static str, secret: &str, e: kube::Error) -> KubeError {
        match e {
            kube::Error::Api(s) if s.code == 404 => KubeError::NoToken {
                secret: secret.to_string(),
                namespace: self.namespace.clone(),
                key: "",
                problem: "the Secret does not exist (kv-operator makes it when it first reconciles the KvCluster)".into(),
            },
            kube::Error::Api(s) if s.code == 403 => KubeError::Forbidden {
                verb,
                resource: "secrets",
                namespace: self.namespace.clone(),
                message: s.message,
            },
            other => self.error(verb, other),
        }
    }

    /// Read, decide on what was read, write with that read's resourceVersion
    /// as precondition; on 409 Conflict start over.
    async fn update(
        &self,
        action: &'static str,
        node: u32,
        decide: impl Fn(&KvCluster) -> Result<Change, KubeError>,
    ) -> Result<Outcome, KubeError> {
        for attempt in 1..=MAX_ATTEMPTS {
            let kvc = self.get().await?;
            let before = kvc.spec.fault_injection.failed_nodes.clone();
            let annotation_before = force_annotation(&kvc);
            let change = decide(&kvc)?;
            let mut outcome = Outcome {
                cluster: self.name.clone(),
                namespace: self.namespace.clone(),
                action,
                node,
                changed: false,
                failed_nodes_before: before.clone(),
                failed_nodes: before.clone(),
                force_annotation_before: annotation_before.clone(),
                force_annotation: annotation_before,
                attempts: attempt,
            };
            if change.failed_nodes == before && change.force == ForceEdit::Keep {
                return Ok(outcome);
            }
            let rv = kvc
                .resource_version()
                .ok_or_else(|| KubeError::NoResourceVersion(self.name.clone()))?;
            let params = self.params();
            let patch = fault_injection_patch(&rv, &change);
            match self
                .api
                .patch(&self.name, &params, &Patch::Merge(&patch))
                .await
            {
                Ok(stored) => {
                    outcome.changed = true;
                    outcome.force_annotation = force_annotation(&stored);
                    outcome.failed_nodes = stored.spec.fault_injection.failed_nodes;
                    return Ok(outcome);
                }
                Err(kube::Error::Api(s)) if s.code == 409 => continue,
                Err(e) => return Err(self.error("patch", e)),
            }
        }
        Err(KubeError::Conflict {
            name: self.name.clone(),
            namespace: self.namespace.clone(),
            attempts: MAX_ATTEMPTS,
        })
    }

    pub(super) fn error(&self, verb: &'static str, e: kube::Error) -> KubeError {
        match e {
            kube::Error::Api(s) if s.code == 404 => KubeError::NotFound {
                name: self.name.clone(),
                namespace: self.namespace.clone(),
            },
            kube::Error::Api(s) if s.code == 401 => KubeError::Unauthorized { message: s.message },
            kube::Error::Api(s) if s.code == 403 => KubeError::Forbidden {
                verb,
                resource: RESOURCE,
                namespace: self.namespace.clone(),
                message: s.message,
            },
            kube::Error::Api(s) => KubeError::Api {
                verb,
                name: self.name.clone(),
                code: s.code,
                reason: s.reason,
                message: s.message,
            },
            other => KubeError::Transport {
                verb,
                name: self.name.clone(),
                at: if self.url.is_empty() {
                    String::new()
                } else {
                    format!(" at {}", self.url)
                },
                detail: error_chain(&other),
            },
        }
    }
}

/// An error and its sources on one line (kube's errors nest the cause).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !s.contains(&text) {
            let _ = write!(s, ": {text}");
        }
        cause = c.source();
    }
    s
}

/// What [`Target::wait_for_node`] saw.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Effect {
    pub node: u32,
    /// The state waited for.
    pub want: kv_core::NodeState,
    /// The operator shows the node in that state for the current spec.
    pub in_effect: bool,
    /// The node's state in the status at the last look.
    pub state: Option<kv_core::NodeState>,
    /// The operator refused the spec (condition SpecRefused): its reason.
    pub refused: Option<String>,
    pub waited_ms: u64,
}
