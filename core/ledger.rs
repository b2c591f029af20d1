//! The usage ledger's writer, in plain Rust: one thread owns a SQLite
//! connection (WAL) and commits queued rows in batches (group commit); a second
//! thread checkpoints the WAL on its own connection, off the commit path.
//! `py.rs` wraps it for `tierq.ledger`.
//!
//! The protocol with the caller (an event loop):
//! - `push(row)` appends the row under a short lock and returns its sequence
//!   number (1, 2, 3, ... in push order); it never waits for I/O and never
//!   wakes the writer itself. When the writer sleeps, the first push after it
//!   fell asleep says so (`wake` owed): its caller calls `wake()` (one futex
//!   call) when it chooses. The event loop does it after the callbacks it is
//!   running, so every row they push shares that one wake-up and one batch;
//!   pushes meanwhile owe nothing.
//! - The writer takes everything queued (at most `MAX_BATCH` rows) into one
//!   transaction. Rows that arrive while it commits form the next batch, so
//!   under load many rows share one commit and one sync.
//! - After each batch the writer marks its rows settled (committed, or failed
//!   as a whole) and writes the notifier (an eventfd) once. The loop watches the
//!   notifier's fd; one read tells it about every batch settled since the last.
//! - `drain()` clears the notifier and returns the settled high-water mark
//!   (every row with a sequence number at or below it is settled) and the ranges
//!   that failed, so the caller resolves all its waiters up to the mark at once.
//!
//! Money is an integer: `cost_femto` in femto-USD (1e-15). The `cost` TEXT
//! column is rendered from it exactly, and `cost_micro`/`cost_femto` split it so
//! SQL sums never overflow (see `tierq.ledger`).

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rusqlite::{params, Connection};

use crate::error::CoreError;

/// Rows per transaction at most: bounds one commit's latency under a flood.
pub const MAX_BATCH: usize = 8192;
/// How long a commit waits for another writer of the same file (keys, a CLI).
pub const BUSY_TIMEOUT: Duration = Duration::from_millis(5000);
/// The checkpointer runs once this many rows were committed since its last
/// round, or every `CHECKPOINT_EVERY`.
pub const CHECKPOINT_ROWS: u64 = 1000;
pub const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);
const FEMTO_PER_MICRO: u128 = 1_000_000_000;
const FEMTO_PER_USD: u128 = 1_000_000_000_000_000;
/// Lag samples kept between two drains (one per batch); more are dropped.
const MAX_LAGS: usize = 4096;

/// The table as a new file gets it. A file an older tierq made gains the
/// `ADDED_COLUMNS` it lacks when it is opened (`connect`).
pub const SCHEMA: &str = "\
CREATE TABLE IF NOT EXISTS ledger (
    request_id        TEXT PRIMARY KEY,
    ts                REAL NOT NULL,
    key_id            TEXT NOT NULL,
    model             TEXT NOT NULL,
    endpoint          TEXT NOT NULL,
    requested_tier    TEXT,
    applied_tier      TEXT NOT NULL,
    prompt_tokens     INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    cost              TEXT NOT NULL,
    cost_micro        INTEGER NOT NULL,
    cost_femto        INTEGER NOT NULL,
    status            TEXT NOT NULL,
    partial           INTEGER NOT NULL,
    code              TEXT,
    queue_ms          REAL NOT NULL,
    latency_ms        REAL NOT NULL,
    upstream          TEXT,
    fairness_id       TEXT,
    tier_reason       TEXT
);
CREATE INDEX IF NOT EXISTS ledger_ts ON ledger (ts);
";

/// Columns added after the first ledger, each with the statement that adds it
/// to an older file: (column, ALTER TABLE). Append only. Python's readers
/// (tierq.ledger.connect) apply the same list.
pub const ADDED_COLUMNS: &[(&str, &str)] = &[
    // The x-tierq-fairness-id a trusted key's request carried (NULL otherwise).
    ("fairness_id", "ALTER TABLE ledger ADD COLUMN fairness_id TEXT"),
    // Why a request was served below the tier it asked for ("ramp", "budget";
    // NULL when it was not downgraded). `code` keeps its meaning.
    ("tier_reason", "ALTER TABLE ledger ADD COLUMN tier_reason TEXT"),
];

/// A repeated request_id is ignored: a retry or a restart never bills twice.
const INSERT: &str = "INSERT OR IGNORE INTO ledger (request_id, ts, key_id, model, endpoint, \
    requested_tier, applied_tier, prompt_tokens, completion_tokens, cost, cost_micro, cost_femto, \
    status, partial, code, queue_ms, latency_ms, upstream, fairness_id, tier_reason) \
    VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, \
    ?20)";

/// `process`: a commit is a write to the WAL (survives kill -9, not power
/// loss); `power`: each commit is synced (`synchronous = FULL`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    Process,
    Power,
}

impl Durability {
    pub fn parse(s: &str) -> Result<Durability, CoreError> {
        match s {
            "process" => Ok(Durability::Process),
            "power" => Ok(Durability::Power),
            other => Err(CoreError::arg("durability", format!("must be \"process\" or \"power\", got {other:?}"))),
        }
    }
}

/// One request decision. The caller validates meaning (status, tiers); the
/// types here are what SQLite stores.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub request_id: String,
    pub ts: f64,
    pub key_id: String,
    pub model: String,
    pub endpoint: String,
    pub requested_tier: Option<String>,
    pub applied_tier: String,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    /// Femto-USD (1e-15).
    pub cost_femto: u128,
    pub status: String,
    pub partial: bool,
    pub code: Option<String>,
    pub queue_ms: f64,
    pub latency_ms: f64,
    pub upstream: Option<String>,
    pub fairness_id: Option<String>,
    /// Why it was served below the tier it asked for (`ramp`, `budget`), if it was.
    pub tier_reason: Option<String>,
}

/// Exact fixed-point USD text of a femto-USD amount, without trailing zeros
/// (`67_500_000_000` -> `"0.0000675"`, `0` -> `"0"`).
pub fn cost_text(femto: u128) -> String {
    let (usd, frac) = (femto / FEMTO_PER_USD, femto % FEMTO_PER_USD);
    if frac == 0 {
        return usd.to_string();
    }
    let digits = format!("{frac:015}");
    format!("{usd}.{}", digits.trim_end_matches('0'))
}

/// A batch that did not commit: rows `first..=last` and SQLite's message.
#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    pub first: u64,
    pub last: u64,
    pub message: String,
}

/// What the writer settled since the last `drain`.
#[derive(Debug, Default, PartialEq)]
pub struct Drained {
    /// Every row with a sequence number <= this is committed or in `failures`.
    pub settled: u64,
    pub failures: Vec<Failure>,
    /// Per committed batch, its oldest row's wait from `push` to commit, in µs.
    pub lags_us: Vec<u64>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    pub batches: u64,
    pub rows_committed: u64,
    pub commit_errors: u64,
    pub checkpoints: u64,
}

/// The SQLite library the writer runs on: the system's shared one, the same
/// copy Python's sqlite3 module loads (see Cargo.toml).
pub fn sqlite_version() -> &'static str {
    rusqlite::version()
}

/// A connection with the ledger's pragmas and schema.
pub fn connect(path: &Path, durability: Durability) -> Result<Connection, CoreError> {
    let conn = Connection::open(path).map_err(|e| ledger_err(path, e))?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(|e| ledger_err(path, e))?;
    // WAL: readers never block the writer. NORMAL: a commit is a write to the
    // WAL; FULL syncs each commit (group commit: a commit carries a batch).
    let mode: String = while_busy(|| conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0)))
        .map_err(|e| ledger_err(path, e))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(CoreError::Ledger(format!("{}: journal_mode is {mode}, not wal", path.display())));
    }
    let sync = if durability == Durability::Power { "FULL" } else { "NORMAL" };
    conn.pragma_update(None, "synchronous", sync).map_err(|e| ledger_err(path, e))?;
    while_busy(|| migrate(&conn)).map_err(|e| ledger_err(path, e))?;
    Ok(conn)
}

/// Runs `step` again while SQLite answers it busy, for up to `BUSY_TIMEOUT`.
/// The busy handler covers most waits, but not the ones SQLite's deadlock
/// rule answers at once: on a brand-new file (rollback mode) one opener's
/// switch to WAL meets the other's `BEGIN IMMEDIATE` and is refused without
/// waiting (2 to 11 of 60 pairs of processes opening one new file failed so).
fn while_busy<T>(mut step: impl FnMut() -> rusqlite::Result<T>) -> rusqlite::Result<T> {
    let deadline = std::time::Instant::now() + BUSY_TIMEOUT;
    loop {
        match step() {
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::DatabaseBusy && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(5));
            }
            other => return other,
        }
    }
}

/// Creates the table, or adds the `ADDED_COLUMNS` an older file lacks, in one
/// IMMEDIATE transaction: two processes opening an old file at once add each
/// column once.
fn migrate(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch("BEGIN IMMEDIATE")?;
    let result = (|| {
        conn.execute_batch(SCHEMA)?;
        let mut have = Vec::new();
        {
            let mut stmt = conn.prepare("PRAGMA table_info(ledger)")?;
            let mut rows = stmt.query([])?;
            while let Some(r) = rows.next()? {
                have.push(r.get::<_, String>(1)?);
            }
        }
        for (column, ddl) in ADDED_COLUMNS {
            if !have.iter().any(|c| c == column) {
                conn.execute_batch(ddl)?;
            }
        }
        conn.execute_batch("COMMIT")
    })();
    if result.is_err() && !conn.is_autocommit() {
        let _ = conn.execute_batch("ROLLBACK");
    }
    result
}

fn ledger_err(path: &Path, e: rusqlite::Error) -> CoreError {
    let (path, msg) = (path.display().to_string(), e.to_string());
    // An open error already names the file.
    CoreError::Ledger(if msg.contains(&path) { msg } else { format!("{path}: {msg}") })
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere must not take the ledger down with it: the data behind
    // each lock is plain counters and vectors, valid at every step.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

struct Queued {
    row: Row,
    queued: Instant,
}

struct Queue {
    rows: Vec<Queued>,
    /// Sequence number of the last row pushed (0: none yet).
    pushed: u64,
    /// Sequence number of the last row the writer took.
    taken: u64,
    writer_idle: bool,
    stopping: bool,
}

struct Done {
    settled: u64,
    failures: Vec<Failure>,
    lags_us: Vec<u64>,
}

struct Checkpoint {
    /// Rows committed since the checkpointer's last round.
    uncheckpointed: u64,
    stopping: bool,
}

struct Shared {
    queue: Mutex<Queue>,
    wake_writer: Condvar,
    done: Mutex<Done>,
    checkpoint: Mutex<Checkpoint>,
    wake_checkpointer: Condvar,
    notifier: Notifier,
    /// Counters, written by the writer and checkpointer threads; read anywhere.
    batches: AtomicU64,
    rows_committed: AtomicU64,
    commit_errors: AtomicU64,
    checkpoints: AtomicU64,
}

/// The writer and checkpointer threads and the queue between them and the caller.
pub struct Writer {
    shared: Arc<Shared>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl Writer {
    /// Opens (creating if needed) the ledger at `path` and starts its threads.
    /// Blocks for the open (up to `BUSY_TIMEOUT` if another writer holds the file).
    pub fn open(path: &Path, durability: Durability) -> Result<Writer, CoreError> {
        let conn = connect(path, durability)?;
        // The writer never checkpoints: a checkpoint copies the WAL into the
        // database and syncs it, a stall every waiting response would share.
        let _: i64 = conn.query_row("PRAGMA wal_autocheckpoint = 0", [], |r| r.get(0)).map_err(|e| ledger_err(path, e))?;
        let checkpoint_conn = connect(path, durability)?;
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue { rows: Vec::new(), pushed: 0, taken: 0, writer_idle: false, stopping: false }),
            wake_writer: Condvar::new(),
            done: Mutex::new(Done { settled: 0, failures: Vec::new(), lags_us: Vec::new() }),
            checkpoint: Mutex::new(Checkpoint { uncheckpointed: 0, stopping: false }),
            wake_checkpointer: Condvar::new(),
            notifier: Notifier::new()?,
            batches: AtomicU64::new(0),
            rows_committed: AtomicU64::new(0),
            commit_errors: AtomicU64::new(0),
            checkpoints: AtomicU64::new(0),
        });
        let spawn = |name: &str, f: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new()
                .name(name.into())
                .spawn(f)
                .map_err(|e| CoreError::Ledger(format!("cannot start {name}: {e}")))
        };
        let s = shared.clone();
        let writer = spawn("tierq-ledger-writer", Box::new(move || write_loop(&s, conn)))?;
        let s = shared.clone();
        let checkpointer = match spawn("tierq-ledger-checkpointer", Box::new(move || checkpoint_loop(&s, checkpoint_conn))) {
            Ok(h) => h,
            Err(e) => {
                shared.stop();
                let _ = writer.join();
                return Err(e);
            }
        };
        Ok(Writer { shared, threads: Mutex::new(vec![writer, checkpointer]) })
    }

    /// Queues `row`; returns its sequence number and whether the caller owes
    /// the writer its wake-up (`wake()`): true for the first push since the
    /// writer fell asleep, false while it is awake or a wake-up is already owed.
    /// Err once `close` began, or for a cost whose micro-USD part would not fit
    /// SQLite's INTEGER.
    pub fn push(&self, row: Row) -> Result<(u64, bool), CoreError> {
        if row.cost_femto / FEMTO_PER_MICRO > i64::MAX as u128 {
            return Err(CoreError::arg("cost_femto", format!("{} femto-USD is more than a ledger row holds", row.cost_femto)));
        }
        let queued = Instant::now();
        let mut q = lock(&self.shared.queue);
        if q.stopping {
            return Err(CoreError::Ledger("closed".into()));
        }
        q.rows.push(Queued { row, queued });
        q.pushed += 1;
        let owed = q.writer_idle;
        q.writer_idle = false; // one wake-up is enough until it sleeps again
        Ok((q.pushed, owed))
    }

    /// Wakes the writer: what a push that returned `true` owes. A futex call
    /// when the writer sleeps; harmless when it does not (or after `close`).
    pub fn wake(&self) {
        self.shared.wake_writer.notify_one();
    }

    /// Sequence number of the last row pushed (0: none).
    pub fn last_pushed(&self) -> u64 {
        lock(&self.shared.queue).pushed
    }

    /// Rows queued that the writer has not taken into a batch yet.
    pub fn pending(&self) -> usize {
        lock(&self.shared.queue).rows.len()
    }

    /// The settled high-water mark, without clearing anything.
    pub fn settled(&self) -> u64 {
        lock(&self.shared.done).settled
    }

    /// Clears the notifier, then takes what was settled since the last drain.
    /// In that order: a batch settled in between leaves the notifier set, so
    /// it is never missed (at worst the next wake-up finds nothing new).
    pub fn drain(&self) -> Drained {
        self.shared.notifier.clear();
        let mut d = lock(&self.shared.done);
        Drained {
            settled: d.settled,
            failures: std::mem::take(&mut d.failures),
            lags_us: std::mem::take(&mut d.lags_us),
        }
    }

    /// The fd the notifier makes readable after each settled batch.
    pub fn notify_fd(&self) -> i32 {
        self.shared.notifier.fd()
    }

    pub fn stats(&self) -> Stats {
        let s = &self.shared;
        Stats {
            batches: s.batches.load(Relaxed),
            rows_committed: s.rows_committed.load(Relaxed),
            commit_errors: s.commit_errors.load(Relaxed),
            checkpoints: s.checkpoints.load(Relaxed),
        }
    }

    /// Refuses new rows, commits everything queued, then stops both threads.
    /// Blocks until they have stopped; a second call returns at once.
    pub fn close(&self) {
        self.shared.stop();
        let threads = std::mem::take(&mut *lock(&self.threads));
        for h in threads {
            let _ = h.join(); // a panicked thread has nothing left to hand back
        }
    }
}

impl Drop for Writer {
    /// Never blocks (it may run wherever the last owner lets go): the threads are
    /// told to stop after committing what is queued, and finish on their own.
    fn drop(&mut self) {
        self.shared.stop();
    }
}

impl Shared {
    fn stop(&self) {
        lock(&self.queue).stopping = true;
        self.wake_writer.notify_one();
        // The checkpointer stops once the writer is done (see write_loop).
    }

    fn settle(&self, first: u64, last: u64, oldest: Instant, result: Result<(), String>) {
        let lag_us = u64::try_from(oldest.elapsed().as_micros()).unwrap_or(u64::MAX);
        {
            let mut d = lock(&self.done);
            match result {
                Ok(()) if d.lags_us.len() < MAX_LAGS => d.lags_us.push(lag_us),
                Ok(()) => {}
                Err(message) => d.failures.push(Failure { first, last, message }),
            }
            d.settled = last;
            // Under the lock: whoever sees the new mark finds the notifier set
            // (or already cleared by the drain that took the mark).
            self.notifier.notify();
        }
    }
}

fn write_loop(shared: &Shared, mut conn: Connection) {
    let mut batch: Vec<Queued> = Vec::new();
    loop {
        let (first, stop) = {
            let mut q = lock(&shared.queue);
            while q.rows.is_empty() && !q.stopping {
                q.writer_idle = true;
                q = shared.wake_writer.wait(q).unwrap_or_else(PoisonError::into_inner);
            }
            q.writer_idle = false;
            if q.rows.len() <= MAX_BATCH {
                // The two vectors trade places, so neither side reallocates in
                // a steady state.
                std::mem::swap(&mut q.rows, &mut batch);
            } else {
                batch.extend(q.rows.drain(..MAX_BATCH));
            }
            let first = q.taken + 1;
            q.taken += batch.len() as u64;
            (first, q.stopping && q.rows.is_empty())
        };
        if let Some(oldest) = batch.first().map(|q| q.queued) {
            let n = batch.len() as u64;
            let result = commit(&mut conn, &batch);
            if result.is_ok() {
                shared.batches.fetch_add(1, Relaxed);
                shared.rows_committed.fetch_add(n, Relaxed);
                let mut c = lock(&shared.checkpoint);
                c.uncheckpointed += n;
                if c.uncheckpointed >= CHECKPOINT_ROWS {
                    shared.wake_checkpointer.notify_one();
                }
            } else {
                shared.commit_errors.fetch_add(1, Relaxed);
            }
            shared.settle(first, first + n - 1, oldest, result);
            batch.clear();
        }
        if stop {
            break;
        }
    }
    drop(conn);
    lock(&shared.checkpoint).stopping = true;
    shared.wake_checkpointer.notify_one();
}

fn commit(conn: &mut Connection, batch: &[Queued]) -> Result<(), String> {
    let result = (|| -> rusqlite::Result<()> {
        // Cached statements, BEGIN and COMMIT included: a batch parses no SQL.
        conn.prepare_cached("BEGIN IMMEDIATE")?.execute([])?;
        {
            let mut stmt = conn.prepare_cached(INSERT)?;
            for Queued { row: r, .. } in batch {
                stmt.execute(params![
                    r.request_id, r.ts, r.key_id, r.model, r.endpoint, r.requested_tier,
                    r.applied_tier, r.prompt_tokens, r.completion_tokens, cost_text(r.cost_femto),
                    // Whole micro-USD (checked to fit by push) and the rest.
                    (r.cost_femto / FEMTO_PER_MICRO) as i64,
                    (r.cost_femto % FEMTO_PER_MICRO) as i64,
                    r.status, r.partial, r.code, r.queue_ms, r.latency_ms, r.upstream,
                    r.fairness_id, r.tier_reason,
                ])?;
            }
        }
        conn.prepare_cached("COMMIT")?.execute([]).map(drop)
    })();
    result.map_err(|e| {
        if !conn.is_autocommit() {
            let _ = conn.execute_batch("ROLLBACK");
        }
        format!("ledger commit of {} rows failed: {e}", batch.len())
    })
}

/// Moves committed WAL frames into the database, off the writer's path.
/// PASSIVE: never waits for the writer or readers; does what it can now.
fn checkpoint_loop(shared: &Shared, conn: Connection) {
    loop {
        let (pending, stopping) = {
            let c = lock(&shared.checkpoint);
            let (mut c, _) = shared
                .wake_checkpointer
                .wait_timeout_while(c, CHECKPOINT_EVERY, |c| c.uncheckpointed < CHECKPOINT_ROWS && !c.stopping)
                .unwrap_or_else(PoisonError::into_inner);
            (std::mem::take(&mut c.uncheckpointed), c.stopping)
        };
        if pending > 0 {
            match conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
                Ok(()) => {
                    shared.checkpoints.fetch_add(1, Relaxed);
                }
                // Busy or I/O: the rows stay counted, so the next round retries.
                Err(_) => lock(&shared.checkpoint).uncheckpointed += pending,
            }
        }
        if stopping {
            return;
        }
    }
}

/// A readable-when-set flag for an event loop: an eventfd on Linux, a pipe
/// elsewhere. Non-blocking on both ends. Also the upstream client's
/// (crate::upstream): one wake-up per batch of answers.
pub(crate) struct Notifier {
    read_fd: i32,
    write_fd: i32,
}

impl Notifier {
    #[cfg(target_os = "linux")]
    pub(crate) fn new() -> Result<Notifier, CoreError> {
        // SAFETY: plain syscall; the result is checked.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(CoreError::Ledger(format!("eventfd: {}", std::io::Error::last_os_error())));
        }
        Ok(Notifier { read_fd: fd, write_fd: fd })
    }

    #[cfg(not(target_os = "linux"))]
    pub(crate) fn new() -> Result<Notifier, CoreError> {
        let mut fds = [0i32; 2];
        // SAFETY: `fds` has room for the two descriptors pipe writes.
        if unsafe { libc::pipe(fds.as_mut_ptr()) } != 0 {
            return Err(CoreError::Ledger(format!("pipe: {}", std::io::Error::last_os_error())));
        }
        for fd in fds {
            // SAFETY: fd was just returned by pipe and is owned here.
            unsafe {
                libc::fcntl(fd, libc::F_SETFL, libc::fcntl(fd, libc::F_GETFL) | libc::O_NONBLOCK);
                libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
            }
        }
        Ok(Notifier { read_fd: fds[0], write_fd: fds[1] })
    }

    pub(crate) fn fd(&self) -> i32 {
        self.read_fd
    }

    pub(crate) fn notify(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live local. A full pipe or a saturated
        // eventfd (EAGAIN) is already readable, which is all a notify means.
        unsafe { libc::write(self.write_fd, (&one as *const u64).cast(), 8) };
    }

    pub(crate) fn clear(&self) {
        let mut buf = [0u8; 64];
        // SAFETY: reads into a live local buffer of the length given. An
        // eventfd read resets its counter; a pipe is read until empty.
        while unsafe { libc::read(self.read_fd, buf.as_mut_ptr().cast(), buf.len()) } > 0 {
            if self.read_fd == self.write_fd {
                break;
            }
        }
    }
}

impl Drop for Notifier {
    fn drop(&mut self) {
        // SAFETY: both fds are owned by this notifier and closed once.
        unsafe {
            libc::close(self.read_fd);
            if self.write_fd != self.read_fd {
                libc::close(self.write_fd);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cost_text_is_exact_and_never_uses_exponents() {
        assert_eq!(cost_text(0), "0");
        assert_eq!(cost_text(67_500_000_000), "0.0000675");
        assert_eq!(cost_text(1), "0.000000000000001");
        assert_eq!(cost_text(100_000_000), "0.0000001");
        assert_eq!(cost_text(1_500_000_000_000_000), "1.5");
        assert_eq!(cost_text(1_234_567_890_123_400_000), "1234.5678901234");
        assert_eq!(cost_text(99 * FEMTO_PER_USD), "99");
    }

    #[test]
    fn durability_parses_its_two_names_only() {
        assert_eq!(Durability::parse("process"), Ok(Durability::Process));
        assert_eq!(Durability::parse("power"), Ok(Durability::Power));
        assert!(Durability::parse("disk").is_err());
    }
}
