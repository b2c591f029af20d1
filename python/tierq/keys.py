"""API keys: created and shown once, stored hashed in SQLite, checked on every request,
and per-key requests-per-minute / tokens-per-minute limits over the Rust token bucket.

A key reads `tq-<public id>-<secret>`; the public id is what logs and the ledger show.
Each key also carries its fair-queuing `weight` and whether it is `trusted` to split
its traffic into flows of its own (the `x-tierq-fairness-id` header, tierq.intake),
and what downgrades its priority requests (tierq.downgrades): a daily priority
budget and a ramp rule.
"""

from __future__ import annotations

import builtins
import dataclasses
import enum
import hashlib
import hmac
import logging
import math
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any, Final

from tierq._core import ManualClock, SharedBucket, SharedKeyBuckets, TokenBucket
from tierq.shadow import KEY_RPM, KEY_TPM
from tierq.storage import SQLITE_BUSY_TIMEOUT_MS, sqlite_path, while_busy

__all__ = [
    "KEEP",
    "MAX_BUDGET_USD",
    "MAX_LIMIT",
    "MAX_RAMP_GROWTH",
    "MAX_WEIGHT",
    "MIN_WEIGHT",
    "NO_SETTLEMENT",
    "RAMP_WINDOW_RANGE",
    "KeyInfo",
    "KeyLimiter",
    "KeyRefusal",
    "KeyStore",
    "Settlement",
    "budget_text",
    "hash_secret",
    "parse_public_id",
    "parse_token",
    "updated",
    "validate_key",
    "validate_new_key",
]

log = logging.getLogger("tierq.keys")

PREFIX: Final = "tq"
PUBLIC_ID_LEN: Final = 12
SECRET_LEN: Final = 32
TOKEN_LEN: Final = len(PREFIX) + 1 + PUBLIC_ID_LEN + 1 + SECRET_LEN
PUBLIC_ALPHABET: Final = "abcdefghijklmnopqrstuvwxyz0123456789"
# The public id never contains '-', so the first two dashes split the token even
# though the urlsafe secret may contain dashes itself.
_TOKEN: Final = re.compile(r"tq-([a-z0-9]{12})-([A-Za-z0-9_-]{32})")
_PUBLIC_ID: Final = re.compile(r"[a-z0-9]{12}")
CACHE_TTL_S: Final = 5.0
CACHE_MAX: Final = 10_000
# A token that failed (unknown public id, wrong secret, revoked) is refused from
# memory for this long, so a client retrying a bad key costs no SQLite read.
# It is also the bound on a key created by another process (`tierq keys
# create`) being accepted if its token was tried just before it existed.
DENIED_TTL_S: Final = 1.0
DENIED_MAX: Final = 4096  # oldest dropped first: a flood of fresh tokens cannot grow it

# A key's fair-queuing weight: its share of a busy lane against a key of weight 1.
MIN_WEIGHT: Final = 0.01
MAX_WEIGHT: Final = 100.0
# The largest rpm or tpm a key may have (a trillion a minute): what the stores'
# 64-bit integers and the buckets' floats hold exactly.
MAX_LIMIT: Final = 10**12
# A key's priority budget per UTC day: whole nano-USD (what the shared counters
# hold, core/keytable.rs), up to this many USD.
MAX_BUDGET_USD: Final = Decimal(100_000)
BUDGET_DECIMALS: Final = 9
# The ramp rule's window (seconds) and growth over it.
RAMP_WINDOW_RANGE: Final = (60, 86_400)
MAX_RAMP_GROWTH: Final = 100.0

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS keys (
    public_id     TEXT PRIMARY KEY,
    name          TEXT NOT NULL,
    secret_sha256 TEXT NOT NULL,
    created       REAL NOT NULL,
    revoked       REAL,
    rpm           INTEGER,
    tpm           INTEGER,
    weight        REAL NOT NULL DEFAULT 1.0,
    trusted       INTEGER NOT NULL DEFAULT 0,
    priority_budget_usd TEXT,
    ramp_min_tpm    INTEGER NOT NULL DEFAULT 0,
    ramp_max_growth REAL,
    ramp_window_s   INTEGER NOT NULL DEFAULT 900,
    enforce       INTEGER NOT NULL DEFAULT 1
)
"""
# Columns added after the first schema, each with the ALTER TABLE that adds it
# to a key file an older tierq made (the defaults are what those keys meant).
_ADDED_COLUMNS: Final = (
    ("weight", "ALTER TABLE keys ADD COLUMN weight REAL NOT NULL DEFAULT 1.0"),
    ("trusted", "ALTER TABLE keys ADD COLUMN trusted INTEGER NOT NULL DEFAULT 0"),
    # The downgrades (exact decimal text; NULL: none).
    ("priority_budget_usd", "ALTER TABLE keys ADD COLUMN priority_budget_usd TEXT"),
    ("ramp_min_tpm", "ALTER TABLE keys ADD COLUMN ramp_min_tpm INTEGER NOT NULL DEFAULT 0"),
    ("ramp_max_growth", "ALTER TABLE keys ADD COLUMN ramp_max_growth REAL"),
    ("ramp_window_s", "ALTER TABLE keys ADD COLUMN ramp_window_s INTEGER NOT NULL DEFAULT 900"),
    # 0: the key's limits in shadow mode (counted, not applied).
    ("enforce", "ALTER TABLE keys ADD COLUMN enforce INTEGER NOT NULL DEFAULT 1"),
)
_COLUMNS: Final = ("public_id, name, created, revoked, rpm, tpm, weight, trusted, "
                   "priority_budget_usd, ramp_min_tpm, ramp_max_growth, ramp_window_s, enforce")


class Keep(enum.Enum):
    """`update`'s "leave this field as it is"."""

    KEEP = 0


KEEP: Final = Keep.KEEP


@dataclass(slots=True, frozen=True)
class KeyInfo:
    """What the gateway knows about a key; never holds the secret or its hash."""

    public_id: str
    name: str
    created: float
    revoked_at: float | None
    rpm: int | None  # None = unlimited
    tpm: int | None
    weight: float = 1.0  # its fair share of a busy lane, MIN_WEIGHT..MAX_WEIGHT
    trusted: bool = False  # may split its traffic into flows (x-tierq-fairness-id)
    # Priority spend per UTC day, past which its priority requests are served
    # default (reason "budget"); None: no budget.
    priority_budget_usd: Decimal | None = None
    # The ramp rule, on when ramp_max_growth is set: above ramp_min_tpm, its
    # priority tokens per minute may grow by at most ramp_max_growth over
    # ramp_window_s; the excess is served default (reason "ramp").
    ramp_min_tpm: int = 0
    ramp_max_growth: float | None = None
    ramp_window_s: int = 900
    # False: its limits (rpm, tpm) and downgrades run in shadow mode: each
    # refusal or downgrade is decided and counted (tierq.shadow), none applied
    enforce: bool = True

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None


def _info(r: tuple[Any, ...]) -> KeyInfo:
    return KeyInfo(public_id=r[0], name=r[1], created=r[2], revoked_at=r[3], rpm=r[4], tpm=r[5],
                   weight=float(r[6]), trusted=bool(r[7]),
                   priority_budget_usd=None if r[8] is None else Decimal(r[8]),
                   ramp_min_tpm=int(r[9]), ramp_max_growth=None if r[10] is None else float(r[10]),
                   ramp_window_s=int(r[11]), enforce=bool(r[12]))


def budget_text(budget: Decimal | None) -> str | None:
    """A budget as the stores keep it: exact fixed-point text (None: none)."""
    return None if budget is None else format(budget.normalize(), "f")


def _budget(value: object) -> Decimal | None:
    """A budget as given (a Decimal, or an int, str or float as JSON and the CLI
    have it) as an exact Decimal; ValueError naming `priority_budget_usd`."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (Decimal, int, str, float)):
        raise ValueError("priority_budget_usd must be a decimal number of USD or None (no budget)")
    try:
        # A float is taken as it prints (0.1 is "0.1", not its binary expansion).
        d = Decimal(repr(value) if isinstance(value, float) else value)
    except InvalidOperation:
        raise ValueError(f"priority_budget_usd must be a decimal number, got {value!r}") from None
    if not d.is_finite() or d < 0 or d > MAX_BUDGET_USD:
        raise ValueError(f"priority_budget_usd must be from 0 to {MAX_BUDGET_USD} USD a day, "
                         f"got {value!r}")
    if d.scaleb(BUDGET_DECIMALS) != d.scaleb(BUDGET_DECIMALS).to_integral_value():
        raise ValueError(f"priority_budget_usd has more than {BUDGET_DECIMALS} decimals "
                         f"(nano-USD): {value!r}")
    return d


def hash_secret(secret: str) -> str:
    # A fast hash is the right tool here, unlike for passwords: the secret is 192
    # random bits, so there is nothing to brute-force, and a slow KDF (bcrypt,
    # argon2) would add milliseconds to every request that misses the cache.
    return hashlib.sha256(secret.encode("ascii")).hexdigest()


def validate_key(info: KeyInfo) -> None:
    """ValueError unless `info`'s name, limits, weight and trust are what a key may
    have (a new key, or what an update leaves)."""
    for label, limit in (("rpm", info.rpm), ("tpm", info.tpm)):
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int)
                                  or not 1 <= limit <= MAX_LIMIT):
            raise ValueError(f"{label} must be a positive integer up to {MAX_LIMIT} "
                             "or None (unlimited)")
    if not isinstance(info.name, str) or not info.name or len(info.name) > 200:
        raise ValueError("key name must be 1 to 200 characters")
    w = info.weight
    if (isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w)
            or not MIN_WEIGHT <= w <= MAX_WEIGHT):
        raise ValueError(f"weight must be a number from {MIN_WEIGHT:g} to {MAX_WEIGHT:g}, "
                         f"got {w!r}")
    if not isinstance(info.trusted, bool):
        raise ValueError("trusted must be true or false")
    _budget(info.priority_budget_usd)
    m = info.ramp_min_tpm
    if isinstance(m, bool) or not isinstance(m, int) or not 0 <= m <= MAX_LIMIT:
        raise ValueError(f"ramp_min_tpm must be an integer from 0 to {MAX_LIMIT}, got {m!r}")
    g = info.ramp_max_growth
    if g is not None and (isinstance(g, bool) or not isinstance(g, (int, float))
                          or not math.isfinite(g) or not 0 < g <= MAX_RAMP_GROWTH):
        raise ValueError(f"ramp_max_growth must be a number above 0 and at most "
                         f"{MAX_RAMP_GROWTH:g} (0.5: 50% over the window) or None (no ramp "
                         f"rule), got {g!r}")
    lo, hi = RAMP_WINDOW_RANGE
    s = info.ramp_window_s
    if isinstance(s, bool) or not isinstance(s, int) or not lo <= s <= hi:
        raise ValueError(f"ramp_window_s must be an integer from {lo} to {hi} seconds, got {s!r}")
    if not isinstance(info.enforce, bool):
        raise ValueError("enforce must be true or false (false: its limits in shadow mode)")


def _normal(info: KeyInfo) -> KeyInfo:
    """A valid key's numbers as the stores keep them (an int weight or growth as a
    float, the budget as an exact Decimal)."""
    g = info.ramp_max_growth
    return dataclasses.replace(info, weight=float(info.weight),
                               ramp_max_growth=None if g is None else float(g),
                               priority_budget_usd=_budget(info.priority_budget_usd))


def validate_new_key(name: str, rpm: int | None, tpm: int | None, weight: float = 1.0,
                     trusted: bool = False, *, priority_budget_usd: object = None,
                     ramp_min_tpm: int = 0, ramp_max_growth: float | None = None,
                     ramp_window_s: int = 900, enforce: bool = True) -> KeyInfo:
    """What a new key of these settings holds (public id and times left blank);
    ValueError unless they are what a key may have."""
    info = KeyInfo("", name, 0.0, None, rpm, tpm, weight, trusted,
                   priority_budget_usd, ramp_min_tpm, ramp_max_growth,  # type: ignore[arg-type]
                   ramp_window_s, enforce)
    validate_key(info)
    return _normal(info)


def updated(info: KeyInfo, *, name: str | Keep = KEEP, rpm: int | None | Keep = KEEP,
            tpm: int | None | Keep = KEEP, weight: float | Keep = KEEP,
            trusted: bool | Keep = KEEP, priority_budget_usd: object = KEEP,
            ramp_min_tpm: int | Keep = KEEP, ramp_max_growth: float | None | Keep = KEEP,
            ramp_window_s: int | Keep = KEEP, enforce: bool | Keep = KEEP) -> KeyInfo:
    """`info` with the fields given changed; ValueError unless the result is a valid key."""
    new = KeyInfo(info.public_id, info.name if name is KEEP else name, info.created,
                  info.revoked_at, info.rpm if rpm is KEEP else rpm,
                  info.tpm if tpm is KEEP else tpm, info.weight if weight is KEEP else weight,
                  info.trusted if trusted is KEEP else trusted,
                  info.priority_budget_usd if priority_budget_usd is KEEP
                  else priority_budget_usd,  # type: ignore[arg-type]
                  info.ramp_min_tpm if ramp_min_tpm is KEEP else ramp_min_tpm,
                  info.ramp_max_growth if ramp_max_growth is KEEP else ramp_max_growth,
                  info.ramp_window_s if ramp_window_s is KEEP else ramp_window_s,
                  info.enforce if enforce is KEEP else enforce)
    validate_key(new)
    return _normal(new)


def parse_token(token: object) -> tuple[str, str] | None:
    """`(public_id, secret)` of a well-formed key, else None. Never raises."""
    # The length check comes first so a huge hostile string costs nothing.
    if not isinstance(token, str) or len(token) != TOKEN_LEN:
        return None
    m = _TOKEN.fullmatch(token)
    return (m.group(1), m.group(2)) if m else None


def parse_public_id(text: str) -> str | None:
    """A key's public id from `<id>` or `tq-<id>` as an operator types it; None if malformed."""
    public_id = text.removeprefix(f"{PREFIX}-")
    return public_id if _PUBLIC_ID.fullmatch(public_id) else None


class KeyStore:
    """Keys in the `keys` table of a SQLite file (by default the ledger's).

    `authenticate` caches a successful lookup for `cache_ttl_s` seconds (keyed by
    the hash of the whole token), so the hot path does not touch SQLite; the price
    is that a revocation made by another process takes effect within that TTL.
    A revocation through this same store takes effect at once. A failed lookup
    is cached too, for `denied_ttl_s` (at most `DENIED_MAX` tokens, oldest
    dropped first): a key created by another process is accepted within that
    TTL of being tried, and a malformed token never reaches SQLite at all.
    """

    def __init__(
        self,
        path: str,
        cache_ttl_s: float = CACHE_TTL_S,
        clock: Callable[[], float] = time.monotonic,
        denied_ttl_s: float = DENIED_TTL_S,
    ) -> None:
        self.path = sqlite_path(path)
        self.cache_ttl_s = cache_ttl_s
        self.denied_ttl_s = denied_ttl_s
        self._clock = clock
        self._cache: dict[bytes, tuple[KeyInfo, float]] = {}
        self._denied: dict[bytes, float] = {}  # token hash -> refused until (clock)
        self.lookups = 0  # SQLite reads made by authenticate (what the caches save)
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._conn.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        while_busy(lambda: self._conn.execute("PRAGMA journal_mode = WAL"))  # shares the file with the ledger
        # Key writes are rare and a lost revocation is a security bug: fsync them.
        self._conn.execute("PRAGMA synchronous = FULL")
        while_busy(self._migrate)

    def _migrate(self) -> None:
        """Create the table, or add the columns a key file from an older tierq lacks.
        One IMMEDIATE transaction, so two processes opening an old file at once add
        each column once."""
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute(_SCHEMA)
            have = {r[1] for r in conn.execute("PRAGMA table_info(keys)")}
            for column, ddl in _ADDED_COLUMNS:
                if column not in have:
                    conn.execute(ddl)
                    log.info("key store %s: added the keys.%s column", self.path, column)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    async def aclose(self) -> None:
        """`close()` for the gateway's shutdown, which also stops a PostgresKeyStore."""
        self.close()

    def __enter__(self) -> KeyStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _query(self, sql: str, params: tuple[object, ...] = ()) -> builtins.list[tuple[Any, ...]]:
        with self._lock:
            return self._conn.execute(sql, params).fetchall()

    def create(
        self, name: str, rpm: int | None = None, tpm: int | None = None, *,
        weight: float = 1.0, trusted: bool = False, priority_budget_usd: object = None,
        ramp_min_tpm: int = 0, ramp_max_growth: float | None = None, ramp_window_s: int = 900,
        enforce: bool = True,
    ) -> tuple[KeyInfo, str]:
        """A new key and its full token. The token is not stored: show it now or never."""
        blank = validate_new_key(name, rpm, tpm, weight, trusted,
                                 priority_budget_usd=priority_budget_usd,
                                 ramp_min_tpm=ramp_min_tpm, ramp_max_growth=ramp_max_growth,
                                 ramp_window_s=ramp_window_s, enforce=enforce)
        secret = secrets.token_urlsafe(24)  # 24 bytes -> 32 chars, 192 bits
        assert len(secret) == SECRET_LEN
        now = time.time()
        while True:
            public_id = "".join(secrets.choice(PUBLIC_ALPHABET) for _ in range(PUBLIC_ID_LEN))
            try:
                self._query(
                    "INSERT INTO keys (public_id, name, secret_sha256, created, revoked, rpm, tpm,"
                    " weight, trusted, priority_budget_usd, ramp_min_tpm, ramp_max_growth,"
                    " ramp_window_s, enforce) VALUES (?, ?, ?, ?, NULL, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (public_id, name, hash_secret(secret), now, rpm, tpm, blank.weight,
                     int(trusted), budget_text(blank.priority_budget_usd), blank.ramp_min_tpm,
                     blank.ramp_max_growth, blank.ramp_window_s, int(blank.enforce)),
                )
                break
            except sqlite3.IntegrityError:  # a public id collision (36^12): draw again
                continue
        info = dataclasses.replace(blank, public_id=public_id, created=now)
        return info, f"{PREFIX}-{public_id}-{secret}"

    def list(self) -> builtins.list[KeyInfo]:
        return [_info(r) for r in self._query(f"SELECT {_COLUMNS} FROM keys ORDER BY created, public_id")]

    def get(self, public_id: str) -> KeyInfo | None:
        found = self._query(f"SELECT {_COLUMNS} FROM keys WHERE public_id = ?", (public_id,))
        return _info(found[0]) if found else None

    def revoke(self, public_id: str) -> bool:
        """True if a live key was revoked now; False if unknown or already revoked."""
        with self._lock:
            cur = self._conn.execute(
                "UPDATE keys SET revoked = ? WHERE public_id = ? AND revoked IS NULL",
                (time.time(), public_id),
            )
            self._forget(public_id)
        return cur.rowcount == 1

    def update(self, public_id: str, **changes: Any) -> KeyInfo | None:
        """Change a live key's fields (`updated`'s keywords: name, limits (None:
        unlimited), weight, trust, budget, ramp rule, enforce); the fields not given stay. Returns the key as it now is, or None if unknown or
        revoked; ValueError (and nothing changed) unless the result is a valid key.
        Takes effect at once through this store, within `cache_ttl_s` in others."""
        with self._lock:
            conn = self._conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                found = conn.execute(f"SELECT {_COLUMNS} FROM keys WHERE public_id = ?"
                                     " AND revoked IS NULL", (public_id,)).fetchall()
                new = None if not found else updated(_info(found[0]), **changes)
                if new is not None:
                    conn.execute("UPDATE keys SET name = ?, rpm = ?, tpm = ?, weight = ?,"
                                 " trusted = ?, priority_budget_usd = ?, ramp_min_tpm = ?,"
                                 " ramp_max_growth = ?, ramp_window_s = ?, enforce = ?"
                                 " WHERE public_id = ?",
                                 (new.name, new.rpm, new.tpm, new.weight, int(new.trusted),
                                  budget_text(new.priority_budget_usd), new.ramp_min_tpm,
                                  new.ramp_max_growth, new.ramp_window_s, int(new.enforce),
                                  public_id))
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            self._forget(public_id)
        return new

    def forget_all(self) -> None:
        """Drops every cached lookup, granted or refused: the next check of each
        token reads the store (another worker of this host changed a key)."""
        with self._lock:
            self._cache.clear()
            self._denied.clear()

    def _forget(self, public_id: str) -> None:
        """Drops the key's cached lookups (the caller holds the lock)."""
        for h, (info, _) in builtins.list(self._cache.items()):
            if info.public_id == public_id:
                del self._cache[h]

    def authenticate(self, bearer_token: str) -> KeyInfo | None:
        """The key for a bearer token, or None if malformed, unknown, revoked or wrong."""
        parsed = parse_token(bearer_token)
        if parsed is None:
            return None
        public_id, secret = parsed
        token_hash = hashlib.sha256(bearer_token.encode("ascii")).digest()
        now = self._clock()
        hit = self._cache.get(token_hash)
        if hit is not None and hit[1] > now:
            return hit[0]
        denied_until = self._denied.get(token_hash)
        if denied_until is not None and denied_until > now:
            return None
        self.lookups += 1
        found = self._query(
            f"SELECT {_COLUMNS}, secret_sha256 FROM keys WHERE public_id = ?", (public_id,)
        )
        # Constant time, so response timing does not reveal how much of a guess matched.
        if (not found or not hmac.compare_digest(found[0][-1], hash_secret(secret))
                or found[0][3] is not None):  # unknown, wrong secret, revoked
            self._deny(token_hash, now)
            return None
        info = _info(found[0][:-1])
        with self._lock:
            self._denied.pop(token_hash, None)
            if len(self._cache) >= CACHE_MAX:
                self._cache.clear()  # only valid keys land here; refilling is cheap
            self._cache[token_hash] = (info, now + self.cache_ttl_s)
        return info

    def _deny(self, token_hash: bytes, now: float) -> None:
        with self._lock:
            denied = self._denied
            denied.pop(token_hash, None)  # re-inserted last: the newest entry
            if len(denied) >= DENIED_MAX:
                del denied[next(iter(denied))]
            denied[token_hash] = now + self.denied_ttl_s


_Bucket = TokenBucket | SharedBucket
#: A key's settlement: (rpm bucket, its delta, tpm bucket, its delta) (KeyLimiter.settlement).
Settlement = tuple[_Bucket | None, int, _Bucket | None, int]
#: Nothing to move.
NO_SETTLEMENT: Final[Settlement] = (None, 0, None, 0)


@dataclass(slots=True, frozen=True)
class KeyRefusal:
    """A key limit's refusal: the seconds until the same request would pass, and
    which limit refused it (tierq.shadow's `key_rpm` or `key_tpm`). Nothing was
    charged for it."""

    wait_s: float
    decision: str


class KeyLimiter:
    """Per-key requests-per-minute and tokens-per-minute, one GCRA bucket each.

    A bucket holds a minute's worth (burst = the per-minute limit) and refills
    continuously. The token cost is an estimate (prompt + n x max_tokens) taken up
    front and corrected by `settle` once real usage is known.

    `shared`: a `SharedKeyBuckets` table that every worker of the host maps
    (`tierq serve --workers N`), so the limits hold across workers. A key the
    full table has no room for gets per-process buckets instead, with a
    warning logged once for that key. Without `shared`, buckets are this
    process's own, and a key whose limits change starts from full buckets; in
    the shared table a changed limit reuses the key's bucket state.
    """

    def __init__(self, clock: ManualClock | None = None,
                 shared: SharedKeyBuckets | None = None) -> None:
        self._clock = clock
        self._shared = shared
        # public_id -> ((rpm, tpm) the buckets were built for, rpm bucket, tpm bucket)
        self._buckets: dict[
            str, tuple[tuple[int | None, int | None], _Bucket | None, _Bucket | None]
        ] = {}

    def _bucket(self, public_id: str, kind: str, limit: int | None) -> _Bucket | None:
        if limit is None:
            return None
        if self._shared is not None:
            found = self._shared.bucket(public_id, kind, limit / 60.0, float(limit))
            if found is not None:
                return found
            log.warning("shared key table full (%d keys): key %s gets per-process %s limits, "
                        "so each worker allows it %d a minute", self._shared.capacity,
                        public_id, kind, limit)
        return TokenBucket(limit / 60.0, float(limit), 0.0, self._clock)

    def _for(self, key: KeyInfo) -> tuple[_Bucket | None, _Bucket | None]:
        entry = self._buckets.get(key.public_id)
        limits = (key.rpm, key.tpm)
        if entry is None or entry[0] != limits:
            # New key, or its limits changed: new buckets (full ones, unless shared).
            entry = (limits, self._bucket(key.public_id, "rpm", key.rpm),
                     self._bucket(key.public_id, "tpm", key.tpm))
            self._buckets[key.public_id] = entry
        return entry[1], entry[2]

    @staticmethod
    def _token_cost(key: KeyInfo, est_tokens: int) -> int:
        # A request estimated above a whole minute's budget could never pass, so it
        # takes the full bucket instead and settle() charges the rest from real usage.
        est = max(0, est_tokens)
        return min(est, key.tpm) if key.tpm is not None else est

    def check(self, key: KeyInfo, est_tokens: int) -> float | None:
        """None if admitted (and charged); else seconds until it would be."""
        refused = self.decide(key, est_tokens)
        return None if refused is None else refused.wait_s

    def decide(self, key: KeyInfo, est_tokens: int) -> KeyRefusal | None:
        """None if admitted (and charged); else which limit refused it and when
        it would pass (nothing charged). The key's `enforce` is the caller's."""
        rpm, tpm = self._for(key)
        if rpm is not None:
            wait = rpm.try_take(1)
            if wait is not None:
                return KeyRefusal(wait, KEY_RPM)
        cost = self._token_cost(key, est_tokens)
        if tpm is not None and cost > 0:
            wait = tpm.try_take(cost)
            if wait is not None:
                if rpm is not None:
                    rpm.adjust(-1)  # refused as a whole: give the request back
                return KeyRefusal(wait, KEY_TPM)
        return None

    def settlement(self, key: KeyInfo, est_tokens: int, real_tokens: int | None, *,
                   request: bool = False) -> Settlement:
        """What settling a request moves in the key's buckets, as (rpm bucket,
        delta, tpm bucket, delta) (a bucket None: no such limit; a delta 0: no
        move): served (`real_tokens`), the token charge `check` took corrected to
        the real usage; not served (None), its token estimate given back, and the
        request itself too if `request` (the gateway's doing, not the client's).
        A bucket never refills past full. `apply` applies it, and so does the
        core's Finisher (tierq.outcome), in the same call as the request's row."""
        rpm, tpm = self._for(key)
        cost = self._token_cost(key, est_tokens)
        if real_tokens is not None:
            return (None, 0, tpm, max(0, real_tokens) - cost if tpm is not None else 0)
        return (rpm, -1 if request and rpm is not None else 0,
                tpm, -cost if tpm is not None and cost > 0 else 0)

    @staticmethod
    def apply(settlement: Settlement) -> None:
        """Move the buckets as `settlement` says."""
        rpm, rpm_delta, tpm, tpm_delta = settlement
        if rpm is not None and rpm_delta:
            rpm.adjust(rpm_delta)
        if tpm is not None and tpm_delta:
            tpm.adjust(tpm_delta)

    def settle(self, key: KeyInfo, est_tokens: int, real_tokens: int) -> None:
        """Correct the token charge taken by `check` to the real usage."""
        self.apply(self.settlement(key, est_tokens, real_tokens))

    def refund(self, key: KeyInfo, est_tokens: int, *, request: bool) -> None:
        """Give back what `check` took for a request that was not served (`settlement`)."""
        self.apply(self.settlement(key, est_tokens, None, request=request))

    def remaining(self, key: KeyInfo) -> tuple[float | None, float | None]:
        """(requests, tokens) the key may still take now; None where unlimited."""
        rpm, tpm = self._for(key)
        return (rpm.available() if rpm is not None else None,
                tpm.available() if tpm is not None else None)
