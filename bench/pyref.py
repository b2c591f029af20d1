"""A pure-Python implementation of tierq's admission rules, the baseline the
microbenchmarks compare the Rust core against. Same rules as DESIGN.md: two
FIFO lanes (strict priority or `default_min_share`), newest-default eviction,
per-lane max wait, a GCRA bucket with a priority reserve. Not used by tierq."""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable
from types import TracebackType
from typing import Mapping

_LANES = {"priority": 0, "default": 1}


class Shed(Exception):
    def __init__(self, code: str, retry_after_s: float) -> None:
        self.code = code
        self.retry_after_s = retry_after_s
        super().__init__(code)


class RefBucket:
    """GCRA in integer nanoseconds: the state is the theoretical arrival time."""

    __slots__ = ("_interval", "_tau", "_limits", "_tat", "_now")

    def __init__(
        self,
        rate: float,
        burst: float | None = None,
        priority_reserve: float = 0.0,
        clock: Callable[[], int] = time.monotonic_ns,
    ) -> None:
        if not (math.isfinite(rate) and rate > 0):
            raise ValueError(f"rate: must be a positive number, got {rate}")
        burst = max(rate, 1.0) if burst is None else burst
        self._interval = round(1e9 / rate)
        self._tau = round(burst * self._interval)
        reserve = round(priority_reserve * self._tau)
        self._limits = (self._tau, max(self._tau - reserve, self._interval))
        self._tat = 0
        self._now = clock

    def try_take(self, cost: int = 1, tier: str = "default") -> float | None:
        return self.take(cost, _LANES[tier])

    def take(self, cost: int, lane: int) -> float | None:
        limit = self._limits[lane]
        need = cost * self._interval
        if need > limit:
            return math.inf
        now = self._now()
        tat = self._tat
        new_tat = (tat if tat > now else now) + need
        ahead = new_tat - now
        if ahead <= limit:
            self._tat = new_tat
            return None
        return (ahead - limit) / 1e9

    def refund(self, cost: int) -> None:
        now = self._now()
        self._tat = max(self._tat - cost * self._interval, min(now, self._tat))


class _Waiter:
    __slots__ = ("fut", "lane", "timer", "live")

    def __init__(self, fut: asyncio.Future[None], lane: int) -> None:
        self.fut = fut
        self.lane = lane
        self.timer: asyncio.TimerHandle | None = None
        self.live = True


class RefSlot:
    __slots__ = ("_adm", "_lane", "_cost")

    def __init__(self, adm: RefAdmission, lane: int, cost: int) -> None:
        self._adm = adm
        self._lane = lane
        self._cost = cost

    async def __aenter__(self) -> RefSlot:
        await self._adm._enter(self._lane, self._cost)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._adm._release()


class RefAdmission:
    """The admission rules with asyncio futures and `collections.deque` lanes.
    Waiters that leave early stay in their deque, marked dead, and are skipped."""

    def __init__(
        self,
        max_concurrency: int = 64,
        queue_depth: int = 1024,
        max_wait_ms: float | Mapping[str, float] = 30000.0,
        rate: float | None = None,
        burst: float | None = None,
        priority_reserve: float = 0.2,
        default_min_share: float = 0.0,
    ) -> None:
        if max_concurrency < 1:
            raise ValueError("max_concurrency: must be at least 1")
        if isinstance(max_wait_ms, Mapping):
            waits = (max_wait_ms.get("priority", 60000.0), max_wait_ms.get("default", 30000.0))
        else:
            waits = (max_wait_ms, max_wait_ms)
        self._max_wait_s = (waits[0] / 1000, waits[1] / 1000)
        self._slots = max_concurrency
        self._queue_depth = queue_depth
        self._in_flight = 0
        self._lanes: tuple[deque[_Waiter], deque[_Waiter]] = (deque(), deque())
        self._depth = [0, 0]
        self._bucket = RefBucket(rate, burst, priority_reserve) if rate is not None else None
        self._share = default_min_share
        self._credit = 0.0
        self.admitted = [0, 0]
        self.shed = {"server_overloaded": 0, "queue_timeout": 0, "rate_limit_exceeded": 0}
        self.cancelled = 0

    def acquire(self, tier: str = "default", cost: int = 1) -> RefSlot:
        return RefSlot(self, _LANES[tier], cost)

    def stats(self) -> dict[str, object]:
        return {
            "depth": {"priority": self._depth[0], "default": self._depth[1]},
            "in_flight": self._in_flight,
            "admitted": {"priority": self.admitted[0], "default": self.admitted[1]},
            "shed": dict(self.shed),
            "cancelled": self.cancelled,
        }

    def admit_now(self, lane: int, cost: int) -> bool:
        """The synchronous part of an arrival: bucket, then a free slot with
        nobody waiting. False: the caller must queue (the bucket was charged)."""
        if self._bucket is not None:
            wait = self._bucket.take(cost, lane)
            if wait is not None:
                self.shed["rate_limit_exceeded"] += 1
                raise Shed("rate_limit_exceeded", wait)
        if self._in_flight < self._slots and not (self._depth[0] or self._depth[1]):
            self._in_flight += 1
            self.admitted[lane] += 1
            return True
        return False

    async def _enter(self, lane: int, cost: int) -> None:
        if self.admit_now(lane, cost):
            return
        if self._depth[0] + self._depth[1] >= self._queue_depth:
            if lane == 1 or not self._evict_newest_default():
                if self._bucket is not None:
                    self._bucket.refund(cost)
                self.shed["server_overloaded"] += 1
                raise Shed("server_overloaded", 1.0)
        loop = asyncio.get_running_loop()
        w = _Waiter(loop.create_future(), lane)
        self._lanes[lane].append(w)
        self._depth[lane] += 1
        w.timer = loop.call_later(self._max_wait_s[lane], self._expire, w)
        try:
            await w.fut
        except asyncio.CancelledError:
            if w.live:
                self._leave(w)
                self.cancelled += 1
            elif w.fut.done() and not w.fut.cancelled() and w.fut.exception() is None:
                self._release()
            raise

    def _leave(self, w: _Waiter) -> None:
        w.live = False
        self._depth[w.lane] -= 1
        if w.timer is not None:
            w.timer.cancel()

    def _evict_newest_default(self) -> bool:
        lane = self._lanes[1]
        while lane:
            w = lane.pop()
            if w.live:
                self._leave(w)
                self.shed["server_overloaded"] += 1
                w.fut.set_exception(Shed("server_overloaded", 1.0))
                return True
        return False

    def _expire(self, w: _Waiter) -> None:
        if w.live:
            self._leave(w)
            self.shed["queue_timeout"] += 1
            w.fut.set_exception(Shed("queue_timeout", 1.0))

    def _pop(self, lane: int) -> _Waiter | None:
        q = self._lanes[lane]
        while q:
            w = q.popleft()
            if w.live:
                return w
        return None

    def _release(self) -> None:
        d0, d1 = self._depth
        if not (d0 or d1):
            self._in_flight -= 1
            return
        order = (0, 1)
        if self._share > 0 and d0 and d1:
            self._credit += self._share
            if self._credit >= 1.0:
                self._credit -= 1.0
                order = (1, 0)
        for lane in order:
            w = self._pop(lane)
            if w is not None:
                self._leave(w)
                self.admitted[lane] += 1
                w.fut.set_result(None)  # the slot passes straight to it
                return
        self._in_flight -= 1
