//! Random picks, releases and engine queues on a pool's `Replicas` checked
//! against a plain model of the grant rule after every operation. The harness
//! lives in `core/tests/fuzz_ops.rs` so the stable test `fuzz_corpus` replays
//! the committed corpus with the same code.
#![no_main]

#[path = "../../core/tests/fuzz_ops.rs"]
mod fuzz_ops;

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz_ops::run_replicas(data));
