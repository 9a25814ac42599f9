//! The HTTP client of the node API (`docs/design.md`, "Node HTTP API").

use std::time::Duration;

use kv_core::{Consistency, Topology};
use reqwest::{Method, RequestBuilder, Response, StatusCode};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Longest key the store accepts (SPEC §2).
pub const MAX_KEY_BYTES: usize = 1024;

/// Percent-encodes every byte of `key` outside RFC 3986's unreserved set
/// (`A-Z a-z 0-9 - . _ ~`), so that any key — `/`, `%`, spaces, non-UTF-8 —
/// travels as one path segment.
pub fn encode_key(key: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut out = String::with_capacity(key.len() * 3);
    for &b in key {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push('%');
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0x0f)]));
        }
    }
    out
}

/// Checks a key's length before it is sent (1..=1024 bytes).
pub fn check_key(key: &[u8]) -> Result<(), ClientError> {
    if key.is_empty() || key.len() > MAX_KEY_BYTES {
        return Err(ClientError::Invalid(format!(
            "a key must be 1..={MAX_KEY_BYTES} bytes, this one is {} bytes",
            key.len()
        )));
    }
    // URL parsers remove dot segments even when percent-encoded (`%2E%2E`),
    // so these two keys would reach another route.
    if key == b"." || key == b".." {
        return Err(ClientError::Invalid(format!(
            "the key {:?} cannot be addressed in a URL path (it is a dot segment)",
            String::from_utf8_lossy(key)
        )));
    }
    Ok(())
}

/// Turns `host:port`, `http://host:port/` or `https://…` into a base URL
/// without a trailing slash. An address without a scheme gets `http://`.
pub fn base_url(endpoint: &str) -> Result<String, ClientError> {
    let e = endpoint.trim();
    if e.is_empty() {
        return Err(ClientError::Invalid("the endpoint is empty".into()));
    }
    let with_scheme = if e.contains("://") {
        e.to_string()
    } else {
        format!("http://{e}")
    };
    let url = with_scheme.trim_end_matches('/').to_string();
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"));
    if rest.is_none_or(str::is_empty) {
        return Err(ClientError::Invalid(format!(
            "{endpoint:?} is not an endpoint (expected http://host:port, https://host:port or host:port)"
        )));
    }
    Ok(url)
}

/// Everything that can go wrong talking to a node or gateway.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server answered with an error status; `message` is its own words.
    #[error("{message}")]
    Server {
        status: u16,
        code: String,
        message: String,
    },
    /// The request never got an answer (connection refused, timeout, ...).
    #[error("cannot reach {url}: {detail}")]
    Transport { url: String, detail: String },
    /// The server answered 2xx with a body that is not what the API says.
    #[error("unexpected answer from {url}: {detail}")]
    Decode { url: String, detail: String },
    /// Bad input caught before anything was sent.
    #[error("{0}")]
    Invalid(String),
}

impl ClientError {
    /// The HTTP status of a server error.
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Server { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// The JSON error shape `{"error": "...", "message": "..."}`.
#[derive(Debug, Deserialize)]
struct ErrorBody {
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    message: Option<String>,
}

/// Renders an error and its sources on one line.
pub use kv_net::error_chain;

/// Builds the error for a non-2xx answer from its status and body.
pub fn server_error(status: StatusCode, body: &[u8]) -> ClientError {
    let parsed: Option<ErrorBody> = serde_json::from_slice(body).ok();
    let (code, message) = match parsed {
        Some(ErrorBody {
            error,
            message: Some(m),
        }) if !m.trim().is_empty() => (error.unwrap_or_default(), m),
        Some(ErrorBody {
            error: Some(code), ..
        }) => (code.clone(), format!("{code} (HTTP {})", status.as_u16())),
        _ => {
            let text = String::from_utf8_lossy(body);
            let text: String = text.trim().chars().take(200).collect();
            let reason = status.canonical_reason().unwrap_or("error");
            let message = if text.is_empty() {
                format!("HTTP {} {reason}", status.as_u16())
            } else {
                format!("HTTP {} {reason}: {text}", status.as_u16())
            };
            (String::new(), message)
        }
    };
    ClientError::Server {
        status: status.as_u16(),
        code,
        message: message.replace(['\n', '\r'], " "),
    }
}

/// `PUT`/`DELETE` acknowledgement `{"key":..,"version":..}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriteAck {
    pub key: String,
    pub version: String,
}

/// A value read with `GET /v1/kv/{key}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValueRead {
    pub value: Vec<u8>,
    pub version: Option<String>,
}

/// A key as the API lists it: the string when the key is UTF-8, else its
/// bytes in base64.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ListedKey {
    Text(String),
    Bytes { base64: String },
}

impl std::fmt::Display for ListedKey {
    /// The text of a UTF-8 key; `base64:<bytes>` for any other.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ListedKey::Text(t) => f.write_str(t),
            ListedKey::Bytes { base64 } => write!(f, "base64:{base64}"),
        }
    }
}

/// One page of `GET /v1/kv`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListPage {
    pub keys: Vec<ListedKey>,
    #[serde(default)]
    pub next: Option<ListedKey>,
}

/// `GET /v1/cluster` of the endpoint, as far as every endpoint answers it:
/// a node (its [`kv_core::NodeReport`]) or the `kvctl up` gateway.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterInfo {
    /// Absent when the endpoint is a `kvctl up` gateway, not a node.
    #[serde(default)]
    pub node_id: Option<u32>,
    pub topology: Topology,
}

/// An owner in `GET /v1/placement/{key}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    pub ordinal: u32,
    #[serde(default)]
    pub address: String,
    #[serde(default)]
    pub state: Option<kv_core::NodeState>,
}

/// `GET /v1/placement/{key}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PlacementInfo {
    pub key: String,
    pub bucket: u32,
    pub owners: Vec<Owner>,
    #[serde(default)]
    pub pending_owners: Option<Vec<Owner>>,
}

/// A client of one endpoint (a node or the `kvctl up` gateway).
#[derive(Clone, Debug)]
pub struct Client {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
    consistency: Option<Consistency>,
}

/// The header value of a consistency level.
pub fn consistency_header(c: Consistency) -> &'static str {
    match c {
        Consistency::One => "one",
        Consistency::Quorum => "quorum",
        Consistency::All => "all",
    }
}

/// How an https endpoint is trusted: `--cacert` (its CA, instead of the
/// system's) or `--insecure` (not at all, only when asked).
#[derive(Clone, Debug, Default)]
pub struct TlsOptions {
    pub cacert: Option<std::path::PathBuf>,
    pub insecure: bool,
}

impl TlsOptions {
    /// `builder` set up to trust as asked.
    pub fn apply(
        &self,
        builder: reqwest::ClientBuilder,
    ) -> Result<reqwest::ClientBuilder, ClientError> {
        if self.insecure {
            return Ok(builder.tls_danger_accept_invalid_certs(true));
        }
        let Some(path) = &self.cacert else {
            return Ok(builder);
        };
        // kv-net's client configuration: the CA file is read again when it
        // changes, so a long-lived client (`kvctl bench`) follows a rotation.
        let config = kv_net::tls::client_config(path, None).map_err(|e| {
            ClientError::Invalid(match e {
                kv_net::tls::TlsError::NoPem { .. } => {
                    format!("--cacert {} holds no PEM certificate", path.display())
                }
                e => format!("--cacert: {e}"),
            })
        })?;
        Ok(builder.tls_backend_preconfigured(config))
    }
}

impl Client {
    /// A client of `endpoint` (see [`base_url`]) with a request timeout.
    pub fn new(
        endpoint: &str,
        token: Option<String>,
        consistency: Option<Consistency>,
        timeout: Duration,
    ) -> Result<Client, ClientError> {
        Client::with_tls(
            endpoint,
            token,
            consistency,
            timeout,
            &TlsOptions::default(),
        )
    }

    /// [`Client::new`], trusting an https endpoint as `tls` says.
    pub fn with_tls(
        endpoint: &str,
        token: Option<String>,
        consistency: Option<Consistency>,
        timeout: Duration,
        tls: &TlsOptions,
    ) -> Result<Client, ClientError> {
        let http = tls
            .apply(reqwest::Client::builder())?
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            .build()
            .map_err(|e| ClientError::Invalid(format!("cannot build an HTTP client: {e}")))?;
        Ok(Client {
            http,
            base: base_url(endpoint)?,
            token,
            consistency,
        })
    }

    /// The same client (connection pool, token, level) aimed at another node.
    pub fn at(&self, endpoint: &str) -> Result<Client, ClientError> {
        Ok(Client {
            base: base_url(endpoint)?,
            ..self.clone()
        })
    }

    /// The base URL this client talks to.
    pub fn base(&self) -> &str {
        &self.base
    }

    fn request(&self, method: Method, path: &str, with_consistency: bool) -> RequestBuilder {
        let mut rb = self.http.request(method, format!("{}{path}", self.base));
        if let Some(t) = &self.token {
            rb = rb.bearer_auth(t);
        }
        if with_consistency && let Some(c) = self.consistency {
            rb = rb.header("X-Consistency", consistency_header(c));
        }
        rb
    }

    async fn send(&self, rb: RequestBuilder, path: &str) -> Result<Response, ClientError> {
        let url = format!("{}{path}", self.base);
        let resp = rb.send().await.map_err(|e| ClientError::Transport {
            url: url.clone(),
            detail: transport_detail(&e),
        })?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status();
        let body = resp.bytes().await.map(|b| b.to_vec()).unwrap_or_default();
        Err(server_error(status, &body))
    }

    async fn json<T: DeserializeOwned>(
        &self,
        rb: RequestBuilder,
        path: &str,
    ) -> Result<(T, Value), ClientError> {
        let resp = self.send(rb, path).await?;
        let url = format!("{}{path}", self.base);
        let body = resp.bytes().await.map_err(|e| ClientError::Transport {
            url: url.clone(),
            detail: transport_detail(&e),
        })?;
        let raw: Value = serde_json::from_slice(&body).map_err(|e| ClientError::Decode {
            url: url.clone(),
            detail: format!("not JSON ({e})"),
        })?;
        let typed = serde_json::from_value(raw.clone()).map_err(|e| ClientError::Decode {
            url,
            detail: e.to_string(),
        })?;
        Ok((typed, raw))
    }

    /// `PUT /v1/kv/{key}`; `create_only` sends `If-None-Match: *`.
    pub async fn put(
        &self,
        key: &[u8],
        value: Vec<u8>,
        create_only: bool,
    ) -> Result<(WriteAck, Value), ClientError> {
        check_key(key)?;
        let path = format!("/v1/kv/{}", encode_key(key));
        let mut rb = self.request(Method::PUT, &path, true).body(value);
        if create_only {
            rb = rb.header("If-None-Match", "*");
        }
        self.json(rb, &path).await
    }

    /// `GET /v1/kv/{key}`.
    pub async fn get(&self, key: &[u8]) -> Result<ValueRead, ClientError> {
        check_key(key)?;
        let path = format!("/v1/kv/{}", encode_key(key));
        let resp = self
            .send(self.request(Method::GET, &path, true), &path)
            .await?;
        let version = resp
            .headers()
            .get("X-Kv-Version")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let value = resp
            .bytes()
            .await
            .map_err(|e| ClientError::Transport {
                url: format!("{}{path}", self.base),
                detail: transport_detail(&e),
            })?
            .to_vec();
        Ok(ValueRead { value, version })
    }

    /// `DELETE /v1/kv/{key}`.
    pub async fn delete(&self, key: &[u8]) -> Result<(WriteAck, Value), ClientError> {
        check_key(key)?;
        let path = format!("/v1/kv/{}", encode_key(key));
        self.json(self.request(Method::DELETE, &path, true), &path)
            .await
    }

    /// One page of `GET /v1/kv?prefix=&after=&limit=`.
    pub async fn list_page(
        &self,
        prefix: Option<&str>,
        after: Option<&ListedKey>,
        limit: usize,
    ) -> Result<ListPage, ClientError> {
        let path = "/v1/kv";
        let mut query: Vec<(&str, String)> = vec![("limit", limit.to_string())];
        if let Some(p) = prefix {
            query.push(("prefix", p.to_string()));
        }
        match after {
            Some(ListedKey::Text(a)) => query.push(("after", a.clone())),
            Some(ListedKey::Bytes { base64 }) => query.push(("after_base64", base64.clone())),
            None => {}
        }
        let rb = self.request(Method::GET, path, true).query(&query);
        Ok(self.json(rb, path).await?.0)
    }

    /// `GET /v1/cluster`.
    pub async fn cluster(&self) -> Result<(ClusterInfo, Value), ClientError> {
        let path = "/v1/cluster";
        self.json(self.request(Method::GET, path, false), path)
            .await
    }

    /// `GET /v1/placement/{key}`.
    pub async fn placement(&self, key: &[u8]) -> Result<(PlacementInfo, Value), ClientError> {
        check_key(key)?;
        let path = format!("/v1/placement/{}", encode_key(key));
        self.json(self.request(Method::GET, &path, false), &path)
            .await
    }

    /// `GET /v1/digests`.
    pub async fn digests(&self) -> Result<crate::verify::DigestsResponse, ClientError> {
        let path = "/v1/digests";
        Ok(self
            .json(self.request(Method::GET, path, false), path)
            .await?
            .0)
    }

    /// A classic control route (`POST /fail/<id>`, ...), with an optional
    /// JSON body and a request timeout of its own (a control call waits for
    /// its effect). A 202 (still in progress) is an answer like a 200.
    pub async fn classic_post(
        &self,
        path: &str,
        body: Option<&Value>,
        timeout: Option<Duration>,
    ) -> Result<Value, ClientError> {
        let mut rb = self.request(Method::POST, path, false);
        if let Some(t) = timeout {
            rb = rb.timeout(t);
        }
        if let Some(b) = body {
            rb = rb.json(b);
        }
        Ok(self.json::<Value>(rb, path).await?.1)
    }
}

fn transport_detail(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        return "timed out".into();
    }
    let chain = error_chain(e);
    // reqwest repeats the URL in its own message; keep the cause.
    match chain.split_once(": ") {
        Some((head, rest)) if head.starts_with("error sending request") => rest.to_string(),
        _ => chain,
    }
}

/// `kvctl backup|restore` read the topology from the client API.
impl kv_backup::TopologySource for Client {
    async fn topology(&self) -> Result<kv_core::Topology, String> {
        self.cluster()
            .await
            .map(|(c, _)| c.topology)
            .map_err(|e| e.to_string())
    }
}
