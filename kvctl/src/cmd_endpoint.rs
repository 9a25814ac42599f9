//! The commands sent to the endpoint over HTTP: the data commands (put, get,
//! list), control calls through the gateway, and `nodes` and `verify`, which
//! also ask every node at its own address.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Read};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use kv_core::NodeReport;
use kv_core::NodeState;
use kvctl::cli::{PutArgs, ValueSource};
use kvctl::client::Client;
use kvctl::output::{self, NodeRow};
use kvctl::verify::{self, NodeDigests};
use serde_json::{Value, json};

use crate::cmd::{emit, print_json, write_stdout};

/// How long `nodes` and `verify` wait for each node they ask directly.
const PER_NODE_TIMEOUT: Duration = Duration::from_secs(3);

pub async fn put(client: &Client, args: &PutArgs, json_out: bool) -> Result<ExitCode> {
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

pub async fn get(client: &Client, key: &str, json_out: bool) -> Result<ExitCode> {
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

pub async fn list(
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
pub async fn classic(
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

pub async fn nodes(client: &Client, json_out: bool) -> Result<ExitCode> {
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

pub async fn verify_cmd(client: &Client, json_out: bool) -> Result<ExitCode> {
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
