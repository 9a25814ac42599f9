//! Latency histograms, counters and the final report.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Highest latency the histograms track (longer ones are clamped): 60 s.
const MAX_MICROS: u64 = 60_000_000;

/// What one operation did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpKind {
    Read,
    Write,
}

/// The outcome of an operation that answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A write acknowledged, or a read that found the key.
    Ok,
    /// A read of a key that is not there.
    Miss,
}

fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_MICROS, 3).expect("constant histogram bounds are valid")
}

/// One worker's measurements (merged at the end).
#[derive(Clone, Debug)]
pub struct Recorder {
    pub all: Histogram<u64>,
    pub reads: Histogram<u64>,
    pub writes: Histogram<u64>,
    pub misses: u64,
    pub errors: BTreeMap<String, u64>,
    /// The first error of each kind, in full: what a count cannot explain.
    pub first_errors: BTreeMap<String, String>,
}

impl Default for Recorder {
    fn default() -> Self {
        Recorder::new()
    }
}

impl Recorder {
    pub fn new() -> Recorder {
        Recorder {
            all: new_hist(),
            reads: new_hist(),
            writes: new_hist(),
            misses: 0,
            errors: BTreeMap::new(),
            first_errors: BTreeMap::new(),
        }
    }

    /// Records an operation that answered, with its latency.
    pub fn record(&mut self, op: OpKind, outcome: Outcome, latency: Duration) {
        let us = u64::try_from(latency.as_micros())
            .unwrap_or(u64::MAX)
            .clamp(1, MAX_MICROS);
        self.all.saturating_record(us);
        match op {
            OpKind::Read => self.reads.saturating_record(us),
            OpKind::Write => self.writes.saturating_record(us),
        }
        if outcome == Outcome::Miss {
            self.misses += 1;
        }
    }

    /// Records a failed operation by the kind of its error.
    pub fn error(&mut self, kind: &str) {
        *self.errors.entry(kind.to_string()).or_insert(0) += 1;
    }

    /// [`Recorder::error`], keeping the first `detail` of each kind.
    pub fn error_with(&mut self, kind: &str, detail: &str) {
        self.error(kind);
        self.first_errors
            .entry(kind.to_string())
            .or_insert_with(|| detail.to_string());
    }

    pub fn merge(&mut self, other: &Recorder) {
        // Same bounds on both sides: adding cannot fail; if it did, the
        // values were clamped on record already.
        let _ = self.all.add(&other.all);
        let _ = self.reads.add(&other.reads);
        let _ = self.writes.add(&other.writes);
        self.misses += other.misses;
        for (k, v) in &other.errors {
            *self.errors.entry(k.clone()).or_insert(0) += v;
        }
        for (k, d) in &other.first_errors {
            self.first_errors
                .entry(k.clone())
                .or_insert_with(|| d.clone());
        }
    }

    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }
}

/// Latency percentiles in microseconds.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Latency {
    pub count: u64,
    pub mean: f64,
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
}

impl Latency {
    pub fn of(h: &Histogram<u64>) -> Latency {
        if h.is_empty() {
            return Latency::default();
        }
        Latency {
            count: h.len(),
            mean: h.mean(),
            p50: h.value_at_quantile(0.50),
            p90: h.value_at_quantile(0.90),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
        }
    }
}

/// Prefill results.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PrefillReport {
    pub keys: u64,
    pub seconds: f64,
    pub errors: u64,
}

/// The result of a run (`-o json` prints this).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    pub driver: String,
    pub endpoints: Vec<String>,
    pub connections: usize,
    pub keys: u64,
    pub value_size: usize,
    pub read_ratio: f64,
    pub distribution: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub consistency: Option<String>,
    pub warmup_seconds: f64,
    pub seconds: f64,
    /// Operations that answered (hits, misses and writes), after warm-up.
    pub ops: u64,
    pub ops_per_second: f64,
    pub reads: u64,
    pub writes: u64,
    pub misses: u64,
    pub errors: u64,
    pub errors_by_kind: BTreeMap<String, u64>,
    /// One full error message of each kind counted in `errors_by_kind`.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub error_examples: BTreeMap<String, String>,
    /// Microseconds, every answered operation.
    pub latency_us: Latency,
    pub read_latency_us: Latency,
    pub write_latency_us: Latency,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prefill: Option<PrefillReport>,
}

impl Report {
    /// Fills the counts and percentiles from merged measurements over `elapsed`.
    pub fn fill(&mut self, rec: &Recorder, elapsed: Duration) {
        let secs = elapsed.as_secs_f64();
        self.seconds = secs;
        self.ops = rec.all.len();
        self.reads = rec.reads.len();
        self.writes = rec.writes.len();
        self.misses = rec.misses;
        self.errors = rec.error_count();
        self.errors_by_kind = rec.errors.clone();
        self.error_examples = rec.first_errors.clone();
        self.ops_per_second = if secs > 0.0 {
            self.ops as f64 / secs
        } else {
            0.0
        };
        self.latency_us = Latency::of(&rec.all);
        self.read_latency_us = Latency::of(&rec.reads);
        self.write_latency_us = Latency::of(&rec.writes);
    }

    /// The human rendering.
    pub fn render(&self) -> String {
        let mut o = String::new();
        let level = self
            .consistency
            .as_ref()
            .map(|c| format!(", consistency {c}"))
            .unwrap_or_default();
        let _ = writeln!(
            o,
            "driver     {} ({} endpoint(s), {} connections{level})",
            self.driver,
            self.endpoints.len(),
            self.connections
        );
        let _ = writeln!(
            o,
            "workload   {} keys, {}, {}-byte values, {:.0}% reads",
            self.keys,
            self.distribution,
            self.value_size,
            self.read_ratio * 100.0
        );
        if let Some(p) = &self.prefill {
            let _ = writeln!(
                o,
                "prefill    {} keys in {:.2}s, {} errors",
                p.keys, p.seconds, p.errors
            );
        }
        let _ = writeln!(
            o,
            "duration   {:.2}s (after {:.1}s warm-up)",
            self.seconds, self.warmup_seconds
        );
        let _ = writeln!(
            o,
            "ops        {} ({:.1} ops/s): {} reads ({} misses), {} writes",
            self.ops, self.ops_per_second, self.reads, self.misses, self.writes
        );
        if self.errors == 0 {
            let _ = writeln!(o, "errors     0");
        } else {
            let kinds: Vec<String> = self
                .errors_by_kind
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect();
            let _ = writeln!(o, "errors     {} ({})", self.errors, kinds.join(", "));
            for (k, d) in &self.error_examples {
                let _ = writeln!(o, "  first {k}: {d}");
            }
        }
        for (name, l) in [
            ("latency", &self.latency_us),
            ("  reads", &self.read_latency_us),
            ("  writes", &self.write_latency_us),
        ] {
            if l.count == 0 {
                continue;
            }
            let _ = writeln!(
                o,
                "{name:<10} p50 {}  p90 {}  p99 {}  p999 {}  max {}  mean {}",
                ms(l.p50 as f64),
                ms(l.p90 as f64),
                ms(l.p99 as f64),
                ms(l.p999 as f64),
                ms(l.max as f64),
                ms(l.mean)
            );
        }
        o
    }
}

/// Microseconds as a short millisecond figure: `1234` → `1.23ms`.
pub fn ms(us: f64) -> String {
    let v = us / 1000.0;
    if v >= 100.0 {
        format!("{v:.0}ms")
    } else if v >= 10.0 {
        format!("{v:.1}ms")
    } else {
        format!("{v:.2}ms")
    }
}
