"""This host's connection to the cluster's Redis, and the Redis-down modes.

`RedisLink` owns the client (short timeouts, no retries: an unreachable Redis is
a state to act on), runs the Lua scripts (loading one the server lost), and
knows whether Redis is up, since when it is down and how many hosts were live
when it last answered. Redis down: `on_redis_down = "local"` keeps serving with
the host's share of each limit (the lease agent and the key limits read
`hosts`); `"closed"` answers new requests 503 (`ClusterUnavailable`).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Final

import yarl

from tierq.config import ClusterConfig

if TYPE_CHECKING:
    import redis.asyncio as aioredis

# The redis package is the optional extra `tierq[cluster]`: imported when a
# link is made, so the embedded default runs without it.

__all__ = ["CLOSED_RETRY_AFTER_S", "ClusterUnavailable", "RedisLink", "Script", "require_redis"]

log = logging.getLogger("tierq.cluster")

# 503 Retry-After while Redis is unreachable in "closed" mode.
CLOSED_RETRY_AFTER_S: Final = 1.0
_NO_REDIS: Final = "[cluster] needs the redis package: pip install 'tierq[cluster]'"


def require_redis() -> None:
    """Refuse a [cluster] when the redis package (the `cluster` extra) cannot be
    imported: RuntimeError, one line naming the extra, before anything listens."""
    try:
        import redis.asyncio  # noqa: F401
    except ImportError as e:
        raise RuntimeError(f"{_NO_REDIS} ({e})") from None


class ClusterUnavailable(Exception):
    """Redis is unreachable and `on_redis_down = "closed"`: answer 503."""

    def __init__(self, retry_after_s: float = CLOSED_RETRY_AFTER_S) -> None:
        self.retry_after_s = retry_after_s
        super().__init__("the cluster's Redis is unreachable")


class Script:
    """A Lua script, called by its SHA-1 (loaded again if the server lost it)."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.sha = hashlib.sha1(text.encode()).hexdigest()


# KEYS: a pool's deadlines hash. Returns the live hosts in it (Redis time).
_HOSTS: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local seen, n = redis.call('HGETALL', KEYS[1]), 0
for i = 2, #seen, 2 do
  if tonumber(seen[i]) >= now then n = n + 1 end
end
return n
"""
_HOSTS_SCRIPT: Final = Script(_HOSTS)


class RedisLink:
    """The Redis client and what this host knows of Redis: up or down, the live
    hosts last seen, the calls made and the ones that failed."""

    def __init__(self, config: ClusterConfig, host_id: str,
                 on_closed: Callable[[], object] | None = None) -> None:
        """`on_closed`: called when Redis goes down in "closed" mode, to answer
        the requests queued on this host 503 (the gateway's waiting tasks)."""
        self.config = config
        self.host_id = host_id
        self.ttl_s = config.lease_ttl_ms / 1000.0
        # How often a host renews its lease, and a worker without the agent looks.
        self.heartbeat_s = self.ttl_s / 3
        self._on_closed = on_closed
        try:
            import redis.asyncio as aioredis
            from redis.backoff import NoBackoff
            from redis.exceptions import NoScriptError, RedisError
            from redis.retry import Retry
        except ImportError:
            raise ValueError(_NO_REDIS) from None
        self.RedisError = RedisError
        self.NoScriptError = NoScriptError
        password = None
        if config.password_env is not None:
            password = os.environ.get(config.password_env)
            if not password:
                raise ValueError(f"[cluster] password_env: ${config.password_env} is not set")
        timeout = max(0.1, min(1.0, self.ttl_s / 6))
        kwargs: dict[str, Any] = {
            "socket_timeout": timeout, "socket_connect_timeout": timeout,
            # One try: an unreachable Redis is a state to act on, not to retry at length.
            "retry": Retry(NoBackoff(), 0), "health_check_interval": 0,
        }
        if password:
            kwargs["password"] = password
        # Where Redis is, for log lines: host and port only, never a password.
        url = yarl.URL(config.redis_url)
        self._where = f"{url.scheme}://{url.host}:{url.port or 6379}"
        self.redis: aioredis.Redis
        if config.sentinels:
            self.redis = self._from_sentinels(url, kwargs)
        else:
            self.redis = aioredis.Redis.from_url(config.redis_url, **kwargs)
        self.up = False
        self.hosts = 1  # live hosts last seen, this one included
        self.calls = 0
        self.errors = 0
        self.down_since: float | None = time.monotonic()  # not joined yet
        self._ever_up = False
        #: Called when Redis goes down in "local" mode: each serves its share alone.
        self.on_alone: list[Callable[[], None]] = []
        #: Called when Redis answers again after being down (not at the first join).
        self.on_rejoin: list[Callable[[], None]] = []

    def _from_sentinels(self, url: yarl.URL, kwargs: dict[str, Any]) -> aioredis.Redis:
        """A client of the primary the sentinels name: each new connection asks
        them where it is, so after a failover the next call (the one after the
        first that fails) reaches the new primary. redis_url gives the db, the
        credentials and TLS; its host is not used."""
        from redis.asyncio.sentinel import Sentinel

        cfg = self.config
        assert cfg.sentinel_master is not None
        # The sentinels are asked as briefly as Redis: short timeouts, one try.
        quick = {k: kwargs[k] for k in ("socket_timeout", "socket_connect_timeout", "retry")}
        sentinel = Sentinel(list(cfg.sentinels), sentinel_kwargs=quick)  # type: ignore[no-untyped-call]
        kwargs = {**kwargs, "db": int(url.path.strip("/") or 0), "ssl": url.scheme == "rediss"}
        if url.user:
            kwargs["username"] = url.user
        if "password" not in kwargs and url.password:
            kwargs["password"] = url.password
        self._where = (f"sentinel master {cfg.sentinel_master} via "
                       + ",".join(f"{h}:{p}" for h, p in cfg.sentinels))
        client: aioredis.Redis = sentinel.master_for(cfg.sentinel_master, **kwargs)
        return client

    async def run(self, script: Script, keys: Sequence[str], *args: str | int | float) -> Any:
        """One call of `script`: one round trip (two if the server lost it)."""
        self.calls += 1
        try:
            return await self.redis.evalsha(script.sha, len(keys), *keys, *args)
        except self.NoScriptError:
            await self.redis.script_load(script.text)
            return await self.redis.evalsha(script.sha, len(keys), *keys, *args)

    async def close(self) -> None:
        await self.redis.aclose()

    # ------------------------------------------------------------ up and down

    @property
    def closed(self) -> bool:
        return not self.up and self.config.on_redis_down == "closed"

    def check_open(self) -> None:
        """Raises ClusterUnavailable when Redis is down in "closed" mode."""
        if self.closed:
            raise ClusterUnavailable()

    def came_back(self) -> None:
        away = time.monotonic() - (self.down_since or time.monotonic())
        if self._ever_up:
            log.warning("cluster: Redis is back after %.1f s; host %s rejoined (%d hosts live)",
                        away, self.host_id, self.hosts)
        else:
            log.info("cluster: host %s joined through %s (%d hosts live)",
                     self.host_id, self._where, self.hosts)
        rejoined = self._ever_up
        self.up = self._ever_up = True
        self.down_since = None
        if rejoined:
            for rejoin in self.on_rejoin:
                rejoin()

    def went_down(self, e: BaseException) -> None:
        self.errors += 1
        if self.up or not self._ever_up and self.errors == 1:
            what = (f"serving alone with 1/{self.hosts} of each limit"
                    if self.config.on_redis_down == "local" else "answering 503 until it is back")
            log.warning("cluster: Redis at %s unreachable (%s); %s", self._where,
                        type(e).__name__, what)
        if self.up or self.down_since is None:
            self.down_since = time.monotonic()
        was_up, self.up = self.up, False
        if was_up and self.config.on_redis_down == "closed" and self._on_closed is not None:
            self._on_closed()
        if self.config.on_redis_down == "local":
            for serve_alone in self.on_alone:
                serve_alone()

    def down_for(self) -> float:
        """Seconds since Redis went down (0 while it is up)."""
        return 0.0 if self.down_since is None else time.monotonic() - self.down_since

    # ------------------------------------------------------------ a worker without the agent

    async def watch(self, models: Sequence[str], wake: asyncio.Event,
                    stopping: Callable[[], bool]) -> None:
        """Redis's state and the live hosts, each heartbeat (or when `wake` is set)."""
        while not stopping():
            try:
                await asyncio.wait_for(wake.wait(), self.heartbeat_s)
            except TimeoutError:
                pass
            wake.clear()
            if not stopping():
                await self.watch_once(models)

    async def watch_once(self, models: Sequence[str]) -> None:
        if not models:
            return
        tag = f"{{tierq:pool:{models[0]}}}"
        try:
            n = await self.run(_HOSTS_SCRIPT, [f"{tag}:seen"])
        except self.RedisError as e:
            self.went_down(e)
            return
        self.hosts = max(1, int(n))
        if not self.up:
            self.came_back()
