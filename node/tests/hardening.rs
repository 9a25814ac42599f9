//! Requests a node must refuse however they are framed, sent as raw bytes
//! over TCP to a real `kv-node` process (a client library would not send
//! most of them): targets that are not paths, transfer codings we do not
//! decode, tokens that are almost right.

mod common;

use common::{CLUSTER_TOKEN, KV_NODE, NodeProc, TOKEN, error_code, raw_exchange};

fn node() -> (tempfile::TempDir, NodeProc) {
    let dir = tempfile::tempdir().expect("a scratch directory");
    let mut n = NodeProc::new(KV_NODE, 0, dir.path(), None);
    n.start();
    (dir, n)
}

fn healthz(address: &str) -> u16 {
    raw_exchange(
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
            let (status, body) = raw_exchange(&address, raw.as_bytes());
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
        let (status, body) = raw_exchange(&n.address(), raw.as_bytes());
        assert_eq!(status, 501, "{path} with {te}");
        assert_eq!(error_code(&body), "not_implemented");
    }
    let get = format!(
        "GET /v1/kv/gz HTTP/1.1\r\nHost: kv\r\nAuthorization: Bearer {TOKEN}\r\nConnection: close\r\n\r\n"
    );
    assert_eq!(raw_exchange(&n.address(), get.as_bytes()).0, 404);
    // chunked alone is still a body
    let put = format!(
        "PUT /v1/kv/ch HTTP/1.1\r\nHost: kv\r\nAuthorization: Bearer {TOKEN}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n{chunked_body}"
    );
    assert_eq!(raw_exchange(&n.address(), put.as_bytes()).0, 200);
    let get = get.replace("/v1/kv/gz", "/v1/kv/ch");
    let (status, body) = raw_exchange(&n.address(), get.as_bytes());
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
            raw_exchange(&address, raw.as_bytes())
        };
        let wrong = almost(token);
        assert_eq!(wrong.len(), token.len());
        let (status, body) = ask(&wrong);
        assert_eq!(status, 403, "{path} with {wrong:?}");
        assert_eq!(error_code(&body), "forbidden");
        assert_ne!(ask(token).0, 403, "{path} with the right token");
    }
}
