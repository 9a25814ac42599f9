//! One node per data directory: a second kv-node process started on the data
//! directory of a running node is refused with an error that says so, and the
//! running node keeps serving; once it stops, the directory opens again.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{CLUSTER_TOKEN, NodeProc, TOKEN, free_port};

#[test]
fn a_second_node_on_a_running_nodes_data_directory_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let mut first = NodeProc::new(common::KV_NODE, 0, &data, None);
    first.start();
    let c = first.client();
    assert_eq!(c.put("k", b"v1", None).expect("put").status, 200);

    let mut second = Command::new(common::KV_NODE)
        .args(["--listen", &format!("127.0.0.1:{}", free_port())])
        .args(["--peer-listen", &format!("127.0.0.1:{}", free_port())])
        .args(["--data-dir", data.to_str().expect("utf-8 path")])
        .args([
            "--node-id",
            "0",
            "--token",
            TOKEN,
            "--cluster-token",
            CLUSTER_TOKEN,
        ])
        .env("RUST_LOG", "warn")
        .env_remove("RUST_BACKTRACE")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the second kv-node");
    // SQLite's busy timeout (5 s) passes before the open gives up
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = second.try_wait().expect("wait") {
            break s;
        }
        if Instant::now() > deadline {
            let _ = second.kill();
            panic!("a second node on the same data directory kept running");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(
        &mut second.stderr.take().expect("stderr piped"),
        &mut stderr,
    )
    .expect("read stderr");
    assert!(!status.success(), "the second node exited with {status}");
    assert!(
        stderr.contains("in use by another process"),
        "the second node did not say why it stopped: {stderr}"
    );

    // The first node still serves what it acknowledged, and takes writes.
    let g = c.get("k", None).expect("get");
    assert_eq!((g.status, g.body.as_slice()), (200, &b"v1"[..]));
    assert_eq!(c.put("k", b"v2", None).expect("put").status, 200);

    // Stopped, it lets the directory go: a node started on it has the data.
    assert!(
        first.terminate().is_some_and(|s| s.success()),
        "unclean exit"
    );
    let mut third = NodeProc::new(common::KV_NODE, 0, &data, None);
    third.start();
    let g = third.client().get("k", None).expect("get");
    assert_eq!((g.status, g.body.as_slice()), (200, &b"v2"[..]));
}
