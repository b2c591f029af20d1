//! tierq's admission core: a GCRA token bucket, a lock-free three-lane waiter
//! queue with slot accounting, a table of per-key buckets and the usage
//! ledger's writer (SQLite, batched), in plain Rust.
//! `py.rs` (feature `python`) is the only module that knows about Python.

pub mod access;
pub mod admission;
mod block;
pub mod bucket;
pub mod clock;
mod crash;
pub mod error;
#[cfg(not(loom))]
pub mod finish;
#[doc(hidden)]
pub mod fair;
pub mod keytable;
pub mod limit;
pub mod replicas;
mod lanes;
#[cfg(not(loom))]
pub mod ledger;
#[doc(hidden)]
pub mod mailbox;
#[cfg(not(loom))]
pub mod shm;
pub mod settings;
pub mod sse;
#[cfg(not(loom))]
pub mod upstream;
mod sync;
mod words;

#[cfg(feature = "python")]
mod py;

pub use admission::{Admit, Ask, Outcome, Placed, Pool, ShedCode, Stats, WaiterId};
pub use block::MAX_WORKERS;
pub use settings::{Fairness, PoolSettings, PoolSpec};
pub use limit::{LimitMode, Signal};
pub use bucket::{BucketParams, Decision, TokenBucket};
pub use clock::{Clock, ManualClock};
pub use error::CoreError;
pub use keytable::KeyTable;

/// The three lanes, which are the three tiers tierq sells. Their names (`as_str`)
/// are the tier names everywhere: the JSON echo, the ledger, metrics labels,
/// TOML keys. Python's `tierq.Tier` is built from `ALL` (`tierq._core.TIERS`),
/// so this is the one place they are spelled. The discriminants index per-lane
/// arrays in state and stats. Flex is served from idle capacity only: after
/// every priority and default waiter, and only below the limit minus both
/// headrooms (`admission.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Lane {
    Priority = 0,
    Default = 1,
    Flex = 2,
}

impl Lane {
    /// Every lane in discriminant order: `ALL[i] as usize == i`.
    pub const ALL: [Lane; 3] = [Lane::Priority, Lane::Default, Lane::Flex];

    pub fn parse(s: &str) -> Result<Lane, CoreError> {
        Lane::ALL.into_iter().find(|l| l.as_str() == s).ok_or_else(|| {
            CoreError::arg("tier", format!("must be {}, got {s:?}", Lane::one_of()))
        })
    }
    /// The lane of discriminant `i`, if there is one.
    pub fn from_index(i: usize) -> Option<Lane> {
        Lane::ALL.get(i).copied()
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Lane::Priority => "priority",
            Lane::Default => "default",
            Lane::Flex => "flex",
        }
    }
    /// The key path of this lane's max wait, as a settings error names it.
    pub fn max_wait_key(self) -> &'static str {
        match self {
            Lane::Priority => "max_wait_ms.priority",
            Lane::Default => "max_wait_ms.default",
            Lane::Flex => "max_wait_ms.flex",
        }
    }
    /// `"priority", "default" or "flex"`, for error messages.
    pub fn one_of() -> String {
        let names = Lane::ALL.map(|l| format!("{:?}", l.as_str()));
        format!("{} or {}", names[..names.len() - 1].join(", "), names[names.len() - 1])
    }
}

#[cfg(test)]
mod lane_tests {
    use super::Lane;

    #[test]
    fn all_lists_each_lane_at_its_discriminant_and_names_parse_back() {
        for (i, lane) in Lane::ALL.into_iter().enumerate() {
            assert_eq!(lane as usize, i);
            assert_eq!(Lane::from_index(i), Some(lane));
            assert_eq!(Lane::parse(lane.as_str()).unwrap(), lane);
            assert_eq!(lane.max_wait_key(), format!("max_wait_ms.{}", lane.as_str()));
        }
        assert_eq!(Lane::from_index(Lane::ALL.len()), None);
        let err = Lane::parse("scale").unwrap_err().to_string();
        assert_eq!(err, r#"tier: must be "priority", "default" or "flex", got "scale""#);
    }
}
