//! The core's one error type. Only bad settings are errors; expected outcomes
//! (a shed, a full queue) are values. `py.rs` turns this into `ValueError` once.

use std::fmt;

#[derive(Debug, Clone, PartialEq)]
pub enum CoreError {
    /// A constructor or call argument is out of range; names the argument.
    InvalidArgument { name: &'static str, reason: String },
    /// A shared state block does not match what this process expects (magic,
    /// version, size, settings or worker count).
    Layout(String),
    /// A system call on shared memory failed.
    Os(String),
    /// The ledger could not open its file, start, or take a row.
    Ledger(String),
}

impl CoreError {
    pub(crate) fn arg(name: &'static str, reason: impl Into<String>) -> Self {
        CoreError::InvalidArgument { name, reason: reason.into() }
    }
}

impl fmt::Display for CoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CoreError::InvalidArgument { name, reason } => write!(f, "{name}: {reason}"),
            CoreError::Layout(m) => write!(f, "shared state: {m}"),
            CoreError::Os(m) => write!(f, "shared memory: {m}"),
            CoreError::Ledger(m) => write!(f, "ledger: {m}"),
        }
    }
}

impl std::error::Error for CoreError {}
