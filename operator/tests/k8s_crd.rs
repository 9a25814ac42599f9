//! The checked-in CRDs (`deploy/crd.yaml`, `deploy/crd-kvbackup.yaml`) are
//! exactly what the Rust types generate.

use std::path::Path;

fn matches(file: &str, kind: &str, generated: String) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(file);
    let checked_in = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    assert!(
        checked_in == generated,
        "deploy/{file} is stale; regenerate it with\n  \
         cargo run -p kv-operator -- crd {kind} > deploy/{file}\n\
         --- generated ---\n{generated}"
    );
}

#[test]
fn the_checked_in_crd_matches_the_rust_types() {
    matches(
        "crd.yaml",
        "kvcluster",
        kv_operator::k8s::crd::crd_yaml().expect("the CRD serializes"),
    );
}

#[test]
fn the_checked_in_kvbackup_crd_matches_the_rust_types() {
    matches(
        "crd-kvbackup.yaml",
        "kvbackup",
        kv_operator::k8s::backup::crd_yaml().expect("the CRD serializes"),
    );
}

fn example(rel: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/examples")
        .join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

#[test]
fn the_valid_examples_parse_and_pass_the_operators_checks() {
    for name in ["minimal.yaml", "full.yaml", "fault-injection.yaml"] {
        let kvc: kv_operator::k8s::KvCluster = serde_yaml::from_str(&example(name))
            .unwrap_or_else(|e| panic!("{name} does not parse: {e}"));
        assert_eq!(kvc.spec.validate(), Ok(()), "{name}");
    }
}

/// The API server refuses these through the schema; the operator's own checks
/// (for a CRD installed without the schema) refuse the same ones, with the
/// reason given here. `unknown-field.yaml` is left to strict field validation.
#[test]
fn the_invalid_examples_are_refused_for_the_reason_in_their_name() {
    let cases = [
        ("factor-above-replicas.yaml", "exceeds replicas"),
        ("failed-node-out-of-range.yaml", "ordinal 3"),
        ("unknown-strategy.yaml", "unknown variant `Ring`"),
        ("zero-replicas.yaml", "replicas must be 1..="),
        ("bad-consistency.yaml", "unknown variant `Most`"),
        ("bad-storage-size.yaml", "not a Kubernetes quantity"),
        ("duplicate-failed-node.yaml", "repeats ordinal 1"),
    ];
    for (name, reason) in cases {
        let text = example(&format!("invalid/{name}"));
        let err = match serde_yaml::from_str::<kv_operator::k8s::KvCluster>(&text) {
            Err(e) => e.to_string(),
            Ok(kvc) => kvc
                .spec
                .validate()
                .expect_err(&format!("{name} passed the operator's checks")),
        };
        assert!(
            err.contains(reason),
            "{name}: expected {reason:?}, got {err:?}"
        );
    }
    let listed =
        std::fs::read_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/invalid"))
            .expect("deploy/examples/invalid exists")
            .count();
    assert_eq!(
        listed,
        cases.len() + 1,
        "every invalid example is covered here (plus unknown-field.yaml)"
    );
}

/// The API server reads manifests as YAML 1.1, where unquoted `on`, `off`,
/// `yes`, `no`, `y`, `n` (any case) are booleans: a default or enum value
/// spelled so becomes `false` and the CRD, or a user's manifest, is refused
/// (the real API server refused `default: Off` for `spec.tls.mode`).
#[test]
fn no_default_or_enum_value_in_the_crd_reads_as_a_yaml_1_1_boolean() {
    for file in ["crd.yaml", "crd-kvbackup.yaml"] {
        no_yaml_1_1_booleans(file);
    }
}

fn no_yaml_1_1_booleans(file: &str) {
    let crd = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../deploy")
            .join(file),
    )
    .expect("deploy CRD");
    let words = ["on", "off", "yes", "no", "y", "n"];
    let mut in_enum = false;
    for (i, line) in crd.lines().enumerate() {
        let t = line.trim();
        let value = if let Some(v) = t.strip_prefix("default:") {
            in_enum = false;
            Some(v.trim())
        } else if t == "enum:" {
            in_enum = true;
            None
        } else if in_enum && t.starts_with("- ") {
            Some(t[2..].trim())
        } else {
            in_enum = false;
            None
        };
        if let Some(v) = value {
            assert!(
                !words.contains(&v.to_ascii_lowercase().as_str()),
                "deploy/{file} line {}: {t:?} is a boolean to a YAML 1.1 reader",
                i + 1
            );
        }
    }
}
