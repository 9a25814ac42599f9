//! Runs one parsed command against the endpoint.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Read, Write};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use kv_core::NodeReport;
use kv_core::NodeState;
use kvctl::cli::{
    Cli, Command, KubeArgs, LogArgs, Output, PutArgs, TokenArg, ValueSource, WaitArgs,
};
use kvctl::client::Client;
use kvctl::k8s::{self, Target};
use kvctl::output::{self, NodeRow};
use kvctl::verify::{self, NodeDigests};
use serde_json::{Value, json};

/// How long `nodes` and `verify` wait for each node they ask directly.
const PER_NODE_TIMEOUT: Duration = Duration::from_secs(3);

/// The document format of `-o json|yaml`, chosen once per process: every
/// command that prints a document prints it through [`print_json`].
static DOCUMENT: std::sync::OnceLock<Output> = std::sync::OnceLock::new();

pub async fn run(cli: Cli) -> Result<ExitCode> {
    let timeout = Duration::from_secs_f64(cli.timeout);
    let _ = DOCUMENT.set(cli.output);
    // `json_out`: print one document (JSON or YAML) rather than text.
    let json_out = cli.output != Output::Human;
    // `--cluster NAME`: the KvCluster through the kube API; no endpoint involved.
    let kube = match &cli.command {
        Command::Fail {
            node,
            force,
            kube,
            wait,
        } => Some((Kube::Fail(*node, *force, wait), kube)),
        Command::Recover { node, kube, wait } => Some((Kube::Recover(*node, wait), kube)),
        Command::Nodes { kube } => Some((Kube::Nodes, kube)),
        Command::Restart { kube, wait } => Some((Kube::Restart(wait), kube)),
        Command::RotateToken {
            which,
            wait_timeout,
            kube,
        } => Some((
            Kube::RotateToken(
                *which,
                wait_timeout.unwrap_or(kvctl::cli::ROTATE_WAIT_KUBERNETES),
            ),
            kube,
        )),
        Command::Logs { node, logs, kube } => Some((Kube::Logs(*node, logs), kube)),
        Command::Backup {
            to,
            on_cluster,
            kube,
            ..
        } => Some((Kube::Backup(to, on_cluster), kube)),
        Command::Restore {
            from,
            on_cluster,
            kube,
            ..
        } => Some((Kube::Restore(from, on_cluster), kube)),
        Command::Verify {
            kube,
            verify_timeout,
        } => Some((Kube::Verify(*verify_timeout), kube)),
        _ => None,
    };
    if let Some((
        action,
        KubeArgs {
            cluster: Some(name),
            namespace,
            context,
        },
    )) = kube
    {
        let (namespace, context) = (namespace.as_deref(), context.as_deref());
        return kube_cmd(action, name, namespace, context, timeout, json_out).await;
    }
    let tls = kvctl::client::TlsOptions {
        cacert: cli.cacert.clone(),
        insecure: cli.insecure,
    };
    let client = Client::with_tls(
        &cli.endpoint,
        cli.token.clone(),
        cli.consistency.map(Into::into),
        timeout,
        &tls,
    )?;
    match cli.command {
        Command::Put(args) => put(&client, &args, json_out).await,
        Command::Get { key } => get(&client, &key, json_out).await,
        Command::Delete { key } => {
            let (ack, raw) = client.delete(key.as_bytes()).await?;
            emit(json_out, &raw, || output::render_ack("deleted", &ack))
        }
        Command::List { prefix, limit } => list(&client, prefix.as_deref(), limit, json_out).await,
        Command::Nodes { .. } => nodes(&client, json_out).await,
        Command::Where { key } => {
            let (p, raw) = client.placement(key.as_bytes()).await?;
            emit(json_out, &raw, || output::render_placement(&p))
        }
        Command::Fail {
            node, force, wait, ..
        } => {
            let force = if force { "&force=true" } else { "" };
            let path = format!("/fail/{node}?{}{force}", wait.query());
            let t = wait.request_timeout(timeout);
            classic(&client, &path, None, t, json_out).await
        }
        Command::Recover { node, wait, .. } => {
            let path = format!("/recover/{node}?{}", wait.query());
            let t = wait.request_timeout(timeout);
            classic(&client, &path, None, t, json_out).await
        }
        Command::Strategy {
            strategy,
            replication_factor,
            wait,
        } => {
            let mut body = json!({ "strategy": strategy.classic_name() });
            if let Some(f) = replication_factor {
                body["replication_factor"] = json!(f);
            }
            let path = format!("/set_replication_strategy?{}", wait.query());
            let t = wait.request_timeout(timeout);
            classic(&client, &path, Some(&body), t, json_out).await
        }
        Command::Restart { .. } => Err(anyhow!(
            "restart acts on a KvCluster: give --cluster NAME (kvctl up restarts every node when it is started again)"
        )),
        Command::Logs { .. } => Err(anyhow!(
            "logs reads a pod's log through the Kubernetes API: give --cluster NAME (kvctl up prints its nodes' output itself)"
        )),
        Command::InstallPlugin { dir, force } => install_plugin(dir, force, json_out),
        Command::Verify { .. } => verify_cmd(&client, json_out).await,
        Command::RotateToken {
            which,
            wait_timeout,
            ..
        } => {
            let wait_timeout = wait_timeout.unwrap_or(kvctl::cli::ROTATE_WAIT_LOCAL);
            let path = format!("/v1/tokens/{}/rotate?timeout={wait_timeout}", which.name());
            // three steps, each up to the bound, and the answer
            let t = Duration::from_secs_f64(3.0 * wait_timeout) + timeout;
            let raw = client.classic_post(&path, None, Some(t)).await?;
            emit(json_out, &raw, || {
                let msg = raw.get("message").and_then(Value::as_str).unwrap_or("");
                match raw.get("token").and_then(Value::as_str) {
                    Some(token) => format!("{msg}\ntoken: {token}\n"),
                    None => format!("{msg}\n"),
                }
            })
        }
        Command::Backup { to, access, .. } => {
            let reach =
                crate::cmd_backup::Reach::new(&cli.endpoint, cli.token, &access, &tls, timeout);
            crate::cmd_backup::backup(reach, &to, json_out).await
        }
        Command::Restore {
            from,
            force,
            access,
            ..
        } => {
            let reach =
                crate::cmd_backup::Reach::new(&cli.endpoint, cli.token, &access, &tls, timeout);
            crate::cmd_backup::restore(reach, &from, force, json_out).await
        }
        Command::Up(args) => crate::cmd_up::run(args, cli.token).await,
        // main.rs runs `kvctl node` before parsing kvctl's own flags
        Command::Node { .. } => Err(anyhow!(
            "give `node` as the first argument (kvctl node --help)"
        )),
        Command::Bench(args) => {
            let tls = kvctl::client::TlsOptions {
                cacert: cli.cacert.clone(),
                insecure: cli.insecure,
            };
            crate::cmd_bench::run(
                &cli.endpoint,
                cli.token,
                cli.consistency,
                args,
                tls,
                json_out,
            )
            .await
        }
    }
}

/// A `--cluster` command.
enum Kube<'a> {
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

async fn kube_cmd(
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
fn install_plugin(
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

/// Prints `v` as the document `-o` asked for: JSON, or YAML with `-o yaml`.
pub fn print_json(v: &impl serde::Serialize) -> Result<()> {
    let text = match DOCUMENT.get() {
        Some(Output::Yaml) => serde_yaml::to_string(v).context("cannot render YAML")?,
        _ => {
            let s = serde_json::to_string_pretty(v).context("cannot render JSON")?;
            format!("{s}\n")
        }
    };
    write_stdout(text.as_bytes())
}

fn write_stdout(bytes: &[u8]) -> Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        // `kvctl list | head` closes the pipe early: that is not an error.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(anyhow!("cannot write to stdout: {e}")),
    }
}

fn emit(json_out: bool, raw: &Value, human: impl FnOnce() -> String) -> Result<ExitCode> {
    if json_out {
        print_json(raw)?;
    } else {
        write_stdout(human().as_bytes())?;
    }
    Ok(ExitCode::SUCCESS)
}

async fn put(client: &Client, args: &PutArgs, json_out: bool) -> Result<ExitCode> {
    let value = match args.source() {
        ValueSource::Literal(v) => v,
        ValueSource::Stdin => {
            let mut buf = Vec::new();
            std::io::stdin()
                .lock()
                .read_to_end(&mut buf)
                .context("cannot read the value from stdin")?;
            buf
        }
        ValueSource::File(path) => std::fs::read(&path)
            .with_context(|| format!("cannot read the value from {}", path.display()))?,
    };
    let (ack, raw) = client.put(args.key.as_bytes(), value, args.create).await?;
    emit(json_out, &raw, || output::render_ack("stored", &ack))
}

async fn get(client: &Client, key: &str, json_out: bool) -> Result<ExitCode> {
    let read = client.get(key.as_bytes()).await?;
    if json_out {
        print_json(&output::value_json(
            key,
            &read.value,
            read.version.as_deref(),
        ))?;
    } else {
        let mut bytes = read.value;
        if std::io::stdout().is_terminal() && !bytes.ends_with(b"\n") {
            bytes.push(b'\n');
        }
        write_stdout(&bytes)?;
    }
    Ok(ExitCode::SUCCESS)
}

async fn list(
    client: &Client,
    prefix: Option<&str>,
    limit: Option<usize>,
    json_out: bool,
) -> Result<ExitCode> {
    const PAGE: usize = 1000;
    let mut keys: Vec<kvctl::client::ListedKey> = Vec::new();
    let mut after: Option<kvctl::client::ListedKey> = None;
    let mut printed = 0usize;
    let mut next_out: Option<kvctl::client::ListedKey> = None;
    loop {
        let remaining = limit.map(|l| l.saturating_sub(printed));
        if remaining == Some(0) {
            break;
        }
        let want = remaining.unwrap_or(PAGE).min(PAGE);
        let page = client.list_page(prefix, after.as_ref(), want).await?;
        let got = page.keys.len();
        let mut chunk = page.keys;
        if let Some(r) = remaining {
            chunk.truncate(r);
        }
        printed += chunk.len();
        if json_out {
            keys.extend(chunk);
        } else if !chunk.is_empty() {
            let mut text = chunk
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("\n");
            text.push('\n');
            write_stdout(text.as_bytes())?;
        }
        match page.next {
            Some(n) if got > 0 && after.as_ref() != Some(&n) => {
                next_out = Some(n.clone());
                after = Some(n);
            }
            Some(_) => {
                return Err(anyhow!(
                    "the server's pagination does not advance (next = {after:?}); stopped"
                ));
            }
            None => {
                next_out = None;
                break;
            }
        }
    }
    if json_out {
        print_json(&json!({ "keys": keys, "next": next_out }))?;
    }
    Ok(ExitCode::SUCCESS)
}

/// A control call through the gateway; prints its message (the change done,
/// or, after a 202, still in progress and how far).
async fn classic(
    client: &Client,
    path: &str,
    body: Option<&Value>,
    timeout: Duration,
    json_out: bool,
) -> Result<ExitCode> {
    let raw = client.classic_post(path, body, Some(timeout)).await?;
    emit(json_out, &raw, || {
        let msg = raw
            .get("message")
            .and_then(Value::as_str)
            .map(str::to_string)
            .unwrap_or_else(|| raw.to_string());
        format!("{msg}\n")
    })
}

/// A node's `/v1/cluster` body as its report.
fn node_report(raw: &Value) -> Result<NodeReport, String> {
    NodeReport::from_json(raw).ok_or_else(|| "its /v1/cluster is not a node report".to_string())
}

/// Asks one node at its own address for its `/v1/cluster`.
async fn node_cluster(client: &Client, address: &str) -> Result<NodeReport, String> {
    let c = client.at(address).map_err(|e| e.to_string())?;
    match tokio::time::timeout(PER_NODE_TIMEOUT, c.cluster()).await {
        Ok(Ok((_, raw))) => node_report(&raw),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("timed out".into()),
    }
}

async fn nodes(client: &Client, json_out: bool) -> Result<ExitCode> {
    let (info, raw) = client.cluster().await?;
    let topology = info.topology.clone();
    let answers = futures::future::join_all(topology.nodes.iter().map(|n| async {
        if Some(n.ordinal) == info.node_id {
            node_report(&raw)
        } else {
            node_cluster(client, &n.address).await
        }
    }))
    .await;
    let rows: Vec<NodeRow> = topology
        .nodes
        .iter()
        .zip(answers)
        .map(|(n, a)| {
            let (reachable, progress, synced, hints, error) = match a {
                Ok(r) => (
                    true,
                    Some(r.resync_progress),
                    Some(r.synced_epoch),
                    Some(r.hints_pending),
                    None,
                ),
                Err(e) => (false, None, None, None, Some(e)),
            };
            NodeRow {
                ordinal: n.ordinal,
                address: n.address.clone(),
                state: n.state,
                reachable,
                resync_progress: progress,
                synced_epoch: synced,
                hints_pending: hints,
                error,
            }
        })
        .collect();
    if json_out {
        print_json(&output::nodes_json(&topology, &rows))?;
    } else {
        write_stdout(output::render_nodes(&topology, &rows).as_bytes())?;
    }
    Ok(ExitCode::SUCCESS)
}

async fn verify_cmd(client: &Client, json_out: bool) -> Result<ExitCode> {
    let (info, _) = client.cluster().await?;
    let topology = info.topology;
    let asked: Vec<_> = topology
        .nodes
        .iter()
        .filter(|n| n.state != NodeState::Failed)
        .collect();
    let answers = futures::future::join_all(asked.iter().map(|n| async {
        let c = client.at(&n.address).map_err(|e| e.to_string())?;
        match tokio::time::timeout(PER_NODE_TIMEOUT, c.digests()).await {
            Ok(Ok(d)) if d.node_id != n.ordinal => Err(format!(
                "{} answered as node {}, not {}",
                n.address, d.node_id, n.ordinal
            )),
            Ok(Ok(d)) => d.parse().map_err(|e| e.to_string()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("timed out".to_string()),
        }
    }))
    .await;
    let mut digests: BTreeMap<u32, NodeDigests> = BTreeMap::new();
    let mut skipped: Vec<(u32, String)> = topology
        .nodes
        .iter()
        .filter(|n| n.state == NodeState::Failed)
        .map(|n| (n.ordinal, "Failed".to_string()))
        .collect();
    let mut unreachable = Vec::new();
    for (n, a) in asked.iter().zip(answers) {
        match a {
            Ok(d) => {
                digests.insert(n.ordinal, d);
            }
            Err(e) => {
                unreachable.push(n.ordinal);
                skipped.push((n.ordinal, e));
            }
        }
    }
    skipped.sort();
    let report = verify::compare(&topology, &digests);
    if json_out {
        let divergent: Vec<Value> = report
            .divergent
            .iter()
            .map(|d| {
                json!({
                    "bucket": d.bucket,
                    "owners": d.owners.iter().map(|(o, g)| json!({
                        "ordinal": o, "count": g.count, "digest": format!("{:032x}", g.sum)
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        print_json(&json!({
            "epoch": topology.epoch,
            "consistent": report.consistent() && unreachable.is_empty(),
            "bucketsCompared": report.buckets_compared,
            "bucketsSingleOwner": report.buckets_single,
            "divergent": divergent,
            "notChecked": skipped.iter().map(|(o, why)| json!({"ordinal": o, "reason": why})).collect::<Vec<_>>(),
        }))?;
    } else {
        write_stdout(output::render_verify(&report, &skipped).as_bytes())?;
    }
    if !report.consistent() {
        eprintln!(
            "kvctl: {} bucket(s) differ between co-owners",
            report.divergent.len()
        );
        return Ok(ExitCode::FAILURE);
    }
    if !unreachable.is_empty() {
        let list: Vec<String> = unreachable.iter().map(u32::to_string).collect();
        eprintln!(
            "kvctl: could not check node(s) {}, so replicas are not verified",
            list.join(",")
        );
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}
