"""A key's downgrades for every host at once, in Redis: its ramp counts and its
priority spend of the UTC day (tierq.downgrades has the rule and the one-host
table this mirrors).

One script (`_DOWNGRADES`) per job: `decide` is the ramp's take and the
budget's take of `Downgrades.decide` in one atomic call (both or neither);
`adjust` settles an estimate to the real usage or gives it back; `add` brings
what a host counted alone into the shared counts; `rebuild` raises the day's
spend to what the ledgers say. Counters are plain integers, one per key and
period (`{tierq:key:<id>}:ramp:<step>`, `...:budget:<day>`, hash-tagged like
the key limits), capped where the core's counter words cap them, so across
hosts a key is downgraded at the same count as on one host.

The ramp step and the UTC day come from the host's clock (as on one host),
so hosts whose clocks differ by s seconds disagree on a period's edge for s
seconds. While Redis is down in "local" mode each process decides alone on a
table of its own, with the key's floor divided among the processes (the live
hosts last seen times the host's workers) and its budget's remainder (as
Redis last said) likewise; it adds those counts to Redis's when it rejoins.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from decimal import Decimal
from typing import Any, Final

from tierq.cluster.link import RedisLink, Script
from tierq.downgrades import DAY_S, STEP_S, Downgrades, Hold, growth_per_step, nano_usd, spend_nano
from tierq.keys import KeyInfo
from tierq.tiers import Tier, TierReason

__all__ = ["ClusterDowngrades"]

log = logging.getLogger("tierq.cluster")

# The largest count of a ramp step (tokens) and of a day's budget (nano-USD):
# what core/keytable.rs's counter words hold (2^40 and 2^48, less one).
RAMP_MAX: Final = (1 << 40) - 1
BUDGET_MAX: Final = (1 << 48) - 1
# How long a counter outlives its last write: a ramp step is read in the next
# one (its allowance), a day's spend only that day.
RAMP_TTL_MS: Final = 3 * STEP_S * 1000
DAY_TTL_MS: Final = 2 * DAY_S * 1000

# ARGV[1] is the op.
# decide: KEYS the key's ramp count of this step and of the one before, its
# spend of the day. ARGV ramp (0|1), floor, growth per step, tokens, budget
# (0|1), limit (nano-USD), cost (nano-USD). Returns {0 served | 1 ramp |
# 2 budget, the day's spend after}; counts both or neither (a downgrade counts
# nothing).
# adjust: KEYS one counter. ARGV delta, max: moves it by delta, within 0..max,
# if it still exists (a period over since is left alone).
# add: the same, creating it (ARGV ttl_ms): what a host counted alone.
# rebuild: KEYS the day's spend, the hash of each ledger's spend. ARGV field,
# nano-USD: the field raised to at least it, the spend to at least the sum of
# the fields. Returns the spend.
_DOWNGRADES: Final = """
local function num(key)
  return tonumber(redis.call('GET', key) or '0')
end
local function put(key, n, ttl)
  redis.call('SET', key, string.format('%.0f', n), 'PX', ttl)
end
local op = ARGV[1]
if op == 'decide' then
  local tokens, cost = tonumber(ARGV[5]), tonumber(ARGV[8])
  local spent = num(KEYS[3])
  local ramp_after
  if ARGV[2] == '1' then
    local allowed = math.max(tonumber(ARGV[3]), math.floor(num(KEYS[2]) * tonumber(ARGV[4])))
    ramp_after = num(KEYS[1]) + tokens
    if ramp_after > math.min(allowed + tokens - 1, @RAMP_MAX@) then
      return {1, string.format('%.0f', spent)}
    end
  end
  if ARGV[6] == '1' then
    if spent + cost > math.min(tonumber(ARGV[7]), @BUDGET_MAX@) then
      return {2, string.format('%.0f', spent)}
    end
    spent = spent + cost
    put(KEYS[3], spent, @DAY_TTL@)
  end
  if ramp_after then put(KEYS[1], ramp_after, @RAMP_TTL@) end
  return {0, string.format('%.0f', spent)}
end
if op == 'adjust' or op == 'add' then
  local had = redis.call('GET', KEYS[1])
  if not had and op == 'adjust' then return 0 end
  local n = math.min(math.max(0, tonumber(had or '0') + tonumber(ARGV[2])), tonumber(ARGV[3]))
  local ttl = redis.call('PTTL', KEYS[1])
  if ttl < 0 then ttl = tonumber(ARGV[4] or '@DAY_TTL@') end
  put(KEYS[1], n, ttl)
  return 1
end
if op == 'rebuild' then
  local nano = tonumber(ARGV[3])
  if nano > tonumber(redis.call('HGET', KEYS[2], ARGV[2]) or '0') then
    redis.call('HSET', KEYS[2], ARGV[2], string.format('%.0f', nano))
  end
  redis.call('PEXPIRE', KEYS[2], @DAY_TTL@)
  local total = 0
  for _, v in ipairs(redis.call('HVALS', KEYS[2])) do total = total + tonumber(v) end
  total = math.min(total, @BUDGET_MAX@)
  local spent = num(KEYS[1])
  if total > spent then
    local ttl = redis.call('PTTL', KEYS[1])
    put(KEYS[1], total, ttl > 0 and ttl or @DAY_TTL@)
    spent = total
  end
  return string.format('%.0f', spent)
end
return redis.error_reply('unknown op ' .. op)
"""
_SCRIPT: Final = Script(_DOWNGRADES.replace("@RAMP_MAX@", str(RAMP_MAX))
                        .replace("@BUDGET_MAX@", str(BUDGET_MAX))
                        .replace("@RAMP_TTL@", str(RAMP_TTL_MS)).replace("@DAY_TTL@", str(DAY_TTL_MS)))


def _tag(key_id: str) -> str:
    return f"{{tierq:key:{key_id}}}"


class ClusterDowngrades:
    """The ramp rules and priority budgets of a cluster host: `decide`,
    `settle` and `refund` as `tierq.downgrades.Downgrades` has them, counted in
    Redis while it answers and on a table of this process's own while it does
    not ("local" mode).

    `clock`: Unix time in seconds (tests pass a manual one). `workers`: the
    host's processes (`--workers N`), each deciding alone while Redis is down.
    """

    def __init__(self, link: RedisLink, clock: Callable[[], float] = time.time,
                 workers: int = 1) -> None:
        self.link = link
        self.clock = clock
        self.workers = max(1, workers)
        self._pending: set[asyncio.Task[Any]] = set()
        # key id -> (day, spend) as Redis last answered: the remainder a host
        # shares out while Redis is down.
        self._seen: dict[str, tuple[int, int]] = {}
        self._alone: Downgrades | None = None  # counted alone since Redis went down
        self._alone_keys: set[str] = set()
        # The ledger's spend of the day to bring into Redis: (field, day, key -> nano).
        self._rebuild: tuple[str, int, dict[str, int]] | None = None
        # Where it is read (`use_ledger`), and whether it is to be read again.
        self._read: Callable[[float], Awaitable[Iterable[tuple[str, Decimal]]]] | None = None
        self._source = ""
        self._shared_ledger = False
        self._read_due = False
        self._catching_up = asyncio.Lock()  # one catch-up at a time: nothing brought twice
        self._rejoin: asyncio.Task[None] | None = None
        link.on_rejoin.append(self._rejoined)

    # ------------------------------------------------------------ deciding

    async def decide(self, key: KeyInfo | None, tier: Tier, est_tokens: int,
                     est_femto: int) -> tuple[Tier, TierReason | None, Hold | None]:
        """`Downgrades.decide` across every host. Raises ClusterUnavailable when
        Redis is down in "closed" mode."""
        if (tier is not Tier.PRIORITY or key is None
                or (key.ramp_max_growth is None and key.priority_budget_usd is None)):
            return tier, None, None
        link = self.link
        if link.up:
            try:
                await self.catch_up()
                return await self._decide_shared(key, tier, est_tokens, est_femto)
            except link.RedisError as e:
                link.went_down(e)
        link.check_open()
        alone = self._alone
        if alone is None:
            alone = self._alone = Downgrades(clock=self.clock)
        self._alone_keys.add(key.public_id)
        return alone.decide(self._local_key(key), tier, est_tokens, est_femto)

    async def _decide_shared(self, key: KeyInfo, tier: Tier, est_tokens: int,
                             est_femto: int) -> tuple[Tier, TierReason | None, Hold | None]:
        now = self.clock()
        step, day = int(now // STEP_S), int(now // DAY_S)
        tokens = max(0, est_tokens)
        ramp = key.ramp_max_growth is not None
        budget = key.priority_budget_usd is not None
        cost = nano_usd(est_femto) if budget else 0
        limit = int(key.priority_budget_usd.scaleb(9)) if key.priority_budget_usd is not None else 0
        tag = _tag(key.public_id)
        reply = await self.link.run(
            _SCRIPT, [f"{tag}:ramp:{step}", f"{tag}:ramp:{step - 1}", f"{tag}:budget:{day}"],
            "decide", int(ramp), key.ramp_min_tpm,
            repr(growth_per_step(key)) if ramp else "0", tokens, int(budget), limit, cost)
        outcome, spent = int(reply[0]), int(reply[1])
        if budget:
            self._seen[key.public_id] = (day, spent)
        if outcome == 1:
            return Tier.DEFAULT, TierReason.RAMP, None
        if outcome == 2:
            return Tier.DEFAULT, TierReason.BUDGET, None
        return tier, None, Hold(step, tokens if ramp else 0, day, cost, budget)

    def _local_key(self, key: KeyInfo) -> KeyInfo:
        """The key as this process applies it alone: its ramp floor divided
        among the processes of the live hosts last seen, and its budget's
        remainder (what Redis last said was left today) likewise."""
        n = max(1, self.link.hosts) * self.workers
        budget = key.priority_budget_usd
        if budget is not None:
            day, spent = self._seen.get(key.public_id, (-1, 0))
            if day != int(self.clock() // DAY_S):
                spent = 0
            budget = Decimal(max(0, int(budget.scaleb(9)) - spent) // n).scaleb(-9)
        return dataclasses.replace(key, ramp_min_tpm=key.ramp_min_tpm // n,
                                   priority_budget_usd=budget)

    # ------------------------------------------------------------ settling

    def settle(self, key: KeyInfo, hold: Hold, real_tokens: int, real_femto: int) -> None:
        """Replaces the estimates `hold` counted with the real usage and cost:
        in Redis while it answers, else in this host's own counts (which it
        adds to Redis's when it rejoins)."""
        if not self.link.up:
            alone = self._alone
            if alone is None:
                alone = self._alone = Downgrades(clock=self.clock)
            self._alone_keys.add(key.public_id)
            alone.settle(key, hold, real_tokens, real_femto)
            return
        tag = _tag(key.public_id)
        if hold.ramp_tokens:
            delta = max(0, real_tokens) - hold.ramp_tokens
            if delta:
                self._send(f"{tag}:ramp:{hold.step}", "adjust", delta, RAMP_MAX)
        if hold.budgeted:
            delta = nano_usd(real_femto) - hold.budget_nano
            if delta:
                self._send(f"{tag}:budget:{hold.day}", "adjust", delta, BUDGET_MAX)

    def refund(self, key: KeyInfo, hold: Hold) -> None:
        """Gives back what `hold` counted: the request was not served (nothing billed)."""
        self.settle(key, hold, 0, 0)

    def _send(self, counter: str, op: str, delta: int, top: int) -> None:
        async def run() -> None:
            try:
                await self.link.run(_SCRIPT, [counter], op, delta, top)
            except self.link.RedisError as e:
                self.link.went_down(e)

        task = asyncio.get_running_loop().create_task(run())
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def settled(self) -> None:
        """Waits for the settlements and refunds sent so far (and a rejoin's catch-up)."""
        while self._pending:
            await asyncio.gather(*list(self._pending), return_exceptions=True)
        if self._rejoin is not None:
            await asyncio.gather(self._rejoin, return_exceptions=True)

    # ------------------------------------------------------------ rejoining and restarting

    def rebuild(self, spend: Iterable[tuple[str, Decimal]], source: str) -> None:
        """Today's priority spend per key as this host's ledger has it (a
        start-up), brought into Redis at the next call that reaches it:
        `source` names the ledger (the host's id for its own SQLite file, one
        name for a PostgreSQL ledger every host shares), and the day's spend is
        raised to at least the sum over the ledgers, each counted once however
        many hosts (or workers) rebuild from it."""
        totals = spend_nano(spend)
        if totals:
            self._rebuild = (source, int(self.clock() // DAY_S), totals)

    def use_ledger(self, read: Callable[[float], Awaitable[Iterable[tuple[str, Decimal]]]],
                   shared: bool) -> None:
        """Where this host reads the day's priority spend per key (`read(since)`,
        its ledger's priority rows since `since`, Unix seconds), and whether
        every host reads the same ledger (`shared`: PostgreSQL; else the
        host's own SQLite file): read and brought into Redis before the first
        decision, and again each time Redis answers after being down (it may
        have restarted empty)."""
        self._read, self._read_due = read, True
        self._shared_ledger = shared
        self._source = "ledger" if shared else f"host:{self.link.host_id}"

    def _rejoined(self) -> None:
        """Redis answers again: this host's counts made alone and its ledger's
        spend are brought in at once (or by the next decision, whichever is first)."""
        self._read_due = self._read is not None
        if self._rejoin is None or self._rejoin.done():
            self._rejoin = asyncio.get_running_loop().create_task(self._rejoining())

    async def _rejoining(self) -> None:
        try:
            await self.catch_up()
        except self.link.RedisError as e:
            self.link.went_down(e)

    async def catch_up(self) -> None:
        """While Redis answers: what this host counted alone while Redis was
        down, then its ledger's spend of the day (read again if due) and any
        rebuild given, are brought into Redis. In that order: the day's spend
        raised to the ledgers' after the counts made alone are added, so a
        restarted, empty Redis gets each host's ledger's spend once, and one
        that kept its counts gets the outage's added and nothing twice. With a
        ledger every host shares, the spend counted alone is not added: the
        shared ledger's rows already hold every host's, and the spend is
        raised to them. RedisError is the caller's (what was brought stays
        brought)."""
        if self._rebuild is None and self._alone is None and not self._read_due:
            return
        async with self._catching_up:
            await self._bring_alone()
            if self._read_due and self._read is not None:
                since = float(int(self.clock() // DAY_S) * DAY_S)
                self._read_due = False
                try:
                    spend = await self._read(since)
                except Exception as e:  # any backend's error: the ledger is not the request's
                    log.warning("cluster: the ledger could not be read to bring the day's priority "
                                "spend into Redis (%s: %s); the counts stand as Redis has them",
                                type(e).__name__, e)
                else:
                    self.rebuild(spend, self._source)
            await self._bring_rebuild()

    async def _bring_rebuild(self) -> None:
        if self._rebuild is None:
            return
        source, day, totals = self._rebuild
        if day == int(self.clock() // DAY_S):
            for key_id, nano in list(totals.items()):
                tag = _tag(key_id)
                await self.link.run(_SCRIPT, [f"{tag}:budget:{day}", f"{tag}:rebuilt:{day}"],
                                    "rebuild", source, nano)
                del totals[key_id]
        self._rebuild = None

    async def _bring_alone(self) -> None:
        alone = self._alone
        if alone is None or not self.link.up:
            return
        now = self.clock()
        step, day = int(now // STEP_S), int(now // DAY_S)
        from_ledger = self._shared_ledger and self._read is not None
        for key_id in sorted(self._alone_keys):
            tag = _tag(key_id)
            for counter, kind, period, top, ttl in (
                    (f"{tag}:budget:{day}", "budget", day, BUDGET_MAX, DAY_TTL_MS),
                    (f"{tag}:ramp:{step - 1}", "ramp", step - 1, RAMP_MAX, RAMP_TTL_MS),
                    (f"{tag}:ramp:{step}", "ramp", step, RAMP_MAX, RAMP_TTL_MS)):
                n = alone.count(key_id, kind, period)
                if n:
                    if not (from_ledger and kind == "budget"):
                        await self.link.run(_SCRIPT, [counter], "add", n, top, ttl)
                    alone.uncount(key_id, kind, period, n)
            self._alone_keys.discard(key_id)
        self._alone = None
        log.info("cluster: the downgrade counts made alone while Redis was down are in Redis")

    async def spent_nano(self, key_id: str) -> int:
        """The key's priority spend today in Redis (estimates in flight included)."""
        day = int(self.clock() // DAY_S)
        got = await self.link.redis.get(f"{_tag(key_id)}:budget:{day}")
        return int(got or 0)
