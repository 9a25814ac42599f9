//! Cluster DNS, emulated with a hosts file.
//!
//! The real platform gives every pod a resolver that answers
//! `<hostname>.<subdomain>.<ns>.svc.cluster.local` (a pod of a headless
//! Service) and `<svc>.<ns>.svc.cluster.local` from the Services'
//! EndpointSlices. This kubelet has no DNS server; instead it keeps one hosts
//! file (`<root>/hosts`) with the same names, built from every EndpointSlice
//! in the cluster, and each pod process runs in its own mount namespace with
//! that file bind-mounted over `/etc/hosts` (see [`enter_namespace`]). glibc
//! reads `/etc/hosts` again on every lookup, so a change is seen at once.
//!
//! A bind mount pins the file's inode, so the file is rewritten in place
//! (never replaced by a rename): the new content is written from offset 0 and
//! the file then cut to its length. A reader racing a rewrite may see a mix of
//! the old and new lines for that one lookup.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::CString;
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use futures::StreamExt;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::watcher::{self, Event};
use kube::{Api, ResourceExt};

use crate::Ctx;

/// The cluster domain the names end in (kubelet `--cluster-domain`).
pub const CLUSTER_DOMAIN: &str = "cluster.local";
/// Marks where the generated part of the hosts file starts.
const MARKER: &str = "# --- kv-test-kubelet: cluster DNS (EndpointSlices) ---";

/// The hosts file of a kubelet root.
pub fn hosts_path(root: &Path) -> PathBuf {
    root.join("hosts")
}

/// The host's own `/etc/hosts` lines (localhost and friends), without a
/// generated part left by an earlier kubelet.
pub fn base_hosts() -> String {
    let text = std::fs::read_to_string("/etc/hosts").unwrap_or_default();
    let base = text.split(MARKER).next().unwrap_or_default();
    let mut base = base.trim_end().to_string();
    if !base.contains("localhost") {
        base = format!("127.0.0.1\tlocalhost\n{base}")
            .trim_end()
            .to_string();
    }
    base + "\n"
}

/// One EndpointSlice, reduced to what DNS answers from it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Slice {
    namespace: String,
    service: String,
    /// (address, hostname) of every endpoint that is ready.
    ready: Vec<(String, Option<String>)>,
}

fn slice_of(s: &EndpointSlice) -> Option<Slice> {
    let service = s.labels().get("kubernetes.io/service-name")?.clone();
    let ready = s
        .endpoints
        .iter()
        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true))
        .flat_map(|e| e.addresses.iter().map(|a| (a.clone(), e.hostname.clone())))
        .collect();
    Some(Slice {
        namespace: s.namespace().unwrap_or_default(),
        service,
        ready,
    })
}

/// The generated lines: `<svc>.<ns>.svc` to each ready address (as DNS
/// answers a headless Service; a ClusterIP Service's virtual IP would lead
/// nowhere here), and `<hostname>.<svc>.<ns>.svc` to its endpoint's address.
/// Each name also with `.cluster.local`.
fn render(slices: &BTreeMap<String, Slice>) -> String {
    let mut lines = BTreeSet::new();
    for s in slices.values() {
        let svc = format!("{}.{}.svc", s.service, s.namespace);
        for (addr, hostname) in &s.ready {
            lines.insert(format!("{addr}\t{svc} {svc}.{CLUSTER_DOMAIN}"));
            if let Some(h) = hostname {
                lines.insert(format!("{addr}\t{h}.{svc} {h}.{svc}.{CLUSTER_DOMAIN}"));
            }
        }
    }
    let mut out = format!("{MARKER}\n");
    for l in lines {
        out.push_str(&l);
        out.push('\n');
    }
    out
}

/// Rewrite `path` in place with `text` (its inode may be bind-mounted).
pub fn write_in_place(path: &Path, text: &str) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(false)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    f.seek(SeekFrom::Start(0))?;
    f.write_all(text.as_bytes())?;
    f.set_len(text.len() as u64)?;
    Ok(())
}

/// Keep `<root>/hosts` up to date with every EndpointSlice of the cluster.
pub async fn run(ctx: Arc<Ctx>, base: String) {
    let path = hosts_path(&ctx.args.root);
    let api: Api<EndpointSlice> = Api::all(ctx.client.clone());
    let mut stream = watcher::watcher(api, watcher::Config::default()).boxed();
    let mut slices: BTreeMap<String, Slice> = BTreeMap::new();
    let mut init: BTreeMap<String, Slice> = BTreeMap::new();
    let mut written = String::new();
    let key = |s: &EndpointSlice| format!("{}/{}", s.namespace().unwrap_or_default(), s.name_any());
    while let Some(event) = stream.next().await {
        match event {
            Ok(Event::Init) => init.clear(),
            Ok(Event::InitApply(s)) => {
                if let Some(v) = slice_of(&s) {
                    init.insert(key(&s), v);
                }
                continue;
            }
            Ok(Event::InitDone) => slices = std::mem::take(&mut init),
            Ok(Event::Apply(s)) => match slice_of(&s) {
                Some(v) => {
                    slices.insert(key(&s), v);
                }
                None => {
                    slices.remove(&key(&s));
                }
            },
            Ok(Event::Delete(s)) => {
                slices.remove(&key(&s));
            }
            Err(e) => {
                tracing::warn!("endpointslice watch: {e}");
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                continue;
            }
        }
        let text = format!("{base}{}", render(&slices));
        if text != written {
            match write_in_place(&path, &text) {
                Ok(()) => {
                    tracing::debug!(entries = text.lines().count(), "hosts file updated");
                    written = text;
                }
                Err(e) => tracing::warn!("writing {}: {e:#}", path.display()),
            }
        }
    }
}

/// What a pod process needs to enter its own mount namespace with the hosts
/// file over `/etc/hosts`, prepared before `fork` (no allocation after it).
pub struct Namespace {
    hosts: CString,
    etc_hosts: CString,
    root: CString,
}

impl Namespace {
    pub fn new(hosts: &Path) -> Result<Namespace> {
        Ok(Namespace {
            hosts: CString::new(hosts.as_os_str().as_bytes())?,
            etc_hosts: CString::new("/etc/hosts")?,
            root: CString::new("/")?,
        })
    }

    /// In the child between `fork` and `exec`: a new mount namespace, `/`
    /// made private (nothing propagates back to the host), the hosts file
    /// bind-mounted over `/etc/hosts`. Only system calls.
    pub fn enter(&self) -> std::io::Result<()> {
        use nix::mount::{MsFlags, mount};
        use nix::sched::{CloneFlags, unshare};
        unshare(CloneFlags::CLONE_NEWNS)?;
        mount(
            None::<&std::ffi::CStr>,
            self.root.as_c_str(),
            None::<&std::ffi::CStr>,
            MsFlags::MS_REC | MsFlags::MS_PRIVATE,
            None::<&std::ffi::CStr>,
        )?;
        mount(
            Some(self.hosts.as_c_str()),
            self.etc_hosts.as_c_str(),
            None::<&std::ffi::CStr>,
            MsFlags::MS_BIND,
            None::<&std::ffi::CStr>,
        )?;
        Ok(())
    }
}

/// Whether this process may make mount namespaces (root, or CAP_SYS_ADMIN):
/// tried in a child, so this process's own namespace is untouched.
pub fn namespaces_work() -> bool {
    std::process::Command::new("unshare")
        .args(["-m", "true"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slice(ns: &str, svc: &str, eps: &[(&str, Option<&str>, Option<bool>)]) -> EndpointSlice {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": format!("{svc}-abc"), "namespace": ns,
                         "labels": {"kubernetes.io/service-name": svc}},
            "addressType": "IPv4",
            "endpoints": eps.iter().map(|(a, h, r)| serde_json::json!({
                "addresses": [a], "hostname": h, "conditions": {"ready": r}})).collect::<Vec<_>>(),
        }))
        .unwrap()
    }

    #[test]
    fn pods_of_a_headless_service_get_their_names_and_only_ready_ones_are_listed() {
        let s = slice(
            "kv",
            "demo-peers",
            &[
                ("127.0.1.2", Some("demo-0"), Some(true)),
                ("127.0.1.3", Some("demo-1"), Some(false)),
                ("127.0.1.4", None, None),
            ],
        );
        let slices = BTreeMap::from([("kv/x".to_string(), slice_of(&s).unwrap())]);
        let text = render(&slices);
        assert!(text.contains(
            "127.0.1.2\tdemo-0.demo-peers.kv.svc demo-0.demo-peers.kv.svc.cluster.local\n"
        ));
        assert!(text.contains("127.0.1.2\tdemo-peers.kv.svc demo-peers.kv.svc.cluster.local\n"));
        assert!(text.contains("127.0.1.4\tdemo-peers.kv.svc"));
        assert!(!text.contains("127.0.1.3"), "not ready: {text}");
    }

    #[test]
    fn a_slice_without_a_service_is_ignored_and_rewrites_happen_in_place() {
        let mut s = slice("kv", "demo", &[("127.0.1.2", None, Some(true))]);
        s.metadata.labels = None;
        assert!(slice_of(&s).is_none());

        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("hosts");
        write_in_place(&p, "a long first version\n").unwrap();
        let ino = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&p).unwrap());
        write_in_place(&p, "short\n").unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "short\n");
        let ino2 = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&p).unwrap());
        assert_eq!(ino, ino2, "same inode: a bind mount keeps seeing it");
    }
}
