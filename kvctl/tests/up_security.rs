//! What `kvctl up` keeps to itself and refuses: its state file is readable by
//! its owner only, its gateway refuses requests a node refuses (targets
//! that are not paths, transfer codings we do not decode, almost-right
//! tokens), sent as raw bytes over TCP, and with `--tls` everything is served
//! over TLS from a CA of its own that kvctl must be told to trust.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{free_port, kvctl_bin, run_kvctl, stderr, stdout, wait_port};
use kv_testkit::{error_code, raw_exchange};

const TOKEN: &str = "up-security-token";

/// A running `kvctl up` of one node: SIGTERM on drop, then SIGKILL.
struct Up {
    child: Child,
    port: u16,
    dir: std::path::PathBuf,
    said: tempfile::NamedTempFile,
}

impl Up {
    fn start(dir: &Path, extra: &[&str]) -> Up {
        Up::start_with_token(dir, extra, Some(TOKEN))
    }

    /// `token`: `kvctl up --token`; `None` keeps the data directory's.
    fn start_with_token(dir: &Path, extra: &[&str], token: Option<&str>) -> Up {
        let port = free_port();
        // What kvctl up says (node transitions, starts and exits), for a
        // failing test to show; outside the data directory, as it names the
        // token.
        let said = tempfile::NamedTempFile::new().expect("kvctl up's output file");
        let out = said.reopen().expect("kvctl up's output file");
        let child = Command::new(kvctl_bin())
            .arg("up")
            .arg("--data-dir")
            .arg(dir)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(token.map(|t| vec!["--token", t]).unwrap_or_default())
            .args(match extra.contains(&"--nodes") {
                true => &[][..],
                false => &["--nodes", "1"][..],
            })
            .args(extra)
            .env_remove("KV_ENDPOINT")
            .env_remove("KV_TOKEN")
            .env_remove("KV_DATA_DIR")
            .env_remove("KV_LISTEN")
            .env_remove("KV_NODE_BIN")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(Stdio::inherit())
            .spawn()
            .expect("cannot run kvctl up");
        let up = Up {
            child,
            port,
            dir: dir.to_path_buf(),
            said,
        };
        assert!(
            wait_port(port, Duration::from_secs(30)),
            "the gateway never listened on {port}\n{}",
            up.diagnostics()
        );
        up
    }

    /// What this `kvctl up` said and the nodes' logs, for a failure message.
    fn diagnostics(&self) -> String {
        let mut files = vec![("kvctl up".to_string(), self.said.path().to_path_buf())];
        let mut logs: Vec<_> = std::fs::read_dir(&self.dir)
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        logs.retain(|p| p.extension().is_some_and(|e| e == "log"));
        logs.sort();
        files.extend(logs.into_iter().map(|p| (p.display().to_string(), p)));
        let mut text = String::new();
        for (name, path) in files {
            let body = std::fs::read_to_string(&path).unwrap_or_default();
            let tail: Vec<&str> = body.lines().rev().take(40).collect();
            text.push_str(&format!("--- {name} (last 40 lines)\n"));
            for line in tail.into_iter().rev() {
                text.push_str(line);
                text.push('\n');
            }
        }
        text
    }

    fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Waits (bounded) until a write at All goes through: every node is Up.
    fn wait_all_up(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        let raw = format!(
            "PUT /v1/kv/ready HTTP/1.1\r\nHost: kv\r\nAuthorization: Bearer {TOKEN}\r\nX-Consistency: all\r\nContent-Length: 1\r\nConnection: close\r\n\r\nx"
        );
        while raw_exchange(&self.address(), raw.as_bytes()).0 != 200 {
            assert!(
                Instant::now() < deadline,
                "the nodes never were all Up\n{}",
                self.diagnostics()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits (bounded) until the gateway has a node to route to.
    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            let raw = b"GET /readyz HTTP/1.1\r\nHost: kv\r\nConnection: close\r\n\r\n";
            if raw_exchange(&self.address(), raw).0 == 200 {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("kvctl up never became ready\n{}", self.diagnostics());
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

#[test]
fn the_token_files_are_readable_by_their_owner_only_and_no_other_file_holds_a_token() {
    let dir = tempfile::tempdir().expect("a scratch directory");
    let state = dir.path().join("cluster.json");
    let (client, cluster) = (dir.path().join("token"), dir.path().join("cluster-token"));
    {
        let up = Up::start(dir.path(), &[]);
        // Ready before it is stopped: a SIGTERM before kvctl up handles it
        // would leave its node running, holding the port.
        up.wait_ready();
        let text = std::fs::read_to_string(&client).expect("the client token file");
        assert_eq!(text.trim(), TOKEN, "the token file holds the client token");
        for f in [&state, &client, &cluster] {
            assert_eq!(mode(f), 0o600, "a new {}", f.display());
        }
    }
    // Files an older kvctl left world-readable are tightened on start; an
    // older cluster.json's tokens move to the token files.
    use std::os::unix::fs::PermissionsExt;
    let cluster_token = std::fs::read_to_string(&cluster).expect("cluster token");
    let mut old: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&state).expect("state")).expect("JSON");
    old["token"] = TOKEN.into();
    old["clusterToken"] = cluster_token.trim().into();
    std::fs::write(&state, old.to_string()).expect("an older cluster.json");
    std::fs::remove_file(&client).expect("rm token");
    std::fs::remove_file(&cluster).expect("rm cluster-token");
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let up = Up::start_with_token(dir.path(), &[], None);
    up.wait_ready();
    assert_eq!(mode(&state), 0o600, "cluster.json after a restart");
    assert_eq!(
        std::fs::read_to_string(&client).expect("token").trim(),
        TOKEN,
        "the client token kept from the older cluster.json"
    );
    assert_eq!(
        std::fs::read_to_string(&cluster).expect("cluster-token"),
        cluster_token,
        "the cluster token kept from the older cluster.json"
    );
    assert_eq!(
        call(&up.address(), "GET", "/v1/kv/absent", "").0,
        404,
        "the kept token works"
    );
    // No other file of the data directory holds a token.
    for entry in walk(dir.path()) {
        if entry == client || entry == cluster || entry.extension().is_some_and(|e| e == "tmp") {
            continue;
        }
        let Ok(bytes) = std::fs::read(&entry) else {
            continue;
        };
        let hay = String::from_utf8_lossy(&bytes);
        for t in [TOKEN, cluster_token.trim()] {
            assert!(!hay.contains(t), "{} holds a token", entry.display());
        }
    }
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                todo.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

#[test]
fn the_gateway_refuses_what_a_node_refuses() {
    let dir = tempfile::tempdir().expect("a scratch directory");
    let up = Up::start(dir.path(), &[]);
    up.wait_ready();
    let gw = up.address();

    let raw =
        format!("GET 127.0.0.1:80 HTTP/1.1\r\nHost: kv\r\nAuthorization: Bearer {TOKEN}\r\n\r\n");
    let (status, body) = raw_exchange(&gw, raw.as_bytes());
    assert_eq!(status, 400, "an authority-form target");
    assert_eq!(error_code(&body), "bad_request");

    let raw = format!(
        "PUT /v1/kv/gz HTTP/1.1\r\nHost: kv\r\nAuthorization: Bearer {TOKEN}\r\nTransfer-Encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    );
    let (status, body) = raw_exchange(&gw, raw.as_bytes());
    assert_eq!(status, 501, "gzip, chunked");
    assert_eq!(error_code(&body), "not_implemented");
    let get = |token: &str| {
        let raw = format!(
            "GET /v1/kv/gz HTTP/1.1\r\nHost: kv\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
        );
        raw_exchange(&gw, raw.as_bytes())
    };
    assert_eq!(get(TOKEN).0, 404, "nothing was stored");

    let mut almost = TOKEN.as_bytes().to_vec();
    almost[0] ^= 1;
    let almost = String::from_utf8(almost).expect("ASCII");
    let (status, body) = get(&almost);
    assert_eq!(status, 403, "a token of the right length, one byte off");
    assert_eq!(error_code(&body), "forbidden");
}

#[test]
fn with_tls_the_gateway_serves_https_and_kvctl_needs_the_ca() {
    let dir = tempfile::tempdir().expect("a scratch directory");
    let ca_file = dir.path().join("tls").join("ca.crt");
    let first_ca;
    {
        let up = Up::start(dir.path(), &["--tls"]);
        let pem = std::fs::read(&ca_file).expect("kvctl up --tls wrote its CA");
        first_ca = pem.clone();
        let https = reqwest::blocking::Client::builder()
            .tls_certs_only([reqwest::Certificate::from_pem(&pem).expect("PEM")])
            .timeout(Duration::from_secs(10))
            .build()
            .expect("a client");
        let ready = format!("https://{}/readyz", up.address());
        let deadline = Instant::now() + Duration::from_secs(60);
        while https.get(&ready).send().map_or(true, |r| r.status() != 200) {
            assert!(
                Instant::now() < deadline,
                "the TLS gateway never became ready\n{}",
                up.diagnostics()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let endpoint = format!("https://{}", up.address());
        let ca = ca_file.display().to_string();
        let kvctl = |extra: &[&str]| {
            let mut args = vec!["--endpoint", &endpoint, "--token", TOKEN];
            args.extend_from_slice(extra);
            run_kvctl(&args, &[], None)
        };
        // The write goes gateway -> node -> its peers, all over TLS.
        let put = kvctl(&["--cacert", &ca, "put", "k", "v"]);
        assert!(put.status.success(), "{}", stderr(&put));
        let get = kvctl(&["--cacert", &ca, "get", "k"]);
        assert!(get.status.success(), "{}", stderr(&get));
        assert_eq!(stdout(&get).trim(), "v");
        let env = run_kvctl(
            &["--endpoint", &endpoint, "--token", TOKEN, "get", "k"],
            &[("KV_CACERT", ca.as_str())],
            None,
        );
        assert!(env.status.success(), "KV_CACERT: {}", stderr(&env));

        let untrusted = kvctl(&["get", "k"]);
        assert_eq!(untrusted.status.code(), Some(1), "without --cacert");
        assert!(
            stderr(&untrusted).to_lowercase().contains("certificate"),
            "{}",
            stderr(&untrusted)
        );
        let insecure = kvctl(&["--insecure", "get", "k"]);
        assert!(
            insecure.status.success(),
            "--insecure: {}",
            stderr(&insecure)
        );
        // The load generator trusts the CA the same way (issue 18: bench over TLS).
        let bench = |extra: &[&str]| {
            let mut args = extra.to_vec();
            args.extend_from_slice(&[
                "-o",
                "json",
                "bench",
                "--ops",
                "200",
                "--connections",
                "2",
                "--keys",
                "50",
                "--warmup",
                "0s",
            ]);
            kvctl(&args)
        };
        let trusted = bench(&["--cacert", &ca]);
        assert!(
            trusted.status.success(),
            "bench over TLS: {}",
            stderr(&trusted)
        );
        let report: serde_json::Value =
            serde_json::from_str(&stdout(&trusted)).expect("a JSON bench report");
        assert_eq!(report["ops"], 200, "{report}");
        assert_eq!(report["errors"], 0, "{report}");
        let refused = bench(&[]);
        assert!(!refused.status.success(), "bench without the CA succeeded");
        assert!(
            stderr(&refused).to_lowercase().contains("certificate"),
            "{}",
            stderr(&refused)
        );
        let plain = run_kvctl(
            &[
                "--endpoint",
                &format!("http://{}", up.address()),
                "--token",
                TOKEN,
                "get",
                "k",
            ],
            &[],
            None,
        );
        assert!(!plain.status.success(), "plaintext to the TLS gateway");

        for key in ["ca.key", "platform.key", "node-0.key"] {
            assert_eq!(mode(&dir.path().join("tls").join(key)), 0o600, "{key}");
        }
    }
    // A restart keeps the CA, so clients keep trusting it, and the data.
    let up = Up::start(dir.path(), &["--tls"]);
    assert_eq!(std::fs::read(&ca_file).expect("CA"), first_ca);
    let endpoint = format!("https://{}", up.address());
    let ca = ca_file.display().to_string();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let get = run_kvctl(
            &[
                "--endpoint",
                &endpoint,
                "--token",
                TOKEN,
                "--cacert",
                &ca,
                "get",
                "k",
            ],
            &[],
            None,
        );
        if get.status.success() {
            assert_eq!(stdout(&get).trim(), "v");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "after a restart: {}\n{}",
            stderr(&get),
            up.diagnostics()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A request through raw TCP with the client token; answers (status, body).
fn call(address: &str, method: &str, path: &str, body: &str) -> (u16, Vec<u8>) {
    let raw = format!(
        "{method} {path} HTTP/1.1\r\nHost: kv\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    raw_exchange(address, raw.as_bytes())
}

#[test]
fn metrics_of_the_gateway_and_of_every_node_reveal_no_key_names_or_values() {
    let dir = tempfile::tempdir().expect("a scratch directory");
    let up = Up::start(dir.path(), &["--nodes", "2"]);
    up.wait_ready();
    up.wait_all_up();
    let gw = up.address();
    // Names and values no metric could hold by chance, through every kind of
    // route: writes, reads (found and absent), deletes, lists, placement,
    // the classic routes, create-only writes and a refused oversized key.
    let (name, value) = ("secretkeyname7c1f", "secretvalue93ab");
    for i in 0..5 {
        let (s, _) = call(
            &gw,
            "PUT",
            &format!("/v1/kv/{name}{i}"),
            &format!("{value}{i}"),
        );
        assert_eq!(s, 200, "PUT {name}{i}");
        assert_eq!(call(&gw, "GET", &format!("/v1/kv/{name}{i}"), "").0, 200);
    }
    assert_eq!(call(&gw, "GET", &format!("/v1/kv/{name}absent"), "").0, 404);
    assert_eq!(call(&gw, "DELETE", &format!("/v1/kv/{name}0"), "").0, 200);
    assert_eq!(
        call(&gw, "GET", &format!("/v1/kv?prefix={name}"), "").0,
        200
    );
    assert_eq!(
        call(&gw, "GET", &format!("/v1/placement/{name}1"), "").0,
        200
    );
    let classic = format!(r#"{{"key":"{name}classic","value":"{value}classic"}}"#);
    assert_eq!(call(&gw, "POST", "/write", &classic).0, 200);
    assert_eq!(call(&gw, "GET", &format!("/read/{name}classic"), "").0, 200);
    assert_eq!(
        call(&gw, "GET", &format!("/nodes_for_key/{name}1"), "").0,
        200
    );
    let raw = format!(
        "PUT /v1/kv/{name}1 HTTP/1.1\r\nHost: kv\r\nAuthorization: Bearer {TOKEN}\r\nIf-None-Match: *\r\nContent-Length: 1\r\nConnection: close\r\n\r\nx"
    );
    assert_eq!(
        raw_exchange(&gw, raw.as_bytes()).0,
        412,
        "a create over a value"
    );

    // Every node's client port, from the ports kvctl up gave them.
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("cluster.json")).expect("state"))
            .expect("cluster.json is JSON");
    let ports = state["ports"].as_object().expect("ports in cluster.json");
    assert_eq!(ports.len(), 2, "{state}");
    let mut scraped = vec![("gateway".to_string(), gw.clone())];
    for (ordinal, pair) in ports {
        let port = pair[0].as_u64().expect("a client port");
        scraped.push((format!("node {ordinal}"), format!("127.0.0.1:{port}")));
    }
    for (who, address) in scraped {
        let raw = b"GET /metrics HTTP/1.1\r\nHost: kv\r\nConnection: close\r\n\r\n";
        let (status, body) = raw_exchange(&address, raw);
        assert_eq!(status, 200, "{who} /metrics");
        let text = String::from_utf8_lossy(&body);
        assert!(text.contains("# TYPE"), "{who} serves metrics:\n{text}");
        for secret in [name, value, TOKEN] {
            assert!(
                !text.contains(secret),
                "{who}'s /metrics reveals {secret}:\n{text}"
            );
        }
    }
}

/// Sends `raw` with `token` in place of `{token}` to `address`; the status.
fn status_with(address: &str, raw: &str, token: &str) -> u16 {
    raw_exchange(address, raw.replace("{token}", token).as_bytes()).0
}

/// The first line of a token file: the token to send.
fn first_token(path: &Path) -> String {
    let text = std::fs::read_to_string(path).expect("a token file");
    text.lines().next().unwrap_or_default().trim().to_string()
}

#[test]
fn tokens_rotate_under_load_with_no_failed_request_and_the_old_ones_are_refused_after() {
    let dir = tempfile::tempdir().expect("a scratch directory");
    let up = Up::start(dir.path(), &["--nodes", "2"]);
    up.wait_ready();
    up.wait_all_up();
    let gw = up.address();
    let client_file = dir.path().join("token");
    let cluster_file = dir.path().join("cluster-token");
    let old_cluster = first_token(&cluster_file);

    // A client that reads its token from the file before each request (as
    // a pod reading its mounted Secret does), writing at All through the
    // gateway so that every write also crosses the peer link.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let (stop, gw, file) = (stop.clone(), gw.clone(), client_file.clone());
        std::thread::spawn(move || {
            let (mut ok, mut failed) = (0u32, Vec::new());
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                i += 1;
                let token = first_token(&file);
                let raw = format!(
                    "PUT /v1/kv/load{} HTTP/1.1\r\nHost: kv\r\nAuthorization: Bearer {token}\r\nX-Consistency: all\r\nContent-Length: 1\r\nConnection: close\r\n\r\nv",
                    i % 50
                );
                match raw_exchange(&gw, raw.as_bytes()) {
                    (200, _) => ok += 1,
                    (s, body) => failed.push((i, s, String::from_utf8_lossy(&body).to_string())),
                }
            }
            (ok, failed)
        })
    };
    std::thread::sleep(Duration::from_millis(500));

    let endpoint = format!("http://{gw}");
    let rotate = |which: &str| {
        let started = Instant::now();
        let out = run_kvctl(
            &[
                "--endpoint",
                &endpoint,
                "--token",
                TOKEN,
                "-o",
                "json",
                "rotate-token",
                which,
            ],
            &[],
            None,
        );
        assert!(
            out.status.success(),
            "rotate-token {which}: {}",
            stderr(&out)
        );
        let v: serde_json::Value = serde_json::from_str(&stdout(&out)).expect("JSON answer");
        eprintln!(
            "rotate-token {which}: {:.1} s: {v}",
            started.elapsed().as_secs_f64()
        );
        v
    };
    let cluster = rotate("cluster");
    assert!(
        cluster.get("token").is_none(),
        "the cluster token is never answered"
    );
    let new_cluster = first_token(&cluster_file);
    assert_ne!(new_cluster, old_cluster);
    assert_eq!(
        std::fs::read_to_string(&cluster_file).expect("file").trim(),
        new_cluster,
        "the file ends with the new token alone"
    );
    let client = rotate("client");
    let new_client = client["token"]
        .as_str()
        .expect("the new client token")
        .to_string();
    assert_eq!(first_token(&client_file), new_client);
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, failed) = load.join().expect("the load thread");
    eprintln!(
        "{ok} writes at All during two rotations, {} failed",
        failed.len()
    );
    assert!(
        failed.is_empty(),
        "failed requests during the rotations: {failed:?}"
    );
    assert!(ok >= 20, "too few writes to show anything: {ok}");

    // The old tokens are refused everywhere, the new ones accepted.
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("cluster.json")).expect("state"))
            .expect("JSON");
    let get = "GET /v1/kv/load1 HTTP/1.1\r\nHost: kv\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n";
    let peer = "GET /internal/v1/topology HTTP/1.1\r\nHost: kv\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n";
    assert_eq!(
        status_with(&gw, get, TOKEN),
        403,
        "the gateway, old client token"
    );
    assert_eq!(
        status_with(&gw, get, &new_client),
        200,
        "the gateway, new client token"
    );
    for (ordinal, pair) in state["ports"].as_object().expect("ports") {
        let node = format!("127.0.0.1:{}", pair[0].as_u64().expect("client port"));
        let peer_port = format!("127.0.0.1:{}", pair[1].as_u64().expect("peer port"));
        assert_eq!(
            status_with(&node, get, TOKEN),
            403,
            "node {ordinal}, old client token"
        );
        assert_eq!(
            status_with(&node, get, &new_client),
            200,
            "node {ordinal}, new client token"
        );
        assert_eq!(
            status_with(&peer_port, peer, &old_cluster),
            403,
            "node {ordinal}, old cluster token"
        );
        assert_eq!(
            status_with(&peer_port, peer, &new_cluster),
            200,
            "node {ordinal}, new cluster token"
        );
        // What the node reports: fingerprints, never the tokens.
        let cluster_raw = "GET /v1/cluster HTTP/1.1\r\nHost: kv\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n";
        let (s, body) = raw_exchange(
            &node,
            cluster_raw.replace("{token}", &new_client).as_bytes(),
        );
        assert_eq!(s, 200);
        let report = String::from_utf8_lossy(&body);
        assert!(
            !report.contains(&new_client) && !report.contains(&new_cluster),
            "{report}"
        );
        let v: serde_json::Value = serde_json::from_slice(&body).expect("a report");
        assert_eq!(
            v["tokens"]["client"],
            serde_json::json!([client["fingerprint"]]),
            "{v}"
        );
        assert_eq!(
            v["tokens"]["cluster"],
            serde_json::json!([cluster["fingerprint"]]),
            "{v}"
        );
    }
}
