//! Requests a node must refuse however they are framed, sent as raw bytes
//! over TCP to a real `kv-node` process (a client library would not send
//! most of them): targets that are not paths, transfer codings we do not
//! decode, tokens that are almost right.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::{CLUSTER_TOKEN, KV_NODE, NodeProc, TOKEN};
use serde_json::Value;

fn node() -> (tempfile::TempDir, NodeProc) {
    let dir = tempfile::tempdir().expect("a scratch directory");
    let mut n = NodeProc::new(KV_NODE, 0, dir.path(), None);
    n.start();
    (dir, n)
}

/// Sends `raw` and reads the answer until the server closes (every request
/// here is refused with `Connection: close`, or sent with it); the status
/// and the body after the head.
fn exchange(address: &str, raw: &[u8]) -> (u16, Vec<u8>) {
    let mut s = TcpStream::connect(address).expect("connect");
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

fn error_code(body: &[u8]) -> String {
    let v: Value = serde_json::from_slice(body)
        .unwrap_or_else(|e| panic!("{e}: {:?}", String::from_utf8_lossy(body)));
    v["error"].as_str().unwrap_or_default().to_string()
}

fn healthz(address: &str) -> u16 {
    exchange(
        address,
        b"GET /healthz HTTP/1.1\r\nHost: kv\r\nConnection: close\r\n\r\n",
    )
    .0
}

#[test]
fn an_authority_form_target_gets_a_400_on_both_ports_and_the_node_serves_on() {
    let (_d, n) = node();
    for (address, token) in [(n.address(), TOKEN), (n.peer_address(), CLUSTER_TOKEN)] {
        for target in ["127.0.0.1:80", "ng"] {
            let raw = format!(
                "GET {target} HTTP/1.1\r\nHost: kv\r\nAuthorization: Bearer {token}\r\n\r\n"
            );
            let (status, body) = exchange(&address, raw.as_bytes());
            assert_eq!(status, 400, "GET {target} on {address}");
            assert_eq!(error_code(&body), "bad_request", "GET {target}");
        }
    }
    assert_eq!(healthz(&n.address()), 200);
}

#[test]
fn a_transfer_coding_other_than_chunked_gets_501_and_stores_nothing() {
    let (_d, n) = node();
    // "hello" gzip-compressed would be stored compressed if we took it.
    let chunked_body = "5\r\nhello\r\n0\r\n\r\n";
    for (path, te) in [
        ("/v1/kv/gz", "gzip, chunked"),
        ("/v1/kv/gz", "deflate, chunked"),
        ("/write", "gzip, chunked"),
    ] {
        let raw = format!(
            "PUT {path} HTTP/1.1\r\nHost: kv\r\nAuthorization: Bearer {TOKEN}\r\nTransfer-Encoding: {te}\r\n\r\n{chunked_body}"
        )
        .replace("PUT /write", "POST /write");
        let (status, body) = exchange(&n.address(), raw.as_bytes());
        assert_eq!(status, 501, "{path} with {te}");
        assert_eq!(error_code(&body), "not_implemented");
    }
    let get = format!(
        "GET /v1/kv/gz HTTP/1.1\r\nHost: kv\r\nAuthorization: Bearer {TOKEN}\r\nConnection: close\r\n\r\n"
    );
    assert_eq!(exchange(&n.address(), get.as_bytes()).0, 404);
    // chunked alone is still a body
    let put = format!(
        "PUT /v1/kv/ch HTTP/1.1\r\nHost: kv\r\nAuthorization: Bearer {TOKEN}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n{chunked_body}"
    );
    assert_eq!(exchange(&n.address(), put.as_bytes()).0, 200);
    let get = get.replace("/v1/kv/gz", "/v1/kv/ch");
    let (status, body) = exchange(&n.address(), get.as_bytes());
    assert_eq!((status, body.as_slice()), (200, b"hello".as_slice()));
}

/// The token check compares in constant time (subtle); what a test can see
/// is that a token of the right length with one byte changed is refused.
#[test]
fn a_wrong_token_of_the_right_length_is_refused_on_both_ports() {
    let (_d, n) = node();
    let almost = |t: &str| {
        let mut b = t.as_bytes().to_vec();
        let last = b.len() - 1;
        b[last] ^= 1;
        String::from_utf8(b).expect("ASCII")
    };
    for (address, path, token) in [
        (n.address(), "/v1/kv/k", TOKEN),
        (n.peer_address(), "/internal/v1/digests", CLUSTER_TOKEN),
    ] {
        let ask = |t: &str| {
            let raw = format!(
                "GET {path} HTTP/1.1\r\nHost: kv\r\nAuthorization: Bearer {t}\r\nConnection: close\r\n\r\n"
            );
            exchange(&address, raw.as_bytes())
        };
        let wrong = almost(token);
        assert_eq!(wrong.len(), token.len());
        let (status, body) = ask(&wrong);
        assert_eq!(status, 403, "{path} with {wrong:?}");
        assert_eq!(error_code(&body), "forbidden");
        assert_ne!(ask(token).0, 403, "{path} with the right token");
    }
}
