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
    assert!(inputs.len() >= 10, "{target}: only {} corpus inputs", inputs.len());
    for (path, data) in inputs {
        if let Err(e) = std::panic::catch_unwind(|| run(&data)) {
            let msg = e.downcast_ref::<String>().cloned().or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()));
            panic!("{}: {}", path.display(), msg.unwrap_or_default());
        }
    }
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
fn harness_accepts_empty_and_short_inputs() {
    for data in [&[][..], &[0], &[1, 2, 3], &[255; 64]] {
        fuzz_ops::run_admission(data);
        fuzz_ops::run_bucket(data);
    }
}
