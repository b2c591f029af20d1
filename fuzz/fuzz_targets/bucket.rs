//! The GCRA rule (`TokenBucket`, `bucket::decide`) against the same rule
//! computed exactly in u128. Harness in `core/tests/fuzz_ops.rs`.
#![no_main]

#[path = "../../core/tests/fuzz_ops.rs"]
mod fuzz_ops;

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz_ops::run_bucket(data));
