"""Downgrades: a key's priority requests served as default, echoed and billed as
default, when its ramp rule or its daily priority budget says so (DESIGN.md,
Tier semantics). `Downgrades.decide` is the one decision, made before admission:
the tier served and why, with what it counted (a `Hold`) so the request's end
settles it to the real usage or gives it back.

The counters live in the host's key table (core/keytable.rs: one CAS per
decision, shared by every worker of `tierq serve --workers N`), or in a table of
this process's own.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from decimal import Decimal
from typing import Final

from tierq._core import SharedCounter, SharedKeyBuckets
from tierq.keys import KeyInfo
from tierq.tiers import Tier, TierReason

__all__ = ["DAY_S", "STEP_S", "Downgrades", "Hold", "growth_per_step", "nano_usd", "spend_nano"]

log = logging.getLogger("tierq.downgrades")

#: The ramp rule's step: a key's priority rate is its tokens per minute.
STEP_S: Final = 60
#: The budget's period: a UTC day (Unix time is UTC; leap seconds aside).
DAY_S: Final = 86_400
FEMTO_PER_NANO: Final = 10**6


def nano_usd(femto: int) -> int:
    """A cost in femto-USD as the budget counts it: whole nano-USD, rounded up."""
    return -(-max(0, femto) // FEMTO_PER_NANO)


def spend_nano(spend: Iterable[tuple[str, Decimal]]) -> dict[str, int]:
    """Each key's spend (its ledger lines' USD costs) as the budget counts it:
    each line in whole nano-USD, rounded up."""
    totals: dict[str, int] = {}
    for key_id, cost in spend:
        totals[key_id] = totals.get(key_id, 0) + nano_usd(int(cost.scaleb(15)))
    return totals


def growth_per_step(key: KeyInfo) -> float:
    """The ramp rule per step: (1 + ramp_max_growth) over ramp_window_s, spread
    evenly over its minutes, so over any window the rate grows by at most
    ramp_max_growth (above ramp_min_tpm)."""
    assert key.ramp_max_growth is not None
    return float((1.0 + key.ramp_max_growth) ** (STEP_S / key.ramp_window_s))


@dataclass(frozen=True, slots=True)
class Hold:
    """What a request served priority counted against its key: its estimate in
    the ramp step and in the day's budget (0 where the key has no such rule)."""

    step: int
    ramp_tokens: int
    day: int
    budget_nano: int
    budgeted: bool  # counted in the budget (its key has one)


class Downgrades:
    """The ramp rule and the priority budget of every key, on one key table.

    `clock`: Unix time in seconds (tests pass a manual one). The ramp step and the
    UTC day are read from it, so every worker and host agrees on them.
    """

    def __init__(self, shared: SharedKeyBuckets | None = None,
                 clock: Callable[[], float] = time.time, capacity: int = 4096) -> None:
        self._table = shared if shared is not None else SharedKeyBuckets(capacity)
        self._clock = clock
        self._counters: dict[tuple[str, str], SharedCounter | None] = {}
        self.decided = {reason: 0 for reason in TierReason}  # downgrades made here

    def _counter(self, key_id: str, kind: str) -> SharedCounter | None:
        found = self._counters.get((key_id, kind), ...)
        if found is ...:
            found = self._table.counter(key_id, kind)
            if found is None:
                log.warning("key table full (%d keys): key %s is never downgraded by its %s",
                            self._table.capacity, key_id, kind)
            self._counters[(key_id, kind)] = found
        return found

    def decide(self, key: KeyInfo | None, tier: Tier, est_tokens: int,
               est_femto: int) -> tuple[Tier, TierReason | None, Hold | None]:
        """The tier a request is served at and why it was lowered (None: it was
        not), and what it counted. Only a priority request of a key with a ramp
        rule or a budget is looked at. The ramp comes first: a request past its
        ramp spends nothing of the budget."""
        if (tier is not Tier.PRIORITY or key is None
                or (key.ramp_max_growth is None and key.priority_budget_usd is None)):
            return tier, None, None
        now = self._clock()
        step, day = int(now // STEP_S), int(now // DAY_S)
        tokens = max(0, est_tokens)
        ramp = self._counter(key.public_id, "ramp") if key.ramp_max_growth is not None else None
        if ramp is not None:
            allowed = max(key.ramp_min_tpm, math.floor(ramp.count(step - 1) * growth_per_step(key)))
            # Served while the step's count is below its allowance (the last one
            # may pass it by its own estimate): so a step uses all of its
            # allowance, and the next one's, grown from it, is larger. Were a
            # request to fit whole, up to one request of each step's allowance
            # would go unused, and below about f / (f - 1) requests a step
            # (37 for OpenAI's rule) the allowance would never grow.
            if not ramp.take(step, tokens, allowed + tokens - 1):
                self.decided[TierReason.RAMP] += 1
                return Tier.DEFAULT, TierReason.RAMP, None
        budget = (self._counter(key.public_id, "budget")
                  if key.priority_budget_usd is not None else None)
        cost = nano_usd(est_femto) if budget is not None else 0
        if budget is not None and key.priority_budget_usd is not None:
            limit = int(key.priority_budget_usd.scaleb(9))
            if not budget.take(day, cost, limit):
                if ramp is not None:
                    ramp.add(step, -tokens)
                self.decided[TierReason.BUDGET] += 1
                return Tier.DEFAULT, TierReason.BUDGET, None
        return tier, None, Hold(step, tokens if ramp is not None else 0, day, cost,
                                budget is not None)

    def settle(self, key: KeyInfo, hold: Hold, real_tokens: int, real_femto: int) -> None:
        """Replaces the estimates `hold` counted with the real usage and cost (in
        the step and day it was counted in; a step or day over since is left alone)."""
        if hold.ramp_tokens and (ramp := self._counter(key.public_id, "ramp")) is not None:
            ramp.add(hold.step, max(0, real_tokens) - hold.ramp_tokens)
        if hold.budgeted and (budget := self._counter(key.public_id, "budget")) is not None:
            budget.add(hold.day, nano_usd(real_femto) - hold.budget_nano)

    def refund(self, key: KeyInfo, hold: Hold) -> None:
        """Gives back what `hold` counted: the request was not served (nothing billed)."""
        self.settle(key, hold, 0, 0)

    def spent_nano(self, key_id: str) -> int:
        """The key's priority spend today, as counted (estimates in flight included)."""
        budget = self._counter(key_id, "budget")
        return 0 if budget is None else budget.count(int(self._clock() // DAY_S))

    def rebuild(self, spend: Iterable[tuple[str, Decimal]]) -> None:
        """Today's spend per key as the ledger has it (a start-up): each key's
        count raised to at least it, so a worker restarted beside live ones
        counts nothing twice."""
        day = int(self._clock() // DAY_S)
        for key_id, nano in spend_nano(spend).items():
            budget = self._counter(key_id, "budget")
            if budget is not None and nano > budget.count(day):
                budget.add(day, nano - budget.count(day))

    def count(self, key_id: str, kind: str, period: int) -> int:
        """The key's count of `kind` ("ramp", "budget") in `period` (its step or day)."""
        counter = self._counter(key_id, kind)
        return 0 if counter is None else counter.count(period)

    def uncount(self, key_id: str, kind: str, period: int, n: int) -> None:
        """Takes `n` off that count (never below 0): counted elsewhere now."""
        counter = self._counter(key_id, kind)
        if counter is not None:
            counter.add(period, -n)

    def day_start(self) -> float:
        """When today (UTC) began, in Unix seconds: the ledger's rows since then rebuild it."""
        return float(int(self._clock() // DAY_S) * DAY_S)
