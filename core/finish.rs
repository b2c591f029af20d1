//! A request's end in one call (issue #21 item 2): its ledger row queued, its
//! key's per-minute buckets settled and its access line formatted, from the
//! same few integers and strings. Every decision (the tier, the price, the
//! outcome, what the key is given back) is made by the caller (tierq.outcome);
//! this only checks the row's names against the sets tierq.ledger gave it and
//! applies what it was told.

use crate::access::{self, Line, RowFields};
use crate::bucket::{BucketParams, TokenBucket};
use crate::error::CoreError;
use crate::keytable::KeyTable;
use crate::ledger::{self, Row, Writer};

/// The names a row may carry, as tierq.ledger defines them (its STATUSES,
/// APPLIED_TIERS and TIER_REASONS): given once, checked per row.
#[derive(Debug, Clone)]
pub struct Names {
    pub statuses: Vec<String>,
    pub tiers: Vec<String>,
    pub reasons: Vec<String>,
}

impl Names {
    /// The checks LedgerRow.__post_init__ makes of a row's meaning (its types
    /// are the binding's), so a bad row fails its own request, not a batch.
    pub fn check(&self, row: &Row) -> Result<(), CoreError> {
        if row.request_id.is_empty() {
            return Err(CoreError::arg("request_id", "must be non-empty"));
        }
        if !self.statuses.iter().any(|s| *s == row.status) {
            return Err(CoreError::arg("status", format!("{:?} is not a ledger status", row.status)));
        }
        if !self.tiers.iter().any(|t| *t == row.applied_tier) {
            return Err(CoreError::arg("applied_tier", format!("{:?} is not a tier", row.applied_tier)));
        }
        if let Some(r) = &row.tier_reason {
            if !self.reasons.iter().any(|x| x == r) {
                return Err(CoreError::arg("tier_reason", format!("{r:?} is not a downgrade reason")));
            }
        }
        if row.prompt_tokens < 0 || row.completion_tokens < 0 {
            return Err(CoreError::arg("tokens", "token counts must be >= 0"));
        }
        Ok(())
    }
}

/// One of a key's buckets: this process's own or a slot of the shared table.
pub enum Bucket<'a> {
    Local(&'a TokenBucket),
    Shared { table: &'a KeyTable, entry: usize, kind: usize, params: &'a BucketParams },
}

impl Bucket<'_> {
    fn adjust(&self, delta: i64) {
        match self {
            Bucket::Local(b) => b.adjust(delta),
            Bucket::Shared { table, entry, kind, params } => table.adjust(*entry, *kind, delta, params),
        }
    }
}

/// What the key's limits get back or are charged more (tierq.keys.KeyLimiter's
/// `settlement`): a delta per bucket, 0 for none.
pub struct Settlement<'a> {
    pub rpm: Option<(Bucket<'a>, i64)>,
    pub tpm: Option<(Bucket<'a>, i64)>,
}

/// The access line's own fields (the row's come from the row).
pub struct Access<'a> {
    pub ts: f64,
    pub echo: &'a str,
    pub method: &'a str,
    pub path: &'a str,
    pub status: i64,
    pub duration_s: f64,
    pub remote: Option<&'a str>,
    pub shadow: Option<&'a str>,
    pub config: Option<&'a str>,
}

/// What `finish` did: the row's sequence number, whether the writer's wake-up
/// is owed (`Writer::push`), and the access line (None: none asked, or one
/// Python formats, see core/access.rs).
#[derive(Debug)]
pub struct Finished {
    pub seq: u64,
    pub wake: bool,
    pub line: Option<String>,
}

/// The request's end: the row checked, its access line formatted from it, the
/// key settled, the row queued. Nothing is applied when the row is refused.
pub fn finish(writer: &Writer, names: &Names, row: Row, settle: Settlement<'_>,
              line: Option<Access<'_>>) -> Result<Finished, CoreError> {
    names.check(&row)?;
    let line = line.and_then(|a| {
        let cost = ledger::cost_text(row.cost_femto);
        access::json_line(&Line {
            ts: a.ts, request_id: &row.request_id, echo: a.echo, method: a.method, path: a.path,
            status: a.status, duration_s: a.duration_s, remote: a.remote,
            row: Some(RowFields {
                model: &row.model, key_id: &row.key_id, requested_tier: row.requested_tier.as_deref(),
                tier: &row.applied_tier, outcome: &row.status, code: row.code.as_deref(),
                queue_ms: row.queue_ms, prompt_tokens: row.prompt_tokens,
                completion_tokens: row.completion_tokens, cost: &cost,
                fairness_id: row.fairness_id.as_deref(), tier_reason: row.tier_reason.as_deref(),
            }),
            shadow: a.shadow, config: a.config,
        })
    });
    let (seq, wake) = writer.push(row)?;
    for (bucket, delta) in [settle.rpm, settle.tpm].into_iter().flatten() {
        if delta != 0 {
            bucket.adjust(delta);
        }
    }
    Ok(Finished { seq, wake, line })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::Clock;

    fn names() -> Names {
        let v = |s: &[&str]| s.iter().map(|x| x.to_string()).collect();
        Names { statuses: v(&["served", "shed", "failed", "cancelled"]),
                tiers: v(&["priority", "default", "flex"]), reasons: v(&["ramp", "budget"]) }
    }

    fn row(id: &str, status: &str) -> Row {
        Row { request_id: id.into(), ts: 1_764_988_261.0, key_id: "k1".into(), model: "m".into(),
              endpoint: "/v1/chat/completions".into(), requested_tier: Some("priority".into()),
              applied_tier: "priority".into(), prompt_tokens: 3, completion_tokens: 4,
              cost_femto: 67_500_000_000, status: status.into(), partial: false, code: None,
              queue_ms: 0.25, latency_ms: 1.5, upstream: Some("u".into()), fairness_id: None,
              tier_reason: None }
    }

    fn access() -> Access<'static> {
        Access { ts: 1_764_988_261.123_9, echo: "req_1", method: "POST", path: "/v1/chat/completions",
                 status: 200, duration_s: 0.0015, remote: Some("127.0.0.1"), shadow: None, config: None }
    }

    #[test]
    fn one_call_queues_the_row_settles_the_key_and_formats_the_line() {
        let dir = std::env::temp_dir().join(format!("tierq-finish-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let writer = Writer::open(&dir.join("l.db"), ledger::Durability::Process).unwrap();
        let tpm = TokenBucket::new(1.0, 100.0, 0.0, Clock::Manual(std::sync::Arc::new(crate::ManualClock::new(0)))).unwrap();
        tpm.adjust(50);
        let before = tpm.available();
        let done = finish(&writer, &names(), row("req_1", "served"),
                          Settlement { rpm: None, tpm: Some((Bucket::Local(&tpm), -20)) },
                          Some(access())).unwrap();
        assert_eq!(done.seq, 1);
        assert_eq!(tpm.available(), before + 20.0);
        let line = done.line.unwrap();
        assert!(line.contains("\"outcome\":\"served\",\"code\":null,\"queue_ms\":0.25,\"prompt_tokens\":3,\
                               \"completion_tokens\":4,\"cost\":\"0.0000675\""), "{line}");
        writer.close();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_bad_row_changes_nothing() {
        let dir = std::env::temp_dir().join(format!("tierq-finish-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let writer = Writer::open(&dir.join("l.db"), ledger::Durability::Process).unwrap();
        let tpm = TokenBucket::new(1.0, 100.0, 0.0, Clock::Manual(std::sync::Arc::new(crate::ManualClock::new(0)))).unwrap();
        let before = tpm.available();
        let mut bad = row("req_2", "lost");
        assert!(finish(&writer, &names(), bad.clone(),
                       Settlement { rpm: None, tpm: Some((Bucket::Local(&tpm), -20)) }, None).is_err());
        bad.status = "served".into();
        bad.applied_tier = "gold".into();
        assert!(finish(&writer, &names(), bad, Settlement { rpm: None, tpm: None }, None).is_err());
        assert_eq!(tpm.available(), before);
        assert_eq!(writer.last_pushed(), 0);
        writer.close();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
