"""The usage ledger: one row per request decision, in SQLite (WAL), written in batches.

The writer is Rust (core/ledger.rs): one thread owns the connection and commits
queued rows in batches; `await record(row)` returns once the batch holding the
row is committed, so the gateway can finish a response knowing a crash of the
process will not lose its bill. `usage()` sums the rows by key,
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
import sqlite3
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from decimal import Decimal
from typing import Any, ClassVar, Final

from tierq._core import (LEDGER_ADDED_COLUMNS, LEDGER_CHECKPOINT_ROWS, LEDGER_SCHEMA, Finisher,
                         LedgerWriter)
from tierq.metrics import LAG_BUCKETS_S, Histogram
from tierq.storage import SQLITE_BUSY_TIMEOUT_MS, Durability, while_busy
from tierq.tiers import Tier, TierReason, one_of

__all__ = [
    "APPLIED_TIERS",
    "COLUMNS",
    "Dialect",
    "LedgerReads",
    "POSTGRES",
    "SQLITE",
    "STATUSES",
    "TIER_REASONS",
    "Ledger",
    "LedgerRow",
    "UsageLine",
    "connect",
    "cost_text",
    "row_values",
]

log = logging.getLogger("tierq.ledger")

# In UsageLine's order (its counts per status).
_STATUS_ORDER: Final = ("served", "shed", "failed", "cancelled")
STATUSES: Final = frozenset(_STATUS_ORDER)
APPLIED_TIERS: Final = frozenset(Tier)
TIER_REASONS: Final = frozenset(TierReason)
_ONE_OF: Final = one_of("'")
FEMTO_PER_USD: Final = 10**15
FEMTO_PER_MICRO: Final = 10**9
# The writer's limits live with it (core/ledger.rs): at most 8192 rows per
# transaction; it never checkpoints (wal_autocheckpoint = 0), since a checkpoint
# copies the WAL into the database and syncs it, a stall of several ms every
# waiting response would share. Its checkpointer thread does that on its own
# connection, beside the commits, once this many rows were committed since the
# last round, or each second.
CHECKPOINT_ROWS: Final = LEDGER_CHECKPOINT_ROWS

#: The ledger table's columns in the order of `row_values()`: the schema every
#: backend keeps (tierq.postgres has the same table in PostgreSQL). The SQLite
#: table itself is core/ledger.rs's (LEDGER_SCHEMA), written by its writer.
COLUMNS: Final = (
    "request_id", "ts", "key_id", "model", "endpoint", "requested_tier", "applied_tier",
    "prompt_tokens", "completion_tokens", "cost", "cost_micro", "cost_femto", "status",
    "partial", "code", "queue_ms", "latency_ms", "upstream", "fairness_id", "tier_reason",
)  # fmt: skip

@dataclass(slots=True, frozen=True)
class LedgerRow:
    """One request decision. `key_id` is a key's public id or "anonymous", never a secret."""

    request_id: str
    ts: float
    key_id: str
    model: str
    endpoint: str
    requested_tier: str | None
    applied_tier: Tier  # a tier's name is taken too, and made its Tier
    prompt_tokens: int
    completion_tokens: int
    cost: Decimal
    status: str
    partial: bool = False
    code: str | None = None
    queue_ms: float = 0.0
    latency_ms: float = 0.0
    upstream: str | None = None
    fairness_id: str | None = None  # the x-tierq-fairness-id it was fair by (a trusted key's)
    # Why it was served below the tier it asked for ("ramp", "budget"); None if it was not.
    tier_reason: str | None = None

    # The cost in femto-USD, worked out once by __post_init__ (what the writer takes).
    _cost_femto: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Validated here, on the caller's side, so a bad row fails its own
        # request instead of the batch it would have been committed with.
        # Types are checked too: the writer takes only what SQLite stores.
        # Spelled out field by field: this runs once per request.
        if not isinstance(self.request_id, str):
            raise TypeError("request_id must be a str")
        if not isinstance(self.key_id, str):
            raise TypeError("key_id must be a str")
        if not isinstance(self.model, str):
            raise TypeError("model must be a str")
        if not isinstance(self.endpoint, str):
            raise TypeError("endpoint must be a str")
        if not isinstance(self.applied_tier, str):
            raise TypeError("applied_tier must be a str")
        if not isinstance(self.status, str):
            raise TypeError("status must be a str")
        if self.requested_tier is not None and not isinstance(self.requested_tier, str):
            raise TypeError("requested_tier must be a str or None")
        if self.code is not None and not isinstance(self.code, str):
            raise TypeError("code must be a str or None")
        if self.upstream is not None and not isinstance(self.upstream, str):
            raise TypeError("upstream must be a str or None")
        if self.fairness_id is not None and not isinstance(self.fairness_id, str):
            raise TypeError("fairness_id must be a str or None")
        if self.tier_reason is not None and self.tier_reason not in TIER_REASONS:
            raise ValueError(f"tier_reason must be one of {sorted(TIER_REASONS)} or None, "
                             f"not {self.tier_reason!r}")
        if type(self.prompt_tokens) is not int:
            raise TypeError("prompt_tokens must be an int")
        if type(self.completion_tokens) is not int:
            raise TypeError("completion_tokens must be an int")
        for name, value in (("ts", self.ts), ("queue_ms", self.queue_ms), ("latency_ms", self.latency_ms)):
            if type(value) is not float and (not isinstance(value, (int, float)) or isinstance(value, bool)):
                raise TypeError(f"{name} must be a number")
        if not self.request_id:
            raise ValueError("request_id must be non-empty")
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {sorted(STATUSES)}, not {self.status!r}")
        if type(self.applied_tier) is not Tier:
            if self.applied_tier not in APPLIED_TIERS:
                raise ValueError(f"applied_tier must be {_ONE_OF}, not {self.applied_tier!r}")
            object.__setattr__(self, "applied_tier", Tier(self.applied_tier))
        if self.prompt_tokens < 0 or self.completion_tokens < 0:
            raise ValueError("token counts must be >= 0")
        object.__setattr__(self, "_cost_femto", _femto(self.cost))

    def _params(self) -> tuple[object, ...]:
        """The writer's `push` arguments: the cost as an integer of femto-USD."""
        return (
            self.request_id, self.ts, self.key_id, self.model, self.endpoint,
            self.requested_tier, self.applied_tier.value, self.prompt_tokens,
            self.completion_tokens, self._cost_femto, self.status, self.partial,
            self.code, self.queue_ms, self.latency_ms, self.upstream, self.fairness_id,
            self.tier_reason,
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
    micro, femto = divmod(row._cost_femto, FEMTO_PER_MICRO)
    return (
        row.request_id, row.ts, row.key_id, row.model, row.endpoint, row.requested_tier,
        row.applied_tier.value, row.prompt_tokens, row.completion_tokens, cost_text(row.cost), micro,
        femto, row.status, int(row.partial), row.code, row.queue_ms, row.latency_ms, row.upstream,
        row.fairness_id, row.tier_reason,
    )  # fmt: skip


def connect(path: str, durability: Durability = "process") -> sqlite3.Connection:
    """A connection with the ledger's pragmas and schema; autocommit (explicit BEGIN)."""
    if durability not in ("process", "power"):
        raise ValueError("durability must be 'process' or 'power'")
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
    # WAL: readers never block the writer. NORMAL: a commit is a write to the WAL
    # (survives kill -9, not power loss); FULL fsyncs each commit (group commit,
    # since a commit carries a whole batch).
    while_busy(lambda: conn.execute("PRAGMA journal_mode = WAL"))
    conn.execute(f"PRAGMA synchronous = {'FULL' if durability == 'power' else 'NORMAL'}")
    conn.executescript(LEDGER_SCHEMA)
    # The writer's migration (core/ledger.rs), so that a reader of a file an
    # older tierq made (`tierq usage`) finds the columns it reads.
    have = {r[1] for r in conn.execute("PRAGMA table_info(ledger)")}
    for column, ddl in LEDGER_ADDED_COLUMNS:
        if column not in have:
            try:
                conn.execute(ddl)
            except sqlite3.OperationalError as e:
                if "duplicate column" not in str(e):  # else another process just added it
                    raise
    return conn


# ---------------------------------------------------------------- reads


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
    # With `usage(by_fairness_id=True)`: the lines are per fairness id too, and
    # this is the id ("" for the requests that had none).
    fairness_id: str | None = None


@dataclass(frozen=True, slots=True)
class Dialect:
    """How one SQL backend spells the ledger's reads: everything the SQLite and the
    PostgreSQL reads differ by, so `LedgerReads` writes each query once."""

    #: The n-th query parameter (from 1): `?` or `$n`.
    param: Callable[[int], str]
    #: How many rows of a group meet a condition.
    count_if: Callable[[str], str]
    #: The select list of a group's cost, and how its values become the exact USD.
    cost_sum: str
    cost_of: Callable[[Sequence[Any]], Decimal]
    #: After a text column in ORDER BY: byte order, as SQLite sorts by default.
    text_order: str


def _cost_of_split(sums: Sequence[Any]) -> Decimal:
    micro, femto = sums
    return _from_femto(int(micro) * FEMTO_PER_MICRO + int(femto))


def _cost_of_numeric(sums: Sequence[Any]) -> Decimal:
    total = Decimal(sums[0])
    return total.normalize() if total else Decimal(0)


#: SQLite has no exact decimal sum: it adds the integer split of the cost.
SQLITE: Final = Dialect(
    param=lambda n: "?", count_if=lambda cond: f"SUM({cond})",
    cost_sum="SUM(cost_micro), SUM(cost_femto)", cost_of=_cost_of_split, text_order="",
)
#: PostgreSQL sums the NUMERIC cost exactly; its text order follows the locale unless told.
POSTGRES: Final = Dialect(
    param=lambda n: f"${n}", count_if=lambda cond: f"COUNT(*) FILTER (WHERE {cond})",
    cost_sum="SUM(cost)", cost_of=_cost_of_numeric, text_order=' COLLATE "C"',
)

# The columns a read returns: LedgerRow's fields, in order.
_READ_COLUMNS: Final = tuple(f.name for f in fields(LedgerRow) if f.init)


class LedgerReads:
    """The ledger's blocking reads, written once for every backend: each backend
    gives its `dialect` and `_read(sql, params)` (a short-lived connection). For
    the CLI, tests and admin paths, never the request path."""

    dialect: ClassVar[Dialect]

    def _read(self, sql: str, params: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        raise NotImplementedError

    def _select(self) -> str:
        return f"SELECT {', '.join(_READ_COLUMNS)} FROM ledger"

    def get(self, request_id: str) -> LedgerRow | None:
        found = self._read(self._select() + f" WHERE request_id = {self.dialect.param(1)}", (request_id,))
        return _row(found[0]) if found else None

    def rows(self, request_id: str | None = None) -> list[LedgerRow]:
        if request_id is not None:
            found = self._read(self._select() + f" WHERE request_id = {self.dialect.param(1)}",
                               (request_id,))
        else:
            found = self._read(self._select() + f" ORDER BY ts, request_id{self.dialect.text_order}")
        return [_row(r) for r in found]

    def count(self) -> int:
        return int(self._read("SELECT COUNT(*) FROM ledger")[0][0])

    def usage(
        self, since: float | None = None, key_id: str | None = None, model: str | None = None,
        by_fairness_id: bool = False,
    ) -> list[UsageLine]:
        """Spend by key, model and applied tier (and fairness id after the key, if
        `by_fairness_id`): the same lines, in the same (byte) order and to the same
        exact cost, whichever backend holds the rows."""
        d = self.dialect
        # Filters are fixed SQL fragments; values only ever travel as parameters.
        where: list[str] = []
        params: list[object] = []
        for condition, value in (("ts >=", None if since is None else float(since)),
                                 ("key_id =", key_id), ("model =", model)):
            if value is not None:
                params.append(value)
                where.append(f"{condition} {d.param(len(params))}")
        # A fairness id is never empty (tierq.intake), so "" can stand for none:
        # NULL sorts first in SQLite and last in PostgreSQL.
        group = ("key_id", *(("COALESCE(fairness_id, '')",) if by_fairness_id else ()),
                 "model", "applied_tier")
        sql = (
            f"SELECT {', '.join(group)}, COUNT(*), "
            + ", ".join(d.count_if(f"status = '{status}'") for status in _STATUS_ORDER)
            + f", SUM(prompt_tokens), SUM(completion_tokens), {d.cost_sum} FROM ledger"
            + (" WHERE " + " AND ".join(where) if where else "")
            + f" GROUP BY {', '.join(group)}"
            + " ORDER BY " + ", ".join(c + d.text_order for c in group)
        )
        out = []
        for r in self._read(sql, params):
            fid = str(r[1]) if by_fairness_id else None
            if by_fairness_id:
                r = (r[0], *r[2:])
            k, m, tier, n, served, shed, failed, cancelled, pt, ct = r[:10]
            out.append(
                UsageLine(
                    key_id=str(k), model=str(m), applied_tier=str(tier), requests=int(n),
                    served=int(served), shed=int(shed), failed=int(failed),
                    cancelled=int(cancelled), prompt_tokens=int(pt), completion_tokens=int(ct),
                    cost=d.cost_of(r[10:]), fairness_id=fid,
                )  # fmt: skip
            )
        return out


def _row(r: tuple[Any, ...]) -> LedgerRow:
    (rid, ts, key_id, model, endpoint, req, applied, pt, ct, cost, status, partial, code,
     queue_ms, latency_ms, upstream, fairness_id, tier_reason) = r  # fmt: skip
    return LedgerRow(
        request_id=rid, ts=ts, key_id=key_id, model=model, endpoint=endpoint,
        requested_tier=req, applied_tier=applied, prompt_tokens=int(pt), completion_tokens=int(ct),
        cost=Decimal(cost), status=status, partial=bool(partial), code=code,
        queue_ms=queue_ms, latency_ms=latency_ms, upstream=upstream, fairness_id=fairness_id,
        tier_reason=tier_reason,
    )  # fmt: skip


def _nothing() -> None:
    pass


def _not_running() -> RuntimeError:
    return RuntimeError("ledger is not running (call start(), and not after close())")


class Ledger(LedgerReads):
    """The SQLite ledger. `await start()` before recording.

    The writer is Rust (`tierq._core.LedgerWriter`): its own thread, its own
    connection, never the GIL. `record` pushes the row (integers and strings,
    under a short lock, no thread hand-off, no system call) and waits on a
    future. When the writer sleeps, the push that finds it so schedules its
    wake-up after the loop's current callbacks: the rows they push all go in
    the batch it starts, one futex call for them all (made without the GIL),
    not one per row. The writer commits whatever is queued as one transaction
    and then sets an eventfd this loop watches. One wake-up settles every future of every batch committed
    since the last: the writer reports a high-water mark of settled rows (and
    the ranges that failed), and the futures wait in push order.

    One event loop drives a Ledger (the one that started it); `record_nowait`
    may be called from any thread.
    """

    dialect = SQLITE

    def __init__(self, path: str, durability: Durability = "process") -> None:
        if durability not in ("process", "power"):
            raise ValueError("durability must be 'process' or 'power'")
        self.path = path
        self.durability: Durability = durability
        # Set by start() and kept after close() for its counters.
        self._writer: LedgerWriter | None = None
        self._push: Callable[..., tuple[int, bool]] | None = None  # the writer's push while open
        # A request's end in one core call while open (`finish_nowait`).
        self._finish: Callable[..., tuple[int, bool, str | None]] | None = None
        self._wake: Callable[[], None] = _nothing  # the writer's wake
        self._loop_thread = 0  # the thread running the loop that started it
        self._loop: asyncio.AbstractEventLoop | None = None
        # (sequence number, future), in push order.
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()
        # For /metrics: per batch, its oldest row's wait from queued to committed.
        self.lag = Histogram(LAG_BUCKETS_S)

    async def start(self) -> None:
        if self._writer is not None:
            raise RuntimeError("ledger already started")
        loop = asyncio.get_running_loop()
        # Opening waits on the file's lock if another writer holds it: off the loop.
        writer = await asyncio.to_thread(LedgerWriter, self.path, self.durability)
        self._writer, self._loop = writer, loop
        loop.add_reader(writer.fd, self._on_settled)
        self._push = writer.push
        self._finish = Finisher(writer, sorted(STATUSES), [t.value for t in APPLIED_TIERS],
                                sorted(TIER_REASONS)).finish
        self._wake = writer.wake
        self._loop_thread = threading.get_ident()

    async def close(self) -> None:
        """Commit everything queued, then stop the writer."""
        writer, loop = self._writer, self._loop
        if self._push is None or writer is None or loop is None:
            self._push = None
            return
        self._push = self._finish = None
        await asyncio.to_thread(writer.close)
        self._on_settled()
        loop.remove_reader(writer.fd)

    async def __aenter__(self) -> Ledger:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def record(self, row: LedgerRow) -> None:
        """Write `row`; return once it is committed. A repeated request_id is ignored."""
        push, loop = self._push, self._loop
        if push is None or loop is None:
            raise _not_running()
        seq, wake = push(*row._params())
        if wake:
            # After the loop's current callbacks: the rows they push go in the
            # batch this wake-up starts, and none of them makes a system call.
            loop.call_soon(self._wake)
        await self.committed(seq)

    async def committed(self, seq: int) -> None:
        """Return once the row numbered `seq` (a push's or `finish_nowait`'s) is committed."""
        loop = self._loop
        if loop is None:
            raise _not_running()
        fut = loop.create_future()
        self._waiters.append((seq, fut))
        await fut

    def finish_nowait(self, fields: tuple[Any, ...], settle: tuple[Any, int, Any, int],
                      access: tuple[Any, ...] | None) -> tuple[int, str | None]:
        """A request's end in one core call (tierq._core.Finisher): the row of
        `fields` (`LedgerRow._params()`'s order, the cost in femto-USD) checked as
        LedgerRow checks it and queued as `record_nowait` queues it, the key's
        buckets moved by `settle` ((rpm bucket, delta, tpm bucket, delta), from
        tierq.keys.KeyLimiter.settlement) and, given `access` (tierq.logs'
        `access_fields`), its access line formatted. Returns the row's sequence
        number (for `committed`) and the line (None: none asked, or one Python
        formats). A bad row raises ValueError and changes nothing."""
        finish = self._finish
        if finish is None:
            raise _not_running()
        seq, wake, line = finish(*fields, *settle, access)
        if wake:
            self._wake_soon()
        return seq, line

    def record_nowait(self, row: LedgerRow) -> None:
        """Queue `row` without waiting (sheds: nothing was served, nothing to hold back)."""
        push = self._push
        if push is None:
            raise _not_running()
        if push(*row._params())[1]:
            self._wake_soon()

    def _wake_soon(self) -> None:
        """Wake the writer after the running loop's current callbacks, or at once
        from another thread or with the loop stopped (nothing else would)."""
        loop = self._loop
        if loop is not None and loop.is_running() and threading.get_ident() == self._loop_thread:
            loop.call_soon(self._wake)
        else:
            self._wake()

    async def flush(self) -> None:
        """Return once everything queued before this call is committed."""
        writer, loop = self._writer, self._loop
        if self._push is None or writer is None or loop is None:
            raise _not_running()
        target = writer.last_pushed()
        if writer.settled() >= target:
            self._on_settled()  # settle what is already known, as a wake-up would
            return
        fut = loop.create_future()
        self._waiters.append((target, fut))
        await fut

    @property
    def pending(self) -> int:
        """Rows queued for the writer, not yet taken into a batch."""
        return 0 if self._writer is None else self._writer.pending

    def _stats(self) -> tuple[int, int, int, int]:
        return (0, 0, 0, 0) if self._writer is None else self._writer.stats()

    @property
    def batches(self) -> int:
        """Commits done; a test can see that batching happened."""
        return self._stats()[0]

    @property
    def rows_committed(self) -> int:
        return self._stats()[1]

    @property
    def commit_errors(self) -> int:
        """Batches that failed to commit (their rows' waiters got the error)."""
        return self._stats()[2]

    @property
    def checkpoints(self) -> int:
        return self._stats()[3]

    def _on_settled(self) -> None:
        """The eventfd is readable: settle every waiter up to the writer's mark."""
        writer = self._writer
        if writer is None:
            return
        settled, failures, lags_us = writer.drain()
        for us in lags_us:
            self.lag.observe_us(us)
        waiters = self._waiters
        errors = [(first, last, OSError(message)) for first, last, message in failures]
        for _, _, exc in errors:
            log.error("%s", exc)
        while waiters and waiters[0][0] <= settled:
            seq, fut = waiters.popleft()
            if fut.done():  # the awaiting task was cancelled; the row is written anyway
                continue
            failed = next((e for first, last, e in errors if first <= seq <= last), None)
            if failed is None:
                fut.set_result(None)
            else:
                fut.set_exception(failed)

    # Reads: short-lived connections (WAL lets them run beside the writer). They
    # block, so they are for the CLI, tests and admin paths, not the request path.

    def _read(self, sql: str, params: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        conn = connect(self.path, self.durability)
        try:
            return list(conn.execute(sql, params))
        finally:
            conn.close()
