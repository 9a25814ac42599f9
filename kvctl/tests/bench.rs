//! The load generator: sampler shape, statistics, configuration, and the op
//! mix against real servers (redis-server, etcd, kv-node).

mod common;

use std::time::Duration;

use kvctl::bench::rng::Rng;
use kvctl::bench::stats::{Latency, OpKind, Outcome, Recorder, Report};
use kvctl::bench::zipf::{self, Distribution, KeyChooser, Zipfian};
use kvctl::bench::{
    self, BenchArgs, BenchConfig, DriverConfig, DriverKind, Stop, key_of, make_value,
    parse_duration,
};

#[test]
fn rng_below_is_in_range_and_roughly_uniform() {
    let mut r = Rng::new(42);
    let mut counts = [0u32; 10];
    for _ in 0..100_000 {
        counts[r.below(10) as usize] += 1;
    }
    for c in counts {
        assert!((9_500..10_500).contains(&c), "{counts:?}");
    }
    assert_eq!(r.below(1), 0);
    let f: Vec<f64> = (0..1000).map(|_| r.next_f64()).collect();
    assert!(f.iter().all(|x| (0.0..1.0).contains(x)));
    // Same seed, same stream.
    assert_eq!(Rng::new(7).next_u64(), Rng::new(7).next_u64());
    assert_ne!(Rng::new(7).next_u64(), Rng::new(8).next_u64());
}

#[test]
fn zipfian_ranks_follow_the_power_law() {
    let n = 10_000u64;
    let z = Zipfian::new(n, zipf::DEFAULT_THETA).unwrap();
    let mut r = Rng::new(1);
    let samples = 1_000_000u64;
    let mut counts = vec![0u64; n as usize];
    for _ in 0..samples {
        let k = z.sample(&mut r);
        assert!(k < n);
        counts[k as usize] += 1;
    }
    let freq = |k: usize| counts[k] as f64 / samples as f64;
    // The two head ranks are drawn exactly.
    for k in 0..2 {
        let p = z.probability(k as u64);
        assert!(
            (freq(k) - p).abs() / p < 0.03,
            "rank {k}: {} vs {p}",
            freq(k)
        );
    }
    // P(0)/P(1) = 2^theta.
    let ratio = freq(0) / freq(1);
    assert!((ratio - 2f64.powf(0.99)).abs() < 0.1, "ratio {ratio}");
    // The top 1% of keys take the share the zeta function says (YCSB's
    // approximation is close for the tail).
    let top = (n / 100) as usize;
    let share: f64 = (0..top).map(freq).sum();
    let expected = zipf::zeta(top as u64, 0.99) / zipf::zeta(n, 0.99);
    assert!(
        (share - expected).abs() < 0.03,
        "top 1% share {share:.3}, expected {expected:.3}"
    );
    // Heavily skewed: the top 1% gets more than half the traffic.
    assert!(share > 0.5, "{share}");
    // Decreasing on average: each decade of ranks is less popular than the one before.
    let decade = |a: usize, b: usize| (a..b).map(freq).sum::<f64>() / (b - a) as f64;
    assert!(decade(0, 10) > decade(10, 100));
    assert!(decade(10, 100) > decade(100, 1000));
    assert!(decade(100, 1000) > decade(1000, 10_000));
    // Every part of the key space is reached.
    assert!(counts[(n as usize) / 2..].iter().sum::<u64>() > 0);
}

#[test]
fn zipfian_rejects_bad_parameters_and_handles_tiny_spaces() {
    assert!(Zipfian::new(0, 0.99).is_err());
    assert!(Zipfian::new(10, 1.0).is_err());
    assert!(Zipfian::new(10, 0.0).is_err());
    assert!(Zipfian::new(10, f64::NAN).is_err());
    let mut r = Rng::new(3);
    for n in 1..4 {
        let z = Zipfian::new(n, 0.99).unwrap();
        for _ in 0..1000 {
            assert!(z.sample(&mut r) < n);
        }
        for d in [Distribution::Uniform, Distribution::Zipfian] {
            let c = KeyChooser::new(d, n).unwrap();
            for _ in 0..1000 {
                assert!(c.next(&mut r) < n);
            }
        }
    }
}

#[test]
fn zipfian_hot_keys_are_scattered_by_a_permutation() {
    for n in [1u64, 2, 10, 97, 1000, 100_000] {
        let c = KeyChooser::new(Distribution::Zipfian, n).unwrap();
        let mut seen = std::collections::HashSet::new();
        for rank in 0..n.min(5000) {
            let i = c.index_of_rank(rank);
            assert!(i < n);
            assert!(seen.insert(i), "n={n}: rank {rank} collides");
        }
    }
    let c = KeyChooser::new(Distribution::Zipfian, 100_000).unwrap();
    let hot: Vec<u64> = (0..5).map(|r| c.index_of_rank(r)).collect();
    assert!(
        hot.windows(2).all(|w| w[0].abs_diff(w[1]) > 1),
        "hot keys are neighbours: {hot:?}"
    );
}

#[test]
fn uniform_chooser_covers_the_space_evenly() {
    let c = KeyChooser::new(Distribution::Uniform, 100).unwrap();
    let mut r = Rng::new(9);
    let mut counts = [0u32; 100];
    for _ in 0..200_000 {
        counts[c.next(&mut r) as usize] += 1;
    }
    assert!(
        counts.iter().all(|c| (1_700..2_300).contains(c)),
        "{counts:?}"
    );
}

#[test]
fn percentiles_come_from_the_histogram() {
    let mut rec = Recorder::new();
    for us in 1..=1000u64 {
        rec.record(OpKind::Read, Outcome::Ok, Duration::from_micros(us));
    }
    rec.record(OpKind::Write, Outcome::Ok, Duration::from_millis(50));
    rec.record(OpKind::Read, Outcome::Miss, Duration::from_micros(10));
    rec.error("timeout");
    let mut other = Recorder::new();
    other.error_with("timeout", "no answer within 1s");
    other.error_with("http_503_unavailable", "the first 503");
    other.error_with("http_503_unavailable", "a later 503");
    // Longer than the histogram's range: clamped, not lost.
    other.record(OpKind::Write, Outcome::Ok, Duration::from_secs(600));
    rec.merge(&other);

    let l = Latency::of(&rec.reads);
    assert_eq!(l.count, 1001);
    assert!((495..=505).contains(&l.p50), "{l:?}");
    assert!((895..=905).contains(&l.p90), "{l:?}");
    assert!((985..=995).contains(&l.p99), "{l:?}");
    assert!((995..=1001).contains(&l.p999), "{l:?}");
    assert_eq!(Latency::of(&rec.writes).count, 2);
    assert!(Latency::of(&rec.writes).max >= 59_000_000);
    assert_eq!(rec.misses, 1);
    assert_eq!(rec.error_count(), 4);

    let mut report = Report {
        driver: "redis".into(),
        endpoints: vec!["redis://h:1".into()],
        connections: 4,
        keys: 10,
        value_size: 100,
        read_ratio: 0.5,
        distribution: "uniform".into(),
        ..Report::default()
    };
    report.fill(&rec, Duration::from_secs(2));
    assert_eq!(report.ops, 1003);
    assert_eq!((report.reads, report.writes, report.misses), (1001, 2, 1));
    assert!((report.ops_per_second - 501.5).abs() < 1e-9);
    assert_eq!(report.errors, 4);
    assert_eq!(report.errors_by_kind["timeout"], 2);
    assert_eq!(
        report.error_examples["http_503_unavailable"], "the first 503",
        "the first message of each kind is kept"
    );
    let text = report.render();
    assert!(
        text.contains("ops        1003 (501.5 ops/s): 1001 reads (1 misses), 2 writes"),
        "{text}"
    );
    assert!(
        text.contains("errors     4 (http_503_unavailable 2, timeout 2)"),
        "{text}"
    );
    assert!(
        text.contains("  first http_503_unavailable: the first 503"),
        "{text}"
    );
    assert!(text.contains("latency    p50 0.50ms"), "{text}");
    let json = serde_json::to_value(&report).unwrap();
    assert_eq!(json["opsPerSecond"], 501.5);
    assert_eq!(json["errorsByKind"]["timeout"], 2);
    assert!(json["latencyUs"]["p99"].as_u64().unwrap() >= 985);
    assert!(json.get("prefill").is_none());
    assert_eq!(bench::stats::ms(1234.0), "1.23ms");
    assert_eq!(bench::stats::ms(45_600.0), "45.6ms");
    assert_eq!(bench::stats::ms(250_000.0), "250ms");
}

#[test]
fn durations_parse() {
    assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
    assert_eq!(parse_duration("10").unwrap(), Duration::from_secs(10));
    assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
    assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
    assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
    assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
    assert_eq!(parse_duration("0s").unwrap(), Duration::ZERO);
    for bad in ["", "s", "-1s", "10x", "1e400", "9999h"] {
        assert!(parse_duration(bad).is_err(), "{bad}");
    }
}

fn args(extra: &[&str]) -> BenchArgs {
    use clap::Parser;
    #[derive(Parser)]
    struct W {
        #[command(flatten)]
        a: BenchArgs,
    }
    W::try_parse_from(std::iter::once("bench").chain(extra.iter().copied()))
        .unwrap()
        .a
}

#[test]
fn config_resolves_endpoints_per_driver() {
    let c = BenchConfig::from_args(
        &args(&[]),
        "127.0.0.1:5000",
        Some("t".into()),
        None,
        Default::default(),
    )
    .unwrap();
    assert_eq!(c.driver.kind, DriverKind::Kvstore);
    assert_eq!(c.driver.endpoints, vec!["http://127.0.0.1:5000"]);
    assert_eq!(c.driver.token.as_deref(), Some("t"));
    assert_eq!(c.driver.connections, 32);
    assert_eq!(c.keys, 100_000);
    assert_eq!(c.value_size, 100);
    assert_eq!(c.stop, Stop::After(Duration::from_secs(10)));
    assert_eq!(c.warmup, Duration::from_secs(2));

    let c = BenchConfig::from_args(
        &args(&[
            "--endpoints",
            "a:1,http://b:2/",
            "--ops",
            "500",
            "--prefill",
        ]),
        "x:1",
        None,
        Some(kv_core::Consistency::One),
        Default::default(),
    )
    .unwrap();
    assert_eq!(c.driver.endpoints, vec!["http://a:1", "http://b:2"]);
    assert_eq!(c.stop, Stop::Ops(500));
    assert!(c.prefill);
    assert_eq!(c.driver.consistency, Some(kv_core::Consistency::One));

    let c = BenchConfig::from_args(
        &args(&["--driver", "redis", "--distribution", "zipfian"]),
        "x:1",
        Some("t".into()),
        Some(kv_core::Consistency::All),
        Default::default(),
    )
    .unwrap();
    assert_eq!(c.driver.endpoints, vec!["redis://127.0.0.1:6379"]);
    assert_eq!(c.driver.token, None);
    assert_eq!(c.driver.consistency, None);
    assert_eq!(c.distribution, Distribution::Zipfian);

    let c = BenchConfig::from_args(
        &args(&[
            "--driver",
            "etcd",
            "--endpoints",
            "h:2379",
            "--etcd-serializable",
        ]),
        "x:1",
        None,
        None,
        Default::default(),
    )
    .unwrap();
    assert_eq!(c.driver.endpoints, vec!["http://h:2379"]);
    assert!(c.driver.etcd_serializable);
    // https endpoints are trusted as kvctl's --cacert/--insecure say.
    let c = BenchConfig::from_args(
        &args(&["--endpoints", "https://h:1"]),
        "x",
        None,
        None,
        Default::default(),
    )
    .unwrap();
    assert_eq!(c.driver.endpoints, vec!["https://h:1"]);
}

#[test]
fn keys_and_values_have_fixed_shapes() {
    let mut k = Vec::new();
    key_of(42, &mut k);
    assert_eq!(k, b"bench-0000000042");
    let v = make_value(100, 5);
    assert_eq!(v.len(), 100);
    assert!(v.iter().all(u8::is_ascii_alphanumeric));
    assert_eq!(v, make_value(100, 5));
    assert!(make_value(0, 5).is_empty());
}

fn cfg(
    kind: DriverKind,
    endpoint: String,
    ops: u64,
    read_ratio: f64,
    prefill: bool,
) -> BenchConfig {
    BenchConfig {
        driver: DriverConfig {
            kind,
            endpoints: vec![endpoint],
            token: Some(common::TOKEN.into()),
            consistency: None,
            etcd_serializable: false,
            timeout: Duration::from_secs(10),
            connections: 4,
            tls: Default::default(),
        },
        keys: 200,
        value_size: 64,
        read_ratio,
        distribution: Distribution::Zipfian,
        stop: Stop::Ops(ops),
        warmup: Duration::from_millis(100),
        prefill,
        seed: 11,
        progress: false,
    }
}

/// Runs a mixed workload and checks what the report says against the server.
async fn check_op_mix(kind: DriverKind, endpoint: String) {
    // Only writes first: every op is a write, nothing is read.
    let r = bench::run(cfg(kind, endpoint.clone(), 300, 0.0, false))
        .await
        .unwrap();
    assert_eq!(r.errors, 0, "{r:?}");
    assert_eq!((r.ops, r.reads, r.writes), (300, 0, 300));
    // A 70/30 mix after a prefill: the reads all hit.
    let r = bench::run(cfg(kind, endpoint.clone(), 2000, 0.7, true))
        .await
        .unwrap();
    assert_eq!(r.errors, 0, "{r:?}");
    assert_eq!(r.ops, 2000);
    assert_eq!(r.reads + r.writes, 2000);
    let ratio = r.reads as f64 / 2000.0;
    assert!((0.64..0.76).contains(&ratio), "read ratio {ratio}");
    assert_eq!(r.misses, 0, "prefilled keys must all be found: {r:?}");
    let p = r.prefill.as_ref().unwrap();
    assert_eq!((p.keys, p.errors), (200, 0));
    assert!(r.ops_per_second > 0.0);
    assert!(r.latency_us.p50 > 0 && r.latency_us.p50 <= r.latency_us.p999);
    // Only reads of keys that were never written: every one misses.
    let mut c = cfg(kind, endpoint, 200, 1.0, false);
    c.keys = 1_000_000;
    c.distribution = Distribution::Uniform;
    c.seed = 99;
    // Keys above the prefilled 200 were never written (a rare hit is possible
    // only for indexes < 200).
    let r = bench::run(c).await.unwrap();
    assert_eq!(r.errors, 0, "{r:?}");
    assert_eq!(r.reads, 200);
    assert!(r.misses >= 195, "{r:?}");
}

#[tokio::test]
async fn op_mix_against_a_real_redis_server() {
    let Some((_p, port)) = common::start_redis("op_mix_against_a_real_redis_server") else {
        return;
    };
    check_op_mix(DriverKind::Redis, format!("redis://127.0.0.1:{port}")).await;
}

// The etcd driver is built with `--features kvctl/etcd` (scripts/test.sh
// and bench/compare.sh ask for it; it needs protoc).
#[cfg(feature = "etcd")]
#[tokio::test]
async fn op_mix_against_a_real_etcd() {
    let Some((_p, port)) = common::start_etcd("op_mix_against_a_real_etcd") else {
        return;
    };
    check_op_mix(DriverKind::Etcd, format!("http://127.0.0.1:{port}")).await;
    let mut c = cfg(
        DriverKind::Etcd,
        format!("http://127.0.0.1:{port}"),
        100,
        1.0,
        false,
    );
    c.driver.etcd_serializable = true;
    let r = bench::run(c).await.unwrap();
    assert_eq!((r.errors, r.reads), (0, 100));
    assert_eq!(r.consistency.as_deref(), Some("serializable"));
}

#[cfg(not(feature = "etcd"))]
#[tokio::test]
async fn etcd_driver_not_built_says_which_feature_to_build() {
    let e = bench::run(cfg(
        DriverKind::Etcd,
        "http://127.0.0.1:1".to_string(),
        10,
        1.0,
        false,
    ))
    .await
    .expect_err("the etcd driver ran in a build without it");
    assert!(e.to_string().contains("feature `etcd`"), "{e}");
}

#[tokio::test]
async fn op_mix_against_a_real_kv_node() {
    let node = common::Node::start();
    check_op_mix(DriverKind::Kvstore, node.endpoint()).await;
}

/// A server whose first connection takes a request and never answers it,
/// while every later connection answers each request with 200. It stands in
/// for a node that hangs; it speaks only as much HTTP/1.1 as the bench sends
/// (headers, then a body of `content-length` bytes).
async fn hang_on_first_connection() -> (u16, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = std::sync::Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let n = count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    // one whole request: headers, then the body they announce
                    let request_end = buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| {
                        let head = String::from_utf8_lossy(&buf[..i]).to_ascii_lowercase();
                        let len = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .and_then(|v| v.trim().parse::<usize>().ok())
                            .unwrap_or(0);
                        i + 4 + len
                    });
                    match request_end {
                        Some(end) if buf.len() >= end => {
                            buf.drain(..end);
                            if n == 0 {
                                tokio::time::sleep(Duration::from_secs(20)).await;
                                return;
                            }
                            let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}";
                            if s.write_all(answer).await.is_err() {
                                return;
                            }
                        }
                        _ => match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(k) => buf.extend_from_slice(&chunk[..k]),
                        },
                    }
                }
            });
        }
    });
    (port, accepted)
}

#[tokio::test]
async fn an_operation_abandoned_at_its_timeout_does_not_hold_up_the_next() {
    let (port, accepted) = hang_on_first_connection().await;
    let mut c = cfg(
        DriverKind::Kvstore,
        format!("http://127.0.0.1:{port}"),
        4,
        0.0,
        false,
    );
    c.driver.connections = 1;
    c.driver.timeout = Duration::from_millis(300);
    c.warmup = Duration::ZERO;
    let r = tokio::time::timeout(Duration::from_secs(15), bench::run(c))
        .await
        .expect("the run did not end")
        .unwrap();
    // the first write times out on the hanging connection; the others go
    // over a new one instead of queueing behind the answer that never comes
    assert_eq!(r.errors_by_kind.get("timeout"), Some(&1), "{r:?}");
    assert_eq!((r.ops, r.errors), (3, 1), "{r:?}");
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 2);
}

#[tokio::test]
async fn unreachable_servers_fail_to_connect_or_count_errors() {
    let port = common::free_port();
    // Redis connects up front: a clear connect error.
    let e = bench::run(cfg(
        DriverKind::Redis,
        format!("redis://127.0.0.1:{port}"),
        10,
        0.5,
        false,
    ))
    .await
    .unwrap_err();
    assert!(e.to_string().contains("cannot connect"), "{e}");
    // HTTP connects lazily: every op is an error of kind `connect`.
    let r = bench::run(cfg(
        DriverKind::Kvstore,
        format!("http://127.0.0.1:{port}"),
        10,
        0.5,
        false,
    ))
    .await
    .unwrap();
    assert_eq!(r.ops, 0);
    assert_eq!(r.errors, 10);
    assert_eq!(r.errors_by_kind.get("connect"), Some(&10), "{r:?}");
}

#[test]
fn bench_cli_prints_json_against_redis() {
    let Some((_p, port)) = common::start_redis("bench_cli_prints_json_against_redis") else {
        return;
    };
    let o = common::run_kvctl(
        &[
            "bench",
            "--driver",
            "redis",
            "--endpoints",
            &format!("127.0.0.1:{port}"),
            "--ops",
            "500",
            "--warmup",
            "0s",
            "--connections",
            "4",
            "--keys",
            "100",
            "--read-ratio",
            "0.5",
            "-o",
            "json",
        ],
        &[],
        None,
    );
    assert!(o.status.success(), "{}", common::stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["driver"], "redis");
    assert_eq!(v["ops"], 500);
    assert_eq!(v["errors"], 0);
    // Every-op-fails runs exit 1 with a one-line reason.
    let o = common::run_kvctl(
        &[
            "bench",
            "--endpoints",
            &format!("127.0.0.1:{}", common::free_port()),
            "--ops",
            "5",
            "--warmup",
            "0s",
            "--quiet",
        ],
        &[],
        None,
    );
    assert_eq!(o.status.code(), Some(1));
    let err = common::stderr(&o);
    assert!(
        err.starts_with("kvctl: every operation failed (connect 5, the first: "),
        "{err}"
    );
    assert!(
        err.contains("Connection refused"),
        "the reason, not just a count: {err}"
    );
}
