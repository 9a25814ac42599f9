//! The real kvctl binary against a real kv-node process.

mod common;

use common::{Node, TOKEN, run_kvctl, stderr, stdout};

fn ok(o: &std::process::Output) -> String {
    assert!(
        o.status.success(),
        "exit {:?}\nstdout: {}\nstderr: {}",
        o.status.code(),
        stdout(o),
        stderr(o)
    );
    stdout(o)
}

fn fails(o: &std::process::Output, code: i32) -> String {
    assert_eq!(
        o.status.code(),
        Some(code),
        "stdout: {}\nstderr: {}",
        stdout(o),
        stderr(o)
    );
    let e = stderr(o);
    assert!(e.starts_with("kvctl: "), "{e}");
    assert_eq!(e.trim_end().lines().count(), 1, "one line: {e}");
    e
}

#[test]
fn put_get_delete_round_trip() {
    let node = Node::start();
    let out = ok(&node.kvctl(&["put", "greeting", "hello world"]));
    assert!(out.starts_with("stored greeting (version "), "{out}");
    assert_eq!(ok(&node.kvctl(&["get", "greeting"])), "hello world");

    // JSON output: the server's ack, and a rendering of the read.
    let v: serde_json::Value =
        serde_json::from_str(&ok(&node.kvctl(&["-o", "json", "put", "greeting", "hi"]))).unwrap();
    assert_eq!(v["key"], "greeting");
    let version = v["version"].as_str().unwrap().to_string();
    let g: serde_json::Value =
        serde_json::from_str(&ok(&node.kvctl(&["get", "greeting", "-o", "json"]))).unwrap();
    assert_eq!(g["value"], "hi");
    assert_eq!(g["version"], version.as_str());

    // Consistency levels are accepted on a one-node cluster.
    for level in ["one", "quorum", "all"] {
        ok(&node.kvctl(&["--consistency", level, "put", "lvl", level]));
        assert_eq!(
            ok(&node.kvctl(&["--consistency", level, "get", "lvl"])),
            level
        );
    }

    let out = ok(&node.kvctl(&["delete", "greeting"]));
    assert!(out.starts_with("deleted greeting (version "), "{out}");
    let e = fails(&node.kvctl(&["get", "greeting"]), 1);
    assert!(!e.contains('{'), "the message, not the JSON: {e}");
    fails(&node.kvctl(&["delete", "greeting"]), 1);
}

#[test]
fn keys_with_any_bytes_travel_percent_encoded() {
    let node = Node::start();
    for key in [
        "a/b/c",
        "with space",
        "100%",
        "q?x=1&y#z",
        "ünï",
        "./..",
        "-",
        "a+b",
    ] {
        ok(&node.kvctl(&["put", key, &format!("v:{key}")]));
        assert_eq!(ok(&node.kvctl(&["get", key])), format!("v:{key}"), "{key}");
    }
    let listed = ok(&node.kvctl(&["list"]));
    let mut want: Vec<&str> = vec![
        "a/b/c",
        "with space",
        "100%",
        "q?x=1&y#z",
        "ünï",
        "./..",
        "-",
        "a+b",
    ];
    want.sort();
    assert_eq!(listed.lines().collect::<Vec<_>>(), want);
    for dots in [".", ".."] {
        let e = fails(&node.kvctl(&["put", dots, "v"]), 2);
        assert!(e.contains("dot segment"), "{e}");
    }
    let out = ok(&node.kvctl(&["where", "a/b/c"]));
    assert!(out.starts_with("key a/b/c  bucket "), "{out}");
    assert!(out.contains("owners: 0 ("), "{out}");
}

#[test]
fn values_from_stdin_and_files() {
    let node = Node::start();
    let payload: Vec<u8> = (0..=255u8).cycle().take(5000).collect();
    ok(&node.kvctl_stdin(&["put", "bin", "-"], Some(&payload)));
    let o = node.kvctl(&["get", "bin"]);
    assert!(o.status.success());
    assert_eq!(
        o.stdout, payload,
        "raw bytes out, no newline added when piped"
    );

    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("v.txt");
    std::fs::write(&f, b"from a file\n").unwrap();
    ok(&node.kvctl(&["put", "file", "--file", f.to_str().unwrap()]));
    assert_eq!(ok(&node.kvctl(&["get", "file"])), "from a file\n");
    ok(&node.kvctl_stdin(&["put", "file2", "--file", "-"], Some(b"x")));
    assert_eq!(ok(&node.kvctl(&["get", "file2"])), "x");
    let e = fails(&node.kvctl(&["put", "k", "--file", "/nonexistent/file"]), 1);
    assert!(e.contains("/nonexistent/file"), "{e}");
    // Empty values are values.
    ok(&node.kvctl(&["put", "empty", ""]));
    assert_eq!(ok(&node.kvctl(&["get", "empty"])), "");
}

#[test]
fn create_only_put_refuses_an_existing_key() {
    let node = Node::start();
    ok(&node.kvctl(&["put", "once", "1", "--create"]));
    fails(&node.kvctl(&["put", "once", "2", "--create"]), 1);
    assert_eq!(ok(&node.kvctl(&["get", "once"])), "1");
}

#[test]
fn list_follows_pagination_with_prefix_and_limit() {
    let node = Node::start();
    // More than one server page (1000 keys) under the prefix, plus others.
    let mut keys: Vec<String> = (0..1105).map(|i| format!("p/{i:05}")).collect();
    std::thread::scope(|s| {
        for chunk in keys.chunks(140) {
            let node = &node;
            s.spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                let c = kvctl::Client::new(
                    &node.endpoint(),
                    Some(TOKEN.into()),
                    None,
                    std::time::Duration::from_secs(10),
                )
                .unwrap();
                rt.block_on(async {
                    for k in chunk {
                        c.put(k.as_bytes(), b"v".to_vec(), false).await.unwrap();
                    }
                });
            });
        }
    });
    ok(&node.kvctl(&["put", "q/1", "v"]));
    ok(&node.kvctl(&["put", "o/1", "v"]));
    keys.sort();

    let all = ok(&node.kvctl(&["list", "--prefix", "p/"]));
    assert_eq!(all.lines().collect::<Vec<_>>(), keys);
    let first = ok(&node.kvctl(&["list", "--prefix", "p/", "--limit", "3"]));
    assert_eq!(first.lines().collect::<Vec<_>>(), &keys[..3]);
    let some = ok(&node.kvctl(&["list", "--limit", "1050", "--prefix", "p/"]));
    assert_eq!(some.lines().count(), 1050);
    let v: serde_json::Value = serde_json::from_str(&ok(
        &node.kvctl(&["list", "--prefix", "p/", "--limit", "2", "-o", "json"])
    ))
    .unwrap();
    assert_eq!(v["keys"], serde_json::json!([keys[0], keys[1]]));
    let everything = ok(&node.kvctl(&["list"]));
    assert_eq!(everything.lines().count(), 1107);
    assert_eq!(ok(&node.kvctl(&["list", "--prefix", "zzz"])), "");
}

#[test]
fn nodes_where_and_verify_on_one_node() {
    let node = Node::start();
    ok(&node.kvctl(&["put", "a", "1"]));
    let out = ok(&node.kvctl(&["nodes"]));
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].starts_with("cluster "), "{out}");
    let header = lines.iter().position(|l| l.starts_with("ORDINAL")).unwrap();
    let row: Vec<&str> = lines[header + 1].split_whitespace().collect();
    assert_eq!(row[0], "0");
    assert_eq!(row[2], "Up", "{out}");
    let v: serde_json::Value =
        serde_json::from_str(&ok(&node.kvctl(&["nodes", "-o", "json"]))).unwrap();
    assert_eq!(v["nodes"][0]["ordinal"], 0);
    assert_eq!(v["nodes"][0]["reachable"], true);

    let v: serde_json::Value =
        serde_json::from_str(&ok(&node.kvctl(&["where", "a", "-o", "json"]))).unwrap();
    assert_eq!(v["owners"][0]["ordinal"], 0);
    assert!(v["bucket"].as_u64().unwrap() < 4096);

    let out = ok(&node.kvctl(&["verify"]));
    assert!(out.contains("0 differ"), "{out}");
    let v: serde_json::Value =
        serde_json::from_str(&ok(&node.kvctl(&["verify", "-o", "json"]))).unwrap();
    assert_eq!(v["consistent"], true);
}

#[test]
fn control_routes_on_a_node_report_the_servers_message() {
    let node = Node::start();
    // A node answers 501: the control plane (gateway) serves these.
    for args in [
        &["fail", "1"][..],
        &["recover", "1"],
        &[
            "strategy",
            "consistent-hashing",
            "--replication-factor",
            "2",
        ],
    ] {
        let o = node.kvctl(args);
        let e = fails(&o, 1);
        assert!(!e.contains("{\""), "{e}");
    }
}

#[test]
fn errors_are_one_line_with_the_right_exit_code() {
    let node = Node::start();
    // Wrong token: the server's message.
    let o = run_kvctl(
        &[
            "get",
            "k",
            "--endpoint",
            &node.endpoint(),
            "--token",
            "wrong",
        ],
        &[],
        None,
    );
    let e = fails(&o, 1);
    assert!(!e.contains("{\""), "{e}");
    // Missing token too.
    fails(
        &run_kvctl(&["get", "k", "--endpoint", &node.endpoint()], &[], None),
        1,
    );
    // Nobody listening.
    let port = common::free_port();
    let e = fails(
        &run_kvctl(
            &["get", "k", "--endpoint", &format!("127.0.0.1:{port}")],
            &[],
            None,
        ),
        1,
    );
    assert!(e.contains("cannot reach"), "{e}");
    // Usage errors exit 2.
    assert_eq!(run_kvctl(&["get"], &[], None).status.code(), Some(2));
    assert_eq!(run_kvctl(&["frobnicate"], &[], None).status.code(), Some(2));
    fails(&node.kvctl(&["get", ""]), 2);
    fails(&node.kvctl(&["put", &"k".repeat(1025), "v"]), 2);
    fails(&node.kvctl(&["--endpoint", "ftp://x:1", "get", "k"]), 2);
    // Oversized value: the server's 413 message.
    let big = vec![b'x'; 1024 * 1024 + 1];
    fails(&node.kvctl_stdin(&["put", "big", "-"], Some(&big)), 1);
    assert!(run_kvctl(&["--help"], &[], None).status.success());
}

#[test]
fn bench_drives_a_kv_node_from_the_command_line() {
    let node = Node::start();
    let o = node.kvctl(&[
        "bench",
        "--ops",
        "300",
        "--warmup",
        "0s",
        "--connections",
        "4",
        "--keys",
        "50",
        "--prefill",
        "--read-ratio",
        "0.5",
        "--distribution",
        "zipfian",
    ]);
    let out = ok(&o);
    assert!(out.contains("ops        300 ("), "{out}");
    assert!(out.contains("errors     0"), "{out}");
    assert!(out.contains("prefill    50 keys"), "{out}");
    // Progress lines go to stderr, not stdout.
    assert!(!out.contains("ops/s, "), "{out}");
}
