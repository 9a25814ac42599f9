//! Runs one parsed command.
//!
//! `run` sends each command to its module: the `--cluster NAME` commands to
//! [`crate::cmd_kube`] (the Kubernetes API, no endpoint), the rest to
//! [`crate::cmd_endpoint`], [`crate::cmd_backup`], [`crate::cmd_up`] and
//! [`crate::cmd_bench`]. The printing helpers every command shares are here.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use kvctl::cli::{Cli, Command, KubeArgs, Output};
use kvctl::client::Client;
use kvctl::output;
use serde_json::{Value, json};

use crate::cmd_endpoint::{classic, get, list, nodes, put, verify_cmd};
use crate::cmd_kube::{Kube, install_plugin, kube_cmd};

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

pub fn write_stdout(bytes: &[u8]) -> Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        // `kvctl list | head` closes the pipe early: that is not an error.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(anyhow!("cannot write to stdout: {e}")),
    }
}

pub fn emit(json_out: bool, raw: &Value, human: impl FnOnce() -> String) -> Result<ExitCode> {
    if json_out {
        print_json(raw)?;
    } else {
        write_stdout(human().as_bytes())?;
    }
    Ok(ExitCode::SUCCESS)
}
