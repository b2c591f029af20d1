"""The usage ledger: one row per request decision, in SQLite (WAL), written in batches.

One writer thread owns the connection; `await record(row)` returns once the batch
holding the row is committed, so the gateway can finish a response knowing a
crash of the process will not lose its bill. `usage()` sums the rows by key,
model and tier (the query on this schema); tierq.usage renders the reports.

Money is exact. `cost` is kept three ways in each row: the Decimal as TEXT (what
`get()` returns), and the same amount split into two INTEGER columns,
`cost_micro` (whole micro-USD, 1e-6) and `cost_femto` (the rest, in femto-USD,
1e-15, always < 1e9), so SQL can SUM them without overflow (a plain femto-USD
column would overflow int64 at about 9,223 USD in a sum) and without float.
Femto-USD is enough: catalog prices have at most 3 decimals per 1M tokens
(9 per token) and the 1.5 multiplier adds one, so a cost has at most 10 decimals;
any multiplier with up to 5 decimals still fits. A row whose cost needs more
than 15 decimals is refused rather than rounded.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Final, Literal

from tierq.config import SQLITE_BUSY_TIMEOUT_MS
from tierq.metrics import LAG_BUCKETS_S, Histogram

__all__ = [
    "APPLIED_TIERS",
    "COLUMNS",
    "STATUSES",
    "Ledger",
    "LedgerRow",
    "UsageLine",
    "connect",
    "cost_text",
    "row_values",
    "usage_lines",
]

log = logging.getLogger("tierq.ledger")

Durability = Literal["process", "power"]
STATUSES: Final = frozenset({"served", "shed", "failed", "cancelled"})
APPLIED_TIERS: Final = frozenset({"priority", "default"})
FEMTO_PER_USD: Final = 10**15
FEMTO_PER_MICRO: Final = 10**9
MAX_BATCH: Final = 8192  # rows per transaction; bounds a commit's latency under a flood
# The writer never checkpoints (wal_autocheckpoint = 0): a checkpoint copies the
# WAL into the database and syncs it, a stall of several ms that every response
# waiting on the next commit would share. The checkpointer thread does it on
# its own connection instead, beside the writer's commits (WAL allows that), once
# this many rows were committed since the last one, or each second.
CHECKPOINT_ROWS: Final = 1000
CHECKPOINT_EVERY_S: Final = 1.0

_SCHEMA: Final = """
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
    upstream          TEXT
);
CREATE INDEX IF NOT EXISTS ledger_ts ON ledger (ts);
"""

#: The ledger table's columns in the order of `row_values()`: the schema every
#: backend keeps (tierq.postgres has the same table in PostgreSQL).
COLUMNS: Final = (
    "request_id", "ts", "key_id", "model", "endpoint", "requested_tier", "applied_tier",
    "prompt_tokens", "completion_tokens", "cost", "cost_micro", "cost_femto", "status",
    "partial", "code", "queue_ms", "latency_ms", "upstream",
)  # fmt: skip

_INSERT: Final = (
    "INSERT OR IGNORE INTO ledger (request_id, ts, key_id, model, endpoint, requested_tier,"
    " applied_tier, prompt_tokens, completion_tokens, cost, cost_micro, cost_femto, status,"
    " partial, code, queue_ms, latency_ms, upstream)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_SELECT: Final = (
    "SELECT request_id, ts, key_id, model, endpoint, requested_tier, applied_tier,"
    " prompt_tokens, completion_tokens, cost, status, partial, code, queue_ms, latency_ms,"
    " upstream FROM ledger"
)


@dataclass(slots=True, frozen=True)
class LedgerRow:
    """One request decision. `key_id` is a key's public id or "anonymous", never a secret."""

    request_id: str
    ts: float
    key_id: str
    model: str
    endpoint: str
    requested_tier: str | None
    applied_tier: str
    prompt_tokens: int
    completion_tokens: int
    cost: Decimal
    status: str
    partial: bool = False
    code: str | None = None
    queue_ms: float = 0.0
    latency_ms: float = 0.0
    upstream: str | None = None

    def __post_init__(self) -> None:
        # Validated here, on the caller's side, so a bad row fails its own
        # request instead of the batch it would have been committed with.
        # Types are checked too: one value sqlite cannot bind would fail the whole
        # batch it was committed with, and so other requests' rows.
        for name in ("request_id", "key_id", "model", "endpoint", "applied_tier", "status"):
            if not isinstance(getattr(self, name), str):
                raise TypeError(f"{name} must be a str")
        for name in ("requested_tier", "code", "upstream"):
            if not isinstance(getattr(self, name), (str, type(None))):
                raise TypeError(f"{name} must be a str or None")
        for name in ("prompt_tokens", "completion_tokens"):
            if type(getattr(self, name)) is not int:
                raise TypeError(f"{name} must be an int")
        for name in ("ts", "queue_ms", "latency_ms"):
            if not isinstance(getattr(self, name), (int, float)) or isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a number")
        if not self.request_id:
            raise ValueError("request_id must be non-empty")
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {sorted(STATUSES)}, not {self.status!r}")
        if self.applied_tier not in APPLIED_TIERS:
            raise ValueError(f"applied_tier must be 'priority' or 'default', not {self.applied_tier!r}")
        if self.prompt_tokens < 0 or self.completion_tokens < 0:
            raise ValueError("token counts must be >= 0")
        _femto(self.cost)

    def _params(self) -> tuple[object, ...]:
        micro, femto = divmod(_femto(self.cost), FEMTO_PER_MICRO)
        return (
            self.request_id, self.ts, self.key_id, self.model, self.endpoint,
            self.requested_tier, self.applied_tier, self.prompt_tokens,
            self.completion_tokens, cost_text(self.cost), micro, femto, self.status,
            int(self.partial), self.code, self.queue_ms, self.latency_ms, self.upstream,
        )  # fmt: skip


def _femto(cost: Decimal) -> int:
    if not isinstance(cost, Decimal) or not cost.is_finite() or cost < 0:
        raise ValueError(f"cost must be a finite, non-negative Decimal, not {cost!r}")
    scaled = cost.scaleb(15)
    if scaled != scaled.to_integral_value():
        raise ValueError(f"cost {cost} has more than 15 decimals (femto-USD); refusing to round")
    return int(scaled)


def cost_text(value: Decimal) -> str:
    """A cost as the ledger stores it: fixed-point text, never exponent notation (Decimal('1E-7') -> '0.0000001')."""
    return format(value, "f")


def _from_femto(femto: int) -> Decimal:
    # Exact: dividing by a power of ten only moves the exponent.
    return (Decimal(femto).scaleb(-15)).normalize() if femto else Decimal(0)


def row_values(row: LedgerRow) -> tuple[object, ...]:
    """A row's column values in `COLUMNS` order, as stored: cost as fixed-point text and
    split into whole micro-USD and the femto-USD rest, partial as 0 or 1."""
    return row._params()


def connect(path: str, durability: Durability = "process") -> sqlite3.Connection:
    """A connection with the ledger's pragmas and schema; autocommit (explicit BEGIN)."""
    if durability not in ("process", "power"):
        raise ValueError("durability must be 'process' or 'power'")
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
    # WAL: readers never block the writer. NORMAL: a commit is a write to the WAL
    # (survives kill -9, not power loss); FULL fsyncs each commit (group commit,
    # since a commit carries a whole batch).
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute(f"PRAGMA synchronous = {'FULL' if durability == 'power' else 'NORMAL'}")
    conn.executescript(_SCHEMA)
    return conn


_Waiter = tuple[asyncio.AbstractEventLoop, "asyncio.Future[None]"]
# (row or None for a flush barrier, waiter or None for fire-and-forget, time queued
# in monotonic ns); None item = stop
_Item = tuple[LedgerRow | None, _Waiter | None, int] | None


def _settle(futs: list[asyncio.Future[None]], exc: BaseException | None) -> None:
    for fut in futs:
        if fut.done():  # the awaiting task was cancelled; the row is written anyway
            continue
        if exc is None:
            fut.set_result(None)
        else:
            fut.set_exception(exc)


def _notify(
    loop: asyncio.AbstractEventLoop, futs: list[asyncio.Future[None]], exc: BaseException | None
) -> None:
    # One wake-up per loop per batch, not per row.
    try:
        loop.call_soon_threadsafe(_settle, futs, exc)
    except RuntimeError:  # that loop is closed; nobody is left to tell
        pass


class Ledger:
    """A SQLite ledger with one writer thread. `await start()` before recording."""

    def __init__(self, path: str, durability: Durability = "process") -> None:
        if durability not in ("process", "power"):
            raise ValueError("durability must be 'process' or 'power'")
        self.path = path
        self.durability: Durability = durability
        self._queue: queue.SimpleQueue[_Item] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._checkpointer: threading.Thread | None = None
        self._checkpoint_due = threading.Event()
        self._uncheckpointed = 0  # rows committed since the last checkpoint (approximate)
        self.checkpoints = 0
        self._closed = False
        self.batches = 0  # commits done; a test can see that batching happened
        # For /metrics (tierq.metrics): rows committed, failed batches, and per
        # batch its oldest row's wait from queued to committed. Written by the
        # writer thread only.
        self.rows_committed = 0
        self.commit_errors = 0
        self.lag = Histogram(LAG_BUCKETS_S)

    async def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("ledger already started")
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = loop.create_future()
        self._thread = threading.Thread(
            target=self._run, args=(loop, ready), name="tierq-ledger-writer", daemon=True
        )
        self._thread.start()
        await ready  # raises here if the file cannot be opened
        self._checkpointer = threading.Thread(
            target=self._checkpoint_loop, name="tierq-ledger-checkpointer", daemon=True
        )
        self._checkpointer.start()

    async def close(self) -> None:
        """Commit everything queued, then stop the writer."""
        if self._closed:
            return
        self._closed = True
        thread = self._thread
        if thread is None:
            return
        self._queue.put(None)
        await asyncio.to_thread(thread.join)
        checkpointer = self._checkpointer
        if checkpointer is not None:
            self._checkpoint_due.set()  # with the writer gone, its loop ends
            await asyncio.to_thread(checkpointer.join)

    async def __aenter__(self) -> Ledger:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _check_open(self) -> None:
        if self._thread is None or self._closed:
            raise RuntimeError("ledger is not running (call start(), and not after close())")

    async def record(self, row: LedgerRow) -> None:
        """Write `row`; return once it is committed. A repeated request_id is ignored."""
        self._check_open()
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        # SimpleQueue.put never blocks: the event loop does no I/O here.
        self._queue.put((row, (loop, fut), time.monotonic_ns()))
        await fut

    def record_nowait(self, row: LedgerRow) -> None:
        """Queue `row` without waiting (sheds: nothing was served, nothing to hold back)."""
        self._check_open()
        self._queue.put((row, None, time.monotonic_ns()))

    async def flush(self) -> None:
        """Return once everything queued before this call is committed."""
        self._check_open()
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        self._queue.put((None, (loop, fut), time.monotonic_ns()))
        await fut

    @property
    def pending(self) -> int:
        """Rows and barriers queued for the writer, not yet taken (approximate)."""
        return self._queue.qsize()

    def _run(self, loop: asyncio.AbstractEventLoop, ready: asyncio.Future[None]) -> None:
        try:
            conn = connect(self.path, self.durability)
            conn.execute("PRAGMA wal_autocheckpoint = 0")  # the checkpointer's job
        except Exception as e:  # noqa: BLE001 - handed to start()'s caller
            loop.call_soon_threadsafe(_settle, [ready], e)
            return
        loop.call_soon_threadsafe(_settle, [ready], None)
        try:
            stopping = False
            while not stopping:
                batch = [self._queue.get()]
                while len(batch) < MAX_BATCH:
                    try:
                        batch.append(self._queue.get_nowait())
                    except queue.Empty:
                        break
                stopping = self._commit(conn, batch)
        finally:
            conn.close()

    def _commit(self, conn: sqlite3.Connection, batch: list[_Item]) -> bool:
        if None in batch:
            # Stopping: take whatever is still queued too, so nothing queued before
            # (or racing with) close() is left behind.
            while True:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
        params: list[tuple[object, ...]] = []
        waiters: dict[asyncio.AbstractEventLoop, list[asyncio.Future[None]]] = {}
        stopping = False
        oldest_ns: int | None = None
        for item in batch:
            if item is None:
                stopping = True
                continue
            row, waiter, queued_ns = item
            if row is not None:
                if oldest_ns is None or queued_ns < oldest_ns:
                    oldest_ns = queued_ns
                try:
                    params.append(row._params())
                except Exception as e:  # noqa: BLE001 - fails this row, not its batch
                    log.error("ledger row %r refused: %s", row.request_id, e)
                    if waiter is not None:
                        _notify(waiter[0], [waiter[1]], e)
                    continue
            if waiter is not None:
                waiters.setdefault(waiter[0], []).append(waiter[1])
        exc: BaseException | None = None
        if params:
            try:
                conn.execute("BEGIN IMMEDIATE")
                conn.executemany(_INSERT, params)
                conn.execute("COMMIT")
                self.batches += 1
                self.rows_committed += len(params)
                self._uncheckpointed += len(params)
                if self._uncheckpointed >= CHECKPOINT_ROWS:
                    self._checkpoint_due.set()
                if oldest_ns is not None:
                    self.lag.observe_us((time.monotonic_ns() - oldest_ns) // 1000)
            except Exception as e:  # noqa: BLE001 - the writer must outlive a bad batch
                exc = e
                self.commit_errors += 1
                log.error("ledger commit of %d rows failed: %s", len(params), e)
                try:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
        for wloop, futs in waiters.items():
            _notify(wloop, futs, exc)
        return stopping

    def _checkpoint_loop(self) -> None:
        """Moves committed WAL frames into the database, off the writer's path.
        PASSIVE: never waits for the writer or readers, does what it can now."""
        conn = connect(self.path, self.durability)
        try:
            while True:
                self._checkpoint_due.wait(CHECKPOINT_EVERY_S)
                self._checkpoint_due.clear()
                writer = self._thread
                stopping = writer is None or not writer.is_alive()
                pending = self._uncheckpointed
                if pending:
                    self._uncheckpointed = 0
                    try:
                        conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
                        self.checkpoints += 1
                    except sqlite3.Error as e:  # busy or I/O: the next round retries
                        self._uncheckpointed += pending
                        log.warning("ledger checkpoint failed: %s", e)
                if stopping:
                    return
        finally:
            conn.close()

    # Reads: short-lived connections (WAL lets them run beside the writer). They
    # block, so they are for the CLI, tests and admin paths, not the request path.

    def _read(self, sql: str, params: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        conn = connect(self.path, self.durability)
        try:
            return list(conn.execute(sql, params))
        finally:
            conn.close()

    def get(self, request_id: str) -> LedgerRow | None:
        found = self._read(_SELECT + " WHERE request_id = ?", (request_id,))
        return _row(found[0]) if found else None

    def rows(self, request_id: str | None = None) -> list[LedgerRow]:
        if request_id is not None:
            found = self._read(_SELECT + " WHERE request_id = ?", (request_id,))
        else:
            found = self._read(_SELECT + " ORDER BY ts, request_id")
        return [_row(r) for r in found]

    def count(self) -> int:
        return int(self._read("SELECT COUNT(*) FROM ledger")[0][0])

    def usage(
        self, since: float | None = None, key_id: str | None = None, model: str | None = None
    ) -> list[UsageLine]:
        return usage_lines(self._read, since=since, key_id=key_id, model=model)


def _row(r: tuple[Any, ...]) -> LedgerRow:
    (rid, ts, key_id, model, endpoint, req, applied, pt, ct, cost, status, partial, code,
     queue_ms, latency_ms, upstream) = r  # fmt: skip
    return LedgerRow(
        request_id=rid, ts=ts, key_id=key_id, model=model, endpoint=endpoint,
        requested_tier=req, applied_tier=applied, prompt_tokens=pt, completion_tokens=ct,
        cost=Decimal(cost), status=status, partial=bool(partial), code=code,
        queue_ms=queue_ms, latency_ms=latency_ms, upstream=upstream,
    )  # fmt: skip


# ---------------------------------------------------------------- usage sums


@dataclass(slots=True, frozen=True)
class UsageLine:
    """Spend of one (key, model, applied tier)."""

    key_id: str
    model: str
    applied_tier: str
    requests: int
    served: int
    shed: int
    failed: int
    cancelled: int
    prompt_tokens: int
    completion_tokens: int
    cost: Decimal


Reader = Callable[[str, Sequence[object]], list[tuple[Any, ...]]]


def usage_lines(
    read: Reader,
    since: float | None = None,
    key_id: str | None = None,
    model: str | None = None,
) -> list[UsageLine]:
    # Filters are fixed SQL fragments; values only ever travel as parameters.
    where: list[str] = []
    params: list[object] = []
    if since is not None:
        where.append("ts >= ?")
        params.append(since)
    if key_id is not None:
        where.append("key_id = ?")
        params.append(key_id)
    if model is not None:
        where.append("model = ?")
        params.append(model)
    sql = (
        "SELECT key_id, model, applied_tier, COUNT(*),"
        " SUM(status = 'served'), SUM(status = 'shed'), SUM(status = 'failed'),"
        " SUM(status = 'cancelled'), SUM(prompt_tokens), SUM(completion_tokens),"
        " SUM(cost_micro), SUM(cost_femto) FROM ledger"
        + (" WHERE " + " AND ".join(where) if where else "")
        + " GROUP BY key_id, model, applied_tier ORDER BY key_id, model, applied_tier"
    )
    out = []
    for r in read(sql, params):
        k, m, tier, n, served, shed, failed, cancelled, pt, ct, micro, femto = r
        out.append(
            UsageLine(
                key_id=str(k), model=str(m), applied_tier=str(tier), requests=int(n),
                served=int(served), shed=int(shed), failed=int(failed),
                cancelled=int(cancelled), prompt_tokens=int(pt), completion_tokens=int(ct),
                cost=_from_femto(int(micro) * FEMTO_PER_MICRO + int(femto)),
            )  # fmt: skip
        )
    return out
