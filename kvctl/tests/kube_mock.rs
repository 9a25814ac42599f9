//! `kvctl fail|recover|nodes --cluster NAME` against a mocked API server.
//!
//! Each scenario lists the exact API calls [`Target`] must make, in order,
//! with the answer the API server gives; the mock fails the test on any other
//! call, on a call out of order, and on a call left unmade.

use std::time::Duration;

use http::{Method, StatusCode};
use kv_testkit::kube_mock::{self, Call, Seen, status};
use kvctl::k8s::{KubeError, MAX_ATTEMPTS, Outcome, Target};
use serde_json::{Value, json};

const PATH: &str = "/apis/kvstore.dev/v1alpha1/namespaces/ns/kvclusters/demo";

/// A call on the KvCluster `ns/demo` (a create goes to the collection).
fn call(
    method: Method,
    respond: impl FnOnce(&Value) -> (StatusCode, Value) + Send + 'static,
) -> Call {
    let path = if method == Method::POST {
        PATH.trim_end_matches("/demo")
    } else {
        PATH
    };
    kube_mock::call(method, path, respond)
}

/// The KvCluster as the API server stores it.
fn kvcluster(resource_version: &str, failed: &[u32], states: &[&str]) -> Value {
    json!({
        "apiVersion": "kvstore.dev/v1alpha1",
        "kind": "KvCluster",
        "metadata": {"name": "demo", "namespace": "ns", "resourceVersion": resource_version,
                     "generation": 2, "uid": "uid-1"},
        "spec": {"replicas": 3, "faultInjection": {"failedNodes": failed}},
        "status": {
            "phase": "Running", "observedGeneration": 2, "readyReplicas": 3, "topologyEpoch": 5,
            "nodes": states.iter().enumerate().map(|(i, s)| json!({
                "ordinal": i, "pod": format!("demo-{i}"), "state": s
            })).collect::<Vec<_>>(),
        }
    })
}

const UP3: [&str; 3] = ["Up", "Up", "Up"];

fn conflict() -> (StatusCode, Value) {
    status(
        409,
        "Conflict",
        "Operation cannot be fulfilled on kvclusters.kvstore.dev \"demo\": the object has been modified; please apply your changes to the latest version and try again",
    )
}

const FORCE: &str = "kvstore.dev/force-fault-injection";

/// Applies a merge patch of failedNodes and the force annotation (a value
/// sets it, `null` removes it) to `stored` and bumps its resourceVersion.
fn patched(mut stored: Value, patch: &Value, new_rv: &str) -> (StatusCode, Value) {
    stored["spec"]["faultInjection"]["failedNodes"] =
        patch["spec"]["faultInjection"]["failedNodes"].clone();
    match patch.pointer("/metadata/annotations").map(|a| &a[FORCE]) {
        Some(Value::Null) => {
            if let Some(a) = stored["metadata"]["annotations"].as_object_mut() {
                a.remove(FORCE);
            }
        }
        Some(v) => stored["metadata"]["annotations"][FORCE] = v.clone(),
        None => {}
    }
    stored["metadata"]["resourceVersion"] = json!(new_rv);
    (StatusCode::OK, stored)
}

/// `kvcluster(..)` with the force annotation.
fn forced(mut v: Value, value: &str) -> Value {
    v["metadata"]["annotations"] = json!({FORCE: value});
    v
}

/// Runs `f` on a [`Target`] whose client talks to a mock expecting exactly
/// `calls` on the KvCluster `ns/demo`; returns its result and what the mock saw.
async fn run<T, F>(calls: Vec<Call>, f: impl FnOnce(Target) -> F) -> (T, Vec<Seen>)
where
    F: std::future::Future<Output = T>,
{
    let (client, server) = kube_mock::client(calls, |_, _| {});
    let target = Target::new(client, "ns", "demo");
    let result = tokio::time::timeout(Duration::from_secs(10), f(target))
        .await
        .expect("the command finished in time");
    (result, server.finish().await)
}

fn merge_patch_of(seen: &Seen) -> &Value {
    assert_eq!(seen.method, Method::PATCH);
    assert_eq!(seen.content_type, "application/merge-patch+json");
    assert!(seen.query.contains("fieldManager=kvctl"), "{}", seen.query);
    &seen.body
}

#[tokio::test]
async fn fail_adds_the_ordinal_with_the_resource_version_as_precondition() {
    let stored = kvcluster("100", &[], &UP3);
    let calls = vec![
        call(Method::GET, {
            let s = stored.clone();
            move |_| (StatusCode::OK, s)
        }),
        call(Method::PATCH, move |p| patched(stored, p, "101")),
    ];
    let (outcome, seen) = run(calls, |t| async move { t.fail(1, false).await }).await;
    let outcome = outcome.expect("fail succeeds");
    assert_eq!(
        outcome,
        Outcome {
            cluster: "demo".into(),
            namespace: "ns".into(),
            action: "fail",
            node: 1,
            changed: true,
            failed_nodes_before: vec![],
            failed_nodes: vec![1],
            force_annotation_before: None,
            force_annotation: None,
            attempts: 1,
        }
    );
    assert_eq!(
        merge_patch_of(&seen[1]),
        &json!({"metadata": {"resourceVersion": "100"},
                "spec": {"faultInjection": {"failedNodes": [1]}}})
    );
}

#[tokio::test]
async fn a_conflict_on_the_first_write_is_read_again_and_the_concurrent_change_kept() {
    // kvctl reads rv 100 (nothing held down) and writes [1]; meanwhile
    // someone else held node 2 down (rv 101), so the write is refused with
    // 409. kvctl reads again and writes [2, 1] with rv 101.
    let first = kvcluster("100", &[], &["Up", "Up", "Up"]);
    let second = kvcluster("101", &[2], &["Up", "Up", "Failed"]);
    // With factor 3 at Quorum, node 2 down leaves room for no other: make
    // the writes need One so that the second hold-down is allowed.
    let one = |mut v: Value| {
        v["spec"]["replication"] = json!({"writeConsistency": "One"});
        v
    };
    let (first, second) = (one(first), one(second));
    let calls = vec![
        call(Method::GET, move |_| (StatusCode::OK, first)),
        call(Method::PATCH, |_| conflict()),
        call(Method::GET, {
            let s = second.clone();
            move |_| (StatusCode::OK, s)
        }),
        call(Method::PATCH, move |p| patched(second, p, "102")),
    ];
    let (outcome, seen) = run(calls, |t| async move { t.fail(1, false).await }).await;
    let outcome = outcome.expect("fail succeeds after the conflict");
    assert_eq!(outcome.failed_nodes, vec![2, 1]);
    assert_eq!(outcome.failed_nodes_before, vec![2]);
    assert_eq!(outcome.attempts, 2);
    assert_eq!(
        merge_patch_of(&seen[1]),
        &json!({"metadata": {"resourceVersion": "100"},
                "spec": {"faultInjection": {"failedNodes": [1]}}})
    );
    assert_eq!(
        merge_patch_of(&seen[3]),
        &json!({"metadata": {"resourceVersion": "101"},
                "spec": {"faultInjection": {"failedNodes": [2, 1]}}})
    );
}

#[tokio::test]
async fn conflicts_on_every_attempt_give_up_after_the_bound() {
    let mut calls = Vec::new();
    for i in 0..MAX_ATTEMPTS {
        let s = kvcluster(&format!("{}", 100 + i), &[], &UP3);
        calls.push(call(Method::GET, move |_| (StatusCode::OK, s)));
        calls.push(call(Method::PATCH, |_| conflict()));
    }
    let (r, seen) = run(calls, |t| async move { t.fail(0, false).await }).await;
    let e = r.expect_err("gives up");
    assert!(
        matches!(e, KubeError::Conflict { attempts, .. } if attempts == MAX_ATTEMPTS),
        "{e:?}"
    );
    assert!(e.to_string().contains("nothing was changed"), "{e}");
    // Every write carried the resourceVersion of the read just before it.
    for i in 0..MAX_ATTEMPTS {
        assert_eq!(
            seen[2 * i + 1].body["metadata"]["resourceVersion"],
            json!(format!("{}", 100 + i))
        );
    }
}

#[tokio::test]
async fn fail_of_a_node_already_held_down_writes_nothing() {
    let stored = kvcluster("100", &[1], &["Up", "Failed", "Up"]);
    let calls = vec![call(Method::GET, move |_| (StatusCode::OK, stored))];
    let (outcome, _) = run(calls, |t| async move { t.fail(1, false).await }).await;
    let outcome = outcome.expect("idempotent");
    assert!(!outcome.changed);
    assert_eq!(outcome.failed_nodes, vec![1]);
}

#[tokio::test]
async fn recover_removes_the_ordinal_and_keeps_the_others() {
    let stored = kvcluster("7", &[0, 2], &["Failed", "Up", "Failed"]);
    let calls = vec![
        call(Method::GET, {
            let s = stored.clone();
            move |_| (StatusCode::OK, s)
        }),
        call(Method::PATCH, move |p| patched(stored, p, "8")),
    ];
    let (outcome, seen) = run(calls, |t| async move { t.recover(0).await }).await;
    let outcome = outcome.expect("recover succeeds");
    assert!(outcome.changed);
    assert_eq!(outcome.failed_nodes, vec![2]);
    assert_eq!(
        merge_patch_of(&seen[1]),
        &json!({"metadata": {"resourceVersion": "7"},
                "spec": {"faultInjection": {"failedNodes": [2]}}})
    );
}

#[tokio::test]
async fn recover_of_a_node_not_held_down_writes_nothing() {
    let stored = kvcluster("7", &[2], &["Up", "Up", "Failed"]);
    let calls = vec![call(Method::GET, move |_| (StatusCode::OK, stored))];
    let (outcome, _) = run(calls, |t| async move { t.recover(1).await }).await;
    let outcome = outcome.expect("idempotent");
    assert!(!outcome.changed);
    assert_eq!(outcome.failed_nodes, vec![2]);
}

#[tokio::test]
async fn a_missing_kvcluster_is_named_with_its_namespace() {
    let calls = vec![call(Method::GET, |_| {
        status(404, "NotFound", "kvclusters.kvstore.dev \"demo\" not found")
    })];
    let (r, _) = run(calls, |t| async move { t.fail(1, false).await }).await;
    let e = r.expect_err("not found");
    assert_eq!(e.to_string(), "KvCluster demo not found in namespace ns");
}

#[tokio::test]
async fn a_forbidden_read_names_the_get_verb() {
    let calls = vec![call(Method::GET, |_| {
        status(
            403,
            "Forbidden",
            "kvclusters.kvstore.dev \"demo\" is forbidden: User \"alice\" cannot get resource \"kvclusters\"",
        )
    })];
    let (r, _) = run(calls, |t| async move { t.get().await }).await;
    let e = r.expect_err("forbidden");
    let text = e.to_string();
    assert!(
        text.starts_with(
            "forbidden: kvctl needs the RBAC verb \"get\" on kvclusters.kvstore.dev in namespace ns"
        ),
        "{text}"
    );
    assert!(text.contains("User \"alice\" cannot get"), "{text}");
}

#[tokio::test]
async fn a_forbidden_write_names_the_patch_verb() {
    let stored = kvcluster("100", &[], &UP3);
    let calls = vec![
        call(Method::GET, move |_| (StatusCode::OK, stored)),
        call(Method::PATCH, |_| {
            status(
                403,
                "Forbidden",
                "User \"alice\" cannot patch resource \"kvclusters\"",
            )
        }),
    ];
    let (r, _) = run(calls, |t| async move { t.fail(1, false).await }).await;
    let e = r.expect_err("forbidden");
    assert!(
        e.to_string().starts_with(
            "forbidden: kvctl needs the RBAC verb \"patch\" on kvclusters.kvstore.dev"
        ),
        "{e}"
    );
}

#[tokio::test]
async fn a_hold_down_that_leaves_keys_short_of_w_is_refused_without_writing() {
    // Factor 3 at Quorum with node 1 held down: node 2 too would leave every
    // key one live owner of three.
    let stored = kvcluster("100", &[1], &["Up", "Failed", "Up"]);
    let calls = vec![call(Method::GET, move |_| (StatusCode::OK, stored))];
    let (r, _) = run(calls, |t| async move { t.fail(2, false).await }).await;
    let e = r.expect_err("refused");
    assert!(matches!(e, KubeError::Refused(_)), "{e:?}");
    assert_eq!(
        e.to_string(),
        "holding down node(s) [2] would leave some keys with 1 of 3 owners live, but writes at Quorum need 2: \
         hold down fewer nodes, lower the write consistency, or force it"
    );
}

#[tokio::test]
async fn force_adds_the_ordinal_and_the_force_annotation_in_one_patch() {
    // The same hold-down as above, with --force.
    let stored = kvcluster("100", &[1], &["Up", "Failed", "Up"]);
    let calls = vec![
        call(Method::GET, {
            let s = stored.clone();
            move |_| (StatusCode::OK, s)
        }),
        call(Method::PATCH, move |p| patched(stored, p, "101")),
    ];
    let (outcome, seen) = run(calls, |t| async move { t.fail(2, true).await }).await;
    let outcome = outcome.expect("forced");
    assert_eq!(
        merge_patch_of(&seen[1]),
        &json!({"metadata": {"resourceVersion": "100",
                             "annotations": {"kvstore.dev/force-fault-injection": "true"}},
                "spec": {"faultInjection": {"failedNodes": [1, 2]}}})
    );
    assert_eq!(outcome.failed_nodes, vec![1, 2]);
    assert_eq!(outcome.force_annotation_before, None);
    assert_eq!(outcome.force_annotation.as_deref(), Some("true"));
}

#[tokio::test]
async fn a_forced_write_that_meets_a_conflict_is_decided_again_with_the_annotation() {
    // kvctl reads rv 100 and writes [1, 2] with the annotation; meanwhile
    // someone else recovered node 1 (rv 101). The second write is made on
    // what is there now: [2], still with the annotation, and rv 101.
    let first = kvcluster("100", &[1], &["Up", "Failed", "Up"]);
    let second = kvcluster("101", &[], &["Up", "Recovering", "Up"]);
    let calls = vec![
        call(Method::GET, move |_| (StatusCode::OK, first)),
        call(Method::PATCH, |_| conflict()),
        call(Method::GET, {
            let s = second.clone();
            move |_| (StatusCode::OK, s)
        }),
        call(Method::PATCH, move |p| patched(second, p, "102")),
    ];
    let (outcome, seen) = run(calls, |t| async move { t.fail(2, true).await }).await;
    let outcome = outcome.expect("forced after the conflict");
    assert_eq!(outcome.attempts, 2);
    let annotations = json!({"kvstore.dev/force-fault-injection": "true"});
    assert_eq!(
        merge_patch_of(&seen[1]),
        &json!({"metadata": {"resourceVersion": "100", "annotations": annotations},
                "spec": {"faultInjection": {"failedNodes": [1, 2]}}})
    );
    assert_eq!(
        merge_patch_of(&seen[3]),
        &json!({"metadata": {"resourceVersion": "101", "annotations": annotations},
                "spec": {"faultInjection": {"failedNodes": [2]}}})
    );
}

#[tokio::test]
async fn force_on_a_cluster_already_annotated_writes_only_the_list() {
    let stored = forced(kvcluster("100", &[1], &["Up", "Failed", "Up"]), "true");
    let calls = vec![
        call(Method::GET, {
            let s = stored.clone();
            move |_| (StatusCode::OK, s)
        }),
        call(Method::PATCH, move |p| patched(stored, p, "101")),
    ];
    let (outcome, seen) = run(calls, |t| async move { t.fail(2, true).await }).await;
    let outcome = outcome.expect("forced");
    assert_eq!(
        merge_patch_of(&seen[1]),
        &json!({"metadata": {"resourceVersion": "100"},
                "spec": {"faultInjection": {"failedNodes": [1, 2]}}})
    );
    assert_eq!(outcome.force_annotation_before.as_deref(), Some("true"));
    assert_eq!(outcome.force_annotation.as_deref(), Some("true"));
}

#[tokio::test]
async fn recover_keeps_the_annotation_while_nodes_are_held_down_and_removes_it_with_the_last() {
    let stored = forced(kvcluster("7", &[0, 2], &["Failed", "Up", "Failed"]), "true");
    let calls = vec![
        call(Method::GET, {
            let s = stored.clone();
            move |_| (StatusCode::OK, s)
        }),
        call(Method::PATCH, move |p| patched(stored, p, "8")),
    ];
    let (outcome, seen) = run(calls, |t| async move { t.recover(0).await }).await;
    let outcome = outcome.expect("recover");
    assert_eq!(
        merge_patch_of(&seen[1]),
        &json!({"metadata": {"resourceVersion": "7"},
                "spec": {"faultInjection": {"failedNodes": [2]}}})
    );
    assert_eq!(outcome.force_annotation.as_deref(), Some("true"));

    let stored = forced(
        kvcluster("8", &[2], &["Recovering", "Up", "Failed"]),
        "true",
    );
    let calls = vec![
        call(Method::GET, {
            let s = stored.clone();
            move |_| (StatusCode::OK, s)
        }),
        call(Method::PATCH, move |p| patched(stored, p, "9")),
    ];
    let (outcome, seen) = run(calls, |t| async move { t.recover(2).await }).await;
    let outcome = outcome.expect("recover");
    assert_eq!(
        merge_patch_of(&seen[1]),
        &json!({"metadata": {"resourceVersion": "8",
                             "annotations": {"kvstore.dev/force-fault-injection": null}},
                "spec": {"faultInjection": {"failedNodes": []}}})
    );
    assert_eq!(outcome.failed_nodes, Vec::<u32>::new());
    assert_eq!(outcome.force_annotation_before.as_deref(), Some("true"));
    assert_eq!(outcome.force_annotation, None);
}

#[tokio::test]
async fn an_ordinal_beyond_replicas_is_refused_without_writing() {
    let stored = kvcluster("100", &[], &UP3);
    let calls = vec![call(Method::GET, move |_| (StatusCode::OK, stored))];
    let (r, _) = run(calls, |t| async move { t.fail(3, true).await }).await;
    let e = r.expect_err("no such node");
    assert_eq!(
        e.to_string(),
        "node 3 is not a node of KvCluster demo (spec.replicas is 3: ordinals 0..3)"
    );
}

#[tokio::test]
async fn another_api_error_is_reported_with_its_code_and_message() {
    let stored = kvcluster("100", &[], &UP3);
    let calls = vec![
        call(Method::GET, move |_| (StatusCode::OK, stored)),
        call(Method::PATCH, |_| {
            status(
                422,
                "Invalid",
                "KvCluster.kvstore.dev \"demo\" is invalid: spec.faultInjection.failedNodes: Invalid value",
            )
        }),
    ];
    let (r, _) = run(calls, |t| async move { t.fail(1, false).await }).await;
    let e = r.expect_err("invalid");
    let text = e.to_string();
    assert!(
        text.starts_with("the Kubernetes API server refused to patch KvCluster demo:")
            && text.contains("(422 Invalid)"),
        "{text}"
    );
}

#[tokio::test]
async fn rejected_credentials_say_so() {
    let calls = vec![call(Method::GET, |_| {
        status(401, "Unauthorized", "Unauthorized")
    })];
    let (r, _) = run(calls, |t| async move { t.get().await }).await;
    let e = r.expect_err("unauthorized");
    assert!(matches!(e, KubeError::Unauthorized { .. }), "{e:?}");
    assert!(
        e.to_string()
            .contains("did not accept kvctl's credentials (401 Unauthorized)"),
        "{e}"
    );
}

#[tokio::test]
async fn waiting_for_a_hold_down_polls_until_the_operator_shows_the_node_failed_for_the_current_spec()
 {
    // Right after the patch (generation 3) the status is still the old one;
    // then the operator has seen generation 3 but not yet failed the node;
    // then it shows node 1 Failed.
    let stale = kvcluster("8", &[1], &UP3);
    let mut newer = kvcluster("8", &[1], &UP3);
    newer["metadata"]["generation"] = json!(3);
    let mut seen_not_failed = newer.clone();
    seen_not_failed["status"]["observedGeneration"] = json!(3);
    let mut stale_gen = stale.clone();
    stale_gen["metadata"]["generation"] = json!(3);
    let mut failed = seen_not_failed.clone();
    failed["status"]["nodes"][1]["state"] = json!("Failed");
    let calls = vec![
        call(Method::GET, move |_| (StatusCode::OK, stale_gen)),
        call(Method::GET, move |_| (StatusCode::OK, seen_not_failed)),
        call(Method::GET, move |_| (StatusCode::OK, failed)),
    ];
    let (effect, seen) = run(calls, |t| async move {
        t.wait_for_node(1, kv_core::NodeState::Failed, Duration::from_secs(10))
            .await
    })
    .await;
    let effect = effect.expect("waited");
    assert!(effect.in_effect, "{effect:?}");
    assert_eq!(effect.state, Some(kv_core::NodeState::Failed));
    assert_eq!(seen.len(), 3);
}

#[tokio::test]
async fn waiting_ends_at_the_bound_in_progress_or_at_once_on_a_refused_spec() {
    // A bound of zero: one look, still Up.
    let calls = vec![call(Method::GET, |_| {
        (StatusCode::OK, kvcluster("8", &[1], &UP3))
    })];
    let (effect, _) = run(calls, |t| async move {
        t.wait_for_node(1, kv_core::NodeState::Failed, Duration::ZERO)
            .await
    })
    .await;
    let effect = effect.expect("waited");
    assert!(!effect.in_effect && effect.refused.is_none(), "{effect:?}");
    assert_eq!(effect.state, Some(kv_core::NodeState::Up));

    let mut refused = kvcluster("8", &[1], &UP3);
    refused["status"]["conditions"] = json!([{
        "type": "SpecRefused", "status": "True", "reason": "SpecRefused",
        "message": "holding down node(s) [1] would leave some keys with 1 of 2 owners live",
        "lastTransitionTime": "2026-12-03T10:00:00Z", "observedGeneration": 2
    }]);
    let calls = vec![call(Method::GET, move |_| (StatusCode::OK, refused))];
    let (effect, _) = run(calls, |t| async move {
        t.wait_for_node(1, kv_core::NodeState::Failed, Duration::from_secs(10))
            .await
    })
    .await;
    let effect = effect.expect("waited");
    assert!(
        effect
            .refused
            .as_deref()
            .is_some_and(|r| r.contains("holding down")),
        "{effect:?}"
    );
}

const RESTARTED_AT: &str = "kvstore.dev/restartedAt";

/// `kvcluster(..)` with the restart annotation and `last_restart` as
/// status.lastRestart.
fn restarting(at: &str, last_restart: Value) -> Value {
    let mut v = kvcluster("200", &[], &UP3);
    v["metadata"]["annotations"] = json!({RESTARTED_AT: at});
    v["status"]["lastRestart"] = last_restart;
    v
}

#[tokio::test]
async fn restart_sets_the_annotation_alone_and_waits_until_the_status_shows_it_finished() {
    let at = "2026-12-03T10:00:00Z";
    let calls = vec![
        call(Method::PATCH, move |_| {
            (StatusCode::OK, restarting(at, Value::Null))
        }),
        // The operator took it up: node 1 being restarted.
        call(Method::GET, move |_| {
            (
                StatusCode::OK,
                restarting(
                    at,
                    json!({"requestedAt": at, "restarted": [0],
                           "restarting": {"ordinal": 1, "podUid": "u1"}}),
                ),
            )
        }),
        call(Method::GET, move |_| {
            (
                StatusCode::OK,
                restarting(
                    at,
                    json!({"requestedAt": at, "restarted": [0, 1, 2],
                           "finishedAt": "2026-12-03T10:03:00Z"}),
                ),
            )
        }),
    ];
    let ((outcome, effect), seen) = run(calls, |t| async move {
        let outcome = t.restart(at).await.expect("restart");
        let effect = t
            .wait_for_restart(at, Duration::from_secs(5))
            .await
            .expect("wait");
        (outcome, effect)
    })
    .await;
    assert_eq!(
        merge_patch_of(&seen[0]),
        &json!({"metadata": {"annotations": {RESTARTED_AT: at}}}),
        "only the annotation: nothing concurrent is overwritten"
    );
    assert_eq!(outcome.requested_at, at);
    assert_eq!(outcome.nodes, 3);
    assert!(effect.in_effect, "{effect:?}");
    assert_eq!(effect.restarted, [0, 1, 2]);
}

#[tokio::test]
async fn a_restart_wait_ignores_an_earlier_restart_and_says_how_far_this_one_got() {
    let at = "2026-12-03T11:00:00Z";
    let earlier = json!({"requestedAt": "2026-12-01T00:00:00Z", "restarted": [0, 1, 2],
                         "finishedAt": "2026-12-01T00:03:00Z"});
    let calls = vec![call(Method::GET, move |_| {
        (StatusCode::OK, restarting(at, earlier))
    })];
    let (effect, _) = run(calls, |t| async move {
        t.wait_for_restart(at, Duration::ZERO).await.expect("wait")
    })
    .await;
    assert!(
        !effect.in_effect,
        "an earlier finished restart is not this one"
    );
    assert_eq!(effect.restarted, Vec::<u32>::new());
    assert_eq!(
        kvctl::k8s::render_restart_effect(&effect, 3)
            .split(" after ")
            .next(),
        Some("in progress: 0 of 3 nodes restarted")
    );
}

#[tokio::test]
async fn restore_creates_a_new_kvcluster_started_from_the_backup_and_waits_for_restored() {
    let req = kvctl::k8s::RestoreRequest {
        from: "s3://backups/prod/2026-12-04".into(),
        s3: Some(kv_crd::kvbackup::S3Settings {
            endpoint: Some("http://127.0.0.1:9000".into()),
            region: None,
            credentials_secret: Some("creds".into()),
        }),
        replicas: Some(5),
        factor: Some(2),
        strategy: Some(kv_core::Strategy::ConsistentHashing),
        ..Default::default()
    };
    let with_bootstrap = |phase: &str| {
        let mut v = kvcluster("7", &[], &UP3);
        v["status"]["bootstrap"] =
            json!({"phase": phase, "source": "s3://backups/prod/2026-12-04"});
        v
    };
    let (restoring, restored) = (with_bootstrap("Restoring"), with_bootstrap("Restored"));
    let calls = vec![
        call(Method::POST, |body| (StatusCode::CREATED, body.clone())),
        call(Method::GET, move |_| (StatusCode::OK, restoring)),
        call(Method::GET, move |_| (StatusCode::OK, restored)),
    ];
    let (result, seen) = run(calls, |t| async move {
        t.create_restored(&req).await?;
        t.wait_restored(Duration::from_secs(30), Duration::from_secs(5))
            .await
    })
    .await;
    let kvc = result.expect("restored");
    assert!(kvctl::k8s::restored(&kvc));
    assert!(
        kvctl::k8s::render_restore(&kvc).contains("Restored from s3://backups/prod/2026-12-04"),
        "{}",
        kvctl::k8s::render_restore(&kvc)
    );
    let spec = &seen[0].body["spec"];
    assert_eq!(seen[0].body["metadata"]["name"], "demo");
    assert_eq!(spec["replicas"], 5);
    assert_eq!(spec["replication"]["factor"], 2);
    assert_eq!(spec["replication"]["strategy"], "ConsistentHashing");
    assert_eq!(
        spec["bootstrap"],
        json!({"fromBackup": {"destination": "s3://backups/prod/2026-12-04",
               "s3": {"endpoint": "http://127.0.0.1:9000", "credentialsSecret": "creds"}}})
    );
    assert!(
        seen[0].query.contains("fieldManager=kvctl"),
        "{}",
        seen[0].query
    );
}

#[tokio::test]
async fn restore_into_a_kvcluster_that_exists_is_refused_and_says_what_to_do() {
    let calls = vec![call(Method::POST, |_| {
        (
            StatusCode::CONFLICT,
            json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                   "message": "kvclusters.kvstore.dev \"demo\" already exists",
                   "reason": "AlreadyExists", "code": 409}),
        )
    })];
    let req = kvctl::k8s::RestoreRequest {
        from: "file:///b".into(),
        ..Default::default()
    };
    let (result, _) = run(calls, |t| async move { t.create_restored(&req).await }).await;
    let err = result.expect_err("an existing KvCluster");
    assert!(matches!(err, KubeError::Exists { .. }), "{err}");
    assert!(
        err.to_string().contains("kvctl restore --endpoint"),
        "{err}"
    );
}

#[tokio::test]
async fn verify_sets_the_annotation_and_waits_for_the_operators_answer_to_it() {
    let plain = kvcluster("7", &[], &UP3);
    let mut answered_before = kvcluster("8", &[], &UP3);
    answered_before["status"]["lastVerify"] = json!({"requestedAt": "t0", "finishedAt": "x",
        "epoch": 5, "bucketsCompared": 4096, "divergentBuckets": 0, "consistent": true});
    let mut answered = kvcluster("9", &[], &UP3);
    answered["status"]["lastVerify"] = json!({"requestedAt": "t1", "finishedAt": "2026-12-04T13:00:00Z",
        "epoch": 5, "bucketsCompared": 4096, "divergentBuckets": 1,
        "divergent": ["bucket 7: node 0 holds 1 records (ab), node 2 holds 1 records (cd)"],
        "consistent": false});
    let calls = vec![
        call(Method::PATCH, move |_| (StatusCode::OK, plain)),
        call(Method::GET, move |_| (StatusCode::OK, answered_before)),
        call(Method::GET, move |_| (StatusCode::OK, answered)),
    ];
    let (result, seen) = run(calls, |t| async move {
        t.request_verify("t1").await?;
        t.wait_verify("t1", Duration::from_secs(30)).await
    })
    .await;
    let v = result.expect("answered").expect("within the bound");
    assert_eq!(v.divergent_buckets, 1);
    let text = kvctl::k8s::render_verify_status(&v);
    assert!(
        text.contains("bucket 7: node 0 holds 1 records (ab), node 2 holds 1 records (cd)\n")
            && text.contains("4096 buckets compared, 1 differ (kv-operator, epoch 5"),
        "{text}"
    );
    assert_eq!(
        merge_patch_of(&seen[0]),
        &json!({"metadata": {"annotations": {"kvstore.dev/verifyRequestedAt": "t1"}}})
    );
}
