//! `kvctl backup` and `kvctl restore` end to end: real `kvctl up` clusters
//! on loopback, a backup taken while writers keep writing, restored into a
//! new cluster with another placement; to a directory, and to a real
//! S3-compatible server (s3s-fs, installed by scripts/install-tools.sh)
//! started by the test.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{free_port, kvctl_bin, run_kvctl, stderr, stdout, wait_port};
use reqwest::blocking::Client;
use serde_json::Value;

/// Bound on every wait for a cluster to come up.
const WAIT: Duration = Duration::from_secs(90);
/// Keys written before the backup in the default suite (the 100 000
/// are in the ignored test below).
const KEYS: usize = 3000;

/// A running `kvctl up`, stopped (SIGTERM, then SIGKILL) on drop.
struct Up {
    child: Child,
    dir: PathBuf,
    port: u16,
    token: String,
    http: Client,
    /// `kvctl up --tls`: https, trusting the cluster's own CA.
    tls: bool,
}

impl Up {
    fn start(dir: &Path, token: &str, extra: &[&str]) -> Up {
        let port = free_port();
        let child = Command::new(kvctl_bin())
            .arg("up")
            .arg("--data-dir")
            .arg(dir)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--token", token])
            .args(extra)
            .env_remove("KV_ENDPOINT")
            .env_remove("KV_TOKEN")
            .env_remove("KV_DATA_DIR")
            .env_remove("KV_LISTEN")
            .env_remove("KV_NODE_BIN")
            .env_remove("KV_CLUSTER_TOKEN")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("cannot run kvctl up");
        let mut up = Up {
            child,
            dir: dir.to_path_buf(),
            port,
            token: token.to_string(),
            http: Client::new(),
            tls: extra.contains(&"--tls"),
        };
        assert!(
            wait_port(port, Duration::from_secs(30)),
            "the gateway never listened on {port}"
        );
        let mut http = Client::builder()
            .timeout(Duration::from_secs(20))
            .pool_max_idle_per_host(16);
        if up.tls {
            let pem = std::fs::read(up.ca()).expect("kvctl up --tls wrote no CA");
            http = http.add_root_certificate(reqwest::Certificate::from_pem(&pem).unwrap());
        }
        up.http = http.build().unwrap();
        up.wait_up(3);
        up
    }

    fn url(&self, path: &str) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}{path}", self.port)
    }

    fn ca(&self) -> PathBuf {
        self.dir.join("tls/ca.crt")
    }

    fn cluster(&self) -> (u16, Value) {
        match self
            .http
            .get(self.url("/v1/cluster"))
            .bearer_auth(&self.token)
            .send()
        {
            Ok(r) => (r.status().as_u16(), r.json().unwrap_or(Value::Null)),
            Err(e) => (0, Value::String(e.to_string())),
        }
    }

    /// Every one of `n` nodes Up, running and synced.
    fn wait_up(&self, n: usize) {
        let deadline = Instant::now() + WAIT;
        loop {
            let (s, v) = self.cluster();
            let up = v["nodes"].as_array().map_or(0, |ns| {
                ns.iter()
                    .filter(|n| {
                        n["state"] == "Up" && n["running"] == true && !n["syncedEpoch"].is_null()
                    })
                    .count()
            });
            if s == 200 && up == n && v["topology"]["pending"].is_null() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{n} nodes never came Up; last /v1/cluster: {v:#}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn put(&self, key: &str, value: &str) -> u16 {
        self.http
            .put(self.url(&format!("/v1/kv/{key}")))
            .bearer_auth(&self.token)
            .body(value.to_string())
            .send()
            .map(|r| r.status().as_u16())
            .unwrap_or(0)
    }

    fn delete(&self, key: &str) -> u16 {
        self.http
            .delete(self.url(&format!("/v1/kv/{key}")))
            .bearer_auth(&self.token)
            .send()
            .map(|r| r.status().as_u16())
            .unwrap_or(0)
    }

    /// (status, value, version header) of a quorum read.
    fn get(&self, key: &str) -> (u16, String, String) {
        match self
            .http
            .get(self.url(&format!("/v1/kv/{key}")))
            .bearer_auth(&self.token)
            .send()
        {
            Ok(r) => {
                let version = r
                    .headers()
                    .get("x-kv-version")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_string();
                (r.status().as_u16(), r.text().unwrap_or_default(), version)
            }
            Err(e) => (0, e.to_string(), String::new()),
        }
    }

    /// kvctl against this cluster: its gateway, client token and data
    /// directory (for the cluster token), and extra environment.
    fn kvctl(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        let endpoint = self.url("");
        let dir = self.dir.display().to_string();
        let mut all = vec![
            ("KV_ENDPOINT", endpoint.as_str()),
            ("KV_TOKEN", self.token.as_str()),
            ("KV_DATA_DIR", dir.as_str()),
        ];
        all.extend_from_slice(env);
        run_kvctl(args, &all, None)
    }

    fn cluster_id(&self) -> String {
        let saved: Value =
            serde_json::from_slice(&std::fs::read(self.dir.join("cluster.json")).unwrap()).unwrap();
        saved["clusterId"].as_str().unwrap().to_string()
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
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

fn par<T: Sync, R: Send>(items: &[T], threads: usize, f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let chunk = items.len().div_ceil(threads).max(1);
    std::thread::scope(|s| {
        let hs: Vec<_> = items
            .chunks(chunk)
            .map(|c| s.spawn(|| c.iter().map(&f).collect::<Vec<R>>()))
            .collect();
        hs.into_iter().flat_map(|h| h.join().unwrap()).collect()
    })
}

fn ok(o: &Output, what: &str) -> String {
    assert!(
        o.status.success(),
        "{what} failed ({}): stdout {:?} stderr {:?}",
        o.status,
        stdout(o),
        stderr(o)
    );
    stdout(o)
}

/// One writer attempt: key, value, acknowledged, and when it was sent.
type Attempt = (String, String, bool, Instant);

/// Writers that keep overwriting their own keys until stopped.
struct Writers {
    stop: Arc<AtomicBool>,
    handles: Vec<std::thread::JoinHandle<Vec<Attempt>>>,
}

impl Writers {
    fn start(up: &Up, threads: usize) -> Writers {
        let stop = Arc::new(AtomicBool::new(false));
        let handles = (0..threads)
            .map(|t| {
                let (stop, http, base, token) =
                    (stop.clone(), up.http.clone(), up.url(""), up.token.clone());
                std::thread::spawn(move || {
                    let mut log = Vec::new();
                    let mut seq = 0usize;
                    // bounded: a writer stops by itself after 20 000 attempts
                    while !stop.load(Ordering::Relaxed) && seq < 20_000 {
                        let key = format!("w{t}-{:03}", seq % 200);
                        let value = format!("v{seq}");
                        seq += 1;
                        let sent = Instant::now();
                        let acked = http
                            .put(format!("{base}/v1/kv/{key}"))
                            .bearer_auth(&token)
                            .body(value.clone())
                            .send()
                            .is_ok_and(|r| r.status().as_u16() == 200);
                        log.push((key, value, acked, sent));
                    }
                    log
                })
            })
            .collect();
        Writers { stop, handles }
    }

    fn finish(self) -> Vec<Attempt> {
        self.stop.store(true, Ordering::Relaxed);
        self.handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    }
}

/// For each writer key acknowledged before `began`: the values the restored
/// cluster may hold (its last value acknowledged before `began`, or any
/// later attempt, which the backup may or may not have caught).
fn acked_before(log: &[Attempt], began: Instant) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (key, value, acked, sent) in log {
        if *acked && *sent < began {
            out.insert(key.clone(), vec![value.clone()]);
        } else if *sent >= began
            && let Some(vals) = out.get_mut(key)
        {
            vals.push(value.clone());
        }
    }
    out
}

fn kvs(n: usize) -> Vec<(String, String)> {
    (0..n)
        .map(|i| (format!("k-{i:06}"), format!("value-{i}")))
        .collect()
}

/// What one backup-under-writes and restore showed.
struct Proof {
    a: Up,
    b: Up,
    location: String,
    manifest: Value,
}

/// The proof with `keys` keys: write them (and delete every 20th),
/// back the cluster up to `location` while writers keep writing, restore
/// into a new cluster with another placement, and check that every key
/// acknowledged before the backup began is there with its value and version,
/// every deleted key is absent, and `kvctl verify` is clean.
fn prove(root: &Path, keys: usize, location: &str, env: &[(&str, &str)]) -> Proof {
    let a = Up::start(&root.join("a"), "token-a", &[]);
    let data = kvs(keys);
    let t = Instant::now();
    // A write refused under load (a timeout, a 503) is retried a few times:
    // the proof is about acknowledged writes, and each of these keys must be.
    let failed: Vec<_> = par(&data, 8, |(k, v)| {
        let mut status = 0;
        for attempt in 0..5u64 {
            status = a.put(k, v);
            if status == 200 {
                return None;
            }
            std::thread::sleep(Duration::from_millis(200 * (attempt + 1)));
        }
        Some(format!("{k}: {status}"))
    })
    .into_iter()
    .flatten()
    .collect();
    assert!(
        failed.is_empty(),
        "{} writes failed 5 times, e.g. {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    let deleted: Vec<String> = data.iter().step_by(20).map(|(k, _)| k.clone()).collect();
    for k in &deleted {
        assert_eq!(a.delete(k), 200, "delete {k}");
    }
    eprintln!(
        "wrote {keys} keys and deleted {} in {:.1} s",
        deleted.len(),
        t.elapsed().as_secs_f64()
    );

    let writers = Writers::start(&a, 2);
    std::thread::sleep(Duration::from_millis(300));
    let began = Instant::now();
    let o = a.kvctl(&["backup", "--to", location, "-o", "json"], env);
    let took = began.elapsed();
    std::thread::sleep(Duration::from_millis(200));
    let log = writers.finish();
    let summary: Value = serde_json::from_str(&ok(&o, "kvctl backup")).unwrap();
    let during = log.iter().filter(|x| x.2 && x.3 >= began).count();
    eprintln!(
        "backup of {} records, {} bytes in {:.1} s; {during} writes acknowledged meanwhile",
        summary["records"],
        summary["bytes"],
        took.as_secs_f64()
    );
    assert!(during > 0, "the writers wrote nothing during the backup");
    assert_eq!(summary["clusterId"], a.cluster_id());
    assert_eq!(summary["formatVersion"], 1);
    assert!(summary["records"].as_u64().unwrap() >= keys as u64);
    assert!(summary["tombstones"].as_u64().unwrap() >= deleted.len() as u64);
    assert!(summary["hlcHighWater"].as_str().unwrap().contains('.'));

    // The restore target: a new cluster with another placement.
    let b = Up::start(
        &root.join("b"),
        "token-b",
        &[
            "--strategy",
            "consistent-hashing",
            "--replication-factor",
            "2",
        ],
    );
    let t = Instant::now();
    let o = b.kvctl(&["restore", "--from", location, "-o", "json"], env);
    let report: Value = serde_json::from_str(&ok(&o, "kvctl restore")).unwrap();
    eprintln!(
        "restore of {} records ({} copies) in {:.1} s",
        report["records"],
        report["applied"],
        t.elapsed().as_secs_f64()
    );
    assert_eq!(report["records"], summary["records"]);
    assert_eq!(report["heldNewer"], 0);
    assert_eq!(report["replicasChecked"], 4096 * 2);

    let deleted_set: std::collections::HashSet<&String> = deleted.iter().collect();
    let wrong: Vec<String> = par(&data, 8, |(k, v)| {
        let (s, body, version) = b.get(k);
        if deleted_set.contains(k) {
            return (s != 404).then(|| format!("{k}: deleted, yet {s} {body:?}"));
        }
        if s != 200 || body != *v {
            return Some(format!("{k}: {s} {body:?}, want {v:?}"));
        }
        // every 50th key: the very version the source cluster holds
        if k.ends_with("00") || k.ends_with("50") {
            let (_, _, at_a) = a.get(k);
            if at_a != version {
                return Some(format!(
                    "{k}: version {version} after the restore, {at_a} before"
                ));
            }
        }
        None
    })
    .into_iter()
    .flatten()
    .collect();
    assert!(
        wrong.is_empty(),
        "{} of {keys} keys are wrong after the restore, e.g. {:?}",
        wrong.len(),
        &wrong[..wrong.len().min(5)]
    );
    let writer_keys: Vec<(String, Vec<String>)> = acked_before(&log, began).into_iter().collect();
    assert!(!writer_keys.is_empty());
    let wrong: Vec<String> = par(&writer_keys, 8, |(k, vals)| {
        let (s, body, _) = b.get(k);
        (s != 200 || !vals.contains(&body))
            .then(|| format!("{k}: {s} {body:?}, want one of {vals:?}"))
    })
    .into_iter()
    .flatten()
    .collect();
    assert!(
        wrong.is_empty(),
        "writer keys acknowledged before the backup: {wrong:?}"
    );
    let o = b.kvctl(&["verify"], &[]);
    ok(&o, "kvctl verify on the restored cluster");
    Proof {
        a,
        b,
        location: location.to_string(),
        manifest: summary,
    }
}

#[test]
fn a_backup_taken_under_writes_restores_exactly_from_a_directory() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("backups/one");
    let location = format!("file://{}", dir.display());
    let p = prove(root.path(), KEYS, &location, &[]);
    assert!(dir.join("manifest.json").is_file());
    let segments = std::fs::read_dir(dir.join("data")).unwrap().count();
    assert_eq!(segments, 64);

    // Restoring again changes nothing: every copy is already held.
    let o =
        p.b.kvctl(&["restore", "--from", &p.location, "-o", "json"], &[]);
    let again: Value = serde_json::from_str(&ok(&o, "second restore")).unwrap();
    assert_eq!(again["stored"], 0, "{again}");
    assert_eq!(again["alreadyHeld"], again["applied"]);

    // A location that holds a backup is not overwritten.
    let o = p.a.kvctl(&["backup", "--to", &p.location], &[]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("already holds a backup"),
        "{}",
        stderr(&o)
    );

    // A damaged data object is refused before anything of it is applied.
    let copy = root.path().join("backups/damaged");
    std::fs::create_dir_all(copy.join("data")).unwrap();
    std::fs::copy(dir.join("manifest.json"), copy.join("manifest.json")).unwrap();
    for e in std::fs::read_dir(dir.join("data")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), copy.join("data").join(e.file_name())).unwrap();
    }
    let seg = copy.join("data/segment-07.kvb");
    let mut bytes = std::fs::read(&seg).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&seg, bytes).unwrap();
    let damaged = format!("file://{}", copy.display());
    let o = p.b.kvctl(&["restore", "--from", &damaged], &[]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("segment-07.kvb"), "{}", stderr(&o));

    // A cluster holding other data is refused (and --force then fails the
    // digest check, naming the bucket).
    assert_eq!(p.b.put("not-in-the-backup", "x"), 200);
    let o = p.b.kvctl(&["restore", "--from", &p.location], &[]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("already holds other data"),
        "{}",
        stderr(&o)
    );
    let o =
        p.b.kvctl(&["restore", "--from", &p.location, "--force"], &[]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("differ from the manifest"),
        "{}",
        stderr(&o)
    );

    // With a node of the factor-2 cluster held down, a restore is refused
    // (not every owner could take the records) and so is a backup (buckets
    // with one of two owners answering lack a quorum).
    ok(&p.b.kvctl(&["fail", "1", "--force"], &[]), "kvctl fail 1");
    let o =
        p.b.kvctl(&["restore", "--from", &p.location, "--force"], &[]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("must be Up"), "{}", stderr(&o));
    let elsewhere = format!("file://{}", root.path().join("backups/b").display());
    let o = p.b.kvctl(&["backup", "--to", &elsewhere], &[]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("fewer than a quorum"), "{}", stderr(&o));
    assert!(!root.path().join("backups/b/manifest.json").exists());
    let _ = p.manifest;
}

/// The sum over the cluster's nodes of one counter of their /metrics.
fn nodes_counter(up: &Up, name: &str) -> f64 {
    let (_, v) = up.cluster();
    let nodes = v["topology"]["nodes"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(!nodes.is_empty(), "no nodes in /v1/cluster: {v:#}");
    let mut sum = 0.0;
    for n in nodes {
        let address = n["address"].as_str().expect("a node's address");
        let text = up
            .http
            .get(format!("http://{address}/metrics"))
            .bearer_auth(&up.token)
            .send()
            .and_then(|r| r.text())
            .expect("a node's /metrics");
        sum += text
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or_else(|| panic!("{name} missing from {address}/metrics"));
    }
    sum
}

#[test]
fn a_new_cluster_started_from_a_backup_loads_it_on_every_node_before_serving() {
    let root = tempfile::tempdir().unwrap();
    let a = Up::start(&root.path().join("a"), "token-a", &[]);
    let data = kvs(1000);
    for (k, v) in &data {
        assert_eq!(a.put(k, v), 200, "put {k}");
    }
    let deleted: Vec<&String> = data.iter().step_by(20).map(|(k, _)| k).collect();
    for k in &deleted {
        assert_eq!(a.delete(k), 200, "delete {k}");
    }
    let location = format!("file://{}", root.path().join("backups/one").display());
    let o = a.kvctl(&["backup", "--to", &location, "-o", "json"], &[]);
    let summary: Value = serde_json::from_str(&ok(&o, "kvctl backup")).unwrap();
    let records = summary["records"].as_u64().unwrap();
    assert_eq!(records, 1000);

    // Over a cluster that exists it would do nothing: refused, saying so.
    let o = run_kvctl(
        &[
            "up",
            "--data-dir",
            &root.path().join("a").display().to_string(),
            "--restore-from",
            &location,
        ],
        &[],
        None,
    );
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("already holds a cluster"),
        "{}",
        stderr(&o)
    );

    // Another placement: each node loads the buckets it keeps.
    let b = Up::start(
        &root.path().join("b"),
        "token-b",
        &[
            "--strategy",
            "consistent-hashing",
            "--replication-factor",
            "2",
            "--restore-from",
            &location,
        ],
    );
    // Every record went to both owners of its bucket from the backup, not
    // from a peer (more only if a placement changed during a load).
    let stored = nodes_counter(&b, "kv_restore_records_total");
    assert!(
        stored >= (2 * records) as f64,
        "{stored} copies stored from the backup"
    );
    assert_eq!(nodes_counter(&b, "kv_restore_failures_total"), 0.0);
    let gone: std::collections::HashSet<&String> = deleted.into_iter().collect();
    let wrong: Vec<String> = par(&data, 8, |(k, v)| {
        let (s, body, version) = b.get(k);
        if gone.contains(k) {
            return (s != 404).then(|| format!("{k}: deleted, yet {s} {body:?}"));
        }
        let (_, _, at_a) = a.get(k);
        (s != 200 || body != *v || version != at_a)
            .then(|| format!("{k}: {s} {body:?} at {version}, want {v:?} at {at_a}"))
    })
    .into_iter()
    .flatten()
    .collect();
    assert!(
        wrong.is_empty(),
        "{} keys wrong, e.g. {:?}",
        wrong.len(),
        &wrong[..wrong.len().min(5)]
    );
    ok(
        &b.kvctl(&["verify"], &[]),
        "kvctl verify on the restored cluster",
    );
    // A write after the restore wins over the restored version.
    assert_eq!(b.put("k-000001", "after"), 200);
    assert_eq!(b.get("k-000001").1, "after");
}

/// The S3-compatible server: s3s-fs from scripts/install-tools.sh
/// (`.tools/bin/s3s-fs`), `KV_S3S_FS`, or PATH.
fn s3_server() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("KV_S3S_FS") {
        return Some(PathBuf::from(p));
    }
    let tools = std::env::var_os("KV_TOOLS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../.tools"));
    let local = tools.join("bin/s3s-fs");
    if local.is_file() {
        return Some(local);
    }
    common::which("s3s-fs")
}

/// A running s3s-fs on loopback, killed on drop.
struct S3Server {
    child: Child,
    port: u16,
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const S3_KEY: &str = "kvstore-test";
const S3_SECRET: &str = "kvstore-test-secret";

fn start_s3(bin: &Path, root: &Path) -> S3Server {
    for _ in 0..3 {
        let port = free_port();
        let child = Command::new(bin)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--access-key", S3_KEY, "--secret-key", S3_SECRET])
            .arg(root)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("cannot run s3s-fs");
        let mut server = S3Server { child, port };
        if wait_port(port, Duration::from_secs(10)) {
            return server;
        }
        let _ = server.child.kill();
    }
    panic!("s3s-fs never listened on loopback");
}

#[test]
fn a_backup_taken_under_writes_restores_exactly_through_a_real_s3_server() {
    let Some(bin) = s3_server() else {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "FAIL: s3s-fs is not installed (scripts/install-tools.sh installs it into .tools/bin)"
        );
        eprintln!(
            "SKIP a_backup_taken_under_writes_restores_exactly_through_a_real_s3_server: s3s-fs not installed (scripts/install-tools.sh)"
        );
        return;
    };
    let root = tempfile::tempdir().unwrap();
    let store = root.path().join("s3");
    // s3s-fs serves each directory under its root as a bucket
    std::fs::create_dir_all(store.join("kv-backups")).unwrap();
    let server = start_s3(&bin, &store);
    let endpoint = format!("http://127.0.0.1:{}", server.port);
    let env = [
        ("AWS_ENDPOINT_URL", endpoint.as_str()),
        ("AWS_ACCESS_KEY_ID", S3_KEY),
        ("AWS_SECRET_ACCESS_KEY", S3_SECRET),
        ("AWS_REGION", "us-east-1"),
    ];
    let location = "s3://kv-backups/nightly/first";
    let p = prove(root.path(), 1000, location, &env);
    // the objects are on the server's disk, under the bucket and prefix
    let on_disk = store.join("kv-backups/nightly/first");
    assert!(
        on_disk.join("manifest.json").is_file(),
        "{}",
        on_disk.display()
    );
    assert_eq!(std::fs::read_dir(on_disk.join("data")).unwrap().count(), 64);
    // Wrong credentials are an error, not an empty backup.
    let bad = [
        ("AWS_ENDPOINT_URL", endpoint.as_str()),
        ("AWS_ACCESS_KEY_ID", S3_KEY),
        ("AWS_SECRET_ACCESS_KEY", "wrong"),
        ("AWS_REGION", "us-east-1"),
    ];
    let o = p.b.kvctl(&["restore", "--from", location], &bad);
    assert!(
        !o.status.success(),
        "a restore with a wrong secret succeeded"
    );
    assert!(stderr(&o).contains("403"), "{}", stderr(&o));
}

/// The figure: 100 000 keys. Minutes on 2 cores, so not in the
/// default suite: `cargo test -p kvctl --test backup -- --ignored`.
#[test]
#[ignore = "100 000 keys: minutes on 2 cores; run with --ignored"]
fn a_backup_of_100_000_keys_taken_under_writes_restores_exactly() {
    let root = tempfile::tempdir().unwrap();
    let location = format!("file://{}", root.path().join("backup").display());
    let p = prove(root.path(), 100_000, &location, &[]);
    assert!(p.manifest["records"].as_u64().unwrap() >= 100_000);
}

/// A `kvctl up --tls` cluster: the gateway is https and the peer ports are
/// mutual TLS; backup and restore take the CA and the platform's
/// certificate from `--data-dir` and keep every value, delete and version.
#[test]
fn a_tls_cluster_is_backed_up_and_restored_through_its_mutual_tls_peer_ports() {
    let root = tempfile::tempdir().unwrap();
    let a = Up::start(&root.path().join("a"), "token-a", &["--tls"]);
    let data = kvs(300);
    for (k, v) in &data {
        assert_eq!(a.put(k, v), 200, "put {k}");
    }
    assert_eq!(a.delete("k-000007"), 200);
    let location = format!("file://{}", root.path().join("backup").display());
    ok(
        &a.kvctl(&["backup", "--to", &location], &[]),
        "backup of a TLS cluster",
    );
    let b = Up::start(&root.path().join("b"), "token-b", &["--tls"]);
    let o = b.kvctl(&["restore", "--from", &location, "-o", "json"], &[]);
    let report: Value = serde_json::from_str(&ok(&o, "restore into a TLS cluster")).unwrap();
    assert_eq!(report["records"], 300);
    for (k, v) in &data {
        let (s, body, version) = b.get(k);
        if k == "k-000007" {
            assert_eq!(s, 404, "{k} was deleted");
            continue;
        }
        assert_eq!((s, body.as_str()), (200, v.as_str()), "{k}");
        assert_eq!(version, a.get(k).2, "{k}'s version");
    }
    // Without the data directory's certificate the peer ports refuse kvctl.
    let o = run_kvctl(
        &["restore", "--from", &location],
        &[
            ("KV_ENDPOINT", &b.url("")),
            ("KV_TOKEN", "token-b"),
            ("KV_CACERT", &b.ca().display().to_string()),
            ("KV_CLUSTER_TOKEN", &cluster_token(&b)),
        ],
        None,
    );
    assert!(
        !o.status.success(),
        "a restore without a cluster certificate succeeded"
    );
}

/// The cluster token `kvctl up` keeps in `<data-dir>/cluster-token`.
fn cluster_token(up: &Up) -> String {
    let text = std::fs::read_to_string(up.dir.join("cluster-token")).expect("cluster-token");
    text.lines().next().expect("a token").trim().to_string()
}
