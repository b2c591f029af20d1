"""The lease agent: each pool's slots leased from Redis (`_LEASE`, how is in the
package's docstring), kept to in the local core by withholding the rest, synced
when demand or priority waiters change and at each heartbeat; while Redis is
down in "local" mode, the host's share of each limit. One agent per host:
worker 0's when the host runs several.

A pool over several endpoints leases each replica on its own, by the same
rule and script, keyed by model and endpoint (`ReplicaSlots`): the replica's
lease is its cap in the core (`ReplicaPool.set_lease`), so across hosts no
replica holds more than its limit, and the pool's slots are the caps' sum.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from tierq._core import PoolSettings
from tierq.admission import Admission, ReplicaPool
from tierq.cluster.flows import FAIR_SCRIPT, FlowCounters
from tierq.cluster.link import RedisLink, Script
from tierq.config import AdmissionConfig
from tierq.tiers import Tier

__all__ = ["LeaseAgent", "PoolLease", "ReplicaSlots", "cluster_settings"]

log = logging.getLogger("tierq.cluster")

# While a host has demand its lease does not cover, or another host has
# priority waiters, it syncs this often; otherwise at its heartbeat.
CONTENDED_SYNC_S: Final = 0.02
# Two syncs are never closer than this, however often requests wake the agent.
MIN_SYNC_GAP_S: Final = 0.002
# Hosts that start lacking slots publish their id here; every host listens
# and looks whether it holds idle slots to give back.
WAKE_CHANNEL: Final = "tierq:cluster:wake"
# With several workers the agent polls the shared pools this often, so demand
# queued in any worker reaches it (worker 0) within it.
SHARED_POLL_S: Final = 0.005
# A sync yields to the loop at most this often for granted holders to take
# their replica first (LeaseAgent._let_place).
PLACE_TRIES: Final = 8
# The fair counters in Redis outlive this many lease TTLs without a round from
# any host (every live host calls at least each heartbeat, a third of a TTL).
FAIR_TTL_TTLS: Final = 4

# KEYS: leases, deadlines, priority waiters, unmet demand, limits (host -> n
#       each), meta.
# ARGV: host, ttl_ms, limit, headroom, default_min_share, holding, want,
#       priority waiting, hosts last seen, leaving (1/0), the wake-up channel,
#       the flex part of want (granted only from idle capacity).
# Unmet demand is a host's priority and default demand only: flex never
# makes another host give a slot back, and takes none while another host
# has priority waiters or unmet demand.
# Returns {lease, live hosts, priority waiters elsewhere, unmet demand
# elsewhere, the cluster's limit}.
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
local fwant = tonumber(ARGV[12] or '0')
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
  room = math.max(0, room)
  local sold = math.min(room, math.max(0, want - fwant - lease))
  local grant = math.min(pwait, sold)
  local rest = sold - grant
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
  -- Flex: only what nobody else waits for, never into the headroom.
  if fwant > 0 and others_p == 0 and others_unmet == 0 then
    lease = lease + math.max(0, math.min(want - lease, room - grant - droom,
                                         limit - headroom - others - lease))
  end
end
-- A host that starts to lack slots, or to have priority waiters, tells the
-- others at once (they may hold idle slots and would only hear at their
-- next heartbeat otherwise).
local unmet = math.max(0, want - fwant - lease)
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
return {lease, hosts, others_p, others_unmet, limit}
"""
_LEASE_SCRIPT: Final = Script(_LEASE)


def cluster_settings(cfg: AdmissionConfig) -> PoolSettings:
    """A pool's settings as a cluster host's core runs them: headroom 0, since
    the lease script keeps `priority_headroom` once for the whole cluster."""
    return cfg.but(priority_headroom=None).settings


class ReplicaSlots:
    """One replica's slots on this host, seen as the lease rule sees a pool's:
    its limit (fixed or learned, before health's cap), in flight, the slots
    withheld (its limit above its lease cap, or above what is in flight when
    that is more) and owed (in flight above the cap: busy slots given back as
    they free); `withhold` and `restore` move the cap. Its demand is the
    pool's waiters while tierq.health has it in rotation here (any of them
    may be granted on it), else none."""

    __slots__ = ("pool", "replica")

    def __init__(self, pool: ReplicaPool, replica: int) -> None:
        self.pool = pool
        self.replica = replica

    @property
    def limit(self) -> int:
        return self.pool.learned(self.replica)

    def _cap(self, limit: int) -> int:
        lease = self.pool.lease(self.replica)
        return limit if lease is None else min(lease, limit)

    def unplaced(self) -> int:
        """Pool slots granted whose holder has not taken a replica yet: it
        runs after the grant, on its own task, and takes one at once."""
        placed = sum(int(x["in_flight"]) for x in self.pool.stats())
        return max(0, int(str(self.pool.admission.stats()["in_flight"])) - placed)

    def stats(self) -> dict[str, object]:
        replicas = self.pool.stats()
        pool = self.pool.admission.stats()
        r = replicas[self.replica]
        # Pool slots granted whose holder has not picked a replica yet may
        # land on any replica with room: each replica counts them as busy.
        # The agent lets them pick before it plans (LeaseAgent._let_place), so
        # this is 0 but when that gave up.
        pending = max(0, int(str(pool["in_flight"])) - sum(int(x["in_flight"]) for x in replicas))
        limit, busy = int(r["learned"]), int(r["in_flight"]) + pending
        cap = self._cap(limit)
        holding = min(limit, max(cap, busy))
        depth = pool["depth"]
        assert isinstance(depth, dict)
        if not self.pool.healthy(self.replica):
            depth = dict.fromkeys(depth, 0)
        # The slots the pool's core keeps from flex, all of them asked on
        # each replica: flex is granted only from idle capacity, so a replica
        # asking too much idles nobody's slot, and one asking too few would
        # leave its flex waiting beside idle slots.
        return {"limit": limit, "in_flight": busy, "withheld": limit - holding,
                "owed": holding - cap, "depth": depth, "flex_kept": pool["flex_kept"]}

    def withhold(self, n: int) -> None:
        self.pool.set_lease(self.replica, max(0, self._cap(self.limit) - n))

    def restore(self, n: int) -> None:
        limit = self.limit
        self.pool.set_lease(self.replica, min(limit, self._cap(limit) + n))


@dataclass(slots=True)
class PoolLease:
    """One pool's (or one replica's) share of the cluster: what this host
    holds and last heard."""

    model: str
    admission: Admission | ReplicaSlots
    headroom: int
    default_min_share: float
    limit: int = 0  # this host's core's limit (fixed, or learned), last read
    cluster_limit: int = 0  # the lowest of the live hosts' limits, last heard
    lease: int = 0  # slots Redis last granted (or the local share while down)
    others_priority: int = 0  # priority waiters on other hosts, last heard
    others_unmet: int = 0  # demand other hosts could not get, last heard
    reported_pwait: int = 0  # this host's priority waiters as Redis last heard
    want: int = 0  # what this host asked for last
    flex_want: int = 0  # the part of `want` that is flex waiters (idle capacity only)
    holding: int = 0  # limit minus withheld: slots it really has, busy or idle
    flows: FlowCounters | None = None  # its fair counters, shared (fairness "tokens")
    endpoint: str = ""  # a replica's endpoint (its lease's key beside the model), "" for a pool

    @property
    def key(self) -> str:
        """Its name in Redis and in status(): the model, `model@endpoint` for a replica."""
        return f"{self.model}@{self.endpoint}" if self.endpoint else self.model

    def plan(self, heartbeat: bool, touch: bool = True) -> tuple[int, int, bool]:
        """(holding, want, contended) from the local core, withholding locally
        at once what it gives back (busy slots as they are released) unless
        not `touch` (a probe while Redis is down: the local share stands)."""
        st = self.admission.stats()
        self.limit = int(str(st["limit"]))
        depth = st["depth"]
        assert isinstance(depth, dict)
        pw, dw = int(depth[Tier.PRIORITY]), int(depth[Tier.DEFAULT])
        fw = int(depth[Tier.FLEX])
        flex = 0  # flex waiters asked for: only while no host has other demand
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
            # Strict priority across hosts, as in one core: while priority
            # waits on another host, this host starts none of its queued
            # defaults. Every slot goes back (idle ones now, busy ones as they
            # free) until the others' priority waiters are granted. Yielding
            # only the waiters the free slots did not cover let the other
            # slots freeing in the same round start this host's defaults
            # while the given-back slot was still on its way to the priority
            # request (#20: 6 defaults queued on B ended before A's priority).
            want = 0
        elif self.others_priority > 0:
            want = busy + pw  # its own priority waiters first; defaults wait
        elif self.others_unmet > 0:
            want = busy + pw + dw  # others need slots: give back the idle ones (flex waits)
        else:
            # Flex asks only while this host's own lanes are empty: the core
            # serves it only then, so slots asked for it sooner would idle.
            # Plus the slots the core keeps free of flex within them
            # (priority's reserve and the flex headroom: `flex_kept`).
            flex = fw + int(str(st["flex_kept"])) if fw and pw == dw == 0 else 0
            if heartbeat and usable > busy + pw + dw + flex:
                # Idle slots nobody asked for: give half back each heartbeat, so
                # an idle host's lease drains while a busy one keeps its own.
                idle = usable - (busy + pw + dw + flex)
                want = usable - (idle + 1) // 2
            else:
                want = max(usable, busy + pw + dw + flex)
        want = min(self.limit, want)
        self.flex_want = min(flex, max(0, want - (busy + pw + dw)))
        if not touch:
            pass
        elif want < usable:
            self.admission.withhold(usable - want)
        elif want > usable and owed > 0:
            self.admission.restore(min(owed, want - usable))
        self.holding = holding
        self.want = want
        # Flex demand alone is not contention: it waits for idle slots at the
        # heartbeat's pace (or the next arrival's wake-up), not 50 syncs a second.
        contended = (want - self.flex_want > holding or self.others_priority > 0
                     or self.others_unmet > 0 or pw != self.reported_pwait)
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


class LeaseAgent:
    """This host's lease agent: plans every pool from its local core, syncs the
    leases with Redis (one pipelined call a round) and keeps each core to its
    lease; while Redis is down in "local" mode, to its share of the limit."""

    def __init__(self, link: RedisLink, pools: Mapping[str, tuple[Admission, AdmissionConfig]],
                 shared: bool,
                 replicas: Mapping[str, tuple[ReplicaPool, AdmissionConfig, Sequence[str]]]
                 | None = None) -> None:
        """`shared`: the host runs several workers on shared pools, whose slots
        the supervisor withheld before forking (this agent is worker 0's).
        `replicas`: the pools over several endpoints (their replicas, one
        replica's settings, the endpoints in order), leased per replica."""
        self.link = link
        self.config = link.config
        self._shared = shared
        self.ttl_s = link.ttl_s
        self.heartbeat_s = link.heartbeat_s
        replicas = replicas or {}
        if shared and replicas:
            raise ValueError("[cluster] with several endpoints runs one worker per host (--workers 1)")
        self.pools: dict[str, PoolLease] = {}
        for model, (adm, cfg) in pools.items():
            flows = FlowCounters(adm) if cfg.settings.fairness == "tokens" else None
            if model not in replicas:
                self.pools[model] = PoolLease(model, adm, cfg.settings.priority_headroom,
                                              cfg.settings.default_min_share, adm.limit, adm.limit,
                                              flows=flows)
                continue
            rp, one, endpoints = replicas[model]
            for i, endpoint in enumerate(endpoints):
                slots = ReplicaSlots(rp, i)
                # The pool's fair counters ride with its first replica's lease.
                p = PoolLease(model, slots, one.settings.priority_headroom,
                              one.settings.default_min_share, slots.limit, slots.limit,
                              flows=flows if i == 0 else None,
                              endpoint=endpoint)
                self.pools[p.key] = p
        self.sync_s = 0.0  # time spent waiting on lease syncs
        # The longest time from one lease call's reply to the next call's
        # send: at least that long Redis heard nothing from this host. Past
        # lease_ttl_ms its leases lapsed while it may have run requests on them.
        self.gap_max_s = 0.0
        self._replied_at: float | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._listener: asyncio.Task[None] | None = None
        self._poked = False  # another host published that it lacks slots
        self._stopping = False
        for p in self.pools.values():
            if shared:
                # Shared pools: the slots not withheld are this host's (a
                # restarted agent takes over what the last one held).
                st = p.admission.stats()
                p.holding = p.limit - int(str(st["withheld"]))
                p.lease = p.holding - int(str(st["owed"]))
            else:
                p.admission.withhold(p.limit)  # until the first lease, nothing
        link.on_alone.append(self._serve_alone)

    async def start(self) -> None:
        await self._sync(heartbeat=True)
        self._task = asyncio.create_task(self._run(), name="tierq-cluster")
        self._listener = asyncio.create_task(self._listen(), name="tierq-cluster-wake")

    async def stop(self) -> None:
        """Stops the agent; `leave` then hands the leases back."""
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            await self._task
        if self._listener is not None:
            self._listener.cancel()
            await asyncio.gather(self._listener, return_exceptions=True)

    async def leave(self) -> None:
        """Hands this host's leases back (best effort), unless other workers
        may still finish requests on the host's slots: then the lease runs
        out by its TTL instead."""
        if self.link.up and not self._shared:
            try:
                await self._call_leases(leaving=True)
            except self.link.RedisError:
                pass

    def wake(self) -> None:
        """A request arrived: look whether the lease still covers it."""
        self._wake.set()

    async def _listen(self) -> None:
        """Wakes the agent when another host starts lacking slots."""
        me = self.link.host_id.encode()
        while not self._stopping:
            pubsub = self.link.redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(WAKE_CHANNEL)
                while not self._stopping:
                    msg = await pubsub.get_message(timeout=self.heartbeat_s)
                    if msg is not None and msg.get("data") != me:
                        self._poked = True  # ask Redis even if nothing changed here
                        self._wake.set()
            except self.link.RedisError:
                await asyncio.sleep(self.heartbeat_s)  # down: the agent probes; retry later
            finally:
                try:
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
                except self.link.RedisError:
                    pass

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
        link = self.link
        if not link.up and not heartbeat:
            return False  # down: only the heartbeat probes Redis
        await self._let_place()
        plans = [p.plan(heartbeat, touch=link.up) for p in self.pools.values()]
        contended = any(c for _, _, c in plans)
        if not link.up:
            return await self._probe()
        changed = any(want != p.lease or holding != p.lease
                      for (holding, want, _), p in zip(plans, self.pools.values()))
        poked, self._poked = self._poked, False
        if not (heartbeat or changed or contended or poked):
            return False
        try:
            await self._call_leases(leaving=False)
        except link.RedisError as e:
            link.went_down(e)
            return False
        return contended or any(p.others_priority or p.others_unmet or p.want > p.lease
                                for p in self.pools.values())

    async def _call_leases(self, leaving: bool) -> None:
        link = self.link
        pools = list(self.pools.values())
        t0 = time.perf_counter()
        pipe = link.redis.pipeline(transaction=False)
        # Each fair pool's counters ride in the same round trip, after its lease.
        fair = [] if leaving else [p for p in pools if p.flows is not None]
        for p in pools:
            p.reported_pwait = self._priority_waiting(p)
            tag = f"{{tierq:pool:{p.key}}}"
            pipe.evalsha(_LEASE_SCRIPT.sha, 6, f"{tag}:lease", f"{tag}:seen", f"{tag}:pwait",
                         f"{tag}:unmet", f"{tag}:limit", f"{tag}:meta",
                         link.host_id, self.config.lease_ttl_ms, p.limit, p.headroom,
                         repr(p.default_min_share), p.holding, p.want,
                         p.reported_pwait, link.hosts, int(leaving), WAKE_CHANNEL, p.flex_want)
        for p in fair:
            assert p.flows is not None
            pipe.evalsha(FAIR_SCRIPT.sha, 2, *p.flows.keys(p.model, link.host_id),
                         *p.flows.args(FAIR_TTL_TTLS * self.config.lease_ttl_ms))
        link.calls += 1
        sent = time.monotonic()
        if self._replied_at is not None:
            self.gap_max_s = max(self.gap_max_s, sent - self._replied_at)
        try:
            replies = await pipe.execute()
        except link.NoScriptError:
            for script in (_LEASE_SCRIPT, FAIR_SCRIPT):
                await link.redis.script_load(script.text)
            return await self._call_leases(leaving)
        finally:
            self.sync_s += time.perf_counter() - t0
        self._replied_at = time.monotonic()
        if leaving:
            return
        for p, reply in zip(fair, replies[len(pools):], strict=True):
            assert p.flows is not None
            p.flows.incoming(reply)
        hosts = 1
        for p, (lease, live, others_p, others_unmet, limit) in zip(pools, replies[:len(pools)]):
            p.others_priority, p.others_unmet = int(others_p), int(others_unmet)
            p.cluster_limit = int(limit)
            hosts = max(hosts, int(live))
            p.apply(int(lease), p.want)
        link.hosts = hosts

    async def _let_place(self) -> None:
        """Lets every holder granted a pool slot take its replica before the
        plan may cut a replica's cap: cut under such a holder, no replica
        has room for it and it goes over one's limit (`Replicas.over`), past
        this host's lease of it, while another host may hold the rest. A
        granted holder's task is already scheduled: each yield to the loop
        runs the ones granted before it (asyncio runs callbacks in order)."""
        slots = [p.admission for p in self.pools.values()
                 if isinstance(p.admission, ReplicaSlots) and p.admission.replica == 0]
        for _ in range(PLACE_TRIES):
            if not any(s.unplaced() for s in slots):
                return
            await asyncio.sleep(0)

    @staticmethod
    def _priority_waiting(p: PoolLease) -> int:
        depth = p.admission.stats()["depth"]
        assert isinstance(depth, dict)
        return int(depth[Tier.PRIORITY])

    async def _probe(self) -> bool:
        """Tries Redis while it is down (or not joined yet); rejoins if it answers."""
        try:
            await self._call_leases(leaving=False)
        except self.link.RedisError as e:
            self.link.went_down(e)
            return False
        self.link.came_back()
        return True

    def _serve_alone(self) -> None:
        """Redis went down in "local" mode: each host's share is the limit
        divided by the live hosts it last saw. At first a host only cuts down to
        it: the others may still run requests on slots above their share, which
        they stop handing on as soon as they notice. After one TTL it also grows
        to it."""
        down_since = self.link.down_since
        assert down_since is not None
        settled = time.monotonic() - down_since >= self.ttl_s
        for p in self.pools.values():
            p.others_priority = p.others_unmet = 0
            share = min(p.limit, p.cluster_limit) // max(1, self.link.hosts)
            p.apply(share, share if settled else min(share, p.holding))

    def status(self) -> dict[str, Any]:
        """Each pool's lease, for Cluster.status()."""
        out: dict[str, Any] = {}
        for p in self.pools.values():
            out[p.key] = {"lease": p.lease, "holding": p.holding,
                          "limit": p.cluster_limit, "host_limit": p.limit,
                          "others_priority": p.others_priority}
            if isinstance(p.admission, ReplicaSlots):
                # Picks on this host that found no replica within its cap
                # (the pool's count, on each of its replicas' entries).
                out[p.key]["over"] = p.admission.pool.core.over
        return out
