//! Fuzz check for KvCluster parsing and `KvClusterSpec::validate`: the bytes
//! are a KvCluster file (what `kvctl up -f` and `kv-operator render -f` read
//! with serde_yaml) or a bare spec in YAML or JSON (the controller gets JSON
//! from the API server). Shared by the cargo-fuzz target `kvcluster_spec` and
//! the stable replay in operator/tests/fuzz_corpus.rs.
//!
//! Invariants: nothing panics; a parsed spec survives a YAML and a JSON round
//! trip; `validate` accepts exactly the specs that keep the CRD's rules it
//! covers, stated here independently of it: replicas 1..=128 and factor >= 1
//! (schema ranges), factor <= replicas unless the strategy is Full (CEL rule),
//! failedNodes distinct ordinals below replicas (CEL rule, listType set), an
//! image that is not blank, and a storage size matching the schema's quantity
//! pattern. A cluster that validates renders (`kv-operator render`) without a
//! serialization error.

use kv_operator::k8s::crd::{KvCluster, KvClusterSpec, MAX_REPLICAS};
use kv_operator::k8s::render::{RenderError, render};

/// `^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$`, the schema's
/// pattern for `storage.size`, by hand.
pub fn matches_size_pattern(s: &str) -> bool {
    let digits = |s: &str| s.len() - s.trim_start_matches(|c: char| c.is_ascii_digit()).len();
    let int = digits(s);
    if int == 0 {
        return false;
    }
    let mut rest = &s[int..];
    if let Some(frac) = rest.strip_prefix('.') {
        let n = digits(frac);
        if n == 0 {
            return false;
        }
        rest = &frac[n..];
    }
    matches!(
        rest,
        "" | "Ki" | "Mi" | "Gi" | "Ti" | "Pi" | "Ei" | "k" | "M" | "G" | "T" | "P" | "E"
    )
}

/// The first of the CRD's rules (as listed in the module docs) that `spec` breaks.
pub fn broken_rule(spec: &KvClusterSpec) -> Option<String> {
    let (replicas, r) = (spec.replicas, &spec.replication);
    if !(1..=MAX_REPLICAS).contains(&replicas) {
        return Some(format!("replicas {replicas} outside 1..={MAX_REPLICAS}"));
    }
    if r.factor < 1 {
        return Some("factor below 1".into());
    }
    if r.strategy != kv_core::Strategy::Full && r.factor > replicas {
        return Some(format!("factor {} above replicas {replicas}", r.factor));
    }
    let failed = &spec.fault_injection.failed_nodes;
    if let Some(o) = failed.iter().find(|o| **o >= replicas) {
        return Some(format!("failed ordinal {o} not below replicas {replicas}"));
    }
    if let Some((i, o)) = failed
        .iter()
        .enumerate()
        .find(|(i, o)| failed[..*i].contains(o))
    {
        return Some(format!("failed ordinal {o} repeated at index {i}"));
    }
    if spec.image.trim().is_empty() {
        return Some("blank image".into());
    }
    if !matches_size_pattern(&spec.storage.size) {
        return Some(format!(
            "storage size {:?} is not a quantity",
            spec.storage.size
        ));
    }
    None
}

fn check_spec(spec: &KvClusterSpec) {
    let verdict = spec.validate();
    let broken = broken_rule(spec);
    assert_eq!(
        verdict.is_ok(),
        broken.is_none(),
        "validate() says {verdict:?} but the CRD's rules say {broken:?} for {spec:?}"
    );
    let desired = spec.desired();
    assert_eq!(desired.replicas, spec.replicas);
    if verdict.is_ok() {
        let f = spec.effective_factor();
        assert!(
            (1..=spec.replicas).contains(&f),
            "effective factor {f} of a valid spec is outside 1..={}",
            spec.replicas
        );
    }
    let yaml = serde_yaml::to_string(spec).expect("a spec serializes to YAML");
    let back: KvClusterSpec = serde_yaml::from_str(&yaml)
        .unwrap_or_else(|e| panic!("the YAML of a parsed spec does not parse: {e}\n{yaml}"));
    assert_eq!(&back, spec, "YAML round trip changed the spec:\n{yaml}");
    let json = serde_json::to_string(spec).expect("a spec serializes to JSON");
    let back: KvClusterSpec = serde_json::from_str(&json)
        .unwrap_or_else(|e| panic!("the JSON of a parsed spec does not parse: {e}\n{json}"));
    assert_eq!(&back, spec, "JSON round trip changed the spec:\n{json}");
}

pub fn check(data: &[u8]) {
    if let Ok(kvc) = serde_yaml::from_slice::<KvCluster>(data) {
        check_spec(&kvc.spec);
        if kvc.spec.validate().is_ok() {
            match render(&kvc) {
                Ok(docs) => assert!(docs.starts_with("---\n"), "render gave {docs:?}"),
                // The planner may refuse a valid spec (e.g. every node held down).
                Err(RenderError::InvalidSpec(_)) => {}
                Err(e) => panic!("a valid KvCluster does not render: {e}"),
            }
        }
    }
    if let Ok(spec) = serde_yaml::from_slice::<KvClusterSpec>(data) {
        check_spec(&spec);
    }
    if let Ok(spec) = serde_json::from_slice::<KvClusterSpec>(data) {
        check_spec(&spec);
    }
}
