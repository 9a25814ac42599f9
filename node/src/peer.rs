//! The client side of node-to-node traffic.
//!
//! A pool of keep-alive HTTP/1.1 connections per peer ([`kv_net::h1`],
//! plaintext or TLS) carries every call. Replica writes and
//! replica reads go through a per-peer *batcher*: a task that takes the first
//! queued item, drains whatever else is queued behind it and sends it all in
//! one request, with a few batches in flight per peer. Under load, concurrent
//! client requests to the same peer share a round trip instead of paying one
//! each (the same idea as the storage writer's group commit).
//!
//! Every request carries our topology epoch (`X-Kv-Epoch`) and ordinal
//! (`X-Kv-Node`); every answer carries the peer's epoch. A higher epoch on
//! either side makes the node that is behind fetch the topology.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kv_core::wire::{self, ApplyAnswer, CreateAnswer, WireError};
use kv_core::{Applied, Consistency, Digest, Record, Topology};

use crate::clock::SkewTracker;
use http_body_util::Full;
use tokio::sync::{Semaphore, mpsc, oneshot};
use warp::http::{HeaderMap, HeaderValue, Method, Request, header};

pub const EPOCH_HEADER: &str = "x-kv-epoch";
pub const NODE_HEADER: &str = "x-kv-node";
/// The sender's wall clock (ms since the Unix epoch), on every peer request
/// and answer: how nodes measure clock skew between them.
pub const CLOCK_HEADER: &str = "x-kv-clock";

/// Most items one batched request carries.
const MAX_BATCH: usize = 256;
/// Batched requests in flight to one peer at a time.
const IN_FLIGHT: usize = 4;
/// Times a batcher yields to the runtime before draining its queue when
/// another batch to the same peer is already in flight: the request tasks that
/// were ready get to queue their items, so the batch leaves bigger and the
/// link carries fewer requests. A link with nothing in flight sends at once
/// (measured in bench/profile.md).
const LINGER_YIELDS: usize = 2;

#[derive(Clone, Debug, thiserror::Error)]
pub enum PeerError {
    #[error("node {0} is unreachable: {1}")]
    Unreachable(u32, String),
    #[error("node {0} answered {1}: {2}")]
    Status(u32, u16, String),
    #[error("node {0} sent a bad batch: {1}")]
    Decode(u32, WireError),
    #[error("node {0} did not answer every item of a batch")]
    ShortAnswer(u32),
    #[error("node {0} is not in the topology")]
    Unknown(u32),
}

/// The two steps of a create-only write (see [`kv_core::CreateVote`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CreatePhase {
    Promise,
    Accept,
}

impl CreatePhase {
    /// The step's route under `/internal/v1/`.
    pub fn route(self) -> &'static str {
        match self {
            CreatePhase::Promise => "promise",
            CreatePhase::Accept => "accept",
        }
    }
}

/// What the peer side tells the node about epochs it saw.
#[derive(Clone, Copy, Debug)]
pub struct EpochSeen {
    pub ordinal: u32,
    pub epoch: u64,
}

type Reply<A> = oneshot::Sender<Result<A, PeerError>>;

/// One peer link's queue: request tasks hand it items (replica writes,
/// reads) and wait for their own answer; a task of its own sends them in
/// batched requests, up to [`IN_FLIGHT`] at once, so many concurrent client
/// requests cost the peer few HTTP requests.
struct Batcher<Q, A> {
    tx: mpsc::UnboundedSender<(Q, Reply<A>)>,
}

impl<Q: Send + 'static, A: Send + 'static> Batcher<Q, A> {
    fn spawn<F, Fut>(send: F, sizes: Option<prometheus::Histogram>) -> Self
    where
        F: Fn(Vec<Q>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Vec<A>, PeerError>> + Send + 'static,
    {
        let (tx, mut rx) = mpsc::unbounded_channel::<(Q, Reply<A>)>();
        let send = Arc::new(send);
        let slots = Arc::new(Semaphore::new(IN_FLIGHT));
        tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                let Ok(permit) = slots.clone().acquire_owned().await else {
                    return;
                };
                if slots.available_permits() + 1 < IN_FLIGHT {
                    for _ in 0..LINGER_YIELDS {
                        tokio::task::yield_now().await;
                    }
                }
                // Drain what queued up while we waited for a slot.
                let mut batch = vec![first];
                while batch.len() < MAX_BATCH {
                    match rx.try_recv() {
                        Ok(item) => batch.push(item),
                        Err(_) => break,
                    }
                }
                if let Some(sizes) = &sizes {
                    sizes.observe(batch.len() as f64);
                }
                let send = send.clone();
                tokio::spawn(async move {
                    let (items, replies): (Vec<Q>, Vec<Reply<A>>) = batch.into_iter().unzip();
                    let n = items.len();
                    match send(items).await {
                        Ok(answers) if answers.len() == n => {
                            for (reply, a) in replies.into_iter().zip(answers) {
                                let _ = reply.send(Ok(a));
                            }
                        }
                        Ok(_) => {
                            for reply in replies {
                                let _ = reply.send(Err(PeerError::ShortAnswer(u32::MAX)));
                            }
                        }
                        Err(e) => {
                            for reply in replies {
                                let _ = reply.send(Err(e.clone()));
                            }
                        }
                    }
                    drop(permit);
                });
            }
        });
        Batcher { tx }
    }

    async fn call(&self, q: Q, ordinal: u32) -> Result<A, PeerError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send((q, reply))
            .map_err(|_| PeerError::Unreachable(ordinal, "batcher stopped".into()))?;
        rx.await
            .map_err(|_| PeerError::Unreachable(ordinal, "batch dropped".into()))?
    }
}

/// One owner's answer about one record it was asked to apply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ApplyReply {
    pub outcome: Applied,
    /// The owner's store is still catching up: its acknowledgement does not
    /// count towards a quorum of the committed placement.
    pub catching_up: bool,
}

struct Link {
    address: String,
    apply: Batcher<Record, ApplyReply>,
    read: Batcher<Vec<u8>, Option<Record>>,
}

/// Node-to-node client.
pub struct Peers {
    inner: Arc<Inner>,
    links: Mutex<HashMap<u32, Arc<Link>>>,
    /// `kv_peer_batch_size`, by op (`apply`, `read`), once the node has
    /// handed it over ([`Peers::with_batch_sizes`]).
    batch_sizes: Option<prometheus::HistogramVec>,
}

struct Inner {
    me: u32,
    /// The cluster tokens; peers are sent the first (rotation: kv_net::token).
    token: kv_net::token::Tokens,
    epoch: std::sync::atomic::AtomicU64,
    seen: mpsc::UnboundedSender<EpochSeen>,
    timeout: Duration,
    skew: Arc<SkewTracker>,
    wall_ms: Arc<dyn Fn() -> u64 + Send + Sync>,
    /// Trusting the cluster CA, presenting this node's certificate.
    tls: Option<Arc<rustls::ClientConfig>>,
    /// One pool of connections per peer address.
    pools: Mutex<HashMap<String, Arc<kv_net::h1::H1Pool>>>,
}

impl Peers {
    /// `seen` receives every higher epoch a peer answers with; `skew` every
    /// clock offset measured from an answer; `wall_ms` reads this node's clock.
    /// With `tls` (trusting the cluster CA, presenting this node's
    /// certificate) peers are called over https.
    pub fn new(
        me: u32,
        token: kv_net::token::Tokens,
        timeout: Duration,
        tls: Option<rustls::ClientConfig>,
        seen: mpsc::UnboundedSender<EpochSeen>,
        skew: Arc<SkewTracker>,
        wall_ms: Arc<dyn Fn() -> u64 + Send + Sync>,
    ) -> Peers {
        Peers {
            inner: Arc::new(Inner {
                me,
                token,
                epoch: std::sync::atomic::AtomicU64::new(0),
                seen,
                timeout,
                skew,
                wall_ms,
                tls: tls.map(Arc::new),
                pools: Mutex::new(HashMap::new()),
            }),
            links: Mutex::new(HashMap::new()),
            batch_sizes: None,
        }
    }

    /// Records the size of every batch sent to a peer in `sizes`
    /// (`kv_peer_batch_size{op}`).
    pub fn with_batch_sizes(mut self, sizes: prometheus::HistogramVec) -> Peers {
        self.batch_sizes = Some(sizes);
        self
    }

    /// The epoch sent on every request.
    pub fn set_epoch(&self, epoch: u64) {
        self.inner
            .epoch
            .store(epoch, std::sync::atomic::Ordering::Release);
    }

    pub fn timeout(&self) -> Duration {
        self.inner.timeout
    }

    fn link(&self, ordinal: u32, address: &str) -> Arc<Link> {
        let mut links = self.links.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(l) = links.get(&ordinal).filter(|l| l.address == address) {
            return l.clone();
        }
        let (i1, a1) = (self.inner.clone(), address.to_string());
        let (i2, a2) = (self.inner.clone(), address.to_string());
        let sizes = |op: &str| {
            self.batch_sizes
                .as_ref()
                .map(|v| v.with_label_values(&[op]))
        };
        let link = Arc::new(Link {
            address: address.to_string(),
            apply: Batcher::spawn(
                move |records: Vec<Record>| {
                    let (i, a) = (i1.clone(), a1.clone());
                    async move {
                        let answer = apply_batch(&i, ordinal, &a, &records).await?;
                        let catching_up = answer.catching_up;
                        Ok(answer
                            .outcomes
                            .into_iter()
                            .map(|outcome| ApplyReply {
                                outcome,
                                catching_up,
                            })
                            .collect())
                    }
                },
                sizes("apply"),
            ),
            read: Batcher::spawn(
                move |keys: Vec<Vec<u8>>| {
                    let (i, a) = (i2.clone(), a2.clone());
                    async move {
                        let found = read_batch(&i, ordinal, &a, &keys).await?;
                        Ok(answers_in_order(&keys, found))
                    }
                },
                sizes("read"),
            ),
        });
        links.insert(ordinal, link.clone());
        link
    }

    /// Applies one record on a peer (batched with concurrent calls).
    pub async fn apply_one(
        &self,
        ordinal: u32,
        address: &str,
        record: Record,
    ) -> Result<ApplyReply, PeerError> {
        self.link(ordinal, address)
            .apply
            .call(record, ordinal)
            .await
    }

    /// Reads one key from a peer (batched with concurrent calls).
    pub async fn read_one(
        &self,
        ordinal: u32,
        address: &str,
        key: Vec<u8>,
    ) -> Result<Option<Record>, PeerError> {
        self.link(ordinal, address).read.call(key, ordinal).await
    }

    /// Applies a whole batch on a peer in one request (hints, streaming).
    pub async fn apply(
        &self,
        ordinal: u32,
        address: &str,
        records: &[Record],
    ) -> Result<ApplyAnswer, PeerError> {
        apply_batch(&self.inner, ordinal, address, records).await
    }

    /// Asks the key's create leader to run a create-only write of `record`
    /// (its version is ignored) at `level`. `Ok(Err(status, message))` is the
    /// leader's refusal (412 when the key exists).
    pub async fn create(
        &self,
        ordinal: u32,
        address: &str,
        record: &Record,
        level: Consistency,
    ) -> Result<Record, PeerError> {
        let body = post(
            &self.inner,
            ordinal,
            address,
            &format!("create?consistency={level}"),
            wire::encode_records([record]),
        )
        .await?;
        let mut records = wire::decode_records(&body).map_err(|e| PeerError::Decode(ordinal, e))?;
        match records.pop() {
            Some(r) if records.is_empty() => Ok(r),
            _ => Err(PeerError::ShortAnswer(ordinal)),
        }
    }

    /// One step of a create-only write on a peer: `phase` is `"promise"`
    /// (`record` carries the key and the ballot as its version) or
    /// `"accept"` (the record to store).
    pub async fn create_step(
        &self,
        ordinal: u32,
        address: &str,
        phase: CreatePhase,
        record: &Record,
    ) -> Result<CreateAnswer, PeerError> {
        let body = post(
            &self.inner,
            ordinal,
            address,
            phase.route(),
            wire::encode_records([record]),
        )
        .await?;
        wire::decode_create_answer(&body).map_err(|e| PeerError::Decode(ordinal, e))
    }

    /// A request that carries nothing but clocks: measures the skew to `ordinal`.
    pub async fn ping(&self, ordinal: u32, address: &str) -> Result<(), PeerError> {
        get(&self.inner, ordinal, address, "clock")
            .await
            .map(|_| ())
    }

    /// A peer's bucket digests and whether its own store is still catching
    /// up (new or rebuilt).
    pub async fn store_digests(
        &self,
        ordinal: u32,
        address: &str,
    ) -> Result<(bool, Vec<Digest>), PeerError> {
        let body = get(&self.inner, ordinal, address, "store-digests").await?;
        let (flag, rest) = body.split_first().ok_or(PeerError::ShortAnswer(ordinal))?;
        let d = wire::decode_digests(rest).map_err(|e| PeerError::Decode(ordinal, e))?;
        Ok((*flag == 1, d))
    }

    pub async fn digests(&self, ordinal: u32, address: &str) -> Result<Vec<Digest>, PeerError> {
        let body = get(&self.inner, ordinal, address, "digests").await?;
        wire::decode_digests(&body).map_err(|e| PeerError::Decode(ordinal, e))
    }

    pub async fn bucket(
        &self,
        ordinal: u32,
        address: &str,
        bucket: u32,
    ) -> Result<Vec<Record>, PeerError> {
        let body = get(&self.inner, ordinal, address, &format!("bucket/{bucket}")).await?;
        wire::decode_records(&body).map_err(|e| PeerError::Decode(ordinal, e))
    }

    /// Every record (tombstones included) of several buckets in one request.
    pub async fn buckets(
        &self,
        ordinal: u32,
        address: &str,
        buckets: &[u32],
    ) -> Result<Vec<Record>, PeerError> {
        let body = post(
            &self.inner,
            ordinal,
            address,
            "buckets",
            wire::encode_buckets(buckets),
        )
        .await?;
        wire::decode_records(&body).map_err(|e| PeerError::Decode(ordinal, e))
    }

    /// Records (tombstones included) of a prefix scan on one peer.
    pub async fn scan(
        &self,
        ordinal: u32,
        address: &str,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<Record>, PeerError> {
        use percent_encoding::{NON_ALPHANUMERIC, percent_encode};
        let mut path = format!(
            "scan?limit={limit}&prefix={}",
            percent_encode(prefix, NON_ALPHANUMERIC)
        );
        if let Some(after) = after {
            path.push_str(&format!(
                "&after={}",
                percent_encode(after, NON_ALPHANUMERIC)
            ));
        }
        let answer = get(&self.inner, ordinal, address, &path).await?;
        wire::decode_records(&answer).map_err(|e| PeerError::Decode(ordinal, e))
    }

    pub async fn topology(&self, ordinal: u32, address: &str) -> Result<Topology, PeerError> {
        let body = get(&self.inner, ordinal, address, "topology").await?;
        Topology::from_json(&body).map_err(|e| PeerError::Status(ordinal, 200, e.to_string()))
    }
}

/// Sends one request to `/internal/v1/{path}` on a peer with our epoch,
/// ordinal and clock, and reads the whole answer; the peer's clock and
/// epoch in it are recorded.
async fn send(
    inner: &Inner,
    ordinal: u32,
    address: &str,
    method: Method,
    path: &str,
    body: Vec<u8>,
) -> Result<bytes::Bytes, PeerError> {
    let unreachable = |e: String| PeerError::Unreachable(ordinal, e);
    let epoch = inner.epoch.load(std::sync::atomic::Ordering::Acquire);
    let sent_at = (inner.wall_ms)();
    let started = std::time::Instant::now();
    let mut headers = HeaderMap::new();
    let mut auth = b"Bearer ".to_vec();
    auth.extend_from_slice(inner.token.current().as_bytes());
    for (name, value) in [
        (
            header::AUTHORIZATION.as_str(),
            HeaderValue::from_bytes(&auth),
        ),
        (EPOCH_HEADER, HeaderValue::from_str(&epoch.to_string())),
        (NODE_HEADER, HeaderValue::from_str(&inner.me.to_string())),
        (CLOCK_HEADER, HeaderValue::from_str(&sent_at.to_string())),
    ] {
        let value = value.map_err(|e| unreachable(format!("bad {name} header: {e}")))?;
        headers.insert(name, value);
    }
    let pool = inner.pool(address);
    let mut req = Request::new(Full::new(bytes::Bytes::from(body)));
    *req.method_mut() = method;
    *req.uri_mut() = format!("/internal/v1/{path}")
        .parse()
        .map_err(|e| unreachable(format!("bad path {path:?}: {e}")))?;
    *req.headers_mut() = headers;
    let kv_net::h1::Answer {
        status,
        headers: answer_headers,
        body,
    } = pool
        .send(req, inner.timeout)
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    if let Some(theirs) = answer_headers
        .get(CLOCK_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
    {
        // their clock against ours at the middle of the round trip
        let mid = sent_at as i64 + started.elapsed().as_millis() as i64 / 2;
        inner.skew.record(ordinal, theirs as i64 - mid);
    }
    if let Some(theirs) = answer_headers
        .get(EPOCH_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
    {
        let _ = inner.seen.send(EpochSeen {
            ordinal,
            epoch: theirs,
        });
    }
    if !status.is_success() {
        let msg = String::from_utf8_lossy(&body[..body.len().min(512)]).into_owned();
        return Err(PeerError::Status(ordinal, status.as_u16(), msg));
    }
    Ok(body)
}

impl Inner {
    /// The pool of connections to `address`, made on first use.
    fn pool(&self, address: &str) -> Arc<kv_net::h1::H1Pool> {
        let mut pools = self.pools.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(pool) = pools.get(address) {
            return pool.clone();
        }
        let pool = Arc::new(match &self.tls {
            None => kv_net::h1::H1Pool::new(address, self.timeout),
            Some(tls) => kv_net::h1::H1Pool::with_tls(address, self.timeout, tls.clone()),
        });
        pools.insert(address.to_string(), pool.clone());
        pool
    }
}

async fn get(
    inner: &Inner,
    ordinal: u32,
    address: &str,
    path: &str,
) -> Result<bytes::Bytes, PeerError> {
    send(inner, ordinal, address, Method::GET, path, Vec::new()).await
}

async fn post(
    inner: &Inner,
    ordinal: u32,
    address: &str,
    path: &str,
    body: Vec<u8>,
) -> Result<bytes::Bytes, PeerError> {
    send(inner, ordinal, address, Method::POST, path, body).await
}

async fn apply_batch(
    inner: &Inner,
    ordinal: u32,
    address: &str,
    records: &[Record],
) -> Result<ApplyAnswer, PeerError> {
    let body = post(
        inner,
        ordinal,
        address,
        "apply",
        wire::encode_records(records),
    )
    .await?;
    let answer = wire::decode_apply_answer(&body).map_err(|e| PeerError::Decode(ordinal, e))?;
    if answer.outcomes.len() != records.len() {
        return Err(PeerError::ShortAnswer(ordinal));
    }
    Ok(answer)
}

/// Each asked key's record, in the order asked. A batch may ask for the same
/// key more than once (concurrent reads of one key share a batch), and each
/// asker gets the record: taking it out of the map for the first left the
/// second with "not found" (kv-chaos seed 3909055812 read a stale absence).
fn answers_in_order(keys: &[Vec<u8>], found: Vec<Record>) -> Vec<Option<Record>> {
    let by_key: HashMap<Vec<u8>, Record> = found.into_iter().map(|r| (r.key.clone(), r)).collect();
    keys.iter().map(|k| by_key.get(k).cloned()).collect()
}

async fn read_batch(
    inner: &Inner,
    ordinal: u32,
    address: &str,
    keys: &[Vec<u8>],
) -> Result<Vec<Record>, PeerError> {
    let body = post(
        inner,
        ordinal,
        address,
        "read",
        wire::encode_keys(keys.iter().map(Vec::as_slice)),
    )
    .await?;
    wire::decode_records(&body).map_err(|e| PeerError::Decode(ordinal, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use kv_core::Version;

    fn rec(key: &[u8], value: &[u8]) -> Record {
        Record {
            key: key.to_vec(),
            value: Some(value.to_vec()),
            version: Version { ts: 7, node: 1 },
        }
    }

    #[test]
    fn a_key_asked_twice_in_one_batch_is_answered_twice() {
        let keys = vec![
            b"k3".to_vec(),
            b"k1".to_vec(),
            b"k3".to_vec(),
            b"gone".to_vec(),
        ];
        let found = vec![rec(b"k1", b"one"), rec(b"k3", b"three")];
        let answers = answers_in_order(&keys, found);
        assert_eq!(answers.len(), 4);
        assert_eq!(
            answers[0].as_ref().and_then(|r| r.value.as_deref()),
            Some(&b"three"[..])
        );
        assert_eq!(
            answers[1].as_ref().and_then(|r| r.value.as_deref()),
            Some(&b"one"[..])
        );
        assert_eq!(
            answers[2].as_ref().and_then(|r| r.value.as_deref()),
            Some(&b"three"[..])
        );
        assert!(answers[3].is_none());
    }

    /// Concurrent reads of one key queue behind each other and leave in one
    /// batch; each caller gets the record.
    #[tokio::test]
    async fn concurrent_reads_of_one_key_in_one_batch_each_get_it() {
        let batches = Arc::new(Mutex::new(Vec::new()));
        let seen = batches.clone();
        let read: Batcher<Vec<u8>, Option<Record>> = Batcher::spawn(
            move |keys: Vec<Vec<u8>>| {
                seen.lock().unwrap().push(keys.len());
                async move {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    let found: Vec<Record> = keys
                        .iter()
                        .filter(|k| k.as_slice() == b"hot")
                        .map(|k| rec(k, b"value"))
                        .collect();
                    Ok(answers_in_order(&keys, found))
                }
            },
            None,
        );
        let calls = (0..8).map(|_| read.call(b"hot".to_vec(), 1));
        let answers = futures::future::join_all(calls).await;
        assert!(
            batches.lock().unwrap().iter().any(|&n| n > 1),
            "the calls never shared a batch: {:?}",
            batches.lock().unwrap()
        );
        for a in answers {
            assert_eq!(a.unwrap().and_then(|r| r.value), Some(b"value".to_vec()));
        }
    }
}
