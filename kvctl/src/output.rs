//! Human renderings of the API's answers (the JSON output is the server's
//! JSON or a serde rendering of the same structs).

use std::fmt::Write as _;

use kv_core::{NodeState, PlacementSpec, Topology};
use serde::Serialize;

use crate::client::{PlacementInfo, WriteAck};
use crate::verify::{BucketDigest, VerifyReport};

/// One line of `kvctl nodes`: the topology's view of a node, plus what the
/// node itself reports about its catch-up when it answered.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeRow {
    pub ordinal: u32,
    pub address: String,
    pub state: NodeState,
    pub reachable: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resync_progress: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub synced_epoch: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hints_pending: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Aligns rows of cells into columns separated by two spaces.
pub fn table(rows: &[Vec<String>]) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for r in rows {
        let mut line = String::new();
        for (i, cell) in r.iter().enumerate() {
            if i + 1 == r.len() {
                line.push_str(cell);
            } else {
                let pad = widths[i].saturating_sub(cell.chars().count());
                line.push_str(cell);
                line.push_str(&" ".repeat(pad + 2));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// `0.421` → `42%`; `1.0` → `100%`.
pub fn percent(p: f64) -> String {
    if !p.is_finite() {
        return "-".into();
    }
    let v = (p.clamp(0.0, 1.0) * 100.0).floor();
    format!("{v:.0}%")
}

fn placement_line(p: &PlacementSpec) -> String {
    let members: Vec<String> = p.members.iter().map(u32::to_string).collect();
    match p.strategy {
        kv_core::Strategy::Full => format!("Full over nodes {}", members.join(",")),
        kv_core::Strategy::ConsistentHashing => format!(
            "ConsistentHashing factor {} over nodes {}",
            p.factor,
            members.join(",")
        ),
    }
}

/// `kvctl nodes`.
/// `kvctl nodes -o json`: the topology's fields and one object per node (the
/// `--cluster` form adds the KvCluster's own fields to this object).
pub fn nodes_json(topology: &Topology, rows: &[NodeRow]) -> serde_json::Value {
    serde_json::json!({
        "clusterId": topology.cluster_id,
        "epoch": topology.epoch,
        "placement": topology.placement,
        "pending": topology.pending,
        "readConsistency": topology.read_consistency,
        "writeConsistency": topology.write_consistency,
        "nodes": rows,
    })
}

pub fn render_nodes(topology: &Topology, rows: &[NodeRow]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "cluster {}  epoch {}  placement {}  read {}  write {}",
        topology.cluster_id,
        topology.epoch,
        placement_line(&topology.placement),
        topology.read_consistency,
        topology.write_consistency
    );
    if let Some(p) = &topology.pending {
        let _ = writeln!(out, "rebalancing to {}", placement_line(p));
    }
    let mut cells = vec![vec![
        "ORDINAL".to_string(),
        "ADDRESS".into(),
        "STATE".into(),
        "RESYNC".into(),
        "HINTS".into(),
    ]];
    for r in rows {
        let resync = match (r.reachable, r.resync_progress) {
            (false, _) => "unreachable".to_string(),
            (true, Some(p)) => percent(p),
            (true, None) => "-".into(),
        };
        cells.push(vec![
            r.ordinal.to_string(),
            r.address.clone(),
            r.state.to_string(),
            resync,
            r.hints_pending
                .map(|h| h.to_string())
                .unwrap_or_else(|| "-".into()),
        ]);
    }
    out.push_str(&table(&cells));
    out
}

fn owners_line(owners: &[crate::client::Owner]) -> String {
    if owners.is_empty() {
        return "(none)".into();
    }
    owners
        .iter()
        .map(|o| {
            let state = o.state.map(|s| format!(" {s}")).unwrap_or_default();
            if o.address.is_empty() {
                format!("{}{state}", o.ordinal)
            } else {
                format!("{} ({}{state})", o.ordinal, o.address)
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// `kvctl where KEY`.
pub fn render_placement(p: &PlacementInfo) -> String {
    let mut out = format!(
        "key {}  bucket {}\nowners: {}\n",
        p.key,
        p.bucket,
        owners_line(&p.owners)
    );
    if let Some(pending) = &p.pending_owners {
        let _ = writeln!(out, "pending owners: {}", owners_line(pending));
    }
    out
}

/// `kvctl put` / `kvctl delete`.
pub fn render_ack(verb: &str, ack: &WriteAck) -> String {
    format!("{verb} {} (version {})\n", ack.key, ack.version)
}

fn digest_cell(d: &BucketDigest) -> String {
    format!("{} records, digest {:032x}", d.count, d.sum)
}

/// `kvctl verify`. `skipped` are nodes that were not asked (with why).
pub fn render_verify(report: &VerifyReport, skipped: &[(u32, String)]) -> String {
    let mut out = String::new();
    for (n, why) in skipped {
        let _ = writeln!(out, "node {n}: not checked ({why})");
    }
    for d in &report.divergent {
        let _ = writeln!(out, "bucket {} differs:", d.bucket);
        for (o, dg) in &d.owners {
            let _ = writeln!(out, "  node {o}: {}", digest_cell(dg));
        }
    }
    let _ = write!(
        out,
        "{} buckets compared, {} differ",
        report.buckets_compared,
        report.divergent.len()
    );
    if report.buckets_single > 0 {
        let _ = write!(
            out,
            ", {} with a single checked owner",
            report.buckets_single
        );
    }
    out.push('\n');
    out
}

/// Renders a value for JSON output: a string when it is UTF-8, hex otherwise.
pub fn value_json(key: &str, value: &[u8], version: Option<&str>) -> serde_json::Value {
    let mut m = serde_json::Map::new();
    m.insert("key".into(), key.into());
    match std::str::from_utf8(value) {
        Ok(s) => m.insert("value".into(), s.into()),
        Err(_) => {
            let hex: String = value.iter().map(|b| format!("{b:02x}")).collect();
            m.insert("valueHex".into(), hex.into())
        }
    };
    if let Some(v) = version {
        m.insert("version".into(), v.into());
    }
    serde_json::Value::Object(m)
}
