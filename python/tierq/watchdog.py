"""The write timeout: one sweeping task instead of a timer per write.

A write to a client waits only when the client stops reading (aiohttp's drain is
the backpressure). Arming an `asyncio.timeout` around every write cost a timer
handle, a heap push and a cancel per stream chunk, about a tenth of the
gateway's CPU per request in profiles, to guard against something that almost
never happens. Instead a write registers its connection in a dict while it is
in progress (two dict operations) and one task sweeps that dict a few times per
timeout: a write still pending after `timeout_s` has its connection aborted.
The cut comes between `timeout_s` and `timeout_s` plus one sweep interval
(a quarter of the timeout, at most one second).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Final

__all__ = ["ClientWriteTimeout", "WriteWatchdog"]

_CUT: Final = -1.0  # the mark of a write whose connection the sweep aborted


class ClientWriteTimeout(Exception):
    """A write to the client waited longer than `[server] write_timeout_s`."""


class WriteWatchdog:
    """`clock`: monotonic seconds (a test passes its own, and calls `sweep`)."""

    def __init__(self, timeout_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        if not timeout_s > 0:
            raise ValueError("timeout_s must be > 0")
        self.timeout_s = timeout_s
        self._clock = clock
        self.interval_s = min(1.0, timeout_s / 4)
        # transport -> when its pending write started (monotonic s), or _CUT.
        # HTTP/1.1 writes one response at a time per connection, so a
        # connection has at most one pending write.
        self._pending: dict[asyncio.WriteTransport, float] = {}
        self._task: asyncio.Task[None] | None = None
        self.cut = 0  # connections aborted, for tests and metrics

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._sweep(),
                                                                name="tierq-write-watchdog")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def begin(self, transport: asyncio.WriteTransport) -> None:
        """A write on `transport` starts."""
        self._pending[transport] = self._clock()

    def end(self, transport: asyncio.WriteTransport) -> bool:
        """The write on `transport` is over; True if the sweep cut it."""
        return self._pending.pop(transport, 0.0) == _CUT

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            if self._pending:
                self.sweep()

    def sweep(self) -> int:
        """One pass: cut every write pending for `timeout_s` or more; how many were cut."""
        deadline = self._clock() - self.timeout_s
        cut = 0
        for transport, since in list(self._pending.items()):
            if since != _CUT and since <= deadline:
                self._pending[transport] = _CUT
                cut += 1
                # Abort, not close: a close would wait to flush what the
                # client is not reading. The pending drain then fails.
                transport.abort()
        self.cut += cut
        return cut
