"""OpenTelemetry traces ([tracing]): a request's W3C trace context, decided at
intake, and its spans, built after it ends from what its outcome recorded and
sent to an OTLP/HTTP collector in protobuf batches by one thread.

The event loop only parses or makes a `traceparent` and, for a sampled request,
appends one tuple to a deque; attributes, protobuf and HTTP are the thread's.
opentelemetry-proto (the `tierq[otel]` extra) is imported when that thread
starts, never by a gateway without [tracing].
"""

from __future__ import annotations

import collections
import http.client
import logging
import random
import re
import threading
import time
from typing import Any, Final, NamedTuple

import yarl

from tierq.config import TracingConfig
from tierq.pricing import femto_text

__all__ = [
    "OPERATIONS",
    "TRACEPARENT",
    "TRACESTATE",
    "Ended",
    "TraceContext",
    "Tracer",
    "require_otel",
    "response_model",
    "traces_url",
]

log = logging.getLogger("tierq.tracing")

TRACEPARENT: Final = "traceparent"
TRACESTATE: Final = "tracestate"
# gen_ai.operation.name of each endpoint (its key in tierq.intake.ENDPOINT_PATHS).
OPERATIONS: Final = {"chat/completions": "chat", "completions": "text_completion",
                     "embeddings": "embeddings"}
# W3C Trace Context: version-traceid-parentid-flags, lower-case hex. A later
# version may append fields after a dash; version 00 may not.
_TRACEPARENT: Final = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?")
_MASK64: Final = (1 << 64) - 1
# What the thread keeps waiting when the collector is slow or gone: past it,
# ended spans are dropped (and counted), never queued without bound.
MAX_QUEUE: Final = 8192
BATCH: Final = 512
EXPORT_INTERVAL_S: Final = 1.0
_HTTP_TIMEOUT_S: Final = 10.0
# OTLP span kinds and status codes (opentelemetry/proto/trace/v1/trace.proto).
_INTERNAL, _SERVER, _CLIENT = 1, 2, 3
_STATUS_ERROR = 2


class TraceContext(NamedTuple):
    """A request's place in a trace: the trace, the client's span it continues
    (0 for none), its own span, its upstream call's span (the parent the
    upstream is told), whether it is sampled, and the client's tracestate."""

    trace_id: int
    parent_id: int
    span_id: int
    upstream_id: int
    sampled: bool
    tracestate: str | None = None

    def upstream_headers(self) -> dict[str, str]:
        """The trace context sent upstream: the upstream call's span as parent."""
        h = {TRACEPARENT: f"00-{self.trace_id:032x}-{self.upstream_id:016x}-"
                          f"{'01' if self.sampled else '00'}"}
        if self.tracestate is not None:
            h[TRACESTATE] = self.tracestate
        return h


class Ended(NamedTuple):
    """What a sampled request's outcome recorded (tierq.outcome), in plain
    values: the thread turns it into spans. Times are monotonic seconds (0.0:
    never happened) beside the wall clock of `t0` (`ts`)."""

    ctx: TraceContext
    endpoint: str
    provider: str  # the upstream's kind
    model: str  # the model asked for
    upstream_model: str
    response_model: str | None
    requested_tier: str | None
    tier: str  # the applied tier: the lane
    status: str  # the ledger's
    code: str | None
    http_status: int
    prompt_tokens: int
    completion_tokens: int
    billed: bool
    cost_femto: int
    ttft_s: float | None
    queue_ms: float
    limit: int
    request_id: str
    upstream: str
    upstream_url: str
    t0: float
    ts: float
    queued_at: float
    admitted_at: float
    upstream_at: float
    end: float
    tier_reason: str | None = None  # a downgrade's reason (ramp, budget)


def traces_url(endpoint: str) -> str:
    """Where spans are posted: the endpoint as given when it has a path, else its /v1/traces."""
    url = yarl.URL(endpoint)
    return str(url.with_path("/v1/traces")) if url.path in ("", "/") else endpoint


def parse_traceparent(value: str | None) -> tuple[int, int, bool] | None:
    """(trace id, parent span id, sampled) of a valid W3C traceparent, else None
    (an invalid one is ignored, as the spec says: a new trace is started)."""
    if value is None:
        return None
    m = _TRACEPARENT.fullmatch(value.strip())
    if m is None:
        return None
    version, trace, parent, flags, rest = m.groups()
    if version == "ff" or (version == "00" and rest is not None):
        return None
    trace_id, parent_id = int(trace, 16), int(parent, 16)
    if trace_id == 0 or parent_id == 0:
        return None
    return trace_id, parent_id, bool(int(flags, 16) & 1)


def require_otel() -> None:
    """Refuse [tracing] when opentelemetry-proto (the `otel` extra) cannot be
    imported: RuntimeError, one line naming the extra, before anything listens."""
    try:
        import opentelemetry.proto.collector.trace.v1.trace_service_pb2  # noqa: F401
    except ImportError as e:
        raise RuntimeError(f"[tracing] needs opentelemetry-proto: pip install 'tierq[otel]' ({e})") \
            from None


def _span_id() -> int:
    return random.getrandbits(64) or 1


def response_model(data: bytes) -> str | None:
    """The `model` of the first stream event in `data` (an OpenAI chunk names
    it), read without parsing the JSON; None if it is not there."""
    at = data.find(b'"model":')
    if at < 0:
        return None
    start = data.find(b'"', at + 8)
    end = data.find(b'"', start + 1) if start >= 0 else -1
    if end < 0 or data.find(b"\\", start, end) >= 0:
        return None
    return data[start + 1:end].decode("utf-8", "replace")


class Tracer:
    """One process's trace context decisions and its span exporter thread."""

    def __init__(self, config: TracingConfig) -> None:
        self.config = config
        self.url = traces_url(config.otlp_endpoint)
        # TraceIdRatioBased: a root is sampled when its trace id's low 64 bits
        # are under ratio * 2^64, so every service deciding the same way agrees.
        self._bound = int(config.sample_ratio * (1 << 64))
        self._queue: collections.deque[Ended] = collections.deque()
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._idle = threading.Condition()
        self._busy = 0  # spans taken by the thread and not yet sent
        # Counted in requests (each one's spans go together).
        self.exported = 0  # the collector took them
        self.dropped = 0  # dropped: the queue was full, or the collector failed
        self.export_errors = 0

    # ------------------------------------------------------------ on the loop

    def begin(self, traceparent: str | None, tracestate: str | None) -> TraceContext:
        """The trace context of a request with these headers: the client's
        continued (its sampled flag decides), else a new trace sampled at
        `sample_ratio`."""
        parsed = parse_traceparent(traceparent)
        if parsed is not None:
            trace_id, parent_id, sampled = parsed
            return TraceContext(trace_id, parent_id, _span_id(), _span_id(), sampled,
                                tracestate or None)
        trace_id = random.getrandbits(128) or 1
        return TraceContext(trace_id, 0, _span_id(), _span_id(),
                            (trace_id & _MASK64) < self._bound)

    def end(self, ended: Ended) -> None:
        """Queue a sampled request's spans (one deque append; the thread is woken
        only when a batch is full)."""
        queue = self._queue
        if len(queue) >= MAX_QUEUE:
            self.dropped += 1
            return
        queue.append(ended)
        if len(queue) == BATCH:
            self._wake.set()

    # ------------------------------------------------------------ the thread

    def start(self) -> None:
        """Starts the exporter thread (imports opentelemetry-proto: `tierq[otel]`)."""
        require_otel()
        log.info("tracing: spans to %s, sample_ratio %g for requests without a traceparent",
                 self.url, self.config.sample_ratio)
        self._thread = threading.Thread(target=self._run, name="tierq-otlp", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Sends what is queued, then stops the thread (blocking: call off the loop)."""
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Blocks until everything queued so far was sent (or failed); False on timeout."""
        deadline = time.monotonic() + timeout_s
        self._wake.set()
        with self._idle:
            while self._queue or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._wake.set()
                self._idle.wait(min(left, 0.05))
        return True

    def _run(self) -> None:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import \
            ExportTraceServiceRequest
        conn: http.client.HTTPConnection | None = None
        url = yarl.URL(self.url)
        path = url.raw_path_qs or "/v1/traces"
        failing = False
        while True:
            self._wake.wait(EXPORT_INTERVAL_S)
            self._wake.clear()
            while self._queue:
                batch: list[Ended] = []
                with self._idle:
                    while self._queue and len(batch) < BATCH:
                        batch.append(self._queue.popleft())
                    self._busy = len(batch)
                try:
                    body = self._encode(ExportTraceServiceRequest(), batch)
                    if conn is None:
                        cls = (http.client.HTTPSConnection if url.scheme == "https"
                               else http.client.HTTPConnection)
                        conn = cls(url.raw_host or "", url.port, timeout=_HTTP_TIMEOUT_S)
                    conn.request("POST", path, body, {"Content-Type": "application/x-protobuf"})
                    resp = conn.getresponse()
                    resp.read()
                    if not 200 <= resp.status < 300:
                        raise OSError(f"HTTP {resp.status}")
                    self.exported += len(batch)
                    if failing:
                        log.warning("tracing: the collector at %s takes spans again", self.url)
                        failing = False
                except (OSError, http.client.HTTPException) as e:
                    self.export_errors += 1
                    self.dropped += len(batch)
                    if conn is not None:
                        conn.close()
                        conn = None
                    if not failing:  # one line when it starts failing, one when it recovers
                        log.warning("tracing: the spans of %d requests dropped, the collector at %s "
                                    "failed: %s",
                                    len(batch), self.url, e)
                        failing = True
                finally:
                    with self._idle:
                        self._busy = 0
                        self._idle.notify_all()
            if self._stopping:
                if conn is not None:
                    conn.close()
                return

    def _encode(self, req: Any, batch: list[Ended]) -> bytes:
        rs = req.resource_spans.add()
        _attrs(rs.resource.attributes, {"service.name": self.config.service_name,
                                        "telemetry.sdk.name": "tierq",
                                        "telemetry.sdk.language": "python"})
        ss = rs.scope_spans.add()
        ss.scope.name = "tierq"
        for e in batch:
            _spans(ss.spans, e)
        return bytes(req.SerializeToString())


def _wall_ns(e: Ended, mono: float) -> int:
    return int((e.ts + (mono - e.t0)) * 1e9)


def _spans(out: Any, e: Ended) -> None:
    """The request's span and its children (the wait in the lane, the upstream call)."""
    ctx = e.ctx
    trace_id = ctx.trace_id.to_bytes(16, "big")
    operation = OPERATIONS[e.endpoint]
    end_ns = _wall_ns(e, e.end)
    attrs: dict[str, str | int | float] = {
        "gen_ai.operation.name": operation,
        "gen_ai.provider.name": e.provider,
        "gen_ai.request.model": e.model,
        "openai.response.service_tier": e.tier,
        "tierq.lane": e.tier,
        "tierq.queue_ms": e.queue_ms,
        "tierq.pool.limit": e.limit,
        "tierq.request_id": e.request_id,
        "tierq.status": e.status,
        "http.response.status_code": e.http_status,
    }
    if e.response_model is not None:
        attrs["gen_ai.response.model"] = e.response_model
    if e.requested_tier is not None:
        attrs["openai.request.service_tier"] = e.requested_tier
    if e.billed:
        attrs["gen_ai.usage.input_tokens"] = e.prompt_tokens
        attrs["gen_ai.usage.output_tokens"] = e.completion_tokens
        attrs["tierq.cost_usd"] = femto_text(e.cost_femto)
    if e.ttft_s is not None:
        attrs["gen_ai.response.time_to_first_chunk"] = e.ttft_s
    failed = e.status != "served"
    if failed:
        attrs["error.type"] = e.code or e.status
    if e.status == "shed" and e.code is not None:
        attrs["tierq.shed_code"] = e.code
    if e.tier_reason is not None:
        attrs["tierq.downgrade_reason"] = e.tier_reason
    span = _span(out, trace_id, ctx.span_id, ctx.parent_id, f"{operation} {e.model}", _SERVER,
                 int(e.ts * 1e9), end_ns, attrs)
    if e.status == "failed" or e.http_status >= 500:
        span.status.code = _STATUS_ERROR
        span.status.message = e.code or e.status
    if e.queued_at:
        wait_end = e.admitted_at or e.upstream_at or e.end
        _span(out, trace_id, _span_id(), ctx.span_id, f"wait {e.tier}", _INTERNAL,
              _wall_ns(e, e.queued_at), _wall_ns(e, wait_end),
              {"tierq.lane": e.tier, "tierq.queue_ms": e.queue_ms})
    if e.upstream_at:
        url = yarl.URL(e.upstream_url)
        up: dict[str, str | int | float] = {
            "gen_ai.operation.name": operation, "gen_ai.provider.name": e.provider,
            "gen_ai.request.model": e.upstream_model, "tierq.upstream": e.upstream}
        if url.host:
            up["server.address"] = url.host
            if url.port is not None:
                up["server.port"] = url.port
        if e.response_model is not None:
            up["gen_ai.response.model"] = e.response_model
        _span(out, trace_id, ctx.upstream_id, ctx.span_id, f"{operation} {e.upstream_model}",
              _CLIENT, _wall_ns(e, e.upstream_at), end_ns, up)


def _span(out: Any, trace_id: bytes, span_id: int, parent_id: int, name: str, kind: int,
          start_ns: int, end_ns: int, attrs: dict[str, str | int | float]) -> Any:
    s = out.add()
    s.trace_id = trace_id
    s.span_id = span_id.to_bytes(8, "big")
    if parent_id:
        s.parent_span_id = parent_id.to_bytes(8, "big")
    s.name = name
    s.kind = kind
    s.start_time_unix_nano = start_ns
    s.end_time_unix_nano = max(start_ns, end_ns)
    _attrs(s.attributes, attrs)
    return s


def _attrs(out: Any, attrs: dict[str, str | int | float]) -> None:
    for k, v in attrs.items():
        kv = out.add()
        kv.key = k
        if isinstance(v, str):
            kv.value.string_value = v
        elif isinstance(v, bool):
            kv.value.bool_value = v
        elif isinstance(v, int):
            kv.value.int_value = v
        else:
            kv.value.double_value = v
