//! A request's access line as tierq's JSON log format writes it (tierq.logs:
//! `JsonFormatter` over the fields `_record` gives a line), byte for byte, so
//! the access writer does not build a `logging.LogRecord` and a dict per line.
//!
//! Only lines the Python formatter would leave as they are take this path: a
//! line with any non-ASCII text (Python lowercases Unicode before looking for
//! secrets), any string that could hold a credential (the redaction's
//! substrings), a duration of 11.6 days or more or a time outside years
//! 1970 to 9999 is `None`, and Python formats that one.

use std::fmt::Write;

/// The fields a request's outcome adds to its line (the ledger row's).
#[derive(Debug, Clone, Copy)]
pub struct RowFields<'a> {
    pub model: &'a str,
    pub key_id: &'a str,
    pub requested_tier: Option<&'a str>,
    pub tier: &'a str,
    pub outcome: &'a str,
    pub code: Option<&'a str>,
    pub queue_ms: f64,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    /// The cost as the ledger's Decimal formats it (`format(cost, "f")`).
    pub cost: &'a str,
    pub fairness_id: Option<&'a str>,
    pub tier_reason: Option<&'a str>,
}

/// One captured access line (tierq.logs `_Captured`).
#[derive(Debug, Clone, Copy)]
pub struct Line<'a> {
    /// When the request ended, epoch seconds.
    pub ts: f64,
    pub request_id: &'a str,
    pub echo: &'a str,
    pub method: &'a str,
    pub path: &'a str,
    pub status: i64,
    pub duration_s: f64,
    pub remote: Option<&'a str>,
    pub row: Option<RowFields<'a>>,
    /// The shadow decisions, comma-separated; None when there were none.
    pub shadow: Option<&'a str>,
    pub config: Option<&'a str>,
}

/// What tierq.logs.redact looks for, in lower case (its `_SUSPECT`, with
/// `api[_-]?key` spelled out), by first letter: a string containing none of
/// them is left as it is.
fn suspects(first: u8) -> &'static [&'static [u8]] {
    match first {
        b't' => &[b"tq-", b"token"],
        b's' => &[b"sk-", b"secret"],
        b':' => &[b"://"],
        b'b' => &[b"bearer", b"basic"],
        b'a' => &[b"api_key", b"api-key", b"apikey"],
        b'p' => &[b"password"],
        _ => &[],
    }
}

/// Milliseconds below this are rounded and printed here (11.6 days).
const ROUNDED_BELOW: f64 = 1e9;
/// 10000-01-01T00:00:00Z: past it Python's datetime refuses the time.
const YEAR_10000: f64 = 253_402_300_800.0;

fn plain(s: &str) -> bool {
    let b = s.as_bytes();
    // Any byte over 0x7f is non-ASCII text (Python lowercases Unicode: its path).
    b.iter().enumerate().all(|(i, &c)| {
        c < 0x80
            && !suspects(c.to_ascii_lowercase()).iter().any(|p| {
                b.len() - i >= p.len() && b[i..i + p.len()].eq_ignore_ascii_case(p)
            })
    })
}

/// `s` as a JSON string (orjson's escapes for ASCII text).
fn string(out: &mut String, s: &str) {
    out.push('"');
    if !s.bytes().any(|c| c < 0x20 || c == b'"' || c == b'\\') {
        out.push_str(s); // nearly every field: nothing to escape
        out.push('"');
        return;
    }
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

fn opt_string(out: &mut String, s: Option<&str>) {
    match s {
        Some(s) => string(out, s),
        None => out.push_str("null"),
    }
}

/// Python's `round(x, 3)` rendered as its repr (what orjson writes for it):
/// None outside [0, 1e9) or for -0.0.
fn millis3(out: &mut String, x: f64) -> Option<()> {
    // Below 1e9 doubles are far closer together than 0.001, so the double
    // nearest k / 1000 prints back as k / 1000's own digits (repr is shortest).
    if !x.is_finite() || x.is_sign_negative() || x >= ROUNDED_BELOW {
        return None;
    }
    let m = x * 1000.0;
    let frac = m - m.floor();
    let k = if (frac - 0.5).abs() > 1e-6 {
        // Far from a tie: x * 1000's own rounding error cannot change the side.
        m.round() as u64
    } else {
        // Python rounds the exact binary value, ties to even: so does `{:.3}`.
        let digits = format!("{x:.3}");
        let (whole, frac) = digits.split_once('.')?;
        whole.parse::<u64>().ok()? * 1000 + frac.parse::<u64>().ok()?
    };
    let (whole, mut frac, mut width) = (k / 1000, k % 1000, 3);
    while frac % 10 == 0 && width > 1 {
        frac /= 10;
        width -= 1;
    }
    let _ = write!(out, "{whole}.{frac:0width$}");
    Some(())
}

/// `t` (epoch seconds) as tierq.logs `_iso_ms` writes it: 2026-11-22T02:31:01.123Z.
fn iso_ms(out: &mut String, t: f64) -> Option<()> {
    if !(0.0..YEAR_10000).contains(&t) {
        return None;
    }
    let second = t.trunc();
    let ms = (((t - second) * 1000.0) as i64).min(999);
    let secs = second as i64;
    out.push('"');
    // The second is formatted once per second (per thread), as Python does.
    SECOND.with(|cached| {
        let mut cached = cached.borrow_mut();
        if cached.0 != secs || cached.1.is_empty() {
            let (days, rest) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
            let (y, m, d) = civil(days);
            let text = &mut cached.1;
            text.clear();
            for (n, w, sep) in [(y, 4, '-'), (m, 2, '-'), (d, 2, 'T'), (rest / 3600, 2, ':'),
                                (rest / 60 % 60, 2, ':'), (rest % 60, 2, '.')] {
                digits(text, n, w);
                text.push(sep);
            }
            cached.0 = secs;
        }
        out.push_str(&cached.1);
    });
    digits(out, ms, 3);
    out.push_str("Z\"");
    Some(())
}

thread_local! {
    /// The last second `iso_ms` formatted, and its text up to the milliseconds.
    static SECOND: std::cell::RefCell<(i64, String)> = const { std::cell::RefCell::new((0, String::new())) };
}

/// `n` (>= 0) in `width` digits, zero-padded.
fn digits(out: &mut String, n: i64, width: u32) {
    let mut p = 10_i64.pow(width - 1);
    while p > 0 {
        out.push(char::from(b'0' + (n / p % 10) as u8));
        p /= 10;
    }
}

/// The proleptic Gregorian date of `days` since 1970-01-01 (H. Hinnant's
/// `civil_from_days`).
fn civil(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

fn key(out: &mut String, name: &str) {
    out.push_str(",\"");
    out.push_str(name);
    out.push_str("\":");
}

/// The line's JSON text, without its newline; None when Python must format it.
pub fn json_line(l: &Line<'_>) -> Option<String> {
    let strings = [Some(l.request_id), Some(l.echo), Some(l.method), Some(l.path), l.remote,
                   l.shadow, l.config];
    if !strings.into_iter().flatten().all(plain) {
        return None;
    }
    if let Some(r) = &l.row {
        let strings = [Some(r.model), Some(r.key_id), r.requested_tier, Some(r.tier),
                       Some(r.outcome), r.code, Some(r.cost), r.fairness_id, r.tier_reason];
        if !strings.into_iter().flatten().all(plain) {
            return None;
        }
    }
    let mut out = String::with_capacity(512);
    out.push_str("{\"ts\":");
    iso_ms(&mut out, l.ts)?;
    out.push_str(",\"level\":\"info\",\"logger\":\"tierq.access\",\"msg\":\"request\"");
    key(&mut out, "request_id");
    string(&mut out, l.request_id);
    key(&mut out, "method");
    string(&mut out, l.method);
    key(&mut out, "path");
    string(&mut out, l.path);
    key(&mut out, "status");
    let _ = write!(out, "{}", l.status);
    key(&mut out, "duration_ms");
    millis3(&mut out, l.duration_s * 1000.0)?;
    key(&mut out, "remote");
    opt_string(&mut out, l.remote);
    if l.echo != l.request_id {
        key(&mut out, "client_request_id");
        string(&mut out, l.echo);
    }
    if let Some(r) = &l.row {
        key(&mut out, "model");
        string(&mut out, r.model);
        key(&mut out, "key_id");
        string(&mut out, r.key_id);
        key(&mut out, "requested_tier");
        opt_string(&mut out, r.requested_tier);
        key(&mut out, "tier");
        string(&mut out, r.tier);
        key(&mut out, "outcome");
        string(&mut out, r.outcome);
        key(&mut out, "code");
        opt_string(&mut out, r.code);
        key(&mut out, "queue_ms");
        millis3(&mut out, r.queue_ms)?;
        key(&mut out, "prompt_tokens");
        let _ = write!(out, "{}", r.prompt_tokens);
        key(&mut out, "completion_tokens");
        let _ = write!(out, "{}", r.completion_tokens);
        key(&mut out, "cost");
        string(&mut out, r.cost);
        if let Some(f) = r.fairness_id {
            key(&mut out, "fairness_id");
            string(&mut out, f);
        }
        if let Some(t) = r.tier_reason {
            key(&mut out, "tier_reason");
            string(&mut out, t);
        }
    }
    if let Some(s) = l.shadow {
        key(&mut out, "shadow");
        string(&mut out, s);
    }
    if let Some(c) = l.config.filter(|c| !c.is_empty()) {
        key(&mut out, "config");
        string(&mut out, &c[..c.len().min(12)]);
    }
    out.push('}');
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line<'a>(row: Option<RowFields<'a>>) -> Line<'a> {
        Line { ts: 1_764_988_261.123_9, request_id: "req_1", echo: "req_1", method: "POST",
               path: "/v1/chat/completions", status: 200, duration_s: 0.001_234_5,
               remote: Some("127.0.0.1"), row, shadow: None, config: None }
    }

    #[test]
    fn a_plain_line_is_the_json_formatters() {
        assert_eq!(json_line(&line(None)).unwrap(),
                   "{\"ts\":\"2025-12-06T02:31:01.123Z\",\"level\":\"info\",\"logger\":\"tierq.access\",\
                    \"msg\":\"request\",\"request_id\":\"req_1\",\"method\":\"POST\",\
                    \"path\":\"/v1/chat/completions\",\"status\":200,\"duration_ms\":1.234,\
                    \"remote\":\"127.0.0.1\"}");
    }

    #[test]
    fn a_string_that_could_hold_a_secret_is_left_to_python() {
        let mut l = line(None);
        l.path = "/v1/x?Token=abc";
        assert!(json_line(&l).is_none());
        l.path = "/v1/é";
        assert!(json_line(&l).is_none());
        l.path = "/v1/models";
        l.duration_s = f64::NAN;
        assert!(json_line(&l).is_none());
    }

    #[test]
    fn whole_and_tied_milliseconds_read_as_python_rounds_them() {
        let mut s = String::new();
        millis3(&mut s, 0.0).unwrap();
        s.push(' ');
        millis3(&mut s, 2.0).unwrap();
        s.push(' ');
        millis3(&mut s, 0.0005).unwrap(); // the double is just above the tie: up, as Python
        s.push(' ');
        millis3(&mut s, 0.125).unwrap();
        assert_eq!(s, "0.0 2.0 0.001 0.125");
    }

    #[test]
    fn civil_dates_match_the_calendar() {
        assert_eq!(civil(0), (1970, 1, 1));
        assert_eq!(civil(11_016), (2000, 2, 29));
        assert_eq!(civil(2_932_896), (9999, 12, 31));
    }
}
