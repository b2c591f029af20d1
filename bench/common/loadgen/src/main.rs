//! tierq-loadgen: the load generator behind bench/overload and bench/overhead.
//!
//! One spec (JSON, first argument) drives one run: open loop (Poisson arrivals at
//! a rate) or closed loop (N workers back to back), OpenAI chat requests, JSON or
//! SSE. Every request leaves one record (tier, status, shed code, Retry-After,
//! time to first event, total, gaps between SSE events, and the outcome of one
//! retry after the advertised wait), written as JSON lines for Python to analyse.
//! With `prefixes` set, each chat request opens with one of that many shared
//! system prompts drawn Zipf-like, then a short user turn of its own (the
//! shared-prefix workload of bench/routing); its record says which (`k`).
//! It runs on one thread so it takes at most one of the machine's cores.

use std::rc::Rc;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Value};
use tokio::time::Instant;

#[derive(Deserialize, Clone)]
struct Spec {
    url: String,
    #[serde(default = "d_model")]
    model: String,
    /// "open": Poisson arrivals at `rate`/s; "closed": `concurrency` workers.
    mode: String,
    #[serde(default)]
    rate: f64,
    #[serde(default = "d_one")]
    concurrency: usize,
    duration_s: f64,
    /// Hard cap on requests started (every loop is bounded in count and time).
    #[serde(default = "d_max")]
    max_requests: u64,
    /// After `duration_s`, how long in-flight requests may still finish.
    #[serde(default = "d_grace")]
    grace_s: f64,
    /// Closed loop: spread the workers' first requests over this many seconds.
    #[serde(default)]
    ramp_s: f64,
    #[serde(default)]
    seed: u64,
    /// Share of requests tagged priority.
    #[serde(default)]
    priority_share: f64,
    /// Send `service_tier: "priority"` on tagged requests (false: tag only, one FIFO lane).
    #[serde(default = "d_true")]
    send_tier: bool,
    #[serde(default)]
    stream: bool,
    #[serde(default = "d_tokens")]
    max_tokens: u64,
    /// If set, each request asks for a length drawn uniformly in [max_tokens_min,
    /// max_tokens]: engines see varied output lengths, so slots do not free in lockstep.
    #[serde(default)]
    max_tokens_min: Option<u64>,
    /// Honour Retry-After once: after a 429, wait retry-after-ms and retry.
    #[serde(default)]
    retry: bool,
    /// Keep the gaps between SSE events in the records.
    #[serde(default)]
    gaps: bool,
    #[serde(default)]
    headers: Vec<(String, String)>,
    /// Shared system prompts (0: every request sends the same short user message).
    #[serde(default)]
    prefixes: usize,
    /// Characters of each system prompt.
    #[serde(default = "d_prefix_chars")]
    prefix_chars: usize,
    /// Prefix k (0-based) is drawn with probability proportional to 1 / (k + 1)^zipf_s.
    #[serde(default = "d_zipf")]
    zipf_s: f64,
    /// Per-request timeout.
    #[serde(default = "d_timeout")]
    timeout_s: f64,
    out: String,
}

fn d_model() -> String {
    "sim-chat".into()
}
fn d_one() -> usize {
    1
}
fn d_max() -> u64 {
    1_000_000
}
fn d_grace() -> f64 {
    30.0
}
fn d_true() -> bool {
    true
}
fn d_tokens() -> u64 {
    16
}
fn d_timeout() -> f64 {
    120.0
}
fn d_prefix_chars() -> usize {
    8000
}
fn d_zipf() -> f64 {
    1.0
}

/// xorshift64*: enough randomness for arrivals and tier draws, reproducible by seed.
struct Rng(u64);
impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn f64(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let x = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D);
        (x >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[derive(Default)]
struct Attempt {
    status: u16,
    code: Option<String>,
    err: Option<String>,
    ttft_ms: Option<f64>,
    total_ms: f64,
    retry_after_s: Option<f64>,
    retry_after_ms: Option<f64>,
    queue_ms: Option<f64>,
    tier_echo: Option<String>,
    events: u64,
    gaps: Vec<f64>,
}

impl Attempt {
    fn to_json(&self, keep_gaps: bool) -> Value {
        let mut v = json!({
            "status": self.status,
            "total": round3(self.total_ms),
            "events": self.events,
        });
        let m = v.as_object_mut().unwrap();
        let mut put = |k: &str, x: Option<Value>| {
            if let Some(x) = x {
                m.insert(k.into(), x);
            }
        };
        put("code", self.code.clone().map(Value::from));
        put("err", self.err.clone().map(Value::from));
        put("ttft", self.ttft_ms.map(|x| json!(round3(x))));
        put("ra_s", self.retry_after_s.map(Value::from));
        put("ra_ms", self.retry_after_ms.map(Value::from));
        put("qms", self.queue_ms.map(Value::from));
        put("tier", self.tier_echo.clone().map(Value::from));
        if keep_gaps && !self.gaps.is_empty() {
            put(
                "gaps",
                Some(Value::from(self.gaps.iter().map(|g| round3(*g)).collect::<Vec<_>>())),
            );
        }
        v
    }
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

struct Ctx {
    spec: Spec,
    client: reqwest::Client,
    /// Request bodies by (length index, priority).
    bodies: Vec<[bytes_body::Body; 2]>,
    /// The shared system prompts, and the cumulative weights to draw one by.
    prefixes: Vec<String>,
    prefix_cdf: Vec<f64>,
    t0: Instant,
    end: Instant,
    hard_end: Instant,
}

mod bytes_body {
    pub type Body = std::rc::Rc<Vec<u8>>;
}

fn body_for(spec: &Spec, priority: bool, max_tokens: u64) -> Vec<u8> {
    let mut b = json!({
        "model": spec.model,
        "messages": [{"role": "user", "content": "say something about heavy load tonight"}],
        "max_tokens": max_tokens,
        "stream": spec.stream,
    });
    if priority && spec.send_tier {
        b["service_tier"] = json!("priority");
    }
    serde_json::to_vec(&b).unwrap()
}

/// System prompt k: 3-character words of [a-z0-9] from a generator seeded by k,
/// one space apart (4 characters a word: the sim counts a word a token, so
/// about chars / 4 tokens, as text is), cut at `chars`. Prompts differ from
/// their first word on, so they share no cache block.
fn prefix_text(k: usize, chars: usize) -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = Rng::new(0x5EED_0000 + k as u64);
    let mut out = String::with_capacity(chars + 4);
    while out.len() < chars {
        if !out.is_empty() {
            out.push(' ');
        }
        for _ in 0..3 {
            out.push(ALPHABET[(rng.f64() * ALPHABET.len() as f64) as usize % ALPHABET.len()] as char);
        }
    }
    out.truncate(chars);
    out
}

fn zipf_cdf(n: usize, s: f64) -> Vec<f64> {
    let w: Vec<f64> = (0..n).map(|k| 1.0 / ((k + 1) as f64).powf(s)).collect();
    let total: f64 = w.iter().sum();
    let mut acc = 0.0;
    w.iter()
        .map(|x| {
            acc += x / total;
            acc
        })
        .collect()
}

/// A shared-prefix request: system prompt k, then a user turn naming the request.
fn prefix_body(ctx: &Ctx, priority: bool, max_tokens: u64, k: usize, id: u64) -> Vec<u8> {
    let mut b = json!({
        "model": ctx.spec.model,
        "messages": [
            {"role": "system", "content": ctx.prefixes[k]},
            {"role": "user", "content": format!("question {id}: how do engines share a prompt?")},
        ],
        "max_tokens": max_tokens,
        "stream": ctx.spec.stream,
    });
    if priority && ctx.spec.send_tier {
        b["service_tier"] = json!("priority");
    }
    serde_json::to_vec(&b).unwrap()
}

fn header_f64(resp: &reqwest::Response, name: &str) -> Option<f64> {
    resp.headers().get(name)?.to_str().ok()?.trim().parse::<f64>().ok()
}

async fn attempt(ctx: &Ctx, priority: bool, len_idx: usize, prefix: Option<(usize, u64)>) -> Attempt {
    let body = match prefix {
        Some((k, id)) => {
            let lo = ctx.spec.max_tokens_min.unwrap_or(ctx.spec.max_tokens).min(ctx.spec.max_tokens);
            prefix_body(ctx, priority, lo + len_idx as u64, k, id)
        }
        None => (*ctx.bodies[len_idx][priority as usize]).clone(),
    };
    let start = Instant::now();
    let mut a = Attempt::default();
    let mut req = ctx
        .client
        .post(&ctx.spec.url)
        .header("content-type", "application/json")
        .body(body);
    for (k, v) in &ctx.spec.headers {
        req = req.header(k.as_str(), v.as_str());
    }
    let deadline = (start + Duration::from_secs_f64(ctx.spec.timeout_s)).min(ctx.hard_end);
    let resp = match tokio::time::timeout_at(deadline, req.send()).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            a.err = Some(short_err(&e));
            a.total_ms = ms(start.elapsed());
            return a;
        }
        Err(_) => {
            a.err = Some("timeout".into());
            a.total_ms = ms(start.elapsed());
            return a;
        }
    };
    a.status = resp.status().as_u16();
    a.retry_after_s = header_f64(&resp, "retry-after");
    a.retry_after_ms = header_f64(&resp, "retry-after-ms");
    a.queue_ms = header_f64(&resp, "x-tierq-queue-ms");
    a.tier_echo = resp
        .headers()
        .get("x-tierq-service-tier")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let is_sse = a.status == 200 && ctx.spec.stream;
    let mut resp = resp;
    let mut body_bytes: Vec<u8> = Vec::new();
    let mut last_event: Option<Instant> = None;
    // An SSE event ends with a blank line; a split "\n" + "\n" across reads counts too.
    let mut prev_nl = false;
    loop {
        let chunk = match tokio::time::timeout_at(deadline, resp.chunk()).await {
            Ok(Ok(Some(c))) => c,
            Ok(Ok(None)) => break,
            Ok(Err(e)) => {
                a.err = Some(short_err(&e));
                break;
            }
            Err(_) => {
                a.err = Some("timeout".into());
                break;
            }
        };
        let now = Instant::now();
        if is_sse {
            let mut n = 0u64;
            for &byte in chunk.iter() {
                if byte == b'\n' {
                    if prev_nl {
                        n += 1;
                        prev_nl = false;
                    } else {
                        prev_nl = true;
                    }
                } else if byte != b'\r' {
                    prev_nl = false;
                }
            }
            if n > 0 {
                if a.ttft_ms.is_none() {
                    a.ttft_ms = Some(ms(now - start));
                }
                if let Some(prev) = last_event {
                    a.gaps.push(ms(now - prev));
                }
                // Events that arrive in one read are one arrival: zero gaps between them.
                for _ in 1..n {
                    a.gaps.push(0.0);
                }
                a.events += n;
                last_event = Some(now);
            }
        } else if a.status != 200 && body_bytes.len() < 4096 {
            body_bytes.extend_from_slice(&chunk);
        }
    }
    a.total_ms = ms(start.elapsed());
    if a.status == 200 && !ctx.spec.stream {
        a.ttft_ms = Some(a.total_ms);
    }
    if a.status != 200 {
        if let Ok(v) = serde_json::from_slice::<Value>(&body_bytes) {
            if let Some(c) = v.pointer("/error/code").and_then(Value::as_str) {
                a.code = Some(c.to_owned());
            }
        }
    }
    a
}

fn short_err(e: &reqwest::Error) -> String {
    if e.is_connect() {
        "connect".into()
    } else if e.is_timeout() {
        "timeout".into()
    } else if e.is_body() || e.is_decode() {
        "body".into()
    } else {
        "request".into()
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// One logical request: an attempt, and (if asked) one retry after the advertised wait.
async fn one(ctx: Rc<Ctx>, id: u64, priority: bool, len_idx: usize, k: Option<usize>,
             sched: Instant) -> Value {
    let sent = Instant::now();
    let prefix = k.map(|k| (k, id));
    let first = attempt(&ctx, priority, len_idx, prefix).await;
    let mut rec = json!({
        "id": id,
        "p": priority,
        "t": round3((sched - ctx.t0).as_secs_f64()),
        "late": round3(ms(sent.saturating_duration_since(sched))),
        "a": first.to_json(ctx.spec.gaps),
    });
    if let Some(k) = k {
        rec["k"] = json!(k);
    }
    if ctx.spec.retry && first.status == 429 {
        let wait_ms = first
            .retry_after_ms
            .or(first.retry_after_s.map(|s| s * 1000.0))
            .unwrap_or(1000.0);
        let shed_at = Instant::now();
        let retry_at = shed_at + Duration::from_secs_f64(wait_ms / 1000.0);
        if retry_at < ctx.hard_end {
            tokio::time::sleep_until(retry_at).await;
            let second = attempt(&ctx, priority, len_idx, prefix).await;
            let mut r = second.to_json(ctx.spec.gaps);
            // From the 429 until the retry was admitted (its queue time included).
            r["waited"] = json!(round3(ms(retry_at - shed_at)));
            rec["r"] = r;
        } else {
            rec["r_skipped"] = json!(true);
        }
    }
    rec
}

fn draw_prefix(ctx: &Ctx, rng: &mut Rng) -> Option<usize> {
    if ctx.prefixes.is_empty() {
        return None;
    }
    let u = rng.f64();
    Some(ctx.prefix_cdf.iter().position(|&c| u < c).unwrap_or(ctx.prefixes.len() - 1))
}

async fn run(spec: Spec) -> (Vec<Value>, f64) {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(usize::MAX)
        .pool_idle_timeout(Duration::from_secs(30))
        .tcp_nodelay(true)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("http client");
    let t0 = Instant::now();
    let end = t0 + Duration::from_secs_f64(spec.duration_s);
    let hard_end = end + Duration::from_secs_f64(spec.grace_s);
    let lo = spec.max_tokens_min.unwrap_or(spec.max_tokens).min(spec.max_tokens);
    let bodies: Vec<[bytes_body::Body; 2]> = (lo..=spec.max_tokens)
        .map(|n| [Rc::new(body_for(&spec, false, n)), Rc::new(body_for(&spec, true, n))])
        .collect();
    let prefixes: Vec<String> = (0..spec.prefixes).map(|k| prefix_text(k, spec.prefix_chars)).collect();
    let prefix_cdf = zipf_cdf(spec.prefixes, spec.zipf_s);
    let ctx = Rc::new(Ctx {
        bodies,
        prefixes,
        prefix_cdf,
        spec: spec.clone(),
        client,
        t0,
        end,
        hard_end,
    });
    let local = tokio::task::LocalSet::new();
    let records = local
        .run_until(async move {
            let mut rng = Rng::new(spec.seed);
            if spec.mode == "open" {
                let mut handles = Vec::new();
                let mut next = t0;
                let mut id = 0u64;
                while id < spec.max_requests {
                    let gap = -(1.0 - rng.f64()).ln() / spec.rate.max(1e-9);
                    next += Duration::from_secs_f64(gap);
                    if next >= ctx.end {
                        break;
                    }
                    tokio::time::sleep_until(next).await;
                    let pri = rng.f64() < spec.priority_share;
                    let li = ((rng.f64() * ctx.bodies.len() as f64) as usize).min(ctx.bodies.len() - 1);
                    let k = draw_prefix(&ctx, &mut rng);
                    handles.push(tokio::task::spawn_local(one(ctx.clone(), id, pri, li, k, next)));
                    id += 1;
                }
                let mut out = Vec::with_capacity(handles.len());
                for h in handles {
                    out.push(h.await.expect("request task"));
                }
                out
            } else {
                let counter = Rc::new(std::cell::Cell::new(0u64));
                let n = spec.concurrency.max(1);
                let mut handles = Vec::new();
                for w in 0..n {
                    let ctx = ctx.clone();
                    let counter = counter.clone();
                    let mut wrng = Rng::new(spec.seed ^ (w as u64 + 1).wrapping_mul(0xABCD_EF12_3456_7891));
                    let delay = spec.ramp_s * w as f64 / n as f64;
                    handles.push(tokio::task::spawn_local(async move {
                        let mut mine = Vec::new();
                        tokio::time::sleep_until(ctx.t0 + Duration::from_secs_f64(delay)).await;
                        loop {
                            let now = Instant::now();
                            let id = counter.get();
                            if now >= ctx.end || id >= ctx.spec.max_requests {
                                break;
                            }
                            counter.set(id + 1);
                            let pri = wrng.f64() < ctx.spec.priority_share;
                            let n = ctx.bodies.len();
                            let li = ((wrng.f64() * n as f64) as usize).min(n - 1);
                            let k = draw_prefix(&ctx, &mut wrng);
                            mine.push(one(ctx.clone(), id, pri, li, k, now).await);
                        }
                        mine
                    }));
                }
                let mut out = Vec::new();
                for h in handles {
                    out.extend(h.await.expect("worker task"));
                }
                out
            }
        })
        .await;
    (records, t0.elapsed().as_secs_f64())
}

fn main() {
    let arg = std::env::args().nth(1).expect("usage: tierq-loadgen SPEC_JSON");
    let spec: Spec = serde_json::from_str(&arg).expect("spec is not valid JSON");
    let out = spec.out.clone();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (records, elapsed) = rt.block_on(run(spec));
    let mut buf = String::with_capacity(records.len() * 160);
    for r in &records {
        buf.push_str(&r.to_string());
        buf.push('\n');
    }
    std::fs::write(&out, buf).expect("write records");
    let ok = records
        .iter()
        .filter(|r| r.pointer("/a/status").and_then(Value::as_u64) == Some(200))
        .count();
    println!(
        "{}",
        json!({"requests": records.len(), "ok": ok, "elapsed_s": round3(elapsed)})
    );
}
