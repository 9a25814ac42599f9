//! Record versions and the hybrid logical clock that issues them.
//!
//! Every write gets a [`Version`]: a hybrid logical clock timestamp plus the
//! ordinal of the node that coordinated the write. Versions are totally
//! ordered (timestamp first, node as tie-break), so replicas that see the same
//! set of writes agree on the winner without talking to each other:
//! last-writer-wins.

use std::fmt;
use std::str::FromStr;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// Bits of the timestamp that hold the logical counter; the rest hold
/// milliseconds since the Unix epoch.
const LOGICAL_BITS: u32 = 16;

/// The version of one write. Orders by `ts`, then by `node`.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Version {
    /// Hybrid logical clock: `physical_ms << 16 | logical`.
    pub ts: u64,
    /// Ordinal of the node that issued the version.
    pub node: u32,
}

impl Version {
    pub const ZERO: Version = Version { ts: 0, node: 0 };

    pub fn new(ts: u64, node: u32) -> Self {
        Version { ts, node }
    }

    /// Wall-clock milliseconds since the Unix epoch at which this version was issued.
    pub fn physical_ms(&self) -> u64 {
        self.ts >> LOGICAL_BITS
    }
}

impl fmt::Display for Version {
    /// `<ts>.<node>`, the form used in the `X-Kv-Version` header.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.ts, self.node)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid version {0:?}: expected <timestamp>.<node>")]
pub struct ParseVersionError(pub String);

impl FromStr for Version {
    type Err = ParseVersionError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseVersionError(s.chars().take(64).collect());
        let (ts, node) = s.split_once('.').ok_or_else(err)?;
        Ok(Version {
            ts: ts.parse().map_err(|_| err())?,
            node: node.parse().map_err(|_| err())?,
        })
    }
}

/// A hybrid logical clock: timestamps follow wall-clock time where it moves
/// forward and a logical counter where it does not, so that every version a
/// node issues is greater than every version it issued or observed before.
///
/// Wall-clock time is read with an optional fixed offset: fault tests start a
/// node with a skewed clock without touching the machine's clock.
#[derive(Debug)]
pub struct Hlc {
    node: u32,
    offset_ms: i64,
    last: Mutex<u64>,
}

impl Hlc {
    pub fn new(node: u32) -> Self {
        Hlc::with_offset(node, 0)
    }

    /// A clock whose wall-clock reading is shifted by `offset_ms`.
    pub fn with_offset(node: u32, offset_ms: i64) -> Self {
        Hlc {
            node,
            offset_ms,
            last: Mutex::new(0),
        }
    }

    pub fn node(&self) -> u32 {
        self.node
    }

    /// This node's wall clock in ms since the Unix epoch, offset included:
    /// what peers compare theirs with to detect skew.
    pub fn wall_ms(&self) -> u64 {
        wall_clock_ms().saturating_add_signed(self.offset_ms)
    }

    /// A fresh version, strictly greater than any issued or observed before.
    pub fn now(&self) -> Version {
        self.now_at(self.wall_ms())
    }

    /// [`Hlc::now`] with the wall clock given, for tests.
    pub fn now_at(&self, wall_ms: u64) -> Version {
        let physical = wall_ms << LOGICAL_BITS;
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let ts = physical.max(last.saturating_add(1));
        *last = ts;
        Version {
            ts,
            node: self.node,
        }
    }

    /// Move the clock past a version seen from another node (or read from
    /// disk at start), so that a later local write to the same key wins over it.
    pub fn observe(&self, seen: Version) {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if seen.ts > *last {
            *last = seen.ts;
        }
    }

    /// The highest timestamp issued or observed so far.
    pub fn last(&self) -> u64 {
        *self.last.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn wall_clock_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_order_by_timestamp_then_node() {
        assert!(Version::new(1, 9) < Version::new(2, 0));
        assert!(Version::new(2, 0) < Version::new(2, 1));
        assert_eq!(
            Version::new(5, 3).max(Version::new(5, 2)),
            Version::new(5, 3)
        );
    }

    #[test]
    fn clock_is_strictly_increasing_even_when_the_wall_clock_stalls_or_goes_back() {
        let hlc = Hlc::new(1);
        let a = hlc.now_at(1000);
        let b = hlc.now_at(1000);
        let c = hlc.now_at(900);
        assert!(a < b && b < c, "{a} {b} {c}");
        assert_eq!(a.physical_ms(), 1000);
    }

    #[test]
    fn clock_follows_the_wall_clock_when_it_moves_forward() {
        let hlc = Hlc::new(1);
        hlc.now_at(1000);
        assert_eq!(hlc.now_at(2000).physical_ms(), 2000);
    }

    #[test]
    fn observing_a_newer_version_makes_the_next_local_one_newer_still() {
        let hlc = Hlc::new(1);
        let remote = Version::new(50_000 << LOGICAL_BITS, 7);
        hlc.observe(remote);
        let local = hlc.now_at(10);
        assert!(local > remote);
    }

    #[test]
    fn an_offset_clock_reads_the_wall_clock_shifted() {
        let ahead = Hlc::with_offset(1, 3_600_000);
        let plain = Hlc::new(2);
        let diff = ahead.wall_ms() as i64 - plain.wall_ms() as i64;
        assert!((3_599_000..=3_601_000).contains(&diff), "{diff}");
        assert!(ahead.now().physical_ms() >= plain.now().physical_ms() + 3_599_000);
    }

    #[test]
    fn version_text_form_round_trips_and_rejects_garbage() {
        let v = Version::new(123456789, 4);
        assert_eq!(v.to_string().parse::<Version>(), Ok(v));
        for bad in ["", "1", "a.b", "1.2.3", ".1", "1.", "-1.2", "1.99999999999"] {
            assert!(bad.parse::<Version>().is_err(), "{bad:?} parsed");
        }
    }
}
