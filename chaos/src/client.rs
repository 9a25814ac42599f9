//! The clients: tokio tasks that write, create, read and delete random keys
//! of a small key space (so that they collide), each request sent either
//! through the gateway or straight to a random node (every node
//! coordinates), and every request recorded with its outcome. Beside them
//! a create race ([`run_create_races`]) again and again deletes a key and
//! sends several creates of it at the same moment, so that at most one of
//! them may succeed.

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

impl Targets {
    /// Slot 0 is the gateway, slot `i` node `i - 1`'s client port:
    /// `(name, host:port)`.
    pub fn pick(&self, slot: usize) -> (String, String) {
        match slot.checked_sub(1).and_then(|i| self.nodes.get(i)) {
            Some((o, a)) => (format!("node {o}"), a.clone()),
            None => ("gateway".to_string(), self.gateway.clone()),
        }
    }
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

impl Workload {
    /// The `X-Consistency` a request of `kind` carries.
    pub fn consistency_of(&self, kind: &OpKind) -> Option<&'static str> {
        match kind {
            OpKind::Read => self.read_consistency,
            _ => self.write_consistency,
        }
    }
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
        let kind = if roll < 42 {
            seq += 1;
            OpKind::Write(format!("c{id}-{seq}"))
        } else if roll < 50 {
            seq += 1;
            OpKind::Create {
                value: format!("c{id}-{seq}"),
                classic: rng.random_range(0..2) == 0,
            }
        } else if roll < 85 {
            OpKind::Read
        } else {
            OpKind::Delete
        };
        // Half through the gateway, half straight to a random node.
        let slot = if targets.nodes.is_empty() || rng.random_range(0..2) == 0 {
            0
        } else {
            1 + rng.random_range(0..targets.nodes.len())
        };
        let (target, addr) = targets.pick(slot);
        let consistency = work.consistency_of(&kind);
        let op = perform(
            &http,
            &rec,
            id,
            &addr,
            &target,
            &targets.token,
            key,
            kind,
            consistency,
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

/// Create races until `deadline`: pick a key, delete it (so that it is
/// likely absent), then send `width` creates of it at the same moment, each
/// from its own client (ids `first_client..first_client + width`, one
/// request in flight each) to its own target (the gateway or a node), each
/// through the v1 API or the classic one. The store must acknowledge at most
/// one of them. Returns the races run.
pub async fn run_create_races(
    first_client: usize,
    width: usize,
    seed: u64,
    targets: Arc<Targets>,
    work: Workload,
    rec: Arc<Recorder>,
    deadline: Instant,
) -> usize {
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed ^ ((first_client as u64 + 1) << 32));
    let https: Vec<reqwest::Client> = (0..width)
        .map(|_| http_client(work.request_timeout))
        .collect();
    let mut seqs = vec![0usize; width];
    let level = work.write_consistency;
    let mut races = 0;
    while width > 0 && Instant::now() < deadline {
        let key = key_name(rng.random_range(0..work.keys.max(1)));
        let (target, addr) = targets.pick(rng.random_range(0..=targets.nodes.len()));
        let delete = perform(
            &https[0],
            &rec,
            first_client,
            &addr,
            &target,
            &targets.token,
            key.clone(),
            OpKind::Delete,
            level,
        )
        .await;
        rec.record(delete);
        // Distinct targets while there are enough of them.
        let mut slots: Vec<usize> = (0..=targets.nodes.len()).collect();
        let creates = (0..width).map(|i| {
            let slot = if slots.is_empty() {
                rng.random_range(0..=targets.nodes.len())
            } else {
                slots.swap_remove(rng.random_range(0..slots.len()))
            };
            let (target, addr) = targets.pick(slot);
            seqs[i] += 1;
            let client = first_client + i;
            let kind = OpKind::Create {
                value: format!("c{client}-{}", seqs[i]),
                classic: rng.random_range(0..2) == 0,
            };
            let (http, rec, token, key) = (&https[i], &rec, &targets.token, key.clone());
            async move { perform(http, rec, client, &addr, &target, token, key, kind, level).await }
        });
        let creates: Vec<_> = creates.collect();
        for op in futures::future::join_all(creates).await {
            rec.record(op);
        }
        races += 1;
        let think = rng.random_range(50..=300);
        tokio::time::sleep(Duration::from_millis(think)).await;
    }
    races
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
        OpKind::Create {
            value,
            classic: false,
        } => http
            .put(&url)
            .header("if-none-match", "*")
            .body(value.clone()),
        OpKind::Create {
            value,
            classic: true,
        } => http
            .post(format!("http://{addr}/write"))
            .header("content-type", "application/json")
            .body(serde_json::json!({"key": key, "value": value}).to_string()),
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
        exists: false,
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
        (200..300, OpKind::Write(_) | OpKind::Create { .. } | OpKind::Delete) => {
            op.outcome = Outcome::Ok
        }
        (404, OpKind::Delete) => {
            op.outcome = Outcome::Ok;
            op.absent = true;
        }
        (412, OpKind::Create { classic: false, .. })
        | (409, OpKind::Create { classic: true, .. }) => {
            op.outcome = Outcome::Fail;
            op.exists = true;
            op.note = format!("{status}");
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

#[cfg(test)]
mod tests {
    use super::*;

    fn op(kind: OpKind) -> Op {
        Op {
            id: 0,
            client: 0,
            key: "k".into(),
            kind,
            invoke: 0,
            complete: Some(1),
            outcome: Outcome::Unknown,
            read: None,
            absent: false,
            exists: false,
            target: "gateway".into(),
            note: String::new(),
        }
    }

    fn create(classic: bool) -> Op {
        op(OpKind::Create {
            value: "v".into(),
            classic,
        })
    }

    #[test]
    fn a_create_is_acknowledged_by_200_or_201_and_refused_as_existing_by_412_or_classic_409() {
        for status in [200, 201] {
            let mut o = create(false);
            classify(&mut o, status, b"{}");
            assert_eq!((o.outcome, o.exists), (Outcome::Ok, false));
        }
        let mut o = create(false);
        classify(&mut o, 412, b"{}");
        assert_eq!((o.outcome, o.exists), (Outcome::Fail, true));
        let mut o = create(true);
        classify(&mut o, 409, b"{}");
        assert_eq!((o.outcome, o.exists), (Outcome::Fail, true));
        // Any other refusal wrote nothing but says nothing of the key.
        let mut o = create(true);
        classify(&mut o, 400, b"{}");
        assert_eq!((o.outcome, o.exists), (Outcome::Fail, false));
        // A 5xx after the coordinator started may have written.
        let mut o = create(false);
        classify(&mut o, 503, br#"{"message":"write at quorum needs 2"}"#);
        assert_eq!(o.outcome, Outcome::Unknown);
    }

    #[test]
    fn a_delete_that_found_nothing_is_acknowledged_as_absent() {
        let mut o = op(OpKind::Delete);
        classify(&mut o, 404, b"{}");
        assert_eq!((o.outcome, o.absent), (Outcome::Ok, true));
    }
}
