//! The binary encoding of node-to-node batches.
//!
//! Replication moves many small records per request, so the peer routes carry
//! a compact length-prefixed encoding instead of JSON (keys and values are
//! arbitrary bytes, which JSON could only carry inflated). Every decoder here
//! is total: any input either decodes or returns [`WireError`]; lengths are
//! checked against the remaining input before anything is allocated, so a
//! hostile length prefix cannot make a node allocate more than the body it
//! already holds.
//!
//! Layouts (all integers little-endian):
//! - record batch: `u32 count`, then per record `u32 key_len, key, u64 ts,
//!   u32 node, u8 kind (0 tombstone, 1 value), [u32 value_len, value]`;
//! - key batch: `u32 count`, then per key `u32 key_len, key`;
//! - digests: `u32 count`, then per bucket `u32 bucket, u128 sum, u64 count`;
//! - apply answer: `u8 flags` (bit 0: the owner's store is still catching up,
//!   so its acknowledgement must not count towards a quorum), `u32 count`, then
//!   per record `u8 outcome` (0 had it, 1 stored, 2 holds newer) and, for 2,
//!   `u64 ts, u32 node` of the newer version.

use thiserror::Error;

use crate::record::{Applied, BUCKETS, CreateVote, Digest, MAX_KEY_BYTES, Record};
use crate::version::Version;

/// Why a batch could not be decoded.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum WireError {
    #[error("batch truncated: needed {needed} more bytes at offset {offset}")]
    Truncated { offset: usize, needed: usize },
    #[error("batch has {0} trailing bytes after its last entry")]
    Trailing(usize),
    #[error("key of {0} bytes in batch (keys are 1..={MAX_KEY_BYTES} bytes)")]
    BadKey(usize),
    #[error("unknown record kind {0} in batch")]
    BadKind(u8),
    #[error("bucket {0} out of range in digest batch")]
    BadBucket(u32),
    #[error("unknown apply outcome {0}")]
    BadOutcome(u8),
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        let rest = self.buf.len() - self.pos;
        if n > rest {
            return Err(WireError::Truncated {
                offset: self.pos,
                needed: n - rest,
            });
        }
        let out = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.array::<1>()?[0])
    }

    fn u32(&mut self) -> Result<u32, WireError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, WireError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn u128(&mut self) -> Result<u128, WireError> {
        Ok(u128::from_le_bytes(self.array()?))
    }

    fn bytes(&mut self) -> Result<&'a [u8], WireError> {
        let len = self.u32()? as usize;
        self.take(len)
    }

    fn key(&mut self) -> Result<Vec<u8>, WireError> {
        let key = self.bytes()?;
        if key.is_empty() || key.len() > MAX_KEY_BYTES {
            return Err(WireError::BadKey(key.len()));
        }
        Ok(key.to_vec())
    }

    /// The entry count, bounded by what the remaining bytes could hold
    /// (`min_entry` bytes each), so the caller can preallocate safely.
    fn count(&mut self, min_entry: usize) -> Result<usize, WireError> {
        let count = self.u32()? as usize;
        let rest = self.buf.len() - self.pos;
        if count.saturating_mul(min_entry) > rest {
            return Err(WireError::Truncated {
                offset: self.pos,
                needed: count.saturating_mul(min_entry) - rest,
            });
        }
        Ok(count)
    }

    fn finish(self) -> Result<(), WireError> {
        match self.buf.len() - self.pos {
            0 => Ok(()),
            n => Err(WireError::Trailing(n)),
        }
    }
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(bytes);
}

/// Encodes records for `POST /internal/v1/apply` and bucket transfers.
pub fn encode_records<'a>(records: impl IntoIterator<Item = &'a Record>) -> Vec<u8> {
    let mut out = vec![0u8; 4];
    let mut count = 0u32;
    for r in records {
        count += 1;
        put_bytes(&mut out, &r.key);
        out.extend_from_slice(&r.version.ts.to_le_bytes());
        out.extend_from_slice(&r.version.node.to_le_bytes());
        match &r.value {
            None => out.push(0),
            Some(v) => {
                out.push(1);
                put_bytes(&mut out, v);
            }
        }
    }
    out[..4].copy_from_slice(&count.to_le_bytes());
    out
}

/// Decodes a record batch; see the module docs for the layout.
pub fn decode_records(buf: &[u8]) -> Result<Vec<Record>, WireError> {
    let mut r = Reader::new(buf);
    // key_len + 1-byte key + ts + node + kind
    let count = r.count(4 + 1 + 8 + 4 + 1)?;
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        let key = r.key()?;
        let ts = r.u64()?;
        let node = r.u32()?;
        let value = match r.u8()? {
            0 => None,
            1 => Some(r.bytes()?.to_vec()),
            k => return Err(WireError::BadKind(k)),
        };
        out.push(Record {
            key,
            value,
            version: Version::new(ts, node),
        });
    }
    r.finish()?;
    Ok(out)
}

/// Encodes keys for `POST /internal/v1/read`.
pub fn encode_keys<'a>(keys: impl IntoIterator<Item = &'a [u8]>) -> Vec<u8> {
    let mut out = vec![0u8; 4];
    let mut count = 0u32;
    for k in keys {
        count += 1;
        put_bytes(&mut out, k);
    }
    out[..4].copy_from_slice(&count.to_le_bytes());
    out
}

/// Decodes a key batch.
pub fn decode_keys(buf: &[u8]) -> Result<Vec<Vec<u8>>, WireError> {
    let mut r = Reader::new(buf);
    let count = r.count(5)?;
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        out.push(r.key()?);
    }
    r.finish()?;
    Ok(out)
}

/// Encodes a list of bucket numbers (`POST /internal/v1/buckets`).
pub fn encode_buckets(buckets: &[u32]) -> Vec<u8> {
    buckets.iter().flat_map(|b| b.to_le_bytes()).collect()
}

/// Decodes a list of bucket numbers; each must be below `BUCKETS`.
pub fn decode_buckets(buf: &[u8]) -> Result<Vec<u32>, WireError> {
    if !buf.len().is_multiple_of(4) {
        return Err(WireError::Trailing(buf.len() % 4));
    }
    buf.chunks_exact(4)
        .map(|c| {
            let b = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            if b < BUCKETS {
                Ok(b)
            } else {
                Err(WireError::BadBucket(b))
            }
        })
        .collect()
}

/// Encodes the non-empty buckets of a per-bucket digest table.
pub fn encode_digests(digests: &[Digest]) -> Vec<u8> {
    let mut out = vec![0u8; 4];
    let mut count = 0u32;
    for (bucket, d) in digests.iter().enumerate() {
        if d.count == 0 && d.sum == 0 {
            continue;
        }
        count += 1;
        out.extend_from_slice(&(bucket as u32).to_le_bytes());
        out.extend_from_slice(&d.sum.to_le_bytes());
        out.extend_from_slice(&d.count.to_le_bytes());
    }
    out[..4].copy_from_slice(&count.to_le_bytes());
    out
}

/// Decodes a digest table into a full `BUCKETS`-long vector (absent = empty).
pub fn decode_digests(buf: &[u8]) -> Result<Vec<Digest>, WireError> {
    let mut r = Reader::new(buf);
    let count = r.count(4 + 16 + 8)?;
    let mut out = vec![Digest::EMPTY; BUCKETS as usize];
    for _ in 0..count {
        let bucket = r.u32()?;
        if bucket >= BUCKETS {
            return Err(WireError::BadBucket(bucket));
        }
        let sum = r.u128()?;
        let count = r.u64()?;
        out[bucket as usize] = Digest { sum, count };
    }
    r.finish()?;
    Ok(out)
}

/// What an owner answers to an apply: per record, what it did; and whether
/// its store is still catching up (its acknowledgements do not count yet).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApplyAnswer {
    pub catching_up: bool,
    pub outcomes: Vec<Applied>,
}

/// Encodes an [`ApplyAnswer`].
pub fn encode_apply_answer(answer: &ApplyAnswer) -> Vec<u8> {
    let mut out = Vec::with_capacity(5 + answer.outcomes.len());
    out.push(u8::from(answer.catching_up));
    out.extend_from_slice(&(answer.outcomes.len() as u32).to_le_bytes());
    for a in &answer.outcomes {
        match a {
            Applied::Had => out.push(0),
            Applied::Stored => out.push(1),
            Applied::Newer(v) => {
                out.push(2);
                out.extend_from_slice(&v.ts.to_le_bytes());
                out.extend_from_slice(&v.node.to_le_bytes());
            }
        }
    }
    out
}

/// Decodes an [`ApplyAnswer`].
pub fn decode_apply_answer(buf: &[u8]) -> Result<ApplyAnswer, WireError> {
    let mut r = Reader::new(buf);
    let catching_up = r.u8()? & 1 == 1;
    let n = r.u32()? as usize;
    // each outcome takes at least one byte: a hostile count cannot over-allocate
    let mut outcomes = Vec::with_capacity(n.min(buf.len()));
    for _ in 0..n {
        outcomes.push(match r.u8()? {
            0 => Applied::Had,
            1 => Applied::Stored,
            2 => {
                let ts = r.u64()?;
                let node = r.u32()?;
                Applied::Newer(Version::new(ts, node))
            }
            k => return Err(WireError::BadOutcome(k)),
        });
    }
    r.finish()?;
    Ok(ApplyAnswer {
        catching_up,
        outcomes,
    })
}

/// What an owner answers a create step (see [`CreateVote`]), and whether its
/// store is still catching up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CreateAnswer {
    pub catching_up: bool,
    pub vote: CreateVote,
}

/// Encodes a [`CreateAnswer`]: a flag byte, a tag byte, and for a refusal the
/// version it names.
pub fn encode_create_answer(answer: &CreateAnswer) -> Vec<u8> {
    let mut out = vec![u8::from(answer.catching_up)];
    let (tag, version) = match answer.vote {
        CreateVote::Granted => (0, None),
        CreateVote::Had => (1, None),
        CreateVote::Live(v) => (2, Some(v)),
        CreateVote::Promised(v) => (3, Some(v)),
        CreateVote::Newer(v) => (4, Some(v)),
    };
    out.push(tag);
    if let Some(v) = version {
        out.extend_from_slice(&v.ts.to_le_bytes());
        out.extend_from_slice(&v.node.to_le_bytes());
    }
    out
}

/// Decodes a [`CreateAnswer`].
pub fn decode_create_answer(buf: &[u8]) -> Result<CreateAnswer, WireError> {
    let mut r = Reader::new(buf);
    let catching_up = r.u8()? & 1 == 1;
    let tag = r.u8()?;
    let mut version = || -> Result<Version, WireError> {
        let ts = r.u64()?;
        let node = r.u32()?;
        Ok(Version::new(ts, node))
    };
    let vote = match tag {
        0 => CreateVote::Granted,
        1 => CreateVote::Had,
        2 => CreateVote::Live(version()?),
        3 => CreateVote::Promised(version()?),
        4 => CreateVote::Newer(version()?),
        k => return Err(WireError::BadOutcome(k)),
    };
    r.finish()?;
    Ok(CreateAnswer { catching_up, vote })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn create_answers_round_trip_and_garbage_is_refused() {
        for vote in [
            CreateVote::Granted,
            CreateVote::Had,
            CreateVote::Live(Version::new(5, 1)),
            CreateVote::Promised(Version::new(u64::MAX, 7)),
            CreateVote::Newer(Version::new(9, 0)),
        ] {
            for catching_up in [false, true] {
                let a = CreateAnswer { catching_up, vote };
                assert_eq!(decode_create_answer(&encode_create_answer(&a)), Ok(a));
            }
        }
        assert_eq!(decode_create_answer(&[0, 9]), Err(WireError::BadOutcome(9)));
        assert!(decode_create_answer(&[0, 2, 1, 2, 3]).is_err());
        assert!(decode_create_answer(&[0, 0, 0]).is_err());
        assert!(decode_create_answer(&[]).is_err());
    }

    #[test]
    fn apply_answers_round_trip_and_garbage_is_refused() {
        let a = ApplyAnswer {
            catching_up: true,
            outcomes: vec![
                Applied::Stored,
                Applied::Had,
                Applied::Newer(Version::new(77, 3)),
            ],
        };
        assert_eq!(decode_apply_answer(&encode_apply_answer(&a)), Ok(a.clone()));
        let mut bad = encode_apply_answer(&a);
        bad[5] = 9;
        assert_eq!(decode_apply_answer(&bad), Err(WireError::BadOutcome(9)));
        let full = encode_apply_answer(&a);
        assert!(decode_apply_answer(&full[..full.len() - 1]).is_err());
        assert!(decode_apply_answer(&[0, 255, 255, 255, 255]).is_err());
    }

    fn rec(key: &[u8], value: Option<&[u8]>, ts: u64, node: u32) -> Record {
        Record {
            key: key.to_vec(),
            value: value.map(<[u8]>::to_vec),
            version: Version::new(ts, node),
        }
    }

    #[test]
    fn records_round_trip_including_tombstones_and_empty_values() {
        let batch = vec![
            rec(b"a", Some(b"1"), 7, 1),
            rec(b"b", None, 8, 2),
            rec(b"c", Some(b""), 9, 0),
        ];
        let bytes = encode_records(&batch);
        assert_eq!(decode_records(&bytes).unwrap(), batch);
        assert_eq!(decode_records(&encode_records(&[])).unwrap(), vec![]);
    }

    #[test]
    fn hostile_lengths_are_errors_not_allocations() {
        // count claims 4 billion records in an 8-byte body
        let mut bytes = u32::MAX.to_le_bytes().to_vec();
        bytes.extend_from_slice(&[0; 4]);
        assert!(matches!(
            decode_records(&bytes),
            Err(WireError::Truncated { .. })
        ));
        // one record whose key claims u32::MAX bytes
        let mut bytes = 1u32.to_le_bytes().to_vec();
        bytes.extend_from_slice(&u32::MAX.to_le_bytes());
        bytes.extend_from_slice(&[0; 13]);
        assert!(matches!(
            decode_records(&bytes),
            Err(WireError::Truncated { .. })
        ));
    }

    #[test]
    fn bad_kind_empty_key_and_trailing_bytes_are_rejected() {
        let mut bytes = encode_records(&[rec(b"k", None, 1, 1)]);
        let kind_at = bytes.len() - 1;
        bytes[kind_at] = 9;
        assert_eq!(decode_records(&bytes), Err(WireError::BadKind(9)));
        let long = vec![b'k'; MAX_KEY_BYTES + 1];
        assert_eq!(
            decode_keys(&encode_keys([&long[..]])),
            Err(WireError::BadKey(MAX_KEY_BYTES + 1))
        );
        assert!(decode_keys(&encode_keys([&b""[..]])).is_err());
        let mut bytes = encode_keys([&b"k"[..]]);
        bytes.push(0);
        assert_eq!(decode_keys(&bytes), Err(WireError::Trailing(1)));
    }

    #[test]
    fn digests_round_trip_and_reject_out_of_range_buckets() {
        let mut table = vec![Digest::EMPTY; BUCKETS as usize];
        table[3] = Digest { sum: 99, count: 2 };
        table[4095] = Digest {
            sum: u128::MAX,
            count: 1,
        };
        let bytes = encode_digests(&table);
        assert_eq!(bytes.len(), 4 + 2 * 28);
        assert_eq!(decode_digests(&bytes).unwrap(), table);
        let mut bad = 1u32.to_le_bytes().to_vec();
        bad.extend_from_slice(&BUCKETS.to_le_bytes());
        bad.extend_from_slice(&[0; 24]);
        assert_eq!(decode_digests(&bad), Err(WireError::BadBucket(BUCKETS)));
    }

    #[test]
    fn bucket_lists_round_trip_and_reject_out_of_range() {
        assert_eq!(
            decode_buckets(&encode_buckets(&[0, 7, 4095])).unwrap(),
            vec![0, 7, 4095]
        );
        assert_eq!(
            decode_buckets(&encode_buckets(&[4096])),
            Err(WireError::BadBucket(4096))
        );
        assert_eq!(decode_buckets(&[1, 2, 3]), Err(WireError::Trailing(3)));
    }

    proptest! {
        #[test]
        fn decoders_never_panic_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode_records(&bytes);
            let _ = decode_keys(&bytes);
            let _ = decode_digests(&bytes);
            let _ = decode_buckets(&bytes);
        }

        #[test]
        fn any_record_batch_round_trips(
            batch in proptest::collection::vec(
                (proptest::collection::vec(any::<u8>(), 1..40),
                 proptest::option::of(proptest::collection::vec(any::<u8>(), 0..40)),
                 any::<u64>(), any::<u32>()),
                0..20)
        ) {
            let records: Vec<Record> = batch
                .into_iter()
                .map(|(key, value, ts, node)| Record { key, value, version: Version::new(ts, node) })
                .collect();
            prop_assert_eq!(decode_records(&encode_records(&records)).unwrap(), records);
        }
    }
}
