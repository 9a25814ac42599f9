//! HTTP helpers of the client-facing servers: a node's routes and the
//! gateway's answer, authenticate and read bodies the same way.

use crate::token::Credential;
use bytes::{Buf, Bytes};
use futures::{Stream, StreamExt};
use serde_json::{Value, json};
use warp::Filter;
use warp::http::{HeaderMap, HeaderValue, Method, StatusCode, header};

pub type Response = warp::reply::Response;

/// A JSON answer with `status`.
pub fn json_response(status: u16, body: &Value) -> Response {
    let mut resp = Response::new(body.to_string().into());
    *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// The error shape, `{"error": code, "message": ...}`, with
/// `"status": "error"` added on a classic path (the original store's
/// clients look for it).
pub fn error_body(code: &str, message: &str, classic: bool) -> Value {
    let mut body = json!({"error": code, "message": message});
    if classic {
        body["status"] = json!("error");
    }
    body
}

/// The header naming the `kvctl up` node that passed a control call from
/// the shared gateway port on to the control plane (kv-node's
/// `gateway_port`, read by kv-local's gateway).
pub const RELAY_HEADER: &str = "x-kv-relay";

/// The one rule for what a classic path is: a path of the original store's
/// API (`/write`, `/read/<key>`, `/delete/<key>`, `/nodes`,
/// `/nodes_for_key/<key>`, `/fail/<id>`, `/recover/<id>`,
/// `/set_replication_strategy`), even when the request does not parse (a bad
/// key, a wrong method): its answers carry `"status"`. Every other path,
/// `/v1/...`, `/healthz` and unknown ones included, is not.
pub fn is_classic_path(path: &str) -> bool {
    matches!(path, "/write" | "/nodes" | "/set_replication_strategy")
        || [
            "/read/",
            "/delete/",
            "/nodes_for_key/",
            "/fail/",
            "/recover/",
        ]
        .iter()
        .any(|p| path.starts_with(p))
}

/// `Authorization: Bearer <token>`, compared in constant time with a token
/// or with every token of a rotating set ([`crate::token::Tokens`]).
pub fn authorized<C: Credential + ?Sized>(headers: &HeaderMap, token: &C) -> bool {
    let Some(given) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
    else {
        return false;
    };
    token.accepts(given)
}

/// Strict percent-decoding: `None` unless every `%` starts two hex digits.
pub fn percent_decode(s: &str) -> Option<Vec<u8>> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = |c: u8| (c as char).to_digit(16);
            let h = b.get(i + 1).copied().and_then(hex)?;
            let l = b.get(i + 2).copied().and_then(hex)?;
            out.push((h * 16 + l) as u8);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Some(out)
}

/// Why a body was not read: 400 (unreadable, or a Content-Length that is not
/// a number) or 413 (over the limit).
#[derive(Debug, Clone, PartialEq)]
pub struct BodyError {
    pub status: u16,
    pub code: &'static str,
    pub message: String,
}

/// Reads at most `limit` bytes of body; more is a 413 before or while reading.
pub async fn read_body<S, B>(
    headers: &HeaderMap,
    mut body: S,
    limit: usize,
) -> Result<Bytes, BodyError>
where
    S: Stream<Item = Result<B, warp::Error>> + Unpin,
    B: Buf,
{
    let bad = |message: String| BodyError {
        status: 400,
        code: "bad_request",
        message,
    };
    let too_large = || BodyError {
        status: 413,
        code: "payload_too_large",
        message: format!("the request body is larger than the {limit}-byte limit"),
    };
    if let Some(len) = headers.get(header::CONTENT_LENGTH) {
        let len: usize = len
            .to_str()
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad("Content-Length is not a number".into()))?;
        if len > limit {
            return Err(too_large());
        }
    }
    let mut out = Vec::new();
    while let Some(chunk) = body.next().await {
        let mut chunk = chunk.map_err(|e| bad(format!("cannot read the body: {e}")))?;
        if out.len() + chunk.remaining() > limit {
            return Err(too_large());
        }
        while chunk.has_remaining() {
            let part = chunk.chunk();
            out.extend_from_slice(part);
            let n = part.len();
            chunk.advance(n);
        }
    }
    Ok(Bytes::from(out))
}

/// A request after warp: everything a router needs, body not yet read.
pub struct Incoming {
    pub method: Method,
    pub path: String,
    pub query: String,
    pub headers: HeaderMap,
}

/// A warp filter that hands every request to `handler` with its body read
/// up to `limit(&request)` bytes (or the 413/400 error that reading it gave).
/// A node's two ports and the gateway use it, so each failure is answered by
/// their own router with the contract's JSON error shape; a path warp cannot
/// route at all is a 404 `no such route`.
pub fn request_filter<L, H, Fut>(
    limit: L,
    handler: H,
) -> impl Filter<Extract = (Response,), Error = std::convert::Infallible> + Clone
where
    L: Fn(&Incoming) -> usize + Clone + Send + Sync + 'static,
    H: Fn(Incoming, Result<Bytes, BodyError>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Response> + Send,
{
    warp::method()
        .and(warp::path::full())
        .and(warp::query::raw().or(warp::any().map(String::new)).unify())
        .and(warp::header::headers_cloned())
        .and(warp::body::stream())
        .then(
            move |method, path: warp::path::FullPath, query, headers, body| {
                let (limit, handler) = (limit.clone(), handler.clone());
                let req = Incoming {
                    method,
                    path: path.as_str().to_string(),
                    query,
                    headers,
                };
                async move {
                    let body = read_body(&req.headers, body, limit(&req)).await;
                    // A body refused (too large, unreadable) is left unread on
                    // the connection, which therefore cannot carry another
                    // request: say so, or a client would reuse it and lose
                    // its next request to the close.
                    let refused = body.is_err();
                    let mut resp = handler(req, body).await;
                    if refused {
                        resp.headers_mut()
                            .insert(header::CONNECTION, HeaderValue::from_static("close"));
                    }
                    resp
                }
            },
        )
        .recover(|_| async {
            Ok::<_, std::convert::Infallible>(json_response(
                404,
                &error_body("not_found", "no such route", false),
            ))
        })
        .unify()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classic_paths_are_the_original_stores_and_nothing_else() {
        for classic in [
            "/write",
            "/nodes",
            "/set_replication_strategy",
            "/read/k",
            "/read/",
            "/delete/%zz",
            "/nodes_for_key/k",
            "/fail/1",
            "/fail/",
            "/recover/x",
        ] {
            assert!(is_classic_path(classic), "{classic} is classic");
        }
        for other in [
            "/v1/kv/k",
            "/v1/nodes",
            "/v1/nodes/1/fail",
            "/v1/replication",
            "/healthz",
            "/readyz",
            "/metrics",
            "/",
            "/unknown",
            "/writes",
            "/nodes/",
            "/v1",
        ] {
            assert!(!is_classic_path(other), "{other} is not classic");
        }
    }

    #[test]
    fn percent_decoding_is_strict() {
        assert_eq!(percent_decode("a%2Fb%00"), Some(b"a/b\0".to_vec()));
        assert_eq!(percent_decode("plain"), Some(b"plain".to_vec()));
        for bad in ["%", "%4", "%zz", "a%g1"] {
            assert_eq!(percent_decode(bad), None, "{bad}");
        }
    }

    #[test]
    fn the_bearer_token_must_match_exactly() {
        let mut h = HeaderMap::new();
        assert!(!authorized(&h, "t"));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer t"));
        assert!(authorized(&h, "t"));
        assert!(!authorized(&h, "tt"));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("bearer t"));
        assert!(!authorized(&h, "t"));
    }

    #[tokio::test]
    async fn bodies_over_the_limit_are_refused_before_and_while_reading() {
        let chunks = |n: usize| {
            futures::stream::iter(
                (0..n).map(|_| Ok::<_, warp::Error>(Bytes::from_static(b"0123456789"))),
            )
        };
        let h = HeaderMap::new();
        assert_eq!(read_body(&h, chunks(2), 20).await.unwrap().len(), 20);
        assert_eq!(read_body(&h, chunks(3), 20).await.unwrap_err().status, 413);
        let mut big = HeaderMap::new();
        big.insert(header::CONTENT_LENGTH, HeaderValue::from_static("21"));
        assert_eq!(
            read_body(&big, chunks(0), 20).await.unwrap_err().status,
            413
        );
        big.insert(header::CONTENT_LENGTH, HeaderValue::from_static("x"));
        assert_eq!(
            read_body(&big, chunks(0), 20).await.unwrap_err().status,
            400
        );
    }
}
