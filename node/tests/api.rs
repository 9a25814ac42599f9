//! The client API of one real `kv-node` process, route by route.

mod common;

use common::{Client, NodeProc, TOKEN, enc, read_answer};
use reqwest::Method;
use serde_json::json;

fn node(extra: &[&str]) -> (tempfile::TempDir, NodeProc) {
    let dir = tempfile::tempdir().unwrap();
    let mut n = NodeProc::new(common::KV_NODE, 0, dir.path(), None);
    n.extra = extra.iter().map(|s| s.to_string()).collect();
    n.start();
    (dir, n)
}

fn live_keys(c: &Client) -> Vec<String> {
    let a = c.call(Method::GET, "/v1/kv?limit=1000");
    assert_eq!(a.status, 200, "{}", a.text());
    serde_json::from_value(a.json()["keys"].clone()).unwrap()
}

#[test]
fn v1_put_get_delete_with_versions_and_create_only() {
    let (_d, n) = node(&[]);
    let c = n.client();
    let a = c.put("greeting", b"hello", None).unwrap();
    assert_eq!(a.status, 200, "{}", a.text());
    let v1 = a.json()["version"].as_str().unwrap().to_string();
    assert_eq!(a.headers["x-kv-version"], v1.as_str());

    let g = c.get("greeting", None).unwrap();
    assert_eq!((g.status, g.body.as_slice()), (200, &b"hello"[..]));
    assert_eq!(g.headers["x-kv-version"], v1.as_str());
    assert_eq!(g.headers["content-type"], "application/octet-stream");

    // Overwrite gets a newer version; binary values and keys round-trip.
    let a = c.put("greeting", &[0, 159, 255], Some("all")).unwrap();
    let v2 = a.json()["version"].as_str().unwrap().to_string();
    let (p1, p2): (kv_core::Version, kv_core::Version) = (v1.parse().unwrap(), v2.parse().unwrap());
    assert!(p2 > p1);
    assert_eq!(
        c.get("greeting", Some("one")).unwrap().body,
        vec![0, 159, 255]
    );
    assert_eq!(c.put("a/b c?d#e%f", b"x", None).unwrap().status, 200);
    assert_eq!(c.get("a/b c?d#e%f", None).unwrap().body, b"x");

    // Create-only.
    let created = c
        .send(
            c.req(Method::PUT, "/v1/kv/fresh")
                .header("If-None-Match", "*")
                .body("1"),
        )
        .unwrap();
    assert_eq!(created.status, 200, "{}", created.text());
    let again = c
        .send(
            c.req(Method::PUT, "/v1/kv/fresh")
                .header("If-None-Match", "*")
                .body("2"),
        )
        .unwrap();
    assert_eq!(again.status, 412);
    assert_eq!(again.json()["error"], "precondition_failed");
    assert_eq!(c.get("fresh", None).unwrap().body, b"1");

    // Delete, then 404 for read and for a second delete.
    let d = c.call(Method::DELETE, "/v1/kv/fresh");
    assert_eq!(d.status, 200, "{}", d.text());
    let g = c.get("fresh", None).unwrap();
    assert_eq!(g.status, 404);
    assert_eq!(g.json()["error"], "not_found");
    assert_eq!(c.call(Method::DELETE, "/v1/kv/fresh").status, 404);
    assert_eq!(c.call(Method::DELETE, "/v1/kv/never").status, 404);
    // A deleted key can be created again.
    let re = c
        .send(
            c.req(Method::PUT, "/v1/kv/fresh")
                .header("If-None-Match", "*")
                .body("3"),
        )
        .unwrap();
    assert_eq!(re.status, 200);
}

#[test]
fn listing_is_ordered_paginated_and_skips_deleted_keys() {
    let (_d, n) = node(&[]);
    let c = n.client();
    for i in 0..25 {
        assert_eq!(
            c.put(&format!("user/{i:02}"), b"v", None).unwrap().status,
            200
        );
    }
    c.put("other", b"v", None).unwrap();
    assert_eq!(c.call(Method::DELETE, "/v1/kv/user%2F03").status, 200);
    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    for _ in 0..10 {
        let mut path = "/v1/kv?prefix=user%2F&limit=10".to_string();
        if let Some(a) = &after {
            path.push_str(&format!("&after={}", enc(a)));
        }
        let page = c.call(Method::GET, &path).json();
        let keys: Vec<String> = serde_json::from_value(page["keys"].clone()).unwrap();
        assert!(keys.len() <= 10);
        seen.extend(keys);
        match page["next"].as_str() {
            Some(n) => after = Some(n.to_string()),
            None => break,
        }
    }
    let want: Vec<String> = (0..25)
        .filter(|i| *i != 3)
        .map(|i| format!("user/{i:02}"))
        .collect();
    assert_eq!(seen, want);
    for bad in ["limit=0", "limit=1001", "limit=x", "prefix=%zz"] {
        let a = c.call(Method::GET, &format!("/v1/kv?{bad}"));
        assert_eq!(a.status, 400, "{bad}: {}", a.text());
    }
}

#[test]
fn every_client_route_needs_the_token_and_open_routes_do_not() {
    let (_d, n) = node(&[]);
    let base = format!("http://{}", n.address());
    let http = reqwest::blocking::Client::new();
    let routes = [
        (Method::GET, "/v1/kv/k"),
        (Method::PUT, "/v1/kv/k"),
        (Method::DELETE, "/v1/kv/k"),
        (Method::GET, "/v1/kv"),
        (Method::GET, "/v1/cluster"),
        (Method::GET, "/v1/placement/k"),
        (Method::GET, "/v1/digests"),
        (Method::POST, "/write"),
        (Method::GET, "/read/k"),
        (Method::DELETE, "/delete/k"),
        (Method::GET, "/nodes"),
        (Method::GET, "/nodes_for_key/k"),
        (Method::POST, "/fail/1"),
        (Method::POST, "/recover/1"),
        (Method::POST, "/set_replication_strategy"),
    ];
    for (m, path) in routes {
        for auth in [
            None,
            Some("Bearer wrong"),
            Some("Basic Y2xpZW50LXNlY3JldA=="),
            Some(TOKEN),
        ] {
            let mut r = http.request(m.clone(), format!("{base}{path}"));
            if let Some(a) = auth {
                r = r.header("Authorization", a);
            }
            let resp = r.send().unwrap();
            assert_eq!(resp.status(), 403, "{m} {path} with {auth:?}");
            let body: serde_json::Value = resp.json().unwrap();
            assert_eq!(body["error"], "forbidden", "{m} {path}");
            assert!(body["message"].as_str().is_some());
        }
    }
    for path in ["/healthz", "/readyz", "/metrics"] {
        assert_eq!(
            http.get(format!("{base}{path}")).send().unwrap().status(),
            200,
            "{path}"
        );
    }
    // The peer port wants the cluster token, not the client token.
    let peer = format!("http://{}/internal/v1/digests", n.peer_address());
    assert_eq!(
        http.get(&peer).bearer_auth(TOKEN).send().unwrap().status(),
        403
    );
    assert_eq!(
        http.get(&peer)
            .bearer_auth(common::CLUSTER_TOKEN)
            .send()
            .unwrap()
            .status(),
        200
    );
    // Nothing was written by any of the refused requests.
    assert!(live_keys(&n.client()).is_empty());
}

#[test]
fn bad_input_gets_a_4xx_json_error_and_changes_nothing() {
    let (_d, n) = node(&["--max-value-bytes", "1000"]);
    let c = n.client();
    c.put("keep", b"original", None).unwrap();
    let long_key = "k".repeat(1025);
    let cases: Vec<(reqwest::blocking::RequestBuilder, u16, &str)> = vec![
        (
            c.req(Method::PUT, &format!("/v1/kv/{long_key}")).body("v"),
            400,
            "bad_request",
        ),
        (
            c.req(Method::PUT, "/v1/kv/").body("v"),
            405,
            "method_not_allowed",
        ),
        (
            c.req(Method::PUT, "/v1/kv/big").body(vec![b'x'; 1001]),
            413,
            "payload_too_large",
        ),
        (
            c.req(Method::PUT, "/v1/kv/%zz").body("v"),
            400,
            "bad_request",
        ),
        (
            c.req(Method::PUT, "/v1/kv/keep%2").body("v"),
            400,
            "bad_request",
        ),
        (
            c.req(Method::PUT, "/v1/kv/keep")
                .header("X-Consistency", "most")
                .body("v"),
            400,
            "bad_request",
        ),
        (
            c.req(Method::PUT, "/v1/kv/keep")
                .header("If-None-Match", "\"abc\"")
                .body("v"),
            400,
            "bad_request",
        ),
        (
            c.req(Method::POST, "/v1/kv/keep").body("v"),
            405,
            "method_not_allowed",
        ),
        (
            c.req(Method::PATCH, "/v1/kv/keep").body("v"),
            405,
            "method_not_allowed",
        ),
        (c.req(Method::GET, "/write"), 405, "method_not_allowed"),
        (
            c.req(Method::POST, "/write").body("{not json"),
            400,
            "bad_request",
        ),
        (
            c.req(Method::POST, "/write").body(r#"{"key":"keep"}"#),
            400,
            "bad_request",
        ),
        (
            c.req(Method::POST, "/write")
                .body(r#"{"key":7,"value":"v"}"#),
            400,
            "bad_request",
        ),
        (
            c.req(Method::POST, "/write")
                .body(r#"{"key":"","value":"v"}"#),
            400,
            "bad_request",
        ),
        (
            c.req(Method::POST, "/write")
                .body(serde_json::to_vec(&json!({"key":"big","value":"x".repeat(1001)})).unwrap()),
            413,
            "payload_too_large",
        ),
        (
            c.req(Method::POST, "/write")
                .body(vec![b' '; 7 * 1000 + 70_000]),
            413,
            "payload_too_large",
        ),
        (c.req(Method::GET, "/read/%zz"), 400, "bad_request"),
        (c.req(Method::GET, "/nope"), 404, "not_found"),
    ];
    for (i, (req, status, code)) in cases.into_iter().enumerate() {
        let a = c.send(req).unwrap();
        assert_eq!(a.status, status, "case {i}: {}", a.text());

        assert_eq!(a.json()["error"], code, "case {i}");
        assert!(a.json()["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    // A body refused before it was read is left on the connection, so the
    // answer closes it (a client that reused it would lose its next request).
    let a = c
        .send(c.req(Method::PUT, "/v1/kv/big").body(vec![b'x'; 70_000]))
        .unwrap();
    assert_eq!(a.status, 413);
    assert_eq!(
        a.headers.get("connection").map(|v| v.as_bytes()),
        Some(&b"close"[..])
    );
    assert_eq!(c.get("keep", None).unwrap().body, b"original");
    assert_eq!(live_keys(&c), vec!["keep".to_string()]);
    // A 1024-byte key and a value at the limit are fine.
    assert_eq!(
        c.put(&"k".repeat(1024), &[b'v'; 1000], None)
            .unwrap()
            .status,
        200
    );
    // A lying Content-Length over the limit is refused before the body is read.
    let mut s = std::net::TcpStream::connect(n.address()).unwrap();
    use std::io::{Read, Write};
    write!(s, "PUT /v1/kv/x HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: 99999999\r\n\r\n").unwrap();
    let mut buf = [0u8; 512];
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    let got = s.read(&mut buf).unwrap();
    assert!(
        String::from_utf8_lossy(&buf[..got]).starts_with("HTTP/1.1 413"),
        "{}",
        String::from_utf8_lossy(&buf[..got])
    );
}

#[test]
fn classic_routes_answer_with_the_original_shapes() {
    let (_d, n) = node(&[]);
    let c = n.client();
    let w = c
        .send(
            c.req(Method::POST, "/write")
                .json(&json!({"key": "k1", "value": "v1"})),
        )
        .unwrap();
    assert_eq!(w.status, 200, "{}", w.text());
    assert_eq!(w.json()["status"], "success");
    assert!(w.json()["message"].as_str().is_some());
    let dup = c
        .send(
            c.req(Method::POST, "/write")
                .json(&json!({"key": "k1", "value": "v2"})),
        )
        .unwrap();
    assert_eq!(dup.status, 409);
    assert_eq!(dup.json()["status"], "error");
    assert_eq!(dup.json()["error"], "conflict");

    let r = c.call(Method::GET, "/read/k1").json();
    assert_eq!(r["status"], "success");
    assert_eq!(
        (r["key"].as_str(), r["value"].as_str()),
        (Some("k1"), Some("v1"))
    );
    assert!(r["message"].as_str().is_some());
    // Values written through v1 are readable through classic and back.
    assert_eq!(c.get("k1", None).unwrap().body, b"v1");

    let missing = c.call(Method::GET, "/read/nope");
    assert_eq!(missing.status, 404);
    assert_eq!(missing.json()["status"], "error");

    let d = c.call(Method::DELETE, "/delete/k1");
    assert_eq!(
        (d.status, d.json()["status"].as_str()),
        (200, Some("success"))
    );
    assert_eq!(c.call(Method::DELETE, "/delete/k1").status, 404);

    let nodes = c.call(Method::GET, "/nodes").json();
    assert_eq!(nodes["status"], "success");
    assert_eq!(nodes["nodes"][0]["node_id"], 0);
    assert_eq!(nodes["nodes"][0]["status"], "alive");
    assert_eq!(nodes["nodes"][0]["port"], n.port);

    let owners = c.call(Method::GET, "/nodes_for_key/k1").json();
    assert_eq!(
        (owners["status"].as_str(), owners["nodes"].clone()),
        (Some("success"), json!([0]))
    );

    for path in ["/fail/1", "/recover/1", "/set_replication_strategy"] {
        let a = c
            .send(c.req(Method::POST, path).json(&json!({"strategy": "full"})))
            .unwrap();
        assert_eq!(a.status, 501, "{path}");
        assert_eq!(a.json()["status"], "error");
        assert!(
            a.json()["message"]
                .as_str()
                .unwrap()
                .contains("control plane")
        );
    }
}

#[test]
fn cluster_placement_digests_and_metrics_describe_the_node() {
    let (_d, n) = node(&[]);
    let c = n.client();
    c.put("k", b"v", None).unwrap();
    let cl = c.cluster();
    assert_eq!(cl["nodeId"], 0);
    assert_eq!(cl["state"], "Up");
    assert_eq!(cl["resyncProgress"], 1.0);
    assert_eq!(cl["topology"]["nodes"][0]["address"], n.address());
    let p = c.call(Method::GET, "/v1/placement/k").json();
    assert_eq!(p["owners"][0]["ordinal"], 0);
    assert_eq!(p["bucket"], kv_core::bucket_of(b"k"));
    let d = c.call(Method::GET, "/v1/digests").json();
    let b = kv_core::bucket_of(b"k").to_string();
    assert_eq!(d["buckets"][b.as_str()]["count"], 1);
    assert_eq!(d["buckets"].as_object().unwrap().len(), 1);

    let ready = c.call(Method::GET, "/readyz");
    assert_eq!(ready.status, 200);
    let m = c.call(Method::GET, "/metrics").text();
    for want in [
        "kv_requests_total{code=\"200\",route=\"kv_put\"} 1",
        "kv_request_duration_seconds_bucket",
        "kv_commit_batch_size_count",
        "kv_fsync_duration_seconds_count",
        "kv_topology_epoch 0",
        "kv_node_state{state=\"Up\"} 1",
        "kv_keys",
        "kv_tombstones",
        "kv_db_bytes",
        "kv_hints_pending",
    ] {
        assert!(m.contains(want), "metrics lack {want}:\n{m}");
    }
    // The volume gauges are the data directory's filesystem, as df shows it.
    let gauge = |name: &str| -> i64 {
        m.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in\n{m}"))
    };
    let (size, free) = (gauge("kv_volume_size_bytes"), gauge("kv_volume_free_bytes"));
    assert!(
        size > 0 && free > 0 && free <= size,
        "size {size}, free {free}"
    );
}

#[test]
fn sigterm_shuts_down_cleanly_and_data_survives_a_restart() {
    let (_d, mut n) = node(&[]);
    let c = n.client();
    for i in 0..50 {
        let a = c.put(&format!("k{i}"), b"v", None).unwrap();
        assert_eq!(a.status, 200, "put k{i}: {}", a.text());
    }
    let status = n.terminate().expect("node was running");
    assert!(status.success(), "exit status {status}");
    n.start();
    assert_eq!(live_keys(&n.client()).len(), 50);
    // a running node holds its database: the check runs once it stopped again
    let status = n.terminate().expect("node was running");
    assert!(status.success(), "exit status {status}");
    let store = kv_node::Store::open(&n.data_dir, kv_node::StoreOptions::default()).unwrap();
    store.integrity_check().unwrap();
}

#[test]
fn tokens_come_from_files_and_bad_configuration_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "from-a-file\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kv-node"))
        .args(["--node-id", "0", "--cluster-token", "c", "--data-dir"])
        .arg(dir.path().join("d"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("client token"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A token and a token file at once are refused.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kv-node"))
        .args(["--node-id", "0", "--token", "a", "--token-file"])
        .arg(&token_file)
        .args(["--cluster-token", "c"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let http = reqwest::blocking::Client::new();
    let port = common::free_port();
    let peer = common::free_port();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_kv-node"))
        .args(["--node-id", "0", "--cluster-token", "c"])
        .args([
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--peer-listen",
            &format!("127.0.0.1:{peer}"),
        ])
        .arg("--token-file")
        .arg(&token_file)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    common::eventually("node up", std::time::Duration::from_secs(10), || {
        http.get(format!("http://127.0.0.1:{port}/healthz"))
            .send()
            .is_ok()
    });
    let ok = http
        .get(format!("http://127.0.0.1:{port}/v1/cluster"))
        .bearer_auth("from-a-file")
        .send()
        .unwrap();
    assert_eq!(ok.status(), 200);

    // The file is read again while the node runs (rotation, kv_net::token):
    // every line is accepted; a file that does not load keeps the last good
    // tokens; the report shows fingerprints, never a token.
    let status_with = |token: &str| {
        http.get(format!("http://127.0.0.1:{port}/v1/cluster"))
            .bearer_auth(token)
            .send()
            .map(|r| r.status().as_u16())
            .unwrap_or(0)
    };
    let wait = std::time::Duration::from_secs(10);
    std::fs::write(&token_file, "from-a-file\nnext-token\n").unwrap();
    common::eventually("the second line accepted", wait, || {
        status_with("next-token") == 200
    });
    assert_eq!(status_with("from-a-file"), 200, "the first line still");
    let report: serde_json::Value = http
        .get(format!("http://127.0.0.1:{port}/v1/cluster"))
        .bearer_auth("next-token")
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(
        report["tokens"]["client"],
        json!([
            kv_net::token::fingerprint("from-a-file"),
            kv_net::token::fingerprint("next-token")
        ]),
        "{report}"
    );
    assert!(!report.to_string().contains("next-token"), "{report}");
    for bad in ["", "two words\n"] {
        std::fs::write(&token_file, bad).unwrap();
        // two reload periods
        std::thread::sleep(std::time::Duration::from_millis(2500));
        assert_eq!(status_with("next-token"), 200, "after {bad:?}");
        assert_eq!(status_with("from-a-file"), 200, "after {bad:?}");
    }
    std::fs::write(&token_file, "next-token\n").unwrap();
    common::eventually("the old token refused", wait, || {
        status_with("from-a-file") == 403
    });
    assert_eq!(status_with("next-token"), 200);
    let _ = child.kill();
    let _ = child.wait();
}

/// The report contract: what a real node writes on `/v1/cluster` is exactly
/// a `kv_core::NodeReport` (every field it writes is one the readers know, by
/// the same name and type), so the controller, the local platform and
/// `kvctl nodes` read what the node meant.
#[test]
fn the_cluster_report_reads_back_as_the_node_wrote_it() {
    let (_d, n) = node(&[]);
    let a = n.client().call(Method::GET, "/v1/cluster");
    assert_eq!(a.status, 200, "{}", a.text());
    let written = a.json();
    let read = kv_core::NodeReport::from_json(&written)
        .unwrap_or_else(|| panic!("not a NodeReport: {written:#}"));
    assert_eq!(read.node_id, 0);
    assert_eq!(read.resync_progress, 1.0, "{written:#}");
    assert_eq!(
        serde_json::to_value(&read).unwrap(),
        written,
        "a field the node writes is lost or renamed by the readers"
    );
}

// A client may send its requests back to back on one connection without
// waiting for each answer (HTTP/1.1 pipelining): each is served after the
// one before it, and the answers come back in the order asked.
#[test]
fn pipelined_requests_on_one_connection_are_served_in_order() {
    use std::io::{BufReader, Write};
    let (_d, n) = node(&[]);
    let mut s = std::net::TcpStream::connect(n.address()).unwrap();
    let auth = format!("Authorization: Bearer {TOKEN}");
    let put = |v: &str| {
        format!(
            "PUT /v1/kv/piped HTTP/1.1\r\nHost: x\r\n{auth}\r\nContent-Length: {}\r\n\r\n{v}",
            v.len()
        )
    };
    let get = format!("GET /v1/kv/piped HTTP/1.1\r\nHost: x\r\n{auth}\r\n\r\n");
    let delete = format!("DELETE /v1/kv/piped HTTP/1.1\r\nHost: x\r\n{auth}\r\n\r\n");
    let all = [put("one"), put("two"), get.clone(), delete, get].concat();
    // One write: the node has every request before it answers the first.
    s.write_all(all.as_bytes()).unwrap();
    let mut r = BufReader::new(s);
    let answers: Vec<(u16, Vec<u8>)> = (0..5)
        .map(|i| {
            let a = read_answer(&mut r, false).unwrap_or_else(|e| panic!("answer {i}: {e}"));
            (a.status, a.body)
        })
        .collect();
    let statuses: Vec<u16> = answers.iter().map(|a| a.0).collect();
    assert_eq!(statuses, [200, 200, 200, 200, 404], "{answers:?}");
    assert_eq!(
        answers[2].1, b"two",
        "the read saw the writes before it and not the delete after it"
    );
    let first: serde_json::Value = serde_json::from_slice(&answers[0].1).unwrap();
    let second: serde_json::Value = serde_json::from_slice(&answers[1].1).unwrap();
    let version = |v: &serde_json::Value| -> kv_core::Version {
        v["version"].as_str().unwrap().parse().unwrap()
    };
    assert!(version(&second) > version(&first), "{first} {second}");
}
