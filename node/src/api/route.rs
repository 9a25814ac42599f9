//! The client port's routes: which route a method and raw path name, the
//! key in the path (strictly percent-decoded and validated), each route's
//! body limit and whether it needs the token.

use kv_core::record::validate_key;
use warp::http::Method;

use super::JSON_OVERHEAD;
use crate::node::ApiError;

/// A route whose path ends in a key: prefix, methods, their name, constructor.
type KeyedRoute<'a> = (&'a str, &'a [Method], &'a str, fn(Vec<u8>) -> Route);

/// The routes of the client port.
#[derive(Debug, PartialEq)]
pub enum Route {
    Healthz,
    Readyz,
    Metrics,
    KvGet(Vec<u8>),
    KvPut(Vec<u8>),
    KvDelete(Vec<u8>),
    KvList,
    Cluster,
    Placement(Vec<u8>),
    Digests,
    ClassicWrite,
    ClassicRead(Vec<u8>),
    ClassicDelete(Vec<u8>),
    ClassicNodes,
    ClassicNodesForKey(Vec<u8>),
    ClassicControl(&'static str),
}

fn method_not_allowed(allowed: &str) -> ApiError {
    ApiError::new(
        405,
        "method_not_allowed",
        format!("this route takes {allowed}"),
    )
}

/// Strict percent-decoding: `%` must start two hex digits.
pub fn percent_decode(s: &str) -> Result<Vec<u8>, ApiError> {
    kv_net::http::percent_decode(s).ok_or_else(|| {
        ApiError::bad_request("bad percent-encoding in the path (a % must start two hex digits)")
    })
}

fn key_of(raw: &str) -> Result<Vec<u8>, ApiError> {
    let key = percent_decode(raw)?;
    validate_key(&key).map_err(|e| ApiError::bad_request(e.to_string()))?;
    Ok(key)
}

impl Route {
    pub fn parse(method: &Method, path: &str) -> Result<Route, ApiError> {
        let m = |allowed: &[Method], name: &str| -> Result<(), ApiError> {
            if allowed.contains(method) {
                Ok(())
            } else {
                Err(method_not_allowed(name))
            }
        };
        let get = [Method::GET, Method::HEAD];
        match path {
            "/healthz" => m(&get, "GET").map(|_| Route::Healthz),
            "/readyz" => m(&get, "GET").map(|_| Route::Readyz),
            "/metrics" => m(&get, "GET").map(|_| Route::Metrics),
            "/v1/kv" | "/v1/kv/" => m(&get, "GET").map(|_| Route::KvList),
            "/v1/cluster" => m(&get, "GET").map(|_| Route::Cluster),
            "/v1/digests" => m(&get, "GET").map(|_| Route::Digests),
            "/write" => m(&[Method::POST], "POST").map(|_| Route::ClassicWrite),
            "/nodes" => m(&get, "GET").map(|_| Route::ClassicNodes),
            "/set_replication_strategy" => m(&[Method::POST], "POST")
                .map(|_| Route::ClassicControl("set_replication_strategy")),
            _ => {
                if let Some(raw) = path.strip_prefix("/v1/kv/") {
                    let key = key_of(raw)?;
                    return match *method {
                        Method::GET | Method::HEAD => Ok(Route::KvGet(key)),
                        Method::PUT => Ok(Route::KvPut(key)),
                        Method::DELETE => Ok(Route::KvDelete(key)),
                        _ => Err(method_not_allowed("GET, PUT or DELETE")),
                    };
                }
                let prefixed: [KeyedRoute<'_>; 4] = [
                    ("/v1/placement/", &get, "GET", Route::Placement),
                    ("/read/", &get, "GET", Route::ClassicRead),
                    (
                        "/delete/",
                        &[Method::DELETE],
                        "DELETE",
                        Route::ClassicDelete,
                    ),
                    ("/nodes_for_key/", &get, "GET", Route::ClassicNodesForKey),
                ];
                for (prefix, allowed, name, make) in prefixed {
                    if let Some(raw) = path.strip_prefix(prefix) {
                        m(allowed, name)?;
                        return Ok(make(key_of(raw)?));
                    }
                }
                for (prefix, name) in [("/fail/", "fail"), ("/recover/", "recover")] {
                    if path.strip_prefix(prefix).is_some_and(|id| !id.is_empty()) {
                        m(&[Method::POST], "POST")?;
                        return Ok(Route::ClassicControl(name));
                    }
                }
                Err(ApiError::new(404, "not_found", format!("no route {path}")))
            }
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Route::Healthz => "healthz",
            Route::Readyz => "readyz",
            Route::Metrics => "metrics",
            Route::KvGet(_) => "kv_get",
            Route::KvPut(_) => "kv_put",
            Route::KvDelete(_) => "kv_delete",
            Route::KvList => "kv_list",
            Route::Cluster => "cluster",
            Route::Placement(_) => "placement",
            Route::Digests => "digests",
            Route::ClassicWrite => "classic_write",
            Route::ClassicRead(_) => "classic_read",
            Route::ClassicDelete(_) => "classic_delete",
            Route::ClassicNodes => "classic_nodes",
            Route::ClassicNodesForKey(_) => "classic_nodes_for_key",
            Route::ClassicControl(_) => "classic_control",
        }
    }

    pub(super) fn is_open(&self) -> bool {
        matches!(self, Route::Healthz | Route::Readyz | Route::Metrics)
    }

    pub(super) fn body_limit(&self, max_value: usize) -> usize {
        match self {
            Route::KvPut(_) => max_value,
            // JSON escapes can inflate a value up to six times.
            Route::ClassicWrite => max_value.saturating_mul(6).saturating_add(JSON_OVERHEAD),
            Route::ClassicControl(_) => JSON_OVERHEAD,
            _ => 0,
        }
    }
}
