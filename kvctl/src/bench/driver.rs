//! The drivers: one connection (or pooled client) per worker.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};

use kv_core::Consistency;

use super::stats::Outcome;
use crate::client::{consistency_header, encode_key, error_chain};

/// Which system `kvctl bench` drives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DriverKind {
    Kvstore,
    Etcd,
    Redis,
}

impl DriverKind {
    pub fn name(self) -> &'static str {
        match self {
            DriverKind::Kvstore => "kvstore",
            DriverKind::Etcd => "etcd",
            DriverKind::Redis => "redis",
        }
    }

    /// Where the driver connects when no `--endpoints` are given.
    pub fn default_endpoint(self) -> &'static str {
        match self {
            DriverKind::Kvstore => "http://127.0.0.1:5000",
            DriverKind::Etcd => "http://127.0.0.1:2379",
            DriverKind::Redis => "redis://127.0.0.1:6379",
        }
    }
}

/// A failed operation or connection, with a short kind for the report.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{kind}: {detail}")]
pub struct OpError {
    /// `timeout`, `connect`, `http_503`, `redis_io`, `etcd_unavailable`, ...
    pub kind: String,
    pub detail: String,
}

impl OpError {
    pub fn new(kind: impl Into<String>, detail: impl Into<String>) -> OpError {
        OpError {
            kind: kind.into(),
            detail: detail.into(),
        }
    }
}

/// Settings every connection shares.
#[derive(Clone, Debug)]
pub struct DriverConfig {
    pub kind: DriverKind,
    pub endpoints: Vec<String>,
    pub token: Option<String>,
    pub consistency: Option<Consistency>,
    pub etcd_serializable: bool,
    pub timeout: Duration,
    pub connections: usize,
    /// How an https endpoint is trusted (kvctl's `--cacert` / `--insecure`).
    pub tls: crate::client::TlsOptions,
}

/// Something that can make a worker's connection.
#[derive(Clone)]
pub struct Connector {
    cfg: DriverConfig,
    http: Option<reqwest::Client>,
}

impl Connector {
    pub fn new(cfg: DriverConfig) -> Result<Connector, OpError> {
        if cfg.endpoints.is_empty() {
            return Err(OpError::new("config", "no endpoints"));
        }
        let http = match cfg.kind {
            DriverKind::Kvstore => {
                let builder = reqwest::Client::builder()
                    .pool_max_idle_per_host(cfg.connections.max(1))
                    .pool_idle_timeout(Duration::from_secs(90))
                    .tcp_nodelay(true)
                    .timeout(cfg.timeout)
                    .connect_timeout(cfg.timeout.min(Duration::from_secs(5)));
                let builder = cfg
                    .tls
                    .apply(builder)
                    .map_err(|e| OpError::new("config", e.to_string()))?;
                Some(
                    builder
                        .build()
                        .map_err(|e| OpError::new("config", error_chain(&e)))?,
                )
            }
            _ => None,
        };
        Ok(Connector { cfg, http })
    }

    pub fn config(&self) -> &DriverConfig {
        &self.cfg
    }

    /// Connection of worker `worker` (workers are spread over the endpoints).
    pub async fn connect(&self, worker: usize) -> Result<Conn, OpError> {
        let n = self.cfg.endpoints.len();
        let ep = &self.cfg.endpoints[worker % n];
        match self.cfg.kind {
            DriverKind::Kvstore => {
                let http = self
                    .http
                    .clone()
                    .ok_or_else(|| OpError::new("config", "no HTTP client"))?;
                let auth = match &self.cfg.token {
                    Some(t) => Some(
                        http::HeaderValue::from_str(&format!("Bearer {t}"))
                            .map_err(|e| OpError::new("config", format!("the token: {e}")))?,
                    ),
                    None => None,
                };
                Ok(Conn::Kvstore(KvstoreConn {
                    http,
                    endpoints: self
                        .cfg
                        .endpoints
                        .iter()
                        .map(|b| Endpoint::new(b))
                        .collect(),
                    next: worker % n,
                    auth,
                    consistency: self.cfg.consistency.map(consistency_header),
                    connect_timeout: self.cfg.timeout.min(Duration::from_secs(5)),
                }))
            }
            DriverKind::Redis => {
                let client = redis::Client::open(ep.as_str())
                    .map_err(|e| OpError::new("config", format!("{ep}: {e}")))?;
                let cfg = redis::AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(self.cfg.timeout))
                    .set_response_timeout(Some(self.cfg.timeout));
                let conn = client
                    .get_multiplexed_async_connection_with_config(&cfg)
                    .await
                    .map_err(|e| OpError::new("connect", format!("redis at {ep}: {e}")))?;
                Ok(Conn::Redis(conn))
            }
            #[cfg(feature = "etcd")]
            DriverKind::Etcd => {
                let opts = etcd_client::ConnectOptions::new()
                    .with_timeout(self.cfg.timeout)
                    .with_connect_timeout(self.cfg.timeout.min(Duration::from_secs(5)));
                let client = etcd_client::Client::connect([ep.as_str()], Some(opts))
                    .await
                    .map_err(|e| OpError::new("connect", format!("etcd at {ep}: {e}")))?;
                let client = Conn::Etcd(Box::new(EtcdConn {
                    client,
                    serializable: self.cfg.etcd_serializable,
                }));
                Ok(client)
            }
            #[cfg(not(feature = "etcd"))]
            DriverKind::Etcd => Err(OpError::new(
                "config",
                "this kvctl was built without the etcd driver (cargo feature `etcd`: cargo build --release -p kvctl --features etcd, which needs protoc)",
            )),
        }
    }
}

/// A kvstore connection: a worker's requests go to the endpoints in turn.
/// A plain-http endpoint gets one HTTP/1.1 connection of the worker's own,
/// opened on first use and again after an error; an https one goes through
/// the shared reqwest client (its TLS settings).
pub struct KvstoreConn {
    http: reqwest::Client,
    endpoints: Vec<Endpoint>,
    next: usize,
    auth: Option<http::HeaderValue>,
    consistency: Option<&'static str>,
    connect_timeout: Duration,
}

struct Endpoint {
    /// `scheme://host:port` as given.
    base: String,
    /// `host:port` of a plain-http endpoint; `None` for https.
    authority: Option<String>,
    link: Option<Link>,
}

/// One open HTTP/1.1 connection.
struct Link {
    send: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    /// A request is out and its answer not read to the end: set while an
    /// operation runs, so one abandoned at its timeout leaves it set and the
    /// connection, which may still deliver that answer, is not used again.
    busy: bool,
}

/// What a node answered.
struct Answer {
    status: http::StatusCode,
    body: Bytes,
}

impl Endpoint {
    fn new(base: &str) -> Endpoint {
        // a plain-http endpoint with no path: `host:port`, HTTP's port when
        // none is given, as reqwest would use
        let authority = base
            .parse::<http::Uri>()
            .ok()
            .filter(|u| u.scheme() == Some(&http::uri::Scheme::HTTP) && u.path() == "/")
            .and_then(|u| {
                let host = u.host()?;
                Some(format!("{host}:{}", u.port_u16().unwrap_or(80)))
            });
        Endpoint {
            base: base.trim_end_matches('/').to_string(),
            authority,
            link: None,
        }
    }
}

async fn open_link(authority: &str, timeout: Duration) -> Result<Link, OpError> {
    let stream =
        match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(authority)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(OpError::new("connect", format!("{authority}: {e}"))),
            Err(_) => {
                return Err(OpError::new(
                    "connect",
                    format!("{authority}: no connection within {timeout:?}"),
                ));
            }
        };
    stream
        .set_nodelay(true)
        .map_err(|e| OpError::new("connect", format!("{authority}: {e}")))?;
    let (send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
        .await
        .map_err(|e| OpError::new("connect", format!("{authority}: {e}")))?;
    // drives the connection; ends when `send` is dropped or the peer closes it
    tokio::spawn(conn);
    Ok(Link { send, busy: false })
}

impl KvstoreConn {
    /// Sends one request for `key` to the next endpoint and reads the whole answer.
    async fn call(
        &mut self,
        method: http::Method,
        key: &[u8],
        body: Bytes,
    ) -> Result<Answer, OpError> {
        let i = self.next % self.endpoints.len();
        self.next = self.next.wrapping_add(1);
        let path = format!("/v1/kv/{}", encode_key(key));
        let ep = &mut self.endpoints[i];
        let Some(authority) = ep.authority.as_deref() else {
            let mut rb = self
                .http
                .request(method, format!("{}{path}", ep.base))
                .body(body);
            if let Some(a) = &self.auth {
                rb = rb.header(http::header::AUTHORIZATION, a.clone());
            }
            if let Some(c) = self.consistency {
                rb = rb.header("X-Consistency", c);
            }
            let resp = rb.send().await.map_err(|e| http_error(&e))?;
            let status = resp.status();
            let body = resp.bytes().await.map_err(|e| http_error(&e))?;
            return Ok(Answer { status, body });
        };
        if ep
            .link
            .as_ref()
            .is_some_and(|l| l.busy || l.send.is_closed())
        {
            ep.link = None;
        }
        let link = match &mut ep.link {
            Some(l) => l,
            None => ep
                .link
                .insert(open_link(authority, self.connect_timeout).await?),
        };
        let mut rb = http::Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, authority);
        if let Some(a) = &self.auth {
            rb = rb.header(http::header::AUTHORIZATION, a.clone());
        }
        if let Some(c) = self.consistency {
            rb = rb.header("x-consistency", c);
        }
        let req = rb
            .body(Full::new(body))
            .map_err(|e| OpError::new("config", e.to_string()))?;
        link.busy = true;
        let answer = async {
            link.send
                .ready()
                .await
                .map_err(|e| OpError::new("http_transport", error_chain(&e)))?;
            let resp = link
                .send
                .send_request(req)
                .await
                .map_err(|e| OpError::new("http_transport", error_chain(&e)))?;
            let status = resp.status();
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| OpError::new("http_body", error_chain(&e)))?
                .to_bytes();
            Ok::<_, OpError>(Answer { status, body })
        }
        .await;
        match answer {
            Ok(a) => {
                link.busy = false;
                Ok(a)
            }
            Err(e) => {
                ep.link = None;
                Err(e)
            }
        }
    }
}

#[cfg(feature = "etcd")]
pub struct EtcdConn {
    client: etcd_client::Client,
    serializable: bool,
}

/// One worker's connection.
pub enum Conn {
    Kvstore(KvstoreConn),
    Redis(redis::aio::MultiplexedConnection),
    #[cfg(feature = "etcd")]
    Etcd(Box<EtcdConn>),
}

fn http_error(e: &reqwest::Error) -> OpError {
    let kind = if e.is_timeout() {
        "timeout"
    } else if e.is_connect() {
        "connect"
    } else if e.is_body() || e.is_decode() {
        "http_body"
    } else {
        "http_transport"
    };
    OpError::new(kind, error_chain(e))
}

fn http_status_error(answer: &Answer) -> OpError {
    let status = answer.status;
    let body = &answer.body;
    let code = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string));
    let kind = match code {
        Some(c) => format!("http_{}_{c}", status.as_u16()),
        None => format!("http_{}", status.as_u16()),
    };
    OpError::new(
        kind,
        String::from_utf8_lossy(body)
            .chars()
            .take(200)
            .collect::<String>(),
    )
}

fn redis_error(e: &redis::RedisError) -> OpError {
    let kind = if e.is_timeout() {
        "timeout".to_string()
    } else if e.is_connection_refusal() || e.is_connection_dropped() {
        "connect".to_string()
    } else if e.is_io_error() {
        "redis_io".to_string()
    } else {
        format!("redis_{:?}", e.kind()).to_lowercase()
    };
    OpError::new(kind, e.to_string())
}

#[cfg(feature = "etcd")]
fn etcd_error(e: &etcd_client::Error) -> OpError {
    let kind = match e {
        // tonic's Code is not re-exported; its Debug names are stable.
        etcd_client::Error::GRpcStatus(s) => match format!("{:?}", s.code()).as_str() {
            "DeadlineExceeded" => "timeout".to_string(),
            c => format!("etcd_{c}").to_lowercase(),
        },
        etcd_client::Error::TransportError(_) => "connect".to_string(),
        etcd_client::Error::IoError(_) => "etcd_io".to_string(),
        _ => "etcd_other".to_string(),
    };
    OpError::new(kind, e.to_string())
}

impl Conn {
    /// Writes `value` under `key`.
    pub async fn put(&mut self, key: &[u8], value: &[u8]) -> Result<Outcome, OpError> {
        match self {
            Conn::Kvstore(c) => {
                let answer = c
                    .call(http::Method::PUT, key, Bytes::copy_from_slice(value))
                    .await?;
                if !answer.status.is_success() {
                    return Err(http_status_error(&answer));
                }
                Ok(Outcome::Ok)
            }
            Conn::Redis(c) => {
                redis::cmd("SET")
                    .arg(key)
                    .arg(value)
                    .query_async::<()>(c)
                    .await
                    .map_err(|e| redis_error(&e))?;
                Ok(Outcome::Ok)
            }
            #[cfg(feature = "etcd")]
            Conn::Etcd(c) => {
                c.client
                    .put(key, value, None)
                    .await
                    .map_err(|e| etcd_error(&e))?;
                Ok(Outcome::Ok)
            }
        }
    }

    /// Reads `key`: [`Outcome::Ok`] when found, [`Outcome::Miss`] when absent.
    pub async fn get(&mut self, key: &[u8]) -> Result<Outcome, OpError> {
        match self {
            Conn::Kvstore(c) => {
                let answer = c.call(http::Method::GET, key, Bytes::new()).await?;
                match answer.status {
                    s if s.is_success() => Ok(Outcome::Ok),
                    http::StatusCode::NOT_FOUND => Ok(Outcome::Miss),
                    _ => Err(http_status_error(&answer)),
                }
            }
            Conn::Redis(c) => {
                let v: Option<Vec<u8>> = redis::cmd("GET")
                    .arg(key)
                    .query_async(c)
                    .await
                    .map_err(|e| redis_error(&e))?;
                Ok(if v.is_some() {
                    Outcome::Ok
                } else {
                    Outcome::Miss
                })
            }
            #[cfg(feature = "etcd")]
            Conn::Etcd(c) => {
                let opts = if c.serializable {
                    Some(etcd_client::GetOptions::new().with_serializable())
                } else {
                    None
                };
                let resp = c.client.get(key, opts).await.map_err(|e| etcd_error(&e))?;
                Ok(if resp.kvs().is_empty() {
                    Outcome::Miss
                } else {
                    Outcome::Ok
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Endpoint;

    #[test]
    fn plain_http_endpoints_get_a_connection_of_their_own_and_others_go_through_reqwest() {
        let cases = [
            ("http://127.0.0.1:5000", Some("127.0.0.1:5000")),
            ("http://127.0.0.1:5000/", Some("127.0.0.1:5000")),
            ("http://kv.example", Some("kv.example:80")),
            ("http://[::1]:5000", Some("[::1]:5000")),
            ("http://[::1]", Some("[::1]:80")),
            ("https://127.0.0.1:5000", None),
            ("http://127.0.0.1:5000/prefix", None),
        ];
        for (base, authority) in cases {
            assert_eq!(
                Endpoint::new(base).authority.as_deref(),
                authority,
                "{base}"
            );
        }
    }
}
