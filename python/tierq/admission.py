"""Admission for one pool, as an async context manager over the Rust core.

The core (`tierq._core.AdmissionCore`) decides who gets a slot, who waits and
who is shed; this module only parks waiting tasks on futures, resolves the ones
the core names, and turns a shed into `Shed` in exactly one place.
"""

from __future__ import annotations

import asyncio
import math
from types import TracebackType
from typing import TYPE_CHECKING, Final, Sequence, Unpack

from tierq._core import SHED_CODES, AdmissionCore, ManualClock, PoolSettings, Replicas
from tierq.retry_after import retry_after
from tierq.tiers import Tier, one_of

if TYPE_CHECKING:
    # PoolSettings' keywords, declared by the core (typed in the stub).
    from tierq._core import _SettingsKwargs as SettingsKwargs

__all__ = ["Admission", "PoolSettings", "ReplicaFeed", "ReplicaPool", "Shed", "Slot"]

# Lane index -> tier; a tier's index is `Tier.lane`.
_LANE_TIERS: Final = tuple(Tier)
# A tier or its name -> lane index (a dict: acquire() runs per request).
_LANE_OF: Final[dict[str, int]] = {tier: tier.lane for tier in Tier}
_ONE_OF: Final = one_of('"')
_NONE = -1
_NEVER = (1 << 63) - 1
# Expiry timers fire this long after a waiter's deadline, so the core sees it passed.
_TIMER_SLACK_S = 0.001


class Shed(Exception):
    """A request was not admitted. Nothing is held and nothing is billed.

    `code` is one of ``server_overloaded``, ``queue_timeout`` and
    ``rate_limit_exceeded``; `retry_after_s` is the exact wait the core computed;
    `queue_ms` how long the request waited in its lane first (0: shed at once).
    `deadline_refused`: refused at join, its predicted wait (`predicted_wait_s`,
    else None) being past the request's own `max_wait_ms`.
    """

    def __init__(
        self,
        code: str,
        retry_after_s: float,
        lane: Tier,
        *,
        predicted_wait_s: float | None = None,
        deadline_refused: bool = False,
    ) -> None:
        self.code = code
        self.retry_after_s = retry_after_s
        self.lane = lane
        self.queue_ms = 0.0
        self.predicted_wait_s = predicted_wait_s
        self.deadline_refused = deadline_refused
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


# The anonymous flow's ask, as `AdmissionCore.ask()` returns it.
_Ask = tuple[int, int, int, int]


class Slot:
    """One `acquire()`: waits in its lane on enter, releases on exit.

    The object is its own slot so that an admission allocates nothing else.
    `queue_ms` is the time it waited in the lane, stamped however the wait
    ended (granted, shed or cancelled).
    `flow_queue` is the flow queue it joined (or was charged to);
    `predicted_wait_s` the core's prediction at join when it had to wait
    (None otherwise, or before the pool measured its drain rate).
    `shadowed`: the shed code the pool's rate limit decided in shadow mode
    (``enforce = false``) and did not apply, else None.
    """

    __slots__ = (
        "_adm", "_fut", "_timer", "_ask", "_weight", "_settled", "lane", "cost", "queue_ns",
        "flow_queue", "predicted_wait_s", "shadowed", "home", "ran_on",
    )

    def __init__(self, adm: Admission, lane: int, cost: int, ask: _Ask | None, weight: float) -> None:
        self._adm = adm
        self._fut: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._ask = ask
        self._weight = weight
        self._settled = False
        self.lane = lane
        self.cost = cost
        self.queue_ns = 0
        self.flow_queue = 0
        self.predicted_wait_s: float | None = None
        self.shadowed: str | None = None
        # The replica grant rule (core/replicas.rs HOME_LOOK_AHEAD): the
        # request's home replicas as a mask (bit r: replica r; tierq.routing
        # Route.homes), set before it joins, and the
        # replica it ran on plus one, set before its slot is released (0: none).
        self.home = 0
        self.ran_on = 0

    @property
    def tier(self) -> Tier:
        """The lane this request was admitted in, as its tier."""
        return _LANE_TIERS[self.lane]

    @property
    def queue_ms(self) -> float:
        return self.queue_ns / 1e6

    async def __aenter__(self) -> Slot:
        adm = self._adm
        core = adm._core
        ask = self._ask
        if ask is None:
            kind, a, b, c, queue, predicted, shadow = core.admit(self.lane, self.cost, home=self.home)
        else:
            kind, a, b, c, queue, predicted, shadow = core.admit(self.lane, self.cost, *ask, home=self.home)
        self.flow_queue = queue
        if shadow != _NONE:
            self.shadowed = SHED_CODES[shadow]
        if kind == 0:
            return self
        if kind == 2:
            if c != _NONE:
                # Evicted for this arrival, which then found no free cell itself.
                adm._shed_waiter(c, "server_overloaded")
            # The core's "never fits" wait (u64::MAX) arrives clamped to i64::MAX.
            retry = math.inf if b == _NEVER else b / 1e9
            code = SHED_CODES[a]
            # Only a deadline refusal is a queue_timeout at join.
            refused = code == "queue_timeout"
            raise Shed(
                code, retry, _LANE_TIERS[self.lane],
                predicted_wait_s=predicted / 1e9 if refused and predicted != _NONE else None,
                deadline_refused=refused,
            )
        # Queued as waiter `a`; maybe it evicted `b`, maybe a slot went to `c`.
        if predicted != _NONE:
            self.predicted_wait_s = predicted / 1e9
        if b != _NONE:
            adm._shed_waiter(b, "server_overloaded")
        if c == a:
            if predicted != _NONE:
                # Granted at join, waited 0: an observation as much as a later
                # grant is (left out, the margin learned only from waits and
                # climbed from the ones that overran).
                core.wait_observed(self.lane, predicted, 0)
            return self
        t0 = core.now_ns()
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        self._fut = fut
        # A little after the deadline (its own, if shorter), so the core sees it passed.
        wait_s = adm._max_wait_s[self.lane]
        if ask is not None and ask[3] > 0:
            wait_s = min(wait_s, ask[3] / 1e9)
        self._timer = loop.call_later(wait_s + _TIMER_SLACK_S, adm.expire_due)
        adm._waiters[a] = self
        if c != _NONE:
            adm._grant(c)
        try:
            await fut
        except Shed as e:
            self.queue_ns = core.now_ns() - t0
            e.queue_ms = self.queue_ms
            if predicted != _NONE and e.code == "queue_timeout":
                # Shed at its deadline: it would have waited at least this.
                core.wait_observed(self.lane, predicted, self.queue_ns)
            raise
        except asyncio.CancelledError:
            self.queue_ns = core.now_ns() - t0
            if core.cancel(a):
                del adm._waiters[a]
                self._timer.cancel()
            elif fut.done() and not fut.cancelled() and fut.exception() is None:
                # Granted just before the cancellation reached us: pass it on.
                adm._release()
            raise
        self.queue_ns = core.now_ns() - t0
        if predicted != _NONE:
            # The prediction's error teaches the lane's refusal margin.
            core.wait_observed(self.lane, predicted, self.queue_ns)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._adm._release(self.ran_on)

    def settle(self, charge: int) -> None:
        """The request's real service (price-weighted tokens, as `charge` at
        `acquire`): replaces the estimate its flow queue was charged at
        dispatch. At most once, before the slot is released; later calls
        are ignored. Without it the estimate stands."""
        if self._settled:
            return
        self._settled = True
        ask = self._ask
        estimate = ask[2] if ask is not None else self._adm._anon_service
        self._adm._core.settle(self.lane, self.flow_queue, estimate, charge, self._weight)


class Admission:
    """Admission control for one pool (one model's backend capacity).

    ``async with adm.acquire("priority") as slot:`` waits in its lane for one
    of `limit` slots or raises `Shed`. A task cancelled while waiting leaves
    the queue at once; the slot is released however the block exits.

    Settings: a `PoolSettings`, or its keyword arguments
    (``Admission(max_concurrency=8, queue_depth=256, max_wait_ms=...)``).
    ``max_concurrency=n`` fixes the limit at n; absent (or ``"auto"``) it is
    adaptive within ``[min_concurrency, max_concurrency_limit]``, moved by
    `observe_engine`, `observe_latency` and `observe_overload`.
    `priority_headroom` slots are kept for priority: a default request is
    admitted only while fewer than ``limit - priority_headroom`` are in use.
    """

    __slots__ = ("_core", "_waiters", "_max_wait_s", "_anon_service")

    def __init__(
        self,
        settings: PoolSettings | None = None,
        /,
        *,
        clock: ManualClock | None = None,
        **kwargs: Unpack[SettingsKwargs],
    ) -> None:
        if settings is None:
            settings = PoolSettings(**kwargs)
        elif kwargs:
            raise TypeError("Admission takes a PoolSettings or its keyword arguments, not both")
        self._adopt(AdmissionCore(settings, clock), settings)

    def _adopt(self, core: AdmissionCore, settings: PoolSettings) -> None:
        """Takes `core` as this pool's state (local or shared): the one place the
        Python side of an Admission is set up."""
        self._core = core
        self._waiters: dict[int, Slot] = {}
        waits = settings.max_wait_ms
        self._max_wait_s = tuple(waits[tier] / 1000 for tier in Tier)
        self._anon_service = core.ask()[2]

    def retune(self, settings: PoolSettings) -> int:
        """Applies `settings` (a reload) to this pool in place: its waiters stay
        in their lanes, its slots in flight are untouched, a raised limit hands
        free slots to waiters at once (a lowered one preempts nothing). Queue
        depth and fair_queues place the pool's words: changing one raises
        `SettingsError` (a restart applies it). Returns the waiters granted."""
        core, granted = self._core.retuned(settings)
        self._core = core
        waits = settings.max_wait_ms
        self._max_wait_s = tuple(waits[tier] / 1000 for tier in Tier)
        self._anon_service = core.ask()[2]
        # A waiter's expiry timer was set for its lane's old max wait.
        loop: asyncio.AbstractEventLoop | None = None
        now = core.now_ns()
        for waiter, slot in self._waiters.items():
            deadline = core.deadline_ns(waiter)
            if slot._timer is None or deadline is None:
                continue
            loop = loop or asyncio.get_running_loop()
            slot._timer.cancel()
            slot._timer = loop.call_later(max(0, deadline - now) / 1e9 + _TIMER_SLACK_S, self.expire_due)
        return self._granted(granted)

    @classmethod
    def shared(cls, name: str, worker: int, wake_fds: Sequence[int], settings: PoolSettings) -> Admission:
        """This worker's handle on a pool whose state is the shared block `name`.

        The block (made by `tierq.workers.SharedPools`) must have been created
        with the same settings; all workers then share one pair of lanes, one
        bucket, one slot count and one limit. Outcomes another worker decides
        for this one's waiters arrive in its mailbox: call `deliver()` when
        `wake_fds[worker]` (an eventfd) is readable.
        """
        core = AdmissionCore.attach_shared(name, worker, list(wake_fds), settings)
        adm = cls.__new__(cls)
        adm._adopt(core, settings)
        return adm

    @property
    def limit(self) -> int:
        """The concurrency limit in force (host-wide for a shared pool)."""
        return self._core.limit

    def observe_engine(self, running: int, waiting: int, kv_usage: float | None = None) -> int:
        """Feeds one sample of the engine's metrics: sequences `running` and
        `waiting` in its own queue, KV cache usage as a fraction (None: not
        reported). Workers scraping the same engine may all call it; samples
        closer than half `engine_interval_ms` count once. Returns how many of
        this process's waiters were granted a slot by a raised limit.
        """
        if running < 0 or waiting < 0:
            raise ValueError(f"running, waiting: must not be negative, got {running}, {waiting}")
        ppm = None if kv_usage is None or math.isnan(kv_usage) else round(min(max(kv_usage, 0.0), 1.0) * 1e6)
        return self._granted(self._core.observe_engine(running, waiting, ppm))

    def observe_latency(self, seconds: float) -> int:
        """Feeds one time to first token (seconds) of a response from an
        upstream without engine metrics: from the request leaving for the
        upstream to its first token, not counting the wait in tierq's lanes
        (that wait grows with the load tierq holds back, and would read as the
        upstream queueing). Returns waiters granted, as above."""
        if not (math.isfinite(seconds) and seconds >= 0):
            raise ValueError(f"seconds: must be a non-negative number, got {seconds}")
        return self._granted(self._core.observe_latency(round(seconds * 1e9)))

    def observe_overload(self) -> int:
        """The upstream answered 429/503 before anything reached the client:
        backs the limit off (once per back-off window). Returns waiters
        granted (always 0 today: a back-off only lowers the limit)."""
        return self._granted(self._core.observe_overload())

    def set_limit(self, n: int) -> int:
        """Sets an adaptive limit to `n` slots (a pool of replicas: the sum of
        theirs, `ReplicaPool`); a no-op for a fixed one. Returns waiters granted."""
        return self._granted(self._core.set_limit(n))

    def waiters(self) -> int:
        """Waiters in all three lanes (host-wide for a shared pool)."""
        depth = self._core.stats()["depth"]
        assert isinstance(depth, dict)
        return sum(depth.values())

    def retry_after_s(self, tier: Tier | str) -> float:
        """The honest wait for a request of `tier` this pool turns away now (the
        core's drain estimate, as for its own sheds; tierq.retry_after makes
        the headers of it)."""
        return self._core.retry_after_ns(_LANE_OF[tier]) / 1e9

    def max_wait_s(self, tier: Tier | str) -> float:
        """The longest a request of `tier` may wait in this pool (its lane's max_wait_ms)."""
        return self._max_wait_s[_LANE_OF[tier]]

    def _granted(self, waiters: list[int]) -> int:
        for waiter in waiters:
            self._grant(waiter)
        return len(waiters)

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

    def acquire(
        self,
        tier: Tier | str = Tier.DEFAULT,
        cost: int = 1,
        *,
        flow: str = "",
        weight: float = 1.0,
        charge: int = 1,
        max_wait_ms: int | None = None,
    ) -> Slot:
        """A slot in lane `tier` (a `Tier`, or its name: ``"priority"``), as an async context manager.

        Inside the lane, flows share by service (``fairness = "tokens"``):
        `flow` names the request's flow ("" is one anonymous flow), `weight`
        (0.01 to 100) its share, `charge` (an int >= 0, 0 counting as 1) its
        estimated service, corrected by `Slot.settle`. `max_wait_ms` (a
        positive int) is its own deadline, at most the lane's max wait: a
        request whose predicted wait is longer is refused at once (`Shed`
        ``queue_timeout`` with `deadline_refused`). Bad values raise
        ValueError here. `cost` is its bucket tokens; 0 takes none (a request
        another limit in shadow mode refused before it came here).
        """
        try:
            lane = _LANE_OF[tier]
        except (KeyError, TypeError):
            raise ValueError(f"tier: must be {_ONE_OF}, got {tier!r}") from None
        if not flow and weight == 1.0 and charge == 1 and max_wait_ms is None:
            return Slot(self, lane, cost, None, 1.0)
        if max_wait_ms is not None and (isinstance(max_wait_ms, bool) or not isinstance(max_wait_ms, int)):
            raise ValueError(f"max_wait_ms: must be a positive integer, got {max_wait_ms!r}")
        return Slot(self, lane, cost, self._core.ask(flow, weight, charge, max_wait_ms), weight)

    def fair_service_export(self) -> list[tuple[int, int, int]]:
        """``[(lane, queue, service)]``: the service this pool (host-wide when
        shared) gave each flow queue since the last export, for a cluster's
        lease sync to add on the other hosts (`fair_service_import`)."""
        return self._core.fair_service_export()

    def fair_service_import(self, items: list[tuple[int, int, int]]) -> None:
        """Adds other hosts' service (their `fair_service_export`) to these flow
        queues' counters, so a flow spread over hosts is charged once."""
        self._core.fair_service_import(items)

    def stats(self) -> dict[str, object]:
        """Depth per lane, in flight, admitted per lane, sheds per code,
        cancelled; `fairness` ("tokens" or "off"), `fair_flows_active` (per
        lane: flow queues with waiters), `deadline_refused`, `deadline_margin` (per
        lane: the learned refusal margin, a share of the predicted wait); the limit in force (`limit`), its
        `limit_mode`, `limit_min`, `limit_max`, `limit_signal` (what moved it
        last: engine, latency, backoff or none), `limit_changes` and the
        latency signal's `limit_floor_ms` and `limit_recent_ms`."""
        return self._core.stats()

    def withhold(self, n: int) -> int:
        """Takes `n` slots out of use, so requests get the limit (`limit`) minus
        the slots withheld: free slots at once, busy ones as their requests
        release them (before any waiter gets them). A request in flight is
        never cut. Returns how many were free. In a shared pool the counts
        (`stats()["withheld"]`, `["owed"]`) are host-wide and outlive the
        worker that set them. tierq.cluster keeps a host to its lease this way.
        """
        return self._core.withhold(n) if n > 0 else 0

    def restore(self, n: int) -> int:
        """Puts back up to `n` slots: owed ones first, then withheld ones, each
        handed to the next waiter as a released slot would be. Returns how many."""
        if n <= 0:
            return 0
        back, granted = self._core.restore(n)
        for waiter in granted:
            self._grant(waiter)
        return back

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
            slot._fut.set_exception(Shed(code, retry, _LANE_TIERS[slot.lane]))

    def _grant(self, waiter: int) -> None:
        slot = self._waiters.pop(waiter, None)
        if slot is None or slot._fut is None or slot._fut.done():
            # Its task is gone (cancelled in flight): the slot moves on.
            self._release()
            return
        if slot._timer is not None:
            slot._timer.cancel()
        slot._fut.set_result(None)

    def _release(self, home: int = 0) -> None:
        waiter = self._core.release(home)
        while waiter is not None:
            slot = self._waiters.pop(waiter, None)
            if slot is not None and slot._fut is not None and not slot._fut.done():
                if slot._timer is not None:
                    slot._timer.cancel()
                slot._fut.set_result(None)
                return
            waiter = self._core.release(home)


class ReplicaPool:
    """A pool's replicas (core/replicas.rs) beside its `Admission`: each
    replica's slots held and its own learned limit; the pool's limit is kept
    at their sum. A holder of a pool slot takes a replica (`pick`, by its
    order: tierq.routing) and gives it back before the pool's slot."""

    __slots__ = ("_health", "_leases", "admission", "core")

    def __init__(self, admission: Admission, n: int, settings: PoolSettings,
                 *, clock: ManualClock | None = None, core: Replicas | None = None) -> None:
        """`settings`: one replica's (the pool's limit is `n` times theirs);
        `core`: this worker's handle on a shared region (`tierq serve --workers N`)."""
        self.admission = admission
        self.core = core if core is not None else Replicas(n, settings, clock)
        # Per replica: its health as tierq.health last set it (down, slow-start
        # cap, 0: none), and its cluster lease (None: no [cluster]); the core's
        # health word holds the two combined (`_write`).
        self._health: list[tuple[bool, int]] = [(False, 0)] * self.core.count
        self._leases: list[int | None] = [None] * self.core.count
        self.sync()

    def pick(self, order: int, rule: int, avoid: int = 0) -> int:
        """A replica for a holder of a pool slot; `avoid`: replicas (bit i:
        replica i) passed over while another is in rotation (a request sent
        again after a try failed on them)."""
        return self.core.pick_avoiding(order, rule, avoid) if avoid else self.core.pick(order, rule)

    def learned(self, replica: int) -> int:
        """A replica's own limit (fixed or learned) before a slow start's cap."""
        return int(self.core.stats()[replica]["learned"])

    def set_health(self, replica: int, down: bool, cap: int = 0) -> int:
        """Replica `replica` out of rotation (`down`), or in it at most `cap`
        slots (0: its whole limit; tierq.health's slow start ramps it), then
        the pool's limit set to the replicas' sum; waiters granted."""
        self._health[replica] = (down, max(0, cap))
        self._write(replica)
        return self.sync()

    def set_lease(self, replica: int, lease: int | None) -> int:
        """Replica `replica` at most `lease` slots on this host (its cluster
        lease, tierq.cluster.leases; 0: none, so out of rotation here; None:
        no lease), beside its health's cap (the lower in force), then the
        pool's limit set to the replicas' sum; waiters granted."""
        self._leases[replica] = None if lease is None else max(0, lease)
        self._write(replica)
        return self.sync()

    def lease(self, replica: int) -> int | None:
        return self._leases[replica]

    def healthy(self, replica: int) -> bool:
        """Whether tierq.health has the replica in rotation (its lease aside)."""
        return not self._health[replica][0]

    def _write(self, replica: int) -> None:
        """The core's health word from the replica's health and lease: out if
        either says so (a lease of 0), else the lower of the two caps."""
        down, cap = self._health[replica]
        lease = self._leases[replica]
        if lease is not None:
            down = down or lease == 0
            cap = lease if cap == 0 else min(cap, lease)
        self.core.set_health(replica, down, cap)

    def release(self, replica: int) -> None:
        self.core.release(replica)

    def sync(self) -> int:
        """The pool's limit set to the replicas' sum; waiters granted. A
        replica's lowered limit lowers the pool's just after it is stored: in
        one process nothing picks in between (both under the GIL, no await);
        across workers a pick in between may go over (counted, `over`). Two
        workers moving two replicas at once may set sums in either order, so
        the sum is read again until it holds still."""
        granted = 0
        leased = any(lease is not None for lease in self._leases)
        for _ in range(8):
            capacity = self.core.capacity
            granted += self.admission.set_limit(capacity)
            if leased:
                # The core's capacity is at least 1 (a pool's limit is); leased,
                # every replica may be out here (a lease of 0 each): none then.
                # Leased, the pool's withheld slots are counted as they stand,
                # the lease agent's with them: any claimed below pass to that.
                self.core.claim_withheld(self.core.withheld, 0)
                self._withhold_to(sum(int(r["limit"]) for r in self.core.stats() if not r["down"]))
            else:
                # A fixed limit ignores set_limit, and an adaptive one stays
                # within its bounds (the replicas' summed): without this an
                # ejected replica left the pool's slots as they were and
                # every pick past the others' room went over one's limit.
                self._claim(max(0, self.admission.limit - capacity))
            if self.core.capacity == capacity:
                break
        return granted

    def _claim(self, want: int) -> None:
        """The pool's slots withheld for the replicas made `want`, through the
        claim word of their region (`Replicas.claim_withheld`), so workers
        that see one change at once withhold it once: more is withheld
        before it is claimed (a lost claim puts it back), less is claimed
        before it is restored, so the pool never withholds fewer than the
        claim. Busy slots are owed, as the lease agent's are."""
        for _ in range(64):
            had = self.core.withheld
            if want == had:
                return
            if want > had:
                self.admission.withhold(want - had)
                if self.core.claim_withheld(had, want):
                    return
                self._restore(want - had)  # another worker moved it first
            elif self.core.claim_withheld(had, want):
                self._restore(had - want)
                return

    def _restore(self, n: int) -> None:
        """`n` withheld slots back. A release in another worker turns an owed
        slot into a withheld one in two steps, so one may be missing for an
        instant: asked again then (a worker killed between the two leaks
        that slot, as core/admission.rs says)."""
        for _ in range(100):
            n -= self.admission.restore(n)
            if n <= 0:
                return

    def _withhold_to(self, capacity: int) -> None:
        """Under cluster leases the pool's usable slots withheld down to the
        replicas' sum in force, counting the lease agent's own; busy slots
        above it are owed, as the agent's are. One process only: `[cluster]`
        with several endpoints refuses `--workers N`."""
        st = self.admission.stats()
        usable = int(str(st["limit"])) - int(str(st["withheld"])) - int(str(st["owed"]))
        if usable > capacity:
            self.admission.withhold(usable - capacity)
        elif usable < capacity:
            self.admission.restore(capacity - usable)

    def feed(self, replica: int) -> ReplicaFeed:
        return ReplicaFeed(self, replica)

    def stats(self) -> list[dict[str, int | bool]]:
        return self.core.stats()


class ReplicaFeed:
    """One replica's signals (tierq.capacity's `Observer`): its engine's
    metrics, its times to first token and its overload answers move its own
    limit, then the pool's."""

    __slots__ = ("_pool", "replica")

    def __init__(self, pool: ReplicaPool, replica: int) -> None:
        self._pool = pool
        self.replica = replica

    @property
    def limit(self) -> int:
        return int(self._pool.core.stats()[self.replica]["limit"])

    def observe_engine(self, running: int, waiting: int, kv_usage: float | None = None) -> int:
        if running < 0 or waiting < 0:
            raise ValueError(f"running, waiting: must not be negative, got {running}, {waiting}")
        ppm = None if kv_usage is None or math.isnan(kv_usage) else round(min(max(kv_usage, 0.0), 1.0) * 1e6)
        moved = self._pool.core.observe_engine(self.replica, running, waiting, ppm,
                                               self._pool.admission.waiters())
        return self._pool.sync() if moved else 0

    def observe_latency(self, seconds: float) -> int:
        if not (math.isfinite(seconds) and seconds >= 0):
            raise ValueError(f"seconds: must be a non-negative number, got {seconds}")
        moved = self._pool.core.observe_latency(self.replica, round(seconds * 1e9),
                                                self._pool.admission.waiters())
        return self._pool.sync() if moved else 0

    def observe_overload(self) -> int:
        return self._pool.sync() if self._pool.core.observe_overload(self.replica) else 0
