//! tierq's admission core: a GCRA token bucket, a lock-free two-lane waiter
//! queue with slot accounting, a table of per-key buckets and the usage
//! ledger's writer (SQLite, batched), in plain Rust.
//! `py.rs` (feature `python`) is the only module that knows about Python.

pub mod admission;
mod block;
pub mod bucket;
pub mod clock;
mod crash;
pub mod error;
#[doc(hidden)]
pub mod fair;
pub mod keytable;
pub mod limit;
mod lanes;
#[cfg(not(loom))]
pub mod ledger;
#[doc(hidden)]
pub mod mailbox;
#[cfg(not(loom))]
pub mod shm;
pub mod settings;
pub mod sse;
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

/// The two lanes. The discriminants index per-lane arrays in state and stats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Lane {
    Priority = 0,
    Default = 1,
}

impl Lane {
    pub fn parse(s: &str) -> Result<Lane, CoreError> {
        match s {
            "priority" => Ok(Lane::Priority),
            "default" => Ok(Lane::Default),
            other => Err(CoreError::arg("tier", format!("must be \"priority\" or \"default\", got {other:?}"))),
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Lane::Priority => "priority",
            Lane::Default => "default",
        }
    }
}
