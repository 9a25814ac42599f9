//! The `--cluster NAME` commands: the KvCluster through the Kubernetes API,
//! no endpoint involved, waiting (unless `--no-wait`) until kv-operator shows
//! the change; and `install-plugin`, which makes them `kubectl kv` commands.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use kv_core::NodeState;
use kvctl::cli::{LogArgs, TokenArg, WaitArgs};
use kvctl::k8s::{self, Target};

use crate::cmd::{print_json, write_stdout};

/// A `--cluster` command.
pub enum Kube<'a> {
    Fail(u32, bool, &'a WaitArgs),
    Recover(u32, &'a WaitArgs),
    Restart(&'a WaitArgs),
    RotateToken(TokenArg, f64),
    Logs(u32, &'a LogArgs),
    Backup(&'a str, &'a kvctl::cli::BackupOnCluster),
    Restore(&'a str, &'a kvctl::cli::RestoreOnCluster),
    Verify(f64),
    Nodes,
}

pub async fn kube_cmd(
    action: Kube<'_>,
    name: &str,
    namespace: Option<&str>,
    context: Option<&str>,
    timeout: Duration,
    json_out: bool,
) -> Result<ExitCode> {
    // A followed log may stay quiet for longer than any bound on reads.
    let target = if matches!(action, Kube::Logs(_, args) if args.follow) {
        Target::connect_streaming(context, namespace, name, timeout).await?
    } else {
        Target::connect(context, namespace, name, timeout).await?
    };
    match action {
        Kube::Logs(node, args) => return logs(&target, node, args, timeout).await,
        Kube::Nodes => {
            let kvc = target.within(timeout, target.get()).await?;
            if json_out {
                print_json(&k8s::nodes_json(&kvc))?;
            } else {
                write_stdout(k8s::render_nodes(&kvc).as_bytes())?;
            }
        }
        Kube::Fail(node, force, wait) => {
            let outcome = target.within(timeout, target.fail(node, force)).await?;
            return wait_for_effect(
                &target,
                &outcome,
                NodeState::Failed,
                wait,
                timeout,
                json_out,
            )
            .await;
        }
        Kube::Recover(node, wait) => {
            let outcome = target.within(timeout, target.recover(node)).await?;
            return wait_for_effect(&target, &outcome, NodeState::Up, wait, timeout, json_out)
                .await;
        }
        Kube::RotateToken(which, wait_timeout) => {
            let limit = Duration::from_secs_f64(wait_timeout);
            let say = |line: &str| {
                if !json_out {
                    eprintln!("{line}");
                }
            };
            // three steps, each up to the bound, plus the calls around them
            let rotation = target
                .within(
                    3 * (limit + timeout) + timeout,
                    target.rotate_token(which, limit, say),
                )
                .await?;
            if json_out {
                print_json(&rotation)?;
            } else {
                write_stdout(k8s::render_rotation(&rotation).as_bytes())?;
            }
        }
        Kube::Backup(to, on) => return backup_on_cluster(&target, to, on, timeout, json_out).await,
        Kube::Restore(from, on) => {
            return restore_on_cluster(&target, from, on, timeout, json_out).await;
        }
        Kube::Verify(bound) => return verify_on_cluster(&target, bound, timeout, json_out).await,
        Kube::Restart(wait) => {
            let at = kv_crd::kvcluster::request_now();
            let outcome = target.within(timeout, target.restart(&at)).await?;
            return wait_for_restart(&target, &outcome, wait, timeout, json_out).await;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `backup --cluster NAME --to URL`: a KvBackup, and (unless --no-wait)
/// the wait for its outcome; a failed backup or one still running at the
/// bound is an error.
async fn backup_on_cluster(
    target: &Target,
    to: &str,
    on: &kvctl::cli::BackupOnCluster,
    timeout: Duration,
    json_out: bool,
) -> Result<ExitCode> {
    use kv_crd::kvbackup::BackupPhase;
    let s3 = s3_settings(&on.s3);
    let req = k8s::BackupRequest {
        name: on.backup_name.clone(),
        destination: to.to_string(),
        s3,
    };
    let created = target.within(timeout, target.create_backup(&req)).await?;
    let name = created.metadata.name.clone().unwrap_or_default();
    let b = if on.no_wait {
        created
    } else {
        if !json_out {
            eprintln!("KvBackup {name} created; waiting for kv-operator to take it");
        }
        target
            .wait_backup(&name, Duration::from_secs_f64(on.backup_timeout), timeout)
            .await?
    };
    if json_out {
        print_json(&serde_json::to_value(&b)?)?;
    } else {
        write_stdout(k8s::render_backup(&b).as_bytes())?;
    }
    let phase = b.status.as_ref().and_then(|s| s.phase);
    match phase {
        _ if on.no_wait => Ok(ExitCode::SUCCESS),
        Some(BackupPhase::Completed) => Ok(ExitCode::SUCCESS),
        Some(BackupPhase::Failed) => Err(anyhow!("KvBackup {name} failed")),
        _ => Err(anyhow!(
            "KvBackup {name} has not finished after {} s; `kubectl get kvbackup {name}` shows it",
            on.backup_timeout
        )),
    }
}

/// The `--s3-*` flags as a KvBackup's or a bootstrap's `s3`.
fn s3_settings(s3: &kvctl::cli::S3OnCluster) -> Option<kv_crd::kvbackup::S3Settings> {
    (s3.s3_endpoint.is_some() || s3.s3_region.is_some() || s3.s3_credentials_secret.is_some()).then(
        || kv_crd::kvbackup::S3Settings {
            endpoint: s3.s3_endpoint.clone(),
            region: s3.s3_region.clone(),
            credentials_secret: s3.s3_credentials_secret.clone(),
        },
    )
}

/// `restore --cluster NAME --from URL`: a new KvCluster started from the
/// backup, and (unless --no-wait) the wait until every node has loaded it;
/// one not Restored at the bound is an error.
async fn restore_on_cluster(
    target: &Target,
    from: &str,
    on: &kvctl::cli::RestoreOnCluster,
    timeout: Duration,
    json_out: bool,
) -> Result<ExitCode> {
    kv_backup::target::parse(from).with_context(|| format!("--from {from}"))?;
    let req = k8s::RestoreRequest {
        from: from.to_string(),
        s3: s3_settings(&on.s3),
        like: None,
        like_name: on.like.clone(),
        replicas: on.nodes,
        strategy: on.strategy.map(|s| match s {
            kvctl::cli::StrategyArg::Full => kv_core::Strategy::Full,
            kvctl::cli::StrategyArg::ConsistentHashing => kv_core::Strategy::ConsistentHashing,
        }),
        factor: on.replication_factor,
    };
    let created = target.within(timeout, target.create_restored(&req)).await?;
    let name = target.name();
    let kvc = if on.no_wait {
        created
    } else {
        if !json_out {
            eprintln!("KvCluster {name} created from {from}; waiting for every node to load it");
        }
        target
            .wait_restored(Duration::from_secs_f64(on.restore_timeout), timeout)
            .await?
    };
    if json_out {
        print_json(&serde_json::to_value(&kvc)?)?;
    } else {
        write_stdout(k8s::render_restore(&kvc).as_bytes())?;
    }
    if on.no_wait || k8s::restored(&kvc) {
        Ok(ExitCode::SUCCESS)
    } else {
        Err(anyhow!(
            "KvCluster {name} has not finished restoring after {} s; `kvctl nodes --cluster {name}` shows it",
            on.restore_timeout
        ))
    }
}

/// `verify --cluster NAME`: kv-operator compares the replicas (it reaches
/// every node); exit 1 when owners differ or a node was not checked, as the
/// local `verify`.
async fn verify_on_cluster(
    target: &Target,
    bound: f64,
    timeout: Duration,
    json_out: bool,
) -> Result<ExitCode> {
    let at = kv_crd::kvcluster::request_now();
    target.within(timeout, target.request_verify(&at)).await?;
    let bound = Duration::from_secs_f64(bound);
    let name = target.name();
    let Some(v) = target
        .within(bound + timeout, target.wait_verify(&at, bound))
        .await?
    else {
        return Err(anyhow!(
            "kv-operator has not answered the verification of KvCluster {name} within {} s (is it running?)",
            bound.as_secs_f64()
        ));
    };
    if json_out {
        print_json(&serde_json::to_value(&v)?)?;
    } else {
        write_stdout(k8s::render_verify_status(&v).as_bytes())?;
    }
    if v.divergent_buckets > 0 {
        eprintln!(
            "kvctl: {} bucket(s) differ between co-owners",
            v.divergent_buckets
        );
        return Ok(ExitCode::FAILURE);
    }
    if !v.consistent {
        eprintln!("kvctl: not every node answered kv-operator, so replicas are not verified");
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

/// `logs NODE --cluster NAME`: the node's pod log copied to stdout as it
/// arrives (until it ends, or, with `--follow`, until interrupted).
async fn logs(target: &Target, node: u32, args: &LogArgs, timeout: Duration) -> Result<ExitCode> {
    use futures::AsyncReadExt as _;
    let name = target.name();
    let mut stream = target.within(timeout, target.logs(node, args)).await?;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = stream
            .read(&mut buf)
            .await
            .with_context(|| format!("reading the log of node {node} of KvCluster {name}"))?;
        if n == 0 {
            return Ok(ExitCode::SUCCESS);
        }
        write_stdout(&buf[..n])?;
    }
}

/// `install-plugin`: the `kubectl-kv` link to this executable.
pub fn install_plugin(
    dir: Option<std::path::PathBuf>,
    force: bool,
    json_out: bool,
) -> Result<ExitCode> {
    use kvctl::plugin;
    let target = plugin::current_executable()?;
    let dir = match dir {
        Some(d) => d,
        None => target
            .parent()
            .map(std::path::Path::to_path_buf)
            .ok_or_else(|| anyhow!("{} has no directory; give --dir", target.display()))?,
    };
    let done = plugin::install(&dir, &target, force)?;
    if json_out {
        print_json(&done)?;
        return Ok(ExitCode::SUCCESS);
    }
    let verb = if done.changed {
        "installed"
    } else {
        "already installed"
    };
    let mut text = format!(
        "kubectl kv {verb}: {} -> {}\n",
        done.link.display(),
        done.target.display()
    );
    if !done.on_path {
        text.push_str(&format!(
            "{} is not on PATH: add it (kubectl finds plugins on PATH only), then `kubectl plugin list` shows kubectl-kv\n",
            dir.display()
        ));
    }
    write_stdout(text.as_bytes())?;
    Ok(ExitCode::SUCCESS)
}

/// After `restart --cluster`, unless `--no-wait`: wait until the status
/// shows the restart finished; past the bound, say how far it got (exit 0:
/// the operator carries it on).
async fn wait_for_restart(
    target: &Target,
    outcome: &k8s::RestartOutcome,
    wait: &WaitArgs,
    timeout: Duration,
    json_out: bool,
) -> Result<ExitCode> {
    if !json_out {
        write_stdout(k8s::render_restart(outcome).as_bytes())?;
    }
    if wait.no_wait {
        if json_out {
            print_json(outcome)?;
        }
        return Ok(ExitCode::SUCCESS);
    }
    let bound = Duration::from_secs_f64(wait.wait_timeout);
    let effect = target
        .within(
            bound + timeout,
            target.wait_for_restart(&outcome.requested_at, bound),
        )
        .await?;
    if json_out {
        let mut v = serde_json::to_value(outcome).context("cannot render JSON")?;
        v["effect"] = serde_json::to_value(&effect).context("cannot render JSON")?;
        print_json(&v)?;
    } else {
        write_stdout(k8s::render_restart_effect(&effect, outcome.nodes).as_bytes())?;
    }
    Ok(ExitCode::SUCCESS)
}

/// After `fail`/`recover --cluster`, unless `--no-wait`: wait until the
/// operator shows the change (as a gateway's control call does) and say so;
/// past the bound, say it is still in progress (exit 0: the spec change
/// stands and the operator carries it out); a refused spec exits 1.
async fn wait_for_effect(
    target: &Target,
    outcome: &k8s::Outcome,
    want: NodeState,
    wait: &WaitArgs,
    timeout: Duration,
    json_out: bool,
) -> Result<ExitCode> {
    if wait.no_wait {
        emit_outcome(outcome, json_out)?;
        return Ok(ExitCode::SUCCESS);
    }
    if !json_out {
        emit_outcome(outcome, json_out)?;
    }
    let node = outcome.node;
    let bound = Duration::from_secs_f64(wait.wait_timeout);
    let effect = target
        .within(bound + timeout, target.wait_for_node(node, want, bound))
        .await?;
    if json_out {
        // One JSON document: the change, and what came of it under "effect".
        let mut v = serde_json::to_value(outcome).context("cannot render JSON")?;
        v["effect"] = serde_json::to_value(&effect).context("cannot render JSON")?;
        print_json(&v)?;
    } else {
        let secs = effect.waited_ms as f64 / 1000.0;
        let line = match (&effect.refused, effect.in_effect) {
            (Some(reason), _) => format!("refused by the operator: {reason}\n"),
            (None, true) => format!("in effect: node {node} is {want} ({secs:.1} s)\n"),
            (None, false) => format!(
                "in progress: node {node} is {} after {secs:.1} s, not yet {want}; the operator carries the change out (kvctl nodes --cluster shows it)\n",
                effect
                    .state
                    .map_or("not listed".to_string(), |s| s.to_string())
            ),
        };
        write_stdout(line.as_bytes())?;
    }
    Ok(if effect.refused.is_some() {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

fn emit_outcome(outcome: &k8s::Outcome, json_out: bool) -> Result<()> {
    if json_out {
        print_json(outcome)
    } else {
        write_stdout(k8s::render_outcome(outcome).as_bytes())
    }
}
