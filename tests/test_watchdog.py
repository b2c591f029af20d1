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


async def test_a_stuck_write_is_cut_after_the_timeout_and_a_quick_one_never() -> None:
    wd = WriteWatchdog(0.2)
    wd.start()
    try:
        quick, stuck = _Transport(), _Transport()
        for _ in range(20):  # many short writes add up to more than the timeout
            wd.begin(quick)
            await asyncio.sleep(0.02)
            assert not wd.end(quick)
        t0 = time.monotonic()
        wd.begin(stuck)
        while not stuck.aborted:
            await asyncio.sleep(0.01)
            assert time.monotonic() - t0 < 5
        waited = time.monotonic() - t0
        assert waited >= 0.2  # never before the timeout ...
        assert wd.end(stuck)  # ... and the write learns it was cut
        assert quick.aborted == 0 and stuck.aborted == 1 and wd.cut == 1
        assert not wd.end(stuck)  # ended once
    finally:
        await wd.stop()
