"""Structured logs: one JSON object per line, a request id on every request.

`request_log` (an aiohttp middleware) gives each request a `RequestInfo`: the
gateway's own id (the ledger's key) and the `x-request-id` the response echoes
(the client's, when it sent a sane one). Each request gets one access line on
the `tierq.access` logger: written with the request's outcome (tierq.outcome)
when it has one, else by the middleware at the end. Headers are never logged, and `JsonFormatter`
masks anything shaped like a credential, so no key reaches a log.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import os
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Final

import orjson
from aiohttp import web

__all__ = [
    "REQUEST_ID_HEADER",
    "REQUEST_INFO",
    "JsonFormatter",
    "RequestInfo",
    "access_enabled",
    "access_line",
    "configure_logging",
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
                outcome: Mapping[str, Any] | None = None) -> None:
    """The request's one access line, with its `outcome` fields when it has one."""
    info.logged = True
    # The path only: a query string may carry a forward target, and headers may
    # carry keys; neither is logged.
    fields: dict[str, Any] = {
        "request_id": info.id, "method": request.method, "path": request.rel_url.path,
        "status": status, "duration_ms": round(duration_s * 1000, 3),
        "remote": request.remote,
    }
    if info.echo != info.id:
        fields["client_request_id"] = info.echo
    if outcome is not None:
        fields.update(outcome)
    # makeRecord + handle is what `access_log.info` does, less the walk up the
    # stack for a caller's file and line that an access line does not show.
    access_log.handle(access_log.makeRecord(access_log.name, logging.INFO, "", 0, "request", (),
                                            None, extra={"fields": fields}))


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


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = redact(super().format(record))
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            line += " " + " ".join(f"{k}={_clean(v)}" for k, v in fields.items())
        return line


def configure_logging(fmt: str = "json", level: str = "info", access: bool = True) -> None:
    """Root logging for `tierq serve`: JSON (or text) lines on stderr."""
    handler = logging.StreamHandler(sys.stderr)
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
