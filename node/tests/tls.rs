//! Nodes serving TLS (`--tls-cert`, `--tls-key`, `--tls-cluster-ca`), with
//! real handshakes on loopback: clients must trust the cluster CA, peers must
//! present a certificate it issued (mutual TLS, on top of the cluster token),
//! and two TLS nodes replicate to each other.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{CLUSTER_TOKEN, KV_NODE, NodeProc, TOKEN, eventually, topology, write_topology};
use kv_core::{Consistency, NodeState, Strategy};
use kv_net::pki::{Ca, write_private};

struct Pki {
    dir: tempfile::TempDir,
    ca: Ca,
    ca_file: PathBuf,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().expect("a scratch directory");
        let ca = Ca::generate("kvstore test cluster CA").expect("CA");
        let ca_file = dir.path().join("ca.crt");
        std::fs::write(&ca_file, ca.cert_pem()).expect("write");
        Pki { dir, ca, ca_file }
    }

    fn issue(&self, name: &str) -> (PathBuf, PathBuf) {
        issue(&self.ca, self.dir.path(), name)
    }
}

fn issue(ca: &Ca, dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let (cert, key) = ca
        .issue(name, &["127.0.0.1", "localhost"])
        .expect("a certificate");
    let (c, k) = (
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.key")),
    );
    std::fs::write(&c, cert).expect("write");
    write_private(&k, key.as_bytes()).expect("write");
    (c, k)
}

fn tls_node(pki: &Pki, ordinal: u32, data: &Path, topo: Option<&Path>) -> NodeProc {
    let (cert, key) = pki.issue(&format!("node-{ordinal}"));
    let mut n = NodeProc::new(KV_NODE, ordinal, data, topo);
    n.extra = vec![
        "--tls-cert".into(),
        cert.display().to_string(),
        "--tls-key".into(),
        key.display().to_string(),
        "--tls-cluster-ca".into(),
        pki.ca_file.display().to_string(),
    ];
    n
}

/// A blocking client trusting `ca` only, presenting `id` when given.
fn client(ca: &Path, id: Option<(&Path, &Path)>) -> reqwest::blocking::Client {
    let id = id.map(|(c, k)| kv_net::tls::Identity::load(c, k).expect("identity"));
    reqwest::blocking::Client::builder()
        .tls_backend_preconfigured(kv_net::tls::client_config(ca, id).expect("client config"))
        .timeout(Duration::from_secs(10))
        .build()
        .expect("a client")
}

#[test]
fn two_tls_nodes_replicate_and_clients_without_the_ca_are_refused() {
    let pki = Pki::new();
    let data = tempfile::tempdir().expect("a scratch directory");
    let topo = data.path().join("topology.json");
    let mut nodes = Vec::new();
    for o in 0..2 {
        let dir = data.path().join(format!("node-{o}"));
        nodes.push(tls_node(&pki, o, &dir, Some(&topo)));
    }
    // Writes wait for both owners: a 200 means node 0 reached node 1 over
    // mutual TLS.
    let t = topology(
        1,
        &[(&nodes[0], NodeState::Up), (&nodes[1], NodeState::Up)],
        Strategy::Full,
        2,
        Consistency::All,
    );
    write_topology(&topo, &t);
    for n in &mut nodes {
        n.start();
    }
    let https = client(&pki.ca_file, None);
    for n in &nodes {
        let url = format!("https://{}/v1/cluster", n.address());
        eventually(
            &format!("node {} at epoch 1 over TLS", n.ordinal),
            Duration::from_secs(30),
            || {
                https
                    .get(&url)
                    .bearer_auth(TOKEN)
                    .send()
                    .ok()
                    .and_then(|r| r.json::<serde_json::Value>().ok())
                    .is_some_and(|v| v["topology"]["epoch"] == 1 && v["storeCatchingUp"] != true)
            },
        );
    }
    let put = https
        .put(format!("https://{}/v1/kv/secret", nodes[0].address()))
        .bearer_auth(TOKEN)
        .body("over tls")
        .send()
        .expect("a PUT over TLS");
    let status = put.status();
    assert_eq!(status, 200, "{}", put.text().unwrap_or_default());
    let got = https
        .get(format!("https://{}/v1/kv/secret", nodes[1].address()))
        .bearer_auth(TOKEN)
        .header("X-Consistency", "one")
        .send()
        .expect("a GET over TLS");
    assert_eq!(got.status(), 200);
    assert_eq!(got.text().expect("a body"), "over tls");

    let url = format!("https://{}/v1/kv/secret", nodes[0].address());
    let no_ca = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("a client");
    assert!(
        no_ca.get(&url).bearer_auth(TOKEN).send().is_err(),
        "a client that does not trust the cluster CA"
    );
    let plain = url.replace("https://", "http://");
    assert!(
        no_ca.get(&plain).bearer_auth(TOKEN).send().is_err(),
        "plaintext to a TLS port"
    );
}

#[test]
fn the_peer_port_refuses_a_peer_without_a_cluster_certificate_even_with_the_token() {
    let pki = Pki::new();
    let data = tempfile::tempdir().expect("a scratch directory");
    let mut n = tls_node(&pki, 0, data.path(), None);
    n.start();
    let url = format!("https://{}/internal/v1/digests", n.peer_address());
    let ask = |c: &reqwest::blocking::Client, token: &str| {
        c.get(&url)
            .bearer_auth(token)
            .send()
            .map(|r| r.status().as_u16())
            .map_err(|e| format!("{e:?}"))
    };
    let (peer_c, peer_k) = pki.issue("node-1");
    let peer = client(&pki.ca_file, Some((&peer_c, &peer_k)));
    assert_eq!(ask(&peer, CLUSTER_TOKEN), Ok(200), "a cluster peer");
    assert_eq!(
        ask(&peer, TOKEN),
        Ok(403),
        "a cluster peer with the client token"
    );

    let anonymous = client(&pki.ca_file, None);
    assert!(
        ask(&anonymous, CLUSTER_TOKEN).is_err(),
        "no client certificate, the right token"
    );
    let other = Ca::generate("kvstore test cluster CA").expect("CA");
    let other_dir = tempfile::tempdir().expect("a scratch directory");
    let (sc, sk) = issue(&other, other_dir.path(), "stranger");
    let stranger = client(&pki.ca_file, Some((&sc, &sk)));
    assert!(
        ask(&stranger, CLUSTER_TOKEN).is_err(),
        "a certificate of another CA, the right token"
    );
    // The client port does not ask for a client certificate.
    let on_client_port = anonymous
        .get(format!("https://{}/v1/kv/none", n.address()))
        .bearer_auth(TOKEN)
        .send()
        .map(|r| r.status().as_u16())
        .map_err(|e| format!("{e:?}"));
    assert_eq!(on_client_port, Ok(404));
}

#[test]
fn tls_flags_come_together_and_bad_files_stop_the_node() {
    let pki = Pki::new();
    let data = tempfile::tempdir().expect("a scratch directory");
    let (cert, key) = pki.issue("node-0");
    let run = |args: &[&str]| {
        std::process::Command::new(KV_NODE)
            .args(["--node-id", "0", "--token", TOKEN, "--cluster-token"])
            .arg(CLUSTER_TOKEN)
            .arg("--data-dir")
            .arg(data.path())
            .args(["--listen", "127.0.0.1:0", "--peer-listen", "127.0.0.1:0"])
            .args(args)
            .output()
            .expect("kv-node runs")
    };
    let cert = cert.display().to_string();
    let key = key.display().to_string();
    let out = run(&["--tls-cert", &cert, "--tls-key", &key]);
    assert!(
        !out.status.success(),
        "a certificate without the cluster CA"
    );
    let out = run(&[
        "--tls-cert",
        &cert,
        "--tls-key",
        &cert,
        "--tls-cluster-ca",
        &pki.ca_file.display().to_string(),
    ]);
    assert!(!out.status.success(), "a certificate as its own key");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("TLS"), "{stderr}");
}

/// A client trusting `ca` only, a new connection (handshake) per request,
/// with the server's certificate in each answer.
fn handshaking(ca: &Path) -> reqwest::blocking::Client {
    let pem = std::fs::read(ca).expect("CA file");
    reqwest::blocking::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(&pem).expect("PEM")])
        .pool_max_idle_per_host(0)
        .tls_info(true)
        .timeout(Duration::from_secs(10))
        .build()
        .expect("a client")
}

#[test]
fn a_nodes_certificate_rotated_on_disk_is_served_without_a_failed_write() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let pki = Pki::new();
    let data = tempfile::tempdir().expect("a scratch directory");
    let topo = data.path().join("topology.json");
    let mut nodes = Vec::new();
    for o in 0..2 {
        let dir = data.path().join(format!("node-{o}"));
        nodes.push(tls_node(&pki, o, &dir, Some(&topo)));
    }
    let t = topology(
        1,
        &[(&nodes[0], NodeState::Up), (&nodes[1], NodeState::Up)],
        Strategy::Full,
        2,
        Consistency::All,
    );
    write_topology(&topo, &t);
    for n in &mut nodes {
        n.start();
    }
    let https = client(&pki.ca_file, None);
    let node0 = nodes[0].address();
    eventually(
        "node 0 takes writes at All",
        Duration::from_secs(30),
        || {
            https
                .put(format!("https://{node0}/v1/kv/first"))
                .bearer_auth(TOKEN)
                .body("x")
                .send()
                .is_ok_and(|r| r.status() == 200)
        },
    );
    // Writes through node 0 at All, each on a new connection: node 0 serves
    // its certificate and presents it to node 1 while both are replaced.
    let (ok, failed, stop) = (
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicBool::new(false)),
    );
    let load = {
        let (ok, failed, stop) = (ok.clone(), failed.clone(), stop.clone());
        let (c, addr) = (handshaking(&pki.ca_file), node0.clone());
        std::thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let r = c
                    .put(format!("https://{addr}/v1/kv/load-{i}"))
                    .bearer_auth(TOKEN)
                    .body("v")
                    .send();
                match r {
                    Ok(r) if r.status() == 200 => ok.fetch_add(1, Ordering::Relaxed),
                    other => {
                        eprintln!("failed write: {other:?}");
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
            }
        })
    };
    let (cert, key) = (
        pki.dir.path().join("node-0.crt"),
        pki.dir.path().join("node-0.key"),
    );
    let probe = handshaking(&pki.ca_file);
    for round in 0..3 {
        let before = ok.load(Ordering::Relaxed);
        let (new_cert, new_key) = pki
            .ca
            .issue(&format!("node-0-{round}"), &["127.0.0.1", "localhost"])
            .expect("a certificate");
        write_private(&key, new_key.as_bytes()).expect("write");
        std::fs::write(&cert, &new_cert).expect("write");
        let want = kv_net::tls::read_certs(&cert).expect("PEM");
        eventually(
            &format!("round {round}: node 0 serves its new certificate"),
            Duration::from_secs(15),
            || {
                probe
                    .get(format!("https://{node0}/healthz"))
                    .send()
                    .ok()
                    .and_then(|r| {
                        r.extensions()
                            .get::<reqwest::tls::TlsInfo>()
                            .and_then(|i| i.peer_certificate().map(<[u8]>::to_vec))
                    })
                    .is_some_and(|served| served == want[0].as_ref())
            },
        );
        eventually(
            &format!("round {round}: writes go on"),
            Duration::from_secs(15),
            || ok.load(Ordering::Relaxed) >= before + 5,
        );
    }
    stop.store(true, Ordering::Relaxed);
    load.join().expect("the load thread");
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    eprintln!("{ok} writes across 3 rotations of node 0's certificate, {failed} failed");
    assert_eq!(failed, 0, "{failed} of {} writes failed", ok + failed);
}

#[test]
fn a_held_down_tls_node_answers_held_down_over_tls() {
    // A node the control plane holds down keeps its client port's protocol:
    // probes and clients speak TLS to it before and after the hold.
    let pki = Pki::new();
    let data = tempfile::tempdir().expect("a scratch directory");
    let held = data.path().join("held-down");
    std::fs::write(&held, "0\n").expect("write");
    let mut n = tls_node(&pki, 0, &data.path().join("node-0"), None);
    n.extra
        .extend(["--held-file".into(), held.display().to_string()]);
    n.start();
    let c = client(&pki.ca_file, None);
    let base = format!("https://{}", n.address());
    let health = c
        .get(format!("{base}/healthz"))
        .send()
        .expect("a TLS answer while held");
    assert_eq!(health.status(), 200);
    let report = c
        .get(format!("{base}/v1/cluster"))
        .bearer_auth(TOKEN)
        .send()
        .expect("a TLS answer while held");
    assert_eq!(report.status(), 503);
    let body: serde_json::Value = report.json().expect("json");
    assert_eq!(body["error"], "held_down");
    std::fs::write(&held, "").expect("write");
    eventually(
        "the released node serves over TLS",
        Duration::from_secs(15),
        || {
            c.get(format!("{base}/v1/cluster"))
                .bearer_auth(TOKEN)
                .send()
                .is_ok_and(|r| r.status() == 200)
        },
    );
    assert!(n.terminate().is_some_and(|s| s.success()));
}
