//! A mocked Kubernetes API server for the tests of kv-operator's controller
//! and kvctl's `--cluster` commands: each scenario lists the exact calls it
//! expects, in order, with the answer the API server gives; the mock fails
//! the test on any other call, on a call out of order, and on a call left
//! unmade.
//!
//! What it does not emulate: the API server itself (no storage, no
//! resourceVersion bookkeeping, no admission, no watches): an answer is
//! whatever the scenario says.

use std::sync::{Arc, Mutex};

use http::{Method, Request, Response, StatusCode};
use kube::client::Body;
use serde_json::{Value, json};
use tokio::task::JoinHandle;

type Responder = Box<dyn FnOnce(&Value) -> (StatusCode, Value) + Send>;

/// One call the scenario expects.
pub struct Call {
    pub method: Method,
    pub path: String,
    respond: Responder,
}

/// `method path`, answered by `respond` from the request's JSON body
/// (`Null` when it has none).
pub fn call(
    method: Method,
    path: &str,
    respond: impl FnOnce(&Value) -> (StatusCode, Value) + Send + 'static,
) -> Call {
    Call {
        method,
        path: path.to_string(),
        respond: Box::new(respond),
    }
}

/// A request the mock saw.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: Method,
    pub path: String,
    pub query: String,
    pub content_type: String,
    pub body: Value,
}

/// A `Status` answer with `code`.
pub fn status(code: u16, reason: &str, message: &str) -> (StatusCode, Value) {
    (
        StatusCode::from_u16(code).expect("status code"),
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": message, "reason": reason, "code": code}),
    )
}

pub fn not_found() -> (StatusCode, Value) {
    status(404, "NotFound", "not found")
}

/// The request's body, as written (server-side apply and merge patches).
pub fn echo(body: &Value) -> (StatusCode, Value) {
    (StatusCode::OK, body.clone())
}

/// The mock's side of a scenario: await [`Server::finish`] once the code
/// under test is done.
pub struct Server {
    task: JoinHandle<()>,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Server {
    /// Every request seen, once every expected call was made and nothing
    /// else; panics (failing the test) otherwise.
    pub async fn finish(self) -> Vec<Seen> {
        tokio::time::timeout(std::time::Duration::from_secs(10), self.task)
            .await
            .expect("mock server finished")
            .expect("every expected call was made and nothing else");
        self.seen.lock().expect("lock").clone()
    }
}

/// A kube client whose API server expects exactly `calls`; `check` sees
/// each request's method and path first (e.g. against the RBAC rules).
pub fn client(
    calls: Vec<Call>,
    check: impl Fn(&Method, &str) + Send + 'static,
) -> (kube::Client, Server) {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(service, "default");
    let seen = Arc::new(Mutex::new(Vec::new()));
    let seen_by_server = seen.clone();
    let task = tokio::spawn(async move {
        let expected: Vec<String> = calls
            .iter()
            .map(|c| format!("{} {}", c.method, c.path))
            .collect();
        for (i, c) in calls.into_iter().enumerate() {
            let (request, send) = handle.next_request().await.unwrap_or_else(|| {
                panic!(
                    "call {i} never made; expected calls:\n{}",
                    expected.join("\n")
                )
            });
            let (parts, body) = request.into_parts();
            assert_eq!(
                (parts.method.clone(), parts.uri.path().to_string()),
                (c.method.clone(), c.path.clone()),
                "call {i} differs; expected calls:\n{}",
                expected.join("\n")
            );
            check(&parts.method, parts.uri.path());
            let bytes = body.collect_bytes().await.expect("request body");
            let body: Value = if bytes.is_empty() {
                Value::Null
            } else {
                serde_json::from_slice(&bytes).expect("JSON body")
            };
            let (code, answer) = (c.respond)(&body);
            seen_by_server.lock().expect("lock").push(Seen {
                method: parts.method.clone(),
                path: parts.uri.path().to_string(),
                query: parts.uri.query().unwrap_or_default().to_string(),
                content_type: parts
                    .headers
                    .get(http::header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_string(),
                body,
            });
            send.send_response(
                Response::builder()
                    .status(code)
                    .header("content-type", "application/json")
                    .body(Body::from(serde_json::to_vec(&answer).expect("answer")))
                    .expect("response"),
            );
        }
        if let Some((request, _)) = handle.next_request().await {
            panic!("unexpected call {} {}", request.method(), request.uri());
        }
    });
    (client, Server { task, seen })
}
