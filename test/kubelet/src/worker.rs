//! One pod's worker: it owns the pod's IP, directories, processes, probes and
//! status, and wakes on every update of the pod object and every 250 ms.
//!
//! Layout on disk: `<root>/pods/<namespace>_<name>_<uid>/volumes/<volume>/`
//! (ConfigMap, Secret, projected, downwardAPI and emptyDir volumes) and
//! `.../logs/<container>.log` (stdout and stderr); PVCs resolve to their
//! PersistentVolume's directory.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use k8s_openapi::api::authentication::v1::TokenRequest;
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, KeyToPath, PersistentVolume, PersistentVolumeClaim, Pod, Secret,
    ServiceAccount,
};
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::{Api, ResourceExt};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde_json::{Value, json};
use tokio::process::{Child, Command};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::env::{self, Env, PodFacts, Sources};
use crate::paths::{self, Mount};
use crate::probe::{self, Change, Kind};
use crate::volumes::{self, Payload};
use crate::{Ctx, node::MANAGER};

const TICK: Duration = Duration::from_millis(250);
const HOST_IP: &str = "127.0.0.1";

struct Ctr {
    spec: Container,
    child: Option<Child>,
    started_at: Option<String>,
    started_instant: Option<Instant>,
    restart_count: i32,
    /// Set while the container does not run and is not about to: why.
    waiting: Option<(String, String)>,
    /// The last termination (exit code, reason, times), as status JSON.
    last_termination: Option<Value>,
    /// No restart will follow the last termination.
    finished: bool,
    backoff: Duration,
    next_start: Instant,
    probes: Vec<probe::State>,
    started: bool,
    ready: bool,
}

struct Worker {
    ctx: Arc<Ctx>,
    pod: Pod,
    uid: String,
    dir: PathBuf,
    ip: Option<Ipv4Addr>,
    /// Volume name -> host directory, once every volume is in place.
    volumes: Option<BTreeMap<String, PathBuf>>,
    setup_error: Option<String>,
    next_volume_sync: Instant,
    /// Secret volumes have their own delay (`--secret-sync-delay`).
    next_secret_sync: Instant,
    /// Service-account tokens are re-requested at 80% of their lifetime, not every sync.
    next_token_refresh: Instant,
    ctrs: Vec<Ctr>,
    start_time: String,
    transitions: BTreeMap<&'static str, (bool, String)>,
    last_status: Option<Value>,
}

pub async fn run(
    ctx: Arc<Ctx>,
    pod: Pod,
    mut rx: watch::Receiver<Option<Pod>>,
    mut stop: watch::Receiver<bool>,
) {
    let mut w = Worker::new(ctx, pod);
    let who = w.who();
    loop {
        tokio::select! {
            _ = rx.changed() => {}
            _ = stop.changed() => {}
            _ = tokio::time::sleep(TICK) => {}
        }
        if *stop.borrow() {
            // The kubelet is stopping: end the processes, leave the pod as it is.
            let grace = w.grace().min(Duration::from_secs(30));
            w.terminate_all(grace, "kubelet stopping").await;
            return;
        }
        let latest = rx.borrow_and_update().clone();
        let Some(pod) = latest else {
            tracing::info!(pod = %who, "pod gone from the API server");
            let grace = w.grace();
            w.terminate_all(grace, "pod deleted").await;
            w.cleanup();
            return;
        };
        w.pod = pod;
        if w.pod.metadata.deletion_timestamp.is_some() {
            w.delete(&mut rx).await;
            return;
        }
        w.sync().await;
    }
}

fn now_str() -> String {
    Timestamp::now().to_string()
}

impl Worker {
    fn new(ctx: Arc<Ctx>, pod: Pod) -> Worker {
        let uid = pod.uid().unwrap_or_default();
        let dir = ctx.args.root.join("pods").join(format!(
            "{}_{}_{}",
            pod.namespace().unwrap_or_default(),
            pod.name_any(),
            uid
        ));
        // Restart counts survive a kubelet restart through the pod's status.
        let previous: BTreeMap<String, i32> = pod
            .status
            .iter()
            .flat_map(|s| s.container_statuses.iter().flatten())
            .map(|cs| (cs.name.clone(), cs.restart_count))
            .collect();
        let ctrs = pod
            .spec
            .iter()
            .flat_map(|s| s.containers.iter())
            .map(|c| Ctr {
                restart_count: previous.get(&c.name).map(|n| n + 1).unwrap_or(0),
                spec: c.clone(),
                child: None,
                started_at: None,
                started_instant: None,
                waiting: Some(("ContainerCreating".into(), String::new())),
                last_termination: None,
                finished: false,
                backoff: Duration::ZERO,
                next_start: Instant::now(),
                probes: Vec::new(),
                started: false,
                ready: false,
            })
            .collect();
        let start_time = pod
            .status
            .as_ref()
            .and_then(|s| s.start_time.as_ref())
            .map(|t| t.0.to_string())
            .unwrap_or_else(now_str);
        Worker {
            ctx,
            pod,
            uid,
            dir,
            ip: None,
            volumes: None,
            setup_error: None,
            next_volume_sync: Instant::now(),
            next_secret_sync: Instant::now(),
            next_token_refresh: Instant::now(),
            ctrs,
            start_time,
            transitions: BTreeMap::new(),
            last_status: None,
        }
    }

    fn who(&self) -> String {
        format!(
            "{}/{}",
            self.pod.namespace().unwrap_or_default(),
            self.pod.name_any()
        )
    }

    fn ns(&self) -> String {
        self.pod.namespace().unwrap_or_default()
    }

    fn grace(&self) -> Duration {
        let secs = self
            .pod
            .metadata
            .deletion_grace_period_seconds
            .or_else(|| {
                self.pod
                    .spec
                    .as_ref()
                    .and_then(|s| s.termination_grace_period_seconds)
            })
            .unwrap_or(30);
        Duration::from_secs(secs.max(0) as u64)
    }

    async fn sync(&mut self) {
        if self.volumes.is_none() {
            match self.setup().await {
                Ok(()) => self.setup_error = None,
                Err(e) => {
                    let msg = format!("{e:#}");
                    if self.setup_error.as_ref() != Some(&msg) {
                        tracing::warn!(pod = %self.who(), "setting up the pod: {msg}");
                    }
                    self.setup_error = Some(msg);
                }
            }
        } else if Instant::now() >= self.next_volume_sync.min(self.next_secret_sync)
            && let Err(e) = self.sync_volumes(false).await
        {
            tracing::warn!(pod = %self.who(), "refreshing volumes: {e:#}");
        }
        if self.volumes.is_some() {
            for i in 0..self.ctrs.len() {
                self.reap(i);
                self.maybe_start(i).await;
                self.probe(i).await;
            }
        }
        self.push_status().await;
    }

    /// IP, directories and volumes; an error leaves the pod ContainerCreating.
    async fn setup(&mut self) -> Result<()> {
        if self
            .pod
            .spec
            .as_ref()
            .is_some_and(|s| s.init_containers.as_ref().is_some_and(|c| !c.is_empty()))
        {
            bail!("init containers are not supported by the test kubelet");
        }
        if self.ip.is_none() {
            let preferred = self
                .pod
                .status
                .as_ref()
                .and_then(|s| s.pod_ip.as_ref())
                .and_then(|ip| ip.parse().ok());
            let ip = self
                .ctx
                .ips
                .lock()
                .expect("ip pool")
                .allocate(&self.uid, preferred);
            self.ip = Some(ip.ok_or_else(|| {
                anyhow!("no free pod IP under {}.0/24", self.ctx.args.pod_ip_prefix)
            })?);
        }
        fs::create_dir_all(self.dir.join("logs"))?;
        self.sync_volumes(true).await
    }

    /// Materialises every volume (`first`) or refreshes the ones backed by
    /// API objects, then schedules the next refresh.
    async fn sync_volumes(&mut self, first: bool) -> Result<()> {
        let now = Instant::now();
        let cm_due = first || now >= self.next_volume_sync;
        let secret_due = first || now >= self.next_secret_sync;
        let delay = Duration::from_secs_f64(self.ctx.args.configmap_sync_delay.max(0.1));
        let secret_delay = Duration::from_secs_f64(
            self.ctx
                .args
                .secret_sync_delay
                .unwrap_or(self.ctx.args.configmap_sync_delay)
                .max(0.1),
        );
        if cm_due {
            self.next_volume_sync = now + delay;
        }
        if secret_due {
            self.next_secret_sync = now + secret_delay;
        }
        let volumes = self
            .pod
            .spec
            .as_ref()
            .and_then(|s| s.volumes.clone())
            .unwrap_or_default();
        let mut dirs = BTreeMap::new();
        let stamp = Timestamp::now()
            .strftime("%Y_%m_%d_%H_%M_%S.%f")
            .to_string();
        for v in &volumes {
            let dir = self.dir.join("volumes").join(&v.name);
            // Only the kinds whose delay has passed are refreshed.
            let due = if v.secret.is_some() {
                secret_due
            } else {
                cm_due
            };
            if !due {
                dirs.insert(v.name.clone(), dir);
                continue;
            }
            let payload = if let Some(cm) = &v.config_map {
                Some(
                    self.config_map_files(
                        &cm.name,
                        cm.items.as_deref(),
                        cm.default_mode,
                        cm.optional,
                    )
                    .await?,
                )
            } else if let Some(s) = &v.secret {
                let name = s.secret_name.clone().unwrap_or_default();
                Some(
                    self.secret_files(&name, s.items.as_deref(), s.default_mode, s.optional)
                        .await?,
                )
            } else if let Some(p) = &v.projected {
                let has_token = p
                    .sources
                    .iter()
                    .flatten()
                    .any(|s| s.service_account_token.is_some());
                if has_token && !first && Instant::now() < self.next_token_refresh {
                    dirs.insert(v.name.clone(), dir);
                    continue;
                }
                let mut all = Payload::new();
                for src in p.sources.iter().flatten() {
                    let part = if let Some(cm) = &src.config_map {
                        self.config_map_files(
                            &cm.name,
                            cm.items.as_deref(),
                            p.default_mode,
                            cm.optional,
                        )
                        .await?
                    } else if let Some(s) = &src.secret {
                        self.secret_files(&s.name, s.items.as_deref(), p.default_mode, s.optional)
                            .await?
                    } else if let Some(d) = &src.downward_api {
                        self.downward_files(d.items.as_deref().unwrap_or_default(), p.default_mode)?
                    } else if let Some(t) = &src.service_account_token {
                        self.token_file(
                            &t.path,
                            t.audience.clone(),
                            t.expiration_seconds,
                            p.default_mode,
                        )
                        .await?
                    } else {
                        bail!(
                            "volume {:?}: a projected source other than configMap, secret, downwardAPI and serviceAccountToken",
                            v.name
                        );
                    };
                    all.extend(part);
                }
                Some(all)
            } else if let Some(d) = &v.downward_api {
                Some(self.downward_files(d.items.as_deref().unwrap_or_default(), d.default_mode)?)
            } else if v.empty_dir.is_some() {
                fs::create_dir_all(&dir)?;
                None
            } else if let Some(claim) = &v.persistent_volume_claim {
                dirs.insert(v.name.clone(), self.claim_dir(&claim.claim_name).await?);
                continue;
            } else if let Some(h) = &v.host_path {
                dirs.insert(v.name.clone(), PathBuf::from(&h.path));
                continue;
            } else {
                bail!(
                    "volume {:?}: only configMap, secret, projected, downwardAPI, emptyDir, persistentVolumeClaim and hostPath volumes are supported",
                    v.name
                );
            };
            if let Some(payload) = payload
                && volumes::write_atomic(&dir, &payload, &stamp)?
                && !first
            {
                tracing::info!(pod = %self.who(), volume = %v.name, "volume contents updated");
            }
            dirs.insert(v.name.clone(), dir);
        }
        if first {
            self.volumes = Some(dirs);
        }
        Ok(())
    }

    async fn config_map_files(
        &self,
        name: &str,
        items: Option<&[KeyToPath]>,
        mode: Option<i32>,
        optional: Option<bool>,
    ) -> Result<Payload> {
        let api: Api<ConfigMap> = Api::namespaced(self.ctx.client.clone(), &self.ns());
        let Some(cm) = api.get_opt(name).await? else {
            if optional == Some(true) {
                return Ok(Payload::new());
            }
            bail!("configmap {name:?} not found");
        };
        let mut data: BTreeMap<String, Vec<u8>> = cm
            .data
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k, v.into_bytes()))
            .collect();
        data.extend(
            cm.binary_data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, v.0)),
        );
        volumes::project(&data, items, mode).with_context(|| format!("configmap {name:?}"))
    }

    async fn secret_files(
        &self,
        name: &str,
        items: Option<&[KeyToPath]>,
        mode: Option<i32>,
        optional: Option<bool>,
    ) -> Result<Payload> {
        let api: Api<Secret> = Api::namespaced(self.ctx.client.clone(), &self.ns());
        let Some(s) = api.get_opt(name).await? else {
            if optional == Some(true) {
                return Ok(Payload::new());
            }
            bail!("secret {name:?} not found");
        };
        let data = s
            .data
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k, v.0))
            .collect();
        volumes::project(&data, items, mode).with_context(|| format!("secret {name:?}"))
    }

    fn downward_files(
        &self,
        items: &[k8s_openapi::api::core::v1::DownwardAPIVolumeFile],
        mode: Option<i32>,
    ) -> Result<Payload> {
        let facts = self.facts();
        let mut out = Payload::new();
        for item in items {
            let Some(f) = &item.field_ref else {
                bail!(
                    "downwardAPI {:?}: only fieldRef items are supported",
                    item.path
                )
            };
            let mode = item.mode.or(mode).unwrap_or(0o644) as u32 & 0o777;
            out.insert(
                item.path.clone(),
                (facts.field(&f.field_path)?.into_bytes(), mode),
            );
        }
        Ok(out)
    }

    /// A service-account token bound to this pod (TokenRequest API).
    async fn token_file(
        &mut self,
        path: &str,
        audience: Option<String>,
        expiration: Option<i64>,
        mode: Option<i32>,
    ) -> Result<Payload> {
        let sa = self
            .pod
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_else(|| "default".into());
        let api: Api<ServiceAccount> = Api::namespaced(self.ctx.client.clone(), &self.ns());
        let req = json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {
            "audiences": audience.map(|a| vec![a]).unwrap_or_default(),
            "expirationSeconds": expiration.unwrap_or(3607),
            "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": self.pod.name_any(), "uid": self.uid}}});
        let answer: TokenRequest = api
            .create_subresource("token", &sa, &PostParams::default(), &req)
            .await
            .with_context(|| format!("token for serviceaccount {sa:?}"))?;
        let status = answer
            .status
            .ok_or_else(|| anyhow!("TokenRequest for serviceaccount {sa:?}: no status"))?;
        let lifetime = status
            .expiration_timestamp
            .0
            .duration_since(Timestamp::now())
            .as_secs_f64()
            .max(60.0);
        self.next_token_refresh = self
            .next_token_refresh
            .max(Instant::now() + Duration::from_secs_f64(lifetime * 0.8));
        let token = status.token;
        Ok([(
            path.to_string(),
            (token.into_bytes(), mode.unwrap_or(0o644) as u32 & 0o777),
        )]
        .into())
    }

    async fn claim_dir(&self, claim: &str) -> Result<PathBuf> {
        let claims: Api<PersistentVolumeClaim> =
            Api::namespaced(self.ctx.client.clone(), &self.ns());
        let pvc = claims
            .get_opt(claim)
            .await?
            .ok_or_else(|| anyhow!("persistentvolumeclaim {claim:?} not found"))?;
        let bound = pvc.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound");
        let Some(pv_name) = pvc.spec.and_then(|s| s.volume_name).filter(|_| bound) else {
            bail!("persistentvolumeclaim {claim:?} is not bound yet");
        };
        let pv = Api::<PersistentVolume>::all(self.ctx.client.clone())
            .get(&pv_name)
            .await?;
        let spec = pv.spec.unwrap_or_default();
        let path = spec
            .host_path
            .map(|h| h.path)
            .or_else(|| spec.local.map(|l| l.path))
            .ok_or_else(|| anyhow!("persistentvolume {pv_name:?} is neither hostPath nor local"))?;
        fs::create_dir_all(&path).with_context(|| format!("creating {path}"))?;
        Ok(PathBuf::from(path))
    }

    fn facts(&self) -> PodFacts {
        PodFacts::of(
            &self.pod,
            &self.ip.map(|i| i.to_string()).unwrap_or_default(),
            HOST_IP,
        )
    }

    fn mounts(&self, c: &Container) -> Result<Vec<Mount>> {
        let dirs = self.volumes.as_ref().expect("volumes are set up");
        c.volume_mounts
            .iter()
            .flatten()
            .map(|m| {
                let dir = dirs
                    .get(&m.name)
                    .ok_or_else(|| anyhow!("volumeMount {:?}: no volume of that name", m.name))?;
                let host_path = match m.sub_path.as_deref() {
                    Some(sub) if !sub.is_empty() => {
                        let p = dir.join(sub);
                        fs::create_dir_all(&p)?;
                        p
                    }
                    _ => dir.clone(),
                };
                Ok(Mount {
                    container_path: m.mount_path.clone(),
                    host_path,
                })
            })
            .collect()
    }

    /// Notes an exited process and decides whether and when it restarts.
    fn reap(&mut self, i: usize) {
        let policy = self.restart_policy();
        let pod_ref = format!("{}_{}({})", self.pod.name_any(), self.ns(), self.uid);
        let c = &mut self.ctrs[i];
        let Some(child) = c.child.as_mut() else {
            return;
        };
        let Ok(Some(status)) = child.try_wait() else {
            return;
        };
        let code = exit_code(status);
        tracing::info!(pod = %self.pod.name_any(), container = %c.spec.name, code, "container exited");
        let ran = c.started_instant.map(|t| t.elapsed()).unwrap_or_default();
        c.child = None;
        record_exit(c, code, None);
        let restart = match policy.as_str() {
            "Never" => false,
            "OnFailure" => code != 0,
            _ => true,
        };
        if !restart {
            c.finished = true;
            c.waiting = None;
            return;
        }
        // Back-off as the real kubelet: immediate first restart, then doubling,
        // reset after ten minutes of running.
        let base = Duration::from_secs_f64(self.ctx.args.restart_backoff);
        let max = Duration::from_secs_f64(self.ctx.args.max_restart_backoff);
        if ran >= Duration::from_secs(600) {
            c.backoff = Duration::ZERO;
        }
        c.next_start = Instant::now() + c.backoff;
        if !c.backoff.is_zero() {
            c.waiting = Some((
                "CrashLoopBackOff".into(),
                format!(
                    "back-off {:?} restarting failed container={} pod={pod_ref}",
                    c.backoff, c.spec.name
                ),
            ));
        }
        c.backoff = if c.backoff.is_zero() {
            base
        } else {
            (c.backoff * 2).min(max)
        };
    }

    fn restart_policy(&self) -> String {
        self.pod
            .spec
            .as_ref()
            .and_then(|s| s.restart_policy.clone())
            .unwrap_or_else(|| "Always".into())
    }

    async fn maybe_start(&mut self, i: usize) {
        let c = &self.ctrs[i];
        if c.child.is_some() || c.finished || Instant::now() < c.next_start {
            return;
        }
        let image = c.spec.image.clone().unwrap_or_default();
        let Some(binary) = self
            .ctx
            .args
            .image_map
            .iter()
            .find(|(im, _)| *im == image)
            .map(|(_, b)| b.clone())
        else {
            let known = self.ctx.images().into_iter().collect::<Vec<_>>().join(", ");
            self.set_waiting(
                i,
                "ErrImagePull",
                format!(
                    "image {image:?} is not in the test kubelet's --image-map (known: {known})"
                ),
            );
            return;
        };
        match self.spawn(i, &binary).await {
            Ok(()) => {}
            Err(e) => self.set_waiting(i, "CreateContainerConfigError", format!("{e:#}")),
        }
    }

    fn set_waiting(&mut self, i: usize, reason: &str, message: String) {
        let c = &mut self.ctrs[i];
        if c.waiting.as_ref().map(|w| (w.0.as_str(), w.1.as_str()))
            != Some((reason, message.as_str()))
        {
            tracing::warn!(pod = %self.pod.name_any(), container = %c.spec.name, reason, "{message}");
        }
        c.waiting = Some((reason.into(), message));
        c.next_start = Instant::now() + Duration::from_secs(2);
    }

    async fn spawn(&mut self, i: usize, binary: &Path) -> Result<()> {
        let spec = self.ctrs[i].spec.clone();
        let ip = self.ip.expect("ip is set up");
        let mounts = self.mounts(&spec)?;
        let facts = self.facts();
        let sources = self.env_sources(&spec).await?;
        let mut base = Env::default();
        base.set(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
        );
        let hostname = self
            .pod
            .spec
            .as_ref()
            .and_then(|s| s.hostname.clone())
            .unwrap_or_else(|| self.pod.name_any());
        base.set("HOSTNAME", hostname);
        base.set("POD_IP", ip.to_string());
        if let Some((host, port)) = &self.ctx.api_host_port {
            base.set("KUBERNETES_SERVICE_HOST", host.clone());
            base.set("KUBERNETES_SERVICE_PORT", port.to_string());
        }
        let resolved = env::resolve(&spec, &facts, &sources, base)?;
        let rewrite = |s: &str| paths::rewrite_wildcard(&paths::rewrite_mounts(s, &mounts), ip);
        let command: Vec<String> = spec
            .command
            .iter()
            .flatten()
            .map(|s| rewrite(&env::expand(s, &resolved)))
            .collect();
        let args: Vec<String> = spec
            .args
            .iter()
            .flatten()
            .map(|s| rewrite(&env::expand(s, &resolved)))
            .collect();
        let envs: Vec<(String, String)> = resolved
            .0
            .iter()
            .map(|(k, v)| (k.clone(), rewrite(v)))
            .collect();
        // The image's entrypoint is the mapped binary; a `command` names it by
        // its file name, or a file in a volume.
        let (program, argv) = match command.split_first() {
            None => (binary.to_path_buf(), args),
            Some((first, rest)) => {
                let p = Path::new(first);
                let program = if p.file_name() == binary.file_name() {
                    binary.to_path_buf()
                } else if p.is_absolute()
                    && p.is_file()
                    && mounts.iter().any(|m| p.starts_with(&m.host_path))
                {
                    p.to_path_buf()
                } else {
                    bail!(
                        "command {first:?}: the test kubelet has no image filesystem; only {:?} (the image's binary) or a file in a volume can run",
                        binary.file_name().unwrap_or_default()
                    );
                };
                (program, rest.iter().cloned().chain(args).collect())
            }
        };
        let workdir = match spec.working_dir.as_deref() {
            Some(w) if !w.is_empty() => PathBuf::from(rewrite(w)),
            _ => self.dir.clone(),
        };
        let log_path = self.dir.join("logs").join(format!("{}.log", spec.name));
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)?;
        let mut cmd = Command::new(&program);
        cmd.args(&argv)
            .env_clear()
            .envs(envs)
            .current_dir(&workdir)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0)
            .kill_on_drop(true);
        // SAFETY: prctl is async-signal-safe; it only asks the kernel to
        // SIGKILL the child when this kubelet dies, even by SIGKILL.
        // With cluster DNS, also a mount namespace of its own with the
        // kubelet's hosts file as /etc/hosts (dns::Namespace::enter: only
        // system calls on strings prepared before the fork).
        let dns = self.ctx.dns.clone();
        unsafe {
            cmd.pre_exec(move || {
                nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)?;
                match &dns {
                    Some(ns) => ns.enter(),
                    None => Ok(()),
                }
            });
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", program.display()))?;
        tracing::info!(pod = %self.pod.name_any(), container = %spec.name, pid = child.id(), ip = %ip,
            program = %program.display(), args = ?argv, log = %log_path.display(), "container started");
        let now = Instant::now();
        let probes: Vec<probe::State> = [
            (Kind::Startup, &spec.startup_probe),
            (Kind::Liveness, &spec.liveness_probe),
            (Kind::Readiness, &spec.readiness_probe),
        ]
        .into_iter()
        .filter_map(|(k, p)| {
            p.as_ref()
                .map(|p| probe::State::new(probe::Spec::of(k, p, &spec), now))
        })
        .collect();
        let c = &mut self.ctrs[i];
        if c.started_at.is_some() {
            c.restart_count += 1;
        }
        c.started = spec.startup_probe.is_none();
        c.ready = c.started && spec.readiness_probe.is_none();
        c.probes = probes;
        c.child = Some(child);
        c.started_at = Some(now_str());
        c.started_instant = Some(now);
        c.waiting = None;
        Ok(())
    }

    async fn env_sources(&self, c: &Container) -> Result<Sources> {
        let (cms, secrets) = env::referenced(c);
        let mut sources = Sources::default();
        let cm_api: Api<ConfigMap> = Api::namespaced(self.ctx.client.clone(), &self.ns());
        for name in cms.into_iter().collect::<BTreeSet<_>>() {
            if let Some(cm) = cm_api.get_opt(&name).await? {
                sources
                    .config_maps
                    .insert(name, cm.data.unwrap_or_default());
            }
        }
        let s_api: Api<Secret> = Api::namespaced(self.ctx.client.clone(), &self.ns());
        for name in secrets.into_iter().collect::<BTreeSet<_>>() {
            if let Some(s) = s_api.get_opt(&name).await? {
                let data = s
                    .data
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| (k, String::from_utf8_lossy(&v.0).into_owned()));
                sources.secrets.insert(name, data.collect());
            }
        }
        Ok(sources)
    }

    /// Runs the container's due probes; a failed liveness or startup probe
    /// kills it (it then restarts per restartPolicy).
    async fn probe(&mut self, i: usize) {
        let Some(ip) = self.ip else { return };
        let pod_name = self.pod.name_any();
        let grace = self.grace();
        let c = &mut self.ctrs[i];
        if c.child.is_none() {
            return;
        }
        let mut kill = None;
        for p in c.probes.iter_mut() {
            let gated = match p.spec.kind {
                Kind::Startup => c.started,
                _ => !c.started,
            };
            let now = Instant::now();
            if gated || !p.due(now) {
                continue;
            }
            let result = probe::run(&p.spec.action, ip, p.spec.timeout).await;
            let change = p.record(result.is_ok(), Instant::now());
            if let Err(why) = &result {
                tracing::debug!(pod = %pod_name, container = %c.spec.name, kind = ?p.spec.kind, "probe failed: {why}");
            }
            match (p.spec.kind, change) {
                (Kind::Startup, Change::Succeeded) => {
                    c.started = true;
                    c.ready = !c.probes_have(Kind::Readiness);
                    tracing::info!(pod = %pod_name, container = %c.spec.name, "startup probe succeeded");
                    break;
                }
                (Kind::Readiness, Change::Succeeded | Change::Failed) => {
                    c.ready = p.ok;
                    tracing::info!(pod = %pod_name, container = %c.spec.name, ready = p.ok,
                        "readiness changed{}", result.err().map(|e| format!(": {e}")).unwrap_or_default());
                }
                (Kind::Startup | Kind::Liveness, Change::Failed) => {
                    kill = Some(format!(
                        "{:?} probe failed: {}",
                        p.spec.kind,
                        result.err().unwrap_or_default()
                    ));
                    break;
                }
                _ => {}
            }
        }
        if let Some(why) = kill {
            tracing::warn!(pod = %pod_name, container = %c.spec.name, "{why}: killing the container");
            terminate(c, grace).await;
            // reap() on the next tick records the exit and schedules the restart.
            if let Some(child) = c.child.as_mut()
                && let Ok(status) = child.wait().await
            {
                let code = exit_code(status);
                c.child = None;
                record_exit(c, code, Some(why));
                c.next_start = Instant::now() + c.backoff;
                let policy = self
                    .pod
                    .spec
                    .as_ref()
                    .and_then(|s| s.restart_policy.clone())
                    .unwrap_or_else(|| "Always".into());
                if policy == "Never" {
                    c.finished = true;
                }
            }
        }
    }

    /// SIGTERM to every process group, SIGKILL to those alive after `grace`.
    async fn terminate_all(&mut self, grace: Duration, why: &str) {
        let running: Vec<usize> = (0..self.ctrs.len())
            .filter(|i| self.ctrs[*i].child.is_some())
            .collect();
        if running.is_empty() {
            return;
        }
        tracing::info!(pod = %self.who(), ?grace, "{why}: stopping containers");
        for &i in &running {
            signal(&self.ctrs[i], Signal::SIGTERM);
        }
        let deadline = Instant::now() + grace;
        for &i in &running {
            let c = &mut self.ctrs[i];
            let pid = c.child.as_ref().and_then(|ch| ch.id());
            let child = c.child.as_mut().expect("running");
            let status = match tokio::time::timeout_at(deadline, child.wait()).await {
                Ok(s) => s,
                Err(_) => {
                    tracing::warn!(pod = %self.pod.name_any(), container = %c.spec.name, "still running after the grace period: SIGKILL");
                    signal_pid(pid, Signal::SIGKILL);
                    child.wait().await
                }
            };
            let code = status.map(exit_code).unwrap_or(137);
            c.child = None;
            record_exit(c, code, None);
            c.finished = true;
            c.waiting = None;
            tracing::info!(pod = %self.pod.name_any(), container = %c.spec.name, code, "container stopped");
        }
    }

    /// Graceful deletion: stop, report, then remove the pod object (grace 0)
    /// and wait for it to be gone.
    async fn delete(&mut self, rx: &mut watch::Receiver<Option<Pod>>) {
        let grace = self.grace();
        self.terminate_all(grace, "pod deletion requested").await;
        self.push_status().await;
        let pods: Api<Pod> = Api::namespaced(self.ctx.client.clone(), &self.ns());
        let dp = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(Preconditions {
                uid: Some(self.uid.clone()),
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        match pods.delete(&self.pod.name_any(), &dp).await {
            Ok(_) => tracing::info!(pod = %self.who(), "pod deleted (grace 0)"),
            Err(e) => tracing::warn!(pod = %self.who(), "deleting the pod: {e}"),
        }
        // Finalizers may hold the object; it is ours until it is gone.
        while rx.borrow().is_some() {
            if rx.changed().await.is_err() {
                break;
            }
        }
        self.cleanup();
    }

    fn cleanup(&mut self) {
        self.ctx.ips.lock().expect("ip pool").release(&self.uid);
        if let Err(e) = fs::remove_dir_all(&self.dir) {
            tracing::debug!("removing {}: {e}", self.dir.display());
        }
    }

    fn transition(&mut self, ty: &'static str, status: bool) -> String {
        let entry = self
            .transitions
            .entry(ty)
            .or_insert_with(|| (status, now_str()));
        if entry.0 != status {
            *entry = (status, now_str());
        }
        entry.1.clone()
    }

    fn condition(&mut self, ty: &'static str, status: bool, reason: Option<&str>) -> Value {
        let since = self.transition(ty, status);
        let mut c = json!({"type": ty, "status": if status { "True" } else { "False" }, "lastTransitionTime": since});
        if let Some(r) = reason {
            c["reason"] = json!(r);
        }
        c
    }

    async fn push_status(&mut self) {
        let statuses: Vec<Value> = self
            .ctrs
            .iter()
            .map(|c| {
                container_status(
                    c,
                    self.ctx
                        .args
                        .image_map
                        .iter()
                        .find(|(i, _)| Some(i) == c.spec.image.as_ref())
                        .map(|(_, b)| b.as_path()),
                )
            })
            .collect();
        let phase = phase(&self.ctrs, self.volumes.is_some());
        let all_ready =
            !self.ctrs.is_empty() && self.ctrs.iter().all(|c| c.ready && c.child.is_some());
        let not_ready = (!all_ready).then_some("ContainersNotReady");
        let setup = self.volumes.is_some();
        let conditions = vec![
            self.condition("PodReadyToStartContainers", setup, None),
            self.condition("Initialized", true, None),
            self.condition("ContainersReady", all_ready, not_ready),
            self.condition("Ready", all_ready, not_ready),
        ];
        let mut status = json!({
            "phase": phase, "hostIP": HOST_IP, "hostIPs": [{"ip": HOST_IP}],
            "startTime": self.start_time, "conditions": conditions, "containerStatuses": statuses,
        });
        if let Some(ip) = self.ip {
            status["podIP"] = json!(ip.to_string());
            status["podIPs"] = json!([{"ip": ip.to_string()}]);
        }
        if let Some(e) = &self.setup_error {
            status["message"] = json!(e);
        }
        if self.last_status.as_ref() == Some(&status) {
            return;
        }
        let pods: Api<Pod> = Api::namespaced(self.ctx.client.clone(), &self.ns());
        let patch = json!({"status": status});
        match pods
            .patch_status(
                &self.pod.name_any(),
                &PatchParams {
                    field_manager: Some(MANAGER.into()),
                    ..PatchParams::default()
                },
                &Patch::Strategic(&patch),
            )
            .await
        {
            Ok(_) => self.last_status = Some(status),
            Err(e) => tracing::warn!(pod = %self.who(), "updating the pod status: {e}"),
        }
    }
}

impl Ctr {
    fn probes_have(&self, kind: Kind) -> bool {
        self.probes.iter().any(|p| p.spec.kind == kind)
    }
}

fn exit_code(status: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(9))
}

fn record_exit(c: &mut Ctr, code: i32, message: Option<String>) {
    c.ready = false;
    c.started = false;
    c.probes.clear();
    let mut t = json!({
        "exitCode": code, "reason": if code == 0 { "Completed" } else { "Error" },
        "startedAt": c.started_at, "finishedAt": now_str(),
    });
    if let Some(m) = message {
        t["message"] = json!(m);
    }
    c.last_termination = Some(t);
}

fn signal(c: &Ctr, sig: Signal) {
    signal_pid(c.child.as_ref().and_then(|ch| ch.id()), sig);
}

fn signal_pid(pid: Option<u32>, sig: Signal) {
    if let Some(pid) = pid {
        // The process leads its own group (process_group(0)): its children get it too.
        let _ = killpg(Pid::from_raw(pid as i32), sig);
    }
}

async fn terminate(c: &mut Ctr, grace: Duration) {
    signal(c, Signal::SIGTERM);
    if let Some(child) = c.child.as_mut()
        && tokio::time::timeout(grace, child.wait()).await.is_err()
    {
        signal(c, Signal::SIGKILL);
    }
}

fn container_status(c: &Ctr, binary: Option<&Path>) -> Value {
    let state = if let Some(child) = &c.child {
        let _ = child;
        json!({"running": {"startedAt": c.started_at}})
    } else if c.finished {
        json!({"terminated": c.last_termination.clone().unwrap_or_else(|| json!({"exitCode": 0}))})
    } else {
        let (reason, message) = c
            .waiting
            .clone()
            .unwrap_or_else(|| ("ContainerCreating".into(), String::new()));
        let mut w = json!({"reason": reason});
        if !message.is_empty() {
            w["message"] = json!(message);
        }
        json!({"waiting": w})
    };
    let last_state = match (&c.child, c.finished) {
        (None, true) => json!({}),
        _ => c
            .last_termination
            .clone()
            .map(|t| json!({"terminated": t}))
            .unwrap_or_else(|| json!({})),
    };
    let mut s = json!({
        "name": c.spec.name, "image": c.spec.image.clone().unwrap_or_default(),
        "imageID": binary.map(|b| format!("kv-test-kubelet://{}", b.display())).unwrap_or_default(),
        "ready": c.ready && c.child.is_some(), "started": c.started && c.child.is_some(),
        "restartCount": c.restart_count, "state": state, "lastState": last_state,
    });
    if let Some(pid) = c.child.as_ref().and_then(|ch| ch.id()) {
        s["containerID"] = json!(format!("kv-test-kubelet://{pid}"));
    }
    s
}

/// The pod phase from its containers, as the kubelet computes it.
fn phase(ctrs: &[Ctr], setup: bool) -> &'static str {
    pod_phase(
        setup,
        ctrs.iter().map(|c| {
            (
                c.child.is_some(),
                c.started_at.is_some(),
                c.finished,
                c.last_termination
                    .as_ref()
                    .and_then(|t| t["exitCode"].as_i64()),
            )
        }),
    )
}

/// `(running, ever_started, finished, last_exit_code)` per container.
fn pod_phase(
    setup: bool,
    ctrs: impl Iterator<Item = (bool, bool, bool, Option<i64>)>,
) -> &'static str {
    let ctrs: Vec<_> = ctrs.collect();
    if !setup
        || ctrs
            .iter()
            .any(|&(_, ever, finished, _)| !ever && !finished)
    {
        return "Pending";
    }
    if ctrs
        .iter()
        .any(|&(running, _, finished, _)| running || !finished)
    {
        return "Running";
    }
    if ctrs.iter().all(|&(_, _, _, code)| code == Some(0)) {
        "Succeeded"
    } else {
        "Failed"
    }
}

#[cfg(test)]
mod tests {
    use super::pod_phase;

    #[test]
    fn the_phase_follows_the_containers() {
        assert_eq!(
            pod_phase(false, [(false, false, false, None)].into_iter()),
            "Pending"
        );
        assert_eq!(
            pod_phase(
                true,
                [(true, true, false, None), (false, false, false, None)].into_iter()
            ),
            "Pending"
        );
        assert_eq!(
            pod_phase(true, [(true, true, false, None)].into_iter()),
            "Running"
        );
        assert_eq!(
            pod_phase(true, [(false, true, false, Some(1))].into_iter()),
            "Running",
            "waiting to restart"
        );
        assert_eq!(
            pod_phase(
                true,
                [(false, true, true, Some(0)), (false, true, true, Some(0))].into_iter()
            ),
            "Succeeded"
        );
        assert_eq!(
            pod_phase(
                true,
                [(false, true, true, Some(0)), (false, true, true, Some(2))].into_iter()
            ),
            "Failed"
        );
    }
}
