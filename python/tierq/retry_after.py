"""The retry hint of a refused request, decided once for every refusal: pool
sheds, per-key limits and drain all answer with the same header pair.

`retry-after-ms` is the exact wait rounded up to a whole millisecond (at least
1: the openai SDK reads 0 as "no hint" and backs off on its own); `Retry-After`
is whole seconds rounded up, at least 1 and at most 120 (the SDK ignores longer
hints and stops retrying). A wait with no honest estimate (infinite) gets the
longest hint.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final

__all__ = ["RETRY_AFTER_MAX_S", "RetryAfter", "retry_after"]

RETRY_AFTER_MAX_S: Final = 120
_NS_PER_MS: Final = 1_000_000
_NS_PER_S: Final = 1_000_000_000


@dataclass(frozen=True, slots=True)
class RetryAfter:
    """The two retry headers of one refusal."""

    ms: int  # retry-after-ms
    s: int  # Retry-After

    def add_to(self, headers: dict[str, str]) -> None:
        """Set the pair on a response's own header dict (no second dict built)."""
        headers["retry-after-ms"] = str(self.ms)
        headers["Retry-After"] = str(self.s)


_LONGEST: Final = RetryAfter(RETRY_AFTER_MAX_S * 1000, RETRY_AFTER_MAX_S)


def retry_after(seconds: float) -> RetryAfter:
    """The header pair for a wait of `seconds` (the core's exact figure)."""
    ns_float = seconds * 1e9
    if not math.isfinite(ns_float):  # infinite, NaN, or past any clock
        return _LONGEST
    # Round back to the core's whole nanoseconds first: ceil(2.007 * 1000) is
    # 2008 in floats, and an exact wait must not gain a millisecond.
    ns = max(0, round(ns_float))
    ms = max(1, -(-ns // _NS_PER_MS))
    s = min(RETRY_AFTER_MAX_S, max(1, -(-ns // _NS_PER_S)))
    return RetryAfter(ms, s)
