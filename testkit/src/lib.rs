//! kvstore's dev-only test kit (never a dependency of a shipped crate):
//! real `kv-node` processes on loopback ports ([`NodeProc`]) with a blocking
//! client ([`Client`]), topology files, waiting helpers, free loopback ports
//! ([`free_port`]), a TCP fault proxy ([`proxy`]) and a mocked Kubernetes API
//! server ([`kube_mock`]).

pub mod kube_mock;
pub mod proxy;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kv_core::{Consistency, NodeInfo, NodeState, PlacementSpec, Strategy, Topology};
use serde_json::Value;

pub const TOKEN: &str = "client-secret";
pub const CLUSTER_TOKEN: &str = "cluster-secret";

/// A loopback port that was free a moment ago, below Linux's default
/// ephemeral range ([`kv_net::free_port`], which the local platform uses for
/// its nodes too).
pub fn free_port() -> u16 {
    kv_net::free_port().expect("a free loopback port")
}

/// A kv-node process of a test: `bin` (a kv-node binary, e.g.
/// `env!("CARGO_BIN_EXE_kv-node")`) with the test tokens, on free ports;
/// killed on drop.
pub struct NodeProc {
    pub bin: PathBuf,
    pub ordinal: u32,
    pub port: u16,
    pub peer_port: u16,
    pub data_dir: PathBuf,
    pub topology_file: Option<PathBuf>,
    pub extra: Vec<String>,
    /// The client and cluster tokens it starts with ([`TOKEN`] and
    /// [`CLUSTER_TOKEN`] unless a test sets others).
    pub token: String,
    pub cluster_token: String,
    child: Option<Child>,
}

impl NodeProc {
    pub fn new(
        bin: impl AsRef<Path>,
        ordinal: u32,
        data_dir: &Path,
        topology_file: Option<&Path>,
    ) -> NodeProc {
        NodeProc {
            bin: bin.as_ref().to_path_buf(),
            ordinal,
            port: free_port(),
            peer_port: free_port(),
            data_dir: data_dir.to_path_buf(),
            topology_file: topology_file.map(Path::to_path_buf),
            extra: Vec::new(),
            token: TOKEN.into(),
            cluster_token: CLUSTER_TOKEN.into(),
            child: None,
        }
    }

    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn peer_address(&self) -> String {
        format!("127.0.0.1:{}", self.peer_port)
    }

    pub fn info(&self, state: NodeState) -> NodeInfo {
        NodeInfo {
            ordinal: self.ordinal,
            address: self.address(),
            peer_address: self.peer_address(),
            state,
        }
    }

    /// Starts the process and waits (bounded) for `/healthz`; panics when
    /// it does not answer.
    pub fn start(&mut self) {
        if let Err(e) = self.try_start() {
            panic!("{e}");
        }
    }

    /// [`NodeProc::start`], saying why it did not start instead of panicking
    /// (the process is killed then).
    pub fn try_start(&mut self) -> Result<(), String> {
        let mut cmd = Command::new(&self.bin);
        cmd.args([
            "--listen",
            &self.address(),
            "--peer-listen",
            &self.peer_address(),
            "--data-dir",
            self.data_dir.to_str().unwrap(),
            "--node-id",
            &self.ordinal.to_string(),
            "--token",
            &self.token,
            "--cluster-token",
            &self.cluster_token,
            "--peer-timeout-ms",
            "1000",
        ])
        .args(&self.extra)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
        if let Some(t) = &self.topology_file {
            cmd.args(["--topology-file", t.to_str().unwrap()]);
        }
        self.child = Some(cmd.spawn().expect("cannot start kv-node"));
        let deadline = Instant::now() + Duration::from_secs(20);
        // A TLS node's /healthz needs a TLS client: its port open is enough.
        let tls = self.extra.iter().any(|a| a == "--tls-cert");
        loop {
            let up = if tls {
                std::net::TcpStream::connect(self.address()).is_ok()
            } else {
                healthy(&self.address())
            };
            if up {
                return Ok(());
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                self.child = None;
                return Err(format!(
                    "kv-node {} exited during start: {status}",
                    self.ordinal
                ));
            }
            if Instant::now() >= deadline {
                self.kill9();
                return Err(format!("kv-node {} did not start", self.ordinal));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// kill -9.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, waiting (bounded) for a clean exit; returns the exit status.
    pub fn terminate(&mut self) -> Option<std::process::ExitStatus> {
        let mut c = self.child.take()?;
        let _ = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(s)) = c.try_wait() {
                return Some(s);
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                return c.wait().ok();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn running(&self) -> bool {
        self.child.is_some()
    }

    pub fn client(&self) -> Client {
        Client::new(&self.address(), &self.token)
    }
}

/// `GET /healthz` answers 2xx within 500 ms. Plain TCP, not reqwest's
/// blocking client, so that async tests (inside a tokio runtime) can start
/// nodes too.
fn healthy(address: &str) -> bool {
    use std::io::{Read, Write};
    let Ok(addr) = address.parse() else {
        return false;
    };
    let limit = Duration::from_millis(500);
    let Ok(mut s) = std::net::TcpStream::connect_timeout(&addr, limit) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(limit));
    let _ = s.set_write_timeout(Some(limit));
    if s.write_all(b"GET /healthz HTTP/1.1\r\nHost: kv\r\nConnection: close\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut head = [0u8; 12];
    s.read_exact(&mut head).is_ok() && head.starts_with(b"HTTP/1.1 2")
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A blocking HTTP client for one node's client port.
pub struct Client {
    pub base: String,
    pub token: String,
    pub http: reqwest::blocking::Client,
}

pub struct Answer {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: Vec<u8>,
}

impl Answer {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

impl Client {
    pub fn new(address: &str, token: &str) -> Client {
        Client {
            base: format!("http://{address}"),
            token: token.to_string(),
            http: reqwest::blocking::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap(),
        }
    }

    pub fn send(&self, req: reqwest::blocking::RequestBuilder) -> Result<Answer, reqwest::Error> {
        let r = req.send()?;
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        let body = r.bytes()?.to_vec();
        Ok(Answer {
            status,
            headers,
            body,
        })
    }

    pub fn req(&self, method: reqwest::Method, path: &str) -> reqwest::blocking::RequestBuilder {
        self.http
            .request(method, format!("{}{}", self.base, path))
            .bearer_auth(&self.token)
    }

    pub fn call(&self, method: reqwest::Method, path: &str) -> Answer {
        self.send(self.req(method, path)).expect("request failed")
    }

    pub fn put(
        &self,
        key: &str,
        value: &[u8],
        consistency: Option<&str>,
    ) -> Result<Answer, reqwest::Error> {
        let mut r = self
            .req(reqwest::Method::PUT, &format!("/v1/kv/{}", enc(key)))
            .body(value.to_vec());
        if let Some(c) = consistency {
            r = r.header("X-Consistency", c);
        }
        self.send(r)
    }

    pub fn get(&self, key: &str, consistency: Option<&str>) -> Result<Answer, reqwest::Error> {
        let mut r = self.req(reqwest::Method::GET, &format!("/v1/kv/{}", enc(key)));
        if let Some(c) = consistency {
            r = r.header("X-Consistency", c);
        }
        self.send(r)
    }

    pub fn cluster(&self) -> Value {
        self.call(reqwest::Method::GET, "/v1/cluster").json()
    }

    /// The value of one series of `GET /metrics`, named as exposed, labels
    /// included (`kv_peer_batch_size_sum{op="apply"}`); `None` when absent.
    pub fn metric(&self, series: &str) -> Option<f64> {
        let text = self.call(reqwest::Method::GET, "/metrics").text();
        text.lines().find_map(|l| {
            l.strip_prefix(series)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
    }
}

/// Percent-encodes every byte outside the unreserved set.
pub fn enc(key: &str) -> String {
    key.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// A topology over `nodes`, each in the given state.
pub fn topology(
    epoch: u64,
    nodes: &[(&NodeProc, NodeState)],
    strategy: Strategy,
    factor: u32,
    consistency: Consistency,
) -> Topology {
    Topology {
        cluster_id: "test".into(),
        epoch,
        read_consistency: consistency,
        write_consistency: consistency,
        placement: PlacementSpec {
            strategy,
            factor,
            members: nodes.iter().map(|(n, _)| n.ordinal).collect(),
        },
        pending: None,
        nodes: nodes.iter().map(|(n, s)| n.info(*s)).collect(),
    }
}

pub fn write_topology(path: &Path, t: &Topology) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(t).unwrap()).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Waits (bounded) until `f` holds.
pub fn eventually(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until every running node in `nodes` holds `epoch` and none of
/// their stores is still catching up (a new store pulls from its co-owners
/// before its reads and acknowledgements count, SPEC §3).
pub fn wait_epoch(nodes: &[&NodeProc], epoch: u64) {
    wait_epoch_only(nodes, epoch);
    for n in nodes.iter().filter(|n| n.running()) {
        let c = n.client();
        eventually(
            &format!("node {}'s store caught up", n.ordinal),
            Duration::from_secs(30),
            || {
                c.send(c.req(reqwest::Method::GET, "/v1/cluster"))
                    .ok()
                    .is_some_and(|a| a.json()["storeCatchingUp"] != true)
            },
        );
    }
}

/// Waits until every running node in `nodes` holds `epoch`.
pub fn wait_epoch_only(nodes: &[&NodeProc], epoch: u64) {
    for n in nodes.iter().filter(|n| n.running()) {
        let c = n.client();
        eventually(
            &format!("node {} at epoch {epoch}", n.ordinal),
            Duration::from_secs(15),
            || {
                c.send(c.req(reqwest::Method::GET, "/v1/cluster"))
                    .ok()
                    .and_then(|a| a.json()["topology"]["epoch"].as_u64())
                    == Some(epoch)
            },
        );
    }
}

/// Sends the bytes `raw` over a new TCP connection to `address` and reads the
/// answer until the server closes it (send `Connection: close`, or a request
/// the server refuses with it): the status and the body after the head. For
/// requests a well-behaved client library would not send.
pub fn raw_exchange(address: &str, raw: &[u8]) -> (u16, Vec<u8>) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(address).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    s.write_all(raw).expect("send");
    let mut out = Vec::new();
    if let Err(e) = s.read_to_end(&mut out) {
        panic!(
            "no complete answer to {:?}: {e}; read {:?}",
            String::from_utf8_lossy(raw),
            String::from_utf8_lossy(&out)
        );
    }
    let text = String::from_utf8_lossy(&out);
    let status = text
        .strip_prefix("HTTP/1.1 ")
        .and_then(|t| t.get(..3))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    let body = out
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| out[i + 4..].to_vec())
        .unwrap_or_default();
    (status, body)
}

/// A parsed HTTP/1.1 response read from a raw socket.
#[derive(Debug)]
pub struct RawAnswer {
    pub status: u16,
    /// Names in lower case, values trimmed.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// Reads one response (its head and a `Content-Length` body; no body for an
/// answer to HEAD) from `s`, consuming nothing past it, so that responses
/// pipelined on one connection can be read one after another.
pub fn read_answer(
    s: &mut std::io::BufReader<std::net::TcpStream>,
    head_request: bool,
) -> Result<RawAnswer, String> {
    use std::io::{BufRead, Read};
    s.get_ref()
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let n = s.read_until(b'\n', &mut head).map_err(|e| {
            format!(
                "read error after {} bytes: {e}: {:?}",
                head.len(),
                String::from_utf8_lossy(&head)
            )
        })?;
        if n == 0 {
            return Err(format!(
                "connection closed after {} bytes without a complete response: {:?}",
                head.len(),
                String::from_utf8_lossy(&head)
            ));
        }
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .strip_prefix("HTTP/1.1 ")
        .and_then(|r| r.get(..3))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("not an HTTP/1.1 status line: {status_line:?}"))?;
    let headers: Vec<(String, String)> = lines
        .filter(|l| !l.is_empty())
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let len: usize = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0; if head_request { 0 } else { len }];
    s.read_exact(&mut body)
        .map_err(|e| format!("connection closed in the middle of a body: {e}"))?;
    Ok(RawAnswer {
        status,
        headers,
        body,
    })
}

/// The `error` code of a JSON error body.
pub fn error_code(body: &[u8]) -> String {
    let v: Value = serde_json::from_slice(body)
        .unwrap_or_else(|e| panic!("{e}: {:?}", String::from_utf8_lossy(body)));
    v["error"].as_str().unwrap_or_default().to_string()
}
