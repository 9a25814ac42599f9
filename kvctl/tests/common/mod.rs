//! Helpers shared by the integration tests: the kvctl binary, a real kv-node
//! process, and real redis-server / etcd processes when they are installed.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub const TOKEN: &str = "test-token";
pub const CLUSTER_TOKEN: &str = "test-cluster-token";

pub fn kvctl_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_kvctl"))
}

pub use kv_testkit::free_port;

/// Finds `kv-node` beside the kvctl binary (`target/<profile>/kv-node`),
/// building it with cargo when it is missing. Panics with a clear message
/// when the node crate has no `kv-node` binary to build.
pub fn kv_node_bin() -> PathBuf {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let r = BIN.get_or_init(|| {
        let kvctl = kvctl_bin();
        let dir = kvctl.parent().unwrap().to_path_buf();
        let bin = dir.join(format!("kv-node{}", std::env::consts::EXE_SUFFIX));
        // Always ask cargo: it is a no-op when kv-node is up to date, and
        // rebuilds it when node/ changed since.
        let profile_dir = dir.file_name().unwrap().to_string_lossy().to_string();
        let target_dir = dir.parent().unwrap().to_path_buf();
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
        let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        cmd.args([
            "build",
            "-p",
            "kv-node",
            "--bin",
            "kv-node",
            "--manifest-path",
        ])
        .arg(&manifest)
        .env("CARGO_TARGET_DIR", &target_dir);
        if profile_dir == "release" {
            cmd.arg("--release");
        }
        let out = cmd.output().map_err(|e| format!("cannot run cargo: {e}"))?;
        if !out.status.success() && !bin.exists() {
            return Err(format!(
                "kv-node is not built at {} and `cargo build -p kv-node --bin kv-node` failed:\n{}",
                bin.display(),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        if !bin.exists() {
            return Err(format!(
                "cargo built kv-node but {} is missing",
                bin.display()
            ));
        }
        Ok(bin)
    });
    match r {
        Ok(p) => p.clone(),
        Err(e) => panic!("FAIL: these tests need the kv-node binary. {e}"),
    }
}

/// A running kv-node on loopback with this file's tokens (the test kit's
/// [`kv_testkit::NodeProc`]), killed on drop.
pub struct Node {
    pub proc: kv_testkit::NodeProc,
    pub port: u16,
    pub peer_port: u16,
    pub dir: tempfile::TempDir,
}

impl Node {
    pub fn start() -> Node {
        let bin = kv_node_bin();
        let mut last_error = String::new();
        for _attempt in 0..3 {
            let dir = tempfile::tempdir().unwrap();
            let mut proc = kv_testkit::NodeProc::new(&bin, 0, &dir.path().join("data"), None);
            proc.token = TOKEN.into();
            proc.cluster_token = CLUSTER_TOKEN.into();
            match proc.try_start() {
                Ok(()) => {
                    let (port, peer_port) = (proc.port, proc.peer_port);
                    return Node {
                        proc,
                        port,
                        peer_port,
                        dir,
                    };
                }
                Err(e) => {
                    eprintln!("{e} on port {}; retrying", proc.port);
                    last_error = e;
                }
            }
        }
        panic!("kv-node never answered GET /healthz: {last_error}");
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Runs kvctl against this node with the right token.
    pub fn kvctl(&self, args: &[&str]) -> Output {
        self.kvctl_stdin(args, None)
    }

    pub fn kvctl_stdin(&self, args: &[&str], stdin: Option<&[u8]>) -> Output {
        run_kvctl(
            args,
            &[("KV_ENDPOINT", &self.endpoint()), ("KV_TOKEN", TOKEN)],
            stdin,
        )
    }
}

/// Runs the kvctl binary with extra environment and optional stdin.
pub fn run_kvctl(args: &[&str], env: &[(&str, &str)], stdin: Option<&[u8]>) -> Output {
    use std::io::Write;
    let mut cmd = Command::new(kvctl_bin());
    cmd.args(args)
        .env_remove("KV_ENDPOINT")
        .env_remove("KV_TOKEN")
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    if let Some(input) = stdin {
        let mut si = child.stdin.take().unwrap();
        si.write_all(input).unwrap();
    }
    child.wait_with_output().unwrap()
}

/// A bare HTTP/1.0 GET, to poll health without an async runtime.
pub fn http_status(port: u16, path: &str) -> Option<u16> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut buf = String::new();
    let _ = s.read_to_string(&mut buf);
    buf.split_whitespace().nth(1)?.parse().ok()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).to_string()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

/// Finds an installed program on PATH (and the usual sbin dirs).
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/bin", "/usr/local/bin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Waits until something accepts TCP connections on `port`.
pub fn wait_port(port: u16, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// A child process killed on drop.
pub struct Proc(pub Child, pub Option<tempfile::TempDir>);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `redis-server` on a free port, or None (with a loud SKIP) when absent.
pub fn start_redis(test: &str) -> Option<(Proc, u16)> {
    let Some(bin) = which("redis-server") else {
        eprintln!(
            "\n*** SKIP {test}: redis-server is not installed (apt-get install -y redis-server) ***\n"
        );
        return None;
    };
    let port = free_port();
    let child = Command::new(bin)
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let p = Proc(child, None);
    assert!(
        wait_port(port, Duration::from_secs(10)),
        "redis-server did not listen"
    );
    Some((p, port))
}

/// Starts a one-member etcd on free ports, or None (with a loud SKIP) when absent.
pub fn start_etcd(test: &str) -> Option<(Proc, u16)> {
    let Some(bin) = which("etcd") else {
        eprintln!(
            "\n*** SKIP {test}: etcd is not installed (apt-get install -y etcd-server) ***\n"
        );
        return None;
    };
    let dir = tempfile::tempdir().unwrap();
    let (cport, pport) = (free_port(), free_port());
    let client = format!("http://127.0.0.1:{cport}");
    let peer = format!("http://127.0.0.1:{pport}");
    let child = Command::new(bin)
        .arg("--data-dir")
        .arg(dir.path().join("etcd"))
        .args(["--name", "bench"])
        .args(["--listen-client-urls", &client])
        .args(["--advertise-client-urls", &client])
        .args(["--listen-peer-urls", &peer])
        .args(["--initial-advertise-peer-urls", &peer])
        .args(["--initial-cluster", &format!("bench={peer}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let p = Proc(child, Some(dir));
    assert!(
        wait_port(cport, Duration::from_secs(20)),
        "etcd did not listen"
    );
    Some((p, cport))
}
