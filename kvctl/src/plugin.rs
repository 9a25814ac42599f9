//! `kubectl kv`: kvctl as a kubectl plugin.
//!
//! kubectl runs any executable named `kubectl-<name>` on PATH for `kubectl
//! <name> ...`, with that path as argv[0]. So kvctl needs no second binary:
//! invoked as `kubectl-kv` (the link `kvctl install-plugin` makes) it parses
//! [`PluginCli`], where every command acts on a KvCluster named by its first
//! argument, as `kubectl cnpg status CLUSTER` does, in the current
//! kubeconfig context's namespace unless `-n` says otherwise. Each command is
//! then the same [`Cli`] command kvctl runs for `--cluster NAME`, so the two
//! spellings cannot drift apart.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use clap::{Parser, Subcommand};

use crate::cli::{
    BackupOnCluster, Cli, ClusterAccess, Command, KubeArgs, LogArgs, Output, RestoreOnCluster,
    TokenArg, WaitArgs, parse_timeout,
};

/// The executable name kubectl looks for on PATH for `kubectl kv`.
pub const PLUGIN_NAME: &str = "kubectl-kv";

/// Whether argv[0] names the plugin (`kubectl-kv`, with any directory, and
/// `.exe` on Windows).
pub fn invoked_as_plugin(argv0: &OsStr) -> bool {
    let Some(stem) = Path::new(argv0).file_name().and_then(OsStr::to_str) else {
        return false;
    };
    let stem = stem
        .strip_suffix(std::env::consts::EXE_SUFFIX)
        .unwrap_or(stem);
    stem == PLUGIN_NAME
}

/// kubectl kv — kvstore's KvClusters through the Kubernetes API.
#[derive(Debug, Parser)]
#[command(
    name = "kubectl kv",
    bin_name = "kubectl kv",
    version,
    about = "kvstore's KvClusters through the Kubernetes API (kvctl as a kubectl plugin)",
    propagate_version = true
)]
pub struct PluginCli {
    /// Namespace of the KvCluster (default: the kubeconfig context's
    /// namespace, else "default").
    #[arg(short = 'n', long, global = true, value_name = "NAMESPACE")]
    pub namespace: Option<String>,
    /// Kubeconfig context to use (default: the current context).
    #[arg(long, global = true, value_name = "CONTEXT")]
    pub context: Option<String>,
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Human, global = true)]
    pub output: Output,
    /// Seconds to wait for each answer of the API server.
    #[arg(long, default_value_t = 10.0, global = true, value_parser = parse_timeout)]
    pub timeout: f64,
    #[command(subcommand)]
    pub command: PluginCommand,
}

#[derive(Debug, Subcommand)]
pub enum PluginCommand {
    /// Phase, node states, catch-up progress, topology epoch, conditions and
    /// the last rolling restart, from the KvCluster's status.
    #[command(visible_alias = "nodes")]
    Status {
        /// The KvCluster.
        cluster: String,
    },
    /// Hold node N down (spec.faultInjection.failedNodes); returns once the
    /// operator shows it Failed.
    Fail {
        /// The KvCluster.
        cluster: String,
        /// Node ordinal.
        node: u32,
        /// Hold it down even if some keys are then left with fewer live
        /// owners than writes need (sets kvstore.dev/force-fault-injection).
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Release node N; returns once it has caught up and is Up.
    Recover {
        /// The KvCluster.
        cluster: String,
        /// Node ordinal.
        node: u32,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Rolling restart, one node at a time (kvstore.dev/restartedAt);
    /// returns once status.lastRestart shows it finished.
    Restart {
        /// The KvCluster.
        cluster: String,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Rotate the client (default) or cluster token in its Secret, in three
    /// steps each awaited on every node, with no failed request.
    RotateToken {
        /// The KvCluster.
        cluster: String,
        #[arg(value_enum, default_value_t = TokenArg::Client)]
        which: TokenArg,
        /// Seconds to wait for every node at each of the three steps.
        #[arg(long, default_value_t = crate::cli::ROTATE_WAIT_KUBERNETES, value_parser = crate::cli::parse_wait)]
        wait_timeout: f64,
    },
    /// A backup of the cluster, taken by kv-operator (a KvBackup); returns
    /// once it completed or failed.
    Backup {
        /// The KvCluster.
        cluster: String,
        /// Where: s3://bucket/prefix, or file:///dir on the operator's
        /// filesystem.
        #[arg(long, value_name = "URL")]
        to: String,
        #[command(flatten)]
        on_cluster: BackupOnCluster,
    },
    /// A new KvCluster started from a backup (spec.bootstrap.fromBackup):
    /// every node loads its buckets before it serves; returns once it is
    /// Restored.
    Restore {
        /// The new KvCluster's name.
        cluster: String,
        /// Where the backup is: s3://bucket/prefix, or file:///dir every
        /// node's pod can read.
        #[arg(long, value_name = "URL")]
        from: String,
        #[command(flatten)]
        on_cluster: RestoreOnCluster,
    },
    /// Compare every bucket's replicas across its owners (kv-operator does,
    /// reaching every node); exit 1 when they differ.
    Verify {
        /// The KvCluster.
        cluster: String,
        /// Seconds to wait for kv-operator's answer.
        #[arg(long, default_value_t = 60.0, value_parser = crate::cli::parse_wait)]
        verify_timeout: f64,
    },
    /// A node's log (the kv-node container of its pod).
    Logs {
        /// The KvCluster.
        cluster: String,
        /// Node ordinal.
        node: u32,
        #[command(flatten)]
        logs: LogArgs,
    },
}

impl PluginCli {
    /// The kvctl command this plugin command is: the same command with
    /// `--cluster CLUSTER` (and `-n`, `--context`).
    pub fn into_cli(self) -> Cli {
        let kube = |cluster: String| KubeArgs {
            cluster: Some(cluster),
            namespace: self.namespace.clone(),
            context: self.context.clone(),
        };
        let command = match self.command {
            PluginCommand::Status { cluster } => Command::Nodes {
                kube: kube(cluster),
            },
            PluginCommand::Fail {
                cluster,
                node,
                force,
                wait,
            } => Command::Fail {
                node,
                force,
                wait,
                kube: kube(cluster),
            },
            PluginCommand::Recover {
                cluster,
                node,
                wait,
            } => Command::Recover {
                node,
                wait,
                kube: kube(cluster),
            },
            PluginCommand::Restart { cluster, wait } => Command::Restart {
                wait,
                kube: kube(cluster),
            },
            PluginCommand::RotateToken {
                cluster,
                which,
                wait_timeout,
            } => Command::RotateToken {
                which,
                wait_timeout: Some(wait_timeout),
                kube: kube(cluster),
            },
            PluginCommand::Backup {
                cluster,
                to,
                on_cluster,
            } => Command::Backup {
                to,
                access: ClusterAccess::default(),
                on_cluster,
                kube: kube(cluster),
            },
            PluginCommand::Restore {
                cluster,
                from,
                on_cluster,
            } => Command::Restore {
                from,
                force: false,
                access: ClusterAccess::default(),
                on_cluster,
                kube: kube(cluster),
            },
            PluginCommand::Verify {
                cluster,
                verify_timeout,
            } => Command::Verify {
                kube: kube(cluster),
                verify_timeout,
            },
            PluginCommand::Logs {
                cluster,
                node,
                logs,
            } => Command::Logs {
                node,
                logs,
                kube: kube(cluster),
            },
        };
        Cli {
            // Every plugin command goes through the Kubernetes API; the
            // endpoint and tokens of the data commands are not used.
            endpoint: String::new(),
            token: None,
            consistency: None,
            output: self.output,
            timeout: self.timeout,
            cacert: None,
            insecure: false,
            command,
        }
    }
}

/// What `kvctl install-plugin` did.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Installed {
    /// The link made: `<dir>/kubectl-kv`.
    pub link: PathBuf,
    /// The kvctl executable it points to.
    pub target: PathBuf,
    /// False when the link was already there, pointing to the same kvctl.
    pub changed: bool,
    /// Whether `dir` is on PATH (kubectl finds the plugin only there).
    pub on_path: bool,
}

/// Why `kvctl install-plugin` did nothing.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("cannot find this kvctl executable: {0}")]
    NoExecutable(std::io::Error),
    #[error("{0} is not a directory")]
    NotADirectory(PathBuf),
    #[error("{link} exists and is not a link to {target}; give --force to replace it")]
    Exists { link: PathBuf, target: PathBuf },
    #[error("cannot create {link}: {source}")]
    Create {
        link: PathBuf,
        source: std::io::Error,
    },
}

/// Makes `dir/kubectl-kv` a symlink to `target` (the running kvctl). A
/// symlink rather than a copy: upgrading kvctl upgrades the plugin, and
/// kubectl runs it with argv[0] ending in `kubectl-kv`, which is all kvctl
/// looks at. An existing link to the same target is left alone; anything
/// else there is replaced only with `force`.
pub fn install(dir: &Path, target: &Path, force: bool) -> Result<Installed, InstallError> {
    if !dir.is_dir() {
        return Err(InstallError::NotADirectory(dir.to_path_buf()));
    }
    let link = dir.join(format!("{PLUGIN_NAME}{}", std::env::consts::EXE_SUFFIX));
    let on_path = std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| same_dir(&d, dir)));
    let existing = std::fs::symlink_metadata(&link).ok();
    if existing.is_some() {
        let same = std::fs::read_link(&link).is_ok_and(|t| t == target);
        if same {
            return Ok(Installed {
                link,
                target: target.to_path_buf(),
                changed: false,
                on_path,
            });
        }
        if !force {
            return Err(InstallError::Exists {
                link,
                target: target.to_path_buf(),
            });
        }
        std::fs::remove_file(&link).map_err(|source| InstallError::Create {
            link: link.clone(),
            source,
        })?;
    }
    link_to(target, &link).map_err(|source| InstallError::Create {
        link: link.clone(),
        source,
    })?;
    Ok(Installed {
        link,
        target: target.to_path_buf(),
        changed: true,
        on_path,
    })
}

fn same_dir(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

#[cfg(unix)]
fn link_to(target: &Path, link: &Path) -> std::io::Result<()> {
    std::os::unix::fs::symlink(target, link)
}

#[cfg(not(unix))]
fn link_to(target: &Path, link: &Path) -> std::io::Result<()> {
    // No unprivileged symlinks: a copy, which `install-plugin --force`
    // refreshes after an upgrade.
    std::fs::copy(target, link).map(|_| ())
}

/// The running kvctl, links resolved (so the plugin link points at the
/// binary itself, not at another link).
pub fn current_executable() -> Result<PathBuf, InstallError> {
    std::env::current_exe()
        .and_then(|p| p.canonicalize())
        .map_err(InstallError::NoExecutable)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plugin_backup_is_kvctl_backup_with_the_cluster_and_its_s3_flags() {
        let p = PluginCli::try_parse_from([
            "kubectl kv",
            "backup",
            "demo",
            "-n",
            "prod",
            "--to",
            "s3://b/nightly",
            "--s3-endpoint",
            "http://s3:9000",
            "--s3-credentials-secret",
            "creds",
            "--no-wait",
        ])
        .expect("parses");
        let Command::Backup {
            to,
            on_cluster,
            kube,
            ..
        } = p.into_cli().command
        else {
            panic!("not a backup");
        };
        assert_eq!(to, "s3://b/nightly");
        assert_eq!(kube.cluster.as_deref(), Some("demo"));
        assert_eq!(kube.namespace.as_deref(), Some("prod"));
        assert_eq!(on_cluster.s3.s3_endpoint.as_deref(), Some("http://s3:9000"));
        assert_eq!(
            on_cluster.s3.s3_credentials_secret.as_deref(),
            Some("creds")
        );
        assert!(on_cluster.no_wait);
        assert!(
            PluginCli::try_parse_from(["kubectl kv", "backup", "demo"]).is_err(),
            "a backup without --to was accepted"
        );
    }

    #[test]
    fn plugin_restore_is_kvctl_restore_of_a_new_cluster_with_its_flags() {
        let p = PluginCli::try_parse_from([
            "kubectl kv",
            "restore",
            "copy",
            "--from",
            "s3://b/nightly/x",
            "--like",
            "prod",
            "--nodes",
            "5",
            "--s3-credentials-secret",
            "creds",
        ])
        .expect("parses");
        let Command::Restore {
            from,
            force,
            on_cluster,
            kube,
            ..
        } = p.into_cli().command
        else {
            panic!("not a restore");
        };
        assert_eq!(from, "s3://b/nightly/x");
        assert!(!force);
        assert_eq!(kube.cluster.as_deref(), Some("copy"));
        assert_eq!(on_cluster.like.as_deref(), Some("prod"));
        assert_eq!(on_cluster.nodes, Some(5));
        assert_eq!(
            on_cluster.s3.s3_credentials_secret.as_deref(),
            Some("creds")
        );
        // the local restore's --force means nothing for a new cluster
        let bad = Cli::try_parse_from([
            "kvctl",
            "restore",
            "--from",
            "file:///b",
            "--cluster",
            "copy",
            "--force",
        ]);
        assert!(bad.is_err(), "--force with --cluster was accepted");
        let bad = Cli::try_parse_from(["kvctl", "restore", "--from", "file:///b", "--nodes", "5"]);
        assert!(bad.is_err(), "--nodes without --cluster was accepted");
    }

    #[test]
    fn plugin_verify_is_kvctl_verify_with_the_cluster() {
        let p = PluginCli::try_parse_from(["kubectl kv", "verify", "demo", "-n", "prod"])
            .expect("parses");
        let Command::Verify {
            kube,
            verify_timeout,
        } = p.into_cli().command
        else {
            panic!("not a verify");
        };
        assert_eq!(kube.cluster.as_deref(), Some("demo"));
        assert_eq!(kube.namespace.as_deref(), Some("prod"));
        assert_eq!(verify_timeout, 60.0);
        assert!(Cli::try_parse_from(["kvctl", "verify"]).is_ok());
        assert!(
            Cli::try_parse_from(["kvctl", "verify", "--verify-timeout", "5"]).is_err(),
            "--verify-timeout without --cluster was accepted"
        );
    }

    #[test]
    fn kvctl_backup_s3_flags_need_the_cluster() {
        let local = Cli::try_parse_from(["kvctl", "backup", "--to", "file:///b"]);
        assert!(local.is_ok(), "{local:?}");
        let bad = Cli::try_parse_from([
            "kvctl",
            "backup",
            "--to",
            "s3://b/p",
            "--s3-endpoint",
            "http://s3:9000",
        ]);
        assert!(bad.is_err(), "--s3-endpoint without --cluster was accepted");
    }
}
