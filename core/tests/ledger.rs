//! The ledger writer against real SQLite files: every row committed once, in
//! batches, settled in order, the notifier set after each batch, a failed batch
//! reported and survived, everything queued committed by close.
#![cfg(not(loom))]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rusqlite::Connection;
use tierq_core::ledger::{connect, cost_text, Durability, Row, Writer, CHECKPOINT_ROWS, MAX_BATCH};

const WAIT: Duration = Duration::from_secs(20);

struct TempDb(PathBuf);

impl TempDb {
    fn new(name: &str) -> TempDb {
        let dir = std::env::temp_dir().join(format!("tierq-ledger-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDb(dir.join("ledger.db"))
    }
}

impl Drop for TempDb {
    fn drop(&mut self) {
        if let Some(dir) = self.0.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

fn row(id: &str) -> Row {
    Row {
        request_id: id.into(),
        ts: 1_700_000_000.0,
        key_id: "k1".into(),
        model: "m1".into(),
        endpoint: "/v1/chat/completions".into(),
        requested_tier: Some("priority".into()),
        applied_tier: "priority".into(),
        prompt_tokens: 10,
        completion_tokens: 5,
        cost_femto: 67_500_000_000, // 0.0000675 USD
        status: "served".into(),
        partial: false,
        code: None,
        queue_ms: 1.5,
        latency_ms: 20.0,
        upstream: Some("local".into()),
        fairness_id: None,
        tier_reason: None,
    }
}

/// A push as a plain thread makes it: wake the writer at once when it is owed.
fn push(w: &Writer, r: Row) -> Result<u64, tierq_core::error::CoreError> {
    let (seq, owed) = w.push(r)?;
    if owed {
        w.wake();
    }
    Ok(seq)
}

fn count(path: &PathBuf) -> i64 {
    let c = Connection::open(path).unwrap();
    c.query_row("SELECT COUNT(*) FROM ledger", [], |r| r.get(0)).unwrap()
}

fn readable(fd: i32) -> bool {
    let mut p = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd, zero timeout.
    unsafe { libc::poll(&mut p, 1, 0) == 1 }
}

/// Waits as an event loop does: on the notifier's fd, then the mark (without
/// draining, so a test can still look at what the drain returns).
fn wait_settled(w: &Writer, seq: u64) -> bool {
    let deadline = Instant::now() + WAIT;
    while w.settled() < seq {
        if Instant::now() > deadline {
            return false;
        }
        let mut p = libc::pollfd { fd: w.notify_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd; waits at most 10 ms.
        unsafe { libc::poll(&mut p, 1, 10) };
    }
    true
}

/// Holds the database's write lock until dropped, so the writer's next commit
/// stalls in busy_timeout: what a batch collects meanwhile is then known.
struct WriteLock(Connection);

impl WriteLock {
    fn take(path: &PathBuf) -> WriteLock {
        let c = Connection::open(path).unwrap();
        c.execute_batch("BEGIN IMMEDIATE").unwrap();
        WriteLock(c)
    }
}

impl Drop for WriteLock {
    fn drop(&mut self) {
        let _ = self.0.execute_batch("ROLLBACK");
    }
}

#[test]
fn a_row_is_committed_with_its_exact_columns_and_settled_in_order() {
    let db = TempDb::new("columns");
    let w = Writer::open(&db.0, Durability::Process).unwrap();
    assert!(!readable(w.notify_fd()));
    let seq = push(&w, row("a")).unwrap();
    assert_eq!(seq, 1);
    assert!(wait_settled(&w, seq));
    // The notifier is set once the batch is settled, and drain clears it.
    assert!(readable(w.notify_fd()));
    let d = w.drain();
    assert_eq!((d.settled, d.failures.len(), d.lags_us.len()), (1, 0, 1));
    assert!(!readable(w.notify_fd()));

    let c = Connection::open(&db.0).unwrap();
    let got: (String, String, i64, i64, String, i64, Option<String>, String, f64) = c
        .query_row(
            "SELECT request_id, cost, cost_micro, cost_femto, status, partial, code, upstream, queue_ms FROM ledger",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?, r.get(7)?, r.get(8)?)),
        )
        .unwrap();
    assert_eq!(got, ("a".into(), "0.0000675".into(), 67, 500_000_000, "served".into(), 0, None, "local".into(), 1.5));
    assert_eq!(push(&w, row("b")).unwrap(), 2);
    w.close();
    assert_eq!(count(&db.0), 2);
    assert_eq!(w.stats().rows_committed, 2);
}

/// The ledger table as every tierq before the fairness id (and the tier reason) made it.
const OLD_SCHEMA: &str = "CREATE TABLE ledger (request_id TEXT PRIMARY KEY, ts REAL NOT NULL, \
    key_id TEXT NOT NULL, model TEXT NOT NULL, endpoint TEXT NOT NULL, requested_tier TEXT, \
    applied_tier TEXT NOT NULL, prompt_tokens INTEGER NOT NULL, completion_tokens INTEGER NOT NULL, \
    cost TEXT NOT NULL, cost_micro INTEGER NOT NULL, cost_femto INTEGER NOT NULL, \
    status TEXT NOT NULL, partial INTEGER NOT NULL, code TEXT, queue_ms REAL NOT NULL, \
    latency_ms REAL NOT NULL, upstream TEXT); \
    INSERT INTO ledger VALUES ('old', 1.0, 'k', 'm', 'e', NULL, 'default', 1, 2, '0.5', 500000, 0, \
    'served', 0, NULL, 0.0, 1.0, NULL);";

#[test]
fn an_older_ledger_file_gains_the_added_columns_and_keeps_its_rows() {
    let db = TempDb::new("migrate");
    // In WAL mode, as every tierq left its file: a file still in rollback mode
    // makes the second opener's switch to WAL meet the first one's migration
    // lock, which SQLite answers busy at once (no busy handler on that path).
    let old = Connection::open(&db.0).unwrap();
    let mode: String = old.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0)).unwrap();
    assert_eq!(mode, "wal");
    old.execute_batch(OLD_SCHEMA).unwrap();
    drop(old);
    // Two writers opening the old file at once add each column once.
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| Writer::open(&db.0, Durability::Process));
        let b = s.spawn(|| Writer::open(&db.0, Durability::Process));
        (a.join().unwrap().unwrap(), b.join().unwrap().unwrap())
    });
    b.close();
    let mut r = row("new");
    r.fairness_id = Some("tenant 7".into());
    r.tier_reason = Some("budget".into());
    let seq = push(&a, r).unwrap();
    assert!(wait_settled(&a, seq));
    a.close();
    let c = Connection::open(&db.0).unwrap();
    type Got = (String, Option<String>, Option<String>);
    let got: Vec<Got> = c
        .prepare("SELECT request_id, fairness_id, tier_reason FROM ledger ORDER BY request_id")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(got, vec![("new".into(), Some("tenant 7".into()), Some("budget".into())),
                         ("old".into(), None, None)]);
}

#[test]
fn rows_queued_during_a_commit_share_the_next_one() {
    let db = TempDb::new("group");
    let w = Writer::open(&db.0, Durability::Power).unwrap();
    let lock = WriteLock::take(&db.0);
    let first = push(&w, row("first")).unwrap();
    // Wait until the writer has taken the first row (and stalls on the lock).
    let deadline = Instant::now() + WAIT;
    while w.pending() > 0 {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(1));
    }
    let mut last = first;
    for i in 0..999 {
        last = push(&w, row(&format!("r{i}"))).unwrap();
    }
    assert_eq!(w.pending(), 999);
    drop(lock);
    assert!(wait_settled(&w, last));
    assert_eq!(count(&db.0), 1000);
    // One commit for the row in flight, one for all that queued behind it.
    assert_eq!(w.stats().batches, 2);
    let d = w.drain();
    assert_eq!((d.settled, d.failures.len(), d.lags_us.len()), (1000, 0, 2));
    w.close();
}

#[test]
fn a_flood_is_cut_into_batches_of_at_most_max_batch() {
    let db = TempDb::new("flood");
    let w = Writer::open(&db.0, Durability::Process).unwrap();
    let lock = WriteLock::take(&db.0);
    let first = push(&w, row("first")).unwrap();
    while w.pending() > 0 {
        std::thread::sleep(Duration::from_millis(1));
    }
    let n = MAX_BATCH + 10;
    let mut last = first;
    for i in 0..n {
        last = push(&w, row(&format!("f{i}"))).unwrap();
    }
    drop(lock);
    assert!(wait_settled(&w, last));
    // first; then MAX_BATCH; then the 10 left.
    assert_eq!(w.stats().batches, 3);
    assert_eq!(count(&db.0), n as i64 + 1);
    w.close();
}

#[test]
fn a_sleeping_writer_is_owed_one_wake_up_and_its_rows_wait_for_it_in_one_batch() {
    let db = TempDb::new("wake");
    let w = Writer::open(&db.0, Durability::Process).unwrap();
    // Push one row at a time, each committed before the next, until one finds
    // the writer asleep: that push owes the wake-up (the writer sleeps after
    // every batch, so this ends within a few rows).
    let mut owed_at = None;
    for i in 0..10_000 {
        let (seq, owed) = w.push(row(&format!("w{i}"))).unwrap();
        if owed {
            owed_at = Some(seq);
            break;
        }
        assert!(wait_settled(&w, seq));
    }
    let owed_at = owed_at.expect("the writer never slept");
    // Until the wake-up is made, the writer sleeps on: later pushes owe nothing
    // and nothing is taken.
    let batches = w.stats().batches;
    for i in 0..50 {
        assert_eq!(w.push(row(&format!("later{i}"))).unwrap(), (owed_at + 1 + i, false));
    }
    assert_eq!(w.pending(), 51);
    assert_eq!(w.settled(), owed_at - 1);
    // One wake-up: all 51 rows in one batch.
    w.wake();
    assert!(wait_settled(&w, owed_at + 50));
    assert_eq!(w.stats().batches, batches + 1);
    assert_eq!(count(&db.0), owed_at as i64 + 50);
    w.close();
}

#[test]
fn pushes_from_many_threads_are_all_committed_exactly_once() {
    let db = TempDb::new("threads");
    let w = Arc::new(Writer::open(&db.0, Durability::Process).unwrap());
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let w = w.clone();
            std::thread::spawn(move || (0..500).map(|i| push(&w, row(&format!("t{t}-{i}"))).unwrap()).collect::<Vec<u64>>())
        })
        .collect();
    let mut seqs: Vec<u64> = threads.into_iter().flat_map(|h| h.join().unwrap()).collect();
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=2000).collect::<Vec<u64>>(), "every push has its own sequence number");
    assert!(wait_settled(&w, 2000));
    assert_eq!(count(&db.0), 2000);
    let s = w.stats();
    assert_eq!((s.rows_committed, s.commit_errors), (2000, 0));
    w.close();
}

#[test]
fn a_repeated_request_id_is_stored_once_with_its_first_cost() {
    let db = TempDb::new("dup");
    let w = Writer::open(&db.0, Durability::Process).unwrap();
    push(&w, row("dup")).unwrap();
    let mut again = row("dup");
    again.cost_femto = 99;
    let seq = push(&w, again).unwrap();
    assert!(wait_settled(&w, seq));
    w.close();
    let c = Connection::open(&db.0).unwrap();
    let cost: String = c.query_row("SELECT cost FROM ledger WHERE request_id = 'dup'", [], |r| r.get(0)).unwrap();
    assert_eq!((count(&db.0), cost.as_str()), (1, "0.0000675"));
}

#[test]
fn a_failed_batch_is_reported_with_its_rows_and_the_writer_goes_on() {
    let db = TempDb::new("fail");
    let w = Writer::open(&db.0, Durability::Process).unwrap();
    // A real failure inside the transaction: the database refuses this row.
    let c = Connection::open(&db.0).unwrap();
    c.execute_batch(
        "CREATE TRIGGER refuse BEFORE INSERT ON ledger WHEN NEW.request_id = 'bad' \
         BEGIN SELECT RAISE(ABORT, 'refused by the test'); END;",
    )
    .unwrap();
    let bad = push(&w, row("bad")).unwrap();
    assert!(wait_settled(&w, bad));
    let after = push(&w, row("after")).unwrap();
    assert!(wait_settled(&w, after));
    let d = w.drain();
    assert_eq!(d.settled, 2);
    assert_eq!(d.lags_us.len(), 1, "a lag for the committed batch only");
    assert_eq!(d.failures.len(), 1);
    assert_eq!((d.failures[0].first, d.failures[0].last), (1, 1));
    assert!(d.failures[0].message.contains("refused by the test"), "{}", d.failures[0].message);
    let s = w.stats();
    assert_eq!((s.batches, s.commit_errors, s.rows_committed), (1, 1, 1));
    w.close();
    let ids: Vec<String> = c.prepare("SELECT request_id FROM ledger").unwrap().query_map([], |r| r.get(0)).unwrap().map(Result::unwrap).collect();
    assert_eq!(ids, vec!["after".to_string()]);
}

#[test]
fn close_commits_everything_queued_and_then_refuses_rows() {
    let db = TempDb::new("close");
    let w = Writer::open(&db.0, Durability::Process).unwrap();
    let lock = WriteLock::take(&db.0);
    for i in 0..300 {
        push(&w, row(&format!("c{i}"))).unwrap();
    }
    let releaser = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(50));
        drop(lock);
    });
    w.close(); // waits for the lock, then commits all 300
    releaser.join().unwrap();
    assert_eq!(count(&db.0), 300);
    assert_eq!(w.drain().settled, 300);
    assert!(push(&w, row("late")).is_err());
    w.close(); // a second close returns at once
}

#[test]
fn the_checkpointer_moves_committed_rows_into_the_database_file() {
    let db = TempDb::new("checkpoint");
    let w = Writer::open(&db.0, Durability::Process).unwrap();
    let before = std::fs::metadata(&db.0).unwrap().len();
    let mut last = 0;
    for i in 0..CHECKPOINT_ROWS + 10 {
        last = push(&w, row(&format!("k{i}"))).unwrap();
    }
    assert!(wait_settled(&w, last));
    let deadline = Instant::now() + WAIT;
    while w.stats().checkpoints == 0 {
        assert!(Instant::now() < deadline, "no checkpoint ran");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(std::fs::metadata(&db.0).unwrap().len() > before);
    w.close();
}

#[test]
fn connect_sets_wal_and_synchronous_by_durability() {
    let db = TempDb::new("pragmas");
    for (d, want) in [(Durability::Process, 1), (Durability::Power, 2)] {
        let c = connect(&db.0, d).unwrap();
        let mode: String = c.query_row("PRAGMA journal_mode", [], |r| r.get(0)).unwrap();
        let sync: i64 = c.query_row("PRAGMA synchronous", [], |r| r.get(0)).unwrap();
        assert_eq!((mode.as_str(), sync), ("wal", want));
    }
}

#[test]
fn an_unopenable_path_is_an_error_not_a_panic() {
    let err = Writer::open(&PathBuf::from("/nonexistent-dir/x/ledger.db"), Durability::Process).err().unwrap();
    let msg = err.to_string();
    assert!(msg.starts_with("ledger: ") && msg.matches("/nonexistent-dir/x/ledger.db").count() == 1, "{msg}");
}

#[test]
fn a_cost_too_large_for_the_integer_columns_is_refused_at_push() {
    let db = TempDb::new("huge");
    let w = Writer::open(&db.0, Durability::Process).unwrap();
    let mut r = row("huge");
    r.cost_femto = u128::MAX;
    assert!(push(&w, r).is_err());
    assert_eq!(w.last_pushed(), 0);
    assert_eq!(cost_text(u128::from(u64::MAX)), "18446.744073709551615");
    w.close();
}
