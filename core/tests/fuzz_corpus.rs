//! Replays fuzz/corpus/wire_batch (seeds and crash reproducers of the
//! cargo-fuzz target `wire_batch`) through the same check on stable Rust.

#[path = "../../fuzz/checks/replay.rs"]
mod replay;
#[path = "../../fuzz/checks/wire_batch.rs"]
mod wire_batch;

#[test]
fn the_wire_batch_corpus_passes_the_fuzz_check() {
    let n = replay::replay("wire_batch", wire_batch::check);
    assert!(n >= 4, "only {n} corpus files");
}

#[test]
fn the_wire_batch_seeds_reach_every_decoder() {
    let files = replay::read_corpus(&replay::corpus_dir("wire_batch")).expect("the corpus");
    let mut seen = wire_batch::Accepted::default();
    for (_, bytes) in &files {
        let a = wire_batch::check_accepted(bytes);
        seen.records |= a.records;
        seen.keys |= a.keys;
        seen.buckets |= a.buckets;
        seen.digests |= a.digests;
    }
    let all = wire_batch::Accepted {
        records: true,
        keys: true,
        buckets: true,
        digests: true,
    };
    assert_eq!(seen, all, "some decoder accepts no seed");
}

#[test]
fn a_corpus_replay_fails_when_its_check_fails() {
    replay::assert_the_replay_can_fail();
}
