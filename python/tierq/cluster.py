"""Several gateway hosts, one tier: slots and per-key limits shared through Redis.

`[cluster]` turns it on (docs/operations.md, "Running N hosts", is the long
form). Two things live in Redis, each behind one Lua script so a decision is
one round trip and atomic:

- **Slot leases** (`_LEASE`). Each pool's limit (`max_concurrency`) is split
  into leases: a hash of host -> slots leased, a hash of host -> lease
  deadline, a hash of host -> priority waiters. A host's local admission keeps
  to its lease by withholding the rest of the pool's slots in its own core
  (`Admission.withhold`/`restore`), so the request path stays local: Redis is
  asked only when the host needs more slots than it holds, gives some back, or
  refreshes its deadline (every `lease_ttl_ms / 3`). The script drops the
  hosts whose deadline passed before deciding, so a dead host's slots come
  back within its TTL, and it grants slots for default demand only while no
  host has priority waiters (strict priority across hosts), keeping
  `priority_headroom` slots of the limit for priority demand.
- **Per-key RPM/TPM** (`_KEYS`): GCRA on Redis TIME, the same rule as the
  core's bucket (`bucket::decide`), one script call per decision, settled to
  real usage and refunded like `tierq.keys.KeyLimiter`. Keys are hash-tagged
  (`{tierq:key:<id>}`, `{tierq:pool:<model>}`) so Redis Cluster works.

Redis down: `on_redis_down = "local"` keeps serving with the host's share of
each limit (the limit divided by the live hosts it last saw) and rejoins by
itself; `"closed"` answers new requests 503 (`ClusterUnavailable`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import yarl

from tierq._core import PoolSettings
from tierq.admission import Admission
from tierq.config import AdmissionConfig, ClusterConfig
from tierq.keys import KeyInfo, KeyLimiter

if TYPE_CHECKING:
    import redis.asyncio as aioredis

# The redis package is the optional extra `tierq[cluster]`: imported when a
# Cluster is made, so the embedded default runs without it.

__all__ = ["Cluster", "ClusterUnavailable", "PoolLease", "cluster_settings", "default_host_id",
           "require_redis"]

_NO_REDIS: Final = "[cluster] needs the redis package: pip install 'tierq[cluster]'"


def require_redis() -> None:
    """Refuse a [cluster] when the redis package (the `cluster` extra) cannot be
    imported: RuntimeError, one line naming the extra, before anything listens."""
    try:
        import redis.asyncio  # noqa: F401
    except ImportError as e:
        raise RuntimeError(f"{_NO_REDIS} ({e})") from None

log = logging.getLogger("tierq.cluster")

# While a host has demand its lease does not cover, or another host has
# priority waiters, it syncs this often; otherwise at its heartbeat.
CONTENDED_SYNC_S: Final = 0.02
# Two syncs are never closer than this, however often requests wake the agent.
MIN_SYNC_GAP_S: Final = 0.002
# Hosts that start lacking slots publish their id here; every host listens
# and looks whether it holds idle slots to give back.
WAKE_CHANNEL: Final = "tierq:cluster:wake"
# 503 Retry-After while Redis is unreachable in "closed" mode.
CLOSED_RETRY_AFTER_S: Final = 1.0

# KEYS: leases, deadlines, priority waiters, unmet demand, limits (host -> n
#       each), meta.
# ARGV: host, ttl_ms, limit, headroom, default_min_share, holding, want,
#       priority waiting, hosts last seen, leaving (1/0), the wake-up channel.
# Returns {lease, live hosts, priority waiters elsewhere, unmet demand
# elsewhere, priority waiters elsewhere not covered by free slots, the
# cluster's limit}.
_LEASE: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local host = ARGV[1]
local ttl = tonumber(ARGV[2])
local limit = tonumber(ARGV[3])
local headroom = tonumber(ARGV[4])
local share = tonumber(ARGV[5])
local holding = tonumber(ARGV[6])
local want = tonumber(ARGV[7])
local pwait = tonumber(ARGV[8])
local known = tonumber(ARGV[9])
-- Hosts whose lease ran out lose it first: their slots are free again.
local seen = redis.call('HGETALL', KEYS[2])
local live = {}
for i = 1, #seen, 2 do
  if tonumber(seen[i + 1]) < now then
    for k = 1, 5 do redis.call('HDEL', KEYS[k], seen[i]) end
  else
    live[seen[i]] = true
  end
end
-- A lease with no deadline (a host's entry half gone) counts as expired too.
local leases = redis.call('HGETALL', KEYS[1])
local others, hosts = 0, 1
for i = 1, #leases, 2 do
  if not live[leases[i]] then
    redis.call('HDEL', KEYS[1], leases[i])
  elseif leases[i] ~= host then
    others = others + tonumber(leases[i + 1])
    hosts = hosts + 1
  end
end
if ARGV[10] == '1' then
  for k = 1, 5 do redis.call('HDEL', KEYS[k], host) end
  return {0, hosts - 1, 0, 0, 0, limit}
end
-- The pool's limit: each host's core has its own (fixed, the same on every
-- host; or learned): the cluster keeps to the lowest of the live hosts'.
redis.call('HSET', KEYS[5], host, limit)
local lims = redis.call('HGETALL', KEYS[5])
for i = 1, #lims, 2 do
  if live[lims[i]] then limit = math.min(limit, tonumber(lims[i + 1])) end
end
local function sum_others(key)
  local n, kv = 0, redis.call('HGETALL', key)
  for i = 1, #kv, 2 do
    if kv[i] ~= host and live[kv[i]] then n = n + tonumber(kv[i + 1]) end
  end
  return n
end
local others_p = sum_others(KEYS[3])
local others_unmet = sum_others(KEYS[4])
-- A host that held slots (or had seen other hosts) and is unknown here is
-- rejoining a Redis that lost its state (restarted) or gave it up for dead:
-- hosts that still hold slots may not have reported yet, so for one TTL
-- nobody grows past its share.
local calm_until = tonumber(redis.call('HGET', KEYS[6], 'calm_until') or '0')
local calm_hosts = tonumber(redis.call('HGET', KEYS[6], 'calm_hosts') or '1')
if redis.call('HEXISTS', KEYS[2], host) == 0 and (holding > 0 or known > 1) then
  if now >= calm_until then calm_hosts = 1 end
  calm_until = now + ttl
  calm_hosts = math.max(calm_hosts, known)
  redis.call('HSET', KEYS[6], 'calm_until', calm_until, 'calm_hosts', calm_hosts)
end
-- The host holds what it reports (it never holds more than it was granted);
-- past the limit (after an outage) the caller gives its excess back.
local lease = holding
local excess = others + lease - limit
if excess > 0 then lease = math.max(0, lease - excess) end
if want > lease then
  local room = limit - others - lease
  if now < calm_until then
    room = math.min(room, math.floor(limit / math.max(calm_hosts, hosts)) - lease)
  end
  room = math.max(0, math.min(room, want - lease))
  local grant = math.min(pwait, room)
  local rest = room - grant
  -- Default demand: never into the headroom, and not while priority waits
  -- anywhere, unless default_min_share has earned it a slot.
  local droom = math.max(0, math.min(rest, limit - headroom - others - lease - grant))
  if droom > 0 and others_p > 0 then
    local credit = tonumber(redis.call('HGET', KEYS[6], 'credit') or '0')
    local earned = math.min(droom, math.floor(credit))
    if earned > 0 then redis.call('HSET', KEYS[6], 'credit', credit - earned) end
    droom = earned
  end
  if grant > 0 and share > 0 then
    redis.call('HINCRBYFLOAT', KEYS[6], 'credit', grant * share)
  end
  lease = lease + grant + droom
end
-- Priority waiters elsewhere that the free slots do not cover yet: what a
-- host without priority waiters of its own should yield.
local uncovered = math.max(0, others_p - (limit - others - lease))
-- A host that starts to lack slots, or to have priority waiters, tells the
-- others at once (they may hold idle slots and would only hear at their
-- next heartbeat otherwise).
local unmet = math.max(0, want - lease)
local was_unmet = tonumber(redis.call('HGET', KEYS[4], host) or '0')
local was_p = tonumber(redis.call('HGET', KEYS[3], host) or '0')
if (unmet > 0 and was_unmet == 0) or (pwait > 0 and was_p == 0) then
  redis.call('PUBLISH', ARGV[11], host)
end
redis.call('HSET', KEYS[1], host, lease)
redis.call('HSET', KEYS[2], host, now + ttl)
redis.call('HSET', KEYS[3], host, pwait)
redis.call('HSET', KEYS[4], host, unmet)
-- Everything goes once no host has refreshed it for a while.
for k = 1, 6 do redis.call('PEXPIRE', KEYS[k], ttl * 4) end
return {lease, hosts, others_p, others_unmet, uncovered, limit}
"""

# KEYS: the key's rpm TAT, its tpm TAT (microseconds on Redis TIME).
# ARGV: op ("take" | "adjust"), rpm, tpm (0: none), requests, tokens.
# take: both or neither; returns {1, 0} or {0, wait_us} (-1: never fits).
# adjust: moves the TATs by requests / tokens (negative gives back); {1, 0}.
_KEYS: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local window = 60000000
local function tat_of(key)
  return tonumber(redis.call('GET', key) or '0')
end
local function store(key, tat)
  if tat > now then
    redis.call('SET', key, string.format('%.0f', tat), 'PX', math.ceil((tat - now) / 1000) + 1000)
  else
    redis.call('DEL', key)
  end
end
local limits = {tonumber(ARGV[2]), tonumber(ARGV[3])}
local costs = {tonumber(ARGV[4]), tonumber(ARGV[5])}
if ARGV[1] == 'adjust' then
  for i = 1, 2 do
    if limits[i] > 0 and costs[i] ~= 0 then
      local tat = tat_of(KEYS[i])
      local shift = math.abs(costs[i]) * window / limits[i]
      if costs[i] > 0 then
        tat = math.max(tat, now) + shift
      else
        tat = math.max(tat - shift, math.min(now, tat))
      end
      store(KEYS[i], tat)
    end
  end
  return {1, 0}
end
local new = {}
for i = 1, 2 do
  if limits[i] > 0 and costs[i] > 0 then
    local need = costs[i] * window / limits[i]
    if need > window then return {0, -1} end
    local tat = math.max(tat_of(KEYS[i]), now) + need
    if tat - now > window then return {0, math.ceil(tat - now - window)} end
    new[i] = tat
  end
end
for i = 1, 2 do
  if new[i] then store(KEYS[i], new[i]) end
end
return {1, 0}
"""


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
# A worker other than the agent's polls its shared pools this often, so
# demand queued in any worker reaches the agent (worker 0) within it.
SHARED_POLL_S: Final = 0.005


def _sha(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


def default_host_id(port: int) -> str:
    """`hostname:port`, the host id when `[cluster] host_id` is not set."""
    return f"{socket.gethostname()}:{port}"


class ClusterUnavailable(Exception):
    """Redis is unreachable and `on_redis_down = "closed"`: answer 503."""

    def __init__(self, retry_after_s: float = CLOSED_RETRY_AFTER_S) -> None:
        self.retry_after_s = retry_after_s
        super().__init__("the cluster's Redis is unreachable")


@dataclass(slots=True)
class PoolLease:
    """One pool's share of the cluster: what this host holds and last heard."""

    model: str
    admission: Admission
    headroom: int
    default_min_share: float
    limit: int = 0  # this host's core's limit (fixed, or learned), last read
    cluster_limit: int = 0  # the lowest of the live hosts' limits, last heard
    lease: int = 0  # slots Redis last granted (or the local share while down)
    others_priority: int = 0  # priority waiters on other hosts, last heard
    others_unmet: int = 0  # demand other hosts could not get, last heard
    uncovered: int = 0  # priority waiters elsewhere the free slots do not cover
    reported_pwait: int = 0  # this host's priority waiters as Redis last heard
    want: int = 0  # what this host asked for last
    holding: int = 0  # limit minus withheld: slots it really has, busy or idle

    def plan(self, heartbeat: bool, touch: bool = True) -> tuple[int, int, bool]:
        """(holding, want, contended) from the local core, withholding locally
        at once what it gives back (busy slots as they are released) unless
        not `touch` (a probe while Redis is down: the local share stands)."""
        st = self.admission.stats()
        self.limit = int(str(st["limit"]))
        depth = st["depth"]
        assert isinstance(depth, dict)
        pw, dw = int(depth["priority"]), int(depth["default"])
        busy = int(str(st["in_flight"]))
        withheld, owed = int(str(st["withheld"])), int(str(st["owed"]))
        holding = self.limit - withheld
        if touch and holding - owed > self.lease:
            # The core's own limit grew (adaptive): what it added is not leased.
            self.admission.withhold(holding - owed - self.lease)
            st = self.admission.stats()
            withheld, owed = int(str(st["withheld"])), int(str(st["owed"]))
            holding = self.limit - withheld
        usable = holding - owed
        if self.others_priority > 0 and pw == 0:
            # Strict priority across hosts: this host's defaults wait, and it
            # yields slots (idle now, busy as they free) to the waiters the
            # free slots do not cover yet.
            want = max(0, busy - self.uncovered) if self.uncovered else min(usable, busy)
        elif self.others_priority > 0:
            want = busy + pw  # its own priority waiters first; defaults wait
        elif self.others_unmet > 0:
            want = busy + pw + dw  # others need slots: give back the idle ones
        elif heartbeat and usable > busy + pw + dw:
            # Idle slots nobody asked for: give half back each heartbeat, so
            # an idle host's lease drains while a busy one keeps its own.
            idle = usable - (busy + pw + dw)
            want = usable - (idle + 1) // 2
        else:
            want = max(usable, busy + pw + dw)
        want = min(self.limit, want)
        if not touch:
            pass
        elif want < usable:
            self.admission.withhold(usable - want)
        elif want > usable and owed > 0:
            self.admission.restore(min(owed, want - usable))
        self.holding = holding
        self.want = want
        contended = (want > holding or self.others_priority > 0 or self.others_unmet > 0
                     or pw != self.reported_pwait)
        return holding, want, contended

    def apply(self, lease: int, target: int) -> None:
        """Records the lease Redis holds for this host and keeps the local core
        to `target` slots (at most the lease)."""
        self.lease = lease
        target = min(lease, target)
        st = self.admission.stats()
        self.limit = int(str(st["limit"]))
        usable = self.limit - int(str(st["withheld"])) - int(str(st["owed"]))
        if target > usable:
            self.admission.restore(target - usable)
        elif target < usable:
            self.admission.withhold(usable - target)
        self.holding = self.limit - int(str(self.admission.stats()["withheld"]))


class Cluster:
    """This host's side of the cluster: the lease agent and the key limits."""

    def __init__(self, config: ClusterConfig, host_id: str,
                 pools: Mapping[str, tuple[Admission, AdmissionConfig]],
                 on_closed: Callable[[], object] | None = None,
                 worker: int | None = None) -> None:
        """`on_closed`: called when Redis goes down in "closed" mode, to answer
        the requests queued on this host 503 (the gateway's waiting tasks).
        `worker`: this process's index when the host runs several workers on
        shared pools (None: one process). Worker 0 runs the host's lease agent
        on the shared pools (whose slots the supervisor withheld before
        forking); every other worker only makes key decisions and watches
        Redis for its own requests."""
        self.config = config
        self._on_closed = on_closed
        self._shared = worker is not None
        self._agent = worker is None or worker == 0
        self._models = list(pools)
        self.host_id = host_id
        self.ttl_s = config.lease_ttl_ms / 1000.0
        self.heartbeat_s = self.ttl_s / 3
        try:
            import redis.asyncio as aioredis
            from redis.backoff import NoBackoff
            from redis.exceptions import NoScriptError, RedisError
            from redis.retry import Retry
        except ImportError:
            raise ValueError(_NO_REDIS) from None
        self._RedisError = RedisError
        self._NoScriptError = NoScriptError
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
        self.redis: aioredis.Redis = aioredis.Redis.from_url(config.redis_url, **kwargs)
        self.pools = {
            model: PoolLease(model, adm, cfg.settings.priority_headroom,
                             cfg.default_min_share or 0.0, adm.limit, adm.limit)
            for model, (adm, cfg) in pools.items()
        } if self._agent else {}
        self.up = False
        self.hosts = 1  # live hosts last seen, this one included
        self.redis_calls = 0
        self.redis_errors = 0
        self.sync_s = 0.0  # time spent waiting on lease syncs
        self.down_since: float | None = time.monotonic()  # not joined yet
        self._ever_up = False
        # Where Redis is, for log lines: host and port only, never a password.
        url = yarl.URL(config.redis_url)
        self._where = f"{url.scheme}://{url.host}:{url.port or 6379}"
        self._local_keys = KeyLimiter()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._listener: asyncio.Task[None] | None = None
        self._poked = False  # another host published that it lacks slots
        self._stopping = False
        self._lease_sha = _sha(_LEASE)
        self._keys_sha = _sha(_KEYS)
        self._hosts_sha = _sha(_HOSTS)
        self._pending: set[asyncio.Task[Any]] = set()
        for p in self.pools.values():
            if self._shared:
                # Shared pools: the slots not withheld are this host's (a
                # restarted agent takes over what the last one held).
                st = p.admission.stats()
                p.holding = p.limit - int(str(st["withheld"]))
                p.lease = p.holding - int(str(st["owed"]))
            else:
                p.admission.withhold(p.limit)  # until the first lease, nothing

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        if not self._agent:
            await self._watch_once()
            self._task = asyncio.create_task(self._watch(), name="tierq-cluster-watch")
            return
        await self._sync(heartbeat=True)
        self._task = asyncio.create_task(self._run(), name="tierq-cluster")
        self._listener = asyncio.create_task(self._listen(), name="tierq-cluster-wake")

    async def _watch(self) -> None:
        """A worker without the agent: Redis's state and the live hosts, each heartbeat."""
        while not self._stopping:
            try:
                await asyncio.wait_for(self._wake.wait(), self.heartbeat_s)
            except TimeoutError:
                pass
            self._wake.clear()
            if not self._stopping:
                await self._watch_once()

    async def _watch_once(self) -> None:
        if not self._models:
            return
        tag = f"{{tierq:pool:{self._models[0]}}}"
        self.redis_calls += 1
        try:
            try:
                n = await self.redis.evalsha(self._hosts_sha, 1, f"{tag}:seen")
            except self._NoScriptError:
                await self.redis.script_load(_HOSTS)
                n = await self.redis.evalsha(self._hosts_sha, 1, f"{tag}:seen")
        except self._RedisError as e:
            self._went_down(e)
            return
        self.hosts = max(1, int(n))
        if not self.up:
            self._came_back()

    async def _listen(self) -> None:
        """Wakes the agent when another host starts lacking slots."""
        me = self.host_id.encode()
        while not self._stopping:
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(WAKE_CHANNEL)
                while not self._stopping:
                    msg = await pubsub.get_message(timeout=self.heartbeat_s)
                    if msg is not None and msg.get("data") != me:
                        self._poked = True  # ask Redis even if nothing changed here
                        self._wake.set()
            except self._RedisError:
                await asyncio.sleep(self.heartbeat_s)  # down: the agent probes; retry later
            finally:
                try:
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
                except self._RedisError:
                    pass

    async def stop(self) -> None:
        """Stops the agent and hands this host's leases back (best effort)."""
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            await self._task
        if self._listener is not None:
            self._listener.cancel()
            await asyncio.gather(self._listener, return_exceptions=True)
        await self.settled()
        if self.up and self._agent and not self._shared:
            # Several workers: the others may still finish requests on the
            # host's slots, so the lease runs out by its TTL instead.
            try:
                await self._call_leases(leaving=True)
            except self._RedisError:
                pass
        await self.redis.aclose()

    async def settled(self) -> None:
        """Waits for the key settlements and refunds sent so far."""
        while self._pending:
            await asyncio.gather(*list(self._pending), return_exceptions=True)

    def wake(self) -> None:
        """A request arrived: the agent looks whether the lease still covers it."""
        if self._agent:
            self._wake.set()

    @property
    def closed(self) -> bool:
        return not self.up and self.config.on_redis_down == "closed"

    def check_open(self) -> None:
        """Raises ClusterUnavailable when Redis is down in "closed" mode."""
        if self.closed:
            raise ClusterUnavailable()

    # ------------------------------------------------------------ the agent

    async def _run(self) -> None:
        next_beat = time.monotonic() + self.heartbeat_s
        last = 0.0
        contended = False
        while not self._stopping:
            wait = CONTENDED_SYNC_S if contended else max(0.0, next_beat - time.monotonic())
            if self._shared:
                wait = min(wait, SHARED_POLL_S)  # the other workers' queues are only seen by polling
            try:
                await asyncio.wait_for(self._wake.wait(), wait)
            except TimeoutError:
                pass
            self._wake.clear()
            if self._stopping:
                return
            now = time.monotonic()
            if now - last < MIN_SYNC_GAP_S:
                await asyncio.sleep(MIN_SYNC_GAP_S - (now - last))
                now = time.monotonic()
            beat = now >= next_beat
            if beat:
                next_beat = now + self.heartbeat_s
            try:
                contended = await self._sync(heartbeat=beat)
            except Exception:  # never let the agent die: the host would keep stale leases
                log.exception("cluster lease sync failed")
                contended = False
            last = time.monotonic()

    async def _sync(self, heartbeat: bool) -> bool:
        """One round: plan every pool, one pipelined call if anything changed.
        Returns whether the next round should come soon."""
        if not self.up and not heartbeat:
            return False  # down: only the heartbeat probes Redis
        plans = [p.plan(heartbeat, touch=self.up) for p in self.pools.values()]
        contended = any(c for _, _, c in plans)
        if not self.up:
            return await self._probe()
        changed = any(want != p.lease or holding != p.lease
                      for (holding, want, _), p in zip(plans, self.pools.values()))
        poked, self._poked = self._poked, False
        if not (heartbeat or changed or contended or poked):
            return False
        try:
            await self._call_leases(leaving=False)
        except self._RedisError as e:
            self._went_down(e)
            return False
        return contended or any(p.others_priority or p.others_unmet or p.want > p.lease
                                for p in self.pools.values())

    async def _call_leases(self, leaving: bool) -> None:
        pools = list(self.pools.values())
        t0 = time.perf_counter()
        pipe = self.redis.pipeline(transaction=False)
        for p in pools:
            p.reported_pwait = self._priority_waiting(p)
            tag = f"{{tierq:pool:{p.model}}}"
            pipe.evalsha(self._lease_sha, 6, f"{tag}:lease", f"{tag}:seen", f"{tag}:pwait",
                         f"{tag}:unmet", f"{tag}:limit", f"{tag}:meta",
                         self.host_id, self.config.lease_ttl_ms, p.limit, p.headroom,
                         repr(p.default_min_share), p.holding, p.want,
                         p.reported_pwait, self.hosts, int(leaving), WAKE_CHANNEL)
        self.redis_calls += 1
        try:
            replies = await pipe.execute()
        except self._NoScriptError:
            await self.redis.script_load(_LEASE)
            return await self._call_leases(leaving)
        finally:
            self.sync_s += time.perf_counter() - t0
        if leaving:
            return
        hosts = 1
        for p, (lease, live, others_p, others_unmet, uncovered, limit) in zip(pools, replies):
            p.others_priority, p.others_unmet = int(others_p), int(others_unmet)
            p.uncovered, p.cluster_limit = int(uncovered), int(limit)
            hosts = max(hosts, int(live))
            p.apply(int(lease), p.want)
        self.hosts = hosts

    @staticmethod
    def _priority_waiting(p: PoolLease) -> int:
        depth = p.admission.stats()["depth"]
        assert isinstance(depth, dict)
        return int(depth["priority"])

    async def _probe(self) -> bool:
        """Tries Redis while it is down (or not joined yet); rejoins if it answers."""
        try:
            await self._call_leases(leaving=False)
        except self._RedisError as e:
            self._went_down(e)
            return False
        self._came_back()
        return True

    def _came_back(self) -> None:
        away = time.monotonic() - (self.down_since or time.monotonic())
        if self._ever_up:
            log.warning("cluster: Redis is back after %.1f s; host %s rejoined (%d hosts live)",
                        away, self.host_id, self.hosts)
        else:
            log.info("cluster: host %s joined through %s (%d hosts live)",
                     self.host_id, self._where, self.hosts)
        self.up = self._ever_up = True
        self.down_since = None

    def _went_down(self, e: BaseException) -> None:
        self.redis_errors += 1
        if self.up or not self._ever_up and self.redis_errors == 1:
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
            # Each host's share is the limit divided by the live hosts it last
            # saw. At first a host only cuts down to it: the others may still
            # run requests on slots above their share, which they stop handing
            # on as soon as they notice. After one TTL it also grows to it.
            settled = time.monotonic() - self.down_since >= self.ttl_s
            for p in self.pools.values():
                p.others_priority = p.others_unmet = 0
                share = min(p.limit, p.cluster_limit) // max(1, self.hosts)
                p.apply(share, share if settled else min(share, p.holding))

    # ------------------------------------------------------------ key limits

    def _local_key(self, key: KeyInfo) -> KeyInfo:
        """The key with its limits divided among the live hosts last seen."""
        n = max(1, self.hosts)
        return dataclasses.replace(
            key, rpm=None if key.rpm is None else max(1, key.rpm // n),
            tpm=None if key.tpm is None else max(1, key.tpm // n))

    @staticmethod
    def _token_cost(key: KeyInfo, est_tokens: int) -> int:
        est = max(0, est_tokens)
        return min(est, key.tpm) if key.tpm is not None else est

    async def _keys_call(self, key: KeyInfo, op: str, requests: int, tokens: int) -> list[Any]:
        tag = f"{{tierq:key:{key.public_id}}}"
        args = (op, key.rpm or 0, key.tpm or 0, requests, tokens)
        self.redis_calls += 1
        try:
            reply: list[Any] = await self.redis.evalsha(self._keys_sha, 2, f"{tag}:rpm", f"{tag}:tpm", *args)
        except self._NoScriptError:
            await self.redis.script_load(_KEYS)
            reply = await self.redis.evalsha(self._keys_sha, 2, f"{tag}:rpm", f"{tag}:tpm", *args)
        return reply

    async def check_key(self, key: KeyInfo, est_tokens: int) -> float | None:
        """None if admitted (and charged) cluster-wide; else seconds until it
        would be. Raises ClusterUnavailable when Redis is down in "closed" mode."""
        if key.rpm is None and key.tpm is None:
            return None
        if self.up:
            try:
                ok, wait_us = await self._keys_call(
                    key, "take", 1, self._token_cost(key, est_tokens))
            except self._RedisError as e:
                self._went_down(e)
            else:
                if int(ok):
                    return None
                return float("inf") if int(wait_us) < 0 else int(wait_us) / 1e6
        self.check_open()
        return self._local_keys.check(self._local_key(key), est_tokens)

    def _adjust(self, key: KeyInfo, requests: int, tokens: int) -> None:
        async def run() -> None:
            try:
                await self._keys_call(key, "adjust", requests, tokens)
            except self._RedisError as e:
                self._went_down(e)

        task = asyncio.get_running_loop().create_task(run())
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    def settle_key(self, key: KeyInfo, est_tokens: int, real_tokens: int) -> None:
        """Corrects the token charge of `check_key` to the real usage."""
        if key.tpm is None:
            return
        if not self.up:
            self._local_keys.settle(self._local_key(key), est_tokens, real_tokens)
            return
        delta = max(0, real_tokens) - self._token_cost(key, est_tokens)
        if delta:
            self._adjust(key, 0, delta)

    def refund_key(self, key: KeyInfo, est_tokens: int, request: bool) -> None:
        """Gives back what `check_key` charged for a request the gateway did not
        serve: its token estimate, and its request count too if `request`."""
        tokens = self._token_cost(key, est_tokens) if key.tpm is not None else 0
        requests = 1 if request and key.rpm is not None else 0
        if not (tokens or requests):
            return
        if not self.up:
            self._local_keys.refund(self._local_key(key), est_tokens, request=request)
            return
        self._adjust(key, -requests, -tokens)

    # ------------------------------------------------------------ status

    def status(self) -> dict[str, Any]:
        """For /metrics and /status.json."""
        return {
            "host_id": self.host_id,
            "agent": self._agent,
            "redis_up": self.up,
            "on_redis_down": self.config.on_redis_down,
            "hosts": self.hosts,
            "redis_calls": self.redis_calls,
            "redis_errors": self.redis_errors,
            "lease_sync_s": round(self.sync_s, 6),  # time spent in lease round trips
            "down_for_s": 0.0 if self.down_since is None else time.monotonic() - self.down_since,
            "leases": {p.model: {"lease": p.lease, "holding": p.holding,
                                 "limit": p.cluster_limit, "host_limit": p.limit,
                                 "others_priority": p.others_priority}
                       for p in self.pools.values()},
        }


def cluster_settings(cfg: AdmissionConfig) -> PoolSettings:
    """A pool's settings as a cluster host's core runs them: headroom 0, since
    the lease script keeps `priority_headroom` once for the whole cluster."""
    return dataclasses.replace(cfg, priority_headroom=None).settings
