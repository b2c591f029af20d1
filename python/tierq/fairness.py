"""Who got each pool's service over the last minute, for /status: the top flows by
queued and by served tokens, and Jain's fairness index of the flows that waited.

The core decides the fair order (docs/architecture.md); this module only watches
it, in bounded memory: six windows of ten seconds, each holding at most
`TRACKED` flows (when a window is full, a new flow takes the place of the one
with the fewest tokens so far, so heavy flows stay and the light tail is
approximate). A worker's `FlowBoard.data()` travels in its snapshot and the
workers' lists are summed per flow (`merge`).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Final

__all__ = [
    "TOP",
    "TRACKED",
    "WINDOW_S",
    "WINDOWS",
    "FlowBoard",
    "FlowLine",
    "flows_json",
    "jain_index",
    "merge",
]

WINDOW_S: Final = 10
WINDOWS: Final = 6  # a rolling minute
TRACKED: Final = 64  # flows per window per pool, and per pool in a snapshot
TOP: Final = 5  # flows shown per list on /status

# One flow's numbers: [queued tokens, served tokens, served service / weight, waited]
_QUEUED, _SERVED, _NORM, _WAITED = range(4)

#: (flow, queued tokens, served tokens, served service / weight, waited in line: 0/1)
FlowLine = tuple[str, int, int, float, int]


class FlowBoard:
    """One pool's flows over the last minute (one process's view).

    `queued` when a request joins the pool's line (its estimated tokens),
    `served` when it ends with real usage (its tokens, and its service charge
    divided by its flow's weight, what fair queuing equalises); `waited` marks a
    flow that had a request wait in line, the flows Jain's index is taken over.
    """

    __slots__ = ("_clock", "_windows", "_current", "_current_end")

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._windows: deque[tuple[float, dict[str, list[float]]]] = deque(maxlen=WINDOWS)
        self._current: dict[str, list[float]] = {}
        self._current_end = 0.0

    def _entry(self, flow: str) -> list[float]:
        now = self._clock()
        if now >= self._current_end:
            # Windows on a fixed grid, each kept with its end: `data` drops those
            # older than a minute, so an idle stretch needs no empty windows.
            self._current = {}
            self._current_end = (now // WINDOW_S + 1) * WINDOW_S
            self._windows.append((self._current_end, self._current))
        window = self._current
        entry = window.get(flow)
        if entry is None:
            if len(window) >= TRACKED:
                del window[min(window, key=lambda f: window[f][_QUEUED] + window[f][_SERVED])]
            entry = window[flow] = [0, 0, 0.0, 0]
        return entry

    def queued(self, flow: str, tokens: int) -> None:
        self._entry(flow)[_QUEUED] += tokens

    def waited(self, flow: str) -> None:
        self._entry(flow)[_WAITED] = 1

    def served(self, flow: str, tokens: int, charge: int, weight: float) -> None:
        entry = self._entry(flow)
        entry[_SERVED] += tokens
        entry[_NORM] += charge / weight

    def data(self) -> list[FlowLine]:
        """The last minute's flows, summed over its windows: the `TRACKED` with the
        most tokens queued or served."""
        oldest = self._clock() - WINDOWS * WINDOW_S
        summed: dict[str, list[float]] = {}
        for end, window in self._windows:
            if end <= oldest:
                continue
            for flow, e in window.items():
                acc = summed.get(flow)
                if acc is None:
                    summed[flow] = list(e)
                else:
                    acc[_QUEUED] += e[_QUEUED]
                    acc[_SERVED] += e[_SERVED]
                    acc[_NORM] += e[_NORM]
                    acc[_WAITED] = max(acc[_WAITED], e[_WAITED])
        return _bounded(summed)


def _bounded(summed: dict[str, list[float]]) -> list[FlowLine]:
    lines = [(f, int(e[_QUEUED]), int(e[_SERVED]), float(e[_NORM]), int(e[_WAITED]))
             for f, e in summed.items()]
    lines.sort(key=lambda x: (-(x[1] + x[2]), x[0]))
    return lines[:TRACKED]


def merge(lists: Iterable[Sequence[FlowLine]]) -> list[FlowLine]:
    """Several workers' lines for one pool, summed per flow."""
    summed: dict[str, list[float]] = {}
    for lines in lists:
        for flow, queued, served, norm, waited in lines:
            acc = summed.get(flow)
            if acc is None:
                summed[flow] = [queued, served, norm, waited]
            else:
                acc[_QUEUED] += queued
                acc[_SERVED] += served
                acc[_NORM] += norm
                acc[_WAITED] = max(acc[_WAITED], waited)
    return _bounded(summed)


def jain_index(values: Sequence[float]) -> float | None:
    """Jain's fairness index (sum x)^2 / (n sum x^2): 1 when all are equal, 1/n
    when one has everything; None for no values or all zero."""
    total = sum(values)
    squares = sum(v * v for v in values)
    if not values or squares == 0:
        return None
    return total * total / (len(values) * squares)


def _label(flow: str) -> str:
    # tierq.intake names a flow key id, or key id + "\x1f" + fairness id; "" is
    # the anonymous flow of a gateway without keys.
    key, sep, fid = flow.partition("\x1f")
    return (key or "local") + ("/" + fid if sep else "")


def flows_json(lines: Sequence[FlowLine]) -> dict[str, object]:
    """A pool's `flows` on /status.json: the top flows by queued and by served
    tokens over the last minute, and Jain's index over the flows that waited in
    line (of their served service divided by weight; 1 is an even share)."""
    waited = [norm for _, _, _, norm, w in lines if w]
    return {
        "window_s": WINDOW_S * WINDOWS,
        "top_queued": [{"flow": _label(f), "tokens": q} for f, q, *_ in
                       sorted(lines, key=lambda x: (-x[1], x[0]))[:TOP] if q],
        "top_served": [{"flow": _label(f), "tokens": s} for f, _, s, *_ in
                       sorted(lines, key=lambda x: (-x[2], x[0]))[:TOP] if s],
        "backlogged": len(waited),
        "jain_index": None if (j := jain_index(waited)) is None else round(j, 4),
    }
