"""Storage rules every store shares: which URLs name which backend, the SQLite
path a URL names, the busy timeout on a shared SQLite file, how durable a commit
is, and how a store URL is shown in a log line.

The bottom floor under the ledger, the key store, PostgreSQL and the settings:
none of them needs tierq.config (or any TOML) to know these.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from typing import Final, Literal, TypeVar

import yarl

__all__ = [
    "DEFAULT_LEDGER_URL",
    "DEFAULT_SPOOL",
    "Durability",
    "PG_SCHEMES",
    "SQLITE_BUSY_TIMEOUT_MS",
    "StoreKind",
    "postgres_url",
    "shown_url",
    "sqlite_path",
    "store_kind",
    "while_busy",
]

# Ledger durability (tierq.ledger): "process" = WAL + synchronous=NORMAL (a
# committed row survives kill -9), "power" = synchronous=FULL (survives power loss).
Durability = Literal["process", "power"]
DEFAULT_LEDGER_URL: Final = "sqlite:///tierq.db"
# Where a PostgreSQL ledger keeps the rows it could not write while PostgreSQL
# was unreachable (a SQLite file of the ledger's schema), until they are replayed.
DEFAULT_SPOOL: Final = "tierq-spool.db"
#: The backends a `[ledger] url` or `[keys] url` can name (tierq.stores opens them).
StoreKind = Literal["sqlite", "postgresql"]
PG_SCHEMES: Final = ("postgresql", "postgres")

#: The ledger and the key store may share one SQLite file; both wait this long for its lock.
SQLITE_BUSY_TIMEOUT_MS: Final = 5000

_T = TypeVar("_T")


def while_busy(step: Callable[[], _T]) -> _T:
    """Runs `step` again while SQLite answers it busy, for up to the busy timeout
    (the Rust writer's `while_busy` in core/ledger.rs is the same rule). The busy
    handler covers most waits, but not the ones SQLite's deadlock rule answers at
    once: on a file still in rollback mode one opener's switch to WAL meets
    another's `BEGIN IMMEDIATE` and is refused without waiting."""
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            return step()
        except sqlite3.OperationalError as e:
            busy = getattr(e, "sqlite_errorcode", None) in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
            if not busy or time.monotonic() >= deadline:
                raise
        time.sleep(0.005)


def sqlite_path(url_or_path: str) -> str:
    """`sqlite:///rel.db` -> 'rel.db', `sqlite:////abs/x.db` -> '/abs/x.db', plain paths as is."""
    if "://" not in url_or_path:
        if not url_or_path:
            raise ValueError("ledger path is empty")
        return url_or_path
    scheme = url_or_path.split("://", 1)[0].lower()
    if scheme in PG_SCHEMES:
        # Only the scheme is echoed: a database URL may carry a password.
        raise ValueError(f"ledger url scheme {scheme!r} names PostgreSQL, not a SQLite file")
    if scheme != "sqlite":
        raise ValueError(
            f"ledger url scheme {scheme!r} is not supported; use sqlite:///relative.db, "
            "sqlite:////absolute/path.db or postgresql://user@host:port/database"
        )
    if not url_or_path.startswith("sqlite:///"):
        raise ValueError("sqlite ledger url must look like sqlite:///relative.db or sqlite:////abs.db")
    path = url_or_path[len("sqlite:///"):]
    if not path or path == ":memory:":
        # The writer and the readers use separate connections; memory is per connection.
        raise ValueError("sqlite ledger url needs a file path (in-memory databases are not shared)")
    return path


#: Query parameters a postgresql:// URL may carry (asyncpg reads them).
PG_URL_PARAMS: Final = frozenset({"sslmode"})
_SSLMODES: Final = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")


def postgres_url(url: str) -> str:
    """`url` if it is a postgresql://user[:password]@host[:port]/database tierq can use.

    Errors never quote the URL, which may carry a password.
    """
    try:
        u = yarl.URL(url)
    except ValueError:
        raise ValueError("not a valid postgresql:// url") from None
    if u.scheme.lower() not in PG_SCHEMES:
        raise ValueError("expected a postgresql:// url")
    if not u.host:
        raise ValueError("postgresql url needs a host (postgresql://user@host:port/database)")
    if not u.user:
        raise ValueError("postgresql url needs a user (postgresql://user@host:port/database)")
    db = u.path.lstrip("/")
    if not db or "/" in db:
        raise ValueError("postgresql url needs one database name as its path (.../database)")
    extra = sorted(set(u.query) - PG_URL_PARAMS)
    if extra:
        raise ValueError(f"postgresql url parameter {extra[0]!r} is not supported "
                         f"(only {', '.join(sorted(PG_URL_PARAMS))})")
    mode = u.query.get("sslmode")
    if mode is not None and mode not in _SSLMODES:
        raise ValueError(f"postgresql url sslmode must be one of {', '.join(_SSLMODES)}")
    if u.fragment:
        raise ValueError("postgresql url must not have a fragment")
    return url


def shown_url(url: str) -> str:
    """A store URL fit for a log line: any password replaced by ***."""
    if "://" not in url:
        return url
    try:
        u = yarl.URL(url)
    except ValueError:
        return url.split("://", 1)[0] + "://..."
    return str(u.with_password("***")) if u.password is not None else url


def store_kind(url_or_path: str) -> StoreKind:
    """Which backend a `[ledger] url` / `[keys] url` names; ValueError if none is built.

    The one place that knows which store URLs are built: tierq.stores opens what
    this accepts.
    """
    if "://" in url_or_path and url_or_path.split("://", 1)[0].lower() in PG_SCHEMES:
        postgres_url(url_or_path)
        return "postgresql"
    sqlite_path(url_or_path)
    return "sqlite"
