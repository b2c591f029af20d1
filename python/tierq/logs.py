"""Structured logs: one JSON object per line, a request id on every request.

`request_log` (an aiohttp middleware) gives each request a `RequestInfo`: the
gateway's own id (the ledger's key) and the `x-request-id` the response echoes
(the client's, when it sent a sane one). Each request gets one access line on
the `tierq.access` logger: written with the request's outcome (tierq.outcome)
when it has one, else by the middleware at the end. Headers are never logged, and `JsonFormatter`
masks anything shaped like a credential, so no key reaches a log.

Access lines are formatted and written off the event loop: the loop only
captures the values a line needs (`access_line`) and appends them to a queue
that a writer thread drains in batches (`AccessWriter`). `flush_access_log()`
writes whatever is queued; `tierq serve` calls it once the server has stopped,
and at interpreter exit, so no line is lost at shutdown.
"""

from __future__ import annotations

import asyncio
import atexit
import functools
import logging
import os
import re
import sys
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Final, TypeGuard

import orjson
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from tierq._core import access_json

if TYPE_CHECKING:
    from tierq.ledger import LedgerRow

__all__ = [
    "REQUEST_ID_HEADER",
    "REQUEST_INFO",
    "JsonFormatter",
    "RequestInfo",
    "AccessWriter",
    "ServerLog",
    "access_enabled",
    "AccessFields",
    "access_fields",
    "access_formatted",
    "access_line",
    "configure_logging",
    "flush_access_log",
    "redact",
    "request_info",
    "request_log",
]

REQUEST_ID_HEADER: Final = "x-request-id"
access_log = logging.getLogger("tierq.access")

# A client's id is echoed only if it is short and plain: it ends up in headers
# and logs, so nothing that could smuggle a newline, a quote or a secret-sized blob.
_CLIENT_ID: Final = re.compile(r"[A-Za-z0-9._:/+=@-]{1,128}")


@dataclass(slots=True)
class RequestInfo:
    """One request's ids, and whether its access line is written."""

    id: str  # the gateway's id: the ledger's request_id, unique
    echo: str  # the x-request-id of the response: the client's if valid, else `id`
    logged: bool = False
    # The sha256 of the config that priced it: the one the serving worker held
    # when it was admitted (a reload may come while it waits or runs).
    config: str | None = None

    @classmethod
    def new(cls, client_id: str | None) -> RequestInfo:
        rid = new_request_id()
        if client_id is not None and _CLIENT_ID.fullmatch(client_id):
            return cls(rid, client_id)
        return cls(rid, rid)


def new_request_id() -> str:
    """A unique, time-ordered id: microseconds since the epoch, then 80 random bits.

    Time-ordered so the ledger's primary-key index grows at its right edge
    instead of taking random inserts (a uuid4 key slows every insert as the
    ledger grows); random so ids from several workers never collide.
    """
    return f"req_{time.time_ns() // 1000:013x}{os.urandom(10).hex()}"


REQUEST_INFO: Final = web.RequestKey("tierq.request_info", RequestInfo)


def request_info(request: web.Request) -> RequestInfo:
    """The request's ids (made here if the middleware did not run)."""
    info = request.get(REQUEST_INFO)
    if info is None:
        info = RequestInfo.new(request.headers.get(REQUEST_ID_HEADER))
        request[REQUEST_INFO] = info
    return info


_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def request_log(request: web.Request, handler: _Handler) -> web.StreamResponse:
    """Ids in, `x-request-id` out, one access line per request."""
    t0 = time.monotonic()
    info = RequestInfo.new(request.headers.get(REQUEST_ID_HEADER))
    request[REQUEST_INFO] = info
    status = 500
    try:
        resp = await handler(request)
        status = resp.status
        if not resp.prepared and REQUEST_ID_HEADER not in resp.headers:
            resp.headers[REQUEST_ID_HEADER] = info.echo
        return resp
    except web.HTTPException as e:
        status = e.status
        e.headers.setdefault(REQUEST_ID_HEADER, info.echo)
        raise
    except (asyncio.CancelledError, ConnectionResetError):
        status = 499  # the client went away before an answer (nginx's convention)
        raise
    finally:
        if not info.logged and access_log.isEnabledFor(logging.INFO):
            access_line(request, info, status, time.monotonic() - t0)


def access_enabled() -> bool:
    return access_log.isEnabledFor(logging.INFO)


def access_line(request: web.Request, info: RequestInfo, status: int, duration_s: float,
                row: LedgerRow | None = None, shadow: tuple[str, ...] = ()) -> None:
    """Queue the request's one access line, with its outcome's fields (`row`) when
    it has one and the decisions limits in shadow mode made for it and did not
    apply (`shadow`, tierq.shadow's names). Only what the line needs is captured
    here, on the loop; the writer thread builds and formats it."""
    info.logged = True
    # The path only: a query string may carry a forward target, and headers may
    # carry keys; neither is logged.
    _writer.put((time.time(), info.id, info.echo, request.method, request.rel_url.path, status,
                 duration_s, request.remote, row, shadow, info.config, None))


def access_fields(request: web.Request, info: RequestInfo, status: int, duration_s: float,
                  shadow: tuple[str, ...]) -> AccessFields:
    """The access line's own fields as the core's Finisher formats the line with
    its row (tierq.ledger.Ledger.finish_nowait): `access_line`'s, the ending
    time first. `access_formatted` then queues the line it made."""
    return (time.time(), info.echo, request.method, request.rel_url.path, status, duration_s,
            request.remote, ",".join(shadow) if shadow else None, info.config)


def access_formatted(info: RequestInfo, fields: AccessFields, row: Callable[[], LedgerRow],
                     shadow: tuple[str, ...], line: str | None) -> None:
    """Queue the line the core formatted from `fields` (`access_fields`) and its
    row; `row` makes the row for the handlers that format lines themselves, and
    for a line the core left to Python (`line` None)."""
    info.logged = True
    ts, echo, method, path, status, duration_s, remote, _, config = fields
    _writer.put((ts, info.id, echo, method, path, status, duration_s, remote, row, shadow, config,
                 line))


# The Finisher's access fields: (ts, echoed id, method, path, status, duration s,
# remote, shadow decisions joined or None, config sha256 or None).
AccessFields = tuple[float, str, str, str, int, float, "str | None", "str | None", "str | None"]
# (ts, request id, echoed id, method, path, status, duration s, remote, row (or what
# makes it) or None, shadow decisions, config sha256 or None, the line the core
# formatted or None)
_Captured = tuple[float, str, str, str, str, int, float, "str | None",
                  "LedgerRow | Callable[[], LedgerRow] | None", tuple[str, ...], "str | None",
                  "str | None"]


def _record(c: _Captured) -> logging.LogRecord:
    ts, rid, echo, method, path, status, duration_s, remote, row, shadow, config = c[:11]
    if callable(row):
        row = row()
    fields: dict[str, Any] = {
        "request_id": rid, "method": method, "path": path,
        "status": status, "duration_ms": round(duration_s * 1000, 3), "remote": remote,
    }
    if echo != rid:
        fields["client_request_id"] = echo
    if row is not None:
        fields.update({
            "model": row.model, "key_id": row.key_id, "requested_tier": row.requested_tier,
            "tier": row.applied_tier, "outcome": row.status, "code": row.code,
            "queue_ms": round(row.queue_ms, 3), "prompt_tokens": row.prompt_tokens,
            "completion_tokens": row.completion_tokens, "cost": format(row.cost, "f")})
        if row.fairness_id is not None:
            fields["fairness_id"] = row.fairness_id
        if row.tier_reason is not None:
            fields["tier_reason"] = row.tier_reason
    if shadow:
        # A string: the decision names, comma-separated (every field is a scalar).
        fields["shadow"] = ",".join(shadow)
    if config:
        fields["config"] = config[:12]
    # makeRecord is what `access_log.info` does, less the walk up the stack for
    # a caller's file and line that an access line does not show.
    record = access_log.makeRecord(access_log.name, logging.INFO, "", 0, "request", (), None,
                                   extra={"fields": fields})
    record.created = ts  # when the request ended, not when the line was written
    record.msecs = (ts - int(ts)) * 1000.0
    return record


def _handlers(logger: logging.Logger, level: int) -> list[logging.Handler]:
    """The handlers a record of `level` on `logger` reaches (Logger.callHandlers' walk)."""
    found: list[logging.Handler] = []
    c: logging.Logger | None = logger
    while c is not None:
        found.extend(h for h in c.handlers if level >= h.level)
        if not c.propagate:
            break
        c = c.parent
    return found


class AccessWriter:
    """The queue of access lines and the thread that writes them, in batches.

    `put` (on the loop) is a deque append; the thread is woken only when the
    queue goes from empty to not empty, waits `gather_s` for more lines to join
    the batch, then formats them and hands them to the handlers: one write per
    batch to a `BatchStreamHandler` (what `configure_logging` installs), one
    per line to any other handler. At most `max_queued` lines wait; beyond
    that (the log's stream stopped taking them) lines are counted and the count
    is written once it drains, so a stuck stderr costs lines, not memory.
    """

    def __init__(self, gather_s: float = 0.02, max_queued: int = 100_000) -> None:
        self.gather_s = gather_s
        self.max_queued = max_queued
        self._queue: deque[_Captured] = deque()
        self._wake = threading.Event()
        self._drain_lock = threading.Lock()  # one drainer at a time: lines stay in order
        self._thread: threading.Thread | None = None
        self.dropped = 0
        self.written = 0

    def put(self, captured: _Captured) -> None:
        q = self._queue
        if len(q) >= self.max_queued:
            self.dropped += 1
            return
        q.append(captured)
        if len(q) == 1:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="tierq-access-log",
                                                daemon=True)
                self._thread.start()
            self._wake.set()

    def after_fork_in_child(self) -> None:
        """A forked worker starts with no thread and none of its parent's lines
        (the parent writes those itself)."""
        self._queue = deque()
        self._wake = threading.Event()
        self._drain_lock = threading.Lock()
        self._thread = None
        self.dropped = 0

    def _run(self) -> None:
        while True:
            self._wake.wait(1.0)
            self._wake.clear()
            if not self._queue:
                continue
            time.sleep(self.gather_s)
            self.flush()

    def flush(self) -> None:
        """Write every queued line now, in the calling thread."""
        with self._drain_lock:
            q = self._queue
            while q:
                batch: list[_Captured] = []
                while q and len(batch) < 1024:
                    batch.append(q.popleft())
                handlers = _handlers(access_log, logging.INFO)
                json_handlers = [h for h in handlers if _formats_as_json(h)]
                if handlers and len(json_handlers) == len(handlers):
                    self._write_json(batch, json_handlers)
                else:
                    self._write([_record(c) for c in batch])
            if self.dropped:
                n, self.dropped = self.dropped, 0
                access_log.warning("%d access lines dropped: the log's stream did not take "
                                   "them fast enough", n)

    def _write_json(self, batch: list[_Captured], handlers: list[BatchStreamHandler]) -> None:
        """The batch for handlers that all write tierq's JSON lines: each line
        formatted once, in the core (no LogRecord, no dict), for every handler."""
        self.written += len(batch)
        lines = []
        for c in batch:
            line = c[11] if len(c) > 11 else None  # the core's line (access_formatted)
            if line is None and not callable(c[8]):
                row, shadow = c[8], c[9]
                line = access_json(c, None if row is None else format(row.cost, "f"),
                                   ",".join(shadow) if shadow else None)
            if line is None:  # a line the redaction may change: Python's formatter
                record = _record(c)
                try:
                    line = _JSON.format(record)
                except Exception:  # noqa: BLE001 - as emit_batch does with a line it cannot format
                    handlers[0].handleError(record)
                    continue
            lines.append(line)
        for h in handlers:
            h.write_lines(lines)

    def _write(self, records: list[logging.LogRecord]) -> None:
        self.written += len(records)
        for h in _handlers(access_log, logging.INFO):
            if isinstance(h, BatchStreamHandler):
                h.emit_batch(records)
            else:
                for r in records:
                    h.handle(r)


_writer: Final = AccessWriter()


def flush_access_log() -> None:
    """Write every access line queued so far (at shutdown, and before reading them)."""
    _writer.flush()


atexit.register(flush_access_log)
os.register_at_fork(after_in_child=_writer.after_fork_in_child)


# ------------------------------------------------------------------ formatting

# Shapes of secrets: tierq keys, bearer tokens, OpenAI/DeepInfra-style keys,
# passwords in URLs. Masked wherever they appear in a message or a field.
_SECRETS: Final = (
    (re.compile(r"\btq-([a-z0-9]{12})-[A-Za-z0-9_-]{8,}"), r"tq-\1-***"),
    (re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]+"), r"\1 ***"),
    (re.compile(r"\bsk-[A-Za-z0-9_-]{8,}"), "sk-***"),
    (re.compile(r"(?i)\b(api[_-]?key|token|secret|password)=([^&\s\"']+)"), r"\1=***"),
    (re.compile(r"://([^/@\s:]+):([^/@\s]+)@"), r"://\1:***@"),
)


# Every pattern above needs one of these substrings (in lower case): one search
# rules out the five substitutions for the plain strings that make up almost
# every log field. On the lowered text, as re.IGNORECASE is ~6x slower here.
_SUSPECT: Final = re.compile(r"tq-|sk-|://|bearer|basic|api[_-]?key|token|secret|password")


def redact(text: str) -> str:
    """`text` with anything credential-shaped masked."""
    if _SUSPECT.search(text.lower()) is None:
        return text
    for pattern, repl in _SECRETS:
        text = pattern.sub(repl, text)
    return text


def _clean(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if value is None or isinstance(value, (bool, int, float)):
        return value
    return redact(str(value))


@functools.lru_cache(maxsize=4)
def _iso_second(second: int) -> str:
    return datetime.fromtimestamp(second, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")


def _iso_ms(t: float) -> str:
    """`t` (epoch seconds) as UTC ISO 8601 with milliseconds: 2026-11-22T02:31:01.123Z.
    The second is formatted once per second, not once per line."""
    second = int(t)
    return f"{_iso_second(second)}.{min(999, int((t - second) * 1000)):03d}Z"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, then the record's fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": _iso_ms(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": redact(record.getMessage()),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            for k, v in fields.items():
                out.setdefault(str(k), _clean(v))
        if record.exc_info:
            out["exc"] = redact(self.formatException(record.exc_info))
        return orjson.dumps(out).decode()


_JSON: Final = JsonFormatter()


def _formats_as_json(h: logging.Handler) -> TypeGuard[BatchStreamHandler]:
    """`h` writes every access line as tierq's JSON text, unfiltered: what the
    core's `access_json` writes (a subclass of either may do otherwise)."""
    return (type(h) is BatchStreamHandler and type(h.formatter) is JsonFormatter
            and not h.filters)


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = redact(super().format(record))
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            line += " " + " ".join(f"{k}={_clean(v)}" for k, v in fields.items())
        return line


class BatchStreamHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A StreamHandler that also takes a batch of records in one write and flush."""

    def emit_batch(self, records: Iterable[logging.LogRecord]) -> None:
        lines = []
        for record in records:
            if not self.filter(record):
                continue
            try:
                lines.append(self.format(record))
            except Exception:  # noqa: BLE001 - what logging does with a line it cannot format
                self.handleError(record)
        self.write_lines(lines)

    def write_lines(self, lines: list[str]) -> None:
        """Formatted lines (without their terminator) in one write and flush."""
        if not lines:
            return
        try:
            with self.lock:  # type: ignore[union-attr]
                self.stream.write(self.terminator.join(lines) + self.terminator)
                self.stream.flush()
        except Exception:  # noqa: BLE001 - a broken stream: logging's own report, once
            self.handleError(logging.makeLogRecord({"msg": f"{len(lines)} lines"}))


class ServerLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """aiohttp's server logger as tierq serves an app (`logger=` of the runner).

    A malformed request (aiohttp's HttpProcessingError: a header line over 8 KB,
    Content-Length with Transfer-Encoding, a bad chunk size, too many headers, a
    NUL in the path) is the client's doing and already answered 400: it is one
    warning line, with no traceback and none of the client's bytes, and at most
    `per_s` of them a second; the next line logged says how many were not. A
    client cannot fill the log or fire the alerts that watch error lines.
    Anything else aiohttp reports keeps its error line and traceback.
    """

    def __init__(self, logger: logging.Logger | None = None, per_s: int = 10,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(logger or logging.getLogger("aiohttp.server"), {})
        self.per_s = per_s
        self._clock = clock
        self._second = -1
        self._lines = 0  # bad-request lines logged in the current second
        self.dropped = 0  # not logged since the last line that was

    def exception(self, msg: object, *args: object, exc_info: Any = True,
                  **kwargs: Any) -> None:
        if isinstance(exc_info, HttpProcessingError):
            self._bad_request(exc_info, args[0] if args else None)
        else:
            super().exception(msg, *args, exc_info=exc_info, **kwargs)

    def _bad_request(self, exc: HttpProcessingError, remote: object) -> None:
        second = int(self._clock())
        if second != self._second:
            self._second, self._lines = second, 0
        if self._lines >= self.per_s:
            self.dropped += 1
            return
        self._lines += 1
        # The reason only: the first line of aiohttp's message, before the bytes it quotes.
        reason = redact(str(exc.message).splitlines()[0].split(": b'")[0].split(': b"')[0])
        reason = reason.rstrip(":. ")[:120]
        more = f" ({self.dropped} more not logged)" if self.dropped else ""
        self.dropped = 0
        self.logger.warning("bad HTTP request from %s: %d %s%s", remote, exc.code, reason, more)


def configure_logging(fmt: str = "json", level: str = "info", access: bool = True) -> None:
    """Root logging for `tierq serve`: JSON (or text) lines on stderr."""
    handler = BatchStreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else
                         _TextFormatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # Neither format shows threads or processes: not collecting them per record
    # is the logging module's own documented optimisation.
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    access_log.setLevel(logging.INFO if access else logging.WARNING)
