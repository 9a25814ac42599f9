//! `kvctl bench`: a load generator for kvstore, etcd and Redis.
//!
//! Workers (one connection each) pick keys from a [`zipf::KeyChooser`], mix
//! reads and writes by `--read-ratio`, and record latencies into per-worker
//! HdrHistograms that are merged into a [`stats::Report`] at the end.

pub mod driver;
pub mod rng;
pub mod stats;
pub mod zipf;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Args;
use kv_core::Consistency;

pub use driver::{Conn, Connector, DriverConfig, DriverKind, OpError};
use rng::Rng;
pub use stats::{OpKind, Outcome, Recorder, Report};
pub use zipf::{Distribution, KeyChooser};

use crate::client::{base_url, consistency_header};

/// `kvctl bench` options.
#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// System to drive.
    #[arg(long, value_enum, default_value_t = DriverKind::Kvstore)]
    pub driver: DriverKind,
    /// Comma-separated endpoints (kvstore: requests go round-robin over them;
    /// default: --endpoint; etcd: 127.0.0.1:2379; redis: 127.0.0.1:6379).
    #[arg(long, value_delimiter = ',')]
    pub endpoints: Vec<String>,
    /// Concurrent workers, one connection each.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub connections: u64,
    /// Size of the key space.
    #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..=1_000_000_000))]
    pub keys: u64,
    /// Bytes per value.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(0..=64 * 1024 * 1024))]
    pub value_size: u64,
    /// Fraction of operations that are reads (0.0..=1.0).
    #[arg(long, default_value_t = 0.5, value_parser = parse_ratio)]
    pub read_ratio: f64,
    /// Key popularity (zipfian: exponent 0.99, hot keys scattered).
    #[arg(long, value_enum, default_value_t = Distribution::Uniform)]
    pub distribution: Distribution,
    /// Measured run time (e.g. 10s, 500ms, 2m).
    #[arg(long, default_value = "10s", value_parser = parse_duration, conflicts_with = "ops")]
    pub duration: Duration,
    /// Measured operation count instead of a duration.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub ops: Option<u64>,
    /// Unmeasured run time before measuring.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub warmup: Duration,
    /// etcd: serializable reads instead of linearizable ones.
    #[arg(long)]
    pub etcd_serializable: bool,
    /// Write every key once before the run.
    #[arg(long)]
    pub prefill: bool,
    /// Per-operation timeout.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub op_timeout: Duration,
    /// Random seed (key choice, op mix, values); default: from the clock.
    #[arg(long)]
    pub seed: Option<u64>,
    /// No progress line on stderr.
    #[arg(long)]
    pub quiet: bool,
}

fn parse_ratio(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.0..=1.0).contains(&v) => Ok(v),
        _ => Err(format!("{s:?} is not a ratio between 0.0 and 1.0")),
    }
}

/// `10s`, `500ms`, `2m`, `1h`, `1.5s`; a bare number is seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (e.g. 10s, 500ms, 2m)"))?;
    let secs = match unit.trim() {
        "" | "s" => n,
        "ms" => n / 1000.0,
        "m" | "min" => n * 60.0,
        "h" => n * 3600.0,
        u => return Err(format!("unknown unit {u:?} in {s:?} (use ms, s, m or h)")),
    };
    if !secs.is_finite() || !(0.0..=7.0 * 86_400.0).contains(&secs) {
        return Err(format!("{s:?} is out of range (0 to 7 days)"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// When the measured phase ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    After(Duration),
    Ops(u64),
}

/// A fully resolved run.
#[derive(Clone, Debug)]
pub struct BenchConfig {
    pub driver: DriverConfig,
    pub keys: u64,
    pub value_size: usize,
    pub read_ratio: f64,
    pub distribution: Distribution,
    pub stop: Stop,
    pub warmup: Duration,
    pub prefill: bool,
    pub seed: u64,
    pub progress: bool,
}

/// Why a run could not start.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("{0}")]
    Config(String),
    #[error("cannot connect: {0}")]
    Connect(OpError),
    #[error(transparent)]
    Keys(#[from] zipf::ZipfError),
    #[error("a worker stopped unexpectedly: {0}")]
    Worker(String),
}

/// Normalises an endpoint for a driver (adds the scheme it needs).
pub fn normalize_endpoint(kind: DriverKind, e: &str) -> Result<String, BenchError> {
    let e = e.trim();
    if e.is_empty() {
        return Err(BenchError::Config("empty endpoint".into()));
    }
    Ok(match kind {
        DriverKind::Kvstore => base_url(e).map_err(|x| BenchError::Config(x.to_string()))?,
        DriverKind::Redis if e.contains("://") => e.to_string(),
        DriverKind::Redis => format!("redis://{e}"),
        DriverKind::Etcd if e.contains("://") => e.to_string(),
        DriverKind::Etcd => format!("http://{e}"),
    })
}

impl BenchConfig {
    /// Resolves command-line options; `endpoint`, `token` and `consistency`
    /// are kvctl's global flags.
    pub fn from_args(
        args: &BenchArgs,
        endpoint: &str,
        token: Option<String>,
        consistency: Option<Consistency>,
        tls: crate::client::TlsOptions,
    ) -> Result<BenchConfig, BenchError> {
        let raw: Vec<String> = if !args.endpoints.is_empty() {
            args.endpoints.clone()
        } else if args.driver == DriverKind::Kvstore {
            vec![endpoint.to_string()]
        } else {
            vec![args.driver.default_endpoint().to_string()]
        };
        let endpoints = raw
            .iter()
            .filter(|e| !e.trim().is_empty())
            .map(|e| normalize_endpoint(args.driver, e))
            .collect::<Result<Vec<_>, _>>()?;
        if endpoints.is_empty() {
            return Err(BenchError::Config("--endpoints names no endpoint".into()));
        }
        let seed = args.seed.unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        });
        let connections = usize::try_from(args.connections)
            .map_err(|_| BenchError::Config("too many connections".into()))?;
        Ok(BenchConfig {
            driver: DriverConfig {
                kind: args.driver,
                endpoints,
                token: if args.driver == DriverKind::Kvstore {
                    token
                } else {
                    None
                },
                consistency: if args.driver == DriverKind::Kvstore {
                    consistency
                } else {
                    None
                },
                etcd_serializable: args.etcd_serializable,
                timeout: args.op_timeout.max(Duration::from_millis(1)),
                connections,
                tls,
            },
            keys: args.keys,
            value_size: usize::try_from(args.value_size)
                .map_err(|_| BenchError::Config("value size too large".into()))?,
            read_ratio: args.read_ratio,
            distribution: args.distribution,
            stop: match args.ops {
                Some(n) => Stop::Ops(n),
                None => Stop::After(args.duration),
            },
            warmup: args.warmup,
            prefill: args.prefill,
            seed,
            progress: !args.quiet,
        })
    }
}

/// The key of index `i` (fixed width so that keys sort by index).
pub fn key_of(i: u64, buf: &mut Vec<u8>) {
    use std::io::Write as _;
    buf.clear();
    // Writing into a Vec cannot fail.
    let _ = write!(buf, "bench-{i:010}");
}

/// A value of `size` printable bytes drawn from `seed`.
pub fn make_value(size: usize, seed: u64) -> Vec<u8> {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    let mut rng = Rng::new(seed ^ 0xA5A5_5A5A);
    (0..size)
        .map(|_| ALPHABET[rng.below(ALPHABET.len() as u64) as usize])
        .collect()
}

/// Counters the progress line reads while workers run.
#[derive(Default)]
struct Shared {
    done: AtomicU64,
    errors: AtomicU64,
    issued: AtomicU64,
    stop: AtomicBool,
}

async fn timed<F>(timeout: Duration, f: F) -> Result<Outcome, OpError>
where
    F: std::future::Future<Output = Result<Outcome, OpError>>,
{
    match tokio::time::timeout(timeout, f).await {
        Ok(r) => r,
        Err(_) => Err(OpError::new(
            "timeout",
            format!("no answer within {timeout:?}"),
        )),
    }
}

/// Writes every key once, spread over the connections.
async fn prefill(
    cfg: &BenchConfig,
    conns: Vec<Conn>,
    value: Arc<Vec<u8>>,
) -> Result<(Vec<Conn>, stats::PrefillReport), BenchError> {
    let start = Instant::now();
    let workers = conns.len() as u64;
    let keys = cfg.keys;
    let timeout = cfg.driver.timeout;
    let handles: Vec<_> = conns
        .into_iter()
        .enumerate()
        .map(|(w, mut conn)| {
            let value = value.clone();
            tokio::spawn(async move {
                let mut errors = 0u64;
                let mut key = Vec::with_capacity(32);
                let mut i = w as u64;
                while i < keys {
                    key_of(i, &mut key);
                    if timed(timeout, conn.put(&key, &value)).await.is_err() {
                        errors += 1;
                    }
                    i += workers;
                }
                (conn, errors)
            })
        })
        .collect();
    let mut conns = Vec::new();
    let mut errors = 0;
    for h in handles {
        let (c, e) = h.await.map_err(|e| BenchError::Worker(e.to_string()))?;
        conns.push(c);
        errors += e;
    }
    Ok((
        conns,
        stats::PrefillReport {
            keys,
            seconds: start.elapsed().as_secs_f64(),
            errors,
        },
    ))
}

/// Runs the benchmark and returns its report.
pub async fn run(cfg: BenchConfig) -> Result<Report, BenchError> {
    if cfg.keys == 0 {
        return Err(BenchError::Config("--keys must be at least 1".into()));
    }
    let connector = Connector::new(cfg.driver.clone()).map_err(BenchError::Connect)?;
    let chooser = Arc::new(KeyChooser::new(cfg.distribution, cfg.keys)?);
    let value = Arc::new(make_value(cfg.value_size, cfg.seed));
    let n = cfg.driver.connections.max(1);
    let mut conns = Vec::with_capacity(n);
    for r in futures::future::join_all((0..n).map(|w| connector.connect(w))).await {
        conns.push(r.map_err(BenchError::Connect)?);
    }

    let mut report = Report {
        driver: cfg.driver.kind.name().to_string(),
        endpoints: cfg.driver.endpoints.clone(),
        connections: n,
        keys: cfg.keys,
        value_size: cfg.value_size,
        read_ratio: cfg.read_ratio,
        distribution: match cfg.distribution {
            Distribution::Uniform => "uniform".into(),
            Distribution::Zipfian => format!("zipfian({})", zipf::DEFAULT_THETA),
        },
        consistency: cfg
            .driver
            .consistency
            .map(|c| consistency_header(c).to_string()),
        warmup_seconds: cfg.warmup.as_secs_f64(),
        ..Report::default()
    };
    if cfg.driver.kind == DriverKind::Etcd {
        report.consistency = Some(if cfg.driver.etcd_serializable {
            "serializable".into()
        } else {
            "linearizable".into()
        });
    }

    if cfg.prefill {
        if cfg.progress {
            eprintln!("prefill: writing {} keys", cfg.keys);
        }
        let (c, p) = prefill(&cfg, conns, value.clone()).await?;
        conns = c;
        report.prefill = Some(p);
    }

    let shared = Arc::new(Shared::default());
    let start = Instant::now();
    let measure_start = start + cfg.warmup;
    let progress = cfg
        .progress
        .then(|| tokio::spawn(progress_loop(shared.clone(), start, measure_start)));

    let handles: Vec<_> = conns
        .into_iter()
        .enumerate()
        .map(|(w, conn)| {
            let shared = shared.clone();
            let chooser = chooser.clone();
            let value = value.clone();
            let seed = cfg
                .seed
                .wrapping_add((w as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
            let (stop, read_ratio, timeout) = (cfg.stop, cfg.read_ratio, cfg.driver.timeout);
            tokio::spawn(worker(
                conn,
                shared,
                chooser,
                value,
                seed,
                stop,
                read_ratio,
                timeout,
                measure_start,
            ))
        })
        .collect();

    let mut total = Recorder::new();
    let mut last: Option<Instant> = None;
    let mut failure = None;
    for h in handles {
        match h.await {
            Ok((rec, l)) => {
                total.merge(&rec);
                last = last.max(l);
            }
            Err(e) => failure = Some(e.to_string()),
        }
    }
    shared.stop.store(true, Ordering::Relaxed);
    if let Some(p) = progress {
        p.abort();
    }
    if let Some(e) = failure {
        return Err(BenchError::Worker(e));
    }
    let elapsed = last
        .map(|l| l.saturating_duration_since(measure_start))
        .unwrap_or_default();
    report.fill(&total, elapsed);
    Ok(report)
}

#[allow(clippy::too_many_arguments)]
async fn worker(
    mut conn: Conn,
    shared: Arc<Shared>,
    chooser: Arc<KeyChooser>,
    value: Arc<Vec<u8>>,
    seed: u64,
    stop: Stop,
    read_ratio: f64,
    timeout: Duration,
    measure_start: Instant,
) -> (Recorder, Option<Instant>) {
    let mut rng = Rng::new(seed);
    let mut rec = Recorder::new();
    let mut key = Vec::with_capacity(32);
    let mut last = None;
    loop {
        if shared.stop.load(Ordering::Relaxed) {
            break;
        }
        let now = Instant::now();
        let measuring = now >= measure_start;
        if measuring {
            match stop {
                Stop::After(d) if now >= measure_start + d => break,
                Stop::Ops(n) if shared.issued.fetch_add(1, Ordering::Relaxed) >= n => break,
                _ => {}
            }
        }
        key_of(chooser.next(&mut rng), &mut key);
        let op = if rng.next_f64() < read_ratio {
            OpKind::Read
        } else {
            OpKind::Write
        };
        let t0 = Instant::now();
        let res = match op {
            OpKind::Read => timed(timeout, conn.get(&key)).await,
            OpKind::Write => timed(timeout, conn.put(&key, &value)).await,
        };
        let done = Instant::now();
        shared.done.fetch_add(1, Ordering::Relaxed);
        if res.is_err() {
            shared.errors.fetch_add(1, Ordering::Relaxed);
        }
        if measuring {
            match res {
                Ok(outcome) => rec.record(op, outcome, done - t0),
                Err(e) => rec.error_with(&e.kind, &e.detail),
            }
            last = Some(done);
        }
    }
    (rec, last)
}

async fn progress_loop(shared: Arc<Shared>, start: Instant, measure_start: Instant) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    let mut prev_done = 0;
    let mut prev_t = Instant::now();
    loop {
        tick.tick().await;
        if shared.stop.load(Ordering::Relaxed) {
            break;
        }
        let now = Instant::now();
        let done = shared.done.load(Ordering::Relaxed);
        let rate = (done - prev_done) as f64 / (now - prev_t).as_secs_f64().max(1e-9);
        let phase = if now < measure_start { "warmup " } else { "" };
        eprintln!(
            "[{:>4.0}s] {phase}{rate:.0} ops/s, {done} ops, {} errors",
            (now - start).as_secs_f64(),
            shared.errors.load(Ordering::Relaxed)
        );
        prev_done = done;
        prev_t = now;
    }
}
