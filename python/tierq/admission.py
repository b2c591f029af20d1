"""Admission for one pool, as an async context manager over the Rust core.

The core (`tierq._core.AdmissionCore`) decides who gets a slot, who waits and
who is shed; this module only parks waiting tasks on futures, resolves the ones
the core names, and turns a shed into `Shed` in exactly one place.
"""

from __future__ import annotations

import asyncio
import math
from types import TracebackType
from typing import Mapping, Sequence

from tierq._core import SHED_CODES, AdmissionCore, ManualClock
from tierq.retry_after import retry_after

__all__ = ["Admission", "Shed", "Slot", "lane_waits"]

_LANES = {"priority": 0, "default": 1}
_LANE_NAMES = ("priority", "default")
_NONE = -1
_NEVER = (1 << 63) - 1


def lane_waits(max_wait_ms: float | Mapping[str, float]) -> tuple[float, float]:
    """`max_wait_ms` as (default, priority) ms: one number for both lanes, or a
    mapping by lane (a missing lane takes its default). The one reading of it,
    for a one-process pool and a shared one (tierq.workers) alike."""
    if isinstance(max_wait_ms, Mapping):
        unknown = set(max_wait_ms) - set(_LANES)
        if unknown:
            raise ValueError(f"max_wait_ms: unknown lane {sorted(unknown)[0]!r}")
        return float(max_wait_ms.get("default", 30000.0)), float(max_wait_ms.get("priority", 60000.0))
    return float(max_wait_ms), float(max_wait_ms)


class Shed(Exception):
    """A request was not admitted. Nothing is held and nothing is billed.

    `code` is one of ``server_overloaded``, ``queue_timeout`` and
    ``rate_limit_exceeded``; `retry_after_s` is the exact wait the core computed.
    """

    def __init__(self, code: str, retry_after_s: float, lane: str) -> None:
        self.code = code
        self.retry_after_s = retry_after_s
        self.lane = lane
        super().__init__(f"{code}: retry after {retry_after_s:.3f}s ({lane} lane)")

    @property
    def retry_after_ms(self) -> int:
        """The `retry-after-ms` header (tierq.retry_after): the wait in whole
        milliseconds, rounded up, at least 1."""
        return retry_after(self.retry_after_s).ms

    @property
    def retry_after_header(self) -> int:
        """The `Retry-After` header (tierq.retry_after): whole seconds, rounded up,
        at least 1, at most 120."""
        return retry_after(self.retry_after_s).s


class Slot:
    """One `acquire()`: waits in its lane on enter, releases on exit.

    The object is its own slot so that an admission allocates nothing else.
    """

    __slots__ = ("_adm", "_fut", "_timer", "lane", "cost", "queue_ns")

    def __init__(self, adm: Admission, lane: int, cost: int) -> None:
        self._adm = adm
        self._fut: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self.lane = lane
        self.cost = cost
        self.queue_ns = 0

    @property
    def tier(self) -> str:
        """The lane this request was admitted in: ``priority`` or ``default``."""
        return _LANE_NAMES[self.lane]

    @property
    def queue_ms(self) -> float:
        return self.queue_ns / 1e6

    async def __aenter__(self) -> Slot:
        adm = self._adm
        core = adm._core
        kind, a, b, c = core.admit(self.lane, self.cost)
        if kind == 0:
            return self
        if kind == 2:
            if c != _NONE:
                # Evicted for this arrival, which then found no free cell itself.
                adm._shed_waiter(c, "server_overloaded")
            # The core's "never fits" wait (u64::MAX) arrives clamped to i64::MAX.
            raise Shed(SHED_CODES[a], math.inf if b == _NEVER else b / 1e9, _LANE_NAMES[self.lane])
        # Queued as waiter `a`; maybe it evicted `b`, maybe a slot went to `c`.
        if b != _NONE:
            adm._shed_waiter(b, "server_overloaded")
        if c == a:
            return self
        t0 = core.now_ns()
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        self._fut = fut
        self._timer = loop.call_later(adm._max_wait_s[self.lane], adm.expire_due)
        adm._waiters[a] = self
        if c != _NONE:
            adm._grant(c)
        try:
            await fut
        except asyncio.CancelledError:
            if core.cancel(a):
                del adm._waiters[a]
                self._timer.cancel()
            elif fut.done() and not fut.cancelled() and fut.exception() is None:
                # Granted just before the cancellation reached us: pass it on.
                adm._release()
            raise
        self.queue_ns = core.now_ns() - t0
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._adm._release()


class Admission:
    """Admission control for one pool (one model's backend capacity).

    ``async with adm.acquire("priority") as slot:`` waits in its lane for one
    of `max_concurrency` slots or raises `Shed`. A task cancelled while waiting
    leaves the queue at once; the slot is released however the block exits.
    `priority_headroom` slots are kept for priority: a default request is
    admitted only while fewer than ``max_concurrency - priority_headroom`` are
    in use (0, the default, keeps none).
    """

    __slots__ = ("_core", "_waiters", "_max_wait_s")

    def __init__(
        self,
        max_concurrency: int = 64,
        queue_depth: int = 1024,
        max_wait_ms: float | Mapping[str, float] = 30000.0,
        rate: float | None = None,
        burst: float | None = None,
        priority_reserve: float = 0.2,
        default_min_share: float = 0.0,
        clock: ManualClock | None = None,
        priority_headroom: int = 0,
    ) -> None:
        wait_default, wait_priority = lane_waits(max_wait_ms)
        core = AdmissionCore(
            max_concurrency,
            queue_depth,
            wait_default,
            wait_priority,
            rate,
            burst,
            priority_reserve,
            default_min_share,
            clock,
            priority_headroom,
        )
        self._adopt(core, wait_default, wait_priority)

    def _adopt(self, core: AdmissionCore, wait_default: float, wait_priority: float) -> None:
        """Takes `core` as this pool's state (local or shared): the one place the
        Python side of an Admission is set up."""
        self._core = core
        self._waiters: dict[int, Slot] = {}
        # Timers fire a little after the deadline so the core sees it passed.
        self._max_wait_s = (wait_priority / 1000 + 0.001, wait_default / 1000 + 0.001)

    @classmethod
    def shared(
        cls,
        name: str,
        worker: int,
        wake_fds: Sequence[int],
        max_concurrency: int = 64,
        queue_depth: int = 1024,
        max_wait_ms: float | Mapping[str, float] = 30000.0,
        rate: float | None = None,
        burst: float | None = None,
        priority_reserve: float = 0.2,
        default_min_share: float = 0.0,
        priority_headroom: int = 0,
    ) -> Admission:
        """This worker's handle on a pool whose state is the shared block `name`.

        The block (made by `tierq.workers.SharedPools`) must have been created
        with the same settings; all workers then share one pair of lanes, one
        bucket and one slot count. Outcomes another worker decides for this
        one's waiters arrive in its mailbox: call `deliver()` when
        `wake_fds[worker]` (an eventfd) is readable.
        """
        wait_default, wait_priority = lane_waits(max_wait_ms)
        core = AdmissionCore.attach_shared(
            name, worker, list(wake_fds), max_concurrency, queue_depth, wait_default,
            wait_priority, rate, burst, priority_reserve, default_min_share, priority_headroom,
        )
        adm = cls.__new__(cls)
        adm._adopt(core, wait_default, wait_priority)
        return adm

    def deliver(self) -> int:
        """Resolves the waiters that other workers granted or shed (shared pools).

        Returns how many messages were taken. A no-op on a one-process pool.
        """
        mail = self._core.drain()
        for waiter, outcome in mail:
            if outcome == 0:
                self._grant(waiter)
            else:
                self._shed_waiter(waiter, SHED_CODES[outcome - 1])
        return len(mail)

    def acquire(self, tier: str = "default", cost: int = 1) -> Slot:
        """A slot in lane `tier` (``"priority"`` or ``"default"``), as an async context manager."""
        try:
            lane = _LANES[tier]
        except (KeyError, TypeError):
            raise ValueError(f'tier: must be "priority" or "default", got {tier!r}') from None
        return Slot(self, lane, cost)

    def stats(self) -> dict[str, object]:
        """Depth per lane, in flight, admitted per lane, sheds per code, cancelled."""
        return self._core.stats()

    def expire_due(self) -> int:
        """Sheds every waiter past its lane's max wait now; returns how many.

        Runs by itself from timers; call it after advancing a `ManualClock`.
        """
        expired = self._core.expire_due()
        for waiter in expired:
            self._shed_waiter(waiter, "queue_timeout")
        return len(expired)

    def _shed_waiter(self, waiter: int, code: str) -> None:
        slot = self._waiters.pop(waiter, None)
        if slot is None or slot._fut is None:
            return
        if slot._timer is not None:
            slot._timer.cancel()
        if not slot._fut.done():
            retry = self._core.retry_after_ns(slot.lane) / 1e9
            slot._fut.set_exception(Shed(code, retry, _LANE_NAMES[slot.lane]))

    def _grant(self, waiter: int) -> None:
        slot = self._waiters.pop(waiter, None)
        if slot is None or slot._fut is None or slot._fut.done():
            # Its task is gone (cancelled in flight): the slot moves on.
            self._release()
            return
        if slot._timer is not None:
            slot._timer.cancel()
        slot._fut.set_result(None)

    def _release(self) -> None:
        waiter = self._core.release()
        while waiter is not None:
            slot = self._waiters.pop(waiter, None)
            if slot is not None and slot._fut is not None and not slot._fut.done():
                if slot._timer is not None:
                    slot._timer.cancel()
                slot._fut.set_result(None)
                return
            waiter = self._core.release()
