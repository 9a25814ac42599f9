//! The original store's routes: `POST /write` (create-only), `GET
//! /read/<key>`, `DELETE /delete/<key>`, `GET /nodes`, `GET
//! /nodes_for_key/<key>`, with its JSON shapes; its control routes are the
//! control plane's, answered 501 here.

use std::sync::Arc;

use bytes::Bytes;
use kv_core::record::{validate_key, validate_value};
use kv_core::{Consistency, Record, bucket_of};
use serde_json::{Value, json};

use super::kv::{key_json, key_text};
use super::{Response, json_response};
use crate::coordinator::{CoordError, WriteKind};
use crate::node::{ApiError, Node};

pub(super) async fn write(
    node: &Arc<Node>,
    body: &Bytes,
    level: Option<Consistency>,
) -> Result<Response, ApiError> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("body is not valid JSON: {e}")))?;
    let key = match v.get("key") {
        Some(Value::String(k)) => k.clone(),
        _ => return Err(ApiError::bad_request("body needs \"key\" (a string)")),
    };
    let value = match v.get("value") {
        Some(Value::String(s)) => s.clone().into_bytes(),
        Some(Value::Null) | None => {
            return Err(ApiError::bad_request("body needs \"value\""));
        }
        Some(other) => other.to_string().into_bytes(),
    };
    validate_key(key.as_bytes()).map_err(|e| ApiError::bad_request(e.to_string()))?;
    validate_value(&value, node.config.max_value_bytes)
        .map_err(|e| ApiError::new(413, "payload_too_large", e.to_string()))?;
    match node
        .coordinator()
        .write(key.clone().into_bytes(), WriteKind::Create(value), level)
        .await
    {
        Ok(_) => Ok(json_response(
            200,
            &json!({"status": "success", "message": format!("Key '{key}' written")}),
        )),
        Err(CoordError::Exists(_)) => Err(ApiError::new(
            409,
            "conflict",
            format!("Key '{key}' already exists"),
        )),
        Err(e) => Err(e.into()),
    }
}

pub(super) async fn read(
    node: &Arc<Node>,
    key: &[u8],
    level: Option<Consistency>,
) -> Result<Response, ApiError> {
    match node.coordinator().read(key, level).await? {
        Some(Record { value: Some(v), .. }) => Ok(json_response(
            200,
            &json!({
                "status": "success",
                "message": "Key found",
                "key": key_json(key),
                "value": String::from_utf8_lossy(&v),
            }),
        )),
        _ => Err(ApiError::new(
            404,
            "not_found",
            format!("Key '{}' not found", key_text(key)),
        )),
    }
}

pub(super) async fn delete(
    node: &Arc<Node>,
    key: &[u8],
    level: Option<Consistency>,
) -> Result<Response, ApiError> {
    match node
        .coordinator()
        .write(key.to_vec(), WriteKind::Delete, level)
        .await
    {
        Ok(_) => Ok(json_response(
            200,
            &json!({"status": "success", "message": format!("Key '{}' deleted", key_text(key))}),
        )),
        Err(CoordError::NotFound) => Err(ApiError::new(
            404,
            "not_found",
            format!("Key '{}' not found", key_text(key)),
        )),
        Err(e) => Err(e.into()),
    }
}

pub(super) fn nodes(node: &Arc<Node>) -> Result<Response, ApiError> {
    let view = node.cluster.view();
    let nodes: Vec<Value> = view
        .topology
        .nodes
        .iter()
        .map(|n| {
            let port = n
                .address
                .rsplit_once(':')
                .and_then(|(_, p)| p.parse::<u16>().ok());
            json!({
                "node_id": n.ordinal,
                "status": if n.state.serves_client_reads() { "alive" } else { "dead" },
                "port": port,
                "state": n.state,
            })
        })
        .collect();
    Ok(json_response(
        200,
        &json!({"status": "success", "nodes": nodes}),
    ))
}

pub(super) fn nodes_for_key(node: &Arc<Node>, key: &[u8]) -> Result<Response, ApiError> {
    let view = node.cluster.view();
    let owners = view.layout.current.owners(bucket_of(key)).to_vec();
    Ok(json_response(
        200,
        &json!({
            "status": "success",
            "message": format!("Nodes for key '{}'", key_text(key)),
            "key": key_json(key),
            "nodes": owners,
        }),
    ))
}

pub(super) fn control(what: &str) -> Result<Response, ApiError> {
    Err(ApiError::new(
        501,
        "not_implemented",
        format!(
            "/{what} is a control route: a node cannot fail, recover or re-place itself; send it to the control plane (the `kvctl up` gateway, or edit the KvCluster on Kubernetes)"
        ),
    ))
}
