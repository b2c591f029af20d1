//! The upstream client: HTTP requests to the configured upstreams, sent and read
//! on the core's own threads, their answers handed to the event loop in batches.
//!
//! reqwest (hyper on tokio) does the HTTP: one `reqwest::Client` per upstream,
//! each with its own pool of keep-alive connections per origin (the URL is an
//! argument of every call, so an upstream with several endpoints pools each),
//! HTTP/2 where a TLS upstream offers it by ALPN, rustls with the system roots
//! or the upstream's own CA, a connect timeout, a read timeout (from the send
//! to the head, then between reads of the body), an optional total timeout,
//! and at most `max_connections` requests in flight per upstream (a semaphore:
//! on HTTP/1.1 that is the bound on its connections). Redirects are never
//! followed, no proxy is used, no cookie kept.
//!
//! The runtime's threads start in [`Upstreams::new`], which a forked worker
//! calls itself (a tokio runtime does not survive fork). Every request is one
//! call ([`Upstreams::send`]); what it brings back are [`Event`]s, queued and
//! announced by one write of an eventfd when the queue turns non-empty, so the
//! loop wakes once per batch and takes them all in one [`Upstreams::drain`], as
//! the ledger's writer reports its commits.
//!
//! A stream (a 2xx `text/event-stream` answer to a request sent with a
//! [`StreamSpec`]) is rewritten here as its bytes arrive (crate::sse): each
//! read becomes a [`Event::Chunk`] ready to write to the client, with its
//! tokens and the events handed back for Python to parse. Its reads stop while
//! more than [`STREAM_WINDOW`] bytes of them wait for [`Upstreams::ack`] (the
//! client's backpressure, as reading aiohttp's stream gave it). Any other
//! answer's body is read whole ([`Event::Body`]) and handed out with its head
//! in one batch (one wake-up of the loop per answer). After `[DONE]` (reported at
//! once) what is left of a stream's body is read, so its connection goes back
//! to the pool. [`Upstreams::cancel`] drops
//! a request: its connection is closed, which is how an abandoned stream
//! cancels the upstream's generation.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use reqwest::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE};
use tokio::sync::{Notify, Semaphore};

use crate::error::CoreError;
use crate::ledger::Notifier;
use crate::sse;

/// The most bytes of a stream's chunks handed out and not yet acknowledged
/// before the stream's reads pause.
pub const STREAM_WINDOW: u64 = 256 * 1024;

/// One upstream's client settings.
#[derive(Debug, Clone)]
pub struct ClientSpec {
    pub connect_timeout: Duration,
    /// From the send to the response head, then between two reads of the body.
    pub read_timeout: Option<Duration>,
    /// The whole exchange, body included.
    pub total_timeout: Option<Duration>,
    /// Requests in flight at once (each holds one HTTP/1.1 connection).
    pub max_connections: usize,
    /// PEM certificates trusted instead of the system roots.
    pub ca_pem: Option<Vec<u8>>,
}

/// How to rewrite a request's answer when it is a stream.
#[derive(Debug, Clone)]
pub struct StreamSpec {
    pub tier: String,
    pub keep_usage: bool,
    pub max_event_bytes: usize,
}

/// Why a request failed without an answer (or with one cut short).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// No connection could be made (refused, DNS, TLS handshake).
    Connect = 0,
    /// The connect, read or total timeout passed.
    Timeout = 1,
    /// The answer's body broke off: reset or cut short.
    Body = 2,
    /// The answer was malformed: a bad status line or head, bad chunked framing.
    Protocol = 3,
    /// Anything else: the connection closed or broke before the answer's head.
    Closed = 4,
}

/// What a request brings back, in order: a head, then a body or chunks; or
/// a failure at any point.
#[derive(Debug)]
pub enum Event {
    /// The response head. `sse`: its body comes as chunks, rewritten.
    Head { id: u64, status: u16, headers: Vec<(String, String)>, sse: bool },
    /// The whole body of an answer that is not a rewritten stream.
    Body { id: u64, body: Vec<u8> },
    /// One read of a stream, rewritten; `end`: the body ended here (the
    /// rewriter's close), or the batch's state is not open.
    Chunk { id: u64, batch: sse::Batch, end: bool },
    /// The request failed; nothing more comes for it.
    Failed { id: u64, failure: Failure, message: String },
}

impl Event {
    pub fn id(&self) -> u64 {
        match self {
            Event::Head { id, .. } | Event::Body { id, .. } | Event::Chunk { id, .. }
            | Event::Failed { id, .. } => *id,
        }
    }
}

struct Client {
    http: reqwest::Client,
    permits: Arc<Semaphore>,
}

/// A stream's flow control: bytes handed out vs acknowledged.
struct Flow {
    acked: AtomicU64,
    more: Notify,
}

struct Entry {
    flow: Arc<Flow>,
    abort: Option<tokio::task::AbortHandle>,
}

struct Shared {
    events: Mutex<Vec<Event>>,
    notifier: Notifier,
    requests: Mutex<HashMap<u64, Entry>>,
}

impl Shared {
    fn push(&self, e: Event) {
        let mut q = self.events.lock().unwrap_or_else(|p| p.into_inner());
        let first = q.is_empty();
        q.push(e);
        drop(q);
        if first {
            self.notifier.notify();
        }
    }

    /// Pushes `a` then `b` as one batch: one wake-up of the loop for both.
    fn push_pair(&self, a: Event, b: Event) {
        let mut q = self.events.lock().unwrap_or_else(|p| p.into_inner());
        let first = q.is_empty();
        q.push(a);
        q.push(b);
        drop(q);
        if first {
            self.notifier.notify();
        }
    }
}

/// The client of every upstream of one process; see the module doc.
pub struct Upstreams {
    runtime: Option<tokio::runtime::Runtime>, // None only while dropped
    shared: Arc<Shared>,
    clients: RwLock<Vec<Arc<Client>>>,
    next_id: AtomicU64,
}

impl Upstreams {
    /// Starts the runtime's `threads` threads.
    pub fn new(threads: usize) -> Result<Upstreams, CoreError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads.max(1))
            .max_blocking_threads(4) // DNS look-ups
            .thread_name("tierq-upstream")
            .enable_io()
            .enable_time()
            .build()
            .map_err(|e| CoreError::Os(format!("upstream runtime: {e}")))?;
        Ok(Upstreams {
            runtime: Some(runtime),
            shared: Arc::new(Shared {
                events: Mutex::new(Vec::new()),
                notifier: Notifier::new()?,
                requests: Mutex::new(HashMap::new()),
            }),
            clients: RwLock::new(Vec::new()),
            next_id: AtomicU64::new(1),
        })
    }

    /// Adds an upstream's client; returns its index for [`Upstreams::send`].
    pub fn add_client(&self, spec: &ClientSpec) -> Result<usize, CoreError> {
        if spec.max_connections == 0 {
            return Err(CoreError::arg("max_connections", "must be at least 1"));
        }
        let mut b = reqwest::Client::builder()
            .connect_timeout(spec.connect_timeout)
            .pool_max_idle_per_host(spec.max_connections)
            .pool_idle_timeout(Duration::from_secs(30))
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .tcp_nodelay(true)
            .referer(false);
        if let Some(t) = spec.read_timeout {
            b = b.read_timeout(t);
        }
        if let Some(t) = spec.total_timeout {
            b = b.timeout(t);
        }
        if let Some(pem) = &spec.ca_pem {
            let certs = reqwest::Certificate::from_pem_bundle(pem)
                .map_err(|e| CoreError::arg("ca_pem", format!("not PEM certificates: {e}")))?;
            if certs.is_empty() {
                return Err(CoreError::arg("ca_pem", "holds no certificate"));
            }
            b = b.tls_built_in_root_certs(false);
            for c in certs {
                b = b.add_root_certificate(c);
            }
        }
        let http = b.build().map_err(|e| CoreError::arg("client", e.to_string()))?;
        let mut clients = self.clients.write().unwrap_or_else(|p| p.into_inner());
        clients.push(Arc::new(Client { http, permits: Arc::new(Semaphore::new(spec.max_connections)) }));
        Ok(clients.len() - 1)
    }

    /// Sends a POST of `body` to `url` through client `client`; returns the
    /// request's id, which every [`Event`] of its answer carries.
    pub fn send(
        &self,
        client: usize,
        url: &str,
        headers: &[(&str, &str)],
        body: Vec<u8>,
        stream: Option<StreamSpec>,
    ) -> Result<u64, CoreError> {
        let c = self
            .clients
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(client)
            .cloned()
            .ok_or_else(|| CoreError::arg("client", format!("no client {client}")))?;
        let url = reqwest::Url::parse(url).map_err(|e| CoreError::arg("url", format!("{url:?}: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(CoreError::arg("url", format!("scheme must be http or https, got {:?}", url.scheme())));
        }
        let mut map = HeaderMap::with_capacity(headers.len());
        for (k, v) in headers {
            let name = HeaderName::from_bytes(k.as_bytes())
                .map_err(|_| CoreError::arg("headers", format!("bad header name {k:?}")))?;
            let value = HeaderValue::from_str(v)
                .map_err(|_| CoreError::arg("headers", format!("bad value for header {k:?}")))?;
            map.append(name, value);
        }
        let request = c.http.post(url).headers(map).body(body);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let flow = Arc::new(Flow { acked: AtomicU64::new(0), more: Notify::new() });
        self.shared.requests.lock().unwrap_or_else(|p| p.into_inner())
            .insert(id, Entry { flow: flow.clone(), abort: None });
        let shared = self.shared.clone();
        let task = self.runtime.as_ref().expect("a runtime").spawn(async move {
            let last = exchange(&shared, &c, id, request, stream, &flow).await;
            // Over before its last event is seen: in_flight never counts it after.
            shared.requests.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
            match last {
                Last::One(e) => shared.push(e),
                Last::Pair(head, body) => shared.push_pair(head, body),
                Last::Sent => {}
            }
        });
        if let Some(e) = self.shared.requests.lock().unwrap_or_else(|p| p.into_inner()).get_mut(&id) {
            e.abort = Some(task.abort_handle());
        }
        Ok(id)
    }

    /// The client consumed `bytes` more of request `id`'s chunks.
    pub fn ack(&self, id: u64, bytes: u64) {
        if let Some(e) = self.shared.requests.lock().unwrap_or_else(|p| p.into_inner()).get(&id) {
            e.flow.acked.fetch_add(bytes, Ordering::Release);
            e.flow.more.notify_one();
        }
    }

    /// Drops request `id` (a no-op once it is over): its connection is closed
    /// and no event of it follows. Events already queued may still be drained.
    pub fn cancel(&self, id: u64) {
        let entry = self.shared.requests.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
        if let Some(Entry { abort: Some(a), .. }) = entry {
            a.abort();
        }
    }

    /// Clears the eventfd and takes every queued event.
    pub fn drain(&self) -> Vec<Event> {
        self.shared.notifier.clear();
        std::mem::take(&mut *self.shared.events.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// The eventfd the loop watches: readable when events are queued.
    pub fn notify_fd(&self) -> i32 {
        self.shared.notifier.fd()
    }

    /// Requests sent and not yet over.
    pub fn in_flight(&self) -> usize {
        self.shared.requests.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

impl Drop for Upstreams {
    fn drop(&mut self) {
        // Every request's task is dropped with the runtime; its threads are not
        // waited for (a worker exits right after).
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

fn failure_of(e: &reqwest::Error) -> Failure {
    if e.is_timeout() {
        Failure::Timeout
    } else if e.is_connect() {
        Failure::Connect
    } else if malformed(e) {
        Failure::Protocol
    } else if e.is_body() || e.is_decode() {
        Failure::Body
    } else {
        Failure::Closed
    }
}

/// Whether the upstream's bytes broke HTTP (after the connection was made):
/// hyper's parse errors (status line, head) and its chunked decoder's
/// InvalidData / InvalidInput, as opposed to a reset or an early close.
fn malformed(e: &reqwest::Error) -> bool {
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if s.downcast_ref::<hyper::Error>().is_some_and(|h| h.is_parse() || h.is_parse_status()) {
            return true;
        }
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            if matches!(io.kind(), std::io::ErrorKind::InvalidData | std::io::ErrorKind::InvalidInput) {
                return true;
            }
        }
        source = s.source();
    }
    false
}

/// The error's message with its causes, as one line.
fn message_of(e: &reqwest::Error) -> String {
    let mut m = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        m.push_str(": ");
        m.push_str(&s.to_string());
        source = s.source();
    }
    m
}

fn copy_batch(b: &sse::Batch) -> sse::Batch {
    sse::Batch { out: b.out.clone(), tokens: b.tokens, state: b.state, handed: b.handed.clone() }
}

/// A request's last events, pushed once it no longer counts as in flight.
enum Last {
    One(Event),
    /// A head with the whole body it announced, as one batch.
    Pair(Event, Event),
    /// Everything was pushed already.
    Sent,
}

async fn exchange(
    shared: &Shared,
    client: &Client,
    id: u64,
    request: reqwest::RequestBuilder,
    stream: Option<StreamSpec>,
    flow: &Flow,
) -> Last {
    let fail = |e: &reqwest::Error| Last::One(Event::Failed { id, failure: failure_of(e), message: message_of(e) });
    let Ok(_permit) = client.permits.acquire().await else { return Last::Sent };
    let mut resp = match request.send().await {
        Ok(r) => r,
        Err(e) => return fail(&e),
    };
    let status = resp.status().as_u16();
    let headers: Vec<(String, String)> = resp
        .headers()
        .iter()
        .filter_map(|(k, v)| Some((k.as_str().to_owned(), v.to_str().ok()?.to_owned())))
        .collect();
    let is_sse = resp
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(';').next().unwrap_or("").trim().eq_ignore_ascii_case("text/event-stream"));
    let spec = match stream {
        Some(s) if is_sse && (200..300).contains(&status) => Some(s),
        _ => None,
    };
    let head = Event::Head { id, status, headers, sse: spec.is_some() };
    let Some(spec) = spec else {
        // A body read whole goes with its head, in one batch: the loop wakes
        // once per answer, not once for the head and again for the body. The
        // gateway reads such a body whole before it acts on the head (an
        // overload's back-off, an error, a JSON answer), so it loses nothing;
        // a body that breaks off fails the request at its head.
        let mut body = Vec::new();
        loop {
            match resp.chunk().await {
                Ok(Some(b)) => body.extend_from_slice(&b),
                Ok(None) => return Last::Pair(head, Event::Body { id, body }),
                Err(e) => return fail(&e),
            }
        }
    };
    shared.push(head);
    let mut rewriter = sse::Rewriter::new(&spec.tier, spec.keep_usage, spec.max_event_bytes);
    let mut handed_out: u64 = 0;
    loop {
        let read = match resp.chunk().await {
            Ok(r) => r,
            Err(e) => return fail(&e),
        };
        let (batch, end) = match &read {
            Some(b) => (rewriter.feed(b), false),
            None => (rewriter.close(), true),
        };
        let state = batch.state();
        if end || state != sse::State::Open {
            let last = Event::Chunk { id, batch: copy_batch(batch), end: true };
            if end || state != sse::State::Done {
                return Last::One(last);
            }
            // [DONE]: the client has its end now; what is left of the body
            // (usually its last chunk, already read) is read so the connection
            // goes back to the pool, up to a bound and within the read timeout.
            shared.push(last);
            let mut rest = 0usize;
            while let Ok(Some(b)) = resp.chunk().await {
                rest += b.len();
                if rest > 64 * 1024 {
                    break; // not worth keeping: dropping the response closes it
                }
            }
            return Last::Sent;
        }
        if !batch.out.is_empty() || !batch.handed.is_empty() {
            handed_out += batch.out.len() as u64;
            shared.push(Event::Chunk { id, batch: copy_batch(batch), end: false });
        }
        while handed_out.saturating_sub(flow.acked.load(Ordering::Acquire)) > STREAM_WINDOW {
            flow.more.notified().await;
        }
    }
}
