//! End-to-end tests of `kvctl up`: the local platform runs real node
//! processes on loopback (`kvctl node`, subprocesses of the kvctl binary
//! itself, unless a test passes `--node-binary`); the tests drive it only
//! through the gateway's HTTP API and the kvctl binary, and read the state
//! changes it prints.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{free_port, kv_node_bin, kvctl_bin, run_kvctl, stderr, stdout, wait_port};
use reqwest::blocking::Client;
use serde_json::{Value, json};

const DETECT_MS: &str = "2000";
/// Bound on every wait for a state change.
const WAIT: Duration = Duration::from_secs(60);

/// A running `kvctl up`: SIGTERM (then SIGKILL, and its nodes by pid) on drop.
struct Up {
    child: Option<Child>,
    dir: PathBuf,
    port: u16,
    token: String,
    lines: Arc<Mutex<Vec<String>>>,
    /// What kvctl up wrote on stderr (also passed through to the test's).
    err_lines: Arc<Mutex<Vec<String>>>,
    http: Client,
}

impl Up {
    fn start(dir: &Path, token: &str, extra: &[&str]) -> Up {
        Up::start_env(dir, token, extra, &[])
    }

    /// [`Up::start`] with extra environment (inherited by its nodes).
    fn start_env(dir: &Path, token: &str, extra: &[&str], env: &[(&str, &str)]) -> Up {
        let port = free_port();
        let mut child = Command::new(kvctl_bin())
            .arg("up")
            .arg("--data-dir")
            .arg(dir)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--token", token])
            .args(["--failure-detection-ms", DETECT_MS])
            .args(extra)
            .env_remove("KV_ENDPOINT")
            .env_remove("KV_TOKEN")
            .env_remove("KV_DATA_DIR")
            .env_remove("KV_LISTEN")
            .env_remove("KV_NODE_BIN")
            .env_remove("KV_WORKER_THREADS")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cannot run kvctl up");
        let err_lines = Arc::new(Mutex::new(Vec::new()));
        let err = child.stderr.take().unwrap();
        let err_sink = err_lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines() {
                let Ok(line) = line else { break };
                eprintln!("{line}");
                err_sink.lock().unwrap().push(line);
            }
        });
        let lines = Arc::new(Mutex::new(Vec::new()));
        let out = child.stdout.take().unwrap();
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                sink.lock().unwrap().push(line);
            }
        });
        let up = Up {
            child: Some(child),
            dir: dir.to_path_buf(),
            port,
            token: token.to_string(),
            lines,
            err_lines,
            http: Client::builder()
                .timeout(Duration::from_secs(20))
                .pool_max_idle_per_host(16)
                .build()
                .unwrap(),
        };
        assert!(
            wait_port(port, Duration::from_secs(30)),
            "the gateway never listened on {port}; kvctl up printed:\n{}",
            up.printed()
        );
        up
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn endpoint(&self) -> String {
        self.url("")
    }

    fn printed(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    /// Waits until kvctl up has printed a line containing every part.
    fn wait_line(&self, parts: &[&str]) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(l) = self
                .lines
                .lock()
                .unwrap()
                .iter()
                .find(|l| parts.iter().all(|p| l.contains(p)))
            {
                return l.clone();
            }
            assert!(
                Instant::now() < deadline,
                "kvctl up never printed a line with {parts:?}; it printed:\n{}",
                self.printed()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn req(&self, method: reqwest::Method, path: &str) -> reqwest::blocking::RequestBuilder {
        self.http
            .request(method, self.url(path))
            .bearer_auth(&self.token)
    }

    /// (status, JSON body) of a request with an optional JSON body.
    fn call(&self, method: reqwest::Method, path: &str, body: Option<&Value>) -> (u16, Value) {
        let mut r = self.req(method, path);
        if let Some(b) = body {
            r = r.json(b);
        }
        match r.send() {
            Ok(resp) => {
                let status = resp.status().as_u16();
                let text = resp.text().unwrap_or_default();
                let v = serde_json::from_str(&text).unwrap_or(Value::String(text));
                (status, v)
            }
            Err(e) => (0, Value::String(e.to_string())),
        }
    }

    fn cluster(&self) -> Value {
        let (s, v) = self.call(reqwest::Method::GET, "/v1/cluster", None);
        assert_eq!(s, 200, "GET /v1/cluster: {v}");
        v
    }

    fn state(v: &Value, o: u32) -> String {
        v["nodes"]
            .as_array()
            .and_then(|ns| ns.iter().find(|n| n["ordinal"] == o))
            .and_then(|n| n["state"].as_str())
            .unwrap_or("absent")
            .to_string()
    }

    /// Polls `/v1/cluster` until `ok` holds; returns that view.
    fn wait_cluster(&self, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + WAIT;
        loop {
            let (s, v) = self.call(reqwest::Method::GET, "/v1/cluster", None);
            if s == 200 && ok(&v) {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; last /v1/cluster:\n{v:#}\nkvctl up printed:\n{}",
                self.printed()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn wait_state(&self, o: u32, state: &str) -> Value {
        self.wait_cluster(&format!("node {o} {state}"), |v| Up::state(v, o) == state)
    }

    /// Every node in `ordinals` Up, running and answering the platform.
    fn wait_up(&self, ordinals: &[u32]) -> Value {
        self.wait_cluster(&format!("nodes {ordinals:?} Up"), |v| {
            ordinals.iter().all(|&o| {
                v["nodes"]
                    .as_array()
                    .and_then(|ns| ns.iter().find(|n| n["ordinal"] == o))
                    .is_some_and(|n| {
                        n["state"] == "Up" && n["running"] == true && !n["syncedEpoch"].is_null()
                    })
            })
        })
    }

    /// The committed placement is `strategy`/`factor` and nothing is pending.
    fn wait_placement(&self, strategy: &str, factor: u64) -> Value {
        self.wait_cluster(
            &format!("placement {strategy} factor {factor} committed"),
            |v| {
                let t = &v["topology"];
                t["pending"].is_null()
                    && t["placement"]["strategy"] == strategy
                    && (strategy == "Full" || t["placement"]["factor"] == factor)
                    && v["desired"]["strategy"] == strategy
            },
        )
    }

    fn put(&self, key: &str, value: &str, consistency: Option<&str>) -> u16 {
        let mut r = self
            .req(reqwest::Method::PUT, &format!("/v1/kv/{key}"))
            .body(value.to_string());
        if let Some(c) = consistency {
            r = r.header("x-consistency", c);
        }
        r.send().map(|r| r.status().as_u16()).unwrap_or(0)
    }

    /// (status, body) of a read.
    fn get(&self, key: &str, consistency: Option<&str>) -> (u16, String) {
        let mut r = self.req(reqwest::Method::GET, &format!("/v1/kv/{key}"));
        if let Some(c) = consistency {
            r = r.header("x-consistency", c);
        }
        match r.send() {
            Ok(resp) => (resp.status().as_u16(), resp.text().unwrap_or_default()),
            Err(e) => (0, e.to_string()),
        }
    }

    /// Runs the kvctl binary against this gateway.
    fn kvctl(&self, args: &[&str]) -> Output {
        run_kvctl(
            args,
            &[("KV_ENDPOINT", &self.endpoint()), ("KV_TOKEN", &self.token)],
            None,
        )
    }

    /// SIGTERM, then a bounded wait; the exit status.
    fn stop(&mut self) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(40);
        while Instant::now() < deadline {
            if let Ok(Some(s)) = child.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
        kill_nodes(&self.dir);
        None
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.stop();
        }
        // Whatever is left of this cluster's nodes (only when kvctl up died
        // without stopping them): they were started by this test.
        kill_nodes(&self.dir);
    }
}

/// Pids of processes whose command line contains `pattern`.
fn pgrep(pattern: &str) -> Vec<u32> {
    let out = Command::new("pgrep")
        .args(["-f", pattern])
        .output()
        .expect("pgrep is needed by these tests");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// Waits (at most 4 s) for node `o`'s process to be gone: a node failed
/// through a call it relayed itself stops only after passing on the answer.
fn wait_process_gone(dir: &Path, o: u32, when: &str) {
    kv_testkit::eventually(
        &format!("node {o}'s process to stop {when}"),
        Duration::from_secs(4),
        || pgrep(&format!("{}/node-{o} ", dir.display())).is_empty(),
    );
}

/// The command line of node `o` of the cluster in `dir`.
fn node_argv(dir: &Path, o: u32) -> Vec<String> {
    node_proc_file(dir, o, "cmdline")
}

/// The environment node `o` of the cluster in `dir` was started with.
fn node_environ(dir: &Path, o: u32) -> Vec<String> {
    node_proc_file(dir, o, "environ")
}

/// A NUL-separated `/proc/<pid>/` file of node `o`'s process.
fn node_proc_file(dir: &Path, o: u32, file: &str) -> Vec<String> {
    let pids = pgrep(&format!("{}/node-{o} ", dir.display()));
    let [pid] = pids[..] else {
        panic!("expected one process of node {o}, found {pids:?}");
    };
    std::fs::read(format!("/proc/{pid}/{file}"))
        .unwrap_or_default()
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).to_string())
        .collect()
}

fn kill_nodes(dir: &Path) {
    for pid in pgrep(&format!("{}/node-", dir.display())) {
        let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
    }
}

/// Runs `f` over `items` on `threads` threads.
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

/// Writes every (key, value) through the gateway; panics on the first failure.
fn put_all(up: &Up, kvs: &[(String, String)]) {
    let failed: Vec<_> = par(kvs, 8, |(k, v)| (k.clone(), up.put(k, v, None)))
        .into_iter()
        .filter(|(_, s)| *s != 200)
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {} writes failed, e.g. {:?}; kvctl up printed:\n{}",
        failed.len(),
        kvs.len(),
        &failed[..failed.len().min(5)],
        up.printed()
    );
}

/// Reads every (key, value) through the gateway and checks the value.
fn check_all(up: &Up, kvs: &[(String, String)], consistency: Option<&str>) {
    let wrong: Vec<_> = par(kvs, 8, |(k, v)| {
        let (s, body) = up.get(k, consistency);
        (s != 200 || body != *v).then(|| format!("{k}: {s} {body:?} (want {v:?})"))
    })
    .into_iter()
    .flatten()
    .collect();
    assert!(
        wrong.is_empty(),
        "{} of {} reads (consistency {consistency:?}) are wrong, e.g. {:?}; /v1/cluster: {:#}",
        wrong.len(),
        kvs.len(),
        &wrong[..wrong.len().min(5)],
        up.cluster()
    );
}

fn kvs(prefix: &str, range: std::ops::Range<usize>) -> Vec<(String, String)> {
    range
        .map(|i| (format!("{prefix}-{i:05}"), format!("value-{prefix}-{i}")))
        .collect()
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

fn failed_nodes(v: &Value) -> Vec<u64> {
    v["desired"]["failedNodes"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_u64).collect())
        .unwrap_or_default()
}

/// What a key may hold after the writers stopped: whether any write of it
/// was acknowledged, and the values it may read back (the last acknowledged
/// one and every later attempt that was not acknowledged: it may or may not
/// have landed).
type Possible = BTreeMap<String, (bool, Vec<String>)>;

/// Background writers through the gateway, each on its own keys.
struct Writers {
    stop: Arc<AtomicBool>,
    handles: Vec<std::thread::JoinHandle<(Possible, usize, usize)>>,
}

impl Writers {
    fn start(up: &Up, threads: usize, keys_per_thread: usize) -> Writers {
        let stop = Arc::new(AtomicBool::new(false));
        let handles = (0..threads)
            .map(|t| {
                let stop = stop.clone();
                let http = up.http.clone();
                let base = up.endpoint();
                let token = up.token.clone();
                std::thread::spawn(move || {
                    let mut possible = Possible::new();
                    let (mut acked, mut failed) = (0, 0);
                    let mut seq = 0usize;
                    while !stop.load(Ordering::Relaxed) {
                        let key = format!("w{t}-{:03}", seq % keys_per_thread);
                        let value = format!("v{seq}");
                        seq += 1;
                        let status = http
                            .put(format!("{base}/v1/kv/{key}"))
                            .bearer_auth(&token)
                            .body(value.clone())
                            .send()
                            .map(|r| r.status().as_u16())
                            .unwrap_or(0);
                        let p = possible.entry(key).or_default();
                        if status == 200 {
                            acked += 1;
                            *p = (true, vec![value]);
                        } else {
                            failed += 1;
                            p.1.push(value);
                            std::thread::sleep(Duration::from_millis(20));
                        }
                    }
                    (possible, acked, failed)
                })
            })
            .collect();
        Writers { stop, handles }
    }

    /// Stops the writers: (what each key may hold, acknowledged, failed).
    fn finish(mut self) -> (Possible, usize, usize) {
        self.stop.store(true, Ordering::Relaxed);
        let mut all = Possible::new();
        let (mut acked, mut failed) = (0, 0);
        for h in std::mem::take(&mut self.handles) {
            let (p, a, f) = h.join().unwrap();
            all.extend(p);
            acked += a;
            failed += f;
        }
        (all, acked, failed)
    }
}

impl Drop for Writers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Every key with an acknowledged write reads back (at quorum) its last
/// acknowledged value or a later unacknowledged attempt.
fn check_writers(up: &Up, possible: &Possible) {
    let items: Vec<(&String, &Vec<String>)> = possible
        .iter()
        .filter(|(_, (acked, _))| *acked)
        .map(|(k, (_, vals))| (k, vals))
        .collect();
    let wrong: Vec<String> = par(&items, 8, |(k, vals)| {
        let (s, body) = up.get(k, Some("quorum"));
        (s != 200 || !vals.contains(&body))
            .then(|| format!("{k}: {s} {body:?} (want one of {vals:?})"))
    })
    .into_iter()
    .flatten()
    .collect();
    assert!(
        wrong.is_empty(),
        "{} of {} acknowledged keys read back wrong, e.g. {:?}",
        wrong.len(),
        items.len(),
        &wrong[..wrong.len().min(5)]
    );
}

/// `kvctl verify` exits 0, retried briefly while hints and anti-entropy settle.
fn verify_ok(up: &Up) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let o = up.kvctl(&["verify"]);
        if o.status.success() {
            return stdout(&o);
        }
        assert!(
            Instant::now() < deadline,
            "kvctl verify kept failing: stdout {:?} stderr {:?}",
            stdout(&o),
            stderr(&o)
        );
        std::thread::sleep(Duration::from_secs(1));
    }
}

// 1. Full replication on 3 nodes: a failed node is caught up on recovery and
// then serves every key on its own.
#[test]
fn full_fail_recover_then_only_recovered_node_serves() {
    let dir = tempfile::tempdir().unwrap();
    let up = Up::start(dir.path(), "t1", &["--anti-entropy-secs", "5"]);
    up.wait_up(&[0, 1, 2]);
    up.wait_line(&["kvctl up: 3 nodes, Full"]);

    let first = kvs("a", 0..1000);
    put_all(&up, &first);

    ok(&up.kvctl(&["fail", "1"]), "kvctl fail 1");
    let v = up.wait_state(1, "Failed");
    assert_eq!(failed_nodes(&v), vec![1]);
    up.wait_line(&["node 1: Up -> Failed"]);
    up.wait_cluster("node 1 not running", |v| {
        v["nodes"][1]["running"] == false && v["nodes"][1]["heldDown"] == true
    });
    // Node 1 is listed as not running once the platform takes it off its
    // list, before the process has gone; and when kvctl's call reached node
    // 1 itself through the shared gateway port, node 1 stops only once it
    // has passed on the answer (killed within 2 s otherwise).
    wait_process_gone(dir.path(), 1, "after kvctl fail 1");
    check_all(&up, &first, None);
    let more = kvs("b", 0..200);
    put_all(&up, &more);

    ok(&up.kvctl(&["recover", "1"]), "kvctl recover 1");
    up.wait_up(&[0, 1, 2]);
    up.wait_line(&["node 1: Recovering -> Up"]);

    // Node 0 down: node 1 and 2 still make a write quorum.
    ok(&up.kvctl(&["fail", "0"]), "kvctl fail 0");
    up.wait_state(0, "Failed");
    // Node 2 down too would leave one live owner of three: refused.
    let o = up.kvctl(&["fail", "2"]);
    assert!(!o.status.success(), "kvctl fail 2 was not refused");
    let msg = stderr(&o) + &stdout(&o);
    assert!(
        msg.contains("would leave some keys with 1 of 3 owners live") && msg.contains("force"),
        "unclear refusal: {msg:?}"
    );
    std::thread::sleep(Duration::from_millis(600));
    let v = up.cluster();
    assert_eq!(
        failed_nodes(&v),
        vec![0],
        "a refused fail changed the desired cluster"
    );
    assert_eq!(Up::state(&v, 2), "Up");
    assert_eq!(v["nodes"][2]["running"], true);

    ok(&up.kvctl(&["fail", "2", "--force"]), "kvctl fail 2 --force");
    up.wait_state(2, "Failed");
    let v = up.wait_up(&[1]);
    assert_eq!(failed_nodes(&v), vec![0, 2]);
    // Only node 1 can serve: everything it holds came through its catch-up.
    let all: Vec<_> = first.iter().chain(&more).cloned().collect();
    check_all(&up, &all, Some("one"));
    let resp = up
        .req(reqwest::Method::GET, "/v1/kv/b-00199")
        .header("x-consistency", "one")
        .send()
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(
        resp.headers()
            .get("x-kv-node")
            .and_then(|v| v.to_str().ok()),
        Some("1"),
        "served by another node than the recovered one"
    );
    // Writes at Quorum are impossible now, and say so.
    assert_eq!(up.put("a-00000", "x", None), 503);
}

// 2. ConsistentHashing factor 3 on 5 nodes at Quorum: any one node down,
// every key still reads and writes.
#[test]
fn consistent_hashing_rf3_each_node_down_in_turn() {
    let dir = tempfile::tempdir().unwrap();
    let up = Up::start(
        dir.path(),
        "t2",
        &[
            "--nodes",
            "5",
            "--strategy",
            "consistent-hashing",
            "--replication-factor",
            "3",
            "--anti-entropy-secs",
            "5",
        ],
    );
    up.wait_up(&[0, 1, 2, 3, 4]);
    up.wait_placement("ConsistentHashing", 3);
    let mut data = kvs("k", 0..200);
    put_all(&up, &data);
    for o in 0..5u32 {
        ok(&up.kvctl(&["fail", &o.to_string()]), "kvctl fail");
        up.wait_state(o, "Failed");
        check_all(&up, &data, None);
        for (_, v) in data.iter_mut() {
            *v = format!("round-{o}-{v}");
        }
        put_all(&up, &data);
        check_all(&up, &data, None);
        ok(&up.kvctl(&["recover", &o.to_string()]), "kvctl recover");
        up.wait_up(&[0, 1, 2, 3, 4]);
        up.wait_line(&[&format!("node {o}: Recovering -> Up")]);
    }
    check_all(&up, &data, Some("all"));
    verify_ok(&up);
}

// 3. Strategy and factor changed at runtime while writers run.
#[test]
fn strategy_changes_under_writes() {
    let dir = tempfile::tempdir().unwrap();
    let up = Up::start(dir.path(), "t3", &["--anti-entropy-secs", "5"]);
    up.wait_up(&[0, 1, 2]);
    up.wait_placement("Full", 3);
    let base = kvs("s", 0..300);
    put_all(&up, &base);
    let writers = Writers::start(&up, 4, 100);
    std::thread::sleep(Duration::from_millis(500));

    let steps: [(&[&str], &str, u64); 4] = [
        (
            &[
                "strategy",
                "consistent-hashing",
                "--replication-factor",
                "2",
            ],
            "ConsistentHashing",
            2,
        ),
        (&["strategy", "full"], "Full", 3),
        (
            &["strategy", "consistent", "--replication-factor", "3"],
            "ConsistentHashing",
            3,
        ),
        (
            &[
                "strategy",
                "consistent-hashing",
                "--replication-factor",
                "2",
            ],
            "ConsistentHashing",
            2,
        ),
    ];
    // full → CH 2 → full → CH 3 (the brief), then through the HTTP route back
    // to CH 2 so that a change that shrinks the owner sets is covered too.
    for (i, (args, strategy, factor)) in steps.iter().enumerate() {
        if i == 3 {
            let (s, v) = up.call(
                reqwest::Method::POST,
                "/set_replication_strategy",
                Some(&json!({"strategy": "consistent", "replication_factor": 2})),
            );
            assert_eq!(s, 200, "{v}");
        } else {
            ok(&up.kvctl(args), "kvctl strategy");
        }
        let v = up.wait_placement(strategy, *factor);
        up.wait_up(&[0, 1, 2]);
        assert!(v["refusal"].is_null(), "{v:#}");
        std::thread::sleep(Duration::from_millis(500));
    }
    let (possible, acked, failed) = writers.finish();
    eprintln!("strategy changes: {acked} writes acknowledged, {failed} failed");
    assert!(acked > 100, "only {acked} writes were acknowledged");
    assert_eq!(
        failed, 0,
        "{failed} writes failed during rebalancing (SPEC §3: no downtime)"
    );
    check_writers(&up, &possible);
    check_all(&up, &base, Some("quorum"));
    let lines = up.printed();
    assert!(
        lines.contains("rebalance"),
        "no rebalance printed:\n{lines}"
    );
    verify_ok(&up);
}

// 4. Restarting `kvctl up` on the same data directory keeps data and the
// held-down set, and leaves no node process behind when stopped. The first
// run's nodes are `kvctl node` subprocesses, the second's a kv-node binary
// (`--node-binary`): the same node either way.
#[test]
fn restart_keeps_data_and_held_down_nodes() {
    let dir = tempfile::tempdir().unwrap();
    let data = kvs("r", 0..300);
    {
        let mut up = Up::start(dir.path(), "t4", &[]);
        up.wait_up(&[0, 1, 2]);
        let argv = node_argv(dir.path(), 0);
        assert_eq!(
            argv.get(..2),
            Some(&[kvctl_bin().display().to_string(), "node".to_string()][..]),
            "node 0 is not a `kvctl node` subprocess: {argv:?}"
        );
        // three nodes on this machine: each runtime gets a third of its CPUs
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let want = format!("KV_WORKER_THREADS={}", (cpus / 3).max(1));
        let env = node_environ(dir.path(), 0);
        assert!(env.contains(&want), "node 0 was not given {want}: {env:?}");
        put_all(&up, &data);
        ok(&up.kvctl(&["fail", "2"]), "kvctl fail 2");
        up.wait_state(2, "Failed");
        let status = up.stop().expect("kvctl up did not exit after SIGTERM");
        assert!(status.success(), "kvctl up exited with {status}");
        up.wait_line(&["stopped"]);
        let left = pgrep(&dir.path().display().to_string());
        assert!(left.is_empty(), "processes left behind: {left:?}");
    }
    let bin = kv_node_bin().display().to_string();
    let up = Up::start(dir.path(), "t4", &["--node-binary", &bin]);
    up.wait_line(&["held down: {2}"]);
    up.wait_up(&[0, 1]);
    assert_eq!(node_argv(dir.path(), 0).first(), Some(&bin));
    let v = up.cluster();
    assert_eq!(Up::state(&v, 2), "Failed", "{v:#}");
    assert_eq!(v["nodes"][2]["running"], false);
    assert_eq!(v["nodes"][2]["heldDown"], true);
    assert_eq!(failed_nodes(&v), vec![2]);
    assert!(pgrep(&format!("{}/node-2 ", dir.path().display())).is_empty());
    check_all(&up, &data, None);
    ok(&up.kvctl(&["recover", "2"]), "kvctl recover 2");
    up.wait_up(&[0, 1, 2]);
    check_all(&up, &data, Some("all"));
}

// 5. A node process killed behind the platform's back is restarted, catches
// up, and serves again; no acknowledged write is lost.
#[test]
fn crashed_node_is_restarted_and_catches_up() {
    let dir = tempfile::tempdir().unwrap();
    let up = Up::start(dir.path(), "t5", &["--anti-entropy-secs", "5"]);
    up.wait_up(&[0, 1, 2]);
    let base = kvs("c", 0..300);
    put_all(&up, &base);
    let writers = Writers::start(&up, 4, 100);
    std::thread::sleep(Duration::from_millis(500));

    let pattern = format!("{}/node-1 ", dir.path().display());
    let pids = pgrep(&pattern);
    assert_eq!(pids.len(), 1, "node 1's pid: {pids:?}");
    let st = Command::new("kill")
        .args(["-9", &pids[0].to_string()])
        .status()
        .unwrap();
    assert!(st.success());

    up.wait_line(&["node 1: process exited on its own"]);
    up.wait_cluster("node 1 no longer Up", |v| Up::state(v, 1) != "Up");
    up.wait_line(&["node 1: Up -> Failed"]);
    up.wait_line(&["node 1: Failed -> Recovering"]);
    up.wait_line(&["node 1: Recovering -> Up"]);
    up.wait_up(&[0, 1, 2]);
    let new_pids = pgrep(&pattern);
    assert_eq!(
        new_pids.len(),
        1,
        "node 1 is not running once: {new_pids:?}"
    );
    assert_ne!(new_pids[0], pids[0]);
    std::thread::sleep(Duration::from_millis(500));

    let (possible, acked, failed) = writers.finish();
    eprintln!("crash: {acked} writes acknowledged, {failed} failed");
    assert!(acked > 50, "only {acked} writes were acknowledged");
    check_writers(&up, &possible);
    check_all(&up, &base, Some("all"));
    verify_ok(&up);
}

// 6. The classic client flow (the original store's API) through the gateway.
#[test]
fn classic_client_flow() {
    let dir = tempfile::tempdir().unwrap();
    let up = Up::start(dir.path(), "your_api_token_here", &[]);
    up.wait_up(&[0, 1, 2]);
    use reqwest::Method as M;
    let ready = up.http.get(up.url("/readyz")).send().unwrap();
    assert_eq!(ready.status().as_u16(), 200);

    let (s, v) = up.call(
        M::POST,
        "/write",
        Some(&json!({"key": "alpha", "value": "one"})),
    );
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["status"], "success");
    assert!(v["message"].is_string(), "{v}");
    let (s, v) = up.call(
        M::POST,
        "/write",
        Some(&json!({"key": "alpha", "value": "two"})),
    );
    assert_eq!(s, 409, "{v}");
    assert_eq!(v["status"], "error");
    let (s, v) = up.call(M::GET, "/read/alpha", None);
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["status"], "success");
    assert_eq!(v["key"], "alpha");
    assert_eq!(v["value"], "one");
    let (s, v) = up.call(M::GET, "/read/missing-key", None);
    assert_eq!(s, 404, "{v}");
    assert_eq!(v["status"], "error");

    // Wrong and missing token: 403 with the JSON error shape.
    for auth in [Some("Bearer nope"), None] {
        let mut r = up.http.get(up.url("/read/alpha"));
        if let Some(a) = auth {
            r = r.header("authorization", a);
        }
        let resp = r.send().unwrap();
        assert_eq!(resp.status().as_u16(), 403);
        let v: Value = resp.json().unwrap();
        assert_eq!(v["error"], "forbidden", "{v}");
        assert!(v["message"].is_string(), "{v}");
    }
    let resp = up
        .http
        .get(up.url("/nodes"))
        .bearer_auth("nope")
        .send()
        .unwrap();
    assert_eq!(resp.status().as_u16(), 403);

    let (s, v) = up.call(M::GET, "/nodes", None);
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["status"], "success");
    let nodes = v["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 3, "{v}");
    for (i, n) in nodes.iter().enumerate() {
        assert_eq!(n["node_id"], i as u64, "{v}");
        assert_eq!(n["status"], "alive", "{v}");
        assert!(n["port"].as_u64().is_some_and(|p| p > 0), "{v}");
    }

    let (s, v) = up.call(M::POST, "/fail/1", None);
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["status"], "success");
    let node_status = |o: usize| {
        let (_, v) = up.call(M::GET, "/nodes", None);
        v["nodes"][o]["status"].as_str().unwrap_or("").to_string()
    };
    let deadline = Instant::now() + WAIT;
    while node_status(1) != "dead" {
        assert!(Instant::now() < deadline, "node 1 never shown dead");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(node_status(0), "alive");
    // Reads go on through the other nodes.
    let (s, v) = up.call(M::GET, "/read/alpha", None);
    assert_eq!((s, &v["value"]), (200, &json!("one")), "{v}");
    let (s, v) = up.call(M::POST, "/fail/7", None);
    assert_eq!(s, 404, "{v}");
    let (s, v) = up.call(M::POST, "/fail/x", None);
    assert_eq!(s, 400, "{v}");

    let (s, v) = up.call(M::POST, "/recover/1", None);
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["status"], "success");
    let deadline = Instant::now() + WAIT;
    while node_status(1) != "alive" {
        assert!(
            Instant::now() < deadline,
            "node 1 never alive again; {}",
            up.printed()
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // Bad bodies: 400, nothing changes.
    let raw = |body: &str| {
        let resp = up
            .req(M::POST, "/set_replication_strategy")
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .unwrap();
        let s = resp.status().as_u16();
        (s, resp.json::<Value>().unwrap_or(Value::Null))
    };
    for bad in [
        "not json",
        "{}",
        r#"{"strategy":"ring"}"#,
        r#"{"strategy":"consistent","replication_factor":"two"}"#,
        r#"{"strategy":"consistent","replication_factor":-1}"#,
    ] {
        let (s, v) = raw(bad);
        assert_eq!(s, 400, "{bad}: {v}");
        assert_eq!(v["status"], "error", "{bad}: {v}");
        assert!(v["message"].is_string(), "{bad}: {v}");
    }
    // A factor above the node count is refused by the planner.
    let (s, v) = raw(r#"{"strategy":"consistent","replication_factor":5}"#);
    assert_eq!(s, 409, "{v}");
    assert!(
        v["message"].as_str().unwrap_or("").contains("exceeds"),
        "{v}"
    );
    assert_eq!(up.cluster()["desired"]["strategy"], "Full");

    let (s, v) = up.call(
        M::POST,
        "/set_replication_strategy",
        Some(&json!({"strategy": "consistent", "replication_factor": 2})),
    );
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["status"], "success");
    assert!(v["message"].is_string(), "{v}");
    up.wait_placement("ConsistentHashing", 2);

    let (s, v) = up.call(M::GET, "/nodes_for_key/alpha", None);
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["status"], "success");
    assert_eq!(v["key"], "alpha");
    let owners = v["nodes"].as_array().unwrap();
    assert_eq!(owners.len(), 2, "{v}");
    assert_ne!(owners[0], owners[1]);
    let (s, v) = up.call(M::GET, "/read/alpha", None);
    assert_eq!((s, &v["value"]), (200, &json!("one")), "{v}");

    let (s, v) = up.call(M::DELETE, "/delete/alpha", None);
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["status"], "success");
    let (s, _) = up.call(M::GET, "/read/alpha", None);
    assert_eq!(s, 404);
}

/// GET /nodes: each node's classic status (`alive` / `dead`) by id.
fn classic_nodes(up: &Up) -> BTreeMap<u64, String> {
    let (s, v) = up.call(reqwest::Method::GET, "/nodes", None);
    assert_eq!(s, 200, "GET /nodes: {v}");
    v["nodes"]
        .as_array()
        .unwrap_or_else(|| panic!("GET /nodes has no nodes: {v}"))
        .iter()
        .map(|n| {
            (
                n["node_id"].as_u64().unwrap(),
                n["status"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

// 7. The original store's client acts on each answer at once, with no
// polling: fail node 1, list nodes, recover every node listed dead, switch
// to consistent hashing with factor 2, ask for a key's owners. Each control
// call answers after its effect is visible.
#[test]
fn original_client_sequence_sees_each_effect_in_the_next_answer() {
    use reqwest::Method as M;
    let dir = tempfile::tempdir().unwrap();
    let up = Up::start(dir.path(), "t7", &[]);
    up.wait_up(&[0, 1, 2]);
    let (s, v) = up.call(
        M::POST,
        "/write",
        Some(&json!({"key": "beta", "value": "b"})),
    );
    assert_eq!(s, 200, "{v}");

    let (s, v) = up.call(M::POST, "/fail/1", None);
    assert_eq!((s, &v["status"]), (200, &json!("success")), "{v}");
    // The nodes share the gateway's port, so the call may have reached node
    // 1 itself: that node answers first and stops right after (the platform
    // kills it if it has not within 2 s), so its process may outlive the
    // answer by a moment. What the client sees next is checked at once below.
    wait_process_gone(dir.path(), 1, &format!("after POST /fail/1 answered {v}"));
    let nodes = classic_nodes(&up);
    let dead: Vec<u64> = nodes
        .iter()
        .filter(|(_, s)| *s == "dead")
        .map(|(o, _)| *o)
        .collect();
    assert_eq!(
        dead,
        vec![1],
        "GET /nodes right after POST /fail/1: {nodes:?}"
    );

    for o in &dead {
        let (s, v) = up.call(M::POST, &format!("/recover/{o}"), None);
        assert_eq!((s, &v["status"]), (200, &json!("success")), "{v}");
        assert!(v["message"].as_str().unwrap_or("").contains("is Up"), "{v}");
    }
    let nodes = classic_nodes(&up);
    assert!(
        nodes.values().all(|s| s == "alive"),
        "GET /nodes right after recovering every dead node: {nodes:?}"
    );

    let (s, v) = up.call(
        M::POST,
        "/set_replication_strategy",
        Some(&json!({"strategy": "consistent", "replication_factor": 2})),
    );
    assert_eq!((s, &v["status"]), (200, &json!("success")), "{v}");
    assert_eq!(v["strategy"], "ConsistentHashing", "{v}");
    assert_eq!(v["replication_factor"], 2, "{v}");
    let (s, v) = up.call(M::GET, "/nodes_for_key/beta", None);
    assert_eq!(s, 200, "{v}");
    let owners = v["nodes"].as_array().cloned().unwrap_or_default();
    assert_eq!(
        owners.len(),
        2,
        "the old owners right after the switch: {v}"
    );
    let t = up.cluster()["topology"].clone();
    assert!(t["pending"].is_null(), "still pending: {t}");
    assert_eq!(t["placement"]["strategy"], "ConsistentHashing", "{t}");
    let (s, v) = up.call(M::GET, "/read/beta", None);
    assert_eq!((s, &v["value"]), (200, &json!("b")), "{v}");

    // kvctl waits the same way (seen through the v1 view).
    let out = ok(&up.kvctl(&["strategy", "full"]), "kvctl strategy full");
    assert!(out.contains("committed"), "{out}");
    let t = up.cluster()["topology"].clone();
    assert!(
        t["pending"].is_null() && t["placement"]["strategy"] == "Full",
        "{t}"
    );

    let out = ok(&up.kvctl(&["fail", "2"]), "kvctl fail 2");
    assert!(out.contains("Failed"), "{out}");
    let v = up.cluster();
    assert_eq!(Up::state(&v, 2), "Failed", "{v:#}");
    assert_eq!(v["nodes"][2]["running"], false, "{v:#}");
    let out = ok(&up.kvctl(&["recover", "2"]), "kvctl recover 2");
    assert!(out.contains("is Up"), "{out}");
    let v = up.cluster();
    assert_eq!(Up::state(&v, 2), "Up", "{v:#}");
    assert_eq!(v["nodes"][2]["running"], true, "{v:#}");
    // Past the bound: 202 with the progress, and /nodes does not claim it Up.
    let (s, v) = up.call(M::POST, "/fail/1", None);
    assert_eq!(s, 200, "{v}");
    let (s, v) = up.call(M::POST, "/recover/1?timeout=0.01", None);
    assert_eq!(s, 202, "{v}");
    assert_eq!(
        (&v["status"], &v["done"]),
        (&json!("accepted"), &json!(false)),
        "{v}"
    );
    assert!(v["progress"]["state"].is_string(), "{v}");
    assert!(
        v["message"].as_str().unwrap_or("").contains("not Up yet"),
        "{v}"
    );
    assert_eq!(classic_nodes(&up)[&1], "dead");
    up.wait_up(&[0, 1, 2]);
    // wait=false answers at once, as before: accepted, not done.
    let (s, v) = up.call(M::POST, "/v1/nodes/1/fail?wait=false", None);
    assert_eq!((s, &v["done"]), (200, &json!(false)), "{v}");
    assert!(
        v["status"].is_null(),
        "a v1 answer has no classic status: {v}"
    );
    up.wait_state(1, "Failed");
    for bad in [
        "/recover/1?timeout=0",
        "/recover/1?timeout=x",
        "/recover/1?wait=maybe",
        "/recover/1?force=true",
    ] {
        let (s, v) = up.call(M::POST, bad, None);
        assert_eq!(s, 400, "{bad}: {v}");
        assert_eq!(v["status"], "error", "{bad}: {v}");
    }
}

// 8. Replication input is checked: each kind of mistake gets one 400 that
// names it and changes nothing; a success describes the state that holds.
#[test]
fn replication_input_is_checked_and_answers_say_what_holds() {
    use reqwest::Method as M;
    let dir = tempfile::tempdir().unwrap();
    let up = Up::start(dir.path(), "t8", &[]);
    up.wait_up(&[0, 1, 2]);
    let epoch = up.cluster()["topology"]["epoch"].clone();
    let send = |method: M, path: &str, body: &str| {
        let resp = up
            .req(method, path)
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .unwrap();
        let s = resp.status().as_u16();
        (s, resp.json::<Value>().unwrap_or(Value::Null))
    };
    for (body, says) in [
        (r#"{"strategy":1}"#, "strategy must be a string"),
        ("[]", "must be a JSON object"),
        ("7", "must be a JSON object"),
        (
            r#"{"strategy":"consistent","replication_factor":-1}"#,
            "at least 1",
        ),
        (
            r#"{"strategy":"consistent","replication_factor":0}"#,
            "at least 1",
        ),
        (
            r#"{"strategy":"consistent","replication_factor":1.5}"#,
            "whole number",
        ),
        (
            r#"{"strategy":"consistent","replication_factor":"two"}"#,
            "whole number",
        ),
        (r#"{"strategy":"ring"}"#, "unknown strategy"),
        (
            r#"{"strategy":"full","replication_factor":1}"#,
            "applies only to consistent hashing",
        ),
        (
            r#"{"replication_factor":2}"#,
            "applies only to consistent hashing",
        ),
        (r#"{"strateg":"full"}"#, "unknown field"),
        (
            r#"{"strategy":"full","writeConsistency":2}"#,
            "writeConsistency must be a string",
        ),
        ("{}", "nothing to change"),
    ] {
        let (s, v) = send(M::POST, "/set_replication_strategy", body);
        assert_eq!(s, 400, "{body}: {v}");
        assert_eq!(v["status"], "error", "{body}: {v}");
        let msg = v["message"].as_str().unwrap_or("");
        assert!(msg.contains(says), "{body}: expected {says:?} in {v}");
        let (s, v) = send(M::PUT, "/v1/replication", body);
        assert_eq!(
            (s, &v["error"]),
            (400, &json!("bad_request")),
            "{body}: {v}"
        );
    }
    let v = up.cluster();
    assert_eq!(
        v["topology"]["epoch"], epoch,
        "a refused change moved the epoch"
    );
    assert_eq!(v["desired"]["strategy"], "Full", "{v:#}");
    assert_eq!(v["desired"]["factor"], 3, "{v:#}");

    // Full with its own factor (every node) is true, and said so.
    let (s, v) = send(
        M::POST,
        "/set_replication_strategy",
        r#"{"strategy":"full","replication_factor":3}"#,
    );
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        (&v["strategy"], &v["replication_factor"]),
        (&json!("Full"), &json!(3)),
        "{v}"
    );
    assert!(
        v["message"]
            .as_str()
            .unwrap_or("")
            .contains("Full (every key on all 3 nodes)"),
        "{v}"
    );
    let (s, v) = send(
        M::PUT,
        "/v1/replication",
        r#"{"strategy":"consistent","factor":2}"#,
    );
    assert_eq!(s, 200, "{v}");
    assert!(
        v["message"]
            .as_str()
            .unwrap_or("")
            .contains("ConsistentHashing with factor 2"),
        "{v}"
    );
    let t = up.cluster()["topology"].clone();
    assert_eq!(
        (&t["placement"]["strategy"], &t["placement"]["factor"]),
        (&json!("ConsistentHashing"), &json!(2)),
        "{t}"
    );
}

// 9. Clients that go away (mid-headers, mid-body, or without reading the
// answer) are ordinary: neither the gateway nor a node logs them as errors.
#[test]
fn client_disconnects_are_not_logged_as_errors() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    // Debug lines of the one accept loop (kv_net::serve) show that the disconnects did end
    // connections with errors (warp's own loop logged each at ERROR).
    // `--gateway proxy`: the gateway's own accept loop takes every
    // connection (on the shared port the nodes' loops would, the same loop
    // as node 0's port below).
    let up = Up::start_env(
        dir.path(),
        "t9",
        &["--gateway", "proxy"],
        &[("RUST_LOG", "info,kv_net=debug")],
    );
    let v = up.wait_up(&[0, 1, 2]);
    let node0: u16 = v["nodes"][0]["port"].as_u64().unwrap() as u16;
    let token = up.token.clone();
    let requests = [
        "GET /v1/kv/a HTTP/1.1\r\nHost: x\r\nAuthori".to_string(),
        format!(
            "PUT /v1/kv/a HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nContent-Length: 100\r\n\r\nonly-part"
        ),
        format!("GET /v1/cluster HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n"),
    ];
    for port in [up.port, node0] {
        for i in 0..60 {
            let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
            s.write_all(requests[i % requests.len()].as_bytes())
                .unwrap();
            drop(s);
        }
    }
    std::thread::sleep(Duration::from_secs(1));
    // both still serve
    assert_eq!(up.put("after-disconnects", "x", None), 200);
    assert_eq!(common::http_status(node0, "/healthz"), Some(200));
    let gateway_log = up.err_lines.lock().unwrap().join("\n");
    let node_log = std::fs::read_to_string(dir.path().join("node-0.log")).unwrap();
    for (who, log) in [("the gateway", &gateway_log), ("node 0", &node_log)] {
        let errors: Vec<&str> = log.lines().filter(|l| l.contains("ERROR")).collect();
        assert!(errors.is_empty(), "{who} logged errors: {errors:#?}");
        let gone = log
            .lines()
            .filter(|l| l.contains("DEBUG") && l.contains("client went away"))
            .count();
        assert!(
            gone >= 20,
            "{who} saw {gone} clients go away, expected most of 60:\n{log}"
        );
    }
}

/// The pid of the `kvctl up` process itself.
fn up_pid(up: &Up) -> u32 {
    up.child.as_ref().map(|c| c.id()).expect("kvctl up runs")
}

/// A client that opens a new connection for every request: each one is
/// spread by the kernel anew.
fn fresh_connections() -> Client {
    Client::builder()
        .timeout(Duration::from_secs(5))
        .pool_max_idle_per_host(0)
        .build()
        .unwrap()
}

// 9. The Up nodes listen on the gateway's port themselves: with the
// `kvctl up` process frozen, clients of the gateway's address are still
// served, with no hop through it, all by one node (the kernel hands new
// connections to the first socket there), and by another once that node is
// killed; with `--gateway proxy` the gateway forwards every request.
#[test]
fn gateway_port_is_served_by_the_nodes_themselves() {
    let dir = tempfile::tempdir().unwrap();
    let up = Up::start(dir.path(), "t9", &[]);
    up.wait_up(&[0, 1, 2]);
    // A second cluster cannot join the shared port.
    let other = tempfile::tempdir().unwrap();
    let mut second = Command::new(kvctl_bin())
        .args(["up", "--data-dir"])
        .arg(other.path())
        .args(["--listen", &format!("127.0.0.1:{}", up.port)])
        .env_remove("KV_LISTEN")
        .env_remove("KV_DATA_DIR")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = second.try_wait().unwrap() {
            break Some(s);
        }
        if Instant::now() > deadline {
            let _ = second.kill();
            let _ = second.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut second.stderr.take().unwrap(), &mut err).unwrap();
    assert!(
        status.is_some_and(|s| !s.success()) && err.contains("cannot listen"),
        "a second kvctl up on the gateway's port: {status:?} {err}"
    );
    up.wait_cluster("every node on the gateway's port", |_| {
        (0..3).all(|o| {
            let log = std::fs::read_to_string(dir.path().join(format!("node-{o}.log")))
                .unwrap_or_default();
            log.contains("serving clients on the gateway's port")
        })
    });
    // (new connections go to a node's slot from its first bind on)
    let pid = up_pid(&up).to_string();
    assert!(
        Command::new("kill")
            .args(["-STOP", &pid])
            .status()
            .unwrap()
            .success()
    );
    let http = fresh_connections();
    let mut served_by = std::collections::BTreeSet::new();
    let mut answers = Vec::new();
    for i in 0..30 {
        let put = http
            .put(up.url(&format!("/v1/kv/frozen-{i}")))
            .bearer_auth(&up.token)
            .body(format!("v{i}"))
            .send();
        let get = http
            .get(up.url(&format!("/v1/kv/frozen-{i}")))
            .bearer_auth(&up.token)
            .send();
        for r in [put, get] {
            match r {
                Ok(r) => {
                    if let Some(n) = r.headers().get("x-kv-node").and_then(|v| v.to_str().ok()) {
                        served_by.insert(n.to_string());
                    }
                    answers.push(r.status().as_u16().to_string());
                }
                Err(e) => answers.push(format!("error: {e}")),
            }
        }
    }
    assert!(
        Command::new("kill")
            .args(["-CONT", &pid])
            .status()
            .unwrap()
            .success()
    );
    assert!(
        answers.iter().all(|a| a == "200"),
        "with kvctl up frozen, the gateway's address answered {answers:?}"
    );
    assert_eq!(
        served_by.len(),
        1,
        "60 new connections reached several nodes: {served_by:?}"
    );
    let first = served_by.pop_first().unwrap();
    let pids = pgrep(&format!("{}/node-{first} ", dir.path().display()));
    assert_eq!(pids.len(), 1, "node {first}'s pid: {pids:?}");
    assert!(
        Command::new("kill")
            .args(["-9", &pids[0].to_string()])
            .status()
            .unwrap()
            .success()
    );
    let deadline = Instant::now() + WAIT;
    let next = loop {
        let r = http
            .get(up.url("/v1/kv/frozen-0"))
            .bearer_auth(&up.token)
            .send();
        if let Ok(r) = r
            && r.status().as_u16() == 200
        {
            let n = r.headers().get("x-kv-node").and_then(|v| v.to_str().ok());
            break n.unwrap_or_default().to_string();
        }
        assert!(
            Instant::now() < deadline,
            "nothing served after node {first} died"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_ne!(next, first, "the killed node still answered");
    // Control routes reaching a node there are the control plane's.
    let (s, v) = up.call(reqwest::Method::GET, "/v1/cluster", None);
    assert_eq!(s, 200);
    assert!(
        v["desired"].is_object(),
        "not the control plane's view: {v}"
    );
    drop(up);

    let dir = tempfile::tempdir().unwrap();
    let up = Up::start(dir.path(), "t9p", &["--gateway", "proxy"]);
    up.wait_up(&[0, 1, 2]);
    for i in 0..10 {
        assert_eq!(up.put(&format!("p-{i}"), "x", None), 200);
        assert_eq!(up.get(&format!("p-{i}"), None), (200, "x".to_string()));
    }
    for o in 0..3 {
        let log = std::fs::read_to_string(dir.path().join(format!("node-{o}.log"))).unwrap();
        assert!(
            !log.contains("gateway's port"),
            "node {o} took the gateway's port under --gateway proxy"
        );
    }
}

// 10. A control call that reaches, on the shared port, the very node it
// fails is still answered (the node stops after passing the answer on),
// and with every node failed the gateway answers control calls itself.
#[test]
fn control_calls_are_answered_whichever_node_they_reach() {
    let dir = tempfile::tempdir().unwrap();
    let up = Up::start(dir.path(), "t10", &[]);
    up.wait_up(&[0, 1, 2]);
    let http = fresh_connections();
    let call = |path: &str| -> String {
        match http
            .post(up.url(path))
            .bearer_auth(&up.token)
            .timeout(Duration::from_secs(40))
            .send()
        {
            Ok(r) => {
                let s = r.status().as_u16();
                let v: Value = r.json().unwrap_or(Value::Null);
                if s == 200 && v["done"] == true {
                    "ok".into()
                } else {
                    format!("{s} {v}")
                }
            }
            Err(e) => format!("error: {e}"),
        }
    };
    let mut answers = Vec::new();
    for _ in 0..4 {
        for o in 0..3 {
            answers.push((format!("fail {o}"), call(&format!("/fail/{o}?force=true"))));
        }
        let nodes = http
            .get(up.url("/nodes"))
            .bearer_auth(&up.token)
            .send()
            .map(|r| r.status().as_u16())
            .unwrap_or(0);
        answers.push((
            "nodes".into(),
            if nodes == 200 {
                "ok".into()
            } else {
                nodes.to_string()
            },
        ));
        for o in 0..3 {
            answers.push((format!("recover {o}"), call(&format!("/recover/{o}"))));
        }
    }
    let bad: Vec<_> = answers.iter().filter(|(_, a)| a != "ok").collect();
    assert!(bad.is_empty(), "control calls not answered: {bad:?}");
    let passed_on = up
        .printed()
        .matches("stops once it has passed on the answer")
        .count();
    eprintln!("{passed_on} of 12 fails reached the node they failed");
}

// 11. A node killed mid-load behind the platform's back: clients of the
// gateway's address see at most a connection that has to be retried, no
// error answer, and every acknowledged write reads back.
#[test]
fn a_node_killed_mid_load_costs_only_a_retried_connection() {
    let dir = tempfile::tempdir().unwrap();
    let up = Up::start(dir.path(), "t11", &[]);
    up.wait_up(&[0, 1, 2]);
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..4)
        .map(|t| {
            let (stop, http, base, token) = (
                stop.clone(),
                up.http.clone(),
                up.endpoint(),
                up.token.clone(),
            );
            std::thread::spawn(move || {
                let (mut acked, mut retried, mut answers) = (Vec::new(), 0usize, Vec::new());
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    let key = format!("k{t}-{i}");
                    i += 1;
                    let mut tries = 0;
                    loop {
                        tries += 1;
                        match http
                            .put(format!("{base}/v1/kv/{key}"))
                            .bearer_auth(&token)
                            .body(key.clone())
                            .send()
                        {
                            Ok(r) if r.status().as_u16() == 200 => {
                                acked.push(key.clone());
                                break;
                            }
                            Ok(r) => {
                                answers.push(format!("{key}: {}", r.status()));
                                break;
                            }
                            // a connection the killed node held: once more
                            Err(e) if tries < 5 => {
                                retried += 1;
                                eprintln!("{key}: retried after {e}");
                            }
                            Err(e) => {
                                answers.push(format!("{key}: {e}"));
                                break;
                            }
                        }
                    }
                }
                (acked, retried, answers)
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(1500));
    // the node the gateway's clients reach
    let serving = up
        .req(reqwest::Method::GET, "/v1/kv/k0-0")
        .send()
        .unwrap()
        .headers()
        .get("x-kv-node")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let pids = pgrep(&format!("{}/node-{serving} ", dir.path().display()));
    assert_eq!(pids.len(), 1, "node {serving}'s pid: {pids:?}");
    assert!(
        Command::new("kill")
            .args(["-9", &pids[0].to_string()])
            .status()
            .unwrap()
            .success()
    );
    up.wait_line(&[&format!("node {serving}: Recovering -> Up")]);
    std::thread::sleep(Duration::from_millis(1500));
    stop.store(true, Ordering::Relaxed);
    let (mut acked, mut retried, mut errors) = (Vec::new(), 0, Vec::new());
    for w in writers {
        let (a, r, e) = w.join().unwrap();
        acked.extend(a);
        retried += r;
        errors.extend(e);
    }
    eprintln!(
        "{} writes acknowledged, {retried} connections retried",
        acked.len()
    );
    assert!(errors.is_empty(), "clients saw errors: {errors:?}");
    assert!(acked.len() > 100, "only {} writes", acked.len());
    let wrong: Vec<String> = par(&acked, 8, |k| {
        let (s, body) = up.get(k, Some("quorum"));
        (s != 200 || &body != k).then(|| format!("{k}: {s} {body:?}"))
    })
    .into_iter()
    .flatten()
    .collect();
    assert!(
        wrong.is_empty(),
        "acknowledged writes read back wrong: {wrong:?}"
    );
}
