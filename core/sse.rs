//! The stream rewrite: raw reads of an OpenAI-compatible upstream's SSE body in,
//! the bytes the client gets out, in one call per read and without building
//! any JSON tree.
//!
//! Events are split as the SSE format says (lines end in LF or CRLF, a blank
//! line ends an event, the values of one event's `data:` lines are joined with
//! LF; `event:`, `id:`, `retry:` and comments are dropped). Each event's
//! payload is checked in one pass to be a JSON object exactly as strict as
//! orjson (the parser Python would use), and the applied tier is spliced into
//! its top level: the value of every top-level `"service_tier"` member is
//! replaced, or `"service_tier":"<tier>"` goes first when there is none.
//! Members further down (a `service_tier` inside `choices`, say) are never
//! touched. The same pass counts the tokens the event delivers (one per choice
//! whose delta has content, tool calls or reasoning, or whose `text` is set).
//!
//! Some events are not rewritten here but handed back, in stream order, to
//! the caller (Python), which parses them: anything that is not a JSON object
//! (the stream is broken), an object with a top-level `error` (the upstream's
//! own error event), a non-null `usage` (the usage chunk, which is priced), a
//! top-level `usage`, `error` or `choices` given twice, or anything this scan
//! will not decide (nesting deeper than [`MAX_DEPTH`]). A `"usage": null`
//! member is dropped unless the client asked for usage.

/// Payload of the stream's last event.
pub const DONE: &[u8] = b"[DONE]";
/// Nesting this deep is handed back rather than judged here.
pub const MAX_DEPTH: u32 = 128;

/// Where one read left the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// More events may come.
    Open = 0,
    /// `[DONE]` arrived; nothing after it in the read was looked at.
    Done = 1,
    /// One event (its lines so far) outgrew the bound: the stream is broken,
    /// and the read's output is empty.
    TooLarge = 2,
}

/// An event handed back: it belongs in `out` at byte `at`, after
/// `tokens_before` of the read's tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handed {
    pub at: usize,
    pub tokens_before: u64,
    pub payload: Vec<u8>,
}

/// What one read produced.
#[derive(Debug, Default)]
pub struct Batch {
    /// The client's bytes: every rewritten event, `data: <json>\n\n` each.
    pub out: Vec<u8>,
    /// Tokens delivered by the events in `out`.
    pub tokens: u64,
    pub state: Option<State>,
    pub handed: Vec<Handed>,
}

impl Batch {
    pub fn state(&self) -> State {
        self.state.unwrap_or(State::Open)
    }
}

/// One stream's rewriter: split state across reads plus the rewrite settings.
#[derive(Debug)]
pub struct Rewriter {
    tier_value: Vec<u8>,   // the tier as a JSON string
    keep_usage: bool,      // the client asked for usage: keep `"usage": null`
    max_event_bytes: usize,
    rest: Vec<u8>,         // an incomplete last line
    data: Vec<u8>,         // the event being read: its data values joined with LF
    has_data: bool,        // the event has a data line (possibly empty)
    pending: usize,        // bytes of data values in `data` (LFs not counted)
    members: Vec<Member>,  // scratch: the top-level members of the event being rewritten
    done: bool,
    batch: Batch,
}

#[derive(Debug, Clone, Copy)]
struct Member {
    key: (usize, usize),   // the key with its quotes
    value: (usize, usize), // the value
    role: Key,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Key {
    ServiceTier,
    Usage,
    Error,
    Choices,
    Other,
}

impl Rewriter {
    /// `tier` is the applied tier; `keep_usage` whether the client asked for
    /// `stream_options.include_usage`; `max_event_bytes` the most one event
    /// (its lines so far) may hold before the stream counts as broken.
    pub fn new(tier: &str, keep_usage: bool, max_event_bytes: usize) -> Rewriter {
        Rewriter {
            tier_value: json_string(tier),
            keep_usage,
            max_event_bytes,
            rest: Vec::new(),
            data: Vec::new(),
            has_data: false,
            pending: 0,
            members: Vec::new(),
            done: false,
            batch: Batch::default(),
        }
    }

    /// Rewrites what `chunk` (the next read of the body) completes.
    pub fn feed(&mut self, chunk: &[u8]) -> &Batch {
        self.begin();
        let mut start = 0;
        if !self.rest.is_empty() {
            match find(chunk, b'\n') {
                None => {
                    self.rest.extend_from_slice(chunk);
                    start = chunk.len();
                }
                Some(i) => {
                    let mut line = std::mem::take(&mut self.rest);
                    line.extend_from_slice(&chunk[..i]);
                    self.line(&line);
                    line.clear();
                    self.rest = line; // keeps its allocation
                    start = i + 1;
                }
            }
        }
        while !self.done && start < chunk.len() {
            match find(&chunk[start..], b'\n') {
                Some(i) => {
                    self.line(&chunk[start..start + i]);
                    start += i + 1;
                }
                None => {
                    self.rest.extend_from_slice(&chunk[start..]);
                    break;
                }
            }
        }
        self.finish();
        &self.batch
    }

    /// At the end of the body: a last event that never got its blank line.
    pub fn close(&mut self) -> &Batch {
        self.begin();
        if !self.done {
            let rest = std::mem::take(&mut self.rest);
            let mut line = &rest[..];
            while let [head @ .., b'\r'] = line {
                line = head;
            }
            if line.starts_with(b"data:") {
                self.data_line(line);
            }
            if self.has_data {
                self.line(b"");
            }
        }
        self.finish();
        &self.batch
    }

    fn begin(&mut self) {
        let b = &mut self.batch;
        b.out.clear();
        b.tokens = 0;
        b.state = None;
        b.handed.clear();
    }

    fn finish(&mut self) {
        if self.done {
            self.batch.state = Some(State::Done);
        } else if self.pending + self.rest.len() > self.max_event_bytes {
            self.begin();
            self.batch.state = Some(State::TooLarge);
        }
    }

    fn line(&mut self, line: &[u8]) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.starts_with(b"data:") {
            self.data_line(line);
        } else if line.is_empty() && self.has_data {
            let data = std::mem::take(&mut self.data);
            self.event(&data);
            self.data = data;
            self.data.clear();
            self.has_data = false;
            self.pending = 0;
        }
    }

    fn data_line(&mut self, line: &[u8]) {
        let value = if line.get(5) == Some(&b' ') { &line[6..] } else { &line[5..] };
        if self.has_data {
            self.data.push(b'\n');
        }
        self.data.extend_from_slice(value);
        self.pending += value.len();
        self.has_data = true;
    }

    fn event(&mut self, payload: &[u8]) {
        if self.done {
            return;
        }
        if payload == DONE {
            self.done = true;
            return;
        }
        match self.plan(payload) {
            Some((tokens, has_tier, newlines)) => {
                self.emit(payload, has_tier, newlines);
                self.batch.tokens += tokens;
            }
            None => self.batch.handed.push(Handed {
                at: self.batch.out.len(),
                tokens_before: self.batch.tokens,
                payload: payload.to_vec(),
            }),
        }
    }

    /// Scans `payload`; fills `members`. `Some((tokens, has a service_tier,
    /// has CR or LF))` when this module rewrites it, `None` to hand it back.
    fn plan(&mut self, payload: &[u8]) -> Option<(u64, bool, bool)> {
        if std::str::from_utf8(payload).is_err() {
            return None;
        }
        self.members.clear();
        let mut tokens = 0;
        let mut s = Scan { b: payload, i: 0, newlines: false };
        s.ws();
        if s.peek() != Some(b'{') {
            return None;
        }
        s.i += 1;
        s.ws();
        if s.peek() == Some(b'}') {
            s.i += 1;
        } else {
            loop {
                let k0 = s.i;
                let role = match s.key(Role::Top).ok()? {
                    Some(0) => Key::ServiceTier,
                    Some(1) => Key::Usage,
                    Some(2) => Key::Error,
                    Some(3) => Key::Choices,
                    _ => Key::Other,
                };
                let k1 = s.i;
                s.ws();
                s.expect(b':').ok()?;
                s.ws();
                let v0 = s.i;
                let role_of_value = if role == Key::Choices { Role::Choices } else { Role::Plain };
                let info = s.value(1, role_of_value).ok()?;
                if role == Key::Choices {
                    tokens = info.count;
                }
                self.members.push(Member { key: (k0, k1), value: (v0, s.i), role });
                s.ws();
                match s.next() {
                    Some(b',') => s.ws(),
                    Some(b'}') => break,
                    _ => return None,
                }
            }
        }
        s.ws();
        if s.i != payload.len() {
            return None;
        }
        let (mut usage, mut error, mut choices, mut has_tier) = (0, 0, 0, false);
        for m in &self.members {
            match m.role {
                Key::Usage => {
                    usage += 1;
                    if &payload[m.value.0..m.value.1] != b"null" {
                        return None;
                    }
                }
                Key::Error => error += 1,
                Key::Choices => choices += 1,
                Key::ServiceTier => has_tier = true,
                Key::Other => {}
            }
        }
        if error > 0 || usage > 1 || choices > 1 {
            return None;
        }
        Some((tokens, has_tier, s.newlines))
    }

    fn emit(&mut self, payload: &[u8], has_tier: bool, newlines: bool) {
        let out = &mut self.batch.out;
        out.extend_from_slice(b"data: {");
        let mut first = true;
        if !has_tier {
            out.extend_from_slice(b"\"service_tier\":");
            out.extend_from_slice(&self.tier_value);
            first = false;
        }
        for m in &self.members {
            if m.role == Key::Usage && !self.keep_usage {
                continue; // `"usage": null`, not asked for
            }
            if !first {
                out.push(b',');
            }
            first = false;
            if m.role == Key::ServiceTier {
                copy(out, &payload[m.key.0..m.key.1], newlines);
                out.push(b':');
                out.extend_from_slice(&self.tier_value);
            } else {
                copy(out, &payload[m.key.0..m.value.1], newlines);
            }
        }
        out.extend_from_slice(b"}\n\n");
    }
}

/// Appends `src`; without its CRs and LFs when it has any. In valid JSON those
/// are whitespace between tokens (a string holds them only escaped), and a
/// raw one would end the client's `data:` line.
fn copy(out: &mut Vec<u8>, src: &[u8], newlines: bool) {
    if newlines {
        out.extend(src.iter().copied().filter(|&c| c != b'\n' && c != b'\r'));
    } else {
        out.extend_from_slice(src);
    }
}

fn find(b: &[u8], c: u8) -> Option<usize> {
    let mut i = 0;
    while let Some(w) = word(b, i) {
        if has_byte(w, c) {
            break;
        }
        i += 8;
    }
    b[i..].iter().position(|&x| x == c).map(|n| i + n)
}

/// How many bytes at the start of `b` a string holds as they are: none of
/// them a quote, a backslash or a control character. Eight at a time.
fn plain_run(b: &[u8]) -> usize {
    let mut i = 0;
    while let Some(w) = word(b, i) {
        if has_byte(w, b'"') || has_byte(w, b'\\') || has_below(w, 0x20) {
            break;
        }
        i += 8;
    }
    i + b[i..].iter().position(|&c| c == b'"' || c == b'\\' || c < 0x20).unwrap_or(b.len() - i)
}

const LOW: u64 = 0x0101_0101_0101_0101;
const HIGH: u64 = 0x8080_8080_8080_8080;

fn word(b: &[u8], i: usize) -> Option<u64> {
    b.get(i..i + 8).map(|w| u64::from_le_bytes(w.try_into().expect("8 bytes")))
}

/// Some byte of `w` is below `n` (n <= 128).
fn has_below(w: u64, n: u8) -> bool {
    w.wrapping_sub(LOW * n as u64) & !w & HIGH != 0
}

/// Some byte of `w` is `c`.
fn has_byte(w: u64, c: u8) -> bool {
    has_below(w ^ (LOW * c as u64), 1)
}

/// `s` as a JSON string, quotes included.
pub fn json_string(s: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len() + 2);
    out.push(b'"');
    for &c in s.as_bytes() {
        match c {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            0..=0x1f => out.extend_from_slice(format!("\\u{c:04x}").as_bytes()),
            _ => out.push(c),
        }
    }
    out.push(b'"');
    out
}

/// The keys that matter in an object of `role`: its index among them.
fn named(role: Role, key: &[u8]) -> Option<usize> {
    match (role, key) {
        (Role::Top, b"service_tier") | (Role::Choice, b"delta") | (Role::Delta, b"content") => Some(0),
        (Role::Top, b"usage") | (Role::Choice, b"text") | (Role::Delta, b"tool_calls") => Some(1),
        (Role::Top, b"error") | (Role::Delta, b"reasoning_content") => Some(2),
        (Role::Top, b"choices") => Some(3),
        _ => None,
    }
}

/// What a value is to the token count (and the event's top-level object).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Top,
    Plain,
    Choices, // the top-level `choices`: count its elements that deliver
    Choice,  // one element of it
    Delta,   // a choice's `delta`
}

#[derive(Debug, Clone, Copy, Default)]
struct Info {
    truthy: bool, // Python's bool() of the parsed value
    object: bool,
    count: u64,   // Choices: elements that deliver; Choice/Delta objects: 1 if it delivers
}

struct Bad;

/// A cursor over one payload that checks JSON as strictly as orjson does
/// (UTF-8 is checked before, over the whole payload, by the caller).
struct Scan<'a> {
    b: &'a [u8],
    i: usize,
    newlines: bool, // a CR or LF was skipped as whitespace
}

impl Scan<'_> {
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    fn next(&mut self) -> Option<u8> {
        let c = self.peek();
        self.i += 1;
        c
    }

    fn ws(&mut self) {
        while let Some(c) = self.peek() {
            match c {
                b' ' | b'\t' => {}
                b'\n' | b'\r' => self.newlines = true,
                _ => return,
            }
            self.i += 1;
        }
    }

    fn expect(&mut self, c: u8) -> Result<(), Bad> {
        if self.next() == Some(c) {
            Ok(())
        } else {
            Err(Bad)
        }
    }

    fn lit(&mut self, word: &[u8]) -> Result<(), Bad> {
        if self.b[self.i..].starts_with(word) {
            self.i += word.len();
            Ok(())
        } else {
            Err(Bad)
        }
    }

    /// A string; the cursor is on its opening quote. Returns whether it held
    /// an escape and whether it is non-empty.
    fn string(&mut self) -> Result<(bool, bool), Bad> {
        self.expect(b'"')?;
        let start = self.i;
        let mut escaped = false;
        loop {
            self.i += plain_run(&self.b[self.i..]);
            let c = self.next().ok_or(Bad)?;
            match c {
                b'"' => return Ok((escaped, self.i - 1 > start)),
                b'\\' => {
                    escaped = true;
                    match self.next().ok_or(Bad)? {
                        b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => {}
                        b'u' => {
                            let u = self.hex4()?;
                            if (0xDC00..0xE000).contains(&u) {
                                return Err(Bad); // a low surrogate first
                            }
                            if (0xD800..0xDC00).contains(&u) {
                                self.lit(b"\\u")?;
                                if !(0xDC00..0xE000).contains(&self.hex4()?) {
                                    return Err(Bad);
                                }
                            }
                        }
                        _ => return Err(Bad),
                    }
                }
                0..=0x1f => return Err(Bad),
                _ => {}
            }
        }
    }

    fn hex4(&mut self) -> Result<u32, Bad> {
        let h = self.b.get(self.i..self.i + 4).ok_or(Bad)?;
        let mut u = 0;
        for &c in h {
            u = u * 16 + (c as char).to_digit(16).ok_or(Bad)?;
        }
        self.i += 4;
        Ok(u)
    }

    /// An object key; `Some(n)` for the n-th of the keys that matter in an
    /// object of this role (see `named`), once unescaped.
    fn key(&mut self, role: Role) -> Result<Option<usize>, Bad> {
        let k0 = self.i;
        let (escaped, _) = self.string()?;
        if role == Role::Plain || role == Role::Choices {
            return Ok(None);
        }
        let raw = &self.b[k0 + 1..self.i - 1];
        if !escaped {
            return Ok(named(role, raw));
        }
        Ok(named(role, &unescape(raw)))
    }

    /// A number; returns whether it is non-zero. A number orjson reads as an
    /// infinite double is an error there, so it is one here.
    fn number(&mut self) -> Result<bool, Bad> {
        let start = self.i;
        let mut nonzero = false;
        if self.peek() == Some(b'-') {
            self.i += 1;
        }
        match self.next() {
            Some(b'0') => {}
            Some(b'1'..=b'9') => {
                nonzero = true;
                self.digits();
            }
            _ => return Err(Bad),
        }
        let mut exponent = false;
        if self.peek() == Some(b'.') {
            self.i += 1;
            let d0 = self.i;
            while let Some(c @ b'0'..=b'9') = self.peek() {
                nonzero |= c != b'0';
                self.i += 1;
            }
            if self.i == d0 {
                return Err(Bad);
            }
        }
        if let Some(b'e' | b'E') = self.peek() {
            self.i += 1;
            exponent = true;
            if let Some(b'+' | b'-') = self.peek() {
                self.i += 1;
            }
            let d0 = self.i;
            self.digits();
            if self.i == d0 {
                return Err(Bad);
            }
        }
        let token = &self.b[start..self.i];
        if exponent || token.len() > 15 {
            // Only these can overflow a double (or underflow to zero).
            let text = std::str::from_utf8(token).map_err(|_| Bad)?;
            let v: f64 = text.parse().map_err(|_| Bad)?;
            if !v.is_finite() {
                return Err(Bad);
            }
            nonzero = v != 0.0;
        }
        Ok(nonzero)
    }

    fn digits(&mut self) {
        while let Some(b'0'..=b'9') = self.peek() {
            self.i += 1;
        }
    }

    /// One value at nesting `depth`; the cursor is on its first byte.
    fn value(&mut self, depth: u32, role: Role) -> Result<Info, Bad> {
        if depth > MAX_DEPTH {
            return Err(Bad);
        }
        let mut info = Info::default();
        match self.peek().ok_or(Bad)? {
            b'{' => {
                self.i += 1;
                info.object = true;
                self.ws();
                if self.peek() == Some(b'}') {
                    self.i += 1;
                    return Ok(info);
                }
                info.truthy = true;
                // The members that decide whether a choice or delta delivers; the
                // last of a repeated key wins, as in a parsed dict.
                let mut last: [Option<Info>; 3] = [None; 3];
                loop {
                    let which = self.key(role)?;
                    self.ws();
                    self.expect(b':')?;
                    self.ws();
                    let inner = match (role, which) {
                        (Role::Choice, Some(0)) => Role::Delta,
                        _ => Role::Plain,
                    };
                    let v = self.value(depth + 1, inner)?;
                    if let Some(n) = which {
                        last[n] = Some(v);
                    }
                    self.ws();
                    match self.next() {
                        Some(b',') => self.ws(),
                        Some(b'}') => break,
                        _ => return Err(Bad),
                    }
                }
                let truthy = |v: Option<Info>| v.is_some_and(|v| v.truthy);
                info.count = match role {
                    Role::Choice => match last[0] {
                        Some(delta) if delta.object => delta.count,
                        _ => truthy(last[1]) as u64,
                    },
                    Role::Delta => (truthy(last[0]) || truthy(last[1]) || truthy(last[2])) as u64,
                    _ => 0,
                };
            }
            b'[' => {
                self.i += 1;
                self.ws();
                if self.peek() == Some(b']') {
                    self.i += 1;
                    return Ok(info);
                }
                info.truthy = true;
                let inner = if role == Role::Choices { Role::Choice } else { Role::Plain };
                loop {
                    let v = self.value(depth + 1, inner)?;
                    if role == Role::Choices && v.object {
                        info.count += v.count;
                    }
                    self.ws();
                    match self.next() {
                        Some(b',') => self.ws(),
                        Some(b']') => break,
                        _ => return Err(Bad),
                    }
                }
            }
            b'"' => info.truthy = self.string()?.1,
            b't' => {
                self.lit(b"true")?;
                info.truthy = true;
            }
            b'f' => self.lit(b"false")?,
            b'n' => self.lit(b"null")?,
            _ => info.truthy = self.number()?,
        }
        Ok(info)
    }
}

/// The text of a JSON string's body (already checked), escapes resolved.
fn unescape(raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    let hex = |h: &[u8]| h.iter().fold(0u32, |u, &c| u * 16 + (c as char).to_digit(16).unwrap_or(0));
    while i < raw.len() {
        if raw[i] != b'\\' {
            out.push(raw[i]);
            i += 1;
            continue;
        }
        let e = raw[i + 1];
        i += 2;
        let c = match e {
            b'b' => '\u{8}',
            b'f' => '\u{c}',
            b'n' => '\n',
            b'r' => '\r',
            b't' => '\t',
            b'u' => {
                let mut u = hex(&raw[i..i + 4]);
                i += 4;
                if (0xD800..0xDC00).contains(&u) {
                    let lo = hex(&raw[i + 2..i + 6]);
                    i += 6;
                    u = 0x10000 + ((u - 0xD800) << 10) + (lo - 0xDC00);
                }
                char::from_u32(u).unwrap_or('\u{fffd}')
            }
            other => other as char,
        };
        let mut buf = [0; 4];
        out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(tier: &str, keep: bool, reads: &[&[u8]]) -> (Vec<u8>, u64, Vec<Vec<u8>>, State) {
        let mut r = Rewriter::new(tier, keep, 1 << 20);
        let (mut out, mut tokens, mut handed) = (Vec::new(), 0, Vec::new());
        for read in reads {
            let b = r.feed(read);
            out.extend_from_slice(&b.out);
            tokens += b.tokens;
            handed.extend(b.handed.iter().map(|h| h.payload.clone()));
            if b.state() != State::Open {
                return (out, tokens, handed, b.state());
            }
        }
        let b = r.close();
        out.extend_from_slice(&b.out);
        tokens += b.tokens;
        handed.extend(b.handed.iter().map(|h| h.payload.clone()));
        (out, tokens, handed, b.state())
    }

    fn one(payload: &str) -> String {
        let body = format!("data: {payload}\n\n");
        let (out, _, handed, _) = run("priority", false, &[body.as_bytes()]);
        assert!(handed.is_empty(), "handed back: {payload}");
        String::from_utf8(out).unwrap()
    }

    fn handed(payload: &str) -> bool {
        let body = format!("data: {payload}\n\n");
        let (out, _, handed, _) = run("priority", true, &[body.as_bytes()]);
        assert!(out.is_empty() || handed.is_empty());
        !handed.is_empty()
    }

    #[test]
    fn inserts_the_tier_first_or_replaces_any_top_level_value() {
        assert_eq!(one(r#"{"id":"a"}"#), "data: {\"service_tier\":\"priority\",\"id\":\"a\"}\n\n");
        assert_eq!(one("{}"), "data: {\"service_tier\":\"priority\"}\n\n");
        assert_eq!(one(" { } "), "data: {\"service_tier\":\"priority\"}\n\n");
        for v in [r#""default""#, "null", "12", "-1.5e3", "true", "{\"a\":[1]}", "[]", r#""a\"}""#] {
            assert_eq!(
                one(&format!("{{\"a\":1, \"service_tier\" : {v} ,\"b\":2}}")),
                "data: {\"a\":1,\"service_tier\":\"priority\",\"b\":2}\n\n"
            );
        }
    }

    #[test]
    fn nested_service_tier_and_tricky_strings_are_left_alone() {
        let p = r#"{"x":{"service_tier":"default"},"s":"{\"service_tier\":\"q\"}","t":"\\","u":"}{"}"#;
        assert_eq!(
            one(p),
            format!("data: {{\"service_tier\":\"priority\",{}\n\n", &p[1..])
        );
        // An escaped spelling of the key is the same key.
        assert_eq!(one(r#"{"service\u005ftier":"x"}"#), "data: {\"service\\u005ftier\":\"priority\"}\n\n");
    }

    #[test]
    fn usage_null_is_dropped_unless_asked_for() {
        assert_eq!(one(r#"{"usage":null}"#), "data: {\"service_tier\":\"priority\"}\n\n");
        assert_eq!(one(r#"{"a":1,"usage":null}"#), "data: {\"service_tier\":\"priority\",\"a\":1}\n\n");
        let (out, ..) = run("default", true, &[b"data: {\"usage\":null}\n\n"]);
        assert_eq!(out, b"data: {\"service_tier\":\"default\",\"usage\":null}\n\n");
    }

    #[test]
    fn usage_error_and_non_objects_are_handed_back() {
        for p in [r#"{"usage":{"prompt_tokens":1}}"#, r#"{"error":null}"#, r#"{"error":{"m":1}}"#,
                  "[1]", "\"s\"", "", "not json", "{\"a\":1,}", "{\"a\":01}", "{\"a\":1e400}",
                  "{\"a\":\"\\ud800\"}", "{\"a\":\"\\udc00\"}", "{\"a\":\"\\x\"}", "{\"a\":\"\t\"}",
                  "{\"a\":1} x", "{\"a\":tru}", "{\"a\":-}", "{\"a\":1.}", "{'a':1}", "{\"a\" 1}",
                  r#"{"usage":null,"usage":null}"#, r#"{"choices":[],"choices":[]}"#] {
            assert!(handed(p), "{p:?} not handed back");
        }
        assert!(handed(&format!("{{\"a\":{}{}}}", "[".repeat(200), "]".repeat(200))));
        assert!(!handed(&format!("{{\"a\":{}{}}}", "[".repeat(100), "]".repeat(100))));
        for p in ["{\"a\":\"\\ud83d\\ude00\"}", "{\"a\":1.5e-400}", "{\"a\":18446744073709551616}",
                  "{\"a\":\"\u{7f}é\"}", "{\"usage\" : null}", "{\"a\":[{\"error\":1}]}"] {
            assert!(!handed(p), "{p:?} handed back");
        }
        let (_, _, h, _) = run("priority", false, &[b"data: {\"a\":\"\xff\"}\n\n"]);
        assert_eq!(h.len(), 1, "invalid UTF-8 is handed back");
    }

    #[test]
    fn counts_choices_that_deliver() {
        let count = |p: &str| run("d", false, &[format!("data: {p}\n\n").as_bytes()]).1;
        assert_eq!(count(r#"{"choices":[{"delta":{"content":"hi"}}]}"#), 1);
        assert_eq!(count(r#"{"choices":[{"delta":{"content":""}},{"delta":{"content":null}}]}"#), 0);
        assert_eq!(count(r#"{"choices":[{"delta":{"tool_calls":[{}]}},{"delta":{"reasoning_content":"r"}}]}"#), 2);
        assert_eq!(count(r#"{"choices":[{"delta":{"tool_calls":[]}},{"text":"t"},{"text":""},1,null]}"#), 1);
        // A delta that is not an object falls back to `text`; the last repeated key wins.
        assert_eq!(count(r#"{"choices":[{"delta":"x","text":"t"},{"delta":{},"text":"t"}]}"#), 1);
        assert_eq!(count(r#"{"choices":[{"delta":{"content":"a","content":""}}]}"#), 0);
        assert_eq!(count(r#"{"choices":[{"delta":{"content":0.0}},{"delta":{"content":-0.5}}]}"#), 1);
        assert_eq!(count(r#"{"choices":{"delta":{"content":"a"}}}"#), 0);
    }

    #[test]
    fn splits_events_across_reads_with_crlf_and_drops_other_fields() {
        let body: &[&[u8]] = &[b"da", b"ta: {\"a\"", b": 1}\r", b"\n", b"\r\n: c\nevent: e\nid: 1\nretry: 5\n",
                               b"data: {\"b\":\n", b"data: 2}\n\n", b"data: [DONE]\n\ndata: {\"z\":1}\n\n"];
        let (out, _, handed, state) = run("default", false, body);
        assert_eq!(String::from_utf8(out).unwrap(),
                   "data: {\"service_tier\":\"default\",\"a\": 1}\n\ndata: {\"service_tier\":\"default\",\"b\":2}\n\n");
        assert!(handed.is_empty());
        assert_eq!(state, State::Done);
    }

    #[test]
    fn close_ends_an_event_without_its_blank_line() {
        let (out, _, _, state) = run("default", false, &[b"data: {}\r"]);
        assert_eq!(out, b"data: {\"service_tier\":\"default\"}\n\n");
        assert_eq!(state, State::Open);
        assert_eq!(run("default", false, &[b"data: [DONE]"]).3, State::Done);
    }

    #[test]
    fn handed_events_keep_their_place() {
        let mut r = Rewriter::new("default", false, 1 << 20);
        let b = r.feed(b"data: {}\n\ndata: {\"usage\":{}}\n\ndata: {\"choices\":[{\"text\":\"x\"}]}\n\n");
        let first = b"data: {\"service_tier\":\"default\"}\n\n".len();
        assert_eq!(b.handed, vec![Handed { at: first, tokens_before: 0, payload: b"{\"usage\":{}}".to_vec() }]);
        assert_eq!(&b.out[first..], b"data: {\"service_tier\":\"default\",\"choices\":[{\"text\":\"x\"}]}\n\n");
        assert_eq!(b.tokens, 1);
    }

    #[test]
    fn an_event_over_the_bound_breaks_the_stream() {
        let mut r = Rewriter::new("default", false, 4096);
        assert_eq!(r.feed(&[b"data: ".as_slice(), &[b'x'; 3000], b"\n\n"].concat()).state(), State::Open);
        assert_eq!(r.feed(&[b'x'; 4000]).state(), State::Open);
        let b = r.feed(&[b'x'; 100]);
        assert_eq!((b.state(), b.out.len()), (State::TooLarge, 0));
        let mut r = Rewriter::new("default", false, 4096);
        let mut state = State::Open;
        for _ in 0..100 {
            state = r.feed(&[b"data: ".as_slice(), &[b'x'; 100], b"\n"].concat()).state();
            if state != State::Open {
                break;
            }
        }
        assert_eq!(state, State::TooLarge);
    }

    #[test]
    fn word_at_a_time_searches_agree_with_a_byte_loop() {
        for len in 0..40 {
            for at in 0..len {
                for c in [b'"', b'\\', b'\n', 0x00, 0x1f] {
                    let mut b = vec![b'a'; len];
                    b[at] = c;
                    if at + 3 < len {
                        b[at + 3] = 0xff; // bytes above 0x7f are plain
                    }
                    assert_eq!(plain_run(&b), at, "{len} {at} {c}");
                    assert_eq!(find(&b, c), Some(at));
                }
            }
            assert_eq!(plain_run(&vec![0xe9; len]), len);
            assert_eq!(find(&vec![b' '; len], b'\n'), None);
        }
    }

    #[test]
    fn the_tier_is_written_as_a_json_string() {
        assert_eq!(json_string("a\"b\\\n"), b"\"a\\\"b\\\\\\u000a\"");
    }

    use proptest::prelude::*;

    proptest! {
        // However the body is cut into reads, the client gets the same bytes and
        // the same events are handed back, in the same order.
        #[test]
        fn any_cut_into_reads_rewrites_as_one_read(
            events in proptest::collection::vec(prop_oneof![
                Just(r#"{"choices":[{"delta":{"content":"a}\"{"}}],"usage":null}"#),
                Just(r#"{ "service_tier" : "x" , "n" : [1, {"service_tier": 2}] }"#),
                Just(r#"{"usage":{"prompt_tokens":1}}"#),
                Just("{\"a\":\n1}"),
                Just("not json"),
                Just("{}"),
            ], 0..8),
            crlf in any::<bool>(),
            cuts in proptest::collection::vec(0usize..400, 0..12),
        ) {
            let eol = if crlf { "\r\n" } else { "\n" };
            let mut body = String::new();
            for e in &events {
                for line in e.split('\n') {
                    body += &format!(": note{eol}data: {line}{eol}");
                }
                body += eol;
            }
            let body = body.as_bytes();
            let whole = run("priority", false, &[body]);
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(body.len())).collect();
            cuts.sort();
            let mut reads: Vec<&[u8]> = Vec::new();
            let mut at = 0;
            for c in cuts {
                reads.push(&body[at..c]);
                at = c;
            }
            reads.push(&body[at..]);
            prop_assert_eq!(run("priority", false, &reads), whole);
        }
    }
}
