//! Replays fuzz/corpus/kvcluster_spec (the example KvClusters and every crash
//! reproducer of the cargo-fuzz target `kvcluster_spec`) through the same
//! check on stable Rust.

#[path = "../../fuzz/checks/kvcluster_spec.rs"]
mod kvcluster_spec;
#[path = "../../fuzz/checks/replay.rs"]
mod replay;

use kv_operator::k8s::crd::KvCluster;

#[test]
fn the_kvcluster_spec_corpus_passes_the_fuzz_check() {
    let n = replay::replay("kvcluster_spec", kvcluster_spec::check);
    assert!(n >= 8, "only {n} corpus files");
}

#[test]
fn the_corpus_holds_valid_and_refused_clusters() {
    let files = replay::read_corpus(&replay::corpus_dir("kvcluster_spec")).expect("the corpus");
    let verdicts: Vec<bool> = files
        .iter()
        .filter_map(|(_, b)| serde_yaml::from_slice::<KvCluster>(b).ok())
        .map(|k| k.spec.validate().is_ok())
        .collect();
    assert!(
        verdicts.iter().filter(|ok| **ok).count() >= 3,
        "{verdicts:?}"
    );
    assert!(
        verdicts.iter().filter(|ok| !**ok).count() >= 3,
        "{verdicts:?}"
    );
}

#[test]
fn the_size_pattern_is_the_schemas() {
    for ok in ["1Gi", "500Mi", "10G", "1.5Gi", "1000", "0", "2E"] {
        assert!(kvcluster_spec::matches_size_pattern(ok), "{ok}");
    }
    for bad in [
        "", "Gi", "1 Gi", "1gb", "-1Gi", ".5Gi", "1.", "1.Gi", "1.5.5", "1e3",
    ] {
        assert!(!kvcluster_spec::matches_size_pattern(bad), "{bad}");
    }
}

#[test]
fn a_corpus_replay_fails_when_its_check_fails() {
    replay::assert_the_replay_can_fail();
}
