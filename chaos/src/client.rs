//! The clients: tokio tasks that write, read and delete random keys of a
//! small key space (so that they collide), each request sent either through
//! the gateway or straight to a random node (every node coordinates), and
//! every request recorded with its outcome.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::Xoshiro256PlusPlus;
use rand::{RngExt, SeedableRng};

use crate::history::{FINAL_CLIENT, Op, OpKind, Outcome, Recorder};

/// Where clients send requests.
#[derive(Clone, Debug)]
pub struct Targets {
    /// `host:port` of the gateway.
    pub gateway: String,
    /// `(ordinal, host:port)` of every node's client port.
    pub nodes: Vec<(u32, String)>,
    pub token: String,
}

/// One client's workload.
#[derive(Clone, Debug)]
pub struct Workload {
    pub keys: usize,
    pub request_timeout: Duration,
    /// Longest pause between two requests of one client.
    pub max_think: Duration,
    /// `X-Consistency` of reads and of writes/deletes (`None`: the cluster's).
    pub read_consistency: Option<&'static str>,
    pub write_consistency: Option<&'static str>,
}

pub fn key_name(i: usize) -> String {
    format!("k{i}")
}

/// A fresh HTTP client for one worker (its own connection pool).
pub fn http_client(timeout: Duration) -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(Duration::from_millis(500))
        .tcp_nodelay(true)
        .build()
        .unwrap_or_default()
}

/// Runs client `id` until `deadline`; operations go to `rec`.
pub async fn run_client(
    id: usize,
    seed: u64,
    targets: Arc<Targets>,
    work: Workload,
    rec: Arc<Recorder>,
    deadline: Instant,
) -> usize {
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed ^ ((id as u64 + 1) << 32));
    let http = http_client(work.request_timeout);
    let mut seq = 0usize;
    while Instant::now() < deadline {
        let key = key_name(rng.random_range(0..work.keys.max(1)));
        let roll: u32 = rng.random_range(0..100);
        let kind = if roll < 50 {
            seq += 1;
            OpKind::Write(format!("c{id}-{seq}"))
        } else if roll < 85 {
            OpKind::Read
        } else {
            OpKind::Delete
        };
        let (target, addr) = if targets.nodes.is_empty() || rng.random_range(0..2) == 0 {
            ("gateway".to_string(), targets.gateway.clone())
        } else {
            let (o, a) = &targets.nodes[rng.random_range(0..targets.nodes.len())];
            (format!("node {o}"), a.clone())
        };
        let op = perform(
            &http,
            &rec,
            id,
            &addr,
            &target,
            &targets.token,
            key,
            kind,
            None,
        )
        .await;
        rec.record(op);
        let think = work.max_think.as_millis() as u64;
        if think > 0 {
            tokio::time::sleep(Duration::from_millis(rng.random_range(0..=think))).await;
        }
    }
    seq
}

/// Sends one request and classifies what came back.
#[allow(clippy::too_many_arguments)]
pub async fn perform(
    http: &reqwest::Client,
    rec: &Recorder,
    client: usize,
    addr: &str,
    target: &str,
    token: &str,
    key: String,
    kind: OpKind,
    consistency: Option<&str>,
) -> Op {
    let url = format!("http://{addr}/v1/kv/{key}");
    let mut req = match &kind {
        OpKind::Write(v) => http.put(&url).body(v.clone()),
        OpKind::Read => http.get(&url),
        OpKind::Delete => http.delete(&url),
    }
    .bearer_auth(token);
    if let Some(c) = consistency {
        req = req.header("x-consistency", c);
    }
    let id = rec.next_id();
    let invoke = rec.now();
    let answer = match req.send().await {
        Ok(resp) => {
            let status = resp.status().as_u16();
            resp.bytes().await.map(|b| (status, b))
        }
        Err(e) => Err(e),
    };
    let done = rec.now();
    let mut op = Op {
        id,
        client,
        key,
        kind,
        invoke,
        complete: Some(done),
        outcome: Outcome::Ok,
        read: None,
        absent: false,
        target: target.to_string(),
        note: String::new(),
    };
    match answer {
        Ok((status, body)) => classify(&mut op, status, &body),
        Err(e) => {
            // Refused before anything was sent: it did not happen. Anything
            // else (timeout, cut connection) may have.
            op.outcome = if e.is_connect() {
                Outcome::Fail
            } else {
                Outcome::Unknown
            };
            op.note = error_chain(&e);
        }
    }
    if op.outcome == Outcome::Unknown {
        op.complete = None;
    }
    op
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Sorts an HTTP answer into ok / fail / unknown.
pub fn classify(op: &mut Op, status: u16, body: &[u8]) {
    let text = String::from_utf8_lossy(body).to_string();
    match (status, &op.kind) {
        (200, OpKind::Read) => {
            op.outcome = Outcome::Ok;
            op.read = Some(text);
        }
        (404, OpKind::Read) => {
            op.outcome = Outcome::Ok;
            op.read = None;
        }
        (200, _) => op.outcome = Outcome::Ok,
        (404, OpKind::Delete) => {
            op.outcome = Outcome::Ok;
            op.absent = true;
        }
        _ => {
            op.note = format!("{status} {}", text.chars().take(160).collect::<String>());
            op.outcome = if (400..500).contains(&status) || refused_before_coordinating(&text) {
                Outcome::Fail
            } else {
                Outcome::Unknown
            };
        }
    }
}

/// A 503 that says the node did not coordinate the request at all (it is
/// not Up, or the gateway had no node to send it to).
fn refused_before_coordinating(body: &str) -> bool {
    body.contains("try another node") || body.contains("no node is Up yet")
}

/// The final read of `key` at `All` through the node `addr`.
pub async fn final_read(
    http: &reqwest::Client,
    rec: &Recorder,
    addr: &str,
    target: &str,
    token: &str,
    key: String,
) -> Op {
    perform(
        http,
        rec,
        FINAL_CLIENT,
        addr,
        target,
        token,
        key,
        OpKind::Read,
        Some("all"),
    )
    .await
}
