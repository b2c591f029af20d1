//! The upstream client against real sockets on loopback: a JSON answer and
//! keep-alive, a stream rewritten as it arrives, a reset mid-stream, read
//! timeouts before the head and mid-body, a malformed status line and chunked
//! encoding, the connection bound, a cancel closing the connection, TLS with a
//! test CA (and without it), HTTP/2 by ALPN. Hand-written servers on std
//! threads say exactly which bytes go out; the TLS one is hyper's.
#![cfg(not(loom))]

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use tierq_core::sse::State;
use tierq_core::upstream::{ClientSpec, Event, Failure, StreamSpec, Upstreams};

const WAIT: Duration = Duration::from_secs(20);

fn spec() -> ClientSpec {
    ClientSpec {
        connect_timeout: Duration::from_secs(5),
        read_timeout: Some(Duration::from_secs(10)),
        total_timeout: None,
        max_connections: 4,
        ca_pem: None,
    }
}

fn stream_spec() -> Option<StreamSpec> {
    Some(StreamSpec { tier: "priority".into(), keep_usage: false, max_event_bytes: 1 << 20 })
}

/// Every event drained so far, by request, until a request's last one.
struct Collector<'a> {
    up: &'a Upstreams,
    seen: HashMap<u64, Vec<Event>>,
    wakeups: usize,
}

fn last(e: &Event) -> bool {
    matches!(e, Event::Body { .. } | Event::Failed { .. } | Event::Chunk { end: true, .. })
}

impl<'a> Collector<'a> {
    fn new(up: &'a Upstreams) -> Self {
        Collector { up, seen: HashMap::new(), wakeups: 0 }
    }

    /// Waits on the eventfd as the loop does, then drains.
    fn poll_once(&mut self) {
        let mut pfd = libc::pollfd { fd: self.up.notify_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one live pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, 50) };
        if n > 0 {
            self.wakeups += 1;
        }
        for e in self.up.drain() {
            self.seen.entry(e.id()).or_default().push(e);
        }
    }

    fn until_end(&mut self, id: u64) -> Vec<Event> {
        let t0 = Instant::now();
        while !self.seen.get(&id).is_some_and(|v| v.last().is_some_and(last)) {
            assert!(t0.elapsed() < WAIT, "request {id} never ended: {:?}", self.seen.get(&id));
            self.poll_once();
        }
        self.seen.remove(&id).unwrap()
    }

    /// Waits for at least `n` events of `id` and returns them (kept).
    fn until_count(&mut self, id: u64, n: usize) -> &[Event] {
        let t0 = Instant::now();
        while self.seen.get(&id).map_or(0, Vec::len) < n {
            assert!(t0.elapsed() < WAIT, "request {id}: fewer than {n} events: {:?}", self.seen.get(&id));
            self.poll_once();
        }
        &self.seen[&id]
    }
}

/// A server on loopback whose every connection runs `handle` on its own thread.
fn server<F>(handle: F) -> (String, Arc<AtomicUsize>)
where
    F: Fn(TcpStream) + Send + Sync + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let accepts = Arc::new(AtomicUsize::new(0));
    let counted = accepts.clone();
    let handle = Arc::new(handle);
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { return };
            counted.fetch_add(1, Ordering::SeqCst);
            let h = handle.clone();
            std::thread::spawn(move || h(conn));
        }
    });
    (format!("http://{addr}/v1/chat/completions"), accepts)
}

/// Reads one request (head and Content-Length body); None at EOF.
fn read_request(s: &mut TcpStream) -> Option<Vec<u8>> {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        if s.read(&mut byte).ok()? == 0 {
            return None;
        }
        buf.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&buf).to_ascii_lowercase();
    let len = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map_or(0, |v| v.trim().parse::<usize>().unwrap());
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).ok()?;
    buf.extend_from_slice(&body);
    Some(buf)
}

/// Blocks until the peer closes (or resets) the connection.
fn until_closed(s: &mut TcpStream) {
    let mut buf = [0u8; 1024];
    while matches!(s.read(&mut buf), Ok(n) if n > 0) {}
}

/// Closes with a TCP reset (SO_LINGER 0).
fn reset(s: TcpStream) {
    let linger = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: a live socket and a live option of the size given.
    unsafe {
        libc::setsockopt(s.as_raw_fd(), libc::SOL_SOCKET, libc::SO_LINGER,
                         (&linger as *const libc::linger).cast(), std::mem::size_of::<libc::linger>() as u32);
    }
    drop(s);
}

fn chunk(data: &[u8]) -> Vec<u8> {
    let mut v = format!("{:x}\r\n", data.len()).into_bytes();
    v.extend_from_slice(data);
    v.extend_from_slice(b"\r\n");
    v
}

const SSE_HEAD: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n";
const EVENT: &[u8] = b"data: {\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"hi\"}}]}\n\n";

fn send(up: &Upstreams, client: usize, url: &str, stream: Option<StreamSpec>) -> u64 {
    up.send(client, url, &[("content-type", "application/json")], b"{\"model\":\"m\"}".to_vec(), stream)
        .unwrap()
}

#[test]
fn a_json_answer_comes_whole_and_the_connection_is_kept_alive() {
    let (url, accepts) = server(|mut s| {
        while let Some(req) = read_request(&mut s) {
            let req = String::from_utf8_lossy(&req).into_owned();
            assert!(req.starts_with("POST /v1/chat/completions HTTP/1.1\r\n"), "{req}");
            assert!(req.to_ascii_lowercase().contains("x-trace: t1\r\n"), "{req}");
            assert!(req.ends_with("{\"model\":\"m\"}"), "{req}");
            let body = br#"{"id":"x","usage":{"prompt_tokens":3,"completion_tokens":2}}"#;
            let head = format!("HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n", body.len());
            s.write_all(head.as_bytes()).unwrap();
            s.write_all(body).unwrap();
        }
    });
    let up = Upstreams::new(1).unwrap();
    let c = up.add_client(&spec()).unwrap();
    let mut col = Collector::new(&up);
    for _ in 0..3 {
        let id = up
            .send(c, &url, &[("content-type", "application/json"), ("x-trace", "t1")], b"{\"model\":\"m\"}".to_vec(), None)
            .unwrap();
        let ev = col.until_end(id);
        match &ev[..] {
            [Event::Head { status: 200, sse: false, headers, .. }, Event::Body { body, .. }] => {
                assert!(headers.iter().any(|(k, v)| k == "content-type" && v == "application/json"));
                assert_eq!(body, br#"{"id":"x","usage":{"prompt_tokens":3,"completion_tokens":2}}"#);
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(accepts.load(Ordering::SeqCst), 1, "three requests, one kept-alive connection");
    assert_eq!(up.in_flight(), 0);
}

#[test]
fn a_stream_is_rewritten_as_its_bytes_arrive() {
    // Each event goes out only after the client saw the one before: the core
    // hands each read on as it arrives, not at the end of the body.
    let (gate_tx, gate_rx) = mpsc::channel::<()>();
    let gate_rx = Arc::new(std::sync::Mutex::new(gate_rx));
    let (url, _) = server(move |mut s| {
        read_request(&mut s).unwrap();
        s.write_all(SSE_HEAD).unwrap();
        s.write_all(&chunk(EVENT)).unwrap();
        gate_rx.lock().unwrap().recv().unwrap();
        // An event split across two reads, then the usage chunk and [DONE].
        s.write_all(&chunk(&EVENT[..20])).unwrap();
        s.flush().unwrap();
        gate_rx.lock().unwrap().recv().unwrap();
        s.write_all(&chunk(&EVENT[20..])).unwrap();
        s.write_all(&chunk(b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":2}}\n\n")).unwrap();
        s.write_all(&chunk(b"data: [DONE]\n\n")).unwrap();
        s.write_all(b"0\r\n\r\n").unwrap();
        until_closed(&mut s);
    });
    let up = Upstreams::new(1).unwrap();
    let c = up.add_client(&spec()).unwrap();
    let mut col = Collector::new(&up);
    let id = send(&up, c, &url, stream_spec());
    let first = col.until_count(id, 2);
    assert!(matches!(first[0], Event::Head { status: 200, sse: true, .. }), "{first:?}");
    let rewritten = b"data: {\"service_tier\":\"priority\",\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"hi\"}}]}\n\n";
    match &first[1] {
        Event::Chunk { batch, end: false, .. } => {
            assert_eq!(batch.out, rewritten.to_vec());
            assert_eq!(batch.tokens, 1);
        }
        other => panic!("{other:?}"),
    }
    gate_tx.send(()).unwrap();
    gate_tx.send(()).unwrap();
    let ev = col.until_end(id);
    let mut out = Vec::new();
    let mut tokens = 0;
    let mut handed = Vec::new();
    for e in &ev[2..] {
        let Event::Chunk { batch, .. } = e else { panic!("{e:?}") };
        out.extend_from_slice(&batch.out);
        tokens += batch.tokens;
        handed.extend(batch.handed.iter().map(|h| h.payload.clone()));
    }
    assert_eq!(out, rewritten.to_vec());
    assert_eq!(tokens, 1);
    // The usage chunk is handed back to Python, which prices it.
    assert_eq!(handed, vec![b"{\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":2}}".to_vec()]);
    let Event::Chunk { batch, end: true, .. } = ev.last().unwrap() else { panic!() };
    assert_eq!(batch.state(), State::Done);
}

#[test]
fn a_reset_mid_stream_is_a_body_failure_after_what_arrived() {
    let (url, _) = server(|mut s| {
        read_request(&mut s).unwrap();
        s.write_all(SSE_HEAD).unwrap();
        s.write_all(&chunk(EVENT)).unwrap();
        s.flush().unwrap();
        std::thread::sleep(Duration::from_millis(50));
        reset(s);
    });
    let up = Upstreams::new(1).unwrap();
    let c = up.add_client(&spec()).unwrap();
    let mut col = Collector::new(&up);
    let id = send(&up, c, &url, stream_spec());
    let ev = col.until_end(id);
    assert!(matches!(ev[0], Event::Head { status: 200, sse: true, .. }), "{ev:?}");
    let tokens: u64 = ev.iter().map(|e| if let Event::Chunk { batch, .. } = e { batch.tokens } else { 0 }).sum();
    assert_eq!(tokens, 1, "{ev:?}");
    assert!(matches!(ev.last(), Some(Event::Failed { failure: Failure::Body, .. })), "{ev:?}");
}

#[test]
fn an_upstream_silent_past_the_read_timeout_times_out_before_and_after_the_head() {
    let (url, _) = server(|mut s| {
        let req = read_request(&mut s).unwrap();
        if String::from_utf8_lossy(&req).contains("x-mid: 1") {
            s.write_all(SSE_HEAD).unwrap();
            s.write_all(&chunk(EVENT)).unwrap();
        }
        until_closed(&mut s);
    });
    let up = Upstreams::new(1).unwrap();
    let c = up.add_client(&ClientSpec { read_timeout: Some(Duration::from_millis(200)), ..spec() }).unwrap();
    let mut col = Collector::new(&up);
    let id = send(&up, c, &url, None);
    let ev = col.until_end(id);
    assert!(matches!(&ev[..], [Event::Failed { failure: Failure::Timeout, .. }]), "{ev:?}");
    let id = up.send(c, &url, &[("x-mid", "1")], b"{}".to_vec(), stream_spec()).unwrap();
    let ev = col.until_end(id);
    assert!(matches!(ev[0], Event::Head { status: 200, .. }), "{ev:?}");
    assert!(matches!(ev.last(), Some(Event::Failed { failure: Failure::Timeout, .. })), "{ev:?}");
}

#[test]
fn a_body_read_whole_comes_with_its_head_in_one_wake_up() {
    // The head first, the body 150 ms later: the loop is woken once, for both.
    let (url, _) = server(|mut s| {
        while read_request(&mut s).is_some() {
            s.write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n").unwrap();
            s.flush().unwrap();
            std::thread::sleep(Duration::from_millis(150));
            s.write_all(b"{}").unwrap();
        }
    });
    let up = Upstreams::new(1).unwrap();
    let c = up.add_client(&spec()).unwrap();
    let mut col = Collector::new(&up);
    let id = send(&up, c, &url, None);
    let ev = col.until_end(id);
    assert!(matches!(&ev[..], [Event::Head { status: 200, sse: false, .. }, Event::Body { body, .. }] if body == b"{}"), "{ev:?}");
    assert_eq!(col.wakeups, 1);
}

#[test]
fn a_malformed_status_line_or_chunked_encoding_fails_the_request() {
    let (url, _) = server(|mut s| {
        let req = read_request(&mut s).unwrap();
        if String::from_utf8_lossy(&req).contains("x-case: status") {
            s.write_all(b"HTTP/1.1 2x0 NOPE\r\ncontent-length: 2\r\n\r\n{}").unwrap();
        } else {
            s.write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n").unwrap();
            s.write_all(b"zz\r\n{}\r\n0\r\n\r\n").unwrap();
        }
        until_closed(&mut s);
    });
    let up = Upstreams::new(1).unwrap();
    let c = up.add_client(&spec()).unwrap();
    let mut col = Collector::new(&up);
    let id = up.send(c, &url, &[("x-case", "status")], b"{}".to_vec(), None).unwrap();
    let ev = col.until_end(id);
    assert!(matches!(&ev[..], [Event::Failed { failure: Failure::Protocol, .. }]), "{ev:?}");
    let id = up.send(c, &url, &[("x-case", "chunked")], b"{}".to_vec(), None).unwrap();
    let ev = col.until_end(id);
    // Bad chunked framing is a malformed answer too (Protocol), not a body cut
    // short (Body); a body read whole goes with its head, so no head came.
    assert!(matches!(&ev[..], [Event::Failed { failure: Failure::Protocol, .. }]), "{ev:?}");
}

#[test]
fn a_refused_connection_is_a_connect_failure_and_a_bad_url_is_refused_at_once() {
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    }; // closed again: nothing listens there
    let up = Upstreams::new(1).unwrap();
    let c = up.add_client(&spec()).unwrap();
    let mut col = Collector::new(&up);
    let id = send(&up, c, &format!("http://127.0.0.1:{port}/v1/x"), None);
    let ev = col.until_end(id);
    assert!(matches!(&ev[..], [Event::Failed { failure: Failure::Connect, .. }]), "{ev:?}");
    assert!(up.send(c, "ftp://127.0.0.1/x", &[], vec![], None).is_err());
    assert!(up.send(c, "not a url", &[], vec![], None).is_err());
    assert!(up.send(c + 1, "http://127.0.0.1/x", &[], vec![], None).is_err());
    assert!(up.send(c, "http://127.0.0.1/x", &[("bad name", "v")], vec![], None).is_err());
}

#[test]
fn requests_in_flight_never_pass_the_connection_bound() {
    let active = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let (a, m) = (active.clone(), most.clone());
    let (url, accepts) = server(move |mut s| {
        while read_request(&mut s).is_some() {
            let now = a.fetch_add(1, Ordering::SeqCst) + 1;
            m.fetch_max(now, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(30));
            a.fetch_sub(1, Ordering::SeqCst);
            s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}").unwrap();
        }
    });
    let up = Upstreams::new(2).unwrap();
    let c = up.add_client(&ClientSpec { max_connections: 2, ..spec() }).unwrap();
    let mut col = Collector::new(&up);
    let ids: Vec<u64> = (0..8).map(|_| send(&up, c, &url, None)).collect();
    for id in ids {
        let ev = col.until_end(id);
        assert!(matches!(&ev[..], [Event::Head { status: 200, .. }, Event::Body { .. }]), "{ev:?}");
    }
    assert!(most.load(Ordering::SeqCst) <= 2, "{} at once", most.load(Ordering::SeqCst));
    assert!(accepts.load(Ordering::SeqCst) <= 2);
    // Eight answers, fewer wake-ups than events: each batch is one eventfd write.
    assert!(col.wakeups <= 16, "{} wake-ups", col.wakeups);
}

#[test]
fn a_cancelled_stream_closes_its_connection() {
    let (closed_tx, closed_rx) = mpsc::channel::<()>();
    let closed_tx = std::sync::Mutex::new(closed_tx);
    let (url, _) = server(move |mut s| {
        read_request(&mut s).unwrap();
        s.write_all(SSE_HEAD).unwrap();
        s.write_all(&chunk(EVENT)).unwrap();
        until_closed(&mut s);
        closed_tx.lock().unwrap().send(()).unwrap();
    });
    let up = Upstreams::new(1).unwrap();
    let c = up.add_client(&spec()).unwrap();
    let mut col = Collector::new(&up);
    let id = send(&up, c, &url, stream_spec());
    col.until_count(id, 2);
    assert_eq!(up.in_flight(), 1);
    up.cancel(id);
    closed_rx.recv_timeout(WAIT).expect("the upstream connection closed");
    assert_eq!(up.in_flight(), 0);
    up.cancel(id); // twice is a no-op
}

#[test]
fn a_stream_nobody_acknowledges_pauses_after_the_window() {
    // 64 KiB events, endlessly: without acks the core stops reading after
    // about STREAM_WINDOW; each ack lets it on again.
    let big = {
        let mut e = b"data: {\"choices\":[{\"delta\":{\"content\":\"".to_vec();
        e.extend(std::iter::repeat_n(b'a', 64 * 1024));
        e.extend_from_slice(b"\"}}]}\n\n");
        e
    };
    let (url, _) = server(move |mut s| {
        read_request(&mut s).unwrap();
        s.write_all(SSE_HEAD).unwrap();
        while s.write_all(&chunk(&big)).is_ok() {}
    });
    let up = Upstreams::new(1).unwrap();
    let c = up.add_client(&spec()).unwrap();
    let mut col = Collector::new(&up);
    let id = send(&up, c, &url, stream_spec());
    let bytes = |col: &Collector<'_>| -> u64 {
        col.seen[&id].iter().map(|e| if let Event::Chunk { batch, .. } = e { batch.out.len() as u64 } else { 0 }).sum()
    };
    col.until_count(id, 2);
    // Let it run until it stops growing (bounded: the window plus one read).
    let mut prev = u64::MAX;
    let t0 = Instant::now();
    while bytes(&col) != prev {
        prev = bytes(&col);
        std::thread::sleep(Duration::from_millis(100));
        col.poll_once();
        assert!(t0.elapsed() < WAIT);
    }
    let paused = bytes(&col);
    assert!(paused <= tierq_core::upstream::STREAM_WINDOW + 2 * 70 * 1024, "{paused} bytes unacknowledged");
    up.ack(id, paused);
    let t0 = Instant::now();
    while bytes(&col) <= paused {
        assert!(t0.elapsed() < WAIT, "no read after the ack");
        col.poll_once();
    }
    up.cancel(id);
}

mod tls {
    use super::*;
    use http_body_util::Full;
    use hyper::body::Bytes;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    use tokio_rustls::rustls;

    /// A test CA and a localhost certificate it signed: (CA PEM, cert DER, key DER).
    fn test_ca() -> (String, Vec<u8>, Vec<u8>) {
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
        let leaf_key = KeyPair::generate().unwrap();
        let leaf = CertificateParams::new(vec!["localhost".to_string()]).unwrap()
            .signed_by(&leaf_key, &ca).unwrap();
        (ca.pem(), leaf.der().to_vec(), leaf_key.serialize_der())
    }

    /// hyper serving TLS (ALPN h2 and http/1.1) on loopback; answers with the
    /// request's HTTP version. Returns the base URL (https://localhost:port).
    fn tls_server(cert: Vec<u8>, key: Vec<u8>) -> String {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        listener.set_nonblocking(true).unwrap();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
            rt.block_on(async move {
                let mut cfg = rustls::ServerConfig::builder()
                    .with_no_client_auth()
                    .with_single_cert(
                        vec![rustls::pki_types::CertificateDer::from(cert)],
                        rustls::pki_types::PrivateKeyDer::Pkcs8(key.into()),
                    )
                    .unwrap();
                cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
                let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                loop {
                    let (tcp, _) = listener.accept().await.unwrap();
                    let acceptor = acceptor.clone();
                    tokio::spawn(async move {
                        let Ok(tls) = acceptor.accept(tcp).await else { return };
                        let svc = hyper::service::service_fn(|req: hyper::Request<hyper::body::Incoming>| async move {
                            let body = format!("{{\"version\":\"{:?}\"}}", req.version());
                            Ok::<_, std::convert::Infallible>(
                                hyper::Response::builder()
                                    .header("content-type", "application/json")
                                    .body(Full::new(Bytes::from(body)))
                                    .unwrap(),
                            )
                        });
                        let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                            .serve_connection(TokioIo::new(tls), svc)
                            .await;
                    });
                }
            });
        });
        format!("https://localhost:{port}/v1/chat/completions")
    }

    #[test]
    fn a_tls_upstream_with_a_test_ca_is_reached_over_http2_and_refused_without_it() {
        let (ca, cert, key) = test_ca();
        let url = tls_server(cert, key);
        let up = Upstreams::new(1).unwrap();
        let trusted = up.add_client(&ClientSpec { ca_pem: Some(ca.into_bytes()), ..spec() }).unwrap();
        let system = up.add_client(&spec()).unwrap();
        let mut col = Collector::new(&up);
        for _ in 0..2 {
            let id = send(&up, trusted, &url, None);
            let ev = col.until_end(id);
            match &ev[..] {
                [Event::Head { status: 200, .. }, Event::Body { body, .. }] => {
                    assert_eq!(body, br#"{"version":"HTTP/2.0"}"#)
                }
                other => panic!("{other:?}"),
            }
        }
        let id = send(&up, system, &url, None);
        let ev = col.until_end(id);
        assert!(matches!(&ev[..], [Event::Failed { failure: Failure::Connect, .. }]), "{ev:?}");
        assert!(up.add_client(&ClientSpec { ca_pem: Some(b"not pem".to_vec()), ..spec() }).is_err());
    }
}

#[test]
fn a_stream_read_to_its_done_leaves_the_connection_for_the_next_request() {
    let (url, accepts) = server(|mut s| {
        while read_request(&mut s).is_some() {
            s.write_all(SSE_HEAD).unwrap();
            s.write_all(&chunk(EVENT)).unwrap();
            s.write_all(&chunk(b"data: [DONE]\n\n")).unwrap();
            s.write_all(b"0\r\n\r\n").unwrap();
        }
    });
    let up = Upstreams::new(1).unwrap();
    let c = up.add_client(&spec()).unwrap();
    let mut col = Collector::new(&up);
    for _ in 0..3 {
        let id = send(&up, c, &url, stream_spec());
        let ev = col.until_end(id);
        let Some(Event::Chunk { batch, end: true, .. }) = ev.last() else { panic!("{ev:?}") };
        assert_eq!(batch.state(), State::Done);
        // The rest of the body is read after [DONE] is reported: wait for it.
        let t0 = Instant::now();
        while up.in_flight() != 0 {
            assert!(t0.elapsed() < WAIT);
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    assert_eq!(accepts.load(Ordering::SeqCst), 1, "three streams, one kept-alive connection");
}
