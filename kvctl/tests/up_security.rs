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
}

impl Up {
    fn start(dir: &Path, extra: &[&str]) -> Up {
        let port = free_port();
        let child = Command::new(kvctl_bin())
            .arg("up")
            .arg("--data-dir")
            .arg(dir)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--token", TOKEN, "--nodes", "1"])
            .args(extra)
            .env_remove("KV_ENDPOINT")
            .env_remove("KV_TOKEN")
            .env_remove("KV_DATA_DIR")
            .env_remove("KV_LISTEN")
            .env_remove("KV_NODE_BIN")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("cannot run kvctl up");
        let up = Up { child, port };
        assert!(
            wait_port(port, Duration::from_secs(30)),
            "the gateway never listened on {port}"
        );
        up
    }

    fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
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
        panic!("kvctl up never became ready");
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
fn the_state_file_holding_the_tokens_is_readable_by_its_owner_only() {
    let dir = tempfile::tempdir().expect("a scratch directory");
    let state = dir.path().join("cluster.json");
    {
        let _up = Up::start(dir.path(), &[]);
        let text = std::fs::read_to_string(&state).expect("cluster.json");
        assert!(text.contains(TOKEN), "cluster.json holds the client token");
        assert_eq!(mode(&state), 0o600, "a new cluster.json");
    }
    // A state file an older kvctl left world-readable is tightened on start.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let _up = Up::start(dir.path(), &[]);
    assert_eq!(mode(&state), 0o600, "cluster.json after a restart");
    // No other file of the data directory holds a token.
    for entry in walk(dir.path()) {
        if entry == state || entry.extension().is_some_and(|e| e == "tmp") {
            continue;
        }
        let Ok(bytes) = std::fs::read(&entry) else {
            continue;
        };
        let hay = String::from_utf8_lossy(&bytes);
        assert!(!hay.contains(TOKEN), "{} holds the token", entry.display());
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
                "the TLS gateway never became ready"
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
            "after a restart: {}",
            stderr(&get)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}
