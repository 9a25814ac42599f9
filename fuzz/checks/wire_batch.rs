//! Fuzz check for every decoder of `kv_core::wire` (the peer port's binary
//! batches): no input panics, and whatever decodes re-encodes to the same
//! thing. Shared by the cargo-fuzz target `wire_batch` and the stable replay
//! in core/tests/fuzz_corpus.rs.
//!
//! Record, key and bucket batches have one encoding per value, so an accepted
//! input must re-encode to exactly its own bytes. A digest table may list a
//! bucket twice, out of order or empty; its re-encoding must decode to the
//! same table.

use kv_core::wire;

/// Which decoders accepted the input (the replay asserts the seeds cover each).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Accepted {
    pub records: bool,
    pub keys: bool,
    pub buckets: bool,
    pub digests: bool,
}

/// Panics (with the decoder and the input's length) when an invariant breaks.
pub fn check(data: &[u8]) {
    let _ = check_accepted(data);
}

pub fn check_accepted(data: &[u8]) -> Accepted {
    let mut accepted = Accepted::default();
    if let Ok(records) = wire::decode_records(data) {
        accepted.records = true;
        let again = wire::encode_records(&records);
        assert!(
            again == data,
            "decode_records accepted {} bytes ({} records) that re-encode to {} different bytes",
            data.len(),
            records.len(),
            again.len()
        );
    }
    if let Ok(keys) = wire::decode_keys(data) {
        accepted.keys = true;
        let again = wire::encode_keys(keys.iter().map(Vec::as_slice));
        assert!(
            again == data,
            "decode_keys accepted {} bytes ({} keys) that re-encode to {} different bytes",
            data.len(),
            keys.len(),
            again.len()
        );
    }
    if let Ok(buckets) = wire::decode_buckets(data) {
        accepted.buckets = true;
        assert!(
            buckets.iter().all(|b| *b < kv_core::BUCKETS),
            "decode_buckets accepted a bucket out of range: {buckets:?}"
        );
        let again = wire::encode_buckets(&buckets);
        assert!(
            again == data,
            "decode_buckets accepted {} bytes that re-encode to {} different bytes",
            data.len(),
            again.len()
        );
    }
    if let Ok(table) = wire::decode_digests(data) {
        accepted.digests = true;
        assert_eq!(
            table.len(),
            kv_core::BUCKETS as usize,
            "decode_digests must give one digest per bucket"
        );
        let again = wire::decode_digests(&wire::encode_digests(&table));
        assert!(
            again.as_ref() == Ok(&table),
            "decode_digests accepted {} bytes whose table does not survive a re-encoding: {:?}",
            data.len(),
            again.err()
        );
    }
    accepted
}
