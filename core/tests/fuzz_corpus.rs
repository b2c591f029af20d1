//! Replays the committed fuzz corpus (`fuzz/corpus/{admission_ops,bucket}`)
//! through the fuzz targets' own harness, on stable and without libFuzzer, so
//! CI re-checks every input the fuzzer kept. A few fixed inputs run too, so
//! the test means something even before a corpus exists.
#![cfg(not(loom))]

#[path = "fuzz_ops.rs"]
mod fuzz_ops;

use std::path::PathBuf;

fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus").join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files.into_iter().map(|p| (p.clone(), std::fs::read(&p).unwrap())).collect()
}

fn replay(target: &str, run: fn(&[u8])) {
    let inputs = corpus(target);
    let n = inputs.len();
    for (path, data) in inputs {
        if let Err(e) = std::panic::catch_unwind(|| run(&data)) {
            let msg = e.downcast_ref::<String>().cloned().or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()));
            panic!("{}: {}", path.display(), msg.unwrap_or_default());
        }
    }
    assert!(n >= 10, "{target}: only {n} corpus inputs");
}

#[test]
fn admission_ops_corpus_keeps_every_invariant() {
    replay("admission_ops", fuzz_ops::run_admission);
}

#[test]
fn bucket_corpus_matches_the_exact_rule() {
    replay("bucket", fuzz_ops::run_bucket);
}

#[test]
fn replicas_corpus_follows_the_grant_rule() {
    replay("replicas", fuzz_ops::run_replicas);
}

#[test]
fn harness_accepts_empty_and_short_inputs() {
    for data in [&[][..], &[0], &[1, 2, 3], &[255; 64]] {
        fuzz_ops::run_admission(data);
        fuzz_ops::run_bucket(data);
        fuzz_ops::run_replicas(data);
    }
}

// Bugs the fuzzer found, each named after the bug; their crashing inputs are
// in the corpus too.

use std::sync::Arc;
use tierq_core::{Admit, BucketParams, Clock, Lane, ManualClock, Pool, PoolSpec, ShedCode, TokenBucket};

#[test]
fn default_waiter_evicted_for_a_priority_arrival_that_is_then_shed_is_not_lost() {
    // queue_depth 2: a priority waiter holds the head of its lane while 7
    // cancelled ones fill the rest of its 8-cell ring with tombstones; a default
    // waiter fills the queue. The next priority arrival cannot join (no cell):
    // it used to evict the default waiter anyway and report only its own shed,
    // so the victim's owner never heard and its client waited forever.
    let clock = Arc::new(ManualClock::new(1));
    let pool = Pool::new(PoolSpec { max_concurrency: Some(1), queue_depth: 2, max_wait_ms: [1e3, 1e3, 600_000.0], rate: None, burst: None, priority_reserve: 0.0, default_min_share: 0.0, ..PoolSpec::default() }.validate().unwrap(), Clock::Manual(clock));
    assert_eq!(pool.admit(Lane::Priority, 1), Admit::Now);
    assert!(matches!(pool.admit(Lane::Priority, 1), Admit::Queued { .. }));
    for _ in 0..7 {
        let Admit::Queued { waiter, .. } = pool.admit(Lane::Priority, 1) else { panic!("expected to queue") };
        assert!(pool.cancel(waiter));
    }
    let Admit::Queued { waiter: victim, .. } = pool.admit(Lane::Default, 1) else { panic!("expected to queue") };
    assert!(matches!(pool.admit(Lane::Priority, 1), Admit::Shed { code: ShedCode::ServerOverloaded, evicted: None, .. }));
    assert_eq!(pool.stats().depth, [1, 1, 0], "the default waiter is still in line");
    assert!(pool.deadline_ns(victim).is_some());
    assert!(pool.cancel(victim));
}

#[test]
fn burst_whose_refill_time_overflows_the_clock_is_refused_not_saturated() {
    // rate 1e6/s, burst 1e30: tau = 1e33 ns saturated to u64::MAX, and then
    // a take of u64::MAX tokens (need saturated too) was allowed.
    let e = BucketParams::new(1e6, 1e30, 0.0).unwrap_err();
    assert!(e.to_string().starts_with("burst:"), "{e}");
    assert!(TokenBucket::new(0.001, 1e9, 0.0, Clock::Monotonic).is_err());
    assert!(PoolSpec { max_concurrency: Some(1), queue_depth: 1, max_wait_ms: [1.0, 1.0, 600_000.0], rate: Some(0.001), burst: Some(1e9), priority_reserve: 0.0, default_min_share: 0.0, ..PoolSpec::default() }.validate().is_err());
    // The largest accepted refill time still works exactly.
    let b = TokenBucket::new(1.0, 1e9, 0.0, Clock::Manual(Arc::new(ManualClock::new(1)))).unwrap();
    assert_eq!(b.try_take(u64::MAX, Lane::Priority), Err(u64::MAX));
    assert_eq!(b.try_take(1_000_000_000, Lane::Priority), Ok(()));
}
