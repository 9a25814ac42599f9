//! The v1 key routes: `GET`, `PUT`, `DELETE /v1/kv/{key}` and the listing
//! `GET /v1/kv?prefix=&after=&limit=`.

use std::sync::Arc;

use bytes::Bytes;
use kv_core::record::validate_value;
use kv_core::{Consistency, Record};
use serde_json::{Value, json};
use warp::http::{HeaderValue, header};

use super::{Incoming, MAX_LIST_LIMIT, Response, json_response, parse_query};
use crate::coordinator::WriteKind;
use crate::node::{ApiError, Node};

/// A key as JSON: the string itself when it is UTF-8, else
/// `{"base64": "..."}` (standard alphabet, padded), so every listed name
/// addresses exactly one key (a percent-encoded form would collide with a
/// UTF-8 key spelled with `%`).
pub fn key_json(key: &[u8]) -> Value {
    use base64::Engine;
    match std::str::from_utf8(key) {
        Ok(s) => Value::String(s.to_string()),
        Err(_) => json!({"base64": base64::engine::general_purpose::STANDARD.encode(key)}),
    }
}

/// A key in a human sentence (error messages): UTF-8 as is, else percent-encoded.
pub(super) fn key_text(key: &[u8]) -> String {
    match std::str::from_utf8(key) {
        Ok(s) => s.to_string(),
        Err(_) => {
            percent_encoding::percent_encode(key, percent_encoding::NON_ALPHANUMERIC).to_string()
        }
    }
}

pub(super) async fn get(
    node: &Arc<Node>,
    key: &[u8],
    level: Option<Consistency>,
) -> Result<Response, ApiError> {
    match node.coordinator().read(key, level).await? {
        Some(Record {
            value: Some(v),
            version,
            ..
        }) => {
            let mut resp = Response::new(v.into());
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            );
            if let Ok(h) = HeaderValue::from_str(&version.to_string()) {
                resp.headers_mut().insert("x-kv-version", h);
            }
            Ok(resp)
        }
        _ => Err(ApiError::new(
            404,
            "not_found",
            format!("key {:?} not found", key_text(key)),
        )),
    }
}

pub(super) async fn put(
    node: &Arc<Node>,
    key: &[u8],
    req: &Incoming,
    body: Bytes,
    level: Option<Consistency>,
) -> Result<Response, ApiError> {
    validate_value(&body, node.config.max_value_bytes)
        .map_err(|e| ApiError::new(413, "payload_too_large", e.to_string()))?;
    let kind = match req.headers.get(header::IF_NONE_MATCH) {
        None => WriteKind::Put(body.to_vec()),
        Some(v) if v.as_bytes() == b"*" => WriteKind::Create(body.to_vec()),
        Some(_) => {
            return Err(ApiError::bad_request("If-None-Match supports only *"));
        }
    };
    let r = node.coordinator().write(key.to_vec(), kind, level).await?;
    let mut resp = json_response(
        200,
        &json!({"key": key_json(key), "version": r.version.to_string()}),
    );
    if let Ok(h) = HeaderValue::from_str(&r.version.to_string()) {
        resp.headers_mut().insert("x-kv-version", h);
    }
    Ok(resp)
}

pub(super) async fn delete(
    node: &Arc<Node>,
    key: &[u8],
    level: Option<Consistency>,
) -> Result<Response, ApiError> {
    let r = node
        .coordinator()
        .write(key.to_vec(), WriteKind::Delete, level)
        .await?;
    Ok(json_response(
        200,
        &json!({"key": key_json(key), "version": r.version.to_string()}),
    ))
}

pub(super) async fn list(node: &Arc<Node>, req: &Incoming) -> Result<Response, ApiError> {
    let q = parse_query(&req.query)?;
    let prefix = q.get("prefix").cloned().unwrap_or_default();
    let after = match (q.get("after"), q.get("after_base64")) {
        (Some(_), Some(_)) => {
            return Err(ApiError::bad_request(
                "give either after or after_base64, not both",
            ));
        }
        (Some(a), None) => Some(a.clone()),
        (None, Some(b)) => {
            use base64::Engine;
            Some(
                base64::engine::general_purpose::STANDARD
                    .decode(b)
                    .map_err(|e| {
                        ApiError::bad_request(format!("after_base64 is not base64: {e}"))
                    })?,
            )
        }
        (None, None) => None,
    };
    let limit = match q.get("limit") {
        None => 100,
        Some(v) => std::str::from_utf8(v)
            .ok()
            .and_then(|s| s.parse::<usize>().ok())
            .filter(|n| (1..=MAX_LIST_LIMIT).contains(n))
            .ok_or_else(|| ApiError::bad_request(format!("limit must be 1..={MAX_LIST_LIMIT}")))?,
    };
    let page = node
        .coordinator()
        .list(&prefix, after.as_deref(), limit)
        .await?;
    let keys: Vec<Value> = page.keys.iter().map(|k| key_json(k)).collect();
    Ok(json_response(
        200,
        &json!({"keys": keys, "next": page.next.as_deref().map(key_json)}),
    ))
}
