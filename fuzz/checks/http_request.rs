//! Fuzz check for the node's HTTP request handling, end to end in-process:
//! the bytes are an HTTP/1.1 request as text (request line, header lines, a
//! blank line, the body). One real node per process (SQLite in a scratch
//! directory) serves its client and peer ports on loopback with the very
//! servers `kv-node` runs (`kv_net::serve` over `api::routes` and
//! `peer_api::routes`: hyper, warp, our router); the request goes to the peer
//! port when its path is under `/internal/`, else to the client port. Shared
//! by the cargo-fuzz target `http_request` and the stable replay in
//! node/tests/fuzz_corpus.rs.
//!
//! The body's framing is ours (`Content-Length` from the body; the input's
//! `Content-Length`, `Transfer-Encoding`, `Connection` and `Host` are
//! dropped); what is not a valid method, target or header is not sent.
//!
//! Invariants: nothing panics and every request is answered within 10 s; the
//! status is one the contract names (never 500); every error from the node
//! is `{"error": <the code of its status>, "message": ..}` as JSON (on the
//! peer port a 409 may also say `stale_epoch` or `behind`: which epoch rule
//! refused, and a 503 `catching_up`; hyper's
//! own bare refusals of what it cannot parse, with no content type, are
//! hyper's), a 405 names the allowed methods, a classic route's error also
//! carries `"status": "error"`; a `PUT /v1/kv/{key}` answered 200 reads back
//! the same value and version, as a node reads its own writes.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use kv_node::api::Route;
use kv_node::config::{Config, Tokens};
use kv_node::{Node, api, peer_api};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use warp::http::{HeaderMap, HeaderName, HeaderValue, Method, Uri, header};

pub const TOKEN: &str = "fuzz-token";
pub const CLUSTER_TOKEN: &str = "fuzz-cluster-token";
/// Small, so that the fuzzer reaches the value limit with short inputs.
pub const MAX_VALUE_BYTES: usize = 1024;
const ANSWER_WITHIN: Duration = Duration::from_secs(10);

struct Fixture {
    rt: tokio::runtime::Runtime,
    client: SocketAddr,
    peer: SocketAddr,
    _node: Arc<Node>,
    _stop: tokio::sync::watch::Sender<bool>,
    _dir: tempfile::TempDir,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let shm = PathBuf::from("/dev/shm");
        let base = if shm.is_dir() {
            shm
        } else {
            std::env::temp_dir()
        };
        let dir = tempfile::Builder::new()
            .prefix("kv-fuzz-http")
            .tempdir_in(base)
            .expect("a scratch data directory");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime");
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let (node, client, peer) = rt.block_on(async {
            let bind = || tokio::net::TcpListener::bind("127.0.0.1:0");
            let (client, peer) = (bind().await, bind().await);
            let (client, peer) = (client.expect("loopback"), peer.expect("loopback"));
            let (client_addr, peer_addr) = (
                client.local_addr().expect("bound"),
                peer.local_addr().expect("bound"),
            );
            let config = Config {
                listen: client_addr,
                peer_listen: peer_addr,
                advertise: client_addr.to_string(),
                peer_advertise: peer_addr.to_string(),
                data_dir: dir.path().to_path_buf(),
                node_id: 0,
                token: Tokens::fixed("client token", TOKEN).expect("a valid token"),
                cluster_token: Tokens::fixed("cluster token", CLUSTER_TOKEN)
                    .expect("a valid token"),
                topology_file: None,
                held_file: None,
                max_value_bytes: MAX_VALUE_BYTES,
                read_cache_bytes: 1 << 20,
                checkpoint_pages: 32_000,
                peer_timeout: Duration::from_millis(100),
                anti_entropy_every: None,
                tombstone_grace: Duration::from_secs(86_400),
                max_clock_skew: Duration::from_secs(5),
                clock_offset_ms: 0,
                tls: None,
                restore: None,
                gateway: None,
                // not read by Node::open: the runtime here is the check's own
                worker_threads: 1,
            };
            let (node, _seen) = Node::open(config).expect("a node opens in a scratch directory");
            tokio::spawn(kv_net::serve(
                "client",
                api::routes(node.clone()),
                client,
                stopped.clone(),
            ));
            tokio::spawn(kv_net::serve(
                "peer",
                peer_api::routes(node.clone()),
                peer,
                stopped,
            ));
            (node, client_addr, peer_addr)
        });
        Fixture {
            rt,
            client,
            peer,
            _node: node,
            _stop: stop,
            _dir: dir,
        }
    })
}

/// A request as the check sends it.
pub struct Request {
    pub method: Method,
    pub target: String,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub body: Vec<u8>,
}

/// The text form: `METHOD TARGET [VERSION]`, `Name: value` lines, a blank
/// line, the body. `None` when there is no valid method and target.
pub fn parse_request(data: &[u8]) -> Option<Request> {
    let split = |sep: &[u8]| {
        data.windows(sep.len())
            .position(|w| w == sep)
            .map(|i| (&data[..i], &data[i + sep.len()..]))
    };
    let (head, body) = split(b"\r\n\r\n")
        .or_else(|| split(b"\n\n"))
        .unwrap_or((data, &[]));
    let mut lines = head
        .split(|b| *b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l));
    let mut first = lines.next()?.split(|b| *b == b' ');
    let method = Method::from_bytes(first.next()?).ok()?;
    let target = std::str::from_utf8(first.next()?).ok()?;
    // Not a valid target: the request line would not parse; hyper's, not ours.
    Uri::try_from(target).ok()?;
    let mut headers = Vec::new();
    for line in lines {
        let Some(colon) = line.iter().position(|b| *b == b':') else {
            continue;
        };
        let value = line[colon + 1..].trim_ascii();
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(&line[..colon]),
            HeaderValue::from_bytes(value),
        ) else {
            continue;
        };
        if ![
            header::CONTENT_LENGTH,
            header::TRANSFER_ENCODING,
            header::CONNECTION,
            header::HOST,
        ]
        .contains(&name)
        {
            headers.push((name, value));
        }
    }
    Some(Request {
        method,
        target: target.to_string(),
        headers,
        body: body.to_vec(),
    })
}

/// A response as the check reads it.
pub struct Answer {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
}

fn wire_form(req: &Request) -> Vec<u8> {
    let mut out = format!(
        "{} {} HTTP/1.1\r\nhost: kv-fuzz\r\n",
        req.method, req.target
    )
    .into_bytes();
    for (name, value) in &req.headers {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(
        format!(
            "content-length: {}\r\nconnection: close\r\n\r\n",
            req.body.len()
        )
        .as_bytes(),
    );
    out.extend_from_slice(&req.body);
    out
}

/// Parses a whole HTTP/1.1 response (read until the server closed).
fn parse_answer(raw: &[u8]) -> Result<Answer, String> {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| format!("no complete response head in {} bytes", raw.len()))?;
    let head = std::str::from_utf8(&raw[..end]).map_err(|_| "response head is not UTF-8")?;
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.strip_prefix("HTTP/1.1 "))
        .and_then(|l| l.get(..3))
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| format!("bad status line in {head:?}"))?;
    let mut headers = HeaderMap::new();
    for line in lines {
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| format!("bad header line {line:?}"))?;
        let name = HeaderName::from_bytes(name.as_bytes()).map_err(|e| e.to_string())?;
        let value = HeaderValue::from_str(value.trim()).map_err(|e| e.to_string())?;
        headers.append(name, value);
    }
    let mut rest = &raw[end + 4..];
    let chunked = headers
        .get(header::TRANSFER_ENCODING)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"chunked"));
    let body = if chunked {
        let mut body = Vec::new();
        loop {
            let eol = rest
                .windows(2)
                .position(|w| w == b"\r\n")
                .ok_or("truncated chunk size")?;
            let size = std::str::from_utf8(&rest[..eol])
                .ok()
                .and_then(|s| usize::from_str_radix(s.split(';').next()?.trim(), 16).ok())
                .ok_or("bad chunk size")?;
            rest = &rest[eol + 2..];
            if size == 0 {
                break body;
            }
            body.extend_from_slice(rest.get(..size).ok_or("truncated chunk")?);
            rest = rest.get(size + 2..).ok_or("truncated chunk end")?;
        }
    } else {
        rest.to_vec()
    };
    Ok(Answer {
        status,
        headers,
        body,
    })
}

/// Sends `req` to the port its path belongs to; `Err` when there is no
/// complete answer in time (a panicking handler drops the connection).
pub fn try_send(req: &Request) -> Result<Answer, String> {
    let fx = fixture();
    let addr = if req.target.starts_with("/internal/") {
        fx.peer
    } else {
        fx.client
    };
    let raw = fx.rt.block_on(async {
        let exchange = async {
            let mut s = tokio::net::TcpStream::connect(addr).await?;
            s.write_all(&wire_form(req)).await?;
            let mut raw = Vec::new();
            s.read_to_end(&mut raw).await?;
            Ok::<_, std::io::Error>(raw)
        };
        match tokio::time::timeout(ANSWER_WITHIN, exchange).await {
            Ok(Ok(raw)) => Ok(raw),
            Ok(Err(e)) => Err(format!("connection failed: {e}")),
            Err(_) => Err(format!("no answer within {ANSWER_WITHIN:?}")),
        }
    })?;
    parse_answer(&raw)
}

pub fn send(req: &Request) -> Answer {
    try_send(req).unwrap_or_else(|e| panic!("{} {:?}: {e}", req.method, req.target))
}

/// The error code the contract gives each status (docs/design.md).
pub fn code_of(status: u16) -> Option<&'static str> {
    Some(match status {
        400 => "bad_request",
        403 => "forbidden",
        404 => "not_found",
        405 => "method_not_allowed",
        409 => "conflict",
        412 => "precondition_failed",
        413 => "payload_too_large",
        501 => "not_implemented",
        503 => "unavailable",
        507 => "insufficient_storage",
        _ => return None,
    })
}

fn path_of(target: &str) -> &str {
    let target = target.split_once('?').map_or(target, |(p, _)| p);
    match target.split_once("://") {
        Some((_, rest)) => rest.find('/').map_or("/", |i| &rest[i..]),
        None => target,
    }
}

/// A path of the original store's API, whose errors carry `"status": "error"`
/// whatever went wrong (a bad key and a wrong method included): the node's
/// own rule, so the check and the node cannot disagree on it.
pub use kv_net::http::is_classic_path;

/// Checks one answer to `req`; returns a description of what is wrong.
pub fn violation(req: &Request, a: &Answer) -> Option<String> {
    let what = format!(
        "{} {:?} answered {}: {}",
        req.method,
        req.target,
        a.status,
        String::from_utf8_lossy(&a.body)
    );
    if a.status == 200 {
        return None;
    }
    if a.headers.get(header::CONTENT_TYPE).is_none()
        && a.body.is_empty()
        && (a.status == 400 || a.status == 414 || a.status == 431 || a.status == 505)
    {
        return None; // hyper refused what it could not parse; the node never saw it
    }
    let Some(code) = code_of(a.status) else {
        return Some(format!("status outside the contract: {what}"));
    };
    if req.method == Method::HEAD {
        return None; // no body to check
    }
    if a.headers
        .get(header::CONTENT_TYPE)
        .map(HeaderValue::as_bytes)
        != Some(b"application/json".as_slice())
    {
        return Some(format!("error without a JSON content type: {what}"));
    }
    let Ok(serde_json::Value::Object(v)) = serde_json::from_slice(&a.body) else {
        return Some(format!("error body is not a JSON object: {what}"));
    };
    let got = v.get("error").and_then(|e| e.as_str());
    // The peer port's 409s say which epoch rule refused (the coordinator
    // acts on which): a writer on an older topology, or this node behind.
    // Its 503s say `catching_up` when this node's store may not answer
    // replica reads yet (the coordinator then asks another owner).
    let peer = path_of(&req.target).starts_with("/internal/");
    let peer_409 =
        peer && a.status == 409 && matches!(got, Some(peer_api::STALE_EPOCH | peer_api::BEHIND));
    let peer_503 = peer && a.status == 503 && got == Some("catching_up");
    if got != Some(code) && !peer_409 && !peer_503 {
        return Some(format!("error code is not {code:?}: {what}"));
    }
    if v.get("message")
        .and_then(|m| m.as_str())
        .is_none_or(str::is_empty)
    {
        return Some(format!("error without a message: {what}"));
    }
    if a.status == 405 && a.headers.get(header::ALLOW).is_none() {
        return Some(format!("405 without an Allow header: {what}"));
    }
    if is_classic_path(path_of(&req.target))
        && v.get("status").and_then(|s| s.as_str()) != Some("error")
    {
        return Some(format!(
            "classic error without \"status\": \"error\": {what}"
        ));
    }
    None
}

/// One request (and its read-back) at a time on the shared node: the stable
/// tests run in parallel threads, and a DELETE between a PUT and its
/// read-back would be a false alarm.
pub static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

pub fn check(data: &[u8]) {
    let Some(req) = parse_request(data) else {
        return;
    };
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let answer = send(&req);
    if let Some(v) = violation(&req, &answer) {
        panic!("{v}");
    }
    let path = path_of(&req.target);
    if let (200, Ok(Route::KvPut(_))) = (answer.status, Route::parse(&req.method, path)) {
        let version = answer.headers.get("x-kv-version").cloned();
        let get = Request {
            method: Method::GET,
            target: path.to_string(),
            headers: vec![(
                header::AUTHORIZATION,
                HeaderValue::from_str(&format!("Bearer {TOKEN}")).expect("header"),
            )],
            body: Vec::new(),
        };
        let read = send(&get);
        assert_eq!(
            (read.status, read.body.as_slice()),
            (200, req.body.as_slice()),
            "a value written with {} {:?} does not read back",
            req.method,
            req.target
        );
        assert_eq!(
            read.headers.get("x-kv-version"),
            version.as_ref(),
            "the version read back differs from the one the write answered"
        );
    }
}
