"""Replica health: which replicas of one upstream a request may be routed to.

Passive outlier detection as Envoy's (consecutive failures eject a replica for a
back-off that grows with each ejection, at most a share of the replicas out at
once), an ejected replica's return (a probe for one that refused connections,
its back-off for one that answered 5xx), then a slow start that ramps its limit
from 1 to its learned limit. Pure state on an injected clock: the request path
feeds it outcomes, the probe loop feeds it probes, the router reads it.
"""

from __future__ import annotations

import enum
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

__all__ = ["HEALTH_DEFAULTS", "Health", "HealthSettings", "Outcome", "ReplicaState"]


@dataclass(frozen=True, slots=True)
class HealthSettings:
    """An upstream's `[upstreams.health]`; defaults follow Envoy's outlier
    detection where it has one (consecutive_5xx 5, base_ejection_time 30 s,
    max_ejection_time 300 s) and differ where stated:

    - the ejection time doubles per ejection (base x 2^(n-1), capped at
      `max_ejection_s`), where Envoy's grows linearly (base x n): a replica
      that keeps failing costs fewer failed first tries;
    - `max_ejection_percent` 50 (Envoy: 10, at least one host): tierq's pools
      are a handful of replicas, where 10% is none; at least one replica may
      always be ejected when there are two or more, never the only one;
    - `slow_start_s` 10 (Envoy: off unless set, linear with aggression 1 as
      here): the rejoined replica's limit goes from 1 to its learned limit
      over this time.
    """

    consecutive_failures: int = 5
    base_ejection_s: float = 30.0
    max_ejection_s: float = 300.0
    max_ejection_percent: int = 50
    slow_start_s: float = 10.0
    # How often an ejected replica that refused connections is probed; its
    # first successful probe ends its ejection.
    probe_interval_s: float = 1.0

    def __post_init__(self) -> None:
        if not 1 <= self.consecutive_failures <= 1000:
            raise ValueError(f"consecutive_failures: expected 1..1000, got {self.consecutive_failures}")
        for name in ("base_ejection_s", "max_ejection_s", "probe_interval_s"):
            v = getattr(self, name)
            if not (math.isfinite(v) and 0 < v <= 86400):
                raise ValueError(f"{name}: expected more than 0 and at most 86400, got {v}")
        if self.max_ejection_s < self.base_ejection_s:
            raise ValueError(f"max_ejection_s: expected at least base_ejection_s ({self.base_ejection_s}), "
                             f"got {self.max_ejection_s}")
        if not 0 <= self.max_ejection_percent <= 100:
            raise ValueError(f"max_ejection_percent: expected 0..100, got {self.max_ejection_percent}")
        if not (math.isfinite(self.slow_start_s) and 0 <= self.slow_start_s <= 3600):
            raise ValueError(f"slow_start_s: expected 0..3600, got {self.slow_start_s}")


HEALTH_DEFAULTS: Final = HealthSettings()


class Outcome(enum.Enum):
    """What one request's try on a replica says about the replica."""

    OK = "ok"  # an answer that is not a server error (4xx included: the client's)
    FAILED = "failed"  # a 5xx other than the overload answers (429/503: the limit's business)
    UNREACHABLE = "unreachable"  # refused, reset or closed before an answer


class ReplicaState(enum.Enum):
    HEALTHY = "healthy"
    EJECTED = "ejected"
    SLOW_START = "slow_start"


class _Replica:
    __slots__ = ("consecutive", "ejections", "ejected_at", "until", "unreachable", "rejoined_at",
                 "next_probe", "total_ejections")

    def __init__(self) -> None:
        self.consecutive = 0  # failures in a row since the last success
        self.ejections = 0  # the back-off multiplier: ejections not yet forgiven
        self.total_ejections = 0
        self.ejected_at: float | None = None
        # When the ejection ends; inf while it waits for a probe.
        self.until = 0.0
        self.unreachable = False
        self.rejoined_at: float | None = None
        self.next_probe = 0.0


class Health:
    """The health of `replicas` replicas (indexed 0..replicas-1) of one upstream.

    An ejection is decided inline, on the failure that completes the run of
    `consecutive_failures` (Envoy's consecutive_5xx), unless `max_ejection_percent`
    of the replicas are out already. An ejected replica that refused
    connections waits for a probe (`probe_due`, `probed`): it comes back when
    it listens again, however long its back-off. One that answered 5xx (it
    listens, so a probe says nothing) comes back when its back-off ends. The
    back-off multiplier is forgiven one step per `base_ejection_s` the
    replica then stays in service (Envoy decrements it per clean interval).
    """

    def __init__(self, replicas: int, settings: HealthSettings = HEALTH_DEFAULTS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if replicas < 1:
            raise ValueError(f"replicas: expected at least 1, got {replicas}")
        self.settings = settings
        self._clock = clock
        self._r = [_Replica() for _ in range(replicas)]
        # Told right after an outcome ejected a replica (tierq.probes'
        # HealthLoop.check), so the next request is routed around it at once.
        self.listener: Callable[[], None] | None = None

    @property
    def replicas(self) -> int:
        return len(self._r)

    @property
    def max_ejected(self) -> int:
        """How many replicas may be out at once: the percentage of them rounded
        down, at least one of two or more, never the only one."""
        n = len(self._r)
        if n < 2 or self.settings.max_ejection_percent == 0:
            return 0
        return max(1, n * self.settings.max_ejection_percent // 100)

    # ------------------------------------------------------------ feeding it

    def record(self, i: int, outcome: Outcome) -> bool:
        """One try's outcome on replica `i`; True when it ejected the replica."""
        r = self._r[i]
        now = self._clock()
        self._refresh(r, now)
        if outcome is Outcome.OK:
            r.consecutive = 0
            return False
        r.consecutive += 1
        if outcome is Outcome.UNREACHABLE:
            r.unreachable = True
        elif r.ejected_at is None:
            r.unreachable = False  # the run's last word decides how it comes back
        if r.ejected_at is not None or r.consecutive < self.settings.consecutive_failures:
            return False
        if self.ejected_count() >= self.max_ejected:
            return False
        self._eject(r, now)
        if self.listener is not None:
            self.listener()
        return True

    def _eject(self, r: _Replica, now: float) -> None:
        s = self.settings
        if r.rejoined_at is not None:
            forgiven = int((now - r.rejoined_at) // s.base_ejection_s)
            r.ejections = max(0, r.ejections - forgiven)
        r.ejections += 1
        r.total_ejections += 1
        r.ejected_at = now
        r.rejoined_at = None
        r.consecutive = 0
        backoff = min(s.max_ejection_s, s.base_ejection_s * 2.0 ** min(r.ejections - 1, 60))
        r.until = math.inf if r.unreachable else now + backoff
        r.next_probe = now + s.probe_interval_s

    def probe_due(self) -> list[int]:
        """The ejected replicas that refused connections and are due a probe;
        each is due again `probe_interval_s` later."""
        now = self._clock()
        due = []
        for i, r in enumerate(self._r):
            if r.ejected_at is not None and r.unreachable and now >= r.next_probe:
                r.next_probe = now + self.settings.probe_interval_s
                due.append(i)
        return due

    def probed(self, i: int, ok: bool) -> None:
        """A probe's result: a replica ejected for refusing connections that
        answers one is back, in slow start."""
        r = self._r[i]
        if ok and r.ejected_at is not None and r.unreachable:
            self._rejoin(r, self._clock())

    def _rejoin(self, r: _Replica, now: float) -> None:
        r.ejected_at = None
        r.until = 0.0
        r.unreachable = False
        r.consecutive = 0
        r.rejoined_at = now

    def _refresh(self, r: _Replica, now: float) -> None:
        if r.ejected_at is not None and now >= r.until:
            self._rejoin(r, r.until)  # back when its back-off ended, read now or later

    # ------------------------------------------------------------ reading it

    def state(self, i: int) -> ReplicaState:
        r = self._r[i]
        now = self._clock()
        self._refresh(r, now)
        if r.ejected_at is not None:
            return ReplicaState.EJECTED
        if r.rejoined_at is not None and now - r.rejoined_at < self.settings.slow_start_s:
            return ReplicaState.SLOW_START
        return ReplicaState.HEALTHY

    def healthy(self, i: int) -> bool:
        """Whether replica `i` may be routed to (slow start included)."""
        return self.state(i) is not ReplicaState.EJECTED

    def mask(self) -> int:
        """The routable replicas as a bit mask (bit i: replica i)."""
        return sum(1 << i for i in range(len(self._r)) if self.healthy(i))

    def ejected_count(self) -> int:
        return sum(1 for i in range(len(self._r)) if self.state(i) is ReplicaState.EJECTED)

    def share(self, i: int) -> float:
        """Replica `i`'s share of its limit: 0 ejected, 1 in service, and in
        slow start the time since it rejoined over `slow_start_s` (linear)."""
        st = self.state(i)
        if st is ReplicaState.EJECTED:
            return 0.0
        if st is ReplicaState.HEALTHY:
            return 1.0
        rejoined = self._r[i].rejoined_at
        assert rejoined is not None
        return max(0.0, min(1.0, (self._clock() - rejoined) / self.settings.slow_start_s))

    def limit(self, i: int, learned: int) -> int:
        """Replica `i`'s limit while ramping: from 1 when it rejoins to `learned`
        at the end of its slow start (0 while ejected)."""
        st = self.state(i)
        if st is ReplicaState.EJECTED:
            return 0
        share = self.share(i)
        if st is ReplicaState.HEALTHY or share >= 1.0:
            return learned
        return max(1, min(learned, 1 + math.floor((learned - 1) * share)))

    def ejected_for_s(self, i: int) -> float | None:
        """How much longer replica `i` stays out (None: in service; inf: until a probe)."""
        r = self._r[i]
        self._refresh(r, self._clock())
        if r.ejected_at is None:
            return None
        return r.until - self._clock()

    def snapshot(self, i: int) -> dict[str, object]:
        """What /status shows of replica `i`'s health."""
        r = self._r[i]
        st = self.state(i)
        left = self.ejected_for_s(i)
        return {
            "health": st.value,
            "consecutive_failures": r.consecutive,
            "ejections": r.total_ejections,
            "ejected_for_s": None if left is None or math.isinf(left) else round(left, 3),
            "waiting_for_probe": st is ReplicaState.EJECTED and r.unreachable,
            "slow_start_share": round(self.share(i), 3) if st is ReplicaState.SLOW_START else None,
        }

    def ejections(self, i: int) -> int:
        """Replica `i`'s ejections since start (a counter for /metrics)."""
        return self._r[i].total_ejections
