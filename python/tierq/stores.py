"""Which store a URL opens: the ledger and the API key store, in SQLite (one host) or
PostgreSQL (several hosts sharing one database). tierq.storage says which URLs are
built (`store_kind`); this module is the one place that turns them into objects,
and `LedgerStore` / `KeyStoreLike` are the calls every backend answers.
"""

from __future__ import annotations

import builtins
from collections.abc import Sequence
from types import ModuleType
from typing import Any, Protocol

from tierq.config import KeysConfig, LedgerConfig
from tierq.keys import KeyInfo, KeyStore
from tierq.ledger import Ledger, LedgerRow, UsageLine
from tierq.storage import DEFAULT_SPOOL, Durability, shown_url, sqlite_path, store_kind

__all__ = [
    "KeyStoreLike",
    "LedgerStore",
    "StoreUnavailable",
    "close_key_store",
    "ledger_from_config",
    "open_key_store",
    "open_ledger",
    "require_postgres",
    "start_key_store",
]


class StoreUnavailable(RuntimeError):
    """A store the gateway cannot start without could not be read; str(e) is one
    line naming it (password masked) and why."""


class LedgerStore(Protocol):
    """The usage ledger as its callers see it (tierq.ledger.Ledger, PostgresLedger).

    `record` returns once the row is durable (the rule a served response's last
    byte waits on); `record_nowait` queues a row nobody waits on (sheds). The read
    helpers block: CLI, tests and admin paths only.
    """

    async def start(self) -> None: ...
    async def close(self) -> None: ...
    async def record(self, row: LedgerRow) -> None: ...
    def record_nowait(self, row: LedgerRow) -> None: ...
    async def flush(self) -> None: ...
    @property
    def pending(self) -> int: ...
    def get(self, request_id: str) -> LedgerRow | None: ...
    def rows(self, request_id: str | None = None) -> builtins.list[LedgerRow]: ...
    def count(self) -> int: ...
    def usage(self, since: float | None = None, key_id: str | None = None,
              model: str | None = None,
              by_fairness_id: bool = False) -> builtins.list[UsageLine]: ...


class KeyStoreLike(Protocol):
    """The API key store (tierq.keys.KeyStore, PostgresKeyStore)."""

    def authenticate(self, bearer_token: str) -> KeyInfo | None: ...
    def create(self, name: str, rpm: int | None = None, tpm: int | None = None, *,
               weight: float = 1.0, trusted: bool = False, priority_budget_usd: object = None,
               ramp_min_tpm: int = 0, ramp_max_growth: float | None = None,
               ramp_window_s: int = 900, enforce: bool = True) -> tuple[KeyInfo, str]: ...
    def list(self) -> builtins.list[KeyInfo]: ...
    def get(self, public_id: str) -> KeyInfo | None: ...
    def revoke(self, public_id: str) -> bool: ...
    # `tierq.keys.updated`'s keywords; a field not given stays.
    def update(self, public_id: str, **changes: Any) -> KeyInfo | None: ...
    def forget_all(self) -> None: ...
    def close(self) -> None: ...
    async def aclose(self) -> None: ...


def _postgres() -> ModuleType:
    # Imported on first use: asyncpg is an optional dependency (the `postgres` extra),
    # and a gateway on SQLite never loads it.
    try:
        import tierq.postgres
    except ImportError as e:
        raise RuntimeError(f"a postgresql:// url needs asyncpg ({e}): "
                           "pip install 'tierq[postgres]'") from None
    return tierq.postgres


def require_postgres(key: str, url: str) -> None:
    """Refuse a postgresql:// `key` (e.g. "[ledger] url") when asyncpg cannot be
    imported: RuntimeError, one line naming the extra."""
    if store_kind(url) == "postgresql":
        try:
            _postgres()
        except RuntimeError as e:
            raise RuntimeError(f"{key} {shown_url(url)}: {e}") from None


def open_ledger(url: str, durability: Durability = "process", *,
                password_env: str | None = None, spool: str = DEFAULT_SPOOL) -> LedgerStore:
    """The ledger a `[ledger] url` names (call `await start()`): sqlite:///path or a
    plain path -> tierq.ledger.Ledger; postgresql://... -> PostgresLedger, spooling
    to `spool` while PostgreSQL is unreachable. ValueError for any other URL."""
    if store_kind(url) == "postgresql":
        ledger: LedgerStore = _postgres().PostgresLedger(
            url, password_env=password_env, spool=spool, durability=durability)
        return ledger
    return Ledger(sqlite_path(url), durability)


def ledger_from_config(cfg: LedgerConfig) -> LedgerStore:
    return open_ledger(cfg.url, cfg.durability, password_env=cfg.password_env, spool=cfg.spool)


def open_key_store(url: str, *, password_env: str | None = None,
                   refresh_s: float = 2.0) -> KeyStoreLike:
    """The key store a `[keys] path`/`url` names, for blocking use (`tierq keys`)."""
    if store_kind(url) == "postgresql":
        store: KeyStoreLike = _postgres().PostgresKeyStore(
            url, password_env=password_env, refresh_s=refresh_s)
        return store
    return KeyStore(url)


async def start_key_store(cfg: KeysConfig) -> KeyStoreLike | None:
    """The gateway's key store, ready to authenticate; None without `[keys]`."""
    if cfg.path is None:
        return None
    if store_kind(cfg.path) == "postgresql":
        pg: KeyStoreLike = _postgres().PostgresKeyStore(
            cfg.path, password_env=cfg.password_env, refresh_s=cfg.refresh_s)
        try:
            await pg.start()  # type: ignore[attr-defined]  # reads the table once, then refreshes
        except Exception as e:  # noqa: BLE001 - asyncpg's errors, OSError, a timeout: one line
            # No request could be authenticated without the table: the gateway
            # does not start (a supervisor restarts it), rather than serve 401s.
            why = (str(e).strip() or type(e).__name__).splitlines()[0][:200]
            raise StoreUnavailable(f"[keys] url {shown_url(cfg.path)}: could not read the key "
                                   f"table at start ({why}); not serving without it") from None
        return pg
    return KeyStore(cfg.path, cache_ttl_s=cfg.cache_ttl_s)


async def close_key_store(store: KeyStoreLike) -> None:
    await store.aclose()


def usage_of(url: str, *, password_env: str | None = None, since: float | None = None,
             key_id: str | None = None, model: str | None = None,
             by_fairness_id: bool = False) -> Sequence[UsageLine]:
    """The usage sums of the ledger at `url` (blocking; `tierq usage`)."""
    if store_kind(url) == "postgresql":
        lines: Sequence[UsageLine] = _postgres().PostgresLedger(
            url, password_env=password_env).usage(since, key_id, model, by_fairness_id)
        return lines
    return Ledger(sqlite_path(url)).usage(since=since, key_id=key_id, model=model,
                                          by_fairness_id=by_fairness_id)
