"""PostgreSQL for several gateway hosts: the schema and its migrations, the ledger
(batched asyncpg writes, with a local SQLite spool while PostgreSQL is unreachable),
and the API key store that every host reads.

The ledger table has the SQLite ledger's columns and meaning (tierq.ledger.COLUMNS):
`cost` is NUMERIC, the exact USD amount the SQLite ledger keeps as text, beside the
same `cost_micro` / `cost_femto` integer split. Every write is
`INSERT ... ON CONFLICT (request_id) DO NOTHING`, so a row written twice (replayed
from the spool, or retried after a commit whose answer was lost) is one row.
"""

from __future__ import annotations

import asyncio
import builtins
import concurrent.futures
import dataclasses
import hmac
import logging
import os
import secrets
import sqlite3
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from decimal import Decimal
from typing import Any, Final, Literal, TypeVar

import asyncpg

from tierq.keys import (
    PREFIX,
    PUBLIC_ALPHABET,
    PUBLIC_ID_LEN,
    KeyInfo,
    budget_text,
    hash_secret,
    parse_token,
    updated,
    validate_new_key,
)
from tierq.ledger import COLUMNS, POSTGRES, Ledger, LedgerReads, LedgerRow, connect, row_values
from tierq.metrics import LAG_BUCKETS_S, Histogram
from tierq.storage import DEFAULT_SPOOL, Durability, postgres_url, sqlite_path

__all__ = [
    "MIGRATIONS",
    "PostgresKeyStore",
    "PostgresLedger",
    "migrate",
    "pg_connect",
    "schema_version",
]

log = logging.getLogger("tierq.postgres")
T = TypeVar("T")

MAX_BATCH: Final = 8192  # rows per transaction, as the SQLite writer
REPLAY_CHUNK: Final = 2000  # spooled rows moved to PostgreSQL per transaction (default)
CONNECT_TIMEOUT_S: Final = 2.0
# A commit that has not answered by then is given up on and its rows are spooled
# (if it did commit after all, the replay is a no-op: ON CONFLICT DO NOTHING).
COMMIT_TIMEOUT_S: Final = 3.0
RETRY_S: Final = 0.5  # between two attempts to reach PostgreSQL while spooling
# pg_advisory_xact_lock key held while migrating: two hosts starting at once
# apply each migration once. 'tierq' in ASCII.
SCHEMA_LOCK: Final = 0x7469657271

# ---------------------------------------------------------------- schema

_LEDGER_DDL: Final = """
CREATE TABLE IF NOT EXISTS ledger (
    request_id        TEXT PRIMARY KEY,
    ts                DOUBLE PRECISION NOT NULL,
    key_id            TEXT NOT NULL,
    model             TEXT NOT NULL,
    endpoint          TEXT NOT NULL,
    requested_tier    TEXT,
    applied_tier      TEXT NOT NULL,
    prompt_tokens     BIGINT NOT NULL,
    completion_tokens BIGINT NOT NULL,
    cost              NUMERIC NOT NULL,
    cost_micro        BIGINT NOT NULL,
    cost_femto        BIGINT NOT NULL,
    status            TEXT NOT NULL,
    partial           SMALLINT NOT NULL,
    code              TEXT,
    queue_ms          DOUBLE PRECISION NOT NULL,
    latency_ms        DOUBLE PRECISION NOT NULL,
    upstream          TEXT
);
CREATE INDEX IF NOT EXISTS ledger_ts ON ledger (ts);
"""

_KEYS_DDL: Final = """
CREATE TABLE IF NOT EXISTS keys (
    public_id     TEXT PRIMARY KEY,
    name          TEXT NOT NULL,
    secret_sha256 TEXT NOT NULL,
    created       DOUBLE PRECISION NOT NULL,
    revoked       DOUBLE PRECISION,
    rpm           BIGINT,
    tpm           BIGINT
);
"""

# A key's fair-queuing weight and trust (tierq.keys); keys made before keep the
# defaults, which are what they meant.
_KEYS_FAIRNESS_DDL: Final = """
ALTER TABLE keys ADD COLUMN IF NOT EXISTS weight DOUBLE PRECISION NOT NULL DEFAULT 1.0;
ALTER TABLE keys ADD COLUMN IF NOT EXISTS trusted BOOLEAN NOT NULL DEFAULT false;
"""

# The x-tierq-fairness-id of a trusted key's request (tierq.ledger's column).
_LEDGER_FAIRNESS_DDL: Final = "ALTER TABLE ledger ADD COLUMN IF NOT EXISTS fairness_id TEXT"

# A key's downgrades (tierq.keys): the budget as exact text, as SQLite keeps it.
_KEYS_DOWNGRADES_DDL: Final = """
ALTER TABLE keys ADD COLUMN IF NOT EXISTS priority_budget_usd TEXT;
ALTER TABLE keys ADD COLUMN IF NOT EXISTS ramp_min_tpm BIGINT NOT NULL DEFAULT 0;
ALTER TABLE keys ADD COLUMN IF NOT EXISTS ramp_max_growth DOUBLE PRECISION;
ALTER TABLE keys ADD COLUMN IF NOT EXISTS ramp_window_s INTEGER NOT NULL DEFAULT 900;
"""

# Why a request was served below the tier it asked for (tierq.ledger's column).
_LEDGER_REASON_DDL: Final = "ALTER TABLE ledger ADD COLUMN IF NOT EXISTS tier_reason TEXT"

# A key's limits in shadow mode (tierq.keys): false counts their refusals, applies none.
_KEYS_ENFORCE_DDL: Final = "ALTER TABLE keys ADD COLUMN IF NOT EXISTS enforce BOOLEAN NOT NULL DEFAULT true"

#: (version, what it does, SQL). Append only: a version once shipped never changes.
MIGRATIONS: Final[tuple[tuple[int, str, str], ...]] = (
    (1, "ledger table", _LEDGER_DDL),
    (2, "keys table", _KEYS_DDL),
    (3, "keys weight and trusted", _KEYS_FAIRNESS_DDL),
    (4, "ledger fairness_id", _LEDGER_FAIRNESS_DDL),
    (5, "ledger tier_reason", _LEDGER_REASON_DDL),
    (6, "keys priority budget and ramp rule", _KEYS_DOWNGRADES_DDL),
    (7, "keys enforce (shadow mode)", _KEYS_ENFORCE_DDL),
)
_KEY_COLUMNS: Final = ("public_id, name, created, revoked, rpm, tpm, weight, trusted, "
                       "priority_budget_usd, ramp_min_tpm, ramp_max_growth, ramp_window_s, enforce")


async def migrate(conn: asyncpg.Connection) -> int:
    """Apply the migrations this database lacks; returns its version. Idempotent,
    and safe when several hosts start at once (one advisory lock serializes them)."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", SCHEMA_LOCK)
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS tierq_schema_version ("
            " version INTEGER PRIMARY KEY, description TEXT NOT NULL,"
            " applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
        )
        current = int(await conn.fetchval(
            "SELECT COALESCE(MAX(version), 0) FROM tierq_schema_version"))
        for version, description, ddl in MIGRATIONS:
            if version > current:
                await conn.execute(ddl)
                await conn.execute(
                    "INSERT INTO tierq_schema_version (version, description) VALUES ($1, $2)",
                    version, description,
                )
                log.info("postgresql schema: applied migration %d (%s)", version, description)
        latest = MIGRATIONS[-1][0]
        if current > latest:
            # A newer tierq migrated this database (a rolling upgrade): its
            # migrations only add, so this one goes on with the tables it knows.
            log.warning("postgresql schema version %d is newer than this tierq's %d",
                        current, latest)
        return max(current, latest)


async def schema_version(conn: asyncpg.Connection) -> int:
    """The database's schema version; 0 before any migration."""
    exists = await conn.fetchval("SELECT to_regclass('tierq_schema_version') IS NOT NULL")
    if not exists:
        return 0
    return int(await conn.fetchval("SELECT COALESCE(MAX(version), 0) FROM tierq_schema_version"))


def _password(password_env: str | None) -> str | None:
    if password_env is None:
        return None
    value = os.environ.get(password_env)
    if value is None:
        raise ValueError(f"password_env {password_env} is not set in the environment")
    return value


async def pg_connect(url: str, password_env: str | None = None,
                     timeout: float = CONNECT_TIMEOUT_S) -> asyncpg.Connection:
    """One connection to `url` (password from the URL, `password_env`, or PGPASSWORD)."""
    return await asyncpg.connect(
        dsn=postgres_url(url), password=_password(password_env), timeout=timeout,
        # A commit returns once the WAL is flushed on the server: the durability
        # the ledger promises, whatever the server's default says.
        server_settings={"application_name": "tierq", "synchronous_commit": "on"},
    )


def _unreachable(e: BaseException) -> bool:
    """True for failures that mean "PostgreSQL cannot be used now" (the rows wait in
    the spool), False for a server that refused the rows themselves."""
    return not isinstance(e, (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError,
                              ValueError, TypeError))


def _fatal_at_start(e: BaseException) -> bool:
    # A wrong password or database is a configuration error: refuse to start
    # rather than spool forever. Later (a password rotated under a running host)
    # the same errors only keep the rows in the spool.
    return isinstance(e, (asyncpg.InvalidAuthorizationSpecificationError,
                          asyncpg.InvalidCatalogNameError, asyncpg.ClientConfigurationError,
                          ValueError))


def _blocking(make: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine to completion on a loop of its own, from sync code (the read
    helpers: CLI, tests, admin paths), even when called from inside a running loop."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(lambda: asyncio.run(make())).result()


# ---------------------------------------------------------------- ledger

# Batched insert: one statement per batch, each column as an array (unnest), the
# cost sent as its exact text and cast to NUMERIC by the server.
_PG_TYPES: Final = (
    "text", "float8", "text", "text", "text", "text", "text", "int8", "int8", "text",
    "int8", "int8", "text", "int2", "text", "float8", "float8", "text", "text", "text",
)  # fmt: skip
_INSERT: Final = (
    f"INSERT INTO ledger ({', '.join(COLUMNS)}) SELECT "
    + ", ".join(f"u.{c}::numeric" if c == "cost" else f"u.{c}" for c in COLUMNS)
    + " FROM unnest(" + ", ".join(f"${i + 1}::{t}[]" for i, t in enumerate(_PG_TYPES))
    + f") AS u({', '.join(COLUMNS)}) ON CONFLICT (request_id) DO NOTHING"
)
_FLOAT_COLUMNS: Final = frozenset(i for i, t in enumerate(_PG_TYPES) if t == "float8")


def _arrays(values: Sequence[Sequence[object]]) -> list[list[object]]:
    cols: list[list[object]] = [[] for _ in COLUMNS]
    for v in values:
        for i, x in enumerate(v):
            cols[i].append(float(x) if i in _FLOAT_COLUMNS and x is not None else x)  # type: ignore[arg-type]
    return cols


Mode = Literal["postgresql", "spool"]
# (row or None for a flush barrier, waiter or None, time queued in monotonic ns)
_Item = tuple[LedgerRow | None, "asyncio.Future[None] | None", int]


def _settle(futs: Iterable[asyncio.Future[None] | None], exc: BaseException | None) -> None:
    for fut in futs:
        if fut is None or fut.done():  # fire-and-forget, or the waiter was cancelled
            continue
        if exc is None:
            fut.set_result(None)
        else:
            fut.set_exception(exc)


class _Spool:
    """The local SQLite file (the ledger's schema) holding the rows PostgreSQL could
    not take, oldest first, until the replay moves them. Knows nothing of PostgreSQL."""

    def __init__(self, path: str, durability: Durability) -> None:
        self.path = path
        self._ledger = Ledger(path, durability)  # its writer: rows go in as into any ledger
        self._durability: Durability = durability
        self._conn: sqlite3.Connection | None = None  # the replay's reads and deletes
        self.rows = 0  # rows in the file, waiting for PostgreSQL
        self.spooled = 0  # rows this process wrote to it

    async def open(self) -> None:
        await self._ledger.start()
        self._conn = await asyncio.to_thread(connect, self.path, self._durability)
        await self.recount()

    async def close(self) -> None:
        await self._ledger.close()
        if self._conn is not None:
            self._conn.close()

    async def write(self, batch: list[_Item]) -> None:
        """Make the batch's rows durable here and settle their waiters (and barriers)."""
        rows = [(row, fut) for row, fut, _ in batch if row is not None]
        results = await asyncio.gather(*(self._ledger.record(row) for row, _ in rows),
                                       return_exceptions=True)
        for (row, fut), res in zip(rows, results):
            exc = res if isinstance(res, BaseException) else None
            if exc is not None:
                log.error("ledger: spooling row %r failed: %s", row.request_id, exc)
            _settle([fut], exc)
        _settle((f for row, f, _ in batch if row is None), None)
        written = sum(1 for r in results if not isinstance(r, BaseException))
        self.spooled += written
        self.rows += written  # an id already spooled is counted twice until recounted

    async def recount(self) -> None:
        self.rows = await asyncio.to_thread(self._count)

    def _count(self) -> int:
        assert self._conn is not None
        return int(self._conn.execute("SELECT COUNT(*) FROM ledger").fetchone()[0])

    async def oldest(self, n: int) -> list[tuple[Any, ...]]:
        """The `n` rows spooled first, as `COLUMNS` values."""
        conn = self._conn
        assert conn is not None
        return await asyncio.to_thread(lambda: conn.execute(
            f"SELECT {', '.join(COLUMNS)} FROM ledger ORDER BY rowid LIMIT ?", (n,)
        ).fetchall())

    async def delete(self, ids: list[str]) -> None:
        self.rows = await asyncio.to_thread(self._delete, ids)

    def _delete(self, ids: list[str]) -> int:
        # By request_id, not rowid: SQLite may hand a deleted row's rowid to a new row.
        conn = self._conn
        assert conn is not None
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany("DELETE FROM ledger WHERE request_id = ?", [(i,) for i in ids])
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return int(conn.execute("SELECT COUNT(*) FROM ledger").fetchone()[0])


class _Replay:
    """The spool's rows back into PostgreSQL in the order they were spooled, a chunk
    at a time, each chunk deleted from the spool only once PostgreSQL committed it.
    The writer inserts each chunk between `take` and `moved` (it owns the
    connection and what a failure means)."""

    def __init__(self, spool: _Spool, chunk: int = REPLAY_CHUNK) -> None:
        self.spool = spool
        self.chunk = chunk  # rows per transaction
        self.replayed = 0  # spooled rows this process moved to PostgreSQL

    async def take(self) -> list[tuple[Any, ...]]:
        """The next chunk to insert; empty once the spool is (then recounted)."""
        values = await self.spool.oldest(self.chunk)
        if not values:
            await self.spool.recount()
        return values

    async def moved(self, values: list[tuple[Any, ...]]) -> None:
        """`values` (from `take`) are committed in PostgreSQL: drop them from the spool."""
        self.replayed += len(values)
        await self.spool.delete([str(v[0]) for v in values])


class PostgresLedger(LedgerReads):
    """The ledger in a PostgreSQL table shared by every host, with a SQLite spool.

    The same calls as tierq.ledger.Ledger: `await start()`, `await record(row)`
    (returns once the row is durable: committed in PostgreSQL, or in the spool
    while PostgreSQL is unreachable), `record_nowait`, `flush`, `pending`, `close`,
    and the blocking read helpers `get`, `rows`, `count`, `usage` (PostgreSQL's
    table only; the spool's rows show there once replayed).

    This class is the writer: one task on the event loop that started it takes
    every queued row into one batch (group commit: rows queued while a batch
    commits go in the next) and decides where it goes. While the spool
    (`_Spool`) holds rows (PostgreSQL was unreachable, or an earlier run left
    some), new rows go to the spool too and the replay (`_Replay`) moves the
    oldest ones to PostgreSQL in chunks, so rows reach PostgreSQL in the order
    they were recorded.
    """

    dialect = POSTGRES

    def __init__(
        self, url: str, *, password_env: str | None = None, spool: str = DEFAULT_SPOOL,
        durability: Durability = "process", connect_timeout_s: float = CONNECT_TIMEOUT_S,
        commit_timeout_s: float = COMMIT_TIMEOUT_S, retry_s: float = RETRY_S,
    ) -> None:
        self.url = postgres_url(url)
        self.password_env = password_env
        self.spool_path = sqlite_path(spool)
        self.durability: Durability = durability
        self.connect_timeout_s = connect_timeout_s
        self.commit_timeout_s = commit_timeout_s
        self.retry_s = retry_s
        self._spool = _Spool(self.spool_path, durability)
        self._replay = _Replay(self._spool)
        self._items: deque[_Item] = deque()
        self._wake = asyncio.Event()
        self._conn: asyncpg.Connection | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._writer: asyncio.Task[None] | None = None
        self._reconnector: asyncio.Task[None] | None = None
        self._closing = False
        self._closed = False
        self.mode: Mode = "spool"
        # For /metrics (tierq.metrics reads these names, as on the SQLite ledger).
        self.rows_committed = 0  # rows committed in PostgreSQL (replayed ones included)
        self.commit_errors = 0  # batches PostgreSQL refused (their rows, not the server)
        self.lag = Histogram(LAG_BUCKETS_S)
        self.batches = 0
        self.switches = 0  # mode changes, either way

    @property
    def spool_rows(self) -> int:
        """Rows in the spool file, waiting for PostgreSQL."""
        return self._spool.rows

    @property
    def spooled(self) -> int:
        """Rows this process wrote to the spool."""
        return self._spool.spooled

    @property
    def replayed(self) -> int:
        """Spooled rows this process moved to PostgreSQL."""
        return self._replay.replayed

    @property
    def replay_chunk(self) -> int:
        """Spooled rows moved to PostgreSQL per transaction."""
        return self._replay.chunk

    @replay_chunk.setter
    def replay_chunk(self, rows: int) -> None:
        self._replay.chunk = rows

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        if self._writer is not None:
            raise RuntimeError("ledger already started")
        self._loop = asyncio.get_running_loop()
        _password(self.password_env)  # a missing variable is a config error: say so now
        await self._spool.open()
        try:
            self._conn = await self._connect()
        except Exception as e:  # noqa: BLE001 - sorted below
            if _fatal_at_start(e):
                await self._spool.close()
                raise
            log.warning("ledger: PostgreSQL unreachable at start (%s): rows go to the spool "
                        "%s until it is back", _why(e), self.spool_path)
        if self._conn is not None and self.spool_rows == 0:
            self.mode = "postgresql"
        elif self._conn is not None:
            log.info("ledger: %d rows in the spool %s from an earlier run: replaying them "
                     "into PostgreSQL", self.spool_rows, self.spool_path)
        self._writer = self._loop.create_task(self._run(), name="tierq-pg-ledger-writer")
        self._reconnector = self._loop.create_task(self._reconnect_loop(),
                                                   name="tierq-pg-ledger-reconnect")

    async def close(self) -> None:
        """Write everything queued (to PostgreSQL, or the spool), then stop. Rows still
        in the spool stay there for the next start to replay."""
        if self._closed:
            return
        self._closed = True
        if self._writer is None:
            return
        self._closing = True
        self._wake.set()
        await self._writer
        if self._reconnector is not None:
            self._reconnector.cancel()
            try:
                await self._reconnector
            except asyncio.CancelledError:
                pass
        if self._conn is not None:
            try:
                await asyncio.wait_for(self._conn.close(), self.connect_timeout_s)
            except Exception:  # noqa: BLE001 - the server may be gone already
                self._conn.terminate()
            self._conn = None
        await self._spool.close()

    async def __aenter__(self) -> PostgresLedger:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ------------------------------------------------------------ writes

    def _put(self, row: LedgerRow | None, fut: asyncio.Future[None] | None) -> None:
        if self._writer is None or self._closed:
            raise RuntimeError("ledger is not running (call start(), and not after close())")
        if asyncio.get_running_loop() is not self._loop:
            raise RuntimeError("a PostgresLedger records from the event loop that started it")
        self._items.append((row, fut, time.monotonic_ns()))
        self._wake.set()

    async def record(self, row: LedgerRow) -> None:
        """Write `row`; return once it is durable. A repeated request_id is ignored."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._put(row, fut)
        await fut

    def record_nowait(self, row: LedgerRow) -> None:
        """Queue `row` without waiting (sheds: nothing was served, nothing to hold back)."""
        self._put(row, None)

    async def flush(self) -> None:
        """Return once everything queued before this call is durable."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._put(None, fut)
        await fut

    @property
    def pending(self) -> int:
        """Rows and barriers queued for the writer, not yet taken into a batch."""
        return len(self._items)

    # ------------------------------------------------------------ the writer

    async def _connect(self) -> asyncpg.Connection:
        conn = await pg_connect(self.url, self.password_env, self.connect_timeout_s)
        try:
            await asyncio.wait_for(migrate(conn), self.commit_timeout_s * 4)
        except BaseException:
            conn.terminate()
            raise
        return conn

    async def _reconnect_loop(self) -> None:
        while True:
            await asyncio.sleep(self.retry_s)
            if self._conn is not None and self._conn.is_closed():
                # The server closed it while idle (a restart): the next batch
                # must not find a connection that is gone.
                self._lost(self._conn, ConnectionError("connection closed by the server"),
                           "idle connection")
            if self._conn is None:
                try:
                    self._conn = await self._connect()
                except Exception as e:  # noqa: BLE001 - still unreachable; retried
                    log.debug("ledger: PostgreSQL still unreachable: %s", _why(e))
                    continue
                self._wake.set()  # the writer starts replaying the spool

    def _lost(self, conn: asyncpg.Connection, e: BaseException, what: str) -> None:
        """`conn` failed: drop it (only it: the reconnector may have made a new one
        meanwhile) and send rows to the spool until the replay empties it."""
        if self._conn is conn:
            self._conn = None
        conn.terminate()
        if self.mode == "postgresql":
            self.mode = "spool"
            self.switches += 1
            log.warning("ledger: PostgreSQL unreachable (%s, %s): rows go to the spool %s "
                        "until it is back", what, _why(e), self.spool_path)

    def _replay_due(self) -> bool:
        return self.mode == "spool" and self._conn is not None

    async def _run(self) -> None:
        while True:
            if not self._items and not self._replay_due():
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            batch: list[_Item] = []
            while self._items and len(batch) < MAX_BATCH:
                batch.append(self._items.popleft())
            try:
                if batch and not (self.mode == "postgresql" and await self._commit_pg(batch)):
                    await self._spool.write(batch)
                if self._replay_due():
                    await self._replay_chunk()
            except Exception:  # noqa: BLE001 - the writer must outlive any batch
                log.exception("ledger writer: unexpected error")
                self.commit_errors += 1
                await asyncio.sleep(self.retry_s)  # no busy loop on a lasting fault
            if self._closing and not self._items:
                return  # the spool's rows wait for the next start

    async def _commit_pg(self, batch: list[_Item]) -> bool:
        """True once the batch is settled (committed, or refused as rows); False
        when PostgreSQL could not be used and the batch must go to the spool."""
        conn = self._conn
        rows = [row for row, _, _ in batch if row is not None]
        if conn is None:
            return False
        try:
            if rows:
                await self._insert(conn, [row_values(r) for r in rows])
        except Exception as e:  # noqa: BLE001 - sorted by _unreachable
            if _unreachable(e):
                self._lost(conn, e, f"commit of {len(rows)} rows")
                return False
            self.commit_errors += 1
            log.error("ledger: PostgreSQL refused a batch of %d rows: %s", len(rows), e)
            _settle((f for _, f, _ in batch), e)
            return True
        if rows:
            self.batches += 1
            self.rows_committed += len(rows)
            self.lag.observe_us((time.monotonic_ns() - min(t for _, _, t in batch)) // 1000)
        _settle((f for _, f, _ in batch), None)
        return True

    async def _insert(self, conn: asyncpg.Connection, values: Sequence[Sequence[object]]) -> None:
        async def transaction() -> None:
            async with conn.transaction():
                await conn.execute(_INSERT, *_arrays(values))

        # One deadline over BEGIN, the insert and COMMIT (a server that stops
        # answering mid-transaction, a partition): past it the connection is
        # dropped and the rows go to the spool.
        await asyncio.wait_for(transaction(), self.commit_timeout_s)

    async def _replay_chunk(self) -> None:
        conn = self._conn
        assert conn is not None
        values = await self._replay.take()
        if values:
            try:
                await self._insert(conn, values)
            except Exception as e:  # noqa: BLE001
                if _unreachable(e):
                    self._lost(conn, e, f"replay of {len(values)} spooled rows")
                    return
                # A spooled row PostgreSQL refuses would block the replay forever:
                # it stays in the spool, said loudly, and the writer stops replaying.
                self.commit_errors += 1
                log.error("ledger: PostgreSQL refused %d spooled rows (%s); they stay in %s",
                          len(values), e, self.spool_path)
                raise
            self.rows_committed += len(values)
            await self._replay.moved(values)
        if self.spool_rows == 0:
            self.mode = "postgresql"
            self.switches += 1
            log.warning("ledger: PostgreSQL reachable: the spool %s is replayed (%d rows by "
                        "this process so far), rows go to PostgreSQL again",
                        self.spool_path, self.replayed)

    # ------------------------------------------------------------ reads (blocking)

    def _read(self, sql: str, params: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        async def run() -> list[tuple[Any, ...]]:
            conn = await pg_connect(self.url, self.password_env)
            try:
                return [tuple(r) for r in await conn.fetch(sql, *params)]
            finally:
                await conn.close()

        return _blocking(run)


def _why(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:200]


# ---------------------------------------------------------------- keys


class PostgresKeyStore:
    """API keys in the `keys` table of a PostgreSQL database every host shares.

    The same calls as tierq.keys.KeyStore. `authenticate` never waits on
    PostgreSQL: each host keeps the whole table in memory (public id -> key and
    secret hash) and re-reads it every `refresh_s` seconds, so a key created or
    revoked on any host is known to every host within `refresh_s` plus one
    query's time. A revocation through this same store takes effect at once. While
    PostgreSQL is unreachable the last copy read keeps serving (said in a log
    line), so an outage neither locks every client out nor revives a revoked key.

    The blocking calls (create, list, get, revoke) are for the CLI and admin paths;
    `await start()` / `await close()` run the refresh on the gateway's loop.
    """

    def __init__(self, url: str, *, password_env: str | None = None,
                 refresh_s: float = 2.0) -> None:
        self.url = postgres_url(url)
        self.password_env = password_env
        self.refresh_s = refresh_s
        # public_id -> (info, secret_sha256): a fresh dict swapped in by each refresh.
        self._table: dict[str, tuple[KeyInfo, str]] = {}
        self._revoked_here: dict[str, float] = {}  # public_id -> time.monotonic() of revoke
        self._task: asyncio.Task[None] | None = None
        self.loaded_at: float | None = None  # time.monotonic() of the last good read
        self._migrated = False
        self.refreshes = 0
        self._healthy = True
        self._wake: asyncio.Event | None = None  # set: refresh now, not in refresh_s

    # ------------------------------------------------------------ the gateway side

    async def start(self) -> None:
        """Read the table once (raising if PostgreSQL cannot be read: a gateway must
        not start without knowing its keys), then keep it fresh in the background."""
        await self._refresh()
        self._wake = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._refresh_loop(),
                                                            name="tierq-pg-keys-refresh")

    async def aclose(self) -> None:
        """Stop the refresh task."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    def __enter__(self) -> PostgresKeyStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def _refresh(self) -> None:
        started = time.monotonic()
        conn = await pg_connect(self.url, self.password_env)
        try:
            if not self._migrated:  # once per process; the refreshes only read
                await migrate(conn)
                self._migrated = True
            records = await conn.fetch(f"SELECT {_KEY_COLUMNS}, secret_sha256 FROM keys")
        finally:
            await conn.close()
        self._table = {r[0]: (_key_info(r), str(r["secret_sha256"])) for r in records}
        # A revocation made here is in every read that began after it; until then
        # it is kept here, so a read that raced it cannot bring the key back.
        self._revoked_here = {k: t for k, t in self._revoked_here.items() if t >= started}
        self.loaded_at = time.monotonic()
        self.refreshes += 1

    def forget_all(self) -> None:
        """Re-read the table now rather than in up to `refresh_s` (another worker of
        this host changed a key). Call on the gateway's loop, after `start()`."""
        if self._wake is not None:
            self._wake.set()

    async def _refresh_loop(self) -> None:
        assert self._wake is not None
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self.refresh_s)
            except TimeoutError:
                pass
            self._wake.clear()
            try:
                await asyncio.wait_for(self._refresh(), max(self.refresh_s, CONNECT_TIMEOUT_S) * 2)
            except Exception as e:  # noqa: BLE001 - keep the last copy
                if self._healthy:
                    log.warning("keys: PostgreSQL unreachable (%s): serving the key table read "
                                "%.1f s ago until it is back", _why(e),
                                time.monotonic() - (self.loaded_at or time.monotonic()))
                self._healthy = False
                continue
            if not self._healthy:
                log.warning("keys: PostgreSQL reachable again: key table refreshed")
            self._healthy = True

    def authenticate(self, bearer_token: str) -> KeyInfo | None:
        """The key for a bearer token, or None if malformed, unknown, revoked or wrong."""
        parsed = parse_token(bearer_token)
        if parsed is None:
            return None
        public_id, secret = parsed
        entry = self._table.get(public_id)
        if entry is None or public_id in self._revoked_here:
            return None
        info, secret_hash = entry
        # Constant time, so response timing does not reveal how much of a guess matched.
        if not hmac.compare_digest(secret_hash, hash_secret(secret)):
            return None
        return None if info.revoked else info

    # ------------------------------------------------------------ admin (blocking)

    def _run(self, work: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        async def run() -> T:
            conn = await pg_connect(self.url, self.password_env)
            try:
                await migrate(conn)
                return await work(conn)
            finally:
                await conn.close()

        return _blocking(run)

    def create(self, name: str, rpm: int | None = None, tpm: int | None = None, *,
               weight: float = 1.0, trusted: bool = False, priority_budget_usd: object = None,
               ramp_min_tpm: int = 0, ramp_max_growth: float | None = None,
               ramp_window_s: int = 900, enforce: bool = True) -> tuple[KeyInfo, str]:
        """A new key and its full token. The token is not stored: show it now or never."""
        blank = validate_new_key(name, rpm, tpm, weight, trusted,
                                 priority_budget_usd=priority_budget_usd,
                                 ramp_min_tpm=ramp_min_tpm, ramp_max_growth=ramp_max_growth,
                                 ramp_window_s=ramp_window_s, enforce=enforce)
        secret = secrets.token_urlsafe(24)
        now = time.time()

        async def insert(conn: asyncpg.Connection) -> str:
            while True:
                public_id = "".join(secrets.choice(PUBLIC_ALPHABET) for _ in range(PUBLIC_ID_LEN))
                done = await conn.fetchval(
                    "INSERT INTO keys (public_id, name, secret_sha256, created, revoked, rpm, tpm,"
                    " weight, trusted, priority_budget_usd, ramp_min_tpm, ramp_max_growth,"
                    " ramp_window_s, enforce) VALUES ($1, $2, $3, $4, NULL, $5, $6, $7, $8, $9,"
                    " $10, $11, $12, $13) ON CONFLICT (public_id) DO NOTHING RETURNING public_id",
                    public_id, name, hash_secret(secret), now, rpm, tpm, blank.weight, trusted,
                    budget_text(blank.priority_budget_usd), blank.ramp_min_tpm,
                    blank.ramp_max_growth, blank.ramp_window_s, blank.enforce)
                if done is not None:
                    return public_id

        public_id = self._run(insert)
        info = dataclasses.replace(blank, public_id=public_id, created=now)
        # Known at once through this store (the admin API's), elsewhere within refresh_s.
        self._table = {**self._table, public_id: (info, hash_secret(secret))}
        return info, f"{PREFIX}-{public_id}-{secret}"

    def list(self) -> builtins.list[KeyInfo]:
        async def fetch(conn: asyncpg.Connection) -> builtins.list[KeyInfo]:
            return [_key_info(r) for r in await conn.fetch(
                f'SELECT {_KEY_COLUMNS} FROM keys ORDER BY created, public_id COLLATE "C"')]

        return self._run(fetch)

    def get(self, public_id: str) -> KeyInfo | None:
        async def fetch(conn: asyncpg.Connection) -> KeyInfo | None:
            r = await conn.fetchrow(f"SELECT {_KEY_COLUMNS} FROM keys WHERE public_id = $1",
                                    public_id)
            return None if r is None else _key_info(r)

        return self._run(fetch)

    def update(self, public_id: str, **changes: Any) -> KeyInfo | None:
        """As tierq.keys.KeyStore.update: at once on this host, within `refresh_s`
        on the others."""
        async def change(conn: asyncpg.Connection) -> KeyInfo | None:
            async with conn.transaction():
                r = await conn.fetchrow(f"SELECT {_KEY_COLUMNS} FROM keys WHERE public_id = $1"
                                        " AND revoked IS NULL FOR UPDATE", public_id)
                if r is None:
                    return None
                new = updated(_key_info(r), **changes)
                await conn.execute(
                    "UPDATE keys SET name = $1, rpm = $2, tpm = $3, weight = $4, trusted = $5,"
                    " priority_budget_usd = $6, ramp_min_tpm = $7, ramp_max_growth = $8,"
                    " ramp_window_s = $9, enforce = $10 WHERE public_id = $11", new.name, new.rpm,
                    new.tpm, new.weight, new.trusted, budget_text(new.priority_budget_usd),
                    new.ramp_min_tpm, new.ramp_max_growth, new.ramp_window_s, new.enforce,
                    public_id)
                return new

        new = self._run(change)
        entry = self._table.get(public_id)
        if new is not None and entry is not None:
            self._table = {**self._table, public_id: (new, entry[1])}
        return new

    def revoke(self, public_id: str) -> bool:
        """True if a live key was revoked now; False if unknown or already revoked."""
        async def update(conn: asyncpg.Connection) -> bool:
            status = await conn.execute(
                "UPDATE keys SET revoked = $1 WHERE public_id = $2 AND revoked IS NULL",
                time.time(), public_id)
            return status == "UPDATE 1"

        changed = self._run(update)
        self._revoked_here[public_id] = time.monotonic()  # at once here; elsewhere within refresh_s
        return changed


def _key_info(r: asyncpg.Record) -> KeyInfo:
    return KeyInfo(public_id=r[0], name=r[1], created=r[2], revoked_at=r[3],
                   rpm=None if r[4] is None else int(r[4]), tpm=None if r[5] is None else int(r[5]),
                   weight=float(r[6]), trusted=bool(r[7]),
                   priority_budget_usd=None if r[8] is None else Decimal(r[8]),
                   ramp_min_tpm=int(r[9]),
                   ramp_max_growth=None if r[10] is None else float(r[10]),
                   ramp_window_s=int(r[11]), enforce=bool(r[12]))
