//! `kvctl backup` and `kvctl restore` (see `kvctl::backup`): tokens,
//! clients and output.

use std::io::Write;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use kv_local::tokens::TokenKind;
use kvctl::backup::peer::{PeerClient, PeerTls};
use kvctl::backup::{self, target::Target};
use kvctl::cli::ClusterAccess;
use kvctl::client::{Client, TlsOptions};

/// The client and cluster tokens: as given, else from the data directory's
/// token files (what `kvctl up` wrote; the first line is the one to send).
fn tokens(token: Option<String>, access: &ClusterAccess) -> Result<(Option<String>, String)> {
    if let (Some(t), Some(c)) = (&token, &access.cluster_token) {
        return Ok((Some(t.clone()), c.clone()));
    }
    let Some(dir) = &access.data_dir else {
        return match access.cluster_token.clone() {
            Some(c) => Ok((token, c)),
            None => Err(anyhow!(
                "backup and restore need the cluster token: --cluster-token (KV_CLUSTER_TOKEN), or --data-dir of a kvctl up cluster"
            )),
        };
    };
    let read = |kind: TokenKind| -> Result<String> {
        let tokens = kv_net::token::read_file(kind.name(), &kind.file(dir))?;
        Ok(tokens.into_iter().next().unwrap_or_default())
    };
    let token = match token {
        Some(t) => t,
        None => read(TokenKind::Client)?,
    };
    let cluster = match access.cluster_token.clone() {
        Some(c) => c,
        None => read(TokenKind::Cluster)?,
    };
    Ok((Some(token), cluster))
}

/// Where the cluster is and how to reach it: kvctl's global flags and
/// `backup`/`restore`'s own.
pub struct Reach<'a> {
    pub endpoint: &'a str,
    pub token: Option<String>,
    pub access: &'a ClusterAccess,
    pub tls: &'a TlsOptions,
    pub timeout: Duration,
}

impl<'a> Reach<'a> {
    pub fn new(
        endpoint: &'a str,
        token: Option<String>,
        access: &'a ClusterAccess,
        tls: &'a TlsOptions,
        timeout: Duration,
    ) -> Reach<'a> {
        Reach {
            endpoint,
            token,
            access,
            tls,
            timeout,
        }
    }
}

fn clients(reach: Reach<'_>) -> Result<(Client, PeerClient)> {
    let Reach {
        endpoint,
        token,
        access,
        tls,
        timeout,
    } = reach;
    let (token, cluster_token) = tokens(token, access)?;
    // A `kvctl up --tls` data directory: its CA for the gateway (unless
    // --cacert says otherwise) and its certificate for the peer ports.
    let peer_tls = access.data_dir.as_deref().and_then(PeerTls::of_data_dir);
    let mut tls = tls.clone();
    if let Some(t) = &peer_tls
        && tls.cacert.is_none()
    {
        tls.cacert = Some(t.ca.clone());
    }
    let client = Client::with_tls(endpoint, token, None, timeout, &tls)?;
    // A bucket pull of a large bucket takes longer than a point request.
    let peers = PeerClient::new(
        cluster_token,
        timeout.max(Duration::from_secs(60)),
        peer_tls.as_ref(),
    )?;
    Ok((client, peers))
}

fn print(line: String) -> Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(line.as_bytes())
        .and_then(|()| out.flush())
        .context("cannot write to stdout")
}

pub async fn backup(reach: Reach<'_>, to: &str, json_out: bool) -> Result<ExitCode> {
    let (client, peers) = clients(reach)?;
    let target = Target::open(to)?;
    let began = Instant::now();
    let m = backup::backup(&client, &peers, &target, &backup::Progress::default()).await?;
    if json_out {
        let mut v = serde_json::to_value(&m).context("cannot render JSON")?;
        // the per-bucket table is in the manifest object; the summary stays short
        if let Some(o) = v.as_object_mut() {
            o.remove("buckets");
            o.insert("location".into(), to.into());
        }
        crate::cmd::print_json(&v)?;
    } else {
        print(format!(
            "backed up cluster {} (epoch {}) to {to}: {} records ({} tombstones) in {} buckets, {} bytes, HLC high-water {}, in {:.1} s\n",
            m.cluster_id,
            m.epoch,
            m.records,
            m.tombstones,
            m.buckets.len(),
            m.bytes,
            m.hlc_high_water,
            began.elapsed().as_secs_f64()
        ))?;
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn restore(
    reach: Reach<'_>,
    from: &str,
    force: bool,
    json_out: bool,
) -> Result<ExitCode> {
    let (client, peers) = clients(reach)?;
    let target = Target::open(from)?;
    let began = Instant::now();
    let r = backup::restore(&client, &peers, &target, force).await?;
    if json_out {
        crate::cmd::print_json(&r)?;
    } else {
        print(format!(
            "restored {} records of cluster {} from {from} into cluster {} (epoch {}): {} copies stored, {} already held, {} held newer; {} bucket replicas match the manifest; in {:.1} s\n",
            r.records,
            r.backup_cluster_id,
            r.cluster_id,
            r.epoch,
            r.stored,
            r.already_held,
            r.held_newer,
            r.replicas_checked,
            began.elapsed().as_secs_f64()
        ))?;
    }
    Ok(ExitCode::SUCCESS)
}
