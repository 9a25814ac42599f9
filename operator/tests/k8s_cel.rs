//! The CEL rules of the checked-in CRD (`deploy/crd.yaml`), evaluated
//! client-side with kube's CEL interpreter: they compile, stay within the API
//! server's cost budget, accept the valid examples and refuse the invalid ones
//! with their message. (Enums, ranges and patterns are plain OpenAPI; the
//! deploy checks validate those with `kubernetes-validate --strict`.)

use std::path::Path;

use kube::core::cel::{CompiledSchema, Validator, compile_schema, estimate_rule_cost};
use serde_json::Value;

fn read(rel: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn yaml(rel: &str) -> Value {
    serde_yaml::from_str(&read(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// The openAPIV3Schema of v1alpha1 in deploy/crd.yaml.
fn schema() -> Value {
    let crd = yaml("deploy/crd.yaml");
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone()
}

fn walk<'a>(s: &'a CompiledSchema, out: &mut Vec<&'a CompiledSchema>) {
    out.push(s);
    for p in s.properties.values() {
        walk(p, out);
    }
    if let Some(i) = &s.items {
        walk(i, out);
    }
    if let Some(a) = &s.additional_properties {
        walk(a, out);
    }
}

#[test]
fn every_cel_rule_of_the_crd_compiles_and_fits_the_cost_budget() {
    let compiled = compile_schema(&schema());
    let mut nodes = Vec::new();
    walk(&compiled, &mut nodes);
    let mut rules = 0;
    for node in nodes {
        assert!(
            node.compilation_errors().is_empty(),
            "{:?}",
            node.compilation_errors()
        );
        for rule in node.validations.iter().flatten() {
            rules += 1;
            let warnings = estimate_rule_cost(&rule.rule.rule, node);
            assert!(warnings.is_empty(), "{}: {warnings:?}", rule.rule.rule);
        }
    }
    assert_eq!(
        rules, 6,
        "factor <= replicas, failed ordinals in range, immutable storage class, tls.secretName with Provided, immutable bootstrap, bootstrap destination"
    );
}

#[test]
fn the_valid_examples_pass_every_cel_rule() {
    let schema = schema();
    for name in ["minimal.yaml", "full.yaml", "fault-injection.yaml"] {
        let obj = yaml(&format!("deploy/examples/{name}"));
        if let Err(e) = Validator::new().validate(&schema, &obj, None) {
            panic!("{name}: {e}");
        }
    }
}

#[test]
fn the_cel_refuses_a_factor_above_replicas_and_failed_ordinals_out_of_range() {
    let schema = schema();
    for (name, message) in [
        (
            "factor-above-replicas.yaml",
            "replication.factor must not exceed replicas",
        ),
        ("failed-node-out-of-range.yaml", "must be below replicas"),
    ] {
        let obj = yaml(&format!("deploy/examples/invalid/{name}"));
        let err = Validator::new()
            .validate(&schema, &obj, None)
            .expect_err(&format!("{name} passed the CEL rules"));
        assert!(err.to_string().contains(message), "{name}: {err}");
    }
}

#[test]
fn a_full_strategy_may_name_a_factor_above_replicas() {
    let obj: Value = serde_yaml::from_str(
        "{apiVersion: kvstore.dev/v1alpha1, kind: KvCluster, metadata: {name: x},
          spec: {replicas: 1, replication: {strategy: Full}}}",
    )
    .expect("yaml");
    // The default factor is 3; Full ignores it.
    assert!(Validator::new().validate(&schema(), &obj, None).is_ok());
}

#[test]
fn the_storage_size_may_change_but_not_the_class() {
    let schema = schema();
    let old = yaml("deploy/examples/minimal.yaml");
    let mut scaled = old.clone();
    scaled["spec"]["replicas"] = 5.into();
    scaled["spec"]["storage"] = serde_json::json!({"size": "5Gi"});
    assert!(
        Validator::new()
            .validate(&schema, &scaled, Some(&old))
            .is_ok(),
        "a resize (the operator refuses a shrink itself, with a condition)"
    );
    let mut classed = old.clone();
    classed["spec"]["storage"] = serde_json::json!({"size": "1Gi", "storageClassName": "fast"});
    for (new, old) in [(&classed, &old), (&old, &classed)] {
        let err = Validator::new()
            .validate(&schema, new, Some(old))
            .expect_err("a class added or removed is refused");
        assert!(
            err.to_string().contains("storageClassName is immutable"),
            "{err}"
        );
    }
    let mut reclassed = classed.clone();
    reclassed["spec"]["storage"]["storageClassName"] = "slow".into();
    assert!(
        Validator::new()
            .validate(&schema, &reclassed, Some(&classed))
            .is_err(),
        "another class is refused"
    );
    let mut grown = classed.clone();
    grown["spec"]["storage"]["size"] = "2Gi".into();
    assert!(
        Validator::new()
            .validate(&schema, &grown, Some(&classed))
            .is_ok()
    );
}

#[test]
fn a_tls_secret_name_is_given_exactly_with_the_provided_mode() {
    let spec = |tls: &str| -> Value {
        serde_yaml::from_str(&format!(
            "{{apiVersion: kvstore.dev/v1alpha1, kind: KvCluster, metadata: {{name: x}},
              spec: {{replicas: 3, tls: {tls}}}}}"
        ))
        .expect("yaml")
    };
    let v = Validator::new();
    for ok in [
        "{mode: Provided, secretName: x-cert}",
        "{mode: Generated}",
        "{mode: Disabled}",
        "{}",
    ] {
        if let Err(e) = v.validate(&schema(), &spec(ok), None) {
            panic!("tls {ok}: {e}");
        }
    }
    for bad in [
        "{mode: Provided}",
        "{mode: Generated, secretName: x-cert}",
        "{secretName: x-cert}",
    ] {
        let err = v
            .validate(&schema(), &spec(bad), None)
            .expect_err(&format!("tls {bad} passed the CEL rules"));
        assert!(
            err.to_string()
                .contains("tls.secretName is given exactly when tls.mode is Provided"),
            "tls {bad}: {err}"
        );
    }
}

#[test]
fn bootstrap_is_given_at_creation_and_never_changes() {
    let schema = schema();
    let plain = yaml("deploy/examples/minimal.yaml");
    let mut restored = plain.clone();
    restored["spec"]["bootstrap"] =
        serde_json::json!({"fromBackup": {"destination": "s3://backups/demo"}});
    assert!(
        Validator::new().validate(&schema, &restored, None).is_ok(),
        "a new KvCluster started from a backup"
    );
    let mut scaled = restored.clone();
    scaled["spec"]["replicas"] = 5.into();
    assert!(
        Validator::new()
            .validate(&schema, &scaled, Some(&restored))
            .is_ok(),
        "other fields still change"
    );
    let mut elsewhere = restored.clone();
    elsewhere["spec"]["bootstrap"]["fromBackup"]["destination"] = "s3://backups/other".into();
    for (new, old) in [
        (&restored, &plain),
        (&plain, &restored),
        (&elsewhere, &restored),
    ] {
        let err = Validator::new()
            .validate(&schema, new, Some(old))
            .expect_err("bootstrap added, removed or changed");
        assert!(err.to_string().contains("cannot change"), "{err}");
    }
    let mut bad = plain.clone();
    bad["spec"]["bootstrap"] = serde_json::json!({"fromBackup": {"destination": "http://x/y/z"}});
    let err = Validator::new()
        .validate(&schema, &bad, None)
        .expect_err("not s3:// nor file:///");
    assert!(err.to_string().contains("s3://bucket/prefix"), "{err}");
}
