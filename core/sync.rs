//! The atomics the core is built on, swapped for loom's under `--cfg loom` so the
//! same code is model-checked exhaustively.

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{AtomicU64, Ordering};
#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{AtomicU64, Ordering};
