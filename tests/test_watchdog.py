"""tierq.watchdog: a write pending past the timeout has its connection cut; others are left alone."""

from __future__ import annotations

import asyncio
import time

import pytest

from tierq.watchdog import WriteWatchdog


class _Transport(asyncio.WriteTransport):
    """Counts aborts; the watchdog only ever calls abort()."""

    def __init__(self) -> None:
        super().__init__()
        self.aborted = 0

    def abort(self) -> None:
        self.aborted += 1


def test_timeout_must_be_positive() -> None:
    with pytest.raises(ValueError):
        WriteWatchdog(0)


def test_a_stuck_write_is_cut_after_the_timeout_and_a_quick_one_never() -> None:
    # The watchdog's clock, moved by the test in steps floats hold exactly:
    # nothing here is timed.
    now = [100.0]
    wd = WriteWatchdog(0.25, clock=lambda: now[0])
    quick, stuck = _Transport(), _Transport()
    for _ in range(20):  # many short writes add up to more than the timeout
        wd.begin(quick)
        now[0] += 0.125
        assert wd.sweep() == 0
        assert not wd.end(quick)
    wd.begin(stuck)
    now[0] += 0.125
    assert wd.sweep() == 0 and not stuck.aborted  # never before the timeout ...
    now[0] += 0.125
    assert wd.sweep() == 1 and stuck.aborted == 1
    assert wd.end(stuck)  # ... and the write learns it was cut
    assert quick.aborted == 0 and wd.cut == 1
    assert not wd.end(stuck)  # ended once
    assert wd.sweep() == 0  # a cut write is not cut twice


async def test_the_sweeping_task_cuts_a_stuck_write_by_itself() -> None:
    wd = WriteWatchdog(0.2)
    wd.start()
    try:
        stuck = _Transport()
        t0 = time.monotonic()
        wd.begin(stuck)
        deadline = t0 + 30.0
        while not stuck.aborted:  # polled: a loaded host only makes it later
            assert time.monotonic() < deadline, "the sweep never ran"
            await asyncio.sleep(0.01)
        assert time.monotonic() - t0 >= 0.2  # never before the timeout
        assert wd.end(stuck) and wd.cut == 1
    finally:
        await wd.stop()
